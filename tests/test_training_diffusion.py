"""diffusion_dpo_step on a tiny diffusers UNet2DConditionModel: equals a hand-written step (the
Diffusion-DPO script's lines) in loss and parameter gradients, learns a fixed batch, and the LoRA
reference (adapters disabled) equals the base model."""

import copy
import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
import torch.nn.functional as F  # noqa: E402
from diffusers import DDPMScheduler, UNet2DConditionModel  # noqa: E402

from prefops.training.diffusion import diffusion_dpo_step  # noqa: E402

B = 2


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=4, norm_num_groups=8)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The UNet is tiny: intra-op threads only add sync overhead, and on a busy machine spinning
    threads turn milliseconds into seconds."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def setup():
    unet = tiny_unet()
    ref = copy.deepcopy(unet).requires_grad_(False)
    with torch.no_grad():  # the reference differs from the policy, so the loss is not trivially log 2
        for p in ref.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    g = torch.Generator().manual_seed(1)
    lw, ll = torch.randn(B, 4, 8, 8, generator=g), torch.randn(B, 4, 8, 8, generator=g)
    text = torch.randn(B, 5, 16, generator=g)
    return unet, ref, lw, ll, text


def hand_written_step(unet, ref, scheduler, lw, ll, text, gen, beta):
    """Noise, then timesteps, from ``gen``; the rest as SalesforceAIResearch/DiffusionDPO train.py
    writes it (epsilon) or the diffusers script's target (v-prediction)."""
    noise = torch.randn(lw.shape, generator=gen)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (lw.shape[0],), generator=gen)
    latents = torch.cat([lw, ll])
    noise, t = noise.repeat(2, 1, 1, 1), t.repeat(2)
    noisy = scheduler.add_noise(latents, noise, t)
    target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, t)
    ehs = text.repeat(2, 1, 1)
    model_pred = unet(noisy, t, ehs).sample
    model_losses = (model_pred - target).pow(2).mean(dim=[1, 2, 3])
    model_losses_w, model_losses_l = model_losses.chunk(2)
    with torch.no_grad():
        ref_losses = (ref(noisy, t, ehs).sample - target).pow(2).mean(dim=[1, 2, 3])
        ref_losses_w, ref_losses_l = ref_losses.chunk(2)
    inside = -0.5 * beta * ((model_losses_w - model_losses_l) - (ref_losses_w - ref_losses_l))
    return -F.logsigmoid(inside).mean()


def grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params)


def assert_grads_close(got, want, rtol):
    err = max((a - b).abs().max().item() for a, b in zip(got, want))
    scale = max(b.abs().max().item() for b in want)
    assert scale > 0 and err <= rtol * scale, f"max grad error {err:.3g} at scale {scale:.3g}"


@pytest.mark.parametrize("prediction_type,backend", [("epsilon", "torch"), ("epsilon", "triton"),
                                                     ("v_prediction", "torch")])
def test_step_equals_hand_written_step(setup, prediction_type, backend):
    unet, ref, lw, ll, text = setup
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    beta = 5000.0
    want = hand_written_step(unet, ref, scheduler, lw, ll, text, torch.Generator().manual_seed(5), beta)
    loss, metrics = diffusion_dpo_step(unet, ref, scheduler, lw, ll, text, beta=beta,
                                       generator=torch.Generator().manual_seed(5), backend=backend)
    assert abs(want.item() - math.log(2)) > 1e-3  # policy ≠ reference here
    # The kernel sums the fp32 squared errors in another order than torch; β/2 = 2500 times an
    # fp32 rounding of m ≈ 1 moves the logit by ~1e-4, so the triton path gets a looser bound.
    rtol = 1e-5 if backend == "torch" else 1e-3
    torch.testing.assert_close(loss, want, rtol=rtol, atol=1e-6)
    assert_grads_close(grads(unet, loss), grads(unet, want), 10 * rtol)
    assert {"rewards/accuracies", "rewards/margins", "mse/model", "mse/ref"} <= set(metrics)
    # the diffusers convention with half the β is the same loss
    loss2, _ = diffusion_dpo_step(unet, ref, scheduler, lw, ll, text, beta=beta / 2, convention="diffusers",
                                  generator=torch.Generator().manual_seed(5), backend=backend)
    torch.testing.assert_close(loss2, loss)


def test_shared_noise_and_timesteps_per_pair(setup):
    """Explicit noise/timesteps are used as given and shared by winner and loser."""
    unet, ref, lw, ll, text = setup
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    noise = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    t = torch.tensor([10, 900])
    calls = []

    def spy(noisy, timesteps, encoder_hidden_states, return_dict=True):
        calls.append((noisy, timesteps, encoder_hidden_states))
        return (noisy * 0.5,)  # any prediction

    diffusion_dpo_step(spy, spy, scheduler, lw, ll, text, noise=noise, timesteps=t, beta=10.0)
    noisy, ts, ehs = calls[0]
    assert ts.tolist() == [10, 900, 10, 900] and torch.equal(ehs[:B], ehs[B:])
    a = scheduler.alphas_cumprod[t].view(B, 1, 1, 1)
    for i, lat in enumerate((lw, ll)):
        want = a.sqrt() * lat + (1 - a).sqrt() * noise
        torch.testing.assert_close(noisy[i * B:(i + 1) * B], want)


def test_helper_steps_learn_a_fixed_batch():
    unet = tiny_unet(seed=3)
    ref = copy.deepcopy(unet).requires_grad_(False)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    g = torch.Generator().manual_seed(4)
    lw, ll = torch.randn(B, 4, 8, 8, generator=g), torch.randn(B, 4, 8, 8, generator=g)
    text = torch.randn(B, 5, 16, generator=g)
    noise, t = torch.randn(B, 4, 8, 8, generator=g), torch.tensor([100, 400])
    # β = 5000 makes the loss very sensitive: plain SGD at the tiny learning rates Diffusion-DPO uses
    opt = torch.optim.SGD(unet.parameters(), lr=1e-7)
    losses = []
    for _ in range(6):
        loss, metrics = diffusion_dpo_step(unet, ref, scheduler, lw, ll, text, beta=5000.0, noise=noise, timesteps=t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert abs(losses[0] - math.log(2)) < 1e-6 and metrics["rewards/accuracies"].item() == 1.0
    assert losses[-1] < 0.3 * losses[0] and all(b < a for a, b in zip(losses, losses[1:]))


def test_lora_reference_is_the_base_model(setup):
    peft = pytest.importorskip("peft")
    _, _, lw, ll, text = setup
    base = tiny_unet(seed=6).requires_grad_(False)
    unet = copy.deepcopy(base)
    # init_lora_weights=False: random B matrices, so the adapters change the output from step 0
    unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    kw = dict(beta=5000.0, noise=torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(2)),
              timesteps=torch.tensor([300, 700]))
    loss, m = diffusion_dpo_step(unet, None, scheduler, lw, ll, text, **kw)
    want, mw = diffusion_dpo_step(unet, base, scheduler, lw, ll, text, **kw)
    assert m["mse/ref"] == mw["mse/ref"] and m["mse/model"] != m["mse/ref"]
    torch.testing.assert_close(loss, want, rtol=0, atol=0)
    assert_grads_close(grads(unet, loss), grads(unet, want), 0.0)
    # adapters are back on afterwards
    x, ts = torch.randn(1, 4, 8, 8), torch.tensor([5])
    assert not torch.equal(unet(x, ts, text[:1]).sample, base(x, ts, text[:1]).sample)
    # a model without adapters cannot be its own reference; SFT needs none
    with pytest.raises(ValueError, match="LoRA"):
        diffusion_dpo_step(base, None, scheduler, lw, ll, text, **kw)
    loss, _ = diffusion_dpo_step(base, None, scheduler, lw, ll, text, loss_type="sft", **kw)
    assert loss.item() > 0


# --------------------------------------------------------------- image pairs from prefops prep


def test_image_pair_collator_on_imagereward_prep_output(tmp_path):
    """ImageReward ranked lists → prefops prep pairs → images on disk → VAE latents → one step."""
    import numpy as np
    from diffusers import AutoencoderKL
    from PIL import Image

    import prefops
    from prefops.training import ImagePairCollator, diffusion_dpo_step, vae_latents

    rows = prefops.prep(prefops.sample_path("imagereward"), strategy="best_vs_worst").table.slice(0, 3).to_pylist()
    rng = np.random.default_rng(0)
    colours = {}
    for row in rows:  # a flat-coloured 20x24 image per reference (cropped and resized to 16)
        for field in ("chosen", "rejected"):
            colour = rng.integers(0, 256, 3)
            colours[row[field]] = colour
            path = tmp_path / row[field]
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.tile(colour.astype(np.uint8), (20, 24, 1))).save(path.with_suffix(".png"), "PNG")
            path.with_suffix(".png").rename(path)  # keep the table's .webp name, PNG content
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=8, sample_size=16).eval()
    prompt_states = lambda prompts: torch.stack([  # noqa: E731  a stand-in text encoder: one state per prompt
        torch.full((6, 16), float(len(p) % 7)) for p in prompts])
    collate = ImagePairCollator(lambda x: vae_latents(vae, x, sample=False), prompt_states, image_root=tmp_path,
                                resolution=16)
    batch = collate(rows)
    assert batch["latents_chosen"].shape == (3, 4, 8, 8) and batch["encoder_hidden_states"].shape == (3, 6, 16)
    assert batch["pair_id"] == [r["pair_id"] for r in rows]
    # the chosen latents are those of the chosen images: encode a flat image of that colour directly
    flat = torch.tensor(colours[rows[1]["chosen"]], dtype=torch.float32).view(3, 1, 1).expand(3, 16, 16) / 127.5 - 1
    torch.testing.assert_close(batch["latents_chosen"][1], vae_latents(vae, flat[None], sample=False)[0],
                               atol=1e-5, rtol=1e-5)
    unet = tiny_unet()
    loss, _ = diffusion_dpo_step(unet, copy.deepcopy(unet), DDPMScheduler(), batch["latents_chosen"],
                                 batch["latents_rejected"], batch["encoder_hidden_states"],
                                 generator=torch.Generator().manual_seed(0))
    assert abs(loss.item() - math.log(2)) < 1e-6  # a frozen copy as reference: log 2 at the start
    (tmp_path / rows[2]["rejected"]).unlink()
    with pytest.raises(ValueError, match="row 2: field 'rejected': cannot load image"):
        collate(rows)
