"""The names a user chooses from, declared once: how products are applied, and which curvature.

Each is a string enum: a member *is* its string (``Method.AUTO == "auto"``,
hashed, formatted and shown like it), so the code names the choices by member
while settings and messages read as before. What is kept (results, a
checkpoint's state) holds ``str(member)``, the plain string: a checkpoint never
needs this module to load.
"""

from __future__ import annotations

import enum


class _Name(str, enum.Enum):
    """A string enum whose members print, format and hash as their string."""

    def __str__(self) -> str:
        return self.value

    def __repr__(self) -> str:
        return repr(self.value)

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        """Every member's string, in declaration order."""
        return tuple(member.value for member in cls)


class Method(_Name):
    """How a curvature-vector product is applied (``CurvatureMonitor(method=...)``).

    ``AUTO`` is exact where possible and central differences where it is not
    (FSDP, a model without a second derivative); ``FORWARD_DIFFERENCE`` is the
    cheap opt-in: one-sided differences against the cached probe gradient, the
    top eigenvalue certified by a central one.
    """

    AUTO = "auto"
    DOUBLE_BACKWARD = "double_backward"
    FORWARD_OVER_REVERSE = "forward_over_reverse"
    FINITE_DIFFERENCE = "finite_difference"
    FORWARD_DIFFERENCE = "forward_difference"


class Curvature(_Name):
    """Which curvature matrix is measured (``CurvatureMonitor(curvature=...)``).

    ``HESSIAN`` is the loss's; the others live in the model's output space:
    the generalized Gauss-Newton matrix, the Monte-Carlo ("true") Fisher and
    the empirical Fisher.
    """

    HESSIAN = "hessian"
    GGN = "ggn"
    FISHER = "fisher"
    EMPIRICAL_FISHER = "empirical_fisher"


# The choices in groups: what a HessianOperator applies (exact, or central differences); what
# method="auto" can be replaced by (every method but AUTO); the methods that take differences of
# first-order gradients; the Fisher curvatures; the curvatures of a known loss of the model
# outputs (no loss_fn).
HESSIAN_METHODS = (Method.DOUBLE_BACKWARD, Method.FORWARD_OVER_REVERSE, Method.FINITE_DIFFERENCE)
CHOSEN_METHODS = (*HESSIAN_METHODS, Method.FORWARD_DIFFERENCE)
DIFFERENCES = (Method.FINITE_DIFFERENCE, Method.FORWARD_DIFFERENCE)
FISHERS = (Curvature.FISHER, Curvature.EMPIRICAL_FISHER)
OUTPUT_SPACE = (Curvature.GGN, *FISHERS)


# The output-space operator paths (what ``curvature="ggn"`` runs and ``CurvatureResult.method`` reads;
# a Fisher curvature reads its own name, plus "_lm_head" on the second path).
GGN_CRITERION = "ggn"  # GGNOperator on model(inputs) with a criterion's output Hessian
GGN_LM_HEAD = "ggn_lm_head"  # chunked, fused LM head of a Hugging Face causal LM
