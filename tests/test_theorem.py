"""Theorem IV.2 measured (advfast.experiments.theorem): the Jacobian, Eqs. 8-10 on cases
with a known answer, and a small run on the digits model."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from advfast.experiments import theorem


def small_cnn(classes: int) -> nn.Module:
    """A random float64 CNN on 1x6x6 images (nothing trained: the identity is exact)."""
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(64, classes)).double().eval()


def test_jacobian_matches_autograd_of_the_ce_loss():
    # (a) grad J = sum_{m != c} p_m (grad g_m - grad g_c) with our Jacobian, against autograd
    # of the CE loss itself: an independent path through the model
    model = small_cnn(10)
    x = torch.rand(5, 1, 6, 6, dtype=torch.float64)
    c = torch.tensor([0, 3, 9, 3, 7])
    logits, jac = theorem.input_jacobian(model, x)
    assert jac.shape == (5, 10, 36)
    xg = x.clone().requires_grad_(True)
    ce = nn.functional.cross_entropy(model(xg), c, reduction="sum")
    (expected,) = torch.autograd.grad(ce, xg)
    got = theorem.ce_gradient(jac, torch.softmax(logits, 1), c)
    torch.testing.assert_close(got, expected.flatten(1), rtol=1e-10, atol=1e-14)
    # and the Jacobian row by row against torch's own, for one sample
    full = torch.autograd.functional.jacobian(lambda v: model(v)[0], x[:1])
    torch.testing.assert_close(jac[0], full.reshape(10, 36), rtol=1e-12, atol=1e-14)


def identity_model(classes: int) -> nn.Module:
    """g = x: grad g_m = e_m, so every quantity of Theorem IV.2 is known in closed form."""
    model = nn.Linear(classes, classes, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.eye(classes, dtype=torch.float64))
    return model.eval()


@pytest.mark.parametrize("a", [6.0, 10.0, 20.0])
def test_eq8_and_eq10_by_hand_on_a_linear_model(a):
    # (b) logits a e_r (deep in D1, target c = 1, r = 0) or a e_c (deep in D3); the other
    # M - 1 classes get q = 1 / (e^a + M - 1) each
    M, c = 10, torch.tensor([1])
    model = identity_model(M)
    q = 1.0 / (math.exp(a) + M - 1)
    x1 = torch.zeros(1, M, dtype=torch.float64)
    x1[0, 0] = a
    logits, jac = theorem.input_jacobian(model, x1)
    probs = torch.softmax(logits, 1)
    assert int(theorem.subspace(probs, c)) == 1
    terms = theorem.eq8_terms(jac, probs, c)
    # error vector (p_r - 1) e_r + p_c e_c + q sum_{m != r, c} e_m, over ||e_r - e_c|| = sqrt 2
    assert float(terms["eq8_relative_error"]) == pytest.approx(q * math.sqrt(M * (M - 1) / 2),
                                                               rel=1e-9)
    assert float(terms["eq8_one_minus_pr"]) == pytest.approx((M - 1) * q, rel=1e-12)
    assert float(terms["eq8_error_bound"]) == pytest.approx((2 * M - 3) * q, rel=1e-9)

    x3 = torch.zeros(1, M, dtype=torch.float64)
    x3[0, 1] = a
    logits, jac = theorem.input_jacobian(model, x3)
    probs = torch.softmax(logits, 1)
    assert int(theorem.subspace(probs, c)) == 3
    terms = theorem.eq10_terms(jac, probs, c)
    # grad J = q sum_{m != c} e_m - (M - 1) q e_c, over ||grad g_c|| = 1
    assert float(terms["eq10_ratio"]) == pytest.approx(q * math.sqrt(M * (M - 1)), rel=1e-9)
    assert float(terms["eq10_one_minus_pc"]) == pytest.approx((M - 1) * q, rel=1e-12)


def test_eq9_fit_recovers_the_probabilities():
    # at a D2 point the least-squares beta is p_m (Eq. 32) when the M - 1 differences are
    # independent (d = 20 > M - 1 = 9 with random weights)
    M = 10
    model = nn.Linear(20, M, bias=False).double().eval()
    x = 0.05 * torch.randn(3, 20, dtype=torch.float64)
    c = torch.tensor([2, 5, 9])
    logits, jac = theorem.input_jacobian(model, x)
    probs = torch.softmax(logits, 1)
    assert (theorem.subspace(probs, c) == 2).all()
    terms = theorem.eq9_terms(jac, probs, c)
    assert (terms["eq9_fit_relative_residual"] < 1e-12).all()
    assert (terms["eq9_max_abs_beta_minus_p"] < 1e-12).all()
    expected = 1 - probs.gather(1, c[:, None])[:, 0]
    torch.testing.assert_close(terms["eq9_sum_abs_beta"], expected, rtol=1e-10, atol=1e-12)
    assert not terms["eq9_rank_deficient"].any()


def test_eq8_error_is_exactly_one_minus_pr_with_two_classes():
    # (c) at M = 2 Eq. 8 is the identity grad J = (1 - p_r)(grad g_r - grad g_c)
    model = small_cnn(2)
    x = 3 * torch.rand(64, 1, 6, 6, dtype=torch.float64)
    logits, jac = theorem.input_jacobian(model, x)
    probs = torch.softmax(logits, 1)
    c = 1 - probs.argmax(1)  # the target is the other class, so r != c at every point
    terms = theorem.eq8_terms(jac, probs, c)
    torch.testing.assert_close(terms["eq8_relative_error"], terms["eq8_one_minus_pr"],
                               rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(terms["eq8_error_bound"], terms["eq8_one_minus_pr"],
                               rtol=1e-12, atol=0.0)


@pytest.fixture(scope="module")
def digits_run():
    from advfast import models
    from advfast.io.selection import DigitsSource, prepare

    # one thread: these batches are tiny, and two threads fighting a busy machine's cores made
    # each step 40 times slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = models.load("digits")
        chosen, _ = prepare(model, DigitsSource("test"), 16, seed=0)
        return theorem.collect(model, chosen.images, chosen.targets, iterations=60, beta=0.1,
                               stride=6)
    finally:
        torch.set_num_threads(threads)


def test_measure_on_digits_visits_all_three_subspaces(digits_run):
    # (d) from D1 through D2 into D3, with a finite median for every quantity
    result = theorem.summarise(digits_run)
    json.dumps({"theorem_iv2": result}, allow_nan=False)  # strict JSON
    assert all(result["points"][k] > 0 for k in ("D1", "D2", "D3"))
    assert sum(result["points"].values()) == 16 * 11
    for name in theorem.QUANTITIES:
        assert result[name]["count"] > 0 and math.isfinite(result[name]["median"]), name
        assert result[name]["q25"] <= result[name]["median"] <= result[name]["q75"]
    assert result["eq8_share_within_bound"] == 1.0  # the bound is exact algebra
    assert result["eq9_fit_relative_residual"]["max"] < 1e-10  # grad J is in the span
    assert result["eq9_sum_abs_beta"]["max"] < 1


def test_figure_is_a_png(digits_run, tmp_path):
    path = tmp_path / "theorem.png"
    theorem.figure({"digits": digits_run}, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_distribution_of_nothing_is_strict_json():
    empty = theorem.distribution(np.zeros(0))
    assert empty["count"] == 0 and empty["median"] is None
    json.dumps(empty, allow_nan=False)
    assert theorem.distribution(np.array([1.0, np.nan]))["nonfinite"] == 1


def test_table1_reports_theorem_iv2_measured_on_its_inputs(tmp_path):
    import json

    from advfast import cli

    out = tmp_path / "t1"
    assert cli.main(["table1", "--n", "8", "--iterations", "40", "--out", str(out),
                     "--quiet"]) == 0
    measured = json.loads((out / "table1.json").read_text())["theorem_iv2"]
    for prefix in ("eq8", "eq9", "eq10"):
        assert any(key.startswith(prefix) for key in measured)
    assert sum(measured["points"].values()) > 0 and (out / "theorem_iv2.png").exists()
