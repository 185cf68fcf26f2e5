"""Checkpoints of a training run that notice corruption and survive failed writes.

Each checkpoint is an orbax ``StandardSave`` of the parameters and optimizer
state (as a flat dict of their leaves), the run's counters, and a SHA-256
digest of both. A restore that finds a checkpoint unreadable, or its contents
out of step with its digest, sets it aside and takes the previous one.

Example:
  >>> import pathlib, tempfile
  >>> import jax.numpy as jnp
  >>> from experiments import checkpoints
  >>> out = pathlib.Path(tempfile.mkdtemp())
  >>> manager = checkpoints.open_checkpoints(out)
  >>> state = {"w": jnp.arange(3.0)}
  >>> checkpoints.save_checkpoint(manager, 0, state, {"forward_passes": 3.0})
  >>> counters = {"forward_passes": 0.0}
  >>> epoch, restored = checkpoints.restore_checkpoint(
  ...     manager, {"w": jnp.zeros(3)}, counters)
  >>> epoch, restored["w"].tolist(), counters["forward_passes"]
  (0, [0.0, 1.0, 2.0], 3.0)
  >>> manager.close()
"""

from __future__ import annotations

import hashlib
import pathlib
import shutil
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp


class RunOutputError(RuntimeError):
    """A checkpoint or metrics row could not be written (disk full, permissions)."""


def _checkpoint_tree(state: Any, counters: dict[str, float]) -> dict[str, Any]:
    # jax.Arrays as they are: orbax writes each host's shards and restores them
    # with the same shardings.
    leaves = jax.tree.leaves(state)
    return {
        "state": {str(i): x for i, x in enumerate(leaves)},
        "counters": {k: np.asarray(v, np.float64) for k, v in counters.items()},
    }


def digest(tree: Any) -> np.ndarray:
    """SHA-256 of every value in ``tree``, as 32 uint8; zeros if not addressable.

    Stored with each checkpoint, so that a restore notices flipped bits that
    the file formats would pass on silently. Arrays spread over several hosts
    are not hashed (no host holds them whole).
    """
    leaves = jax.tree.leaves(tree)
    if not all(getattr(x, "is_fully_addressable", True) for x in leaves):
        return np.zeros(32, np.uint8)  # orbax cannot save an empty array.
    sha = hashlib.sha256()
    for x in jax.device_get(leaves):
        x = np.ascontiguousarray(x)
        sha.update(f"{x.dtype}{x.shape}".encode())
        sha.update(x.tobytes())
    return np.frombuffer(sha.digest(), np.uint8).copy()


def open_checkpoints(
    out: pathlib.Path, name: str = "checkpoints", max_to_keep: int | None = 2
) -> ocp.CheckpointManager:
    """The run's checkpoint manager: ``<out>/<name>``, the last ``max_to_keep``
    kept (``None``: all of them, as for the epochs a budget sweep starts tails from)."""
    return ocp.CheckpointManager(
        pathlib.Path(out) / name,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, cleanup_tmp_directories=True
        ),
    )


def save_checkpoint(manager, epoch: int, state: Any, counters) -> None:
    """Writes epoch ``epoch``'s checkpoint; the older ones stay if it fails.

    orbax writes into a temporary directory and renames it when complete, and
    removes the oldest checkpoint only after that, so a failed write (a full
    disk, a killed process) never costs a checkpoint already written.
    """
    tree = _checkpoint_tree(state, counters)
    tree["digest"] = digest(tree)
    try:
        manager.save(epoch, args=ocp.args.StandardSave(tree))
        manager.wait_until_finished()
    except Exception as error:  # orbax wraps OSErrors in its own types.
        kept = sorted(manager.all_steps())
        raise RunOutputError(
            f"Could not write the checkpoint of epoch {epoch} to "
            f"{manager.directory}: {error}. The checkpoints of epochs {kept} are "
            "intact; once the cause is fixed (a full disk or missing "
            "permissions, say), run again with --resume."
        ) from error


def restore_checkpoint(
    manager, like: Any, counters, epoch: int | None = None
) -> tuple[int, Any] | None:
    """The newest readable checkpoint as ``(epoch, state)``; ``None`` if none.

    With ``epoch`` given, only that epoch's checkpoint is tried.

    ``like`` is a state of the same structure, shapes, dtypes and shardings
    (a freshly initialised run's); ``counters`` is updated in place. A
    checkpoint that cannot be read, or whose contents do not match the digest
    written with it, is moved to ``corrupted-checkpoints/`` beside the
    checkpoints, with a warning, and the previous one is tried.
    """
    target = jax.tree.map(
        ocp.utils.to_shape_dtype_struct, _checkpoint_tree(like, counters)
    )
    target["digest"] = jax.ShapeDtypeStruct((32,), np.uint8)
    wanted = epoch
    steps = sorted(manager.all_steps(), reverse=True)
    for epoch in steps if wanted is None else [e for e in steps if e == wanted]:
        try:
            restored = manager.restore(epoch, args=ocp.args.StandardRestore(target))
            found = digest({k: restored[k] for k in ("state", "counters")})
            if found.any() and not np.array_equal(found, restored["digest"]):
                raise ValueError("its contents do not match the digest saved with it")
        except Exception as error:
            _set_aside(manager, epoch, error)
            continue
        leaves = [restored["state"][str(i)] for i in range(len(restored["state"]))]
        state = jax.tree.unflatten(
            jax.tree.structure(like), [jnp.asarray(x) for x in leaves]
        )
        counters.update({k: float(v) for k, v in restored["counters"].items()})
        return int(epoch), state
    return None


def _set_aside(manager, epoch: int, error: Exception) -> None:
    directory = pathlib.Path(manager.directory)
    aside = directory.parent / "corrupted-checkpoints" / str(epoch)
    if jax.process_index() == 0:
        aside.parent.mkdir(exist_ok=True)
        shutil.rmtree(aside, ignore_errors=True)
        (directory / str(epoch)).rename(aside)
    sync_hosts(f"set aside checkpoint {epoch}")
    manager.reload()
    warnings.warn(
        f"The checkpoint of epoch {epoch} is unreadable or corrupted ({error}); "
        f"moved it to {aside} and falling back to the previous checkpoint.",
        stacklevel=3,
    )


def sync_hosts(name: str) -> None:
    """A barrier across processes (a no-op in a single-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


KEPT = "kept"  # The directory of the checkpoints kept for good.


def kept_epochs(run: str) -> list[int]:
    """The epochs whose checkpoints the run in ``run`` keeps for good."""
    return sorted(int(p.name) for p in (pathlib.Path(run) / KEPT).glob("[0-9]*"))
