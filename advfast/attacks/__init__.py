"""The attacks, one module each, on one engine: the base class (:class:`BaseAttack`), the
paper's scheme (:class:`Eq11`, Eqs. 11-16) and the paper's three attacks in full (Section III):
:class:`IFGS` (Eq. 2), :class:`CarliniWagnerL2` (Eqs. 3-4) and box-constrained
:class:`LBFGS` (Eq. 1).

Each is ``attack(images, target) -> AttackResult`` (images in [0, 1], targeted), batched on the
device, with continuous batching across samples and across the restarts of the searches over a
constant: a sample that finishes one constant restarts in place, so the batch stays full, and a
sample that is done leaves it.  ``result.constant`` holds each sample's final constant (CW's c,
L-BFGS's b).
"""

from advfast.attacks.base import AttackResult, AttackStream, BaseAttack, Finished, PerSample
from advfast.attacks.cw import CarliniWagnerL2
from advfast.attacks.eq11 import STEPS, Eq11
from advfast.attacks.ifgs import IFGS
from advfast.attacks.lbfgs import LBFGS

__all__ = ["AttackResult", "AttackStream", "BaseAttack", "CarliniWagnerL2", "Eq11", "Finished",
           "IFGS", "LBFGS", "PerSample", "STEPS"]
