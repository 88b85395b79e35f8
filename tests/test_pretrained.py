"""Pretrained checkpoints (issue 17): every family's tiny random folder (tests/pretrained_fixtures.py)
loads into orderlab's transformer, gives the logits of the ``transformers`` reference class under
the same mask, decodes exactly with its cache and in ragged batches, exports back bit-identically,
and names what is wrong with a bad folder."""

import json
import shutil

import pytest
import torch

import orderlab
from orderlab.decoding import decode
from orderlab.likelihood import log_likelihood
from orderlab.pretrained import MASK_ROW, FAMILIES, from_pretrained, save_pretrained
from orderlab.ranks import NEVER
from orderlab.rules import Stream
from orderlab.weights import WeightFolder, WeightsError
from pretrained_fixtures import (
    bidirectional_mask,
    block_causal_mask,
    causal_mask,
    reference_logits,
    reference_model,
    write_checkpoint,
)

ALL = list(FAMILIES)
AR = ["llama", "qwen2", "qwen3"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """One float32 folder per family (Qwen3 and SDAR with head_dim != d_model / n_heads)."""
    root = tmp_path_factory.mktemp("ckpt")
    head = {"qwen3": 12, "sdar": 12}
    return {f: write_checkpoint(root / f, f, seed=i, head_dim=head.get(f)) for i, f in enumerate(ALL)}


def _tokens(model, B=2, N=10, seed=0):
    """Token ids of the model's vocabulary, never its [MASK]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 56, (B, N), generator=g)
    return torch.where(x == model.mask_id, 1, x)


def _stream(x, k_rank, q_rank):
    """A stream over ``x`` in position order with the given ranks (no groups, no predictions
    read: the raw per-token outputs, as the reference computes them)."""
    B, N = x.shape
    pos = torch.arange(N).expand(B, N)
    never = torch.full_like(x, -1)
    return Stream(tokens=x, pos=pos, q_rank=q_rank.expand(B, N), k_rank=k_rank.expand(B, N), q_group=never, k_group=never,
                  out=never)


def _masks(N, block):
    """(name, Bool[1, N, N] mask, k_rank, q_rank): the same visibility as a reference mask and as
    orderlab ranks (key j visible to query i iff k_rank[j] < q_rank[i])."""
    i = torch.arange(N)
    b = i // block
    return [("causal", causal_mask(N), i, i + 1),
            ("bidirectional", bidirectional_mask(N), torch.zeros_like(i), torch.ones_like(i)),
            ("block_causal", block_causal_mask(N, block), b, b + 1)]


def _without_mask_column(logits, model):
    keep = torch.arange(logits.shape[-1]) != model.mask_id
    return logits[..., keep]


@pytest.mark.parametrize("family", ALL)
def test_logits_equal_the_transformers_reference_under_every_mask(folders, family):
    """Each family's architecture (GQA, SwiGLU, q/k norm, biases, rotate-half RoPE, untied head,
    head_dim) equals transformers' Llama / Qwen2 / Qwen3 class on the renamed weights, under a
    causal, a bidirectional and a block-causal 4-D mask, within float32 tolerance."""
    model = from_pretrained(folders[family], dtype="float32")
    ref = reference_model(folders[family])
    x = _tokens(model)
    for name, mask, k_rank, q_rank in _masks(x.shape[1], 3):
        with torch.no_grad():
            ours = model(_stream(x, k_rank, q_rank))
        theirs = reference_logits(folders[family], x, mask, model=ref)
        torch.testing.assert_close(_without_mask_column(ours, model), _without_mask_column(theirs, model),
                                   atol=2e-5, rtol=1e-4, msg=lambda m: f"{family}, {name} mask: {m}")


@pytest.mark.parametrize("family", AR)
def test_an_ar_checkpoint_is_exactly_its_ar_model(folders, family):
    """Set-causal with a causal prompt and shifted logits: the likelihood of a left-to-right
    order is the reference's next-token log-likelihood, and greedy l2r decoding with the exact
    cache is the reference's greedy continuation."""
    model = from_pretrained(folders[family], dtype="float32")
    assert model.rule.spec() == {"name": "set_causal", "prompt": "causal"} and model.config.shift_logits
    x = _tokens(model, B=2, N=9)
    P = 3  # prompt
    ranks = torch.cat([torch.zeros(2, P, dtype=torch.long), torch.arange(1, 9 - P + 1).expand(2, -1)], 1)
    ref = reference_logits(folders[family], x)  # causal
    want = torch.log_softmax(ref[:, P - 1:-1], -1).gather(-1, x[:, P:, None])[..., 0].sum(1)
    torch.testing.assert_close(log_likelihood(model, x, ranks), want, atol=1e-4, rtol=1e-5)
    out = decode(model, orderlab.build("policy", "l2r"), x, ranks.clamp(max=1), cache=True)
    greedy = x[:, :P].clone()
    for _ in range(9 - P):
        nxt = reference_logits(folders[family], greedy)[:, -1]
        nxt[:, model.mask_id if model.mask_id < nxt.shape[-1] else 0] = float("-inf") if model.mask_id < nxt.shape[-1] else nxt[:, 0]
        greedy = torch.cat([greedy, nxt.argmax(-1, keepdim=True)], 1)
    assert torch.equal(out.tokens, greedy)


def test_dream_reads_the_prediction_for_i_at_i_minus_1(folders):
    model = from_pretrained(folders["dream"], dtype="float32")
    assert model.rule.spec() == {"name": "bidirectional"} and model.config.shift_logits and model.mask_id == 60
    x = _tokens(model, B=2, N=8)
    targets = torch.zeros_like(x, dtype=torch.bool)
    targets[:, [3, 4, 7]] = True
    xt = torch.where(targets, model.mask_id, x)
    with torch.no_grad():
        s = model.rule.noisy_stream(xt, torch.ones_like(targets), targets)
        ours = model(s)
    ref = reference_logits(folders["dream"], xt, bidirectional_mask(8))
    for p in (3, 4, 7):
        torch.testing.assert_close(_without_mask_column(ours[:, p], model), _without_mask_column(ref[:, p - 1], model),
                                   atol=2e-5, rtol=1e-4)


def test_llada_layout_and_in_vocabulary_mask(folders):
    model = from_pretrained(folders["llada"], dtype="float32")
    assert model.rule.spec() == {"name": "bidirectional"} and not model.config.shift_logits
    assert model.mask_id == 60 and model.vocab_size == 64 and model.embed.weight.shape[0] == 64
    assert model.head is not None and not model.config.tie_embeddings


def _ragged(model, prompt_lens, gen=4, seed=1):
    """Left-padded prompts of ``prompt_lens`` then ``gen`` positions to generate (as the jsonl task lays them out)."""
    L = max(prompt_lens) + gen
    x = _tokens(model, B=len(prompt_lens), N=L, seed=seed)
    ranks = torch.ones_like(x)
    for b, n in enumerate(prompt_lens):
        ranks[b, : L - gen - n] = -1
        ranks[b, L - gen - n : L - gen] = 0
    return torch.where(ranks < 0, 0, x), ranks


POLICIES = {"llada": ["top_prob", {"name": "semi_ar", "block_size": 3, "steps": 2, "from_prompt_end": True}, {"name": "threshold", "tau": 0.2}],
            "dream": ["top_prob", "margin", {"name": "eb", "gamma": 1.0}],
            "sdar": ["top_prob", "entropy", {"name": "threshold", "tau": 0.2}],
            "llama": ["l2r", "top_prob", "entropy"], "qwen2": ["l2r", "margin", {"name": "threshold", "tau": 0.2}],
            "qwen3": ["l2r", "top_prob", {"name": "factor", "f": 1.0}]}


@pytest.mark.parametrize("family", ALL)
def test_decode_cached_uncached_ragged_and_alone(folders, family):
    """Each family decodes with three policies; cached equals uncached; a batch of ragged
    left-padded prompts equals each row decoded alone (tokens, order and NFE)."""
    model = from_pretrained(folders[family], dtype="float32")
    if family == "sdar":  # block-causal, blocks from each row's first token (paddings 2, 0, 4: not multiples of 3)
        model = from_pretrained(folders[family], dtype="float32", attention={"name": "block_causal", "block_size": 3, "prompt": "causal"})
    x, ranks = _ragged(model, [3, 5, 1])
    for spec in POLICIES[family]:
        policy = orderlab.build("policy", spec)
        cached = decode(model, policy, x, ranks, cache=True)
        assert (cached.tokens[ranks >= 1] != model.mask_id).all() and (cached.ranks[ranks >= 1] >= 1).all()
        uncached = decode(model, policy, x, ranks, cache=False)
        assert torch.equal(cached.tokens, uncached.tokens) and torch.equal(cached.ranks, uncached.ranks), spec
        for b in range(3):
            real = ranks[b] >= 0
            alone = decode(model, policy, x[b : b + 1, real], ranks[b : b + 1, real], cache=True)
            assert torch.equal(alone.tokens[0], cached.tokens[b, real]), (spec, b)
            assert torch.equal(alone.ranks[0], cached.ranks[b, real]) and alone.nfe[0] == cached.nfe[b], (spec, b)


@pytest.mark.parametrize("family", ALL)
def test_export_round_trip_is_bit_identical(folders, family, tmp_path):
    src = folders[family]
    model = from_pretrained(src)
    out = save_pretrained(model, tmp_path / "out", max_shard_bytes=20_000)  # several shards
    a, b = WeightFolder(src), WeightFolder(out)
    assert a.names == b.names
    for n in a.names:
        assert torch.equal(a.read(n), b.read(n)), n
    assert json.loads((out / "config.json").read_text())["model_type"] == a.config["model_type"]
    assert (out / "model.safetensors.index.json").exists()
    again = from_pretrained(out)
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def test_bf16_loads_straight_into_bf16_and_float32_files_convert(folders, tmp_path):
    bf = write_checkpoint(tmp_path / "bf", "qwen3", dtype=torch.bfloat16, seed=3)
    m = from_pretrained(bf)  # "auto": the checkpoint's dtype
    assert all(p.dtype == torch.bfloat16 for p in m.parameters()) and m.rope_cos.dtype == torch.float32
    f32 = from_pretrained(folders["llama"], dtype="bfloat16")
    ref = from_pretrained(folders["llama"], dtype="float32")
    for k, v in f32.state_dict().items():  # the file's tensors converted (the appended [MASK] row is orderlab's)
        n = 64 if k == "embed.weight" else None
        assert torch.equal(v[:n], ref.state_dict()[k][:n].to(torch.bfloat16)), k
    x = _tokens(m)
    with torch.no_grad():
        assert torch.isfinite(m(m.rule.passes(x, torch.arange(10).expand(2, 10), m.mask_id).__next__())).all()


def test_an_ar_checkpoint_gets_a_mask_row_that_export_keeps(folders, tmp_path):
    m = from_pretrained(folders["qwen2"])
    assert m.mask_id == m.vocab_size == 64 and m.embed.weight.shape[0] == 65
    torch.testing.assert_close(m.embed.weight[64], m.embed.weight[:64].mean(0))  # a start for adapting it
    with torch.no_grad():
        m.embed.weight[64] = 7.0  # as if fine-tuned
    out = save_pretrained(m, tmp_path / "adapted")
    assert MASK_ROW in WeightFolder(out).names
    assert (from_pretrained(out).embed.weight[64] == 7.0).all()


# ------------------------------------------------------------------ bad folders


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _rewrite(folder, edit):
    """Rewrite the folder's single safetensors file with ``edit(tensors)`` applied."""
    from safetensors.torch import load_file, save_file
    f = folder / "model.safetensors"
    t = load_file(f)
    edit(t)
    save_file(t, f, metadata={"format": "pt"})


def test_load_errors_name_the_tensor_or_key_and_the_folder(folders, tmp_path):
    cases = {
        "missing": (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "missing tensor 'model.layers.1.mlp.up_proj.weight'"),
        "extra": (lambda t: t.__setitem__("model.layers.0.extra.weight", torch.zeros(2)), "unexpected tensor 'model.layers.0.extra.weight'"),
        "shape": (lambda t: t.__setitem__("model.norm.weight", torch.zeros(31)), r"tensor 'model.norm.weight' has shape \[31\]"),
    }
    for name, (edit, message) in cases.items():
        folder = _copy(folders["qwen3"], tmp_path / name)
        _rewrite(folder, edit)
        with pytest.raises(WeightsError, match=message) as e:
            from_pretrained(folder)
        assert str(folder) in str(e.value) and "\n" not in str(e.value)
    unknown = _copy(folders["qwen3"], tmp_path / "unknown")
    cfg = json.loads((unknown / "config.json").read_text())
    cfg.update(model_type="mamba", architectures=["MambaForCausalLM"])
    (unknown / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="unknown model family.*'mamba'"):
        from_pretrained(unknown)
    assert from_pretrained(unknown, family="qwen3").config.qk_norm  # an explicit family overrides
    corrupt = _copy(folders["qwen3"], tmp_path / "corrupt")
    with open(corrupt / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(WeightsError, match="model.safetensors"):
        from_pretrained(corrupt)
    nokey = _copy(folders["llada"], tmp_path / "nokey")
    cfg = json.loads((nokey / "config.json").read_text())
    del cfg["mlp_hidden_size"]
    (nokey / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="config.json: no key 'mlp_hidden_size'"):
        from_pretrained(nokey)


@pytest.mark.parametrize("family", ["qwen3", "dream"])
def test_the_compiled_decode_step_equals_eager_on_shifted_models(folders, family):
    """Shifted logits and grouped-query attention inside the compiled step (one static graph)."""
    model = from_pretrained(folders[family], dtype="float32")
    x, ranks = _ragged(model, [3, 5, 1])
    policy = {"qwen3": "l2r", "dream": "top_prob"}[family]
    want = decode(model, orderlab.build("policy", policy), x, ranks)
    got = decode(model, orderlab.build("policy", policy), x, ranks, compile={"backend": "aot_eager"})
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.ranks, want.ranks) and torch.equal(got.nfe, want.nfe)
