"""Named blocks of parameters, for per-block curvature (``CurvatureMonitor(blocks=...)``).

A block is a set of trainable parameters; its curvature is the top eigenvalue of
the Hessian *restricted* to it, the diagonal block ``H_bb`` (and, for Adam-type
optimizers, of ``P_b^-1/2 H_bb P_b^-1/2``). A block value is not a share of the
global one: the top eigenvalue of the whole Hessian is at least every block's
(``lambda_max(H) >= lambda_max(H_bb)``, Cauchy interlacing) and can be far
larger, since the coupling between blocks is left out.

The ``blocks=`` spec:

* a dict ``{name: pattern or [patterns]}``: each pattern is matched with
  :func:`fnmatch.fnmatchcase` against the names of ``model.named_parameters()``
  (``{"attn": "*.attn.*", "mlp": "*.mlp.*"}``); a parameter matched by several
  blocks belongs to each of them (blocks may overlap), and a parameter matched
  by none is in no block (it still counts in the global values);
* ``"layers"``: one block per layer of the model's stack of repeated layers,
  the ``nn.ModuleList`` of modules of one type holding the most trainable
  parameters (GPT-2's ``transformer.h``, Llama's ``model.layers``), named by
  the list's own name and the index (``h.0``, ``h.1``, ...; ``layers.0``, ...);
  embeddings, final norms and heads are in no block;
* ``"modules"``: one block per top-level child module holding trainable
  parameters (named as the child), and one per parameter owned by the model itself.

Only trainable parameters (``requires_grad=True``) are matched. Wrapper
segments are left out of the names matched (``_fsdp_wrapped_module.``,
``_checkpoint_wrapped_module.``, ``_orig_mod.``), so one spec serves the model
before and after FSDP1, activation checkpointing or ``torch.compile``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from curvwatch._errors import CurvatureError

BlockSpec = str | Mapping[str, str | Sequence[str]]

SHORTHANDS = ("layers", "modules")

# Path segments wrappers insert into parameter names (FSDP1, activation checkpointing, torch.compile).
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def clean_name(name: str) -> str:
    """A parameter or module name without the segments wrappers insert."""
    for segment in _WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    for segment in _WRAPPER_SEGMENTS:  # a module path ending in a wrapper
        if name.endswith(segment[:-1]):
            name = name[: -len(segment[:-1])].rstrip(".")
    return name


def check_spec(spec: Any) -> None:
    """Check the form of a ``blocks=`` spec (without a model).

    Raises:
        CurvatureError: not ``None``, a shorthand or a dict of patterns.
    """
    if spec is None or (isinstance(spec, str) and spec in SHORTHANDS):
        return
    if isinstance(spec, str) or not isinstance(spec, Mapping):
        raise CurvatureError(
            f"blocks={spec!r}: pass 'layers', 'modules', or a dict {{name: pattern or [patterns]}} of "
            "fnmatch patterns over model.named_parameters() names, e.g. {'attn': '*.attn.*', 'mlp': '*.mlp.*'}"
        )
    if not spec:
        raise CurvatureError("blocks={} names no block: pass None to measure no blocks")
    for name, patterns in spec.items():
        if not isinstance(name, str) or not name or "/" in name:
            raise CurvatureError(
                f"block name {name!r}: a non-empty string without '/' (it becomes the tag "
                "curvature/block/<name>/lambda_max)"
            )
        listed = [patterns] if isinstance(patterns, str) else patterns
        if (
            isinstance(listed, Mapping)
            or not isinstance(listed, Sequence)
            or not listed
            or not all(isinstance(p, str) and p for p in listed)
        ):
            raise CurvatureError(
                f"block {name!r}: {patterns!r} is not a pattern or a non-empty list of patterns (strings)"
            )


def block_patterns(model: torch.nn.Module, spec: BlockSpec | None) -> dict[str, list[str]] | None:
    """The blocks of ``spec`` as ``{name: [patterns]}``, the shorthands spelled out on ``model`` now.

    A monitor keeps this from its construction, so parameters frozen later do
    not move a shorthand's blocks (``"layers"`` looks for a stack of trainable
    layers, ``"modules"`` for trainable children).

    Raises:
        CurvatureError: a malformed spec; ``"layers"`` on a model without a
            stack of repeated layers; ``"modules"`` without a trainable child.
    """
    check_spec(spec)
    if spec is None:
        return None
    if spec == "layers":
        spec = _layer_patterns(model)
    elif spec == "modules":
        spec = _module_patterns(model, _trainable_names(model))
    return {block: [patterns] if isinstance(patterns, str) else list(patterns) for block, patterns in spec.items()}


def resolve_blocks(model: torch.nn.Module, spec: BlockSpec | None) -> dict[str, list[str]]:
    """The blocks of ``spec`` as ``{name: [parameter names]}`` in ``named_parameters()`` order.

    The parameter names are those of ``model.named_parameters()`` (trainable
    ones only). Every block is non-empty; blocks may share parameters.

    Raises:
        CurvatureError: a malformed spec; a pattern that matches no trainable
            parameter (the message names it and shows a few parameter names);
            ``"layers"`` on a model without a stack of repeated layers.
    """
    patterns = block_patterns(model, spec)
    if patterns is None:
        return {}
    named = _trainable_names(model)
    blocks: dict[str, list[str]] = {}
    for block, listed in patterns.items():
        chosen: set[str] = set()
        for pattern in listed:
            hits = {name for name, clean in named if fnmatch.fnmatchcase(clean, pattern)}
            if not hits:
                raise CurvatureError(_no_match(model, block, pattern, [clean for _, clean in named]))
            chosen |= hits
        blocks[block] = [name for name, _ in named if name in chosen]
    return blocks


def block_parameters(model: torch.nn.Module, spec: BlockSpec | None) -> dict[str, list[torch.Tensor]]:
    """The blocks of ``spec`` as ``{name: [parameters]}``: its trainable parameters now.

    Resolved again at every call, so a model wrapped after the monitor was built
    (FSDP, ``torch.compile``) gives its current parameters, and a parameter
    frozen since (``requires_grad_(False)``) is left out of its blocks. Unlike
    :func:`resolve_blocks` a pattern may match nothing: a block whose
    parameters are all frozen now is ``[]`` (:func:`lost_block_message` says so).
    """
    patterns = block_patterns(model, spec) or {}
    named = _trainable_names(model)
    params = dict(model.named_parameters())
    return {
        block: [params[name] for name, clean in named if any(fnmatch.fnmatchcase(clean, p) for p in listed)]
        for block, listed in patterns.items()
    }


def lost_block_message(model: torch.nn.Module, spec: BlockSpec | None, block: str) -> str:
    """Why ``block`` of ``spec`` has no parameter to measure (:func:`block_parameters` gave ``[]``)."""
    listed = (block_patterns(model, spec) or {}).get(block, [])
    frozen = [clean_name(n) for n, p in model.named_parameters() if not p.requires_grad]
    only_frozen = any(fnmatch.fnmatchcase(n, p) for n in frozen for p in listed)
    why = (
        "they were frozen (requires_grad=False) after the monitor was built"
        if only_frozen
        else "the model has no parameter of those names any more"
    )
    return (
        f"curvwatch: block {block!r} has no trainable parameter now (its patterns {listed} match none: {why}); "
        "it is logged as NaN, i.e. not at all, until they train again; the global values and the other "
        "blocks are measured as before"
    )


def _trainable_names(model: torch.nn.Module) -> list[tuple[str, str]]:
    """``(name, name without wrapper segments)`` of every trainable parameter, in order."""
    return [(name, clean_name(name)) for name, p in model.named_parameters() if p.requires_grad]


def _no_match(model: torch.nn.Module, block: str, pattern: str, names: list[str]) -> str:
    frozen = [clean_name(n) for n, p in model.named_parameters() if not p.requires_grad]
    only_frozen = any(fnmatch.fnmatchcase(n, pattern) for n in frozen)
    shown = ", ".join(names[:6]) + (f", ... ({len(names)} in all)" if len(names) > 6 else "")
    return (
        f"blocks: pattern {pattern!r} of block {block!r} matches no trainable parameter"
        + (" (only frozen ones: requires_grad=False)" if only_frozen else "")
        + f"; the trainable parameter names look like: {shown}. Patterns are fnmatch patterns over the "
        "whole name ('*.attn.*', not 'attn')"
    )


def _trainable(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _layer_patterns(model: torch.nn.Module) -> dict[str, str]:
    """``"layers"``: one pattern per layer of the largest ModuleList of repeated layers."""
    best, best_size = None, 0
    for path, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) < 2:
            continue
        children = list(module.children())
        if len({type(_inner(c)) for c in children}) != 1 or not all(_trainable(c) for c in children):
            continue
        size = _trainable(module)
        if size > best_size:
            best, best_size = clean_name(path), size
    if best is None:
        raise CurvatureError(
            "blocks='layers' found no stack of repeated layers (an nn.ModuleList of two or more "
            "trainable modules of one type, like GPT-2's transformer.h or Llama's model.layers): pass "
            "blocks='modules' or a dict of patterns, e.g. {'encoder': 'encoder.*', 'head': 'head.*'}"
        )
    short = best.rsplit(".", 1)[-1] or "layers"
    count = len(_get(model, best))
    return {f"{short}.{i}": f"{best}.{i}.*" if best else f"{i}.*" for i in range(count)}


def _module_patterns(model: torch.nn.Module, named: list[tuple[str, str]]) -> dict[str, str]:
    """``"modules"``: one pattern per top-level child (and per parameter of the model itself)."""
    root = _inner(model)
    children = [clean_name(name) for name, child in root.named_children() if _trainable(child)]
    patterns: dict[str, str] = {}
    for _, clean in named:
        head = clean.split(".", 1)[0]
        if head in children:
            patterns.setdefault(head, f"{head}.*")
        elif "." not in clean:
            patterns.setdefault(clean, clean)  # a parameter of the model itself
    if not patterns:
        raise CurvatureError("blocks='modules' found no child module with trainable parameters")
    return patterns


def _inner(module: torch.nn.Module) -> torch.nn.Module:
    """The module under FSDP1, activation-checkpointing and ``torch.compile`` wrappers."""
    for attr in ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"):
        inner = getattr(module, attr, None)
        if isinstance(inner, torch.nn.Module):
            return _inner(inner)
    return module


def _get(model: torch.nn.Module, clean_path: str) -> torch.nn.Module:
    """The module at a wrapper-free path."""
    module = _inner(model)
    for part in clean_path.split(".") if clean_path else ():
        module = _inner(getattr(module, part))
    return module
