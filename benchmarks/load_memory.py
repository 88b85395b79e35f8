"""Peak resident memory while loading a safetensors checkpoint (issue 17).

    python benchmarks/load_memory.py --params 350e6 --dtype bfloat16 --shards 2
    python benchmarks/load_memory.py --params 50e6 --keep      # quick; keeps the folder

Writes a random Llama-like checkpoint (d_model 1024, SwiGLU, separate q/k/v/o, vocab
32000, layers added until ``--params``) with ``orderlab.weights.save_folder`` from a lazy
mapping (each tensor made when the writer asks for it, so the writer holds one shard, not
the model), plus the same values in float32. Then, per method, a **fresh subprocess**
opens the folder, resets its peak RSS (``/proc/self/clear_refs`` <- 5, else it takes the
peak so far as the baseline), allocates empty destination tensors (a model built on the
meta device, then materialised), loads every tensor into them, and reports ``VmHWM`` above
that baseline. Methods:

- ``read_into``: ``WeightFolder.read_into`` (the file's bytes straight into the destination);
- ``from_pretrained``: the whole loader, ``orderlab.from_pretrained`` (a meta-built model
  materialised in the dtype, each tensor read into its parameter or its rows of the fused
  q/k/v; the model is the destination: its bytes count in the peak);
- ``safe_open``: ``safetensors.safe_open`` + ``get_tensor`` + ``copy_``, one file open at a time;
- ``load_file``: ``safetensors.torch.load_file`` per shard, then ``copy_`` (what
  ``transformers`` does per shard);
- ``read_into f32->bf16``: the float32 file into bfloat16 destinations.

Every method must load the same values (a checksum over strided samples, checked). The
last column applies each method's rule (what it holds above the destination) to an 8B
bf16 checkpoint in Hugging Face's 5 GB shards, largest tensor the 128256 x 4096 embedding.
The temporary folder is removed unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from orderlab.weights import WeightFolder, save_folder

GB = 1e9
# an 8B bf16 checkpoint (Llama-3-8B / LLaDA-8B sizes) to which each method's rule is applied
BIG = {"bytes": 8.03e9 * 2, "largest": 128256 * 4096 * 2, "shard": 5e9}


# --------------------------------------------------------------------------- checkpoint


def llama_shapes(params: float, d: int = 1024, vocab: int = 32000) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a Llama-like model with at least ``params`` parameters."""
    ffn = 256 * math.ceil(8 * d / 3 / 256)  # SwiGLU width, Llama's rounding
    per_layer = 4 * d * d + 3 * d * ffn + 2 * d
    outer = 2 * vocab * d + d
    layers = max(1, math.ceil((params - outer) / per_layer))
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, d), "lm_head.weight": (vocab, d),
                                          "model.norm.weight": (d,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + f"self_attn.{m}_proj.weight": (d, d) for m in "qkvo"}
        shapes |= {p + "mlp.gate_proj.weight": (ffn, d), p + "mlp.up_proj.weight": (ffn, d),
                   p + "mlp.down_proj.weight": (d, ffn)}
        shapes |= {p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,)}
    return shapes


class RandomTensors(Mapping):
    """name -> a random tensor made on access (seeded by the name: the same values every
    time, in every dtype up to rounding), so nothing holds the whole model."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], dtype: torch.dtype):
        self.shapes, self.dtype = shapes, dtype

    def __getitem__(self, name: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        return (torch.randn(self.shapes[name], generator=g) * 0.02).to(self.dtype)  # float32 [shape], then cast

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def llama_config(shapes: Mapping[str, tuple[int, ...]], dtype: torch.dtype) -> dict:
    """A Llama ``config.json`` for ``shapes`` (what ``orderlab.from_pretrained`` reads)."""
    vocab, d = shapes["model.embed_tokens.weight"]
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "torch_dtype": str(dtype).split(".")[-1],
            "vocab_size": vocab, "hidden_size": d, "intermediate_size": shapes["model.layers.0.mlp.gate_proj.weight"][0],
            "num_hidden_layers": sum(n.endswith("input_layernorm.weight") for n in shapes), "num_attention_heads": d // 64,
            "num_key_value_heads": d // 64, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 4096,
            "tie_word_embeddings": False}


def write_checkpoint(folder: Path, shapes: Mapping[str, tuple[int, ...]], dtype: torch.dtype, shards: int) -> None:
    sizes = [math.prod(s) * dtype.itemsize for s in shapes.values()]
    # greedy split in name order: at most `shards` files when each may hold total/shards + one tensor
    max_shard = math.ceil(sum(sizes) / shards) + max(sizes) if shards > 1 else sum(sizes) + 1
    save_folder(folder, RandomTensors(shapes, dtype), llama_config(shapes, dtype), max_shard_bytes=max_shard)


# --------------------------------------------------------------------------- child: one measurement


def _status(key: str) -> int:
    """A /proc/self/status field in bytes."""
    return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) * 1024


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        return True
    except OSError:
        return False


def _load_read_into(folder: WeightFolder, dest: dict[str, torch.Tensor]) -> None:
    for name in folder.names:
        folder.read_into(name, dest[name])


def _load_safe_open(folder: WeightFolder, dest: dict[str, torch.Tensor]) -> None:
    from safetensors import safe_open

    for file in sorted({folder.file(n) for n in folder.names}):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                dest[name].copy_(f.get_tensor(name))


def _load_load_file(folder: WeightFolder, dest: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import load_file

    for file in sorted({folder.file(n) for n in folder.names}):
        state = load_file(file)
        for name, t in state.items():
            dest[name].copy_(t)
        del state


METHODS = {"read_into": _load_read_into, "safe_open": _load_safe_open, "load_file": _load_load_file}


def _from_pretrained(path: str, dtype: str):
    """The whole loader: a meta-built Transformer materialised in ``dtype`` and filled from
    the folder (q/k/v read into the rows of the fused qkv, plus orderlab's [MASK] row).
    Returns the file tensors as views of the model's parameters (for the checksum), and the model."""
    from orderlab.pretrained import FAMILIES, _file_tensors, from_pretrained

    model = from_pretrained(path, dtype=dtype)
    return dict(_file_tensors(model, FAMILIES["llama"])), model


def child(method: str, path: str, dtype: str) -> None:
    """Measure one method in this (fresh) process; print one JSON line."""
    folder = WeightFolder(path)  # headers only: a few KB
    dt = getattr(torch, dtype)
    if method == "from_pretrained":
        import orderlab.pretrained  # noqa: F401  imported before the baseline: code, not weights
    exact = _reset_peak()
    baseline = _status("VmHWM")
    t0 = time.perf_counter()
    if method == "from_pretrained":
        views, model = _from_pretrained(path, dtype)
        dest = {n: views[n] for n in folder.names}
        dest_bytes = sum(p.nbytes for p in model.parameters())
    else:
        dest = {n: torch.empty(folder.shape(n), dtype=dt) for n in folder.names}  # untouched pages: not resident yet
        METHODS[method](folder, dest)
        dest_bytes = sum(t.nbytes for t in dest.values())
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM") - baseline
    check = sum(float(dest[n].reshape(-1)[::4099].double().sum()) for n in sorted(dest))
    largest = max(math.prod(folder.shape(n)) * folder.dtype(n).itemsize for n in folder.names)
    files = {folder.file(n) for n in folder.names}
    shard = max(sum(math.prod(folder.shape(n)) * folder.dtype(n).itemsize for n in folder.names if folder.file(n) == f)
                for f in files)
    print(json.dumps({"peak": peak, "file_bytes": folder.nbytes, "dest_bytes": dest_bytes,
                      "largest": largest, "shard": shard, "seconds": seconds, "check": check, "exact_reset": exact}))


# --------------------------------------------------------------------------- parent


def measure(method: str, folder: Path, dtype: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", method, str(folder), dtype],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def rule(method: str, r: dict, big: bool = False) -> float:
    """What each method holds above the destination tensors: read_into nothing (same dtype)
    or one temporary of the file's dtype; safe_open the mapped file plus get_tensor's copy;
    load_file one shard's state dict."""
    if big:
        dest, largest, shard = BIG["bytes"], BIG["largest"], BIG["shard"]
        largest *= 2 if method == "read_into f32->bf16" else 1  # the float32 file's largest tensor
    else:
        dest, largest, shard = r["dest_bytes"], r["largest"], r["shard"]
    held = {"read_into": 0, "from_pretrained": 0, "read_into f32->bf16": largest, "safe_open": shard + largest,
            "load_file": shard}
    return dest + held[method]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=350e6, help="at least this many parameters (default 350e6)")
    ap.add_argument("--dtype", default="bfloat16", help="the checkpoint's and the model's dtype")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    ap.add_argument("--child", nargs=3, metavar=("METHOD", "FOLDER", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(*args.child)

    from rich.console import Console
    from rich.table import Table

    shapes = llama_shapes(args.params, args.d_model)
    n_params = sum(math.prod(s) for s in shapes.values())
    root = Path(tempfile.mkdtemp(prefix="orderlab-load-memory-"))
    try:
        t0 = time.perf_counter()
        write_checkpoint(root / args.dtype, shapes, getattr(torch, args.dtype), args.shards)
        write_checkpoint(root / "float32", shapes, torch.float32, args.shards)
        print(f"{n_params / 1e6:.0f}M parameters, {len(shapes)} tensors, "
              f"written in {time.perf_counter() - t0:.0f} s to {root}")
        runs = [(m, root / args.dtype, args.dtype) for m in (*METHODS, "from_pretrained")]
        runs.append(("read_into f32->bf16", root / "float32", "bfloat16"))
        results = {m: measure(m.split()[0], folder, dt) for m, folder, dt in runs}
        checks = {round(r["check"], 6) for r in results.values()}
        if len(checks) != 1:
            raise SystemExit(f"methods loaded different values: checksums {checks}")

        table = Table(title=f"Loading {n_params / 1e6:.0f}M parameters ({args.dtype}, {args.shards} shard(s)): "
                            "peak RSS above the process baseline")
        for col in ["method", "file", "checkpoint GB", "model GB", "peak GB", "peak / checkpoint", "rule GB",
                    "s", "8B bf16 (16 GB): rule"]:
            table.add_column(col, justify="left" if col in ("method", "file") else "right")
        for (m, folder, _), r in zip(runs, results.values()):
            big = rule(m, r, big=True)
            table.add_row(m, folder.name, *(f"{r[k] / GB:.3f}" for k in ("file_bytes", "dest_bytes", "peak")),
                          f"{r['peak'] / r['file_bytes']:.2f}x", f"{rule(m, r) / GB:.3f}", f"{r['seconds']:.1f}",
                          f"{big / GB:.1f} GB = {big / BIG['bytes']:.2f}x")
        Console(width=200).print(table)
        exact = all(r["exact_reset"] for r in results.values())
        reset = "resetting VmHWM (clear_refs 5)" if exact else "the peak so far (no clear_refs)"
        print(f"baseline: RSS after {reset}; "
              "rule = what the method holds above the destination (read_into: nothing, or one temporary of the file's "
              "dtype; safe_open: the mapped shard + get_tensor's copy; load_file: one shard). 8B: 16.06 GB bf16, "
              "5 GB shards, largest tensor 128256 x 4096.")
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
