"""advfast's Carlini-Wagner L2 against a line-by-line port of Carlini's original ``l2_attack.py``
(``CarliniL2.attack_batch``), one image at a time, on the built-in digits model.

The port (:func:`carlini_l2`) is written from the original's structure, not from advfast's
code.  Details ported:

* tanh space: ``timg = arctanh((x - boxplus) / boxmul * 0.999999)`` with the box [0, 1]
  (boxmul = boxplus = 0.5), so w0 = atanh((2x - 1)(1 - 1e-6)) and X' = (tanh(w) + 1) / 2; the
  optimised ``modifier`` starts at 0 (Adam on modifier = Adam on w); the distance is measured
  to ``tanh(timg) * boxmul + boxplus`` (the reconstructed original image), as the original does.
* loss = l2dist + const * max(0, other - real + CONFIDENCE) with ``other`` the largest non-target
  logit, ``real`` the target's; summed over the batch in the original, so per image here.
* one ``sess.run`` per iteration fetches the loss, the distances, the logits and the image
  *before* that iteration's Adam step (the step is computed from the same forward pass).
* ``lower_bound = 0``, ``CONST = initial_const``, ``upper_bound = 1e10``; ``o_bestl2 = 1e10``.
* each outer step resets Adam (``sess.run(self.init)``: plain torch.optim.Adam, default betas and
  eps, here) and ``prev = 1e6``; with ``binary_search_steps >= 10`` the last outer step uses
  ``CONST = upper_bound`` (``self.repeat``).
* abort check first, ``if iteration % (MAX_ITERATIONS // 10) == 0: if l > prev * .9999: break;
  prev = l`` -- so the image of a breaking iteration is never a candidate.
* then ``if l2 < bestl2 and compare(sc, t)`` (compare: ``sc[t] -= CONFIDENCE; argmax(sc) == t``)
  updates the run's best and, with ``l2 < o_bestl2``, the overall best image.
* after the run: success (``bestscore == t``): ``upper = min(upper, CONST)``, then
  ``CONST = (lower + upper) / 2`` if ``upper < 1e9``; failure: ``lower = max(lower, CONST)``, then
  the midpoint if ``upper < 1e9``, else ``CONST *= 10``.

Not ported: TensorFlow's Adam places epsilon after the bias correction (torch before), and
float64 numpy bookkeeping of CONST (float32 here and in advfast).  advfast measures the distance
to X0 itself rather than to its tanh reconstruction (at most 5e-7 per pixel apart).
"""

import math

import pytest
import torch

from advfast import attacks, models
from advfast.io.selection import DigitsSource, prepare


def carlini_l2(model, x, target, *, const, kappa, steps, lr, binary_search_steps,
               abort_early=True, prev_start=1e6, warm_start=False):
    """CarliniL2.attack_batch for one image x [1, C, H, W]; returns (o_bestl2 or None, the
    constant of the best image or the last one tried, the Adam steps whose result was
    evaluated).  ``warm_start`` (not in the original): each outer step's modifier starts at the
    one whose image the last outer step evaluated last, Adam still reset."""
    timg = torch.atanh((x - 0.5) / 0.5 * 0.999999)
    original = torch.tanh(timg) * 0.5 + 0.5
    lower_bound, upper_bound = 0.0, 1e10
    o_bestl2, o_bestconst, evaluated = 1e10, None, 0
    last_evaluated = torch.zeros_like(x)
    for outer_step in range(binary_search_steps):
        start = last_evaluated if warm_start else torch.zeros_like(x)
        modifier = start.clone().requires_grad_(True)
        adam = torch.optim.Adam([modifier], lr=lr)
        bestl2, bestscore = 1e10, -1
        if binary_search_steps >= 10 and outer_step == binary_search_steps - 1:
            const = upper_bound
        prev, tried = prev_start, const
        for iteration in range(steps):
            newimg = torch.tanh(modifier + timg) * 0.5 + 0.5
            last_evaluated = modifier.detach().clone()
            output = model(newimg)[0]
            l2dist = (newimg - original).square().sum()
            real = output[target]
            other = torch.cat([output[:target], output[target + 1:]]).max()
            loss = l2dist + const * torch.clamp(other - real + kappa, min=0)
            adam.zero_grad()
            loss.backward()
            adam.step()
            l, l2, sc = loss.item(), l2dist.item(), output.detach().clone()
            evaluated += iteration > 0  # the image of step `iteration` was evaluated
            if abort_early and iteration % (steps // 10) == 0:
                if l > prev * .9999:
                    break
                prev = l
            sc[target] -= kappa
            if l2 < bestl2 and int(sc.argmax()) == target:
                bestl2, bestscore = l2, target
            if l2 < o_bestl2 and int(sc.argmax()) == target:
                o_bestl2, o_bestconst = l2, const
        if bestscore == target:
            upper_bound = min(upper_bound, const)
            if upper_bound < 1e9:
                const = (lower_bound + upper_bound) / 2
        else:
            lower_bound = max(lower_bound, const)
            const = (lower_bound + upper_bound) / 2 if upper_bound < 1e9 else const * 10
    if o_bestconst is None:
        return None, tried, evaluated
    return o_bestl2, o_bestconst, evaluated


@pytest.fixture(scope="module")
def digits_inputs():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: one thread is faster on a loaded machine
    model = models.load("digits")
    chosen, _ = prepare(model, DigitsSource("test"), 8, seed=0)
    yield model, chosen
    torch.set_num_threads(threads)


def _compare(model, chosen, params, prev_start=1e6, port_warm_start=None):
    """advfast vs the port, sample by sample; returns the port's constants and the mismatches
    (the port warm-starts as advfast does unless ``port_warm_start`` says otherwise)."""
    ours = attacks.CarliniWagnerL2(model, compact_every=3, **params)(
        chosen.images, chosen.targets, chosen.labels)
    warm = params.get("warm_start", False) if port_warm_start is None else port_warm_start
    port = dict(const=params["c"], kappa=params["kappa"], steps=params["steps"],
                lr=params["lr"], binary_search_steps=params["binary_search_steps"],
                warm_start=warm)
    mismatches, constants = [], []
    for i in range(len(chosen.images)):
        l2sq, c, evaluated = carlini_l2(model, chosen.images[i:i + 1], int(chosen.targets[i]),
                                        prev_start=prev_start, **port)
        constants.append(c)
        found = not torch.equal(ours.adversarial[i], chosen.images[i])  # else its clean image
        succeeded = l2sq is not None
        ours_l2sq = ours.final["l2"][i].item() ** 2
        if succeeded != found:
            mismatches.append((i, "success", succeeded))
        elif succeeded and ours_l2sq != pytest.approx(l2sq, rel=1e-5):
            mismatches.append((i, "l2", ours_l2sq, l2sq))
        if ours.constant[i].item() != pytest.approx(c, rel=1e-6):
            mismatches.append((i, "constant", ours.constant[i].item(), c))
        if ours.steps[i].item() != evaluated:
            mismatches.append((i, "steps", ours.steps[i].item(), evaluated))
    return constants, mismatches


# c climbs ten-fold from 1 where 20 steps of 0.05 cannot reach the target (6 of the 8 inputs):
# the runs at c = 1e5 (where the clean image's margin loss exceeds 10) and 1e6 start with a loss
# above 0.9999e6 and abort at their first check; the 2 others succeed and bisect.
CLIMB = dict(c=1.0, kappa=0.0, steps=20, lr=5e-2, binary_search_steps=7, abort_early=True)
# c starts above the abort threshold: every run of the original aborts at iteration 0, so no
# sample succeeds, although with prev = +inf the same runs would find examples.
HIGH = dict(c=2e5, kappa=0.0, steps=20, lr=5e-2, binary_search_steps=3, abort_early=True)


@pytest.mark.parametrize("params", [CLIMB, HIGH], ids=["climb", "high"])
def test_cw_matches_carlini_l2_attack_sample_by_sample(digits_inputs, params):
    model, chosen = digits_inputs
    constants, mismatches = _compare(model, chosen, params)
    assert not mismatches, mismatches
    assert max(constants) > 1e5, constants


@pytest.mark.parametrize("params", [CLIMB, HIGH], ids=["climb", "high"])
def test_the_comparison_catches_an_infinite_first_previous_loss(digits_inputs, params):
    model, chosen = digits_inputs
    _, mismatches = _compare(model, chosen, params, prev_start=math.inf)
    assert mismatches


# CLIMB with each run going on from the last one's end (advfast's warm_start, not the original).
WARM = dict(CLIMB, warm_start=True)


def test_warm_start_matches_the_port_going_on_from_each_run_end(digits_inputs):
    model, chosen = digits_inputs
    constants, mismatches = _compare(model, chosen, WARM)
    assert not mismatches, mismatches
    # the oracle can tell: started at the clean image, the port's runs give other results
    _, cold = _compare(model, chosen, WARM, port_warm_start=False)
    assert cold
