"""``evaluate.compile`` (and ``ablate.compile``): the compiled decode step in evaluation,
``auto`` deciding by the work (``orderlab.evaluate.compile_pays``), numbers unchanged."""

from __future__ import annotations

import pytest

from orderlab import decoding
from orderlab import evaluate as E
from orderlab.config import load
from orderlab.registry import ConfigError

AOT = {"backend": "aot_eager"}  # Dynamo's graphs without inductor's codegen: seconds, not a minute
UNTIMED = ("wall_s", "tokens_per_s", "compiled_batches")


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in UNTIMED} for r in rows]


@pytest.fixture
def exp(tiny_config):
    tiny_config["stages"]["lm"]["train"]["steps"] = 0  # untrained weights decode just as well
    return load(tiny_config)


@pytest.fixture
def spy(monkeypatch):
    """The ``compile`` argument of every ``decode`` call (evaluate imports it at call time)."""
    seen, real = [], decoding.decode

    def recording(*args, **kwargs):
        seen.append(kwargs.get("compile", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(decoding, "decode", recording)
    return seen


def _policies(exp):
    return {"l2r": exp.policy, "thr": exp.policies["threshold(tau=0.9)"]}


def test_compiled_evaluation_gives_the_eager_numbers(exp, spy):
    eager = E.evaluate(exp.model, exp.task, _policies(exp), n=12, batch_size=5, compile=False)
    compiled = E.evaluate(exp.model, exp.task, _policies(exp), n=12, batch_size=5, compile=True, compile_options=AOT)
    assert _strip(compiled) == _strip(eager)
    assert [r["compiled_batches"] for r in eager + compiled] == [0, 0, 3, 3]
    assert spy == [False] * 6 + [AOT] * 6


def test_auto_stays_eager_for_small_work_and_compiles_once_the_work_ahead_pays(exp, spy, monkeypatch):
    eager = E.evaluate(exp.model, exp.task, _policies(exp), n=12, batch_size=5, compile=False)
    spy.clear()
    small = E.evaluate(exp.model, exp.task, _policies(exp), n=12, batch_size=5, compile="auto", compile_options=AOT)
    assert spy == [False] * 6 and [r["compiled_batches"] for r in small] == [0, 0]  # 3 steps x 2 batches ahead
    spy.clear()
    monkeypatch.setattr(E, "COMPILE_S", 1e-9)  # compiling costs nothing: it pays after the first batch
    paid = E.evaluate(exp.model, exp.task, _policies(exp), n=12, batch_size=5, compile="auto", compile_options=AOT)
    assert spy == [False, AOT, AOT] * 2 and [r["compiled_batches"] for r in paid] == [2, 2]
    assert _strip(paid) == _strip(eager) == _strip(small)


def test_auto_decides_by_the_steps_the_eager_batches_took(monkeypatch):
    """The work ahead is the mean steps of the batches so far times the batches left."""
    monkeypatch.setattr(E, "COMPILE_S", 1.0)
    monkeypatch.setattr(E, "ROW_SAVED_S", 0.0)
    monkeypatch.setattr(E, "STEP_SAVED_S", 0.1)  # pays beyond 10 steps ahead
    import torch

    def batch(steps):
        return E.Measurement({}, torch.tensor([steps, 1]), torch.zeros(2), 0.0, torch.zeros(0, 3))

    choice = E._CompileChoice("auto", None, batches=4)
    choice.after(batch(3), rows=2)
    assert not choice.on  # 3 steps x 3 batches ahead = 9
    assert choice.decode_arg() is False
    choice.after(batch(9), rows=2)
    assert choice.on and choice.decode_arg() is True  # (3 + 9) / 2 = 6 steps x 2 batches ahead = 12
    choice.after(batch(1), rows=2)
    assert choice.on  # decided once: the rest compiles


def test_compile_pays_at_the_documented_break_even():
    """The docstring's numbers: ~21,400 steps at batch 1, ~9,900 at batch 32; a second
    graph doubles the cost; 480 steps of 128 rows stay eager."""
    assert not E.compile_pays(21_200, 1) and E.compile_pays(21_600, 1)
    assert not E.compile_pays(9_800, 32) and E.compile_pays(10_000, 32)
    assert E.compile_pays(22_000, 1, graphs=1) and not E.compile_pays(22_000, 1, graphs=2)
    assert not E.compile_pays(480, 128)


@pytest.mark.parametrize("section", ["evaluate", "ablate"])
def test_a_bad_compile_value_names_the_key(tiny_config, section):
    if section == "ablate":
        tiny_config["ablate"] = {"grid": ["l2r"], "n": 4, "batch_size": 4}
    tiny_config[section]["compile"] = "sometimes"
    with pytest.raises(ConfigError, match=rf"^{section}\.compile: unknown compile 'sometimes'; choose auto"):
        load(tiny_config)


def test_compile_true_with_an_approximate_cache_is_a_config_error_and_auto_stays_eager(tiny_config, monkeypatch):
    tiny_config["model"]["attention"] = {"name": "bidirectional"}
    tiny_config["evaluate"].update(cache="approximate_prefix", compile=True)
    with pytest.raises(ConfigError, match=r"^evaluate\.compile: true, but cache 'approximate_prefix' runs eagerly"):
        load(tiny_config)
    tiny_config["evaluate"]["compile"] = "auto"
    tiny_config["stages"]["lm"]["train"]["steps"] = 0
    exp = load(tiny_config)
    monkeypatch.setattr(E, "COMPILE_S", 1e-9)
    rows = E.evaluate(exp.model, exp.task, {"l2r": exp.policy}, n=6, batch_size=2, cache="approximate_prefix",
                      compile="auto")
    assert rows[0]["compiled_batches"] == 0


def test_ablation_runs_pass_their_compile_setting(tiny_config, spy, monkeypatch):
    """``ablate.compile`` reaches every (point, seed) run's decode; the records are the eager ones."""
    from orderlab import ablate

    tiny_config["stages"]["lm"]["train"]["steps"] = 0
    tiny_config["ablate"] = {"grid": ["l2r", {"name": "threshold", "tau": 0.9}], "n": 4, "batch_size": 2,
                             "heatmaps": False, "bits": False, "compile": False}
    eager = ablate.run_grid(load(tiny_config), {}, save=lambda: None, progress=False)
    assert spy == [False] * 4
    spy.clear()
    tiny_config["ablate"]["compile"] = True
    real = E.measure
    monkeypatch.setattr(E, "measure", lambda *a, **k: real(*a, **k, compile_options=AOT))  # fast backend
    compiled = ablate.run_grid(load(tiny_config), {}, save=lambda: None, progress=False)
    assert spy == [AOT] * 4
    timing = ("wall_s", "tokens_per_s")
    strip = lambda s: [[{k: v for k, v in r.items() if k not in timing} for r in p["runs"]] for p in s["points"]]  # noqa: E731
    assert strip(compiled) == strip(eager) and len(strip(eager)) == 2


def test_auto_keeps_a_learned_policy_eager(exp, spy, monkeypatch):
    """A learned policy's compiled step is untested: ``auto`` decodes it eagerly however much work."""
    from orderlab.builder import build

    monkeypatch.setattr(E, "COMPILE_S", 1e-9)
    policy = build("policy", {"name": "learned", "features": ["confidence", "position"]})
    E.measure(exp.model, exp.task, policy, *exp.task.batch(6, "test"), batch_size=2, compile="auto")
    assert spy and not any(spy)
