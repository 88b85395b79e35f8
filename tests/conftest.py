"""Fixtures shared by the test files: the tiny experiment most run tests start from."""

from __future__ import annotations

import textwrap

import pytest
from omegaconf import OmegaConf

# addition, a 1-layer d32 set-causal transformer, one 20-step stage: a whole run in seconds
TINY = textwrap.dedent(
    """
    task: {name: addition, digits: 2}
    model: {name: transformer, d_model: 32, n_layers: 1, n_heads: 2, attention: {name: set_causal}}
    stages:
      lm:
        objective: {name: set_nll, process: {name: staggered, d: 2}}
        train: {steps: 20, batch_size: 16, lr: 3.0e-3, warmup: 2, log_every: 5, eval_every: 10, ckpt_every: 10, valid_n: 32, ema: 0.9}
    policy: {name: l2r}
    evaluate: {policies: [l2r, {name: threshold, tau: 0.9}], n: 16, batch_size: 16}
    run: {dir: runs}
    """
)


@pytest.fixture
def tiny_config() -> dict:
    """The tiny experiment as a plain dict (a fresh copy per test)."""
    return OmegaConf.to_container(OmegaConf.create(TINY))


@pytest.fixture
def yaml_path(tmp_path):
    """The tiny experiment written to ``tmp_path / "tiny.yaml"`` (its run folder: ``<run.dir>/tiny``)."""
    p = tmp_path / "tiny.yaml"
    p.write_text(TINY)
    return p


def gen(seed: int = 0):
    """A seeded CPU generator."""
    import torch
    return torch.Generator().manual_seed(seed)


def sharp_denoiser(V: int = 2, L: int = 2, seed: int = 0, scale: float = 4.0):
    """A tiny bidirectional denoiser with its weights scaled by ``scale`` (peaked, far from
    uniform predictions: enumeration tests then tell estimators apart)."""
    import torch

    import orderlab
    torch.manual_seed(seed)
    m = orderlab.build("model", "transformer", vocab_size=V, max_len=L, attention="bidirectional", d_model=16, n_layers=1,
                       n_heads=2)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(scale)
    return m.eval()
