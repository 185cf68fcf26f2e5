"""provenance.json: which code, libraries and machine made a result."""

import importlib.metadata
import json
import subprocess

import jax

import twophase_optax as tpo
from experiments import config as config_lib
from experiments import provenance


def git(*args):
    return subprocess.run(
        ["git", *args], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_a_record_names_the_checkout_the_libraries_and_the_machine(monkeypatch):
    monkeypatch.delenv(provenance.COMMIT_VARIABLE, raising=False)
    config = config_lib.Config.of(model="vgg5", swap_rule="plateau", max_failures=5)
    record = provenance.collect(config)
    assert record["code"]["commit"] == git("rev-parse", "--short", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    assert record["code"]["tree"] == ("modified" if dirty else "clean")
    assert record["code"]["version"] == tpo.__version__
    assert record["libraries"]["optax"] == importlib.metadata.version("optax")
    assert record["libraries"]["jax"] == jax.__version__
    assert record["machine"]["backend"] == jax.default_backend()
    assert record["machine"]["device_count"] == jax.device_count()
    optimizer = record["second_phase"]["optimizer"]
    assert optimizer["swap"]["rule"] == "plateau" and optimizer["max_failures"] == 5
    assert record["second_phase"]["cg_beta"] == "hager_zhang"
    json.dumps(record)  # Plain JSON.


def test_a_copy_names_its_commit_and_the_variable_wins_over_git(monkeypatch):
    monkeypatch.setenv(provenance.COMMIT_VARIABLE, "abc1234")
    assert provenance.code_version() == {"commit": "abc1234", "tree": "copy"}


def test_a_resumed_run_adds_its_record_and_a_fresh_one_replaces_them(tmp_path):
    provenance.record_start(tmp_path)
    provenance.record_start(tmp_path, resumed=True)
    records = provenance.read(tmp_path)
    assert [r["resumed"] for r in records] == [False, True]
    provenance.record_start(tmp_path)
    assert len(provenance.read(tmp_path)) == 1
    assert provenance.read(tmp_path / "missing") == []


def test_the_summary_counts_each_code_version_and_machine(tmp_path):
    record = provenance.collect()
    other = json.loads(json.dumps(record))
    other["code"] = {"commit": "0000000", "tree": "clean", "version": "0.0.1"}
    other["machine"]["device"] = "NVIDIA H200"
    summary = provenance.summarize([record, record, other])
    assert summary["records"] == 3
    assert sorted(c["records"] for c in summary["code"]) == [1, 2]
    assert len(summary["machines"]) == 2
    line = provenance.describe(summary)
    assert "at commit 0000000 (clean, 1 of 3 starts)" in line
    assert "NVIDIA H200" in line
    if record["machine"]["backend"] == "cpu":  # Two CPUs round differently.
        assert f"cpu (cpu, {record['machine']['cpu']}, " in line
    empty = provenance.describe(provenance.summarize([]))
    assert empty.startswith("Code: not recorded")


def test_equal_digests_say_the_code_was_the_same_across_commits(tmp_path):
    record = provenance.collect()
    assert len(record["code"]["library_digest"]) == 12
    later = json.loads(json.dumps(record))
    later["code"]["commit"] = "fffffff"
    line = provenance.describe(provenance.summarize([record, later]))
    assert "the same library and training code in every start" in line
    later["code"]["library_digest"] = "000000000000"
    line = provenance.describe(provenance.summarize([record, later]))
    assert "2 different library or training codes" in line


def test_merged_summaries_are_the_summary_of_all_their_records():
    record = provenance.collect()
    other = json.loads(json.dumps(record))
    other["code"]["commit"] = "fffffff"
    other["machine"]["device"] = "NVIDIA H200"
    merged = provenance.merge(
        provenance.summarize([record, other]), provenance.summarize([record])
    )
    assert merged == provenance.summarize([record, other, record])


def test_a_retabled_copy_counts_the_runs_copied_in_since_once(tmp_path, monkeypatch):
    from experiments import sweep_copies

    def run_file(name, starts):
        path = tmp_path / "metrics" / "vgg5" / "seed0" / f"{name}.{provenance.FILE}"
        path.parent.mkdir(parents=True, exist_ok=True)
        records = [provenance.collect() for _ in range(starts)]
        path.write_text(json.dumps({"records": records}))
        return path.relative_to(tmp_path).as_posix(), records

    adam, adam_records = run_file("adam", 2)
    copied = provenance.summarize(adam_records)
    copied[sweep_copies.RUN_FILES] = [adam]
    (tmp_path / provenance.FILE).write_text(json.dumps(copied))
    assert sweep_copies.copy_summary(tmp_path) == copied
    # A run copied in later adds its records, once.
    tail, tail_records = run_file("adam-lbfgs-b10", 1)
    made = sweep_copies.copy_summary(tmp_path)
    assert made["records"] == 3 and made[sweep_copies.RUN_FILES] == [tail, adam]
    assert provenance.describe(made) == provenance.describe(
        provenance.summarize(adam_records + tail_records)
    )
    (tmp_path / provenance.FILE).write_text(json.dumps(made))
    assert sweep_copies.copy_summary(tmp_path) == made
    # A copy from before runs recorded their provenance: the commit that made
    # its metrics, as before.
    (tmp_path / provenance.FILE).unlink()
    monkeypatch.setattr(provenance, "committed", lambda path: {"committed_in": path})
    assert sweep_copies.copy_summary(tmp_path) == {"committed_in": tmp_path / "metrics"}
