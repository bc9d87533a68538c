"""Short, readable names for tracked layers, and groups of them for wide tables.

Module paths such as ``model.transformer.h.3.mlp.c_fc`` make poor column names: the
shared prefix says nothing and a 48-layer model gives 48 columns. :func:`short_layer_names`
drops the path components every layer shares; :func:`layer_columns` returns one column
per layer when there are few, and otherwise sums layers into groups: per block and kind
(``h.3.attn``, ``h.3.mlp``) and, when even that is too many, per kind (``attn``, ``mlp``).
Scores are additive over layers (docs/method.md, section 1), so a group's contribution is
the sum of its layers'.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["short_layer_names", "layer_columns", "block_and_kind", "DEFAULT_MAX_LAYER_COLUMNS"]

#: More numeric columns than this and a W&B table stops being readable: group instead.
DEFAULT_MAX_LAYER_COLUMNS = 16


def short_layer_names(names: Sequence[str]) -> list[str]:
    """Layer names without the dotted prefix they all share (``model.transformer.h.3.mlp.c_fc``
    -> ``h.3.mlp.c_fc``; the name a block index belongs to is kept). A single layer keeps its last two components; names stay unique
    (the full name is kept where shortening would make two equal)."""
    parts = [str(n).split(".") for n in names]
    if not parts:
        return []
    if len(parts) == 1:
        return [".".join(parts[0][-2:])]
    common = 0
    while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    if common and any(p[common].isdigit() for p in parts):
        common -= 1  # keep the container a block index belongs to: "h.3", not "3"
    short = [".".join(p[common:]) for p in parts]
    if len(set(short)) != len(short):
        return [str(n) for n in names]
    return short


def block_and_kind(short: str) -> tuple[str | None, str]:
    """``h.3.mlp.c_fc`` -> (``h.3``, ``mlp``); a name with no numeric component has no block
    and is its own kind."""
    parts = short.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            block = ".".join(parts[: i + 1])
            kind = parts[i + 1] if i + 1 < len(parts) else parts[i]
            return block, kind
    return None, short


def layer_columns(names: Sequence[str], max_columns: int = DEFAULT_MAX_LAYER_COLUMNS) -> dict[str, list[int]]:
    """Column name -> indices (into ``names``) of the layers summed into that column.

    One column per layer (short names) when there are at most ``max_columns`` layers;
    otherwise one per (block, kind), e.g. ``h.3.attn``; otherwise one per kind, e.g.
    ``attn``. Columns keep the order of first appearance.
    """
    short = short_layer_names(names)
    if len(short) <= max_columns:
        return {s: [i] for i, s in enumerate(short)}
    by_block: dict[str, list[int]] = {}
    by_kind: dict[str, list[int]] = {}
    for i, s in enumerate(short):
        block, kind = block_and_kind(s)
        by_block.setdefault(kind if block is None else f"{block}.{kind}", []).append(i)
        by_kind.setdefault(kind, []).append(i)
    if len(by_block) <= max_columns:
        return by_block
    return by_kind
