import pytest
import torch

# Tiny models: one thread is faster than two, and immune to a busy machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _every_due_step_measures(monkeypatch):
    """The suite checks schedules and values: no time share unless a test asks for one.

    ``Budget(overhead=0.05)`` defers measurements by wall-clock time, which on a
    shared 2-core machine would make which steps measure depend on the load.
    ``tests/test_budget.py`` tests the share with a fake clock and passes
    ``overhead`` explicitly; scripts run in subprocesses pass ``overhead=None``.
    """
    import dataclasses

    from curvwatch.results import Budget

    defaults = tuple(
        None if f.name == "overhead" else f.default for f in dataclasses.fields(Budget)
    )
    monkeypatch.setattr(Budget.__init__, "__defaults__", defaults)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
