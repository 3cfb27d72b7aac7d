"""DMD2 on ImageNet 64x64: distil EDM's class-conditional teacher into a one-step generator.

Yin et al. 2024, "Improved Distribution Matching Distillation for Fast Image Synthesis" (DMD2), the
ImageNet-64 experiment: teacher = EDM's ADM network (Karras et al. 2022), student = a copy of it that
maps 80*z to an image in one call. One file, read top to bottom: defaults, data, models, the four
DMD2 ingredients, the training loop, evaluation, command line.

CPU, teaching run (no downloads: closed-form Gaussian teacher, tiny UNets; prints the exact Frechet
distance of the student to the data, per class; a few minutes on a laptop):
    python imagenet64.py --preset gaussian
One GPU, official hyper-parameters (global batch 280 = 7 accumulation rounds of 40):
    python imagenet64.py --teacher edm-imagenet-64x64-cond-adm.pkl --data imagenet-64x64.zip --batch_gpu 40 \
        --fid_every 5000 --fid_ref imagenet-64x64.npz --inception inception-2015-12-05.pkl
7 GPUs, the paper's setting (40 per GPU x 7 = 280); multi-node: add torchrun's --nnodes/--node_rank/--master_addr:
    torchrun --nproc_per_node=7 imagenet64.py --teacher edm-imagenet-64x64-cond-adm.pkl --data imagenet-64x64.zip
Resume after a crash or a time limit (same --outdir):            ... --resume
Sample (PNG folder or .npz; image k depends only on seed k):
    python imagenet64.py sample --ckpt out/imagenet64/generator.pt --seeds 0-63 --out samples/
    python imagenet64.py sample --ckpt out/imagenet64/generator.pt --seeds 0-49999 --out samples.npz
Overhead of the loop vs. its network passes (CPU tiny / GPU full size, random weights are fine for timing):
    python imagenet64.py --preset gaussian --bench
    python imagenet64.py --teacher random --data random --batch_size 40 --bench

Expected (the PAPER's figures, not measured by us): FID 1.51 after ~200k iterations at batch 280 on
7 A100 (~53 h); 1.28 with the longer two-stage schedule (400k iterations without GAN, then +150k at
lr 5e-7 with GAN). The EDM teacher itself: 2.32 (ODE) / 1.36 (SDE) at 511 function evaluations.
"""
import argparse
import contextlib
import copy
import dataclasses
import io
import json
import math
import os
import random
import sys
import time
import zipfile
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import fid
import unet

# ----------------------------------------------------------------------------------------------
# Defaults: the official ImageNet-64 run (tianweiy/DMD2 experiments/imagenet, paper App. F.2).

@dataclass
class Config:
    preset: str = ""                    # "" = ImageNet-64; "gaussian" = CPU teaching run (closed-form teacher, tiny UNets)
    teacher: str = ""                   # EDM pickle, e.g. edm-imagenet-64x64-cond-adm.pkl ("random": untrained net, for --bench)
    data: str = ""                      # real images for the GAN: EDM zip/folder with dataset.json, or one subfolder per class ("random": noise, for --bench)
    outdir: str = "out/imagenet64"      # checkpoint.pt, generator.pt, samples_*.png, log.txt
    seed: int = 0                       # rank r uses seed + r for torch's global RNG; batches are a pure function of (seed, step)
    device: str = ""                    # "" = cuda if available, else cpu
    total_steps: int = 200_000          # iterations (each one critic update; every 5th also a generator update)
    batch_size: int = 280               # global batch: 40 per GPU x 7 GPUs in the paper
    batch_gpu: int = 0                  # micro-batch per process; 0 = batch_size / world_size (no gradient accumulation)
    dfake_gen_update_ratio: int = 5     # TTUR: critic updates per generator update (DMD2 Sec. 4.2)
    generator_lr: float = 2e-6          # AdamW learning rate of the generator
    guidance_lr: float = 2e-6           # AdamW learning rate of the fake score + GAN head
    beta1: float = 0.9                  # AdamW beta1 (PyTorch default, as official)
    beta2: float = 0.999                # AdamW beta2
    weight_decay: float = 0.01          # AdamW weight decay
    warmup_steps: int = 500             # linear warm-up from 0 (official steps it per GPU, so 500/7 iterations there)
    max_grad_norm: float = 10.0         # gradient clipping of both networks
    conditioning_sigma: float = 80.0    # the generator is D(80 z; sigma=80, y)
    sigma_min: float = 0.002            # Karras grid: smallest sigma
    sigma_max: float = 80.0             # Karras grid: largest sigma
    rho: float = 7.0                    # Karras grid: rho
    num_train_timesteps: int = 1000     # points on the Karras grid
    min_step_percent: float = 0.02      # DM gradient: grid indices from 0.02*1000 = 20 ...
    max_step_percent: float = 0.98      # ... to 0.98*1000 = 980 (inclusive)
    sigma_data: float = 0.5             # EDM's data std, in the fake-score weighting 1/sigma^2 + 1/sigma_data^2
    gen_cls_loss_weight: float = 3e-3   # GAN weight in the generator loss
    guidance_cls_loss_weight: float = 1e-2  # GAN (discriminator) weight in the critic loss
    precision: str = "bf16"             # "bf16" autocast on CUDA (fp16 diverges, DMD2 README) or "fp32"; CPU always fp32
    tf32: bool = True                   # allow TF32 matmuls/convs on Ampere+ (official does)
    compile: bool = False               # torch.compile the networks
    ema_decay: float = 0.0              # EMA of the generator weights; 0 = off (official: no EMA)
    log_every: int = 100                # print losses every N steps
    ckpt_every: int = 1000              # write checkpoint.pt + generator.pt every N steps (0 = only at the end)
    sample_every: int = 1000            # write a sample grid PNG every N steps (0 = never)
    resume: bool = False                # continue from outdir/checkpoint.pt
    fid_every: int = 0                  # FID every N steps during training (0 = never)
    fid_ref: str = ""                   # reference statistics .npz (EDM's imagenet-64x64.npz)
    inception: str = ""                 # Inception weights for fid.load_inception ("" = fid.py's default)
    fid_num: int = 50_000               # class-balanced samples for FID
    bench: bool = False                 # time the loop against the sum of its network passes, then exit
    # Only for --preset gaussian:
    gauss_classes: int = 4              # number of classes of the Gaussian data model
    gauss_resolution: int = 8           # images are 3 x R x R
    gauss_noise_std: float = 0.1        # white-noise part of each class covariance
    pretrain_steps: int = 200           # EDM-loss pre-training of the tiny UNet that plays the "teacher checkpoint"
    eval_per_class: int = 2000          # samples per class for the exact Frechet distance (its estimation floor is ~0.1-0.3)


PRESETS = {
    "gaussian": dict(outdir="out/gaussian", total_steps=400, batch_size=64, generator_lr=2e-3, guidance_lr=2e-3, warmup_steps=0,
                     ema_decay=0.9, log_every=100, ckpt_every=200, sample_every=100, precision="fp32"),
}

# The tiny EDM/ADM network for generator and fake score on the CPU path (88k parameters): one 8x8 level, so its
# "bottleneck" is [B, 32, 8, 8] and the GAN head has the full-size head's layers. Chosen for CPU speed.
TINY_UNET = dict(model_channels=32, channel_mult=[1], channel_mult_emb=2, num_blocks=0, attn_resolutions=[], dropout=0.0)

# ----------------------------------------------------------------------------------------------
# Data: real images for the GAN branch (DMD2 Sec. 4.3 trains the discriminator on real ImageNet images).

IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class ImageDataset:
    """ImageNet-64 as EDM's dataset_tool writes it (zip or folder of PNGs + dataset.json with
    {"labels": [["00000/img00000000.png", 3], ...]}), or a folder with one subfolder per class
    (sorted subfolder names -> class indices). Images come out as floats in [-1, 1]."""

    def __init__(self, path, resolution, channels=3):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: dataset not found")
        self.path, self.resolution, self.channels = path, resolution, channels
        try:
            self.zip = zipfile.ZipFile(path) if os.path.isfile(path) else None
        except zipfile.BadZipFile:
            raise ValueError(f"{path}: not a zip file (expected a zip or a folder of images)") from None
        if self.zip is not None:
            names = self.zip.namelist()
        else:
            names = [os.path.relpath(os.path.join(d, f), path).replace(os.sep, "/") for d, _, fs in os.walk(path) for f in fs]
        self.files = sorted(n for n in names if n.lower().endswith(IMAGE_EXT))
        if not self.files:
            raise ValueError(f"{path}: no images ({', '.join(IMAGE_EXT)}) found")
        if "dataset.json" in names:
            labels = json.loads(self._read("dataset.json")).get("labels")
            if labels is None:
                raise ValueError(f"{path}/dataset.json: no labels (this is an unconditional dataset)")
            labels = {name.replace("\\", "/"): int(y) for name, y in labels}
            missing = [f for f in self.files if f not in labels]
            if missing:
                raise ValueError(f"{path}/dataset.json: no label for {missing[0]} (and {len(missing) - 1} more)")
            self.labels = [labels[f] for f in self.files]
        elif self.zip is None and all("/" in f for f in self.files):
            classes = sorted({f.split("/")[0] for f in self.files})
            self.labels = [classes.index(f.split("/")[0]) for f in self.files]
        else:
            raise ValueError(f"{path}: missing labels: expected dataset.json (EDM dataset_tool) or one subfolder per class")
        self.num_classes = max(self.labels) + 1
        self.load(0)  # fail early on a wrong resolution

    def _read(self, name):
        if self.zip is not None:
            return self.zip.read(name)
        with open(os.path.join(self.path, name), "rb") as f:
            return f.read()

    def __len__(self):
        return len(self.files)

    def load(self, i):
        """Image i as uint8 [C, H, W]."""
        image = PIL.Image.open(io.BytesIO(self._read(self.files[i])))
        if image.size != (self.resolution, self.resolution):
            raise ValueError(f"{self.path}/{self.files[i]}: image is {image.size[0]}x{image.size[1]}, "
                             f"expected {self.resolution}x{self.resolution} (resize with EDM's dataset_tool)")
        image = np.asarray(image.convert("RGB" if self.channels == 3 else "L")).reshape(self.resolution, self.resolution, -1)
        return torch.from_numpy(image.transpose(2, 0, 1).copy())

    def sample(self, n, generator):
        """n images drawn uniformly with replacement: a pure function of the generator's seed, so
        resuming needs no iterator position. -> x [n, C, H, W] in [-1, 1], y [n]."""
        idx = torch.randint(len(self), (n,), generator=generator, device=generator.device).tolist()
        x = torch.stack([self.load(i) for i in idx]).to(generator.device).float() / 127.5 - 1
        return x, torch.tensor([self.labels[i] for i in idx], device=generator.device)


class RandomImages:
    """Uniform-noise "images" with random labels: a stand-in for --bench when no dataset is at hand."""

    def __init__(self, resolution, num_classes, channels=3):
        self.shape, self.num_classes = (channels, resolution, resolution), num_classes

    def sample(self, n, generator):
        x = torch.rand((n, *self.shape), generator=generator, device=generator.device) * 2 - 1
        return x, torch.randint(self.num_classes, (n,), generator=generator, device=generator.device)


def batch_generator(seed, step, index, device):
    """The RNG of one micro-batch: a pure function of (seed, step, global micro-batch index), so the
    run is the same on 1 GPU x 7 accumulation rounds as on 7 GPUs, and resuming needs no RNG state."""
    s = np.random.SeedSequence([seed, step, index]).generate_state(2, dtype=np.uint32)
    return torch.Generator(device).manual_seed(int(s[0]) << 31 ^ int(s[1]))


def one_hot(y, num_classes):
    return F.one_hot(y, num_classes).float()   # [B, num_classes]: EDM's class_labels

# ----------------------------------------------------------------------------------------------
# The CPU teacher: class-conditional Gaussians x|y ~ N(mu_y, Sigma_y), whose denoiser is exact.

class GaussianTeacher(nn.Module):
    """A data model whose exact EDM denoiser is known, with EDM's call signature teacher(x, sigma, class_labels).
    Class y is a Gaussian "texture": x = mu_y + k_y * z + noise_std * e (z, e ~ N(0, I), * a zero-padded 5x5
    convolution mixing the 3 channels), so x|y ~ N(mu_y, Sigma_y) with Sigma_y = T_y T_y^T + noise_std^2 I, T_y the
    convolution's matrix. Classes differ in colour (mu_y), channel mixing and correlation length (k_y), so a
    generator that ignores the label or misses a direction shows in the Frechet distance; a convolutional
    generator can represent the exact answer. Noising keeps x|y Gaussian, N(mu_y, Sigma_y + sigma^2 I), so
    Tweedie's formula gives the exact denoiser
        D(x; sigma, y) = E[x_0 | x, y] = mu_y + Sigma_y (Sigma_y + sigma^2 I)^-1 (x - mu_y),
    computed in Sigma_y's eigenbasis (Sigma_y = U diag(lam) U^T). It also serves as the real "dataset"."""

    def __init__(self, num_classes=4, img_resolution=8, img_channels=3, seed=0, noise_std=0.1, kernel_size=5, widths=(1.3, 2.0), scale=0.8):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.num_classes = self.label_dim = num_classes
        self.img_resolution, self.img_channels = img_resolution, img_channels
        C, R, k = img_channels, img_resolution, kernel_size
        d = C * R * R
        mu = 0.5 * (torch.rand(num_classes, C, 1, 1, generator=g, dtype=torch.float64) * 2 - 1)  # class colours
        width = torch.linspace(*widths, num_classes, dtype=torch.float64)                    # correlation lengths
        r2 = (torch.arange(k, dtype=torch.float64) - k // 2) ** 2
        bump = torch.exp(-(r2[:, None] + r2[None, :]) / (2 * width[:, None, None] ** 2))      # [K, k, k]
        mix = torch.randn(num_classes, C, C, generator=g, dtype=torch.float64)
        mix = mix / mix.square().sum((1, 2), keepdim=True).sqrt()        # channel mixing, unit Frobenius norm
        kernel = scale * mix[:, :, :, None, None] * (bump / bump.square().sum((1, 2), keepdim=True).sqrt())[:, None, None]
        eye = torch.eye(d, dtype=torch.float64).reshape(d, C, R, R)
        T = torch.stack([F.conv2d(eye, kernel[y], padding=k // 2).reshape(d, d).T for y in range(num_classes)])  # [K, d, d]
        Sigma = T @ T.transpose(1, 2) + noise_std ** 2 * torch.eye(d, dtype=torch.float64)   # [K, d, d]
        lam, U = torch.linalg.eigh(Sigma)                                # [K, d], [K, d, d]
        self.register_buffer("mu", mu.expand(num_classes, C, R, R).reshape(num_classes, d).float())
        self.register_buffer("lam", lam.clamp(min=0).float())
        self.register_buffer("U", U.float())
        self.register_buffer("Sigma", Sigma)                             # float64, for the exact Frechet distance

    def forward(self, x, sigma, class_labels=None, return_bottleneck=False):
        y = class_labels.argmax(dim=1)                                   # one-hot -> [B]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1)
        U, lam, mu = self.U[y], self.lam[y], self.mu[y]                  # [B, d, d], [B, d], [B, d]
        r = (x.flatten(1).float() - mu).unsqueeze(1) @ U                 # x - mu_y in the eigenbasis: [B, 1, d]
        D = mu + ((r.squeeze(1) * lam / (lam + sigma ** 2)).unsqueeze(1) @ U.transpose(1, 2)).squeeze(1)
        return D.reshape(x.shape)                                        # [B, C, H, W]

    def sample(self, n, generator):
        """Exact samples of the mixture with uniform class weights: x [n, C, H, W], y [n]."""
        y = torch.randint(self.num_classes, (n,), generator=generator, device=generator.device)
        eps = torch.randn(n, self.mu.shape[1], generator=generator, device=generator.device)
        x = self.mu[y] + ((eps * self.lam[y].sqrt()).unsqueeze(1) @ self.U[y].transpose(1, 2)).squeeze(1)
        return x.reshape(n, self.img_channels, self.img_resolution, self.img_resolution), y


def pretrain_edm(net, teacher, steps, batch_size=128, lr=2e-3, seed=0, P_mean=-1.2, P_std=1.2, sigma_data=0.5):
    """A short EDM training (Karras et al. 2022, Table 1 "Ours": ln sigma ~ N(-1.2, 1.2^2),
    lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2) of the tiny UNet on exact samples.
    On ImageNet, DMD2 initialises the generator and the fake score from the teacher network; the
    Gaussian teacher is a formula, so this pre-trained net plays the teacher checkpoint (a diffusion
    model of the data) that both are copied from, while the formula remains the real score."""
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = teacher.sample(batch_size, g)
        sigma = (torch.randn(batch_size, 1, 1, 1, generator=g) * P_std + P_mean).exp()
        weight = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2
        D_x = net(x + sigma * torch.randn(x.shape, generator=g), sigma, one_hot(y, teacher.num_classes))
        loss = (weight * (D_x - x) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net


@torch.no_grad()
def gaussian_frechet(generator, teacher, per_class=1000, batch=500, seed=123):
    """Exact Frechet distance, per class, between the one-step student's samples and N(mu_y, Sigma_y):
    the reference statistics are the true ones, so the only estimate is the student's mean/covariance."""
    device = teacher.mu.device
    g = torch.Generator(device).manual_seed(seed)
    fds = []
    for y in range(teacher.num_classes):
        xs = []
        for i in range(0, per_class, batch):
            n = min(batch, per_class - i)
            z = torch.randn(n, teacher.img_channels, teacher.img_resolution, teacher.img_resolution, generator=g, device=device)
            xs.append(generate(generator, z, torch.full((n,), y, device=device), teacher.num_classes).flatten(1))
        x = torch.cat(xs).double().cpu().numpy()                          # [per_class, d]
        fds.append(fid.frechet_distance(x.mean(0), np.cov(x, rowvar=False), teacher.mu[y].double().cpu().numpy(),
                                        teacher.Sigma[y].cpu().numpy()))
    return fds

def report_frechet(step, generator, teacher, cfg, log=None):
    fds = gaussian_frechet(generator, teacher, cfg.eval_per_class)
    line = f"step {step:7d}  exact Frechet distance per class: " + " ".join(f"{v:.3f}" for v in fds)
    print(line, flush=True)
    if log is not None:
        log.write(line + "\n")
    return fds

# ----------------------------------------------------------------------------------------------
# Models: teacher (real score, frozen), generator and fake score (both copies of the teacher), GAN head.

def gan_head(channels, resolution):
    """cls_pred_branch (DMD2 Sec. 4.3, App. F.1): on the fake UNet's bottleneck [B, 768, 8, 8],
    conv 4x4/2 -> GN -> SiLU (to 4x4), conv 4x4/4 -> GN -> SiLU (to 1x1), conv 1x1 -> one logit.
    Smaller bottlenecks skip stride-2 stages; the Sequential indices match the official state dict."""
    groups = min(32, channels // 4)
    layers = []
    while resolution > 4:
        layers += [nn.Conv2d(channels, channels, 4, stride=2, padding=1), nn.GroupNorm(groups, channels), nn.SiLU()]
        resolution //= 2
    layers += [nn.Conv2d(channels, channels, 4, stride=4), nn.GroupNorm(groups, channels), nn.SiLU(),
               nn.Conv2d(channels, 1, 1)]
    return nn.Sequential(*layers)


class Guidance(nn.Module):
    """Everything the critic update trains: the fake score mu_fake (fake_unet) and the GAN head on its
    bottleneck (cls_pred_branch). One module so that one AdamW and one DDP wrapper cover both."""

    def __init__(self, fake_unet, cls_pred_branch):
        super().__init__()
        self.fake_unet, self.cls_pred_branch = fake_unet, cls_pred_branch

    def forward(self, x, sigma, class_labels, classify=False):
        if not classify:
            return self.fake_unet(x, sigma, class_labels)               # D_fake(x; sigma, y): [B, C, H, W]
        _, rep = self.fake_unet(x, sigma, class_labels, return_bottleneck=True)  # [B, 768, 8, 8]
        with torch.autocast(x.device.type, enabled=False):               # the head runs in fp32, as official
            return self.cls_pred_branch(rep.float()).flatten(1)          # logits: [B, 1]


def build_models(cfg, device, fresh=True):
    """-> teacher (frozen), generator, guidance, real data, net_kwargs (to rebuild the generator)."""
    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    if cfg.preset == "gaussian":
        teacher = GaussianTeacher(cfg.gauss_classes, cfg.gauss_resolution, 3, cfg.seed, cfg.gauss_noise_std)
        net_kwargs = dict(img_resolution=cfg.gauss_resolution, img_channels=3, label_dim=cfg.gauss_classes,
                          sigma_data=cfg.sigma_data, **TINY_UNET)
        net = unet.EDMPrecond(**net_kwargs)
        if fresh:  # on resume the checkpoint overwrites the weights anyway
            pretrain_edm(net, teacher, cfg.pretrain_steps, seed=cfg.seed, sigma_data=cfg.sigma_data)
        data = teacher
    else:
        if cfg.teacher == "random":                                      # untrained full-size net: only for --bench timings
            net = unet.EDMPrecond(**dict(unet.EDM_IMAGENET64, dropout=0.0))
        elif cfg.teacher:
            net = unet.load_edm_pickle(cfg.teacher, dropout=0.0)             # DMD2 rebuilds the nets with dropout 0
        else:
            raise ValueError("--teacher is required (EDM pickle, e.g. edm-imagenet-64x64-cond-adm.pkl), or use --preset gaussian")
        net_kwargs = dict(net.init_kwargs)
        teacher = net
        if cfg.data == "random":
            data = RandomImages(net_kwargs["img_resolution"], net_kwargs["label_dim"], net_kwargs["img_channels"])
        elif cfg.data:
            data = ImageDataset(cfg.data, net_kwargs["img_resolution"], net_kwargs["img_channels"])
        else:
            raise ValueError("--data is required (ImageNet-64 zip/folder from EDM's dataset_tool, or one subfolder per class)")
        if data.num_classes > net_kwargs["label_dim"]:
            raise ValueError(f"{cfg.data}: {data.num_classes} classes, but the teacher has {net_kwargs['label_dim']}")
    teacher = teacher.to(device).eval().requires_grad_(False)
    fake_unet = copy.deepcopy(net).to(device).train().requires_grad_(True)      # mu_fake starts as the teacher
    generator = copy.deepcopy(net).to(device).train().requires_grad_(True)      # so does G (official --initialie_generator)
    with torch.no_grad():  # probe the bottleneck's shape for the head
        res = net_kwargs["img_resolution"]
        x = torch.zeros(1, net_kwargs["img_channels"], res, res, device=device)
        _, rep = fake_unet(x, torch.ones(1, device=device), torch.zeros(1, net_kwargs["label_dim"], device=device),
                           return_bottleneck=True)
    guidance = Guidance(fake_unet, gan_head(rep.shape[1], rep.shape[2]).to(device))
    return teacher, generator, guidance, data, net_kwargs


def generate(generator, z, y, num_classes, conditioning_sigma=80.0):
    """The one-step generator (DMD2 Sec. 6 / App. F.2): x = G(80 z; sigma=80, y), z ~ N(0, I). [B, C, H, W]"""
    sigma = torch.full((z.shape[0], 1, 1, 1), conditioning_sigma, device=z.device)
    return generator(conditioning_sigma * z, sigma, one_hot(y, num_classes))

# ----------------------------------------------------------------------------------------------
# Losses. The noise grid: 1000 Karras sigmas (0.002..80, rho 7) flipped so index 0 is the smallest.

def grid_sigmas(karras, lo, hi, n, g):
    """sigma_t for t ~ UniformInt[lo, hi), one per sample: [n, 1, 1, 1]."""
    return karras[torch.randint(lo, hi, (n,), generator=g, device=g.device)].reshape(n, 1, 1, 1)


def loss_distribution_matching(x, class_labels, teacher, fake_unet, karras, cfg, g):
    """1) The distribution-matching gradient (DMD v1 Eq. 7-8, DMD2 Sec. 3), as in the official code:
    noise the generator output at a sigma from grid indices 20..980, compare the real and fake
    denoisers there, and push x along (D_fake - D_real) / mean|x - D_real|."""
    lo, hi = int(cfg.min_step_percent * len(karras)), min(int(cfg.max_step_percent * len(karras)) + 1, len(karras))
    with torch.no_grad():
        sigma = grid_sigmas(karras, lo, hi, x.shape[0], g)                               # [B, 1, 1, 1]
        x_t = x + sigma * torch.randn(x.shape, generator=g, device=x.device)
        D_real = teacher(x_t, sigma, class_labels).float()                                # mu_real
        D_fake = fake_unet(x_t, sigma, class_labels).float()                              # mu_fake
        p_real = x - D_real
        p_fake = x - D_fake
        w = p_real.abs().mean(dim=[1, 2, 3], keepdim=True)                                # per-sample normaliser
        grad = torch.nan_to_num((p_real - p_fake) / w)                                    # = (D_fake - D_real) / w
    # Surrogate whose autograd gradient w.r.t. x is grad / x.numel() ("mean" reduction, as official:
    # the step size therefore scales with 1/(B*C*H*W), which the learning rate was tuned for).
    return 0.5 * F.mse_loss(x, (x - grad).detach())


def loss_fake_score(guidance, x, class_labels, karras, sigma_data, g):
    """2) The fake score's denoising loss on detached generator samples (DMD v1 Alg. 3): sigma over the
    whole grid, weight lambda(sigma) = 1/sigma^2 + 1/sigma_data^2 (EDM's weighting), mean reduction."""
    sigma = grid_sigmas(karras, 0, len(karras), x.shape[0], g)                           # [B, 1, 1, 1]
    x_t = x + sigma * torch.randn(x.shape, generator=g, device=x.device)
    D_fake = guidance(x_t, sigma, class_labels).float()
    weight = 1 / sigma ** 2 + 1 / sigma_data ** 2
    return (weight * (D_fake - x) ** 2).mean()


def gan_logits(guidance, x, class_labels, karras, g):
    """3) The GAN classifier (DMD2 Sec. 4.3): noise x at a random grid sigma ("diffusion GAN"), run the
    fake UNet's encoder and the head on its bottleneck. -> logits [B, 1]"""
    sigma = grid_sigmas(karras, 0, len(karras), x.shape[0], g)
    return guidance(x + sigma * torch.randn(x.shape, generator=g, device=x.device), sigma, class_labels, classify=True)

# 4) Backward simulation (DMD2 Sec. 4.5) is for multi-step generators; this one is one-step, so it is
#    not used here. See sdxl.py (4-step SDXL) and toy2d.py.

# ----------------------------------------------------------------------------------------------
# Run management: distributed setup, checkpoints, RNG states, sample grids.

def init_distributed(cfg):
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them this is a single process."""
    rank, world, local = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
    if cfg.device in ("", "cuda"):                                       # one GPU per process: cuda:LOCAL_RANK
        device = torch.device(f"cuda:{local}" if cfg.device == "cuda" or torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def rng_state():
    """Python / NumPy / torch (CPU and CUDA) RNG states, as tensors and plain values (weights_only-safe)."""
    np_state = np.random.get_state(legacy=False)
    np_state["state"]["key"] = torch.from_numpy(np_state["state"]["key"].astype(np.int64))
    return dict(python=random.getstate(), numpy=np_state, torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def set_rng_state(s):
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    np_state = dict(s["numpy"], state=dict(s["numpy"]["state"], key=s["numpy"]["state"]["key"].numpy().astype(np.uint32)))
    np.random.set_state(np_state)
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_grid(images, path, nrow=8):
    """images [N, C, H, W] in [-1, 1] -> one PNG grid."""
    x = (images.float() * 127.5 + 128).clip(0, 255).to(torch.uint8).cpu()
    n, c, h, w = x.shape
    x = x.reshape(-1, nrow, c, h, w).permute(0, 3, 1, 4, 2).reshape(-1, nrow * w, c)  # [rows*H, nrow*W, C]
    PIL.Image.fromarray(x.squeeze(2).numpy()).save(path)


class NonFiniteLoss(FloatingPointError):
    pass


def check_finite(values, step, world, ckpt_path):
    """Average logged values over ranks and stop every rank together on NaN/inf, before the optimiser
    step, so neither the weights in memory nor the last checkpoint on disk see the bad update."""
    t = torch.stack([v.detach().float().reshape(()) for v in values.values()])
    if world > 1:
        dist.all_reduce(t)
        t /= world
    out = dict(zip(values, t.tolist()))
    if not all(math.isfinite(v) for v in out.values()):
        bad = ", ".join(f"{k}={v}" for k, v in out.items())
        kept = ckpt_path if os.path.exists(ckpt_path) else "none written yet"
        raise NonFiniteLoss(f"non-finite loss at step {step}: {bad}; stopping. Last good checkpoint: {kept}")
    return out

# ----------------------------------------------------------------------------------------------
# The training loop.

def train(cfg):
    rank, world, device = init_distributed(cfg)
    if cfg.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ckpt_path, gen_path = os.path.join(cfg.outdir, "checkpoint.pt"), os.path.join(cfg.outdir, "generator.pt")
    resume = cfg.resume and os.path.exists(ckpt_path)
    teacher, generator, guidance, data, net_kwargs = build_models(cfg, device, fresh=not resume)
    num_classes = net_kwargs["label_dim"]
    opt_g = torch.optim.AdamW(generator.parameters(), lr=cfg.generator_lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    opt_d = torch.optim.AdamW(guidance.parameters(), lr=cfg.guidance_lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    generator_ema = copy.deepcopy(generator).eval().requires_grad_(False) if cfg.ema_decay > 0 else None
    karras = unet.karras_sigmas(cfg.num_train_timesteps, cfg.sigma_min, cfg.sigma_max, cfg.rho).flip(0).to(device)  # ascending

    if cfg.batch_gpu == 0 and cfg.batch_size % world:
        raise ValueError(f"--batch_size {cfg.batch_size} is not divisible by {world} processes")
    batch_gpu = cfg.batch_gpu or cfg.batch_size // world
    rounds = cfg.batch_size // (batch_gpu * world)                       # gradient-accumulation rounds
    if rounds * batch_gpu * world != cfg.batch_size:
        raise ValueError(f"--batch_size {cfg.batch_size} != batch_gpu {batch_gpu} x {world} processes x an integer")

    start_step = 0
    if resume:
        ckpt = unet.load_checkpoint(ckpt_path)
        generator.load_state_dict(ckpt["generator"])
        guidance.load_state_dict(ckpt["guidance"])
        opt_g.load_state_dict(ckpt["opt_g"])
        opt_d.load_state_dict(ckpt["opt_d"])
        if generator_ema is not None:
            generator_ema.load_state_dict(ckpt.get("generator_ema") or ckpt["generator"])
        start_step = ckpt["step"]
        if len(ckpt["rng"]) == world:
            set_rng_state(ckpt["rng"][rank])
        changed = {k: (v, getattr(cfg, k)) for k, v in ckpt["cfg"].items() if getattr(cfg, k, v) != v and k not in ("resume", "total_steps")}
        if rank == 0:
            print(f"resumed from {ckpt_path} at step {start_step}" + (f"; changed settings: {changed}" if changed else ""))
        del ckpt
    else:
        torch.manual_seed(cfg.seed + rank)                                # per-rank seeds (dropout etc.)
        np.random.seed(cfg.seed + rank)
        random.seed(cfg.seed + rank)

    # DDP averages gradients over ranks; broadcast_buffers=False because the buffers are constants.
    G_ddp = DDP(generator, broadcast_buffers=False) if world > 1 else generator
    D_ddp = DDP(guidance, broadcast_buffers=False) if world > 1 else guidance
    compiled = torch.compile if cfg.compile else (lambda m: m)
    G, D = compiled(G_ddp), compiled(D_ddp)                              # what the loop calls
    teacher_fn, fake_fn, guidance_fn = compiled(teacher), compiled(guidance.fake_unet), compiled(guidance)  # no DDP: no param grads
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and cfg.precision == "bf16")
    res, chans = net_kwargs["img_resolution"], net_kwargs["img_channels"]
    grid_z = torch.randn(64, chans, res, res, generator=torch.Generator().manual_seed(1)).to(device)  # fixed for all grids
    grid_y = torch.arange(64, device=device) // 8 * num_classes // 8 if num_classes >= 8 else torch.arange(64, device=device) // 8 % num_classes
    os.makedirs(cfg.outdir, exist_ok=True)
    log = open(os.path.join(cfg.outdir, "log.txt"), "a") if rank == 0 else None
    if cfg.fid_every:  # load the detector and the reference statistics now, so that a bad path fails before training
        fid_tools = (fid.load_inception(cfg.inception or None, device), fid.load_stats(cfg.fid_ref))
    iter_times, best_fid, t_log, step_log, stats_g = [], float("inf"), time.time(), start_step, {}
    ema_or_g = lambda: generator_ema if generator_ema is not None else generator

    def save(step):  # both files are written atomically (temp file + rename) by unet.save_checkpoint
        rngs = [None] * world
        if world > 1:
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        if rank == 0:
            unet.save_checkpoint(dict(step=step, cfg=dataclasses.asdict(cfg), net_kwargs=net_kwargs, generator=generator.state_dict(),
                                      guidance=guidance.state_dict(), opt_g=opt_g.state_dict(), opt_d=opt_d.state_dict(),
                                      generator_ema=generator_ema.state_dict() if generator_ema is not None else None,
                                      rng=rngs), ckpt_path)
            unet.save_checkpoint(dict(step=step, net_kwargs=net_kwargs, generator=ema_or_g().state_dict()), gen_path)

    frechet = []                                                          # (step, exact FD per class), gaussian preset
    if cfg.preset == "gaussian" and rank == 0 and start_step == 0 and cfg.sample_every:
        frechet.append((0, report_frechet(0, ema_or_g(), teacher, cfg, log)))
    for step in range(start_step, cfg.total_steps):
        t0 = time.time()
        # Constant learning rate after a linear warm-up from 0 (diffusers' "constant_with_warmup", stepped every iteration).
        for opt, lr in ((opt_g, cfg.generator_lr), (opt_d, cfg.guidance_lr)):
            opt.param_groups[0]["lr"] = lr * min(1.0, step / cfg.warmup_steps) if cfg.warmup_steps else lr
        gens = [batch_generator(cfg.seed, step, rank * rounds + r, device) for r in range(rounds)]  # one RNG per micro-batch
        COMPUTE_GENERATOR_GRADIENT = step % cfg.dfake_gen_update_ratio == 0  # TTUR (DMD2 Sec. 4.2): 1 G update per 5 critic updates

        # Generator turn: x = G(80 z; 80, y) for uniformly drawn classes. On generator steps, minimise
        # loss_dm + w_G * loss_g_gan with the guidance weights frozen (the GAN gradient reaches G only).
        fakes, stats = [], {}
        guidance.requires_grad_(False)
        for r, g in enumerate(gens):
            with contextlib.nullcontext() if world == 1 or r == rounds - 1 else G_ddp.no_sync():  # all-reduce once, at the last round
                z = torch.randn(batch_gpu, chans, res, res, generator=g, device=device)
                y = torch.randint(num_classes, (batch_gpu,), generator=g, device=device)
                with amp, torch.set_grad_enabled(COMPUTE_GENERATOR_GRADIENT):
                    x_fake = generate(G, z, y, num_classes, cfg.conditioning_sigma).float()      # [B, C, H, W]
                if COMPUTE_GENERATOR_GRADIENT:
                    with amp:
                        loss_dm = loss_distribution_matching(x_fake, one_hot(y, num_classes), teacher_fn, fake_fn, karras, cfg, g)
                        loss_g_gan = F.softplus(-gan_logits(guidance_fn, x_fake, one_hot(y, num_classes), karras, g)).mean()
                    ((loss_dm + cfg.gen_cls_loss_weight * loss_g_gan) / rounds).backward()
                    stats["loss_dm"] = stats.get("loss_dm", 0) + loss_dm.detach() / rounds
                    stats["loss_g_gan"] = stats.get("loss_g_gan", 0) + loss_g_gan.detach() / rounds
                fakes.append((x_fake.detach(), y))
        guidance.requires_grad_(True)
        if COMPUTE_GENERATOR_GRADIENT:
            stats["grad_norm_g"] = torch.nn.utils.clip_grad_norm_(generator.parameters(), cfg.max_grad_norm)
            stats_g = check_finite(stats, step, world, ckpt_path)             # kept for the log line
            stats = {}
            opt_g.step()
            opt_g.zero_grad(set_to_none=True)
            if generator_ema is not None:
                with torch.no_grad():
                    for p_ema, p in zip(generator_ema.parameters(), generator.parameters()):
                        p_ema.lerp_(p, 1 - cfg.ema_decay)

        # Critic turn, every iteration, on the same detached samples: the fake score's denoising loss plus
        # the discriminator loss softplus(D(fake)) + softplus(-D(real)) on noised fake and real images.
        for r, g in enumerate(gens):
            with contextlib.nullcontext() if world == 1 or r == rounds - 1 else D_ddp.no_sync():
                x_fake, y = fakes[r]
                x_real, y_real = data.sample(batch_gpu, g)                                        # [B, C, H, W], [B]
                with amp:
                    loss_fake = loss_fake_score(D, x_fake, one_hot(y, num_classes), karras, cfg.sigma_data, g)
                    logits_fake = gan_logits(D, x_fake, one_hot(y, num_classes), karras, g)       # [B, 1]
                    logits_real = gan_logits(D, x_real, one_hot(y_real, num_classes), karras, g)  # [B, 1]
                    loss_d = (F.softplus(logits_fake) + F.softplus(-logits_real)).mean()
                ((loss_fake + cfg.guidance_cls_loss_weight * loss_d) / rounds).backward()
                stats["loss_fake"] = stats.get("loss_fake", 0) + loss_fake.detach() / rounds
                stats["loss_d"] = stats.get("loss_d", 0) + loss_d.detach() / rounds
        stats["grad_norm_d"] = torch.nn.utils.clip_grad_norm_(guidance.parameters(), cfg.max_grad_norm)
        stats = check_finite(stats, step, world, ckpt_path)
        opt_d.step()
        opt_d.zero_grad(set_to_none=True)
        iter_times.append(time.time() - t0)

        # Bookkeeping, after `done` iterations.
        done = step + 1
        if rank == 0 and (done % cfg.log_every == 0 or done == cfg.total_steps):
            line = "  ".join([f"step {done:7d}"] + [f"{k} {v:.4g}" for k, v in {**stats_g, **stats}.items()] +
                             [f"{cfg.batch_size * (done - step_log) / (time.time() - t_log):.1f} img/s"])
            t_log, step_log = time.time(), done
            print(line, flush=True)
            log.write(line + "\n")
            log.flush()
        if cfg.sample_every and done % cfg.sample_every == 0 and rank == 0:
            with torch.no_grad(), amp:
                save_grid(generate(ema_or_g(), grid_z, grid_y, num_classes, cfg.conditioning_sigma),
                          os.path.join(cfg.outdir, f"samples_{done:07d}.png"))
            if cfg.preset == "gaussian":
                frechet.append((done, report_frechet(done, ema_or_g(), teacher, cfg, log)))
        if cfg.fid_every and done % cfg.fid_every == 0:
            score = evaluate_fid(ema_or_g(), num_classes, *fid_tools, cfg.fid_num, device, rank, world, amp=amp,
                                 conditioning_sigma=cfg.conditioning_sigma)
            if rank == 0:
                print(f"step {done:7d}  FID {score:.3f}", flush=True)
                log.write(f"step {done:7d}  FID {score:.3f}\n")
                if score < best_fid:
                    best_fid = score
                    unet.save_checkpoint(dict(step=done, net_kwargs=net_kwargs, fid=score, generator=ema_or_g().state_dict()),
                                         os.path.join(cfg.outdir, "generator_best.pt"))
        if not cfg.bench and ((cfg.ckpt_every and done % cfg.ckpt_every == 0) or done == cfg.total_steps):
            save(done)
    if log is not None:
        log.close()
    return dict(generator=generator, guidance=guidance, teacher=teacher, data=data, generator_ema=generator_ema,
                iter_times=iter_times, batch_gpu=batch_gpu, rounds=rounds, device=device, karras=karras,
                net_kwargs=net_kwargs, amp=amp, frechet=frechet)

# ----------------------------------------------------------------------------------------------
# Evaluation: samples and FID.

def parse_range(s):
    """'0-63' or '1,5,9-11' -> [0, ..., 63] / [1, 5, 9, 10, 11]."""
    out = []
    for part in s.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    return out


@torch.no_grad()
def generate_uint8(generator, seeds, labels, num_classes, device, batch=64, amp=contextlib.nullcontext(), conditioning_sigma=80.0):
    """Yield uint8 image batches [B, C, H, W]. Image k's z comes from seed seeds[k] alone (EDM's per-seed
    noise), so it does not depend on the batch size or the number of GPUs."""
    shape = (generator.img_channels, generator.img_resolution, generator.img_resolution)
    for i in range(0, len(seeds), batch):
        z = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds[i:i + batch]]).to(device)
        y = torch.as_tensor(labels[i:i + batch], device=device)
        with amp:
            x = generate(generator, z, y, num_classes, conditioning_sigma)
        yield (x.float() * 127.5 + 128).clip(0, 255).to(torch.uint8)   # EDM's rounding


@torch.no_grad()
def evaluate_fid(generator, num_classes, detector, ref, num=50_000, device="cpu", rank=0, world=1, batch=64,
                 amp=contextlib.nullcontext(), conditioning_sigma=80.0):
    """FID (EDM's protocol, through fid.py) of `num` class-balanced samples: image i has seed i and class
    i % num_classes. Rank r makes images r, r + world, ...; the float64 feature moments are summed over ranks."""
    seeds = list(range(rank, num, world))
    images = generate_uint8(generator, seeds, [s % num_classes for s in seeds], num_classes, device, batch, amp, conditioning_sigma)
    n, s1, s2 = torch.zeros((), dtype=torch.float64, device=device), 0, 0
    for f in fid.iterate_features(images, detector, batch, device=device, progress=rank == 0):  # [B, 2048] float32
        f = torch.from_numpy(f).to(device, torch.float64)
        n, s1, s2 = n + len(f), s1 + f.sum(0), s2 + f.T @ f
    if world > 1:
        for t in (n, s1, s2):
            dist.all_reduce(t)
    mu = s1 / n                                                           # [2048]
    sigma = (s2 - n * torch.outer(mu, mu)) / (n - 1)                      # [2048, 2048], N - 1 as np.cov
    return fid.frechet_distance(mu.cpu().numpy(), sigma.cpu().numpy(), *ref)


def load_generator(path, device="cpu"):
    """A generator from our checkpoint.pt / generator.pt, or a bare EDMPrecond state dict such as the
    official DMD2 ImageNet release (pytorch_model.bin), which has the full-size EDM_IMAGENET64 config."""
    ckpt = unet.load_checkpoint(path)
    if "generator" in ckpt:
        net_kwargs, state = ckpt["net_kwargs"], (ckpt.get("generator_ema") or ckpt["generator"])
    elif any(k.startswith("model.") for k in ckpt):
        net_kwargs, state = dict(unet.EDM_IMAGENET64, dropout=0.0), ckpt
    else:
        raise ValueError(f"{path}: neither an imagenet64.py checkpoint nor an EDMPrecond state dict")
    net = unet.EDMPrecond(**net_kwargs)
    net.load_state_dict(state)
    return net.to(device).eval().requires_grad_(False), net_kwargs


def sample_main(argv):
    p = argparse.ArgumentParser(prog="imagenet64.py sample", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Write one-step samples of a trained generator as PNGs or one .npz.")
    p.add_argument("--ckpt", required=True, help="checkpoint.pt / generator.pt, or an EDMPrecond state dict")
    p.add_argument("--seeds", default="0-63", help="e.g. 0-63 or 0,5,9-11")
    p.add_argument("--classes", default="", help="classes cycled over the seeds, e.g. 0-9; default: seed %% num_classes")
    p.add_argument("--out", required=True, help="a folder (PNGs named by seed) or a file ending in .npz (arr_0 [N,H,W,C] uint8, labels)")
    p.add_argument("--batch", type=int, default=64, help="images per forward pass")
    p.add_argument("--device", default="", help="'' = cuda if available")
    a = p.parse_args(argv)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    generator, net_kwargs = load_generator(a.ckpt, device)
    seeds = parse_range(a.seeds)
    classes = parse_range(a.classes) if a.classes else None
    labels = [classes[i % len(classes)] for i in range(len(seeds))] if classes else [s % net_kwargs["label_dim"] for s in seeds]
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    images = torch.cat([x.cpu() for x in generate_uint8(generator, seeds, labels, net_kwargs["label_dim"], device, a.batch, amp)])
    images = images.permute(0, 2, 3, 1).numpy()                                 # [N, H, W, C]
    if a.out.endswith(".npz"):
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        np.savez(a.out, arr_0=images, labels=np.asarray(labels))
    else:
        os.makedirs(a.out, exist_ok=True)
        for s, img in zip(seeds, images):
            PIL.Image.fromarray(img.squeeze(2) if img.shape[2] == 1 else img).save(os.path.join(a.out, f"{s:06d}.png"))
    print(f"wrote {len(seeds)} images to {a.out}")

# ----------------------------------------------------------------------------------------------
# --bench: the loop's time vs. the sum of the network passes it needs, timed in the same process.

def bench(cfg):
    """Run 6 TTUR cycles of the real loop (the first is warm-up), then time each network pass of one
    cycle alone, on the same networks and shapes, and print loop time / sum of passes. Medians over
    cycles and repetitions, so that one slow moment of a shared machine does not decide the ratio."""
    R, cycles = cfg.dfake_gen_update_ratio, 5
    cfg = dataclasses.replace(cfg, total_steps=(cycles + 1) * R, fid_every=0, sample_every=0, log_every=10 ** 9, resume=False, bench=True)
    out = train(cfg)
    generator, guidance, teacher, device, amp = out["generator"], out["guidance"], out["teacher"], out["device"], out["amp"]
    B, num_classes, karras = out["batch_gpu"], out["net_kwargs"]["label_dim"], out["karras"]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    g = batch_generator(cfg.seed, 0, 0, device)
    z = torch.randn(B, generator.img_channels, generator.img_resolution, generator.img_resolution, generator=g, device=device)
    y = one_hot(torch.randint(num_classes, (B,), generator=g, device=device), num_classes)
    sigma = karras[-1].expand(B).reshape(B, 1, 1, 1)

    def fwd_bwd(fn, x, params_grad):  # a forward pass, plus its backward to the parameters or only to the input
        x = x.detach().requires_grad_(not params_grad)
        with amp:
            out = fn(x).float()
        out.sum().backward()

    def timed(fn, reps=7):
        fn(); sync()
        ts = []
        for _ in range(reps):
            t = time.time()
            fn(); sync()
            ts.append(time.time() - t)
        generator.zero_grad(set_to_none=True)
        guidance.zero_grad(set_to_none=True)
        return float(np.median(ts))

    with torch.no_grad(), amp:
        x = generate(generator, z, y.argmax(1), num_classes).float()
    guidance.requires_grad_(False)
    t = dict(  # seconds per micro-batch
        G_forward=timed(lambda: _no_grad(lambda: generate(generator, z, y.argmax(1), num_classes), amp)),
        G_forward_backward=timed(lambda: fwd_bwd(lambda z_: generate(generator, z_, y.argmax(1), num_classes), z, True)),
        teacher_forward=timed(lambda: _no_grad(lambda: teacher(x, sigma, y), amp)),
        fake_forward=timed(lambda: _no_grad(lambda: guidance.fake_unet(x, sigma, y), amp)),
        head_forward_backward_to_input=timed(lambda: fwd_bwd(lambda x_: guidance(x_, sigma, y, classify=True), x, False)),
    )
    guidance.requires_grad_(True)
    t["fake_forward_backward"] = timed(lambda: fwd_bwd(lambda x_: guidance(x_, sigma, y), x, True))
    t["head_forward_backward"] = timed(lambda: fwd_bwd(lambda x_: guidance(x_, sigma, y, classify=True), x, True))
    # One TTUR cycle = 1 generator step + (R - 1) critic-only steps, each with `rounds` micro-batches.
    gen_step = t["G_forward_backward"] + t["teacher_forward"] + t["fake_forward"] + t["head_forward_backward_to_input"]
    critic = t["fake_forward_backward"] + 2 * t["head_forward_backward"]
    passes = out["rounds"] * (gen_step + (R - 1) * t["G_forward"] + R * critic)
    loop = float(np.median([sum(out["iter_times"][c * R:(c + 1) * R]) for c in range(1, cycles + 1)]))  # s per cycle
    for k, v in t.items():
        print(f"  {k:32s} {1000 * v:9.2f} ms per micro-batch of {B}")
    ratio = loop / passes
    print(f"bench: loop {1000 * loop / R:.1f} ms/iteration, network passes {1000 * passes / R:.1f} ms/iteration, "
          f"ratio {ratio:.3f}, {cfg.batch_size * R / loop:.1f} img/s"
          + (f", peak memory {torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB" if device.type == "cuda" else ""))
    return dict(ratio=ratio, loop=loop, passes=passes, **t)


def _no_grad(fn, amp):
    with torch.no_grad(), amp:
        return fn()

# ----------------------------------------------------------------------------------------------
# Command line.

def parse_config(argv):
    p = argparse.ArgumentParser(prog="imagenet64.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="DMD2: distil EDM's ImageNet-64 teacher into a one-step generator.")
    for f in dataclasses.fields(Config):
        if f.type in (bool, "bool"):
            p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=f.default)
        else:
            p.add_argument(f"--{f.name}", type=type(f.default), default=f.default)
    preset = p.parse_known_args(argv)[0].preset
    if preset and preset not in PRESETS:
        p.error(f"unknown --preset {preset}; choose from {list(PRESETS)}")
    p.set_defaults(**PRESETS.get(preset, {}))                              # explicit flags still win
    return Config(**vars(p.parse_args(argv)))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["sample"]:
        return sample_main(argv[1:])
    cfg = parse_config(argv)
    if cfg.bench:
        return bench(cfg)
    out = train(cfg)
    if cfg.preset == "gaussian" and int(os.environ.get("RANK", 0)) == 0:
        g = out["generator_ema"] if out["generator_ema"] is not None else out["generator"]
        fds = gaussian_frechet(g, out["teacher"], cfg.eval_per_class)
        print("exact Frechet distance to the data, per class: " + "  ".join(f"{v:.3f}" for v in fds))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
