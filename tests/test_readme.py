"""The README's Python examples run as written (a user policy from its own file)."""

import re
import sys
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_examples_run(tmp_path, monkeypatch):
    api, user_policy = _blocks()
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
