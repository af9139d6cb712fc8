// CUDA kernels of cbkernels::cb_loss_fwd / cb_loss_fwd_inplace (schemas in csrc/ops.cpp): the one CUDA file
// that sees torch. It checks and converts the tensors, then calls the torch-free launchers of cb_loss_cuda.h
// on the current stream of the logits' device. No host synchronisation: the gradient scale stays on the
// device and a bad target fails a device-side assert, so the ops can be captured in CUDA graphs.
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <tuple>

#include "cuda/cb_loss_cuda.h"

namespace cbkernels::gpu {
namespace {

Dtype to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return Dtype::kFloat;
    case at::kHalf: return Dtype::kHalf;
    case at::kBFloat16: return Dtype::kBFloat16;
    case at::kDouble: return Dtype::kDouble;
    default: TORCH_CHECK(false, "cb_loss_fwd (CUDA): logits must be float32, float16, bfloat16 or float64, got ", t);
  }
}

void check_inputs(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& weight,
                  const at::Tensor& scale, int64_t loss_type) {
  TORCH_CHECK(logits.is_cuda(), "cb_loss_fwd (CUDA): logits must be a CUDA tensor, got one on ", logits.device());
  TORCH_CHECK(logits.dim() == 2, "cb_loss_fwd (CUDA): logits must be [N, C], got ", logits.sizes());
  TORCH_CHECK(logits.size(1) >= 1, "cb_loss_fwd (CUDA): logits need C >= 1 classes");
  TORCH_CHECK(logits.size(1) < (int64_t{1} << 31) - 64 && logits.size(0) < (int64_t{1} << 31),
              "cb_loss_fwd (CUDA): logits must have fewer than 2^31 rows and classes, got ", logits.sizes());
  (void)to_dtype(logits.scalar_type());
  TORCH_CHECK(target.device() == logits.device(), "cb_loss_fwd (CUDA): target must be on ", logits.device(),
              " like the logits, got ", target.device());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0), "cb_loss_fwd (CUDA): target must be [N] = [",
              logits.size(0), "], got ", target.sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong || target.scalar_type() == at::kInt,
              "cb_loss_fwd (CUDA): target must be int64 or int32, got ", target.scalar_type());
  TORCH_CHECK(weight.device() == logits.device(), "cb_loss_fwd (CUDA): weight must be on ", logits.device(),
              " like the logits, got ", weight.device());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == logits.size(1) && weight.scalar_type() == at::kFloat,
              "cb_loss_fwd (CUDA): weight must be float32 [C] = [", logits.size(1), "], got ", weight.scalar_type(),
              " ", weight.sizes());
  TORCH_CHECK(scale.device() == logits.device(), "cb_loss_fwd (CUDA): scale must be on ", logits.device(),
              " like the logits (it is read by the kernel: no host sync), got ", scale.device());
  TORCH_CHECK(scale.numel() == 1 && (scale.scalar_type() == at::kFloat || scale.scalar_type() == at::kDouble),
              "cb_loss_fwd (CUDA): scale must be a float32 (or float64) scalar tensor, got ", scale.scalar_type(), " ",
              scale.sizes());
  TORCH_CHECK(loss_type >= 0 && loss_type <= 3, "cb_loss_fwd (CUDA): unknown loss_type ", loss_type);
}

// The kernels read a row as 16-byte chunks with unit stride along the classes; any row stride works.
bool class_dim_contiguous(const at::Tensor& z) { return z.size(1) <= 1 || z.stride(1) == 1; }

at::ScalarType loss_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Multiprocessor count per device, queried once (the split of few, long rows depends on it).
int sm_count(c10::DeviceIndex device) {
  static std::array<std::atomic<int>, 64> cache{};
  const bool cached = device >= 0 && device < static_cast<c10::DeviceIndex>(cache.size());
  if (cached) {
    const int known = cache[device].load(std::memory_order_relaxed);
    if (known > 0) return known;
  }
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  if (cached) cache[device].store(count, std::memory_order_relaxed);
  return count;
}

struct ForcedPlan {
  Path path = Path::kAuto;
  int threads_per_row = 0;
  int splits = 0;
};

// Fills loss [N] and, when grad is given, grad (which may be z itself). Caller holds the device guard.
void launch(const at::Tensor& z, const at::Tensor& target, const at::Tensor& weight, const at::Tensor& scale,
            const at::Tensor& loss, const at::Tensor* grad, int64_t loss_type, double gamma, double label_smoothing,
            int64_t ignore_index, const ForcedPlan& forced = {}) {
  if (z.size(0) == 0) return;
  TORCH_CHECK(reinterpret_cast<uintptr_t>(z.const_data_ptr()) % z.element_size() == 0 &&
                  (grad == nullptr || reinterpret_cast<uintptr_t>(grad->const_data_ptr()) % z.element_size() == 0),
              "cb_loss_fwd (CUDA): logits and gradient must be aligned to their element size");
  const at::Tensor t = target.contiguous();
  const at::Tensor w = weight.contiguous();
  CBLossCudaParams p{};
  p.logits = z.const_data_ptr();
  p.logits_row_stride = z.stride(0);
  p.grad = grad != nullptr ? grad->data_ptr() : nullptr;
  p.grad_row_stride = grad != nullptr ? grad->stride(0) : 0;
  p.target = t.const_data_ptr();
  p.target_is_int32 = t.scalar_type() == at::kInt;
  p.weight = w.const_data_ptr<float>();
  p.scale = scale.const_data_ptr();
  p.scale_is_double = scale.scalar_type() == at::kDouble;
  p.loss = loss.data_ptr();
  p.num_rows = z.size(0);
  p.num_classes = z.size(1);
  p.loss_type = static_cast<int>(loss_type);
  p.gamma = gamma;
  p.label_smoothing = label_smoothing;
  p.ignore_index = ignore_index;
  p.dtype = to_dtype(z.scalar_type());
  p.num_sms = sm_count(z.get_device());
  p.force_path = forced.path;
  p.force_threads_per_row = forced.threads_per_row;
  p.force_splits = forced.splits;
  // Freed when this returns: the caching allocator keeps it for this stream until the kernels are done.
  at::Tensor workspace;
  const size_t bytes = cb_loss_cuda_workspace_bytes(p);
  if (bytes > 0) {
    workspace = at::empty({static_cast<int64_t>(bytes)}, z.options().dtype(at::kByte));
    p.workspace = workspace.data_ptr();
  }
  const cudaError_t err = cb_loss_cuda_launch(p, c10::cuda::getCurrentCUDAStream(z.get_device()).stream());
  TORCH_CHECK(err == cudaSuccess, "cb_loss_fwd (CUDA): kernel launch failed for logits ", z.sizes(), " ",
              z.scalar_type(), ": ", cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor> forward_impl(const at::Tensor& logits, const at::Tensor& target,
                                                const at::Tensor& weight, const at::Tensor& scale, int64_t loss_type,
                                                double gamma, double label_smoothing, int64_t ignore_index,
                                                bool compute_grad, const ForcedPlan& forced) {
  check_inputs(logits, target, weight, scale, loss_type);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor z = class_dim_contiguous(logits) ? logits : logits.contiguous();
  at::Tensor loss = at::empty({z.size(0)}, z.options().dtype(loss_dtype(z)));
  at::Tensor grad = compute_grad ? at::empty(z.sizes(), z.options()) : at::empty({0}, z.options());
  launch(z, target, weight, scale, loss, compute_grad ? &grad : nullptr, loss_type, gamma, label_smoothing,
         ignore_index, forced);
  return {loss, grad};
}

std::tuple<at::Tensor, at::Tensor> cb_loss_fwd_cuda(const at::Tensor& logits, const at::Tensor& target,
                                                    const at::Tensor& weight, const at::Tensor& scale,
                                                    int64_t loss_type, double gamma, double label_smoothing,
                                                    int64_t ignore_index, bool compute_grad) {
  return forward_impl(logits, target, weight, scale, loss_type, gamma, label_smoothing, ignore_index, compute_grad,
                      ForcedPlan{});
}

at::Tensor cb_loss_fwd_inplace_cuda(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& weight,
                                    const at::Tensor& scale, int64_t loss_type, double gamma, double label_smoothing,
                                    int64_t ignore_index) {
  check_inputs(logits, target, weight, scale, loss_type);
  at::assert_no_internal_overlap(logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  // Class-strided logits: compute in a contiguous copy, then write the gradient back.
  const bool direct = class_dim_contiguous(logits);
  const at::Tensor z = direct ? logits : logits.contiguous();
  at::Tensor loss = at::empty({z.size(0)}, z.options().dtype(loss_dtype(z)));
  launch(z, target, weight, scale, loss, &z, loss_type, gamma, label_smoothing, ignore_index);
  if (!direct) logits.copy_(z);
  return loss;
}

// Testing hook: cb_loss_fwd with the kernel shape forced (path 0 auto, 1 rows, 2 stream; 0 = automatic for
// threads_per_row and splits), so GPU tests reach every path on small shapes.
std::tuple<at::Tensor, at::Tensor> cb_loss_fwd_cuda_forced_plan(
    const at::Tensor& logits, const at::Tensor& target, const at::Tensor& weight, const at::Tensor& scale,
    int64_t loss_type, double gamma, double label_smoothing, int64_t ignore_index, bool compute_grad, int64_t path,
    int64_t threads_per_row, int64_t splits) {
  TORCH_CHECK(path >= 0 && path <= 2, "_cb_loss_fwd_cuda_forced_plan: path must be 0 (auto), 1 (rows) or 2 (stream)");
  ForcedPlan forced;
  forced.path = static_cast<Path>(path);
  forced.threads_per_row = static_cast<int>(threads_per_row);
  forced.splits = static_cast<int>(splits);
  return forward_impl(logits, target, weight, scale, loss_type, gamma, label_smoothing, ignore_index, compute_grad,
                      forced);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cbkernels, m) {
  m.def(
      "_cb_loss_fwd_cuda_forced_plan(Tensor logits, Tensor target, Tensor weight, Tensor scale, int loss_type, "
      "float gamma, float label_smoothing, int ignore_index, bool compute_grad, int path, int threads_per_row, "
      "int splits) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(cbkernels, CUDA, m) {
  m.impl("cb_loss_fwd", &cb_loss_fwd_cuda);
  m.impl("cb_loss_fwd_inplace", &cb_loss_fwd_inplace_cuda);
  m.impl("_cb_loss_fwd_cuda_forced_plan", &cb_loss_fwd_cuda_forced_plan);
}

}  // namespace cbkernels::gpu
