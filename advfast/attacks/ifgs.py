"""Iterative Fast Gradient Sign (Kurakin et al.; the paper's Eq. 2) on the paper's scheme."""

from __future__ import annotations

from torch import nn

from advfast.attacks.base import count, positive
from advfast.attacks.eq11 import Eq11


class IFGS(Eq11):
    """Iterative Fast Gradient Sign (Eq. 2): X_{n+1} = Clip_{X,eps}(X_n + alpha sign(grad of
    log softmax(g)_t)), clipped to [0, 1]; with ``random_start`` it starts from a uniform draw
    in the eps ball (targeted PGD).  The same images as torchattacks' targeted BIM / PGD for
    the same parameters.

    Args:
        eps: Linf radius around the clean image.
        alpha: step per iteration.
        steps: iterations.
        random_start: PGD's random start (torch's global generator).
        stop: "never" (all steps, as BIM), "flip" or "confidence" (see :class:`advfast.attacks.Eq11`).
        record, amp, channels_last, compact_every, time_phases, pack_weights: see
            :class:`BaseAttack`.
    """

    def __init__(self, model: nn.Module, eps: float, alpha: float, steps: int,
                 random_start: bool = False, stop: str = "never", **engine) -> None:
        positive("eps", eps)
        super().__init__(model, loss="ce-sign", step="equal-multiplier", alpha=alpha, eps=eps,
                         iterations=count("steps", steps, 0), stop=stop,
                         random_start=random_start, **{"record": False, **engine})
