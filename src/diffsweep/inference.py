"""How a net runs while sampling: precision (autocast) and a compiled copy of the net.

Sampling calls one set of weights hundreds of times, so it pays to compile it.
:class:`CompiledSamplingNet` ``torch.compile``\\ s a *copy* of the net (the training net and its
own compile are left alone), in one of two modes:

- ``freeze_weights=True`` (``evaluate.py compile=true``: one checkpoint per job): inductor's
  ``freezing`` folds the weights into the graph as constants, pre-packs convolution weights and
  folds the bf16 casts (1.2-1.5x a plain compile on a CPU). The graph cannot follow later weight
  changes, so :meth:`CompiledSamplingNet.matches` is checked before each use and a changed net
  gets a new compile. Inductor keeps what it compiled for the life of the process, frozen weights
  included, so this mode is for weights that do not change: the last frozen copy is shared
  between modules with equal weights (an ``evaluate.py -m`` sweep over one checkpoint compiles
  once).
- ``freeze_weights=False`` (``module.sample_compile=true`` during training, where the EMA weights
  change every validation): a plain compile that reads the copy's parameters at run time; new
  weights are copied into them in place (:meth:`CompiledSamplingNet.load_weights_from`), so one
  compile serves the whole run.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import time
import types
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

#: Seconds of ``torch.compile`` per submodule of the net, for the "compiling ... ~N s" line:
#: unet_tiny (136 modules) compiled for sampling with frozen weights in 46 s on one thread of a
#: busy 2-core CPU with a cold inductor cache (12 s once the cache held that graph; a quiet CPU
#: or a GPU takes less, a machine under heavy load several times more).
COMPILE_SECONDS_PER_MODULE = 0.34

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
    """Autocast on ``device`` for the whole sampling run
    (one context, so each weight is cast once)."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        yield
        return
    with torch.autocast(device.type, dtype=dtype):
        yield


def _state_tensors(net: nn.Module) -> list[Tensor]:
    return list(itertools.chain(net.parameters(), net.buffers()))


class CompiledSamplingNet(nn.Module):
    """A compiled copy of ``net`` for inference: ``forward`` as ``net``'s, without gradients.

    Shapes are static: a batch smaller than one already compiled is padded up to it (rows are
    independent in a diffusion net: no batch statistics), so the short last chunk of a sampling run
    does not trigger a second compile.

    Args:
        net: the module to copy (left untouched; a compiled-in-place net is copied uncompiled).
        compile_options: ``torch.compile`` keyword arguments (``backend``, ``mode``, ...).
        freeze_weights: fold the weights into the compiled graph (see the module docstring).
    """

    def __init__(self, net: nn.Module, compile_options: dict[str, Any] | None = None,
                 freeze_weights: bool = False) -> None:
        super().__init__()
        # deepcopy drops a net.compile()'d call, so the snapshot runs its own weights
        self.snapshot = copy.deepcopy(net).eval().requires_grad_(False)
        self._snapshot_tensors = _state_tensors(self.snapshot)  # fixed for the copy's life
        self.freeze_weights = freeze_weights
        self.compile_options = dict(compile_options or {})
        options = {"dynamic": False, **self.compile_options}
        self.compiled = torch.compile(_fresh_call_function(), **options)
        self.batch_sizes: set[int] = set()

    def _same_layout(self, live: list[Tensor]) -> bool:
        return len(live) == len(self._snapshot_tensors) and all(
            a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
            for a, b in zip(live, self._snapshot_tensors))

    def matches(self, net: nn.Module) -> bool:
        """True when ``net``'s parameters and buffers equal the copy's (same shapes, dtypes,
        devices and values), i.e. this compiled net computes what ``net`` computes."""
        live = _state_tensors(net)
        return self._same_layout(live) and all(
            torch.equal(a, b) for a, b in zip(live, self._snapshot_tensors))

    def load_weights_from(self, net: nn.Module) -> bool:
        """Copy ``net``'s weights into the copy in place; False (nothing copied) when the weights
        are frozen into the graph or the layout differs: then a new compiled copy is needed."""
        live = _state_tensors(net)
        if self.freeze_weights or not self._same_layout(live):
            return False
        with torch.no_grad():
            torch._foreach_copy_(self._snapshot_tensors, live)
        return True

    def estimated_compile_seconds(self) -> float:
        """The expected seconds of one compile of this net (:data:`COMPILE_SECONDS_PER_MODULE`)."""
        return COMPILE_SECONDS_PER_MODULE * sum(1 for _ in self.snapshot.modules())

    def forward(self, x: Tensor, *args: Tensor) -> Tensor:
        """``net(x, *args)`` through the compiled copy; the first call with a new batch size
        compiles (announced with its estimated time, then the time it took, at INFO)."""
        batch = x.shape[0]
        padded = min((size for size in self.batch_sizes if size >= batch), default=batch)
        compiles = padded not in self.batch_sizes
        self.batch_sizes.add(padded)
        inputs = [x, *args]
        if padded != batch:
            inputs = [_pad_rows(tensor, padded) for tensor in inputs]
        import torch._inductor.config as inductor_config

        with torch.no_grad(), inductor_config.patch(freezing=self.freeze_weights):
            try:
                if not compiles:
                    return self.compiled(self.snapshot, *inputs)[:batch]
                log.info("Compiling the sampling net for batches of %d (one-off, ~%.0f s; less "
                         "with a warm compile cache)...", padded, self.estimated_compile_seconds())
                started = time.perf_counter()
                output = self.compiled(self.snapshot, *inputs)[:batch]
                log.info("Compiled the sampling net in %.1f s.", time.perf_counter() - started)
                return output
            except torch._dynamo.exc.BackendCompilerFailed as error:
                raise RuntimeError(
                    f"Compiling the net for sampling failed ({type(error.inner_exception).__name__}"
                    f": {error.inner_exception}). Sample without compiling (evaluate.py "
                    f"compile=false, or module.sample_compile=false when training), or fix the "
                    f"compiler setup (inductor needs a C++ compiler on CPU, Triton on GPU)."
                ) from error


#: The most recent frozen copy, shared by every net whose weights equal it (see the module
#: docstring: inductor keeps frozen weights alive anyway, so recompiling them would only add more).
_last_frozen: CompiledSamplingNet | None = None
#: The compiled copy last used for each live net (dropped with the net).
_copies: weakref.WeakKeyDictionary[nn.Module, CompiledSamplingNet] = weakref.WeakKeyDictionary()


def compiled_sampling_net(net: nn.Module, current: CompiledSamplingNet | None,
                          compile_options: dict[str, Any] | None,
                          freeze_weights: bool) -> CompiledSamplingNet:
    """A compiled copy that computes what ``net`` computes: ``current`` when it still does (or
    can be brought up to date in place), else the last frozen copy with ``net``'s weights, else a
    new one."""
    global _last_frozen
    options = dict(compile_options or {})
    if (current is not None and current.freeze_weights == freeze_weights
            and current.compile_options == options):
        # plain: copying is cheaper than comparing first; frozen: only equal weights will do
        if current.load_weights_from(net) or current.matches(net):
            return current
    if (freeze_weights and _last_frozen is not None
            and _last_frozen.compile_options == options and _last_frozen.matches(net)):
        return _last_frozen
    compiled = CompiledSamplingNet(net, options, freeze_weights)
    if freeze_weights:
        _last_frozen = compiled
    return compiled


def sampling_net(net: nn.Module, compile_options: dict[str, Any] | None = None,
                 freeze_weights: bool = False) -> CompiledSamplingNet:
    """The compiled copy to sample ``net`` with, kept per net between calls (see
    :func:`compiled_sampling_net`); the net itself holds no reference to it."""
    compiled = compiled_sampling_net(net, _copies.get(net), compile_options, freeze_weights)
    _copies[net] = compiled
    return compiled


def cached_sampling_net(net: nn.Module) -> CompiledSamplingNet | None:
    """The compiled copy :func:`sampling_net` last returned for ``net``, if any."""
    return _copies.get(net)


def _call_module(module: nn.Module, *args: Tensor) -> Tensor:
    return module(*args)


_copies_made = itertools.count()


def _fresh_call_function() -> Callable[..., Tensor]:
    """``_call_module`` with a code object of its own.

    Dynamo keeps compiled graphs on the code object of the function it compiles, and allows a
    code object only ``recompile_limit`` (8) graphs before running it uncompiled. Compiling each
    copy through the net's own ``forward`` would share one code object between all copies: after
    8 copies (e.g. 8 evaluated checkpoints) sampling would silently run eager. A new code object
    per copy keeps each copy's graphs to itself.
    """
    template = _call_module.__code__
    name = f"sampling_net_call_{next(_copies_made)}"
    code = template.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, _call_module.__globals__, name)


def _pad_rows(tensor: Tensor, rows: int) -> Tensor:
    """``tensor`` (B, ...) extended to ``rows`` rows by repeating its last row."""
    extra = tensor[-1:].expand(rows - tensor.shape[0], *tensor.shape[1:])
    return torch.cat([tensor, extra])


__all__ = ["CompiledSamplingNet", "SAMPLE_PRECISIONS", "autocast_dtype", "cached_sampling_net",
           "compiled_sampling_net", "sampling_net", "sampling_precision"]
