r"""``gwf-eval``: FID, Inception Score, KID and precision/recall of generated samples (gwf-sample's samples.npz, or
an ADM-style .npz with uint8 ``arr_0``) against a reference, through torch-fidelity. Writes a JSON next to the
samples.

    gwf-eval --samples runs/digits_wflow/default/generated/last_ema_n1000/samples.npz \
             --ref 'data/digits/train-{000000..000003}.tar' --extractor digits --metrics fid,kid,isc,prc
    gwf-eval --samples samples.npz --ref VIRTUAL_imagenet256_labeled.npz \
             --weights weights-inception-2015-12-05-6726825d.pth
    gwf-eval --ref path/to/cifar10_train_pngs --save-stats cifar10_train_inception.npz     # precompute statistics

``--extractor auto`` (default) uses the digit classifier for [1, 8, 8] samples and Inception otherwise.
``--protocol gwf`` checks and records the [GWF] paper's protocol (docs/evaluation.md): FID of Inception pool3
features of 49,920 samples against the 50,000 CIFAR-10 training images.
"""

from __future__ import annotations

import gwf  # first: makes torchvision importable next to a CPU torch

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from gwf.constants import DIGITS_SHAPE
from gwf.data.digits import CLASSIFIER_FILE
from gwf.eval.fidelity import (DIGITS_EXTRACTOR, INCEPTION_EXTRACTOR, METRICS, UINT8_EXTRACTORS, compute_metrics,
                               extractor_name, load_reference, load_samples, reference_statistics,
                               resolve_inception_weights)


# A paper's evaluation protocol: what gwf-eval checks before scoring, and records in the JSON.
PROTOCOLS = {
    # [GWF] eval.py generate_fake_dir: 50,000 // batch 256 = 195 batches = 49,920 EMA samples (eval mode) as PNGs;
    # dump_real_images_if_needed: every training image; pytorch-fid's pool3 FID (train.py calculate_fid_given_paths)
    "gwf": {"num_samples": 49_920, "reference_images": 50_000, "metrics": ("fid",), "extractor": "inception",
            "draw": "gwf-sample --ckpt <run>/checkpoints/last.ckpt --num-samples 49920",
            "reference": "the 50,000 CIFAR-10 training images (gwf-eval --ref <train folder> --save-stats ...)"},
}


def check_protocol(name: str, num_samples: int | None, reference_images: int | None, metrics: list[str],
                   extractor: str) -> dict:
    """The protocol ``name``'s settings, after checking the samples, the reference (where its size is known) and
    the metrics against it; a ValueError names what differs and how to match it."""
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol '{name}'; choose one of {sorted(PROTOCOLS)}")
    p = PROTOCOLS[name]
    if extractor != extractor_name(p["extractor"]):
        raise ValueError(f"the {name} protocol uses the {p['extractor']} extractor, not {extractor}: drop --extractor")
    if set(metrics) != set(p["metrics"]):
        raise ValueError(f"the {name} protocol reports {', '.join(p['metrics'])}; drop --metrics")
    if num_samples is not None and num_samples != p["num_samples"]:
        raise ValueError(f"the {name} protocol scores {p['num_samples']:,} samples, got {num_samples:,}: draw them "
                         f"with {p['draw']}")
    if reference_images is not None and reference_images != p["reference_images"]:
        raise ValueError(f"the {name} protocol compares with {p['reference']}; the reference holds "
                         f"{reference_images:,} images")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", help="samples .npz (gwf-sample's x, or uint8 NHWC arr_0)")
    p.add_argument("--ref", required=True, help="image folder | shard pattern (*.tar) | statistics .npz (mu, sigma)")
    p.add_argument("--metrics", default="fid", help=f"comma-separated, among {','.join(METRICS)} (default: fid)")
    p.add_argument("--extractor", default="auto",
                   help="auto | inception | digits | a registered torch-fidelity name (default: auto)")
    p.add_argument("--weights", help="extractor weights: Inception .pth, or the digits classifier.pt (default: "
                                     "$TORCH_HOME/hub/checkpoints/ for Inception; classifier.pt next to the --ref "
                                     "shards for digits)")
    p.add_argument("--download", action="store_true", help="let torch-fidelity download missing Inception weights")
    p.add_argument("--out", help="output JSON (default: <samples dir>/metrics_<extractor>.json)")
    p.add_argument("--save-stats", help="write the reference's FID statistics to this .npz and exit")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--kid-subset-size", type=int, default=1000)
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--isc-splits", type=int, default=10)
    p.add_argument("--seed", type=int, default=2020, help="torch-fidelity's rng_seed (KID subsets, IS splits)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--protocol", choices=sorted(PROTOCOLS),
                   help="a paper's protocol, checked and recorded: gwf = FID of 49,920 samples against the 50,000 "
                        "CIFAR-10 training images, Inception pool3 (sets --metrics fid --extractor inception)")
    args = p.parse_args(argv)
    if args.protocol:
        defaults = {"metrics": "fid", "extractor": "auto"}
        changed = [k for k, v in defaults.items() if getattr(args, k) != v]
        if changed:
            p.error(f"--protocol {args.protocol} sets --{' --'.join(changed)} itself; drop them")
        args.metrics, args.extractor = ",".join(PROTOCOLS[args.protocol]["metrics"]), \
            PROTOCOLS[args.protocol]["extractor"]
    if args.samples is None and args.save_stats is None:
        p.error("give --samples (to evaluate) or --save-stats (to precompute the reference's statistics)")
    return args


def choose_extractor(extractor: str, samples: torch.Tensor | None) -> str:
    if extractor != "auto":
        return extractor_name(extractor)
    digits = samples is not None and tuple(samples.shape[1:]) == DIGITS_SHAPE
    return DIGITS_EXTRACTOR if digits else INCEPTION_EXTRACTOR


def resolve_weights(name: str, weights: str | None, ref: str, download: bool) -> str | None:
    """Inception: --weights or torch-fidelity's cache (clear error when missing). Digits: --weights or the
    classifier.pt prepared next to the reference shards."""
    if name == INCEPTION_EXTRACTOR:
        return resolve_inception_weights(weights, download)
    if name == DIGITS_EXTRACTOR and weights is None:
        guess = Path(ref.split("{")[0]).parent / CLASSIFIER_FILE if ".tar" in ref else Path(ref) / CLASSIFIER_FILE
        if not guess.is_file():
            raise FileNotFoundError(f"the digits extractor needs the classifier of the prepare step: pass --weights "
                                    f"<data/digits>/{CLASSIFIER_FILE} (looked for {guess})")
        return str(guess)
    return weights


def run(argv=None) -> dict:
    """The command with its result returned (tests, scripts); ``main`` is the console entry point."""
    args = parse_args(argv)
    probe = None if args.samples is None else load_samples(args.samples, DIGITS_EXTRACTOR)  # float x if present
    name = choose_extractor(args.extractor, probe)
    samples = probe if probe is None or name not in UINT8_EXTRACTORS else load_samples(args.samples, name)
    reference = load_reference(args.ref)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    if args.protocol and not args.save_stats:  # before the weights: a wrong count is the cheaper news
        check_protocol(args.protocol, len(samples), reference.num_images, metrics, name)
    weights = resolve_weights(name, args.weights, args.ref, args.download)
    if args.save_stats:
        stats = reference_statistics(reference, name, weights, args.batch_size, args.device)
        np.savez(args.save_stats, **stats)
        print(f"wrote {args.save_stats}: {name} statistics of {int(stats['num_samples'])} reference images")
        return {}
    result = compute_metrics(samples, reference, metrics, name, weights, args.batch_size, args.device,
                             args.kid_subset_size, args.kid_subsets, args.isc_splits, args.seed, args.verbose)
    result.update(extractor=name, samples=str(args.samples), reference=str(args.ref),
                  weights=None if weights is None else str(weights), protocol=args.protocol)
    out = Path(args.out) if args.out else Path(args.samples).parent / f"metrics_{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


main = gwf.console_main(run)


if __name__ == "__main__":
    main()
