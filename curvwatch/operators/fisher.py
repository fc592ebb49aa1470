r"""Fisher information matrices: the Monte-Carlo ("true") Fisher and the empirical Fisher.

The mean loss ``L = (1/N) sum_i l_i`` is read as a negative log-likelihood:
each per-example loss ``l_i(y) = -log p(y | f_i) + const`` of the model output
``f_i`` (softmax cross-entropy: a categorical distribution; squared error: a
Gaussian). With ``J_i = d f_i / d theta`` and ``s_i(y) = grad_{f_i} l_i(y)``,

.. math::

    F = \frac{1}{N} \sum_i J_i^\top \,
        \mathbb{E}_{y \sim p(y | f_i)}\!\left[ s_i(y) s_i(y)^\top \right] J_i,
    \qquad
    F_\text{emp} = \frac{1}{N} \sum_i g_i g_i^\top,
    \quad g_i = \nabla_\theta l_i(y_i) = J_i^\top s_i(y_i).

Both are in the units of the Hessian of ``L`` (loss per parameter squared) and
positive semi-definite. For these likelihoods the expectation is the logit
Hessian, so ``F`` equals the generalized Gauss-Newton matrix
(:class:`~curvwatch.GGNOperator`) and, for a model linear in its parameters,
the Hessian (Martens 2020, "New insights and perspectives on the natural
gradient method"). :class:`MonteCarloFisherOperator` estimates the expectation
with ``mc_samples`` labels drawn per example (Kunstner et al. 2019 warn that
:class:`EmpiricalFisherOperator`, which uses the data's labels, is not an
approximation of the Hessian in general).

What an example is:

* ``"cross_entropy"``: outputs ``(..., C)`` (classes last) are flattened to
  rows ``(R, C)``; each row is an example: a sample of an ``(N, C)`` batch, a
  token of an ``(N, T, C)`` sequence batch. Rows whose target is
  ``ignore_index`` are dropped and ``N`` counts the others, as
  ``CrossEntropyLoss(reduction='mean')`` does.
* ``"mse"``: example ``i`` is ``outputs[i]`` (the first dimension), with
  ``D = numel / N`` entries. ``MSELoss(reduction='mean')`` is
  ``(1/N) sum_i l_i`` with ``l_i = ||f_i - y_i||^2 / D``, the negative
  log-likelihood of ``N(f_i, (D/2) I)`` up to a constant; its Fisher block is
  ``E[s s^T] = (2/D) I``, so ``F = J^T (2/numel) J``: the GGN of ``MSELoss``.

Both operators are ``F = J^T B J`` with ``B`` block-diagonal over examples and
of rank ``mc_samples`` (1 for the empirical Fisher) per block, so ``F v`` costs
what a GGN product costs: one Jacobian-vector product (the double-vjp trick),
a product with ``B`` and one vector-Jacobian product; never ``N`` backward
passes. For the empirical Fisher this is ``F v = (1/N) J_l^T (J_l v)`` with
``J_l`` the ``N x n`` Jacobian of the per-example losses.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from curvwatch._errors import CurvatureError
from curvwatch.operators._base import CurvatureOperator
from curvwatch.operators._closure import check_params
from curvwatch.operators.ggn import output_space_product

LOSSES = ("cross_entropy", "mse")


class _OutputFactor:
    r"""The output-space matrix ``B = scale * sum_k S_k S_k^T`` (row-block-diagonal), applied to tangents.

    Scores ``S_k`` (``k < K`` samples) are rows ``(R, C)``, held in one of two forms:

    * sparse (softmax cross-entropy with class labels): ``S_k = a - b e_{y_k}``,
      one shared ``a`` ``(R, C)`` and labels ``(K, R)``; never ``K`` dense copies;
    * dense: ``scores`` ``(K, R, C)``.

    ``weight`` ``(R,)`` (0 or 1) drops ignored rows.
    """

    def __init__(
        self,
        scale: float,
        weight: torch.Tensor | None = None,
        base: torch.Tensor | None = None,
        coef: float = 1.0,
        labels: torch.Tensor | None = None,
        scores: torch.Tensor | None = None,
    ) -> None:
        self.scale = scale
        self.weight = weight
        self.base = base
        self.coef = coef
        self.labels = labels
        self.scores = scores
        self.dtype = (scores if scores is not None else base).dtype

    def apply(self, u: torch.Tensor) -> torch.Tensor:
        """``B u`` for a tangent ``u`` of shape ``(R, C)``."""
        u = u.to(self.dtype)
        if self.scores is not None:
            c = torch.einsum("krc,rc->kr", self.scores, u)
            if self.weight is not None:
                c = c * self.weight
            return torch.einsum("kr,krc->rc", c, self.scores) * self.scale
        a, b, labels = self.base, self.coef, self.labels.T  # labels: (R, K)
        c = (a * u).sum(-1, keepdim=True) - b * u.gather(1, labels)  # <S_k, u> per row: (R, K)
        if self.weight is not None:
            c = c * self.weight[:, None]
        out = a * c.sum(1, keepdim=True)
        out.scatter_add_(1, labels, c * -b)
        return out * self.scale


class _FisherOperator(CurvatureOperator):
    """``J^T B J`` with ``B`` from :meth:`_factor`; the forward graph and ``B`` are cached."""

    def __init__(
        self,
        outputs_fn: Callable[[], torch.Tensor],
        params: Iterable[torch.Tensor],
        loss: str,
        targets: torch.Tensor | None,
        ignore_index: int,
    ) -> None:
        if loss not in LOSSES:
            fix = (
                "; a callable loss has no known likelihood: use GGNOperator for its Gauss-Newton matrix"
                if callable(loss)
                else ""
            )
            raise CurvatureError(f"loss must be 'cross_entropy' or 'mse', got {loss!r}{fix}")
        if targets is not None and not isinstance(targets, torch.Tensor):
            raise CurvatureError(f"targets must be a tensor, got {type(targets).__name__}")
        self.params = check_params(params)
        super().__init__(sum(p.numel() for p in self.params), self.params[0].dtype, self.params[0].device)
        self.outputs_fn = outputs_fn
        self.output_loss = loss
        self.targets = targets
        self.ignore_index = ignore_index
        self.examples: int | None = None  # N, known after the first product
        self._outputs: torch.Tensor | None = None
        self._b: _OutputFactor | None = None

    def _forward(self) -> tuple[torch.Tensor, _OutputFactor]:
        if self._outputs is None:
            outputs = self.outputs_fn()
            if not isinstance(outputs, torch.Tensor) or not outputs.requires_grad:
                raise CurvatureError(
                    "outputs_fn must return the output tensor computed from the parameters "
                    "(not under torch.no_grad(), not detached)"
                )
            if outputs.ndim == 0 or outputs.numel() == 0:
                raise CurvatureError(
                    f"outputs have shape {tuple(outputs.shape)}; expected (N, ...) with N >= 1 examples"
                )
            work = outputs.detach().to(torch.promote_types(outputs.dtype, torch.float32))
            self._b = self._factor(work)
            self._outputs = outputs
        return self._outputs, self._b

    def _factor(self, outputs: torch.Tensor) -> _OutputFactor:
        raise NotImplementedError("Fisher operators implement _factor(outputs) -> B")

    def _rows(self, outputs: torch.Tensor) -> torch.Tensor:
        """Outputs as examples ``(R, C)``: classes last for cross-entropy, first dimension for MSE."""
        if self.output_loss == "cross_entropy":
            if outputs.ndim < 2:
                raise CurvatureError(
                    f"cross-entropy outputs must be logits (..., C), got shape {tuple(outputs.shape)}"
                )
            return outputs.reshape(-1, outputs.shape[-1])
        return outputs.reshape(outputs.shape[0], -1)

    def _class_labels(self, rows: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, int]:
        """Class-label targets as ``(labels (R,), valid-row weight (R,) or None, N)``; ``(None, None, R)`` if none."""
        t = self.targets
        if t is None or t.is_floating_point():
            return None, None, rows.shape[0]
        if t.numel() != rows.shape[0]:
            raise CurvatureError(
                f"cross-entropy targets have {t.numel()} entries for {rows.shape[0]} rows of logits "
                f"(shape {tuple(rows.shape)}); pass one class index per row, classes last in the logits"
            )
        t = t.reshape(-1).to(rows.device)
        valid = t != self.ignore_index
        count = int(valid.sum())
        if count == 0:
            raise CurvatureError(
                f"every target is ignore_index={self.ignore_index}: the loss has no examples on this batch"
            )
        labels = torch.where(valid, t, torch.zeros_like(t))
        if int(labels.min()) < 0 or int(labels.max()) >= rows.shape[1]:
            raise CurvatureError(
                f"cross-entropy targets must lie in [0, {rows.shape[1]}) or equal ignore_index="
                f"{self.ignore_index}; got values in [{int(t[valid].min())}, {int(t[valid].max())}]"
            )
        return labels, (valid.to(rows.dtype) if count < t.numel() else None), count

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        outputs, b = self._forward()
        return output_space_product(
            outputs, self.params, v, lambda jv: b.apply(self._rows(jv)).to(outputs.dtype).reshape(outputs.shape)
        )

    def release(self) -> None:
        """Free the cached forward graph (the next product runs ``outputs_fn`` again)."""
        self._outputs = None
        self._b = None


class MonteCarloFisherOperator(_FisherOperator):
    r"""The (true) Fisher ``F = (1/N) sum_i J_i^T E_{y ~ p(y|f_i)}[s s^T] J_i``, by Monte Carlo.

    ``mc_samples`` labels are drawn per example from the model's own
    predictive distribution and the expectation is replaced by their mean:

    * ``"cross_entropy"``: ``y ~ softmax(f_i)``, ``s = softmax(f_i) - e_y``;
      ``E[s s^T] = diag(p) - p p^T``, the logit Hessian of the mean softmax
      cross-entropy (times ``N``).
    * ``"mse"``: ``y ~ N(f_i, (D/2) I)``, ``s = 2 (f_i - y) / D``; ``E[s s^T] = (2/D) I``.

    So ``E[F]`` over the draws is the GGN of ``CrossEntropyLoss()`` /
    ``MSELoss()`` (``reduction='mean'``) exactly; one draw has rank at most
    ``N * mc_samples`` and the estimate's relative error shrinks as
    ``1/sqrt(N * mc_samples)``. The labels are drawn from a generator seeded
    with ``seed`` whenever the outputs are computed, so the same seed and
    parameters give the same operator: one fixed symmetric matrix across
    products (and across :meth:`release`), as Lanczos needs. Draws happen on
    the outputs' device; the same seed on another device type draws other labels.

    Args:
        outputs_fn: ``outputs_fn() -> outputs`` (e.g. ``lambda: model(x)``),
            logits ``(..., C)`` for cross-entropy, predictions ``(N, ...)`` for
            MSE; called once per operator (again after :meth:`release`).
        params: the parameters, all with ``requires_grad=True``.
        loss: ``"cross_entropy"`` or ``"mse"`` (mean reduction).
        targets: optional; class-index targets mask their ``ignore_index``
            rows (``N`` counts the rest). Otherwise unused: the true Fisher
            does not depend on the labels.
        ignore_index: the masked target value.
        mc_samples: labels drawn per example (``>= 1``).
        seed: seeds the draws.

    Raises:
        CurvatureError: an unknown ``loss``, ``mc_samples < 1``, or (at the
            first product) targets that do not fit the outputs.
    """

    def __init__(
        self,
        outputs_fn: Callable[[], torch.Tensor],
        params: Iterable[torch.Tensor],
        loss: str = "cross_entropy",
        targets: torch.Tensor | None = None,
        ignore_index: int = -100,
        mc_samples: int = 1,
        seed: int = 0,
    ) -> None:
        if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
            raise CurvatureError(f"mc_samples must be an integer >= 1, got {mc_samples!r}")
        super().__init__(outputs_fn, params, loss, targets, ignore_index)
        self.mc_samples = mc_samples
        self.seed = int(seed)

    def _factor(self, outputs: torch.Tensor) -> _OutputFactor:
        rows = self._rows(outputs)
        generator = torch.Generator(device=rows.device).manual_seed(self.seed)
        k = self.mc_samples
        if self.output_loss == "mse":
            n, d = rows.shape
            self.examples = n
            noise = torch.randn((k, n, d), generator=generator, device=rows.device, dtype=rows.dtype)
            return _OutputFactor(scale=1.0 / (n * k), scores=noise.mul_(math.sqrt(2.0 / d)))
        _, weight, n = self._class_labels(rows)
        self.examples = n
        p = torch.softmax(rows, dim=-1)
        labels = torch.multinomial(p, k, replacement=True, generator=generator).T  # (K, R)
        return _OutputFactor(scale=1.0 / (n * k), weight=weight, base=p, coef=1.0, labels=labels)


class EmpiricalFisherOperator(_FisherOperator):
    r"""The empirical Fisher ``F_emp = (1/N) sum_i g_i g_i^T``, ``g_i`` the gradient of ``l_i``.

    ``g_i = J_i^T r_i`` with ``r_i`` the gradient of the per-example loss with
    respect to the example's outputs at the data's label:

    * ``"cross_entropy"``: ``r_i = softmax(f_i) - t_i`` with ``t_i`` the target
      distribution: one-hot for a class index (soft targets: the given
      probabilities), mixed with the uniform one as
      ``(1 - label_smoothing) t_i + label_smoothing / C`` as
      ``CrossEntropyLoss(label_smoothing=...)`` does.
    * ``"mse"``: ``r_i = 2 (f_i - y_i) / D``.

    ``F_emp v = (1/N) J_l^T (J_l v)`` with ``J_l = [r_i^T J_i]_i`` the Jacobian
    of the per-example losses: one product costs a Jacobian-vector product
    and a vector-Jacobian product, not ``N`` backward passes. The gradient of
    ``L`` is the mean of the ``g_i``, so ``F_emp`` is its second moment (not
    its covariance) and at a minimum with zero residuals it vanishes.

    Args:
        outputs_fn: ``outputs_fn() -> outputs`` (e.g. ``lambda: model(x)``),
            logits ``(..., C)`` for cross-entropy, predictions ``(N, ...)`` for
            MSE; called once per operator (again after :meth:`release`).
        params: the parameters, all with ``requires_grad=True``.
        loss: ``"cross_entropy"`` or ``"mse"`` (mean reduction).
        targets: required. Cross-entropy: class indices ``(...)`` (rows equal
            to ``ignore_index`` are dropped, ``N`` counts the rest) or class
            probabilities shaped like the outputs. MSE: a tensor that
            broadcasts to the outputs' shape.
        ignore_index: the masked target value.
        label_smoothing: ``CrossEntropyLoss``'s ``label_smoothing`` in ``[0, 1)``.

    Raises:
        CurvatureError: an unknown ``loss``, no ``targets``, a bad
            ``label_smoothing``, or (at the first product) targets that do not
            fit the outputs.
    """

    def __init__(
        self,
        outputs_fn: Callable[[], torch.Tensor],
        params: Iterable[torch.Tensor],
        loss: str = "cross_entropy",
        targets: torch.Tensor | None = None,
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
    ) -> None:
        if targets is None:
            raise CurvatureError(
                "the empirical Fisher needs the data's targets: pass targets=y "
                "(MonteCarloFisherOperator samples labels and needs none)"
            )
        if not 0.0 <= label_smoothing < 1.0:
            raise CurvatureError(f"label_smoothing must lie in [0, 1), got {label_smoothing!r}")
        if label_smoothing and loss == "mse":
            raise CurvatureError("label_smoothing applies to loss='cross_entropy' only")
        super().__init__(outputs_fn, params, loss, targets, ignore_index)
        self.label_smoothing = float(label_smoothing)

    def _factor(self, outputs: torch.Tensor) -> _OutputFactor:
        rows = self._rows(outputs)
        eps = self.label_smoothing
        if self.output_loss == "mse":
            try:
                y = torch.broadcast_to(self.targets.to(outputs), outputs.shape)
            except RuntimeError as error:
                raise CurvatureError(
                    f"MSE targets of shape {tuple(self.targets.shape)} do not broadcast to the outputs' "
                    f"shape {tuple(outputs.shape)}: pass targets shaped like model(inputs)"
                ) from error
            n, d = rows.shape
            self.examples = n
            residual = (rows - y.reshape(n, d)).mul_(2.0 / d)
            return _OutputFactor(scale=1.0 / n, scores=residual[None])
        p = torch.softmax(rows, dim=-1)
        classes = rows.shape[1]
        if self.targets.is_floating_point():
            if self.targets.shape != outputs.shape:
                raise CurvatureError(
                    f"soft cross-entropy targets have shape {tuple(self.targets.shape)}, expected the "
                    f"logits' shape {tuple(outputs.shape)} (classes last)"
                )
            t = self.targets.to(rows).reshape(rows.shape)
            t = t * (1.0 - eps) + eps / classes
            self.examples = rows.shape[0]
            return _OutputFactor(scale=1.0 / rows.shape[0], scores=(p - t)[None])
        labels, weight, n = self._class_labels(rows)
        self.examples = n
        return _OutputFactor(scale=1.0 / n, weight=weight, base=p - eps / classes, coef=1.0 - eps, labels=labels[None])
