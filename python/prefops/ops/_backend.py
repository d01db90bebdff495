"""Triton-or-torch selection, at call time (never at import): one place for every fused op."""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from typing import Sequence

import torch

BACKENDS = ("auto", "triton", "torch")
_STATE: dict = {}


def kernel_module(name: str):
    """``prefops.kernels.<name>``, imported (with triton) on first use."""
    key = f"kernels.{name}"
    if key not in _STATE:
        _STATE[key] = importlib.import_module(f"prefops.kernels.{name}")
    return _STATE[key]


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, tensors: Sequence[torch.Tensor], op: str) -> str:
    """"auto": Triton for CUDA tensors (not fp64) when triton is installed, else torch.
    "triton" is checked: installed, CUDA tensors or the interpreter, a Triton-supported dtype."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if "has_triton" not in _STATE:  # a path search when triton is not imported yet: once
        _STATE["has_triton"] = importlib.util.find_spec("triton") is not None
    has_triton = _STATE["has_triton"]
    first = tensors[0]
    if backend == "auto":
        if first.is_cuda and has_triton and all(t.dtype != torch.float64 for t in tensors):
            return "triton"
        if first.is_cuda and not has_triton and not _STATE.get(f"warned.{op}"):
            _STATE[f"warned.{op}"] = True
            warnings.warn(f"triton is not installed: {op} uses its torch path", stacklevel=4)
        return "torch"
    if backend == "triton":
        if not has_triton:
            raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
        if not first.is_cuda and not interpreting():
            raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported")
        for t in tensors:
            if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                raise TypeError(f"backend='triton' supports float32, float16 and bfloat16, got {t.dtype}")
    return backend
