"""evaluate.py: checkpoint -> grid + FID + one results row per job; the results file is safe."""

from __future__ import annotations

import csv
import multiprocessing
from pathlib import Path

import pytest

from diffsweep import files, results
from diffsweep.train import run
from tests.conftest import run_entry_point


def test_evaluate_multirun_appends_one_row_per_job(train_config, tmp_path):
    cfg = train_config("callbacks.sample_grid.at_train_end=false")
    run(cfg)
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    # The argument order: overrides on both sides of -m.
    result = run_entry_point("evaluate.py", f"ckpt_path={ckpt}", "-m", "sampler=ddim,heun",
                             "sampler.num_steps=2,3", "metrics=fid_tiny",
                             "metrics.fid.evaluator.num_samples=16", "grid_samples=4",
                             "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "sweep" / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted((r["sampler"], r["num_steps"], r["nfe"]) for r in rows) == [
        ("ddim", "2", "2"), ("ddim", "3", "3"), ("heun", "2", "3"), ("heun", "3", "5")]
    for row in rows:
        assert row["train_scheduler"] == "linear" and row["spacing"] == "leading"
        assert float(row["fid"]) >= 0 and row["fid_extractor"] == "tiny"
        assert Path(row["grid"]).is_file()


def test_a_write_killed_midway_leaves_the_previous_results(tmp_path, monkeypatch):
    path = tmp_path / "results.csv"
    results.append_row(path, {"sampler": "ddim", "fid": 1.0})

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed before the rename")

    monkeypatch.setattr(files.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        results.append_row(path, {"sampler": "heun", "fid": 2.0})
    monkeypatch.undo()
    assert results.read_rows(path) == [{"sampler": "ddim", "fid": "1.0"}]
    assert not list(tmp_path.glob("*.partial"))


def _append_rows(path: str, worker: int) -> None:
    for index in range(5):
        results.append_row(path, {"worker": worker, "index": index})


def test_concurrent_jobs_lose_no_rows(tmp_path):
    path = str(tmp_path / "results.csv")
    processes = [multiprocessing.Process(target=_append_rows, args=(path, worker))
                 for worker in range(4)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)
    rows = results.read_rows(path)
    assert sorted((r["worker"], r["index"]) for r in rows) == sorted(
        (str(w), str(i)) for w in range(4) for i in range(5))


def test_columns_are_the_union_in_first_seen_order(tmp_path):
    path = tmp_path / "results.csv"
    results.append_row(path, {"a": 1, "b": 2})
    results.append_row(path, {"b": 3, "c": 4})
    assert results.read_rows(path) == [{"a": "1", "b": "2", "c": ""},
                                       {"a": "", "b": "3", "c": "4"}]
