"""The paper's three attacks (advfast.attacks) against independent implementations written
here, scipy's L-BFGS-B and torchattacks, on small models whose behaviour is known."""

import math

import pytest
import torch
from torch import nn

from advfast import attacks
from fixtures import Smooth, smooth_batch, two_pixel_model


# --- IFGS ---------------------------------------------------------------------------------

def plain_bim(model, x0, target, eps, alpha, steps, start=None):
    """Targeted BIM / PGD (Eq. 2), written directly."""
    x = x0.clone() if start is None else start.clone()
    for _ in range(steps):
        x.requires_grad_(True)
        loss = -nn.functional.cross_entropy(model(x), target)
        (grad,) = torch.autograd.grad(loss, x)
        with torch.no_grad():
            x = x + alpha * grad.sign()
            x = torch.min(torch.max(x, x0 - eps), x0 + eps).clamp(0, 1)
    return x.detach()


@pytest.mark.parametrize("eps,alpha,steps", [(0.03, 0.01, 10), (0.1, 0.02, 25), (0.3, 0.05, 7)])
def test_ifgs_equals_a_plain_bim_loop(eps, alpha, steps):
    model = Smooth()
    x0, target, source = smooth_batch(model)
    ours = attacks.IFGS(model, eps=eps, alpha=alpha, steps=steps)(x0, target, source)
    torch.testing.assert_close(ours.adversarial, plain_bim(model, x0, target, eps, alpha, steps),
                               atol=1e-6, rtol=0)
    assert (ours.adversarial - x0).abs().max() <= eps + 1e-6
    assert ours.constant is None


def test_ifgs_equals_torchattacks_bim_and_pgd():
    torchattacks = pytest.importorskip("torchattacks")
    model = Smooth()
    x0, target, source = smooth_batch(model, n=8)
    bim = torchattacks.BIM(model, eps=0.1, alpha=0.02, steps=15)
    bim.set_mode_targeted_by_label(quiet=True)
    ours = attacks.IFGS(model, eps=0.1, alpha=0.02, steps=15)(x0, target, source)
    torch.testing.assert_close(ours.adversarial, bim(x0, target), atol=1e-6, rtol=0)
    pgd = torchattacks.PGD(model, eps=0.1, alpha=0.02, steps=15, random_start=True)
    pgd.set_mode_targeted_by_label(quiet=True)
    torch.manual_seed(11)
    theirs = pgd(x0, target)
    torch.manual_seed(11)  # the same uniform draw for the start
    ours = attacks.IFGS(model, eps=0.1, alpha=0.02, steps=15, random_start=True)(x0, target,
                                                                                 source)
    torch.testing.assert_close(ours.adversarial, theirs, atol=1e-6, rtol=0)


def test_ifgs_with_a_stop_rule_stops_at_the_flip():
    model = Smooth()
    x0, target, source = smooth_batch(model, n=10)
    never = attacks.IFGS(model, eps=0.5, alpha=0.02, steps=60)(x0, target, source)
    flip = attacks.IFGS(model, eps=0.5, alpha=0.02, steps=60, stop="flip",
                        compact_every=3)(x0, target, source)
    flipped = never.first_flip >= 0
    assert flipped.any() and torch.equal(flip.first_flip, never.first_flip)
    assert torch.equal(flip.steps[flipped], never.first_flip[flipped])


# --- Carlini-Wagner L2 --------------------------------------------------------------------

def plain_cw(model, x0, target, c, kappa, steps, lr, search_steps, abort_early):
    """Carlini and Wagner's L2 attack on one sample, written directly: Adam on w (one
    torch.optim.Adam per run), the same c schedule and early abort as their code."""
    lower, upper = 0.0, 1e10
    best_l2, best_x, best_c = math.inf, x0.clone(), None
    w0 = torch.atanh((2 * x0 - 1) * (1 - 1e-6))
    for outer in range(search_steps):
        if search_steps >= 10 and outer == search_steps - 1:
            c = upper
        w = w0.clone().requires_grad_(True)
        adam = torch.optim.Adam([w], lr=lr)
        previous, found = math.inf, False
        for k in range(steps):
            x = (torch.tanh(w) + 1) / 2
            logits = model(x)[0]
            margin = logits[target] - torch.cat([logits[:target], logits[target + 1:]]).max()
            l2 = ((x - x0) ** 2).sum()
            loss = l2 + c * torch.clamp(kappa - margin, min=0)
            if abort_early and k % max(steps // 10, 1) == 0:
                if loss.item() > previous * 0.9999:
                    break
                previous = loss.item()
            if margin.item() > kappa:
                found = True
                if l2.item() < best_l2:
                    best_l2, best_x, best_c = l2.item(), x.detach().clone(), c
            adam.zero_grad()
            loss.backward()
            adam.step()
        if found:
            upper = min(upper, c)
        else:
            lower = max(lower, c)
        c = (lower + upper) / 2 if upper < 1e9 else (c if found else c * 10)
    return best_x, best_l2, best_c


@pytest.mark.parametrize("kappa,abort_early,search_steps", [(0.0, True, 5), (1.0, False, 4),
                                                            (0.0, True, 10)])
def test_cw_equals_the_original_algorithm(kappa, abort_early, search_steps):
    model = Smooth()
    x0, target, source = smooth_batch(model, n=6)
    params = dict(c=0.05, kappa=kappa, steps=60, lr=0.05, binary_search_steps=search_steps,
                  abort_early=abort_early)
    ours = attacks.CarliniWagnerL2(model, compact_every=5, **params)(x0, target, source)
    succeeded = []
    for i in range(len(x0)):
        x, l2, c = plain_cw(model, x0[i:i + 1], int(target[i]), params["c"], kappa,
                            params["steps"], params["lr"], search_steps, abort_early)
        succeeded.append(c is not None)
        if c is None:
            assert torch.equal(ours.adversarial[i], x0[i]), f"sample {i}"
            continue
        assert ours.final["l2"][i].item() ** 2 == pytest.approx(l2, rel=1e-4), f"sample {i}"
        assert ours.constant[i].item() == pytest.approx(c, rel=1e-6), f"sample {i}"
        torch.testing.assert_close(ours.adversarial[i:i + 1], x, atol=1e-4, rtol=0)
    assert any(succeeded), "no sample succeeded: the comparison would prove little"
    margins = _margins(model, ours.adversarial, target)
    assert (margins[torch.tensor(succeeded)] > kappa).all()


def _margins(model, x, target):
    with torch.no_grad():
        logits = model(x)
    others = logits.scatter(1, target[:, None], -math.inf)
    return logits.gather(1, target[:, None])[:, 0] - others.max(1).values


def test_cw_early_abort_saves_iterations():
    model = Smooth()
    x0, target, source = smooth_batch(model, n=6)
    params = dict(c=0.05, steps=200, lr=0.05, binary_search_steps=3)
    aborting = attacks.CarliniWagnerL2(model, abort_early=True, **params)(x0, target, source)
    full = attacks.CarliniWagnerL2(model, abort_early=False, **params)(x0, target, source)
    assert (full.steps == 3 * 199).all()  # every run takes its 200 evaluations, 199 steps
    assert (aborting.steps < full.steps).any()


def test_on_the_cpu_a_search_restarts_an_ended_run_at_once_by_default():
    # compact_every defaults to 1 on the CPU: a run that ended restarts at the next iteration
    # instead of going through the model, stepping nowhere, until every 8th; the same images
    model = Smooth()
    x0, target, source = smooth_batch(model, n=6)
    rows = [0]
    model.register_forward_hook(lambda module, args, out: rows.__setitem__(0, rows[0]
                                                                          + len(args[0])))
    params = dict(c=0.05, steps=60, lr=0.05, binary_search_steps=5)
    results, counts = {}, {}
    for compact_every in (None, 8):
        rows[0] = 0
        attack = attacks.CarliniWagnerL2(model, compact_every=compact_every, **params)
        results[attack.compact_every] = attack(x0, target, source)
        counts[attack.compact_every] = rows[0]
    assert set(results) == {1, 8}
    assert counts[1] < counts[8]
    torch.testing.assert_close(results[1].adversarial, results[8].adversarial, atol=1e-6,
                               rtol=0)
    assert torch.equal(results[1].steps, results[8].steps)


def test_off_the_cpu_the_default_compacts_every_8_iterations():
    assert attacks.CarliniWagnerL2(Smooth().to("meta")).compact_every == 8
    assert attacks.IFGS(Smooth(), eps=0.1, alpha=0.01, steps=5).compact_every == 1


def test_cw_sample_already_at_the_target_succeeds_unmoved():
    model = Smooth()
    x0, target, source = smooth_batch(model, n=3)
    result = attacks.CarliniWagnerL2(model, steps=20, binary_search_steps=2)(x0, source, source)
    assert (result.first_flip == 0).all()
    assert (result.final["l2"] < 1e-4).all()  # the start itself succeeds: X' = X0 up to 1e-6


# --- L-BFGS --------------------------------------------------------------------------------

def scipy_minimum(model, x0, target, b):
    """Eq. 1 for one sample by scipy's L-BFGS-B, in float64."""
    from scipy.optimize import minimize

    model64 = Smooth().double()
    model64.load_state_dict(model.state_dict())
    x0 = x0.double()

    def objective(flat):
        x = torch.tensor(flat.reshape(x0.shape), requires_grad=True)
        f = b * ((x - x0) ** 2).sum() + nn.functional.cross_entropy(model64(x),
                                                                     torch.tensor([target]))
        (g,) = torch.autograd.grad(f, x)
        return f.item(), g.numpy().ravel()

    out = minimize(objective, x0.numpy().ravel(), jac=True, method="L-BFGS-B",
                   bounds=[(0.0, 1.0)] * x0.numel())
    x = torch.tensor(out.x.reshape(x0.shape))
    with torch.no_grad():
        hit = int(model64(x).argmax()) == target
    return out.fun, hit, objective


# Few iterations on purpose: L-BFGS gets there, plain projected gradient descent does not.
STEPS = 25


@pytest.mark.parametrize("b", [0.01, 0.3])
def test_lbfgs_run_reaches_scipy_lbfgsb_minimum(b):
    model = Smooth()
    x0, target, source = smooth_batch(model, n=5)
    ours = attacks.LBFGS(model, b=b, steps=STEPS).minimize(x0, target, source)
    assert torch.all(ours.constant == b)
    with torch.no_grad():
        our_hits = model(ours.adversarial).argmax(1) == target
    for i in range(len(x0)):
        best, hit, objective = scipy_minimum(model, x0[i:i + 1], int(target[i]), b)
        ours_f, _ = objective(ours.adversarial[i:i + 1].double().numpy().ravel())
        assert ours_f == pytest.approx(best, rel=1e-3), f"sample {i}"
        assert bool(our_hits[i]) == hit, f"sample {i}"
    assert ((ours.adversarial >= 0) & (ours.adversarial <= 1)).all()


def test_lbfgs_bisection_finds_the_minimal_perturbation():
    """On logits = (pixel a, pixel b), class 1 wins once b > a: from (0.6, 0.2) the smallest L2
    perturbation moves both by 0.2 (L2 = 0.2 * sqrt 2); Eq. 1's minimiser moves along that
    direction, so the largest successful b gives it."""
    model = two_pixel_model()
    x0 = torch.tensor([[[[0.6, 0.2]]]])
    result = attacks.LBFGS(model, b=0.01, steps=100, binary_search_steps=25)(
        x0, torch.tensor([1]), torch.tensor([0]))
    minimal = 0.2 * math.sqrt(2)
    assert result.final["l2"].item() == pytest.approx(minimal, rel=0.01)
    assert result.final["l2"].item() >= minimal - 1e-6
    a, b = result.adversarial.flatten().tolist()
    assert b > a and a + b == pytest.approx(0.8, abs=1e-3)
    assert result.constant.item() == pytest.approx(1.25, rel=0.05)  # b* where 0.8 b = 2 sigma(0)


# --- common contracts ---------------------------------------------------------------------

ALL = [(attacks.IFGS, dict(eps=0.1, alpha=0.01, steps=5)),
       (attacks.CarliniWagnerL2, dict(steps=10, binary_search_steps=2)),
       (attacks.LBFGS, dict(steps=10, binary_search_steps=2))]


@pytest.mark.parametrize("attack,params", ALL, ids=["ifgs", "cw", "lbfgs"])
def test_empty_batch_one_sample_and_target_already_reached(attack, params):
    model = Smooth()
    run = attack(model, **params)
    empty = run(torch.rand(0, 1, 6, 6), torch.zeros(0, dtype=torch.long))
    assert empty.adversarial.shape == (0, 1, 6, 6) and empty.first_flip.shape == (0,)
    x0, target, source = smooth_batch(model, n=1)
    one = run(x0, target, source)
    assert one.adversarial.shape == x0.shape and torch.isfinite(one.adversarial).all()
    reached = run(x0, source, source)
    assert reached.first_flip.tolist() == [0]
    records = one.records()
    assert len(records) == 1 and ("constant" in records[0]) == (attack is not attacks.IFGS)


@pytest.mark.parametrize("attack,params", [
    (attacks.IFGS, dict(eps=-0.1, alpha=0.01, steps=5)),
    (attacks.IFGS, dict(eps=0.1, alpha=0.01, steps=-1)),
    (attacks.CarliniWagnerL2, dict(c=0.0)),
    (attacks.CarliniWagnerL2, dict(kappa=-1.0)),
    (attacks.CarliniWagnerL2, dict(binary_search_steps=0)),
    (attacks.CarliniWagnerL2, dict(lr=math.nan)),
    (attacks.LBFGS, dict(b=-1.0)),
    (attacks.LBFGS, dict(history=0)),
    (attacks.LBFGS, dict(steps=2.5)),
], ids=range(9))
def test_out_of_range_attack_parameters_are_refused(attack, params):
    with pytest.raises(ValueError):
        attack(Smooth(), **params)


# --- the command line ---------------------------------------------------------------------

@pytest.mark.parametrize("attack,extra", [
    ("ifgs", ["--eps", "0.3", "--alpha", "0.02", "--iterations", "40"]),
    ("cw-l2", ["--c", "1", "--lr", "0.05", "--iterations", "100", "--binary-search-steps", "3"]),
    ("cw-l2", ["--c", "1", "--lr", "0.05", "--iterations", "60", "--binary-search-steps", "3",
               "--warm-start"]),
    ("lbfgs", ["--iterations", "30", "--binary-search-steps", "4"]),
])
def test_attack_and_generate_commands_take_every_attack(tmp_path, attack, extra):
    import csv
    import json

    from advfast import cli

    out = tmp_path / "a"
    assert cli.main(["attack", "--attack", attack, *extra, "--n", "6", "--quiet", "--out",
                     str(out)]) == 0
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert len(rows) == 6 and all(r["attack"] == attack for r in rows)
    assert sum(r["flipped"] == "True" for r in rows) >= 3
    assert ("constant" in rows[0]) == (attack != "ifgs")
    gen = tmp_path / "g"
    assert cli.main(["generate", "--attack", attack, *extra, "--n", "6", "--quiet",
                     "--shard-size", "4", "--out", str(gen)]) == 0
    manifest = [json.loads(line) for line in open(gen / "manifest.jsonl")]
    assert len(manifest) == 6 and all(m["attack"] == attack for m in manifest)
    config = json.loads((gen / "config.json").read_text())
    assert config["arguments"]["params"]["iterations"] == int(extra[extra.index("--iterations")
                                                                     + 1])
    if attack == "cw-l2":
        assert config["arguments"]["params"]["warm_start"] == ("--warm-start" in extra)


def test_options_of_another_attack_are_refused(tmp_path, capsys):
    from advfast import cli

    assert cli.main(["attack", "--attack", "lbfgs", "--lr", "0.1", "--out",
                     str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--lr does not apply to --attack lbfgs" in err and not (tmp_path / "x").exists()
