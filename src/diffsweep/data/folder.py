"""A folder (recursive) of image files of any common format."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from diffsweep.data.base import (
    ImageSource,
    TensorImageDataset,
    check_choice,
    check_split,
    fingerprint_of,
    split_indices,
    uint8_to_unit,
)
from diffsweep.files import bytes_sha256

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm",
)
ON_CORRUPT = ("skip", "fail")
MAX_LISTED = 5  # corrupt files named in the warning
ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")


class UnreadableFolderError(PermissionError):
    """An image folder (``data.root`` or a folder below it) that cannot be listed; one line
    naming it (:attr:`folder`) and ``data.root``."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = str(folder)
        super().__init__(f"image folder {folder} is not readable (permission denied) -- make it "
                         f"readable (chmod -R u+rX {folder}) or set data.root to a folder you "
                         f"can read")


def iter_images(root: Path, extensions: Sequence[str] = IMAGE_EXTENSIONS,
                unreadable: list[str] | None = None) -> Iterator[str]:
    """POSIX paths (relative to ``root``), in directory order, of every file below ``root`` whose
    lowercase suffix is in ``extensions``. Hidden files and folders (leading ``.``) are ignored;
    symlinked folders are followed.

    ``root`` itself unreadable raises :class:`UnreadableFolderError` (naming ``root`` and
    ``data.root``): it is not an empty folder. A subfolder without read permission is skipped
    and appended to ``unreadable`` (when given)."""
    exts = {e.lower() for e in extensions}
    root_error: list[OSError] = []

    def on_error(error: OSError) -> None:
        if Path(error.filename or "") == Path(root):
            root_error.append(error)
        elif unreadable is not None and isinstance(error, PermissionError):
            unreadable.append(str(error.filename))

    for dirpath, dirnames, filenames in os.walk(root, onerror=on_error, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for fn in filenames:
            if not fn.startswith(".") and os.path.splitext(fn)[1].lower() in exts:
                yield Path(dirpath, fn).relative_to(root).as_posix()
    if root_error:
        if isinstance(root_error[0], PermissionError):
            raise UnreadableFolderError(root)
        raise root_error[0]


def find_images(root: Path, extensions: Sequence[str] = IMAGE_EXTENSIONS,
                unreadable: list[str] | None = None) -> list[str]:
    """Sorted :func:`iter_images`: every image file below ``root``."""
    return sorted(iter_images(root, extensions, unreadable))


def count_images(root: Path, extensions: Sequence[str] = IMAGE_EXTENSIONS,
                 stop_at: int | None = None, unreadable: list[str] | None = None) -> int:
    """Image files below ``root`` (:func:`iter_images`), counting stopped at ``stop_at`` (None:
    all): a directory listing, no file is opened. ``root`` unreadable raises
    :class:`UnreadableFolderError`; unreadable subfolders go to ``unreadable``."""
    count = 0
    for _ in iter_images(root, extensions, unreadable):
        count += 1
        if stop_at is not None and count >= stop_at:
            break
    return count


def _integer_grey_to_l(im: Image.Image) -> Image.Image:
    """16-bit (``I;16*``) or 32-bit integer (``I``) greyscale -> 8-bit ``L``, mapping the 16-bit
    range 0..65535 linearly onto 0..255 (PIL's own ``convert("L")`` clips at 255 instead)."""
    values = np.asarray(im).astype(np.int64)
    return Image.fromarray(np.clip((values + 128) // 257, 0, 255).astype(np.uint8), mode="L")


def to_display_mode(im: Image.Image, channels: int) -> Image.Image:
    """Any PIL mode -> ``RGB`` (``channels=3``) or ``L`` (``channels=1``), 8 bits per channel.

    16-bit and 32-bit integer greyscale (``I;16``, ``I;16B``, ``I``) is read as 16-bit data and
    scaled to 8 bits; palette images (``P``) are expanded, with their transparency; alpha
    (``RGBA``, ``LA``, ``PA``, palette transparency) is composited over white.
    """
    if im.mode == "I" or im.mode.startswith("I;16"):
        im = _integer_grey_to_l(im)
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ALPHA_MODES:
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return im.convert("RGB" if channels == 3 else "L")


def load_image(path: Path | str, resolution: int, channels: int) -> torch.Tensor:
    """Decode one file to uint8 ``(C, R, R)``.

    First frame only (GIF/TIFF stacks), EXIF orientation applied, converted by
    :func:`to_display_mode` (16-bit scaled to 8, palettes expanded, transparency composited over
    white) to ``RGB`` (C=3) or ``L`` (C=1), shorter side resized to ``resolution`` (PIL bicubic,
    antialiased when shrinking), then center-cropped to ``R x R``.
    """
    with Image.open(path) as im:
        im.seek(0)
        im = to_display_mode(ImageOps.exif_transpose(im), channels)
    w, h = im.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    im = im.crop((left, top, left + resolution, top + resolution))
    arr = np.asarray(im, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def _decode_ok(path: Path) -> str | None:
    """None if ``path`` fully decodes, else a short error description."""
    try:
        with Image.open(path) as im:
            im.seek(0)
            im.load()
        return None
    except Exception as e:  # noqa: BLE001 - any decode failure counts as corrupt
        return f"{type(e).__name__}: {e}"


class ImageFileDataset(Dataset):
    """Decodes files on access. Items: ``(x (C, R, R) float32 in [-1, 1], label -1)``.

    Args:
        root: folder the ``files`` are relative to.
        files: relative paths.
        resolution, channels: see :func:`load_image`.
        random_flip: horizontal flip with probability 1/2 (torch global RNG, seeded per worker).
    """

    def __init__(self, root: Path, files: Sequence[str], resolution: int, channels: int,
                 random_flip: bool = False):
        self.root = Path(root)
        self.files = list(files)
        self.resolution = resolution
        self.channels = channels
        self.random_flip = random_flip

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        path = self.root / self.files[index]
        try:
            x = uint8_to_unit(load_image(path, self.resolution, self.channels))
        except Exception as e:
            raise RuntimeError(f"could not read image {path}: {type(e).__name__}: {e}") from e
        if self.random_flip and bool(torch.rand(()) < 0.5):
            x = x.flip(-1)
        return x, torch.tensor(-1, dtype=torch.int64)


class ImageFolderSource(ImageSource):
    """Every image file below ``root`` (recursive), unlabeled (label -1).

    The file index is built once (sorted relative paths, deterministic), and every file is
    decoded once at that time to find corrupt ones: ``on_corrupt=skip`` drops them and emits ONE
    warning with the count and the first few paths; ``on_corrupt=fail`` raises naming the file.

    Args:
        root: the folder (``data.root``).
        resolution: output side; shorter side resized to it, then center crop.
        channels: 3 (RGB) or 1 (grayscale, PIL ``L``).
        random_flip: random horizontal flips on the train split only.
        val_fraction: seeded share of files held out as ``val`` (0: ``val`` = all files).
        split_seed: seed of that split.
        on_corrupt: ``skip`` (default) or ``fail``.
        in_memory: decode all images once into a uint8 tensor (fast epochs for small folders;
            memory N*C*R*R bytes) instead of decoding on every access.
        extensions: file suffixes searched (case-insensitive).
        verify_workers: threads used for the one-time decode check.
    """

    name = "image_folder"

    def __init__(
        self,
        root: str | os.PathLike,
        resolution: int = 64,
        channels: int = 3,
        random_flip: bool = True,
        val_fraction: float = 0.01,
        split_seed: int = 0,
        on_corrupt: str = "skip",
        in_memory: bool = False,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        verify_workers: int = 4,
    ):
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
        if resolution < 1:
            raise ValueError(f"resolution must be positive, got {resolution}")
        self.root = Path(os.path.expanduser(str(root)))
        self.resolution = int(resolution)
        self.channels = int(channels)
        self.random_flip = bool(random_flip)
        self.val_fraction = float(val_fraction)
        self.split_seed = int(split_seed)
        self.on_corrupt = check_choice("on_corrupt", on_corrupt, ON_CORRUPT)
        self.in_memory = bool(in_memory)
        self.extensions = tuple(e if e.startswith(".") else "." + e for e in extensions)
        self.verify_workers = max(1, int(verify_workers))
        split_indices(2, self.val_fraction, 0)  # validate val_fraction early
        self._files: list[str] | None = None
        self.skipped: list[str] = []  # corrupt files dropped by on_corrupt=skip
        self._tensors: tuple[torch.Tensor, torch.Tensor] | None = None
        self._cache: dict[tuple[str, bool], Dataset] = {}

    # -- index -----------------------------------------------------------------------------
    def files(self) -> list[str]:
        """The verified, sorted file index (relative paths); built on first call."""
        if self._files is None:
            self._files = self._build_index()
        return self._files

    def _build_index(self) -> list[str]:
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"image folder not found: {self.root} -- set data.root=/path/to/images "
                "(a folder searched recursively for image files)"
            )
        unreadable: list[str] = []
        candidates = find_images(self.root, self.extensions, unreadable)
        if unreadable and not candidates:
            raise UnreadableFolderError(unreadable[0])
        if not candidates:
            raise FileNotFoundError(
                f"no images found under {self.root} (searched recursively for "
                f"{', '.join(self.extensions)}) -- set data.root to a folder of images"
            )
        if unreadable:
            shown = ", ".join(unreadable[:MAX_LISTED])
            extra = len(unreadable) - MAX_LISTED
            more = f" and {extra} more" if extra > 0 else ""
            warnings.warn(f"skipped {len(unreadable)} unreadable folder(s) (permission denied) "
                          f"under {self.root}: {shown}{more}", UserWarning, stacklevel=3)
        with ThreadPoolExecutor(self.verify_workers) as pool:
            errors = list(pool.map(_decode_ok, (self.root / f for f in candidates)))
        bad = [(f, e) for f, e in zip(candidates, errors) if e is not None]
        if bad and self.on_corrupt == "fail":
            f, e = bad[0]
            raise ValueError(
                f"unreadable image {self.root / f} ({e}); {len(bad)} corrupt file(s) in total. "
                "Remove it or set data.source.on_corrupt=skip"
            )
        if bad:
            self.skipped = [f for f, _ in bad]
            shown = ", ".join(str(self.root / f) for f in self.skipped[:MAX_LISTED])
            more = f" and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
            warnings.warn(
                f"skipped {len(bad)} corrupt/unreadable image(s) of {len(candidates)} under "
                f"{self.root}: {shown}{more}",
                UserWarning,
                stacklevel=3,
            )
        files = [f for f, e in zip(candidates, errors) if e is None]
        if not files:
            raise FileNotFoundError(
                f"every image under {self.root} is unreadable ({len(bad)} files)")
        return files

    def _split_files(self, split: str) -> tuple[list[str], torch.Tensor]:
        files = self.files()
        train, val = split_indices(len(files), self.val_fraction, self.split_seed)
        idx = train if check_split(split) == "train" else val
        return [files[i] for i in idx.tolist()], idx

    # -- datasets --------------------------------------------------------------------------
    def _all_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._tensors is None:
            files = self.files()
            with ThreadPoolExecutor(self.verify_workers) as pool:
                imgs = list(pool.map(
                    lambda f: load_image(self.root / f, self.resolution, self.channels), files))
            self._tensors = (torch.stack(imgs), torch.full((len(files),), -1, dtype=torch.int64))
        return self._tensors

    def load(self, split: str, augment: bool = False) -> Dataset:
        """Dataset of ``(x (C, R, R) float32 in [-1, 1], label -1)``; random flips when
        ``augment`` and ``random_flip`` are both true."""
        check_split(split)
        flip = bool(augment and self.random_flip)
        key = (split, flip)
        if key not in self._cache:
            files, idx = self._split_files(split)
            if self.in_memory:
                images, labels = self._all_tensors()
                self._cache[key] = TensorImageDataset(images[idx], labels[idx], random_flip=flip)
            else:
                self._cache[key] = ImageFileDataset(
                    self.root, files, self.resolution, self.channels, random_flip=flip)
        return self._cache[key]

    def fingerprint(self, split: str) -> str:
        """sha256 over name, split, resolution, channels, count, split parameters and a digest of
        the split's file list with sizes and mtimes (no pixels are read)."""
        files, _ = self._split_files(split)
        listing = []
        for f in files:
            st = (self.root / f).stat()
            listing.append(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return fingerprint_of(
            source=self.name,
            split=split,
            resolution=self.resolution,
            channels=self.channels,
            val_fraction=self.val_fraction,
            split_seed=self.split_seed,
            count=len(files),
            content=bytes_sha256(*listing),
        )

    def __repr__(self) -> str:
        return (f"ImageFolderSource(root={str(self.root)!r}, resolution={self.resolution}, "
                f"channels={self.channels})")
