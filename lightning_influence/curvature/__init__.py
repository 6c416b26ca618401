"""The curvature every solver inverts and how much damping it needs: Hessian-vector products of the mean
training loss (:mod:`.operator`), spectral estimates from products alone (:mod:`.spectral`), and the damping
rules with the damping the optimizer implies (:mod:`.damping`)."""

from .damping import (AutoDamping, DampingChoice, DampingRule, FactoredRule, FixedDamping, Spectrum, SpectrumRule,
                      optimizer_l2, resolve_damping)
from .operator import HessianOperator

__all__ = ["AutoDamping", "DampingChoice", "DampingRule", "FactoredRule", "FixedDamping", "HessianOperator", "Spectrum",
           "SpectrumRule", "optimizer_l2", "resolve_damping"]
