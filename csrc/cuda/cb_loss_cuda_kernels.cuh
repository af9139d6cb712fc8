// CUDA kernels of the four class-balanced losses (SPEC sections 3-4): one skeleton, specialised at compile
// time on the storage type and on the loss family (softmax, or sigmoid with its focal exponent), included
// by one cb_loss_cuda_<dtype>.cu file per storage type so that the instantiations compile in parallel.
//
// A row is read in 16-byte chunks aligned in memory: chunk c of a row covers the columns
// [c V - shift, (c + 1) V - shift), with shift the row start's offset from 16-byte alignment, so every
// load is one 16-byte transaction whatever the row stride. Columns outside [0, C) in the first and last
// chunk are masked out (they belong to a neighbour row or padding of the same aligned 16 bytes: never
// outside the allocation) and are never written: partial chunks are stored element by element, as is
// every chunk when the gradient's alignment differs from the logits'.
//
// Paths (cb_loss_cuda.cu chooses):
// - rows: threads_per_row threads own a row, each holding up to kHeld chunks in registers, so the logits
//   are read once; <= 32 threads per row pack several rows per block (shuffle reductions), more take a
//   block (shared-memory reduction).
// - stream: a block loops over [its part of] a row. Softmax losses keep an online max / sum-exp / distance,
//   then (one block per row) read the row again to write the gradient, or (split rows) leave partials that
//   cb_loss_split_finish_kernel combines in a fixed order. The sigmoid losses need no row statistic and
//   write the gradient in the first pass.
//
// Logit transforms (SPEC section 10) are a compile-time parameter kTf (TfKind) of the kernels that read logits: kOff,
// the kernels of a call without transforms; otherwise every logit read becomes z' (load_logits) and every gradient
// store multiplies dl/dz' by dz'/dz, formed from the raw logit of the same chunk (the raw chunk is what a thread
// holds, so in place the raw z is still there when the gradient overwrites it). The row max, the target logit and
// the partials of split rows are all of z', so the shift of the exps bounds every transformed logit, the target's
// too. The z-loss (SPEC section 11) lives in the softmax row epilogue (cb_math.h); a call with it (or with its per-row
// output z_rows) takes a transform kernel, so that the kOff kernels stay those of a call without any option.
//
// Dense targets (SPEC section 9: q_ij >= 0 per class, no ignored rows) are a compile-time flag kDense of the same
// skeleton, instantiated as their own kernels (cb_dense_*): one per path and storage type, with every transform
// (TfKind::kAny) and the sigmoid focal exponent's kind at run time, so that the index kernels stay as they were. A
// thread reads a chunk's q with the chunk (load_q, in T or float32). Softmax rows keep DenseRowStats (the max's
// columns apart, the target-weighted sums); the softmax focal loss needs lse before its per-column terms, so it reads
// the row once more (split rows: a third launch). The sigmoid losses need the sample weight a_i before their one
// pass writes the gradient: they scan the row's q first (an extra read of q, not of the logits, which the main loop
// then mostly finds in cache), or, where a first launch found every a_i anyway (the "weighted_mean" normaliser, split
// rows), read it from there.
//
// In-place (grad == logits): every element is read before it is written, by the thread that writes it,
// and the target logit travels in registers or the workspace, never re-read after the gradient pass starts.
// Determinism: every reduction is a fixed tree, so equal inputs give equal bits; all threads of a row (and
// all blocks of a split row) end up with bitwise identical row statistics.
#pragma once

#include <cuda_runtime.h>

#include <cassert>
#include <cstdint>
#include <type_traits>

#include "cb_loss_cuda_args.cuh"
#include "cb_loss_cuda_math.cuh"

// The one place kernels are launched. tests/cuda_emu defines it to run the kernels on CPU threads.
#ifndef CB_LAUNCH_KERNEL
#define CB_LAUNCH_KERNEL(grid, block, stream, args, ...) __VA_ARGS__<<<(grid), (block), 0, (stream)>>>(args)
#endif

namespace cbkernels::gpu {

struct SoftmaxFamily {
  static constexpr bool kSoftmax = true;
  static constexpr GammaKind kGamma = GammaKind::kZero;  // the softmax focal exponent is a per-row, runtime value
};
template <GammaKind G>
struct SigmoidFamily {
  static constexpr bool kSoftmax = false;
  static constexpr GammaKind kGamma = G;  // kZero: sigmoid cross-entropy
};

CB_DEVICE float amax(float a, float b) { return fmaxf(a, b); }
CB_DEVICE double amax(double a, double b) { return fmax(a, b); }
CB_DEVICE float afma(float a, float b, float c) { return fmaf(a, b, c); }
CB_DEVICE double afma(double a, double b, double c) { return ::fma(a, b, c); }

// ---------------------------------------------------------------------------------------------------------
// Reductions. Every combine below is commutative bit for bit, so after a butterfly all lanes hold the same
// value; a block reduction is a butterfly per warp, then one over the warps' results.

template <typename A, int K>
struct Vals {
  A v[K];
};

// Online softmax statistics of a set of columns, relative to m' = finite_or_zero(m): s = sum exp(z - m') over
// the non-target columns, dist = sum (m' - z), cnt columns, zy the target logit (0 where absent).
template <typename A>
struct RowStats {
  A m, s, dist, cnt, zy;
};

template <typename A>
CB_DEVICE A shfl_xor(A v, int lane_mask) {
  return __shfl_xor_sync(0xffffffffu, v, lane_mask);
}
template <typename A, int K>
CB_DEVICE Vals<A, K> shfl_xor(const Vals<A, K>& x, int lane_mask) {
  Vals<A, K> r;
#pragma unroll
  for (int k = 0; k < K; ++k) r.v[k] = shfl_xor(x.v[k], lane_mask);
  return r;
}
template <typename A>
CB_DEVICE RowStats<A> shfl_xor(const RowStats<A>& x, int lane_mask) {
  return {shfl_xor(x.m, lane_mask), shfl_xor(x.s, lane_mask), shfl_xor(x.dist, lane_mask),
          shfl_xor(x.cnt, lane_mask), shfl_xor(x.zy, lane_mask)};
}

struct MaxOp {
  template <typename A>
  CB_DEVICE A operator()(A a, A b) const { return amax(a, b); }
};
struct SumOp {
  template <typename A>
  CB_DEVICE A operator()(A a, A b) const { return a + b; }
  template <typename A, int K>
  CB_DEVICE Vals<A, K> operator()(const Vals<A, K>& a, const Vals<A, K>& b) const {
    Vals<A, K> r;
#pragma unroll
    for (int k = 0; k < K; ++k) r.v[k] = a.v[k] + b.v[k];
    return r;
  }
};

template <typename A>
CB_DEVICE RowStats<A> empty_stats() {
  return {-static_cast<A>(INFINITY), A(0), A(0), A(0), A(0)};
}

// Re-expresses x relative to a max M >= x.m: in float an exact power-of-two rescale (see ShiftedExp), so
// statistics combined in any order, under any running maxima, hold the sum every element would have had under
// the final max. A part with no finite max has s = 0 and needs no rescale (and exp(-inf - M) * 0 or cnt * inf
// would be NaN); its dist is 0, or inf when it holds -inf logits.
template <typename A>
CB_DEVICE void rebase(RowStats<A>& x, A M) {
  if (x.m != M && x.m != -static_cast<A>(INFINITY)) {
    x.s = ShiftedExp<A>::rescale(x.s, x.m, M);
    x.dist += x.cnt * (M - x.m);
  }
  x.m = M;
}

// A dense-target softmax row's statistics (SPEC section 9), relative to m' = finite_or_zero(m): the columns at the max
// apart (nmax of them, each with the exp e_max = ex(m')), so that lse - m = log1p((nmax - 1) + s / e_max) keeps its
// relative precision on a confident row and p of the max column is 1 / (nmax + s / e_max) (exactly 1 for C = 1), as
// the index kernels keep the target column apart. With cw_j = w_j in class mode, 1 in sample mode: tq = sum_j cw_j q_j,
// dq = sum_j cw_j q_j (m' - z_j), and the label smoothing's tw = sum_j cw_j, dw = sum_j cw_j (m' - z_j), kept apart
// (T = sum_j cw_j q'_j = (1 - eps) tq + eps / C tw): summed together, the eps / C terms, small and alike, add a
// rounding bias per addition to a larger sum. wq = sum_j w_j q_j (sample mode: a = wq / tq).
template <typename A>
struct DenseRowStats {
  A m, s, nmax, dq, tq, dw, tw, wq;

  // Split rows' partials in the workspace, kDenseStatsFields each.
  CB_DEVICE void store(A* out) const {
    const A v[kDenseStatsFields] = {m, s, nmax, dq, tq, dw, tw, wq};
#pragma unroll
    for (int i = 0; i < kDenseStatsFields; ++i) out[i] = v[i];
  }
  static CB_DEVICE DenseRowStats load(const A* in) {
    return {in[0], in[1], in[2], in[3], in[4], in[5], in[6], in[7]};
  }
};
static_assert(sizeof(DenseRowStats<float>) == kDenseStatsFields * sizeof(float), "DenseRowStats' fields");

template <typename A>
CB_DEVICE DenseRowStats<A> shfl_xor(const DenseRowStats<A>& x, int lane_mask) {
  return {shfl_xor(x.m, lane_mask),  shfl_xor(x.s, lane_mask),  shfl_xor(x.nmax, lane_mask),
          shfl_xor(x.dq, lane_mask), shfl_xor(x.tq, lane_mask), shfl_xor(x.dw, lane_mask),
          shfl_xor(x.tw, lane_mask), shfl_xor(x.wq, lane_mask)};
}

// As rebase above; the columns at the old max join s with their exp under the old shift.
template <typename A>
CB_DEVICE void rebase(DenseRowStats<A>& x, A M) {
  if (x.m != M && x.m != -static_cast<A>(INFINITY)) {
    x.s = ShiftedExp<A>::rescale(x.s + x.nmax * ShiftedExp<A>(x.m)(x.m), x.m, M);
    x.nmax = A(0);
    x.dq += x.tq * (M - x.m);
    x.dw += x.tw * (M - x.m);
  }
  x.m = M;
}

struct StatsOp {
  template <typename A>
  CB_DEVICE RowStats<A> operator()(RowStats<A> a, RowStats<A> b) const {
    const A M = amax(a.m, b.m);
    rebase(a, M);
    rebase(b, M);
    return {M, a.s + b.s, a.dist + b.dist, a.cnt + b.cnt, a.zy + b.zy};
  }
  template <typename A>
  CB_DEVICE DenseRowStats<A> operator()(DenseRowStats<A> a, DenseRowStats<A> b) const {
    const A M = amax(a.m, b.m);
    rebase(a, M);
    rebase(b, M);
    return {M, a.s + b.s, a.nmax + b.nmax, a.dq + b.dq, a.tq + b.tq, a.dw + b.dw, a.tw + b.tw, a.wq + b.wq};
  }
};

template <typename A, bool kDense>
using StatsOf = std::conditional_t<kDense, DenseRowStats<A>, RowStats<A>>;

template <typename A, bool kDense>
CB_DEVICE StatsOf<A, kDense> empty_stats_of() {
  if constexpr (kDense) {
    return {-static_cast<A>(INFINITY), A(0), A(0), A(0), A(0), A(0), A(0), A(0)};
  } else {
    return empty_stats<A>();
  }
}

template <class X, class Op>
CB_DEVICE X warp_allreduce(X x, Op op, int width) {
  for (int o = width >> 1; o > 0; o >>= 1) x = op(x, shfl_xor(x, o));
  return x;
}

// `scratch` holds 32 values and is used once per kernel run (no barrier protects it from a second use).
template <class X, class Op>
CB_DEVICE X block_allreduce(X x, Op op, const X& identity, X* scratch) {
  x = warp_allreduce(x, op, 32);
  const int lane = threadIdx.x & 31;
  if (lane == 0) scratch[threadIdx.x >> 5] = x;
  __syncthreads();
  x = lane < static_cast<int>(blockDim.x >> 5) ? scratch[lane] : identity;
  return warp_allreduce(x, op, 32);
}

// ---------------------------------------------------------------------------------------------------------
// Rows and chunks.

template <typename T>
struct Row {
  using A = typename Storage<T>::Acc;
  const T* z;  // 16-byte aligned: the row start minus `shift` elements
  T* g;        // gradient row start (nullptr without gradient)
  int shift;
  int chunks;  // 16-byte chunks that hold a column of the row
  bool g_aligned_like_z;
  bool valid;  // labelled with a class in [0, C)
  int y;       // target class, -1 (no column) when not valid
  A a;         // class weight w[y], 0 when not valid
  LogitTransform<A> tf;  // read by the transform kernels only (kTf != kOff; dead, so free, in the others)
  // Dense targets (kDense kernels only): the row's q, in T or float32, and whether a chunk's q lies in aligned vector
  // pieces like the logits' chunk (q laid out as the logits, the contiguous case).
  const void* q;
  bool q_float;
  bool q_vec;
};

// The row's target (cb_params.h); rows past the end count as ignored.
CB_DEVICE IndexTarget row_target(const KernelArgs& p, int64_t row, bool in_range) {
  if (!in_range) return IndexTarget{p.ignore_index, false};
  const IndexTarget t = index_target(p, row);
  // The API edge already asserts this on the device; here it guards the w[y] and z[y] reads.
  if (t.bad(p)) __assert_fail("cbkernels: target outside [0, C) and not ignore_index", __FILE__, __LINE__, __func__);
  return t;
}

// A dense row (kDense) counts whenever it exists (no ignore_index); its sample weight is the kernels' to find.
template <typename T, bool kDense = false>
CB_DEVICE Row<T> load_row(const KernelArgs& p, int64_t row, bool in_range) {
  constexpr int V = Storage<T>::kVec;
  Row<T> r;
  // int64 offsets: row * stride passes 2^31 elements for large N * C.
  const T* z_row = static_cast<const T*>(p.logits) + row * p.logits_row_stride;
  r.shift = static_cast<int>((reinterpret_cast<uintptr_t>(z_row) & 15u) / sizeof(T));
  r.z = z_row - r.shift;
  r.chunks = (r.shift + static_cast<int>(p.num_classes) + V - 1) / V;
  r.g = p.has_grad ? static_cast<T*>(p.grad) + row * p.grad_row_stride : nullptr;
  r.g_aligned_like_z = static_cast<int>((reinterpret_cast<uintptr_t>(r.g) & 15u) / sizeof(T)) == r.shift;
  if constexpr (kDense) {
    r.valid = in_range;
    r.y = -1;
    r.a = typename Row<T>::A(1);
    r.q_float = !std::is_same_v<T, float> && p.target_dtype == Dtype::kFloat;
    const size_t q_size = r.q_float ? sizeof(float) : sizeof(T);
    const char* q_row = static_cast<const char*>(p.target) + row * p.target_row_stride * static_cast<int64_t>(q_size);
    r.q = q_row;
    // A chunk's q is V elements from column c V - shift: 8, 16 or 32 bytes, loaded in pieces of up to 16.
    const size_t piece = V * q_size < 16 ? V * q_size : 16;
    r.q_vec = (reinterpret_cast<uintptr_t>(q_row) - r.shift * q_size) % piece == 0;
  } else {
    const IndexTarget t = row_target(p, row, in_range);
    r.valid = t.valid;
    r.y = t.valid ? static_cast<int>(t.column) : -1;
    r.a = t.weight<typename Row<T>::A>(p);
  }
  r.tf = p.transform<typename Row<T>::A>();
  return r;
}

template <typename T>
CB_DEVICE uint4 load_chunk(const Row<T>& r, int c) {
  return *reinterpret_cast<const uint4*>(r.z + static_cast<int64_t>(c) * Storage<T>::kVec);
}

// Every logit read: chunk c's logits in the compute type; with transforms (kTf) the transformed z' (cb_math.h's
// LogitTransform, in SPEC's order) and f = dz'/dz = s (1 - tanh(z / c)^2), from one tanh_sech2_gpu per element. The
// vectors are read for the columns of the row only (masked lanes keep c tanh(z / c) s, never used); the margin at the
// target column only, or (kDense, q given) m_j q_j at every column. Callers that store no gradient leave f unread, and
// the compiler drops it.
template <TfKind kTf, bool kDense, typename T>
CB_DEVICE void load_logits_impl(const Row<T>& r, int c, int num_classes, const uint4& raw,
                                const typename Storage<T>::Acc* q, typename Storage<T>::Acc (&x)[Storage<T>::kVec],
                                typename Storage<T>::Acc (&f)[Storage<T>::kVec]) {
  using A = typename Storage<T>::Acc;
  constexpr int V = Storage<T>::kVec;
  Storage<T>::unpack(raw, x);
  if constexpr (kTf != TfKind::kOff) {
    const LogitTransform<A>& tf = r.tf;
#pragma unroll
    for (int l = 0; l < V; ++l) {
      const int col = c * V + l - r.shift;
      A v = x[l], dv = tf.scale;
      if constexpr (kTf == TfKind::kCapped) {
        const Tanh<A> th = tanh_sech2_gpu(x[l] * tf.inv_cap);
        v = tf.cap * th.t;
        dv *= th.sech2;
      } else if constexpr (kTf == TfKind::kAny) {
        if (tf.cap != A(0)) {
          const Tanh<A> th = tanh_sech2_gpu(x[l] * tf.inv_cap);
          v = tf.cap * th.t;
          dv *= th.sech2;
        }
      }
      if (col >= 0 && col < num_classes) {
        if (tf.offset != nullptr) v += static_cast<A>(tf.offset[col]);
        if constexpr (kDense) {
          if (tf.margin != nullptr) v -= static_cast<A>(tf.margin[col]) * q[l];
        } else {
          if (col == r.y && tf.margin != nullptr) v -= static_cast<A>(tf.margin[col]);
        }
      }
      x[l] = v * tf.scale;
      f[l] = dv;
    }
  } else {
#pragma unroll
    for (int l = 0; l < V; ++l) f[l] = A(1);
  }
}

template <TfKind kTf, typename T>
CB_DEVICE void load_logits(const Row<T>& r, int c, int num_classes, const uint4& raw,
                           typename Storage<T>::Acc (&x)[Storage<T>::kVec],
                           typename Storage<T>::Acc (&f)[Storage<T>::kVec]) {
  load_logits_impl<kTf, false>(r, c, num_classes, raw, nullptr, x, f);
}

// The same for a dense row, whose margin scales with the chunk's targets q.
template <TfKind kTf, typename T>
CB_DEVICE void load_logits(const Row<T>& r, int c, int num_classes, const uint4& raw,
                           const typename Storage<T>::Acc (&q)[Storage<T>::kVec],
                           typename Storage<T>::Acc (&x)[Storage<T>::kVec],
                           typename Storage<T>::Acc (&f)[Storage<T>::kVec]) {
  load_logits_impl<kTf, true>(r, c, num_classes, raw, q, x, f);
}

// ---------------------------------------------------------------------------------------------------------
// Dense targets (SPEC section 9): the chunk's q and the call's per-class constants.

CB_DEVICE float to_compute(float v) { return v; }
CB_DEVICE double to_compute(double v) { return v; }
CB_DEVICE float to_compute(__half v) { return __half2float(v); }
CB_DEVICE float to_compute(__nv_bfloat16 v) { return __bfloat162float(v); }

// A chunk's targets as read, in V compute-type values' room: the aligned vector pieces as stored (r.q_vec; each piece
// read whole when it holds a column of the row, so within the allocation as the logits' chunks are), or else the
// elements read one by one, converted and packed. unpack_q makes values of them, so that a loop keeps the targets of
// the chunks it has in flight in a few registers, loaded with their logits.
template <typename T>
struct QChunk {
  static constexpr int kWords = Storage<T>::kVec * sizeof(typename Storage<T>::Acc) / 16;  // 2 for 16-bit logits
  uint4 w[kWords];
};

template <typename Q, typename T>
CB_DEVICE void load_q_raw_as(const Row<T>& r, int c, int num_classes, QChunk<T>& out) {
  using A = typename Storage<T>::Acc;
  constexpr int V = Storage<T>::kVec;
  const int col0 = c * V - r.shift;
  const Q* base = static_cast<const Q*>(r.q) + col0;
  if (r.q_vec) {
    if constexpr (std::is_same_v<Q, T>) {
      out.w[0] = *reinterpret_cast<const uint4*>(base);
    } else if constexpr (V * sizeof(Q) == 32) {  // float32 targets of 16-bit logits: two 16-byte pieces
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if (col0 + 4 * h + 4 > 0 && col0 + 4 * h < num_classes) {
          out.w[h] = *reinterpret_cast<const uint4*>(base + 4 * h);
        }
      }
    } else {  // float32 targets of float64 logits: one 8-byte piece
      static_assert(V * sizeof(Q) == 8, "a chunk's targets are 8, 16 or 32 bytes");
      const uint2 w = *reinterpret_cast<const uint2*>(base);
      out.w[0] = make_uint4(w.x, w.y, 0u, 0u);
    }
  } else {
    constexpr int kPerWord = 16 / sizeof(A);
#pragma unroll
    for (int k = 0; k < QChunk<T>::kWords; ++k) {
      A v[kPerWord];
#pragma unroll
      for (int l = 0; l < kPerWord; ++l) {
        const int col = col0 + k * kPerWord + l;
        v[l] = col >= 0 && col < num_classes ? static_cast<A>(to_compute(base[k * kPerWord + l])) : A(0);
      }
      out.w[k] = Storage<A>::pack(v);
    }
  }
}

// Chunk c's targets as read (zeros for a row that does not exist).
template <typename T>
CB_DEVICE QChunk<T> load_q_raw(const Row<T>& r, int c, int num_classes) {
  QChunk<T> out;
#pragma unroll
  for (int k = 0; k < QChunk<T>::kWords; ++k) out.w[k] = make_uint4(0u, 0u, 0u, 0u);
  if (!r.valid) return out;
  if constexpr (std::is_same_v<T, float>) {
    load_q_raw_as<float>(r, c, num_classes, out);
  } else {
    if (r.q_float) {
      load_q_raw_as<float>(r, c, num_classes, out);
    } else {
      load_q_raw_as<T>(r, c, num_classes, out);
    }
  }
  return out;
}

// Chunk c's targets in the compute type, 0 outside the row.
template <typename T>
CB_DEVICE void unpack_q(const Row<T>& r, int c, int num_classes, const QChunk<T>& qc,
                        typename Storage<T>::Acc (&q)[Storage<T>::kVec]) {
  using A = typename Storage<T>::Acc;
  constexpr int V = Storage<T>::kVec;
  constexpr int kPerWord = 16 / sizeof(A);
  // Elements read one by one, and float32 targets of float32 or 16-bit logits, are compute-type words already.
  const bool words = std::is_same_v<T, float> || !r.q_vec || (r.q_float && V * sizeof(float) == 32);
  if (words) {
#pragma unroll
    for (int k = 0; k < QChunk<T>::kWords; ++k) {
      A v[kPerWord];
      Storage<A>::unpack(qc.w[k], v);
#pragma unroll
      for (int l = 0; l < kPerWord; ++l) q[k * kPerWord + l] = v[l];
    }
  } else if (!r.q_float) {
    Storage<T>::unpack(qc.w[0], q);
  } else {  // float32 targets of float64 logits
    q[0] = static_cast<A>(__uint_as_float(qc.w[0].x));
    q[1] = static_cast<A>(__uint_as_float(qc.w[0].y));
  }
  if (r.q_vec) {  // the pieces hold neighbours' targets outside the row
    const int col0 = c * V - r.shift;
#pragma unroll
    for (int l = 0; l < V; ++l) {
      if (col0 + l < 0 || col0 + l >= num_classes) q[l] = A(0);
    }
  }
}

// Chunk c's targets in the compute type, read now.
template <typename T>
CB_DEVICE void load_q(const Row<T>& r, int c, int num_classes, typename Storage<T>::Acc (&q)[Storage<T>::kVec]) {
  unpack_q(r, c, num_classes, load_q_raw(r, c, num_classes), q);
}

// A dense call's constants: the column weights cw_j (w_j in class mode, 1 in sample mode), the label smoothing
// q' = keep q + spread (softmax cross-entropy; keep 1, spread 0 otherwise), the softmax-focal exponent.
template <typename A>
struct DenseCall {
  const float* w;
  bool class_mode;
  bool focal;  // softmax focal
  A keep;
  A spread;
  A gamma_hi;  // the softmax-focal gamma = gamma_hi + gamma_lo (dense_focal_column)
  A gamma_lo;
  GammaKind gk;

  CB_DEVICE explicit DenseCall(const KernelArgs& p)
      : w(p.weight),
        class_mode(p.weight_mode == kWeightClass),
        focal(p.softmax_focal),
        keep(focal ? A(1) : A(1) - static_cast<A>(p.label_smoothing)),
        spread(focal ? A(0) : static_cast<A>(p.label_smoothing / static_cast<double>(p.num_classes))),
        gamma_hi(static_cast<A>(p.gamma)),
        gamma_lo(static_cast<A>(p.gamma - static_cast<double>(static_cast<A>(p.gamma)))),
        gk(p.gamma_kind) {}

  CB_DEVICE A column_weight(int col) const { return class_mode ? static_cast<A>(w[col]) : A(1); }
};

// The sample weight a = sum_j w_j q_j / sum_j q_j, 1 for a row without mass (a NaN target stays NaN).
template <typename A>
CB_DEVICE A sample_weight(A wq, A mass) {
  return mass != A(0) ? wq / mass : A(1);
}

// Every gradient store: chunk c's dl/dz' times f = dz'/dz (kTf; load_logits), rounded once to T.
template <TfKind kTf, typename T>
CB_DEVICE void store_chunk(const Row<T>& r, int c, int num_classes, const typename Storage<T>::Acc (&dz)[Storage<T>::kVec],
                           const typename Storage<T>::Acc (&f)[Storage<T>::kVec]) {
  constexpr int V = Storage<T>::kVec;
  typename Storage<T>::Acc g[V];
#pragma unroll
  for (int l = 0; l < V; ++l) g[l] = kTf != TfKind::kOff ? dz[l] * f[l] : dz[l];
  const int col0 = c * V - r.shift;
  if (r.g_aligned_like_z && col0 >= 0 && col0 + V <= num_classes) {
    *reinterpret_cast<uint4*>(r.g + col0) = Storage<T>::pack(g);
    return;
  }
#pragma unroll
  for (int l = 0; l < V; ++l) {
    const int col = col0 + l;
    if (col >= 0 && col < num_classes) Storage<T>::store(r.g + col, g[l]);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Per-element work on one chunk.

template <TfKind kTf, typename T>
CB_DEVICE typename Storage<T>::Acc chunk_max(const Row<T>& r, int c, int num_classes, const uint4& raw,
                                             typename Storage<T>::Acc m) {
  constexpr int V = Storage<T>::kVec;
  typename Storage<T>::Acc x[V], f[V];
  load_logits<kTf>(r, c, num_classes, raw, x, f);
#pragma unroll
  for (int l = 0; l < V; ++l) {
    const int col = c * V + l - r.shift;
    if (col >= 0 && col < num_classes) m = amax(m, x[l]);
  }
  return m;
}

// Adds the chunk's columns to statistics kept relative to m (a finite shift, see finite_or_zero).
template <TfKind kTf, typename T>
CB_DEVICE void chunk_stats(const Row<T>& r, int c, int num_classes, const uint4& raw,
                           const ShiftedExp<typename Storage<T>::Acc>& ex, typename Storage<T>::Acc m,
                           RowStats<typename Storage<T>::Acc>& st) {
  using A = typename Storage<T>::Acc;
  constexpr int V = Storage<T>::kVec;
  A x[V], f[V];
  load_logits<kTf>(r, c, num_classes, raw, x, f);
#pragma unroll
  for (int l = 0; l < V; ++l) {
    const int col = c * V + l - r.shift;
    if (col >= 0 && col < num_classes) {
      const A e = ex(x[l]);
      if (col == r.y) {
        st.zy = x[l];
      } else {
        st.s += e;
      }
      st.dist += m - x[l];
      st.cnt += A(1);
    }
  }
}

template <TfKind kTf, typename T>
CB_DEVICE void chunk_softmax_grad(const Row<T>& r, int c, int num_classes, const uint4& raw,
                                  const ShiftedExp<typename Storage<T>::Acc>& ex,
                                  const SoftmaxRowOut<typename Storage<T>::Acc>& row) {
  using A = typename Storage<T>::Acc;
  constexpr int V = Storage<T>::kVec;
  A x[V], f[V], g[V];
  load_logits<kTf>(r, c, num_classes, raw, x, f);
#pragma unroll
  for (int l = 0; l < V; ++l) {
    const int col = c * V + l - r.shift;
    // p_j - q_j in the compute type, then one rounding to T (SPEC section 6).
    const A gj = col == r.y ? row.gy : afma(row.k1, ex(x[l]), -row.k0);
    g[l] = r.valid ? gj : A(0);
  }
  store_chunk<kTf>(r, c, num_classes, g, f);
}

// Sigmoid / focal terms of a chunk: returns the sum of the loss terms over its columns and, with a gradient,
// stores k * d term / d z (k = a_i * scale).
template <typename T, GammaKind G, TfKind kTf>
CB_DEVICE typename Storage<T>::Acc chunk_sigmoid(const Row<T>& r, int c, int num_classes, const uint4& raw,
                                                 typename Storage<T>::Acc gamma, typename Storage<T>::Acc k,
                                                 bool has_grad) {
  using A = typename Storage<T>::Acc;
  using M = typename ElemMath<A>::type;
  constexpr int V = Storage<T>::kVec;
  A x[V], f[V], g[V];
  A acc = A(0);
  load_logits<kTf>(r, c, num_classes, raw, x, f);
  if (r.valid) {
#pragma unroll
    for (int l = 0; l < V; ++l) {
      const int col = c * V + l - r.shift;
      const bool is_target = col == r.y;
      // v = s z with s = +1 on the target and -1 elsewhere; d term / d z = -s dterm (cb_math.h focal_term).
      A term, dterm;
      focal_term<G, M>(is_target ? x[l] : -x[l], gamma, term, dterm);
      if (col >= 0 && col < num_classes) acc += term;
      g[l] = (is_target ? -dterm : dterm) * k;
    }
  } else {
#pragma unroll
    for (int l = 0; l < V; ++l) g[l] = A(0);
  }
  if (has_grad) store_chunk<kTf>(r, c, num_classes, g, f);
  return acc;
}

// ---------------------------------------------------------------------------------------------------------
// Per-element work on one chunk of a dense row (SPEC section 9). Each reads the chunk's q itself (the logits' chunk
// comes in raw, read by the caller as in the index kernels).

// Adds the chunk's columns to online DenseRowStats: the chunk's max first (rebasing st when it is larger), then its
// sums relative to the new max, from the same transformed logits. One logit read per element, where the index kernels
// read a chunk twice (max, then sums): the dense ones transform every logit at run time (kAny), and twice the long
// transforms made twice their build time; the statistics of a row's threads meet different maxima either way
// (StatsOp rebases them, exactly: see ShiftedExp).
template <TfKind kTf, typename T>
CB_DEVICE void dense_chunk_stats(const Row<T>& r, int c, int num_classes, const uint4& raw, const QChunk<T>& qc,
                                 const DenseCall<typename Storage<T>::Acc>& dc,
                                 DenseRowStats<typename Storage<T>::Acc>& st) {
  using A = typename Storage<T>::Acc;
  constexpr int V = Storage<T>::kVec;
  A q[V], x[V], f[V];
  unpack_q(r, c, num_classes, qc, q);
  load_logits<kTf>(r, c, num_classes, raw, q, x, f);
  A chunk_max = -static_cast<A>(INFINITY);
#pragma unroll
  for (int l = 0; l < V; ++l) {
    const int col = c * V + l - r.shift;
    if (col >= 0 && col < num_classes) chunk_max = amax(chunk_max, x[l]);
  }
  if (chunk_max > st.m) rebase(st, chunk_max);
  const A m = finite_or_zero(st.m);
  const ShiftedExp<A> ex(m);
  // The chunk's sums first, then one addition each to the row's (fewer roundings against the larger sums).
  DenseRowStats<A> part{m, A(0), A(0), A(0), A(0), A(0), A(0), A(0)};
#pragma unroll
  for (int l = 0; l < V; ++l) {
    const int col = c * V + l - r.shift;
    if (col >= 0 && col < num_classes) {
      const A e = ex(x[l]);
      if (x[l] == m) {
        part.nmax += A(1);
      } else {
        part.s += e;
      }
      const A w = static_cast<A>(dc.w[col]);
      const A cw = dc.class_mode ? w : A(1);
      const A ct = cw * q[l];
      // A column without target adds nothing to dq, a masked (-inf) one included (0 * inf would be NaN).
      part.dq += ct != A(0) ? ct * (m - x[l]) : A(0);
      part.tq += ct;
      part.dw = afma(cw, m - x[l], part.dw);
      part.tw += cw;
      part.wq = afma(w, q[l], part.wq);
    }
  }
  st.s += part.s;
  st.nmax += part.nmax;
  st.dq += part.dq;
  st.tq += part.tq;
  st.dw += part.dw;
  st.tw += part.tw;
  st.wq += part.wq;
}

// The softmax cross-entropy sums of a dense row: T = sum_j t_j and sum_j t_j (lse - z_j) = D + T (lse - m), with
// t_j = cw_j q'_j and D = sum_j t_j (m - z_j) (every term >= 0: no cancellation). A part with a zero factor is left out
// (its sum may be inf: masked logits).
template <typename A>
CB_DEVICE Vals<A, 2> dense_ce_sums(const DenseCall<A>& dc, const DenseRowStats<A>& st, A lmse) {
  A T = dc.keep != A(0) ? dc.keep * st.tq : A(0);
  A D = dc.keep != A(0) ? dc.keep * st.dq : A(0);
  if (dc.spread != A(0)) {
    T = afma(dc.spread, st.tw, T);
    D = afma(dc.spread, st.dw, D);
  }
  return {{T, afma(T, lmse, D)}};
}

// What a dense softmax row's epilogue gives its passes: lse - m, the sample weight, and the gradient
//   g_j = a s (T p_j - t_j) + 2 z_loss lse s p_j  (t_j = cw_j q'_j, T = sum_j t_j; softmax focal: t_j = cw_j q_j c_j)
// as g_j = k1 e_j - k t_j below the max and (kmax - k t_j) - cmax at it. A max column with p_j >= 1/2 takes
// T p_j - t_j = (T - t_j) - T (1 - p_j), which keeps a confident column's 1 - p_j (formed from the others' exps, no
// cancellation) as the index kernels keep the target's; below 1/2 that form would cancel instead (T - T (1 - p_j)),
// and T p_j - t_j is the accurate one.
template <typename A>
struct DenseSoftmaxRow {
  A lmse;  // lse - m
  A a;     // sample weight (1 in class mode)
  A sum;   // sum_j e_j under the shift
  A pmax;  // p of a column at the max
  A om;    // 1 - pmax
  A z;     // z_loss lse^2
  A kz;    // 2 z_loss lse s
  A k;     // a s
  A loss, k1, kmax, cmax;
};

// The part of the epilogue the statistics decide (the softmax focal loss needs lse before its terms).
template <typename A>
CB_DEVICE DenseSoftmaxRow<A> dense_softmax_head(const KernelArgs& p, const DenseRowStats<A>& st,
                                                const ShiftedExp<A>& ex, A m) {
  DenseSoftmaxRow<A> o;
  // kPow2 (float): e_max = 2^r up to the hardware exp's error, which the exact 2^r of lse - m = log(sum / 2^r) leaves
  // out (for C = 1, lse - m is exactly 0).
  const A emax = ex(m);
  const A rest = (st.nmax - A(1)) + st.s / emax;  // (sum - e_max) / e_max
  const A tot = rest + A(1);
  o.lmse = cb_log1p(rest);
  o.sum = emax * tot;
  o.pmax = A(1) / tot;
  o.om = rest * o.pmax;
  o.a = p.weight_mode == kWeightClass ? A(1) : sample_weight(st.wq, st.tq);
  const A scale = load_scale<A>(p);
  o.k = o.a * scale;
  o.z = A(0);
  o.kz = A(0);
  if (p.z_loss != 0.0) {
    const A lse = m + o.lmse;
    const A zl = static_cast<A>(p.z_loss);
    o.z = zl * lse * lse;
    o.kz = A(2) * zl * lse * scale;
  }
  return o;
}

// The rest, from the row's target sum T and its loss before the weight.
template <typename A>
CB_DEVICE void dense_softmax_tail(DenseSoftmaxRow<A>& o, A target_sum, A row_loss) {
  o.loss = o.a * row_loss + o.z;
  const A kT = o.k * target_sum;
  o.k1 = (kT + o.kz) / o.sum;
  const bool confident = o.pmax >= A(0.5);
  o.kmax = confident ? kT : (kT + o.kz) * o.pmax;
  o.cmax = confident ? kT * o.om - o.kz * o.pmax : A(0);
}

// v[l] for a run-time l without indexing the array at run time (which would move it to local memory): V - 1 selects.
template <typename A, int V>
CB_DEVICE A pick(const A (&v)[V], int l) {
  A out = v[0];
#pragma unroll
  for (int k = 1; k < V; ++k) out = k == l ? v[k] : out;
  return out;
}

// Softmax focal column terms (SPEC section 9) of chunk c's columns with q_j != 0: L_j = lse - z_j = (m - z_j) +
// (lse - m) (no cancellation), and dense_focal_column at L_j gives (1-P_j)^gamma and c_j, times cw_j q_j. The terms
// are long (expm1, exp, log): one copy of them per call site, the chunk's columns in turn (a rolled loop), rather
// than V unrolled copies (the build time, and no gain where the transcendentals dominate).
template <typename A, int V>
struct DenseFocalColumns {
  A loss[V];  // cw_j q_j (1-P_j)^gamma L_j
  A t[V];     // cw_j q_j c_j
};

template <typename A, int V>
CB_DEVICE DenseFocalColumns<A, V> dense_focal_columns(const DenseCall<A>& dc, int col0, int num_classes,
                                                     const A (&q)[V], const A (&x)[V], A m, A lmse) {
  DenseFocalColumns<A, V> out;
#pragma unroll
  for (int l = 0; l < V; ++l) {
    out.loss[l] = A(0);
    out.t[l] = A(0);
  }
#pragma unroll 1
  for (int l = 0; l < V; ++l) {
    const A ql = pick(q, l);
    const int col = col0 + l;
    if (col >= 0 && col < num_classes && ql != A(0)) {
      const A L = (m - pick(x, l)) + lmse;
      A mod, coef;
      dense_focal_column(L, dc.gamma_hi, dc.gamma_lo, dc.gk, mod, coef);
      const A cq = dc.column_weight(col) * ql;
      const A loss = cq * mod * L, t = cq * coef;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        out.loss[k] = k == l ? loss : out.loss[k];
        out.t[k] = k == l ? t : out.t[k];
      }
    }
  }
  return out;
}

// Adds the chunk's softmax focal terms: v[0] = sum_j cw_j q_j (1-P_j)^gamma L_j, v[1] = sum_j cw_j q_j c_j.
template <TfKind kTf, typename T>
CB_DEVICE void dense_chunk_focal(const Row<T>& r, int c, int num_classes, const uint4& raw, const QChunk<T>& qc,
                                 const DenseCall<typename Storage<T>::Acc>& dc, typename Storage<T>::Acc m,
                                 typename Storage<T>::Acc lmse, Vals<typename Storage<T>::Acc, 2>& acc) {
  using A = typename Storage<T>::Acc;
  constexpr int V = Storage<T>::kVec;
  A q[V], x[V], f[V];
  unpack_q(r, c, num_classes, qc, q);
  load_logits<kTf>(r, c, num_classes, raw, q, x, f);
  const DenseFocalColumns<A, V> cols = dense_focal_columns(dc, c * V - r.shift, num_classes, q, x, m, lmse);
#pragma unroll
  for (int l = 0; l < V; ++l) {
    acc.v[0] += cols.loss[l];
    acc.v[1] += cols.t[l];
  }
}

// Gradient of a dense softmax chunk (DenseSoftmaxRow); kFocal: t_j = cw_j q_j c_j, recomputed per column.
template <bool kFocal, TfKind kTf, typename T>
CB_DEVICE void dense_chunk_softmax_grad(const Row<T>& r, int c, int num_classes, const uint4& raw, const QChunk<T>& qc,
                                        const DenseCall<typename Storage<T>::Acc>& dc,
                                        const ShiftedExp<typename Storage<T>::Acc>& ex, typename Storage<T>::Acc m,
                                        const DenseSoftmaxRow<typename Storage<T>::Acc>& row) {
  using A = typename Storage<T>::Acc;
  constexpr int V = Storage<T>::kVec;
  A q[V], x[V], f[V], g[V];
  unpack_q(r, c, num_classes, qc, q);
  load_logits<kTf>(r, c, num_classes, raw, q, x, f);
  DenseFocalColumns<A, V> focal;
  if constexpr (kFocal) focal = dense_focal_columns(dc, c * V - r.shift, num_classes, q, x, m, row.lmse);
#pragma unroll
  for (int l = 0; l < V; ++l) {
    const int col = c * V + l - r.shift;
    const bool in_row = col >= 0 && col < num_classes;
    A t = A(0);
    if constexpr (kFocal) {
      t = focal.t[l];
    } else if (in_row) {
      // As dense_ce_sums forms T: a single column's t_j is T bit for bit (C = 1: a zero gradient).
      const A cw = dc.column_weight(col);
      t = afma(dc.spread, cw, dc.keep * (cw * q[l]));
    }
    const A gj = x[l] == m ? (row.kmax - row.k * t) - row.cmax : afma(row.k1, ex(x[l]), -row.k * t);
    g[l] = r.valid ? gj : A(0);
  }
  store_chunk<kTf>(r, c, num_classes, g, f);
}

// Sigmoid / focal terms of a dense chunk: returns sum_j cw_j term_j over its columns and, with a gradient, stores
// k cw_j d term_j / d z (k = a_i * scale). The focal exponent's kind is a runtime value here (one kernel for all).
template <TfKind kTf, typename T>
CB_DEVICE typename Storage<T>::Acc dense_chunk_sigmoid(const Row<T>& r, int c, int num_classes, const uint4& raw,
                                                       const QChunk<T>& qc,
                                                       const DenseCall<typename Storage<T>::Acc>& dc,
                                                       typename Storage<T>::Acc gamma, GammaKind gk,
                                                       typename Storage<T>::Acc k, bool has_grad) {
  using A = typename Storage<T>::Acc;
  using M = typename ElemMath<A>::type;
  constexpr int V = Storage<T>::kVec;
  A q[V], x[V], f[V], g[V];
  A acc = A(0);
  unpack_q(r, c, num_classes, qc, q);
  load_logits<kTf>(r, c, num_classes, raw, q, x, f);
  if (r.valid) {
#pragma unroll
    for (int l = 0; l < V; ++l) {
      const int col = c * V + l - r.shift;
      const bool in_row = col >= 0 && col < num_classes;
      A term, dterm;
      dense_sigmoid_term<M>(x[l], q[l], gamma, gk, term, dterm);
      const A cw = in_row ? dc.column_weight(col) : A(0);
      if (in_row) acc = afma(cw, term, acc);
      g[l] = dterm * (cw * k);
    }
  } else {
#pragma unroll
    for (int l = 0; l < V; ++l) g[l] = A(0);
  }
  if (has_grad) store_chunk<kTf>(r, c, num_classes, g, f);
  return acc;
}

// The row epilogue of cb_math.h from the row's statistics (m = finite_or_zero of its max). The kOff kernels never see
// a z-loss (the launcher sends it to a transform kernel): its z_loss, 0 at compile time, removes the epilogue's z-loss
// branch and the registers it holds (1 to 3 in the rows kernels).
template <TfKind kTf, typename T>
CB_DEVICE SoftmaxRowOut<typename Storage<T>::Acc> finish_softmax_row(const KernelArgs& p, const Row<T>& r,
                                                                     const RowStats<typename Storage<T>::Acc>& st,
                                                                     const ShiftedExp<typename Storage<T>::Acc>& ex,
                                                                     typename Storage<T>::Acc m) {
  using A = typename Storage<T>::Acc;
  using Epilogue = SoftmaxEpilogue<ShiftedExp<A>::kShift, A>;
  const SoftmaxRowStats<A> stats{m, st.zy, ex(st.zy), st.s, st.dist, ex.log_offset(m)};
  if constexpr (kTf == TfKind::kOff) {
    CBLossParams no_z_loss = p;
    no_z_loss.z_loss = 0.0;
    return Epilogue(no_z_loss, p.gamma_kind, load_scale<A>(p))(stats, r.a);
  } else {
    return Epilogue(p, p.gamma_kind, load_scale<A>(p))(stats, r.a);
  }
}

// A softmax row's outputs: its loss (z-loss term included) and, when asked (never in the kOff kernels, see TfKind),
// the z-loss term alone; 0 for a row that does not count.
template <TfKind kTf, typename T>
CB_DEVICE void store_softmax_row(const KernelArgs& p, const Row<T>& r, int64_t row,
                                 const SoftmaxRowOut<typename Storage<T>::Acc>& out) {
  using A = typename Storage<T>::Acc;
  static_cast<A*>(p.loss)[row] = r.valid ? out.loss : A(0);
  if constexpr (kTf != TfKind::kOff) {
    if (p.z_rows != nullptr) static_cast<A*>(p.z_rows)[row] = r.valid ? out.z : A(0);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Kernels. threads_per_row threads own a row: a power of two up to 32 packs several rows per block (their
// reductions are shuffles within the group), more is the whole block (shared-memory reduction).

struct RowGroup {
  int64_t row;
  int t;    // thread within the row's group
  int tpr;  // threads per row
  bool block_per_row;
  bool in_range;  // rows past the end still take part in their warp's shuffles; they only skip memory
};

CB_DEVICE RowGroup row_group(const KernelArgs& p) {
  RowGroup g;
  g.tpr = p.threads_per_row;
  g.block_per_row = g.tpr > 32;
  g.t = g.block_per_row ? static_cast<int>(threadIdx.x) : static_cast<int>(threadIdx.x) & (g.tpr - 1);
  g.row = g.block_per_row ? static_cast<int64_t>(blockIdx.x)
                          : static_cast<int64_t>(blockIdx.x) * (blockDim.x / g.tpr) + threadIdx.x / g.tpr;
  g.in_range = g.row < p.num_rows;
  return g;
}

template <class X, class Op>
CB_DEVICE X group_allreduce(const RowGroup& g, X x, Op op, const X& identity, X* scratch) {
  return g.block_per_row ? block_allreduce(x, op, identity, scratch) : warp_allreduce(x, op, g.tpr);
}

// sum_j w_j q_j and sum_j q_j of a dense row, summed over the row's group (every thread of the group calls it).
template <typename T>
CB_DEVICE Vals<typename Storage<T>::Acc, 2> dense_row_mass(const RowGroup& g, const Row<T>& r, int num_classes,
                                                          const float* w, Vals<typename Storage<T>::Acc, 2>* scratch) {
  using A = typename Storage<T>::Acc;
  constexpr int V = Storage<T>::kVec;
  Vals<A, 2> acc{{A(0), A(0)}};
  if (r.valid) {
    for (int c = g.t; c < r.chunks; c += g.tpr) {
      A q[V];
      load_q(r, c, num_classes, q);
#pragma unroll
      for (int l = 0; l < V; ++l) {
        const int col = c * V + l - r.shift;
        if (col >= 0 && col < num_classes) {
          acc.v[0] = afma(static_cast<A>(w[col]), q[l], acc.v[0]);
          acc.v[1] += q[l];
        }
      }
    }
  }
  return group_allreduce(g, acc, SumOp{}, Vals<A, 2>{{A(0), A(0)}}, scratch);
}

// The sigmoid losses' sample weight a_i of a row before its gradient: w[y_i] (index targets); for a dense row 1 in
// class mode, else sum_j w_j q_j / sum_j q_j from the first launch's row_weights when it ran, or from a scan of the
// row's targets.
template <bool kDense, typename T>
CB_DEVICE typename Storage<T>::Acc sigmoid_row_weight(const KernelArgs& p, const RowGroup& g, const Row<T>& r) {
  using A = typename Storage<T>::Acc;
  if constexpr (!kDense) {
    return r.a;
  } else {
    if (p.weight_mode == kWeightClass) return A(1);
    if (p.row_weights != nullptr) return g.in_range ? static_cast<const A*>(p.row_weights)[g.row] : A(0);
    __shared__ Vals<A, 2> scratch_mass[32];
    const Vals<A, 2> wm = dense_row_mass(g, r, static_cast<int>(p.num_classes), p.weight, scratch_mass);
    return sample_weight(wm.v[0], wm.v[1]);
  }
}

// A softmax row's outputs with a dense target (every row counts).
template <typename A>
CB_DEVICE void store_dense_softmax_row(const KernelArgs& p, int64_t row, const DenseSoftmaxRow<A>& out) {
  static_cast<A*>(p.loss)[row] = out.loss;
  if (p.z_rows != nullptr) static_cast<A*>(p.z_rows)[row] = out.z;
}

// Gradient pass of a dense softmax row over the chunks [c_lo, c_hi), as stream_softmax_grad; the softmax focal one
// chunk at a time (its per-column terms are long: see dense_focal_columns).
template <bool kFocal, TfKind kTf, typename T>
CB_DEVICE void stream_dense_softmax_grad(const RowGroup& g, const Row<T>& r, int num_classes, int c_lo, int c_hi,
                                         const DenseCall<typename Storage<T>::Acc>& dc,
                                         const ShiftedExp<typename Storage<T>::Acc>& ex, typename Storage<T>::Acc m,
                                         const DenseSoftmaxRow<typename Storage<T>::Acc>& out) {
  if constexpr (kFocal) {
#pragma unroll 1
    for (int c = c_lo + g.t; c < c_hi; c += g.tpr) {
      if (r.valid) {
        dense_chunk_softmax_grad<true, kTf>(r, c, num_classes, load_chunk(r, c), load_q_raw(r, c, num_classes), dc, ex,
                                            m, out);
      }
    }
  } else {
    for (int base = c_lo; base < c_hi; base += g.tpr * kDenseUnroll) {
      uint4 raw[kDenseUnroll];
      QChunk<T> qs[kDenseUnroll];
#pragma unroll
      for (int u = 0; u < kDenseUnroll; ++u) {
        const int c = base + u * g.tpr + g.t;
        raw[u] = r.valid && c < c_hi ? load_chunk(r, c) : make_uint4(0u, 0u, 0u, 0u);
        qs[u] = c < c_hi ? load_q_raw(r, c, num_classes) : QChunk<T>{};
      }
#pragma unroll
      for (int u = 0; u < kDenseUnroll; ++u) {
        const int c = base + u * g.tpr + g.t;
        if (c < c_hi) dense_chunk_softmax_grad<false, kTf>(r, c, num_classes, raw[u], qs[u], dc, ex, m, out);
      }
    }
  }
}

// The softmax focal terms of a dense row's chunks [c_lo, c_hi), summed over the row's group (every thread of the
// group calls it: it reduces).
template <TfKind kTf, typename T>
CB_DEVICE Vals<typename Storage<T>::Acc, 2> dense_focal_terms(const RowGroup& g, const Row<T>& r, int num_classes,
                                                             int c_lo, int c_hi,
                                                             const DenseCall<typename Storage<T>::Acc>& dc,
                                                             typename Storage<T>::Acc m, typename Storage<T>::Acc lmse,
                                                             Vals<typename Storage<T>::Acc, 2>* scratch) {
  using A = typename Storage<T>::Acc;
  Vals<A, 2> fs{{A(0), A(0)}};
#pragma unroll 1
  for (int c = c_lo + g.t; c < c_hi; c += g.tpr) {
    if (r.valid) {
      dense_chunk_focal<kTf>(r, c, num_classes, load_chunk(r, c), load_q_raw(r, c, num_classes), dc, m, lmse, fs);
    }
  }
  return group_allreduce(g, fs, SumOp{}, Vals<A, 2>{{A(0), A(0)}}, scratch);
}

// Softmax losses, rows that fit in registers: each thread holds up to kHeld chunks, so the logits are read once. Not
// the dense softmax focal loss (the launch plan streams it): its per-column terms need lse, so it reads a row again
// after its statistics whatever the path, and held chunks would only have kept copies of their long code.
template <typename T, TfKind kTf, bool kDense>
CB_DEVICE void softmax_rows(const KernelArgs& p) {
  using A = typename Storage<T>::Acc;
  __shared__ A scratch_max[32];
  __shared__ StatsOf<A, kDense> scratch_stats[32];
  const RowGroup g = row_group(p);
  const Row<T> r = load_row<T, kDense>(p, g.row, g.in_range);
  const int C = static_cast<int>(p.num_classes);

  uint4 raw[kHeld];
#pragma unroll
  for (int i = 0; i < kHeld; ++i) {
    const int c = g.t + i * g.tpr;
    raw[i] = r.valid && c < r.chunks ? load_chunk(r, c) : make_uint4(0u, 0u, 0u, 0u);
  }
  if constexpr (kDense) {
    // Online statistics, one pass (dense_chunk_stats).
    DenseRowStats<A> st = empty_stats_of<A, true>();
    const DenseCall<A> dc(p);
#pragma unroll
    for (int i = 0; i < kHeld; ++i) {
      const int c = g.t + i * g.tpr;
      if (c < r.chunks) dense_chunk_stats<kTf>(r, c, C, raw[i], load_q_raw(r, c, C), dc, st);
    }
    st = group_allreduce(g, st, StatsOp{}, empty_stats_of<A, true>(), scratch_stats);
    const A m = finite_or_zero(st.m);
    const ShiftedExp<A> ex(m);
    DenseSoftmaxRow<A> out = dense_softmax_head(p, st, ex, m);
    const Vals<A, 2> ce = dense_ce_sums(dc, st, out.lmse);
    dense_softmax_tail(out, ce.v[0], ce.v[1]);
    if (!g.in_range) return;
    if (g.t == 0) store_dense_softmax_row(p, g.row, out);
    if (p.has_grad) {
#pragma unroll
      for (int i = 0; i < kHeld; ++i) {
        const int c = g.t + i * g.tpr;
        if (c < r.chunks) dense_chunk_softmax_grad<false, kTf>(r, c, C, raw[i], load_q_raw(r, c, C), dc, ex, m, out);
      }
    }
  } else {
    A m = -static_cast<A>(INFINITY);
#pragma unroll
    for (int i = 0; i < kHeld; ++i) {
      const int c = g.t + i * g.tpr;
      if (c < r.chunks) m = chunk_max<kTf>(r, c, C, raw[i], m);
    }
    m = finite_or_zero(group_allreduce(g, m, MaxOp{}, -static_cast<A>(INFINITY), scratch_max));
    const ShiftedExp<A> ex(m);
    RowStats<A> st = empty_stats<A>();
#pragma unroll
    for (int i = 0; i < kHeld; ++i) {
      const int c = g.t + i * g.tpr;
      if (c < r.chunks) chunk_stats<kTf>(r, c, C, raw[i], ex, m, st);
    }
    st.m = m;  // every part is relative to the row max already: StatsOp only adds
    st = group_allreduce(g, st, StatsOp{}, empty_stats<A>(), scratch_stats);
    const SoftmaxRowOut<A> out = finish_softmax_row<kTf>(p, r, st, ex, m);
    if (!g.in_range) return;
    if (g.t == 0) store_softmax_row<kTf>(p, r, g.row, out);
    if (p.has_grad) {
#pragma unroll
      for (int i = 0; i < kHeld; ++i) {
        const int c = g.t + i * g.tpr;
        if (c < r.chunks) chunk_softmax_grad<kTf>(r, c, C, raw[i], ex, out);
      }
    }
  }
}

template <typename T, TfKind kTf>
__global__ void __launch_bounds__(kRowsMaxThreads, kRowsMinBlocks<kTf>) cb_softmax_rows_kernel(const KernelArgs p) {
  softmax_rows<T, kTf, false>(p);
}

template <typename T>
__global__ void __launch_bounds__(kRowsMaxThreads, kRowsMinBlocks<TfKind::kAny>)
    cb_dense_softmax_rows_kernel(const KernelArgs p) {
  softmax_rows<T, TfKind::kAny, true>(p);
}

// Gradient pass of the softmax losses over the chunks [c_lo, c_hi) of a row, kUnroll chunks per thread at a time.
template <TfKind kTf, typename T>
CB_DEVICE void stream_softmax_grad(const RowGroup& g, const Row<T>& r, int num_classes, int c_lo, int c_hi,
                                   const ShiftedExp<typename Storage<T>::Acc>& ex,
                                   const SoftmaxRowOut<typename Storage<T>::Acc>& out) {
  for (int base = c_lo; base < c_hi; base += g.tpr * kUnroll) {
    uint4 raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = base + u * g.tpr + g.t;
      raw[u] = r.valid && c < c_hi ? load_chunk(r, c) : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = base + u * g.tpr + g.t;
      if (c < c_hi) chunk_softmax_grad<kTf>(r, c, num_classes, raw[u], ex, out);
    }
  }
}

// Rows of any length, looping over the chunks [split * chunks_per_split, ...) of the row (splits > 1 only with a
// block per row, blockIdx.y the split). Softmax losses keep online statistics, then with one split write the loss
// and read the row again for the gradient, or leave the split's partial statistics in the workspace. Sigmoid
// losses write the gradient as they go and the loss (or the split's partial loss) at the end. A dense softmax-focal
// row reads the row once more before its gradient, for its focal terms (they need lse).
template <typename T, class Family, TfKind kTf, bool kDense>
CB_DEVICE void loss_stream(const KernelArgs& p) {
  using A = typename Storage<T>::Acc;
  const RowGroup g = row_group(p);
  const Row<T> r = load_row<T, kDense>(p, g.row, g.in_range);
  const int C = static_cast<int>(p.num_classes);
  const int split = static_cast<int>(blockIdx.y);
  const int c_lo = split * p.chunks_per_split;
  const int c_hi = min(r.chunks, c_lo + p.chunks_per_split);
  const int stride = g.tpr * kUnroll;
  const DenseCall<A> dc(p);  // dense only (dead in the index kernels)

  if constexpr (Family::kSoftmax) {
    __shared__ StatsOf<A, kDense> scratch_stats[32];
    StatsOf<A, kDense> st = empty_stats_of<A, kDense>();
    if (r.valid) {
      if constexpr (kDense) {
        for (int base = c_lo; base < c_hi; base += g.tpr * kDenseUnroll) {
          uint4 raw[kDenseUnroll];
          QChunk<T> qs[kDenseUnroll];
#pragma unroll
          for (int u = 0; u < kDenseUnroll; ++u) {
            const int c = base + u * g.tpr + g.t;
            raw[u] = c < c_hi ? load_chunk(r, c) : make_uint4(0u, 0u, 0u, 0u);
            qs[u] = c < c_hi ? load_q_raw(r, c, C) : QChunk<T>{};
          }
#pragma unroll
          for (int u = 0; u < kDenseUnroll; ++u) {
            const int c = base + u * g.tpr + g.t;
            if (c < c_hi) dense_chunk_stats<kTf>(r, c, C, raw[u], qs[u], dc, st);
          }
        }
      } else {
        for (int base = c_lo; base < c_hi; base += stride) {
          uint4 raw[kUnroll];
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) {
            const int c = base + u * g.tpr + g.t;
            raw[u] = c < c_hi ? load_chunk(r, c) : make_uint4(0u, 0u, 0u, 0u);
          }
          A m_new = st.m;
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) {
            const int c = base + u * g.tpr + g.t;
            if (c < c_hi) m_new = chunk_max<kTf>(r, c, C, raw[u], m_new);
          }
          rebase(st, m_new);
          const A m = finite_or_zero(st.m);
          const ShiftedExp<A> ex(m);
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) {
            const int c = base + u * g.tpr + g.t;
            if (c < c_hi) chunk_stats<kTf>(r, c, C, raw[u], ex, m, st);
          }
        }
      }
    }
    st = group_allreduce(g, st, StatsOp{}, empty_stats_of<A, kDense>(), scratch_stats);
    if constexpr (kDense) {
      if (p.splits > 1) {
        if (g.in_range && g.t == 0) {
          st.store(static_cast<A*>(p.workspace) + (g.row * p.splits + split) * kDenseSplitFields);
        }
        return;
      }
      const A m = finite_or_zero(st.m);
      const ShiftedExp<A> ex(m);
      DenseSoftmaxRow<A> out = dense_softmax_head(p, st, ex, m);
      if (dc.focal) {
        __shared__ Vals<A, 2> scratch_focal[32];
        const Vals<A, 2> fs = dense_focal_terms<kTf>(g, r, C, c_lo, c_hi, dc, m, out.lmse, scratch_focal);
        dense_softmax_tail(out, fs.v[1], fs.v[0]);
      } else {
        const Vals<A, 2> ce = dense_ce_sums(dc, st, out.lmse);
      dense_softmax_tail(out, ce.v[0], ce.v[1]);
      }
      if (!g.in_range) return;
      if (g.t == 0) store_dense_softmax_row(p, g.row, out);
      if (p.has_grad) {
        if (dc.focal) {
          stream_dense_softmax_grad<true, kTf>(g, r, C, c_lo, c_hi, dc, ex, m, out);
        } else {
          stream_dense_softmax_grad<false, kTf>(g, r, C, c_lo, c_hi, dc, ex, m, out);
        }
      }
    } else {
      if (!g.in_range) return;
      if (p.splits > 1) {
        if (g.t == 0) {
          A* ws = static_cast<A*>(p.workspace) + (g.row * p.splits + split) * kStatsFields;
          ws[0] = st.m;
          ws[1] = st.s;
          ws[2] = st.dist;
          ws[3] = st.cnt;
          ws[4] = st.zy;
        }
        return;
      }
      const A m = finite_or_zero(st.m);
      const ShiftedExp<A> ex(m);
      const SoftmaxRowOut<A> out = finish_softmax_row<kTf>(p, r, st, ex, m);
      if (g.t == 0) store_softmax_row<kTf>(p, r, g.row, out);
      if (p.has_grad) stream_softmax_grad<kTf>(g, r, C, c_lo, c_hi, ex, out);
    }
  } else {
    __shared__ A scratch_sum[32];
    const A a = sigmoid_row_weight<kDense>(p, g, r);
    const A k = a * load_scale<A>(p);
    const A gamma = static_cast<A>(p.gamma);
    // Dense kernels take every focal exponent at run time (one kernel for all); a focal loss with gamma 0 is sigmoid
    // cross-entropy (gamma_kind is kZero then).
    const GammaKind gk = p.loss_type == kSigmoid ? GammaKind::kZero : p.gamma_kind;
    const bool store = p.has_grad && g.in_range;
    A acc = A(0);
    if constexpr (kDense) {
      for (int base = c_lo; base < c_hi; base += g.tpr * kDenseUnroll) {
        uint4 raw[kDenseUnroll];
        QChunk<T> qs[kDenseUnroll];
#pragma unroll
        for (int u = 0; u < kDenseUnroll; ++u) {
          const int c = base + u * g.tpr + g.t;
          raw[u] = r.valid && c < c_hi ? load_chunk(r, c) : make_uint4(0u, 0u, 0u, 0u);
          qs[u] = c < c_hi ? load_q_raw(r, c, C) : QChunk<T>{};
        }
#pragma unroll
        for (int u = 0; u < kDenseUnroll; ++u) {
          const int c = base + u * g.tpr + g.t;
          if (c < c_hi) acc += dense_chunk_sigmoid<kTf>(r, c, C, raw[u], qs[u], dc, gamma, gk, k, store);
        }
      }
    } else {
      for (int base = c_lo; base < c_hi; base += stride) {
        uint4 raw[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int c = base + u * g.tpr + g.t;
          raw[u] = r.valid && c < c_hi ? load_chunk(r, c) : make_uint4(0u, 0u, 0u, 0u);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int c = base + u * g.tpr + g.t;
          if (c < c_hi) acc += chunk_sigmoid<T, Family::kGamma, kTf>(r, c, C, raw[u], gamma, k, store);
        }
      }
    }
    acc = group_allreduce(g, acc, SumOp{}, A(0), scratch_sum);
    if (!g.in_range || g.t != 0) return;
    if (p.splits > 1) {
      static_cast<A*>(p.workspace)[g.row * p.splits + split] = acc;
    } else {
      static_cast<A*>(p.loss)[g.row] = r.valid ? a * acc : A(0);
      // No z-loss here (an API error), but a z_rows given is never left unwritten.
      if constexpr (kTf != TfKind::kOff) {
        if (p.z_rows != nullptr) static_cast<A*>(p.z_rows)[g.row] = A(0);
      }
    }
  }
}

template <typename T, class Family, TfKind kTf>
__global__ void __launch_bounds__(kStreamThreads, kStreamMinBlocks<typename Storage<T>::Acc, Family::kSoftmax, kTf>)
    cb_loss_stream_kernel(const KernelArgs p) {
  loss_stream<T, Family, kTf, false>(p);
}

// Dense rows: SoftmaxFamily, or SigmoidFamily<kGeneral> for both sigmoid losses (the exponent's kind at run time).
template <typename T, class Family>
__global__ void __launch_bounds__(kStreamThreads,
                                  kStreamMinBlocks<typename Storage<T>::Acc, Family::kSoftmax, TfKind::kAny>)
    cb_dense_stream_kernel(const KernelArgs p) {
  loss_stream<T, Family, TfKind::kAny, true>(p);
}

// Split softmax rows, second launch: block (row, split) combines the row's partials in a fixed order (every
// block of the row gets the same bits), split 0 writes the loss, and each block writes the gradient of its
// chunks (one block per row without a gradient). Dense softmax-focal rows take two launches of it: focal_phase 0
// leaves each split's focal terms in the workspace, 1 combines them (same order) and writes the loss and gradient.
template <typename T, TfKind kTf, bool kDense>
CB_DEVICE void softmax_split_finish(const KernelArgs& p) {
  using A = typename Storage<T>::Acc;
  const RowGroup g = row_group(p);
  const int split = static_cast<int>(blockIdx.y);
  const Row<T> r = load_row<T, kDense>(p, g.row, true);
  if constexpr (kDense) {
    const int C = static_cast<int>(p.num_classes);
    const int c_lo = split * p.chunks_per_split;
    const int c_hi = min(r.chunks, c_lo + p.chunks_per_split);
    const DenseCall<A> dc(p);
    const A* ws = static_cast<const A*>(p.workspace) + g.row * p.splits * kDenseSplitFields;
    DenseRowStats<A> st = empty_stats_of<A, true>();
    for (int k = static_cast<int>(threadIdx.x & 31); k < p.splits; k += 32) {
      const A* part = ws + k * kDenseSplitFields;
      st = StatsOp{}(st, DenseRowStats<A>::load(part));
    }
    st = warp_allreduce(st, StatsOp{}, 32);
    const A m = finite_or_zero(st.m);
    const ShiftedExp<A> ex(m);
    DenseSoftmaxRow<A> out = dense_softmax_head(p, st, ex, m);
    if (!dc.focal) {
      const Vals<A, 2> ce = dense_ce_sums(dc, st, out.lmse);
      dense_softmax_tail(out, ce.v[0], ce.v[1]);
    } else if (p.focal_phase == 0) {
      __shared__ Vals<A, 2> scratch_focal[32];
      const Vals<A, 2> fs = dense_focal_terms<kTf>(g, r, C, c_lo, c_hi, dc, m, out.lmse, scratch_focal);
      if (threadIdx.x == 0) {
        A* mine = static_cast<A*>(p.workspace) + (g.row * p.splits + split) * kDenseSplitFields;
        mine[kDenseStatsFields] = fs.v[0];
        mine[kDenseStatsFields + 1] = fs.v[1];
      }
      return;
    } else {
      Vals<A, 2> fs{{A(0), A(0)}};
      for (int k = static_cast<int>(threadIdx.x & 31); k < p.splits; k += 32) {
        const A* part = ws + k * kDenseSplitFields + kDenseStatsFields;
        fs = SumOp{}(fs, Vals<A, 2>{{part[0], part[1]}});
      }
      fs = warp_allreduce(fs, SumOp{}, 32);
      dense_softmax_tail(out, fs.v[1], fs.v[0]);
    }
    if (split == 0 && threadIdx.x == 0) store_dense_softmax_row(p, g.row, out);
    if (p.has_grad) {
      if (dc.focal) {
        stream_dense_softmax_grad<true, kTf>(g, r, C, c_lo, c_hi, dc, ex, m, out);
      } else {
        stream_dense_softmax_grad<false, kTf>(g, r, C, c_lo, c_hi, dc, ex, m, out);
      }
    }
  } else {
    RowStats<A> st = empty_stats<A>();
    if (r.valid) {
      const A* ws = static_cast<const A*>(p.workspace) + g.row * p.splits * kStatsFields;
      for (int k = static_cast<int>(threadIdx.x & 31); k < p.splits; k += 32) {
        const A* part = ws + k * kStatsFields;
        st = StatsOp{}(st, RowStats<A>{part[0], part[1], part[2], part[3], part[4]});
      }
      st = warp_allreduce(st, StatsOp{}, 32);
    }
    const A m = finite_or_zero(st.m);
    const ShiftedExp<A> ex(m);
    const SoftmaxRowOut<A> out = finish_softmax_row<kTf>(p, r, st, ex, m);
    if (split == 0 && threadIdx.x == 0) store_softmax_row<kTf>(p, r, g.row, out);
    if (p.has_grad) {
      const int c_lo = split * p.chunks_per_split;
      stream_softmax_grad<kTf>(g, r, static_cast<int>(p.num_classes), c_lo, min(r.chunks, c_lo + p.chunks_per_split), ex, out);
    }
  }
}

template <typename T, TfKind kTf>
__global__ void __launch_bounds__(kStreamThreads, kFinishMinBlocks<kTf>) cb_softmax_split_finish_kernel(
    const KernelArgs p) {
  softmax_split_finish<T, kTf, false>(p);
}

template <typename T>
__global__ void __launch_bounds__(kStreamThreads, kFinishMinBlocks<TfKind::kAny>) cb_dense_split_finish_kernel(
    const KernelArgs p) {
  softmax_split_finish<T, TfKind::kAny, true>(p);
}

// Split sigmoid rows, second launch: a warp per row sums the partial losses in a fixed order.
template <typename A>
__global__ void __launch_bounds__(32) cb_sigmoid_split_sum_kernel(const KernelArgs p) {
  const int64_t row = blockIdx.x;
  const IndexTarget t = index_target(p, row);  // the first launch asserted a bad one
  A acc = A(0);
  const A* ws = static_cast<const A*>(p.workspace) + row * p.splits;
  for (int k = static_cast<int>(threadIdx.x); k < p.splits; k += 32) acc += ws[k];
  acc = warp_allreduce(acc, SumOp{}, 32);
  if (threadIdx.x == 0) {
    static_cast<A*>(p.loss)[row] = t.valid ? t.weight<A>(p) * acc : A(0);
    if (p.z_rows != nullptr) static_cast<A*>(p.z_rows)[row] = A(0);
  }
}

// The same for dense rows: split rows in sample mode have the first launch's row weights (the launcher sees to it).
template <typename A>
__global__ void __launch_bounds__(32) cb_dense_split_sum_kernel(const KernelArgs p) {
  const int64_t row = blockIdx.x;
  A acc = A(0);
  const A* ws = static_cast<const A*>(p.workspace) + row * p.splits;
  for (int k = static_cast<int>(threadIdx.x); k < p.splits; k += 32) acc += ws[k];
  acc = warp_allreduce(acc, SumOp{}, 32);
  if (threadIdx.x == 0) {
    const A a = p.weight_mode == kWeightSample ? static_cast<const A*>(p.row_weights)[row] : A(1);
    static_cast<A*>(p.loss)[row] = a * acc;
    if (p.z_rows != nullptr) static_cast<A*>(p.z_rows)[row] = A(0);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Around the loss kernels: one block before them computes the reduction's normaliser, one after them the reduced
// loss, so that a call's forward is at most three launches and needs no host synchronisation.

constexpr int kReduceThreads = 512;

// s of the reduction (cb_params.h's reduction_scale) from every row's target: a bad target fails the assert here,
// before any loss kernel reads w[y] or z[y]. Fixed-order sums: equal targets, equal bits.
template <typename A>
__global__ void __launch_bounds__(kReduceThreads) cb_reduction_scale_kernel(const KernelArgs p) {
  __shared__ long long count_scratch[32];
  __shared__ A sum_scratch[32];
  long long valid_rows = 0;
  A weight_sum = A(0);
  for (int64_t row = threadIdx.x; row < p.num_rows; row += blockDim.x) {
    const IndexTarget t = row_target(p, row, true);
    valid_rows += t.valid;
    weight_sum += t.weight<A>(p);
  }
  valid_rows = block_allreduce(valid_rows, SumOp{}, 0ll, count_scratch);
  weight_sum = block_allreduce(weight_sum, SumOp{}, A(0), sum_scratch);
  if (threadIdx.x == 0) *static_cast<A*>(p.scale) = reduction_scale<A>(p.reduction, valid_rows, weight_sum);
}

// Dense targets, first launch when needed (KernelArgs::row_weights): each row's sample weight a_i (SPEC section 9,
// whatever the weight mode) with the loss kernels' row groups.
template <typename T>
__global__ void __launch_bounds__(kRowsMaxThreads) cb_dense_row_weight_kernel(const KernelArgs p) {
  using A = typename Storage<T>::Acc;
  __shared__ Vals<A, 2> scratch[32];
  const RowGroup g = row_group(p);
  const Row<T> r = load_row<T, true>(p, g.row, g.in_range);
  const Vals<A, 2> wm = dense_row_mass(g, r, static_cast<int>(p.num_classes), p.weight, scratch);
  if (g.in_range && g.t == 0) static_cast<A*>(p.row_weights)[g.row] = sample_weight(wm.v[0], wm.v[1]);
}

// s of the reduction for dense targets: every row counts, and "weighted_mean" divides by sum_i a_i of the row
// weights (summed in a fixed order).
template <typename A>
__global__ void __launch_bounds__(kReduceThreads) cb_dense_reduction_scale_kernel(const KernelArgs p) {
  __shared__ A sum_scratch[32];
  A weight_sum = A(0);
  if (p.reduction == kWeightedMean) {
    const A* a = static_cast<const A*>(p.row_weights);
    for (int64_t row = threadIdx.x; row < p.num_rows; row += blockDim.x) weight_sum += a[row];
    weight_sum = block_allreduce(weight_sum, SumOp{}, A(0), sum_scratch);
  }
  if (threadIdx.x == 0) *static_cast<A*>(p.scale) = reduction_scale<A>(p.reduction, p.num_rows, weight_sum);
}

// reduced = s * sum_i loss_i: each thread sums a strided set of rows in order, then a fixed tree.
template <typename A>
__global__ void __launch_bounds__(kReduceThreads) cb_reduce_rows_kernel(const KernelArgs p) {
  __shared__ A scratch[32];
  const A* loss = static_cast<const A*>(p.loss);
  A total = A(0);
  for (int64_t row = threadIdx.x; row < p.num_rows; row += blockDim.x) total += loss[row];
  total = block_allreduce(total, SumOp{}, A(0), scratch);
  if (threadIdx.x == 0) *static_cast<A*>(p.reduced) = total * load_scale<A>(p);
}

// ---------------------------------------------------------------------------------------------------------
// Launch of one storage type; cb_loss_cuda.cu has chosen the plan.

template <typename T, class Family, TfKind kTf>
cudaError_t launch_family(const KernelArgs& args, const CBLossCudaPlan& plan, cudaStream_t stream) {
  const unsigned rows = static_cast<unsigned>(plan.grid_rows);
  if constexpr (Family::kSoftmax) {
    if (plan.path == Path::kRows) {
      CB_LAUNCH_KERNEL(rows, plan.block_threads, stream, args, cb_softmax_rows_kernel<T, kTf>);
      return cudaGetLastError();
    }
  }
  CB_LAUNCH_KERNEL(dim3(rows, plan.splits), plan.block_threads, stream, args, cb_loss_stream_kernel<T, Family, kTf>);
  if (plan.splits > 1) {
    if constexpr (Family::kSoftmax) {
      const unsigned grad_splits = args.has_grad ? static_cast<unsigned>(plan.splits) : 1u;
      CB_LAUNCH_KERNEL(dim3(rows, grad_splits), plan.block_threads, stream, args,
                       cb_softmax_split_finish_kernel<T, kTf>);
    } else {
      CB_LAUNCH_KERNEL(rows, 32, stream, args, cb_sigmoid_split_sum_kernel<typename Storage<T>::Acc>);
    }
  }
  return cudaGetLastError();
}

template <typename T, TfKind kTf>
cudaError_t launch_transformed(const KernelArgs& args, const CBLossCudaPlan& plan, bool softmax, GammaKind gk,
                               cudaStream_t stream) {
  // Transformed logits take one kernel for every sigmoid focal exponent (kGeneral is as accurate as the special
  // ones; the identical gamma 0 is kept apart, as the loss without a modulator, whose kGeneral form would make
  // 0 * inf a NaN at an infinite logit): five kernels per storage type and transform kind.
  if (softmax) return launch_family<T, SoftmaxFamily, kTf>(args, plan, stream);
  if (gk == GammaKind::kZero) return launch_family<T, SigmoidFamily<GammaKind::kZero>, kTf>(args, plan, stream);
  return launch_family<T, SigmoidFamily<GammaKind::kGeneral>, kTf>(args, plan, stream);
}

template <typename T>
cudaError_t launch_loss(const KernelArgs& args, const CBLossCudaPlan& plan, int loss_type, cudaStream_t stream) {
  const bool softmax = loss_type == kSoftmax || loss_type == kSoftmaxFocal;
  // A focal loss with gamma 0 is sigmoid cross-entropy (gamma_kind is kZero then).
  const GammaKind gk = loss_type == kSigmoid ? GammaKind::kZero : args.gamma_kind;
  if (args.tf_kind == TfKind::kCapped) return launch_transformed<T, TfKind::kCapped>(args, plan, softmax, gk, stream);
  if (args.tf_kind == TfKind::kAffine) return launch_transformed<T, TfKind::kAffine>(args, plan, softmax, gk, stream);
  constexpr TfKind kOff = TfKind::kOff;
  if (softmax) return launch_family<T, SoftmaxFamily, kOff>(args, plan, stream);
  switch (gk) {
    case GammaKind::kZero: return launch_family<T, SigmoidFamily<GammaKind::kZero>, kOff>(args, plan, stream);
    case GammaKind::kHalf: return launch_family<T, SigmoidFamily<GammaKind::kHalf>, kOff>(args, plan, stream);
    case GammaKind::kOne: return launch_family<T, SigmoidFamily<GammaKind::kOne>, kOff>(args, plan, stream);
    case GammaKind::kTwo: return launch_family<T, SigmoidFamily<GammaKind::kTwo>, kOff>(args, plan, stream);
    default: return launch_family<T, SigmoidFamily<GammaKind::kGeneral>, kOff>(args, plan, stream);
  }
}

// Dense targets (SPEC section 9): one kernel per path and storage type (every transform and focal exponent at run
// time), after the row weights' launch when there is one and the normaliser's.
template <typename T>
cudaError_t launch_dense(const KernelArgs& args, const CBLossCudaPlan& plan, int loss_type, cudaStream_t stream) {
  using A = typename Storage<T>::Acc;
  const unsigned rows = static_cast<unsigned>(plan.grid_rows);
  if (args.row_weights != nullptr) {
    CB_LAUNCH_KERNEL(rows, plan.block_threads, stream, args, cb_dense_row_weight_kernel<T>);
  }
  if (args.compute_scale) CB_LAUNCH_KERNEL(1, kReduceThreads, stream, args, cb_dense_reduction_scale_kernel<A>);
  if (loss_type == kSoftmax || loss_type == kSoftmaxFocal) {
    if (plan.path == Path::kRows) {
      CB_LAUNCH_KERNEL(rows, plan.block_threads, stream, args, cb_dense_softmax_rows_kernel<T>);
      return cudaGetLastError();
    }
    CB_LAUNCH_KERNEL(dim3(rows, plan.splits), plan.block_threads, stream, args,
                     cb_dense_stream_kernel<T, SoftmaxFamily>);
    if (plan.splits > 1) {
      const unsigned grad_splits = args.has_grad ? static_cast<unsigned>(plan.splits) : 1u;
      if (args.softmax_focal) {
        CB_LAUNCH_KERNEL(dim3(rows, plan.splits), plan.block_threads, stream, args, cb_dense_split_finish_kernel<T>);
        KernelArgs last = args;
        last.focal_phase = 1;
        CB_LAUNCH_KERNEL(dim3(rows, grad_splits), plan.block_threads, stream, last, cb_dense_split_finish_kernel<T>);
      } else {
        CB_LAUNCH_KERNEL(dim3(rows, grad_splits), plan.block_threads, stream, args, cb_dense_split_finish_kernel<T>);
      }
    }
    return cudaGetLastError();
  }
  using Family = SigmoidFamily<GammaKind::kGeneral>;
  CB_LAUNCH_KERNEL(dim3(rows, plan.splits), plan.block_threads, stream, args, cb_dense_stream_kernel<T, Family>);
  if (plan.splits > 1) CB_LAUNCH_KERNEL(rows, 32, stream, args, cb_dense_split_sum_kernel<A>);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_typed(const KernelArgs& args, const CBLossCudaPlan& plan, int loss_type, cudaStream_t stream) {
  using A = typename Storage<T>::Acc;
  if (args.compute_scale && !args.dense_target) {
    CB_LAUNCH_KERNEL(1, kReduceThreads, stream, args, cb_reduction_scale_kernel<A>);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  const cudaError_t err = args.dense_target ? launch_dense<T>(args, plan, loss_type, stream)
                                            : launch_loss<T>(args, plan, loss_type, stream);
  if (err != cudaSuccess || args.reduced == nullptr) return err;
  CB_LAUNCH_KERNEL(1, kReduceThreads, stream, args, cb_reduce_rows_kernel<A>);
  return cudaGetLastError();
}

}  // namespace cbkernels::gpu
