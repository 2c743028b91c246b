"""Image data layer: sources, ImageDataModule, Hydra configs. Fast, CPU, no downloads."""

from __future__ import annotations

import gzip
import os
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from diffsweep.data import (
    Cifar10Source,
    DigitsSource,
    FashionMNISTSource,
    ImageDataModule,
    ImageFolderSource,
    MNISTSource,
)
from diffsweep.data.folder import find_images, load_image

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "data"
SHARED = Path("/work/shared/data")
MNIST_DIR = SHARED / "mnist"
FASHION_DIR = SHARED / "fashion-mnist"


def compose(name: str, data_dir: Path | str, **overrides):
    """configs/data/<name>.yaml mounted at ``data`` with ``paths.data_dir`` defined."""
    cfg = OmegaConf.create({"paths": {"data_dir": str(data_dir)},
                            "data": OmegaConf.load(CONFIGS / f"{name}.yaml")})
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def first_batch(dm: ImageDataModule, split: str = "train"):
    loader = dm.train_dataloader() if split == "train" else dm.val_dataloader()
    return next(iter(loader))


# ----------------------------------------------------------------------------------- digits
def test_digits_shapes_range_labels_and_split_sizes():
    dm = ImageDataModule(DigitsSource(resolution=16), batch_size=32)
    assert (dm.channels, dm.resolution, dm.image_shape) == (1, 16, (1, 16, 16))
    dm.setup("fit")
    assert len(dm.dataset("train")) == 1617 and len(dm.dataset("val")) == 180
    x, y = first_batch(dm)
    assert x.shape == (32, 1, 16, 16) and x.dtype == torch.float32
    assert y.shape == (32,) and y.dtype == torch.int64
    train = dm.dataset("train").images
    assert train.min() == -1.0 and train.max() == 1.0
    assert set(dm.dataset("train").labels.tolist()) == set(range(10))
    # background is -1, strokes are bright: most pixels are dark
    assert (train < -0.9).float().mean() > 0.3 and train.mean() < 0
    # train and val are disjoint and cover everything
    src = dm.source
    tr, va = src._indices("train"), src._indices("val")
    assert len(set(tr.tolist()) & set(va.tolist())) == 0 and len(tr) + len(va) == 1797


def test_digits_resolution_8_is_exact_and_deterministic():
    from sklearn.datasets import load_digits

    src = DigitsSource(resolution=8, val_fraction=0.0)
    ds = src.load("train")
    expected = torch.from_numpy(load_digits().images).float().unsqueeze(1) / 8 - 1
    assert torch.equal(ds.images, expected)
    a = DigitsSource(resolution=16).load("val")
    b = DigitsSource(resolution=16).load("val")
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    c = DigitsSource(resolution=16, split_seed=1).load("val")
    assert not torch.equal(a.labels, c.labels) or not torch.equal(a.images, c.images)


def test_shuffle_is_seeded():
    def order(seed):
        dm = ImageDataModule(DigitsSource(), batch_size=64, seed=seed)
        dm.setup("fit")
        return torch.cat([y for _, y in dm.train_dataloader()])

    assert torch.equal(order(0), order(0))
    assert not torch.equal(order(0), order(1))


def test_val_loader_keeps_everything_in_order():
    dm = ImageDataModule(DigitsSource(), batch_size=64)
    dm.setup("fit")
    ys = torch.cat([y for _, y in dm.val_dataloader()])
    assert torch.equal(ys, dm.dataset("val").labels)


def test_fingerprint_stable_and_sensitive():
    a = ImageDataModule(DigitsSource(resolution=16))
    b = ImageDataModule(DigitsSource(resolution=16))
    assert a.fingerprint("train") == b.fingerprint("train")
    assert len(a.fingerprint("train")) == 64 and int(a.fingerprint("train"), 16) >= 0
    assert a.fingerprint("train") != a.fingerprint("val")
    assert a.fingerprint("train") != ImageDataModule(
        DigitsSource(resolution=32)).fingerprint("train")
    assert a.fingerprint("train") != ImageDataModule(
        DigitsSource(val_fraction=0.2)).fingerprint("train")


def test_decode_and_real_images():
    dm = ImageDataModule(DigitsSource(), batch_size=100)
    x = torch.linspace(-3, 3, 10)
    assert torch.equal(dm.decode(x), x.clamp(-1, 1))
    batches = list(dm.real_images("train", max_count=250))
    assert [b.shape[0] for b in batches] == [100, 100, 50]
    assert all(b.shape[1:] == (1, 16, 16) for b in batches)
    allx = torch.cat(list(dm.real_images("train")))
    assert allx.shape[0] == 1617 and torch.equal(allx, dm.dataset("train").images)
    shards = [torch.cat(list(dm.real_images("val", 50, rank=r, world_size=2))) for r in range(2)]
    assert shards[0].shape[0] + shards[1].shape[0] == 50
    assert torch.equal(shards[1][0], dm.dataset("val").images[1])


def test_batch_size_larger_than_dataset_errors():
    dm = ImageDataModule(DigitsSource(), batch_size=4096)
    dm.setup("fit")
    with pytest.raises(ValueError, match="lower data.batch_size or set data.drop_last=false"):
        dm.train_dataloader()
    dm = ImageDataModule(DigitsSource(), batch_size=4096, drop_last=False)
    dm.setup("fit")
    assert len(dm.train_dataloader()) == 1


def test_global_batch_is_split_across_ranks():
    dm = ImageDataModule(DigitsSource(), batch_size=64)
    dm.trainer = SimpleNamespace(world_size=4,
                                 strategy=SimpleNamespace(root_device=torch.device("cpu")))
    dm.setup("fit")
    assert dm.per_rank_batch_size == 16 and dm.train_dataloader().batch_size == 16
    dm = ImageDataModule(DigitsSource(), batch_size=30)
    dm.trainer = SimpleNamespace(world_size=4,
                                 strategy=SimpleNamespace(root_device=torch.device("cpu")))
    with pytest.raises(ValueError, match="GLOBAL batch size"):
        dm.setup("fit")


def test_bad_options_are_explained():
    with pytest.raises(ValueError, match="bilinear, bicubic, nearest"):
        DigitsSource(interpolation="lanczos")
    with pytest.raises(ValueError, match="valid splits: train, val"):
        ImageDataModule(DigitsSource()).dataset("test")
    with pytest.raises(ValueError, match="data.resolution=32"):
        ImageDataModule(DigitsSource(resolution=16), resolution=32)


def test_lightning_fit_smoke(tmp_path):
    """The datamodule drives a real Trainer (fast_dev_run) end to end."""
    import lightning.pytorch as pl

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(256, 1)
            self.seen = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            self.seen.append(x.shape)
            return self.lin(x.flatten(1)).pow(2).mean()

        def validation_step(self, batch, batch_idx):
            x, _ = batch
            self.log("val_loss", self.lin(x.flatten(1)).pow(2).mean())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    model = Tiny()
    trainer = pl.Trainer(fast_dev_run=2, accelerator="cpu", logger=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    trainer.fit(model, datamodule=ImageDataModule(DigitsSource(), batch_size=16))
    assert model.seen == [torch.Size([16, 1, 16, 16])] * 2


# ------------------------------------------------------------------------------ image folder
def _save(path: Path, size=(40, 30), color=(200, 30, 30), mode="RGB", fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, color)
    # left half dark so flips are detectable
    img.paste((0, 0, 0), (0, 0, size[0] // 2, size[1]))
    img.convert(mode).save(path, format=fmt)


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "imgs"
    _save(root / "a.png")
    _save(root / "sub" / "b.JPG")
    _save(root / "sub" / "deeper" / "c.bmp", mode="L")
    _save(root / "sub" / "d.webp", size=(30, 40))
    _save(root / "e.gif", mode="P")
    _save(root / "f.png", mode="RGBA")
    (root / "notes.txt").write_text("not an image")
    _save(root / ".hidden" / "g.png")
    return root


def test_folder_index_is_recursive_sorted_and_mixed_formats(folder):
    files = find_images(folder)
    assert files == ["a.png", "e.gif", "f.png", "sub/b.JPG", "sub/d.webp", "sub/deeper/c.bmp"]
    src = ImageFolderSource(folder, resolution=16, val_fraction=0.0)
    ds = src.load("val")
    assert len(ds) == 6
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and int(y) == -1
        assert x.min() >= -1 and x.max() <= 1
    gray = ImageFolderSource(folder, resolution=8, channels=1, val_fraction=0.0).load("val")
    assert gray[0][0].shape == (1, 8, 8)


def test_folder_resize_shorter_side_then_center_crop(tmp_path):
    img = np.zeros((20, 60, 3), np.uint8)  # H=20, W=60: only the middle third survives the crop
    img[:, 20:40] = 255
    root = tmp_path / "crop"
    root.mkdir()
    Image.fromarray(img).save(root / "wide.png")
    x, _ = ImageFolderSource(root, resolution=10, val_fraction=0.0).load("val")[0]
    assert x.shape == (3, 10, 10)
    assert x[:, :, 2:8].min() > 0.9  # the white middle fills the crop (edges may blur slightly)


def test_folder_flip_only_on_train(folder):
    torch.manual_seed(0)
    src = ImageFolderSource(folder, resolution=16, val_fraction=0.0, random_flip=True)
    val = src.load("val")
    train = src.load("train", augment=True)
    ref = val[0][0]
    assert all(torch.equal(val[0][0], ref) for _ in range(10))
    outs = [train[0][0] for _ in range(30)]
    assert any(torch.equal(o, ref.flip(-1)) for o in outs)
    assert any(torch.equal(o, ref) for o in outs)
    dm = ImageDataModule(src, batch_size=2)
    assert dm.dataset("train").random_flip and not dm.dataset("val").random_flip
    no_flip = ImageFolderSource(folder, resolution=16, val_fraction=0.0, random_flip=False)
    assert not no_flip.load("train", augment=True).random_flip


def test_folder_in_memory_matches_on_disk(folder):
    disk = ImageFolderSource(folder, resolution=12, val_fraction=0.0).load("val")
    mem = ImageFolderSource(folder, resolution=12, val_fraction=0.0, in_memory=True).load("val")
    assert len(disk) == len(mem)
    for i in range(len(disk)):
        assert torch.equal(disk[i][0], mem[i][0])


def test_folder_split_and_workers(folder):
    src = ImageFolderSource(folder, resolution=8, val_fraction=0.34)
    dm = ImageDataModule(src, batch_size=2, num_workers=1)
    dm.setup("fit")
    assert len(dm.dataset("train")) == 4 and len(dm.dataset("val")) == 2
    assert set(dm.dataset("train").files).isdisjoint(dm.dataset("val").files)
    loader = dm.train_dataloader()
    assert loader.persistent_workers and not loader.pin_memory
    batches = list(loader)
    assert len(batches) == 2 and batches[0][0].shape == (2, 3, 8, 8)


def _corrupt(folder: Path, n: int) -> list[Path]:
    paths = []
    for i in range(n):
        p = folder / "bad" / f"broken{i}.png"
        p.parent.mkdir(exist_ok=True)
        good = folder / "a.png"
        p.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])  # truncated
        paths.append(p)
    (folder / "bad" / "garbage.jpg").write_bytes(b"definitely not a jpeg")
    return paths + [folder / "bad" / "garbage.jpg"]


def test_folder_corrupt_skip_warns_once_with_count(folder):
    bad = _corrupt(folder, 7)
    src = ImageFolderSource(folder, resolution=8, val_fraction=0.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = src.load("val")
        src.load("train")
        src.fingerprint("train")
    msgs = [str(w.message) for w in caught if "corrupt" in str(w.message)]
    assert len(msgs) == 1
    assert "skipped 8 corrupt" in msgs[0] and "and 3 more" in msgs[0]
    assert str(folder / "bad" / "broken0.png") in msgs[0]
    assert len(ds) == 6 and len(src.skipped) == 8
    assert sorted(src.skipped) == sorted(p.relative_to(folder).as_posix() for p in bad)


def test_folder_corrupt_fail_names_file(folder):
    _corrupt(folder, 1)
    src = ImageFolderSource(folder, resolution=8, on_corrupt="fail")
    with pytest.raises(ValueError, match=r"unreadable image .*broken0\.png.*on_corrupt=skip"):
        src.load("train")
    with pytest.raises(ValueError, match="skip, fail"):
        ImageFolderSource(folder, on_corrupt="ignore")


def test_folder_missing_and_empty(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=r"nope.*data\.root="):
        ImageFolderSource(missing).load("train")
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("x")
    with pytest.raises(FileNotFoundError,
                       match=r"no images found under .*empty.*\.png.*\.jpg.*\.webp"):
        ImageFolderSource(empty).load("train")


def test_folder_fingerprint(folder):
    a = ImageFolderSource(folder, resolution=16)
    assert a.fingerprint("train") == ImageFolderSource(folder, resolution=16).fingerprint("train")
    assert a.fingerprint("train") != ImageFolderSource(folder, resolution=32).fingerprint("train")
    assert a.fingerprint("train") != ImageFolderSource(folder, resolution=16,
                                                       channels=1).fingerprint("train")
    _save(folder / "new.png")
    assert a.fingerprint("train") != ImageFolderSource(folder, resolution=16).fingerprint("train")


# ------------------------------------------------------------------- PNG modes (folder decode)
def _load_png(tmp_path: Path, image: Image.Image, channels: int, name: str = "x.png") -> np.ndarray:
    path = tmp_path / name
    image.save(path)
    return load_image(path, image.size[1], channels).numpy()


def test_png_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16).repeat(4, axis=0)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    grey = _load_png(tmp_path, image, channels=1)
    assert Image.open(tmp_path / "x.png").mode == "I;16"
    assert grey[0, 0].tolist() == [0, 1, 128, 255]  # 16-bit 0..65535 -> 8-bit 0..255
    rgb = load_image(tmp_path / "x.png", 4, 3).numpy()
    assert rgb.shape == (3, 4, 4) and (rgb == grey).all()


def test_32_bit_integer_greyscale_is_read_as_16_bit(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.int32).repeat(4, axis=0)
    image = Image.fromarray(values)
    assert image.mode == "I"  # what older Pillow made of 16-bit PNGs; TIFF keeps it
    grey = _load_png(tmp_path, image, channels=1, name="x.tif")
    assert Image.open(tmp_path / "x.tif").mode == "I"
    assert grey[0, 0].tolist() == [0, 1, 128, 255]


def test_palette_png_with_transparency_composites_over_white(tmp_path):
    image = Image.new("P", (4, 4), 0)
    image.putpalette([200, 0, 0, 0, 0, 255] + [0] * 762)  # 0: red, 1: blue
    image.paste(1, (2, 0, 4, 4))
    image.info["transparency"] = 1  # blue half fully transparent
    rgb = _load_png(tmp_path, image, channels=3)
    assert Image.open(tmp_path / "x.png").mode == "P"
    assert rgb[:, 0, 0].tolist() == [200, 0, 0]
    assert rgb[:, 0, 3].tolist() == [255, 255, 255]  # transparent -> white, not blue
    opaque = Image.new("P", (4, 4), 1)
    opaque.putpalette([200, 0, 0, 0, 0, 255] + [0] * 762)
    assert _load_png(tmp_path, opaque, 3, "opaque.png")[:, 0, 0].tolist() == [0, 0, 255]


def test_rgba_png_composites_alpha_over_white(tmp_path):
    pixels = np.zeros((4, 4, 4), np.uint8)
    pixels[:, :2] = (0, 0, 0, 255)     # opaque black
    pixels[:, 2] = (0, 0, 0, 0)        # transparent black -> white
    pixels[:, 3] = (255, 0, 0, 128)    # half-transparent red over white
    rgb = _load_png(tmp_path, Image.fromarray(pixels, "RGBA"), channels=3)
    assert rgb[:, 0, 0].tolist() == [0, 0, 0]
    assert rgb[:, 0, 2].tolist() == [255, 255, 255]
    assert rgb[0, 0, 3] == 255 and abs(int(rgb[1, 0, 3]) - 127) <= 1
    grey = load_image(tmp_path / "x.png", 4, 1).numpy()
    assert grey[0, 0, 2] == 255 and grey[0, 0, 0] == 0


def test_la_png_composites_alpha_over_white(tmp_path):
    pixels = np.zeros((4, 4, 2), np.uint8)
    pixels[:, :2] = (0, 255)      # opaque black
    pixels[:, 2:] = (0, 0)        # transparent -> white
    image = Image.fromarray(pixels, "LA")
    grey = _load_png(tmp_path, image, channels=1)
    assert Image.open(tmp_path / "x.png").mode == "LA"
    assert grey[0, 0].tolist() == [0, 0, 255, 255]
    assert load_image(tmp_path / "x.png", 4, 3).numpy()[:, 0, 3].tolist() == [255, 255, 255]


# ----------------------------------------------------------------------------------- MNIST
def _need(*paths: Path):
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        pytest.skip(f"shared idx files absent: {', '.join(missing)}")


def _link(src: Path, dst: Path, gunzip: bool = False) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if gunzip:
        with gzip.open(src, "rb") as f, open(dst.with_suffix(""), "wb") as g:
            shutil.copyfileobj(f, g)
    else:
        os.symlink(src, dst)


T10K = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
TRAIN = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")


def test_mnist_test_split_torchvision_layout_padded(tmp_path):
    _need(*(MNIST_DIR / f for f in T10K))
    for f in T10K:
        _link(MNIST_DIR / f, tmp_path / "MNIST" / "raw" / f)
    src = MNISTSource(tmp_path, resolution=32, download=False)
    ds = ImageDataModule(src).dataset("val")
    assert len(ds) == 10000 and ds.images.shape == (10000, 1, 32, 32)
    x, y = ds[0]
    assert x.dtype == torch.float32 and x.shape == (1, 32, 32) and int(y) == 7  # first t10k label
    assert (x[:, :2] == -1).all() and (x[:, -2:] == -1).all() and (x[..., :2] == -1).all()
    assert x.max() == 1.0
    # same pixels as torchvision's reader, just padded
    from torchvision.datasets.mnist import read_image_file

    raw = tmp_path / "raw28"
    raw.mkdir()
    _link(MNIST_DIR / T10K[0], raw / T10K[0], gunzip=True)
    ref = read_image_file(str(raw / T10K[0][:-3]))
    assert torch.equal(ds.images[:, 0, 2:30, 2:30], ref)


def test_mnist_resize_mode_and_missing_train(tmp_path):
    _need(*(MNIST_DIR / f for f in T10K))
    for f in T10K:
        _link(MNIST_DIR / f, tmp_path / f)  # files directly in root (Debian-style layout)
    src = MNISTSource(tmp_path, resolution=16, resize_mode="resize", download=False)
    x, _ = src.load("val")[0]
    assert x.shape == (1, 16, 16) and -1 <= x.min() and x.max() <= 1
    with pytest.raises(ValueError, match="resize_mode=resize"):
        MNISTSource(tmp_path, resolution=16, resize_mode="pad")
    with pytest.raises(FileNotFoundError,
                       match=r"train-images-idx3-ubyte.*data\.root=.*download=true"
                             r".*download is off"):
        src.load("train")
    dm = ImageDataModule(MNISTSource(tmp_path, download=False))
    with pytest.raises(FileNotFoundError, match="MNIST/raw"):
        dm.setup("fit")
    assert dm.fingerprint("val") != ImageDataModule(src).fingerprint("val")


def test_fashion_mnist_all_splits_uncompressed_and_gz(tmp_path):
    _need(*(FASHION_DIR / f for f in T10K + TRAIN))
    for f in TRAIN:
        _link(FASHION_DIR / f, tmp_path / "FashionMNIST" / "raw" / f)
    for f in T10K:  # torchvision itself stores uncompressed files
        _link(FASHION_DIR / f, tmp_path / "FashionMNIST" / "raw" / f, gunzip=True)
    dm = ImageDataModule(FashionMNISTSource(tmp_path, download=False), batch_size=256)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.dataset("train")) == 60000 and len(dm.dataset("val")) == 10000
    x, y = first_batch(dm)
    assert x.shape == (256, 1, 32, 32) and y.min() >= 0 and y.max() <= 9
    assert dm.fingerprint("train") == ImageDataModule(
        FashionMNISTSource(tmp_path, download=False)).fingerprint("train")


# -------------------------------------------------------------------------------- CIFAR-10
def _fake_cifar(root: Path, per_batch: int = 4, test: int = 3, bytes_keys: bool = False) -> dict:
    """torchvision's cifar-10-batches-py layout with tiny pickled batches; returns the arrays."""
    import pickle

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for number, name in enumerate(names):
        n = test if name == "test_batch" else per_batch
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [(number + i) % 10 for i in range(n)]
        key = (lambda k: k.encode()) if bytes_keys else (lambda k: k)
        with open(folder / name, "wb") as handle:
            pickle.dump({key("data"): data, key("labels"): labels, key("batch_label"): name},
                        handle)
        arrays[name] = (data, labels)
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": list("abcdefghij")}))
    return arrays


@pytest.mark.parametrize("bytes_keys", [False, True])
def test_cifar10_reads_pickled_batches_offline(tmp_path, bytes_keys):
    arrays = _fake_cifar(tmp_path, bytes_keys=bytes_keys)
    dm = ImageDataModule(Cifar10Source(tmp_path, download=False), batch_size=4)
    assert (dm.channels, dm.resolution, dm.image_shape) == (3, 32, (3, 32, 32))
    dm.prepare_data()
    dm.setup("fit")
    train, val = dm.dataset("train"), dm.dataset("val")
    assert len(train) == 20 and len(val) == 3
    # row layout: 1024 red, 1024 green, 1024 blue values, row-major 32x32
    data, labels = arrays["data_batch_2"]
    x, y = val[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert int(y) == arrays["test_batch"][1][0]
    expected = torch.from_numpy(data[1].reshape(3, 32, 32)).float() / 127.5 - 1
    assert torch.equal(train.images[5].float() / 127.5 - 1, expected)
    assert int(train.labels[5]) == labels[1]
    assert train.random_flip and not val.random_flip  # flips on train only
    xb, yb = first_batch(dm)
    assert xb.shape == (4, 3, 32, 32) and yb.dtype == torch.int64
    assert dm.fingerprint("train") == ImageDataModule(
        Cifar10Source(tmp_path, download=False)).fingerprint("train")
    assert dm.fingerprint("train") != dm.fingerprint("val")
    small = Cifar10Source(tmp_path, resolution=16, download=False).load("val")
    assert small.images.shape == (3, 3, 16, 16)


def test_cifar10_flat_folder_and_missing_files(tmp_path):
    _fake_cifar(tmp_path)
    flat = tmp_path / "flat"
    (tmp_path / "cifar-10-batches-py").rename(flat)
    assert len(Cifar10Source(flat, download=False).load("train")) == 20
    (flat / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError,
                       match=r"data_batch_3.*cifar-10-batches-py.*data\.root=.*download is off"):
        Cifar10Source(flat, download=False).load("train")
    assert len(Cifar10Source(flat, download=False).load("val")) == 3  # val needs test_batch only


def test_config_cifar10_instantiates(tmp_path):
    _fake_cifar(tmp_path / "cifar10")
    dm = instantiate(compose("cifar10", tmp_path, **{"data.source.download": False}).data)
    assert isinstance(dm.source, Cifar10Source) and dm.source.root == tmp_path / "cifar10"
    assert dm.image_shape == (3, 32, 32) and dm.source.random_flip
    assert len(dm.dataset("train")) == 20


# ------------------------------------------------------------------------------ Hydra configs
@pytest.mark.parametrize("name", ["digits", "image_folder", "mnist", "fashion_mnist", "cifar10"])
def test_configs_document_every_option(name):
    text = (CONFIGS / f"{name}.yaml").read_text()
    cfg = OmegaConf.load(CONFIGS / f"{name}.yaml")
    assert {"channels", "resolution", "batch_size", "source"} <= set(cfg)
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and not stripped.endswith(":") \
                and not stripped.startswith("_target_"):
            assert "#" in line, f"{name}.yaml: option without a comment: {line!r}"


def test_config_digits_instantiates_and_follows_overrides(tmp_path):
    dm = instantiate(compose("digits", tmp_path).data)
    assert isinstance(dm, ImageDataModule) and isinstance(dm.source, DigitsSource)
    assert dm.image_shape == (1, 16, 16)
    dm2 = instantiate(compose("digits", tmp_path, **{"data.resolution": 8}).data)
    assert dm2.source.resolution == 8 and dm2.image_shape == (1, 8, 8)


def test_config_image_folder_instantiates(folder, tmp_path):
    cfg = compose("image_folder", tmp_path, **{"data.root": str(folder), "data.resolution": 8,
                                               "data.channels": 1, "data.num_workers": 0,
                                               "data.batch_size": 2})
    dm = instantiate(cfg.data)
    assert dm.source.root == folder and dm.image_shape == (1, 8, 8)
    dm.setup("fit")
    assert first_batch(dm)[0].shape == (2, 1, 8, 8)
    # the default root hangs off paths.data_dir and the error says how to fix it
    dm = instantiate(compose("image_folder", tmp_path).data)
    assert dm.source.root == tmp_path / "image_folder"
    with pytest.raises(FileNotFoundError, match="data.root="):
        dm.setup("fit")


@pytest.mark.parametrize("name,cls", [("mnist", MNISTSource),
                                      ("fashion_mnist", FashionMNISTSource)])
def test_config_mnist_instantiates(name, cls, tmp_path):
    dm = instantiate(compose(name, tmp_path, **{"data.source.download": False}).data)
    assert isinstance(dm.source, cls) and dm.image_shape == (1, 32, 32)
    assert dm.source.root == tmp_path / name
    shared = MNIST_DIR if name == "mnist" else FASHION_DIR
    _need(*(shared / f for f in T10K))
    dm = instantiate(compose(name, tmp_path, **{"data.root": str(shared),
                                                "data.source.download": False}).data)
    assert len(dm.dataset("val")) == 10000
