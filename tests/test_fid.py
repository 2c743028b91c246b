"""FID: Fréchet distance math, the metric's DDP sums, the real-statistics cache, feature
extractors (tiny, classifier, Inception weights handling), the FIDEvaluator without Lightning and
the FIDCallback in a Trainer."""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
import types
import urllib.error
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from torch.utils.data import TensorDataset

from diffsweep.denoiser import Denoiser
from diffsweep.metrics import real_stats
from diffsweep.metrics.evaluator import RANK_SEED_STRIDE, FIDEvaluator, local_count, resolve_pairs
from diffsweep.metrics.extractors import classifier as classifier_module
from diffsweep.metrics.extractors import inception as inception_module
from diffsweep.metrics.extractors.base import FeatureExtractor, extract_features
from diffsweep.metrics.extractors.classifier import ClassifierFeatureExtractor
from diffsweep.metrics.extractors.inception import (
    INCEPTION_ENV,
    INCEPTION_FILENAME,
    INCEPTION_URL,
    InceptionFeatureExtractor,
    InceptionWeightsError,
)
from diffsweep.metrics.extractors.tiny import TinyFeatureExtractor
from diffsweep.metrics.frechet import GaussianStats, frechet_distance
from diffsweep.metrics.metric import FrechetDistance
from diffsweep.metrics.real_stats import load_or_compute_real_stats
from diffsweep.samplers import Sampler
from diffsweep.schedules import DiscreteVPSchedule

pytestmark = pytest.mark.usefixtures("single_thread")

REPO = Path(__file__).resolve().parents[1]
METRICS_CONFIGS = REPO / "configs" / "metrics"


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
class ToyDataModule:
    """Implements the parts of the DataModule contract FID uses (INTERFACES.md)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None = None, tag: str = "toy",
                 val: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.images = images
        self.labels = labels if labels is not None else torch.full((len(images),), -1)
        self.tag = tag
        self.val = val
        self.image_shape = tuple(images.shape[1:])
        self.channels, self.resolution = self.image_shape[0], self.image_shape[-1]
        self.real_image_calls: list[dict] = []

    def fingerprint(self, split: str) -> str:
        return f"{self.tag}-{split}-{self.resolution}-{len(self.images)}"

    def dataset(self, split: str):
        if split == "val":
            if self.val is None:
                raise ValueError("no val split")
            return TensorDataset(*self.val)
        return TensorDataset(self.images, self.labels)

    def real_images(self, split: str, max_count: int | None = None, batch_size: int | None = None,
                    rank: int = 0, world_size: int = 1):
        self.real_image_calls.append({"split": split, "max_count": max_count,
                                      "batch_size": batch_size, "rank": rank,
                                      "world_size": world_size})
        x = self.images if max_count is None else self.images[:max_count]
        x = x[rank::world_size]
        step = batch_size or 64
        for i in range(0, len(x), step):
            yield x[i:i + step]

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return x


class CountingExtractor(FeatureExtractor):
    """Tiny extractor that counts its calls."""

    name = "tiny"

    def __init__(self, dim: int = 16):
        super().__init__()
        self.inner = TinyFeatureExtractor(dim=dim)
        self.num_features = dim
        self.calls = 0

    @property
    def identity(self) -> str:
        return self.inner.identity

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


class ToyNet(torch.nn.Module):
    """x0-prediction net: ``tanh(w + 0.5 x_in)``, so samples depend on the weight ``w`` and on
    the noise."""

    def __init__(self, shape=(1, 8, 8)):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(*shape))

    def forward(self, x, c_noise, class_labels=None):
        return torch.tanh(self.w + 0.5 * x)


def _toy_denoiser(shape=(1, 8, 8)) -> Denoiser:
    return Denoiser(ToyNet(shape), DiscreteVPSchedule(), prediction_type="sample")


def _images(n=200, seed=0, shape=(1, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *shape, generator=g) * 2 - 1


def _scipy_fid(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _random_spd(d, rng):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


@pytest.fixture
def record_generate(monkeypatch):
    """Spy on the evaluator's ``generate``: one record per call (weight mean, count, seed...)."""
    from diffsweep.metrics import evaluator as evaluator_module

    calls: list[dict] = []
    real_generate = evaluator_module.generate

    def spy(denoiser, sampler, num_samples, image_shape, **kwargs):
        net = denoiser.net
        calls.append({"w": float(net.w.detach().mean()) if hasattr(net, "w") else None,
                      "n": num_samples, "sampler": sampler.name, "shape": tuple(image_shape),
                      "seed": kwargs["generator"].initial_seed(), "net": net,
                      **{k: v for k, v in kwargs.items() if k != "generator"}})
        return real_generate(denoiser, sampler, num_samples, image_shape, **kwargs)

    monkeypatch.setattr(evaluator_module, "generate", spy)
    return calls


# --------------------------------------------------------------------------------------------
# math
# --------------------------------------------------------------------------------------------
def test_frechet_distance_closed_form_and_scipy():
    rng = np.random.default_rng(0)
    d = 12
    # diagonal covariances: FID = |mu1-mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    a, b = rng.uniform(0.2, 3, d), rng.uniform(0.2, 3, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    exact = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    got = float(frechet_distance(torch.tensor(mu1), torch.diag(torch.tensor(a)),
                                 torch.tensor(mu2), torch.diag(torch.tensor(b))))
    assert got == pytest.approx(exact, rel=1e-10, abs=1e-10)
    # general SPD: agrees with scipy's sqrtm formula
    s1, s2 = _random_spd(d, rng), _random_spd(d, rng)
    got = float(frechet_distance(torch.tensor(mu1), torch.tensor(s1), torch.tensor(mu2),
                                 torch.tensor(s2)))
    assert got == pytest.approx(_scipy_fid(mu1, s1, mu2, s2), rel=1e-8)
    # identical distributions: 0 (also for a singular covariance)
    s3 = np.diag([1.0, 2.0, 0.0, 0.0])
    z = frechet_distance(torch.zeros(4), torch.tensor(s3), torch.zeros(4), torch.tensor(s3))
    assert abs(float(z)) < 1e-10
    assert z.dtype == torch.float64


def test_analytic_gaussian_frechet_distance_uses_the_shared_formula():
    """analytic.gaussian_frechet_distance == frechet_distance of the sample moments (one FID
    formula in the package), and it still sees scale."""
    from diffsweep.analytic import gaussian_frechet_distance

    g = torch.Generator().manual_seed(3)
    mean = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    root = torch.randn(3, 3, generator=g, dtype=torch.float64)
    cov = root @ root.T + 0.1 * torch.eye(3, dtype=torch.float64)
    noise = torch.randn(5000, 3, generator=g, dtype=torch.float64)
    samples = mean + noise @ torch.linalg.cholesky(cov).T
    stats = GaussianStats.from_features(samples)
    expected = float(frechet_distance(mean, cov, stats.mean, stats.cov))
    assert gaussian_frechet_distance(samples, mean, cov) == pytest.approx(expected, rel=1e-10)
    assert gaussian_frechet_distance(samples, mean, cov) < 0.02
    assert gaussian_frechet_distance(1.5 * samples, mean, cov) > 0.5
    source = (REPO / "src" / "diffsweep" / "analytic.py").read_text()
    assert "linalg.eigh" not in source and "_sqrtm_psd" not in source


def test_fid_of_sampled_shifted_gaussians():
    """Sample-based FID of N(0, I) vs N(delta*1, I) -> d*delta^2; of a set with itself -> 0."""
    g = torch.Generator().manual_seed(0)
    d, n, delta = 8, 20000, 0.5
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(n, d, generator=g, dtype=torch.float64) + delta
    m = FrechetDistance(d, GaussianStats.from_features(x))
    m.update(y)
    assert float(m.compute()) == pytest.approx(d * delta ** 2, abs=0.02)
    m2 = FrechetDistance(d, GaussianStats.from_features(x))
    m2.update(x[: n // 2])
    m2.update(x[n // 2:])
    assert abs(float(m2.compute())) < 1e-8


def test_metric_states_sum_like_ddp():
    """Two ranks' sums merged == one instance over all data (what dist_reduce_fx='sum' does)."""
    feats = torch.randn(300, 6, dtype=torch.float64)
    real = GaussianStats.from_features(torch.randn(500, 6, dtype=torch.float64) * 1.3 + 0.2)
    whole = FrechetDistance(6, real)
    whole.update(feats)
    r0, r1 = FrechetDistance(6, real), FrechetDistance(6, real)
    r0.update(feats[:170])
    r1.update(feats[170:])
    for name in ("fake_sum", "fake_outer", "fake_count"):
        assert r0._reductions[name] is not None  # has a reduction (sum) -> synced under DDP
    r0.merge_state(r1)
    assert int(r0.fake_count) == 300
    torch.testing.assert_close(r0.fake_sum, whole.fake_sum)
    torch.testing.assert_close(r0.fake_outer, whole.fake_outer)
    assert float(r0.compute()) == pytest.approx(float(whole.compute()), rel=1e-12)
    with pytest.raises(ValueError, match=r"\(B, 6\)"):
        whole.update(torch.zeros(3, 5))
    with pytest.raises(RuntimeError, match="set_real"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchmetrics: compute before update
        FrechetDistance(6).compute()


def _ddp_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(100, 4, generator=g, dtype=torch.float64)
    real = GaussianStats.from_features(torch.randn(200, 4, generator=g, dtype=torch.float64) + 1)
    m = FrechetDistance(4, real)
    m.update(feats[rank::world])
    value = m.compute()  # every rank calls compute (it all-reduces)
    torch.save({"value": value, "count": m.fake_count}, os.path.join(out_dir, f"r{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow  # 2 processes: ~5 s idle, ~20 s on a loaded 2-core machine
def test_metric_syncs_under_gloo(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(100, 4, generator=g, dtype=torch.float64)
    real = GaussianStats.from_features(torch.randn(200, 4, generator=g, dtype=torch.float64) + 1)
    single = FrechetDistance(4, real)
    single.update(feats)
    expected = float(single.compute())
    for r in range(2):
        out = torch.load(tmp_path / f"r{r}.pt")
        assert float(out["value"]) == pytest.approx(expected, rel=1e-10)


# --------------------------------------------------------------------------------------------
# cache
# --------------------------------------------------------------------------------------------
def test_real_stats_cached_once_and_reused(tmp_path):
    dm = ToyDataModule(_images(150))
    ex = CountingExtractor()
    s1 = load_or_compute_real_stats(dm, ex, tmp_path, "train", batch_size=50)
    assert ex.calls > 0 and s1.count == 150
    assert dm.real_image_calls == [{"split": "train", "max_count": None, "batch_size": 50,
                                    "rank": 0, "world_size": 1}]
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz"
    assert "tiny" in files[0].name and "train" in files[0].name
    # the file name is the same digest as before the refactor: existing caches stay valid
    key = real_stats.real_stats_key(dm, "train", ex, None)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    assert files[0].name == f"real-tiny-train-{digest}.npz"
    with np.load(files[0]) as z:  # the fingerprint is stored inside
        assert dm.fingerprint("train") in str(z["key"])
    ex.calls = 0
    s2 = load_or_compute_real_stats(dm, ex, tmp_path, "train", batch_size=50)
    assert ex.calls == 0, "cached statistics must not run the extractor again"
    torch.testing.assert_close(s1.mean, s2.mean)
    torch.testing.assert_close(s1.cov, s2.cov)
    # stats agree with a direct computation
    direct = GaussianStats.from_features(ex.inner(dm.images).double())
    torch.testing.assert_close(s2.cov, direct.cov)


def test_real_stats_recomputed_on_new_fingerprint_or_max_count(tmp_path):
    ex = CountingExtractor()
    load_or_compute_real_stats(ToyDataModule(_images(100), tag="a"), ex, tmp_path)
    ex.calls = 0
    load_or_compute_real_stats(ToyDataModule(_images(100, seed=1), tag="b"), ex, tmp_path)
    assert ex.calls > 0
    ex.calls = 0
    s = load_or_compute_real_stats(ToyDataModule(_images(100), tag="a"), ex, tmp_path, max_count=50)
    assert ex.calls > 0 and s.count == 50
    ex.calls = 0  # another extractor identity -> another entry
    other = CountingExtractor(dim=8)
    load_or_compute_real_stats(ToyDataModule(_images(100), tag="a"), other, tmp_path)
    assert other.calls > 0
    assert len(list(tmp_path.glob("*.npz"))) == 4


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong_key", "nan"])
def test_corrupt_or_mismatched_cache_is_recomputed(tmp_path, caplog, damage):
    dm = ToyDataModule(_images(100))
    ex = CountingExtractor()
    good = load_or_compute_real_stats(dm, ex, tmp_path)
    (path,) = tmp_path.iterdir()
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "garbage":
        path.write_bytes(b"not a zip file")
    else:
        bad = GaussianStats(good.mean.clone(), good.cov.clone(), good.count, good.key)
        if damage == "wrong_key":
            bad.key = good.key.replace(dm.fingerprint("train"), "another-dataset")
        else:
            bad.mean[0] = float("nan")
        real_stats.save_stats(path, bad)
    ex.calls = 0
    with caplog.at_level(logging.WARNING, logger="diffsweep.metrics.real_stats"):
        again = load_or_compute_real_stats(dm, ex, tmp_path)
    assert ex.calls > 0
    assert any("recomputing" in r.message for r in caplog.records)
    torch.testing.assert_close(again.mean, good.mean)
    real_stats.load_stats(path, good.key)  # rewritten file is valid again


def _rewrite_npz(path: Path, drop: tuple[str, ...] = (), **changes: np.ndarray) -> None:
    """Rewrite a cache file with some arrays changed or dropped, as a hand (or a script) would:
    the recorded checksum is kept as it was."""
    with np.load(path) as archive:
        arrays = {name: archive[name] for name in archive.files if name not in drop}
    arrays.update(changes)
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)


@pytest.mark.parametrize("forgery", ["mean", "cov", "count", "features"])
def test_forged_real_stats_are_detected_and_recomputed(tmp_path, caplog, forgery):
    """Statistics forged under the right fingerprint (and finite) are never used: the FID comes
    from recomputed real statistics, not from the forged ones."""
    dm = ToyDataModule(_images(100))
    ex = CountingExtractor()
    good = load_or_compute_real_stats(dm, ex, tmp_path, features=20)
    (path,) = tmp_path.iterdir()
    forged = {"mean": {"mean": good.mean.numpy() + 5.0},
              "cov": {"cov": 100.0 * good.cov.numpy()},
              "count": {"count": np.array(10**9, dtype=np.int64)},
              "features": {"features": np.zeros_like(good.features.numpy())}}[forgery]
    _rewrite_npz(path, **forged)
    ex.calls = 0
    with caplog.at_level(logging.WARNING, logger="diffsweep.metrics.real_stats"):
        again = load_or_compute_real_stats(dm, ex, tmp_path, features=20)
    assert ex.calls > 0, "forged statistics were used instead of recomputed ones"
    assert any("checksum mismatch" in r.message and str(path) in r.message
               for r in caplog.records)
    torch.testing.assert_close(again.mean, good.mean)
    torch.testing.assert_close(again.cov, good.cov)
    assert again.count == good.count and torch.equal(again.features, good.features)
    generated = GaussianStats.from_features(ex.inner(_images(60, seed=3)).double())
    assert generated.frechet_distance(again) == pytest.approx(generated.frechet_distance(good))
    real_stats.load_stats(path, good.key)  # the rewritten file is valid again


def test_real_stats_written_without_a_checksum_are_recomputed(tmp_path, caplog):
    """Caches of the version before checksums hold the same arrays but no checksum: untrusted,
    recomputed once (a log line says why) and rewritten with one."""
    dm = ToyDataModule(_images(100))
    ex = CountingExtractor()
    good = load_or_compute_real_stats(dm, ex, tmp_path)
    (path,) = tmp_path.iterdir()
    _rewrite_npz(path, drop=(real_stats.CHECKSUM,))
    with pytest.raises(ValueError, match="no checksum"):
        real_stats.load_stats(path, good.key)
    ex.calls = 0
    with caplog.at_level(logging.WARNING, logger="diffsweep.metrics.real_stats"):
        load_or_compute_real_stats(dm, ex, tmp_path)
    assert ex.calls > 0
    assert any("no checksum" in r.message and "recomputing" in r.message for r in caplog.records)
    with np.load(path) as archive:
        assert real_stats.CHECKSUM in archive.files
    ex.calls = 0
    load_or_compute_real_stats(dm, ex, tmp_path)
    assert ex.calls == 0  # trusted from now on


def test_atomic_write_leaves_no_temp_files(tmp_path, monkeypatch):
    dm = ToyDataModule(_images(60))
    stats = load_or_compute_real_stats(dm, CountingExtractor(), tmp_path)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".npz")] == []
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())
    (path,) = tmp_path.iterdir()
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    import diffsweep.files

    monkeypatch.setattr(diffsweep.files.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        real_stats.save_stats(path, stats)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # temp file removed
    assert path.read_bytes() == before  # old file intact


def test_metrics_package_has_no_private_infrastructure():
    """Atomic writes, hashes and collate come from diffsweep.files / diffsweep.data.base."""
    root = REPO / "src" / "diffsweep" / "metrics"
    for path in root.rglob("*.py"):
        text = path.read_text()
        for banned in ("import hashlib", "os.replace", "fcntl", "tempfile", "def _collate",
                       "default_collate", "import lightning", "from lightning"):
            assert banned not in text, f"{banned!r} in {path.relative_to(REPO)}"


@pytest.mark.slow  # a fresh interpreter importing torch: ~10 s on a loaded machine
def test_metrics_modules_import_without_lightning():
    code = ("import sys\n"
            "import diffsweep.metrics.evaluator, diffsweep.metrics.real_stats\n"
            "import diffsweep.metrics.extractors.inception, diffsweep.metrics.extractors.tiny\n"
            "import diffsweep.metrics.extractors.classifier\n"
            "print(sorted(m for m in sys.modules if m == 'lightning' or m.startswith('lightning.')"
            " or m.startswith('pytorch_lightning')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.stdout.strip() == "[]", out.stdout


# --------------------------------------------------------------------------------------------
# extractors
# --------------------------------------------------------------------------------------------
def test_tiny_extractor_deterministic_and_shape_agnostic():
    x1 = _images(5, shape=(1, 16, 16))
    torch.manual_seed(123)
    a = TinyFeatureExtractor()(x1)
    torch.manual_seed(999)
    b = TinyFeatureExtractor()(x1)
    assert a.shape == (5, 64)
    assert torch.equal(a, b)
    ex = TinyFeatureExtractor()
    assert ex.identity == TinyFeatureExtractor().identity != TinyFeatureExtractor(seed=1).identity
    assert not any(p.requires_grad for p in ex.parameters()) and not ex.training
    ex.train()
    assert not ex.training
    assert ex(_images(3, shape=(3, 28, 28))).shape == (3, 64)
    assert ex(_images(3, shape=(1, 8, 8))).shape == (3, 64)
    # grayscale == the same image as RGB
    torch.testing.assert_close(ex(x1), ex(x1.expand(-1, 3, -1, -1)))
    with pytest.raises(ValueError, match="1- or 3-channel"):
        ex(_images(2, shape=(4, 8, 8)))
    # the factory ignores the data: same extractor as the constructor
    built = TinyFeatureExtractor.build(datamodule=None, cache_dir=None, dim=64, seed=0)
    assert built.identity == ex.identity and torch.equal(built(x1), ex(x1))
    features = extract_features(ex, [x1[:2], (x1[2:], torch.zeros(3))], batch_size=2)
    assert features.dtype == torch.float64 and features.shape == (5, 64)
    # batch sizes differ: float32 rounding only
    torch.testing.assert_close(features, ex(x1).double(), rtol=1e-5, atol=1e-6)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """Empty torch hub dir, no env var, and a download that fails at once (no network)."""
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    monkeypatch.delenv(INCEPTION_ENV, raising=False)
    calls = []

    def fail(url, dst, timeout):
        calls.append((url, dst, timeout))
        raise urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(inception_module, "_download", fail)
    yield calls
    torch.hub.set_dir(old)


def test_missing_inception_weights_error_is_clear(offline_hub, tmp_path):
    t0 = time.monotonic()
    with pytest.raises(InceptionWeightsError) as info:
        InceptionFeatureExtractor(timeout=3.0)
    assert time.monotonic() - t0 < 5
    msg = str(info.value)
    for needle in (INCEPTION_URL, INCEPTION_FILENAME, INCEPTION_ENV,
                   "metrics.fid.evaluator.extractor.weights", str(tmp_path / "hub" / "checkpoints"),
                   "download failed", "metrics=fid_classifier"):
        assert needle in msg, needle
    assert isinstance(info.value, FileNotFoundError)
    (url, dst, timeout), = offline_hub
    assert url == INCEPTION_URL and timeout == 3.0 and dst.endswith(INCEPTION_FILENAME)
    assert not Path(dst).exists()


def test_inception_config_key_in_error_exists_in_config(tmp_path):
    """The config key the error message names is where the fid config keeps the weights."""
    cfg = _compose_metrics("fid", tmp_path)
    node = cfg
    for part in inception_module.INCEPTION_CONFIG_KEY.split("."):
        assert part in node, inception_module.INCEPTION_CONFIG_KEY
        node = node[part]
    assert node is None


def test_inception_weights_path_resolution(offline_hub, tmp_path, monkeypatch):
    missing = tmp_path / "nope.pth"
    with pytest.raises(InceptionWeightsError, match="nope.pth"):
        inception_module.resolve_inception_weights(missing)
    monkeypatch.setenv(INCEPTION_ENV, str(missing))
    with pytest.raises(InceptionWeightsError, match=INCEPTION_ENV):
        inception_module.resolve_inception_weights()
    present = tmp_path / "w.pth"
    present.write_bytes(b"x")
    monkeypatch.setenv(INCEPTION_ENV, str(present))
    assert inception_module.resolve_inception_weights() == present
    assert inception_module.resolve_inception_weights(str(present)) == present
    monkeypatch.delenv(INCEPTION_ENV)
    with pytest.raises(InceptionWeightsError, match="downloads are disabled"):
        inception_module.resolve_inception_weights(download=False)
    hub = inception_module.inception_hub_path()
    hub.parent.mkdir(parents=True)
    hub.write_bytes(b"x")
    assert inception_module.resolve_inception_weights() == hub  # hub cache found, no download
    assert offline_hub == []
    with pytest.raises(InceptionWeightsError, match="could not be loaded"):
        InceptionFeatureExtractor(present)  # not a checkpoint
    with pytest.raises(InceptionWeightsError, match="could not be loaded"):  # the factory too
        InceptionFeatureExtractor.build(datamodule=None, cache_dir=tmp_path, weights=present)


def test_inception_pipeline_matches_torchmetrics():
    """Our wrapper == torchmetrics' NoTrainInceptionV3(antialias=False) fed uint8 RGB, the way
    FrechetInceptionDistance(feature=2048, antialias=False) feeds it (random weights: checks the
    [-1,1] -> uint8 -> RGB path; the TF1-style resize to 299 happens inside the net)."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    ours = InceptionFeatureExtractor(random_weights=True)
    assert isinstance(ours.net, NoTrainInceptionV3) and ours.net.use_antialias is False
    assert ours.identity.endswith(":random") and ours.num_features == 2048
    x = _images(2, shape=(1, 16, 16))
    u8 = ((x + 1) * 127.5).round().to(torch.uint8).expand(-1, 3, -1, -1)
    got = ours(x)
    assert got.shape == (2, 2048)
    torch.testing.assert_close(got, ours.net(u8))


@pytest.mark.inception
@pytest.mark.skipif(not (os.environ.get(INCEPTION_ENV)
                         and os.path.isfile(os.environ[INCEPTION_ENV])),
                    reason=f"{INCEPTION_ENV} does not point to the Inception weights file")
def test_real_inception_on_8_images():
    from torchmetrics.image.fid import FrechetInceptionDistance

    ex = InceptionFeatureExtractor()
    assert ex.identity.startswith("inception-v3") and ex.comparable
    real, fake = _images(8, seed=0, shape=(3, 32, 32)), _images(8, seed=1, shape=(3, 32, 32))
    f_real, f_fake = ex(real).double(), ex(fake).double()
    assert f_real.shape == (8, 2048) and torch.isfinite(f_real).all()
    m = FrechetDistance(2048, GaussianStats.from_features(f_real))
    m.update(f_fake)
    ref = FrechetInceptionDistance(feature=2048, antialias=False,
                                   feature_extractor_weights_path=os.environ[INCEPTION_ENV])
    ref.update(((real + 1) * 127.5).round().to(torch.uint8), real=True)
    ref.update(((fake + 1) * 127.5).round().to(torch.uint8), real=False)
    assert float(m.compute()) == pytest.approx(float(ref.compute()), rel=1e-3)


def _digits_dm(resolution=16):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images).float().unsqueeze(1) / 8 - 1
    x = torch.nn.functional.interpolate(x, size=(resolution, resolution), mode="bilinear",
                                        align_corners=False, antialias=True).clamp(-1, 1)
    y = torch.from_numpy(d.target).long()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    tr, va = perm[180:], perm[:180]
    return ToyDataModule(x[tr], y[tr], tag="digits", val=(x[va], y[va]))


def test_classifier_extractor_trains_fast_and_is_cached(tmp_path, monkeypatch):
    dm = _digits_dm()
    t0 = time.monotonic()
    ex = ClassifierFeatureExtractor.build(datamodule=dm, cache_dir=tmp_path)
    took = time.monotonic() - t0
    assert took < 30, f"classifier training took {took:.1f}s"
    assert ex.accuracy is not None and ex.accuracy > 0.85
    assert not ex.comparable and ex.identity.startswith("classifier")
    assert ex(dm.images[:4]).shape == (4, ex.num_features)
    # the weights hash is the same digest as before the refactor (cached stats stay valid)
    legacy = hashlib.sha256()
    for name, tensor in sorted(ex.net.state_dict().items()):
        legacy.update(name.encode())
        legacy.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    assert ex.weights_sha256 == legacy.hexdigest()
    (path,) = tmp_path.glob("classifier-*.pt")
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no partial files left

    def no_training(*a, **k):
        raise AssertionError("should load from cache")

    monkeypatch.setattr(classifier_module, "train_classifier", no_training)
    again = ClassifierFeatureExtractor.build(datamodule=dm, cache_dir=tmp_path)
    assert again.identity == ex.identity
    torch.testing.assert_close(again(dm.images[:4]), ex(dm.images[:4]))
    # other training settings -> another cache entry (so: trains)
    with pytest.raises(AssertionError, match="should load from cache"):
        ClassifierFeatureExtractor.build(datamodule=dm, cache_dir=tmp_path, seed=1)
    # corrupt cache -> retrain (our stub raises: proves it tried)
    path.write_bytes(b"junk")
    with pytest.raises(AssertionError, match="should load from cache"):
        ClassifierFeatureExtractor.build(datamodule=dm, cache_dir=tmp_path)


def test_classifier_needs_labels_datamodule_and_cache_dir(tmp_path):
    dm = ToyDataModule(_images(300))  # labels -1
    with pytest.raises(ValueError, match="labelled"):
        ClassifierFeatureExtractor.build(datamodule=dm, cache_dir=tmp_path, train_samples=128)
    with pytest.raises(ValueError, match="datamodule"):
        ClassifierFeatureExtractor.build(datamodule=None, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="cache_dir"):
        ClassifierFeatureExtractor.build(datamodule=dm, cache_dir=None)


def _compose_metrics(name: str, tmp_path: Path):
    from tests.conftest import compose_config

    return compose_config("train", [f"metrics={name}"], tmp_path)


@pytest.mark.parametrize("name,cls", [("inception", InceptionFeatureExtractor),
                                      ("tiny", TinyFeatureExtractor),
                                      ("classifier", ClassifierFeatureExtractor)])
def test_extractor_configs_instantiate_via_target(tmp_path, monkeypatch, name, cls):
    """Each extractor config is a factory (``_partial_``) called with datamodule= and cache_dir=."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    node = OmegaConf.load(METRICS_CONFIGS / "extractor" / f"{name}.yaml")
    assert node._partial_ is True and node._target_.endswith(f"{cls.__name__}.build")
    factory = instantiate(node)
    assert not isinstance(factory, torch.nn.Module)  # nothing built yet
    if name == "inception":  # no download in tests: a present (invalid) local file is enough
        weights = tmp_path / "w.pth"
        weights.write_bytes(b"x")
        with pytest.raises(InceptionWeightsError, match="could not be loaded"):
            factory(datamodule=None, cache_dir=tmp_path, weights=str(weights))
        monkeypatch.setattr(cls, "__init__", lambda self, **kw: setattr(self, "kw", kw))
        built = factory(datamodule=None, cache_dir=tmp_path)
        assert built.kw == {"weights": None, "download": True, "timeout": 10.0}
        return
    if name == "classifier":
        factory = instantiate(node, train_samples=256)
        built = factory(datamodule=_digits_dm(), cache_dir=tmp_path)
        assert len(list(tmp_path.glob("classifier-*.pt"))) == 1
    else:
        built = factory(datamodule=None, cache_dir=tmp_path)
        assert built.num_features == 64
    assert isinstance(built, cls) and isinstance(built, FeatureExtractor)
    assert built(_images(2, shape=(1, 16, 16))).shape == (2, built.num_features)


# --------------------------------------------------------------------------------------------
# evaluator (no Lightning)
# --------------------------------------------------------------------------------------------
def test_resolve_pairs():
    from omegaconf import OmegaConf

    pairs = resolve_pairs(OmegaConf.create([{"sampler": "ddim", "num_steps": 20},
                                            {"sampler": "heun", "num_steps": 10,
                                             "spacing": "karras", "name": "heun_k10"}]))
    assert [n for n, _ in pairs] == ["ddim_20", "heun_k10"]
    assert pairs[1][1].spacing == "karras" and pairs[1][1].nfe == Sampler("heun", 10).nfe
    assert resolve_pairs([Sampler("euler", 5)])[0][0] == "euler_5"
    assert resolve_pairs([("mine", Sampler("euler", 5))])[0][0] == "mine"
    with pytest.raises(ValueError, match="Duplicate"):
        resolve_pairs([{"sampler": "ddim", "num_steps": 5}, Sampler("ddim", 5)])
    with pytest.raises(ValueError, match="Unknown sampler"):
        resolve_pairs([{"sampler": "nope", "num_steps": 5}])
    with pytest.raises(ValueError, match="needs a 'sampler' key"):
        resolve_pairs([{"num_steps": 5}])
    with pytest.raises(ValueError, match="at least one"):
        resolve_pairs([])


def test_evaluator_rejects_bad_settings_before_work():
    with pytest.raises(ValueError, match="num_samples must be >= 2, got 1"):
        FIDEvaluator(TinyFeatureExtractor(), num_samples=1)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        FIDEvaluator(TinyFeatureExtractor(), batch_size=0)
    with pytest.raises(ValueError, match="real_max_count"):
        FIDEvaluator(TinyFeatureExtractor(), real_max_count=1)
    with pytest.raises(ValueError, match="extractor must be a FeatureExtractor or a factory"):
        FIDEvaluator("tiny")
    evaluator = FIDEvaluator(TinyFeatureExtractor(), num_samples=4)
    with pytest.raises(RuntimeError, match="before prepare"):
        evaluator.update(_toy_denoiser(), [Sampler("ddim", 2)], image_shape=(1, 8, 8))
    with pytest.raises(RuntimeError, match="before update"):
        evaluator.compute()
    with pytest.raises(TypeError, match="not a FeatureExtractor"):
        FIDEvaluator(lambda **kw: "nope").prepare_extractor()


def test_evaluator_with_plain_denoiser(tmp_path, record_generate):
    """FIDEvaluator scores a plain Denoiser (no LightningModule), with common random numbers."""
    dm = ToyDataModule(torch.tanh(0.5 + 0.5 * torch.randn(
        120, 1, 8, 8, generator=torch.Generator().manual_seed(5))))
    denoiser = _toy_denoiser()
    evaluator = FIDEvaluator(functools.partial(TinyFeatureExtractor.build, dim=16),
                             num_samples=24, batch_size=10, seed=7, cache_dir=str(tmp_path))
    assert evaluator.extractor is None and evaluator.real_stats is None  # nothing heavy yet
    pairs = [{"sampler": "ddim", "num_steps": 3}, {"sampler": "heun", "num_steps": 2}]
    results = evaluator.evaluate(denoiser, pairs, dm)
    assert set(results) == {f"{metric}/{pair}" for pair in ("ddim_3", "heun_2") for metric in
                            ("fid", "nfe", "kid", "kid_std", "precision", "recall")}
    assert results["nfe/heun_2"] == 3 and isinstance(results["nfe/ddim_3"], int)
    assert all(np.isfinite(results[k]) and results[k] >= 0 for k in results if k.startswith("fid/"))
    assert all(0 <= results[f"{m}/ddim_3"] <= 1 for m in ("precision", "recall"))
    assert evaluator.extractor.identity == TinyFeatureExtractor(dim=16).identity
    assert evaluator.real_stats.count == 120
    assert evaluator.real_stats.features.shape == (120, 16)  # all 120 kept (real_features=10000)
    # generate: this rank's count, the datamodule's shape, the same seed for every pair
    assert [(c["n"], c["sampler"], c["shape"], c["seed"]) for c in record_generate] == [
        (24, "ddim_3", (1, 8, 8), 7), (24, "heun_2", (1, 8, 8), 7)]
    assert record_generate[0]["batch_size"] == 10 and record_generate[0]["net"] is denoiser.net
    assert record_generate[0]["precision"] == "32" and record_generate[0]["compile"] is False
    # the same noise at every evaluation: same values; the real statistics come from the cache
    dm.real_image_calls.clear()
    assert evaluator.evaluate(denoiser, pairs, dm) == results
    fresh = FIDEvaluator(TinyFeatureExtractor(dim=16), num_samples=24, batch_size=10, seed=7,
                         cache_dir=str(tmp_path))
    assert fresh.evaluate(denoiser, pairs, dm) == results
    assert dm.real_image_calls == []
    # FID sees the weights: a shifted net scores worse
    with torch.no_grad():
        denoiser.net.w.fill_(-1.5)
    assert evaluator.evaluate(denoiser, pairs, dm)["fid/ddim_3"] > results["fid/ddim_3"]


def test_evaluator_rank_shares_and_seeds(tmp_path, record_generate):
    """Rank r of W samples its share (remainder to the first ranks) with seed + r * stride, and
    forwards precision/compile/freeze/image_shape to generate; decode's output is clamped."""
    dm = ToyDataModule(_images(40))
    evaluator = FIDEvaluator(TinyFeatureExtractor(dim=8), num_samples=65, batch_size=16, seed=3,
                             cache_dir=str(tmp_path))
    evaluator.prepare(dm)
    assert [local_count(65, 4, r) for r in range(4)] == [17, 16, 16, 16]
    assert sum(local_count(65, 4, r) for r in range(4)) == 65
    decoded = []

    def decode(x):
        decoded.append(x.shape[0])
        return 3 * x  # out of range: must be clamped before the extractor

    evaluator.update(_toy_denoiser(), [Sampler("euler", 2)], image_shape=(1, 8, 8), decode=decode,
                     precision="bf16", compile=False, freeze_weights=True,
                     compile_options={"mode": "default"}, rank=1, world_size=4)
    (call,) = record_generate
    assert call["n"] == 16 and call["seed"] == 3 + RANK_SEED_STRIDE
    assert call["precision"] == "bf16" and call["freeze_weights"] is True
    assert call["compile_options"] == {"mode": "default"}
    assert decoded == [16]
    metric = evaluator._metrics["euler_2"]
    assert int(metric.fake_count) == 16
    with pytest.raises(ValueError, match=r"rank must be in \[0, 4\)"):
        evaluator.update(_toy_denoiser(), [Sampler("euler", 2)], image_shape=(1, 8, 8), rank=4,
                         world_size=4)


def _evaluator_ddp_worker(rank, world, init_file, out_dir, cache_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    dm = ToyDataModule(_images(90, seed=2))
    evaluator = FIDEvaluator(TinyFeatureExtractor(dim=8), num_samples=11, batch_size=4, seed=5,
                             cache_dir=cache_dir)
    results = evaluator.evaluate(_toy_denoiser(), [Sampler("ddim", 2)], dm, rank=rank,
                                 world_size=world)
    torch.save({"results": results, "real_mean": evaluator.real_stats.mean,
                "real_cov": evaluator.real_stats.cov, "calls": dm.real_image_calls,
                "real_features": evaluator.real_stats.features},
               os.path.join(out_dir, f"e{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow  # 2 processes
def test_evaluator_under_gloo_matches_one_process(tmp_path):
    """Two ranks: each computes its shard of the real statistics (sums all-reduced, rank 0
    writes the cache) and its share of the samples; both get the FID of all samples together."""
    import torch.multiprocessing as mp

    cache = tmp_path / "cache"
    mp.spawn(_evaluator_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path), str(cache)),
             nprocs=2, join=True)
    dm = ToyDataModule(_images(90, seed=2))
    extractor = TinyFeatureExtractor(dim=8)
    real = load_or_compute_real_stats(dm, extractor, tmp_path / "single", batch_size=4,
                                      features=10000)
    from diffsweep.generate import generate

    features = []
    for rank in range(2):
        generator = torch.Generator().manual_seed(5 + RANK_SEED_STRIDE * rank)
        samples = generate(_toy_denoiser(), Sampler("ddim", 2), local_count(11, 2, rank),
                           (1, 8, 8), generator=generator, batch_size=4)
        features.append(extractor(samples.clamp(-1, 1)).double())
    expected = GaussianStats.from_features(torch.cat(features)).frechet_distance(real)
    from diffsweep.metrics.fidelity import kernel_inception_distance

    for rank in range(2):
        out = torch.load(tmp_path / f"e{rank}.pt")
        assert out["results"]["fid/ddim_2"] == pytest.approx(expected, rel=1e-8)
        # the ranks' real feature samples are gathered (all 90 kept); KID of all samples
        shards = out["real_features"]
        assert shards.shape == (90, 8)
        torch.testing.assert_close(torch.sort(shards, dim=0).values,
                                   torch.sort(real.features, dim=0).values)
        kid, _ = kernel_inception_distance(torch.cat(features), shards, seed=5)
        assert out["results"]["kid/ddim_2"] == pytest.approx(kid, rel=1e-6)
        torch.testing.assert_close(out["real_mean"], real.mean)
        torch.testing.assert_close(out["real_cov"], real.cov)
        assert [(c["rank"], c["world_size"]) for c in out["calls"]] == [(rank, 2)]
    (cached,) = cache.glob("real-tiny-train-*.npz")
    torch.testing.assert_close(real_stats.load_stats(cached).cov, real.cov)


def test_kid_and_precision_recall_come_from_the_fid_features(tmp_path):
    """KID and precision/recall are torch-fidelity's, on the very features FID uses: the
    generated features of the evaluator's samples against the cached real sample."""
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    from diffsweep.generate import generate

    dm = ToyDataModule(torch.tanh(0.5 + 0.5 * torch.randn(
        150, 1, 8, 8, generator=torch.Generator().manual_seed(5))))
    extractor = TinyFeatureExtractor(dim=16)
    evaluator = FIDEvaluator(extractor, num_samples=40, batch_size=20, seed=3,
                             cache_dir=str(tmp_path), real_features=100, kid_subsets=7,
                             kid_subset_size=30, prc_neighborhood=2)
    results = evaluator.evaluate(_toy_denoiser(), [Sampler("euler", 3)], dm)
    samples = generate(_toy_denoiser(), Sampler("euler", 3), 40, (1, 8, 8),
                       generator=torch.Generator().manual_seed(3), batch_size=20)
    fake = extractor(samples.clamp(-1, 1)).double()
    real = evaluator.real_stats.features
    assert real.shape == (100, 16) and real.dtype == torch.float32
    kid = kid_features_to_metric(fake, real.double(), kid_subsets=7, kid_subset_size=30,
                                 rng_seed=3, verbose=False)
    assert results["kid/euler_3"] == pytest.approx(kid["kernel_inception_distance_mean"], rel=1e-5)
    assert results["kid_std/euler_3"] == pytest.approx(kid["kernel_inception_distance_std"],
                                                       rel=1e-4)
    prc = prc_features_to_metric(fake[:40].float(), real[:40], prc_neighborhood=2, verbose=False)
    assert results["precision/euler_3"] == pytest.approx(prc["precision"])
    assert results["recall/euler_3"] == pytest.approx(prc["recall"])
    # a net far from the data: KID up, precision down
    far = _toy_denoiser()
    with torch.no_grad():
        far.net.w.fill_(-2.0)
    worse = evaluator.evaluate(far, [Sampler("euler", 3)], dm)
    assert worse["kid/euler_3"] > results["kid/euler_3"]
    assert worse["precision/euler_3"] <= results["precision/euler_3"]
    # off: FID alone; too few samples for the k-NN radii: precision/recall left out
    alone = FIDEvaluator(extractor, num_samples=40, cache_dir=str(tmp_path), kid=False,
                         precision_recall=False, real_features=0)
    assert set(alone.evaluate(_toy_denoiser(), [Sampler("euler", 3)], dm)) == {
        "fid/euler_3", "nfe/euler_3"}
    few = FIDEvaluator(extractor, num_samples=3, cache_dir=str(tmp_path), prc_neighborhood=3)
    assert "precision/euler_3" not in few.evaluate(_toy_denoiser(), [Sampler("euler", 3)], dm)
    with pytest.raises(ValueError, match="real_features must be >= 2"):
        FIDEvaluator(extractor, real_features=0)
    with pytest.raises(ValueError, match="kid_subset_size >= 2"):
        FIDEvaluator(extractor, kid_subset_size=1)
    with pytest.raises(ValueError, match="prc_neighborhood must be >= 1"):
        FIDEvaluator(extractor, prc_neighborhood=0)


def test_real_feature_sample_is_uniform_reproducible_and_cached(tmp_path):
    from diffsweep.metrics.real_stats import FeatureReservoir

    rows = torch.arange(1000, dtype=torch.float32)[:, None].repeat(1, 2)
    everything = FeatureReservoir(2000, seed=0)
    for chunk in rows.split(64):
        everything.add(chunk)
    torch.testing.assert_close(everything.result(), rows)  # room for all: all, in order

    def sample(seed, chunk=37):
        reservoir = FeatureReservoir(100, seed=seed)
        for part in rows.split(chunk):
            reservoir.add(part)
        return reservoir.result()[:, 0]

    first = sample(0)
    assert first.shape == (100,) and len(set(first.tolist())) == 100
    assert torch.equal(first, sample(0)) and not torch.equal(first, sample(1))
    # uniform: over many seeds every tenth of the stream is kept about equally often
    kept = torch.cat([sample(seed, chunk=250) for seed in range(200)])
    per_tenth = torch.bincount((kept // 100).long(), minlength=10).float()
    assert per_tenth.min() > 0.85 * per_tenth.mean() and per_tenth.max() < 1.15 * per_tenth.mean()
    # the sample is cached with the statistics; its size is part of the key
    dm, extractor = ToyDataModule(_images(80)), TinyFeatureExtractor(dim=8)
    stats = load_or_compute_real_stats(dm, extractor, tmp_path, batch_size=16, features=30)
    assert stats.features.shape == (30, 8)
    dm.real_image_calls.clear()
    again = load_or_compute_real_stats(dm, extractor, tmp_path, batch_size=16, features=30)
    assert dm.real_image_calls == [] and torch.equal(again.features, stats.features)
    plain = load_or_compute_real_stats(dm, extractor, tmp_path, batch_size=16)
    assert plain.features is None and len(list(tmp_path.glob("real-tiny-*.npz"))) == 2
    torch.testing.assert_close(plain.cov, stats.cov)
    # a cache that should hold a sample but does not is recomputed
    key = real_stats.key_json(real_stats.real_stats_key(dm, "train", extractor, None, 30))
    path = real_stats.real_stats_path(tmp_path, json.loads(key))
    real_stats.save_stats(path, GaussianStats(stats.mean, stats.cov, stats.count, key))
    dm.real_image_calls.clear()
    rebuilt = load_or_compute_real_stats(dm, extractor, tmp_path, batch_size=16, features=30)
    assert len(dm.real_image_calls) == 1 and torch.equal(rebuilt.features, stats.features)


class ConditionalToyNet(ToyNet):
    """ToyNet whose output depends on the class label (label ``num_classes`` = unconditional)."""

    num_classes = 3

    def forward(self, x, c_noise, class_labels=None):
        if class_labels is None:
            class_labels = torch.full((x.shape[0],), self.num_classes)
        return torch.tanh(self.w + 0.5 * x + 0.3 * class_labels.view(-1, 1, 1, 1).float())


def test_guidance_scale_samples_balanced_labels_over_all_ranks(tmp_path, record_generate):
    """With guidance_scale, sample i (counted over all ranks) gets label i % num_classes and
    the scale goes to generate; without it, no labels. Unconditional nets refuse a scale."""
    from diffsweep.metrics.evaluator import balanced_labels

    assert balanced_labels(7, 3).tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert balanced_labels(3, 3, start=4).tolist() == [1, 2, 0]
    dm = ToyDataModule(_images(40))
    conditional = Denoiser(ConditionalToyNet(), DiscreteVPSchedule(), prediction_type="sample")
    evaluator = FIDEvaluator(TinyFeatureExtractor(dim=8), num_samples=10, batch_size=5,
                             cache_dir=str(tmp_path))
    evaluator.prepare(dm)
    for rank in range(3):
        evaluator.update(conditional, [Sampler("euler", 2)], image_shape=(1, 8, 8), rank=rank,
                         world_size=3, guidance_scale=2.0)
    labels = torch.cat([call["class_labels"] for call in record_generate])
    assert labels.tolist() == balanced_labels(10, 3).tolist()  # shares 4 + 3 + 3, contiguous
    assert {call["guidance_scale"] for call in record_generate} == {2.0}
    record_generate.clear()
    evaluator.update(conditional, [Sampler("euler", 2)], image_shape=(1, 8, 8))
    assert "class_labels" not in record_generate[0]
    guided = evaluator.evaluate(conditional, [Sampler("euler", 2)], dm, guidance_scale=2.0)
    plain = evaluator.evaluate(conditional, [Sampler("euler", 2)], dm, guidance_scale=1.0)
    assert guided["fid/euler_2"] != plain["fid/euler_2"]
    with pytest.raises(ValueError, match="guidance_scale=2.0 needs a class-conditional net"):
        evaluator.update(_toy_denoiser(), [Sampler("euler", 2)], image_shape=(1, 8, 8),
                         guidance_scale=2.0)


# --------------------------------------------------------------------------------------------
# callback
# --------------------------------------------------------------------------------------------
def _toy_lightning(tmp_path, fid_first: bool, max_steps: int = -1, **fid_kwargs):
    import lightning as L
    from lightning.pytorch.callbacks import EMAWeightAveraging
    from torch.utils.data import DataLoader

    from diffsweep.callbacks.fid import FIDCallback

    class ToyModule(L.LightningModule):
        """The attributes FIDCallback reads: denoiser, image_shape, sample_* and compile_options."""

        def __init__(self):
            super().__init__()
            self.denoiser = _toy_denoiser()
            self.image_shape = (1, 8, 8)
            self.sample_precision = "32"
            self.sample_compile = False
            self.compile_options = {}

        def training_step(self, batch, idx):
            return ((self.denoiser.net.w - 0.5) ** 2).mean()

        def validation_step(self, batch, idx):
            pass

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

    class DM(ToyDataModule, L.LightningDataModule):
        def __init__(self):
            L.LightningDataModule.__init__(self)
            ToyDataModule.__init__(self, torch.tanh(0.5 + 0.5 * torch.randn(
                256, 1, 8, 8, generator=torch.Generator().manual_seed(5))))

        def train_dataloader(self):
            return DataLoader(TensorDataset(self.images, self.labels), batch_size=32)

        def val_dataloader(self):
            return DataLoader(TensorDataset(self.images, self.labels), batch_size=32)

    evaluator = FIDEvaluator(TinyFeatureExtractor.build, num_samples=64, batch_size=32,
                             cache_dir=str(tmp_path / "fid"))
    fid = FIDCallback(evaluator, pairs=[{"sampler": "ddim", "num_steps": 5},
                                        {"sampler": "heun", "num_steps": 3}], **fid_kwargs)
    ema = EMAWeightAveraging(decay=0.5)
    module, dm = ToyModule(), DM()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=2, limit_train_batches=3,
                        max_steps=max_steps, limit_val_batches=1, num_sanity_val_steps=1,
                        callbacks=[fid, ema] if fid_first else [ema, fid],
                        logger=L.pytorch.loggers.CSVLogger(tmp_path), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    return trainer, module, dm, fid, ema


@pytest.mark.parametrize("fid_first", [True, False])
def test_fid_callback_in_trainer(tmp_path, fid_first, record_generate):
    """max_steps=5 with 3 batches per epoch: FID at the validation of step 3 and, on the final
    EMA weights, at train end (step 5 is not validated), whatever the callback order."""
    import csv

    import yaml

    trainer, module, dm, fid, ema = _toy_lightning(tmp_path, fid_first, max_steps=5)
    trainer.fit(module, datamodule=dm)
    # 1 validation epoch x 2 pairs + train end x 2 pairs; none during the sanity check
    assert len(record_generate) == 4
    assert {c["sampler"] for c in record_generate} == {"ddim_5", "heun_3"}
    assert all(c["n"] == 64 and c["seed"] == 0 for c in record_generate)
    # validation samples with EMA weights swapped into the module's own net
    assert all(c["net"] is module.denoiser.net for c in record_generate[:2])
    # the extractor/metrics never enter the module (EMA would average/copy them)
    assert all("extractor" not in k and "metric" not in k and not k.endswith(("w1", "w2", "proj"))
               for k in module.state_dict())
    assert set(fid.results) == {f"{metric}/{pair}" for pair in ("ddim_5", "heun_3") for metric in
                                ("fid", "nfe", "kid", "kid_std", "precision", "recall")}
    assert fid.results["nfe/heun_3"] == 5 and fid.results["nfe/ddim_5"] == 5
    # final FID used the EMA weights, whatever the callback order
    ema_w = float(ema._average_model.module.denoiser.net.w.detach().mean())
    assert record_generate[-1]["w"] == pytest.approx(ema_w)
    # EMA after FID: its on_train_end has not copied the weights in yet -> its averaged copy
    final_net = ema._average_model.module.denoiser.net if fid_first else module.denoiser.net
    assert all(c["net"] is final_net for c in record_generate[2:])
    assert record_generate[0]["w"] != pytest.approx(ema_w)  # the weights moved in between
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert sum(bool(r["fid/ddim_5"]) for r in rows) == 2  # validation + train end
    assert sum(bool(r["kid/heun_3"]) and bool(r["recall/heun_3"]) for r in rows) == 2
    # NFE is constant: logged once, as a hyperparameter, not as a metric series
    assert not any(key.startswith("nfe/") for key in rows[0])
    hparams = yaml.safe_load((Path(trainer.logger.log_dir) / "hparams.yaml").read_text())
    assert hparams["fid_pairs"]["heun_3"] == {"sampler": "heun", "num_steps": 3, "nfe": 5}
    assert float(trainer.callback_metrics["nfe/heun_3"]) == 5
    assert float(trainer.callback_metrics["fid/ddim_5"]) == pytest.approx(fid.results["fid/ddim_5"])
    assert len(list((tmp_path / "fid").glob("real-tiny-train-*.npz"))) == 1
    assert fid.state_dict() == {"val_epochs": 1}


def test_fid_of_a_validated_last_step_is_not_computed_again(tmp_path, record_generate):
    """Validation at steps 3 and 6 = the last step: train end reuses the step-6 values (the same
    EMA weights), logged once; they equal a fresh evaluation of the final weights."""
    import csv

    trainer, module, dm, fid, ema = _toy_lightning(tmp_path, False)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 6
    assert len(record_generate) == 4  # 2 validation epochs x 2 pairs, nothing at train end
    assert all(c["net"] is module.denoiser.net for c in record_generate)
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert sum(bool(r["fid/ddim_5"]) for r in rows) == 2
    assert float(trainer.callback_metrics["fid/ddim_5"]) == pytest.approx(fid.results["fid/ddim_5"])
    # the EMA callback copied the averaged weights in at train end: the same weights scored
    record_generate.clear()
    fresh = fid.evaluator.evaluate(module.denoiser, fid.pairs, dm)
    assert record_generate[-1]["w"] == pytest.approx(
        float(ema._average_model.module.denoiser.net.w.detach().mean()))
    for key in ("fid/ddim_5", "fid/heun_3", "kid/ddim_5", "precision/heun_3"):
        assert fresh[key] == pytest.approx(fid.results[key], rel=1e-6)


def test_fid_callback_every_n_and_evaluate(tmp_path, record_generate):
    trainer, module, dm, fid, _ = _toy_lightning(tmp_path, True, every_n_val_epochs=2,
                                                 at_train_end=False)
    trainer.fit(module, datamodule=dm)
    assert len(record_generate) == 2  # only the 2nd validation epoch, 2 pairs
    res = fid.evaluator.evaluate(module.denoiser, fid.pairs, dm)
    assert res["fid/ddim_5"] >= 0 and res["nfe/ddim_5"] == 5
    # same seed -> same value
    assert fid.evaluator.evaluate(module.denoiser, fid.pairs, dm)["fid/ddim_5"] == res["fid/ddim_5"]
    with pytest.raises(ValueError, match="every_n_val_epochs must be >= 0"):
        type(fid)(fid.evaluator, every_n_val_epochs=-1)
    with pytest.raises(ValueError, match="must be a FIDEvaluator"):
        type(fid)("tiny")


def test_fid_callback_rank0_builds_the_extractor_first(tmp_path):
    """Under DDP rank 0 builds the extractor while the others wait in a collective; a failure
    on rank 0 is raised there and reported on the other ranks instead of hanging them."""
    from diffsweep.callbacks.fid import FIDCallback

    events = []

    def trainer(rank, rank0_failed=False):
        strategy = types.SimpleNamespace(
            broadcast=lambda obj, src=0: events.append(("broadcast", rank, obj)) or
            (rank0_failed if rank else obj))
        return types.SimpleNamespace(world_size=2, global_rank=rank, is_global_zero=rank == 0,
                                     strategy=strategy, datamodule=object())

    def factory(datamodule, cache_dir):
        events.append(("build", datamodule))
        raise OSError("offline")

    module = types.SimpleNamespace(device=torch.device("cpu"))
    with pytest.raises(OSError, match="offline"):
        FIDCallback(FIDEvaluator(factory))._prepare(trainer(0), module)
    assert [e[0] for e in events] == ["build", "broadcast"] and events[1][2] is True
    events.clear()
    with pytest.raises(RuntimeError, match="rank 0 could not build"):
        FIDCallback(FIDEvaluator(factory))._prepare(trainer(1, rank0_failed=True), module)
    assert [e[0] for e in events] == ["broadcast"]  # rank 1 never tried to build
    with pytest.raises(ValueError, match="trainer.datamodule"):
        FIDCallback(FIDEvaluator(factory))._prepare(
            types.SimpleNamespace(datamodule=None, world_size=1), module)


# --------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,extractor", [("fid", "InceptionFeatureExtractor"),
                                            ("fid_classifier", "ClassifierFeatureExtractor"),
                                            ("fid_tiny", "TinyFeatureExtractor")])
def test_metrics_configs_instantiate(tmp_path, name, extractor):
    from hydra.utils import instantiate

    from diffsweep.callbacks.fid import FIDCallback

    cfg = _compose_metrics(name, tmp_path)
    node = cfg.metrics.fid
    assert node._target_.endswith("FIDCallback")
    assert node.evaluator._target_ == "diffsweep.metrics.evaluator.FIDEvaluator"
    assert node.evaluator.extractor._target_.endswith(f"{extractor}.build")
    assert node.evaluator.num_samples == (500 if name == "fid_tiny" else 2000)
    cb = instantiate(node)
    assert isinstance(cb, FIDCallback) and [n for n, _ in cb.pairs] == ["ddim_20", "dpmpp_2m_10"]
    assert cb.evaluator.cache_dir == str(Path(cfg.paths.cache_dir) / "fid")
    assert cb.evaluator.extractor is None  # nothing heavy happens at construction
    # evaluate.py builds the evaluator alone
    alone = instantiate(node.evaluator, seed=3)
    assert isinstance(alone, FIDEvaluator) and alone.seed == 3 and alone.extractor is None
    assert "weights" in node.evaluator.extractor if name == "fid" else True


def test_metrics_configs_comment_every_key_and_repeat_nothing():
    """Every key has a one-line comment; the variants only name what differs from fid.yaml."""
    files = sorted(METRICS_CONFIGS.rglob("*.yaml"))
    assert {p.stem for p in files} >= {"fid", "fid_classifier", "fid_tiny", "none", "inception",
                                       "tiny", "classifier"}
    for path in files:
        for line in path.read_text().splitlines():
            stripped = line.strip()
            if not stripped or stripped.startswith("#") or stripped in ("defaults:",):
                continue
            if re.match(r"^(- )?[A-Za-z_@/.]+:", stripped) and not re.match(
                    r"^(fid:|evaluator:|_target_:)", stripped):
                assert "#" in line, f"{path.name}: no comment on {stripped!r}"
    for variant in ("fid_classifier", "fid_tiny"):
        text = (METRICS_CONFIGS / f"{variant}.yaml").read_text()
        assert "_target_" not in text and "cache_dir" not in text and "pairs" not in text


def test_training_run_with_fid_tiny(train_config):
    """A full train.py run with metrics=fid_tiny logs FID for both pairs at train end."""
    from diffsweep.train import run

    cfg = train_config("metrics=fid_tiny", "metrics.fid.evaluator.num_samples=8",
                       "metrics.fid.evaluator.batch_size=8", "metrics.fid.every_n_val_epochs=0",
                       "metrics.fid.pairs=[{sampler: ddim, num_steps: 2}]")
    metrics = run(cfg)
    assert metrics["nfe/ddim_2"] == 2 and np.isfinite(metrics["fid/ddim_2"])


def test_real_floor_is_the_fid_of_held_out_real_images_and_shrinks_with_more_of_them(tmp_path):
    dm = _digits_dm()
    evaluator = FIDEvaluator(TinyFeatureExtractor(dim=8), num_samples=40, batch_size=20,
                             cache_dir=tmp_path)
    few, many = evaluator.real_floor(dm, "val", 40), evaluator.real_floor(dm, "val", 180)
    assert 0 < many < few            # finite-sample bias falls with the sample count
    assert evaluator.real_floor(dm, "val") == pytest.approx(few)  # default: num_samples
    assert evaluator.real_floor(dm, "train", 1617) < many  # the reference's own images: ~0
