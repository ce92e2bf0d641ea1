// The engine's per-iteration bookkeeping, one row at a time, shared by the CPU and CUDA kernels of
// observe_ and advance_ (csrc/cpu/observe.cpp, csrc/cuda/observe.cu) and mirrored by
// advfast/ops/reference.py.  It replaces some twenty small tensor ops per iteration (first flip,
// the norms there, failure codes, stop masks, trajectory rows, the step count) by two passes over
// B rows: on a GPU two launches instead of twenty.
#pragma once

#include <cstdint>

#include "advfast_math.h"
#include "stats.h"

namespace advfast {

// The stop rules observe_ applies (advfast.engine.control.STOPS): "never", "flip" (predicted as
// the target), "confidence" (in D3, Definition IV.1).
enum class StopRule : int64_t { NEVER = 0, FLIP = 1, CONFIDENCE = 2 };

// The failure code observe_ gives a row whose logits are not finite (advfast.engine.FAILURES).
constexpr int64_t kNonfiniteLogits = 1;

// The most trajectory columns one op writes (loss_head has kHeadStats, the steps kStepStats).
constexpr int kMaxColumns = 16;

// Which stats columns go to the trajectory, in order; passed by value to the CUDA kernels.
struct Columns {
  int64_t index[kMaxColumns];
  int64_t count;
};

// A [T, Bt, W] float32 trajectory, or none (`present` false; an empty one is present, and then
// every row's cell is outside it).
struct Trajectory {
  bool present;
  float* data;
  int64_t s0, s1, s2, T, Bt, W;
};

// observe_'s operands, all [B] or [B, k] contiguous (see the schema in csrc/ops.cpp).
struct ObserveArgs {
  const float *head, *norms;  // [B, kHeadStats], [B, 3]
  const int64_t *age, *key;   // [B]; key null without a trajectory
  const bool* paused;         // [B]
  int64_t *first_flip, *failure;
  float* flip_norms;  // [B, 3]
  bool *done, *active;
  int64_t B, iterations;
  StopRule stop;
  bool controlled;
  Trajectory trajectory;
  Columns columns;
};

// advance_'s operands: stats [B, kStepStats], active [B] read; age [B] and norms [B, 3] written.
struct AdvanceArgs {
  const float* stats;
  const bool* active;
  const int64_t* key;
  int64_t* age;
  float* norms;
  int64_t B;
  Trajectory trajectory;
  Columns columns;
};

// cw_observe_'s operands: Carlini and Wagner's per-iteration rules (advfast.engine.control
// CWSearch).  head [B, kHeadStats], norms [B, 3], constant [B] float32, active [B] read;
// the run's iterations, the loss at the last abort check, the best squared L2 and its constant,
// whether this run succeeded and whether the run ended (paused) written; stepping and better [B]
// out.
struct CWObserveArgs {
  const float *head, *norms, *constant;
  const bool* active;
  int64_t* inner_age;
  float *previous_loss, *best_l2, *best_constant;
  bool *succeeded, *paused, *stepping, *better;
  int64_t B, steps, check_every;
  float kappa;
  bool abort_early;
};

// Whether (age, key) names a cell of the trajectory.
ADVFAST_HD bool in_trajectory(const Trajectory& t, int64_t age, int64_t key) {
  return age >= 0 && age < t.T && key >= 0 && key < t.Bt;
}

// trajectory[age, key, offset + j] = values[columns[j]] (NaN with `blank`), j < columns.count.
ADVFAST_HD void write_trajectory(const Trajectory& t, int64_t age, int64_t key, int64_t offset,
                                 const float* values, const Columns& columns, bool blank) {
  float* cell = t.data + age * t.s0 + key * t.s1;
  for (int64_t j = 0; j < columns.count; ++j) {
    cell[(offset + j) * t.s2] = blank ? NAN : values[columns.index[j]];
  }
}

// Row b of observe_: takes in loss_head's stats of the images X_age (the first flip and the norms
// there; a failure code for non-finite logits), applies the stop rule and the iteration cap when
// `controlled`, and returns whether the row takes a step: not done and not paused (controlled),
// else not failed.  A non-finite row never counts as a flip.
ADVFAST_HD void observe_row(const ObserveArgs& a, int64_t b) {
  const float* head = a.head + b * kHeadStats;
  const bool finite = !(head[kFinite] < 0.5f);
  const bool hit = head[kHit] > 0.5f;
  const int64_t age = a.age[b];
  if (!finite && a.failure[b] == 0) a.failure[b] = kNonfiniteLogits;
  if (hit && finite && a.first_flip[b] < 0) {
    a.first_flip[b] = age;
    for (int k = 0; k < 3; ++k) a.flip_norms[3 * b + k] = a.norms[3 * b + k];
  }
  if (a.controlled) {
    const bool meets = a.stop == StopRule::FLIP ? hit
                       : a.stop == StopRule::CONFIDENCE ? head[kSubspace] == 3.f
                                                        : false;
    a.done[b] = a.done[b] || a.failure[b] > 0 || age >= a.iterations || meets;
    a.active[b] = !(a.done[b] || a.paused[b]);
  } else {
    a.active[b] = a.failure[b] == 0;
  }
  if (a.trajectory.present) {
    write_trajectory(a.trajectory, age, a.key[b], 0, head, a.columns, false);
  }
}

// Row b of advance_: the norms of x - x0 from the step's stats, the step's columns of the
// trajectory row X_age (NaN where the row took no step), then age += active.
ADVFAST_HD void advance_row(const AdvanceArgs& a, int64_t b) {
  const float* stats = a.stats + b * kStepStats;
  for (int k = 0; k < 3; ++k) a.norms[3 * b + k] = stats[kDeltaL1 + k];
  const Trajectory& t = a.trajectory;
  if (t.present) {
    write_trajectory(t, a.age[b], a.key[b], t.W - a.columns.count, stats, a.columns,
                     !a.active[b]);
  }
  a.age[b] += a.active[b] ? 1 : 0;
}

// Row b of cw_observe_ (for a row that would step: active): its loss ||X' - X0||^2 +
// c max(kappa - margin, 0) in float32 as the original; at an abort check (every check_every
// iterations of the run, with abort_early) the run has stalled when that loss exceeds 0.9999 times
// the previous check's; an image whose margin exceeds kappa, in a run that has not stalled, is a
// success and becomes the best where its squared L2 (norms' L2 squared) is below the best so far
// (`better`).  The run
// ends (paused) when it stalled or after `steps` iterations; otherwise the row steps and its
// iteration count moves on.
ADVFAST_HD void cw_observe_row(const CWObserveArgs& a, int64_t b) {
  const bool live = a.active[b];
  const float margin = a.head[b * kHeadStats + kMargin];
  const float l2 = a.norms[3 * b + 1];
  const float l2sq = l2 * l2;  // one squared L2 for the loss and the best, as the original's
  const float gap = a.kappa - margin;
  const float loss = l2sq + a.constant[b] * (gap < 0.f ? 0.f : gap);  // NaN stays NaN
  const int64_t age = a.inner_age[b];
  const bool check = live && a.abort_early && age % a.check_every == 0;
  const bool stalled = check && loss > a.previous_loss[b] * 0.9999f;
  if (check) a.previous_loss[b] = loss;
  const bool success = live && !stalled && margin > a.kappa;
  const bool better = success && l2sq < a.best_l2[b];
  if (better) {
    a.best_l2[b] = l2sq;
    a.best_constant[b] = a.constant[b];
  }
  a.succeeded[b] = a.succeeded[b] || success;
  const bool ended = live && (stalled || age + 1 >= a.steps);
  a.paused[b] = a.paused[b] || ended;
  a.stepping[b] = live && !ended;
  a.better[b] = better;
  a.inner_age[b] = age + (a.stepping[b] ? 1 : 0);
}

}  // namespace advfast
