"""python -m orderlab.run: the run folder, --eval-only, config errors exit 2."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orderlab.run import main


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    # one thread: tiny ops on a busy machine run faster without OpenMP spinning
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "orderlab.run", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_trains_evaluates_and_writes_the_run_folder(yaml_path, tmp_path):
    proc = _cli(str(yaml_path), f"run.dir={tmp_path / 'runs'}", "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "runs" / "tiny"
    names = {p.name for p in run.iterdir()}
    assert {"config.yaml", "results.json", "lm"} <= names and "run.lock" not in names  # released
    assert {p.name for p in (run / "lm").iterdir()} == {"metrics.jsonl", "checkpoint.pt", "checkpoint.prev.pt"}
    assert {"order_l2r.png", "order_threshold_tau=0.9.png"} <= names
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "completed" and results["checkpoints"] == {"lm": 20}
    lm = results["stages"]["lm"]
    assert lm["step"] == 20 and lm["valid"]["label"] == "nll" and lm["valid"]["bits_per_token"] > 0
    rows = {r["policy"]: r for r in results["evaluations"]}
    assert set(rows) == {"l2r", "threshold(tau=0.9)"}
    l2r = rows["l2r"]
    assert l2r["n"] == 16 and l2r["metric"] == "exact_match" and 0.0 <= l2r["score"] <= 1.0
    assert l2r["accuracy"] == l2r["score"]  # exact match is an accuracy
    assert l2r["nfe_min"] == l2r["nfe_max"] == 3 and l2r["tokens_per_step"] == 1.0  # digits=2: 3 answer tokens
    assert sum(l2r["nfe_hist"]["count"]) == 16
    assert results["likelihood"]["bits_per_token"] > 0
    steps = [json.loads(x)["step"] for x in (run / "lm" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 10, 15, 20]
    assert "exact_match" in proc.stdout and "threshold(tau=0.9)" in proc.stdout  # the table
    from omegaconf import OmegaConf

    saved = OmegaConf.load(run / "config.yaml")
    assert saved.stages.lm.train.steps == 20 and saved.stages.lm.train.clip == 1.0
    assert saved.run.dir == str(tmp_path / "runs")

    # --eval-only (in process): the same weights give the same scores
    before = {r["policy"]: r["score"] for r in results["evaluations"]}
    assert main([str(yaml_path), f"run.dir={tmp_path / 'runs'}", "--eval-only", "--no-progress"]) == 0
    again = json.loads((run / "results.json").read_text())
    assert again["stages"] == {} and again["checkpoints"] == {"lm": 20}
    assert {r["policy"]: r["score"] for r in again["evaluations"]} == before
    assert json.loads((run / "lm" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 20  # untouched


def test_cli_config_error_exits_2(yaml_path, tmp_path):
    proc = _cli(str(yaml_path), "policy.tua=0.9", cwd=tmp_path)
    assert proc.returncode == 2
    assert "policy.tua" in proc.stderr and "config error" in proc.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "override, needle",
    [
        ("stages.lm.train.lrr=0.1", "stages.lm.train.lrr: unknown key for TrainConfig; did you mean 'lr'?"),
        ("stages.lm.train.steps=many", "stages.lm.train.steps: must be int"),
        ("stages.lm.objective.process.name=staggerd",
         "stages.lm.objective.process.name: unknown process 'staggerd'; did you mean 'staggered'?"),
        ("evaluate.policies=[l2r,{name: treshold}]", "evaluate.policies[1].name: unknown policy 'treshold'"),
        ("model.n_heads=3", "model.n_heads: d_model=32 must split"),
    ],
)
def test_config_errors_exit_2_with_the_key_path(yaml_path, tmp_path, capsys, override, needle):
    assert main([str(yaml_path), f"run.dir={tmp_path / 'runs'}", override]) == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert not (tmp_path / "runs").exists()


def test_steps_zero_evaluates_untrained_model(yaml_path, tmp_path):
    run_dir = tmp_path / "runs"
    args = [str(yaml_path), f"run.dir={run_dir}", "run.name=zero", "stages.lm.train.steps=0",
            "evaluate.policies=[l2r]", "evaluate.heatmaps=false", "evaluate.likelihood=false", "--no-progress"]
    assert main(args) == 0
    results = json.loads((run_dir / "zero" / "results.json").read_text())
    assert results["checkpoints"] == {} and [r["policy"] for r in results["evaluations"]] == ["l2r"]
    assert not (run_dir / "zero" / "lm" / "checkpoint.pt").exists() and "likelihood" not in results


def test_interrupted_training_writes_status(yaml_path, tmp_path, monkeypatch):
    import orderlab.train as T

    real = T.validate

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(T, "validate", boom)
    args = [str(yaml_path), f"run.dir={tmp_path}", "stages.lm.train.steps=10", "stages.lm.train.ckpt_every=5",
            "evaluate.policies=[l2r]", "evaluate.heatmaps=false", "evaluate.likelihood=false", "--no-progress"]
    assert main(args) == 130  # interrupted at the validation of step 10
    assert not (tmp_path / "tiny" / "run.lock").exists()  # released on Ctrl-C too
    results = json.loads((tmp_path / "tiny" / "results.json").read_text())
    assert results["status"] == "interrupted" and results["error"] == "KeyboardInterrupt: "
    assert results["stages"]["lm"]["checkpoint_step"] == 5 and results["stages"]["lm"]["status"] == "interrupted"
    monkeypatch.setattr(T, "validate", real)
    assert main([*args, "run.resume=true"]) == 0
    results = json.loads((tmp_path / "tiny" / "results.json").read_text())
    assert results["status"] == "completed" and results["stages"]["lm"]["start_step"] == 5
    assert torch.load(tmp_path / "tiny" / "lm" / "checkpoint.pt", weights_only=True)["step"] == 10


def test_evaluate_rows_cache_exact_and_l2r_ranks(tiny_config):
    from orderlab.config import load
    from orderlab.evaluate import evaluate, l2r_ranks

    exp = load(tiny_config)
    pols = {"l2r": exp.policy, "thr": exp.policies["threshold(tau=0.9)"]}
    a = evaluate(exp.model, exp.task, pols, n=12, batch_size=5, cache=True)
    b = evaluate(exp.model, exp.task, pols, n=12, batch_size=5, cache=False)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("wall_s", "tokens_per_s", "cache")} for r in rows]  # noqa: E731
    assert strip(a) == strip(b)  # the set-causal KV cache is exact
    assert [r["cache"] for r in a + b] == [True, True, False, False]  # each row says which cache it used
    assert [r["n"] for r in a] == [12, 12] and a[0]["nfe_hist"] == {"nfe": [3], "count": [12]}
    r = torch.tensor([[0, 1, 1, -1, 1], [0, 0, 1, 1, -1]])
    assert l2r_ranks(r).tolist() == [[0, 1, 2, -1, 3], [0, 0, 1, 2, -1]]


# --------------------------------------------------------------------------- stages


@pytest.fixture
def prior_pg(monkeypatch):
    """``test_prior_pg``: a policy-gradient-like objective that trains its own policy
    (``trains_model=False``), needs the task (injected) and draws from the generator and
    the global RNG (so exact resume depends on both being restored)."""
    from torch import nn

    from orderlab import registry
    from orderlab.objectives.base import Objective, StepOutput
    from orderlab.policies.base import Policy

    class Prior(Policy, nn.Module):
        """Reveals the candidate with the largest learned per-position logit."""

        def __init__(self, length: int):
            nn.Module.__init__(self)
            self.logits = nn.Parameter(torch.zeros(length))

        def select(self, view):
            score = self.logits.detach().expand(view.candidates.shape).masked_fill(~view.candidates, -torch.inf)
            pick = torch.zeros_like(view.candidates).scatter(1, score.argmax(1, keepdim=True), True)
            return pick & view.candidates

    class PriorPG(Objective):
        trains_model = False
        needs = ("task",)
        interrupt_at: int | None = None

        def __init__(self, task, baseline: float = 0.5):
            super().__init__()
            self.task, self.baseline, self.calls = task, baseline, 0
            self.policy = Prior(task.seq_len)

        def step(self, model, tokens, ranks, generator=None):
            self.calls += self.training
            if self.training and self.calls == type(self).interrupt_at:
                raise KeyboardInterrupt
            B, L = tokens.shape
            logp = torch.log_softmax(self.policy.logits, 0)  # [L]
            pos = torch.multinomial(logp.exp().expand(B, L), 1, generator=generator)[:, 0]  # [B]
            # reward: the sampled position is the last one to generate, plus global-RNG noise
            last = (ranks > 0).long().cumsum(1).argmax(1)  # [B]
            reward = (pos == last).float() + 0.1 * torch.rand(B)
            loss = -(logp[pos] * (reward - self.baseline)).mean()
            acc = self.task.score(tokens, tokens, ranks).float().mean()  # the injected task
            return StepOutput(loss, {"reward": float(reward.mean()), "accuracy": float(acc)}, weight=B)

    registry.names("objective")
    monkeypatch.setitem(registry._REGISTRY["objective"], "test_prior_pg", PriorPG)
    PriorPG.interrupt_at = None
    return PriorPG


def _two_stage(tmp_path, name):
    return [str(tmp_path / "tiny.yaml"), f"run.dir={tmp_path / 'runs'}", f"run.name={name}",
            "stages.lm.train.steps=6", "stages.lm.train.ckpt_every=3", "stages.lm.train.log_every=1",
            "stages.pg={objective: {name: test_prior_pg}, train: {steps: 8, batch_size: 8, lr: 0.5, warmup: 0, "
            "log_every: 1, ckpt_every: 3, eval_every: 4, valid_n: 8, ema: 0.5}}",
            "evaluate.policies=[l2r]", "evaluate.heatmaps=false", "evaluate.likelihood=false", "--no-progress"]


def test_two_stages_resume_exactly_inside_stage_two(yaml_path, tmp_path, prior_pg):
    runs = tmp_path / "runs"
    assert main(_two_stage(tmp_path, "full")) == 0
    prior_pg.interrupt_at = 5  # the 5th training step of stage pg: its checkpoint is at step 3
    assert main(_two_stage(tmp_path, "cut")) == 130
    cut = json.loads((runs / "cut" / "results.json").read_text())
    assert cut["status"] == "interrupted" and cut["stages"]["lm"]["status"] == "completed"
    assert cut["stages"]["pg"]["step"] == 4 and cut["stages"]["pg"]["checkpoint_step"] == 3
    prior_pg.interrupt_at = None
    assert main([*_two_stage(tmp_path, "cut"), "run.resume=true"]) == 0
    res = json.loads((runs / "cut" / "results.json").read_text())
    assert res["stages"]["lm"] == {"status": "completed", "skipped": True, "step": 6}
    assert res["stages"]["pg"]["start_step"] == 3 and res["checkpoints"] == {"lm": 6, "pg": 8}

    def records(run, stage):
        lines = (runs / run / stage / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if k != "tokens_per_s"} for x in lines]

    for stage in ("lm", "pg"):  # bit-identical losses and metrics, validation included
        assert records("cut", stage) == records("full", stage), stage
    pg = records("full", "pg")
    assert [r["step"] for r in pg] == list(range(1, 9)) and {"reward", "accuracy", "loss"} <= set(pg[0])
    assert pg[3]["valid_accuracy"] == 1.0 and "valid_reward" in pg[3] and pg[3]["valid_label"] is None
    full = json.loads((runs / "full" / "results.json").read_text())
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("wall_s", "tokens_per_s")} for r in rows]  # noqa: E731
    assert strip(res["evaluations"]) == strip(full["evaluations"])
    assert [r["policy"] for r in full["evaluations"]] == ["l2r", "pg (test_prior_pg)"]  # the learned policy, by stage and objective
    # stage pg froze the model: its checkpoint holds stage lm's final (EMA) weights, bit for bit
    from orderlab.checkpoint import final_weights, load as load_ckpt

    lm_final, _ = final_weights(load_ckpt(runs / "full" / "lm" / "checkpoint.pt"))
    pg_state = load_ckpt(runs / "full" / "pg" / "checkpoint.pt")
    assert all(torch.equal(lm_final[k], v) for k, v in pg_state["model"].items())
    assert set(pg_state["ema"]["shadow"]) == {"objective.policy.logits"}
    cut_pg = load_ckpt(runs / "cut" / "pg" / "checkpoint.pt")
    assert torch.equal(cut_pg["objective"]["policy.logits"], pg_state["objective"]["policy.logits"])


# --------------------------------------------------------------------------- errors: one line, status 2


def _one_line_error(capsys, needle):
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert needle in err, err


def test_eval_only_without_checkpoint_exits_2(yaml_path, tmp_path):
    proc = _cli(str(yaml_path), f"run.dir={tmp_path / 'runs'}", "--eval-only", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert "\n" not in err and "Traceback" not in err
    assert f"{tmp_path / 'runs' / 'tiny' / 'lm' / 'checkpoint.pt'}: --eval-only: stage 'lm' has no checkpoint" in err


def test_malformed_yaml_exits_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: {name: addition\nmodel: [1, 2\n")
    proc = _cli(str(bad), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "bad.yaml" in proc.stderr


def test_malformed_override_exits_2(yaml_path, tmp_path, capsys):
    assert main([str(yaml_path), f"run.dir={tmp_path}", "evaluate.policies=[l2r"]) == 2
    _one_line_error(capsys, "evaluate.policies: bad override")


def test_bad_checkpoints_exit_2_naming_the_file(yaml_path, tmp_path, capsys):
    args = [str(yaml_path), f"run.dir={tmp_path}", "stages.lm.train.steps=2", "stages.lm.train.valid_n=0",
            "evaluate.policies=[l2r]", "evaluate.n=4", "evaluate.heatmaps=false", "evaluate.likelihood=false",
            "--no-progress"]
    assert main(args) == 0
    path = tmp_path / "tiny" / "lm" / "checkpoint.pt"
    good = path.read_bytes()
    capsys.readouterr()
    # a checkpoint of another architecture: --eval-only, run.resume and model.checkpoint
    assert main([*args, "model.d_model=16", "--eval-only"]) == 2
    _one_line_error(capsys, f"{path}: model weights do not match the config: embed.weight has shape (14, 32) "
                            "in the checkpoint but (14, 16)")
    assert main([*args, "model.d_model=16", "run.resume=true"]) == 2
    _one_line_error(capsys, f"{path}: model weights do not match the config")
    assert main([*args, "model.d_model=16", f"model.checkpoint={path}", "run.name=other"]) == 2
    _one_line_error(capsys, f"model.checkpoint: {path}: model weights do not match the config")
    # a truncated checkpoint
    path.write_bytes(good[: len(good) // 2])
    assert main([*args, "--eval-only"]) == 2
    _one_line_error(capsys, f"{path}: unreadable checkpoint (truncated or not a checkpoint)")
    results = json.loads((tmp_path / "tiny" / "results.json").read_text())
    assert results["status"] == "failed" and "unreadable checkpoint" in results["error"]
    assert not (tmp_path / "tiny" / "run.lock").exists()  # released on a failure too


# --------------------------------------------------------------------------- the run folder: lock, earlier runs, run.dir


def _quick(yaml_path, run_dir, *more):
    """A run that trains nothing and evaluates 4 rows: the run folder's mechanics only."""
    return [str(yaml_path), f"run.dir={run_dir}", "stages.lm.train.steps=0", "evaluate.policies=[l2r]", "evaluate.n=4",
            "evaluate.heatmaps=false", "evaluate.likelihood=false", "--no-progress", *more]


def _holder(pid: int) -> str:
    import socket

    return json.dumps({"pid": pid, "host": socket.gethostname(), "since": "2026-01-02 03:04:05 +0000"})


def test_a_second_run_into_a_locked_folder_is_refused(yaml_path, tmp_path, capsys, monkeypatch):
    import socket

    import orderlab.run as R

    run, host = tmp_path / "tiny", socket.gethostname()
    seen = {}
    real = R.evaluate

    def second_run_meanwhile(*args, **kwargs):  # while the first run holds the folder
        seen["lock"] = json.loads((run / "run.lock").read_text())
        seen["rc"] = main(_quick(yaml_path, tmp_path, "run.overwrite=true"))
        seen["eval_only"] = main(_quick(yaml_path, tmp_path, "--eval-only"))
        seen["err"] = capsys.readouterr().err
        return real(*args, **kwargs)

    monkeypatch.setattr(R, "evaluate", second_run_meanwhile)
    assert main(_quick(yaml_path, tmp_path)) == 0
    assert seen["lock"]["pid"] == os.getpid() and seen["lock"]["host"] == host and seen["lock"]["since"]
    assert seen["rc"] == 2 and seen["eval_only"] == 2  # --eval-only writes results too: refused as well
    lines = seen["err"].strip().splitlines()
    assert len(lines) == 2 and "Traceback" not in seen["err"]
    assert f"{run} is in use by pid {os.getpid()}@{host} since {seen['lock']['since']}" in lines[0]
    assert not (run / "run.lock").exists()  # released at the end
    assert json.loads((run / "results.json").read_text())["status"] == "completed"  # the first run's, whole


def test_a_lock_of_a_live_process_refuses_and_a_dead_ones_is_taken_over(yaml_path, tmp_path, capsys):
    run = tmp_path / "tiny"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (run / "run.lock").write_text(_holder(holder.pid))
        assert main(_quick(yaml_path, tmp_path)) == 2
        err = capsys.readouterr().err
        assert f"is in use by pid {holder.pid}@" in err and "since 2026-01-02 03:04:05" in err
        assert json.loads((run / "run.lock").read_text())["pid"] == holder.pid  # untouched
        assert not (run / "results.json").exists() and not (run / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()
    assert main(_quick(yaml_path, tmp_path)) == 0  # the holder is gone: a stale lock
    assert f"taking over the stale lock of pid {holder.pid}@" in capsys.readouterr().err
    assert not (run / "run.lock").exists()


def test_a_lock_whose_pid_now_names_another_process_is_stale(tmp_path):
    import socket

    from orderlab.runfolder import RunLock

    if not Path(f"/proc/{os.getpid()}/stat").exists():
        pytest.skip("no /proc: a reused pid cannot be told from the holder")
    lock, said = tmp_path / "run.lock", []
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": "then", "start": "1"}))
    with RunLock(lock, said.append):  # our pid, but a process started at another time: a reused pid
        mine = json.loads(lock.read_text())
        assert mine["pid"] == os.getpid() and mine["start"] not in (None, "1")
    assert len(said) == 1 and "taking over the stale lock" in said[0] and not lock.exists()


def test_an_earlier_run_is_not_overwritten_without_resume_or_overwrite(yaml_path, tmp_path, capsys):
    run = tmp_path / "tiny"
    assert main(_quick(yaml_path, tmp_path)) == 0
    first = (run / "results.json").read_text()
    (run / "old").mkdir()
    (run / "old" / "checkpoint.pt").write_bytes(b"a stage of an earlier config")
    (run / "old" / "metrics.jsonl").write_text('{"step": 1}\n')
    capsys.readouterr()
    assert main(_quick(yaml_path, tmp_path, "evaluate.n=5")) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{run} holds an earlier run (results.json, old/checkpoint.pt): run.resume=true" in err
    assert (run / "results.json").read_text() == first and not (run / "run.lock").exists()
    assert main(_quick(yaml_path, tmp_path, "--eval-only")) == 0  # evaluates the run there
    assert main(_quick(yaml_path, tmp_path, "run.resume=true")) == 0  # continues it
    assert (run / "old" / "checkpoint.pt").exists()
    assert main(_quick(yaml_path, tmp_path, "run.overwrite=true", "evaluate.n=5")) == 0  # replaces it
    assert "run.overwrite=true: removed the earlier run" in capsys.readouterr().err
    assert not (run / "old" / "checkpoint.pt").exists() and not (run / "old" / "metrics.jsonl").exists()
    assert json.loads((run / "results.json").read_text())["evaluations"][0]["n"] == 5
    assert main(_quick(yaml_path, tmp_path, "run.overwrite=true", "run.resume=true")) == 2
    assert "run.overwrite: contradicts run.resume=true" in capsys.readouterr().err


def _unwritable(tmp_path) -> Path:
    """An existing folder this process cannot write in. Root writes through any mode bits,
    so then a folder of a filesystem that refuses root too (sysfs); a skip where none is."""
    if os.geteuid() != 0:
        folder = tmp_path / "read_only"
        folder.mkdir(mode=0o555)
        return folder
    folder = Path("/sys")
    try:
        (folder / "orderlab_probe").mkdir()
    except OSError:
        return folder
    (folder / "orderlab_probe").rmdir()
    pytest.skip("running as root with a writable /sys: no folder here refuses writes")


@pytest.mark.parametrize("where", ["a file", "under a file", "an unwritable folder", "in an unwritable folder"])
def test_unusable_run_dir_is_a_one_line_config_error(yaml_path, tmp_path, capsys, where):
    blocker = tmp_path / "runs"
    blocker.write_text("not a folder")
    if where == "a file":
        over, needle = [f"run.dir={blocker}"], f"run.dir: {blocker} is a file, not a folder"
    elif where == "under a file":
        over, needle = [f"run.dir={blocker / 'sub'}"], f"run.dir: {blocker} is a file, not a folder"
    elif where == "an unwritable folder":  # the run folder exists: its lock cannot be written
        folder = _unwritable(tmp_path)
        over, needle = [f"run.dir={folder.parent}", f"run.name={folder.name}"], f"run.dir: the run folder {folder} is"
    else:  # the run folder cannot be created
        folder = _unwritable(tmp_path)
        over, needle = [f"run.dir={folder}"], f"run.dir: cannot create the run folder {folder / 'tiny'}"
    assert main(_quick(yaml_path, tmp_path, *over)) == 2  # the last run.dir= wins
    _one_line_error(capsys, needle)


def test_a_diverging_run_stops_at_the_first_bad_step_and_exits_2(yaml_path, tmp_path, capsys):
    """lr 1e30 without clipping (1e6 is not enough for this tiny pre-norm model): the first non-finite step stops the run with one line
    naming stage, step and quantity; the stage's last checkpoint (one per step here) is
    the step before, with finite weights; results.json says failed; nothing is evaluated."""
    args = [str(yaml_path), f"run.dir={tmp_path}", "stages.lm.train.lr=1e30", "stages.lm.train.clip=null",
            "stages.lm.train.warmup=0", "stages.lm.train.ckpt_every=1", "stages.lm.train.log_every=1",
            "stages.lm.train.ema=null", "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    found = re.fullmatch(r"training diverged stage 'lm', step (\d+): (loss|gradient norm|metric '\w+') is (nan|-?inf), "
                         r"not finite; training stopped, its last checkpoint \(step (\d+)\) is kept", err)
    assert found, err
    bad, kept = int(found[1]), int(found[4])
    assert 1 < bad < 20 and kept == bad - 1
    results = json.loads((tmp_path / "tiny" / "results.json").read_text())
    assert results["status"] == "failed" and results["error"].startswith(f"NonFiniteError: stage 'lm', step {bad}:")
    lm = results["stages"]["lm"]
    assert (lm["status"], lm["step"], lm["checkpoint_step"]) == ("failed", kept, kept)
    assert "evaluations" not in results and results["checkpoints"] == {}
    state = torch.load(tmp_path / "tiny" / "lm" / "checkpoint.pt", weights_only=True)
    assert state["step"] == kept and all(torch.isfinite(v).all() for v in state["model"].values())
    steps = [json.loads(x)["step"] for x in (tmp_path / "tiny" / "lm" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, bad))
