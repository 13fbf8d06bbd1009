"""gwf-train-encoder --augment pixel (gwf/features/augment.py): the crop boxes are torchvision's
RandomResizedCrop.get_params draw for draw; the augmentation equals the official transforms (RandomResizedCrop(scale
0.2-1, bicubic) + RandomHorizontalFlip) under the same seed; the identity settings give the input back and a flip is a
flip, bit for bit; the VAE path equals the official encode(augment(pixels)).sample() * 0.18215, from latents through
the decoded pixels; same seed, same batch; clear errors; a short gwf-train-encoder run on latent shards of a tiny VAE
and on digits, an identity augmentation training bit for bit like none."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from gwf.constants import SD_VAE_LATENT_SCALE
from gwf.data.latents import random_vae
from gwf.features.augment import PixelAugmentation, PixelPath, crop_box
from gwf.features.train import main as train_encoder_main, parse_args, pixel_path

IDENTITY = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_prob=0.0)


def official_transform(size, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), flip_prob=0.5):
    """dataset/dataset.py's training transform of the Drifting release, on a [C, H, W] tensor (no ToTensor)."""
    return T.Compose([T.RandomResizedCrop(size, scale=scale, ratio=ratio,
                                          interpolation=T.InterpolationMode.BICUBIC, antialias=True),
                      T.RandomHorizontalFlip(flip_prob)])


def official_batch(x, seed, size, **kwargs):
    """The official transform per sample after torch.manual_seed(seed), clipped to [-1, 1] as its uint8 image is."""
    torch.manual_seed(seed)
    transform = official_transform(size, **kwargs)
    return torch.stack([transform(x[b]) for b in range(len(x))]).clamp(-1, 1)


def _pixels(n=5, side=32, seed=0):
    return torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def vae():
    return random_vae(block_out_channels=(32, 32, 32, 32), layers_per_block=1, seed=0)  # 64x64 -> 4x8x8


OFFICIAL = (0.2, 1.0), (3 / 4, 4 / 3)


@pytest.mark.parametrize("hw,scale,ratio", [((64, 64), *OFFICIAL), ((37, 53), *OFFICIAL), ((8, 8), *OFFICIAL),
                                            ((30, 40), (2.0, 3.0), (3 / 4, 4 / 3)),  # never fits: centre crop
                                            ((40, 30), (0.9, 1.0), (3.0, 4.0)), ((30, 40), (0.9, 1.0), (0.2, 0.3))])
def test_crop_box_is_torchvision_get_params(hw, scale, ratio):
    img = torch.zeros(1, *hw)
    for seed in range(200):
        torch.manual_seed(seed)
        expected = T.RandomResizedCrop.get_params(img, list(scale), list(ratio))
        assert crop_box(*hw, scale, ratio, torch.Generator().manual_seed(seed)) == tuple(expected), seed


@pytest.mark.parametrize("size", [None, 16])
def test_augmentation_is_the_official_transform(size):
    x = _pixels()
    for seed in range(5):
        ours = PixelAugmentation(size=size)(x, torch.Generator().manual_seed(seed))
        assert torch.equal(ours, official_batch(x, seed, size or 32)), seed


def _smooth_uint8(n, side, seed):
    """Images of a few low-frequency waves per channel, as uint8 [n, 3, side, side]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side] / side
    a, b, p, q = (rng.uniform(0.5, 3, (n, 3, 1, 1)), rng.uniform(0.5, 3, (n, 3, 1, 1)),
                  rng.uniform(0, 2 * np.pi, (n, 3, 1, 1)), rng.uniform(0, 2 * np.pi, (n, 3, 1, 1)))
    x = 0.5 + 0.25 * np.sin(2 * np.pi * a * xx + p) + 0.25 * np.cos(2 * np.pi * b * yy + q)
    return torch.from_numpy((x * 255).round().astype(np.uint8))


def test_tensor_resize_against_the_official_uint8_pil_path():
    """The official transform runs on the uint8 PIL image (then ToTensor, Normalize(0.5, 0.5)); gwf on float tensors:
    the same boxes and flips, the bicubic resize differing by PIL's rounding to uint8. On smooth images, measured over
    20 seeds: at most 0.0086 in [-1, 1] units (1.1 levels of 255), mean 0.0024; on uniform noise, the worst case,
    PIL's 8-bit pass between the horizontal and the vertical resize differs by up to 20 levels (mean 0.34)."""
    to_pixels = T.Compose([T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
    for seed in range(20):
        u8 = _smooth_uint8(4, 32, seed)
        torch.manual_seed(seed)
        transform = official_transform(24)
        pil = torch.stack([to_pixels(transform(Image.fromarray(u8[b].permute(1, 2, 0).numpy()))) for b in range(4)])
        ours = PixelAugmentation(size=24)(u8.float() / 127.5 - 1, torch.Generator().manual_seed(seed))
        diff = (ours - pil).abs()
        assert diff.max() <= 1.5 / 127.5 and diff.mean() < 0.5 / 127.5, (seed, diff.max(), diff.mean())


def test_identity_settings_and_a_flip_are_exact():
    x = _pixels()
    g = torch.Generator().manual_seed(0)
    assert torch.equal(PixelAugmentation(**IDENTITY)(x, g), x)
    assert torch.equal(PixelAugmentation(**{**IDENTITY, "flip_prob": 1.0})(x, g), x.flip(-1))
    assert torch.equal(PixelPath(PixelAugmentation(**IDENTITY), x.shape[1:])(x, g), x)
    # the official crop with p = 0 flips nothing: the same crops as p = 1, unflipped (the flip draw is still made)
    crops = PixelAugmentation(flip_prob=0.0)(x, torch.Generator().manual_seed(5))
    flipped = PixelAugmentation(flip_prob=1.0)(x, torch.Generator().manual_seed(5))
    assert torch.equal(crops.flip(-1), flipped)


def test_same_seed_same_augmentation():
    x = _pixels(8)
    aug = PixelAugmentation()
    a, b = aug(x, torch.Generator().manual_seed(7)), aug(x, torch.Generator().manual_seed(7))
    c = aug(x, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_vae_path_is_the_official_encode_of_the_augmented_pixels(vae):
    """Pixels: encode(augment(x)).latent_dist.sample() * 0.18215 with torch's global RNG seeded as the generator.
    Latents: the same on the decoded pixels vae.decode(z / 0.18215).sample clamped to [-1, 1]; in chunks or not."""
    x = _pixels(5, 64)
    seed = 11
    with torch.no_grad():
        pixel_path = PixelPath(PixelAugmentation(), (3, 64, 64), vae)
        ours = pixel_path(x, torch.Generator().manual_seed(seed))
        augmented = official_batch(x, seed, 64)  # global RNG: the crops, then the posterior noise
        expected = vae.encode(augmented).latent_dist.sample() * SD_VAE_LATENT_SCALE
        assert pixel_path.shape == (4, 8, 8) and pixel_path.input == "pixels"
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)

        z = SD_VAE_LATENT_SCALE * torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(2))
        decoded = vae.decode(z / SD_VAE_LATENT_SCALE).sample.clamp(-1, 1)
        for vae_batch_size in (64, 2):
            latent_path = PixelPath(PixelAugmentation(), (4, 8, 8), vae, vae_batch_size=vae_batch_size)
            ours = latent_path(z, torch.Generator().manual_seed(seed))
            expected = vae.encode(official_batch(decoded, seed, 64)).latent_dist.sample() * SD_VAE_LATENT_SCALE
            assert latent_path.shape == (4, 8, 8) and latent_path.input == "latents"
            torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
        # the identity round trip is one posterior sample of the decoded latents' encoding, not z itself
        g = torch.Generator().manual_seed(4)
        ours = PixelPath(PixelAugmentation(**IDENTITY), (4, 8, 8), vae)(z, g)
        same = official_batch(decoded, 4, 64, **IDENTITY)  # draws the boxes and flips, returns the pixels
        assert torch.equal(same, decoded)
        expected = vae.encode(decoded).latent_dist.sample() * SD_VAE_LATENT_SCALE
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
        assert not torch.allclose(ours, z, atol=1e-2)
        # a 32-pixel crop of 64-pixel images gives 4x4 latents
        assert PixelPath(PixelAugmentation(size=32), (4, 8, 8), vae).shape == (4, 4, 4)


def test_bad_options_are_clear_errors(vae, tmp_path):
    with pytest.raises(ValueError, match="--crop-scale must be MIN MAX"):
        PixelAugmentation(scale=(0.8, 0.2))
    with pytest.raises(ValueError, match="--crop-ratio"):
        PixelAugmentation(ratio=(0.0, 1.0))
    with pytest.raises(ValueError, match="--flip-prob must be in"):
        PixelAugmentation(flip_prob=1.5)
    with pytest.raises(ValueError, match="the data have 2 channels; the VAE takes 3-channel images"):
        PixelPath(PixelAugmentation(), (2, 8, 8), vae)
    with pytest.raises(ValueError, match="pass --crop-size as a multiple of 8"):
        PixelPath(PixelAugmentation(size=60), (3, 64, 64), vae)
    with pytest.raises(ValueError, match="--vae, --crop-size only apply with --augment pixel"):
        pixel_path(parse_args(["--out", "o", "--vae", "v", "--crop-size", "8"]), (4, 8, 8), "cpu")
    with pytest.raises(ValueError, match="the data have 4 channels.*pass --vae"):
        pixel_path(parse_args(["--out", "o", "--augment", "pixel"]), (4, 8, 8), "cpu")


ENCODER_ARGS = ["--batch-size", "8", "--base-channels", "8", "--layers", "1", "1", "--lr", "1e-2", "--warmup-steps",
                "0", "--ema-decay", "0", "--no-progress", "--device", "cpu"]


def test_train_encoder_on_latent_shards_through_the_vae(tmp_path):
    """gwf-train-encoder --augment pixel --vae on latent shards made by gwf-prepare latents with a tiny VAE: it
    trains on re-encoded augmented latents (4x8x8), records the augmentation, refuses to resume with another and resumes
    with the same."""
    from tests.test_latents import latent_shards

    out, manifest = latent_shards(tmp_path)
    data = ["data.prepare=null", f"data.train_shards={out / manifest['splits']['train']['pattern']}",
            "data.shape=[4,8,8]", "data.num_classes=2", "data.num_workers=0", "data.shuffle_buffer=0",
            "data.epoch_size=16"]
    run = tmp_path / "run"
    args = ["--out", str(run), "--data", "latents", "--steps", "3", *ENCODER_ARGS, "--augment", "pixel", "--vae",
            str(tmp_path / "vae")]
    train_encoder_main([*args, *data])
    state = torch.load(run / "mae.pt", weights_only=True)
    assert state["step"] == 3 and state["data_shape"] == [4, 8, 8]
    assert all(np.isfinite(loss) for _, loss in state["history"])
    assert state["augment"] == {"scale": (0.2, 1.0), "ratio": (0.75, 4 / 3), "flip_prob": 0.5, "size": None,
                                "input": "latents", "encode": True, "latent_scale": SD_VAE_LATENT_SCALE}
    with pytest.raises(ValueError, match="was trained with augmentation"):
        train_encoder_main([*args, "--steps", "4", "--flip-prob", "0", *data])
    train_encoder_main([*args, "--steps", "4", *data])  # the same options resume
    resumed = torch.load(run / "mae.pt", weights_only=True)
    assert resumed["step"] == 4 and resumed["history"][:3] == state["history"]


def test_identity_augmentation_trains_like_none_on_digits(digits_dir, tmp_path):
    """On digits (pixels, no VAE: the pixel MAE's path) the identity augmentation leaves every other draw alone: the
    weights equal those of a run without augmentation bit for bit; the official augmentation changes them."""
    data = [f"paths.data_dir={digits_dir.parent}", "data.num_workers=0"]
    base = ["--data", "digits", "--steps", "3", *ENCODER_ARGS]
    runs = {}
    for name, extra in [("none", []), ("identity", ["--augment", "pixel", "--crop-scale", "1", "1", "--crop-ratio",
                                                    "1", "1", "--flip-prob", "0"]),
                        ("official", ["--augment", "pixel"])]:
        train_encoder_main(["--out", str(tmp_path / name), *base, *extra, *data])
        runs[name] = torch.load(tmp_path / name / "mae.pt", weights_only=True)
    assert runs["identity"]["data_shape"] == runs["official"]["data_shape"] == [1, 8, 8]
    assert all(torch.equal(runs["none"]["model"][k], runs["identity"]["model"][k]) for k in runs["none"]["model"])
    assert runs["none"]["history"] == runs["identity"]["history"]
    assert runs["none"]["history"] != runs["official"]["history"]
    assert not all(torch.equal(runs["none"]["model"][k], runs["official"]["model"][k]) for k in runs["none"]["model"])
