"""experiments/vp_vs_ve and experiments/step_count: analyze.py on synthetic results,
experiment configs."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, compose_config

COLUMNS = ["ckpt_path", "step", "train_data", "train_model", "train_scheduler", "sampler",
           "num_steps", "spacing", "nfe", "options", "seed", "grid", "samples_per_s", "fid",
           "fid_extractor", "fid_samples", "fid_seconds", "wall_time_s"]


def _load(study: str):
    path = REPO / "experiments" / study / "analyze.py"
    spec = importlib.util.spec_from_file_location(f"analyze_{study}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _write_results(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _row(schedule, sampler, num_steps, nfe, fid, spacing="karras", seed=0):
    return {"ckpt_path": f"{schedule}.ckpt", "step": 600, "train_data": "digits",
            "train_model": "unet_tiny", "train_scheduler": schedule, "sampler": sampler,
            "num_steps": num_steps, "spacing": spacing, "nfe": nfe, "seed": seed, "fid": fid,
            "fid_extractor": "classifier", "fid_samples": 500}


def _synthetic(path: Path) -> Path:
    rows = []
    for schedule in ("linear", "ve"):
        for steps in (5, 10, 20):
            rows.append(_row(schedule, "euler", steps, steps, 100.0 / steps))
        for steps, nfe in ((3, 5), (5, 9), (10, 19)):
            rows.append(_row(schedule, "heun", steps, nfe, 50.0 / steps))
    rows.append(_row("linear", "ddim", 10, 10, 7.0, spacing="leading"))
    rows += [_row("linear", "euler", 20, 20, fid, seed=s) for s, fid in ((1, 6.0), (2, 4.0))]
    return _write_results(path, rows)


def test_vp_vs_ve_analyze_writes_table_and_png(tmp_path):
    analyze = _load("vp_vs_ve")
    results = _synthetic(tmp_path / "results.csv")
    table = analyze.markdown_table(analyze.load_rows([results]), budgets=[5, 10, 20])
    lines = table.strip().splitlines()
    assert lines[0] == "| schedule | sampler | spacing | NFE 5 | NFE 10 | NFE 20 |"
    # Rows ordered by schedule (linear before ve), then sampler; heun's 9 and 19 go in 10 and 20.
    assert lines[2] == "| linear | ddim | leading | – | 7.00 | – |"
    assert lines[3] == "| linear | euler | karras | 20.00 | 10.00 | 5.00 ± 1.00 (n=3) |"
    assert lines[4] == "| linear | heun | karras | 16.67 | 10.00 (9) | 5.00 (19) |"
    assert lines[5].startswith("| ve | euler | karras | 20.00")
    assert len(lines) == 2 + 5

    analyze.main([str(results), "--budgets", "5,10,20", "--out-dir", str(tmp_path / "out")])
    png = tmp_path / "out" / "fid_vs_nfe.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| linear | heun | karras |" in md and "fid_vs_nfe.png" in md
    assert "NOT comparable" in md


def test_step_count_analyze_keeps_one_schedule_and_the_plain_cells(tmp_path):
    analyze = _load("step_count")
    rows = [_row("linear", "ddim", steps, steps, 40.0 / steps, spacing="leading", seed=seed)
            for steps in (5, 50) for seed in (0, 1, 2)]
    rows = [dict(row, options="eta=0.0", fid=row["fid"] + 0.1 * row["seed"]) for row in rows]
    rows += [dict(_row("linear", "ddim", 10, 10, 99.0, spacing="leading"), options="eta=1.0"),
             _row("ve", "heun", 3, 5, 1.0), _row("linear", "euler", 5, 5, 1.0)]
    results = _write_results(tmp_path / "shared.csv", [dict(r, options=r.get("options", ""))
                                                       for r in rows])
    analyze.main([str(results), "--schedule", "linear", "--out-dir", str(tmp_path)])
    kept = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert len(kept) == 6 and {r["sampler"] for r in kept} == {"ddim"}   # no eta 1, ve, euler
    md = (tmp_path / "results.md").read_text()
    assert "| linear | ddim | leading | 8.10 ± 0.10 (n=3) | 0.90 ± 0.10 (n=3) |" in md
    assert ("| linear | ddim | leading | 5 | 8.10 ± 0.10 (n=3) | 50 | 0.90 ± 0.10 (n=3) | "
            "-7.20 ± 0.00 | falls |") in md
    assert (tmp_path / "fid_vs_nfe.png").stat().st_size > 1000
    with pytest.raises(SystemExit, match="No rows of a 'cosine' model"):
        analyze.main([str(results), "--schedule", "cosine", "--out-dir", str(tmp_path)])


def test_trend_needs_a_gap_beyond_the_seed_noise():
    analyze = _load("vp_vs_ve")
    assert analyze.trend([10.0, 11.0, 9.0], [5.0, 5.5, 4.5]) == "falls"
    assert analyze.trend([10.0, 11.0, 9.0], [9.0, 10.0, 8.0]) == "within noise"
    assert analyze.trend([5.0, 5.2, 4.8], [10.0, 10.2, 9.8]) == "rises"
    # the same cells keyed by noise seed: the seed-shared part of the noise cancels
    first, last = {"0": 10.0, "1": 11.0, "2": 9.0}, {"0": 9.0, "1": 10.1, "2": 7.9}
    assert analyze.trend(list(first.values()), list(last.values())) == "within noise"
    assert analyze.trend(first, last) == "falls"
    assert analyze.paired_delta(first, last)[2] == 3
    assert analyze.paired_delta({"0": 1.0}, last) is None


def test_select_matches_sampler_spacing_and_options_and_rejects_bad_items():
    analyze = _load("vp_vs_ve")
    assert analyze.parse_cells("ddim:leading:eta=0.0, heun:karras") == [
        ("ddim", "leading", "eta=0.0"), ("heun", "karras", None)]
    with pytest.raises(ValueError, match="'ddim' is not sampler:spacing"):
        analyze.parse_cells("ddim")
    rows = [{"sampler": "ddim", "spacing": "leading", "options": "eta=0.0"},
            {"sampler": "ddim", "spacing": "leading", "options": "eta=0.5"},
            {"sampler": "ddim", "spacing": "leading", "options": "eta=0.0;clip_sample=False"},
            {"sampler": "ddim", "spacing": "trailing", "options": "eta=0.0"},
            {"sampler": "heun", "spacing": "karras", "options": "s_churn=0.0"},
            {"sampler": "heun", "spacing": "karras", "options": "", "sigma_rel": "0.1"},
            {"sampler": "heun", "spacing": "karras", "options": "", "weights": "raw"}]
    kept = analyze.select(rows, analyze.parse_cells("ddim:leading:eta=0.0,heun:karras"))
    assert kept == [rows[0], rows[2], rows[4]]


def test_analyze_missing_file_names_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="run.sh"):
        _load("vp_vs_ve").load_rows([tmp_path / "nope.csv"])


@pytest.mark.parametrize("scheduler,target", [("linear", "DiscreteVPSchedule"),
                                              ("cosine", "DiscreteVPSchedule"),
                                              ("ve", "VESchedule")])
def test_vp_vs_ve_config_composes(tmp_path, scheduler, target):
    cfg = compose_config("train", ["experiment=vp_vs_ve", f"scheduler={scheduler}"], tmp_path)
    assert cfg.task_name == "vp_vs_ve" and "vp_vs_ve" in cfg.tags
    assert cfg.scheduler._target_.endswith(target)
    assert cfg.data.resolution == 16 and cfg.model.base_channels == 16
    assert cfg.trainer.accelerator == "cpu" and cfg.trainer.max_steps == 600
    assert not cfg.get("metrics")
    assert "/logs/vp_vs_ve/multiruns/" in cfg.hydra.sweep.dir


def test_step_count_config_composes(tmp_path):
    cfg = compose_config("train", ["experiment=step_count"], tmp_path)
    assert cfg.task_name == "step_count" and cfg.tags == ["step_count", "cpu_budget"]
    assert cfg.scheduler.beta_schedule == "linear" and cfg.trainer.max_steps == 600


def test_eval_sweep_config_composes(tmp_path):
    cfg = compose_config("evaluate", ["experiment=eval_sweep", "ckpt_path=x.ckpt",
                                      "sampler=heun", "sampler.spacing=karras"], tmp_path)
    evaluator = cfg.metrics.fid.evaluator
    assert evaluator.extractor._target_.endswith("ClassifierFeatureExtractor.build")
    assert evaluator.num_samples == 500
    assert cfg.task_name == "eval_sweep" and cfg.grid_samples == 25
    assert cfg.sampler.method == "heun"


def test_every_experiment_config_composes(tmp_path):
    for path in sorted((REPO / "configs" / "experiment").glob("*.yaml")):
        name = "evaluate" if path.stem.startswith("eval") else "train"
        cfg = compose_config(name, [f"experiment={path.stem}", "ckpt_path=x.ckpt"], tmp_path)
        assert cfg.task_name, path


@pytest.mark.slow
def test_four_families_sweep_then_evaluate_sweep_then_fid_vs_nfe_side_by_side(tmp_path):
    """The README's four-family commands at tiny size: train -m over linear, ve, edm, flow (each
    with its own target via prediction_type=auto), evaluate -m over the four checkpoints, and
    the analyze table has a row per family."""
    from tests.conftest import FAST, run_entry_point

    tiny = ["model.base_channels=8", "model.channel_mults=[1,2]", "model.attention_resolutions=[]",
            "data.resolution=8", "trainer.max_steps=2"]
    train = run_entry_point("train.py", "-m", "scheduler=linear,ve,edm,flow", *FAST, *tiny,
                            "hydra.sweep.dir=sweep", cwd=tmp_path, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    checkpoints = sorted(str(p) for p in (tmp_path / "sweep").glob("*/checkpoints/last.ckpt"))
    assert len(checkpoints) == 4
    results = tmp_path / "fid.csv"
    evaluate = run_entry_point("evaluate.py", "-m", f"ckpt_path={','.join(checkpoints)}",
                               "sampler=euler,heun", "sampler.num_steps=2,3", "metrics=fid_tiny",
                               "metrics.fid.evaluator.num_samples=8", "grid_samples=4",
                               f"results_file={results}", "hydra.sweep.dir=eval", cwd=tmp_path,
                               timeout=600)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    analyze = _load("vp_vs_ve")
    analyze.main([str(results), "--budgets", "2,5", "--out-dir", str(tmp_path)])
    table = (tmp_path / "results.md").read_text()
    for family in ("linear", "ve", "edm", "flow"):
        assert f"| {family} | euler" in table and f"| {family} | heun" in table, family
    rows = list(csv.DictReader(open(results)))
    assert {row["train_scheduler"] for row in rows} == {"linear", "ve", "edm", "flow"}
    flow_heun = {row["nfe"] for row in rows if row["train_scheduler"] == "flow"
                 and row["sampler"] == "heun"}
    assert flow_heun == {"2", "4"}   # Heun's Euler step from the flow pole: 2n - 2 evaluations


@pytest.mark.slow
def test_vp_vs_ve_run_sh_quick_mode_trains_four_models_and_tabulates_them(tmp_path):
    """``MODE=digits bash experiments/vp_vs_ve/run.sh`` at tiny size, from another directory:
    four schedules trained, each evaluated with its samplers (DDIM on the VP models only) for
    every noise seed, and the generated table and trend have a row per (schedule, sampler)."""
    import os
    import subprocess

    tiny = ("trainer.max_steps=2 model.base_channels=8 model.channel_mults=[1,2] "
            "model.attention_resolutions=[] data.resolution=8 trainer.val_check_interval=2")
    env = {**os.environ, "MODE": "digits", "SEEDS": "0,1", "NUM_SAMPLES": "8",
           "TRAIN_ARGS": tiny, "EVAL_ARGS": "metrics=fid_tiny grid_samples=4 batch_size=8",
           "WANDB_MODE": "offline"}
    done = subprocess.run(["bash", str(REPO / "experiments" / "vp_vs_ve" / "run.sh")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "logs" / "vp_vs_ve_digits"
    rows = list(csv.DictReader(open(out / "results.csv")))
    per_seed = {"linear": 11, "cosine": 11, "ve": 7, "edm": 7}   # dpmpp 4 + heun 3 (+ ddim 4)
    for schedule, count in per_seed.items():
        mine = [r for r in rows if r["train_scheduler"] == schedule]
        assert len(mine) == 2 * count and {r["seed"] for r in mine} == {"0", "1"}, schedule
    md = (out / "results.md").read_text()
    for schedule in per_seed:
        assert f"| {schedule} | dpmpp_2m | karras |" in md
        assert f"| {schedule} | heun | karras |" in md
    assert "| cosine | ddim | leading |" in md and "| ve | ddim" not in md
    assert "## Does FID fall with NFE?" in md and (out / "fid_vs_nfe.png").is_file()
