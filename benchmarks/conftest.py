"""Collect ``bench_*.py`` here, so ``pytest benchmarks/`` finds the suites while ``pytest tests`` never does."""

import pytest


def pytest_collect_file(file_path, parent):
    # Paths named on the command line are collected by pytest itself; claiming them too would run them twice.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
