"""Attention backends: one module per backend, one registry here.

Every backend computes the same function on the packed layout of ``iceaggr_lib.collate``:

    out[d] = mean over pulses i of DOM d of  softmax_j( q_i . k_j * scale ) v_j,  j in DOM d

i.e. multi-head attention restricted to the pulses of one DOM, followed by mean pooling to one row
per DOM. Inputs ``q, k, v`` are (N, H, Dh) packed pulses (the varlen/FlashAttention layout);
the output is (D, H, Dh). ``scale`` defaults to 1/sqrt(Dh).

A backend is a ``BackendSpec``: what it supports (devices, dtypes, modes), ``prepare(batch, n_heads,
head_dim, dtype)`` — the per-batch set-up it needs (a BlockMask, padding indices, chunking), timed
with it in the benchmarks — and ``attend(q, k, v, batch, prep, scale)``. Adding a backend means one
new module that defines ``SPEC`` and one line in ``_BACKEND_MODULES`` below.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from iceaggr_lib.collate import DomBatch

MODES = ("forward", "forward_backward")


class UnsupportedError(RuntimeError):
    """The backend cannot run this (device, dtype, mode) combination; benchmarks record it as 'unsupported'."""


@dataclass(frozen=True)
class BackendSpec:
    name: str
    description: str
    devices: frozenset  # of "cpu", "cuda"
    dtypes: frozenset  # of torch dtypes
    modes: frozenset  # of "forward", "forward_backward"
    attend: Callable[..., torch.Tensor]  # (q, k, v, batch, prep, scale) -> (D, H, Dh)
    prepare: Callable[..., Any] = field(default=lambda batch, n_heads, head_dim, dtype: None)
    # (device type, mode) pairs that are refused although device and mode are each supported,
    # with the reason, e.g. {("cpu", "forward_backward"): "FlexAttention does not support backward on CPU"}
    refused: tuple = ()

    def check(self, device: str | torch.device, dtype: torch.dtype, mode: str = "forward") -> None:
        """Raise UnsupportedError, naming the backend, if it cannot run this combination."""
        dev = torch.device(device).type
        if dev not in self.devices:
            raise UnsupportedError(f"backend '{self.name}' does not run on {dev} (supports: {sorted(self.devices)})")
        if dtype not in self.dtypes:
            names = sorted(str(d).replace("torch.", "") for d in self.dtypes)
            raise UnsupportedError(f"backend '{self.name}' does not support {str(dtype).replace('torch.', '')} "
                                   f"(supports: {names})")
        if mode not in self.modes:
            raise UnsupportedError(f"backend '{self.name}' does not support mode '{mode}' (supports: {sorted(self.modes)})")
        for (ref_dev, ref_mode), why in self.refused:
            if ref_dev == dev and ref_mode == mode:
                raise UnsupportedError(f"backend '{self.name}': {why}")


# name -> module path; each module defines SPEC (or SPECS, a list, for modules with variants).
_BACKEND_MODULES = {
    "reference": "iceaggr_lib.backends.reference",
    "loop": "iceaggr_lib.backends.loop",
    "padded": "iceaggr_lib.backends.padded",
    "flex_dense": "iceaggr_lib.backends.flex_dense",
    "flex_dense_eager": "iceaggr_lib.backends.flex_dense",
    "flex_block": "iceaggr_lib.backends.flex_block",
    "varlen": "iceaggr_lib.backends.varlen",
    "dom_fused": "iceaggr_lib.backends.dom_fused",
    "auto": "iceaggr_lib.backends.auto",
}

_cache: dict[str, BackendSpec] = {}


def register_module(name: str, module_path: str) -> None:
    """Add a backend module to the registry (used by backends that live outside this package)."""
    _BACKEND_MODULES[name] = module_path
    _cache.pop(name, None)


def available_backends() -> list[str]:
    return list(_BACKEND_MODULES)


def get_backend(name: str) -> BackendSpec:
    """The BackendSpec registered as ``name``; a clear KeyError lists the known names."""
    if name in _cache:
        return _cache[name]
    if name not in _BACKEND_MODULES:
        raise KeyError(f"unknown attention backend '{name}'; known: {', '.join(available_backends())}")
    module = importlib.import_module(_BACKEND_MODULES[name])
    specs = getattr(module, "SPECS", None) or [module.SPEC]
    for spec in specs:
        _cache[spec.name] = spec
    if name not in _cache:
        raise KeyError(f"module {_BACKEND_MODULES[name]} defines no backend named '{name}'")
    return _cache[name]


def dom_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: DomBatch, backend: str = "padded",
                  mode: str = "forward", scale: float | None = None, prep: Any = None) -> torch.Tensor:
    """Attention within each DOM plus mean pooling: (N, H, Dh) x3 -> (D, H, Dh) with the named backend.

    ``prep`` is the result of ``get_backend(backend).prepare(...)``; when None it is built here.
    """
    spec = get_backend(backend)
    spec.check(q.device, q.dtype, mode)
    if q.dim() != 3 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"backend '{backend}': q, k, v must be (N, H, Dh) of one shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[0] != batch.n_pulses:
        raise ValueError(f"backend '{backend}': q has {q.shape[0]} rows but the batch has {batch.n_pulses} pulses")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if prep is None:
        prep = spec.prepare(batch, q.shape[1], q.shape[2], q.dtype)
    return spec.attend(q, k, v, batch, prep, scale)


__all__ = ["BackendSpec", "UnsupportedError", "MODES", "available_backends", "get_backend", "register_module",
           "dom_attention"]
