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

:func:`measure` is the one path that decodes rows with a policy and measures them
(:class:`Measurement`): :func:`evaluate` and the ablation grid (``orderlab.ablate``) both
call it, so an evaluation row and an ablation run of the same policy, seed and rows carry
the same numbers.

Under a process group (``orderlab.distributed``; every rank calls) :func:`measure` and
:func:`test_likelihood` shard the test batches across ranks (batch ``j`` decoded exactly
as one process decodes it, seed ``derive_seed(seed, j, "decode")``) and gather the
per-batch results back into batch order, so the rows are the single-process ones but for
the timings (``wall_s``: the slowest rank's). Use ``evaluate.batch_size <= n / world`` to
give every rank work.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from orderlab import distributed
from orderlab.approx_cache import ApproximateCache
from orderlab.policies.base import PolicyError
from orderlab.registry import ConfigError, build_settings
from orderlab.runtime import derive_seed, device_of, sync

__all__ = ["COMPILES", "check_compile", "compile_pays", "EvaluateConfig", "IWAEConfig", "LMEvalConfig", "SearchConfig", "VERIFIERS", "lm_eval", "Measurement", "measure", "evaluate", "iwae_table", "evaluation_pareto",
           "test_likelihood", "l2r_ranks", "ACCURACY_METRICS", "CACHES", "decode_cache", "cache_label"]

# task metrics that are the fraction of rows solved: their rows also carry ``accuracy``
ACCURACY_METRICS = frozenset({"exact_match", "accuracy"})

# ``evaluate.cache`` (and ``ablate.cache``): the config value -> decode(..., cache=...)
CACHES: dict[bool | str, bool | ApproximateCache] = {
    True: True,  # the rule's exact cache (a bidirectional rule recomputes)
    False: False,  # recompute every step
    "approximate_prefix": ApproximateCache(suffix=False),  # Fast-dLLM prefix cache (bidirectional rule)
    "approximate_dual": ApproximateCache(suffix=True),  # Fast-dLLM dual cache (bidirectional rule)
}


def decode_cache(value: Any, key: str = "cache") -> bool | ApproximateCache:
    """What ``decode(..., cache=)`` gets for a config value of :data:`CACHES` (an
    :class:`ApproximateCache` passes as it is); anything else is a ConfigError at ``key``."""
    if isinstance(value, ApproximateCache):
        return value
    if isinstance(value, (bool, str)) and value in CACHES:  # an int is no choice, though 1 == True
        return CACHES[value]
    choices = ", ".join(str(k).lower() if isinstance(k, bool) else k for k in CACHES)
    raise ConfigError(key, f"unknown cache {value!r}; choose one of {choices}")


# ``evaluate.compile`` (and ``ablate.compile``): decode through the compiled step
# (``decode(..., compile=True)``), never, or where it pays (:func:`compile_pays`)
COMPILES = ("auto", True, False)

# The measured costs behind ``compile: auto`` (docs/benchmarks.md, issue 22: the issue's
# 3.2M-parameter set-causal model, 2 CPU cores, torch 2.13 inductor, eager decode in
# inference mode): a compiled graph's first call (Dynamo trace + AOTAutograd + inductor,
# C++ compile included), 30 s taken between the warm-cache first call (7-8 s on a quiet
# host) and the cold one (36 s quiet; 72 s at load 5); and the seconds a compiled step
# saves over an eager one (eager minus compiled ms/step on a quiet host: 1.4 at batch 1,
# 3.0 at batch 32). Both grow with the model's depth, so their ratio, the break-even
# number of steps, is what the rule uses.
COMPILE_S = 30.0
STEP_SAVED_S = 1.35e-3
ROW_SAVED_S = 0.0525e-3


def compile_pays(steps: float, rows: int, graphs: int = 1) -> bool:
    """Whether compiling the decode step pays for ``steps`` decode steps of ``rows`` rows
    each: the seconds saved, ``steps · (STEP_SAVED_S + ROW_SAVED_S · rows)``, exceed the
    compile cost of ``graphs`` graphs (``graphs · COMPILE_S``; a batch size is a graph).
    With the constants above: ~21,400 steps at batch 1, ~9,900 at batch 32 (an evaluation
    of 256 rows in batches of 128 over 240 positions decodes ~480 steps: eager)."""
    return steps * (STEP_SAVED_S + ROW_SAVED_S * rows) > graphs * COMPILE_S


def check_compile(value: Any, key: str = "compile") -> bool | str:
    """A value of :data:`COMPILES`, or a ConfigError at ``key``."""
    if isinstance(value, bool) or value == "auto":
        return value
    raise ConfigError(key, f"unknown compile {value!r}; choose auto (where the work pays for compiling), true or false")


def check_compile_with_cache(compile: Any, cache: Any) -> None:
    """A config's ``compile`` and ``cache`` together: ``compile: true`` needs a cache the
    compiled step keeps (an approximate cache runs eagerly only; ``auto`` then stays eager)."""
    if check_compile(compile) is True and isinstance(decode_cache(cache), ApproximateCache):
        raise ConfigError("compile", f"true, but cache {cache_label(cache)!r} runs eagerly only; use auto or false")


def cache_label(cache: Any) -> bool | str:
    """The :data:`CACHES` key of a cache value, as result rows name it."""
    c = decode_cache(cache)
    return c.name if isinstance(c, ApproximateCache) else c


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
class LMEvalConfig:
    """The ``evaluate.lm_eval`` section: lm-eval tasks run on the experiment's model as an
    evaluation step (``orderlab.harness.step``; needs ``pip install orderlab[eval]``).
    ``tasks``: lm-eval task names or paths to task YAML files; ``limit``, ``num_fewshot``,
    ``apply_chat_template``: lm-eval's; ``include_path``: a folder of task YAMLs;
    ``include_defaults``: index lm-eval's own tasks too (about 10 s; false when every task
    is a local YAML); ``model_args``: more ``orderlab`` model arguments (``policy``,
    ``order``, ``max_gen_toks``, ...; the model itself is the experiment's)."""

    tasks: list = field(default_factory=list)
    limit: int | float | None = None
    num_fewshot: int | None = None
    batch_size: int = 8
    seed: int = 0
    include_path: str | None = None
    include_defaults: bool = True
    apply_chat_template: bool = False
    model_args: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        import importlib.util

        if not isinstance(self.tasks, (list, tuple)) or not self.tasks or not all(isinstance(t, str) for t in self.tasks):
            raise ConfigError("tasks", f"must be a non-empty list of lm-eval task names or YAML paths, got {self.tasks!r}")
        self.tasks = list(self.tasks)
        if importlib.util.find_spec("lm_eval") is None:
            raise ConfigError("", "needs lm-eval, which is not installed: pip install 'orderlab[eval]'")
        if self.batch_size < 1:
            raise ConfigError("batch_size", f"out of range: {self.batch_size!r}")
        from orderlab.harness.args import ModelArgs  # noqa: PLC0415  (imports lm_eval: only when asked for)
        from orderlab.harness.scorers import build_scorer

        args = ModelArgs.parse(dict(self.model_args), source_given=True)  # a bad key fails before training
        build_scorer(args.order, args.order_knobs)


# ``search.verifier``: how a searched path is scored (None: the model's own likelihood)
VERIFIERS = (None, "task")


@dataclass
class SearchConfig:
    """The ``evaluate.search`` (and ``ablate.search``) section: evaluate the *searched*
    version of every policy (test-time order search, ``orderlab.search.search_decode``;
    LookUM, Order-Token Search): ``k`` paths per row decoded with the policy, the best kept.

    ``verifier``: ``null`` scores a path by the model's exact ``log p_θ(x̂ | σ̂)`` under its
    own order (those scoring passes count in NFE); ``task`` by the task's score against the
    reference (an oracle verifier: an upper bound on what a real verifier can pick; no
    forward). ``temperature``: token sampling of the paths (``null``: the evaluation's);
    paths differ only through a stochastic policy or ``temperature > 0``. NFE counts every
    forward of every path and every scoring pass (``Searched.nfe``); ``k = 1`` is the plain
    decode. Rows are labelled ``<policy> (search k=4)`` (``, task`` with the oracle)."""

    k: int = 4
    verifier: str | None = None
    temperature: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ConfigError("k", f"must be an integer >= 1 (paths per row), got {self.k!r}")
        if self.verifier not in VERIFIERS:
            raise ConfigError("verifier", f"unknown verifier {self.verifier!r}; choose null (the model's likelihood "
                                          "of each path) or task (the task's score against the reference)")
        if self.temperature is not None:
            if self.temperature < 0:
                raise ConfigError("temperature", f"out of range: {self.temperature!r}")
            self.temperature = float(self.temperature)

    def label(self, policy: str) -> str:
        """The result row's label of the searched ``policy``: ``"top_prob (search k=4)"``."""
        extra = "" if self.verifier is None else f", {self.verifier}"
        return f"{policy} (search k={self.k}{extra})"

    def run(self, model: torch.nn.Module, task: Any, policy: Any, x: Tensor, r: Tensor, *, cache: Any,
            temperature: float, seed: int, compile: bool | dict = False) -> Any:
        """``search_decode`` of rows ``x``/``r`` (the task's reference and ranks) -> ``Searched``;
        ``compile``: ``decode``'s (the paths' decode through the compiled step)."""
        from orderlab.search import search_decode

        verifier = None
        if self.verifier == "task":
            xs, rs = x.repeat_interleave(self.k, 0), r.repeat_interleave(self.k, 0)  # the paths' references
            verifier = lambda tokens, ranks: task.score(tokens, xs, rs).double().to(x.device)  # noqa: E731
        return search_decode(model, policy, x, r, k=self.k, verifier=verifier, cache=decode_cache(cache),
                             temperature=temperature if self.temperature is None else self.temperature, seed=seed,
                             eos_id=task.eos_id, pad_id=getattr(task, "pad_id", None), compile=compile)


@dataclass
class EvaluateConfig:
    """The ``evaluate:`` section; the keys are these fields."""

    policies: list | None = None  # policy specs; null: the experiment's decode policy
    n: int = 256  # test examples
    batch_size: int = 128
    cache: bool | str = True  # a key of CACHES: true, false, approximate_prefix, approximate_dual
    compile: bool | str = "auto"  # the compiled decode step: auto (where it pays: compile_pays), true, false
    temperature: float = 0.0
    seed: int = 0
    likelihood: bool = True  # also report the test bits per token under the L2R order
    heatmaps: bool = True  # save order_<policy>.png per policy in the run folder
    iwae: IWAEConfig | None = None  # the likelihood table over orders (IWAEConfig keys); null: none
    lm_eval: LMEvalConfig | None = None  # lm-eval tasks on the model (LMEvalConfig keys); null: none
    search: SearchConfig | None = None  # also a searched row per policy (SearchConfig keys); null: none

    def __post_init__(self) -> None:
        if self.search is not None and not isinstance(self.search, SearchConfig):
            self.search = build_settings(SearchConfig, self.search, "search")
        if self.iwae is not None and not isinstance(self.iwae, IWAEConfig):  # from Python: a mapping
            self.iwae = build_settings(IWAEConfig, self.iwae, "iwae")
        if self.lm_eval is not None and not isinstance(self.lm_eval, LMEvalConfig):
            self.lm_eval = build_settings(LMEvalConfig, self.lm_eval, "lm_eval")
        if self.policies is not None and not isinstance(self.policies, list):
            raise ConfigError("policies", f"must be a list of policy specs or null, got {type(self.policies).__name__}")
        decode_cache(self.cache)  # a bad name fails before any work
        check_compile_with_cache(self.compile, self.cache)
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


@dataclass
class Measurement:
    """What decoding rows with one policy measured, per row in row order (every rank's
    rows under a process group).

    ``metrics``: the task's per-row numbers (``task.metrics``; the score is
    ``metrics[task.metric]``); ``nfe``: denoiser calls; ``revealed``: positions decoded
    (fewer than the positions to generate where EOS cut a row short); ``wall_s``: decode
    seconds (under a group the slowest rank's sum); ``orders``: the decoded ranks of the
    first ``keep_orders`` rows; with ``bits``, ``nats`` (``-log p(reference | decoded
    order)``) and ``generated`` (the positions those nats cover); for a learned policy
    ``sampled`` (the task score when it samples its sets) and ``entropy`` (nats per decode
    step of its greedy decode, NaN where no exact entropy exists).
    """

    metrics: dict[str, Tensor]  # name -> Float64[n]
    nfe: Tensor  # Long[n]
    revealed: Tensor  # Long[n]
    wall_s: float
    orders: Tensor  # Long[keep_orders, L]
    nats: Tensor | None = None  # Float[n]
    generated: Tensor | None = None  # Long[n]
    sampled: Tensor | None = None  # Float[n]
    entropy: Tensor | None = None  # Float64[n]
    compiled: int = 0  # batches decoded by the compiled step (a setting's effect, not a measurement)

    @staticmethod
    def concat(parts: list["Measurement"]) -> "Measurement":
        """The rows of ``parts`` one after the other; wall seconds summed."""
        def cat(name: str) -> Tensor | None:
            first = getattr(parts[0], name)
            return None if first is None else torch.cat([getattr(p, name) for p in parts])

        metrics = {k: torch.cat([p.metrics[k] for p in parts]) for k in parts[0].metrics}
        return Measurement(metrics, cat("nfe"), cat("revealed"), sum(p.wall_s for p in parts), cat("orders"),
                           cat("nats"), cat("generated"), cat("sampled"), cat("entropy"),
                           sum(p.compiled for p in parts))

    def means(self) -> dict[str, float]:
        """The task metrics (mean per row), ``bits_per_token`` (with ``bits``: Σ nats / Σ
        generated, in bits), ``nfe`` (mean per row), ``tokens_per_step`` (Σ revealed / Σ
        NFE), ``wall_s``, ``tokens_per_s`` (Σ revealed / wall) and ``n`` (rows). Every mean
        is a ratio of sums over rows, so the batch size does not change it."""
        rows = self.nfe.numel()
        steps, revealed = int(self.nfe.sum()), int(self.revealed.sum())
        out = {name: float(v.double().sum()) / rows for name, v in self.metrics.items()}
        if self.nats is not None and self.generated is not None:
            out["bits_per_token"] = float(self.nats.double().sum()) / max(int(self.generated.sum()), 1) / math.log(2.0)
        out["nfe"] = steps / rows
        out["tokens_per_step"] = revealed / max(steps, 1)
        out["wall_s"] = self.wall_s
        out["tokens_per_s"] = revealed / max(self.wall_s, 1e-9)
        out["n"] = rows
        return out


def _reference_order(decoded: Tensor, ranks: Tensor) -> Tensor:
    """The decoded order completed to every position the reference generates: a position
    the decode cut (EOS turned it into padding) joins one last set after all others."""
    gen = ranks >= 1
    last = int(decoded.max()) + 1 if decoded.numel() else 1
    return torch.where(gen, torch.where(decoded >= 1, decoded, last), ranks)


def _measure_batch(model: torch.nn.Module, task: Any, policy: Any, x: Tensor, r: Tensor, seed: int, keep: int,
                   cache: Any, temperature: float, bits: bool, search: SearchConfig | None = None,
                   compile: bool | dict = False) -> Measurement:
    """One batch decoded with decode seed ``seed``; ``keep``: its first rows whose orders are
    kept; ``search``: the searched decode (its NFE: every path and every scoring pass);
    ``compile``: ``decode``'s, for the measured decode (a learned policy's extra decodes,
    which record its choices, run eagerly)."""
    from orderlab.decoding import decode
    from orderlab.likelihood import log_likelihood

    device = x.device
    if search is not None:
        run = lambda compile=False: search.run(model, task, policy, x, r, cache=cache,  # noqa: E731
                                               temperature=temperature, seed=seed, compile=compile)
    elif callable(getattr(policy, "decode", None)):  # a search that decodes itself (order_token_search): eager only
        run = lambda compile=False: policy.decode(model, x, r, cache=decode_cache(cache), temperature=temperature,  # noqa: E731
                                                  seed=seed, eos_id=task.eos_id, pad_id=getattr(task, "pad_id", None),
                                                  compile=compile)
    else:
        run = lambda compile=False: decode(model, policy, x, r, cache=decode_cache(cache),  # noqa: E731
                                           temperature=temperature, seed=seed, eos_id=task.eos_id,
                                           pad_id=getattr(task, "pad_id", None), compile=compile)
    sync(device)
    t0 = time.perf_counter()
    out = run(compile)
    sync(device)
    wall = time.perf_counter() - t0
    revealed = torch.stack(out.tokens_per_step).sum(0) if out.tokens_per_step else torch.zeros_like(out.nfe)
    m = Measurement({k: v.double().cpu() for k, v in task.metrics(out.tokens, x, r).items()}, out.nfe.cpu(),
                    revealed.cpu(), wall, out.ranks[:keep].cpu(), compiled=int(bool(compile)))
    if bits:
        m.nats = -log_likelihood(model, x, _reference_order(out.ranks, r)).cpu()
        m.generated = (r >= 1).sum(1).cpu()
    if _is_learned(policy) and search is None:  # the policy's own numbers: its plain row has them
        m.sampled, m.entropy = _learned_extras(policy, run, task, x, r, seed)
    return m


class _CompileChoice:
    """Whether :func:`measure` decodes its next batch through the compiled step.

    ``True`` / ``False``: every batch / none. ``"auto"``: the first batch eagerly, then,
    after every eager batch, the steps it took (the longest row's NFE) times the batches
    left are the work ahead; once :func:`compile_pays` for that work (at this batch size),
    the remaining batches compile. The decided value is ``decode``'s ``compile``: ``True``,
    or ``options`` (``torch.compile`` keywords, e.g. ``{"backend": "aot_eager"}``) when given."""

    def __init__(self, when: bool | str, options: dict | None, batches: int):
        self.when, self.options, self.batches = check_compile(when), dict(options or {}), batches
        self.on = when is True
        self.steps = self.done = 0  # steps and batches decoded so far (eagerly, under auto)

    def decode_arg(self) -> bool | dict:
        return (self.options or True) if self.on else False

    def after(self, m: Measurement, rows: int) -> None:
        """Account for a decoded batch ``m`` of ``rows`` rows; under auto, decide again."""
        self.done += 1
        self.steps += int(m.nfe.max()) if m.nfe.numel() else 0
        if self.when == "auto" and not self.on:
            ahead = self.steps / self.done * (self.batches - self.done)
            self.on = compile_pays(ahead, rows)


@torch.no_grad()
def measure(model: torch.nn.Module, task: Any, policy: Any, tokens: Tensor, ranks: Tensor, *, batch_size: int,
            cache: Any = True, temperature: float = 0.0, seed: int = 0, bits: bool = False,
            keep_orders: int = 0, search: SearchConfig | None = None, compile: bool | str = False,
            compile_options: dict | None = None) -> Measurement:
    """Decode the rows ``tokens``/``ranks`` (the task's reference; ranks >= 1 are decoded,
    whatever tokens are there) with ``policy`` in batches of ``batch_size`` and measure it:
    the one measuring path of evaluation (:func:`evaluate`) and ablation
    (``orderlab.ablate``), so both give the same numbers for the same policy, seed and rows.

    Batch ``j`` decodes with seed ``derive_seed(seed, j, "decode")``. Under a process group
    (every rank calls) the batches are sharded across ranks and the per-batch results
    gathered on every rank in batch order: the single-process measurement but for
    ``wall_s``. The model decodes in eval mode. ``search``: measure the searched decode
    (:class:`SearchConfig`: ``k`` paths per row, the best kept; ``nfe`` counts every path's
    forwards and every scoring pass). ``compile``: decode through the compiled step, true,
    false or ``"auto"`` (where the work pays for compiling; :class:`_CompileChoice`), with
    ``torch.compile(**compile_options)``; the same numbers up to float rounding. An
    approximate cache runs eagerly (``auto`` stays eager; ``True`` is decode's ValueError);
    ``auto`` also keeps a learned policy eager (its compiled step is not tested).
    Returns :class:`Measurement`.
    """
    device = device_of(model)
    tokens, ranks = tokens.to(device), ranks.to(device)
    was_training = model.training
    model.eval()
    mine = []  # (j, measurement) of this rank's batches
    batches = distributed.shard(list(enumerate(range(0, tokens.shape[0], batch_size))))
    if compile == "auto" and (isinstance(decode_cache(cache), ApproximateCache) or _is_learned(policy)):
        compile = False  # eager only; a learned policy's compiled step is untested: auto keeps it eager
    choice = _CompileChoice(compile, compile_options, len(batches))
    try:
        for j, start in batches:
            x, r = tokens[start : start + batch_size], ranks[start : start + batch_size]
            m = _measure_batch(model, task, policy, x, r, derive_seed(seed, j, "decode"), max(keep_orders - start, 0),
                               cache, temperature, bits, search, choice.decode_arg())
            choice.after(m, x.shape[0])
            mine.append((j, m))
    finally:
        model.train(was_training)
    everyone = distributed.all_gather_object(mine)
    whole = Measurement.concat([m for _, m in sorted((p for ps in everyone for p in ps), key=lambda p: p[0])])
    whole.wall_s = max(sum(m.wall_s for _, m in ps) for ps in everyone)  # ranks decode concurrently
    return whole


def _row(label: str, policy: Any, task: Any, m: Measurement) -> dict[str, Any]:
    """The evaluation row of one policy's measurement (module docstring)."""
    means, nfe = m.means(), m.nfe
    row = {
        "policy": label,
        "repr": repr(policy),
        "metric": task.metric,
        "score": means[task.metric],
        "n": means["n"],
        "nfe_mean": means["nfe"],
        "nfe_min": int(nfe.min()),
        "nfe_median": int(nfe.median()),
        "nfe_max": int(nfe.max()),
        "nfe_hist": _histogram(nfe),
        "tokens_per_step": means["tokens_per_step"],
        "wall_s": means["wall_s"],
        "tokens_per_s": means["tokens_per_s"],
    }
    if m.sampled is not None and m.entropy is not None:
        row["sampled_score"] = float(m.sampled.double().mean())  # the policy sampling its sets instead of its mode
        row["entropy"] = float(m.entropy.mean())  # nats per decode step, mean over rows
    return row


def evaluate(
    model: torch.nn.Module,
    task: Any,
    policies: Mapping[str, Any],
    n: int,
    batch_size: int,
    cache: Any = True,
    temperature: float = 0.0,
    seed: int = 0,
    out_dir: str | Path | None = None,
    search: SearchConfig | None = None,
    compile: bool | str = False,
    compile_options: dict | None = None,
) -> list[dict[str, Any]]:
    """Measure every policy on the ``n`` test rows ``task.batch(n, "test", seed)``
    (:func:`measure`: batch ``j`` decodes with seed ``derive_seed(seed, j, "decode")``);
    one result row per policy, whose ``cache`` names the cache used (:func:`cache_label`).
    ``search``: after each policy's row, the row of its searched version (labelled
    ``SearchConfig.label``, with ``search`` = ``{k, verifier, temperature}``). With
    ``out_dir``, the order of the first batch is saved as ``order_<policy>.png`` (by the
    main rank). ``compile``, ``compile_options``: :func:`measure`'s; a row's
    ``compiled_batches`` counts the batches its decode compiled.
    """
    tokens, ranks = task.batch(n, split="test", seed=seed)
    rows = []
    runs = [(label, policy, None) for label, policy in policies.items()]
    if search is not None:  # each policy's searched row right after its plain row
        runs = [run for label, policy, _ in runs for run in ((label, policy, None), (search.label(label), policy, search))]
    for label, policy, searched in runs:
        m = measure(model, task, policy, tokens, ranks, batch_size=batch_size, cache=cache, temperature=temperature,
                    seed=seed, keep_orders=batch_size, search=searched, compile=compile, compile_options=compile_options)
        row = _row(label, policy, task, m)
        row["cache"] = cache_label(cache)
        row["compiled_batches"] = m.compiled
        if searched is not None:
            row["search"] = asdict(searched)
        if out_dir is not None:
            path = Path(out_dir) / f"order_{_slug(label)}.png"
            if distributed.is_main():
                from orderlab.report import order_heatmap

                order_heatmap(m.orders, path, title=f"{label}: reveal step per position")
            row["heatmap"] = path.name
        if task.metric in ACCURACY_METRICS:
            row["accuracy"] = row["score"]
            if "sampled_score" in row:
                row["sampled_accuracy"] = row["sampled_score"]
        rows.append(row)
    return rows


def _is_learned(policy: Any) -> bool:
    """A policy with a recordable, re-scorable distribution (its contract: ``LearnedPolicy``)."""
    from orderlab.policies.learned import LearnedPolicy

    return isinstance(policy, LearnedPolicy)


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


def lm_eval(exp: Any, cfg: LMEvalConfig) -> dict[str, Any]:
    """``evaluate.lm_eval``: ``cfg``'s lm-eval tasks on the experiment's model
    (``orderlab.harness.step``; lm-eval is imported here only)."""
    from orderlab.harness.step import evaluate_experiment

    return evaluate_experiment(exp, cfg)
