"""Jitted programs built once per process for equal static inputs.

``jax.jit`` keeps its traces and executables on the jitted object: a fresh ``jax.jit(partial(...))`` traces,
lowers and loads (or compiles) its program again even when everything it closes over is equal. A second
``trainer.train`` in one process (a notebook, a sweep, a resumed run in a test) would pay that again: about
40 s for the tiny config's steps and random inits on a 2-core CPU, minutes at SVD's size. :func:`jitted`
returns the same jitted object for an equal key, so the second run finds its programs in jit's own cache.
The pipeline keeps its compiled stages here too (``diffusion/pipeline.py``): pipelines with equal modules (a
teacher and the generator trained from it) run the same executables on their own parameters.

A key holds what the program closes over: hashable static values (Flax modules compare by their fields, the
step settings are frozen dataclasses, shardings compare by mesh and spec; see :func:`shardings_key`). Values
that are not hashable by content (optax transformations are tuples of closures) are made unique per setting
where they are built (``layout.make_optimizers``), so their identity is a valid key.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Hashable
from typing import Any

import jax

MAX_PROGRAMS = 64  # jitted or compiled objects kept (traces and executables); least recently used go first

_cache: collections.OrderedDict[Hashable, Any] = collections.OrderedDict()
_lock = threading.Lock()


def jitted(key: Hashable, build: Callable[[], Any]) -> Any:
    """The object ``build()`` returned for an equal ``key`` earlier in this process, else ``build()`` (kept)."""
    with _lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    fn = build()
    with _lock:
        fn = _cache.setdefault(key, fn)
        _cache.move_to_end(key)
        while len(_cache) > MAX_PROGRAMS:
            _cache.popitem(last=False)
    return fn


def shardings_key(tree: Any) -> Hashable:
    """A pytree of shardings (``None`` leaves kept) as a hashable key: its structure and its leaves."""
    leaves, treedef = jax.tree.flatten(tree, is_leaf=lambda x: x is None)
    return treedef, tuple(leaves)


def clear() -> None:
    """Forget every kept program (their executables are freed with the last reference)."""
    with _lock:
        _cache.clear()
