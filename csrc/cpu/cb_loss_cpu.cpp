// CPU kernels of cbkernels::cb_loss_fwd / cb_loss_fwd_inplace (schemas in cbkernels/_opdefs.py): threading over
// rows and the choice of instruction set. Tensors become params in csrc/cb_binding.h; the math is in
// isa/cb_loss_cpu_kernel.cpp.
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "cb_binding.h"
#include "cpu/cb_loss_cpu_kernel.h"

namespace cbkernels::cpu {
namespace {

struct Kernels {
  RowsFn rows;
  DenseScanFn scan_dense;
};

// The widest kernels this CPU runs, as ATen itself decides (ATEN_CPU_CAPABILITY=default|avx2 lowers it).
Kernels kernels() {
  static const Kernels k = [] {
    const std::string cap = at::get_cpu_capability();
#if defined(CBKERNELS_CPU_AVX512)
    if (cap == "AVX512") return Kernels{&AVX512::cb_loss_rows, &AVX512::scan_dense_rows};
#endif
#if defined(CBKERNELS_CPU_AVX2)
    if (cap == "AVX512" || cap == "AVX2") return Kernels{&AVX2::cb_loss_rows, &AVX2::scan_dense_rows};
#endif
    return Kernels{&DEFAULT::cb_loss_rows, &DEFAULT::scan_dense_rows};
  }();
  return k;
}

// Rows per task: at least 4096 elements. Below that a problem stays on the calling thread; above it a second
// thread pays off already (a CIFAR-100 batch, 128 x 100: 9.7-10.0 us a call instead of 11.9-18.7 with ATen's
// grain of 32768 elements, 2 threads). Rows are independent, so the bits do not depend on the split.
int64_t row_grain(const CBLossParams& p) { return std::max<int64_t>(1, 4096 / p.num_classes); }

double dense_target_value(const CBLossParams& p, int64_t row, int64_t col) {
  const int64_t at = row * p.target_row_stride + col;
  switch (p.target_dtype) {
    case Dtype::kDouble: return static_cast<const double*>(p.target)[at];
    case Dtype::kHalf: return static_cast<float>(static_cast<const c10::Half*>(p.target)[at]);
    case Dtype::kBFloat16: return static_cast<float>(static_cast<const c10::BFloat16*>(p.target)[at]);
    default: return static_cast<const float*>(p.target)[at];
  }
}

// The ValueError for dense target row `row`, in which a kernel's scan found a bad value: what it is and where (the
// words of the torch backend's check, cbkernels/_torch_stages.py).
[[noreturn]] void raise_bad_target(const CBLossParams& p, int64_t row) {
  const bool sigmoid = p.loss_type == kSigmoid || p.loss_type == kFocal;
  for (int64_t col = 0; col < p.num_classes; ++col) {
    const double q = dense_target_value(p, row, col);
    const char* why = std::isnan(q)        ? "NaN"
                      : q < 0              ? "negative"
                      : sigmoid && q > 1   ? "above 1 (the sigmoid losses' targets are per-class probabilities)"
                      : std::isinf(q)      ? "infinite"
                                           : nullptr;
    TORCH_CHECK_VALUE(why == nullptr, "target holds ", q, " at row ", row, ", class ", col,
                      ": dense targets must be finite and >= 0 (and <= 1 for the sigmoid losses); this one is ", why);
  }
  TORCH_INTERNAL_ASSERT(false, "dense target row ", row, " was reported bad but holds no bad value");
}

// The first bad dense-target row over parallel tasks that each report their first (-1: none): the same row, so the
// same error, for every split of the rows.
class FirstBadRow {
 public:
  void report(int64_t row) {
    int64_t seen = row_.load(std::memory_order_relaxed);
    while (row >= 0 && row < seen && !row_.compare_exchange_weak(seen, row, std::memory_order_relaxed)) {
    }
  }
  void raise_if_any(const CBLossParams& p) const {
    if (row_.load() != kNone) raise_bad_target(p, row_.load());
  }

 private:
  static constexpr int64_t kNone = std::numeric_limits<int64_t>::max();
  std::atomic<int64_t> row_{kNone};
};

// Before any row is computed: every index target checked (the first bad one raises), and the reduction's normaliser
// from the valid-row count and sum_i a_i (summed in double, in row order) when the launch computes it.
// Dense targets have no index and every row counts; the row kernels check q's values in their own scan of each row.
// A pass over q here only where one is due anyway: "weighted_mean" sums the rows' sample weights, and in place the
// values must be checked before any gradient row overwrites the logits.
template <typename A>
void check_targets_and_scale(const CBLossParams& p, const Kernels& k) {
  if (p.dense_target) {
    const bool weighted = p.compute_scale && p.reduction == kWeightedMean;
    double weight_sum = 0.0;
    if (weighted || p.grad == p.logits) {
      std::vector<double> a(weighted ? p.num_rows : 0);
      FirstBadRow bad;
      at::parallel_for(0, p.num_rows, row_grain(p), [&](int64_t begin, int64_t end) {
        bad.report(k.scan_dense(p, begin, end, weighted ? a.data() : nullptr));
      });
      bad.raise_if_any(p);
      for (const double v : a) weight_sum += v;
    }
    if (p.compute_scale) {
      *static_cast<A*>(p.scale) = reduction_scale<A>(p.reduction, p.num_rows, static_cast<A>(weight_sum));
    }
    return;
  }
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
  const Kernels k = kernels();
  const bool loss_is_double = p.dtype == Dtype::kDouble;
  if (loss_is_double) {
    check_targets_and_scale<double>(p, k);
  } else {
    check_targets_and_scale<float>(p, k);
  }
  FirstBadRow bad;
  at::parallel_for(0, p.num_rows, row_grain(p), [&](int64_t begin, int64_t end) { bad.report(k.rows(p, begin, end)); });
  bad.raise_if_any(p);
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
