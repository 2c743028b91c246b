"""How a net runs while sampling: precision (autocast) and a compiled copy with frozen weights.

Sampling calls one fixed set of weights hundreds of times, so it can be compiled the way a
deployed model is: :class:`FrozenCompiledNet` ``torch.compile``\\ s a *copy* of the net with
inductor's ``freezing`` (weights folded in as constants, convolution weights pre-packed, casts and
pointwise ops fused). The compiled graph does not see later changes to the weights, so the copy is
compared with the live net before each use (:meth:`FrozenCompiledNet.matches`) and rebuilt when
they differ (the EMA weights change between validations).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from typing import Any, Iterator

import torch
from torch import Tensor, nn

#: Sampling precision -> autocast dtype (None: no autocast). Lightning's names are accepted too.
SAMPLE_PRECISIONS: dict[str, torch.dtype | None] = {
    "32": None, "32-true": None,
    "bf16": torch.bfloat16, "bf16-mixed": torch.bfloat16,
    "16": torch.float16, "16-mixed": torch.float16,
}


def autocast_dtype(precision: str | int) -> torch.dtype | None:
    """The autocast dtype of a sampling ``precision`` (``32``, ``bf16``, ``16`` or Lightning's
    ``*-mixed`` names); None means full float32."""
    key = str(precision)
    if key not in SAMPLE_PRECISIONS:
        raise ValueError(f"Unknown sampling precision {precision!r}; choose one of "
                         f"{', '.join(SAMPLE_PRECISIONS)}.")
    return SAMPLE_PRECISIONS[key]


@contextlib.contextmanager
def sampling_precision(precision: str | int, device: torch.device) -> Iterator[None]:
    """Autocast on ``device`` for the whole sampling run (one context, so each weight is cast once)."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        yield
        return
    with torch.autocast(device.type, dtype=dtype):
        yield


def _state_tensors(net: nn.Module) -> list[Tensor]:
    return list(itertools.chain(net.parameters(), net.buffers()))


class FrozenCompiledNet(nn.Module):
    """A compiled, weight-frozen copy of ``net`` for inference: ``forward`` as ``net``'s.

    Shapes are static: a batch smaller than one already compiled is padded up to it (rows are
    independent in a diffusion net: no batch statistics), so the short last chunk of a sampling run
    does not trigger a second compile. Gradients are never recorded.

    Args:
        net: the module to copy (left untouched; a compiled-in-place net is copied uncompiled).
        compile_options: ``torch.compile`` keyword arguments (``backend``, ``mode``, ...).
    """

    def __init__(self, net: nn.Module, compile_options: dict[str, Any] | None = None) -> None:
        super().__init__()
        # deepcopy drops a net.compile()'d call, so the snapshot runs its own weights
        snapshot = copy.deepcopy(net).eval().requires_grad_(False)
        self.snapshot = snapshot
        options = {"dynamic": False, **(compile_options or {})}
        self.compiled = torch.compile(snapshot, **options)
        self.batch_sizes: set[int] = set()

    def matches(self, net: nn.Module) -> bool:
        """True when ``net``'s parameters and buffers equal the frozen copy's (same shapes and
        values), i.e. this compiled net computes what ``net`` computes."""
        live, frozen = _state_tensors(net), _state_tensors(self.snapshot)
        return len(live) == len(frozen) and all(
            a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
            and torch.equal(a, b) for a, b in zip(live, frozen))

    def forward(self, x: Tensor, *args: Tensor) -> Tensor:
        batch = x.shape[0]
        padded = min((size for size in self.batch_sizes if size >= batch), default=batch)
        self.batch_sizes.add(padded)
        inputs = [x, *args]
        if padded != batch:
            inputs = [_pad_rows(tensor, padded) for tensor in inputs]
        import torch._inductor.config as inductor_config

        with torch.no_grad(), inductor_config.patch(freezing=True):
            try:
                return self.compiled(*inputs)[:batch]
            except torch._dynamo.exc.BackendCompilerFailed as error:
                raise RuntimeError(
                    f"Compiling the net for sampling failed ({type(error.inner_exception).__name__}"
                    f": {error.inner_exception}). Sample without compiling (evaluate.py "
                    f"compile=false, or module.sample_compile=false when training), or fix the "
                    f"compiler setup (inductor needs a C++ compiler on CPU, Triton on GPU)."
                ) from error


def _pad_rows(tensor: Tensor, rows: int) -> Tensor:
    """``tensor`` (B, ...) extended to ``rows`` rows by repeating its last row."""
    extra = tensor[-1:].expand(rows - tensor.shape[0], *tensor.shape[1:])
    return torch.cat([tensor, extra])


__all__ = ["FrozenCompiledNet", "SAMPLE_PRECISIONS", "autocast_dtype", "sampling_precision"]
