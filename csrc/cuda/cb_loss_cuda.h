// Launcher interface of the CUDA kernels of cbkernels::cb_loss_fwd / cb_loss_fwd_inplace (schemas in
// csrc/ops.cpp). Torch-free, like the kernels behind it: the binding (cb_loss_cuda_binding.cpp, the only
// CUDA file that sees torch) fills CBLossCudaParams from tensors and calls these functions.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace cbkernels::gpu {

enum class Dtype : int { kFloat, kHalf, kBFloat16, kDouble };

// Which kernel shape computes a call; kAuto lets cb_loss_cuda_plan decide (tests force the others). The
// sigmoid losses have the stream path only (they never hold a row), whatever is forced.
enum class Path : int { kAuto = 0, kRows = 1, kStream = 2 };

struct CBLossCudaParams {
  const void* logits;         // [num_rows, num_classes], unit stride along the classes, any row stride
  int64_t logits_row_stride;  // in elements
  void* grad;                 // scale * dl/dz in the logits' dtype, nullptr for no gradient; may alias logits
  int64_t grad_row_stride;
  const void* target;         // [num_rows] int64 or int32
  bool target_is_int32;
  const float* weight;        // [num_classes] class weights
  const void* scale;          // 0-d gradient scale on the device: float, or double for double logits
  bool scale_is_double;
  void* loss;                 // [num_rows] float (double for double logits); 0 for ignored rows
  int64_t num_rows;
  int64_t num_classes;        // >= 1 and < 2^31 - 64
  int loss_type;              // cbkernels::LossType
  double gamma;
  double label_smoothing;
  int64_t ignore_index;
  Dtype dtype;
  int num_sms;                // multiprocessors of the device: sizes the split of few, long rows
  void* workspace;            // cb_loss_cuda_workspace_bytes(params) bytes of device memory (or nullptr for 0)
  // Testing hooks (0 = automatic): the kernel shape; threads per row, a power of two up to 32 (several rows
  // per block) or a multiple of 32 up to 512 (kRows) or 256 (kStream) for a block per row; blocks per row
  // for kStream (more than one needs a block per row).
  Path force_path;
  int force_threads_per_row;
  int force_splits;
};

// How a call is launched; depends only on the shapes, the dtype and the device (never on data).
struct CBLossCudaPlan {
  Path path;              // kRows or kStream
  int threads_per_row;    // a power of two <= 32 (several rows per block) or the whole block
  int block_threads;
  int64_t grid_rows;      // blocks along the rows (grid x)
  int splits;             // kStream: blocks per row (grid y); > 1 adds a combining kernel
  int chunks_per_split;   // kStream: 16-byte chunks of a row per block
};

// Returns cudaErrorInvalidValue when the forced plan cannot hold the row.
cudaError_t cb_loss_cuda_plan(const CBLossCudaParams& params, CBLossCudaPlan* plan);

// Device memory the launch needs for the partial row results of the split path (0 otherwise).
size_t cb_loss_cuda_workspace_bytes(const CBLossCudaParams& params);

// Queues the kernels on `stream`: no host synchronisation, no allocation, capturable in a CUDA graph.
// A target outside [0, C) that is not ignore_index fails a device-side assert.
cudaError_t cb_loss_cuda_launch(const CBLossCudaParams& params, cudaStream_t stream);

}  // namespace cbkernels::gpu
