"""Pretrained checkpoints: Hugging Face folders of LLaDA, Dream, SDAR, Llama, Qwen2 and Qwen3
loaded into orderlab's one transformer, and exported back (DESIGN.md section 4).

A :class:`Family` is two things read from the folder's ``config.json``: the architecture
options of :class:`~orderlab.model.Transformer` (SwiGLU, grouped-query attention, q/k norm,
biases, RoPE layout, an in-vocabulary [MASK], shifted logits) and a map from the family's
tensor names to orderlab's (:class:`Part` s: q, k and v of a layer fill the row ranges of
orderlab's fused ``qkv``). Which attention rule a checkpoint runs under is a config choice
(``attention:``), defaulting to the family's own (LLaDA, Dream: bidirectional; SDAR:
block-causal; AR families: causal, i.e. set-causal with a causal prompt), so every policy,
objective and likelihood applies to it unchanged. The loader owns file formats only.

Loading builds the model on the meta device, materialises it in the target dtype on the
target device, and reads each file tensor straight into its parameter (rows)
(:meth:`orderlab.weights.WeightFolder.read_into`): no float32 copy of the model, no second
full copy (``benchmarks/load_memory.py`` measures the peak). Every tensor is accounted for
before anything is read: a missing, unexpected or mis-shaped tensor is one
:class:`~orderlab.weights.WeightsError` line naming it and the folder.

Families (REFERENCES.md, "Pretrained checkpoints"; the formats the tests write are in
``tests/pretrained_formats.md``)::

    llada   model.transformer.{wte, blocks.N.{attn_norm, q_proj, k_proj, v_proj, attn_out,
            ff_norm, ff_proj (gate), up_proj, ff_out}, ln_f, ff_out}        OLMo-style config keys
    dream   Qwen2 names and keys, q/k/v biases, mask_token_id, shifted logits
    sdar    Qwen3 names and keys (per-head q/k RMSNorm), block-causal, block_size
    llama, qwen2, qwen3   transformers' own layouts (model.layers.N.self_attn.{q,k,v,o}_proj,
            mlp.{gate,up,down}_proj, input_layernorm, post_attention_layernorm, model.norm, lm_head)
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from orderlab.model import Transformer
from orderlab.registry import ConfigError, build, register
from orderlab.rules import AttentionRule
from orderlab.weights import WeightFolder, WeightsError, save_folder

__all__ = ["Family", "FAMILIES", "detect_family", "from_pretrained", "save_pretrained", "Pretrained", "DTYPES"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Part:
    """File tensor ``name`` fills rows ``[start, start + rows)`` of an orderlab tensor (all of it
    when ``rows`` is None)."""

    name: str
    start: int = 0
    rows: int | None = None
    optional: bool = False  # absent from a folder: the rows keep their initial values


# orderlab's appended [MASK] embedding row (a model whose family has no [MASK] token: an AR
# checkpoint adapted to diffusion): exported under this name so a reload keeps it; absent,
# it starts as the mean of the token embeddings
MASK_ROW = "orderlab.mask_embedding"


@dataclass(frozen=True)
class Family:
    """A checkpoint family: how its ``config.json`` names the architecture and its files
    name the tensors.

    ``model_types`` / ``architectures``: the ``config.json`` values that identify it.
    ``arch(config) -> Transformer kwargs`` (sizes, options, ``mask_id``). ``names``: orderlab
    tensor name (``{i}``: the layer) -> the family's name(s) of the same tensor, q/k/v
    listed in order for the fused ``qkv``. ``ignored``: file tensors that carry nothing
    (saved rotary tables). ``attention``: the default rule's spec for this config.
    """

    name: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    arch: Callable[[dict[str, Any]], dict[str, Any]]
    names: dict[str, tuple[str, ...]]
    attention: Callable[[dict[str, Any]], dict[str, Any]]
    ignored: tuple[str, ...] = ()

    def parts(self, model: Transformer) -> dict[str, list[Part]]:
        """orderlab tensor -> the file tensors that fill it, for every tensor of ``model``."""
        c = model.config
        qkv_rows = (c.n_heads * c.head_size, c.kv_heads * c.head_size, c.kv_heads * c.head_size)
        plan: dict[str, list[Part]] = {}
        for ours in model.state_dict():
            layer = re.match(r"blocks\.(\d+)\.(.*)", ours)
            template = f"blocks.{{i}}.{layer[2]}" if layer else ours
            if template not in self.names:
                raise WeightsError(self.name, f"no file name for orderlab tensor {ours!r} (family map incomplete)")
            names = [n.format(i=layer[1]) if layer else n for n in self.names[template]]
            if ours == "embed.weight" and model.mask_id == c.vocab_size:  # + orderlab's [MASK] row
                plan[ours] = [Part(names[0], 0, c.vocab_size), Part(MASK_ROW, c.vocab_size, 1, optional=True)]
            elif len(names) == 1:
                plan[ours] = [Part(names[0])]
            else:  # the fused q | k | v rows
                starts = [0, qkv_rows[0], qkv_rows[0] + qkv_rows[1]]
                plan[ours] = [Part(n, s, r) for n, s, r in zip(names, starts, qkv_rows)]
        return plan

    def ignores(self, name: str) -> bool:
        return any(re.fullmatch(p, name) for p in self.ignored)


# ------------------------------------------------------------------ config.json readers


def _rope_theta(cfg: dict[str, Any]) -> float:
    """``rope_theta``, from the top level or transformers 5's ``rope_parameters``; a RoPE
    scaling other than the default is not implemented (an error, never silently ignored)."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type")) or params.get("rope_type", "default")
    if kind != "default":
        raise ValueError(f"rope scaling {kind!r} is not supported (only plain RoPE)")
    return float(cfg.get("rope_theta", params.get("rope_theta", 10000.0)))


def _hf_arch(cfg: dict[str, Any], qkv_bias: bool, qk_norm: bool) -> dict[str, Any]:
    """Transformer kwargs of a transformers-style config (Llama, Qwen2, Qwen3 and their
    diffusion descendants Dream and SDAR)."""
    heads = cfg["num_attention_heads"]
    return dict(vocab_size=cfg["vocab_size"], max_len=cfg.get("max_position_embeddings", 4096),
                d_model=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=heads,
                n_kv_heads=cfg.get("num_key_value_heads") or heads, head_dim=cfg.get("head_dim"),
                mlp="swiglu", mlp_hidden=cfg["intermediate_size"], qk_norm=qk_norm,
                qkv_bias=cfg.get("attention_bias", qkv_bias), norm_eps=cfg.get("rms_norm_eps", 1e-6),
                rope_base=_rope_theta(cfg), rope_layout="halves", tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                mask_id=cfg.get("mask_token_id"))  # SDAR's <MASK>; an AR checkpoint has none: orderlab appends a row


def _llada_arch(cfg: dict[str, Any]) -> dict[str, Any]:
    """Transformer kwargs of LLaDA's OLMo-style config."""
    for key, want in (("include_bias", False), ("attention_layer_norm", False), ("alibi", False)):
        if cfg.get(key, want) != want:
            raise ValueError(f"LLaDA with {key}={cfg[key]!r} is not supported")
    if cfg.get("block_type", "llama") != "llama":
        raise ValueError(f"LLaDA block_type {cfg['block_type']!r} is not supported (only 'llama')")
    heads = cfg["n_heads"]
    vocab = cfg.get("embedding_size") or cfg["vocab_size"]
    return dict(vocab_size=vocab, max_len=cfg.get("max_sequence_length", 4096), d_model=cfg["d_model"],
                n_layers=cfg["n_layers"], n_heads=heads, n_kv_heads=cfg.get("n_kv_heads") or heads, mlp="swiglu",
                mlp_hidden=cfg["mlp_hidden_size"], qkv_bias=bool(cfg.get("include_qkv_bias", False)),
                norm_eps=cfg.get("rms_norm_eps", 1e-5), rope_base=_rope_theta(cfg), rope_layout="halves",
                tie_embeddings=bool(cfg.get("weight_tying", False)), mask_id=cfg.get("mask_token_id", 126336))


def _hf_names(prefix: str = "model.", head: str = "lm_head.weight") -> dict[str, tuple[str, ...]]:
    layer = prefix + "layers.{i}."
    return {
        "embed.weight": (prefix + "embed_tokens.weight",),
        "blocks.{i}.norm1.weight": (layer + "input_layernorm.weight",),
        "blocks.{i}.attn.qkv.weight": tuple(layer + f"self_attn.{p}_proj.weight" for p in "qkv"),
        "blocks.{i}.attn.qkv.bias": tuple(layer + f"self_attn.{p}_proj.bias" for p in "qkv"),
        "blocks.{i}.attn.q_norm.weight": (layer + "self_attn.q_norm.weight",),
        "blocks.{i}.attn.k_norm.weight": (layer + "self_attn.k_norm.weight",),
        "blocks.{i}.attn.proj.weight": (layer + "self_attn.o_proj.weight",),
        "blocks.{i}.norm2.weight": (layer + "post_attention_layernorm.weight",),
        "blocks.{i}.mlp.gate.weight": (layer + "mlp.gate_proj.weight",),
        "blocks.{i}.mlp.up.weight": (layer + "mlp.up_proj.weight",),
        "blocks.{i}.mlp.down.weight": (layer + "mlp.down_proj.weight",),
        "norm.weight": (prefix + "norm.weight",),
        "head.weight": (head,),
    }


def _llada_names() -> dict[str, tuple[str, ...]]:
    t = "model.transformer."
    b = t + "blocks.{i}."
    return {
        "embed.weight": (t + "wte.weight",),
        "blocks.{i}.norm1.weight": (b + "attn_norm.weight",),
        "blocks.{i}.attn.qkv.weight": tuple(b + f"{p}_proj.weight" for p in "qkv"),
        "blocks.{i}.attn.qkv.bias": tuple(b + f"{p}_proj.bias" for p in "qkv"),
        "blocks.{i}.attn.proj.weight": (b + "attn_out.weight",),
        "blocks.{i}.norm2.weight": (b + "ff_norm.weight",),
        "blocks.{i}.mlp.gate.weight": (b + "ff_proj.weight",),
        "blocks.{i}.mlp.up.weight": (b + "up_proj.weight",),
        "blocks.{i}.mlp.down.weight": (b + "ff_out.weight",),
        "norm.weight": (t + "ln_f.weight",),
        "head.weight": (t + "ff_out.weight",),
    }


_ROTARY = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)
_CAUSAL = lambda cfg: {"name": "set_causal", "prompt": "causal"}  # noqa: E731  an AR model: causal prompt, one token per set


def _ar_arch(qkv_bias: bool, qk_norm: bool) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """An AR checkpoint: its output at ``i - 1`` predicts ``i`` (shifted logits), so decoded
    left to right under set-causal attention it is exactly the AR model (see ``model._shift``)."""
    return lambda c: {**_hf_arch(c, qkv_bias, qk_norm), "shift_logits": True}
_BIDIRECTIONAL = lambda cfg: {"name": "bidirectional"}  # noqa: E731

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("llada", ("llada",), ("LLaDAModelLM",), _llada_arch, _llada_names(), _BIDIRECTIONAL),
    Family("dream", ("dream",), ("DreamModel",), lambda c: {**_hf_arch(c, True, False), "mask_id": c.get("mask_token_id", 151666),
                                                           "shift_logits": True}, _hf_names(), _BIDIRECTIONAL, _ROTARY),
    Family("sdar", ("sdar",), ("SDARForCausalLM",), lambda c: _hf_arch(c, False, True), _hf_names(),
           lambda c: {"name": "block_causal", "block_size": int(c.get("block_size", 4)), "prompt": "causal"}, _ROTARY),
    Family("llama", ("llama",), ("LlamaForCausalLM",), _ar_arch(False, False), _hf_names(), _CAUSAL, _ROTARY),
    Family("qwen2", ("qwen2",), ("Qwen2ForCausalLM",), _ar_arch(True, False), _hf_names(), _CAUSAL, _ROTARY),
    Family("qwen3", ("qwen3",), ("Qwen3ForCausalLM",), _ar_arch(False, True), _hf_names(), _CAUSAL, _ROTARY),
)}


def detect_family(config: dict[str, Any], folder: str | Path = "") -> Family:
    """The family of a ``config.json``: its ``model_type``, else its ``architectures``."""
    kind = str(config.get("model_type", "")).lower()
    archs = tuple(config.get("architectures") or ())
    for fam in FAMILIES.values():
        if kind in fam.model_types or any(a in fam.architectures for a in archs):
            return fam
    raise WeightsError(folder, f"unknown model family (config.json model_type={kind!r}, architectures={list(archs)}); "
                       f"known: {', '.join(FAMILIES)} (set family: to override)")


# ------------------------------------------------------------------ loading


@dataclass
class Pretrained:
    """Where a model came from: kept on ``model.pretrained`` for export."""

    path: Path
    family: str
    config: dict[str, Any] = field(repr=False)


def _resolve_dtype(dtype: str | torch.dtype, folder: WeightFolder) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":  # the checkpoint's own (config.json's torch_dtype / dtype, else its first float tensor)
        name = folder.config.get("torch_dtype") or folder.config.get("dtype")
        if name in DTYPES:
            return DTYPES[name]
        return next((folder.dtype(n) for n in folder.names if folder.dtype(n).is_floating_point), torch.float32)
    if dtype not in DTYPES:
        raise WeightsError(folder.path, f"dtype {dtype!r} is not one of {', '.join(['auto', *DTYPES])}")
    return DTYPES[dtype]


def _account(fam: Family, plan: dict[str, list[Part]], model: Transformer, folder: WeightFolder) -> None:
    """Every file tensor used exactly once, every model tensor filled, every shape right: one
    error line naming the first offending tensor, before anything is read."""
    state = model.state_dict()
    wanted = {p.name: (ours, p) for ours, parts in plan.items() for p in parts}
    for name, (ours, p) in wanted.items():
        if p.optional and name not in folder:
            continue
        if name not in folder:
            raise WeightsError(folder.path, f"missing tensor {name!r} (for orderlab's {ours}; family {fam.name})")
        t = state[ours]
        want = (p.rows if p.rows is not None else t.shape[0], *t.shape[1:])
        if tuple(folder.shape(name)) != tuple(want):
            raise WeightsError(folder.path, f"tensor {name!r} has shape {list(folder.shape(name))}, "
                               f"config.json implies {list(want)}")
    extra = [n for n in folder.names if n not in wanted and not fam.ignores(n)]
    if extra:
        raise WeightsError(folder.path, f"unexpected tensor {extra[0]!r} (family {fam.name}"
                           + (f", and {len(extra) - 1} more)" if len(extra) > 1 else ")"))


def from_pretrained(path: str | Path, family: str | None = None, dtype: str | torch.dtype = "auto",
                    attention: AttentionRule | dict | str | None = None, device: str | torch.device = "cpu",
                    max_len: int | None = None, shift_logits: bool | None = None) -> Transformer:
    """A :class:`~orderlab.model.Transformer` holding the checkpoint in ``path``.

    ``family``: override the detected family. ``dtype``: ``"auto"`` (the checkpoint's),
    ``"bfloat16"``, ``"float16"`` or ``"float32"``. ``attention``: the rule (default: the
    family's). ``max_len``: the longest sequence to run (default: the config's
    ``max_position_embeddings`` / ``max_sequence_length``; only sizes the RoPE tables).
    ``shift_logits``: override the family's (AR checkpoints and Dream shift): an AR
    checkpoint adapted to block diffusion (BD3-LM, SDAR) reads its predictions in place.
    """
    folder = WeightFolder(path)
    cfg = folder.config
    if family is not None and family not in FAMILIES:
        raise WeightsError(folder.path, f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    fam = FAMILIES[family] if family is not None else detect_family(cfg, folder.path)
    try:
        args = fam.arch(cfg)
    except KeyError as e:
        raise WeightsError(folder.path / "config.json", f"no key {e.args[0]!r} (a {fam.name} config needs it)") from None
    except ValueError as e:
        raise WeightsError(folder.path / "config.json", str(e)) from None
    if max_len is not None:
        args["max_len"] = max_len
    if shift_logits is not None:
        args["shift_logits"] = bool(shift_logits)
    if not isinstance(attention, AttentionRule):
        attention = build("attention", attention if attention is not None else fam.attention(cfg), path="attention")
    target = _resolve_dtype(dtype, folder)
    with torch.device("meta"):
        model = Transformer(attention=attention, **args)
    plan = fam.parts(model)
    _account(fam, plan, model, folder)
    model = model.to(target).to_empty(device=device)  # allocated once, in the target dtype, on the device
    state = model.state_dict()
    with torch.no_grad():
        for ours, parts in plan.items():
            for p in parts:
                dest = state[ours] if p.rows is None else state[ours].narrow(0, p.start, p.rows)
                if p.name in folder:
                    folder.read_into(p.name, dest)
                elif p.name == MASK_ROW:
                    dest.copy_(_mask_row_start(state[ours], p.start))
    model.pretrained = Pretrained(folder.path, fam.name, cfg)
    return model.eval()


@register("model", "pretrained")
def pretrained(path: str, family: str | None = None, dtype: str = "auto", attention: AttentionRule | None = None,
               max_len: int | None = None, shift_logits: bool | None = None, device: str | None = None) -> Transformer:
    """``model: {name: pretrained, path: <folder>, dtype: bfloat16, family: null, attention: null, shift_logits: null}``:
    :func:`from_pretrained` from a YAML; the vocabulary size and length are the checkpoint's,
    not the task's. ``device``: the run's (the build sets it; weights load straight onto it)."""
    try:
        return from_pretrained(path, family, dtype, attention, device or "cpu", max_len, shift_logits)
    except WeightsError as e:
        raise ConfigError("path", str(e)) from None


pretrained.needs = ("device",)


# ------------------------------------------------------------------ export


_WEIGHT_FILE = re.compile(r"config\.json|.*\.safetensors|.*\.safetensors\.index\.json")


def _file_tensors(model: Transformer, fam: Family) -> Iterator[tuple[str, Tensor]]:
    """(family name, tensor) of every file tensor, the fused rows split back (views)."""
    state = model.state_dict()
    for ours, parts in fam.parts(model).items():
        for p in parts:
            t = state[ours] if p.rows is None else state[ours].narrow(0, p.start, p.rows)
            if p.name == MASK_ROW and torch.equal(t, _mask_row_start(state[ours], p.start)):
                continue  # orderlab's [MASK] row, still what a load starts it at: nothing to keep
            yield p.name, t


def _mask_row_start(embed: Tensor, vocab: int) -> Tensor:
    """``[1, C]``: where orderlab's appended [MASK] row starts, the mean token embedding
    (accumulated in float32 a few thousand rows at a time: a float32 copy of a whole 8B
    model's embedding would be 2 GB above the model)."""
    total = sum(rows.float().sum(0, keepdim=True) for rows in embed[:vocab].split(4096))
    return (total / vocab).to(embed.dtype)


def save_pretrained(model: Transformer, path: str | Path, family: str | None = None, config: dict[str, Any] | None = None,
                    max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write ``model`` as a folder of its family's format: ``config.json`` (the source
    checkpoint's, its dtype updated), safetensors (sharded past ``max_shard_bytes``) under
    the family's tensor names, and every other file of the folder it was loaded from
    (tokenizer, chat template, generation config, remote code), so that other tools load it.
    Loading the written folder gives bit-identical tensors."""
    src: Pretrained | None = getattr(model, "pretrained", None)
    name = family or (src.family if src else None)
    if name is None or name not in FAMILIES:
        raise WeightsError(path, f"save_pretrained: which family's format? (family={name!r}; known: {', '.join(FAMILIES)})")
    cfg = dict(config if config is not None else (src.config if src else {}))
    if not cfg:
        raise WeightsError(path, "save_pretrained: a config.json is needed (the model was not loaded from a folder: pass config=)")
    dtype = next(model.parameters()).dtype
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    extra: dict[str, bytes] = {}
    if src is not None:
        for f in sorted(src.path.iterdir()):
            if f.is_file() and not _WEIGHT_FILE.fullmatch(f.name):
                extra[f.name] = f.read_bytes()
    tensors = {n: t.detach().cpu() for n, t in _file_tensors(model, FAMILIES[name])}
    return save_folder(path, tensors, cfg, max_shard_bytes=max_shard_bytes, extra_files=extra)
