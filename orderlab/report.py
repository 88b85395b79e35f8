"""Reporting: order heatmaps, NFE histograms, tables and result files.

Figures use matplotlib's Agg backend, imported inside the functions (importing this
module stays cheap and never touches a display). Writes of whole files are atomic
(temporary file in the same folder, then ``os.replace``), so a reader never sees half a
result; ``append_jsonl`` flushes every record.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "order_heatmap",
    "order_colors",
    "nfe_histogram",
    "results_table",
    "print_table",
    "write_json",
    "write_csv",
    "append_jsonl",
    "to_jsonable",
]

GIVEN_COLOR = (0.80, 0.80, 0.80, 1.0)  # light grey: given positions (rank 0)
PAD_COLOR = (1.0, 1.0, 1.0, 1.0)  # white: padding (rank -1)


def _figure(figsize: tuple[float, float], dpi: int):
    """A figure on an Agg canvas, without pyplot: no global backend or figure state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _figsize(rows: int, length: int) -> tuple[float, float]:
    w = min(max(4.0, 1.5 + 0.12 * length), 16.0)
    h = min(max(2.5, 1.0 + 0.2 * rows), 10.0)
    return w, h


def _cell_labels(tokens: Any, rows: int, length: int) -> list[list[str]] | None:
    if tokens is None:
        return None
    if isinstance(tokens, Tensor):
        if tokens.dim() != 2:
            raise ValueError(f"tokens must have shape [B, L], got {tuple(tokens.shape)}")
        return [[str(t) for t in row] for row in tokens[:rows].tolist()]
    return [[str(t) for t in row] for row in list(tokens)[:rows]]


def order_colors(ranks: Tensor, cmap: str = "viridis"):
    """``(rgba Float[B, L, 4], norm, colormap)``: the cell colours of ``order_heatmap``.

    Steps ``1..max`` map linearly onto ``cmap``; given cells get ``GIVEN_COLOR``, padding
    ``PAD_COLOR``.
    """
    import matplotlib
    from matplotlib import colors

    r = ranks.detach().cpu().long()
    top = max(int(r.max()) if r.numel() else 1, 1)
    norm = colors.Normalize(vmin=1, vmax=top) if top > 1 else colors.Normalize(vmin=0.5, vmax=1.5)
    cm = matplotlib.colormaps[cmap]
    rgba = torch.tensor(cm(norm(r.clamp(min=1).numpy())), dtype=torch.float32).reshape(*r.shape, 4)
    rgba[r == 0] = torch.tensor(GIVEN_COLOR)
    rgba[r < 0] = torch.tensor(PAD_COLOR)
    return rgba, norm, cm


def order_heatmap(
    ranks: Tensor,
    path: str | Path,
    title: str | None = None,
    tokens: Tensor | Sequence[Sequence[str]] | None = None,
    max_rows: int = 32,
    figsize: tuple[float, float] | None = None,
    dpi: int = 100,
    cmap: str = "viridis",
) -> Path:
    """The sampling-process figure (LLaDA, Nie et al. 2025, fig. 'sampling process').

    x: position, y: sample (first ``max_rows`` rows), colour: the decode step at which a
    position was revealed (``ranks >= 1``, e.g. ``Decoded.ranks``); given positions
    (0) are light grey, padding (-1) white. ``tokens`` (Long ``[B, L]`` or rows of
    strings, e.g. characters from ``task.render``) are written into the cells. The
    image is ``figsize * dpi`` pixels (no tight bounding box) and saved as PNG.
    """
    from matplotlib.cm import ScalarMappable

    if not isinstance(ranks, Tensor) or ranks.dim() != 2:
        raise ValueError(f"ranks must be a Tensor of shape [B, L], got {getattr(ranks, 'shape', type(ranks))}")
    r = ranks[:max_rows].detach().cpu().long()  # [b, L]
    b, length = r.shape
    top = max(int(r.max()) if r.numel() else 1, 1)
    rgba, norm, cm = order_colors(r, cmap)

    fig = _figure(figsize or _figsize(b, length), dpi)
    ax = fig.add_subplot()
    ax.imshow(rgba.numpy(), aspect="auto", interpolation="nearest")
    ax.set_xlabel("position")
    ax.set_ylabel("sample")
    if title:
        ax.set_title(title)
    labels = _cell_labels(tokens, b, length)
    if labels is not None and b * length <= 4096:
        size = max(4.0, min(9.0, 300.0 / max(length, b)))
        for i, row in enumerate(labels):
            for j, s in enumerate(row[:length]):
                if r[i, j] >= 0:
                    lum = float((rgba[i, j, :3] * torch.tensor([0.299, 0.587, 0.114])).sum())
                    ink = "white" if lum < 0.5 else "black"  # readable on dark steps
                    ax.text(j, i, s, ha="center", va="center", fontsize=size, color=ink)
    sm = ScalarMappable(norm=norm, cmap=cm)
    bar = fig.colorbar(sm, ax=ax)
    bar.set_label("decode step")
    if top <= 12:
        bar.set_ticks(list(range(1, top + 1)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=dpi)
    return path


def nfe_histogram(
    nfe: Tensor,
    path: str | Path,
    title: str | None = None,
    figsize: tuple[float, float] = (5.0, 3.5),
    dpi: int = 100,
) -> Path:
    """Histogram of function evaluations per row (``Decoded.nfe``), one bin per integer."""
    from matplotlib.ticker import MaxNLocator

    v = torch.as_tensor(nfe).detach().cpu().flatten().long()
    if v.numel() == 0:
        raise ValueError("nfe is empty")
    lo, hi = int(v.min()), int(v.max())
    fig = _figure(figsize, dpi)
    ax = fig.add_subplot()
    ax.hist(v.numpy(), bins=[x - 0.5 for x in range(lo, hi + 2)], color="tab:blue", edgecolor="white")
    ax.set_xlabel("NFE")
    ax.set_ylabel("samples")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title or f"NFE (mean {v.double().mean().item():.2f})")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=dpi)
    return path


# ---------------------------------------------------------------- tables


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    cols: dict[str, None] = {}
    for row in rows:
        for k in row:
            cols.setdefault(str(k), None)
    return list(cols)


def _fmt(v: Any) -> str:
    if isinstance(v, Tensor) and v.numel() == 1:
        v = v.item()
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v)
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        return f"{v:.4g}" if v != 0 and (abs(v) >= 1e4 or abs(v) < 1e-3) else f"{v:.4f}".rstrip("0").rstrip(".")
    return str(v)


def results_table(rows: Sequence[Mapping[str, Any]], title: str | None = None):
    """A ``rich.table.Table``: one column per key (in order of first appearance)."""
    from rich.table import Table

    table = Table(title=title)
    cols = _columns(rows)
    for c in cols:
        numeric = all(isinstance(r.get(c), (int, float)) or r.get(c) is None for r in rows)
        table.add_column(c, justify="right" if numeric else "left")
    for r in rows:
        table.add_row(*(_fmt(r.get(c)) for c in cols))
    return table


def print_table(rows: Sequence[Mapping[str, Any]], title: str | None = None, console=None) -> None:
    """Print ``results_table(rows, title)`` to ``console`` (a ``rich.console.Console``)."""
    from rich.console import Console

    (console or Console()).print(results_table(rows, title))


# ---------------------------------------------------------------- files


def to_jsonable(obj: Any) -> Any:
    """Tensors -> numbers/lists, paths -> str, tuples/sets -> lists, dataclasses -> dicts."""
    if isinstance(obj, Tensor):
        return obj.item() if obj.numel() == 1 and obj.dim() == 0 else obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "__dataclass_fields__"):
        import dataclasses

        return to_jsonable(dataclasses.asdict(obj))
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return obj.item()
    return obj


def _atomic_write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json(path: str | Path, obj: Any, indent: int = 2) -> Path:
    """Write ``obj`` as JSON atomically (temporary file + ``os.replace``)."""
    text = json.dumps(to_jsonable(obj), indent=indent, sort_keys=False, allow_nan=True) + "\n"
    return _atomic_write_text(path, text)


def write_csv(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write ``rows`` as CSV (header: the keys in order of first appearance), atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_columns(rows), lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({str(k): to_jsonable(v) for k, v in r.items()})
    return _atomic_write_text(path, buf.getvalue())


def append_jsonl(path: str | Path, record: Mapping[str, Any]) -> Path:
    """Append one JSON line to ``path`` and flush it (a log readable while a run goes on)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(to_jsonable(record), allow_nan=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
    return path
