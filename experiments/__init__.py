"""Experiments for twophase_optax: models, data, training scripts and benchmarks.

Importing the package turns on JAX's persistent compilation cache, so that a
budget sweep, which compiles the same step functions for every seed and budget,
compiles each program once and reads it back after that. The cache lives in
``$TWOPHASE_OPTAX_CACHE`` (default ``~/.cache/twophase_optax/jax``, or under
``$XDG_CACHE_HOME``); set ``TWOPHASE_OPTAX_CACHE=off`` to turn it off. A cache
directory set through JAX's own ``JAX_COMPILATION_CACHE_DIR`` is left as it is.
"""

import os
import pathlib

CACHE_VARIABLE = "TWOPHASE_OPTAX_CACHE"


def compilation_cache_dir() -> pathlib.Path | None:
    """Where compiled programs are cached; ``None`` when it is turned off."""
    setting = os.environ.get(CACHE_VARIABLE, "")
    if setting.lower() in ("off", "0", "none", "false"):
        return None
    if setting:
        return pathlib.Path(setting).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "twophase_optax" / "jax"


def enable_compilation_cache() -> pathlib.Path | None:
    """Points JAX's persistent compilation cache at :func:`compilation_cache_dir`."""
    import jax

    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return pathlib.Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
    directory = compilation_cache_dir()
    if directory is not None:
        jax.config.update("jax_compilation_cache_dir", str(directory))
        if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
            # Every step function of a run takes seconds to compile; the
            # small jitted helpers are not worth a file each.
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return directory


enable_compilation_cache()
