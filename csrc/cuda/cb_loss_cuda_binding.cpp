// CUDA kernels of cbkernels::cb_loss_fwd / cb_loss_fwd_inplace (schemas in cbkernels/_opdefs.py): the one CUDA file
// that sees torch. Tensors become params in csrc/cb_binding.h; this adds the launch fields and calls the torch-free
// launchers of cb_loss_cuda.h on the current stream of the logits' device. No host synchronisation: the gradient
// scale stays on the device and a bad target fails a device-side assert, so the ops can be captured in CUDA graphs.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <cstdint>

#include "cb_binding.h"
#include "cuda/cb_loss_cuda.h"

namespace cbkernels::gpu {
namespace {

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

// What the CUDA kernels add to check_inputs: 32-bit row and class counts.
void check_cuda_inputs(const OpArgs& args) {
  check_inputs(args, c10::DeviceType::CUDA);
  const at::Tensor& logits = args.tensor("logits");
  TORCH_CHECK(logits.size(1) < (int64_t{1} << 31) - 64 && logits.size(0) < (int64_t{1} << 31), args.op_name(),
              ": the CUDA kernels take fewer than 2^31 rows and classes, got ", logits.sizes());
}

// Fills loss [N] and, when grad is given, grad (which may be z itself). Caller holds the device guard. Forced
// launch shapes come from the testing op's arguments (path, threads_per_row, splits) when it has them.
void launch(const OpArgs& args, const at::Tensor& z, const at::Tensor& loss, const at::Tensor* grad,
            const at::Tensor* reduced, bool forced) {
  TORCH_CHECK(reinterpret_cast<uintptr_t>(z.const_data_ptr()) % z.element_size() == 0 &&
                  (grad == nullptr || reinterpret_cast<uintptr_t>(grad->const_data_ptr()) % z.element_size() == 0),
              args.op_name(), ": logits and gradient must be aligned to their element size");
  CBLossCudaParams p{};
  HeldTensors held;
  set_params(p, held, args, z, loss, grad, reduced);
  p.num_sms = sm_count(z.get_device());
  if (forced) {
    p.force_path = static_cast<Path>(args.to_int("path"));
    p.force_threads_per_row = static_cast<int>(args.to_int("threads_per_row"));
    p.force_splits = static_cast<int>(args.to_int("splits"));
  }
  // Freed when this returns: the caching allocator keeps it for this stream until the kernels are done.
  at::Tensor workspace;
  const size_t bytes = cb_loss_cuda_workspace_bytes(p);
  if (bytes > 0) {
    workspace = at::empty({static_cast<int64_t>(bytes)}, z.options().dtype(at::kByte));
    p.workspace = workspace.data_ptr();
  }
  const cudaError_t err = cb_loss_cuda_launch(p, c10::cuda::getCurrentCUDAStream(z.get_device()).stream());
  TORCH_CHECK(err == cudaSuccess, args.op_name(), ": kernel launch failed for logits ", z.sizes(), " ",
              z.scalar_type(), ": ", cudaGetErrorString(err));
}

void launch_auto(const OpArgs& args, const at::Tensor& z, const at::Tensor& loss, const at::Tensor* grad,
                 const at::Tensor* reduced) {
  launch(args, z, loss, grad, reduced, false);
}

void cb_loss_fwd_cuda(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  static const ArgTable table(op);
  OpArgs args(table, op, stack);
  check_cuda_inputs(args);
  const c10::cuda::CUDAGuard guard(args.tensor("logits").device());
  cb_loss_fwd_outputs(args, launch_auto);
}

void cb_loss_fwd_inplace_cuda(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  static const ArgTable table(op);
  OpArgs args(table, op, stack);
  check_cuda_inputs(args);
  const c10::cuda::CUDAGuard guard(args.tensor("logits").device());
  cb_loss_fwd_inplace_outputs(args, launch_auto);
}

// Testing hook: cb_loss_fwd with the kernel shape forced, so GPU tests reach every path on small shapes.
void cb_loss_fwd_cuda_forced_plan(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  static const ArgTable table(op);
  OpArgs args(table, op, stack);
  check_cuda_inputs(args);
  const int64_t path = args.to_int("path");
  TORCH_CHECK(path >= 0 && path <= 2, args.op_name(), ": path must be 0 (auto), 1 (rows) or 2 (stream)");
  const c10::cuda::CUDAGuard guard(args.tensor("logits").device());
  cb_loss_fwd_outputs(args, [](const OpArgs& a, const at::Tensor& z, const at::Tensor& loss, const at::Tensor* grad,
                                const at::Tensor* reduced) { launch(a, z, loss, grad, reduced, true); });
}

}  // namespace

// The testing op is CUDA-only, so its schema stays here: cb_loss_fwd's arguments, then the forced shape (path 0
// auto, 1 rows, 2 stream; 0 = automatic for threads_per_row and splits), then cb_loss_fwd's trailing arguments
// (cbkernels/_opdefs.py: set_params reads them by name).
TORCH_LIBRARY_FRAGMENT(cbkernels, m) {
  m.def(
      "_cb_loss_fwd_cuda_forced_plan(Tensor logits, Tensor target, Tensor weight, Tensor? scale, int loss_type, "
      "float gamma, float label_smoothing, int ignore_index, bool compute_grad, int path, int threads_per_row, "
      "int splits, str reduction=\"none\", float softcap=0.0, float logit_scale=1.0, float z_loss=0.0, "
      "int weight_mode=0, Tensor? logit_offset=None, Tensor? target_margin=None, Tensor(b!)? z_rows=None) -> "
      "(Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(cbkernels, CUDA, m) {
  m.impl("cb_loss_fwd", torch::CppFunction::makeFromBoxedFunction<&cb_loss_fwd_cuda>());
  m.impl("cb_loss_fwd_inplace", torch::CppFunction::makeFromBoxedFunction<&cb_loss_fwd_inplace_cuda>());
  m.impl("_cb_loss_fwd_cuda_forced_plan", torch::CppFunction::makeFromBoxedFunction<&cb_loss_fwd_cuda_forced_plan>());
}

}  // namespace cbkernels::gpu
