// CUDA observe_, advance_ and cw_observe_, mirroring csrc/cpu/observe.cpp: one thread per row
// (csrc/observe.h).  A row whose (age, key) lies outside the trajectory is a device-side assert,
// where the CPU raises IndexError: checking first would synchronise with the host.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../checks.h"

namespace advfast {
namespace {

constexpr int kRowThreads = 256;

unsigned int row_blocks(int64_t B) {
  const int64_t blocks = (B + kRowThreads - 1) / kRowThreads;
  TORCH_CHECK(blocks < (int64_t{1} << 31), "advfast: too many rows");
  return static_cast<unsigned int>(blocks);
}

// One thread per row of observe_ or advance_: its trajectory cell is asserted, then Row runs.
template <typename Args, void (*Row)(const Args&, int64_t)>
__global__ void trajectory_rows_kernel(Args a) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= a.B) return;
  if (a.trajectory.present) {
    CUDA_KERNEL_ASSERT(in_trajectory(a.trajectory, a.age[b], a.key[b]));
  }
  Row(a, b);
}

__global__ void cw_observe_kernel(CWObserveArgs a) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b < a.B) cw_observe_row(a, b);
}

at::Tensor observe_cuda(const at::Tensor& head, const at::Tensor& norms, const at::Tensor& age,
                        const at::Tensor& paused, at::Tensor first_flip, at::Tensor flip_norms,
                        at::Tensor failure, at::Tensor done,
                        const std::optional<at::Tensor>& trajectory,
                        const std::optional<at::Tensor>& key, c10::IntArrayRef columns,
                        int64_t iterations, c10::string_view stop, bool controlled) {
  const Columns cols = parse_columns(columns, kHeadStats, "observe_");
  check_observe_args(head, norms, age, paused, first_flip, flip_norms, failure, done, trajectory,
                     key, cols);
  const StopRule rule = parse_stop(stop);
  const c10::cuda::CUDAGuard guard(head.device());
  const int64_t B = head.size(0);
  at::Tensor active = at::empty({B}, paused.options());
  if (B == 0) return active;
  ObserveOperands op(head, norms, age, paused, first_flip, flip_norms, failure, done, trajectory,
                     key, cols, active, iterations, rule, controlled);
  trajectory_rows_kernel<ObserveArgs, observe_row>
      <<<row_blocks(B), kRowThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(op.args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  op.write_back();
  return active;
}

void advance_cuda(const at::Tensor& stats, const at::Tensor& active, at::Tensor age,
                  at::Tensor norms, const std::optional<at::Tensor>& trajectory,
                  const std::optional<at::Tensor>& key, c10::IntArrayRef columns) {
  const Columns cols = parse_columns(columns, kStepStats, "advance_");
  check_advance_args(stats, active, age, norms, trajectory, key, cols);
  const c10::cuda::CUDAGuard guard(stats.device());
  const int64_t B = stats.size(0);
  if (B == 0) return;
  AdvanceOperands op(stats, active, age, norms, trajectory, key, cols);
  trajectory_rows_kernel<AdvanceArgs, advance_row>
      <<<row_blocks(B), kRowThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(op.args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  op.write_back();
}

std::tuple<at::Tensor, at::Tensor> cw_observe_cuda(
    const at::Tensor& head, const at::Tensor& norms, const at::Tensor& constant,
    const at::Tensor& active, at::Tensor inner_age, at::Tensor previous_loss, at::Tensor best_l2,
    at::Tensor best_constant, at::Tensor succeeded, at::Tensor paused, double kappa, int64_t steps,
    int64_t check_every, bool abort_early) {
  check_cw_observe_args(head, norms, constant, active, inner_age, previous_loss, best_l2,
                        best_constant, succeeded, paused, steps, check_every);
  const c10::cuda::CUDAGuard guard(head.device());
  const int64_t B = head.size(0);
  at::Tensor stepping = at::empty({B}, active.options()), better = at::empty_like(stepping);
  if (B == 0) return {stepping, better};
  CWObserveOperands op(head, norms, constant, active, inner_age, previous_loss, best_l2,
                       best_constant, succeeded, paused, stepping, better, kappa, steps,
                       check_every, abort_early);
  cw_observe_kernel<<<row_blocks(B), kRowThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      op.args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  op.write_back();
  return {stepping, better};
}

}  // namespace

TORCH_LIBRARY_IMPL(advfast, CUDA, m) {
  m.impl("observe_", &observe_cuda);
  m.impl("advance_", &advance_cuda);
  m.impl("cw_observe_", &cw_observe_cuda);
}

}  // namespace advfast
