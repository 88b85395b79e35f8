"""The ``--model_args`` of the ``orderlab`` lm-eval model, checked before any work.

lm-eval hands a model its ``--model_args`` as keyword arguments (``key=value`` pairs, values
parsed as Python literals), plus ``batch_size``, ``max_batch_size`` and ``device`` from its
own flags. :meth:`ModelArgs.parse` turns them into one settings object: every key is known
or an error naming it (``model_args.polcy: unknown key; did you mean 'policy'?``), and the
knobs of the decode policy and of the scoring order come as dotted keys
(``policy.tau=0.9``, ``order.samples=64``), so ``--model_args`` stays one flat list.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from orderlab.evaluate import decode_cache
from orderlab.registry import ConfigError

__all__ = ["ModelArgs", "KNOB_PREFIXES"]

KNOB_PREFIXES = ("policy", "order")  # ``policy.<knob>``, ``order.<knob>``


def _key(name: str) -> str:
    return f"model_args.{name}"


@dataclass
class ModelArgs:
    """Every model argument (README "Evaluating with lm-evaluation-harness").

    Source (exactly one of ``run`` / ``path``, unless the model is built from an experiment
    in memory): ``run`` an orderlab run folder (its ``config.yaml`` and checkpoints),
    ``path`` a pretrained Hugging Face folder (``family``, ``dtype``, ``attention``,
    ``max_len`` go to ``from_pretrained``); ``tokenizer`` a tokenizer folder (default: the
    pretrained folder, or the run's task tokenizer).

    Decoding (``generate_until``): ``policy`` a registered policy name, a dotted class path,
    or the name of a run stage that learned a policy (None: the run's decode policy, else
    ``l2r``), with its knobs as ``policy.<knob>=...``; ``cache`` as ``evaluate.cache``;
    ``max_gen_toks`` overrides the task's generation length (diffusion decoders fill a
    fixed canvas); ``temperature`` / ``top_p`` are the task's ``gen_kwargs``.

    Scoring (``loglikelihood``, ``loglikelihood_rolling``): ``order`` a name of
    :data:`orderlab.harness.scorers.SCORERS` or a dotted path to a ``Scorer`` subclass,
    its knobs as ``order.<knob>=...``.

    ``batch_size`` rows per forward batch; ``seed`` seeds every batch's draws;
    ``progress`` shows a progress bar; ``add_special_tokens`` encodes contexts with the
    tokenizer's post-processor (as ``JsonlTask`` prompts are; off for chat-templated text).
    """

    run: str | None = None
    path: str | None = None
    tokenizer: str | None = None
    family: str | None = None
    dtype: str = "auto"
    attention: Any = None
    max_len: int | None = None
    device: str | None = None
    policy: Any = None
    order: str = "l2r"
    cache: bool | str = True
    max_gen_toks: int | None = None
    batch_size: int = 8
    max_batch_size: int | None = None  # lm-eval passes it; batches here are batch_size rows
    seed: int = 0
    progress: bool = True
    add_special_tokens: bool = True
    policy_knobs: dict[str, Any] = field(default_factory=dict)
    order_knobs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls) if not f.name.endswith("_knobs")]

    @classmethod
    def parse(cls, given: Mapping[str, Any], source_given: bool = False) -> "ModelArgs":
        """The settings of ``given`` (lm-eval's keyword arguments). ``source_given``: the
        model comes from an experiment in memory (``run``/``path`` must be absent)."""
        plain: dict[str, Any] = {}
        knobs: dict[str, dict[str, Any]] = {p: {} for p in KNOB_PREFIXES}
        for key, value in given.items():
            prefix, dot, knob = str(key).partition(".")
            if dot and prefix in knobs and knob:
                knobs[prefix][knob] = value
            elif key in cls.names():
                plain[key] = value
            else:
                close = difflib.get_close_matches(str(key), cls.names(), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(_key(str(key)), f"unknown key{hint} (valid: {', '.join(cls.names())}, "
                                                  "policy.<knob>, order.<knob>)")
        args = cls(**plain, policy_knobs=knobs["policy"], order_knobs=knobs["order"])
        args._check(source_given)
        return args

    def _check(self, source_given: bool) -> None:
        chosen = [k for k in ("run", "path") if getattr(self, k) is not None]
        if source_given and chosen:
            raise ConfigError(_key(chosen[0]), "the model is the experiment's own here; leave run/path out")
        if not source_given and len(chosen) != 1:
            raise ConfigError(_key("run" if not chosen else "path"),
                              "give exactly one model source: run=<orderlab run folder> or path=<pretrained folder>")
        if self.run is not None:
            for k in ("family", "attention", "max_len"):
                if getattr(self, k) is not None:
                    raise ConfigError(_key(k), "applies to path=<pretrained folder> only (a run's model is its config's)")
        self.batch_size = self._int("batch_size", self.batch_size, 1)
        if self.max_gen_toks is not None:
            self.max_gen_toks = self._int("max_gen_toks", self.max_gen_toks, 1)
        self.seed = self._int("seed", self.seed, 0)
        if self.max_len is not None:
            self.max_len = self._int("max_len", self.max_len, 1)
        if isinstance(self.cache, str) and self.cache.lower() in ("true", "false"):
            self.cache = self.cache.lower() == "true"
        decode_cache(self.cache, _key("cache"))
        if self.policy is not None and not isinstance(self.policy, (str, Mapping)):
            raise ConfigError(_key("policy"), f"a policy name or dotted class path, got {self.policy!r}")
        if self.policy_knobs and self.policy is None:
            raise ConfigError(_key(f"policy.{next(iter(self.policy_knobs))}"), "knobs need a policy=<name>")
        if not isinstance(self.order, str):
            raise ConfigError(_key("order"), f"a scorer name or dotted class path, got {self.order!r}")

    @staticmethod
    def _int(name: str, value: Any, low: int) -> int:
        """``value`` as an integer >= ``low`` (lm-eval passes ``--batch_size`` as text)."""
        try:
            n = int(str(value))
        except ValueError:
            raise ConfigError(_key(name), f"must be an integer >= {low}, got {value!r}"
                              + (" (automatic batch sizes are not supported)" if str(value).startswith("auto") else ""))
        if n < low:
            raise ConfigError(_key(name), f"must be an integer >= {low}, got {value!r}")
        return n
