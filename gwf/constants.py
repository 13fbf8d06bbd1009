"""Every constant of the project has its home here."""

# SD-VAE latents of 256x256 ImageNet images (Rombach et al. 2022): shape and the scale applied once, at loading.
SD_VAE_LATENT_SCALE = 0.18215
SD_VAE_LATENT_SHAPE = (4, 32, 32)

DEFAULT_EPS_REL = 0.05  # W-Flow's relative eps R ([WF] official recipe; docs/conventions.md)
# W-Flow's self-transport estimators: q' = a second batch (the paper's), q' = q (the ablation), q' = q self-masked.
ESTIMATORS = ("two_batch", "single", "masked")
# W-Flow's transport cost: "sq" = ||x - y||^2 / 2 (the paper's and the recipes'), "l2" = ||x - y|| (the official
# code's use_quadratic_cost=False; [WF] Table 2c). Guidance: "velocity" ([WF] Eq. 16, the official use_new_cfg),
# "distribution" (unconditional reals as weighted targets of the self term, [WF] Table 2b), "none".
COSTS = ("sq", "l2")
GUIDANCE_MODES = ("velocity", "distribution", "none")
COMPILE_MODES = (False, True, "auto")  # model.compile, method.compile: auto compiles on CUDA only
# Floor of a field's RMS before normalization, relative to the per-coordinate distance scale (W-Flow and Drifting).
RMS_FLOOR_REL = 1e-4
# Drifting's temperatures, relative to the mean pairwise distance ([DRIFT] App. A.6).
DRIFT_TEMPERATURES = (0.2, 0.05, 0.02)
# Sinkhorn iterations of the own engine (as the official W-Flow code) and geomloss's eps-scaling factor.
DEFAULT_N_ITERS = 20
DEFAULT_GEOMLOSS_SCALING = 0.95

# Sample format shared by every shard set (digits, latents, image folders):
# "__key__" (str), TENSOR_KEY (a .npy array), LABEL_KEY (int class index).
TENSOR_KEY = "x.npy"
LABEL_KEY = "cls"

# scikit-learn digits: 8x8 images with intensities 0..16, stored as x / 8 - 1 in [-1, 1] (exact in fp16).
DIGITS_SHAPE = (1, 8, 8)
DIGITS_NUM_CLASSES = 10
DIGITS_MAX_INTENSITY = 16.0
DIGITS_DTYPE = "float16"  # x / 8 - 1 takes the values k/8 - 1, k = 0..16: exact in fp16

# Image folders (gwf-prepare images / latents): the files scanned, and how pixel shards store x in [-1, 1].
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm"})
PIXEL_DTYPE = "float16"  # x = pixel / 127.5 - 1; error < 2.5e-4, far below half a gray level: uint8 round-trips
# SD-VAE latent shards store, per sample, the posterior moments of the image and of its horizontal flip, unscaled:
# x.npy float16 [2 (view: original, flipped), 2 (moment: mean, std), *latent shape]. The loader draws
# z = SD_VAE_LATENT_SCALE * (mean + std * eps) from a view picked at random (gwf.data.latents.LatentMoments).
LATENT_MOMENTS_DTYPE = "float16"
SD_VAE_RESOLUTION = 256  # ImageNet 256x256 -> SD_VAE_LATENT_SHAPE (the VAE downsamples by 8)
# Default shard sizes of gwf-prepare: ~60 MB of 32x32 fp16 pixels, ~64 MB of 4x32x32 latent moments (32 KiB each).
IMAGES_SAMPLES_PER_SHARD = 10_000
LATENTS_SAMPLES_PER_SHARD = 2048

# Feature-space drift (gwf/features): std features are sqrt(var + FEATURE_STD_EPS), finite gradient at var = 0
# (the official MAE feature code's safe_std); MAE checkpoints written by gwf-train-encoder carry this format tag.
FEATURE_STD_EPS = 1e-6
MAE_CHECKPOINT_FORMAT = "gwf-mae-v1"
MAE_ENCODER_FORMAT = "gwf-mae-encoder-v1"  # encoder-only export (EMA weights): what training runs load
# A fresh start (ckpt_path=null) moves the earlier run of its directory into <run>/RUN_ARCHIVE/<n>/ (gwf.checkpointing);
# gwf-report leaves those out.
RUN_ARCHIVE = "archive"
