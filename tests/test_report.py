import csv
import json
import os
import struct

import pytest
import torch

from orderlab import report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    width, height = struct.unpack(">II", data[16:24])  # IHDR
    return width, height


def test_order_heatmap_writes_png_of_expected_size(tmp_path):
    import matplotlib.image as mpimg

    # rows like Decoded.ranks: prompt given (0), steps 1..k, padding (-1)
    ranks = torch.tensor([[0, 0, 1, 2, 3, -1], [0, 0, 2, 1, 1, 3], [0, 3, 3, 2, 1, -1]])
    tokens = torch.arange(18).view(3, 6)
    out = report.order_heatmap(ranks, tmp_path / "sub" / "order.png", title="t", tokens=tokens, figsize=(6, 4), dpi=50)
    assert out == tmp_path / "sub" / "order.png"
    assert _png_size(out) == (300, 200)
    img = mpimg.imread(out)
    assert img.shape[:2] == (200, 300)
    assert img[..., :3].std() > 0.05  # not a blank image


def test_order_colours_by_step_and_neutral_given_pad(tmp_path):
    import matplotlib
    import matplotlib.image as mpimg

    ranks = torch.tensor([[0, -1, 1, 4], [2, 3, 0, -1]])
    rgba, norm, _ = report.order_colors(ranks)
    assert rgba.shape == (2, 4, 4)
    given, pad = torch.tensor(report.GIVEN_COLOR), torch.tensor(report.PAD_COLOR)
    assert torch.equal(rgba[0, 0], given) and torch.equal(rgba[1, 2], given)
    assert torch.equal(rgba[0, 1], pad) and torch.equal(rgba[1, 3], pad)
    viridis = matplotlib.colormaps["viridis"]
    assert torch.allclose(rgba[0, 2], torch.tensor(viridis(0.0), dtype=torch.float32))  # first step
    assert torch.allclose(rgba[0, 3], torch.tensor(viridis(1.0), dtype=torch.float32))  # last step
    assert len({tuple(rgba[0, 2].tolist()), tuple(rgba[1, 0].tolist()), tuple(rgba[1, 1].tolist())}) == 3
    # and the picture shows them: the last step's colour (viridis yellow) and the given grey
    img = torch.tensor(mpimg.imread(report.order_heatmap(ranks, tmp_path / "h.png", dpi=40)))[..., :3]
    has = lambda c: ((img - torch.tensor(c[:3])).abs().amax(-1) < 0.02).sum() > 20  # noqa: E731
    assert has(viridis(1.0)) and has(report.GIVEN_COLOR) and has(viridis(0.0))
    assert not has((1.0, 0.0, 0.0))


def test_order_heatmap_max_rows_and_string_tokens(tmp_path):
    ranks = torch.randint(1, 10, (100, 12))
    out = report.order_heatmap(ranks, tmp_path / "m.png", tokens=["abcdefghijkl"] * 100, max_rows=5)
    assert _png_size(out)[0] > 0
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        report.order_heatmap(torch.ones(5, dtype=torch.long), tmp_path / "bad.png")


def test_nfe_histogram(tmp_path):
    out = report.nfe_histogram(torch.tensor([3, 3, 4, 7]), tmp_path / "nfe.png", figsize=(4, 3), dpi=50)
    assert _png_size(out) == (200, 150)


def test_write_json_is_atomic_and_serialises_tensors(tmp_path):
    p = tmp_path / "r" / "result.json"
    report.write_json(p, {"a": torch.tensor(1.5), "b": torch.arange(3), "p": tmp_path, "t": (1, 2)})
    assert json.loads(p.read_text()) == {"a": 1.5, "b": [0, 1, 2], "p": str(tmp_path), "t": [1, 2]}
    assert os.listdir(p.parent) == ["result.json"]  # no temporary left behind

    class Boom:
        pass

    with pytest.raises(TypeError):
        report.write_json(p, {"x": Boom()})
    assert json.loads(p.read_text())["a"] == 1.5  # the old file is intact
    assert os.listdir(p.parent) == ["result.json"]


def test_write_csv_and_append_jsonl(tmp_path):
    rows = [{"policy": "random", "acc": 0.5}, {"policy": "eb", "acc": 0.75, "nfe": 3}]
    p = report.write_csv(tmp_path / "t.csv", rows)
    with open(p) as f:
        got = list(csv.DictReader(f))
    assert got == [{"policy": "random", "acc": "0.5", "nfe": ""}, {"policy": "eb", "acc": "0.75", "nfe": "3"}]
    log = tmp_path / "log.jsonl"
    report.append_jsonl(log, {"step": 1, "loss": torch.tensor(2.0)})
    report.append_jsonl(log, {"step": 2, "loss": 1.0})
    assert [json.loads(x) for x in log.read_text().splitlines()] == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}]


def _strict(text: str):
    """``json.loads`` that rejects NaN and Infinity, as JSON itself does."""
    def reject(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=reject)


def test_nonfinite_numbers_are_null_with_the_reason(tmp_path):
    record = {"step": 3, "loss": float("nan"), "grad_norm": torch.tensor(float("inf")), "lr": 1e-3,
              "hist": [1.0, float("-inf")], "valid": {"nll": float("nan"), "rows": [{"x": float("inf")}]},
              "grid": [[0.5, float("nan")]]}
    with pytest.raises(ValueError, match="NaN"):
        _strict(json.dumps(record["loss"]))  # the check itself rejects a bare NaN
    log = report.append_jsonl(tmp_path / "metrics.jsonl", record)
    out = report.write_json(tmp_path / "results.json", {"rows": [record], "top": [float("nan")]})
    line = _strict(log.read_text())
    assert line == _strict(out.read_text())["rows"][0]
    assert line["loss"] is None and line["grad_norm"] is None and line["lr"] == 1e-3 and line["hist"] == [1.0, None]
    assert line["nonfinite"] == {"loss": "nan", "grad_norm": "inf", "hist[1]": "-inf", "grid[0][1]": "nan"}
    assert line["valid"] == {"nll": None, "rows": [{"x": None, "nonfinite": {"x": "inf"}}], "nonfinite": {"nll": "nan"}}
    assert _strict(out.read_text())["top"] == [None]  # in a list outside any object: null, no reason
    assert "nonfinite" not in report.to_jsonable({"a": 1.0, "b": [2.0]})
    # a record read back and written again keeps its reasons, merged with new ones
    again = report.to_jsonable({**line, "lr": float("nan")})
    assert again["nonfinite"] == {**line["nonfinite"], "lr": "nan"}
    # CSV has nan and inf: a cell says so rather than staying empty
    p = report.write_csv(tmp_path / "t.csv", [{"a": float("nan"), "b": torch.tensor(float("inf")), "c": (1, 2)}])
    assert p.read_text().splitlines()[1] == 'nan,inf,"[1, 2]"'


def test_results_table():
    from rich.console import Console

    rows = [{"policy": "random", "acc": 0.123456, "nfe": 12}, {"policy": "eb", "acc": 1.0}]
    t = report.results_table(rows, "decode")
    assert [c.header for c in t.columns] == ["policy", "acc", "nfe"] and t.row_count == 2
    console = Console(record=True, width=80)
    report.print_table(rows, "decode", console=console)
    text = console.export_text()
    assert "decode" in text and "0.1235" in text and "random" in text


# ---------------------------------------------------------------- column formats


def test_fixed_decimals_never_an_exponent():
    f = report.Fixed(4)
    assert [f(1), f(0.98834), f(11490.0), f(1e-5), f(-0.5)] == ["1.0000", "0.9883", "11490.0000", "0.0000", "-0.5000"]
    assert f((0.8125, 0.01304)) == "0.8125 ± 0.0130" and f((0.5, float("nan"))) == "0.5000" and f((0.5, None)) == "0.5000"
    assert f(None) == "" and f("x") == "x" and f(True) == "True" and f(torch.tensor(0.25)) == "0.2500"
    assert report.FORMATS["nfe"](12) == "12.0" and report.FORMATS["rate"](11490.04) == "11490.0"


@pytest.mark.parametrize(
    "values, expected",
    [
        ([1, 12, 3], ["1", "12", "3"]),  # integers: counts
        ([1, 0.98834, 0.5], ["1.0000", "0.9883", "0.5000"]),  # below 10: 4 decimals
        ([1.0, 11490.0, 2.5], ["1.0", "11490.0", "2.5"]),  # below 1e5: 1 decimal
        ([55.25, 3.0], ["55.250", "3.000"]),
        ([(0.5, 0.1), None, 2], ["0.5000 ± 0.1000", "", "2.0000"]),
        (["a", 1.0], ["a", "1.0"]),  # not all numbers: text
    ],
)
def test_column_format_is_fixed_per_column(values, expected):
    f = report.column_format(values)
    assert [f(v) for v in values] == expected


def test_printed_table_has_one_decimal_count_per_column():
    from rich.console import Console

    rows = [{"policy": "a", "score": 1.0, "tok/s": 11490.2, "NFE": 3}, {"policy": "b", "score": 0.98834, "tok/s": 9.5, "NFE": 12}]
    console = Console(record=True, width=120)
    report.print_table(rows, "t", console=console, formats={"score": "score", "tok/s": "rate"})
    text = console.export_text()
    assert "1.0000" in text and "0.9883" in text and "11490.2" in text and "9.5 " in text and "e+" not in text
    with pytest.raises(ValueError, match="unknown format 'percent'"):
        report.results_table(rows, formats={"score": "percent"})


def test_markdown_table():
    rows = [{"policy": "a|b", "solved": (0.5, 0.25), "NFE": 4.0}, {"policy": "c", "solved": (1.0, 0.0), "NFE": 10.0}]
    md = report.markdown_table(rows, "T", formats={"solved": "score", "NFE": "nfe"})
    assert md.splitlines() == [
        "## T",
        "",
        "| policy | solved | NFE |",
        "|:---|---:|---:|",
        "| a\\|b | 0.5000 ± 0.2500 | 4.0 |",
        "| c | 1.0000 ± 0.0000 | 10.0 |",
    ]


# ---------------------------------------------------------------- figures


def test_pareto_mask():
    # (cost, quality): (1, .2) and (2, .5) and (4, .9) are optimal; (3, .4) is dominated by (2, .5)
    x, y = [1, 2, 3, 4, 4, float("nan")], [0.2, 0.5, 0.4, 0.9, 0.8, 1.0]
    assert report.pareto_mask(x, y) == [True, True, False, True, False, False]
    assert report.pareto_mask([1, 1], [0.5, 0.5]) == [True, True]  # ties dominate nothing


def test_pareto_plot_and_order_grid(tmp_path):
    curves = {"threshold": [{"x": 4.0, "y": 0.5, "yerr": 0.1, "label": "tau=0.5"}, {"x": 8.0, "y": 0.9, "yerr": float("nan")}],
              "random": [{"x": 2.0, "y": 0.1, "label": "steps=2"}]}
    out = report.pareto_plot(curves, tmp_path / "p.png", title="a title", figsize=(6, 4), dpi=50)
    assert _png_size(out) == (300, 200)
    panels = [("tau=0.5", torch.tensor([[0, 1, 2], [2, 1, 0]])), ("tau=0.9", torch.tensor([[0, 1, 1], [-1, 1, 0]]))] * 2
    out = report.order_grid(panels, tmp_path / "g.png", title="threshold", dpi=40)
    assert _png_size(out)[0] > 0
    with pytest.raises(ValueError, match=r"panels\[1\] ranks"):
        report.order_grid([("a", torch.ones(2, 2)), ("b", torch.ones(3))], tmp_path / "bad.png")


def test_heatmap_title_fits_the_figure():
    """A title longer than the figure is wrapped onto lines that fit (it used to be cut off)."""
    title = "sliding_window(window=4, tau=0.9) with a long explanation: reveal step per position"
    fig = report._order_figure(torch.randint(1, 5, (4, 20)), title, None, 32, None, 100, "viridis")
    fig.canvas.draw()
    t = fig._suptitle
    box = t.get_window_extent(fig.canvas.get_renderer())
    assert "\n" in t.get_text() and t.get_text().replace("\n", " ") == title
    assert box.x0 >= 0 and box.x1 <= fig.bbox.width and box.y1 <= fig.bbox.height
    # one word too long for any line shrinks instead
    fig = report._order_figure(torch.randint(1, 5, (4, 20)), "x" * 120, None, 32, None, 100, "viridis")
    fig.canvas.draw()
    box = fig._suptitle.get_window_extent(fig.canvas.get_renderer())
    assert fig._suptitle.get_fontsize() == 6.0 and box.x0 >= 0 and box.x1 <= fig.bbox.width
    assert fig._suptitle.get_text().replace("\n", "") == "x" * 120  # broken, nothing lost


# the evaluation rows of docs/results.md, "The main job": (policy, accuracy, mean NFE); the
# learned policy and five heuristics within 0.4 forwards and 0.09 accuracy of each other
MAIN_JOB = [("random", 0.0723, 12.00), ("l2r", 0.2559, 12.00), ("r2l", 0.3281, 12.00), ("top_prob", 1.0, 12.00),
            ("margin", 1.0, 12.00), ("eb(gamma=0.001)", 1.0, 12.00), ("eb(gamma=0.01)", 0.8457, 6.74),
            ("eb(gamma=0.1)", 0.3594, 4.34), ("eb(gamma=1)", 0.0801, 3.13), ("threshold(tau=0.5)", 0.7734, 4.91),
            ("threshold(tau=0.7)", 0.9492, 5.02), ("threshold(tau=0.9)", 0.9961, 5.33),
            ("threshold(tau=0.99)", 1.0, 7.59), ("factor(f=0.5)", 0.9961, 5.25), ("factor(f=1)", 0.9863, 5.10),
            ("factor(f=2)", 0.9082, 4.96), ("policy", 0.9844, 5.12)]


def _main_job_rows():
    rows = [{"policy": p, "metric": "accuracy", "score": acc, "nfe_mean": nfe} for p, acc, nfe in MAIN_JOB]
    rows[-1]["sampled_score"] = 0.9844  # what marks a learned policy's row
    return rows


def _assert_labels_apart(fig):
    """No two point labels of an axes overlap, and each lies inside its axes."""
    from matplotlib.text import Text

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        ts = [t for t in ax.texts if t.get_text()]
        boxes = [Text.get_window_extent(t, renderer) for t in ts]  # the words (an Annotation's adds its leader line)
        frame = ax.get_window_extent(renderer)
        for i, a in enumerate(boxes):
            assert frame.x0 <= a.x0 and a.x1 <= frame.x1 and frame.y0 <= a.y0 and a.y1 <= frame.y1, ts[i].get_text()
            for j, b in enumerate(boxes[:i]):
                assert not a.overlaps(b), (ts[i].get_text(), ts[j].get_text())


def test_clustered_pareto_plot_has_a_zoom_and_labels_that_do_not_collide(tmp_path, monkeypatch):
    from orderlab import evaluate

    figures = []
    real = report._pareto_figure
    monkeypatch.setattr(report, "_pareto_figure", lambda *a, **k: figures.append(real(*a, **k)) or figures[-1])
    out = evaluate.evaluation_pareto(_main_job_rows(), tmp_path / "pareto.png", title="learned_policy")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = figures[0]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    full, zoom = fig.axes
    assert zoom.get_xlim()[1] - zoom.get_xlim()[0] < 1.0  # around the cluster at 5 forwards
    labels = {ax: [t for t in ax.texts if t.get_text()] for ax in (full, zoom)}
    texts = sorted(t.get_text() for ts in labels.values() for t in ts)
    assert texts == sorted([p for p, _, _ in MAIN_JOB[:-1]] + ["policy (learned)"])  # each point once
    in_zoom = {t.get_text() for t in labels[zoom]}
    assert {"policy (learned)", "factor(f=1)", "factor(f=0.5)", "threshold(tau=0.7)", "threshold(tau=0.9)"} <= in_zoom
    _assert_labels_apart(fig)
    # the learned policy is a star of its own, in the legend too
    stars = [ln for ln in zoom.get_lines() if ln.get_marker() == "*"]
    assert len(stars) == 1 and tuple(stars[0].get_xydata()[0]) == (5.12, 0.9844)
    assert "policy (learned)" in [t.get_text() for t in fig.legends[0].get_texts()]


def test_pareto_plot_without_a_cluster_has_one_panel():
    curves = {"threshold": [{"x": 4.0, "y": 0.5, "label": "tau=0.5"}, {"x": 8.0, "y": 0.9, "label": "tau=0.9"}],
              "random": [{"x": 2.0, "y": 0.1}], "l2r": [{"x": 12.0, "y": 0.3}]}
    fig = report._pareto_figure(curves, "NFE", "accuracy", None, None, 100)
    assert len(fig.axes) == 1 and sorted(t.get_text() for t in fig.axes[0].texts) == ["l2r", "random", "tau=0.5",
                                                                                        "tau=0.9"]
    # five policies at one place (an untrained model: same NFE, same score): no zoom, labels around it
    same = {name: [{"x": 3.0, "y": 0.0625}] for name in ("random", "top_prob", "margin", "tau=0.5", "tau=0.9")}
    fig = report._pareto_figure({**same, "l2r": [{"x": 3.0, "y": 0.0}]}, "NFE", "accuracy", None, None, 100)
    assert len(fig.axes) == 1 and len(fig.axes[0].texts) == 6
    _assert_labels_apart(fig)

