// What a kernel of cbkernels::cb_loss_fwd / cb_loss_fwd_inplace needs, as one plain struct (the flash-attention
// manner): the CPU row kernels take it, the CUDA launcher extends it with its launch fields (cb_loss_cuda.h), and
// the CUDA emulation in tests/cuda_emu fills it from Python. Only the bindings (through csrc/cb_binding.h's
// set_params) fill it from tensors. Torch-free: raw pointers, sizes and strides, so nvcc compiles it alone.
#pragma once

#include <cstdint>

// Forced inline on the host too: the SIMD instantiations of cb_math.h return several vectors per call, which
// only stay in registers once the call is gone.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define CB_HOST_DEVICE __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define CB_HOST_DEVICE inline __attribute__((always_inline))
#else
#define CB_HOST_DEVICE inline
#endif

namespace cbkernels {

enum LossType : int { kSoftmax = 0, kSigmoid = 1, kFocal = 2, kSoftmaxFocal = 3 };

// The op's reduction (SPEC section 5), by its index in cbkernels/_opdefs.py's REDUCTIONS.
enum Reduction : int { kNone = 0, kMean = 1, kSum = 2, kWeightedMean = 3 };

// Storage type of the logits and the gradient.
enum class Dtype : int { kFloat = 0, kHalf = 1, kBFloat16 = 2, kDouble = 3 };

// No default member initialisers: the struct stays an aggregate whose layout the CUDA emulation's ctypes mirror
// reproduces, and a derived struct never packs its fields into this one's tail padding.
struct CBLossParams {
  const void* logits;         // [num_rows, num_classes], unit stride along the classes, any row stride
  int64_t logits_row_stride;  // in elements
  void* grad;                 // scale * dl/dz in the logits' dtype, nullptr for no gradient; may alias logits
  int64_t grad_row_stride;
  const void* target;         // [num_rows] class indices, int64 (int32 when target_is_int32)
  const float* weight;        // [num_classes] class weights
  // 0-d normaliser s of the gradient and of the reduced loss, float (double when scale_is_double), on the logits'
  // device; nullptr stands for 1. When compute_scale the launch writes it first (s of `reduction`), then reads it.
  void* scale;
  void* loss;                 // [num_rows] per-row loss, float (double for double logits); 0 for ignored rows
  void* reduced;              // 0-d s * sum_i loss_i in the loss' type, summed in a fixed order; nullptr: not wanted
  int64_t num_rows;
  int64_t num_classes;        // >= 1
  Dtype dtype;
  bool target_is_int32;
  bool scale_is_double;
  // The loss options: the op's scalar arguments (SPEC sections 2-4).
  int loss_type;              // LossType
  double gamma;               // focal exponent, >= 0
  double label_smoothing;     // in [0, 1], softmax cross-entropy only
  int64_t ignore_index;
  int reduction;              // Reduction
  bool compute_scale;
  // Logit transforms and z-loss (SPEC sections 10-11), each off at its default: the loss is computed on
  // z' = logit_scale * (softcap tanh(z / softcap) + logit_offset[j] - target_margin[y] [j == y]) and the gradient is
  // dl/dz. Appended last: the layout before them is that of the first release (the emulation's mirror follows).
  const float* logit_offset;  // [C] float32, nullptr for none
  const float* target_margin; // [C] float32, nullptr for none
  void* z_rows;               // [N] z_loss * lse(z')^2 per row in the loss' type (0 for ignored rows); nullptr: not wanted
  double softcap;             // c > 0, 0 for none
  double logit_scale;         // s > 0, 1 for none
  double z_loss;              // >= 0, softmax losses only
  // Dense targets (SPEC section 9), appended last too. With dense_target, `target` is [num_rows, num_classes]
  // probabilities / multi-hot rows q_ij >= 0 of type target_dtype (the logits' Dtype or kFloat), unit stride along
  // the classes; there is no ignore_index (every row counts) and the margin is m_j q_ij.
  bool dense_target;
  Dtype target_dtype;
  int64_t target_row_stride;  // in elements (dense targets)
  // kWeightSample: row i times a_i = sum_j w_j q_ij / sum_j q_ij (1 without mass; index targets w[y_i]);
  // kWeightClass: each class term j times w_j. "weighted_mean" divides by the sample weights' sum in both modes.
  int weight_mode;
};

enum WeightMode : int { kWeightSample = 0, kWeightClass = 1 };

// The reduction's normaliser from the valid-row count and sum_i a_i (SPEC section 5).
template <typename A>
CB_HOST_DEVICE A reduction_scale(int reduction, int64_t valid_rows, A weight_sum) {
  if (reduction == kMean) return A(1) / static_cast<A>(valid_rows > 0 ? valid_rows : 1);
  if (reduction == kWeightedMean) return weight_sum > A(0) ? A(1) / weight_sum : A(0);
  return A(1);
}

// The gradient scale in the compute type A (read where the kernel runs: no host sync on CUDA).
template <typename A>
CB_HOST_DEVICE A load_scale(const CBLossParams& p) {
  if (p.scale == nullptr) return A(1);
  return p.scale_is_double ? static_cast<A>(*static_cast<const double*>(p.scale))
                           : static_cast<A>(*static_cast<const float*>(p.scale));
}

// Targets as class indices (SPEC section 2), one row at a time. The kernels keep the target column apart from the
// other classes (its terms formed without cancellation); a dense-target family (SPEC section 9) is the other
// member: per row, whether it counts, the sample weight, and per class the target probability.
struct IndexTarget {
  int64_t column;  // the target class y_i when valid; otherwise the raw target (ignore_index or out of range)
  bool valid;      // counted: within [0, C) and not ignore_index

  // Neither ignore_index nor within [0, C): an error (CPU: IndexError; CUDA: a device assert).
  CB_HOST_DEVICE bool bad(const CBLossParams& p) const { return !valid && column != p.ignore_index; }

  // The sample weight a_i = w[y_i], 0 for a row that does not count.
  template <typename A>
  CB_HOST_DEVICE A weight(const CBLossParams& p) const {
    return valid ? static_cast<A>(p.weight[column]) : A(0);
  }
};

CB_HOST_DEVICE IndexTarget index_target(const CBLossParams& p, int64_t row) {
  IndexTarget t;
  t.column = p.target_is_int32 ? static_cast<int64_t>(static_cast<const int32_t*>(p.target)[row])
                               : static_cast<const int64_t*>(p.target)[row];
  // 0 <= column < C as one unsigned comparison (a negative column wraps to a huge one).
  t.valid = static_cast<uint64_t>(t.column) < static_cast<uint64_t>(p.num_classes) && t.column != p.ignore_index;
  return t;
}

}  // namespace cbkernels
