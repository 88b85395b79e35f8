"""The README's Python examples run as written (a user policy from its own file)."""

import re
import sys
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_examples_run(tmp_path, monkeypatch):
    api, _, user_policy = _blocks()  # the API example, "Pretrained models", "Your own policy"
    (tmp_path / "my_policies.py").write_text(user_policy)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(README.parent)
    scope: dict = {}
    exec(compile(api, "README.md", "exec"), scope)
    out, ranks = scope["out"], scope["ranks"]
    assert torch.equal(out.ranks > 0, ranks > 0)

    import orderlab

    policy = orderlab.build("policy", {"_target_": "my_policies.TopTwoMargin", "k": 2})
    d = orderlab.decode(scope["exp"].model, policy, scope["x"], ranks)
    n = (ranks > 0).sum(1)
    assert torch.equal(d.nfe, (n + 1) // 2)  # two per step
    sys.modules.pop("my_policies", None)


def test_readme_pretrained_example_runs_on_a_tiny_folder(tmp_path):
    """The "Pretrained models" example, with its folders replaced by a tiny LLaDA-layout one
    (a real tokenizer, random weights) and the device by the CPU."""
    from pretrained_fixtures import write_checkpoint
    from tokenizer_fixtures import write_tokenizer

    folder = write_tokenizer(write_checkpoint(tmp_path / "llada", "llada", vocab_size=320, mask_token_id=8))
    code = _blocks()[1].replace("/models/LLaDA-8B-Instruct", str(folder)).replace('device="cuda"', 'device="cpu"')
    code = code.replace("/models/LLaDA-8B-adapted", str(tmp_path / "adapted"))
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["model"].mask_id == 8 and scope["tok"].vocab_size <= scope["model"].vocab_size
    assert (tmp_path / "adapted" / "tokenizer.json").exists() and (tmp_path / "adapted" / "model.safetensors").exists()
