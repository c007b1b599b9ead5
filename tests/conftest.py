"""Shared test set-up."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models: one intra-op thread is faster and far less noisy on shared 2-core machines (CI's size)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--slow", action="store_true", default=False,
                     help="also run the tests marked slow (the long sweeps); scripts/dev.py test, what CI runs, "
                          "passes it")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``slow`` (long sweeps) run only when selected: ``--slow`` (everything), or ``-m slow`` (or an
    expression naming it) for the sweeps alone."""
    expr = config.getoption("markexpr") or ""
    if config.getoption("--slow") or ("slow" in expr and "not slow" not in expr):
        return
    skip = pytest.mark.skip(reason="slow sweep: select with -m slow (or --slow for everything)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
