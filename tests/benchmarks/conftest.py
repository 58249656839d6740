"""Benchmark fixtures; everything under tests/benchmarks carries the benchmark_suite marker."""
from __future__ import annotations

import pytest
from bench_models import llama_4x512


@pytest.fixture(scope="session")
def llama_model():
    return llama_4x512()


def pytest_collection_modifyitems(items):
    """Mark benchmark items so the default run (-m 'not benchmark_suite') deselects them."""
    for item in items:
        if "benchmarks" in str(item.fspath):
            item.add_marker(pytest.mark.benchmark_suite)
