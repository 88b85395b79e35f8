"""Planted random k-SAT (orderlab/tasks/sat.py), in both layouts (``sat``: clauses as
literal tokens then marker/value pairs; ``sat_grid``: variable-major incidence rows):
deterministic generation, clauses round-tripping through the tokens, every instance
satisfied by its planted assignment, a metric that accepts any satisfying assignment,
splits disjoint in the clauses, constructor errors naming the key."""

from __future__ import annotations

import itertools

import pytest
import torch

import orderlab
from orderlab.registry import ConfigError
from orderlab.tasks import PlantedSAT, PlantedSATGrid, hash_split

LAYOUTS = [PlantedSAT, PlantedSATGrid]


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


@pytest.mark.parametrize("cls", LAYOUTS)
def test_splits_are_disjoint_in_the_clauses(cls):
    t = cls(variables=6, clauses=10)
    keys = []
    for split, want in (("train", 0), ("valid", 1), ("test", 2)):
        x, r = t.batch(64, split, seed=0)
        assert (hash_split(x[:, t.clause_pos]) == want).all()
        assert (r[:, t.clause_pos] == 0).all()  # the key holds given tokens only, never a value
        keys.append({tuple(row) for row in x[:, t.clause_pos].tolist()})
    assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])


@pytest.mark.parametrize("cls", LAYOUTS)
def test_clauses_and_values_round_trip_through_the_tokens(cls):
    t = cls(variables=7, clauses=11)
    sigma, var, neg = t.plant(50, torch.Generator().manual_seed(0))
    x = t.encode(sigma, var, neg)
    assert x.shape == (50, t.seq_len) and x.min() >= 0 and x.max() < t.vocab_size
    v, g = t.decode_clauses(x)
    assert torch.equal(v, var) and torch.equal(g, neg)
    assert torch.equal(x[:, t.value_pos], sigma)


@pytest.mark.parametrize("cls", LAYOUTS)
def test_every_planted_instance_is_satisfied_by_its_solution(cls):
    for n, m, k in ((6, 30, 3), (8, 24, 3), (7, 12, 4), (5, 12, 2)):
        t = cls(variables=n, clauses=m, k=k)
        x, r = t.batch(200, "test", seed=1)
        assert t.score(x, x, r).eq(1).all()
        var, neg = t.decode_clauses(x)
        assert (var.diff(dim=-1) > 0).all()  # k distinct variables per clause, sorted
        sigma = x[:, t.value_pos]
        assert not t.violated(sigma, var, neg).any()


@pytest.mark.parametrize("cls", LAYOUTS)
def test_metric_accepts_any_satisfying_assignment_and_rejects_the_rest(cls):
    t = cls(variables=6, clauses=12)
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


@pytest.mark.parametrize("cls", LAYOUTS)
def test_metric_rejects_a_non_boolean_value_and_a_changed_given_token(cls):
    t = cls(variables=6, clauses=12)
    x, r = t.batch(4, "test", seed=0)
    assert t.score(x, x, r).eq(1).all()
    bad = x.clone()
    bad[:, t.value_pos[0]] = t.vocab_size  # [MASK] left in place
    assert t.score(bad, x, r).eq(0).all()
    given = (r[0] == 0).nonzero().flatten()
    for p in (given[0], given[-1], getattr(t, "marker_pos", given)[0]):  # a given clause token or marker changed
        moved = x.clone()
        moved[:, p] = (x[:, p] + 1) % t.vocab_size
        assert t.score(moved, x, r).eq(0).all()


@pytest.mark.parametrize("name, cls", [("sat", PlantedSAT), ("sat_grid", PlantedSATGrid)])
@pytest.mark.parametrize("args, key", [({"k": 1}, "k"), ({"variables": 2, "k": 3}, "variables"),
                                      ({"clauses": 0}, "clauses"), ({"variables": 6.0}, "variables")])
def test_bad_constructor_args_name_the_key(args, key, name, cls):
    with pytest.raises(ConfigError) as e:
        cls(**args)
    assert e.value.path == key
    spec = {"task": {"name": name, **args}, "model": {"name": "transformer", "d_model": 16, "n_layers": 1,
                                                     "n_heads": 2}, "stages": {}, "policy": "l2r"}
    with pytest.raises(ConfigError) as e:
        orderlab.load(spec)
    assert e.value.path == f"task.{key}"


@pytest.mark.parametrize("cls", LAYOUTS)
def test_propagation_order_reveals_only_forced_values_between_branches(cls):
    t = cls(variables=8, clauses=34)
    x, r = t.batch(32, "test", seed=0)
    ranks = t.propagation_ranks(x)
    steps = ranks[:, t.value_pos]
    assert (steps >= 1).all() and (ranks[r == 0] == 0).all()
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


def test_grid_layout_puts_each_value_before_its_clause_cells():
    t = PlantedSATGrid(variables=4, clauses=2)
    # (x1 ∨ ¬x2 ∨ x4) ∧ (¬x1 ∨ x3 ∨ x4), σ = 1010: absent 2, x_j in clause c 3 + 2c, ¬x_j 4 + 2c
    var = torch.tensor([[[0, 1, 3], [0, 2, 3]]])
    neg = torch.tensor([[[0, 1, 0], [1, 0, 0]]])
    x = t.encode(torch.tensor([[1, 0, 1, 0]]), var, neg)
    assert x[0].tolist() == [1, 3, 6,  # a_1, then x1 in clause 0, ¬x1 in clause 1
                             0, 4, 2,  # a_2: ¬x2 in clause 0, absent from clause 1
                             1, 2, 5,  # a_3: x3 in clause 1
                             0, 3, 5]  # a_4: x4 in both
    assert t.seq_len == 12 and t.vocab_size == 7 and t.value_pos.tolist() == [0, 3, 6, 9]
    r = t.batch(3, "train")[1]
    assert r[:, t.value_pos].eq(1).all() and r.sum(1).eq(4).all()
    assert t.render(x[0]) == "(x1 ∨ ¬x2 ∨ x4) ∧ (¬x1 ∨ x3 ∨ x4) => 1010"
    masked = x[0].clone()
    masked[t.value_pos[1]] = t.mask_id
    assert t.render(masked).endswith("=> 1?10")


@pytest.mark.parametrize("cell, token", [(1, 5),  # x1's cell in clause 0 holds a literal of clause 1
                                         (2, 2),  # clause 1 left with 2 literals
                                         (5, 5)])  # ... or with 4 (x2 added to clause 1)
def test_grid_decode_rejects_malformed_cells(cell, token):
    t = PlantedSATGrid(variables=4, clauses=2)
    x = torch.tensor([[1, 3, 6, 0, 4, 2, 1, 2, 5, 0, 3, 5]])
    t.decode_clauses(x)
    x[0, cell] = token
    with pytest.raises(ValueError, match="literal of its clause|exactly k"):
        t.decode_clauses(x)
