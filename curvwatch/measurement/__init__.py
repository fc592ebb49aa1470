"""One measurement, as a pure procedure of explicit steps: ``(options, state, model, probe, step) -> (result, state)``.

* :mod:`~curvwatch.measurement.procedure`: :func:`measure`, the ordered steps;
* :mod:`~curvwatch.measurement.context`: what the steps share (:class:`Context`),
  what one measurement hands the next (:class:`MeasurementState`), the
  :class:`Probe`;
* :mod:`~curvwatch.measurement.source`: the operators, for the whole model or a block;
* :mod:`~curvwatch.measurement.checks`: symmetry, differences, the certificate;
* :mod:`~curvwatch.measurement.early_warnings`: update and critical sharpness;
* :mod:`~curvwatch.measurement.per_block`: ``blocks=``;
* :mod:`~curvwatch.measurement.batch_sharpness`, :mod:`~curvwatch.measurement.chunked`:
  mini-batch sharpness, and the probe batch in pieces;
* :mod:`~curvwatch.measurement.setup`: the probe, checked once when a monitor is built;
* :mod:`~curvwatch.measurement.outcome`: the result and the next state.
"""

from curvwatch.measurement.context import MeasurementState, Note, Probe
from curvwatch.measurement.early_warnings import CRITICAL_MAX_EVALS, CRITICAL_RTOL
from curvwatch.measurement.procedure import measure
from curvwatch.measurement.setup import prepare
from curvwatch.planning import Allowance

__all__ = [
    "CRITICAL_MAX_EVALS",
    "CRITICAL_RTOL",
    "Allowance",
    "MeasurementState",
    "Note",
    "Probe",
    "measure",
    "prepare",
]
