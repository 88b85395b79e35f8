"""Orders as latent variables: variational inference with pyro (DESIGN.md sections 1, 6;
REFERENCES.md "VI over orders").

The generative model is a mixture over orders (DESIGN.md section 1)::

    p(x) = Σ_σ π_ψ(σ | x) p_θ(x | σ),   π_ψ(σ | x) = Π_k π_ψ(S_k | x_{S<k}),
    p_θ(x | σ) = Π_k Π_{i∈S_k} p_θ(x_i | x_{S<k})

where ``π_ψ`` is a :class:`~orderlab.policies.learned.LearnedPolicy` seeing what the decoder
shows it (a ``StepView`` of the denoiser's predictions given the revealed set), so the
policy trained here is the policy ``orderlab.decode`` runs. The guide
``q_φ(σ | x) = Π_k q_φ(S_k | x, S_<k)`` chooses the same kind of sets but also sees the true
tokens: the denoiser's probability of ``x_i`` at every candidate (:class:`OrderGuide`). The
evidence lower bound (Jordan et al. 1999; over orders: REFERENCES.md "VI over orders")::

    log p(x) >= ELBO = E_{σ~q}[log p_θ(x | σ) + log π_ψ(σ | x) − log q_φ(σ | x)]
              = log p(x) − KL(q_φ(· | x) || p(· | x))

is maximised in ψ and φ (and θ with ``train_model``) with pyro's ``TraceGraph_ELBO``: the
sets are discrete, so the gradient in φ is a score-function estimate (Williams 1992) whose
cost for ``S_k`` is only the terms downstream of it (provenance tracking, Schulman et al.
2015, "Gradient estimation using stochastic computation graphs"), per row (``pyro.plate``),
minus a learned baseline (:class:`StepBaseline`, pyro's ``nn_baseline``; Mnih & Gregor 2014).

One training step (:meth:`VIOrders.step`) traces the guide and the model replayed on its
sets and returns pyro's surrogate loss (``−surrogate ELBO + baseline loss``, per predicted
token), so the project's loop backpropagates it and steps the objective's parameters with its
own optimiser: the same update as ``pyro.infer.SVI.step`` (see :meth:`VIOrders.svi` for
that path). ``JitTraceGraph_ELBO`` does not apply: the per-step streams have data-dependent
shapes (rows reveal sets of different sizes), which ``torch.jit.trace`` cannot follow.

The pyro programs, ``S_k`` and the tokens per step (``B`` rows in ``pyro.plate("rows")``)::

    model:  S_k ~ π_ψ(· | view_k)           (set_k, masked to rows with candidates left)
            x_{S_k} ~ Categorical(p_θ)       (tokens_k, observed, masked to S_k)
    guide:  S_k ~ q_φ(· | view_k, x)         (set_k)

for ``k = 0 .. T−1``, ``T`` the most positions any row generates (a fixed number of sites,
so every trace has the same structure); a row that is done gets an empty candidate set,
whose set distribution is the empty set with probability 1.

For the importance-weighted bound (objectives/iwae.py), :meth:`VIOrders.prior` and
:meth:`VIOrders.proposal` give ``π_ψ`` and ``q_φ`` as order distributions
(``sample(x, ranks, generator)``, ``log_prob(x, order)``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import pyro
import pyro.distributions as pdist
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.distributions import constraints
from pyro.infer import SVI, TraceGraph_ELBO
from pyro.ops.provenance import detach_provenance, get_provenance, track_provenance
from torch import Tensor, nn

from orderlab.policies.base import Policy, PolicyError, StepView
from orderlab.policies.compose import Count
from orderlab.policies.learned import Features, LearnedBernoulli, LearnedPolicy, MLPNet, PolicyNet
from orderlab.policies.sets import SetDistribution
from orderlab.ranks import dense, validate
from orderlab.registry import ConfigError, register
from orderlab.rules import UNKNOWN

from .base import Objective, StepOutput

__all__ = ["SetSite", "OrderGuide", "StepBaseline", "VIOrders", "ProgramOrders", "TRUTH_FEATURES"]

TRUTH_FEATURES = ("truth_prob", "truth_log_prob")  # the guide's features beyond the policy's


# ----------------------------------------------------------------------------- pyro glue


class SetSite(pdist.TorchDistribution):
    """A :class:`~orderlab.policies.sets.SetDistribution` as a pyro distribution over
    ``Bool[B, L]`` sets: batch ``[B]``, event ``[L]``; exact ``sample`` (with the given
    generator), ``log_prob`` and ``entropy``. Not reparameterisable, so TraceGraph_ELBO
    uses its score function. ``provenance``: the earlier sites its parameters depend on
    (pyro's provenance tracking; see :class:`_Walk`), added to ``log_prob``'s."""

    arg_constraints: dict = {}
    support = constraints.independent(constraints.boolean, 1)
    has_rsample = False

    def __init__(self, dist: SetDistribution, generator: torch.Generator | None = None, provenance: frozenset = frozenset()):
        self.dist, self.generator, self.provenance = dist, generator, provenance
        B, L = dist.logits.shape
        super().__init__(torch.Size([B]), torch.Size([L]), validate_args=False)

    def expand(self, batch_shape, _instance=None):
        if tuple(batch_shape) != tuple(self.batch_shape):  # a plate of another size: a bug upstream
            raise ValueError(f"SetSite has batch shape {tuple(self.batch_shape)}; cannot expand to {tuple(batch_shape)}")
        return self

    def sample(self, sample_shape=torch.Size()) -> Tensor:
        if sample_shape:
            raise ValueError("SetSite draws one set per row (sample_shape must be empty)")
        return self.dist.sample(self.generator)

    def log_prob(self, value: Tensor) -> Tensor:
        lp = self.dist.log_prob(detach_provenance(value).bool())
        return track_provenance(lp, self.provenance | get_provenance(value))

    def entropy(self) -> Tensor:
        return self.dist.entropy()


@dataclass
class _Walk:
    """The state of one pass through the steps: the true tokens and the revealed set.

    ``rank``: 0 given, ``k`` revealed at step ``k`` (1-based), −1 padding, ``UNKNOWN``
    masked (the decoder's state); ``cur``: ``x`` where known, ``[MASK]`` elsewhere.

    ``provenance``: the set sites revealed so far. TraceGraph_ELBO finds the costs that
    depend on a set through pyro's provenance tracking, which follows a sampled value
    through every torch op (a ``__torch_function__`` per op: most of a step's time when it
    runs through the denoiser). The state is a function of all earlier sets and every later
    distribution a function of the state, so the walk keeps the state plain and attaches
    its provenance once, to each site's distribution: the same dependencies, exactly.
    """

    x: Tensor  # Long[B, L]
    rank: Tensor  # Long[B, L]
    cur: Tensor  # Long[B, L]
    todo: Tensor  # Long[B]: positions each row generates
    provenance: frozenset = frozenset()

    @classmethod
    def start(cls, x: Tensor, ranks: Tensor, mask_id: int) -> "_Walk":
        gen = ranks >= 1
        return cls(x, torch.where(gen, UNKNOWN, ranks), torch.where(gen, mask_id, x), gen.sum(1))

    def track(self, t: Tensor) -> Tensor:
        """``t`` marked as depending on every set revealed so far."""
        return track_provenance(t, self.provenance)

    @property
    def steps(self) -> int:
        """The most steps any row can take (one position per step)."""
        return int(self.todo.max()) if self.todo.numel() else 0

    def reveal(self, selected: Tensor, k: int) -> "_Walk":
        sel = detach_provenance(selected)
        return _Walk(self.x, torch.where(sel, k + 1, self.rank), torch.where(sel, self.x, self.cur), self.todo,
                     self.provenance | get_provenance(selected))


def _sets(order: Tensor, steps: int) -> list[Tensor]:
    """``Bool[B, L]`` per step ``0 .. steps−1``: the sets of ``order`` (empty past a row's last)."""
    d = dense(order)
    return [d == k + 1 for k in range(steps)]


# ----------------------------------------------------------------------------- guide and baseline


class OrderGuide(nn.Module):
    """``q_φ(S_k | x, S_<k)``: the policy's set family over logits from a net that reads the
    policy's features plus two features of the true tokens at the candidates,
    ``p_θ(x_i | x_{S<k})`` and ``max(log p_θ(x_i | x_{S<k}), −10) / 10`` (0 elsewhere).

    ``net``: a ``policy_net`` over ``in_features(policy)`` features (default an MLP). The
    output layer starts at zero weights like the policy's, so ``q`` starts as a
    state-independent set distribution.
    """

    def __init__(self, net: PolicyNet):
        super().__init__()
        if not isinstance(net, PolicyNet):
            raise ConfigError("guide", f"must be a policy_net, got {type(net).__name__}")
        self.net = net

    @staticmethod
    def in_features(policy: Policy | None) -> int:
        """The width of the guide net's input: the policy's features (the default ones for
        a policy that has none: the objective then rejects it) and the truth's."""
        features = policy.features if isinstance(policy, LearnedPolicy) else Features(None)
        return features.size + len(TRUTH_FEATURES)

    @staticmethod
    def truth(logp: Tensor, x: Tensor, candidates: Tensor) -> Tensor:
        """Float[B, L, 2]: the features of the true tokens (0 off the candidates)."""
        lp = logp.gather(-1, x[..., None])[..., 0]  # [B, L] log p(x_i | revealed)
        zero = torch.zeros((), device=lp.device)
        f = torch.stack([lp.exp(), lp.clamp_min(-10.0) / 10.0], dim=-1)  # [B, L, 2]
        return torch.where(candidates[..., None], f, zero)

    def forward(self, policy_features: Tensor, truth: Tensor, keep: Tensor) -> Tensor:
        """Float[B, L]: the guide's logits."""
        return self.net(torch.cat([policy_features, truth], dim=-1), keep)


class StepBaseline(nn.Module):
    """A learned baseline ``b(state_k) ≈ E[downstream cost | S_<k]`` per row (pyro's
    ``nn_baseline``; Mnih & Gregor 2014). The downstream cost of step ``k`` is a sum over the
    positions still masked, so the baseline is their number times a per-position value
    from an MLP (``hidden`` units) over four numbers per row: the fraction revealed, the
    step over the positions to generate, the fraction of candidates, and the mean of
    ``max(log p_θ(x_i | x_{S<k}), −10)`` over the candidates. Its loss (``(cost − b)²``,
    pyro's) trains it with the rest."""

    inputs = 4

    def __init__(self, hidden: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(self.inputs, hidden), nn.GELU(), nn.Linear(hidden, 1))

    @classmethod
    def features(cls, walk: _Walk, view: StepView, truth: Tensor) -> Tensor:
        """Float[B, 5]: the four inputs and the number of masked positions (detached by
        pyro before the net sees it)."""
        n = walk.todo.clamp_min(1).float()
        left = view.masked.sum(1).float()
        cand = view.candidates.sum(1).float()
        lp = (truth[..., 1] * 10.0).sum(1) / cand.clamp_min(1)  # mean clamped log p over the candidates
        return torch.stack([1 - left / n, torch.full_like(n, view.step) / n, cand / n, lp, left], dim=-1)

    def forward(self, features: Tensor) -> Tensor:
        return features[:, -1] * self.net(features[:, :-1])[..., 0]  # [B]


# ----------------------------------------------------------------------------- the objective


@register("objective", "vi_orders")
class VIOrders(Objective):
    """Variational order learning (module docstring): ``step`` returns pyro's TraceGraph
    surrogate loss of the ELBO over orders, per predicted token.

    ``policy``: the prior ``π_ψ``, a learned policy (``learned``, ``learned_plackett_luce``
    with an integer ``k`` or a count rule that has its own score); exposed as ``.policy``,
    the policy the decoder runs. ``guide``: the ``policy_net`` of ``q_φ``
    (:class:`OrderGuide`). ``baseline``: hidden width of the learned baseline, ``null`` for
    none. ``entropy``: weight of a bonus on the exact per-step entropies of ``π`` and ``q``
    along the sampled walk (against both locking onto one order early). ``train_model``:
    also train the denoiser ``θ`` on the ELBO (the guide's features of ``θ`` are treated as
    inputs: no gradient flows into ``θ`` through ``q``).

    In YAML::

        objective:
          name: vi_orders
          policy: {name: learned, net: mlp}     # π_ψ: what evaluation decodes with
          guide: {name: mlp, hidden: 64}        # q_φ's policy_net
          baseline: 32
          entropy: 0.0
          train_model: false

    Metrics: ``bits_per_token`` = ``−ELBO`` per predicted token in bits (label
    ``"elbo (bound)"``: an upper bound on the NLL), ``elbo`` (nats per row), ``kl`` (the
    sampled ``log q − log π`` per row, nats), ``nll_order`` (``−log p_θ(x | σ)`` per row),
    ``entropy`` / ``guide_entropy`` (mean per-step entropies of ``π`` / ``q``), ``steps``
    (sets per row).
    """

    trains_model = False
    label = "elbo (bound)"

    # a guide given as a spec reads the policy's features and the truth's
    provides = {"in_features": lambda args: OrderGuide.in_features(args["policy"])}

    def __init__(self, policy: Policy | None = None, guide: PolicyNet | None = None, baseline: int | None = 32,
                 entropy: float = 0.0, train_model: bool = False):
        super().__init__(process=None)
        self.policy = LearnedBernoulli() if policy is None else policy
        if not isinstance(self.policy, LearnedPolicy):
            raise ConfigError("policy", f"vi_orders needs a learned policy (learned, learned_plackett_luce), "
                              f"got {type(self.policy).__name__}")
        k = getattr(self.policy, "k", None)
        if isinstance(k, Count) and k.score is None:  # the set size would depend on whose logits rank the candidates
            raise ConfigError("policy.k", "a count rule for vi_orders needs its own score (e.g. "
                              "Threshold(Confidence(), 0.9)), so that π and q share the set size")
        self.guide = OrderGuide(MLPNet(OrderGuide.in_features(self.policy)) if guide is None else guide)
        if baseline is not None and int(baseline) < 1:
            raise ConfigError("baseline", f"must be a hidden width >= 1 or null, got {baseline}")
        self.baseline = None if baseline is None else StepBaseline(int(baseline))
        if float(entropy) < 0:
            raise ConfigError("entropy", f"must be >= 0, got {entropy}")
        self.entropy = float(entropy)
        self.trains_model = bool(train_model)
        self.elbo = TraceGraph_ELBO(max_plate_nesting=1)
        self._memo: dict[int, tuple] | None = None  # step -> (rank, log-probs, hidden), see _sharing

    # -- the denoiser's predictions at one step
    def _view(self, model, walk: _Walk, k: int) -> tuple[StepView, Tensor]:
        """The decoder's ``StepView`` at step ``k`` (candidates as ``decode`` picks them) and
        ``log p_θ(· | x_{S<k})`` Float[B, L, V] (uniform off the candidates)."""
        masked = walk.rank == UNKNOWN
        allowed = model.rule.candidates(masked, walk.rank)
        cand = allowed & self.policy.candidates(masked, k)
        cand = torch.where(cand.any(1, keepdim=True), cand, allowed)
        memo = None if self._memo is None else self._memo.get(k)
        if memo is not None and torch.equal(memo[0], walk.rank):
            logp, hidden = memo[1], memo[2]
        else:
            with torch.set_grad_enabled(self.trains_model and torch.is_grad_enabled()):
                logp, hidden = self._log_probs(model, walk, cand, k, self.policy.wants_hidden)
            if self._memo is not None:
                self._memo[k] = (walk.rank, logp, hidden)
        view = StepView(probs=logp.exp(), candidates=cand, masked=masked, step=k, given=walk.rank == 0, hidden=hidden)
        return view, logp

    @staticmethod
    def _log_probs(model, walk: _Walk, cand: Tensor, k: int, hidden: bool = False) -> tuple[Tensor, Tensor | None]:
        """``(log p_θ Float[B, L, V], hidden Float[B, L, C] | None)``: the step's predictions
        and, for a policy that reads them (``wants_hidden``), the denoiser's final normalised
        hidden state at each candidate's query (0 elsewhere, detached), as ``decode`` gives them."""
        B, L = walk.x.shape
        V = model.vocab_size
        out = torch.full((B, L, V), -math.log(V), device=walk.x.device)
        states = torch.zeros(B, L, model.config.d_model, device=walk.x.device) if hidden else None
        rows = cand.any(1).nonzero()[:, 0]  # only rows with candidates cost a forward (as in decode)
        if rows.numel() == 0:
            return out, states
        s = model.rule.step(walk.cur[rows], walk.rank[rows], cand[rows], k, False)
        logits, h = model(s, return_hidden=True) if hidden else (model(s), None)
        lp = F.log_softmax(logits.float(), dim=-1)  # [b, N, V]
        idx = torch.where(s.out >= 0, s.out, L)[..., None]  # [b, N, 1] slot L: queries that predict nothing
        pred = torch.full((len(rows), L + 1, V), -math.log(V), device=lp.device).scatter(1, idx.expand_as(lp), lp)[:, :L]
        if h is not None:  # [b, N, C] -> [b, L, C] at the queries' positions
            C = h.shape[-1]
            placed = torch.zeros(len(rows), L + 1, C, device=h.device).scatter(1, idx.expand(-1, -1, C), h.detach().float())
            states = states.to(h.device).index_copy(0, rows, placed[:, :L])
        return out.index_copy(0, rows, pred), states

    @contextlib.contextmanager
    def _sharing(self) -> Iterator[None]:
        """Inside the block the model reuses the guide's predictions of the same step and
        state (the model replays the guide's sets: one denoiser forward per step, not two)."""
        self._memo = {}
        try:
            yield
        finally:
            self._memo = None

    # -- the pyro programs
    def pyro_model(self, model, x: Tensor, ranks: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``S_k ~ π_ψ``, ``x_{S_k} ~ p_θ`` (observed); returns the order Long[B, L]."""
        walk = _Walk.start(x, ranks, model.mask_id)
        with pyro.plate("rows", x.shape[0], dim=-1):
            for k in range(walk.steps):
                view, logp = self._view(model, walk, k)
                with poutine.mask(mask=view.candidates.any(1)):
                    sel = pyro.sample(f"set_{k}", SetSite(self.policy.step_distribution(view), generator, walk.provenance))
                pyro.sample(f"tokens_{k}", pdist.Categorical(logits=walk.track(logp)).mask(sel).to_event(1), obs=x)
                walk = walk.reveal(sel, k)
        return walk.rank

    def pyro_guide(self, model, x: Tensor, ranks: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``S_k ~ q_φ(· | x, S_<k)``; returns the order Long[B, L]."""
        walk = _Walk.start(x, ranks, model.mask_id)
        with pyro.plate("rows", x.shape[0], dim=-1):
            for k in range(walk.steps):
                view, logp = self._view(model, walk, k)
                feats, keep = self.policy.step_features(view)
                truth = OrderGuide.truth(logp.detach(), x, view.candidates)
                logits = self.guide(feats, truth, keep)
                dist = self.policy.distribution(logits, view.candidates, self.policy.set_size(view, logits))
                infer = {}
                if self.baseline is not None:
                    infer = {"baseline": {"nn_baseline": self.baseline,
                                          "nn_baseline_input": StepBaseline.features(walk, view, truth)}}
                with poutine.mask(mask=view.candidates.any(1)):
                    sel = pyro.sample(f"set_{k}", SetSite(dist, generator, walk.provenance), infer=infer)
                walk = walk.reveal(sel, k)
        return walk.rank

    # -- one training step for the project's loop
    def _check(self, model, tokens: Tensor, ranks: Tensor) -> Tensor:
        validate(ranks, tokens)
        if tokens.dim() != 2:
            raise ValueError(f"vi_orders: tokens must be Long[B, L], got shape {tuple(tokens.shape)}")
        bad = (ranks >= 0) & ((tokens < 0) | (tokens >= model.vocab_size))
        if bad.any():
            b, i = (int(v) for v in bad.nonzero()[0])
            raise ValueError(f"vi_orders: tokens[{b}, {i}] = {int(tokens[b, i])} is not a token of the model "
                             f"(vocab_size={model.vocab_size})")
        return torch.where(ranks >= 0, tokens, torch.zeros_like(tokens))  # padding: any valid class

    def traces(self, model, tokens: Tensor, ranks: Tensor, generator: torch.Generator | None = None):
        """``(model_trace, guide_trace)`` of one draw, log-probabilities computed (pyro's
        TraceGraph_ELBO trace pair: the guide, then the model replayed on its sets)."""
        x = self._check(model, tokens, ranks)
        with self._sharing():
            return self.elbo._get_trace(self.pyro_model, self.pyro_guide, (model, x, ranks), {"generator": generator})

    @torch.no_grad()
    def sample_elbo(self, model, tokens: Tensor, ranks: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Float64[B]: one draw per row of ``log p_θ(x | σ) + log π(σ) − log q(σ)``, σ ~ q
        (nats; its mean over draws is the row's ELBO)."""
        p = _parts(*self.traces(model, tokens, ranks, generator))
        return p["log_p"] + p["log_pi"] - p["log_q"]

    def step(self, model, tokens: Tensor, ranks: Tensor, generator: torch.Generator | None = None) -> StepOutput:
        model_trace, guide_trace = self.traces(model, tokens, ranks, generator)
        # pyro's surrogate: its gradient is the TraceGraph estimate of −∇ELBO (plus the baselines' loss)
        _, surrogate = self.elbo._loss_and_surrogate_loss_particle(model_trace, guide_trace)
        n_tok = float((ranks >= 1).sum())
        parts = _parts(model_trace, guide_trace)
        ent_pi, ent_q = _step_entropies(model_trace, grad=self.entropy > 0), _step_entropies(guide_trace, grad=self.entropy > 0)
        loss = surrogate / max(n_tok, 1.0)
        if self.entropy:
            loss = loss - self.entropy * (ent_pi.sum() + ent_q.sum()) / max(n_tok, 1.0)
        row_elbo = parts["log_p"] + parts["log_pi"] - parts["log_q"]
        metrics = {
            "loss": float(loss.detach()),
            "bits_per_token": float(-row_elbo.sum()) / max(n_tok, 1.0) / math.log(2),
            "elbo": float(row_elbo.mean()),
            "kl": float((parts["log_q"] - parts["log_pi"]).mean()),
            "nll_order": float(-parts["log_p"].mean()),
            "entropy": _mean(ent_pi),
            "guide_entropy": _mean(ent_q),
            "steps": float(parts["steps"].mean()),
        }
        return StepOutput(loss, metrics, weight=n_tok, label=self.label)

    # -- pyro's own loop, and the order distributions for the IWAE bound
    def svi(self, model, optim, loss: TraceGraph_ELBO | None = None) -> SVI:
        """A ``pyro.infer.SVI`` over this objective's parameters (and the denoiser's with
        ``train_model``): ``svi.step(x, ranks)`` is one update, the same gradient as
        :meth:`step`'s loss times the number of predicted tokens. Parameters are registered
        in pyro's param store under a name unique to this objective."""
        name = f"vi_orders_{id(self)}"

        def register() -> None:
            pyro.module(name, self)
            if self.trains_model:
                pyro.module(f"{name}_denoiser", model)

        def model_fn(x, ranks, generator=None):
            register()
            return self.pyro_model(model, self._check(model, x, ranks), ranks, generator)

        def guide_fn(x, ranks, generator=None):
            register()
            return self.pyro_guide(model, self._check(model, x, ranks), ranks, generator)

        return SVI(model_fn, guide_fn, optim, loss if loss is not None else TraceGraph_ELBO(max_plate_nesting=1))

    def orders(self, model) -> tuple[ProgramOrders, ProgramOrders]:
        """``(π_ψ, q_φ)``: the likelihood table's prior and proposal."""
        return self.prior(model), self.proposal(model)

    def prior(self, model) -> "ProgramOrders":
        """``π_ψ(σ | x)`` as an order distribution (the IWAE bound's prior)."""
        return ProgramOrders(self, model, self.pyro_model)

    def proposal(self, model) -> "ProgramOrders":
        """``q_φ(σ | x)`` as an order distribution (the IWAE bound's proposal)."""
        return ProgramOrders(self, model, self.pyro_guide)

    def extra_repr(self) -> str:
        return (f"baseline={None if self.baseline is None else self.baseline.net[0].out_features}, "
                f"entropy={self.entropy}, train_model={self.trains_model}")

    def __repr__(self) -> str:
        return f"VIOrders({self.extra_repr()}, policy={self.policy!r}, guide={type(self.guide.net).__name__})"


def _set_sites(trace) -> list[dict]:
    return [s for name, s in trace.nodes.items() if s["type"] == "sample" and name.startswith("set_")]


def _parts(model_trace, guide_trace) -> dict[str, Tensor]:
    """Per row (detached, float64): ``log p_θ(x | σ)``, ``log π(σ)``, ``log q(σ)`` and the number of sets."""
    def total(sites) -> Tensor:
        return torch.stack([s["log_prob"].detach().double() for s in sites]).sum(0)

    tok = [s for name, s in model_trace.nodes.items() if s["type"] == "sample" and name.startswith("tokens_")]
    sets = _set_sites(guide_trace)
    return {
        "log_p": total(tok),
        "log_pi": total(_set_sites(model_trace)),
        "log_q": total(sets),
        "steps": torch.stack([s["value"].any(-1) for s in sets]).sum(0).double(),
    }


def _step_entropies(trace, grad: bool) -> Tensor:
    """Float[n]: the exact entropy of every (row, step) set distribution that had candidates."""
    out = []
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        for s in _set_sites(trace):
            dist = s["fn"].dist
            try:
                h = dist.entropy()
            except PolicyError:  # top-k entropies beyond the enumeration limit
                return torch.full((1,), math.nan)
            out.append(h[dist.valid.any(1)])
    return torch.cat(out) if out else torch.zeros(0)


def _mean(t: Tensor) -> float:
    return float(t.detach().mean()) if t.numel() else 0.0


# ----------------------------------------------------------------------------- order distributions


class ProgramOrders:
    """An order distribution (``sample(x, ranks, generator)``, ``log_prob(x, order)``;
    objectives/iwae.py's protocol) from one of the objective's pyro programs: the model
    (``π_ψ``, tokens observed) or the guide (``q_φ``). ``log_prob`` conditions the program's
    set sites on the order's sets and sums their log-probabilities (−inf for an order the
    program cannot produce); it is differentiable in the parameters."""

    def __init__(self, objective: VIOrders, model, program):
        self.objective, self.model, self.program = objective, model, program

    def sample(self, x: Tensor, ranks: Tensor, generator: torch.Generator | None = None) -> Tensor:
        x = self.objective._check(self.model, x, ranks)
        with torch.no_grad():
            return poutine.trace(self.program).get_trace(self.model, x, ranks, generator).nodes["_RETURN"]["value"]

    def log_prob(self, x: Tensor, order: Tensor) -> Tensor:
        ranks = torch.where(order >= 1, torch.ones_like(order), order)
        x = self.objective._check(self.model, x, ranks)
        steps = int((ranks >= 1).sum(1).max()) if ranks.numel() else 0
        data = {f"set_{k}": s for k, s in enumerate(_sets(order, steps))}
        tr = poutine.trace(poutine.condition(self.program, data=data)).get_trace(self.model, x, ranks)
        tr.compute_log_prob()
        sites = _set_sites(tr)
        return torch.stack([s["log_prob"] for s in sites]).sum(0) if sites else x.new_zeros(x.shape[0], dtype=torch.float64)

    def __repr__(self) -> str:
        return f"ProgramOrders({self.program.__name__})"
