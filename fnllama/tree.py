"""Pytree helpers on optree that fnllama uses everywhere.

Use optree directly for maps and flattening (`optree.tree_map`, `optree.tree_flatten`); this
module adds what optree does not: dotted leaf paths, sizes, and a *static flat layout* that
packs a tree of tensors into one contiguous 1-D buffer and unpacks views back out. The layout
is what ZeRO shards and what the optimizer updates in place of many small tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import optree
import torch

PyTree = Any


def path_str(path: tuple) -> str:
    """Dotted name of an optree path: ('layers', 0, 'attn', 'wq') -> 'layers.0.attn.wq'."""
    return ".".join(str(p) for p in path)


def paths_and_leaves(tree: PyTree) -> list[tuple[str, Any]]:
    """(dotted path, leaf) for every leaf, in optree's order (dict keys sorted)."""
    paths, leaves, _ = optree.tree_flatten_with_path(tree)
    return [(path_str(p), leaf) for p, leaf in zip(paths, leaves)]


def num_elements(tree: PyTree) -> int:
    return sum(t.numel() for t in optree.tree_leaves(tree))


def num_bytes(tree: PyTree) -> int:
    return sum(t.numel() * t.element_size() for t in optree.tree_leaves(tree))


@dataclass(frozen=True)
class FlatLayout:
    """Where each leaf of a tree lives in a flat 1-D buffer.

    `offsets[i]:offsets[i]+sizes[i]` holds leaf i (row-major). The buffer has `padded_total`
    elements: `total` rounded up to a multiple of `pad_to` (e.g. the dp size for ZeRO), zeros
    at the end.
    """

    treespec: Any
    paths: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    total: int
    padded_total: int


def make_layout(tree: PyTree, *, pad_to: int = 1) -> FlatLayout:
    """The static layout of `tree` (works on meta tensors: nothing is allocated)."""
    paths, leaves, treespec = optree.tree_flatten_with_path(tree)
    sizes = tuple(math.prod(t.shape) for t in leaves)
    offsets, running = [], 0
    for size in sizes:
        offsets.append(running)
        running += size
    padded = -(-running // pad_to) * pad_to if running else pad_to
    return FlatLayout(
        treespec=treespec,
        paths=tuple(path_str(p) for p in paths),
        shapes=tuple(tuple(t.shape) for t in leaves),
        dtypes=tuple(t.dtype for t in leaves),
        offsets=tuple(offsets),
        sizes=sizes,
        total=running,
        padded_total=padded,
    )


def flatten(tree: PyTree, layout: FlatLayout, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """One new contiguous buffer [padded_total] holding every leaf (cast to `dtype` if given)."""
    leaves = layout.treespec.flatten_up_to(tree)
    dtype = dtype or (leaves[0].dtype if leaves else torch.float32)
    device = leaves[0].device if leaves else "cpu"
    parts = [leaf.reshape(-1).to(dtype) for leaf in leaves]
    pad = layout.padded_total - layout.total
    if pad:
        parts.append(torch.zeros(pad, dtype=dtype, device=device))
    return torch.cat(parts)


def unflatten(buffer: torch.Tensor, layout: FlatLayout) -> PyTree:
    """The tree back from a flat buffer: each leaf is a view into `buffer` (no copy)."""
    if buffer.ndim != 1 or buffer.numel() < layout.total:
        raise ValueError(f"buffer of shape {tuple(buffer.shape)} does not hold a layout of {layout.total} elements")
    leaves = [buffer[o:o + n].view(shape) for o, n, shape in zip(layout.offsets, layout.sizes, layout.shapes)]
    return optree.tree_unflatten(layout.treespec, leaves)
