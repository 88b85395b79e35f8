"""Write an experiment's trained model back in its checkpoint family's folder format.

    python -m orderlab.export experiments/adapt_qwen3_set.yaml runs/adapt_qwen3_set/hf model.path=... task.path=...

Loads the experiment (with the same overrides as its run), restores the run folder's final
weights (``Experiment.restore``: the last stage's checkpoint, its EMA when present) and calls
:func:`orderlab.pretrained.save_pretrained`: the family's ``config.json``, tensor names and
shards, and the source folder's tokenizer and other files, so the model loads in other tools
(transformers, vLLM) and back in orderlab bit-identically. Only a model loaded with
``model: {name: pretrained}`` has a family to export to. Exit status 2 with one line on a
config or checkpoint problem.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from orderlab import checkpoint as ckpt
from orderlab.config import load
from orderlab.pretrained import save_pretrained
from orderlab.registry import ConfigError
from orderlab.weights import WeightsError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orderlab.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="experiment YAML (the one the run used)")
    parser.add_argument("out", help="folder to write")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (omegaconf dotlist), as given to the run")
    parser.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors shard (GB)")
    args = parser.parse_intermixed_args(argv)
    try:
        exp = load(args.config, args.overrides)
        if getattr(exp.model, "pretrained", None) is None:
            raise ConfigError("model", "only a model loaded with {name: pretrained} has a folder format to export to")
        exp.restore()
        out = save_pretrained(exp.model, args.out, max_shard_bytes=int(args.max_shard_gb * 2**30))
    except (ConfigError, ckpt.CheckpointError, WeightsError) as e:
        print(f"export error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
