"""Helpers shared by the experiments' tests (the runs they train are the
fixtures of ``conftest.py``)."""

import numpy as np
import orbax.checkpoint as ocp

# Everything but the clock: times depend on the machine, not on the maths.
TIMERS = ("wall_time", "compile_time")


def without_timers(rows):
    return [{k: v for k, v in r.items() if k not in TIMERS} for r in rows]


def checkpoint_leaves(out, epoch):
    manager = ocp.CheckpointManager(out / "checkpoints")
    restored = manager.restore(epoch)
    manager.close()
    state = restored["state"]
    return [np.asarray(state[str(i)]) for i in range(len(state))]
