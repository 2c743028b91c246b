"""Latent source: VAE round trip, cache reuse / re-keying / resume / corruption, posterior noise,
serving through the one ImageDataModule.

Everything runs with tiny randomly initialised AutoencoderKLs (seeded): nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.usefixtures("single_thread")

pytest.importorskip("diffusers")

from diffsweep.data.base import ImageSource, TensorImageDataset, check_split  # noqa: E402
from diffsweep.data.datamodule import ImageDataModule  # noqa: E402
from diffsweep.data.latents import (  # noqa: E402
    CorruptLatentCacheError,
    LatentDataset,
    LatentSource,
    item_seeds,
    posterior_noise,
)
from diffsweep.data.sampling import EpochIndex, GlobalBatchSampler  # noqa: E402
from diffsweep.data.vae import LatentVAE  # noqa: E402

TINY = dict(block_out_channels=[32], latent_channels=4, norm_num_groups=8, sample_size=16)


class TinyImages(ImageSource):
    """Synthetic image source: ``n`` random images in train, ``n // 4`` in val,
    label = index % 10."""

    name = "tiny"

    def __init__(self, n: int = 40, channels: int = 3, resolution: int = 16, seed: int = 0) -> None:
        self.channels, self.resolution, self.seed = channels, resolution, seed
        generator = torch.Generator().manual_seed(seed)
        self.data = {
            split: (torch.rand(m, channels, resolution, resolution, generator=generator) * 2 - 1,
                    torch.arange(m, dtype=torch.int64) % 10)
            for split, m in (("train", n), ("val", max(1, n // 4)))
        }

    def load(self, split: str, augment: bool = False) -> TensorImageDataset:
        return TensorImageDataset(*self.data[check_split(split)])

    def fingerprint(self, split: str) -> str:
        return f"tiny-{split}-{self.seed}-{self.resolution}-{len(self.data[split][0])}"


def make_source(tmp_path: Path, images=None, config=None, **kw) -> LatentSource:
    kw.setdefault("cache_dir", tmp_path / "cache")
    kw.setdefault("encode_batch_size", 8)
    kw.setdefault("progress", False)
    vae = LatentVAE(config=dict(config or TINY), seed=0,
                    scaling_factor=kw.pop("scaling_factor", None))
    return LatentSource(images or TinyImages(), vae, **kw)


def make_dm(tmp_path: Path, images=None, config=None, batch_size: int = 8, drop_last: bool = True,
            num_workers: int = 0, **kw) -> ImageDataModule:
    return ImageDataModule(make_source(tmp_path, images, config, **kw), batch_size=batch_size,
                           drop_last=drop_last, num_workers=num_workers)


def cache_dirs(tmp_path: Path, split: str = "train") -> list[Path]:
    return sorted(p for p in (tmp_path / "cache").glob(f"{split}-*") if p.is_dir())


def first(source: LatentSource, split: str = "train", n: int = 5, augment: bool = False):
    return source.load(split, augment=augment).batch(np.arange(n))


# --------------------------------------------------------------------------------------------
def test_vae_round_trip_shapes_and_scaling():
    vae = LatentVAE(config={**TINY, "in_channels": 3, "out_channels": 3, "shift_factor": 0.25,
                            "scaling_factor": 2.0})
    assert (vae.latent_channels, vae.downsample_factor) == (4, 1)
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    mean, std = vae.encode(x)
    assert mean.shape == std.shape == (3, 4, 16, 16) and bool((std > 0).all())
    lat = vae.scale(mean)
    torch.testing.assert_close(lat, (mean - 0.25) * 2.0)
    torch.testing.assert_close(vae.unscale(lat), mean)
    img = vae.decode(lat, batch_size=2)
    assert img.shape == x.shape and img.dtype == torch.float32
    assert img.min() >= -1 and img.max() <= 1
    # decode == AutoencoderKL.decode(latents / scale + shift)
    torch.testing.assert_close(img, vae.model.decode(mean).sample.clamp(-1, 1))


def test_vae_errors_are_clear():
    with pytest.raises(ValueError, match="exactly one of"):
        LatentVAE()
    with pytest.raises(ValueError, match="does not accept"):
        _ = LatentVAE(config={**TINY, "bogus": 1}).config  # the property validates
    with pytest.raises(ValueError, match="latent_channels"):
        _ = LatentVAE(config=TINY, latent_channels=16).config


def test_source_errors_are_clear(tmp_path):
    with pytest.raises(ValueError,
                       match="on_corrupt='ignore' is not valid; choose one of: error, rebuild"):
        make_source(tmp_path, on_corrupt="ignore")
    with pytest.raises(ValueError, match="storage_dtype"):
        make_source(tmp_path, storage_dtype="int8")
    with pytest.raises(TypeError, match="images must be an ImageSource"):
        LatentSource(object(), LatentVAE(config=dict(TINY)))
    with pytest.raises(ValueError, match="not divisible by the VAE's downsampling factor 2"):
        make_source(tmp_path, images=TinyImages(resolution=15),
                    config={**TINY, "block_out_channels": [16, 32]})


def test_datamodule_shapes_loader_and_decode(tmp_path):
    dm = make_dm(tmp_path, images=TinyImages(n=20, channels=1), sample_posterior=False,
                 drop_last=False)
    assert (dm.channels, dm.resolution, dm.image_shape, dm.pixel_shape) == (4, 16, (4, 16, 16),
                                                                            (1, 16, 16))
    dm.prepare_data()
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert [b[0].shape[0] for b in batches] == [8, 8, 4]
    x, y = batches[0]
    assert x.shape == (8, 4, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    seen = torch.cat([b[1] for b in batches])  # labels = index % 10: every item exactly once
    assert sorted(seen.tolist()) == sorted((torch.arange(20) % 10).tolist())
    item_x, item_y = dm.dataset("train")[3]
    assert item_x.shape == (4, 16, 16) and int(item_y) == 3
    # served latents == scale(posterior mean) (float16 storage)
    source = dm.source
    mean, _ = source.vae.encode(TinyImages(n=20, channels=1).load("train")[3][0][None])
    torch.testing.assert_close(item_x, source.vae.scale(mean)[0], atol=2e-3, rtol=2e-3)
    img = dm.decode(x)
    assert img.shape == (8, 1, 16, 16) and img.abs().max() <= 1
    manifest = source.manifest("train")
    for key in ("format_version", "identity", "scaling_factor", "shift_factor", "count", "dtype",
                "shape", "stats"):
        assert key in manifest
    assert "suggested_scaling_factor" in manifest["stats"]
    # FID keys and real images are those of the encoded (pixel) images
    assert manifest["identity"]["dataset_fingerprint"] == dm.fingerprint("train")
    assert dm.fingerprint("train") == source.images.fingerprint("train")
    assert source.fingerprint("train") != dm.fingerprint("train")  # the latents' own identity
    assert manifest["shape"] == [20, 4, 16, 16] and manifest["dtype"] == "float16"
    real = list(dm.real_images("val", 2))
    assert real[0].shape == (2, 1, 16, 16)
    assert torch.equal(real[0], TinyImages(n=20, channels=1).data["val"][0][:2])
    assert len(dm.pixel_dataset("train")) == 20
    # the VAE lives on the source (DataModule side), never in the LightningModule
    assert dm.source.vae is source.vae and not isinstance(source.vae, torch.nn.Module)


def test_cache_reused_then_rekeyed_on_vae_change(tmp_path):
    source1 = make_source(tmp_path)
    reference = first(source1)[0]
    assert source1.vae.encode_calls == 5  # 40 images / 8
    old = cache_dirs(tmp_path)
    assert len(old) == 1
    stamps = {p.name: p.stat().st_mtime_ns for p in old[0].iterdir()}

    source2 = make_source(tmp_path)  # fresh objects, same identity: reused, nothing encoded
    torch.testing.assert_close(first(source2)[0], reference)
    assert source2.vae.encode_calls == 0

    source3 = make_source(tmp_path, config={**TINY, "layers_per_block": 2})  # different VAE
    source3.load("train")
    assert source3.vae.encode_calls == 5
    dirs = cache_dirs(tmp_path)
    assert len(dirs) == 2 and old[0] in dirs  # a separate keyed directory
    assert {p.name: p.stat().st_mtime_ns for p in old[0].iterdir()} == stamps  # old one untouched
    assert make_source(tmp_path).load("train") is not None  # ...and still valid

    # a different dataset (fingerprint) also gets its own directory
    make_source(tmp_path, images=TinyImages(seed=1)).load("train")
    assert len(cache_dirs(tmp_path)) == 3
    # scaling_factor is applied when serving: overriding it does not re-encode
    half = make_source(tmp_path, scaling_factor=0.5, sample_posterior=False)
    one = make_source(tmp_path, scaling_factor=1.0, sample_posterior=False)
    torch.testing.assert_close(first(half)[0], 0.5 * first(one)[0])
    assert half.vae.encode_calls == one.vae.encode_calls == 0
    assert half.fingerprint("train") != one.fingerprint("train")


def _interrupted_encode(tmp_path: Path, monkeypatch) -> Path:
    """An encode killed after 3 committed batches (24 of 40 images); its cache directory."""
    source = make_source(tmp_path, checkpoint_every=1)
    real_encode = LatentVAE.encode
    calls = {"n": 0}

    def flaky(self, images):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("killed mid-way")
        return real_encode(self, images)

    monkeypatch.setattr(LatentVAE, "encode", flaky)
    with pytest.raises(KeyboardInterrupt):
        source.load("train")
    monkeypatch.setattr(LatentVAE, "encode", real_encode)
    (directory,) = cache_dirs(tmp_path)
    progress = json.loads((directory / "progress.json").read_text())
    assert progress["done"] == 24 and [chunk["end"] for chunk in progress["chunks"]] == [8, 16, 24]
    return directory


def test_interrupted_encode_resumes_and_matches_fresh_encode(tmp_path, monkeypatch):
    directory = _interrupted_encode(tmp_path, monkeypatch)  # 3 committed batches
    assert not (directory / "manifest.json").exists() and not (directory / "mean.npy").exists()
    source = make_source(tmp_path, checkpoint_every=1)
    assert source.cache("train").read_manifest() is None  # nothing that looks valid

    resumed_source = make_source(tmp_path, checkpoint_every=1, sample_posterior=False)
    resumed = first(resumed_source, n=40)
    assert resumed_source.vae.encode_calls == 2  # only the 16 missing images
    assert not (directory / "progress.json").exists() and (directory / "manifest.json").exists()

    fresh_source = make_source(tmp_path / "fresh", sample_posterior=False)
    fresh = first(fresh_source, n=40)
    torch.testing.assert_close(resumed[0], fresh[0])
    torch.testing.assert_close(resumed[1], fresh[1])
    np.testing.assert_allclose(resumed_source.manifest("train")["stats"]["channel_mean"],
                               fresh_source.manifest("train")["stats"]["channel_mean"], rtol=1e-6)


def test_unusable_progress_restarts_cleanly(tmp_path):
    source = make_source(tmp_path)
    cache = source.cache("train")
    cache.dir.mkdir(parents=True)
    (cache.dir / "progress.json").write_text("{not json")
    (cache.dir / "mean.npy.partial").write_bytes(b"garbage")
    source.load("train")
    assert source.vae.encode_calls == 5
    assert sorted(p.name for p in cache.dir.iterdir()) == ["labels.npy", "manifest.json",
                                                           "mean.npy", "std.npy"]


@pytest.mark.parametrize(
    "damage, named",
    [
        (lambda d: (d / "manifest.json").write_text('{"format_version": 2, "key": '),
         "manifest.json"),
        (lambda d: (d / "mean.npy").write_bytes((d / "mean.npy").read_bytes()[:-100]), "mean.npy"),
        (lambda d: (d / "std.npy").unlink(), "std.npy"),
        (lambda d: np.save(d / "labels.npy", np.zeros(39, np.int64)), "labels.npy"),
    ],
    ids=["bad-json", "truncated", "missing", "size-mismatch"],
)
def test_corrupt_cache_is_named_or_rebuilt(tmp_path, caplog, damage, named):
    make_source(tmp_path).load("train")
    (directory,) = cache_dirs(tmp_path)
    damage(directory)
    with pytest.raises(CorruptLatentCacheError, match=f"{named}.*data.source.on_corrupt=rebuild"):
        make_source(tmp_path).load("train")
    source = make_source(tmp_path, on_corrupt="rebuild")
    with caplog.at_level(logging.WARNING, logger="diffsweep.data.latents"):
        dataset = source.load("train")
    assert source.vae.encode_calls == 5 and len(dataset) == 40
    assert any("corrupt latent cache" in r.message and named in r.message for r in caplog.records)
    assert make_source(tmp_path).load("train") is not None  # valid again


def test_encoding_holds_the_cache_lock(tmp_path, monkeypatch):
    from diffsweep.files import is_locked

    source = make_source(tmp_path)
    lock = source.cache("train").lock_path
    seen = []
    real_encode = LatentVAE.encode

    def spying(self, images):
        seen.append(is_locked(lock))
        return real_encode(self, images)

    monkeypatch.setattr(LatentVAE, "encode", spying)
    # is_locked asks from this process: flock locks held by another open file of the same process
    # conflict too, so a held lock reads as locked
    source.load("train")
    assert seen and all(seen)
    assert not is_locked(lock)


def test_sample_posterior_is_seeded_per_epoch(tmp_path):
    def epochs(seed: int, n: int = 2) -> list[torch.Tensor]:
        dm = make_dm(tmp_path, seed=seed, sample_posterior=True)
        dm.setup("fit")
        loader = dm.train_dataloader()
        out = []
        for epoch in range(n):
            loader.sampler.set_epoch(epoch)
            out.append(torch.cat([x for x, _ in loader]))
        return out

    a, b, c = epochs(0), epochs(0), epochs(1)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)  # same seed: bitwise equal
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)
    assert not torch.equal(a[0], a[1])  # a fresh draw (and order) each epoch
    assert not torch.equal(a[0], c[0])  # another seed
    # the draws are mean + std * eps: they scatter around the mean
    source = make_source(tmp_path, sample_posterior=True)
    train = source.load("train", augment=True)
    mean = first(make_source(tmp_path, sample_posterior=False), n=40)[0]
    draws = torch.stack([train.batch(np.arange(40), epoch)[0] for epoch in range(32)])
    assert (draws.mean(0) - mean).abs().mean() < 0.5 * draws.std(0).mean()
    # the same item in the same epoch is the same draw; another epoch is another draw
    torch.testing.assert_close(train[(3, 7)][0], train[(3, 7)][0], rtol=0, atol=0)
    assert not torch.equal(train[(3, 7)][0], train[(4, 7)][0])
    # validation (no augmentation) always serves the mean
    torch.testing.assert_close(source.load("val").batch(np.arange(5))[0],
                               first(make_source(tmp_path, sample_posterior=False), "val")[0])


def test_posterior_noise_depends_on_seed_epoch_and_index_only():
    shape = (4, 8, 8)
    indices = np.array([5, 0, 17, 3, 9])
    noise = posterior_noise(0, 2, indices, shape)
    assert noise.shape == (5, *shape) and noise.dtype == torch.float32
    # each row is the item's own draw: any subset, order or batch size gives the same rows
    for j, index in enumerate(indices):
        assert torch.equal(noise[j], posterior_noise(0, 2, [index], shape)[0])
    order = np.array([3, 0, 4, 1, 2])
    assert torch.equal(posterior_noise(0, 2, indices[order], shape), noise[order])
    # per-item epochs broadcast
    mixed = posterior_noise(0, np.array([2, 3, 2, 3, 2]), indices, shape)
    assert torch.equal(mixed[0::2], noise[0::2]) and not torch.equal(mixed[1], noise[1])
    assert not torch.equal(posterior_noise(1, 2, indices, shape), noise)  # seed matters
    # standard normal, and distinct items get independent noise
    many = posterior_noise(0, 0, np.arange(256), shape)
    assert abs(float(many.mean())) < 0.02 and abs(float(many.std()) - 1) < 0.02
    assert abs(float(torch.corrcoef(many[:2].flatten(1))[0, 1])) < 0.1
    seeds = item_seeds(0, np.arange(4)[:, None], np.arange(1000)[None])
    assert len(set(seeds)) == 4000  # no two (epoch, index) pairs share a seed here


def _rank_batches(dm_factory, world_size: int, num_workers: int = 0, epoch: int = 1):
    """Per-step lists of per-rank batches (x, labels) of one epoch."""
    loaders = []
    for rank in range(world_size):
        dm = dm_factory(num_workers)
        dm.trainer = SimpleNamespace(world_size=world_size, global_rank=rank,
                                     strategy=SimpleNamespace(root_device=torch.device("cpu")))
        dm.setup("fit")
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        loaders.append(list(loader))
    return list(zip(*loaders))


def _merge(rank_batches) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-interleave rank shares ``[r::W]`` into the global batch."""
    world = len(rank_batches)
    size = sum(x.shape[0] for x, _ in rank_batches)
    x = torch.empty((size, *rank_batches[0][0].shape[1:]))
    y = torch.empty(size, dtype=torch.int64)
    for rank, (xr, yr) in enumerate(rank_batches):
        x[rank::world], y[rank::world] = xr, yr
    return x, y


def test_latent_batches_are_the_same_for_any_world_size_and_workers(tmp_path):
    make_source(tmp_path).prepare()  # encode once

    def factory(num_workers):
        return make_dm(tmp_path, batch_size=8, num_workers=num_workers, sample_posterior=True)

    single = _rank_batches(factory, 1)
    double = _rank_batches(factory, 2)
    assert len(single) == len(double) == 5
    for (one,), two in zip(single, double):
        x, y = _merge(two)
        assert torch.equal(one[0], x) and torch.equal(one[1], y)  # bitwise: per-item noise
    workers = _rank_batches(factory, 1, num_workers=2)
    for (one,), (other,) in zip(single, workers):
        assert torch.equal(one[0], other[0]) and torch.equal(one[1], other[1])


def test_sampler_hands_the_epoch_to_epoch_indexed_datasets(tmp_path):
    sampler = GlobalBatchSampler(10, 2, world_size=2, rank=1, shuffle=False, with_epoch=True)
    sampler.set_epoch(3)
    assert list(sampler)[:2] == [EpochIndex(3, 1), EpochIndex(3, 3)]
    assert list(GlobalBatchSampler(10, 2, world_size=2, rank=1, shuffle=False))[:2] == [1, 3]
    sampler.resume(5, 1)  # global batches [0..3], [4..7] (drop_last): rank 1 of the second
    assert list(sampler) == [EpochIndex(5, 5), EpochIndex(5, 7)]
    dm = make_dm(tmp_path, sample_posterior=True)
    dm.setup("fit")
    assert dm.train_dataloader().sampler.with_epoch  # latents: the dataset is epoch_indexed
    assert not ImageDataModule(TinyImages(), batch_size=8).train_dataloader().sampler.with_epoch
    # a plain index list (e.g. Lightning's overfit_batches sampler) uses the dataset's epoch
    dataset = dm.dataset("train")
    batch = dataset.__getitems__([4, 2])
    assert torch.equal(batch.x, dataset.__getitems__([EpochIndex(0, 4), EpochIndex(0, 2)]).x)
    with pytest.raises(IndexError, match=r"latent indices must be in \[0, 40\)"):
        dataset.__getitems__([40])


def test_loader_resumes_mid_epoch_at_the_same_latents(tmp_path):
    def loader():
        dm = make_dm(tmp_path, sample_posterior=True)
        dm.setup("fit")
        return dm.train_dataloader()

    uninterrupted = loader()
    uninterrupted.sampler.set_epoch(2)
    expected = list(uninterrupted)
    resumed = loader()
    resumed.batches_done = lambda: 3
    state = resumed.state_dict()
    assert state == {"epoch": 0, "batches_done": 3}
    state["epoch"] = 2  # as stored by a run killed after 3 batches of epoch 2
    fresh = loader()
    fresh.load_state_dict(state)
    rest = list(fresh)
    assert len(rest) == 2
    for (x, y), (x_expected, y_expected) in zip(rest, expected[3:]):
        assert torch.equal(x, x_expected) and torch.equal(y, y_expected)


def test_hydra_config_composes_and_instantiates(tmp_path):
    """configs/data/latents.yaml + vae/tiny.yaml through Hydra, with the real digits source."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    from diffsweep.data.digits import DigitsSource
    from diffsweep.data.mnist import MNISTSource

    repo_configs = Path(__file__).resolve().parents[1] / "configs"
    conf = tmp_path / "configs"
    shutil.copytree(repo_configs, conf)
    (conf / "mini.yaml").write_text(
        "defaults:\n  - _self_\n  - data: digits\n  - model: unet_tiny\n  - paths: default\n"
    )
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("mini", overrides=["data=latents", f"paths.root_dir={tmp_path}",
                                         "data.source.progress=false", "data.batch_size=16"])
        mnist = compose("mini", overrides=["data=latents", "data@data.source.images=mnist",
                                           "vae@data.source.vae=sd_ft_mse",
                                           f"paths.root_dir={tmp_path}"])
    GlobalHydra.instance().clear()
    # digits 16x16, tiny VAE downsamples 2x
    assert (cfg.data.channels, cfg.data.resolution) == (4, 8)
    assert (cfg.model.in_channels, cfg.model.resolution) == (4, 8)
    assert mnist.data.source.images.source._target_.endswith("MNISTSource")
    assert (mnist.data.resolution, mnist.data.channels) == (4, 4)  # 32 / 8, SD's 4 channels
    assert mnist.data.source.vae.pretrained == "stabilityai/sd-vae-ft-mse"
    dm = instantiate(cfg.data)
    assert isinstance(dm, ImageDataModule) and isinstance(dm.source, LatentSource)
    assert isinstance(dm.source.images, DigitsSource) and dm.image_shape == (4, 8, 8)
    assert dm.pixel_shape == (1, 16, 16)
    dm.prepare_data()
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 4, 8, 8) and y.shape == (16,)
    assert dm.decode(x[:2]).shape == (2, 1, 16, 16)
    assert dm.fingerprint("train") == DigitsSource(resolution=16).fingerprint("train")
    directory = Path(dm.source.manifest("train")["directory"])
    assert str(directory).startswith(str(tmp_path / ".cache" / "latents"))
    inner = instantiate(mnist.data.source.images)
    assert isinstance(inner.source, MNISTSource)


def test_config_documents_every_option():
    configs = Path(__file__).resolve().parents[1] / "configs"
    for path in [configs / "data" / "latents.yaml", *sorted((configs / "vae").glob("*.yaml"))]:
        for line in path.read_text().splitlines():
            stripped = line.strip()
            if stripped and not stripped.startswith(("#", "_target_", "- _self_")) \
                    and not stripped.endswith(":"):
                assert "#" in line, f"{path.name}: option without a comment: {line!r}"


def test_float32_storage_and_contiguous_reads(tmp_path):
    source = make_source(tmp_path, storage_dtype="float32", sample_posterior=False)
    dataset = source.load("val")  # val reads of consecutive indices are one slice of the memmap
    x, y = dataset.batch(np.arange(4))
    assert x.dtype == torch.float32 and x.is_contiguous()
    x.add_(1.0)  # served tensors are private copies, never views of the read-only memmap
    images = TinyImages().load("val").images[:4]
    torch.testing.assert_close(dataset.batch(np.arange(4))[0], source.encode(images), atol=1e-5,
                               rtol=1e-5)
    assert source.manifest("val")["dtype"] == "float32"


def test_latent_dataset_pickles_without_its_memmaps(tmp_path):
    import pickle

    dataset = make_source(tmp_path).load("train", augment=True)
    x = dataset.batch([1, 2])[0]
    assert dataset._arrays is not None
    clone = pickle.loads(pickle.dumps(dataset))
    assert clone._arrays is None and torch.equal(clone.batch([1, 2])[0], x)
    assert isinstance(clone, LatentDataset)


# -------------------------------------------------------------------------------- checksums
def _edit_npy(path: Path, edit) -> None:
    """Change an array file in place, keeping its size, shape, dtype and finiteness (what no
    size or shape check can see)."""
    array = np.load(path)
    edit(array)
    assert np.isfinite(array).all()
    np.save(path, array)


TAMPERING = {
    "latents": ("mean.npy", lambda d: _edit_npy(d / "mean.npy", lambda a: a.__setitem__(
        (3, 0, 0, 0), a[3, 0, 0, 0] + 1))),
    "std": ("std.npy", lambda d: _edit_npy(d / "std.npy", lambda a: a.__imul__(2))),
    "labels": ("labels.npy", lambda d: _edit_npy(d / "labels.npy", lambda a: a.__setitem__(
        slice(None), 7))),
    "manifest": ("manifest.json", lambda d: (d / "manifest.json").write_text(
        (d / "manifest.json").read_text().replace('"count": 40', '"count": 40, "note": 1'))),
}


@pytest.mark.parametrize("what", sorted(TAMPERING))
def test_a_tampered_cache_is_refused_in_one_line_or_rebuilt(tmp_path, caplog, what):
    named, tamper = TAMPERING[what]
    reference = first(make_source(tmp_path, sample_posterior=False), n=40)
    (directory,) = cache_dirs(tmp_path)
    tamper(directory)
    with pytest.raises(CorruptLatentCacheError) as caught:
        make_source(tmp_path).load("train")
    message = str(caught.value)
    assert "\n" not in message and named in message and "data.source.on_corrupt=rebuild" in message
    assert "changed after it was written" in message
    source = make_source(tmp_path, on_corrupt="rebuild", sample_posterior=False)
    with caplog.at_level(logging.WARNING, logger="diffsweep.data.latents"):
        rebuilt = first(source, n=40)
    assert source.vae.encode_calls == 5  # re-encoded, not served
    assert any("corrupt latent cache" in r.message and named in r.message for r in caplog.records)
    assert torch.equal(rebuilt[0], reference[0]) and torch.equal(rebuilt[1], reference[1])
    assert make_source(tmp_path).load("train") is not None  # valid again


def test_a_cache_written_before_checksums_is_re_encoded(tmp_path, caplog):
    """An earlier diffsweep's manifest (no checksums) is untrusted: re-encoded with a warning,
    even with on_corrupt=error (nothing is corrupt, nothing proves it is not)."""
    reference = first(make_source(tmp_path, sample_posterior=False), n=40)
    (directory,) = cache_dirs(tmp_path)
    manifest = json.loads((directory / "manifest.json").read_text())
    del manifest["checksum"]
    for entry in manifest["files"].values():
        del entry["sha256"]
    (directory / "manifest.json").write_text(json.dumps(manifest))
    _edit_npy(directory / "mean.npy", lambda a: a.__imul__(0))  # what nothing could detect
    source = make_source(tmp_path, on_corrupt="error", sample_posterior=False)
    with caplog.at_level(logging.WARNING, logger="diffsweep.data.latents"):
        again = first(source, n=40)
    assert source.vae.encode_calls == 5
    assert any("written without checksums" in r.message and "re-encoding" in r.message
               for r in caplog.records)
    assert torch.equal(again[0], reference[0])
    assert "checksum" in json.loads((directory / "manifest.json").read_text())


@pytest.mark.parametrize("damage", ["rows", "no-chunks"])
def test_a_resumed_encode_restarts_when_its_committed_rows_are_untrusted(tmp_path, monkeypatch,
                                                                         caplog, damage):
    directory = _interrupted_encode(tmp_path, monkeypatch)
    if damage == "rows":  # finite, right shape: only the chunk checksum sees it
        partial = np.load(directory / "mean.npy.partial", mmap_mode="r+")
        partial[10] += 1
        partial.flush()
        del partial
        words = "mean.npy.partial: rows 8..15 differ from their checksum"
    else:  # progress.json of an earlier diffsweep
        progress = json.loads((directory / "progress.json").read_text())
        del progress["chunks"]
        (directory / "progress.json").write_text(json.dumps(progress))
        words = "records no chunk checksums"
    source = make_source(tmp_path, checkpoint_every=1, sample_posterior=False)
    with caplog.at_level(logging.WARNING, logger="diffsweep.data.latents"):
        resumed = first(source, n=40)
    assert source.vae.encode_calls == 5  # all 40 images again, not the 16 missing ones
    assert any(words in r.message and "restarting encode" in r.message for r in caplog.records)
    fresh = first(make_source(tmp_path / "fresh", sample_posterior=False), n=40)
    assert torch.equal(resumed[0], fresh[0])


def test_checksums_are_read_without_the_lock_and_only_rechecked_under_it(tmp_path, monkeypatch):
    """Ranks of a node hash a large cache in parallel: the sha256 pass runs outside the cache's
    lock; under it only the cheap checks run (unless a file turned out changed)."""
    from diffsweep.data import latents
    from diffsweep.files import is_locked

    make_source(tmp_path).load("train")
    source = make_source(tmp_path)
    lock = source.cache("train").lock_path
    locked_while_hashing = []
    real_hash = latents.read_file_sha256

    def spying(path):
        locked_while_hashing.append(is_locked(lock))
        return real_hash(path)

    monkeypatch.setattr(latents, "read_file_sha256", spying)
    source.load("train")
    assert locked_while_hashing == [False, False, False]  # mean, std, labels: once each
    assert source.vae.encode_calls == 0

