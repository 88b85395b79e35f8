"""The pretrained-checkpoint fixtures: real folder formats, and transformers references that honour a custom mask."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("safetensors")
transformers = pytest.importorskip("transformers")

import pretrained_fixtures as pf  # noqa: E402

N = 10
AR = ("llama", "qwen2", "qwen3")

# config keys the loader reads, per family (the full released key sets are in pretrained_formats.md)
REQUIRED_KEYS = {
    "llada": {"d_model", "n_heads", "n_kv_heads", "n_layers", "mlp_hidden_size", "rope_theta", "rms_norm_eps",
              "vocab_size", "embedding_size", "mask_token_id", "eos_token_id", "pad_token_id", "weight_tying",
              "max_sequence_length", "activation_type", "block_type", "layer_norm_type", "include_bias",
              "include_qkv_bias", "attention_layer_norm", "scale_logits", "rope", "architectures", "auto_map", "model_type"},
    "dream": {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "rope_theta", "rms_norm_eps", "vocab_size", "tie_word_embeddings", "mask_token_id", "pad_token_id",
              "bos_token_id", "eos_token_id", "torch_dtype", "architectures", "auto_map", "model_type"},
    "sdar": {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "head_dim", "rope_theta", "rms_norm_eps", "vocab_size", "tie_word_embeddings", "mask_token_id",
             "block_size", "attention_bias", "torch_dtype", "architectures", "auto_map", "model_type"},
    "llama": {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "rope_theta", "rms_norm_eps", "vocab_size", "tie_word_embeddings", "torch_dtype", "architectures", "model_type"},
    "qwen2": {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "rope_theta", "rms_norm_eps", "vocab_size", "tie_word_embeddings", "torch_dtype", "architectures", "model_type"},
    "qwen3": {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "rope_theta", "rms_norm_eps", "vocab_size", "tie_word_embeddings", "torch_dtype",
              "architectures", "model_type"},
}
MODEL_TYPE = {"llada": "llada", "dream": "Dream", "sdar": "sdar", "llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
ARCH = {"llada": "LLaDAModelLM", "dream": "DreamModel", "sdar": "SDARForCausalLM",
        "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """One default checkpoint per family, with its reference model (built once)."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for fam in pf.FAMILIES:
        folder = pf.write_checkpoint(root / fam, fam, seed=1)
        out[fam] = (folder, pf.reference_model(folder))
    return out


def tokens(B=2, n=N, seed=0):
    return torch.randint(0, 64, (B, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fam", pf.FAMILIES)
def test_folder_holds_the_real_files_keys_and_names(folders, fam):
    folder, _ = folders[fam]
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((folder / "config.json").read_text())
    assert REQUIRED_KEYS[fam] <= set(cfg), REQUIRED_KEYS[fam] - set(cfg)
    assert cfg["model_type"] == MODEL_TYPE[fam] and cfg["architectures"] == [ARCH[fam]]
    assert pf.family_of(folder) == fam
    tensors = pf.read_tensors(folder)
    names = set(tensors)
    if fam == "llada":
        assert "torch_dtype" not in cfg and "head_dim" not in cfg
        assert cfg["mask_token_id"] == 60 and cfg["eos_token_id"] == 57 and cfg["weight_tying"] is False
        assert {"model.transformer.wte.weight", "model.transformer.ln_f.weight", "model.transformer.ff_out.weight"} <= names
        block = {f"model.transformer.blocks.1.{k}.weight" for k in
                 ("attn_norm", "q_proj", "k_proj", "v_proj", "attn_out", "ff_norm", "ff_proj", "up_proj", "ff_out")}
        assert block <= names
        assert all(n.startswith("model.transformer.") for n in names)
        assert tensors["model.transformer.blocks.0.k_proj.weight"].shape == (2 * 8, 32)  # n_kv_heads * d/n_heads
    else:
        assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
                "model.layers.1.self_attn.o_proj.weight", "model.layers.1.mlp.gate_proj.weight"} <= names
        has_bias = any(n.endswith("q_proj.bias") for n in names)
        has_qk_norm = any(n.endswith("q_norm.weight") for n in names)
        assert has_bias == (fam in ("dream", "qwen2"))
        assert has_qk_norm == (fam in ("sdar", "qwen3"))
    if fam == "dream":
        assert cfg["mask_token_id"] == 60 < cfg["vocab_size"] and cfg["tie_word_embeddings"] is False
    if fam == "sdar":
        assert cfg["block_size"] == 4 and cfg["mask_token_id"] == 61
    assert len(tensors) == len(pf._hf_shapes(fam, 32, 2, 4, 2, 48, 8, 64, False))
    for name, t in tensors.items():
        assert t.dtype == torch.float32, name
        if name.endswith("norm.weight"):
            assert not torch.allclose(t, torch.ones_like(t)), name
        if name.endswith(".bias"):
            assert t.abs().min() > 0, name


@pytest.mark.parametrize("fam", pf.FAMILIES)
def test_names_and_shapes_match_the_transformers_class(folders, fam):
    folder, model = folders[fam]
    stored = pf.read_tensors(folder)
    renamed = {(pf.llada_to_hf_name(k) if fam == "llada" else k): tuple(v.shape) for k, v in stored.items()}
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if "rotary" not in k}
    assert renamed == expected
    if fam == "llada":  # the map is a bijection
        assert {pf.hf_to_llada_name(pf.llada_to_hf_name(k)) for k in stored} == set(stored)


@pytest.mark.parametrize("fam", pf.FAMILIES)
def test_reference_runs_with_right_shape(folders, fam):
    folder, model = folders[fam]
    x = tokens()
    out = pf.reference_logits(folder, x, model=model)
    assert out.shape == (2, N, 64) and out.dtype == torch.float32 and out.isfinite().all()
    assert out.std() > 0.1
    # building the reference from the folder gives the same numbers as the cached model
    assert torch.equal(pf.reference_logits(folder, x[:1, :4]), pf.reference_logits(folder, x[:1, :4], model=model))


@pytest.mark.parametrize("fam", AR)
@pytest.mark.parametrize("style", ["hub", "transformers"])
def test_ar_folder_loads_with_automodel_and_matches_reference(tmp_path, fam, style):
    folder = pf.write_checkpoint(tmp_path / fam, fam, seed=3, config_style=style)
    auto = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    x = tokens()
    with torch.no_grad():
        got = auto(input_ids=x).logits.float()
    ref = pf.reference_logits(folder, x, pf.causal_mask(N))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # the folder's own values (not a fresh init) were loaded
    stored = pf.read_tensors(folder)["model.norm.weight"]
    assert torch.equal(auto.model.norm.weight.detach(), stored)


@pytest.mark.parametrize("fam", pf.FAMILIES)
def test_custom_mask_is_honoured(folders, fam):
    folder, model = folders[fam]
    x = tokens()
    causal = pf.reference_logits(folder, x, pf.causal_mask(N), model=model)
    bidir = pf.reference_logits(folder, x, pf.bidirectional_mask(N), model=model)
    assert (causal - bidir).abs().max() > 1e-2
    torch.testing.assert_close(pf.reference_logits(folder, x, pf.block_causal_mask(N, 1), model=model), causal, atol=0, rtol=0)
    # what a query sees is exactly its mask row: change the last token
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % 64
    for mask, unaffected in ((pf.causal_mask(N), slice(0, N - 1)), (pf.block_causal_mask(N, 4), slice(0, 8))):
        a = pf.reference_logits(folder, x, mask, model=model)
        b = pf.reference_logits(folder, y, mask, model=model)
        torch.testing.assert_close(a[:, unaffected], b[:, unaffected], atol=1e-6, rtol=1e-6)
        assert (a[:, -2] - b[:, -2]).abs().max() > 1e-3 or unaffected.stop == N - 1
    a = pf.reference_logits(folder, x, pf.bidirectional_mask(N), model=model)
    b = pf.reference_logits(folder, y, pf.bidirectional_mask(N), model=model)
    assert (a[:, 0] - b[:, 0]).abs().max() > 1e-3


@pytest.mark.parametrize("fam", ["llada", "dream", "sdar"])
def test_positions_are_honoured(folders, fam):
    """Under a bidirectional mask, permuting tokens together with their positions permutes the logits."""
    folder, model = folders[fam]
    x = tokens(B=1)
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(5))
    base = pf.reference_logits(folder, x, pf.bidirectional_mask(N), model=model)
    moved = pf.reference_logits(folder, x[:, perm], pf.bidirectional_mask(N), positions=perm[None], model=model)
    torch.testing.assert_close(moved, base[:, perm], atol=1e-4, rtol=1e-4)
    shuffled = pf.reference_logits(folder, x[:, perm], pf.bidirectional_mask(N), model=model)
    assert (shuffled - base[:, perm]).abs().max() > 1e-2


def test_padding_mask_per_row(folders):
    folder, model = folders["dream"]
    x = tokens()
    valid = torch.ones(2, N, dtype=torch.bool)
    valid[1, 7:] = False
    out = pf.reference_logits(folder, x, pf.bidirectional_mask(valid), model=model)
    alone = pf.reference_logits(folder, x[1:, :7], pf.bidirectional_mask(7), model=model)
    torch.testing.assert_close(out[1:, :7], alone, atol=1e-5, rtol=1e-5)
    full = pf.reference_logits(folder, x[:1], pf.bidirectional_mask(N), model=model)
    torch.testing.assert_close(out[:1], full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fam", pf.FAMILIES)
def test_sharded_and_single_file_agree(tmp_path, fam):
    single = pf.write_checkpoint(tmp_path / "one", fam, seed=7)
    sharded = pf.write_checkpoint(tmp_path / "many", fam, seed=7, sharded=True, n_shards=3)
    assert not (sharded / "model.safetensors").exists()
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    assert all((sharded / f).exists() for f in files)
    a, b = pf.read_tensors(single), pf.read_tensors(sharded)
    assert a.keys() == b.keys() == index["weight_map"].keys()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in a.values())
    layer0 = [f for n, f in index["weight_map"].items() if ".0." in n]
    assert len(set(layer0)) > 1  # a layer spans several shards
    x = tokens()
    mask = pf.block_causal_mask(N, 4)
    assert torch.equal(pf.reference_logits(single, x, mask), pf.reference_logits(sharded, x, mask))


@pytest.mark.parametrize("fam", pf.FAMILIES)
def test_bf16_writes_bf16(tmp_path, fam):
    f32 = pf.write_checkpoint(tmp_path / "f32", fam, seed=2)
    bf16 = pf.write_checkpoint(tmp_path / "bf16", fam, seed=2, dtype=torch.bfloat16)
    tensors = pf.read_tensors(bf16)
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    ref32 = pf.read_tensors(f32)
    assert all(torch.equal(ref32[k].to(torch.bfloat16), t) for k, t in tensors.items())
    cfg = pf.read_config(bf16)
    assert ("torch_dtype" not in cfg) if fam == "llada" else cfg["torch_dtype"] == "bfloat16"
    x = tokens()
    out = pf.reference_logits(bf16, x)
    assert out.dtype == torch.float32 and out.isfinite().all()
    assert (out - pf.reference_logits(f32, x)).abs().max() < 0.5


@pytest.mark.parametrize("fam", ["qwen3", "sdar"])
def test_head_dim_other_than_d_over_heads(tmp_path, fam):
    folder = pf.write_checkpoint(tmp_path / fam, fam, head_dim=24)
    assert pf.read_config(folder)["head_dim"] == 24
    t = pf.read_tensors(folder)
    assert t["model.layers.0.self_attn.q_proj.weight"].shape == (4 * 24, 32)
    assert t["model.layers.0.self_attn.k_proj.weight"].shape == (2 * 24, 32)
    assert t["model.layers.0.self_attn.o_proj.weight"].shape == (32, 4 * 24)
    assert t["model.layers.0.self_attn.q_norm.weight"].shape == (24,)
    x = tokens()
    out = pf.reference_logits(folder, x, pf.bidirectional_mask(N))
    assert out.shape == (2, N, 64) and out.isfinite().all()
    if fam == "qwen3":
        auto = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        with torch.no_grad():
            torch.testing.assert_close(auto(input_ids=x).logits, pf.reference_logits(folder, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fam", ["llada", "dream", "qwen2"])
def test_head_dim_refused_where_the_config_cannot_say_it(tmp_path, fam):
    with pytest.raises(ValueError):
        pf.write_checkpoint(tmp_path / "x", fam, head_dim=24)


@pytest.mark.parametrize("fam", pf.FAMILIES)
def test_tied_output(tmp_path, fam):
    folder = pf.write_checkpoint(tmp_path / fam, fam, tie=True)
    names = set(pf.read_tensors(folder))
    cfg = pf.read_config(folder)
    if fam == "llada":
        assert cfg["weight_tying"] is True and "model.transformer.ff_out.weight" not in names
    else:
        assert cfg["tie_word_embeddings"] is True and "lm_head.weight" not in names
    model = pf.reference_model(folder)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    x = tokens()
    out = pf.reference_logits(folder, x, model=model)
    hidden = model.model(input_ids=x, attention_mask=pf.additive_mask(pf.causal_mask(N).expand(2, N, N))).last_hidden_state
    torch.testing.assert_close(out, hidden @ model.model.embed_tokens.weight.T, atol=1e-5, rtol=1e-5)
    if fam in AR:
        auto = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        with torch.no_grad():
            torch.testing.assert_close(auto(input_ids=x).logits, out, atol=1e-5, rtol=1e-5)


def test_llada_padded_embedding_rows(tmp_path):
    folder = pf.write_checkpoint(tmp_path / "llada", "llada", embedding_size=128)
    cfg = pf.read_config(folder)
    assert cfg["vocab_size"] == 64 and cfg["embedding_size"] == 128
    t = pf.read_tensors(folder)
    assert t["model.transformer.wte.weight"].shape == (128, 32) and t["model.transformer.ff_out.weight"].shape == (128, 32)
    assert pf.reference_logits(folder, tokens()).shape == (2, N, 128)


def test_seed_and_overrides(tmp_path):
    a = pf.read_tensors(pf.write_checkpoint(tmp_path / "a", "sdar", seed=0))
    b = pf.read_tensors(pf.write_checkpoint(tmp_path / "b", "sdar", seed=0))
    c = pf.read_tensors(pf.write_checkpoint(tmp_path / "c", "sdar", seed=1))
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["lm_head.weight"], c["lm_head.weight"])
    folder = pf.write_checkpoint(tmp_path / "d", "sdar", block_size=2, mask_token_id=10, n_layers=1)
    cfg = pf.read_config(folder)
    assert cfg["block_size"] == 2 and cfg["mask_token_id"] == 10 and cfg["num_hidden_layers"] == 1
    with pytest.raises(ValueError):
        pf.write_checkpoint(tmp_path / "e", "dream", vocab_size=32)  # mask id 60 would fall outside


def test_masks():
    assert torch.equal(pf.causal_mask(3)[0], torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool))
    m = pf.block_causal_mask(5, 2)[0]
    assert torch.equal(m.int(), torch.tensor([[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]))
    p = pf.block_causal_mask(5, 2, prompt_len=3)[0]
    assert torch.equal(p.int(), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]))
    assert torch.equal(pf.block_causal_mask(6, 1), pf.causal_mask(6))
    v = torch.tensor([[True, True, False]])
    assert torch.equal(pf.bidirectional_mask(v)[0].int(), torch.tensor([[1, 1, 0]] * 3))
    assert pf.bidirectional_mask(4).shape == (1, 4, 4) and pf.bidirectional_mask(4).all()
    add = pf.additive_mask(pf.causal_mask(3))
    assert add.shape == (1, 1, 3, 3) and add[0, 0, 0, 1] == torch.finfo(torch.float32).min and add[0, 0, 1, 0] == 0
