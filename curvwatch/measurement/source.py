"""Where a measurement's operators come from: one method, one probe, any set of parameters.

:class:`OperatorSource` resolves ``method="auto"`` on first use (double
backward; central differences under FSDP), falls back to differences when
double backward fails its check, splits the probe batch into the pieces the
memory plan asks for (:mod:`curvwatch.measurement.chunked`, once), and builds
the same operator for the whole model or for one block's parameters
(:mod:`curvwatch.operators.factory`): the Hessian's, or the output-space
curvature's (GGN, Fisher) when ``curvature=`` asks for one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from curvwatch.measurement.chunked import split_probe
from curvwatch.names import DIFFERENCES, FISHERS, GGN_LM_HEAD, Curvature, Method
from curvwatch.operators._base import CurvatureOperator
from curvwatch.operators.factory import auto_method, build_fisher_operator, build_ggn_operator, build_operator


class OperatorSource:
    """Builds the operators of one measurement (private to it).

    Args:
        options: the monitor's :class:`~curvwatch.options.MonitorOptions`.
        state: the :class:`~curvwatch.measurement.MeasurementState` it starts from.
        model: the model measured.
        probe: the :class:`~curvwatch.measurement.Probe`.
        allowance: the :class:`~curvwatch.planning.Allowance` (a forced method, the pieces).
        seed: the measurement's seed (the Fisher's Monte-Carlo labels).
        sharded: the model is sharded (FSDP).

    Attributes:
        params: the trainable parameters, the whole model's.
        resolved: what ``method`` resolved to (``None``: not yet).
        output_checked: the LM head's logits were compared with the model's.
    """

    def __init__(self, options, state, model, probe, allowance, seed: int, sharded: bool) -> None:
        self.options, self.model, self.probe, self.allowance = options, model, probe, allowance
        self.seed, self.sharded = seed, sharded
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.resolved = state.resolved_method if options.method == Method.AUTO else options.method
        self.output_checked = state.ggn_checked
        self._pieces = None  # the split probe batch (built once, when the plan asks for it)

    @property
    def method(self) -> str | None:
        """The method of this measurement: one forced by the memory plan, else the resolved one."""
        return self.allowance.method or self.resolved

    def fall_back(self) -> None:
        """Measure with central differences from now on (double backward failed its check)."""
        self.resolved = Method.FINITE_DIFFERENCE

    def operator(self, params: Sequence[torch.Tensor] | None = None, scheme: str | None = None) -> CurvatureOperator:
        """The curvature operator on ``params`` (default: all trainable), resolving ``method="auto"`` on first use.

        ``scheme="central"``: the certificate's differences.
        """
        params = self.params if params is None else params
        options, probe = self.options, self.probe
        if probe.output_kind is not None and options.curvature in FISHERS:
            # one fixed matrix per measurement: the Monte-Carlo labels drawn with seed + step
            return build_fisher_operator(
                self.model, probe.batch, probe.criterion, params, probe.output_kind, options.reduce,
                empirical=options.curvature == Curvature.EMPIRICAL_FISHER, mc_samples=options.mc_samples,
                seed=self.seed,
            )
        if probe.output_kind is not None:
            operator = build_ggn_operator(
                self.model, probe.batch, probe.criterion, params, probe.output_kind, options.reduce,
                check=not self.output_checked,
            )
            self.output_checked = True  # the LM head's logits are compared with the model's once
            return operator
        if self.resolved is None:
            self.resolved = auto_method(self.model, self.sharded)
        return build_operator(
            self.model, self._closure, params, self.method, scheme, options.reduce, self._split(), sharded=self.sharded
        )

    def certificate(self, params: Sequence[torch.Tensor] | None = None) -> CurvatureOperator | None:
        """A central-difference operator to certify the top eigenvalue of one-sided ones, or ``None``."""
        if self.probe.output_kind is not None or self.method != Method.FORWARD_DIFFERENCE:
            return None
        return self.operator(params, scheme="central")

    def exact(self) -> CurvatureOperator:
        """Double backward on the whole model (the check of central differences)."""
        return build_operator(
            self.model, self._closure, self.params, Method.DOUBLE_BACKWARD, None, self.options.reduce,
            sharded=self.sharded,
        )

    def name(self) -> str:
        """``CurvatureResult.method``: the product method, or the output-space curvature (with its path)."""
        kind = self.probe.output_kind
        if kind is None:
            return str(self.method or "")
        if self.options.curvature in FISHERS:
            return str(self.options.curvature) + ("_lm_head" if kind == GGN_LM_HEAD else "")
        return str(kind)

    def _closure(self) -> torch.Tensor:
        return self.probe.loss_fn(self.model, self.probe.batch)

    def _split(self) -> Any:
        """The probe batch in the plan's pieces (differences only), split once; ``None``: whole."""
        if self.allowance.pieces <= 1 or self.method not in DIFFERENCES:
            return None
        if self._pieces is None:
            self._pieces = split_probe(self.model, self.probe.batch, self.probe.loss_fn, self.allowance.pieces)
        return self._pieces
