"""Bad input fails first, in one line naming the key, the value and what is allowed.

Config-level checks (diffsweep.validate) run at the very start of train/evaluate ``run``: the
``no_work`` fixture makes every expensive step (data, model, trainer, checkpoint loading,
sampling) fail the test if it is reached. Errors found later, where the objects are (a state dict
that does not fit, a full disk, a W&B key the server rejects, non-finite latents), get one-line
messages too. Network tests only talk to servers on 127.0.0.1.
"""

from __future__ import annotations

import errno
import http.server
import json
import logging
import os
import re
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import lightning
import numpy as np
import pytest
import torch

import diffsweep.evaluate as evaluate
import diffsweep.loggers as loggers
import diffsweep.train as train
import diffsweep.validate as validate
from diffsweep.assembly import build_module
from diffsweep.callbacks.ema import EMA
from diffsweep.checkpoints import (
    AtomicCheckpointIO,
    CheckpointDiskFullError,
    StateDictMismatchError,
    module_from_checkpoint,
)
from diffsweep.validate import (
    ConfigError,
    eval_config_problems,
    train_config_problems,
    validate_train_config,
)
from tests.conftest import compose_config


def _expensive(*args, **kwargs):
    raise AssertionError("expensive work started before the config was validated")


@pytest.fixture
def no_work(monkeypatch):
    """Any expensive step of train.run / evaluate.run fails the test."""
    for name in ("build_datamodule", "build_module", "build_trainer", "build_callbacks",
                 "build_loggers", "resume_checkpoint"):
        monkeypatch.setattr(train, name, _expensive)
    for name in ("load_model", "build_datamodule", "generate", "append_row"):
        monkeypatch.setattr(evaluate, name, _expensive)


@pytest.fixture
def eval_config(tmp_path):
    def make(*overrides: str):
        return compose_config("evaluate", ["ckpt_path=none.ckpt", "metrics=none", "logger=none",
                                           *overrides], tmp_path / "eval")
    return make


def one_problem(problems: list[str]) -> str:
    assert len(problems) == 1, problems
    assert "\n" not in problems[0]
    return problems[0]


def assert_nothing_written(output_dir: Path) -> None:
    assert not (output_dir / "checkpoints").exists()
    assert not (output_dir / "config_tree.log").exists()  # validation precedes even the printout


# ------------------------------------------------------------------------------------ train config

def test_the_shipped_configs_are_valid(train_config, eval_config):
    for overrides in ([], ["data=latents"], ["trainer=ddp"], ["debug=fast_dev_run"],
                      ["experiment=vp_vs_ve"], ["model=diffusers_unet"]):
        assert train_config_problems(train_config(*overrides, fast=False),
                                     cuda_device_count=0) == [], overrides
    assert eval_config_problems(eval_config(), cuda_device_count=0) == []


def test_seed_that_is_not_an_integer_stops_training_before_any_work(train_config, no_work):
    cfg = train_config("seed=abc")
    with pytest.raises(ConfigError) as caught:
        train.run(cfg)
    message = str(caught.value)
    assert message == ("seed='abc' is not allowed: a seed is an integer in [0, 4294967295] or "
                       "null (a random seed).")
    assert_nothing_written(Path(cfg.paths.output_dir))


@pytest.mark.parametrize("value, shown", [("-1", "-1"), ("1.5", "1.5"), ("true", "True"),
                                          (str(2**32), str(2**32))])
def test_negative_fractional_boolean_or_too_large_seeds_are_refused(train_config, value, shown):
    problem = one_problem(train_config_problems(train_config(f"seed={value}"),
                                                cuda_device_count=0))
    assert problem.startswith(f"seed={shown} is not allowed") and "[0, 4294967295]" in problem


def test_null_seed_is_allowed_for_training_but_not_for_evaluation(train_config, eval_config):
    assert train_config_problems(train_config("seed=null"), cuda_device_count=0) == []
    problem = one_problem(eval_config_problems(eval_config("seed=null"), cuda_device_count=0))
    assert problem.startswith("seed=None is not allowed") and "[0, 4294967295]" in problem


def test_nested_seeds_are_checked_and_named_by_their_full_key(train_config):
    problem = one_problem(train_config_problems(train_config("data.source.split_seed=abc"),
                                                cuda_device_count=0))
    assert problem.startswith("data.source.split_seed='abc' is not allowed")
    # module.seed is ${seed}: the source is reported once, not every copy
    problems = train_config_problems(train_config("seed=-3"), cuda_device_count=0)
    assert len(problems) == 1 and problems[0].startswith("seed=-3")


@pytest.mark.parametrize("overrides, start", [
    (["trainer.max_steps=0"], "trainer.max_steps=0 is not allowed"),
    (["trainer.max_steps=-2"], "trainer.max_steps=-2 is not allowed"),
    (["trainer.max_steps=2.5"], "trainer.max_steps=2.5 is not allowed"),
    (["trainer.max_epochs=0"], "trainer.max_epochs=0 is not allowed"),
    (["trainer.max_steps=-1", "trainer.max_epochs=-1"],
     "trainer.max_steps=-1 is not allowed with trainer.max_epochs=-1"),
])
def test_training_length_that_trains_nothing_or_forever_is_refused(train_config, overrides, start):
    problem = one_problem(train_config_problems(train_config(*overrides), cuda_device_count=0))
    assert problem.startswith(start)
    assert "integer >= 1" in problem and "-1" in problem


def test_no_step_limit_is_fine_when_epochs_or_time_bound_the_run(train_config):
    for overrides in (["trainer.max_steps=-1", "trainer.max_epochs=3"],
                      ["trainer.max_steps=-1", "+trainer.max_time=00:00:01:00"]):
        assert train_config_problems(train_config(*overrides), cuda_device_count=0) == []


def test_max_steps_zero_stops_training_before_any_work(train_config, no_work):
    cfg = train_config("trainer.max_steps=0")
    with pytest.raises(ConfigError, match=r"^trainer\.max_steps=0 is not allowed.*>= 1"):
        train.run(cfg)
    assert_nothing_written(Path(cfg.paths.output_dir))


@pytest.mark.parametrize("accelerator", ["cuda", "gpu"])
def test_gpu_accelerator_without_a_gpu_is_refused(train_config, accelerator):
    problem = one_problem(train_config_problems(
        train_config(f"trainer.accelerator={accelerator}"), cuda_device_count=0))
    assert problem.startswith(f"trainer.accelerator={accelerator} is not allowed on this machine")
    assert "torch.cuda.is_available() is False" in problem and "trainer.accelerator=cpu" in problem


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_accelerator_on_this_cpu_machine_stops_before_any_work(train_config, no_work):
    cfg = train_config("trainer.accelerator=cuda")
    with pytest.raises(ConfigError, match=r"^trainer\.accelerator=cuda is not allowed"):
        train.run(cfg)
    assert_nothing_written(Path(cfg.paths.output_dir))


@pytest.mark.parametrize("devices, expected", [
    ("4", "trainer.devices=4 is not allowed: this machine has 2 GPU(s); use 1..2, -1 or auto."),
    ("[0,3]", "trainer.devices=[0, 3] is not allowed: GPU index 3 does not exist; indices go "
              "from 0 to 1 on this machine."),
    ("'0,2'", "trainer.devices='0,2' is not allowed: GPU index 2 does not exist; indices go from "
              "0 to 1 on this machine."),
])
def test_more_gpus_than_the_machine_has_are_refused(train_config, devices, expected):
    cfg = train_config("trainer.accelerator=gpu", f"trainer.devices={devices}")
    assert one_problem(train_config_problems(cfg, cuda_device_count=2)) == expected


def test_gpus_that_exist_and_cpu_processes_pass(train_config):
    for overrides, gpus in ((["trainer.accelerator=gpu", "trainer.devices=2"], 2),
                            (["trainer.accelerator=gpu", "trainer.devices=-1"], 1),
                            (["trainer.accelerator=cpu", "trainer.devices=4"], 0),
                            (["trainer.devices=4"], 0)):  # auto without a GPU: 4 CPU processes
        assert train_config_problems(train_config(*overrides), cuda_device_count=gpus) == []


@pytest.mark.parametrize("override, expected", [
    ("model.resolution=32", "model.resolution=32 is not allowed with data.resolution=16"),
    ("model.in_channels=3", "model.in_channels=3 is not allowed with data.channels=1"),
])
def test_model_that_does_not_match_the_data_is_refused(train_config, override, expected):
    problem = one_problem(train_config_problems(train_config(override), cuda_device_count=0))
    assert problem.startswith(expected)
    key, served = expected.split()[0].split("=")[0], expected.rsplit("=", 1)[1]
    assert f"set {key}={served}" in problem


def test_model_resolution_mismatch_stops_training_before_any_work(train_config, no_work):
    cfg = train_config("model.resolution=32")
    with pytest.raises(ConfigError, match=r"^model\.resolution=32 is not allowed with "
                                          r"data\.resolution=16"):
        train.run(cfg)
    assert_nothing_written(Path(cfg.paths.output_dir))


@pytest.mark.parametrize("override, start, allowed", [
    ("callbacks.ema.max_decay=1.5", "callbacks.ema.max_decay=1.5 is not allowed", "[0, 1)"),
    ("callbacks.ema.max_decay=-0.1", "callbacks.ema.max_decay=-0.1 is not allowed", "[0, 1)"),
    ("callbacks.ema.min_decay=0.9999", "callbacks.ema.min_decay=0.9999 is not allowed",
     "[0, max_decay=0.999]"),
    ("callbacks.ema.power=0", "callbacks.ema.power=0 is not allowed", "> 0"),
    ("callbacks.ema.inv_gamma=-1", "callbacks.ema.inv_gamma=-1 is not allowed", "> 0"),
    ("callbacks.ema.update_every_n_steps=0",
     "callbacks.ema.update_every_n_steps=0 is not allowed", ">= 1"),
    ("callbacks.ema.start_step=-5", "callbacks.ema.start_step=-5 is not allowed", ">= 0"),
])
def test_ema_arguments_out_of_range_are_refused(train_config, override, start, allowed):
    problem = one_problem(train_config_problems(train_config(override), cuda_device_count=0))
    assert problem.startswith(start) and allowed in problem


def test_ema_callback_checks_its_own_arguments():
    with pytest.raises(ValueError,
                       match=r"callbacks\.ema\.max_decay=1\.5 is not allowed.*\[0, 1\)"):
        EMA(max_decay=1.5)
    with pytest.raises(ValueError, match=r"min_decay=0\.5 is not allowed.*max_decay=0\.4"):
        EMA(max_decay=0.4, min_decay=0.5)
    assert EMA(max_decay=0.0).max_decay == 0.0


def test_ema_max_decay_stops_training_before_any_work(train_config, no_work):
    cfg = train_config("callbacks.ema.max_decay=1.5")
    with pytest.raises(ConfigError, match=r"^callbacks\.ema\.max_decay=1\.5 is not allowed"):
        train.run(cfg)
    assert_nothing_written(Path(cfg.paths.output_dir))


def test_sample_grid_of_zero_images_is_refused(train_config, no_work):
    cfg = train_config("callbacks.sample_grid.num_samples=0")
    with pytest.raises(ConfigError) as caught:
        train.run(cfg)
    assert str(caught.value) == ("callbacks.sample_grid.num_samples=0 is not allowed: it must be "
                                 "an integer >= 1.")


def test_several_problems_are_reported_together_one_line_each(train_config):
    problems = train_config_problems(train_config("seed=abc", "trainer.max_steps=0"),
                                     cuda_device_count=0)
    assert [problem.split("=")[0] for problem in problems] == ["seed", "trainer.max_steps"]
    with pytest.raises(ConfigError) as caught:
        validate_train_config(train_config("seed=abc", "trainer.max_steps=0"), cuda_device_count=0)
    assert str(caught.value).splitlines() == problems


def test_resume_and_missing_ckpt_path_are_refused(train_config, tmp_path):
    problem = one_problem(train_config_problems(train_config("resume=sometimes"),
                                                cuda_device_count=0))
    assert problem == "resume='sometimes' is not allowed: choose auto or never."
    missing = tmp_path / "nope.ckpt"
    problem = one_problem(train_config_problems(train_config(f"ckpt_path={missing}"),
                                                cuda_device_count=0))
    assert problem.startswith(f"ckpt_path={missing} is not allowed: no such file")


# ------------------------------------------------------------------------------------ disk, files

def test_too_little_free_space_for_checkpoints_is_refused(train_config, monkeypatch, no_work):
    free = 10 * 2**20
    monkeypatch.setattr(validate.shutil, "disk_usage", lambda path: SimpleNamespace(
        total=2**40, used=2**40 - free, free=free))
    cfg = train_config()
    with pytest.raises(ConfigError) as caught:
        train.run(cfg)
    message = str(caught.value)
    assert message.startswith(f"callbacks.model_checkpoint.dirpath={cfg.paths.output_dir}/"
                              f"checkpoints is not allowed: its file system has 10.0 MiB free")
    assert "at least 100.0 MiB" in message and "\n" not in message
    assert_nothing_written(Path(cfg.paths.output_dir))


def test_low_free_space_is_a_warning_only(train_config, monkeypatch, caplog):
    free = 500 * 2**20
    monkeypatch.setattr(validate.shutil, "disk_usage", lambda path: SimpleNamespace(
        total=2**40, used=2**40 - free, free=free))
    with caplog.at_level(logging.WARNING, logger="diffsweep.validate"):
        validate_train_config(train_config(), cuda_device_count=0)
    assert "Only 500.0 MiB free where checkpoints go" in caplog.text


@pytest.fixture
def unwritable_dir(tmp_path):
    """A folder in which new files cannot be created (chmod for users, /sys for root)."""
    if os.geteuid() != 0:
        folder = tmp_path / "read_only"
        folder.mkdir()
        folder.chmod(0o500)
        yield folder
        folder.chmod(0o700)
        return
    folder = Path("/sys")
    if not folder.is_dir() or validate._can_create_in(folder):
        pytest.skip("running as root and /sys accepts files: no unwritable folder to test with")
    yield folder


def test_results_file_in_an_unwritable_folder_fails_before_any_sampling(eval_config, no_work,
                                                                        unwritable_dir):
    results = unwritable_dir / "results.csv"
    cfg = eval_config(f"results_file={results}")
    with pytest.raises(ConfigError) as caught:
        evaluate.run(cfg)
    assert str(caught.value) == (f"results_file={results} is not allowed: its folder "
                                 f"{unwritable_dir} is not writable; pass results_file=<a path "
                                 f"in a writable folder>.")
    assert_nothing_written(Path(cfg.paths.output_dir))


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write read-only files")
def test_read_only_results_file_is_refused(tmp_path):
    results = tmp_path / "results.csv"
    results.write_text("ckpt_path\n")
    results.chmod(0o444)
    problem = validate.check_writable_file("results_file", results)
    assert problem == (f"results_file={results} is not allowed: the file is read-only; make it "
                       f"writable (chmod u+w) or pass results_file=<another path>.")


def test_results_file_under_a_file_or_naming_a_folder_is_refused(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    assert validate.check_writable_file("results_file", blocker / "sub" / "r.csv") == (
        f"results_file={blocker}/sub/r.csv is not allowed: {blocker} is a file, not a folder.")
    assert "is a folder" in validate.check_writable_file("results_file", tmp_path)
    assert validate.check_writable_file("results_file", tmp_path / "new" / "r.csv") is None
    assert not (tmp_path / "new").exists()  # checking creates nothing


class _FullDisk:
    """Pickling this raises ENOSPC halfway through the checkpoint write."""

    def __reduce__(self):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_checkpoint_write_on_a_full_disk_keeps_the_previous_file(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "weights": torch.ones(3)}, path)
    before = path.read_bytes()
    with pytest.raises(CheckpointDiskFullError) as caught:
        io.save_checkpoint({"global_step": 2, "weights": torch.zeros(1000), "x": _FullDisk()}, path)
    message = str(caught.value)
    assert caught.value.errno == errno.ENOSPC and "\n" not in message
    assert message.startswith(f"No space left on device writing {path} (")
    assert "MiB free on its file system" in message
    assert "the previous file there is unchanged" in message
    assert "callbacks.model_checkpoint.dirpath" in message
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no partial file left


def test_other_checkpoint_write_errors_pass_unchanged(tmp_path):
    class Denied:
        def __reduce__(self):
            raise OSError(errno.EACCES, "Permission denied")

    with pytest.raises(OSError) as caught:
        AtomicCheckpointIO().save_checkpoint({"x": Denied()}, tmp_path / "a.ckpt")
    assert not isinstance(caught.value, CheckpointDiskFullError)
    assert caught.value.errno == errno.EACCES


# ------------------------------------------------------------------------------------ evaluate

def test_grid_of_zero_samples_fails_before_loading_the_checkpoint(eval_config, no_work):
    cfg = eval_config("grid_samples=0")
    with pytest.raises(ConfigError) as caught:
        evaluate.run(cfg)
    assert str(caught.value) == "grid_samples=0 is not allowed: it must be an integer >= 1."
    assert_nothing_written(Path(cfg.paths.output_dir))


@pytest.mark.parametrize("overrides, expected", [
    (["seed=abc"], "seed='abc' is not allowed: a seed is an integer in [0, 4294967295]."),
    (["batch_size=0"], "batch_size=0 is not allowed: it must be an integer >= 1 or null."),
    (["device=cuda"], "device=cuda is not allowed on this machine: torch.cuda.is_available() is "
                      "False; use device=cpu or auto."),
    (["device=banana"], "device='banana' is not allowed: use auto, cpu, cuda or cuda:<index>."),
])
def test_bad_eval_values_are_refused(eval_config, overrides, expected):
    problems = eval_config_problems(eval_config(*overrides), cuda_device_count=0)
    assert one_problem(problems) == expected


def test_eval_device_index_beyond_the_gpus_is_refused(eval_config):
    problem = one_problem(eval_config_problems(eval_config("device=cuda:2"), cuda_device_count=2))
    assert problem == "device=cuda:2 is not allowed: this machine has 2 GPU(s), indices 0..1."


def test_checkpoint_that_pickles_a_module_is_refused_naming_the_file(eval_config, tmp_path,
                                                                    monkeypatch):
    monkeypatch.setattr(evaluate, "generate", _expensive)
    path = tmp_path / "whole_module.ckpt"
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(ValueError) as caught:
        evaluate.run(eval_config(f"ckpt_path={path}"))
    message = str(caught.value)
    assert message.startswith(f"Checkpoint {path} could not be read")
    assert "pickled nn.Module" in message and "save state dicts" in message
    assert "\n" not in message


# ------------------------------------------------------------------------------------ state dicts

#: "<n> tensor(s) differ in shape (<key> checkpoint [<shape>] vs model [<shape>], ..."
SHAPES = (r"\d+ tensor\(s\) differ in shape \(denoiser\.net\.\S+ checkpoint \[\d+(, \d+)*\] vs "
          r"model \[\d+(, \d+)*\], ")


def test_state_dict_that_does_not_fit_its_config_is_one_line(train_config):
    config = build_module(train_config()).config
    narrower = build_module(train_config("model.base_channels=16"))
    checkpoint = {"diffsweep_config": config, "state_dict": narrower.state_dict()}
    with pytest.raises(StateDictMismatchError) as caught:
        module_from_checkpoint(checkpoint, source="narrow.ckpt")
    message = str(caught.value)
    assert "\n" not in message and len(message) < 800
    assert message.startswith("Checkpoint narrow.ckpt does not fit the model: ")
    assert re.search(SHAPES, message), message
    assert "Likely its weights and its stored diffsweep_config disagree" in message
    assert "size mismatch for" in caught.value.details  # torch's full report is kept


def test_resuming_a_checkpoint_of_another_model_is_one_line(train_config, tmp_path):
    narrower = build_module(train_config("model.base_channels=16"))
    path = tmp_path / "foreign.ckpt"  # a Lightning checkpoint without diffsweep_config
    torch.save({"state_dict": narrower.state_dict(), "epoch": 0, "global_step": 0,
                "pytorch-lightning_version": lightning.__version__, "loops": {}}, path)
    cfg = train_config(f"ckpt_path={path}", "logger=none", "~callbacks.lr_monitor")
    with pytest.raises(StateDictMismatchError) as caught:
        train.run(cfg)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"Checkpoint {path} does not fit the model: ")
    assert re.search(SHAPES, message), message
    assert "different model config" in message and "without ckpt_path" in message
    assert not list(Path(cfg.paths.output_dir).glob("checkpoints/*.ckpt"))


# ------------------------------------------------------------------------------------ W&B

@pytest.fixture
def wandb_env(monkeypatch, tmp_path):
    """A W&B key in the environment, no netrc, the offline notice not said yet."""
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    monkeypatch.setattr(loggers, "_said_offline", False)

    def point_at(port: int) -> None:
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    return point_at


@pytest.fixture
def fake_wandb_server():
    """``start(status, body)`` -> port of a local HTTP server answering every POST so."""
    servers = []

    def start(status: int, body: dict) -> int:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server.server_address[1]

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


REJECTED = (401, {"errors": [{"message": "user is not logged in"}]})


def test_online_wandb_with_a_rejected_key_fails_within_seconds(wandb_env, fake_wandb_server,
                                                               tmp_path):
    wandb_env(fake_wandb_server(*REJECTED))
    started = time.monotonic()
    with pytest.raises(loggers.WandbLoginError) as caught:
        loggers.wandb_logger(mode="online", save_dir=str(tmp_path), project="p")
    assert time.monotonic() - started < 5
    message = str(caught.value)
    assert message.startswith("logger.wandb.mode=online is not possible: the server rejected the "
                              "API key from WANDB_API_KEY")
    assert "HTTP 401" in message and "logger.wandb.mode=auto" in message and "\n" not in message


def test_auto_wandb_with_a_rejected_key_goes_offline_and_says_why(wandb_env, fake_wandb_server,
                                                                  tmp_path, caplog):
    wandb_env(fake_wandb_server(*REJECTED))
    with caplog.at_level(logging.WARNING):
        logger = loggers.wandb_logger(mode="auto", save_dir=str(tmp_path), project="p")
    assert logger._wandb_init["mode"] == "offline"
    assert "the server rejected the API key from WANDB_API_KEY" in caplog.text
    assert "wandb sync" in caplog.text


def test_wandb_key_the_server_accepts_goes_online(wandb_env, fake_wandb_server, tmp_path):
    wandb_env(fake_wandb_server(200, {"data": {"viewer": {"id": "VXNlcjox"}}}))
    logger = loggers.wandb_logger(mode="online", save_dir=str(tmp_path), project="p")
    assert logger._wandb_init["mode"] == "online"  # checked only: the run is never started


def test_wandb_server_that_refuses_connections_fails_online_and_falls_back_in_auto(
        wandb_env, tmp_path, caplog):
    wandb_env(_closed_port())
    started = time.monotonic()
    with pytest.raises(loggers.WandbLoginError, match="the server is unreachable"):
        loggers.wandb_logger(mode="online", save_dir=str(tmp_path), project="p")
    with caplog.at_level(logging.WARNING):
        logger = loggers.wandb_logger(mode="auto", save_dir=str(tmp_path), project="p")
    assert logger._wandb_init["mode"] == "offline" and "unreachable" in caplog.text
    assert time.monotonic() - started < 5


def test_wandb_server_that_accepts_but_never_answers_times_out(wandb_env, tmp_path, monkeypatch):
    monkeypatch.setattr(loggers, "WANDB_CHECK_TIMEOUT_S", 0.5)
    with socket.socket() as silent:  # the kernel completes connections; nobody ever answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        wandb_env(silent.getsockname()[1])
        started = time.monotonic()
        with pytest.raises(loggers.WandbLoginError, match="no usable answer .* within 0.5 s"):
            loggers.wandb_logger(mode="online", save_dir=str(tmp_path), project="p")
        assert time.monotonic() - started < 3


def test_online_wandb_without_any_key_fails_at_once(wandb_env, monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY")
    with pytest.raises(loggers.WandbLoginError,
                       match="no API key is configured; set WANDB_API_KEY"):
        loggers.wandb_logger(mode="online", save_dir=str(tmp_path), project="p")


def test_netrc_key_for_the_configured_server_is_found(wandb_env, monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY")
    wandb_env(8080)
    netrc_file = tmp_path / "netrc"
    netrc_file.write_text("machine 127.0.0.1:8080\n  login user\n  password secret-key\n")
    netrc_file.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc_file))
    assert loggers.wandb_api_key() == ("secret-key", f"{netrc_file} (machine 127.0.0.1:8080)")


# ------------------------------------------------------------------------------------ latents

class _Images:
    """A tiny image source (``images`` for both splits)."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images
        self.channels, self.resolution = images.shape[1], images.shape[2]

    def make(self):
        from diffsweep.data.base import ImageSource, TensorImageDataset

        outer = self

        class Source(ImageSource):
            name = "tiny-images"
            channels, resolution = outer.channels, outer.resolution

            def load(self, split, augment=False):
                return TensorImageDataset(outer.images, torch.zeros(len(outer.images),
                                                                    dtype=torch.int64))

            def fingerprint(self, split):
                return f"tiny-{split}-{float(outer.images.nan_to_num().sum()):.6f}"

        return Source()


def _latent_source(tmp_path: Path, images: torch.Tensor, **kwargs):
    pytest.importorskip("diffusers")
    from diffsweep.data.latents import LatentSource
    from diffsweep.data.vae import LatentVAE

    vae = LatentVAE(config={"block_out_channels": [16], "latent_channels": 4,
                            "norm_num_groups": 8, "sample_size": 8}, seed=0)
    return LatentSource(_Images(images).make(), vae, cache_dir=tmp_path / "cache",
                        encode_batch_size=4, progress=False, **kwargs)


def _no_committed_cache(tmp_path: Path) -> bool:
    return not list((tmp_path / "cache").glob("*/manifest.json"))


def test_nan_images_are_refused_at_encode_naming_the_cache_and_the_data(tmp_path, single_thread):
    from diffsweep.data.latents import NonFiniteLatentsError

    images = torch.zeros(8, 1, 8, 8)
    images[5, 0, 2, 2] = float("nan")
    source = _latent_source(tmp_path, images)
    with pytest.raises(NonFiniteLatentsError) as caught:
        source.ensure_cache("train")
    message = str(caught.value)
    assert "non-finite posterior mean (NaN/inf) for items 4..7 of the train split" in message
    assert f"latent cache {source.cache('train').dir}" in message
    assert message.startswith(f"VAE {source.vae.name} encoded")
    assert "the images themselves hold NaN/inf" in message and "data.source.images" in message
    assert _no_committed_cache(tmp_path)


def test_vae_that_encodes_inf_is_refused_naming_the_vae(tmp_path, single_thread, monkeypatch):
    from diffsweep.data.latents import NonFiniteLatentsError

    source = _latent_source(tmp_path, torch.zeros(8, 1, 8, 8))
    encode = source.vae.encode

    def overflowing(images):
        mean, std = encode(images)
        return mean.fill_(float("inf")), std
    monkeypatch.setattr(source.vae, "encode", overflowing)
    with pytest.raises(NonFiniteLatentsError) as caught:
        source.ensure_cache("train")
    message = str(caught.value)
    assert "items 0..3 of the train split" in message
    assert "the images are finite: check the VAE's weights and compute dtype" in message
    assert "data.source.vae.dtype=float32" in message
    assert _no_committed_cache(tmp_path)


def test_latents_beyond_the_storage_dtype_are_refused(tmp_path, single_thread, monkeypatch):
    from diffsweep.data.latents import NonFiniteLatentsError

    source = _latent_source(tmp_path, torch.zeros(8, 1, 8, 8), storage_dtype="float16")
    encode = source.vae.encode

    def large(images):
        mean, std = encode(images)
        return mean.fill_(1e5), std
    monkeypatch.setattr(source.vae, "encode", large)
    with pytest.raises(NonFiniteLatentsError, match=r"data\.source\.storage_dtype=float16 "
                                                    r"\(max 6\.55e\+04\).*storage_dtype=float32"):
        source.ensure_cache("train")
    assert _no_committed_cache(tmp_path)


def test_finite_latents_still_encode(tmp_path, single_thread):
    source = _latent_source(tmp_path, torch.rand(8, 1, 8, 8) * 2 - 1)
    manifest = source.ensure_cache("train")
    assert manifest["count"] == 8
    assert np.isfinite(np.load(Path(manifest["directory"]) / "mean.npy")).all()


def test_validation_module_imports_nothing_heavy():
    import subprocess
    import sys

    code = ("import sys, diffsweep.validate; "
            "print(sorted(m for m in ('torch', 'lightning', 'diffusers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, check=True)
    assert result.stdout.strip() == "[]"



# ------------------------------------------------------------------------------------ value checks
# Wrong values that ran silently (gradient ascent, bool('no') is True, 1.5 -> 1) or crashed late
# with an error naming no key: each is one problem line naming the key, the value and the range.

@pytest.mark.parametrize("overrides, start, allowed", [
    (["trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val=-1 is not allowed", ">= 0"),
    (["module.compile=no"], "module.compile='no' is not allowed", "true or false"),
    (["module.sample_compile=yes"], "module.sample_compile='yes' is not allowed", "true or false"),
    (["data.drop_last=0"], "data.drop_last=0 is not allowed", "true or false"),
    (["data.batch_size=1.5"], "data.batch_size=1.5 is not allowed", "integer >= 1"),
    (["data.batch_size=abc"], "data.batch_size='abc' is not allowed", "integer >= 1"),
    (["data.val_batch_size=0"], "data.val_batch_size=0 is not allowed", "integer >= 1 or null"),
    (["data.num_workers=-1"], "data.num_workers=-1 is not allowed", "integer >= 0"),
    (["module.optimizer.lr=0"], "module.optimizer.lr=0 is not allowed", "> 0"),
    (["module.optimizer.lr=-1e-3"], "module.optimizer.lr=-0.001 is not allowed", "> 0"),
    (["module.optimizer.lr=nan"], "module.optimizer.lr=nan is not allowed", "finite number > 0"),
    (["module.optimizer.lr=abc"], "module.optimizer.lr='abc' is not allowed", "> 0"),
    (["module.optimizer.lr=1e10"], "module.optimizer.lr=10000000000.0 is not allowed",
     "set allow_unusual_lr=true"),
    (["module.optimizer.betas=[0.9,1.5]"], "module.optimizer.betas=[0.9, 1.5] is not allowed",
     "[0, 1)"),
    (["module.optimizer.weight_decay=-0.1"], "module.optimizer.weight_decay=-0.1 is not allowed",
     ">= 0"),
    (["module.label_dropout=1.5"], "module.label_dropout=1.5 is not allowed", "[0, 1)"),
    (["module.sample_precision=8"], "module.sample_precision=8 is not allowed", "bf16"),
    (["sampler.eta=5"], "sampler.eta=5 is not allowed", "[0, 1]"),
    (["sampler.eta=-0.5"], "sampler.eta=-0.5 is not allowed", "[0, 1]"),
    (["sampler.eta=abc"], "sampler.eta='abc' is not allowed", "[0, 1]"),
    (["sampler=heun", "sampler.s_noise=-1"], "sampler.s_noise=-1 is not allowed", ">= 0"),
    (["sampler=heun", "sampler.s_churn=nan"], "sampler.s_churn=nan is not allowed", ">= 0"),
    (["sampler=heun", "sampler.s_tmin=2", "sampler.s_tmax=1"],
     "sampler.s_tmax=1 is not allowed", ">= 2"),
    (["sampler.num_steps=0"], "sampler.num_steps=0 is not allowed", "integer >= 1"),
    (["sampler.clip_sample=no"], "sampler.clip_sample='no' is not allowed", "true or false"),
    (["trainer.log_every_n_steps=0"], "trainer.log_every_n_steps=0 is not allowed", ">= 1"),
    (["trainer.val_check_interval=0"], "trainer.val_check_interval=0 is not allowed",
     "an integer >= 1"),
    (["trainer.val_check_interval=0.5"], "trainer.val_check_interval=0.5 is not allowed",
     "with trainer.check_val_every_n_epoch set"),
    (["+trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches=0 is not allowed",
     ">= 1"),
    (["trainer.precision=banana"], "trainer.precision='banana' is not allowed", "bf16-mixed"),
    (["trainer.devices=0"], "trainer.devices=0 is not allowed", ">= 1"),
    (["num_threads=0"], "num_threads=0 is not allowed", "integer >= 1 or null"),
    (["matmul_precision=low"], "matmul_precision='low' is not allowed", "highest, high or medium"),
    (["resume_allow_changes=5"], "resume_allow_changes=5 is not allowed", "a list of config keys"),
    (["console.config_tree=big"], "console.config_tree='big' is not allowed", "short, full"),
    (["model.num_classes=0"], "model.num_classes=0 is not allowed", "integer >= 1 or null"),
    (["model.base_channels=0"], "model.base_channels=0 is not allowed", "integer >= 1"),
    (["model.dropout=1.5"], "model.dropout=1.5 is not allowed", "[0, 1)"),
    (["model.channel_mults=[]"], "model.channel_mults=[] is not allowed", "one per level"),
    (["data.resolution=10"], "model.resolution=10 is not allowed with model.channel_mults of 3 "
                             "levels", "multiple of 4"),
    (["model=diffusers_unet", "model.norm_num_groups=3"],
     "model.norm_num_groups=3 is not allowed with model.block_out_channels=[32, 64, 64]",
     "divide every entry"),
    (["model=diffusers_unet", "model.layers_per_block=0"],
     "model.layers_per_block=0 is not allowed", ">= 1"),
    (["data.resolution=0"], "data.resolution=0 is not allowed", "integer >= 1"),
    (["module.denoiser.prediction_type=noise"],
     "module.denoiser.prediction_type='noise' is not allowed", "epsilon"),
    (["trainer.accelerator=abacus"], "trainer.accelerator='abacus' is not allowed", "cpu"),
    (["trainer.devices=1.5"], "trainer.devices=1.5 is not allowed", ">= 1"),
    (["lr_schedule=cosine", "trainer.max_steps=-1", "trainer.max_epochs=3"],
     "lr_schedule.total_steps=-1 is not allowed", "it follows trainer.max_steps"),
    (["lr_schedule.warmup_steps=-1"], "lr_schedule.warmup_steps=-1 is not allowed", ">= 0"),
    (["callbacks.model_checkpoint.every_n_train_steps=-5"],
     "callbacks.model_checkpoint.every_n_train_steps=-5 is not allowed", ">= 0"),
    (["metrics=fid_tiny", "metrics.fid.evaluator.num_samples=1"],
     "metrics.fid.evaluator.num_samples=1 is not allowed", ">= 2"),
    (["metrics=fid_tiny", "metrics.fid.pairs=[{sampler: banana, num_steps: 3}]"],
     "metrics.fid.pairs[0].sampler='banana' is not allowed", "ddim"),
    (["metrics=fid_tiny", "metrics.fid.pairs=[{sampler: ddim, num_steps: 3, eta: 7}]"],
     "metrics.fid.pairs[0].eta=7 is not allowed", "[0, 1]"),
])
def test_bad_train_values_are_refused_naming_key_value_and_range(train_config, overrides, start,
                                                                  allowed):
    problem = one_problem(train_config_problems(train_config(*overrides), cuda_device_count=0))
    assert problem.startswith(start) and allowed in problem, problem


@pytest.mark.parametrize("overrides", [
    ["trainer.gradient_clip_val=0"], ["trainer.gradient_clip_val=null"],
    ["module.compile=true", "module.sample_compile=false"], ["data.batch_size=8"],
    ["module.optimizer.lr=0.5"], ["module.optimizer.lr=1e10", "allow_unusual_lr=true"],
    ["module.label_dropout=0"], ["sampler.eta=1"], ["sampler=dpmpp_2m_sde", "sampler.eta=2"],
    ["sampler=heun", "sampler.s_churn=40", "sampler.s_tmin=0.05", "sampler.s_tmax=50"],
    ["trainer.val_check_interval=0.5", "trainer.check_val_every_n_epoch=1"],
    ["trainer.val_check_interval='00:00:10:00'"], ["trainer.deterministic=warn"],
    ["num_threads=1"], ["resume_allow_changes=[module.optimizer.lr]"],
    ["model.num_classes=10"], ["module.sample_precision=bf16"],
    ["scheduler.beta_start=0.01", "scheduler.beta_end=0.01"],
    ["lr_schedule=cosine", "lr_schedule.min_factor=0.1"],
])
def test_good_train_values_pass(train_config, overrides):
    assert train_config_problems(train_config(*overrides), cuda_device_count=0) == []


@pytest.mark.parametrize("choice", [
    *(f"scheduler={name}" for name in ("cosine", "scaled_linear", "vp_continuous", "ve", "edm",
                                       "flow", "flow_sd3", "flow_flux")),
    *(f"sampler={name}" for name in ("ddpm", "dpmpp_2m", "dpmpp_2m_sde", "euler",
                                     "euler_ancestral", "heun", "lms", "unipc")),
    *(f"experiment={name}" for name in ("ddpm", "edm", "rectified_flow", "posthoc_ema",
                                        "step_count")),
    "debug=limit", "debug=overfit", "debug=profiler", "metrics=fid", "metrics=fid_tiny",
    "lr_schedule=cosine", "lr_schedule=inverse_sqrt", "ema=posthoc", "logger=many",
    "model=unet_small", "model=unet_ddpm_cifar10", "data=mnist", "data=fashion_mnist",
    "data=cifar10", *(f"loss={name}" for name in ("edm", "min_snr", "sigmoid", "soft_min_snr",
                                                  "target_mse")),
])
def test_every_shipped_group_option_is_valid(train_config, choice):
    """The checks refuse no shipped config (those that need a GPU or an image folder aside)."""
    assert train_config_problems(train_config(choice, fast=False), cuda_device_count=0) == []


def test_lr_of_an_optuna_search_is_checked_like_any_other(train_config):
    cfg = train_config("hparams_search=lr_ema", "module.optimizer.lr=0")
    assert one_problem(train_config_problems(cfg, cuda_device_count=0)).startswith(
        "module.optimizer.lr=0 is not allowed")


def test_several_value_problems_are_reported_together(train_config, no_work):
    cfg = train_config("module.compile=no", "module.optimizer.lr=abc", "sampler.eta=5",
                       "trainer.val_check_interval=0")
    with pytest.raises(ConfigError) as caught:
        train.run(cfg)
    lines = str(caught.value).splitlines()
    assert [line.split("=")[0] for line in lines] == [
        "trainer.val_check_interval", "module.compile", "module.optimizer.lr", "sampler.eta"]
    assert_nothing_written(Path(cfg.paths.output_dir))


@pytest.mark.parametrize("choice, expected", [
    ("data=digits", {"compile", "sample_compile", "fused", "drop_last", "shuffle",
                     "rescale_betas_zero_snr", "clip_sample", "thresholding", "show_warnings",
                     "allow_unusual_lr", "save_last", "requeue", "deterministic", "benchmark"}),
    ("data=latents", {"sample_posterior", "progress", "drop_last"}),
    ("data=image_folder", {"random_flip", "in_memory"}),
    ("data=mnist", {"download"}),
    ("metrics=fid", {"kid", "precision_recall", "at_train_end", "download"}),
    ("trainer=ddp", {"sync_batchnorm", "find_unused_parameters", "use_distributed_sampler"}),
    ("model=diffusers_unet", {"flip_sin_to_cos"}),
    ("scheduler=flow", {"use_dynamic_shifting"}),
    ("logger=many", {"log_model", "default_hp_metric"}),
    ("evaluate", {"compile", "clip_sample", "show_warnings"}),
])
def test_every_boolean_of_the_shipped_configs_is_checked(train_config, eval_config, choice,
                                                         expected):
    """Each boolean of a composed config set to the string 'no' is one problem naming that key
    (bool('no') would be True); the booleans are found in the config, not listed here."""
    from omegaconf import OmegaConf

    cfg = eval_config() if choice == "evaluate" else train_config(choice, fast=False)
    keys = [key for key, value in validate._leaves(cfg, prefix="")
            if isinstance(value, bool) and not key.endswith("_partial_")]
    assert expected <= {key.rsplit(".", 1)[-1] for key in keys}
    for key in keys:
        OmegaConf.update(cfg, key, "no")
    problems = validate.boolean_problems(cfg)
    assert [problem.split("=")[0] for problem in problems] == keys
    assert all("='no' is not allowed: it must be true or false" in p for p in problems)


@pytest.mark.parametrize("overrides, start, allowed", [
    (["scheduler.beta_end=1.5"], "scheduler.beta_end=1.5 is not allowed", "(0, 1)"),
    (["scheduler.beta_start=0"], "scheduler.beta_start=0 is not allowed", "(0, 1)"),
    (["scheduler.beta_start=abc"], "scheduler.beta_start='abc' is not allowed", "(0, 1)"),
    (["scheduler.beta_start=0.02", "scheduler.beta_end=0.0001"],
     "scheduler.beta_end=0.0001 is not allowed with scheduler.beta_start=0.02", "not decrease"),
    (["scheduler.beta_end=0.2"], "scheduler.beta_end=0.2 is not allowed with "
                                 "scheduler.num_train_timesteps=1000", "underflows to 0"),
    (["scheduler=scaled_linear", "scheduler.beta_end=1"], "scheduler.beta_end=1 is not allowed",
     "(0, 1)"),
    (["scheduler.num_train_timesteps=1"], "scheduler.num_train_timesteps=1 is not allowed",
     ">= 2"),
    (["scheduler=vp_continuous", "scheduler.beta_min=-1"], "scheduler.beta_min=-1 is not allowed",
     "> 0"),
    (["scheduler=vp_continuous", "scheduler.beta_max=0.05"],
     "scheduler.beta_max=0.05 is not allowed with scheduler.beta_min=0.1", "not decrease"),
    (["scheduler=ve", "scheduler.sigma_min=0"], "scheduler.sigma_min=0 is not allowed",
     "0 < sigma_min < sigma_max"),
    (["scheduler=edm", "scheduler.p_std=0"], "scheduler.p_std=0 is not allowed", "> 0"),
    (["scheduler=flow", "scheduler.shift=abc"], "scheduler.shift='abc' is not allowed", "> 0"),
    (["scheduler=flow", "scheduler.shift=0"], "scheduler.shift=0 is not allowed", "> 0"),
    (["scheduler=flow", "scheduler.density=abc"], "scheduler.density='abc' is not allowed",
     "uniform, logit_normal"),
    (["scheduler=flow", "scheduler.t_max=1.0"], "scheduler.t_max=1.0 is not allowed",
     "0 < t_min < t_max < 1"),
    (["+scheduler.beta_max=1"], "scheduler.beta_max=1 is not allowed", "DiscreteVPSchedule has "
                                                                       "no argument beta_max"),
    (["scheduler=edm", "sampler.spacing=leading"], "sampler: Spacing 'leading' needs a discrete "
                                                   "schedule", "karras"),
])
def test_schedules_that_would_be_nan_at_step_0_are_refused_naming_the_key(train_config, overrides,
                                                                          start, allowed):
    problem = one_problem(train_config_problems(train_config(*overrides), cuda_device_count=0))
    assert problem.startswith(start) and allowed in problem, problem


def test_schedules_check_their_betas_where_they_are_built():
    from diffsweep.schedules import ContinuousVPSchedule, DiscreteVPSchedule

    for kwargs, start in ((dict(beta_end=1.5), "scheduler.beta_end=1.5 is not allowed"),
                          (dict(beta_start=-1e-4), "scheduler.beta_start=-0.0001 is not allowed"),
                          (dict(beta_start=0.02, beta_end=0.01), "scheduler.beta_end=0.01 is not "
                                                                 "allowed with"),
                          (dict(beta_end=0.5), "scheduler.beta_end=0.5 is not allowed with "
                                               "scheduler.num_train_timesteps=1000")):
        with pytest.raises(ValueError) as caught:
            DiscreteVPSchedule(**kwargs)
        assert str(caught.value).startswith(start) and "\n" not in str(caught.value)
    with pytest.raises(ValueError, match=r"^scheduler\.beta_min=nan is not allowed"):
        ContinuousVPSchedule(beta_min=float("nan"))
    # zero terminal SNR ends at alphas_cumprod 0 on purpose; equal betas are a constant schedule
    assert DiscreteVPSchedule(rescale_betas_zero_snr=True).alphas_cumprod[-1] == 0
    assert DiscreteVPSchedule(beta_start=0.01, beta_end=0.01).betas.unique().numel() == 1
    assert torch.isfinite(DiscreteVPSchedule("squaredcos_cap_v2").sigmas).all()


# ------------------------------------------------------------------------------ evaluate values

@pytest.mark.parametrize("overrides, start, allowed", [
    (["guidance_scale=nan"], "guidance_scale=nan is not allowed", "finite number >= 0"),
    (["guidance_scale=-5"], "guidance_scale=-5 is not allowed", "0 unconditional"),
    (["guidance_scale=inf"], "guidance_scale=inf is not allowed", "finite number >= 0"),
    (["guidance_scale=abc"], "guidance_scale='abc' is not allowed", "finite number >= 0"),
    (["compile=no"], "compile='no' is not allowed", "true or false"),
    (["batch_size=1.5"], "batch_size=1.5 is not allowed", "integer >= 1 or null"),
    (["grid_samples=abc"], "grid_samples='abc' is not allowed", "integer >= 1"),
    (["precision=8"], "precision=8 is not allowed", "bf16"),
    (["weights=foo"], "weights='foo' is not allowed", "ema or raw"),
    (["ema.sigma_rel=5"], "ema.sigma_rel=5 is out of range", "0 < ema.sigma_rel <= 0.3003"),
    (["sampler.eta=abc"], "sampler.eta='abc' is not allowed", "[0, 1]"),
    (["sampler.eta=5"], "sampler.eta=5 is not allowed", "[0, 1]"),
    (["sampler=banana"], None, None),
    (["sampler.spacing=wide"], "sampler.spacing='wide' is not allowed", "karras"),
    (["metrics=fid_tiny", "metrics.fid.evaluator.num_samples=1.5"],
     "metrics.fid.evaluator.num_samples=1.5 is not allowed", "integer >= 2"),
    (["metrics=fid_tiny", "metrics.fid.evaluator.batch_size=0"],
     "metrics.fid.evaluator.batch_size=0 is not allowed", "integer >= 1"),
    (["data=digits", "data.batch_size=abc"], "data.batch_size='abc' is not allowed", ">= 1"),
    (["console.show_warnings=maybe"], "console.show_warnings='maybe' is not allowed",
     "true or false"),
])
def test_bad_eval_values_are_refused_naming_key_value_and_range(eval_config, overrides, start,
                                                                 allowed):
    if start is None:  # an unknown group option: Hydra itself refuses it while composing
        with pytest.raises(Exception, match="banana"):
            eval_config(*overrides)
        return
    problem = one_problem(eval_config_problems(eval_config(*overrides), cuda_device_count=0))
    assert problem.startswith(start) and allowed in problem, problem


@pytest.mark.parametrize("overrides", [
    ["guidance_scale=0"], ["guidance_scale=7.5"], ["compile=true"], ["batch_size=null"],
    ["precision=bf16"], ["weights=raw"], ["ema.sigma_rel=0.1"], ["sampler=dpmpp_2m_sde"],
    ["metrics=fid_tiny"], ["data=digits"], ["experiment=eval_sweep"],
])
def test_good_eval_values_pass(eval_config, overrides):
    assert eval_config_problems(eval_config(*overrides), cuda_device_count=0) == []


def test_nan_guidance_stops_evaluation_before_any_work(eval_config, no_work):
    cfg = eval_config("guidance_scale=nan", "compile=no")
    with pytest.raises(ConfigError) as caught:
        evaluate.run(cfg)
    assert [line.split("=")[0] for line in str(caught.value).splitlines()] == [
        "guidance_scale", "compile"]
    assert_nothing_written(Path(cfg.paths.output_dir))


# ------------------------------------------------------------------------------------ sweeps

@pytest.mark.parametrize("overrides, reason", [
    (["optimized_metric=val/loss", "trainer.max_steps=10", "trainer.val_check_interval=500"],
     "trainer.val_check_interval=500 batches is more than the run's trainer.max_steps=10"),
    (["optimized_metric=val/loss", "+trainer.limit_val_batches=0"],
     "trainer.limit_val_batches=0 turns validation off"),
    (["optimized_metric=val/loss", "trainer.max_steps=-1", "trainer.max_epochs=1",
      "trainer.check_val_every_n_epoch=2", "trainer.val_check_interval=1.0"],
     "trainer.max_epochs=1 ends the run before the first validation"),
])
def test_optimized_metric_that_no_validation_logs_is_refused(train_config, overrides, reason):
    problem = one_problem(train_config_problems(train_config(*overrides), cuda_device_count=0))
    assert problem.startswith("optimized_metric=val/loss is not allowed") and reason in problem
    assert "val/loss is never logged" in problem


def test_optuna_search_that_never_validates_stops_before_training(train_config, no_work):
    """``train.py hparams_search=lr_ema trainer.max_steps=10`` failed after training with
    'Return value must be float-castable. Got None'."""
    cfg = train_config("hparams_search=lr_ema", "trainer.max_steps=10",
                       "trainer.val_check_interval=500")
    with pytest.raises(ConfigError, match=r"^optimized_metric=val/loss is not allowed.*"
                                          r"trainer\.max_steps=10"):
        train.run(cfg)
    assert_nothing_written(Path(cfg.paths.output_dir))


@pytest.mark.parametrize("overrides, start", [
    (["optimized_metric=fid/ddim_20"], "optimized_metric=fid/ddim_20 is not allowed without FID"),
    (["optimized_metric=fid/ddim_99", "metrics=fid_tiny"],
     "optimized_metric=fid/ddim_99 is not allowed: metrics.fid.pairs logs fid/ddim_20, "
     "fid/dpmpp_2m_10"),
    (["optimized_metric=fid/ddim_20", "metrics=fid_tiny", "metrics.fid.at_train_end=false",
      "metrics.fid.every_n_val_epochs=5"],
     "optimized_metric=fid/ddim_20 is not allowed: metrics.fid.at_train_end=false"),
    (["optimized_metric=3"], "optimized_metric=3 is not allowed"),
])
def test_optimized_fid_metric_the_run_does_not_compute_is_refused(train_config, overrides, start):
    assert one_problem(train_config_problems(train_config(*overrides),
                                             cuda_device_count=0)).startswith(start)


@pytest.mark.parametrize("overrides", [
    ["optimized_metric=val/loss"],  # FAST: validation every 2 of 4 steps
    ["optimized_metric=val/loss", "debug=fast_dev_run"],
    ["optimized_metric=val/loss", "debug=limit"],  # by epochs: depends on the data, allowed
    ["optimized_metric=train/loss", "trainer.val_check_interval=500"],
    ["optimized_metric=fid/ddim_20", "metrics=fid_tiny", "trainer.val_check_interval=500"],
    ["optimized_metric=kid/dpmpp_2m_10", "metrics=fid_tiny"],
    ["hparams_search=lr_ema"],
])
def test_optimized_metric_the_run_logs_passes(train_config, overrides):
    cfg = train_config(*overrides, fast="debug=fast_dev_run" not in overrides)
    assert train_config_problems(cfg, cuda_device_count=0) == []


def test_global_batch_not_divisible_by_the_processes_is_refused(train_config):
    cfg = train_config("trainer=ddp", "trainer.devices=3", "data.batch_size=16")
    problem = one_problem(train_config_problems(cfg, cuda_device_count=0))
    assert problem.startswith("data.batch_size=16 is not allowed with trainer.devices=3")
    assert "multiple of 3" in problem
    assert train_config_problems(train_config("trainer=ddp", "data.batch_size=16"),
                                 cuda_device_count=0) == []


# ------------------------------------------------------------------------------------ image folders

def _image_folder(folder: Path, count: int) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        Image.new("RGB", (4, 4), (index * 40 % 256, 0, 0)).save(folder / f"{index}.png")
    return folder


def _folder_config(train_config, root: Path, *overrides: str):
    return train_config("data=image_folder", f"data.root={root}", "data.num_workers=0",
                        "data.resolution=16", *overrides)


def test_image_folder_smaller_than_one_batch_is_refused_before_any_work(train_config, tmp_path,
                                                                        no_work):
    root = _image_folder(tmp_path / "images", 3)
    cfg = _folder_config(train_config, root, "data.batch_size=64")
    with pytest.raises(ConfigError) as caught:
        train.run(cfg)
    assert str(caught.value) == (
        f"data.batch_size=64 is not allowed with data.root={root}: the folder holds 3 image(s), 2 "
        f"in the training split (data.source.val_fraction=0.01), fewer than one batch, and "
        f"data.drop_last=true drops it (no training batch); use data.batch_size <= 2 or "
        f"data.drop_last=false.")
    assert_nothing_written(Path(cfg.paths.output_dir))


def test_image_folder_with_a_batch_of_images_passes(train_config, tmp_path):
    root = _image_folder(tmp_path / "images", 3)
    for overrides in (["data.batch_size=2"], ["data.batch_size=64", "data.drop_last=false"],
                      ["data.batch_size=3", "data.source.val_fraction=0"]):
        cfg = _folder_config(train_config, root, *overrides)
        assert train_config_problems(cfg, cuda_device_count=0) == [], overrides


def test_image_folder_count_stops_at_what_the_check_needs(tmp_path):
    from diffsweep.data.folder import count_images

    root = _image_folder(tmp_path / "images", 5)
    assert count_images(root) == 5 and count_images(root, stop_at=2) == 2


@pytest.mark.parametrize("make, message", [
    (lambda root: None, "is not allowed: no such folder; set data.root=/path/to/images"),
    (lambda root: root.mkdir(), "is not allowed: no image files (.png, .jpg"),
    (lambda root: root.write_text(""), "is not allowed: a file; set data.root="),
])
def test_missing_empty_or_file_data_root_is_refused(train_config, tmp_path, make, message):
    root = tmp_path / "images"
    make(root)
    problem = one_problem(train_config_problems(_folder_config(train_config, root),
                                                cuda_device_count=0))
    assert problem.startswith(f"data.root={root} {message}"), problem


@pytest.fixture
def deny_listing(monkeypatch):
    """``deny_listing(folder)``: listing ``folder`` raises PermissionError, as a folder without
    read permission does (chmod does not stop root, so the listing is refused here)."""
    denied: set[Path] = set()
    scandir = os.scandir

    def guarded(path="."):
        if Path(path) in denied:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return scandir(path)
    monkeypatch.setattr(os, "scandir", guarded)
    return denied.add


def test_unreadable_data_root_is_named_as_unreadable_not_empty(train_config, tmp_path,
                                                              deny_listing):
    from diffsweep.data.folder import ImageFolderSource

    root = _image_folder(tmp_path / "images", 3)
    deny_listing(root)
    problem = one_problem(train_config_problems(_folder_config(train_config, root),
                                                cuda_device_count=0))
    assert problem.startswith(f"data.root={root} is not allowed: {root} is not readable "
                              f"(permission denied)")
    with pytest.raises(PermissionError) as caught:
        ImageFolderSource(root).files()
    message = str(caught.value)
    assert message.startswith(f"image folder {root} is not readable (permission denied)")
    assert "data.root" in message and "no images found" not in message and "\n" not in message


def test_unreadable_subfolder_is_skipped_with_a_warning_or_named_when_nothing_else_is(
        tmp_path, deny_listing):
    from diffsweep.data.folder import ImageFolderSource

    root = _image_folder(tmp_path / "images", 2)
    locked = _image_folder(root / "locked", 2)
    deny_listing(locked)
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable folder\(s\) \(permission denied\)"):
        assert ImageFolderSource(root).files() == ["0.png", "1.png"]
    only_locked = tmp_path / "only_locked"
    deny_listing(_image_folder(only_locked / "locked", 2))
    with pytest.raises(PermissionError, match="only_locked/locked is not readable"):
        ImageFolderSource(only_locked).files()


# ------------------------------------------------------------------------------------ num_workers

def test_num_workers_beyond_the_cores_are_capped_with_one_info_line(caplog, monkeypatch):
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from diffsweep.data.datamodule import ImageDataModule, available_cpus
    from diffsweep.data.digits import DigitsSource

    cpus = available_cpus()
    with caplog.at_level(logging.INFO, logger="diffsweep.data.datamodule"):
        module = ImageDataModule(DigitsSource(), batch_size=8, num_workers=cpus + 3)
        kept = ImageDataModule(DigitsSource(), batch_size=8, num_workers=cpus)
    assert module.num_workers == cpus and kept.num_workers == cpus
    lines = [r.getMessage() for r in caplog.records if r.name == "diffsweep.data.datamodule"]
    assert lines == [f"data.num_workers={cpus + 3} capped at {cpus}: this process may use {cpus} "
                     f"CPU core(s)."]
    caplog.clear()
    monkeypatch.setattr(rank_zero_only, "rank", 1)  # other DDP ranks cap silently
    with caplog.at_level(logging.INFO, logger="diffsweep.data.datamodule"):
        assert ImageDataModule(DigitsSource(), batch_size=8, num_workers=cpus + 3).num_workers \
            == cpus
    assert not [r for r in caplog.records if r.name == "diffsweep.data.datamodule"]
