// Launch planning and dispatch of the CUDA kernels (see cb_loss_cuda_kernels.cuh for the paths).
//
// The plan depends on the shapes, the dtype and the SM count only, never on data, so a captured CUDA graph
// replays the same launches. Softmax losses take the rows path while the row fits in the registers of at
// most kRowsMaxThreads threads (C up to ~8K float32, ~16K bfloat16/float16, ~4K float64), the stream path
// beyond; the sigmoid losses always stream (they never need a row held). Streamed rows are split over
// several blocks when there are too few rows to fill the device.
#include <algorithm>
#include <climits>

#include "cb_loss_cuda.h"
#include "cb_loss_cuda_args.cuh"

namespace cbkernels::gpu {
namespace {

int chunk_elems(Dtype d) {
  switch (d) {
    case Dtype::kDouble: return 2;
    case Dtype::kHalf:
    case Dtype::kBFloat16: return 8;
    default: return 4;
  }
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

int next_pow2(int64_t x) {
  int p = 1;
  while (p < x) p <<= 1;
  return p;
}

// A power of two up to 32 (several rows per block) or a multiple of 32 up to the block size limit (a block per row).
bool valid_threads_per_row(int tpr, int max_block) {
  return (tpr >= 1 && tpr <= 32 && (tpr & (tpr - 1)) == 0) || (tpr > 32 && tpr <= max_block && tpr % 32 == 0);
}

size_t acc_bytes(Dtype d) { return d == Dtype::kDouble ? sizeof(double) : sizeof(float); }

bool softmax_loss(const CBLossParams& p) { return p.loss_type == kSoftmax || p.loss_type == kSoftmaxFocal; }

// Dense targets: whether the launch first finds every row's sample weight (cb_dense_row_weight_kernel), for the
// "weighted_mean" normaliser or for split sigmoid rows in sample mode, which need it before their gradient.
bool dense_row_weights(const CBLossCudaParams& p, const CBLossCudaPlan& plan) {
  return p.dense_target && ((p.compute_scale && p.reduction == kWeightedMean) ||
                            (!softmax_loss(p) && p.weight_mode == kWeightSample && plan.splits > 1));
}

// Workspace elements (of the compute type) of the split rows' partial results, before the row weights.
size_t split_elems(const CBLossCudaParams& p, const CBLossCudaPlan& plan) {
  if (plan.splits <= 1) return 0;
  const size_t fields = !softmax_loss(p) ? 1 : p.dense_target ? kDenseSplitFields : kStatsFields;
  return static_cast<size_t>(p.num_rows) * plan.splits * fields;
}

}  // namespace

cudaError_t cb_loss_cuda_plan(const CBLossCudaParams& p, CBLossCudaPlan* plan) {
  if (p.num_rows < 0 || p.num_classes < 1 || p.num_classes > INT_MAX - 64 || p.num_rows > INT_MAX) {
    return cudaErrorInvalidValue;
  }
  const int vec = chunk_elems(p.dtype);
  // Chunks of the worst-aligned row: rows start anywhere within 16 bytes when the row stride is not a multiple.
  const int64_t max_chunks = cdiv(p.num_classes + vec - 1, vec);
  // The only path of the sigmoid losses is kStream: they never need a row held; nor does the dense softmax focal loss,
  // which reads a row again after its statistics for its per-column terms.
  const bool held = softmax_loss(p) && !(p.dense_target && p.loss_type == kSoftmaxFocal);
  const int64_t rows_threads = cdiv(max_chunks, kHeld);
  CBLossCudaPlan out{};
  out.path = Path::kStream;
  if (held) {
    out.path = p.force_path != Path::kAuto ? p.force_path : (rows_threads <= kRowsMaxThreads ? Path::kRows : Path::kStream);
  }
  out.splits = 1;
  out.chunks_per_split = static_cast<int>(max_chunks);
  int tpr = p.force_threads_per_row;
  if (out.path == Path::kRows) {
    if (tpr == 0) tpr = rows_threads <= 32 ? next_pow2(rows_threads) : static_cast<int>(cdiv(rows_threads, 32) * 32);
    if (!valid_threads_per_row(tpr, kRowsMaxThreads) || static_cast<int64_t>(tpr) * kHeld < max_chunks) {
      return cudaErrorInvalidValue;
    }
  } else {
    const int64_t loop_threads = cdiv(max_chunks, kUnroll);
    if (tpr == 0) {
      // Just enough threads for one pass of kUnroll chunks each, up to a block of kStreamThreads that loops.
      tpr = loop_threads <= 32 ? next_pow2(loop_threads)
                               : static_cast<int>(std::min<int64_t>(kStreamThreads, cdiv(loop_threads, 32) * 32));
    }
    if (!valid_threads_per_row(tpr, kStreamThreads)) return cudaErrorInvalidValue;
    int64_t splits = p.force_splits;
    if (splits == 0) {
      // One block per row fills the device once there are a couple of rows per SM; fewer, long rows are cut
      // into about kSplitBlocksPerSM blocks per SM in all, each at least one loop iteration long.
      const int64_t sms = p.num_sms > 0 ? p.num_sms : 1;
      splits = 1;
      if (tpr > 32 && p.num_rows < 2 * sms) {
        const int64_t wanted = cdiv(kSplitBlocksPerSM * sms, std::max<int64_t>(p.num_rows, 1));
        splits = std::max<int64_t>(1, std::min(wanted, cdiv(max_chunks, kSplitMinChunks)));
      }
    }
    // Split rows need a block per row: the second launch works per block.
    if (splits < 1 || splits > 65535 || (splits > 1 && tpr <= 32)) return cudaErrorInvalidValue;
    const int64_t per_split = cdiv(max_chunks, splits);
    out.splits = static_cast<int>(cdiv(max_chunks, per_split));  // no empty split
    out.chunks_per_split = static_cast<int>(per_split);
  }
  out.threads_per_row = tpr;
  out.block_threads = tpr <= 32 ? kRowsBlockThreads : tpr;
  out.grid_rows = cdiv(p.num_rows, out.block_threads / tpr);
  *plan = out;
  return cudaSuccess;
}

size_t cb_loss_cuda_workspace_bytes(const CBLossCudaParams& p) {
  CBLossCudaPlan plan;
  if (cb_loss_cuda_plan(p, &plan) != cudaSuccess) return 0;
  const size_t weights = dense_row_weights(p, plan) ? static_cast<size_t>(p.num_rows) : 0;
  return (split_elems(p, plan) + weights) * acc_bytes(p.dtype);
}

cudaError_t cb_loss_cuda_launch(const CBLossCudaParams& p, cudaStream_t stream) {
  CBLossCudaPlan plan;
  const cudaError_t planned = cb_loss_cuda_plan(p, &plan);
  if (planned != cudaSuccess) return planned;
  if (p.num_rows == 0) return cudaSuccess;
  const bool row_weights = dense_row_weights(p, plan);
  if ((plan.splits > 1 || row_weights) && p.workspace == nullptr) return cudaErrorInvalidValue;
  if (p.loss_type < kSoftmax || p.loss_type > kSoftmaxFocal) return cudaErrorInvalidValue;
  // Class weights with index targets are sample weights only for the softmax losses without label smoothing (the
  // index kernels compute those); the API edge sends the other cases as one-hot dense targets.
  const bool index_class_ok = p.loss_type == kSoftmaxFocal || (p.loss_type == kSoftmax && p.label_smoothing == 0.0);
  if (!p.dense_target && p.weight_mode == kWeightClass && !index_class_ok) return cudaErrorInvalidValue;

  KernelArgs a{};
  static_cast<CBLossParams&>(a) = p;
  a.workspace = p.workspace;
  a.threads_per_row = plan.threads_per_row;
  a.splits = plan.splits;
  a.chunks_per_split = plan.chunks_per_split;
  a.gamma_kind = gamma_kind(p.gamma);
  a.has_grad = p.grad != nullptr;
  a.softmax_focal = p.loss_type == kSoftmaxFocal;
  const bool affine = p.logit_offset != nullptr || p.target_margin != nullptr || p.logit_scale != 1.0;
  const bool z_loss = p.z_loss != 0.0 || p.z_rows != nullptr;
  a.tf_kind = p.softcap != 0.0 ? TfKind::kCapped : affine || z_loss ? TfKind::kAffine : TfKind::kOff;
  a.tf_float = LogitTransform<float>::from(p);
  a.tf_double = LogitTransform<double>::from(p);
  a.row_weights = row_weights ? static_cast<char*>(p.workspace) + split_elems(p, plan) * acc_bytes(p.dtype) : nullptr;
  a.focal_phase = 0;

  switch (p.dtype) {
    case Dtype::kHalf: return launch_half(a, plan, p.loss_type, stream);
    case Dtype::kBFloat16: return launch_bfloat16(a, plan, p.loss_type, stream);
    case Dtype::kDouble: return launch_double(a, plan, p.loss_type, stream);
    default: return launch_float(a, plan, p.loss_type, stream);
  }
}

}  // namespace cbkernels::gpu
