"""LoMDM's reverse scheduler as a decode policy (policies/reverse_schedule.py, 'lomdm'):
hand-set schedulers give the orders their rates imply, the next position's law is the
jump chain's ŵ_i / Σ ŵ_j, the scheduler reads the decoder's noisy sequence, and a LoMDM
objective hands its own reverse scheduler to evaluation."""

import math

import pytest
import torch

import orderlab
import orderlab.builder  # noqa: F401  (fills the registry)
from orderlab.decoding import decode
from orderlab.objectives import LoMDMNelbo
from orderlab.policies import PolicyError, ReverseSchedule, StepView
from orderlab.processes import MixerScheduler
from orderlab.processes.scheduler import Scheduler
from orderlab.registry import ConfigError, build

V, L = 3, 6


def model():
    torch.manual_seed(0)
    return orderlab.build("model", "transformer", vocab_size=V, max_len=L, attention="bidirectional", d_model=16,
                          n_layers=1, n_heads=2).eval()


def policy(powers, **kw):
    spec = {"name": "lomdm", "scheduler": {"name": "positional", "power_init": powers}, **kw}
    return build("policy", spec, context={"vocab_size": V, "max_len": L})


def rows():
    x = torch.zeros(3, L, dtype=torch.long)
    r = torch.ones_like(x)
    r[1, 2] = 0  # a given position
    r[2, -1] = -1  # padding
    return x, r


@pytest.mark.parametrize("increasing", [True, False])
def test_hand_set_positional_rates_give_their_order(increasing):
    """w_i = softplus(ρ_i) increasing in i: the largest rate unmasks first, so right to left;
    decreasing: left to right (given and padding positions keep their ranks)."""
    w = [1.0 + i for i in range(L)]
    pol = policy(w if increasing else w[::-1])  # power_init: the powers w themselves
    x, r = rows()
    d = decode(model(), pol, x, r, cache=False)
    for b in range(3):
        gen = (r[b] >= 1).nonzero()[:, 0].tolist()
        order = sorted(gen, key=lambda i: int(d.ranks[b, i]))
        assert order == (gen[::-1] if increasing else gen)
        assert torch.equal(d.ranks[b][r[b] < 1], r[b][r[b] < 1])


def test_next_position_follows_the_jump_chain():
    """P(next = i) = ŵ_i / Σ_masked ŵ_j: log_prob by hand, and sampled draws (chi-square)."""
    w = torch.tensor([0.5, 1.0, 2.0, 4.0, 0.25, 3.0])
    pol = policy(w.tolist(), greedy=False, seed=1)
    n = 4000
    masked = torch.ones(n, L, dtype=torch.bool)
    masked[:, 1] = False  # position 1 revealed: not a candidate
    view = StepView(probs=torch.full((n, L, V), 1 / V), candidates=masked, masked=masked, step=0,
                    tokens=torch.where(masked, 3, torch.tensor(2)))
    p = torch.where(masked[0], w.double(), 0) / w[masked[0]].sum()
    for i in range(L):
        sel = torch.zeros(n, L, dtype=torch.bool)
        sel[:, i] = True
        lp = pol.log_prob(sel, view)[0]
        assert float(lp) == (pytest.approx(math.log(float(p[i])), abs=1e-6) if masked[0, i] else -math.inf)
    pol.reset()
    counts = pol.select(view).double().sum(0)
    keep = masked[0]
    chi2 = float(((counts[keep] - n * p[keep]) ** 2 / (n * p[keep])).sum())
    assert counts[~keep].sum() == 0 and chi2 < 4 + 6 * math.sqrt(8)


class _NeighbourRates(Scheduler):
    """Data-dependent hand-set rates: ŵ_i = 1 + 10·[position i − 1 is not [MASK]] (a masked
    position next to a known one unmasks first); records every z it reads."""

    def __init__(self):
        super().__init__()
        self.vocab_size, self.max_len = V, L
        self.seen: list[torch.Tensor] = []

    def forward(self, z):
        self.seen.append(z.clone())
        left = torch.cat([torch.full_like(z[:, :1], V), z[:, :-1]], 1)
        return 1.0 + 10.0 * (left != V).float()


def test_the_scheduler_reads_the_decoders_noisy_sequence():
    sched = _NeighbourRates()
    pol = ReverseSchedule(sched)
    x = torch.tensor([[2, 0, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0]])
    r = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 0, 1, 1]])
    d = decode(model(), pol, x, r, cache=False)
    assert d.ranks[0].tolist() == [0, 1, 2, 3, 4, 5]  # a chain from the given position 0
    assert d.ranks[1, 4:].tolist() == [1, 2]  # row 1: after the given position 3 first
    for k, z in enumerate(sched.seen):  # z at step k: the decoded tokens revealed so far, [MASK] = V elsewhere
        known = (d.ranks >= 0) & (d.ranks <= k)
        assert torch.equal(z, torch.where(known, d.tokens, V))
    with pytest.raises(PolicyError, match="StepView.tokens"):  # a data-dependent scheduler needs the sequence
        pol.select(StepView(probs=torch.full((1, L, V), 1 / V), candidates=torch.ones(1, L, dtype=torch.bool),
                            masked=torch.ones(1, L, dtype=torch.bool), step=0))


def test_lomdm_objective_decodes_with_its_own_reverse_scheduler():
    obj = build("objective", {"name": "lomdm_nelbo", "process": {"name": "learned_data", "scheduler": {"name": "mixer"}},
                              "reverse": {"name": "mixer", "width": 8}}, context={"vocab_size": V, "max_len": L})
    assert isinstance(obj, LoMDMNelbo) and isinstance(obj.policy, ReverseSchedule)
    assert obj.policy.scheduler is obj.reverse and isinstance(obj.reverse, MixerScheduler)  # trained weights, shared
    assert not any(k.startswith("policy") for k in obj.state_dict())  # saved once, as the reverse scheduler
    tied = build("objective", {"name": "lomdm_nelbo", "process": {"name": "learned_data", "scheduler": "positional"}},
                 context={"vocab_size": V, "max_len": L})
    assert tied.policy.scheduler is tied.process.scheduler  # reverse: null ties it to the forward one
    with pytest.raises(ConfigError, match="policy.kk"):
        build("policy", {"name": "lomdm", "scheduler": "positional", "kk": 1}, context={"vocab_size": V, "max_len": L})
