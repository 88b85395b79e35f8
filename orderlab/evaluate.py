"""Evaluation: decode the task's test set with each policy and score it.

Per policy: the task score (``score``, named by ``metric`` = ``task.metric``; also as
``accuracy`` when the metric is a fraction solved, ``ACCURACY_METRICS``), NFE (mean,
min/median/max, histogram), tokens per step, wall time and tokens/s; optionally an order
heatmap of the first rows
(``orderlab.report.order_heatmap``). :func:`test_likelihood` gives the test set's
bits per generated token under the left-to-right order (the common likelihood);
:func:`iwae_table` the test set's likelihood table over orders (objectives/iwae.py:
importance-weighted bounds for several ``K``, the MDM NELBO, fixed-order NLLs), configured
by ``evaluate.iwae`` (:class:`IWAEConfig`).

Under a process group (``orderlab.distributed``; every rank calls) both shard the test
batches across ranks (batch ``j`` decoded exactly as one process decodes it, seed
``seed + j``) and gather the per-row results (torchmetrics' ``gather_all_tensors``) back
into row order, so the rows are the single-process ones but for the timings (``wall_s``:
the slowest rank's). Use ``evaluate.batch_size <= n / world`` to give every rank work.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from orderlab import distributed
from orderlab.policies.base import PolicyError
from orderlab.registry import ConfigError, build_settings
from orderlab.runtime import device_of, sync

__all__ = ["EvaluateConfig", "IWAEConfig", "evaluate", "iwae_table", "evaluation_pareto", "test_likelihood", "l2r_ranks",
           "ACCURACY_METRICS"]

# task metrics that are the fraction of rows solved: their rows also carry ``accuracy``
ACCURACY_METRICS = frozenset({"exact_match", "accuracy"})


@dataclass
class IWAEConfig:
    """The ``evaluate.iwae`` section: the likelihood table over orders on the test set
    (:func:`iwae_table`). ``k``: the importance samples of the IWAE rows, increasing;
    ``n``: test examples (the first ``n`` of ``task.batch(n, "test", evaluate.seed)``);
    ``nelbo_samples``: uniformly random orders per row of the MDM NELBO row; ``max_rows``:
    the most sequences in one likelihood call (memory)."""

    k: list = field(default_factory=lambda: [1, 4, 16, 64])
    n: int = 256
    nelbo_samples: int = 16
    max_rows: int = 4096

    def __post_init__(self) -> None:
        k = self.k
        if (not isinstance(k, (list, tuple)) or not k or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in k)
                or any(a >= b for a, b in zip(k, k[1:]))):
            raise ConfigError("k", f"must be a non-empty increasing list of integers >= 1, got {k!r}")
        self.k = list(k)
        for key in ("n", "nelbo_samples", "max_rows"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"out of range: {getattr(self, key)!r} (must be >= 1)")


@dataclass
class EvaluateConfig:
    """The ``evaluate:`` section; the keys are these fields."""

    policies: list | None = None  # policy specs; null: the experiment's decode policy
    n: int = 256  # test examples
    batch_size: int = 128
    cache: bool = True
    temperature: float = 0.0
    seed: int = 0
    likelihood: bool = True  # also report the test bits per token under the L2R order
    heatmaps: bool = True  # save order_<policy>.png per policy in the run folder
    iwae: IWAEConfig | None = None  # the likelihood table over orders (IWAEConfig keys); null: none

    def __post_init__(self) -> None:
        if self.iwae is not None and not isinstance(self.iwae, IWAEConfig):  # from Python: a mapping
            self.iwae = build_settings(IWAEConfig, self.iwae, "iwae")
        if self.policies is not None and not isinstance(self.policies, list):
            raise ConfigError("policies", f"must be a list of policy specs or null, got {type(self.policies).__name__}")
        for key, ok in (("n", self.n >= 1), ("batch_size", self.batch_size >= 1), ("temperature", self.temperature >= 0),
                        ("seed", self.seed >= 0)):
            if not ok:
                raise ConfigError(key, f"out of range: {getattr(self, key)!r}")
        self.temperature = float(self.temperature)



def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", label).strip("_") or "policy"



def _histogram(nfe: Tensor) -> dict[str, list[int]]:
    """NFE counts per value when there are few distinct values, else in 10 equal bins."""
    values, counts = torch.unique(nfe, return_counts=True)
    if len(values) <= 16:
        return {"nfe": values.tolist(), "count": counts.tolist()}
    lo, hi = int(nfe.min()), int(nfe.max())
    edges = torch.linspace(lo, hi + 1, 11)
    counts = torch.histc(nfe.double(), bins=10, min=lo, max=hi + 1).long()
    return {"edges": edges.tolist(), "count": counts.tolist()}


def _rows(parts: list[Tensor], dtype: torch.dtype) -> Tensor:
    """This rank's per-row tensors of its batches, concatenated (empty when it had none)."""
    return torch.cat(parts) if parts else torch.empty(0, dtype=dtype)


def _gathered(index: list[Tensor], *columns: tuple[list[Tensor], torch.dtype]) -> list[Tensor]:
    """Every rank's rows of each column, in row order (``index``: the rows' test indices)."""
    order = distributed.gather_rows(_rows(index, torch.long)).argsort(stable=True)
    return [distributed.gather_rows(_rows(parts, dtype))[order] for parts, dtype in columns]


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    task: Any,
    policies: Mapping[str, Any],
    n: int,
    batch_size: int,
    cache: bool = True,
    temperature: float = 0.0,
    seed: int = 0,
    out_dir: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Decode ``n`` test examples with every policy; one result row per policy.

    Positions to generate (rank >= 1) are set to ``model.mask_id`` before decoding; the
    decode seed of the ``j``-th batch is ``seed + j``. With ``out_dir``, the order of the
    first batch is saved as ``order_<policy>.png``.
    """
    from orderlab.decoding import decode

    device = device_of(model)
    was_training = model.training
    model.eval()
    tokens, ranks = task.batch(n, split="test", seed=seed)
    tokens, ranks = tokens.to(device), ranks.to(device)
    batches = distributed.shard(list(enumerate(range(0, n, batch_size))))  # this rank's (j, start)
    rows = []
    try:
        for label, policy in policies.items():
            scores, nfes, n_gen, index = [], [], [], []
            sampled, entropy = [], []  # learned policies only
            first_ranks: Tensor | None = None
            wall = 0.0
            for j, start in batches:
                x, r = tokens[start : start + batch_size], ranks[start : start + batch_size]
                masked = torch.where(r >= 1, torch.full_like(x, model.mask_id), x)
                run = lambda: decode(model, policy, masked, r, cache=cache, temperature=temperature,  # noqa: E731
                                     seed=seed + j, eos_id=task.eos_id, pad_id=getattr(task, "pad_id", None))
                sync(device)
                t0 = time.perf_counter()
                out = run()
                sync(device)
                wall += time.perf_counter() - t0
                if _is_learned(policy):
                    s, h = _learned_extras(policy, run, task, x, r, seed + j)
                    sampled.append(s)
                    entropy.append(h)
                scores.append(task.score(out.tokens, x, r).float().cpu())
                nfes.append(out.nfe.cpu())
                revealed = torch.stack(out.tokens_per_step).sum(0) if out.tokens_per_step else torch.zeros_like(out.nfe)
                n_gen.append(revealed.cpu())  # < the positions to generate when EOS cut a row short
                index.append(torch.arange(start, start + x.shape[0]))
                if j == 0:
                    first_ranks = out.ranks.cpu()
            score, nfe, ngen = _gathered(index, (scores, torch.float32), (nfes, torch.long), (n_gen, torch.long))
            wall = max(distributed.all_gather_object(wall))  # the slowest rank's
            total = int(ngen.sum())
            row = {
                "policy": label,
                "repr": repr(policy),
                "metric": task.metric,
                "score": float(score.mean()),
                "n": int(score.numel()),
                "nfe_mean": float(nfe.double().mean()),
                "nfe_min": int(nfe.min()),
                "nfe_median": int(nfe.median()),
                "nfe_max": int(nfe.max()),
                "nfe_hist": _histogram(nfe),
                "tokens_per_step": total / max(int(nfe.sum()), 1),
                "wall_s": wall,
                "tokens_per_s": total / max(wall, 1e-9),
            }
            if out_dir is not None:
                from orderlab.report import order_heatmap

                path = Path(out_dir) / f"order_{_slug(label)}.png"
                if first_ranks is not None:  # the rank that decoded batch 0 (rank 0)
                    order_heatmap(first_ranks, path, title=f"{label}: reveal step per position")
                row["heatmap"] = path.name
            if sampled:
                s_score, ent = _gathered(index, (sampled, torch.float32), (entropy, torch.float64))
                row["sampled_score"] = float(s_score.mean())  # the policy sampling its sets instead of its mode
                row["entropy"] = float(ent.mean())  # nats per decode step, mean over rows
            if task.metric in ACCURACY_METRICS:
                row["accuracy"] = row["score"]
                if "sampled_score" in row:
                    row["sampled_accuracy"] = row["sampled_score"]
            rows.append(row)
    finally:
        model.train(was_training)
    return rows


def _is_learned(policy: Any) -> bool:
    """A policy with a recordable, re-scorable distribution (``LearnedPolicy``)."""
    return callable(getattr(policy, "recording", None)) and callable(getattr(policy, "replay", None))


def _learned_extras(policy: Any, run: Any, task: Any, x: Tensor, r: Tensor, seed: int) -> tuple[Tensor, Tensor]:
    """``(sampled score Float[b], mean policy entropy Float64[b])`` of one batch: the task
    score when the policy samples its sets (seeded ``seed``), and the entropy (nats) of the
    policy's set distribution averaged over the decode steps of its greedy decode."""
    with policy.recording(greedy=False, seed=seed):
        out = run()
    score = task.score(out.tokens, x, r).float().cpu()
    with policy.recording() as traj:
        run()
    rep = policy.replay(traj)
    try:
        ent = torch.where(rep.active, rep.step_entropy, 0.0).sum(0) / rep.active.sum(0).clamp_min(1)  # [b]
    except PolicyError:  # top-k sets beyond the enumeration limit: no exact entropy
        ent = torch.full((x.shape[0],), math.nan)
    return score, ent.double().cpu()


def evaluation_pareto(rows: list[dict[str, Any]], path: str | Path, title: str | None = None) -> Path:
    """Score vs mean NFE of the evaluation rows (``orderlab.report.pareto_plot``): the rows
    of one heuristic family (``threshold(tau=0.5)``, ``threshold(tau=0.9)``, ...) form a
    curve over its knob; every other row (a learned policy: a star, a fixed order) is a point."""
    from orderlab.report import pareto_plot

    curves: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        learned = "sampled_score" in r  # a learned policy's row: a point of its own, whatever its label
        family = r["policy"] if learned else r["policy"].partition("(")[0]
        curves.setdefault(family, []).append({"x": r["nfe_mean"], "y": r["score"], "label": r["policy"],
                                              "learned": learned})  # labelled in full: no colour to match
    metric = rows[0]["metric"] if rows else "score"
    return pareto_plot(curves, path, xlabel="NFE (mean forwards per sequence)", ylabel=metric, title=title)


def l2r_ranks(ranks: Tensor) -> Tensor:
    """Left-to-right order of the positions to generate: ranks ``1..K`` in position order."""
    gen = ranks >= 1
    order = torch.cumsum(gen.long(), dim=1)  # [B, L]
    return torch.where(gen, order, ranks)


@torch.no_grad()
def test_likelihood(model: torch.nn.Module, task: Any, n: int, batch_size: int, seed: int = 0) -> dict[str, Any]:
    """Test bits per generated token under the left-to-right order (exact, a bound on -log p(x))."""
    from orderlab.likelihood import log_likelihood

    device = device_of(model)
    was_training = model.training
    model.eval()
    try:
        tokens, ranks = task.batch(n, split="test", seed=seed)
        parts = []  # (batch index, log-likelihood, tokens) of this rank's batches
        for j, start in distributed.shard(list(enumerate(range(0, n, batch_size)))):
            x, r = tokens[start : start + batch_size].to(device), ranks[start : start + batch_size].to(device)
            parts.append((j, float(log_likelihood(model, x, l2r_ranks(r)).sum()), int((r >= 1).sum())))
    finally:
        model.train(was_training)
    nats, count = 0.0, 0
    for _, ll, k in sorted(p for ps in distributed.all_gather_object(parts) for p in ps):  # batch order
        nats -= ll
        count += k
    return {"order": "l2r", "bits_per_token": nats / max(count, 1) / math.log(2.0), "tokens": count}


@torch.no_grad()
def iwae_table(model: torch.nn.Module, task: Any, cfg: IWAEConfig, prior: Any = "linear", proposal: Any = None,
               orders: str = "uniform", seed: int = 0) -> dict[str, Any]:
    """The likelihood table over orders of ``cfg.n`` test examples (REFERENCES.md "VI over
    orders"; :func:`orderlab.objectives.iwae.likelihood_table`), bits per generated token:
    ``iwae`` rows ``-L_K`` for each ``K`` in ``cfg.k`` with orders ``σ ~ proposal``
    weighted by ``prior`` (an upper bound on the NLL, tightening with ``K``), the MDM NELBO
    (uniformly random orders, a bound) and the exact NLL under left to right and right to
    left (label "nll"). ``prior``/``proposal``: order distributions or processes (default:
    uniformly random orders, ``proposal = prior``: the MDM setting); ``orders`` names them
    in the result. Seeded by ``seed`` (test rows and the sampled orders).

    Returns ``{"orders", "prior", "proposal", "n", "rows"}`` (``rows``: the table's dicts:
    ``estimate``, ``k``, ``bits_per_token``, ``stderr``, ``label``). Not sharded: under a
    process group only the main rank should call it.
    """
    from orderlab.objectives.iwae import likelihood_table

    device = device_of(model)
    was_training = model.training
    model.eval()
    try:
        tokens, ranks = task.batch(cfg.n, split="test", seed=seed)
        generator = torch.Generator(device=device).manual_seed(seed)
        rows = likelihood_table(model, tokens.to(device), ranks.to(device), prior, proposal, ks=tuple(cfg.k),
                                nelbo_samples=cfg.nelbo_samples, max_rows=cfg.max_rows, generator=generator)
    finally:
        model.train(was_training)
    return {"orders": orders, "prior": repr(prior), "proposal": repr(prior if proposal is None else proposal),
            "n": cfg.n, "rows": rows}
