"""Data-parallel training with 2 gloo processes on CPU (torchrun / torch.multiprocessing):
the loss curve, validation, evaluation, likelihood and the ablation grid equal the
1-process run with the same global batch; resume under 2 processes is exact; objective parameters stay in sync."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from orderlab import distributed
from orderlab.objectives.base import Objective, StepOutput
from orderlab.registry import ConfigError
from orderlab.builder import build
from orderlab.tasks.addition import Addition

HERE = Path(__file__).resolve().parent


class RaggedAddition(Addition):
    """Addition whose rows keep 1..digits+1 answer digits (the rest padding): the ranks'
    slices of a batch hold different numbers of predicted tokens, so an unweighted mean of
    the ranks' per-token losses would not be the global batch's."""

    def batch(self, n, split="train", seed=0):
        tokens, ranks = super().batch(n, split, seed)
        keep = 1 + tokens[:, : self.digits].sum(1) % (self.digits + 1)  # [n] answer digits kept
        pad = torch.arange(tokens.shape[1]) >= self.prompt_len + keep[:, None]  # [n, L]
        return tokens.masked_fill(pad, self.pad_id), ranks.masked_fill(pad, -1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- torchrun: the CLI

TINY = textwrap.dedent(
    """
    task: {_target_: test_distributed.RaggedAddition, digits: 2}
    model: {name: transformer, d_model: 32, n_layers: 1, n_heads: 2, attention: {name: set_causal, prompt: causal}}
    stages:
      lm:
        objective: {name: set_nll, process: {name: quench}}
        train: {steps: 8, batch_size: 8, lr: 1.0e-2, warmup: 2, log_every: 2, eval_every: 4, ckpt_every: 4, valid_n: 10, ema: 0.9}
    policy: {name: l2r}
    evaluate: {policies: [l2r, {name: threshold, tau: 0.5}], n: 10, batch_size: 3}
    run: {dir: runs}
    """
)


def _env() -> dict[str, str]:
    path = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


def test_torchrun_two_processes_match_one(tmp_path, monkeypatch):
    """``torchrun --nproc_per_node=2 -m orderlab.run``: the same metrics records (AR's
    order is deterministic, so the two ranks' slices are exactly the global batch's
    terms), results rows and weights as one process, files written once by rank 0."""
    (tmp_path / "tiny.yaml").write_text(TINY)
    args = [str(tmp_path / "tiny.yaml"), f"run.dir={tmp_path}", "--no-progress"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
                "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "orderlab.run"]
    proc = subprocess.run([*launcher, *args, "run.name=two"], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    monkeypatch.syspath_prepend(str(HERE))
    from orderlab.run import main

    assert main([*args, "run.name=one"]) == 0  # the same run in this process (no process group)
    one, two = tmp_path / "one", tmp_path / "two"
    assert sorted(p.name for p in two.rglob("*")) == sorted(p.name for p in one.rglob("*"))  # no stray files

    def records(run):
        return [json.loads(x) for x in (run / "lm" / "metrics.jsonl").read_text().splitlines()]

    r1, r2 = records(one), records(two)
    assert [r["step"] for r in r2] == [r["step"] for r in r1] == [2, 4, 6, 8]
    for a, b in zip(r1, r2):
        assert set(a) == set(b)
        for k in a:
            if k not in ("tokens_per_s", "valid_label"):
                assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (a["step"], k)
    assert r2[-1]["valid_label"] == "nll"

    res1, res2 = (json.loads((run / "results.json").read_text()) for run in (one, two))
    assert res2["distributed"] == {"world_size": 2, "backend": "gloo"}  # how the run was launched
    assert res1["distributed"] == {"world_size": 1, "backend": None}
    timing = ("wall_s", "tokens_per_s")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    assert strip(res2["evaluations"]) == strip(res1["evaluations"])  # decoded per batch as by one process
    assert [r["n"] for r in res2["evaluations"]] == [10, 10]
    assert res2["likelihood"]["tokens"] == res1["likelihood"]["tokens"]
    assert res2["likelihood"]["bits_per_token"] == pytest.approx(res1["likelihood"]["bits_per_token"], rel=1e-5)
    assert res2["stages"]["lm"]["final_loss"] == pytest.approx(res1["stages"]["lm"]["final_loss"], rel=1e-5)
    w1, w2 = (torch.load(run / "lm" / "checkpoint.pt", weights_only=True) for run in (one, two))
    for k, v in w1["model"].items():
        torch.testing.assert_close(w2["model"][k], v, rtol=1e-4, atol=1e-5)
    assert len(w2["rng_ranks"]) == 2 and "rng_ranks" not in w1  # a 1-process checkpoint is as before


# --------------------------------------------------------------------------- torch.multiprocessing: the API


class RowPG(Objective):
    """A policy-gradient objective with parameters of its own and a frozen model
    (``trains_model=False``): a softmax over positions, a sampled position per row
    (``generator``), reward 1 at the last generated position."""

    trains_model = False

    def __init__(self, length: int):
        super().__init__(process=None)
        self.logits = nn.Parameter(torch.zeros(length))

    def step(self, model, tokens, ranks, generator=None):
        logp = torch.log_softmax(self.logits, 0)  # [L]
        pos = torch.multinomial(logp.exp().expand(tokens.shape[0], -1), 1, generator=generator)[:, 0]  # [B]
        reward = (pos == (ranks > 0).long().cumsum(1).argmax(1)).float()
        loss = -(logp[pos] * (reward - reward.mean())).mean()
        return StepOutput(loss, {"reward": float(reward.mean())}, weight=1.0)


class NoisyNLL(Objective):
    """``set_nll`` under a random order (``generator``), its loss scaled by ``1 + u/10``
    with ``u`` from the global torch RNG (the stand-in for dropout): exact resume needs
    every rank's own RNG state back."""

    def __init__(self):
        super().__init__(process=None)
        self.nll = build("objective", {"name": "set_nll", "process": {"name": "linear"}})

    def step(self, model, tokens, ranks, generator=None):
        out = self.nll.step(model, tokens, ranks, generator=generator)
        out.loss = out.loss * (1 + torch.rand(()) / 10)
        return out


class NaNOnRank1(NoisyNLL):
    """A metric that turns NaN at the second training step on rank 1 only: both ranks
    must stop there (a rank stopping alone would leave the other in a collective)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def step(self, model, tokens, ranks, generator=None):
        out = super().step(model, tokens, ranks, generator)
        self.calls += self.training
        if self.calls == 2 and distributed.rank() == 1:
            out.metrics["bits_per_token"] = float("nan")
        return out


def _model(task):
    torch.manual_seed(0)
    return build("model", {"name": "transformer", "d_model": 32, "n_layers": 1, "n_heads": 2}, vocab_size=task.vocab_size,
                 max_len=task.seq_len)


def _scenarios(out: Path) -> dict:
    """What the ranks check: an interrupted and resumed stochastic run against an
    uninterrupted one, a policy-gradient stage, a batch that does not split."""
    from orderlab.train import NonFiniteError, TrainConfig, TrainResult, train

    task = RaggedAddition(digits=2)
    got: dict = {"rank": distributed.rank(), "world": distributed.world()}
    cfg = TrainConfig(steps=6, batch_size=8, lr=1e-2, warmup=2, log_every=2, eval_every=3, ckpt_every=3, valid_n=10)
    objective = NoisyNLL
    full_model = _model(task)
    got["full"] = train(full_model, objective(), task, cfg, out / "full", progress=False).losses

    def stop(step, record):
        if step == 5:  # on every rank: past the checkpoint at 3, inside the window 5-6
            raise KeyboardInterrupt

    cut = TrainResult()
    try:
        train(_model(task), objective(), task, cfg, out / "cut", progress=False, on_step=stop, result=cut)
    except KeyboardInterrupt:
        pass
    got["cut"] = (cut.status, cut.checkpoint_step)
    resumed_model = _model(task)
    resumed_model.embed.weight.data.zero_()  # everything must come from the checkpoint
    got["resumed"] = train(resumed_model, objective(), task, cfg, out / "cut", resume=True, progress=False).losses
    got["same_weights"] = all(torch.equal(a, b) for a, b in zip(full_model.state_dict().values(),
                                                                 resumed_model.state_dict().values()))

    from orderlab.evaluate import evaluate, test_likelihood
    from orderlab.train import validate

    policies = {"l2r": build("policy", "l2r"), "threshold": build("policy", {"name": "threshold", "tau": 0.5})}
    untimed = lambda rows: [{k: v for k, v in r.items() if k not in ("wall_s", "tokens_per_s")} for r in rows]  # noqa: E731
    nll = build("objective", {"name": "set_nll", "process": {"name": "linear"}})  # random orders, seeded per batch
    for bs in (2, 5):  # 3 batches of 2, 2, 1 rows (rank 0 decodes two); 1 batch (rank 1 has none)
        both = [(untimed(evaluate(full_model, task, policies, 5, bs)), test_likelihood(full_model, task, 5, bs),
                 validate(full_model, nll, task, 5, bs))]
        with distributed.solo():  # the same calls as one process
            both.append((untimed(evaluate(full_model, task, policies, 5, bs)), test_likelihood(full_model, task, 5, bs),
                         validate(full_model, nll, task, 5, bs)))
        got[f"eval{bs}"] = both

    pg, model = RowPG(task.seq_len), _model(task)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pg_cfg = TrainConfig(steps=4, batch_size=8, lr=0.5, warmup=0, log_every=1, eval_every=0, valid_n=0, ckpt_every=0)
    got["pg_losses"] = train(model, pg, task, pg_cfg, progress=False).losses
    got["pg_logits"] = pg.logits.detach().clone()
    got["model_frozen"] = all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    odd = dataclasses.replace(pg_cfg, batch_size=7)  # loading a config asks no process group
    try:
        train(_model(task), objective(), task, odd, progress=False, name="lm")
        got["odd_batch"] = None
    except ConfigError as e:  # training does
        got["odd_batch"] = str(e)
    nan, got["nan"] = TrainResult(), None
    try:
        train(_model(task), NaNOnRank1(), task, pg_cfg, out / "nan", progress=False, name="lm", result=nan)
    except NonFiniteError as e:
        got["nan"] = (str(e), nan.status, nan.step)
    with distributed.solo():  # one process inside the group: no split, no collectives
        got["solo"] = (distributed.world(), distributed.rank(), TrainConfig(batch_size=7).batch_size,
                       distributed.describe())
    got["shard"] = distributed.shard(range(5))

    from orderlab.checkpoint import RunFiles
    from orderlab.runfolder import RunFolderError, claim

    files = RunFiles(out / "claimed")  # rank 0 locks; a second claim is refused on every rank
    with claim(files):
        held = files.lock.exists()
        try:
            with claim(files):
                got["claim"] = "not refused"
        except RunFolderError as e:
            got["claim"] = str(e)
    distributed.barrier()
    got["claim_lock"] = (held, files.lock.exists())
    got["ablation"] = _ablation(out)
    return got


def _ablation(out: Path) -> tuple:
    """A grid of 3 (point, seed) runs, sharded over the ranks and again in one process:
    ``(sharded section, one-process section, points measured here, files written here)``,
    timings stripped (of a summary only the means: the std over one seed is NaN)."""
    import orderlab
    from orderlab import ablate

    model = {"name": "transformer", "d_model": 16, "n_layers": 1, "n_heads": 2, "attention": {"name": "bidirectional"}}
    cfg = {"task": {"name": "sudoku", "size": 4}, "stages": {}, "policy": "l2r", "model": model,
           "evaluate": {"policies": [], "n": 4, "batch_size": 4, "likelihood": False},
           "ablate": {"grid": ["l2r", {"name": "random", "steps": [3, None]}], "seeds": [1], "n": 5, "batch_size": 2,
                      "temperature": 1.0, "heatmap_rows": 3},
           "run": {"dir": str(out / "abl"), "name": "abl"}}
    exp = orderlab.load(cfg)
    measured, real = [], ablate.evaluate_point
    index = {id(exp.ablation.policy(p, 1)): p.index for p in exp.ablation.points}

    def counted(model, task, policy, *args):
        measured.append(index[id(policy)])
        return real(model, task, policy, *args)

    timing = ("wall_s", "tokens_per_s")
    strip = lambda section: [({k: v["mean"] for k, v in p["summary"].items() if k not in timing},  # noqa: E731
                              [{k: v for k, v in r.items() if k not in timing} for r in p["runs"]])
                             for p in section["points"]]
    ablate.evaluate_point = counted
    try:
        sharded = ablate.run_grid(exp, {}, save=lambda: None, progress=False)
    finally:
        ablate.evaluate_point = real
    with distributed.solo():
        alone = ablate.run_grid(exp, {}, save=lambda: None, progress=False)
    written = ablate.write_outputs(out / f"abl{distributed.rank()}", sharded)
    return strip(sharded), strip(alone), measured, len(written)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    with distributed.session():
        got = _scenarios(Path(out))
    with open(Path(out) / f"rank{rank}.pkl", "wb") as f:
        pickle.dump(got, f)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    return [pickle.loads((out / f"rank{r}.pkl").read_bytes()) for r in range(2)], out


def test_resume_under_two_processes_is_exact(ranks):
    (r0, r1), out = ranks
    assert (r0["rank"], r1["rank"], r0["world"]) == (0, 1, 2)
    assert r0["full"] == r1["full"]  # every rank logs the global loss
    assert r0["cut"] == ("interrupted", 3)
    assert r0["resumed"] == r0["full"][3:] and r1["resumed"] == r1["full"][3:]  # bit-identical (per-rank RNG restored)
    assert r0["same_weights"] and r1["same_weights"]
    lines = lambda d: [{k: v for k, v in json.loads(x).items() if k != "tokens_per_s"}  # noqa: E731
                       for x in (out / d / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines("full")] == [2, 3, 4, 6]
    assert lines("cut") == lines("full")  # the window cut by the checkpoint holds both ranks' updates
    assert sorted(p.name for p in (out / "cut").iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt", "metrics.jsonl"]


@pytest.mark.parametrize("batch_size", [2, 5])
def test_sharded_evaluation_equals_one_process(ranks, batch_size):
    """evaluate, test_likelihood and validate, sharded by batch and gathered in batch
    order, give the single-process numbers bit for bit (timings aside), also when a rank
    has no batch."""
    for r in ranks[0]:
        (rows, likelihood, valid), (rows1, likelihood1, valid1) = r[f"eval{batch_size}"]
        assert rows == rows1 and [row["n"] for row in rows] == [5, 5]
        assert likelihood == likelihood1 and valid == valid1


def test_objective_parameters_synchronised_model_frozen(ranks):
    (r0, r1), _ = ranks
    assert r0["pg_losses"] == r1["pg_losses"]
    assert torch.equal(r0["pg_logits"], r1["pg_logits"])  # each rank sampled its own rollouts: DDP averaged
    assert not torch.equal(r0["pg_logits"], torch.zeros_like(r0["pg_logits"]))
    assert r0["model_frozen"] and r1["model_frozen"]


def test_batch_split_errors_and_helpers(ranks):
    (r0, r1), _ = ranks
    assert r0["odd_batch"].startswith("stages.lm.train.batch_size: ") and "(2, torchrun's world size)" in r0["odd_batch"]
    assert r0["solo"] == r1["solo"] == (1, 0, 7, {"world_size": 2, "backend": "gloo"})  # solo: still launched by 2
    assert r0["shard"] == [0, 2, 4] and r1["shard"] == [1, 3]


def test_only_rank_0_locks_the_run_folder_and_every_rank_is_refused(ranks):
    (r0, r1), out = ranks
    assert r0["claim_lock"] == r1["claim_lock"] == (True, False)  # held in the block, released after it
    assert f"{out / 'claimed'} is in use by pid " in r0["claim"] and r1["claim"] == f"rank 0: {r0['claim']}"


def test_a_nan_metric_on_one_rank_stops_every_rank(ranks):
    (r0, r1), _ = ranks
    assert r0["nan"] == r1["nan"]  # the same decision and message on both ranks, no hang
    message, status, step = r0["nan"]
    assert message.startswith("stage 'lm', step 2: metric 'bits_per_token' is nan, not finite")
    assert (status, step) == ("failed", 1)


def test_sharded_ablation_grid_equals_one_process(ranks):
    """The ablation's (point, seed) runs are dealt round-robin to the ranks (rank 0: points
    0 and 2, rank 1: point 1), gathered on every rank in grid order: the one-process
    section (timings aside); only rank 0 writes the grid's files."""
    (r0, r1), _ = ranks
    (s0, alone0, m0, w0), (s1, alone1, m1, w1) = r0["ablation"], r1["ablation"]
    assert s0 == s1 == alone0 == alone1 and len(s0) == 3
    assert m0 == [0, 2] and m1 == [1]
    assert w0 > 0 and w1 == 0


def test_single_process_helpers_are_identities():
    assert not distributed.active() and distributed.world() == 1 and distributed.is_main()
    assert distributed.shard("abc") == ["a", "b", "c"] and distributed.all_gather_object(5) == [5]
    assert distributed.describe() == {"world_size": 1, "backend": None}
    x = torch.arange(3)
    assert distributed.all_sum(x) is x
    with distributed.session():  # no torchrun environment: nothing to initialise
        assert not torch.distributed.is_initialized()
