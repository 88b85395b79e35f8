"""orderlab.weights: Hugging Face safetensors folders, read into existing tensors, written back."""

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from orderlab import weights
from orderlab.weights import INDEX, SINGLE, WeightFolder, WeightsError, save_folder

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64]


def _tensors(dtype):
    g = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        make = lambda *s: torch.randn(s, generator=g).to(dtype)  # noqa: E731
    else:
        make = lambda *s: torch.randint(-(2**40), 2**40, s, generator=g, dtype=dtype)  # noqa: E731
    return {"embed.weight": make(7, 4), "layers.0.w": make(4, 4), "layers.1.w": make(4, 4), "norm": make(4),
            "scalar": make()}


def _bits(t):
    return t.reshape(-1).view(torch.uint8)


def _raw(path, header, data=b""):
    """A safetensors file written by hand (to break it on purpose)."""
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def _one_line(err, *words):
    msg = str(err.value)
    assert "\n" not in msg
    for w in words:
        assert str(w) in msg, (w, msg)


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shard_bytes", [2**30, 40], ids=["single", "sharded"])
def test_round_trip_bit_identical(tmp_path, dtype, shard_bytes):
    src = _tensors(dtype)
    save_folder(tmp_path, src, {"model_type": "llama"}, max_shard_bytes=shard_bytes)
    folder = WeightFolder(tmp_path)
    assert folder.names == sorted(src)
    assert folder.nbytes == sum(t.numel() * t.element_size() for t in src.values())
    assert folder.config == {"model_type": "llama"}
    assert (tmp_path / SINGLE).is_file() == (shard_bytes == 2**30)
    for name, t in src.items():
        assert folder.shape(name) == t.shape and folder.dtype(name) == dtype
        dest = torch.empty(t.shape, dtype=dtype)
        assert folder.read_into(name, dest) is dest
        assert torch.equal(_bits(dest), _bits(t))
        assert torch.equal(folder.read(name), t)


def test_sharded_index_layout_as_hugging_face_writes_it(tmp_path):
    src = _tensors(torch.float32)  # 112 + 64 + 64 + 16 + 4 bytes
    save_folder(tmp_path, src, {}, max_shard_bytes=130)
    text = (tmp_path / INDEX).read_text()
    index = json.loads(text)
    assert text == json.dumps(index, indent=2, sort_keys=True) + "\n"
    assert index == {
        "metadata": {"total_size": 260},
        "weight_map": {  # name order, a new shard when the next tensor would pass 130 bytes
            "embed.weight": "model-00001-of-00003.safetensors",
            "layers.0.w": "model-00002-of-00003.safetensors",
            "layers.1.w": "model-00002-of-00003.safetensors",
            "norm": "model-00003-of-00003.safetensors",
            "scalar": "model-00003-of-00003.safetensors",
        },
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json", "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors", INDEX]


def test_safetensors_library_reads_what_we_write(tmp_path):
    src = _tensors(torch.bfloat16)
    save_folder(tmp_path, src, {}, max_shard_bytes=100, metadata={"source": "orderlab"})
    got = {}
    for shard in sorted(tmp_path.glob("model-*.safetensors")):
        got.update(load_file(shard))
        with safe_open(shard, "pt") as f:
            assert f.metadata() == {"format": "pt", "source": "orderlab"}
    assert got.keys() == src.keys()
    for name in src:
        assert torch.equal(got[name], src[name])


def test_we_read_what_the_library_writes(tmp_path):
    src = {"a": torch.randn(3, 5), "b": torch.arange(4, dtype=torch.int32), "c": torch.ones(2, 2, dtype=torch.bool)}
    save_file(src, tmp_path / SINGLE, metadata={"format": "pt"})
    folder = WeightFolder(tmp_path)
    for name, t in src.items():
        assert torch.equal(folder.read(name), t)


def test_views_non_contiguous_and_tied_tensors_saved_as_their_values(tmp_path):
    fused = torch.randn(12, 4, dtype=torch.bfloat16)  # q, k, v rows of one storage
    base = torch.randn(6, 5)
    src = {
        "q": fused[0:4], "k": fused[4:8], "v": fused[8:12],
        "transposed": base.t(),                 # [5, 6], strides (1, 5)
        "strided": base[:, ::2],                # [6, 3]
        "embed": base, "lm_head": base,         # tied: the same tensor twice
        "expanded": torch.tensor(2.0).expand(3, 3),
    }
    save_folder(tmp_path, src, {})
    folder = WeightFolder(tmp_path)
    for name, t in src.items():
        assert torch.equal(folder.read(name), t), name
    assert torch.equal(load_file(tmp_path / SINGLE)["transposed"], base.t())


def test_export_of_a_loaded_folder_is_byte_identical(tmp_path):
    src = _tensors(torch.bfloat16)
    save_folder(tmp_path / "a", src, {"x": 1}, max_shard_bytes=40, extra_files={"tokenizer.json": "{}"})
    folder = WeightFolder(tmp_path / "a")
    again = {name: folder.read(name) for name in folder.names}
    save_folder(tmp_path / "b", again, folder.config, max_shard_bytes=40,
                extra_files={"tokenizer.json": (tmp_path / "a" / "tokenizer.json").read_bytes()})
    for file in sorted((tmp_path / "a").iterdir()):
        assert file.read_bytes() == (tmp_path / "b" / file.name).read_bytes(), file.name


def test_read_into_converts_dtype_and_fills_non_contiguous_destinations(tmp_path):
    w = torch.randn(6, 8)
    save_folder(tmp_path, {"w": w}, {})
    folder = WeightFolder(tmp_path)
    dest = torch.empty(6, 8, dtype=torch.bfloat16)
    assert torch.equal(folder.read_into("w", dest), w.to(torch.bfloat16))
    assert torch.equal(folder.read("w", dtype=torch.float16), w.to(torch.float16))
    holder = torch.zeros(8, 6)
    folder.read_into("w", holder.t())  # a transposed view: filled through copy_
    assert torch.equal(holder.t(), w)


def test_read_into_with_matching_dtype_reads_straight_into_the_destination(tmp_path, monkeypatch):
    save_folder(tmp_path, {"w": torch.randn(64, 32), "h": torch.randn(8)}, {})
    folder = WeightFolder(tmp_path)
    targets = []
    real = weights._read_bytes
    spy = lambda entry, name, t: (targets.append(t.data_ptr()), real(entry, name, t))  # noqa: E731
    monkeypatch.setattr(weights, "_read_bytes", spy)
    dest = torch.empty(64, 32)
    folder.read_into("w", dest)
    assert targets == [dest.data_ptr()]  # no temporary: the file's bytes land in dest
    converted = torch.empty(8, dtype=torch.bfloat16)
    folder.read_into("h", converted)
    assert targets[1] != converted.data_ptr()  # a temporary in the file's dtype, then copy_


def test_parameter_destination_keeps_its_identity(tmp_path):
    w = torch.randn(3, 3)
    save_folder(tmp_path, {"w": w}, {})
    p = torch.nn.Parameter(torch.empty(3, 3))
    WeightFolder(tmp_path).read_into("w", p)
    assert torch.equal(p.detach(), w) and p.requires_grad


# --------------------------------------------------------------------------- atomic writes


def test_failed_save_leaves_the_previous_folder_and_no_temporaries(tmp_path, monkeypatch):
    old = _tensors(torch.float32)
    save_folder(tmp_path, old, {"v": 1}, max_shard_bytes=100)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    calls = []
    real = weights._write_shard

    def failing(tmp, tensors, names, meta):
        calls.append(names)
        if len(calls) == 2:
            raise OSError("disk full")
        real(tmp, tensors, names, meta)

    monkeypatch.setattr(weights, "_write_shard", failing)
    with pytest.raises(OSError, match="disk full"):
        save_folder(tmp_path, {k: v + 1 for k, v in old.items()}, {"v": 2}, max_shard_bytes=100)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_save_over_a_sharded_folder_removes_its_stale_shards(tmp_path):
    src = _tensors(torch.float32)
    save_folder(tmp_path, src, {}, max_shard_bytes=40)
    save_folder(tmp_path, src, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", SINGLE]
    save_folder(tmp_path, src, {}, max_shard_bytes=130)
    assert not (tmp_path / SINGLE).exists()
    assert len(WeightFolder(tmp_path).names) == len(src)


def test_save_rejects_bad_names_and_metadata(tmp_path):
    with pytest.raises(WeightsError, match="extra file 'config.json'"):
        save_folder(tmp_path, {"a": torch.ones(1)}, {}, extra_files={"config.json": "{}"})
    with pytest.raises(WeightsError, match="metadata 'n'"):
        save_folder(tmp_path, {"a": torch.ones(1)}, {}, metadata={"n": 3})
    with pytest.raises(WeightsError, match="'a' is on the meta device"):
        save_folder(tmp_path, {"a": torch.ones(1, device="meta")}, {})


# --------------------------------------------------------------------------- load errors


@pytest.fixture
def good(tmp_path):
    """A sharded folder: a, b in shard 1 of 2, c in shard 2."""
    save_folder(tmp_path, {"a": torch.randn(4, 4), "b": torch.randn(4, 4), "c": torch.randn(8)}, {"x": 1},
                max_shard_bytes=128)
    return tmp_path


def test_truncated_file_names_the_file_and_the_last_tensor(tmp_path):
    save_folder(tmp_path, {"a": torch.randn(4, 4), "b": torch.randn(4, 4)}, {})
    file = tmp_path / SINGLE
    file.write_bytes(file.read_bytes()[:-10])
    with pytest.raises(WeightsError, match="truncated") as err:
        WeightFolder(tmp_path)
    _one_line(err, file, "'b'")


def test_garbage_header(tmp_path):
    file = tmp_path / SINGLE
    file.write_bytes(struct.pack("<Q", 12) + b"\x00not json!!!" + b"\x00" * 64)
    with pytest.raises(WeightsError, match="garbage header") as err:
        WeightFolder(tmp_path)
    _one_line(err, file)


def test_header_length_past_the_end_of_the_file(tmp_path):
    file = tmp_path / SINGLE
    file.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    with pytest.raises(WeightsError, match="header length 10000 runs past the end") as err:
        WeightFolder(tmp_path)
    _one_line(err, file)
    file.write_bytes(b"\x01\x02")
    with pytest.raises(WeightsError, match="shorter than the 8-byte header length"):
        WeightFolder(tmp_path)


@pytest.mark.parametrize("offsets, match", [
    ([0, 80], "run past the end of the data"),
    ([0, 8], "8 bytes for shape \\[4\\] F32, which needs 16"),
    ([12, 4], "bad data_offsets"),
], ids=["past_end", "wrong_length", "reversed"])
def test_offsets_outside_the_data(tmp_path, offsets, match):
    _raw(tmp_path / SINGLE, {"w": {"dtype": "F32", "shape": [4], "data_offsets": offsets}}, b"\x00" * 16)
    with pytest.raises(WeightsError, match=match) as err:
        WeightFolder(tmp_path)
    _one_line(err, tmp_path / SINGLE, "'w'")


def test_overlapping_tensors_and_unknown_dtype(tmp_path):
    _raw(tmp_path / SINGLE, {"u": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                             "v": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, b"\x00" * 16)
    with pytest.raises(WeightsError, match="'u' and 'v' overlap"):
        WeightFolder(tmp_path)
    _raw(tmp_path / SINGLE, {"w": {"dtype": "F4", "shape": [4], "data_offsets": [0, 2]}}, b"\x00" * 2)
    with pytest.raises(WeightsError, match="tensor 'w' has unknown dtype 'F4'") as err:
        WeightFolder(tmp_path)
    _one_line(err, tmp_path / SINGLE)


def test_missing_shard(good):
    (good / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(WeightsError, match="missing shard") as err:
        WeightFolder(good)
    _one_line(err, good / "model-00002-of-00002.safetensors", "'c'")


def test_index_naming_a_tensor_the_shard_lacks(good):
    index = json.loads((good / INDEX).read_text())
    index["weight_map"]["d"] = "model-00002-of-00002.safetensors"
    (good / INDEX).write_text(json.dumps(index))
    with pytest.raises(WeightsError, match="the shard lacks it") as err:
        WeightFolder(good)
    _one_line(err, good / "model-00002-of-00002.safetensors", "'d'")


def test_shard_holding_a_tensor_the_index_does_not_list(good):
    index = json.loads((good / INDEX).read_text())
    del index["weight_map"]["b"]
    (good / INDEX).write_text(json.dumps(index))
    with pytest.raises(WeightsError, match="does not list it") as err:
        WeightFolder(good)
    _one_line(err, good / "model-00001-of-00002.safetensors", "'b'")


def test_unreadable_index_and_no_weights(tmp_path, good):
    (good / INDEX).write_text("{nope")
    with pytest.raises(WeightsError, match="unreadable index") as err:
        WeightFolder(good)
    _one_line(err, good / INDEX)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(WeightsError, match="no model.safetensors and no model.safetensors.index.json") as err:
        WeightFolder(empty)
    _one_line(err, empty, "pytorch_model.bin")


def test_shape_mismatch_in_read_into(good):
    folder = WeightFolder(good)
    shapes = r"'a' has shape \[4, 4\] in the file but the destination has shape \[4, 5\]"
    with pytest.raises(WeightsError, match=shapes) as err:
        folder.read_into("a", torch.empty(4, 5))
    _one_line(err, good / "model-00001-of-00002.safetensors", good)
    with pytest.raises(WeightsError, match="'a': the destination is on the meta device"):
        folder.read_into("a", torch.empty(4, 4, device="meta"))


def test_unknown_tensor_name_suggests_the_nearest(good):
    with pytest.raises(WeightsError, match="no tensor 'aa'.*did you mean 'a'") as err:
        WeightFolder(good).read("aa")
    _one_line(err, good)


def test_missing_and_invalid_config(good):
    folder = WeightFolder(good)
    (good / "config.json").write_text("{'single': quotes}")
    with pytest.raises(WeightsError, match="invalid JSON") as err:
        folder.config
    _one_line(err, good / "config.json")
    (good / "config.json").unlink()
    with pytest.raises(WeightsError, match="no config.json") as err:
        WeightFolder(good).config
    _one_line(err, good / "config.json")


def test_file_truncated_after_opening(tmp_path):
    save_folder(tmp_path, {"a": torch.randn(64)}, {})
    folder = WeightFolder(tmp_path)
    file = tmp_path / SINGLE
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(WeightsError, match="'a': the file ends after") as err:
        folder.read("a")
    _one_line(err, file)
