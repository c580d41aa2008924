"""data.preprocess: statistics from the training split only, the transforms, their state in checkpoints."""
import io

import pytest
import torch
from omegaconf import OmegaConf

from cvtrain import UserError
from cvtrain.config import DataConfig
from cvtrain.data import InMemoryLoader, Preprocessor, Split, channel_stats, load_data
from cvtrain.data.preprocess import METHODS
from cvtrain.tasks.knn import preprocessed
from cvtrain.tasks.train import run

EPS = 1e-8  # small: whitened training data then has the identity covariance up to rounding


def smooth_images(n=2000, seed=0) -> torch.Tensor:
    """uint8 (n, 3, 4, 4) = 48 dims: smooth images plus noise, so neighbouring pixels correlate."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.nn.functional.interpolate(torch.rand(n, 3, 2, 2, generator=gen), size=(4, 4),
                                             mode="bilinear", align_corners=False)
    x = 0.8 * coarse + 0.2 * torch.rand(n, 3, 4, 4, generator=gen)
    return (x * 255).round().to(torch.uint8)


@pytest.fixture(scope="module")
def images():
    return smooth_images()


def as_float(images):
    return images.float() / 255


def covariance(x):
    return torch.cov(x.flatten(1).double().T, correction=0)


def correlation_per_image(a, b):
    a, b = a.flatten(1), b.flatten(1)
    return torch.nn.functional.cosine_similarity(a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True), dim=1)


# --- each method on the training data ----------------------------------------------------------

def test_standardize_gives_zero_mean_unit_std_per_channel(images):
    out = Preprocessor("standardize").fit(images)(as_float(images))
    torch.testing.assert_close(out.mean((0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std((0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4, rtol=0)


def test_channel_mean_subtracts_the_channel_means_only(images):
    x = as_float(images)
    out = Preprocessor("channel_mean").fit(images)(x)
    torch.testing.assert_close(out.mean((0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std((0, 2, 3)), x.std((0, 2, 3)))  # scale untouched
    assert out.mean(0).abs().max() > 1e-3  # the per-pixel means are not all zero


def test_mean_image_gives_a_zero_mean_image(images):
    x = as_float(images)
    out = Preprocessor("mean_image").fit(images)(x)
    torch.testing.assert_close(out.mean(0), torch.zeros(3, 4, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(out, x - x.mean(0), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["pca_whiten", "zca_whiten"])
def test_whitening_gives_identity_covariance_on_the_training_data(images, method):
    x = as_float(images)
    assert (covariance(x) - torch.diag(covariance(x).diag())).abs().max() > 0.01  # correlated pixels
    out = Preprocessor(method, eps=EPS).fit(images)(x)
    assert out.shape == x.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.mean(0), torch.zeros(3, 4, 4), atol=1e-4, rtol=0)
    torch.testing.assert_close(covariance(out), torch.eye(48, dtype=torch.float64), atol=1e-4, rtol=0)


def test_whitening_eps_damps_the_low_variance_directions(images):
    cov = covariance(Preprocessor("zca_whiten", eps=1e-2).fit(images)(as_float(images)))
    eigvals = torch.linalg.eigvalsh(cov)  # s / (s + eps) for each eigenvalue s of the pixel covariance
    assert eigvals.max() < 1 and eigvals.min() < 0.5


def test_zca_stays_close_to_the_image_unlike_pca(images):
    x = as_float(images)
    centred = x - x.mean(0)
    zca = Preprocessor("zca_whiten", eps=EPS).fit(images)
    pca = Preprocessor("pca_whiten", eps=EPS).fit(images)
    assert correlation_per_image(zca(x), centred).mean() > 0.6  # still looks like the image
    assert correlation_per_image(pca(x), centred).mean().abs() < 0.2  # principal components, not pixels
    torch.testing.assert_close(zca.stats["matrix"], zca.stats["matrix"].T, atol=1e-3, rtol=1e-4)  # symmetric
    # of all whitening transforms ZCA moves the images least
    assert (zca(x) - centred).norm() < (pca(x) - centred).norm()


def test_pca_components_come_in_decreasing_variance(images):
    pca = Preprocessor("pca_whiten", eps=1e-2).fit(images)
    variance = pca(as_float(images)).flatten(1).var(0)  # s / (s + eps): decreasing with s
    assert torch.all(variance[:-1] >= variance[1:] - 1e-3)


def test_whitening_works_on_the_device_it_is_fitted_on(images):
    on_cpu = Preprocessor("zca_whiten").fit(images)
    again = Preprocessor("zca_whiten").fit(images, device=torch.device("cpu"))
    torch.testing.assert_close(on_cpu.stats["matrix"], again.stats["matrix"])
    assert all(v.device.type == "cpu" and v.dtype == torch.float32 for v in on_cpu.stats.values())


# --- state, errors -------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_state_round_trips_through_weights_only_load(images, method):
    fitted = Preprocessor(method, eps=1e-3).fit(images)
    buffer = io.BytesIO()
    torch.save({"data": {"preprocess": fitted.state_dict()}}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)["data"]["preprocess"]
    assert state["method"] == method
    restored = Preprocessor.from_state_dict(state)
    x = as_float(smooth_images(50, seed=1))  # unseen images get the same transform
    torch.testing.assert_close(restored(x), fitted(x), atol=0, rtol=0)


def test_unknown_method_and_bad_eps_are_user_errors():
    with pytest.raises(UserError, match="zca_whiten"):
        Preprocessor("whiten")
    with pytest.raises(UserError, match="whiten_eps"):
        Preprocessor("zca_whiten", eps=-1.0)
    with pytest.raises(UserError, match="data.preprocess"):
        load_data(OmegaConf.structured(DataConfig(name="synthetic", preprocess="zca")))


def test_whitening_refuses_large_images():
    big = torch.zeros(4, 3, 40, 40, dtype=torch.uint8)  # 4800 values per image
    with pytest.raises(UserError, match="data.image_size"):
        Preprocessor("pca_whiten").fit(big)


# --- in the data pipeline -----------------------------------------------------------------------

def synthetic(**fields):
    return OmegaConf.structured(DataConfig(**{"name": "synthetic", "image_size": 4, "num_samples": 600,
                                              "num_test": 50, **fields}))


@pytest.mark.parametrize("method", METHODS)
def test_load_data_fits_on_the_training_split_only(method):
    data = load_data(synthetic(preprocess=method, whiten_eps=1e-3))
    assert data.preprocess.method == method
    expected = Preprocessor(method, eps=1e-3).fit(data.train.images)
    assert data.preprocess.stats.keys() == expected.stats.keys()
    for key, value in expected.stats.items():
        torch.testing.assert_close(data.preprocess.stats[key], value)
    everything = torch.cat([data.train.images, data.val.images])
    assert not torch.allclose(Preprocessor(method, eps=1e-3).fit(everything).stats["mean"],
                              data.preprocess.stats["mean"])
    # per-channel mean/std stay available (checkpoints, scripts/benchmark.py)
    mean, std = channel_stats(data.train.images)
    torch.testing.assert_close(data.mean, mean)
    torch.testing.assert_close(data.std, std)


def test_default_is_standardize_with_the_channel_stats():
    data = load_data(synthetic())
    assert data.preprocess.method == "standardize"
    torch.testing.assert_close(data.preprocess.stats["mean"], data.mean)
    torch.testing.assert_close(data.preprocess.stats["std"], data.std)


def test_loader_applies_the_preprocessing_after_augmentation(images):
    split = Split(images[:40], torch.arange(40))
    zca = Preprocessor("zca_whiten", eps=1e-3).fit(images)
    mirror = lambda x, gen: x.flip(3)  # noqa: E731  (a stand-in augmentation)
    loader = InMemoryLoader(split, 16, device=torch.device("cpu"), preprocess=zca, augment=mirror)
    out = torch.cat([x for x, _ in loader])
    torch.testing.assert_close(out, zca(as_float(split.images).flip(3)))


def test_knn_features_use_the_preprocessing(images):
    split = Split(images[:30], torch.arange(30))
    pca = Preprocessor("pca_whiten", eps=1e-3).fit(images)
    x, y = preprocessed(split, pca, torch.device("cpu"), chunk=7)
    torch.testing.assert_close(x, pca(as_float(split.images)))
    assert torch.equal(y, split.labels)


def test_knn_run_with_zca_whitening(compose_config, tmp_path):
    cfg = compose_config(["model=knn", "model.cv_folds=0", "data=synthetic", "data.num_samples=300",
                          "data.image_size=4", "data.preprocess=zca_whiten", "trainer.device=cpu"])
    assert run(cfg, tmp_path) > 0.3  # the best val accuracy; chance: 0.1


def test_checkpoint_holds_the_preprocessing_state(run_cli, tmp_path):
    proc = run_cli(["data=synthetic", "data.num_samples=200", "data.image_size=4", "model=linear",
                    "trainer.epochs=1", "trainer.progress=false", "trainer.device=cpu",
                    "data.preprocess=zca_whiten", "data.whiten_eps=1e-3"], tmp_path)
    assert proc.returncode == 0, proc.stdout
    (ckpt,) = (tmp_path / "outputs").glob("*/*/checkpoints/last.pt")
    data = torch.load(ckpt, weights_only=True)["data"]
    assert data["mean"].shape == data["std"].shape == (3,)
    state = data["preprocess"]
    assert state["method"] == "zca_whiten" and state["eps"] == pytest.approx(1e-3)
    assert state["stats"]["mean"].shape == (3, 4, 4) and state["stats"]["matrix"].shape == (48, 48)
    # evaluation rebuilds exactly the transform the run trained with
    refit = load_data(synthetic(num_samples=200, preprocess="zca_whiten", whiten_eps=1e-3))
    x = as_float(refit.val.images)
    torch.testing.assert_close(Preprocessor.from_state_dict(state)(x), refit.preprocess(x))
