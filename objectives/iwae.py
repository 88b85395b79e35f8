"""An importance-weighted bound on ``log p(x)`` over orders (Burda et al. 2016, IWAE).

The model of DESIGN.md section 1 is a mixture over orders,
``p(x) = Σ_σ π(σ) p_θ(x | σ)``. With ``K`` orders ``σ_1..σ_K ~ q(σ | x)`` i.i.d.::

    log p(x) >= L_K = E log (1/K) Σ_k π(σ_k) p_θ(x | σ_k) / q(σ_k | x)

(Jensen on the unbiased estimate ``(1/K) Σ_k w_k`` of ``p(x)``). ``L_K`` rises with ``K``
(``L_K <= L_{K+1}``, Burda et al. 2016, theorem 1) and tends to ``log p(x)`` when the weights are
bounded; it equals ``log p(x)`` for every ``K`` when ``q(σ | x)`` is the true posterior
``π(σ) p_θ(x | σ) / p(x)`` (every weight is then ``p(x)``).

Relation to the MDM NELBO: with ``K = 1`` and ``q = π`` = a flat schedule (uniformly random
orders), ``L_1 = E_σ log p_θ(x | σ)``, minus the expected any-order NLL, which is the
continuous-time MDM NELBO (MDLM, Sahoo et al. 2024; MD4, Shi et al. 2024) of a denoiser
read as an any-order model. So ``-L_1`` is the MDM NELBO and ``-L_K`` for ``K > 1`` is a
tighter bound on the NLL of the same model, with no retraining.

Orders come from an ``OrderDistribution``: ``sample(x, ranks, generator) -> order`` and
``log_prob(x, order) -> Float[B]``. ``x`` is there for proposals that look at the data
(a guide ``q_φ(σ | x)``) and for priors whose choices depend on revealed tokens (a policy
``π_ψ(S_k | x_{S_<k})``, which holds its own model); a process ignores it
(``ProcessOrders``; ``as_orders`` wraps processes, names and mappings).

Gradients: ``iwae_bound`` is differentiable in ``θ`` and through ``log π`` / ``log q``, but
the orders are discrete samples: training ``q`` with it needs a score-function term
(e.g. VIMCO), which this module does not add.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from orderlab import ranks as R
from orderlab.likelihood import log_likelihood
from orderlab.processes.base import Process
from orderlab.processes.windowed import Quench
from orderlab.processes.flat import Linear
from orderlab.registry import build

__all__ = ["OrderDistribution", "ProcessOrders", "as_orders", "iwae_bound", "likelihood_table", "log_weights", "nested_iwae"]


@runtime_checkable
class OrderDistribution(Protocol):
    """A distribution over orders of the positions with rank >= 1 (possibly given ``x``)."""

    def sample(self, x: Tensor, ranks: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Long ``[B, L]``: an order (0 given and -1 padding kept from ``ranks``)."""
        ...

    def log_prob(self, x: Tensor, order: Tensor) -> Tensor:
        """Float ``[B]``: ``log q(order | x)`` (``-inf`` outside the support)."""
        ...


class ProcessOrders:
    """The order distribution of a process (its first-hitting-time order; ``x`` unused).
    ``steps``: binned orders with multi-token sets, as ``Process.sample_ranks(steps=...)``."""

    def __init__(self, process: Process, steps: int | None = None):
        if not isinstance(process, Process):
            raise TypeError(f"ProcessOrders needs a built Process, got {type(process).__name__} {process!r}")
        self.process = process
        self.steps = steps

    def sample(self, x: Tensor, ranks: Tensor, generator: torch.Generator | None = None) -> Tensor:  # noqa: D102
        return self.process.sample_ranks(ranks, generator=generator, steps=self.steps)

    def log_prob(self, x: Tensor, order: Tensor) -> Tensor:  # noqa: D102
        return self.process.log_prob(order, steps=self.steps)

    def __repr__(self) -> str:
        steps = f", steps={self.steps}" if self.steps is not None else ""
        return f"ProcessOrders({self.process!r}{steps})"


def as_orders(spec: Any) -> OrderDistribution:
    """An ``OrderDistribution`` from one, or from a process (instance, name or mapping)."""
    if isinstance(spec, (str, Mapping)) or hasattr(spec, "keys"):  # hasattr: omegaconf's DictConfig
        spec = build("process", spec, path="orders")
    if isinstance(spec, Process):
        return ProcessOrders(spec)
    if isinstance(spec, OrderDistribution):
        return spec
    raise TypeError(f"expected an order distribution (sample, log_prob) or a process, got {type(spec).__name__} {spec!r}")


def iwae_bound(
    model,
    x: Tensor,
    ranks: Tensor,
    prior: Any = "linear",
    proposal: Any = None,
    k: int = 1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Float ``[B]``: one draw of ``log (1/K) Σ_k π(σ_k) p_θ(x|σ_k) / q(σ_k|x)``, nats.

    Its expectation is the bound ``L_K <= log p(x)``. ``prior`` π and ``proposal`` q
    (default: π) are order distributions or processes; ``ranks``: 0 given, 1 to generate,
    -1 padding. The ``B·K`` likelihoods are one ``log_likelihood`` call.
    """
    return nested_iwae(log_weights(model, x, ranks, prior, proposal, k, generator), (k,))[k].float()  # one group of K


def log_weights(model, x: Tensor, ranks: Tensor, prior: Any = "linear", proposal: Any = None, k: int = 1,
                generator: torch.Generator | None = None) -> Tensor:
    """Float64 ``[B, K]``: ``log π(σ_k) p_θ(x|σ_k) / q(σ_k|x)`` for ``K`` orders ``σ_k ~ q``
    per row (arguments as :func:`iwae_bound`)."""
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    R.validate(ranks, x)
    prior = as_orders(prior)
    proposal = prior if proposal is None else as_orders(proposal)
    B, L = x.shape
    xk = x.repeat_interleave(k, dim=0)  # [B*K, L]: the K copies of row b are rows b*K .. b*K+K-1
    order = proposal.sample(xk, ranks.repeat_interleave(k, dim=0), generator)  # [B*K, L]
    log_w = log_likelihood(model, xk, order).to(torch.float64)  # [B*K]
    if proposal is not prior:  # π = q: the ratio is exactly 1
        log_w = log_w + prior.log_prob(xk, order).to(torch.float64) - proposal.log_prob(xk, order).to(torch.float64)
    return log_w.view(B, k)  # [B*K] -> [B, K]


def nested_iwae(log_w: Tensor, ks: tuple[int, ...]) -> dict[int, Tensor]:
    """``{K: Float64 [B]}``: the IWAE-``K`` bound of each row estimated from one set of
    importance weights ``log_w [B, N]``: the ``N`` weights split into ``N // K`` disjoint
    groups of ``K`` (the first ``K·(N // K)``), each group one draw of ``L_K``, averaged.

    Each group is an unbiased draw, so each estimate is unbiased for ``E[L_K]``; sharing
    the weights across ``K`` removes most of the noise between the rows of a table. When
    every ``K`` divides the next (1, 4, 16, 64) the estimates are non-decreasing in ``K``
    for every row, not only in expectation: a group's log-mean-exp is at least the mean
    of its halves' (Jensen)."""
    B, N = log_w.shape
    out = {}
    for k in ks:
        if not 1 <= k <= N:
            raise ValueError(f"k must be in [1, {N}] (the weights per row), got {k}")
        g = N // k
        out[k] = (torch.logsumexp(log_w[:, : g * k].reshape(B, g, k), dim=-1) - math.log(k)).mean(1)
    return out


def _row(estimate: str, nats: Tensor, tokens: Tensor, label: str, k: int | None = None) -> dict[str, Any]:
    """A table row: bits per predicted token over the rows, and its standard error."""
    nats, tokens = nats.double(), tokens.double()
    ratio = float(nats.sum() / tokens.sum().clamp_min(1))  # nats per token
    # delta method for a ratio of sums: se = std(nats_i - ratio * tokens_i) / (sqrt(B) mean tokens)
    resid = nats - ratio * tokens
    se = float(resid.std() / math.sqrt(len(nats)) / tokens.mean().clamp_min(1e-12)) if len(nats) > 1 else float("nan")
    return {
        "estimate": estimate,
        "k": k,
        "bits_per_token": ratio / math.log(2),
        "stderr": se / math.log(2),
        "label": label,
    }


@torch.no_grad()
def likelihood_table(
    model,
    tokens: Tensor,
    ranks: Tensor,
    prior: Any = "linear",
    proposal: Any = None,
    ks: tuple[int, ...] = (1, 4, 16, 64),
    nelbo_samples: int = 16,
    max_rows: int = 4096,
    generator: torch.Generator | None = None,
) -> list[dict[str, Any]]:
    """Rows (dicts) of section 2's table, in bits per predicted token of ``tokens``:

    - ``iwae`` for each ``k`` in ``ks``: ``-L_K`` under ``prior``/``proposal`` (a bound),
      all ``K`` from the same ``max(ks)`` orders per row (:func:`nested_iwae`);
    - ``mdm_nelbo``: the expected any-order NLL under uniformly random orders, averaged
      over ``nelbo_samples`` orders per row (a bound; = the MDM NELBO, see the module doc);
    - ``l2r``, ``r2l``: the exact NLL of the model under one fixed order (left to right,
      right to left over the generated positions).

    Each row: ``estimate``, ``k`` (None but for iwae), ``bits_per_token``, ``stderr``
    (over rows), ``label`` ("bound" or "nll"). ``max_rows`` bounds the sequences of one
    likelihood call (rows are chunked so that rows · k <= max_rows).
    """
    n_tok = (ranks > 0).sum(1).double()  # [B]
    table = []

    def chunked(fn, per_row: int) -> Tensor:
        step = max(1, max_rows // per_row)
        return torch.cat([fn(tokens[i : i + step], ranks[i : i + step]) for i in range(0, len(tokens), step)])

    kmax = max(ks)  # one set of kmax orders per row serves every K (nested_iwae)
    log_w = chunked(lambda x, r: log_weights(model, x, r, prior, proposal, k=kmax, generator=generator), kmax)
    for k, b in nested_iwae(log_w, tuple(ks)).items():
        table.append(_row("iwae", -b, n_tok, "bound", k=k))
    flat = ProcessOrders(Linear())

    def nelbo(x: Tensor, r: Tensor) -> Tensor:
        xs, rs = x.repeat_interleave(nelbo_samples, 0), r.repeat_interleave(nelbo_samples, 0)  # [B*S, L]
        nll = -log_likelihood(model, xs, flat.sample(xs, rs, generator))
        return nll.view(len(x), nelbo_samples).mean(1)  # [B*S] -> [B, S] -> [B]

    table.append(_row("mdm_nelbo", chunked(nelbo, nelbo_samples), n_tok, "bound"))
    l2r = Quench().sample_ranks(ranks)
    r2l = torch.where(ranks > 0, (ranks > 0).sum(1, keepdim=True) + 1 - l2r, ranks)
    for name, order in (("l2r", l2r), ("r2l", r2l)):
        table.append(_row(name, -log_likelihood(model, tokens, order), n_tok, "nll"))
    return table
