"""torch-fidelity glue: FID, Inception Score, KID and precision/recall of generated samples against a reference
(image folder, shards, or precomputed statistics), with torch-fidelity's Inception or the prepare step's digit
classifier (registered as a torch-fidelity extractor, so the digits FD runs through FID's code). Conventions:
docs/evaluation.md. We pass Datasets (torch-fidelity's generative-model input uses the removed ``np.int``),
``cache=False`` (no writes to ~/.cache) and ``save_cpu_ram=True`` (no worker processes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch_fidelity
from torch import Tensor
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor
from torch_fidelity.utils import create_feature_extractor, extract_featuresdict_from_input_id, glob_samples_paths

from gwf.data.digits import load_classifier
from gwf.viz import to_uint8

DIGITS_EXTRACTOR = "gwf-digits"
INCEPTION_EXTRACTOR = "inception-v3-compat"
# --extractor names -> torch-fidelity registry names (any other registered name is accepted as is)
EXTRACTORS = {"inception": INCEPTION_EXTRACTOR, "digits": DIGITS_EXTRACTOR}
# torch-fidelity's own extractors read uint8 RGB images [B, 3, H, W]; ours read float images in [-1, 1]
UINT8_EXTRACTORS = frozenset(FEATURE_EXTRACTORS_REGISTRY)
METRICS = ("fid", "isc", "kid", "prc")
INCEPTION_WEIGHTS_FILE = URL_INCEPTION_V3.rsplit("/", 1)[-1]
# torch-fidelity result keys -> ours
RESULT_KEYS = {
    torch_fidelity.KEY_METRIC_FID: "fid", torch_fidelity.KEY_METRIC_ISC_MEAN: "isc_mean",
    torch_fidelity.KEY_METRIC_ISC_STD: "isc_std", torch_fidelity.KEY_METRIC_KID_MEAN: "kid_mean",
    torch_fidelity.KEY_METRIC_KID_STD: "kid_std", torch_fidelity.KEY_METRIC_PRECISION: "precision",
    torch_fidelity.KEY_METRIC_RECALL: "recall", torch_fidelity.KEY_METRIC_F_SCORE: "f_score",
}


# ---------------------------------------------------------------------------------------------- digits extractor
class DigitsFeatureExtractor(FeatureExtractorBase):
    """The prepare step's digit classifier as a torch-fidelity extractor. Features: "64" (penultimate, for FID, KID,
    precision/recall) and "logits" (for the Inception Score analogue over the 10 digits). Weights:
    ``feature_extractor_weights_path`` = ``classifier.pt``. Input: float [B, 1, 8, 8] in [-1, 1] (exact), or uint8
    [B, C, 8, 8] images (torch-fidelity's image folders; RGB is averaged to grey)."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise ValueError("the digits extractor needs feature_extractor_weights_path = <data/digits>/classifier.pt")
        self.classifier = load_classifier(feature_extractor_weights_path)
        self.requires_grad_(False)

    @staticmethod
    def get_provided_features_list():
        return "64", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "64", "kid": "64", "prc": "64"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 1, 8, 8)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        if x.dtype == torch.uint8:  # image files: [0, 255] -> [-1, 1], grey
            x = x.float().mean(1, keepdim=True) / 127.5 - 1.0
        if tuple(x.shape[1:]) != (1, 8, 8):
            raise ValueError(f"the digits extractor reads [B, 1, 8, 8] images, got {list(x.shape)}")
        feats = self.classifier.features(x.float())
        out = {"64": feats, "logits": self.classifier.head(feats)}
        return tuple(out[name].float() for name in self.features_list)


def register_extractors() -> None:
    """Idempotent: torch-fidelity refuses a second registration of a name."""
    if DIGITS_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(DIGITS_EXTRACTOR, DigitsFeatureExtractor)


register_extractors()


def extractor_name(extractor: str) -> str:
    name = EXTRACTORS.get(extractor, extractor)
    if name not in FEATURE_EXTRACTORS_REGISTRY:
        raise ValueError(f"unknown feature extractor '{extractor}'; choose {sorted(EXTRACTORS)} or a name registered "
                         f"with torch_fidelity.register_feature_extractor ({sorted(FEATURE_EXTRACTORS_REGISTRY)})")
    return name


# ---------------------------------------------------------------------------------------------- weights
def default_inception_weights() -> Path:
    """Where torch-fidelity looks for (and downloads) its Inception weights: $TORCH_HOME/hub/checkpoints/."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE


def resolve_inception_weights(weights: str | Path | None, download: bool = False) -> str:
    """The Inception weights file to use, or a FileNotFoundError that names the file to fetch and where to put it.
    ``download`` lets torch-fidelity fetch it (needs internet)."""
    if weights is not None:
        if not Path(weights).is_file():
            raise FileNotFoundError(f"Inception weights {weights} not found (--weights). The file is "
                                    f"{INCEPTION_WEIGHTS_FILE} from {URL_INCEPTION_V3}")
        return str(weights)
    path = default_inception_weights()
    if path.is_file():
        return str(path)
    if download:
        torch.hub.load_state_dict_from_url(URL_INCEPTION_V3, progress=False)  # into path
        return str(path)
    raise FileNotFoundError(
        f"torch-fidelity's Inception weights are not at {path} and this run does not download them. On a machine "
        f"with internet fetch {URL_INCEPTION_V3} (e.g. `curl -L -o {INCEPTION_WEIGHTS_FILE} {URL_INCEPTION_V3}`), "
        f"then either copy it to {path} (or $TORCH_HOME/hub/checkpoints/) or pass --weights PATH; "
        f"or rerun with --download where internet is available."
    )


# ---------------------------------------------------------------------------------------------- inputs
class TensorImages(Dataset):
    """In-memory images for torch-fidelity: ``__getitem__`` returns a bare tensor (what its dataset input needs)."""

    def __init__(self, x: Tensor):
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> Tensor:
        return self.x[i]


def to_uint8_rgb(x: Tensor) -> Tensor:
    """float [N, C, H, W] in [-1, 1] (C = 1 or 3) -> uint8 [N, 3, H, W], quantized as a PNG writer would."""
    if x.dtype == torch.uint8:
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must be [N, 1 or 3, H, W], got {list(x.shape)}; SD-VAE latents must be decoded "
                         "first (gwf-sample --vae PATH)")
    x = to_uint8(x)
    return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x


def images_for(x: Tensor, name: str) -> Tensor:
    """The representation extractor ``name`` reads: uint8 RGB for torch-fidelity's own, float otherwise."""
    if name in UINT8_EXTRACTORS:
        return to_uint8_rgb(x)
    return x if x.dtype == torch.uint8 else x.float()


def nhwc_uint8_to_nchw(a: np.ndarray) -> Tensor:
    """ADM-style uint8 [N, H, W, C] -> uint8 [N, C, H, W]."""
    return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).contiguous()


def load_samples(path: str | Path, name: str) -> Tensor:
    """Generated samples from an .npz: gwf-sample's ``x`` (float [N, C, H, W] in [-1, 1]) or ADM-style ``arr_0``
    (uint8 [N, H, W, C]). Float-reading extractors take ``x`` (exact); uint8 ones take ``arr_0`` when present."""
    with np.load(path) as f:
        keys = set(f.files)
        if "x" in keys and (name not in UINT8_EXTRACTORS or "arr_0" not in keys):
            return torch.from_numpy(f["x"])
        if "arr_0" in keys:
            return nhwc_uint8_to_nchw(f["arr_0"])
    raise ValueError(f"{path} holds {sorted(keys)}; expected 'x' (gwf-sample) or 'arr_0' (uint8 NHWC images)")


@dataclass
class Reference:
    """What generated samples are compared with: images (a tensor [N, C, H, W] or an image folder path) and/or
    precomputed FID statistics mu [F], sigma [F, F] (which, when given, define the FID)."""

    images: Tensor | str | None = None
    mu: np.ndarray | None = None
    sigma: np.ndarray | None = None
    extractor: str | None = None  # the extractor the statistics were computed with, when known
    count: int | None = None  # images the statistics were computed from, when the .npz records it

    @property
    def num_images(self) -> int | None:
        """The reference's size where known: its images, or the count its statistics record (None for a folder)."""
        return len(self.images) if isinstance(self.images, Tensor) else self.count


def load_reference(ref: str | Path) -> Reference:
    """An image folder, a shard pattern ('data/digits/train-{000000..000003}.tar'), or a statistics .npz with
    ``mu`` and ``sigma`` (gwf-eval --save-stats, or the ADM reference batches, whose ``arr_0`` images are used
    for KID and precision/recall)."""
    ref = str(ref)
    if os.path.isdir(ref):
        return Reference(images=ref)
    if ref.endswith(".npz"):
        if not os.path.isfile(ref):
            raise FileNotFoundError(f"reference statistics {ref} not found")
        with np.load(ref) as f:
            # mu/sigma (gwf-eval --save-stats, ADM reference batches) or ref_mu/ref_sigma (JiT's jit_in256_stats.npz,
            # the W-Flow evaluation's reference)
            keys = next((k for k in (("mu", "sigma"), ("ref_mu", "ref_sigma")) if set(k) <= set(f.files)), None)
            if keys is None:
                raise ValueError(f"{ref} holds {f.files}; a statistics reference needs 'mu' and 'sigma' (or JiT's "
                                 "'ref_mu' and 'ref_sigma')")
            images = nhwc_uint8_to_nchw(f["arr_0"]) if "arr_0" in f.files else None
            extractor = str(f["extractor"]) if "extractor" in f.files else None
            count = int(f["num_samples"]) if "num_samples" in f.files else None
            return Reference(images, f[keys[0]].astype(np.float64), f[keys[1]].astype(np.float64), extractor, count)
    if ".tar" in ref:
        from gwf.data.shards import collate, read_samples

        samples = list(read_samples(ref))
        if not samples:
            raise ValueError(f"the shards {ref} hold no samples")
        return Reference(images=collate(samples)[0].float())
    raise ValueError(f"--ref {ref}: expected an image folder, a shard pattern (*.tar, braces allowed) or a "
                     "statistics .npz (mu, sigma)")


# ---------------------------------------------------------------------------------------------- metrics
def _fidelity_kwargs(name: str, weights: str | None, batch_size: int, device: str, verbose: bool, seed: int) -> dict:
    return dict(feature_extractor=name, feature_extractor_weights_path=weights, batch_size=batch_size,
                cuda=device.startswith("cuda"), cache=False, save_cpu_ram=True, verbose=verbose, rng_seed=seed,
                samples_find_deep=True)


def extract_features(x: Tensor | str, name: str, layer: str | None = None, **kwargs) -> Tensor:
    """Features [N, F] (float32) of images ``x`` (tensor or folder) from torch-fidelity's extractor ``name``."""
    cls = FEATURE_EXTRACTORS_REGISTRY[name]
    layer = layer or cls.get_default_feature_layer_for_metric("fid")
    kwargs = {**kwargs, "feature_extractor": name}
    extractor = create_feature_extractor(name, [layer], **kwargs)
    inputs = x if isinstance(x, str) else TensorImages(images_for(x, name))
    return extract_featuresdict_from_input_id(1, extractor, input1=inputs, **kwargs)[layer]


def statistics(feats: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """FID statistics exactly as torch-fidelity computes them (so --ref stats and --ref images agree), returned
    in float64: mu [F], sigma [F, F] (unbiased covariance)."""
    stats = fid_features_to_statistics(feats.cpu())
    return stats["mu"].astype(np.float64), stats["sigma"].astype(np.float64)


def compute_metrics(samples: Tensor, reference: Reference, metrics=("fid",), extractor: str = "inception",
                    weights: str | None = None, batch_size: int = 64, device: str = "cpu",
                    kid_subset_size: int = 1000, kid_subsets: int = 100, isc_splits: int = 10, seed: int = 2020,
                    verbose: bool = False) -> dict:
    """Metrics of ``samples`` (float [N, C, H, W] in [-1, 1], or uint8) against ``reference``.

    Returns {"fid", "isc_mean", "isc_std", "kid_mean", "kid_std", "precision", "recall", "f_score"} (those asked
    for) plus "num_samples" and "num_reference". ``kid_subset_size`` is capped at the smaller set size.
    """
    metrics = tuple(metrics)
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; choose among {', '.join(METRICS)}")
    name = extractor_name(extractor)
    if reference.extractor is not None and reference.extractor != name:
        raise ValueError(f"the reference statistics were computed with '{reference.extractor}', not '{name}': "
                         f"use --extractor {reference.extractor} or recompute them (gwf-eval --save-stats)")
    pairwise = [m for m in metrics if m in ("kid", "prc") or (m == "fid" and reference.mu is None)]
    if pairwise and reference.images is None:
        raise ValueError(f"{', '.join(pairwise)} need reference images; the reference holds only mu/sigma statistics")
    kwargs = _fidelity_kwargs(name, weights, batch_size, device, verbose, seed)
    gen = TensorImages(images_for(samples, name))
    out: dict = {"num_samples": len(gen)}
    if pairwise or "isc" in metrics:
        ref_input = reference.images
        if isinstance(ref_input, Tensor):
            ref_input = TensorImages(images_for(ref_input, name))
        sizes = [len(gen)] + ([len(ref_input)] if isinstance(ref_input, Dataset) else [])
        result = torch_fidelity.calculate_metrics(
            input1=gen, input2=ref_input if pairwise else None, isc="isc" in metrics,
            fid="fid" in pairwise, kid="kid" in metrics, prc="prc" in metrics,
            kid_subset_size=min(kid_subset_size, *sizes), kid_subsets=kid_subsets, isc_splits=isc_splits, **kwargs)
        out.update({RESULT_KEYS[k]: float(v) for k, v in result.items() if k in RESULT_KEYS})
        if isinstance(ref_input, Dataset):
            out["num_reference"] = len(ref_input)
        elif pairwise:  # an image folder, read the way torch-fidelity reads it
            exts = kwargs.get("samples_find_ext", "png,jpg,jpeg")
            out["num_reference"] = len(glob_samples_paths(ref_input, True, exts, verbose=False))
    if "fid" in metrics and reference.mu is not None:  # precomputed statistics define the FID
        mu, sigma = statistics(extract_features(samples, name, **kwargs))
        if mu.shape != reference.mu.shape:
            raise ValueError(f"reference statistics have {reference.mu.shape[0]} features, the '{name}' extractor "
                             f"{mu.shape[0]}: they come from another extractor")
        out["fid"] = float(fid_statistics_to_metric({"mu": mu, "sigma": sigma},
                                                    {"mu": reference.mu, "sigma": reference.sigma}, verbose)
                           [torch_fidelity.KEY_METRIC_FID])
    return out


def reference_statistics(reference: Reference, extractor: str = "inception", weights: str | None = None,
                         batch_size: int = 64, device: str = "cpu") -> dict:
    """{"mu", "sigma", "extractor", "num_samples"} of a reference's images: an .npz for later --ref use."""
    if reference.images is None:
        raise ValueError("the reference holds no images to compute statistics from")
    name = extractor_name(extractor)
    feats = extract_features(reference.images, name,
                             **_fidelity_kwargs(name, weights, batch_size, device, verbose=False, seed=0))
    mu, sigma = statistics(feats)
    return {"mu": mu, "sigma": sigma, "extractor": np.array(name), "num_samples": np.array(len(feats))}


# ---------------------------------------------------------------------------------------------- in training
class FidelityEvaluator:
    """In-training FID (conf/eval/images.yaml, latents.yaml): ``evaluate(x, labels) -> {"fid": ...}`` against
    precomputed reference statistics ``ref_stats`` (gwf-eval --ref <train images> --save-stats FILE), with
    torch-fidelity's Inception (``weights``: see resolve_inception_weights). Latent samples are decoded with the VAE
    at ``vae`` first. ``ref_stats`` null: no metric (the callback still draws the pictures it can). ``device``:
    where decoding and Inception run; "auto" = the samples' device, i.e. the training device (a GPU run evaluates
    on its GPU, in batches of ``batch_size``, instead of decoding thousands of latents on rank 0's CPU)."""

    def __init__(self, ref_stats: str | None = None, weights: str | None = None, vae: str | None = None,
                 extractor: str = "inception", batch_size: int = 64, device: str = "auto"):
        self.name = extractor_name(extractor)
        self.reference = load_reference(ref_stats) if ref_stats else None
        self.weights = resolve_inception_weights(weights) if self.reference and self.name == INCEPTION_EXTRACTOR \
            else weights  # fail at the start of training, not at the first evaluation
        self.decoder = None
        if vae:
            from gwf.data.latents import LatentDecoder  # lazy: diffusers

            self.decoder = LatentDecoder(vae, device="cpu" if device == "auto" else device)
        self.batch_size, self.device = batch_size, device

    def device_for(self, x: Tensor) -> torch.device:
        """Where the evaluation of samples ``x`` runs ("auto": where the samples are)."""
        return x.device if self.device == "auto" else torch.device(self.device)

    def to_images(self, x: Tensor) -> Tensor | None:
        """x [N, C, H, W] -> images in [-1, 1] (decoded when latents and a VAE is set, on ``device_for(x)``), or
        None (not drawable)."""
        if self.decoder is not None:
            return self.decoder.to(self.device_for(x)).decode(x)
        return x if x.ndim == 4 and x.shape[1] in (1, 3) else None

    def evaluate(self, x: Tensor, labels: Tensor | None = None) -> dict:
        if self.reference is None:
            return {}
        device = self.device_for(x)
        images = self.to_images(x.detach().float())
        if images is None:
            raise ValueError(f"samples {list(x.shape)} are not images: set eval.evaluator.vae to decode latents")
        return {"fid": compute_metrics(images.cpu(), self.reference, ["fid"], self.name, self.weights,
                                       self.batch_size, str(device))["fid"]}
