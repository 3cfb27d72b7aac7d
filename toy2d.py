"""
toy2d.py: all of DMD2 on a 2D Gaussian mixture, on a CPU, in seconds, with pictures and exact metrics.

DMD2 (Yin et al. 2024, "Improved Distribution Matching Distillation for Fast Image Synthesis",
arXiv 2405.14867) distills a many-step diffusion model (the teacher) into a generator that samples in
1 or K steps. Its four ideas, each written out below in this order:
  1. the distribution-matching (DM) gradient: move generator samples along x0_real - x0_fake, the difference of
     the teacher's and the fake score's denoised guesses (Sec. 3),
  2. the fake score, trained on the generator's own samples, updated 5x per generator update:
     the two time-scale update rule, TTUR (Sec. 4.2),
  3. a GAN head on the fake score's features, trained on real data (Sec. 4.3),
  4. backward simulation: a K-step generator is trained on inputs made by its own earlier steps (Sec. 4.5).
Here the data is a 2D Gaussian mixture known in closed form, so every metric is exact and every
failure (dropped modes, wrong mode weights, blur between modes, modes of the wrong shape) can be seen
and counted.

Run it:
  python toy2d.py                     # teacher + 1-step + 4-step students, about a minute on 2 CPU cores
  python toy2d.py --dataset grid      # the harder 5x5 grid (its students fall short of the ring's; README)
  python toy2d.py --real_score exact  # distill the exact mixture denoiser instead of the trained teacher
  python toy2d.py --ablation          # the paper's ablations at toy scale (minutes): table + figure
  python toy2d.py --seeds 10 --quiet  # seeds 0..9: one table of both students, median and worst (seeds.md)
  python toy2d.py --eval_redraws 20   # then the energy ratios on 20 fresh evaluation draws: how noisy they are,
                                      # how often a second teacher sample itself fails the 2x bar, and the bar on
                                      # the mean distance over the draws
  python toy2d.py --help              # every option
Outputs go to --outdir (default out/toy2d): samples.npz, metrics.json, samples.png, dm_field.png, curves.png.
The same code runs under bf16 autocast when CUDA is present (--device cuda); the CPU path is fp32.
"""

import argparse
import concurrent.futures
import contextlib
import copy
import inspect
import json
import math
import multiprocessing
import os
import re
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

# ----------------------------------------------------------------------------------------------
# Defaults. Every field is a command-line flag (python toy2d.py --help).


@dataclass
class Config:
    # data
    dataset: str = "ring"            # "ring": 8 modes on a circle, weights differ 4x; "grid": 5x5 modes
    # EDM noise levels (Karras et al. 2022); the same constants as ImageNet-64 in imagenet64.py
    sigma_min: float = 0.002         # smallest noise level of the 1000-point grid
    sigma_max: float = 80.0          # largest noise level of the grid (the teacher sampler starts here)
    rho: float = 7.0                 # Karras schedule exponent (EDM Eq. 5)
    # teacher: an EDM-preconditioned MLP trained on samples with the EDM loss
    width: int = 128                 # hidden width of every MLP (teacher, fake score, generator)
    depth: int = 3                   # hidden layers of every MLP
    noise_freq_max: float = 128 * math.pi  # highest frequency of the Fourier features of c_noise (EDM's: 1; README)
    center_data: bool = False        # the networks work on data centred at its mean, as EDM assumes (an option); README
    x_features: int = 16             # random Fourier features of the input c_in*x (0: a plain MLP); README
    x_feature_scale: float = 10.0    # standard deviation of their random frequencies
    x_feature_sigma: float = 1.0     # they fade in above this sigma, so small-sigma steps stay smooth; README
    teacher_iters: int = 3000        # EDM-loss training steps of the teacher
    teacher_batch: int = 1024        # teacher batch size, at EDM's lognormal sigma
    teacher_grid_batch: int = 128    # and this many more at sigma drawn as distillation draws it (0: EDM's); README
    teacher_lr: float = 0.0          # teacher Adam learning rate, cosine-decayed to 0 (0: ring 3e-3, grid 1e-2); README
    heun_steps: int = 32             # teacher sampler: EDM Heun steps (2 * steps - 1 network calls)
    real_score: str = "teacher"      # D_real for distillation: "teacher" (the trained MLP) or "exact" (closed form)
    # DMD2 distillation
    total_steps: int = 5000          # fake-score updates; generator updates = total_steps / dfake_gen_update_ratio
    one_step_steps_ratio: float = 1.5  # 1-step student: total_steps times this (it runs beside the K-step one); README
    batch_size: int = 192            # fake-score and generator batch, and the GAN's real samples (K-step: below)
    generator_batch_size: int = 0    # samples per generator update if more than batch_size (0: batch_size); README
    generator_lr: float = 1e-3       # AdamW learning rate of the generator (paper: equal to the fake score's)
    fake_score_lr: float = 1e-3      # AdamW learning rate of the fake score and the GAN head
    kstep_generator_batch_size: int = 768  # K-step student: at least this many samples per generator update; README
    kstep_fake_score_lr: float = 2e-3  # K-step student: its fake score's learning rate (0: as above); README
    kstep_batch_size: int = 384      # K-step student: its fake-score batch (0: --batch_size); README
    ema_span: float = 0.2            # a student is an EMA of G over about this fraction of its updates (0: off); README
    kstep_ema_span: float = 0.3      # K-step student: its own EMA span (negative: --ema_span); README
    lr_decay: bool = True            # cosine-decay both learning rates to 0 (the toy's short run; paper: constant)
    dfake_gen_update_ratio: int = 5  # TTUR: fake-score updates per generator update (paper: 5)
    min_step_percent: float = 0.02   # DM gradient draws sigma from grid indices 20..980 of 1000 (paper Sec. 3)
    max_step_percent: float = 0.98   # its highest share of the grid (at most index 999, as in DMD2's code)
    gen_gan_weight: float = 2.0      # weight of the generator's GAN loss (ImageNet: 3e-3; see README)
    fake_gan_weight: float = 2.0     # weight of the discriminator loss in the fake-score update (ImageNet: 1e-2)
    dm: bool = True                  # use the DM gradient (False: a GAN-only run, the paper's ablation)
    max_grad_norm: float = 10.0      # gradient clipping, as the official runs
    one_step_sigma: float = 2.5      # the 1-step student is G(s z; s) at this s (paper: sigma_max = 80); README
    ksteps: int = 4                  # steps of the multi-step student (at least 2: the 1-step student always runs)
    kstep_sigmas: str = "2.5,0.6,0.3,0.12"  # its fixed noise levels; the first acts on s z (paper: 80); README
    backward_simulation: bool = True # K-step inputs from the generator's own chain (False: noised real data)
    fake_score_knows_step: bool = True  # K-step: the fake score is told which step made each sample (paper: no)
    gan_head_per_step: bool = True   # K-step: a GAN head per step (paper: one head); README
    one_step_fake_features: int = 32  # 1-step: its fake score gets this many more input features, at all sigma; README
    one_step_generator_features: int = 32  # 1-step: its generator gets this many more, another draw; README
    fake_score_lognormal: float = 0.75  # share of fake-score sigmas drawn as EDM trains (paper: 0, the grid); README
    # evaluation and run
    num_eval: int = 10000            # samples per row of the metrics table
    eval_every: int = 500            # iterations between quick metric points on the training curves
    eval_redraws: int = 0            # main run: this many fresh draws of the energy ratios (their noise); README
    outdir: str = "out/toy2d"        # output folder
    seed: int = 0                    # seeds everything: a CPU run repeats bit for bit (same machine and --threads)
    device: str = "auto"             # "auto", "cpu" or "cuda"
    precision: str = "auto"          # "auto" (bf16 on CUDA, fp32 on CPU), "bf16", "fp16" (with GradScaler), "fp32"
    threads: int = 0                 # CPU threads for teacher and evaluation (0: torch's default; workers use one)
    workers: int = 2                 # CPU processes that train students side by side, one thread each (1: in turn)
    seeds: int = 1                   # main runs for seeds seed..seed+seeds-1; >1 also writes seeds.md (median, worst)
    ablation: bool = False           # run the ablation table instead of the main run
    ablation_seeds: int = 2          # seeds per ablation row
    quiet: bool = False              # no progress bars


# ----------------------------------------------------------------------------------------------
# Data: a 2D Gaussian mixture p0 = sum_k pi_k N(mu_k, s_k^2 I), known in closed form.


@dataclass
class Mixture:
    means: torch.Tensor    # [K, 2]
    stds: torch.Tensor     # [K]
    weights: torch.Tensor  # [K], sums to 1


def make_mixture(name):
    """The default ring makes dropped modes and wrong weights obvious: weights 1..4 around the circle.
    One width for all modes: with two widths, samples stranded between modes would be counted for the
    wider neighbour and bias the weight metric."""
    if name == "ring":
        k = torch.arange(8, dtype=torch.float64)
        angle = 2 * math.pi * k / 8
        means = 2.0 * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
        stds = torch.full((8,), 0.3, dtype=torch.float64)       # neighbours 1.53 apart: 5 stds
        weights = 1.0 + 3.0 * k / 7              # the heaviest mode is 4x the lightest
    elif name == "grid":
        i, j = torch.meshgrid(torch.arange(5.0), torch.arange(5.0), indexing="ij")
        means = 1.2 * torch.stack([i.flatten() - 2, j.flatten() - 2], dim=1).double()
        stds = torch.full((25,), 0.08, dtype=torch.float64)
        weights = 1.0 + ((3 * i + 2 * j) % 4).flatten().double()  # four weight levels, 1..4
    else:
        raise ValueError(f"unknown dataset {name!r}: use 'ring' or 'grid'")
    return Mixture(means.float(), stds.float(), (weights / weights.sum()).float())


def sample_mixture(mix, n, generator=None):
    k = torch.multinomial(mix.weights, n, replacement=True, generator=generator)             # [n]
    eps = torch.randn(n, 2, generator=generator)
    return mix.means[k] + mix.stds[k, None] * eps                                            # [n, 2]


def mixture_log_prob(mix, x, sigma=0.0):
    """log p_sigma(x) of the mixture convolved with N(0, sigma^2 I): variances add. x [n, 2] -> [n]."""
    var = mix.stds**2 + sigma**2                                                             # [K]
    sq = ((x[:, None, :] - mix.means[None]) ** 2).sum(-1)                                    # [n, K]
    log_comp = torch.log(mix.weights) - torch.log(2 * math.pi * var) - sq / (2 * var)      # [n, K]
    return torch.logsumexp(log_comp, dim=1)


def exact_denoiser(mix, x, sigma):
    """The closed-form D(x; sigma) = E[x0 | x0 + sigma*eps = x] of the mixture (Tweedie's formula).

    Responsibilities w_k = softmax_k(log pi_k + log N(x; mu_k, (s_k^2 + sigma^2) I)), then
    D = sum_k w_k (s_k^2 x + sigma^2 mu_k) / (s_k^2 + sigma^2). x [n, 2], sigma [n] or float -> [n, 2].
    """
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1)            # [n or 1, 1]
    means, stds, weights = (t.to(x.device, x.dtype) for t in (mix.means, mix.stds, mix.weights))
    var = stds[None] ** 2 + sigma**2                                                         # [n, K]
    sq = ((x[:, None, :] - means[None]) ** 2).sum(-1)                                        # [n, K]
    w = torch.softmax(torch.log(weights) - torch.log(var) - sq / (2 * var), dim=1)          # [n, K]
    post_mean = (stds[None, :, None] ** 2 * x[:, None] + sigma[:, :, None] ** 2 * means[None]) / var[..., None]
    return (w[..., None] * post_mean).sum(1)                                                 # [n, 2]


def mixture_mean(mix):
    """The data's mean [2]: the ring's weights pull it towards its heavy side, to (-0.17, -0.41)."""
    return (mix.weights[:, None] * mix.means).sum(0)


def mixture_std(mix):
    """Per-coordinate standard deviation of the data: EDM's sigma_data for this dataset."""
    second = (mix.weights[:, None] * (mix.means**2 + mix.stds[:, None] ** 2)).sum(0)          # [2]
    return float(torch.sqrt((second - mixture_mean(mix) ** 2).mean()))


# ----------------------------------------------------------------------------------------------
# Models. Teacher, fake score and generator are the same EDM-preconditioned MLP: the paper
# initialises the fake score and the generator from the teacher's weights.


def sigma_grid(n, sigma_min, sigma_max, rho):
    """EDM Eq. 5, ascending: index 0 is sigma_min, index n-1 is sigma_max (DMD2's 1000-point grid)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    sigmas = (sigma_min ** (1 / rho) + ramp * (sigma_max ** (1 / rho) - sigma_min ** (1 / rho))) ** rho
    return sigmas.float()


class Denoiser(nn.Module):
    """D(x; sigma) = mu + c_skip x' + c_out F(c_in x', c_noise) with x' = x - mu (EDM Table 1; mu is the data's mean
    with --center_data, else 0), with F an MLP that also sees x_features random Fourier features of c_in x', faded
    in above sigma = x_sigma.

    forward(x [B, 2], sigma [B] or float, features=False) -> D [B, 2] (and the last hidden layer
    [B, width] when features=True: the GAN head of DMD2 reads the fake score's features).
    """

    def __init__(self, sigma_data, width=128, depth=3, num_freqs=8, max_freq=128 * math.pi,
                 x_features=0, x_scale=10.0, x_sigma=1.0, data_mean=None):
        super().__init__()
        self.sigma_data = sigma_data
        # EDM's preconditioning assumes data of mean 0 (images in [-1, 1]); the ring's is not. With --center_data the
        # network works on x - data_mean: at large sigma D is about the data's mean, which F alone learns short of,
        # but the students were not better for it on seeds 0-9 (README).
        self.register_buffer("data_mean", torch.zeros(2) if data_mean is None else data_mean.float().clone())
        # Fourier features of c_noise at max_freq, max_freq/2, ..., max_freq/2^(num_freqs-1). c_noise spans about
        # 2.7 over the grid; EDM's positional embedding stays <= 1, but here 1 made both students worse (README).
        self.register_buffer("freqs", max_freq * 2.0 ** -torch.arange(num_freqs - 1, -1, -1.0))
        # Random Fourier features of the input (Tancik et al. 2020): a plain MLP on (x, y) is too smooth for
        # a 1-step map that must tear the plane into 8 blobs, and it folds the plane instead (README). One
        # fixed draw of frequencies, the same for every seed; a buffer, so copies of the teacher share it.
        self.x_sigma = x_sigma
        draw = torch.randn(2, x_features, generator=torch.Generator().manual_seed(1234))
        self.register_buffer("x_freqs", x_scale * draw)                          # [2, x_features]
        self.inp = nn.Linear(2 + 2 * num_freqs + 2 * x_features, width)
        self.hidden = nn.ModuleList(nn.Linear(width, width) for _ in range(depth - 1))
        self.out = nn.Linear(width, 2)
        self.step_emb, self.step = None, 0     # optional: which step of a K-step chain made x (see add_steps)
        self.extra = None                      # optional: more input features, at every sigma (see add_input_features)

    def add_steps(self, ksteps):
        """Let the fake score know which of K steps made a sample: a learned vector per step added to the
        first layer, zero at the start so the fake score still starts as the teacher. Set self.step before a call."""
        self.step_emb = nn.Parameter(torch.zeros(ksteps, self.inp.out_features, device=self.inp.weight.device))

    def add_input_features(self, n, scale, seed=99):
        """n more random Fourier features of c_in x, at every sigma (not faded in), with their own first-layer
        weights, zero at the start so the network still starts as the teacher. The 1-step student's fake score
        gets them: its samples fold onto thin sheets that it must see at small sigma to push them apart; and its
        generator gets its own, to cut the plane into blobs more sharply (README)."""
        device = self.inp.weight.device
        draw = torch.randn(2, n, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("extra_freqs", (scale * draw).to(device))                          # [2, n]
        # built on the meta device and zeroed: no draw from the global RNG, which would shift every later draw
        self.extra = nn.Linear(2 * n, self.inp.out_features, bias=False, device="meta").to_empty(device=device)
        nn.init.zeros_(self.extra.weight)

    def forward(self, x, sigma, features=False):
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1).expand(x.shape[0], 1)
        x = x - self.data_mean                                                 # centred data, [B, 2]
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)                                    # EDM Eq. 7
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sigma**2 + sd**2).sqrt()
        c_noise = sigma.log() / 4
        angles = c_noise * self.freqs                                          # [B, num_freqs]
        proj = (c_in * x) @ self.x_freqs                                       # [B, x_features]
        # The input features fade in above x_sigma: they help a step that starts from wide noise, but with them at
        # every sigma the 4-step student's small-sigma steps made its modes narrower than the data's (README).
        gate = torch.sigmoid(4 * (sigma.log() - math.log(self.x_sigma)))       # [B, 1]
        h = self.inp(torch.cat([c_in * x, angles.cos(), angles.sin(), gate * proj.cos(), gate * proj.sin()], dim=1))
        if self.extra is not None:
            extra = (c_in * x) @ self.extra_freqs                                # [B, n]
            h = h + self.extra(torch.cat([extra.cos(), extra.sin()], dim=1))
        h = F.silu(h if self.step_emb is None else h + self.step_emb[self.step])
        for layer in self.hidden:
            h = h + F.silu(layer(h))                                           # residual MLP
        F_x = self.out(h)
        D_x = self.data_mean + c_skip * x + c_out * F_x.float()
        return (D_x, h) if features else D_x


class ExactDenoiser(nn.Module):
    """The closed-form mixture denoiser with the Denoiser call signature (no parameters)."""

    def __init__(self, mix):
        super().__init__()
        self.mix = mix

    def forward(self, x, sigma, features=False):
        return exact_denoiser(self.mix, x.float(), sigma)


def make_gan_head(width, ksteps=1):
    """DMD2's GAN classifier, on the fake score's last hidden layer: features [B, width] -> logit [B]. With ksteps > 1,
    one such head per step of a K-step chain (StepHeads)."""
    if ksteps > 1:
        return StepHeads([make_gan_head(width) for _ in range(ksteps)])
    return nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 1), nn.Flatten(0))


class StepHeads(nn.ModuleList):
    """A GAN head per step of a K-step chain (--gan_head_per_step, an option): self.step, set with the fake score's,
    picks the head, so each step's samples are judged by a head that has seen that step's samples alone. One shared
    head pushes every step away from what tells step 0's samples from real data (README)."""
    step = 0

    def forward(self, h):
        return self[self.step](h)


def generate(G, z, sigmas, generator=None):
    """The student sampler: denoise to x0, re-noise to the next level with fresh noise (paper Sec. 4.4).

    z [B, 2] ~ N(0, I); sigmas: the K fixed levels; step 0 sees sigmas[0] * z (paper: sigmas[0] = sigma_max).
    """
    x = sigmas[0] * z
    for i, sigma in enumerate(sigmas):
        x0 = G(x, sigma)
        if i + 1 < len(sigmas):
            x = x0 + sigmas[i + 1] * torch.randn(x0.shape, generator=generator, device=x0.device)
    return x0


@torch.no_grad()
def heun_sampler(D, z, num_steps, sigma_min, sigma_max, rho):
    """EDM's deterministic sampler (Karras et al. 2022, Algorithm 1): Heun steps on the probability-flow ODE."""
    t = torch.cat([sigma_grid(num_steps, sigma_min, sigma_max, rho).flip(0), torch.zeros(1)]).tolist()
    x = z * t[0]
    for i in range(num_steps):
        d = (x - D(x, t[i])) / t[i]                                 # dx/dsigma = (x - D(x; sigma)) / sigma
        x_next = x + (t[i + 1] - t[i]) * d                          # Euler step
        if t[i + 1] > 0:                                            # 2nd-order correction
            d_next = (x_next - D(x_next, t[i + 1])) / t[i + 1]
            x_next = x + (t[i + 1] - t[i]) * (d + d_next) / 2
        x = x_next
    return x


def edm_sigmas(n, device, P_mean=-1.2, P_std=1.2):
    """EDM's training noise levels [n, 1] (Karras et al. 2022, Table 1): ln sigma ~ N(P_mean, P_std^2), median 0.3."""
    return (torch.randn(n, 1, device=device) * P_std + P_mean).exp()


def edm_loss(D, x0, sigma_grid=None, n_grid=0):
    """EDM training loss (Karras et al. 2022, Eq. 8 with Table 1's lognormal sigma and weighting).
    The last n_grid rows of x0 [B, 2] draw sigma uniformly from sigma_grid instead (--teacher_grid_batch)."""
    B = x0.shape[0]
    sigma = edm_sigmas(B - n_grid, x0.device)                                               # [B - n_grid, 1]
    if n_grid:
        sigma = torch.cat([sigma, sigma_grid[torch.randint(0, len(sigma_grid), (n_grid, 1), device=x0.device)]])
    weight = (sigma**2 + D.sigma_data**2) / (sigma * D.sigma_data) ** 2
    D_x = D(x0 + sigma * torch.randn_like(x0), sigma)
    return (weight * (D_x - x0) ** 2).mean()


def make_denoiser(cfg, mix):
    """The teacher's network, untrained; the generator and the fake score are copies of the trained teacher."""
    return Denoiser(mixture_std(mix), cfg.width, cfg.depth, max_freq=cfg.noise_freq_max, x_features=cfg.x_features,
                    x_scale=cfg.x_feature_scale, x_sigma=cfg.x_feature_sigma,
                    data_mean=mixture_mean(mix) if cfg.center_data else None)


def teacher_lr(cfg):
    """The teacher's learning rate: --teacher_lr, or the dataset's own when it is 0. The grid's 25 modes are 15 of
    their stds apart, against the ring's 5, so its teacher's denoiser must cut the plane into 25 cells with sharp
    edges; at the ring's 3e-3 it had not learnt them in 3,000 steps, and its samples smeared each row of modes into a
    line (README)."""
    return cfg.teacher_lr or {"ring": 3e-3, "grid": 1e-2}[cfg.dataset]


def train_teacher(cfg, mix, device, progress=True):
    """The many-step model DMD2 distills: an MLP denoiser trained on mixture samples."""
    teacher = make_denoiser(cfg, mix).to(device)
    opt = torch.optim.Adam(teacher.parameters(), lr=teacher_lr(cfg), fused=True)   # fused: one kernel per step
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.teacher_iters)
    # DMD2 asks the teacher for D_real at sigma drawn uniformly over the 1000-point grid: half of its draws are above
    # 2.5 and a fifth above 20, where EDM's lognormal sigma (median 0.3) trains 4% and 0.02% of the time. The teacher's
    # errors there pushed the students' samples towards one side of the ring and shifted their mode weights (README).
    grid = sigma_grid(1000, cfg.sigma_min, cfg.sigma_max, cfg.rho).to(device)
    for _ in tqdm(range(cfg.teacher_iters), desc="teacher", disable=not progress, leave=False):
        x0 = sample_mixture(mix, cfg.teacher_batch + cfg.teacher_grid_batch).to(device)      # [B, 2]
        loss = edm_loss(teacher, x0, sigma_grid=grid, n_grid=cfg.teacher_grid_batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return teacher.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# 1. Distribution matching gradient (DMD Eq. 7-8, DMD2 Sec. 3)


def loss_distribution_matching(x, D_real, fake_score, sigma_grid, min_idx, max_idx):
    """1. Distribution-matching gradient (DMD Eq. 7-8 as DMD2's code computes it).

    The generator should move each sample x along the difference of the real and fake scores of
    the noised sample, i.e. along x0_real - x0_fake (Tweedie: score = (x0 - x_t) / sigma^2):
      sigma   ~ grid[U{min_idx..max_idx}]        (2%-98% of the 1000-point grid)
      x_t     = x + sigma * eps
      x0_real = D_real(x_t; sigma),  x0_fake = fake_score(x_t; sigma)
      p_real  = x - x0_real,         p_fake  = x - x0_fake
      grad    = (p_real - p_fake) / mean|p_real|   (per-sample normaliser)
      loss    = 0.5 * MSE(x, stopgrad(x - grad))   (its gradient w.r.t. x is grad / numel(x))
    x [B, 2] with grad -> (loss, grad [B, 2]).
    """
    idx = torch.randint(min_idx, max_idx + 1, (x.shape[0],), device=x.device)
    sigma = sigma_grid[idx].unsqueeze(1)                                       # [B, 1]
    with torch.no_grad():
        x_t = x + sigma * torch.randn_like(x)
        p_real = x - D_real(x_t, sigma)                                        # x - x0_real, [B, 2]
        p_fake = x - fake_score(x_t, sigma)                                    # x - x0_fake, [B, 2]
        grad = (p_real - p_fake) / p_real.abs().mean(dim=1, keepdim=True)
        grad = torch.nan_to_num(grad)
    loss = 0.5 * F.mse_loss(x, (x - grad).detach())
    return loss, grad


# ----------------------------------------------------------------------------------------------
# 2. Fake score and the two time-scale update rule (DMD2 Sec. 4.2)


def fake_score_sigmas(sigma_grid, n, lognormal=0.0):
    """The noise levels [n, 1] of a fake-score batch: uniform over the grid's 1000 indices, as DMD2's code draws them,
    except a share `lognormal` of the rows, which draw sigma as EDM trains its denoisers (edm_sigmas), clamped to
    the grid's range. Uniform indices put half the fake score's training above sigma = 2.5; the lognormal puts more
    of it where the modes' shapes and the cuts between them are decided, and both students came out nearer the data
    (--fake_score_lognormal; README)."""
    sigma = sigma_grid[torch.randint(0, len(sigma_grid), (n, 1), device=sigma_grid.device)]
    if lognormal > 0:
        edm = edm_sigmas(n, sigma_grid.device).clamp(sigma_grid[0], sigma_grid[-1])    # tensor bounds: no GPU sync
        sigma = torch.where(torch.rand(n, 1, device=sigma_grid.device) < lognormal, edm, sigma)
    return sigma


def loss_fake_score(fake_score, x_fake, sigma_grid, x_real=None, lognormal=0.0):
    """2. The fake score's denoising loss on detached generator samples, at sigma over the grid's whole range.

      sigma ~ grid[U{0..999}] (a share `lognormal` from EDM's lognormal instead: fake_score_sigmas)
      lambda(sigma) = 1/sigma^2 + 1/sigma_data^2  (EDM weighting; DMD Alg. 3)
      loss  = mean lambda(sigma) * (fake_score(x + sigma*eps; sigma) - x)^2
    Returns (loss, features [B, width], features of x_real or None). The GAN head (3.) reads the features of
    the noised generator samples, and of real data x_real [B, 2], noised alike, which rides along in the same
    forward and adds nothing to this loss.
    The two time-scale rule lives in the loop: this loss is minimised every iteration, the
    generator's loss only every dfake_gen_update_ratio-th, so fake_score keeps up with the generator.
    """
    B = x_fake.shape[0]
    x = x_fake if x_real is None else torch.cat([x_fake, x_real])                          # [B or 2B, 2]
    sigma = fake_score_sigmas(sigma_grid, x.shape[0], lognormal)                           # [B or 2B, 1]
    x0_fake, h = fake_score(x + sigma * torch.randn_like(x), sigma, features=True)         # [B or 2B, 2], [.., width]
    weight = 1 / sigma[:B] ** 2 + 1 / fake_score.sigma_data**2
    loss = (weight * (x0_fake[:B].float() - x_fake) ** 2).mean()
    return loss, h[:B], (None if x_real is None else h[B:])


# ----------------------------------------------------------------------------------------------
# 3. GAN head (DMD2 Sec. 4.3)


def gan_logits(fake_score, gan_head, x, sigma_grid):
    """3. GAN head: noise x at a random grid sigma (diffusion GAN), classify the fake score's features. The
    generator's turn draws sigma here, uniformly over the grid; the discriminator's side reads the fake score's own
    forward, whose sigma are fake_score_sigmas' (README: --fake_score_lognormal)."""
    sigma = sigma_grid[torch.randint(0, len(sigma_grid), (x.shape[0],), device=x.device)].unsqueeze(1)
    _, h = fake_score(x + sigma * torch.randn_like(x), sigma, features=True)
    return gan_head(h).float()


def loss_gan_generator(logits_fake):
    """Non-saturating generator loss softplus(-D(G(z))) = -log sigmoid(D) (paper Eq. 4, logit form)."""
    return F.softplus(-logits_fake).mean()


def loss_gan_discriminator(logits_real, logits_fake):
    """softplus(D(fake)) + softplus(-D(real)): the head learns real -> +, generated -> -."""
    return F.softplus(logits_fake).mean() + F.softplus(-logits_real).mean()


# ----------------------------------------------------------------------------------------------
# 4. Backward simulation (DMD2 Sec. 4.5)


@torch.no_grad()
def backward_simulation(G, z, sigmas, k, generator=None):
    """4. Backward simulation (paper Sec. 4.5): the input the K-step generator sees at step k.

    Run the current generator from pure noise through steps 0..k-1, exactly as at inference, then
    re-noise its last x0 to sigmas[k]. Step 0's input is pure noise sigmas[0] * z. Without this, a
    multi-step student is trained on noised *real* data but sampled from its own outputs: a mismatch.
    z [B, 2] -> x_k [B, 2] at noise level sigmas[k].
    """
    x = sigmas[0] * z
    for i in range(k):
        x0 = G(x, sigmas[i])
        x = x0 + sigmas[i + 1] * torch.randn(x0.shape, generator=generator, device=x0.device)
    return x


# ----------------------------------------------------------------------------------------------
# The training loop (DMD2 Algorithm 1): every iteration the fake score takes a turn; every
# dfake_gen_update_ratio-th iteration the generator takes one first.


def amp_settings(cfg, device):
    """bf16 autocast on CUDA (DMD2 trains in bf16; fp16 diverged for the authors), fp32 on CPU."""
    mode = cfg.precision if cfg.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[mode]
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext
    scaler = torch.amp.GradScaler(device.type, enabled=(mode == "fp16"))
    return autocast, scaler


@dataclass
class Trainables:
    """What distillation trains, with its optimisers and the loop's fixed settings."""
    G: nn.Module                  # the generator (official: feedforward_model)
    fake_score: nn.Module         # the fake score (official: fake_unet)
    gan_head: nn.Module           # the GAN head (official: cls_pred_branch)
    G_ema: nn.Module              # the EMA of G's weights, which the student is sampled from (G itself: --ema_span 0)
    opt_G: torch.optim.Optimizer
    opt_fake: torch.optim.Optimizer
    autocast: object              # () -> autocast context
    scaler: torch.amp.GradScaler
    sigma_grid: torch.Tensor      # [1000] ascending Karras grid
    dm_range: tuple               # grid indices (min, max) the DM gradient draws sigma from


def student_config(cfg, ksteps):
    """The options as the student with ksteps steps sees them. The 1-step student makes --total_steps times
    --one_step_steps_ratio iterations: the two train side by side and its updates cost less (a smaller batch, no
    backward simulation), so its 7,500 by default still end before the K-step student's 5,000. The K-step student
    spreads its updates over K steps, so each step gets 1/K of them; it takes its own fake-score batch, generator batch
    (at least --kstep_generator_batch_size), fake-score learning rate and EMA span (--kstep_*). Why each: README."""
    if ksteps == 1:
        return replace(cfg, total_steps=max(1, round(cfg.total_steps * cfg.one_step_steps_ratio)),
                       one_step_steps_ratio=1.0)
    batch = cfg.kstep_batch_size or cfg.batch_size
    return replace(cfg, batch_size=batch,
                   generator_batch_size=max(cfg.kstep_generator_batch_size, cfg.generator_batch_size, batch),
                   fake_score_lr=cfg.kstep_fake_score_lr or cfg.fake_score_lr,
                   ema_span=cfg.kstep_ema_span if cfg.kstep_ema_span >= 0 else cfg.ema_span)


def dm_index_range(cfg):
    """The grid indices (lowest, highest; both drawn) the DM gradient takes sigma from: 20 and 980 of 0..999 by
    default. As DMD2's code, the highest is int(max_step_percent * 1000) but at most the grid's last index."""
    return int(cfg.min_step_percent * 1000), min(int(cfg.max_step_percent * 1000), 999)


def make_trainables(cfg, teacher, device, ksteps=1):
    """The generator and the fake score both start as copies of the teacher (paper Sec. 5); the head is new. The
    1-step student's generator and fake score each get extra input features whose weights start at zero, so they
    still compute the teacher's function at the start."""
    cfg = student_config(cfg, ksteps)                        # the same options again if cfg is already the student's
    G = copy.deepcopy(teacher).train().requires_grad_(True)
    fake_score = copy.deepcopy(teacher).train().requires_grad_(True)
    if cfg.one_step_generator_features and ksteps == 1:      # another draw of frequencies than the fake score's (99)
        G.add_input_features(cfg.one_step_generator_features, cfg.x_feature_scale, seed=98)
    if cfg.fake_score_knows_step and ksteps > 1:
        fake_score.add_steps(ksteps)
    if cfg.one_step_fake_features and ksteps == 1:
        fake_score.add_input_features(cfg.one_step_fake_features, cfg.x_feature_scale)
    gan_head = make_gan_head(cfg.width, ksteps if cfg.gan_head_per_step else 1).to(device)
    G_ema = copy.deepcopy(G).requires_grad_(False) if cfg.ema_span > 0 else G
    adamw = dict(betas=(0.9, 0.999), weight_decay=0.01, fused=True)
    opt_G = torch.optim.AdamW(G.parameters(), lr=cfg.generator_lr, **adamw)
    opt_fake = torch.optim.AdamW([*fake_score.parameters(), *gan_head.parameters()], lr=cfg.fake_score_lr, **adamw)
    grid = sigma_grid(1000, cfg.sigma_min, cfg.sigma_max, cfg.rho).to(device)
    return Trainables(G, fake_score, gan_head, G_ema, opt_G, opt_fake, *amp_settings(cfg, device), grid,
                      dm_index_range(cfg))


def optimiser_step(opt, loss, params, scaler, max_grad_norm):
    """Backward, clip (as the official runs), step; the GradScaler is a no-op unless --precision fp16."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    scaler.step(opt)
    scaler.update()


def ema_decay(cfg):
    """The per-update decay of G's EMA: a time constant of --ema_span of the run's generator updates (the 1-step
    student's 1,500 by default at 0.2: decay 1 - 1/300), so a shorter run averages a shorter stretch. The teacher's
    weights, where G_ema starts, keep a share of about exp(-1/ema_span) at the end (0.7% at 0.2). cfg: a student's
    options (student_config)."""
    updates = math.ceil(cfg.total_steps / cfg.dfake_gen_update_ratio)
    return max(0.0, 1 - 1 / (cfg.ema_span * updates)) if cfg.ema_span > 0 else 0.0


@torch.no_grad()
def update_ema(G_ema, G, decay):
    """G_ema <- decay G_ema + (1 - decay) G, after each generator update (a no-op when G_ema is G). The generator and
    the fake score chase each other: the ring's radius swings in and out while the learning rate is large, and the
    last update's weights land off the data by a few hundredths; the average of the last fifth of the updates
    lands nearer (README). The official DMD2 code keeps no EMA; --ema_span 0 is its recipe."""
    if G_ema is not G:
        torch._foreach_lerp_(list(G_ema.parameters()), list(G.parameters()), 1 - decay)


def generator_input(cfg, mix, G, z, sigmas, k):
    """The generator's input at step k: pure noise at step 0; later, backward simulation (4.), or noised
    real data when --backward_simulation false (the ablation). z [B, 2] -> [B, 2]."""
    if cfg.backward_simulation or k == 0:
        return backward_simulation(G, z, sigmas, k)
    return sample_mixture(mix, z.shape[0]).to(z.device) + sigmas[k] * z


def generator_turn(cfg, t, D_real, x_in, sigma_k, dm_objective=None):
    """One generator update: the DM gradient (1.) plus the GAN generator loss (3.) on G(x_in; sigma_k).
    -> (generated samples x [B, 2], detached, for the fake score's turn; log). dm_objective(x [B, 2]) -> loss, if
    given, stands in for the DM gradient's loss (the neighbours notebook's other objectives)."""
    log = {}
    t.fake_score.requires_grad_(False), t.gan_head.requires_grad_(False)     # the GAN gradient flows into G only
    with t.autocast():
        x = t.G(x_in, sigma_k).float()                               # [B, 2]
        loss_G = torch.zeros((), device=x.device)
        if cfg.dm:
            loss_dm = (loss_distribution_matching(x, D_real, t.fake_score, t.sigma_grid, *t.dm_range)[0]
                       if dm_objective is None else dm_objective(x))
            loss_G = loss_G + loss_dm
            log["loss_dm"] = loss_dm.item()
        if cfg.gen_gan_weight > 0:
            loss_gan = loss_gan_generator(gan_logits(t.fake_score, t.gan_head, x, t.sigma_grid))
            loss_G = loss_G + cfg.gen_gan_weight * loss_gan
            log["loss_g_gan"] = loss_gan.item()
    optimiser_step(t.opt_G, loss_G, t.G.parameters(), t.scaler, cfg.max_grad_norm)
    t.fake_score.requires_grad_(True), t.gan_head.requires_grad_(True)
    return x.detach(), log


def fake_score_turn(cfg, t, x_fake, x_real):
    """One fake-score update: denoising loss on the generator's detached samples x_fake [B, 2] (2.), plus
    the GAN head's loss on the same forward's features of noised fake and real samples x_real [B, 2] (3.), at that
    forward's sigma (fake_score_sigmas)."""
    with t.autocast():
        loss_fake, h_fake, h_real = loss_fake_score(t.fake_score, x_fake, t.sigma_grid, x_real,
                                                    cfg.fake_score_lognormal)
        loss = loss_fake
        log = {"loss_fake": loss_fake.item()}
        if cfg.fake_gan_weight > 0:
            loss_d = loss_gan_discriminator(t.gan_head(h_real).float(), t.gan_head(h_fake).float())
            loss = loss + cfg.fake_gan_weight * loss_d
            log["loss_d_gan"] = loss_d.item()
    params = [*t.fake_score.parameters(), *t.gan_head.parameters()]
    optimiser_step(t.opt_fake, loss, params, t.scaler, cfg.max_grad_norm)
    return log


def distill(cfg, mix, teacher, D_real, sigmas, device, progress=True, callback=None, position=0):
    """DMD2 (paper Algorithm 1): returns the trained generator (the EMA of its weights, --ema_span) and a history
    of losses and quick metrics.

    sigmas: the student's fixed noise levels; [s] is the one-step generator G(s z; s) (paper: s = sigma_max).
    D_real: the real score (the teacher, or the exact denoiser). callback(it, G, fake_score, gan_head, log), if
    given (G: the generator being trained, not its EMA), runs after every iteration (the DM-field picture and the
    notebook's figures use it).
    position: the row of its progress bar (students trained side by side each get one).
    The options are the student's own (student_config): --total_steps, or more for the 1-step student, and the K-step
    student's batches, fake-score rate and EMA span.
    """
    cfg = student_config(cfg, len(sigmas))
    t = make_trainables(cfg, teacher, device, len(sigmas))
    steps = cfg.total_steps
    decay = (lambda it: 0.5 * (1 + math.cos(math.pi * it / steps))) if cfg.lr_decay else (lambda it: 1.0)
    gen_batch = cfg.generator_batch_size or cfg.batch_size
    ema = ema_decay(cfg)
    eval_real = sample_mixture(mix, 2000)
    history = []
    bar = tqdm(range(steps), desc=f"DMD2 {len(sigmas)}-step", disable=not progress, leave=False,
               position=position)
    for it in bar:
        t.opt_G.param_groups[0]["lr"] = cfg.generator_lr * decay(it)
        t.opt_fake.param_groups[0]["lr"] = cfg.fake_score_lr * decay(it)
        k = int(torch.randint(0, len(sigmas), ()))              # one step of the K-step chain per batch
        t.fake_score.step = t.gan_head.step = k      # used only with --fake_score_knows_step, --gan_head_per_step
        gen_turn = it % cfg.dfake_gen_update_ratio == 0          # TTUR (2.): the generator's turn is rarer
        n = gen_batch if gen_turn else cfg.batch_size
        x_in = generator_input(cfg, mix, t.G, torch.randn(n, 2, device=device), sigmas, k)
        log = {"iter": it}
        if gen_turn:
            x_fake, gen_log = generator_turn(cfg, t, D_real, x_in, sigmas[k])
            update_ema(t.G_ema, t.G, ema)
            x_fake = x_fake[:cfg.batch_size]                     # the fake score's turn keeps its batch size
            log.update(gen_log)
        else:
            with torch.no_grad(), t.autocast():
                x_fake = t.G(x_in, sigmas[k]).float()
        x_real = sample_mixture(mix, cfg.batch_size).to(device) if cfg.fake_gan_weight > 0 else None
        log.update(fake_score_turn(cfg, t, x_fake, x_real))
        if not all(math.isfinite(v) for v in log.values()):
            raise FloatingPointError(f"non-finite loss at iteration {it}: {log}")
        if it % cfg.eval_every == 0 or it == steps - 1:
            with torch.no_grad():
                x = generate(t.G_ema, torch.randn(2000, 2, device=device), sigmas).cpu()
                log["energy"] = energy_distance(x, eval_real)
        history.append(log)
        if callback is not None:
            callback(it, t.G, t.fake_score, t.gan_head, log)
    return t.G_ema.eval().requires_grad_(False), history


def dm_field_recorder(at, D_real, sigmas, cfg, mix, n=1000):
    """A distill() callback that records, once, at iteration `at`, where the DM gradient pushes samples over
    the plane (dm_field) and n generator samples. -> (record dict, filled in at `at`; callback). It runs in
    a forked RNG, so recording leaves the training run's random numbers, and so its result, unchanged."""
    record = {}

    def callback(it, G, fake_score, gan_head, log):
        if it != at:
            return
        device = next(G.parameters()).device
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            grid = sigma_grid(1000, cfg.sigma_min, cfg.sigma_max, cfg.rho).to(device)
            samples = generate(G, torch.randn(n, 2, device=device), sigmas)
            record.update(dm_field(D_real, fake_score, grid, *dm_index_range(cfg), samples, mix), iter=it)
    return record, callback


# ----------------------------------------------------------------------------------------------
# Evaluation: exact metrics against the known mixture.


def mean_distance(a, b=None, chunk=2048):
    """E|A - B| over all pairs of rows of a [n, 2] and b [m, 2], in float64, a chunk of rows at a time.
    b=None: E|A - A'| over all n^2 ordered pairs of a (self_distances)."""
    if b is None:
        return self_distances(a, chunk)[0]
    a = a.double()
    total = sum(float(torch.cdist(a[i:i + chunk], b.double()).sum()) for i in range(0, len(a), chunk))
    return total / (len(a) * len(b))


def self_distances(x, chunk=2048):
    """One pass over the distances of x [n, 2] to itself -> (E|X - X'| over all n^2 ordered pairs, the distance
    from each sample to its nearest other sample [n]): the energy distance and nn_entropy share it. The matrix
    is symmetric, so only the blocks on and right of the diagonal are computed; those right of it count twice,
    and give the nearest neighbours of both their rows and their columns."""
    x = x.double()
    n = len(x)
    total = 0.0
    nearest = torch.full((n,), float("inf"), dtype=torch.float64)
    for i in range(0, n, chunk):
        d = torch.cdist(x[i:i + chunk], x[i:])                                  # [c, n - i]
        c = len(d)
        total += float(d[:, :c].sum()) + 2 * float(d[:, c:].sum())
        d[torch.arange(c), torch.arange(c)] = float("inf")                     # not itself
        nearest[i:i + c] = torch.minimum(nearest[i:i + c], d.min(1).values)
        if c < d.shape[1]:
            nearest[i + c:] = torch.minimum(nearest[i + c:], d[:, c:].min(0).values)
    return total / n**2, nearest


def energy_distance(x, y, yy=None, xx=None):
    """2 E|X-Y| - E|X-X'| - E|Y-Y'| (Szekely): zero iff the distributions match; no bandwidth to pick.
    yy, xx: E|Y-Y'|, E|X-X'| if already known (the reference set is shared by every row of the table)."""
    return 2 * mean_distance(x, y) - (mean_distance(x) if xx is None else xx) - (mean_distance(y) if yy is None else yy)


def mean_distance_to_gaussian(d, s):
    """E|d + s Z| for Z ~ N(0, I_2): the mean of a Rice distribution, s sqrt(pi/2) L_1/2(-d^2 / 2s^2), written with
    exponentially scaled Bessel functions (no overflow far from the mode). d, s: broadcastable float64 tensors."""
    a = d**2 / (4 * s**2)
    return s * math.sqrt(math.pi / 2) * ((1 + 2 * a) * torch.special.i0e(a) + 2 * a * torch.special.i1e(a))


def mode_distances(mix):
    """M [K, K]: E|Y_j - Y_k| for independent Y_j, Y_k drawn from modes j and k (Y_j - Y_k ~ N(mu_j - mu_k,
    (s_j^2 + s_k^2) I)). E|Y - Y'| of the mixture is w^T M w."""
    mu, s2 = mix.means.double(), mix.stds.double() ** 2
    return mean_distance_to_gaussian(torch.cdist(mu, mu), (s2[:, None] + s2[None]).sqrt())


def energy_to_mixture(mix, x, xx, M=None):
    """The energy distance of samples x [N, 2] to the mixture itself, with no reference sample:
    2 E|X - Y| - E|X - X'| - E|Y - Y'|, Y ~ p0 in closed form (mean_distance_to_gaussian), E|X - X'| over the N(N-1)
    pairs of distinct samples (xx: the mean over all N^2 ordered pairs, diagonal included, as self_distances gives).
    It is unbiased: exact samples score 0 on average, with noise of about 1.5e-4 at N = 10,000; energy_distance to
    fresh data has that noise twice, and a positive bias (E|X-X'| + E|Y-Y'|)/N from its diagonals (5e-4 there).
    M: mode_distances(mix) if already known."""
    w, mu, s = mix.weights.double(), mix.means.double(), mix.stds.double()
    xy = float((mean_distance_to_gaussian(torch.cdist(x.double(), mu), s) * w).sum(1).mean())     # E|X - Y|
    n = len(x)
    M = mode_distances(mix) if M is None else M                                                  # [K, K]
    return 2 * xy - xx * n / (n - 1) - float(w @ M @ w)


def mode_shape_kl(mix, x, assign, min_count=10):
    """Per-mode shape: fit a Gaussian (mean, full covariance) to the samples each mode receives and take
    KL(fit || true mode) = 0.5 (tr(S)/s^2 + |m - mu|^2/s^2 - 2 + 2 ln s^2 - ln det S)   (2-D, true cov s^2 I).
    x [N, 2], assign [N] (mode index of each sample) -> [K] in nats; a mode with fewer than min_count
    samples has no shape to fit and gets +inf. Assigning by the most likely mode cuts each mode's tails
    a little, so even exact data samples sit slightly above 0 (the data row is the floor)."""
    x = x.double()
    kl = torch.full((len(mix.weights),), float("inf"), dtype=torch.float64)
    for k in range(len(mix.weights)):
        xs = x[assign == k]                                                                  # [n_k, 2]
        if len(xs) < min_count:
            continue
        m, S = xs.mean(0), torch.cov(xs.T)                                                   # [2], [2, 2]
        s2, mu = float(mix.stds[k]) ** 2, mix.means[k].double()
        kl[k] = 0.5 * (torch.trace(S) / s2 + ((m - mu) ** 2).sum() / s2 - 2 + 2 * math.log(s2) - torch.logdet(S))
    return kl


def nn_entropy(x, nearest=None):
    """Kozachenko-Leonenko entropy estimate in nats (Kozachenko & Leonenko 1987), 2-D, first neighbour:
    H = psi(N) - psi(1) + ln(pi) + (2/N) sum_i ln r_i, r_i the distance from x_i to its nearest other sample.
    x [N, 2] -> float; nearest: the r_i [N] if already known (self_distances). Samples piled on curves have
    tiny r_i, so a low entropy."""
    r = self_distances(x)[1] if nearest is None else nearest
    psi = torch.special.digamma(torch.tensor([float(len(r)), 1.0], dtype=torch.float64))
    return float(psi[0] - psi[1] + math.log(math.pi) + 2 * r.clamp_min(1e-300).log().mean())


def nearest_mode(mix, x):
    """The component most likely to have made each sample, and log pi_k N(x; mu_k, s_k^2 I). x [N, 2] -> [N], [N, K]."""
    log_comp = torch.log(mix.weights) - torch.log(2 * math.pi * mix.stds**2) - \
        ((x[:, None] - mix.means[None]) ** 2).sum(-1) / (2 * mix.stds**2)                  # [N, K]
    return log_comp.argmax(1), log_comp


def mode_shares(mix, assign):
    """The share of the samples each mode receives [K], from each sample's nearest mode assign [N]."""
    return torch.bincount(assign, minlength=len(mix.weights)).float() / len(assign)


def weight_part(mix, found, M):
    """energy_exact_weights: the energy distance between the true mixture and the same modes re-weighted with the
    shares found [K] (mode_shares). For two mixtures of the same modes it is -delta^T M delta, delta = found - w, with
    M = mode_distances(mix): the part of the exact energy distance that the mode weights alone make."""
    delta = found.double() - mix.weights.double()                                            # [K]
    return float(-delta @ M @ delta)


@torch.no_grad()
def per_step_metrics(mix, G, z, sigmas):
    """Of the x0 each step of the K-step chain predicts, z [N, 2]: mode_shape_kl (mean over modes) and the mode-weight
    part of the exact energy distance (energy_exact_weights) -> two lists of K floats. They show which step gives the
    outputs the data's shapes, and which step's cuts between neighbouring modes move their weights (README)."""
    M = mode_distances(mix)                                                                  # [K, K]
    shapes, weights = [], []
    for k, sigma in enumerate(sigmas):
        x0 = G(backward_simulation(G, z, sigmas, k), sigma).float().cpu()
        assign = nearest_mode(mix, x0)[0]
        shapes.append(float(mode_shape_kl(mix, x0, assign).mean()))
        weights.append(weight_part(mix, mode_shares(mix, assign), M))
    return shapes, weights


def evaluate(mix, x, reference, reference_self=None):
    """Metrics of samples x [N, 2] against the mixture, and an energy distance to fresh data `reference`
    (reference_self: mean_distance(reference), to compute it once for many rows)."""
    x = x.float().cpu()
    assign, log_comp = nearest_mode(mix, x)                                                  # [N], [N, K]
    found = mode_shares(mix, assign)                                                         # [K]
    shape = mode_shape_kl(mix, x, assign)                                                    # [K]
    log_likelihood = float(torch.logsumexp(log_comp, 1).mean())                           # mean log p0(x)
    xx, nearest = self_distances(x)                                                          # float, [N]
    M = mode_distances(mix)                                                                  # [K, K]
    return {
        "log_likelihood": log_likelihood,
        "modes_covered": int((found >= 0.5 * mix.weights).sum()),  # a mode counts at half its expected share
        "num_modes": len(mix.weights),
        "weight_tv": float(0.5 * (found - mix.weights).abs().sum()),  # total variation of mode weights
        "mode_shape_kl": float(shape.mean()),                      # mean over modes of KL(Gaussian fit || mode)
        "mode_shape_kl_worst": float(shape.max()),                 # the worst single mode
        "energy_distance": energy_distance(x, reference, reference_self, xx),
        # The same distance to the mixture in closed form (no reference sample, unbiased), and the part of it that
        # the mode weights alone make: the mixture re-weighted with the shares `found`, against the true one.
        "energy_exact": energy_to_mixture(mix, x, xx, M),
        "energy_exact_weights": weight_part(mix, found, M),
        # KL(samples || data) = -H(samples) - E log p0(samples): the entropy by nn_entropy, the rest exact. It is
        # the one metric here that sees samples folded onto curves; exact samples score 0 +- 0.03 (its noise).
        "reverse_kl": -nn_entropy(x, nearest) - log_likelihood,
    }


@torch.no_grad()
def energy_ratio_redraws(cfg, mix, teacher, students, draws, device):
    """How much of the energy bar (a student's energy distance <= 2x the teacher's) is the luck of the draw: the
    ratio again for `draws` fresh evaluations, each with new reference, data, teacher and student samples from the
    same networks. students: {name: (G, sigmas)} -> {"data", "teacher" and each name: {"energy_ratio_redraws":
    [ratio per draw], "energy_redraws": [energy distance per draw], "energy_exact_redraws": [energy_to_mixture per
    draw]}}. The "data" ratios are what exact samples score against the teacher, the "teacher" ratios what a second
    sample of the teacher itself scores: a student as good as its teacher fails the bar as often. The teacher's
    distances are those of its first sample, which each ratio divides by; its second sample's are
    "energy_again_redraws" and "energy_exact_again_redraws". That second sample's noise comes from a generator of
    its own (seeded by --seed), so the other draws are those of a run without it."""
    n = cfg.num_eval
    M = mode_distances(mix)                                                                  # [K, K]
    out = {name: {"energy_ratio_redraws": [], "energy_redraws": [], "energy_exact_redraws": []}
           for name in ("data", "teacher", *students)}
    out["teacher"].update(energy_again_redraws=[], energy_exact_again_redraws=[])
    again = torch.Generator(device).manual_seed(cfg.seed + 3)

    def distances(x, ref, ref_self):     # x [n, 2] -> (energy distance to ref, to the mixture itself)
        xx = self_distances(x)[0]
        return energy_distance(x, ref, ref_self, xx), energy_to_mixture(mix, x, xx, M)

    def sample_teacher(z):                                                                   # [n, 2] -> [n, 2]
        return heun_sampler(teacher, z, cfg.heun_steps, cfg.sigma_min, cfg.sigma_max, cfg.rho).cpu()
    for _ in range(draws):
        ref = sample_mixture(mix, n)                                                         # [n, 2]
        ref_self = mean_distance(ref)
        e_teacher, exact_teacher = distances(sample_teacher(torch.randn(n, 2, device=device)), ref, ref_self)
        rows = {"data": sample_mixture(mix, n)}                                             # [n, 2]
        x_again = sample_teacher(torch.randn(n, 2, device=device, generator=again))         # [n, 2]
        e_again, exact_again = distances(x_again, ref, ref_self)
        for key, value in (("energy_ratio_redraws", e_again / e_teacher), ("energy_redraws", e_teacher),
                           ("energy_exact_redraws", exact_teacher), ("energy_again_redraws", e_again),
                           ("energy_exact_again_redraws", exact_again)):
            out["teacher"][key].append(value)
        for name, (G, sigmas) in students.items():
            rows[name] = generate(G, torch.randn(n, 2, device=device), sigmas).cpu()         # [n, 2]
        for name, x in rows.items():
            e, exact = distances(x, ref, ref_self)
            out[name]["energy_ratio_redraws"].append(e / e_teacher)
            out[name]["energy_redraws"].append(e)
            out[name]["energy_exact_redraws"].append(exact)
    return out


def redraws_summary(metrics):
    """The energy bar over a run's fresh draws (energy_ratio_redraws) -> {row: {"median", "lowest", "highest",
    "above_2", "draws": of its ratios per draw; "mean_ratio": its mean energy distance over the draws / the
    teacher's, the bar on the expected distance of num_eval samples, with 1/sqrt(draws) of one draw's noise (a ratio
    of means: a mean of ratios would weigh the draws where the teacher is lucky most); "mean_exact": its mean exact
    energy distance (energy_to_mixture)}} for the rows "data", "teacher again" (the teacher's second sample) and the
    students, and {"mean_energy", "mean_exact"} for "teacher" (its first sample, the ratios' denominators)."""
    t = metrics["teacher"]
    if "energy_redraws" not in t:
        return {}
    lists = {"data": metrics["data"],
             "teacher again": {"energy_ratio_redraws": t["energy_ratio_redraws"],
                               "energy_redraws": t["energy_again_redraws"],
                               "energy_exact_redraws": t["energy_exact_again_redraws"]},
             **{name: m for name, m in metrics.items() if name not in ("data", "teacher") and "energy_redraws" in m}}
    mean_teacher = float(np.mean(t["energy_redraws"]))
    summary = {"teacher": {"mean_energy": mean_teacher, "mean_exact": float(np.mean(t["energy_exact_redraws"]))}}
    for name, m in lists.items():
        r = m["energy_ratio_redraws"]
        summary[name] = {"median": float(np.median(r)), "lowest": min(r), "highest": max(r), "draws": len(r),
                         "above_2": sum(v > 2 for v in r),
                         "mean_ratio": float(np.mean(m["energy_redraws"])) / mean_teacher,
                         "mean_exact": float(np.mean(m["energy_exact_redraws"]))}
    return summary


def redraws_lines(summary):
    """redraws_summary as printed lines of text."""
    if not summary:
        return []
    summary = dict(summary)
    t = summary.pop("teacher")
    draws = summary["data"]["draws"]
    lines = [f"teacher: over {draws} fresh draws, a mean energy distance of {t['mean_energy']:.5f} and a mean exact "
             f"one of {1e4 * t['mean_exact']:.2f}e-4"]
    for name, s in summary.items():
        label = {"data": "data (fresh samples)", "teacher again": "teacher (another sample)"}.get(name, name)
        lines.append(f"{label}: energy distance / teacher's over {draws} fresh draws: median {s['median']:.2f}, "
                     f"range {s['lowest']:.2f}-{s['highest']:.2f}, above 2 in {s['above_2']}; mean / teacher's "
                     f"mean {s['mean_ratio']:.2f}; mean exact {1e4 * s['mean_exact']:.2f}e-4")
    return lines


@torch.no_grad()
def dm_field(D_real, fake_score, sigma_grid, min_idx, max_idx, samples, mix, n=21, draws=64):
    """The DM update direction -grad = (x0_real - x0_fake) / mean|x - x0_real|, averaged over sigma and
    noise, on an n x n grid of points covering the data: where DMD2 pushes a sample at each place."""
    lim = float(mix.means.abs().max()) + 1.0
    g = torch.linspace(-lim, lim, n, device=sigma_grid.device)
    pts = torch.stack(torch.meshgrid(g, g, indexing="xy"), -1).reshape(-1, 2)               # [n*n, 2]
    x = pts.repeat(draws, 1)                                                                 # [draws*n*n, 2]
    _, grad = loss_distribution_matching(x, D_real, fake_score, sigma_grid, min_idx, max_idx)
    return {"points": pts.cpu(), "direction": -grad.reshape(draws, -1, 2).mean(0).cpu(), "samples": samples.cpu()}


# ----------------------------------------------------------------------------------------------
# Pictures, drawn with Pillow (no plotting library needed).

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def density_image(mix, size, lim):
    """Grey background: the true density, so dropped or shifted modes stand out."""
    g = torch.linspace(-lim, lim, size)
    yy, xx = torch.meshgrid(-g, g, indexing="ij")
    logp = mixture_log_prob(mix, torch.stack([xx, yy], -1).reshape(-1, 2)).reshape(size, size)
    shade = (255 - 110 * torch.exp(logp - logp.max()).sqrt()).byte().numpy()
    return Image.fromarray(shade, "L").convert("RGB")


def to_px(p, lim, size):
    return ((p[..., 0] + lim) / (2 * lim) * (size - 1), (lim - p[..., 1]) / (2 * lim) * (size - 1))


def scatter_panel(mix, x, title, lim, size=320, color=(31, 119, 180), max_points=4000):
    img = density_image(mix, size, lim)
    draw = ImageDraw.Draw(img)
    px, py = to_px(x[:max_points].float(), lim, size)
    for a, b in zip(px.tolist(), py.tolist()):
        draw.point((a, b), fill=color)
    draw.text((6, 4), title, fill=(0, 0, 0))
    return img


def save_samples_figure(path, mix, rows, lim):
    """Data, teacher, 1-step and K-step samples side by side."""
    panels = [scatter_panel(mix, x, name, lim, color=PALETTE[i % 6]) for i, (name, x) in enumerate(rows.items())]
    fig = Image.new("RGB", (sum(p.width for p in panels) + 4 * (len(panels) - 1), panels[0].height), "white")
    for i, p in enumerate(panels):
        fig.paste(p, (i * (p.width + 4), 0))
    fig.save(path)


def field_panel(mix, points, vectors, samples, title, lim, size=480):
    """Arrows `vectors` [P, 2] drawn at `points` [P, 2] over the density; dots: `samples`."""
    img = scatter_panel(mix, samples, title, lim, size, color=(214, 39, 40), max_points=1000)
    draw = ImageDraw.Draw(img)
    scale = 0.6 * (2 * lim / 20) / max(float(vectors.norm(dim=1).max()), 1e-8)   # longest arrow ~ 0.6 cells
    for p, v in zip(points, vectors * scale):
        (x0, y0), (x1, y1) = [tuple(float(c) for c in to_px(q, lim, size)) for q in (p, p + v)]
        draw.line((x0, y0, x1, y1), fill=(0, 0, 0), width=1)
        ang = math.atan2(y1 - y0, x1 - x0)
        for s in (2.6, -2.6):                                         # two barbs, 30 degrees off the shaft
            draw.line((x1, y1, x1 + 4 * math.cos(ang + s), y1 + 4 * math.sin(ang + s)), fill=(0, 0, 0))
    return img


def line_panel(series, title, size=(360, 220), log_y=False):
    """A tiny line plot: series = {name: (xs, ys)}; y on a log scale when log_y."""
    w, h = size
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = 46, 18, w - 8, h - 18
    draw.rectangle((left, top, right, bottom), outline=(0, 0, 0))
    tf = (lambda v: math.log10(max(v, 1e-12))) if log_y else (lambda v: v)
    ok = (lambda v: math.isfinite(v) and v > 0) if log_y else math.isfinite
    ys = [tf(v) for _, (_, vs) in series.items() for v in vs if ok(v)]
    xs = [v for _, (us, _) in series.items() for v in us]
    if not ys:
        return img
    y0, y1 = min(ys), max(ys) + 1e-12
    x0, x1 = min(xs), max(xs) + 1e-12
    for i, (name, (us, vs)) in enumerate(series.items()):
        pts = [(left + (u - x0) / (x1 - x0) * (right - left), bottom - (tf(v) - y0) / (y1 - y0) * (bottom - top))
               for u, v in zip(us, vs) if ok(v)]
        if len(pts) > 1:
            draw.line(pts, fill=PALETTE[i % 6], width=1)
        draw.text((left + 6, top + 4 + 12 * i), name, fill=PALETTE[i % 6])
    fmt = (lambda v: f"1e{v:.1f}") if log_y else (lambda v: f"{v:.3g}")
    draw.text((2, top - 2), fmt(y1), fill=(0, 0, 0))
    draw.text((2, bottom - 10), fmt(y0), fill=(0, 0, 0))
    draw.text((left, bottom + 3), f"{title}  (iteration {x0:.0f}..{x1:.0f})", fill=(0, 0, 0))
    return img


def save_curves_figure(path, histories):
    """Training curves of each distillation run: losses, and energy distance to data on 2,000 samples."""
    rows = []
    for name, hist in histories.items():
        def col(key):
            pts = [(h["iter"], h[key]) for h in hist if key in h]
            return ([p[0] for p in pts], [p[1] for p in pts])
        losses = {k: col(k) for k in ("loss_dm", "loss_fake", "loss_g_gan", "loss_d_gan") if col(k)[0]}
        panels = [line_panel(losses, f"{name}: losses", log_y=True),
                  line_panel({"energy": col("energy")}, f"{name}: energy distance", log_y=True)]
        rows.append(panels)
    fig = Image.new("RGB", (2 * 364, 224 * len(rows)), "white")
    for r, panels in enumerate(rows):
        for c, p in enumerate(panels):
            fig.paste(p, (c * 364, r * 224))
    fig.save(path)


# ----------------------------------------------------------------------------------------------
# Main run and ablation.


def rng_snapshot(device):
    """-> a function that puts torch's random state (CPU, and CUDA's on a GPU) back to where it is now. run() draws
    its evaluation noise in one fixed order, while some of it is used only once a student is done."""
    cpu = torch.get_rng_state()
    gpu = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def restore():
        torch.set_rng_state(cpu)
        if gpu is not None:
            torch.cuda.set_rng_state(gpu, device)
    return restore


def run(cfg):
    """Teacher, then the 1-step and K-step students, then exact metrics and pictures. Returns metrics."""
    device = setup(cfg)
    start = time.time()
    mix = make_mixture(cfg.dataset)
    pool, teacher = start_run(cfg, mix, device)
    one = [cfg.one_step_sigma]
    many = parse_sigmas(cfg.kstep_sigmas)
    n = cfg.num_eval
    rows, metrics, z, rng, ref = {}, {}, {}, {}, {}   # samples [n, 2] per row, metrics per row, noise, RNG, reference

    def measure_meanwhile(done):           # runs while the K-step student still trains (after it, with --workers 1)
        torch.manual_seed(cfg.seed + 1)    # evaluation noise: the same whichever way the students were trained
        rows["data"] = sample_mixture(mix, n)                                                # [n, 2]
        z.update({name: torch.randn(n, 2, device=device) for name in ("teacher", "one", "many")})   # [n, 2] each
        rng["chain"] = rng_snapshot(device)            # the K-step chain's fresh noise: drawn from here once G_K is
        for _ in many[1:]:                             # done; skipped now, so that what follows is drawn as it
            torch.randn(n, 2, device=device)           # would be after the chain
        ref["x"] = sample_mixture(mix, n)              # fresh data: the "data" row's distance is the noise floor
        z["steps"] = torch.randn(n, 2, device=device)
        rng["after"] = rng_snapshot(device)
        with torch.no_grad():
            rows["teacher"] = heun_sampler(teacher, z["teacher"], cfg.heun_steps, cfg.sigma_min, cfg.sigma_max,
                                           cfg.rho).cpu()
        ref["self"] = mean_distance(ref["x"])          # E|Y - Y'|, shared by every row
        for name in ("data", "teacher"):
            metrics[name] = evaluate(mix, rows[name], ref["x"], ref["self"])
        if 0 in done:                      # the 1-step student, usually done first: its row draws no noise
            measure_one_step(done[0][0])

    def measure_one_step(G1):
        with torch.no_grad():
            rows["student_1step"] = generate(G1, z["one"], one).cpu()
        metrics["student_1step"] = evaluate(mix, rows["student_1step"], ref["x"], ref["self"])

    K = f"student_{cfg.ksteps}step"                  # the K-step student's row
    (G1, hist1, field), (GK, histK, _) = train_students(cfg, mix, teacher, device, [
        dict(sigmas=one, seed=student_seed(cfg.seed, 1), record_field_at=student_config(cfg, 1).total_steps // 10),
        dict(sigmas=many, seed=student_seed(cfg.seed, cfg.ksteps))], pool, measure_meanwhile)
    if "student_1step" not in rows:
        measure_one_step(G1)
    with torch.no_grad():
        rng["chain"]()
        rows[K] = generate(GK, z["many"], many).cpu()
    rng["after"]()
    metrics[K] = evaluate(mix, rows[K], ref["x"], ref["self"])
    for name, nfe in (("teacher", 2 * cfg.heun_steps - 1), ("student_1step", 1), (K, cfg.ksteps)):
        metrics[name]["nfe"] = nfe
    shapes, weights = per_step_metrics(mix, GK, z["steps"], many)
    metrics[K]["mode_shape_kl_per_step"] = shapes
    metrics[K]["energy_exact_weights_per_step"] = weights
    if cfg.eval_redraws:                   # after everything else, so that the rest of the run is unchanged
        torch.manual_seed(cfg.seed + 2)
        students = {"student_1step": (G1, one), K: (GK, many)}
        for name, lists in energy_ratio_redraws(cfg, mix, teacher, students, cfg.eval_redraws, device).items():
            metrics[name].update(lists)
    config = {**asdict(cfg), "teacher_lr": teacher_lr(cfg)}      # the rate used, not 0 ("the dataset's own")
    result = {"metrics": metrics, "wall_time_s": round(time.time() - start, 2), "config": config}
    save_outputs(cfg, mix, rows, field, {"1-step": hist1, f"{cfg.ksteps}-step": histK}, result)
    return result


def start_run(cfg, mix, device):
    """The student workers, which start up while the teacher trains, and the trained teacher -> (pool, teacher)."""
    pool = student_pool(cfg, device, 2)
    try:
        return pool, train_teacher(cfg, mix, device, not cfg.quiet)
    except BaseException:                           # Ctrl-C or an error: do not leave the workers behind
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        raise


def save_outputs(cfg, mix, rows, field, histories, result):
    """samples.npz, samples.png, dm_field.png (if the DM field was recorded), curves.png and metrics.json."""
    os.makedirs(cfg.outdir, exist_ok=True)
    np.savez(os.path.join(cfg.outdir, "samples.npz"), means=mix.means.numpy(), stds=mix.stds.numpy(),
             weights=mix.weights.numpy(), **{k: v.float().numpy() for k, v in rows.items()})
    lim = float(mix.means.abs().max()) + 1.0
    save_samples_figure(os.path.join(cfg.outdir, "samples.png"), mix, rows, lim)
    if field is not None:
        field_panel(mix, field["points"], field["direction"], field["samples"],
                    f"DM direction -grad over the plane, iteration {field['iter']}", lim).save(
                        os.path.join(cfg.outdir, "dm_field.png"))
    save_curves_figure(os.path.join(cfg.outdir, "curves.png"), histories)
    with open(os.path.join(cfg.outdir, "metrics.json"), "w") as f:
        json.dump(strict_json(result), f, indent=2)


def strict_json(obj):
    """obj with every inf or NaN float replaced by None, so the file is JSON that every parser reads: a shape KL is inf
    for a mode with too few samples to fit a Gaussian to (mode_shape_kl), and JSON has no infinity."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


SEED_COLUMNS = [  # (title, function of (student metrics, data metrics, teacher metrics), worst = max or min)
    ("modes", lambda m, d, t: m["modes_covered"], min),
    ("weight TV", lambda m, d, t: m["weight_tv"], max),
    ("LL gap (nats)", lambda m, d, t: abs(m["log_likelihood"] - d["log_likelihood"]), max),
    ("shape KL", lambda m, d, t: m["mode_shape_kl"], max),
    ("worst mode's shape KL", lambda m, d, t: m["mode_shape_kl_worst"], max),
    ("energy / teacher's", lambda m, d, t: m["energy_distance"] / t["energy_distance"], max),
    ("reverse KL", lambda m, d, t: m["reverse_kl"], max),
    ("exact energy (1e-4)", lambda m, d, t: 1e4 * m["energy_exact"], max),            # energy_to_mixture
    ("its mode-weight part (1e-4)", lambda m, d, t: 1e4 * m["energy_exact_weights"], max),
    ("teacher's exact energy (1e-4)", lambda m, d, t: 1e4 * t["energy_exact"], max),
]


def run_seeds(cfg):
    """The main run for seeds seed..seed+seeds-1 (each in out/seed_N), then one table: a row per seed and student,
    and the median and the worst over seeds of each column. seeds.md is rewritten after every seed. -> its text."""
    per_seed = {}
    for seed in range(cfg.seed, cfg.seed + cfg.seeds):
        c = Config(**{**asdict(cfg), "seed": seed, "outdir": os.path.join(cfg.outdir, f"seed_{seed}")})
        per_seed[seed] = run(c)["metrics"]
        text = f"Seeds {cfg.seed}..{seed} of {cfg.seed}..{cfg.seed + cfg.seeds - 1}; {options_text(cfg)}.\n\n" + \
            seeds_table(per_seed, ["student_1step", f"student_{cfg.ksteps}step"]) + "\n"
        if cfg.eval_redraws:
            text += f"\nThe energy bar on {cfg.eval_redraws} fresh draws per seed (redraws_summary).\n\n" + \
                redraws_table({s: redraws_summary(m) for s, m in per_seed.items()}) + "\n"
        with open(os.path.join(cfg.outdir, "seeds.md"), "w") as f:
            f.write(text)
    return text


def options_text(cfg):
    """The options that differ from the defaults, as flags (those that only say where and how the run goes, such as
    --outdir and --quiet, left out): a table says what made it."""
    not_results = {"seed", "seeds", "outdir", "quiet", "workers", "ablation"}   # --workers 1 or 2: the same students
    changed = [f"--{f.name} {getattr(cfg, f.name)}" for f in fields(Config)
               if f.name not in not_results and getattr(cfg, f.name) != f.default]
    return "options: " + " ".join(changed) if changed else "default options"


def seeds_table(per_seed, students):
    """per_seed: {seed: metrics of run()} -> markdown: a row per seed and student, then median and worst rows."""
    lines = ["| seed | student | " + " | ".join(t for t, _, _ in SEED_COLUMNS) + " |",
             "|---|---|" + "---|" * len(SEED_COLUMNS)]
    values = {s: [] for s in students}
    for seed, m in per_seed.items():
        for s in students:
            row = [f(m[s], m["data"], m["teacher"]) for _, f, _ in SEED_COLUMNS]
            values[s].append(row)
            lines.append(f"| {seed} | {s} | " + " | ".join(f"{v:.3g}" for v in row) + " |")
    for s in students:
        cols = list(zip(*values[s]))
        lines.append(f"| median | {s} | " + " | ".join(f"{float(np.median(c)):.3g}" for c in cols) + " |")
        lines.append(f"| worst | {s} | " + " | ".join(f"{w(c):.3g}" for c, (_, _, w) in zip(cols, SEED_COLUMNS)) + " |")
    return "\n".join(lines)


def redraws_table(per_seed):
    """per_seed: {seed: redraws_summary} -> markdown: a row per seed and sample row, then per sample row the worst
    over seeds (the highest ratio, mean ratio and mean exact distance) with its draws above 2 over all seeds."""
    lines = ["| seed | samples | energy / teacher's: median (range) | draws above 2 | mean / teacher's mean "
             "| mean exact energy (1e-4) |", "|---|---|---|---|---|---|"]
    worst = {}
    for seed, summary in per_seed.items():
        for name, s in summary.items():
            if name == "teacher":
                lines.append(f"| {seed} | teacher | - | - | - | {1e4 * s['mean_exact']:.2f} |")
                continue
            lines.append(f"| {seed} | {name} | {s['median']:.2f} ({s['lowest']:.2f}-{s['highest']:.2f}) | "
                         f"{s['above_2']} | {s['mean_ratio']:.2f} | {1e4 * s['mean_exact']:.2f} |")
            w = worst.setdefault(name, {"highest": 0.0, "mean_ratio": 0.0, "mean_exact": -math.inf,
                                        "above_2": 0, "draws": 0})
            for key in ("highest", "mean_ratio", "mean_exact"):
                w[key] = max(w[key], s[key])
            for key in ("above_2", "draws"):                  # summed over the seeds
                w[key] += s[key]
    for name, w in worst.items():
        lines.append(f"| worst | {name} | highest {w['highest']:.2f} | {w['above_2']} of {w['draws']} | "
                     f"{w['mean_ratio']:.2f} | {1e4 * w['mean_exact']:.2f} |")
    return "\n".join(lines)


def format_table(metrics):
    lines = ["| samples | NFE | log-likelihood | modes covered | weight TV | mode shape KL (mean / worst) "
             "| energy distance | reverse KL |", "|---|---|---|---|---|---|---|---|"]
    for name, m in metrics.items():
        lines.append(f"| {name} | {m.get('nfe', '-')} | {m['log_likelihood']:.3f} | "
                     f"{m['modes_covered']}/{m['num_modes']} | {m['weight_tv']:.3f} | "
                     f"{m['mode_shape_kl']:.3f} / {m['mode_shape_kl_worst']:.3f} | {m['energy_distance']:.4f} | "
                     f"{m['reverse_kl']:.3f} |")
    return "\n".join(lines)


ABLATIONS = [  # (name, overrides, K-step?)
    ("DMD2, 1-step", {}, False),
    ("without TTUR (ratio 1)", {"dfake_gen_update_ratio": 1}, False),
    ("without GAN", {"gen_gan_weight": 0.0, "fake_gan_weight": 0.0}, False),
    ("GAN only (no DM)", {"dm": False}, False),
    ("DMD2, {K}-step", {}, True),                       # K: --ksteps
    ("{K}-step without backward simulation", {"backward_simulation": False}, True),
]


def ablation_rows(cfg):
    """ABLATIONS with the K-step rows named after --ksteps."""
    return [(name.format(K=cfg.ksteps), over, multi) for name, over, multi in ABLATIONS]


def run_ablation(cfg):
    """The paper's ablations (DMD2 Table 3 and Table 4) at toy scale, averaged over seeds.

    Every row of a student keeps the same number of generator updates (the 1-step rows --one_step_steps_ratio times
    the K-step rows'), so "without TTUR" trains the fake score dfake_gen_update_ratio times less, which is exactly
    what the rule is about.
    """
    device = setup(cfg)
    mix = make_mixture(cfg.dataset)
    gen_updates = cfg.total_steps // cfg.dfake_gen_update_ratio
    results = {}
    for seed in range(cfg.seed, cfg.seed + cfg.ablation_seeds):
        torch.manual_seed(seed)
        teacher = train_teacher(cfg, mix, device, not cfg.quiet)
        reference = sample_mixture(mix, cfg.num_eval)
        reference_self = mean_distance(reference)
        jobs = []
        for row, (name, over, multi) in enumerate(ablation_rows(cfg)):
            c = Config(**{**asdict(cfg), **over})
            c.total_steps = gen_updates * c.dfake_gen_update_ratio
            sig = parse_sigmas(c.kstep_sigmas) if multi else [c.one_step_sigma]
            jobs.append(dict(cfg=c, sigmas=sig, seed=student_seed(seed, len(sig), row + 1)))
        for (name, _, _), job, (G, _, _) in zip(ablation_rows(cfg), jobs, train_students(cfg, mix, teacher, device,
                                                                                         jobs)):
            with torch.no_grad():
                x = generate(G, torch.randn(cfg.num_eval, 2, device=device), job["sigmas"])
            results.setdefault(name, []).append(evaluate(mix, x, reference, reference_self))
            results.setdefault((name, "samples"), x.cpu())
    summary, table = ablation_summary(results)
    os.makedirs(cfg.outdir, exist_ok=True)
    one_step_updates = student_config(cfg, 1).total_steps // cfg.dfake_gen_update_ratio
    text = (f"Ablation on '{cfg.dataset}', real score '{cfg.real_score}', {one_step_updates} generator updates per "
            f"1-step run and {gen_updates} per {cfg.ksteps}-step run, mean ± std over {cfg.ablation_seeds} seeds, "
            f"{cfg.num_eval} samples each.\n\n" + table + "\n")
    with open(os.path.join(cfg.outdir, "ablation.md"), "w") as f:
        f.write(text)
    with open(os.path.join(cfg.outdir, "ablation.json"), "w") as f:
        json.dump(strict_json(summary), f, indent=2)
    lim = float(mix.means.abs().max()) + 1.0
    save_samples_figure(os.path.join(cfg.outdir, "ablation.png"), mix,
                        {name: results[(name, "samples")] for name, _, _ in ablation_rows(cfg)}, lim)
    return summary, text


ABLATION_COLUMNS = [("log-likelihood", "log_likelihood", ".3f"), ("weight TV", "weight_tv", ".3f"),
                    ("mode shape KL", "mode_shape_kl", ".3f"), ("energy distance", "energy_distance", ".4f"),
                    ("reverse KL", "reverse_kl", ".3f")]


def ablation_summary(results):
    """results: {row name: [evaluate() per seed]} -> (mean, std and per-seed metrics per row; markdown table)."""
    table = ["| run | modes covered | " + " | ".join(t for t, _, _ in ABLATION_COLUMNS) + " |",
             "|---|---|" + "---|" * len(ABLATION_COLUMNS)]
    summary = {}
    for name in [k for k in results if isinstance(k, str)]:       # the rows in the order they ran
        ms = results[name]
        keys = ["modes_covered"] + [k for _, k, _ in ABLATION_COLUMNS]
        with np.errstate(invalid="ignore"):        # a mode with no samples has shape KL inf: std nan, said so
            agg = {k: (float(np.mean([m[k] for m in ms])), float(np.std([m[k] for m in ms]))) for k in keys}
        summary[name] = {"mean": {k: v[0] for k, v in agg.items()}, "std": {k: v[1] for k, v in agg.items()},
                         "per_seed": ms}
        cells = [f"{agg[k][0]:{f}} ± {agg[k][1]:{f}}" for _, k, f in ABLATION_COLUMNS]
        table.append(f"| {name} | {agg['modes_covered'][0]:.1f}/{ms[0]['num_modes']} | " + " | ".join(cells) + " |")
    return summary, "\n".join(table)


# ----------------------------------------------------------------------------------------------
# Run plumbing and the command line: student workers, devices, option checks, flags.


def student_seed(seed, ksteps, row=0):
    """The torch seed of one distillation run: one for each run seed, student (its steps) and ablation row."""
    return 1_000_003 * seed + 1000 * row + ksteps


def student_job(cfg, mix, teacher_state, sigmas, seed, record_field_at=None, position=0, progress=True):
    """One distill() run from plain, picklable inputs (so it can run in a worker process).
    -> (generator state_dict, history, DM field or None)."""
    device = pick_device(cfg)
    torch.manual_seed(seed)
    teacher = make_denoiser(cfg, mix).to(device)
    teacher.load_state_dict(teacher_state)
    teacher.eval().requires_grad_(False)
    D_real = teacher if cfg.real_score == "teacher" else ExactDenoiser(mix).to(device)
    field, callback = dm_field_recorder(record_field_at, D_real, sigmas, cfg, mix) if record_field_at else ({}, None)
    G, history = distill(cfg, mix, teacher, D_real, sigmas, device, progress, callback, position)
    return {k: v.cpu() for k, v in G.state_dict().items()}, history, field or None


def _student_job(kwargs):
    return _worker_job(student_job, **kwargs)


_IN_JOB = False                    # in a worker process: whether it is running a job (see _warm_worker)


def _worker_job(fn, *args, **kwargs):
    """fn(*args, **kwargs) in a worker, marked as a job, so that Ctrl-C interrupts it (_warm_worker)."""
    global _IN_JOB
    _IN_JOB = True
    try:
        return fn(*args, **kwargs)
    finally:
        _IN_JOB = False


def _on_ctrl_c(*_):
    """A worker's SIGINT handler. A job ends with KeyboardInterrupt, which the pool hands to the run as the job's
    result, so the run sees a KeyboardInterrupt whichever it notices first, the worker's or its own. An idle worker
    waits for the run's shutdown: exiting there, mid-read of its task queue, would print a traceback, and the run
    could see a broken pool before its own Ctrl-C."""
    if _IN_JOB:
        raise KeyboardInterrupt


def student_pool(cfg, device, num_jobs):
    """The worker processes for train_students, or None when the students train in this process (--workers 1, or
    CUDA). Start it before the teacher trains: each worker then imports torch and builds a first optimizer (which
    imports torch._dynamo), about 2 s, while the teacher trains instead of before the students can."""
    workers = min(cfg.workers, num_jobs) if device.type == "cpu" else 1
    if workers <= 1:
        return None
    # Spawned (not forked) processes: safe whatever threads torch already started; a worker that
    # fails raises in train_students instead of hanging.
    pool = concurrent.futures.ProcessPoolExecutor(workers, torch.multiprocessing.get_context("spawn"), _warm_worker)
    for _ in range(workers):
        pool.submit(int)          # the pool starts its processes one per task; start them all now
    return pool


def _warm_worker():
    """Each worker's start-up: one thread, the imports its first optimizer needs (see student_pool), and a watcher
    that ends the worker if the run that started it dies without shutting the pool down (kill -9). Ctrl-C reaches
    the workers too: a running job stops at once, without a traceback, and the run itself reports it (_on_ctrl_c)."""
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, _on_ctrl_c)
    parent = multiprocessing.parent_process()
    threading.Thread(target=lambda: (parent.join(), os._exit(1)), daemon=True).start()
    torch.optim.AdamW([nn.Parameter(torch.zeros(1))])


def train_students(cfg, mix, teacher, device, jobs, pool=None, meanwhile=None):
    """jobs: [dict(sigmas, seed, ...) per student, with optional "cfg"] -> [(G, history, field), ...].
    With --workers > 1 on a CPU, the jobs run in that many spawned processes of one thread each: in `pool`, from
    student_pool, which this shuts down, or in one started here. meanwhile(done), if given, runs in this process once
    the first job is done (a core is free then), or after all of them when they run in turn; done: {job index:
    (G, history, field)} of the jobs finished by then."""
    state = {k: v.cpu() for k, v in teacher.state_dict().items()}
    kwargs = [{"cfg": cfg, "mix": mix, "teacher_state": state, "progress": not cfg.quiet, **job} for job in jobs]
    pool = pool or student_pool(cfg, device, len(jobs))
    if pool is None:
        out = [as_generator(teacher, student_job(**kw)) for kw in kwargs]
        if meanwhile is not None:
            meanwhile(dict(enumerate(out)))
        return out
    with pool:
        for i, kw in enumerate(kwargs):
            kw["position"] = i % min(cfg.workers, len(jobs))     # a progress-bar row per worker
        futures = [pool.submit(_student_job, kw) for kw in kwargs]
        concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_COMPLETED)
        done = {i: as_generator(teacher, f.result()) for i, f in enumerate(futures) if f.done()}
        if meanwhile is not None:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)              # one core is free: leave the others to the students still training
            try:
                meanwhile(done)
            finally:
                torch.set_num_threads(threads)
        return [done[i] if i in done else as_generator(teacher, f.result()) for i, f in enumerate(futures)]


def as_generator(teacher, result):
    """A worker's (generator state_dict, history, field) -> (G, history, field), G frozen on the teacher's device."""
    state_G, history, field = result
    G = copy.deepcopy(teacher)
    if "extra_freqs" in state_G:      # the 1-step generator's own input features (their values come from state_G)
        G.add_input_features(state_G["extra_freqs"].shape[1], 1.0)
    G.load_state_dict(state_G)
    return G.eval().requires_grad_(False), history, field


def pick_device(cfg):
    return torch.device("cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
                        else "cpu")


def setup(cfg):
    check_config(cfg)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return pick_device(cfg)


def make_outdir(path):
    """Create --outdir before anything trains, so that a path that cannot hold the outputs fails at once, not after
    minutes of training."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--outdir {path!r} is a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--outdir {path!r} cannot be created: {e.strerror or e}") from None
    if not os.access(path, os.W_OK):
        raise ValueError(f"--outdir {path!r} is not writable")


def check_config(cfg):
    """Refuse impossible options with a message that says which option and why."""
    errors = []
    if cfg.dataset not in ("ring", "grid"):
        errors.append(f"--dataset must be 'ring' or 'grid', not {cfg.dataset!r}")
    if cfg.real_score not in ("teacher", "exact"):
        errors.append(f"--real_score must be 'teacher' or 'exact', not {cfg.real_score!r}")
    if cfg.precision not in ("auto", "bf16", "fp16", "fp32"):
        errors.append(f"--precision must be auto, bf16, fp16 or fp32, not {cfg.precision!r}")
    if cfg.device not in ("auto", "cpu", "cuda"):
        errors.append(f"--device must be auto, cpu or cuda, not {cfg.device!r}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        errors.append("--device cuda was asked for but torch.cuda.is_available() is False")
    if not 0 < cfg.sigma_min < cfg.sigma_max:
        errors.append(f"need 0 < --sigma_min < --sigma_max, got {cfg.sigma_min} and {cfg.sigma_max}")
    if not 0 < cfg.one_step_sigma <= cfg.sigma_max:
        errors.append(f"need 0 < --one_step_sigma <= --sigma_max, got {cfg.one_step_sigma}")
    if not 0 <= cfg.min_step_percent < cfg.max_step_percent <= 1:
        errors.append("need 0 <= --min_step_percent < --max_step_percent <= 1")
    if cfg.x_features < 0 or cfg.x_feature_scale <= 0 or cfg.x_feature_sigma <= 0:
        errors.append("need --x_features >= 0, --x_feature_scale > 0 and --x_feature_sigma > 0")
    if cfg.threads < 0:
        errors.append(f"--threads must be 0 (torch's default) or more, got {cfg.threads}")
    if cfg.teacher_lr < 0:
        errors.append(f"--teacher_lr must be 0 (the dataset's own) or more, got {cfg.teacher_lr}")
    if cfg.teacher_grid_batch < 0:
        errors.append(f"--teacher_grid_batch must be 0 or more, got {cfg.teacher_grid_batch}")
    if cfg.generator_batch_size and cfg.generator_batch_size < cfg.batch_size:
        errors.append(f"--generator_batch_size must be 0 (the same as --batch_size) or at least "
                      f"--batch_size={cfg.batch_size}, got {cfg.generator_batch_size}")
    if cfg.kstep_fake_score_lr < 0 or cfg.fake_score_lr <= 0 or cfg.generator_lr <= 0:
        errors.append(f"need --generator_lr > 0, --fake_score_lr > 0 and --kstep_fake_score_lr >= 0 (0: the same as "
                      f"--fake_score_lr), got {cfg.generator_lr}, {cfg.fake_score_lr} and {cfg.kstep_fake_score_lr}")
    for name, ends in (("ema_span", "0 (no EMA) and 1 (the whole run)"), ("fake_score_lognormal", "0 (DMD2's) and 1")):
        if not 0 <= getattr(cfg, name) <= 1:
            errors.append(f"--{name} must be between {ends}, got {getattr(cfg, name)}")
    for name in ("one_step_fake_features", "one_step_generator_features"):
        if getattr(cfg, name) < 0:
            errors.append(f"--{name} must be 0 or more, got {getattr(cfg, name)}")
    for name in ("width", "depth", "teacher_iters", "teacher_batch", "heun_steps", "total_steps", "batch_size",
                 "dfake_gen_update_ratio", "num_eval", "eval_every", "seeds", "ablation_seeds", "workers"):
        if getattr(cfg, name) < 1:
            errors.append(f"--{name} must be at least 1, got {getattr(cfg, name)}")
    errors += kstep_errors(cfg) + value_errors(cfg)
    if cfg.eval_redraws < 0:
        errors.append(f"--eval_redraws must be 0 (off) or more, got {cfg.eval_redraws}")
    if cfg.ablation and (cfg.seeds > 1 or cfg.eval_redraws):       # it would ignore them
        errors.append("--ablation runs its own seeds (--ablation_seeds) and no redraws: drop --seeds and "
                      "--eval_redraws")
    if cfg.dataset in ("ring", "grid"):
        least = math.ceil(20 / float(make_mixture(cfg.dataset).weights.min()))    # ring 400, grid 1180
        if cfg.num_eval < least:      # mode_shape_kl fits a Gaussian to a mode's samples: at least 10 of them
            errors.append(f"--num_eval must be at least {least} for the {cfg.dataset}, so that its lightest mode "
                          f"expects 20 samples to fit a shape to (mode_shape_kl), got {cfg.num_eval}")
    if errors:
        raise ValueError("invalid options:\n  " + "\n  ".join(errors))


def value_errors(cfg):
    """check_config's part for numbers that must be finite or in range: seeds, rho, clipping, GAN weights."""
    errors = [f"--{f.name} must be a finite number, got {getattr(cfg, f.name)}" for f in fields(cfg)
              if isinstance(getattr(cfg, f.name), float) and not math.isfinite(getattr(cfg, f.name))]
    last_seed = cfg.seed + max(cfg.seeds, cfg.ablation_seeds if cfg.ablation else 1) - 1
    if cfg.seed < 0 or last_seed > 2**32 - 1:                          # numpy's seeds
        errors.append(f"--seed and every seed after it that the run uses must be between 0 and 2**32 - 1, got "
                      f"{cfg.seed} to {last_seed}")
    if cfg.rho <= 0:
        errors.append(f"--rho must be positive (EDM: 7), got {cfg.rho}")
    if cfg.max_grad_norm <= 0:
        errors.append(f"--max_grad_norm must be positive (0 would zero every gradient), got {cfg.max_grad_norm}")
    if not cfg.one_step_steps_ratio > 0:
        errors.append(f"--one_step_steps_ratio must be positive (1: --total_steps), got {cfg.one_step_steps_ratio}")
    if cfg.gen_gan_weight < 0 or cfg.fake_gan_weight < 0:
        errors.append(f"--gen_gan_weight and --fake_gan_weight must be 0 (no GAN) or more, got {cfg.gen_gan_weight} "
                      f"and {cfg.fake_gan_weight}")
    if cfg.ablation and cfg.total_steps < cfg.dfake_gen_update_ratio:   # every row keeps total_steps // ratio updates
        errors.append(f"--ablation needs --total_steps >= --dfake_gen_update_ratio ({cfg.dfake_gen_update_ratio}), "
                      f"so that each row makes at least one generator update; got {cfg.total_steps}")
    return errors


def kstep_errors(cfg):
    """check_config's part for the K-step student: --ksteps, --kstep_sigmas and its own batches and EMA span.
    -> [messages]"""
    errors = [f"--{name} must be 0 (as the 1-step student) or more, got {getattr(cfg, name)}"
              for name in ("kstep_generator_batch_size", "kstep_batch_size") if getattr(cfg, name) < 0]
    if cfg.kstep_ema_span > 1:
        errors.append(f"--kstep_ema_span must be at most 1 (the whole run; negative: --ema_span), "
                      f"got {cfg.kstep_ema_span}")
    if cfg.ksteps < 2:
        errors.append(f"--ksteps must be at least 2 (the 1-step student always trains beside the K-step one), "
                      f"got {cfg.ksteps}")
    try:
        sig = parse_sigmas(cfg.kstep_sigmas)
    except ValueError:
        return errors + [f"--kstep_sigmas must be comma-separated numbers, got {cfg.kstep_sigmas!r}"]
    if len(sig) != cfg.ksteps:
        errors.append(f"--kstep_sigmas has {len(sig)} values but --ksteps is {cfg.ksteps}")
    if not all(map(math.isfinite, sig)) or any(a <= b for a, b in zip(sig, sig[1:])) or sig[-1] <= 0:
        errors.append(f"--kstep_sigmas must be finite, positive and strictly decreasing, got {cfg.kstep_sigmas}")
    if sig[0] > cfg.sigma_max:
        errors.append(f"--kstep_sigmas must start at or below --sigma_max={cfg.sigma_max}, got {sig[0]}")
    return errors


def parse_sigmas(text):
    return [float(s) for s in text.split(",")]


def parse_args(argv=None):
    """Every Config field becomes a flag; its end-of-line comment above becomes its help text."""
    helps = dict(re.findall(r"^\s+(\w+): \w+ = .*?#\s*(.*)$", inspect.getsource(Config), re.M))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(Config):
        kind = parse_bool if isinstance(f.default, bool) else type(f.default)
        parser.add_argument(f"--{f.name}", type=kind, default=f.default, nargs="?" if kind is parse_bool else None,
                            const=True if kind is parse_bool else None,
                            help=f"{helps.get(f.name, '')} (default: {f.default})")
    return Config(**vars(parser.parse_args(argv)))


def parse_bool(text):
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def main(argv=None):
    cfg = parse_args(argv)
    try:
        check_config(cfg)
        make_outdir(cfg.outdir)
    except ValueError as e:
        raise SystemExit(f"toy2d.py: {e}")
    if cfg.ablation:
        _, text = run_ablation(cfg)
        print(text)
        print(f"wrote {cfg.outdir}/ablation.md, ablation.json, ablation.png")
        return
    if cfg.seeds > 1:
        print(run_seeds(cfg))
        print(f"wrote {cfg.outdir}/seeds.md and a folder seed_N per seed")
        return
    result = run(cfg)
    print(format_table(result["metrics"]))
    for line in redraws_lines(redraws_summary(result["metrics"])):
        print(line)
    print(f"wall time {result['wall_time_s']} s; wrote {cfg.outdir}/samples.npz, metrics.json, samples.png, "
          f"dm_field.png, curves.png")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:                 # Ctrl-C: one line, not a traceback; status 130, as for SIGINT
        print("toy2d.py: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
