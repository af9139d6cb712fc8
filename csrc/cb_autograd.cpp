// cbkernels::cb_loss: the whole differentiable call in C++ (schema in cbkernels/_opdefs.py), so that a CPU call
// costs one op dispatch forward and no Python backward. Issue 15: at CIFAR sizes (128 x 10 or 100) a Python
// autograd.Function's apply and backward cost more than the fused kernel itself.
//
// Forward calls cb_loss_fwd (which checks the targets, normalises, reduces and writes s * dl/dz) and keeps that
// gradient; backward only scales it by grad_output, as cbkernels/_autograd.py does for the other paths:
// - grad_output exactly 1 (loss.backward()) on the CPU, read there for free: the gradient is returned as it is
//   (AccumulateGrad adopts it when nothing else holds it, and copies it while a retained graph still does);
// - otherwise in place when the graph is not kept (nothing can read the saved gradient again), out of place when it
//   is (retain_graph / create_graph);
// - a second derivative fails loudly (DelayedError), never silently as 0.
// The Python layer calls this op for the compiled CPU backend without inplace_backward; every other path keeps
// cbkernels/_autograd.py (the CUDA one scales on the device with the Triton kernel of cbkernels/_grad_scale.py).
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/DispatchKey.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

namespace cbkernels {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using OptTensor = std::optional<at::Tensor>;
using FwdSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                   const OptTensor&, int64_t, double, double, int64_t, bool,
                                                   c10::string_view, double, double, double, int64_t,
                                                   const OptTensor&, const OptTensor&, const OptTensor&);

// The loss options after the tensors, as cb_loss takes them (cbkernels/_opdefs.py's LossSpec, then the vectors).
struct Options {
  int64_t loss_type;
  double gamma;
  double label_smoothing;
  int64_t ignore_index;
  std::string reduction;
  double softcap;
  double logit_scale;
  double z_loss;
  int64_t weight_mode;
  OptTensor logit_offset;
  OptTensor target_margin;
};

std::tuple<at::Tensor, at::Tensor> loss_fwd(const at::Tensor& logits, const at::Tensor& target,
                                            const at::Tensor& weight, const OptTensor& scale, const Options& o,
                                            bool compute_grad) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("cbkernels::cb_loss_fwd", "").typed<FwdSig>();
  return op.call(logits, target, weight, scale, o.loss_type, o.gamma, o.label_smoothing, o.ignore_index, compute_grad,
                 o.reduction, o.softcap, o.logit_scale, o.z_loss, o.weight_mode, o.logit_offset, o.target_margin,
                 std::nullopt);
}

constexpr const char* kNoDoubleBackward =
    "cbkernels: double backward through a class-balanced loss is not supported (its backward scales a gradient "
    "computed in the forward pass)";

// A value the host can read for free: a plain CPU tensor (not a tracing subclass, nor a functional wrapper).
bool readable_on_host(const at::Tensor& t) {
  return t.device().is_cpu() && !t.key_set().has(c10::DispatchKey::Python) &&
         !t.key_set().has(c10::DispatchKey::Functionalize);
}

class CBLoss : public torch::autograd::Function<CBLoss> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& target,
                            const at::Tensor& weight, const OptTensor& scale, const Options& options, bool want_grad) {
    auto [loss, grad] = loss_fwd(logits, target, weight, scale, options, want_grad);
    if (want_grad) ctx->save_for_backward({grad});
    ctx->saved_data["per_row"] = options.reduction == "none";
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    at::Tensor grad = ctx->get_saved_variables()[0];
    at::Tensor go = grad_outputs[0];
    const bool per_row = ctx->saved_data["per_row"].toBool();
    if (per_row) go = go.reshape({-1, 1}).to(grad.scalar_type());
    const bool keep_graph = torch::autograd::get_current_graph_task_keep_graph();
    const bool traced = !readable_on_host(grad);
    if (!per_row && !traced && go.numel() == 1 && readable_on_host(go) && go.item<double>() == 1.0) {
      // grad as it is
    } else if (!keep_graph && !traced) {
      grad.mul_(go);  // the saved gradient dies with this node: scale it where it is and hand it over
    } else {
      grad = grad.mul(go);
    }
    if (at::GradMode::is_enabled()) {
      // create_graph: usable by the rest of the graph, but differentiating it again raises.
      torch::autograd::DelayedError node(kNoDoubleBackward, 1);
      grad = node.apply({grad.detach().requires_grad_()})[0];
    }
    return {grad, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor cb_loss_autograd(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& weight,
                            const OptTensor& scale, int64_t loss_type, double gamma, double label_smoothing,
                            int64_t ignore_index, c10::string_view reduction, double softcap, double logit_scale,
                            double z_loss, int64_t weight_mode, const OptTensor& logit_offset,
                            const OptTensor& target_margin) {
  // Whether backward can reach the logits (autograd runs forward with grad mode off: decided here).
  const bool want_grad = at::GradMode::is_enabled() && logits.requires_grad();
  const Options options{loss_type, gamma,  label_smoothing, ignore_index, std::string(reduction),
                        softcap,   logit_scale, z_loss, weight_mode, logit_offset, target_margin};
  return CBLoss::apply(logits, target, weight, scale, options, want_grad);
}

// Below autograd (inference mode, or a caller that dispatches past it): the loss alone.
at::Tensor cb_loss_no_grad(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& weight,
                           const OptTensor& scale, int64_t loss_type, double gamma, double label_smoothing,
                           int64_t ignore_index, c10::string_view reduction, double softcap, double logit_scale,
                           double z_loss, int64_t weight_mode, const OptTensor& logit_offset,
                           const OptTensor& target_margin) {
  const Options options{loss_type, gamma,  label_smoothing, ignore_index, std::string(reduction),
                        softcap,   logit_scale, z_loss, weight_mode, logit_offset, target_margin};
  return std::get<0>(loss_fwd(logits, target, weight, scale, options, false));
}

}  // namespace

TORCH_LIBRARY_IMPL(cbkernels, Autograd, m) { m.impl("cb_loss", &cb_loss_autograd); }
TORCH_LIBRARY_IMPL(cbkernels, CompositeExplicitAutograd, m) { m.impl("cb_loss", &cb_loss_no_grad); }

}  // namespace cbkernels
