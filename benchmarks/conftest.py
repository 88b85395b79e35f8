"""pytest-benchmark setup of the speed benchmarks (``python -m pytest benchmarks/ --benchmark-only``).

The repository's ``addopts`` disable benchmarks (``--benchmark-disable``) so that the unit
tests never time anything; running this folder turns them back on. At the end of the run
the ratio tables (``benchmarks/tables.py``) are printed, each row against its group's
baseline measured in the same run. The default ``pytest`` run does not collect this
folder (``testpaths = ["tests"]``).
"""

from __future__ import annotations

import os

import pytest
import torch

from tables import print_tables


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    config.option.benchmark_enable = True  # overrides the repository-wide --benchmark-disable
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(min(2, torch.get_num_threads()))  # the 2-core setting


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if session is not None and session.benchmarks:
        print_tables([b.as_dict(include_data=False) for b in session.benchmarks])


def run(benchmark, fn, label: str, baseline: bool = False, rounds: int = 3, warmup: int = 1, **info):
    """Time ``fn`` (``rounds`` rounds of one call after ``warmup`` calls) and record what
    the tables need: its label, whether it is the group's baseline, steps and tokens."""
    benchmark.extra_info.update(label=label, baseline=baseline, threads=torch.get_num_threads(), **info)
    return benchmark.pedantic(fn, rounds=rounds, warmup_rounds=warmup, iterations=1)
