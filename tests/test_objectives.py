"""Objectives: the NELBO estimators against exact enumeration over orders."""

import itertools
import math

import pytest
import torch

from orderlab.likelihood import log_likelihood
from orderlab.model import Transformer
from orderlab.objectives import BlockNelbo, MDMNelbo, SetNLL
from orderlab.registry import build


def _model(rule, V=4, L=4, seed=0):
    torch.manual_seed(seed)
    m = Transformer(V, L, rule, d_model=16, n_layers=2, n_heads=2)
    with torch.no_grad():  # sharper than init so orders matter
        for p in m.parameters():
            p.mul_(8.0)
    return m.eval()


def _expected_nll(model, x, ranks, orders):
    lls = torch.stack([log_likelihood(model, x, o[None]) for o in orders])  # [n_orders, 1]
    return -lls.mean().item()


def _estimate(obj, model, x, ranks, n=6000):
    X, R = x.expand(n, -1), ranks.expand(n, -1)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        out = obj(model, X, R, g)
    return out.nats.mean().item(), out.nats.std().item() / math.sqrt(n), out


def test_mdm_nelbo_equals_expected_any_order_nll():
    """Continuous-time NELBO = E over uniform orders of -log p(x | order) (MDLM/MD4)."""
    model = _model("bidirectional")
    x = torch.tensor([[1, 3, 0, 2]])
    ranks = torch.tensor([[0, 1, 1, 1]])
    orders = [torch.tensor([0, *(p.index(i) + 1 for i in range(3))]) for p in itertools.permutations(range(3))]
    with torch.no_grad():
        want = _expected_nll(model, x, ranks, orders)
    got, se, out = _estimate(MDMNelbo("linear"), model, x, ranks)
    assert not out.exact
    assert abs(got - want) < 4 * se + 1e-3, (got, want, se)


def test_block_nelbo_equals_expected_blockwise_order_nll():
    """BD3-LM NELBO = E over orders uniform inside blocks, blocks left to right."""
    model = _model({"name": "block_causal", "block_size": 2})
    x = torch.tensor([[1, 3, 0, 2]])
    ranks = torch.ones(1, 4, dtype=torch.long)
    orders = [torch.tensor([a, 3 - a, 2 + b, 5 - b]) for a in (1, 2) for b in (1, 2)]
    with torch.no_grad():
        want = _expected_nll(model, x, ranks, orders)
    got, se, _ = _estimate(BlockNelbo("linear"), model, x, ranks)
    assert abs(got - want) < 4 * se + 1e-3, (got, want, se)


def test_set_nll_is_exact_nll_of_the_sampled_order():
    model = _model("set_causal")
    x = torch.tensor([[1, 3, 0, 2]])
    ranks = torch.tensor([[0, 1, 1, 1]])
    obj = SetNLL("quench")
    out = obj(model, x, ranks, torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = -log_likelihood(model, x, torch.tensor([[0, 1, 2, 3]]))
    torch.testing.assert_close(out.nats, want)
    assert out.exact and out.label == "nll"
    assert out.tokens.tolist() == [3.0]
    assert out.loss.item() == pytest.approx(want.item() / 3, rel=1e-5)


def test_objectives_check_the_model_and_process():
    with pytest.raises(ValueError, match="bidirectional"):
        MDMNelbo()(_model("set_causal"), torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="flat"):
        BlockNelbo("quench")
    obj = build("objective", {"name": "set_nll", "process": {"name": "staggered", "d": 2}, "steps": 3})
    assert obj.steps == 3 and type(obj.process).__name__ == "Staggered"
