// CPU emulation of the few CUDA features the cbkernels kernels use, so that their logic (chunking,
// alignment, reductions, split rows, in place) runs in tests on machines without a GPU.
//
// g++ force-includes this header (-include) before csrc/cuda/*.cu, compiled as C++. Blocks run one after
// another on the calling thread; the CUDA threads of a block are fibers (ucontext) switched at barriers:
// __syncthreads waits for the block, __shfl_xor_sync exchanges through per-thread slots between two warp
// barriers, and a thread that returns drops out of both. A barrier nobody can complete (divergent
// __syncthreads or shuffles, which hang a GPU) aborts with a message. The hardware approximations
// (ex2.approx, MUFU reciprocal) become the exact libm functions, so numbers differ from a GPU's in the last
// bits: these tests check logic, tests/test_cuda_backend.py checks the GPU.
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
inline float __expf(float x) { return expf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline int min(int a, int b) { return std::min(a, b); }
