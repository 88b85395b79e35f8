"""The training loop: determinism, exact resume, failure handling, files, frozen models,
weighted metrics, non-finite steps, checkpoints that fail."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from orderlab.checkpoint import load as load_checkpoint
from orderlab.objectives.base import LossOutput, Objective, StepOutput
from orderlab.train import EMA, NonFiniteError, TrainConfig, TrainResult, WarmupCosine, WindowMeans, train
from orderlab.runtime import derive_seed

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


class FakeObjective(Objective):
    """Masks a random subset (from ``generator``) of the positions to generate; NLL there.

    ``exact`` is what the LossOutput reports; ``fail_at`` raises on that training call.
    """

    def __init__(self, exact=True, fail_at=None):
        super().__init__("linear")
        self.exact_, self.fail_at, self.calls = exact, fail_at, 0

    def forward(self, model, tokens, ranks, generator=None):
        self.calls += self.training
        if self.fail_at is not None and self.calls == self.fail_at:
            raise RuntimeError("boom")
        keep = torch.rand(tokens.shape, generator=generator) < 0.5
        noised = (ranks >= 1) & ~keep
        noised[:, -1] |= ranks[:, -1] >= 1  # at least one per row
        x = torch.where(noised, torch.full_like(tokens, model.mask_id), tokens)
        logp = torch.log_softmax(model(x), -1).gather(-1, tokens[..., None])[..., 0]
        return self._output(-(logp * noised).sum(1), noised.sum(1), exact=self.exact_)


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

    with pytest.raises(ConfigError, match=r"^ema: must be in \(0, 1\)"):
        TrainConfig(ema=1.5)
    with pytest.raises(ConfigError, match=r"^batch_size"):
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
    # no tmp file left; the checkpoint before the last one kept beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt", "metrics.jsonl"]
    assert load_checkpoint(tmp_path / "checkpoint.prev.pt")["step"] == 8
    ok = train(_model(), FakeObjective(exact=True), FakeTask(), TrainConfig(**CFG), progress=False)
    assert ok.valid["label"] == "nll"
    assert ok.valid["bits_per_token"] == pytest.approx(ok.last["valid_bits_per_token"])


@pytest.mark.parametrize("ckpt_every, log_every", [(6, 2), (5, 4)])
def test_interrupt_then_resume_is_bit_identical(tmp_path, ckpt_every, log_every):
    """2N steps in one go == N steps, interrupted, resumed for N more (with EMA and dropout),
    also when the checkpoint falls inside a log window (its unfinished window is saved)."""
    cfg = TrainConfig(**{**CFG, "steps": 12, "ckpt_every": ckpt_every, "log_every": log_every, "ema": 0.9})
    full_model = _model()
    full = train(full_model, FakeObjective(), FakeTask(), cfg, tmp_path / "full", progress=False)

    def stop(step, record):
        if step == 8:
            raise KeyboardInterrupt

    cut = TrainResult()
    with pytest.raises(KeyboardInterrupt):
        train(_model(), FakeObjective(), FakeTask(), cfg, tmp_path / "cut", progress=False, on_step=stop, result=cut)
    assert cut.status == "interrupted" and cut.step == 8 and cut.checkpoint_step == ckpt_every
    assert cut.summary()["error"] == "KeyboardInterrupt: "
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["step"] == ckpt_every

    resumed_model = _model(seed=123)  # different init: everything must come from the checkpoint
    resumed = train(resumed_model, FakeObjective(), FakeTask(), cfg, tmp_path / "cut", resume=True, progress=False)
    assert resumed.start_step == ckpt_every
    assert resumed.losses == full.losses[ckpt_every:]  # bit-identical loss curve
    for (k, a), b in zip(full_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), k
    ema_full = load_checkpoint(tmp_path / "full" / "checkpoint.pt")["ema"]["shadow"]
    ema_cut = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["ema"]["shadow"]
    assert all(torch.equal(ema_full[k], ema_cut[k]) for k in ema_full)
    # the metrics file has no duplicate records from the steps redone after the resume,
    # and every record (a window cut by the checkpoint included) is the uninterrupted one
    lines = lambda d: [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    drop = lambda rs: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rs]  # noqa: E731
    assert [r["step"] for r in lines("cut")] == [r["step"] for r in lines("full")]
    assert drop(lines("cut")) == drop(lines("full"))


def test_failure_keeps_checkpoint_and_reports_status(tmp_path):
    res = TrainResult()
    with pytest.raises(RuntimeError, match="boom"):
        train(_model(), FakeObjective(fail_at=7), FakeTask(), TrainConfig(**CFG), tmp_path, progress=False, result=res)
    assert res.status == "failed" and "boom" in res.summary()["error"]
    assert res.step == 6 and res.checkpoint_step == 4
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 4
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [2, 4, 6]
    assert not (tmp_path / "results.json").exists()  # results.json is run.py's


def test_fresh_run_replaces_stale_metrics(tmp_path):
    train(_model(), FakeObjective(), FakeTask(), TrainConfig(**CFG), tmp_path, progress=False)
    train(_model(), FakeObjective(), FakeTask(), TrainConfig(**{**CFG, "steps": 4}), tmp_path, progress=False)
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [2, 4]


class Scaled(Objective):
    """An objective with a parameter of its own that does not train the model: loss
    ``(a - 3)^2 + 0 * model output``, so the model gets gradients only if trained."""

    trains_model = False

    def __init__(self):
        super().__init__("linear")
        self.a = nn.Parameter(torch.zeros(()))
        self.drop_seen = []

    def step(self, model, tokens, ranks, generator=None):
        y = model(tokens)
        self.drop_seen.append(model.training)
        loss = (self.a - 3.0) ** 2 + 0.0 * y.sum()
        return StepOutput(loss, {"a": float(self.a.detach()), "rows": float(tokens.shape[0])}, weight=tokens.shape[0])


def test_frozen_model_and_objective_parameters(tmp_path):
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    obj = Scaled()
    # weight decay: had the model's weights been in the optimizer, AdamW would move them
    cfg = TrainConfig(**{**CFG, "steps": 40, "lr": 0.2, "ema": 0.5, "valid_n": 0, "weight_decay": 0.1})
    res = train(model, obj, FakeTask(), cfg, tmp_path, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # not one bit changed
    assert all(p.requires_grad for p in model.parameters())  # unfrozen after the stage
    assert set(obj.drop_seen) == {False}  # the frozen model ran in eval mode: no dropout
    assert abs(float(obj.a.detach()) - 3.0) < 0.5  # the objective's own parameter learned
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert set(state["ema"]["shadow"]) == {"objective.a"} and state["objective"]["a"] == obj.a
    assert res.last["rows"] == 8 and "a" in res.last

    class Nothing(Scaled):
        def __init__(self):
            super().__init__()
            self.a.requires_grad_(False)

    with pytest.raises(ValueError, match="nothing to train: Nothing has trains_model=False"):
        train(_model(), Nothing(), FakeTask(), cfg, progress=False)


def test_window_means_are_weight_weighted():
    m = WindowMeans()
    m.update({"x": 1.0, "y": 2.0}, weight=3.0)
    m.update({"x": 2.0}, weight=1.0)
    assert m.compute() == {"x": pytest.approx(1.25), "y": 2.0}  # (3*1 + 1*2) / 4
    m.update({"y": float("nan")}, weight=1.0)
    assert math.isnan(m.compute()["y"]) and m.compute()["x"] == pytest.approx(1.25)
    n = WindowMeans()
    n.load_state_dict(m.state_dict())  # a checkpointed window replays to the same means
    assert n.compute()["x"] == m.compute()["x"] and len(n) == 3
    m.reset()
    assert m.compute() == {} and len(m) == 0


def test_logged_metrics_are_token_weighted(tmp_path):
    """A record's bits_per_token is total nats / total tokens of its window, not a mean of
    per-step values."""
    seen = []

    class Spy(FakeObjective):
        def step(self, model, tokens, ranks, generator=None):
            out = super().step(model, tokens, ranks, generator)
            if self.training:  # not the validation calls
                seen.append((out.metrics["bits_per_token"], out.weight))
            return out

    res = train(_model(), Spy(), FakeTask(), TrainConfig(**{**CFG, "steps": 4, "log_every": 4}), progress=False)
    weighted = sum(b * w for b, w in seen) / sum(w for _, w in seen)
    assert res.last["bits_per_token"] == pytest.approx(weighted, rel=1e-12)
    assert len(seen) == 4 and len({w for _, w in seen}) > 1  # the weights differ, so the check could fail


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


# --------------------------------------------------------------------------- non-finite steps


class Diverging(FakeObjective):
    """``FakeObjective`` whose training loss, gradients or a metric turn non-finite at the
    given training calls (``bad``: {call: "loss" | "grad" | "metric" | "nan_ok"})."""

    nan_metrics = frozenset({"maybe"})

    def __init__(self, bad):
        super().__init__()
        self.bad = bad

    def step(self, model, tokens, ranks, generator=None):
        out = super().step(model, tokens, ranks, generator)
        kind = self.bad.get(self.calls) if self.training else None
        if kind == "loss":
            out.loss = out.loss * math.nan
        elif kind == "grad":  # a finite loss whose gradient is not: d sqrt(u) / du at u = 0
            out.loss = out.loss + torch.sqrt(model.out.bias.sum() * 0.0)
        elif kind == "metric":
            out.metrics["bits_per_token"] = math.inf
        out.metrics["maybe"] = math.nan if kind == "nan_ok" else 1.0
        return out


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind, what", [("loss", "loss is nan"), ("grad", "gradient norm is nan"),
                                        ("metric", "metric 'bits_per_token' is inf")])
def test_first_nonfinite_step_stops_with_no_weight_changed(tmp_path, kind, what):
    model, seen, res = _model(), {}, TrainResult()
    keep = lambda step, record: seen.update({step: _weights(model)})  # noqa: E731
    with pytest.raises(NonFiniteError) as info:
        train(model, Diverging({7: kind}), FakeTask(), TrainConfig(**CFG), tmp_path, progress=False, name="lm",
              on_step=keep, result=res)
    assert str(info.value) == (f"stage 'lm', step 7: {what}, not finite; training stopped, its last checkpoint "
                               "(step 4) is kept")
    assert (info.value.stage, info.value.step) == ("lm", 7)
    assert res.status == "failed" and res.step == 6 and res.checkpoint_step == 4 and len(res.losses) == 6
    assert all(torch.equal(v, seen[6][k]) for k, v in model.state_dict().items())  # the bad step changed nothing
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [2, 4, 6]


def test_nonfinite_steps_are_skipped_and_counted_up_to_the_limit(tmp_path):
    cfg = TrainConfig(**{**CFG, "skip_nonfinite": 2})
    model, seen = _model(), {}
    res = train(model, Diverging({3: "loss", 5: "grad", 6: "nan_ok"}), FakeTask(), cfg, tmp_path, progress=False,
                on_step=lambda step, record: seen.update({step: _weights(model)}))
    assert res.status == "completed" and res.step == 12 and res.skipped == 2 and res.summary()["skipped"] == 2
    assert [i for i, x in enumerate(res.losses, 1) if not math.isfinite(x)] == [3]  # step 5: a finite loss, a NaN gradient
    records = {r["step"]: r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())}
    assert [records[s]["skipped"] for s in (2, 4, 6, 8)] == [0, 1, 2, 2]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records.values())
    # a declared NaN metric is logged (as null with its reason: valid JSON), not a failure
    assert records[6]["maybe"] is None and records[6]["nonfinite"] == {"maybe": "nan"}
    for step in (3, 5):  # a skipped step updates no weight
        assert all(torch.equal(seen[step][k], seen[step - 1][k]) for k in seen[step])
    assert not all(torch.equal(seen[4][k], seen[3][k]) for k in seen[4])
    assert load_checkpoint(tmp_path / "checkpoint.pt")["skipped"] == 2
    with pytest.raises(NonFiniteError, match=r"^step 9: loss is nan, not finite after 2 skipped non-finite steps "
                                             r"\(train.skip_nonfinite\); training stopped, its last checkpoint \(step 8\)"):
        train(_model(), Diverging({3: "loss", 5: "loss", 9: "loss"}), FakeTask(), cfg, tmp_path, progress=False)


def test_a_checkpoint_with_a_nonfinite_weight_is_never_written(tmp_path):
    from orderlab.train import Trainer

    model = _model()
    trainer = Trainer(model, FakeObjective(), TrainConfig(**CFG), stage="lm")
    trainer.save(tmp_path / "checkpoint.pt")
    with torch.no_grad():
        model.out.bias[2] = math.inf
    with pytest.raises(NonFiniteError, match=r"^stage 'lm', step 0: weight 'model.out.bias' is inf"):
        trainer.save(tmp_path / "checkpoint.pt")
    assert trainer.saved_step == 0 and not (tmp_path / "checkpoint.prev.pt").exists()


# --------------------------------------------------------------------------- checkpoints that fail


def test_truncated_latest_checkpoint_falls_back_to_the_previous_on_resume(tmp_path, capsys):
    """Checkpoints at 4 and 8, interrupted at 10, checkpoint.pt truncated: the resume says
    so, continues from step 4 and still ends bit-identical to the uninterrupted run."""
    cfg = TrainConfig(**{**CFG, "ema": 0.9})
    full = train(_model(), FakeObjective(), FakeTask(), cfg, tmp_path / "full", progress=False)

    def stop(step, record):
        if step == 10:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_model(), FakeObjective(), FakeTask(), cfg, tmp_path / "cut", progress=False, on_step=stop)
    latest, prev = tmp_path / "cut" / "checkpoint.pt", tmp_path / "cut" / "checkpoint.prev.pt"
    assert load_checkpoint(prev)["step"] == 4
    latest.write_bytes(latest.read_bytes()[:1000])
    capsys.readouterr()
    resumed = train(_model(seed=5), FakeObjective(), FakeTask(), cfg, tmp_path / "cut", resume=True, progress=False)
    err = capsys.readouterr().err
    assert f"warning: {latest}: unreadable checkpoint" in err and f"using the previous checkpoint {prev} (step 4)" in err
    assert resumed.start_step == 4 and resumed.losses == full.losses[4:]
    lines = lambda d: [{k: v for k, v in json.loads(x).items() if k != "tokens_per_s"}  # noqa: E731
                       for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
    assert lines("cut") == lines("full")


def test_a_checkpoint_that_does_not_read_back_replaces_nothing(tmp_path, monkeypatch):
    from orderlab import checkpoint as ckpt

    path = tmp_path / "checkpoint.pt"
    ckpt.save(path, {"step": 1, "model": {}})
    ckpt.save(path, {"step": 2, "model": {}})
    real = torch.save

    def torn(obj, f):  # a write cut short (full disk, ...)
        real(obj, f)
        Path(f).write_bytes(Path(f).read_bytes()[:100])

    monkeypatch.setattr(torch, "save", torn)
    with pytest.raises(ckpt.CheckpointError, match="unreadable checkpoint"):
        ckpt.save(path, {"step": 3, "model": {}})
    monkeypatch.undo()
    assert ckpt.load(path)["step"] == 2 and ckpt.load(tmp_path / "checkpoint.prev.pt")["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt"]  # no tmp file left
    path.write_bytes(b"garbage")
    (tmp_path / "checkpoint.prev.pt").write_bytes(b"garbage")
    with pytest.raises(ckpt.CheckpointError, match=f"^{re.escape(str(path))}: unreadable checkpoint"):  # both bad: the latest named
        ckpt.load(path)
