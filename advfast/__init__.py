"""advfast: fast, instrumented targeted adversarial attacks with fused C++/CUDA kernels.

The reference implementation of "Perturbation Analysis of Gradient-based Adversarial Attacks"
(Ozbulak et al.): X_{n+1} = clip_[0,1](X_n + alpha_n * P_n) with P_n from the CE gradient, its
sign (IFGS), the target logit or the Carlini-Wagner M-logit margin.
"""

from . import ops
from .attack import Attack, AttackResult, Finished

__version__ = "0.1.0"
__all__ = ["Attack", "AttackResult", "Finished", "ops", "__version__"]
