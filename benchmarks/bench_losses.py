"""pytest-benchmark suite: the cases of ``make bench`` (``benchmarks/bench.py``), one per shape, loss, provider.

    pytest benchmarks/ --benchmark-enable                       # everything (a few minutes on 2 cores)
    pytest benchmarks/ --benchmark-enable -k "imagenet and focal"
    pytest benchmarks/ --benchmark-enable --benchmark-json=out.json

Each benchmark is forward+backward of the mean loss; benchmarks are grouped per case, so pytest-benchmark's
table compares the providers of one case. The memory kept between forward and backward (see
``benchmarks.bench.MEMORY_METHOD``) goes to each benchmark's ``extra_info``. Environment:
``CBKERNELS_BENCH_DEVICE`` (cpu | cuda, default cpu), ``CBKERNELS_BENCH_DTYPE`` (default float32),
``CBKERNELS_BENCH_THREADS`` (default 2 on CPU). Without ``--benchmark-enable`` (the project's default)
every case runs once, untimed: a smoke run.
"""

import functools
import math
import os

import pytest
import torch

from benchmarks import bench, harness

DEVICE = os.environ.get("CBKERNELS_BENCH_DEVICE", "cpu")
DTYPE = os.environ.get("CBKERNELS_BENCH_DTYPE", "float32")
GAMMA = 0.5

if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("CBKERNELS_BENCH_DEVICE=cuda but no CUDA device", allow_module_level=True)

CASES = [(loss, prov) for loss in harness.LOSSES for prov in bench.default_providers(DEVICE)
         if bench.applies(prov, loss)]


@pytest.fixture(scope="module", autouse=True)
def _threads():
    old = torch.get_num_threads()
    threads = int(os.environ.get("CBKERNELS_BENCH_THREADS", "2" if DEVICE == "cpu" else "0"))
    if threads:
        torch.set_num_threads(threads)
    yield
    torch.set_num_threads(old)


@functools.lru_cache(maxsize=1)  # one shape's inputs at a time: the vocab logits alone are 262 MB in fp32
def _inputs(batch, classes):
    return bench.make_inputs(batch, classes, dtype=bench.DTYPES[DTYPE], device=DEVICE)


def _step_synced(p, x):
    bench.step(p, x)
    harness.sync(x.device)


@pytest.mark.parametrize("loss,provider", CASES, ids=[f"{lt}-{p}" for lt, p in CASES])
@pytest.mark.parametrize("shape", list(bench.SHAPES))
def test_fwd_bwd(benchmark, shape, loss, provider):
    b, c = bench.SHAPES[shape]
    case = bench.Case(shape, b, c, loss, GAMMA, *_inputs(b, c))
    x = case.logits
    p = bench.make_provider(provider, case)
    bench.time_step(p, x)  # warm-up
    mem = bench.measure_memory(p, x)
    benchmark.group = f"{shape} {b}x{c} {loss} {DEVICE} {DTYPE}"
    benchmark.extra_info.update(mem, logits_bytes=case.logits_bytes, compile_s=p.compile_s,
                                **{f"{k}_x": mem[f"{k}_bytes"] / case.logits_bytes for k in ("kept", "peak", "saved")})
    # The same rule as the harness: about a second per benchmark, 3 to 20 rounds.
    rounds = min(20, max(3, math.ceil(1.0 / max(bench.time_step(p, x), 1e-9))))
    benchmark.pedantic(_step_synced, args=(p, x), setup=lambda: setattr(x, "grad", None), rounds=rounds)
    x.grad = None
