import pytest
import torch

# Tiny models: one thread is faster than two, and immune to a busy machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _every_due_step_measures():
    """The suite checks schedules and values: no time share unless a test asks for one.

    ``Budget(overhead=0.05)`` defers measurements by wall-clock time, which on a
    shared 2-core machine would make which steps measure depend on the load.
    ``tests/planning/test_budget.py`` tests the share with a controlled clock and passes
    ``overhead`` explicitly; scripts run in subprocesses pass ``overhead=None``.
    Session-scoped, so module-scoped fixtures (whole training runs) see it too.
    """
    import dataclasses

    from curvwatch.results import Budget

    defaults = tuple(None if f.name == "overhead" else f.default for f in dataclasses.fields(Budget))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Budget.__init__, "__defaults__", defaults)
        yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
