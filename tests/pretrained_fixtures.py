"""Tiny random pretrained checkpoints in each family's released folder format, and their
reference logits from ``transformers`` (a test-only dependency; orderlab never imports it).

The formats (config keys, tensor names, sources) are written down in
``tests/pretrained_formats.md``; this module mirrors them at toy sizes:

- ``write_checkpoint(folder, family, ...)`` writes ``config.json`` with the family's real
  keys and ``model.safetensors`` (or shards plus ``model.safetensors.index.json``) with
  random, non-trivial values under the family's real tensor names. Writing needs only
  ``torch`` and ``safetensors``.
- ``reference_logits(folder, tokens, mask, positions)`` builds the matching ``transformers``
  class (Llama for LLaDA and Llama, Qwen2 for Dream and Qwen2, Qwen3 for SDAR and Qwen3)
  from the folder, renames the tensors into that class's names, and returns float32 logits
  under an explicit attention mask (``mask[b, i, j]`` True: query ``i`` sees key ``j``).
  Dream's logits are returned **unshifted**: its prediction for position ``i`` is read at
  ``i - 1`` (position 0 reuses its own output); applying the shift is the loader's job.
- ``causal_mask``, ``bidirectional_mask``, ``block_causal_mask`` build those masks.

Special ids are scaled down into a vocabulary of 64 (``SPECIAL_TOKENS``): e.g. LLaDA's
[MASK] 126336 becomes 60, its end-of-text 126081 becomes 57.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

FAMILIES = ("llada", "dream", "sdar", "llama", "qwen2", "qwen3")

# family -> the transformers class that serves as its reference
REFERENCE_CLASS = {
    "llada": "LlamaForCausalLM",
    "llama": "LlamaForCausalLM",
    "dream": "Qwen2ForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "sdar": "Qwen3ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

# config.json "model_type" -> family
MODEL_TYPES = {"llada": "llada", "Dream": "dream", "sdar": "sdar", "llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}

# Scaled-down special ids (real ids in the comments); all inside the default vocabulary of 64.
SPECIAL_TOKENS = {
    # LLaDA-8B: [MASK] <|mdm_mask|> 126336, eos = pad 126081, bos 126080 (a tokenizer id, not in config.json)
    "llada": {"mask_token_id": 60, "eos_token_id": 57, "pad_token_id": 57, "bos_token_id": 56},
    # Dream-v0: <|mask|> 151666, pad = eos = <|endoftext|> 151643 (bos: see pretrained_formats.md)
    "dream": {"mask_token_id": 60, "eos_token_id": 56, "pad_token_id": 56, "bos_token_id": 56},
    # SDAR-*-Chat: <MASK> 151669, bos = eos = <|endoftext|> 151643
    "sdar": {"mask_token_id": 61, "eos_token_id": 56, "bos_token_id": 56},
    # Llama-3: bos 128000, eos 128009
    "llama": {"bos_token_id": 62, "eos_token_id": 63},
    # Qwen2.5 base: bos = eos = 151643
    "qwen2": {"bos_token_id": 56, "eos_token_id": 56},
    # Qwen3: bos 151643, eos 151645
    "qwen3": {"bos_token_id": 56, "eos_token_id": 57},
}

ROPE_THETA = {"llada": 500000.0, "dream": 1000000.0, "sdar": 1000000.0, "llama": 500000.0, "qwen2": 1000000.0, "qwen3": 1000000.0}
RMS_EPS = {"llada": 1e-5, "dream": 1e-6, "sdar": 1e-6, "llama": 1e-5, "qwen2": 1e-6, "qwen3": 1e-6}
SDAR_BLOCK_SIZE = 4  # SDAR's default block size (config key "block_size")
MAX_POSITIONS = 128

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


# ---------------------------------------------------------------------------------------------
# tensor layout
# ---------------------------------------------------------------------------------------------


def _hf_shapes(family: str, d: int, n_layers: int, n_heads: int, n_kv: int, inter: int, hd: int, vocab: int, tie: bool) -> dict:
    """Tensor name -> shape in the transformers (Llama/Qwen2/Qwen3) naming."""
    qkv_bias = family in ("dream", "qwen2")
    qk_norm = family in ("sdar", "qwen3")
    shapes = {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,)}
    if not tie:
        shapes["lm_head.weight"] = (vocab, d)
    for i in range(n_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (d,)
        shapes[p + "post_attention_layernorm.weight"] = (d,)
        shapes[p + "self_attn.q_proj.weight"] = (n_heads * hd, d)
        shapes[p + "self_attn.k_proj.weight"] = (n_kv * hd, d)
        shapes[p + "self_attn.v_proj.weight"] = (n_kv * hd, d)
        shapes[p + "self_attn.o_proj.weight"] = (d, n_heads * hd)
        if qkv_bias:
            shapes[p + "self_attn.q_proj.bias"] = (n_heads * hd,)
            shapes[p + "self_attn.k_proj.bias"] = (n_kv * hd,)
            shapes[p + "self_attn.v_proj.bias"] = (n_kv * hd,)
        if qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (hd,)
            shapes[p + "self_attn.k_norm.weight"] = (hd,)
        shapes[p + "mlp.gate_proj.weight"] = (inter, d)
        shapes[p + "mlp.up_proj.weight"] = (inter, d)
        shapes[p + "mlp.down_proj.weight"] = (d, inter)
    return shapes


# LLaDA (OLMo layout, LLaDAModelLM wraps LLaDAModel as `model`) <-> transformers Llama names
_LLADA_TOP = {
    "model.transformer.wte.weight": "model.embed_tokens.weight",
    "model.transformer.ln_f.weight": "model.norm.weight",
    "model.transformer.ff_out.weight": "lm_head.weight",
}
_LLADA_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "q_proj.weight": "self_attn.q_proj.weight",
    "k_proj.weight": "self_attn.k_proj.weight",
    "v_proj.weight": "self_attn.v_proj.weight",
    "attn_out.weight": "self_attn.o_proj.weight",
    "ff_norm.weight": "post_attention_layernorm.weight",
    "ff_proj.weight": "mlp.gate_proj.weight",  # LLaDA applies the activation to ff_proj's output
    "up_proj.weight": "mlp.up_proj.weight",
    "ff_out.weight": "mlp.down_proj.weight",
}


def llada_to_hf_name(name: str) -> str:
    """A LLaDA tensor name -> the transformers Llama name holding the same tensor."""
    if name in _LLADA_TOP:
        return _LLADA_TOP[name]
    prefix = "model.transformer.blocks."
    if name.startswith(prefix):
        i, rest = name[len(prefix):].split(".", 1)
        return f"model.layers.{i}.{_LLADA_BLOCK[rest]}"
    raise KeyError(f"not a LLaDA tensor name: {name}")


def hf_to_llada_name(name: str) -> str:
    """The transformers Llama name -> LLaDA's name for the same tensor."""
    for k, v in _LLADA_TOP.items():
        if v == name:
            return k
    prefix = "model.layers."
    if name.startswith(prefix):
        i, rest = name[len(prefix):].split(".", 1)
        for k, v in _LLADA_BLOCK.items():
            if v == rest:
                return f"model.transformer.blocks.{i}.{k}"
    raise KeyError(f"no LLaDA name for {name}")


def _random_tensor(name: str, shape: tuple, gen: torch.Generator) -> torch.Tensor:
    """Non-trivial values: norm weights in [0.5, 1.5], biases ~ 0.2 N(0,1), matrices ~ N(0, 1/fan_in)."""
    if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
        return 0.5 + torch.rand(shape, generator=gen)
    if name.endswith(".bias"):
        return 0.2 * torch.randn(shape, generator=gen)
    if "embed_tokens" in name:
        return torch.randn(shape, generator=gen)
    return torch.randn(shape, generator=gen) / math.sqrt(shape[-1])


# ---------------------------------------------------------------------------------------------
# config.json per family (the released layout, scaled down)
# ---------------------------------------------------------------------------------------------


def _config(family: str, *, vocab, d, n_layers, n_heads, n_kv, inter, hd, tie, dtype_name, embedding_size) -> dict:
    sp = SPECIAL_TOKENS[family]
    theta, eps = ROPE_THETA[family], RMS_EPS[family]
    if family == "llada":
        # Key set of GSAI-ML/LLaDA-8B-Instruct config.json (no torch_dtype, no head_dim key).
        return {
            "activation_type": "silu",
            "alibi": False,
            "alibi_bias_max": 8.0,
            "architectures": ["LLaDAModelLM"],
            "attention_dropout": 0.0,
            "attention_layer_norm": False,
            "attention_layer_norm_with_affine": True,
            "auto_map": {
                "AutoConfig": "configuration_llada.LLaDAConfig",
                "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
                "AutoModel": "modeling_llada.LLaDAModelLM",
            },
            "bias_for_layer_norm": False,
            "block_group_size": 1,
            "block_type": "llama",
            "d_model": d,
            "embedding_dropout": 0.0,
            "embedding_size": embedding_size,
            "eos_token_id": sp["eos_token_id"],
            "flash_attention": False,
            "include_bias": False,
            "include_qkv_bias": False,
            "init_cutoff_factor": None,
            "init_device": "meta",
            "init_fn": "mitchell",
            "init_std": 0.02,
            "input_emb_norm": False,
            "layer_norm_type": "rms",
            "layer_norm_with_affine": True,
            "mask_token_id": sp["mask_token_id"],
            "max_sequence_length": MAX_POSITIONS,
            "mlp_hidden_size": inter,
            "mlp_ratio": 4,
            "model_type": "llada",
            "multi_query_attention": None,
            "n_heads": n_heads,
            "n_kv_heads": n_kv,
            "n_layers": n_layers,
            "pad_token_id": sp["pad_token_id"],
            "precision": "amp_bf16",
            "residual_dropout": 0.0,
            "rms_norm_eps": eps,
            "rope": True,
            "rope_full_precision": True,
            "rope_theta": theta,
            "scale_logits": False,
            "transformers_version": "4.46.3",
            "use_cache": False,
            "vocab_size": vocab,
            "weight_tying": tie,
        }
    common = {
        "attention_dropout": 0.0,
        "bos_token_id": sp["bos_token_id"],
        "eos_token_id": sp["eos_token_id"],
        "hidden_act": "silu",
        "hidden_size": d,
        "initializer_range": 0.02,
        "intermediate_size": inter,
        "max_position_embeddings": MAX_POSITIONS,
        "num_attention_heads": n_heads,
        "num_hidden_layers": n_layers,
        "num_key_value_heads": n_kv,
        "rms_norm_eps": eps,
        "rope_scaling": None,
        "rope_theta": theta,
        "tie_word_embeddings": tie,
        "torch_dtype": dtype_name,
        "vocab_size": vocab,
    }
    if family == "dream":
        # Keys of DreamConfig (configuration_dream.py) as a Qwen2.5-style config.json.
        return dict(
            sorted(
                {
                    **common,
                    "architectures": ["DreamModel"],
                    "auto_map": {
                        "AutoConfig": "configuration_dream.DreamConfig",
                        "AutoModel": "modeling_dream.DreamModel",
                    },
                    "mask_token_id": sp["mask_token_id"],
                    "pad_token_id": sp["pad_token_id"],
                    "max_window_layers": n_layers,
                    "model_type": "Dream",
                    "sliding_window": None,
                    "transformers_version": "4.46.2",
                    "use_cache": False,
                    "use_sliding_window": False,
                }.items()
            )
        )
    if family == "sdar":
        # Key set of JetLM/SDAR-4B-Chat and SDAR-8B-Chat config.json.
        return dict(
            sorted(
                {
                    **common,
                    "architectures": ["SDARForCausalLM"],
                    "auto_map": {
                        "AutoConfig": "configuration_sdar.SDARConfig",
                        "AutoModel": "modeling_sdar.SDARModel",
                        "AutoModelForCausalLM": "modeling_sdar.SDARForCausalLM",
                    },
                    "attention_bias": False,
                    "attn_implementation": "flex_attention",
                    "block_size": SDAR_BLOCK_SIZE,
                    "debug": False,
                    "ep_size": 1,
                    "fuse_cross_entropy": True,
                    "head_dim": hd,
                    "mask_token_id": sp["mask_token_id"],
                    "max_window_layers": n_layers,
                    "micro_forward": False,
                    "model_type": "sdar",
                    "skip_checkpoint": False,
                    "sliding_window": None,
                    "transformers_version": "4.52.4",
                    "use_cache": False,
                    "use_deepep": False,
                    "use_sliding_window": False,
                }.items()
            )
        )
    if family == "llama":
        # Llama-3.x style config.json.
        return dict(
            sorted(
                {
                    **common,
                    "architectures": ["LlamaForCausalLM"],
                    "attention_bias": False,
                    "head_dim": hd,
                    "mlp_bias": False,
                    "model_type": "llama",
                    "pretraining_tp": 1,
                    "transformers_version": "4.45.0",
                    "use_cache": True,
                }.items()
            )
        )
    if family == "qwen2":
        # Qwen2.5 style config.json (q/k/v biases are implied by the architecture, no key).
        return dict(
            sorted(
                {
                    **common,
                    "architectures": ["Qwen2ForCausalLM"],
                    "max_window_layers": n_layers,
                    "model_type": "qwen2",
                    "sliding_window": None,
                    "transformers_version": "4.43.1",
                    "use_cache": True,
                    "use_sliding_window": False,
                }.items()
            )
        )
    if family == "qwen3":
        # Qwen3 style config.json (head_dim explicit: Qwen3-0.6B has head_dim != hidden/heads).
        return dict(
            sorted(
                {
                    **common,
                    "architectures": ["Qwen3ForCausalLM"],
                    "attention_bias": False,
                    "head_dim": hd,
                    "max_window_layers": n_layers,
                    "model_type": "qwen3",
                    "sliding_window": None,
                    "transformers_version": "4.51.0",
                    "use_cache": True,
                    "use_sliding_window": False,
                }.items()
            )
        )
    raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------


def write_checkpoint(
    folder,
    family: str,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    vocab_size: int = 64,
    d_model: int = 32,
    n_layers: int = 2,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    intermediate: int = 48,
    head_dim: int | None = None,
    sharded: bool = False,
    tie: bool = False,
    **extra,
) -> Path:
    """Write a tiny random checkpoint of ``family`` into ``folder`` (created) and return it.

    ``head_dim`` may differ from ``d_model // n_heads`` only for qwen3, sdar and llama (their
    configs carry a ``head_dim`` key). ``sharded`` writes ``model-0000k-of-0000n.safetensors``
    shards (``n_shards``, default 2; tensors dealt round-robin in name order, so one layer spans
    several shards, as in the real LLaDA index) plus ``model.safetensors.index.json``.

    ``extra``: ``n_shards``; ``embedding_size`` (LLaDA only: the padded embedding/output rows,
    >= ``vocab_size``; the real 8B has both 126464); ``config_style`` ("hub", default: the
    released config.json layout with top-level ``rope_theta`` and ``torch_dtype``; or
    "transformers", llama/qwen2/qwen3 only: the config exactly as the installed transformers'
    ``save_pretrained`` writes it, e.g. ``rope_parameters`` and ``dtype`` in transformers 5);
    any other keyword overrides (or adds) that key in config.json, e.g. ``mask_token_id=10``,
    ``block_size=2``, ``rope_theta=10.0``.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype {dtype} not supported")
    n_shards = int(extra.pop("n_shards", 2))
    config_style = extra.pop("config_style", "hub")
    embedding_size = int(extra.pop("embedding_size", vocab_size))
    if embedding_size != vocab_size and family != "llada":
        raise ValueError("embedding_size is a LLaDA key; other families have vocab_size only")
    if embedding_size < vocab_size:
        raise ValueError("embedding_size must be >= vocab_size")
    hd = head_dim if head_dim is not None else d_model // n_heads
    if hd * n_heads != d_model and family not in ("qwen3", "sdar", "llama"):
        raise ValueError(f"{family} has head_dim = d_model / n_heads (no head_dim key)")
    if n_heads % n_kv_heads:
        raise ValueError("n_heads must be a multiple of n_kv_heads")
    if config_style not in ("hub", "transformers"):
        raise ValueError("config_style: 'hub' or 'transformers'")
    if config_style == "transformers" and family not in ("llama", "qwen2", "qwen3"):
        raise ValueError("config_style='transformers' exists for llama/qwen2/qwen3 only")
    rows = embedding_size if family == "llada" else vocab_size
    for key in ("mask_token_id", "bos_token_id", "eos_token_id", "pad_token_id"):
        value = extra.get(key, SPECIAL_TOKENS[family].get(key))
        if value is not None and not 0 <= value < vocab_size:
            raise ValueError(f"{key}={value} is outside the vocabulary ({vocab_size}); pass {key}=... explicitly")

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    config = _config(
        family, vocab=vocab_size, d=d_model, n_layers=n_layers, n_heads=n_heads, n_kv=n_kv_heads,
        inter=intermediate, hd=hd, tie=tie, dtype_name=_DTYPE_NAMES[dtype], embedding_size=embedding_size,
    )
    config.update(extra)
    if config_style == "transformers":
        _transformers_config(family, config).save_pretrained(str(folder))
    else:
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in sorted(_hf_shapes(family, d_model, n_layers, n_heads, n_kv_heads, intermediate, hd, rows, tie).items()):
        t = _random_tensor(name, shape, gen).to(dtype).contiguous()
        tensors[hf_to_llada_name(name) if family == "llada" else name] = t
    _save(folder, tensors, sharded=sharded, n_shards=n_shards)
    return folder


def _save(folder: Path, tensors: dict, *, sharded: bool, n_shards: int) -> None:
    from safetensors.torch import save_file

    for old in list(folder.glob("model*.safetensors")) + list(folder.glob("model.safetensors.index.json")):
        old.unlink()
    meta = {"format": "pt"}
    if not sharded:
        save_file(tensors, str(folder / "model.safetensors"), metadata=meta)
        return
    names = sorted(tensors)
    n = max(2, min(n_shards, len(names)))
    files = [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    weight_map = {name: files[i % n] for i, name in enumerate(names)}
    for k, fname in enumerate(files):
        save_file({nm: tensors[nm] for nm in names if weight_map[nm] == fname}, str(folder / fname), metadata=meta)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def read_config(folder) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())


def family_of(folder) -> str:
    """The family of a checkpoint folder, from its config.json ``model_type``."""
    model_type = read_config(folder)["model_type"]
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown model_type {model_type!r}")
    return MODEL_TYPES[model_type]


def read_tensors(folder) -> dict:
    """Every tensor of the folder under its stored name and dtype (single file or shards)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        out = {}
        for fname in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            out.update(load_file(str(folder / fname)))
        return out
    return load_file(str(folder / "model.safetensors"))


# ---------------------------------------------------------------------------------------------
# transformers reference
# ---------------------------------------------------------------------------------------------


def _hf_config_kwargs(family: str, cfg: dict) -> dict:
    """The family's config.json -> keyword arguments of the reference transformers config."""
    if family == "llada":
        return dict(
            vocab_size=cfg.get("embedding_size") or cfg["vocab_size"],
            hidden_size=cfg["d_model"],
            intermediate_size=cfg["mlp_hidden_size"],
            num_hidden_layers=cfg["n_layers"],
            num_attention_heads=cfg["n_heads"],
            num_key_value_heads=cfg.get("n_kv_heads") or cfg["n_heads"],
            head_dim=cfg["d_model"] // cfg["n_heads"],
            max_position_embeddings=cfg["max_sequence_length"],
            rms_norm_eps=cfg["rms_norm_eps"],
            rope_theta=cfg["rope_theta"],
            tie_word_embeddings=cfg["weight_tying"],
            attention_bias=False,
            mlp_bias=False,
            hidden_act="silu",
        )
    theta = cfg["rope_theta"] if "rope_theta" in cfg else cfg["rope_parameters"]["rope_theta"]
    kw = dict(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_key_value_heads"],
        max_position_embeddings=cfg["max_position_embeddings"],
        rms_norm_eps=cfg["rms_norm_eps"],
        rope_theta=theta,
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        hidden_act=cfg.get("hidden_act", "silu"),
    )
    if family in ("sdar", "qwen3", "llama"):
        kw["head_dim"] = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    if family in ("sdar", "qwen3"):
        kw["attention_bias"] = cfg.get("attention_bias", False)
    if family == "llama":
        kw["attention_bias"] = cfg.get("attention_bias", False)
        kw["mlp_bias"] = cfg.get("mlp_bias", False)
    if family in ("dream", "qwen2", "sdar", "qwen3"):
        kw["use_sliding_window"] = False
    return kw


def _hf_config(family: str, cfg: dict):
    import transformers

    cls = {"LlamaForCausalLM": transformers.LlamaConfig, "Qwen2ForCausalLM": transformers.Qwen2Config,
           "Qwen3ForCausalLM": transformers.Qwen3Config}[REFERENCE_CLASS[family]]
    return cls(**_hf_config_kwargs(family, cfg))


def _transformers_config(family: str, hub_cfg: dict):
    """The installed transformers' config for the same architecture (its save_pretrained writes config.json)."""
    c = _hf_config(family, hub_cfg)
    c.architectures = [REFERENCE_CLASS[family]]
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if hub_cfg.get(key) is not None:
            setattr(c, key, hub_cfg[key])
    c.dtype = hub_cfg.get("torch_dtype", "float32")
    return c


def reference_model(folder):
    """The transformers reference model (float32, eager attention, eval mode) holding the folder's weights."""
    import transformers

    family = family_of(folder)
    cfg = read_config(folder)
    hf_cfg = _hf_config(family, cfg)
    hf_cfg._attn_implementation = "eager"
    cls = getattr(transformers, REFERENCE_CLASS[family])
    torch_state = torch.random.get_rng_state()
    model = cls(hf_cfg)  # its random init is overwritten below; keep the caller's RNG untouched
    torch.random.set_rng_state(torch_state)
    model = model.float().eval()

    stored = read_tensors(folder)
    state = {(llada_to_hf_name(k) if family == "llada" else k): v.float() for k, v in stored.items()}
    tie = hf_cfg.tie_word_embeddings
    if tie:
        if "lm_head.weight" in state:
            raise ValueError("tied checkpoint stores an output matrix")
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    expected = {k for k in model.state_dict() if not k.endswith("rotary_emb.inv_freq")}
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ValueError(f"tensor names do not match {REFERENCE_CLASS[family]}: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    model.load_state_dict(state, strict=False)
    if tie:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def additive_mask(mask: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Bool [B or 1, N, N] (True: attend) -> the additive float mask [B or 1, 1, N, N] (0 or dtype's min).

    transformers 5 hands a 4-D mask to the attention function unchanged (masking_utils:
    ``_preprocess_mask_arguments`` returns early for 4-D masks); eager attention *adds* it to the
    scores, SDPA passes it as ``attn_mask``. A float mask is right for both; a boolean one would be
    added as 0/1 by eager attention, silently wrong.
    """
    if mask.dtype != torch.bool or mask.dim() != 3 or mask.shape[-1] != mask.shape[-2]:
        raise ValueError("mask: Bool[B or 1, N, N]")
    if not mask.any(-1).all():
        raise ValueError("every query must see at least one key")
    out = torch.zeros(mask.shape, dtype=dtype)
    out.masked_fill_(~mask, torch.finfo(dtype).min)
    return out[:, None]


@torch.no_grad()
def reference_logits(folder, tokens: torch.Tensor, mask: torch.Tensor | None = None, positions: torch.Tensor | None = None, *, model=None) -> torch.Tensor:
    """Float32 logits [B, N, V] of the folder's checkpoint from the matching transformers class.

    ``mask[b, i, j]`` True: query ``i`` may attend key ``j`` (Bool [B or 1, N, N]; None: causal).
    ``positions``: LongTensor [B, N] of RoPE positions (None: 0..N-1). V is the number of output
    rows: ``vocab_size``, or LLaDA's ``embedding_size`` when that is larger. Dream is returned
    unshifted (its prediction for position i is row i - 1). ``model``: a ``reference_model``
    to reuse.
    """
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    if tokens.dim() != 2:
        raise ValueError("tokens: LongTensor[B, N]")
    B, N = tokens.shape
    if mask is None:
        mask = causal_mask(N)
    if mask.shape[-1] != N or mask.shape[0] not in (1, B):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not fit tokens {tuple(tokens.shape)}")
    mask = mask.expand(B, N, N)
    if positions is None:
        positions = torch.arange(N).expand(B, N)
    positions = torch.as_tensor(positions, dtype=torch.long).expand(B, N)
    model = model if model is not None else reference_model(folder)
    out = model(input_ids=tokens, attention_mask=additive_mask(mask), position_ids=positions, use_cache=False)
    return out.logits.float()


# ---------------------------------------------------------------------------------------------
# masks (Bool, True: query i may attend key j)
# ---------------------------------------------------------------------------------------------


def causal_mask(N: int) -> torch.Tensor:
    """Bool [1, N, N]: query i sees keys j <= i."""
    return torch.ones(N, N, dtype=torch.bool).tril()[None]


def bidirectional_mask(valid) -> torch.Tensor:
    """Bool [B, N, N]: every query sees every valid key (``valid``: Bool [B, N]; an int N: all valid, [1, N, N]).

    Padded queries also see the valid keys, so their rows stay finite (their outputs are
    meaningless). Dream's own 2-D-mask handling masks padded query rows too (valid_i & valid_j);
    the two agree on every valid query.
    """
    if isinstance(valid, int):
        return torch.ones(1, valid, valid, dtype=torch.bool)
    valid = torch.as_tensor(valid, dtype=torch.bool)
    if valid.dim() != 2:
        raise ValueError("valid: Bool[B, N]")
    B, N = valid.shape
    return valid[:, None, :].expand(B, N, N).clone()


def block_causal_mask(N: int, block_size: int, prompt_len: int = 0) -> torch.Tensor:
    """Bool [1, N, N]: causal across blocks, bidirectional inside a block (SDAR's inference mask).

    Blocks are ``[0, b), [b, 2b), ...`` from position 0 when ``prompt_len`` is 0 (SDAR's
    ``generate.py``: blocks aligned to absolute positions, the prompt included). With
    ``prompt_len`` > 0 the prompt ``[0, prompt_len)`` is one bidirectional block and the blocks of
    ``block_size`` start at ``prompt_len`` (the BD3-LM / LLaDA semi-AR convention).
    ``block_size`` 1 and ``prompt_len`` 0 give the causal mask.
    """
    if block_size < 1:
        raise ValueError("block_size >= 1")
    i = torch.arange(N)
    if prompt_len > 0:
        block = torch.where(i < prompt_len, 0, (i - prompt_len) // block_size + 1)
    else:
        block = i // block_size
    return (block[None, :] <= block[:, None])[None]
