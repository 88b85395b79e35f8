import torch

from orderlab.kernels import set_attention, visible


def test_reference_matches_dense_softmax_and_zero_rows():
    g = torch.Generator().manual_seed(0)
    B, H, L, D = 2, 2, 6, 8
    q, k, v = (torch.randn(B, H, L, D, generator=g, requires_grad=True) for _ in range(3))
    q_rank = torch.tensor([[1, 2, 3, 4, 5, 0], [3, 3, 3, 3, 3, 3]])
    k_rank = torch.tensor([[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5]])
    o = set_attention(q, k, v, q_rank, k_rank)
    vis = visible(q_rank, k_rank)
    # hand computation with -inf masking on rows that have a visible key
    s = (q @ k.transpose(-1, -2)) / D**0.5
    s = s.masked_fill(~vis[:, None], float("-inf"))
    want = torch.softmax(s, -1) @ v
    has = vis.any(-1)  # [B, L]
    torch.testing.assert_close(o[has[:, None].expand(B, H, L)], want[has[:, None].expand(B, H, L)])
    assert (o[0, :, 5] == 0).all()  # q_rank 0 sees nothing
    o.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
    assert (q.grad[0, :, 5] == 0).all()


def test_groups_make_a_query_see_itself():
    q_rank = torch.tensor([[1, 1]])
    k_rank = torch.tensor([[0, 2**30]])
    q_group = torch.tensor([[-1, 7]])
    k_group = torch.tensor([[-1, 7]])
    vis = visible(q_rank, k_rank, q_group, k_group)
    assert vis.tolist() == [[[True, False], [True, True]]]
