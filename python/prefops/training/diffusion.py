"""One Diffusion-DPO training step for a diffusers UNet (``UNet2DConditionModel`` or anything
called as ``unet(noisy_latents, timesteps, encoder_hidden_states, ...)``).

    loss, metrics = diffusion_dpo_step(unet, ref_unet, noise_scheduler, latents_chosen, latents_rejected,
                                       encoder_hidden_states, beta=5000.0)
    loss.backward(); optimizer.step()

Each pair gets one timestep and one noise draw, shared by its winner and loser (as in the
Diffusion-DPO scripts); the policy runs with gradient and the reference under ``no_grad`` on
the same [2B] batch (winners first), and ``prefops.losses.diffusion_dpo_loss`` does the rest.
The reference is ``ref_unet`` (a frozen copy), or, with ``ref_unet=None``, the policy itself with
its LoRA adapters switched off: a peft ``PeftModel`` (``disable_adapter()``) or a diffusers model
with adapters added by ``unet.add_adapter(LoraConfig(...))`` (``disable_adapters()`` /
``enable_adapters()``).

Batches from a Pick-a-Pic / ImageReward-style pairs table (``prefops prep`` output: prompt,
chosen, rejected with image references): ``ImagePairCollator`` loads both images of each row,
scales them to [-1, 1], encodes them with the VAE into ``latents_chosen`` and
``latents_rejected`` ([B, 4, h, w] each), and the prompts with the text encoder into
``encoder_hidden_states`` ([B, L, D]; the step repeats it for the losers).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, Union

import torch

from prefops.losses.diffusion import diffusion_dpo_loss
from prefops.training._adapters import adapters_disabled

__all__ = ["ImagePairCollator", "diffusion_dpo_step", "adapters_disabled", "vae_latents"]


def _repeat2(x: torch.Tensor, B: int) -> torch.Tensor:
    """Conditioning given per pair ([B, ...]) is repeated for the losers; [2B, ...] is kept."""
    return torch.cat([x, x]) if x.shape[0] == B else x


def _target(scheduler, latents, noise, timesteps):
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise ValueError(f"unknown prediction_type {kind!r}")


def diffusion_dpo_step(
    unet,
    ref_unet,
    noise_scheduler,
    latents_chosen: torch.Tensor,
    latents_rejected: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    *,
    beta: float = 5000.0,
    convention: str = "original",
    loss_type: str = "sigmoid",
    generator: Optional[torch.Generator] = None,
    noise: Optional[torch.Tensor] = None,
    timesteps: Optional[torch.Tensor] = None,
    added_cond_kwargs: Optional[dict] = None,
    sample_weights: Optional[torch.Tensor] = None,
    backend: str = "auto",
):
    """Diffusion-DPO loss of one batch of B pairs; returns (loss, metrics) of ``diffusion_dpo_loss``.

    Args:
        latents_chosen, latents_rejected: [B, C, h, w] clean (VAE-scaled) latents.
        encoder_hidden_states: [B, L, D] text states (or [2B, ...] already repeated).
        generator: draws the noise ([B, ...], first) then the timesteps ([B], uniform over
            ``num_train_timesteps``) on the generator's device, unless ``noise`` / ``timesteps``
            are given.
        added_cond_kwargs: e.g. SDXL's {"text_embeds", "time_ids"}, [B, ...] or [2B, ...] each.
        beta, convention, loss_type, sample_weights, backend: as ``diffusion_dpo_loss``
            (loss_type "sft" skips the reference pass).
    The target follows ``noise_scheduler.config.prediction_type`` (epsilon, v_prediction, sample).
    """
    B = latents_chosen.shape[0]
    if latents_rejected.shape != latents_chosen.shape:
        raise ValueError(f"latents_chosen {tuple(latents_chosen.shape)} and latents_rejected "
                         f"{tuple(latents_rejected.shape)} differ")
    device = latents_chosen.device
    gen_device = generator.device if generator is not None else device
    if noise is None:
        noise = torch.randn(latents_chosen.shape, generator=generator, device=gen_device, dtype=latents_chosen.dtype)
    if timesteps is None:
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (B,), generator=generator,
                                  device=gen_device)
    latents = torch.cat([latents_chosen, latents_rejected])
    noise = _repeat2(noise.to(device), B)
    timesteps = _repeat2(timesteps.to(device).long(), B)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    target = _target(noise_scheduler, latents, noise, timesteps)
    cond = {"encoder_hidden_states": _repeat2(encoder_hidden_states, B)}
    if added_cond_kwargs is not None:
        cond["added_cond_kwargs"] = {k: _repeat2(v, B) for k, v in added_cond_kwargs.items()}

    model_pred = unet(noisy, timesteps, **cond, return_dict=False)[0]
    ref_pred = None
    if loss_type != "sft":
        with torch.no_grad():
            if ref_unet is not None:
                ref_pred = ref_unet(noisy, timesteps, **cond, return_dict=False)[0]
            else:
                with adapters_disabled(unet):
                    ref_pred = unet(noisy, timesteps, **cond, return_dict=False)[0]
    return diffusion_dpo_loss(model_pred, ref_pred, target, beta=beta, convention=convention, loss_type=loss_type,
                              sample_weights=sample_weights, backend=backend)


# ------------------------------------------------------------------------------------- batches


def vae_latents(vae, images: torch.Tensor, *, sample: bool = True,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Images in [-1, 1], [N, 3, H, W] → scaled VAE latents (as the diffusers training scripts do)."""
    with torch.no_grad():
        dist = vae.encode(images.to(vae.device, vae.dtype)).latent_dist
        latents = dist.sample(generator) if sample else dist.mode()
    return latents * vae.config.scaling_factor


class ImagePairCollator:
    """Rows of a ``prefops prep`` image-pairs table → the inputs of ``diffusion_dpo_step``.

    Args:
        encode_images: [N, 3, H, W] images in [-1, 1] → latents [N, C, h, w] (e.g.
            ``lambda x: vae_latents(vae, x)``).
        encode_prompts: list of B prompts → [B, L, D] text-encoder states.
        image_root: where the image references of the table are relative to.
        resolution: images are resized (bicubic) and centre-cropped to this square size.
        load_image: optional ``ref -> [3, H, W] tensor in [-1, 1]`` replacing the PIL loader.

    Returns from a call: ``dict(latents_chosen, latents_rejected, encoder_hidden_states, pair_id)``.
    A missing or unreadable image raises ``ValueError`` naming the row, the field and the path.
    """

    def __init__(self, encode_images: Callable, encode_prompts: Callable, *,
                 image_root: Union[str, os.PathLike, None] = None, resolution: int = 512,
                 load_image: Optional[Callable] = None):
        self.encode_images = encode_images
        self.encode_prompts = encode_prompts
        self.image_root = Path(image_root) if image_root is not None else None
        self.resolution = resolution
        self.load_image = load_image or self._load_with_pil

    def _load_with_pil(self, ref: str) -> torch.Tensor:
        from PIL import Image

        path = self.image_root / ref if self.image_root is not None else Path(ref)
        with Image.open(path) as im:
            im = im.convert("RGB")
            side = min(im.size)  # centre crop to a square, then resize
            left, top = (im.width - side) // 2, (im.height - side) // 2
            im = im.crop((left, top, left + side, top + side)).resize((self.resolution, self.resolution),
                                                                     Image.BICUBIC)
            data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
        return data.view(self.resolution, self.resolution, 3).permute(2, 0, 1).float() / 127.5 - 1.0

    def __call__(self, rows: Sequence[Mapping]) -> dict:
        if not rows:
            raise ValueError("cannot collate an empty batch")
        images = {"chosen": [], "rejected": []}
        for i, row in enumerate(rows):
            for field in ("prompt", "chosen", "rejected"):
                if not isinstance(row.get(field), str):
                    raise ValueError(f"row {i}: field {field!r} must be a string "
                                     f"(an image reference for chosen/rejected), got {row.get(field)!r}")
            for field in ("chosen", "rejected"):
                try:
                    images[field].append(self.load_image(row[field]))
                except (OSError, ValueError) as e:
                    raise ValueError(f"row {i}: field {field!r}: cannot load image {row[field]!r}: {e}") from None
        latents = self.encode_images(torch.stack(images["chosen"] + images["rejected"]))
        B = len(rows)
        return dict(latents_chosen=latents[:B], latents_rejected=latents[B:],
                    encoder_hidden_states=self.encode_prompts([row["prompt"] for row in rows]),
                    pair_id=[row.get("pair_id") for row in rows])
