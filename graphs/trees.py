"""Walk the small containers the forward receives (RoPE tables, text contexts) without knowing their classes.

`RopeTables` and `TextContext` are frozen dataclasses of tensors (possibly of (cos, sin) tuples). The graph
layer needs three things from them: a hashable description for the graph key, a same-structure copy of
static buffers, and the list of tensors to copy into those buffers. Supported containers: dataclass
instances, NamedTuples, tuples, lists and dicts; any other leaf is a plain value, part of the description.
Nothing here touches tensor data, so nothing here can synchronise the host.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def _children(tree: Any) -> list[tuple[str, Any]] | None:
    """(name, child) pairs of a container, or None for a leaf."""
    if isinstance(tree, Tensor):
        return None
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        return [(f.name, getattr(tree, f.name)) for f in dataclasses.fields(tree)]
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # NamedTuple
        return [(name, getattr(tree, name)) for name in tree._fields]
    if isinstance(tree, (tuple, list)):
        return [(str(i), child) for i, child in enumerate(tree)]
    if isinstance(tree, dict):
        return [(str(k), tree[k]) for k in sorted(tree, key=str)]
    return None


def leaves(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Every leaf as (dotted path, value), in a fixed order: tensors and plain values alike."""
    children = _children(tree)
    if children is None:
        return [(prefix, tree)]
    out: list[tuple[str, Any]] = []
    for name, child in children:
        out.extend(leaves(child, f"{prefix}.{name}" if prefix else name))
    return out


def tensor_leaves(tree: Any) -> list[Tensor]:
    """The tensors of `tree`, in the same order as `leaves`."""
    return [value for _, value in leaves(tree) if isinstance(value, Tensor)]


def map_tensors(tree: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """A copy of `tree` with the same containers and every tensor replaced by `fn(tensor)`."""
    if isinstance(tree, Tensor):
        return fn(tree)
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        changes = {f.name: map_tensors(getattr(tree, f.name), fn) for f in dataclasses.fields(tree) if f.init}
        return dataclasses.replace(tree, **changes)
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(map_tensors(child, fn) for child in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(map_tensors(child, fn) for child in tree)
    if isinstance(tree, dict):
        return {k: map_tensors(v, fn) for k, v in tree.items()}
    return tree


def tree_bytes(tree: Any) -> int:
    """Bytes held by the tensors of `tree` (host metadata only)."""
    return sum(t.numel() * t.element_size() for t in tensor_leaves(tree))


def paths_off_device(tree: Any, device: torch.device) -> list[str]:
    """Paths of the tensors in `tree` that are not on `device` (empty when all are)."""
    return [path for path, v in leaves(tree) if isinstance(v, Tensor) and v.device != device]

