"""Which code, libraries and machine made a result: ``provenance.json``.

Every training run writes ``provenance.json`` into its directory (one record
per start: a resumed run adds one), and every table written from runs states
the code that made them in its first lines and writes the records' summary
beside it. A record holds:

* ``code``: the git commit, whether the tree was ``"clean"`` or
  ``"modified"``, and the library's version. A copy of a commit made
  elsewhere (a source archive, a remote machine, whose ``.git`` may be
  missing or stale) is named by the environment variable
  ``TWOPHASE_OPTAX_COMMIT``, which wins over git, with the tree ``"copy"``;
* ``second_phase``: the library's CG defaults (beta rule, the slope search's
  rtol and evaluation cap) and the run's optimizer section, with its swap rule;
* ``libraries``: jax, jaxlib, optax, flax and numpy versions;
* ``machine``: backend, device kind and count, the CPU model, its core count,
  the cores this process may use, and jax's float32 matmul precision.

    >>> from experiments import provenance
    >>> record = provenance.collect()
    >>> sorted(record)
    ['code', 'libraries', 'machine', 'second_phase']
    >>> provenance.describe(provenance.summarize([record])).startswith("Code: ")
    True
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import importlib.metadata
import json
import os
import pathlib
import platform
import subprocess
from collections.abc import Iterable
from typing import Any

import jax

import twophase_optax as tpo
from twophase_optax.conjugate_gradient import DEFAULT_BETA
from twophase_optax.conjugate_gradient import DEFAULT_MAX_EVALUATIONS
from twophase_optax.conjugate_gradient import DEFAULT_RTOL

FILE = "provenance.json"
COMMIT_VARIABLE = "TWOPHASE_OPTAX_COMMIT"
_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _git(*args: str) -> str:
    """A git command's output in this checkout; OSError if it fails."""
    done = subprocess.run(
        ["git", *args], cwd=_ROOT, capture_output=True, text=True, timeout=30
    )
    if done.returncode != 0:
        raise OSError(done.stderr)
    return done.stdout.strip()


def code_version() -> dict[str, str]:
    """``{"commit", "tree"}``: the commit named by ``TWOPHASE_OPTAX_COMMIT``
    (tree ``"copy"``) if set; else the checkout's short commit and
    ``"clean"`` or ``"modified"`` (tracked files); else ``"unknown"``."""
    named = os.environ.get(COMMIT_VARIABLE)
    if named:
        return {"commit": named, "tree": "copy"}
    try:
        commit = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
        return {"commit": commit, "tree": "modified" if dirty else "clean"}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "tree": "unknown"}


# The files whose content decides a run's numbers: the library and the
# experiments' training path (not the tables, plots or scripts around them).
TRAINING_FILES = (
    "checkpoints.py",
    "config.py",
    "data.py",
    "models.py",
    "sharding.py",
    "steps.py",
    "train.py",
    "trainer.py",
    "variants.py",
)


def code_digest() -> dict[str, str]:
    """Short sha256 digests of the library's source and of the experiments'
    training files: equal digests, equal code, whatever the commit or a
    modified tree says."""

    def digest(paths) -> str:
        h = hashlib.sha256()
        for path in paths:
            h.update(path.relative_to(_ROOT).as_posix().encode())
            h.update(path.read_bytes())
        return h.hexdigest()[:12]

    library = sorted((_ROOT / "twophase_optax").rglob("*.py"))
    training = [_ROOT / "experiments" / name for name in TRAINING_FILES]
    return {
        "library_digest": digest(library),
        "training_digest": digest([p for p in training if p.exists()]),
    }


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def _cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """The backend, devices and CPU this process runs on."""
    devices = jax.devices()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # Not on Linux.
        usable = os.cpu_count()
    return {
        "backend": jax.default_backend(),
        "device": str(devices[0].device_kind),
        "device_count": len(devices),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cores_usable": usable,
        "matmul_precision": str(jax.config.jax_default_matmul_precision or "default"),
        "platform": platform.platform(),
    }


def collect(config: Any = None) -> dict[str, Any]:
    """A provenance record; ``config`` (an ``experiments.config.Config``) adds
    the run's optimizer section and swap rule."""
    second_phase: dict[str, Any] = {
        "cg_beta": DEFAULT_BETA,
        "cg_linesearch_rtol": DEFAULT_RTOL,
        "cg_linesearch_max_evaluations": DEFAULT_MAX_EVALUATIONS,
    }
    if config is not None:
        second_phase["optimizer"] = dataclasses.asdict(config.optimizer)
    return {
        "code": {**code_version(), "version": tpo.__version__, **code_digest()},
        "second_phase": second_phase,
        "libraries": {
            name: _version(name) for name in ("jax", "jaxlib", "optax", "flax", "numpy")
        },
        "machine": machine(),
    }


def read(directory: pathlib.Path) -> list[dict[str, Any]]:
    """The records of the run in ``directory``, oldest first ([] if none)."""
    path = pathlib.Path(directory) / FILE
    if not path.exists():
        return []
    return json.loads(path.read_text())["records"]


def record_start(directory: pathlib.Path, config: Any = None, resumed=False) -> None:
    """Writes this start's record into ``directory``: a fresh run replaces the
    file, a resumed one adds its record to the earlier ones."""
    directory = pathlib.Path(directory)
    records = read(directory) if resumed else []
    record = collect(config)
    record["started"] = datetime.datetime.now(datetime.UTC).isoformat(
        timespec="seconds"
    )
    record["resumed"] = bool(resumed)
    (directory / FILE).write_text(json.dumps({"records": [*records, record]}, indent=2))


def summarize(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """What made a set of records: each distinct code version and machine with
    how many records name it, and the library versions seen."""
    records = list(records)

    def counted(key):
        seen: dict[str, dict[str, Any]] = {}
        for record in records:
            item = key(record)
            name = json.dumps(item, sort_keys=True)
            seen.setdefault(name, {**item, "records": 0})["records"] += 1
        return list(seen.values())

    return {
        "records": len(records),
        "code": counted(
            lambda r: {k: r["code"][k] for k in ("commit", "tree", "version")}
        ),
        "code_digests": counted(
            lambda r: {
                k: r["code"].get(k, "not recorded")
                for k in ("library_digest", "training_digest")
            }
        ),
        "machines": counted(
            lambda r: {
                k: r["machine"][k]
                for k in ("backend", "device", "cpu", "cores_usable")
                if k in r["machine"]
            }
        ),
        "libraries": counted(lambda r: r["libraries"]),
        "second_phase_defaults": counted(
            lambda r: {k: v for k, v in r["second_phase"].items() if k != "optimizer"}
        ),
    }


def committed(path: pathlib.Path) -> dict[str, Any]:
    """A summary for results made before runs recorded their provenance: the
    last commit that changed ``path`` and the library version at it (the code
    that made them is that commit's or older)."""

    relative = pathlib.Path(path).resolve().relative_to(_ROOT)
    commit, version = "unknown", "unknown"
    try:
        commit = _git("log", "-1", "--format=%h", "--", str(relative)) or commit
        source = _git("show", f"{commit}:twophase_optax/__init__.py")
    except (OSError, subprocess.SubprocessError):
        source = ""
    for line in source.splitlines():
        if line.startswith("__version__"):
            version = line.split("=", 1)[1].strip().strip('"')
    return {
        "records": 0,
        "committed_in": {"commit": commit, "version": version},
        "code": [],
        "machines": [],
        "libraries": [],
        "second_phase_defaults": [],
    }


def describe(summary: dict[str, Any]) -> str:
    """One paragraph for a table's first lines."""
    if "committed_in" in summary:
        c = summary["committed_in"]
        return (
            "Code: not recorded (made before runs recorded their provenance); "
            f"the runs were committed in {c['commit']} (twophase_optax "
            f"{c['version']}), so made by that code or older, not by the "
            f"current {tpo.__version__}. ({FILE})"
        )
    if not summary["records"]:
        return "Code: not recorded (made before runs recorded their provenance)."
    code = "; ".join(
        f"twophase_optax {c['version']} at commit {c['commit']} ({c['tree']}"
        + (
            f", {c['records']} of {summary['records']} starts)"
            if len(summary["code"]) > 1
            else ")"
        )
        for c in summary["code"]
    )
    digests = summary.get("code_digests", [])
    if len(digests) == 1 and "not recorded" not in digests[0].values():
        code += (
            "; the same library and training code in every start (digests "
            f"{digests[0]['library_digest']}, {digests[0]['training_digest']})"
        )
    elif len(digests) > 1:
        code += (
            f"; {len(digests)} different library or training codes across the starts"
        )
    libraries = "; ".join(
        ", ".join(f"{k} {v}" for k, v in lib.items() if k != "records")
        for lib in summary["libraries"]
    )
    machines = "; ".join(
        f"{m.get('device')} ({m.get('backend')}"
        + (f", {m['cpu']}" if m.get("backend") == "cpu" and m.get("cpu") else "")
        + (f", {m['cores_usable']} cores usable" if m.get("cores_usable") else "")
        + (f", {m['records']} starts" if len(summary["machines"]) > 1 else "")
        + ")"
        for m in summary["machines"]
    )
    return f"Code: {code}. Libraries: {libraries}. Machine: {machines}. ({FILE})"


def merge(*summaries: dict[str, Any]) -> dict[str, Any]:
    """One summary of the records behind several :func:`summarize` summaries,
    the same as summarizing those records together."""
    merged: dict[str, Any] = {"records": sum(s["records"] for s in summaries)}
    for key in (
        "code",
        "code_digests",
        "machines",
        "libraries",
        "second_phase_defaults",
    ):
        seen: dict[str, dict[str, Any]] = {}
        for summary in summaries:
            for item in summary.get(key, []):
                plain = {k: v for k, v in item.items() if k != "records"}
                name = json.dumps(plain, sort_keys=True)
                seen.setdefault(name, {**plain, "records": 0})["records"] += item[
                    "records"
                ]
        merged[key] = list(seen.values())
    return merged


def write_summary(directory: pathlib.Path, run_dirs: Iterable[pathlib.Path]) -> str:
    """Writes the summary of the runs in ``run_dirs`` to ``directory`` and
    returns its :func:`describe` line."""
    records = [r for d in run_dirs for r in read(d)]
    summary = summarize(records)
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / FILE).write_text(json.dumps(summary, indent=2))
    return describe(summary)


def main(argv: list[str] | None = None) -> None:
    """``python -m experiments.provenance DIR...``: writes ``provenance.json``
    into each results folder made before runs recorded their provenance (the
    commit that last changed it, :func:`committed`); a folder that has one
    keeps it."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=pathlib.Path, metavar="DIR")
    args = parser.parse_args(argv)
    for folder in args.folders:
        if not folder.is_dir():
            parser.error(f"argument DIR: {folder} is not a folder")
        path = folder / FILE
        if path.exists():
            print(f"{path}: kept")
            continue
        made = committed(folder)
        path.write_text(json.dumps(made, indent=2))
        print(f"{path}: {describe(made)}")


if __name__ == "__main__":
    main()
