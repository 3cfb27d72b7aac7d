"""DMD2 on SDXL: 4-step text-to-image distillation (Yin et al. 2024, Sec. 3-5, App. C, F.4), in plain PyTorch.

PART 1 is the method. A student generator G, initialised from SDXL base, maps noise to latents in 4 steps
(t = 999, 749, 499, 249). Each iteration it is trained by the four ideas of DMD2, under the same headings as in
toy2d.py and imagenet64.py:
  1. distribution matching: the frozen teacher's x0-prediction minus the fake score's pulls G's output toward the
     teacher's distribution (gradient descent moves x along x0_real - x0_fake);
  2. the fake score, a copy of the base UNet trained on G's outputs, updated 5x as often as G (TTUR);
  3. a GAN head on the fake score's middle block, trained on real latents vs G's, whose loss G also minimises;
  4. backward simulation: G's input at step k is made by G's own first k steps, as at inference.
Then the loop (generator_turn, fake_score_turn), generation, run plumbing and the command line.
PART 2 is SDXL without diffusers: the CLIP tokenizer, the two text encoders (CLIP ViT-L/14, OpenCLIP ViT-bigG/14), the
micro-conditioning vector, the VAE, and the loading of any SDXL-format single file through a hand-written safetensors
reader; module names equal the checkpoint's keys, and the UNet is in unet.py. Only torch, numpy, pillow, tqdm and
scipy are imported. Sources are named where each part is built: tianweiy/DMD2, Stability-AI/generative-models
("sgm"), openai/CLIP, mlfoundations/open_clip; huggingface transformers/diffusers are test references only.

Generate (one GPU; ~7 GB of weights: bf16 UNet and text encoders, fp32 VAE; the UNet file is tianweiy/DMD2's release):
    python sdxl.py generate --ckpt sd_xl_base_1.0.safetensors --unet dmd2_sdxl_4step_unet_fp16.bin \
        --prompt "a photo of a cat" --steps 4 --seed 0 --out cat.png            # DMD2: t = 999, 749, 499, 249
    python sdxl.py generate --ckpt sd_xl_base_1.0.safetensors --unet dmd2_sdxl_1step_unet_fp16.bin --steps 1 ...
                                                                                        # 1 step: t = 399
    python sdxl.py generate --ckpt sd_xl_base_1.0.safetensors --prompt "..." --steps 30 --guidance 8 --out base.png
                                                                                        # the teacher: Euler + CFG
Train (DMD2 SDXL 4-step; three 2.6B UNets + two AdamW do not fit one 80 GB GPU: FSDP over N GPUs, 2 images per GPU
and gradient accumulation up to the global --batch_size 128; the paper used 64 A100 for ~60 h, 20k iterations; the
generator is conditioned on the real latents' captions, as in the official 4-step run):
    python sdxl.py encode --ckpt sd_xl_base_1.0.safetensors --images laion_images/ --out latents/  # cat.png + cat.txt
    torchrun --nproc_per_node=8 sdxl.py train --ckpt sd_xl_base_1.0.safetensors --latents latents/   # 8 rounds of 8 x 2
    torchrun --nproc_per_node=8 sdxl.py train ... --resume                                  # continue from --outdir
    torchrun --nproc_per_node=8 sdxl.py train ... --num_denoising_step 1 --generator_init \
        sdxl_lr1e-5_8node_ode_pretraining_10k_cond399_checkpoint_model_002000.bin   # DMD2's 1-step run (README)
    python sdxl.py generate --ckpt sd_xl_base_1.0.safetensors --unet out/sdxl/generator.safetensors --prompt "..."
    python sdxl.py export --unet out/sdxl/generator.safetensors --format diffusers --out unet_diffusers.safetensors
Tiny CPU mode (random tiny text encoders / VAE / UNet built from configs, no weights needed; seconds on a laptop):
    python sdxl.py encode --preset tiny --images my_images/ --out out/tiny_latents       # any images with .txt captions
    python sdxl.py train --preset tiny --latents out/tiny_latents              # 10 iterations, backward simulation
    python sdxl.py generate --preset tiny --unet out/sdxl_tiny/generator.safetensors --prompt "a cat" --out tiny.png
Latency and peak memory at 1024x1024, 4 steps, bf16 (CUDA); the second also times diffusers' StableDiffusionXLPipeline
on the same weights (needs the test requirements):
    python sdxl.py bench --ckpt sd_xl_base_1.0.safetensors --unet dmd2_sdxl_4step_unet_fp16.bin
    python tests/sdxl_diffusers.py --ckpt sd_xl_base_1.0.safetensors --unet dmd2_sdxl_4step_unet_fp16.bin
Inspect (CPU, a few seconds, most of it importing torch):
    python sdxl.py tokenize "a photo of a cat"               # CLIP BPE ids for both encoders
    python sdxl.py inspect sd_xl_base_1.0.safetensors        # tensor counts, dtypes and bytes per prefix
In Python (one GPU; ~1.7 GB of text encoders in fp16 + 0.33 GB of VAE in fp32):
    clip_l, clip_g, vae = load_sdxl_parts("sd_xl_base_1.0.safetensors", device="cuda", dtype=torch.float16)
    context, pooled = encode_prompt(clip_l, clip_g, ["a photo of a cat"])     # [1, 77, 2048], [1, 1280]
    y = vector_cond(pooled, (1024, 1024), (0, 0), (1024, 1024))               # [1, 2816]
    images = vae.decode(latents)                                              # [B, 3, 8h, 8w] in about [-1, 1]

Expected (the PAPER's figures, not measured by us): DMD2 4-step COCO-10k FID 19.32, 1-step 19.01, teacher (100 NFE,
CFG 8) 20.39.
"""
import argparse
import dataclasses
import functools
import glob
import gzip
import hashlib
import html
import inspect
import json
import math
import os
import re
import time
import types
import unicodedata
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

try:  # FSDP2; torch >= 2.6 exports it here, 2.4-2.5 only under _composable
    from torch.distributed.fsdp import fully_shard
except ImportError:
    from torch.distributed._composable.fsdp import fully_shard

import fid
import unet
from unet import SDXLUNet, SDXLUNetConfig, diffusers_to_sgm_unet, load_sdxl_unet_state, timestep_embedding
from unet import DTYPE_NAMES, read_safetensors, read_safetensors_header, write_safetensors  # unet.py section 8

# ----------------------------------------------------------------------------------------------------------------------
# Defaults: the official SDXL 4-step run (paper App. F.4; tianweiy/DMD2 experiments/sdxl/
# sdxl_cond999_8node_lr5e-7_denoising4step_diffusion1000_gan5e-3_guidance8_noinit_noode_backsim_scratch.sh).

@dataclass
class Config:
    preset: str = ""                      # "" = SDXL base 1.0 from --ckpt; "tiny" = random tiny models on CPU, seconds;
                                          # "random" = SDXL base's shapes, random weights (timing without a download)
    ckpt: str = ""                        # SDXL-format single file: teacher, G and fake-score init, text encoders, VAE
    prompts: str = ""                     # G's prompts, one per line; "" = a real-latent batch's captions (official)
    latents: str = ""                     # `sdxl.py encode` output: real latents + captions (GAN, G's prompts)
    outdir: str = "out/sdxl"              # checkpoint.pt, generator.safetensors, samples_*.png, log.txt
    seed: int = 0                         # all draws are a function of (seed, step, micro-batch): exact resume
    device: str = ""                      # "" = cuda:LOCAL_RANK if available, else cpu
    total_steps: int = 20_000             # iterations (paper F.4: 20k for 4 steps; the released UNet is from 19k)
    batch_size: int = 128                 # global batch, on any GPU count (official: 2 per GPU x 64 GPUs)
    batch_gpu: int = 2                    # micro-batch per process and accumulation round; 0 = batch_size / processes
    resolution: int = 1024                # image side in pixels; latents are resolution / 8
    num_denoising_step: int = 4           # generator steps: 4 -> t = 999, 749, 499, 249; 1 -> t = conditioning_timestep
    conditioning_timestep: int = 399      # t given to a 1-step generator on pure noise (DMD2's 1-step SDXL)
    guidance_scale: float = 8.0           # teacher CFG: eps_u + s (eps_c - eps_u) (official real_guidance_scale)
    dfake_gen_update_ratio: int = 5       # TTUR: fake-score updates per generator update (DMD2 Sec. 4.2)
    generator_lr: float = 5e-7            # AdamW learning rate of the generator
    fake_score_lr: float = 5e-7           # AdamW learning rate of the fake score + GAN head (official guidance_lr)
    beta1: float = 0.9                    # AdamW beta1
    beta2: float = 0.999                  # AdamW beta2
    weight_decay: float = 0.01            # AdamW weight decay
    warmup_steps: int = 500               # linear lr warm-up over 500 scheduler steps, counted as official (next flag)
    warmup_processes: int = 64            # official: accelerate counts 1 step per process: 64 GPUs -> ~8 iterations
    max_grad_norm: float = 10.0           # gradient clipping of both networks
    min_step_percent: float = 0.02        # DM gradient: t from 0.02 * 1000 = 20 ...
    max_step_percent: float = 0.98        # ... to 0.98 * 1000 = 980 (inclusive)
    gen_gan_weight: float = 5e-3          # GAN weight in the generator loss (official gen_cls_loss_weight)
    fake_gan_weight: float = 1e-2         # discriminator weight (official guidance_cls_loss_weight)
    backward_simulation: bool = True      # off: Table 4 ablation, G's input = a noised real latent
    gan_only: bool = False                # Table 4 ablation: G minimises the GAN loss alone (gan_alone)
    lora_rank: int = 0                    # > 0: LoRA generator of this rank; fake score full (DMD2: 64, both lrs 5e-5)
    lora_alpha: float = 8.0               # LoRA update scale alpha / rank (official 8)
    lora_dropout: float = 0.0             # dropout on the LoRA layers' input (official 0)
    generator_init: str = ""              # a UNet file G starts from instead of --ckpt's (README: DMD2's 1-step run)
    precision: str = "bf16"               # bf16: bf16 teacher, autocast on trained passes (official); fp32
    no_grad_bf16: bool = False            # text encoders, chain, critic-step G pass in bf16 (official fp32)
    tf32: bool = True                     # allow TF32 matmuls/convs on Ampere+ (official does)
    checkpointing: bool = True            # activation checkpointing in the generator and the fake UNet
    log_every: int = 10                   # print losses every N iterations
    ckpt_every: int = 500                 # write generator + checkpoint every N iterations (0 = at the end)
    sample_every: int = 500               # 4-image PNG of fixed prompts and noise every N (0 = never)
    resume: bool = False                  # continue from outdir/checkpoint.pt


PRESETS = {
    "tiny": dict(outdir="out/sdxl_tiny", total_steps=10, resolution=128, batch_size=2, batch_gpu=0, generator_lr=1e-4,
                 fake_score_lr=1e-4, warmup_steps=0, precision="fp32", log_every=1, ckpt_every=5, sample_every=5),
}


# ----------------------------------------------------------------------------------------------------------------------
# Data. Real images for the GAN (DMD2 Sec. 4.3, App. F.4: LAION images as SDXL-VAE latents, each with its own
# caption): `sdxl.py encode` writes shards latents_00000.safetensors, ... holding "latents" [N, 4, R/8, R/8] (fp16)
# and the N captions as JSON in the metadata. Generator prompts: the captions of a batch of those latents (the
# official 4-step run), or a text file, one per line.

# A prompt or caption longer than this is refused: CLIP reads its first 77 tokens (a few hundred characters), and
# cleaning and tokenising an 80 MB line took 20 s and 0.7 GB each time a batch drew it.
MAX_CAPTION_CHARS = 2 ** 14


def caption_problem(text):
    """Why a prompt or caption cannot be used, or None: too long, or not encodable as UTF-8 (a lone surrogate)."""
    if len(text) > MAX_CAPTION_CHARS:
        return f"{len(text)} characters, more than {MAX_CAPTION_CHARS} (CLIP reads its first 77 tokens)"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"not encodable as UTF-8 ({e.reason} at character {e.start})"
    return None


def read_prompts(path):
    try:
        with open(unet.check_regular_file(path), encoding="utf-8-sig") as f:   # -sig: a byte-order mark is not text
            prompts = []
            for number, line in enumerate(f, 1):
                prompt = line.strip()
                problem = caption_problem(prompt) if prompt else None
                if problem:
                    raise ValueError(f"{path}: line {number}: {problem}")
                if prompt:
                    prompts.append(prompt)
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read the prompts ({e})") from None
    if not prompts:
        raise ValueError(f"{path}: no prompts (expected one per line)")
    return prompts


class LatentDataset:
    """The shards written by encode_folder, memory-mapped.
    sample(n, g) -> (latents [n, 4, R/8, R/8] float32, n captions)"""

    def __init__(self, folder, resolution):
        paths = sorted(glob.glob(os.path.join(glob.escape(folder), "latents_*.safetensors")))
        if not paths:
            raise ValueError(f"{folder}: no latents_*.safetensors shards (write them with `python sdxl.py encode`)")
        side, self.shards, self.captions, self.rows, self.paths = resolution // 8, [], [], [], paths
        for path in paths:
            latents, metadata = read_safetensors(path).get("latents"), read_safetensors_header(path)[1]
            if latents is None or latents.ndim != 4 or tuple(latents.shape[1:]) != (4, side, side):
                got = "no tensor 'latents'" if latents is None else f"'latents' {list(latents.shape)}"
                raise ValueError(f"{path}: expected 'latents' [N, 4, {side}, {side}] for --resolution {resolution}, "
                                 f"found {got}")
            try:
                captions = json.loads(metadata.get("captions", "null"))
            except (ValueError, RecursionError):
                captions = None
            if not (isinstance(captions, list) and len(captions) == len(latents)
                    and all(isinstance(c, str) for c in captions)):
                raise ValueError(f"{path}: metadata 'captions' must be a JSON list of {len(latents)} strings")
            for i, problem in enumerate(map(caption_problem, captions)):   # else it would fail when a batch drew it
                if problem:
                    raise ValueError(f"{path}: caption {i}: {problem}")
            if latents.dtype not in (torch.float16, torch.bfloat16, torch.float32):   # encode writes float16
                raise ValueError(f"{path}: 'latents' are {str(latents.dtype).removeprefix('torch.')}, not float16, "
                                 "bfloat16 or float32")
            self.rows += [(len(self.shards), i) for i in range(len(latents))]
            self.shards.append(latents)
            self.captions += captions
        if not self.rows:
            raise ValueError(f"{folder}: its shards hold no latents")

    def sample(self, n, g):
        """n latents drawn uniformly with replacement: a pure function of g, so resuming needs no loader position.
        A drawn latent that holds NaN or inf raises ValueError naming its shard."""
        idx = torch.randint(len(self.rows), (n,), generator=g, device=g.device).tolist()
        rows = [self.rows[j] for j in idx]
        latents = torch.stack([self.shards[s][i] for s, i in rows]).float()             # [n, 4, h, w], on the CPU
        finite = torch.isfinite(latents).flatten(1).all(1).tolist()
        if not all(finite):                           # name the shard: a NaN loss later would name none
            s, i = rows[finite.index(False)]
            raise ValueError(f"{self.paths[s]}: latent {i} holds NaN or infinite values")
        return latents.to(g.device), [self.captions[j] for j in idx]


@torch.no_grad()
def encode_condition(clip_l, clip_g, prompts, height, width):
    """prompts -> context [B, 77, 2048], y [B, 2816] in float32, with the text-to-image micro-conditioning DMD2 uses:
    original size = target size = (height, width), crop (0, 0)."""
    context, pooled = encode_prompt(clip_l, clip_g, prompts)
    return context.float(), vector_cond(pooled.float(), (height, width), (0, 0), (height, width))


# ----------------------------------------------------------------------------------------------------------------------
# Models. Teacher, generator and fake score are SDXL UNets (unet.SDXLUNet, sgm names) predicting eps on SDXL's
# discrete DDPM schedule, t = 0..999 (sdxl.md §7):  x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps.
# teacher: frozen base UNet, with classifier-free guidance (official real_unet). generator: the student, initialised
# from the base (official feedforward_model). fake score: a trained copy of the base (official fake_unet) with the
# GAN head on its middle block (official cls_pred_branch), one module (official guidance_model minus the teacher).

NUM_TRAIN_TIMESTEPS = 1000


def ddpm_alphas_cumprod(beta_start=0.00085, beta_end=0.012, n=NUM_TRAIN_TIMESTEPS):
    """SDXL's "scaled linear" betas (sgm LegacyDDPMDiscretization, diffusers scaled_linear), float64 [n]:
    beta_t = (sqrt(0.00085) + t/999 (sqrt(0.012) - sqrt(0.00085)))^2,  alpha_bar_t = prod_{i<=t} (1 - beta_i)."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, n, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


def alpha_bar(alphas_cumprod, t):
    """alpha_bar_t for an int or a [B] tensor of t, shaped [B or 1, 1, 1, 1] to broadcast over latents."""
    return alphas_cumprod[torch.as_tensor(t, device=alphas_cumprod.device)].reshape(-1, 1, 1, 1)


def add_noise(x0, noise, t, alphas_cumprod):
    """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise, in float32 as diffusers' scheduler.add_noise."""
    ab = alpha_bar(alphas_cumprod, t).float()
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def x0_from_eps(x_t, eps, t, alphas_cumprod):
    """x0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t), in float64 as DMD2's get_x0_from_noise
    (1/sqrt(alpha_bar_999) = 14.6 amplifies rounding). -> float32, differentiable in eps."""
    ab = alpha_bar(alphas_cumprod, t)
    return ((x_t.double() - (1 - ab).sqrt() * eps.double()) / ab.sqrt()).float()


def randn(shape, g, device):
    """N(0, I) drawn by generator g on its own device, then moved: a CPU generator gives the same numbers anywhere."""
    return torch.randn(shape, generator=g, device=g.device).to(device)


def unet_fn(net):
    """eps_fn(x, t, context, y) that runs net in its own dtype (bf16/fp16 weights need bf16/fp16 inputs) -> float32."""
    dtype = next(net.parameters()).dtype
    return lambda x, t, context, y: net(x.to(dtype), t, context.to(dtype), y.to(dtype)).float()


def cfg_eps(eps_fn, x_t, t, context, y, guidance_scale):
    """Classifier-free guidance (Ho & Salimans 2022): eps = eps_u + s (eps_c - eps_u), one batched call on
    [uncond, cond]. SDXL's unconditional input is ZERO text context and ZERO pooled text embedding, with the size
    embeddings kept (sgm force_uc_zero_embeddings=["txt"]; DMD2 sd_unified_model.py)."""
    t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(len(x_t))                        # [B]
    y_u = torch.cat([torch.zeros_like(y[:, :-SIZE_COND_DIM]), y[:, -SIZE_COND_DIM:]], dim=1)     # [B, 2816]
    eps_u, eps_c = eps_fn(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([torch.zeros_like(context), context]),
                          torch.cat([y_u, y])).chunk(2)
    return eps_u + guidance_scale * (eps_c - eps_u)


def dmd2_timesteps(steps, conditioning_timestep=399):
    """The generator's t: range(999, 0, -1000 // steps), i.e. [999, 749, 499, 249] for 4 steps (DMD2's
    denoising_step_list); a 1-step generator is told conditioning_timestep (399) on pure noise."""
    if not 1 <= steps <= NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"the generator's steps must be 1 to {NUM_TRAIN_TIMESTEPS}, got {steps}")
    if steps == 1 and not 0 <= conditioning_timestep < NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"conditioning_timestep must be a timestep 0 to {NUM_TRAIN_TIMESTEPS - 1}, "
                         f"got {conditioning_timestep}")
    if steps == 1:
        return [conditioning_timestep]
    return list(range(NUM_TRAIN_TIMESTEPS - 1, 0, -(NUM_TRAIN_TIMESTEPS // steps)))[:steps]


def gan_head(channels, resolution):
    """cls_pred_branch (DMD2 Sec. 4.3, sd_guidance.py): on the fake UNet's middle-block output ([B, 1280, 32, 32] at
    1024^2), (conv 4x4/2, GroupNorm 32, SiLU) down to 4x4, then conv 4x4/4 + GroupNorm + SiLU to 1x1, then a 1x1 conv
    to one logit. Smaller maps (the tiny preset) skip stride-2 stages; Sequential indices match the official head."""
    if resolution < 4 or resolution & (resolution - 1):
        raise ValueError(f"the GAN head needs a square middle block of 4 * 2^n pixels, got {resolution} "
                         f"(SDXL: --resolution 1024 -> 128 latent -> 32)")
    layers = []
    while resolution > 4:
        layers += [nn.Conv2d(channels, channels, 4, stride=2, padding=1), nn.GroupNorm(32, channels), nn.SiLU()]
        resolution //= 2
    layers += [nn.Conv2d(channels, channels, 4, stride=4), nn.GroupNorm(32, channels), nn.SiLU(),
               nn.Conv2d(channels, 1, 1)]
    return nn.Sequential(*layers)


class FakeScore(nn.Module):
    """What the fake-score turn trains (the official guidance_model minus its frozen teacher): the fake UNet
    (fake_unet) and the GAN head on its middle block (cls_pred_branch). One module for one AdamW and one FSDP root;
    FSDP gathers a root's parameters in its forward hook, so both uses go through forward()."""

    def __init__(self, fake_unet, cls_pred_branch):
        super().__init__()
        self.fake_unet, self.cls_pred_branch = fake_unet, cls_pred_branch

    def forward(self, x, t, context, y, classify=False):
        if not classify:
            return self.fake_unet(x, t, context, y)                          # eps_fake [B, 4, h, w]
        rep = self.fake_unet.mid_features(x, t, context, y)                 # [B, 1280, h/4, w/4], no decoder
        with torch.autocast(x.device.type, enabled=False):                  # the head runs in fp32, as official
            # logits [B, 1] (a new tensor, not a view: FSDP hooks it)
            return self.cls_pred_branch(rep.float()).sum(dim=[2, 3])


# ----------------------------------------------------------------------------------------------------------------------
# 1. Distribution matching gradient (DMD v1 Eq. 7-8, DMD2 Sec. 3; tianweiy/DMD2 main/sd_guidance.py).
# x0_real, x0_fake: the teacher's and the fake score's x0-predictions at x_t; p_real = x - x0_real,
# p_fake = x - x0_fake. g is this micro-batch's RNG.

def loss_distribution_matching(x, context, y, teacher, fake_score, alphas_cumprod, cfg, g):
    """1) The distribution-matching gradient (DMD v1 Eq. 7-8, DMD2 Sec. 3) as the official code computes it: noise
    the generator's x0 to t ~ UniformInt[20, 980], take the teacher's CFG prediction x0_real and the fake score's
    x0_fake there, grad = (p_real - p_fake) / mean|p_real| with p = x - x0 (NO alpha_t factor, dmd2.md §2.1).
    Gradient descent moves x along -grad, i.e. along x0_real - x0_fake: toward the teacher, away from the fake score.
    x [B, 4, h, w] float32 -> a scalar whose gradient w.r.t. x is grad / x.numel() (the "mean" reduction)."""
    lo, hi = int(cfg.min_step_percent * NUM_TRAIN_TIMESTEPS), int(cfg.max_step_percent * NUM_TRAIN_TIMESTEPS)
    hi = min(hi, NUM_TRAIN_TIMESTEPS - 1)                   # --max_step_percent 1: up to t = 999, as the official code
    with torch.no_grad():
        t = torch.randint(lo, hi + 1, (len(x),), generator=g, device=g.device).to(x.device)     # [B]
        x_t = add_noise(x, randn(x.shape, g, x.device), t, alphas_cumprod)
        eps_real = cfg_eps(teacher, x_t, t, context, y, cfg.guidance_scale).float()   # bf16 teacher under autocast
        with torch.autocast(x.device.type, enabled=False):                          # fake UNet in fp32, as official
            eps_fake = fake_score(x_t, t, context, y).float()
        x0_real = x0_from_eps(x_t, eps_real, t, alphas_cumprod)                                 # [B, 4, h, w]
        x0_fake = x0_from_eps(x_t, eps_fake, t, alphas_cumprod)
        p_real, p_fake = x - x0_real, x - x0_fake
        w = p_real.abs().mean(dim=[1, 2, 3], keepdim=True)                                      # per-sample normaliser
        grad = torch.nan_to_num((p_real - p_fake) / w)                              # = (x0_fake - x0_real) / w
    return 0.5 * F.mse_loss(x, (x - grad).detach())


# ----------------------------------------------------------------------------------------------------------------------
# 2. Fake score and the two time-scale update rule (DMD2 Sec. 4.2).

def loss_fake_score(fake_score, x, context, y, alphas_cumprod, g):
    """2) The fake score's denoising loss on the detached generator output (official compute_loss_fake):
    t ~ UniformInt[0, 999], plain eps-prediction MSE, conditional only. It runs every iteration while the generator
    steps every dfake_gen_update_ratio-th (TTUR, DMD2 Sec. 4.2), so x0_fake keeps up with the moving generator."""
    t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (len(x),), generator=g, device=g.device).to(x.device)  # [B]
    noise = randn(x.shape, g, x.device)
    eps_fake = fake_score(add_noise(x, noise, t, alphas_cumprod), t, context, y).float()
    return F.mse_loss(eps_fake, noise)


# ----------------------------------------------------------------------------------------------------------------------
# 3. GAN head (DMD2 Sec. 4.3): a diffusion GAN on the fake UNet's middle block (gan_head and FakeScore above).

def gan_logits(fake_score, x, context, y, alphas_cumprod, g):
    """3) The GAN classifier, a diffusion GAN (DMD2 Sec. 4.3): noise x to t ~ UniformInt[0, 999] and classify the fake
    UNet's middle block there. Non-saturating losses on these logits (Eq. 4 in softplus form): discriminator
    softplus(D(fake)) + softplus(-D(real)), generator softplus(-D(fake)). -> logits [B, 1]"""
    t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (len(x),), generator=g, device=g.device).to(x.device)  # [B]
    return fake_score(add_noise(x, randn(x.shape, g, x.device), t, alphas_cumprod), t, context, y, classify=True)


# ----------------------------------------------------------------------------------------------------------------------
# 4. Backward simulation (DMD2 Sec. 4.5; official sd_unified_model.py sample_backward, prepare_denoising_data).

def shared_step_index(n, seed, step, device):
    """k ~ UniformInt[0, n) for backward simulation: the first draw of global micro-batch 0's RNG, which every
    process computes alike (official sample_backward: drawn on rank 0 and broadcast). The whole global batch, over all
    processes and accumulation rounds, trains the same step, and every rank calls the sharded generator equally
    often."""
    return int(torch.randint(n, (1,), generator=unet.batch_generator(seed, step, 0, device), device=device))


@torch.no_grad()
def backward_simulation(eps_fn, shape, context, y, k, timesteps, alphas_cumprod, g):
    """4) Backward simulation (DMD2 Sec. 4.5; official sample_backward): the generator's input at step k is made the
    way inference makes it: its own first k steps from pure noise (sample_dmd2 on timesteps[:k]), the last x0
    re-noised to timesteps[k] with fresh noise. k = 0 is pure noise at t = 999 (the schedule is not zero-terminal-SNR,
    so noising a clean latent there would leak signal: sqrt(alpha_bar_999) = 0.068). The losses then act on the
    single-step x0 of step k only: no backpropagation through the chain. -> x_{t_k} [B, 4, h, w]"""
    noise = randn(shape, g, g.device)
    if k == 0:
        return noise
    x0 = sample_dmd2(eps_fn, noise, context, y, timesteps[:k], alphas_cumprod, g)
    return add_noise(x0, randn(shape, g, g.device), timesteps[k], alphas_cumprod)


@torch.no_grad()
def noised_real_latents(x_real, timesteps, alphas_cumprod, g):
    """Table 4's "w/o backward simulation" (official --denoising without --backward_simulation): each sample gets its
    own step k and the generator's input is a REAL latent noised to t_k, except at step 0, which is pure noise as at
    inference (t = 999 with 4 steps, as above; 399 for a 1-step generator): the train/inference mismatch backward
    simulation removes. -> x_t [B, 4, h, w], t [B]"""
    ks = torch.randint(len(timesteps), (len(x_real),), generator=g, device=g.device).to(x_real.device)
    t = torch.tensor(timesteps, device=x_real.device)[ks]                                    # [B]
    noise = randn(x_real.shape, g, x_real.device)
    x_t = add_noise(x_real, noise, t, alphas_cumprod)
    return torch.where((ks == 0).reshape(-1, 1, 1, 1), noise, x_t), t


# ----------------------------------------------------------------------------------------------------------------------
# The training loop (official train_sd.py train_one_step, SDXL 4-step with backward simulation). An iteration is a
# generator turn (with a gradient every dfake_gen_update_ratio-th iteration) and a fake-score turn, each over
# `rounds` micro-batches per process whose gradients add up to the global batch's (gradient accumulation).

@dataclass
class MicroBatch:
    g: torch.Generator      # this micro-batch's RNG: a pure function of (seed, step, global micro-batch index)
    context: torch.Tensor   # the generator prompts' text context [B, 77, 2048]
    y: torch.Tensor         # pooled text + size embeddings [B, 2816]
    x_t: torch.Tensor       # the generator's input [B, 4, h, w]
    t: torch.Tensor         # its timestep [B]


def draw_micro_batch(run, step, index, k):
    """Prompts and the generator's input of global micro-batch `index`. In the official 4-step run (--denoising) the
    generator is conditioned on the captions of a batch of real latents (dmd2.md §4.5); --prompts replaces them."""
    cfg, B = run.cfg, run.batch_gpu
    g = unet.batch_generator(cfg.seed, step, index, run.device)
    torch.randint(len(run.timesteps), (1,), generator=g, device=g.device)           # the k draw (micro-batch 0's is k)
    x_real, prompts = run.data.sample(B, g)                                           # [B, 4, h, w], B captions
    if run.prompts is not None:
        prompts = [run.prompts[i] for i in torch.randint(len(run.prompts), (B,), generator=g, device=g.device).tolist()]
    context, y = text_condition(run, prompts)
    with run.no_grad_amp():
        if cfg.backward_simulation:
            x_t = backward_simulation(run.generator, run.shape, context, y, k, run.timesteps, run.ab, g)
            t = torch.full((B,), run.timesteps[k], device=run.device)                 # one t for the whole batch
        else:
            x_t, t = noised_real_latents(x_real, run.timesteps, run.ab, g)
    return MicroBatch(g, context, y, x_t, t)


def text_condition(run, prompts):
    """Text encoders in fp32 as official (bf16 with --no_grad_bf16). -> context [B, 77, 2048], y [B, 2816] float32"""
    with run.no_grad_amp():
        return encode_condition(run.clip_l, run.clip_g, prompts, run.cfg.resolution, run.cfg.resolution)


def generator_turn(run, batches, train_generator):
    """The generator's x0 at t for every micro-batch; on generator iterations also minimise (DMD2 Sec. 3, 4.3)
    loss_dm + gen_gan_weight * loss_g_gan, with the fake score frozen so the GAN gradient reaches the generator only.
    The trained pass runs under autocast; the no-grad pass of the fake-score-only iterations in fp32, as official.
    -> ([x_fake [B, 4, h, w] detached per micro-batch], stats)"""
    cfg, fakes, stats = run.cfg, [], {}
    run.fake_score.requires_grad_(False)
    for mb in batches:
        with torch.set_grad_enabled(train_generator), run.amp() if train_generator else run.no_grad_amp():
            x_fake = x0_from_eps(mb.x_t, run.generator(mb.x_t, mb.t, mb.context, mb.y), mb.t, run.ab)   # float32
            if train_generator:
                loss_g_gan = F.softplus(-gan_logits(run.fake_score, x_fake, mb.context, mb.y, run.ab, mb.g)).mean()
                loss = cfg.gen_gan_weight * loss_g_gan
                add_stat(stats, "loss_g_gan", loss_g_gan, run.rounds)
                if not cfg.gan_only:
                    loss_dm = loss_distribution_matching(x_fake, mb.context, mb.y, run.teacher, run.fake_score, run.ab,
                                                         cfg, mb.g)
                    loss = loss + loss_dm
                    add_stat(stats, "loss_dm", loss_dm, run.rounds)
        if train_generator:
            (loss / run.rounds).backward()
        fakes.append(x_fake.detach())
    run.fake_score.requires_grad_(True)
    if train_generator:
        stats = optimiser_step(run, "generator", stats)
    return fakes, stats


def fake_score_turn(run, batches, fakes):
    """Every iteration (TTUR, DMD2 Sec. 4.2), on the generator's detached x0: the fake score's eps loss plus the
    discriminator loss on noised fake latents and noised real latents, each real one with its own caption. -> stats"""
    cfg, stats = run.cfg, {}
    for mb, x_fake in zip(batches, fakes):
        x_real, captions = run.data.sample(run.batch_gpu, mb.g)                           # [B, 4, h, w], B captions
        context_real, y_real = text_condition(run, captions)
        with run.amp():
            loss_fake = loss_fake_score(run.fake_score, x_fake, mb.context, mb.y, run.ab, mb.g)
            logits_fake = gan_logits(run.fake_score, x_fake, mb.context, mb.y, run.ab, mb.g)          # [B, 1]
            logits_real = gan_logits(run.fake_score, x_real, context_real, y_real, run.ab, mb.g)      # [B, 1]
            loss_d = (F.softplus(logits_fake) + F.softplus(-logits_real)).mean()
        ((loss_fake + cfg.fake_gan_weight * loss_d) / run.rounds).backward()
        add_stat(stats, "loss_fake", loss_fake, run.rounds)
        add_stat(stats, "loss_d", loss_d, run.rounds)
    return optimiser_step(run, "fake_score", stats)


def train(cfg):
    """DMD2 (Algorithm 1 with TTUR, the GAN head and backward simulation) on SDXL; see Config for every setting."""
    run = setup_training(cfg)
    history, t_log, step_log = [], time.time(), run.start_step
    for step in range(run.start_step, cfg.total_steps):
        t0, run.step = time.time(), step
        set_learning_rates(run, step)
        k = shared_step_index(len(run.timesteps), cfg.seed, step, run.device)             # this iteration's chain step
        batches = [draw_micro_batch(run, step, run.rank * run.rounds + r, k) for r in range(run.rounds)]
        fakes, stats = generator_turn(run, batches, train_generator=step % cfg.dfake_gen_update_ratio == 0)
        stats.update(fake_score_turn(run, batches, fakes))
        history.append(dict(step=step, k=k, seconds=time.time() - t0, **stats))
        done = step + 1
        if run.rank == 0 and (done % cfg.log_every == 0 or done == cfg.total_steps):
            log_line(run, done, k, stats, cfg.batch_size * (done - step_log) / (time.time() - t_log))
            t_log, step_log = time.time(), done
        if cfg.sample_every and done % cfg.sample_every == 0:
            save_samples(run, done)
        if (cfg.ckpt_every and done % cfg.ckpt_every == 0) or done == cfg.total_steps:
            save_training(run, done)
    if run.log is not None:
        run.log.close()
    return dict(generator=run.generator, fake_score=run.fake_score, history=history)


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation: prompts -> images with DMD2's few-step sampler (or the teacher's Euler + CFG), and a latency /
# memory benchmark. The benchmark's optional reference (diffusers' StableDiffusionXLPipeline + LCMScheduler, DMD2's
# README recipe) lives in tests/sdxl_diffusers.py: diffusers is a test-only reference, never imported here.

@torch.no_grad()
def generate(net, clip_l, clip_g, vae, prompts, height, width, seed=0, sampler="dmd2", steps=4, guidance_scale=8.0,
             conditioning_timestep=399, quantize="dmd2"):
    """prompts -> uint8 images [B, H, W, 3]. sampler "dmd2": DMD2's generator (steps 4 -> t = 999, 749, 499, 249;
    1 -> t = conditioning_timestep); "euler": the base model, Euler + CFG guidance_scale. The initial noise and every
    re-noise come from one CPU generator seeded with seed (as DMD2's demo): an image does not depend on the device."""
    factor = 8 * 2 ** (len(net.cfg.channel_mult) - 1)
    if height <= 0 or width <= 0 or height % factor or width % factor:
        raise ValueError(f"height and width must be multiples of {factor} (the VAE's 8 x the UNet's downsampling), "
                         f"got {height}x{width}")
    device = clip_l.embeddings.token_embedding.weight.device
    context, y = encode_condition(clip_l, clip_g, prompts, height, width)
    g = torch.Generator().manual_seed(seed)
    noise = randn((len(prompts), 4, height // 8, width // 8), g, device)               # [B, 4, h, w]
    ab = ddpm_alphas_cumprod().to(device)
    eps_fn = unet_fn(net)
    if sampler == "dmd2":
        x0 = sample_dmd2(eps_fn, noise, context, y, dmd2_timesteps(steps, conditioning_timestep), ab, g)
    elif sampler == "euler":
        x0 = sample_euler_cfg(eps_fn, noise, context, y, steps, guidance_scale, ab)
    else:
        raise ValueError(f"sampler must be 'dmd2' or 'euler', got {sampler!r}")
    with torch.autocast(device.type, enabled=False):                                   # one image at a time: the
        images = torch.cat([vae.decode(x0[i:i + 1]).float() for i in range(len(x0))])  # VAE's peak is at full size
    # quantize "dmd2" truncates as DMD2's COCO evaluator does (test_folder_sdxl.py); "edm" rounds (fid.to_uint8)
    return fid.to_uint8(images, quantize).permute(0, 2, 3, 1).cpu().numpy()


def sample_dmd2(eps_fn, noise, context, y, timesteps, alphas_cumprod, generator):
    """DMD2's few-step sampler (Sec. 4.4; demo/text_to_image_sdxl.py; = diffusers' LCMScheduler with these timesteps):
    x = pure noise at timesteps[0]; at each t predict x0, then re-noise it with FRESH noise to the next t.
    noise [B, 4, h, w] ~ N(0, I); eps_fn(x_t, t [B], context, y) -> eps. Returns the last x0 [B, 4, h, w]."""
    x = noise
    for i, t in enumerate(timesteps):
        # one t for the whole batch
        t_batch = torch.full((len(x),), t, device=x.device)
        x0 = x0_from_eps(x, eps_fn(x, t_batch, context, y), t_batch, alphas_cumprod)
        if i + 1 < len(timesteps):
            x = add_noise(x0, randn(x.shape, generator, x.device), timesteps[i + 1], alphas_cumprod)
    return x0


def sample_euler_cfg(eps_fn, noise, context, y, steps, guidance_scale, alphas_cumprod, spacing="trailing"):
    """The base model's sampler (the teacher): Euler steps of the probability-flow ODE dx/dsigma = eps in sigma-space,
    x_sigma = x_t / sqrt(alpha_bar_t), sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), with CFG at every step
    (Karras et al. 2022, Alg. 1 without churn; k-diffusion sample_euler; diffusers EulerDiscreteScheduler).
    spacing "trailing": t_i = round(1000 - i * 1000/steps) - 1, so it starts at 999 (DMD2's ODE pairs);
    "leading": t_i = i * (1000 // steps) + 1 in descending order (SDXL's diffusers default, steps_offset 1).
    noise [B, 4, h, w] ~ N(0, I) -> x0 [B, 4, h, w]."""
    if not 1 <= steps <= NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"the sampler's steps must be 1 to {NUM_TRAIN_TIMESTEPS}, got {steps}")
    if spacing == "trailing":
        ts = [round(NUM_TRAIN_TIMESTEPS - i * NUM_TRAIN_TIMESTEPS / steps) - 1 for i in range(steps)]
    elif spacing == "leading":
        ts = [i * (NUM_TRAIN_TIMESTEPS // steps) + 1 for i in reversed(range(steps))]
    else:
        raise ValueError(f"spacing must be 'trailing' or 'leading', got {spacing!r}")
    ab = alphas_cumprod[ts]
    sigmas = ((1 - ab) / ab).sqrt().tolist() + [0.0]
    # x_sigma = x_t / sqrt(alpha_bar) with x_t ~ N(0, I): std sqrt(1 + sigma^2) (sgm)
    x = noise * math.sqrt(1 + sigmas[0] ** 2)
    for i, t in enumerate(ts):
        # the UNet sees x_t (c_in)
        eps = cfg_eps(eps_fn, x / math.sqrt(1 + sigmas[i] ** 2), t, context, y, guidance_scale)
        x = x + (sigmas[i + 1] - sigmas[i]) * eps                                                  # Euler step, d = eps
    # at sigma = 0, x = x0
    return x


def bench_pipelines(net, clip_l, clip_g, vae, vae_cfg, prompt="a photo of a cat", height=1024, width=1024, steps=4,
                    seed=0, reps=5, reference=None):
    """Time prompt embeddings -> image ([1, 3, H, W] in [0, 1]: `steps` UNet calls of DMD2's sampler + VAE decode) for
    our code and, if `reference` is given, for the pipeline it builds, reference(net, vae, vae_cfg, device, dtype)
    -> a diffusers-style StableDiffusionXLPipeline (tests/sdxl_diffusers.py), on the same weights and initial noise.
    The text encoders run once (timed apart) and then leave the GPU, so both peaks count UNet + VAE + activations.
    -> {"text_encoders": seconds, "ours"/"diffusers": dict(median, min, peak_gib, weights_gib, image)}"""
    device = net.out[2].weight.device
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    timesteps, ab, dtype = dmd2_timesteps(steps), ddpm_alphas_cumprod().to(device), net.out[2].weight.dtype

    def measure(fn):
        fn()                                                       # warm-up (kernel selection, allocator)
        sync()
        weights = torch.cuda.memory_allocated(device) / 2 ** 30 if cuda else math.nan
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            image = fn()
            sync()
            times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if cuda else math.nan
        return dict(median=float(np.median(times)), min=min(times), peak_gib=peak, weights_gib=weights,
                    image=image.float().cpu())

    def noise_and_generator():
        g = torch.Generator().manual_seed(seed)
        return randn((1, 4, height // 8, width // 8), g, device), g

    with torch.no_grad():
        encode = lambda: encode_condition(clip_l, clip_g, [prompt], height, width)
        results = dict(text_encoders=measure(lambda: encode()[0])["median"])
        context, y = encode()
        clip_l.to("cpu"), clip_g.to("cpu")

        def ours():
            noise, g = noise_and_generator()
            x0 = sample_dmd2(unet_fn(net), noise, context, y, timesteps, ab, g)
            return (vae.decode(x0).float() / 2 + 0.5).clamp(0, 1)
        results["ours"] = measure(ours)
        if reference is not None:
            net.to("cpu"), vae.to("cpu")                              # leave the GPU to the reference's copies
            if cuda:
                torch.cuda.empty_cache()
            pipe = reference(net, vae, vae_cfg, device, dtype)

            def theirs():
                noise, g = noise_and_generator()
                return pipe(prompt_embeds=context.to(dtype), pooled_prompt_embeds=y[:, :-SIZE_COND_DIM].to(dtype),
                            guidance_scale=0.0, timesteps=timesteps, height=height, width=width,
                            latents=noise.to(dtype), generator=g, output_type="pt").images
            results["diffusers"] = measure(theirs)
    return results


# ----------------------------------------------------------------------------------------------------------------------
# Run plumbing: models on every process (FSDP2 when several), micro-batching, learning rates, optimiser steps that
# stop on NaN, checkpoints and samples. Process setup, per-step RNG and NaN stops are unet.py's (shared with
# imagenet64.py).

def fsdp_units(net):
    """The layers of an SDXLUNet that FSDP shards one by one: the ones its forward CALLS (ResBlocks, transformer blocks,
    SpatialTransformers, convs, up/downsamplers); FSDP2 gathers a unit's weights in a forward hook, and the blocks
    themselves are iterated over, never called."""
    for block in [*net.input_blocks, net.middle_block, *net.output_blocks]:
        for layer in block:
            yield from getattr(layer, "transformer_blocks", [])
            yield layer


def make_trainable(module, state, device, world):
    """module built on the meta device -> sharded with FSDP2 when world > 1 (each rank keeps 1/world of every weight,
    gradient and AdamW moment; a layer's full weights exist only while it runs) -> allocated on device -> state
    (a full, unsharded state dict, e.g. memory-mapped fp16 from the checkpoint) copied in."""
    if world > 1:
        for net in [m for m in module.modules() if isinstance(m, SDXLUNet)]:
            for layer in fsdp_units(net):
                fully_shard(layer)
        fully_shard(module)
    module.to_empty(device=device)
    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True))
    return module.train()


def micro_batching(cfg, world):
    """-> (batch_gpu, rounds), batch_gpu x world x rounds = batch_size: the official global batch on any GPU count."""
    batch_gpu = cfg.batch_gpu or cfg.batch_size // world
    rounds = cfg.batch_size // (batch_gpu * world) if batch_gpu > 0 else 0
    if rounds < 1 or rounds * batch_gpu * world != cfg.batch_size:
        raise ValueError(f"--batch_size {cfg.batch_size} is not --batch_gpu {cfg.batch_gpu} x {world} processes "
                         f"x a whole number of accumulation rounds")
    return batch_gpu, rounds


def autocast_bf16(device, enabled):
    """A fresh context each call: bf16 autocast, or autocast explicitly OFF (fp32 even inside an outer autocast)."""
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def check_config(cfg):
    """Refuse impossible options at start-up, each with its name and why, not hours into a run."""
    errors = unet.option_errors(
        cfg, at_least_one=("batch_size", "resolution", "dfake_gen_update_ratio", "log_every", "warmup_processes"),
        at_least_zero=("total_steps", "batch_gpu", "generator_lr", "fake_score_lr", "weight_decay", "warmup_steps",
                       "max_grad_norm", "gen_gan_weight", "fake_gan_weight", "guidance_scale", "ckpt_every",
                       "sample_every", "lora_rank"), below_one=("beta1", "beta2", "lora_dropout"))
    try:
        dmd2_timesteps(cfg.num_denoising_step, cfg.conditioning_timestep)
    except ValueError as e:
        errors.append(f"--num_denoising_step {cfg.num_denoising_step}, --conditioning_timestep "
                      f"{cfg.conditioning_timestep}: {e}")
    if cfg.lora_rank and cfg.lora_alpha <= 0:
        errors.append(f"--lora_alpha must be above 0 (the LoRA's update is scaled by alpha / rank), got {cfg.lora_alpha}")
    lora_flags = [f for f in ("lora_alpha", "lora_dropout") if getattr(cfg, f) != getattr(Config, f)]
    if lora_flags and not cfg.lora_rank:
        errors.append(f"--{' and --'.join(lora_flags)} only apply to a LoRA generator: add --lora_rank (DMD2's: 64)")
    if cfg.precision not in ("bf16", "fp32"):
        errors.append(f"--precision must be bf16 or fp32, got {cfg.precision!r}")
    if cfg.generator_init and cfg.lora_rank:
        errors.append("--generator_init with --lora_rank: a LoRA generator trains on --ckpt's UNet, which its file "
                      "is applied to")
    elif cfg.generator_init and not os.path.isfile(cfg.generator_init):
        errors.append(f"--generator_init {cfg.generator_init}: no such file")
    if not cfg.resume and os.path.exists(os.path.join(cfg.outdir, "checkpoint.pt")):
        errors.append(f"--outdir {cfg.outdir}: holds a run's checkpoint.pt; add --resume to continue it, or give "
                      "another folder (a new run would overwrite it)")
    if errors:
        raise ValueError("invalid options:\n  " + "\n  ".join(errors))


def setup_training(cfg):
    """Everything the loop reads, as one namespace: models, optimisers, data, schedule, precision, files."""
    check_config(cfg)
    rank, world, device = unet.init_distributed(cfg.device)
    batch_gpu, rounds = micro_batching(cfg, world)
    if cfg.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    bf16 = cfg.precision == "bf16"
    run = types.SimpleNamespace(cfg=cfg, rank=rank, world=world, device=device, batch_gpu=batch_gpu, rounds=rounds,
                                amp=autocast_bf16(device, bf16),
                                no_grad_amp=autocast_bf16(device, bf16 and cfg.no_grad_bf16),
                                ckpt_path=os.path.join(cfg.outdir, "checkpoint.pt"),
                                gen_path=os.path.join(cfg.outdir, "generator.safetensors"))
    if rank == 0:
        remove_stale_temporaries(cfg.outdir)
    build_models(run, frozen_dtype=torch.bfloat16 if bf16 else torch.float32,
                 text_dtype=torch.bfloat16 if bf16 and cfg.no_grad_bf16 else torch.float32)
    run.data = LatentDataset(cfg.latents, cfg.resolution)
    run.prompts = read_prompts(cfg.prompts) if cfg.prompts else None
    run.timesteps = dmd2_timesteps(cfg.num_denoising_step, cfg.conditioning_timestep)
    run.ab = ddpm_alphas_cumprod().to(device)                                        # alpha_bar_t, float64 [1000]
    run.shape = (batch_gpu, run.unet_cfg.in_channels, cfg.resolution // 8, cfg.resolution // 8)  # [B, 4, h, w]
    run.start_step = resume_training(run) if cfg.resume and os.path.exists(run.ckpt_path) else 0
    os.makedirs(cfg.outdir, exist_ok=True)
    run.log = unet.open_run_log(cfg.outdir, run.start_step) if rank == 0 else None
    return run


def build_models(run, frozen_dtype, text_dtype):
    """Frozen and replicated: text encoders, VAE (sample strips), teacher (official: bf16). Trained: generator and fake
    UNet, both the base UNet (fp32 master weights), and a new GAN head, seeded: every rank starts with the same one."""
    cfg = run.cfg
    parts = load_parts(cfg.preset, cfg.ckpt, run.device, text_dtype)
    run.clip_l, run.clip_g, run.vae, run.unet_cfg = parts["clip_l"], parts["clip_g"], parts["vae"], parts["unet_cfg"]
    state = parts["unet_state"]
    run.teacher = build_unet(state, run.unet_cfg, run.device, frozen_dtype, parts["source"])
    channels = run.unet_cfg.model_channels * run.unet_cfg.channel_mult[-1]
    mid = cfg.resolution // 8 // 2 ** (len(run.unet_cfg.channel_mult) - 1)
    torch.manual_seed(cfg.seed)
    head = gan_head(channels, mid)
    with torch.device("meta"):
        generator = SDXLUNet(run.unet_cfg, checkpointing=cfg.checkpointing)
        fake_score = FakeScore(SDXLUNet(run.unet_cfg, checkpointing=cfg.checkpointing), gan_head(channels, mid))
    generator_state = state
    # DMD2's 1-step run starts G from an ODE-regression pretraining (dmd2.md §7); a resumed run takes the checkpoint's
    resuming = cfg.resume and os.path.exists(run.ckpt_path)
    if cfg.generator_init and not resuming:
        generator_state = load_unet_state(cfg.generator_init, run.unet_cfg)
        check_state(generator, generator_state, cfg.generator_init, "--generator_init UNet")
        # the teacher's own UNet is checked in build_unet; a NaN here stopped the run at step 0 naming no file
        check_finite_tensors(check_float_tensors(generator_state, cfg.generator_init, "--generator_init UNet"),
                             cfg.generator_init, "--generator_init UNet")
    if cfg.lora_rank:  # DMD2's LoRA generator (README model zoo): the base stays frozen, the low-rank updates train
        unet.add_lora(generator, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)
        generator_state = {**state, **unet.lora_init_state(generator, cfg.seed)}
    run.generator = make_trainable(generator, generator_state, run.device, run.world)
    run.fake_score = make_trainable(fake_score, {**{"fake_unet." + k: v for k, v in state.items()},
                                                 **{"cls_pred_branch." + k: v for k, v in head.state_dict().items()}},
                                    run.device, run.world)
    adamw = dict(betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    trained = [p for p in run.generator.parameters() if p.requires_grad]           # all, or the LoRA weights only
    run.opt = dict(generator=torch.optim.AdamW(trained, lr=cfg.generator_lr, **adamw),
                   fake_score=torch.optim.AdamW(run.fake_score.parameters(), lr=cfg.fake_score_lr, **adamw))


def set_learning_rates(run, step):
    """diffusers' constant_with_warmup, stepped as accelerate steps it: warmup_processes scheduler steps per iteration
    (official 64 GPUs: lr x min(1, 64 step / 500), full after 8 iterations), the same on any number of GPUs here."""
    cfg = run.cfg
    scale = min(1.0, step * cfg.warmup_processes / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    run.opt["generator"].param_groups[0]["lr"] = cfg.generator_lr * scale
    run.opt["fake_score"].param_groups[0]["lr"] = cfg.fake_score_lr * scale


def add_stat(stats, name, value, rounds):
    stats[name] = stats.get(name, 0) + value.detach().float() / rounds


def optimiser_step(run, name, stats):
    """Clip, stop every rank on a non-finite loss BEFORE the step and on non-finite weights AFTER it (a corrupted
    optimiser state turns finite gradients into NaN weights), so no save ever sees them. -> stats averaged over ranks"""
    module, opt = getattr(run, name), run.opt[name]
    norm = torch.nn.utils.clip_grad_norm_(module.parameters(), run.cfg.max_grad_norm)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm            # FSDP2 returns a DTensor
    stats["grad_norm_" + ("g" if name == "generator" else "d")] = norm
    stats = unet.check_finite(stats, run.step, run.world, run.ckpt_path)
    opt.step()
    opt.zero_grad(set_to_none=True)
    unet.check_finite_weights({name: module}, run.step, run.world, run.ckpt_path)
    return stats


CHECKPOINT_KEYS = ("step", "cfg", "generator", "fake_score", "opt_g", "opt_d")


def load_training_checkpoint(path):
    """checkpoint.pt, memory-mapped (every rank reads it without a private copy of tens of GB; unet.load_checkpoint
    reads it whole), weights_only: nothing is executed. Checked to be this script's training checkpoint."""
    try:
        unet.check_torch_file(path)                  # no zip bomb, no pickle that is unsafe to unpickle
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot read the training checkpoint ({type(e).__name__}: {e})") from None
    ckpt = unet.check_dense_tensors(ckpt, path, os.path.getsize(path))
    return unet.require_keys(ckpt, CHECKPOINT_KEYS, path, "an sdxl.py training checkpoint")


def resume_training(run):
    """Weights and AdamW moments from checkpoint.pt (RNG needs no state: it is a function of the step). A generator
    file left behind by a kill is rewritten to match. -> the step to continue from"""
    ckpt, full = load_training_checkpoint(run.ckpt_path), StateDictOptions(full_state_dict=True)
    lora = StateDictOptions(full_state_dict=True, strict=False)                   # LoRA runs store the LoRA only
    unet.check_step(ckpt["step"], run.ckpt_path)
    unet.check_plain_dict(ckpt["cfg"], run.ckpt_path, "its cfg")
    for part in ("generator", "fake_score", "opt_g", "opt_d"):
        if not isinstance(ckpt[part], dict):
            raise ValueError(f"{run.ckpt_path}: its {part} is {unet.describe_value(ckpt[part])}, not a state dict")
    saved_rank = ckpt["cfg"].get("lora_rank", 0)
    if type(saved_rank) is not int:
        raise ValueError(f"{run.ckpt_path}: its cfg's lora_rank is {unet.describe_value(saved_rank)}, not an integer")
    if saved_rank != run.cfg.lora_rank:     # one line, not a size mismatch for each of its LoRA tensors
        raise ValueError(f"{run.ckpt_path}: its run had --lora_rank {saved_rank}, this one has {run.cfg.lora_rank}; "
                         f"resume with --lora_rank {saved_rank}")
    try:
        check_generator_keys(run, ckpt["generator"])
        set_model_state_dict(run.generator, ckpt["generator"], options=lora if run.cfg.lora_rank else full)
        set_model_state_dict(run.fake_score, ckpt["fake_score"], options=full)
        set_optimizer_state_dict(run.generator, run.opt["generator"], ckpt["opt_g"], options=full)
        set_optimizer_state_dict(run.fake_score, run.opt["fake_score"], ckpt["opt_d"], options=full)
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError, IndexError) as e:
        message = f"{type(e).__name__}: {str(e)[:600]}"
        raise ValueError(f"{run.ckpt_path}: does not fit this run's models ({message})") from None
    unet.check_adamw_state(run.opt["generator"], run.ckpt_path, "the generator's optimiser state")
    unet.check_adamw_state(run.opt["fake_score"], run.ckpt_path, "the fake score's optimiser state")
    step, cfg = ckpt["step"], run.cfg
    if run.rank == 0 and generator_file_step(run.gen_path) != step:
        write_generator(run.gen_path, ckpt["generator"], step, cfg, run.unet_cfg)
    changed = {k: (v, getattr(cfg, k)) for k, v in ckpt["cfg"].items()
               if getattr(cfg, k, v) != v and k not in ("resume", "total_steps")}
    if run.rank == 0:
        print(f"resumed from {run.ckpt_path} at step {step}" + (f"; changed settings: {changed}" if changed else ""))
    return step


def generator_file_step(path):
    """The step stored in generator.safetensors' metadata, or None (no file, unreadable, no step)."""
    try:
        return int(read_safetensors_header(path)[1].get("step"))
    except (OSError, ValueError, TypeError):
        return None


def check_generator_keys(run, state):
    """A LoRA run's checkpoint holds exactly the generator's LoRA weights (the base is --ckpt's); a full run's, all."""
    names = set(run.generator.state_dict())
    wanted = {k for k in names if unet.is_lora_key(k)} if run.cfg.lora_rank else names
    if set(state) != wanted:
        raise ValueError(f"generator weights: {len(set(state) - wanted)} unexpected, {len(wanted - set(state))} "
                         f"missing: a checkpoint of another UNet layout?")


def write_generator(path, state, step, cfg=None, unet_cfg=None):
    """generator.safetensors in fp16: the whole UNet, or for a LoRA run its LoRA weights with rank, alpha and the UNet
    layout in the metadata (diffusers' 'lora_adapter_metadata' key, so that --lora and diffusers-style readers work)."""
    metadata = {"step": str(step), "format": "SDXL UNet, sgm names without model.diffusion_model."}
    if cfg is not None and cfg.lora_rank:
        metadata.update(format="LoRA of the SDXL UNet, sgm module names", unet_config=json.dumps(
            dataclasses.asdict(unet_cfg)), lora_adapter_metadata=json.dumps(
            {"unet.r": cfg.lora_rank, "unet.lora_alpha": cfg.lora_alpha}))
    write_safetensors(path, {k: v.half() for k, v in state.items()}, metadata)


def save_training(run, step):
    """Every rank gathers its shards; rank 0 writes generator.safetensors FIRST, then checkpoint.pt (both atomic):
    a kill between the two leaves the generator ahead of the checkpoint, which the resumed run rewrites, never a
    finished checkpoint beside a stale generator."""
    modules = {"generator": run.generator, "fake_score": run.fake_score}
    unet.check_finite_weights(modules, step, run.world, run.ckpt_path)
    gathered = StateDictOptions(full_state_dict=True, cpu_offload=True)
    generator = get_model_state_dict(run.generator, options=gathered)
    if run.cfg.lora_rank:                                                        # LoRA-only checkpoints
        generator = {k: v for k, v in generator.items() if unet.is_lora_key(k)}
    state = dict(generator=generator,
                 fake_score=get_model_state_dict(run.fake_score, options=gathered),
                 opt_g=get_optimizer_state_dict(run.generator, run.opt["generator"], options=gathered),
                 opt_d=get_optimizer_state_dict(run.fake_score, run.opt["fake_score"], options=gathered))
    if run.rank == 0:
        write_generator(run.gen_path, state["generator"], step, run.cfg, run.unet_cfg)
        unet.save_checkpoint(dict(step=step, cfg=dataclasses.asdict(run.cfg), **state), run.ckpt_path)


def remove_stale_temporaries(outdir):
    """Temporaries a killed run left beside its own files (tens of GB each at full size): unet.save_checkpoint's
    checkpoint.pt.<random>.tmp, unet.open_run_log's log.txt.<random>.tmp and write_safetensors'
    generator.safetensors.tmp<pid>. Nothing else is touched."""
    removed = unet.remove_stale_temporaries(outdir, ["checkpoint.pt", "generator.safetensors", "log.txt"])
    for path in glob.glob(os.path.join(glob.escape(outdir), "generator.safetensors.tmp*")):
        if re.fullmatch(r"generator\.safetensors\.tmp\d+", os.path.basename(path)) and os.path.isfile(path):
            os.remove(path)
            removed.append(path)
    return removed


def log_line(run, done, k, stats, images_per_second):
    line = "  ".join([f"step {done:7d}", f"k {k}"] + [f"{name} {v:.4g}" for name, v in stats.items()] +
                     [f"{images_per_second:.2f} img/s"])
    print(line, flush=True)
    run.log.write(line + "\n")
    run.log.flush()


def save_samples(run, done):
    """Every rank runs the (sharded) generator on 4 fixed prompts and noise; rank 0 writes them side by side."""
    prompts = (run.prompts or run.data.captions)[:4]
    with run.amp():
        images = generate(run.generator, run.clip_l, run.clip_g, run.vae, prompts, run.cfg.resolution,
                          run.cfg.resolution, seed=1, steps=run.cfg.num_denoising_step,
                          conditioning_timestep=run.cfg.conditioning_timestep)
    if run.rank == 0:
        PIL.Image.fromarray(np.concatenate(list(images), axis=1)).save(
            os.path.join(run.cfg.outdir, f"samples_{done:07d}.png"))


# ----------------------------------------------------------------------------------------------------------------------
# Command line.

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def runtime(args):
    """-> device, UNet/text dtype (auto: bf16 on CUDA, fp32 on CPU), VAE dtype; TF32 on (as DMD2's demo)."""
    device = unet.check_device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return device, dtype, DTYPES[args.vae_dtype]


def load_for_inference(args):
    """(net, parts): the UNet of --unet (or the checkpoint's own) and the frozen text encoders and VAE."""
    device, dtype, vae_dtype = runtime(args)
    parts = load_parts(args.preset, args.ckpt, device, dtype, vae_dtype)
    state, cfg, source = parts["unet_state"], parts["unet_cfg"], parts["source"]
    if args.unet:                      # its own config, read from its shapes: it may differ from --ckpt's UNet
        state, source = load_unet_state(args.unet, cfg), args.unet
        cfg = unet.infer_sdxl_unet_config({k: v.shape for k, v in state.items()}, args.unet)
        check_parts_fit(parts, cfg, args.unet)
    net = build_unet(state, cfg, device, dtype, source)
    if args.lora:                      # merged into the weights: sampling costs what the plain UNet costs
        lora_state, metadata = read_lora(args.lora)
        factors = unet.lora_from_file_state(lora_state, cfg, args.lora, metadata)
        unet.merge_lora(net, factors, args.lora_scale, args.lora)
        print(f"merged {args.lora}: {len(factors)} LoRA modules at scale {args.lora_scale}")
    return net, parts


def read_lora(path):
    """(state dict, safetensors metadata) of a LoRA file: .safetensors (Kohya, diffusers, ours) or a torch file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such LoRA file")
    if path.endswith(".safetensors"):
        return read_safetensors(path), read_safetensors_header(path)[1]
    state = unet.load_checkpoint(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: a LoRA file holds a flat dict of tensors (for a LoRA run: its generator.safetensors,"
                         " not checkpoint.pt)")
    return state, {}


def lora_unet_config(metadata, path):
    """The UNet layout a LoRA run stored in its generator.safetensors (write_generator)."""
    try:
        fields = json.loads(metadata["unet_config"])
        if not isinstance(fields, dict):
            raise ValueError(f"unet_config is not a JSON object ({unet.describe_value(fields)})")
        cfg = SDXLUNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
        positive = [cfg.in_channels, cfg.out_channels, cfg.model_channels, cfg.num_res_blocks, cfg.num_head_channels,
                    cfg.context_dim, cfg.adm_in_channels, *cfg.channel_mult]
        # the layout comes from the file: a LoRA of any real UNet names far fewer blocks than these bounds allow
        if not (all(type(n) is int and n >= 1 for n in positive)
                and all(type(n) is int and n >= 0 for n in cfg.transformer_depth)
                and cfg.num_res_blocks <= 16 and sum(cfg.transformer_depth) <= 256 and len(cfg.channel_mult) <= 8):
            raise ValueError(f"implausible UNet layout {cfg}")
        return unet.check_sdxl_layout_size(cfg, "its unet_config")
    except (KeyError, TypeError, ValueError, RecursionError, ArithmeticError) as e:
        raise ValueError(f"{path}: no UNet layout in the metadata ({type(e).__name__}: {e}); --format kohya "
                         "exports the generator.safetensors of a `train --lora_rank` run") from None


def cmd_generate(args):
    if bool(args.prompt) == bool(args.prompts):
        raise ValueError("generate needs either --prompt (one image) or --prompts with --outdir (one per line)")
    if args.prompts and args.batch < 1:
        raise ValueError(f"--batch must be at least 1, got {args.batch}")
    if args.steps < 0 or args.height < 0 or args.width < 0:
        raise ValueError(f"--steps, --height and --width must be 0 (the default) or more, got {args.steps}, "
                         f"{args.height} and {args.width}")
    made = [] if args.prompt else fid.missing_folders(os.path.join(args.outdir, "00000.png"))
    if args.prompt:                             # the destination is checked before the models load, not after
        unet.check_writable(args.out, "--out")  # (its folder is made when the image is written)
    else:
        fid.check_folder(args.outdir)
    try:
        if args.prompts:
            check_image_folder(args)
        generate_images(args)
    except BaseException:                       # an error or Ctrl-C: no empty folders left behind
        fid.remove_empty_folders(made)
        raise


def sampling(args):
    """generate's (sampler, steps, height, width), "auto" and 0 resolved: DMD2's 4-step sampler for a distilled UNet
    (--unet, or a preset), else the base model's Euler with 30 steps; 1024 x 1024 (128 with --preset tiny)."""
    sampler = args.sampler if args.sampler != "auto" else ("dmd2" if args.unet or args.preset else "euler")
    side = 128 if args.preset == "tiny" else 1024
    return sampler, args.steps or (4 if sampler == "dmd2" else 30), args.height or side, args.width or side


def folder_settings(args):
    """What decides the images of `generate --prompts`, recorded in OUTDIR/generate.json: the prompts (their SHA-256),
    the models' files and every sampling option."""
    with open(unet.check_regular_file(args.prompts), "rb") as f:
        prompts = hashlib.sha256(f.read()).hexdigest()
    sampler, steps, height, width = sampling(args)
    return dict(prompts=prompts, ckpt=args.ckpt, unet=args.unet, lora=args.lora, lora_scale=args.lora_scale,
                preset=args.preset, sampler=sampler, steps=steps, guidance=args.guidance,
                conditioning_timestep=args.conditioning_timestep, seed=args.seed, batch=args.batch, height=height,
                width=width, quantize=args.quantize)


MAX_SETTINGS_BYTES = 2 ** 20     # generate.json holds a few settings and a hash of the prompts


def check_image_folder(args):
    """A stopped `generate --prompts` continues where it stopped, keeping the images it wrote: only with the same
    settings (generate.json). Images from other settings would be kept as if they were this run's, and eval would pair
    them with these prompts."""
    path = os.path.join(args.outdir, "generate.json")
    written = glob.glob(os.path.join(glob.escape(args.outdir), "[0-9][0-9][0-9][0-9][0-9].png"))
    try:
        with open(unet.check_regular_file(path), "rb") as f:
            raw = f.read(MAX_SETTINGS_BYTES + 1)
        if len(raw) > MAX_SETTINGS_BYTES:             # json.loads takes about 25x a file's size in memory
            raise ValueError(f"more than {MAX_SETTINGS_BYTES} bytes")
        before = json.loads(raw)
    except FileNotFoundError:
        before = None
    except (OSError, ValueError, RecursionError) as e:
        raise ValueError(f"{path}: cannot read it ({e}); remove it with the images, or give another --outdir") from None
    if before is not None and not isinstance(before, dict):
        raise ValueError(f"{path}: not the settings object generate writes ({unet.describe_value(before)}); remove it "
                         "with the images, or give another --outdir")
    if before is None and written:
        raise ValueError(f"--outdir {args.outdir}: holds images of another run (no generate.json); give an empty "
                         "folder, or remove them")
    now = folder_settings(args)
    if before is not None and before != now:
        differ = sorted(k for k in {**before, **now} if before.get(k) != now.get(k))
        raise ValueError(f"--outdir {args.outdir}: holds images made with other settings (different: "
                         f"{', '.join(differ)}); give an empty folder, or the same settings to continue that run")


def generate_images(args):
    """cmd_generate's work once the destination is checked: load the models, sample, write the image(s)."""
    net, parts = load_for_inference(args)
    if args.prompts:
        return generate_folder(args, net, parts)
    sampler, steps, height, width = sampling(args)
    image = generate(net, parts["clip_l"], parts["clip_g"], parts["vae"], [args.prompt], height, width, args.seed,
                     sampler, steps, args.guidance, args.conditioning_timestep, args.quantize)[0]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    PIL.Image.fromarray(image).save(args.out)
    print(f"wrote {args.out} ({image.shape[1]}x{image.shape[0]}, {sampler} sampler)")


def generate_folder(args, net, parts):
    """One image per line of --prompts, written as OUTDIR/00000.png, 00001.png, ... in the prompts' order (sdxl.py eval
    pairs them by sorted name). Batch i of --batch prompts draws its noise from seed + i (DMD2's COCO script seeds each
    batch with its index). Images already written are kept: a stopped run continues (check_image_folder)."""
    prompts = read_prompts(args.prompts)
    sampler, steps, height, width = sampling(args)
    os.makedirs(args.outdir, exist_ok=True)
    path = os.path.join(args.outdir, "generate.json")
    with open(path + ".tmp", "w") as f:
        json.dump(folder_settings(args), f, indent=1)
    os.replace(path + ".tmp", path)
    kept = 0
    for i in range(0, len(prompts), args.batch):
        names = [os.path.join(args.outdir, f"{j:05d}.png") for j in range(i, min(i + args.batch, len(prompts)))]
        if all(os.path.exists(n) for n in names):
            kept += len(names)
            continue
        images = generate(net, parts["clip_l"], parts["clip_g"], parts["vae"], prompts[i:i + args.batch], height,
                          width, args.seed + i // args.batch, sampler, steps, args.guidance, args.conditioning_timestep,
                          args.quantize)
        for name, image in zip(names, images):
            PIL.Image.fromarray(image).save(name[:-4] + ".tmp", format="PNG")   # not an image name: eval skips it
            os.replace(name[:-4] + ".tmp", name)                                   # a kill leaves no half-written PNG
    print(f"wrote {len(prompts) - kept} images to {args.outdir} ({sampler} sampler)"
          + (f"; kept the {kept} an earlier run had written" if kept else ""))


def cmd_encode(args):
    if args.batch < 1 or args.shard_size < 1:
        raise ValueError(f"need --batch >= 1 and --shard_size >= 1, got {args.batch} and {args.shard_size}")
    if args.resolution and (args.resolution < 64 or args.resolution & (args.resolution - 1)):
        raise ValueError(f"--resolution must be a power of 2 of at least 64, as train's GAN head needs (SDXL: 1024, "
                         f"--preset tiny: 128), got {args.resolution}")
    device, _, vae_dtype = runtime(args)
    if args.preset:
        vae = load_parts(args.preset, "", device, vae_dtype=vae_dtype)["vae"]
    elif args.ckpt:
        cfg = infer_configs(args.ckpt, ["vae"])["vae"]
        vae = load_part(lambda: AutoencoderKL(cfg), args.ckpt, PREFIX_VAE, "VAE", device, vae_dtype)
    else:
        raise ValueError("--ckpt is required: an SDXL-format single file such as sd_xl_base_1.0.safetensors "
                         "(or --preset tiny)")
    resolution = args.resolution or (128 if args.preset == "tiny" else 1024)
    n = encode_folder(vae, args.images, args.out, resolution, args.batch, args.shard_size, args.seed)
    print(f"wrote {n} latents [4, {resolution // 8}, {resolution // 8}] with captions to {args.out}")


def cmd_bench(args, reference=None):
    """reference: see bench_pipelines (tests/sdxl_diffusers.py passes diffusers' pipeline)."""
    if (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cpu") and args.preset != "tiny":
        raise ValueError("bench measures GPU latency and memory: it needs CUDA (or --preset tiny for a CPU smoke run)")
    net, parts = load_for_inference(args)
    side = 128 if args.preset == "tiny" else 1024
    H, W = args.height or side, args.width or side
    r = bench_pipelines(net, parts["clip_l"], parts["clip_g"], parts["vae"], parts["vae_cfg"], args.prompt, H, W,
                        args.steps, args.seed, args.reps, reference=reference)
    gpu = torch.cuda.get_device_name(net.out[2].weight.device) if net.out[2].weight.is_cuda else "CPU"
    print(f"bench: {H}x{W}, {args.steps} steps, batch 1, UNet {net.out[2].weight.dtype}, "
          f"VAE {next(parts['vae'].parameters()).dtype}, "
          f"{gpu}, torch {torch.__version__}; median of {args.reps} after a warm-up")
    print(f"  text encoders (ours, once per prompt)          {1000 * r['text_encoders']:9.1f} ms")
    for name in ("ours", "diffusers"):
        if name in r:
            m = r[name]
            print(f"  {name:9s} {args.steps} UNet steps + VAE decode   {1000 * m['median']:9.1f} ms  "
                  f"(min {1000 * m['min']:.1f})  "
                  f"peak {m['peak_gib']:.2f} GiB (weights {m['weights_gib']:.2f} GiB)")
    if "diffusers" in r:
        gap = (r['ours']['image'] - r['diffusers']['image']).abs().max()
        print(f"  max |ours - diffusers| over the [0, 1] image: {gap:.4f}")


def cmd_export(args):
    """Our generator (any file load_unet_state reads) -> one .safetensors in diffusers UNet2DConditionModel names, as
    DMD2's release: diffusers, ComfyUI and others load it. The config is read from the file's shapes. With --lora and
    --format kohya: a LoRA run's generator.safetensors -> the Kohya keys of DMD2's released LoRA."""
    unet.check_writable(args.out, "--out")      # before the weights are read and renamed, not after
    if args.lora or args.format == "kohya":
        return export_lora(args)
    if not args.unet:
        raise ValueError("export needs --unet (a generator) or --lora with --format kohya (a LoRA generator)")
    state = load_unet_state(args.unet)
    cfg = unet.infer_sdxl_unet_config({k: v.shape for k, v in state.items()}, args.unet)
    renamed = unet.sgm_to_diffusers_unet(state, cfg, args.unet)
    write_safetensors(args.out, {k: v.contiguous() for k, v in renamed.items()}, {"format": "pt"})
    print(f"wrote {args.out}: {len(renamed)} tensors in diffusers UNet2DConditionModel names ({cfg})")


def export_lora(args):
    if not (args.lora and args.format == "kohya"):
        raise ValueError("a LoRA is exported with --lora FILE --format kohya (DMD2's released LoRA format)")
    state, metadata = read_lora(args.lora)
    cfg = lora_unet_config(metadata, args.lora)
    factors = unet.lora_from_file_state(state, cfg, args.lora, metadata)
    kohya = unet.kohya_lora_state(factors, cfg, DTYPES[args.dtype], args.lora)
    write_safetensors(args.out, kohya, {"format": "pt"})
    alphas = sorted({a for _, _, a in factors.values()})
    print(f"wrote {args.out}: {len(factors)} LoRA modules in Kohya names (lora_unet_*), alpha {alphas}, {args.dtype}")


def cmd_eval(args):
    """DMD2's COCO metrics (Table 2) of a folder of generated images, paired in sorted file order with the prompts."""
    device = unet.check_device(args.device)
    prompts = read_prompts(args.prompts)
    # what would fail at the end is checked before hours of features: the destination, the CLIP file, the pairing
    if args.save_ref:
        unet.check_writable(args.save_ref, "--save_ref")      # save_stats makes its folder
    fid.check_open_clip_file(args.clip)
    count, _ = fid.image_batches(args.images, args.batch)
    if count != len(prompts):
        raise ValueError(f"{args.images}: {count} images but {len(prompts)} prompts in {args.prompts} (blank lines "
                         f"skipped); they are paired in order")
    # an .npz of reference statistics is read before any features too (fid.load_reference: D must be 2048)
    ref = fid.coco_reference(args.ref, None) if args.ref.endswith(".npz") else None
    detector = fid.load_inception(args.inception or None, device)
    if ref is None:
        ref = fid.coco_reference(args.ref, detector, args.batch, device)
    if args.save_ref:
        fid.save_stats(args.save_ref, **ref)
        print(f"wrote {args.save_ref}")
    fid_value, patch_fid = fid.coco_fids(args.images, ref, detector, args.batch, device, method=args.method)
    clip = fid.load_open_clip(args.clip, None, device, args.clip_heads)     # its shapes give the sizes
    tokens = fid.clip_score_tokens(tokenize(prompts, pad_with="zero"), encode_text(fid.CLIP_PREFIX)[:3])
    score = fid.clip_score(args.images, tokens, clip, args.batch, device)
    print(f"FID {fid_value:.3f}  patch-FID {patch_fid:.3f}  CLIP score {score:.4f}  ({len(prompts)} images)")


def cmd_tokenize(args):
    for name, pad in (("CLIP-L", "end"), ("bigG", "zero")):
        ids = tokenize(args.prompt, pad)[0].tolist()
        n = ids.index(EOT) + 1  # SOT, the prompt's tokens, EOT
        padding = ids[-1] if n < 77 else "nothing"
        print(f"{name} ids ({n} of 77 used, padded with {padding}): {' '.join(map(str, ids[:n]))}")
    symbols = {i: s for s, i in load_clip_vocab()[0].items()}
    print("pieces:", " ".join(symbols[i] for i in ids[1:n - 1]))


def cmd_inspect(args):
    entries, metadata, data_start = read_safetensors_header(args.path)
    groups = {}
    for name, (dtype, shape, begin, end) in entries.items():
        prefix = next((p for p in (PREFIX_CLIP_L, PREFIX_CLIP_G, PREFIX_VAE, PREFIX_UNET) if name.startswith(p)),
                      name.split(".")[0])
        count, nbytes, numel, dtypes = groups.get(prefix, (0, 0, 0, set()))
        groups[prefix] = (count + 1, nbytes + end - begin, numel + math.prod(shape), dtypes | {DTYPE_NAMES[dtype]})
    print(f"{args.path}: {len(entries)} tensors, header {data_start - 8} bytes, {len(metadata)} metadata keys")
    for prefix, (count, nbytes, numel, dtypes) in sorted(groups.items()):
        print(f"  {prefix:50s} {count:5d} tensors {numel:>14,d} numbers {nbytes:>15,d} bytes  "
              f"{'/'.join(sorted(dtypes))}")
    for k, v in sorted(metadata.items()):
        print(f"  __metadata__ {k} = {v[:100]}")


def add_model_args(p):
    p.add_argument("--ckpt", default="", help="an SDXL-format single file (sd_xl_base_1.0.safetensors, smaller "
                   "SDXL-family files): text encoders, VAE, base UNet, configs read from its shapes")
    p.add_argument("--preset", default="", choices=["", "tiny", "random"],
                   help="tiny: random tiny models, no --ckpt (CPU); random: SDXL base's shapes, random weights")
    p.add_argument("--unet", default="", help="UNet weights replacing the base UNet: DMD2's "
                   "dmd2_sdxl_4step_unet_fp16.bin, our generator.safetensors / checkpoint.pt, any SDXL UNet")
    p.add_argument("--device", default="", help="'' = cuda if available, else cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="UNet and text encoders; auto = bf16 on CUDA, fp32 on CPU")
    p.add_argument("--vae_dtype", default="fp32", choices=["fp32", "bf16"], help="SDXL's VAE overflows in fp16")
    p.add_argument("--lora", default="", help="a LoRA merged into the UNet: Kohya (DMD2's "
                   "dmd2_sdxl_4step_lora_fp16.safetensors), diffusers/peft, or a LoRA run's generator.safetensors")
    p.add_argument("--lora_scale", type=float, default=1.0, help="W + scale * (alpha / rank) up @ down")
    p.add_argument("--height", type=int, default=0, help="0 = 1024 (128 with --preset tiny)")
    p.add_argument("--width", type=int, default=0, help="0 = 1024 (128 with --preset tiny)")


def add_generate_parser(sub, fmt):
    p = sub.add_parser("generate", formatter_class=fmt, help="prompt -> PNG, DMD2's sampler or the base's Euler + CFG")
    add_model_args(p)
    p.add_argument("--prompt", default="", help="text prompt")
    p.add_argument("--out", default="out/sdxl.png", help="PNG file to write")
    p.add_argument("--prompts", default="", help="instead of --prompt: a text file, one prompt per line "
                   "(blank lines are skipped: image i is the i-th non-blank line)")
    p.add_argument("--outdir", default="out/sdxl_images", help="with --prompts: folder for 00000.png, 00001.png, ...")
    p.add_argument("--batch", type=int, default=8, help="with --prompts: prompts per batch (noise seed: seed + batch)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise and the re-noising")
    p.add_argument("--sampler", default="auto", choices=["auto", "dmd2", "euler"],
                   help="auto: dmd2 with --unet or --preset, else euler")
    p.add_argument("--steps", type=int, default=0, help="0 = 4 for dmd2 (t = 999, 749, 499, 249), 30 for euler")
    p.add_argument("--guidance", type=float, default=8.0, help="CFG scale of the euler sampler (DMD2's teacher: 8)")
    p.add_argument("--conditioning_timestep", type=int, default=399, help="t of a 1-step DMD2 generator (--steps 1)")
    p.add_argument("--quantize", default="dmd2", choices=fid.QUANTIZE,
                   help="pixels to 8 bits: dmd2 truncates (DMD2's COCO evaluator), edm rounds")
    p.set_defaults(run=cmd_generate)


def add_encode_parser(sub, fmt):
    p = sub.add_parser("encode", formatter_class=fmt, help="images + captions -> latent shards (train --latents)")
    p.add_argument("--ckpt", default="", help="an SDXL-format single file (only its VAE is read)")
    p.add_argument("--preset", default="", choices=["", "tiny"], help="tiny: the random VAE of train --preset tiny")
    p.add_argument("--images", required=True, help="folder of images (.png/.jpg/.jpeg/.webp/.bmp), each with NAME.txt")
    p.add_argument("--out", required=True, help="empty folder for latents_00000.safetensors, ...")
    p.add_argument("--resolution", type=int, default=0, help="center crop side; 0 = 1024 (128 with --preset tiny)")
    p.add_argument("--batch", type=int, default=8, help="images per VAE call")
    p.add_argument("--shard_size", type=int, default=1000, help="images per shard file")
    p.add_argument("--seed", type=int, default=0, help="seed of the VAE posterior samples")
    p.add_argument("--device", default="", help="'' = cuda if available, else cpu")
    p.add_argument("--dtype", default="auto", help=argparse.SUPPRESS)
    p.add_argument("--vae_dtype", default="fp32", choices=["fp32", "bf16"], help="SDXL's VAE overflows in fp16")
    p.set_defaults(run=cmd_encode)


def add_train_parser(sub, fmt):
    """One flag per Config field, its end-of-line comment as the help."""
    p = sub.add_parser("train", formatter_class=fmt, help="DMD2 distillation (torchrun + FSDP on several GPUs)")
    comments = dict(re.findall(r"^    (\w+): .*?# (.*)$", inspect.getsource(Config), re.M))
    for f in dataclasses.fields(Config):
        if f.type in (bool, "bool"):
            p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=f.default,
                           help=comments[f.name])
        else:
            p.add_argument(f"--{f.name}", type=type(f.default), default=f.default, help=comments[f.name])
    p.set_defaults(run=lambda args: train(Config(**{f.name: getattr(args, f.name)
                                                    for f in dataclasses.fields(Config)})))
    return p


def add_other_parsers(sub, fmt):
    p = sub.add_parser("bench", formatter_class=fmt, help="4-step latency and peak memory (CUDA); "
                                                          "vs diffusers: tests/sdxl_diffusers.py")
    add_model_args(p)
    p.add_argument("--prompt", default="a photo of a cat", help="text prompt")
    p.add_argument("--steps", type=int, default=4, help="DMD2 sampler steps")
    p.add_argument("--seed", type=int, default=0, help="noise seed (the same for both pipelines)")
    p.add_argument("--reps", type=int, default=10, help="timed runs after one warm-up")
    p.set_defaults(run=cmd_bench)
    p = sub.add_parser("export", formatter_class=fmt, help="a trained generator -> diffusers UNet names (as DMD2's)")
    p.add_argument("--unet", default="", help="generator.safetensors, checkpoint.pt or any sgm-named SDXL UNet file")
    p.add_argument("--lora", default="", help="a LoRA run's generator.safetensors (with --format kohya)")
    p.add_argument("--format", default="diffusers", choices=["diffusers", "kohya"],
                   help="naming of the written file: diffusers (a UNet) or kohya (a LoRA, as DMD2's release)")
    p.add_argument("--dtype", default="fp16", choices=list(DTYPES), help="dtype of an exported LoRA (DMD2's: fp16)")
    p.add_argument("--out", required=True, help=".safetensors file to write")
    p.set_defaults(run=cmd_export)
    add_eval_parser(sub, fmt)
    p = sub.add_parser("tokenize", help="print CLIP BPE token ids of a prompt for both text encoders")
    p.add_argument("prompt", help="text to tokenize")
    p.set_defaults(run=cmd_tokenize)
    p = sub.add_parser("inspect", help="summarise a .safetensors file's header (tensors, dtypes, bytes per prefix)")
    p.add_argument("path", help="a .safetensors file, e.g. sd_xl_base_1.0.safetensors")
    p.set_defaults(run=cmd_inspect)


def add_eval_parser(sub, fmt):
    p = sub.add_parser("eval", formatter_class=fmt, help="FID, patch-FID and CLIP score as DMD2's COCO table "
                                                         "(README: the 10K COCO-2014 subset)")
    p.add_argument("--images", required=True, help="folder of generated images, one per prompt, in sorted file order")
    p.add_argument("--prompts", required=True, help="captions, one per line, in the images' order "
                   "(blank lines are skipped)")
    p.add_argument("--ref", required=True, help="folder of the real images, or an .npz written by --save_ref")
    p.add_argument("--save_ref", default="", help="write the reference statistics here (reuse them with --ref)")
    p.add_argument("--clip", required=True, help="open_clip checkpoint of ViT-g-14 laion2b_s12b_b42k "
                   "(open_clip_pytorch_model.bin or open_clip_model.safetensors)")
    p.add_argument("--clip_heads", type=int, nargs=2, default=[16, 16], metavar=("IMAGE", "TEXT"),
                   help="attention heads of the two towers (not stored in the file; ViT-g-14: 16 16)")
    p.add_argument("--inception", default="", help="FID Inception weights (fid.py; '' = fid.py's default path)")
    p.add_argument("--batch", type=int, default=64, help="images per network call")
    p.add_argument("--method", default="sqrtm", choices=["sqrtm", "eigh"], help="FID's matrix square root: scipy's "
                   "sqrtm as clean-fid, or the ~5x faster symmetric eigendecomposition (fid.frechet_distance)")
    p.add_argument("--device", default="", help="'' = cuda if available, else cpu")
    p.set_defaults(run=cmd_eval)


def build_parser():
    """-> (parser, its train subparser, whose defaults a --preset replaces)"""
    fmt = unet.HelpFormatter
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", required=True)
    add_generate_parser(sub, fmt)
    add_encode_parser(sub, fmt)
    train_parser = add_train_parser(sub, fmt)
    add_other_parsers(sub, fmt)
    return parser, train_parser


def main(argv=None):
    parser, train_parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train" and args.preset:
        if args.preset not in PRESETS:
            parser.error(f"unknown --preset {args.preset}; choose from {list(PRESETS)}")
        train_parser.set_defaults(**PRESETS[args.preset])  # explicit flags still win
        args = parser.parse_args(argv)
    try:
        args.run(args)
    # these name the file and the problem; a traceback adds nothing
    except (ValueError, OSError, unet.NonFiniteLoss) as e:
        parser.exit(1, f"error: {e}\n")
    except KeyboardInterrupt:
        ckpt = os.path.join(args.outdir, "checkpoint.pt") if args.command == "train" else None
        raise unet.interrupted("sdxl.py", ckpt) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ======================================================================================================================
# PART 2. SDXL in plain PyTorch, without diffusers (safetensors: unet.py section 8): the CLIP tokenizer, the two text encoders,
# the VAE and the loading of Stability's single-file checkpoints (the UNet is unet.py's section 5). Module names equal
# the checkpoint's keys, so loading needs no renaming table.
# ======================================================================================================================

HERE = os.path.dirname(os.path.abspath(__file__))
VOCAB_PATH = os.path.join(HERE, "bpe_simple_vocab_16e6.txt.gz")  # CLIP's BPE merges (MIT, from open_clip/openai CLIP)

# Prefixes of the three parts inside sd_xl_base_1.0.safetensors (587 + 248 + 1680 = 2515 tensors, all F16).
PREFIX_CLIP_L = "conditioner.embedders.0.transformer.text_model."  # CLIP ViT-L/14, Hugging Face names
PREFIX_CLIP_G = "conditioner.embedders.1.model."                    # OpenCLIP ViT-bigG/14, open_clip names
PREFIX_VAE = "first_stage_model."                                   # ldm/sgm AutoencoderKL names
PREFIX_UNET = "model.diffusion_model."                              # sgm UNet names (see unet.py)
UNUSED_KEYS = {PREFIX_CLIP_L + "embeddings.position_ids",           # the constant arange(77), stored as F16
               PREFIX_CLIP_G + "logit_scale"}                       # CLIP's contrastive temperature, unused by SDXL


# ----------------------------------------------------------------------------------------------------------------------
# CLIP BPE tokenizer (openai/CLIP simple_tokenizer.py, open_clip tokenizer.py), shared by both encoders; only the
# padding id differs.
# Pipeline: clean text -> split into pre-tokens -> UTF-8 bytes as printable characters -> byte-pair merges -> ids.

SOT, EOT = 49406, 49407                                  # <|startoftext|>, <|endoftext|>
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


# CLIP's vocabulary is 49,408 = 2*256 byte symbols + 48,894 merges + 2 specials
NUM_MERGES = 49152 - 256 - 2
MAX_VOCAB_LINE = 200         # characters per vocabulary line read (the real file's longest is 39)


def bytes_to_unicode():
    """byte -> printable character (GPT-2/CLIP): the 188 printable bytes map to themselves, the other 68 to chr(256+n),
    so BPE works on visible characters. Returned in vocabulary order (printable bytes first)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


BYTE_TO_CHAR = bytes_to_unicode()


@functools.lru_cache(maxsize=4)
def load_clip_vocab(path=VOCAB_PATH):
    """(vocab {symbol: id}, merge ranks {(left, right): rank}) from bpe_simple_vocab_16e6.txt.gz."""
    try:   # only the lines used, each at most MAX_VOCAB_LINE long: a small gzip can inflate to gigabytes
        with gzip.open(unet.check_regular_file(path), "rt", encoding="utf-8") as f:
            lines = [f.readline(MAX_VOCAB_LINE + 1) for _ in range(1 + NUM_MERGES)]
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as e:
        raise ValueError(f"{path}: cannot read the CLIP BPE vocabulary ({type(e).__name__}: {e})") from None
    if not all(line.endswith("\n") for line in lines):
        raise ValueError(f"{path}: expected a header and {NUM_MERGES} merge lines of at most {MAX_VOCAB_LINE} "
                         "characters (the file ends early or has a longer line)")
    merges = [tuple(line.split()) for line in lines[1:]]  # line 0 is a version header
    if any(len(m) != 2 for m in merges):
        raise ValueError(f"{path}: expected {NUM_MERGES} merge lines of two symbols after the header")
    base = list(BYTE_TO_CHAR.values())
    symbols = base + [s + "</w>" for s in base] + ["".join(m) for m in merges] + list(SPECIAL_TOKENS)
    return {s: i for i, s in enumerate(symbols)}, {m: i for i, m in enumerate(merges)}


def clean_text(text):
    """CLIP's clean-up without ftfy: unescape HTML twice, NFC-normalise, collapse whitespace, lowercase.

    ftfy.fix_text (upstream; not a dependency here) would also repair mojibake, uncurl quotes and fold some
    compatibility characters; Hugging Face's fast CLIP tokenizer (used by diffusers and DMD2) skips ftfy too. ASCII
    prompts are unaffected either way."""
    text = unicodedata.normalize("NFC", html.unescape(html.unescape(text)))
    return re.sub(r"\s+", " ", text).strip().lower()


def _char_class(ch):
    """'L' letter, 'N' number, ' ' whitespace, 'P' anything else (\\p{L}, \\p{N}, \\s of CLIP's pattern)."""
    if ch.isspace():
        return " "
    kind = unicodedata.category(ch)[0]
    return kind if kind in "LN" else "P"


# CLIP's pattern in the standard library's `re`: Unicode letters are [^\W\d_], decimal digits \d, the rest (underscore
# included) [^\w\s]. Exact unless the text holds a number that is not a decimal digit ("½", "²", "Ⅻ"), which `re`
# counts as a letter: such text goes through the character scanner below.
PRE_TOKEN = re.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\w\s]|_)+")


def pre_tokenize(text):
    """Split cleaned text like CLIP's pattern (which needs the third-party `regex` module for \\p{L}, \\p{N}):
        <|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|\\p{L}+|\\p{N}|[^\\s\\p{L}\\p{N}]+
    At each position: a special token or contraction if one starts here, else a maximal run of letters, ONE number
    character (so "2024" gives four pre-tokens), or a maximal run of other non-space characters; spaces separate."""
    if text.isascii() or not any(c.isnumeric() and not c.isdecimal() for c in set(text) if not c.isascii()):
        return PRE_TOKEN.findall(text)
    return scan_pre_tokens(text)


def scan_pre_tokens(text):
    """pre_tokenize one character at a time, with unicodedata's categories for \\p{L} and \\p{N}."""
    words, i = [], 0
    while i < len(text):
        literal = next((s for s in SPECIAL_TOKENS + CONTRACTIONS if text.startswith(s, i)), None)
        kind = _char_class(text[i])
        if literal:
            j = i + len(literal)
        elif kind == " ":
            i += 1
            continue
        else:
            j = i + 1
            while kind != "N" and j < len(text) and _char_class(text[j]) == kind:
                j += 1
        words.append(text[i:j])
        i = j
    return words


def bpe(word, ranks):
    """Byte-pair encode one pre-token given as byte characters: the last symbol carries the end-of-word mark </w>;
    repeatedly merge every occurrence (left to right) of the adjacent pair with the lowest rank until none is ranked."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        rank, pair = min((ranks.get(p, math.inf), p) for p in zip(parts, parts[1:]))
        if rank == math.inf:
            break
        merged, i = [], 0
        while i < len(parts):
            if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


@functools.lru_cache(maxsize=1 << 16)
def word_ids(word, vocab_path=VOCAB_PATH):
    """Token ids of one pre-token, cached: prompts repeat their words (tests/bench_sdxl.py's 1,000 prompts hold 43.6k
    words, 9.4k of them distinct), and merging a word again was most of the tokenizer's time. -> tuple of ids"""
    vocab, ranks = load_clip_vocab(vocab_path)
    if word in SPECIAL_TOKENS:
        return (vocab[word],)
    return tuple(vocab[p] for p in bpe("".join(BYTE_TO_CHAR[b] for b in word.encode("utf-8")[:MAX_WORD_BYTES]), ranks))


# A prompt keeps 75 tokens of at most 32 bytes each, so no more than a word's first 2,400 bytes can reach it, and BPE's
# time grows faster than a word's length (a 128 kB word took 99 s): words are cut at 2,560 bytes before BPE.
MAX_WORD_BYTES = 2560


def encode_text(text, vocab_path=VOCAB_PATH, max_ids=None):
    """Token ids of one string, without start/end tokens or padding; with max_ids, only the first max_ids (the words
    after them are not encoded)."""
    ids = []
    for word in pre_tokenize(clean_text(text)):
        ids.extend(word_ids(word[:MAX_WORD_BYTES], vocab_path))
        if max_ids is not None and len(ids) >= max_ids:
            return ids[:max_ids]
    return ids


def tokenize(texts, pad_with="end", context_length=77, vocab_path=VOCAB_PATH):
    """[SOT] + at most context_length-2 tokens + [EOT] + padding -> LongTensor [B, context_length].

    pad_with="end" pads with EOT 49407 (CLIP-L: Hugging Face's tokenizer, as sgm and DMD2 use it);
    pad_with="zero" pads with id 0, i.e. "!" (bigG: open_clip.tokenize). The padded positions are not masked in the
    UNet's cross-attention, so the difference reaches the image."""
    if pad_with not in ("end", "zero"):
        raise ValueError(f"pad_with must be 'end' (CLIP-L) or 'zero' (bigG), got {pad_with!r}")
    pad = EOT if pad_with == "end" else 0
    rows = []
    for text in [texts] if isinstance(texts, str) else texts:
        ids = [SOT] + encode_text(text, vocab_path, context_length - 2) + [EOT]  # long prompts keep their EOT
        rows.append(ids + [pad] * (context_length - len(ids)))
    return torch.tensor(rows, dtype=torch.long)


# ----------------------------------------------------------------------------------------------------------------------
# Text encoders (sgm FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder2): pre-LN causal transformers.
# CLIP-L keeps Hugging Face's names, bigG keeps open_clip's.

@dataclass
class TextConfig:
    width: int = 768          # hidden size; the MLP is 4x wider
    layers: int = 12          # transformer blocks
    heads: int = 12           # attention heads of width//heads channels
    act: str = "quick_gelu"   # "quick_gelu" x*sigmoid(1.702x) (CLIP-L) or "gelu", exact erf GELU (bigG)
    embed_dim: int = 0        # text_projection output width (bigG 1280); 0: no projection (CLIP-L)
    vocab: int = 49408        # token embedding rows
    context: int = 77         # positions


CLIP_L = TextConfig()                                                                  # 123,060,480 parameters
CLIP_G = TextConfig(width=1280, layers=32, heads=20, act="gelu", embed_dim=1280)       # 694,659,840 parameters


def activation(name, x):
    return x * torch.sigmoid(1.702 * x) if name == "quick_gelu" else F.gelu(x)


def causal_attention(q, k, v, heads):
    """Multi-head softmax attention where token i sees tokens <= i. q, k, v [B, T, W] -> [B, T, W]."""
    B, T, W = q.shape
    q, k, v = (x.view(B, T, heads, W // heads).transpose(1, 2) for x in (q, k, v))  # [B, heads, T, W/heads]
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, W)


class CLIPLayer(nn.Module):
    """One CLIP-L block, Hugging Face names: x += attn(LN1(x)); x += fc2(act(fc1(LN2(x))))."""

    def __init__(self, cfg):
        super().__init__()
        W, self.heads, self.act = cfg.width, cfg.heads, cfg.act
        self.self_attn = nn.ModuleDict({n: nn.Linear(W, W) for n in ("q_proj", "k_proj", "v_proj", "out_proj")})
        self.layer_norm1 = nn.LayerNorm(W)
        self.mlp = nn.ModuleDict(dict(fc1=nn.Linear(W, 4 * W), fc2=nn.Linear(4 * W, W)))
        self.layer_norm2 = nn.LayerNorm(W)

    def forward(self, x):  # [B, T, W]
        a, h = self.self_attn, self.layer_norm1(x)
        x = x + a.out_proj(causal_attention(a.q_proj(h), a.k_proj(h), a.v_proj(h), self.heads))
        return x + self.mlp.fc2(activation(self.act, self.mlp.fc1(self.layer_norm2(x))))


class CLIPTextModel(nn.Module):
    """CLIP ViT-L/14 text tower; state_dict keys = the checkpoint's under PREFIX_CLIP_L."""

    def __init__(self, cfg=CLIP_L):
        super().__init__()
        self.embeddings = nn.ModuleDict(dict(token_embedding=nn.Embedding(cfg.vocab, cfg.width),
                                        position_embedding=nn.Embedding(cfg.context, cfg.width)))
        self.encoder = nn.ModuleDict(dict(layers=nn.ModuleList(CLIPLayer(cfg) for _ in range(cfg.layers))))
        self.final_layer_norm = nn.LayerNorm(cfg.width)  # in the checkpoint, unused by SDXL

    def forward(self, ids):  # ids [B, T] -> penultimate hidden state [B, T, W]
        x = self.embeddings.token_embedding(ids) + self.embeddings.position_embedding.weight[:ids.shape[1]]
        for layer in self.encoder.layers[:-1]:  # SDXL takes the output of layer 11 of 12, without the final LayerNorm
            x = layer(x)
        return x


class OpenCLIPBlock(nn.Module):
    """One bigG block, open_clip names; attn.in_proj_weight stacks the q, k, v rows as nn.MultiheadAttention does."""

    def __init__(self, cfg):
        super().__init__()
        W, self.heads, self.act = cfg.width, cfg.heads, cfg.act
        self.ln_1 = nn.LayerNorm(W)
        self.attn = nn.Module()
        self.attn.in_proj_weight = nn.Parameter(torch.randn(3 * W, W) * W ** -0.5)  # [q; k; v] rows
        self.attn.in_proj_bias = nn.Parameter(torch.zeros(3 * W))
        self.attn.out_proj = nn.Linear(W, W)
        self.ln_2 = nn.LayerNorm(W)
        self.mlp = nn.ModuleDict(dict(c_fc=nn.Linear(W, 4 * W), c_proj=nn.Linear(4 * W, W)))

    def forward(self, x):  # [B, T, W]
        q, k, v = F.linear(self.ln_1(x), self.attn.in_proj_weight, self.attn.in_proj_bias).chunk(3, dim=-1)
        x = x + self.attn.out_proj(causal_attention(q, k, v, self.heads))
        return x + self.mlp.c_proj(activation(self.act, self.mlp.c_fc(self.ln_2(x))))


class OpenCLIPTextModel(nn.Module):
    """OpenCLIP ViT-bigG/14 text tower; state_dict keys = the checkpoint's under PREFIX_CLIP_G."""

    def __init__(self, cfg=CLIP_G):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab, cfg.width)
        self.positional_embedding = nn.Parameter(torch.randn(cfg.context, cfg.width) * 0.01)
        self.transformer = nn.ModuleDict(dict(resblocks=nn.ModuleList(OpenCLIPBlock(cfg) for _ in range(cfg.layers))))
        self.ln_final = nn.LayerNorm(cfg.width)
        self.text_projection = nn.Parameter(torch.randn(cfg.width, cfg.embed_dim) * cfg.width ** -0.5)  # used as x @ W

    def forward(self, ids):  # ids [B, T] (EOT = largest id) -> penultimate [B, T, W], pooled [B, embed_dim]
        x = self.token_embedding(ids) + self.positional_embedding[:ids.shape[1]]
        for block in self.transformer.resblocks[:-1]:
            x = block(x)
        # input of the last block, no ln_final (layer="penultimate")
        penultimate = x
        x = self.ln_final(self.transformer.resblocks[-1](x))
        eot = x[torch.arange(len(ids), device=ids.device), ids.argmax(dim=-1)]  # [B, W] features at each EOT token
        return penultimate, eot @ self.text_projection


def encode_prompt(clip_l, clip_g, prompts, vocab_path=VOCAB_PATH):
    """prompts (list of str) -> context [B, 77, 768+1280] = [CLIP-L | bigG] penultimate states,
    pooled bigG [B, 1280]."""
    device = clip_l.embeddings.token_embedding.weight.device
    ids_l = tokenize(prompts, "end", clip_l.embeddings.position_embedding.num_embeddings, vocab_path).to(device)
    ids_g = tokenize(prompts, "zero", clip_g.positional_embedding.shape[0], vocab_path).to(device)
    context_g, pooled = clip_g(ids_g)
    return torch.cat([clip_l(ids_l).to(context_g.dtype), context_g], dim=-1), pooled


SIZE_COND_DIM = 6 * 256  # the six size embeddings that follow the pooled text embedding in y


def vector_cond(pooled, original_size=(1024, 1024), crop_coords=(0, 0), target_size=(1024, 1024)):
    """SDXL micro-conditioning y (SDXL paper Sec. 2.2; sgm ConcatTimestepEmbedderND):
    [pooled bigG | E(orig h) E(orig w) E(crop top) E(crop left) E(target h) E(target w)], each E a 256-d embedding of
    the raw pixel number. pooled [B, 1280] -> y [B, 1280 + 6*256 = 2816]; sizes are (height, width)."""
    sizes = torch.tensor([*original_size, *crop_coords, *target_size], dtype=torch.float32, device=pooled.device)  # [6]
    # [B, 1536]
    emb = timestep_embedding(sizes, 256).reshape(1, SIZE_COND_DIM).expand(len(pooled), -1)
    return torch.cat([pooled, emb.to(pooled.dtype)], dim=1)


# ----------------------------------------------------------------------------------------------------------------------
# VAE (sgm diffusionmodules/model.py): ldm/sgm AutoencoderKL with its names. Encoder: image [-1, 1] -> 8x smaller
# latent; decoder: back. All GroupNorms are 32 groups, eps 1e-6. Run it in fp32 or bf16: SDXL's VAE overflows in
# fp16 (NaN / black images).

@dataclass
class VAEConfig:
    ch: int = 128                   # width of the full-resolution level (a multiple of 32 for GroupNorm)
    ch_mult: tuple = (1, 2, 4, 4)   # width multiplier per level; every level but the last changes resolution by 2
    num_res_blocks: int = 2         # ResnetBlocks per encoder level (the decoder has one more)
    z_channels: int = 4             # latent channels
    scale_factor: float = 0.13025   # latents = z * scale_factor have roughly unit variance (SDXL's value)


def group_norm(channels):
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm1, self.conv1 = group_norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = group_norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):  # [B, cin, H, W] -> [B, cout, H, W]
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions; q, k, v, proj_out are 1x1 convs."""

    def __init__(self, C):
        super().__init__()
        self.norm = group_norm(C)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(C, C, 1) for _ in range(4))

    def forward(self, x):  # [B, C, H, W]
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (conv(h).flatten(2).transpose(1, 2) for conv in (self.q, self.k, self.v))  # [B, HW, C]
        # softmax(q k^T / sqrt(C)) v
        h = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(h.transpose(1, 2).reshape(B, C, H, W))


def mid_block(C):
    return nn.ModuleDict(dict(block_1=ResnetBlock(C, C), attn_1=AttnBlock(C), block_2=ResnetBlock(C, C)))


def run_mid(mid, x):
    return mid.block_2(mid.attn_1(mid.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, padding=1)
        self.down, cin = nn.ModuleList(), cfg.ch
        for i, cout in enumerate(widths):
            blocks = [ResnetBlock(cin if j == 0 else cout, cout) for j in range(cfg.num_res_blocks)]
            level = nn.ModuleDict(dict(block=nn.ModuleList(blocks)))
            if i < len(widths) - 1:
                level["downsample"] = nn.ModuleDict(dict(conv=nn.Conv2d(cout, cout, 3, stride=2)))
            self.down.append(level)
            cin = cout
        self.mid = mid_block(cin)
        self.norm_out, self.conv_out = group_norm(cin), nn.Conv2d(cin, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x):  # [B, 3, H, W] -> mean and log-variance [B, 2*z, H/f, W/f]
        x = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                x = block(x)
            if "downsample" in level:
                # asymmetric zero pad, then stride-2 conv without padding
                x = level.downsample.conv(F.pad(x, (0, 1, 0, 1)))
        return self.conv_out(F.silu(self.norm_out(run_mid(self.mid, x))))


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        cin = widths[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, cin, 3, padding=1)
        self.mid = mid_block(cin)
        levels = []
        for i in reversed(range(len(widths))):  # built deepest first, stored by level index: up.0 is full resolution
            blocks = [ResnetBlock(cin if j == 0 else widths[i], widths[i]) for j in range(cfg.num_res_blocks + 1)]
            level = nn.ModuleDict(dict(block=nn.ModuleList(blocks)))
            if i > 0:
                level["upsample"] = nn.ModuleDict(dict(conv=nn.Conv2d(widths[i], widths[i], 3, padding=1)))
            levels.insert(0, level)
            cin = widths[i]
        self.up = nn.ModuleList(levels)
        self.norm_out, self.conv_out = group_norm(cin), nn.Conv2d(cin, 3, 3, padding=1)

    def forward(self, z):  # [B, z, h, w] -> [B, 3, h*f, w*f]
        x = run_mid(self.mid, self.conv_in(z))
        for level in reversed(self.up):  # up.3 (deepest) ... up.0
            for block in level.block:
                x = block(x)
            if "upsample" in level:
                x = level.upsample.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(x)))


class AutoencoderKL(nn.Module):
    """SDXL's VAE; state_dict keys = the checkpoint's under PREFIX_VAE. Latents are scaled by scale_factor."""

    def __init__(self, cfg=VAEConfig()):
        super().__init__()
        self.scale_factor = cfg.scale_factor
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)

    def encode(self, images, sample=False, generator=None):
        """images [B, 3, H, W] in [-1, 1] -> scaled latents [B, z, H/f, W/f]: the posterior mean, or a sample of
        N(mean, exp(logvar)) when sample=True (DMD2's real images for the GAN branch are sampled)."""
        dtype = self.quant_conv.weight.dtype
        mean, logvar = self.quant_conv(self.encoder(images.to(dtype))).chunk(2, dim=1)
        if sample:
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            mean = mean + std * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean * self.scale_factor

    def decode(self, latents):
        """scaled latents [B, z, h, w] -> images [B, 3, f*h, f*w], roughly in [-1, 1]."""
        z = latents.to(self.post_quant_conv.weight.dtype) / self.scale_factor
        return self.decoder(self.post_quant_conv(z))


# ----------------------------------------------------------------------------------------------------------------------
# Real images -> latents with captions, for `sdxl.py encode` (the shards LatentDataset reads).

IMAGE_EXT = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def image_caption_pairs(folder):
    """[(image path, caption)] for every image in folder, each with a caption file of the same name (cat.png +
    cat.txt)."""
    if not os.path.isdir(folder):
        raise ValueError(f"{folder}: not a folder")
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXT))
    if not names:
        raise ValueError(f"{folder}: no images ({', '.join(IMAGE_EXT)})")
    pairs = []
    for name in names:
        image, txt = os.path.join(folder, name), os.path.join(folder, os.path.splitext(name)[0] + ".txt")
        if not os.path.exists(unet.check_regular_file(txt)):        # a folder or a pipe is named as such
            raise ValueError(f"{image}: no caption (expected the text file {txt})")
        try:
            with open(txt, encoding="utf-8-sig") as f:                  # a regular file: checked above
                caption = f.read(MAX_CAPTION_CHARS + 1).strip()          # a longer caption is refused below
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{txt}: cannot read the caption ({e})") from None
        if not caption:
            raise ValueError(f"{txt}: empty caption")
        problem = caption_problem(caption)
        if problem:
            raise ValueError(f"{txt}: the caption has {problem}")
        pairs.append((image, caption))
    return pairs


def load_image(path, resolution):
    """RGB image -> [3, R, R] in [-1, 1]: shorter side resized to R (Lanczos), then the center R x R crop."""
    try:
        if os.path.getsize(unet.check_regular_file(path)) > fid.MAX_IMAGE_BYTES:    # PIL's WebP reads it whole
            raise ValueError(f"{os.path.getsize(path)} bytes, more than an image may have ({fid.MAX_IMAGE_BYTES})")
        with warnings.catch_warnings(), open(path, "rb") as file:
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            with PIL.Image.open(file, formats=unet.IMAGE_FORMATS) as f:                   # not EPS, ICO, ...
                unet.check_jpeg_scans(f, file)
                image = f.convert("RGB")
    # PIL.UnidentifiedImageError and truncated files are OSErrors, a header declaring too many pixels is a bomb, and a
    # damaged file of a rarer format can raise nearly anything from its plugin (IndexError, TypeError, MemoryError, ...)
    except Exception as e:
        raise ValueError(f"{path}: cannot read the image ({type(e).__name__}: {e})") from None
    scale = resolution / min(image.size)
    w, h = max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))
    image = image.resize((w, h), PIL.Image.LANCZOS)
    left, top = (w - resolution) // 2, (h - resolution) // 2
    image = np.asarray(image.crop((left, top, left + resolution, top + resolution)))  # [R, R, 3] uint8
    return torch.from_numpy(image.copy()).permute(2, 0, 1).float() / 127.5 - 1


@torch.no_grad()
def encode_folder(vae, folder, out, resolution, batch=8, shard_size=1000, seed=0):
    """Encode every captioned image of folder once (VAE posterior SAMPLES, as DMD2's generate_vae_latents.py) into
    out/latents_00000.safetensors, ...; each shard is written atomically. Returns the number of images."""
    pairs = image_caption_pairs(folder)
    if glob.glob(os.path.join(glob.escape(out), "latents_*.safetensors")):
        raise ValueError(f"{out}: already holds latents_*.safetensors shards; choose an empty folder")
    made = fid.missing_folders(os.path.join(out, "latents_00000.safetensors"))
    fid.check_folder(out)                       # writable before the first image is encoded, not after
    try:
        encode_shards(vae, pairs, out, resolution, batch, shard_size, seed)
    except BaseException:                       # a bad image or Ctrl-C before a shard is written: no empty folder
        fid.remove_empty_folders(made)
        raise
    return len(pairs)


def encode_shards(vae, pairs, out, resolution, batch, shard_size, seed):
    """encode_folder's work: [(image path, caption)] -> out/latents_00000.safetensors, ..., shard_size pairs each."""
    device = vae.quant_conv.weight.device
    g = torch.Generator(device).manual_seed(seed)
    for s in range(0, len(pairs), shard_size):
        chunk, latents = pairs[s:s + shard_size], []
        for i in range(0, len(chunk), batch):
            # [b, 3, R, R]
            images = torch.stack([load_image(path, resolution) for path, _ in chunk[i:i + batch]]).to(device)
            # [b, 4, R/8, R/8]
            latents.append(vae.encode(images, sample=True, generator=g).float().cpu())
        write_safetensors(os.path.join(out, f"latents_{s // shard_size:05d}.safetensors"),
                          {"latents": torch.cat(latents).half()},
                          {"captions": json.dumps([c for _, c in chunk], ensure_ascii=False),  # not 12-byte escapes
                           "resolution": str(resolution)})


# ----------------------------------------------------------------------------------------------------------------------
# Loading any SDXL-format single file (configs read from its shapes), the UNet's weights from any of the files
# people have, and the CPU mode's tiny models.

def check_state(module, state, path, what):
    """Raise ValueError naming path if state's keys or shapes differ from module's (missing, unexpected, mismatched)."""
    own = module.state_dict()
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    mismatched = [f"{k}: file {list(state[k].shape)}, model {list(own[k].shape)}"
                  for k in sorted(own.keys() & state.keys()) if state[k].shape != own[k].shape]
    problems = [f"  {title} ({len(keys)}): {', '.join(keys[:10])}{' ...' if len(keys) > 10 else ''}"
                for title, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                    ("shape mismatches", mismatched)) if keys]
    if problems:
        raise ValueError(f"{path}: the {what} weights do not match the model:\n" + "\n".join(problems))


def load_part(module_fn, path, prefix, what, device, dtype):
    """Build a module on the meta device (no memory, no init), check the file's tensors under prefix, then adopt them
    one by one converted to (device, dtype): peak memory is the converted module, never the whole file."""
    with torch.device("meta"):
        module = module_fn()
    state = {k: v for k, v in read_safetensors(path, prefix).items() if prefix + k not in UNUSED_KEYS}
    check_state(module, state, path, what)
    state = {k: v.to(device=device, dtype=dtype) for k, v in check_float_tensors(state, path, what).items()}
    check_finite_tensors(state, path, what)
    module.load_state_dict(state, assign=True)
    return module.eval().requires_grad_(False)


def check_float_tensors(state, path, what):
    """Weights must be stored as floating-point numbers: integer or bool tensors were cast and gave a black image."""
    bad = [k for k, v in state.items() if not v.is_floating_point()]
    if bad:
        raise ValueError(f"{path}: {len(bad)} of the {what}'s tensors are not floating point, e.g. {bad[0]} "
                         f"({str(state[bad[0]].dtype).removeprefix('torch.')})")
    return state


def check_finite_tensors(state, path, what):
    """After conversion to the run's dtype: a NaN, or a number too large for fp16, gave a black image, with no error."""
    bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{path}: {len(bad)} of the {what}'s tensors hold NaN or inf in the run's dtype, "
                         f"e.g. {bad[0]}")


def infer_configs(path, parts=("clip_l", "clip_g", "vae", "unet")):
    """{clip_l, clip_g, vae, unet} configs (those named in parts) of any SDXL-format single file: the base, smaller
    SDXL-family files, tiny test files. Read from its tensor shapes alone (widths, layers, levels and blocks are
    counted); what the weights do not hold follows SDXL's conventions (64-channel attention heads, CLIP-L quick_gelu,
    bigG gelu, VAE scale 0.13025). ValueError naming the file and what could not be inferred."""
    shapes = {k: shape for k, (_, shape, _, _) in read_safetensors_header(path)[0].items()}
    part = lambda prefix: {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}
    infer = dict(
        clip_l=lambda: infer_text_config(part(PREFIX_CLIP_L), path, "CLIP ViT-L text encoder",
                                         "embeddings.token_embedding.weight", "embeddings.position_embedding.weight",
                                         "encoder.layers.", "mlp.fc1.weight", None),
        clip_g=lambda: infer_text_config(part(PREFIX_CLIP_G), path, "OpenCLIP ViT-bigG text encoder",
                                         "token_embedding.weight", "positional_embedding", "transformer.resblocks.",
                                         "mlp.c_fc.weight", "text_projection"),
        vae=lambda: infer_vae_config(part(PREFIX_VAE), path),
        unet=lambda: unet.infer_sdxl_unet_config(part(PREFIX_UNET), f"{path} (UNet under {PREFIX_UNET})"))
    return {name: infer[name]() for name in parts}


MAX_TEXT_LAYERS, MAX_VAE_BLOCKS = 64, 16     # bounds on a layout read from a file's names (SDXL: 32 and 2)


def infer_text_config(shapes, path, what, tokens, positions, layer_prefix, mlp_in, projection):
    """TextConfig from one text tower's shapes: vocab and width from the token embedding, positions, numbered layers,
    heads of 64 channels (CLIP-L 768 = 12 x 64, bigG 1280 = 20 x 64), the projection width (bigG only)."""
    def dims(key):   # every tensor read here is a matrix
        if key not in shapes:
            raise ValueError(f"{path}: cannot infer the {what}'s config: no tensor {key}")
        if len(shapes[key]) != 2 or 0 in shapes[key]:
            raise ValueError(f"{path}: cannot infer the {what}'s config: {key} has shape {list(shapes[key])}, "
                             "not a matrix")
        return tuple(shapes[key])

    vocab, width = dims(tokens)
    layers = len({k[len(layer_prefix):].split(".", 1)[0] for k in shapes if k.startswith(layer_prefix)})
    if vocab < TextConfig.vocab or layers > MAX_TEXT_LAYERS:     # checked before a model of it is built
        raise ValueError(f"{path}: cannot infer the {what}'s config: {vocab} tokens and {layers} layers (the "
                         f"tokenizer needs {TextConfig.vocab} tokens, and at most {MAX_TEXT_LAYERS} layers are read; "
                         "bigG has 32)")
    if width % 64 or dims(f"{layer_prefix}0.{mlp_in}") != (4 * width, width):
        raise ValueError(f"{path}: cannot infer the {what}'s config: width {width} is not a multiple of CLIP's "
                         f"64-channel heads, or its MLP is not 4x wider ({list(dims(f'{layer_prefix}0.{mlp_in}'))})")
    return TextConfig(width=width, layers=layers, heads=width // 64, act="gelu" if projection else "quick_gelu",
                      embed_dim=dims(projection)[1] if projection else 0, vocab=vocab, context=dims(positions)[0])


def infer_vae_config(shapes, path):
    """VAEConfig from the encoder's shapes: base width, one multiplier per level, ResnetBlocks per level, latent
    channels. The decoder is then checked tensor by tensor when the weights load."""
    def dims(key):   # every tensor read here is a convolution's weight
        if key not in shapes:
            raise ValueError(f"{path}: cannot infer the VAE's config: no tensor {key}")
        if len(shapes[key]) != 4 or 0 in shapes[key]:
            raise ValueError(f"{path}: cannot infer the VAE's config: {key} has shape {list(shapes[key])}, not a "
                             "convolution's four non-zero dimensions")
        return tuple(shapes[key])

    ch = dims("encoder.conv_in.weight")[0]
    levels = len({k.split(".")[2] for k in shapes if k.startswith("encoder.down.")})
    blocks = len({k.split(".")[4] for k in shapes if k.startswith("encoder.down.0.block.")})
    # generate and encode take latents 8x smaller than the images: 4 levels, 3 of them halving the resolution
    if levels != 4 or blocks > MAX_VAE_BLOCKS or ch % 32:
        raise ValueError(f"{path}: cannot infer the VAE's config: {levels} levels of {blocks} ResnetBlocks and width "
                         f"{ch} (sdxl.py needs 4 levels, for latents 8x smaller than the images, at most "
                         f"{MAX_VAE_BLOCKS} blocks, and a width that is a multiple of 32 for GroupNorm)")
    widths = [dims(f"encoder.down.{i}.block.0.conv2.weight")[0] for i in range(levels)]
    if any(w % ch for w in widths):
        raise ValueError(f"{path}: cannot infer the VAE's config: level widths {widths} are not multiples of {ch}")
    return VAEConfig(ch=ch, ch_mult=tuple(w // ch for w in widths), num_res_blocks=blocks,
                     z_channels=dims("encoder.conv_out.weight")[0] // 2)


def load_sdxl_parts(path, device="cpu", dtype=torch.float32, vae_dtype=torch.float32, clip_l=None, clip_g=None,
                    vae=None):
    """(CLIPTextModel, OpenCLIPTextModel, AutoencoderKL), frozen, from an SDXL-format single file (strict, checked);
    a config not given is inferred from the file's shapes (infer_configs).

    The UNet lives under PREFIX_UNET of the same file: read_safetensors(path, PREFIX_UNET) gives its sgm-named
    state dict for the SDXL UNet in unet.py, and infer_configs(path, ["unet"]) its config."""
    if vae_dtype == torch.float16:
        raise ValueError("vae_dtype=float16: SDXL's VAE overflows in fp16 (NaN/black images); use float32 or bfloat16")
    given = dict(clip_l=clip_l, clip_g=clip_g, vae=vae)
    c = {**given, **infer_configs(path, [name for name, cfg in given.items() if cfg is None])}
    return (load_part(lambda: CLIPTextModel(c["clip_l"]), path, PREFIX_CLIP_L, "CLIP ViT-L text encoder", device,
                      dtype),
            load_part(lambda: OpenCLIPTextModel(c["clip_g"]), path, PREFIX_CLIP_G, "OpenCLIP ViT-bigG text encoder",
                      device, dtype),
            load_part(lambda: AutoencoderKL(c["vae"]), path, PREFIX_VAE, "VAE", device, vae_dtype))


def load_unet_state(path, cfg=SDXLUNetConfig()):
    """sgm-named UNet state dict (CPU tensors, memory-mapped for .safetensors) from any of: sd_xl_base_1.0.safetensors
    (its model.diffusion_model. subtree), our generator.safetensors or checkpoint.pt, or DMD2's diffusers-named
    dmd2_sdxl_{4,1}step_unet_fp16.bin / .safetensors (renamed by diffusers_to_sgm_unet)."""
    if path.endswith(".safetensors"):
        state = read_safetensors(path)
    else:
        # torch.load(weights_only=True): nothing in the file is executed
        state = unet.load_checkpoint(path)
        if isinstance(state, dict) and isinstance(state.get("generator"), dict):
            state = state["generator"]                         # our checkpoint.pt
    if not (isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise ValueError(f"{path}: expected a UNet state dict (name -> tensor)")
    if state and all("lora" in k for k in state):          # ours, Kohya's and peft's LoRA names all say so
        raise ValueError(f"{path}: a LoRA, not a UNet: pass it with --lora (export: --lora {path} --format kohya)")
    if any(k.startswith(PREFIX_UNET) for k in state):
        state = {k[len(PREFIX_UNET):]: v for k, v in state.items() if k.startswith(PREFIX_UNET)}
    if "conv_in.weight" in state:                              # diffusers names (DMD2's release)
        state = diffusers_to_sgm_unet(state, cfg, path)
    return state


def build_unet(state, cfg, device, dtype, source):
    """A frozen SDXLUNet holding state, built on the meta device: only the (device, dtype) copy is ever allocated."""
    with torch.device("meta"):
        net = SDXLUNet(cfg)
    state = {k: v.to(device=device, dtype=dtype) for k, v in check_float_tensors(state, source, "UNet").items()}
    check_finite_tensors(state, source, "UNet")
    load_sdxl_unet_state(net, state, source, assign=True)
    return net.eval().requires_grad_(False)


def check_parts_fit(parts, cfg, source):
    """The UNet cfg (of source) must take what the text encoders and the VAE of parts give it: cross-attention of
    CLIP-L's width plus bigG's, y of bigG's projection plus the size embeddings, and the VAE's latent channels in and
    out. Otherwise generate failed on its first step with torch's shape error."""
    width_l = parts["clip_l"].final_layer_norm.normalized_shape[0]
    width_g, embed_g = parts["clip_g"].text_projection.shape
    z = parts["vae"].post_quant_conv.in_channels
    problems = [f"{name} {got}, but the text encoders and VAE of {parts['source']} give {want}"
                for name, got, want in (("context_dim", cfg.context_dim, width_l + width_g),
                                        ("adm_in_channels", cfg.adm_in_channels, embed_g + SIZE_COND_DIM),
                                        ("in_channels", cfg.in_channels, z), ("out_channels", cfg.out_channels, z))
                if got != want]
    if problems:
        raise ValueError(f"{source}: the UNet does not fit: " + "; ".join(problems))


# --preset tiny: the real tokenizer (hence CLIP's 49,408 tokens and 77 positions), everything else small and random.
TINY_CLIP_L = TextConfig(width=32, layers=2, heads=2)
TINY_CLIP_G = TextConfig(width=32, layers=2, heads=2, act="gelu", embed_dim=32)
TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1)          # still 8x smaller latents
TINY_UNET = SDXLUNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(0, 1),
                           num_head_channels=32, context_dim=32 + 32, adm_in_channels=32 + SIZE_COND_DIM)


def load_parts(preset, ckpt, device, dtype=torch.float32, vae_dtype=torch.float32):
    """{clip_l, clip_g, vae (frozen, on device), unet_state, unet_cfg, vae_cfg, source}: SDXL base from ckpt, or
    with preset "tiny" random tiny modules from a fixed seed, so that encode, train and generate see the same ones."""
    if preset == "tiny":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            clip_l, clip_g, vae = CLIPTextModel(TINY_CLIP_L), OpenCLIPTextModel(TINY_CLIP_G), AutoencoderKL(TINY_VAE)
            state = SDXLUNet(TINY_UNET).state_dict()
        clip_l, clip_g = (m.to(device, dtype).eval().requires_grad_(False) for m in (clip_l, clip_g))
        vae = vae.to(device, vae_dtype).eval().requires_grad_(False)
        return dict(clip_l=clip_l, clip_g=clip_g, vae=vae, unet_state=state, unet_cfg=TINY_UNET, vae_cfg=TINY_VAE,
                    source="the tiny random UNet")
    if preset == "random":
        return random_full_size_parts(device, dtype, vae_dtype)
    if preset:
        raise ValueError(f"unknown preset {preset!r} (known: tiny, random)")
    if not ckpt:
        raise ValueError("--ckpt is required: sd_xl_base_1.0.safetensors or any SDXL-format single file "
                         "(or --preset tiny for random tiny models)")
    configs = infer_configs(ckpt)
    clip_l, clip_g, vae = load_sdxl_parts(ckpt, device, dtype, vae_dtype, configs["clip_l"], configs["clip_g"],
                                          configs["vae"])
    parts = dict(clip_l=clip_l, clip_g=clip_g, vae=vae, unet_state=read_safetensors(ckpt, PREFIX_UNET),
                 unet_cfg=configs["unet"], vae_cfg=configs["vae"], source=ckpt)
    check_parts_fit(parts, configs["unet"], ckpt)
    return parts


def random_full_size_parts(device, dtype, vae_dtype):
    """--preset random: SDXL base's shapes with random weights, built on `device` (seconds on a GPU, no download):
    latency, memory and throughput do not depend on the values."""
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        clip_l, clip_g = CLIPTextModel(CLIP_L).to(dtype), OpenCLIPTextModel(CLIP_G).to(dtype)
        vae = AutoencoderKL(VAEConfig()).to(vae_dtype)
        state = SDXLUNet(SDXLUNetConfig()).to(torch.bfloat16 if dtype == torch.bfloat16 else torch.float32).state_dict()
    clip_l, clip_g, vae = (m.eval().requires_grad_(False) for m in (clip_l, clip_g, vae))
    return dict(clip_l=clip_l, clip_g=clip_g, vae=vae, unet_state=state, unet_cfg=SDXLUNetConfig(), vae_cfg=VAEConfig(),
                source="a random full-size UNet")


if __name__ == "__main__":
    main()
