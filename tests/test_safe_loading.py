"""No code runs on any load path: a checkpoint's stored config names only registered targets.

A real tiny checkpoint (2 training steps) is edited the way an attacker would: ``_target_``
payloads at the top of ``module``, nested in a keyword argument, a chain of project callables,
``torch.hub.load`` from a local folder, an interpolation whose resolver creates a directory. Each
goes through evaluate (``diffsweep.evaluate.run``), export (``diffsweep.export.main``) and resume
(``diffsweep.train.run`` with ``ckpt_path``): one line naming the key path, and the marker the
payload would create never exists. Malformed files get one line too; CIFAR-10 batches are
unpickled with a restricted unpickler.
"""

from __future__ import annotations

import copy
import os
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import diffsweep.evaluate as evaluate
import diffsweep.targets as targets
from diffsweep.assembly import build_callbacks, build_module
from diffsweep.checkpoints import AtomicCheckpointIO, load_module, module_from_checkpoint
from diffsweep.data.cifar10 import Cifar10Source, read_cifar_batch
from diffsweep.export import main as export_main
from diffsweep.nets.unet import UNet
from diffsweep.targets import (
    REGISTERED_TARGETS,
    StoredInterpolationError,
    TargetPolicy,
    UntrustedTargetError,
    check_targets,
    register_target,
)
from diffsweep.train import run as train_run
from tests.conftest import CONFIGS, FAST, compose_config

#: A tiny net on 8x8 digits (the legacy fixture's), so that a run takes about a second.
TINY = ["data.resolution=8", "model.base_channels=8", "model.channel_mults=[1,2]",
        "model.attention_resolutions=[4]", "model.num_groups=4", "data.batch_size=8",
        "logger=none", "callbacks.sample_grid.at_train_end=false", "trainer.max_steps=2"]
CUSTOM_NET = f"{__name__}.CustomUNet"


class CustomUNet(UNet):
    """A user's own net class: allowed only through trusted_targets or register_target."""


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """``last.ckpt`` of a 2-step run of the tiny net (written once for this module)."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    cfg = compose_config("train", [*FAST, *TINY], run_dir)
    train_run(cfg)
    return run_dir / "checkpoints" / "last.ckpt"


def craft(source: Path, out: Path, edit: Callable[[dict[str, Any]], Any]) -> Path:
    """A copy of checkpoint ``source`` at ``out`` whose stored config ``edit`` changed."""
    checkpoint = torch.load(source, weights_only=True)
    checkpoint["diffsweep_config"] = copy.deepcopy(checkpoint["diffsweep_config"])
    edit(checkpoint["diffsweep_config"])
    torch.save(checkpoint, out)
    return out


# ------------------------------------------------------------------------------------ payloads

def _top_of_module(config: dict, marker: Path, tmp: Path) -> None:
    config["module"]["_target_"] = "os.system"
    config["module"]["_args_"] = [f"touch {marker}"]


def _nested_kwarg(config: dict, marker: Path, tmp: Path) -> None:
    config["module"]["denoiser"]["net"] = {"_target_": "os.system", "_args_": [f"touch {marker}"]}


def _project_gadget(config: dict, marker: Path, tmp: Path) -> None:
    config["module"]["denoiser"]["net"] = {"_target_": "diffsweep.files.atomic_write_text",
                                           "path": str(marker), "text": "pwned"}


def _torch_hub(config: dict, marker: Path, tmp: Path) -> None:
    hub = tmp / "hub"
    hub.mkdir(exist_ok=True)
    (hub / "hubconf.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n"
                                    f"def net():\n    return None\n")
    config["module"]["denoiser"]["net"] = {"_target_": "torch.hub.load", "repo_or_dir": str(hub),
                                           "model": "net", "source": "local"}


def _interpolation(config: dict, marker: Path, tmp: Path) -> None:
    # diffsweep.run_dir creates <runs>/<name> when resolved
    config["module"]["label_dropout"] = (f"${{diffsweep.run_dir:{marker.parent},{marker.name},"
                                         f"never,x}}")


def _data_source(config: dict, marker: Path, tmp: Path) -> None:
    config["data"]["source"] = {"_target_": "os.system", "_args_": [f"touch {marker}"]}


#: (edit, the key path the error names, the error for evaluate/export)
PAYLOADS = {
    "top_of_module": (_top_of_module, "module._target_", UntrustedTargetError),
    "nested_kwarg": (_nested_kwarg, "module.denoiser.net._target_", UntrustedTargetError),
    "project_gadget": (_project_gadget, "module.denoiser.net._target_", UntrustedTargetError),
    "torch_hub": (_torch_hub, "module.denoiser.net._target_", UntrustedTargetError),
    "interpolation": (_interpolation, "module.label_dropout", StoredInterpolationError),
}


def _evaluate(ckpt: Path, tmp: Path, *overrides: str) -> Any:
    cfg = compose_config("evaluate", [f"ckpt_path={ckpt}", "metrics=none", "logger=none",
                                      "grid_samples=2", "device=cpu", *overrides], tmp / "eval")
    return evaluate.run(cfg)


def _export(ckpt: Path, tmp: Path, *overrides: str) -> Any:
    return export_main([f"ckpt_path={ckpt}", f"out={tmp / 'export'}", *overrides])


def _resume(ckpt: Path, tmp: Path, *overrides: str) -> Any:
    cfg = compose_config("train", [*FAST, *TINY, "trainer.max_steps=3", f"ckpt_path={ckpt}",
                                   *overrides], tmp / "resumed")
    return train_run(cfg)


LOAD_PATHS = {"evaluate": _evaluate, "export": _export, "resume": _resume}


def assert_one_line(error: BaseException, *parts: str) -> str:
    message = str(error)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, message
    return message


@pytest.mark.parametrize("load", sorted(LOAD_PATHS))
@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_an_edited_stored_config_runs_nothing_on_any_load_path(trained, tmp_path, payload, load):
    edit, key_path, error_type = PAYLOADS[payload]
    marker = tmp_path / "marker"
    ckpt = craft(trained, tmp_path / "edited.ckpt", lambda config: edit(config, marker, tmp_path))
    # resume never instantiates the stored config: the edit is a refused config change there
    expected = ValueError if load == "resume" else error_type
    with pytest.raises(expected) as caught:
        LOAD_PATHS[load](ckpt, tmp_path)
    message = assert_one_line(caught.value, key_path)
    if load != "resume":
        assert message.startswith(f"Checkpoint {ckpt}: ")
        assert "trusted_targets=" in message or "interpolation" in message
    assert not marker.exists()
    assert not (tmp_path / "export").exists()
    assert not (tmp_path / "resumed" / "checkpoints").exists()


@pytest.mark.parametrize("load", ["evaluate", "export"])
def test_a_payload_in_the_stored_data_config_is_refused_at_load(trained, tmp_path, load):
    marker = tmp_path / "marker"
    ckpt = craft(trained, tmp_path / "edited.ckpt",
                 lambda config: _data_source(config, marker, tmp_path))
    with pytest.raises(UntrustedTargetError) as caught:
        LOAD_PATHS[load](ckpt, tmp_path)
    assert_one_line(caught.value, "data.source._target_='os.system'", "trusted_targets=[os.system]")
    assert not marker.exists()


def test_trusted_targets_stored_in_a_checkpoint_are_ignored(trained, tmp_path):
    marker = tmp_path / "marker"

    def edit(config: dict) -> None:
        _nested_kwarg(config, marker, tmp_path)
        config["trusted_targets"] = ["os.system"]
        config["module"]["denoiser"]["net"]["trusted_targets"] = ["os.system"]

    ckpt = craft(trained, tmp_path / "edited.ckpt", edit)
    with pytest.raises(UntrustedTargetError, match=r"module\.denoiser\.net\._target_='os\.system'"):
        _evaluate(ckpt, tmp_path)
    assert not marker.exists()


def test_registered_but_misplaced_targets_are_refused_in_a_stored_config(trained, tmp_path):
    """A run target (trainer, callbacks, extractors) may be built from the command's config
    only: inside a checkpoint's module it would be a gadget."""
    ckpt = craft(trained, tmp_path / "edited.ckpt", lambda config: config["module"]["denoiser"]
                 .update(net={"_target_": "lightning.pytorch.callbacks.ModelCheckpoint",
                              "dirpath": str(tmp_path / "marker")}))
    with pytest.raises(UntrustedTargetError) as caught:
        _export(ckpt, tmp_path)
    assert_one_line(caught.value, "module.denoiser.net._target_", "not allowed in a stored run "
                    "config")
    assert not (tmp_path / "marker").exists()


# ------------------------------------------------------------------------------------ structure

def _zero_bytes(path: Path, trained: Path) -> None:
    path.write_bytes(b"")


def _plain_state_dict(path: Path, trained: Path) -> None:
    torch.save(torch.load(trained, weights_only=True)["state_dict"], path)


def _no_state_dict(path: Path, trained: Path) -> None:
    checkpoint = torch.load(trained, weights_only=True)
    del checkpoint["state_dict"]
    torch.save(checkpoint, path)


def _config_not_a_mapping(path: Path, trained: Path) -> None:
    checkpoint = torch.load(trained, weights_only=True)
    checkpoint["diffsweep_config"] = ["module", "data"]
    torch.save(checkpoint, path)


def _config_without_data(path: Path, trained: Path) -> None:
    checkpoint = torch.load(trained, weights_only=True)
    del checkpoint["diffsweep_config"]["data"]
    torch.save(checkpoint, path)


def _module_not_a_mapping(path: Path, trained: Path) -> None:
    checkpoint = torch.load(trained, weights_only=True)
    checkpoint["diffsweep_config"]["module"] = "diffsweep.module.DiffusionModule"
    torch.save(checkpoint, path)


#: (writer, what the one-line error says)
MALFORMED = {
    "zero_bytes": (_zero_bytes, "is empty (0 bytes)"),
    "plain_state_dict": (_plain_state_dict, "is a plain state dict"),
    "no_state_dict": (_no_state_dict, "has no state_dict"),
    "config_not_a_mapping": (_config_not_a_mapping, "diffsweep_config is a list, not a mapping"),
    "config_without_data": (_config_without_data, "diffsweep_config has no data"),
    "module_not_a_mapping": (_module_not_a_mapping, "diffsweep_config.module is a str, not a "
                                                    "mapping"),
}


@pytest.mark.parametrize("load", sorted(LOAD_PATHS))
@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_a_malformed_checkpoint_is_one_line_naming_the_file(trained, tmp_path, kind, load):
    write, says = MALFORMED[kind]
    ckpt = tmp_path / "bad.ckpt"
    write(ckpt, trained)
    with pytest.raises(ValueError) as caught:
        LOAD_PATHS[load](ckpt, tmp_path)
    assert_one_line(caught.value, f"Checkpoint {ckpt}", says)
    assert not (tmp_path / "export").exists()
    assert not (tmp_path / "resumed" / "checkpoints").exists()


def test_lightnings_resume_read_refuses_a_checkpoint_without_its_version(trained, tmp_path):
    checkpoint = torch.load(trained, weights_only=True)
    del checkpoint["pytorch-lightning_version"]
    ckpt = tmp_path / "weights.ckpt"
    torch.save(checkpoint, ckpt)
    with pytest.raises(ValueError) as caught:
        AtomicCheckpointIO().load_checkpoint(ckpt)
    assert_one_line(caught.value, f"Checkpoint {ckpt} cannot be resumed: it has no "
                                  f"pytorch-lightning_version")
    ckpt.write_bytes(b"")  # Lightning's read runs the structure checks too
    with pytest.raises(ValueError, match=r"is empty \(0 bytes\)"):
        AtomicCheckpointIO().load_checkpoint(ckpt)


def test_the_real_checkpoint_and_the_legacy_fixture_still_load(trained):
    legacy = Path(__file__).parent / "fixtures" / "legacy_main.ckpt"
    for path, step in ((trained, 2), (legacy, 3)):
        assert AtomicCheckpointIO().load_checkpoint(path)["global_step"] == step
        assert load_module(path).image_shape == (1, 8, 8)  # nothing stored is refused


# ------------------------------------------------------------------------------------ trust

def test_a_users_class_needs_trusted_targets_in_the_command(tmp_path):
    overrides = [*FAST, *TINY, f"model._target_={CUSTOM_NET}"]
    with pytest.raises(UntrustedTargetError) as caught:
        build_module(compose_config("train", overrides, tmp_path / "a"))
    assert_one_line(caught.value, f"module.denoiser.net._target_={CUSTOM_NET!r}",
                    f"trusted_targets=[{CUSTOM_NET}]", f"register_target({CUSTOM_NET!r})")
    module = build_module(compose_config("train", [*overrides, f"trusted_targets=[{CUSTOM_NET}]"],
                                         tmp_path / "b"))
    assert isinstance(module.net, CustomUNet)
    assert "trusted_targets" not in module.config  # what a command trusts is never stored


def test_a_checkpoint_of_a_users_class_loads_with_the_commands_trust(tmp_path, monkeypatch):
    monkeypatch.setattr(targets, "_user_targets", set())
    cfg = compose_config("train", [*FAST, *TINY, f"model._target_={CUSTOM_NET}",
                                   f"trusted_targets=[{CUSTOM_NET}]"], tmp_path / "train")
    module = build_module(cfg)
    ckpt = tmp_path / "custom.ckpt"
    torch.save({"state_dict": module.state_dict(), "diffsweep_config": module.config}, ckpt)
    checkpoint = torch.load(ckpt, weights_only=True)
    with pytest.raises(UntrustedTargetError, match=re.escape(f"trusted_targets=[{CUSTOM_NET}]")):
        module_from_checkpoint(checkpoint, source=str(ckpt))
    trusted = module_from_checkpoint(checkpoint, source=str(ckpt), trusted_targets=[CUSTOM_NET])
    assert isinstance(trusted.net, CustomUNet)
    # evaluate.py trusted_targets=[...]
    model = evaluate.load_model(compose_config("evaluate", [f"ckpt_path={ckpt}", "metrics=none",
                                                            f"trusted_targets=[{CUSTOM_NET}]"],
                                               tmp_path / "eval"), torch.device("cpu"))
    assert isinstance(model.denoiser.net, CustomUNet)
    # register_target: for this process, every config
    register_target(CUSTOM_NET)
    assert isinstance(module_from_checkpoint(checkpoint).net, CustomUNet)


def test_the_commands_config_is_checked_too(train_config):
    cfg = train_config("+callbacks.evil._target_=os.system", "+callbacks.evil._args_=[true]")
    with pytest.raises(UntrustedTargetError) as caught:
        build_callbacks(cfg)
    assert_one_line(caught.value, "the command's config: callbacks.evil._target_='os.system'",
                    "trusted_targets=[os.system]")


def test_targets_in_lists_args_and_partials_are_found():
    config = {"a": [{"b": {"_target_": "diffsweep.samplers.Sampler"}},
                    {"_target_": "diffsweep.samplers.Sampler", "_partial_": True,
                     "_args_": [{"_target_": "builtins.exec", "_args_": ["1"]}]}]}
    with pytest.raises(UntrustedTargetError, match=r"^src: a\[1\]\._args_\[0\]\._target_="
                                                   r"'builtins\.exec' is not a registered"):
        check_targets(config, "src")
    # the command's config is checked as instantiate sees it: interpolations resolved
    command = OmegaConf.create({"evil": {"_target_": "os.system"},
                                "grid": {"_target_": "diffsweep.samplers.Sampler", "x": "${evil}"}})
    with pytest.raises(UntrustedTargetError, match=r"^cmd: grid\.x\._target_='os\.system'"):
        check_targets(command.grid, "cmd", key="grid")
    with pytest.raises(StoredInterpolationError, match=r"^ckpt: grid\.x='\$\{evil\}' is an "):
        check_targets(command.grid, TargetPolicy(source="ckpt", stored=True), key="grid")
    with pytest.raises(ValueError, match="trusted_targets=42 is not allowed"):
        targets.command_trusted_targets({"trusted_targets": 42})
    with pytest.raises(ValueError, match="register_target='os system' is not allowed"):
        register_target("os system")


# ------------------------------------------------------------------------------------ registry

def _config_targets() -> set[str]:
    found = set()
    for path in CONFIGS.rglob("*.yaml"):
        found.update(re.findall(r"^\s*_target_:\s*([\w.]+)", path.read_text(), flags=re.M))
    return found


def test_every_target_in_configs_is_registered():
    in_configs = _config_targets()
    assert len(in_configs) > 40  # the grep finds them
    assert sorted(in_configs - REGISTERED_TARGETS) == []


def test_every_registered_target_exists():
    from hydra._internal.utils import _locate

    for name in sorted(REGISTERED_TARGETS):
        if name.split(".")[0] in ("optuna", "hydra_plugins"):
            pytest.importorskip(name.split(".")[0])
        assert callable(_locate(name)), name


# ------------------------------------------------------------------------------------ CIFAR-10

class _CreatesMarker:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _cifar_batch(count: int = 3) -> dict[bytes, Any]:
    rng = np.random.default_rng(0)
    return {b"batch_label": b"training batch 1 of 5",
            b"labels": [int(label) for label in rng.integers(0, 10, count)],
            b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
            b"filenames": [f"image_{index}.png".encode() for index in range(count)]}


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_a_cifar_batch_in_the_real_format_loads(tmp_path, protocol):
    batch = _cifar_batch()
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps(batch, protocol=protocol))
    images, labels = read_cifar_batch(path)
    assert images.shape == (3, 3, 32, 32) and images.dtype == np.uint8
    np.testing.assert_array_equal(images.reshape(3, -1), batch[b"data"])
    assert labels.tolist() == batch[b"labels"]


def test_a_crafted_cifar_batch_runs_nothing(tmp_path):
    marker = tmp_path / "marker"
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for number in range(2, 6):
        (folder / f"data_batch_{number}").write_bytes(pickle.dumps(_cifar_batch(), protocol=2))
    batch = {**_cifar_batch(), b"labels": _CreatesMarker(marker)}
    (folder / "data_batch_1").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(ValueError) as caught:
        read_cifar_batch(folder / "data_batch_1")
    assert_one_line(caught.value, f"{folder / 'data_batch_1'} is not a CIFAR-10 batch",
                    f"names the Python global {os.system.__module__}.system")
    with pytest.raises(ValueError, match="data_batch_1 is not a CIFAR-10 batch"):
        Cifar10Source(tmp_path, download=False).load("train")
    assert not marker.exists()
