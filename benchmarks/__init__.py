"""cbkernels' benchmarks and the harness they share; part of the repository, not of the installed package.

From the repository root: ``python -m benchmarks.bench --help`` (what ``make bench`` runs),
``python benchmarks/bench_linear_loss.py``, ``python benchmarks/gpu_bench.py`` and
``pytest benchmarks/ --benchmark-enable`` (the pytest-benchmark suite). ``benchmarks.harness`` holds what they
share: the naive baseline, inputs, the timing loop, memory accounting, the machine description, result files.
"""
