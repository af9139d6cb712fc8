// Per-element math of the class-balanced losses (SPEC sections 3-4), shared by every C++ backend.
//
// Torch-free on purpose: the CPU kernels instantiate these templates on SIMD vectors
// (at::vec::Vectorized), the CUDA kernels on plain float/double, and nvcc compiles this header
// without any torch include. A "math policy" M supplies the value type M::V and the handful of
// transcendentals and selects; ScalarMath<T> below is the policy for float and double. The
// transcendentals are only ever asked for exp(x <= 0) and log1p(x in [0, 1]), so a policy may use
// approximations valid on those ranges alone (the CPU SIMD one does).
#pragma once

#include <cfloat>
#include <cmath>

#include "cb_params.h"

namespace cbkernels {

// The focal exponents whose modulator needs no transcendental beyond the shared exp(-|v|).
enum class GammaKind : int { kZero, kHalf, kOne, kTwo, kGeneral };

CB_HOST_DEVICE GammaKind gamma_kind(double gamma) {
  return gamma == 0.0   ? GammaKind::kZero
         : gamma == 0.5 ? GammaKind::kHalf
         : gamma == 1.0 ? GammaKind::kOne
         : gamma == 2.0 ? GammaKind::kTwo
                        : GammaKind::kGeneral;
}

// Explicit float/double overloads so the same call resolves on host and device without std::.
CB_HOST_DEVICE float cb_exp(float x) { return expf(x); }
CB_HOST_DEVICE double cb_exp(double x) { return exp(x); }
CB_HOST_DEVICE float cb_expm1(float x) { return expm1f(x); }
CB_HOST_DEVICE double cb_expm1(double x) { return expm1(x); }
CB_HOST_DEVICE float cb_log(float x) { return logf(x); }
CB_HOST_DEVICE double cb_log(double x) { return log(x); }
CB_HOST_DEVICE float cb_log1p(float x) { return log1pf(x); }
CB_HOST_DEVICE double cb_log1p(double x) { return log1p(x); }
CB_HOST_DEVICE float cb_sqrt(float x) { return sqrtf(x); }
CB_HOST_DEVICE double cb_sqrt(double x) { return sqrt(x); }
CB_HOST_DEVICE float cb_pow(float x, float y) { return powf(x, y); }
CB_HOST_DEVICE double cb_pow(double x, double y) { return pow(x, y); }
CB_HOST_DEVICE float cb_fabs(float x) { return fabsf(x); }
CB_HOST_DEVICE double cb_fabs(double x) { return fabs(x); }
CB_HOST_DEVICE float cb_copysign(float x, float y) { return copysignf(x, y); }
CB_HOST_DEVICE double cb_copysign(double x, double y) { return copysign(x, y); }

template <typename T> struct Limits;
template <> struct Limits<float> {
  static CB_HOST_DEVICE float min_normal() { return FLT_MIN; }
  static CB_HOST_DEVICE float max_finite() { return FLT_MAX; }
};
template <> struct Limits<double> {
  static CB_HOST_DEVICE double min_normal() { return DBL_MIN; }
  static CB_HOST_DEVICE double max_finite() { return DBL_MAX; }
};

template <typename T>
struct ScalarMath {
  using V = T;
  static CB_HOST_DEVICE T exp_nonpos(T x) { return cb_exp(x); }
  static CB_HOST_DEVICE T log1p_unit(T x) { return cb_log1p(x); }
  static CB_HOST_DEVICE T sqrt(T x) { return cb_sqrt(x); }
  static CB_HOST_DEVICE T abs(T x) { return cb_fabs(x); }
  static CB_HOST_DEVICE T recip(T x) { return T(1) / x; }
  static CB_HOST_DEVICE T relu(T x) { return x > T(0) ? x : T(0); }
  static CB_HOST_DEVICE T select_nonneg(T v, T if_nonneg, T if_neg) { return v >= T(0) ? if_nonneg : if_neg; }
};

// Everything a sigmoid-type term needs, from one exp(-|v|). v = s z with s = +1 on the target
// class and -1 elsewhere, so q = sigmoid(v) is the probability of the right answer.
template <class M>
struct SigmoidTerms {
  typename M::V q;    // sigmoid(v)
  typename M::V omq;  // 1 - q = sigmoid(-v), taken from the same exp instead of a difference that cancels
  typename M::V u;    // softplus(-v) = -log q, the binary cross-entropy term
  typename M::V lp;   // log1p(exp(-|v|)), the shared part of softplus(v) and softplus(-v)
};

template <class M>
CB_HOST_DEVICE SigmoidTerms<M> sigmoid_terms(typename M::V v) {
  using V = typename M::V;
  const V e = M::exp_nonpos(V(0) - M::abs(v));  // in (0, 1]: never overflows
  const V d = M::recip(V(1) + e);        // sigmoid(|v|)
  const V ed = e * d;                    // sigmoid(-|v|)
  SigmoidTerms<M> t;
  t.lp = M::log1p_unit(e);
  t.q = M::select_nonneg(v, d, ed);
  t.omq = M::select_nonneg(v, ed, d);
  t.u = M::relu(V(0) - v) + t.lp;
  return t;
}

// (1 - q)^gamma. The general case uses log(1 - q) = -softplus(v) = -(max(v, 0) + lp), which stays
// exact where 1 - q underflows, instead of pow(1 - q, gamma).
template <GammaKind G, class M>
CB_HOST_DEVICE typename M::V focal_modulator(const SigmoidTerms<M>& t, typename M::V v, typename M::V gamma) {
  using V = typename M::V;
  if constexpr (G == GammaKind::kZero) {
    return V(1);
  } else if constexpr (G == GammaKind::kHalf) {
    return M::sqrt(t.omq);
  } else if constexpr (G == GammaKind::kOne) {
    return t.omq;
  } else if constexpr (G == GammaKind::kTwo) {
    return t.omq * t.omq;
  } else {
    return M::exp_nonpos(V(0) - gamma * (M::relu(v) + t.lp));
  }
}

// One sigmoid-focal class term (gamma = 0 is plain sigmoid cross-entropy):
//   loss  = (1-q)^gamma u
//   dloss = (1-q)^gamma [gamma q u + (1-q)]  so that  d loss / d z = -s dloss  (SPEC section 4).
// The bracket form has no (1-q)^(gamma-1) factor, so it stays finite for gamma < 1.
template <GammaKind G, class M>
CB_HOST_DEVICE void focal_term(typename M::V v, typename M::V gamma, typename M::V& loss, typename M::V& dloss) {
  const SigmoidTerms<M> t = sigmoid_terms<M>(v);
  if constexpr (G == GammaKind::kZero) {
    loss = t.u;
    dloss = t.omq;
  } else {
    const typename M::V mod = focal_modulator<G, M>(t, v, gamma);
    loss = mod * t.u;
    dloss = mod * (gamma * t.q * t.u + t.omq);
  }
}

// Row cross-entropy L = lse - z_y from the softmax row sums: e_y = exp(z_y - m) and s_other = sum_{j != y}
// exp(z_j - m) for a shift m, gap = lse - z_y - log(e_y + s_other) (m - z_y, see ExpShift). log1p(s_other / e_y)
// keeps full relative precision when the target dominates (L -> 0), where m + log(sum) - z_y would cancel to 0; once
// e_y is no longer a normal number the direct form is the accurate one (L is then large).
template <typename T>
CB_HOST_DEVICE T softmax_nll(T gap, T ey, T s_other) {
  const T ratio = s_other / ey;
  if (ey >= Limits<T>::min_normal() && ratio <= Limits<T>::max_finite()) return cb_log1p(ratio);
  return gap + cb_log(ey + s_other);
}

template <typename T>
CB_HOST_DEVICE T pow_gamma(T x, T gamma, GammaKind g) {
  switch (g) {
    case GammaKind::kZero: return T(1);
    case GammaKind::kHalf: return cb_sqrt(x);
    case GammaKind::kOne: return x;
    case GammaKind::kTwo: return x * x;
    default: return cb_pow(x, gamma);
  }
}

// Softmax focal, per row: the loss is mod * L and d l / d z_j = coef * (p_j - t_j) with
//   mod = (1-P)^gamma,  coef = (1-P)^gamma (1 + gamma P r),  1-P = -expm1(-L),  r = L / (1-P),
// r -> 1 as 1-P underflows (L -> 0). Finite for every gamma >= 0 (SPEC section 4).
template <typename T>
CB_HOST_DEVICE void softmax_focal_row(T L, T gamma, GammaKind g, T& mod, T& coef) {
  const T omp = -cb_expm1(-L);
  mod = pow_gamma(omp, gamma, g);
  if (g == GammaKind::kZero) {
    coef = T(1);
    return;
  }
  const T r = omp > T(0) ? L / omp : T(1);
  coef = mod * (T(1) + gamma * cb_exp(-L) * r);
}

// The same with the exact (double) gamma for a float row: a gamma that float cannot hold (1.7) rounded to float
// would shift (1-P)^gamma by gamma_lo * ln(1-P) relative, 1e-6 on a confident row (1-P ~ 1e-6). The rounding
// rest gamma_lo = gamma - float(gamma) is put back as the factor (1-P)^gamma_lo = 1 + gamma_lo ln(1-P) (its square
// is below 1e-13): one log per row, no double arithmetic (the CUDA row epilogue has no registers to spare).
template <typename T>
CB_HOST_DEVICE void softmax_focal_row_exact_gamma(T L, double gamma, GammaKind g, T& mod, T& coef) {
  const T gamma_hi = static_cast<T>(gamma);
  softmax_focal_row(L, gamma_hi, g, mod, coef);
  const T gamma_lo = static_cast<T>(gamma - static_cast<double>(gamma_hi));
  if (g == GammaKind::kGeneral && gamma_lo != T(0)) {
    const T omp = -cb_expm1(-L);
    if (omp > T(0)) {
      const T factor = T(1) + gamma_lo * cb_log(omp);
      mod *= factor;
      coef *= factor;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Row epilogue of the softmax losses, shared by the CPU and CUDA kernels.

// A softmax row's statistics, relative to a finite shift m (the row max, see ExpShift).
template <typename T>
struct SoftmaxRowStats {
  T m;           // the shift
  T zy;          // the target logit
  T ey;          // the target's exp relative to the shift
  T s_other;     // the sum of the other classes' exps, same shift
  T dist;        // sum_j (m - z_j); read with label smoothing only
  T log_offset;  // kPow2 only: log(sum_j exp(z_j - m)) - log(ey + s_other)
};

// How a kernel's exps e_j relate to exp(z_j - m), which decides how the epilogue forms L = lse - z_y's direct form
// and lse - m (label smoothing):
// - kExact: e_j = exp(z_j - m) to an ulp (CPU, CUDA float64): L = (m - z_y) + log(sum), lse - m = log(sum).
// - kPow2: e_j = 2^(z_j log2(e) - k) by a hardware approximation (CUDA float, ShiftedExp in cb_loss_cuda_math.cuh): a
//   common factor 2^r that log_offset takes out of log(sum), and 2 ulp each, which log(sum) would carry, absolute, into
//   a smoothing term that is exactly 0 for C = 1: there lse - m = L - (m - z_y) from the accurate L instead.
enum class ExpShift : int { kExact, kPow2 };

// The row's loss a_i l_i (+ its z-loss term z) and its gradient: g_j = k1 e_j - k0 for j != y, g_y at the target.
template <typename T>
struct SoftmaxRowOut {
  T loss;
  T k1;
  T k0;
  T gy;
  T z;  // z_loss * lse^2 (included in loss), 0 without z-loss
};

// The softmax losses' per-row epilogue (SPEC sections 3-4), set up once per call from the params, the focal exponent's
// kind and the gradient scale (load_scale), then applied to each row's statistics and sample weight a:
//   softmax CE:    l = (1 - eps) L + eps (lse - mean_j z_j),  dl/dz_j = p_j - q_j
//   softmax focal: l = (1-P)^gamma L,                         dl/dz_j = c (p_j - t_j)  (softmax_focal_row)
// with L = lse - z_y, lse - mean_j z_j = (lse - m) + mean_j (m - z_j) (every term >= 0: no cancellation), and
// p_y - q_y = eps (1 - 1/C) - (1 - p_y), 1 - p_y = s_other / sum formed without cancellation.
// The z-loss (SPEC section 11) adds z_loss lse^2 to the row, unweighted, and 2 z_loss lse p_j to its gradient: the
// p_j part joins k1 and gy, so the gradient pass is unchanged (and with z_loss = 0 adds exact zeros).
template <ExpShift kShift, typename T>
class SoftmaxEpilogue {
 public:
  CB_HOST_DEVICE SoftmaxEpilogue(const CBLossParams& p, GammaKind gk, T scale)
      : focal_(p.loss_type == kSoftmaxFocal),
        eps_(focal_ ? T(0) : static_cast<T>(p.label_smoothing)),
        num_classes_(static_cast<T>(p.num_classes)),
        scale_(scale),
        z_loss_(static_cast<T>(p.z_loss)),
        gamma_(p.gamma),
        gk_(gk) {}

  // Whether the rows need dist (SoftmaxRowStats).
  CB_HOST_DEVICE bool smoothing() const { return eps_ != T(0); }

  CB_HOST_DEVICE SoftmaxRowOut<T> operator()(const SoftmaxRowStats<T>& st, T a) const {
    const T sum = st.s_other + st.ey;
    const T gap = kShift == ExpShift::kExact ? st.m - st.zy : (st.m - st.zy) + st.log_offset;
    const T nll = softmax_nll(gap, st.ey, st.s_other);
    T row_loss = nll, coef = T(1);
    if (focal_) {
      T mod;
      softmax_focal_row_exact_gamma(nll, gamma_, gk_, mod, coef);
      row_loss = mod * nll;
    } else if (eps_ != T(0)) {
      const T lse_m = kShift == ExpShift::kExact ? cb_log(sum) : nll - (st.m - st.zy);
      row_loss = (T(1) - eps_) * nll + eps_ * (lse_m + st.dist / num_classes_);
    }
    const T k = a * scale_ * coef;
    SoftmaxRowOut<T> out;
    out.loss = a * row_loss;
    out.k1 = k / sum;
    out.k0 = k * eps_ / num_classes_;
    out.gy = k * (eps_ * (T(1) - T(1) / num_classes_) - st.s_other / sum);
    out.z = T(0);
    if (z_loss_ != T(0)) {
      const T lse = st.m + (kShift == ExpShift::kExact ? cb_log(sum) : nll - (st.m - st.zy));
      const T kz = T(2) * z_loss_ * lse * scale_;
      out.z = z_loss_ * lse * lse;
      out.loss += out.z;
      out.k1 = (k + kz) / sum;
      out.gy += kz * (st.ey / sum);
    }
    return out;
  }

 private:
  bool focal_;
  T eps_;  // label smoothing (0 for the focal loss)
  T num_classes_;
  T scale_;
  T z_loss_;
  double gamma_;  // exact: see softmax_focal_row_exact_gamma
  GammaKind gk_;
};

// ---------------------------------------------------------------------------------------------------------
// Logit transforms (SPEC section 10), in SPEC's order: z' = s (c tanh(z / c) + o_j - m_y [j == y]), and the chain
// rule dl/dz = s (1 - tanh(z / c)^2) dl/dz'. Each is off at its identity (c = 0, no vector, s = 1) and then costs a
// predictable branch per call site, no arithmetic: a scale of 1 multiplies exactly, so bits do not change.

// tanh(x) and 1 - tanh(x)^2 without cancellation. With e = exp(-2|x|) in (0, 1]: sech^2 x = 4 e / (1 + e)^2 is
// accurate everywhere (1 - t^2 would be 0 where t rounds to 1, and 1 + expm1(-2|x|) cancels there too), and
// tanh|x| = (1 - e) / (1 + e) once 1 - e >= 0.39 (|x| >= 1/4). Below, tanh is its odd series to x^9 (the next term is
// below 1e-8 relative) in float; double takes -expm1(-2|x|) / (2 + expm1(-2|x|)) (a second transcendental, where
// speed matters less than digits).
template <typename T>
struct Tanh {
  T t;      // tanh(x)
  T sech2;  // 1 - tanh(x)^2
};
template <typename T>
CB_HOST_DEVICE T tanh_small(T x) {  // tanh(x) for |x| < 1/4, float accuracy
  const T x2 = x * x;
  return x + x * x2 * (T(-1.0 / 3) + x2 * (T(2.0 / 15) + x2 * (T(-17.0 / 315) + x2 * T(62.0 / 2835))));
}
template <typename T>
CB_HOST_DEVICE Tanh<T> tanh_sech2(T x) {
  const T ax = cb_fabs(x);
  const T e = cb_exp(T(-2) * ax);
  const T d = T(1) / (T(1) + e);
  Tanh<T> r;
  r.sech2 = T(4) * e * d * d;
  T t_abs;
  if constexpr (sizeof(T) == sizeof(double)) {
    const T em = cb_expm1(T(-2) * ax);
    t_abs = -em / (T(2) + em);
  } else {
    t_abs = ax < T(0.25) ? tanh_small(ax) : (T(1) - e) * d;
  }
  r.t = cb_copysign(t_abs, x);
  return r;
}

// The transforms of one call in the compute type T, scalar form (the CUDA kernels, and the CPU kernels' target
// column; their SIMD loops use the same fields).
template <typename T>
struct LogitTransform {
  const float* offset;  // [C] or nullptr
  const float* margin;  // [C] or nullptr
  T cap;                // softcap c, 0 for none
  T inv_cap;            // 1 / c
  T scale;              // s

  static CB_HOST_DEVICE LogitTransform from(const CBLossParams& p) {
    LogitTransform tf;
    tf.offset = p.logit_offset;
    tf.margin = p.target_margin;
    tf.cap = static_cast<T>(p.softcap);
    tf.inv_cap = p.softcap != 0.0 ? static_cast<T>(1.0 / p.softcap) : T(0);
    tf.scale = static_cast<T>(p.logit_scale);
    return tf;
  }
  CB_HOST_DEVICE bool softcap() const { return cap != T(0); }

  // z' of column col; is_target: the row's target column (the margin applies there only).
  CB_HOST_DEVICE T logit(T z, int64_t col, bool is_target) const {
    T x = z;
    if (cap != T(0)) x = cap * tanh_sech2(z * inv_cap).t;
    if (offset != nullptr) x += static_cast<T>(offset[col]);
    if (is_target && margin != nullptr) x -= static_cast<T>(margin[col]);
    return x * scale;
  }
  // (The chain rule dl/dz = s sech^2(z / c) dl/dz' is each kernel's: the CPU and CUDA rows fold s into their per-row
  // coefficients and keep sech^2 from the logit read, so no shared grad() would serve them.)
};

}  // namespace cbkernels
