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
