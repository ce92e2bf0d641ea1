// Schemas of every advfast operator, in one place, plus the Python module stub that lets
// `import advfast._C` load this library (which runs the registrations below).
#include <Python.h>
#include <torch/library.h>

#include <string>

namespace advfast {
std::string cpu_isa();  // csrc/cpu/perturb_step.cpp
}

extern "C" {
// Empty module: the library exists for its static operator registrations.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(advfast, m) {
  // Loss head on the logits: (seed = dO/dlogits [B, M] float32, stats [B, 10] float32).
  m.def(
      "loss_head(Tensor logits, Tensor target, Tensor source, str loss, float kappa, "
      "str kappa_mode, float threshold) -> (Tensor, Tensor)");
  // Fused update step, x is updated in place; returns stats [B, 4] float32.
  m.def(
      "perturb_step_(Tensor(a!) x, Tensor grad, Tensor x0, Tensor? active, bool sign, "
      "float? alpha, float? beta, float lo, float hi, float? eps) -> Tensor");
  // The instruction set the CPU kernels run with on this machine.
  m.def("cpu_isa() -> str", &advfast::cpu_isa);
}
