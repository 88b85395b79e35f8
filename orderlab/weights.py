"""Hugging Face safetensors folders: read with bounded memory, written back atomically.

The file layer of pretrained checkpoints (issue 17). A folder holds ``config.json`` and
either one ``model.safetensors`` or shards ``model-0000i-of-0000N.safetensors`` listed in
``model.safetensors.index.json`` (``{"metadata": {"total_size": ...}, "weight_map":
{tensor: shard}}``). Which tensor goes to which model parameter is the model families'
business; this module only knows files, and every way a folder can be broken is a
:class:`WeightsError` whose one-line message names the file (or folder) and the tensor or
key: a truncated or corrupt file, a garbage header, an unknown dtype, a missing shard, an
index and shard that disagree, a destination of another shape.

A safetensors file (https://github.com/huggingface/safetensors#format)::

    8 bytes        N, the header length (unsigned little-endian)
    N bytes        JSON: {name: {"dtype": "BF16", "shape": [..], "data_offsets": [b, e]},
                          "__metadata__": {str: str}}      (optional)
    data           tensor bytes, little-endian, row-major; [b, e) relative to here

:class:`WeightFolder` reads and checks every header when it opens (only headers: a few KB
per file) and reads tensor data only when asked, one tensor at a time, into memory the
caller owns (:meth:`WeightFolder.read_into`). Loading a model is then: build it (on the
meta device, then materialise empty), ``read_into`` every parameter. Peak memory above the
empty model is the largest single tensor at most, and nothing when dtypes match.

Why plain file reads and not ``safetensors.safe_open`` (measured: ``python
benchmarks/load_memory.py --params 350e6 --dtype bfloat16 --shards 2``; 361M parameters,
0.722 GB of bf16 in 2 shards, 2 CPU cores; a fresh process per method, its peak RSS
(``VmHWM``) above the baseline taken just before the empty destination tensors are
allocated, divided by the checkpoint's bytes)::

    read_into: readinto straight into the destination      1.00x  (0.723 GB)
    safe_open + get_tensor + copy_, one file open at a time  1.42x  (1.024 GB)
    safetensors.torch.load_file per shard, then copy_        1.42x  (1.024 GB)
    read_into, float32 file into bf16 destinations           0.53x of the 1.444 GB file
                                                             (the model + one f32 tensor)

With one file instead of two shards the other two hold the checkpoint twice: 2.06x each
(``--params 30e6 --d-model 256 --shards 1``; read_into still 1.00x).
``safe_open`` memory-maps the file and its pages count in the process's resident set for
as long as the file is open; ``get_tensor`` then copies them into a fresh tensor, and
copying that into the model makes a third. ``file.readinto`` on a byte view of the
destination tensor moves the bytes from the page cache (which RSS does not count) into
the tensor's own memory: one copy, no mapping. The ``safetensors`` library still writes
(:func:`save_folder` is ``safetensors.torch.save_file`` per shard), so what we write is
what every other tool writes; reading the header ourselves also lets every error name the
tensor and the file.

Floor 1: imports torch, safetensors and the standard library only.
"""

from __future__ import annotations

import ctypes
import difflib
import json
import os
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

import torch

from orderlab.files import write_temp

__all__ = ["WeightsError", "WeightFolder", "save_folder", "SINGLE", "INDEX", "CONFIG", "shard_name"]

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
CONFIG = "config.json"
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_MAX_HEADER = 100 * 2**20  # the safetensors library's own limit on N

# safetensors dtype names -> torch dtypes (only those this torch has)
_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, attr)
    for name, attr in {
        "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
        "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
        "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
        "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E4M3FNUZ": "float8_e4m3fnuz",
        "F8_E5M2FNUZ": "float8_e5m2fnuz", "F8_E8M0": "float8_e8m0fnu", "C64": "complex64",
    }.items()
    if hasattr(torch, attr)
}


class WeightsError(ValueError):
    """A weights folder cannot be used; the message is one line and names the file or
    folder (``.path``) and the tensor or key that is wrong."""

    def __init__(self, path: str | Path, message: str):
        self.path = Path(path)
        super().__init__(f"{path}: {' '.join(str(message).split())}")


def shard_name(i: int, n: int) -> str:
    """The Hugging Face name of shard ``i`` (from 1) of ``n``: ``model-00001-of-00004.safetensors``."""
    return f"model-{i:05d}-of-{n:05d}.safetensors"


# --------------------------------------------------------------------------- headers


@dataclass(frozen=True)
class _Entry:
    """Where one tensor lives: its file and its bytes' absolute position there."""

    file: Path
    dtype: torch.dtype
    shape: torch.Size
    start: int  # absolute byte offset in the file (8 + N + data_offsets[0])
    nbytes: int


def _read_header(file: Path) -> dict[str, _Entry]:
    """Parse and check one file's header against the file's size: every tensor's dtype is
    known, its bytes lie inside the data section, their count is numel * itemsize, and no
    two tensors overlap. A truncated file fails here (its last tensor ends past the end)."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise WeightsError(file, f"truncated: {size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > _MAX_HEADER:
                raise WeightsError(file, f"header length {n} runs past the end of the file ({size} bytes): "
                                         "truncated or not a safetensors file")
            raw = f.read(n)
    except OSError as e:
        raise WeightsError(file, f"cannot read: {e.strerror or e}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(file, f"garbage header (not JSON: {e}): corrupt or not a safetensors file") from None
    if not isinstance(header, dict):
        raise WeightsError(file, f"garbage header: a JSON {type(header).__name__}, not an object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict):
        raise WeightsError(file, "header key '__metadata__' is not an object")
    data_len = size - 8 - n
    entries = {name: _entry(file, name, spec, 8 + n, data_len) for name, spec in header.items()}
    _check_overlaps(file, entries)
    return entries


def _entry(file: Path, name: str, spec: Any, base: int, data_len: int) -> _Entry:
    """One header entry, checked; ``base`` is where the data section starts."""
    if not isinstance(spec, dict) or not {"dtype", "shape", "data_offsets"} <= spec.keys():
        raise WeightsError(file, f"tensor {name!r}: header entry {spec!r} lacks dtype, shape or data_offsets")
    dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
    if dtype not in _DTYPES:
        raise WeightsError(file, f"tensor {name!r} has unknown dtype {dtype!r} (known: {', '.join(_DTYPES)})")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise WeightsError(file, f"tensor {name!r} has a bad shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise WeightsError(file, f"tensor {name!r} has bad data_offsets {offsets!r}")
    begin, end = offsets
    if end > data_len:
        raise WeightsError(file, f"tensor {name!r}: data_offsets [{begin}, {end}) run past the end of the data "
                                 f"({data_len} bytes): truncated file")
    expect = prod(shape) * _DTYPES[dtype].itemsize
    if end - begin != expect:
        raise WeightsError(file, f"tensor {name!r}: {end - begin} bytes for shape {shape} {dtype}, "
                                 f"which needs {expect}")
    return _Entry(file, _DTYPES[dtype], torch.Size(shape), base + begin, end - begin)


def _check_overlaps(file: Path, entries: Mapping[str, _Entry]) -> None:
    """Two tensors sharing bytes means a corrupt header (the format forbids it)."""
    spans = sorted((e.start, e.start + e.nbytes, name) for name, e in entries.items() if e.nbytes)
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            raise WeightsError(file, f"tensors {a!r} and {b!r} overlap in the data section: corrupt header")


def _read_index(folder: Path) -> dict[str, str]:
    """``weight_map`` of the index: tensor name -> shard file name (a plain name in ``folder``)."""
    index = folder / INDEX
    try:
        doc = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(index, f"unreadable index: {e}") from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict):
        raise WeightsError(index, "no 'weight_map' object (tensor name -> shard file)")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
            raise WeightsError(index, f"tensor {name!r} maps to {shard!r}, not a file name in the folder")
    return weight_map


# --------------------------------------------------------------------------- reading


class WeightFolder:
    """A Hugging Face safetensors folder, headers read and checked, data read on demand.

    ``names`` (sorted), ``shape(name)``, ``dtype(name)``, ``nbytes`` (all tensors),
    ``config`` (``config.json``), ``read_into(name, dest)``, ``read(name)``. A folder with
    both ``model.safetensors`` and an index is read from ``model.safetensors`` (as
    ``transformers`` does)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise WeightsError(self.path, "no such checkpoint folder")
        self._entries = self._open()
        self.names: list[str] = sorted(self._entries)
        self.nbytes: int = sum(e.nbytes for e in self._entries.values())
        self._config: dict[str, Any] | None = None

    def _open(self) -> dict[str, _Entry]:
        if (self.path / SINGLE).is_file():
            return _read_header(self.path / SINGLE)
        if not (self.path / INDEX).is_file():
            found = sorted(p.name for p in self.path.iterdir() if p.suffix in (".bin", ".safetensors", ".pt", ".pth"))
            hint = f" (found {found[:4]}: only safetensors folders are read)" if found else ""
            raise WeightsError(self.path, f"no {SINGLE} and no {INDEX}{hint}")
        weight_map = _read_index(self.path)
        entries: dict[str, _Entry] = {}
        for shard in sorted(set(weight_map.values())):
            file = self.path / shard
            if not file.is_file():
                first = min(n for n, s in weight_map.items() if s == shard)
                raise WeightsError(file, f"missing shard: {INDEX} maps tensor {first!r} to it")
            header = _read_header(file)
            self._check_shard(file, shard, header, weight_map)
            entries.update(header)
        return entries

    @staticmethod
    def _check_shard(file: Path, shard: str, header: Mapping[str, _Entry], weight_map: Mapping[str, str]) -> None:
        """The index and the shard agree: every tensor the index puts here is here, and every
        tensor here is the index's for this shard (else one of the two is stale)."""
        listed = sorted(n for n, s in weight_map.items() if s == shard)
        for name in listed:
            if name not in header:
                raise WeightsError(file, f"tensor {name!r} is listed for this shard in {INDEX} but the shard lacks it")
        for name in sorted(header):
            if weight_map.get(name) != shard:
                where = f"maps it to {weight_map[name]!r}" if name in weight_map else "does not list it"
                raise WeightsError(file, f"tensor {name!r} is in this shard but {INDEX} {where}")

    def __repr__(self) -> str:
        files = len({e.file for e in self._entries.values()})
        return (f"WeightFolder({str(self.path)!r}, {len(self.names)} tensors, "
                f"{self.nbytes / 1e9:.2f} GB in {files} file(s))")

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            near = difflib.get_close_matches(name, self.names, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise WeightsError(self.path, f"no tensor {name!r} in the checkpoint{hint}") from None

    def shape(self, name: str) -> torch.Size:
        return self._entry(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self._entry(name).dtype

    def file(self, name: str) -> Path:
        """The safetensors file that holds ``name``."""
        return self._entry(name).file

    @property
    def config(self) -> dict[str, Any]:
        """``config.json`` parsed (read once)."""
        if self._config is None:
            file = self.path / CONFIG
            if not file.is_file():
                raise WeightsError(file, f"no {CONFIG} in the checkpoint folder")
            try:
                config = json.loads(file.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise WeightsError(file, f"invalid JSON: {e}") from None
            if not isinstance(config, dict):
                raise WeightsError(file, f"a JSON {type(config).__name__}, not an object")
            self._config = config
        return self._config

    def read_into(self, name: str, dest: torch.Tensor) -> torch.Tensor:
        """Fill ``dest`` (any dtype, any device, same shape) with tensor ``name``; returns it.

        Same dtype and ``dest`` a contiguous CPU tensor: the file's bytes are read straight
        into ``dest``'s memory, no temporary. Otherwise they are read into one temporary of
        the file's dtype on the CPU, then ``dest.copy_(tmp)`` converts and moves them: one
        tensor's worth of extra memory, never the whole model's."""
        entry = self._entry(name)
        if dest.device.type == "meta":
            raise WeightsError(entry.file, f"tensor {name!r}: the destination is on the meta device (materialise "
                                           "the model first, e.g. with to_empty)")
        if tuple(dest.shape) != tuple(entry.shape):
            raise WeightsError(entry.file, f"tensor {name!r} has shape {list(entry.shape)} in the file but the "
                                           f"destination has shape {list(dest.shape)} (folder {self.path})")
        if _direct(dest, entry.dtype):
            _read_bytes(entry, name, dest)
        else:
            tmp = torch.empty(entry.shape, dtype=entry.dtype)  # [shape] in the file's dtype, one tensor
            _read_bytes(entry, name, tmp)
            with torch.no_grad():
                dest.copy_(tmp)
        return dest

    def read(self, name: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
        """A new tensor holding ``name`` (in the file's dtype unless ``dtype``); for small tensors."""
        entry = self._entry(name)
        return self.read_into(name, torch.empty(entry.shape, dtype=dtype or entry.dtype, device=device))


def _direct(dest: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the file's bytes can go straight into ``dest``'s memory."""
    return dest.dtype == dtype and dest.device.type == "cpu" and dest.is_contiguous() and dest.layout == torch.strided


def _read_bytes(entry: _Entry, name: str, dest: torch.Tensor) -> None:
    """Read the tensor's bytes into ``dest`` (contiguous CPU, the file's dtype) with
    ``readinto`` on a byte view of its memory; a loop, because one ``read`` returns at
    most ~2 GiB on Linux."""
    if entry.nbytes == 0:
        return
    view = memoryview((ctypes.c_ubyte * entry.nbytes).from_address(dest.data_ptr())).cast("B")
    done = 0
    with open(entry.file, "rb", buffering=0) as f:
        f.seek(entry.start)
        while done < entry.nbytes:
            got = f.readinto(view[done:])
            if not got:
                raise WeightsError(entry.file, f"tensor {name!r}: the file ends after {done} of its {entry.nbytes} "
                                               "bytes (truncated since it was opened?)")
            done += got


# --------------------------------------------------------------------------- writing


def save_folder(
    path: str | Path,
    tensors: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    max_shard_bytes: int = 5 * 2**30,
    metadata: Mapping[str, str] | None = None,
    extra_files: Mapping[str, bytes | str] | None = None,
) -> Path:
    """Write ``tensors`` as a Hugging Face folder: ``model.safetensors``, or shards
    ``model-0000i-of-0000N.safetensors`` (filled in name order, each at most
    ``max_shard_bytes`` unless one tensor alone is larger) and ``model.safetensors.index.json``;
    ``config.json``; ``extra_files`` (name -> contents, e.g. tokenizer files). Every
    safetensors header carries ``{"format": "pt"}`` plus ``metadata``. Returns the folder.

    Atomic: every file is written under a temporary name and flushed first; then the old
    index / ``model.safetensors`` (what makes a folder look complete) is removed, the new
    files renamed into place, and the new index or ``model.safetensors`` renamed last. A
    crash leaves the old folder or a folder without that file, never a mixed one that looks
    whole. Shards of an earlier save that the new index does not name are removed.

    Tensors may be views, non-contiguous, on any device: each shard is made contiguous on
    the CPU just before it is written (at most one shard of extra memory; none for
    contiguous CPU tensors), and ``tensors[name]`` is looked up twice (sizes first, then
    per shard), so a lazy mapping keeps only one shard in memory."""
    folder = Path(path)
    names = sorted(tensors)
    sizes = {name: _nbytes(folder, name, tensors[name]) for name in names}
    shards = _split(names, sizes, max_shard_bytes)
    files = [SINGLE] if len(shards) == 1 else [shard_name(i + 1, len(shards)) for i in range(len(shards))]
    header_meta = _header_metadata(folder, metadata)
    extra = dict(extra_files or {})
    _check_extra_names(folder, extra)
    folder.mkdir(parents=True, exist_ok=True)

    texts = {CONFIG: _json(dict(config)), **extra}
    if len(shards) > 1:
        weight_map = {name: file for file, shard in zip(files, shards) for name in shard}
        texts[INDEX] = _json({"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map})
    written: list[tuple[Path, Path]] = []  # (temporary, final)
    try:
        for file, shard in zip(files, shards):
            tmp = write_temp(folder, file, lambda tmp, s=shard: _write_shard(tmp, tensors, s, header_meta))
            written.append((tmp, folder / file))
        for file, content in texts.items():
            data = content.encode("utf-8") if isinstance(content, str) else bytes(content)
            written.append((write_temp(folder, file, lambda tmp, d=data: tmp.write_bytes(d)), folder / file))
        _commit(folder, written, keep=set(files))
    finally:
        for tmp, _ in written:
            tmp.unlink(missing_ok=True)
    return folder


def _json(obj: Any) -> str:
    """JSON as transformers' ``save_pretrained`` writes config.json and the index."""
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def _nbytes(folder: Path, name: str, tensor: Any) -> int:
    if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
        raise WeightsError(folder, f"tensor {name!r}: not a dense tensor ({type(tensor).__name__})")
    if tensor.device.type == "meta":
        raise WeightsError(folder, f"tensor {name!r} is on the meta device: no data to save")
    if tensor.dtype not in _DTYPES.values():
        raise WeightsError(folder, f"tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store")
    return tensor.numel() * tensor.element_size()


def _split(names: list[str], sizes: Mapping[str, int], max_bytes: int) -> list[list[str]]:
    """Greedy, in name order: a new shard starts when the next tensor would pass ``max_bytes``."""
    if max_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_bytes}")
    shards: list[list[str]] = [[]]
    total = 0
    for name in names:
        if shards[-1] and total + sizes[name] > max_bytes:
            shards.append([])
            total = 0
        shards[-1].append(name)
        total += sizes[name]
    return shards


def _header_metadata(folder: Path, metadata: Mapping[str, str] | None) -> dict[str, str]:
    meta = {"format": "pt", **(metadata or {})}
    for key, value in meta.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise WeightsError(folder, f"metadata {key!r}: {value!r}: safetensors metadata keys and values "
                                       "must be strings")
    return meta


def _check_extra_names(folder: Path, extra: Mapping[str, Any]) -> None:
    for name in extra:
        plain = isinstance(name, str) and Path(name).name == name and name not in ("", ".", "..")
        if not plain or name in (CONFIG, SINGLE, INDEX) or _SHARD.fullmatch(name):
            raise WeightsError(folder, f"extra file {name!r}: must be a plain file name other than the weights "
                                       f"and {CONFIG}")


def _write_shard(tmp: Path, tensors: Mapping[str, torch.Tensor], names: Iterable[str], meta: dict[str, str]) -> None:
    """One safetensors file with the ``safetensors`` library."""
    from safetensors.torch import save_file

    save_file(_storable(tensors, names), str(tmp), metadata=meta)


def _storable(tensors: Mapping[str, torch.Tensor], names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The shard's tensors as ``save_file`` takes them: detached, contiguous, on the CPU, no
    two sharing bytes (tied weights: the later one is cloned; ``save_file`` refuses them)."""
    out: dict[str, torch.Tensor] = {}
    spans: list[tuple[int, int]] = []  # CPU byte ranges [start, end) taken so far
    for name in names:
        t = tensors[name].detach()
        t = t.to("cpu") if t.device.type != "cpu" else t.contiguous()
        start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
        if t.numel() and any(s < end and start < e for s, e in spans):
            t = t.clone()
            start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
        spans.append((start, end))
        out[name] = t
    return out


def _commit(folder: Path, written: list[tuple[Path, Path]], keep: set[str]) -> None:
    """Rename the temporaries into place, the file that makes the folder look complete
    last; remove the old one first, and afterwards stale shards of an earlier save."""
    for marker in (INDEX, SINGLE):
        (folder / marker).unlink(missing_ok=True)
    commit = [w for w in written if w[1].name in (INDEX, SINGLE)]
    for tmp, final in [w for w in written if w not in commit] + commit:
        os.replace(tmp, final)
    for stale in folder.iterdir():
        if _SHARD.fullmatch(stale.name) and stale.name not in keep:
            stale.unlink()
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    """Make the renames durable (where the OS lets a folder be fsynced)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
