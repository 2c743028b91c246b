"""The diffusers bridge for flow matching: import and export with FlowMatchEulerDiscreteScheduler.

Offline: tiny random ``UNet2DModel`` s and a tiny diffsweep ``unet_tiny`` built from the real
configs (``experiment=rectified_flow``); nothing is downloaded.

- Import: a ``FlowMatchEulerDiscreteScheduler`` config becomes a
  :class:`~diffsweep.schedules.FlowMatchingSchedule` whose ``uniform_t`` grid and ``c_noise`` are
  ``set_timesteps``' sigmas and timesteps (two float32 ulps: diffusers holds them in float32), and
  diffusers' loop (``set_timesteps`` + ``step`` with the UNet) equals our Euler on the imported
  denoiser to ``LOOP_ATOL`` = 1e-5 on samples of order 1-4 (float32 rounding: measured 5e-7),
  the UNet being told diffusers' timestep (one float32 ulp) and fed its ``x_t`` (``LOOP_ATOL``).
- Export: a flow-trained diffsweep model writes a DDPMPipeline folder with the flow scheduler;
  the pipeline call, the plain scheduler loop, and the re-import all sample what we sample.
- Refusals: one line naming the key and its value.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402

from diffsweep.assembly import build_module  # noqa: E402
from diffsweep.denoiser import Denoiser  # noqa: E402
from diffsweep.diffusers_bridge import (  # noqa: E402
    FLOW_REFUSED_OPTIONS,
    load_pretrained,
    resolve_scheduler_config,
    schedule_from_config,
)
from diffsweep.export import ExportError, export_pipeline, export_scheduler_config  # noqa: E402
from diffsweep.generate import generate  # noqa: E402
from diffsweep.grids import sigma_grid  # noqa: E402
from diffsweep.nets.unet import UNet  # noqa: E402
from diffsweep.samplers import SAMPLERS, Sampler  # noqa: E402
from diffsweep.schedules import DiscreteVPSchedule, FlowMatchingSchedule  # noqa: E402
from tests.conftest import compose_config  # noqa: E402
from tests.test_diffusers_bridge import assert_images_match, assert_raw_match, seeded, tiny_unet  # noqa: E402
from tests.test_export import TINY, from_pretrained, perturbed  # noqa: E402
from tests.test_flow import SIGMA_ULP, TIMESTEP_ULP, diffusers_calculate_shift, noise_levels  # noqa: E402

#: Samples of diffusers' float32 loop vs our float64 Euler state (both from the same noise).
LOOP_ATOL = 1e-5
#: A tiny unet_tiny (8x8, 2 levels, 4 groups everywhere: exportable) for the flow-trained model.
TINY_OVERRIDES = ["model=unet_tiny", "data.resolution=8", "model.base_channels=16",
                  "model.channel_mults=[1,2]", "model.attention_resolutions=[4]",
                  "model.num_groups=4"]


def flow_folder(tmp_path: Path, scheduler, seed: int = 0, **unet_kwargs):
    """A UNet2DModel folder with the flow scheduler's config beside it; returns (folder, unet)."""
    unet = tiny_unet(seed=seed, **unet_kwargs)
    folder = tmp_path / "unet"
    unet.save_pretrained(folder)
    scheduler.save_pretrained(folder)
    return folder, unet


def flow_loop(unet, scheduler, noise: torch.Tensor, num_steps: int, mu: float | None = None,
              class_labels: torch.Tensor | None = None) -> torch.Tensor:
    """diffusers' flow sampling loop with a UNet2DModel (what docs/FLOW.md tells users to run)."""
    scheduler.set_timesteps(num_steps, mu=mu)
    x = noise.clone()
    with torch.no_grad():
        for timestep in scheduler.timesteps:
            velocity = unet(x, timestep, class_labels=class_labels).sample
            x = scheduler.step(velocity, timestep, x).prev_sample
    return x


def record_inputs(unet) -> list[tuple[torch.Tensor, float]]:
    """``(sample, timestep)`` of every call of ``unet``, appended as the calls happen."""
    seen: list[tuple[torch.Tensor, float]] = []

    def hook(module, args, kwargs):
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        seen.append((args[0].detach().clone(),
                     float(torch.as_tensor(timestep).reshape(-1)[0])))

    unet.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def write_scheduler(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps(config))
    return path


# --------------------------------------------------------------------------- (a) grids


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("num_steps", [1, 2, 7, 28, 50])
def test_imported_config_gives_flow_match_euler_sigmas_and_timesteps(tmp_path, shift, num_steps):
    reference = FlowMatchEulerDiscreteScheduler(shift=shift)
    full, schedule = resolve_scheduler_config(
        write_scheduler(tmp_path, json.loads(reference.to_json_string())))
    assert isinstance(schedule, FlowMatchingSchedule) and full["shift"] == shift
    assert schedule.shift == shift and schedule.t_min == pytest.approx(reference.sigma_min,
                                                                      rel=1e-7)
    reference.set_timesteps(num_steps)
    sigmas = sigma_grid(schedule, num_steps, "uniform_t")
    torch.testing.assert_close(noise_levels(schedule, sigmas).float(), reference.sigmas,
                               rtol=0, atol=SIGMA_ULP)
    timesteps = schedule.c_noise(schedule.t_of_sigma(sigmas[:-1]))
    torch.testing.assert_close(timesteps.float(), reference.timesteps, rtol=0, atol=TIMESTEP_ULP)


@pytest.mark.parametrize("image_seq_len", [256, 1024, 4096])
@pytest.mark.parametrize("num_steps", [1, 4, 28])
def test_dynamic_shifting_config_imports_at_an_image_seq_len(image_seq_len, num_steps):
    """Flux's config (``shift: 3.0`` beside ``use_dynamic_shifting: true``: diffusers ignores the
    static shift then) at ``image_seq_len`` tokens is diffusers' grid for ``mu =
    calculate_shift(image_seq_len)``."""
    reference = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0)
    config = json.loads(reference.to_json_string())
    schedule = schedule_from_config(config, image_seq_len=image_seq_len)
    mu = diffusers_calculate_shift()(image_seq_len)
    assert schedule.use_dynamic_shifting and schedule.shift == pytest.approx(math.exp(mu),
                                                                            rel=1e-12)
    reference.set_timesteps(num_steps, mu=mu)
    sigmas = sigma_grid(schedule, num_steps, "uniform_t")
    torch.testing.assert_close(noise_levels(schedule, sigmas).float(), reference.sigmas,
                               rtol=0, atol=SIGMA_ULP)
    timesteps = schedule.c_noise(schedule.t_of_sigma(sigmas[:-1]))
    torch.testing.assert_close(timesteps.float(), reference.timesteps, rtol=0, atol=TIMESTEP_ULP)


def test_flow_match_heun_config_is_the_same_model():
    """FlowMatchHeunDiscreteScheduler solves the same flow (num_train_timesteps, shift)."""
    heun = json.loads(diffusers.FlowMatchHeunDiscreteScheduler(shift=3.0).to_json_string())
    euler = json.loads(FlowMatchEulerDiscreteScheduler(shift=3.0).to_json_string())
    assert repr(schedule_from_config(heun)) == repr(schedule_from_config(euler))


# --------------------------------------------------------------------------- (b) the loop


@pytest.mark.parametrize("shift,num_steps", [(1.0, 10), (3.0, 10), (3.0, 28)])
def test_diffusers_flow_loop_equals_our_euler_on_the_imported_denoiser(tmp_path, shift,
                                                                       num_steps):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    folder, unet = flow_folder(tmp_path, scheduler, seed=1)
    pm = load_pretrained(folder)
    schedule = pm.denoiser.schedule
    assert isinstance(schedule, FlowMatchingSchedule) and schedule.shift == shift
    assert pm.denoiser.prediction_type == pm.info["prediction_type"] == "velocity"
    assert (pm.info["scheduler_class"], pm.info["shift"], pm.info["num_train_timesteps"]) == (
        "FlowMatchEulerDiscreteScheduler", shift, 1000)
    sampler = pm.adapt_sampler(Sampler("euler", num_steps))
    assert sampler.spacing == "uniform_t"
    ours_inputs, theirs_inputs = record_inputs(pm.denoiser.net.unet), record_inputs(unet)
    ours = generate(pm.denoiser, sampler, 4, pm.image_shape, generator=seeded(0))
    noise = torch.randn((4, *pm.image_shape), generator=seeded(0))
    theirs = flow_loop(unet, scheduler, noise, num_steps)
    assert_raw_match(ours, theirs)
    assert float((ours - theirs).abs().max()) < LOOP_ATOL
    # The UNet is told diffusers' timestep (sigma * N: our c_noise) and fed its x_t (c_in x~).
    assert len(ours_inputs) == len(theirs_inputs) == num_steps
    for (x_ours, t_ours), (x_theirs, t_theirs) in zip(ours_inputs, theirs_inputs):
        assert abs(t_ours - t_theirs) <= TIMESTEP_ULP
        assert float((x_ours - x_theirs).abs().max()) < LOOP_ATOL
    c_noise = schedule.c_noise(schedule.t_of_sigma(sampler.sigmas(schedule)[:-1])).float()
    torch.testing.assert_close(c_noise, scheduler.timesteps, rtol=0, atol=TIMESTEP_ULP)


def test_loop_check_sees_a_wrong_shift(tmp_path):
    """Power: the same comparison fails when our schedule's shift differs by 1 %."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    folder, unet = flow_folder(tmp_path, scheduler, seed=1)
    pm = load_pretrained(folder)
    wrong = Denoiser(pm.denoiser.net, FlowMatchingSchedule(shift=3.03), "velocity")
    ours = generate(wrong, Sampler("euler", 10), 4, pm.image_shape, generator=seeded(0))
    noise = torch.randn((4, *pm.image_shape), generator=seeded(0))
    assert float((ours - flow_loop(unet, scheduler, noise, 10)).abs().max()) > 100 * LOOP_ATOL


def test_imported_flow_model_samples_with_every_sampler(tmp_path):
    folder, _ = flow_folder(tmp_path, FlowMatchEulerDiscreteScheduler(shift=3.0), seed=2)
    pm = load_pretrained(folder)
    calls: list[int] = []
    pm.denoiser.net.unet.register_forward_hook(lambda *args: calls.append(1))
    for method in sorted(SAMPLERS):
        calls.clear()
        sampler = pm.adapt_sampler(Sampler(method, 4))
        samples = generate(pm.denoiser, sampler, 2, pm.image_shape, generator=seeded(3))
        assert samples.shape == (2, *pm.image_shape), method
        assert torch.isfinite(samples).all() and samples.abs().max() > 0.1, method
        assert len(calls) == sampler.nfe_on(pm.denoiser.schedule), method  # heun: 2 * 4 - 2


def test_ddpm_pipeline_folder_with_the_flow_scheduler_imports_and_matches_its_call(tmp_path):
    """What our export writes (and a user can save): DDPMPipeline + FlowMatchEulerDiscreteScheduler,
    whose call is the flow Euler loop."""
    pipe = diffusers.DDPMPipeline(tiny_unet(seed=3), FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.save_pretrained(tmp_path / "pipe")
    pipe.set_progress_bar_config(disable=True)
    pm = load_pretrained(tmp_path / "pipe")
    ours = generate(pm.denoiser, pm.adapt_sampler(Sampler("euler", 8)), 4, pm.image_shape,
                    generator=seeded(4))
    theirs = pipe(batch_size=4, generator=seeded(4), num_inference_steps=8,
                  output_type="pt").images
    assert_images_match(ours, theirs)


def test_class_conditional_flow_unet_matches_the_loop_with_labels(tmp_path):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=2.0)
    folder, unet = flow_folder(tmp_path, scheduler, seed=4, num_class_embeds=3)
    pm = load_pretrained(folder)
    labels = torch.tensor([0, 2])
    ours = generate(pm.denoiser, pm.adapt_sampler(Sampler("euler", 6)), 2, pm.image_shape,
                    generator=seeded(5), class_labels=labels)
    noise = torch.randn((2, *pm.image_shape), generator=seeded(5))
    assert_raw_match(ours, flow_loop(unet, scheduler, noise, 6, class_labels=labels))


def test_dynamic_shifting_folder_imports_with_image_seq_len_and_matches_the_loop(tmp_path):
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0)
    folder, unet = flow_folder(tmp_path, scheduler, seed=5)
    pm = load_pretrained(folder, image_seq_len=1024)
    mu = diffusers_calculate_shift()(1024)
    assert pm.info["use_dynamic_shifting"] and pm.info["image_seq_len"] == 1024
    assert pm.info["shift"] == pytest.approx(math.exp(mu), rel=1e-12)
    ours = generate(pm.denoiser, pm.adapt_sampler(Sampler("euler", 10)), 3, pm.image_shape,
                    generator=seeded(6))
    noise = torch.randn((3, *pm.image_shape), generator=seeded(6))
    theirs = flow_loop(unet, scheduler, noise, 10, mu=mu)
    assert float((ours - theirs).abs().max()) < LOOP_ATOL
    other = load_pretrained(folder, image_seq_len=4096)
    assert other.info["fingerprint"] != pm.info["fingerprint"]


# --------------------------------------------------------------------------- (c) export


def flow_trained_module(tmp_path: Path, *overrides: str, seed: int = 0):
    """``experiment=rectified_flow`` (scheduler=flow, prediction velocity) on a tiny unet_tiny,
    weights moved off their init (zero-initialised output convs would make every check trivial)
    and three AdamW steps of its own flow loss, in eval mode."""
    cfg = compose_config("train", ["experiment=rectified_flow", *TINY_OVERRIDES, *overrides],
                         tmp_path / "run")
    module = build_module(cfg)
    assert isinstance(module.schedule, FlowMatchingSchedule)
    assert module.prediction_type == "velocity" and isinstance(module.net, UNet)
    perturbed(module.net, seed=seed)
    module.train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
    generator = seeded(seed)
    for _ in range(3):
        x0 = torch.rand((8, *module.image_shape), generator=generator) * 2 - 1
        noise = module.training_noise(x0, generator)
        loss = module.batch_loss(x0, None, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return module.eval()


@pytest.mark.parametrize("scheduler_name,shift", [("flow", 1.0), ("flow_sd3", 3.0)])
def test_exported_flow_model_samples_like_diffsweep_in_diffusers(tmp_path, scheduler_name, shift):
    module = flow_trained_module(tmp_path, f"scheduler={scheduler_name}", seed=1)
    denoiser, shape = module.denoiser, tuple(module.image_shape)
    out = export_pipeline(denoiser, shape, tmp_path / "export")
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline"
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    config = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert (config["_class_name"], config["num_train_timesteps"], config["shift"],
            config["use_dynamic_shifting"]) == ("FlowMatchEulerDiscreteScheduler", 1000, shift,
                                                False)
    assert all(config[key] == allowed for key, (allowed, _) in FLOW_REFUSED_OPTIONS.items())

    ours = generate(denoiser, Sampler("euler", 10, spacing="uniform_t"), 4, shape,
                    generator=seeded(2))
    pipe = from_pretrained(out)  # DiffusionPipeline.from_pretrained: the user's one-liner
    assert type(pipe).__name__ == "DDPMPipeline"
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    theirs = pipe(batch_size=4, generator=seeded(2), num_inference_steps=10,
                  output_type="pt").images
    assert_images_match(ours, theirs)
    # The loop docs/FLOW.md shows, on the raw samples.
    unet = diffusers.UNet2DModel.from_pretrained(out / "unet").eval()
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(out / "scheduler")
    noise = torch.randn((4, *shape), generator=seeded(2))
    raw = flow_loop(unet, scheduler, noise, 10)
    assert_raw_match(ours, raw)
    assert float((ours - raw).abs().max()) < LOOP_ATOL

    # Round trip: the export imports as the same schedule and model.
    pm = load_pretrained(out)
    schedule = pm.denoiser.schedule
    assert isinstance(schedule, FlowMatchingSchedule)
    assert (schedule.shift, schedule.c_noise_scale, schedule.t_min, schedule.t_max) == (
        module.schedule.shift, module.schedule.c_noise_scale, module.schedule.t_min,
        module.schedule.t_max)
    assert pm.denoiser.prediction_type == "velocity" and pm.image_shape == shape
    assert torch.equal(pm.adapt_sampler(Sampler("euler", 10)).sigmas(schedule),
                       Sampler("euler", 10, spacing="uniform_t").sigmas(module.schedule))
    x = torch.randn((3, *shape), generator=seeded(3), dtype=torch.float64)
    sigma = torch.tensor([0.05, 1.0, 30.0], dtype=torch.float64)
    with torch.no_grad():
        assert float((pm.denoiser(x, sigma) - denoiser(x, sigma)).abs().max()) < 1e-5
    again = generate(pm.denoiser, pm.adapt_sampler(Sampler("heun", 6)), 4, shape,
                     generator=seeded(2))
    mine = generate(denoiser, Sampler("heun", 6, spacing="uniform_t"), 4, shape,
                    generator=seeded(2))
    assert float((again - mine).abs().max()) < LOOP_ATOL
    metadata = json.loads((out / "unet" / "diffsweep.json").read_text())
    assert metadata["prediction_type"] == "velocity" and "FlowMatchingSchedule" in \
        metadata["schedule"]


def test_exported_dynamic_shift_model_samples_with_mu_and_reimports(tmp_path):
    """scheduler=flow_flux: the config keeps the dynamic shift's line; image_seq_len and mu (which
    diffusers' config has no key for) go to diffsweep.json, so the re-import needs no argument."""
    module = flow_trained_module(tmp_path, "scheduler=flow_flux", "scheduler.image_seq_len=16",
                                 seed=2)
    denoiser, shape = module.denoiser, tuple(module.image_shape)
    out = export_pipeline(denoiser, shape, tmp_path / "export", pipeline="flow")
    config = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert config["use_dynamic_shifting"] is True and config["shift"] == 1.0
    assert (config["base_shift"], config["max_shift"], config["base_image_seq_len"],
            config["max_image_seq_len"]) == (0.5, 1.15, 256, 4096)
    metadata = json.loads((out / "unet" / "diffsweep.json").read_text())
    mu = diffusers_calculate_shift()(16)
    assert metadata["image_seq_len"] == 16 and metadata["mu"] == pytest.approx(mu, rel=1e-12)
    ours = generate(denoiser, Sampler("euler", 8, spacing="uniform_t"), 3, shape,
                    generator=seeded(4))
    unet = diffusers.UNet2DModel.from_pretrained(out / "unet").eval()
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(out / "scheduler")
    noise = torch.randn((3, *shape), generator=seeded(4))
    assert float((ours - flow_loop(unet, scheduler, noise, 8, mu=metadata["mu"])).abs().max()) \
        < LOOP_ATOL
    pm = load_pretrained(out)
    assert pm.denoiser.schedule.shift == pytest.approx(module.schedule.shift, rel=1e-15)
    assert pm.info["image_seq_len"] == 16
    again = generate(pm.denoiser, pm.adapt_sampler(Sampler("euler", 8)), 3, shape,
                     generator=seeded(4))
    assert float((again - ours).abs().max()) < LOOP_ATOL


@pytest.mark.slow  # > 5 s: runs in .ci/run's slow step
def test_flow_trained_checkpoint_exports_from_the_command_line(train_config, tmp_path):
    from diffsweep.checkpoints import load_module
    from diffsweep.export import main
    from diffsweep.train import run

    cfg = train_config("experiment=rectified_flow", "trainer.max_steps=2",
                       "trainer.val_check_interval=2", "callbacks.sample_grid.at_train_end=false")
    run(cfg)
    checkpoint = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    out = main([f"ckpt_path={checkpoint}", f"out={tmp_path / 'export'}"])
    module = load_module(checkpoint)
    pipe = from_pretrained(out)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    ours = generate(module.denoiser, Sampler("euler", 6, spacing="uniform_t"), 2,
                    module.image_shape, generator=seeded(5))
    unet = diffusers.UNet2DModel.from_pretrained(out / "unet").eval()
    noise = torch.randn((2, *module.image_shape), generator=seeded(5))
    raw = flow_loop(unet, FlowMatchEulerDiscreteScheduler.from_pretrained(out / "scheduler"),
                    noise, 6)
    assert float((ours - raw).abs().max()) < LOOP_ATOL


# --------------------------------------------------------------------------- (d) refusals


FLOW = "FlowMatchEulerDiscreteScheduler"


@pytest.mark.parametrize("config,words", [
    ({"invert_sigmas": True}, ["invert_sigmas=true", "allowed: false"]),
    ({"use_karras_sigmas": True}, ["use_karras_sigmas=true", "sampler.spacing", "allowed: false"]),
    ({"use_exponential_sigmas": True}, ["use_exponential_sigmas=true", "allowed: false"]),
    ({"use_beta_sigmas": True}, ["use_beta_sigmas=true", "allowed: false"]),
    ({"stochastic_sampling": True}, ["stochastic_sampling=true", "allowed: false"]),
    ({"shift_terminal": 0.1}, ["shift_terminal=0.1", "allowed: null"]),
    ({"prediction_type": "epsilon"}, ["prediction_type='epsilon'", "velocity",
                                      "allowed: flow_prediction"]),
    ({"shift": 0.0}, ["shift=0.0", "allowed: a number > 0"]),
    ({"use_dynamic_shifting": True}, ["use_dynamic_shifting=true", "image_seq_len",
                                      "allowed: a positive integer"]),
    ({"use_dynamic_shifting": True, "base_shift": None}, ["base_shift=null", "allowed: a number"]),
    ({"_class_name": "FlowMatchLCMScheduler"}, ["_class_name='FlowMatchLCMScheduler'",
                                                "consistency", "allowed", FLOW]),
    ({"_class_name": "DDIMScheduler", "prediction_type": "flow_prediction"},
     ["prediction_type='flow_prediction'", FLOW, "allowed: epsilon"]),
    ({"_class_name": "UniPCMultistepScheduler", "use_flow_sigmas": True},
     ["use_flow_sigmas=true", FLOW, "allowed: false"]),
])
def test_inexpressible_flow_configs_are_refused_naming_key_and_value(tmp_path, config, words):
    config = {"_class_name": FLOW, **config}
    with pytest.raises(ValueError) as error:
        schedule_from_config(config)
    message = str(error.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message
    # The same refusal from load_pretrained, before any weights are read (there are none).
    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "config.json").write_text(tiny_unet().to_json_string())
    (folder / "scheduler_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as again:
        load_pretrained(folder)
    assert str(again.value) == message


def test_refused_options_table_covers_every_flow_match_euler_option():
    """Every FlowMatchEuler option is read as a model key or refused (a new diffusers option would
    show up here)."""
    import inspect

    options = set(inspect.signature(FlowMatchEulerDiscreteScheduler.__init__).parameters) - {
        "self"}
    read = {"num_train_timesteps", "shift", "use_dynamic_shifting", "base_shift", "max_shift",
            "base_image_seq_len", "max_image_seq_len", "time_shift_type"}
    assert options == read | set(FLOW_REFUSED_OPTIONS)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_flow_models_without_a_velocity_net_are_refused_before_writing(tmp_path,
                                                                       prediction_type):
    denoiser = Denoiser(UNet(**TINY), FlowMatchingSchedule(shift=3.0), prediction_type)
    with pytest.raises(ExportError) as error:
        export_pipeline(denoiser, (1, 8, 8), tmp_path / "export")
    message = str(error.value)
    assert "\n" not in message
    assert f"prediction_type={prediction_type!r} on a FlowMatchingSchedule" in message
    assert "allowed: velocity" in message
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("schedule,prediction_type,pipeline,match", [
    (FlowMatchingSchedule(), "velocity", "ddpm",
     r"pipeline='ddpm' has no flow-matching equivalent.*allowed for a FlowMatchingSchedule: "
     r"ddim, flow"),
    (DiscreteVPSchedule(), "epsilon", "flow",
     r"pipeline='flow' needs a flow-matching schedule.*DiscreteVPSchedule; allowed: ddim, ddpm"),
    (DiscreteVPSchedule(), "velocity", "ddim",
     r"prediction_type='velocity'.*epsilon, sample, v_prediction.*scheduler=flow"),
])
def test_pipelines_that_do_not_fit_the_schedule_are_refused(tmp_path, schedule, prediction_type,
                                                            pipeline, match):
    denoiser = Denoiser(UNet(**TINY), schedule, prediction_type)
    with pytest.raises(ExportError, match=match):
        export_pipeline(denoiser, (1, 8, 8), tmp_path / "export", pipeline=pipeline)
    assert not (tmp_path / "export").exists()


def test_flow_schedule_exports_only_as_flow_match_euler():
    with pytest.raises(ExportError, match="as a DDIMScheduler; allowed: "
                                          "FlowMatchEulerDiscreteScheduler"):
        export_scheduler_config(FlowMatchingSchedule(), "velocity", "DDIMScheduler")
    config = export_scheduler_config(FlowMatchingSchedule(shift=3.0, t_max=0.999), "velocity",
                                     FLOW)
    assert config["shift"] == 3.0  # t_max (a sampling range) is no key of diffusers' config
