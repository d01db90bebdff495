"""``prefops demo``: the whole path on bundled data, no downloads, a few minutes on a laptop CPU.

1. ``prefops prep`` on the bundled samples (HH-RLHF, LLaMA-Factory, ImageReward) with reports.
2. DPO on a tiny causal LM built from a transformers config (random weights) with a BPE
   tokenizer trained on the sample text in a second: reference log-probs precomputed to
   Parquet, then training steps through the fused loss, loss and reward accuracy per step.
3. Diffusion-DPO steps on a tiny ``UNet2DConditionModel`` with random latents.
4. A PNG of the curves.

The builders ``tiny_tokenizer`` and ``tiny_causal_lm`` are reused by the tests.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

__all__ = ["tiny_tokenizer", "tiny_causal_lm", "train_lm_dpo", "train_diffusion_dpo", "plot_history"]

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]


def tiny_tokenizer(texts: Sequence[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on ``texts`` (BOS prepended, EOS/PAD set), as a
    transformers ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(texts, trainer)
    bos = core.token_to_id("<bos>")
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                        special_tokens=[("<bos>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def tiny_causal_lm(vocab_size: int, *, seed: int = 0, hidden_size: int = 64, num_layers: int = 2,
                   tie_word_embeddings: bool = False, **config):
    """A Llama-architecture causal LM with random weights (seeded), built from a config."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                      num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, tie_word_embeddings=tie_word_embeddings, **config)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(cfg)


def _print(line: str, log: Optional[Callable[[str], None]]):
    (log or print)(line)


def _step_and_record(optimizer, loss, metrics, history: dict, step: int) -> None:
    """One optimizer step on ``loss``, then the step's loss, reward accuracy (and margin, when
    ``history`` tracks it) appended to ``history``."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    history["step"].append(step)
    history["loss"].append(loss.item())
    history["accuracy"].append(metrics["rewards/accuracies"].item())
    if "margin" in history:
        history["margin"].append(metrics["rewards/margins"].item())


def train_lm_dpo(rows, *, steps: int = 30, batch_size: int = 8, max_length: int = 96, lr: float = 2e-3,
                 beta: float = 0.1, seed: int = 0, work_dir: Path, log=None) -> dict:
    """DPO on a tiny LM over ``rows`` (prompt/chosen/rejected/pair_id): the reference (the
    initial model) is precomputed to Parquet first, then ``steps`` optimizer steps."""
    import torch

    from prefops.training import PreferenceCollator, causal_lm_preference_loss, load_reference_logps
    from prefops.training import precompute_reference_logps

    tok = tiny_tokenizer([r[k] for r in rows for k in ("prompt", "chosen", "rejected")])
    model = tiny_causal_lm(len(tok), seed=seed)
    n_params = sum(p.numel() for p in model.parameters())
    _print(f"tiny Llama: {n_params / 1e3:.0f}k parameters, vocab {len(tok)}, {len(rows)} pairs, "
           f"batch {batch_size}, max_length {max_length}", log)

    t0 = time.perf_counter()
    ref_path = precompute_reference_logps(copy.deepcopy(model).eval(), rows,
                                          PreferenceCollator(tok, max_length=max_length, max_prompt_length=48),
                                          Path(work_dir) / "reference_logps.parquet", batch_size=16,
                                          progress=False)
    _print(f"reference log-probs of {len(rows)} pairs -> {ref_path.name} ({time.perf_counter() - t0:.1f} s)", log)
    collate = PreferenceCollator(tok, max_length=max_length, max_prompt_length=48,
                                 reference_logps=load_reference_logps(ref_path))
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    history = {"step": [], "loss": [], "accuracy": [], "margin": []}
    for step in range(1, steps + 1):
        start = ((step - 1) * batch_size) % len(rows)
        batch = collate([rows[order[(start + i) % len(rows)]] for i in range(batch_size)])
        loss, metrics = causal_lm_preference_loss(model, batch, beta=beta)
        _step_and_record(opt, loss, metrics, history, step)
        _print(f"  lm step {step:3d}  loss {loss.item():.4f}  reward acc {history['accuracy'][-1]:.2f}  "
               f"margin {history['margin'][-1]:+.3f}", log)
    return history


def train_diffusion_dpo(*, steps: int = 15, pairs: int = 8, beta: float = 500.0, lr: float = 3e-4, seed: int = 0,
                        log=None) -> dict:
    """Diffusion-DPO steps on a tiny UNet2DConditionModel with random latents and text states;
    the reference is a frozen copy of the initial UNet."""
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from prefops.training.diffusion import diffusion_dpo_step

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8)
    ref = copy.deepcopy(unet).eval().requires_grad_(False)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    gen = torch.Generator().manual_seed(seed)
    latents_w = torch.randn(pairs, 4, 8, 8, generator=gen)
    latents_l = torch.randn(pairs, 4, 8, 8, generator=gen)
    text = torch.randn(pairs, 6, 32, generator=gen)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr)
    # A toy: one fixed draw of timesteps and noise per pair, so the curve shows the optimisation
    # itself (with fresh draws every step the loss of 8 pairs jumps around far more than it moves).
    fixed = dict(noise=torch.randn(pairs, 4, 8, 8, generator=gen),
                 timesteps=torch.randint(0, scheduler.config.num_train_timesteps, (pairs,), generator=gen))
    _print(f"tiny UNet: {sum(p.numel() for p in unet.parameters()) / 1e3:.0f}k parameters, {pairs} pairs of 4x8x8 "
           f"latents, beta {beta}, one fixed timestep and noise per pair", log)
    history = {"step": [], "loss": [], "accuracy": []}
    for step in range(1, steps + 1):
        loss, metrics = diffusion_dpo_step(unet, ref, scheduler, latents_w, latents_l, text, beta=beta, **fixed)
        _step_and_record(opt, loss, metrics, history, step)
        _print(f"  unet step {step:3d}  loss {loss.item():.4f}  implicit acc {history['accuracy'][-1]:.2f}", log)
    return history


def plot_history(lm: dict, diffusion: Optional[dict], path: Path) -> Path:
    """Loss and accuracy curves as a PNG (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if diffusion else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.4))
    axes[0].plot(lm["step"], lm["loss"], color="tab:blue")
    axes[0].set(title="LM DPO loss", xlabel="step", ylabel="loss")
    axes[1].plot(lm["step"], lm["accuracy"], color="tab:green", label="reward accuracy")
    axes[1].plot(lm["step"], lm["margin"], color="tab:orange", label="reward margin")
    axes[1].set(title="LM rewards", xlabel="step")
    axes[1].legend(loc="best", fontsize=8)
    if diffusion:
        axes[2].plot(diffusion["step"], diffusion["loss"], color="tab:purple", label="loss")
        axes[2].plot(diffusion["step"], diffusion["accuracy"], color="tab:green", label="implicit accuracy")
        axes[2].set(title="Diffusion-DPO (tiny UNet)", xlabel="step")
        axes[2].legend(loc="best", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
