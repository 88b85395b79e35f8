"""Planted random k-SAT (orderlab/tasks/sat.py): deterministic generation, every instance
satisfied by its planted assignment, a metric that accepts any satisfying assignment,
splits disjoint in the clauses, constructor errors naming the key."""

from __future__ import annotations

import itertools

import pytest
import torch

import orderlab
from orderlab.registry import ConfigError
from orderlab.tasks import PlantedSAT, hash_split


def _solutions(task: PlantedSAT, tokens: torch.Tensor) -> torch.Tensor:
    """Bool [2^n]: which assignments (itertools.product order) satisfy the instance, by brute force."""
    var, neg = task.decode_clauses(tokens[None])
    every = torch.tensor(list(itertools.product([0, 1], repeat=task.n)))  # [2^n, n]
    value = every[:, var[0].flatten()].view(len(every), task.m, task.k)
    return ~(value == neg[0]).all(-1).any(-1)


def test_generation_is_deterministic_in_split_and_seed():
    t = PlantedSAT(variables=6, clauses=18)
    a, ra = t.batch(32, "train", seed=3)
    b, rb = PlantedSAT(variables=6, clauses=18).batch(32, "train", seed=3)
    assert torch.equal(a, b) and torch.equal(ra, rb)
    assert not torch.equal(a, t.batch(32, "train", seed=4)[0])
    assert a.shape == (32, 18 * 3 + 12) and t.vocab_size == 2 + 18 and a.max() < t.vocab_size
    # ranks: 1 on the values, 0 on clauses and markers
    assert (ra[:, t.value_pos] == 1).all() and ra.sum(1).eq(6).all()
    assert (a[:, t.marker_pos] == 2 + torch.arange(6)).all()


def test_splits_are_disjoint_in_the_clauses():
    t = PlantedSAT(variables=6, clauses=10)
    for split, want in (("train", 0), ("valid", 1), ("test", 2)):
        x, _ = t.batch(64, split, seed=0)
        assert (hash_split(x[:, : t.prompt_len]) == want).all()


def test_every_planted_instance_is_satisfied_by_its_solution():
    for n, m, k in ((6, 30, 3), (8, 24, 3), (7, 12, 4), (5, 12, 2)):
        t = PlantedSAT(variables=n, clauses=m, k=k)
        x, r = t.batch(200, "test", seed=1)
        assert t.score(x, x, r).eq(1).all()
        var, neg = t.decode_clauses(x)
        assert (var.diff(dim=-1) > 0).all()  # k distinct variables per clause, sorted
        sigma = x[:, t.value_pos]
        assert not t.violated(sigma, var, neg).any()


def test_metric_accepts_any_satisfying_assignment_and_rejects_the_rest():
    t = PlantedSAT(variables=6, clauses=12)
    x, r = t.batch(16, "test", seed=2)
    every = torch.tensor(list(itertools.product([0, 1], repeat=6)))
    checked_other = 0
    for b in range(16):
        sols = _solutions(t, x[b])
        pred = x[b].repeat(len(every), 1)
        pred[:, t.value_pos] = every
        got = t.score(pred, x[b].repeat(len(every), 1), r[b].repeat(len(every), 1)).bool()
        assert torch.equal(got, sols)  # exactly the satisfying assignments, the planted one among them
        planted = (every == x[b, t.value_pos]).all(1)
        assert sols[planted].all()
        checked_other += int((sols & ~planted).sum())
    assert checked_other > 0  # some instance has a satisfying assignment other than the planted one
    m = t.metrics(x, x, r)
    assert m["planted"].eq(1).all() and m["satisfied"].eq(1).all()


def test_metric_rejects_a_non_boolean_value_and_a_changed_clause():
    t = PlantedSAT(variables=6, clauses=12)
    x, r = t.batch(4, "test", seed=0)
    bad = x.clone()
    bad[:, t.value_pos[0]] = t.vocab_size  # [MASK] left in place
    assert t.score(bad, x, r).eq(0).all()
    moved = x.clone()
    moved[:, t.marker_pos[0]] = 3  # a given marker changed
    assert t.score(moved, x, r).eq(0).all()


@pytest.mark.parametrize("args, key", [({"k": 1}, "k"), ({"variables": 2, "k": 3}, "variables"),
                                      ({"clauses": 0}, "clauses")])
def test_bad_constructor_args_name_the_key(args, key):
    with pytest.raises(ConfigError) as e:
        PlantedSAT(**args)
    assert e.value.path == key
    spec = {"task": {"name": "sat", **args}, "model": {"name": "transformer", "d_model": 16, "n_layers": 1,
                                                     "n_heads": 2}, "stages": {}, "policy": "l2r"}
    with pytest.raises(ConfigError) as e:
        orderlab.load(spec)
    assert e.value.path == f"task.{key}"


def test_propagation_order_reveals_only_forced_values_between_branches():
    t = PlantedSAT(variables=8, clauses=34)
    x, _ = t.batch(32, "test", seed=0)
    ranks = t.propagation_ranks(x)
    steps = ranks[:, t.value_pos]
    assert (steps >= 1).all() and (ranks[:, : t.prompt_len] == 0).all()
    var, neg = t.decode_clauses(x)
    sigma = x[:, t.value_pos]
    true = sigma.gather(1, var.flatten(1)).view_as(var) != neg
    forced_some = 0
    for b in range(32):
        for s in range(1, int(steps[b].max()) + 1):
            now = (steps[b] == s).nonzero().flatten().tolist()
            known = steps[b] < s
            kv = known[var[b]]
            unit = ~(kv & true[b]).any(-1) & ((~kv).sum(-1) == 1)
            forced = {int(v) for c in unit.nonzero().flatten() for v in var[b, c][~kv[c]]}
            if forced:  # a propagation step reveals exactly the forced values
                assert set(now) == forced
                forced_some += 1
            else:  # a branch step reveals one value
                assert len(now) == 1
    assert forced_some > 0
