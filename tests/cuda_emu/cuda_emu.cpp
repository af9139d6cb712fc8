// Runtime of the CPU emulation (see cuda_emu.h) and a C entry point for tests/test_cuda_emulated.py (ctypes).
#include "cuda_emu.h"

#include "cuda/cb_loss_cuda.h"

#include <cstdio>
#include <cstdlib>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

uint3 threadIdx;
uint3 blockIdx;
dim3 blockDim;
dim3 gridDim;

namespace emu {
namespace {

constexpr size_t kStackBytes = 256 * 1024;

#if defined(__x86_64__)
// A context switch without ucontext's signal-mask system calls: the barriers switch fibers a few hundred
// thousand times per test. Saves the callee-saved registers, MXCSR and the x87 control word on the old
// stack, stores its pointer in *from and resumes the stack `to`.
extern "C" void cbk_emu_switch(void** from, void* to);
asm(R"(
    .text
    .globl cbk_emu_switch
    .type cbk_emu_switch, @function
cbk_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size cbk_emu_switch, .-cbk_emu_switch
)");

struct Context {
  void* sp = nullptr;
};

void switch_to(Context& from, Context& to) { cbk_emu_switch(&from.sp, to.sp); }

// A fresh stack that "returns" into entry with the ABI's alignment, registers zero, current MXCSR / x87 control.
void start_context(Context& c, char* stack, size_t bytes, void (*entry)()) {
  auto top = reinterpret_cast<uintptr_t>(stack + bytes) & ~uintptr_t{15};
  auto* words = reinterpret_cast<uint64_t*>(top);
  words[-1] = 0;                                    // where entry's return address would be: never used
  words[-2] = reinterpret_cast<uint64_t>(entry);    // popped by ret
  for (int i = 3; i <= 8; ++i) words[-i] = 0;       // rbp rbx r12 r13 r14 r15
  uint32_t control[2];
  asm volatile("stmxcsr %0" : "=m"(control[0]));
  asm volatile("fnstcw %0" : "=m"(control[1]));
  std::memcpy(&words[-9], control, 8);
  c.sp = &words[-9];
}
#else
struct Context {
  ucontext_t uc;
};

void switch_to(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }

void start_context(Context& c, char* stack, size_t bytes, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
#endif

struct Group {
  unsigned expected = 0;
  unsigned arrived = 0;
  uint64_t generation = 0;
};

struct Fiber {
  Context context;
  std::unique_ptr<char[]> stack;
  bool done = false;
  Group* waiting = nullptr;
  uint64_t wait_generation = 0;
};

struct Block {
  std::vector<Fiber> fibers;
  std::vector<Group> warps;
  Group block;
  std::vector<uint64_t> slots;
  Context scheduler;
  unsigned current = 0;
  void (*body)(const void*) = nullptr;
  const void* ctx = nullptr;
};

Block g_block;

void release(Group& g) {
  g.arrived = 0;
  ++g.generation;
}

void arrive(Group& g) {
  Fiber& f = g_block.fibers[g_block.current];
  if (++g.arrived == g.expected) {
    release(g);
    return;
  }
  f.waiting = &g;
  f.wait_generation = g.generation;
  switch_to(f.context, g_block.scheduler);
}

void drop(Group& g) {
  --g.expected;
  if (g.arrived > 0 && g.arrived == g.expected) release(g);
}

// Runs one CUDA thread, then hands back to the scheduler for good (the fiber is never resumed).
void fiber_main() {
  g_block.body(g_block.ctx);
  const unsigned t = g_block.current;
  g_block.fibers[t].done = true;
  drop(g_block.warps[t / 32]);
  drop(g_block.block);
  switch_to(g_block.fibers[t].context, g_block.scheduler);
  std::abort();
}

}  // namespace

void warp_barrier() { arrive(g_block.warps[threadIdx.x / 32]); }
void block_barrier() { arrive(g_block.block); }
uint64_t* shuffle_slots() { return g_block.slots.data(); }

void run_grid(dim3 grid, dim3 block, void (*body)(const void*), const void* ctx) {
  Block& b = g_block;
  b.body = body;
  b.ctx = ctx;
  if (b.fibers.size() < block.x) b.fibers.resize(block.x);
  b.slots.assign(block.x, 0);
  blockDim = block;
  gridDim = grid;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = make_uint3(x, y, z);
        b.block = Group{block.x};
        b.warps.assign((block.x + 31) / 32, Group{});
        for (unsigned w = 0; w < b.warps.size(); ++w) b.warps[w].expected = std::min(32u, block.x - 32 * w);
        for (unsigned t = 0; t < block.x; ++t) {
          Fiber& f = b.fibers[t];
          if (!f.stack) f.stack.reset(new char[kStackBytes]);
          f.done = false;
          f.waiting = nullptr;
          start_context(f.context, f.stack.get(), kStackBytes, fiber_main);
        }
        unsigned live = block.x;
        while (live > 0) {
          bool progress = false;
          for (unsigned t = 0; t < block.x; ++t) {
            Fiber& f = b.fibers[t];
            if (f.done || (f.waiting != nullptr && f.waiting->generation == f.wait_generation)) continue;
            f.waiting = nullptr;
            b.current = t;
            threadIdx = make_uint3(t, 0, 0);
            switch_to(b.scheduler, f.context);
            progress = true;
            if (f.done) --live;
          }
          if (!progress) {
            std::fprintf(stderr, "cuda_emu: deadlock in block (%u, %u, %u): a barrier or shuffle is not reached "
                         "by every live thread\n", x, y, z);
            std::abort();
          }
        }
      }
    }
  }
}

}  // namespace emu

extern "C" cudaError_t CUDARTAPI cudaGetLastError(void) { return cudaSuccess; }

using cbkernels::gpu::CBLossCudaParams;

// The params struct is filled from Python through a ctypes mirror of its fields, read from the C++ headers
// (tests/cuda_emu/__init__.py); its size here checks that mirror.
extern "C" size_t cbk_emu_params_size() { return sizeof(CBLossCudaParams); }

// plan_out: path, threads_per_row, block_threads, grid_rows, splits, chunks_per_split, workspace bytes.
extern "C" int cbk_emu_plan(const CBLossCudaParams* p, int64_t* plan_out) {
  cbkernels::gpu::CBLossCudaPlan plan;
  const cudaError_t err = cbkernels::gpu::cb_loss_cuda_plan(*p, &plan);
  if (err != cudaSuccess) return static_cast<int>(err);
  const int64_t out[7] = {static_cast<int64_t>(plan.path), plan.threads_per_row, plan.block_threads, plan.grid_rows,
                          plan.splits, plan.chunks_per_split,
                          static_cast<int64_t>(cbkernels::gpu::cb_loss_cuda_workspace_bytes(*p))};
  std::copy(out, out + 7, plan_out);
  return 0;
}

extern "C" int cbk_emu_launch(const CBLossCudaParams* p) {
  return static_cast<int>(cbkernels::gpu::cb_loss_cuda_launch(*p, nullptr));
}
