// Row kernels of the fused class-balanced losses on CPU (SPEC sections 3-4, dense targets 9, transforms 10-11).
//
// setup.py compiles this file once per instruction set (DEFAULT, and on x86-64 AVX2 and AVX512,
// with ATen's flags and CPU_CAPABILITY macros), like ATen's own kernels; the binding picks one at
// run time. Everything here has internal linkage except cb_loss_rows and scan_dense_rows in their
// per-ISA namespace, and no static initialisers: code in this file may only run on a CPU that has
// its instructions.
//
// One row is computed by one thread in a fixed order, so the bits do not depend on the thread count.
// The target class is handled apart from the SIMD loops (scalar math from cb_math.h), which keeps
// the vector path free of per-lane class tests and gives the target term without cancellation.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "cb_math.h"
#include "cpu/cb_loss_cpu_kernel.h"

#ifndef CPU_CAPABILITY
#error "setup.py defines CPU_CAPABILITY (DEFAULT, AVX2 or AVX512) for this file"
#endif

// Everything a row function calls is inlined into it: an out-of-line call inside a SIMD loop spills
// every vector register (all are caller-saved).
#if defined(__GNUC__)
#define CB_FLATTEN __attribute__((flatten))
#else
#define CB_FLATTEN
#endif

namespace cbkernels::cpu::CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// float32 math for float16/bfloat16 logits; double only for double.
template <typename scalar_t> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };
template <typename scalar_t> using acc_t = typename AccType<scalar_t>::type;

// Lane select x < bound ? if_lt : otherwise (false for NaN). ATen's Vectorized comparisons return an
// all-ones vector that blendv turns back into a mask register; on AVX-512 that round trip
// (vpmovm2d + vpcmpeqd) made whole loops several times slower, so there the mask register is used.
template <typename T>
CB_HOST_DEVICE Vectorized<T> select_lt(const Vectorized<T>& x, const Vectorized<T>& bound, const Vectorized<T>& if_lt,
                                       const Vectorized<T>& otherwise) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, bound, _CMP_LT_OQ), otherwise, if_lt);
  } else {
    return _mm512_mask_blend_pd(_mm512_cmp_pd_mask(x, bound, _CMP_LT_OQ), otherwise, if_lt);
  }
#else
  return Vectorized<T>::blendv(otherwise, if_lt, x < bound);
#endif
}

// Float SIMD approximations on the only ranges the losses need, inlined (no call into Sleef, which
// also forces every live vector register to be spilled). Double keeps ATen's Sleef functions.

// exp(x) for x <= 0 (or NaN): 2^n exp(r) with n = round(x / ln2), r = x - n ln2 (ln2 split in two so
// that n ln2 is exact), exp(r) by a degree-6 fit (1.5 ulp). Results below 2^-126 flush to 0.
CB_HOST_DEVICE Vectorized<float> exp_nonpos(const Vectorized<float>& x) {
  using V = Vectorized<float>;
  using Vi = Vectorized<int32_t>;
  static constexpr float c[] = {1.0f, 1.0f, 0.49999991059303284f, 0.1666642129421234f, 0.0416683591902256f,
                                0.008374771103262901f, 0.0013829420786350965f};
  const V lo(-87.3f);  // keeps 2^n a normal number; a NaN x stays NaN (the compare is false)
  const V xc = select_lt(x, lo, lo, x);
  const V n = (xc * V(1.4426950408889634f)).round();
  V r = at::vec::fmadd(n, V(-0.693145751953125f), xc);
  r = at::vec::fmadd(n, V(-1.428606765330187e-6f), r);
  V p(c[6]);
  for (int k = 5; k >= 0; --k) p = at::vec::fmadd(p, r, V(c[k]));
  const Vi two_n = (at::vec::convert_to_int_of_same_size(n) + Vi(127)) << Vi(23);
  return select_lt(x, lo, V(0), p * at::vec::cast<float>(two_n));
}
CB_HOST_DEVICE Vectorized<double> exp_nonpos(const Vectorized<double>& x) { return x.exp(); }

// log1p(x) = x P(x) for x in [0, 1] (or NaN), P a degree-9 fit in relative error: 2.3 ulp.
CB_HOST_DEVICE Vectorized<float> log1p_unit(const Vectorized<float>& x) {
  using V = Vectorized<float>;
  static constexpr float c[] = {1.0f, -0.49999889731407166f, 0.33329665660858154f, -0.24951167404651642f,
                                0.19661018252372742f, -0.15263274312019348f, 0.10532950609922409f,
                                -0.05626952648162842f, 0.019487686455249786f, -0.0031639994122087955f};
  V p(c[9]);
  for (int k = 8; k >= 0; --k) p = at::vec::fmadd(p, x, V(c[k]));
  return p * x;
}
CB_HOST_DEVICE Vectorized<double> log1p_unit(const Vectorized<double>& x) { return x.log1p(); }

template <typename T>
struct VecMath {
  using V = Vectorized<T>;
  static CB_HOST_DEVICE V exp_nonpos(const V& x) { return cbkernels::cpu::CPU_CAPABILITY::exp_nonpos(x); }
  static CB_HOST_DEVICE V log1p_unit(const V& x) { return cbkernels::cpu::CPU_CAPABILITY::log1p_unit(x); }
  static CB_HOST_DEVICE V sqrt(const V& x) { return x.sqrt(); }
  static CB_HOST_DEVICE V abs(const V& x) { return x.abs(); }
  static CB_HOST_DEVICE V recip(const V& x) { return x.reciprocal(); }
  static CB_HOST_DEVICE V relu(const V& x) { return at::vec::clamp_min(x, V(0)); }
  static CB_HOST_DEVICE V select_nonneg(const V& v, const V& if_nonneg, const V& if_neg) {
    return select_lt(v, V(0), if_neg, if_nonneg);
  }
};

// n <= W elements from p, widened to the compute type; lanes past n hold zeros.
template <typename scalar_t>
CB_HOST_DEVICE Vectorized<acc_t<scalar_t>> load(const scalar_t* p, int64_t n) {
  using Vec = Vectorized<acc_t<scalar_t>>;
  if constexpr (std::is_same_v<scalar_t, acc_t<scalar_t>>) {
    return n == Vec::size() ? Vec::loadu(p) : Vec::loadu(p, n);
  } else {
    Vec out;
    if (n == Vec::size()) {
      at::vec::load_to_float(p, out);
    } else {
      scalar_t tmp[Vec::size()] = {};
      std::memcpy(tmp, p, n * sizeof(scalar_t));
      at::vec::load_to_float(tmp, out);
    }
    return out;
  }
}

// Writes the first n lanes, rounding once to the storage type.
template <typename scalar_t>
CB_HOST_DEVICE void store(scalar_t* p, const Vectorized<acc_t<scalar_t>>& v, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t<scalar_t>>) {
    v.store(p, n);
  } else {
    at::vec::convert_from_float<scalar_t>(v, v).store(p, n);
  }
}

// Padded tail lanes must not reach a sum.
template <typename T>
CB_HOST_DEVICE Vectorized<T> head(const Vectorized<T>& v, int64_t n) {
  return n == Vectorized<T>::size() ? v : Vectorized<T>::set(Vectorized<T>(0), v, n);
}

template <typename T>
inline T hsum(const Vectorized<T>& v) {
  alignas(64) T lanes[Vectorized<T>::size()];
  v.store(lanes);
  T s = 0;
  for (int64_t k = 0; k < Vectorized<T>::size(); ++k) s += lanes[k];
  return s;
}

template <typename T>
inline T hmax(const Vectorized<T>& v) {
  alignas(64) T lanes[Vectorized<T>::size()];
  v.store(lanes);
  T m = lanes[0];
  for (int64_t k = 1; k < Vectorized<T>::size(); ++k) m = std::isnan(lanes[k]) ? lanes[k] : std::max(m, lanes[k]);
  return m;  // NaN once any lane is NaN: std::max keeps a NaN first argument
}

// Calls body(j, n) over the C elements of a row in SIMD-width pieces from the row's start, the last
// piece possibly short. The pieces do not depend on the row's address, so neither does the order of
// any sum: a row gives the same bits wherever it lies in memory (in place or not, any storage offset).
template <typename T, typename scalar_t, typename F>
CB_HOST_DEVICE void for_row_chunks(const scalar_t* /*row*/, int64_t C, const F& body) {
  constexpr int64_t W = Vectorized<T>::size();
  int64_t j = 0;
  for (; j + W <= C; j += W) body(j, W);
  if (j < C) body(j, C - j);
}

// Drops the target's lane from a piece's contribution (its term is computed apart, in scalar code).
template <typename T>
CB_HOST_DEVICE Vectorized<T> drop_target(const Vectorized<T>& v, int64_t j, int64_t n, int64_t y,
                                         const Vectorized<T>& value = Vectorized<T>(0)) {
  if (y < j || y >= j + n) return v;
  return Vectorized<T>::blendv(v, value, Vectorized<T>::arange(0, 1) == Vectorized<T>(T(y - j)));
}

// n <= W floats of a [C] float32 vector (the transforms' offsets) in the compute type T.
template <typename T>
CB_HOST_DEVICE Vectorized<T> load_vector(const float* v, int64_t j, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return load(v + j, n);
  } else {
    T tmp[Vectorized<T>::size()] = {};
    for (int64_t k = 0; k < n; ++k) tmp[k] = static_cast<T>(v[j + k]);
    return Vectorized<T>::loadu(tmp);
  }
}

// 1 / y per lane for y in [1, 2]: the hardware's reciprocal estimate and one Newton step (a correctly rounded
// result but for about one lane in 1e5, then 1 ulp off), where a division would cost as much as the rest of the
// softcap's arithmetic (vdivps: one result per ~10 cycles).
CB_HOST_DEVICE Vectorized<float> recip_unit(const Vectorized<float>& y) {
#if defined(CPU_CAPABILITY_AVX512)
  const Vectorized<float> r(_mm512_rcp14_ps(y));
#elif defined(CPU_CAPABILITY_AVX2)
  const Vectorized<float> r(_mm256_rcp_ps(y));
#else
  const Vectorized<float> r = y.reciprocal();
#endif
  return at::vec::fmadd(r, at::vec::fmadd(Vectorized<float>(0.0f) - y, r, Vectorized<float>(1.0f)), r);
}

// tanh(x) and sech(x)^2 = 1 - tanh(x)^2 per lane, by cb_math.h's tanh_sech2 (no cancellation): one inlined exp
// and the short series in float.
CB_HOST_DEVICE void tanh_sech2(const Vectorized<float>& x, Vectorized<float>& t, Vectorized<float>& sech2) {
  using V = Vectorized<float>;
  const V ax = x.abs();
  const V e = exp_nonpos(V(-2.0f) * ax);
  const V d = recip_unit(V(1.0f) + e);
  sech2 = V(4.0f) * e * d * d;
  const V x2 = ax * ax;
  V poly = at::vec::fmadd(x2, V(62.0f / 2835), V(-17.0f / 315));
  poly = at::vec::fmadd(poly, x2, V(2.0f / 15));
  poly = at::vec::fmadd(poly, x2, V(-1.0f / 3));
  const V small = at::vec::fmadd(ax * x2, poly, ax);
  const V t_abs = select_lt(ax, V(0.25f), small, (V(1.0f) - e) * d);
  t = select_lt(x, V(0.0f), V(0.0f) - t_abs, t_abs);
}
CB_HOST_DEVICE void tanh_sech2(const Vectorized<double>& x, Vectorized<double>& t, Vectorized<double>& sech2) {
  using V = Vectorized<double>;
  const V ax = x.abs();
  const V e = (V(-2.0) * ax).exp();
  const V d = (V(1.0) + e).reciprocal();
  sech2 = V(4.0) * e * d * d;
  const V em = (V(-2.0) * ax).expm1();
  const V t_abs = V(0.0) - em / (V(2.0) + em);
  t = select_lt(x, V(0.0), V(0.0) - t_abs, t_abs);
}

// The logit transforms of SPEC section 10 (cb_math.h's LogitTransform) in the SIMD loops of one thread's rows:
// z' = s (c tanh(z / c) + o_j) for every column through logit() (the target's margin is applied in scalar code:
// target_logit), and dl/dz = sech^2(z / c) dl/dz' through grad(). The scale s is folded: logit() forms s c tanh and
// s o_j (kept per call), and the rows fold s into their per-row gradient coefficients (grad_scale()), so a
// transform costs one FMA or add per element and pass, and every one that is off a predictable branch per SIMD
// piece. With keep (the softmax rows), logit() keeps z' and sech^2 per column of the row (again(), grad()): the
// later passes read them instead of a second tanh, which also leaves the raw logits free to be overwritten in place.
//
// A plain value (pointers and numbers, no owned memory: TransformBuffers owns that), copied into each row function
// as a local: the compiler then keeps its fields in registers. As members of an object in memory they were reloaded
// and re-tested in every SIMD piece, since the rows' float stores might have changed them (+40% on a softmax row
// with an offset alone).
template <typename T>
struct RowTransform {
  using Vec = Vectorized<T>;
  LogitTransform<T> s;
  const T* scaled_offset;  // s o_j when both are on, else nullptr
  T* kept_logit;           // [C] z' of the current row (softmax rows with a softcap), else nullptr
  T* kept_sech2;           // [C] sech^2(z / c) of the current row, likewise
  bool cap;

  // Whether the SIMD loops transform (the margin is the scalar target's only: target_on()).
  bool on() const { return cap || s.offset != nullptr || s.scale != T(1); }
  bool target_on() const { return on() || s.margin != nullptr; }
  // The factor the rows multiply their gradient coefficients by (the scale's part of dz'/dz).
  T grad_scale() const { return s.scale; }

  // z' of columns [j, j + n) (no margin) from their raw logits z; sech2 receives the softcap's factor when on.
  CB_HOST_DEVICE Vec logit(const Vec& z, int64_t j, int64_t n, Vec* sech2 = nullptr) const {
    if (!cap) return affine(z, s.scale, j, n);
    Vec t, s2;
    tanh_sech2(z * Vec(s.inv_cap), t, s2);
    const Vec x = affine(t, s.cap * s.scale, j, n);
    if (kept_logit != nullptr) {
      x.store(kept_logit + j, n);
      s2.store(kept_sech2 + j, n);
    }
    if (sech2 != nullptr) *sech2 = s2;
    return x;
  }
  // z' again (the softmax rows' second pass): the kept value with a softcap, else formed again (one FMA).
  CB_HOST_DEVICE Vec again(const Vec& z, int64_t j, int64_t n) const {
    return cap ? Vec::loadu(kept_logit + j, n) : affine(z, s.scale, j, n);
  }
  // dl/dz from dl/dz' (the scale aside) of columns [j, j + n); sech2: logit()'s (nullptr: the kept one).
  CB_HOST_DEVICE Vec grad(const Vec& g, int64_t j, int64_t n, const Vec* sech2 = nullptr) const {
    if (!cap) return g;
    return g * (sech2 != nullptr ? *sech2 : Vec::loadu(kept_sech2 + j, n));
  }
  // The target column's dl/dz from dl/dz' (the scale aside) and its raw logit.
  CB_HOST_DEVICE T target_grad(T g, T z, int64_t y) const {
    if (!cap) return g;
    return g * (kept_sech2 == nullptr ? cbkernels::tanh_sech2(z * s.inv_cap).sech2 : kept_sech2[y]);
  }

  // scale * x + s o_j (x * scale, x + o_j, or x when a part is off).
  CB_HOST_DEVICE Vec affine(const Vec& x, T scale, int64_t j, int64_t n) const {
    if (scaled_offset != nullptr) return at::vec::fmadd(x, Vec(scale), Vec::loadu(scaled_offset + j, n));
    const Vec y = scale != T(1) ? x * Vec(scale) : x;
    return s.offset != nullptr ? y + load_vector<T>(s.offset, j, n) : y;
  }
};

// The memory a RowTransform points into, for one thread's rows (keep: the softmax rows' per-column z' and sech^2).
template <typename T>
class TransformBuffers {
 public:
  TransformBuffers(const CBLossParams& p, bool keep) {
    const LogitTransform<T> s = LogitTransform<T>::from(p);
    const int64_t C = p.num_classes;
    view_ = RowTransform<T>{s, nullptr, nullptr, nullptr, s.softcap()};
    if (s.offset != nullptr && s.scale != T(1)) {
      scaled_offset_.resize(C);
      for (int64_t j = 0; j < C; ++j) scaled_offset_[j] = s.scale * static_cast<T>(s.offset[j]);
      view_.scaled_offset = scaled_offset_.data();
    }
    if (view_.cap && keep) {
      kept_.resize(2 * C);
      view_.kept_logit = kept_.data();
      view_.kept_sech2 = kept_.data() + C;
    }
  }
  RowTransform<T> view() const { return view_; }

 private:
  RowTransform<T> view_;
  std::vector<T> scaled_offset_, kept_;
};

// A row of a dense target that is an index target's (one 1, zeros elsewhere), in a call whose index-target row code
// computes the same loss: the dense driver hands such rows to that code, so that they give its bits.
struct OneHotRow {
  int64_t row;
  int64_t column;
};

// Row k of a row function's range: row k with its index target, or (dense targets) the k-th listed one-hot row, with
// the sample weight a = w[y] of either.
template <typename T>
struct RowTarget {
  int64_t row;
  int64_t column;
  T weight;
  bool valid;
};
template <typename T>
CB_HOST_DEVICE RowTarget<T> row_target(const CBLossParams& p, int64_t k, const OneHotRow* onehot) {
  if (onehot != nullptr) return {onehot[k].row, onehot[k].column, static_cast<T>(p.weight[onehot[k].column]), true};
  const IndexTarget t = index_target(p, k);
  return {k, t.column, t.weight<T>(p), t.valid};
}

// A row whose target does not count (cb_params.h): written as ignored. (A bad target never gets here: the binding
// checks every target before any row is computed.)
template <typename scalar_t>
inline void skip_row(const CBLossParams& p, int64_t i, scalar_t* g) {
  static_cast<acc_t<scalar_t>*>(p.loss)[i] = 0;
  if (p.z_rows != nullptr) static_cast<acc_t<scalar_t>*>(p.z_rows)[i] = 0;
  if (g != nullptr) std::fill(g, g + p.num_classes, scalar_t(0));
}

// Sigmoid cross-entropy (G = kZero) and sigmoid focal: a_i sum_j m_ij [softplus(z_ij) - t_ij z_ij].
// kTf: whether the SIMD loops may transform (rows_for_dtype instantiates the loops twice, so that a call without
// transforms runs loops with no transform code in them at all: as a never-taken branch it still cost registers
// and up to 1.5x on 256 x 8142).
template <typename scalar_t, GammaKind G, bool kTf>
CB_FLATTEN void sigmoid_rows(const CBLossParams& p, int64_t begin, int64_t end, const OneHotRow* onehot) {
  using T = acc_t<scalar_t>;
  using Vec = Vectorized<T>;
  const int64_t C = p.num_classes;
  const T gamma = static_cast<T>(p.gamma);
  const Vec vgamma(gamma);
  const TransformBuffers<T> buffers(p, false);
  const RowTransform<T> tf = buffers.view();
  const bool transformed = kTf && tf.on(), capped = kTf && tf.cap;
  const T scale = load_scale<T>(p) * tf.grad_scale();
  for (int64_t k_row = begin; k_row < end; ++k_row) {
    const RowTarget<T> t = row_target<T>(p, k_row, onehot);
    const int64_t i = t.row;
    const scalar_t* z = static_cast<const scalar_t*>(p.logits) + i * p.logits_row_stride;
    scalar_t* g = p.grad ? static_cast<scalar_t*>(p.grad) + i * p.grad_row_stride : nullptr;
    if (!t.valid) {
      skip_row(p, i, g);
      continue;
    }
    if (p.z_rows != nullptr) static_cast<T*>(p.z_rows)[i] = 0;  // no z-loss for the one-vs-all losses
    const int64_t y = t.column;
    const T zy_raw = static_cast<T>(z[y]);  // read first: in place, the pieces below overwrite it
    const T zy = tf.target_on() ? tf.s.logit(zy_raw, y, true) : zy_raw;
    const T a = t.weight;
    const T k = a * scale;
    const Vec vk(k);
    Vec acc(0);
    // Every class as a non-target (v = -z', d l / d z' = +dloss); the target's lane is then dropped
    // from the sum and its gradient rewritten below.
    for_row_chunks<T>(z, C, [&](int64_t j, int64_t n) {
      Vec l, dl, sech2;
      const Vec x = transformed ? tf.logit(load(z + j, n), j, n, &sech2) : load(z + j, n);
      focal_term<G, VecMath<T>>(Vec(0) - x, vgamma, l, dl);
      acc = acc + drop_target(head(l, n), j, n, y);
      if (g != nullptr) store(g + j, capped ? tf.grad(dl * vk, j, n, &sech2) : dl * vk, n);
    });
    T ly, dly;
    focal_term<G, ScalarMath<T>>(zy, gamma, ly, dly);
    if (g != nullptr) g[y] = static_cast<scalar_t>(tf.target_grad(-dly * k, zy_raw, y));
    static_cast<T*>(p.loss)[i] = a * (hsum(acc) + ly);
  }
}

// Softmax cross-entropy (with label smoothing) and softmax focal. Three passes over the row: max,
// exp (the only transcendental per element, kept for the gradient pass), gradient.
template <typename scalar_t, bool kTf>
CB_FLATTEN void softmax_rows(const CBLossParams& p, int64_t begin, int64_t end, const OneHotRow* onehot) {
  using T = acc_t<scalar_t>;
  using Vec = Vectorized<T>;
  const int64_t C = p.num_classes;
  const TransformBuffers<T> buffers(p, true);
  const RowTransform<T> tf = buffers.view();
  const bool transformed = kTf && tf.on(), capped = kTf && tf.cap, margined = kTf && tf.s.margin != nullptr;
  const SoftmaxEpilogue<ExpShift::kExact, T> epilogue(p, gamma_kind(p.gamma), load_scale<T>(p) * tf.grad_scale());
  const bool smoothing = epilogue.smoothing();
  const Vec neg_inf(-std::numeric_limits<T>::infinity());
  // The exps live in the gradient row when it has the compute type (no extra memory, and in place
  // they simply replace the logits already read), else in one float buffer per call, i.e. per thread.
  constexpr bool kExpsInGrad = std::is_same_v<scalar_t, T>;
  std::vector<T> buffer(p.grad != nullptr && !kExpsInGrad ? C : 0);
  for (int64_t k_row = begin; k_row < end; ++k_row) {
    const RowTarget<T> t = row_target<T>(p, k_row, onehot);
    const int64_t i = t.row;
    const scalar_t* z = static_cast<const scalar_t*>(p.logits) + i * p.logits_row_stride;
    scalar_t* g = p.grad ? static_cast<scalar_t*>(p.grad) + i * p.grad_row_stride : nullptr;
    if (!t.valid) {
      skip_row(p, i, g);
      continue;
    }
    const int64_t y = t.column;

    Vec vmax = neg_inf;
    for_row_chunks<T>(z, C, [&](int64_t j, int64_t n) {
      Vec x = transformed ? tf.logit(load(z + j, n), j, n) : load(z + j, n);
      // The lanes have no margin: the target's is left out of the max and z'_y (margined) joins it below. A max
      // above every z' by s m_y would flush every exp to 0 (s m_y > 87: NaN gradients), one below would overflow.
      if (margined) x = drop_target(x, j, n, y, neg_inf);
      // A NaN may or may not survive this max; either way it reaches the row's sum through its exp.
      vmax = at::vec::clamp_min(n == Vec::size() ? x : Vec::set(neg_inf, x, n), vmax);
    });
    T m = hmax(vmax);
    const T zy_raw = static_cast<T>(z[y]);
    const T zy = tf.target_on() ? tf.s.logit(zy_raw, y, true) : zy_raw;
    if (margined && zy > m) m = zy;

    T* e = nullptr;
    if constexpr (kExpsInGrad) {
      e = g;
    } else {
      e = g != nullptr ? buffer.data() : nullptr;
    }
    const Vec vm(m);
    Vec s_other(0), dist(0);  // sum_{j != y} exp(z_j - m); sum_j (m - z_j) for label smoothing
    for_row_chunks<T>(z, C, [&](int64_t j, int64_t n) {
      const Vec x = transformed ? tf.again(load(z + j, n), j, n) : load(z + j, n);
      const Vec ex = exp_nonpos(x - vm);
      if (e != nullptr) store(e + j, ex, n);
      s_other = s_other + drop_target(head(ex, n), j, n, y);
      if (smoothing) dist = dist + head(vm - x, n);
    });
    const T ey = cb_exp(zy - m);
    if (e != nullptr) e[y] = ey;

    T dist_sum = smoothing ? hsum(dist) : T(0);
    // The target's lane entered dist without its margin: m - z'_y = (m - lane) + (lane - z'_y).
    if (smoothing && margined) dist_sum += tf.s.logit(zy_raw, y, false) - zy;
    const SoftmaxRowStats<T> st{m, zy, ey, hsum(s_other), dist_sum, T(0)};
    const SoftmaxRowOut<T> out = epilogue(st, t.weight);
    static_cast<T*>(p.loss)[i] = out.loss;
    if (p.z_rows != nullptr) static_cast<T*>(p.z_rows)[i] = out.z;
    if (g == nullptr) continue;

    const Vec k1(out.k1), k0(out.k0);
    for_row_chunks<T>(g, C, [&](int64_t j, int64_t n) {
      const Vec d = load(e + j, n) * k1 - k0;
      store(g + j, capped ? tf.grad(d, j, n) : d, n);
    });
    g[y] = static_cast<scalar_t>(tf.target_grad(out.gy, zy_raw, y));
  }
}

// onehot: nullptr for rows [begin, end) with their index targets, else the listed one-hot rows [begin, end) of a
// dense target.
template <typename scalar_t, bool kTf>
void rows_for_kind(const CBLossParams& p, int64_t begin, int64_t end, const OneHotRow* onehot) {
  if (p.loss_type == kSoftmax || p.loss_type == kSoftmaxFocal) {
    return softmax_rows<scalar_t, kTf>(p, begin, end, onehot);
  }
  if constexpr (kTf) {
    // With transforms the focal exponents share the general form (one exp more per element, equal within rounding):
    // three more instantiations per dtype and ISA instead of six keep the build (first use, CI) short.
    if (p.loss_type == kSigmoid || gamma_kind(p.gamma) == GammaKind::kZero) {
      return sigmoid_rows<scalar_t, GammaKind::kZero, kTf>(p, begin, end, onehot);
    }
    return sigmoid_rows<scalar_t, GammaKind::kGeneral, kTf>(p, begin, end, onehot);
  }
  switch (p.loss_type == kSigmoid ? GammaKind::kZero : gamma_kind(p.gamma)) {
    case GammaKind::kZero: return sigmoid_rows<scalar_t, GammaKind::kZero, kTf>(p, begin, end, onehot);
    case GammaKind::kHalf: return sigmoid_rows<scalar_t, GammaKind::kHalf, kTf>(p, begin, end, onehot);
    case GammaKind::kOne: return sigmoid_rows<scalar_t, GammaKind::kOne, kTf>(p, begin, end, onehot);
    case GammaKind::kTwo: return sigmoid_rows<scalar_t, GammaKind::kTwo, kTf>(p, begin, end, onehot);
    default: return sigmoid_rows<scalar_t, GammaKind::kGeneral, kTf>(p, begin, end, onehot);
  }
}

template <typename scalar_t>
void rows_for_dtype(const CBLossParams& p, int64_t begin, int64_t end, const OneHotRow* onehot) {
  const bool transformed =
      p.softcap != 0.0 || p.logit_offset != nullptr || p.logit_scale != 1.0 || p.target_margin != nullptr;
  return transformed ? rows_for_kind<scalar_t, true>(p, begin, end, onehot)
                     : rows_for_kind<scalar_t, false>(p, begin, end, onehot);
}

// ---------------------------------------------------------------------------------------------------------
// Dense targets (SPEC section 9). Per row, one scan of q gives its mass, its sample weight, the value checks and
// whether it is one-hot; a one-hot row whose loss is its index target's goes to the index-target code above (the
// same bits: the index path is the special case), every other row to the dense rows below. Those are instantiated
// per compute type only (float16/bfloat16 rows pass through a float row buffer) and take the transforms and the
// focal exponent's kind as runtime values: one softmax and two sigmoid row functions (with and without the
// modulator) per compute type, where the index rows have nine per dtype; the build of three ISAs stays short. They
// re-read q from the cache in each pass: nothing [N, C] besides the gradient.

template <typename T>
inline T hmin(const Vectorized<T>& v) {
  alignas(64) T lanes[Vectorized<T>::size()];
  v.store(lanes);
  T m = lanes[0];
  for (int64_t k = 1; k < Vectorized<T>::size(); ++k) m = std::isnan(lanes[k]) ? lanes[k] : std::min(m, lanes[k]);
  return m;
}

// The bits of float lanes as int32 lanes.
CB_HOST_DEVICE Vectorized<int32_t> float_bits(const Vectorized<float>& x) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_castps_si512(x);
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_castps_si256(x);
#else
  static_assert(Vectorized<float>::size() == Vectorized<int32_t>::size());
  alignas(64) float f[Vectorized<float>::size()];
  alignas(64) int32_t b[Vectorized<int32_t>::size()];
  x.store(f);
  std::memcpy(b, f, sizeof(b));
  return Vectorized<int32_t>::loadu(b);
#endif
}

// log(x) for positive normal x (the focal modulators' 1 - pt and 1 - P, in (0, 1] up to an ulp), inlined like
// exp_nonpos: x = 2^e m with m in [sqrt(1/2), sqrt(2)), log(m) by Cephes' logf fit in m - 1 (about 1 ulp).
CB_HOST_DEVICE Vectorized<float> log_pos(const Vectorized<float>& x) {
  using V = Vectorized<float>;
  using Vi = Vectorized<int32_t>;
  const Vi bits = float_bits(x);
  V e = at::vec::convert_to_fp_of_same_size<float>((bits >> Vi(23)) - Vi(126));
  V m = at::vec::cast<float>((bits & Vi(0x007fffff)) | Vi(0x3f000000));  // in [1/2, 1)
  const V root_half(0.707106781186547524f);
  e = select_lt(m, root_half, e - V(1.0f), e);
  m = select_lt(m, root_half, m + m, m) - V(1.0f);
  static constexpr float c[] = {3.3333331174e-1f, -2.4999993993e-1f, 2.0000714765e-1f, -1.6668057665e-1f,
                                1.4249322787e-1f, -1.2420140846e-1f, 1.1676998740e-1f, -1.1514610310e-1f,
                                7.0376836292e-2f};
  V y(c[8]);
  for (int k = 7; k >= 0; --k) y = at::vec::fmadd(y, m, V(c[k]));
  const V m2 = m * m;
  y = y * m * m2;
  y = at::vec::fmadd(e, V(-2.12194440e-4f), y);
  y = at::vec::fmadd(m2, V(-0.5f), y);
  return at::vec::fmadd(e, V(0.693359375f), m + y);
}
CB_HOST_DEVICE Vectorized<double> log_pos(const Vectorized<double>& x) { return x.log(); }

// 1 - P = -expm1(-L) for L >= 0 from P = exp(-L): 1 - P where that keeps its digits (L >= 1/2: 1 - P >= 0.39),
// below it the series L (1 - L/2 + L^2/6 - ...) to L^8 (relative error 1e-8).
CB_HOST_DEVICE Vectorized<float> one_minus_exp_neg(const Vectorized<float>& L, const Vectorized<float>& P) {
  using V = Vectorized<float>;
  static constexpr float c[] = {1.0f, -1.0f / 2, 1.0f / 6, -1.0f / 24, 1.0f / 120, -1.0f / 720, 1.0f / 5040,
                                -1.0f / 40320};
  V s(c[7]);
  for (int k = 6; k >= 0; --k) s = at::vec::fmadd(s, L, V(c[k]));
  return select_lt(L, V(0.5f), L * s, V(1.0f) - P);
}
CB_HOST_DEVICE Vectorized<double> one_minus_exp_neg(const Vectorized<double>& L, const Vectorized<double>&) {
  return Vectorized<double>(0.0) - (Vectorized<double>(0.0) - L).expm1();
}

// n <= W elements of a float32, float16 or bfloat16 vector in the compute type T.
template <typename T, typename S>
CB_HOST_DEVICE Vectorized<T> load_vector_any(const S* v, int64_t j, int64_t n) {
  if constexpr (std::is_same_v<S, float>) {
    return load_vector<T>(v, j, n);
  } else {
    return load(v + j, n);
  }
}

// Dense rows in storage S read into T lanes (and written back), as small functions per storage type: the dense rows
// themselves are instantiated per compute type T only, reading float16/bfloat16 logits (and targets) through a row
// buffer and writing their gradient from one, which costs two cheap passes over a row in the cache.
template <typename S, typename T>
void read_row(const void* src, T* dst, int64_t n) {
  const S* s = static_cast<const S*>(src);
  for_row_chunks<T>(s, n, [&](int64_t j, int64_t m) { load_vector_any<T>(s, j, m).store(dst + j, m); });
}
template <typename S>
void write_row(const float* src, void* dst, int64_t n) {
  S* d = static_cast<S*>(dst);
  for_row_chunks<float>(src, n, [&](int64_t j, int64_t m) { store(d + j, Vectorized<float>::loadu(src + j, m), m); });
}

// How the dense rows of one call reach the logits, the gradient and the target (cb_binding.h: q in the logits' type
// or in float32) in the compute type T.
template <typename T>
struct DenseIO {
  const char* logits;
  char* grad;
  const char* target;
  int64_t logits_row_bytes, grad_row_bytes, target_row_bytes;
  void (*read_logits)(const void*, T*, int64_t);  // nullptr: the logits are stored as T
  void (*write_grad)(const T*, void*, int64_t);
  void (*read_target)(const void*, T*, int64_t);  // nullptr: q is stored as T
};

template <typename scalar_t>
DenseIO<acc_t<scalar_t>> dense_io(const CBLossParams& p) {
  using T = acc_t<scalar_t>;
  // q's storage when it is not T: the logits' float16/bfloat16, or float32 with float64 logits.
  using Other = std::conditional_t<std::is_same_v<scalar_t, T>, float, scalar_t>;
  const bool q_is_t = p.target_dtype == (std::is_same_v<T, double> ? Dtype::kDouble : Dtype::kFloat);
  DenseIO<T> io{static_cast<const char*>(p.logits), static_cast<char*>(p.grad), static_cast<const char*>(p.target),
                p.logits_row_stride * static_cast<int64_t>(sizeof(scalar_t)),
                p.grad_row_stride * static_cast<int64_t>(sizeof(scalar_t)),
                p.target_row_stride * static_cast<int64_t>(q_is_t ? sizeof(T) : sizeof(Other)),
                nullptr, nullptr, q_is_t ? nullptr : &read_row<Other, T>};
  if constexpr (!std::is_same_v<scalar_t, T>) {
    io.read_logits = &read_row<scalar_t, T>;
    io.write_grad = &write_row<scalar_t>;
  }
  return io;
}

// [n] row buffers of one thread that start at different offsets modulo 4096 bytes (a multiple of 576 past a page
// boundary, first + k for the k-th): the row passes load and store several of them at the same index, and buffers
// whose addresses agree in their low 12 bits make those loads wait on unrelated stores (4K aliasing: up to 1.7x on
// the float16/bfloat16 rows, depending on where the allocator put them). Slots beyond 6 (+ first) are not spread.
template <typename T>
class RowBuffers {
 public:
  RowBuffers(int count, int64_t n, int first = 0) {
    constexpr int64_t kPage = 4096 / sizeof(T), kStep = 576 / sizeof(T);
    const int64_t stride = (n + kPage - 1) / kPage * kPage + kPage;  // whole pages, one to spare for the offset
    mem_.resize(count > 0 ? count * stride + kPage : 0);
    const uintptr_t addr = reinterpret_cast<uintptr_t>(mem_.data());
    T* base = mem_.data() + (4096 - addr % 4096) % 4096 / sizeof(T);
    for (int k = 0; k < count && k < kSlots; ++k) slot_[k] = base + k * stride + (first + k) * kStep % kPage;
  }
  T* operator[](int k) const { return slot_[k]; }

 private:
  static constexpr int kSlots = 8;
  std::vector<T> mem_;
  T* slot_[kSlots] = {};
};

// One row of a dense call in T: z (and g, nullptr for no gradient) in place when stored as T, else in the buffers
// (finish() then writes g back); q in place or converted.
template <typename T>
class DenseRow {
 public:
  DenseRow(const CBLossParams& p, const DenseIO<T>& io)
      : io_(io),
        bufs_(io.read_logits != nullptr ? 3 : io.read_target != nullptr ? 1 : 0, p.num_classes),
        num_classes_(p.num_classes) {}

  const T* target(int64_t i) {
    const void* q = io_.target + i * io_.target_row_bytes;
    if (io_.read_target == nullptr) return static_cast<const T*>(q);
    io_.read_target(q, bufs_[0], num_classes_);
    return bufs_[0];
  }
  // The logits of row i and where its gradient goes.
  void logits(int64_t i, const T*& z, T*& g) {
    const void* zr = io_.logits + i * io_.logits_row_bytes;
    T* gr = io_.grad != nullptr ? reinterpret_cast<T*>(io_.grad + i * io_.grad_row_bytes) : nullptr;
    if (io_.read_logits == nullptr) {
      z = static_cast<const T*>(zr);
      g = gr;
      return;
    }
    io_.read_logits(zr, bufs_[1], num_classes_);
    z = bufs_[1];
    g = gr != nullptr ? bufs_[2] : nullptr;
  }
  void finish(int64_t i) {
    if (io_.read_logits != nullptr && io_.grad != nullptr) {
      io_.write_grad(bufs_[2], io_.grad + i * io_.grad_row_bytes, num_classes_);
    }
  }

 private:
  DenseIO<T> io_;
  RowBuffers<T> bufs_;  // q, z, g (the first alone when only q is converted)
  int64_t num_classes_;
};

// A SIMD sum with Kahan's compensation, for the block sums of RowSum and the scan.
template <typename T>
struct KahanSum {
  Vectorized<T> sum{T(0)};
  Vectorized<T> lost{T(0)};  // what the additions so far rounded away, negated
  CB_HOST_DEVICE void add(const Vectorized<T>& x) {
    const Vectorized<T> y = x - lost;
    const Vectorized<T> t = sum + y;
    lost = (t - sum) - y;
    sum = t;
  }
  T total() const { return hsum(sum - lost); }
};

// A SIMD row sum that keeps about an ulp per lane: the terms go into a plain block sum, and every 8 pieces the block
// into a Kahan-compensated total. A soft row's sums (its mass and sample weight, factors of every gradient element)
// add thousands of small terms to one or two large ones, which a plain sum rounds at the large one's ulp each time
// (3e-6 relative over 8142 classes); a block of small terms rounds at its own. Kahan on every piece cost as much as
// the rest of the scan.
template <typename T>
class RowSum {
 public:
  static constexpr int kBlock = 8;
  CB_HOST_DEVICE void add(const Vectorized<T>& x) {
    block_ = block_ + x;
    if (++pieces_ == kBlock) flush();
  }
  T total() {
    flush();
    return total_.total();
  }

 private:
  CB_HOST_DEVICE void flush() {
    total_.add(block_);
    block_ = Vectorized<T>(T(0));
    pieces_ = 0;
  }
  Vectorized<T> block_{T(0)};
  KahanSum<T> total_;
  int pieces_ = 0;
};

template <typename T>
struct DenseScan {
  const T* q;         // the row in T
  T mass;             // sum_j q_j
  T weighted;         // sum_j w_j q_j
  int64_t nonzeros;   // columns with q_j != 0
  bool bad;           // a NaN, a negative q, or one above the loss' bound (dense_bound)

  // The sample weight a_i: the weights' mean under q, 1 for a row without mass.
  T sample_weight() const { return mass > T(0) ? weighted / mass : T(1); }
};

// The largest good q: 1 for the sigmoid losses (per-class probabilities), the largest finite value else.
template <typename T>
T dense_bound(const CBLossParams& p) {
  return p.loss_type == kSigmoid || p.loss_type == kFocal ? T(1) : std::numeric_limits<T>::max();
}

template <typename T>
constexpr uint32_t kLaneBits = Vectorized<T>::size() >= 32 ? ~0u : (1u << Vectorized<T>::size()) - 1;

// The scan of dense target row q: its sums in RowSum's blocks (one block count for both), the value checks and the
// nonzero count without a branch (the rows are long and the work per element small: only so does it run at the
// cache's speed).
template <typename T>
CB_HOST_DEVICE DenseScan<T> scan_dense_row(const CBLossParams& p, const T* q, T bound) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const int64_t C = p.num_classes;
  KahanSum<T> mass, weighted;
  Vec block_mass(0), block_weighted(0), lo(0), hi(0);
  int64_t nonzeros = 0;
  const auto piece = [&](int64_t j, int64_t n) {
    const Vec qv = Vec::loadu(q + j, n);  // lanes past n: 0, counted nowhere
    block_mass = block_mass + qv;
    block_weighted = at::vec::fmadd(qv, load_vector<T>(p.weight, j, n), block_weighted);
    lo = at::vec::clamp_max(qv, lo);  // a NaN shows in the mass instead
    hi = at::vec::clamp_min(qv, hi);
    nonzeros += std::popcount(~static_cast<uint32_t>(qv.zero_mask()) & kLaneBits<T>);
  };
  const auto flush = [&] {
    mass.add(block_mass);
    weighted.add(block_weighted);
    block_mass = block_weighted = Vec(0);
  };
  // The pieces of for_row_chunks, in blocks of 8.
  int64_t j = 0;
  for (; j + 8 * W <= C; j += 8 * W) {
    for (int64_t k = 0; k < 8; ++k) piece(j + k * W, W);
    flush();
  }
  for (; j < C; j += W) piece(j, std::min(W, C - j));
  flush();
  const T m = mass.total();
  const bool ok = m == m && hmin(lo) >= T(0) && hmax(hi) <= bound;
  return {q, m, weighted.total(), nonzeros, !ok};
}

// The nonzero columns of row q (nonzeros of them, from the scan) into cols.
template <typename T>
void nonzero_columns(const T* q, int64_t C, int64_t nonzeros, int64_t* cols) {
  int64_t k = 0;
  for (int64_t j = 0; j < C && k < nonzeros; j += Vectorized<T>::size()) {
    const int64_t n = std::min<int64_t>(Vectorized<T>::size(), C - j);
    for (uint32_t b = ~static_cast<uint32_t>(Vectorized<T>::loadu(q + j, n).zero_mask()) & kLaneBits<T>; b != 0;
         b &= b - 1) {
      cols[k++] = j + std::countr_zero(b);
    }
  }
}

// The column of a one-hot row (one 1, zeros elsewhere): an index target's row; -1 for any other row.
template <typename T>
int64_t one_hot_column(const DenseScan<T>& s, int64_t C) {
  if (s.nonzeros != 1 || s.mass != T(1)) return -1;
  int64_t column;
  nonzero_columns(s.q, C, 1, &column);
  return column;
}

// tanh and sech^2 as tanh_sech2, with ATen's (Sleef's) tanh, within 1 ulp where tanh_sech2's is within 4: a dense
// row's gradient may peak at any column (multi-hot rows), where z' carries its error into p_k at full weight. The
// index rows keep the faster form (their bits stay).
CB_HOST_DEVICE void dense_tanh_sech2(const Vectorized<float>& x, Vectorized<float>& t, Vectorized<float>& sech2) {
  using V = Vectorized<float>;
  const V e = exp_nonpos(V(-2.0f) * x.abs());
  const V d = recip_unit(V(1.0f) + e);
  sech2 = V(4.0f) * e * d * d;
  t = x.tanh();
}
CB_HOST_DEVICE void dense_tanh_sech2(const Vectorized<double>& x, Vectorized<double>& t, Vectorized<double>& sech2) {
  tanh_sech2(x, t, sech2);
}

// z' of dense columns [j, j + n) before the margin: tf.logit with dense_tanh_sech2; sech2 receives the softcap's
// factor when on.
template <typename T>
CB_HOST_DEVICE Vectorized<T> dense_logit(const RowTransform<T>& tf, const Vectorized<T>& z, int64_t j, int64_t n,
                                         Vectorized<T>& sech2) {
  if (!tf.cap) return tf.affine(z, tf.s.scale, j, n);
  Vectorized<T> t;
  dense_tanh_sech2(z * Vectorized<T>(tf.s.inv_cap), t, sech2);
  return tf.affine(t, tf.s.cap * tf.s.scale, j, n);
}

// 1 / y for y in [1, 2]: recip_unit for float (no division), a division for double.
CB_HOST_DEVICE Vectorized<float> recip_one_two(const Vectorized<float>& y) { return recip_unit(y); }
CB_HOST_DEVICE Vectorized<double> recip_one_two(const Vectorized<double>& y) { return y.reciprocal(); }

// The margin's factor s m_j per class (z'_j = s (c tanh(z_j / c) + o_j) - s m_j q_j), empty without a margin.
template <typename T>
std::vector<T> scaled_margin(const CBLossParams& p) {
  std::vector<T> out(p.target_margin != nullptr ? p.num_classes : 0);
  for (size_t j = 0; j < out.size(); ++j) out[j] = static_cast<T>(p.logit_scale) * static_cast<T>(p.target_margin[j]);
  return out;
}

// One dense sigmoid-focal class term of transformed logit x and target q in [0, 1]: the loss (1-pt)^gamma ce and its
// derivative in x (gamma = 0: sigmoid cross-entropy), every part formed without cancellation:
//   ce = softplus(x) - q x = log1p(e^-|x|) + t x,  t = (x >= 0 ? 1 - q : -q)       (t x >= 0)
//   sigmoid(x) - q = t - (x >= 0 ? sigmoid(-x) : -sigmoid(x))
//   1 - pt = q sigmoid(-x) + (1 - q) sigmoid(x)
//   d/dx = (1-pt)^gamma (sigmoid(x) - q) + gamma (1 - 2q) sigmoid(x) sigmoid(-x) (1-pt)^(gamma-1) ce
// where (1-pt)^(gamma-1) is taken as 0 when 1 - pt underflows to 0 (then sigmoid(x) sigmoid(-x) = 0 too).
template <bool kFocal, typename T>
CB_HOST_DEVICE void dense_focal_term(const Vectorized<T>& x, const Vectorized<T>& q, GammaKind gk,
                                     const Vectorized<T>& gamma, Vectorized<T>& loss, Vectorized<T>& dloss) {
  using V = Vectorized<T>;
  const V e = exp_nonpos(V(0) - x.abs());
  const V d = recip_one_two(V(1) + e);  // sigmoid(|x|)
  const V ed = e * d;                   // sigmoid(-|x|)
  const V omq = V(1) - q;
  const V t = select_lt(x, V(0), V(0) - q, omq);
  const V ce = at::vec::fmadd(t, x, log1p_unit(e));
  const V grad_ce = t - select_lt(x, V(0), V(0) - ed, ed);
  if constexpr (!kFocal) {
    loss = ce;
    dloss = grad_ce;
  } else {
    const V omp = at::vec::fmadd(q, select_lt(x, V(0), d, ed), omq * select_lt(x, V(0), ed, d));
    V mod, mod_per_omp;
    // gk is the same for every call of a row function: the branch is predicted.
    if (gk == GammaKind::kTwo) {
      mod = omp * omp;
      mod_per_omp = omp;
    } else if (gk == GammaKind::kOne) {
      mod = omp;
      mod_per_omp = V(1);
    } else if (gk == GammaKind::kHalf) {
      mod = omp.sqrt();
      mod_per_omp = select_lt(V(0), omp, mod.reciprocal(), V(0));
    } else {
      const V lo = log_pos(at::vec::maximum(omp, V(Limits<T>::min_normal())));
      mod = select_lt(V(0), omp, exp_nonpos(gamma * lo), V(0));
      mod_per_omp = select_lt(V(0), omp, mod / omp, V(0));
    }
    loss = mod * ce;
    dloss = at::vec::fmadd(gamma * (omq - q) * (d * ed) * mod_per_omp, ce, mod * grad_ce);
  }
}

// One dense softmax-focal class term from L = lse' - z'_j >= 0 and cwq = cw_j q_j: the loss cwq (1-P)^gamma L and
// the gradient's cwq c with c = (1-P)^gamma (1 + gamma P r), r = L / (1-P) (1 where 1-P = 0), as
// softmax_focal_row_exact_gamma; both 0 where cwq = 0 (whatever L). The exponents 1/2, 1 and 2 need neither the log
// nor the division (gk is the same for every call of a row function: the branch is predicted).
template <typename T>
CB_HOST_DEVICE void dense_softmax_focal_term(const Vectorized<T>& L, const Vectorized<T>& cwq, GammaKind gk,
                                             const Vectorized<T>& gamma_hi, const Vectorized<T>& gamma_lo,
                                             Vectorized<T>& loss, Vectorized<T>& coef) {
  using V = Vectorized<T>;
  const V P = exp_nonpos(V(0) - L);
  const V omp = one_minus_exp_neg(L, P);
  V mod, mod_r;  // (1-P)^gamma, and (1-P)^gamma r
  if (gk == GammaKind::kTwo) {
    mod = omp * omp;
    mod_r = omp * L;
  } else if (gk == GammaKind::kOne) {
    mod = omp;
    mod_r = L;
  } else if (gk == GammaKind::kHalf) {
    mod = omp.sqrt();
    mod_r = select_lt(V(0), omp, L / mod, V(0));
  } else {
    const V lo = log_pos(at::vec::maximum(omp, V(Limits<T>::min_normal())));
    // gamma in two parts: a float gamma like 1.7 alone would shift (1-P)^gamma by 1e-6 on a confident column.
    mod = select_lt(V(0), omp, exp_nonpos(at::vec::fmadd(gamma_lo, lo, gamma_hi * lo)), V(0));
    mod_r = select_lt(V(0), omp, mod * L / omp, V(0));
  }
  loss = select_lt(V(0), cwq, cwq * mod * L, V(0));
  coef = select_lt(V(0), cwq, cwq * at::vec::fmadd(gamma_hi * P, mod_r, mod), V(0));
}

// Sigmoid cross-entropy (kFocal false, or gamma = 0) and sigmoid focal with dense targets: a_i sum_j cw_j e_ij, one
// pass over the row after the scan. Returns the first row with a bad target (-1: none); one-hot rows go to onehot.
template <typename T, bool kFocal>
CB_FLATTEN int64_t dense_sigmoid_rows(const CBLossParams& p, const DenseIO<T>& io, int64_t begin, int64_t end,
                                      std::vector<OneHotRow>& onehot) {
  using Vec = Vectorized<T>;
  const int64_t C = p.num_classes;
  DenseRow<T> row(p, io);
  const TransformBuffers<T> buffers(p, false);
  const RowTransform<T> tf = buffers.view();
  const std::vector<T> margin = scaled_margin<T>(p);
  const T* sm = margin.empty() ? nullptr : margin.data();
  const bool transformed = tf.on(), capped = tf.cap;
  const bool class_mode = p.weight_mode == kWeightClass;
  const T scale = load_scale<T>(p) * tf.grad_scale();
  const Vec vgamma(static_cast<T>(p.gamma));
  const GammaKind gk = gamma_kind(p.gamma);
  const T bound = dense_bound<T>(p);
  for (int64_t i = begin; i < end; ++i) {
    const DenseScan<T> s = scan_dense_row(p, row.target(i), bound);
    if (s.bad) return i;
    // In sample mode a one-hot row is its index target (a = w_y). In class mode the index code would weight the
    // other classes' terms by w_y instead of their own w_j.
    if (const int64_t y = class_mode ? -1 : one_hot_column(s, C); y >= 0) {
      onehot.push_back({i, y});
      continue;
    }
    const T* z;
    T* g;
    row.logits(i, z, g);
    if (p.z_rows != nullptr) static_cast<T*>(p.z_rows)[i] = 0;
    const T a = class_mode ? T(1) : s.sample_weight();
    const Vec vk(a * scale);
    Vec acc(0);
    for_row_chunks<T>(z, C, [&](int64_t j, int64_t n) {
      const Vec qv = Vec::loadu(s.q + j, n);
      Vec x = Vec::loadu(z + j, n), sech2;
      if (transformed) x = dense_logit(tf, x, j, n, sech2);
      if (sm != nullptr) x = at::vec::fnmadd(qv, Vec::loadu(sm + j, n), x);
      Vec l, dl;
      dense_focal_term<kFocal>(x, qv, gk, vgamma, l, dl);
      if (class_mode) {
        const Vec w = load_vector<T>(p.weight, j, n);
        l = l * w;
        dl = dl * w;
      }
      acc = acc + head(l, n);
      if (g != nullptr) (capped ? dl * vk * sech2 : dl * vk).store(g + j, n);
    });
    static_cast<T*>(p.loss)[i] = a * hsum(acc);
    row.finish(i);
  }
  return -1;
}

// Softmax cross-entropy (label smoothing: q' = (1-eps) q + eps/C) and softmax focal with dense targets. Passes: z' and
// the max (z' kept in a row buffer when transformed: the margin depends on q), the exps with their sum (and the
// cross-entropy's distances), softmax focal's per-column terms (the row statistic S needs lse first), the gradient
//   dl/dz'_k = a (S p_k - cw_k u_k)  (+ the z-loss's 2 z_loss lse' p_k),
//   cross-entropy: S = sum_j cw_j q'_j, u = q';  focal: S = sum_j cw_j q_j c_j, u = q c.
// The loss is formed from non-negative terms only:
//   cross-entropy  sum_j cw_j q'_j (m - z'_j) + S (lse' - m);   focal  sum_j cw_j q_j (1-P_j)^gamma L_j.
template <typename T>
CB_FLATTEN int64_t dense_softmax_rows(const CBLossParams& p, const DenseIO<T>& io, int64_t begin, int64_t end,
                                      std::vector<OneHotRow>& onehot) {
  using Vec = Vectorized<T>;
  const int64_t C = p.num_classes;
  DenseRow<T> row(p, io);
  const TransformBuffers<T> buffers(p, false);
  const RowTransform<T> tf = buffers.view();
  const std::vector<T> margin = scaled_margin<T>(p);
  const T* sm = margin.empty() ? nullptr : margin.data();
  const bool transformed = tf.on() || sm != nullptr, capped = tf.cap;
  const bool class_mode = p.weight_mode == kWeightClass;
  const bool focal = p.loss_type == kSoftmaxFocal && p.gamma != 0.0;  // gamma = 0: cross-entropy
  const T eps = p.loss_type == kSoftmax ? static_cast<T>(p.label_smoothing) : T(0);
  const T eps_c = eps / static_cast<T>(C);
  const T scale = load_scale<T>(p) * tf.grad_scale();
  const T z_loss = static_cast<T>(p.z_loss);
  const GammaKind gk = gamma_kind(p.gamma);
  const T gamma_hi = static_cast<T>(p.gamma);
  const Vec vgamma_hi(gamma_hi), vgamma_lo(static_cast<T>(p.gamma - static_cast<double>(gamma_hi)));
  const Vec neg_inf(-std::numeric_limits<T>::infinity());
  const T bound = dense_bound<T>(p);
  T weight_sum = 0;  // sum_j w_j: the smoothing's part of S in class mode
  if (class_mode && eps != T(0)) {
    RowSum<T> acc;
    for_row_chunks<T>(p.weight, C, [&](int64_t j, int64_t n) { acc.add(load_vector<T>(p.weight, j, n)); });
    weight_sum = acc.total();
  }
  const bool want_grad = p.grad != nullptr;
  // The exps go to the gradient row (no extra memory), except for the focal loss, whose per-column pass reads z after
  // them (in place, the gradient row is z).
  const bool exps_apart = want_grad && focal;
  const RowBuffers<T> work(int{transformed} + int{capped} + 2 * int{exps_apart}, C, 3);  // after DenseRow's three
  int taken = 0;
  const auto take = [&](bool wanted) { return wanted ? work[taken++] : nullptr; };
  T* const xs = take(transformed);     // z' of the row
  T* const sech2s = take(capped);      // sech^2(z / c) of the row
  T* const exps = take(exps_apart);    // exp(z' - m) when not in the gradient row
  T* const coefs = take(exps_apart);   // cw_j q_j c_j (focal)
  // Softmax focal on a row with few nonzeros (mixup: two) takes the per-column math in scalar code on those columns
  // (cb_math.h's, as the index rows) instead of a SIMD pass over all C.
  const int64_t max_cols = focal ? C / 32 : 0;
  std::vector<int64_t> cols(max_cols);
  std::vector<T> col_x(max_cols), col_cwq(max_cols), col_coef(max_cols);
  // In class mode, softmax losses without smoothing: a one-hot row's w_y (lse - z'_y) is its index target's loss.
  const bool route = !class_mode || eps == T(0);
  for (int64_t i = begin; i < end; ++i) {
    const DenseScan<T> s = scan_dense_row(p, row.target(i), bound);
    if (s.bad) return i;
    if (const int64_t y = route ? one_hot_column(s, C) : -1; y >= 0) {
      onehot.push_back({i, y});
      continue;
    }
    const T* z;
    T* g;
    row.logits(i, z, g);
    const bool sparse = focal && s.nonzeros <= max_cols;
    if (sparse) nonzero_columns(s.q, C, s.nonzeros, cols.data());

    Vec vmax = neg_inf;
    for_row_chunks<T>(z, C, [&](int64_t j, int64_t n) {
      Vec x = Vec::loadu(z + j, n);
      if (transformed) {
        Vec sech2;
        x = dense_logit(tf, x, j, n, sech2);
        if (sm != nullptr) x = at::vec::fnmadd(Vec::loadu(s.q + j, n), Vec::loadu(sm + j, n), x);
        x.store(xs + j, n);
        if (capped) sech2.store(sech2s + j, n);
      }
      vmax = at::vec::clamp_min(n == Vec::size() ? x : Vec::set(neg_inf, x, n), vmax);
    });
    const T m = hmax(vmax);
    const Vec vm(m);
    for (int64_t k = 0; sparse && k < s.nonzeros; ++k) {
      const int64_t c = cols[k];
      col_x[k] = transformed ? xs[c] : z[c];
      col_cwq[k] = s.q[c] * (class_mode ? static_cast<T>(p.weight[c]) : T(1));
    }

    T* const e = exps_apart ? exps : g;
    Vec sum(0);                         // sum_j exp(z'_j - m)
    RowSum<T> dist_q, dist_1;   // sum_j cw_j q_j (m - z'_j); sum_j cw_j (m - z'_j)
    for_row_chunks<T>(z, C, [&](int64_t j, int64_t n) {
      const Vec x = Vec::loadu((transformed ? xs : z) + j, n);
      const Vec ex = exp_nonpos(x - vm);
      if (e != nullptr) ex.store(e + j, n);
      sum = sum + head(ex, n);
      if (!focal) {
        Vec d = vm - x;
        if (class_mode) d = d * load_vector<T>(p.weight, j, n);
        dist_q.add(Vec::loadu(s.q + j, n) * d);  // lanes past n: q = 0
        if (eps != T(0)) dist_1.add(head(d, n));
      }
    });
    const T sum_e = hsum(sum);
    const T lse_m = cb_log(sum_e);  // >= 0: the max contributes exp(0) = 1
    T row_loss = 0, coef_sum = 0;   // the loss before a, and S
    if (!focal) {
      coef_sum = class_mode ? (T(1) - eps) * s.weighted + eps_c * weight_sum : (T(1) - eps) * s.mass + eps;
      row_loss = (T(1) - eps) * dist_q.total() + eps_c * dist_1.total() + coef_sum * lse_m;
    } else if (sparse) {
      for (int64_t k = 0; k < s.nonzeros; ++k) {
        T mod, coef;
        const T L = lse_m + (m - col_x[k]);
        softmax_focal_row_exact_gamma(L, p.gamma, gk, mod, coef);
        row_loss += col_cwq[k] * mod * L;
        col_coef[k] = col_cwq[k] * coef;
        coef_sum += col_coef[k];
      }
    } else {
      const Vec vlse_m(lse_m);
      RowSum<T> loss_acc, coef_acc;
      for_row_chunks<T>(z, C, [&](int64_t j, int64_t n) {
        const Vec x = Vec::loadu((transformed ? xs : z) + j, n);
        Vec cwq = Vec::loadu(s.q + j, n);
        if (class_mode) cwq = cwq * load_vector<T>(p.weight, j, n);
        Vec l, c;
        dense_softmax_focal_term(vlse_m + (vm - x), cwq, gk, vgamma_hi, vgamma_lo, l, c);  // lanes past n: cwq = 0
        loss_acc.add(l);
        coef_acc.add(c);
        if (coefs != nullptr) c.store(coefs + j, n);
      });
      row_loss = loss_acc.total();
      coef_sum = coef_acc.total();
    }
    const T a = class_mode ? T(1) : s.sample_weight();
    T out_loss = a * row_loss, z_row = 0, kz = 0;
    if (z_loss != T(0)) {
      const T lse = m + lse_m;
      z_row = z_loss * lse * lse;
      out_loss += z_row;
      kz = T(2) * z_loss * lse * scale;
    }
    static_cast<T*>(p.loss)[i] = out_loss;
    if (p.z_rows != nullptr) static_cast<T*>(p.z_rows)[i] = z_row;
    if (g == nullptr) continue;

    const T ks = a * scale;
    const T k1 = (ks * coef_sum + kz) / sum_e;
    const Vec vk1(k1), vks(ks), kq(ks * (T(1) - eps)), k0(ks * eps_c);
    for_row_chunks<T>(z, C, [&](int64_t j, int64_t n) {
      Vec d = vk1 * Vec::loadu(e + j, n);
      if (!focal) {
        Vec u = at::vec::fmadd(kq, Vec::loadu(s.q + j, n), k0);
        if (class_mode) u = u * load_vector<T>(p.weight, j, n);
        d = d - u;
      } else if (!sparse) {
        d = at::vec::fnmadd(vks, Vec::loadu(coefs + j, n), d);
      }
      (capped ? d * Vec::loadu(sech2s + j, n) : d).store(g + j, n);
    });
    for (int64_t k = 0; sparse && k < s.nonzeros; ++k) {
      const int64_t c = cols[k];
      const T d = k1 * e[c] - ks * col_coef[k];
      g[c] = capped ? d * sech2s[c] : d;
    }
    row.finish(i);
  }
  return -1;
}

template <typename scalar_t>
int64_t dense_rows_for_dtype(const CBLossParams& p, int64_t begin, int64_t end) {
  using T = acc_t<scalar_t>;
  const DenseIO<T> io = dense_io<scalar_t>(p);
  std::vector<OneHotRow> onehot;
  int64_t bad = -1;
  if (p.loss_type == kSoftmax || p.loss_type == kSoftmaxFocal) {
    bad = dense_softmax_rows<T>(p, io, begin, end, onehot);
  } else if (p.loss_type == kSigmoid || p.gamma == 0.0) {
    bad = dense_sigmoid_rows<T, false>(p, io, begin, end, onehot);
  } else {
    bad = dense_sigmoid_rows<T, true>(p, io, begin, end, onehot);
  }
  if (bad >= 0) return bad;
  // The one-hot rows in one call of the index-target code (its per-call set-up once).
  if (!onehot.empty()) rows_for_dtype<scalar_t>(p, 0, static_cast<int64_t>(onehot.size()), onehot.data());
  return -1;
}

template <typename scalar_t>
int64_t scan_rows_for_dtype(const CBLossParams& p, int64_t begin, int64_t end, double* sample_weights) {
  using T = acc_t<scalar_t>;
  DenseRow<T> row(p, dense_io<scalar_t>(p));
  const T bound = dense_bound<T>(p);
  for (int64_t i = begin; i < end; ++i) {
    const DenseScan<T> s = scan_dense_row(p, row.target(i), bound);
    if (s.bad) return i;
    if (sample_weights != nullptr) sample_weights[i] = static_cast<double>(s.sample_weight());
  }
  return -1;
}

}  // namespace

int64_t cb_loss_rows(const CBLossParams& p, int64_t begin, int64_t end) {
  if (p.dense_target) {
    switch (p.dtype) {
      case Dtype::kDouble: return dense_rows_for_dtype<double>(p, begin, end);
      case Dtype::kHalf: return dense_rows_for_dtype<c10::Half>(p, begin, end);
      case Dtype::kBFloat16: return dense_rows_for_dtype<c10::BFloat16>(p, begin, end);
      default: return dense_rows_for_dtype<float>(p, begin, end);
    }
  }
  switch (p.dtype) {
    case Dtype::kDouble: rows_for_dtype<double>(p, begin, end, nullptr); break;
    case Dtype::kHalf: rows_for_dtype<c10::Half>(p, begin, end, nullptr); break;
    case Dtype::kBFloat16: rows_for_dtype<c10::BFloat16>(p, begin, end, nullptr); break;
    default: rows_for_dtype<float>(p, begin, end, nullptr); break;
  }
  return -1;
}

int64_t scan_dense_rows(const CBLossParams& p, int64_t begin, int64_t end, double* sample_weights) {
  switch (p.dtype) {
    case Dtype::kDouble: return scan_rows_for_dtype<double>(p, begin, end, sample_weights);
    case Dtype::kHalf: return scan_rows_for_dtype<c10::Half>(p, begin, end, sample_weights);
    case Dtype::kBFloat16: return scan_rows_for_dtype<c10::BFloat16>(p, begin, end, sample_weights);
    default: return scan_rows_for_dtype<float>(p, begin, end, sample_weights);
  }
}

}  // namespace cbkernels::cpu::CPU_CAPABILITY
