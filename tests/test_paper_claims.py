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
