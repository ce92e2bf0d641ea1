// The Python module advfast._C: loading it runs the operator registrations (ops.cpp and the
// backends), and it offers the engine's per-iteration ops as direct calls.
//
// torch.ops.advfast.X.default(...) builds a boxed argument stack from Python objects against
// the schema, argument by argument; in the attack loop, where every op's path is out of the
// caches again after the model's kernels, that costs 10-20 us a call more than a direct
// binding (bench/bench_overhead.py).  Every op has one here.  The calls here convert their arguments with pybind11 and
// enter the dispatcher through the op's typed handle, so every dispatch key still applies
// (ADInplaceOrView's version counters, the backends, TorchDispatchModes); Python-level
// __torch_function__ overrides are not consulted.  advfast.ops uses them outside tracing.
#include <torch/csrc/Exceptions.h>
#include <torch/extension.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace advfast {
namespace {

using Tensor = at::Tensor;
using OptTensor = std::optional<at::Tensor>;

// The op's typed handle, found once; Signature is the kernels' C++ signature (csrc/cpu/).
template <typename Signature>
const c10::TypedOperatorHandle<Signature>& handle(const char* name) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow(name, "").template typed<Signature>();
  return op;
}

std::tuple<Tensor, Tensor> loss_head(const Tensor& logits, const Tensor& target,
                                     const Tensor& source, const std::string& loss, double kappa,
                                     const std::string& kappa_mode, double threshold,
                                     const std::string& ce_seed) {
  using Signature = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                               c10::string_view, double, c10::string_view,
                                               double, c10::string_view);
  return handle<Signature>("advfast::loss_head")
      .call(logits, target, source, loss, kappa, kappa_mode, threshold, ce_seed);
}

Tensor perturb_step(const Tensor& x, const Tensor& grad, const Tensor& x0,
                    const OptTensor& active, bool sign, std::optional<double> alpha,
                    std::optional<double> beta, double lo, double hi, std::optional<double> eps,
                    bool exact_l1) {
  using Signature = Tensor(Tensor, const Tensor&, const Tensor&, const OptTensor&, bool,
                           std::optional<double>, std::optional<double>, double, double,
                           std::optional<double>, bool);
  return handle<Signature>("advfast::perturb_step_")
      .call(x, grad, x0, active, sign, alpha, beta, lo, hi, eps, exact_l1);
}

Tensor observe(const Tensor& head, const Tensor& norms, const Tensor& age, const Tensor& paused,
               const Tensor& first_flip, const Tensor& flip_norms, const Tensor& failure,
               const Tensor& done, const OptTensor& trajectory, const OptTensor& key,
               const std::vector<int64_t>& columns, int64_t iterations, const std::string& stop,
               bool controlled) {
  using Signature = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, Tensor,
                           Tensor, Tensor, Tensor, const OptTensor&, const OptTensor&,
                           c10::IntArrayRef, int64_t, c10::string_view, bool);
  return handle<Signature>("advfast::observe_")
      .call(head, norms, age, paused, first_flip, flip_norms, failure, done, trajectory, key,
            columns, iterations, stop, controlled);
}

void advance(const Tensor& stats, const Tensor& active, const Tensor& age, const Tensor& norms,
             const OptTensor& trajectory, const OptTensor& key,
             const std::vector<int64_t>& columns) {
  using Signature = void(const Tensor&, const Tensor&, Tensor, Tensor, const OptTensor&,
                         const OptTensor&, c10::IntArrayRef);
  handle<Signature>("advfast::advance_").call(stats, active, age, norms, trajectory, key, columns);
}

Tensor adam_tanh_step(const Tensor& w, const Tensor& m, const Tensor& v, const Tensor& x,
                      const Tensor& grad, const Tensor& x0, const Tensor& c, const Tensor& step,
                      const OptTensor& active, double lr, double beta1, double beta2,
                      double eps) {
  using Signature = Tensor(Tensor, Tensor, Tensor, Tensor, const Tensor&, const Tensor&,
                           const Tensor&, const Tensor&, const OptTensor&, double, double,
                           double, double);
  return handle<Signature>("advfast::adam_tanh_step_")
      .call(w, m, v, x, grad, x0, c, step, active, lr, beta1, beta2, eps);
}

std::tuple<Tensor, Tensor> cw_observe(const Tensor& head, const Tensor& norms,
                                      const Tensor& constant, const Tensor& active,
                                      const Tensor& inner_age, const Tensor& previous_loss,
                                      const Tensor& best_l2, const Tensor& best_constant,
                                      const Tensor& succeeded, const Tensor& paused, double kappa,
                                      int64_t steps, int64_t check_every, bool abort_early) {
  using Signature = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                               const Tensor&, Tensor, Tensor, Tensor, Tensor,
                                               Tensor, Tensor, double, int64_t, int64_t, bool);
  return handle<Signature>("advfast::cw_observe_")
      .call(head, norms, constant, active, inner_age, previous_loss, best_l2, best_constant,
            succeeded, paused, kappa, steps, check_every, abort_early);
}

}  // namespace
}  // namespace advfast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // c10's errors as torch.ops raises them (ValueError, TypeError, IndexError, RuntimeError).
  pybind11::register_exception_translator(
      [](std::exception_ptr error) { torch::translate_exception_to_python(error); });
  m.def("loss_head", &advfast::loss_head);
  m.def("perturb_step_", &advfast::perturb_step);
  m.def("observe_", &advfast::observe);
  m.def("advance_", &advfast::advance);
  m.def("adam_tanh_step_", &advfast::adam_tanh_step);
  m.def("cw_observe_", &advfast::cw_observe);
}
