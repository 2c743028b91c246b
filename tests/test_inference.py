"""Sampling precision and the compiled, weight-frozen sampling net (diffsweep.inference)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from diffsweep.denoiser import Denoiser
from diffsweep.generate import generate
from diffsweep.inference import CompiledSamplingNet, autocast_dtype, cached_sampling_net
from diffsweep.module import DiffusionModule
from diffsweep.nets.unet import UNet
from diffsweep.samplers import Sampler
from diffsweep.schedules import DiscreteVPSchedule
from tests.conftest import compose_config

EAGER = {"backend": "eager"}  # dynamo without inductor: seconds, for the bookkeeping tests


def _net() -> UNet:
    net = UNet(in_channels=1, resolution=8, base_channels=8, channel_mults=(1, 2),
               num_res_blocks=1, attention_resolutions=(4,), num_groups=2)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in net.parameters():  # zero-initialised output layers would hide any change
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return net


def _module(**kwargs) -> DiffusionModule:
    return DiffusionModule(Denoiser(_net(), DiscreteVPSchedule("linear")), torch.optim.AdamW,
                           image_shape=(1, 8, 8), **kwargs)


def _inputs(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(batch)
    return (torch.randn(batch, 1, 8, 8, generator=generator),
            torch.rand(batch, generator=generator) * 999)


def _sample(module: DiffusionModule, **kwargs) -> torch.Tensor:
    options = {**module.sampling_options(), **kwargs}
    return generate(module.denoiser, Sampler("ddim", num_steps=3), 6, module.image_shape,
                    generator=torch.Generator().manual_seed(0), **options)


def test_unknown_sampling_precision_is_refused_by_name():
    with pytest.raises(ValueError, match="Unknown sampling precision 'fp8'.*bf16"):
        _module(sample_precision="fp8")
    with pytest.raises(ValueError, match="Unknown sampling precision"):
        _sample(_module(), precision="half")
    assert autocast_dtype("bf16-mixed") is torch.bfloat16 and autocast_dtype(32) is None


def test_bf16_sampling_runs_under_autocast_and_stays_close(single_thread):
    module = _module()
    full = _sample(module)
    half = _sample(module, precision="bf16")
    assert half.dtype == full.dtype  # the sampler's state keeps its dtype
    assert not torch.equal(half, full)  # the net really ran in bf16
    assert (half - full).abs().max() < 0.05 * full.abs().max()


def test_compiled_net_pads_short_batches_to_a_compiled_size(single_thread):
    net = _net().eval()
    frozen = CompiledSamplingNet(net, EAGER)
    x, c_noise = _inputs(5)
    with torch.no_grad():
        assert torch.allclose(frozen(x, c_noise), net(x, c_noise), atol=1e-6)
        assert torch.allclose(frozen(x[:2], c_noise[:2]), net(x[:2], c_noise[:2]), atol=1e-6)
    assert frozen.batch_sizes == {5}  # the short batch reused the size-5 graph
    assert frozen(*_inputs(7)).shape[0] == 7 and frozen.batch_sizes == {5, 7}


def test_compiled_net_keeps_its_copy_and_notices_changed_weights(single_thread):
    net = _net().eval()
    net.compile(**EAGER)  # compiled in place, as module.compile=true does
    frozen = CompiledSamplingNet(net, EAGER, freeze_weights=True)
    plain = CompiledSamplingNet(net, EAGER)
    x, c_noise = _inputs(4)
    with torch.no_grad():
        before = net(x, c_noise)
        assert frozen.matches(net) and plain.matches(net)
        net.conv_out.bias.add_(1.0)
        after = net(x, c_noise)
        assert not frozen.matches(net)
        assert torch.allclose(frozen(x, c_noise), before, atol=1e-6)  # not the live weights
        assert not frozen.load_weights_from(net)  # frozen weights cannot be replaced
        assert plain.load_weights_from(net) and plain.matches(net)
        assert torch.allclose(plain(x, c_noise), after, atol=1e-6)


def test_compiled_sampling_follows_weight_changes_and_stays_out_of_checkpoints(single_thread):
    module = _module(compile_options=EAGER)
    assert torch.allclose(_sample(module, compile=True), _sample(module), atol=1e-5)
    first = cached_sampling_net(module.net)
    with torch.no_grad():  # e.g. the EMA callback swapping other weights in
        module.net.conv_out.bias.add_(0.5)
    changed = _sample(module, compile=True)
    assert cached_sampling_net(module.net) is first  # the same compile, new weights copied in
    assert torch.allclose(changed, _sample(module), atol=1e-5)
    assert not any("compiled" in key or "snapshot" in key for key in module.state_dict())


def test_frozen_sampling_recompiles_for_new_weights_and_shares_equal_ones(single_thread):
    module = _module(compile_options=EAGER)
    _sample(module, compile=True, freeze_weights=True)  # as evaluate.py does
    first = cached_sampling_net(module.net)
    assert first.freeze_weights
    twin = _module(compile_options=EAGER)  # e.g. the next job of a sweep over one checkpoint
    _sample(twin, compile=True, freeze_weights=True)
    assert cached_sampling_net(twin.net) is first
    with torch.no_grad():
        module.net.conv_out.bias.add_(0.5)
    changed = _sample(module, compile=True, freeze_weights=True)
    assert cached_sampling_net(module.net) is not first
    assert torch.allclose(changed, _sample(module), atol=1e-5)


@pytest.mark.slow  # real inductor compiles: ~20-40 s on 2 CPU cores
@pytest.mark.skipif(not any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++")),
                    reason="inductor on CPU needs a C++ compiler (compile=true is opt-in)")
def test_inductor_compiled_sampling_matches_eager_before_and_after_a_weight_change(single_thread):
    for freeze in (False, True):
        module = _module()
        compiled = {"compile": True, "freeze_weights": freeze}
        assert torch.allclose(_sample(module, **compiled), _sample(module), atol=1e-4)
        with torch.no_grad():
            for param in module.net.parameters():
                param.mul_(0.9)
        # frozen: inductor folded the old weights into its graph, only a new copy is right;
        # plain: the graph reads the copy's parameters, updated in place
        assert torch.allclose(_sample(module, **compiled), _sample(module), atol=1e-4)


@pytest.mark.slow  # > 15 s: runs in .ci/run's slow step
def test_evaluate_samples_at_the_configured_precision(train_config, tmp_path):
    from diffsweep.evaluate import run as evaluate
    from diffsweep.train import run as train

    cfg = train_config("callbacks.sample_grid.at_train_end=false")
    train(cfg)
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    overrides = [f"ckpt_path={ckpt}", "metrics=none", "logger=none", "grid_samples=4",
                 "sampler.num_steps=2", f"results_file={tmp_path / 'results.csv'}"]
    row = evaluate(compose_config("evaluate", [*overrides, "precision=bf16"], tmp_path / "eval"))
    assert row["precision"] == "bf16" and row["compile"] is False
    with pytest.raises(ValueError, match="precision='fp8' is not allowed"):  # before any work
        evaluate(compose_config("evaluate", [*overrides, "precision=fp8"], tmp_path / "bad"))


def _broken_backend(graph_module, example_inputs):
    raise OSError("no C++ compiler found")


def test_a_failing_compile_says_how_to_sample_without_it():
    module = _module(compile_options={"backend": _broken_backend})
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler found.*compile=false"):
        _sample(module, compile=True)
    assert torch.isfinite(_sample(module)).all()  # eager sampling is unaffected


@pytest.mark.slow  # > 15 s: runs in .ci/run's slow step
def test_training_callbacks_sample_with_the_compiled_copy(train_config, monkeypatch):
    """Grids and FID sample inside Lightning's validation (inference mode) with EMA weights."""
    import diffsweep.inference
    from diffsweep.train import run as train

    built = []

    class CountedCompiledNet(CompiledSamplingNet):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(diffsweep.inference, "CompiledSamplingNet", CountedCompiledNet)
    cfg = train_config("module.sample_compile=true", "+module.compile_options.backend=eager",
                       "metrics=fid_tiny", "metrics.fid.evaluator.num_samples=8")
    metrics = train(cfg)
    # one compiled copy for the whole run: each validation's EMA weights are copied into it
    assert len(built) == 1 and not built[0].freeze_weights
    assert all(torch.isfinite(torch.tensor(metrics[key]))
               for key in metrics if key.startswith("fid/"))
    assert (Path(cfg.paths.output_dir) / "samples" / "final.png").is_file()
