// Kernels of cbkernels' CUDA backend for float logits (one file per storage type: parallel compiles).
#include "cb_loss_cuda_kernels.cuh"

namespace cbkernels::gpu {

cudaError_t launch_float(const KernelArgs& args, const CBLossCudaPlan& plan, int loss_type, cudaStream_t stream) {
  return launch_typed<float>(args, plan, loss_type, stream);
}

}  // namespace cbkernels::gpu
