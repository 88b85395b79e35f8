"""orderlab: experiments on token orderings in discrete diffusion language models.

The public face (DESIGN.md section 8). Names are resolved lazily (PEP 562) so that
``import orderlab`` has no import-time side effects and no import cycles. No public
name equals a submodule's name (the decoder lives in ``orderlab.decoding``): importing
a submodule binds its name on the package and would shadow a lazy attribute.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "load": "orderlab.config",
    "Experiment": "orderlab.config",
    "build": "orderlab.builder",
    "check": "orderlab.builder",
    "register": "orderlab.builder",
    "ConfigError": "orderlab.registry",
    "log_likelihood": "orderlab.likelihood",
    "decode": "orderlab.decoding",
    "Decoded": "orderlab.decoding",
    "StepView": "orderlab.policies.base",
    "Transformer": "orderlab.model",
    "ModelConfig": "orderlab.model",
    "KVCache": "orderlab.cache",
    "from_pretrained": "orderlab.pretrained",
    "save_pretrained": "orderlab.pretrained",
    "Tokenizer": "orderlab.tokenizer",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'orderlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_PUBLIC))
