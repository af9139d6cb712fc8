// Interface between the CPU binding (cb_loss_cpu.cpp, sees torch) and the row kernels
// (isa/cb_loss_cpu_kernel.cpp, compiled once per instruction set by setup.py): the params struct of
// cb_params.h, torch-free.
#pragma once

#include <cstdint>

#include "cb_params.h"

namespace cbkernels::cpu {

// Computes rows [begin, end). Returns the first row whose target is neither in [0, C) nor
// ignore_index (that row is left as if ignored), or -1 when all targets are good.
using RowsFn = int64_t (*)(const CBLossParams&, int64_t begin, int64_t end);

// One definition per instruction set; the namespace names match ATen's CPU_CAPABILITY values.
namespace DEFAULT { int64_t cb_loss_rows(const CBLossParams&, int64_t, int64_t); }
namespace AVX2 { int64_t cb_loss_rows(const CBLossParams&, int64_t, int64_t); }
namespace AVX512 { int64_t cb_loss_rows(const CBLossParams&, int64_t, int64_t); }

}  // namespace cbkernels::cpu
