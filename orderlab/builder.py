"""The component packages, imported: the registry filled by explicit imports (DESIGN.md
9.5), and the public ``orderlab.build`` / ``orderlab.register`` / ``orderlab.check``.

Every kind is declared by its base class in its own module; importing this module
imports them all (processes, policies, objectives, tasks, attention rules, the model),
so a name of any kind resolves. The walk itself is :mod:`orderlab.registry`'s.
"""

from __future__ import annotations

from orderlab import model, pretrained, rules  # noqa: F401  (kinds "model" (its "pretrained" too), "attention")
from orderlab import search  # noqa: F401  (policy "order_token_search": a search that decodes itself)
from orderlab import objectives, policies, processes, tasks  # noqa: F401  (the component packages)
from orderlab.registry import DEFERRED, ConfigError, Context, build, check, kinds, names, register

__all__ = ["build", "check", "register", "names", "kinds", "Context", "ConfigError", "DEFERRED"]
