"""Precision and compile knobs: bf16-mixed on CPU, compiled checkpoints interchangeable."""

from pathlib import Path

import pytest
import torch

from diffsweep.checkpoints import load_module
from diffsweep.generate import generate
from diffsweep.train import run


@pytest.mark.slow  # > 5 s: runs in .ci/run's slow step
def test_bf16_mixed_trains_on_cpu(train_config):
    cfg = train_config("trainer.precision=bf16-mixed", "trainer.max_steps=3",
                       "callbacks.sample_grid.at_train_end=false")
    metrics = run(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    weights = load_module(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt")
    assert all(p.dtype == torch.float32 for p in weights.parameters())  # master weights stay fp32


@pytest.mark.slow  # > 15 s: runs in .ci/run's slow step
def test_compiled_run_checkpoints_load_without_compile_and_resume_compiled(train_config, tmp_path):
    compiled = ["module.compile=true", "+module.compile_options.backend=eager",
                "callbacks.sample_grid.at_train_end=false"]
    cfg = train_config(*compiled)
    run(cfg)
    checkpoint = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    state = torch.load(checkpoint, weights_only=False)
    assert not any("_orig_mod" in key for key in state["state_dict"])
    assert not any("_orig_mod" in key for key in state["current_model_state"])
    plain = load_module(checkpoint)  # an uncompiled model takes the compiled run's weights
    sample = generate(plain.denoiser, plain.sampler, 2, plain.image_shape,
                      generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(sample).all()
    # ...and a compiled run resumes from it (EMA state included)
    resumed = train_config(*compiled, "trainer.max_steps=6", f"ckpt_path={checkpoint}")
    resumed.paths.output_dir = str(tmp_path / "resumed")
    run(resumed)
    final = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)
    assert final["global_step"] == 6


def test_fused_adamw_with_bf16_mixed_clips_gradients(train_config):
    cfg = train_config("trainer.precision=bf16-mixed", "module.optimizer.fused=true",
                       "trainer.gradient_clip_val=1e-3", "trainer.max_steps=2",
                       "callbacks.sample_grid.at_train_end=false")
    metrics = run(cfg)  # Lightning alone refuses to clip with a fused optimizer
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))


class _ScalerPlugin:
    def __init__(self, scaler: torch.amp.GradScaler) -> None:
        self.scaler = scaler


class _TrainerWithScaler:
    """Just what ``configure_gradient_clipping`` reads from a 16-mixed GPU Trainer."""

    def __init__(self, scaler: torch.amp.GradScaler) -> None:
        self.precision_plugin = _ScalerPlugin(scaler)


def test_fused_adamw_under_a_grad_scaler_clips_true_gradients_and_steps_like_unfused():
    from diffsweep.denoiser import Denoiser
    from diffsweep.module import DiffusionModule
    from diffsweep.nets.unet import UNet
    from diffsweep.schedules import DiscreteVPSchedule

    def make() -> DiffusionModule:
        torch.manual_seed(0)
        net = UNet(in_channels=1, resolution=8, base_channels=8, channel_mults=(1, 2),
                   num_res_blocks=1, attention_resolutions=(), num_groups=2)
        return DiffusionModule(Denoiser(net, DiscreteVPSchedule("linear")), torch.optim.AdamW,
                               image_shape=(1, 8, 8), seed=0)

    x0 = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))

    def loss(module: DiffusionModule) -> torch.Tensor:  # the same noise for both modules
        noise = module.training_noise(x0, torch.Generator().manual_seed(2),
                                      torch.Generator().manual_seed(3))
        return module.batch_loss(x0, None, noise)

    clip = 1e-3
    fused_module, reference = make(), make()
    fused = torch.optim.AdamW(fused_module.parameters(), lr=1e-2, fused=True)
    assert fused._step_supports_amp_scaling  # the optimizer kind Lightning refuses to clip
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    fused_module.trainer = _TrainerWithScaler(scaler)
    scaler.scale(loss(fused_module)).backward()
    fused_module.configure_gradient_clipping(fused, clip, "norm")
    grads = [p.grad for p in fused_module.parameters() if p.grad is not None]
    assert torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])) <= clip * 1.001
    scaler.step(fused)

    plain = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    loss(reference).backward()
    torch.nn.utils.clip_grad_norm_(list(reference.parameters()), clip)
    plain.step()
    for ours, expected in zip(fused_module.parameters(), reference.parameters()):
        assert torch.allclose(ours, expected, atol=1e-6)


@pytest.mark.parametrize(("precision", "accelerator", "cpu_bf16", "expected"), [
    ("auto", "cpu", True, "bf16-mixed"),
    ("auto", "cpu", False, "32-true"),
    ("auto", "auto", True, "bf16-mixed" if not torch.cuda.is_available() else None),
    ("32-true", "cpu", True, "32-true"),
    ("bf16-mixed", "cpu", False, "bf16-mixed"),
])
def test_precision_auto_is_bf16_on_cpus_with_native_bf16_else_fp32(monkeypatch, precision,
                                                                     accelerator, cpu_bf16,
                                                                     expected):
    from omegaconf import OmegaConf

    from diffsweep import assembly

    if expected is None:
        pytest.skip("a CUDA device decides auto here")
    monkeypatch.setattr(assembly, "cpu_has_bf16", lambda: cpu_bf16)
    trainer_cfg = OmegaConf.create({"precision": precision, "accelerator": accelerator})
    assert assembly.resolve_precision(trainer_cfg) == expected


def test_the_default_run_trains_v_prediction_in_auto_precision_and_flow_trains_velocity(
        train_config):
    from diffsweep.assembly import build_module

    cfg = train_config()
    assert cfg.trainer.precision == "auto"
    assert build_module(cfg).prediction_type == "v_prediction"
    assert build_module(train_config("scheduler=flow")).prediction_type == "velocity"
    ddpm = train_config("experiment=ddpm")
    assert build_module(ddpm).prediction_type == "epsilon" and ddpm.trainer.precision == "32-true"
    assert ddpm.loss.weighting is None
