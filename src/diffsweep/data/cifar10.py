"""CIFAR-10 from torchvision's python-pickle batches (optionally downloaded by torchvision)."""

from __future__ import annotations

import builtins
import codecs
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from diffsweep.data.base import ImageSource, TensorImageDataset, check_split, fingerprint_of
from diffsweep.files import bytes_sha256

BATCH_FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCHES = ("test_batch",)
NATIVE_RESOLUTION = 32


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The numpy callables a pickled ndarray names, under the module paths numpy 1.x and 2.x
    write (``numpy.core`` / ``numpy._core``), each mapped to the object itself."""
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray,
                                           ("numpy", "dtype"): np.dtype}
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer  # protocol 5
    return allowed


#: Every global a CIFAR-10 batch may name: numpy array reconstruction, the builtin containers and
#: scalars, and ``_codecs.encode`` (how a protocol-2 pickle written by Python 3 spells bytes).
_BATCH_GLOBALS: dict[tuple[str, str], Any] = {
    **_numpy_globals(),
    **{("builtins", name): getattr(builtins, name)
       for name in ("list", "dict", "tuple", "str", "bytes", "bytearray", "int", "float")},
    ("_codecs", "encode"): codecs.encode,
}


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles what a CIFAR-10 batch holds (numpy arrays, lists, dicts, strings, bytes,
    numbers) and refuses every other global, so a crafted batch cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        found = _BATCH_GLOBALS.get((module, name))
        if found is None:
            raise _RefusedGlobal(f"{module}.{name}")
        return found


class _RefusedGlobal(pickle.UnpicklingError):
    """A global outside :data:`_BATCH_GLOBALS` (its dotted name is the message)."""


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One pickled CIFAR-10 batch -> (images uint8 (N, 3, 32, 32), labels int64 (N,)).

    The file is a pickled dict with ``data`` (N, 3072) uint8, rows laid out as 1024 red, 1024
    green, 1024 blue values, and ``labels`` (N ints); keys may be ``str`` or ``bytes``. It is
    unpickled with a restricted unpickler (numpy arrays and builtin containers only): a file
    that names any other global is refused with a one-line ValueError naming it, before any of
    it runs.
    """
    try:
        with open(path, "rb") as handle:
            entry: dict[Any, Any] = _BatchUnpickler(handle, encoding="latin1").load()
    except _RefusedGlobal as refused:
        raise ValueError(f"{path} is not a CIFAR-10 batch: it names the Python global {refused}, "
                         f"and unpickling it would run code; a batch holds only numpy arrays, "
                         f"lists, strings and numbers. Replace it with torchvision's "
                         f"{BATCH_FOLDER} files.") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, UnicodeDecodeError) as error:
        first_line = (str(error).splitlines() or [""])[0]
        raise ValueError(f"{path} is not a CIFAR-10 batch: unpickling failed "
                         f"({type(error).__name__}{': ' if first_line else ''}{first_line}); it "
                         f"may be truncated.") from error
    if not isinstance(entry, dict):
        raise ValueError(f"{path} is not a CIFAR-10 batch (a pickled dict)")

    def field(name: str) -> Any:
        for key in (name, name.encode()):
            if key in entry:
                return entry[key]
        raise ValueError(f"{path} is not a CIFAR-10 batch: no {name!r} entry")

    data = np.asarray(field("data"), dtype=np.uint8)
    labels = np.asarray(field("labels"), dtype=np.int64).reshape(-1)
    side = NATIVE_RESOLUTION
    if data.ndim != 2 or data.shape[1] != 3 * side * side or data.shape[0] != labels.shape[0]:
        raise ValueError(f"{path}: data {data.shape} and labels {labels.shape} are not "
                         f"(N, {3 * side * side}) and (N,)")
    return data.reshape(-1, 3, side, side), labels


class Cifar10Source(ImageSource):
    """CIFAR-10 (Krizhevsky 2009; 32x32 RGB, labels 0..9): ``train`` = the 50k images of
    ``data_batch_1..5``, ``val`` = the 10k of ``test_batch``.

    The batches are looked up in ``root/cifar-10-batches-py`` (torchvision's layout), then in
    ``root`` itself. When they are missing and ``download`` is true, torchvision downloads and
    extracts the archive into ``root``.

    Args:
        root: data folder (``data.root``).
        resolution: output side (default 32, the native size; others resize bilinearly with
            antialiasing and re-quantize to uint8).
        random_flip: random horizontal flips on the train split (``augment``), the usual CIFAR-10
            augmentation.
        download: download with torchvision when the batches are missing.
    """

    name = "cifar10"
    channels = 3

    def __init__(self, root: str | os.PathLike, resolution: int = NATIVE_RESOLUTION,
                 random_flip: bool = True, download: bool = True):
        if resolution < 1:
            raise ValueError(f"resolution must be positive, got {resolution}")
        self.root = Path(os.path.expanduser(str(root)))
        self.resolution = int(resolution)
        self.random_flip = bool(random_flip)
        self.download = bool(download)
        self._raw: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._cache: dict[tuple[str, bool], TensorImageDataset] = {}

    @staticmethod
    def _batch_names(split: str) -> tuple[str, ...]:
        return TRAIN_BATCHES if check_split(split) == "train" else TEST_BATCHES

    def _search_dirs(self) -> list[Path]:
        return [self.root / BATCH_FOLDER, self.root]

    def _find(self, name: str) -> Path | None:
        for folder in self._search_dirs():
            if (folder / name).is_file():
                return folder / name
        return None

    def _missing(self, splits: tuple[str, ...]) -> list[str]:
        return sorted({name for split in splits for name in self._batch_names(split)
                       if self._find(name) is None})

    def prepare(self, splits: tuple[str, ...] = ("train", "val")) -> None:
        """Download with torchvision when batches of ``splits`` are missing and ``download`` is
        on; raise a FileNotFoundError saying where to put them when that is impossible."""
        missing = self._missing(splits)
        if not missing:
            return
        if self.download:
            import torchvision.datasets as tvd

            try:
                tvd.CIFAR10(str(self.root), train=True, download=True)
            except Exception as error:  # noqa: BLE001 - offline, proxy, mirror down...
                raise FileNotFoundError(self._missing_message(missing, f"download failed: {error}")
                                        ) from error
            missing = self._missing(splits)
            if not missing:
                return
        raise FileNotFoundError(self._missing_message(missing, "download is off"))

    def _missing_message(self, missing: list[str], why: str) -> str:
        hint = "" if self.download else " or set data.source.download=true when online"
        return (f"CIFAR-10 batches missing: {', '.join(missing)}. Put torchvision's "
                f"{BATCH_FOLDER} folder in {self.root}, or set data.root=... to the folder "
                f"holding it{hint}. ({why})")

    def _raw_arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(images uint8 (N, 3, 32, 32), labels int64 (N,)) of ``split``."""
        if split not in self._raw:
            self.prepare((split,))
            parts = [read_cifar_batch(self._find(name)) for name in self._batch_names(split)]
            self._raw[split] = (np.concatenate([images for images, _ in parts]),
                                np.concatenate([labels for _, labels in parts]))
        return self._raw[split]

    def load(self, split: str, augment: bool = False) -> TensorImageDataset:
        """Dataset of ``(x (3, R, R) float32 in [-1, 1], label int64 0..9)``, held as uint8 in
        memory; random horizontal flips when ``augment`` and ``random_flip``."""
        check_split(split)
        flip = bool(augment and self.random_flip)
        if (split, flip) not in self._cache:
            images, labels = self._raw_arrays(split)
            x = torch.from_numpy(np.ascontiguousarray(images))
            if self.resolution != NATIVE_RESOLUTION:
                size = (self.resolution, self.resolution)
                resized = F.interpolate(x.float(), size=size, mode="bilinear",
                                        align_corners=False, antialias=True)
                x = resized.round_().clamp_(0, 255).to(torch.uint8)
            self._cache[(split, flip)] = TensorImageDataset(x.contiguous(),
                                                            torch.from_numpy(labels),
                                                            random_flip=flip)
        return self._cache[(split, flip)]

    def fingerprint(self, split: str) -> str:
        """sha256 over name, split, resolution, channels, count and the raw image and label
        bytes (flips are augmentation and do not enter)."""
        images, labels = self._raw_arrays(check_split(split))
        return fingerprint_of(source=self.name, split=split, resolution=self.resolution,
                              channels=self.channels, count=int(images.shape[0]),
                              content=bytes_sha256(np.ascontiguousarray(images).tobytes(),
                                                   np.ascontiguousarray(labels).tobytes()))

    def __repr__(self) -> str:
        return f"Cifar10Source(root={str(self.root)!r}, resolution={self.resolution})"
