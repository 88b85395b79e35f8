"""``evaluate.lm_eval``: lm-eval tasks as an evaluation step of ``orderlab.run``.

The experiment's own model, tokenizer (its ``jsonl`` task's) and decode policy go to
``lm_eval.simple_evaluate`` as an :class:`~orderlab.harness.OrderlabLM`; what comes back
(per-task metrics, sample counts, versions, the model's info and NFE) is the JSON-safe part
stored under ``results.json``'s ``lm_eval``.
"""

from __future__ import annotations

import json
from typing import Any

from .lm import OrderlabLM

__all__ = ["evaluate_experiment"]

_KEPT = ("results", "groups", "n-samples", "versions", "higher_is_better")


def _json_safe(value: Any) -> Any:
    from lm_eval.utils import handle_non_serializable

    return json.loads(json.dumps(value, default=handle_non_serializable))


def evaluate_experiment(exp: Any, cfg: Any) -> dict[str, Any]:
    """Run ``cfg`` (:class:`orderlab.evaluate.LMEvalConfig`) on ``exp``'s model; returns
    ``{"tasks": per-task metrics, "groups", "n_samples", "versions", "higher_is_better",
    "model": OrderlabLM.info(), "settings": cfg}``."""
    from dataclasses import asdict

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    lm = OrderlabLM.from_experiment(exp, batch_size=cfg.batch_size, seed=cfg.seed, progress=False, **cfg.model_args)
    manager = TaskManager(include_path=cfg.include_path, include_defaults=cfg.include_defaults)
    out = simple_evaluate(model=lm, tasks=list(cfg.tasks), num_fewshot=cfg.num_fewshot, limit=cfg.limit,
                          task_manager=manager, apply_chat_template=cfg.apply_chat_template, log_samples=False,
                          random_seed=cfg.seed, numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed,
                          fewshot_random_seed=cfg.seed)
    kept = _json_safe({k: out.get(k) for k in _KEPT if k in out})
    return {"tasks": kept.get("results", {}), "groups": kept.get("groups"), "n_samples": kept.get("n-samples"),
            "versions": kept.get("versions"), "higher_is_better": kept.get("higher_is_better"),
            "model": lm.info(), "settings": asdict(cfg)}
