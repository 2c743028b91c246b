"""Latent cache: VAE round trip, cache reuse / re-keying / resume / corruption, posterior sampling.

Everything runs with tiny randomly initialised AutoencoderKLs (seeded): nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

pytestmark = pytest.mark.usefixtures("single_thread")

pytest.importorskip("diffusers")

from diffsweep.data.latents import (  # noqa: E402
    CorruptLatentCacheError,
    LatentBatchSampler,
    LatentDataModule,
)
from diffsweep.data.vae import LatentVAE  # noqa: E402

TINY = dict(block_out_channels=[32], latent_channels=4, norm_num_groups=8, sample_size=16)




class TinyImages:
    """Synthetic stand-in image DataModule (docs/INTERFACES.md contract), N images per split."""

    def __init__(self, n: int = 40, channels: int = 3, resolution: int = 16, seed: int = 0) -> None:
        self.channels, self.resolution = channels, resolution
        self.image_shape = (channels, resolution, resolution)
        g = torch.Generator().manual_seed(seed)
        self._data = {
            split: (torch.rand(m, channels, resolution, resolution, generator=g) * 2 - 1,
                    torch.arange(m, dtype=torch.int64) % 10)
            for split, m in (("train", n), ("val", max(1, n // 4)))
        }
        self.seed = seed

    def dataset(self, split: str) -> Dataset:
        return TensorDataset(*self._data[split])

    def fingerprint(self, split: str) -> str:
        return f"tiny-{split}-{self.seed}-{self.resolution}-{len(self._data[split][0])}"

    def real_images(self, split: str, max_count: int | None = None):
        yield self._data[split][0][:max_count]

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(-1, 1)


def make_dm(tmp_path: Path, images=None, config=None, **kw) -> LatentDataModule:
    kw.setdefault("cache_dir", tmp_path / "cache")
    kw.setdefault("encode_batch_size", 8)
    kw.setdefault("batch_size", 8)
    kw.setdefault("progress", False)
    vae = LatentVAE(config=dict(config or TINY), seed=0)
    return LatentDataModule(images or TinyImages(), vae, **kw)


def cache_dirs(tmp_path: Path, split: str = "train") -> list[Path]:
    return sorted(p for p in (tmp_path / "cache").glob(f"{split}-*") if p.is_dir())


# --------------------------------------------------------------------------------------------
def test_vae_round_trip_shapes_and_scaling():
    vae = LatentVAE(config={**TINY, "in_channels": 3, "out_channels": 3, "shift_factor": 0.25, "scaling_factor": 2.0})
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
        LatentVAE(config={**TINY, "bogus": 1}).config
    with pytest.raises(ValueError, match="latent_channels"):
        LatentVAE(config=TINY, latent_channels=16).config


def test_datamodule_shapes_loader_and_decode(tmp_path):
    dm = make_dm(tmp_path, images=TinyImages(n=20, channels=1), sample_posterior=False, drop_last=False)
    assert (dm.channels, dm.resolution, dm.image_shape, dm.pixel_shape) == (4, 16, (4, 16, 16), (1, 16, 16))
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
    mean, _ = dm.vae.encode(TinyImages(n=20, channels=1).dataset("train")[3][0][None])
    torch.testing.assert_close(item_x, dm.vae.scale(mean)[0], atol=2e-3, rtol=2e-3)
    img = dm.decode(x)
    assert img.shape == (8, 1, 16, 16) and img.abs().max() <= 1
    manifest = dm.manifest("train")
    for key in ("format_version", "identity", "scaling_factor", "shift_factor", "count", "dtype", "shape"):
        assert key in manifest
    assert manifest["identity"]["dataset_fingerprint"] == dm.fingerprint("train")
    assert manifest["shape"] == [20, 4, 16, 16] and manifest["dtype"] == "float16"
    assert list(dm.real_images("val", 2))[0].shape == (2, 1, 16, 16)


def test_cache_reused_then_rekeyed_on_vae_change(tmp_path):
    dm1 = make_dm(tmp_path)
    first = dm1.dataset("train")[np.arange(5)][0]
    assert dm1.vae.encode_calls == 5  # 40 images / 8
    old = cache_dirs(tmp_path)
    assert len(old) == 1
    stamps = {p.name: p.stat().st_mtime_ns for p in old[0].iterdir()}

    dm2 = make_dm(tmp_path)  # fresh objects, same identity: reused, nothing encoded
    torch.testing.assert_close(dm2.dataset("train")[np.arange(5)][0], first)
    assert dm2.vae.encode_calls == 0

    dm3 = make_dm(tmp_path, config={**TINY, "layers_per_block": 2})  # different VAE
    dm3.dataset("train")
    assert dm3.vae.encode_calls == 5
    dirs = cache_dirs(tmp_path)
    assert len(dirs) == 2 and old[0] in dirs  # a separate keyed directory
    assert {p.name: p.stat().st_mtime_ns for p in old[0].iterdir()} == stamps  # old one untouched
    assert make_dm(tmp_path).dataset("train") is not None  # ...and still valid

    # a different dataset (fingerprint) also gets its own directory
    make_dm(tmp_path, images=TinyImages(seed=1)).dataset("train")
    assert len(cache_dirs(tmp_path)) == 3
    # scaling_factor is applied when serving: overriding it does not re-encode
    vae = LatentVAE(config=dict(TINY), seed=0, scaling_factor=0.5)
    dm4 = LatentDataModule(TinyImages(), vae, cache_dir=tmp_path / "cache", progress=False, sample_posterior=False)
    x4 = dm4.dataset("train")[np.arange(5)][0]
    x2 = LatentDataModule(TinyImages(), LatentVAE(config=dict(TINY), seed=0, scaling_factor=1.0),
                          cache_dir=tmp_path / "cache", progress=False, sample_posterior=False
                          ).dataset("train")[np.arange(5)][0]
    assert vae.encode_calls == 0
    torch.testing.assert_close(x4, 0.5 * x2)


def test_interrupted_encode_resumes_and_matches_fresh_encode(tmp_path, monkeypatch):
    dm = make_dm(tmp_path, checkpoint_every=1)
    real_encode = LatentVAE.encode
    calls = {"n": 0}

    def flaky(self, images):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("killed mid-way")  # like Ctrl-C / SIGTERM handler
        return real_encode(self, images)

    monkeypatch.setattr(LatentVAE, "encode", flaky)
    with pytest.raises(KeyboardInterrupt):
        dm.dataset("train")
    monkeypatch.setattr(LatentVAE, "encode", real_encode)
    (d,) = cache_dirs(tmp_path)
    assert not (d / "manifest.json").exists() and not (d / "mean.npy").exists()
    assert dm.cache("train").read_manifest() is None  # nothing that looks valid
    assert json.loads((d / "progress.json").read_text())["done"] == 24  # 3 committed batches

    dm2 = make_dm(tmp_path, checkpoint_every=1, sample_posterior=False)
    resumed = dm2.dataset("train")[np.arange(40)]
    assert dm2.vae.encode_calls == 2  # only the 16 missing images
    assert not (d / "progress.json").exists() and (d / "manifest.json").exists()

    fresh_dm = make_dm(tmp_path / "fresh", sample_posterior=False)
    fresh = fresh_dm.dataset("train")[np.arange(40)]
    torch.testing.assert_close(resumed[0], fresh[0])
    torch.testing.assert_close(resumed[1], fresh[1])
    stats = dm2.manifest("train")["stats"]
    np.testing.assert_allclose(stats["channel_mean"], fresh_dm.manifest("train")["stats"]["channel_mean"], rtol=1e-6)


def test_unusable_progress_restarts_cleanly(tmp_path):
    dm = make_dm(tmp_path)
    cache = dm.cache("train")
    cache.dir.mkdir(parents=True)
    (cache.dir / "progress.json").write_text("{not json")
    (cache.dir / "mean.npy.partial").write_bytes(b"garbage")
    dm.dataset("train")
    assert dm.vae.encode_calls == 5
    assert sorted(p.name for p in cache.dir.iterdir()) == ["labels.npy", "manifest.json", "mean.npy", "std.npy"]


@pytest.mark.parametrize(
    "damage, named",
    [
        (lambda d: (d / "manifest.json").write_text('{"format_version": 1, "key": '), "manifest.json"),
        (lambda d: (d / "mean.npy").write_bytes((d / "mean.npy").read_bytes()[:-100]), "mean.npy"),
        (lambda d: (d / "std.npy").unlink(), "std.npy"),
        (lambda d: np.save(d / "labels.npy", np.zeros(39, np.int64)), "labels.npy"),
    ],
    ids=["bad-json", "truncated", "missing", "size-mismatch"],
)
def test_corrupt_cache_is_named_or_rebuilt(tmp_path, caplog, damage, named):
    make_dm(tmp_path).dataset("train")
    (d,) = cache_dirs(tmp_path)
    damage(d)
    with pytest.raises(CorruptLatentCacheError, match=named):
        make_dm(tmp_path).dataset("train")
    dm = make_dm(tmp_path, on_corrupt="rebuild")
    with caplog.at_level(logging.WARNING, logger="diffsweep.data.latents"):
        ds = dm.dataset("train")
    assert dm.vae.encode_calls == 5 and len(ds) == 40
    assert any("corrupt latent cache" in r.message and named in r.message for r in caplog.records)
    assert make_dm(tmp_path).dataset("train") is not None  # valid again


def test_sample_posterior_is_seeded(tmp_path):
    def epochs(seed: int, n: int = 2) -> list[torch.Tensor]:
        dm = make_dm(tmp_path, seed=seed, sample_posterior=True)
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
    # the draws are mean + std * eps: sorted by index, they scatter around the mean
    dm = make_dm(tmp_path, sample_posterior=True, drop_last=False)
    ds = dm.dataset("train")
    mean = make_dm(tmp_path, sample_posterior=False).dataset("train")[np.arange(40)][0]
    draws = torch.stack([ds[(np.arange(40), s)][0] for s in range(32)])
    assert (draws.mean(0) - mean).abs().mean() < 0.5 * draws.std(0).mean()
    # validation always serves the mean; single items are seeded too
    torch.testing.assert_close(dm.dataset("val")[np.arange(5)][0], make_dm(tmp_path, sample_posterior=False).dataset("val")[np.arange(5)][0])
    torch.testing.assert_close(ds[7][0], ds[7][0], rtol=0, atol=0)


def test_batch_sampler_partitions_and_ddp_wrapper():
    s = LatentBatchSampler(103, 10, shuffle=True, drop_last=False, seed=3)
    batches = list(s)
    assert len(batches) == len(s) == 11
    idx = np.concatenate([b for b, _ in batches])
    assert sorted(idx.tolist()) == list(range(103))
    assert all(np.all(np.diff(b) > 0) for b, _ in batches)  # sorted within a batch
    s.set_epoch(0)
    assert [b.tolist() for b, _ in s] == [b.tolist() for b, _ in batches]
    # Lightning's DDP wrapper deals whole batches to ranks, disjointly
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

    ranks = [list(DistributedSamplerWrapper(LatentBatchSampler(100, 10, True, True, 0), num_replicas=2, rank=r,
                                            shuffle=False)) for r in (0, 1)]
    got = np.concatenate([b for rank in ranks for b, _ in rank])
    assert sorted(got.tolist()) == list(range(100))


def test_hydra_config_composes_and_instantiates(tmp_path):
    """configs/data/latents.yaml + vae/tiny.yaml through Hydra, with the real digits DataModule."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    repo_configs = Path(__file__).resolve().parents[1] / "configs"
    if not (repo_configs / "data" / "digits.yaml").exists():
        pytest.skip("configs/data/digits.yaml not present")
    conf = tmp_path / "configs"
    shutil.copytree(repo_configs, conf)
    (conf / "mini.yaml").write_text(
        "defaults:\n  - _self_\n  - data: digits\n  - model: unet_tiny\n  - paths: default\n"
    )
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("mini", overrides=["data=latents", f"paths.root_dir={tmp_path}", "data.progress=false",
                                         "data.batch_size=16"])
        mnist = compose("mini", overrides=["data=latents", "data@data.image_data=mnist", f"paths.root_dir={tmp_path}"])
    GlobalHydra.instance().clear()
    assert (cfg.data.channels, cfg.data.resolution) == (4, 8)  # digits 16x16, tiny VAE downsamples 2x
    assert (cfg.model.in_channels, cfg.model.resolution) == (4, 8)
    assert mnist.data.image_data.source._target_.endswith("MNISTSource") and mnist.data.resolution == 16
    dm = instantiate(cfg.data)
    assert isinstance(dm, LatentDataModule) and dm.image_shape == (4, 8, 8)
    dm.prepare_data()
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 4, 8, 8) and y.shape == (16,)
    assert dm.decode(x[:2]).shape == (2, 1, 16, 16)
    assert str(Path(dm.manifest("train")["directory"])).startswith(str(tmp_path / ".cache" / "latents"))


def test_float32_storage_and_contiguous_reads(tmp_path):
    dm = make_dm(tmp_path, storage_dtype="float32", sample_posterior=False)
    ds = dm.dataset("val")  # val reads are contiguous slices of the memmap
    x, y = ds[np.arange(4)]
    assert x.dtype == torch.float32 and x.is_contiguous()
    x.add_(1.0)  # served tensors are private copies, never views of the read-only memmap
    images = TinyImages().dataset("val")[:4][0]
    torch.testing.assert_close(ds[np.arange(4)][0], dm.encode(images), atol=1e-5, rtol=1e-5)
    assert dm.manifest("val")["dtype"] == "float32"
    with pytest.raises(ValueError, match="storage_dtype"):
        make_dm(tmp_path, storage_dtype="int8")
