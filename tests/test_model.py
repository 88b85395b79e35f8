"""The transformer: stream order is irrelevant (RoPE at logical positions), config round trip."""

import pytest
import torch

import orderlab

from orderlab.model import Transformer
from orderlab.registry import ConfigError
from orderlab.builder import build


def test_stream_permutation_and_position_shift_invariance():
    torch.manual_seed(0)
    m = orderlab.build("model", "transformer", vocab_size=7, max_len=16, attention="set_causal", d_model=32, n_layers=2, n_heads=2).eval()
    x = torch.randint(0, 7, (2, 10))
    ranks = torch.tensor([[0, 0, 3, 1, 1, 2, 4, 4, 5, -1], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]])
    (s,) = m.rule.passes(x, ranks, m.mask_id)
    with torch.no_grad():
        ref = m(s)
        perm = torch.randperm(s.tokens.shape[1])
        shuffled = type(s)(**{k: getattr(s, k)[:, perm] for k in ("tokens", "pos", "q_rank", "k_rank", "q_group", "k_group", "out")})
        torch.testing.assert_close(m(shuffled), ref[:, perm], atol=1e-5, rtol=1e-5)
        shifted = type(s)(**{**s.__dict__, "pos": s.pos + 5})  # RoPE is relative
        torch.testing.assert_close(m(shifted), ref, atol=1e-4, rtol=1e-4)


def test_config_round_trip_and_errors():
    m = build("model", {"name": "transformer", "d_model": 32, "n_heads": 2, "n_layers": 1,
                        "attention": {"name": "block_causal", "block_size": 3}}, vocab_size=5, max_len=9)
    assert m.mask_id == 5 and m.vocab_size == 5 and m.rule.block_size == 3
    again = Transformer.from_config(m.config)
    again.load_state_dict(m.state_dict())
    assert again.rule == m.rule and again.config == m.config
    untied = orderlab.build("model", "transformer", vocab_size=5, max_len=9, d_model=32, n_heads=2, n_layers=1, tie_embeddings=False)
    assert untied.num_params() == orderlab.build("model", "transformer", vocab_size=5, max_len=9, d_model=32, n_heads=2, n_layers=1).num_params() + 5 * 32
    with pytest.raises(ConfigError, match="block_sze.*did you mean 'block_size'"):
        build("model", {"name": "transformer", "attention": {"name": "block_causal", "block_sze": 3}}, vocab_size=5, max_len=9)
    with pytest.raises(ConfigError, match="unknown attention 'set_casual'.*set_causal"):
        orderlab.build("model", "transformer", vocab_size=5, max_len=9, attention="set_casual")
    with pytest.raises(ConfigError, match="n_heads"):
        orderlab.build("model", "transformer", vocab_size=5, max_len=9, d_model=30, n_heads=4)


def test_training_stream_lets_the_kernel_skip_most_tiles():
    """The set-causal pass lays both streams out in reveal order with one group per query
    slot, so the Triton tile pre-pass proves about 3/4 of the tiles empty (L = 2048)."""
    from orderlab.kernels import tile_stats

    m = orderlab.build("model", "transformer", vocab_size=10, max_len=2048, attention="set_causal", d_model=32, n_layers=1, n_heads=2)
    L = 2048
    x = torch.randint(0, 10, (1, L))
    ranks = torch.randperm(L)[None] + 1  # a random order: positions are far from sorted
    (s,) = m.rule.passes(x, ranks, m.mask_id)
    stats = tile_stats(s.q_rank, s.k_rank, s.q_group, s.k_group)
    assert stats["skip_fraction"] > 0.7, stats


def test_public_names_are_not_shadowed_by_submodules():
    import importlib

    import orderlab

    for name in orderlab.__all__:
        importlib.import_module("orderlab.decoding")  # binds submodules on the package
        assert not isinstance(getattr(orderlab, name), type(orderlab)), f"orderlab.{name} is a module"


def test_rope_tables_match_the_angles_and_are_not_saved():
    """The cos/sin tables gathered by position equal the angles computed directly (the
    former per-forward computation), are not part of the checkpoint, and positions past
    max_len are an error rather than an out-of-range gather."""
    from orderlab.model import rope_angles

    m = orderlab.build("model", "transformer", vocab_size=7, max_len=16, attention="set_causal", d_model=32, n_layers=1, n_heads=2)
    assert not any("rope" in k for k in m.state_dict())
    pos = torch.tensor([[0, 5, 15, 3]])
    cos, sin = rope_angles(pos, 16, 10000.0)
    assert torch.equal(m.rope_cos[pos], cos) and torch.equal(m.rope_sin[pos], sin)
    (s,) = m.rule.passes(torch.zeros(1, 4, dtype=torch.long), torch.tensor([[0, 1, 2, 3]]), m.mask_id)
    s.pos = s.pos + 13
    with pytest.raises(ValueError, match="max_len=16"):
        m(s)


# ------------------------------------------------------------------ pretrained families' options


def _family(**kw):
    torch.manual_seed(0)
    args = dict(vocab_size=11, max_len=16, attention="bidirectional", d_model=24, n_layers=2, n_heads=4, mlp="swiglu",
                mlp_hidden=40, qk_norm=True, qkv_bias=True, rope_layout="halves", tie_embeddings=False)
    return orderlab.build("model", "transformer", **{**args, **kw}).eval()


def _stream(m, x):
    every = torch.ones_like(x, dtype=torch.bool)
    return m.rule.noisy_stream(x, every, every)


def test_grouped_query_attention_is_attention_with_shared_kv_heads():
    """n_kv_heads=2 of 4 equals full multi-head attention whose K/V heads 2g and 2g+1 are copies
    of head g (Ainslie et al. 2023), so the grouping maps query head h to K/V head h // 2."""
    gqa = _family(n_kv_heads=2)
    mha = _family(n_kv_heads=4)
    D, H, G = 6, 4, 2
    sd = gqa.state_dict()
    for i in range(2):
        for suffix in ("weight", "bias"):
            w = sd[f"blocks.{i}.attn.qkv.{suffix}"]
            q, k, v = w.split([H * D, G * D, G * D])
            rep = lambda t: t.view(G, D, *t.shape[1:]).repeat_interleave(H // G, 0).reshape(H * D, *t.shape[1:])  # noqa: E731
            sd[f"blocks.{i}.attn.qkv.{suffix}"] = torch.cat([q, rep(k), rep(v)])
    mha.load_state_dict(sd)
    x = torch.randint(0, 11, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(gqa(_stream(gqa, x)), mha(_stream(mha, x)))
    assert gqa.new_cache(3, 9).k[0].shape == (3, 2, 10, 6)  # the cache keeps the shared heads only


def test_rotate_half_layout_is_interleaved_rope_on_permuted_q_k_rows():
    """Hugging Face's rotate-half RoPE pairs dimension i with i + D/2; permuting each head's q/k
    rows (and q/k norm weights) into interleaved order gives the same model."""
    halves = _family(n_kv_heads=2)
    inter = _family(n_kv_heads=2, rope_layout="interleaved")
    D = 6
    perm = torch.stack([torch.arange(D // 2), torch.arange(D // 2) + D // 2], 1).flatten()  # [0, 3, 1, 4, 2, 5]
    sd = halves.state_dict()
    for i in range(2):
        for suffix in ("weight", "bias"):
            w = sd[f"blocks.{i}.attn.qkv.{suffix}"]
            q, k, v = w.split([4 * D, 2 * D, 2 * D])
            per_head = lambda t: t.view(-1, D, *t.shape[1:])[:, perm].reshape(t.shape)  # noqa: E731
            sd[f"blocks.{i}.attn.qkv.{suffix}"] = torch.cat([per_head(q), per_head(k), v])
        for n in ("q_norm", "k_norm"):
            sd[f"blocks.{i}.attn.{n}.weight"] = sd[f"blocks.{i}.attn.{n}.weight"][perm]
    inter.load_state_dict(sd)
    x = torch.randint(0, 11, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(halves(_stream(halves, x)), inter(_stream(inter, x)), atol=1e-5, rtol=1e-5)


def test_in_vocabulary_mask_is_never_predicted_and_shift_reads_the_left_neighbour():
    plain = _family(mask_id=7)
    shifted = _family(mask_id=7, shift_logits=True)
    shifted.load_state_dict(plain.state_dict())
    assert plain.embed.weight.shape[0] == 11 and plain.mask_id == 7  # no appended row
    x = torch.randint(0, 11, (2, 9))
    rank = torch.zeros_like(x)
    rank[1, :3] = -1  # left padding: row 1's first token sits at position 3
    x[:, 5] = 7
    s = plain.rule.noisy_stream(x, rank >= 0, rank >= 0)
    with torch.no_grad():
        a, b = plain(s), shifted(s)
    assert (a[..., 7] == torch.finfo(a.dtype).min).all() and torch.softmax(a, -1)[..., 7].max() == 0
    # row 0: stream slot n holds position n; row 1: slot n holds position n + 3
    torch.testing.assert_close(b[0, 1:], a[0, :-1])
    torch.testing.assert_close(b[0, 0], a[0, 0])  # position 0 has no left neighbour: its own
    torch.testing.assert_close(b[1, 1:6], a[1, :5])
    torch.testing.assert_close(b[1, 0], a[1, 0])  # the first token after padding: its own


def test_a_cast_model_keeps_float32_rope_tables():
    m = _family().to(torch.bfloat16)
    assert m.rope_cos.dtype == torch.float32 and m.embed.weight.dtype == torch.bfloat16
    torch.testing.assert_close(m.rope_cos, _family().rope_cos)
    with torch.device("meta"):
        meta = _family()
    real = meta.to_empty(device="cpu")
    torch.testing.assert_close(real.rope_sin, _family().rope_sin)
    x = torch.randint(0, 11, (1, 5))
    with torch.no_grad():
        assert m(_stream(m, x)).dtype == torch.bfloat16


@pytest.mark.parametrize("kw, key", [
    (dict(n_kv_heads=3), "n_kv_heads"), (dict(mlp="relu"), "mlp"), (dict(rope_layout="spiral"), "rope_layout"),
    (dict(mask_id=11), "mask_id"), (dict(shift_logits=True, attention="block_causal"), "shift_logits"),
    (dict(head_dim=5), "head_dim"),
])
def test_family_options_that_cannot_work_name_their_key(kw, key):
    with pytest.raises(ConfigError, match=f"^model.{key}:"):
        build("model", {"name": "transformer", "d_model": 24, "n_heads": 4, **kw}, vocab_size=11, max_len=8, path="model")


@pytest.mark.parametrize("kw", [{}, {"n_kv_heads": 2}, {"qk_norm": True, "n_kv_heads": 1}, {"rope_layout": "halves"}])
def test_attention_rotates_q_and_k_as_separate_calls_would(kw):
    """Attention rotates q and k in one RoPE call over a view of the qkv output: the outputs
    of rotating them one by one (q, k, v split, each viewed per head), bit for bit."""
    from orderlab.kernels import RankMask
    from orderlab.model import ROPE_LAYOUTS, rope_angles

    torch.manual_seed(0)
    model = Transformer(vocab_size=11, max_len=16, d_model=32, n_heads=4, n_layers=1, **kw)
    att = model.blocks[0].attn
    B, N, H, G, D = 2, 7, att.n_heads, att.n_kv, att.head_dim
    h, pos = torch.randn(B, N, 32), torch.randint(0, 16, (B, N))
    cos, sin = rope_angles(pos, D, 10000.0)
    rot = cos[:, None], sin[:, None]
    ranks = torch.arange(1, N + 1).expand(B, N)
    vis = RankMask(ranks, ranks, None, None)
    q, k, v = att.qkv(h).split([H * D, G * D, G * D], dim=-1)
    q, k, v = (t.view(B, N, n, D).transpose(1, 2) for t, n in ((q, H), (k, G), (v, G)))
    if att.q_norm is not None:
        q, k = att.q_norm(q), att.k_norm(k)
    rope = ROPE_LAYOUTS[kw.get("rope_layout", "interleaved")]
    want = att.proj(vis.attend(rope(q, *rot), rope(k, *rot), v).transpose(1, 2).reshape(B, N, H * D))
    assert torch.equal(att(h, vis, None, rot), want)
