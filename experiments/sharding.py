"""Device meshes and shardings for data- and model-parallel training.

A mesh has two named axes: ``"data"`` splits every batch, ``"model"``
optionally splits parameters along their last dimension. Everything else is
left to ``jax.jit``: the loss on a sharded batch is the global mean, its
gradient the global mean gradient, and every value the optimizer branches on
(the gradient-norm reading, the phase flag, the line search's losses) is a
replicated scalar, so all devices take the same branch and the same number of
line-search steps.

Example:
    >>> import jax
    >>> import numpy as np
    >>> from experiments import sharding
    >>> mesh = sharding.make_mesh(sharding.parse_mesh(None))  # All devices, data.
    >>> batch = sharding.global_batch(mesh, np.zeros((8 * jax.device_count(), 3)))
    >>> batch.sharding.spec == jax.sharding.PartitionSpec("data")
    True
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

AXES = ("data", "model")


def parse_mesh(spec: str | None, num_devices: int | None = None) -> dict[str, int]:
    """``"data=4,model=2"`` as ``{"data": 4, "model": 2}``.

    ``None`` (the default) is data-parallel over all devices. The axis sizes
    multiply to the number of devices used, the first ones of ``jax.devices()``
    (which spans all hosts after ``jax.distributed.initialize()``).
    """
    num_devices = jax.device_count() if num_devices is None else num_devices
    if spec is None:
        return {"data": num_devices, "model": 1}
    axes = {"data": 1, "model": 1}
    for part in spec.split(","):
        name, _, size = part.partition("=")
        name = name.strip()
        if name not in AXES or not size.strip().isdigit() or int(size) < 1:
            raise ValueError(
                f"--mesh takes axis=size pairs over {AXES}, such as 'data=8' or "
                f"'data=4,model=2'; got {spec!r}."
            )
        axes[name] = int(size)
    if axes["data"] * axes["model"] > num_devices:
        raise ValueError(
            f"--mesh {spec!r} covers {axes['data'] * axes['model']} devices, but "
            f"only {num_devices} are available."
        )
    return axes


def make_mesh(axes: dict[str, int], devices: list | None = None) -> Mesh:
    """A ``("data", "model")`` mesh over the first devices of ``devices``."""
    devices = jax.devices() if devices is None else devices
    size = axes["data"] * axes["model"]
    grid = np.asarray(devices[:size]).reshape(axes["data"], axes["model"])
    return Mesh(grid, AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Splits the leading (example) dimension over the ``"data"`` axis."""
    return NamedSharding(mesh, PartitionSpec("data"))


def param_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    """The last dimension over ``"model"`` where it divides evenly, else none."""
    model = mesh.shape["model"]
    if model > 1 and len(shape) >= 2 and shape[-1] % model == 0:
        return NamedSharding(mesh, PartitionSpec(*[None] * (len(shape) - 1), "model"))
    return replicated(mesh)


def params_shardings(mesh: Mesh, params: Any) -> Any:
    return jax.tree.map(lambda x: param_sharding(mesh, np.shape(x)), params)


def state_shardings(mesh: Mesh, tx: optax.GradientTransformation, params: Any) -> Any:
    """Shardings for ``tx``'s state: params-shaped parts follow the params.

    Moments, CG directions and gradient sums get their parameter's sharding;
    counters, flags and other scalars are replicated.
    """
    state = jax.eval_shape(tx.init, params)
    try:
        return optax.tree_utils.tree_map_params(
            tx,
            lambda _, sharding: sharding,
            state,
            params_shardings(mesh, params),
            transform_non_params=lambda _: replicated(mesh),
            is_leaf=lambda x: isinstance(x, NamedSharding),
        )
    except IndexError:
        # optax.lbfgs's line search cannot be initialised with the params
        # placeholder; a leaf shaped like a parameter gets its sharding.
        shapes = {np.shape(x) for x in jax.tree.leaves(params)}
        return jax.tree.map(
            lambda x: (
                param_sharding(mesh, x.shape) if x.shape in shapes else replicated(mesh)
            ),
            state,
        )


def global_batch(mesh: Mesh, array: np.ndarray, sharded: bool = True) -> jax.Array:
    """``array`` (the whole batch, present on every host) split over ``"data"``.

    With ``sharded=False`` every device gets all of it. Each host builds only
    the shards of its own devices, so the same call works on one machine and
    across hosts.
    """
    target = batch_sharding(mesh) if sharded else replicated(mesh)
    return jax.make_array_from_callback(array.shape, target, lambda index: array[index])
