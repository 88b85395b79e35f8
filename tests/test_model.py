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
