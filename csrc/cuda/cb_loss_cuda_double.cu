// Kernels of cbkernels' CUDA backend for double logits (one file per storage type: parallel compiles).
#include "cb_loss_cuda_kernels.cuh"

namespace cbkernels::gpu {

cudaError_t launch_double(const KernelArgs& args, const CBLossCudaPlan& plan, int loss_type, cudaStream_t stream) {
  return launch_typed<double>(args, plan, loss_type, stream);
}

}  // namespace cbkernels::gpu
