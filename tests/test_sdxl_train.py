"""sdxl.py, the method and the command line: schedule, samplers, DMD2 losses (and the DM direction), backward
simulation, the official run's settings (global batch with gradient accumulation, fp32 passes, warm-up, generator
prompts from real-latent captions, Table 4 ablations), encode -> train -> generate on the tiny preset and on SDXL-format
files of unseen layouts, export to diffusers names, NaN-weight stops, kills at the final save, stale temporaries,
foreign checkpoints, FSDP, bench.

Independent references (test-only packages): diffusers' DDPMScheduler, LCMScheduler, EulerDiscreteScheduler,
UNet2DConditionModel and StableDiffusionXLPipeline; closed forms for CFG and the DM gradient; recording stand-in UNets
for what the training step feeds the generator; a 2-process gloo run of the FSDP path on the CPU against one process
with gradient accumulation.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn as nn

import sdxl
import sdxl_diffusers  # tests/sdxl_diffusers.py: the diffusers reference pipeline
import unet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AB = sdxl.ddpm_alphas_cumprod()
POOLED = 5  # pooled width of the stand-in conditioning; y = [pooled | 6 x 256 size embeddings]


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def standin_eps(x, t, context, y):
    """A deterministic eps-model that depends on every input (x, t, text context, pooled text and size embeddings)."""
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1, 1, 1)
    return (0.3 * x + 1e-3 * t * torch.tanh(x) + context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
            + 0.1 * y[:, :POOLED].sum(1).reshape(-1, 1, 1, 1) + 0.05 * y[:, -1].reshape(-1, 1, 1, 1))


def conditioning(B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    context = torch.randn(B, 7, 6, generator=g)                                           # [B, 77, 2048] in SDXL
    y = sdxl.vector_cond(torch.randn(B, POOLED, generator=g), (64, 64), (0, 0), (64, 64))  # [B, 2816] in SDXL
    return context, y


# ---------------------------------------------------------------------------------------------------------------
# Schedule and samplers

def test_schedule_matches_diffusers_and_sdxl_table():
    from diffusers import DDPMScheduler
    ref = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod  # float32
    assert AB.dtype == torch.float64 and AB.shape == (1000,)
    torch.testing.assert_close(AB.float(), ref, rtol=5e-6, atol=0)
    for t, ab in ((0, 0.999150), (249, 0.675432), (399, 0.426086), (499, 0.277670), (749, 0.056623), (999, 0.004660)):
        assert abs(AB[t].item() - ab) < 1e-6                                               # sdxl.md §7.1
    x0, eps, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([0, 500, 999])
    x_t = sdxl.add_noise(x0, eps, t, AB)
    torch.testing.assert_close(x_t[1], AB[500].sqrt().float() * x0[1] + (1 - AB[500]).sqrt().float() * eps[1])
    torch.testing.assert_close(sdxl.x0_from_eps(x_t, eps, t, AB), x0, rtol=0, atol=2e-5)


@pytest.mark.parametrize("steps", [4, 1])
def test_dmd2_sampler_matches_lcm_scheduler(steps):
    """DMD2's README runs its UNets with diffusers' LCMScheduler and timesteps [999, 749, 499, 249] (or [399])."""
    from diffusers import LCMScheduler
    timesteps = sdxl.dmd2_timesteps(steps)
    assert timesteps == ([999, 749, 499, 249] if steps == 4 else [399])
    scheduler = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False)
    scheduler.set_timesteps(timesteps=timesteps)
    context, y = conditioning()
    g_ref = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g_ref)
    for t in scheduler.timesteps:  # each step: predict x0 ("denoised"), then re-noise with the generator's next draw
        x, denoised = scheduler.step(standin_eps(x, t.expand(2), context, y), t, x, generator=g_ref, return_dict=False)
    g = torch.Generator().manual_seed(0)
    ours = sdxl.sample_dmd2(standin_eps, torch.randn(2, 4, 8, 8, generator=g), context, y, timesteps, AB, g)
    assert denoised.abs().max() > 1
    assert (ours - denoised).abs().max() <= 1e-5 * denoised.abs().max()  # LCM's c_skip(t=249) ~ 4e-8 is the only difference


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 warning raised inside diffusers' Euler scheduler
@pytest.mark.parametrize("spacing", ["trailing", "leading"])
def test_euler_cfg_matches_diffusers_euler(spacing):
    """The teacher's sampler vs EulerDiscreteScheduler (SDXL's diffusers scheduler) with CFG written out by hand,
    unconditional = zero context, zero pooled text, same size embeddings."""
    from diffusers import EulerDiscreteScheduler
    steps, s = 7, 5.0
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing=spacing, steps_offset=1)
    scheduler.set_timesteps(steps)
    context, y = conditioning()
    y_u = y.clone()
    y_u[:, :POOLED] = 0
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    x = noise * (1 + scheduler.sigmas[0] ** 2).sqrt()  # x_t ~ N(0, I) in sigma-space (our choice for both spacings)
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(x, t)
        eps_u, eps_c = standin_eps(inp, t.expand(2), torch.zeros_like(context), y_u), standin_eps(inp, t.expand(2), context, y)
        x = scheduler.step(eps_u + s * (eps_c - eps_u), t, x).prev_sample
    ours = sdxl.sample_euler_cfg(standin_eps, noise, context, y, steps, s, AB, spacing)
    assert (ours - x).abs().max() <= 1e-4 * x.abs().max()


def test_cfg_uses_zero_text_and_keeps_sizes():
    context, y = conditioning(B=3)
    x_t = torch.randn(3, 4, 8, 8)
    calls = []
    record = lambda *args: calls.append(args) or standin_eps(*args)
    eps = sdxl.cfg_eps(record, x_t, 500, context, y, 8.0)
    (x2, t2, c2, y2), = calls                                             # one batched call on [uncond, cond]
    assert torch.equal(x2, torch.cat([x_t, x_t])) and t2.tolist() == [500] * 6
    assert torch.equal(c2[3:], context) and torch.equal(y2[3:], y)
    assert c2[:3].eq(0).all() and y2[:3, :POOLED].eq(0).all()            # zero text context and zero pooled embedding
    assert torch.equal(y2[:3, POOLED:], y[:, POOLED:])                   # the size embeddings are kept
    eps_u = standin_eps(x_t, t2[:3], torch.zeros_like(context), y2[:3])
    eps_c = standin_eps(x_t, t2[:3], context, y)
    torch.testing.assert_close(eps, eps_u + 8.0 * (eps_c - eps_u))
    assert not torch.allclose(eps, eps_c)


# ---------------------------------------------------------------------------------------------------------------
# DMD2 losses

class RecordingFakeScore(nn.Module):
    """Stand-in for FakeScore: eps = standin_eps + shift; records its inputs."""

    def __init__(self, shift=0.0):
        super().__init__()
        self.shift, self.calls = shift, []

    def forward(self, x, t, context, y, classify=False):
        self.calls.append((x.detach().clone(), t.clone(), classify))
        return standin_eps(x, t, context, y) + self.shift


def test_dm_gradient_sign_and_scale():
    """dmd2.md §2.1: grad = (mu_fake - mu_real) / mean|x - mu_real| per sample, NO alpha_t factor, and the loss's
    gradient w.r.t. x is grad / x.numel(); the teacher is CFG'd with zero unconditional embeddings."""
    context, y = conditioning(B=3)
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
    teacher_calls = []
    teacher = lambda *args: teacher_calls.append(args) or standin_eps(*args)
    fake = RecordingFakeScore(shift=0.2)
    cfg = sdxl.Config(guidance_scale=3.0)
    loss = sdxl.loss_distribution_matching(x, context, y, teacher, fake, AB, cfg, torch.Generator().manual_seed(2))
    loss.backward()
    (x_t, t, classify), = fake.calls
    assert not classify and t.min() >= 20 and t.max() <= 980 and len(set(t.tolist())) == 3  # one t per sample
    ab = AB[t].reshape(-1, 1, 1, 1)
    noise = (x_t.double() - ab.sqrt() * x.detach().double()) / (1 - ab).sqrt()
    assert abs(noise.std().item() - 1) < 0.1                                                  # x_t = noised x
    x_t2, _, context2, y2 = teacher_calls[0]
    assert torch.equal(x_t2[:3], x_t) and context2[:3].eq(0).all() and y2[:3, :POOLED].eq(0).all()
    eps_u, eps_c = standin_eps(x_t, t, torch.zeros_like(context), y2[:3]), standin_eps(x_t, t, context, y)
    eps_real, eps_fake = (eps_u + 3.0 * (eps_c - eps_u)).double(), (eps_c + 0.2).double()
    mu_real = (x_t.double() - (1 - ab).sqrt() * eps_real) / ab.sqrt()
    mu_fake = (x_t.double() - (1 - ab).sqrt() * eps_fake) / ab.sqrt()
    w = (x.detach().double() - mu_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    expected = ((mu_fake - mu_real) / w / x.numel()).float()
    torch.testing.assert_close(x.grad, expected, rtol=1e-4, atol=1e-9)
    with_alpha = expected * ab.sqrt().float()                       # the paper's alpha_t weighting, which the code drops
    assert (x.grad - with_alpha).abs().max() > 100 * (x.grad - expected).abs().max()
    # Sign: a gradient-descent step on x moves it towards the teacher's prediction, away from the fake score's.
    assert (-x.grad.double() * (mu_real - mu_fake)).sum() > 0


def test_dm_timesteps_reach_999_and_no_further_with_max_step_percent_1():
    """--max_step_percent 1 (option_errors allows it) draws t up to the schedule's last index, 999, not 1000."""
    context, y = conditioning(B=256)
    x = torch.randn(256, 4, 2, 2)
    fake = RecordingFakeScore()
    cfg = sdxl.Config(min_step_percent=0.99, max_step_percent=1.0)
    sdxl.loss_distribution_matching(x, context, y, standin_eps, fake, AB, cfg, torch.Generator().manual_seed(0))
    (_, t, _), = fake.calls
    assert t.min() == 990 and t.max() == 999


def test_a_small_step_on_the_dm_loss_moves_x_toward_the_teachers_x0():
    """The direction (conventions: gradient descent moves x along x0_real - x0_fake). A teacher that predicts a fixed
    x0* and a fake score that predicts x itself (it has fit the generator's current sample): one small gradient step
    on the surrogate moves x straight toward x0*."""
    context, y = conditioning(B=2)
    target = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))              # the teacher's x0*
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4), requires_grad=True)

    def predicting(x0):                                     # eps such that x0_from_eps(x_t, eps, t) == x0
        def eps_fn(x_t, t, context, y, classify=False):
            ab = AB[t].reshape(-1, 1, 1, 1).float()
            return (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()
        return eps_fn

    teacher = lambda x_t, t, c, y: predicting(torch.cat([target, target]))(x_t, t, c, y)  # CFG batch [uncond, cond]
    loss = sdxl.loss_distribution_matching(x, context, y, teacher, predicting(x.detach()), AB, sdxl.Config(),
                                           torch.Generator().manual_seed(0))
    loss.backward()
    step = -x.grad * x.numel() * 1e-2                                                       # lr 1e-2 on the sum
    direction = (target - x.detach()).flatten(1)
    assert torch.nn.functional.cosine_similarity(step.flatten(1), direction).min() > 0.999
    assert ((x.detach() + step - target).norm() < (x.detach() - target).norm())


def test_fake_score_loss_is_eps_mse():
    context, y = conditioning(B=4)
    x = torch.randn(4, 4, 8, 8)
    fake = RecordingFakeScore(shift=0.1)
    loss = sdxl.loss_fake_score(fake, x, context, y, AB, torch.Generator().manual_seed(0))
    (x_t, t, classify), = fake.calls
    assert not classify and t.min() >= 0 and t.max() <= 999
    ab = AB[t].reshape(-1, 1, 1, 1).float()
    noise = (x_t - ab.sqrt() * x) / (1 - ab).sqrt()                                        # the noise it was trained on
    torch.testing.assert_close(loss, ((standin_eps(x_t, t, context, y) + 0.1 - noise) ** 2).mean(), rtol=1e-4, atol=1e-6)


def test_gan_head_layout_and_fake_score_logits():
    with torch.device("meta"):
        head = sdxl.gan_head(1280, 32)                          # SDXL: middle block [B, 1280, 32, 32] at 1024^2
        assert head(torch.zeros(2, 1280, 32, 32)).shape == (2, 1, 1, 1)
    convs = [m for m in head if isinstance(m, nn.Conv2d)]
    assert [(c.kernel_size, c.stride, c.padding) for c in convs] == [((4, 4), (2, 2), (1, 1))] * 3 + [((4, 4), (4, 4), (0, 0)), ((1, 1), (1, 1), (0, 0))]
    assert sorted({k.split(".")[0] for k in head.state_dict()}, key=int) == ["0", "1", "3", "4", "6", "7", "9", "10", "12"]  # official indices
    assert sum(p.numel() for p in head.parameters()) == 4 * (1280 * 1280 * 16 + 1280) + 4 * 2 * 1280 + 1281
    for bad in (3, 24):
        with pytest.raises(ValueError, match="GAN head"):
            sdxl.gan_head(64, bad)
    cfg = sdxl.TINY_UNET
    fake_score = sdxl.FakeScore(sdxl.SDXLUNet(cfg), sdxl.gan_head(64, 4)).eval()
    context, y = torch.randn(2, 77, cfg.context_dim), torch.randn(2, cfg.adm_in_channels)
    with torch.no_grad():
        logits = fake_score(torch.randn(2, 4, 8, 8), torch.tensor([3, 900]), context, y, classify=True)
        eps = fake_score(torch.randn(2, 4, 8, 8), torch.tensor([3, 900]), context, y)
    assert logits.shape == (2, 1) and logits._base is None and eps.shape == (2, 4, 8, 8)


def test_backward_simulation_runs_the_generators_own_chain():
    timesteps, shape = [999, 749, 499, 249], (4, 4, 32, 32)
    context, y = conditioning(B=4)
    for k in range(4):
        calls = []

        def generator(x, t, context, y):
            calls.append((x.clone(), t.clone()))
            return 0.5 * x + 0.1

        x_tk = sdxl.backward_simulation(generator, shape, context, y, k, timesteps, AB, torch.Generator().manual_seed(k))
        assert [int(t[0]) for _, t in calls] == timesteps[:k]                                  # the chain's timesteps
        assert all(t.eq(t[0]).all() for _, t in calls)                                         # one t for the whole batch
        inputs = [x for x, _ in calls] + [x_tk]
        assert abs(inputs[0].std().item() - 1) < 0.03 and abs(inputs[0].mean().item()) < 0.03  # starts from pure noise
        previous_noise = inputs[0]
        for (x_i, t_i), x_next, t_next in zip(calls, inputs[1:], timesteps[1:]):
            x0 = sdxl.x0_from_eps(x_i, 0.5 * x_i + 0.1, t_i, AB)                               # the generator's x0 at step i
            noise = (x_next - AB[t_next].sqrt().float() * x0) / (1 - AB[t_next]).sqrt().float()  # re-noised to the next t
            assert abs(noise.std().item() - 1) < 0.03                                          # with fresh N(0, I) noise...
            assert abs(torch.corrcoef(torch.stack([noise.flatten(), previous_noise.flatten()]))[0, 1]) < 0.05  # ...uncorrelated
            previous_noise = noise
        assert not x_tk.requires_grad


# ---------------------------------------------------------------------------------------------------------------
# encode -> train -> generate, on the tiny CPU preset

CAPTIONS = ["a red square", "a blue circle on a table", "a green field, 4k", "a cat on a mat"]


def write_images(folder, n=4):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        PIL.Image.fromarray(rng.integers(0, 255, (130 + 20 * i, 160, 3), dtype=np.uint8)).save(os.path.join(folder, f"im{i}.png"))
        with open(os.path.join(folder, f"im{i}.txt"), "w") as f:
            f.write(CAPTIONS[i] + "\n")


def tiny_config(**kw):
    return sdxl.Config(**{**sdxl.PRESETS["tiny"], "preset": "tiny", "sample_every": 0, **kw})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """images -> `encode` -> `train` 4 iterations, a generator update every 2nd (checkpoints at 2 and 4), with every
    generator call recorded."""
    root = tmp_path_factory.mktemp("tiny")
    images, latents, out = str(root / "images"), str(root / "latents"), str(root / "run")
    write_images(images)
    sdxl.main(["encode", "--preset", "tiny", "--images", images, "--out", latents, "--device", "cpu"])
    calls, make_trainable = [], sdxl.make_trainable

    def recording(module, *args):
        module = make_trainable(module, *args)
        if isinstance(module, sdxl.SDXLUNet):  # the generator (the fake UNet sits inside FakeScore)
            module.register_forward_pre_hook(lambda m, inputs: calls.append((inputs[1].clone(), torch.is_grad_enabled())))
        return module

    sdxl.make_trainable = recording
    try:
        result = sdxl.train(tiny_config(latents=latents, outdir=out, total_steps=4, ckpt_every=2, sample_every=4,
                                       dfake_gen_update_ratio=2, device="cpu"))
    finally:
        sdxl.make_trainable = make_trainable
    return dict(root=root, images=images, latents=latents, out=out, calls=calls, history=result["history"])


def test_encode_writes_latents_with_captions(tiny_run):
    data = sdxl.LatentDataset(tiny_run["latents"], 128)
    assert data.captions == CAPTIONS and len(data.shards) == 1
    latents = data.shards[0]
    assert latents.shape == (4, 4, 16, 16) and latents.dtype == torch.float16 and latents.float().std() > 0.01
    # The shard holds VAE posterior samples (seed 0) of the center-cropped, resized images, in fp16.
    vae = sdxl.load_parts("tiny", "", "cpu")["vae"]
    images = torch.stack([sdxl.load_image(os.path.join(tiny_run["images"], f"im{i}.png"), 128) for i in range(4)])
    assert images.shape == (4, 3, 128, 128) and -1 <= images.min() < images.max() <= 1
    im3 = np.asarray(PIL.Image.open(os.path.join(tiny_run["images"], "im3.png")).resize((128, 152), PIL.Image.LANCZOS))
    assert torch.equal(images[3], torch.from_numpy(im3[12:140].copy()).permute(2, 0, 1).float() / 127.5 - 1)  # 190x160 -> 152x128 -> rows 12..139
    with torch.no_grad():
        expected = vae.encode(images, sample=True, generator=torch.Generator().manual_seed(0))
        mean = vae.encode(images)
    assert torch.equal(latents, expected.half()) and not torch.equal(latents, mean.half())
    x, captions = data.sample(5, torch.Generator().manual_seed(0))
    assert x.shape == (5, 4, 16, 16) and x.dtype == torch.float32 and all(c in CAPTIONS for c in captions)


def test_training_feeds_the_generator_its_backward_simulated_chain(tiny_run):
    history, calls = tiny_run["history"], tiny_run["calls"]
    assert [h["step"] for h in history] == list(range(4))
    assert all(np.isfinite(v) for h in history for key, v in h.items() if key.startswith(("loss", "grad")))
    assert [("loss_dm" in h) for h in history] == [True, False, True, False]  # TTUR 2 here: generator steps 0 and 2
    timesteps, i = [999, 749, 499, 249], 0
    for h in history:
        k = h["k"]
        steps = calls[i:i + k + 1]                     # k no-grad chain steps, then the trained step at t_k
        assert [int(t[0]) for t, _ in steps] == timesteps[:k + 1]
        assert all(t.eq(t[0]).all() and len(t) == 2 for t, _ in steps)          # one k, one t for the whole batch
        assert [grad for _, grad in steps] == [False] * k + [h["step"] % 2 == 0]  # gradient only through step k
        i += k + 1
        if h["step"] == 3:  # the sample strip after the last iteration: 4 steps of the generator, no grad
            assert [int(t[0]) for t, _ in calls[i:i + 4]] == timesteps and not any(g for _, g in calls[i:i + 4])
            i += 4
    assert i == len(calls) and len({h["k"] for h in history}) > 1


def test_training_changes_weights_and_writes_files(tiny_run):
    out = tiny_run["out"]
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "generator.safetensors", "log.txt", "samples_0000004.png"]
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert ckpt["step"] == 4 and ckpt["cfg"]["total_steps"] == 4
    init = sdxl.load_parts("tiny", "", "cpu")["unet_state"]
    assert ckpt["generator"].keys() == init.keys()
    changed = [k for k in init if not torch.equal(ckpt["generator"][k], init[k])]
    assert len(changed) > 0.5 * len(init)                                                   # the generator was trained
    assert not torch.equal(ckpt["fake_score"]["fake_unet.out.2.weight"], init["out.2.weight"])  # so was the fake score
    export = sdxl.read_safetensors(os.path.join(out, "generator.safetensors"))
    assert all(torch.equal(export[k], v.half()) for k, v in ckpt["generator"].items())
    assert PIL.Image.open(os.path.join(out, "samples_0000004.png")).size == (4 * 128, 128)


def test_generate_writes_png_from_trained_generator(tiny_run):
    png = str(tiny_run["root"] / "cat.png")
    sdxl.main(["generate", "--preset", "tiny", "--unet", os.path.join(tiny_run["out"], "generator.safetensors"),
               "--prompt", "a cat", "--steps", "4", "--seed", "0", "--out", png, "--device", "cpu"])
    image = PIL.Image.open(png)
    assert image.size == (128, 128) and image.mode == "RGB"
    pixels = np.asarray(image)
    assert pixels.std() > 1
    # The same image from the same seed, computed with the functions directly.
    net, parts = sdxl.build_unet(sdxl.load_unet_state(os.path.join(tiny_run["out"], "checkpoint.pt"), sdxl.TINY_UNET),
                                 sdxl.TINY_UNET, "cpu", torch.float32, "ckpt"), sdxl.load_parts("tiny", "", "cpu")
    direct = sdxl.generate(net, parts["clip_l"], parts["clip_g"], parts["vae"], ["a cat"], 128, 128, seed=0, steps=4)[0]
    assert np.abs(direct.astype(int) - pixels.astype(int)).max() <= 2  # fp16 export vs fp32 checkpoint
    # DMD2's COCO evaluator truncates to 8 bits ((x + 1) * 127.5 -> uint8), the default; EDM's rule rounds
    rounded = sdxl.generate(net, parts["clip_l"], parts["clip_g"], parts["vae"], ["a cat"], 128, 128, seed=0, steps=4,
                            quantize="edm")[0]
    step = rounded.astype(int) - direct.astype(int)
    assert step.min() >= 0 and step.max() == 1 and 0.3 < step.mean() < 0.7


def test_outputs_that_cannot_be_written_fail_before_the_work(tmp_path, capsys, monkeypatch):
    """generate --out and eval --save_ref are checked before any model loads or any feature is computed."""
    monkeypatch.setattr(sdxl, "load_for_inference", lambda *a: pytest.fail("loaded the models before checking --out"))
    monkeypatch.setattr(sdxl.fid, "load_inception", lambda *a: pytest.fail("loaded Inception before --save_ref"))
    (tmp_path / "a_file").write_text("")
    (tmp_path / "prompts.txt").write_text("a cat\n")
    bad = str(tmp_path / "a_file" / "x")
    prompts = ["--preset", "tiny", "--prompts", str(tmp_path / "prompts.txt")]
    (tmp_path / "pngs").mkdir()
    (tmp_path / "pngs" / "00000.png").write_bytes(b"")
    for argv, problem in ((["generate", "--preset", "tiny", "--prompt", "a cat", "--out", bad + ".png"],
                           "cannot make its folder"),
                          (["generate", *prompts, "--outdir", str(tmp_path / "a_file")], "a_file: is a file"),
                          (["generate", *prompts, "--outdir", bad], "cannot make this folder"),
                          (["generate", *prompts, "--outdir", str(tmp_path / "pngs")], "holds images of another run"),
                          (["eval", "--images", str(tmp_path), "--prompts", str(tmp_path / "prompts.txt"), "--ref",
                            str(tmp_path), "--save_ref", bad + ".npz", "--clip", "clip.bin"], "cannot make its folder")):
        with pytest.raises(SystemExit) as exit_:
            sdxl.main(argv)
        assert exit_.value.code == 1 and problem in capsys.readouterr().err, argv


def test_generate_that_fails_leaves_no_folder_for_its_out_or_outdir(tmp_path, monkeypatch, capsys):
    """--out's folder is made when the image is written, and --outdir's is removed again, so a run whose models fail
    to load leaves nothing behind."""
    def no_models(*args):
        raise ValueError("missing.safetensors: no such file")
    monkeypatch.setattr(sdxl, "load_for_inference", no_models)
    with pytest.raises(SystemExit):
        sdxl.main(["generate", "--preset", "tiny", "--prompt", "a cat", "--out", str(tmp_path / "new" / "x.png")])
    assert "no such file" in capsys.readouterr().err and os.listdir(tmp_path) == []
    # --prompts: --outdir is made at the check (it must be writable before the models load); a failure removes it,
    # and a folder that was there before stays
    (tmp_path / "prompts.txt").write_text("a cat\n")
    (tmp_path / "old").mkdir()
    for outdir in (tmp_path / "new" / "images", tmp_path / "old"):
        with pytest.raises(SystemExit):
            sdxl.main(["generate", "--preset", "tiny", "--prompts", str(tmp_path / "prompts.txt"), "--outdir", str(outdir)])
        assert "no such file" in capsys.readouterr().err
        assert sorted(os.listdir(tmp_path)) == ["old", "prompts.txt"] and os.listdir(tmp_path / "old") == []


def test_impossible_options_are_refused_at_start_each_by_name():
    """A 0, a negative number or an impossible range fails before the models load, naming the option, not as a
    ZeroDivisionError or an IndexError some iterations into a run."""
    bad = tiny_config(dfake_gen_update_ratio=0, log_every=0, max_step_percent=1.5, batch_size=0, lora_alpha=4.0,
                      beta2=1.0, total_steps=-1)
    with pytest.raises(ValueError) as e:
        sdxl.check_config(bad)
    for name in ("dfake_gen_update_ratio", "log_every", "max_step_percent", "batch_size", "lora_alpha", "beta2",
                 "total_steps"):
        assert f"--{name}" in str(e.value), name
    for kw, words in ((dict(num_denoising_step=0), "steps must be 1 to 1000"),
                      (dict(num_denoising_step=1, conditioning_timestep=1000), "timestep 0 to 999"),
                      (dict(min_step_percent=0.9, max_step_percent=0.1), "--min_step_percent < --max_step_percent"),
                      (dict(lora_rank=4, lora_alpha=0.0), "--lora_alpha must be above 0")):
        with pytest.raises(ValueError, match=words):
            sdxl.check_config(tiny_config(**kw))
    sdxl.check_config(tiny_config())
    sdxl.check_config(tiny_config(lora_rank=4, lora_alpha=4.0))


def test_generate_and_encode_refuse_impossible_counts_before_the_models_load(tmp_path, capsys, monkeypatch):
    """Before: --batch -1 or --shard_size -1 printed 'wrote 4 images' and wrote none; --steps -1 raised a NameError."""
    monkeypatch.setattr(sdxl, "load_for_inference", lambda *a: pytest.fail("loaded the models before the checks"))
    monkeypatch.setattr(sdxl, "load_parts", lambda *a, **k: pytest.fail("loaded the VAE before the checks"))
    (tmp_path / "prompts.txt").write_text("a cat\n")
    prompts = ["generate", "--preset", "tiny", "--prompts", str(tmp_path / "prompts.txt"), "--outdir", str(tmp_path)]
    for argv, words in (([*prompts, "--batch", "-1"], "--batch must be at least 1"),
                        ([*prompts, "--steps", "-1"], "--steps, --height and --width"),
                        (["generate", "--preset", "tiny", "--prompt", "a cat", "--height", "-64"], "--height"),
                        (["encode", "--preset", "tiny", "--images", str(tmp_path), "--out", str(tmp_path / "lat"),
                          "--shard_size", "-1"], "--shard_size >= 1"),
                        (["encode", "--preset", "tiny", "--images", str(tmp_path), "--out", str(tmp_path / "lat"),
                          "--resolution", "100"], "--resolution must be a power of 2 of at least 64"),
                        (["export", "--unet", "missing.safetensors", "--out", str(tmp_path)], f"--out {tmp_path}: is a "
                         "folder")):
        with pytest.raises(SystemExit) as exit_:
            sdxl.main(argv)
        assert exit_.value.code == 1 and words in capsys.readouterr().err, argv
    with pytest.raises(ValueError, match="steps must be 1 to 1000"):
        sdxl.dmd2_timesteps(1001)
    with pytest.raises(ValueError, match="steps must be 1 to 1000"):
        sdxl.sample_euler_cfg(None, torch.zeros(1, 4, 2, 2), None, None, 0, 8.0, sdxl.ddpm_alphas_cumprod())


def test_export_to_diffusers_names_loads_in_diffusers(tiny_run, tmp_path):
    """`sdxl.py export --format diffusers` writes the inverse of diffusers_to_sgm_unet: diffusers' UNet2DConditionModel
    loads it strictly and predicts what our UNet predicts from generator.safetensors."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file
    gen, out = os.path.join(tiny_run["out"], "generator.safetensors"), str(tmp_path / "unet_diffusers.safetensors")
    sdxl.main(["export", "--unet", gen, "--format", "diffusers", "--out", out])
    cfg = sdxl.TINY_UNET
    ref = UNet2DConditionModel(**sdxl_diffusers.diffusers_unet_config(cfg))
    exported = load_file(out)                                              # the reference reader
    ref.load_state_dict({k: v.float() for k, v in exported.items()}, strict=True)
    state = sdxl.read_safetensors(gen)
    assert all(torch.equal(v, state[k]) for k, v in sdxl.diffusers_to_sgm_unet(exported, cfg).items())
    net = sdxl.build_unet(state, cfg, "cpu", torch.float32, gen)
    x, t, context = torch.randn(2, 4, 16, 16), torch.tensor([999, 249]), torch.randn(2, 77, cfg.context_dim)
    text_embeds, time_ids = torch.randn(2, 32), torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]] * 2)
    y = sdxl.vector_cond(text_embeds, (128, 128), (0, 0), (128, 128))
    with torch.no_grad():
        expected = ref(x, t, encoder_hidden_states=context, added_cond_kwargs=dict(text_embeds=text_embeds, time_ids=time_ids)).sample
        assert (net(x, t, context, y) - expected).abs().max() <= 1e-5 and expected.std() > 0.01


def test_resume_is_exact(tiny_run, tmp_path):
    """2 iterations, stop, resume for 2 more (with a generator update) == 4 straight (optimizer states restored, RNG a
    function of the step)."""
    out, kw = str(tmp_path / "resumed"), dict(latents=tiny_run["latents"], dfake_gen_update_ratio=2, device="cpu")
    sdxl.train(tiny_config(outdir=out, total_steps=2, **kw))
    with pytest.raises(ValueError, match="holds a run's checkpoint.pt; add --resume"):   # a new run would overwrite it
        sdxl.train(tiny_config(outdir=out, total_steps=4, **kw))
    sdxl.train(tiny_config(outdir=out, total_steps=4, resume=True, **kw))
    a = torch.load(os.path.join(tiny_run["out"], "checkpoint.pt"), weights_only=True)
    b = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    for part in ("generator", "fake_score"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])
    for opt in ("opt_g", "opt_d"):
        assert all(torch.equal(a[opt]["state"][k]["exp_avg_sq"], b[opt]["state"][k]["exp_avg_sq"]) for k in a[opt]["state"])


def test_non_finite_loss_stops_and_keeps_the_checkpoint(tiny_run, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "nan")
    args = ["train", "--preset", "tiny", "--latents", tiny_run["latents"], "--outdir", out, "--sample_every", "0",
            "--dfake_gen_update_ratio", "1", "--device", "cpu"]
    sdxl.main(args + ["--total_steps", "1"])
    ckpt = os.path.join(out, "checkpoint.pt")
    before = open(ckpt, "rb").read()
    monkeypatch.setattr(sdxl, "loss_distribution_matching", lambda x, *a: (x * float("nan")).mean())
    with pytest.raises(SystemExit) as exit_info:
        sdxl.main(args + ["--total_steps", "3", "--resume"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    assert "non-finite loss at step 1" in err and "loss_dm=nan" in err and ckpt in err
    assert open(ckpt, "rb").read() == before


def recorded_run(monkeypatch, **kw):
    """A tiny training run whose generator records, per call, (t, gradient on, autocast on) and whose text encoders
    record their weights' dtype."""
    calls, encoders, make_trainable = [], [], sdxl.make_trainable

    def recording(module, *args):
        module = make_trainable(module, *args)
        if isinstance(module, sdxl.SDXLUNet):
            module.register_forward_pre_hook(lambda m, inputs: calls.append(
                (int(inputs[1][0]), torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"))))
        return module

    encode = sdxl.encode_prompt
    monkeypatch.setattr(sdxl, "make_trainable", recording)
    monkeypatch.setattr(sdxl, "encode_prompt", lambda clip_l, clip_g, prompts, *a: encoders.append(
        (clip_l.final_layer_norm.weight.dtype, clip_g.ln_final.weight.dtype, list(prompts))) or encode(clip_l, clip_g, prompts, *a))
    result = sdxl.train(tiny_config(**{"sample_every": 0, "device": "cpu", **kw}))
    return result["history"], calls, encoders


@pytest.mark.parametrize("no_grad_bf16", [False, True])
def test_precision_fp32_outside_the_trained_passes(tiny_run, tmp_path, monkeypatch, no_grad_bf16):
    """--precision bf16 (official --use_fp16): autocast on the generator's TRAINED pass only; the text encoders, the
    backward-simulation chain and the no-grad generator pass of fake-score-only iterations stay fp32, as official,
    unless --no_grad_bf16."""
    history, calls, encoders = recorded_run(monkeypatch, latents=tiny_run["latents"], outdir=str(tmp_path / "p"),
                                            total_steps=3, dfake_gen_update_ratio=2, precision="bf16",
                                            no_grad_bf16=no_grad_bf16)
    expected, i = [], 0
    for h in history:
        k, trained = h["k"], h["step"] % 2 == 0
        expected += [(False, no_grad_bf16)] * k + [(trained, trained or no_grad_bf16)]
    assert [(grad, amp) for _, grad, amp in calls] == expected
    assert {(a, b) for a, b, _ in encoders} == {(torch.bfloat16,) * 2 if no_grad_bf16 else (torch.float32,) * 2}
    assert all(np.isfinite(h["loss_fake"]) for h in history)


def test_warmup_counts_scheduler_steps_as_accelerate_does():
    """constant_with_warmup over 500 scheduler steps, 64 per iteration (one per process of the official 64-GPU run):
    full learning rate from iteration 8 on, at any GPU count; --help says so."""
    cfg = sdxl.Config()
    opt = lambda: torch.optim.AdamW([nn.Parameter(torch.zeros(1))])
    run = SimpleNamespace(cfg=cfg, opt=dict(generator=opt(), fake_score=opt()))
    lrs = []
    for step in range(10):
        sdxl.set_learning_rates(run, step)
        lrs.append(run.opt["generator"].param_groups[0]["lr"] / cfg.generator_lr)
    assert lrs == pytest.approx([min(1.0, 64 * i / 500) for i in range(10)]) and lrs[7] < 1 == lrs[8]
    assert run.opt["fake_score"].param_groups[0]["lr"] == cfg.fake_score_lr
    help_text = sdxl.build_parser()[1].format_help()                         # what `sdxl.py train --help` prints
    assert "~8 iterations" in " ".join(help_text.split())


def test_generator_prompts_are_the_real_latent_captions(tiny_run, tmp_path, monkeypatch):
    """Official 4-step run (--denoising): the generator is conditioned on the captions of a batch of real latents;
    the discriminator's real branch gets another batch, each latent with its own caption."""
    history, _, encoders = recorded_run(monkeypatch, latents=tiny_run["latents"], outdir=str(tmp_path / "c"),
                                        total_steps=2)
    data = sdxl.LatentDataset(tiny_run["latents"], 128)
    for step in range(2):
        g = sdxl.unet.batch_generator(0, step, 0, "cpu")
        torch.randint(4, (1,), generator=g)                                    # the k draw
        _, captions = data.sample(2, g)
        assert encoders[2 * step][2] == captions                               # the generator's prompts
        assert all(c in CAPTIONS for c in encoders[2 * step + 1][2])           # the real branch's captions
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("only this prompt\n")
    _, _, encoders = recorded_run(monkeypatch, latents=tiny_run["latents"], outdir=str(tmp_path / "p"), total_steps=1,
                                  prompts=str(prompts))
    assert encoders[0][2] == ["only this prompt"] * 2 and encoders[1][2] != encoders[0][2]


def test_ablation_without_backward_simulation_noises_real_latents(tiny_run, tmp_path, monkeypatch):
    """Table 4, "w/o backward simulation": no generator chain; each sample's input is its own real latent noised to
    its own step t_k (pure noise at 999)."""
    history, calls, _ = recorded_run(monkeypatch, latents=tiny_run["latents"], outdir=str(tmp_path / "nb"),
                                     total_steps=2, backward_simulation=False, batch_size=4)
    assert len(calls) == 2 and all(t in (999, 749, 499, 249) for t, _, _ in calls)      # one generator pass each
    data = sdxl.LatentDataset(tiny_run["latents"], 128)
    g = torch.Generator().manual_seed(5)
    x_real, _ = data.sample(64, g)
    x_t, t = sdxl.noised_real_latents(x_real, [999, 749, 499, 249], AB, torch.Generator().manual_seed(6))
    assert len(set(t.tolist())) == 4
    g = torch.Generator().manual_seed(6)
    torch.randint(4, (64,), generator=g)
    noise = torch.randn(x_real.shape, generator=g)
    for i in range(64):
        ab = AB[t[i]].float()
        expected = noise[i] if t[i] == 999 else ab.sqrt() * x_real[i] + (1 - ab).sqrt() * noise[i]
        torch.testing.assert_close(x_t[i], expected)
    # a 1-step generator's one step is step 0: pure noise at t = 399, as sample_dmd2 feeds it, not a noised latent
    x_t, t = sdxl.noised_real_latents(x_real, [399], AB, torch.Generator().manual_seed(6))
    g = torch.Generator().manual_seed(6)
    torch.randint(1, (64,), generator=g)
    assert t.eq(399).all() and torch.equal(x_t, torch.randn(x_real.shape, generator=g))


def test_generator_init_starts_the_generator_from_its_file_and_the_teacher_from_the_base(tiny_run, tmp_path):
    """--generator_init (DMD2's 1-step run: an ODE-regression checkpoint): G starts from the file, while the teacher
    and the fake score stay --ckpt's UNet."""
    base = sdxl.load_parts("tiny", "", "cpu")["unet_state"]
    init = {k: v + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(i))
            for i, (k, v) in enumerate(base.items())}
    path = str(tmp_path / "ode_init.safetensors")
    unet.write_safetensors(path, init)
    run = sdxl.setup_training(tiny_config(latents=tiny_run["latents"], outdir=str(tmp_path / "run"),
                                          generator_init=path, device="cpu"))
    g, teacher, fake = run.generator.state_dict(), run.teacher.state_dict(), run.fake_score.fake_unet.state_dict()
    assert all(torch.equal(g[k], init[k]) for k in init)
    assert all(torch.equal(teacher[k].float(), base[k]) and torch.equal(fake[k], base[k]) for k in base)
    wrong = str(tmp_path / "wrong.safetensors")
    unet.write_safetensors(wrong, {k: v for k, v in init.items() if k != "out.2.weight"})
    with pytest.raises(ValueError, match="(?s)wrong.safetensors: the --generator_init UNet weights do not match.*out.2"):
        sdxl.setup_training(tiny_config(latents=tiny_run["latents"], outdir=str(tmp_path / "run2"),
                                        generator_init=wrong, device="cpu"))
    nan = {**init, "out.2.weight": init["out.2.weight"].clone().fill_(float("nan"))}
    ints = {**init, "out.2.bias": init["out.2.bias"].round().to(torch.int32)}
    for name, state, words in (("nan", nan, "hold NaN or inf.*e.g. out.2.weight"),
                               ("ints", ints, "not floating point, e.g. out.2.bias")):
        unet.write_safetensors(str(tmp_path / f"{name}.safetensors"), state)
        with pytest.raises(ValueError, match=f"{name}.safetensors: 1 of the --generator_init UNet's tensors.*{words}"):
            sdxl.setup_training(tiny_config(latents=tiny_run["latents"], outdir=str(tmp_path / f"run_{name}"),
                                            generator_init=str(tmp_path / f"{name}.safetensors"), device="cpu"))
    for kw, words in ((dict(generator_init=str(tmp_path / "none.bin")), "none.bin: no such file"),
                      (dict(generator_init=path, lora_rank=4), "--generator_init with --lora_rank")):
        with pytest.raises(ValueError, match=words):
            sdxl.check_config(tiny_config(latents=tiny_run["latents"], outdir=str(tmp_path / "run3"), **kw))


def test_ablation_gan_only_has_no_distribution_matching(tiny_run, tmp_path, monkeypatch):
    """Table 4, "w/o distribution matching" (official --gan_alone): the generator minimises the GAN loss alone."""
    monkeypatch.setattr(sdxl, "loss_distribution_matching", lambda *a: pytest.fail("DM loss in a GAN-only run"))
    history, _, _ = recorded_run(monkeypatch, latents=tiny_run["latents"], outdir=str(tmp_path / "gan"),
                                 total_steps=1, gan_only=True)
    assert "loss_dm" not in history[0] and np.isfinite(history[0]["loss_g_gan"]) and history[0]["grad_norm_g"] > 0


def test_batch_size_must_split_into_processes_and_rounds():
    assert sdxl.micro_batching(sdxl.Config(), 64) == (2, 1)                     # official: 2 per GPU x 64
    assert sdxl.micro_batching(sdxl.Config(), 8) == (2, 8)                      # 8 GPUs: 8 accumulation rounds
    assert sdxl.micro_batching(sdxl.Config(), 1) == (2, 64)
    assert sdxl.micro_batching(sdxl.Config(batch_gpu=0, batch_size=6), 3) == (2, 1)
    for bad in (dict(batch_size=128, batch_gpu=3), dict(batch_size=5, batch_gpu=0)):
        with pytest.raises(ValueError, match="--batch_size"):
            sdxl.micro_batching(sdxl.Config(**bad), 2)


def test_ctrl_c_says_which_checkpoint_is_kept(tiny_run, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "ctrl_c")
    args = ["train", "--preset", "tiny", "--latents", tiny_run["latents"], "--outdir", out, "--sample_every", "0",
            "--dfake_gen_update_ratio", "1", "--device", "cpu"]
    sdxl.main(args + ["--total_steps", "1"])

    def ctrl_c(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(sdxl, "loss_distribution_matching", ctrl_c)
    with pytest.raises(SystemExit) as exit_info:
        sdxl.main(args + ["--total_steps", "3", "--resume"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 130
    assert err == f"sdxl.py: interrupted; {os.path.join(out, 'checkpoint.pt')} is kept: add --resume to go on from it\n"


def test_non_finite_weights_stop_before_any_save(tiny_run, tmp_path, capsys):
    """A negative AdamW second moment: the losses stay finite, the step writes NaN weights. The run must stop there,
    and checkpoint.pt must keep the last good weights (issue: the next save used to overwrite it with the NaNs)."""
    out = str(tmp_path / "nan_weights")
    args = ["train", "--preset", "tiny", "--latents", tiny_run["latents"], "--outdir", out, "--sample_every", "0",
            "--dfake_gen_update_ratio", "1", "--device", "cpu"]
    sdxl.main(args + ["--total_steps", "1"])
    ckpt_path = os.path.join(out, "checkpoint.pt")
    ckpt = torch.load(ckpt_path, weights_only=True)
    for state in ckpt["opt_g"]["state"].values():
        state["exp_avg_sq"].fill_(-1.0)
    torch.save(ckpt, ckpt_path)
    before = open(ckpt_path, "rb").read()
    with pytest.raises(SystemExit) as exit_info:
        sdxl.main(args + ["--total_steps", "2", "--resume"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "non-finite weights in generator" in err and ckpt_path in err
    assert open(ckpt_path, "rb").read() == before


def test_kill_at_the_final_save_leaves_no_stale_generator(tiny_run, tmp_path, monkeypatch):
    """A kill while the final files are written: the generator file must never lag the finished checkpoint."""
    out = str(tmp_path / "kill")
    kw = dict(latents=tiny_run["latents"], dfake_gen_update_ratio=1, device="cpu", outdir=out, ckpt_every=1)
    sdxl.train(tiny_config(total_steps=2, **kw))
    write = sdxl.write_safetensors

    def killed_at_step_3(path, tensors, metadata=None):
        if path.endswith("generator.safetensors") and (metadata or {}).get("step") == "3":
            raise KeyboardInterrupt("killed")
        return write(path, tensors, metadata)

    monkeypatch.setattr(sdxl, "write_safetensors", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        sdxl.train(tiny_config(total_steps=3, resume=True, **kw))
    monkeypatch.setattr(sdxl, "write_safetensors", write)
    sdxl.train(tiny_config(total_steps=3, resume=True, **kw))
    gen_path, ckpt_path = os.path.join(out, "generator.safetensors"), os.path.join(out, "checkpoint.pt")
    # step 3 was logged before the kill and again after it: log.txt has it once
    assert [line.split()[1] for line in open(os.path.join(out, "log.txt"))] == ["1", "2", "3"]

    def consistent():
        ckpt, gen = torch.load(ckpt_path, weights_only=True), sdxl.read_safetensors(gen_path)
        meta = sdxl.read_safetensors_header(gen_path)[1]
        return ckpt["step"] == int(meta["step"]) == 3 and all(torch.equal(gen[k], v.half()) for k, v in ckpt["generator"].items())

    assert consistent()
    # A generator file from an older step beside a finished checkpoint (e.g. an older run's kill): rewritten on resume.
    old = str(tmp_path / "old.safetensors")
    sdxl.write_generator(old, sdxl.load_parts("tiny", "", "cpu")["unet_state"], 1)
    os.replace(old, gen_path)
    sdxl.train(tiny_config(total_steps=3, resume=True, **kw))
    assert consistent()


def test_stale_temporaries_of_the_run_are_removed_at_start(tiny_run, tmp_path):
    out = tmp_path / "tmps"
    out.mkdir()
    stale = ["checkpoint.pt.k2j3h4.tmp", "generator.safetensors.tmp12345"]
    kept = ["notes.tmp", "generator.safetensors.tmpX", "other.pt.abc.tmp"]
    for name in stale + kept:
        (out / name).write_bytes(b"x" * 10)
    sdxl.train(tiny_config(latents=tiny_run["latents"], outdir=str(out), total_steps=1, device="cpu"))
    names = set(os.listdir(out))
    assert not names & set(stale) and set(kept) <= names


def test_resume_from_a_foreign_checkpoint_names_the_file(tiny_run, tmp_path, capsys):
    out = tmp_path / "foreign"
    out.mkdir()
    ckpt_path = str(out / "checkpoint.pt")
    args = ["train", "--preset", "tiny", "--latents", tiny_run["latents"], "--outdir", str(out), "--device", "cpu",
            "--total_steps", "1", "--resume"]
    imagenet64_like = dict(step=1, cfg={}, net_kwargs={}, generator={}, guidance={}, opt_g={}, opt_d={}, rng=[])
    for bad, words in ((imagenet64_like, "missing fake_score"), ([1, 2], "expected a dict"),
                       (dict(step=1, cfg={}, generator={"x": torch.zeros(1)}, fake_score={}, opt_g={}, opt_d={}),
                        "does not fit")):
        torch.save(bad, ckpt_path)
        with pytest.raises(SystemExit):
            sdxl.main(args)
        err = capsys.readouterr().err
        assert ckpt_path in err and words in err, err


@pytest.mark.parametrize("problem, match", [
    ("no caption", "no caption"), ("empty caption", "empty caption"), ("unreadable", "cannot read the image"),
    ("no images", "no images"), ("not a folder", "not a folder")])
def test_encode_errors_name_the_file(tmp_path, problem, match):
    folder = str(tmp_path / "imgs")
    if problem != "not a folder":
        write_images(folder, n=2)
    if problem == "no caption":
        os.remove(os.path.join(folder, "im1.txt"))
    elif problem == "empty caption":
        open(os.path.join(folder, "im1.txt"), "w").close()
    elif problem == "unreadable":
        open(os.path.join(folder, "im1.png"), "wb").write(b"not a png")
    elif problem == "no images":
        for f in os.listdir(folder):
            if f.endswith(".png"):
                os.remove(os.path.join(folder, f))
    vae = sdxl.AutoencoderKL(sdxl.TINY_VAE)
    with pytest.raises(ValueError, match=match) as err:
        sdxl.encode_folder(vae, folder, str(tmp_path / "new" / "out"), 32)
    assert folder in str(err.value)
    assert not (tmp_path / "new").exists()              # a failed encode leaves no empty folders behind


def test_latent_dataset_errors(tiny_run, tmp_path):
    with pytest.raises(ValueError, match="for --resolution 256"):
        sdxl.LatentDataset(tiny_run["latents"], 256)
    sdxl.write_safetensors(str(tmp_path / "latents_00000.safetensors"), {"latents": torch.zeros(2, 4, 16, 16)}, {"captions": '["one"]'})
    with pytest.raises(ValueError, match="JSON list of 2 strings"):
        sdxl.LatentDataset(str(tmp_path), 128)
    with pytest.raises(ValueError, match="already holds latents"):
        sdxl.encode_folder(sdxl.AutoencoderKL(sdxl.TINY_VAE), tiny_run["images"], str(tmp_path), 32)
    with pytest.raises(ValueError, match="no latents_"):
        sdxl.LatentDataset(str(tmp_path / "nothing"), 128)


def test_load_unet_state_formats(tmp_path):
    """DMD2's diffusers-named .bin, the full sgm checkpoint's prefixed keys, and our checkpoint.pt give one state dict."""
    from diffusers import UNet2DConditionModel
    cfg = sdxl.TINY_UNET
    ref = UNet2DConditionModel(**sdxl_diffusers.diffusers_unet_config(cfg))
    torch.save(ref.state_dict(), tmp_path / "dmd2_unet.bin")
    state = sdxl.load_unet_state(str(tmp_path / "dmd2_unet.bin"), cfg)
    assert state.keys() == sdxl.SDXLUNet(cfg).state_dict().keys()
    sdxl.write_safetensors(str(tmp_path / "full.safetensors"), {**{sdxl.PREFIX_UNET + k: v for k, v in state.items()},
                                                                 sdxl.PREFIX_VAE + "quant_conv.bias": torch.zeros(8)})
    torch.save({"step": 1, "generator": state}, tmp_path / "checkpoint.pt")
    for name in ("full.safetensors", "checkpoint.pt"):
        other = sdxl.load_unet_state(str(tmp_path / name), cfg)
        assert other.keys() == state.keys() and all(torch.equal(other[k], state[k]) for k in state)
    net = sdxl.build_unet(state, cfg, "cpu", torch.float32, "dmd2_unet.bin")
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([499]), torch.randn(1, 77, cfg.context_dim)
    text_embeds, time_ids = torch.randn(1, 32), torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
    y = sdxl.vector_cond(text_embeds, (64, 64), (0, 0), (64, 64))
    with torch.no_grad():
        expected = ref(x, t, encoder_hidden_states=context, added_cond_kwargs=dict(text_embeds=text_embeds, time_ids=time_ids)).sample
        assert (net(x, t, context, y) - expected).abs().max() < 1e-4
    torch.save([1, 2, 3], tmp_path / "bad.bin")
    with pytest.raises(ValueError, match="bad.bin"):
        sdxl.load_unet_state(str(tmp_path / "bad.bin"), cfg)


# Any SDXL-format single file through the command line: two tiny layouts in Stability's names that no other test uses;
# every config is inferred from the file's shapes.
LAYOUTS = {
    "three_levels": dict(clip_l=sdxl.TextConfig(width=64, layers=3, heads=1),
                         clip_g=sdxl.TextConfig(width=128, layers=2, heads=2, act="gelu", embed_dim=96),
                         vae=sdxl.VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1),
                         unet=sdxl.SDXLUNetConfig(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2,
                                                  transformer_depth=(0, 1, 2), num_head_channels=64, context_dim=192,
                                                  adm_in_channels=96 + 6 * 256)),
    "two_levels": dict(clip_l=sdxl.TextConfig(width=128, layers=1, heads=2),
                       clip_g=sdxl.TextConfig(width=64, layers=2, heads=1, act="gelu", embed_dim=32),
                       vae=sdxl.VAEConfig(ch=32, ch_mult=(1, 1, 2, 4), num_res_blocks=2),
                       unet=sdxl.SDXLUNetConfig(model_channels=32, channel_mult=(1, 3), num_res_blocks=1,
                                                transformer_depth=(1, 3), num_head_channels=32, context_dim=192,
                                                adm_in_channels=32 + 6 * 256)),
}


def write_sdxl_file(path, layout, seed=0):
    """Random modules of the layout, written as one fp16 single file with Stability's prefixes and names."""
    torch.manual_seed(seed)
    modules = {sdxl.PREFIX_CLIP_L: sdxl.CLIPTextModel(layout["clip_l"]), sdxl.PREFIX_CLIP_G: sdxl.OpenCLIPTextModel(layout["clip_g"]),
               sdxl.PREFIX_VAE: sdxl.AutoencoderKL(layout["vae"]), sdxl.PREFIX_UNET: sdxl.SDXLUNet(layout["unet"])}
    with torch.no_grad():
        for p in modules[sdxl.PREFIX_UNET].parameters():   # the UNet's zero-initialised layers would hide wiring errors
            p.add_(torch.randn_like(p) * 0.02)
    sdxl.write_safetensors(str(path), {prefix + k: v.half() for prefix, m in modules.items() for k, v in m.state_dict().items()})


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_any_sdxl_format_file_through_the_command_line(name, tmp_path):
    layout, ckpt = LAYOUTS[name], str(tmp_path / f"{name}.safetensors")
    write_sdxl_file(ckpt, layout)
    assert sdxl.infer_configs(ckpt) == layout
    png = str(tmp_path / "cat.png")
    sdxl.main(["generate", "--ckpt", ckpt, "--prompt", "a cat", "--sampler", "dmd2", "--steps", "2", "--height", "64",
               "--width", "64", "--out", png, "--device", "cpu"])
    clip_l, clip_g, vae = sdxl.load_sdxl_parts(ckpt, "cpu", clip_l=layout["clip_l"], clip_g=layout["clip_g"], vae=layout["vae"])
    net = sdxl.build_unet(sdxl.read_safetensors(ckpt, sdxl.PREFIX_UNET), layout["unet"], "cpu", torch.float32, ckpt)
    direct = sdxl.generate(net, clip_l, clip_g, vae, ["a cat"], 64, 64, seed=0, steps=2)[0]
    assert np.array_equal(np.asarray(PIL.Image.open(png)), direct) and direct.std() > 0
    images, latents, out = str(tmp_path / "images"), str(tmp_path / "latents"), str(tmp_path / "run")
    write_images(images, n=2)
    sdxl.main(["encode", "--ckpt", ckpt, "--images", images, "--out", latents, "--resolution", "128", "--device", "cpu"])
    sdxl.main(["train", "--ckpt", ckpt, "--latents", latents, "--resolution", "128", "--outdir", out, "--total_steps", "1",
               "--batch_size", "2", "--batch_gpu", "0", "--precision", "fp32", "--warmup_steps", "0", "--sample_every", "0",
               "--no-checkpointing", "--generator_lr", "1e-3", "--device", "cpu"])
    trained = sdxl.read_safetensors(os.path.join(out, "generator.safetensors"))
    assert trained.keys() == net.state_dict().keys() and not torch.equal(trained["out.2.weight"], net.out[2].weight.half())
    sdxl.main(["generate", "--ckpt", ckpt, "--unet", os.path.join(out, "generator.safetensors"), "--prompt", "a cat",
               "--height", "64", "--width", "64", "--out", png, "--device", "cpu"])


def test_uninferable_file_names_what_is_missing(tmp_path, capsys):
    path = str(tmp_path / "odd.safetensors")
    write_sdxl_file(path, LAYOUTS["two_levels"])
    state = sdxl.read_safetensors(path)
    state = {k: v.clone() for k, v in state.items() if k != sdxl.PREFIX_CLIP_G + "text_projection"}
    sdxl.write_safetensors(path, state)
    with pytest.raises(SystemExit):
        sdxl.main(["generate", "--ckpt", path, "--prompt", "a cat", "--out", str(tmp_path / "x.png"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert path in err and "bigG" in err and "text_projection" in err


def test_bench_pipeline_equals_diffusers_sdxl_pipeline():
    """bench's two pipelines on the tiny models: ours (sample_dmd2 + our VAE) and diffusers' StableDiffusionXLPipeline +
    LCMScheduler with the same weights, converted by diffusers' own single-file converters, and the same noise."""
    parts = sdxl.load_parts("tiny", "", "cpu")
    net = sdxl.build_unet(parts["unet_state"], parts["unet_cfg"], "cpu", torch.float32, "tiny")
    r = sdxl.bench_pipelines(net, parts["clip_l"], parts["clip_g"], parts["vae"], parts["vae_cfg"], "a cat", 64, 96, reps=1,
                              reference=sdxl_diffusers.diffusers_pipeline)
    ours, theirs = r["ours"]["image"], r["diffusers"]["image"]
    assert ours.shape == (1, 3, 64, 96) and ours.std() > 0.01
    assert (ours - theirs).abs().max() < 1e-4
    assert r["ours"]["median"] > 0 and r["text_encoders"] > 0


def test_bench_pipeline_bf16_unet_with_fp32_vae():
    """The GPU default: a bf16 UNet beside an fp32 VAE. Diffusers' pipeline hands its VAE bf16 latents, which the
    reference's cast must accept (this failed on the GPU before), and both images agree to bf16 precision."""
    parts = sdxl.load_parts("tiny", "", "cpu", torch.bfloat16)
    assert next(parts["vae"].parameters()).dtype == torch.float32
    net = sdxl.build_unet(parts["unet_state"], parts["unet_cfg"], "cpu", torch.bfloat16, "tiny")
    r = sdxl.bench_pipelines(net, parts["clip_l"], parts["clip_g"], parts["vae"], parts["vae_cfg"], "a cat", 64, 64, reps=1,
                              reference=sdxl_diffusers.diffusers_pipeline)
    ours, theirs = r["ours"]["image"], r["diffusers"]["image"]
    assert ours.std() > 0.01 and (ours - theirs).abs().max() < 0.03


# ---------------------------------------------------------------------------------------------------------------
# Two processes, as torchrun starts them: FSDP2 on gloo (the multi-GPU code path, on the CPU)

FSDP_SCRIPT = """
import json, sys
sys.path.insert(0, {root!r})
import torch, torch.distributed as dist
import sdxl
cfg = sdxl.Config(**{{**sdxl.PRESETS["tiny"], "preset": "tiny", "latents": sys.argv[1], "outdir": sys.argv[2], "total_steps": 1,
                     "batch_size": 2, "sample_every": 0, "device": "cpu", "seed": 1}})
out = sdxl.train(cfg)
own_k = [int(torch.randint(4, (1,), generator=sdxl.unet.batch_generator(1, 0, dist.get_rank(), "cpu")))]  # first draw
print("RESULT", json.dumps(dict(rank=dist.get_rank(), k=[h["k"] for h in out["history"]], own_k=own_k,
                                loss=[h["loss_fake"] for h in out["history"]],
                                norms=[[h["grad_norm_g"], h["grad_norm_d"]] for h in out["history"]],
                                sharded=type(out["generator"].out[2].weight).__name__)), flush=True)
dist.destroy_process_group()
"""


def test_two_fsdp_processes_equal_one_process_with_accumulation(tiny_run, tmp_path):
    """Two ranks started with the environment torchrun gives them (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT),
    without torchrun's launcher process (one torch import less on a 2-core machine): FSDP2 on gloo, global batch 2 =
    2 processes x 1. Against one process with 2 accumulation rounds of 1 at the same global batch: the micro-batches
    are the same, so the weights must agree up to float summation order."""
    script, out = tmp_path / "run.py", str(tmp_path / "fsdp")
    script.write_text(FSDP_SCRIPT.format(root=ROOT))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, str(script), tiny_run["latents"], out], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=dict(os.environ, OMP_NUM_THREADS="1", RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                                  MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
             for r in range(2)]
    single = sdxl.train(tiny_config(latents=tiny_run["latents"], outdir=str(tmp_path / "one"), total_steps=1,
                                    batch_size=2, batch_gpu=1, device="cpu", seed=1))  # meanwhile, on the same cores
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)
    stdout = "\n".join(outputs)
    results = sorted((json.loads(line.split("RESULT ", 1)[1]) for line in stdout.splitlines() if "RESULT " in line),
                     key=lambda r: r["rank"])
    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["sharded"] == "DTensor" for r in results)                      # FSDP2 really sharded the weights
    assert results[0]["k"] == results[1]["k"] == results[0]["own_k"]            # micro-batch 0's k, on every rank...
    assert results[1]["own_k"] != results[1]["k"]                               # ...where rank 1 alone would have drawn another
    assert results[0]["loss"] == results[1]["loss"]                             # logged values are averaged over ranks
    assert single["history"][0]["k"] == results[0]["k"][0]
    assert abs(single["history"][0]["loss_fake"] - results[0]["loss"][0]) < 1e-5
    # Gradients are averaged over the global batch both ways (Adam would hide a factor of 2 in the weights).
    norms = (single["history"][0]["grad_norm_g"], single["history"][0]["grad_norm_d"])
    assert norms == pytest.approx(results[0]["norms"][0], rel=1e-4) and min(norms) > 0
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)   # gathered into plain tensors by rank 0
    init = sdxl.load_parts("tiny", "", "cpu")["unet_state"]
    assert ckpt["step"] == 1 and not torch.equal(ckpt["generator"]["out.2.weight"], init["out.2.weight"])
    one = torch.load(str(tmp_path / "one" / "checkpoint.pt"), weights_only=True)
    for part in ("generator", "fake_score"):
        for k, v in one[part].items():
            assert torch.allclose(ckpt[part][k], v, rtol=0, atol=2e-5), (part, k)   # an Adam step moves weights by ~1e-4
    net = sdxl.build_unet(sdxl.load_unet_state(os.path.join(out, "generator.safetensors"), sdxl.TINY_UNET),
                          sdxl.TINY_UNET, "cpu", torch.float32, "fsdp export")
    assert torch.equal(net.out[2].weight, ckpt["generator"]["out.2.weight"].half().float())


def sdxl_edit_moments(ckpt):
    for state in ckpt["opt_d"]["state"].values():
        state["exp_avg"] = torch.zeros(1)


@pytest.mark.parametrize("edit, words", [
    (lambda c: c.update(step="2"), "its step is '2', not an integer from 0"),
    (lambda c: c.update(cfg=[1]), "its cfg is not a dict"),
    (lambda c: c.update(generator=5), "its generator is 5, not a state dict"),
    (sdxl_edit_moments, "the fake score's optimiser state: parameter 0 .* not its parameter's shape")],
    ids=["step '2'", "cfg a list", "generator an int", "moments of shape [1]"])
def test_resume_refuses_checkpoint_values_a_step_could_not_use(tiny_run, tmp_path, edit, words):
    """These raised TypeError or AttributeError, or (the moments) a RuntimeError at the first AdamW step."""
    out = tmp_path / "run"
    shutil.copytree(tiny_run["out"], out)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    edit(ckpt)
    torch.save(ckpt, out / "checkpoint.pt")
    with pytest.raises(ValueError, match=f"checkpoint.pt: {words}"):
        sdxl.train(tiny_config(latents=tiny_run["latents"], outdir=str(out), total_steps=6, resume=True,
                               dfake_gen_update_ratio=2, device="cpu"))
