"""The 2-D toy (Fig. 6) and Theorem IV.2."""

import json

import numpy as np
import pytest
import torch

from advfast import cli
from advfast.experiments import toy


@pytest.fixture(scope="module")
def trained():
    points, labels = toy.circles(seed=0)
    model = toy.train(points, labels, seed=0)
    return model, points, labels


def test_training_is_deterministic_and_accurate(trained):
    model, points, labels = trained
    again = toy.train(points, labels, seed=0)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters()))
    with torch.no_grad():
        assert (model(points).argmax(1) == labels).float().mean() > 0.95


def test_gradients_match_finite_differences(trained):
    model, _, _ = trained
    model64 = toy.ToyMLP().double()
    model64.load_state_dict(model.state_dict())
    x = torch.tensor([[0.3, -0.2], [-0.8, 0.5], [0.05, 0.1]], dtype=torch.float64)
    g = toy.gradients(model64, x)

    def ce(p):
        return torch.nn.functional.cross_entropy(model64(p), torch.full((len(p),), toy.TARGET),
                                                 reduction="sum")

    h = 1e-6
    for k in range(2):
        step = torch.zeros_like(x)
        step[:, k] = h
        for i in range(len(x)):  # per point: the sum is separable
            numeric = (ce(x[i:i + 1] + step[i:i + 1]) - ce(x[i:i + 1] - step[i:i + 1])) / (2 * h)
            assert g["ce"][i, k].item() == pytest.approx(numeric.item(), rel=1e-5, abs=1e-9)
            logit = lambda p: model64(p)[0, toy.TARGET]  # noqa: E731
            numeric = (logit(x[i:i + 1] + step[i:i + 1]) - logit(x[i:i + 1] - step[i:i + 1])) / (2 * h)
            assert g["logit"][i, k].item() == pytest.approx(numeric.item(), rel=1e-5, abs=1e-9)


def test_theorem_iv2_holds_on_the_grid(trained):
    model, _, _ = trained
    check = toy.theorem_check(toy.grids(model, steps=61))
    assert check["points"]["D1"] > 0 and check["points"]["D3"] > 0
    # Eq. 10: in D3 the CE gradient is orders of magnitude below the logit gradient
    assert check["D3_median_ce_over_logit_gradient"] < 1e-2
    # Eq. 8: in D1 grad CE = grad g_r - grad g_c, up to exactly 1 - p_r with two classes
    assert check["D1_error_within_bound"]
    assert check["D1_median_relative_error_of_eq8"] < 0.01


def test_toy_command_writes_figure_grids_and_check(tmp_path, capsys):
    out = tmp_path / "toy"
    assert cli.main(["toy", "--grid", "41", "--out", str(out)]) == 0
    assert "orders of magnitude" in capsys.readouterr().out
    check = json.loads((out / "toy.json").read_text())
    assert check["grid_steps"] == 41 and check["train_accuracy"] > 0.95
    grids = np.load(out / "toy.npz")
    assert grids["ce"].shape == (41, 41) and set(np.unique(grids["subspace"])) <= {1, 2, 3}
    assert grids["trajectory_ce"].shape[0] == 4 and grids["trajectory_ce"].shape[2] == 2
    png = (out / "fig6.png").read_bytes()
    assert png[:4] == b"\x89PNG" and len(png) > 20_000
