// The one place tensors become a CBLossParams (cb_params.h), shared by the CPU and the CUDA binding (the only two
// files that include it). The kernels are registered boxed: they read the op's arguments from the dispatcher's
// stack by name, so the schemas are written once, in Python (cbkernels/_opdefs.py), and a new option costs C++ a
// params field and its line in set_params, never a signature.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <ATen/ops/empty.h>
#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "cb_params.h"

namespace cbkernels {

// An argument name, hashed at compile time (the bindings name arguments with literals only).
struct ArgName {
  std::string_view text;
  uint64_t hash;
  consteval ArgName(const char* name) : text(name), hash(fnv1a(text)) {}

  static constexpr uint64_t fnv1a(std::string_view s) {
    uint64_t h = 14695981039346656037ull;
    for (const char c : s) h = (h ^ static_cast<unsigned char>(c)) * 1099511628211ull;
    return h;
  }
};

// An op's argument names from its schema, hashed once into a small open table (no two names in one slot): its boxed
// kernel keeps one in a static, so that reading an argument by name is a table load and one comparison.
class ArgTable {
 public:
  explicit ArgTable(const c10::OperatorHandle& op) : schema_(&op.schema()) {
    const std::vector<c10::Argument>& args = schema_->arguments();
    for (size_t size = 16;; size *= 2) {
      TORCH_INTERNAL_ASSERT(size <= 4096, schema_->name(), ": argument names collide in every table size");
      slots_.assign(size, -1);
      mask_ = size - 1;
      bool collision = false;
      hashes_.clear();
      for (size_t i = 0; i < args.size() && !collision; ++i) {
        hashes_.push_back(ArgName::fnv1a(args[i].name()));
        int& slot = slots_[hashes_[i] & mask_];
        collision = slot >= 0;
        slot = static_cast<int>(i);
      }
      if (!collision) break;
    }
  }
  const c10::FunctionSchema& schema() const { return *schema_; }
  size_t size() const { return schema_->arguments().size(); }
  C10_ALWAYS_INLINE size_t index(const ArgName& name) const {
    const int i = slots_[name.hash & mask_];
    TORCH_INTERNAL_ASSERT(i >= 0 && hashes_[i] == name.hash, schema_->name(), " has no argument named ", name.text);
    return static_cast<size_t>(i);
  }

 private:
  const c10::FunctionSchema* schema_;
  std::vector<uint64_t> hashes_;  // of each argument's name (a 64-bit hash identifies a name)
  std::vector<int> slots_;        // argument index by hash & mask_, -1 for none
  uint64_t mask_ = 0;
};

// The arguments of one boxed call, by name (the schema's names: cbkernels/_opdefs.py).
class OpArgs {
 public:
  OpArgs(const ArgTable& table, const c10::OperatorHandle& op, torch::jit::Stack* stack)
      : table_(table), stack_(stack), num_args_(table.size()) {
    TORCH_INTERNAL_ASSERT(&op.schema() == &table.schema(), "an ArgTable serves the one op it was made for");
  }

  C10_ALWAYS_INLINE const c10::IValue& operator[](const ArgName& name) const {
    return (*stack_)[stack_->size() - num_args_ + table_.index(name)];
  }
  C10_ALWAYS_INLINE const at::Tensor& tensor(const ArgName& name) const { return (*this)[name].toTensor(); }
  C10_ALWAYS_INLINE double to_double(const ArgName& name) const { return (*this)[name].toDouble(); }
  C10_ALWAYS_INLINE int64_t to_int(const ArgName& name) const { return (*this)[name].toInt(); }
  C10_ALWAYS_INLINE bool to_bool(const ArgName& name) const { return (*this)[name].toBool(); }
  const std::string& op_name() const { return table_.schema().name(); }

  // Replaces the arguments on the stack by the op's results (the boxed calling convention).
  template <class... Results>
  void set_results(Results&&... results) {
    torch::jit::drop(*stack_, num_args_);
    torch::jit::push(*stack_, std::forward<Results>(results)...);
  }

 private:
  const ArgTable& table_;
  torch::jit::Stack* stack_;
  size_t num_args_;
};

inline Dtype to_dtype(const OpArgs& args, at::ScalarType t) {
  switch (t) {
    case at::kFloat: return Dtype::kFloat;
    case at::kHalf: return Dtype::kHalf;
    case at::kBFloat16: return Dtype::kBFloat16;
    case at::kDouble: return Dtype::kDouble;
    default: TORCH_CHECK(false, args.op_name(), ": logits must be float32, float16, bfloat16 or float64, got ", t);
  }
}

// The reduction argument's code (cb_params.h's Reduction; the strings of cbkernels/_opdefs.py's REDUCTIONS).
inline int reduction_code(const OpArgs& args) {
  const std::string& r = args["reduction"].toStringRef();
  if (r == "none") return kNone;
  if (r == "mean") return kMean;
  if (r == "sum") return kSum;
  if (r == "weighted_mean") return kWeightedMean;
  TORCH_CHECK(false, args.op_name(), ": reduction must be one of none, mean, sum, weighted_mean, got '", r, "'");
}

// The op's input contract, for the kernel of `device`. The public API validates first (cbkernels/_validation.py):
// these checks guard direct calls of the ops and everything the kernels rely on.
inline void check_inputs(const OpArgs& args, c10::DeviceType device) {
  const std::string& op = args.op_name();
  const at::Tensor& logits = args.tensor("logits");
  const at::Tensor& target = args.tensor("target");
  const at::Tensor& weight = args.tensor("weight");
  TORCH_CHECK(logits.device().type() == device, op, " (", device, " kernel): logits must be on ", device, ", got ",
              logits.device());
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be [N, C], got ", logits.sizes());
  TORCH_CHECK(logits.size(1) >= 1, op, ": logits need C >= 1 classes");
  (void)to_dtype(args, logits.scalar_type());
  if (at::isFloatingType(target.scalar_type())) {  // dense targets (SPEC section 9)
    TORCH_CHECK(target.sizes() == logits.sizes(), op, ": a floating target must have the logits' shape [N, C] = ",
                logits.sizes(), ", got ", target.sizes());
    (void)to_dtype(args, target.scalar_type());
  } else {
    TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0), op, ": target must be [N] = [",
                logits.size(0), "], got ", target.sizes());
    TORCH_CHECK(target.scalar_type() == at::kLong || target.scalar_type() == at::kInt, op,
                ": target must be int64 or int32 class indices, or floating [N, C], got ", target.scalar_type());
  }
  const int64_t weight_mode = args.to_int("weight_mode");
  TORCH_CHECK(weight_mode == kWeightSample || weight_mode == kWeightClass, op, ": unknown weight_mode ", weight_mode);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == logits.size(1) && weight.scalar_type() == at::kFloat, op,
              ": weight must be float32 [C] = [", logits.size(1), "], got ", weight.scalar_type(), " ",
              weight.sizes());
  // The kernel reads the scale where it runs: on a GPU, no host sync.
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"target", target}, {"weight", weight}}) {
    TORCH_CHECK(t.device() == logits.device(), op, ": ", name, " must be on ", logits.device(),
                " like the logits, got ", t.device());
  }
  if (!args["scale"].isNone()) {
    const at::Tensor& scale = args.tensor("scale");
    TORCH_CHECK(scale.numel() == 1 && (scale.scalar_type() == at::kFloat || scale.scalar_type() == at::kDouble), op,
                ": scale must be a float32 (or float64) scalar tensor, got ", scale.scalar_type(), " ", scale.sizes());
    TORCH_CHECK(scale.device() == logits.device(), op, ": scale must be on ", logits.device(),
                " like the logits, got ", scale.device());
  }
  (void)reduction_code(args);
  const int64_t loss_type = args.to_int("loss_type");
  TORCH_CHECK(loss_type >= kSoftmax && loss_type <= kSoftmaxFocal, op, ": unknown loss_type ", loss_type);
  // The kernels' exp/log1p approximations rely on these ranges (SPEC section 4: gamma >= 0).
  const double gamma = args.to_double("gamma"), label_smoothing = args.to_double("label_smoothing");
  TORCH_CHECK(gamma >= 0 && std::isfinite(gamma), op, ": gamma must be finite and >= 0, got ", gamma);
  TORCH_CHECK(label_smoothing >= 0 && label_smoothing <= 1, op, ": label_smoothing must lie in [0, 1], got ",
              label_smoothing);
  // SPEC sections 10-11 (the arguments exist in every schema, with their defaults).
  const double softcap = args.to_double("softcap"), logit_scale = args.to_double("logit_scale");
  const double z_loss = args.to_double("z_loss");
  TORCH_CHECK(softcap >= 0 && std::isfinite(softcap), op, ": softcap must be finite and > 0 (0 for none), got ",
              softcap);
  TORCH_CHECK(logit_scale > 0 && std::isfinite(logit_scale), op, ": logit_scale must be finite and > 0, got ",
              logit_scale);
  TORCH_CHECK(z_loss >= 0 && std::isfinite(z_loss), op, ": z_loss must be finite and >= 0, got ", z_loss);
  TORCH_CHECK(z_loss == 0 || loss_type == kSoftmax || loss_type == kSoftmaxFocal, op,
              ": z_loss applies to the softmax losses only");
  for (const char* name : {"logit_offset", "target_margin"}) {
    const c10::IValue& v = name[0] == 'l' ? args["logit_offset"] : args["target_margin"];
    if (v.isNone()) continue;
    const at::Tensor& t = v.toTensor();
    TORCH_CHECK(t.dim() == 1 && t.size(0) == logits.size(1) && t.scalar_type() == at::kFloat, op, ": ", name,
                " must be float32 [C] = [", logits.size(1), "], got ", t.scalar_type(), " ", t.sizes());
    TORCH_CHECK(t.device() == logits.device(), op, ": ", name, " must be on ", logits.device(), " like the logits, got ",
                t.device());
  }
  if (!args["z_rows"].isNone()) {
    const at::Tensor& t = args.tensor("z_rows");
    const at::ScalarType want = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    TORCH_CHECK(t.dim() == 1 && t.size(0) == logits.size(0) && t.scalar_type() == want && t.is_contiguous(), op,
                ": z_rows must be a contiguous ", want, " [N] = [", logits.size(0), "], got ", t.scalar_type(), " ",
                t.sizes());
    TORCH_CHECK(t.device() == logits.device(), op, ": z_rows must be on ", logits.device(), " like the logits, got ",
                t.device());
  }
}

// The kernels read rows with unit stride along the classes; any row stride is fine.
inline bool rows_ok(const at::Tensor& z) { return z.size(1) <= 1 || z.stride(1) == 1; }

// Tensors set_params made (contiguous copies) that the params point into: alive until the kernels are queued.
struct HeldTensors {
  at::Tensor target;
  at::Tensor weight;
  at::Tensor logit_offset;
  at::Tensor target_margin;
  at::Tensor scale;  // the normaliser the launch computes (compute_scale), 0-d in the loss' dtype
};

// Fills the params of one call: z holds the logits' rows (the op's logits or a contiguous copy), loss [N], grad
// (nullptr: no gradient; may be z itself) and reduced (nullptr for reduction "none") are the outputs, everything
// else comes from the op's arguments. Without a given scale, the normaliser of the reduction goes to a 0-d tensor
// held here that the launch fills (for "none" and "sum" it is 1: no tensor, no work).
inline void set_params(CBLossParams& p, HeldTensors& held, const OpArgs& args, const at::Tensor& z,
                       const at::Tensor& loss, const at::Tensor* grad, const at::Tensor* reduced) {
  const at::Tensor& target = args.tensor("target");
  p.dense_target = at::isFloatingType(target.scalar_type());
  if (p.dense_target) {
    // The kernels read q in the logits' type or in float32 (exact for every narrower type; float64 q with float
    // narrower logits is rounded to float32 here, the precision the kernels compute in).
    held.target = target.scalar_type() == z.scalar_type() ? target : target.to(at::kFloat);
    if (!rows_ok(held.target)) held.target = held.target.contiguous();
    p.target_dtype = to_dtype(args, held.target.scalar_type());
    p.target_row_stride = held.target.stride(0);
  } else {
    held.target = target.contiguous();
    p.target_dtype = Dtype::kFloat;  // unused
    p.target_row_stride = 0;
  }
  p.weight_mode = static_cast<int>(args.to_int("weight_mode"));
  held.weight = args.tensor("weight").contiguous();
  p.reduction = reduction_code(args);
  p.compute_scale = args["scale"].isNone() && (p.reduction == kMean || p.reduction == kWeightedMean);
  if (!args["scale"].isNone()) {
    const at::Tensor& scale = args.tensor("scale");
    p.scale = const_cast<void*>(scale.const_data_ptr());  // read only (compute_scale is false)
    p.scale_is_double = scale.scalar_type() == at::kDouble;
  } else if (p.compute_scale) {
    held.scale = at::empty({}, loss.options());
    p.scale = held.scale.data_ptr();
    p.scale_is_double = loss.scalar_type() == at::kDouble;
  } else {
    p.scale = nullptr;  // s = 1
    p.scale_is_double = false;
  }
  p.reduced = reduced != nullptr ? reduced->data_ptr() : nullptr;
  p.logits = z.const_data_ptr();
  p.logits_row_stride = z.stride(0);
  p.grad = grad != nullptr ? grad->data_ptr() : nullptr;
  p.grad_row_stride = grad != nullptr ? grad->stride(0) : 0;
  p.target = held.target.const_data_ptr();
  p.weight = held.weight.const_data_ptr<float>();
  p.loss = loss.data_ptr();
  p.num_rows = z.size(0);
  p.num_classes = z.size(1);
  p.dtype = to_dtype(args, z.scalar_type());
  p.target_is_int32 = held.target.scalar_type() == at::kInt;
  p.loss_type = static_cast<int>(args.to_int("loss_type"));
  p.gamma = args.to_double("gamma");
  p.label_smoothing = args.to_double("label_smoothing");
  p.ignore_index = args.to_int("ignore_index");
  p.softcap = args.to_double("softcap");
  p.logit_scale = args.to_double("logit_scale");
  p.z_loss = args.to_double("z_loss");
  p.logit_offset = nullptr;
  p.target_margin = nullptr;
  if (!args["logit_offset"].isNone()) {
    held.logit_offset = args.tensor("logit_offset").contiguous();
    p.logit_offset = held.logit_offset.const_data_ptr<float>();
  }
  if (!args["target_margin"].isNone()) {
    held.target_margin = args.tensor("target_margin").contiguous();
    p.target_margin = held.target_margin.const_data_ptr<float>();
  }
  p.z_rows = args["z_rows"].isNone() ? nullptr : args.tensor("z_rows").data_ptr();
}

inline at::ScalarType loss_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The two ops around a device's launch(args, z, loss, grad, reduced) (which calls set_params), after check_inputs.
// cb_loss_fwd -> (loss: [N] for reduction "none", else 0-d; scale * dl/dz [N, C] contiguous in the logits' dtype,
// or [0] without compute_grad).
template <class Launch>
void cb_loss_fwd_outputs(OpArgs& args, const Launch& launch) {
  const bool compute_grad = args.to_bool("compute_grad");
  const bool reduce = reduction_code(args) != kNone;
  const at::Tensor& logits = args.tensor("logits");
  const at::Tensor z = rows_ok(logits) ? logits : logits.contiguous();
  // The gradient first, the small outputs after it: glibc returns the top of its heap to the system when a large
  // block there is freed, so a gradient allocated last is unmapped at `x.grad = None` and page-faulted in again by
  // the next call (256 x 8142 float32: 1.5 ms a step instead of 0.4). Allocated first, the loss the caller still
  // holds sits above it and the freed block is reused.
  at::Tensor grad = compute_grad ? at::empty(z.sizes(), z.options()) : at::empty({0}, z.options());
  at::Tensor loss = at::empty({z.size(0)}, z.options().dtype(loss_dtype(z)));
  at::Tensor reduced = reduce ? at::empty({}, loss.options()) : at::Tensor();
  if (z.size(0) > 0) {
    launch(args, z, loss, compute_grad ? &grad : nullptr, reduce ? &reduced : nullptr);
  } else if (reduce) {
    reduced.zero_();  // no rows: every reduction of nothing is 0
  }
  args.set_results(reduce ? std::move(reduced) : std::move(loss), std::move(grad));
}

// cb_loss_fwd_inplace -> loss ([N] or 0-d, as cb_loss_fwd), with scale * dl/dz written over the logits.
template <class Launch>
void cb_loss_fwd_inplace_outputs(OpArgs& args, const Launch& launch) {
  const bool reduce = reduction_code(args) != kNone;
  const at::Tensor& logits = args.tensor("logits");
  at::assert_no_internal_overlap(logits);  // rows written by different threads must not share memory
  // Column-strided logits: compute in a contiguous copy, then write the gradient back.
  const bool direct = rows_ok(logits);
  const at::Tensor z = direct ? logits : logits.contiguous();
  at::Tensor loss = at::empty({z.size(0)}, z.options().dtype(loss_dtype(z)));
  at::Tensor reduced = reduce ? at::empty({}, loss.options()) : at::Tensor();
  if (z.size(0) > 0) {
    launch(args, z, loss, &z, reduce ? &reduced : nullptr);
  } else if (reduce) {
    reduced.zero_();
  }
  if (!direct) logits.copy_(z);
  args.set_results(reduce ? std::move(reduced) : std::move(loss));
}

}  // namespace cbkernels
