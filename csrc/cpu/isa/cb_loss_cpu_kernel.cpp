// Row kernels of the fused class-balanced losses on CPU (SPEC sections 3-4).
//
// setup.py compiles this file once per instruction set (DEFAULT, and on x86-64 AVX2 and AVX512,
// with ATen's flags and CPU_CAPABILITY macros), like ATen's own kernels; the binding picks one at
// run time. Everything here has internal linkage except cb_loss_rows in its per-ISA namespace, and
// no static initialisers: code in this file may only run on a CPU that has its instructions.
//
// One row is computed by one thread in a fixed order, so the bits do not depend on the thread count.
// The target class is handled apart from the SIMD loops (scalar math from cb_math.h), which keeps
// the vector path free of per-lane class tests and gives the target term without cancellation.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
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

 private:
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
CB_FLATTEN void sigmoid_rows(const CBLossParams& p, int64_t begin, int64_t end) {
  using T = acc_t<scalar_t>;
  using Vec = Vectorized<T>;
  const int64_t C = p.num_classes;
  const T gamma = static_cast<T>(p.gamma);
  const Vec vgamma(gamma);
  const TransformBuffers<T> buffers(p, false);
  const RowTransform<T> tf = buffers.view();
  const bool transformed = kTf && tf.on(), capped = kTf && tf.cap;
  const T scale = load_scale<T>(p) * tf.grad_scale();
  for (int64_t i = begin; i < end; ++i) {
    const scalar_t* z = static_cast<const scalar_t*>(p.logits) + i * p.logits_row_stride;
    scalar_t* g = p.grad ? static_cast<scalar_t*>(p.grad) + i * p.grad_row_stride : nullptr;
    const IndexTarget t = index_target(p, i);
    if (!t.valid) {
      skip_row(p, i, g);
      continue;
    }
    if (p.z_rows != nullptr) static_cast<T*>(p.z_rows)[i] = 0;  // no z-loss for the one-vs-all losses
    const int64_t y = t.column;
    const T zy_raw = static_cast<T>(z[y]);  // read first: in place, the pieces below overwrite it
    const T zy = tf.target_on() ? tf.s.logit(zy_raw, y, true) : zy_raw;
    const T a = t.weight<T>(p);
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
CB_FLATTEN void softmax_rows(const CBLossParams& p, int64_t begin, int64_t end) {
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
  for (int64_t i = begin; i < end; ++i) {
    const scalar_t* z = static_cast<const scalar_t*>(p.logits) + i * p.logits_row_stride;
    scalar_t* g = p.grad ? static_cast<scalar_t*>(p.grad) + i * p.grad_row_stride : nullptr;
    const IndexTarget t = index_target(p, i);
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
    const SoftmaxRowOut<T> out = epilogue(st, t.weight<T>(p));
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

template <typename scalar_t, bool kTf>
void rows_for_kind(const CBLossParams& p, int64_t begin, int64_t end) {
  if (p.loss_type == kSoftmax || p.loss_type == kSoftmaxFocal) return softmax_rows<scalar_t, kTf>(p, begin, end);
  if constexpr (kTf) {
    // With transforms the focal exponents share the general form (one exp more per element, equal within rounding):
    // three more instantiations per dtype and ISA instead of six keep the build (first use, CI) short.
    if (p.loss_type == kSigmoid || gamma_kind(p.gamma) == GammaKind::kZero) {
      return sigmoid_rows<scalar_t, GammaKind::kZero, kTf>(p, begin, end);
    }
    return sigmoid_rows<scalar_t, GammaKind::kGeneral, kTf>(p, begin, end);
  }
  switch (p.loss_type == kSigmoid ? GammaKind::kZero : gamma_kind(p.gamma)) {
    case GammaKind::kZero: return sigmoid_rows<scalar_t, GammaKind::kZero, kTf>(p, begin, end);
    case GammaKind::kHalf: return sigmoid_rows<scalar_t, GammaKind::kHalf, kTf>(p, begin, end);
    case GammaKind::kOne: return sigmoid_rows<scalar_t, GammaKind::kOne, kTf>(p, begin, end);
    case GammaKind::kTwo: return sigmoid_rows<scalar_t, GammaKind::kTwo, kTf>(p, begin, end);
    default: return sigmoid_rows<scalar_t, GammaKind::kGeneral, kTf>(p, begin, end);
  }
}

template <typename scalar_t>
void rows_for_dtype(const CBLossParams& p, int64_t begin, int64_t end) {
  const bool transformed =
      p.softcap != 0.0 || p.logit_offset != nullptr || p.logit_scale != 1.0 || p.target_margin != nullptr;
  return transformed ? rows_for_kind<scalar_t, true>(p, begin, end) : rows_for_kind<scalar_t, false>(p, begin, end);
}

}  // namespace

void cb_loss_rows(const CBLossParams& p, int64_t begin, int64_t end) {
  switch (p.dtype) {
    case Dtype::kDouble: return rows_for_dtype<double>(p, begin, end);
    case Dtype::kHalf: return rows_for_dtype<c10::Half>(p, begin, end);
    case Dtype::kBFloat16: return rows_for_dtype<c10::BFloat16>(p, begin, end);
    default: return rows_for_dtype<float>(p, begin, end);
  }
}

}  // namespace cbkernels::cpu::CPU_CAPABILITY
