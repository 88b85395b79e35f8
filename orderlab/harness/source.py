"""Where the harness's model comes from: an orderlab run folder, a pretrained folder, or an
experiment in memory (``orderlab.run``'s ``evaluate.lm_eval`` step), and which policy decodes.

A :class:`Source` is what every request needs: the model (eval mode, on its device), a text
tokenizer (lm-eval sends text), the policies the source names (a run's evaluation policies
and the policies its stages learned, by label and by stage name), its default decode
policy, and the order distributions a stage learned (``vi_orders``: ``π_ψ``, ``q_φ``) for
the IWAE scorer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from orderlab.builder import ConfigError, build
from orderlab.runtime import resolve_device
from orderlab.tokenizer import Tokenizer, TokenizerError
from orderlab.weights import WeightsError

from .args import ModelArgs

__all__ = ["Source", "load_source", "resolve_policy"]


@dataclass
class Source:
    """A model ready for requests (module docstring). ``label``: what it is, for results."""

    model: nn.Module
    tokenizer: Tokenizer
    label: str
    default_policy: Any = None  # None: l2r
    policies: dict[str, Any] = field(default_factory=dict)  # name -> built policy (a run's)
    orders: tuple[Any, Any] | None = None  # (prior, proposal) learned by a stage, or None


def _tokenizer(folder: str | Path, key: str) -> Tokenizer:
    try:
        return Tokenizer.from_folder(folder)
    except (TokenizerError, OSError) as e:
        raise ConfigError(key, " ".join(str(e).split())) from None


def _fits(tok: Tokenizer, model: nn.Module, key: str) -> Tokenizer:
    if tok.vocab_size > model.vocab_size:
        raise ConfigError(key, f"the tokenizer has {tok.vocab_size} ids, more than the model's {model.vocab_size} tokens")
    return tok


def _run_tokenizer(exp: Any, args: ModelArgs | None, where: str) -> Tokenizer:
    """The run task's tokenizer (a ``jsonl`` task has one), or ``tokenizer=``; a toy task
    without one is an error: lm-eval sends text, the toy task's ids are its own."""
    if args is not None and args.tokenizer is not None:
        return _fits(_tokenizer(args.tokenizer, "model_args.tokenizer"), exp.model, "model_args.tokenizer")
    tok = getattr(exp.task, "tokenizer", None)
    if isinstance(tok, Tokenizer):
        return tok
    raise ConfigError("model_args.tokenizer", f"{where}: its task {exp.task!r} has no text tokenizer, and lm-eval "
                                              "sends text; pass tokenizer=<Hugging Face tokenizer folder> whose ids "
                                              "are the model's tokens (a toy task's vocabulary is its own)")


def _stage_policies(exp: Any) -> dict[str, Any]:
    """The run's policies by evaluation label, and each learned one also by its stage name."""
    from orderlab.policies.base import Policy

    named = dict(exp.policies)
    for name, stage in exp.stages.items():
        if isinstance(getattr(stage.objective, "policy", None), Policy):
            named.setdefault(name, stage.objective.policy)
    return named


def _learned_orders(exp: Any) -> tuple[Any, Any] | None:
    """``(prior, proposal)`` of the last stage whose objective learned orders (as
    ``orderlab.run`` picks them for the likelihood table), else None."""
    for stage in reversed(list(exp.stages.values())):
        orders = stage.objective.orders(exp.model)
        if orders is not None:
            return orders
    return None


def from_experiment(exp: Any, args: ModelArgs | None = None, label: str | None = None) -> Source:
    """A built (and restored) :class:`~orderlab.config.Experiment` as a source."""
    for policy in exp.policies.values():
        if isinstance(policy, nn.Module):
            policy.eval()
    exp.model.eval()
    return Source(exp.model, _run_tokenizer(exp, args, label or str(exp.run_dir)), label or f"run {exp.run_dir}",
                  exp.policy, _stage_policies(exp), _learned_orders(exp))


def _from_run(args: ModelArgs, device: str) -> Source:
    """``run=<folder>``: the run's resolved ``config.yaml`` rebuilt (``orderlab.load``) with
    the folder as its run folder, and its stages' final (EMA) checkpoints restored."""
    from orderlab.checkpoint import CheckpointError
    from orderlab.config import load

    folder = Path(args.run)
    if not (folder / "config.yaml").is_file():
        raise ConfigError("model_args.run", f"{folder} is not a run folder (no config.yaml)")
    overrides = [f"run.dir={folder.parent.resolve()}", f"run.name={folder.name}", f"run.device={device}",
                 "run.resume=false", "run.overwrite=false"]
    exp = load(folder / "config.yaml", overrides)
    try:
        restored = exp.restore(ema=True)
    except CheckpointError as e:
        raise ConfigError("model_args.run", " ".join(str(e).split())) from None
    missing = [s.name for s in exp.stages.values() if s.train.steps > 0 and s.name not in restored]
    if missing:
        raise ConfigError("model_args.run", f"{folder}: stage {missing[0]!r} has no checkpoint (train it first)")
    return from_experiment(exp, args, f"run {folder}")


def _from_pretrained(args: ModelArgs, device: str) -> Source:
    """``path=<folder>``: ``from_pretrained`` with the folder's tokenizer (or ``tokenizer=``)."""
    from orderlab.pretrained import from_pretrained

    try:
        model = from_pretrained(args.path, family=args.family, dtype=args.dtype, attention=args.attention,
                                device=device, max_len=args.max_len)
    except (WeightsError, ValueError, OSError) as e:
        if isinstance(e, ConfigError):
            raise ConfigError(f"model_args.{e.path}" if e.path else "model_args.path", e.message) from None
        raise ConfigError("model_args.path", " ".join(str(e).split())) from None
    key = "model_args.tokenizer" if args.tokenizer is not None else "model_args.path"
    tok = _fits(_tokenizer(args.tokenizer or args.path, key), model, key)
    return Source(model.eval(), tok, f"pretrained {args.path}")


def load_source(args: ModelArgs) -> Source:
    """The source ``args`` name (``run`` or ``path``), on ``args.device`` (None: auto)."""
    device = str(resolve_device(args.device or "auto"))
    return _from_run(args, device) if args.run is not None else _from_pretrained(args, device)


def resolve_policy(args: ModelArgs, source: Source) -> Any:
    """The decode policy: ``policy=`` a name the source offers (a run's evaluation label or a
    stage that learned a policy), else a registered name / dotted class path built with its
    ``policy.<knob>`` values; without ``policy``: the source's default, else ``l2r``."""
    spec, knobs = args.policy, args.policy_knobs
    if spec is None:
        return source.default_policy if source.default_policy is not None else build("policy", "l2r")
    if isinstance(spec, str) and spec in source.policies:
        if knobs:
            raise ConfigError(f"model_args.policy.{next(iter(knobs))}", f"{spec!r} is the run's built policy; "
                                                                        "it takes no knobs")
        return source.policies[spec]
    if isinstance(spec, str) and knobs:
        spec = {("_target_" if "." in spec else "name"): spec}
    policy = build("policy", {**spec, **knobs} if knobs else spec, path="model_args.policy")
    if isinstance(policy, nn.Module):
        policy.eval()
    return policy
