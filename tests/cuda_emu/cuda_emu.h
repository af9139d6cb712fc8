// CPU emulation of the few CUDA features the cbkernels kernels use, so that their logic (chunking,
// alignment, reductions, split rows, in place) runs in tests on machines without a GPU.
//
// g++ force-includes this header (-include) before csrc/cuda/*.cu, compiled as C++. Blocks run one after
// another on the calling thread; the CUDA threads of a block are fibers (ucontext) switched at barriers:
// __syncthreads waits for the block, __shfl_xor_sync exchanges through per-thread slots between two warp
// barriers, and a thread that returns drops out of both. A barrier nobody can complete (divergent
// __syncthreads or shuffles, which hang a GPU) aborts with a message.
//
// The hardware approximations the kernels call are modelled at their documented worst case (emu:: below), so
// the emulated tests see errors as large as a GPU's may be, not libm's; the float operations around them are
// IEEE on both (nvcc's default -prec-div/-prec-sqrt, no --use_fast_math). What still differs from a GPU: the
// exact bits of each approximation (the hardware's error pattern is not published; the model's magnitude is
// the bound), nvcc's FMA contraction of a * b + c (g++ on x86-64 without -mfma never contracts: the GPU is
// then at most half an ulp per operation more accurate), and CUDA's accurate libm (logf, log1pf, expm1f, powf:
// 1-4 ulp, once per row in the softmax epilogue) against glibc's.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <vector_functions.h>
#include <vector_types.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#undef __shared__
#define __shared__ static  // blocks run one at a time, so one copy per kernel is a block's shared memory
#undef __global__
#define __global__
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

extern uint3 threadIdx;
extern uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;

namespace emu {

// Waits until every live thread of the group (a warp or the block) has arrived.
void warp_barrier();
void block_barrier();
uint64_t* shuffle_slots();

void run_grid(dim3 grid, dim3 block, void (*body)(const void*), const void* ctx);

template <typename Args>
void launch(void (*kernel)(Args), dim3 grid, dim3 block, const Args& args) {
  struct Ctx {
    void (*kernel)(Args);
    const Args* args;
  } ctx{kernel, &args};
  run_grid(grid, block, [](const void* p) {
    const Ctx* c = static_cast<const Ctx*>(p);
    c->kernel(*c->args);
  }, &ctx);
}

}  // namespace emu

#define CB_LAUNCH_KERNEL(grid, block, stream, args, ...) \
  ((void)(stream), ::emu::launch(__VA_ARGS__, dim3(grid), dim3(block), (args)))

inline void __syncthreads() { emu::block_barrier(); }

template <typename T>
T __shfl_xor_sync(unsigned /*mask*/, T v, int lane_mask) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of at most 8 bytes");
  uint64_t* slots = emu::shuffle_slots();
  const unsigned tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  std::memcpy(&slots[tid], &v, sizeof(T));
  emu::warp_barrier();
  T r;
  std::memcpy(&r, &slots[warp * 32 + (lane ^ static_cast<unsigned>(lane_mask))], sizeof(T));
  emu::warp_barrier();
  return r;
}

inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline double __hiloint2double(int hi, int lo) {
  const uint64_t bits = (static_cast<uint64_t>(static_cast<uint32_t>(hi)) << 32) | static_cast<uint32_t>(lo);
  double d;
  std::memcpy(&d, &bits, 8);
  return d;
}
inline int __double2loint(double d) { uint64_t b; std::memcpy(&b, &d, 8); return static_cast<int>(b & 0xffffffffu); }
inline int __double2hiint(double d) { uint64_t b; std::memcpy(&b, &d, 8); return static_cast<int>(b >> 32); }
// ---------------------------------------------------------------------------------------------------------
// Models of the hardware approximations: the correctly rounded result moved by the documented maximum error, in
// a direction taken from a hash of the operands' bits (deterministic, like the hardware: equal inputs, equal
// bits; the sign varies from input to input, so the errors neither cancel in ratios as a common bias would nor
// are smaller than the bound). Sources:
// - PTX ISA, "Floating Point Instructions: ex2": ex2.approx.f32 is within 2 ulp of the correctly rounded 2^a
//   over the full input range; -inf -> +0, +-0 -> 1, +inf -> +inf; .ftz flushes subnormal inputs and results to
//   sign-preserving zero. (Older PTX ISA versions state a 2^-22.5 maximum relative error: about the same.)
// - PTX ISA, "Floating Point Instructions: sqrt": sqrt.approx.f32 has a maximum relative error of 2^-23 over the
//   positive finite range; .ftz flushes subnormal inputs and results.
// - CUDA C++ Programming Guide, "Intrinsic Functions" (single precision), errors in ulp from the correctly
//   rounded result: __expf(x) 2 + floor(abs(1.173 x)); __fdividef(x, y) 2 for |y| in [2^-126, 2^126], and for
//   2^126 < |y| < 2^128 it returns 0 (NaN for an infinite x); crt/device_functions.h says the same.
//   __expf(x) is ex2.approx.f32 (no .ftz: nvcc's default -ftz=false) of the float product x * log2(e): the model
//   runs that algorithm, whose rounded product (up to 2^-24 |x| relative in the result) and float log2(e)
//   (1.3e-8 |x|) make up the 1.173 |x| term, ex2 adding its 2 ulp; where the worst cases of both meet (up to
//   2 ulp past the guide's bound) the result is clamped to the bound.

#define CBKERNELS_CUDA_EMU 1

namespace emu {

inline uint32_t mix_bits(uint32_t h) {  // murmur3's finaliser: every input bit flips each output bit half the time
  h ^= h >> 16;
  h *= 0x85ebca6bu;
  h ^= h >> 13;
  h *= 0xc2b2ae35u;
  return h ^ (h >> 16);
}

inline uint32_t float_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}

inline float flush_subnormal(float x) { return std::fpclassify(x) == FP_SUBNORMAL ? std::copysign(0.0f, x) : x; }

// y moved `ulps` representable floats away from zero or towards it (never across it), as the hash decides.
inline float step_ulps(float y, int ulps, uint32_t key) {
  if (!std::isfinite(y) || y == 0.0f) return y;
  const float target = (mix_bits(key) & 1u) ? std::copysign(INFINITY, y) : std::copysign(0.0f, y);
  for (int i = 0; i < ulps; ++i) {
    const float next = std::nextafter(y, target);
    if (next == 0.0f || !std::isfinite(next)) break;
    y = next;
  }
  return y;
}

// ex2.approx.f32 (ftz: ex2.approx.ftz.f32).
inline float ex2_approx(float x, bool ftz) {
  if (ftz) x = flush_subnormal(x);
  if (std::isnan(x) || std::isinf(x) || x == 0.0f) return std::exp2(x);  // NaN, +0 / +inf, exactly 1
  const float y = step_ulps(static_cast<float>(std::exp2(static_cast<double>(x))), 2, float_bits(x));
  return ftz ? flush_subnormal(y) : y;
}
inline float ex2_approx_ftz(float x) { return ex2_approx(x, true); }

// sqrt.approx.ftz.f32: the exact root scaled by 1 +- 2^-24, then rounded (another 2^-24 at most): 2^-23 in all.
inline float sqrt_approx_ftz(float x) {
  x = flush_subnormal(x);
  if (!(x > 0.0f) || std::isinf(x)) return std::sqrt(x);  // +-0, +inf, NaN for x < 0 and NaN
  const double rel = (mix_bits(float_bits(x)) & 1u) ? 0x1p-24 : -0x1p-24;
  return flush_subnormal(static_cast<float>(std::sqrt(static_cast<double>(x)) * (1.0 + rel)));
}

inline float fast_expf(float x) {
  const float t = x * 1.4426950408889634f;  // one float rounding, as the intrinsic's FMUL
  const float y = ex2_approx(t, false);
  const float cr = static_cast<float>(std::exp(static_cast<double>(x)));
  if (!std::isfinite(y) || !(cr > 0.0f) || !std::isfinite(cr)) return y;
  // Positive floats are ordered as their bit patterns: the difference of the patterns is the ulp distance.
  const int64_t bound = 2 + static_cast<int64_t>(std::floor(std::fabs(1.173 * static_cast<double>(x))));
  const int64_t cr_bits = float_bits(cr);
  const int64_t off = std::clamp<int64_t>(static_cast<int64_t>(float_bits(y)) - cr_bits, -std::min(bound, cr_bits),
                                          bound);
  const uint32_t out = static_cast<uint32_t>(cr_bits + off);
  float r;
  std::memcpy(&r, &out, 4);
  return r;
}

inline float fast_fdividef(float x, float y) {
  const float ay = std::fabs(y);
  if (ay > 0x1p126f && ay < INFINITY) return std::isinf(x) ? NAN : std::copysign(0.0f, x) * std::copysign(1.0f, y);
  const float q = static_cast<float>(static_cast<double>(x) / static_cast<double>(y));
  return step_ulps(q, 2, float_bits(x) ^ mix_bits(float_bits(y)));
}

}  // namespace emu

inline float __expf(float x) { return emu::fast_expf(x); }
inline float __fdividef(float a, float b) { return emu::fast_fdividef(a, b); }
inline int min(int a, int b) { return std::min(a, b); }
