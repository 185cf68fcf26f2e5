"""The training script under faults: killed runs, full disks, corrupted checkpoints."""

import errno
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("flax", reason="the experiments need flax")
pytest.importorskip("orbax.checkpoint", reason="checkpoints need orbax")
import orbax.checkpoint as ocp  # noqa: E402
from _runs import checkpoint_leaves  # noqa: E402

from experiments import checkpoints  # noqa: E402
from experiments import config as config_lib  # noqa: E402
from experiments import run_records  # noqa: E402
from experiments import train  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
EPOCHS = 4


def drop_time(rows):
    return [
        {k: v for k, v in r.items() if k not in ("wall_time", "compile_time")}
        for r in rows
    ]


@pytest.fixture(scope="module")
def common(small_run):
    """The fault tests' run: the fixed split after 2 epochs."""
    return dict(**small_run, optimizer="two-phase-fixed", swap_epoch=2, lr=3e-3)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, common):
    """An uninterrupted run: its rows and its last checkpoint's leaves."""
    out = tmp_path_factory.mktemp("reference")
    rows = train.train(config_lib.Config.of(**common, epochs=EPOCHS, out=str(out)))
    return drop_time(rows), checkpoint_leaves(out, EPOCHS - 1)


def assert_same_result(out, reference):
    rows, leaves = reference
    assert drop_time(run_records.read_metrics(out / "metrics.jsonl")) == rows
    for a, b in zip(checkpoint_leaves(out, EPOCHS - 1), leaves, strict=True):
        np.testing.assert_array_equal(a, b)


def cli(common, out, *extra):
    return [
        sys.executable,
        "-m",
        "experiments.train",
        "--model",
        common["model"],
        "--optimizer",
        common["optimizer"],
        "--swap-epoch",
        str(common["swap_epoch"]),
        "--lr",
        str(common["lr"]),
        "--epochs",
        str(EPOCHS),
        "--out",
        str(out),
        "--no-progress",
        *extra,
    ]


@pytest.mark.parametrize(
    "signum", [signal.SIGTERM, signal.SIGKILL], ids=["TERM", "KILL"]
)
def test_run_killed_mid_epoch_resumes_to_the_same_result(
    signum, tmp_path, reference, common
):
    out = tmp_path / "run"
    process = subprocess.Popen(
        cli(common, out),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Epoch 1's checkpoint is complete: the run is in epoch 2 (the first CG one).
    deadline = time.monotonic() + 300
    while not (out / "checkpoints" / "1").is_dir():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.02)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=300)
    if signum == signal.SIGTERM:
        assert process.returncode == 128 + signal.SIGTERM, stderr
        assert "Continue with --resume" in stderr
    else:
        assert process.returncode == -signal.SIGKILL
    finished = [r["epoch"] for r in run_records.read_metrics(out / "metrics.jsonl")]
    assert finished and max(finished) < EPOCHS - 1, "killed too late to test"
    train.main(cli(common, out, "--resume")[3:])  # In this process: no second start-up.
    assert_same_result(out, reference)


def fail_save_at(monkeypatch, epoch, error):
    real_save = ocp.CheckpointManager.save

    def save(self, step, *args, **kwargs):
        if step == epoch:
            raise error
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        PermissionError(errno.EACCES, "Permission denied"),
    ],
    ids=["disk full", "unwritable"],
)
def test_failed_checkpoint_write_is_a_clear_error_and_keeps_the_others(
    error, tmp_path, monkeypatch, reference, common
):
    out = tmp_path / "run"
    fail_save_at(monkeypatch, 2, error)
    with pytest.raises(SystemExit, match=r"epochs \[0, 1\] are intact.*--resume"):
        train.main(cli(common, out)[3:])
    monkeypatch.undo()
    assert ocp.CheckpointManager(out / "checkpoints").all_steps() == [0, 1]
    if error.errno == errno.ENOSPC:  # The same path after either error.
        # Freed space: the run continues from epoch 1's checkpoint.
        config = config_lib.Config.of(
            **common, epochs=EPOCHS, out=str(out), resume=True
        )
        train.train(config)
        assert_same_result(out, reference)


def test_failed_metrics_write_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    run_records.append_metrics(path, {"epoch": 0})

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(checkpoints.RunOutputError, match="epoch 1's metrics"):
        run_records.append_metrics(path, {"epoch": 1})
    assert run_records.read_metrics(path) == [{"epoch": 0}]


def test_unwritable_output_directory_is_a_clear_error(tmp_path, common):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(SystemExit, match="Cannot write to the output directory"):
        train.main(cli(common, blocker / "run")[3:])


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("mount") is None,
    reason="a real full disk needs root to mount a small tmpfs; "
    "test_failed_checkpoint_write_... covers the same code with a simulated one",
)
def test_real_full_disk_keeps_the_earlier_checkpoints(tmp_path, reference, common):
    probe = tmp_path / "probe"
    train.train(config_lib.Config.of(**common, epochs=1, out=str(probe)))
    files = (probe / "checkpoints").rglob("*")
    one = sum(f.stat().st_size for f in files if f.is_file())
    disk = tmp_path / "disk"
    disk.mkdir()
    # Room for about two checkpoints and the metrics, not for a third.
    size = int(2.6 * one) + 64 * 1024
    mount = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)]
    mounted = subprocess.run(mount, capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        out = disk / "run"
        with pytest.raises(checkpoints.RunOutputError, match="are intact") as caught:
            train.train(config_lib.Config.of(**common, epochs=EPOCHS, out=str(out)))
        assert "epoch" in str(caught.value)
        moved = tmp_path / "moved"
        shutil.copytree(out, moved)
    finally:
        subprocess.run(["umount", str(disk)], check=True)
    kept = ocp.CheckpointManager(moved / "checkpoints").all_steps()
    assert kept, "no checkpoint was written before the disk filled up"
    train.train(
        config_lib.Config.of(**common, epochs=EPOCHS, out=str(moved), resume=True)
    )
    assert_same_result(moved, reference)


def corrupt_flip_bytes(step_dir):
    files = [f for f in step_dir.rglob("*") if f.is_file()]
    biggest = max(files, key=lambda f: f.stat().st_size)
    data = bytearray(biggest.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
    biggest.write_bytes(bytes(data))


def corrupt_truncate_all(step_dir):
    for f in step_dir.rglob("*"):
        if f.is_file():
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])


@pytest.mark.parametrize(
    "corrupt",
    [corrupt_flip_bytes, corrupt_truncate_all],
    ids=["flipped bytes", "truncated files"],
)
def test_corrupted_latest_checkpoint_falls_back_to_the_previous_one(
    corrupt, tmp_path, reference, common
):
    out = tmp_path / "run"
    train.train(config_lib.Config.of(**common, epochs=3, out=str(out)))
    corrupt(out / "checkpoints" / "2")
    with pytest.warns(UserWarning, match="epoch 2 is unreadable or corrupted"):
        train.train(
            config_lib.Config.of(**common, epochs=EPOCHS, out=str(out), resume=True)
        )
    assert (out / "corrupted-checkpoints" / "2").is_dir()
    assert_same_result(out, reference)


def test_checkpoints_every_few_epochs_resume_to_the_same_result(
    tmp_path, reference, common
):
    # Every 3 epochs and after the last: epochs 2 and 3 of 4.
    out = tmp_path / "run"
    config = config_lib.Config.of(
        **common, epochs=EPOCHS, out=str(out), checkpoint_every=3
    )
    train.train(config)
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir()) == [2, 3]
    assert_same_result(out, reference)
    # Stopped before the last checkpoint: epoch 3 (a CG epoch) is redone.
    shutil.rmtree(out / "checkpoints" / "3")
    config.run.resume = True
    rows = train.train(config)
    assert [r["epoch"] for r in rows] == list(range(EPOCHS))
    assert_same_result(out, reference)
