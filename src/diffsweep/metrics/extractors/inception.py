"""``InceptionFeatureExtractor``: torch-fidelity's Inception-v3 (2048-d pool3) exactly as
torchmetrics' ``FrechetInceptionDistance(feature=2048, antialias=False)`` runs it: images
quantised to uint8, torch-fidelity's TF1-compatible bilinear resize to 299, no antialias. FID with
it is comparable to published numbers.

Weights: ``weights=`` (config key :data:`INCEPTION_CONFIG_KEY`), else
``$DIFFSWEEP_INCEPTION_WEIGHTS``, else the torch hub cache, else a download with a short socket
timeout; offline with none of these -> :class:`InceptionWeightsError` naming the file and every
way to provide it.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from diffsweep.files import file_sha256
from diffsweep.metrics.extractors.base import FeatureExtractor, freeze, to_rgb, to_uint8

log = logging.getLogger(__name__)

#: torch-fidelity's Inception-v3 weights (converted from the 2015-12-05 TensorFlow FID graph).
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
    "weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_ENV = "DIFFSWEEP_INCEPTION_WEIGHTS"
INCEPTION_CONFIG_KEY = "metrics.fid.evaluator.extractor.weights"


class InceptionWeightsError(FileNotFoundError):
    """The Inception weights file is missing and could not be downloaded."""


def inception_hub_path() -> Path:
    """Where torch hub (and torch-fidelity) keep the downloaded weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILENAME


def _download(url: str, destination: str, timeout: float) -> None:
    """Download with a socket timeout so that an offline machine fails fast instead of hanging."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        torch.hub.download_url_to_file(url, destination, progress=False)
    finally:
        socket.setdefaulttimeout(previous)


def missing_weights_message(reason: str = "") -> str:
    """What is missing and every way to provide it."""
    hub = inception_hub_path()
    return (
        "Inception-v3 weights for FID are not available"
        + (f" ({reason})" if reason else "")
        + ".\nOn a machine with internet access download\n"
        f"    {INCEPTION_URL}\n"
        f"(file name {INCEPTION_FILENAME}) and then either\n"
        f"  - put it at {hub} (the torch hub cache, found automatically), or\n"
        f"  - set the config key {INCEPTION_CONFIG_KEY}=/path/to/{INCEPTION_FILENAME}, or\n"
        f"  - export {INCEPTION_ENV}=/path/to/{INCEPTION_FILENAME}.\n"
        "Without Inception, use metrics=fid_classifier or metrics=fid_tiny "
        "(not comparable to published FID)."
    )


def resolve_inception_weights(weights: str | os.PathLike | None = None, download: bool = True,
                              timeout: float = 10.0) -> Path:
    """The Inception weights file: ``weights`` > ``$DIFFSWEEP_INCEPTION_WEIGHTS`` > torch hub
    cache > a download into the torch hub cache (``timeout`` seconds per socket operation).

    Raises:
        InceptionWeightsError: with instructions, when none of these works.
    """
    for source, value in (("config key " + INCEPTION_CONFIG_KEY, weights),
                          ("environment variable " + INCEPTION_ENV, os.environ.get(INCEPTION_ENV))):
        if value:
            path = Path(value).expanduser()
            if not path.is_file():
                raise InceptionWeightsError(missing_weights_message(
                    f"{source} points to {path}, which does not exist"))
            return path
    hub = inception_hub_path()
    if hub.is_file():
        return hub
    if not download:
        raise InceptionWeightsError(missing_weights_message(
            f"{hub} does not exist and downloads are disabled"))
    hub.parent.mkdir(parents=True, exist_ok=True)
    log.info("Downloading Inception-v3 FID weights from %s to %s", INCEPTION_URL, hub)
    started = time.monotonic()
    try:
        _download(INCEPTION_URL, str(hub), timeout)
    except Exception as error:  # noqa: BLE001 - any failure means "offline" here
        raise InceptionWeightsError(missing_weights_message(
            f"download failed after {time.monotonic() - started:.1f}s: "
            f"{type(error).__name__}: {error}")) from error
    return hub


@contextlib.contextmanager
def _without_weights() -> Iterator[None]:
    """Build torch-fidelity's Inception without loading any weights (throughput timing only)."""
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as fidelity_inception

    with mock.patch.object(fidelity_inception, "load_state_dict_from_url", lambda *a, **k: None), \
            mock.patch.object(fidelity_inception.FeatureExtractorInceptionV3, "load_state_dict",
                              lambda self, *a, **k: None):
        yield


class InceptionFeatureExtractor(FeatureExtractor):
    """2048-d Inception-v3 pool features as torchmetrics' FID computes them with
    ``antialias=False`` (== torch-fidelity and the reference TF implementation's resize).

    Args:
        weights: local weights file (else env var, hub cache, download; see
            :func:`resolve_inception_weights`).
        download: allow a download when no file is found.
        timeout: socket timeout (seconds) of the download.
        random_weights: load no weights (throughput benchmarks only; never for FID).
    """

    name = "inception"
    comparable = True

    def __init__(self, weights: str | os.PathLike | None = None, download: bool = True,
                 timeout: float = 10.0, random_weights: bool = False) -> None:
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.num_features = 2048
        if random_weights:
            self.weights_path = None
            self.weights_sha256 = "random"
            with _without_weights():
                net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                         antialias=False)
        else:
            path = resolve_inception_weights(weights, download=download, timeout=timeout)
            self.weights_path = str(path)
            self.weights_sha256 = file_sha256(path)
            try:
                net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                         feature_extractor_weights_path=str(path),
                                         antialias=False)
            except Exception as error:  # noqa: BLE001
                raise InceptionWeightsError(missing_weights_message(
                    f"{path} could not be loaded: {type(error).__name__}: {error}")) from error
            log.info("FID: Inception-v3 weights %s (sha256 %s)", path, self.weights_sha256[:16])
        self.net = freeze(net)
        freeze(self)

    @property
    def identity(self) -> str:
        return f"inception-v3-tf2015-pool2048-noaa:{self.weights_sha256[:16]}"

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return self.net(to_uint8(to_rgb(images)))


__all__ = ["INCEPTION_CONFIG_KEY", "INCEPTION_ENV", "INCEPTION_FILENAME", "INCEPTION_URL",
           "InceptionFeatureExtractor", "InceptionWeightsError", "inception_hub_path",
           "missing_weights_message", "resolve_inception_weights"]
