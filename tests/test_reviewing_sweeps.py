"""Reviewing sweeps in W&B (offline run files read back with wandb's protobuf records) and
TensorBoard: groups, names and job types of train and eval sweeps, the evaluation's logged
config and typed summary table, parallel sweeps with joblib, and an Optuna search."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from diffsweep import loggers
from diffsweep.train import run
from tests.conftest import run_entry_point

TINY_TRAIN = ["trainer.max_steps=2", "trainer.val_check_interval=2", "data.batch_size=16",
              "sampler.num_steps=2", "callbacks.sample_grid.num_samples=2",
              "trainer.enable_model_summary=false", "lr_schedule.warmup_steps=0"]


def _runs(folder: Path) -> dict[str, object]:
    """{job folder name: the W&B run record} of the offline runs under ``folder/*/wandb``."""
    found = {}
    for path in sorted(folder.glob("*/wandb/*/run-*.wandb")):
        if path.parent.is_symlink():
            continue
        for record in loggers.wandb_records(path):
            if record.WhichOneof("record_type") == "run":
                found[path.parents[2].name] = record.run
    return found


@pytest.mark.slow  # a 2-job sweep in 2 joblib worker processes
def test_joblib_sweep_groups_by_sweep_and_names_by_swept_values(tmp_path):
    """README: ``python train.py -m hydra/launcher=joblib hydra.launcher.n_jobs=2
    scheduler=linear,cosine`` (the [sweep] extra), with logger=wandb."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="pip install -e '.[sweep]'")
    result = run_entry_point("train.py", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                             "scheduler=linear,cosine", "logger=wandb", *TINY_TRAIN,
                             "hydra.sweep.dir=sweeps/lr", cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = _runs(tmp_path / "sweeps" / "lr")
    assert sorted(runs) == ["0", "1"]
    assert {run.run_group for run in runs.values()} == {"lr"}  # the sweep directory's name
    assert {run.job_type for run in runs.values()} == {"train"}
    assert sorted(run.display_name for run in runs.values()) == ["scheduler=cosine",
                                                                 "scheduler=linear"]
    assert all("scheduler:" + run.display_name.split("=")[1] in run.tags for run in runs.values())


@pytest.mark.slow  # evaluate.py sweep of 2 jobs in a subprocess
def test_eval_sweep_logs_typed_numbers_the_training_config_and_one_summary_table(train_config,
                                                                                  tmp_path):
    cfg = train_config("model.base_channels=16")
    run(cfg)
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    result = run_entry_point("evaluate.py", f"ckpt_path={ckpt}", "-m", "sampler=ddim,heun",
                             "sampler.num_steps=2", "metrics=fid_tiny",
                             "metrics.fid.evaluator.num_samples=16", "grid_samples=4",
                             "logger=many", "hydra.sweep.dir=sweep", cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = tmp_path / "sweep"
    with open(sweep / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 and all(float(row["kid"]) == float(row["kid"]) for row in rows)
    assert {row["precision"] for row in rows} == {"32"}  # the sampling precision, untouched
    assert all(0 <= float(row["prc_precision"]) <= 1 and 0 <= float(row["prc_recall"]) <= 1
               for row in rows)

    runs = _runs(sweep)
    assert sorted(runs) == ["0", "1"]
    assert {(r.job_type, r.run_group) for r in runs.values()} == {("eval", "sweep")}
    assert sorted(r.display_name for r in runs.values()) == ["sampler=ddim", "sampler=heun"]
    for job in ("0", "1"):
        (log_file,) = [p for p in (sweep / job / "wandb").glob("*/run-*.wandb")
                       if not p.parent.is_symlink()]
        records = list(loggers.wandb_records(log_file))
        config = {item.key: json.loads(item.value_json) for record in records
                  if record.WhichOneof("record_type") == "config" for item in record.config.update}
        assert config["train"]["model"]["base_channels"] == 16  # the checkpoint's training config
        assert config["train"]["choices"]["scheduler"] == "linear"
        history = loggers.wandb_history(log_file)
        (numbers,) = [row for row in history if "fid" in row]
        assert numbers["trainer/global_step"] == 4  # the checkpoint's step, not 0
        assert all(isinstance(numbers[key], (int, float)) for key in ("fid", "kid", "nfe"))
        assert "fid_vs_nfe" not in numbers and "results" not in numbers  # no per-job tables
    # one summary run for the sweep: name summary, its results table typed
    (summary_log,) = [p for p in (sweep / "wandb").glob("*/run-*.wandb")
                      if not p.parent.is_symlink()]
    (info,) = [r.run for r in loggers.wandb_records(summary_log)
               if r.WhichOneof("record_type") == "run"]
    assert (info.display_name, info.job_type, info.run_group) == ("summary", "eval", "sweep")
    (table_file,) = summary_log.parent.glob("files/media/table/results_*.table.json")
    table = json.loads(table_file.read_text())
    columns = table["columns"]
    assert len(table["data"]) == 2
    for line in table["data"]:
        cell = dict(zip(columns, line))
        assert isinstance(cell["fid"], float) and isinstance(cell["nfe"], int)
        assert isinstance(cell["step"], int) and isinstance(cell["sampler"], str)
    # TensorBoard (per job): the HPARAMS tab with the evaluation's numbers
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(sweep / "0" / "tensorboard"), size_guidance={"scalars": 0})
    accumulator.Reload()
    from tensorboard.plugins.hparams import plugin_data_pb2

    plugin = [plugin_data_pb2.HParamsPluginData.FromString(content)
              for content in accumulator.PluginTagToContent("hparams").values()]
    (experiment,) = [data.experiment for data in plugin if data.WhichOneof("data") == "experiment"]
    assert {"final/fid", "final/kid", "final/nfe"} <= {m.name.tag for m in experiment.metric_infos}
    assert [e.step for e in accumulator.Scalars("final/fid")] == [4]
    # CSV (per job): the numbers at the checkpoint's step
    with open(sweep / "0" / "csv" / "metrics.csv") as handle:
        (logged,) = list(csv.DictReader(handle))
    assert logged["step"] == "4" and float(logged["fid"]) == pytest.approx(float(rows[0]["fid"]))


@pytest.mark.slow  # an Optuna search of 2 trials in a subprocess
def test_optuna_search_runs_two_trials_and_reports_the_best(tmp_path):
    """README: ``python train.py hparams_search=lr_ema`` at tiny size (2 trials)."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="pip install -e '.[sweep]'")
    from tests.conftest import CONFIGS

    group = ("hparams_search=lr_ema" if "hparams_search" in (CONFIGS / "train.yaml").read_text()
             else "+hparams_search=lr_ema")  # until train.yaml lists the group in its defaults
    result = run_entry_point("train.py", group, "hydra.sweeper.n_trials=2",
                             "hydra.sweeper.sampler.n_startup_trials=1", *TINY_TRAIN,
                             "logger=wandb", "hydra.sweep.dir=search", cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    search = tmp_path / "search"
    assert sorted(p.name for p in search.iterdir() if p.is_dir()) == ["0", "1"]
    best = (search / "optimization_results.yaml").read_text()
    assert "best_params" in best and "module.optimizer.lr" in best and "best_value" in best
    runs = _runs(search)
    assert {r.run_group for r in runs.values()} == {"search"}
    for r in runs.values():  # each trial named by its sampled values
        assert r.display_name.startswith("module.optimizer.lr=")
        assert "callbacks.ema.max_decay=" in r.display_name
