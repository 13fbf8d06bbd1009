"""torch-fidelity through gwf.eval.fidelity / gwf-eval, against known answers: FID of linearly embedded Gaussians
(scipy closed form), FID of a set against itself, KID's unbiasedness (closed form of the cubic-kernel MMD between
centred Gaussians), the registered digits extractor end to end (equal to the digits evaluator's Frechet distance,
hand-computed KID / IS / precision-recall), precomputed statistics, image folders and ADM-layout samples, and
the error naming the Inception weights file when it is missing offline."""

import json

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

import gwf  # noqa: F401
from gwf.data.digits import CLASSIFIER_FILE, load_classifier, load_digits_split
from gwf.eval.digits import DigitsEvaluator
from gwf.eval.fidelity import INCEPTION_WEIGHTS_FILE, Reference, compute_metrics, load_reference
from gwf.eval.frechet import feature_statistics, frechet_distance
from gwf.evaluate import run as gwf_eval

D = 8  # "images" [N, 1, 2, 4]: 8 pixels
A = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(0)))[0] * 2.0  # features = A x


class LinearExtractor(FeatureExtractorBase):
    """features [N, 8] = A @ flatten(x): Gaussian images give Gaussian features with known moments."""

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)

    @staticmethod
    def get_provided_features_list():
        return ("8",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "8"

    @staticmethod
    def can_be_compiled():
        return False

    def forward(self, x):
        return ((x.flatten(1).double() @ A.double().T).float(),)


if "test-linear" not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor("test-linear", LinearExtractor)


def _gaussian_images(n, mean, cov, seed):
    z = torch.randn(n, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = torch.as_tensor(mean) + z @ torch.linalg.cholesky(torch.as_tensor(cov)).T
    return x.float().reshape(n, 1, 2, 4)


def _scipy_fid(mu1, s1, mu2, s2):
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2)).real)


def test_fid_of_gaussians_matches_scipy_closed_form():
    rng = np.random.default_rng(1)
    m1, m2 = rng.normal(size=D), rng.normal(size=D)
    q = np.linalg.qr(rng.normal(size=(D, D)))[0]
    c1, c2 = np.diag(rng.uniform(0.2, 2.0, D)), (q * rng.uniform(0.2, 2.0, D)) @ q.T
    x1, x2 = _gaussian_images(20000, m1, c1, 1), _gaussian_images(20000, m2, c2, 2)
    fid = compute_metrics(x1, Reference(images=x2), ["fid"], "test-linear")["fid"]
    a = A.double().numpy()
    f1, f2 = x1.flatten(1).double().numpy() @ a.T, x2.flatten(1).double().numpy() @ a.T
    empirical = _scipy_fid(f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False))
    population = _scipy_fid(a @ m1, a @ c1 @ a.T, a @ m2, a @ c2 @ a.T)
    assert fid == pytest.approx(empirical, rel=1e-5)
    assert fid == pytest.approx(population, rel=0.03)  # 20,000 samples per set


def test_kid_is_unbiased_over_repeats():
    # centred Gaussian features f ~ N(0, S): for k(f, g) = (f.g / F + 1)^3 odd moments vanish and
    # E k(f, f') = 1 + 3 ||S||_F^2 / F^2, so MMD^2 = 3 ||S1 - S2||_F^2 / F^2 exactly
    c1, c2 = np.eye(D), np.diag(np.linspace(0.3, 1.6, D))
    x1, x2 = _gaussian_images(20000, np.zeros(D), c1, 3), _gaussian_images(20000, np.zeros(D), c2, 4)
    m, repeats = 20, 4000
    out = compute_metrics(x1, Reference(images=x2), ["kid"], "test-linear", kid_subset_size=m, kid_subsets=repeats)
    a = A.double().numpy()
    s1, s2 = a @ c1 @ a.T, a @ c2 @ a.T
    exact = 3 * np.linalg.norm(s1 - s2) ** 2 / D**2
    standard_error = out["kid_std"] / np.sqrt(repeats)
    assert abs(out["kid_mean"] - exact) < 4 * standard_error
    # a biased (V-statistic) estimate would sit (E k(f,f) - E k(f,f'))/m per set above: far outside the band
    f1 = x1.flatten(1).double().numpy() @ a.T
    diag_excess = ((np.einsum("ij,ij->i", f1, f1) / D + 1) ** 3).mean() - (1 + 3 * np.linalg.norm(s1) ** 2 / D**2)
    assert diag_excess / m > 20 * standard_error


@pytest.fixture(scope="module")
def digits(digits_dir):
    x_val, _ = load_digits_split(digits_dir, "val")
    return digits_dir, x_val, str(digits_dir / CLASSIFIER_FILE)


def _classifier_features(x, weights):
    clf = load_classifier(weights)
    with torch.no_grad():
        f = clf.features(x)
        return f.double(), clf.head(f).double()


def test_digits_extractor_end_to_end_matches_hand_computation(digits):
    root, x_val, weights = digits
    gen, ref = x_val[:180], x_val[180:]
    out = compute_metrics(gen, Reference(images=ref), ["fid", "kid", "isc", "prc"], "digits", weights,
                          kid_subset_size=180, kid_subsets=1, isc_splits=1)
    (f1, logits1), (f2, _) = _classifier_features(gen, weights), _classifier_features(ref, weights)
    assert out["fid"] == pytest.approx(frechet_distance(*feature_statistics(f1), *feature_statistics(f2)), rel=1e-5)
    # KID with one subset of all 180: the unbiased MMD^2 of the full sets, cubic kernel with gamma = 1 / 64
    k = lambda a, b: (a @ b.T / 64 + 1) ** 3  # noqa: E731
    m = 180
    k11, k22, k12 = k(f1, f1), k(f2, f2), k(f1, f2)
    kid = ((k11.sum() - k11.trace()) + (k22.sum() - k22.trace())) / (m * (m - 1)) - 2 * k12.sum() / m**2
    assert out["kid_mean"] == pytest.approx(float(kid), rel=1e-3, abs=1e-3 * float(k12.mean()))
    # IS over the 10 digits, one split: exp E_x KL(p(y|x) || p(y))
    p = logits1.softmax(1)
    isc = torch.exp((p * (p.log() - p.mean(0, keepdim=True).log())).sum(1).mean())
    assert out["isc_mean"] == pytest.approx(float(isc), rel=1e-6)
    # precision / recall (k = 3 nearest neighbours, Kynkaanniemi et al.), brute force
    r1 = torch.cdist(f1, f1).kthvalue(4, dim=1).values  # 4th smallest: the point itself is the first
    r2 = torch.cdist(f2, f2).kthvalue(4, dim=1).values
    precision = (torch.cdist(f1, f2) <= r2[None, :]).any(1).double().mean()
    recall = (torch.cdist(f2, f1) <= r1[None, :]).any(1).double().mean()
    assert out["precision"] == pytest.approx(float(precision), abs=1.5 / m)
    assert out["recall"] == pytest.approx(float(recall), abs=1.5 / m)


def test_digits_fd_through_torch_fidelity_equals_the_evaluator(digits):
    root, x_val, weights = digits
    ref = load_reference(str(root / "train-{000000..000003}.tar"))
    fid = compute_metrics(x_val, ref, ["fid"], "digits", weights)["fid"]
    assert fid == pytest.approx(DigitsEvaluator(root).evaluate(x_val)["fd"], rel=1e-5)


def test_gwf_eval_self_distance_stats_and_json(digits, tmp_path):
    root, x_val, _ = digits
    samples = tmp_path / "samples.npz"
    np.savez(samples, x=x_val.numpy(), labels=np.zeros(len(x_val), np.int64))
    val = str(root / "val-000000.tar")
    result = gwf_eval(["--samples", str(samples), "--ref", val, "--metrics", "fid,isc"])  # auto -> digits
    saved = json.loads((tmp_path / "metrics_gwf-digits.json").read_text())
    assert saved["extractor"] == "gwf-digits" and saved["fid"] == result["fid"]
    f, _ = _classifier_features(x_val, str(root / CLASSIFIER_FILE))
    assert abs(result["fid"]) < 1e-8 * float(np.trace(feature_statistics(f)[1]))  # FID(set, itself) = 0
    # precomputed statistics of the train split give the same FID as the shards themselves
    stats = tmp_path / "train_stats.npz"
    train = str(root / "train-{000000..000003}.tar")
    gwf_eval(["--ref", train, "--extractor", "digits", "--save-stats", str(stats)])
    with np.load(stats) as s:
        assert int(s["num_samples"]) == 1437 and str(s["extractor"]) == "gwf-digits"
    by_stats = gwf_eval(["--samples", str(samples), "--ref", str(stats), "--weights", str(root / CLASSIFIER_FILE),
                         "--out", str(tmp_path / "a.json")])
    by_shards = gwf_eval(["--samples", str(samples), "--ref", train, "--out", str(tmp_path / "b.json")])
    assert by_stats["fid"] == pytest.approx(by_shards["fid"], rel=1e-7)  # float32 feature means
    with pytest.raises(ValueError, match="kid need reference images"):
        gwf_eval(["--samples", str(samples), "--ref", str(stats), "--weights", str(root / CLASSIFIER_FILE),
                  "--metrics", "kid"])
    with pytest.raises(ValueError, match="computed with 'gwf-digits'"):
        gwf_eval(["--samples", str(samples), "--ref", str(stats), "--extractor", "test-linear"])


def test_missing_inception_weights_name_the_file_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    samples = tmp_path / "s.npz"
    np.savez(samples, x=np.zeros((4, 3, 16, 16), np.float32))
    with pytest.raises(FileNotFoundError) as err:
        gwf_eval(["--samples", str(samples), "--ref", str(tmp_path)])
    message = str(err.value)
    assert "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_WEIGHTS_FILE in message
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILE) in message
    assert "--weights" in message
    with pytest.raises(FileNotFoundError, match="nothere.pth not found"):
        gwf_eval(["--samples", str(samples), "--ref", str(tmp_path), "--weights", str(tmp_path / "nothere.pth")])


def test_image_folder_and_adm_layout_samples(digits, tmp_path):
    # val digits as PNG files (the reference folder) and as ADM-style uint8 NHWC arr_0 (the samples): both reach the
    # extractor as the same uint8 images, so FID = 0; torch-fidelity reads the folder itself
    root, x_val, weights = digits
    uint8 = ((x_val + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # [N, 8, 8, 1]
    folder = tmp_path / "ref"
    folder.mkdir()
    for i, img in enumerate(uint8):
        Image.fromarray(np.repeat(img, 3, axis=2)).save(folder / f"{i:04d}.png")
    np.savez(tmp_path / "adm.npz", arr_0=np.repeat(uint8, 3, axis=3))
    out = gwf_eval(["--samples", str(tmp_path / "adm.npz"), "--ref", str(folder), "--extractor", "digits",
                    "--weights", weights, "--metrics", "fid,prc"])
    assert out["num_reference"] == len(x_val) and out["num_samples"] == len(x_val)
    assert abs(out["fid"]) < 1e-6 and out["precision"] == 1.0 and out["recall"] == 1.0
    # the uint8 round trip is close to the exact float path (quantization of k/8 - 1 to 1/255 steps)
    exact = compute_metrics(x_val, Reference(images=x_val[:180]), ["fid"], "digits", weights)["fid"]
    quantized = compute_metrics(torch.from_numpy(uint8).permute(0, 3, 1, 2), Reference(images=x_val[:180]), ["fid"],
                                "digits", weights)["fid"]
    assert quantized == pytest.approx(exact, rel=0.02)


def test_gwf_protocol_checks_counts_before_scoring(tmp_path):
    """--protocol gwf: 49,920 samples against 50,000 reference images, FID of Inception pool3; a wrong count or a
    conflicting option is refused before any Inception weight is needed (none exists offline)."""
    from gwf.evaluate import PROTOCOLS, check_protocol

    small = tmp_path / "small.npz"
    np.savez(small, x=np.zeros((8, 3, 32, 32), np.float32))
    stats = tmp_path / "stats.npz"
    np.savez(stats, mu=np.zeros(4), sigma=np.eye(4), extractor=np.array("inception-v3-compat"),
             num_samples=np.array(50_000))
    with pytest.raises(ValueError, match="49,920 samples, got 8.*--num-samples 49920"):
        gwf_eval(["--samples", str(small), "--ref", str(stats), "--protocol", "gwf"])
    with pytest.raises(SystemExit):  # argparse: the protocol sets the metrics itself
        gwf_eval(["--samples", str(small), "--ref", str(stats), "--protocol", "gwf", "--metrics", "kid"])
    p = PROTOCOLS["gwf"]
    assert (p["num_samples"], p["reference_images"], p["metrics"]) == (49_920, 50_000, ("fid",))
    name = "inception-v3-compat"
    assert check_protocol("gwf", 49_920, 50_000, ["fid"], name) is p
    assert check_protocol("gwf", 49_920, None, ["fid"], name) is p  # a folder's size is not counted
    with pytest.raises(ValueError, match="50,000 CIFAR-10 training images.*holds 10,000"):
        check_protocol("gwf", 49_920, 10_000, ["fid"], name)
    with pytest.raises(ValueError, match="inception extractor"):
        check_protocol("gwf", 49_920, 50_000, ["fid"], "gwf-digits")


def test_jit_statistics_keys_are_read(tmp_path):
    """JiT's jit_in256_stats.npz (the W-Flow FID reference) stores ref_mu / ref_sigma: read as mu / sigma."""
    from gwf.eval.fidelity import load_reference

    path = tmp_path / "jit_in256_stats.npz"
    np.savez(path, ref_mu=np.arange(3.0), ref_sigma=np.eye(3) * 2)
    ref = load_reference(str(path))
    assert ref.mu.tolist() == [0.0, 1.0, 2.0] and ref.sigma.tolist() == (np.eye(3) * 2).tolist()
    bad = tmp_path / "bad.npz"
    np.savez(bad, m=np.zeros(3))
    with pytest.raises(ValueError, match="ref_mu"):
        load_reference(str(bad))
