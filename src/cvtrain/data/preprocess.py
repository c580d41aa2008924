"""Preprocessing (`data.preprocess=`): statistics fitted on the training split only,
applied to every float batch on [0, 1] pixels (after augmentation).

    standardize    (x - mean_c) / std_c         per-channel mean and std (the default)
    channel_mean   x - mean_c                   per-channel mean subtraction
    mean_image     x - mean_image               the mean image (C, H, W) subtracted
    pca_whiten     U^T (x - mu) / sqrt(S + eps)            on the flattened pixels
    zca_whiten     U diag(1 / sqrt(S + eps)) U^T (x - mu)  on the flattened pixels

U, S are the eigenvectors and eigenvalues of the training pixels' covariance
(D x D for D = C*H*W, accumulated in float64 in chunks). Every statistic reads the
images in chunks, so a memory-mapped training split (data.in_memory=false) is never
converted to float as a whole: the whitening covariance is exact, from every image. Whitening keeps every
component (no dimensionality reduction) and reshapes the D outputs back to
(C, H, W), so convolutional models still take them; PCA's outputs are the
principal components in decreasing order of variance (no longer an image),
ZCA's stay close to the input image (it rotates back), with edges enhanced.
`eps` (data.whiten_eps, default 1e-2 on the [0, 1] pixel scale) keeps directions
of variance below eps from being amplified into noise; with eps -> 0 the
whitened training data has exactly the identity covariance.

The state (`state_dict()`) holds only strings, floats and tensors, so it goes into
checkpoints read with torch.load(weights_only=True); `Preprocessor.from_state_dict`
rebuilds the same transform for evaluation.
"""
import torch

from cvtrain import UserError

METHODS = ("standardize", "channel_mean", "mean_image", "pca_whiten", "zca_whiten")
MAX_WHITEN_DIMS = 4096  # the covariance is D x D: 3x32x32 = 3072 fits, 3x224x224 does not
CHUNK_BYTES = 256 * 2**20  # the statistics convert at most this many bytes of images to float64 at a time


def _rows(images, chunk: int) -> int:
    """Images per chunk: at most `chunk`, and at most CHUNK_BYTES of them in float64 (large images)."""
    return max(1, min(chunk, CHUNK_BYTES // (8 * max(1, images.shape[1:].numel()))))


def channel_stats(images: torch.Tensor, chunk: int = 10_000):
    """Per-channel mean and std of uint8 images (N, C, H, W), as floats on [0, 1]. Read in chunks: `images`
    may be memory-mapped (MappedImages), never in memory as a whole."""
    chunk = _rows(images, chunk)
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    for i in range(0, len(images), chunk):
        x = images[i:i + chunk].double().div_(255)
        total += x.sum((0, 2, 3))
        total_sq += (x * x).sum((0, 2, 3))
    count = images.numel() / images.shape[1]
    mean = total / count
    std = (total_sq / count - mean**2).clamp_min(1e-12).sqrt()
    return mean.float(), std.float()


def mean_image(images: torch.Tensor, chunk: int = 10_000, device=None) -> torch.Tensor:
    """The mean (C, H, W) of uint8 images, in float64 on [0, 1] (read in chunks, as channel_stats)."""
    chunk = _rows(images, chunk)
    total = torch.zeros(images.shape[1:], dtype=torch.float64, device=device)
    for i in range(0, len(images), chunk):
        total += images[i:i + chunk].to(device).double().sum(0)
    return total / (255 * len(images))


def pixel_covariance(images: torch.Tensor, mean: torch.Tensor, chunk: int = 2048, device=None) -> torch.Tensor:
    """The (D, D) covariance of the flattened uint8 images on [0, 1], float64, two-pass (centred chunks)."""
    flat_mean = mean.flatten().to(device, torch.float64)
    d = flat_mean.numel()
    cov = torch.zeros(d, d, dtype=torch.float64, device=device)
    for i in range(0, len(images), chunk):
        x = images[i:i + chunk].to(device).flatten(1).double().div_(255).sub_(flat_mean)
        cov.addmm_(x.T, x)
    return cov / len(images)


class Preprocessor:
    """The `data.preprocess` transform: `fit(train_images_uint8)`, then `__call__(x_float01)`.

    stats: "mean", "std" (C,) for standardize; "mean" (C,) for channel_mean;
    "mean" (C, H, W) for mean_image and whitening, plus "matrix" (D, D) for whitening:
    out = ((x - mean).flatten(1) @ matrix).view_as(x).
    """

    def __init__(self, method: str, eps: float = 1e-2, stats: dict | None = None):
        if method not in METHODS:
            raise UserError(f"data.preprocess='{method}' is unknown; choose one of {', '.join(METHODS)}")
        if method.endswith("_whiten") and not eps >= 0:
            raise UserError(f"data.whiten_eps={eps} must be >= 0 (it is added to the covariance eigenvalues)")
        self.method, self.eps = method, float(eps)
        self.stats = dict(stats or {})

    @classmethod
    def standardize(cls, mean: torch.Tensor, std: torch.Tensor) -> "Preprocessor":
        """Per-channel standardization with given statistics."""
        return cls("standardize", stats={"mean": mean, "std": std})

    @property
    def whitening(self) -> bool:
        return self.method.endswith("_whiten")

    def fit(self, images: torch.Tensor, device=None) -> "Preprocessor":
        """Fit on uint8 training images (N, C, H, W); the heavy work runs on `device` (default CPU),
        the statistics are kept on the CPU as float32."""
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"fit takes uint8 images (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if self.method in ("standardize", "channel_mean"):
            mean, std = channel_stats(images)
            self.stats = {"mean": mean, "std": std} if self.method == "standardize" else {"mean": mean}
            return self
        mean = mean_image(images, device=device)
        if not self.whitening:
            self.stats = {"mean": mean.float().cpu()}
            return self
        dims = mean.numel()
        if dims > MAX_WHITEN_DIMS:
            raise UserError(f"data.preprocess={self.method} needs the {dims}x{dims} pixel covariance of images "
                            f"{tuple(images.shape[1:])}; whitening takes at most {MAX_WHITEN_DIMS} values per "
                            "image. Use smaller images (data.image_size) or data.preprocess=standardize")
        eigvals, eigvecs = torch.linalg.eigh(pixel_covariance(images, mean, device=device))
        eigvals, eigvecs = eigvals.flip(0).clamp_min(0), eigvecs.flip(1)  # decreasing variance
        scale = (eigvals + self.eps).rsqrt()
        if not torch.isfinite(scale).all():
            raise UserError(f"data.preprocess={self.method}: the pixel covariance is singular; "
                            "set data.whiten_eps above 0")
        matrix = eigvecs * scale  # PCA: column k = u_k / sqrt(s_k + eps)
        if self.method == "zca_whiten":
            matrix = matrix @ eigvecs.T  # rotate back into pixel space
        self.stats = {"mean": mean.float().cpu(), "matrix": matrix.float().cpu()}
        return self

    def to(self, device) -> "Preprocessor":
        """A copy whose statistics (float32) live on `device`."""
        return Preprocessor(self.method, self.eps,
                            {k: v.to(device, torch.float32) for k, v in self.stats.items()})

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: float images (N, C, H, W) on [0, 1] -> preprocessed images of the same shape."""
        if not self.stats:
            raise RuntimeError("Preprocessor.fit() has not been called")
        mean = self.stats["mean"]
        if mean.dim() == 1:
            mean = mean.view(1, -1, 1, 1)
        if self.method == "standardize":
            return (x - mean) / self.stats["std"].view(1, -1, 1, 1)
        if not self.whitening:
            return x - mean
        return ((x - mean).flatten(1) @ self.stats["matrix"]).view_as(x)

    def state_dict(self) -> dict:
        """Plain strings, floats and CPU tensors: safe for torch.load(weights_only=True)."""
        return {"method": self.method, "eps": self.eps,
                "stats": {k: v.detach().cpu() for k, v in self.stats.items()}}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Preprocessor":
        return cls(state["method"], state["eps"], dict(state["stats"]))

    def __repr__(self) -> str:
        eps = f", eps={self.eps:g}" if self.whitening else ""
        return f"Preprocessor({self.method}{eps})"
