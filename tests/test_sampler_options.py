"""Sampler options: the configs, their validation, and the x0 clipping they switch on.

Clipping against diffusers end to end is in test_samplers_conformance.py; here the pieces: every
``configs/sampler/*.yaml`` builds its Sampler with commented defaults (clipping off), an option a
method does not take is refused when the Sampler is built, bad clipping values are refused with the
key named, and :func:`dynamic_threshold` equals diffusers' ``_threshold_sample``.
"""

from __future__ import annotations

import re

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from diffsweep.samplers import (
    SAMPLERS,
    Sampler,
    X0Clipping,
    dynamic_threshold,
    option_names,
    sample_ddim,
    sample_ddpm,
)
from tests.conftest import CONFIGS

SAMPLER_CONFIGS = sorted((CONFIGS / "sampler").glob("*.yaml"))
CLIPPING_DEFAULTS = {"clip_sample": False, "clip_sample_range": 1.0, "thresholding": False,
                     "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0}


def test_every_registered_sampler_has_a_config():
    assert sorted(path.stem for path in SAMPLER_CONFIGS) == sorted(SAMPLERS)


@pytest.mark.parametrize("path", SAMPLER_CONFIGS, ids=lambda path: path.stem)
def test_sampler_config_builds_and_comments_every_option(path):
    cfg = OmegaConf.load(path)
    sampler = instantiate(cfg)
    assert isinstance(sampler, Sampler) and sampler.method_name == path.stem
    options = {key for key in cfg if key not in ("_target_", "method", "num_steps", "spacing",
                                                  "rho", "steps_offset")}
    assert options == set(option_names(path.stem))  # the yaml exposes every option, no other
    for line in path.read_text().splitlines():
        if re.match(r"^\w+:", line) and not line.startswith(("_target_", "method")):
            assert " # " in line, f"{path.name}: no comment on {line!r}"


@pytest.mark.parametrize("method", ["ddim", "ddpm"])
def test_clipping_options_default_off(method):
    cfg = OmegaConf.load(CONFIGS / "sampler" / f"{method}.yaml")
    assert {key: cfg[key] for key in CLIPPING_DEFAULTS} == CLIPPING_DEFAULTS
    assert not X0Clipping.from_options(instantiate(cfg).options).enabled
    if method == "ddim":
        assert cfg.use_clipped_model_output is False


@pytest.mark.parametrize("method,option", [("euler", "eta"), ("heun", "clip_sample"),
                                           ("euler_ancestral", "thresholding"),
                                           ("ddpm", "use_clipped_model_output"),
                                           ("ddim", "clip_range")])
def test_unknown_option_is_refused_when_built(method, option):
    with pytest.raises(ValueError, match=rf"sampler\.{option} is not an option of the {method} "
                                         rf"sampler; its options are: "):
        Sampler(method, 10, **{option: 1.0})


@pytest.mark.parametrize("options,message", [
    ({"clip_sample_range": 0.0}, r"sampler\.clip_sample_range must be > 0.*got 0\.0"),
    ({"dynamic_thresholding_ratio": 1.5}, r"sampler\.dynamic_thresholding_ratio must be in \(0, 1"),
    ({"dynamic_thresholding_ratio": 0.0}, r"sampler\.dynamic_thresholding_ratio must be in \(0, 1"),
    ({"sample_max_value": -1.0}, r"sampler\.sample_max_value must be > 0"),
    ({"clip_sample_range": "1"}, r"sampler\.clip_sample_range must be > 0.*got '1'"),
    ({"clip_sample": "yes"}, r"sampler\.clip_sample must be true or false, got 'yes'"),
    ({"thresholding": 1}, r"sampler\.thresholding must be true or false, got 1"),
])
@pytest.mark.parametrize("method", ["ddim", "ddpm"])
def test_bad_clipping_options_are_refused_when_built_and_when_called(method, options, message):
    with pytest.raises(ValueError, match=message):
        Sampler(method, 10, **options)
    fn = {"ddim": sample_ddim, "ddpm": sample_ddpm}[method]
    with pytest.raises(ValueError, match=message):
        fn(lambda x, sigma: x, torch.zeros(1, 2), torch.tensor([1.0, 0.0]), **options)


def test_use_clipped_model_output_must_be_a_bool():
    with pytest.raises(ValueError, match=r"sampler\.use_clipped_model_output must be true or"):
        Sampler("ddim", 10, use_clipped_model_output="no")


def test_clip_sample_clamps_to_the_range_and_thresholding_takes_precedence():
    x0 = torch.linspace(-3, 3, 24, dtype=torch.float64).reshape(2, 3, 4)
    clipped = X0Clipping(clip_sample=True, clip_sample_range=2.0)(x0)
    assert torch.equal(clipped, x0.clamp(-2, 2))
    both = X0Clipping(clip_sample=True, clip_sample_range=2.0, thresholding=True,
                      dynamic_thresholding_ratio=0.5, sample_max_value=10.0)
    assert torch.equal(both(x0), dynamic_threshold(x0, 0.5, 10.0))
    assert not torch.equal(both(x0), clipped)
    assert torch.equal(X0Clipping()(x0), x0) and not X0Clipping().enabled


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ratio,max_value", [(0.995, 1.0), (0.9, 2.0), (0.6, 1.5), (1.0, 5.0),
                                             (0.9, 0.5)])
@pytest.mark.parametrize("shape", [(4, 3, 8, 8), (5, 2, 7), (3, 1, 1)])
def test_dynamic_threshold_equals_diffusers(shape, ratio, max_value, dtype):
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=ratio,
                                        sample_max_value=max_value)
    x0 = 2.0 * torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=dtype)
    expected = scheduler._threshold_sample(x0)
    got = dynamic_threshold(x0, ratio, max_value)
    assert got.dtype == dtype and got.shape == x0.shape
    atol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got, expected, rtol=0, atol=atol)


def test_dynamic_threshold_is_per_sample_and_in_unit_range():
    x0 = torch.stack([torch.linspace(-4, 4, 101), torch.linspace(-0.5, 0.5, 101)]).double()
    out = dynamic_threshold(x0, 0.9, 3.0)
    # sample 0: s = 90th percentile of |x| = 3.6 -> clamped to 3: clamp(x, -3, 3) / 3
    torch.testing.assert_close(out[0], x0[0].clamp(-3, 3) / 3)
    # sample 1: all |x| < 1 -> s = 1, unchanged
    assert torch.equal(out[1], x0[1])
    assert float(out.abs().max()) <= 1.0

