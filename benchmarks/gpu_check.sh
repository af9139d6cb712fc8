#!/usr/bin/env bash
# GPU check for a CUDA machine with no network, using the machine's own python3 (torch and triton installed):
#   1. builds the C++/CUDA extension in place (for this GPU's architecture only, to keep it short),
#   2. runs the GPU tests (pytest -m gpu),
#   3. benchmarks the Triton and (when built) CUDA C++ backends against naive eager and torch.compile
#      (benchmarks/gpu_bench.py), writing JSON + a text table under benchmarks/results/,
#   4. benchmarks the fused linear + loss in bf16 at N=8192 H=4096 V=128256 (benchmarks/bench_linear_loss.py).
# Meant to finish in under 8 minutes. Environment: PYTHON (default python3), SKIP_BUILD=1 to skip step 1,
# PYTEST_TARGETS (default "tests"), BENCH_ARGS (extra gpu_bench.py arguments), TEST_TIMEOUT / BUILD_TIMEOUT /
# BENCH_TIMEOUT in seconds. Exit status: non-zero when any step failed (all steps run regardless).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
status=0
t0=$SECONDS

$PY - <<'EOF' || exit 1
import torch, triton
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print(f"{torch.cuda.get_device_name(0)}  torch {torch.__version__}  triton {triton.__version__}  CUDA {torch.version.cuda}")
EOF

if [ "${SKIP_BUILD:-0}" != "1" ]; then
    if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
        TORCH_CUDA_ARCH_LIST=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
        export TORCH_CUDA_ARCH_LIST
    fi
    echo "== build_ext --inplace (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
    if ! timeout "${BUILD_TIMEOUT:-240}" $PY setup.py build_ext --inplace > "${TMPDIR:-/tmp}/cbkernels_build_ext.log" 2>&1; then
        echo "build failed:"; tail -20 "${TMPDIR:-/tmp}/cbkernels_build_ext.log"; status=1
    fi
    echo "   $((SECONDS - t0)) s"
fi

echo "== pytest -m gpu ${PYTEST_TARGETS:-tests}"
# shellcheck disable=SC2086
timeout "${TEST_TIMEOUT:-240}" $PY -m pytest -m gpu -q -p no:cacheprovider --durations=10 ${PYTEST_TARGETS:-tests} || status=1
echo "   $((SECONDS - t0)) s"

echo "== benchmarks/gpu_bench.py"
# shellcheck disable=SC2086
timeout "${BENCH_TIMEOUT:-300}" $PY benchmarks/gpu_bench.py ${BENCH_ARGS:-} || status=1
echo "   $((SECONDS - t0)) s"

echo "== benchmarks/bench_linear_loss.py --device cuda"
timeout "${LINEAR_TIMEOUT:-120}" $PY benchmarks/bench_linear_loss.py --device cuda --losses softmax || status=1
echo "== done in $((SECONDS - t0)) s, status $status"
exit $status
