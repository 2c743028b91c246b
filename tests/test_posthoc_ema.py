"""Post-hoc EMA (EDM2): sigma_rel <-> gamma, the power-function EMA, the least-squares
reconstruction (vs ema-pytorch), snapshots during training, kill/resume, evaluate.py ema.sigma_rel,
the study's analyze script."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file

from diffsweep import posthoc_ema as phe
from diffsweep.callbacks.posthoc_ema import PostHocEMA
from diffsweep.checkpoints import module_from_checkpoint, read_checkpoint
from diffsweep.train import run
from tests.conftest import CONFIGS, REPO, compose_config, run_entry_point


def _posthoc_override() -> str:
    """``ema=posthoc`` once train.yaml lists the ``ema`` group in its defaults, else the append
    form (the group works either way)."""
    defaults = OmegaConf.load(CONFIGS / "train.yaml").defaults
    listed = any(isinstance(entry, DictConfig) and "ema" in entry for entry in defaults)
    return "ema=posthoc" if listed else "+ema=posthoc"


#: A 12-step run with a snapshot every 2 steps and a checkpoint every 4.
RUN = ["trainer.max_steps=12", "trainer.val_check_interval=1000", "trainer.log_every_n_steps=1",
       "trainer.enable_model_summary=false", "data.batch_size=16", "model.base_channels=16",
       "callbacks.sample_grid.at_train_end=false",
       "callbacks.model_checkpoint.every_n_train_steps=4", "~callbacks.progress_bar",
       "~callbacks.lr_monitor", "lr_schedule.warmup_steps=0", "logger=none", _posthoc_override(),
       "callbacks.posthoc_ema.every_n_steps=2"]
#: The test-only third profile, tracked directly and reconstructed from the other two.
TRACKED_THREE = "callbacks.posthoc_ema.sigma_rels=[0.05,0.08,0.10]"


def _profile(snapshot: phe.Snapshot, sigma_rel: float) -> dict[str, torch.Tensor]:
    prefix = f"{sigma_rel!r}/"
    return {key[len(prefix):]: value for key, value in load_file(snapshot.path).items()
            if key.startswith(prefix)}


def _flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([state[name].double().flatten() for name in sorted(state)])


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One training run tracking sigma_rel 0.05, 0.08 and 0.10: its run directory."""
    run_dir = tmp_path_factory.mktemp("posthoc") / "run"
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(compose_config("train", [*RUN, TRACKED_THREE], run_dir))
    finally:
        torch.set_num_threads(previous)
    return run_dir


# ------------------------------------------------------------------------------------------
# (d) sigma_rel <-> gamma, (e) bad values


def test_sigma_rel_to_gamma_gives_the_papers_values_and_round_trips():
    # EDM2 Section 3.1: "sigma_rel = 0.05 and 0.10, i.e. gamma = 16.97 and 6.94"
    assert phe.sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=5e-3)
    assert phe.sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=5e-3)
    assert phe.gamma_to_sigma_rel(16.97) == pytest.approx(0.05, abs=1e-5)
    assert phe.gamma_to_sigma_rel(6.94) == pytest.approx(0.10, abs=1e-4)
    for sigma_rel in np.linspace(0.002, phe.SIGMA_REL_MAX, 400):
        gamma = phe.sigma_rel_to_gamma(sigma_rel)
        assert phe.gamma_to_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-12)
    for gamma in (-0.3, 0.0, 1.0, 6.94, 16.97, 100.0, 1000.0):
        assert phe.sigma_rel_to_gamma(phe.gamma_to_sigma_rel(gamma)) == pytest.approx(gamma,
                                                                                      rel=1e-10)
    # the widest profile: gamma = (sqrt 5 - 3)/2, nothing wider exists
    assert phe.SIGMA_REL_MAX == pytest.approx(0.30028, abs=1e-5)
    assert phe.sigma_rel_to_gamma(phe.SIGMA_REL_MAX) == pytest.approx(
        phe.GAMMA_OF_SIGMA_REL_MAX, abs=1e-6)
    assert max(phe.gamma_to_sigma_rel(g) for g in np.linspace(-0.99, 50, 5000)) \
        <= phe.SIGMA_REL_MAX + 1e-15


def test_sigma_rel_to_gamma_agrees_with_ema_pytorch_where_both_are_defined():
    ema_pytorch = pytest.importorskip("ema_pytorch.post_hoc_ema")
    for sigma_rel in (0.01, 0.03, 0.05, 0.08, 0.10, 0.12, 0.2, 0.28):
        assert phe.sigma_rel_to_gamma(sigma_rel) == pytest.approx(
            ema_pytorch.sigma_rel_to_gamma(sigma_rel), rel=1e-12)
    # ema-pytorch returns the real part of a complex root above the widest profile; we refuse
    assert ema_pytorch.sigma_rel_to_gamma(0.35) < 0
    with pytest.raises(ValueError, match="out of range"):
        phe.sigma_rel_to_gamma(0.35)


@pytest.mark.parametrize("bad", [0, 0.0, -0.05, 0.31, 1.0, float("nan"), float("inf"), "0.05",
                                 True, None])
def test_a_bad_sigma_rel_errors_clearly(bad, tmp_path):
    with pytest.raises(ValueError, match=r"sigma_rel=.*0 < sigma_rel <= 0\.3003"):
        phe.sigma_rel_to_gamma(bad)
    # before any file is read: the checkpoint does not even exist
    with pytest.raises(ValueError, match=r"ema\.sigma_rel=.*0 < ema\.sigma_rel <= 0\.3003"):
        phe.load_profile(tmp_path / "missing.ckpt", bad)


@pytest.mark.parametrize("kwargs, message", [
    ({"sigma_rels": [0.05]}, "at least two distinct"),
    ({"sigma_rels": [0.05, 0.05]}, "at least two distinct"),
    ({"sigma_rels": [0.05, 0.4]}, r"callbacks\.posthoc_ema\.sigma_rels=0\.4 is out of range"),
    ({"sigma_rels": 0.05}, "must be a list"),
    ({"every_n_steps": 0}, r"every_n_steps=0 must be a positive integer"),
    ({"every_n_steps": 2.5}, "every_n_steps=2.5"),
    ({"dtype": "int8"}, r"dtype='int8' is not allowed; choose one of float32, float16, bfloat16"),
])
def test_bad_callback_settings_error_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PostHocEMA(**kwargs)


# ------------------------------------------------------------------------------------------
# the power-function EMA and the solve, without Lightning


def test_power_ema_update_is_the_discrete_power_profile():
    torch.manual_seed(0)
    steps, gamma = 40, phe.sigma_rel_to_gamma(0.10)
    thetas = torch.randn(steps, 7, dtype=torch.float64)
    average = [torch.zeros(7, dtype=torch.float64)]
    for step in range(1, steps + 1):
        phe.update_power_ema(average, [thetas[step - 1]], phe.power_function_beta(gamma, step))
        if step == 1:
            assert torch.equal(average[0], thetas[0])  # beta_1 = 0: a copy
    weights = phe.discrete_profile(gamma, steps)
    assert weights.sum().item() == pytest.approx(1.0, abs=1e-12)
    torch.testing.assert_close(average[0], weights @ thetas, rtol=1e-12, atol=1e-12)
    # the profile is tau^gamma: weights grow with the step
    assert torch.all(weights[1:] > weights[:-1])
    with pytest.raises(ValueError, match="step >= step_delta >= 1"):
        phe.power_function_beta(gamma, 0)


def test_power_ema_follows_ema_pytorch_karras_ema_one_step_later():
    """ema-pytorch's KarrasEMA after n updates is our EMA after n + 1 steps of the sequence
    theta_1, theta_1, theta_2, ..., theta_n (the bookkeeping the module docstring states)."""
    ema_pytorch = pytest.importorskip("ema_pytorch")
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    karras = ema_pytorch.KarrasEMA(net, sigma_rel=0.10, update_every=1)
    thetas = []
    for _ in range(15):
        with torch.no_grad():
            for parameter in net.parameters():
                parameter.copy_(torch.randn_like(parameter))
        thetas.append([parameter.detach().clone() for parameter in net.parameters()])
        karras.update()
    gamma = phe.sigma_rel_to_gamma(0.10)
    ours = [torch.zeros_like(t) for t in thetas[0]]
    for step, theta in enumerate([thetas[0], *thetas], start=1):
        phe.update_power_ema(ours, theta, phe.power_function_beta(gamma, step))
    for mine, theirs in zip(ours, karras.ema_model.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


def _discrete_error(steps, gammas, weights, target_step, target_gamma) -> float:
    target = phe.discrete_profile(target_gamma, target_step)
    combined = sum(w * phe.discrete_profile(g, int(s), target_step)
                   for w, g, s in zip(weights.tolist(), gammas, steps))
    return float((combined - target).norm() / target.norm())


def test_reconstruction_of_the_readme_budget_run_is_accurate():
    """unet_tiny's default run: 1500 steps, snapshots of sigma_rel 0.05 and 0.10 every 100."""
    snapshot_steps = list(range(100, 1501, 100))
    steps = snapshot_steps * 2
    gammas = [phe.sigma_rel_to_gamma(0.05)] * 15 + [phe.sigma_rel_to_gamma(0.10)] * 15
    errors = {}
    for sigma_rel in (0.03, 0.05, 0.08, 0.10, 0.12, 0.2):
        gamma = phe.sigma_rel_to_gamma(sigma_rel)
        weights = phe.solve_weights(steps, gammas, 1500, gamma)
        assert weights.sum().item() == pytest.approx(1.0, abs=1e-12)
        errors[sigma_rel] = phe.profile_error(steps, gammas, weights, 1500, gamma)
        # the closed form is the discrete profiles' L2 error (the EMA as training realises it)
        assert _discrete_error(steps, gammas, weights, 1500, gamma) == pytest.approx(
            errors[sigma_rel], rel=0.05, abs=2e-5)
    # tracked widths come out exactly; between them < 0.5 %; outside < 5 %
    assert errors[0.05] < 1e-6 and errors[0.10] < 1e-6
    assert errors[0.08] < 0.005 and errors[0.12] < 0.005
    assert errors[0.03] < 0.05 and errors[0.2] < 0.05
    # unnormalised = the paper's Algorithm 3; normalising only rescales it
    raw = phe.solve_weights(steps, gammas, 1500, phe.sigma_rel_to_gamma(0.2), normalize=False)
    torch.testing.assert_close(raw / raw.sum(), phe.solve_weights(
        steps, gammas, 1500, phe.sigma_rel_to_gamma(0.2)))


def test_snapshot_budget_formula():
    assert phe.snapshot_count(1500, 100) == 15
    assert phe.snapshot_count(1550, 100) == 16  # the last step gets one too
    assert phe.snapshot_count(0, 100) == 0
    assert phe.snapshot_bytes(1_112_801, 2, "float32") == 8_902_408
    assert phe.snapshot_bytes(1_112_801, 2, "float16") == 4_451_204
    with pytest.raises(ValueError, match="dtype='float8' is not a snapshot dtype"):
        phe.snapshot_bytes(10, 2, "float8")


# ------------------------------------------------------------------------------------------
# (a) training: a tracked profile is reconstructed from the snapshots of the others


def test_training_writes_the_snapshot_series_and_checkpoints_the_averages(trained_run):
    snapshots = phe.list_snapshots(trained_run / "posthoc_ema")
    assert [s.step for s in snapshots] == [2, 4, 6, 8, 10, 12]
    assert all(s.sigma_rels == (0.05, 0.08, 0.10) for s in snapshots)
    assert not list((trained_run / "posthoc_ema").glob(".*"))  # no partial files
    checkpoint = read_checkpoint(trained_run / "checkpoints" / "last.ckpt")
    state = checkpoint["callbacks"]["PostHocEMA"]
    assert state["step"] == checkpoint["global_step"] == 12
    for sigma_rel in (0.05, 0.08, 0.10):
        final = _profile(snapshots[-1], sigma_rel)
        assert final.keys() == state["averages"][repr(sigma_rel)].keys()
        for name, value in final.items():
            assert torch.equal(value, state["averages"][repr(sigma_rel)][name]), name
    # the default EMA is still the checkpoint's state_dict, and differs from every power EMA
    default_ema = checkpoint["state_dict"]
    assert not torch.allclose(_flat({k: default_ema[k] for k in final}),
                              _flat(_profile(snapshots[-1], 0.10)))
    # the snapshot size is the stated formula plus the safetensors header
    num_parameters = sum(v.numel() for v in _profile(snapshots[-1], 0.05).values())
    payload = phe.snapshot_bytes(num_parameters, 3, "float32")
    assert payload < snapshots[-1].path.stat().st_size < payload + 200 * 3 * len(final)


def test_a_tracked_profile_is_reconstructed_from_the_other_two(trained_run):
    """sigma_rel 0.08, tracked during training, from the 0.05 and 0.10 snapshots only (12 steps,
    one every 2): the reconstruction is within 3 % (measured 1.1 %) of the distance between the
    0.05 and 0.10 EMAs; each tracked profile itself comes back to float rounding."""
    snapshots = phe.list_snapshots(trained_run / "posthoc_ema")
    final = {s: _flat(_profile(snapshots[-1], s)) for s in (0.05, 0.08, 0.10)}
    spread = (final[0.05] - final[0.10]).norm()
    result = phe.reconstruct(snapshots, 0.08, source_sigma_rels=[0.05, 0.10])
    assert result.step == 12 and {s for _, s in result.sources} == {0.05, 0.10}
    assert result.profile_error < 0.03
    error = (_flat(result.state) - final[0.08]).norm() / spread
    assert error < 0.03, f"0.08 reconstructed to {error:.4f} of the 0.05-0.10 distance"
    # far better than just taking the nearest tracked profile
    assert error < 0.1 * (final[0.10] - final[0.08]).norm() / spread
    for sigma_rel in (0.05, 0.10):
        exact = phe.reconstruct(snapshots, sigma_rel, source_sigma_rels=[0.05, 0.10])
        assert (_flat(exact.state) - final[sigma_rel]).norm() / spread < 1e-5


def test_load_profile_gives_a_module_state_dict_at_the_checkpoint_step(trained_run):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    checkpoint = read_checkpoint(ckpt)
    state = phe.load_profile(ckpt, 0.10)
    assert state.keys() == checkpoint["state_dict"].keys()
    module = module_from_checkpoint(checkpoint)
    module.load_state_dict(state)  # strict: every key, every shape
    final = _profile(phe.list_snapshots(trained_run / "posthoc_ema")[-1], 0.10)
    for name, value in final.items():
        torch.testing.assert_close(state[name], value, rtol=1e-5, atol=1e-6)
    # an older checkpoint reconstructs at its own step from the snapshots up to it
    older = phe.load_profile(trained_run / "checkpoints" / "step_0000004.ckpt", 0.10)
    snapshot_4 = _profile(phe.list_snapshots(trained_run / "posthoc_ema")[1], 0.10)
    for name, value in snapshot_4.items():
        torch.testing.assert_close(older[name], value, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"No post-hoc EMA snapshot at step 5; .*nearest"):
        phe.load_profile(ckpt, 0.10, step=5)


def test_load_profile_without_snapshots_says_how_to_get_them(trained_run, tmp_path):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    with pytest.raises(FileNotFoundError, match="ema=posthoc"):
        phe.load_profile(ckpt, 0.10, snapshot_dir=tmp_path)


# ------------------------------------------------------------------------------------------
# (c) our solve and synthesis vs ema-pytorch's on the same snapshots


def test_reconstruction_matches_ema_pytorch_post_hoc_ema_on_the_same_snapshots(trained_run,
                                                                             tmp_path):
    ema_pytorch = pytest.importorskip("ema_pytorch")
    from ema_pytorch.post_hoc_ema import solve_weights as their_solve

    snapshots = phe.list_snapshots(trained_run / "posthoc_ema")
    sigma_rels = (0.05, 0.10)
    module = module_from_checkpoint(read_checkpoint(trained_run / "checkpoints" / "last.ckpt"))
    folder = tmp_path / "ema_pytorch"
    theirs = ema_pytorch.PostHocEMA(module, sigma_rels=sigma_rels, checkpoint_folder=str(folder),
                                    checkpoint_every_num_steps="manual")
    # the same snapshots in ema-pytorch's layout: <profile index>.<step>.pt, KarrasEMA state dicts
    for snapshot in snapshots:
        for index, sigma_rel in enumerate(sigma_rels):
            state = {f"ema_model.{name}": value for name, value in
                     _profile(snapshot, sigma_rel).items()}
            state.update(initted=torch.tensor(True), step=torch.tensor(snapshot.step))
            torch.save(state, folder / f"{index}.{snapshot.step}.pt")

    for sigma_rel in (0.03, 0.08, 0.15):
        gamma = phe.sigma_rel_to_gamma(sigma_rel)
        ours = phe.reconstruct(snapshots, sigma_rel, source_sigma_rels=sigma_rels,
                               normalize=False)
        # the solve: same coefficients for the same (step, gamma) snapshots
        steps = torch.tensor([float(s) for s, _ in ours.sources], dtype=torch.float64)
        gammas = torch.tensor([phe.sigma_rel_to_gamma(s) for _, s in ours.sources],
                              dtype=torch.float64)
        expected = their_solve(steps, gammas, torch.tensor([12.0], dtype=torch.float64),
                               torch.tensor([gamma], dtype=torch.float64))
        torch.testing.assert_close(ours.coefficients, expected.squeeze(-1), rtol=1e-10,
                                   atol=1e-12)
        # the synthesis: the same weights (its synthesize_ema_model rounds gamma to float32, a
        # 1e-8 relative effect on the coefficients; it accumulates in float32)
        synthesized = dict(theirs.synthesize_ema_model(sigma_rel=sigma_rel, step=12)
                           .ema_model.named_parameters())
        for name, value in ours.state.items():
            torch.testing.assert_close(value, synthesized[name].detach(), rtol=1e-5, atol=1e-6)
        # ours, as EDM2, normalises the coefficients to sum 1: the same combination rescaled
        normalized = phe.reconstruct(snapshots, sigma_rel, source_sigma_rels=sigma_rels)
        total = float(expected.sum())
        for name, value in normalized.state.items():
            torch.testing.assert_close(value, synthesized[name].detach() / total, rtol=1e-5,
                                       atol=1e-6)


# ------------------------------------------------------------------------------------------
# (b) kill after a snapshot, before the next checkpoint; resume


class _Killed(Exception):
    pass


@pytest.mark.slow
def test_resume_after_a_kill_keeps_the_snapshot_series_of_an_uninterrupted_run(tmp_path,
                                                                               monkeypatch,
                                                                               single_thread):
    reference_dir, interrupted_dir = tmp_path / "reference", tmp_path / "interrupted"
    run(compose_config("train", RUN, reference_dir))

    original = PostHocEMA.write_snapshot

    def write_then_die(self):
        path = original(self)
        if self.step == 6:  # snapshot 6 is on disk, the last checkpoint is step 4
            raise _Killed("killed after snapshot 6")
        return path

    monkeypatch.setattr(PostHocEMA, "write_snapshot", write_then_die)
    with pytest.raises(_Killed):
        run(compose_config("train", RUN, interrupted_dir))
    monkeypatch.undo()
    folder = interrupted_dir / "posthoc_ema"
    assert [s.step for s in phe.list_snapshots(folder)] == [2, 4, 6]
    assert not (interrupted_dir / "checkpoints" / "step_0000008.ckpt").exists()
    # What a killed run can leave behind: a snapshot 6 that a rerun need not reproduce bit for bit
    # (GPU nondeterminism: here perturbed), a snapshot from later in a longer schedule and a
    # partial file of a write in progress.
    stale = {s: {n: v + 1.0 for n, v in _profile(phe.list_snapshots(folder)[-1], s).items()}
             for s in (0.05, 0.10)}
    phe.write_snapshot(folder, 6, stale)
    phe.write_snapshot(folder, 20, stale)
    (folder / ".step_00000008.safetensors.12345.partial").write_bytes(b"half a file")

    run(compose_config("train", RUN, interrupted_dir))  # the same run again: resumes at step 4
    _assert_same_series(reference_dir, interrupted_dir)


def _assert_same_series(reference_dir: Path, other_dir: Path) -> None:
    """The same snapshot files, bit for bit, and the same averages in the final checkpoint."""
    expected = phe.list_snapshots(reference_dir / "posthoc_ema")
    resumed = phe.list_snapshots(other_dir / "posthoc_ema")
    assert [s.step for s in resumed] == [s.step for s in expected] == [2, 4, 6, 8, 10, 12]
    assert sorted(p.name for p in (other_dir / "posthoc_ema").iterdir()) == [
        s.path.name for s in expected]
    for reference, continued in zip(expected, resumed):
        reference_tensors, continued_tensors = load_file(reference.path), load_file(
            continued.path)
        assert reference_tensors.keys() == continued_tensors.keys()
        for key, value in reference_tensors.items():
            assert torch.equal(value, continued_tensors[key]), (reference.step, key)
    reference_state = read_checkpoint(reference_dir / "checkpoints" / "last.ckpt")
    resumed_state = read_checkpoint(other_dir / "checkpoints" / "last.ckpt")
    for sigma_rel, named in reference_state["callbacks"]["PostHocEMA"]["averages"].items():
        for name, value in named.items():
            assert torch.equal(value, resumed_state["callbacks"]["PostHocEMA"]["averages"]
                               [sigma_rel][name]), name


class _SaveAndStop(L.Callback):
    """A stop-signal handler ordered before PostHocEMA (as callbacks.preemption is): it saves a
    checkpoint of step 6 in on_train_batch_end, before PostHocEMA's update of that step, and
    dies."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 6:
            trainer.save_checkpoint(Path(trainer.default_root_dir) / "checkpoints"
                                    / "stopped.ckpt")
            raise _Killed("stopped at step 6")


@pytest.mark.slow
def test_a_checkpoint_saved_by_an_earlier_callback_resumes_the_same_series(tmp_path,
                                                                          monkeypatch,
                                                                          single_thread):
    import diffsweep.train as train_module

    reference_dir, stopped_dir = tmp_path / "reference", tmp_path / "stopped"
    run(compose_config("train", RUN, reference_dir))
    build_callbacks = train_module.build_callbacks
    monkeypatch.setattr(train_module, "build_callbacks",
                        lambda cfg, **kwargs: [_SaveAndStop(), *build_callbacks(cfg, **kwargs)])
    with pytest.raises(_Killed):
        run(compose_config("train", RUN, stopped_dir))
    monkeypatch.undo()
    checkpoint = read_checkpoint(stopped_dir / "checkpoints" / "stopped.ckpt")
    # the averages were brought to the checkpoint's step when it was saved
    assert checkpoint["global_step"] == checkpoint["callbacks"]["PostHocEMA"]["step"] == 6
    assert [s.step for s in phe.list_snapshots(stopped_dir / "posthoc_ema")] == [2, 4]
    run(compose_config("train", RUN, stopped_dir))  # resumes at 6: writes the missing snapshot 6
    _assert_same_series(reference_dir, stopped_dir)


def test_resuming_without_post_hoc_state_or_with_other_sigma_rels_is_refused(trained_run,
                                                                              tmp_path):
    ckpt = read_checkpoint(trained_run / "checkpoints" / "step_0000004.ckpt")
    callback = PostHocEMA(sigma_rels=[0.05, 0.10])
    callback.load_state_dict(ckpt["callbacks"]["PostHocEMA"])
    module = module_from_checkpoint(ckpt)
    callback._track(module)
    with pytest.raises(ValueError, match=r"sigma_rels=\[0.05, 0.08, 0.1\].*resume with the same"):
        callback._restore(ckpt["callbacks"]["PostHocEMA"], 4)

    class _Trainer:  # what on_train_start reads
        global_step, is_global_zero, max_steps, default_root_dir = 4, True, 12, str(tmp_path)

    fresh = PostHocEMA()
    fresh.setup(_Trainer(), module, "fit")
    with pytest.raises(ValueError, match="without post-hoc EMA state.*from step 0"):
        fresh.on_train_start(_Trainer(), module)


# ------------------------------------------------------------------------------------------
# evaluate.py ema.sigma_rel=...


def test_evaluate_loads_the_reconstructed_profile(trained_run, tmp_path):
    from diffsweep.evaluate import load_model

    ckpt = trained_run / "checkpoints" / "last.ckpt"
    cfg = compose_config("evaluate", [f"ckpt_path={ckpt}", "ema.sigma_rel=0.08", "metrics=none",
                                      "device=cpu"], tmp_path / "eval")
    model = load_model(cfg, torch.device("cpu"))
    assert float(model.row_head["sigma_rel"]) == 0.08
    expected = phe.load_profile(ckpt, 0.08)
    for name, value in model.denoiser.state_dict().items():
        torch.testing.assert_close(value, expected[f"denoiser.{name}"])
    plain = load_model(compose_config("evaluate", [f"ckpt_path={ckpt}", "metrics=none",
                                                   "device=cpu"], tmp_path / "plain"),
                       torch.device("cpu"))
    assert plain.row_head["sigma_rel"] in ("", None)
    default_ema = read_checkpoint(ckpt)["state_dict"]
    for name, value in plain.denoiser.state_dict().items():
        assert torch.equal(value, default_ema[f"denoiser.{name}"])
    for bad in (["ema.sigma_rel=0.5"], ["ema.sigma_rel=0.08", "weights=raw"]):
        with pytest.raises(ValueError, match="sigma_rel"):
            load_model(compose_config("evaluate", [f"ckpt_path={ckpt}", "metrics=none", *bad],
                                      tmp_path / "bad"), torch.device("cpu"))


@pytest.mark.slow
def test_evaluate_sweeps_sigma_rel_into_one_results_file(trained_run, tmp_path):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    result = run_entry_point("evaluate.py", f"ckpt_path={ckpt}", "-m",
                             "ema.sigma_rel=0.05,0.12", "sampler.num_steps=2",
                             "metrics=fid_tiny", "metrics.fid.evaluator.num_samples=16",
                             "grid_samples=4", "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "sweep" / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(float(row["sigma_rel"]) for row in rows) == [0.05, 0.12]
    assert all(float(row["fid"]) >= 0 for row in rows)
    assert len({row["fid"] for row in rows}) == 2  # different weights, different samples


# ------------------------------------------------------------------------------------------
# the study's analyze script


def _analyze():
    path = REPO / "experiments" / "posthoc_ema" / "analyze.py"
    spec = importlib.util.spec_from_file_location("analyze_posthoc_ema", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_analyze_tables_and_plots_fid_against_sigma_rel(tmp_path):
    columns = ["ckpt_path", "train_scheduler", "sampler", "num_steps", "spacing", "nfe", "seed",
               "sigma_rel", "fid"]
    rows = []
    for schedule, offset in (("linear", 0.0), ("cosine", 5.0)):
        for seed in (0, 1):
            rows.append([f"{schedule}.ckpt", schedule, "dpmpp_2m", 20, "karras", 20, seed, "",
                         30.0 + offset + seed])
            for sigma_rel in (0.03, 0.05, 0.08, 0.12, 0.2):
                fid = 20.0 + offset + 100 * (sigma_rel - 0.08) ** 2 * 10 + seed
                rows.append([f"{schedule}.ckpt", schedule, "dpmpp_2m", 20, "karras", 20, seed,
                             sigma_rel, fid])
    path = tmp_path / "results.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(rows)
    analyze = _analyze()
    analyze.main([str(path), "--out-dir", str(tmp_path)])
    text = (tmp_path / "results.md").read_text()
    assert (tmp_path / "fid_vs_sigma_rel.png").stat().st_size > 1000
    assert "| linear | dpmpp_2m (karras) | 20 |" in text
    assert "20.50 ± 0.71 (n=2)" in text        # linear, sigma_rel 0.08: seeds 0 and 1
    assert "30.50 ± 0.71 (n=2)" in text        # linear, default EMA
    best = analyze.best_sigma_rel(analyze.group(analyze.load_rows([path])))
    assert best[("linear", "dpmpp_2m (karras)", 20)][0] == 0.08
    assert best[("cosine", "dpmpp_2m (karras)", 20)][0] == 0.08
    # paired by seed: profile - default of the same seed; the seed offset (+seed) cancels
    deltas = analyze.paired_deltas(analyze.load_rows([path]))
    assert deltas[("linear", "dpmpp_2m (karras)", 20)][0.08] == pytest.approx([-10.0, -10.0])
    assert deltas[("cosine", "dpmpp_2m (karras)", 20)][0.2] == pytest.approx([-10.0 + 14.4] * 2)
    assert "| linear | dpmpp_2m (karras) | 20 | -7.50 ± 0.00 (n=2) |" in text  # sigma_rel 0.03
