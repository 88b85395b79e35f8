"""The cached transformer: pre-norm, RoPE at logical positions, rank-masked attention.

The model never decides *which* tokens see which: it reads a :class:`~orderlab.rules.Stream`
(tokens, logical positions, and the ranks/groups of the attention rule) built by its
:class:`~orderlab.rules.AttentionRule`. The same weights therefore serve the set-causal
two-stream pass, block-causal and bidirectional passes, and cached decode steps.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from orderlab.cache import KVCache
from orderlab.kernels import RankMask
from orderlab.registry import ConfigError, build, declare_kind, register
from orderlab.ranks import NEVER
from orderlab.rules import AttentionRule, BlockCausal, SetCausal, Stream

__all__ = ["ModelConfig", "Transformer"]


@dataclass
class ModelConfig:
    vocab_size: int  # classes predicted; the [MASK] id is vocab_size unless mask_id says otherwise
    max_len: int
    attention: dict[str, Any] = field(default_factory=lambda: {"name": "set_causal"})
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    mlp_ratio: int = 4
    tie_embeddings: bool = True
    rope_base: float = 10000.0
    n_kv_heads: int | None = None
    head_dim: int | None = None
    mlp: str = "gelu"
    mlp_hidden: int | None = None
    qk_norm: bool = False
    qkv_bias: bool = False
    norm_eps: float | None = None
    rope_layout: str = "interleaved"
    mask_id: int | None = None
    shift_logits: bool = False

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def hidden(self) -> int:
        return self.mlp_hidden or self.mlp_ratio * self.d_model


def rope_angles(pos: Tensor, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """``(cos, sin)``, each ``[*pos.shape, D/2]`` float32, of the rotary embedding at logical positions
    ``theta_{p, i} = p * base^(-2i/D)`` (Su et al. 2021, eq. 15)."""
    inv = base ** (-torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim)  # [D/2]
    ang = pos.float()[..., None] * inv  # [*pos.shape, D/2]
    return ang.cos(), ang.sin()


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding (Su et al. 2021), x ``[..., N, D]`` rotated pairwise (even, odd) in
    float32; ``cos``/``sin`` broadcast to ``[..., N, D/2]``."""
    xf = x.float()
    x1, x2 = xf[..., 0::2], xf[..., 1::2]
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)  # [..., N, D]
    return out if out.dtype == x.dtype else out.to(x.dtype)


def rope_halves(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The same rotation with dimension ``i`` paired with ``i + D/2`` ("rotate half"), the
    layout of Hugging Face's Llama/Qwen checkpoints (their q/k rows are permuted so): a
    relabelling of the dimensions, so equal to :func:`rope` on permuted weights."""
    x1, x2 = x.float().chunk(2, dim=-1)  # [..., N, D/2] each
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out if out.dtype == x.dtype else out.to(x.dtype)


ROPE_LAYOUTS = {"interleaved": rope, "halves": rope_halves}


class Attention(nn.Module):
    """Multi-head attention with optional grouped-query K/V (``n_kv_heads``; Ainslie et al.
    2023), q/k/v biases (Qwen2) and per-head q/k RMSNorm before RoPE (Qwen3)."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim, self.layer = cfg.n_heads, cfg.kv_heads, cfg.head_size, layer
        self.rope = ROPE_LAYOUTS[cfg.rope_layout]
        D = self.head_dim
        self.qkv = nn.Linear(cfg.d_model, (self.n_heads + 2 * self.n_kv) * D, bias=cfg.qkv_bias)  # rows: q | k | v
        self.proj = nn.Linear(self.n_heads * D, cfg.d_model, bias=False)
        self.q_norm = nn.RMSNorm(D, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = nn.RMSNorm(D, eps=cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, h: Tensor, vis: RankMask, cache: KVCache | None, rot: tuple[Tensor, Tensor]) -> Tensor:
        B, N, _ = h.shape
        H, G, D = self.n_heads, self.n_kv, self.head_dim
        qkv = self.qkv(h).view(B, N, H + 2 * G, D).transpose(1, 2)  # [B, H + 2G, N, D]: q heads | k heads | v heads
        v = qkv[:, H + G :]
        if self.q_norm is None:  # q and k rotated together: half the small ops of two calls, the same values
            q, k = self.rope(qkv[:, : H + G], *rot).split([H, G], dim=1)  # [B, H or G, N, D], contiguous
        else:
            q, k = self.rope(self.q_norm(qkv[:, :H]), *rot), self.rope(self.k_norm(qkv[:, H : H + G]), *rot)
        o = vis.attend(q, k, v) if cache is None else cache.attend(self.layer, q, k, v, vis)  # [B, H, N, D]
        return self.proj(o.transpose(1, 2).reshape(B, N, H * D))


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))`` (Shazeer 2020), the MLP of Llama, Qwen, LLaDA, Dream."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(d_model, hidden, bias=False)
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


def gelu_mlp(d_model: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d_model, hidden, bias=False), nn.GELU(), nn.Linear(hidden, d_model, bias=False))


MLPS = {"gelu": gelu_mlp, "swiglu": SwiGLU}


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps), nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.mlp = MLPS[cfg.mlp](cfg.d_model, cfg.hidden)

    def forward(self, h: Tensor, vis: RankMask, cache: KVCache | None, rot: tuple[Tensor, Tensor]) -> Tensor:
        h = h + self.attn(self.norm1(h), vis, cache, rot)
        return h + self.mlp(self.norm2(h))


@register("model", "transformer")
@declare_kind("model")
class Transformer(nn.Module):
    """Pre-norm transformer over rank-masked streams.

    Args (the YAML keys of ``model:``): ``vocab_size`` and ``max_len`` come from the build's
    context (the task's); ``attention`` is an attention rule (default set-causal); sizes as
    in :class:`ModelConfig`. The architecture options of pretrained families (DESIGN.md
    section 4), each defaulting to orderlab's own model:

    - ``n_kv_heads``: grouped-query attention (K/V heads shared by ``n_heads / n_kv_heads``
      query heads); ``head_dim`` when it is not ``d_model / n_heads`` (Qwen3-0.6B);
    - ``mlp``: ``"gelu"`` or ``"swiglu"``, with ``mlp_hidden`` units (default
      ``mlp_ratio * d_model``);
    - ``qk_norm``: per-head RMSNorm of q and k before RoPE (Qwen3, SDAR); ``qkv_bias``
      (Qwen2, Dream); ``norm_eps`` of every RMSNorm (None: torch's default);
    - ``rope_layout``: ``"interleaved"`` (pairs 2i, 2i+1) or ``"halves"`` (pairs i, i + D/2,
      Hugging Face checkpoints);
    - ``mask_id``: a [MASK] id inside the vocabulary (LLaDA 126336, Dream 151666) instead of
      the appended row ``vocab_size``; its logit is set to the dtype's minimum, so the model
      never predicts [MASK] (SUBS, Sahoo et al. 2024) and the likelihood sums to 1 over tokens;
    - ``shift_logits``: the prediction for position ``i`` is read at position ``i - 1``
      (Dream and AR checkpoints; bidirectional or set-causal rule, see :func:`_shift`).
    """

    needs = ("vocab_size", "max_len")

    def __init__(self, vocab_size: int, max_len: int, attention: AttentionRule | None = None,
                 d_model: int = 128, n_layers: int = 4, n_heads: int = 4, mlp_ratio: int = 4,
                 tie_embeddings: bool = True, rope_base: float = 10000.0, n_kv_heads: int | None = None,
                 head_dim: int | None = None, mlp: str = "gelu", mlp_hidden: int | None = None, qk_norm: bool = False,
                 qkv_bias: bool = False, norm_eps: float | None = None, rope_layout: str = "interleaved",
                 mask_id: int | None = None, shift_logits: bool = False):
        super().__init__()
        rule = SetCausal() if attention is None else attention
        cfg = ModelConfig(vocab_size, max_len, rule.spec(), d_model, n_layers, n_heads, mlp_ratio, tie_embeddings,
                          rope_base, n_kv_heads, head_dim, mlp, mlp_hidden, qk_norm, qkv_bias, norm_eps, rope_layout,
                          mask_id, shift_logits)
        _check(cfg, rule)
        self.rule: AttentionRule = rule
        self.config = cfg
        self.vocab_size, self.max_len = vocab_size, max_len
        self.mask_id = vocab_size if mask_id is None else mask_id
        self.embed = nn.Embedding(vocab_size + (mask_id is None), d_model)  # + [MASK] unless it is in the vocabulary
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(n_layers))
        self.norm = nn.RMSNorm(d_model, eps=norm_eps)
        # the output layer never predicts [MASK] (SUBS parameterisation, MDLM)
        self.head = None if tie_embeddings else nn.Linear(d_model, vocab_size, bias=False)
        self.apply(self._init)
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self._rope_tables()

    def _rope_tables(self) -> None:
        """RoPE cos/sin of every position, float32 on the model's device (as rope() computes;
        not saved: a function of the config). Recomputed after every move or cast
        (:meth:`_apply`), so a bf16 model keeps float32 angles and a model built on the meta
        device gets real ones when materialised."""
        c, dev = self.config, self.embed.weight.device
        pos = torch.arange(c.max_len, device=dev if dev.type != "meta" else "cpu")
        cos, sin = rope_angles(pos, c.head_size, c.rope_base)  # [max_len, D/2]
        self.rope_cos, self.rope_sin = cos.to(dev), sin.to(dev)

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self._rope_tables()
        return self

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    @classmethod
    def from_config(cls, cfg: ModelConfig | dict) -> "Transformer":
        args = asdict(cfg) if isinstance(cfg, ModelConfig) else dict(cfg)
        args["attention"] = build("attention", args["attention"], path="attention")  # the rule's spec()
        return cls(**args)

    def head_weight(self) -> Tensor:
        return self.embed.weight[: self.vocab_size] if self.head is None else self.head.weight

    def new_cache(self, batch: int, length: int) -> KVCache:
        """A cache for decoding ``batch`` rows of ``length`` positions (capacity ``length + 1``:
        a row's cached tokens and one forward's tokens never exceed ``length``; the extra slot
        takes the padding of fixed-width streams, see :class:`KVCache`). It holds the
        ``n_kv_heads`` K/V heads (grouped-query attention shares them)."""
        c, p = self.config, next(self.parameters())
        return KVCache(c.n_layers, batch, c.kv_heads, length + 1, c.head_size, p.dtype, p.device)

    def forward(self, s: Stream, cache: KVCache | None = None, return_hidden: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Logits ``[B, N, vocab_size]`` for every token of the stream.

        ``return_hidden``: also the final normalised hidden state ``[B, N, d_model]`` (the
        head's input, after the shift of shifted-logit models: the row each query's
        prediction is read from), returned as ``(logits, hidden)`` from the same forward
        (learned policies reading the denoiser's states, UPO / DCoLT). With a cache the
        forward has no host synchronisation and no data-dependent shape (a stream of fixed
        width gives one graph: ``decode(..., compile=True)``)."""
        if not torch.compiler.is_compiling() and s.pos.numel() and int(s.pos.max()) >= self.rope_cos.shape[0]:
            raise ValueError(f"stream positions reach {int(s.pos.max())}, past the model's max_len={self.max_len}")
        h = self.embed(s.tokens)  # [B, N, C]
        # the visibility of this forward, built once for all layers (the model never decides
        # who sees whom: the stream's ranks and groups do)
        vis = RankMask(s.q_rank, s.k_rank, s.q_group, s.k_group) if cache is None else cache.begin(s)
        rot = self.rope_cos[s.pos][:, None], self.rope_sin[s.pos][:, None]  # [B, 1, N, D/2], shared by all layers
        for block in self.blocks:
            h = block(h, vis, cache, rot)
        if cache is not None:
            cache.commit(s.n_append if s.n_append is not None else torch.zeros_like(cache.length))
        if self.config.shift_logits:
            h = _shift(h, s, self.max_len)
        hidden = self.norm(h)  # [B, N, C]
        logits = F.linear(hidden, self.head_weight())
        if self.mask_id < self.vocab_size:  # [MASK] is a token of the vocabulary: never predicted
            logits[..., self.mask_id] = torch.finfo(logits.dtype).min
        return (logits, hidden) if return_hidden else logits

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        return f"rule={self.rule!r}, params={self.num_params() / 1e6:.2f}M"


def _check(cfg: ModelConfig, rule: AttentionRule) -> None:
    """Architecture options that cannot work together: ConfigError naming the key."""
    if cfg.head_dim is None and cfg.d_model % cfg.n_heads:
        raise ConfigError("n_heads", f"d_model={cfg.d_model} must split into n_heads={cfg.n_heads} heads (or set head_dim)")
    if cfg.head_size % 2:
        raise ConfigError("head_dim", f"RoPE needs an even head size, got {cfg.head_size}")
    if cfg.n_heads % cfg.kv_heads:
        raise ConfigError("n_kv_heads", f"n_heads={cfg.n_heads} must be a multiple of n_kv_heads={cfg.kv_heads}")
    for key, table in (("mlp", MLPS), ("rope_layout", ROPE_LAYOUTS)):
        if getattr(cfg, key) not in table:
            raise ConfigError(key, f"unknown {key} {getattr(cfg, key)!r}; choose one of {sorted(table)}")
    if cfg.mask_id is not None and not 0 <= cfg.mask_id < cfg.vocab_size:
        raise ConfigError("mask_id", f"an in-vocabulary [MASK] id must lie in [0, vocab_size={cfg.vocab_size}), got {cfg.mask_id}")
    if cfg.shift_logits and isinstance(rule, BlockCausal):
        raise ConfigError("shift_logits", "shifted logits read position i's prediction at the token of position i - 1: "
                                          "set_causal (an AR checkpoint) or bidirectional (Dream), not block_causal, "
                                          "whose clean and noisy copies of a block leave that token ambiguous")


def _shift(h: Tensor, s: Stream, max_len: int) -> Tensor:
    """``h [B, N, C]`` with each query's row (``out >= 0``) replaced by that of a token at
    position ``pos - 1``: shifted logits, the AR heritage of Dream and of every AR checkpoint
    (the output at ``i - 1`` predicts ``i``).

    Which token: in a bidirectional stream over ``x_t``, the one at ``pos - 1`` (Dream). In a
    set-causal stream, the *clean* token at ``pos - 1`` if it belongs to the set revealed
    just before the query's (rank ``k - 1``; the given tokens for ``k = 1``): an AR checkpoint
    decoded left to right reads its next-token prediction there, exactly; else the *query*
    at ``pos - 1`` if it is in the query's own set. Both see no more than the query does, so
    the likelihood stays normalised for every order, and both are in the stream of a cached
    decode step whenever they are in the one-pass stream, so cached decoding stays exact.
    Otherwise (position 0, after padding, a left neighbour revealed earlier or later) the
    query keeps its own row, as Dream's generate does at position 0."""
    B, N, C = h.shape
    clean = s.k_rank != NEVER  # set-causal clean tokens (keys by rank)
    other = (s.k_group >= 0) & ~clean  # bidirectional x_t tokens, set-causal queries
    slots = torch.arange(N, device=h.device).expand(B, N)
    prev = (s.pos - 1).clamp(min=0)

    def left(of: Tensor) -> Tensor:  # Long[B, N]: the slot of an ``of`` token at pos - 1, or -1
        where = torch.full((B, max_len + 1), -1, dtype=torch.long, device=h.device)  # column max_len: the dump
        where.scatter_(1, torch.where(of, s.pos, max_len), torch.where(of, slots, -1))
        return where.gather(1, prev)

    lc, lo = left(clean), left(other)
    ok_c = (lc >= 0) & (s.k_rank.gather(1, lc.clamp(min=0)).clamp(min=0) + 1 == s.q_rank)
    ok_o = (lo >= 0) & (s.q_rank.gather(1, lo.clamp(min=0)) == s.q_rank)
    use = (s.out >= 0) & (s.pos > 0)
    src = torch.where(use & ok_c, lc, torch.where(use & ok_o, lo, slots))
    return h.gather(1, src[..., None].expand(B, N, C))
