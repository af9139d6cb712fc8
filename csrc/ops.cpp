// The one schema block of the cbkernels ops. Kernels register per device in csrc/cpu and csrc/cuda;
// the pure-PyTorch backend adds its own *_torch ops to the same namespace from Python (a fragment).
//
// cb_loss_fwd: per-row loss [N] (float32; float64 for float64 logits) and scale * dl/dz [N, C] in the
// logits' dtype ([0] when not compute_grad), for loss_type 0 softmax, 1 sigmoid, 2 focal,
// 3 softmax focal (SPEC sections 3-4). cb_loss_fwd_inplace writes the gradient over the logits.
#include <Python.h>
#include <torch/library.h>

// `import cbkernels._C` only has to load this library: registration runs in static initialisers.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(cbkernels, m) {
  // The fake (meta) implementations live in Python: torch imports this module when it first needs one, so
  // torch.ops.cbkernels.* work under torch.compile / opcheck even before anything imported it.
  m.set_python_module("cbkernels._ops");
  m.def(
      "cb_loss_fwd(Tensor logits, Tensor target, Tensor weight, Tensor scale, int loss_type, float gamma, "
      "float label_smoothing, int ignore_index, bool compute_grad) -> (Tensor, Tensor)");
  m.def(
      "cb_loss_fwd_inplace(Tensor(a!) logits, Tensor target, Tensor weight, Tensor scale, int loss_type, "
      "float gamma, float label_smoothing, int ignore_index) -> Tensor");
}
