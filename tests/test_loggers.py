import logging
from pathlib import Path

import pytest

import diffsweep.loggers as loggers
from diffsweep.train import run


@pytest.fixture(autouse=True)
def no_wandb_credentials(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    monkeypatch.setattr(loggers, "_said_offline", False)


def _finish_wandb() -> None:
    """End the W&B run and its service: the service writes the offline run-<id>.wandb log
    asynchronously, and only its shutdown guarantees the file is complete for the next reader
    (a killed process's log is final anyway)."""
    import wandb

    wandb.finish()
    wandb.teardown()


def test_without_api_key_wandb_is_offline_and_says_so_once(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        first = loggers.wandb_logger(save_dir=str(tmp_path), project="p")
        second = loggers.wandb_logger(save_dir=str(tmp_path), project="p")
    assert first._wandb_init["mode"] == second._wandb_init["mode"] == "offline"
    assert sum("logging offline" in record.message for record in caplog.records) == 1


def test_api_key_without_network_falls_back_to_offline(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setattr(loggers, "wandb_server_reachable", lambda timeout=3.0: False)
    with caplog.at_level(logging.WARNING):
        logger = loggers.wandb_logger(save_dir=str(tmp_path), project="p")
    assert logger._wandb_init["mode"] == "offline"
    assert "unreachable" in caplog.text


def test_unknown_mode_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="auto, online, offline or disabled"):
        loggers.wandb_logger(mode="sometimes", save_dir=str(tmp_path))


@pytest.mark.slow  # > 15 s: runs in .ci/run's slow step
def test_training_run_with_wandb_logger_completes_offline(train_config):
    cfg = train_config("logger=wandb", "trainer.max_steps=2", "trainer.val_check_interval=2",
                       "callbacks.sample_grid.at_train_end=false")
    run(cfg)
    offline_runs = list((Path(cfg.paths.output_dir) / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1


def test_wandb_tags_name_the_chosen_scheduler_and_sampler(train_config, tmp_path):
    train_config("logger=wandb", "scheduler=cosine", "sampler=heun")  # sets the Hydra context
    logger = loggers.wandb_logger(save_dir=str(tmp_path), project="p", tags=["mine"])
    tags = logger._wandb_init["tags"]
    assert "mine" in tags and "scheduler:cosine" in tags and "sampler:heun" in tags


# ------------------------------------------------------------------------------ resumes, names
import csv as _csv  # noqa: E402
import json  # noqa: E402

import torch  # noqa: E402
from omegaconf import OmegaConf, open_dict, read_write  # noqa: E402


def _csv_rows(path):
    with open(path, newline="") as handle:
        return list(_csv.DictReader(handle))


def _pairs(rows, step_key="step"):
    """[(step, key)] of every value in logged rows (CSV rows or W&B history rows); ``epoch``
    left out (Lightning adds it to every log call, train and validation alike)."""
    return [(int(float(row[step_key])), key) for row in rows for key, value in row.items()
            if key not in (step_key, "epoch") and not key.startswith("_")
            and value not in ("", None)]


def test_csv_logger_appends_across_attempts_and_keeps_each_step_once(tmp_path):
    """A second attempt in the same folder (a rerun after a kill) keeps every row of the first,
    drops a row the kill cut short, and writes only (step, metric) pairs not yet in the file."""
    first = loggers.ResumableCSVLogger(tmp_path, name="csv", version="")
    for step in range(6):
        first.log_metrics({"train/loss": 1.0 + step}, step=step)
    first.log_metrics({"val/loss": 0.5}, step=4)
    path = tmp_path / "csv" / "metrics.csv"
    assert len(_csv_rows(path)) == 7  # flushed at every call (a kill loses nothing logged)
    with open(path, "a") as handle:
        handle.write("7,9.")  # killed mid-append
    # the rerun resumes from an earlier checkpoint: steps 3..8 are logged again, with a new key
    second = loggers.ResumableCSVLogger(tmp_path, name="csv", version="")
    for step in range(3, 9):
        second.log_metrics({"train/loss": 100.0 + step, "lr": 0.1}, step=step)
    second.log_metrics({"val/loss": 7.0}, step=4)  # already there: dropped
    second.log_metrics({"val/loss": 0.25}, step=8)
    second.finalize("success")
    rows = _csv_rows(path)
    pairs = _pairs(rows)
    assert len(pairs) == len(set(pairs))  # every (step, metric) once
    assert sorted(step for step, key in pairs if key == "train/loss") == list(range(9))
    loss = {int(r["step"]): float(r["train/loss"]) for r in rows if r["train/loss"]}
    assert loss[2] == 3.0 and loss[5] == 6.0 and loss[6] == 106.0  # the first attempt's rows kept
    val = {int(r["step"]): float(r["val/loss"]) for r in rows if r["val/loss"]}
    assert val == {4: 0.5, 8: 0.25}
    assert sorted(step for step, key in pairs if key == "lr") == [3, 4, 5, 6, 7, 8]  # new key
    assert path.read_text().endswith("\n") and "9." not in path.read_text()
    assert not list(path.parent.glob("*.partial"))


def test_csv_rows_are_on_disk_whenever_a_checkpoint_is_saved(tmp_path):
    logger = loggers.ResumableCSVLogger(tmp_path, name="csv", version="",
                                        flush_logs_every_n_steps=100)
    logger.log_metrics({"train/loss": 1.0}, step=0)
    assert not (tmp_path / "csv" / "metrics.csv").exists()
    logger.after_save_checkpoint(object())
    assert [r["train/loss"] for r in _csv_rows(tmp_path / "csv" / "metrics.csv")] == ["1.0"]


def test_wandb_run_id_is_kept_and_a_rerun_continues_the_run_without_repeats(tmp_path):
    """The id is stored in <save_dir>/wandb/run_id; a second logger there resumes that run
    (resume=allow) and skips the steps the first one wrote (read back from its run-<id>.wandb,
    including a config record longer than one 32 KiB block of the log)."""

    first = loggers.wandb_logger(mode="offline", save_dir=str(tmp_path), project="p")
    run_id = first._wandb_init["id"]
    assert (tmp_path / "wandb" / "run_id").read_text().strip() == run_id
    assert first._wandb_init["resume"] == "allow" and "anonymous" not in first._wandb_init
    first.log_hyperparams({"long": "x" * 100_000})
    for step in range(4):
        first.log_metrics({"train/loss": float(step)}, step=step)
    _finish_wandb()
    second = loggers.wandb_logger(mode="offline", save_dir=str(tmp_path), project="p")
    assert second._wandb_init["id"] == run_id
    assert second._logged_before == {step: {"train/loss"} for step in range(4)}
    for step in range(2, 6):
        second.log_metrics({"train/loss": 10.0 + step}, step=step)
    _finish_wandb()
    logs = loggers.wandb_transaction_logs(tmp_path, run_id)
    assert len(logs) == 2  # two attempts (offline-run-<time>-<id>, -<id>-1 within one second)
    history = [row for path in logs for row in loggers.wandb_history(path)]
    pairs = _pairs(history, step_key="trainer/global_step")
    assert sorted(pairs) == [(step, "train/loss") for step in range(6)]
    configs = [record.config for record in loggers.wandb_records(logs[0])
               if record.WhichOneof("record_type") == "config"]
    assert any(json.loads(item.value_json) == "x" * 100_000
               for config in configs for item in config.update if item.key == "long")
    # a log cut short by a kill: the complete records before the cut, no error
    data = logs[1].read_bytes()
    logs[1].write_bytes(data[:len(data) // 2])
    complete = len(list(loggers.wandb_records(logs[0])))
    assert 0 < len(list(loggers.wandb_records(logs[1]))) < complete


def _hydra_job(train_config, tmp_path, *, multirun, task, sweeper_params=None,
               sweep_overrides=None):
    """Compose a train config and set the Hydra job context of a (multi)run job."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    cfg = train_config(*task)
    sweep_dir = tmp_path / "sweeps" / "2030-01-02_03-04-05"
    output_dir = sweep_dir / "1" if multirun else tmp_path / "runs" / "2030-01-02_03-04-05"
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.mode = RunMode.MULTIRUN if multirun else RunMode.RUN
        cfg.hydra.sweep.dir = str(sweep_dir)
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.overrides.task = list(task)
        cfg.hydra.job.override_dirname = ",".join(task)
        if sweeper_params:
            cfg.hydra.sweeper.params = sweeper_params
    if sweep_overrides is not None:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create({"hydra": {"overrides": {"task": sweep_overrides}}}),
                       sweep_dir / "multirun.yaml")
    HydraConfig.instance().set_config(cfg)
    return cfg


def test_run_names_group_by_sweep_and_name_by_the_swept_values(train_config, tmp_path):
    job = ["scheduler=cosine", "trainer.max_steps=4", "console.config_tree=none"]
    _hydra_job(train_config, tmp_path, multirun=True, task=job,
               sweep_overrides=["scheduler=linear,cosine", "trainer.max_steps=4",
                                "console.config_tree=none"])
    assert loggers.run_names() == loggers.RunNames("2030-01-02_03-04-05", "scheduler=cosine")
    # Optuna: the sweeper's search space names the trial (it writes no multirun.yaml)
    (tmp_path / "sweeps" / "2030-01-02_03-04-05" / "multirun.yaml").unlink()
    trial = ["module.optimizer.lr=0.0003", "callbacks.ema.max_decay=0.99", "trainer.max_steps=4"]
    _hydra_job(train_config, tmp_path, multirun=True, task=trial,
               sweeper_params={"module.optimizer.lr": "interval(1e-4, 1e-2)",
                               "callbacks.ema.max_decay": "choice(0.99, 0.999)"})
    assert loggers.run_names().name == "module.optimizer.lr=0.0003,callbacks.ema.max_decay=0.99"
    # a single run is its own group, named by its overrides
    _hydra_job(train_config, tmp_path, multirun=False, task=["scheduler=ve"])
    assert loggers.run_names() == loggers.RunNames("2030-01-02_03-04-05", "scheduler=ve")
    logger = loggers.wandb_logger(mode="offline", save_dir=str(tmp_path / "w"), project="p")
    assert (logger._wandb_init["group"], logger._wandb_init["name"]) == (
        "2030-01-02_03-04-05", "scheduler=ve")
    explicit = loggers.wandb_logger(mode="offline", save_dir=str(tmp_path / "w"), project="p",
                                    name="mine", group="ours")
    assert (explicit._wandb_init["group"], explicit._wandb_init["name"]) == ("ours", "mine")


def test_wandb_job_type_is_train_or_eval(tmp_path):
    from tests.conftest import compose_config

    train = compose_config("train", ["logger=wandb"], tmp_path / "t")
    assert train.logger.wandb.job_type == "train" and train.logger.wandb.resume == "allow"
    for experiment in ("vp_vs_ve", "step_count"):  # their task_name is not the job type
        cfg = compose_config("train", ["logger=wandb", f"experiment={experiment}"], tmp_path / "t")
        assert cfg.logger.wandb.job_type == "train"
    evaluate = compose_config("evaluate", ["logger=wandb", "ckpt_path=x",
                                           "experiment=eval_sweep"], tmp_path / "e")
    assert evaluate.logger.wandb.job_type == "eval"


def test_typed_table_makes_numbers_of_results_cells():
    rows = [{"sampler": "ddim", "num_steps": "5", "fid": "12.5", "compile": "False", "kid": ""},
            {"sampler": "heun", "num_steps": "10", "fid": "8", "compile": "True", "kid": "0.01"}]
    columns, data = loggers.typed_table(rows)
    assert columns == ["sampler", "num_steps", "fid", "compile", "kid"]
    assert data == [["ddim", 5, 12.5, False, None], ["heun", 10, 8.0, True, 0.01]]
    assert isinstance(data[1][2], float)
    _, mixed = loggers.typed_table([{"step": "4"}, {"step": ""}, {"step": "n/a"}])
    assert mixed == [["4"], [None], ["n/a"]]  # one type per column


def _event_accumulator(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def _tensorboard_hparams(folder):
    from tensorboard.plugins.hparams import plugin_data_pb2

    found = {}
    for content in _event_accumulator(folder).PluginTagToContent("hparams").values():
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        kind = data.WhichOneof("data")
        if kind == "session_start_info":
            found["hparams"] = {key: value.WhichOneof("kind") and getattr(
                value, value.WhichOneof("kind")) for key, value in
                data.session_start_info.hparams.items()}
        elif kind == "experiment":
            found["metrics"] = [info.name.tag for info in data.experiment.metric_infos]
    return found


def test_tensorboard_rerun_skips_written_steps_and_hparams_hold_the_final_metrics(tmp_path):
    first = loggers.ResumableTensorBoardLogger(tmp_path, name="tb", version="")
    for step in range(4):
        first.log_metrics({"train/loss": float(step)}, step=step)
    first.finalize("success")
    second = loggers.ResumableTensorBoardLogger(tmp_path, name="tb", version="")
    assert second._logged_before == {step: {"train/loss"} for step in range(4)}
    for step in range(2, 6):
        second.log_metrics({"train/loss": 10.0 + step}, step=step)
    loggers.finish_loggers([second], {"model": {"base_channels": 16}, "sampler": "ddim",
                                      "tags": ["a"]},
                           {"fid/ddim_20": torch.tensor(3.5), "val/loss": 0.2, "bad": float("nan")},
                           step=5)
    accumulator = _event_accumulator(tmp_path / "tb")
    assert [(e.step, e.value) for e in accumulator.Scalars("train/loss")] == [
        (0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0), (4, 14.0), (5, 15.0)]
    assert [(e.step, e.value) for e in accumulator.Scalars("final/fid/ddim_20")] == [(5, 3.5)]
    found = _tensorboard_hparams(tmp_path / "tb")
    assert found["hparams"]["model/base_channels"] == 16 and found["hparams"]["sampler"] == "ddim"
    assert sorted(found["metrics"]) == ["final/fid/ddim_20", "final/val/loss"]


@pytest.mark.slow  # > 15 s: runs in .ci/run's slow step
def test_training_run_logs_names_config_and_one_final_grid(train_config):
    """logger=many: W&B (offline) gets job_type train, the run dir as group, the run config, the
    history and one grid per validation; final.png copies the last step's grid (same weights),
    so it is logged once; TensorBoard's HPARAMS tab gets the final metrics."""
    cfg = train_config("logger=many")
    metrics = run(cfg)
    run_dir = Path(cfg.paths.output_dir)
    (log_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    records = list(loggers.wandb_records(log_file))
    (info,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (info.job_type, info.run_group) == ("train", run_dir.name)
    keys = {item.key for r in records if r.WhichOneof("record_type") == "config"
            for item in r.config.update}
    assert {"model", "scheduler", "trainer", "fid_pairs"} - keys == {"fid_pairs"}  # no FID here
    history = loggers.wandb_history(log_file)
    grids = [row["trainer/global_step"] for row in history if "samples/_type" in row]
    assert grids == [2, 4]  # validations at steps 2 and 4 = the last: final.png not logged again
    assert (run_dir / "samples" / "final.png").read_bytes() == (
        run_dir / "samples" / "step_0000004.png").read_bytes()
    pairs = _pairs(history, step_key="trainer/global_step")
    assert len(pairs) == len(set(pairs))
    found = _tensorboard_hparams(run_dir / "tensorboard")
    assert "final/val/loss" in found["metrics"] and found["hparams"]["model/base_channels"] == 32
    final = _event_accumulator(run_dir / "tensorboard").Scalars("final/val/loss")
    assert [(e.step, e.value) for e in final] == [(4, pytest.approx(metrics["val/loss"]))]


# ------------------------------------------------------------ history in step with checkpoints
def test_csv_history_resumed_from_a_checkpoint_keeps_its_steps_and_logs_the_later_ones_once(
        tmp_path):
    """A resumed run's CSV logger keeps the rows through the checkpoint's logging step (5), drops
    the later ones (logged with weights that were lost) and writes each re-logged step once; a
    run from scratch drops every row."""
    first = loggers.ResumableCSVLogger(tmp_path, name="csv", version="")
    for step in range(9):
        first.log_metrics({"train/loss": 1.0 + step, "epoch": 0}, step=step)
    first.log_metrics({"val/loss": 0.5, "epoch": 0}, step=4)
    first.log_metrics({"val/loss": 0.7, "epoch": 0}, step=7)
    path = tmp_path / "csv" / "metrics.csv"
    resumed = loggers.ResumableCSVLogger(tmp_path, name="csv", version="")
    resumed.drop_history_after(5)
    assert sorted({int(row["step"]) for row in _csv_rows(path)}) == [0, 1, 2, 3, 4, 5]
    resumed.log_metrics({"val/loss": 9.0, "epoch": 0}, step=4)  # a re-run validation: kept once
    for step in range(6, 9):
        resumed.log_metrics({"train/loss": 100.0 + step, "epoch": 1}, step=step)
    resumed.log_metrics({"val/loss": 0.25, "epoch": 1}, step=7)
    resumed.finalize("success")
    rows = _csv_rows(path)
    pairs = _pairs(rows)
    assert len(pairs) == len(set(pairs))
    loss = {int(r["step"]): float(r["train/loss"]) for r in rows if r["train/loss"]}
    assert loss == {**{step: 1.0 + step for step in range(6)},
                    **{step: 100.0 + step for step in range(6, 9)}}
    assert {int(r["step"]): float(r["val/loss"]) for r in rows if r["val/loss"]} == {4: 0.5,
                                                                                       7: 0.25}
    assert all(row["epoch"] for row in rows)
    scratch = loggers.ResumableCSVLogger(tmp_path, name="csv", version="")
    scratch.drop_history_after(-1)
    assert _csv_rows(path) == [] and not list(path.parent.glob("*.partial"))


def test_a_step_logged_before_a_checkpoint_and_again_by_lightning_is_written_once(tmp_path):
    """CheckpointedHistory logs a step's training metrics before the checkpoint; Lightning's own
    call after it writes nothing; the step's validation row still gets its epoch."""
    logger = loggers.ResumableCSVLogger(tmp_path, name="csv", version="")
    logger.log_metrics({"train/loss": 0.5, "epoch": 0}, step=3)
    logger.persist()  # what the checkpoint write waits for
    assert [row["train/loss"] for row in _csv_rows(tmp_path / "csv" / "metrics.csv")] == ["0.5"]
    logger.log_metrics({"train/loss": 0.5, "epoch": 0}, step=3)  # Lightning, after the hook
    logger.log_metrics({"val/loss": 0.7, "epoch": 0}, step=3)
    logger.log_metrics({"train/loss": 0.4, "epoch": 1}, step=4)
    logger.log_metrics({"train/loss": 0.9, "epoch": 1}, step=3)  # an older step: not tracked
    logger.finalize("success")
    rows = [(row["step"], row["epoch"], row["train/loss"], row["val/loss"])
            for row in _csv_rows(tmp_path / "csv" / "metrics.csv")]
    assert rows == [("3", "0", "0.5", ""), ("3", "0", "", "0.7"), ("4", "1", "0.4", ""),
                    ("3", "1", "0.9", "")]


def test_wandb_steps_a_killed_attempt_did_not_write_are_logged_again_from_the_journal(tmp_path):
    """A kill leaves W&B's transaction log without the last seconds (its service writes it every
    flush_interval_s); the journal written before each checkpoint brings them back, once."""

    first = loggers.wandb_logger(mode="offline", save_dir=str(tmp_path), project="p")
    run_id = first._wandb_init["id"]
    for step in range(4):
        first.log_metrics({"train/loss": float(step), "epoch": 0}, step=step)
    first.persist()  # before the checkpoint of step 3
    first.log_metrics({"train/loss": 4.0, "epoch": 0}, step=4)  # after it: lost with the weights
    _finish_wandb()
    (killed_log,) = loggers.wandb_transaction_logs(tmp_path, run_id)
    killed_log.write_bytes(killed_log.read_bytes()[:7])  # what SIGKILL left: the header only
    second = loggers.wandb_logger(mode="offline", save_dir=str(tmp_path), project="p")
    assert second._logged_before == {}
    second.drop_history_after(3)
    for step in range(3, 6):
        second.log_metrics({"train/loss": 10.0 + step, "epoch": 1}, step=step)
    _finish_wandb()
    history = [row for path in loggers.wandb_transaction_logs(tmp_path, run_id)
               for row in loggers.wandb_history(path)]
    loss = [(row["trainer/global_step"], row["train/loss"]) for row in history
            if "train/loss" in row]
    assert sorted(loss) == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0), (4, 14.0), (5, 15.0)]
    assert all(row.get("epoch") is not None for row in history if "train/loss" in row)
