// Interface between the CPU binding (cb_loss_cpu.cpp, sees torch) and the row kernels
// (isa/cb_loss_cpu_kernel.cpp, compiled once per instruction set by setup.py). Torch-free: raw
// pointers, sizes and strides only.
#pragma once

#include <cstdint>

namespace cbkernels::cpu {

enum class Dtype : int { kFloat, kDouble, kHalf, kBFloat16 };

struct CBLossParams {
  const void* logits;         // [num_rows, num_classes], unit stride along the classes
  int64_t logits_row_stride;  // in elements
  void* grad;                 // scale * dl/dz in the logits' dtype, or nullptr for no gradient; may alias logits
  int64_t grad_row_stride;
  const void* target;         // [num_rows] int64 or int32
  bool target_is_int32;
  const float* weight;        // [num_classes]
  void* loss;                 // [num_rows] float (double for double logits)
  int64_t num_rows;
  int64_t num_classes;
  int loss_type;              // cbkernels::LossType
  double gamma;
  double label_smoothing;
  double scale;
  int64_t ignore_index;
  Dtype dtype;
};

// Computes rows [begin, end). Returns the first row whose target is neither in [0, C) nor
// ignore_index (that row is left as if ignored), or -1 when all targets are good.
using RowsFn = int64_t (*)(const CBLossParams&, int64_t begin, int64_t end);

// One definition per instruction set; the namespace names match ATen's CPU_CAPABILITY values.
namespace DEFAULT { int64_t cb_loss_rows(const CBLossParams&, int64_t, int64_t); }
namespace AVX2 { int64_t cb_loss_rows(const CBLossParams&, int64_t, int64_t); }
namespace AVX512 { int64_t cb_loss_rows(const CBLossParams&, int64_t, int64_t); }

}  // namespace cbkernels::cpu
