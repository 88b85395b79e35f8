"""Rank-masked attention: the reference (einsum, mask per call) against SDPA with a
boolean mask (per call, and built once as the model does for its layers), and Triton when
CUDA is present; at the training shape (set-causal two-stream pass, forward and
forward + backward) and the decode shape (1 + W queries over the cache's capacity)."""

from __future__ import annotations

import pytest
import torch

from conftest import run
from orderlab.kernels import RankMask, set_attention
from orderlab.rules import SetCausal
from setups import LENGTH, WINDOW

H, D = 4, 64
BACKENDS = ["reference", "sdpa", "sdpa, mask built once"] + (["triton"] if torch.cuda.is_available() else [])


def _train_case(batch=8):
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(batch, LENGTH, dtype=torch.long)
    ranks = torch.stack([torch.randperm(LENGTH, generator=g) + 1 for _ in range(batch)])
    (s,) = SetCausal().passes(x, ranks, 1)
    N = s.tokens.shape[1]  # 2L
    q, k, v = (torch.randn(batch, H, N, D, generator=g, requires_grad=True) for _ in range(3))
    return q, k, v, (s.q_rank, s.k_rank, s.q_group, s.k_group), None


def _decode_case(batch):
    g = torch.Generator().manual_seed(0)
    C, N = LENGTH + 1, 1 + WINDOW
    q = torch.randn(batch, H, N, D, generator=g)
    k, v = torch.randn(batch, H, C, D, generator=g), torch.randn(batch, H, C, D, generator=g)
    k_rank = torch.randint(0, 200, (batch, C), generator=g)
    q_rank = torch.full((batch, N), 200)
    groups = torch.full((batch, N), -1), torch.full((batch, C), -1)
    return q, k, v, (q_rank, k_rank, *groups), torch.full((batch,), C - 3)


def _attend(backend, q, k, v, masks, k_len, vis):
    if backend == "sdpa, mask built once":
        return vis.attend(q, k, v)
    return set_attention(q, k, v, *masks, k_len=k_len, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["train fwd", "train fwd+bwd", "decode B=1", "decode B=32"])
def test_attention(benchmark, case, backend):
    benchmark.group = f"attention, {case}"
    q, k, v, masks, k_len = _train_case() if case.startswith("train") else _decode_case(int(case.split("=")[1]))
    vis = RankMask(*masks, k_len=k_len)
    vis.mask  # built before timing: shared by the layers of a forward
    if case == "train fwd+bwd":
        def fn():
            _attend(backend, q, k, v, masks, k_len, vis).sum().backward()
    else:
        def fn():
            with torch.no_grad():
                _attend(backend, q, k, v, masks, k_len, vis)
    run(benchmark, fn, backend, baseline=backend == "reference", rounds=5)
