"""advfast: fast, instrumented targeted adversarial attacks with fused C++/CUDA kernels.

The reference implementation of "Perturbation Analysis of Gradient-based Adversarial Attacks"
(Ozbulak et al.): X_{n+1} = clip_[0,1](X_n + alpha_n * P_n) with P_n from the CE gradient, its
sign (IFGS), the target logit or the Carlini-Wagner M-logit margin.

The library: :mod:`advfast.ops` (fused kernels), :mod:`advfast.engine`, :mod:`advfast.attacks`,
:mod:`advfast.io` (models, datasets, input selection, durable files).  The applications built on
it: :mod:`advfast.experiments`, :mod:`advfast.tools` and :mod:`advfast.cli`; the library never
imports them.  ``advfast.Attack`` is the paper's scheme, :class:`advfast.attacks.Eq11`.
"""

from advfast import ops
from advfast.attacks import AttackResult, Eq11, Finished

Attack = Eq11  # the name the README has always documented for the paper's scheme

__version__ = "0.1.0"
__all__ = ["Attack", "AttackResult", "Eq11", "Finished", "ops", "__version__"]
