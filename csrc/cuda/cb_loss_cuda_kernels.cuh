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
// In-place (grad == logits): every element is read before it is written, by the thread that writes it,
// and the target logit travels in registers or the workspace, never re-read after the gradient pass starts.
// Determinism: every reduction is a fixed tree, so equal inputs give equal bits; all threads of a row (and
// all blocks of a split row) end up with bitwise identical row statistics.
#pragma once

#include <cuda_runtime.h>

#include <cassert>
#include <cstdint>

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

struct StatsOp {
  template <typename A>
  CB_DEVICE RowStats<A> operator()(RowStats<A> a, RowStats<A> b) const {
    const A M = amax(a.m, b.m);
    rebase(a, M);
    rebase(b, M);
    return {M, a.s + b.s, a.dist + b.dist, a.cnt + b.cnt, a.zy + b.zy};
  }
};

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
};

// The row's target (cb_params.h); rows past the end count as ignored.
CB_DEVICE IndexTarget row_target(const KernelArgs& p, int64_t row, bool in_range) {
  if (!in_range) return IndexTarget{p.ignore_index, false};
  const IndexTarget t = index_target(p, row);
  // The API edge already asserts this on the device; here it guards the w[y] and z[y] reads.
  if (t.bad(p)) __assert_fail("cbkernels: target outside [0, C) and not ignore_index", __FILE__, __LINE__, __func__);
  return t;
}

template <typename T>
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
  const IndexTarget t = row_target(p, row, in_range);
  r.valid = t.valid;
  r.y = t.valid ? static_cast<int>(t.column) : -1;
  r.a = t.weight<typename Row<T>::A>(p);
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
// target column only. Callers that store no gradient leave f unread, and the compiler drops it.
template <TfKind kTf, typename T>
CB_DEVICE void load_logits(const Row<T>& r, int c, int num_classes, const uint4& raw,
                           typename Storage<T>::Acc (&x)[Storage<T>::kVec],
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
      }
      if (col >= 0 && col < num_classes) {
        if (tf.offset != nullptr) v += static_cast<A>(tf.offset[col]);
        if (col == r.y && tf.margin != nullptr) v -= static_cast<A>(tf.margin[col]);
      }
      x[l] = v * tf.scale;
      f[l] = dv;
    }
  } else {
#pragma unroll
    for (int l = 0; l < V; ++l) f[l] = A(1);
  }
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

// Softmax losses, rows that fit in registers: each thread holds up to kHeld chunks, so the logits are read once.
template <typename T, TfKind kTf>
__global__ void __launch_bounds__(kRowsMaxThreads, kRowsMinBlocks<kTf>) cb_softmax_rows_kernel(const KernelArgs p) {
  using A = typename Storage<T>::Acc;
  __shared__ A scratch_max[32];
  __shared__ RowStats<A> scratch_stats[32];
  const RowGroup g = row_group(p);
  const Row<T> r = load_row<T>(p, g.row, g.in_range);
  const int C = static_cast<int>(p.num_classes);

  uint4 raw[kHeld];
#pragma unroll
  for (int i = 0; i < kHeld; ++i) {
    const int c = g.t + i * g.tpr;
    raw[i] = r.valid && c < r.chunks ? load_chunk(r, c) : make_uint4(0u, 0u, 0u, 0u);
  }
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
// losses write the gradient as they go and the loss (or the split's partial loss) at the end.
template <typename T, class Family, TfKind kTf>
__global__ void __launch_bounds__(kStreamThreads, kStreamMinBlocks<typename Storage<T>::Acc, Family::kSoftmax, kTf>)
    cb_loss_stream_kernel(const KernelArgs p) {
  using A = typename Storage<T>::Acc;
  const RowGroup g = row_group(p);
  const Row<T> r = load_row<T>(p, g.row, g.in_range);
  const int C = static_cast<int>(p.num_classes);
  const int split = static_cast<int>(blockIdx.y);
  const int c_lo = split * p.chunks_per_split;
  const int c_hi = min(r.chunks, c_lo + p.chunks_per_split);
  const int stride = g.tpr * kUnroll;

  if constexpr (Family::kSoftmax) {
    __shared__ RowStats<A> scratch_stats[32];
    RowStats<A> st = empty_stats<A>();
    if (r.valid) {
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
    st = group_allreduce(g, st, StatsOp{}, empty_stats<A>(), scratch_stats);
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
  } else {
    __shared__ A scratch_sum[32];
    const A k = r.a * load_scale<A>(p);
    const A gamma = static_cast<A>(p.gamma);
    const bool store = p.has_grad && g.in_range;
    A acc = A(0);
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
    acc = group_allreduce(g, acc, SumOp{}, A(0), scratch_sum);
    if (!g.in_range || g.t != 0) return;
    if (p.splits > 1) {
      static_cast<A*>(p.workspace)[g.row * p.splits + split] = acc;
    } else {
      static_cast<A*>(p.loss)[g.row] = r.valid ? r.a * acc : A(0);
      // No z-loss here (an API error), but a z_rows given is never left unwritten.
      if constexpr (kTf != TfKind::kOff) {
        if (p.z_rows != nullptr) static_cast<A*>(p.z_rows)[g.row] = A(0);
      }
    }
  }
}

// Split softmax rows, second launch: block (row, split) combines the row's partials in a fixed order (every
// block of the row gets the same bits), split 0 writes the loss, and each block writes the gradient of its
// chunks (one block per row without a gradient).
template <typename T, TfKind kTf>
__global__ void __launch_bounds__(kStreamThreads, kFinishMinBlocks<kTf>) cb_softmax_split_finish_kernel(
    const KernelArgs p) {
  using A = typename Storage<T>::Acc;
  const RowGroup g = row_group(p);
  const int split = static_cast<int>(blockIdx.y);
  const Row<T> r = load_row<T>(p, g.row, true);
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

template <typename T>
cudaError_t launch_typed(const KernelArgs& args, const CBLossCudaPlan& plan, int loss_type, cudaStream_t stream) {
  using A = typename Storage<T>::Acc;
  if (args.compute_scale) {
    CB_LAUNCH_KERNEL(1, kReduceThreads, stream, args, cb_reduction_scale_kernel<A>);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  const cudaError_t err = launch_loss<T>(args, plan, loss_type, stream);
  if (err != cudaSuccess || args.reduced == nullptr) return err;
  CB_LAUNCH_KERNEL(1, kReduceThreads, stream, args, cb_reduce_rows_kernel<A>);
  return cudaGetLastError();
}

}  // namespace cbkernels::gpu
