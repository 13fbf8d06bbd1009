"""gwf-report on a synthetic Hydra multirun directory (one crashed run, one without a summary) against a table
computed by hand."""

import csv
import json
import math

import pytest
import yaml

import gwf  # noqa: F401
from gwf.report import run as main, run_from_wandb

TOTAL = 60 + (2 - 1) * 40  # jko.updates_first_step + (steps - 1) * updates_per_step


def _write_run(root, method, tau, seed, final, last_update=TOTAL, summary=True, extra=()):
    overrides = [f"method={method}", f"jko.tau={'null' if tau is None else tau}", f"seed={seed}", *extra]
    run = root / ",".join(overrides)
    (run / ".hydra").mkdir(parents=True, exist_ok=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    cfg = {"name": "toy", "seed": seed, "method": {"name": method},
           "jko": {"tau": tau, "steps": 2, "updates_first_step": 60, "updates_per_step": 40}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))  # Hydra's own copy: must not count twice
    rows = [{"update": u, "sinkhorn_div": final * (1 + (last_update - u) / 10), "hq_rate": 0.5}
            for u in range(0, last_update + 1, 50)]
    with open(run / "eval.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    if summary:
        (run / "eval_summary.json").write_text(json.dumps({"first": rows[0], "last": rows[-1]}))


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "multirun"
    finals = {("kl", None): [1.0, 3.0], ("kl", 0.01): [0.5, 0.7], ("kl", 1.0): [0.2, 0.4],
              ("mmd", None): [4.0, 6.0], ("mmd", 0.01): [0.1, 0.3], ("mmd", 1.0): [0.25]}
    for (method, tau), values in finals.items():
        for seed, v in enumerate(values):
            _write_run(root, method, tau, seed, v)
    _write_run(root, "kl", 1.0, 2, 9.0, last_update=50)  # crashed half-way: its 9.0 must not be averaged
    _write_run(root, "mmd", None, 2, 100.0, summary=False)  # died before its first summary
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def test_report_table_matches_hand_computation(sweep, tmp_path):
    result = main([str(sweep), "--metric", "sinkhorn_div", "--out", str(tmp_path / "report")])
    s2 = math.sqrt(2)  # sample std of {a, a + 2}
    s = math.sqrt(0.02)  # sample std of {a, a + 0.2}
    expected = [
        "| objective | no JKO | tau=0.01 | tau=1 |",
        "|---|---:|---:|---:|",
        f"| kl | **2 ± {s2:.4g}** | 0.6 ± {s:.4g} | 0.3 ± {s:.4g} |",
        f"| mmd | 5 ± {s2:.4g} | **0.2 ± {s:.4g}** | **0.25 (n=1)** |",
    ]
    lines = result["markdown"].splitlines()
    start = lines.index(expected[0])
    assert lines[start: start + 4] == expected
    assert "2 seed(s) per cell" in lines[0]
    crashed = [line for line in lines if line.startswith("- ")]
    assert len(crashed) == 2
    assert any("seed=2" in line and "stopped at update 50 of 100" in line for line in crashed)
    assert any("mmd" in line and "no eval_summary.json" in line for line in crashed)

    with open(tmp_path / "report" / "table_sinkhorn_div.csv") as f:
        rows = {(r["objective"], r["tau"]): r for r in csv.DictReader(f)}
    assert len(rows) == 6
    kl1 = rows[("kl", "tau=1")]
    assert float(kl1["mean"]) == pytest.approx(0.3) and float(kl1["std"]) == pytest.approx(s) and kl1["n"] == "2"
    assert float(rows[("mmd", "no JKO")]["mean"]) == pytest.approx(5.0)  # the summary-less 100.0 is left out
    for name in ("curves_sinkhorn_div.png", "heatmap_sinkhorn_div.png", "table_sinkhorn_div.md"):
        assert (tmp_path / "report" / name).stat().st_size > 1000 or name.endswith(".md")


def test_default_metric_and_higher_is_better(sweep, tmp_path):
    assert main([str(sweep), "--out", str(tmp_path / "r1")])["metric"] == "sinkhorn_div"
    md = main([str(sweep), "--metric", "hq_rate", "--out", str(tmp_path / "r2")])["markdown"]
    assert "higher is better" in md and "| kl | **0.5 ± 0** |" in md


def test_varying_extra_override_splits_rows(tmp_path):
    root = tmp_path / "multirun"
    for rev, v in (("false", 1.0), ("true", 3.0)):
        _write_run(root, "kl", None, 0, v, extra=[f"method.reverse={rev}"])
    md = main([str(root), "--out", str(tmp_path / "r")])["markdown"]
    assert "| kl (method.reverse=false) | **1** |" in md and "| kl (method.reverse=true) | 3 |" in md


def test_unknown_metric_and_empty_directory_are_clear(sweep, tmp_path):
    with pytest.raises(ValueError, match="available: .*sinkhorn_div"):
        main([str(sweep), "--metric", "fid"])
    with pytest.raises(FileNotFoundError, match="no run directory"):
        main([str(tmp_path / "empty_dir_that_is_missing")])


def test_run_from_wandb_summary():
    run = run_from_wandb("r", {"method.name": "kl", "jko.tau": 1.0, "seed": 3,
                               "jko": {"steps": 2, "inner_first": 60, "inner": 40}},
                         {"final/update": 100, "final/total_updates": 100, "final/sinkhorn_div": 0.1})
    assert (run.method, run.tau, run.seed, run.complete, run.final["sinkhorn_div"]) == ("kl", 1.0, 3, True, 0.1)
    nested = run_from_wandb("r", {"method": {"name": "mmd"}, "jko": {"tau": None, "steps": 1, "inner_first": 10,
                                                                     "inner": 10}, "seed": 0}, {"final/update": 5})
    assert nested.tau is None and not nested.complete and nested.total_updates == 10


def test_a_point_relaunched_with_an_excluded_key_stays_one_row(tmp_path):
    """kl_dv relaunched with threads=1 (a key Hydra keeps out of run names) used to make a row "kl_dv (threads=1)"."""
    root = tmp_path / "multirun"
    _write_run(root, "kl", None, 0, 1.0)
    _write_run(root, "kl", None, 1, 3.0, extra=["threads=1", "trainer.devices=2"])
    md = main([str(root), "--out", str(tmp_path / "r")])["markdown"]
    assert "| kl | **2 ± 1.414** |" in md and "threads" not in md
    # the run's own Hydra record of the excluded keys wins over gwf's config
    from gwf.report import excluded_keys

    run = next(root.iterdir())
    assert "threads" in excluded_keys(run) and "seed" not in excluded_keys(run)
    (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(
        {"hydra": {"job": {"config": {"override_dirname": {"exclude_keys": ["seed"]}}}}}))
    assert excluded_keys(run) == {"seed"}


def test_curves_have_seed_bands_and_the_heat_map_text_is_readable(sweep):
    from gwf.report import find_runs, mean_curves, text_color

    curves = mean_curves(find_runs(sweep), "sinkhorn_div")
    updates, means, stds, seeds = curves["kl"][0.01]  # seeds 0 and 1: finals 0.5 and 0.7
    assert seeds == 2 and updates[-1] == TOTAL
    assert means[-1] == pytest.approx(0.6) and stds[-1] == pytest.approx(math.sqrt(0.02))
    assert curves["mmd"][1.0][2] == [0.0] * len(curves["mmd"][1.0][0])  # one seed: no band
    assert text_color((0.99, 0.91, 0.14, 1.0)) == "black"  # viridis' light yellow end
    assert text_color((0.27, 0.00, 0.33, 1.0)) == "white"  # its dark purple end


def test_two_launches_sharing_a_name_report_one_at_a_time(tmp_path):
    """Two real `gwf-train -m` launches of one experiment write into one sweep directory (a relaunch continues its
    points) and Hydra's multirun.yaml keeps only the last; each launch's record (gwf.launch.SweepRecord) lets
    gwf-report show one launch."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    runs = tmp_path / "runs"
    common = ["experiment=gwf_2d", "jko.steps=1", "jko.updates_first_step=4", "batch.gen_per_label=32",
              "batch.pos_per_label=32", "batch.bank_capacity=64", "data.batch_size=32", "eval.num_samples=100",
              "eval.every_n_updates=4", "logger=none", "trainer.enable_progress_bar=false", "threads=1",
              f"paths.root={runs}"]
    env = {k: v for k, v in os.environ.items() if k not in ("GWF_SWEEP_ID", "GWF_SWEEP_JOB")}
    launches = (["method=kl", "seed=0,1"], ["method=kl,mmd", "seed=0"])  # the 2nd relaunches kl seed 0
    for sweep in launches:
        res = subprocess.run([sys.executable, "-m", "gwf.train", "-m", *sweep, *common], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=400)
        assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    root = runs / "gwf_2d" / "multirun"
    first, second = sorted(p.name for p in (root / "sweeps").iterdir())
    assert yaml.safe_load((root / "sweeps" / first / "sweep.yaml").read_text())["overrides"][:2] == launches[0]
    assert "seed=0,1" in (root / "sweeps" / first / "multirun.yaml").read_text()

    def seeds(result):
        return {(r.method, r.seed) for r in result["runs"]}

    everything = main([str(root), "--out", str(tmp_path / "all")])
    assert seeds(everything) == {("kl", 0), ("kl", 1), ("mmd", 0)}
    latest = main([str(root), "--sweep", "latest"])
    assert seeds(latest) == {("kl", 0), ("mmd", 0)}
    assert Path(latest["files"][0]).parent == root / "report" / second
    assert seeds(main([str(root), "--sweep", first, "--out", str(tmp_path / "one")])) == {("kl", 0), ("kl", 1)}
    with pytest.raises(ValueError, match=f"--sweep nope: no such launch .*recorded: {first}, {second}"):
        main([str(root), "--sweep", "nope"])


def test_an_earlier_run_archived_by_a_fresh_start_is_not_counted(tmp_path):
    """ckpt_path=null moves a point's earlier run into <run>/archive/<n>/ (gwf.checkpointing.archive_previous_run):
    the report counts the new run only, and an archive passed as the root is read as a run."""
    from gwf.checkpointing import archive_previous_run

    root = tmp_path / "multirun"
    _write_run(root, "kl", None, 0, 5.0)
    run = next(root.iterdir())
    archived = archive_previous_run(run)
    assert archived == run / "archive" / "1" and (archived / "eval.csv").exists()
    _write_run(root, "kl", None, 0, 1.0)  # the fresh run in the same directory
    md = main([str(root), "--out", str(tmp_path / "r")])["markdown"]
    assert "| kl | **1 (n=1)** |" in md or "| kl | **1** |" in md, md
    assert "5" not in md.split("| kl |")[1].split("\n")[0]


def test_long_row_labels_fit_the_heat_map_without_a_layout_warning(tmp_path):
    """Rows named by several overrides (a W-Flow eps_rel x lr sweep) get a figure wide enough for their labels:
    matplotlib's "Tight layout not applied" warning, which gwf-report printed for such sweeps, does not come."""
    import warnings

    root = tmp_path / "multirun"
    for i, eps in enumerate(("0.002", "0.005", "0.05")):
        for j, lr in enumerate(("0.0002", "0.001", "0.003")):
            _write_run(root, "wflow", 1.0, 0, 0.5 + 0.01 * (3 * i + j),
                       extra=[f"method.eps_rel={eps}", f"optim.lr={lr}"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = main([str(root), "--out", str(tmp_path / "r"), "--metric", "hq_rate"])
    assert "| wflow (method.eps_rel=0.002, optim.lr=0.0002) |" in result["markdown"]
    assert (tmp_path / "r" / "heatmap_hq_rate.png").is_file()
