"""experiments/benchmarks/time_to_quality.py: the peers' samplers as diffsweep samplers, the
headline arithmetic, and a smoke run of the whole race at a tiny budget (slow)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from diffsweep.denoiser import Denoiser
from diffsweep.samplers import Sampler
from tests.conftest import FASHION, require_race_inputs

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "benchmarks" / "time_to_quality.py"


def _script():
    spec = importlib.util.spec_from_file_location("time_to_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("time_to_quality", module)
    spec.loader.exec_module(module)
    return module


def test_minutes_to_reach_interpolates_between_evaluations():
    ttq = _script()
    assert ttq.minutes_to_reach([5, 10], [40.0, 20.0], 30.0) == pytest.approx(7.5)
    assert ttq.minutes_to_reach([5, 10], [25.0, 20.0], 30.0) == 5       # already there
    assert ttq.minutes_to_reach([5, 10], [40.0, 35.0], 30.0) is None    # never
    assert ttq.minutes_to_reach([5, 10, 15], [40.0, None, 20.0], 30.0) == pytest.approx(10.0)


def test_lucidrains_ddim_is_our_ddim_trailing_with_clipping():
    """denoising-diffusion-pytorch's 50-step DDIM (its sampler at 50 NFE) = our ddim on the
    trailing grid with clip_sample and use_clipped_model_output, over its sigmoid table and its
    v (our v_prediction at sigma_d = 1)."""
    ddpm = pytest.importorskip("denoising_diffusion_pytorch")
    ttq = _script()
    torch.manual_seed(0)
    unet = ddpm.Unet(dim=8, dim_mults=(1, 2), channels=1)
    diffusion = ddpm.GaussianDiffusion(unet, image_size=8, timesteps=1000, sampling_timesteps=50,
                                       auto_normalize=False).eval()
    schedule = ttq.lucidrains_schedule(diffusion)
    denoiser = Denoiser(ttq.LucidrainsNet(unet), schedule, "v_prediction")

    x_t = torch.randn(2, 1, 8, 8)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        theirs = diffusion.predict_start_from_v(x_t, t, unet(x_t, t))
        sigma = schedule.sigma_tilde(t.double())
        ours = denoiser(x_t * (1 + sigma**2).sqrt().view(-1, 1, 1, 1).float(), sigma)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)

    torch.manual_seed(1)
    noise = torch.randn(2, 1, 8, 8)
    torch.manual_seed(1)
    theirs = diffusion.ddim_sample((2, 1, 8, 8))
    sampler = Sampler("ddim", 50, spacing="trailing", clip_sample=True,
                      use_clipped_model_output=True)
    with torch.no_grad():
        ours = sampler(denoiser, schedule, (2, 1, 8, 8), noise=noise)
    torch.testing.assert_close(ours.float(), theirs, rtol=1e-3, atol=1e-3)


@pytest.mark.slow
def test_the_race_runs_at_a_tiny_budget_and_writes_its_results(tmp_path):
    """Five recipes x ~3 s of training, FID on 16 samples: every curve, the headline, the plot."""
    require_race_inputs()
    ttq = _script()
    results = ttq.main(["--minutes", "0.05", "--eval-every", "0.05", "--samples", "16",
                        "--real-count", "256", "--classifier-samples", "512",
                        "--base-channels", "8", "--batch", "8", "--data-root", str(FASHION),
                        "--out", str(tmp_path)])
    assert set(results["recipes"]) == {"default", "diffusers", "lucidrains", "best",
                                       "rectified_flow"}
    reference = results["recipes"]["default"]["parameters"]
    for name, recipe in results["recipes"].items():
        assert abs(recipe["parameters"] - reference) <= 0.1 * reference, name
        assert recipe["steps"][-1] > 0 and recipe["minutes"][-1] >= 0.05
        final = recipe["fid"]["ddim_50"][-1]
        assert final is not None and final == final and final >= 0
        own = recipe["fid"][recipe["own_sampler"]["name"]][-1]
        assert own is not None
    assert results["recipes"]["diffusers"]["parameters"] == reference   # same layout exactly
    assert results["recipes"]["best"]["own_sampler"]["sampler"] == "heun"
    assert results["recipes"]["rectified_flow"]["own_sampler"]["sampler"] == "euler"
    assert "prediction velocity" in results["recipes"]["rectified_flow"]["notes"]
    assert "prediction v_prediction" in results["recipes"]["default"]["notes"]
    for name in results["recipes"]:                  # final EMA weights for later studies
        saved = torch.load(tmp_path / name / "ema_denoiser.pt", weights_only=False)
        assert saved["recipe"] == name and saved["state_dict"]
    assert results["summary"]["best_peer"] in ("diffusers", "lucidrains")
    assert json.loads((tmp_path / "results.json").read_text())["summary"] == results["summary"]
    assert "Headline" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "fid_vs_minutes.png").stat().st_size > 1000
    # --reuse reports the saved curves without racing again
    again = ttq.main(["--minutes", "0.05", "--eval-every", "0.05", "--samples", "16",
                      "--real-count", "256", "--classifier-samples", "512",
                      "--base-channels", "8", "--batch", "8", "--data-root", str(FASHION),
                      "--out", str(tmp_path), "--recipes", "default,diffusers", "--reuse"])
    for name in ("default", "diffusers"):
        assert again["recipes"][name]["fid"] == results["recipes"][name]["fid"]
        assert again["recipes"][name]["steps"] == results["recipes"][name]["steps"]
