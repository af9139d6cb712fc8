// The Python module of the compiled extension. The op schemas are defined once, in cbkernels/_opdefs.py (imported
// before this library by cbkernels._ops); the kernels register themselves per device in csrc/cpu and csrc/cuda
// (TORCH_LIBRARY_IMPL), in static initialisers, so `import cbkernels._C` only has to load the library.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
