"""gwf-bench-2d: the official script is run unchanged through a bootstrap (one thread, gwf/_compat.py's torchvision
workaround loaded by path) with the README's 2D flags; a folder without train.py is refused."""

import json
import subprocess
import sys

import pytest

from gwf.bench.walltime2d import METHODS, OFFICIAL_ARGS, main, official_command

PROBE = """import json, sys, torch
json.dump({"argv": sys.argv, "threads": torch.get_num_threads(), "name": __name__,
           "meta": "torchvision._meta_registrations" in sys.modules}, open("probe.json", "w"))
"""


def test_the_bootstrap_runs_train_py_unchanged_on_one_thread_with_the_readme_flags(tmp_path):
    (tmp_path / "train.py").write_text(PROBE)
    cmd = official_command(sys.executable, tmp_path, "kl_dv", "exp0")
    subprocess.run(cmd, cwd=tmp_path, check=True)
    probe = json.loads((tmp_path / "probe.json").read_text())
    assert probe["name"] == "__main__" and probe["threads"] == 1
    assert probe["argv"][0] == str(tmp_path / "train.py")
    assert probe["argv"][1:] == [*OFFICIAL_ARGS, "--divergence", "KL_DV", "--exp", "exp0"]
    i = OFFICIAL_ARGS.index("--gp_type")
    assert OFFICIAL_ARGS[i + 1: i + 4] == ["sjko", "--lbda_gp", "0.2"]  # R1 0.2, as experiment=gwf_2d
    assert METHODS["js"] == "Shannon"


def test_an_official_folder_without_train_py_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--official", str(tmp_path), "--repeats", "1"])
    assert "holds no train.py" in capsys.readouterr().err
