"""``python -m orderlab.harness <lm-eval arguments>``: lm-eval's own command line with the
``orderlab`` model registered first (lm-eval 0.4.13 discovers no models from other
packages). Every argument passes through unchanged (``run``/``ls``/``validate`` or the
legacy form without a subcommand). A bad ``--model_args`` key is one line naming it, exit
status 2, as ``orderlab.run``'s config errors."""

from __future__ import annotations

import logging
import sys

from orderlab.registry import ConfigError


def main() -> int:
    from lm_eval.__main__ import cli_evaluate
    from lm_eval.utils import setup_logging

    from orderlab.harness import register

    register()
    setup_logging()
    ours = logging.getLogger("orderlab")  # NFE per request beside lm-eval's own log lines
    ours.setLevel(logging.getLogger("lm_eval").level)
    for handler in logging.getLogger("lm_eval").handlers:
        if handler not in ours.handlers:
            ours.addHandler(handler)
    ours.propagate = False
    sys.argv[0] = "python -m orderlab.harness"
    try:
        cli_evaluate()
    except ConfigError as e:
        print(f"config error {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
