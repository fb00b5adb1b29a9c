"""Which UNet parameters a run trains (``config.trainable``), as pure functions on parameter pytrees.

  ``all``       every UNet parameter
  ``temporal``  only the temporal layers: the temporal res blocks, the temporal transformer blocks with
                their frame-position embeddings, and the learned spatial/temporal mixers (SVD_Xtend's
                memory-saving mode trains the temporal transformer blocks; the temporal res blocks and
                mixers are the rest of what SVD added to its image model)

A parameter tree (the UNet's nested dict, or any pytree of the same structure: shardings, abstract
arrays) splits into ``(trainable, frozen)``, two nested dicts of the same nesting, each holding only its
leaves (an empty dict when nothing is frozen); :func:`merge` puts them back together. Frozen parameters
get no gradient, no optimizer state and no EMA: the train state keeps them once, as they were loaded.
"""

from __future__ import annotations

from typing import Any

from flax import traverse_util

TRAINABLE = ("all", "temporal")
# a parameter is temporal when one of its path components starts with one of these
TEMPORAL_MARKERS = ("temporal_res_block", "temporal_transformer_blocks", "time_mixer", "time_pos_embed")


def is_trainable(path: tuple[str, ...], trainable: str) -> bool:
    """Whether the parameter at ``path`` (its nested-dict keys) trains under ``trainable``."""
    if trainable == "all":
        return True
    if trainable == "temporal":
        return any(part.startswith(TEMPORAL_MARKERS) for part in path)
    raise ValueError(f"trainable={trainable!r}: must be one of {TRAINABLE}")


def split(params: Any, trainable: str) -> tuple[dict, dict]:
    """``params`` (nested dict) -> (trainable, frozen) nested dicts holding disjoint leaves."""
    flat = traverse_util.flatten_dict(dict(params))
    train = {p: v for p, v in flat.items() if is_trainable(p, trainable)}
    frozen = {p: v for p, v in flat.items() if p not in train}
    if not train:
        raise ValueError(f"trainable={trainable!r} selects no parameter of this model")
    return traverse_util.unflatten_dict(train), traverse_util.unflatten_dict(frozen)


def merge(trainable: Any, frozen: Any) -> dict:
    """The inverse of :func:`split`: one nested dict with the leaves of both."""
    if not frozen:
        return trainable
    flat = traverse_util.flatten_dict(dict(trainable))
    flat.update(traverse_util.flatten_dict(dict(frozen)))
    return traverse_util.unflatten_dict(flat)
