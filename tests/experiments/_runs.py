"""Settings and helpers shared by the experiments' tests."""

import numpy as np
import orbax.checkpoint as ocp

# The smallest of the paper's models on the offline digits.
SMALL = {"model": "vit-nomlp-wkewq-wvwo", "dataset": "digits", "progress": False}
# A budget sweep's runs: its rate and batch size.
SMALL_SWEEP = dict(SMALL, lr=3e-3, batch_size=64)
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
