// Shared between the launch planner (cb_loss_cuda.cu) and the per-dtype kernel files: the kernels'
// argument, the launch constants the planner sizes grids with, and the typed launchers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../cb_math.h"
#include "cb_loss_cuda.h"

namespace cbkernels::gpu {

// Rows path (softmax losses): every thread holds up to kHeld 16-byte chunks of its row in registers (the
// logits are read once); kRowsMaxThreads threads per row at most, so that two such blocks fit on an SM.
constexpr int kHeld = 4;
constexpr int kRowsMaxThreads = 512;
// Block size when several rows share a block (<= 32 threads per row), on either path.
constexpr int kRowsBlockThreads = 256;
// Stream path: kStreamThreads threads (a block) per long row loop over it, kUnroll chunks per thread in flight.
constexpr int kStreamThreads = 256;
constexpr int kUnroll = 4;
// Stream blocks an SM must hold at once: 4 (64 registers a thread) keeps 64 KB of loads in flight per SM; unbounded,
// ptxas drifts between 48 and 78 registers on incidental changes (the argument layout moved float's sigmoid kernels
// from 64 to 76, a quarter of the blocks lost). The float64 sigmoid-type terms need more registers: 2 blocks (128).
template <typename A, bool kSoftmax>
constexpr int kStreamMinBlocks = sizeof(A) == 4 || kSoftmax ? 4 : 2;
constexpr int kStreamChunksPerIter = kStreamThreads * kUnroll;
// Split rows: at least this many chunks per block, about kSplitBlocksPerSM blocks per SM in all.
constexpr int kSplitMinChunks = kStreamChunksPerIter;
constexpr int kSplitBlocksPerSM = 4;
// Partial row results of one split: max, sum of exps, distance to the max, element count, target logit.
constexpr int kStatsFields = 5;

// The kernels' argument: the call's params and its plan's shape.
struct KernelArgs : CBLossParams {
  void* workspace;
  int threads_per_row;
  int splits;
  int chunks_per_split;
  GammaKind gamma_kind;
  bool has_grad;
  bool softmax_focal;
};

// Defined once per storage type in cb_loss_cuda_<dtype>.cu.
cudaError_t launch_float(const KernelArgs& args, const CBLossCudaPlan& plan, int loss_type, cudaStream_t stream);
cudaError_t launch_half(const KernelArgs& args, const CBLossCudaPlan& plan, int loss_type, cudaStream_t stream);
cudaError_t launch_bfloat16(const KernelArgs& args, const CBLossCudaPlan& plan, int loss_type, cudaStream_t stream);
cudaError_t launch_double(const KernelArgs& args, const CBLossCudaPlan& plan, int loss_type, cudaStream_t stream);

}  // namespace cbkernels::gpu
