"""Importing diffusers models (diffsweep.diffusers_bridge) and model=diffusers_unet.

Conformance: a tiny random ``UNet2DModel`` saved with its scheduler, loaded with
``load_pretrained`` and sampled with diffsweep's samplers from the same starting noise, gives
diffusers' own samples (the real ``DDIMPipeline``/``DDPMPipeline`` calls, and scheduler loops
where the pipeline's clamp to [0, 1] would hide the raw samples) to ``ATOL``.

Most tests use a linear schedule with ``beta_end=0.004`` (``alphas_cumprod`` stays above 0.18):
with a random net the standard table's x0 estimates reach ~200 and the pipeline's clamp would
saturate every pixel; here about a third of the pixels stay inside (0, 1), which is asserted.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffsweep.denoiser import Denoiser  # noqa: E402
from diffsweep.diffusers_bridge import (  # noqa: E402
    TrainedBetasVPSchedule,
    load_pretrained,
    read_weights_file,
    schedule_from_config,
    scheduler_config,
    weight_files,
)
from diffsweep.generate import generate  # noqa: E402
from diffsweep.nets.diffusers_unet import DiffusersUNet, diffusers_unet  # noqa: E402
from diffsweep.samplers import Sampler  # noqa: E402
from diffsweep.schedules import DiscreteVPSchedule, EDMSchedule  # noqa: E402

ATOL = 1e-4
SMALL_NOISE = dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.004)


def tiny_unet(channels: int = 1, size: int = 8, num_class_embeds: int | None = None,
              seed: int = 0) -> diffusers.UNet2DModel:
    """A random 2-level UNet2DModel with attention at the second level (45k parameters)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return diffusers.UNet2DModel(
            sample_size=size, in_channels=channels, out_channels=channels,
            block_out_channels=(8, 16), layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
            attention_head_dim=None, num_class_embeds=num_class_embeds).eval()


def record_timesteps(unet) -> list[float]:
    """The (first) timestep of every call of ``unet``, appended as the calls happen."""
    seen: list[float] = []
    unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(float(torch.as_tensor(
            args[1] if len(args) > 1 else kwargs["timestep"]).reshape(-1)[0])), with_kwargs=True)
    return seen


def to_image(samples: torch.Tensor) -> torch.Tensor:
    """The pipelines' post-processing: [-1, 1] -> [0, 1], clamped."""
    return (samples / 2 + 0.5).clamp(0, 1)


def assert_images_match(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    ours_image = to_image(ours)
    inside = ((ours_image > 0) & (ours_image < 1)).float().mean()
    assert inside > 0.2, f"only {inside:.0%} of the pixels are unclamped: the check would be empty"
    assert float((ours_image - theirs).abs().max()) < ATOL


def assert_raw_match(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.abs().max() > 0.5, "samples should be of order 1"
    assert float((ours - theirs).abs().max()) < ATOL


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def save_pipeline(pipeline, folder: Path) -> Path:
    pipeline.save_pretrained(folder)
    pipeline.set_progress_bar_config(disable=True)
    return folder


# ----------------------------------------------------------------------------- conformance


@pytest.mark.parametrize("spacing,steps_offset", [("leading", 0), ("leading", 1), ("trailing", 0)])
def test_ddim_matches_the_ddim_pipeline(tmp_path, spacing, steps_offset):
    scheduler = diffusers.DDIMScheduler(**SMALL_NOISE, clip_sample=False,
                                        timestep_spacing=spacing, steps_offset=steps_offset)
    pipe = diffusers.DDIMPipeline(tiny_unet(), scheduler)
    pm = load_pretrained(save_pipeline(pipe, tmp_path / "pipe"))
    assert pm.image_shape == (1, 8, 8)
    assert pm.info["scheduler_class"] == "DDIMScheduler" and pm.info["source"] == str(
        (tmp_path / "pipe").resolve())
    sampler = pm.adapt_sampler(Sampler("ddim", 10))
    assert (sampler.spacing, sampler.steps_offset) == (spacing, steps_offset)
    ours_t, theirs_t = record_timesteps(pm.denoiser.net.unet), record_timesteps(pipe.unet)
    ours = generate(pm.denoiser, sampler, 4, pm.image_shape, generator=seeded(0))
    theirs = pipe(batch_size=4, generator=seeded(0), num_inference_steps=10, eta=0.0,
                  output_type="pt").images
    assert_images_match(ours, theirs)
    # The UNet is told exactly DDIM's integer timesteps (c_noise = n, steps_offset included).
    assert ours_t == theirs_t == [float(t) for t in pipe.scheduler.timesteps]


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_prediction_types_match_the_ddim_pipeline(tmp_path, prediction_type):
    """The standard DDPM table (x0 = a x_t - s v stays of order 1 for any net)."""
    scheduler = diffusers.DDIMScheduler(prediction_type=prediction_type, clip_sample=False)
    pipe = diffusers.DDIMPipeline(tiny_unet(seed=1), scheduler)
    pm = load_pretrained(save_pipeline(pipe, tmp_path / "pipe"))
    assert pm.denoiser.prediction_type == pm.info["prediction_type"] == prediction_type
    ours = generate(pm.denoiser, pm.adapt_sampler(Sampler("ddim", 20)), 4, pm.image_shape,
                    generator=seeded(3))
    theirs = pipe(batch_size=4, generator=seeded(3), num_inference_steps=20,
                  output_type="pt").images
    assert_images_match(ours, theirs)


def test_trained_betas_match_the_ddim_pipeline(tmp_path):
    betas = np.geomspace(1e-4, 6e-3, 1000).tolist()
    scheduler = diffusers.DDIMScheduler(trained_betas=betas, clip_sample=False)
    pipe = diffusers.DDIMPipeline(tiny_unet(seed=2), scheduler)
    pm = load_pretrained(save_pipeline(pipe, tmp_path / "pipe"))
    schedule = pm.denoiser.schedule
    assert isinstance(schedule, TrainedBetasVPSchedule) and pm.info["beta_schedule"] == \
        "trained_betas"
    assert torch.equal(schedule.alphas_cumprod.float(), pipe.scheduler.alphas_cumprod)
    ours = generate(pm.denoiser, pm.adapt_sampler(Sampler("ddim", 10)), 4, pm.image_shape,
                    generator=seeded(4))
    theirs = pipe(batch_size=4, generator=seeded(4), num_inference_steps=10,
                  output_type="pt").images
    assert_images_match(ours, theirs)


def test_ddpm_matches_the_ddpm_pipeline_with_the_same_generator(tmp_path):
    scheduler = diffusers.DDPMScheduler(**SMALL_NOISE, clip_sample=False)
    pipe = diffusers.DDPMPipeline(tiny_unet(seed=3), scheduler)
    pm = load_pretrained(save_pipeline(pipe, tmp_path / "pipe"))
    ours = generate(pm.denoiser, pm.adapt_sampler(Sampler("ddpm", 10)), 4, pm.image_shape,
                    generator=seeded(5))
    theirs = pipe(batch_size=4, generator=seeded(5), num_inference_steps=10,
                  output_type="pt").images
    assert_images_match(ours, theirs)


def _scheduler_loop(scheduler, unet, noise: torch.Tensor, num_steps: int,
                    class_labels: torch.Tensor | None = None) -> torch.Tensor:
    scheduler.set_timesteps(num_steps)
    sample = noise * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            output = unet(scheduler.scale_model_input(sample, t), t,
                          class_labels=class_labels).sample
            sample = scheduler.step(output, t, sample).prev_sample
    return sample


def test_dpmpp_2m_matches_dpm_solver_multistep(tmp_path):
    """A UNet2DModel folder with its scheduler in scheduler/; trailing grids are DPM-Solver's."""
    unet = tiny_unet(channels=2, seed=4)
    scheduler = diffusers.DPMSolverMultistepScheduler(**SMALL_NOISE, timestep_spacing="trailing")
    unet.save_pretrained(tmp_path / "unet")
    scheduler.save_pretrained(tmp_path / "unet" / "scheduler")
    pm = load_pretrained(tmp_path / "unet")
    assert pm.info["scheduler_class"] == "DPMSolverMultistepScheduler"
    sampler = pm.adapt_sampler(Sampler("dpmpp_2m", 10))
    assert sampler.spacing == "trailing"
    ours = generate(pm.denoiser, sampler, 3, pm.image_shape, generator=seeded(6))
    noise = torch.randn((3, *pm.image_shape), generator=seeded(6))
    assert_raw_match(ours, _scheduler_loop(scheduler, unet, noise, 10))


def test_class_conditional_ddim_matches_before_the_clamp(tmp_path):
    """A 3-channel 16x16 class-conditional UNet (trained elsewhere: no null label), its
    scheduler_config.json beside config.json, compared raw against a DDIMScheduler loop."""
    unet = tiny_unet(channels=3, size=16, num_class_embeds=4, seed=5)
    scheduler = diffusers.DDIMScheduler(**SMALL_NOISE, clip_sample=False)
    unet.save_pretrained(tmp_path / "unet")
    scheduler.save_pretrained(tmp_path / "unet")
    pm = load_pretrained(tmp_path / "unet")
    assert pm.image_shape == (3, 16, 16)
    assert pm.info["num_classes"] == pm.denoiser.num_classes == 4
    labels = torch.tensor([0, 3])
    ours = generate(pm.denoiser, pm.adapt_sampler(Sampler("ddim", 20)), 2, pm.image_shape,
                    generator=seeded(7), class_labels=labels)
    noise = torch.randn((2, *pm.image_shape), generator=seeded(7))
    assert_raw_match(ours, _scheduler_loop(scheduler, unet, noise, 20, labels))
    with pytest.raises(ValueError, match="no null label"):
        generate(pm.denoiser, Sampler("ddim", 2), 2, pm.image_shape, generator=seeded(0))


def test_euler_linspace_is_told_the_fractional_timesteps(tmp_path):
    """EulerDiscreteScheduler's linspace grid is fractional (linspace_frac); the UNet is told the
    same fractional t (999 / 7 apart for 8 steps). diffusers starts the Euler family from
    sigma_max * noise, we from the VP prior sqrt(1 + sigma_max^2) * noise: the loop is started from
    ours."""
    unet = tiny_unet(seed=6)
    scheduler = diffusers.EulerDiscreteScheduler(**SMALL_NOISE, timestep_spacing="linspace")
    unet.save_pretrained(tmp_path / "unet")
    scheduler.save_pretrained(tmp_path / "unet")
    pm = load_pretrained(tmp_path / "unet")
    sampler = pm.adapt_sampler(Sampler("euler", 8))
    assert sampler.spacing == "linspace_frac"
    seen = record_timesteps(pm.denoiser.net.unet)
    ours = generate(pm.denoiser, sampler, 2, pm.image_shape, generator=seeded(8))
    scheduler.set_timesteps(8)
    assert np.allclose(seen, scheduler.timesteps.numpy(), atol=1e-3, rtol=0)
    assert any(t != round(t) for t in seen)
    sigma_max = float(sampler.sigmas(pm.denoiser.schedule)[0])
    noise = torch.randn((2, *pm.image_shape), generator=seeded(8))
    start = noise * (1 + sigma_max**2) ** 0.5 / scheduler.init_noise_sigma
    assert_raw_match(ours, _scheduler_loop(scheduler, unet, start, 8))


@pytest.mark.parametrize("config", [
    dict(beta_schedule="linear"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
         rescale_betas_zero_snr=True),
    dict(beta_schedule="linear", num_train_timesteps=500, beta_end=0.01),
    dict(trained_betas=np.linspace(1e-3, 0.05, 200).tolist(), num_train_timesteps=200,
         rescale_betas_zero_snr=True),
])
def test_schedule_tables_equal_diffusers_and_export_back(config):
    schedule = schedule_from_config(config)
    reference = diffusers.DDPMScheduler(**config)
    assert torch.equal(schedule.alphas_cumprod, reference.alphas_cumprod.to(torch.float64))
    # The exported config rebuilds the same table (beta_start/end recovered from the table).
    exported = scheduler_config(schedule, "epsilon", "DDIMScheduler")
    assert torch.equal(schedule_from_config(exported).alphas_cumprod, schedule.alphas_cumprod)
    assert exported["rescale_betas_zero_snr"] == bool(config.get("rescale_betas_zero_snr"))
    if "beta_end" in config and not config.get("rescale_betas_zero_snr"):
        assert exported["beta_end"] == config["beta_end"]


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("config,words", [
    ({"_class_name": "FlowMapEulerDiscreteScheduler"},  # flow matching itself imports
     ["_class_name='FlowMapEulerDiscreteScheduler'", "flow map", "DDIMScheduler",
      "FlowMatchEulerDiscreteScheduler"]),
    ({"_class_name": "EDMEulerScheduler"}, ["EDMEulerScheduler", "EDM", "allowed"]),
    ({"_class_name": "ScoreSdeVeScheduler"}, ["ScoreSdeVeScheduler", "VE", "allowed"]),
    ({"_class_name": "LCMScheduler"}, ["LCMScheduler", "no discrete VP", "allowed"]),
    ({"beta_schedule": "sigmoid"}, ["beta_schedule='sigmoid'", "squaredcos_cap_v2"]),
    ({"prediction_type": "flow_prediction"}, ["prediction_type='flow_prediction'", "epsilon"]),
    ({"_class_name": "DPMSolverMultistepScheduler", "use_flow_sigmas": True},
     ["use_flow_sigmas=true", "flow matching"]),
    ({"_class_name": "EulerDiscreteScheduler", "timestep_type": "continuous"},
     ["timestep_type='continuous'", "allowed: discrete"]),
    ({"variance_type": "learned_range"}, ["variance_type='learned_range'", "fixed_small"]),
    ({"trained_betas": [0.1, 0.2], "num_train_timesteps": 1000},
     ["trained_betas has 2 entries", "num_train_timesteps=1000"]),
])
def test_inexpressible_scheduler_configs_are_refused(tmp_path, config, words):
    with pytest.raises(ValueError) as error:
        schedule_from_config(config)
    message = str(error.value)
    assert "\n" not in message
    for word in words:
        assert word in message
    # The same refusal comes from load_pretrained, before any weights are read (there are none).
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(tiny_unet().to_json_string())
    (tmp_path / "unet" / "scheduler_config.json").write_text(
        __import__("json").dumps({"_class_name": "DDIMScheduler", **config}))
    with pytest.raises(ValueError, match=words[0].replace("[", r"\[").replace("(", r"\(")):
        load_pretrained(tmp_path / "unet")


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    unet = tiny_unet()
    unet.save_pretrained(tmp_path / "unet", safe_serialization=False)
    diffusers.DDIMScheduler().save_pretrained(tmp_path / "unet")
    weights = tmp_path / "unet" / "diffusion_pytorch_model.bin"
    benign = read_weights_file(weights)  # a plain .bin state dict loads
    assert torch.equal(benign["conv_in.weight"], unet.conv_in.weight)
    assert isinstance(load_pretrained(tmp_path / "unet").denoiser.net, DiffusersUNet)

    torch.save({**benign, "conv_in.weight": Payload()}, weights)
    torch.load(weights, weights_only=False)  # the payload is live: full unpickling runs it
    assert marker.is_dir()
    marker.rmdir()
    with pytest.raises(ValueError, match="unpickling it would execute code"):
        load_pretrained(tmp_path / "unet")
    assert not marker.exists()


def _sharded_unet(folder: Path) -> tuple[Path, dict]:
    """A tiny UNet saved in two safetensors shards with its scheduler; (the index, its JSON)."""
    tiny_unet().save_pretrained(folder, max_shard_size="100KB")
    diffusers.DDIMScheduler(**SMALL_NOISE).save_pretrained(folder)
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    return index, json.loads(index.read_text())


def _point_first_shard_at(index: Path, content: dict, entry: str) -> str:
    """Rewrite the index so that the first shard's parameters come from ``entry``."""
    first = sorted(set(content["weight_map"].values()))[0]
    weight_map = {name: entry if shard == first else shard
                  for name, shard in content["weight_map"].items()}
    index.write_text(json.dumps({**content, "weight_map": weight_map}))
    return first


def test_sharded_weights_load_from_inside_the_folder(tmp_path):
    index, content = _sharded_unet(tmp_path / "unet")
    assert len(set(content["weight_map"].values())) == 2
    loaded = load_pretrained(tmp_path / "unet")
    assert loaded.info["weights"].count(".safetensors") == 2
    # a shard moved into a sub-folder of the model folder is still inside it
    first = sorted(set(content["weight_map"].values()))[0]
    (tmp_path / "unet" / "parts").mkdir()
    (tmp_path / "unet" / first).rename(tmp_path / "unet" / "parts" / first)
    _point_first_shard_at(index, content, f"parts/{first}")
    moved = load_pretrained(tmp_path / "unet")
    assert all(torch.equal(a, b) for a, b in zip(moved.denoiser.net.parameters(),
                                                 loaded.denoiser.net.parameters()))


@pytest.mark.parametrize("escape", ["dotdot", "absolute", "symlink", "symlinked_folder"])
def test_a_shard_index_cannot_leave_its_folder(tmp_path, escape):
    """An index naming ../../x, /abs/x or a symlink that resolves outside the model folder is
    refused (one line naming the index, the entry and the folder) before any weight is read,
    even where the file outside holds perfectly loadable weights."""
    model = tmp_path / "models" / "unet"
    index, content = _sharded_unet(model)
    first = sorted(set(content["weight_map"].values()))[0]
    outside = tmp_path / "x.safetensors"
    (model / first).rename(outside)  # the real shard, now outside the folder
    if escape == "dotdot":
        entry = "../../x.safetensors"
    elif escape == "absolute":
        entry = str(outside)
    elif escape == "symlink":
        entry = "link.safetensors"
        (model / entry).symlink_to(outside)
    else:
        (model / "parts").symlink_to(tmp_path, target_is_directory=True)
        entry = "parts/x.safetensors"
    _point_first_shard_at(index, content, entry)
    with pytest.raises(ValueError) as caught:
        load_pretrained(model)
    message = str(caught.value)
    assert "\n" not in message
    assert f"Weight index {index}" in message and repr(entry) in message
    assert f"model folder {model.resolve()}" in message
    with pytest.raises(ValueError, match="Weight index"):
        weight_files(model)


def test_a_hub_cache_snapshot_loads_its_shards_through_blob_links(tmp_path):
    """Hugging Face's cache keeps a snapshot's files as symlinks into the repository's blobs/:
    those stay allowed, a link into another repository's blobs does not."""
    source = tmp_path / "source"
    _, content = _sharded_unet(source)
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for number, path in enumerate(sorted(source.iterdir())):
        blob = repo / "blobs" / f"blob{number}"
        path.rename(blob)
        (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
    assert isinstance(load_pretrained(snapshot).denoiser.net, DiffusersUNet)
    other = tmp_path / "hub" / "models--org--other" / "blobs"
    other.mkdir(parents=True)
    first = sorted(set(content["weight_map"].values()))[0]
    target = (snapshot / first).resolve()
    target.rename(other / "stolen")
    (snapshot / first).unlink()
    (snapshot / first).symlink_to(other / "stolen")
    with pytest.raises(ValueError, match="outside the model folder"):
        load_pretrained(snapshot)


def test_folder_errors_name_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        load_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither model_index.json"):
        load_pretrained(tmp_path / "empty")
    unet = tiny_unet()
    unet.save_pretrained(tmp_path / "unet")
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        load_pretrained(tmp_path / "unet")
    # An explicit scheduler config (file or folder) is used.
    diffusers.DDIMScheduler(**SMALL_NOISE).save_pretrained(tmp_path / "elsewhere")
    pm = load_pretrained(tmp_path / "unet", scheduler=tmp_path / "elsewhere")
    assert pm.info["beta_end"] == 0.004 and pm.info["clip_sample"] is True
    pm = load_pretrained(tmp_path / "unet",
                         scheduler=tmp_path / "elsewhere" / "scheduler_config.json")
    assert pm.info["scheduler_class"] == "DDIMScheduler"


def test_unsupported_models_are_refused(tmp_path):
    conditional = tmp_path / "conditional"
    conditional.mkdir()
    (conditional / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    diffusers.DDIMScheduler().save_pretrained(conditional)
    with pytest.raises(ValueError,
                       match="_class_name='UNet2DConditionModel'.*allowed: UNet2DModel"):
        load_pretrained(conditional)
    learned_variance = tmp_path / "variance"
    with torch.random.fork_rng():
        diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=2,
                              block_out_channels=(8, 16), norm_num_groups=4,
                              down_block_types=("DownBlock2D", "DownBlock2D"),
                              up_block_types=("UpBlock2D", "UpBlock2D")).save_pretrained(
            learned_variance)
    diffusers.DDIMScheduler().save_pretrained(learned_variance)
    with pytest.raises(ValueError, match="out_channels=2 differs from in_channels=1"):
        load_pretrained(learned_variance)
    latent = tmp_path / "latent"
    latent.mkdir()
    (latent / "model_index.json").write_text(
        '{"_class_name": "LDMPipeline", "unet": ["diffusers", "UNet2DModel"], '
        '"vqvae": ["diffusers", "VQModel"], "scheduler": ["diffusers", "DDIMScheduler"]}')
    with pytest.raises(ValueError, match="vqvae"):
        load_pretrained(latent)


@pytest.mark.parametrize("clipping", [{"clip_sample": True, "clip_sample_range": 0.5},
                                      {"thresholding": True, "dynamic_thresholding_ratio": 0.9,
                                       "sample_max_value": 1.5}])
def test_scheduler_clipping_is_adopted_and_matches_the_ddim_pipeline(tmp_path, clipping):
    scheduler = diffusers.DDIMScheduler(**SMALL_NOISE, **{"clip_sample": False, **clipping})
    pipe = diffusers.DDIMPipeline(tiny_unet(), scheduler)
    pm = load_pretrained(save_pipeline(pipe, tmp_path / "pipe"))
    sampler = pm.adapt_sampler(Sampler("ddim", 10))
    assert all(sampler.options[key] == value for key, value in clipping.items())
    ours = generate(pm.denoiser, sampler, 4, pm.image_shape, generator=seeded(0))
    theirs = pipe(batch_size=4, generator=seeded(0), num_inference_steps=10, eta=0.0,
                  output_type="pt").images
    assert_images_match(ours, theirs)
    unclipped = generate(pm.denoiser, Sampler("ddim", 10, spacing="leading"), 4, pm.image_shape,
                         generator=seeded(0))
    assert not torch.allclose(unclipped, ours, atol=1e-3)  # the clipping really bound


def test_adapt_sampler_only_fills_auto(tmp_path):
    scheduler = diffusers.DDIMScheduler(timestep_spacing="leading", steps_offset=1)
    pm = load_pretrained(save_pipeline(diffusers.DDIMPipeline(tiny_unet(), scheduler),
                                       tmp_path / "pipe"))
    explicit = Sampler("heun", 5, "karras")
    assert pm.adapt_sampler(explicit) is explicit
    adapted = pm.adapt_sampler(Sampler("ddim", 7, eta=0.5))
    assert (adapted.spacing, adapted.steps_offset, adapted.num_steps) == ("leading", 1, 7)
    assert adapted.options == {"eta": 0.5, "clip_sample": True, "clip_sample_range": 1.0,
                               "thresholding": False, "dynamic_thresholding_ratio": 0.995,
                               "sample_max_value": 1.0}  # DDIMScheduler's clipping defaults
    assert "clip_sample" not in pm.adapt_sampler(Sampler("euler", 7)).options
    row = pm.row_fields()
    assert row["pretrained"] == pm.info["source"]
    assert row["pretrained_scheduler_class"] == "DDIMScheduler"
    assert row["pretrained_steps_offset"] == 1 and len(row["pretrained_fingerprint"]) == 16


# ----------------------------------------------------------------------------- model=diffusers_unet


def test_diffusers_unet_class_labels_null_label_and_guidance():
    net = diffusers_unet(in_channels=1, resolution=8, block_out_channels=(8, 16),
                         attention_resolutions=(4,), norm_num_groups=4, num_classes=3)
    assert net.unet.config.num_class_embeds == 4 and net.null_label == 3
    assert net.unet.config.down_block_types == ("DownBlock2D", "AttnDownBlock2D")
    x, c_noise = torch.randn(2, 1, 8, 8), torch.tensor([10.0, 500.5])
    with torch.no_grad():
        unconditional = net(x, c_noise)
        assert torch.equal(unconditional, net(x, c_noise, torch.tensor([3, 3])))
        assert not torch.allclose(unconditional, net(x, c_noise, torch.tensor([0, 1])))
    denoiser = Denoiser(net, DiscreteVPSchedule())
    samples = generate(denoiser, Sampler("ddim", 3), 2, (1, 8, 8), generator=seeded(0),
                       class_labels=torch.tensor([0, 2]), guidance_scale=2.0)
    assert samples.shape == (2, 1, 8, 8) and torch.isfinite(samples).all()


def test_diffusers_unet_takes_continuous_c_noise():
    """VE/EDM tell the net log(sigma)/4 (negative, fractional): the time embedding takes it."""
    net = diffusers_unet(in_channels=1, resolution=8, block_out_channels=(8, 16),
                         attention_resolutions=(), norm_num_groups=4)
    denoiser = Denoiser(net, EDMSchedule())
    x0 = denoiser(torch.randn(2, 1, 8, 8), torch.tensor([0.01, 10.0], dtype=torch.float64))
    assert x0.shape == (2, 1, 8, 8) and torch.isfinite(x0).all()


@pytest.mark.parametrize("kwargs,match", [
    (dict(resolution=10, block_out_channels=(8, 16, 16)), "resolution=10 is not divisible by 4"),
    (dict(block_out_channels=(8, 12)), "norm_num_groups=8 must divide"),
    (dict(block_out_channels=(8, 16), down_block_types=["DownBlock2D"]), "one entry per"),
    (dict(block_out_channels=(16, 32), attention_head_dim=12), "attention_head_dim=12"),
])
def test_diffusers_unet_bad_config_is_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        diffusers_unet(**{"in_channels": 1, "resolution": 16, **kwargs})


def test_diffusers_unet_pretrained_fine_tunes_the_folder_weights(tmp_path):
    pipe = diffusers.DDIMPipeline(tiny_unet(seed=7), diffusers.DDIMScheduler())
    pipe.save_pretrained(tmp_path / "pipe")
    net = diffusers_unet(in_channels=1, resolution=16, pretrained=str(tmp_path / "pipe"))
    expected = pipe.unet.state_dict()
    assert all(torch.equal(value, expected[name]) for name, value in
               net.unet.state_dict().items())
    assert list(net.unet.config.block_out_channels) == [8, 16]  # the folder's, not the defaults
    with pytest.raises(ValueError, match="in_channels=1 but the data has 3 channels"):
        diffusers_unet(in_channels=3, resolution=8, pretrained=str(tmp_path / "pipe"))
    # Its schedule, as a Hydra scheduler config for the fine-tuning run would build it.
    from hydra.utils import instantiate

    schedule = instantiate({"_target_": "diffsweep.diffusers_bridge.load_schedule",
                            "folder": str(tmp_path / "pipe")})
    assert torch.equal(schedule.alphas_cumprod.float(), pipe.scheduler.alphas_cumprod)


def test_learned_time_embedding_refuses_fractional_timesteps():
    with torch.random.fork_rng():
        unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1,
                                     block_out_channels=(8, 16), norm_num_groups=4,
                                     down_block_types=("DownBlock2D", "DownBlock2D"),
                                     up_block_types=("UpBlock2D", "UpBlock2D"),
                                     time_embedding_type="learned", num_train_timesteps=1000)
    net = DiffusersUNet(unet)
    x = torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(net(x, torch.tensor([7.0])), unet(x, torch.tensor([7])).sample)
        with pytest.raises(ValueError, match="integer timesteps"):
            net(x, torch.tensor([7.5]))


def test_train_runs_with_model_diffusers_unet(train_config):
    from diffsweep.checkpoints import load_module
    from diffsweep.train import run

    cfg = train_config("model=diffusers_unet", "trainer.max_steps=2",
                       "trainer.val_check_interval=2")
    run(cfg)
    checkpoint = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    module = load_module(checkpoint)
    assert isinstance(module.denoiser.net, DiffusersUNet)
    assert module.denoiser.net.unet.config.sample_size == 16
    raw = load_module(checkpoint, weights="raw")
    assert any(not torch.equal(a, b) for a, b in zip(module.parameters(), raw.parameters()))
