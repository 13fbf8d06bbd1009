"""Writes the README's quick-start figures from a real run, so they cannot go stale: the table (FD and class accuracy
at initialization and at the end, and the real-data floor), the wall time of the first command, and the pictures
(docs/digits_wflow_{init,final,curves}.png).

    SECONDS=0; <the README's first command>; python tools/readme_figures.py --seconds $SECONDS

run from the repository root after the first command (it reads runs/digits_wflow/default and data/digits).
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import shutil
from pathlib import Path

BEGIN, END = "<!-- quickstart-figures:begin (tools/readme_figures.py) -->", "<!-- quickstart-figures:end -->"


def figures(run: Path, data: Path) -> dict:
    import gwf  # noqa: F401  (torchvision workaround before anything else)
    from gwf.data.digits import load_digits_split
    from gwf.eval.digits import DigitsEvaluator

    summary = json.loads((run / "eval_summary.json").read_text())
    evaluator = DigitsEvaluator(data)
    x_val, y_val = load_digits_split(data, "val")
    floor = evaluator.evaluate(x_val, y_val)
    return {"first": summary["first"], "last": summary["last"], "floor": floor}


def block(f: dict, seconds: float, day: str) -> str:
    first, last, floor = f["first"], f["last"], f["floor"]
    minutes, rest = divmod(round(seconds), 60)
    return "\n".join([
        BEGIN,
        "| | FD (classifier features) | class accuracy |",
        "|---|---:|---:|",
        f"| initialization (update {first['update']:,}) | {first['fd']:.1f} | {first['class_acc']:.3f} |",
        f"| end (update {last['update']:,}) | **{last['fd']:.2f}** ({first['fd'] / last['fd']:.0f}x lower) | "
        f"**{last['class_acc']:.3f}** |",
        f"| real validation set vs training set (floor) | {floor['fd']:.2f} | {floor['class_acc']:.3f} |",
        "",
        "Followed literally in a fresh clone of this release, the whole first command (venv + install + data "
        f"preparation + training) took {minutes} min {rest} s ({day}).",
        END,
    ])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, required=True, help="wall time of the README's first command")
    p.add_argument("--run", default="runs/digits_wflow/default")
    p.add_argument("--data", default="data/digits")
    p.add_argument("--readme", default="README.md")
    p.add_argument("--docs", default="docs", help="where the pictures go")
    args = p.parse_args(argv)
    run, readme = Path(args.run), Path(args.readme)
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{readme} has no {BEGIN} ... {END} block to rewrite")
    new = block(figures(run, Path(args.data)), args.seconds, datetime.date.today().isoformat())
    text = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _: new, text, flags=re.S)
    readme.write_text(text)
    samples = sorted((run / "samples").glob("update_*.png"))
    for source, name in ((samples[0], "digits_wflow_init.png"), (run / "samples" / "final.png", "digits_wflow_final.png"),
                         (run / "eval_curves.png", "digits_wflow_curves.png")):
        shutil.copyfile(source, Path(args.docs) / name)
    print(new)


if __name__ == "__main__":
    main()
