"""A lazily-loaded, frozen VAE (diffusers ``AutoencoderKL``) for latent diffusion.

``LatentVAE`` is deliberately *not* an ``nn.Module``: it is held by the
:class:`~diffsweep.data.latents.LatentSource` (on the DataModule), outside the LightningModule
tree, so that EMA neither averages nor copies it, and it never lands in a checkpoint.

diffusers is an optional dependency (``pip install -e ".[latent]"``). It is imported only when a
``LatentVAE`` needs it (the ``.config`` of a pretrained VAE, or the model itself); importing this
module does not import diffusers.

Latent convention (the one diffusers pipelines use)::

    latents = (z - shift_factor) * scaling_factor           # z: raw VAE posterior sample / mean
    z       = latents / scaling_factor + shift_factor        # before vae.decode

``shift_factor`` is 0 when the VAE config has none (SD 1.x/2.x, SDXL); SD3 / Flux VAEs have one.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch

from diffsweep.files import stable_hash, tensors_sha256
from diffsweep.hydra_utils import to_plain

__all__ = ["LatentVAE", "require_diffusers", "IGNORED_CONFIG_KEYS"]

# Config keys that do not change what ``encode`` computes: diffusers bookkeeping (``_*``) and the
# latent normalisation constants, which are applied when latents are *served*, not when cached.
IGNORED_CONFIG_KEYS = frozenset({"scaling_factor", "shift_factor", "latents_mean", "latents_std"})

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def require_diffusers() -> Any:
    """Import and return ``diffusers.AutoencoderKL``; raise ImportError with the fix if missing."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "Latent diffusion needs diffusers (AutoencoderKL). Install the optional extra: "
            'pip install -e ".[latent]"   (or: pip install "diffusers>=0.30,<1" safetensors)'
        ) from err
    return AutoencoderKL


class LatentVAE:
    """Frozen ``AutoencoderKL``, from a local path / hub id or from a config dict (random init).

    Exactly one of ``pretrained`` and ``config`` must be given.

    Args:
        pretrained: local directory or hub id for ``AutoencoderKL.from_pretrained``
            (e.g. ``stabilityai/sd-vae-ft-mse``; ``stabilityai/stable-diffusion-xl-base-1.0`` with
            ``subfolder=vae``).
        subfolder: optional subfolder of ``pretrained``.
        revision: optional hub revision.
        config: ``AutoencoderKL`` keyword arguments for a randomly initialised VAE (tests,
            experiments); ``in_channels``/``out_channels`` default to the image channels the
            DataModule passes to :meth:`bind_image_channels`.
        seed: seed for the random initialisation (``config`` only), so the VAE is reproducible.
        dtype: ``float32`` | ``float16`` | ``bfloat16``: the VAE's compute dtype.
        latent_channels, downsample_factor: optional *declared* values (Hydra configs use them to
            interpolate ``data.channels``/``data.resolution`` without loading anything); checked
            against the real VAE config, ValueError on mismatch.
        scaling_factor, shift_factor: override the VAE config's values (``None``: the config's;
            shift 0 when the config has none).
    """

    def __init__(
        self,
        pretrained: str | None = None,
        subfolder: str | None = None,
        revision: str | None = None,
        config: Mapping[str, Any] | None = None,
        seed: int = 0,
        dtype: str = "float32",
        latent_channels: int | None = None,
        downsample_factor: int | None = None,
        scaling_factor: float | None = None,
        shift_factor: float | None = None,
    ) -> None:
        if (pretrained is None) == (config is None):
            raise ValueError(
                "LatentVAE needs exactly one of `pretrained` (a local path or hub id, e.g. "
                "vae.pretrained=stabilityai/sd-vae-ft-mse) or `config` (AutoencoderKL kwargs for a "
                "random init, e.g. vae=tiny)."
            )
        if dtype not in _DTYPES:
            raise ValueError(f"vae.dtype={dtype!r}; choose one of {sorted(_DTYPES)}")
        self.pretrained = None if pretrained is None else str(pretrained)
        self.subfolder = subfolder or None
        self.revision = revision or None
        self._config_kwargs: dict[str, Any] | None = (
            None if config is None else dict(to_plain(config)))
        self.seed = int(seed)
        self.dtype_name = dtype
        self.dtype = _DTYPES[dtype]
        self._declared_latent_channels = latent_channels
        self._declared_downsample = downsample_factor
        self._scaling_override = scaling_factor
        self._shift_override = shift_factor
        self._config: dict[str, Any] | None = None
        self._model: Any = None  # AutoencoderKL, built lazily
        self._weights_hash: str | None = None
        self.encode_calls = 0  # number of ``encode`` batches run (tests use it)

    # ------------------------------------------------------------------ config (cheap)
    def bind_image_channels(self, channels: int) -> None:
        """Default ``in_channels``/``out_channels`` of a config-built VAE to the image channels."""
        if self._config_kwargs is not None and self._config is None:
            self._config_kwargs.setdefault("in_channels", int(channels))
            self._config_kwargs.setdefault("out_channels", int(channels))

    @property
    def config(self) -> dict[str, Any]:
        """The full ``AutoencoderKL`` config (defaults filled in) as a plain dict.

        For ``pretrained`` this reads only ``config.json`` (no weights)."""
        if self._config is None:
            AutoencoderKL = require_diffusers()
            if self._config_kwargs is not None:
                params = inspect.signature(AutoencoderKL.__init__).parameters
                defaults = {
                    k: p.default
                    for k, p in params.items()
                    if k != "self" and p.kind is p.POSITIONAL_OR_KEYWORD
                }
                unknown = set(self._config_kwargs) - set(defaults)
                if unknown:
                    raise ValueError(
                        f"vae.config has keys AutoencoderKL does not accept: {sorted(unknown)}; "
                        f"valid keys: {sorted(defaults)}"
                    )
                cfg = {**defaults, **self._config_kwargs}
                # Convenience: one encoder/decoder block type per block_out_channels entry.
                nblocks = len(cfg["block_out_channels"])
                for key in ("down_block_types", "up_block_types"):
                    if key not in self._config_kwargs and len(cfg[key]) != nblocks:
                        cfg[key] = [cfg[key][0]] * nblocks
            else:
                cfg = dict(
                    AutoencoderKL.load_config(
                        self.pretrained, subfolder=self.subfolder, revision=self.revision
                    )
                )
            self._config = to_plain(cfg)
            self._check_declared()
        return self._config

    def _check_declared(self) -> None:
        assert self._config is not None
        actual = {
            "latent_channels": self.latent_channels,
            "downsample_factor": self.downsample_factor,
        }
        for key, declared in (
            ("latent_channels", self._declared_latent_channels),
            ("downsample_factor", self._declared_downsample),
        ):
            if declared is not None and int(declared) != actual[key]:
                raise ValueError(
                    f"vae.{key}={declared} but the VAE ({self.name}) has {key}={actual[key]}; "
                    f"set vae.{key}={actual[key]} (it feeds data.channels / data.resolution)."
                )

    @property
    def name(self) -> str:
        """Human-readable identity: the pretrained id/path (+subfolder) or ``config:<hash>``."""
        if self.pretrained is not None:
            return self.pretrained + (f"/{self.subfolder}" if self.subfolder else "")
        return f"config:{self.config_hash}"

    @property
    def latent_channels(self) -> int:
        return int(self.config["latent_channels"])

    @property
    def downsample_factor(self) -> int:
        """Spatial downsampling: 2 ** (number of encoder blocks - 1) for ``AutoencoderKL``."""
        return 2 ** (len(self.config["block_out_channels"]) - 1)

    @property
    def in_channels(self) -> int:
        return int(self.config["in_channels"])

    @property
    def out_channels(self) -> int:
        return int(self.config["out_channels"])

    @property
    def scaling_factor(self) -> float:
        if self._scaling_override is not None:
            return float(self._scaling_override)
        return float(self.config.get("scaling_factor") or 1.0)

    @property
    def shift_factor(self) -> float:
        if self._shift_override is not None:
            return float(self._shift_override)
        return float(self.config.get("shift_factor") or 0.0)

    @property
    def config_hash(self) -> str:
        """Hash of the config entries that change what ``encode`` computes (see module doc)."""
        cfg = {
            k: v
            for k, v in self.config.items()
            if not k.startswith("_") and k not in IGNORED_CONFIG_KEYS
        }
        return stable_hash(cfg, 16)

    # ------------------------------------------------------------------ model (lazy)
    @property
    def model(self) -> Any:
        """The frozen ``AutoencoderKL`` in eval mode (loaded / built on first use, on CPU)."""
        if self._model is None:
            AutoencoderKL = require_diffusers()
            if self._config_kwargs is not None:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(self.seed)
                    model = AutoencoderKL(**self.config_init_kwargs())
            else:
                model = AutoencoderKL.from_pretrained(
                    self.pretrained,
                    subfolder=self.subfolder,
                    revision=self.revision,
                    torch_dtype=self.dtype,
                )
            if model.dtype != self.dtype:
                model = model.to(dtype=self.dtype)
            model = model.eval().requires_grad_(False)
            self._model = model
            if self._config is None:
                self._config = to_plain(dict(model.config))
                self._check_declared()
        return self._model

    def config_init_kwargs(self) -> dict[str, Any]:
        return {k: v for k, v in self.config.items() if not k.startswith("_")}

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def weights_hash(self) -> str:
        """sha256 over all parameter/buffer names, dtypes, shapes and bytes (loads the model)."""
        if self._weights_hash is None:
            self._weights_hash = tensors_sha256(self.model.state_dict(), include_layout=True)[:16]
        return self._weights_hash

    def identity(self) -> dict[str, Any]:
        """What the latent cache is keyed by (loads the model to hash its weights)."""
        return {
            "pretrained": self.pretrained,
            "subfolder": self.subfolder,
            "revision": self.revision,
            "config_hash": self.config_hash,
            "weights_hash": self.weights_hash,
            "dtype": self.dtype_name,
        }

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: torch.device | str) -> LatentVAE:
        """Move the VAE (in place) to ``device``; a no-op when already there."""
        device = torch.device(device)
        if self.device != device:
            self._model = self.model.to(device)
        return self

    # ------------------------------------------------------------------ compute
    def _adapt_in(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        if c == self.in_channels:
            return x
        if c == 1:
            return x.expand(-1, self.in_channels, -1, -1)
        raise ValueError(
            f"images have {c} channels but the VAE expects {self.in_channels} "
            "(only 1 -> N replication is automatic)"
        )

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior of a batch of images.

        Args:
            images: (B, C, H, W) in [-1, 1], any float dtype/device (moved to the VAE's).
        Returns:
            ``(mean, std)``: float32 (B, latent_channels, H/f, W/f) on the VAE's device, *raw*
            (no scaling/shift), f = ``downsample_factor``.
        """
        model = self.model
        x = self._adapt_in(images.to(device=self.device, dtype=self.dtype))
        self.encode_calls += 1
        dist = model.encode(x).latent_dist
        return dist.mean.float(), dist.std.float()

    def scale(self, z: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents -> model-space latents: ``(z - shift) * scale``."""
        return (z - self.shift_factor) * self.scaling_factor

    def unscale(self, latents: torch.Tensor) -> torch.Tensor:
        """Model-space latents -> raw VAE latents: ``latents / scale + shift``."""
        return latents / self.scaling_factor + self.shift_factor

    @torch.no_grad()
    def decode(
        self, latents: torch.Tensor, batch_size: int = 32, out_channels: int | None = None
    ) -> torch.Tensor:
        """Model-space latents (B, latent_channels, h, w) -> images (B, C, h*f, w*f) in [-1, 1].

        Runs on ``latents.device`` (the VAE is moved there lazily), in batches of ``batch_size``;
        returns float32 on ``latents.device``. ``out_channels=1`` averages an RGB VAE's output to
        grey (for 1-channel datasets)."""
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"decode expects (B, {self.latent_channels}, h, w) latents, "
                f"got {tuple(latents.shape)}"
            )
        self.to(latents.device)
        outs = []
        for chunk in latents.split(max(1, int(batch_size))):
            z = self.unscale(chunk.float()).to(self.dtype)
            img = self.model.decode(z).sample.float()
            if out_channels is not None and img.shape[1] != out_channels:
                if out_channels == 1:
                    img = img.mean(dim=1, keepdim=True)
                else:
                    raise ValueError(
                        f"VAE decodes {img.shape[1]} channels, asked for {out_channels}")
            outs.append(img.clamp_(-1.0, 1.0))
        return torch.cat(outs) if outs else latents.new_zeros((0,))

    def __repr__(self) -> str:
        return f"LatentVAE({self.name}, dtype={self.dtype_name}, loaded={self.loaded})"
