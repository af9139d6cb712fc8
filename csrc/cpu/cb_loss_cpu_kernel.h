// Interface between the CPU binding (cb_loss_cpu.cpp, sees torch) and the row kernels
// (isa/cb_loss_cpu_kernel.cpp, compiled once per instruction set by setup.py): the params struct of
// cb_params.h, torch-free.
#pragma once

#include <cstdint>

#include "cb_params.h"

namespace cbkernels::cpu {

// Computes rows [begin, end). Every target is in [0, C) or ignore_index: the binding checked them first.
using RowsFn = void (*)(const CBLossParams&, int64_t begin, int64_t end);

// One definition per instruction set; the namespace names match ATen's CPU_CAPABILITY values.
namespace DEFAULT { void cb_loss_rows(const CBLossParams&, int64_t, int64_t); }
namespace AVX2 { void cb_loss_rows(const CBLossParams&, int64_t, int64_t); }
namespace AVX512 { void cb_loss_rows(const CBLossParams&, int64_t, int64_t); }

}  // namespace cbkernels::cpu
