"""tools/readme_figures.py rewrites the README's quick-start block from a run's files and the real-data floor."""

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import readme_figures  # noqa: E402


def test_the_quick_start_block_is_rewritten_from_the_run(digits_dir, tmp_path):
    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)
    summary = {"first": {"update": 0, "fd": 700.0, "class_acc": 0.1}, "last": {"update": 3000, "fd": 3.5,
                                                                                "class_acc": 0.998}}
    (run / "eval_summary.json").write_text(json.dumps(summary))
    for name in ("samples/update_0000000.png", "samples/update_0003000.png", "samples/final.png", "eval_curves.png"):
        (run / name).write_bytes(name.encode())
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{readme_figures.BEGIN}\nold table\n{readme_figures.END}\noutro\n")
    (tmp_path / "docs").mkdir()
    readme_figures.main(["--seconds", "157", "--run", str(run), "--data", str(digits_dir), "--readme", str(readme),
                         "--docs", str(tmp_path / "docs")])
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old table" not in text
    assert "| initialization (update 0) | 700.0 | 0.100 |" in text
    assert "| end (update 3,000) | **3.50** (200x lower) | **0.998** |" in text
    assert "took 2 min 37 s (" in text
    floor = readme_figures.figures(run, digits_dir)["floor"]
    assert f"| real validation set vs training set (floor) | {floor['fd']:.2f} | {floor['class_acc']:.3f} |" in text
    assert 0 < floor["fd"] < 10 and floor["class_acc"] > 0.9  # real digits against the training statistics
    assert (tmp_path / "docs" / "digits_wflow_init.png").read_bytes() == b"samples/update_0000000.png"
    assert (tmp_path / "docs" / "digits_wflow_final.png").read_bytes() == b"samples/final.png"
    with pytest.raises(SystemExit, match="no .* block"):
        readme.write_text("no markers\n")
        readme_figures.main(["--seconds", "1", "--run", str(run), "--data", str(digits_dir), "--readme",
                             str(readme), "--docs", str(tmp_path / "docs")])


def test_sweep_table_is_spliced_between_its_markers(tmp_path):
    """tools/sweep_tables.py replaces exactly the block between a table's markers (twice: idempotent) and refuses a
    file without them."""
    import sweep_tables

    begin, end = sweep_tables.markers("t")
    text = f"intro\n{begin}\nold\n{end}\noutro\n"
    once = sweep_tables.splice(text, "t", "| a |\n|---|\n| 1 |\n", "gwf-report x --metric m")
    assert once.startswith("intro\n") and once.endswith("outro\n") and "old" not in once
    assert "| 1 |" in once and "(made by `gwf-report x --metric m`)" in once
    assert sweep_tables.splice(once, "t", "| a |\n|---|\n| 1 |\n", "gwf-report x --metric m") == once
    with pytest.raises(ValueError, match="markers of table 'u'"):
        sweep_tables.splice(text, "u", "| a |", "c")
