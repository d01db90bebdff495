"""Looking through DDP-style wrappers, and the reference that lives inside an adapter model."""

from __future__ import annotations

from contextlib import contextmanager

import torch


def strip_wrappers(model):
    """The module under DDP / DataParallel / FSDP1 wrappers (``.module``)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def is_peft_model(model) -> bool:
    inner = strip_wrappers(model)
    return hasattr(inner, "peft_config") and hasattr(inner, "disable_adapter")


@contextmanager
def adapters_disabled(model):
    """Run ``model`` as its base model: peft's ``disable_adapter()`` context, or diffusers'
    ``disable_adapters()`` … ``enable_adapters()``. DDP wrappers are looked through."""
    inner = strip_wrappers(model)
    if is_peft_model(inner):
        with inner.disable_adapter():
            yield
    elif getattr(inner, "_hf_peft_config_loaded", False):  # diffusers PeftAdapterMixin with adapters
        inner.disable_adapters()
        try:
            yield
        finally:
            inner.enable_adapters()
    else:
        raise ValueError("a reference from disabled adapters (ref_unet=None / ref_model=None) needs a model with "
                         "LoRA adapters (peft.get_peft_model or unet.add_adapter(LoraConfig(...))); otherwise pass "
                         "a frozen copy of the model as the reference")


@contextmanager
def reference_adapters(model):
    """The reference inside a PEFT model: its adapter named "ref" when there is one (TRL's
    convention when re-training an existing adapter: a frozen copy of its initial weights),
    otherwise the base model with every adapter disabled."""
    inner = strip_wrappers(model)
    if "ref" in getattr(inner, "peft_config", {}):
        previous = inner.active_adapter
        inner.set_adapter("ref")
        try:
            yield
        finally:
            inner.set_adapter(previous)
    else:
        with adapters_disabled(inner):
            yield
