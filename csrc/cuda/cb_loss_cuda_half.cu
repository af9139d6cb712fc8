// Kernels of cbkernels' CUDA backend for __half logits (one file per storage type: parallel compiles).
#include "cb_loss_cuda_kernels.cuh"

namespace cbkernels::gpu {

cudaError_t launch_half(const KernelArgs& args, const CBLossCudaPlan& plan, int loss_type, cudaStream_t stream) {
  return launch_typed<__half>(args, plan, loss_type, stream);
}

}  // namespace cbkernels::gpu
