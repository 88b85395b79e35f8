"""The tokenizer of a local Hugging Face model folder, read without transformers.

A model folder holds

- ``tokenizer.json``: the fast tokenizer, loaded by the ``tokenizers`` library (required);
- ``tokenizer_config.json``: the named special tokens (``bos_token``, ``eos_token``, ...,
  each a string or a ``{"content": ...}`` dict), ``add_bos_token`` / ``add_eos_token`` and
  ``chat_template`` (a string, or a list of ``{"name", "template"}``);
- ``special_tokens_map.json`` (older folders): special tokens the config does not name;
- ``chat_template.jinja`` and ``additional_chat_templates/*.jinja`` (newer transformers
  save templates there; when present they replace the config's ``chat_template``);
- ``generation_config.json``: ``eos_token_id`` (an int or a list) adds end-of-text ids
  (Llama-3 instruct ends a turn with ``<|eot_id|>``, not its ``eos_token``).

They are read the way transformers (v5) reads them, so ids and rendered chat templates
equal the model's own tooling: named special tokens are added to the vocabulary as special
tokens (kept whole, dropped by ``decode(skip_special_tokens=True)``); ``tokenizer.json``'s
post-processor decides what ``encode`` adds (BOS for Llama-style folders), and only where it
has none do ``add_bos_token`` / ``add_eos_token`` build one (``[bos] $A [eos]``); a chat
template renders in a sandboxed jinja2 environment with ``trim_blocks`` and
``lstrip_blocks``, the ``loopcontrols`` extension, a pass-through ``{% generation %}`` tag,
the ``tojson`` filter without HTML escaping, the globals ``raise_exception`` and
``strftime_now``, and the variables ``messages``, ``tools`` and ``documents`` (None),
``add_generation_prompt`` and every named special token (``bos_token``, ``eos_token``, ...);
a message's reasoning, under any of ``reasoning_content``, ``thinking``, ``reasoning``, is
seen under the first two as well. Not supported: tools given as Python functions (pass
JSON schemas as a ``tools=`` variable).

Every error is a :class:`TokenizerError` (a ``ValueError``), one line naming the file and
what is wrong.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import AddedToken
from tokenizers import Tokenizer as _Backend
from tokenizers.processors import TemplateProcessing

__all__ = ["Tokenizer", "TokenizerError", "SPECIAL_NAMES", "render_chat_template"]

# the named special tokens transformers passes to a chat template (its SPECIAL_TOKENS_ATTRIBUTES)
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_ADDED_TOKEN_KEYS = ("single_word", "lstrip", "rstrip", "normalized")


class TokenizerError(ValueError):
    """A model folder's tokenizer files are missing or wrong, or a chat template failed."""


# --------------------------------------------------------------------------- files


def _read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; ``{}`` if the file does not exist."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_content(value: Any, where: str) -> str | None:
    """A special token's string: written as a string or as an AddedToken dict ``{"content": ...}``."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"{where}: expected a string or {{'content': ...}}, got {value!r}")


def _special_tokens(folder: Path, config: Mapping[str, Any]) -> dict[str, Any]:
    """``name -> raw value`` of the named special tokens that are set.

    ``tokenizer_config.json`` wins; ``special_tokens_map.json`` fills names the config does
    not mention; a dict ``extra_special_tokens`` (``{"image_token": ...}``) adds names, as
    transformers treats those as named tokens too.
    """
    extra = config.get("extra_special_tokens")
    names = [*SPECIAL_NAMES, *(extra if isinstance(extra, Mapping) else ())]
    found = {n: config[n] for n in SPECIAL_NAMES if n in config}
    if isinstance(extra, Mapping):
        found.update(extra)
    for n, v in _read_json(folder / "special_tokens_map.json").items():
        if n in names and n not in found:
            found[n] = v
    return {n: v for n, v in found.items() if v is not None}


def _chat_templates(folder: Path, config: Mapping[str, Any]) -> tuple[dict[str, str], Path | None]:
    """``(name -> template, the file they come from)``; ``({}, None)`` if the folder has none.

    ``chat_template.jinja`` (name "default") and ``additional_chat_templates/<name>.jinja``
    replace the config's ``chat_template`` when any exists, as in transformers.
    """
    files = [folder / "chat_template.jinja", *sorted((folder / "additional_chat_templates").glob("*.jinja"))]
    files = [f for f in files if f.is_file()]
    if files:
        named = {("default" if f.name == "chat_template.jinja" else f.stem): f for f in files}
        return {n: f.read_text(encoding="utf-8") for n, f in named.items()}, files[0]
    where = folder / "tokenizer_config.json"
    value = config.get("chat_template")
    if value is None:
        return {}, None
    if isinstance(value, str):
        return {"default": value}, where
    if isinstance(value, list) and all(isinstance(t, Mapping) and {"name", "template"} <= set(t) for t in value):
        return {t["name"]: t["template"] for t in value}, where
    raise TokenizerError(f"{where}: chat_template must be a string or a list of {{'name', 'template'}}, got {value!r}")


def _end_ids(folder: Path) -> list[int]:
    """``generation_config.json``'s ``eos_token_id`` (an int or a list) as a list."""
    value = _read_json(folder / "generation_config.json").get("eos_token_id")
    ids = [] if value is None else value if isinstance(value, list) else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise TokenizerError(f"{folder / 'generation_config.json'}: eos_token_id must be an int or a list of ints, "
                             f"got {value!r}")
    return ids


# --------------------------------------------------------------------------- chat templates


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` renders its body unchanged (transformers
    uses the tag to mark assistant tokens; rendering does not depend on it)."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    """A template's way to refuse a conversation (e.g. roles that do not alternate)."""
    raise jinja2.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """``json.dumps`` with jinja's options: unlike jinja's own filter, no HTML escaping."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    """Today's date in a template (Llama-3.1 writes "Today Date: ...")."""
    return datetime.now().strftime(fmt)


class _Dict:
    """The template's ``dict``: builds plain dicts, exposes nothing of the ``dict`` type."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, keys: Iterable[Any], value: Any = None) -> dict:
        return dict.fromkeys(keys, value)


class _Namespace(jinja2.utils.Namespace):
    """The template's ``namespace``: no attribute starting with ``_`` may be stored (templates
    are untrusted code; underscore names reach interpreter internals)."""

    def __init__(*args: Any, **kwargs: Any):  # noqa: N805 (jinja's signature: ``self`` may be a keyword)
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template may not store {name!r} on a namespace")


@functools.lru_cache(maxsize=1)
def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_Dict(),
                       namespace=_Namespace)
    return env


@functools.lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    return _environment().from_string(template)


_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")  # the first is what templates read


def _plain_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Copies of the messages without keys whose value is None (templates test for a key,
    and an OpenAI-style ``content=None`` would render as "None"), a reasoning text under
    ``reasoning_content`` and ``thinking`` too (Qwen3 reads the first, gpt-oss the second)."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise TypeError(f"message {i} must be a mapping with 'role' and 'content', got {type(m).__name__}")
        m = {k: v for k, v in m.items() if v is not None}
        reasoning = next((m[k] for k in _REASONING_KEYS if k in m), None)
        out.append(m if reasoning is None else {"thinking": reasoning, **m, "reasoning_content": reasoning})
    return out


def render_chat_template(template: str, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                         **variables: Any) -> str:
    """``template`` rendered for ``messages`` as transformers renders it (module docstring);
    ``variables``: the special tokens and any template switch (``enable_thinking=False``)."""
    values = {"tools": None, "documents": None, **variables}
    return _compile(template).render(messages=_plain_messages(messages), add_generation_prompt=add_generation_prompt,
                                     **values)


# --------------------------------------------------------------------------- the tokenizer


class Tokenizer:
    """A model folder's tokenizer: ids, special ids and the chat template.

    Build it with :meth:`from_folder`. ``vocab_size`` counts added tokens (the ids
    ``encode`` can return are ``0..vocab_size-1``); ``eos_ids`` are every end-of-text id
    (the config's ``eos_token`` first, then ``generation_config.json``'s); ``pad_id`` falls
    back to ``eos_id`` when the folder names no pad token.
    """

    def __init__(self, backend: _Backend, special_tokens: Mapping[str, str], end_ids: Sequence[int] = (),
                 chat_templates: Mapping[str, str] | None = None, source: str = "tokenizer",
                 template_source: str | None = None):
        self._tok = backend
        self.special_tokens = dict(special_tokens)  # name -> string, e.g. {"eos_token": "</s>"}
        self.source = source  # the folder, for error messages
        self.chat_templates = dict(chat_templates or {})
        self._template_source = template_source or source
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        ids = {n: self.token_id(t) for n, t in self.special_tokens.items()}
        self.bos_id: int | None = ids.get("bos_token")
        ends = [i for i in (ids.get("eos_token"), *end_ids) if i is not None]
        self.eos_ids: tuple[int, ...] = tuple(dict.fromkeys(ends))  # ordered, without repeats
        self.eos_id: int | None = self.eos_ids[0] if self.eos_ids else None
        self.pad_id: int | None = ids.get("pad_token", self.eos_id)

    @classmethod
    def from_folder(cls, path: str | Path) -> Tokenizer:
        """The tokenizer of the Hugging Face model folder ``path`` (module docstring)."""
        folder = Path(path)
        file = folder / "tokenizer.json"
        if not file.is_file():
            what = "folder" if folder.is_dir() else "missing folder"
            raise TokenizerError(f"{file}: no tokenizer.json in {what} {folder} (a Hugging Face fast tokenizer "
                                 "is needed; slow-only folders are not supported)")
        try:
            backend = _Backend.from_file(str(file))
        except Exception as e:  # the Rust side raises plain Exceptions
            raise TokenizerError(f"{file}: cannot be read by the tokenizers library ({e})") from None
        config = _read_json(folder / "tokenizer_config.json")
        raw = _special_tokens(folder, config)
        where = str(folder / "tokenizer_config.json")
        specials = {n: _token_content(v, f"{where} {n}") for n, v in raw.items()}
        _add_special_tokens(backend, raw)
        _set_post_processor(backend, config, specials)
        templates, template_file = _chat_templates(folder, config)
        return cls(backend, specials, _end_ids(folder), templates, source=str(folder),
                   template_source=str(template_file) if template_file else None)

    def __repr__(self) -> str:
        return (f"Tokenizer({self.source!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_ids={list(self.eos_ids)}, pad_id={self.pad_id}, chat_template={self.has_chat_template})")

    # ----------------------------------------------------------------- ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of ``text``; ``add_special_tokens``: the post-processor's (BOS for Llama-style)."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """:meth:`encode` of many texts at once (the library's parallel batch encoder)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (ints or a 1-d tensor); special tokens dropped unless asked for."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int:
        """The id of the token string ``token`` (a special token such as ``"<|eot_id|>"``)."""
        i = self._tok.token_to_id(token)
        if i is None:
            raise TokenizerError(f"{self.source}/tokenizer.json: no token {token!r} in the vocabulary")
        return i

    # ----------------------------------------------------------------- chat

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_templates)

    def chat_template(self, name: str | None = None) -> str:
        """The template ``name``, or the folder's only / ``"default"`` one."""
        if not self.chat_templates:
            raise TokenizerError(f"{self.source}: no chat template (tokenizer_config.json has no chat_template and "
                                 "there is no chat_template.jinja)")
        if name is None and len(self.chat_templates) == 1:
            return next(iter(self.chat_templates.values()))
        key = "default" if name is None else name
        if key not in self.chat_templates:
            raise TokenizerError(f"{self._template_source}: no chat template named {key!r} "
                                 f"(templates: {', '.join(sorted(self.chat_templates))})")
        return self.chat_templates[key]

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            template: str | None = None, **variables: Any) -> str:
        """The conversation ``messages`` (``[{"role": "user", "content": ...}, ...]``) as text.

        Equal to transformers' ``apply_chat_template(messages, tokenize=False, ...)``; encode
        the result with ``add_special_tokens=False`` (templates write BOS themselves).
        ``template`` names one of several templates; ``variables`` reach the template too
        (``enable_thinking=False``) and override the special tokens of the same name.
        """
        text = self.chat_template(template)
        try:
            return render_chat_template(text, messages, add_generation_prompt, **{**self.special_tokens, **variables})
        except jinja2.TemplateError as e:
            raise TokenizerError(f"{self._template_source}: chat template failed: {e}") from e


def _add_special_tokens(backend: _Backend, raw: Mapping[str, Any]) -> None:
    """Add the named special tokens the backend does not hold as added tokens yet: an id of
    its own for a new string, its vocabulary id marked special otherwise (as transformers)."""
    added = {t.content for t in backend.get_added_tokens_decoder().values()}
    new = []
    for value in raw.values():
        content = value["content"] if isinstance(value, Mapping) else value
        if content in added:
            continue
        flags = {k: value[k] for k in _ADDED_TOKEN_KEYS if isinstance(value, Mapping) and k in value}
        new.append(AddedToken(content, special=True, **{"normalized": False, **flags}))
        added.add(content)
    if new:
        backend.add_special_tokens(new)


def _set_post_processor(backend: _Backend, config: Mapping[str, Any], specials: Mapping[str, str]) -> None:
    """What ``encode(add_special_tokens=True)`` adds: ``tokenizer.json``'s post-processor when
    it has one (transformers v5 then ignores the config's flags too); otherwise ``[bos] $A
    [eos]`` from the config's ``add_bos_token`` / ``add_eos_token`` (a flag whose token is
    not set is off), as transformers' Llama tokenizers did (v5 would add nothing there)."""
    if backend.post_processor is not None:
        return
    bos = [specials["bos_token"]] if config.get("add_bos_token") and specials.get("bos_token") else []
    eos = [specials["eos_token"]] if config.get("add_eos_token") and specials.get("eos_token") else []
    single = " ".join([*(f"{t}:0" for t in bos), "$A:0", *(f"{t}:0" for t in eos)])
    pair = " ".join([single, *(f"{t}:1" for t in bos), "$B:1", *(f"{t}:1" for t in eos)])
    tokens = {t: backend.token_to_id(t) for t in (*bos, *eos)}
    backend.post_processor = TemplateProcessing(single=single, pair=pair, special_tokens=list(tokens.items()))
