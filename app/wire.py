"""The adapter as it crosses Flower: one flat float32 vector, not one array per LoRA matrix.

Flower 1.41 moves every array of a message as its own object: one gRPC request, one SuperLink
database row and, on the node, one more pull each, in every stage, for every node. A LoRA adapter is
hundreds of small matrices (96 for the offline tiny model, 256 for r=4 on SD 1.5's attention), so
per-array transfer cost more than the training it carried (README: Performance). Packed, a message
is a handful of objects whatever the adapter's shape.

Both ends keep working with the list of matrices; only the messages carry the flat vector. The
coordinator sends the matrices' shapes in every fit and evaluate config, so that the ClientApp
process needs no model to unpack (it imports no torch), and the model checks the names and shapes
when the adapter is loaded.
"""

from __future__ import annotations

import json
import math

import numpy as np

SHAPES_KEY = "adapter-shapes"


def pack(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """[one flat vector] ([] stays []: a reply that carries figures only)."""
    if not arrays:
        return []
    return [np.concatenate([np.ravel(a) for a in arrays])]


def shapes_config(arrays: list[np.ndarray]) -> dict[str, str]:
    return {SHAPES_KEY: json.dumps([list(a.shape) for a in arrays])}


def unpack(wire: list[np.ndarray], shapes: list[tuple[int, ...]] | str) -> list[np.ndarray]:
    """The matrices back from `pack`'s vector; `shapes` as the config carries them, or a list."""
    if isinstance(shapes, str):
        shapes = [tuple(s) for s in json.loads(shapes)]
    if not wire:
        return []
    sizes = [math.prod(s) for s in shapes]
    if len(wire) != 1 or wire[0].ndim != 1 or wire[0].size != sum(sizes):
        raise ValueError(f"expected the adapter as one vector of {sum(sizes)} values, got arrays of shapes "
                         f"{[a.shape for a in wire]}: the other end runs another version of this app")
    return [part.reshape(s) for part, s in zip(np.split(wire[0], np.cumsum(sizes)[:-1]), shapes)]
