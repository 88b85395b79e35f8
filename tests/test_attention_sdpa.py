"""The SDPA backend (a boolean mask built once per forward) equals the reference, forward
and gradients, including rows with no visible key, ragged k_len and the cache's layout."""

import pytest
import torch

from orderlab.kernels import RankMask, set_attention, set_attention_reference, set_attention_sdpa, use_backend, visible_keys
from orderlab.ranks import NEVER


def _case(seed, B=2, H=3, Lq=7, Lk=11, D=8, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, D, generator=g, dtype=dtype, requires_grad=True) for n in (Lq, Lk, Lk))
    q_rank = torch.randint(0, 4, (B, Lq), generator=g)
    q_rank[0, 2] = 0  # rank 0 and no group: sees nothing (padding)
    k_rank = torch.randint(0, 5, (B, Lk), generator=g)
    k_rank[1, :3] = NEVER
    q_group = torch.randint(-1, 3, (B, Lq), generator=g)
    q_group[0, 2] = -1
    k_group = torch.randint(-1, 3, (B, Lk), generator=g)
    k_len = torch.tensor([Lk, 5])
    return q, k, v, q_rank, k_rank, q_group, k_group, k_len


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("ragged", [False, True])
def test_sdpa_equals_reference_forward_and_backward(seed, ragged):
    q, k, v, qr, kr, qg, kg, k_len = _case(seed)
    k_len = k_len if ragged else None
    assert not visible_keys(qr, kr, qg, kg, k_len)[0, 0, 2].any()  # the case has an empty row
    want = set_attention_reference(q, k, v, qr, kr, qg, kg, k_len=k_len)
    gw = torch.autograd.grad(want.square().sum(), (q, k, v))
    for got in (set_attention_sdpa(q, k, v, qr, kr, qg, kg, k_len=k_len),
                set_attention(q, k, v, qr, kr, qg, kg, k_len=k_len, backend="sdpa"),
                RankMask(qr, kr, qg, kg, k_len).attend(q, k, v)):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
        assert (got[0, :, 2] == 0).all()  # no visible key: zeros, not NaN
        gg = torch.autograd.grad(got.square().sum(), (q, k, v))
        for a, b in zip(gg, gw):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_rank_mask_follows_the_backend_choice():
    q, k, v, qr, kr, qg, kg, k_len = _case(0, dtype=torch.float32)
    vis = RankMask(qr, kr, qg, kg, k_len)
    with torch.no_grad():
        auto = vis.attend(q, k, v)  # CPU: SDPA, mask built once and kept
        assert vis._mask is not None
        with use_backend("reference"):
            ref = RankMask(qr, kr, qg, kg, k_len).attend(q, k, v)
    torch.testing.assert_close(auto, ref, atol=1e-6, rtol=1e-5)


def test_sdpa_mask_shape_is_checked():
    q, k, v, qr, kr, qg, kg, _ = _case(0)
    with pytest.raises(ValueError, match=r"mask must be Bool\[B, 1, Lq, Lk\]"):
        set_attention_sdpa(q, k, v, mask=torch.ones(2, 7, 11, dtype=torch.bool))


def test_split_skips_the_block_no_query_sees_and_changes_nothing():
    """The two-stream training layout ``[clean | queries]`` (set-causal passes, both streams
    in reveal order): clean queries never see the query stream, so RankMask splits at the
    clean stream's end and runs two SDPA calls; outputs and gradients equal the reference
    (float64), also with ragged rows (padding)."""
    from orderlab.rules import SetCausal

    g = torch.Generator().manual_seed(0)
    B, L, H, D = 3, 40, 2, 8
    ranks = torch.stack([torch.randperm(L, generator=g) + 1 for _ in range(B)])
    ranks[:, :4] = 0  # a prompt
    ranks[2, 30:] = -1  # padding: a shorter row
    x = torch.randint(0, 5, (B, L), generator=g)
    (s,) = SetCausal(prompt="causal").passes(x, ranks, mask_id=5)
    N = s.tokens.shape[1]
    q, k, v = (torch.randn(B, H, N, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    vis = RankMask(s.q_rank, s.k_rank, s.q_group, s.k_group)
    clean = int((s.k_rank < NEVER).sum(1).max())  # the clean stream's width: no clean query sees past it
    head, end = vis.split
    assert end <= clean and head * end + (N - head) * N <= 0.8 * N * N, (vis.split, clean, N)  # a quarter skipped
    got = vis.attend(q, k, v)
    want = set_attention_reference(q, k, v, s.q_rank, s.k_rank, s.q_group, s.k_group)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    for a, b in zip(torch.autograd.grad(got.square().sum(), (q, k, v)), torch.autograd.grad(want.square().sum(), (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("seed", range(4))
def test_split_of_random_masks_is_exact(seed):
    """Any mask: the split, when taken, leaves out only keys no query before it sees in any row."""
    g = torch.Generator().manual_seed(seed)
    B, H, Lq, Lk, D = 2, 2, 96, 80, 4
    q, k, v = (torch.randn(B, H, n, D, generator=g, dtype=torch.float64) for n in (Lq, Lk, Lk))
    q_rank = torch.sort(torch.randint(0, 60, (B, Lq), generator=g), 1).values  # rising: an early-ending head block
    k_rank = torch.randint(0, 60, (B, Lk), generator=g).sort(1).values
    vis = RankMask(q_rank, k_rank)
    want = set_attention_reference(q, k, v, q_rank, k_rank)
    torch.testing.assert_close(vis.attend(q, k, v), want, atol=1e-12, rtol=1e-10)
    s, e = vis.split  # rising ranks: these cases always split
    assert not vis.mask[:, :, :s, e:].any() and 0 < s < Lq
