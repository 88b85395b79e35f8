"""What the speed benchmarks run: the issue's model and inputs, and the baselines.

Sizes (issue 11): 4 layers, d 256, 4 heads, vocab 64, L = 256, a 16-token prompt, 240
generated tokens, greedy ``sliding_window`` W = 8 with τ > 1 (one token per step), exact
cache. ``ORDERLAB_BENCH_LENGTH`` shrinks L for a quick run (e.g. 64).

Baselines, each measured in the same run as what it is compared with:

- :func:`matmul_floor`: the decode step's matmuls alone (4 per layer + the head) at the
  shapes a cached step has (batch x (1 + W) rows), once per generated token;
- :func:`setdlm_like_decode`: a minimal batch-1 decoder written from SetDLM's description
  (REFERENCES.md: one forward per step over [token revealed last step, W window masks],
  SDPA with a small mask over a contiguous cache written by slices, host-side lengths),
  sharing the orderlab model's weights; the issue's 203 tokens/s were measured against
  kuleshov-group/setdlms itself, which is not run here;
- :func:`causal_step`: a plain causal transformer training step (same weights and sizes,
  L tokens, ``is_causal`` SDPA, cross-entropy), the baseline of the training steps.
"""

from __future__ import annotations

import os

import torch

import orderlab
import torch.nn.functional as F

from orderlab.model import Transformer, rope
from orderlab.builder import build

LENGTH = int(os.environ.get("ORDERLAB_BENCH_LENGTH", 256))
PROMPT, VOCAB, WINDOW = 16, 64, 8
POLICY = {"name": "sliding_window", "window": WINDOW, "tau": 2.0}  # τ > 1: one token per step
SIZE = {"d_model": 256, "n_layers": 4, "n_heads": 4}


def decode_model(rule="set_causal", length: int = LENGTH) -> Transformer:
    """The issue's model, random weights scaled up so that predictions are peaked (greedy
    ties, which float rounding could flip between paths, do not occur)."""
    torch.manual_seed(0)
    model = orderlab.build("model", "transformer", vocab_size=VOCAB, max_len=length, attention=rule, **SIZE).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)
    return model


def decode_inputs(batch: int, length: int = LENGTH):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, VOCAB, (batch, length), generator=g)
    r = torch.ones(batch, length, dtype=torch.long)
    r[:, :PROMPT] = 0
    return x, r


def policy():
    return build("policy", POLICY)


# ----------------------------------------------------------------------------- baselines


def matmul_floor(model: Transformer, batch: int, steps: int, rows: int = 1 + WINDOW) -> None:
    """The matmuls of ``steps`` cached decode steps: per layer qkv, proj, mlp in and out,
    then the head, on ``batch * rows`` rows (nothing else: no attention, norms, sampling)."""
    h = torch.randn(batch * rows, model.config.d_model)
    hidden = torch.randn(batch * rows, model.config.mlp_ratio * model.config.d_model)
    with torch.no_grad():
        for _ in range(steps):
            for blk in model.blocks:
                F.linear(h, blk.attn.qkv.weight)
                F.linear(h, blk.attn.proj.weight)
                F.linear(h, blk.mlp[0].weight)
                F.linear(hidden, blk.mlp[2].weight)
            F.linear(h, model.head_weight())


@torch.no_grad()
def setdlm_like_decode(model: Transformer, x: torch.Tensor, prompt: int, window: int = WINDOW) -> torch.Tensor:
    """Greedy batch-1 sliding-window decode, one token per step (the top-confidence mask of
    the window), written from SetDLM's description with plain tensors: per step one
    forward over ``[token revealed last step (the prompt at step 0), window masks]``; the
    revealed tokens see the cache and each other (one set), each mask sees the cache, the
    revealed tokens and itself; their K/V is appended to a contiguous cache by a slice.
    Same weights and RoPE as ``model``, so its tokens equal orderlab's (the benchmark checks)."""
    if x.shape[0] != 1:
        raise ValueError("the SetDLM-like decoder is batch-1 only, like SetDLM's")
    L, c = x.shape[1], model.config
    H, D = c.n_heads, c.d_model // c.n_heads
    ks = [torch.zeros(1, H, L, D) for _ in model.blocks]
    vs = [torch.zeros(1, H, L, D) for _ in model.blocks]
    out = x.clone()
    out[:, prompt:] = model.mask_id
    n_cached, new = 0, list(range(prompt))  # positions whose clean K/V this step appends
    masked = list(range(prompt, L))
    while masked:
        win = [p for p in masked if p < masked[0] + window]  # masks in [first masked, + W), as Window(W)
        pos = torch.tensor(new + win)
        tokens = torch.cat([out[0, new], torch.full((len(win),), model.mask_id)])[None]
        n, N = len(new), len(new) + len(win)
        vis = torch.zeros(N, n_cached + N, dtype=torch.bool)
        vis[:, : n_cached + n] = True  # cache + the revealed set
        vis[n:, n_cached + n :] = torch.eye(len(win), dtype=torch.bool)  # each mask: itself
        cos, sin = model.rope_cos[pos], model.rope_sin[pos]
        h = model.embed(tokens)
        for i, blk in enumerate(model.blocks):
            a = blk.attn
            q, k, v = a.qkv(blk.norm1(h)).view(1, N, 3, H, D).permute(2, 0, 3, 1, 4)
            q, k = rope(q, cos, sin), rope(k, cos, sin)
            ks[i][:, :, n_cached : n_cached + N] = k
            vs[i][:, :, n_cached : n_cached + N] = v
            o = F.scaled_dot_product_attention(q, ks[i][:, :, : n_cached + N], vs[i][:, :, : n_cached + N], attn_mask=vis)
            h = h + a.proj(o.transpose(1, 2).reshape(1, N, c.d_model))
            h = h + blk.mlp(blk.norm2(h))
        probs = torch.softmax(F.linear(model.norm(h[:, n:]), model.head_weight()).float(), -1)[0]  # [W, V]
        conf, tok = probs.max(-1)
        j = int(conf.argmax())  # ties: the leftmost, like orderlab's ranking
        out[0, win[j]] = tok[j]
        n_cached += n
        new = [win[j]]
        masked.remove(win[j])
    return out


class CausalLM(torch.nn.Module):
    """A plain causal transformer over ``model``'s weights: L tokens, ``is_causal`` SDPA."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.m = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m, c = self.m, self.m.config
        B, L = x.shape
        H, D = c.n_heads, c.d_model // c.n_heads
        pos = torch.arange(L, device=x.device)
        cos, sin = m.rope_cos[pos], m.rope_sin[pos]
        h = m.embed(x)
        for blk in m.blocks:
            q, k, v = blk.attn.qkv(blk.norm1(h)).view(B, L, 3, H, D).permute(2, 0, 3, 1, 4)
            q, k = rope(q, cos, sin), rope(k, cos, sin)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            h = h + blk.attn.proj(o.transpose(1, 2).reshape(B, L, c.d_model))
            h = h + blk.mlp(blk.norm2(h))
        return F.linear(m.norm(h), m.head_weight())


def causal_step(lm: CausalLM, x: torch.Tensor) -> None:
    """One training step's forward and backward (next-token cross-entropy)."""
    logits = lm(x[:, :-1])
    F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)).backward()
