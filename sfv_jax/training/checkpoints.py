"""The run's orbax checkpoints: ``WORKDIR/checkpoints/<step>/`` holds the train state (``state``) and the
data position (``meta``); restored straight into the target shardings (any mesh saved it)."""

from __future__ import annotations

import gc
import logging
import os
import sys
import time
from pathlib import Path

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import flags

from sfv_jax.checkpoint.safetensors_io import CheckpointError
from sfv_jax.parallel import sharding
from sfv_jax.training import steps as train_steps


def default_sharding() -> jax.sharding.Sharding:
    """Where a restore puts arrays whose target has no sharding: this process's first device."""
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def checkpoint_manager(workdir: str | Path, config: ml_collections.ConfigDict | None = None):
    """The workdir's orbax manager (``config``: create the folder, keep ``keep_checkpoints``). With several
    processes orbax's barriers go through the coordination service (with timeouts) instead of collectives
    (whose first use has a 30-s set-up deadline; see ``sfv_jax.parallel.sharding.barrier``)."""
    if jax.process_count() > 1 and "experimental_orbax_use_distributed_barrier" in flags.FLAGS:
        flags.FLAGS["experimental_orbax_use_distributed_barrier"].value = True
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.keep_checkpoints if config else None,
        enable_async_checkpointing=True,
        create=config is not None,
    )
    return ocp.CheckpointManager(Path(workdir).absolute() / "checkpoints", options=options)


def restore(mngr, like: train_steps.TrainState, step: int | None = None) -> tuple[train_steps.TrainState, dict]:
    """(state, meta) of checkpoint ``step`` (default: the latest), with ``like``'s shapes, dtypes and
    shardings (arrays or ``jax.ShapeDtypeStruct``s; no sharding: the default device)."""
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{mngr.directory}: no checkpoint")
    if step not in mngr.all_steps():
        raise FileNotFoundError(f"{mngr.directory}: no checkpoint at step {step} (have {mngr.all_steps()})")

    def spec(x):
        s = ocp.utils.to_shape_dtype_struct(x)
        return (
            s
            if getattr(s, "sharding", None) is not None
            else jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=default_sharding())
        )

    abstract = jax.tree.map(spec, like)
    out = mngr.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
    )
    return out["state"], out["meta"]


class AbandonedReads:
    """Silences the failed reads a damaged checkpoint leaves behind. When orbax gives up on a checkpoint,
    the coroutines still reading its other arrays are dropped; each one's error is reported by Python when
    the coroutine is collected (``Exception ignored in: <coroutine ...>``, one traceback per array: about
    1,750 lines for a train state), burying the one warning that matters. After :meth:`install` (called
    once a restore has failed) such reports from orbax's and TensorStore's coroutines are counted instead
    (``count``); everything else still reaches the previous hook."""

    count = 0
    _installed = False
    _MODULES = ("/orbax/", "/tensorstore/")

    @classmethod
    def install(cls) -> None:
        if cls._installed:
            return
        previous = sys.unraisablehook

        def hook(unraisable):
            code = getattr(unraisable.object, "cr_code", None)
            if code is not None and any(m in code.co_filename for m in cls._MODULES):
                cls.count += 1
                return
            previous(unraisable)

        sys.unraisablehook = hook
        cls._installed = True


def restore_newest_readable(
    mngr, state: train_steps.TrainState, workdir: Path, fallback: bool
) -> tuple[train_steps.TrainState, dict]:
    """Restore the newest checkpoint that can be read. One that cannot is named with the reason and moved
    to ``workdir/unreadable_checkpoints/<step>`` (kept, not deleted), and the previous one is tried;
    ``fallback=False`` stops with a CheckpointError instead."""
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            return restore(mngr, state, step)
        except Exception as e:  # noqa: BLE001 (orbax raises many kinds for a damaged checkpoint)
            AbandonedReads.install()
            gc.collect()  # the abandoned reads end here (and any later ones are counted too), not in the log
            reason = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
            where = Path(mngr.directory) / str(step)
            if not fallback:
                raise CheckpointError(
                    f"checkpoint {where} cannot be read ({reason}); --config.checkpoint_fallback=True resumes "
                    f"from the newest readable one"
                ) from None
            aside = workdir / "unreadable_checkpoints" / f"{step}"
            if jax.process_index() == 0:
                aside.parent.mkdir(exist_ok=True)
                os.replace(where, aside if not aside.exists() else aside.with_name(f"{step}.{int(time.time())}"))
            sharding.barrier(f"checkpoint {step} set aside")
            mngr.reload()
            logging.warning(
                "checkpoint %s cannot be read (%s): moved to %s; trying the previous one", where, reason, aside
            )
    raise CheckpointError(f"{mngr.directory}: no checkpoint can be read (the unreadable ones are in {aside.parent})")
