"""gwf-bench-velocity runs its engines' rows (own, own-logdomain, a baseline git revision) and its floor adds up."""

import gwf  # noqa: F401  (first: torchvision workaround)
import gwf.ot

import json
import subprocess
from pathlib import Path

import pytest

from gwf.bench import velocity

ROOT = Path(__file__).resolve().parents[1]


def test_floor_counts_the_sweeps_of_each_form():
    t = {}
    for g in ("pos", "neg"):
        t.update({f"cost/{g}": 1.0, f"proj/{g}": 2.0, f"lse_whole/{g}": 0.5, f"lse_chunked/{g}": 0.3,
                  f"lse_in_place/{g}": 0.4, f"gemv/{g}": 0.1})
    # per term: cost + proj + iterations x (2 of the fastest log-sum-exp | 1 of them and a matrix-vector product)
    assert velocity.floor_from(t, ("pos", "neg"), 10) == pytest.approx(2 * (3.0 + 10 * 0.6))
    assert velocity.floor_from(t, ("pos", "neg"), 10, row_frame=True) == pytest.approx(2 * (3.0 + 10 * 0.4))


def test_rows_of_the_own_engine_forms_and_a_baseline_revision(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(gwf.ot, "ENGINES", dict(gwf.ot.ENGINES))  # the baseline row registers an engine
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if git.returncode != 0:
        pytest.skip("not a git checkout: --baseline reads an earlier revision's engine with git")
    out = tmp_path / "rows.json"
    velocity.main(["--sizes", "64", "--dims", "3", "--engines", "own", "own-logdomain", "--repeats", "1",
                   "--skip-memory", "--threads", "1", "--baseline", "HEAD", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["engine"] for r in rows] == ["own", "own-logdomain", "own@HEAD"]
    assert all(r["seconds"] > 0 and r["floor"] > 0 and r["iters"] == 10 for r in rows)
    assert "own@HEAD: the own engine of git revision HEAD" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="cannot read gwf/ot/sinkhorn.py"):
        velocity.baseline_engine("no-such-revision")
