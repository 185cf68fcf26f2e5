"""Many scalar leaves stored as one 1-D array per dtype.

A jitted call pays a few microseconds for every array it takes in and gives
back, whatever its size, and for every pytree node it has to flatten in
Python. :class:`PackedScalars` keeps a set of named fields (scalars, and
trees of them) in one array per dtype and gives each field back on demand,
as slices of those arrays: inside ``jit`` the slices cost nothing, and the
call passes two or three arrays instead of dozens (for
:func:`twophase_optax.two_phase`'s state this halves the per-call constant
measured at 1e4 parameters; BENCHMARKS.md section 1). Leaves that are not
scalars (a gradient sum, say) keep their places.

Example:
  >>> import jax.numpy as jnp
  >>> from twophase_optax import packed_scalars
  >>> count = jnp.asarray(3, jnp.int32)
  >>> best = (jnp.asarray(0.5), jnp.asarray(2.0))
  >>> packed = packed_scalars.pack({"count": count, "best": best})
  >>> best = packed.get("best")
  >>> len(packed.arrays), int(packed.get("count")), float(best[1])
  (2, 3, 2.0)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _is_none(node: Any) -> bool:
    return node is None


class PackedScalars:
    """Named fields whose scalar leaves live in one array per dtype.

    Build one with :func:`pack`; read a field with :meth:`get`. As a pytree
    its children are ``arrays`` (one 1-D array per dtype of the scalars, in the
    order of their first appearance) and ``rest``, each field with its scalars
    taken out (``None`` in their places): what else it holds keeps its place
    there. Where each scalar went is static: ``slots`` gives, per field, each
    scalar's key path in its field, its array and its index.
    """

    __slots__ = ("arrays", "rest", "names", "slots")

    def __init__(self, arrays: tuple, rest: tuple, names: tuple, slots: tuple):
        self.arrays = arrays
        self.rest = rest
        self.names = names
        self.slots = slots

    def get(self, name: str) -> Any:
        """The field ``name`` as it was packed: its scalars sliced out again."""
        field = self.names.index(name)
        places = {path: (group, index) for path, group, index in self.slots[field]}

        def fill(path, x):
            if path not in places:
                return x
            group, index = places[path]
            return self.arrays[group][index]

        return jax.tree_util.tree_map_with_path(
            fill, self.rest[field], is_leaf=_is_none
        )

    def unpack(self) -> dict[str, Any]:
        """All fields, by name."""
        return {name: self.get(name) for name in self.names}

    def __eq__(self, other: object) -> bool:
        # As a NamedTuple of the same leaves would compare.
        if not isinstance(other, PackedScalars):
            return NotImplemented
        return (self.names, self.slots, self.arrays, self.rest) == (
            other.names,
            other.slots,
            other.arrays,
            other.rest,
        )

    __hash__ = None  # mutable leaves, as a tuple of arrays

    def __repr__(self) -> str:
        return f"PackedScalars({', '.join(self.names)})"


def _flatten(packed: PackedScalars):
    # The scalars' places are None in ``rest``, which JAX flattens without
    # calling back into Python: a jitted call's arguments flatten fast.
    return (packed.arrays, packed.rest), (packed.names, packed.slots)


def _unflatten(aux: tuple, children) -> PackedScalars:
    arrays, rest = children
    return PackedScalars(arrays, rest, *aux)


jax.tree_util.register_pytree_node(PackedScalars, _flatten, _unflatten)


def _is_scalar(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic)) and np.ndim(x) == 0


def pack(fields: Mapping[str, Any], keep: tuple[str, ...] = ()) -> PackedScalars:
    """``fields`` (a name per field, each a scalar or a pytree) packed.

    Scalars of one dtype go into one array, in order; any other leaf stays
    where it is in its field, and so does a scalar that is a field named in
    ``keep`` of a NamedTuple or a dict inside a field (``optax.tree.get``
    finds it there by name). Works on concrete arrays and inside ``jit``.
    """
    groups: dict[Any, list] = {}  # dtype -> its scalars, in order
    rest, slots = [], []
    for name in fields:
        places = []

        def take_out(path, x, places=places):
            if not _is_scalar(x) or (path and _key_name(path[-1]) in keep):
                return x
            dtype = jnp.result_type(x)
            group = groups.setdefault(dtype, [])
            group.append(jnp.asarray(x, dtype))
            places.append((path, list(groups).index(dtype), len(group) - 1))
            return None

        rest.append(jax.tree_util.tree_map_with_path(take_out, fields[name]))
        slots.append(tuple(places))
    arrays = tuple(jnp.stack(scalars) for scalars in groups.values())
    return PackedScalars(arrays, tuple(rest), tuple(fields), tuple(slots))


def _key_name(key: Any) -> Any:
    return getattr(key, "name", getattr(key, "key", None))
