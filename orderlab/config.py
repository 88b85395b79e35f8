"""Experiments from YAML: ``orderlab.load(path, overrides) -> Experiment``.

The only module (with run.py) that sees a whole config (DESIGN.md section 9.4). Layout::

    task:   {name: addition, digits: 3}
    model:  {name: transformer, d_model: 128, n_layers: 4, n_heads: 4, attention: {name: set_causal},
             checkpoint: null}          # optional: start from an earlier run's weights
    stages:                             # trained in this order, each with its own checkpoint
      denoiser: {objective: {name: set_nll, process: {name: staggered, d: 2}},
                 train: {steps: 1000, batch_size: 64, lr: 1.0e-3}}          # TrainConfig fields
      policy:   {objective: {name: grpo, ...}, train: {steps: 300}}
    policy:    {name: l2r}                                                 # the decode policy
    evaluate:  {policies: [l2r, {name: threshold, tau: 0.9}], ...}         # EvaluateConfig fields
               # iwae: {k: [1, 4, 16, 64], n: 256}: the likelihood table over orders (IWAEConfig)
    run:       {dir: runs, name: null, device: auto, resume: false, overwrite: false}  # RunConfig fields
    ablate:    {grid: [{name: threshold, tau: [0.5, 0.9]}], seeds: [0, 1]}  # optional: AblateConfig fields

A stage has exactly the keys ``objective`` (required) and ``train`` (optional, every
field defaulted). ``stages: {}`` trains nothing (evaluate the model as built or loaded).
``policy`` may be left out when ``evaluate.policies`` lists what to evaluate (the decode
policy, ``Experiment.policy``, is then the first of them). ``model.checkpoint`` is a
checkpoint file, a stage folder or a run folder (``orderlab.checkpoint.resolve``); its
final (EMA) weights are loaded into the model.

Runtime values come from one explicit :class:`~orderlab.registry.Context`, filled here in
order: the built task (``task``, and its ``vocab_size``, ``max_len`` = ``seq_len`` and
``token_freqs``, computed on first use), then the built model's sizes (a pretrained
model's vocabulary and length are its own). A component declares the constructor
arguments it takes from it (``needs``: a policy-gradient objective's ``task``, the
model's ``vocab_size`` and ``max_len``, ``pc_sampler``'s ``token_freqs``); the YAML does
not give them (``model.vocab_size`` is an error naming the task as its source).

Loading is one walk made twice (``orderlab.registry``): the check pass visits every key
of every section and every nested component (``stages.policy.objective.policy.net.hidden``,
``evaluate.policies[1]``, every point of the ``ablate`` grid, ``ablate.grid[2].gama``)
and builds nothing, so a typo is reported, with its full key path and the nearest valid
key, before a model is built; the build pass then builds everything (the grid's policies
too: one per point and seed, ``orderlab.ablate``). Errors are
:class:`~orderlab.registry.ConfigError`. ``load`` creates no folder and loads no weights
other than ``model.checkpoint`` (the run's own checkpoints: :meth:`Experiment.restore`).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from orderlab import checkpoint as ckpt
from orderlab import builder  # noqa: F401  (fills the registry: every component package)
from orderlab import registry
from orderlab.ablate import AblateConfig, Ablation, grid_policies
from orderlab.evaluate import EvaluateConfig
from orderlab.policies.base import Policy
from orderlab.registry import DEFERRED, ConfigError, Context
from orderlab.runtime import derive_seed, resolve_device
from orderlab.train import TrainConfig

__all__ = ["load", "Experiment", "Stage", "RunConfig", "SECTIONS", "policy_label", "learned_label"]


@dataclass
class RunConfig:
    """The ``run:`` section: where the run folder lives, what it runs on, whether to resume."""

    dir: str = "runs"
    name: str | None = None  # null: the YAML file's stem
    device: str = "auto"  # "auto": cuda when available, else cpu
    resume: bool = False  # skip completed stages, continue the interrupted one exactly
    overwrite: bool = False  # a fresh run may replace an earlier run in the folder (orderlab.runfolder)

    def __post_init__(self) -> None:
        if self.resume and self.overwrite:
            raise ConfigError("run.overwrite", "contradicts run.resume=true (resume continues the run in the "
                                               "folder, overwrite replaces it): set one of them")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as e:
                raise ConfigError("device", f"not a torch device: {e}") from None


SECTIONS = ("task", "model", "stages", "policy", "evaluate", "run", "ablate")
_STAGE_KEYS = ("objective", "train")
_STAGE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


@dataclass
class Stage:
    """One training stage: an objective and its ``train`` settings. ``files``: its folder."""

    name: str
    objective: Any
    train: TrainConfig
    files: ckpt.StageFiles


@dataclass
class Experiment:
    """Everything an experiment needs, built from one config.

    ``stages`` in training order. ``policy`` is the decode policy (the ``policy`` section,
    else the first of ``evaluate.policies``); ``policies`` the evaluation policies by label:
    ``evaluate.policies`` (or just ``policy`` when that is null), then the policy every
    stage learned (a stage whose objective's ``policy`` is a ``Policy``), labelled by
    the stage and what learned it: ``"policy (grpo)"`` (:func:`learned_label`).
    """

    config: DictConfig  # resolved, with every default filled in
    task: Any
    model: torch.nn.Module
    stages: dict[str, Stage]
    policy: Any
    evaluate: EvaluateConfig
    run: RunConfig
    run_dir: Path
    policies: dict[str, Any] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    ablation: Ablation | None = None  # the ``ablate`` section: its grid's policies per (point, seed)

    @property
    def files(self) -> ckpt.RunFiles:
        return ckpt.RunFiles(self.run_dir)

    @property
    def objective(self) -> Any:
        """The first stage's objective (None without stages)."""
        return next(iter(self.stages.values())).objective if self.stages else None

    @property
    def process(self) -> Any:
        """The training order distribution: the process of the first stage's objective
        that has one (a likelihood objective's; None if no stage has a process)."""
        return next((s.objective.process for s in self.stages.values() if hasattr(s.objective, "process")), None)

    def restore(self, ema: bool = True) -> dict[str, int]:
        """Load every stage's checkpoint that exists, in stage order, into the model and
        the stage's objective (EMA weights when ``ema`` and present: the ones evaluated).
        Returns ``{stage: checkpoint step}``. Raises ``CheckpointError`` naming the file
        if one is unreadable or does not fit the config."""
        steps = {}
        for stage in self.stages.values():
            if stage.files.checkpoint.exists():
                steps[stage.name] = ckpt.restore_final(stage.files.checkpoint, self.model, stage.objective,
                                                       ema=ema, map_location=self.device)
        return steps


# --------------------------------------------------------------------------- reading


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def _read(source: str | Path | Mapping[str, Any] | DictConfig, overrides: Sequence[str]) -> tuple[DictConfig, str]:
    """The merged config and the run name fallback (the YAML stem)."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ConfigError("", f"config file {str(path)!r} not found")
        try:
            cfg = OmegaConf.load(path)
        except Exception as e:  # yaml syntax errors: "... in <file>, line 3, column 7"
            raise ConfigError("", f"cannot read {str(path)!r}: {_one_line(e)}") from None
        stem = path.stem
    else:
        cfg, stem = OmegaConf.create(dict(source) if isinstance(source, Mapping) else source), "experiment"
    if not isinstance(cfg, DictConfig):
        raise ConfigError("", "the config must be a mapping of sections")
    if isinstance(overrides, str):
        overrides = [overrides]
    for item in overrides:
        if "=" not in item:
            raise ConfigError("overrides", f"{item!r} is not of the form key=value")
        key = item.split("=", 1)[0].strip()
        try:
            dot = OmegaConf.from_dotlist([item])
        except Exception as e:  # omegaconf or yaml errors in the value
            raise ConfigError(key, f"bad override {item!r}: {_one_line(e).split(' full_key:')[0]}") from None
        try:
            # a mapping value replaces the node (``task={name: text}`` swaps the component
            # and drops the old one's keys); a scalar or list value is set as usual
            OmegaConf.update(cfg, key, OmegaConf.select(dot, key), merge=False)
        except OmegaConfBaseException as e:
            raise ConfigError(key, f"cannot apply override {item!r}: {_one_line(e).split(' full_key:')[0]}") from None
    return cfg, stem


def _resolve(cfg: DictConfig) -> dict[str, Any]:
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        raise ConfigError(str(getattr(e, "full_key", "") or ""), str(e).splitlines()[0]) from None


# --------------------------------------------------------------------------- the walk


def policy_label(spec: Any) -> str:
    """A short readable label of a policy spec: ``"l2r"``, ``"threshold(tau=0.9)"``."""
    if isinstance(spec, str):
        return spec.rsplit(".", 1)[-1]
    d = dict(spec)
    head = str(d.pop("name", None) or d.pop("_target_", "policy")).rsplit(".", 1)[-1]
    d.pop("_target_", None)
    args = ", ".join(f"{k}={policy_label(v) if isinstance(v, Mapping) else v}" for k, v in d.items())
    return f"{head}({args})" if args else head


def learned_label(stage: str, objective: Any) -> str:
    """The evaluation label of the policy a stage learned: the stage and what learned it,
    ``"policy (grpo)"`` (the objective's registered name, or its class name)."""
    spec = objective if isinstance(objective, str) else (objective.get("name") or objective.get("_target_", "?"))
    what = str(spec).rsplit(".", 1)[-1]
    return stage if stage == what else f"{stage} ({what})"


def _sections(raw: Mapping[str, Any]) -> None:
    for key in raw:
        if key in _STAGE_KEYS:
            raise ConfigError(key, f"'{key}' belongs to a stage: stages: {{<name>: {{objective: ..., train: ...}}}}")
        if key not in SECTIONS:
            close = difflib.get_close_matches(key, SECTIONS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(key, f"unknown section{hint} (valid sections: {', '.join(SECTIONS)})")
    for section in ("task", "model", "stages"):
        if raw.get(section) is None:
            raise ConfigError(section, "missing section")
    evaluated = raw.get("evaluate") or {}
    if raw.get("policy") is None and not (isinstance(evaluated, Mapping) and evaluated.get("policies")):
        raise ConfigError("policy", "missing section: the decode policy (or list the policies to evaluate in "
                                    "evaluate.policies)")


def _stage_specs(raw: Any) -> dict[str, tuple[Any, Any]]:
    """``{name: (objective spec, train mapping)}`` with the stage keys checked."""
    if not isinstance(raw, Mapping):
        raise ConfigError("stages", f"must be a mapping of stage name -> {{objective: ..., train: ...}}, got "
                                    f"{type(raw).__name__}")
    stages = {}
    for name, stage in raw.items():
        path = f"stages.{name}"
        if not _STAGE_NAME.fullmatch(str(name)):
            raise ConfigError(path, "a stage name is a folder name: letters, digits, '_' and '-'")
        if not isinstance(stage, Mapping):
            raise ConfigError(path, f"must be a mapping with keys {', '.join(_STAGE_KEYS)}, got {type(stage).__name__}")
        for key in stage:
            if key not in _STAGE_KEYS:
                close = difflib.get_close_matches(key, _STAGE_KEYS, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"{path}.{key}", f"unknown stage key{hint} (valid keys: {', '.join(_STAGE_KEYS)})")
        if stage.get("objective") is None:
            raise ConfigError(f"{path}.objective", "missing: every stage trains an objective")
        stages[str(name)] = (stage["objective"], stage.get("train"))
    return stages


def _model_spec(spec: Any) -> tuple[Any, str | None]:
    """The model spec without ``checkpoint``, and that checkpoint (checked to exist)."""
    if not isinstance(spec, Mapping):
        return spec, None
    spec = dict(spec)
    path = spec.pop("checkpoint", None)
    if path is not None:
        try:
            ckpt.resolve(path)
        except ckpt.CheckpointError as e:
            raise ConfigError("model.checkpoint", str(e)) from None
    return spec, path


def _context(task: Any) -> Context:
    """The runtime values components may need (``needs``), as the task gives them; in the
    check pass (``task`` is ``DEFERRED``) only their names."""
    def value(get: Any) -> Any:
        return DEFERRED if task is DEFERRED else get()

    ctx = Context().set("task", task, "the task section")
    ctx.set("vocab_size", value(lambda: task.vocab_size), "the task (task.vocab_size)")
    ctx.set("max_len", value(lambda: task.seq_len), "the task (task.seq_len)")
    if task is DEFERRED:
        return ctx.set("token_freqs", DEFERRED, "the task's token frequencies")
    return ctx.lazy("token_freqs", task.token_freqs, "the task's token frequencies")


def _with_model(ctx: Context, model: Any) -> Context:
    """Components built after the model see its sizes (a pretrained model's are its own):
    ``vocab_size``, ``max_len`` and ``hidden_size`` (its ``d_model``, the width of the
    hidden states a learned policy's ``hidden`` feature reads); the task's tokens and
    lengths must fit them."""
    if model is DEFERRED:
        return ctx.set("hidden_size", DEFERRED, "the model (model.d_model)")
    task = ctx["task"]
    if task.vocab_size > model.vocab_size:
        raise ConfigError("model", f"the task's vocabulary ({task.vocab_size} tokens) is larger than the model's "
                                   f"({model.vocab_size}): the model cannot read every task token")
    if task.seq_len > model.max_len:
        raise ConfigError("model", f"the task's sequences ({task.seq_len} positions) are longer than the model's "
                                   f"max_len={model.max_len}")
    ctx.set("vocab_size", model.vocab_size, "the model (model.vocab_size)")
    ctx.set("hidden_size", model.config.d_model, "the model (model.d_model)")
    return ctx.set("max_len", model.max_len, "the model (model.max_len)")


@dataclass
class _Settings:
    """The plain-value sections (settings dataclasses, checked on construction) and the
    specs the component walk takes."""

    evaluate: EvaluateConfig
    run: RunConfig
    stages: dict[str, tuple[Any, TrainConfig]]  # name -> (objective spec, train settings)
    ablate: AblateConfig | None
    model: Any  # the model spec without ``checkpoint``
    model_checkpoint: str | None

    @classmethod
    def read(cls, raw: dict[str, Any]) -> _Settings:
        stages = {name: (spec, registry.build_settings(TrainConfig, train, f"stages.{name}.train"))
                  for name, (spec, train) in _stage_specs(raw["stages"]).items()}
        return cls(registry.build_settings(EvaluateConfig, raw.get("evaluate"), "evaluate"),
                   registry.build_settings(RunConfig, raw.get("run"), "run"), stages,
                   None if raw.get("ablate") is None else _ablate_settings(raw["ablate"]), *_model_spec(raw["model"]))


def _walk(raw: dict[str, Any], s: _Settings, check_only: bool) -> dict[str, Any]:
    """Every component of ``raw`` by the one walk (``registry.check`` or ``registry.build``),
    in the order the context fills: task, model, then what needs them. The check pass
    builds nothing (its values are classes)."""
    make = registry.check if check_only else registry.build
    task = make("task", raw["task"], "task", Context())
    ctx = _context(DEFERRED if check_only else task)
    ctx.set("device", DEFERRED if check_only else resolve_device(s.run.device), "the run (run.device)")
    seed = next(iter(s.stages.values()))[1].seed if s.stages else 0
    with torch.random.fork_rng(devices=[]):  # the model's init is a function of the seed alone
        torch.manual_seed(derive_seed(seed, 0, "init"))
        model = make("model", s.model, "model", ctx)
    if not check_only and s.model_checkpoint is not None:
        try:
            ckpt.restore_final(ckpt.resolve(s.model_checkpoint), model)
        except ckpt.CheckpointError as e:
            raise ConfigError("model.checkpoint", str(e)) from None
    ctx = _with_model(ctx, DEFERRED if check_only else model)
    listed = {}
    for i, spec in enumerate(s.evaluate.policies or []):
        label = policy_label(spec)
        while label in listed:
            label += "'"
        listed[label] = make("policy", spec, f"evaluate.policies[{i}]", ctx)
    objectives = {n: make("objective", spec, f"stages.{n}.objective", ctx) for n, (spec, _) in s.stages.items()}
    return {
        "task": task,
        "model": model,
        "objectives": objectives,
        "policy": None if raw.get("policy") is None else make("policy", raw["policy"], "policy", ctx),
        "listed": listed,
        "grid": None if s.ablate is None else grid_policies(s.ablate, ctx, make, objectives, check_only),
    }


def _experiment(raw: dict[str, Any], stem: str, s: _Settings, built: dict[str, Any]) -> Experiment:
    """The built components assembled: on the run's device, stages with their files, the
    evaluation policies (the stages' learned ones last), the resolved config."""
    device = resolve_device(s.run.device)
    run_files = ckpt.RunFiles(Path(s.run.dir) / (s.run.name or stem))
    stages: dict[str, Stage] = {}
    for name, objective in built["objectives"].items():
        objective = objective.to(device)
        if not objective.trains_model and not any(p.requires_grad for p in objective.parameters()):  # before any work
            raise ConfigError(f"stages.{name}.objective", f"nothing to train: {type(objective).__name__} has "
                                                          "trains_model=False and no parameters of its own")
        stages[name] = Stage(name, objective, s.stages[name][1], run_files.stage(name))
    listed, policy = built["listed"], built["policy"]
    policies = dict(listed) if s.evaluate.policies is not None else {policy_label(raw["policy"]): policy}
    for name, stage in stages.items():
        learned = stage.objective.policy  # the Objective contract: None, or the policy it learns
        if isinstance(learned, Policy):
            label = learned_label(name, s.stages[name][0])
            if label in policies:
                raise ConfigError(f"stages.{name}", f"the stage's learned policy would be labelled {label!r}, as an "
                                                    "evaluate policy is: rename the stage")
            policies[label] = learned
    full = {"task": raw["task"], "model": raw["model"],
            "stages": {n: {"objective": spec, "train": asdict(train)} for n, (spec, train) in s.stages.items()},
            "evaluate": asdict(s.evaluate), "run": asdict(s.run)}
    if raw.get("policy") is not None:
        full["policy"] = raw["policy"]
    if s.ablate is not None:
        full["ablate"] = s.ablate.spec()
    return Experiment(
        config=OmegaConf.create(full),
        task=built["task"],
        model=built["model"].to(device),
        stages=stages,
        policy=policy if policy is not None else next(iter(listed.values())),
        evaluate=s.evaluate,
        run=s.run,
        run_dir=run_files.dir,
        policies=policies,
        device=device,
        ablation=None if s.ablate is None else Ablation(s.ablate, built["grid"]),
    )


def _ablate_settings(raw: Any) -> AblateConfig:
    if isinstance(raw, Mapping) and "grid" not in raw:
        registry.build_settings(AblateConfig, {"grid": ["l2r"], **raw}, "ablate")  # typos before a missing grid
        raise ConfigError("ablate.grid", "missing: the list of policy specs to evaluate (list values expand)")
    return registry.build_settings(AblateConfig, raw, "ablate")


def load(
    source: str | Path | Mapping[str, Any] | DictConfig, overrides: Sequence[str] = ()
) -> Experiment:
    """Read a YAML experiment (or a mapping), apply ``key=value`` overrides, check every
    key of every section and component, then build (the same walk twice).

    The model is initialised from the first stage's ``train.seed`` (0 without stages;
    inside a forked RNG: the global torch RNG is left as it was), loaded from
    ``model.checkpoint`` when given, and moved to ``run.device``.
    """
    cfg, stem = _read(source, overrides)
    raw = _resolve(cfg)
    _sections(raw)
    settings = _Settings.read(raw)
    _walk(raw, settings, check_only=True)  # every key of every component, nothing built
    return _experiment(raw, stem, settings, _walk(raw, settings, check_only=False))
