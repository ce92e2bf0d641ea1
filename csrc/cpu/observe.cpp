// CPU entry points of observe_, advance_ and cw_observe_, the engine's per-iteration bookkeeping:
// check the arguments (checks.h) and the trajectory cells every row writes, then one pass over the
// rows (csrc/observe.h; B rows of scalar work, no per-capability copies needed).
#include <torch/library.h>

#include "../checks.h"

namespace advfast {
namespace {

// Every row's (age, key) must name a cell of the trajectory, as index_put_ demands.
void check_cells_cpu(const Trajectory& t, const int64_t* age, const int64_t* key, int64_t B,
                     const char* op) {
  if (!t.present) return;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_INDEX(in_trajectory(t, age[b], key[b]), "advfast.", op, ": row ", b,
                      " writes trajectory[", age[b], ", ", key[b], "], outside [", t.T, ", ",
                      t.Bt, "]");
  }
}

at::Tensor observe_cpu(const at::Tensor& head, const at::Tensor& norms, const at::Tensor& age,
                       const at::Tensor& paused, at::Tensor first_flip, at::Tensor flip_norms,
                       at::Tensor failure, at::Tensor done,
                       const std::optional<at::Tensor>& trajectory,
                       const std::optional<at::Tensor>& key, c10::IntArrayRef columns,
                       int64_t iterations, c10::string_view stop, bool controlled) {
  const Columns cols = parse_columns(columns, kHeadStats, "observe_");
  check_observe_args(head, norms, age, paused, first_flip, flip_norms, failure, done, trajectory,
                     key, cols);
  const StopRule rule = parse_stop(stop);
  const int64_t B = head.size(0);
  at::Tensor active = at::empty({B}, paused.options());
  if (B == 0) return active;
  const at::Tensor h = head.contiguous(), n = norms.contiguous(), a = age.contiguous(),
                   p = paused.contiguous(), k = key.has_value() ? key->contiguous() : at::Tensor();
  Written ff(first_flip), fn(flip_norms), fl(failure), dn(done);
  const Trajectory t = trajectory_of(trajectory);
  const int64_t* kp = k.defined() ? k.const_data_ptr<int64_t>() : nullptr;
  check_cells_cpu(t, a.const_data_ptr<int64_t>(), kp, B, "observe_");
  const ObserveArgs args{h.const_data_ptr<float>(), n.const_data_ptr<float>(),
                         a.const_data_ptr<int64_t>(), kp, p.const_data_ptr<bool>(),
                         ff.ptr<int64_t>(), fl.ptr<int64_t>(), fn.ptr<float>(), dn.ptr<bool>(),
                         active.data_ptr<bool>(), B, iterations, rule, controlled, t, cols};
  for (int64_t b = 0; b < B; ++b) observe_row(args, b);
  for (Written* w : {&ff, &fn, &fl, &dn}) w->write_back();
  return active;
}

void advance_cpu(const at::Tensor& stats, const at::Tensor& active, at::Tensor age,
                 at::Tensor norms, const std::optional<at::Tensor>& trajectory,
                 const std::optional<at::Tensor>& key, c10::IntArrayRef columns) {
  const Columns cols = parse_columns(columns, kStepStats, "advance_");
  check_advance_args(stats, active, age, norms, trajectory, key, cols);
  const int64_t B = stats.size(0);
  if (B == 0) return;
  const at::Tensor s = stats.contiguous(), on = active.contiguous(),
                   k = key.has_value() ? key->contiguous() : at::Tensor();
  Written ag(age), nm(norms);
  const Trajectory t = trajectory_of(trajectory);
  const int64_t* kp = k.defined() ? k.const_data_ptr<int64_t>() : nullptr;
  check_cells_cpu(t, ag.ptr<int64_t>(), kp, B, "advance_");
  const AdvanceArgs args{s.const_data_ptr<float>(), on.const_data_ptr<bool>(), kp,
                         ag.ptr<int64_t>(), nm.ptr<float>(), B, t, cols};
  for (int64_t b = 0; b < B; ++b) advance_row(args, b);
  ag.write_back();
  nm.write_back();
}

std::tuple<at::Tensor, at::Tensor> cw_observe_cpu(
    const at::Tensor& head, const at::Tensor& norms, const at::Tensor& constant,
    const at::Tensor& active, at::Tensor inner_age, at::Tensor previous_loss, at::Tensor best_l2,
    at::Tensor best_constant, at::Tensor succeeded, at::Tensor paused, double kappa, int64_t steps,
    int64_t check_every, bool abort_early) {
  check_cw_observe_args(head, norms, constant, active, inner_age, previous_loss, best_l2,
                        best_constant, succeeded, paused, steps, check_every);
  const int64_t B = head.size(0);
  at::Tensor stepping = at::empty({B}, active.options()), better = at::empty_like(stepping);
  if (B == 0) return {stepping, better};
  const at::Tensor h = head.contiguous(), n = norms.contiguous(), c = constant.contiguous(),
                   on = active.contiguous();
  Written age(inner_age), prev(previous_loss), bl(best_l2), bc(best_constant), ok(succeeded),
      ps(paused);
  const CWObserveArgs args{h.const_data_ptr<float>(), n.const_data_ptr<float>(),
                           c.const_data_ptr<float>(), on.const_data_ptr<bool>(),
                           age.ptr<int64_t>(), prev.ptr<float>(), bl.ptr<float>(),
                           bc.ptr<float>(), ok.ptr<bool>(), ps.ptr<bool>(),
                           stepping.data_ptr<bool>(), better.data_ptr<bool>(), B, steps,
                           check_every, static_cast<float>(kappa), abort_early};
  for (int64_t b = 0; b < B; ++b) cw_observe_row(args, b);
  for (Written* w : {&age, &prev, &bl, &bc, &ok, &ps}) w->write_back();
  return {stepping, better};
}

}  // namespace

TORCH_LIBRARY_IMPL(advfast, CPU, m) {
  m.impl("observe_", &observe_cpu);
  m.impl("advance_", &advance_cpu);
  m.impl("cw_observe_", &cw_observe_cpu);
}

}  // namespace advfast
