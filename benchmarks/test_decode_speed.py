"""Decode speed at batch 1 and 32: cached vs uncached, eager vs compiled, against the
matmul floor (the group's baseline) and, at batch 1, a SetDLM-like decoder (setups.py).
Every orderlab variant decodes the same tokens (checked after timing)."""

from __future__ import annotations

import pytest
import torch

from conftest import run
from orderlab.decoding import decode
from setups import LENGTH, PROMPT, WINDOW, decode_inputs, decode_model, matmul_floor, policy, setdlm_like_decode

GEN = LENGTH - PROMPT  # generated tokens per row = steps (one token per step)
VARIANTS = {  # label: decode keywords
    "orderlab cached, compiled": {"cache": True, "compile": True},
    "orderlab cached, eager": {"cache": True},
    "orderlab uncached, compiled": {"cache": False, "compile": True},
    "orderlab uncached, eager": {"cache": False},
}
_tokens: dict[int, torch.Tensor] = {}


@pytest.fixture(scope="module")
def model():
    return decode_model()


def _check(batch, tokens):
    want = _tokens.setdefault(batch, tokens)
    assert torch.equal(tokens, want), "decode variants disagree"


@pytest.mark.parametrize("batch", [1, 32])
def test_matmul_floor(benchmark, model, batch):
    benchmark.group = f"decode B={batch}"
    run(benchmark, lambda: matmul_floor(model, batch, GEN), f"matmul floor ({batch} x {1 + WINDOW} rows, 17 mm/step)",
        baseline=True, steps=GEN, tokens=batch * GEN)


def test_setdlm_like(benchmark, model):
    benchmark.group = "decode B=1"
    x, r = decode_inputs(1)
    out = run(benchmark, lambda: setdlm_like_decode(model, x, PROMPT), "SetDLM-like batch-1 decoder", steps=GEN, tokens=GEN)
    _check(1, out)


@pytest.mark.parametrize("label", list(VARIANTS))
@pytest.mark.parametrize("batch", [1, 32])
def test_decode(benchmark, model, batch, label):
    benchmark.group = f"decode B={batch}"
    kw = VARIANTS[label]
    x, r = decode_inputs(batch)
    slow = batch > 1 and not kw["cache"]  # minutes per decode: one round
    out = run(benchmark, lambda: decode(model, policy(), x, r, **kw), label, rounds=1 if slow else 3,
              warmup=1 if kw.get("compile") or not slow else 0, steps=GEN, tokens=batch * GEN)
    _check(batch, out.tokens)
