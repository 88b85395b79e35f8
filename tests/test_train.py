"""The training loop: determinism, exact resume, failure handling, files."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from orderlab.train import EMA, TrainConfig, WarmupCosine, derive_seed, load_checkpoint, train

V, L = 7, 6


class FakeTask:
    """Random tokens; the last 3 positions are generated, the first 3 given."""

    vocab_size, seq_len, eos_id, metric = V, L, None, "exact_match"

    def batch(self, n, split="train", seed=0):
        g = torch.Generator().manual_seed(seed * 3 + ("train", "valid", "test").index(split))
        tokens = torch.randint(0, V, (n, L), generator=g)
        ranks = torch.zeros(n, L, dtype=torch.long)
        ranks[:, 3:] = 1
        return tokens, ranks


class FakeModel(nn.Module):
    """Embedding + dropout + linear: dropout draws from the global torch RNG."""

    def __init__(self):
        super().__init__()
        self.vocab_size, self.mask_id = V, V
        self.embed = nn.Embedding(V + 1, 16)
        self.drop = nn.Dropout(0.1)
        self.out = nn.Linear(16, V)

    def forward(self, x):
        return self.out(self.drop(self.embed(x)))


class FakeObjective:
    """Masks a random subset (from ``generator``) of the positions to generate; NLL there.

    ``exact`` is what the LossOutput reports; ``fail_at`` raises on that training call.
    """

    def __init__(self, exact=True, fail_at=None):
        self.exact, self.fail_at, self.calls = exact, fail_at, 0

    def __call__(self, model, tokens, ranks, generator=None):
        self.calls += model.training
        if self.fail_at is not None and self.calls == self.fail_at:
            raise RuntimeError("boom")
        keep = torch.rand(tokens.shape, generator=generator) < 0.5
        noised = (ranks >= 1) & ~keep
        noised[:, -1] |= ranks[:, -1] >= 1  # at least one per row
        x = torch.where(noised, torch.full_like(tokens, model.mask_id), tokens)
        logp = torch.log_softmax(model(x), -1).gather(-1, tokens[..., None])[..., 0]
        nats = -(logp * noised).sum(1)
        count = noised.sum(1).float()
        return SimpleNamespace(loss=nats.sum() / count.sum(), nats=nats.detach(), tokens=count, exact=self.exact)


def _model(seed=0):
    torch.manual_seed(seed)
    return FakeModel()


CFG = dict(steps=12, batch_size=8, lr=1e-2, warmup=3, log_every=2, eval_every=4, valid_n=16, ckpt_every=4)


def test_warmup_cosine_and_derived_seeds():
    f = WarmupCosine(4, 20)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(20) == pytest.approx(0.0) and f(12) == pytest.approx(0.5)
    assert WarmupCosine(0, 10)(0) == 1.0
    seeds = {derive_seed(s, t, k) for s in range(3) for t in range(50) for k in ("data", "objective")}
    assert len(seeds) == 300 and all(0 <= s < 2**62 for s in seeds)


def test_config_ranges_are_config_errors():
    from orderlab.registry import ConfigError

    with pytest.raises(ConfigError, match=r"^train\.ema: must be in \(0, 1\)"):
        TrainConfig(ema=1.5)
    with pytest.raises(ConfigError, match=r"^train\.batch_size"):
        TrainConfig(batch_size=0)


def test_same_seed_same_losses_bit_identical():
    a = train(_model(), FakeObjective(), FakeTask(), TrainConfig(**CFG), progress=False)
    b = train(_model(), FakeObjective(), FakeTask(), TrainConfig(**CFG), progress=False)
    c = train(_model(), FakeObjective(), FakeTask(), TrainConfig(**{**CFG, "seed": 1}), progress=False)
    assert len(a.losses) == 12 and a.losses == b.losses
    assert a.losses != c.losses
    assert a.status == "completed" and a.step == 12


def test_metrics_checkpoint_and_validation_label(tmp_path):
    res = train(_model(), FakeObjective(exact=False), FakeTask(), TrainConfig(**CFG, ema=0.9), tmp_path, progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6, 8, 10, 12]
    for r in records:
        assert {"step", "loss", "bits_per_token", "lr", "tokens_per_s"} <= set(r)
        assert r["bits_per_token"] > 0 and r["tokens_per_s"] > 0
    assert records[0]["loss"] == pytest.approx(sum(res.losses[:2]) / 2)
    assert [r["valid_label"] for r in records if "valid_label" in r] == ["nelbo (bound)"] * 3
    assert res.valid["step"] == 12 and res.valid["label"] == "nelbo (bound)"
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["step"] == 12
    assert {"model", "optimizer", "scheduler", "ema", "rng"} <= set(state)
    assert state["ema"]["updates"] == 12
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "metrics.jsonl"]  # no tmp file left
    ok = train(_model(), FakeObjective(exact=True), FakeTask(), TrainConfig(**CFG), progress=False)
    assert ok.valid["label"] == "nll"
    assert ok.valid["bits_per_token"] == pytest.approx(ok.last["valid_bits_per_token"])


def test_interrupt_then_resume_is_bit_identical(tmp_path):
    """2N steps in one go == N steps, interrupted, resumed for N more (with EMA and dropout)."""
    cfg = TrainConfig(**{**CFG, "steps": 12, "ckpt_every": 6, "ema": 0.9})
    full_model = _model()
    full = train(full_model, FakeObjective(), FakeTask(), cfg, tmp_path / "full", progress=False)

    def stop(step, record):
        if step == 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_model(), FakeObjective(), FakeTask(), cfg, tmp_path / "cut", progress=False, on_step=stop)
    status = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert status["status"] == "interrupted"
    assert status["train"]["step"] == 8 and status["train"]["checkpoint_step"] == 6
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["step"] == 6

    resumed_model = _model(seed=123)  # different init: everything must come from the checkpoint
    cfg.resume = True
    resumed = train(resumed_model, FakeObjective(), FakeTask(), cfg, tmp_path / "cut", progress=False)
    assert resumed.start_step == 6
    assert resumed.losses == full.losses[6:]  # bit-identical loss curve
    for (k, a), b in zip(full_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), k
    ema_full = load_checkpoint(tmp_path / "full" / "checkpoint.pt")["ema"]["shadow"]
    ema_cut = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["ema"]["shadow"]
    assert all(torch.equal(ema_full[k], ema_cut[k]) for k in ema_full)
    # the metrics file has no duplicate records from the steps redone after the resume
    lines = lambda d: (tmp_path / d / "metrics.jsonl").read_text().splitlines()  # noqa: E731
    steps = [json.loads(x)["step"] for x in lines("cut")]
    assert steps == [2, 4, 6, 8, 10, 12]
    loss = lambda d: [json.loads(x)["loss"] for x in lines(d)]  # noqa: E731
    assert loss("cut") == loss("full")


def test_failure_keeps_checkpoint_and_writes_status(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        train(_model(), FakeObjective(fail_at=7), FakeTask(), TrainConfig(**CFG), tmp_path, progress=False)
    status = json.loads((tmp_path / "results.json").read_text())
    assert status["status"] == "failed" and "boom" in status["train"]["error"]
    assert status["train"]["step"] == 6 and status["train"]["checkpoint_step"] == 4
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 4
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [2, 4, 6]


def test_fresh_run_replaces_stale_metrics(tmp_path):
    train(_model(), FakeObjective(), FakeTask(), TrainConfig(**CFG), tmp_path, progress=False)
    train(_model(), FakeObjective(), FakeTask(), TrainConfig(**{**CFG, "steps": 4}), tmp_path, progress=False)
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [2, 4]


def test_ema_tracks_and_swaps_back():
    m = nn.Linear(2, 2)
    ema = EMA(m, 0.5)
    before = m.weight.detach().clone()
    with torch.no_grad():
        m.weight.add_(1.0)
    ema.update(m)  # warmed-up decay min(0.5, 2/11)
    d = 2 / 11
    assert torch.allclose(ema.shadow["weight"], before * d + (before + 1) * (1 - d))
    with ema.swapped(m):
        assert torch.equal(m.weight, ema.shadow["weight"])
    assert torch.equal(m.weight, before + 1)
    assert not math.isnan(float(ema.shadow["bias"].sum()))
