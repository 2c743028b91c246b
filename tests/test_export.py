"""Exporting diffsweep models as diffusers pipelines (diffsweep.export).

Each export is loaded back with diffusers' own ``DiffusionPipeline.from_pretrained`` /
``UNet2DModel.from_pretrained`` and must sample what diffsweep samples from the same noise.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffsweep.denoiser import Denoiser  # noqa: E402
from diffsweep.diffusers_bridge import load_pretrained  # noqa: E402
from diffsweep.export import (  # noqa: E402
    MIN_BETA,
    ExportError,
    convert_unet,
    export_pipeline,
    main,
    parse_args,
    parse_flag,
)
from diffsweep.generate import generate  # noqa: E402
from diffsweep.nets.diffusers_unet import DiffusersUNet, diffusers_unet  # noqa: E402
from diffsweep.nets.unet import UNet  # noqa: E402
from diffsweep.samplers import SAMPLERS, Sampler  # noqa: E402
from diffsweep.schedules import ContinuousVPSchedule, DiscreteVPSchedule, EDMSchedule, VESchedule  # noqa: E402
from tests.test_diffusers_bridge import assert_images_match, seeded  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LEGACY_CHECKPOINT = REPO / "tests" / "fixtures" / "legacy_main.ckpt"
TINY = dict(in_channels=1, resolution=8, base_channels=16, channel_mults=(1, 2),
            num_res_blocks=1, attention_resolutions=(4,), num_groups=4)


def perturbed(net: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """``net`` with every weight moved off its init (nets/unet.py zero-inits its output convs,
    which would make any comparison trivial)."""
    generator = seeded(seed)
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return net.eval()


def from_pretrained(folder: Path):
    pipe = diffusers.DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("kwargs", [
    TINY,
    dict(in_channels=3, resolution=8, base_channels=16, channel_mults=(1, 2), num_res_blocks=2,
         attention_resolutions=(8, 4), num_groups=4, num_classes=3, dropout=0.1),
    dict(in_channels=1, resolution=16, base_channels=32, channel_mults=(1, 2, 2),
         num_res_blocks=1, attention_resolutions=(8,), num_groups=8),  # model=unet_tiny
])
def test_diffsweep_unet_converts_to_an_equal_unet2dmodel(kwargs):
    net = perturbed(UNet(**kwargs))
    converted = convert_unet(net)
    size, channels = kwargs["resolution"], kwargs["in_channels"]
    x = torch.randn((4, channels, size, size), generator=seeded(1))
    c_noise = torch.tensor([0.0, 17.25, 500.0, 999.0])
    labels = torch.tensor([0, 1, 2, 3]) if "num_classes" in kwargs else None
    with torch.no_grad():
        expected = net(x, c_noise, labels)
        assert expected.abs().max() > 0.5
        assert float((converted(x, c_noise, labels) - expected).abs().max()) < 1e-5
        if labels is not None:  # no labels: the null label on both sides
            assert float((converted(x, c_noise) - net(x, c_noise)).abs().max()) < 1e-5


def test_unet_with_per_layer_group_counts_is_refused():
    net = UNet(in_channels=1, resolution=8, base_channels=8, channel_mults=(1, 2),
               num_res_blocks=1, attention_resolutions=(4,), num_groups=4)  # 2 and 4 groups
    with pytest.raises(ExportError, match=r"\[2, 4\] groups.*model=diffusers_unet.*"
                                          r"model.num_groups=2"):
        convert_unet(net)


def test_exported_unet_pipeline_samples_like_diffsweep(tmp_path):
    schedule = DiscreteVPSchedule("linear", beta_end=0.004)
    denoiser = Denoiser(perturbed(UNet(**TINY), seed=2), schedule)
    out = export_pipeline(denoiser, (1, 8, 8), tmp_path / "export")
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "DDIMPipeline"
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler["beta_schedule"], scheduler["beta_start"], scheduler["beta_end"],
            scheduler["num_train_timesteps"], scheduler["prediction_type"],
            scheduler["clip_sample"], scheduler["rescale_betas_zero_snr"]) == (
        "linear", 0.0001, 0.004, 1000, "epsilon", False, False)
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()

    pipe = from_pretrained(out)
    assert type(pipe).__name__ == "DDIMPipeline"
    x, c_noise = torch.randn((3, 1, 8, 8), generator=seeded(3)), torch.tensor([3.0, 250.0, 900.0])
    unet = diffusers.UNet2DModel.from_pretrained(out / "unet").eval()
    with torch.no_grad():
        assert float((unet(x, c_noise).sample - denoiser.net(x, c_noise)).abs().max()) < 1e-5
    ours = generate(denoiser, Sampler("ddim", 10), 4, (1, 8, 8), generator=seeded(4))
    theirs = pipe(batch_size=4, generator=seeded(4), num_inference_steps=10,
                  output_type="pt").images
    assert_images_match(ours, theirs)
    # And back: the export imports as the same model.
    pm = load_pretrained(out)
    assert torch.equal(pm.denoiser.schedule.alphas_cumprod, schedule.alphas_cumprod)
    again = generate(pm.denoiser, pm.adapt_sampler(Sampler("ddim", 10)), 4, pm.image_shape,
                     generator=seeded(4))
    assert float((again - ours).abs().max()) < 1e-5


def test_exported_diffusers_unet_v_prediction_ddpm_pipeline(tmp_path):
    """model=diffusers_unet, cosine schedule, v-prediction, DDPMPipeline with the same generator."""
    net = perturbed(diffusers_unet(in_channels=2, resolution=8, block_out_channels=(8, 16),
                                   attention_resolutions=(4,), norm_num_groups=4), seed=5)
    denoiser = Denoiser(net, DiscreteVPSchedule("squaredcos_cap_v2"), "v_prediction")
    out = export_pipeline(denoiser, (2, 8, 8), tmp_path / "export", pipeline="ddpm")
    pipe = from_pretrained(out)
    assert type(pipe).__name__ == "DDPMPipeline"
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.scheduler.config.variance_type == "fixed_small"
    ours = generate(denoiser, Sampler("ddpm", 10), 3, (2, 8, 8), generator=seeded(6))
    theirs = pipe(batch_size=3, generator=seeded(6), num_inference_steps=10,
                  output_type="pt").images
    assert_images_match(ours, theirs)


def test_class_conditional_export_keeps_the_null_label(tmp_path):
    net = perturbed(UNet(**TINY, num_classes=3), seed=7)
    denoiser = Denoiser(net, DiscreteVPSchedule("scaled_linear", beta_start=0.00085,
                                                beta_end=0.012, rescale_betas_zero_snr=True),
                        "v_prediction")
    out = export_pipeline(denoiser, (1, 8, 8), tmp_path / "export")
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler["beta_start"], scheduler["beta_end"], scheduler["rescale_betas_zero_snr"]) \
        == (0.00085, 0.012, True)
    unet = diffusers.UNet2DModel.from_pretrained(out / "unet").eval()
    assert unet.config.num_class_embeds == 4
    pm = load_pretrained(out)
    assert (pm.denoiser.net.num_classes, pm.denoiser.net.null_label) == (3, 3)
    x, c_noise = torch.randn((2, 1, 8, 8), generator=seeded(8)), torch.tensor([5.0, 700.0])
    with torch.no_grad():
        for labels in (torch.tensor([0, 2]), torch.tensor([3, 3])):
            assert float((unet(x, c_noise, class_labels=labels).sample
                          - net(x, c_noise, labels)).abs().max()) < 1e-5
        assert float((pm.denoiser.net(x, c_noise) - net(x, c_noise)).abs().max()) < 1e-5


def test_vp_continuous_exports_as_its_table_at_integer_timesteps(tmp_path):
    """The continuous VP net told c_noise = 999 t is the same model on the trained_betas table of
    alpha(n / 999)^2: diffusers' DDIM equals our DDIM through those sigmas (betas in float32),
    the t = 0 entry being sigma~ = 2**-12 (beta_0 = 2**-24) instead of 0."""
    schedule = ContinuousVPSchedule(beta_min=0.1, beta_max=4.0)
    denoiser = Denoiser(perturbed(UNet(**TINY), seed=9), schedule)
    out = export_pipeline(denoiser, (1, 8, 8), tmp_path / "export")
    pipe = from_pretrained(out)
    assert pipe.scheduler.config.trained_betas is not None
    theirs = pipe(batch_size=4, generator=seeded(10), num_inference_steps=10,
                  output_type="pt").images
    timesteps = pipe.scheduler.timesteps.to(torch.float64)
    assert pipe.scheduler.config.trained_betas[0] == MIN_BETA and timesteps[-1] == 0
    sigmas = schedule.sigma_tilde(timesteps / 999)
    sigmas[-1] = (MIN_BETA / (1 - MIN_BETA)) ** 0.5
    sigmas = torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])
    noise = torch.randn((4, 1, 8, 8), generator=seeded(10))
    x = noise.to(torch.float64) * (1 + float(sigmas[0]) ** 2) ** 0.5
    ours = SAMPLERS["ddim"].fn(denoiser, x, sigmas).to(torch.float32)
    assert_images_match(ours, theirs)


@pytest.mark.parametrize("schedule,prediction_type,match", [
    (VESchedule(), "epsilon", "Cannot export a VESchedule.*scheduler=linear"),
    (EDMSchedule(), "v_prediction", "Cannot export a EDMSchedule.*scheduler=linear"),
    (DiscreteVPSchedule(), "velocity", "prediction_type='velocity'.*epsilon, sample, v_pred"),
])
def test_inexpressible_models_are_refused_before_writing(tmp_path, schedule, prediction_type,
                                                         match):
    denoiser = Denoiser(UNet(**TINY), schedule, prediction_type)
    with pytest.raises(ExportError, match=match):
        export_pipeline(denoiser, (1, 8, 8), tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_existing_folder_needs_overwrite(tmp_path):
    denoiser = Denoiser(UNet(**TINY), DiscreteVPSchedule())
    export_pipeline(denoiser, (1, 8, 8), tmp_path / "export")
    with pytest.raises(FileExistsError, match="overwrite=true"):
        export_pipeline(denoiser, (1, 8, 8), tmp_path / "export")
    export_pipeline(Denoiser(denoiser.net, DiscreteVPSchedule(), "sample"), (1, 8, 8),
                    tmp_path / "export", overwrite=True)
    assert load_pretrained(tmp_path / "export").denoiser.prediction_type == "sample"


def test_cli_arguments_are_checked():
    assert parse_args(["ckpt_path=a.ckpt", "out=b"]) == {
        "ckpt_path": "a.ckpt", "out": "b", "weights": "ema", "pipeline": "ddim",
        "overwrite": False}
    with pytest.raises(ValueError, match="Unknown argument 'weight'.*ckpt_path, out, weights"):
        parse_args(["ckpt_path=a.ckpt", "out=b", "weight=raw"])
    with pytest.raises(ValueError, match="Missing out=...; usage"):
        parse_args(["ckpt_path=a.ckpt"])
    with pytest.raises(ValueError, match="must be key=value"):
        parse_args(["a.ckpt"])


@pytest.mark.parametrize("value, expected", [
    (True, True), (False, False), (1, True), (0, False), ("true", True), ("FALSE", False),
    ("Yes", True), ("no", False), ("1", True), ("0", False)])
def test_overwrite_takes_booleans_and_their_words(value, expected):
    assert parse_flag("overwrite", value) is expected


@pytest.mark.parametrize("value", ["banana", "", 2, 0.5, None, "off"])
def test_overwrite_of_any_other_value_is_refused_in_one_line(value):
    with pytest.raises(ValueError) as caught:
        parse_flag("overwrite", value)
    assert str(caught.value) == (f"overwrite={value!r} is not allowed; allowed: true or false "
                                 f"(also 1/0, yes/no, any case).")


def test_cli_settings_are_checked_before_the_checkpoint_is_read(tmp_path, monkeypatch):
    import diffsweep.checkpoints

    def never(*args, **kwargs):
        raise AssertionError("the checkpoint was read before the settings were checked")

    monkeypatch.setattr(diffsweep.checkpoints, "load_module", never)
    denoiser = Denoiser(UNet(**TINY), DiscreteVPSchedule())
    export = export_pipeline(denoiser, (1, 8, 8), tmp_path / "export")
    before = {path: path.read_bytes() for path in export.rglob("*") if path.is_file()}
    base = [f"ckpt_path={LEGACY_CHECKPOINT}", f"out={export}"]
    with pytest.raises(ValueError, match="overwrite='banana' is not allowed"):
        main([*base, "overwrite=banana"])
    with pytest.raises(FileExistsError, match="is not empty; pass overwrite=true"):
        main([*base, "overwrite=false"])
    with pytest.raises(FileExistsError, match="is not empty; pass overwrite=true"):
        main(base)
    with pytest.raises(ValueError, match="weights='best' is not allowed; allowed: ema, raw"):
        main([*base, "weights=best"])
    with pytest.raises(ValueError, match="pipeline='pndm' is not allowed; allowed: ddim, ddpm"):
        main([*base, "pipeline=pndm"])
    with pytest.raises(FileNotFoundError, match="ckpt_path=.*missing.ckpt is not a file"):
        main([f"ckpt_path={tmp_path / 'missing.ckpt'}", f"out={tmp_path / 'new'}"])
    with pytest.raises(FileExistsError, match="is a file"):
        main([f"ckpt_path={LEGACY_CHECKPOINT}", f"out={LEGACY_CHECKPOINT}", "overwrite=true"])
    assert {path: path.read_bytes() for path in export.rglob("*") if path.is_file()} == before


def test_overwrite_is_a_boolean_in_the_api_too(tmp_path):
    denoiser = Denoiser(UNet(**TINY), DiscreteVPSchedule())
    export_pipeline(denoiser, (1, 8, 8), tmp_path / "export")
    stamp = (tmp_path / "export" / "model_index.json").stat().st_mtime_ns
    with pytest.raises(ValueError, match="overwrite='banana' is not allowed"):
        export_pipeline(denoiser, (1, 8, 8), tmp_path / "export", overwrite="banana")
    with pytest.raises(FileExistsError, match="overwrite=true"):  # the string "false" is false
        export_pipeline(denoiser, (1, 8, 8), tmp_path / "export", overwrite="false")
    assert (tmp_path / "export" / "model_index.json").stat().st_mtime_ns == stamp
    export_pipeline(Denoiser(denoiser.net, DiscreteVPSchedule(), "sample"), (1, 8, 8),
                    tmp_path / "export", overwrite="true")
    assert load_pretrained(tmp_path / "export").denoiser.prediction_type == "sample"


def test_overwrite_replaces_only_an_earlier_export(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    (home / "model_index.json").write_text("{}")
    denoiser = Denoiser(UNet(**TINY), DiscreteVPSchedule())
    with pytest.raises(FileExistsError, match=r"holds files that are not part of an export "
                                              r"\(thesis.tex\); overwrite=true replaces only"):
        export_pipeline(denoiser, (1, 8, 8), home, overwrite=True)
    assert sorted(path.name for path in home.iterdir()) == ["model_index.json", "thesis.tex"]
    assert (home / "model_index.json").read_text() == "{}"


@pytest.mark.slow  # > 5 s: runs in .ci/run's slow step
def test_cli_refuses_a_checkpoint_without_an_exact_equivalent(tmp_path):
    """The legacy fixture's UNet (base 8, num_groups 4) has GroupNorms of 2 and 4 groups."""
    result = subprocess.run([sys.executable, "-m", "diffsweep.export",
                             f"ckpt_path={LEGACY_CHECKPOINT}", f"out={tmp_path / 'export'}"],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode != 0
    assert "error: No exact UNet2DModel equivalent" in result.stderr
    assert not (tmp_path / "export").exists()


@pytest.mark.slow  # > 5 s: runs in .ci/run's slow step
def test_trained_checkpoint_exports_ema_or_raw_weights(train_config, tmp_path):
    from diffsweep.checkpoints import load_module
    from diffsweep.train import run

    cfg = train_config("trainer.max_steps=2", "trainer.val_check_interval=2",
                       "callbacks.sample_grid.at_train_end=false", "scheduler.beta_end=0.004")
    run(cfg)
    checkpoint = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    out = main([f"ckpt_path={checkpoint}", f"out={tmp_path / 'ema'}"])
    module = load_module(checkpoint)
    pipe = from_pretrained(out)
    assert pipe.unet.config.sample_size == 16
    x, c_noise = torch.randn((2, 1, 16, 16), generator=seeded(11)), torch.tensor([10.0, 600.0])
    with torch.no_grad():
        assert float((pipe.unet(x, c_noise).sample
                      - module.denoiser.net(x, c_noise)).abs().max()) < 1e-5
    ours = generate(module.denoiser, Sampler("ddim", 10), 2, module.image_shape,
                    generator=seeded(12))
    theirs = pipe(batch_size=2, generator=seeded(12), num_inference_steps=10,
                  output_type="pt").images
    assert_images_match(ours, theirs)
    assert pipe.scheduler.config.beta_end == 0.004  # read from the run config
    metadata = json.loads((out / "unet" / "diffsweep.json").read_text())
    assert metadata["weights"] == "ema" and metadata["source"] == str(checkpoint.resolve())
    raw = main([f"ckpt_path={checkpoint}", f"out={tmp_path / 'raw'}", "weights=raw"])
    raw_unet = diffusers.UNet2DModel.from_pretrained(raw / "unet")
    assert any(not torch.equal(a, b) for a, b in zip(raw_unet.parameters(),
                                                     pipe.unet.parameters()))
    assert isinstance(load_pretrained(raw).denoiser.net, DiffusersUNet)
