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
from orderlab.rules import AttentionRule, SetCausal, Stream

__all__ = ["ModelConfig", "Transformer"]


@dataclass
class ModelConfig:
    vocab_size: int  # classes predicted; the [MASK] id is vocab_size
    max_len: int
    attention: dict[str, Any] = field(default_factory=lambda: {"name": "set_causal"})
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    mlp_ratio: int = 4
    tie_embeddings: bool = True
    rope_base: float = 10000.0


def rope_angles(pos: Tensor, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """``(cos, sin)``, each ``[*pos.shape, D/2]`` float32, of the rotary embedding at logical positions
    ``theta_{p, i} = p * base^(-2i/D)`` (Su et al. 2021, eq. 15)."""
    inv = base ** (-torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim)  # [D/2]
    ang = pos.float()[..., None] * inv  # [*pos.shape, D/2]
    return ang.cos(), ang.sin()


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding (Su et al. 2021), x ``[..., N, D]`` rotated pairwise (even, odd) in
    float32; ``cos``/``sin`` broadcast to ``[..., N, D/2]``."""
    x1, x2 = x.float()[..., 0::2], x.float()[..., 1::2]
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)  # [..., N, D]
    return out.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.n_heads, self.layer, self.rope_base = cfg.n_heads, layer, cfg.rope_base
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, h: Tensor, vis: RankMask, cache: KVCache | None, rot: tuple[Tensor, Tensor]) -> Tensor:
        B, N, C = h.shape
        qkv = self.qkv(h).view(B, N, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)  # [3, B, H, N, D]
        qk = rope(qkv[:2], *rot)  # q and k rotated in one go: [2, B, H, N, D]
        q, k, v = qk[0], qk[1], qkv[2]
        o = vis.attend(q, k, v) if cache is None else cache.attend(self.layer, q, k, v, vis)
        return self.proj(o.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(cfg.d_model), nn.RMSNorm(cfg.d_model)
        self.attn = Attention(cfg, layer)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model, bias=False),
            nn.GELU(),
            nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model, bias=False),
        )

    def forward(self, h: Tensor, vis: RankMask, cache: KVCache | None, rot: tuple[Tensor, Tensor]) -> Tensor:
        h = h + self.attn(self.norm1(h), vis, cache, rot)
        return h + self.mlp(self.norm2(h))


@register("model", "transformer")
@declare_kind("model")
class Transformer(nn.Module):
    """Pre-norm transformer over rank-masked streams.

    Args (the YAML keys of ``model:``): ``vocab_size`` and ``max_len`` come from the build's
    context (the task's); ``attention`` is an attention rule (default set-causal); sizes as
    in :class:`ModelConfig`.
    """

    needs = ("vocab_size", "max_len")

    def __init__(self, vocab_size: int, max_len: int, attention: AttentionRule | None = None,
                 d_model: int = 128, n_layers: int = 4, n_heads: int = 4, mlp_ratio: int = 4,
                 tie_embeddings: bool = True, rope_base: float = 10000.0):
        super().__init__()
        if d_model % n_heads or (d_model // n_heads) % 2:
            raise ConfigError("n_heads", f"d_model={d_model} must split into n_heads={n_heads} heads of even size")
        rule = SetCausal() if attention is None else attention
        self.rule: AttentionRule = rule
        self.config = ModelConfig(vocab_size, max_len, rule.spec(), d_model, n_layers, n_heads, mlp_ratio,
                                  tie_embeddings, rope_base)
        self.vocab_size, self.mask_id, self.max_len = vocab_size, vocab_size, max_len
        self.embed = nn.Embedding(vocab_size + 1, d_model)  # + [MASK]
        self.blocks = nn.ModuleList(Block(self.config, i) for i in range(n_layers))
        self.norm = nn.RMSNorm(d_model)
        # the output layer never predicts [MASK] (SUBS parameterisation, MDLM)
        self.head = None if tie_embeddings else nn.Linear(d_model, vocab_size, bias=False)
        self.apply(self._init)
        # RoPE cos/sin of every position, computed once and gathered by position (float32,
        # as rope() computes; not saved: a function of the config)
        cos, sin = rope_angles(torch.arange(max_len), d_model // n_heads, rope_base)  # [max_len, D/2]
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

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
        takes the padding of fixed-width streams, see :class:`KVCache`)."""
        c, p = self.config, next(self.parameters())
        return KVCache(c.n_layers, batch, c.n_heads, length + 1, c.d_model // c.n_heads, p.dtype, p.device)

    def forward(self, s: Stream, cache: KVCache | None = None) -> Tensor:
        """Logits ``[B, N, vocab_size]`` for every token of the stream.

        With a cache the forward has no host synchronisation and no data-dependent shape
        (a stream of fixed width gives one graph: ``decode(..., compile=True)``)."""
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
        return F.linear(self.norm(h), self.head_weight())

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        return f"rule={self.rule!r}, params={self.num_params() / 1e6:.2f}M"
