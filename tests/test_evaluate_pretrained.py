"""``evaluate.py pretrained=<diffusers folder>``: samplers, FID and results rows for a model that
diffsweep did not train (a tiny random pipeline saved in the test)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from diffsweep.callbacks.samples import save_grid
from diffsweep.diffusers_bridge import load_pretrained
from diffsweep.evaluate import run as evaluate
from diffsweep.generate import generate
from diffsweep.samplers import Sampler
from tests.conftest import compose_config, run_entry_point

diffusers = pytest.importorskip("diffusers")
from tests.test_diffusers_bridge import SMALL_NOISE, save_pipeline, tiny_unet  # noqa: E402

NO_FID = ["data=digits", "data.resolution=8", "grid_samples=4", "logger=none"]
TINY_EVAL = [*NO_FID, "metrics=fid_tiny", "metrics.fid.evaluator.num_samples=8",
             "metrics.fid.evaluator.real_max_count=64"]


@pytest.fixture
def pipeline_folder(tmp_path):
    scheduler = diffusers.DDIMScheduler(**SMALL_NOISE, clip_sample=False)
    return save_pipeline(diffusers.DDIMPipeline(tiny_unet(), scheduler), tmp_path / "pipe")


@pytest.mark.slow  # > 15 s: runs in .ci/run's slow step
def test_readme_sweep_over_a_pretrained_pipeline_writes_one_row_per_job(pipeline_folder, tmp_path):
    result = run_entry_point("evaluate.py", f"pretrained={pipeline_folder}", *TINY_EVAL, "-m",
                             "sampler=ddim,dpmpp_2m", "sampler.num_steps=2",
                             f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "sweep" / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(row["sampler"] for row in rows) == ["ddim", "dpmpp_2m"]
    for row in rows:
        assert row["pretrained"] == str(pipeline_folder.resolve())
        assert row["train_model"] == "pretrained" and row["train_scheduler"] == "DDIMScheduler"
        assert float(row["fid"]) > 0 and row["fid_extractor"] == "tiny"


@pytest.mark.slow  # > 5 s: runs in .ci/run's slow step
def test_pretrained_evaluation_samples_what_the_bridge_samples(pipeline_folder, tmp_path):
    cfg = compose_config("evaluate", [f"pretrained={pipeline_folder}", *NO_FID,
                                      "metrics=none", "sampler.num_steps=3", "seed=5",
                                      f"results_file={tmp_path / 'results.csv'}"], tmp_path / "e")
    row = evaluate(cfg)
    assert row["nfe"] == 3 and row["spacing"] == "leading"
    model = load_pretrained(pipeline_folder)
    expected = generate(model.denoiser, model.adapt_sampler(Sampler("ddim", 3)), 4,
                        model.image_shape, generator=torch.Generator().manual_seed(5))
    reference = save_grid(expected.clamp(-1, 1), tmp_path / "expected.png")
    written = np.asarray(Image.open(tmp_path / "e" / "samples_ddim_3.png"))
    assert np.array_equal(written, np.asarray(Image.open(reference)))


def test_exactly_one_model_source_is_required(pipeline_folder, tmp_path):
    neither = compose_config("evaluate", ["metrics=none", "logger=none"], tmp_path / "a")
    with pytest.raises(ValueError, match="exactly one of ckpt_path=.* or pretrained="):
        evaluate(neither)
    both = compose_config("evaluate", [f"pretrained={pipeline_folder}", "ckpt_path=x.ckpt",
                                       "metrics=none", "logger=none"], tmp_path / "b")
    with pytest.raises(ValueError, match="exactly one"):
        evaluate(both)
    no_data = compose_config("evaluate", [f"pretrained={pipeline_folder}", "metrics=fid_tiny",
                                          "logger=none"], tmp_path / "c")
    with pytest.raises(ValueError, match="needs data=<dataset>"):
        evaluate(no_data)
