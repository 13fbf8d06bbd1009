"""gwf-prepare latents with a randomly initialized tiny AutoencoderKL (saved with save_pretrained, loaded by path):
stored moments equal a direct vae.encode of the ADM crop and its flip; the loader draws z = scale * (mean + std * eps)
from a random view; resume after an interruption; clear errors; LatentDecoder against vae.decode.

``latent_shards`` and ``latent_datamodule`` are the reusable smoke path: image folder -> shards -> batches."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from gwf.constants import SD_VAE_LATENT_SCALE, SD_VAE_LATENT_SHAPE
from gwf.data import LatentDecoder, LatentMoments, ShardDataModule, read_samples, write_shards
from gwf.data.images import center_crop_arr, scan_image_folder
from gwf.data.latents import LatentShards, load_vae, random_vae
from gwf.prepare import MANIFEST_FILE, main, prepare, prepare_latents
from tests.conftest import CONF_DIR

RESOLUTION = 64  # -> latents [4, 8, 8] with the tiny VAE (4 blocks: downsampling by 8, as the SD-VAE)
LATENT = (4, RESOLUTION // 8, RESOLUTION // 8)


def write_tiny_vae(folder: Path) -> Path:
    random_vae(block_out_channels=(32, 32, 32, 32), layers_per_block=1, seed=0).save_pretrained(folder)
    return folder


def make_big_image_folder(root: Path, per_class=3) -> Path:
    """make_image_folder's layout with images larger than RESOLUTION (the ADM crop halves some of them)."""
    rng = np.random.default_rng(1)
    for c, name in enumerate(("ant", "bee")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            h, w = 64 + 40 * i + c, 150 - 20 * i
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name / f"img_{i}.png")
    (root / "ant" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root


def latent_shards(tmp: Path, resolution: int = RESOLUTION, samples_per_shard: int = 3, **kwargs) -> tuple[Path, dict]:
    """Smoke path, part 1: generated images + tiny VAE -> latent shards under tmp/latents; (out, manifest)."""
    src = make_big_image_folder(tmp / "images")
    vae = write_tiny_vae(tmp / "vae")
    out = tmp / "latents"
    return out, prepare_latents(src, out, vae, resolution=resolution, samples_per_shard=samples_per_shard,
                                batch_size=2, device="cpu", **kwargs)  # fmt: skip


def latent_datamodule(out: Path, manifest: dict, batch_size: int = 4, **kwargs) -> ShardDataModule:
    """Smoke path, part 2: the shards -> ShardDataModule drawing z [B, *latent_shape] (transform latent_moments)."""
    train = manifest["splits"]["train"]
    return ShardDataModule(str(out / train["pattern"]), None, shape=manifest["format"]["latent_shape"],
                           num_classes=manifest["num_classes"], dtype="float16", transform="latent_moments",
                           batch_size=batch_size, epoch_size=4 * batch_size, num_workers=0, shuffle_buffer=0,
                           **kwargs)  # fmt: skip


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("latents")
    out, manifest = latent_shards(tmp)
    return tmp, out, manifest


def test_manifest_and_corrupt_count(prepared):
    tmp, out, manifest = prepared
    assert manifest["kind"] == "latents" and manifest["classes"] == ["ant", "bee"]
    assert manifest["format"]["shape"] == [2, 2, *LATENT] and manifest["format"]["scale"] == SD_VAE_LATENT_SCALE
    assert manifest["corrupt"] == {"count": 1, "files": [str(tmp / "images" / "ant" / "broken.png")]}
    train = manifest["splits"]["train"]
    assert train["count"] == 6 and train["class_counts"] == [3, 3] and train["pattern"] == "train-{000000..000002}.tar"
    enc = manifest["format"]["encoder"]
    assert enc["vae"] == str(tmp / "vae") and len(enc["weights_sha256"]) == 64
    assert manifest["settings"]["resolution"] == RESOLUTION


def test_stored_moments_equal_direct_encode(prepared):
    tmp, out, manifest = prepared
    vae = load_vae(tmp / "vae")
    items, _ = scan_image_folder(tmp / "images")
    stored = {key: (x, label) for key, x, label in read_samples(str(out / manifest["splits"]["train"]["pattern"]))}
    assert len(stored) == 6
    for i, (path, label) in enumerate(items):
        key = f"{i:08d}_{Path(path).stem}"
        if path.endswith("broken.png"):
            assert key not in stored
            continue
        with Image.open(path) as im:
            pixels = torch.from_numpy(center_crop_arr(im.convert("RGB"), RESOLUTION).transpose(2, 0, 1).copy())
        x = pixels[None].float() / 127.5 - 1
        moments, y = stored[key]
        assert y == label and moments.dtype == np.float16 and moments.shape == (2, 2, *LATENT)
        for view, image in enumerate((x, x.flip(-1))):
            with torch.no_grad():
                post = vae.encode(image).latent_dist
            for m, direct in enumerate((post.mean[0], post.std[0])):
                np.testing.assert_allclose(moments[view, m].astype(np.float32), direct.numpy(), rtol=2e-3, atol=2e-3)
        assert np.abs(moments[0, 0].astype(np.float32) - moments[1, 0].astype(np.float32)).max() > 1e-2  # views differ


def test_loader_draws_scaled_mean_plus_std_eps_from_a_random_view(tmp_path):
    """Known moments: per sample, mean_orig ~ U(-1, 1), mean_flip = mean_orig + 10, std ~ U(0.2, 0.7) per element.
    Over many draws, (z / scale - mean_v) / std_v must be N(0, 1) and the view must be the flip half of the time."""
    rng = np.random.default_rng(0)
    n = 40
    mean = rng.uniform(-1, 1, (n, *LATENT)).astype(np.float16)
    std = rng.uniform(0.2, 0.7, (n, 2, *LATENT)).astype(np.float16)
    moments = np.stack([np.stack([mean, std[:, 0]], 1), np.stack([mean + 10, std[:, 1]], 1)], 1)  # [n, 2, 2, ...]
    write_shards(((f"s{i:04d}", moments[i], i % 3) for i in range(n)), tmp_path, "train", 20)
    dm = ShardDataModule(str(tmp_path / "train-{000000..000001}.tar"), None, shape=LATENT, num_classes=3,
                         dtype="float16", transform="latent_moments", batch_size=8, epoch_size=400, num_workers=1,
                         shuffle_buffer=0, seed=5)  # fmt: skip
    dm.setup()
    loader = dm.train_dataloader()
    zs = torch.cat([x for x, _ in loader]).numpy()  # 400 draws of 40 samples
    assert zs.shape == (400, *LATENT)
    z = zs / SD_VAE_LATENT_SCALE
    # identify each draw's sample by its nearest stored mean (view-independent: means differ by 10 between views)
    base = mean.astype(np.float32).reshape(n, -1)
    flat = z.reshape(len(z), -1)
    flipped = flat.mean(1) > 5
    sample = np.argmin((((flat - 10 * flipped[:, None])[:, None] - base[None]) ** 2).sum(-1), axis=1)
    view = flipped.astype(int)
    m = moments[sample, view, 0].astype(np.float32).reshape(len(z), -1)
    s = moments[sample, view, 1].astype(np.float32).reshape(len(z), -1)
    eps = (flat - m) / s
    assert abs(flipped.mean() - 0.5) < 4 * np.sqrt(0.25 / len(z))  # binomial, 4 sigma
    assert abs(eps.mean()) < 4 / np.sqrt(eps.size) and abs(eps.var() - 1) < 4 * np.sqrt(2 / eps.size)
    assert abs(np.mean(eps**4) - 3) < 0.1  # Gaussian kurtosis: eps is N(0, 1), not e.g. uniform
    # the same seed and epoch draw the same stream, the next epoch new draws; flip=False takes the original moments
    assert np.array_equal(torch.cat([x for x, _ in dm.train_dataloader()]).numpy(), zs)
    assert not np.array_equal(torch.cat([x for x, _ in loader]).numpy(), zs)
    dm2 = ShardDataModule(str(tmp_path / "train-{000000..000001}.tar"), None, shape=LATENT, num_classes=3,
                          dtype="float16", transform="latent_moments", transform_args={"flip": False}, batch_size=8,
                          epoch_size=400, num_workers=0, shuffle_buffer=0, seed=5)  # fmt: skip
    assert (torch.cat([x for x, _ in dm2.train_dataloader()]).mean(dim=(1, 2, 3)) < 5 * SD_VAE_LATENT_SCALE).all()


def test_transform_statistics_closed_form():
    """LatentMoments alone, one sample, 20k draws: E z = scale * (mean_orig + mean_flip) / 2 and
    Var z = scale^2 * (E std^2 + Var of the view mean) elementwise."""
    m0, m1, s0, s1 = 1.0, -3.0, 0.5, 2.0
    moments = np.stack([np.stack([np.full(LATENT, m0), np.full(LATENT, s0)]),
                        np.stack([np.full(LATENT, m1), np.full(LATENT, s1)])]).astype(np.float16)  # fmt: skip
    t, rng = LatentMoments(), np.random.default_rng(0)
    z = np.stack([t(moments, rng)[0, 0, 0] for _ in range(20000)]) / SD_VAE_LATENT_SCALE
    mix_mean = (m0 + m1) / 2
    mix_var = (s0**2 + s1**2) / 2 + ((m0 - mix_mean) ** 2 + (m1 - mix_mean) ** 2) / 2
    assert abs(z.mean() - mix_mean) < 4 * np.sqrt(mix_var / len(z))
    assert abs(z.var() / mix_var - 1) < 0.05


def test_end_to_end_batches_have_the_latent_shape(prepared):
    tmp, out, manifest = prepared
    dm = latent_datamodule(out, manifest)
    dm.setup()
    assert dm.shape == LATENT
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, *LATENT) and x.dtype == torch.float32 and set(y.tolist()) <= {0, 1}
    # each z lies within a few posterior stds of one view of one stored sample (times the scale)
    stored = np.stack([m for _, m, _ in read_samples(str(out / manifest["splits"]["train"]["pattern"]))])
    z = x.numpy()[:, None, None] / SD_VAE_LATENT_SCALE  # [B, 1, 1, 4, 8, 8]
    dist = np.abs(z - stored[None, :, :, 0]) / stored[None, :, :, 1]  # [B, N, 2 views, ...] in posterior stds
    assert (np.median(dist.reshape(*dist.shape[:3], -1), axis=-1).min(axis=(1, 2)) < 1.5).all()


def test_wrong_latent_shape_is_a_clear_error(prepared):
    _, out, manifest = prepared
    dm = latent_datamodule(out, {**manifest, "format": {**manifest["format"], "latent_shape": [4, 32, 32]}})
    with pytest.raises(ValueError, match=r"shape \[2, 2, 4, 8, 8\].*expected shape \[2, 2, 4, 32, 32\].*"
                                         r"data.transform=latent_moments for data.shape \[4, 32, 32\]"):
        dm.setup()


class Interrupting:
    """Test harness around the real LatentShards: raises after ``after`` source images (a killed worker)."""

    def __init__(self, maker, after: int):
        self.maker, self.after, self.seen = maker, after, 0

    def __getattr__(self, name):
        return getattr(self.maker, name)

    def samples(self, items, keys, on_item=lambda n: None):
        gen, corrupt = self.maker.samples(items, keys, on_item)

        def interrupted():
            for sample in gen:
                self.seen += 1
                if self.seen > self.after:
                    raise KeyboardInterrupt("simulated kill")
                yield sample

        return interrupted(), corrupt


def test_resume_redoes_only_partial_shards(prepared, tmp_path):
    tmp, straight, manifest = prepared
    src, vae, out = tmp / "images", tmp / "vae", tmp_path / "latents"
    maker = LatentShards(vae, resolution=RESOLUTION, batch_size=2)
    with pytest.raises(KeyboardInterrupt):  # killed inside the second shard
        prepare(Interrupting(maker, after=4), src, out, samples_per_shard=3)
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar"]
    assert not list(out.glob(".*.tmp-*")) and not (out / MANIFEST_FILE).exists()
    first = (out / "train-000000.tar").stat().st_mtime_ns
    # a partial temporary shard of a run on this host that died harder (no cleanup) is dropped and redone
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / f".train-000001.tar.tmp-{socket.gethostname()}-{int(dead.stdout)}-abcd").write_bytes(b"partial")

    resumed = prepare_latents(src, out, vae, resolution=RESOLUTION, samples_per_shard=3, batch_size=2, device="cpu")
    assert (out / "train-000000.tar").stat().st_mtime_ns == first  # complete shard untouched
    assert not list(out.glob(".*.tmp-*"))
    assert resumed["sha256"] == manifest["sha256"]  # byte-identical to an uninterrupted run
    for name in manifest["sha256"]:
        assert (out / name).read_bytes() == (straight / name).read_bytes()


def test_missing_vae_is_a_clear_error(prepared, tmp_path, capsys):
    tmp, _, _ = prepared
    src = tmp / "images"
    with pytest.raises(FileNotFoundError, match="Nothing is downloaded at run time.*--vae /path/sd-vae-ft-mse"):
        prepare_latents(src, tmp_path / "o", tmp_path / "no_such_vae")
    with pytest.raises(FileNotFoundError, match="'someone/uncached-vae'.*not in the Hugging Face cache"):
        prepare_latents(src, tmp_path / "o", "someone/uncached-vae")
    (tmp_path / "sd" / "vae").mkdir(parents=True)
    (tmp_path / "sd" / "vae" / "config.json").write_text((tmp / "vae" / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="pass --subfolder vae"):
        prepare_latents(src, tmp_path / "o", tmp_path / "sd")
    with pytest.raises(SystemExit) as exit_info:
        main(["latents", "--src", str(src), "--out", str(tmp_path / "o"), "--vae", str(tmp_path / "nope")])
    assert exit_info.value.code == 2 and "Nothing is downloaded" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="empty_src.*does not exist"):
        prepare_latents(tmp_path / "empty_src", tmp_path / "o", tmp / "vae")


def test_cli_with_two_worker_processes(prepared, tmp_path):
    tmp, straight, manifest = prepared
    exe = Path(sys.executable).with_name("gwf-prepare")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "gwf.prepare"]
    run = subprocess.run(cmd + ["latents", "--src", str(tmp / "images"), "--out", str(tmp_path / "cli"),
                                "--vae", str(tmp / "vae"), "--resolution", str(RESOLUTION), "--samples-per-shard",
                                "3", "--batch-size", "2", "--workers", "2", "--device", "cpu"],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "2 worker(s) on cpu" in run.stdout and "skipped 1 undecodable image" in run.stdout
    cli = json.loads((tmp_path / "cli" / MANIFEST_FILE).read_text())
    assert cli["splits"] == manifest["splits"] and cli["corrupt"]["count"] == 1
    ours = {k: x for k, x, _ in read_samples(str(tmp_path / "cli" / cli["splits"]["train"]["pattern"]))}
    for key, x, _ in read_samples(str(straight / manifest["splits"]["train"]["pattern"])):
        np.testing.assert_allclose(ours[key].astype(np.float32), x.astype(np.float32), rtol=1e-3, atol=1e-3)


def test_latent_decoder_matches_vae_decode(prepared):
    tmp, out, manifest = prepared
    vae = load_vae(tmp / "vae")
    decoder = LatentDecoder(tmp / "vae", batch_size=3)
    z = torch.randn(5, *LATENT, generator=torch.Generator().manual_seed(0)) * SD_VAE_LATENT_SCALE
    with torch.no_grad():
        direct = vae.decode(z / SD_VAE_LATENT_SCALE).sample.clamp(-1, 1)
    images = decoder.decode(z)
    assert images.shape == (5, 3, RESOLUTION, RESOLUTION) and images.min() >= -1 and images.max() <= 1
    torch.testing.assert_close(images, direct, rtol=1e-5, atol=1e-5)
    # encode -> decode: a stored mean, scaled as the loader scales it, decodes like vae.decode(mean)
    moments = next(read_samples(str(out / "train-000000.tar")))[1]
    mean = torch.from_numpy(moments[0, 0].astype(np.float32))[None]
    with torch.no_grad():
        torch.testing.assert_close(decoder.decode(mean * SD_VAE_LATENT_SCALE), vae.decode(mean).sample.clamp(-1, 1),
                                   rtol=1e-4, atol=1e-4)  # fmt: skip
    with pytest.raises(ValueError, match=r"latents must be \[B, 4, h, w\]"):
        decoder.decode(torch.zeros(2, 3, 8, 8))


def test_latents_config_matches_the_constants():
    cfg = OmegaConf.load(CONF_DIR / "data" / "latents.yaml")
    assert tuple(cfg.shape) == SD_VAE_LATENT_SHAPE and cfg.transform == "latent_moments" and cfg.dtype == "float16"
    assert cfg.prepare == "latents" and cfg.num_classes == 1000


def test_fixed_sampling_is_one_posterior_sample_per_image_and_its_flip():
    """sampling=fixed (the official W-Flow cache): the same z for a sample and view across loads and epochs, the same
    eps for the original and the flipped view, a different eps for another key; resample draws anew."""
    rng_m = np.random.default_rng(1)
    mean = rng_m.uniform(-1, 1, (2, *LATENT)).astype(np.float32)
    std = rng_m.uniform(0.2, 0.7, (2, *LATENT)).astype(np.float32)
    moments = np.stack([np.stack([mean[0], std[0]]), np.stack([mean[1], std[1]])]).astype(np.float16)
    m32 = moments.astype(np.float32)
    fixed = LatentMoments(sampling="fixed")
    draws = [fixed(moments, np.random.default_rng(seed), key="00000007_n01440764_10026") for seed in range(40)]
    eps = [None, None]
    for z in draws:
        u = z / SD_VAE_LATENT_SCALE
        view = int(np.abs(u - m32[1, 0]).mean() < np.abs(u - m32[0, 0]).mean())
        e = (z / SD_VAE_LATENT_SCALE - m32[view, 0]) / m32[view, 1]
        if eps[view] is None:
            eps[view] = e
        np.testing.assert_allclose(e, eps[view], rtol=1e-4, atol=1e-4)  # the same posterior sample every load
    assert eps[0] is not None and eps[1] is not None  # both views were picked
    np.testing.assert_allclose(eps[0], eps[1], rtol=1e-4, atol=1e-4)  # one noise for the image and its flip
    other = fixed(moments, np.random.default_rng(0), key="00000008_n01440764_10027")
    assert not np.allclose(other, fixed(moments, np.random.default_rng(0), key="00000007_n01440764_10026"))
    resample = LatentMoments(flip=False)
    g = np.random.default_rng(0)
    assert not np.array_equal(resample(moments, g, key="a"), resample(moments, g, key="a"))
    with pytest.raises(ValueError, match="sampling must be one of"):
        LatentMoments(sampling="mean")
