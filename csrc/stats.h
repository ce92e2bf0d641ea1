// The statistics columns the ops return, by name.  This header owns them: the kernels write
// them by name, ops.cpp exposes the names (torch.ops.advfast.head_stat_names / step_stat_names),
// and tests/test_op_stats_names.py checks advfast.ops.HEAD_STATS / STEP_STATS against them.
#pragma once

namespace advfast {

// loss_head's per-row statistics, the columns of its [B, kHeadStats] output.
enum HeadStat : int {
  kPred,
  kMaxProb,
  kTargetProb,
  kTargetLogit,
  kSourceProb,
  kSourceLogit,
  kRunnerUp,
  kMargin,
  kSubspace,
  kHit,
  kTargetLogprob,
  kFinite,
  kHeadStats  // the number of columns
};

// perturb_step_'s and adam_tanh_step_'s per-sample statistics, the columns of [B, kStepStats].
// (Between the kernels' passes kDeltaL2 holds the sum of squares; the root is taken last.)
// kStepL1 is the L1 the step itself added, sum |x_new - x_old| (0 for inactive samples); it is
// last so that index-based users of the first four columns keep working.
enum StepStat : int { kPL1, kDeltaL1, kDeltaL2, kDeltaLinf, kStepL1, kStepStats };

// The names, in column order, as advfast.ops.HEAD_STATS and STEP_STATS spell them.
inline constexpr const char* kHeadStatNames[kHeadStats] = {
    "pred",         "max_prob", "target_prob", "target_logit", "source_prob",    "source_logit",
    "runner_up",    "margin",   "subspace",    "hit",          "target_logprob", "finite"};
inline constexpr const char* kStepStatNames[kStepStats] = {"p_l1", "delta_l1", "delta_l2",
                                                          "delta_linf", "step_l1"};

}  // namespace advfast
