"""orderlab models in EleutherAI's lm-evaluation-harness (``pip install orderlab[eval]``).

    python -m orderlab.harness --model orderlab --model_args run=runs/X,policy=threshold,policy.tau=0.9 \
        --tasks gsm8k --batch_size 16            # every lm-eval flag passes through
    python -m orderlab.harness --model orderlab --model_args path=/models/LLaDA-8B-Instruct,order=mdm_nelbo ...

``OrderlabLM`` (:mod:`.lm`) answers lm-eval's three request types: ``generate_until``
with any policy (:mod:`.source`), ``loglikelihood`` / ``loglikelihood_rolling`` with a
scorer (:mod:`.scorers`: exact under ``l2r`` and any fixed order, or a bound). Its model
arguments are :class:`.args.ModelArgs`. ``orderlab.run`` calls it as an evaluation step
(``evaluate.lm_eval``; :mod:`.step`).

Discovery: lm-eval 0.4.13 finds models only in its own registry (``lm_eval.models``'s
``MODEL_MAPPING`` and ``@register_model``); it reads no entry points. Importing this
package registers ``orderlab`` there (lm-eval's own idiom, and the one import-time effect
this package has: it touches only lm-eval's registry), and ``python -m orderlab.harness``
imports it before handing the command line to lm-eval. The ``lm_eval.models`` entry point
in ``pyproject.toml`` points at :class:`OrderlabLM` for lm-eval versions that read one.
This is the only orderlab package that imports ``lm_eval`` (DESIGN.md floor 5).
"""

from __future__ import annotations

from .args import ModelArgs
from .lm import OrderlabLM
from .scorers import SCORERS, Scorer

__all__ = ["OrderlabLM", "ModelArgs", "Scorer", "SCORERS", "register", "NAME"]

NAME = "orderlab"


def register() -> None:
    """Register :class:`OrderlabLM` as lm-eval's ``orderlab`` model (idempotent). lm-eval's
    own models are registered first: its ``get_model`` fills them in only while its
    registry is empty, so ``--model hf`` keeps working in the same process."""
    import lm_eval.models  # noqa: F401  (lm-eval's lazy MODEL_MAPPING entries)
    from lm_eval.api.registry import model_registry

    if NAME not in model_registry:  # present: this class, or an entry point's placeholder for it
        model_registry.register(NAME)(OrderlabLM)


register()
