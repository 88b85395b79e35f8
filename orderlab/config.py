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
    run:       {dir: runs, name: null, device: auto, resume: false}        # RunConfig fields
    ablate:    {grid: [{name: threshold, tau: [0.5, 0.9]}], seeds: [0, 1]}  # optional: AblateConfig fields

A stage has exactly the keys ``objective`` (required) and ``train`` (optional, every
field defaulted). ``stages: {}`` trains nothing (evaluate the model as built or loaded).
The model and the task's size are the task's: ``model.vocab_size`` / ``model.max_len``
are errors. ``model.checkpoint`` is a checkpoint file, a stage folder or a run folder
(``orderlab.checkpoint.resolve``); its final (EMA) weights are loaded into the model.
A component whose constructor takes ``task`` gets the built task (a policy-gradient
objective scores samples with ``task.score``); one that takes ``token_freqs`` gets the
task's token frequencies unless the YAML gives them.

Loading is two passes: first every key of every section and component is checked
against its constructor (``registry.check``, recursively into nested components), so a
typo in ``evaluate.policies[1]`` (or in any point of the ``ablate`` grid,
``ablate.grid[2].gama``) is reported before a model is built; then everything is built
(the grid's policies too: one per point and seed, ``orderlab.ablate``). Errors are
:class:`~orderlab.registry.ConfigError` naming the key path and, for a typo, the
nearest valid key. ``load`` creates no folder and loads no weights
other than ``model.checkpoint`` (the run's own checkpoints: :meth:`Experiment.restore`).
"""

from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from orderlab import checkpoint as ckpt
from orderlab import registry
from orderlab.ablate import AblateConfig, Ablation
from orderlab.evaluate import EvaluateConfig
from orderlab.registry import ConfigError
from orderlab.runtime import derive_seed, resolve_device
from orderlab.train import TrainConfig

__all__ = ["load", "Experiment", "Stage", "RunConfig", "SECTIONS", "policy_label"]


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
                raise ConfigError("run.device", f"not a torch device: {e}") from None


SECTIONS = ("task", "model", "stages", "policy", "evaluate", "run", "ablate")
_STAGE_KEYS = ("objective", "train")
_FROM_TASK = {"vocab_size": "task.vocab_size", "max_len": "task.seq_len"}  # model keys the task sets
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

    ``stages`` in training order. ``policy`` is the decode policy; ``policies`` the
    evaluation policies by label: ``evaluate.policies`` (or just ``policy`` when that is
    null), then the policy every stage learned (a stage whose objective has a ``policy``
    attribute that is an ``nn.Module``), labelled with the stage's name.
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


# --------------------------------------------------------------------------- checking


def _needs(cls: Any, arg: str) -> bool:
    """Whether the constructor of ``cls`` takes an argument named ``arg``."""
    try:
        return arg in inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return False


def _injections(cls: Any, args: Mapping[str, Any], path: str, task: Any = None, freqs: Any = None) -> dict[str, Any]:
    """What the builder adds to a component's arguments: ``task`` (always the experiment's;
    a YAML value is an error) and ``token_freqs`` (unless the YAML gives them).
    ``freqs`` is a callable giving the task's frequencies (None: a placeholder)."""
    extra: dict[str, Any] = {}
    if _needs(cls, "task"):
        if "task" in args:
            raise ConfigError(f"{path}.task", "is set by the experiment (its built task section); remove this key")
        extra["task"] = task
    if _needs(cls, "token_freqs") and "token_freqs" not in args:
        extra["token_freqs"] = freqs() if freqs is not None else None
    return extra


def check_component(kind: str, spec: Any, path: str, **inject: Any) -> Any:
    """Check a component spec (and its nested components) without building anything.

    ``inject`` holds the arguments the builder will add besides ``task`` and
    ``token_freqs`` (see :func:`_injections`). Returns the component class.
    """
    if not isinstance(spec, (str, Mapping)):
        raise ConfigError(path, f"expected a {kind} name or a mapping with 'name'/'_target_', got {type(spec).__name__}")
    cls, args = registry.split(kind, spec, path)
    return registry.check_spec(kind, spec, path, **{**_injections(cls, args, path), **inject})


def _settings(cls: type, path: str, values: Any) -> Any:
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise ConfigError(path, f"must be a mapping of {cls.__name__} keys, got {type(values).__name__}")
    registry.check(cls, values, path)
    try:
        return cls(**values)
    except ConfigError as e:  # range checks name "train.<key>": say which stage
        if path != e.path.split(".")[0]:
            raise ConfigError(f"{path}.{e.path.split('.', 1)[-1]}", str(e).split(": ", 1)[-1]) from None
        raise


def _check_model(spec: Any) -> tuple[Any, str | None]:
    """The model spec without ``checkpoint``, and that checkpoint (checked to exist)."""
    if not isinstance(spec, Mapping):
        check_component("model", spec, "model", vocab_size=1, max_len=1)
        return spec, None
    spec = dict(spec)
    for key, source in _FROM_TASK.items():
        if key in spec:
            raise ConfigError(f"model.{key}", f"is set by the task ({source}); remove this key")
    path = spec.pop("checkpoint", None)
    if path is not None:
        try:
            ckpt.resolve(path)
        except ckpt.CheckpointError as e:
            raise ConfigError("model.checkpoint", str(e)) from None
    check_component("model", spec, "model", vocab_size=1, max_len=1)
    return spec, path


def _check_stages(raw: Any) -> dict[str, tuple[Any, TrainConfig]]:
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
        check_component("objective", stage["objective"], f"{path}.objective")
        stages[str(name)] = (stage["objective"], _settings(TrainConfig, f"{path}.train", stage.get("train")))
    return stages


def _check_ablate(raw: Any) -> AblateConfig | None:
    """The ``ablate`` section (None when absent) with every grid point's policy checked."""
    if raw is None:
        return None
    if isinstance(raw, Mapping):
        registry.check(AblateConfig, {"grid": [], **raw}, "ablate")  # typos before a missing grid
        if "grid" not in raw:
            raise ConfigError("ablate.grid", "missing: the list of policy specs to evaluate (list values expand)")
    cfg = _settings(AblateConfig, "ablate", raw)
    for point in cfg.points:
        check_component("policy", dict(point.spec), f"ablate.grid[{point.entry}]")
    return cfg


def _check(raw: dict[str, Any]) -> tuple[Any, str | None, dict[str, tuple[Any, TrainConfig]], EvaluateConfig, RunConfig,
                                         AblateConfig | None]:
    """The check pass: every key of every section, nothing built."""
    for key in raw:
        if key in ("objective", "train"):
            raise ConfigError(key, f"'{key}' belongs to a stage: stages: {{<name>: {{objective: ..., train: ...}}}}")
        if key not in SECTIONS:
            close = difflib.get_close_matches(key, SECTIONS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(key, f"unknown section{hint} (valid sections: {', '.join(SECTIONS)})")
    for section in ("task", "model", "stages", "policy"):
        if raw.get(section) is None:
            raise ConfigError(section, "missing section")
    evaluate = _settings(EvaluateConfig, "evaluate", raw.get("evaluate"))
    run = _settings(RunConfig, "run", raw.get("run"))
    check_component("task", raw["task"], "task")
    model, model_ckpt = _check_model(raw["model"])
    stages = _check_stages(raw["stages"])
    check_component("policy", raw["policy"], "policy")
    for i, spec in enumerate(evaluate.policies or []):
        check_component("policy", spec, f"evaluate.policies[{i}]")
    return model, model_ckpt, stages, evaluate, run, _check_ablate(raw.get("ablate"))


# --------------------------------------------------------------------------- building


def policy_label(spec: Any) -> str:
    """A short readable label of a policy spec: ``"l2r"``, ``"threshold(tau=0.9)"``."""
    if isinstance(spec, str):
        return spec.rsplit(".", 1)[-1]
    d = dict(spec)
    head = str(d.pop("name", None) or d.pop("_target_", "policy")).rsplit(".", 1)[-1]
    d.pop("_target_", None)
    args = ", ".join(f"{k}={policy_label(v) if isinstance(v, Mapping) else v}" for k, v in d.items())
    return f"{head}({args})" if args else head


class _Freqs:
    """The task's token frequencies, computed once on first use."""

    def __init__(self, task: Any):
        self.task, self.value = task, None

    def __call__(self) -> Any:
        if self.value is None:
            self.value = self.task.token_freqs()
        return self.value


def _build(kind: str, spec: Any, path: str, task: Any, freqs: _Freqs) -> Any:
    cls, args = registry.split(kind, spec, path)
    return registry.build(kind, spec, path=path, **_injections(cls, args, path, task, freqs))


def _build_ablation(cfg: AblateConfig, task: Any, freqs: _Freqs) -> Ablation:
    """A policy per (grid point, seed): a policy taking ``seed`` that its entry leaves
    unset gets the run's seed; any other is built once and shared by the seeds."""
    policies: dict[tuple[int, int], Any] = {}
    for point in cfg.points:
        path = f"ablate.grid[{point.entry}]"
        spec = dict(point.spec)
        cls, _ = registry.split("policy", spec, path)
        if _needs(cls, "seed") and "seed" not in spec:
            for s in cfg.seeds:
                policies[point.index, s] = _build("policy", {**spec, "seed": s}, path, task, freqs)
        else:
            shared = _build("policy", spec, path, task, freqs)
            policies.update({(point.index, s): shared for s in cfg.seeds})
    return Ablation(cfg, policies)



def load(
    source: str | Path | Mapping[str, Any] | DictConfig, overrides: Sequence[str] = ()
) -> Experiment:
    """Read a YAML experiment (or a mapping), apply ``key=value`` overrides, check, build.

    The model is initialised from the first stage's ``train.seed`` (0 without stages;
    inside a forked RNG: the global torch RNG is left as it was), loaded from
    ``model.checkpoint`` when given, and moved to ``run.device``.
    """
    cfg, stem = _read(source, overrides)
    raw = _resolve(cfg)
    model_spec, model_ckpt, stage_specs, evaluate, run, ablate = _check(raw)
    run_files = ckpt.RunFiles(Path(run.dir) / (run.name or stem))

    task = registry.build("task", raw["task"], path="task")
    freqs = _Freqs(task)
    device = resolve_device(run.device)
    seed = next(iter(stage_specs.values()))[1].seed if stage_specs else 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, 0, "init"))
        model = registry.build("model", model_spec, path="model", vocab_size=task.vocab_size, max_len=task.seq_len)
    if model_ckpt is not None:
        try:
            ckpt.restore_final(ckpt.resolve(model_ckpt), model)
        except ckpt.CheckpointError as e:
            raise ConfigError("model.checkpoint", str(e)) from None
    model = model.to(device)

    stages: dict[str, Stage] = {}
    for name, (spec, train) in stage_specs.items():
        objective = _build("objective", spec, f"stages.{name}.objective", task, freqs)
        if isinstance(objective, torch.nn.Module):
            objective = objective.to(device)
        if not getattr(objective, "trains_model", True) and not any(p.requires_grad for p in objective.parameters()):
            raise ConfigError(f"stages.{name}.objective", f"nothing to train: {type(objective).__name__} has "
                                                          "trains_model=False and no parameters of its own")
        stages[name] = Stage(name, objective, train, run_files.stage(name))

    policy = _build("policy", raw["policy"], "policy", task, freqs)
    policies: dict[str, Any] = {}
    if evaluate.policies is None:
        policies[policy_label(raw["policy"])] = policy
    for i, spec in enumerate(evaluate.policies or []):
        label = policy_label(spec)
        while label in policies:
            label += "'"
        policies[label] = _build("policy", spec, f"evaluate.policies[{i}]", task, freqs)
    for stage in stages.values():
        learned = getattr(stage.objective, "policy", None)
        if isinstance(learned, torch.nn.Module):
            if stage.name in policies:
                raise ConfigError(f"stages.{stage.name}", f"the stage's learned policy would be labelled "
                                                          f"{stage.name!r}, as an evaluate policy is: rename the stage")
            policies[stage.name] = learned

    ablation = _build_ablation(ablate, task, freqs) if ablate is not None else None

    full = {"task": raw["task"], "model": raw["model"],
            "stages": {n: {"objective": s[0], "train": asdict(s[1])} for n, s in stage_specs.items()},
            "policy": raw["policy"], "evaluate": asdict(evaluate), "run": asdict(run)}
    if ablate is not None:
        full["ablate"] = ablate.spec()
    return Experiment(
        config=OmegaConf.create(full),
        task=task,
        model=model,
        stages=stages,
        policy=policy,
        evaluate=evaluate,
        run=run,
        run_dir=run_files.dir,
        policies=policies,
        device=device,
        ablation=ablation,
    )
