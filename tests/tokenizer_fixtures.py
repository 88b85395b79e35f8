"""Small real tokenizers in Hugging Face model folders, for tests (nothing downloaded).

    from tests.tokenizer_fixtures import write_tokenizer   # or: from tokenizer_fixtures import ...
    folder = write_tokenizer(tmp_path / "model")             # tokenizer.json + tokenizer_config.json
    folder = write_tokenizer(tmp_path / "m", chat_template=CHATML, add_bos_token=True)

The tokenizer is a byte-level BPE (GPT-2 / Llama-3 / Qwen style) trained in a few
milliseconds on ``words``, with digits split one by one, so any text (numbers, ``####``,
``\\boxed{}``) encodes and decodes back exactly. ``specials`` get the first ids
(``0..len(specials)-1``, in order) as special added tokens; 256 byte tokens and merges
follow, up to ``vocab_size`` ids in all. The same arguments always give the same file.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

__all__ = ["write_tokenizer", "WORDS", "SPECIALS", "CONFIG"]

# invented sentences: the merges the BPE learns (any other text still encodes, byte by byte)
WORDS = (
    "Question: A farmer has 12 goats and buys 7 more. How many goats does the farmer have?",
    "Answer: The farmer has 12 + 7 = 19 goats.\n#### 19",
    "Question: Tom reads 3 pages a day for 14 days. How many pages does he read?",
    "Answer: He reads 3 * 14 = 42 pages. The answer is \\boxed{42}.\n#### 42",
    "The total is $1,234.50 and the rest is 0.5 of it.",
    "user assistant system: you are a helpful assistant. Hello, how are you? I am fine, thank you!",
)
# special tokens of the common chat formats (Llama-3 headers, ChatML) and a [MASK]
SPECIALS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
            "<|im_start|>", "<|im_end|>", "<|mask|>")
# tokenizer_config.json defaults; keyword arguments of write_tokenizer override them (None: omitted)
CONFIG = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|eos|>",
          "pad_token": "<|pad|>"}


def write_tokenizer(folder: str | Path, words: Sequence[str] = WORDS, specials: Sequence[str] = SPECIALS,
                    chat_template: str | list | None = None, vocab_size: int = 320, prepend_bos: bool = False,
                    **config: Any) -> Path:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``folder`` (made if needed)
    and return it.

    ``words``: training text of the BPE merges. ``specials``: special token strings, ids
    ``0..len(specials)-1``. ``chat_template``: written as the config's ``chat_template`` (a
    string, or a list of ``{"name", "template"}``). ``prepend_bos``: ``tokenizer.json``'s
    post-processor puts the config's ``bos_token`` first (as Llama-3's file does); without
    it the file has no post-processor. ``config``: other ``tokenizer_config.json``
    keys (``bos_token``, ``eos_token``, ``pad_token``, ``add_bos_token``, ...) over
    :data:`CONFIG`; a key set to None is left out of the file. Other files
    (``generation_config.json``, ``chat_template.jinja``) are the caller's to write.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(words), trainer)
    values = {**CONFIG, **config, "chat_template": chat_template}
    if prepend_bos:
        bos = values["bos_token"]["content"] if isinstance(values["bos_token"], dict) else values["bos_token"]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({k: v for k, v in values.items() if v is not None}, indent=2), encoding="utf-8"
    )
    return folder
