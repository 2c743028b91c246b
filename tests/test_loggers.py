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
