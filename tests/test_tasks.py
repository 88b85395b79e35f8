import pytest
import torch

from orderlab import ranks as R
from orderlab.registry import ConfigError
from orderlab.builder import build, names
from orderlab.tasks import (
    Addition,
    Infill,
    StdlibText,
    Task,
    file_split,
    hash_rows,
    hash_split,
    pair_split,
    position_accuracy,
    stdlib_files,
    token_accuracy,
)


def test_registered_and_built_from_config():
    assert {"addition", "text"} <= set(names("task"))
    t = build("task", {"name": "addition", "digits": 2, "reverse_answer": True})
    assert isinstance(t, Addition) and isinstance(t, Task)
    assert (t.digits, t.reverse_answer, t.seq_len, t.vocab_size, t.mask_id) == (2, True, 9, 13, 13)
    with pytest.raises(ConfigError, match="digit"):
        build("task", {"name": "addition", "digitz": 2})


# ---------------------------------------------------------------- shared helpers


def test_token_and_position_accuracy_hand_made():
    tokens = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [5, 5, 5, 5]])
    ranks = torch.tensor([[0, 1, 1, 1], [0, 2, 1, -1], [0, 0, 0, 0]])
    pred = torch.tensor([[9, 2, 0, 4], [1, 0, 3, 9], [0, 0, 0, 0]])
    assert torch.allclose(token_accuracy(pred, tokens, ranks), torch.tensor([2 / 3, 1 / 2, 1.0]))
    pos = position_accuracy(pred, tokens, ranks)
    assert torch.isnan(pos[0]) and torch.allclose(pos[1:], torch.tensor([0.5, 0.5, 1.0]))
    with pytest.raises(ValueError, match="shape of tokens"):
        token_accuracy(pred[:, :3], tokens, ranks)


def test_default_metrics_are_score_and_token_accuracy():
    t = Addition(digits=2)
    x, r = t.encode_pairs(torch.tensor([12, 50]), torch.tensor([34, 50]))
    pred = x.clone()
    pred[1, -1] = (pred[1, -1] + 1) % 10
    m = t.metrics(pred, x, r)
    assert set(m) == {"exact_match", "token_accuracy"} and m["exact_match"].tolist() == [1.0, 0.0]
    assert torch.allclose(m["token_accuracy"], torch.tensor([1.0, 2 / 3]))


def test_hash_rows_is_a_fixed_function_of_the_row():
    x = torch.randint(0, 1000, (500, 7), generator=torch.Generator().manual_seed(0))
    h = hash_rows(x)
    assert torch.equal(h[100:200], hash_rows(x[100:200]))  # independent of the batch around it
    assert len(set(h.tolist())) == 500  # no collisions on 500 random rows
    assert int(hash_rows(torch.tensor([[0, 1, 2]]))) != int(hash_rows(torch.tensor([[0, 2, 1]])))  # order-sensitive
    # pinned: a change of the hash would silently move examples between splits
    assert hash_rows(torch.tensor([[1, 2, 3], [0, 0, 0]])).tolist() == [786945706, 1114090046]
    s = hash_split(torch.arange(20_000)[:, None])
    frac = torch.bincount(s, minlength=3) / s.numel()
    assert 0.78 < frac[0] < 0.82 and 0.09 < frac[1] < 0.11 and 0.09 < frac[2] < 0.11
    with pytest.raises(ValueError, match="integer tensor"):
        hash_rows(torch.zeros(3, 2))


# ---------------------------------------------------------------- addition


def test_addition_shapes_ranks_and_values():
    t = Addition(digits=3)
    x, r = t.batch(64, "train", seed=1)
    assert x.shape == r.shape == (64, 12) and x.dtype == r.dtype == torch.long
    R.validate(r, x, mask_id=t.mask_id)
    assert (r[:, :8] == 0).all() and (r[:, 8:] == 1).all()
    assert (x[:, 3] == 10).all() and (x[:, 7] == 11).all()  # '+' and '='
    assert x.min() >= 0 and x.max() < t.vocab_size and (x != t.pad_id).all()
    num = lambda d: (d * 10 ** torch.arange(d.shape[1] - 1, -1, -1)).sum(1)  # noqa: E731
    assert torch.equal(num(x[:, :3]) + num(x[:, 4:7]), num(x[:, 8:]))


def test_addition_reverse_answer_and_render_round_trip():
    fwd, rev = Addition(digits=3), Addition(digits=3, reverse_answer=True)
    a, b = torch.tensor([42, 999]), torch.tensor([917, 1])
    x, _ = fwd.encode_pairs(a, b)
    assert [fwd.render(v) for v in x] == ["042+917=0959", "999+001=1000"]
    xr, _ = rev.encode_pairs(a, b)
    assert rev.render(xr[0]) == "042+917=9590"
    for v in x:
        assert torch.equal(fwd.encode(fwd.render(v)), v)
    masked = x[0].clone()
    masked[8:] = fwd.mask_id
    assert fwd.render(masked) == "042+917=????"
    assert torch.equal(fwd.encode("042+917=????"), masked)


def test_addition_deterministic_per_split_and_seed():
    t = Addition(digits=3)
    x1, _ = t.batch(32, "valid", seed=5)
    x2, _ = t.batch(32, "valid", seed=5)
    x3, _ = t.batch(32, "valid", seed=6)
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)
    assert torch.equal(Addition(digits=3).batch(32, "valid", seed=5)[0], x1)


def test_addition_splits_exhaustive_two_digits():
    t = Addition(digits=2)
    a = torch.arange(100).repeat_interleave(100)
    b = torch.arange(100).repeat(100)
    s = pair_split(a, b)  # every pair of the task
    counts = torch.bincount(s, minlength=3) / s.numel()
    assert 0.75 < counts[0] < 0.85 and 0.07 < counts[1] < 0.13 and 0.07 < counts[2] < 0.13
    table = {(int(i), int(j)): int(k) for i, j, k in zip(a, b, s)}
    seen = {}
    for k, split in enumerate(("train", "valid", "test")):
        x, _ = t.batch(4000, split, seed=0)
        pairs = {(int(p[0] * 10 + p[1]), int(p[3] * 10 + p[4])) for p in x}
        assert all(table[p] == k for p in pairs), split  # only pairs of this split
        seen[split] = pairs
    assert not seen["train"] & seen["valid"] and not seen["train"] & seen["test"]
    assert not seen["valid"] & seen["test"]
    # 4000 draws from ~1000 valid / test pairs cover the split
    assert len(seen["test"]) > 0.95 * int((s == 2).sum())


def test_addition_score_hand_made():
    t = Addition(digits=2)
    x, r = t.encode_pairs(torch.tensor([12, 50, 99]), torch.tensor([34, 50, 99]))
    pred = x.clone()
    pred[1, -1] = (pred[1, -1] + 1) % 10  # one wrong answer digit
    pred[2, 0] = (pred[2, 0] + 1) % 10  # a wrong *prompt* digit does not count
    s = t.score(pred, x, r)
    assert s.dtype == torch.float32 and s.tolist() == [1.0, 0.0, 1.0]


def test_addition_token_freqs_and_unknown_split():
    t = Addition(digits=2)
    f = t.token_freqs()
    assert f.shape == (13,) and abs(float(f.sum()) - 1) < 1e-5
    assert f[t.pad_id] == 0 and abs(float(f[10]) - 1 / 9) < 1e-6  # one '+' per 9 tokens
    with pytest.raises(ValueError, match="train, valid, test"):
        t.batch(2, "dev")


# ---------------------------------------------------------------- text


@pytest.fixture(scope="module")
def text():
    return StdlibText(seq_len=64, max_bytes=400_000, context=8)


def test_text_finds_files_and_splits_by_file(text):
    files = stdlib_files()
    assert files == sorted(files) and len(files) > 100
    assert "os.py" in files and not any("site-packages" in f for f in files)
    assert not any(part in ("test", "tests") for f in files for part in f.split("/")[:-1])
    by = {s: text.files(s) for s in ("train", "valid", "test")}
    assert sorted(by["train"] + by["valid"] + by["test"]) == files  # a partition by file
    assert by["valid"] and by["test"] and len(by["train"]) > 0.8 * len(files)
    assert all(file_split(f) == s for s, fs in by.items() for f in fs)
    assert file_split("os.py") == file_split("os.py")  # a fixed hash, not Python's hash()


def test_text_batch_conventions_and_determinism(text):
    x, r = text.batch(16, "valid", seed=3)
    assert x.shape == r.shape == (16, 64) and x.dtype == r.dtype == torch.long
    assert x.min() >= 0 and x.max() < 256 and text.vocab_size == 256
    assert (r[:, :8] == 0).all() and (r[:, 8:] == 1).all()
    assert torch.equal(x, text.batch(16, "valid", seed=3)[0])
    assert not torch.equal(x, text.batch(16, "valid", seed=4)[0])
    # each window is a substring of the split's bytes, and not of another split's
    data = {s: text.data(s) for s in ("train", "valid", "test")}
    for row in x:
        w = bytes(row.tolist())
        assert w in data["valid"]
    assert len(data["train"]) <= 400_000
    # another instance with the same options sees the same data
    assert torch.equal(StdlibText(seq_len=64, max_bytes=400_000, context=8).batch(4, "test", 0)[0], text.batch(4, "test", 0)[0])


def test_text_max_files_subset_is_deterministic():
    a = StdlibText(seq_len=32, max_files=3)
    assert len(a.selected_files("train")) == 3
    assert a.selected_files("train") == StdlibText(seq_len=32, max_files=3).selected_files("train")
    assert set(a.selected_files("valid")) <= set(StdlibText(seq_len=32, max_files=10).selected_files("valid"))


def test_text_score_freqs_render(text):
    x, r = text.batch(3, "train", seed=0)
    pred = x.clone()
    pred[1, -1] = (pred[1, -1] + 1) % 256
    pred[2, 0] = (pred[2, 0] + 1) % 256  # given context byte: not scored
    assert text.score(pred, x, r).tolist() == [1.0, 0.0, 1.0]
    f = text.token_freqs()
    assert f.shape == (256,) and abs(float(f.sum()) - 1) < 1e-5
    assert f[ord(" ")] > f[ord("q")] > 0 and f[0] == 0
    s = "def f(x):\n    return 'é'\n"
    assert text.render(text.encode(s)) == s
    assert text.metric == "exact_match" and text.pad_id == 0


def test_text_bad_arguments():
    with pytest.raises(ValueError, match="context"):
        StdlibText(seq_len=8, context=8)
    with pytest.raises(ValueError, match="valid splits"):
        StdlibText(seq_len=8).batch(1, "validation")


# ---------------------------------------------------------------- infill


@pytest.fixture(scope="module")
def infill():
    return Infill(seq_len=96, max_lines=3, min_context=12, max_bytes=400_000)


def test_infill_masks_whole_lines_in_the_middle(infill):
    x, r = infill.batch(200, "valid", seed=1)
    assert x.shape == r.shape == (200, 96) and x.dtype == r.dtype == torch.long
    R.validate(r, x, mask_id=infill.mask_id)
    data = infill.data("valid")
    nlines = set()
    for row, rk in zip(x.tolist(), r.tolist()):
        gen = [i for i, v in enumerate(rk) if v == 1]
        a, b = gen[0], gen[-1] + 1
        assert gen == list(range(a, b))  # one contiguous span
        assert a >= 12 and 96 - b >= 12  # context on both sides
        span = bytes(row[a:b])
        assert span.endswith(b"\n") and 1 <= span.count(b"\n") <= 3  # 1..3 whole lines ...
        assert row[a - 1] == ord("\n")  # ... starting at a line start
        assert span.strip()  # not only whitespace
        assert bytes(row) in data  # a window of the split's bytes
        nlines.add(span.count(b"\n"))
    assert nlines == {1, 2, 3}  # every span length in lines occurs


def test_infill_reuses_the_text_corpus_and_is_deterministic(infill):
    text = StdlibText(seq_len=96, max_bytes=400_000)
    for split in ("train", "valid", "test"):
        assert infill.data(split) == text.data(split) and infill.files(split) == text.files(split)
    x, r = infill.batch(8, "test", seed=3)
    x2, r2 = Infill(seq_len=96, max_lines=3, min_context=12, max_bytes=400_000).batch(8, "test", seed=3)
    assert torch.equal(x, x2) and torch.equal(r, r2)
    assert not torch.equal(x, infill.batch(8, "test", seed=4)[0])
    assert torch.equal(infill.token_freqs(), text.token_freqs())


def test_infill_metrics_and_arguments(infill):
    x, r = infill.batch(3, "train", seed=0)
    pred = x.clone()
    first = r[1].nonzero()[0, 0]
    pred[1, first] = (pred[1, first] + 1) % 256  # one wrong character of the span
    pred[2, 0] = (pred[2, 0] + 1) % 256  # the context is not scored
    m = infill.metrics(pred, x, r)
    assert m["exact_match"].tolist() == [1.0, 0.0, 1.0]
    n1 = int(r[1].sum())
    assert torch.allclose(m["token_accuracy"], torch.tensor([1.0, (n1 - 1) / n1, 1.0]))
    with pytest.raises(ValueError, match="min_context"):
        Infill(seq_len=32, min_context=16)
    with pytest.raises(ValueError, match="max_lines"):
        Infill(max_lines=0)
    assert isinstance(build("task", {"name": "infill", "seq_len": 64}), Infill)
    with pytest.raises(ConfigError, match="context"):
        build("task", {"name": "infill", "context": 8})  # not an infill argument
