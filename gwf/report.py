"""``gwf-report``: a Hydra sweep (objective x tau x seed) as a table (Markdown, CSV) and figures.

    gwf-report runs/gwf_2d/multirun --metric sinkhorn_div          # -> runs/gwf_2d/multirun/report/
    gwf-report runs/gwf_2d/multirun --sweep latest                 # one `-m` launch -> report/<id>/
    gwf-report --wandb-project me/gwf --wandb-group gwf_2d-sweep   # the same from wandb run summaries

Incomplete or crashed runs are listed, never averaged. Outputs and layout: docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from gwf import console_main
from gwf.config import upgrade_config
from gwf.constants import RUN_ARCHIVE
from gwf.jko import JKOSchedule
from gwf.launch import SWEEP_RECORDS

# [GWF]'s row order; other objectives follow alphabetically
OBJECTIVE_ORDER = ("kl", "kl_centered", "kl_dv", "chi2", "chi2_tight", "js", "mmd", "w1", "mmd_gan", "smmd", "immd",
                   "ckmmd", "wflow", "drifting")
HIGHER_IS_BETTER = frozenset({"hq_rate", "mode_recall", "class_acc", "isc_mean", "precision", "recall"})
DEFAULT_METRICS = ("sinkhorn_div", "fd")  # the first present in eval.csv is the default
ROW_KEYS = frozenset({"method", "jko.tau", "seed"})
NO_JKO = "no JKO"


@dataclass
class Run:
    path: str
    method: str
    tau: float | None
    seed: int
    total_updates: int
    overrides: dict = field(default_factory=dict)
    last_update: int | None = None
    final: dict = field(default_factory=dict)  # the last evaluation row
    curve: list[dict] = field(default_factory=list)  # every evaluation row

    @property
    def complete(self) -> bool:
        return self.last_update is not None and self.last_update >= self.total_updates

    @property
    def status(self) -> str:
        if self.last_update is None:
            return "no eval_summary.json"
        return "complete" if self.complete else f"stopped at update {self.last_update} of {self.total_updates}"


# ---------------------------------------------------------------------------------------------- reading
def total_updates(jko: dict) -> int:
    jko = upgrade_config({"jko": dict(jko)})["jko"]  # runs of older versions too
    return JKOSchedule.from_config(jko).total_updates


def _number(v: str):
    try:
        return float(v)
    except ValueError:
        return v


def read_run(run_dir: Path, root: Path) -> Run:
    cfg = upgrade_config(yaml.safe_load((run_dir / "config.yaml").read_text()))
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    overrides = {}
    excluded = excluded_keys(run_dir)
    if overrides_file.exists():
        for item in yaml.safe_load(overrides_file.read_text()) or []:
            key, _, value = str(item).lstrip("+~").partition("=")
            if key not in excluded:  # keys that do not name the run (threads, devices, ...) do not split rows
                overrides[key] = value
    tau = cfg["jko"].get("tau")
    run = Run(str(run_dir.relative_to(root)), cfg["method"]["name"], None if tau is None else float(tau),
              int(cfg.get("seed", 0)), total_updates(cfg["jko"]), overrides)
    summary = run_dir / "eval_summary.json"
    if summary.exists():
        run.final = json.loads(summary.read_text())["last"]
        run.last_update = int(run.final["update"])
    if (run_dir / "eval.csv").exists():
        with open(run_dir / "eval.csv") as f:
            run.curve = [{k: _number(v) for k, v in r.items()} for r in csv.DictReader(f)]
    return run


def excluded_keys(run_dir: Path) -> set[str]:
    """The override keys Hydra left out of the run's directory name (hydra.job.config.override_dirname.exclude_keys
    of the run's .hydra/hydra.yaml, else of gwf's config): relaunching a point with one of them (threads, devices,
    logger, ...) continues the same run, so they do not make another row."""
    hydra_file = run_dir / ".hydra" / "hydra.yaml"
    try:
        node = yaml.safe_load(hydra_file.read_text())["hydra"]["job"]["config"]["override_dirname"]
        return set(node.get("exclude_keys") or [])
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        pass
    from gwf.config import conf_dir

    raw = yaml.safe_load((Path(conf_dir()) / "config.yaml").read_text())
    return set(raw["hydra"]["job"]["config"]["override_dirname"]["exclude_keys"])


def find_runs(root: Path) -> list[Run]:
    """Every run directory (holding gwf-train's config.yaml, not Hydra's .hydra/config.yaml) under ``root``; earlier
    runs that a fresh start (``ckpt_path=null``) moved into ``<run>/archive/<n>/`` are not counted."""
    dirs = sorted(p.parent for p in root.rglob("config.yaml")
                  if p.parent.name != ".hydra" and SWEEP_RECORDS not in p.relative_to(root).parts
                  and RUN_ARCHIVE not in p.relative_to(root).parts[:-1])
    if not dirs:
        raise FileNotFoundError(f"no run directory (with config.yaml) under {root}; pass the sweep directory, "
                                "e.g. runs/<name>/multirun")
    return [read_run(d, root) for d in dirs]


def sweep_records(root: Path) -> list[str]:
    """The ids of the ``-m`` launches recorded under a sweep directory (gwf.launch.SweepRecord), oldest first."""
    folder = root / SWEEP_RECORDS
    return sorted(p.name for p in folder.iterdir() if (p / "sweep.yaml").exists()) if folder.is_dir() else []


def sweep_runs(root: Path, sweep_id: str) -> tuple[str, set[str]]:
    """(id, the run directories relative to ``root``) of one recorded launch; ``latest`` is the newest."""
    ids = sweep_records(root)
    if not ids:
        raise FileNotFoundError(f"--sweep {sweep_id}: {root} holds no sweep records ({SWEEP_RECORDS}/<id>/, written "
                                "by every `gwf-train -m` launch); drop --sweep to report every run under it")
    if sweep_id == "latest":
        sweep_id = ids[-1]
    if sweep_id not in ids:
        raise ValueError(f"--sweep {sweep_id}: no such launch under {root}; recorded: {', '.join(ids)} (or latest)")
    jobs = root / SWEEP_RECORDS / sweep_id / "jobs"
    names = {Path(p.read_text().strip()).as_posix() for p in jobs.iterdir()} if jobs.is_dir() else set()
    return sweep_id, names


def run_from_wandb(name: str, config: dict, summary: dict) -> Run:
    """A Run from a wandb run's config (flattened "a.b" keys or nested) and summary (the EvalCallback's
    ``final/*`` keys); completeness from final/update vs final/total_updates."""
    def get(key):
        if key in config:
            return config[key]
        node = config
        for part in key.split("."):
            node = node[part]
        return node

    tau = get("jko.tau")
    final = {k.split("/", 1)[1]: v for k, v in summary.items() if k.startswith("final/")}
    last = final.get("update")
    return Run(name, get("method.name"), None if tau in (None, "None") else float(tau), int(get("seed")),
               int(final.get("total_updates", total_updates(get("jko")))), {},
               None if last is None else int(last), final)


def read_wandb(project: str, group: str | None = None) -> list[Run]:
    """Runs of a wandb project (needs network and credentials)."""
    from gwf._compat import require

    wandb = require("wandb", "gwf-report --wandb-project")

    filters = {"group": group} if group else {}
    return [run_from_wandb(r.name, dict(r.config), dict(r.summary)) for r in wandb.Api().runs(project, filters)]


# ---------------------------------------------------------------------------------------------- table
def row_label(run: Run, varying: list[str]) -> str:
    extra = ", ".join(f"{k}={run.overrides[k]}" for k in varying if k in run.overrides)
    return f"{run.method} ({extra})" if extra else run.method


def varying_keys(runs: list[Run]) -> list[str]:
    """Override keys besides method / jko.tau / seed whose values differ across runs."""
    keys = sorted({k for r in runs for k in r.overrides} - ROW_KEYS)
    return [k for k in keys if len({r.overrides.get(k) for r in runs}) > 1]


def row_order(labels) -> list[str]:
    def key(label):
        method = label.split(" (")[0]
        rank = OBJECTIVE_ORDER.index(method) if method in OBJECTIVE_ORDER else len(OBJECTIVE_ORDER)
        return rank, label

    return sorted(set(labels), key=key)


def column_name(tau: float | None) -> str:
    return NO_JKO if tau is None else f"tau={tau:g}"


def labelled(runs: list[Run]) -> list[tuple[str, Run]]:
    """(row label, run) of the complete runs."""
    varying = varying_keys(runs)
    return [(row_label(r, varying), r) for r in runs if r.complete]


def aggregate(runs: list[Run], metric: str) -> dict:
    """{(row label, tau): values over seeds} of the complete runs' final ``metric``."""
    cells: dict = {}
    for label, r in labelled(runs):
        if metric in r.final:
            cells.setdefault((label, r.tau), []).append(float(r.final[metric]))
    return cells


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; 0 for a single value)."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def fmt(v: float) -> str:
    return f"{v:.4g}"


def make_table(runs: list[Run], metric: str) -> tuple[list[str], list[str], dict]:
    """(rows, columns, {(row, column): (mean, std, n)})."""
    cells = aggregate(runs, metric)
    taus = {tau for _, tau in cells}
    columns = ([NO_JKO] if None in taus else []) + [column_name(t) for t in sorted(t for t in taus if t is not None)]
    rows = row_order(label for label, _ in cells)
    table = {(label, column_name(tau)): (*mean_std(v), len(v)) for (label, tau), v in cells.items()}
    return rows, columns, table


def to_markdown(rows, columns, table, metric: str, runs: list[Run]) -> str:
    better = max if metric in HIGHER_IS_BETTER else min
    best = {c: better((table[(r, c)][0] for r in rows if (r, c) in table), default=None) for c in columns}
    counts = [n for (_, _, n) in table.values()]
    usual_n = max(set(counts), key=counts.count) if counts else 0
    lines = [f"Final `{metric}` ({'higher' if metric in HIGHER_IS_BETTER else 'lower'} is better), mean ± std over "
             f"{usual_n} seed(s) per cell; best of each column in bold.", "",
             "| objective | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for r in rows:
        out = []
        for c in columns:
            if (r, c) not in table:
                out.append("–")
                continue
            mean, std, n = table[(r, c)]
            text = f"{fmt(mean)} ± {fmt(std)}" if n > 1 else fmt(mean)
            text += f" (n={n})" if n != usual_n else ""
            out.append(f"**{text}**" if mean == best[c] else text)
        lines.append(f"| {r} | " + " | ".join(out) + " |")
    bad = [run for run in runs if not run.complete]
    if bad:
        lines += ["", "Incomplete or crashed runs (not averaged):", ""]
        lines += [f"- `{run.path}`: {run.method}, {column_name(run.tau)}, seed {run.seed}: {run.status}" for run in bad]
    return "\n".join(lines) + "\n"


def write_csv(rows, columns, table, path: Path) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["objective", "tau", "mean", "std", "n"])
        for r in rows:
            for c in columns:
                if (r, c) in table:
                    mean, std, n = table[(r, c)]
                    w.writerow([r, c, repr(mean), repr(std), n])
    return path


# ---------------------------------------------------------------------------------------------- figures
def mean_curves(runs: list[Run], metric: str) -> dict:
    """{row label: {tau: (updates, mean over seeds, std over seeds)}} over the updates every complete seed
    evaluated (std 0 for one seed)."""
    groups: dict = {}
    for label, r in labelled(runs):
        if r.curve and metric in r.curve[0]:
            groups.setdefault(label, {}).setdefault(r.tau, []).append(
                {int(row["update"]): float(row[metric]) for row in r.curve})
    out: dict = {}
    for label, by_tau in groups.items():
        for tau, curves in by_tau.items():
            updates = sorted(set.intersection(*(set(c) for c in curves)))
            stats = [mean_std([c[u] for c in curves]) for u in updates]
            out.setdefault(label, {})[tau] = (updates, [m for m, _ in stats], [sd for _, sd in stats], len(curves))
    return out


def plot_curves(runs: list[Run], metric: str, path: Path) -> Path | None:
    from gwf.viz import plt, save_figure, wide_range

    curves = mean_curves(runs, metric)
    if not curves:
        return None
    labels = row_order(curves)
    ncols = min(len(labels), 3)  # panels in rows of 3: a 9-objective sweep stays readable
    nrows = math.ceil(len(labels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 3.3 * nrows), squeeze=False)
    for ax in axes.flat[len(labels):]:
        ax.set_visible(False)
    for ax, label in zip(axes.flat, labels):
        taus = sorted(curves[label], key=lambda t: (t is not None, t or 0.0))
        for tau in taus:
            updates, values, stds, seeds = curves[label][tau]
            line, = ax.plot(updates, values, marker="o", ms=3,
                            label=column_name(tau) + (f" ({seeds} seeds)" if seeds > 1 else ""))
            if seeds > 1:  # mean +- one std over the seeds
                lo, hi = np.subtract(values, stds), np.add(values, stds)
                ax.fill_between(updates, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
        if wide_range([v for t in taus for v in curves[label][t][1]]):
            ax.set_yscale("log")
        ax.set_title(label)
        ax.set_xlabel("update")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for row in axes:
        row[0].set_ylabel(metric)
    return save_figure(fig, path)


def text_color(rgba) -> str:
    """Black on light cells, white on dark ones (relative luminance of the cell's colour, WCAG weights)."""
    r, g, b = rgba[:3]
    return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.45 else "white"


def plot_heatmap(rows, columns, table, metric: str, path: Path) -> Path | None:
    from gwf.viz import plt, save_figure, wide_range

    if not rows:
        return None
    grid = np.array([[table[(r, c)][0] if (r, c) in table else np.nan for c in columns] for r in rows])
    # room for the row labels (about 0.08 in a character at the tick font's size): rows named by several overrides
    # ("wflow (method.eps_rel=0.002, optim.lr=0.0002)") did not fit beside a one-column map
    label_width = 0.08 * max(len(str(r)) for r in rows)
    fig, ax = plt.subplots(figsize=(1.6 * len(columns) + 2.4 + max(label_width, 0.9), 0.55 * len(rows) + 1.6),
                           layout="constrained")  # lays out the colorbar and its label too
    finite = grid[np.isfinite(grid)]
    log = finite.size and wide_range(finite)
    shown = np.log10(grid) if log else grid
    im = ax.imshow(shown, cmap="viridis_r" if metric not in HIGHER_IS_BETTER else "viridis", aspect="auto")
    for i in range(len(rows)):
        for j in range(len(columns)):
            if math.isfinite(grid[i, j]):
                ax.text(j, i, fmt(grid[i, j]), ha="center", va="center", fontsize=8,
                        color=text_color(im.cmap(im.norm(shown[i, j]))))
    ax.set_xticks(range(len(columns)), columns)
    ax.set_yticks(range(len(rows)), rows)
    fig.colorbar(im, ax=ax, label=f"log10 {metric}" if log else metric)
    ax.set_title(f"final {metric}, mean over seeds")
    return save_figure(fig, path, tight=False)


# ---------------------------------------------------------------------------------------------- entry point
def choose_metric(runs: list[Run], metric: str | None) -> str:
    available = {k for r in runs for k in r.final} - {"update", "total_updates"}
    if metric is None:
        metric = next((m for m in DEFAULT_METRICS if m in available), None)
    if metric is None or metric not in available:
        raise ValueError(f"metric {metric!r} not in the runs' evaluations; available: {sorted(available)}")
    return metric


def report(runs: list[Run], out: Path, metric: str | None = None) -> dict:
    """Write the table (Markdown, CSV) and the figures; returns {"metric", "markdown", "files", "runs"}."""
    metric = choose_metric(runs, metric)
    out.mkdir(parents=True, exist_ok=True)
    rows, columns, table = make_table(runs, metric)
    markdown = to_markdown(rows, columns, table, metric, runs)
    files = [out / f"table_{metric}.md", write_csv(rows, columns, table, out / f"table_{metric}.csv")]
    files[0].write_text(markdown)
    files += [p for p in (plot_curves(runs, metric, out / f"curves_{metric}.png"),
                          plot_heatmap(rows, columns, table, metric, out / f"heatmap_{metric}.png")) if p]
    return {"metric": metric, "markdown": markdown, "files": files, "runs": runs}


def run(argv=None) -> dict:
    """The command with its result returned (tests, scripts); ``main`` is the console entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_dir", nargs="?", help="Hydra multirun directory, e.g. runs/<name>/multirun")
    p.add_argument("--metric", help="evaluation metric (default: sinkhorn_div, else fd)")
    p.add_argument("--out", help="output directory (default: <sweep_dir>/report)")
    p.add_argument("--sweep", help="only the runs of one `-m` launch: its id (<sweep_dir>/sweeps/<id>) or latest; "
                   "default: every run under the sweep directory")
    p.add_argument("--wandb-project", help="read runs from this wandb project (entity/project) instead")
    p.add_argument("--wandb-group", help="only this group of the wandb project (e.g. the experiment name)")
    args = p.parse_args(argv)
    if args.wandb_project:
        runs = read_wandb(args.wandb_project, args.wandb_group)
    elif args.sweep_dir:
        runs = find_runs(Path(args.sweep_dir))
    else:
        p.error("give a sweep directory or --wandb-project")
    out = Path(args.out) if args.out else Path(args.sweep_dir or ".") / "report"
    if args.sweep:
        if not args.sweep_dir:
            p.error("--sweep selects a launch within a sweep directory; give the directory")
        sweep_id, names = sweep_runs(Path(args.sweep_dir), args.sweep)
        runs = [r for r in runs if Path(r.path).as_posix() in names]
        if not runs:
            raise FileNotFoundError(f"--sweep {sweep_id}: none of its jobs has a run directory yet")
        out = Path(args.out) if args.out else out / sweep_id
    result = report(runs, out, args.metric)
    print(result["markdown"])
    launches = sweep_records(Path(args.sweep_dir)) if args.sweep_dir and not args.sweep else []
    if len(launches) > 1:
        print(f"{len(launches)} launches share this directory ({', '.join(launches)}); --sweep <id> reports one")
    print("wrote " + ", ".join(str(f) for f in result["files"]))
    return result


main = console_main(run)


if __name__ == "__main__":
    main()
