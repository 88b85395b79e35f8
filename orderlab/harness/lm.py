"""``OrderlabLM``: an orderlab model as an lm-eval ``LM`` (registered as ``orderlab``).

- ``generate_until``: contexts left-padded (ranks -1), ``max_gen_toks`` masked positions
  appended (rank 1), decoded in batches by the decode policy (``orderlab.decode``: exact KV
  cache where the rule has one, a row's masked tail dropped once it reveals end-of-text),
  then the generated ids cut at the first end-of-text id, decoded to text and cut at the
  first stop sequence (``until``). NFE per request: logged (logger ``orderlab.harness``)
  and kept in ``nfe`` (request order).
- ``loglikelihood``: the continuation scored by the ``order`` scorer
  (``orderlab.harness.scorers``): exact under a fixed order (``l2r`` default), or a bound.
- ``loglikelihood_rolling``: lm-eval's disjoint rolling windows of ``max_len`` tokens,
  each window's tokens scored as a continuation of the tokens before it, summed.

Requests are batched by length (``rows.batches``: longest first, ties by content, so a
batch is a function of the request set, not of its order) and returned in request order.
Batch ``j`` of a call draws from ``derive_seed(seed, j, <method>)``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from lm_eval.api.model import LM
from tqdm import tqdm

from orderlab.evaluate import cache_label, decode_cache
from orderlab.runtime import derive_seed, device_of

from .args import ModelArgs
from .rows import Codec, Row, batches, cut_text, fit, pack
from .scorers import Env, build_scorer
from .source import Source, from_experiment, load_source, resolve_policy

__all__ = ["OrderlabLM", "log"]

log = logging.getLogger("orderlab.harness")

_GEN_KEYS = ("until", "max_gen_toks", "do_sample", "temperature", "top_p")


class OrderlabLM(LM):
    """An orderlab model for lm-eval. ``OrderlabLM(**model_args)`` (what lm-eval calls with
    ``--model_args``; keys: :class:`~orderlab.harness.args.ModelArgs`), or
    :meth:`from_experiment` for a built experiment."""

    def __init__(self, **model_args: Any):
        super().__init__()
        args = ModelArgs.parse(model_args)
        self._setup(load_source(args), args)

    @classmethod
    def from_experiment(cls, exp: Any, **model_args: Any) -> "OrderlabLM":
        """The experiment's model, tokenizer and policies (``orderlab.run``'s
        ``evaluate.lm_eval`` step); ``model_args`` as for lm-eval, without a source."""
        self = cls.__new__(cls)
        LM.__init__(self)
        args = ModelArgs.parse(model_args, source_given=True)
        self._setup(from_experiment(exp, args), args)
        return self

    def _setup(self, source: Source, args: ModelArgs) -> None:
        self.args, self.source = args, source
        self.model = source.model
        self._device = device_of(self.model)
        self.codec = Codec(source.tokenizer, add_special_tokens=args.add_special_tokens)
        self.policy = resolve_policy(args, source)
        self.scorer = build_scorer(args.order, args.order_knobs)
        self.env = Env(self.model, self.policy, source.orders, decode_cache(args.cache, "model_args.cache"))
        self.nfe: list[int] = []  # per generate_until request, over every call, in request order

    # ------------------------------------------------------------------ lm-eval's face

    @property
    def max_length(self) -> int:
        return int(self.model.max_len)

    @property
    def tokenizer_name(self) -> str:
        return str(self.source.tokenizer.source)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        tok = self.source.tokenizer
        if not chat_template or not tok.has_chat_template:
            return None
        return tok.chat_template(chat_template if isinstance(chat_template, str) else None)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The tokenizer's chat template; the texts it makes carry their own special tokens, so
        contexts are encoded without the post-processor's from here on (as ``JsonlTask``'s
        chat prompts are)."""
        self.codec.chat = True
        return self.source.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    def get_model_info(self) -> dict[str, Any]:
        """Added to lm-eval's ``results["config"]``: what was evaluated and how it scored."""
        return {"orderlab_source": self.source.label, "orderlab_policy": repr(self.policy),
                "orderlab_order": repr(self.scorer), "orderlab_order_is_bound": self.scorer.bound,
                "orderlab_cache": cache_label(self.env.cache)}

    def info(self) -> dict[str, Any]:
        """:meth:`get_model_info` plus the NFE of the generations so far."""
        out = self.get_model_info()
        if self.nfe:
            out["nfe"] = {"requests": len(self.nfe), "mean": sum(self.nfe) / len(self.nfe), "min": min(self.nfe),
                          "max": max(self.nfe)}
        return out

    # ------------------------------------------------------------------ requests

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        rows = [fit(*self.codec.pair(*r.args), self.max_length) for r in requests]
        results = self._score(rows, "loglikelihood", disable_tqdm)
        for r, res in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", r.args, res)
        return results

    def loglikelihood_tokens(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                             disable_tqdm: bool = True) -> list[tuple[float, bool]]:
        """``(log p, is_greedy)`` of each ``(context ids, continuation ids)`` pair, in order:
        :meth:`loglikelihood` without the text (contexts must be non-empty)."""
        return self._score([fit(c, t, self.max_length) for c, t in pairs], "loglikelihood", disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        owners, rows = [], []
        for i, r in enumerate(requests):
            ids = self.source.tokenizer.encode(r.args[0], add_special_tokens=False)
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=ids, prefix_token=self.codec.prefix_id, max_seq_len=self.max_length - 1, context_len=1)):
                owners.append(i)
                rows.append(fit(ctx, cont, self.max_length))
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owners, self._score(rows, "loglikelihood_rolling", disable_tqdm)):
            totals[i] += logp
        for r, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        settings = [self._gen_settings(dict(r.args[1] or {})) for r in requests]
        rows = [fit(self.codec.context(r.args[0]), s["max_gen_toks"], self.max_length) for r, s in zip(requests, settings)]
        key = lambda i: (rows[i].target, settings[i]["temperature"], settings[i]["top_p"])  # noqa: E731
        texts: list[str] = [""] * len(requests)
        nfe: list[int] = [0] * len(requests)
        for j, idx in self._batches(rows, "generate_until", disable_tqdm, key):
            s = settings[idx[0]]
            for i, (ids, n) in zip(idx, self._generate([rows[i] for i in idx], s["temperature"], s["top_p"],
                                                       derive_seed(self.args.seed, j, "harness-generate"))):
                texts[i], nfe[i] = cut_text(self.codec.text(ids), settings[i]["until"]), n
                log.info("generate_until request %d: %d NFE, %d tokens", i, n, len(ids))
        self.nfe += nfe
        for r, text in zip(requests, texts):
            self.cache_hook.add_partial("generate_until", r.args, text)
        return texts

    # ------------------------------------------------------------------ the work

    def _batches(self, rows: Sequence[Row], what: str, disable_tqdm: bool, group: Callable | None = None):
        """``(j, indices)`` per batch, with a progress bar over rows."""
        bar = tqdm(total=len(rows), desc=f"orderlab {what}",
                   disable=disable_tqdm or not self.args.progress or self.rank != 0)
        try:
            for j, idx in enumerate(batches(rows, self.args.batch_size, *(() if group is None else (group,)))):
                yield j, idx
                bar.update(len(idx))
        finally:
            bar.close()

    @torch.no_grad()
    def _score(self, rows: Sequence[Row], what: str, disable_tqdm: bool) -> list[tuple[float, bool]]:
        """``(log p, is_greedy)`` per row, in row order."""
        out: list[tuple[float, bool]] = [(0.0, True)] * len(rows)
        tok = self.source.tokenizer
        for j, idx in self._batches(rows, what, disable_tqdm):
            x, ranks = pack([rows[i] for i in idx], tok.pad_id, self.model.mask_id, self._device)
            gen = torch.Generator(device=self._device).manual_seed(derive_seed(self.args.seed, j, f"harness-{what}"))
            scored = self.scorer(self.env, x, ranks, gen)
            for b, i in enumerate(idx):
                out[i] = (float(scored.logp[b]), bool(scored.greedy[b]))
        return out

    @torch.no_grad()
    def _generate(self, rows: Sequence[Row], temperature: float, top_p: float, seed: int) -> list[tuple[list[int], int]]:
        """``(generated ids, NFE)`` per row of one batch."""
        from orderlab.decoding import decode

        tok = self.source.tokenizer
        x, ranks = pack(rows, tok.pad_id, self.model.mask_id, self._device)
        out = decode(self.model, self.policy, x, ranks, cache=self.env.cache, temperature=temperature, top_p=top_p,
                     seed=seed, eos_id=tok.eos_id, pad_id=tok.pad_id)
        gen, revealed = (ranks >= 1).cpu(), (out.ranks >= 1).cpu()
        tokens = out.tokens.cpu()
        return [(tokens[b][gen[b] & revealed[b]].tolist(), int(out.nfe[b])) for b in range(len(rows))]

    def _gen_settings(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """lm-eval's ``gen_kwargs``: ``until`` (a string or list), ``max_gen_toks`` (the
        ``max_gen_toks`` model arg wins: a diffusion decoder's canvas), greedy unless
        ``do_sample`` with a ``temperature`` > 0, ``top_p``. Others are ignored, with a warning."""
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        sample = bool(kwargs.get("do_sample", False))
        temperature = float(kwargs.get("temperature", 1.0 if sample else 0.0)) if sample else 0.0
        other = sorted(set(kwargs) - set(_GEN_KEYS))
        if other:
            log.warning("generate_until: ignoring gen_kwargs %s (orderlab reads %s)", other, ", ".join(_GEN_KEYS))
        return {"until": until, "max_gen_toks": int(self.args.max_gen_toks or kwargs.get("max_gen_toks", 256)),
                "temperature": temperature, "top_p": float(kwargs.get("top_p", 1.0) if sample else 1.0)}
