// Shared between the launch planner (cb_loss_cuda.cu) and the per-dtype kernel files: the kernels'
// argument block, the launch constants the planner sizes grids with, and the typed launchers.
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
constexpr int kStreamChunksPerIter = kStreamThreads * kUnroll;
// Split rows: at least this many chunks per block, about kSplitBlocksPerSM blocks per SM in all.
constexpr int kSplitMinChunks = kStreamChunksPerIter;
constexpr int kSplitBlocksPerSM = 4;
// Partial row results of one split: max, sum of exps, distance to the max, element count, target logit.
constexpr int kStatsFields = 5;

struct KernelArgs {
  const void* logits;
  void* grad;
  const void* target;
  const float* weight;
  const void* scale;
  void* loss;
  void* workspace;
  int64_t num_rows;
  int64_t logits_row_stride;
  int64_t grad_row_stride;
  int64_t ignore_index;
  double gamma;
  double label_smoothing;
  int num_classes;
  int threads_per_row;
  int splits;
  int chunks_per_split;
  GammaKind gamma_kind;
  bool target_is_int32;
  bool scale_is_double;
  bool has_grad;
  bool softmax_focal;
};

// Defined once per storage type in cb_loss_cuda_<dtype>.cu.
cudaError_t launch_float(const KernelArgs& args, const CBLossCudaPlan& plan, int loss_type, cudaStream_t stream);
cudaError_t launch_half(const KernelArgs& args, const CBLossCudaPlan& plan, int loss_type, cudaStream_t stream);
cudaError_t launch_bfloat16(const KernelArgs& args, const CBLossCudaPlan& plan, int loss_type, cudaStream_t stream);
cudaError_t launch_double(const KernelArgs& args, const CBLossCudaPlan& plan, int loss_type, cudaStream_t stream);

}  // namespace cbkernels::gpu
