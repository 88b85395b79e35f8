"""orderlab beside SetDLM's own code (kuleshov-group/setdlms), same weights, same tokens.

    git clone https://github.com/kuleshov-group/setdlms /tmp/setdlms
    pip install "transformers==4.52.4" hydra-core einops     # SetDLM's pins (its requirements.txt)
    python benchmarks/vs_setdlm.py --setdlm /tmp/setdlms     # ~5 min on 2 CPU cores
    python benchmarks/vs_setdlm.py --setdlm /tmp/setdlms --length 64 --reps 1 --batch 4   # quick

The issue-22 model: 4 layers, d 256, 4 heads, vocab 64, L 256, a 16-token prompt, 240 new
tokens, greedy, window 8, exact cache. Both models are built here and share weights:
orderlab's (random, scaled x4 so that predictions are peaked and greedy ties do not occur)
are mapped into SetDLM's ``DIT`` backbone. Timed in one process, the variants alternate
round by round (``--reps`` rounds), and the table reports medians; ratios are against
SetDLM's ``generate()`` (batch 1 only, like SetDLM's) and SetDLM's training step.

Architectures: SetDLM's DIT differs from orderlab's transformer in four places; the map
makes the two compute the same function:

- norms: DIT's ``LayerNorm`` (weight only, mean subtracted) vs orderlab's ``RMSNorm``: the
  DIT's five norm modules are replaced by ``nn.RMSNorm`` holding the same weights;
- MLP activation: DIT's tanh-approximate GELU vs orderlab's exact GELU: replaced likewise;
- biases: DIT's MLP and output layer have biases, orderlab's none: set to zero (still
  added, so SetDLM pays for them);
- RoPE layout: DIT rotates halves (``rotate_half``), orderlab interleaved pairs: q/k rows
  of ``attn_qkv`` are permuted per head (a relabelling of dimensions, same scores).

The output layer is DIT's untied ``Linear`` holding orderlab's (tied) embedding rows; the
[MASK] row is the appended id 64 in both (its logit never wins). SetDLM's decoder makes
the prompt causal in position order, so orderlab's model uses ``set_causal`` with
``prompt: causal``. Everything else (the decoder, its cache, masks and sampling) is
SetDLM's unmodified ``SetDLM.generate`` with ``predict_and_noise`` sampling, confidence
noising (one token per step over 240 steps), ``max_window_size`` 8 and
``confidence_threshold`` 1.0 (one token per step) or 0.9.

One known difference, not of speed: SetDLM's cache makes the tokens revealed in one step
causal among themselves (in position order) when they enter the cache, orderlab's
set-causal rule keeps a set bidirectional (DESIGN.md section 1). With one token per step
the two are the same function; with the 0.9 threshold steps reveal several tokens, so the
table reports how many tokens agree instead of asserting it.

Training step: forward, backward, clip to norm 1, AdamW (lr 1e-3) on 16 x 256 tokens,
fp32. SetDLM: its ``SetDLM.forward`` (``_prepare_inputs`` with the staggered schedule,
the 2L-token two-stream pass with its static SDPA mask, ``_compute_loss``) with dropout
0.1 (its config) and 0; torch's AdamW and ``clip_grad_norm_`` (its trainer, composer's
``DecoupledAdamW``, is not installed here). orderlab: ``Trainer.train_step`` with
``set_nll`` under the staggered process (the optimizer, clipping, scheduler and loss
bookkeeping of a real run).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import orderlab
from orderlab.builder import build
from orderlab.decoding import decode
from orderlab.train import Trainer, TrainConfig

PROMPT, VOCAB, WINDOW = 16, 64, 8
SIZE = {"d_model": 256, "n_layers": 4, "n_heads": 4}


# ----------------------------------------------------------------------------- models


def orderlab_model(length: int) -> nn.Module:
    torch.manual_seed(0)
    model = orderlab.build("model", "transformer", vocab_size=VOCAB, max_len=length,
                           attention={"name": "set_causal", "prompt": "causal"}, **SIZE).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)
    return model


def _setdlm_imports(path: str):
    sys.path.insert(0, str(Path(path).resolve()))
    from src.denoiser.diffusion import BD3LMConfig, SetDLM  # noqa: PLC0415 (SetDLM's checkout)
    from src.denoiser.diffusion_config import SetDiffusionGenerationConfig  # noqa: PLC0415
    return BD3LMConfig, SetDLM, SetDiffusionGenerationConfig


def setdlm_model(path: str, om: nn.Module, length: int, dropout: float = 0.1):
    """SetDLM's denoiser (DIT backbone, staggered noise) holding ``om``'s weights (see the
    module docstring for the map)."""
    BD3LMConfig, SetDLM, _ = _setdlm_imports(path)
    L, d = length, SIZE["d_model"]
    cfg = BD3LMConfig(
        length=L, block_size=L, eval_block_size=L, attn_backend="sdpa",
        backbone_config={"_target_": "src.backbone.dit.DIT", "length": L, "causal_attention": False, "adaln": False,
                         "hidden_size": d, "cond_dim": 128, "n_heads": SIZE["n_heads"], "num_layers": SIZE["n_layers"],
                         "dropout": dropout, "tie_word_embeddings": True, "attn_backend": "sdpa",
                         "vocab_size": VOCAB + 1, "block_size": L, "pretrained_model_name_or_path": None},
        noise_config={"_target_": "src.noise_schedule.noise_schedules.StaggeredNoise", "eps": 1e-3, "block_size": L,
                      "desired_block_size": WINDOW, "max_block_size": 2 * WINDOW, "length": L},
        tokenization_config={"vocab_size": VOCAB + 1, "mask_token_id": VOCAB, "pad_token_id": VOCAB,
                             "bos_token_id": 0, "eos_token_id": 1},
    )
    m = SetDLM(cfg, tokenizer=object())  # no tokenizer is read on these paths
    bb, H = m.backbone, SIZE["n_heads"]
    D = d // H
    halves = torch.cat([torch.arange(0, D, 2), torch.arange(1, D, 2)])  # DIT dim j <- orderlab dim halves[j]
    rows = torch.cat([h * D + halves for h in range(H)])  # within q (and k) rows, per head

    def rms(weight: torch.Tensor) -> nn.RMSNorm:
        n = nn.RMSNorm(d)
        n.weight.data.copy_(weight)
        return n

    with torch.no_grad():
        bb.vocab_embed.embedding.copy_(om.embed.weight)
        for blk, ob in zip(bb.blocks, om.blocks):
            q, k, v = ob.attn.qkv.weight.split(d)
            blk.attn_qkv.weight.copy_(torch.cat([q[rows], k[rows], v]))
            blk.attn_out.weight.copy_(ob.attn.proj.weight)
            blk.norm1, blk.norm2 = rms(ob.norm1.weight), rms(ob.norm2.weight)
            blk.mlp[0].weight.copy_(ob.mlp[0].weight)
            blk.mlp[0].bias.zero_()
            blk.mlp[1] = nn.GELU()
            blk.mlp[2].weight.copy_(ob.mlp[2].weight)
            blk.mlp[2].bias.zero_()
        out = bb.output_layer
        out.norm_final = rms(om.norm.weight)
        out.linear.weight.zero_()
        out.linear.weight[:VOCAB].copy_(om.head_weight())
        out.linear.bias.zero_()
    return m.eval()


def setdlm_generate(path: str, m, prompt: torch.Tensor, new: int, tau: float) -> torch.Tensor:
    """SetDLM's ``generate`` (batch 1): greedy, one token per step from a window of 8, and
    every window token with confidence >= ``tau``. ``(tokens Long[1, prompt + new], steps)``."""
    *_, GenConfig = _setdlm_imports(path)
    gc = GenConfig(num_steps=new, block_size=m.config.length, first_hitting=True, sampling_strategy="predict_and_noise",
                   noise_removal=False, confidence_based_noising=True, confidence_threshold=tau,
                   align_inputs_to_blocks=False, max_window_size=WINDOW, do_sample=False, use_cache=True,
                   pad_token_id=VOCAB, max_new_tokens=new)
    out = m.generate(inputs=prompt, generation_config=gc, max_new_tokens=new, device=prompt.device,
                     return_dict_in_generate=True)
    return out.sequences, round(new / out.parallelism_factor)  # tokens, forwards after the prompt's


def inputs(batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, VOCAB, (batch, length), generator=g)
    r = torch.ones(batch, length, dtype=torch.long)
    r[:, :PROMPT] = 0
    return x, r


def window(tau: float):
    return build("policy", {"name": "sliding_window", "window": WINDOW, "tau": tau})


# ----------------------------------------------------------------------------- timing


def alternate(fns: dict[str, callable], reps: int) -> dict[str, list[float]]:
    """Seconds per call of each function, the functions run in turn ``reps`` times."""
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def training(path: str, om: nn.Module, length: int, reps: int, batch: int = 16) -> dict[str, list[float]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (batch, length), generator=g)
    ranks = torch.ones_like(x)
    fns = {}
    for p in (0.1, 0.0):
        sm = setdlm_model(path, om, length, dropout=p).train()
        opt = torch.optim.AdamW(sm.parameters(), lr=1e-3)

        def step(sm=sm, opt=opt):
            opt.zero_grad(set_to_none=True)
            sm(input_ids=x).loss.backward()
            torch.nn.utils.clip_grad_norm_(sm.parameters(), 1.0)
            opt.step()

        fns[f"SetDLM training step (dropout {p})"] = step
    model = orderlab_model(length).train()
    obj = build("objective", {"name": "set_nll", "process": {"name": "staggered", "d": 2}})
    trainer = Trainer(model, obj, TrainConfig(steps=10_000, batch_size=batch, lr=1e-3, warmup=0, clip=1.0))
    trainer.train_mode()
    count = iter(range(10**9))
    fns["orderlab Trainer.train_step"] = lambda: trainer.train_step(x, ranks, next(count))
    for fn in fns.values():  # warm-up: allocations, the optimizer's state
        fn()
    return alternate(fns, reps)


# ----------------------------------------------------------------------------- main


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setdlm", required=True, help="a checkout of kuleshov-group/setdlms")
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip", default="", help="comma-separated parts to leave out: compiled,batch,train")
    args = ap.parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    if args.threads:
        torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    L, new = args.length, args.length - PROMPT
    load0 = os.getloadavg()
    om = orderlab_model(L)
    sm = setdlm_model(args.setdlm, om, L)
    x1, r1 = inputs(1, L)
    xb, rb = inputs(args.batch, L)

    fns, tokens, steps, notes = {}, {}, {}, {}

    def ours(key, **kw):
        d = decode(om, window(kw.pop("tau")), kw.pop("x"), kw.pop("r"), **kw)
        tokens[key], steps[key] = d.tokens, d.steps

    def theirs(key, tau):
        tokens[key], steps[key] = setdlm_generate(args.setdlm, sm, x1[:, :PROMPT], new, tau)

    for tau, label in ((1.0, "1 token/step"), (0.9, "threshold 0.9")):
        otau = 2.0 if tau == 1.0 else tau  # orderlab's threshold is >=, SetDLM's too: 2.0 never passes
        fns[f"SetDLM generate(), {label}"] = lambda tau=tau: theirs(("setdlm", tau), tau)
        fns[f"orderlab eager, {label}"] = lambda otau=otau, tau=tau: ours(("eager", tau), tau=otau, x=x1, r=r1)
        if "compiled" not in skip:
            fns[f"orderlab compiled, {label}"] = lambda otau=otau, tau=tau: ours(("compiled", tau), tau=otau, x=x1, r=r1,
                                                                                 compile=True)
    if "batch" not in skip:
        fns[f"orderlab eager, batch {args.batch}"] = lambda: ours(("eager", "B"), tau=2.0, x=xb, r=rb)
        if "compiled" not in skip:
            fns[f"orderlab compiled, batch {args.batch}"] = lambda: ours(("compiled", "B"), tau=2.0, x=xb, r=rb,
                                                                         compile=True)
    first = {}
    for k, fn in fns.items():  # warm-up; the compiled ones compile here (their first call is timed)
        t0 = time.perf_counter()
        fn()
        first[k] = time.perf_counter() - t0
    times = alternate(fns, args.reps)
    load1 = os.getloadavg()

    for tau in (1.0, 0.9):
        ref = tokens["setdlm", tau][0]
        for kind in ("eager", "compiled"):
            if (kind, tau) in tokens:
                same = (tokens[kind, tau][0] == ref).float().mean().item()
                notes[kind, tau] = f"{same:.0%}"
                if tau == 1.0:
                    assert same == 1.0, f"orderlab {kind} and SetDLM decode different tokens ({same:.1%} equal)"

    table = Table(title=f"orderlab vs SetDLM's generate() on CPU ({torch.get_num_threads()} threads), L={L}, "
                        f"{new} new tokens, window {WINDOW}, greedy; torch {torch.__version__}; medians of {args.reps}, "
                        f"alternated; load average {load0[0]:.2f} before, {load1[0]:.2f} after")
    for col in ("decode", "batch", "steps", "s (median)", "tokens/s", "x SetDLM", "ms/step", "x SetDLM per step",
                "tokens = SetDLM", "first call (s)"):
        table.add_column(col, justify="left" if col == "decode" else "right")
    base = {tau: statistics.median(times[f"SetDLM generate(), {lab}"]) for tau, lab in ((1.0, "1 token/step"), (0.9, "threshold 0.9"))}
    base_step = {tau: base[tau] / steps["setdlm", tau] for tau in base}
    for k, ts in times.items():
        med = statistics.median(ts)
        batch = args.batch if "batch" in k else 1
        tau = 0.9 if "0.9" in k else 1.0
        kind = "setdlm" if k.startswith("SetDLM") else ("compiled" if "compiled" in k else "eager")
        n = steps[kind, "B" if batch > 1 else tau]
        same = "-" if kind == "setdlm" or batch > 1 else notes.get((kind, tau), "?")
        table.add_row(k, str(batch), str(n), f"{med:.3f}", f"{batch * new / med:,.0f}", f"{base[tau] / med * batch:.2f}x",
                      f"{1e3 * med / n:.2f}", f"{base_step[tau] / (med / n):.2f}x" if batch == 1 else "-", same,
                      f"{first[k]:.1f}")
    Console().print(table)

    if "train" not in skip:
        tt = training(args.setdlm, om, L, args.reps)
        t2 = Table(title=f"training step, 16 x {L} tokens, fp32, forward + backward + clip + AdamW; medians of {args.reps}, "
                         f"alternated; load average {os.getloadavg()[0]:.2f}")
        for col in ("step", "s (median)", "orderlab speed-up"):
            t2.add_column(col, justify="left" if col == "step" else "right")
        ours = statistics.median(tt["orderlab Trainer.train_step"])
        for k, ts in tt.items():
            t2.add_row(k, f"{statistics.median(ts):.3f}", f"{statistics.median(ts) / ours:.2f}x")
        Console().print(t2)


if __name__ == "__main__":
    main()
