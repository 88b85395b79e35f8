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


def test_results_table():
    from rich.console import Console

    rows = [{"policy": "random", "acc": 0.123456, "nfe": 12}, {"policy": "eb", "acc": 1.0}]
    t = report.results_table(rows, "decode")
    assert [c.header for c in t.columns] == ["policy", "acc", "nfe"] and t.row_count == 2
    console = Console(record=True, width=80)
    report.print_table(rows, "decode", console=console)
    text = console.export_text()
    assert "decode" in text and "0.1235" in text and "random" in text
