"""Writes a sweep's gwf-report table into a Markdown file between markers, so tables in the README and docs come
from real runs and cannot be typed in; copies the report's figures next to it.

    python tools/sweep_tables.py runs/gwf_2d_family/multirun --metric hq_rate --name gwf_2d_hq --into README.md \
        --figures docs/gwf_2d_family

The file must hold the two marker lines ``<!-- sweep-table:NAME:begin ... -->`` and ``<!-- sweep-table:NAME:end -->``
(the first run inserts nothing: add them where the table goes). Run from the repository root.
"""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path


def markers(name: str) -> tuple[str, str]:
    return f"<!-- sweep-table:{name}:begin (tools/sweep_tables.py) -->", f"<!-- sweep-table:{name}:end -->"


def splice(text: str, name: str, table: str, command: str) -> str:
    """``text`` with the block between NAME's markers replaced by the table and the command that made it."""
    begin, end = markers(name)
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if not pattern.search(text):
        raise ValueError(f"the markers of table {name!r} are missing: add the lines\n{begin}\n{end}\nwhere it goes")
    body = f"{begin}\n{table.strip()}\n\n(made by `{command}`)\n{end}"
    return pattern.sub(lambda _: body, text, count=1)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_dir")
    p.add_argument("--metric", required=True)
    p.add_argument("--name", required=True, help="the table's marker name")
    p.add_argument("--into", required=True, help="the Markdown file that holds the markers")
    p.add_argument("--figures", help="copy the report's curves and heat map to <prefix>_{curves,heatmap}.png")
    args = p.parse_args(argv)
    import gwf  # noqa: F401  (torchvision workaround before anything else)
    from gwf.report import run

    out = Path(args.sweep_dir) / "report"
    run([args.sweep_dir, "--metric", args.metric, "--out", str(out)])
    table = (out / f"table_{args.metric}.md").read_text()
    command = f"gwf-report {args.sweep_dir} --metric {args.metric}"
    target = Path(args.into)
    target.write_text(splice(target.read_text(), args.name, table, command))
    print(f"wrote the {args.metric} table of {args.sweep_dir} into {target}")
    if args.figures:
        for kind in ("curves", "heatmap"):
            src = out / f"{kind}_{args.metric}.png"
            if src.exists():
                shutil.copyfile(src, f"{args.figures}_{kind}.png")
                print(f"copied {src} -> {args.figures}_{kind}.png")


if __name__ == "__main__":
    main()
