"""Benchmark scripts are not a package: a test module names its script in ``BENCHMARK`` and gets it imported."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def benchmark_module(request):
    """``benchmarks/<BENCHMARK>.py`` of the requesting test module, imported with ``benchmarks/`` on the path."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        yield importlib.import_module(request.module.BENCHMARK)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
