// Interface between the CPU binding (cb_loss_cpu.cpp, sees torch) and the row kernels
// (isa/cb_loss_cpu_kernel.cpp, compiled once per instruction set by setup.py): the params struct of
// cb_params.h, torch-free.
#pragma once

#include <cstdint>

#include "cb_params.h"

namespace cbkernels::cpu {

// Computes rows [begin, end) and returns -1, or (dense targets) the first row there whose target holds a bad value
// (NaN, negative, infinite, or above 1 for the sigmoid losses): the binding raises, and rows from it on are not
// computed. Index targets are all in [0, C) or ignore_index: the binding checked them first.
using RowsFn = int64_t (*)(const CBLossParams&, int64_t begin, int64_t end);
// The row kernels' scan alone over dense-target rows [begin, end): writes each row's sample weight a_i to
// sample_weights[i] (when given; as the row kernels compute it) and returns the first row with a bad value, or -1.
using DenseScanFn = int64_t (*)(const CBLossParams&, int64_t begin, int64_t end, double* sample_weights);

// One definition each per instruction set; the namespace names match ATen's CPU_CAPABILITY values.
namespace DEFAULT {
int64_t cb_loss_rows(const CBLossParams&, int64_t, int64_t);
int64_t scan_dense_rows(const CBLossParams&, int64_t, int64_t, double*);
}  // namespace DEFAULT
namespace AVX2 {
int64_t cb_loss_rows(const CBLossParams&, int64_t, int64_t);
int64_t scan_dense_rows(const CBLossParams&, int64_t, int64_t, double*);
}  // namespace AVX2
namespace AVX512 {
int64_t cb_loss_rows(const CBLossParams&, int64_t, int64_t);
int64_t scan_dense_rows(const CBLossParams&, int64_t, int64_t, double*);
}  // namespace AVX512

}  // namespace cbkernels::cpu
