"""gwf-prepare images: folder scanning, the ADM center crop against a brute-force reimplementation of PIL's
resampling, pixel shards -> ShardDataModule batches equal to the source images, the CLI, and refusing to overwrite."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gwf.data import ShardDataModule, read_samples
from gwf.data.images import center_crop_arr, scan_image_folder, to_uint8, to_unit
from gwf.data.shards import ShardReadError
from gwf.prepare import MANIFEST_FILE, main, prepare_images, split_indices


def make_image_folder(root: Path, classes=("cat", "dog", "eel"), per_class=4, corrupt=True, seed=0) -> Path:
    """Random RGB images of assorted sizes in class subfolders (+ one undecodable .jpg in the first class)."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            h, w = 24 + 7 * i + c, 40 - 3 * i  # portrait and landscape, odd and even sides
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name / f"img_{i}.png")
    if corrupt:
        (root / classes[0] / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    return root


# --- brute-force PIL resampling (libImaging/Resample.c: separable passes, uint8 rounding between them) ------------


def _box(x):
    return 1.0 if -0.5 < x <= 0.5 else 0.0


def _bicubic(x, a=-0.5):
    x = abs(x)
    if x < 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    return (((x - 5) * x + 8) * x - 4) * a if x < 2 else 0.0


def _weights(n_in, n_out, kernel, support):
    scale = n_in / n_out
    fs = max(scale, 1.0)  # downsampling stretches the kernel (antialiasing)
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        center = (i + 0.5) * scale
        lo, hi = max(int(center - support * fs + 0.5), 0), min(int(center + support * fs + 0.5), n_in)
        for j in range(lo, hi):
            w[i, j] = kernel((j - center + 0.5) / fs)
        w[i] /= w[i].sum()
    return w


def _resize(arr, out_w, out_h, kernel, support):
    """uint8 [H, W, C] -> uint8 [out_h, out_w, C]: horizontal pass, round, vertical pass, round."""
    def to_uint8(v):  # PIL rounds half up and clips after each pass
        return np.clip(np.floor(v + 0.5), 0, 255)

    out = arr.astype(np.float64)
    if out_w != arr.shape[1]:
        out = to_uint8(np.einsum("ow,hwc->hoc", _weights(arr.shape[1], out_w, kernel, support), out))
    if out_h != arr.shape[0]:
        out = to_uint8(np.einsum("oh,hwc->owc", _weights(arr.shape[0], out_h, kernel, support), out))
    return out.astype(np.uint8)


def _adm_crop_numpy(arr, size):
    while min(arr.shape[:2]) >= 2 * size:
        arr = _resize(arr, arr.shape[1] // 2, arr.shape[0] // 2, _box, 0.5)
    scale = size / min(arr.shape[:2])
    arr = _resize(arr, round(arr.shape[1] * scale), round(arr.shape[0] * scale), _bicubic, 2.0)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]


@pytest.mark.parametrize("hw", [(136, 200), (67, 101), (12, 21), (40, 16)])
def test_adm_center_crop_matches_brute_force(hw):
    """(136, 200): three BOX halvings then a BICUBIC downscale; (67, 101): BOX with odd sides; (12, 21) and (40, 16):
    BICUBIC upscaling, landscape and portrait. PIL uses 22-bit fixed-point weights: within one gray level."""
    arr = np.random.default_rng(sum(hw)).integers(0, 256, (*hw, 3), dtype=np.uint8)
    ours = center_crop_arr(Image.fromarray(arr), 16)
    brute = _adm_crop_numpy(arr, 16)
    assert ours.shape == brute.shape == (16, 16, 3)
    diff = np.abs(ours.astype(int) - brute.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.95


def test_scan_classes_flat_folder_and_errors(tmp_path):
    src = make_image_folder(tmp_path / "src", classes=("zebra", "ant"), per_class=2)
    items, classes = scan_image_folder(src)
    assert classes == ["ant", "zebra"]  # sorted names -> indices
    assert [(Path(p).relative_to(src).as_posix(), c) for p, c in items] == [
        ("ant/img_0.png", 0), ("ant/img_1.png", 0),
        ("zebra/broken.jpg", 1), ("zebra/img_0.png", 1), ("zebra/img_1.png", 1),
    ]  # fmt: skip
    items, classes = scan_image_folder(src / "ant")  # a flat folder is one class
    assert classes == ["ant"] and [c for _, c in items] == [0, 0]
    with pytest.raises(FileNotFoundError, match="does not exist.*--src"):
        scan_image_folder(tmp_path / "nope")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images"):
        scan_image_folder(tmp_path / "empty")
    Image.new("RGB", (4, 4)).save(src / "stray.png")
    with pytest.raises(ValueError, match="both images .* and class subfolders"):
        scan_image_folder(src)


def test_split_is_stratified_and_seeded():
    labels = [0] * 10 + [1] * 20 + [2] * 5
    split = split_indices(labels, 0.2, seed=3)
    assert sorted(split["train"] + split["val"]) == list(range(35))
    assert np.bincount(np.asarray(labels)[split["val"]]).tolist() == [2, 4, 1]
    assert split == split_indices(labels, 0.2, seed=3) and split != split_indices(labels, 0.2, seed=4)


def test_pixel_shards_equal_source_images(tmp_path):
    src = make_image_folder(tmp_path / "src")
    manifest = prepare_images(src, tmp_path / "out", size=16, samples_per_shard=3, val_fraction=0.25)
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert manifest["corrupt"]["count"] == 1 and manifest["corrupt"]["files"][0].endswith("broken.jpg")
    assert train["count"] + val["count"] == 12 and val["class_counts"] == [1, 1, 1]
    assert manifest["classes"] == ["cat", "dog", "eel"] and manifest["format"]["shape"] == [3, 16, 16]

    dm = ShardDataModule(str(tmp_path / "out" / train["pattern"]), str(tmp_path / "out" / val["pattern"]),
                         shape=[3, 16, 16], num_classes=3, dtype="float16", batch_size=4, epoch_size=8)  # fmt: skip
    dm.setup()
    for split, info in (("train", train), ("val", val)):  # the loader's batches, split by split
        x, y = dm.load_split(split)
        assert len(x) == info["count"] and np.bincount(y.numpy(), minlength=3).tolist() == info["class_counts"]
        assert x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1

    # every stored image is the ADM crop of its source in [-1, 1] and maps back to the exact uint8 pixels
    stored = {}
    for split in ("train", "val"):
        x, y = dm.load_split(split)
        keys = [k for k, _, _ in read_samples(dm.urls(split))]
        stored.update({k: (xi.numpy(), int(yi)) for k, xi, yi in zip(keys, x, y)})
    items, _ = scan_image_folder(src)
    assert len(stored) == 12
    for i, (path, label) in enumerate(items):
        key = f"{i:08d}_{Path(path).stem}"
        if path.endswith("broken.jpg"):
            assert key not in stored
            continue
        with Image.open(path) as im:
            expected = center_crop_arr(im.convert("RGB"), 16).transpose(2, 0, 1)  # uint8 [3, 16, 16]
        x, y = stored[key]
        assert y == label and np.array_equal(to_uint8(x), expected)
        np.testing.assert_allclose(x, expected / 127.5 - 1, atol=2.5e-4)
    assert np.array_equal(to_uint8(to_unit(np.arange(256, dtype=np.uint8))), np.arange(256))  # exact round trip


def test_cli_matches_in_process_and_refuses_to_overwrite(tmp_path, capsys):
    src = make_image_folder(tmp_path / "src")
    a = prepare_images(src, tmp_path / "a", size=8, samples_per_shard=5)
    exe = Path(sys.executable).with_name("gwf-prepare")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "gwf.prepare"]
    args = ["images", "--src", str(src), "--out", str(tmp_path / "b"), "--size", "8", "--samples-per-shard", "5"]
    run = subprocess.run(cmd + args, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "skipped 1 undecodable image" in run.stdout
    b = json.loads((tmp_path / "b" / MANIFEST_FILE).read_text())
    assert b["sha256"] == a["sha256"] and len(b["sha256"]) == 3  # same bytes from the CLI and in-process

    # a complete shard made with other settings is never overwritten silently
    with pytest.raises(FileExistsError, match="other images or settings.*--overwrite"):
        prepare_images(src, tmp_path / "b", size=4, samples_per_shard=5)
    with pytest.raises(SystemExit) as exit_info:  # the CLI: exit status 2 and the message, no traceback
        main(args[:-4] + ["--size", "4", "--samples-per-shard", "5"])
    assert exit_info.value.code == 2 and "refusing to overwrite a complete shard" in capsys.readouterr().err
    c = prepare_images(src, tmp_path / "b", size=4, samples_per_shard=5, overwrite=True)
    assert c["format"]["shape"] == [3, 4, 4] and c["sha256"] != a["sha256"]


def test_truncated_shard_is_a_clear_error(tmp_path):
    src = make_image_folder(tmp_path / "src", corrupt=False)
    prepare_images(src, tmp_path / "out", size=8, samples_per_shard=6)
    shard = tmp_path / "out" / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:-3000])
    dm = ShardDataModule(str(tmp_path / "out" / "train-{000000..000001}.tar"), None, shape=[3, 8, 8], num_classes=3,
                         dtype="float16", batch_size=2, epoch_size=2)  # fmt: skip
    with pytest.raises(ShardReadError, match="train-000001.tar is truncated"):
        dm.load_split("train")
    with pytest.raises(FileExistsError, match="train-000001.tar does not match its recorded sha256"):
        prepare_images(src, tmp_path / "out", size=8, samples_per_shard=6)


def test_two_hosts_prepare_one_folder_in_parts(tmp_path):
    """--part 0/2 and --part 1/2 run at once on one --out (as two hosts would): disjoint shard ranges, the union
    byte-identical to one process's shards, one manifest equal to the single run's (written by the part that
    completes the plan). Temporary files are cleaned only by their owner: another host's partial shard stays, one of
    a dead process of this host goes."""
    src = make_image_folder(tmp_path / "src", per_class=6)
    single = prepare_images(src, tmp_path / "single", size=8, samples_per_shard=2, val_fraction=0.25)
    out = tmp_path / "parts"
    out.mkdir()
    foreign = out / ".train-000000.tar.tmp-other-host.example-4242-0a0b0c0d"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    own_stale = out / f".train-000000.tar.tmp-{socket.gethostname()}-{int(dead.stdout)}-deadbeef"
    for f in (foreign, own_stale):
        f.write_bytes(b"partial")
    exe = Path(sys.executable).with_name("gwf-prepare")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "gwf.prepare"]
    args = ["images", "--src", str(src), "--out", str(out), "--size", "8", "--samples-per-shard", "2",
            "--val-fraction", "0.25"]
    procs = [subprocess.Popen(cmd + args + ["--part", f"{i}/2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    shards = sorted(single["sha256"])
    assert len(shards) == 10 and "part 0/2: 5 of them (train-000000.tar .. train-000004.tar)" in outs[0]
    assert "part 1/2: 5 of them (train-000005.tar .. val-000002.tar)" in outs[1]
    manifest = json.loads((out / MANIFEST_FILE).read_text())  # at least one part saw the plan complete
    assert {k: v for k, v in manifest.items() if k != "source"} == {k: v for k, v in single.items() if k != "source"}
    assert foreign.exists() and not own_stale.exists()
    assert sorted(p.name for p in out.glob(".*.tmp-*")) == [foreign.name]  # no temporary of the parts left


def test_part_errors(tmp_path):
    src = make_image_folder(tmp_path / "src", corrupt=False)
    for bad in ("2/2", "1", "a/b", "-1/3"):
        with pytest.raises(ValueError, match="--part must be i/n with 0 <= i < n"):
            prepare_images(src, tmp_path / "out", size=8, part=bad)
    assert prepare_images(src, tmp_path / "out", size=8, samples_per_shard=6, part="0/2") is None  # 1 of 2 shards
    assert not (tmp_path / "out" / MANIFEST_FILE).exists()
    manifest = prepare_images(src, tmp_path / "out", size=8, samples_per_shard=6, part="1/2")  # completes the plan
    assert manifest is not None and manifest["splits"]["train"]["count"] == 12
