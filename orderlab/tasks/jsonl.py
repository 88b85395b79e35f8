"""Question answering from a local JSONL file (GSM8K's layout) for pretrained checkpoints.

Each line is a JSON object with a question and a reference answer (``question`` and
``answer`` by default; GSM8K's answers end in ``#### <number>``). ``path`` is one ``.jsonl``
file, split into train / valid / test by a hash of the question (``hash_split``'s buckets:
~80/10/10, fixed whatever the file order), or a folder holding ``train.jsonl``,
``test.jsonl`` and optionally ``valid.jsonl`` (without it, valid is carved out of
``train.jsonl`` by the same hash; a missing train or test file leaves that split empty).

A row is LLaDA's fixed-length layout::

    [ left padding (rank -1, pad id) | prompt (rank 0) | gen_length positions (rank 1) ]

The prompt is ``prompt.format(question=..., <other fields>)``, wrapped in the tokenizer's
chat template as one user message when ``chat`` (encoded without the tokenizer's own
special tokens, since templates write BOS themselves), else encoded with them. The
generated positions hold the tokenized reference answer, then end-of-text up to
``gen_length``, so ``log_likelihood`` of a batch scores the reference; a reference longer
than ``gen_length`` is cut there, and such rows are still scored on the reference's full
text (looked up by their prompt). Every row has ``seq_len = max_prompt_len + gen_length``.

``score`` decodes the generated region of ``pred`` up to its first end-of-text id, extracts
an answer with the first of ``extract``'s extractors that finds one (``hash``: after
``####``; ``boxed``: the last ``\\boxed{...}``; ``last_number``), extracts the reference the
same way, and compares them after number normalisation (``$``, commas, surrounding spaces,
a trailing ``.`` or ``.0`` go): exact match as a float.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from orderlab import ranks as R
from orderlab.registry import ConfigError, register
from orderlab.tasks.base import SPLITS, Task, empirical_freqs, hash_split, split_generator, split_index, token_accuracy
from orderlab.tokenizer import Tokenizer

__all__ = ["JsonlTask", "Example", "EXTRACTORS", "hash_answer", "boxed_answer", "last_number", "normalize_answer",
           "extract_answer", "read_jsonl", "hash_splits"]

# --------------------------------------------------------------------------- answers

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")  # 42, -3.5, 1,234, $18
_PLAIN_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def hash_answer(text: str) -> str | None:
    """GSM8K's final answer: after the last ``####``, its first number, else the rest of that
    line; None without ``####`` or with nothing after it."""
    if "####" not in text:
        return None
    rest = text.rsplit("####", 1)[1].strip().split("\n", 1)[0]
    number = _NUMBER.search(rest)
    return number.group() if number else rest.strip() or None


def boxed_answer(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (braces inside balanced); None if there is none
    or it is not closed."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth < 0:
            return text[begin:i].strip() or None
    return None


def last_number(text: str) -> str | None:
    """The last number in ``text`` (``1,234``, ``-3.5``, ``$18``); None if there is none."""
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    "hash": hash_answer,
    "boxed": boxed_answer,
    "last_number": last_number,
}


def normalize_answer(answer: str) -> str:
    """A number in one canonical form (``"$1,234.50 "`` and ``"1234.5"`` both give ``"1234.5"``,
    ``"72.0"`` gives ``"72"``); anything else stripped of surrounding spaces and a final ``.``."""
    text = answer.strip().rstrip(".").strip()
    plain = re.sub(r",|\\?\$", "", text).strip()
    if not _PLAIN_NUMBER.fullmatch(plain):
        return text
    try:
        d = Decimal(plain)
    except InvalidOperation:  # pragma: no cover (the regex admits only decimals)
        return text
    return str(int(d)) if d == d.to_integral_value() else format(d.normalize(), "f")


def extract_answer(text: str, extractors: Sequence[Callable[[str], str | None]]) -> str | None:
    """The normalised answer of the first extractor that finds one; None if none does."""
    for extract in extractors:
        found = extract(text)
        if found is not None:
            return normalize_answer(found)
    return None


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Example:
    """One line of a JSONL file: where it is, its texts, and their ids (``prompt`` with the
    chat template and special tokens; ``reference`` the whole answer, not cut)."""

    file: Path
    line: int  # 1-based
    question: str
    answer: str
    prompt: tuple[int, ...]
    reference: tuple[int, ...]


def read_jsonl(file: Path) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` of every non-blank line of ``file``."""
    rows = []
    with open(file, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{file} line {n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{file} line {n}: expected a JSON object, got {type(row).__name__}")
            rows.append((n, row))
    return rows


def _text(row: Mapping[str, Any], field: str, key: str, file: Path, line: int) -> str:
    """``row[field]`` as text (numbers allowed); a missing field is an error naming the
    YAML ``key`` that chose it, the file and the line."""
    if field not in row:
        raise ConfigError(key, f"{file} line {line}: no field {field!r} (fields: {', '.join(row)})")
    value = row[field]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ConfigError(key, f"{file} line {line}: field {field!r} must be text or a number, "
                               f"got {type(value).__name__}")
    return str(value)


def hash_splits(questions: Sequence[str]) -> list[str]:
    """The split of each question: ``hash_split`` of its SHA-1 (first 31 bits), ~80/10/10,
    a fixed function of the text (not of the file order or the other lines)."""
    h = [int.from_bytes(hashlib.sha1(q.encode("utf-8")).digest()[:4], "big") >> 1 for q in questions]
    return [SPLITS[i] for i in hash_split(torch.tensor(h, dtype=torch.long).reshape(-1, 1)).tolist()]


def _train_or_valid(questions: Sequence[str]) -> list[str]:
    """A train file without a valid file beside it: valid is its questions hashed to valid."""
    return ["valid" if s == "valid" else "train" for s in hash_splits(questions)]


def _split_files(path: Path) -> list[tuple[Path, Callable[[Sequence[str]], list[str]]]]:
    """``(file, questions -> their splits)`` of every file to read under ``path``."""
    if path.is_file():
        return [(path, hash_splits)]
    if not path.is_dir():
        raise ValueError(f"{path}: no such file or folder")
    present = [s for s in SPLITS if (path / f"{s}.jsonl").is_file()]
    if not present:
        raise ValueError(f"{path}: the folder has none of train.jsonl, valid.jsonl, test.jsonl")
    carve = "valid" not in present
    return [(path / f"{s}.jsonl", _train_or_valid if s == "train" and carve else lambda qs, s=s: [s] * len(qs))
            for s in present]


# --------------------------------------------------------------------------- the task


@register("task", "jsonl")
class JsonlTask(Task):
    """Questions and reference answers from a local JSONL file (module docstring).

    ``tokenizer``: a Hugging Face model folder (or a built :class:`Tokenizer`); the task's
    ``vocab_size``, ``eos_id`` and ``pad_id`` are its. ``chat``: wrap prompts in its chat
    template (None: when it has one). ``max_prompt_len``: None for the longest prompt of
    the data; a longer prompt is an error naming its line.

    ``batch(n, split, seed)``: seed 0 takes the first ``n`` examples of the split in file
    order (``evaluate``'s default seed scores the first ``n`` test questions, as papers
    report); any other seed the first ``n`` of a permutation drawn from
    ``split_generator(split, seed)`` (training batches, other test subsets).
    """

    metric = "exact_match"

    def __init__(
        self,
        path: str,
        tokenizer: str | Tokenizer,
        question_field: str = "question",
        answer_field: str = "answer",
        prompt: str = "{question}",
        chat: bool | None = None,
        gen_length: int = 256,
        max_prompt_len: int | None = None,
        extract: Sequence[str] = ("hash", "boxed", "last_number"),
    ):
        if gen_length < 1:
            raise ConfigError("gen_length", f"must be >= 1, got {gen_length}")
        if max_prompt_len is not None and max_prompt_len < 1:
            raise ConfigError("max_prompt_len", f"must be >= 1 or null, got {max_prompt_len}")
        unknown = [e for e in extract if e not in EXTRACTORS]
        if unknown or not extract:
            raise ConfigError("extract", f"unknown extractors {unknown} (valid: {', '.join(EXTRACTORS)})"
                                         if unknown else "needs at least one extractor")
        self.path = Path(path)
        self.tokenizer = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.from_folder(tokenizer)
        if self.tokenizer.eos_id is None:
            raise ValueError(f"{self.tokenizer.source}: the tokenizer has no end-of-text token (tokenizer_config.json "
                             "eos_token or generation_config.json eos_token_id), which ends every answer")
        self.question_field, self.answer_field, self.prompt = question_field, answer_field, prompt
        self.chat = self.tokenizer.has_chat_template if chat is None else chat
        self.gen_length = gen_length
        self.extract = tuple(extract)
        self._extractors = tuple(EXTRACTORS[e] for e in self.extract)
        self.vocab_size = self.tokenizer.vocab_size
        self.eos_id = self.tokenizer.eos_id
        self.pad_id = self.tokenizer.pad_id
        self.end_ids = self.tokenizer.eos_ids  # every id that ends a generation
        self.splits = self._load()
        longest = max((len(ex.prompt) for exs in self.splits.values() for ex in exs), default=1)
        self.max_prompt_len = longest if max_prompt_len is None else max_prompt_len
        self._check_prompt_lengths()
        self.seq_len = self.max_prompt_len + gen_length
        self._full_answers = self._cut_references()
        self._rows: dict[str, tuple[Tensor, Tensor]] = {}
        self._freqs: Tensor | None = None

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={len(self.splits[s])}" for s in SPLITS)
        return (f"JsonlTask({str(self.path)!r}, {sizes}, chat={self.chat}, max_prompt_len={self.max_prompt_len}, "
                f"gen_length={self.gen_length}, vocab_size={self.vocab_size})")

    # ----------------------------------------------------------------- loading

    def _prompt_text(self, row: Mapping[str, Any], question: str, file: Path, line: int) -> str:
        try:
            text = self.prompt.format_map({**row, "question": question})
        except (KeyError, IndexError) as e:
            raise ConfigError("prompt", f"{file} line {line}: the prompt names {e} which the line lacks "
                                        f"(fields: {', '.join(row)})") from None
        if self.chat:
            return self.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        return text

    def _load(self) -> dict[str, list[Example]]:
        """Every example, by split, in file order; all prompts and answers tokenized at once."""
        out: dict[str, list[Example]] = {s: [] for s in SPLITS}
        for file, assign in _split_files(self.path):
            rows = read_jsonl(file)
            texts = [(n, row, _text(row, self.question_field, "question_field", file, n),
                      _text(row, self.answer_field, "answer_field", file, n)) for n, row in rows]
            prompts = [self._prompt_text(row, q, file, n) for n, row, q, _ in texts]
            prompt_ids = self.tokenizer.encode_batch(prompts, add_special_tokens=not self.chat)
            answer_ids = self.tokenizer.encode_batch([a for *_, a in texts], add_special_tokens=False)
            splits = assign([q for _, _, q, _ in texts])
            for (n, _, q, a), p, r, split in zip(texts, prompt_ids, answer_ids, splits):
                out[split].append(Example(file, n, q, a, tuple(p), tuple(r)))
        return out

    def _check_prompt_lengths(self) -> None:
        for exs in self.splits.values():
            for ex in exs:
                if len(ex.prompt) > self.max_prompt_len:
                    raise ConfigError("max_prompt_len", f"{ex.file} line {ex.line}: the prompt has "
                                                        f"{len(ex.prompt)} tokens, more than {self.max_prompt_len}")

    def _cut_references(self) -> dict[tuple[int, ...], str | None]:
        """Prompt ids -> full answer text of the examples whose reference is cut at
        ``gen_length`` (None where two such examples share a prompt: scored on the tokens)."""
        out: dict[tuple[int, ...], str | None] = {}
        for exs in self.splits.values():
            for ex in exs:
                if len(ex.reference) > self.gen_length:
                    out[ex.prompt] = ex.answer if out.get(ex.prompt, ex.answer) == ex.answer else None
        return out

    # ----------------------------------------------------------------- rows

    def examples(self, split: str) -> list[Example]:
        split_index(split)
        return self.splits[split]

    def rows(self, split: str) -> tuple[Tensor, Tensor]:
        """``(tokens Long[N, L], ranks Long[N, L])`` of every example of ``split``, in file
        order (built once per split)."""
        if split not in self._rows:
            exs = self.examples(split)
            P, G = self.max_prompt_len, self.gen_length
            tokens = torch.full((len(exs), self.seq_len), self.pad_id, dtype=torch.long)
            ranks = torch.full((len(exs), self.seq_len), R.PAD, dtype=torch.long)
            for i, ex in enumerate(exs):
                tokens[i, P - len(ex.prompt) : P] = torch.tensor(ex.prompt, dtype=torch.long)
                ranks[i, P - len(ex.prompt) : P] = R.GIVEN
                ref = list(ex.reference[:G])
                tokens[i, P:] = torch.tensor(ref + [self.eos_id] * (G - len(ref)), dtype=torch.long)
            ranks[:, P:] = 1
            self._rows[split] = (tokens, ranks)
        return self._rows[split]

    def batch(self, n: int, split: str = "train", seed: int = 0) -> tuple[Tensor, Tensor]:
        tokens, ranks = self.rows(split)
        N = tokens.shape[0]
        if not 1 <= n <= N:
            raise ValueError(f"{self.path}: split {split!r} has {N} examples; cannot take n={n}")
        idx = torch.arange(n) if seed == 0 else torch.randperm(N, generator=split_generator(split, seed))[:n]
        return tokens[idx], ranks[idx]

    # ----------------------------------------------------------------- scoring

    def _until_end(self, ids: list[int]) -> list[int]:
        """``ids`` up to (not including) the first end-of-text id."""
        ends = set(self.end_ids)
        return next((ids[:i] for i, t in enumerate(ids) if t in ends), ids)

    def generated_text(self, tokens: Tensor, ranks: Tensor) -> list[str]:
        """Per row, the generated positions (rank >= 1) decoded up to the first end-of-text id."""
        gen = R.to_generate(ranks)  # [B, L]
        return [self.tokenizer.decode(self._until_end(t[g].tolist())) for t, g in zip(tokens.cpu(), gen.cpu())]

    def answers(self, pred: Tensor, tokens: Tensor, ranks: Tensor) -> tuple[list[str | None], list[str | None]]:
        """``(predicted, reference)`` normalised answers per row (None: none found)."""
        R.validate(ranks, tokens)
        if pred.shape != tokens.shape:
            raise ValueError(f"pred must have the shape of tokens {tuple(tokens.shape)}, got {tuple(pred.shape)}")
        refs = self.generated_text(tokens, ranks)
        for b, (t, r) in enumerate(zip(tokens.cpu(), ranks.cpu())):
            full = self._full_answers.get(tuple(t[r == R.GIVEN].tolist()))
            refs[b] = full if full is not None else refs[b]
        got = [extract_answer(text, self._extractors) for text in self.generated_text(pred, ranks)]
        return got, [extract_answer(text, self._extractors) for text in refs]

    def score(self, pred: Tensor, tokens: Tensor, ranks: Tensor) -> Tensor:
        """Float ``[B]``: 1.0 where the answer extracted from ``pred`` equals the reference's."""
        got, want = self.answers(pred, tokens, ranks)
        return torch.tensor([float(g is not None and g == w) for g, w in zip(got, want)])

    def metrics(self, pred: Tensor, tokens: Tensor, ranks: Tensor) -> dict[str, Tensor]:
        """``exact_match``, ``token_accuracy``, ``answered`` (an answer was found in ``pred``)
        and ``answer_tokens`` (generated tokens before the first end-of-text), per row."""
        got, want = self.answers(pred, tokens, ranks)
        gen = R.to_generate(ranks).cpu()
        lengths = [len(self._until_end(p[g].tolist())) for p, g in zip(pred.cpu(), gen)]
        return {
            self.metric: torch.tensor([float(g is not None and g == w) for g, w in zip(got, want)]),
            "token_accuracy": token_accuracy(pred, tokens, ranks),
            "answered": torch.tensor([float(g is not None) for g in got]),
            "answer_tokens": torch.tensor(lengths, dtype=torch.float),
        }

    # ----------------------------------------------------------------- the rest

    def token_freqs(self) -> Tensor:
        """Frequencies over the train examples' prompt and reference ids, one end-of-text per
        example (not the padding, not the end-of-text filling)."""
        if self._freqs is None:
            exs = self.examples("train")
            if not exs:
                raise ValueError(f"{self.path}: no train examples to count token frequencies over")
            ids = [t for ex in exs for t in (*ex.prompt, *ex.reference, self.eos_id)]
            self._freqs = empirical_freqs(torch.tensor(ids, dtype=torch.long), self.vocab_size)
        return self._freqs.clone()

    def render(self, tokens: Tensor) -> str:
        """The row as text, special tokens shown: leading padding and trailing end-of-text
        dropped; ids outside the vocabulary (the mask id) shown as ``[MASK]``."""
        ids = tokens.tolist()
        lead = next((i for i, t in enumerate(ids) if t != self.pad_id), len(ids))
        trail = next((i for i in range(len(ids), lead, -1) if ids[i - 1] not in self.end_ids), lead)
        out, run = [], []
        for t in ids[lead:trail]:
            if 0 <= t < self.vocab_size:
                run.append(t)
                continue
            out += [self.tokenizer.decode(run, skip_special_tokens=False), "[MASK]"]
            run = []
        return "".join([*out, self.tokenizer.decode(run, skip_special_tokens=False)])
