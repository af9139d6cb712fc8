// Kernels of cbkernels' CUDA backend for __nv_bfloat16 logits (one file per storage type: parallel compiles).
#include "cb_loss_cuda_kernels.cuh"

namespace cbkernels::gpu {

cudaError_t launch_bfloat16(const KernelArgs& args, const CBLossCudaPlan& plan, int loss_type, cudaStream_t stream) {
  return launch_typed<__nv_bfloat16>(args, plan, loss_type, stream);
}

}  // namespace cbkernels::gpu
