"""gwf-bench-2d: the official script is run unchanged through a bootstrap (one thread, gwf/_compat.py's torchvision
workaround loaded by path) with the README's 2D flags, a seed and --save_ckpt; its saved generator (the official
layout, written here as data) is scored as gwf's 2D evaluation scores gwf's; a folder without train.py is refused."""

import json
import subprocess
import sys

import pytest

from gwf.bench.walltime2d import (METHODS, OFFICIAL_ARGS, main, official_checkpoint, official_command,
                                  official_hq_rate, table)

PROBE = """import json, sys, torch
json.dump({"argv": sys.argv, "threads": torch.get_num_threads(), "name": __name__,
           "meta": "torchvision._meta_registrations" in sys.modules}, open("probe.json", "w"))
"""


def test_the_bootstrap_runs_train_py_unchanged_on_one_thread_with_the_readme_flags(tmp_path):
    (tmp_path / "train.py").write_text(PROBE)
    cmd = official_command(sys.executable, tmp_path, "kl_dv", "exp0", seed=2)
    subprocess.run(cmd, cwd=tmp_path, check=True)
    probe = json.loads((tmp_path / "probe.json").read_text())
    assert probe["name"] == "__main__" and probe["threads"] == 1
    assert probe["argv"][0] == str(tmp_path / "train.py")
    assert probe["argv"][1:] == [*OFFICIAL_ARGS, "--divergence", "KL_DV", "--exp", "exp0", "--seed", "2",
                                 "--save_ckpt"]
    i = OFFICIAL_ARGS.index("--gp_type")
    assert OFFICIAL_ARGS[i + 1: i + 4] == ["sjko", "--lbda_gp", "0.2"]  # R1 0.2, as experiment=gwf_2d
    assert METHODS["js"] == "Shannon"


def test_an_official_folder_without_train_py_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--official", str(tmp_path), "--repeats", "1"])
    assert "holds no train.py" in capsys.readouterr().err


def _official_generator_checkpoint(path, out_bias, hidden=128):
    """A --save_ckpt file as train.py writes it (eval.py save_ckpt: a dict with "netT" among others), netT being
    networks/__init__.py's Generator2D(z_dim=2, hidden_dim=128, out_dim=2): model.0/2/4/6 Linear layers around SiLU.
    The last layer maps every input to ``out_bias``."""
    import torch

    shapes = {"model.0": (hidden, 2), "model.2": (hidden, hidden), "model.4": (hidden, hidden), "model.6": (2, hidden)}
    g = torch.Generator().manual_seed(0)
    state = {}
    for name, (rows, cols) in shapes.items():
        state[f"{name}.weight"] = torch.randn(rows, cols, generator=g) * 0.1
        state[f"{name}.bias"] = torch.zeros(rows)
    state["model.6.weight"].zero_()
    state["model.6.bias"] = torch.tensor(out_bias)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"args": {"seed": 0}, "k_next": 5, "netT": state, "netD": {}, "metrics": {}}, path)
    return path


def test_the_official_generator_is_scored_on_the_official_modes(tmp_path):
    """Known answers: a generator that puts every sample on a mode centre of the official 8 Gaussians (radius 1) has
    rate 1; one that puts them all at the origin (1 from every centre, 10 std) has rate 0. The checkpoint is looked
    for where train.py writes it: <FID_BASE_DIR>/checkpoints/GWF/<divergence>/eight_gaussians/<exp>/latest.pt."""
    where = official_checkpoint(tmp_path, "kl_dv", "exp0")
    assert where == tmp_path / "checkpoints" / "GWF" / "KL_DV" / "eight_gaussians" / "exp0" / "latest.pt"
    assert official_hq_rate(_official_generator_checkpoint(where, [1.0, 0.0]), samples=500) == 1.0
    assert official_hq_rate(_official_generator_checkpoint(where, [0.0, 0.0]), samples=500) == 0.0


def test_the_table_has_each_side_that_ran_and_their_ratio():
    rows = [{"method": "kl_dv", "run": i + 1, "seed": i, "gwf_s": g, "gwf_hq_rate": h, "official_s": o,
             "official_hq_rate": oh} for i, (g, h, o, oh) in enumerate([(30.0, 0.7, 20.0, 0.6), (33.0, 0.8, 22.0, 0.7),
                                                                        (27.0, 0.9, 21.0, 0.8)])]
    lines = table(rows).splitlines()
    assert lines[0] == "| run (seed) | gwf-train (s) | hq_rate | official train.py (s) | hq_rate | ratio |"
    assert lines[2] == "| 1 (0) | 30.0 | 0.700 | 20.0 | 0.600 | 1.50 |"
    assert lines[-1] == "| median (hq: mean ± std) | 30.0 | 0.800 ± 0.100 | 21.0 | 0.700 ± 0.100 | 1.50 |"
    official_only = [{k: v for k, v in r.items() if not k.startswith("gwf")} for r in rows]
    assert table(official_only).splitlines()[-1] == "| median (hq: mean ± std) | 21.0 | 0.700 ± 0.100 |"


@pytest.mark.parametrize("argv, message", [(["--method", "kl_dv,nope"], "choose among"),
                                           (["--official-only"], "--official-only needs --official")])
def test_bad_arguments_are_refused_before_anything_runs(argv, message, capsys):
    with pytest.raises(SystemExit):
        main([*argv, "--repeats", "1"])
    assert message in capsys.readouterr().err
