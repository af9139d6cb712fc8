// CPU kernels of cbkernels::cb_loss_fwd / cb_loss_fwd_inplace (schemas in ops.cpp): tensor checks,
// threading over rows, and the choice of instruction set. The math is in isa/cb_loss_cpu_kernel.cpp.
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <string>
#include <tuple>

#include "cb_math.h"
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

Dtype to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return Dtype::kFloat;
    case at::kDouble: return Dtype::kDouble;
    case at::kHalf: return Dtype::kHalf;
    case at::kBFloat16: return Dtype::kBFloat16;
    default: TORCH_CHECK(false, "cb_loss_fwd: logits must be float32, float16, bfloat16 or float64, got ", t);
  }
}

void check_inputs(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& weight,
                  const at::Tensor& scale, int64_t loss_type, double gamma, double label_smoothing) {
  TORCH_CHECK(logits.dim() == 2, "cb_loss_fwd: logits must be [N, C], got ", logits.sizes());
  TORCH_CHECK(logits.size(1) >= 1, "cb_loss_fwd: need C >= 1 classes");
  TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0),
              "cb_loss_fwd: target must be [N] = [", logits.size(0), "], got ", target.sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong || target.scalar_type() == at::kInt,
              "cb_loss_fwd: target must be int64 or int32, got ", target.scalar_type());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == logits.size(1) && weight.scalar_type() == at::kFloat,
              "cb_loss_fwd: weight must be float32 [C] = [", logits.size(1), "], got ", weight.scalar_type(), " ",
              weight.sizes());
  TORCH_CHECK(scale.numel() == 1 && (scale.scalar_type() == at::kFloat || scale.scalar_type() == at::kDouble),
              "cb_loss_fwd: scale must be a float32/float64 scalar tensor");
  TORCH_CHECK(loss_type >= kSoftmax && loss_type <= kSoftmaxFocal, "cb_loss_fwd: unknown loss_type ", loss_type);
  // The kernels' exp/log1p approximations rely on these ranges (SPEC section 4: gamma >= 0).
  TORCH_CHECK(gamma >= 0 && std::isfinite(gamma), "cb_loss_fwd: gamma must be finite and >= 0, got ", gamma);
  TORCH_CHECK(label_smoothing >= 0 && label_smoothing <= 1, "cb_loss_fwd: label_smoothing must lie in [0, 1]");
  for (const at::Tensor* t : {&logits, &target, &weight, &scale}) {
    TORCH_CHECK(t->device().is_cpu(), "cb_loss_fwd (CPU kernel): every tensor must be on the CPU");
  }
}

// The kernels read rows with unit stride along the classes; any row stride is fine.
bool rows_ok(const at::Tensor& z) { return z.size(1) <= 1 || z.stride(1) == 1; }

// Fills loss [N] and, when grad is defined, grad (which may be z itself).
void launch(const at::Tensor& z, const at::Tensor& target, const at::Tensor& weight, const at::Tensor& scale,
            const at::Tensor& loss, const at::Tensor* grad, int64_t loss_type, double gamma, double label_smoothing,
            int64_t ignore_index) {
  const int64_t n = z.size(0), c = z.size(1);
  if (n == 0) return;
  const at::Tensor t = target.contiguous();
  const at::Tensor w = weight.contiguous();
  CBLossParams p{};
  p.logits = z.const_data_ptr();
  p.logits_row_stride = z.stride(0);
  p.grad = grad != nullptr ? grad->data_ptr() : nullptr;
  p.grad_row_stride = grad != nullptr ? grad->stride(0) : 0;
  p.target = t.const_data_ptr();
  p.target_is_int32 = t.scalar_type() == at::kInt;
  p.weight = w.const_data_ptr<float>();
  p.loss = loss.data_ptr();
  p.num_rows = n;
  p.num_classes = c;
  p.loss_type = static_cast<int>(loss_type);
  p.gamma = gamma;
  p.label_smoothing = label_smoothing;
  p.scale = scale.scalar_type() == at::kDouble ? *scale.const_data_ptr<double>() : *scale.const_data_ptr<float>();
  p.ignore_index = ignore_index;
  p.dtype = to_dtype(z.scalar_type());

  const RowsFn fn = rows_fn();
  // Rows per task: at least ATen's grain of 32768 elements, so a small problem stays on the calling thread.
  const int64_t grain = std::max<int64_t>(1, 32768 / c);
  std::atomic<int64_t> first_bad{-1};
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    const int64_t bad = fn(p, begin, end);
    int64_t seen = first_bad.load();
    while (bad >= 0 && (seen < 0 || bad < seen) && !first_bad.compare_exchange_weak(seen, bad)) {
    }
  });
  const int64_t bad = first_bad.load();
  if (bad >= 0) {
    const int64_t value = p.target_is_int32 ? t.const_data_ptr<int32_t>()[bad] : t.const_data_ptr<int64_t>()[bad];
    TORCH_CHECK_INDEX(false, "cb_loss_fwd: target holds ", value, ", outside [0, ", c, ") and not ignore_index=",
                      ignore_index);
  }
}

at::ScalarType loss_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor> cb_loss_fwd_cpu(const at::Tensor& logits, const at::Tensor& target,
                                                   const at::Tensor& weight, const at::Tensor& scale,
                                                   int64_t loss_type, double gamma, double label_smoothing,
                                                   int64_t ignore_index, bool compute_grad) {
  check_inputs(logits, target, weight, scale, loss_type, gamma, label_smoothing);
  const at::Tensor z = rows_ok(logits) ? logits : logits.contiguous();
  at::Tensor loss = at::empty({z.size(0)}, z.options().dtype(loss_dtype(z)));
  at::Tensor grad = compute_grad ? at::empty(z.sizes(), z.options()) : at::empty({0}, z.options());
  launch(z, target, weight, scale, loss, compute_grad ? &grad : nullptr, loss_type, gamma, label_smoothing,
         ignore_index);
  return {loss, grad};
}

at::Tensor cb_loss_fwd_inplace_cpu(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& weight,
                                   const at::Tensor& scale, int64_t loss_type, double gamma,
                                   double label_smoothing, int64_t ignore_index) {
  check_inputs(logits, target, weight, scale, loss_type, gamma, label_smoothing);
  at::assert_no_internal_overlap(logits);  // rows written by different threads must not share memory
  // Column-strided logits: compute in a contiguous copy, then write the gradient back.
  const bool direct = rows_ok(logits);
  const at::Tensor z = direct ? logits : logits.contiguous();
  at::Tensor loss = at::empty({z.size(0)}, z.options().dtype(loss_dtype(z)));
  launch(z, target, weight, scale, loss, &z, loss_type, gamma, label_smoothing, ignore_index);
  if (!direct) logits.copy_(z);
  return loss;
}

}  // namespace

TORCH_LIBRARY_IMPL(cbkernels, CPU, m) {
  m.impl("cb_loss_fwd", &cb_loss_fwd_cpu);
  m.impl("cb_loss_fwd_inplace", &cb_loss_fwd_inplace_cpu);
}

}  // namespace cbkernels::cpu
