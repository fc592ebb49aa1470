"""The examples in the docstrings run and print what they say (doctest)."""

import doctest
import importlib
import pkgutil

import pytest

import curvwatch
import curvwatch.integrations

# Modules that import an optional accelerator package at import time.
NEEDS_TRITON = {"curvwatch.kernels._triton_ce"}

MODULES = sorted(
    info.name
    for package in (curvwatch, curvwatch.integrations)
    for info in pkgutil.walk_packages(package.__path__, prefix=package.__name__ + ".")
    if info.name not in NEEDS_TRITON
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed"


def test_the_core_examples_are_collected():
    """The solver and operator examples exist, so the test above cannot pass by finding nothing."""
    attempted = {
        name: doctest.testmod(importlib.import_module(name)).attempted
        for name in ("curvwatch.solvers.lanczos", "curvwatch.operators.hessian")
    }
    assert all(count > 0 for count in attempted.values()), attempted
