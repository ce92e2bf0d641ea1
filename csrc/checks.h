// The one validation layer of the ops: every argument of every entry point (CPU and CUDA) is
// checked here, once, so that the Python wrappers and a direct torch.ops.advfast call refuse the
// same things with the same one-line messages.  The exception types follow torch's macros:
// TORCH_CHECK_TYPE -> TypeError (a wrong dtype), TORCH_CHECK_VALUE -> ValueError (a wrong
// shape, device, range, aliasing), TORCH_CHECK_INDEX -> IndexError (a class out of range).
// Also the argument decoding shared by the backends (loss names, flat operands).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include <cfloat>
#include <cmath>
#include <initializer_list>
#include <iterator>
#include <optional>
#include <string>
#include <string_view>

#include "advfast_math.h"
#include "observe.h"

// Dispatch over the three floating types the kernels accept (float32, float16, bfloat16):
// no double kernels are instantiated, since the checks reject double anyway.
#define ADVFAST_DISPATCH_FLOATS(TYPE, NAME, ...)                     \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace advfast {

// Every scalar reaches the kernels as float32, so it must be within float32's range too (1e39 is
// a finite double; converted to float it is out of range).
inline void check_finite(double value, const char* op, const char* name) {
  TORCH_CHECK_VALUE(std::isfinite(value) && std::fabs(value) <= FLT_MAX, "advfast.", op, ": ",
                    name, " must be a finite float32 number, got ", value);
}

// An in-place output must not share memory with an input it reads (the kernels declare their
// pointers __restrict__) nor overlap itself.
// (Layouts too irregular to decide are refused only when the two share a storage.)
inline void check_no_overlap(const at::Tensor& out, const at::Tensor& in, const char* op,
                             const char* out_name, const char* in_name) {
  if (out.numel() == 0 || in.numel() == 0 || !out.storage().is_alias_of(in.storage())) return;
  TORCH_CHECK_VALUE(at::get_overlap_status(out, in) == at::MemOverlapStatus::No, "advfast.", op,
                    ": ", out_name, " is updated in place and must not share memory with ",
                    in_name);
}

// Smallest Adam eps accepted: the smallest normal float32.  A smaller eps rounds to 0 or to a
// denormal (flushed to 0 where denormals are off) in the kernels' float arithmetic, and then
// m / (sqrt(v) + eps) is 0 / 0 = NaN for an element whose m and v are still 0.
constexpr double kMinAdamEps = FLT_MIN;

inline Loss parse_loss(std::string_view loss) {
  // "ce-sign" is IFGS's loss: the head's seed is CE's; perturb_step_ applies the sign.
  if (loss == "ce" || loss == "ce-sign") return Loss::CE;
  if (loss == "logit") return Loss::LOGIT;
  TORCH_CHECK_VALUE(loss == "m-logit", "advfast: unknown loss '", loss,
                    "' (expected ce, ce-sign, logit or m-logit)");
  return Loss::M_LOGIT;
}

inline KappaMode parse_kappa_mode(std::string_view mode) {
  if (mode == "clamp") return KappaMode::CLAMP;
  TORCH_CHECK_VALUE(mode == "balance", "advfast: unknown kappa_mode '", mode,
                    "' (expected clamp or balance)");
  return KappaMode::BALANCE;
}

inline CeSeed parse_ce_seed(std::string_view ce_seed) {
  if (ce_seed == "exact") return CeSeed::EXACT;
  TORCH_CHECK_VALUE(ce_seed == "eager", "advfast: unknown ce_seed '", ce_seed,
                    "' (expected exact or eager)");
  return CeSeed::EAGER;
}

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline void check_loss_head_args(const at::Tensor& logits, const at::Tensor& target,
                                 const at::Tensor& source, double kappa, double threshold) {
  check_finite(kappa, "loss_head", "kappa");
  check_finite(threshold, "loss_head", "threshold");
  TORCH_CHECK_TYPE(is_supported_float(logits.scalar_type()),
                   "advfast.loss_head: logits must be float32, float16 or bfloat16, got ",
                   logits.scalar_type());
  TORCH_CHECK_VALUE(logits.dim() == 2, "advfast.loss_head: logits must be [B, M], got ",
                    logits.sizes());
  TORCH_CHECK_VALUE(logits.size(1) >= 2, "advfast.loss_head: need at least 2 classes, got ",
                    logits.size(1));
  for (const at::Tensor* t : {&target, &source}) {
    TORCH_CHECK_TYPE(t->scalar_type() == at::kLong,
                     "advfast.loss_head: target and source must be int64, got ",
                     t->scalar_type());
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == logits.size(0),
                      "advfast.loss_head: target and source must be [B] with B = ",
                      logits.size(0), ", got ", t->sizes());
    TORCH_CHECK_VALUE(t->device() == logits.device(),
                      "advfast.loss_head: target and source must be on ", logits.device());
  }
}

// [B] per-sample operand checks: dtype, shape, device.  A wrong dtype is a ValueError here, as
// for a wrong shape: these are flags and counts of the samples, not data of a float type.
inline void check_per_sample(const at::Tensor& t, at::ScalarType dtype, const at::Tensor& like,
                             const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.scalar_type() == dtype, "advfast.", op, ": ", name, " must be ", dtype,
                   ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == like.size(0), "advfast.", op, ": ", name,
                    " must be [B] with B = ", like.size(0), ", got ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == like.device(), "advfast.", op, ": ", name, " must be on ",
                    like.device());
}

inline void check_perturb_step_args(const at::Tensor& x, const at::Tensor& grad,
                                    const at::Tensor& x0, const std::optional<at::Tensor>& active,
                                    const std::optional<double>& alpha,
                                    const std::optional<double>& beta, double lo, double hi,
                                    const std::optional<double>& eps, bool exact_l1) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, "advfast.perturb_step_: x must be float32, got ",
                   x.scalar_type());
  TORCH_CHECK_TYPE(x0.scalar_type() == at::kFloat,
                   "advfast.perturb_step_: x0 must be float32, got ", x0.scalar_type());
  TORCH_CHECK_TYPE(is_supported_float(grad.scalar_type()),
                   "advfast.perturb_step_: grad must be float32, float16 or bfloat16, got ",
                   grad.scalar_type());
  TORCH_CHECK_VALUE(x.dim() >= 1, "advfast.perturb_step_: x must be [B, ...]");
  TORCH_CHECK_VALUE(grad.sizes() == x.sizes() && x0.sizes() == x.sizes(),
                    "advfast.perturb_step_: x, grad and x0 must have one shape, got ", x.sizes(),
                    ", ", grad.sizes(), ", ", x0.sizes());
  TORCH_CHECK_VALUE(grad.device() == x.device() && x0.device() == x.device(),
                    "advfast.perturb_step_: x, grad and x0 must be on one device");
  TORCH_CHECK_VALUE(alpha.has_value() != beta.has_value(),
                    "advfast.perturb_step_: give exactly one of alpha or beta");
  TORCH_CHECK_VALUE(!exact_l1 || beta.has_value(),
                    "advfast.perturb_step_: exact_l1 is for the equal perturbation rule (beta), "
                    "not alpha");
  for (const auto& [value, name] : {std::pair{alpha, "alpha"}, std::pair{beta, "beta"},
                                    std::pair{eps, "eps"}}) {
    if (value.has_value()) check_finite(*value, "perturb_step_", name);
  }
  check_finite(lo, "perturb_step_", "lo");
  check_finite(hi, "perturb_step_", "hi");
  TORCH_CHECK_VALUE(lo <= hi, "advfast.perturb_step_: lo must not exceed hi");
  TORCH_CHECK_VALUE(!eps.has_value() || *eps >= 0.0,
                    "advfast.perturb_step_: eps must be non-negative");
  TORCH_CHECK_VALUE(at::has_internal_overlap(x) != at::MemOverlap::Yes,
                    "advfast.perturb_step_: x is updated in place and must not overlap itself");
  check_no_overlap(x, grad, "perturb_step_", "x", "grad");
  check_no_overlap(x, x0, "perturb_step_", "x", "x0");
  if (active.has_value()) {
    check_per_sample(*active, at::kBool, x, "perturb_step_", "active");
  }
}

// True when the tensors (one shape) can be walked as flat per-sample memory without copies:
// one dense, non-overlapping layout shared by all (contiguous, channels_last, ...), with the
// batch as the outermost dimension.  Element order inside a sample does not matter to the
// element-wise updates.
inline bool shares_flat_sample_layout(std::initializer_list<const at::Tensor*> tensors) {
  const at::Tensor& first = **tensors.begin();
  bool contiguous = true, same = true;
  for (const at::Tensor* t : tensors) {
    contiguous = contiguous && t->is_contiguous();
    same = same && t->strides() == first.strides();
  }
  if (contiguous) return true;
  const int64_t per_sample = first.size(0) == 0 ? 0 : first.numel() / first.size(0);
  return same && first.is_non_overlapping_and_dense() &&
         (first.size(0) <= 1 || first.stride(0) == per_sample);
}

// A tensor as the kernels walk it: itself when the layouts are shared, else a contiguous copy.
inline at::Tensor flat(const at::Tensor& t, bool shared) { return shared ? t : t.contiguous(); }

// loss_head's outputs, float32 on the logits' device: seed [B, M] and stats [B, kHeadStats].
inline std::tuple<at::Tensor, at::Tensor> empty_head_outputs(const at::Tensor& logits) {
  auto opts = logits.options().dtype(at::kFloat);
  return {at::empty({logits.size(0), logits.size(1)}, opts),
          at::empty({logits.size(0), kHeadStats}, opts)};
}

// perturb_step_'s operands as the kernels walk them: flat per-sample memory, shared by x,
// grad and x0 (copies only when their layouts differ), and [B] active flags or undefined.
struct StepOperands {
  at::Tensor x, grad, x0, active;
  int64_t per_sample;
};

inline StepOperands step_operands(const at::Tensor& x, const at::Tensor& grad,
                                  const at::Tensor& x0, const std::optional<at::Tensor>& active) {
  const bool shared = shares_flat_sample_layout({&x, &grad, &x0});
  return StepOperands{flat(x, shared), flat(grad, shared), flat(x0, shared),
                      active.has_value() ? active->contiguous() : at::Tensor(),
                      x.numel() / x.size(0)};
}

inline void check_adam_tanh_args(const at::Tensor& w, const at::Tensor& m, const at::Tensor& v,
                                 const at::Tensor& x, const at::Tensor& grad,
                                 const at::Tensor& x0, const at::Tensor& c, const at::Tensor& t,
                                 const std::optional<at::Tensor>& active, double lr,
                                 double beta1, double beta2, double eps) {
  constexpr const char* op = "adam_tanh_step_";
  for (const auto& [tensor, name] : {std::pair{&w, "w"}, std::pair{&m, "m"}, std::pair{&v, "v"},
                                     std::pair{&x, "x"}, std::pair{&x0, "x0"}}) {
    TORCH_CHECK_TYPE(tensor->scalar_type() == at::kFloat, "advfast.", op, ": ", name,
                     " must be float32, got ", tensor->scalar_type());
    TORCH_CHECK_VALUE(tensor->sizes() == w.sizes(), "advfast.", op, ": ", name,
                      " must have the shape of w, ", w.sizes(), ", got ", tensor->sizes());
    TORCH_CHECK_VALUE(tensor->device() == w.device(), "advfast.", op,
                      ": all tensors must be on one device");
  }
  TORCH_CHECK_TYPE(is_supported_float(grad.scalar_type()), "advfast.", op,
                   ": grad must be float32, float16 or bfloat16, got ", grad.scalar_type());
  TORCH_CHECK_VALUE(grad.sizes() == w.sizes() && grad.device() == w.device(), "advfast.", op,
                    ": grad must have the shape and device of w");
  TORCH_CHECK_VALUE(w.dim() >= 1, "advfast.", op, ": w must be [B, ...]");
  check_per_sample(c, at::kFloat, w, op, "c");
  check_per_sample(t, at::kLong, w, op, "step");
  if (active.has_value()) check_per_sample(*active, at::kBool, w, op, "active");
  for (const auto& [value, name] : {std::pair{lr, "lr"}, std::pair{beta1, "beta1"},
                                    std::pair{beta2, "beta2"}, std::pair{eps, "eps"}}) {
    check_finite(value, op, name);
  }
  TORCH_CHECK_VALUE(lr > 0, "advfast.", op, ": lr must be positive, got ", lr);
  TORCH_CHECK_VALUE(eps >= kMinAdamEps, "advfast.", op, ": eps must be at least ", kMinAdamEps,
                    " (the smallest normal float32), got ", eps);
  TORCH_CHECK_VALUE(beta1 >= 0 && beta1 < 1 && beta2 >= 0 && beta2 < 1, "advfast.", op,
                    ": beta1 and beta2 must lie in [0, 1)");
  const std::pair<const at::Tensor*, const char*> written[] = {
      {&w, "w"}, {&m, "m"}, {&v, "v"}, {&x, "x"}};
  for (size_t i = 0; i < 4; ++i) {
    TORCH_CHECK_VALUE(at::has_internal_overlap(*written[i].first) != at::MemOverlap::Yes,
                      "advfast.", op, ": ", written[i].second,
                      " is updated in place and must not overlap itself");
    for (size_t j = i + 1; j < 4; ++j) {
      check_no_overlap(*written[i].first, *written[j].first, op, written[i].second,
                       written[j].second);
    }
    check_no_overlap(*written[i].first, grad, op, written[i].second, "grad");
    check_no_overlap(*written[i].first, x0, op, written[i].second, "x0");
  }
}

// adam_tanh_step_'s per-sample values that would make NaN in an active sample: step < 1 (the
// bias correction 1 - beta1^0 = 0 divides) and a non-finite c.  Inactive samples are not
// stepped, so their values are not used (the engine keeps step = 0 for a sample not yet
// started).  CPU only: on CUDA reading them here would synchronise with the device, so the
// CUDA kernel leaves such samples unstepped instead.
inline void check_adam_tanh_contents_cpu(const at::Tensor& c, const at::Tensor& step,
                                         const bool* active) {
  const float* cp = c.const_data_ptr<float>();
  const int64_t* tp = step.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < c.numel(); ++b) {
    if (active != nullptr && !active[b]) continue;
    TORCH_CHECK_VALUE(tp[b] >= 1, "advfast.adam_tanh_step_: step[", b, "] = ", tp[b],
                      " must be at least 1");
    TORCH_CHECK_VALUE(std::isfinite(cp[b]), "advfast.adam_tanh_step_: c[", b, "] = ", cp[b],
                      " must be finite");
  }
}

// adam_tanh_step_'s operands as the kernels walk them (see StepOperands): copies only when the
// layouts differ, and then write_back puts the updated state into the caller's tensors.
struct AdamOperands {
  at::Tensor w, m, v, x, grad, x0, c, step, active;

  const bool* active_ptr() const {
    return active.defined() ? active.const_data_ptr<bool>() : nullptr;
  }

  void write_back(at::Tensor& w_out, at::Tensor& m_out, at::Tensor& v_out,
                  at::Tensor& x_out) const {
    for (auto [out, used] : {std::pair{&w_out, &w}, std::pair{&m_out, &m},
                             std::pair{&v_out, &v}, std::pair{&x_out, &x}}) {
      if (!used->is_same(*out)) out->copy_(*used);
    }
  }
};

inline AdamOperands adam_operands(const at::Tensor& w, const at::Tensor& m, const at::Tensor& v,
                                  const at::Tensor& x, const at::Tensor& grad,
                                  const at::Tensor& x0, const at::Tensor& c,
                                  const at::Tensor& step,
                                  const std::optional<at::Tensor>& active) {
  const bool shared = shares_flat_sample_layout({&w, &m, &v, &x, &grad, &x0});
  return AdamOperands{flat(w, shared), flat(m, shared), flat(v, shared), flat(x, shared),
                      flat(grad, shared), flat(x0, shared), c.contiguous(), step.contiguous(),
                      active.has_value() ? active->contiguous() : at::Tensor()};
}

inline AdamConfig adam_config(double beta1, double beta2, double eps) {
  return AdamConfig{static_cast<float>(beta1), static_cast<float>(beta2),
                    static_cast<float>(eps)};
}

// ---- observe_ and advance_ (csrc/observe.h): the engine's bookkeeping ----------------------

inline void check_rows(const at::Tensor& t, at::ScalarType dtype, int64_t B, int64_t width,
                       const at::Tensor& like, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.scalar_type() == dtype, "advfast.", op, ": ", name, " must be ", dtype,
                    ", got ", t.scalar_type());
  const bool shaped = width == 0 ? t.dim() == 1 && t.size(0) == B
                                 : t.dim() == 2 && t.size(0) == B && t.size(1) == width;
  TORCH_CHECK_VALUE(shaped, "advfast.", op, ": ", name, " must be [", B,
                    width == 0 ? "" : ", ", width == 0 ? std::string() : std::to_string(width),
                    "], got ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == like.device(), "advfast.", op, ": ", name, " must be on ",
                    like.device());
}

inline StopRule parse_stop(std::string_view stop) {
  if (stop == "never") return StopRule::NEVER;
  if (stop == "flip") return StopRule::FLIP;
  TORCH_CHECK_VALUE(stop == "confidence", "advfast.observe_: unknown stop '", stop,
                    "' (expected never, flip or confidence)");
  return StopRule::CONFIDENCE;
}

// The trajectory columns an op copies from its stats (width `stats` columns), in order.
inline Columns parse_columns(c10::IntArrayRef columns, int64_t stats, const char* op) {
  TORCH_CHECK_VALUE(columns.size() <= static_cast<size_t>(kMaxColumns), "advfast.", op,
                    ": at most ", kMaxColumns, " columns, got ", columns.size());
  Columns out{};
  out.count = static_cast<int64_t>(columns.size());
  for (size_t j = 0; j < columns.size(); ++j) {
    TORCH_CHECK_INDEX(columns[j] >= 0 && columns[j] < stats, "advfast.", op, ": column ",
                      columns[j], " is outside [0, ", stats, ")");
    out.index[j] = columns[j];
  }
  return out;
}

// A trajectory [T, Bt, W] float32 with at least `columns` columns and its [B] int64 keys, both
// or neither; then no written tensor may overlap another or what the op reads.
inline void check_trajectory(const std::optional<at::Tensor>& trajectory,
                             const std::optional<at::Tensor>& key, const Columns& columns,
                             const at::Tensor& like, const char* op) {
  TORCH_CHECK_VALUE(trajectory.has_value() == key.has_value(), "advfast.", op,
                    ": give trajectory and key together, or neither");
  if (!trajectory.has_value()) return;
  const at::Tensor& t = *trajectory;
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, "advfast.", op,
                   ": trajectory must be float32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 3 && t.size(2) >= columns.count, "advfast.", op,
                    ": trajectory must be [T, B, W] with W >= ", columns.count, ", got ",
                    t.sizes());
  TORCH_CHECK_VALUE(t.device() == like.device(), "advfast.", op, ": trajectory must be on ",
                    like.device());
  TORCH_CHECK_VALUE(at::has_internal_overlap(t) != at::MemOverlap::Yes, "advfast.", op,
                    ": trajectory is updated in place and must not overlap itself");
  check_rows(*key, at::kLong, like.size(0), 0, like, op, "key");
}

// Every written tensor against every other operand (read or written).
inline void check_written_apart(
    std::initializer_list<std::pair<const at::Tensor*, const char*>> written,
    std::initializer_list<std::pair<const at::Tensor*, const char*>> read, const char* op) {
  for (auto w = written.begin(); w != written.end(); ++w) {
    if (!w->first->defined()) continue;
    TORCH_CHECK_VALUE(at::has_internal_overlap(*w->first) != at::MemOverlap::Yes, "advfast.",
                      op, ": ", w->second, " is updated in place and must not overlap itself");
    for (auto o = std::next(w); o != written.end(); ++o) {
      if (o->first->defined()) check_no_overlap(*w->first, *o->first, op, w->second, o->second);
    }
    for (const auto& r : read) {
      if (r.first->defined()) check_no_overlap(*w->first, *r.first, op, w->second, r.second);
    }
  }
}

inline void check_observe_args(const at::Tensor& head, const at::Tensor& norms,
                               const at::Tensor& age, const at::Tensor& paused,
                               const at::Tensor& first_flip, const at::Tensor& flip_norms,
                               const at::Tensor& failure, const at::Tensor& done,
                               const std::optional<at::Tensor>& trajectory,
                               const std::optional<at::Tensor>& key, const Columns& columns) {
  constexpr const char* op = "observe_";
  TORCH_CHECK_TYPE(head.scalar_type() == at::kFloat, "advfast.observe_: head must be float32, got ",
                   head.scalar_type());
  TORCH_CHECK_VALUE(head.dim() == 2 && head.size(1) == kHeadStats,
                    "advfast.observe_: head must be loss_head's [B, ", kHeadStats, "] stats, got ",
                    head.sizes());
  const int64_t B = head.size(0);
  check_rows(norms, at::kFloat, B, 3, head, op, "norms");
  check_rows(flip_norms, at::kFloat, B, 3, head, op, "flip_norms");
  check_rows(age, at::kLong, B, 0, head, op, "age");
  check_rows(first_flip, at::kLong, B, 0, head, op, "first_flip");
  check_rows(failure, at::kLong, B, 0, head, op, "failure");
  check_rows(paused, at::kBool, B, 0, head, op, "paused");
  check_rows(done, at::kBool, B, 0, head, op, "done");
  check_trajectory(trajectory, key, columns, head, op);
  const at::Tensor none, traj = trajectory.value_or(none), keys = key.value_or(none);
  check_written_apart({{&first_flip, "first_flip"}, {&flip_norms, "flip_norms"},
                       {&failure, "failure"}, {&done, "done"}, {&traj, "trajectory"}},
                      {{&head, "head"}, {&norms, "norms"}, {&age, "age"}, {&paused, "paused"},
                       {&keys, "key"}}, op);
}

inline void check_advance_args(const at::Tensor& stats, const at::Tensor& active,
                               const at::Tensor& age, const at::Tensor& norms,
                               const std::optional<at::Tensor>& trajectory,
                               const std::optional<at::Tensor>& key, const Columns& columns) {
  constexpr const char* op = "advance_";
  TORCH_CHECK_TYPE(stats.scalar_type() == at::kFloat,
                   "advfast.advance_: stats must be float32, got ", stats.scalar_type());
  TORCH_CHECK_VALUE(stats.dim() == 2 && stats.size(1) == kStepStats,
                    "advfast.advance_: stats must be a step's [B, ", kStepStats, "] stats, got ",
                    stats.sizes());
  const int64_t B = stats.size(0);
  check_rows(active, at::kBool, B, 0, stats, op, "active");
  check_rows(age, at::kLong, B, 0, stats, op, "age");
  check_rows(norms, at::kFloat, B, 3, stats, op, "norms");
  check_trajectory(trajectory, key, columns, stats, op);
  const at::Tensor none, traj = trajectory.value_or(none), keys = key.value_or(none);
  check_written_apart({{&age, "age"}, {&norms, "norms"}, {&traj, "trajectory"}},
                      {{&stats, "stats"}, {&active, "active"}, {&keys, "key"}}, op);
}

inline void check_cw_observe_args(const at::Tensor& head, const at::Tensor& norms,
                                  const at::Tensor& constant, const at::Tensor& active,
                                  const at::Tensor& inner_age,
                                  const at::Tensor& previous_loss, const at::Tensor& best_l2,
                                  const at::Tensor& best_constant, const at::Tensor& succeeded,
                                  const at::Tensor& paused, int64_t steps,
                                  int64_t check_every) {
  constexpr const char* op = "cw_observe_";
  TORCH_CHECK_TYPE(head.scalar_type() == at::kFloat,
                   "advfast.cw_observe_: head must be float32, got ", head.scalar_type());
  TORCH_CHECK_VALUE(head.dim() == 2 && head.size(1) == kHeadStats,
                    "advfast.cw_observe_: head must be loss_head's [B, ", kHeadStats,
                    "] stats, got ", head.sizes());
  const int64_t B = head.size(0);
  check_rows(norms, at::kFloat, B, 3, head, op, "norms");
  for (const auto& [t, name] : {std::pair{&constant, "constant"},
                                std::pair{&previous_loss, "previous_loss"},
                                std::pair{&best_l2, "best_l2"},
                                std::pair{&best_constant, "best_constant"}}) {
    check_rows(*t, at::kFloat, B, 0, head, op, name);
  }
  check_rows(inner_age, at::kLong, B, 0, head, op, "inner_age");
  for (const auto& [t, name] : {std::pair{&active, "active"}, std::pair{&succeeded, "succeeded"},
                                std::pair{&paused, "paused"}}) {
    check_rows(*t, at::kBool, B, 0, head, op, name);
  }
  TORCH_CHECK_VALUE(steps >= 1 && check_every >= 1, "advfast.cw_observe_: steps and check_every "
                    "must be positive, got ", steps, " and ", check_every);
  check_written_apart({{&inner_age, "inner_age"}, {&previous_loss, "previous_loss"},
                       {&best_l2, "best_l2"}, {&best_constant, "best_constant"},
                       {&succeeded, "succeeded"}, {&paused, "paused"}},
                      {{&head, "head"}, {&norms, "norms"}, {&constant, "constant"},
                       {&active, "active"}}, op);
}

// A written operand as the kernels walk it: contiguous (the caller's tensor itself when it is),
// copied back into the caller's tensor afterwards when it was not.
struct Written {
  at::Tensor caller, used;
  explicit Written(const at::Tensor& t) : caller(t), used(t.contiguous()) {}
  template <typename T>
  T* ptr() { return used.data_ptr<T>(); }
  void write_back() {
    if (!used.is_same(caller)) caller.copy_(used);
  }
};

inline Trajectory trajectory_of(const std::optional<at::Tensor>& t) {
  if (!t.has_value()) return Trajectory{false, nullptr, 0, 0, 0, 0, 0, 0};
  return Trajectory{true,         t->data_ptr<float>(), t->stride(0), t->stride(1),
                    t->stride(2), t->size(0),           t->size(1),   t->size(2)};
}

inline const int64_t* keys_of(const at::Tensor& key) {
  return key.defined() ? key.const_data_ptr<int64_t>() : nullptr;
}

// observe_'s, advance_'s and cw_observe_'s operands as both backends walk them: contiguous reads,
// written tensors as Written (write_back after the kernel), and the kernels' argument struct.
struct ObserveOperands {
  at::Tensor head, norms, age, paused, key;
  Written first_flip, flip_norms, failure, done;
  ObserveArgs args;

  ObserveOperands(const at::Tensor& head_, const at::Tensor& norms_, const at::Tensor& age_,
                  const at::Tensor& paused_, const at::Tensor& first_flip_,
                  const at::Tensor& flip_norms_, const at::Tensor& failure_,
                  const at::Tensor& done_, const std::optional<at::Tensor>& trajectory,
                  const std::optional<at::Tensor>& key_, const Columns& cols, at::Tensor& active,
                  int64_t iterations, StopRule rule, bool controlled)
      : head(head_.contiguous()), norms(norms_.contiguous()), age(age_.contiguous()),
        paused(paused_.contiguous()), key(key_.has_value() ? key_->contiguous() : at::Tensor()),
        first_flip(first_flip_), flip_norms(flip_norms_), failure(failure_), done(done_),
        args{head.const_data_ptr<float>(), norms.const_data_ptr<float>(),
             age.const_data_ptr<int64_t>(), keys_of(key), paused.const_data_ptr<bool>(),
             first_flip.ptr<int64_t>(), failure.ptr<int64_t>(), flip_norms.ptr<float>(),
             done.ptr<bool>(), active.data_ptr<bool>(), head.size(0), iterations, rule,
             controlled, trajectory_of(trajectory), cols} {}

  void write_back() {
    for (Written* w : {&first_flip, &flip_norms, &failure, &done}) w->write_back();
  }
};

struct AdvanceOperands {
  at::Tensor stats, active, key;
  Written age, norms;
  AdvanceArgs args;

  AdvanceOperands(const at::Tensor& stats_, const at::Tensor& active_, const at::Tensor& age_,
                  const at::Tensor& norms_, const std::optional<at::Tensor>& trajectory,
                  const std::optional<at::Tensor>& key_, const Columns& cols)
      : stats(stats_.contiguous()), active(active_.contiguous()),
        key(key_.has_value() ? key_->contiguous() : at::Tensor()), age(age_), norms(norms_),
        args{stats.const_data_ptr<float>(), active.const_data_ptr<bool>(), keys_of(key),
             age.ptr<int64_t>(), norms.ptr<float>(), stats.size(0), trajectory_of(trajectory),
             cols} {}

  void write_back() {
    age.write_back();
    norms.write_back();
  }
};

struct CWObserveOperands {
  at::Tensor head, norms, constant, active;
  Written inner_age, previous_loss, best_l2, best_constant, succeeded, paused;
  CWObserveArgs args;

  CWObserveOperands(const at::Tensor& head_, const at::Tensor& norms_,
                    const at::Tensor& constant_, const at::Tensor& active_,
                    const at::Tensor& inner_age_, const at::Tensor& previous_loss_,
                    const at::Tensor& best_l2_, const at::Tensor& best_constant_,
                    const at::Tensor& succeeded_, const at::Tensor& paused_,
                    at::Tensor& stepping, at::Tensor& better, double kappa, int64_t steps,
                    int64_t check_every, bool abort_early)
      : head(head_.contiguous()), norms(norms_.contiguous()), constant(constant_.contiguous()),
        active(active_.contiguous()), inner_age(inner_age_), previous_loss(previous_loss_),
        best_l2(best_l2_), best_constant(best_constant_), succeeded(succeeded_), paused(paused_),
        args{head.const_data_ptr<float>(), norms.const_data_ptr<float>(),
             constant.const_data_ptr<float>(), active.const_data_ptr<bool>(),
             inner_age.ptr<int64_t>(), previous_loss.ptr<float>(), best_l2.ptr<float>(),
             best_constant.ptr<float>(), succeeded.ptr<bool>(), paused.ptr<bool>(),
             stepping.data_ptr<bool>(), better.data_ptr<bool>(), head.size(0), steps,
             check_every, static_cast<float>(kappa), abort_early} {}

  void write_back() {
    for (Written* w : {&inner_age, &previous_loss, &best_l2, &best_constant, &succeeded, &paused}) {
      w->write_back();
    }
  }
};

}  // namespace advfast
