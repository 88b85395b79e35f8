"""What a learned policy adds to a decode step (issue 8: at most 10% at batch 32).

The main job's denoiser (experiments/learned_policy.yaml: the chain task, a bidirectional
3-layer d128 transformer, 12 positions to generate), batch 32, one position per step for
every policy so that all decode the same number of steps and ``x baseline`` is the
per-step cost: the ``top_prob`` heuristic (the group's baseline) against learned
Plackett–Luce top-1 policies (greedy) with an MLP (the main job's net) and the one-block
transformer net over the same features.
"""

from __future__ import annotations

import pytest
import torch

from conftest import run
from orderlab import build
from orderlab.decoding import decode
from orderlab.tasks import Chain

BATCH = 32
NETS = {
    "learned, mlp 64x2 (the main job's net)": {"name": "mlp", "hidden": 64, "layers": 2},
    "learned, transformer d32": {"name": "transformer", "d_model": 32, "heads": 4},
}


@pytest.fixture(scope="module")
def setup():
    task = Chain()
    torch.manual_seed(0)
    model = build("model", {"name": "transformer", "d_model": 128, "n_layers": 3, "n_heads": 4,
                            "attention": {"name": "bidirectional"}}, vocab_size=task.vocab_size, max_len=task.seq_len).eval()
    x, r = task.batch(BATCH, split="test")
    return model, x, r, int((r >= 1).sum(1).max())  # decode masks the positions to generate itself


def _policy(net):
    policy = build("policy", {"name": "learned_plackett_luce", "k": 1, "net": net})
    with torch.no_grad():
        for p in policy.parameters():
            p.normal_(0, 0.3)  # not the all-equal initial logits
    return policy.eval()


def test_heuristic(benchmark, setup):
    model, x, r, steps = setup
    benchmark.group = f"policy overhead B={BATCH}"
    out = run(benchmark, lambda: decode(model, build("policy", "top_prob"), x, r), "top_prob (heuristic)",
              baseline=True, rounds=5, steps=steps, tokens=BATCH * steps)
    assert out.steps == steps


@pytest.mark.parametrize("label", list(NETS))
def test_learned(benchmark, setup, label):
    model, x, r, steps = setup
    benchmark.group = f"policy overhead B={BATCH}"
    policy = _policy(NETS[label])
    with torch.no_grad():
        out = run(benchmark, lambda: decode(model, policy, x, r), label, rounds=5, steps=steps, tokens=BATCH * steps)
    assert out.steps == steps  # one position per step, as the baseline: x baseline is per step
