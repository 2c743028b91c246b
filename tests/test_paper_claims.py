"""experiments/paper_claims: the claim verdicts, and the SD3 Table 1 pipeline end to end (slow)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from tests.conftest import FASHION, require_race_inputs

REPO = Path(__file__).resolve().parents[1]
CLAIMS = REPO / "experiments" / "paper_claims"


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module


def _rows(fids: dict[str, dict[int, list[float]]]) -> list[dict[str, str]]:
    return [{"formulation": name, "nfe": str(nfe), "fid": str(fid), "samples": "2000",
             "train_steps": "100"}
            for name, cells in fids.items() for nfe, values in cells.items() for fid in values]


def test_a_claim_holds_only_beyond_the_seed_noise():
    analyze = _load(CLAIMS / "analyze.py", "paper_claims_analyze")
    assert analyze.verdict([10.0, 10.2, 9.8], [20.0, 20.5, 19.5]) == "yes"
    assert analyze.verdict([10.0, 11.0, 9.0], [10.5, 11.5, 9.5]) == "within noise"
    assert analyze.verdict([20.0, 20.1], [10.0, 10.1]) == "no"


def test_a_seed_paired_claim_sees_through_the_shared_seed_noise():
    analyze = _load(CLAIMS / "analyze.py", "paper_claims_analyze")
    better, worse = {"0": 3.0, "1": 5.0, "2": 1.0}, {"0": 3.5, "1": 5.6, "2": 1.4}
    assert analyze.verdict(list(better.values()), list(worse.values())) == "within noise"
    assert analyze.paired_verdict(better, worse) == "yes"        # +0.5 ± 0.1 on every seed
    assert analyze.paired_verdict(worse, better) == "no"
    assert analyze.paired_verdict({"0": 3.0, "1": 5.0}, {"0": 3.5, "1": 4.9}) == "within noise"
    assert analyze.paired_verdict({"0": 1.0}, {"1": 9.0}) == "yes"  # no shared seed: unpaired


def test_the_sd3_table_reports_each_rival_and_where_the_lead_is_largest(tmp_path):
    analyze = _load(CLAIMS / "analyze.py", "paper_claims_analyze")
    rows = _rows({"rf/lognorm(0.00, 1.00)": {5: [10, 11, 12], 25: [5, 5.1, 5.2]},
                  "rf/uniform": {5: [30, 31, 32], 25: [6, 6.1, 6.2]},
                  "eps/linear": {5: [60, 61, 62], 25: [4, 4.1, 4.2]}})
    text = "\n".join(analyze.sd3_section(rows))
    assert "| 5 | 11.00 ± 1.00 (n=3) | 31.00 ± 1.00 (n=3) | 61.00 ± 1.00 (n=3) |" in text
    assert "beats eps/linear at 25 steps | ranked first in Table 1 (all step counts) | " \
           "5.10 vs 4.10 | no |" in text
    assert "beats rf/uniform at 5 steps" in text and "| yes |" in text
    assert "+20.00 at 5, -1.00 at 25 | yes |" in text   # lead over the best rival, largest at 5
    missing = "\n".join(analyze.sd3_section(rows[:3]))
    assert "Not run yet: no rows for rf/uniform, eps/linear" in missing


@pytest.mark.slow
def test_sd3_miniature_runs_from_the_race_weights_to_the_claims_table(tmp_path):
    require_race_inputs()
    tiny = ["--real-count", "256", "--classifier-samples", "512", "--base-channels", "8",
            "--data-root", str(FASHION)]
    race = _load(REPO / "experiments" / "benchmarks" / "time_to_quality.py", "time_to_quality")
    race.main(["--minutes", "0.02", "--eval-every", "0.02", "--samples", "16", "--batch", "8",
               "--recipes", "rectified_flow,rf_uniform,ddpm", "--out", str(tmp_path / "race"),
               "--cache-dir", str(tmp_path / "cache"), *tiny])
    sd3 = _load(CLAIMS / "sd3_run.py", "paper_claims_sd3_run")
    results = tmp_path / "sd3_results.csv"
    argv = ["--models", *(str(tmp_path / "race" / name)
                          for name in ("rectified_flow", "rf_uniform", "ddpm")),
            "--nfe", "2,4", "--seeds", "0,1", "--samples", "16", "--threads", "1",
            "--results", str(results), "--cache-dir", str(tmp_path / "cache"), *tiny]
    sd3.main(argv)
    from diffsweep.results import read_rows

    rows = read_rows(results)
    assert len(rows) == 3 * 2 * 2
    assert {row["sampler"] for row in rows if row["formulation"] == "eps/linear"} == {"ddim"}
    assert {row["nfe"] for row in rows} == {"2", "4"}
    before = results.read_bytes()
    sd3.main(argv)                                   # a rerun skips the rows already there
    assert results.read_bytes() == before
    analyze = _load(CLAIMS / "analyze.py", "paper_claims_analyze")
    analyze.main(["--sd3", str(results), "--out-dir", str(tmp_path)])
    text = (tmp_path / "results.md").read_text()
    assert "rf/lognorm(0.00, 1.00) beats rf/uniform at 2 steps" in text
    assert (tmp_path / "sd3_fid_vs_nfe.png").stat().st_size > 1000


def _eval_rows(schedule, sampler, spacing, fids_by_nfe, options=""):
    return [{"train_scheduler": schedule, "sampler": sampler, "spacing": spacing, "nfe": str(nfe),
             "options": options, "fid": str(fid), "seed": str(seed), "fid_samples": "2000"}
            for nfe, fids in fids_by_nfe.items() for seed, fid in enumerate(fids)]


def test_the_fashion_claims_read_their_cells_from_the_shared_results(tmp_path):
    analyze = _load(CLAIMS / "analyze.py", "paper_claims_analyze")
    rows = (_eval_rows("linear", "ddim", "leading", {10: [5, 5.1, 4.9], 20: [3, 3.1, 2.9]},
                       "eta=0.0")
            + _eval_rows("linear", "ddim", "leading", {10: [9, 9.1, 8.9], 20: [2, 2.1, 1.9]},
                         "eta=1.0")
            + _eval_rows("linear", "heun", "karras", {9: [4, 4.1, 3.9], 19: [1, 1.1, 0.9]},
                         "s_churn=0.0")
            + _eval_rows("cosine", "ddim", "leading", {10: [4, 4.1, 3.9]}, "eta=0.0")
            + _eval_rows("linear", "ddim", "trailing", {10: [4.5, 4.6, 4.4]}, "eta=0.0"))
    ddim = "\n".join(analyze.ddim_section(rows))
    assert "| eta 1.0 | 9.00 ± 0.10 (n=3) | 2.00 ± 0.10 (n=3) |\n" in ddim
    assert "| eta 0 beats eta 1.0 at S = 10 | – | 5.00 vs 9.00 (paired Δ +4.00 ± 0.00, n=3) | " \
           "yes |" in ddim
    assert "| eta 0 beats eta 1.0 at S = 20 | eta 1: 18.36 at S = 20 | 3.00 vs 2.00 (paired Δ " \
           "-1.00 ± 0.00, n=3) | no |" in ddim
    assert "| eta 0 beats eta 0.2 at S = 10 | eta 0: 13.36 at S = 10 | not run | – |" in ddim
    assert "S = 50" not in ddim
    edm = "\n".join(analyze.edm_section(rows, ["linear"]))
    assert "Heun-karras at NFE 9 beats Euler-VP at NFE 10 | – | 4.00 vs 5.00 (paired Δ +1.00" in edm
    assert "Euler's FID at NFE 20 (3.00) first reached by Heun at NFE 19: 1.1x fewer | yes |" in edm
    iddpm = "\n".join(analyze.iddpm_section(rows))
    assert "| cosine beats linear at NFE 10 (leading) |" in iddpm
    assert "4.00 vs 5.00 (paired Δ +1.00 ± 0.00, n=3) | yes |" in iddpm
    lin = "\n".join(analyze.lin_section(rows, _eval_rows("linear", "ddim", "trailing",
                                                         {10: [4, 4.1, 3.9]}, "eta=0.0")))
    assert ("linear: trailing beats leading at NFE 10 | qualitative (Sec. 3.3) | "
            "4.50 vs 5.00 (paired Δ +0.50 ± 0.00, n=3) | yes |") in lin
    assert ("(both trailing) at NFE 10 | qualitative (Sec. 3.1, Fig. 3) | "
            "4.00 vs 4.50 (paired Δ +0.50 ± 0.00, n=3) | yes |") in lin
    from diffsweep.results import write_rows

    write_rows(tmp_path / "shared.csv", rows)
    analyze.main(["--sd3", str(tmp_path / "none.csv"), "--results", str(tmp_path / "shared.csv"),
                  "--out-dir", str(tmp_path)])
    kept = (tmp_path / "fmnist_results.csv").read_text()
    assert kept.count("\n") == 1 + len(rows)
    again = tmp_path / "again"
    again.mkdir()
    analyze.main(["--sd3", str(tmp_path / "none.csv"), "--results",
                  str(tmp_path / "fmnist_results.csv"), "--out-dir", str(again)])
    assert (again / "results.md").read_text() == (tmp_path / "results.md").read_text()
