"""Reporting: order heatmaps, NFE histograms, Pareto plots, tables and result files.

Figures use matplotlib's Agg backend, imported inside the functions (importing this
module stays cheap and never touches a display); titles are wrapped (and, for a single
word too long, shrunk) to the figure's width, so none is cut off. Writes of whole files
are atomic (temporary file in the same folder, then ``os.replace``), so a reader never
sees half a result; ``append_jsonl`` flushes every record.

Tables (printed with rich, or markdown) format each column with one formatter, so a
column never mixes ``1``, ``0.9883`` and ``1.149e+04``: ``FORMATS`` maps column kinds
(``score``, ``bits``, ``nfe``, ``ratio``, ``rate``, ``seconds``, ``count``, ``text``) to
:class:`Fixed` decimals; a column without a kind gets fixed decimals chosen from its
largest value (:func:`column_format`). A ``(mean, std)`` cell prints ``mean ± std``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from orderlab.files import atomic_write

__all__ = [
    "order_heatmap",
    "order_colors",
    "order_grid",
    "nfe_histogram",
    "pareto_plot",
    "pareto_mask",
    "Fixed",
    "FORMATS",
    "column_format",
    "results_table",
    "print_table",
    "markdown_table",
    "write_markdown",
    "write_text",
    "write_json",
    "write_csv",
    "append_jsonl",
    "to_jsonable",
    "NONFINITE",
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


def _fit_text(artist, text: str, width_px: float, min_size: float = 6.0) -> None:
    """Set ``text`` on a matplotlib Text so that every line is at most ``width_px`` pixels
    wide as rendered: a word wider than that first shrinks the font (down to ``min_size``
    points), then lines wrap at spaces, and a word still too wide breaks where it must."""
    renderer = artist.get_figure().canvas.get_renderer()

    def width(s: str) -> float:
        artist.set_text(s)
        return artist.get_window_extent(renderer).width

    words = text.split()
    while artist.get_fontsize() > min_size and max(map(width, words), default=0.0) > width_px:
        artist.set_fontsize(max(min_size, artist.get_fontsize() - 0.5))
    lines: list[str] = []
    for para in text.split("\n"):
        pieces: list[str] = []  # the words, those still too wide cut into pieces that fit
        for word in para.split():
            while len(word) > 1 and width(word) > width_px:
                cut = next(k for k in range(len(word) - 1, 0, -1) if k == 1 or width(word[:k]) <= width_px)
                pieces.append(word[:cut])
                word = word[cut:]
            pieces.append(word)
        cur = ""
        for word in pieces:
            trial = f"{cur} {word}" if cur else word
            if cur and width(trial) > width_px:
                lines.append(cur)
                cur = word
            else:
                cur = trial
        lines.append(cur)
    artist.set_text("\n".join(lines))


def _title(fig, title: str) -> None:
    """A figure title that fits the figure's width (constrained layout makes room for it)."""
    _fit_text(fig.suptitle(title), title, 0.96 * fig.bbox.width)


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


def order_colors(ranks: Tensor, cmap: str = "viridis", vmax: int | None = None):
    """``(rgba Float[B, L, 4], norm, colormap)``: the cell colours of ``order_heatmap``.

    Steps ``1..max`` (``vmax``: that many steps, e.g. the largest over several figures
    drawn alike) map linearly onto ``cmap``; given cells get ``GIVEN_COLOR``, padding
    ``PAD_COLOR``.
    """
    import matplotlib
    from matplotlib import colors

    r = ranks.detach().cpu().long()
    top = max(vmax if vmax is not None else (int(r.max()) if r.numel() else 1), 1)
    norm = colors.Normalize(vmin=1, vmax=top) if top > 1 else colors.Normalize(vmin=0.5, vmax=1.5)
    cm = matplotlib.colormaps[cmap]
    rgba = torch.tensor(cm(norm(r.clamp(min=1).numpy())), dtype=torch.float32).reshape(*r.shape, 4)
    rgba[r == 0] = torch.tensor(GIVEN_COLOR)
    rgba[r < 0] = torch.tensor(PAD_COLOR)
    return rgba, norm, cm


def _check_ranks(ranks: Any, what: str = "ranks") -> None:
    if not isinstance(ranks, Tensor) or ranks.dim() != 2:
        raise ValueError(f"{what} must be a Tensor of shape [B, L], got {getattr(ranks, 'shape', type(ranks))}")


def _step_bar(fig, norm, cm, top: int, ax) -> None:
    from matplotlib.cm import ScalarMappable

    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cm), ax=ax)
    bar.set_label("decode step")
    if top <= 12:
        bar.set_ticks(list(range(1, top + 1)))


def _order_figure(ranks: Tensor, title: str | None, tokens: Any, max_rows: int,
                  figsize: tuple[float, float] | None, dpi: int, cmap: str):
    """The figure of :func:`order_heatmap`, not yet saved."""
    _check_ranks(ranks)
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
        _title(fig, title)
    labels = _cell_labels(tokens, b, length)
    if labels is not None and b * length <= 4096:
        size = max(4.0, min(9.0, 300.0 / max(length, b)))
        for i, row in enumerate(labels):
            for j, s in enumerate(row[:length]):
                if r[i, j] >= 0:
                    lum = float((rgba[i, j, :3] * torch.tensor([0.299, 0.587, 0.114])).sum())
                    ink = "white" if lum < 0.5 else "black"  # readable on dark steps
                    ax.text(j, i, s, ha="center", va="center", fontsize=size, color=ink)
    _step_bar(fig, norm, cm, top, ax)
    return fig


def _save(fig, path: str | Path, dpi: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=dpi)
    return path


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
    image is ``figsize * dpi`` pixels (no tight bounding box) and saved as PNG; the
    title is wrapped to the figure's width.
    """
    return _save(_order_figure(ranks, title, tokens, max_rows, figsize, dpi, cmap), path, dpi)


def order_grid(
    panels: Sequence[tuple[str, Tensor]],
    path: str | Path,
    title: str | None = None,
    ncols: int | None = None,
    max_rows: int = 16,
    dpi: int = 100,
    cmap: str = "viridis",
) -> Path:
    """Several order heatmaps in one figure: one panel per ``(title, ranks [B, L])`` (e.g.
    one per grid point of an ablation), ``ncols`` per row (default: up to 3), colours on
    one scale (steps ``1..`` the largest step of any panel) with one colour bar."""
    if not panels:
        raise ValueError("order_grid needs at least one panel")
    for i, (_, r) in enumerate(panels):
        _check_ranks(r, f"panels[{i}] ranks")
    ncols = ncols or min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    length = max(int(r.shape[1]) for _, r in panels)
    rows = max(min(int(r.shape[0]), max_rows) for _, r in panels)
    top = max(max(int(r.max()) if r.numel() else 1 for _, r in panels), 1)
    pw, ph = min(max(3.0, 1.0 + 0.1 * length), 8.0), min(max(1.6, 0.8 + 0.15 * rows), 5.0)
    fig = _figure((pw * ncols + 1.0, ph * nrows + 0.8), dpi)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    norm = cm = None
    for k, ax in enumerate(axes.flat):
        if k >= len(panels):
            ax.set_axis_off()
            continue
        label, r = panels[k]
        rgba, norm, cm = order_colors(r[:max_rows], cmap, vmax=top)
        ax.imshow(rgba.numpy(), aspect="auto", interpolation="nearest")
        ax.set_xlabel("position", fontsize=8)
        ax.set_ylabel("sample", fontsize=8)
        ax.tick_params(labelsize=7)
        t = ax.set_title("", fontsize=9)
        _fit_text(t, label, 0.92 * fig.bbox.width / ncols)
    if title:
        _title(fig, title)
    _step_bar(fig, norm, cm, top, axes)
    return _save(fig, path, dpi)


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
    _title(fig, title or f"NFE (mean {v.double().mean().item():.2f})")
    return _save(fig, path, dpi)


def pareto_mask(x: Sequence[float], y: Sequence[float]) -> list[bool]:
    """Which points are Pareto-optimal for *low* ``x`` (cost) and *high* ``y`` (quality):
    no other point has ``x' <= x`` and ``y' >= y`` with one strict. NaNs are never on it."""
    pts = [(float(a), float(b)) for a, b in zip(x, y)]
    ok = [not (math.isnan(a) or math.isnan(b)) for a, b in pts]
    out = []
    for i, (a, b) in enumerate(pts):
        dominated = any(ok[j] and c <= a and d >= b and (c < a or d > b) for j, (c, d) in enumerate(pts) if j != i)
        out.append(ok[i] and not dominated)
    return out


MARKERS = "os^Dv<>ph"  # one per heuristic family (with one of ten colours); learned policies: a star


@dataclass(frozen=True)
class _Point:
    """One point of a Pareto plot, as drawn: where, its text, its family's colour."""

    x: float
    y: float
    text: str
    color: str
    learned: bool
    frontier: bool = False


def _normalised(pts: Sequence[_Point], log_x: bool) -> list[tuple[float, float]]:
    """Points in ``[0, 1]^2`` over their own span (log x when the plot is log x)."""
    xs = [math.log(p.x) if log_x else p.x for p in pts]
    ys = [p.y for p in pts]
    spanx, spany = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    return [((a - min(xs)) / spanx, (b - min(ys)) / spany) for a, b in zip(xs, ys)]


def _largest_cluster(pts: Sequence[_Point], log_x: bool, radius: float = 0.06) -> list[_Point]:
    """The largest group of points chained by neighbours closer than ``radius`` (of the
    plot's span, both axes): single linkage, a flood fill over the few points of a plot."""
    norm = _normalised(pts, log_x)
    best: list[int] = []
    seen: set[int] = set()
    for i in range(len(pts)):
        if i in seen:
            continue
        group, todo = [], [i]
        seen.add(i)
        while todo:
            j = todo.pop()
            group.append(j)
            near = [k for k in range(len(pts)) if k not in seen and math.dist(norm[j], norm[k]) < radius]
            seen.update(near)
            todo += near
        best = group if len(group) > len(best) else best
    return [pts[i] for i in best]


def _padded(vs: Sequence[float], every: Sequence[float], pad: float) -> tuple[float, float]:
    """``vs``'s range widened by ``pad`` of its span (at least 2% of ``every``'s span; of
    the value itself when both are 0: points on one line)."""
    span = max(max(vs) - min(vs), 0.02 * (max(every) - min(every))) or (0.1 * abs(vs[0]) or 1.0)
    return min(vs) - pad * span, max(vs) + pad * span


def _zoom_box(cluster: Sequence[_Point], pts: Sequence[_Point]) -> tuple[float, float, float, float]:
    """``(x0, x1, y0, y1)``: the cluster's bounding box with room around it for labels."""
    x0, x1 = _padded([p.x for p in cluster], [p.x for p in pts], 0.35)
    y0, y1 = _padded([p.y for p in cluster], [p.y for p in pts], 0.3)
    return x0, x1, y0, y1


def _inside(p: _Point, box: tuple[float, float, float, float]) -> bool:
    return box[0] <= p.x <= box[1] and box[2] <= p.y <= box[3]


def _draw_points(ax, curves: Mapping[str, Sequence[Mapping[str, Any]]], front: Sequence[tuple[float, float]]) -> None:
    """Every family as a line with error bars (its own colour and marker; a learned
    policy as a large star), and the Pareto frontier as a dashed step through rings."""
    for k, (family, pts) in enumerate(curves.items()):
        pts = sorted(pts, key=lambda p: p["x"])
        xs, ys = [p["x"] for p in pts], [p["y"] for p in pts]
        err = [0.0 if p.get("yerr") is None or math.isnan(p["yerr"]) else p["yerr"] for p in pts]
        learned = any(p.get("learned") for p in pts)
        style = dict(marker="*", ms=15, mec="black", mew=0.8, zorder=6) if learned else dict(
            marker=MARKERS[k % len(MARKERS)], ms=5, zorder=3)
        ax.errorbar(xs, ys, yerr=err if any(err) else None, color=f"C{k % 10}", capsize=2, lw=1.2,
                    label=f"{family} (learned)" if learned else family, **style)
    if front:
        fx, fy = zip(*front)
        ax.step(fx, fy, where="post", ls="--", color="black", lw=1, label="Pareto frontier", zorder=2)
        ax.scatter(fx, fy, s=120, facecolors="none", edgecolors="black", lw=1.2, zorder=5)


def _overlap(a, b) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


# label offsets in points: nearest first, eight directions per ring (upper right first)
_DIRECTIONS = [(1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1)]
_OFFSETS = [(r * dx, r * dy) for r in (5, 11, 18, 27, 38, 52, 70) for dx, dy in _DIRECTIONS]


def _place_labels(ax, pts: Sequence[_Point], renderer) -> None:
    """Label every point without any two labels (or a label and a marker) overlapping:
    greedily, learned policies and frontier points first, each at the nearest offset
    around its point whose box is free and inside the axes; a label moved beyond the
    first ring gets a leader line. Where no offset is free, the least overlapping one."""
    from matplotlib.transforms import Bbox

    inside = ax.get_window_extent(renderer)
    to_px = ax.transData.transform
    scale = ax.figure.dpi / 72.0  # points -> pixels
    taken = []
    for p in pts:  # every marker is an obstacle (a star is larger)
        cx, cy = to_px((p.x, p.y))
        h = (9.0 if p.learned else 5.0) * scale
        taken.append(Bbox([[cx - h, cy - h], [cx + h, cy + h]]))
    order = sorted(pts, key=lambda p: (not p.learned, not p.frontier, -p.y, p.x))
    for p in order:
        best = None
        for dx, dy in _OFFSETS:
            t = _label(ax, p, (dx, dy))
            box = t.get_window_extent(renderer).padded(1.5)
            cost = box.width * box.height - _overlap(box, inside) + sum(_overlap(box, b) for b in taken)
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, t, box, (dx, dy))
            else:
                t.remove()
            if cost == 0.0:
                break
        _, t, box, offset = best
        if max(map(abs, offset)) > _OFFSETS[0][0]:  # moved away: a leader line back to the point
            t.remove()
            _label(ax, p, offset, leader=True)
        taken.append(box)


def _label(ax, p: _Point, offset: tuple[float, float], leader: bool = False):
    """``p``'s text at ``offset`` points from it, aligned away from it, on a white ground
    (lines passing under it do not cross out letters)."""
    dx, dy = offset
    ha = "left" if dx > 0 else "right" if dx < 0 else "center"
    va = "bottom" if dy > 0 else "top" if dy < 0 else "center"
    arrow = dict(arrowstyle="-", color=p.color, lw=0.6, alpha=0.7, shrinkA=1, shrinkB=3) if leader else None
    t = ax.annotate(p.text, (p.x, p.y), xytext=offset, textcoords="offset points", ha=ha, va=va, fontsize=7,
                    color=p.color, fontweight="bold" if p.learned else "normal", zorder=7, annotation_clip=False,
                    arrowprops=arrow, bbox=dict(boxstyle="square,pad=0.1", fc="white", ec="none", alpha=0.8))
    t.set_in_layout(False)  # labels are placed inside the axes: they must not move them
    return t


def _pareto_figure(curves: Mapping[str, Sequence[Mapping[str, Any]]], xlabel: str, ylabel: str, title: str | None,
                   figsize: tuple[float, float] | None, dpi: int):
    """The figure of :func:`pareto_plot`, labels placed, not yet saved."""
    pts: list[_Point] = []
    for k, (family, members) in enumerate(curves.items()):
        for p in members:
            text = str(p.get("label") or family) + (" (learned)" if p.get("learned") else "")
            pts.append(_Point(float(p["x"]), float(p["y"]), text, f"C{k % 10}", bool(p.get("learned"))))
    pts = [p for p in pts if math.isfinite(p.x) and math.isfinite(p.y)]
    on = pareto_mask([p.x for p in pts], [p.y for p in pts])
    pts = [replace(p, frontier=f) for p, f in zip(pts, on)]
    front = sorted((p.x, p.y) for p in pts if p.frontier)
    xs = [p.x for p in pts if p.x > 0]
    log_x = bool(xs) and len(xs) == len(pts) and max(xs) / min(xs) > 20
    cluster = _largest_cluster(pts, log_x) if len(pts) >= 4 else []
    # a zoom separates points at 3 places or more; points at one place are labelled around it
    zoom = _zoom_box(cluster, pts) if len({(p.x, p.y) for p in cluster}) >= 3 else None

    fig = _figure(figsize or ((12.5, 5.5) if zoom else (8.0, 5.0)), dpi)
    axes = fig.subplots(1, 2, width_ratios=[3, 2]) if zoom else [fig.add_subplot()]
    for ax in axes:
        _draw_points(ax, curves, front)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(ylabel)
    if log_x:  # ticks at 1, 2, 5 x 10^k as plain numbers (matplotlib's minor labels collide)
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        axes[0].set_xscale("log")
        axes[0].xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        axes[0].xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axes[0].xaxis.set_minor_formatter(NullFormatter())
    axes[0].margins(0.08)
    if zoom:
        from matplotlib.patches import Rectangle

        x0, x1, y0, y1 = zoom
        axes[0].add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ls=":", color="0.4", lw=1, zorder=1))
        axes[1].set_xlim(x0, x1)
        axes[1].set_ylim(y0, y1)
        axes[1].set_title(f"zoom: the {len(cluster)} clustered points", fontsize=9)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside right upper", fontsize=7)
    if title:  # over the axes: a figure title would run into the legend beside them
        _fit_text(axes[0].set_title(""), title, (0.45 if zoom else 0.6) * fig.bbox.width)
    fig.canvas.draw()  # the layout is final: labels are placed in its pixels
    renderer = fig.canvas.get_renderer()
    _place_labels(axes[0], [p for p in pts if not (zoom and _inside(p, zoom))], renderer)
    if zoom:
        _place_labels(axes[1], [p for p in pts if _inside(p, zoom)], renderer)
    return fig


def pareto_plot(
    curves: Mapping[str, Sequence[Mapping[str, Any]]],
    path: str | Path,
    xlabel: str = "NFE",
    ylabel: str = "quality",
    title: str | None = None,
    figsize: tuple[float, float] | None = None,
    dpi: int = 100,
) -> Path:
    """Quality vs cost: one curve per family (``{family: [{x, y, yerr?, label?, learned?},
    ...]}``, drawn in order of ``x`` with ``yerr`` bars), each family with its own colour
    and marker; a family with a ``learned`` point (a learned policy) is a large star.
    The Pareto frontier over every point (:func:`pareto_mask`) is a dashed black step line
    through ringed points. ``x`` on a log scale when it spans more than 20x.

    Every point is labelled (its ``label``, else its family's name; ``(learned)`` added
    for a learned policy) where no label covers another or a marker, with a leader line
    when moved away from its point. When points cluster (the largest group of neighbours
    closer than 6% of the plot, at 3 places or more), a second panel zooms onto them (a
    dotted box in the first), and they are labelled there. ``figsize`` default: 8 x 5
    inches, 12.5 x 5.5 with the zoom."""
    return _save(_pareto_figure(curves, xlabel, ylabel, title, figsize, dpi), path, dpi)


# ---------------------------------------------------------------- tables


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    cols: dict[str, None] = {}
    for row in rows:
        for k in row:
            cols.setdefault(str(k), None)
    return list(cols)


@dataclass(frozen=True)
class Fixed:
    """Numbers with ``decimals`` digits after the point, never an exponent: ``0.9883``,
    ``1.0000``, ``11490.0``. A ``(mean, std)`` pair prints ``mean ± std`` (the mean alone
    when the std is None or NaN); None prints empty; anything else ``str``."""

    decimals: int

    def __call__(self, v: Any) -> str:
        if isinstance(v, tuple) and len(v) == 2:
            m, sd = v
            if sd is None or (isinstance(sd, float) and math.isnan(sd)):
                return self(m)
            return f"{self(m)} ± {self(sd)}"
        if isinstance(v, Tensor) and v.numel() == 1:
            v = v.item()
        if v is None:
            return ""
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return str(v)
        if math.isnan(v) or math.isinf(v):
            return str(float(v))
        return f"{v:.{self.decimals}f}"


def _text(v: Any) -> str:
    return "" if v is None else str(v)


FORMATS: dict[str, Callable[[Any], str]] = {
    "score": Fixed(4),  # fractions: exact match, accuracy
    "bits": Fixed(4),  # bits per token
    "nfe": Fixed(1),  # forward passes per row
    "ratio": Fixed(2),  # tokens per step
    "rate": Fixed(1),  # tokens per second
    "seconds": Fixed(2),
    "count": Fixed(0),
    "text": _text,
}


def _number(v: Any) -> float | None:
    if isinstance(v, tuple) and len(v) == 2:
        v = v[0]
    if isinstance(v, Tensor) and v.numel() == 1:
        v = v.item()
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def column_format(values: Sequence[Any]) -> Callable[[Any], str]:
    """The formatter of a column without a kind: ``text`` unless every value is a number
    (or a ``(mean, std)`` pair, or None); ``count`` for integers; else :class:`Fixed` with
    decimals from the largest magnitude (4 below 10, 3 below 100, 2 below 1000, 1 below
    1e5, else 0), so every cell of the column has the same number of decimals."""
    nums = [_number(v) for v in values if v is not None]
    if not nums or any(n is None for n in nums):
        return _text
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values if v is not None):
        return FORMATS["count"]
    top = max((abs(n) for n in nums if math.isfinite(n)), default=0.0)
    return Fixed(next((d for d, lim in ((4, 10), (3, 100), (2, 1e3), (1, 1e5)) if top < lim), 0))


def _formatters(rows: Sequence[Mapping[str, Any]], cols: list[str],
                formats: Mapping[str, str | Callable[[Any], str]] | None) -> dict[str, Callable[[Any], str]]:
    out = {}
    for c in cols:
        kind = (formats or {}).get(c)
        if kind is None:
            out[c] = column_format([r.get(c) for r in rows])
        elif isinstance(kind, str):
            if kind not in FORMATS:
                raise ValueError(f"column {c!r}: unknown format {kind!r} (valid: {', '.join(FORMATS)})")
            out[c] = FORMATS[kind]
        else:
            out[c] = kind
    return out


def _numeric(rows: Sequence[Mapping[str, Any]], c: str, fmt: Callable[[Any], str]) -> bool:
    return fmt is not _text and all(_number(r.get(c)) is not None or r.get(c) is None for r in rows)


def results_table(rows: Sequence[Mapping[str, Any]], title: str | None = None,
                  formats: Mapping[str, str | Callable[[Any], str]] | None = None):
    """A ``rich.table.Table``: one column per key (in order of first appearance), each
    formatted by ``formats[column]`` (a ``FORMATS`` kind or a callable; default
    :func:`column_format`); numeric columns right-aligned."""
    from rich.table import Table

    table = Table(title=title)
    cols = _columns(rows)
    fmts = _formatters(rows, cols, formats)
    for c in cols:  # labels fold onto more lines rather than lose their end to an ellipsis
        numeric = _numeric(rows, c, fmts[c])
        table.add_column(c, justify="right" if numeric else "left", overflow="ellipsis" if numeric else "fold")
    for r in rows:
        table.add_row(*(fmts[c](r.get(c)) for c in cols))
    return table


def print_table(rows: Sequence[Mapping[str, Any]], title: str | None = None, console=None,
                formats: Mapping[str, str | Callable[[Any], str]] | None = None) -> None:
    """Print ``results_table(rows, title, formats)`` to ``console`` (a ``rich.console.Console``;
    default: stdout, 200 columns wide when it is a file or a pipe, so that a log keeps whole
    rows instead of cells wrapped at rich's 80-column default)."""
    from rich.console import Console

    if console is None:
        console = Console()
        if not console.is_terminal and "COLUMNS" not in os.environ:
            console = Console(width=200)
    console.print(results_table(rows, title, formats))


def markdown_table(rows: Sequence[Mapping[str, Any]], title: str | None = None,
                   formats: Mapping[str, str | Callable[[Any], str]] | None = None) -> str:
    """The table of :func:`results_table` as GitHub markdown (``title`` as a heading)."""
    cols = _columns(rows)
    fmts = _formatters(rows, cols, formats)
    cell = lambda s: s.replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = [f"## {title}", ""] if title else []
    lines.append("| " + " | ".join(cell(c) for c in cols) + " |")
    lines.append("|" + "|".join("---:" if _numeric(rows, c, fmts[c]) else ":---" for c in cols) + "|")
    lines += ["| " + " | ".join(cell(fmts[c](r.get(c))) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_markdown(path: str | Path, rows: Sequence[Mapping[str, Any]], title: str | None = None,
                   formats: Mapping[str, str | Callable[[Any], str]] | None = None) -> Path:
    """Write :func:`markdown_table` to ``path`` atomically."""
    return _atomic_write_text(path, markdown_table(rows, title, formats))


# ---------------------------------------------------------------- files


NONFINITE = "nonfinite"  # the key of a JSON object that says why some of its numbers are null


def _plain(obj: Any) -> Any:
    """One level of conversion: tensors -> numbers/lists, paths -> str, dataclasses ->
    dicts, numpy scalars -> numbers; anything else as it is."""
    if isinstance(obj, Tensor):
        return obj.item() if obj.numel() == 1 and obj.dim() == 0 else obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "__dataclass_fields__") and not isinstance(obj, type):
        return asdict(obj)
    if not isinstance(obj, (Mapping, list, tuple, set, frozenset, str)) and callable(getattr(obj, "item", None)):
        return obj.item()  # numpy scalars
    return obj


def _nonfinite_reason(v: float) -> str:
    return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")


def _jsonable(obj: Any, reasons: dict[str, str] | None, path: str) -> Any:
    """``obj`` as JSON-ready containers; a non-finite float becomes None and, when a dict
    holds it, ``reasons[path]`` its reason (``path``: the key, ``[i]`` per list level)."""
    obj = _plain(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        if reasons is not None:
            reasons[path] = _nonfinite_reason(obj)
        return None
    if isinstance(obj, Mapping):
        own: dict[str, str] = {}
        out = {str(k): _jsonable(v, own, str(k)) for k, v in obj.items()}
        if own:  # merged with the reasons of a record read back and written again
            earlier = out.get(NONFINITE) or {}
            if not isinstance(earlier, dict):
                raise ValueError(f"key {NONFINITE!r} is reserved for the reasons of null numbers, got {earlier!r}")
            out[NONFINITE] = {**earlier, **own}
        return out
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_jsonable(v, reasons, f"{path}[{i}]") for i, v in enumerate(obj)]
    return obj


def to_jsonable(obj: Any) -> Any:
    """Plain JSON containers that ``json.dumps(..., allow_nan=False)`` accepts: tensors ->
    numbers/lists, paths -> str, tuples/sets -> lists, dataclasses -> dicts.

    JSON has no NaN or infinity, so a non-finite float becomes ``null`` and the object
    that held it says why: a ``"nonfinite"`` entry maps the number's key to ``"nan"``,
    ``"inf"`` or ``"-inf"`` (``"key[i]"`` for one inside a list under that key), e.g.
    ``{"loss": null, "grad_norm": null, "nonfinite": {"loss": "nan", "grad_norm": "inf"}}``.
    A nested object carries its own entry; a number in a list outside any object becomes
    ``null`` without a reason."""
    return _jsonable(obj, None, "")


def _dumps(obj: Any, indent: int | None = None) -> str:
    return json.dumps(to_jsonable(obj), indent=indent, allow_nan=False)


def _atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8", newline=""))


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return _atomic_write_text(path, text)


def write_json(path: str | Path, obj: Any, indent: int = 2) -> Path:
    """Write ``obj`` as JSON atomically (temporary file + ``os.replace``); valid JSON:
    non-finite numbers are ``null`` with their reason (:func:`to_jsonable`)."""
    return _atomic_write_text(path, _dumps(obj, indent) + "\n")


def _csv_cell(v: Any) -> Any:
    v = _plain(v)
    return v if isinstance(v, float) else to_jsonable(v)  # CSV has nan and inf: a float stays one


def write_csv(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write ``rows`` as CSV (header: the keys in order of first appearance), atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_columns(rows), lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({str(k): _csv_cell(v) for k, v in r.items()})
    return _atomic_write_text(path, buf.getvalue())


def append_jsonl(path: str | Path, record: Mapping[str, Any]) -> Path:
    """Append one JSON line to ``path`` and flush it (a log readable while a run goes on);
    non-finite numbers are ``null`` with their reason (:func:`to_jsonable`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = _dumps(record)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
    return path
