"""MNIST and Fashion-MNIST from their idx files (optionally downloaded by torchvision)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffsweep.data.base import (
    ImageSource,
    TensorImageDataset,
    check_choice,
    check_split,
    fingerprint_of,
)
from diffsweep.files import bytes_sha256

RESIZE_MODES = ("pad", "resize")
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (``.gz`` or uncompressed) into a numpy array of its stored shape."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an idx file (bad magic number)")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, dtype=_IDX_DTYPES[data[2]], offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: expected {int(np.prod(shape))} values for shape {shape}, "
                         f"found {arr.size} (truncated file?)")
    return arr.reshape(shape)


class MNISTSource(ImageSource):
    """MNIST digits (28x28 grayscale, labels 0..9): ``train`` = the 60k training files,
    ``val`` = the 10k ``t10k`` test files.

    Files are looked up, as ``<stem>`` or ``<stem>.gz``, in ``root`` itself (a folder holding
    the idx files directly, e.g. Debian's ``/usr/share/datasets/fashion-mnist``), then in
    torchvision's layout ``root/<MNIST|FashionMNIST>/raw``, then ``root/raw``. When they are
    missing and ``download`` is true, torchvision downloads them into its layout under ``root``.

    28 -> ``resolution``: ``resize_mode=pad`` (default) centers the 28x28 digit on a background
    (-1) canvas, pixels unchanged (needs resolution >= 28; 32 gives the classic 2-pixel border);
    ``resize`` rescales bilinearly (antialiased) and re-quantizes to uint8.

    Args:
        root: data folder (``data.root``).
        resolution: output side (default 32).
        download: download the files with torchvision if they are missing.
        resize_mode: ``pad`` or ``resize``.
    """

    name = "mnist"
    channels = 1
    torchvision_class = "MNIST"

    def __init__(self, root: str | os.PathLike, resolution: int = 32, download: bool = True,
                 resize_mode: str = "pad"):
        self.root = Path(os.path.expanduser(str(root)))
        self.resolution = int(resolution)
        self.download = bool(download)
        self.resize_mode = check_choice("resize_mode", resize_mode, RESIZE_MODES)
        if self.resize_mode == "pad" and self.resolution < 28:
            raise ValueError(f"resize_mode=pad needs resolution >= 28 (got {self.resolution}); "
                             "set resize_mode=resize to shrink the images")
        if self.resolution < 1:
            raise ValueError(f"resolution must be positive, got {self.resolution}")
        self._cache: dict[str, TensorImageDataset] = {}
        self._raw: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    @staticmethod
    def _stems(split: str) -> tuple[str, str]:
        prefix = "train" if check_split(split) == "train" else "t10k"
        return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"

    def _search_dirs(self) -> list[Path]:
        return [self.root, self.root / self.torchvision_class / "raw", self.root / "raw"]

    def _find(self, stem: str) -> Path | None:
        for d in self._search_dirs():
            for name in (stem, stem + ".gz"):
                if (d / name).is_file():
                    return d / name
        return None

    def _missing(self, split: str) -> list[str]:
        return [s for s in self._stems(split) if self._find(s) is None]

    def prepare(self, splits: tuple[str, ...] = ("train", "val")) -> None:
        """Download with torchvision when files of ``splits`` are missing and ``download`` is on;
        raise a FileNotFoundError explaining where to put the files when that is impossible."""
        missing = sorted({s for split in splits for s in self._missing(split)})
        if not missing:
            return
        if self.download:
            import torchvision.datasets as tvd

            try:
                getattr(tvd, self.torchvision_class)(str(self.root), train=True, download=True)
            except Exception as e:  # noqa: BLE001 - offline, proxy, mirror down...
                raise FileNotFoundError(
                    self._missing_message(missing, f"download failed: {e}")) from e
            missing = sorted({s for split in splits for s in self._missing(split)})
            if not missing:
                return
        raise FileNotFoundError(self._missing_message(missing, "download is off"))

    def _missing_message(self, missing: list[str], why: str) -> str:
        dirs = " or ".join(str(d) for d in self._search_dirs()[:2])
        hint = "" if self.download else " or set data.source.download=true when online"
        return (f"{self.name} idx files missing: {', '.join(missing)} (each may be .gz). "
                f"Put them in {dirs}, or set data.root=... to the folder holding them{hint}. "
                f"({why})")

    def _raw_arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(images uint8 (N, 28, 28), labels int64 (N,))."""
        if split not in self._raw:
            self.prepare((split,))
            img_stem, lbl_stem = self._stems(split)
            images = read_idx(self._find(img_stem))
            labels = read_idx(self._find(lbl_stem)).astype(np.int64)
            if images.ndim != 3 or images.shape[0] != labels.shape[0]:
                raise ValueError(f"{self.name} {split}: images {images.shape} and labels "
                                 f"{labels.shape} do not match")
            self._raw[split] = (images.astype(np.uint8, copy=False), labels)
        return self._raw[split]

    def load(self, split: str, augment: bool = False) -> TensorImageDataset:
        """Dataset of ``(x (1, R, R) float32 in [-1, 1], label int64 0..9)``; held as uint8
        in memory. ``augment`` is unused."""
        check_split(split)
        if split not in self._cache:
            images, labels = self._raw_arrays(split)
            x = torch.from_numpy(images.copy()).unsqueeze(1)  # (N, 1, 28, 28) uint8
            h, w = x.shape[-2:]
            r = self.resolution
            if (h, w) != (r, r):
                if self.resize_mode == "pad":
                    top, left = (r - h) // 2, (r - w) // 2
                    x = F.pad(x, (left, r - w - left, top, r - h - top), value=0)
                else:
                    y = F.interpolate(x.float(), size=(r, r), mode="bilinear",
                                      align_corners=False, antialias=True)
                    x = y.round_().clamp_(0, 255).to(torch.uint8)
            self._cache[split] = TensorImageDataset(x.contiguous(), torch.from_numpy(labels))
        return self._cache[split]

    def fingerprint(self, split: str) -> str:
        """sha256 over name, split, resolution, resize_mode, count and the raw idx bytes."""
        images, labels = self._raw_arrays(split)
        content = bytes_sha256(np.ascontiguousarray(images).tobytes())
        return fingerprint_of(
            source=self.name,
            split=split,
            resolution=self.resolution,
            channels=self.channels,
            resize_mode=self.resize_mode,
            count=int(images.shape[0]),
            content=content,
        )

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={str(self.root)!r}, resolution={self.resolution}, "
                f"resize_mode={self.resize_mode!r})")


class FashionMNISTSource(MNISTSource):
    """Fashion-MNIST (Zalando; 28x28 grayscale clothing, labels 0..9). Same files, layout and
    options as :class:`MNISTSource`; torchvision layout ``root/FashionMNIST/raw``."""

    name = "fashion_mnist"
    torchvision_class = "FashionMNIST"
