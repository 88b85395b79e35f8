"""Learned set-selection policies π_ψ(S_k | state) (DESIGN.md sections 1, 5, 6).

A learned policy = per-position **features** of the decoder's ``StepView`` → a small
**network** (kind "policy_net") → per-position logits → an exact **set distribution**
over the candidates (:mod:`.sets`). It is a :class:`Policy` and an ``nn.Module``:
``orderlab.decode`` runs it unchanged, greedy (``greedy=True``; ties broken at random)
or sampled. Families: ``learned`` (non-empty Bernoulli sets), ``learned_plackett_luce``
(``k`` positions, the unordered set's probability) and ``dcolt`` (``k`` positions, the
ordered draw's probability: DCoLT's action).

For policy gradients, a rollout is recorded and replayed::

    with policy.recording(seed=s, greedy=False) as traj:
        d = decode(model, policy, tokens, ranks)       # no gradients; one NFE per step
    r = policy.replay(traj)                            # one batched pass, with gradients
    r.log_prob   # Float[B]: log π(trajectory) = Σ_k log π(S_k | state_k)
    r.entropy    # Float[B]: Σ_k H(π(· | state_k))

The recording keeps, per step, the features, the candidates, the chosen set (and the
set size for top-k), so ``replay`` re-evaluates the network on all ``T`` steps at once
(``[T·B, L, F]``) without running the denoiser again. Networks (Jazbec et al. 2026,
"Learning unmasking policies"): a one-block transformer across positions or an MLP,
output bias initialised at −2 (few unmaskings at first) and output weights at 0 (the
initial policy is the same for every state).

Features (``features=[...]``, in this order; all in [0, 1] or so):

    confidence  max_v p(v)                  margin    p(v1) − p(v2)
    entropy     H(p) / log V                position  i / (L − 1)
    distance    distance to the nearest given or revealed position, / L (1 if none)
    progress    fraction of the row's positions to generate already revealed
    step        decode step / number of positions to generate
    candidate   1 on candidates
    hidden      the denoiser's final normalised hidden state at the position (``C`` =
                ``hidden_size`` columns, the model's ``d_model``: in an experiment the
                build's context gives it, a spec may set it; UPO, Hong et al. 2026, and
                DCoLT's unmasking policy module, Huang et al. 2025, read the LM's hidden states)

The first three and ``hidden`` are 0 off the candidates (the decoder leaves those
predictions undefined). A policy with ``hidden`` sets ``wants_hidden``, so the decoder
passes ``StepView.hidden`` from the forward that gives ``probs`` (no second forward); the
feature is detached: the policy's gradients never reach the denoiser.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from orderlab.registry import declare_kind, register

from .base import Policy, PolicyError, StepView
from .compose import Count, rank_candidates
from .sets import NonEmptyBernoulli, OrderedPlackettLuce, PlackettLuceTopK, SetDistribution

__all__ = [
    "FEATURES", "WIDE_FEATURES", "Features", "PolicyNet", "LinearNet", "MLPNet", "TransformerNet",
    "Trajectory", "Replay", "LearnedPolicy", "LearnedBernoulli", "LearnedPlackettLuce", "DCoLTPolicy",
]


# ----------------------------------------------------------------------------- features


@dataclass
class _State:
    """What features need beyond the view: the positions to generate at step 0."""

    todo: Tensor  # Bool[B, L]: masked at the first step of the decode

    def known(self, view: StepView) -> Tensor:
        """Bool[B, L]: given, or revealed since the first step."""
        given = view.given if view.given is not None else ~view.masked & ~self.todo
        return given | (self.todo & ~view.masked)


def _distance(view: StepView, state: _State) -> Tensor:
    """|i − j| to the nearest known position j, / L; 1 where a row knows nothing."""
    known = state.known(view)
    B, L = known.shape
    i = torch.arange(L, device=known.device).expand(B, L)
    big = torch.full_like(i, 2 * L)
    left = torch.where(known, i, -big).cummax(1).values  # last known at or before i
    right = torch.where(known, i, big).flip(1).cummin(1).values.flip(1)  # first known at or after i
    d = torch.minimum(i - left, right - i).clamp(max=L)
    return d.float() / L


def _progress(view: StepView, state: _State) -> Tensor:
    n = state.todo.sum(1, keepdim=True).clamp_min(1)
    done = (state.todo & ~view.masked).sum(1, keepdim=True)
    return (done.float() / n).expand(view.batch_size, view.length)


def _step(view: StepView, state: _State) -> Tensor:
    n = state.todo.sum(1, keepdim=True).clamp_min(1)
    return (view.step / n.float()).expand(view.batch_size, view.length)


def _position(view: StepView, state: _State) -> Tensor:
    i = torch.arange(view.length, device=view.probs.device, dtype=torch.float32)
    return (i / max(view.length - 1, 1)).expand(view.batch_size, -1)


def _on_candidates(fn: Callable[[StepView], Tensor]) -> Callable[[StepView, _State], Tensor]:
    return lambda view, state: torch.where(view.candidates, fn(view).float(), torch.zeros((), device=view.probs.device))


def _hidden(view: StepView, state: _State) -> Tensor:
    """Float[B, L, C]: ``view.hidden`` on the candidates, detached (a policy-gradient or
    variational loss must not train the denoiser through its policy's inputs)."""
    if view.hidden is None:
        raise PolicyError("the 'hidden' feature needs StepView.hidden: the decoder passes it to a policy whose "
                          "wants_hidden is True (orderlab.decode does; a loop building its own views must pass it)")
    return torch.where(view.candidates[..., None], view.hidden.detach().float(), torch.zeros((), device=view.hidden.device))


FEATURES: dict[str, Callable[[StepView, _State], Tensor]] = {
    "confidence": _on_candidates(lambda v: v.confidence),
    "margin": _on_candidates(lambda v: v.margin),
    "entropy": _on_candidates(lambda v: v.entropy / math.log(v.probs.shape[-1]) if v.probs.shape[-1] > 1 else v.entropy),
    "position": _position,
    "distance": _distance,
    "progress": _progress,
    "step": _step,
    "candidate": lambda view, state: view.candidates.float(),
}
# features of ``hidden_size`` columns ``Float[B, L, C]`` (every one above is one column)
WIDE_FEATURES: dict[str, Callable[[StepView, _State], Tensor]] = {"hidden": _hidden}


class Features:
    """The selected feature columns: ``features(view, state) -> Float[B, L, F]``, in the
    order of ``names``; a wide feature (``hidden``) takes ``hidden_size`` columns.
    ``names=None``: every one-column feature (:data:`FEATURES`)."""

    def __init__(self, names: Sequence[str] | None = None, hidden_size: int | None = None):
        names = list(FEATURES) if names is None else list(names)
        unknown = [n for n in names if n not in FEATURES and n not in WIDE_FEATURES]
        if unknown or not names or len(set(names)) != len(names):
            raise PolicyError(f"features must be distinct names from {list(FEATURES) + list(WIDE_FEATURES)}, got {names}")
        wide = [n for n in names if n in WIDE_FEATURES]
        if wide and (hidden_size is None or int(hidden_size) < 1):
            raise PolicyError(f"feature {wide[0]!r} needs hidden_size (the denoiser's d_model: an experiment's "
                             f"model gives it; set it when building the policy alone), got {hidden_size}")
        if hidden_size is not None and not wide:
            raise PolicyError(f"hidden_size={hidden_size} is read only with the 'hidden' feature, not by {names}")
        self.names, self.hidden_size = names, None if hidden_size is None else int(hidden_size)

    @property
    def size(self) -> int:
        return sum(self.hidden_size if n in WIDE_FEATURES else 1 for n in self.names)

    @property
    def wants_hidden(self) -> bool:
        return "hidden" in self.names

    def __call__(self, view: StepView, state: _State) -> Tensor:
        cols = []
        for n in self.names:
            if n in FEATURES:
                cols.append(FEATURES[n](view, state)[..., None])  # [B, L, 1]
                continue
            c = WIDE_FEATURES[n](view, state)  # [B, L, C]
            if c.shape[-1] != self.hidden_size:
                raise PolicyError(f"feature {n!r} was declared with hidden_size={self.hidden_size}, but the "
                                  f"denoiser's hidden states have {c.shape[-1]} columns")
            cols.append(c)
        return torch.cat(cols, dim=-1)  # [B, L, F]


# ----------------------------------------------------------------------------- networks


@declare_kind("policy_net")
class PolicyNet(nn.Module):
    """Kind "policy_net": ``net(features Float[N, L, F], keep Bool[N, L]) -> logits Float[N, L]``.

    ``keep``: the positions of the sequence (not padding); a net mixing positions must not
    attend to the others. ``in_features`` comes from the build's context: the policy (or
    guide) that holds the net provides the width of its features.
    """

    needs = ("in_features",)

    def _init_output(self, out: nn.Linear, bias: float) -> None:
        nn.init.zeros_(out.weight)  # the initial policy ignores the state ...
        nn.init.constant_(out.bias, bias)  # ... and unmasks few positions (Jazbec et al.: −2)


@register("policy_net", "linear")
class LinearNet(PolicyNet):
    """``logit_i = w · f_i + b``; ``weight`` (length F) and ``bias`` set the initial values
    (e.g. a fixed reference policy; ``weight: null`` = zeros)."""

    def __init__(self, in_features: int, weight: list[float] | None = None, bias: float = -2.0):
        super().__init__()
        self.out = nn.Linear(in_features, 1)
        self._init_output(self.out, bias)
        if weight is not None:
            if len(weight) != in_features:
                raise PolicyError(f"linear net weight has {len(weight)} entries for {in_features} features")
            with torch.no_grad():
                self.out.weight.copy_(torch.tensor(weight, dtype=torch.float32)[None])

    def forward(self, features: Tensor, keep: Tensor) -> Tensor:
        return self.out(features)[..., 0]


@register("policy_net", "mlp")
class MLPNet(PolicyNet):
    """Per-position MLP: ``layers`` hidden layers of width ``hidden`` (GELU)."""

    def __init__(self, in_features: int, hidden: int = 64, layers: int = 2, bias: float = -2.0):
        super().__init__()
        if hidden < 1 or layers < 0:
            raise PolicyError(f"mlp needs hidden >= 1 and layers >= 0, got hidden={hidden}, layers={layers}")
        dims = [in_features] + [hidden] * layers
        self.hidden = nn.Sequential(*[m for a, b in zip(dims, dims[1:]) for m in (nn.Linear(a, b), nn.GELU())])
        self.out = nn.Linear(dims[-1], 1)
        self._init_output(self.out, bias)

    def forward(self, features: Tensor, keep: Tensor) -> Tensor:
        return self.out(self.hidden(features))[..., 0]


@register("policy_net", "transformer")
class TransformerNet(PolicyNet):
    """One pre-norm transformer block across the positions of a row (Jazbec et al. 2026):
    ``h = W f``; ``h += Attn(LN h)`` over the ``keep`` positions; ``h += MLP(LN h)``;
    ``logit = w · LN(h) + b``. Positions enter only through the features."""

    def __init__(self, in_features: int, d_model: int = 32, heads: int = 4, mlp_ratio: int = 2, bias: float = -2.0):
        super().__init__()
        if d_model % heads:
            raise PolicyError(f"transformer d_model={d_model} must be divisible by heads={heads}")
        self.heads = heads
        self.inp = nn.Linear(in_features, d_model)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, mlp_ratio * d_model), nn.GELU(), nn.Linear(mlp_ratio * d_model, d_model))
        self.out = nn.Linear(d_model, 1)
        self._init_output(self.out, bias)

    def forward(self, features: Tensor, keep: Tensor) -> Tensor:
        N, L, _ = features.shape
        keep = keep | ~keep.any(1, keepdim=True)  # a row with nothing kept would softmax over nothing
        h = self.inp(features)  # [N, L, D]
        q, k, v = self.qkv(self.norm1(h)).view(N, L, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # 3 × [N, H, L, D/H]
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])  # [N, H, L, D/H]
        h = h + self.proj(a.transpose(1, 2).reshape(N, L, -1))
        h = h + self.mlp(self.norm2(h))
        return self.out(self.norm3(h))[..., 0]


# ----------------------------------------------------------------------------- recording


def _ordinary(t: Tensor) -> Tensor:
    """``t`` as an ordinary tensor: :func:`~orderlab.decoding.decode` runs under
    ``torch.inference_mode``, whose tensors autograd refuses to save, and a recording is
    replayed with gradients (and read by hand in tests and notebooks)."""
    if not t.is_inference():
        return t
    with torch.inference_mode(False):
        return t.clone()


@dataclass
class Trajectory:
    """What a recorded decode keeps per step (lists of ``T`` tensors, batch ``B``).

    features  Float[B, L, F]   keep        Bool[B, L] (positions that are not padding)
    candidates Bool[B, L]      k  Long[B] (set size rule)
    selected  the distribution's action: the set Bool[B, L], or for an ordered draw
              (:class:`~.sets.OrderedPlackettLuce`, DCoLT) its slots Long[B, L]
    log_prob  Float[B]: log π(S_k | state) at decode time (no gradient)
    ref_log_prob Float[B]: the reference policy's log-probability of S_k (if one was given)
    """

    features: list[Tensor] = field(default_factory=list)
    candidates: list[Tensor] = field(default_factory=list)
    selected: list[Tensor] = field(default_factory=list)
    k: list[Tensor] = field(default_factory=list)
    log_prob: list[Tensor] = field(default_factory=list)
    ref_log_prob: list[Tensor] = field(default_factory=list)
    keep: Tensor | None = None

    @property
    def steps(self) -> int:
        return len(self.selected)

    def clear(self) -> None:
        for name in ("features", "candidates", "selected", "k", "log_prob", "ref_log_prob"):
            getattr(self, name).clear()
        self.keep = None

    def stacked(self, name: str) -> Tensor:
        """``[T, B, ...]`` of a recorded list."""
        items = getattr(self, name)
        if not items:
            raise PolicyError(f"the trajectory has no recorded {name!r}: decode inside policy.recording() first")
        return torch.stack(items)


@dataclass
class Replay:
    """A trajectory re-scored with gradients: per step ``[T, B]`` and summed ``[B]``.
    The entropies are computed on first use (exact; costly for top-k with k > 1)."""

    step_log_prob: Tensor  # Float[T, B]
    active: Tensor  # Bool[T, B]: the row had candidates at that step
    dist: SetDistribution  # the step distributions, rows [T·B]

    @property
    def log_prob(self) -> Tensor:
        """Float[B]: log π(trajectory) = Σ_k log π(S_k | state_k)."""
        return self.step_log_prob.sum(0)

    @functools.cached_property
    def step_entropy(self) -> Tensor:
        """Float[T, B]: H(π(· | state_k)) (0 where the row had no candidates)."""
        return self.dist.entropy().view_as(self.step_log_prob)

    @property
    def entropy(self) -> Tensor:
        """Float[B]: Σ_k H(π(· | state_k)), the entropy along the trajectory's states."""
        return self.step_entropy.sum(0)


@dataclass
class _Recording:
    traj: Trajectory
    seed: int | None
    greedy: bool | None
    follow: Tensor | None
    reference: Policy | None


# ----------------------------------------------------------------------------- policy


class LearnedPolicy(Policy, nn.Module):
    """Base of the learned policies: features → ``net`` → logits → a set distribution.

    Subclasses give ``distribution(logits, candidates, k)`` and ``set_size(view, logits)``.
    ``greedy``: the distribution's mode (ties at random, seeded) instead of a sample.
    ``seed``: the policy's own generator, re-seeded at every ``reset()`` (every decode).

    The contract objectives and evaluation rely on (an objective exposes the policy it
    learns as ``Objective.policy``, an instance of this class):

    - ``select(view)`` (the ``Policy`` interface) decodes with it, without gradients; the
      decoder calls it once per step of one walk after ``reset()``.
    - ``recording(seed, greedy, follow, reference)``: a block inside which the *last*
      decode is recorded into the yielded :class:`Trajectory`: per step the features,
      candidates, chosen set, set size and ``log π`` of the choice (and a reference
      policy's ``log_prob`` of it). ``follow`` makes the policy reveal given ranks instead
      of choosing (teacher forcing). No nesting; on exit the policy decodes as before.
    - ``replay(traj) -> Replay``: the recorded trajectory re-scored *with gradients* in one
      batched pass of ``net`` (no denoiser pass): ``log_prob Float[B] = Σ_k log π(S_k |
      state_k)`` equals the log-probabilities recorded at decode time for the same
      parameters, ``step_entropy`` / ``entropy`` the per-step entropies. A policy-gradient
      loss is ``-(advantage · replay(traj).log_prob).mean()``.
    - ``log_prob(selected, view)`` / ``step_distribution(view)``: one step's distribution,
      differentiable (a variational guide or prior walks the steps itself).
    """

    # ``hidden_size``: the denoiser's d_model, from the build's context (an experiment's
    # model) unless the spec sets it; read only by a wide feature (``hidden``)
    needs = ("hidden_size",)
    # the width of the features, for a ``net`` given as a spec (its ``in_features``)
    provides = {"in_features": lambda args: LearnedPolicy._features(args["features"], args.get("hidden_size")).size}

    def __init__(self, features: list[str] | None = None, net: PolicyNet | None = None, greedy: bool = True, seed: int = 0,
                 hidden_size: int | None = None):
        nn.Module.__init__(self)
        self.features = self._features(features, hidden_size)
        self.wants_hidden = self.features.wants_hidden  # the decoder passes StepView.hidden
        self.net = TransformerNet(self.features.size) if net is None else net
        if not isinstance(self.net, PolicyNet):
            raise PolicyError(f"policy.net must be a PolicyNet, got {type(self.net).__name__}")
        self.greedy, self.seed = bool(greedy), int(seed)
        self._gen: torch.Generator | None = None
        self._state: _State | None = None
        self._rec: _Recording | None = None

    @staticmethod
    def _features(names: list[str] | None, hidden_size: int | None) -> Features:
        """The features; ``hidden_size`` kept only where a wide feature reads it (an
        experiment's context gives every learned policy the model's width)."""
        wide = names is not None and any(n in WIDE_FEATURES for n in names)
        return Features(names, hidden_size if wide else None)

    # -- what subclasses define
    def distribution(self, logits: Tensor, candidates: Tensor, k: Tensor) -> SetDistribution:
        raise NotImplementedError

    def set_size(self, view: StepView, logits: Tensor) -> Tensor:
        """Long[B]: the size parameter of the set distribution (unused: zeros)."""
        return torch.zeros(view.batch_size, dtype=torch.long, device=logits.device)

    # -- the Policy interface
    def reset(self) -> None:
        seed = self._rec.seed if self._rec is not None and self._rec.seed is not None else self.seed
        self._gen = torch.Generator().manual_seed(seed)
        self._state = None
        if self._rec is not None:
            self._rec.traj.clear()

    def _state_of(self, view: StepView) -> _State:
        if self._state is None or view.step == 0 or self._state.todo.shape != view.masked.shape:
            self._state = _State(view.masked.clone())
        return self._state

    def step_features(self, view: StepView) -> tuple[Tensor, Tensor]:
        """``(features Float[B, L, F], keep Bool[B, L])`` of one step (``keep``: not padding),
        with the per-decode state: call it for steps 0, 1, ... of one walk (a variational
        guide reads the same features)."""
        state = self._state_of(view)
        return self.features(view, state), state.todo | state.known(view)

    def step_distribution(self, view: StepView) -> SetDistribution:
        """``π(· | view)`` of one step, differentiable in the parameters (and in
        ``view.probs``); the per-decode state as :meth:`step_features`."""
        logits, _, _ = self._logits(view)
        return self.distribution(logits, view.candidates, self.set_size(view, logits))

    def _logits(self, view: StepView) -> tuple[Tensor, Tensor, Tensor]:
        f, keep = self.step_features(view)  # [B, L, F], [B, L]
        return self.net(f.to(self._device()), keep.to(self._device())).to(view.probs.device), f, keep

    def _device(self) -> torch.device:
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def select(self, view: StepView) -> Tensor:
        if self._gen is None:
            self.reset()
        with torch.no_grad():
            logits, f, keep = self._logits(view)
            k = self.set_size(view, logits)
            dist = self.distribution(logits, view.candidates, k)
            rec = self._rec
            greedy = self.greedy if rec is None or rec.greedy is None else rec.greedy
            if rec is not None and rec.follow is not None:
                act = self._followed(rec.follow, view)
            else:
                act = dist.mode(self._gen) if greedy else dist.sample(self._gen)  # the set, or its ordered draw
            sel = dist.selected(act)
            if rec is not None:
                t = rec.traj
                t.keep = _ordinary(keep) if t.keep is None else t.keep
                t.features.append(_ordinary(f))
                t.candidates.append(_ordinary(view.candidates))
                t.selected.append(_ordinary(act))
                t.k.append(_ordinary(k))
                t.log_prob.append(_ordinary(dist.log_prob(act)))
                if rec.reference is not None:
                    t.ref_log_prob.append(_ordinary(rec.reference.log_prob(sel, view).double()))
        return sel

    @staticmethod
    def _followed(follow: Tensor, view: StepView) -> Tensor:
        if follow.shape != view.candidates.shape:
            raise PolicyError(f"recording(follow=...) must have shape {tuple(view.candidates.shape)}, got {tuple(follow.shape)}")
        sel = (follow.to(view.candidates.device) == view.step + 1) & view.masked
        if (sel & ~view.candidates).any() or (view.candidates.any(1) & ~sel.any(1)).any():
            raise PolicyError(f"recording(follow=...): at step {view.step} the followed set of some row is empty or "
                              "not among the candidates (follow must number each row's steps 1, 2, ... densely)")
        return sel

    def log_prob(self, selected: Tensor, view: StepView) -> Tensor:
        """Float[B]: log π(selected | view) for one step (uses the per-decode state)."""
        return self.step_distribution(view).log_prob(selected)

    # -- recording and replay
    @contextlib.contextmanager
    def recording(self, seed: int | None = None, greedy: bool | None = None, follow: Tensor | None = None,
                  reference: Policy | None = None) -> Iterator[Trajectory]:
        """Record the (last) decode run inside the block into the yielded :class:`Trajectory`.

        ``seed``: the generator seed for this decode (fresh randomness per rollout);
        ``greedy``: overrides ``self.greedy`` (rollouts sample); ``follow``: ranks
        ``Long[B, L]`` whose sets the policy reveals instead of choosing (teacher forcing:
        ``log π`` of a given order, e.g. for enumeration or a variational guide's orders);
        ``reference``: a stochastic policy whose ``log_prob`` of every chosen set is
        recorded too (the KL term of GRPO / UPO).
        """
        if self._rec is not None:
            raise PolicyError("policy.recording() blocks cannot be nested")
        self._rec = _Recording(Trajectory(), seed, greedy, follow, reference)
        try:
            yield self._rec.traj
        finally:
            self._rec = None
            self._gen = None  # the next plain decode starts from self.seed again

    def replay(self, traj: Trajectory) -> Replay:
        """Re-score a recorded trajectory with gradients in one batched pass over its steps."""
        f = traj.stacked("features")  # [T, B, L, F]
        T, B, L, Fdim = f.shape
        cand, sel, k = traj.stacked("candidates"), traj.stacked("selected"), traj.stacked("k")  # [T, B, L], [T, B]
        dev = self._device()
        keep = traj.keep.to(dev)[None].expand(T, B, L).reshape(T * B, L)
        logits = self.net(f.to(dev).reshape(T * B, L, Fdim), keep)  # [T·B, L]
        dist = self.distribution(logits, cand.to(dev).reshape(T * B, L), k.to(dev).reshape(T * B))
        lp = dist.log_prob(sel.to(dev).reshape(T * B, L)).view(T, B)
        return Replay(lp, cand.any(-1).to(dev), dist)

    def extra_repr(self) -> str:
        hidden = f", hidden_size={self.features.hidden_size}" if self.features.hidden_size is not None else ""
        return f"features={self.features.names}{hidden}, greedy={self.greedy}, seed={self.seed}"

    def __repr__(self) -> str:  # one line: evaluation tables print it
        return f"{type(self).__name__}({self.extra_repr()}, net={type(self.net).__name__})"


@register("policy", "learned")
@register("policy", "learned_bernoulli")
class LearnedBernoulli(LearnedPolicy):
    """Each candidate revealed with ``σ(logit)``, at least one (:class:`NonEmptyBernoulli`;
    Jazbec et al. 2026). Decides how many positions to reveal per step by itself."""

    def distribution(self, logits, candidates, k):
        return NonEmptyBernoulli(logits, candidates)


@register("policy", "learned_plackett_luce")
class LearnedPlackettLuce(LearnedPolicy):
    """``k`` candidates drawn without replacement ∝ ``exp(logit)`` (:class:`PlackettLuceTopK`;
    DCoLT / LLaDOU, Huang et al. 2025). ``k``: a fixed size, or (from Python) a count rule
    (``Threshold(Confidence(), 0.9)``) whose size is decided from the view, the count's own
    score ranking the candidates (the learned logits when it has none)."""

    def __init__(self, features: list[str] | None = None, net: PolicyNet | None = None, k: int | Count = 1,
                 greedy: bool = True, seed: int = 0, hidden_size: int | None = None):
        super().__init__(features, net, greedy, seed, hidden_size)
        if isinstance(k, int) and k < 1:
            raise PolicyError(f"learned_plackett_luce k must be >= 1, got {k}")
        self.k = k

    def set_size(self, view, logits):
        if isinstance(self.k, Count):
            score = self.k.score(view) if self.k.score is not None else logits
            return self.k.k(view, rank_candidates(score, view.candidates, view.step))
        return torch.full((view.batch_size,), self.k, dtype=torch.long, device=logits.device)

    def distribution(self, logits, candidates, k):
        return PlackettLuceTopK(logits, candidates, k)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.k!r}"


@register("policy", "dcolt")
class DCoLTPolicy(LearnedPlackettLuce):
    """DCoLT / LLaDOU's unmasking policy module (Huang et al. 2025): ``k`` positions per
    step drawn one after another by Plackett–Luce over the net's scores, and the policy
    gradient's ``log π`` of a step is that of the *ordered* draw,
    ``Σ_k [log s_σk − log(Σ_unselected s + Σ_{j≥k} s_σj)]`` (:class:`~.sets.OrderedPlackettLuce`),
    not the unordered set's probability that ``learned_plackett_luce`` uses. Same keys as
    ``learned_plackett_luce``; the paper's module reads the LM's last hidden states
    (``features: [..., hidden]``). Trained jointly with the denoiser by a policy-gradient
    objective with ``train_model: true`` (the paper: PPO on both; ``experiments/
    learned_zoo_dcolt.yaml``: GRPO, whose single-update clipped ratio is PPO's).

    Assumed where the paper's rule is not in REFERENCES: ``k`` fixed per step (or a count
    rule) rather than the paper's schedule; a teacher-forced step (``recording(follow=...)``,
    order within the set unknown) scores the set's exact probability."""

    def distribution(self, logits, candidates, k):
        return OrderedPlackettLuce(logits, candidates, k)
