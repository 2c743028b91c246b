"""FID: Fréchet distance math, the metric's DDP sums, the real-statistics cache, feature
extractors (tiny, classifier, Inception weights handling) and the FIDCallback in a Trainer."""
from __future__ import annotations

import logging
import os
import socket
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from torch.utils.data import TensorDataset

from diffsweep.metrics import features as feat
from diffsweep.metrics import fid as fidmod
from diffsweep.metrics.features import (INCEPTION_ENV, INCEPTION_FILENAME, INCEPTION_URL,
                                        InceptionWeightsError, TinyFeatureExtractor)
from diffsweep.metrics.fid import (FrechetDistance, GaussianStats, frechet_distance,
                                   load_or_compute_real_stats)

pytestmark = pytest.mark.usefixtures("single_thread")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


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

    def fingerprint(self, split: str) -> str:
        return f"{self.tag}-{split}-{self.resolution}-{len(self.images)}"

    def dataset(self, split: str):
        if split == "val":
            if self.val is None:
                raise ValueError("no val split")
            return TensorDataset(*self.val)
        return TensorDataset(self.images, self.labels)

    def real_images(self, split: str, max_count: int | None = None):
        x = self.images if max_count is None else self.images[:max_count]
        for i in range(0, len(x), 64):
            yield x[i:i + 64]

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return x


class CountingExtractor(torch.nn.Module):
    """Tiny extractor that counts its calls."""

    name = "tiny"
    comparable = False

    def __init__(self):
        super().__init__()
        self.inner = TinyFeatureExtractor(dim=16)
        self.num_features = 16
        self.calls = 0

    @property
    def identity(self) -> str:
        return self.inner.identity

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def _images(n=200, seed=0, shape=(1, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *shape, generator=g) * 2 - 1


def _scipy_fid(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _random_spd(d, rng):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


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
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz"
    assert "tiny" in files[0].name and "train" in files[0].name
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
        fidmod.save_stats(path, bad)
    ex.calls = 0
    with caplog.at_level(logging.WARNING, logger="diffsweep.metrics.fid"):
        again = load_or_compute_real_stats(dm, ex, tmp_path)
    assert ex.calls > 0
    assert any("recomputing" in r.message for r in caplog.records)
    torch.testing.assert_close(again.mean, good.mean)
    fidmod.load_stats(path, good.key)  # rewritten file is valid again


def test_atomic_write_leaves_no_temp_files(tmp_path, monkeypatch):
    dm = ToyDataModule(_images(60))
    load_or_compute_real_stats(dm, CountingExtractor(), tmp_path)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".npz")] == []
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())
    (path,) = tmp_path.iterdir()
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(fidmod.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        fidmod.atomic_write_bytes(path, b"new content")
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # temp file removed
    assert path.read_bytes() == before  # old file intact


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

    monkeypatch.setattr(feat, "_download", fail)
    yield calls
    torch.hub.set_dir(old)


def test_missing_inception_weights_error_is_clear(offline_hub, tmp_path):
    t0 = time.monotonic()
    with pytest.raises(InceptionWeightsError) as info:
        feat.InceptionFeatureExtractor(timeout=3.0)
    assert time.monotonic() - t0 < 5
    msg = str(info.value)
    for needle in (INCEPTION_URL, INCEPTION_FILENAME, INCEPTION_ENV,
                   "metrics.fid.inception_weights", str(tmp_path / "hub" / "checkpoints"),
                   "download failed"):
        assert needle in msg, needle
    assert isinstance(info.value, FileNotFoundError)
    (url, dst, timeout), = offline_hub
    assert url == INCEPTION_URL and timeout == 3.0 and dst.endswith(INCEPTION_FILENAME)
    assert not Path(dst).exists()


def test_inception_weights_path_resolution(offline_hub, tmp_path, monkeypatch):
    missing = tmp_path / "nope.pth"
    with pytest.raises(InceptionWeightsError, match="nope.pth"):
        feat.resolve_inception_weights(missing)
    monkeypatch.setenv(INCEPTION_ENV, str(missing))
    with pytest.raises(InceptionWeightsError, match=INCEPTION_ENV):
        feat.resolve_inception_weights()
    present = tmp_path / "w.pth"
    present.write_bytes(b"x")
    monkeypatch.setenv(INCEPTION_ENV, str(present))
    assert feat.resolve_inception_weights() == present
    assert feat.resolve_inception_weights(str(present)) == present
    monkeypatch.delenv(INCEPTION_ENV)
    hub = feat.inception_hub_path()
    hub.parent.mkdir(parents=True)
    hub.write_bytes(b"x")
    assert feat.resolve_inception_weights() == hub  # torch hub cache found without downloading
    assert offline_hub == []
    with pytest.raises(InceptionWeightsError, match="could not be loaded"):
        feat.InceptionFeatureExtractor(present)  # not a checkpoint


def test_inception_pipeline_matches_torchmetrics():
    """Our wrapper == torchmetrics' NoTrainInceptionV3(antialias=False) fed uint8 RGB, the way
    FrechetInceptionDistance(feature=2048, antialias=False) feeds it (random weights: checks the
    [-1,1] -> uint8 -> RGB path; the TF1-style resize to 299 happens inside the net)."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    ours = feat.InceptionFeatureExtractor(random_weights=True)
    assert isinstance(ours.net, NoTrainInceptionV3) and ours.net.use_antialias is False
    assert ours.identity.endswith(":random") and ours.num_features == 2048
    x = _images(2, shape=(1, 16, 16))
    u8 = ((x + 1) * 127.5).round().to(torch.uint8).expand(-1, 3, -1, -1)
    got = ours(x)
    assert got.shape == (2, 2048)
    torch.testing.assert_close(got, ours.net(u8))


@pytest.mark.inception
@pytest.mark.skipif(not (os.environ.get(INCEPTION_ENV) and os.path.isfile(os.environ[INCEPTION_ENV])),
                    reason=f"{INCEPTION_ENV} does not point to the Inception weights file")
def test_real_inception_on_8_images():
    from torchmetrics.image.fid import FrechetInceptionDistance

    ex = feat.InceptionFeatureExtractor()
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
    ex = feat.build_feature_extractor("classifier", datamodule=dm, cache_dir=tmp_path)
    took = time.monotonic() - t0
    assert took < 30, f"classifier training took {took:.1f}s"
    assert ex.accuracy is not None and ex.accuracy > 0.85
    assert not ex.comparable and ex.identity.startswith("classifier")
    assert ex(dm.images[:4]).shape == (4, ex.num_features)

    def no_training(*a, **k):
        raise AssertionError("should load from cache")

    monkeypatch.setattr(feat, "train_classifier", no_training)
    again = feat.build_feature_extractor("classifier", datamodule=dm, cache_dir=tmp_path)
    assert again.identity == ex.identity
    torch.testing.assert_close(again(dm.images[:4]), ex(dm.images[:4]))
    # corrupt cache -> retrain (our stub raises: proves it tried)
    (path,) = tmp_path.glob("classifier-*.pt")
    path.write_bytes(b"junk")
    with pytest.raises(AssertionError, match="should load from cache"):
        feat.build_feature_extractor("classifier", datamodule=dm, cache_dir=tmp_path)


def test_classifier_needs_labels(tmp_path):
    dm = ToyDataModule(_images(300))  # labels -1
    with pytest.raises(ValueError, match="labelled"):
        feat.build_feature_extractor("classifier", datamodule=dm, cache_dir=tmp_path,
                                     train_samples=128)


def test_unknown_extractor():
    with pytest.raises(ValueError, match="inception, tiny, classifier"):
        feat.build_feature_extractor("clip")


# --------------------------------------------------------------------------------------------
# callback
# --------------------------------------------------------------------------------------------
def test_resolve_pairs():
    from omegaconf import OmegaConf

    from diffsweep.callbacks.fid import resolve_pairs
    from diffsweep.samplers import Sampler

    pairs = resolve_pairs(OmegaConf.create([{"sampler": "ddim", "num_steps": 20},
                                            {"sampler": "heun", "num_steps": 10,
                                             "spacing": "karras", "name": "heun_k10"}]))
    assert [n for n, _ in pairs] == ["ddim_20", "heun_k10"]
    assert pairs[1][1].spacing == "karras" and pairs[1][1].nfe == Sampler("heun", 10).nfe
    assert resolve_pairs([Sampler("euler", 5)])[0][0] == "euler_5"
    with pytest.raises(ValueError, match="Duplicate"):
        resolve_pairs([{"sampler": "ddim", "num_steps": 5}, Sampler("ddim", 5)])
    with pytest.raises(ValueError, match="Unknown sampler"):
        resolve_pairs([{"sampler": "nope", "num_steps": 5}])


def _toy_lightning(tmp_path, fid_first: bool, **fid_kwargs):
    import lightning as L
    from lightning.pytorch.callbacks import EMAWeightAveraging
    from torch.utils.data import DataLoader

    from diffsweep.callbacks.fid import FIDCallback

    calls = []  # shared by the module and EMA's deep copy of it

    class ToyModule(L.LightningModule):
        """Samples = tanh(w + noise): FID depends on the (EMA) weight."""

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1, 8, 8))

        @property
        def sample_calls(self):
            return calls  # a closure, not an attribute: EMA's deepcopy shares it

        def training_step(self, batch, idx):
            return ((self.w - 0.5) ** 2).mean()

        def validation_step(self, batch, idx):
            pass

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

        def sample(self, sampler, num_samples, generator=None, batch_size=None):
            self.sample_calls.append((float(self.w.mean()), num_samples, sampler.name))
            noise = torch.randn(num_samples, 1, 8, 8, generator=generator)
            return torch.tanh(self.w.detach() + 0.5 * noise)

    class DM(ToyDataModule, L.LightningDataModule):
        def __init__(self):
            L.LightningDataModule.__init__(self)
            ToyDataModule.__init__(self, torch.tanh(0.5 + 0.5 * torch.randn(
                256, 1, 8, 8, generator=torch.Generator().manual_seed(5))))

        def train_dataloader(self):
            return DataLoader(TensorDataset(self.images, self.labels), batch_size=32)

        def val_dataloader(self):
            return DataLoader(TensorDataset(self.images, self.labels), batch_size=32)

    fid = FIDCallback(pairs=[{"sampler": "ddim", "num_steps": 5}, {"sampler": "heun", "num_steps": 3}],
                      num_samples=64, extractor="tiny", cache_dir=str(tmp_path / "fid"),
                      batch_size=32, **fid_kwargs)
    ema = EMAWeightAveraging(decay=0.5)
    module, dm = ToyModule(), DM()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=2, limit_train_batches=3,
                        limit_val_batches=1, num_sanity_val_steps=1,
                        callbacks=[fid, ema] if fid_first else [ema, fid],
                        logger=L.pytorch.loggers.CSVLogger(tmp_path), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    return trainer, module, dm, fid, ema


@pytest.mark.parametrize("fid_first", [True, False])
def test_fid_callback_in_trainer(tmp_path, fid_first):
    import csv

    trainer, module, dm, fid, ema = _toy_lightning(tmp_path, fid_first)
    trainer.fit(module, datamodule=dm)
    # 2 validation epochs x 2 pairs + train end x 2 pairs; none during the sanity check
    assert len(module.sample_calls) == 6
    assert {c[2] for c in module.sample_calls} == {"ddim_5", "heun_3"}
    # the extractor/metrics never enter the module (EMA would average/copy them)
    assert all(not k.startswith(("inner", "_extractor")) for k in module.state_dict())
    assert set(fid.results) == {"fid/ddim_5", "fid/heun_3", "nfe/ddim_5", "nfe/heun_3"}
    assert fid.results["nfe/heun_3"] == 5 and fid.results["nfe/ddim_5"] == 5
    # final FID used the EMA weights, whatever the callback order
    ema_w = float(ema._average_model.module.w.detach().mean())
    assert module.sample_calls[-1][0] == pytest.approx(ema_w)
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert sum(bool(r["fid/ddim_5"]) for r in rows) == 3  # 2 validation epochs + train end
    assert {float(r["nfe/heun_3"]) for r in rows if r["nfe/heun_3"]} == {5.0}
    assert float(trainer.callback_metrics["fid/ddim_5"]) == pytest.approx(fid.results["fid/ddim_5"])
    assert len(list((tmp_path / "fid").glob("real-tiny-train-*.npz"))) == 1


def test_fid_callback_every_n_and_evaluate(tmp_path):
    trainer, module, dm, fid, _ = _toy_lightning(tmp_path, True, every_n_val_epochs=2,
                                                 at_train_end=False)
    trainer.fit(module, datamodule=dm)
    assert len(module.sample_calls) == 2  # only the 2nd validation epoch, 2 pairs
    res = fid.evaluate(module, dm)
    assert res["fid/ddim_5"] >= 0 and res["nfe/ddim_5"] == 5
    # same seed -> same value
    assert fid.evaluate(module, dm)["fid/ddim_5"] == res["fid/ddim_5"]
    # per-rank shares sum to num_samples
    fid.num_samples = 65
    assert sum(fid._local_count(4, r) for r in range(4)) == 65


def test_metrics_configs_instantiate(tmp_path):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from diffsweep.callbacks.fid import FIDCallback

    root = Path(__file__).resolve().parents[1] / "configs" / "metrics"
    names = sorted(p.stem for p in root.glob("fid*.yaml"))
    assert {"fid", "fid_classifier", "fid_tiny"} <= set(names)
    for name in names:
        cfg = OmegaConf.merge({"paths": {"cache_dir": str(tmp_path)}},
                              {"metrics": OmegaConf.load(root / f"{name}.yaml")})
        node = cfg.metrics.fid
        assert "inception_weights" in node and node._target_.endswith("FIDCallback")
        cb = instantiate(node)
        assert isinstance(cb, FIDCallback)
        assert cb.cache_dir == str(tmp_path / "fid")
        assert cb.extractor is None  # nothing heavy happens at construction
