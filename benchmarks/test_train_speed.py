"""Training step (forward + backward) of each configuration against a plain causal
transformer step of the same size with ``is_causal`` SDPA (the group's baseline).

Configurations as in ``experiments/``: set diffusion (set-causal two-stream, 2L tokens,
staggered order), AR (set-causal, quench order), block (BD3-LM two-stream), MDM
(bidirectional over L tokens). Issue 11's goal: set-causal at most 2.3x the causal step.
"""

from __future__ import annotations

import pytest
import torch

import orderlab

from conftest import run
from orderlab.builder import build
from setups import LENGTH, SIZE, VOCAB, CausalLM, causal_step

BATCH = 8
CONFIGS = {  # label: (attention rule, objective)
    "set diffusion (set-causal two-stream)": ("set_causal", {"name": "set_nll", "process": {"name": "staggered", "d": 2}}),
    "AR (set-causal, quench order)": ("set_causal", {"name": "set_nll", "process": {"name": "quench"}}),
    "block (BD3-LM, block 4)": ({"name": "block_causal", "block_size": 4}, {"name": "block_nelbo", "process": {"name": "linear"}}),
    "MDM (bidirectional)": ("bidirectional", {"name": "mdm_nelbo", "process": {"name": "linear"}}),
}


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=g)
    ranks = torch.ones(BATCH, LENGTH, dtype=torch.long)
    ranks[:, :16] = 0
    return x, ranks


def test_causal_baseline(benchmark):
    benchmark.group = "training step"
    torch.manual_seed(0)
    lm = CausalLM(orderlab.build("model", "transformer", vocab_size=VOCAB, max_len=LENGTH, attention="set_causal", **SIZE))
    x, _ = _data()
    run(benchmark, lambda: causal_step(lm, x), f"plain causal, is_causal SDPA ({BATCH} x {LENGTH} tokens)", baseline=True)


@pytest.mark.parametrize("label", list(CONFIGS))
def test_training_step(benchmark, label):
    benchmark.group = "training step"
    rule, objective = CONFIGS[label]
    torch.manual_seed(0)
    model = orderlab.build("model", "transformer", vocab_size=VOCAB, max_len=LENGTH, attention=rule, **SIZE)
    obj = build("objective", objective)
    x, ranks = _data()
    g = torch.Generator().manual_seed(0)

    def step():
        model.zero_grad(set_to_none=True)
        obj.step(model, x, ranks, generator=g).loss.backward()

    run(benchmark, step, label)
