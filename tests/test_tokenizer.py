"""orderlab.tokenizer: a model folder's tokenizer and chat template, checked against transformers."""

from __future__ import annotations

import json

import pytest

from orderlab.tokenizer import Tokenizer, TokenizerError
from tokenizer_fixtures import SPECIALS, write_tokenizer  # tests/tokenizer_fixtures.py

TEXT = "Question: Tom has 1,234 apples and eats 7.5 of them. #### 1,226.5 \\boxed{42} héllo wörld"

# Llama-3-Instruct's template: BOS written by the template, headers, <|eot_id|> ends a turn
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# ChatML (Qwen): indented block tags, so trim_blocks / lstrip_blocks shape the output
CHATML = """{% for message in messages %}
    {% if loop.first and message['role'] != 'system' %}
<|im_start|>system
You are a helpful assistant.<|im_end|>
    {% endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""
# refuses conversations that do not alternate user/assistant (Mistral/LLaDA style)
STRICT = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)
# the environment's extras: namespace, tojson (no HTML escaping), dict, loop controls, the
# generation tag, tools/documents passed as None, a missing key, special tokens by name
FEATURES = """{%- set ns = namespace(n=0, last='') -%}
{%- for m in messages -%}
  {%- if m.role == 'system' %}{% continue %}{% endif -%}
  {%- set ns.n = ns.n + 1 -%}{%- set ns.last = m.content -%}
  {%- if loop.index > 5 %}{% break %}{% endif -%}
  {%- if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}
  {%- else %}{{ m | tojson }}{{ dict(a=1, b='<&>') | tojson(sort_keys=True) }}{% endif %}
  {{ m.name is defined }}
{% endfor -%}
tools={{ tools is none }} documents={{ documents is defined and documents is none }} n={{ ns.n }}
{{ ns.last | upper }}|{{ pad_token }}|{{ unk_token is defined }}|{% if add_generation_prompt %}GO{% endif %}
{% for m in messages %}[{{ m.reasoning_content }}/{{ m.thinking }}/{{ m.reasoning }}]{% endfor %}"""

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "  What is 2 + 3? <b>now</b> é  "},
    {"role": "assistant", "content": "It is 5.", "name": None, "reasoning": "2 + 3 = 5"},
    {"role": "user", "content": "And 4 + 4?"},
]


@pytest.fixture(scope="module")
def transformers():
    tf = pytest.importorskip("transformers")
    tf.utils.logging.set_verbosity_error()
    return tf


def hf_tokenizer(transformers, folder):
    return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


# ---------------------------------------------------------------- ids


def test_round_trip_and_special_ids(tmp_path):
    tok = Tokenizer.from_folder(write_tokenizer(tmp_path / "m"))
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT and all(0 <= i < tok.vocab_size for i in ids)
    assert tok.vocab_size == 320 and not tok.has_chat_template
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.eos_ids) == (1, 2, 0, (2,))
    assert tok.token_id("<|eot_id|>") == SPECIALS.index("<|eot_id|>")
    assert tok.encode(TEXT) == tok.encode(TEXT, add_special_tokens=False)  # no post-processor, no flags
    assert tok.encode_batch([TEXT, "7"]) == [ids, tok.encode("7")]
    # special tokens stay whole, and decode drops them unless asked
    with_specials = tok.encode("<|bos|>hi 12<|eos|>")
    assert with_specials[0] == 1 and with_specials[-1] == 2
    assert tok.decode(with_specials) == "hi 12"
    assert tok.decode(with_specials, skip_special_tokens=False) == "<|bos|>hi 12<|eos|>"


def test_bos_comes_from_the_file_then_from_the_config_flags(tmp_path):
    in_file = Tokenizer.from_folder(write_tokenizer(tmp_path / "a", prepend_bos=True, add_bos_token=False))
    assert in_file.encode("hi")[0] == 1 and in_file.encode("hi", add_special_tokens=False)[0] != 1
    flags = Tokenizer.from_folder(write_tokenizer(tmp_path / "b", add_bos_token=True, add_eos_token=True))
    ids = flags.encode("hi")
    assert ids[0] == 1 and ids[-1] == 2 and ids[1:-1] == flags.encode("hi", add_special_tokens=False)


def test_end_ids_pad_fallback_dict_tokens_and_special_tokens_map(tmp_path):
    folder = write_tokenizer(tmp_path / "m", pad_token=None, eos_token={"content": "<|eos|>", "lstrip": False})
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    (folder / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<|im_start|>", "mask_token": "<|mask|>"}))
    tok = Tokenizer.from_folder(folder)
    assert tok.eos_ids == (2, 5) and tok.eos_id == 2 and tok.pad_id == 2  # no pad token: eos
    assert tok.bos_id == 1  # the config wins over special_tokens_map.json
    assert tok.special_tokens["mask_token"] == "<|mask|>"  # the map fills what the config lacks
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert Tokenizer.from_folder(folder).eos_ids == (2, 7)


def test_ids_equal_transformers(tmp_path, transformers):
    # a special token the vocabulary lacks gets a new id (vocab_size grows), as in transformers
    folder = write_tokenizer(tmp_path / "m", prepend_bos=True, eos_token="<|end_of_text|>")
    tok, hf = Tokenizer.from_folder(folder), hf_tokenizer(transformers, folder)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (
        len(hf), hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (321, 1, 320, 0)
    text = TEXT + "<|eot_id|> tail<|end_of_text|>"
    assert tok.encode(text) == hf.encode(text)
    assert tok.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)
    assert tok.decode(tok.encode(text)) == hf.decode(hf.encode(text), skip_special_tokens=True)


# ---------------------------------------------------------------- chat templates


@pytest.mark.parametrize("template", [LLAMA3, CHATML, FEATURES], ids=["llama3", "chatml", "features"])
@pytest.mark.parametrize("gen", [True, False], ids=["gen", "nogen"])
def test_chat_template_renders_as_transformers(tmp_path, transformers, template, gen):
    folder = write_tokenizer(tmp_path / "m", chat_template=template, unk_token=None)
    tok, hf = Tokenizer.from_folder(folder), hf_tokenizer(transformers, folder)
    for chat in (CHAT, CHAT[1:2]):
        ours = tok.apply_chat_template(chat, add_generation_prompt=gen)
        assert ours == hf.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False)
    assert tok.has_chat_template


def test_chat_template_expected_text(tmp_path):
    tok = Tokenizer.from_folder(write_tokenizer(tmp_path / "m", chat_template=CHATML))
    want = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.apply_chat_template([{"role": "user", "content": "Hi"}]) == want
    llama = Tokenizer.from_folder(write_tokenizer(tmp_path / "l", chat_template=LLAMA3))
    text = llama.apply_chat_template([{"role": "user", "content": " Hi "}])
    assert text == "<|bos|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>" \
                   "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ids = llama.encode(text, add_special_tokens=False)
    assert ids[0] == llama.bos_id and llama.token_id("<|eot_id|>") in ids


def test_raise_exception_in_a_template(tmp_path, transformers):
    folder = write_tokenizer(tmp_path / "m", chat_template=STRICT)
    tok, hf = Tokenizer.from_folder(folder), hf_tokenizer(transformers, folder)
    fine = CHAT[1:]
    assert tok.apply_chat_template(fine) == hf.apply_chat_template(fine, add_generation_prompt=True, tokenize=False)
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: chat template failed: Conversation roles"):
        tok.apply_chat_template(CHAT)  # starts with a system message
    with pytest.raises(Exception, match="Conversation roles must alternate"):
        hf.apply_chat_template(CHAT, tokenize=False)


def test_chat_template_jinja_file_wins_and_named_templates(tmp_path, transformers):
    folder = write_tokenizer(tmp_path / "m", chat_template=LLAMA3)
    (folder / "chat_template.jinja").write_text(CHATML, encoding="utf-8")
    tok, hf = Tokenizer.from_folder(folder), hf_tokenizer(transformers, folder)
    ours = tok.apply_chat_template(CHAT[1:2])
    assert ours.startswith("<|im_start|>system") and ours == hf.apply_chat_template(
        CHAT[1:2], add_generation_prompt=True, tokenize=False)

    named = [{"name": "default", "template": CHATML}, {"name": "tool_use", "template": LLAMA3}]
    folder = write_tokenizer(tmp_path / "n", chat_template=named)
    tok, hf = Tokenizer.from_folder(folder), hf_tokenizer(transformers, folder)
    for name in (None, "tool_use"):
        assert tok.apply_chat_template(CHAT[1:2], template=name) == hf.apply_chat_template(
            CHAT[1:2], chat_template=name, add_generation_prompt=True, tokenize=False)
    with pytest.raises(TokenizerError, match="no chat template named 'other'.*default, tool_use"):
        tok.apply_chat_template(CHAT[1:2], template="other")


def test_template_variables_override_and_sandbox(tmp_path):
    folder = write_tokenizer(tmp_path / "m", chat_template="{{ bos_token }}{{ enable_thinking | default(true) }}")
    tok = Tokenizer.from_folder(folder)
    assert tok.apply_chat_template(CHAT) == "<|bos|>True"
    assert tok.apply_chat_template(CHAT, enable_thinking=False, bos_token="B") == "BFalse"
    evil = [("{{ messages.__class__.__mro__ }}", "attribute '__class__' of 'list' object is unsafe"),
            ("{% set ns = namespace() %}{% set ns._x = 1 %}", "may not store '_x'"),
            ("{% set ns = namespace(_y=1) %}", "may not store '_y'")]
    for i, (template, why) in enumerate(evil):
        sandboxed = Tokenizer.from_folder(write_tokenizer(tmp_path / f"e{i}", chat_template=template))
        with pytest.raises(TokenizerError, match=f"chat template failed: .*{why}"):
            sandboxed.apply_chat_template(CHAT)


# ---------------------------------------------------------------- errors


def test_errors_name_the_file_and_the_problem(tmp_path):
    with pytest.raises(TokenizerError, match=r"nowhere/tokenizer\.json: no tokenizer\.json in missing folder"):
        Tokenizer.from_folder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match=r"empty/tokenizer\.json: no tokenizer\.json in folder"):
        Tokenizer.from_folder(tmp_path / "empty")
    folder = write_tokenizer(tmp_path / "m")
    tok = Tokenizer.from_folder(folder)
    with pytest.raises(TokenizerError, match=r"m: no chat template \(tokenizer_config\.json has no chat_template"):
        tok.apply_chat_template(CHAT)
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: no token '<nope>'"):
        tok.token_id("<nope>")
    (folder / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: not valid JSON"):
        Tokenizer.from_folder(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": 3}))
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: chat_template must be a string"):
        Tokenizer.from_folder(folder)
    (folder / "tokenizer_config.json").write_text("{}")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": "x"}))
    with pytest.raises(TokenizerError, match=r"generation_config\.json: eos_token_id must be an int"):
        Tokenizer.from_folder(folder)
