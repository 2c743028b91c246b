"""Results tables (diffsweep.results): only our own CSV files are ever rewritten.

A symlink, a file that is not a CSV, or another program's CSV named as the results file is
refused with one line naming ``results_file``, the path and what is allowed, and is left
byte for byte as it was; our own tables are appended to as before.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from diffsweep import results
from diffsweep.results import EVAL_ROW_KEY, ResultsFileError, results_file_problem

ROW = {"ckpt_path": "runs/a/last.ckpt", "sampler": "ddim", "num_steps": 5, "seed": 0, "fid": 1.0}
REPO = Path(__file__).resolve().parents[1]


def _one_line(message: str) -> None:
    assert "\n" not in message and message.startswith("results_file=")


def test_a_symlink_is_refused_and_its_target_unchanged(tmp_path):
    target = tmp_path / "precious.csv"
    results.append_row(target, ROW, key=EVAL_ROW_KEY)  # even a table of ours behind the link
    before = target.read_bytes()
    link = tmp_path / "results.csv"
    link.symlink_to(target)
    problem = results_file_problem(link)
    assert problem is not None and "is a symlink" in problem and str(link) in problem
    _one_line(problem)
    with pytest.raises(ResultsFileError, match="is a symlink") as caught:
        results.append_row(link, {**ROW, "seed": 1}, key=EVAL_ROW_KEY)
    _one_line(str(caught.value))
    with pytest.raises(ResultsFileError, match="is a symlink"):
        results.write_rows(link, [ROW])
    assert target.read_bytes() == before and link.is_symlink()


def test_a_symlinked_lock_file_is_refused_and_never_opened(tmp_path):
    outside = tmp_path / "outside" / "file"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.csv.lock").symlink_to(outside)  # dangling: open("a") creates it
    with pytest.raises(ResultsFileError, match="lock file .* is a symlink"):
        results.append_row(tmp_path / "run" / "results.csv", ROW, key=EVAL_ROW_KEY)
    assert not outside.exists() and not (tmp_path / "run" / "results.csv").exists()


@pytest.mark.parametrize("name, content, words", [
    ("train.py", b"import os\nprint(1, 2)\nrows = [1, 2, 3]\n", "not a CSV results table"),
    ("weights.bin", bytes(range(256)) * 4, "not a CSV file"),
    ("notes.csv", b"a,b\n1,2\n\x00\x00\n", "NUL"),
    ("metrics.csv", b"epoch,step,train/loss\n0,1,0.5\n0,2,0.4\n", "not a results table of ours"),
    ("README", b"no commas in here\njust text\n", "not a results table of ours"),
], ids=["script", "binary", "nul", "lightning-metrics", "text"])
def test_a_foreign_file_is_refused_and_left_unchanged(tmp_path, name, content, words):
    path = tmp_path / name
    path.write_bytes(content)
    problem = results_file_problem(path)
    assert problem is not None and words in problem and str(path) in problem
    _one_line(problem)
    assert "pass results_file=<a new file, or a results CSV diffsweep wrote" in problem
    with pytest.raises(ResultsFileError, match=words):
        results.append_row(path, ROW, key=EVAL_ROW_KEY)
    assert path.read_bytes() == content
    assert not list(tmp_path.glob(".*.partial"))


def test_our_own_tables_are_appended_to(tmp_path):
    path = tmp_path / "results.csv"
    assert results_file_problem(path) is None  # new
    path.touch()
    assert results_file_problem(path) is None  # empty: nothing to lose
    assert results.append_row(path, ROW, key=EVAL_ROW_KEY)
    assert results_file_problem(path) is None
    # a later row may bring key columns the header does not have yet (metrics on, a pretrained
    # model): a share of the key is enough
    results.append_row(path, {**ROW, "fid_extractor": "tiny", "fid_samples": 10, "step": 3},
                       key=EVAL_ROW_KEY)
    results.append_row(path, {"pretrained": "/models/x", "sampler": "heun", "num_steps": 5,
                              "seed": 0}, key=EVAL_ROW_KEY)
    assert [row["sampler"] for row in results.read_rows(path)] == ["ddim", "ddim", "heun"]


def test_a_table_holding_only_one_generic_key_column_is_not_ours(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("step,loss\n1,0.5\n")
    assert "shares 1 of the key columns" in results_file_problem(path)
    assert results_file_problem(path, key=("step",)) is None  # a one-column key: one is enough
    assert results_file_problem(path, key=None) is None  # a plain CSV for an unkeyed write


def test_unkeyed_writes_replace_their_own_csv_but_no_foreign_file(tmp_path):
    """The study analyze.py scripts rewrite their own results.csv (any columns) with write_rows."""
    table = tmp_path / "results.csv"
    results.write_rows(table, [{"model": "vp", "fid": 3.0}])
    results.write_rows(table, [{"schedule": "ve", "nfe": 5}])  # other columns: still ours
    assert results.read_rows(table) == [{"schedule": "ve", "nfe": "5"}]
    script = tmp_path / "analyze.py"
    script.write_text("import csv, sys\nprint(sys.argv)\n")
    with pytest.raises(ResultsFileError, match="not a CSV results table"):
        results.write_rows(script, [{"a": 1}])
    assert script.read_text() == "import csv, sys\nprint(sys.argv)\n"


def test_the_committed_study_tables_pass_the_rule():
    tables = sorted((REPO / "experiments").rglob("*.csv"))
    assert tables
    for table in tables:
        assert results_file_problem(table, key=None) is None, table

