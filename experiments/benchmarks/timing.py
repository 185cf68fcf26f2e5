"""Interleaved timing of jitted functions: compile once, then median of repeats."""

from __future__ import annotations

import json
import pathlib
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax

from experiments import provenance


def compile_seconds(fn: Callable, *args: Any) -> float:
    """Seconds to lower and compile ``fn`` for ``args`` (no execution)."""
    return compiled(fn, *args)[1]


def compiled(fn: Callable, *args: Any) -> tuple[Callable, float]:
    """``fn`` compiled for ``args``, and the seconds lowering and compiling took.

    The compiled function takes arguments of the same shapes and dtypes.
    """
    start = time.perf_counter()
    executable = jax.jit(fn).lower(*args).compile()
    return executable, time.perf_counter() - start


def interleaved_medians(
    candidates: dict[str, tuple[Callable, tuple]],
    repeats: int,
    inner: int,
) -> dict[str, float]:
    """Median seconds per call of each candidate, measured round-robin.

    Each candidate is a jitted function and its arguments. After one warm-up
    call each, every round times ``inner`` back-to-back calls of every candidate
    in turn, so that drifts of the machine hit all of them alike.
    """
    return interleaved_medians_and_faults(candidates, repeats, inner)[0]


def _minor_faults() -> int:
    """The process's minor page faults so far (0 where ``resource`` is missing)."""
    try:
        import resource
    except ImportError:  # not on Unix
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def interleaved_medians_and_faults(
    candidates: dict[str, tuple[Callable, tuple]],
    repeats: int,
    inner: int,
) -> tuple[dict[str, float], dict[str, float]]:
    """:func:`interleaved_medians`, and each candidate's minor page faults per call.

    A minor fault is the kernel mapping a fresh page of memory on its first
    touch: a host allocator that hands memory back to the system between calls
    makes every call fault again on the pages it touches. On a CPU the faults
    can cost as much as the arithmetic of a small step, and they depend on
    the process's heap as much as on the program (see BENCHMARKS.md,
    section 1). Counted over the timed calls (0 where the platform does not
    count them).
    """
    for fn, args in candidates.values():
        jax.block_until_ready(fn(*args))
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    faults = dict.fromkeys(candidates, 0)
    for _ in range(repeats):
        for name, (fn, args) in candidates.items():
            faults_before = _minor_faults()
            start = time.perf_counter()
            for _ in range(inner):
                out = fn(*args)
            jax.block_until_ready(out)
            samples[name].append((time.perf_counter() - start) / inner)
            faults[name] += _minor_faults() - faults_before
            del out
    medians = {name: statistics.median(s) for name, s in samples.items()}
    calls = repeats * inner
    return medians, {name: count / calls for name, count in faults.items()}


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def environment() -> dict[str, str]:
    """Where a benchmark ran, and with what code: device, backend, machine, jax
    version, the git commit and whether the tree had uncommitted changes."""
    return {
        "device": str(jax.devices()[0].device_kind),
        "backend": jax.default_backend(),
        "machine": platform.platform(),
        "jax": jax.__version__,
        **provenance.code_version(),
    }


def write_json(path: pathlib.Path | None, result: dict[str, Any]) -> None:
    """Writes ``result`` to ``path`` (if given), creating its folder."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
