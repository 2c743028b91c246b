"""A quiet console: harmless warnings filtered in one place (with a switch), the short config
tree, one progress bar per run in steps, readable schedule reprs, quick debug configs, user
errors as one line (tests/test_bad_inputs.py runs the table of bad inputs)."""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch

from diffsweep import console
from diffsweep.hydra_utils import print_config_tree
from tests.conftest import CONFIGS, REPO, compose_config, run_entry_point


@pytest.fixture
def no_show_env(monkeypatch):
    monkeypatch.delenv(console.SHOW_WARNINGS_ENV, raising=False)


def _emit(message: str) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        console.quiet()
        warnings.warn(message, UserWarning, stacklevel=1)
    return [str(w.message) for w in caught]


def test_quiet_filters_each_harmless_warning_in_one_place(no_show_env, monkeypatch):
    samples = {
        "The `srun` command is available on your system but is not used. HINT: ...",
        "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)`",
        "The number of training batches (12) is smaller than the logging interval Trainer(...)",
        "Checkpoint directory /x/checkpoints exists and is not empty.",
        "Precision bf16-mixed is not supported by the model summary.  Estimated model size in MB "
        "will not be accurate. Using 32 bits instead.",
        "In the sequence `${paths.log_dir}/${task_name}/multiruns,${now:%Y-%m-%d_%H-%M-%S},never,` "
        "some elements are missing: please replace them with empty quoted strings.",
    }
    assert len([h for h in console.HARMLESS if h.kind == "warning"]) == len(samples)
    for message in samples:
        assert _emit(message) == [], message
    assert _emit("Something else went wrong") == ["Something else went wrong"]
    assert all(item.why for item in console.HARMLESS)
    # the switch: DIFFSWEEP_SHOW_WARNINGS=1 (or console.show_warnings=true) installs nothing
    monkeypatch.setenv(console.SHOW_WARNINGS_ENV, "1")
    for message in samples:
        assert _emit(message) == [message]


def test_quiet_silences_the_real_emitters(no_show_env, monkeypatch, caplog, tmp_path):
    """The patterns match what Lightning and torch really say (srun hint, LeafSpec, the
    litlogger/litmodels tips); Lightning's other lines stay."""
    import lightning as L
    from lightning.fabric.plugins.environments.slurm import SLURMEnvironment

    def trainer():
        L.Trainer(logger=L.pytorch.loggers.CSVLogger(tmp_path), enable_progress_bar=False,
                  enable_model_summary=False, default_root_dir=tmp_path)

    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/srun")
    for name in console._LIGHTNING_INFO_LOGGERS:  # as before any quiet() in this process
        for existing in list(logging.getLogger(name).filters):
            logging.getLogger(name).removeFilter(existing)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        SLURMEnvironment._validate_srun_used()
        torch.utils._pytree.LeafSpec()
        trainer()
        assert len(caught) >= 2 and "Tip: For seamless cloud" in caplog.text  # without filters
        caught.clear()
        caplog.clear()
        console.quiet()
        SLURMEnvironment._validate_srun_used()
        torch.utils._pytree.LeafSpec()
        trainer()
    assert [str(w.message) for w in caught] == []
    assert "Tip" not in caplog.text and "GPU available" in caplog.text  # only the ads go


def test_quiet_silences_optuna_plugin_lines_and_the_cpu_cuda_home_warning(no_show_env):
    """alembic's ``setup plugin`` lines (Optuna loads it with the sweeper) and torch's CUDA_HOME
    warning on a CPU-only compile go; other lines of those loggers stay."""
    from alembic.runtime.plugins import Plugin

    class Kept(logging.Handler):
        def __init__(self):
            super().__init__(logging.DEBUG)
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    kept = Kept()
    plugins, cpp = (logging.getLogger(name) for name in ("alembic.runtime.plugins",
                                                         "torch.utils.cpp_extension"))
    console.quiet()
    for logger in (plugins, cpp):  # torch's loggers do not propagate to the root (caplog)
        logger.addHandler(kept)
    level = plugins.level
    plugins.setLevel(logging.INFO)
    try:
        Plugin("diffsweep.test_plugin").remove()  # the real emitter: log.info("setup plugin %s")
        plugins.info("another alembic line")
        cpp.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local")
        cpp.warning("Something else about extensions")
    finally:
        plugins.setLevel(level)
        for logger in (plugins, cpp):
            logger.removeHandler(kept)
    assert kept.messages == ["another alembic line", "Something else about extensions"]


def test_show_warnings_undoes_an_earlier_quiet(no_show_env):
    """The entry points quiet the console before the config is read; ``show=True``
    (``console.show_warnings=true``) then removes every filter quiet() installed."""
    message = "The `srun` command is available on your system but is not used. HINT"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        console.quiet()
        warnings.warn(message, UserWarning, stacklevel=1)
        assert console.quiet(show=True) is False
        warnings.warn(message, UserWarning, stacklevel=1)
        for name in ("alembic.runtime.plugins", *console._LIGHTNING_INFO_LOGGERS):
            assert not any(isinstance(existing, console._HarmlessLogFilter)
                           for existing in logging.getLogger(name).filters)
    assert [str(w.message) for w in caught] == [message]


def _raised(function):
    try:
        function()
    except Exception as error:  # noqa: BLE001 - the error is what the test looks at
        return error
    raise AssertionError("no error")


def test_user_errors_are_one_line_and_bugs_keep_their_traceback():
    import errno

    import numpy
    from hydra.utils import instantiate
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from omegaconf import OmegaConf

    from diffsweep.data.latents import CorruptLatentCacheError
    from diffsweep.validate import ConfigError

    def node(key, **config):
        return OmegaConf.create({key: config})[key]

    lines = console.user_error_lines
    assert lines(ConfigError("a=1 is bad\nb=2 is bad")) == ["a=1 is bad", "b=2 is bad"]
    sampler = node("sampler", _target_="diffsweep.samplers.Sampler", method="ddim", num_steps=5,
                   eta=-1)  # the message names sampler.eta: no prefix
    assert lines(_raised(lambda: instantiate(sampler))) == [
        "sampler.eta must be >= 0 (0 = deterministic, 1 = DDPM/ancestral), got -1."]
    trainer = node("trainer", _target_="lightning.pytorch.Trainer", foo=1)
    assert lines(_raised(lambda: instantiate(trainer))) == [
        "trainer: Trainer.__init__() got an unexpected keyword argument 'foo'"]
    assert lines(_raised(lambda: instantiate(node("model", _target_="no.such.Thing")))) == [
        "model: Error locating target 'no.such.Thing'."]
    parameter = torch.nn.Parameter(torch.zeros(1))
    assert lines(_raised(lambda: torch.optim.AdamW([parameter], lr=-1))) == [
        "module.optimizer: Invalid learning rate: -1"]
    assert lines(_raised(lambda: OmegaConf.create({"seed": "${nope}"}).seed)) == [
        "seed: Interpolation key 'nope' not found"]
    assert lines(MisconfigurationException("`val_check_interval` must be > 0")) == [
        "`val_check_interval` must be > 0"]
    assert lines(CorruptLatentCacheError("cache/manifest.json: not valid JSON")) == [
        "cache/manifest.json: not valid JSON"]
    disk_full = OSError(errno.ENOSPC, "No space left on device")
    assert lines(disk_full) == ["[Errno 28] No space left on device"]
    # bugs: torch's RuntimeError, a library's ValueError, a plain OSError, a KeyError
    assert lines(_raised(lambda: torch.zeros(2) @ torch.zeros(3))) is None
    assert lines(_raised(lambda: numpy.linspace(0, 1, -1))) is None
    assert lines(OSError(errno.EIO, "Input/output error")) is None
    assert lines(_raised(lambda: {}["key"])) is None


def test_a_user_error_prints_one_line_and_exits_1_a_bug_its_traceback(capsys, monkeypatch):
    from diffsweep.validate import ConfigError

    monkeypatch.delenv(console.DEBUG_ENV, raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)

    @console.one_line_errors
    def task(cfg):
        raise ConfigError(f"seed={cfg} is not allowed: an integer.\ngrid_samples=0 is not "
                          f"allowed: >= 1.")

    with pytest.raises(SystemExit) as stopped, console.command_line():
        task("abc")
    assert stopped.value.code == console.USER_ERROR_EXIT == 1
    assert capsys.readouterr().err == ("error: seed=abc is not allowed: an integer.\n"
                                       "error: grid_samples=0 is not allowed: >= 1.\n")
    from diffsweep.checkpoints import read_checkpoint

    with pytest.raises(SystemExit), console.command_line():  # the export's way: no Hydra task
        read_checkpoint("no_such.ckpt")  # diffsweep's FileNotFoundError
    err = capsys.readouterr().err
    assert err.startswith("error: Checkpoint no_such.ckpt does not exist") and err.count("\n") == 1

    @console.one_line_errors
    def buggy(cfg):
        raise AttributeError("'NoneType' object has no attribute 'shape'")

    with pytest.raises(AttributeError), console.command_line():
        buggy(None)
    assert capsys.readouterr().err == ""
    monkeypatch.setenv(console.DEBUG_ENV, "1")  # the traceback of a user error too
    with pytest.raises(ConfigError), console.command_line():
        task("abc")
    assert capsys.readouterr().err == ""


def test_hydra_restatements_of_a_reported_error_are_dropped():
    """After ``error: ...`` Hydra writes ``Error executing job with overrides``, the error again
    and the HYDRA_FULL_ERROR hint; only those go, and the hint only right after a repeat."""
    import io

    stream = io.StringIO()
    restatements = console._HydraRestatementFilter(stream)
    restatements.repeats.update({"Error executing job with overrides: ['seed=abc']\n",
                                 "error: seed='abc' is not allowed\n"})
    for text in ["[HYDRA] #0 : seed=abc\n",
                 "Error executing job with overrides: ['seed=abc']\n",
                 "error: seed='abc' is not allowed\n", restatements.HINT,
                 "Traceback (most recent call last): ...\n", restatements.HINT]:
        restatements.write(text)
    assert stream.getvalue() == ("[HYDRA] #0 : seed=abc\nTraceback (most recent call last): "
                                 "...\n" + restatements.HINT)
    assert restatements.getvalue() == stream.getvalue()  # the rest is the stream's


def test_a_sampling_compile_is_announced_with_an_estimate_and_timed(caplog, single_thread):
    from diffsweep.inference import COMPILE_SECONDS_PER_MODULE, CompiledSamplingNet

    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    compiled = CompiledSamplingNet(net, {"backend": "eager"})
    with caplog.at_level(logging.INFO, logger="diffsweep.inference"):
        compiled(torch.zeros(5, 3))
        compiled(torch.zeros(2, 3))  # padded to the compiled batch of 5: no compile
    estimate = round(COMPILE_SECONDS_PER_MODULE * 4)
    assert [record.getMessage().split(" (")[0].split(" in ")[0] for record in caplog.records] \
        == ["Compiling the sampling net for batches of 5", "Compiled the sampling net"]
    assert f"(one-off, ~{estimate} s; " in caplog.records[0].getMessage()
    assert re.match(r"Compiled the sampling net in \d+\.\d s\.$", caplog.records[1].getMessage())


def test_an_evaluation_prints_one_short_result_line():
    from diffsweep.evaluate import result_summary

    row = {"ckpt_path": "/runs/x/checkpoints/last.ckpt", "step": 3, "sampler": "ddim",
           "num_steps": 2, "nfe": 2, "options": "eta=0.0;clip_sample=False;" * 8,
           "guidance_scale": "", "weights": "ema", "samples_per_s": 84.85, "fid": 4.40360699,
           "kid": 0.22306, "fid_extractor": "tiny", "fid_samples": 20, "wall_time_s": 0.76}
    assert result_summary(row) == ("Result: ddim 2 steps (NFE 2), ema weights, FID[tiny] 4.404, "
                                   "KID 0.2231 (20 samples), 84.85 samples/s, 0.76 s")
    row.update(guidance_scale=2.0, fid=None, kid=None, weights=None)
    assert result_summary(row) == ("Result: ddim 2 steps (NFE 2), guidance 2, 84.85 samples/s, "
                                   "0.76 s")


def test_lightnings_model_summary_is_off(tmp_path):
    """The 12-line layer table (with ``FLOPs 0`` and a bf16 warning) is off; train.py's
    ``Model: <net> with <n>M parameters`` line says what it said."""
    for name in ("default", "cpu", "gpu", "ddp"):
        cfg = compose_config("train", [f"trainer={name}"], tmp_path)
        assert cfg.trainer.enable_model_summary is False


def test_console_options_defaults_and_bad_values():
    assert console.console_options({}) == {"config_tree": "short", "show_warnings": False}
    assert console.console_options({"console": {"config_tree": "full"}})["config_tree"] == "full"
    with pytest.raises(ValueError, match="console.config_tree must be short, full or none; "
                                         "got 'long'"):
        console.console_options({"console": {"config_tree": "long"}})
    evaluate = (CONFIGS / "evaluate.yaml").read_text()
    assert "config_tree: short" in evaluate and "show_warnings: false" in evaluate


def test_config_tree_is_short_on_screen_and_full_in_the_run_dir(tmp_path, capsys):
    cfg = compose_config("train", ["scheduler=cosine", "trainer.max_steps=7"], tmp_path)
    saved = tmp_path / "config_tree.log"
    print_config_tree(cfg, save_to=saved)
    short = capsys.readouterr().out
    assert len(short.splitlines()) <= 12, short
    assert "scheduler=cosine" in short and "trainer.max_steps=7" in short
    assert str(saved) in short and str(tmp_path) in short
    full = saved.read_text()
    assert len(full.splitlines()) > 100 and "beta_schedule: squaredcos_cap_v2" in full
    print_config_tree(cfg, save_to=None, style="full")
    assert len(capsys.readouterr().out.splitlines()) > 100
    print_config_tree(cfg, save_to=tmp_path / "again.log", style="none")
    assert capsys.readouterr().out == "" and (tmp_path / "again.log").read_text() == full
    with pytest.raises(ValueError, match="short, full or none"):
        print_config_tree(cfg, style="tall")


class _Steps(torch.utils.data.Dataset):
    def __len__(self):
        return 6

    def __getitem__(self, index):
        return torch.zeros(1)


def _toy_fit(tmp_path, bar, max_steps=7, ckpt_path=None):
    import lightning as L

    class Toy(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, index):
            loss = (self.w - 1).pow(2).sum()
            self.log("train/loss", loss, prog_bar=True)
            return loss

        def train_dataloader(self):
            return torch.utils.data.DataLoader(_Steps(), batch_size=2)  # 3 batches per epoch

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = L.Trainer(max_steps=max_steps, max_epochs=-1, callbacks=[bar], logger=False,
                        enable_model_summary=False, default_root_dir=tmp_path,
                        enable_checkpointing=ckpt_path is None, accelerator="cpu")
    trainer.fit(Toy(), ckpt_path=ckpt_path)
    return trainer


def test_one_progress_bar_per_run_in_steps(tmp_path, capsys):
    """3 batches per epoch, 7 steps: one bar of 7 steps, never reset at an epoch; a resumed run
    starts it at its step."""
    bar = console.StepProgressBar(refresh_rate=1)
    seen = []
    original = bar.on_train_batch_end

    def spy(trainer, *args):
        original(trainer, *args)
        seen.append((bar.train_progress_bar.n, bar.train_progress_bar.total))

    bar.on_train_batch_end = spy
    trainer = _toy_fit(tmp_path, bar)
    assert trainer.current_epoch >= 2 and seen == [(n, 7) for n in range(1, 8)]
    output = capsys.readouterr().out
    assert "Epoch" not in output and "7/7" in output and "step/s" in output
    assert "v_num" not in output and "train/loss" in output
    (ckpt,) = (tmp_path / "checkpoints").glob("*.ckpt")  # written at step 7
    resumed = console.StepProgressBar(refresh_rate=1)
    starts = []
    original_start = resumed.on_train_start

    def spy_start(trainer, module):
        original_start(trainer, module)
        starts.append((resumed.train_progress_bar.n, resumed.train_progress_bar.total))

    resumed.on_train_start = spy_start
    _toy_fit(tmp_path / "more", resumed, max_steps=9, ckpt_path=str(ckpt))
    assert starts == [(7, 9)]


def test_without_a_progress_bar_callback_lightning_adds_none(tmp_path):
    """``~callbacks.progress_bar``: no bar at all, not Lightning's Rich bar (``Epoch 0/-2``)."""
    from diffsweep.assembly import build_callbacks, build_trainer

    assert console.progress_bar_kwargs({}, [console.StepProgressBar()]) == {}
    assert console.progress_bar_kwargs({}, []) == {"enable_progress_bar": False}
    assert console.progress_bar_kwargs({"enable_progress_bar": True}, []) == {}
    cfg = compose_config("train", ["~callbacks.progress_bar", "trainer=cpu"], tmp_path)
    trainer = build_trainer(cfg, build_callbacks(cfg), [])
    assert trainer.progress_bar_callback is None
    cfg = compose_config("train", ["trainer=cpu"], tmp_path)
    trainer = build_trainer(cfg, build_callbacks(cfg), [])
    assert isinstance(trainer.progress_bar_callback, console.StepProgressBar)


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONFIGS / "scheduler").glob("*.yaml")))
def test_schedules_print_their_parameters(name):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    text = repr(instantiate(OmegaConf.load(CONFIGS / "scheduler" / f"{name}.yaml")))
    assert " object at 0x" not in text and re.match(r"^\w+Schedule\(\w+=", text), text


def test_fast_dev_run_draws_one_small_grid(train_config, monkeypatch):
    """debug=fast_dev_run: one grid, few sampler steps (the final grid copies the step-1 one)."""
    from diffsweep.callbacks import samples
    from diffsweep.train import run

    calls = []
    real_generate = samples.generate

    def spy(denoiser, sampler, num_samples, image_shape, **kwargs):
        calls.append((sampler.num_steps, num_samples))
        return real_generate(denoiser, sampler, num_samples, image_shape, **kwargs)

    monkeypatch.setattr(samples, "generate", spy)
    cfg = train_config("debug=fast_dev_run", fast=False)
    assert cfg.sampler.num_steps <= 4 and cfg.logger is None
    run(cfg)
    assert calls == [(cfg.sampler.num_steps, cfg.callbacks.sample_grid.num_samples)]
    grids = Path(cfg.paths.output_dir) / "samples"
    assert (grids / "final.png").read_bytes() == (grids / "step_0000001.png").read_bytes()


def test_debug_limit_runs_a_few_batches_of_every_loop(train_config):
    from diffsweep.train import run

    cfg = train_config("debug=limit", "data.batch_size=16", "logger=csv", fast=False)
    assert cfg.trainer.limit_train_batches == 4 and cfg.trainer.max_epochs == 2
    metrics = run(cfg)
    run_dir = Path(cfg.paths.output_dir)
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == [
        "final.png", "step_0000004.png", "step_0000008.png"]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and "val/loss" in metrics
    rows = (run_dir / "csv" / "metrics.csv").read_text().splitlines()
    assert len(rows) > 8


@pytest.mark.slow  # a train.py process
def test_a_training_command_prints_no_harmless_warning(tmp_path):
    """README ``python train.py`` (tiny, logger=many): a short config tree, no known-harmless
    warning, no W&B anonymous notice, one bar in steps; with DIFFSWEEP_SHOW_WARNINGS=1 they are
    back."""
    import os

    command = ["logger=many", "trainer.max_steps=3", "trainer.val_check_interval=3",
               "data.batch_size=16", "sampler.num_steps=2", "callbacks.sample_grid.num_samples=2"]
    result = run_entry_point("train.py", *command, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    for item in console.HARMLESS:
        assert not re.search(item.pattern, output), item.pattern
    assert "anonymous" not in output and "Epoch 0" not in output and "3/3" in output
    lines = result.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("CONFIG"))
    end = next(i for i, line in enumerate(lines) if "run dir:" in line)
    assert end - start <= 15  # the short tree (long temporary paths wrap), not ~160 lines
    os.environ[console.SHOW_WARNINGS_ENV] = "1"
    try:
        shown = run_entry_point("train.py", *command, "resume=never", cwd=tmp_path)
    finally:
        del os.environ[console.SHOW_WARNINGS_ENV]
    assert shown.returncode == 0 and "LeafSpec" in shown.stdout + shown.stderr


@pytest.mark.parametrize("path", sorted(
    [*(CONFIGS / "logger").glob("*.yaml"), *(CONFIGS / "debug").glob("*.yaml"),
     *(CONFIGS / "hparams_search").glob("*.yaml")]), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_console_and_logger_configs_comment_every_option(path):
    """Every option (a key with a value) has a one-line comment; nodes and _target_ need none."""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        match = re.match(r"^([A-Za-z_@/.]+):\s*(\S.*)?$", stripped)
        if not match or match.group(1) in ("_target_", "defaults"):
            continue
        value = (match.group(2) or "").split("#")[0].strip()
        if value:
            assert "#" in line, f"{path.name}: no comment on {stripped!r}"


def test_a_wrapped_task_pickles_for_the_joblib_and_submitit_launchers(monkeypatch):
    """Launchers pickle the task (a closure, so by value, with the globals it names) while
    :func:`console.command_line` has replaced stderr: nothing it names may hold an open file."""
    import pickle

    import cloudpickle

    def task(cfg):  # a local function: pickled by value, as __main__.main is
        return cfg

    with open(os.devnull, "w") as stderr:
        monkeypatch.setattr(sys, "stderr", stderr)
        with console.command_line():
            restored = pickle.loads(cloudpickle.dumps(console.one_line_errors(task)))
    assert restored(3) == 3


def test_a_group_option_that_does_not_exist_is_one_line_naming_the_options():
    from diffsweep.hydra_utils import unknown_group_choices

    configs = CONFIGS
    problems = unknown_group_choices(
        ["scheduler=cosinus", "sampler=ddim,heunn", "data@data.source.images=mnst",
         "vae@data.source.vae=tiny", "hydra/launcher=joblib", "model=null", "seed=1,2",
         "trainer.max_steps=3", "~callbacks.sample_grid", "metrics/extractor=classifier"], configs)
    assert [problem.split(" is not")[0] for problem in problems] == [
        "scheduler=cosinus", "sampler=heunn", "data=mnst"]
    assert "choose cosine, edm," in problems[0]
    assert unknown_group_choices(["scheduler=cosinus", "hydra.searchpath=[file://x]"],
                                 configs) == []  # another config folder may have it


def test_train_py_refuses_an_unknown_group_option_before_hydra_starts(tmp_path):
    import subprocess

    result = subprocess.run([sys.executable, str(REPO / "train.py"), "-m",
                             "scheduler=linear,cosinus"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: scheduler=cosinus is not an option of the scheduler group; choose cosine, edm, "
        "flow, flow_flux, flow_sd3, linear, scaled_linear, ve, vp_continuous (configs/scheduler/)."]
    assert not (tmp_path / "logs").exists()  # nothing ran
