"""Experiments from YAML: ``orderlab.load(path, overrides) -> Experiment``.

The only module (with run.py) that sees a whole config (DESIGN.md section 9.4). Layout::

    task:      {name: addition, digits: 3}
    model:     {name: transformer, d_model: 128, n_layers: 4, n_heads: 4, attention: {name: set_causal}}
    objective: {name: set_nll, process: {name: staggered, d: 2}}
    policy:    {name: l2r}                       # the decode policy
    train:     {steps: 1000, batch_size: 64, lr: 1.0e-3, ...}     # TrainConfig fields
    evaluate:  {policies: [l2r, {name: threshold, tau: 0.9}], ...} # EvaluateConfig fields
    run:       {dir: runs, name: null, device: auto}              # RunConfig fields

Loading is two passes: first every key of every section and component is checked
against its constructor (``registry.check``, recursively into nested components), so a
typo in ``evaluate.policies[1]`` is reported before a model is built; then everything
is built. Errors are :class:`~orderlab.registry.ConfigError` naming the key path and,
for a typo, the nearest valid key. ``load`` has no side effects: it creates no folder
and loads no weights (see :meth:`Experiment.restore`).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from orderlab import registry
from orderlab.evaluate import EvaluateConfig
from orderlab.registry import ConfigError
from orderlab.train import CHECKPOINT, TrainConfig, derive_seed, load_checkpoint

__all__ = ["load", "Experiment", "RunConfig", "SECTIONS", "policy_label"]


@dataclass
class RunConfig:
    """The ``run:`` section: where the run folder lives and what it runs on."""

    dir: str = "runs"
    name: str | None = None  # null: the YAML file's stem
    device: str = "auto"  # "auto": cuda when available, else cpu

    def __post_init__(self) -> None:
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as e:
                raise ConfigError("run.device", f"not a torch device: {e}") from None


# section -> component kind (built by the registry) or settings dataclass
_COMPONENTS = {"task": "task", "model": "model", "objective": "objective", "policy": "policy"}
_SETTINGS: dict[str, type] = {"train": TrainConfig, "evaluate": EvaluateConfig, "run": RunConfig}
SECTIONS = (*_COMPONENTS, *_SETTINGS)


@dataclass
class Experiment:
    """Everything an experiment needs, built from one config.

    ``policy`` is the decode policy; ``policies`` the evaluation policies by label
    (``evaluate.policies``, or just ``policy`` when that is null).
    """

    config: DictConfig  # resolved, with every default filled in
    task: Any
    model: torch.nn.Module
    objective: Any
    policy: Any
    train: TrainConfig
    evaluate: EvaluateConfig
    run: RunConfig
    run_dir: Path
    policies: dict[str, Any] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def process(self) -> Any:
        """The objective's forward process (the training order distribution)."""
        return self.objective.process

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / CHECKPOINT

    def restore(self, checkpoint: str | Path | None = None, ema: bool = True) -> int:
        """Load weights from ``checkpoint`` (default: the run folder's) into ``model``.

        With ``ema`` and an EMA in the checkpoint, loads the averaged weights (the ones
        evaluated). Returns the checkpoint's step.
        """
        path = Path(checkpoint) if checkpoint is not None else self.checkpoint_path
        if not path.exists():
            raise FileNotFoundError(f"no checkpoint at {path}")
        state = load_checkpoint(path, map_location=self.device)
        weights = state["ema"]["shadow"] if ema and state.get("ema") is not None else state["model"]
        self.model.load_state_dict(weights)
        if state.get("objective") is not None and isinstance(self.objective, torch.nn.Module):
            self.objective.load_state_dict(state["objective"])
        return int(state["step"])


# --------------------------------------------------------------------------- reading


def _read(source: str | Path | Mapping[str, Any] | DictConfig, overrides: Sequence[str]) -> tuple[DictConfig, str]:
    """The merged config and the run name fallback (the YAML stem)."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ConfigError("", f"config file {str(path)!r} not found")
        try:
            cfg = OmegaConf.load(path)
        except Exception as e:  # yaml syntax errors
            raise ConfigError("", f"cannot read {str(path)!r}: {e}") from None
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
        except OmegaConfBaseException as e:
            raise ConfigError(key, f"bad override {item!r}: {e}") from None
        try:
            # a mapping value replaces the node (``task={name: text}`` swaps the component
            # and drops the old one's keys); a scalar or list value is set as usual
            OmegaConf.update(cfg, key, OmegaConf.select(dot, key), merge=False)
        except OmegaConfBaseException as e:
            raise ConfigError(key, f"cannot apply override {item!r}: {e}") from None
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


def check_component(kind: str, spec: Any, path: str, **inject: Any) -> Any:
    """Check a component spec (and its nested components) without building anything.

    ``inject`` holds the arguments the builder will add; a policy that takes
    ``token_freqs`` gets them from the task at build time. Returns the component class.
    """
    if not isinstance(spec, (str, Mapping)):
        raise ConfigError(path, f"expected a {kind} name or a mapping with 'name'/'_target_', got {type(spec).__name__}")
    cls, args = registry.split(kind, spec, path)
    if _needs(cls, "token_freqs") and "token_freqs" not in args:
        inject = {**inject, "token_freqs": None}
    return registry.check_spec(kind, spec, path, **inject)


def _settings(section: str, values: Any) -> Any:
    cls = _SETTINGS[section]
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise ConfigError(section, f"must be a mapping of {cls.__name__} keys, got {type(values).__name__}")
    registry.check(cls, values, section)
    return cls(**values)


def _check(raw: dict[str, Any]) -> tuple[TrainConfig, EvaluateConfig, RunConfig]:
    """The check pass: every key of every section, nothing built."""
    for key in raw:
        if key not in SECTIONS:
            close = difflib.get_close_matches(key, SECTIONS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(key, f"unknown section{hint} (valid sections: {', '.join(SECTIONS)})")
    for section in _COMPONENTS:
        if raw.get(section) is None:
            raise ConfigError(section, "missing section")
    train = _settings("train", raw.get("train"))
    evaluate = _settings("evaluate", raw.get("evaluate"))
    run = _settings("run", raw.get("run"))
    check_component("task", raw["task"], "task")
    check_component("model", raw["model"], "model", vocab_size=1, max_len=1)
    check_component("objective", raw["objective"], "objective")
    check_component("policy", raw["policy"], "policy")
    for i, spec in enumerate(evaluate.policies or []):
        check_component("policy", spec, f"evaluate.policies[{i}]")
    return train, evaluate, run


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


def _build_policy(spec: Any, path: str, task: Any, freqs: dict[str, Any]) -> Any:
    cls, args = registry.split("policy", spec, path)
    extra = {}
    if _needs(cls, "token_freqs") and "token_freqs" not in args:
        if "value" not in freqs:
            freqs["value"] = task.token_freqs()
        extra["token_freqs"] = freqs["value"]
    return registry.build("policy", spec, path=path, **extra)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load(
    source: str | Path | Mapping[str, Any] | DictConfig, overrides: Sequence[str] = ()
) -> Experiment:
    """Read a YAML experiment (or a mapping), apply ``key=value`` overrides, check, build.

    The model is initialised from ``train.seed`` (inside a forked RNG: the global torch
    RNG is left as it was) and moved to ``run.device``.
    """
    cfg, stem = _read(source, overrides)
    raw = _resolve(cfg)
    train, evaluate, run = _check(raw)

    task = registry.build("task", raw["task"], path="task")
    device = _device(run.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(train.seed, 0, "init"))
        model = registry.build("model", raw["model"], path="model", vocab_size=task.vocab_size, max_len=task.seq_len)
    model = model.to(device)
    objective = registry.build("objective", raw["objective"], path="objective")
    if isinstance(objective, torch.nn.Module):
        objective = objective.to(device)
    freqs: dict[str, Any] = {}
    policy = _build_policy(raw["policy"], "policy", task, freqs)
    policies: dict[str, Any] = {}
    if evaluate.policies is None:
        policies[policy_label(raw["policy"])] = policy
    for i, spec in enumerate(evaluate.policies or []):
        label = policy_label(spec)
        while label in policies:
            label += "'"
        policies[label] = _build_policy(spec, f"evaluate.policies[{i}]", task, freqs)

    full = {key: raw[key] for key in _COMPONENTS}
    full.update(train=asdict(train), evaluate=asdict(evaluate), run=asdict(run))
    run_dir = Path(run.dir) / (run.name or stem)
    return Experiment(
        config=OmegaConf.create(full),
        task=task,
        model=model,
        objective=objective,
        policy=policy,
        train=train,
        evaluate=evaluate,
        run=run,
        run_dir=run_dir,
        policies=policies,
        device=device,
    )

