"""Every constant of the project has its home here."""

# SD-VAE latents of 256x256 ImageNet images (Rombach et al. 2022): shape and the scale applied once, at loading.
SD_VAE_LATENT_SCALE = 0.18215
SD_VAE_LATENT_SHAPE = (4, 32, 32)

# W-Flow's relative entropic regularization: eps = R * mean squared pairwise distance ([WF] official recipe,
# robust over 0.025-0.075).
DEFAULT_EPS_REL = 0.05
# Sinkhorn iterations of the own engine (the official W-Flow code uses 20) and geomloss's eps-scaling factor.
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
