// CPU kernels of cbkernels::cb_loss_fwd / cb_loss_fwd_inplace (schemas in cbkernels/_opdefs.py): threading over
// rows and the choice of instruction set. Tensors become params in csrc/cb_binding.h; the math is in
// isa/cb_loss_cpu_kernel.cpp.
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>
#include <string>

#include "cb_binding.h"
#include "cpu/cb_loss_cpu_kernel.h"

namespace cbkernels::cpu {
namespace {

// The widest kernel this CPU runs, as ATen itself decides (ATEN_CPU_CAPABILITY=default|avx2 lowers it).
RowsFn rows_fn() {
  static const RowsFn fn = [] {
    const std::string cap = at::get_cpu_capability();
#if defined(CBKERNELS_CPU_AVX512)
    if (cap == "AVX512") return &AVX512::cb_loss_rows;
#endif
#if defined(CBKERNELS_CPU_AVX2)
    if (cap == "AVX512" || cap == "AVX2") return &AVX2::cb_loss_rows;
#endif
    return &DEFAULT::cb_loss_rows;
  }();
  return fn;
}

// Before any row is computed: every target checked (the first bad one raises), and the reduction's normaliser
// from the valid-row count and sum_i a_i (summed in double, in row order) when the launch computes it.
template <typename A>
void check_targets_and_scale(const CBLossParams& p) {
  int64_t valid_rows = 0;
  double weight_sum = 0.0;
  for (int64_t row = 0; row < p.num_rows; ++row) {
    const IndexTarget t = index_target(p, row);
    // The words of the API edge's message from before this check moved into the op.
    TORCH_CHECK_INDEX(!t.bad(p), "target holds ", t.column, ", outside [0, ", p.num_classes, ") and not ignore_index=",
                      p.ignore_index);
    valid_rows += t.valid;
    if (t.valid) weight_sum += static_cast<double>(p.weight[t.column]);
  }
  if (p.compute_scale) {
    *static_cast<A*>(p.scale) = reduction_scale<A>(p.reduction, valid_rows, static_cast<A>(weight_sum));
  }
}

// reduced = s * sum_i loss_i: summed in double in row order (the same bits for every thread count), rounded once.
template <typename A>
void reduce_rows(const CBLossParams& p) {
  const A* loss = static_cast<const A*>(p.loss);
  double total = 0.0;
  for (int64_t row = 0; row < p.num_rows; ++row) total += static_cast<double>(loss[row]);
  *static_cast<A*>(p.reduced) = static_cast<A>(total * static_cast<double>(load_scale<A>(p)));
}

// Fills loss [N], reduced (when given) and, when grad is given, grad (which may be z itself).
void launch(const OpArgs& args, const at::Tensor& z, const at::Tensor& loss, const at::Tensor* grad,
            const at::Tensor* reduced) {
  CBLossParams p{};
  HeldTensors held;
  set_params(p, held, args, z, loss, grad, reduced);
  const bool loss_is_double = p.dtype == Dtype::kDouble;
  if (loss_is_double) {
    check_targets_and_scale<double>(p);
  } else {
    check_targets_and_scale<float>(p);
  }
  const RowsFn fn = rows_fn();
  // Rows per task: at least 4096 elements. Below that a problem stays on the calling thread; above it a second
  // thread pays off already (a CIFAR-100 batch, 128 x 100: 9.7-10.0 us a call instead of 11.9-18.7 with ATen's
  // grain of 32768 elements, 2 threads). Rows are independent, so the bits do not depend on the split.
  const int64_t grain = std::max<int64_t>(1, 4096 / p.num_classes);
  at::parallel_for(0, p.num_rows, grain, [&](int64_t begin, int64_t end) { fn(p, begin, end); });
  if (p.reduced != nullptr) {
    if (loss_is_double) {
      reduce_rows<double>(p);
    } else {
      reduce_rows<float>(p);
    }
  }
}

void cb_loss_fwd_cpu(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  static const ArgTable table(op);
  OpArgs args(table, op, stack);
  check_inputs(args, c10::DeviceType::CPU);
  cb_loss_fwd_outputs(args, launch);
}

void cb_loss_fwd_inplace_cpu(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  static const ArgTable table(op);
  OpArgs args(table, op, stack);
  check_inputs(args, c10::DeviceType::CPU);
  cb_loss_fwd_inplace_outputs(args, launch);
}

}  // namespace

TORCH_LIBRARY_IMPL(cbkernels, CPU, m) {
  m.impl("cb_loss_fwd", torch::CppFunction::makeFromBoxedFunction<&cb_loss_fwd_cpu>());
  m.impl("cb_loss_fwd_inplace", torch::CppFunction::makeFromBoxedFunction<&cb_loss_fwd_inplace_cpu>());
}

}  // namespace cbkernels::cpu
