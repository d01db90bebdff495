"""Training helpers: transformers causal LMs and diffusers UNets with prefops losses.

Importing this package imports torch (never triton, transformers or diffusers: they are used
through the model objects you pass). ``prefops.training.trl_trainer.PrefopsDPOTrainer`` (imports
trl) puts the fused losses inside TRL's DPOTrainer.
"""

from prefops.training.causal_lm import (
    LMHead, PreferenceCollator, causal_lm_preference_loss, completion_lengths, completion_targets, last_hidden_states,
    lm_head_of, load_reference_logps, precompute_reference_logps, reference_logps, run_inside_forward,
)
from prefops.training.diffusion import ImagePairCollator, adapters_disabled, diffusion_dpo_step, vae_latents

__all__ = [
    "LMHead", "PreferenceCollator", "causal_lm_preference_loss", "completion_lengths", "completion_targets",
    "last_hidden_states", "lm_head_of", "load_reference_logps", "precompute_reference_logps", "reference_logps",
    "run_inside_forward",
    "ImagePairCollator", "adapters_disabled", "diffusion_dpo_step", "vae_latents",
]
