"""The stats columns have one owner, csrc/stats.h: advfast.ops' names must be the compiled
library's, in the same order."""

import pytest
import torch

from advfast import ops

pytestmark = pytest.mark.skipif(ops.backend() == "reference", reason="compiled library missing")


def test_head_stats_are_the_compiled_columns():
    assert ops.HEAD_STATS == tuple(torch.ops.advfast.head_stat_names())


def test_step_stats_are_the_compiled_columns():
    assert ops.STEP_STATS == tuple(torch.ops.advfast.step_stat_names())


def test_ops_return_one_column_per_name():
    _, stats = ops.loss_head(torch.zeros(2, 3), torch.tensor([0, 1]), torch.tensor([1, 0]), "ce")
    assert stats.shape == (2, len(ops.HEAD_STATS))
    x = torch.rand(2, 5)
    step = ops.perturb_step_(x, torch.rand(2, 5), x.clone(), sign=True, alpha=0.1)
    assert step.shape == (2, len(ops.STEP_STATS))
    exact = ops.perturb_step_(x, torch.rand(2, 5), x.clone(), sign=True, beta=0.1, exact_l1=True)
    assert exact.shape == (2, len(ops.STEP_STATS))


def test_step_l1_is_appended_after_the_original_columns():
    """Index-based users of the first four columns keep working."""
    assert ops.STEP_STATS[:4] == ("p_l1", "delta_l1", "delta_l2", "delta_linf")
    assert ops.STEP_STATS[-1] == "step_l1"
