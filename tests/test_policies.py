import itertools
import math
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import orderlab
from orderlab import registry
from orderlab.policies import (
    All, Block, Composed, Confidence, EntropyBound, EvenSplit, Factor, First, Gumbel, KFromSchedule, Last, Margin, NegEntropy,
    PCScore, PlackettLuce, Policy, PolicyError, PositionPrior, StepView, Threshold, TopK, Window,
)

V = 10


def conf_probs(conf):
    """probs [B, L, V] whose confidence is `conf` [B, L] (the rest spread evenly; conf >= 1/V)."""
    c = torch.as_tensor(conf, dtype=torch.float64)
    p = ((1 - c) / (V - 1))[..., None].expand(*c.shape, V).clone()
    p[..., 0] = c
    return p


def view_of(conf, cand=None, masked=None, step=0, given=None):
    p = conf_probs(conf)
    m = torch.ones(p.shape[:2], dtype=torch.bool) if masked is None else torch.as_tensor(masked)
    c = m if cand is None else torch.as_tensor(cand)
    return StepView(p, c, m, step, given)


def select(count_or_policy, view):
    pol = count_or_policy if isinstance(count_or_policy, Policy) else All() >> count_or_policy
    return pol.select(view)


def decode_loop(policy, probs, masked, given=None, max_steps=1000):
    """The decoder's loop with fixed predictions: per step, the selected set."""
    policy.reset()
    masked = masked.clone()
    out = []
    for step in range(max_steps):
        if not masked.any():
            return out
        cand = policy.candidates(masked, step)
        sel = policy.select(StepView(probs, cand, masked, step, given))
        assert not (sel & ~cand).any()
        assert (sel.any(1) == cand.any(1)).all()
        masked &= ~sel
        out.append(sel)
    raise AssertionError("decode did not finish")


# ----------------------------------------------------------------------------- StepView


def test_stepview_validation_names_tensor_and_shape():
    p = torch.full((2, 3, 4), 0.25)
    m = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(PolicyError, match=r"probs must have shape \[B, L, V\].*\(2, 3\)"):
        StepView(p[..., 0], m, m, 0)
    with pytest.raises(PolicyError, match=r"candidates must have shape.*\(2, 3\).*\(2, 4\)"):
        StepView(p, torch.ones(2, 4, dtype=torch.bool), m, 0)
    with pytest.raises(PolicyError, match="masked must be a bool"):
        StepView(p, m, m.long(), 0)
    with pytest.raises(PolicyError, match="step must be an int"):
        StepView(p, m, m, -1)
    with pytest.raises(PolicyError, match=r"subset of masked.*\[1, 2\]"):
        m2 = m.clone()
        m2[1, 2] = False
        StepView(p, m, m2, 0)


def test_stepview_derived_quantities():
    p = torch.tensor([[[1.0, 0.0, 0.0], [0.5, 0.3, 0.2], [0.4, 0.4, 0.2]]])
    m = torch.ones(1, 3, dtype=torch.bool)
    v = StepView(p, m, m, 0)
    assert torch.allclose(v.confidence, torch.tensor([[1.0, 0.5, 0.4]]))
    assert torch.allclose(v.margin, torch.tensor([[1.0, 0.2, 0.0]]))
    h = -(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2))
    assert torch.isfinite(v.entropy).all()
    assert torch.allclose(v.entropy, torch.tensor([[0.0, h, -(0.8 * math.log(0.4) + 0.2 * math.log(0.2))]]))
    assert v.argmax.tolist() == [[0, 0, 0]]
    assert v.confidence is v.confidence  # cached


def test_stepview_takes_derived_fields_already_computed():
    """``derived``: the builder's values are the view's (not recomputed); a name that is not a
    derived field, or a wrong shape, is an error naming it."""
    p = torch.tensor([[[0.6, 0.4], [0.2, 0.8]]])
    m = torch.ones(1, 2, dtype=torch.bool)
    conf = p.amax(-1)
    v = StepView(p, m, m, 0, derived={"confidence": conf})
    assert v.confidence is conf and v.argmax.tolist() == [[0, 1]]  # the others derived as before
    with pytest.raises(PolicyError, match=r"derived: 'confidnce' is not a derived field; choose from \['argmax', "):
        StepView(p, m, m, 0, derived={"confidnce": conf})
    with pytest.raises(PolicyError, match=r"derived\['argmax'\] must have shape \[B, L\] = \(1, 2\), got \(2,\)"):
        StepView(p, m, m, 0, derived={"argmax": torch.zeros(2)})


def test_deterministic_policy_log_prob_raises():
    with pytest.raises(NotImplementedError, match="deterministic"):
        orderlab.build("policy", "top_prob").log_prob(torch.ones(1, 2, dtype=torch.bool), view_of([[0.5, 0.5]]))


# ----------------------------------------------------------------------------- count rules


def test_topk_ties_and_all_equal_go_to_lower_position():
    v = view_of([[0.5, 0.9, 0.9, 0.5, 0.9]])
    assert select(TopK(Confidence(), 2), v).tolist() == [[False, True, True, False, False]]
    v = view_of([[0.3] * 5], cand=[[False, True, True, True, True]])
    assert select(TopK(Confidence(), 3), v).tolist() == [[False, True, True, True, False]]
    assert select(TopK(Confidence(), 9), v).sum().item() == 4  # clamped to the candidates


def test_threshold_nothing_passes_is_exactly_top_one():
    v = view_of([[0.5, 0.7, 0.6, 0.7]])
    assert select(Threshold(Confidence(), 0.9), v).tolist() == [[False, True, False, False]]


def test_threshold_all_equal_confidences():
    v = view_of([[0.95] * 4])
    assert select(Threshold(Confidence(), 0.9), v).sum().item() == 4
    v = view_of([[0.5] * 4])
    assert select(Threshold(Confidence(), 0.9), v).tolist() == [[True, False, False, False]]


def test_threshold_batch_counts_differ_per_row():
    conf = [[0.95, 0.5, 0.91, 0.99], [0.2, 0.3, 0.5, 0.4], [0.99, 0.99, 0.99, 0.99], [0.9, 0.9, 0.9, 0.9]]
    cand = torch.tensor([[True] * 4, [True] * 4, [True] * 4, [False] * 4])
    sel = select(Threshold(Confidence(), 0.9), view_of(conf, cand=cand, masked=cand))
    assert sel.sum(1).tolist() == [3, 1, 4, 0]
    assert sel[0].tolist() == [True, False, True, True]
    assert sel[1].tolist() == [False, False, True, False]


def test_factor_rejects_failing_last_rank():
    # f = 1: rank 1: 2*0.1 = 0.2 < 1; rank 2: 3*0.2 = 0.6 < 1; rank 3 (last): 4*0.5 = 2 fails
    v = view_of([[0.5, 0.9, 0.8]])
    assert select(Factor(Confidence(), 1.0), v).tolist() == [[False, True, True]]
    # rank 1 is always accepted even when it fails
    v = view_of([[0.3, 0.2]])
    assert select(Factor(Confidence(), 1.0), v).tolist() == [[True, False]]
    # a failure stops the prefix even if a later rank would pass on its own: all pass -> all
    v = view_of([[0.99, 0.99, 0.99, 0.99]])
    assert select(Factor(Confidence(), 1.0), v).sum().item() == 4


def _entropy_probs(h_rows):
    """probs with exactly-known entropies: a 2-way split with p so that H = given value."""
    rows = []
    for hs in h_rows:
        row = []
        for h in hs:
            # binary entropy inverse by bisection
            lo, hi = 1e-12, 0.5
            for _ in range(100):
                mid = (lo + hi) / 2
                hm = -(mid * math.log(mid) + (1 - mid) * math.log(1 - mid))
                lo, hi = (mid, hi) if hm < h else (lo, mid)
            q = (lo + hi) / 2
            row.append([1 - q, q] + [0.0] * (V - 2))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float64)


def test_entropy_bound_gamma_zero_one_token_gamma_inf_all():
    p = _entropy_probs([[0.3, 0.1, 0.2, 0.5]])
    m = torch.ones(1, 4, dtype=torch.bool)
    v = StepView(p, m, m, 0)
    assert select(EntropyBound(NegEntropy(), 0.0), v).tolist() == [[False, True, False, False]]
    assert select(EntropyBound(NegEntropy(), math.inf), v).sum().item() == 4
    # sorted H: 0.1, 0.2, 0.3, 0.5 -> excess 0, 0.1, 0.3, 0.6
    assert select(EntropyBound(NegEntropy(), 0.15), v).tolist() == [[False, True, True, False]]
    assert select(EntropyBound(NegEntropy(), 0.35), v).sum().item() == 3


def test_entropy_bound_running_max_is_per_row_not_over_batch():
    # row 0 has a huge entropy; a max over the batch axis would let row 1 accept everything
    p = _entropy_probs([[0.6, 0.65], [0.1, 0.2]])
    m = torch.ones(2, 2, dtype=torch.bool)
    sel = select(EntropyBound(NegEntropy(), 0.15), StepView(p, m, m, 0))
    assert sel.tolist() == [[True, False], [True, True]]
    sel = select(EntropyBound(NegEntropy(), 0.05), StepView(p, m, m, 0))
    assert sel.tolist() == [[True, False], [True, False]]


def test_kfromschedule_counts_sum_to_n_over_steps():
    for n, steps in [(10, 4), (7, 7), (16, 5), (3, 8), (1, 1)]:
        probs = conf_probs(torch.rand(1, n) * 0.8 + 0.15)
        masked = torch.ones(1, n, dtype=torch.bool)
        for name in ["random", "top_prob", "margin", "entropy", "pc_sampler"]:
            sets = decode_loop(orderlab.build("policy", name, steps=steps), probs, masked)
            counts = [int(s.sum()) for s in sets]
            assert sum(counts) == n
            if n >= steps:  # exactly `steps` steps; fewer when K would round to 0
                assert len(counts) == steps, (name, n, steps, counts)
            else:
                assert len(counts) <= steps, (name, n, steps, counts)
    # the formula itself: K = round(n / (steps - step))
    v = view_of([[0.5] * 10])
    assert select(KFromSchedule(Confidence(), 4), v).sum().item() == round(10 / 4)
    v = view_of([[0.5] * 10], step=3)
    assert select(KFromSchedule(Confidence(), 4), v).sum().item() == 10


def llada_num_transfer_tokens(n0: int, steps: int) -> list[int]:
    """LLaDA's get_num_transfer_tokens written out (REFERENCES.md, Semi-AR): n0 // steps
    per step, the first n0 % steps steps one more."""
    return [n0 // steps + (i < n0 % steps) for i in range(steps)]


def test_even_split_reference_example_4_in_3_steps():
    probs = conf_probs(torch.tensor([[0.9, 0.8, 0.7, 0.6]]))
    masked = torch.ones(1, 4, dtype=torch.bool)
    for pol in [All() >> EvenSplit(Confidence(), 3), orderlab.build("policy", "semi_ar", block_size=4, steps=3),
                orderlab.build("policy", "pc_sampler", steps=3)]:
        assert [int(s.sum()) for s in decode_loop(pol, probs, masked)] == [2, 1, 1], pol
    # the MDM linear-schedule count keeps rounding the expected share n / steps_left
    assert [int(s.sum()) for s in decode_loop(All() >> KFromSchedule(Confidence(), 3), probs, masked)] == [1, 2, 1]
    assert repr(All() >> EvenSplit(Confidence(), 3)) == "All() >> EvenSplit(Confidence(), steps=3)"
    with pytest.raises(PolicyError, match="EvenSplit steps"):
        EvenSplit(steps=0)


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 40), st.integers(1, 12), st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_even_split_matches_llada_split(n0, steps, B, seed):
    """Counts sum to n0, are non-increasing, differ by at most one and equal LLaDA's
    precomputed split (its zero-token steps dropped), per row of a batch with different n0."""
    g = torch.Generator().manual_seed(seed)
    L = n0 + B
    masked = torch.zeros(B, L, dtype=torch.bool)
    n_rows = [max(1, n0 - b) for b in range(B)]
    for b, n in enumerate(n_rows):
        masked[b, torch.randperm(L, generator=g)[:n]] = True
    probs = conf_probs(torch.rand(B, L, generator=g) * 0.8 + 0.15)
    sets = decode_loop(All() >> EvenSplit(Confidence(), steps), probs, masked)
    for b, n in enumerate(n_rows):
        counts = [int(s[b].sum()) for s in sets]
        counts = [c for c in counts if c > 0]  # rows finish at different steps
        assert sum(counts) == n
        assert all(a >= c for a, c in zip(counts, counts[1:]))
        assert max(counts) - min(counts) <= 1
        assert counts == [c for c in llada_num_transfer_tokens(n, steps) if c > 0]


def test_semi_ar_even_split_restarts_in_every_block():
    """4 + 3 + 2 masked positions in blocks of 4, 3 steps per block: the LLaDA split of each
    block's own count (2,1,1 / 1,1,1 / 1,1), whatever step the block starts at."""
    pol = orderlab.build("policy", "semi_ar", block_size=4, steps=3)
    masked = torch.tensor([[1, 1, 1, 1, 0, 1, 1, 1, 1, 0, 0, 1]]).bool()
    probs = conf_probs(torch.rand(1, 12) * 0.8 + 0.15)
    sets = decode_loop(pol, probs, masked)
    counts = [int(s.sum()) for s in sets]
    blocks = [int(s[0].nonzero()[0]) // 4 for s in sets]
    assert counts == [2, 1, 1, 1, 1, 1, 1, 1] and blocks == [0, 0, 0, 1, 1, 1, 2, 2]
    # a block of 4 entered mid-decode (step 2) still splits 2, 1, 1
    masked = torch.tensor([[1, 1, 0, 0, 1, 1, 1, 1]]).bool()
    counts = [int(s.sum()) for s in decode_loop(pol, conf_probs(torch.rand(1, 8) * 0.8 + 0.15), masked)]
    assert counts == [1, 1, 2, 1, 1]


# ----------------------------------------------------------------------------- candidates


def test_candidate_rules():
    masked = torch.tensor([[0, 0, 1, 0, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1, 1, 1, 1], [0] * 10]).bool()
    w = Window(4)(masked, 0)
    assert w.long().tolist()[0] == [0, 0, 1, 0, 1, 1, 0, 0, 0, 0]
    assert w.long().tolist()[1] == [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    assert not w[2].any()
    b = Block(4)(masked, 0)
    assert b.long().tolist()[0] == [0, 0, 1, 0, 0, 0, 0, 0, 0, 0]
    assert b.long().tolist()[1] == [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    assert not b[2].any()
    m2 = masked.clone()
    m2[0, 2] = False  # first block done -> second block [4, 8)
    assert Block(4)(m2, 1).long().tolist()[0] == [0, 0, 0, 0, 1, 1, 1, 1, 0, 0]
    assert First(2)(masked, 0).long().tolist()[0] == [0, 0, 1, 0, 1, 0, 0, 0, 0, 0]
    assert Last(2)(masked, 0).long().tolist()[0] == [0, 0, 0, 0, 0, 0, 0, 1, 1, 0]


def test_sliding_window_preset():
    pol = orderlab.build("policy", "sliding_window", window=3, tau=0.9)
    masked = torch.tensor([[0, 1, 1, 1, 1, 1]]).bool()
    cand = pol.candidates(masked, 0)
    assert cand.long().tolist() == [[0, 1, 1, 1, 0, 0]]
    v = view_of([[0.99, 0.5, 0.95, 0.92, 0.99, 0.99]], cand=cand, masked=masked)
    assert pol.select(v).long().tolist() == [[0, 0, 1, 1, 0, 0]]
    v = view_of([[0.99, 0.5, 0.6, 0.7, 0.99, 0.99]], cand=cand, masked=masked)
    assert pol.select(v).long().tolist() == [[0, 0, 0, 1, 0, 0]]  # at least one


def test_semi_ar_blocks_and_steps_per_block():
    pol = orderlab.build("policy", "semi_ar", block_size=4, steps=2)
    masked = torch.ones(2, 12, dtype=torch.bool)
    masked[1, :5] = False  # row 1: prompt of 5, block 1 has 3 masked positions
    probs = conf_probs(torch.rand(2, 12) * 0.8 + 0.15)
    sets = decode_loop(pol, probs, masked)
    for s in sets:  # every set lies in one block, blocks go left to right
        for b in range(2):
            pos = s[b].nonzero().flatten()
            if len(pos):
                assert (pos // 4).unique().numel() == 1
    blocks0 = [int(s[0].nonzero()[0]) // 4 for s in sets if s[0].any()]
    assert blocks0 == [0, 0, 1, 1, 2, 2]  # 2 steps per block, 2 tokens each
    assert [int(s[0].sum()) for s in sets] == [2] * 6
    blocks1 = [int(s[1].nonzero()[0]) // 4 for s in sets if s[1].any()]
    assert blocks1 == [1, 1, 2, 2]
    # inside a block the most confident first
    pol = orderlab.build("policy", "semi_ar", block_size=4)
    v = view_of([[0.5, 0.6, 0.9, 0.7, 0.99, 0.99]])
    assert pol.select(StepView(v.probs, pol.candidates(v.masked, 0), v.masked, 0)).long().tolist() == [[0, 0, 1, 0, 0, 0]]


def test_l2r_r2l_orders():
    probs = conf_probs(torch.rand(1, 6) * 0.8 + 0.15)
    masked = torch.tensor([[0, 1, 1, 0, 1, 1]]).bool()
    order = [int(s[0].nonzero()) for s in decode_loop(orderlab.build("policy", "l2r"), probs, masked)]
    assert order == [1, 2, 4, 5]
    order = [int(s[0].nonzero()) for s in decode_loop(orderlab.build("policy", "r2l"), probs, masked)]
    assert order == [5, 4, 2, 1]


def test_pc_sampler_hand_computed_scores():
    p = torch.zeros(1, 5, 3, dtype=torch.float64)
    p[0, :, :] = torch.tensor([[0.2, 0.3, 0.5]] * 5)
    p[0, 2] = torch.tensor([0.6, 0.3, 0.1])
    p[0, 4] = torch.tensor([0.1, 0.1, 0.8])
    masked = torch.tensor([[0, 0, 1, 1, 1]]).bool()
    given = torch.tensor([[1, 1, 0, 0, 0]]).bool()
    freqs = torch.tensor([0.5, 0.3, 0.2])
    v = StepView(p, masked, masked, 0, given)
    lam, alpha = 0.25, 10.0
    s = PCScore(lam, alpha, freqs)(v)
    # position i: w = exp(-lam (i - 2)), C = min(-p log p_D(argmax), alpha)
    want = {2: 1.0 * (-0.6 * math.log(0.5)), 3: math.exp(-lam) * (-0.5 * math.log(0.2)),
            4: math.exp(-2 * lam) * (-0.8 * math.log(0.2))}
    for i, w in want.items():
        assert s[0, i].item() == pytest.approx(w, rel=1e-6)
    # alpha caps C
    assert PCScore(lam, 0.5, freqs)(v)[0, 4].item() == pytest.approx(math.exp(-2 * lam) * 0.5)
    pol = orderlab.build("policy", "pc_sampler", lam=lam, alpha=alpha, token_freqs=freqs.tolist())
    assert pol.select(v).long().tolist() == [[0, 0, 0, 0, 1]]  # 0.87 > 0.80 > 0.42
    with pytest.raises(PolicyError, match="V = 3"):
        PCScore(token_freqs=[0.5, 0.5])(v)


def test_score_algebra_and_repr():
    pol = Window(8) >> Threshold(Confidence(), 0.9)
    assert repr(pol) == "Window(8) >> Threshold(Confidence(), tau=0.9)"
    pol = Composed(Block(32), Confidence() + Gumbel(0.5), KFromSchedule(steps=8))
    assert repr(pol) == "Block(32) >> Confidence() + Gumbel(0.5, seed=0) >> KFromSchedule(steps=8)"
    assert repr(2.0 * Margin()) == "2.0 * Margin()"
    v = view_of([[0.3, 0.2, 0.9]])
    assert torch.allclose((Confidence() + 2.0 * PositionPrior("r2l"))(v), v.confidence + 2 * torch.arange(3.0))


def test_gumbel_noise_is_finite_and_reorders():
    v = view_of([[0.5, 0.6, 0.55, 0.4, 0.45]] * 64)
    g = Gumbel(0.5, seed=1)(v)
    assert torch.isfinite(g).all() and g.std() > 0.1
    tops = orderlab.build("policy", "top_prob", noise=0.5).select(v).long().argmax(1)
    assert tops.unique().numel() > 1  # the noise changes which position is first
    assert orderlab.build("policy", "top_prob").select(v).long().argmax(1).unique().tolist() == [1]


def test_nan_score_is_an_error():
    v = view_of([[0.5, 0.6]])
    nan = type("NanScore", (Confidence,), {"__call__": lambda self, view: view.confidence * float("nan")})()
    with pytest.raises(PolicyError, match="NaN"):
        Composed(All(), nan, TopK()).select(v)


# ----------------------------------------------------------------------------- every preset


class _LeftToRightProcess:
    """A stand-in Process: ranks in position order (the real ones come from orderlab.processes)."""

    def sample_ranks(self, ranks, generator=None, steps=None):
        gen = ranks > 0
        r = gen.long().cumsum(1)
        if steps is not None:  # quantise into `steps` groups
            r = (r - 1) * steps // gen.sum(1, keepdim=True).clamp_min(1) + 1
        return torch.where(gen, r, ranks)


def _presets():
    out = {}
    for name in registry.names("policy"):
        if name == "schedule":
            out[name] = orderlab.build("policy", name, process=_LeftToRightProcess())
        elif name == "lomdm":  # a reverse scheduler: positional (reads no tokens), powers at random
            out[name] = registry.build("policy", {"name": name, "scheduler": {"name": "positional", "power_init": [
                0.5 + i % 3 for i in range(16)]}}, context={"vocab_size": 5, "max_len": 16})
        elif name == "order_token_search":  # decodes itself (a beam of states per row): tests/test_order_search.py
            continue
        else:
            out[name] = orderlab.build("policy", name)
    out["semi_ar_steps"] = orderlab.build("policy", "semi_ar", block_size=3, steps=2)
    out["random_steps"] = orderlab.build("policy", "random", steps=3)
    out["eb_inf"] = orderlab.build("policy", "eb", gamma=math.inf, proxy=Margin())
    out["top_prob_noisy"] = orderlab.build("policy", "top_prob", noise=0.5, steps=4)
    return out


PRESETS = _presets()


@st.composite
def views(draw):
    B = draw(st.integers(1, 4))
    L = draw(st.integers(1, 9))
    Vv = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, L, Vv, generator=g) * draw(st.sampled_from([0.0, 1.0, 5.0]))
    if draw(st.booleans()):  # exact ties and zeros
        logits = logits.round()
    probs = torch.softmax(logits, -1)
    masked = torch.rand(B, L, generator=g) < draw(st.floats(0.0, 1.0))
    sub = torch.rand(B, L, generator=g) < draw(st.floats(0.2, 1.0))
    step = draw(st.integers(0, 6))
    return probs, masked, masked & sub, step


@settings(max_examples=60, deadline=None)
@given(views(), st.booleans())
def test_every_preset_selects_a_nonempty_subset_of_candidates(v, own_candidates):
    probs, masked, cand, step = v
    for name, pol in PRESETS.items():
        pol.reset()
        c = pol.candidates(masked, step) if own_candidates else cand
        sel = pol.select(StepView(probs, c, masked, step))
        assert sel.dtype == torch.bool and sel.shape == masked.shape, name
        assert not (sel & ~c).any(), name
        assert (sel.any(1) == c.any(1)).all(), name


def test_every_preset_finishes_a_batched_decode():
    probs = conf_probs(torch.rand(3, 11) * 0.85 + 0.12)
    masked = torch.rand(3, 11) < 0.7
    masked[1] = True
    masked[2] = False
    for name, pol in PRESETS.items():
        sets = decode_loop(pol, probs, masked)
        assert (torch.stack(sets).sum(0) == masked.long()).all(), name


# ----------------------------------------------------------------------------- registry


def test_build_by_name_and_errors():
    pol = orderlab.build("policy", "eb", gamma=0.1)
    assert isinstance(pol, Policy) and pol.count.gamma == 0.1
    pol = orderlab.build("policy", {"name": "sliding_window", "window": 4, "tau": 0.8})
    assert pol.rule.window == 4 and pol.count.tau == 0.8
    with pytest.raises(registry.ConfigError, match="did you mean 'gamma'"):
        orderlab.build("policy", "eb", gama=0.1)
    with pytest.raises(registry.ConfigError, match="did you mean 'threshold'"):
        orderlab.build("policy", "treshold")


def test_user_policy_by_target_and_by_register(tmp_path, monkeypatch):
    (tmp_path / "my_policies_mod.py").write_text(textwrap.dedent('''
        import torch
        from orderlab.policies import Policy, Composed, All, TopK, PositionPrior
        from orderlab.registry import register

        class LastFirst(Policy):
            def __init__(self, k: int = 1):
                self.k = k
            def select(self, view):
                r = view.candidates.long().flip(1).cumsum(1).flip(1)
                return view.candidates & (r <= self.k)

        @register("policy", "test_user_r2l")
        class Registered(Composed):
            def __init__(self, k: int = 1):
                super().__init__(All(), PositionPrior("r2l"), TopK(k=k))
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    pol = orderlab.build("policy", {"_target_": "my_policies_mod.LastFirst", "k": 2})
    v = view_of([[0.5] * 5])
    assert pol.select(v).long().tolist() == [[0, 0, 0, 1, 1]]
    with pytest.raises(registry.ConfigError, match="unknown key"):
        orderlab.build("policy", {"_target_": "my_policies_mod.LastFirst", "kk": 2})
    import my_policies_mod  # noqa: F401  registers "test_user_r2l"

    pol = orderlab.build("policy", "test_user_r2l", k=2)
    assert pol.select(v).long().tolist() == [[0, 0, 0, 1, 1]]
    sys.modules.pop("my_policies_mod", None)


# ----------------------------------------------------------------------------- log_prob


def _all_subsets(L):
    for bits in itertools.product([False, True], repeat=L):
        yield torch.tensor([bits])


@pytest.mark.parametrize("name,kw", [
    ("random", {}), ("random", {"steps": 2}), ("plackett_luce", {"steps": 2}), ("plackett_luce", {}),
    ("bernoulli", {}), ("plackett_luce", {"steps": 1, "temperature": 0.3}),
])
def test_log_prob_sums_to_one_over_all_subsets(name, kw):
    pol = orderlab.build("policy", name, **kw)
    probs = conf_probs(torch.tensor([[0.3, 0.9, 0.5, 0.7, 0.6]]))
    masked = torch.tensor([[True, True, False, True, True]])
    for step in (0, 1):
        v = StepView(probs, masked, masked, step)
        total = sum(math.exp(pol.log_prob(s, v).item()) for s in _all_subsets(5))
        assert total == pytest.approx(1.0, abs=1e-9), (name, kw, step)
        sel = pol.select(v)
        assert pol.log_prob(sel, v).item() > -math.inf
    # log_prob is per row
    probs2 = probs.expand(2, -1, -1)
    m2 = torch.cat([masked, torch.zeros_like(masked)])
    v2 = StepView(probs2, m2, m2, 0)
    lp = pol.log_prob(pol.select(v2), v2)
    assert lp.shape == (2,) and lp[1].item() == 0.0


def test_random_log_prob_value_and_empirical_frequencies():
    pol = orderlab.build("policy", "random", steps=2)
    m = torch.ones(1, 4, dtype=torch.bool)
    v = StepView(torch.full((1, 4, 3), 1 / 3), m, m, 0)
    sel = pol.select(v)
    assert sel.sum().item() == 2
    assert pol.log_prob(sel, v).item() == pytest.approx(-math.log(6))


def test_plackett_luce_ordered_probabilities_sum_to_one_and_match_sampling():
    logits = torch.tensor([[0.5, -1.0, 2.0, 0.0]], dtype=torch.float64)
    valid = torch.ones(1, 4, dtype=torch.bool)
    total = 0.0
    for perm in itertools.permutations(range(4), 2):
        rest = [i for i in range(4) if i not in perm]
        order = torch.tensor([list(perm) + rest])
        total += PlackettLuce.log_prob_order(logits, order, torch.tensor([2]), valid).exp().item()
    assert total == pytest.approx(1.0)
    # Gumbel top-k frequencies match the exact set probabilities
    g = torch.Generator().manual_seed(0)
    n = 4000
    orders = PlackettLuce.sample(logits.expand(n, -1), valid.expand(n, -1), g)
    top2 = torch.zeros(n, 4, dtype=torch.bool).scatter(1, orders[:, :2], True)
    sel = torch.tensor([[False, False, True, True]])
    freq = (top2 == sel).all(1).double().mean().item()
    exact = PlackettLuce.log_prob_set(logits, sel, valid).exp().item()
    assert freq == pytest.approx(exact, abs=0.03)


def test_stochastic_policies_are_reproducible_after_reset():
    probs = conf_probs(torch.rand(2, 8) * 0.8 + 0.15)
    masked = torch.ones(2, 8, dtype=torch.bool)
    for name in ["random", "plackett_luce", "bernoulli"]:
        pol = orderlab.build("policy", name, seed=3)
        a = decode_loop(pol, probs, masked)
        b = decode_loop(pol, probs, masked)  # decode_loop resets
        assert len(a) == len(b) and all((x == y).all() for x, y in zip(a, b)), name


# ----------------------------------------------------------------------------- schedule


def test_schedule_policy_follows_sampled_order_and_resets():
    pol = orderlab.build("policy", "schedule", process=_LeftToRightProcess())
    probs = conf_probs(torch.rand(1, 6) * 0.8 + 0.15)
    masked = torch.tensor([[0, 1, 1, 0, 1, 1]]).bool()
    order = [s[0].nonzero().flatten().tolist() for s in decode_loop(pol, probs, masked)]
    assert order == [[1], [2], [4], [5]]
    pol = orderlab.build("policy", "schedule", process=_LeftToRightProcess(), steps=2)
    order = [s[0].nonzero().flatten().tolist() for s in decode_loop(pol, probs, masked)]
    assert order == [[1, 2], [4, 5]]
    assert pol._ranks is not None
    pol.reset()
    assert pol._ranks is None


def test_schedule_policy_with_a_real_process():
    procs = pytest.importorskip("orderlab.processes")
    names = registry.names("process")
    if not names or not hasattr(procs, "base"):
        pytest.skip("no processes registered yet")
    name = next((n for n in ["linear", "cosine", "loglinear", "flat"] if n in names), names[0])
    try:
        pol = orderlab.build("policy", {"name": "schedule", "process": {"name": name}})
    except registry.ConfigError as e:
        pytest.skip(f"process {name!r} needs arguments: {e}")
    probs = conf_probs(torch.rand(2, 7) * 0.8 + 0.15)
    masked = torch.ones(2, 7, dtype=torch.bool)
    masked[0, :2] = False
    sets = decode_loop(pol, probs, masked)
    assert (torch.stack(sets).sum(0) == masked.long()).all()


def test_blocks_from_the_prompt_end_follow_each_rows_prompt():
    """LLaDA aligns its blocks to the end of the prompt: with ``from_prompt_end`` a row's blocks
    start at its first masked position at step 0, wherever its prompt ends."""
    from orderlab.policies.compose import Block
    masked = torch.tensor([[False, False, False, True, True, True, True, True],
                           [False, True, True, True, True, True, True, True]])
    absolute, relative = Block(3), Block(3, from_prompt_end=True)
    assert absolute(masked, 0).nonzero()[:, 1].tolist() == [3, 4, 5, 1, 2]
    assert relative(masked, 0).nonzero()[:, 1].tolist() == [3, 4, 5, 1, 2, 3]
    later = masked.clone()
    later[0, 3:6] = False  # row 0 finished its first block; row 1 not yet
    later[1, 1:3] = False
    assert relative(later, 1).nonzero()[:, 1].tolist() == [6, 7, 3]
    assert repr(relative) == "Block(3, from_prompt_end=True)"
