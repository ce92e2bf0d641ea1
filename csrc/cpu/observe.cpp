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
  ObserveOperands op(head, norms, age, paused, first_flip, flip_norms, failure, done, trajectory,
                     key, cols, active, iterations, rule, controlled);
  check_cells_cpu(op.args.trajectory, op.args.age, op.args.key, B, "observe_");
  for (int64_t b = 0; b < B; ++b) observe_row(op.args, b);
  op.write_back();
  return active;
}

void advance_cpu(const at::Tensor& stats, const at::Tensor& active, at::Tensor age,
                 at::Tensor norms, const std::optional<at::Tensor>& trajectory,
                 const std::optional<at::Tensor>& key, c10::IntArrayRef columns) {
  const Columns cols = parse_columns(columns, kStepStats, "advance_");
  check_advance_args(stats, active, age, norms, trajectory, key, cols);
  const int64_t B = stats.size(0);
  if (B == 0) return;
  AdvanceOperands op(stats, active, age, norms, trajectory, key, cols);
  check_cells_cpu(op.args.trajectory, op.args.age, op.args.key, B, "advance_");
  for (int64_t b = 0; b < B; ++b) advance_row(op.args, b);
  op.write_back();
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
  CWObserveOperands op(head, norms, constant, active, inner_age, previous_loss, best_l2,
                       best_constant, succeeded, paused, stepping, better, kappa, steps,
                       check_every, abort_early);
  for (int64_t b = 0; b < B; ++b) cw_observe_row(op.args, b);
  op.write_back();
  return {stepping, better};
}

}  // namespace

TORCH_LIBRARY_IMPL(advfast, CPU, m) {
  m.impl("observe_", &observe_cpu);
  m.impl("advance_", &advance_cpu);
  m.impl("cw_observe_", &cw_observe_cpu);
}

}  // namespace advfast
