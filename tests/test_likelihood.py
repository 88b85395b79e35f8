"""The common likelihood: normalisation, AR identity, cache identity, rule masks."""

import itertools

import pytest
import torch

import orderlab

from orderlab.decoding import score_order
from orderlab.kernels import visible
from orderlab.likelihood import log_likelihood
from orderlab.ranks import NEVER, RanksError
from orderlab.rules import Stream, pack

RULES = ["set_causal", {"name": "block_causal", "block_size": 2}, "bidirectional",
         {"name": "set_causal", "prompt": "causal"}, {"name": "block_causal", "block_size": 2, "prompt": "causal"}]


# the architecture options of pretrained families (GQA, SwiGLU, q/k norm, biases, rotate-half
# RoPE, untied head, head_dim != d_model / n_heads, an in-vocabulary [MASK]); the last one
# adds shifted logits (Dream, AR checkpoints; not with block_causal)
FAMILY = dict(n_kv_heads=1, mlp="swiglu", mlp_hidden=24, qk_norm=True, qkv_bias=True, rope_layout="halves",
              norm_eps=1e-6, tie_embeddings=False, head_dim=6)
ARCHS = {"orderlab": {}, "family": FAMILY, "mask_in_vocab": {**FAMILY, "mask_id": 1}}


def arch(name, rule, vocab):
    """Transformer kwargs of ``ARCHS[name]`` for ``rule`` (the shift where the rule allows it);
    an in-vocabulary [MASK] takes one more class."""
    kw = dict(ARCHS[name])
    if "mask_id" in kw:
        vocab += 1
        kw["shift_logits"] = not (isinstance(rule, dict) and rule["name"] == "block_causal")
    return vocab, kw


def tiny(rule, vocab=3, length=8, seed=0, **kw):
    torch.manual_seed(seed)
    return orderlab.build("model", "transformer", vocab_size=vocab, max_len=length, attention=rule, d_model=16, n_layers=2, n_heads=2, **kw).eval()


def random_ranks(gen, length, rule, n_targets=3):
    """Random ranks with multi-token sets over the first ``n_targets`` non-given positions."""
    while True:
        r = torch.zeros(length, dtype=torch.long)
        r[-1] = -1  # one padding position
        targets = torch.randperm(length - 1, generator=gen)[:n_targets].sort().values
        sets = torch.randint(1, 3, (n_targets,), generator=gen)  # ties -> multi-token sets
        if isinstance(rule, dict) and "block_size" in rule:  # block-causal needs block-monotone ranks
            sets = (targets // rule["block_size"]) * 2 + sets
        r[targets] = sets
        if (sets[:, None] == sets[None, :]).sum() > n_targets:  # at least one set of size >= 2
            return r, targets


@pytest.mark.parametrize("rule", RULES, ids=str)
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("arch_name", list(ARCHS))
def test_normalisation_by_enumeration(rule, seed, arch_name):
    """Σ over all fillings of the targets of exp(log p(x | ranks)) is 1 (no leak of a target);
    with an in-vocabulary [MASK], fillings with it are in the sum and have probability 0."""
    gen = torch.Generator().manual_seed(seed)
    V, kw = arch(arch_name, rule, 3)
    L = 7
    model = tiny(rule, vocab=V, length=L, seed=seed, **kw)
    ranks, targets = random_ranks(gen, L, rule)
    base = torch.randint(0, V, (L,), generator=gen)
    fills = torch.tensor(list(itertools.product(range(V), repeat=len(targets))))  # [27, 3]
    x = base.repeat(len(fills), 1)
    x[:, targets] = fills
    with torch.no_grad():
        ll = log_likelihood(model, x, ranks.expand_as(x))
    assert ll.exp().sum().item() == pytest.approx(1.0, abs=1e-4)
    assert (ll < 0).all()
    if model.mask_id < model.vocab_size:
        assert (ll.exp()[(x[:, targets] == model.mask_id).any(1)] == 0).all()


@pytest.mark.parametrize("prompt_len", [0, 3])
def test_ar_identity_chain_of_causal_conditionals(prompt_len):
    """Ranks 1..L (after a causal prompt of ``prompt_len`` given tokens): one two-stream
    pass equals separate forwards, each seeing only x_<i, causal among itself."""
    V, L = 5, 6
    model = tiny({"name": "set_causal", "prompt": "causal"}, vocab=V, length=L)
    x = torch.randint(0, V, (2, L))
    ranks = (torch.arange(L) - prompt_len + 1).clamp_min(0).expand(2, L)
    with torch.no_grad():
        one_pass = log_likelihood(model, x, ranks)
        chain = torch.zeros(2)
        for i in range(prompt_len, L):
            # prefix x_<i, causal among itself (token j sees tokens <= j), and one query at i
            pos = torch.arange(L).expand(2, L)
            prefix = pos < i
            s = pack(
                (prefix, {"tokens": x, "pos": pos, "k_rank": pos, "q_rank": pos + 1}),
                (pos == i, {"tokens": model.mask_id, "pos": pos, "q_rank": i, "q_group": 0, "k_group": 0, "out": pos}),
            )
            logp = torch.log_softmax(model(s), -1)[:, -1]  # the query is last
            chain += logp.gather(1, x[:, i : i + 1])[:, 0]
    torch.testing.assert_close(one_pass, chain)


def _given_sees(prompt, pi, pj):
    """Clean given token at position pi sees clean given token at pj (the prompt rule)."""
    return True if prompt == "bidirectional" else pj <= pi


@pytest.mark.parametrize("prompt", ["bidirectional", "causal"])
def test_set_causal_mask_pattern(prompt):
    """Clean->clean causal in rank (inclusive; among given tokens as ``prompt`` says),
    query->clean strictly earlier, query->query itself."""
    model = tiny({"name": "set_causal", "prompt": prompt}, length=7)
    x = torch.tensor([[0, 1, 2, 1, 0, 2, 1]])
    ranks = torch.tensor([[0, 2, 0, 1, 2, 0, -1]])  # given tokens before, between and after
    (s,) = model.rule.passes(x, ranks, model.mask_id)
    vis = visible(s.q_rank, s.k_rank, s.q_group, s.k_group)[0]
    is_query = s.out[0] >= 0
    live = s.k_rank[0] != NEVER
    p = s.pos[0]
    r = ranks[0, p]  # rank of the position each stream token stands for
    assert sorted(p[~is_query & live].tolist()) == [0, 1, 2, 3, 4, 5] and sorted(p[is_query].tolist()) == [1, 3, 4]
    n = int((live | is_query).sum())
    for i in range(n):
        for j in range(n):
            if is_query[j]:
                want = i == j  # a query is seen only by itself
            elif is_query[i]:
                want = bool(r[j] < r[i])
            elif r[i] == 0 and r[j] == 0:
                want = _given_sees(prompt, int(p[i]), int(p[j]))
            else:
                want = bool(r[j] <= r[i])
            assert bool(vis[i, j]) == want, (i, j)
    # the streams are laid out in reveal order (near block-triangular mask for the kernel)
    assert r[~is_query & live].tolist() == sorted(r[~is_query & live].tolist())


@pytest.mark.parametrize("prompt", ["bidirectional", "causal"])
def test_block_causal_mask_pattern(prompt):
    """BD3-LM's mask written out: clean->clean block-causal (given tokens: seen by every
    generated token, among themselves as ``prompt`` says, never seeing a generated one),
    noisy->clean strictly earlier blocks and all given tokens, noisy->noisy same block."""
    bs = 2
    model = tiny({"name": "block_causal", "block_size": bs, "prompt": prompt}, length=8)
    x = torch.tensor([[0, 1, 2, 1, 0, 2, 1, 0]])
    ranks = torch.tensor([[0, 0, 1, 0, 2, 3, 0, 4]])
    s = model.rule.noisy_stream(x, x, ranks, ranks >= 1)
    vis = visible(s.q_rank, s.k_rank, s.q_group, s.k_group)[0]
    noisy = s.out[0] >= 0
    p = s.pos[0]
    r, blk = ranks[0, p], p // bs
    for i in range(len(p)):
        for j in range(len(p)):
            if noisy[j]:
                want = bool(noisy[i] and blk[i] == blk[j])
            elif r[j] == 0:  # a clean given key
                want = bool(noisy[i] or r[i] >= 1) or _given_sees(prompt, int(p[i]), int(p[j]))
            elif noisy[i]:
                want = bool(blk[j] < blk[i])
            else:
                want = bool(r[i] >= 1 and blk[j] <= blk[i])
            assert bool(vis[i, j]) == want, (i, j)


@pytest.mark.parametrize("rule", ["set_causal", "block_causal"])
def test_prompt_choice_is_a_different_model(rule):
    """The same weights give different likelihoods under the two prompt rules (the option
    reaches the attention), and a bad value is an error naming the key."""
    kw = {"block_size": 2} if rule == "block_causal" else {}
    a = tiny({"name": rule, **kw}, vocab=5, length=6)
    b = tiny({"name": rule, "prompt": "causal", **kw}, vocab=5, length=6)
    x = torch.randint(0, 5, (2, 6))
    ranks = torch.tensor([[0, 0, 0, 1, 2, 2], [0, 0, 0, 0, 1, 2]])
    with torch.no_grad():
        la, lb = log_likelihood(a, x, ranks), log_likelihood(b, x, ranks)
    assert (la - lb).abs().min() > 1e-4
    assert b.rule.spec()["prompt"] == "causal"
    with pytest.raises(ValueError, match="attention.prompt"):
        tiny({"name": rule, "prompt": "sideways", **kw})


@pytest.mark.parametrize("rule", ["set_causal", {"name": "block_causal", "block_size": 3}, "bidirectional",
                                  {"name": "set_causal", "prompt": "causal"},
                                  {"name": "block_causal", "block_size": 3, "prompt": "causal"}], ids=str)
@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize("arch_name", list(ARCHS))
def test_incremental_equals_one_pass(rule, cache, arch_name):
    """Step-by-step (KV cache appended after every set) equals the one-pass likelihood,
    for orderlab's model and for the pretrained families' options (the cache then holds
    the shared K/V heads of grouped-query attention)."""
    V, kw = arch(arch_name, rule, 5)
    model = tiny(rule, vocab=V, length=12, seed=3, **kw)
    x = torch.randint(0, 5, (4, 12))
    x[x == model.mask_id] = V - 1  # tokens, never the [MASK] (whose probability is 0)
    ranks = torch.tensor([
        [0, 0, 1, 2, 2, 3, 4, 4, 5, 6, -1, -1],
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],
        [0, 0, 0, 2, 1, 1, 3, 3, 4, 5, 5, 6],
        [1, 0, 2, 0, 3, 3, 4, 0, 5, 6, 0, -1],  # given tokens between generated ones
    ])
    with torch.no_grad():
        one_pass = log_likelihood(model, x, ranks)
        assert torch.isfinite(one_pass).all()
        torch.testing.assert_close(score_order(model, x, ranks, cache=cache), one_pass)


def test_padding_does_not_change_a_row():
    model = tiny("set_causal", vocab=5, length=8)
    x = torch.randint(0, 5, (1, 6))
    ranks = torch.tensor([[0, 2, 1, 3, 3, 4]])
    xp = torch.cat([x, torch.zeros(1, 2, dtype=torch.long)], 1)
    rp = torch.cat([ranks, torch.full((1, 2), -1)], 1)
    with torch.no_grad():
        torch.testing.assert_close(log_likelihood(model, x, ranks), log_likelihood(model, xp, rp))


def test_bad_inputs_name_the_problem():
    model = tiny({"name": "block_causal", "block_size": 2}, vocab=3, length=4)
    with pytest.raises(RanksError, match="block-monotone"):
        log_likelihood(model, torch.zeros(1, 4, dtype=torch.long), torch.tensor([[2, 1, 1, 0]]).flip(1))
    with pytest.raises(RanksError, match="vocab_size=3"):
        log_likelihood(model, torch.tensor([[0, 3, 0, 0]]), torch.tensor([[0, 1, 2, 2]]))
    with pytest.raises(RanksError, match="shape"):
        log_likelihood(model, torch.zeros(1, 4, dtype=torch.long), torch.zeros(4, dtype=torch.long))


def test_stream_padding_slots_are_invisible():
    s = pack((torch.tensor([[True, False], [True, True]]), {"tokens": 5}))
    assert s.tokens.tolist() == [[5, 0], [5, 5]]
    assert s.k_rank[0, 1] == NEVER and s.q_rank[0, 1] == 0 and s.q_group[0, 1] == -1
    assert isinstance(s, Stream)
