"""Sharded training on simulated CPU devices matches one device."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("flax", reason="the experiments need flax")
pytest.importorskip("sklearn", reason="the MLP trains on scikit-learn's digits")

from _devices import run_with_devices  # noqa: E402

from experiments import sharding  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]


def sharded_run(data, model, steps, *flags):
    script = str(ROOT / "tests" / "experiments" / "_sharded_run.py")
    out = run_with_devices([script, str(data), str(model), str(steps), *flags])
    return json.loads(out.strip().splitlines()[-1])


def assert_params_close(a, b, rtol):
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=rtol, atol=1e-6)


def test_eight_data_parallel_devices_match_one_device_in_float32():
    result = sharded_run(8, 1, 200)
    many, one = result["many"], result["one"]
    assert many["devices"] == 8 and one["devices"] == 1
    # The swap falls inside the first 20 steps and on the same step.
    assert 0 < many["swap_step"] < 20
    assert many["swap_step"] == one["swap_step"]
    # The losses agree to rounding through the Adam phase and the first CG
    # steps. Later the golden section compares losses whose last bits differ
    # (8 partial sums against 1), picks slightly different steps, and the
    # float32 runs drift apart (parameters by up to ~1e-2 relative after 20
    # steps); they converge alike.
    np.testing.assert_allclose(many["values"][:12], one["values"][:12], rtol=1e-5)
    assert many["final_loss"] == pytest.approx(one["final_loss"], rel=0.01)
    assert many["final_loss"] < 0.2 * many["values"][0]  # It did train.
    # Moments and CG trees keep the params' (replicated) sharding; one trace.
    assert many["state_sharding_kept"] and one["state_sharding_kept"]
    assert many["cache_size"] == 1 and one["cache_size"] == 1


def test_eight_data_parallel_devices_match_one_device_in_float64():
    # In float64 the rounding of the sums never flips a line-search decision.
    result = sharded_run(8, 1, 30, "--float64")
    many, one = result["many"], result["one"]
    assert 0 < many["swap_step"] == one["swap_step"] < 20
    assert_params_close(many["params_after_20"], one["params_after_20"], rtol=1e-9)
    assert many["state_sharding_kept"] and many["cache_size"] == 1


def test_model_axis_shards_the_state_like_the_params():
    result = sharded_run(4, 2, 30, "--float64")
    many, one = result["many"], result["one"]
    assert many["swap_step"] == one["swap_step"] < 20
    assert_params_close(many["params_after_20"], one["params_after_20"], rtol=1e-9)
    assert many["state_sharding_kept"] and many["cache_size"] == 1
    # w1 (64, 32) and w2 (32, 10) split their last dimension over "model":
    # the two params-shaped trees of the state (Adam's moments before the
    # swap, CG's direction and stored gradient after it, in the same buffers)
    # are sharded that way.
    assert many["sharded_state_leaves"] == [[None, "model"]] * (2 * 2)


TRAIN_ARGS = [
    "-m",
    "experiments.train",
    "--model",
    "vit-nomlp-wkewq-wvwo",
    "--optimizer",
    "two-phase-fixed",
    "--swap-epoch",
    "1",
    "--epochs",
    "2",
    "--batch-size",
    "100",
    "--no-progress",
]


def read_metrics(out):
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def one_device_metrics(tmp_path_factory):
    out = tmp_path_factory.mktemp("one_device")
    run_with_devices([*TRAIN_ARGS, "--mesh", "data=1", "--out", str(out)])
    return read_metrics(out)


def assert_same_training(many, one):
    assert [r["phase"] for r in many] == [r["phase"] for r in one] == [0, 1]
    for a, b in zip(many, one, strict=True):
        # Batches of 95 and 96 and the full 1437 are padded to multiples of
        # the data axis and the padding masked: the same examples and losses.
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)
        assert a["val_acc"] == pytest.approx(b["val_acc"], abs=0.01)
        assert a["forward_passes"] == b["forward_passes"]


def test_train_cli_on_eight_devices_matches_one_device(tmp_path, one_device_metrics):
    run_with_devices([*TRAIN_ARGS, "--mesh", "data=8", "--out", str(tmp_path)])
    assert_same_training(read_metrics(tmp_path), one_device_metrics)


def test_chunked_cg_on_eight_devices_matches_one_device_in_one_pass(
    tmp_path, one_device_metrics
):
    # The full 1437 images in chunks of at most 500 (496 on 8 devices: 3
    # chunks, padded to 1440 and masked, each device evaluating its own 60
    # rows of each chunk) against one device in one pass.
    args = [*TRAIN_ARGS, "--mesh", "data=8", "--cg-chunk-size", "500"]
    run_with_devices([*args, "--out", str(tmp_path)])
    assert_same_training(read_metrics(tmp_path), one_device_metrics)


@pytest.mark.slow
def test_train_cli_across_two_processes_matches_one_device(
    tmp_path, one_device_metrics
):
    # Two processes with two CPU devices each, joined by jax.distributed (gloo
    # collectives on the CPU), train one data-parallel mesh of four.
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    args = [*TRAIN_ARGS, "--mesh", "data=4", "--out", str(tmp_path), "--distributed"]
    args += ["--coordinator", f"localhost:{port}", "--num-processes", "2"]
    processes = [
        subprocess.Popen(
            [sys.executable, *args, "--process-id", str(i)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs[0][-3000:]
    # Process 0 alone wrote the metrics; both printed the same final loss.
    assert_same_training(read_metrics(tmp_path), one_device_metrics)
    finals = [out.strip().splitlines()[-1] for out in outputs]
    assert finals[0] == finals[1] and "after 2 epochs" in finals[0]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("data=16", "covers 16 devices, but only 8 are available"),
        ("data=4,model=4", "covers 16 devices"),
        ("batch=8", "axis=size pairs"),
        ("data=x", "axis=size pairs"),
        ("data=0,model=8", "axis=size pairs"),
    ],
)
def test_bad_mesh_specs_raise_a_clear_error(spec, message):
    with pytest.raises(ValueError, match=message):
        sharding.parse_mesh(spec, num_devices=8)


def test_mesh_specs_parse():
    assert sharding.parse_mesh(None, num_devices=8) == {"data": 8, "model": 1}
    assert sharding.parse_mesh("data=4,model=2", 8) == {"data": 4, "model": 2}
    assert sharding.parse_mesh("model=8", 8) == {"data": 1, "model": 8}
    assert sharding.parse_mesh("data=3", 8) == {"data": 3, "model": 1}


def test_scaling_benchmark_quick_mode_times_each_mesh(tmp_path):
    out = tmp_path / "scaling.json"
    table = run_with_devices(
        ["-m", "experiments.benchmarks.scaling", "--quick", "--out", str(out)]
    )
    result = json.loads(out.read_text())
    assert result["simulated"] and result["backend"] == "cpu"
    rows = {(r["devices"], r["phase"]): r for r in result["rows"]}
    assert set(rows) == {(n, p) for n in (1, 2) for p in ("adam", "cg")}
    for (n, _), r in rows.items():
        assert r["seconds"] > 0
        if n == 1:
            assert r["ratio_to_one_device"] == 1.0
    assert "| 2 (simulated) | CG, batch 128 |" in table
