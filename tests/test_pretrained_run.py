"""The pretrained experiments (experiments/llada_gsm8k.yaml, dream_gsm8k.yaml, adapt_qwen3_set.yaml)
run as written, on tiny random folders with a real tokenizer and a small invented JSONL: a learned
policy trained by RL against a LLaDA-layout model, Dream's evaluation, an AR checkpoint adapted to
set diffusion and exported back to its folder format."""

import json

import pytest
import torch

from orderlab.pretrained import from_pretrained
from orderlab.run import main
from orderlab.weights import WeightFolder
from pretrained_fixtures import write_checkpoint
from tokenizer_fixtures import write_tokenizer

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MASK, EOS, PAD = 8, 2, 0  # tokenizer_fixtures.SPECIALS: <|mask|>, <|eos|>, <|pad|>
QUESTIONS = [(f"A box has {a} pens and {b} more. How many pens?", f"{a} + {b} = {a + b}.\n#### {a + b}")
             for a, b in [(3, 4), (12, 7), (5, 9), (21, 2), (8, 8), (6, 13), (40, 2), (1, 1), (17, 3), (9, 30)]]


def _folder(root, family, **config):
    folder = write_checkpoint(root / family, family, vocab_size=320, d_model=32, n_layers=1, **config)
    return write_tokenizer(folder, chat_template=CHATML)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("gsm")
    for split, rows in (("train", QUESTIONS[:6]), ("test", QUESTIONS[6:])):
        (root / f"{split}.jsonl").write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in rows))
    return root


def _run(yaml, model, data, tmp_path, *extra):
    args = [f"experiments/{yaml}", f"model.path={model}", f"task.path={data}", f"run.dir={tmp_path / 'runs'}",
            "model.dtype=float32", "task.gen_length=8", "evaluate.n=4", "evaluate.batch_size=2", "run.device=cpu",
            "--no-progress", *extra]
    assert main(args) == 0
    return json.loads((tmp_path / "runs" / yaml.removesuffix(".yaml") / "results.json").read_text())


def test_llada_gsm8k_trains_a_policy_and_evaluates_the_zoo(data, tmp_path):
    model = _folder(tmp_path, "llada", mask_token_id=MASK, eos_token_id=EOS, pad_token_id=EOS)
    res = _run("llada_gsm8k.yaml", model, data, tmp_path, "stages.policy.train.steps=2", "stages.policy.train.batch_size=2",
               "stages.policy.objective.group=2", "evaluate.policies=[{name: semi_ar, block_size: 4, steps: 2, from_prompt_end: true}, margin]")
    assert res["status"] == "completed"
    rows = {r["policy"]: r for r in res["evaluations"]}
    assert set(rows) == {"semi_ar(block_size=4, steps=2, from_prompt_end=True)", "margin", "policy (grpo)"}
    assert all(r["metric"] == "exact_match" and 0 <= r["score"] <= 1 for r in rows.values())
    assert rows["semi_ar(block_size=4, steps=2, from_prompt_end=True)"]["nfe_mean"] == 4  # 2 blocks x 2 steps
    assert res["stages"]["policy"]["step"] == 2 and res["stages"]["policy"]["last"]["nfe"] > 0


def test_dream_gsm8k_evaluates(data, tmp_path):
    model = _folder(tmp_path, "dream", mask_token_id=MASK, eos_token_id=EOS, pad_token_id=EOS, bos_token_id=1)
    res = _run("dream_gsm8k.yaml", model, data, tmp_path, "evaluate.policies=[top_prob, {name: eb, gamma: 0.01}]")
    assert res["status"] == "completed" and len(res["evaluations"]) == 2
    assert res["evaluations"][0]["nfe_mean"] == 8  # one token per step over gen_length 8


def test_adapt_qwen3_set_fine_tunes_and_exports_to_qwen3_format(data, tmp_path):
    from orderlab.export import main as export
    model = _folder(tmp_path, "qwen3", eos_token_id=EOS)
    res = _run("adapt_qwen3_set.yaml", model, data, tmp_path, "stages.adapt.train.steps=3", "stages.adapt.train.batch_size=2",
               "stages.adapt.train.valid_n=0", "stages.adapt.train.eval_every=0", "stages.adapt.train.lr=1e-3")
    assert res["status"] == "completed" and res["stages"]["adapt"]["step"] == 3
    out = tmp_path / "hf"
    overrides = [f"model.path={model}", f"task.path={data}", f"run.dir={tmp_path / 'runs'}", "model.dtype=float32",
                 "task.gen_length=8", "run.device=cpu"]
    assert export(["experiments/adapt_qwen3_set.yaml", str(out), *overrides]) == 0
    before, after = WeightFolder(model), WeightFolder(out)
    assert set(before.names) <= set(after.names)
    assert (out / "tokenizer.json").read_bytes() == (model / "tokenizer.json").read_bytes()
    changed = [n for n in before.names if not torch.equal(before.read(n), after.read(n))]
    assert changed  # fine-tuned
    adapted = from_pretrained(out)
    state = torch.load(tmp_path / "runs" / "adapt_qwen3_set" / "adapt" / "checkpoint.pt", weights_only=False)
    final = state.get("ema") or state["model"]
    for k, v in adapted.state_dict().items():
        assert torch.equal(v, final[k]), k


def test_a_missing_path_is_a_config_error(data, tmp_path, capsys):
    assert main(["experiments/llada_gsm8k.yaml", f"task.path={data}", "--no-progress"]) == 2
    assert "model.path" in capsys.readouterr().err


def _on_pretrained(yaml, model, data, tmp_path, shrink):
    """``yaml`` with its task and model replaced by the jsonl task and a pretrained folder, and
    ``shrink`` (dotted key -> value) applied: the toy experiment, unchanged, on a pretrained model."""
    from omegaconf import OmegaConf
    cfg = OmegaConf.load(f"experiments/{yaml}")
    cfg.task = {"name": "jsonl", "path": str(data), "tokenizer": str(model), "gen_length": 6}
    cfg.model = {"name": "pretrained", "path": str(model), "dtype": "float32"}
    cfg.run = {"dir": str(tmp_path / "runs"), "name": yaml.removesuffix(".yaml"), "device": "cpu"}
    for key, value in shrink.items():
        OmegaConf.update(cfg, key, value, merge=False, force_add=True)
    path = tmp_path / yaml
    OmegaConf.save(cfg, path)
    assert main([str(path), "--no-progress"]) == 0
    return json.loads((tmp_path / "runs" / yaml.removesuffix(".yaml") / "results.json").read_text())


def test_vi_rl_and_the_likelihood_table_run_unchanged_on_a_pretrained_model(data, tmp_path):
    """learned_policy_vi.yaml (an MDM NELBO stage fine-tuning the model, a VI order policy with
    pyro, a GRPO policy, the IWAE likelihood table over orders) on a LLaDA-layout folder."""
    model = _folder(tmp_path, "llada", mask_token_id=MASK, eos_token_id=EOS, pad_token_id=EOS)
    small = {"batch_size": 2, "valid_n": 0, "eval_every": 0, "ckpt_every": 1}
    shrink = {f"stages.{s}.train.{k}": v for s in ("denoiser", "vi", "grpo") for k, v in {"steps": 2, **small}.items()}
    shrink |= {"stages.grpo.objective.group": 2, "stages.vi.objective.baseline": 2, "evaluate.n": 4, "evaluate.batch_size": 4,
               "evaluate.policies": ["top_prob", {"name": "threshold", "tau": 0.5}], "evaluate.iwae": {"k": [1, 2], "n": 4}}
    res = _on_pretrained("learned_policy_vi.yaml", model, data, tmp_path, shrink)
    assert res["status"] == "completed"
    rows = {r["policy"] for r in res["evaluations"]}
    assert rows == {"top_prob", "threshold(tau=0.5)", "vi (vi_orders)", "grpo"}, rows
    assert all(res["stages"][s]["step"] == 2 for s in ("denoiser", "vi", "grpo"))
    assert res["likelihood_table"]  # the IWAE rows over orders


def test_the_ablation_runner_runs_unchanged_on_a_pretrained_model(data, tmp_path):
    model = _folder(tmp_path, "dream", mask_token_id=MASK, eos_token_id=EOS, pad_token_id=EOS, bos_token_id=1)
    res = _on_pretrained("ablate_orderings.yaml", model, data, tmp_path, {
        "stages": {}, "evaluate.likelihood": False, "evaluate.n": 4, "ablate.n": 4, "ablate.batch_size": 4, "ablate.seeds": [0, 1],
        "ablate.grid": ["l2r", {"name": "threshold", "tau": [0.5, 0.9]}, {"name": "semi_ar", "block_size": [3], "from_prompt_end": True}]})
    assert res["status"] == "completed"
    assert len(res["ablation"]["points"]) == 4  # l2r, threshold x 2, semi_ar


def test_an_ar_checkpoint_initialises_block_diffusion_fine_tuning(data, tmp_path):
    """block.yaml's BD3-LM objective on a Qwen3 AR checkpoint: block-causal attention, logits
    read in place (shift_logits: false; shifted logits are refused under block_causal)."""
    model = _folder(tmp_path, "qwen3", eos_token_id=EOS)
    res = _on_pretrained("block.yaml", model, data, tmp_path, {
        "model.attention": {"name": "block_causal", "block_size": 2, "prompt": "causal"}, "model.shift_logits": False,
        "stages.denoiser.train.steps": 2, "stages.denoiser.train.batch_size": 2, "stages.denoiser.train.eval_every": 0,
        "stages.denoiser.train.valid_n": 0, "evaluate.n": 4, "evaluate.batch_size": 4})
    assert res["status"] == "completed" and res["stages"]["denoiser"]["step"] == 2
    assert res["evaluations"] and res["evaluations"][0]["n"] == 4
