"""orderlab.load: YAML + overrides, every key checked before anything is built."""

from __future__ import annotations

import pytest
import torch

import orderlab
from orderlab import registry
from orderlab.config import Experiment, load, policy_label
from orderlab.objectives.base import Objective
from orderlab.registry import ConfigError

from conftest import TINY  # the tiny experiment shared by the run tests



class CountingTask:
    """A stand-in task that counts its constructions (to see nothing is built on error)."""

    built = 0

    def __init__(self, digits: int = 2):
        type(self).built += 1
        self.inner = orderlab.build("task", {"name": "addition", "digits": digits})
        self.vocab_size, self.seq_len = self.inner.vocab_size, self.inner.seq_len

    def token_freqs(self):
        return self.inner.token_freqs()


@pytest.fixture
def counting_task(monkeypatch):
    """``test_counting`` registered for one test only (other tests iterate the registry)."""
    registry.names("task")  # fill the table first
    monkeypatch.setitem(registry._REGISTRY["task"], "test_counting", CountingTask)
    CountingTask.built = 0
    return CountingTask



def test_load_builds_everything(yaml_path, tmp_path):
    state = torch.get_rng_state()
    exp = load(yaml_path, [f"run.dir={tmp_path / 'out'}", "stages.lm.train.steps=7", "evaluate.n=16"])
    assert isinstance(exp, Experiment) and orderlab.load is load
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    assert not (tmp_path / "out").exists()  # side-effect free
    assert exp.run_dir == tmp_path / "out" / "tiny"
    assert exp.model.vocab_size == exp.task.vocab_size and exp.model.mask_id == exp.task.vocab_size
    assert exp.model.config.max_len == exp.task.seq_len and exp.model.config.d_model == 32
    assert type(exp.process).__name__ == "Staggered" and exp.process is exp.objective.process
    train = exp.stages["lm"].train
    assert list(exp.stages) == ["lm"] and exp.objective is exp.stages["lm"].objective
    assert train.steps == 7 and exp.evaluate.n == 16 and train.lr == 3e-3
    assert exp.stages["lm"].files.checkpoint == tmp_path / "out" / "tiny" / "lm" / "checkpoint.pt"
    assert list(exp.policies) == ["l2r", "threshold(tau=0.9)"]
    # defaults are filled into the resolved config
    assert exp.config.stages.lm.train.clip == 1.0 and exp.config.evaluate.cache is True and exp.config.run.name is None
    assert exp.config.stages.lm.train.steps == 7 and exp.config.run.resume is False


def test_init_is_seeded(yaml_path):
    a, b = load(yaml_path), load(yaml_path)
    c = load(yaml_path, ["stages.lm.train.seed=1"])
    pa, pb, pc = (next(e.model.parameters()) for e in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def test_mapping_source_and_default_policies():
    cfg = {
        "task": "addition",
        "model": {"name": "transformer", "d_model": 16, "n_layers": 1, "n_heads": 2},
        "stages": {"lm": {"objective": {"name": "set_nll", "process": "linear"}}},
        "policy": {"name": "threshold", "tau": 0.5},
    }
    exp = load(cfg, ["run.name=abc"])
    assert list(exp.policies) == ["threshold(tau=0.5)"] and exp.policies["threshold(tau=0.5)"] is exp.policy
    assert str(exp.run_dir).endswith("runs/abc")


@pytest.mark.parametrize(
    "override, path, message",
    [
        ("stagse.lm.train.steps=3", "stagse", "did you mean 'stages'"),
        ("train.steps=3", "train", "belongs to a stage"),
        ("stages.lm.trian.steps=3", "stages.lm.trian", "did you mean 'train'"),
        ("stages.lm.train.lrr=1", "stages.lm.train.lrr", "did you mean 'lr'"),
        ("stages.lm.train.steps=abc", "stages.lm.train.steps", "must be int"),
        ("stages.lm.train.lr=fast", "stages.lm.train.lr", "must be float"),
        ("stages.lm.train.ema=2.0", "stages.lm.train.ema", r"in \(0, 1\)"),
        ("stages.lm.objective=null", "stages.lm.objective", "missing"),
        ("stages.lm=3", "stages.lm", "must be a mapping"),
        ("stages={a b: {objective: set_nll}}", "stages.a b", "folder name"),
        ("model.max_len=64", "model.max_len", r"set by the task \(task.seq_len\)"),
        ("model.vocab_size=10", "model.vocab_size", r"set by the task \(task.vocab_size\)"),
        ("model.checkpoint=/nonexistent/x.pt", "model.checkpoint", "/nonexistent/x.pt: no checkpoint there"),
        ("evaluate.nn=3", "evaluate.nn", "did you mean 'n'"),
        ("evaluate.policies=l2r", "evaluate.policies", "list"),
        ("run.dirr=x", "run.dir", "did you mean 'dir'"),
        ("policy.tau=0.9", "policy.tau", "unknown key"),
        ("policy.name=threshhold", "policy.name", "did you mean 'threshold'"),
        ("model.d_modl=8", "model.d_modl", "did you mean 'd_model'"),
        ("model.attention.name=bidir", "model.attention.name", "unknown attention"),
        ("stages.lm.objective.process.dd=2", "stages.lm.objective.process.dd", "did you mean 'd'"),
        ("stages.lm.objective.process.d=fast", "stages.lm.objective.process.d", "must be float"),
        ("stages.lm.objective.process=lineer", "stages.lm.objective.process", "did you mean 'linear'"),
        ("task.digits=2.5", "task.digits", "must be int"),
        ("task.name=additon", "task.name", "did you mean 'addition'"),
    ],
)
def test_errors_name_the_key_path(yaml_path, override, path, message):
    with pytest.raises(ConfigError, match=message) as info:
        load(yaml_path, [override])
    assert info.value.path.startswith(path)


def test_error_in_a_late_section_is_found_before_building(yaml_path, counting_task):
    text = TINY.replace("name: addition, digits: 2", "name: test_counting, digits: 2")
    text = text.replace("{name: threshold, tau: 0.9}", "{name: threshold, tua: 0.9}")
    yaml_path.write_text(text)
    with pytest.raises(ConfigError, match=r"did you mean 'tau'") as info:
        load(yaml_path)
    assert info.value.path == "evaluate.policies[1].tua"
    assert CountingTask.built == 0
    load(yaml_path, ["evaluate.policies=[l2r]"])
    assert CountingTask.built == 1


def test_missing_file_section_and_bad_override(yaml_path, tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load(tmp_path / "nope.yaml")
    yaml_path.write_text(TINY.replace("policy: {name: l2r}", ""))
    exp = load(yaml_path)  # evaluate.policies says what to evaluate: no decode policy section needed
    assert list(exp.policies) == ["l2r", "threshold(tau=0.9)"] and exp.policy is exp.policies["l2r"]
    assert "policy" not in exp.config
    with pytest.raises(ConfigError, match="missing section") as info:
        load(yaml_path, ["evaluate.policies=null"])
    assert info.value.path == "policy"
    with pytest.raises(ConfigError, match="key=value"):
        load(yaml_path, ["policy"])


def test_token_freqs_injected(yaml_path, monkeypatch):
    from orderlab.tasks.addition import Addition

    freqs = torch.full((13,), 1 / 13)
    monkeypatch.setattr(Addition, "token_freqs", lambda self: freqs)
    seen = {}

    class Spy:
        needs = ("token_freqs",)  # declared: no name sniffing

        def __init__(self, token_freqs=None, lam: float = 0.5):
            seen["freqs"] = token_freqs

    class Undeclared:  # takes token_freqs but does not declare it: nothing is injected
        def __init__(self, token_freqs=None):
            seen["undeclared"] = token_freqs

    registry.names("policy")
    monkeypatch.setitem(registry._REGISTRY["policy"], "test_spy", Spy)
    monkeypatch.setitem(registry._REGISTRY["policy"], "test_undeclared", Undeclared)
    exp = load(yaml_path, ["evaluate.policies=[l2r,{name: test_spy, lam: 0.1},test_undeclared]"])
    assert seen["freqs"] is freqs and list(exp.policies) == ["l2r", "test_spy(lam=0.1)", "test_undeclared"]
    assert seen["undeclared"] is None
    load(yaml_path, ["evaluate.policies=[{name: test_spy, token_freqs: [0.5, 0.5]}]"])  # a default: may be given
    assert seen["freqs"] == [0.5, 0.5]
    with pytest.raises(ConfigError, match="must be float") as info:
        load(yaml_path, ["evaluate.policies=[{name: test_spy, lam: x}]"])
    assert info.value.path == "evaluate.policies[0].lam"


def test_policy_labels():
    assert policy_label("l2r") == "l2r"
    assert policy_label({"name": "threshold", "tau": 0.9}) == "threshold(tau=0.9)"
    assert policy_label({"_target_": "mymod.MyPolicy", "k": 2}) == "MyPolicy(k=2)"
    assert policy_label({"name": "eb", "proxy": {"name": "entropy"}}) == "eb(proxy=entropy)"


def test_restore_loads_checkpoint_weights(yaml_path, tmp_path):
    from orderlab.train import train

    over = [f"run.dir={tmp_path}", "stages.lm.train.ema=0.5", "stages.lm.train.valid_n=0"]
    exp = load(yaml_path, over)
    stage = exp.stages["lm"]
    train(exp.model, stage.objective, exp.task, stage.train, stage.files.dir, progress=False)
    trained = {k: v.clone() for k, v in exp.model.state_dict().items()}
    fresh = load(yaml_path, over)
    assert fresh.restore(ema=False) == {"lm": 20}
    assert all(torch.equal(trained[k], v) for k, v in fresh.model.state_dict().items())
    fresh.restore()  # the EMA weights differ from the raw ones
    ema = {k: v.clone() for k, v in fresh.model.state_dict().items()}
    assert any(not torch.equal(trained[k], v) for k, v in ema.items())
    # model.checkpoint: a file, a stage folder or a run folder, EMA weights
    for where in (stage.files.checkpoint, stage.files.dir, exp.run_dir):
        loaded = load(yaml_path, [f"model.checkpoint={where}"])
        assert all(torch.equal(ema[k], v) for k, v in loaded.model.state_dict().items()), where
    assert load(yaml_path, [f"model.checkpoint={where}"]).config.model.checkpoint == str(where)


def test_bad_model_checkpoint_is_a_config_error_naming_the_file(yaml_path, tmp_path):
    from orderlab.train import train

    exp = load(yaml_path, [f"run.dir={tmp_path}", "stages.lm.train.valid_n=0"])
    stage = exp.stages["lm"]
    train(exp.model, stage.objective, exp.task, stage.train, stage.files.dir, progress=False)
    path = stage.files.checkpoint
    with pytest.raises(ConfigError, match=r"model\.checkpoint: .*checkpoint\.pt: model weights do not match the "
                                          r"config: embed\.weight has shape \(14, 32\) in the checkpoint but "
                                          r"\(14, 16\)") as info:
        load(yaml_path, [f"model.checkpoint={path}", "model.d_model=16"])
    assert "\n" not in str(info.value)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ConfigError, match=r"model\.checkpoint: .*truncated\.pt: unreadable checkpoint"):
        load(yaml_path, [f"model.checkpoint={truncated}"])


def test_mapping_override_replaces_a_component_scalar_override_merges(yaml_path):
    exp = load(yaml_path, ["task={name: text, seq_len: 32}", "stages.lm.objective.process.d=1",
                           "evaluate.policies=[r2l]"])
    assert type(exp.task).__name__ == "StdlibText" and exp.task.seq_len == 32  # no stale 'digits' key
    assert exp.objective.process.d == 1 and exp.config.stages.lm.objective.name == "set_nll"
    assert list(exp.policies) == ["r2l"]


class TaskAware(Objective):
    """An objective that needs the experiment's task (required, so the check pass must know)."""

    needs = ("task",)

    def __init__(self, task, scale: float = 1.0):
        super().__init__()
        self.task, self.scale = task, scale


def test_task_is_injected_into_objectives(yaml_path, monkeypatch):
    registry.names("objective")
    monkeypatch.setitem(registry._REGISTRY["objective"], "test_task_aware", TaskAware)
    exp = load(yaml_path, ["stages.pg={objective: {name: test_task_aware, scale: 2.0}}"])
    assert list(exp.stages) == ["lm", "pg"] and exp.stages["pg"].objective.task is exp.task
    assert exp.stages["pg"].train.steps == 1000  # every train field defaulted
    with pytest.raises(ConfigError, match="is set by the task section") as info:
        load(yaml_path, ["stages.pg={objective: {name: test_task_aware, task: addition}}"])
    assert info.value.path == "stages.pg.objective.task"
    with pytest.raises(ConfigError, match="must be float") as info:
        load(yaml_path, ["stages.pg={objective: {name: test_task_aware, scale: x}}"])
    assert info.value.path == "stages.pg.objective.scale"


def test_learned_stage_policies_are_evaluated_and_nothing_to_train_is_an_error(yaml_path, monkeypatch):
    from orderlab.objectives.base import Objective
    from orderlab.policies import LearnedBernoulli, LinearNet

    class Learns(Objective):
        trains_model = False

        def __init__(self, frozen: bool = False):
            super().__init__()
            self.policy = LearnedBernoulli(features=["position"], net=LinearNet(1))
            self.policy.requires_grad_(not frozen)

    registry.names("objective")
    monkeypatch.setitem(registry._REGISTRY["objective"], "test_learns", Learns)
    exp = load(yaml_path, ["stages.pg={objective: test_learns}"])
    # labelled by the stage and what learned it
    assert list(exp.policies) == ["l2r", "threshold(tau=0.9)", "pg (test_learns)"]
    assert exp.policies["pg (test_learns)"] is exp.stages["pg"].objective.policy
    with pytest.raises(ConfigError, match="nothing to train: Learns has trains_model=False") as info:
        load(yaml_path, ["stages.pg={objective: {name: test_learns, frozen: true}}"])
    assert info.value.path == "stages.pg.objective"
    with pytest.raises(ConfigError, match="rename the stage") as info:
        monkeypatch.setitem(registry._REGISTRY["objective"], "l2r", Learns)  # stage l2r, objective l2r: label "l2r"
        load(yaml_path, ["stages={l2r: {objective: l2r}}"])
    assert info.value.path == "stages.l2r"


def test_stages_may_be_empty(yaml_path):
    exp = load(yaml_path, ["stages={}"])
    assert exp.stages == {} and exp.objective is None and exp.process is None


def test_block_nelbo_rejects_non_absorbing_corruption(yaml_path):
    block = ["model.attention={name: block_causal, block_size: 2}"]
    ok = load(yaml_path, [*block, "stages.lm.objective={name: block_nelbo, process: linear}"])
    assert type(ok.objective).__name__ == "BlockNelbo"
    for corruption in ("uniform", "{name: hybrid, gamma: 0.1}"):
        spec = f"stages.lm.objective={{name: block_nelbo, process: {{name: linear, corruption: {corruption}}}}}"
        with pytest.raises(ConfigError, match="block_nelbo supports only absorbing corruption") as info:
            load(yaml_path, [*block, spec])
        assert info.value.path == "stages.lm.objective"


def test_malformed_yaml_and_override_are_one_line_errors(yaml_path, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: {name: addition\nmodel: [1, 2\n")
    with pytest.raises(ConfigError, match="cannot read .*bad.yaml") as info:
        load(bad)
    assert "\n" not in str(info.value) and "line" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load(yaml_path, ["evaluate.policies=[l2r"])
    assert info.value.path == "evaluate.policies" and "\n" not in str(info.value)


def test_a_typo_deep_inside_a_stage_is_named_by_its_full_path(counting_task):
    """The issue's case, as a new user meets it: nested policy, net, reference and guide
    specs are checked like any other node, before anything is built."""
    from pathlib import Path

    experiments = Path(__file__).resolve().parents[1] / "experiments"
    cases = [("learned_policy.yaml", "stages.policy.objective.policy.net.hiden=8", "hidden"),
             ("learned_policy.yaml", "stages.policy.objective.reference.net.bais=0.0", "bias"),
             ("learned_policy_vi.yaml", "stages.vi.objective.guide.layer=2", "layers")]
    for yaml, override, right in cases:
        key = override.split("=")[0]
        with pytest.raises(ConfigError, match=f"did you mean '{right}'") as info:
            load(experiments / yaml, [override, "task={name: test_counting}"])
        assert info.value.path == key, override
    assert counting_task.built == 0  # reported by the check pass
