"""advfast: fast, instrumented targeted adversarial attacks with fused C++/CUDA kernels.

The reference implementation of "Perturbation Analysis of Gradient-based Adversarial Attacks"
(Ozbulak et al.): X_{n+1} = clip_[0,1](X_n + alpha_n * P_n) with P_n from the CE gradient, its
sign (IFGS), the target logit or the Carlini-Wagner M-logit margin.

The library: :mod:`advfast.ops` (fused kernels), :mod:`advfast.engine`, :mod:`advfast.attacks`,
:mod:`advfast.io` (models, datasets, input selection, durable files).  The applications built on
it: :mod:`advfast.experiments`, :mod:`advfast.tools` and :mod:`advfast.cli`; the library never
imports them.  ``advfast.Attack`` is the paper's scheme, :class:`advfast.attacks.Eq11`.
"""

__version__ = "0.1.0"
__all__ = ["Attack", "AttackResult", "Eq11", "Finished", "ops", "__version__"]

# The public names load on first use, so that importing a submodule (the command line, say)
# can settle its environment before torch is imported.
_LAZY = {"Attack": ("advfast.attacks", "Eq11"), "Eq11": ("advfast.attacks", "Eq11"),
         "AttackResult": ("advfast.attacks", "AttackResult"),
         "Finished": ("advfast.attacks", "Finished")}


def __getattr__(name: str):
    if name == "ops":
        import advfast.ops

        return advfast.ops
    if name in _LAZY:  # advfast.Attack: the name the README has always used for Eq. 11
        import importlib

        module, attribute = _LAZY[name]
        return getattr(importlib.import_module(module), attribute)
    raise AttributeError(f"module 'advfast' has no attribute {name!r}")
