// Schemas of every advfast operator, in one place (the Python module that loads them:
// python_calls.cpp).
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <iterator>
#include <string>
#include <vector>

#include "cpu/cpu_isa.h"
#include "stats.h"

namespace advfast {
namespace {

// The stats column names of csrc/stats.h, for advfast.ops to be checked against.
std::vector<std::string> head_stat_names() {
  return {std::begin(kHeadStatNames), std::end(kHeadStatNames)};
}
std::vector<std::string> step_stat_names() {
  return {std::begin(kStepStatNames), std::end(kStepStatNames)};
}

// ADInplaceOrView kernel of the in-place ops: runs the op, then moves the version counter of
// every argument the schema marks as written (Tensor(a!)), as ATen's own in-place ops do.
// (PyTorch's generic fallback bumps only outputs that alias an input, and ours return stats.)
void bump_written_arguments(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                            torch::jit::Stack* stack) {
  const auto& schema = op.schema();
  const size_t count = schema.arguments().size();
  std::vector<at::Tensor> written;
  for (size_t i = 0; i < count; ++i) {
    const c10::IValue& value = (*stack)[stack->size() - count + i];
    if (value.isTensor() && schema.is_mutable({c10::SchemaArgType::input, i})) {
      written.push_back(value.toTensor());
    }
  }
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (const at::Tensor& t : written) t.unsafeGetTensorImpl()->bump_version();
}

}  // namespace
}  // namespace advfast

TORCH_LIBRARY(advfast, m) {
  // Loss head on the logits: (seed = dO/dlogits [B, M] float32, stats [B, 12] float32).
  // Argument checks of every op: csrc/checks.h.
  m.def(
      "loss_head(Tensor logits, Tensor target, Tensor source, str loss, float kappa, "
      "str kappa_mode, float threshold, str ce_seed=\"exact\") -> (Tensor, Tensor)");
  // Fused update step, x is updated in place; returns stats [B, 5] float32.  exact_l1: the
  // equal perturbation rule adds exactly beta in L1 where the box (and eps ball) leave room.
  m.def(
      "perturb_step_(Tensor(a!) x, Tensor grad, Tensor x0, Tensor? active, bool sign, "
      "float? alpha, float? beta, float lo, float hi, float? eps, bool exact_l1=False) -> Tensor");
  // Carlini-Wagner L2's Adam step in tanh space: w, its moments m and v, and the image
  // x = (tanh(w) + 1) / 2 are updated in place; returns stats [B, 5] float32.
  m.def(
      "adam_tanh_step_(Tensor(a!) w, Tensor(b!) m, Tensor(c!) v, Tensor(d!) x, Tensor grad, "
      "Tensor x0, Tensor c, Tensor step, Tensor? active, float lr, float beta1, float beta2, "
      "float eps) -> Tensor");
  // The engine's bookkeeping after loss_head (csrc/observe.h): the first flip and the norms
  // there, failure codes, the stop rule and iteration cap (when controlled), the head columns of
  // the trajectory row (age, key); returns active [B] bool, the rows that take a step.
  m.def(
      "observe_(Tensor head, Tensor norms, Tensor age, Tensor paused, Tensor(a!) first_flip, "
      "Tensor(b!) flip_norms, Tensor(c!) failure, Tensor(d!) done, Tensor(e!)? trajectory, "
      "Tensor? key, int[] columns, int iterations, str stop, bool controlled) -> Tensor");
  // ... and after the step: the norms of x - x0, the step columns of the trajectory row (the
  // last len(columns) of it; NaN for inactive rows), then age += active.
  m.def(
      "advance_(Tensor stats, Tensor active, Tensor(a!) age, Tensor(b!) norms, "
      "Tensor(c!)? trajectory, Tensor? key, int[] columns) -> ()");
  // Carlini and Wagner's per-iteration rules for the rows that would step (CWSearch, see
  // csrc/observe.h); returns (stepping, better) [B] bool: the rows that step, and those whose
  // image became their best.
  m.def(
      "cw_observe_(Tensor head, Tensor norms, Tensor constant, Tensor active, "
      "Tensor(a!) inner_age, Tensor(b!) previous_loss, Tensor(c!) best_l2, "
      "Tensor(d!) best_constant, Tensor(e!) succeeded, Tensor(f!) paused, float kappa, "
      "int steps, int check_every, bool abort_early) -> (Tensor, Tensor)");
  // The instruction set the CPU kernels run with on this machine.
  m.def("cpu_isa() -> str", &advfast::cpu_isa);
  // The names of loss_head's and of the steps' stats columns (owned by csrc/stats.h).
  m.def("head_stat_names() -> str[]", &advfast::head_stat_names);
  m.def("step_stat_names() -> str[]", &advfast::step_stat_names);
}

// Autograd sees the in-place ops as what they are: x's version counter moves (so a tensor
// that autograd saved and then stepped raises "modified by an inplace operation" at backward).
// The Autograd key keeps PyTorch's default for custom ops, which reaches this kernel.
TORCH_LIBRARY_IMPL(advfast, ADInplaceOrView, m) {
  for (const char* op : {"perturb_step_", "adam_tanh_step_", "observe_", "advance_",
                          "cw_observe_"}) {
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<&advfast::bump_written_arguments>());
  }
}
