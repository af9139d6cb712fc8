// Shared between the launch planner (cb_loss_cuda.cu) and the per-dtype kernel files: the kernels'
// argument, the launch constants the planner sizes grids with, and the typed launchers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../cb_math.h"
#include "cb_loss_cuda.h"

namespace cbkernels::gpu {

// The logit transforms of a call (SPEC section 10), a compile-time parameter of the kernels that read logits: none,
// only the affine ones (logit_offset, target_margin, logit_scale: a load, a select and a multiplication per element,
// each skipped at its identity by a runtime branch), or with the softcap too (a tanh per element, and the registers
// for it). The z-loss (SPEC section 11) and its per-row output z_rows also take a transform kernel (kAffine at least,
// with identity transforms): kept out of the plain kernels, they leave those as they were (the z_rows store and the
// z-loss branch of the row epilogue cost the rows kernels 1 to 3 registers). kAny is the dense-target kernels' only
// kind: every transform, the softcap's tanh behind a runtime branch (those kernels carry per-element target and weight
// loads already; one kind instead of three keeps the build's kernel count down).
enum class TfKind : int { kOff, kAffine, kCapped, kAny };

// Rows path (softmax losses): every thread holds up to kHeld 16-byte chunks of its row in registers (the
// logits are read once); kRowsMaxThreads threads per row at most, so that two such blocks fit on an SM.
constexpr int kHeld = 4;
constexpr int kRowsMaxThreads = 512;
// Block size when several rows share a block (<= 32 threads per row), on either path.
constexpr int kRowsBlockThreads = 256;
// Stream path: kStreamThreads threads (a block) per long row loop over it, kUnroll chunks per thread in flight.
constexpr int kStreamThreads = 256;
constexpr int kUnroll = 4;
// Dense targets: kDenseUnroll chunks per thread in flight, each with its targets (as many bytes again as the logits',
// or twice: float32 targets of 16-bit logits), so about the index kernels' bytes in flight; and half the copies of
// their per-chunk code, whose transforms and terms are all there at run time (the build's time).
constexpr int kDenseUnroll = 2;
// Stream blocks an SM must hold at once: 4 (64 registers a thread) keeps 64 KB of loads in flight per SM; unbounded,
// ptxas drifts between 48 and 78 registers on incidental changes (the argument layout moved float's sigmoid kernels
// from 64 to 76, a quarter of the blocks lost). The float64 sigmoid-type terms need more registers: 2 blocks (128).
// Transformed logits need more: the affine transforms' per-class loads, 3 blocks (80; float64 sigmoid terms 2); the
// softcap's tanh, 2 (at 64 or 80 registers ptxas spills).
// Dense targets (kAny) add the target's and the weight's loads and the per-class terms: 2, as with a softcap.
template <typename A, bool kSoftmax, TfKind kTf = TfKind::kOff>
constexpr int kStreamMinBlocks = sizeof(A) == 8 && !kSoftmax ? 2
                                 : kTf == TfKind::kOff       ? 4
                                 : kTf == TfKind::kAffine    ? 3
                                                             : 2;
// The rows kernel's blocks are up to kRowsMaxThreads threads, so at most 128 registers a thread; with transforms
// ptxas would rather spill to 64 (two blocks of 512) unless told that one block an SM is enough.
template <TfKind kTf>
constexpr int kRowsMinBlocks = kTf == TfKind::kOff ? 0 : 1;
// The split-finish kernel with a softcap: on sm_75 (1024 threads an SM) ptxas aimed at four blocks of 256, 64
// registers, and spilled 4 bytes (bf16, double); two blocks leave it 128.
template <TfKind kTf>
constexpr int kFinishMinBlocks = kTf == TfKind::kCapped || kTf == TfKind::kAny ? 2 : 0;
constexpr int kStreamChunksPerIter = kStreamThreads * kUnroll;
// Split rows: at least this many chunks per block, about kSplitBlocksPerSM blocks per SM in all.
constexpr int kSplitMinChunks = kStreamChunksPerIter;
constexpr int kSplitBlocksPerSM = 4;
// Partial row results of one split: max, sum of exps, distance to the max, element count, target logit.
constexpr int kStatsFields = 5;
// With a dense target (DenseRowStats): max, sum of the exps below it, count at it, the target's and the label
// smoothing's weighted distances to it and their weights, the weighted target mass; then the softmax-focal terms of
// the split's columns (loss, gradient coefficient), which a third launch combines.
constexpr int kDenseStatsFields = 8;
constexpr int kDenseSplitFields = kDenseStatsFields + 2;

// The kernels' argument: the call's params and its plan's shape.
struct KernelArgs : CBLossParams {
  void* workspace;
  int threads_per_row;
  int splits;
  int chunks_per_split;
  GammaKind gamma_kind;
  bool has_grad;
  bool softmax_focal;
  TfKind tf_kind;
  // The transforms in each compute type, built on the host: no per-thread double division for 1 / softcap.
  LogitTransform<float> tf_float;
  LogitTransform<double> tf_double;
  // Dense targets (appended: the index kernels' argument layout stays as it was). row_weights: [N] sample weights a_i
  // in the compute type, in the workspace, that a first launch (cb_dense_row_weight_kernel) fills when the
  // "weighted_mean" normaliser needs their sum or split sigmoid rows need a_i before their gradient; nullptr
  // otherwise. focal_phase: which of the two launches after the first one of split softmax-focal rows this is (0: each
  // split's focal terms, 1: their sums, the loss and the gradient).
  void* row_weights;
  int focal_phase;

  template <typename A>
  CB_HOST_DEVICE const LogitTransform<A>& transform() const {
    if constexpr (sizeof(A) == sizeof(float)) {
      return tf_float;
    } else {
      return tf_double;
    }
  }
};

// Defined once per storage type in cb_loss_cuda_<dtype>.cu.
cudaError_t launch_float(const KernelArgs& args, const CBLossCudaPlan& plan, int loss_type, cudaStream_t stream);
cudaError_t launch_half(const KernelArgs& args, const CBLossCudaPlan& plan, int loss_type, cudaStream_t stream);
cudaError_t launch_bfloat16(const KernelArgs& args, const CBLossCudaPlan& plan, int loss_type, cudaStream_t stream);
cudaError_t launch_double(const KernelArgs& args, const CBLossCudaPlan& plan, int loss_type, cudaStream_t stream);

}  // namespace cbkernels::gpu
