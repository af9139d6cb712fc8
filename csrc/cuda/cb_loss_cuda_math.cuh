// Device-only helpers of the CUDA kernels: storage types, the fast math policy that instantiates
// cb_math.h's per-element templates in float, and the exps of the softmax statistics. Torch-free.
//
// The hot loops call hardware approximations explicitly (ex2.approx, rcp via __fdividef, sqrt.approx),
// so their cost and accuracy do not depend on whether the build passes --use_fast_math.
//
// The host branches below serve only the CPU emulation of the kernels (tests/cuda_emu, which defines
// CBKERNELS_CUDA_EMU and models each approximation's documented error); nvcc's host pass parses them too.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>

#include "../cb_math.h"

namespace cbkernels::gpu {

#define CB_DEVICE __device__ __forceinline__

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

CB_DEVICE float ex2_approx(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#elif defined(CBKERNELS_CUDA_EMU)
  return ::emu::ex2_approx_ftz(x);
#else
  return exp2f(x);
#endif
}

CB_DEVICE float sqrt_approx(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("sqrt.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#elif defined(CBKERNELS_CUDA_EMU)
  return ::emu::sqrt_approx_ftz(x);
#else
  return sqrtf(x);
#endif
}

// s * 2^d for an integer-valued d <= 0, exact unless the product is subnormal: two multiplications by powers of
// two built from their exponent bits (2^d alone is not a float below 2^-149; a sum below 2^-252 s is 0 anyway).
CB_DEVICE float scale_pow2(float s, float d) {
  const int n = static_cast<int>(fmaxf(d, -252.0f));
  const int n1 = n > -126 ? n : -126;
  return s * __uint_as_float(static_cast<unsigned>(127 + n1) << 23) *
         __uint_as_float(static_cast<unsigned>(127 + n - n1) << 23);
}

// log1p(x) for x in [0, 1], the only range sigmoid_terms needs (x = exp(-|v|)): x P(x) with P a degree-8
// minimax fit of log1p(x) / x, within 4 ulp everywhere, tiny x included (where log(1 + x) from the hardware
// lg2, absolute error ~2^-22, would lose most digits). Nine FMA-pipe instructions and no MUFU op: the sigmoid
// losses on 16-bit logits are near the MUFU throughput limit already.
CB_DEVICE float log1p_unit(float x) {
  float p = 0.005232635885f;
  p = fmaf(p, x, -0.029504921287f);
  p = fmaf(p, x, 0.078225269913f);
  p = fmaf(p, x, -0.136631712317f);
  p = fmaf(p, x, 0.191059619188f);
  p = fmaf(p, x, -0.248429670929f);
  p = fmaf(p, x, 0.333190947771f);
  p = fmaf(p, x, -0.499994933605f);
  p = fmaf(p, x, 0.999999940395f);
  return x * p;
}

// cb_math.h math policy for float on the GPU: one MUFU op per transcendental (the policy contract asks for
// exp on x <= 0 and log1p on [0, 1] only).
struct FastMathF32 {
  using V = float;
  static CB_DEVICE float exp_nonpos(float x) { return __expf(x); }
  static CB_DEVICE float log1p_unit(float x) { return gpu::log1p_unit(x); }
  static CB_DEVICE float sqrt(float x) { return sqrt_approx(x); }
  static CB_DEVICE float abs(float x) { return fabsf(x); }
  static CB_DEVICE float recip(float x) { return __fdividef(1.0f, x); }
  static CB_DEVICE float relu(float x) { return x > 0.0f ? x : 0.0f; }
  static CB_DEVICE float select_nonneg(float v, float if_nonneg, float if_neg) { return v >= 0.0f ? if_nonneg : if_neg; }
};

// 1 / y for y in [1, 2] to within an ulp, with no division (IEEE division's slow path is a call, whose ABI spills
// registers in the kernels' loops): __fdividef's reciprocal (2 ulp), then Newton steps y r -> 1 that each square the
// relative error, one for float, two for double (2^-22, 2^-44, then below double's rounding).
CB_DEVICE float recip_unit(float y) {
  const float r = __fdividef(1.0f, y);
  return fmaf(r, fmaf(-y, r, 1.0f), r);
}
CB_DEVICE double recip_unit(double y) {
  double r = static_cast<double>(__fdividef(1.0f, static_cast<float>(y)));
  r = ::fma(r, ::fma(-y, r, 1.0), r);
  return ::fma(r, ::fma(-y, r, 1.0), r);
}

// cb_math.h's tanh_sech2 (the softcap's tanh(x) and 1 - tanh(x)^2 without cancellation, from e = exp(-2|x|)) with
// that reciprocal of 1 + e, in [1, 2], for its IEEE division (whose slow path is a call: spills).
template <typename A>
CB_DEVICE Tanh<A> tanh_sech2_gpu(A x) {
  const A ax = cb_fabs(x);
  const A e = cb_exp(A(-2) * ax);
  const A d = recip_unit(A(1) + e);
  Tanh<A> r;
  r.sech2 = A(4) * e * d * d;
  A t_abs;
  if constexpr (sizeof(A) == sizeof(double)) {
    const A em = cb_expm1(A(-2) * ax);
    t_abs = -em * recip_unit(A(2) + em);
  } else {
    t_abs = ax < A(0.25) ? tanh_small(ax) : (A(1) - e) * d;
  }
  r.t = cb_copysign(t_abs, x);
  return r;
}

// Softmax focal terms of one column with a dense target (SPEC section 9) at L = lse - z_j >= 0: mod = (1-P)^gamma and
// coef = (1-P)^gamma (1 + gamma P r) with 1-P = -expm1(-L), P = exp(-L), r = L / (1-P) (1 where 1-P underflows), as
// cb_math.h's softmax_focal_row; but once per column rather than per row, so the general power is exp(gamma log(1-P))
// (pow's extra-precise logarithm made the kernels that inline it several times longer to build; the log, accurate to
// an ulp, moves (1-P)^gamma by about gamma |log(1-P)| ulp: 1e-6 relative at 1-P = 1e-9, gamma 2). gamma = gamma_hi +
// gamma_lo: the float rounding rest of a double gamma (see softmax_focal_row_exact_gamma), in the exponent.
template <typename A>
CB_DEVICE void dense_focal_column(A L, A gamma_hi, A gamma_lo, GammaKind gk, A& mod, A& coef) {
  if (gk == GammaKind::kZero) {
    mod = A(1);
    coef = A(1);
    return;
  }
  const A omp = -cb_expm1(-L);
  switch (gk) {
    case GammaKind::kHalf: mod = cb_sqrt(omp); break;
    case GammaKind::kOne: mod = omp; break;
    case GammaKind::kTwo: mod = omp * omp; break;
    default: {
      const A lg = cb_log(omp);
      mod = omp > A(0) ? cb_exp(gamma_hi * lg + gamma_lo * lg) : A(0);  // not -inf + inf (gamma_lo < 0)
    }
  }
  const A r = omp > A(0) ? L / omp : A(1);
  coef = mod * (A(1) + (gamma_hi + gamma_lo) * cb_exp(-L) * r);
}

template <typename A> struct ElemMath;
template <> struct ElemMath<float> { using type = FastMathF32; };
template <> struct ElemMath<double> { using type = ScalarMath<double>; };  // float64 stays exact: no approximations

// One sigmoid-type class term with a probability target q in [0, 1] (SPEC section 9, the torchvision / mmdet focal
// form), from the one exp(-|z|) of cb_math.h's sigmoid_terms. With (a, b) = (1 - q, q) for z >= 0 and (q, 1 - q) for
// z < 0, e = exp(-|z|) and d = sigmoid(|z|), every quantity is a sum of non-negative terms (no cancellation):
//   ce = softplus(z) - q z = a |z| + log1p(e),   1 - pt = d (a + b e),   sigmoid(z) - q = sign(z) (a - e d),
//   loss = (1-pt)^gamma ce,   d loss / d z = sign(z) (1-pt)^gamma [gamma (a - b) ratio ce + (a - e d)],
// ratio = sigmoid(z) sigmoid(-z) / (1-pt) = e d / (a + b e): d where a = 0 (a 0/1 target, where the terms are
// focal_term's). The general exponent takes log(1-pt) = log(a + b e) - log1p(e), or -|z| - log1p(e) where a = 0 (exact
// where a + b e underflows, as focal_modulator); log is the accurate one (a + b e near 1 is where it matters).
template <class M>
CB_DEVICE void dense_sigmoid_term(typename M::V z, typename M::V q, typename M::V gamma, GammaKind gk,
                                  typename M::V& loss, typename M::V& dloss) {
  using V = typename M::V;
  const V az = M::abs(z);
  const V e = M::exp_nonpos(V(0) - az);
  const V d = M::recip(V(1) + e);
  const V ed = e * d;
  const V lp = M::log1p_unit(e);
  const bool pos = z >= V(0);
  const V a = pos ? V(1) - q : q;
  const V b = pos ? q : V(1) - q;
  // a = 0 drops |z| (a masked -inf logit with q = 0 adds 0, as with an index target, not 0 * inf).
  const V ce = (a != V(0) ? a * az : V(0)) + lp;
  const V dce = a - ed;
  if (gk == GammaKind::kZero) {
    loss = ce;
    dloss = pos ? dce : -dce;
    return;
  }
  const V u = a + b * e;
  const V omp = d * u;
  V mod;
  switch (gk) {
    case GammaKind::kHalf: mod = M::sqrt(omp); break;
    case GammaKind::kOne: mod = omp; break;
    case GammaKind::kTwo: mod = omp * omp; break;
    default: mod = M::exp_nonpos(gamma * ((a > V(0) ? cb_log(u) : V(0) - az) - lp)); break;
  }
  const V ratio = a > V(0) ? ed * M::recip(u) : d;
  const V bracket = gamma * (a - b) * ratio * ce + dce;
  loss = mod * ce;
  dloss = pos ? mod * bracket : -(mod * bracket);
}

// The exps of a row relative to its (running) max m, and the rescaling of a sum of them from one max to another.
//
// float: e = 2^(x log2(e) - k) with the integer k = rint(m log2(e)), one FFMA and one ex2 per element. Two sums
// taken under maxima m1 <= m2 differ by exactly 2^(k(m1) - k(m2)), an exponent shift (rescale), so partial sums
// of tiles, threads and splits combine with no rounding whatever their maxima; k is monotonic in m, so a rescale
// never grows a sum. The max element's e is 2^r, r = m log2(e) - k, |r| <= 1/2 + 2^-24 |m log2(e)| (rint, then
// the rounding of m log2(e)): below 0.6 for |m| < 2^20, so every e <= 2^0.6 and sum <= 1.6 C, no overflow. The
// shift is k ln 2 rather than m: a common factor 2^r that cancels in p = e / sum and s_other / e_y, and that
// log_offset takes out of log(sum). double: exp(x - m), exact to the last bit, no offset.
template <typename A> struct ShiftedExp;
template <> struct ShiftedExp<float> {
  static constexpr ExpShift kShift = ExpShift::kPow2;
  float neg_k;
  static CB_DEVICE float shift(float m) { return rintf(m * kLog2e); }
  CB_DEVICE explicit ShiftedExp(float m) : neg_k(-shift(m)) {}
  CB_DEVICE float operator()(float x) const { return ex2_approx(fmaf(x, kLog2e, neg_k)); }
  // log(sum_j exp(z_j - m)) - log(sum_j e_j) = -r ln 2, r rounded once by the same FMA as in operator().
  CB_DEVICE float log_offset(float m) const { return -fmaf(m, kLog2e, neg_k) * kLn2; }
  static CB_DEVICE float rescale(float s, float m_from, float m_to) {
    return scale_pow2(s, shift(m_from) - shift(m_to));
  }
};
template <> struct ShiftedExp<double> {
  static constexpr ExpShift kShift = ExpShift::kExact;
  double m;
  CB_DEVICE explicit ShiftedExp(double m_) : m(m_) {}
  CB_DEVICE double operator()(double x) const { return ::exp(x - m); }
  CB_DEVICE double log_offset(double) const { return 0.0; }
  static CB_DEVICE double rescale(double s, double m_from, double m_to) { return s * ::exp(m_from - m_to); }
};

// A max of -inf (no finite logit yet) would make exp(x - m) a NaN for -inf logits: shift by 0 instead.
template <typename A> CB_DEVICE A finite_or_zero(A m) { return m == -static_cast<A>(INFINITY) ? A(0) : m; }

template <typename To, typename From> CB_DEVICE To bit_cast(const From& v) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast needs equal sizes");
  To out;
  memcpy(static_cast<void*>(&out), &v, sizeof(To));
  return out;
}

// Storage type T of the logits and gradient: its compute type Acc, the elements per 16-byte chunk, and the
// conversions of a chunk (raw uint4) to and from Acc. The gradient is rounded to T once, from Acc.
template <typename T> struct Storage;

template <> struct Storage<float> {
  using Acc = float;
  static constexpr int kVec = 4;
  static CB_DEVICE void unpack(const uint4& r, float (&x)[4]) {
    x[0] = __uint_as_float(r.x);
    x[1] = __uint_as_float(r.y);
    x[2] = __uint_as_float(r.z);
    x[3] = __uint_as_float(r.w);
  }
  static CB_DEVICE uint4 pack(const float (&g)[4]) {
    return make_uint4(__float_as_uint(g[0]), __float_as_uint(g[1]), __float_as_uint(g[2]), __float_as_uint(g[3]));
  }
  static CB_DEVICE void store(float* p, float v) { *p = v; }
};

template <> struct Storage<double> {
  using Acc = double;
  static constexpr int kVec = 2;
  static CB_DEVICE void unpack(const uint4& r, double (&x)[2]) {
    x[0] = __hiloint2double(static_cast<int>(r.y), static_cast<int>(r.x));
    x[1] = __hiloint2double(static_cast<int>(r.w), static_cast<int>(r.z));
  }
  static CB_DEVICE uint4 pack(const double (&g)[2]) {
    return make_uint4(static_cast<unsigned>(__double2loint(g[0])), static_cast<unsigned>(__double2hiint(g[0])),
                      static_cast<unsigned>(__double2loint(g[1])), static_cast<unsigned>(__double2hiint(g[1])));
  }
  static CB_DEVICE void store(double* p, double v) { *p = v; }
};

template <> struct Storage<__nv_bfloat16> {
  using Acc = float;
  static constexpr int kVec = 8;
  // A bfloat16 is the high half of a float: widening is a shift or a mask.
  static CB_DEVICE void unpack(const uint4& r, float (&x)[8]) {
    const unsigned w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      x[2 * i] = __uint_as_float(w[i] << 16);
      x[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
  static CB_DEVICE uint4 pack(const float (&g)[8]) {
    unsigned w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = bit_cast<unsigned>(__floats2bfloat162_rn(g[2 * i], g[2 * i + 1]));
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
  static CB_DEVICE void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
};

template <> struct Storage<__half> {
  using Acc = float;
  static constexpr int kVec = 8;
  static CB_DEVICE void unpack(const uint4& r, float (&x)[8]) {
    const unsigned w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __half22float2(bit_cast<__half2>(w[i]));
      x[2 * i] = f.x;
      x[2 * i + 1] = f.y;
    }
  }
  static CB_DEVICE uint4 pack(const float (&g)[8]) {
    unsigned w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = bit_cast<unsigned>(__floats2half2_rn(g[2 * i], g[2 * i + 1]));
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
  static CB_DEVICE void store(__half* p, float v) { *p = __float2half_rn(v); }
};

}  // namespace cbkernels::gpu
