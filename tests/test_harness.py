"""orderlab models in lm-evaluation-harness (orderlab.harness), offline: local task YAMLs over
JSONL files written here, a tiny run trained here (a constant answer, so scores are not 0),
a tiny random Qwen3 folder with a real tokenizer checked against transformers."""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local JSON files only: nothing downloaded
os.environ.setdefault("HF_HUB_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval")

import orderlab  # noqa: E402
from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from orderlab.harness import OrderlabLM  # noqa: E402
from orderlab.registry import ConfigError  # noqa: E402
from orderlab.run import main as run_main  # noqa: E402
from pretrained_fixtures import reference_logits, write_checkpoint  # noqa: E402
from tokenizer_fixtures import write_tokenizer  # noqa: E402

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
EOS = 2  # tokenizer_fixtures.SPECIALS: <|eos|>
PAIRS = [(3, 4), (12, 7), (5, 9), (21, 2), (8, 8), (6, 13), (40, 2), (1, 1), (17, 3), (9, 30), (2, 5), (11, 4)]
QUESTIONS = [f"Sam has {a} apples and gets {b} more. How many?" for a, b in PAIRS]
TEST_ANSWERS = ["7", "9", "7", "9"]  # the run learns to answer 7: exact match 0.5

GEN_YAML = """task: tiny_gen
dataset_path: json
dataset_kwargs: {{data_files: {{test: "{data}"}}, cache_dir: "{cache}"}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs: {{until: ["\\n\\n"], max_gen_toks: 6, do_sample: false}}
metric_list:
  - {{metric: exact_match, aggregation: mean, higher_is_better: true}}
"""
MC_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs: {{data_files: {{test: "{data}"}}, cache_dir: "{cache}"}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
"""
RUN_YAML = """task: {{name: jsonl, path: "{data}", tokenizer: "{tok}", gen_length: 6}}
model: {{name: transformer, d_model: 32, n_layers: 1, n_heads: 2, attention: {{name: set_causal, prompt: causal}}}}
stages:
  denoiser:
    objective: {{name: set_nll, process: {{name: quench}}}}
    train: {{steps: 60, batch_size: 8, lr: 2.0e-2, warmup: 10, log_every: 30, eval_every: 0, valid_n: 0, ckpt_every: 1000}}
policy: {{name: l2r}}
evaluate:
  policies: [l2r]
  n: 4
  batch_size: 4
  heatmaps: false
  lm_eval: {{tasks: ["{gen}", "{mc}"], include_defaults: false, batch_size: 3}}
run: {{dir: "{runs}", device: cpu}}
"""


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tokenizer, the jsonl task's data, the two task YAMLs."""
    root = tmp_path_factory.mktemp("harness")
    tok = write_tokenizer(root / "tok")
    (root / "data").mkdir()
    _jsonl(root / "data" / "train.jsonl", [{"question": q, "answer": "#### 7"} for q in QUESTIONS[:8]])
    test = _jsonl(root / "data" / "test.jsonl", [{"question": q, "answer": f"#### {a}"}
                                                 for q, a in zip(QUESTIONS[8:], TEST_ANSWERS)])
    mc = _jsonl(root / "mc.jsonl", [{"question": q, "choices": ["#### 7", "#### 9", "#### 31"], "label": i % 3}
                                    for i, q in enumerate(QUESTIONS[6:])])
    cache = root / "hf_cache"
    (root / "gen.yaml").write_text(GEN_YAML.format(data=test, cache=cache))
    (root / "mc.yaml").write_text(MC_YAML.format(data=mc, cache=cache))
    return {"root": root, "tok": tok, "data": root / "data", "test": test, "mc": mc,
            "gen_yaml": root / "gen.yaml", "mc_yaml": root / "mc.yaml"}


@pytest.fixture(scope="module")
def trained(files):
    """A tiny AR run on the jsonl task (answers '#### 7'), trained with the lm_eval step."""
    root = files["root"]
    path = root / "tiny.yaml"
    path.write_text(RUN_YAML.format(data=files["data"], tok=files["tok"], gen=files["gen_yaml"], mc=files["mc_yaml"],
                                    runs=root / "runs"))
    assert run_main([str(path), "--no-progress"]) == 0
    run = root / "runs" / "tiny"
    return {"run": run, "results": json.loads((run / "results.json").read_text())}


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    """A tiny random Qwen3 folder (an AR checkpoint) with a real tokenizer and a chat template."""
    folder = write_checkpoint(tmp_path_factory.mktemp("qwen3") / "qwen3", "qwen3", vocab_size=320, d_model=32,
                              n_layers=1, eos_token_id=EOS)
    return write_tokenizer(folder, chat_template=CHATML)


def _evaluate(lm, *yamls, **kw):
    return simple_evaluate(model=lm, tasks=[str(y) for y in yamls], task_manager=TaskManager(include_defaults=False),
                           bootstrap_iters=0, **kw)


def _restored(run: Path):
    exp = orderlab.load(run / "config.yaml", [f"run.dir={run.parent}", f"run.name={run.name}", "run.device=cpu"])
    exp.restore()
    return exp.model.eval(), exp


@torch.no_grad()
def _own_loglikelihood(model, tok, context: str, continuation: str) -> float:
    """orderlab's exact log-likelihood of one (context, continuation) under l2r, row alone."""
    ctx = tok.encode(context)
    cont = tok.encode(context + continuation)[len(ctx):]
    x = torch.tensor([ctx + cont])
    ranks = torch.tensor([[0] * len(ctx) + list(range(1, len(cont) + 1))])
    return float(orderlab.log_likelihood(model, x, ranks))


# --------------------------------------------------------------------------- a trained run


def test_run_step_stores_lm_eval_results_equal_to_orderlabs_own(trained, files):
    res = trained["results"]
    assert res["status"] == "completed"
    own = res["evaluations"][0]
    assert own["policy"] == "l2r" and own["score"] == 0.5  # the run learned '#### 7'; half the answers are 9
    lm = res["lm_eval"]
    assert lm["tasks"]["tiny_gen"]["exact_match,none"] == own["score"]
    assert lm["n_samples"]["tiny_gen"]["effective"] == 4
    assert lm["model"]["orderlab_order"] == "L2R()" and lm["model"]["orderlab_order_is_bound"] is False
    assert lm["model"]["nfe"]["requests"] == 4 and lm["model"]["nfe"]["max"] <= 6
    model, exp = _restored(trained["run"])
    rows = [json.loads(line) for line in files["mc"].read_text().splitlines()]
    acc = sum(max(range(3), key=lambda c: _own_loglikelihood(model, exp.task.tokenizer, r["question"], r["choices"][c]))
              == r["label"] for r in rows) / len(rows)
    assert lm["tasks"]["tiny_mc"]["acc,none"] == pytest.approx(acc)


def test_generate_until_equals_orderlabs_decode_of_the_same_rows(trained, files, caplog):
    model, exp = _restored(trained["run"])
    tokens, ranks = exp.task.batch(4, "test")
    out = orderlab.decode(model, exp.policy, tokens, ranks, eos_id=exp.task.eos_id, pad_id=exp.task.pad_id)
    own_texts = exp.task.generated_text(out.tokens, ranks)
    lm = OrderlabLM(run=str(trained["run"]), batch_size=3, device="cpu", progress=False)
    with caplog.at_level(logging.INFO, logger="orderlab.harness"):
        res = _evaluate(lm, files["gen_yaml"], log_samples=True)
    samples = sorted(res["samples"]["tiny_gen"], key=lambda s: s["doc_id"])
    assert [s["resps"][0][0] for s in samples] == own_texts
    assert res["results"]["tiny_gen"]["exact_match,none"] == float(exp.task.score(out.tokens, tokens, ranks).mean())
    assert sorted(lm.nfe) == sorted(out.nfe.tolist())  # per request
    logged = [r.getMessage() for r in caplog.records if r.name == "orderlab.harness"]
    assert len([m for m in logged if "NFE" in m]) == 4 and all(m.startswith("generate_until request") for m in logged)


def test_multiple_choice_loglikelihoods_are_orderlabs_exact_ones(trained, files):
    model, exp = _restored(trained["run"])
    lm = OrderlabLM(run=str(trained["run"]), batch_size=4, device="cpu", progress=False)
    res = _evaluate(lm, files["mc_yaml"], log_samples=True)
    for s in res["samples"]["tiny_mc"]:
        for (ll, _), choice in zip((r[0] for r in s["resps"]), s["doc"]["choices"]):
            assert ll == pytest.approx(_own_loglikelihood(model, exp.task.tokenizer, s["doc"]["question"], choice), abs=1e-4)


def test_the_command_line_wrapper_runs_lm_eval_with_the_orderlab_model(trained, files, tmp_path):
    cmd = [sys.executable, "-m", "orderlab.harness", "--model", "orderlab", "--model_args",
           f"run={trained['run']},progress=false", "--batch_size", "2", "--device", "cpu", "--tasks", str(files["gen_yaml"]),
           "--output_path", str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "tiny_gen" in proc.stdout and "0.5" in proc.stdout
    assert "generate_until request 3:" in proc.stderr and "NFE" in proc.stderr  # NFE per request in the log
    saved = list((tmp_path / "out").rglob("results_*.json"))
    assert saved and json.loads(saved[0].read_text())["results"]["tiny_gen"]["exact_match,none"] == 0.5


# --------------------------------------------------------------------------- a pretrained AR folder


def _requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def _reference_logprobs(folder, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """transformers' next-token log-probabilities of ``cont`` after ``ctx``, and whether each is the argmax."""
    x = torch.tensor([ctx + cont])
    logp = torch.log_softmax(reference_logits(folder, x)[0].double(), -1)  # [N, V]
    at = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
    target = torch.tensor(cont)
    return float(logp[at, target].sum()), bool((logp[at].argmax(-1) == target).all())


def _greedy(folder, ctx: list[int], n: int) -> list[int]:
    ids = list(ctx)
    for _ in range(n):
        ids.append(int(reference_logits(folder, torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(ctx):]


def test_l2r_loglikelihood_of_an_ar_checkpoint_is_the_reference_and_is_greedy_is_right(qwen3):
    lm = OrderlabLM(path=str(qwen3), dtype="float32", batch_size=2, progress=False)
    tok = lm.source.tokenizer
    texts = [("Question: how many goats?", " Answer: 19"), ("The total is", " $1,234.50"), ("", "Hello, how are you?"),
             ("A farmer has 12 goats ", "and buys 7 more.")]
    results = lm.loglikelihood(_requests("loglikelihood", texts))
    for (context, continuation), (ll, greedy) in zip(texts, results):
        ctx, cont = lm.codec.pair(context, continuation)
        if not context:
            assert ctx == [tok.bos_id]  # an empty context is conditioned on the prefix token
        ref, ref_greedy = _reference_logprobs(qwen3, ctx, cont)
        assert ll == pytest.approx(ref, abs=1e-4) and greedy == ref_greedy
    ctx = tok.encode("Question: A farmer has")
    best = _greedy(qwen3, ctx, 3)
    other = [best[0], best[1], (best[2] + 1) % 320]
    (ll_best, g_best), (ll_other, g_other) = lm.loglikelihood_tokens([(ctx, best), (ctx, other)])
    assert g_best is True and g_other is False
    assert ll_best == pytest.approx(_reference_logprobs(qwen3, ctx, best)[0], abs=1e-4)
    assert ll_other == pytest.approx(_reference_logprobs(qwen3, ctx, other)[0], abs=1e-4)


def test_rolling_loglikelihood_sums_disjoint_windows(qwen3):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    lm = OrderlabLM(path=str(qwen3), dtype="float32", max_len=8, batch_size=3, progress=False)
    text = "Question: Tom reads 3 pages a day for 14 days. How many pages does he read?"
    ids = lm.source.tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > 16  # several windows
    (total,) = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]))
    # lm-eval's windows (model length 8: 7 tokens of input) predict every token once
    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, lm.codec.prefix_id, 7, 1)]
    assert sum(len(cont) for _, cont in windows) == len(ids) and len(windows) > 2
    expect = sum(_reference_logprobs(qwen3, ctx, cont)[0] for ctx, cont in windows)
    assert total == pytest.approx(expect, abs=1e-3)


def test_generate_until_cuts_at_stop_sequences_and_is_invariant_to_request_order(qwen3):
    lm = OrderlabLM(path=str(qwen3), dtype="float32", batch_size=2, progress=False)
    contexts = ["Question: A farmer has 12 goats", "Hello", "The total is $1,234.50 and the rest", "user: hi", "Tom reads 3"]
    free = lm.generate_until(_requests("generate_until", [(c, {"until": [], "max_gen_toks": 8}) for c in contexts]))
    alone = OrderlabLM(path=str(qwen3), dtype="float32", batch_size=1, progress=False)
    assert alone.generate_until(_requests("generate_until", [(c, {"until": [], "max_gen_toks": 8}) for c in contexts])) == free
    stops = [t[2:4] if len(t) >= 4 else "\u2603" for t in free]  # a stop inside each text (or none)
    args = [(c, {"until": [s], "max_gen_toks": 8}) for c, s in zip(contexts, stops)]
    cut = lm.generate_until(_requests("generate_until", args))
    assert cut == [t[: t.find(s)] if s in t else t for t, s in zip(free, stops)]
    assert any(c != t for c, t in zip(cut, free))
    order = list(range(len(args)))
    random.Random(0).shuffle(order)
    shuffled = lm.generate_until(_requests("generate_until", [args[i] for i in order]))
    assert shuffled == [cut[i] for i in order]
    sampled = [(c, {"until": [], "max_gen_toks": 8, "do_sample": True, "temperature": 1.0}) for c in contexts]
    once = lm.generate_until(_requests("generate_until", sampled))
    again = lm.generate_until(_requests("generate_until", [sampled[i] for i in order]))
    assert again == [once[i] for i in order]  # seeded per batch, batches independent of the order


def test_loglikelihood_results_are_invariant_to_request_order(qwen3):
    lm = OrderlabLM(path=str(qwen3), dtype="float32", batch_size=2, order="mdm_nelbo", **{"order.samples": 4},
                    progress=False)
    pairs = [("Question: how many goats?", " 19"), ("The total", " is"), ("Hello", ", how are you?"), ("A", " farmer")]
    first = lm.loglikelihood(_requests("loglikelihood", pairs))
    perm = [2, 0, 3, 1]
    again = lm.loglikelihood(_requests("loglikelihood", [pairs[i] for i in perm]))
    assert again == [first[i] for i in perm]
    assert lm.get_model_info()["orderlab_order_is_bound"] is True


def test_scorers_and_policy_knobs(qwen3):
    def scores(**kw):
        lm = OrderlabLM(path=str(qwen3), dtype="float32", batch_size=4, progress=False, **kw)
        return lm, lm.loglikelihood_tokens([(ctx, cont)])[0]

    ctx, cont = [11, 40, 77, 90], [100]
    _, l2r = scores()
    for kw in ({"order": "r2l"}, {"order": "blocks", "order.size": 1}, {"order": "policy"}):
        assert scores(**kw)[1] == pytest.approx(l2r, abs=1e-5), kw  # one token: every order is the same
    cont = [100, 120, 140]
    _, l2r = scores()
    _, blocks = scores(order="blocks", **{"order.size": 3})  # one set of 3 tokens, predicted in parallel
    assert blocks[0] != pytest.approx(l2r[0])
    lm, iwae = scores(order="iwae", **{"order.k": 2})
    assert torch.isfinite(torch.tensor(iwae[0])) and "IWAE(k=2)" == repr(lm.scorer)
    lm, _ = scores(policy="threshold", **{"policy.tau": 0.5})
    assert "0.5" in repr(lm.policy)


def test_a_bidirectional_checkpoints_mdm_nelbo_is_llada_monte_carlo(tmp_path):
    folder = write_tokenizer(write_checkpoint(tmp_path / "llada", "llada", vocab_size=320, d_model=32, n_layers=1,
                                              mask_token_id=8, eos_token_id=EOS, pad_token_id=EOS))
    lm = OrderlabLM(path=str(folder), dtype="float32", order="mdm_nelbo", **{"order.samples": 6, "order.chunk": 4},
                    policy="top_prob", progress=False)
    (a, greedy), = lm.loglikelihood_tokens([([11, 40, 77], [100, 120])])
    (b, _), = lm.loglikelihood_tokens([([11, 40, 77], [100, 120])])
    assert a == b and a < 0 and isinstance(greedy, bool)  # seeded; a bound in nats
    text, = lm.generate_until(_requests("generate_until", [("Hello", {"until": [], "max_gen_toks": 4})]))
    assert len(lm.nfe) == 1 and 1 <= lm.nfe[0] <= 4 and isinstance(text, str)


def test_chat_template_hooks(qwen3):
    lm = OrderlabLM(path=str(qwen3), dtype="float32", progress=False)
    chat = [{"role": "user", "content": "Hello"}]
    assert lm.apply_chat_template(chat) == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    assert lm.codec.chat and lm.chat_template(True) == CHATML and lm.tokenizer_name == str(qwen3)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("args, key", [
    ({"polcy": "l2r"}, "model_args.polcy"),
    ({"policy": "eb", "policy.gama": 0.1}, "model_args.policy.gama"),
    ({"policy": "ebb"}, "model_args.policy"),
    ({"order": "nope"}, "model_args.order"),
    ({"order.k": 2}, "model_args.order.k"),
    ({"batch_size": "auto"}, "model_args.batch_size"),
    ({"cache": "maybe"}, "model_args.cache"),
    ({"tokenizer": "/nonexistent"}, "model_args.tokenizer"),
])
def test_bad_model_args_are_one_line_errors_naming_the_key(qwen3, args, key):
    with pytest.raises(ConfigError) as e:
        OrderlabLM(path=str(qwen3), dtype="float32", progress=False, **args)
    assert e.value.path == key and "\n" not in str(e.value)
    if key == "model_args.polcy":
        assert "did you mean 'policy'" in str(e.value)


def test_a_source_is_required_and_a_toy_run_needs_a_tokenizer(tmp_path, qwen3):
    with pytest.raises(ConfigError, match="model_args.run"):
        OrderlabLM()
    with pytest.raises(ConfigError, match="model_args.path"):
        OrderlabLM(run=str(tmp_path), path=str(qwen3))
    with pytest.raises(ConfigError, match="no config.yaml"):
        OrderlabLM(run=str(tmp_path))
    run = tmp_path / "runs" / "toy"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("task: {name: addition, digits: 2}\nmodel: {name: transformer, d_model: 16, "
                                     "n_layers: 1, n_heads: 2}\nstages: {}\npolicy: l2r\n")
    with pytest.raises(ConfigError, match="model_args.tokenizer: .*lm-eval sends text"):
        OrderlabLM(run=str(run), device="cpu")


def test_the_run_step_checks_its_model_args_before_training(files, tmp_path):
    yaml = RUN_YAML.format(data=files["data"], tok=files["tok"], gen=files["gen_yaml"], mc=files["mc_yaml"],
                           runs=tmp_path / "runs").replace("batch_size: 3}", "batch_size: 3, model_args: {ordr: l2r}}")
    with pytest.raises(ConfigError, match=r"evaluate\.lm_eval\.model_args\.ordr: unknown key; did you mean 'order'"):
        orderlab.load(OmegaConfYaml(yaml))


def OmegaConfYaml(text: str):  # noqa: N802
    from omegaconf import OmegaConf

    return OmegaConf.create(text)
