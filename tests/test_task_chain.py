import itertools
from functools import reduce

import pytest
import torch

from orderlab import ranks as R
from orderlab.builder import build
from orderlab.tasks import Chain, hash_split, permutation_table


def compose(a, b):
    """(a ∘ b)(i) = a(b(i)) on permutation tuples: the reference, independent of the table."""
    return tuple(a[b[i]] for i in range(len(a)))


@pytest.mark.parametrize("degree", [3, 4])
def test_permutation_table_is_the_symmetric_group(degree):
    perms, mul = permutation_table(degree)
    elems = list(itertools.permutations(range(degree)))
    assert perms.tolist() == [list(e) for e in elems] and perms[0].tolist() == list(range(degree))
    G = len(elems)
    for a, b in itertools.product(range(G), repeat=2):
        assert elems[int(mul[a, b])] == compose(elems[a], elems[b])
    assert not torch.equal(mul, mul.T)  # non-abelian


@pytest.mark.parametrize("degree,length", [(3, 6), (4, 3)])
def test_answers_are_prefix_or_suffix_compositions(degree, length):
    t = Chain(chains=3, length=length, degree=degree)
    x, r = t.batch(200, "train", seed=2)
    elems = list(itertools.permutations(range(degree)))
    p_pos, y_pos, d_pos = t.p_pos, t.y_pos, t.dir_pos
    seen = set()
    for row in x:
        for c in range(t.chains):
            p = [elems[int(v)] for v in row[p_pos[c]]]
            y = [elems[int(v)] for v in row[y_pos[c]]]
            l2r = int(row[d_pos[c]]) == t.l2r_id
            seen.add(l2r)
            for k in range(length):
                want = reduce(compose, p[: k + 1]) if l2r else reduce(compose, p[k:])
                assert y[k] == want
    assert seen == {True, False}
    assert (r[:, y_pos.flatten()] == 1).all() and int(r.sum()) == 200 * t.chains * length
    R.validate(r, x, mask_id=t.mask_id)


def test_layout_shapes_vocab_and_render():
    t = Chain()
    assert (t.chains, t.length, t.degree, t.vocab_size, t.seq_len, t.mask_id) == (2, 6, 3, 8, 26, 8)
    x, r = t.batch(8, "test", seed=0)
    assert x.shape == r.shape == (8, 26) and x.dtype == r.dtype == torch.long
    assert x.min() >= 0 and x.max() < t.vocab_size
    p = torch.tensor([[[1, 2, 3], [0, 0, 5]]])
    tok, rk = Chain(chains=2, length=3).encode_chains(p, torch.tensor([[True, False]]))
    # S_3 ids: 0 id, 1 (0 2 1), 2 (1 0 2), 3 (1 2 0), 4 (2 0 1), 5 (2 1 0)
    # l2r: 1, 1∘2 = 4, 4∘3 = 0 ; r2l: 0∘0∘5 = 5, 0∘5 = 5, 5
    assert tok.tolist() == [[6, 1, 2, 3, 1, 4, 0, 7, 0, 0, 5, 5, 5, 5]]
    assert rk.tolist() == [[0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1]]
    assert Chain(chains=2, length=3).render(tok[0]) == "> 123 = 140 | < 005 = 555"
    masked = tok[0].clone()
    masked[4] = 8
    assert Chain(chains=2, length=3).render(masked).startswith("> 123 = ?40")


def test_directions_uniform_and_independent():
    t = Chain(chains=2, length=4)
    x, _ = t.batch(8000, "train", seed=0)
    l2r = t.directions(x).float()  # [B, 2]
    assert ((l2r.mean(0) - 0.5).abs() < 0.03).all()
    both = (l2r[:, 0] * l2r[:, 1]).mean()
    assert abs(float(both) - 0.25) < 0.03


def test_splits_disjoint_exhaustive_on_a_tiny_space():
    t = Chain(chains=1, length=2, degree=3)  # 2 * 6**2 = 72 prompts
    p = torch.tensor(list(itertools.product(range(6), repeat=2))).repeat(2, 1)[:, None, :]  # [72, 1, 2]
    l2r = torch.arange(72)[:, None] < 36
    tok, _ = t.encode_chains(p, l2r)
    prompt_pos = torch.cat([t.dir_pos, t.p_pos.flatten()])
    table = {tuple(row.tolist()): int(s) for row, s in zip(tok[:, prompt_pos], hash_split(tok[:, prompt_pos]))}
    assert len(table) == 72 and set(table.values()) == {0, 1, 2}
    seen = {}
    for k, split in enumerate(("train", "valid", "test")):
        x, _ = t.batch(2000, split, seed=1)
        prompts = {tuple(row.tolist()) for row in x[:, prompt_pos]}
        assert all(table[q] == k for q in prompts), split
        assert prompts == {q for q, s in table.items() if s == k}  # 2000 draws cover the split
        seen[split] = prompts
    assert not (seen["train"] & seen["valid"] or seen["train"] & seen["test"] or seen["valid"] & seen["test"])


def test_deterministic_per_split_and_seed():
    t = Chain()
    x1, _ = t.batch(64, "valid", seed=5)
    assert torch.equal(x1, Chain().batch(64, "valid", seed=5)[0])
    assert not torch.equal(x1, t.batch(64, "valid", seed=6)[0])
    assert not torch.equal(x1, t.batch(64, "test", seed=5)[0])


def test_oracle_ranks_follow_each_chain_and_run_chains_in_parallel():
    t = Chain(chains=3, length=5)
    x, r = t.batch(64, "test", seed=3)
    o = t.oracle_ranks(x)
    R.validate(o, x, mask_id=t.mask_id)
    assert torch.equal(o > 0, r > 0)  # ranks exactly the answers
    assert (R.num_sets(o) == t.length).all()
    for s in range(1, t.length + 1):
        assert ((o == s).sum(1) == t.chains).all()  # one answer per chain per step
    # every revealed answer is one composition from a neighbour revealed just before it
    l2r = t.directions(x)
    y_pos, p_pos = t.y_pos, t.p_pos
    for b in range(64):
        for c in range(t.chains):
            ranks_c = o[b, y_pos[c]].tolist()
            first = 0 if l2r[b, c] else t.length - 1
            assert ranks_c[first] == 1 and x[b, y_pos[c, first]] == x[b, p_pos[c, first]]  # y = p at the start
            for k in range(t.length):
                nb = k - 1 if l2r[b, c] else k + 1
                if 0 <= nb < t.length:
                    assert ranks_c[nb] == ranks_c[k] - 1
                    y_nb, p_k = x[b, y_pos[c, nb]], x[b, p_pos[c, k]]
                    want = t.mul[y_nb, p_k] if l2r[b, c] else t.mul[p_k, y_nb]
                    assert x[b, y_pos[c, k]] == want
    with pytest.raises(ValueError, match="direction"):
        t.oracle_ranks(torch.zeros(2, t.seq_len, dtype=torch.long))


def test_score_metrics_and_freqs():
    t = Chain(chains=2, length=3)
    x, r = t.batch(3, "train", seed=0)
    pred = x.clone()
    pred[1, t.y_pos[1, 2]] = (pred[1, t.y_pos[1, 2]] + 1) % 6  # one wrong answer
    pred[2, t.p_pos[0, 0]] = (pred[2, t.p_pos[0, 0]] + 1) % 6  # prompt: not scored
    m = t.metrics(pred, x, r)
    assert set(m) == {"exact_match", "token_accuracy"}
    assert m["exact_match"].tolist() == [1.0, 0.0, 1.0]
    assert torch.allclose(m["token_accuracy"], torch.tensor([1.0, 5 / 6, 1.0]))
    f = t.token_freqs()
    assert f.shape == (8,) and abs(float(f.sum()) - 1) < 1e-5
    assert torch.allclose(f[6] + f[7], torch.tensor(2 / 14), atol=1e-6)  # one direction token per 7
    assert (abs(f[:6] - 12 / 14 / 6) < 0.01).all()  # products of uniform elements are uniform


def test_registered_and_bad_arguments():
    t = build("task", {"name": "chain", "chains": 3, "length": 7})
    assert isinstance(t, Chain) and t.seq_len == 3 * 15
    for kw, key in [({"chains": 0}, "chains"), ({"length": 1}, "length"), ({"degree": 2}, "degree")]:
        with pytest.raises(ValueError, match=key):
            Chain(**kw)
    with pytest.raises(ValueError, match=r"\[B, 2, 6\]"):
        Chain().encode_chains(torch.zeros(1, 2, 5, dtype=torch.long), torch.zeros(1, 2, dtype=torch.bool))
