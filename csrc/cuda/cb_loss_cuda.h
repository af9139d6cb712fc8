// Launcher interface of the CUDA kernels of cbkernels::cb_loss_fwd / cb_loss_fwd_inplace (schemas in
// cbkernels/_opdefs.py). Torch-free, like the kernels behind it: the binding (cb_loss_cuda_binding.cpp, the only
// CUDA file that sees torch) fills CBLossCudaParams from tensors (csrc/cb_binding.h) and calls these functions.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "../cb_params.h"

namespace cbkernels::gpu {

// Which kernel shape computes a call; kAuto lets cb_loss_cuda_plan decide (tests force the others). The
// sigmoid losses, and the softmax focal loss with a dense target, have the stream path only (they never hold a
// row), whatever is forced.
enum class Path : int { kAuto = 0, kRows = 1, kStream = 2 };

// The kernels' params (cb_params.h; num_classes < 2^31 - 64, num_rows < 2^31) and what a launch adds to them.
struct CBLossCudaParams : CBLossParams {
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

// Device memory the launch needs for the partial row results of the split path and, with a dense target, the rows'
// sample weights when the normaliser or split sigmoid rows need them first (0 otherwise).
size_t cb_loss_cuda_workspace_bytes(const CBLossCudaParams& params);

// Queues the kernels on `stream`: no host synchronisation, no allocation, capturable in a CUDA graph.
// A target outside [0, C) that is not ignore_index fails a device-side assert; dense targets are not checked.
cudaError_t cb_loss_cuda_launch(const CBLossCudaParams& params, cudaStream_t stream);

}  // namespace cbkernels::gpu
