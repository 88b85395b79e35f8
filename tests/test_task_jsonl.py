"""The jsonl task: prompts and reference answers from a local JSONL file (invented questions)."""

from __future__ import annotations

import json

import pytest
import torch

import orderlab
from orderlab import ranks as R
from orderlab.registry import ConfigError
from orderlab.tasks import JsonlTask
from orderlab.tasks.jsonl import boxed_answer, extract_answer, hash_answer, hash_splits, last_number, normalize_answer
from orderlab.tokenizer import Tokenizer, TokenizerError
from tokenizer_fixtures import write_tokenizer  # tests/tokenizer_fixtures.py

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def invented(k: int) -> dict:
    """Question k: ragged lengths (k % 4 extra clauses), answer ending in '#### <sum>'."""
    a, b = 3 + 7 * k, 11 + k
    extra = " It rained that day." * (k % 4)
    return {"question": f"Mia has {a} shells and finds {b} more.{extra} How many shells does she have?",
            "answer": f"She has {a} + {b} = {a + b} shells.\n#### {a + b:,}", "id": k}


ROWS = [invented(k) for k in range(40)]
ROWS.append({"question": "What is 1000 + 234?", "answer": "1000 + 234 = 1234\n#### 1,234", "id": 40})


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A model folder: tokenizer without chat template; <|eot_id|> also ends text."""
    f = write_tokenizer(tmp_path_factory.mktemp("model") / "m", prepend_bos=True)
    (f / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    return f


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "qa.jsonl", ROWS)


@pytest.fixture(scope="module")
def task(folder, data):
    return JsonlTask(str(data), str(folder), gen_length=40)  # every reference fits (at most 32 tokens)


def gen_ids(task, text, end=True):
    """``gen_length`` generated ids: ``text``, then end-of-text filling (or pad when not ``end``)."""
    ids = task.tokenizer.encode(text, add_special_tokens=False)[: task.gen_length]
    return ids + [task.eos_id if end else task.pad_id + 7] * (task.gen_length - len(ids))


# ---------------------------------------------------------------- answers


@pytest.mark.parametrize("text, want", [
    ("so the total is 1,234.\n#### 1,234", "1234"),
    ("#### $18.00 dollars", "18"),
    ("The answer is \\boxed{42}.", "42"),
    ("\\boxed{\\frac{1}{2}} then \\boxed{ 7.50 }", "7.5"),
    ("She had 3 apples and 17 pears.", "17"),
    ("#### 5 and \\boxed{6}", "5"),  # extractors are tried in order
    ("no number here", None),
    ("", None),
])
def test_extract_answer(text, want):
    assert extract_answer(text, (hash_answer, boxed_answer, last_number)) == want


def test_extractors_and_normalisation():
    assert hash_answer("12 then #### 3\nmore 9") == "3" and hash_answer("#### ") is None
    assert hash_answer("#### yes\n") == "yes" and hash_answer("12") is None
    assert boxed_answer("\\boxed{a{b}c}") == "a{b}c" and boxed_answer("\\boxed{unclosed") is None
    assert last_number("-3.5 and -4") == "-4" and last_number("x") is None
    assert [normalize_answer(s) for s in (" 72. ", "72.0", "$1,234.50", "-0.50", "\\$5", " x+1 ")] == \
           ["72", "72", "1234.5", "-0.5", "5", "x+1"]


# ---------------------------------------------------------------- rows


def test_left_padding_ranks_and_reference_then_eos(task, data):
    tok = task.tokenizer
    prompts = [tok.encode(r["question"]) for r in ROWS]
    assert task.max_prompt_len == max(map(len, prompts)) and min(map(len, prompts)) < task.max_prompt_len
    assert task.seq_len == task.max_prompt_len + 40 and task.vocab_size == tok.vocab_size == 320
    assert (task.eos_id, task.pad_id, task.end_ids) == (2, 0, (2, 5))
    x, r = task.batch(len(task.splits["train"]), "train")
    assert x.shape == r.shape == (len(task.splits["train"]), task.seq_len)
    R.validate(r, x, mask_id=task.mask_id)
    P = task.max_prompt_len
    for i, ex in enumerate(task.splits["train"]):
        pad = P - len(ex.prompt)
        assert (r[i, :pad] == -1).all() and (x[i, :pad] == task.pad_id).all()
        assert (r[i, pad:P] == 0).all() and x[i, pad:P].tolist() == list(ex.prompt) == tok.encode(ex.question)
        assert (r[i, P:] == 1).all()
        ref = tok.encode(ex.answer, add_special_tokens=False)
        assert x[i, P:P + len(ref)].tolist() == ref and (x[i, P + len(ref):] == task.eos_id).all()
    assert x[0, P - len(task.splits["train"][0].prompt)] == tok.bos_id  # the file's post-processor adds BOS


def test_score_exact_match_and_stop_at_end_of_text(task):
    x, r = task.batch(4, "train")
    assert task.score(x, x, r).tolist() == [1.0] * 4  # the reference scores itself
    P, want = task.max_prompt_len, [extract_answer(ex.answer, task._extractors) for ex in task.splits["train"][:4]]
    pred = x.clone()
    pred[0, P:] = torch.tensor(gen_ids(task, f"#### {int(want[0]) + 1}"))  # a wrong number
    pred[1, P:] = torch.tensor(gen_ids(task, f"I think\n#### {want[1]}<|eos|>\n#### 99 garbage"))  # stops at EOS
    pred[2, P:] = torch.tensor(gen_ids(task, f"#### {want[2]}<|eot_id|>#### 99"))  # a generation_config end id
    pred[3, P:] = torch.tensor(gen_ids(task, f"#### {want[3]} then #### 99", end=False))  # no end: last '####'
    assert task.score(pred, x, r).tolist() == [0.0, 1.0, 1.0, 0.0]
    pred[0, P:] = torch.tensor(gen_ids(task, f"The total is ${int(want[0]):,}.00 shells"))  # last number, normalised
    m = task.metrics(pred, x, r)
    assert m["exact_match"].tolist() == [1.0, 1.0, 1.0, 0.0] and m["answered"].tolist() == [1.0] * 4
    assert set(m) == {"exact_match", "token_accuracy", "answered", "answer_tokens"}
    pred[0, P:] = torch.tensor(gen_ids(task, "no idea"))
    assert task.metrics(pred, x, r)["answered"][0] == 0 and task.score(pred, x, r)[0] == 0
    with pytest.raises(ValueError, match="shape of tokens"):
        task.score(pred[:, 1:], x, r)


def test_comma_answer_in_the_reference(folder, tmp_path):
    write_jsonl(tmp_path / "d" / "test.jsonl", ROWS[-1:])
    t = JsonlTask(str(tmp_path / "d"), str(folder), gen_length=16)
    x, r = t.batch(1, "test")
    pred = x.clone()
    pred[0, t.max_prompt_len:] = torch.tensor(gen_ids(t, "#### 1234"))
    assert t.answers(pred, x, r) == (["1234"], ["1234"]) and t.score(pred, x, r).tolist() == [1.0]


def test_long_reference_is_cut_and_scored_on_its_text(folder, data):
    t = JsonlTask(str(data), str(folder), gen_length=4)
    x, r = t.batch(3, "train")
    ex = t.splits["train"][0]
    assert x[0, t.max_prompt_len:].tolist() == list(ex.reference[:4]) and len(ex.reference) > 4
    want = extract_answer(ex.answer, t._extractors)
    assert last_number(t.tokenizer.decode(ex.reference[:4])) != want  # the cut tokens alone would mislead
    pred = x.clone()
    pred[:, t.max_prompt_len:] = torch.tensor(gen_ids(t, want))  # 3 digits and an end: fits in 4
    assert t.score(pred, x, r).tolist() == [1.0, 0.0, 0.0]
    assert t.score(x, x, r).tolist() == [0.0, 0.0, 0.0]  # the cut reference itself lacks the answer


def test_chat_template_prompts(tmp_path, data):
    chat_folder = write_tokenizer(tmp_path / "chat", chat_template=CHATML)
    t = JsonlTask(str(data), str(chat_folder), gen_length=8, prompt="Q: {question} (#{id})")
    tok, ex = t.tokenizer, t.splits["test"][0]
    assert t.chat
    row = next(rw for rw in ROWS if rw["question"] == ex.question)
    text = tok.apply_chat_template([{"role": "user", "content": f"Q: {ex.question} (#{row['id']})"}])
    assert text.startswith("<|im_start|>user\nQ: ") and text.endswith("<|im_start|>assistant\n")
    assert list(ex.prompt) == tok.encode(text, add_special_tokens=False)
    plain = JsonlTask(str(data), str(chat_folder), gen_length=8, chat=False)
    assert not plain.chat and list(plain.splits["test"][0].prompt) == tok.encode(plain.splits["test"][0].question)


# ---------------------------------------------------------------- splits and sampling


def test_single_file_splits_by_question_hash(task):
    got = {s: [ex.question for ex in task.splits[s]] for s in ("train", "valid", "test")}
    assert sum(map(len, got.values())) == len(ROWS) and all(got.values())
    want = hash_splits([rw["question"] for rw in ROWS])
    for s, qs in got.items():
        assert qs == [rw["question"] for rw, w in zip(ROWS, want) if w == s]  # file order kept


def test_split_folder(folder, tmp_path):
    d = tmp_path / "d"
    write_jsonl(d / "train.jsonl", ROWS[:30])
    write_jsonl(d / "test.jsonl", ROWS[30:])
    t = JsonlTask(str(d), str(folder), gen_length=8)
    assert [ex.question for ex in t.splits["test"]] == [rw["question"] for rw in ROWS[30:]]
    carved = [rw["question"] for rw, s in zip(ROWS[:30], hash_splits([rw["question"] for rw in ROWS[:30]]))
              if s == "valid"]
    assert carved and [ex.question for ex in t.splits["valid"]] == carved  # valid carved out of train
    assert len(t.splits["train"]) + len(carved) == 30
    write_jsonl(d / "valid.jsonl", ROWS[:2])
    t = JsonlTask(str(d), str(folder), gen_length=8)
    assert len(t.splits["train"]) == 30 and [ex.line for ex in t.splits["valid"]] == [1, 2]
    only_test = tmp_path / "t"
    write_jsonl(only_test / "test.jsonl", ROWS[:3])
    t = JsonlTask(str(only_test), str(folder), gen_length=8)
    with pytest.raises(ValueError, match=r"split 'train' has 0 examples"):
        t.batch(1, "train")


def test_batch_sizes_and_seeds(task, data):
    n = len(task.splits["test"])
    first, _ = task.batch(2, "test", seed=0)
    assert torch.equal(first, task.rows("test")[0][:2])  # seed 0: the first n in file order
    a, b = task.batch(n, "test", seed=3), task.batch(n, "test", seed=3)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], task.rows("test")[0])  # a seeded permutation
    assert sorted(map(tuple, a[0].tolist())) == sorted(map(tuple, task.rows("test")[0].tolist()))
    with pytest.raises(ValueError, match=rf"qa\.jsonl: split 'test' has {n} examples; cannot take n={n + 1}"):
        task.batch(n + 1, "test")
    with pytest.raises(ValueError, match="unknown split"):
        task.batch(1, "dev")


# ---------------------------------------------------------------- errors and config


def test_bad_fields_name_the_field_and_line(folder, tmp_path):
    p = write_jsonl(tmp_path / "q.jsonl", ROWS[:5])
    with pytest.raises(ConfigError, match=r"question_field: .*q\.jsonl line 1: no field 'questoin' \(fields: question"):
        JsonlTask(str(p), str(folder), question_field="questoin")
    rows = [*ROWS[:2], {"question": "x?", "solution": "#### 1"}]
    p = write_jsonl(tmp_path / "a.jsonl", rows)
    with pytest.raises(ConfigError, match=r"answer_field: .*a\.jsonl line 3: no field 'answer' \(fields: question, "
                                          r"solution\)"):
        JsonlTask(str(p), str(folder))
    p.write_text(json.dumps(ROWS[0]) + "\n\n{oops\n")
    with pytest.raises(ValueError, match=r"a\.jsonl line 3: not valid JSON"):
        JsonlTask(str(p), str(folder))
    with pytest.raises(ConfigError, match=r"prompt: .*line 1: the prompt names 'topic'"):
        JsonlTask(str(write_jsonl(tmp_path / "b.jsonl", ROWS[:2])), str(folder), prompt="{topic}: {question}")


def test_other_errors(folder, data, tmp_path):
    too_long = r"max_prompt_len: .*qa\.jsonl line 1: the prompt has \d+ tokens, more than 5"
    with pytest.raises(ConfigError, match=too_long):
        JsonlTask(str(data), str(folder), max_prompt_len=5)
    with pytest.raises(ValueError, match="nothing.jsonl: no such file or folder"):
        JsonlTask(str(tmp_path / "nothing.jsonl"), str(folder))
    with pytest.raises(TokenizerError, match="no chat template"):
        JsonlTask(str(data), str(folder), chat=True)
    with pytest.raises(ConfigError, match=r"extract: unknown extractors \['latex'\]"):
        JsonlTask(str(data), str(folder), extract=["hash", "latex"])
    no_eos = write_tokenizer(tmp_path / "noeos", eos_token=None, pad_token=None)
    with pytest.raises(ValueError, match="no end-of-text token"):
        JsonlTask(str(data), str(no_eos))


def test_built_from_config_with_key_checking(folder, data):
    spec = {"name": "jsonl", "path": str(data), "tokenizer": str(folder), "gen_length": 16, "extract": ["hash"]}
    t = orderlab.build("task", spec)
    assert isinstance(t, JsonlTask) and t.seq_len == t.max_prompt_len + 16 and t.extract == ("hash",)
    with pytest.raises(ConfigError, match=r"task\.gen_lenght: unknown key for JsonlTask; did you mean 'gen_length'"):
        orderlab.build("task", {**spec, "gen_lenght": 16})
    with pytest.raises(ConfigError, match=r"task\.question_field: .*no field 'q'"):
        orderlab.build("task", {**spec, "question_field": "q"})
    with pytest.raises(ConfigError, match=r"task\.gen_length: must be int"):
        orderlab.build("task", {**spec, "gen_length": "long"})


def test_token_freqs_and_render(task):
    f = task.token_freqs()
    assert f.shape == (task.vocab_size,) and abs(float(f.sum()) - 1) < 1e-5
    assert f[task.eos_id] > 0 and f[task.pad_id] == 0  # one end-of-text per example, no padding
    x, r = task.batch(1, "test")
    ex = task.splits["test"][0]
    text = task.render(x[0])
    assert text == "<|bos|>" + ex.question + ex.answer  # padding and the end-of-text filling dropped
    masked = x[0].clone()
    masked[task.max_prompt_len] = task.mask_id
    assert task.render(masked).startswith("<|bos|>" + ex.question + "[MASK]")
    assert isinstance(task.tokenizer, Tokenizer) and "JsonlTask(" in repr(task)
