"""DMD2 on ImageNet 64x64: distil EDM's class-conditional teacher into a one-step generator.

Yin et al. 2024, "Improved Distribution Matching Distillation for Fast Image Synthesis" (DMD2), the ImageNet-64
experiment: teacher = EDM's ADM network (Karras et al. 2022), student = a copy of it that maps 80*z to an image in
one call. One file, read top to bottom: defaults, data, models, the four DMD2 ingredients, the training loop,
evaluation, the CPU stand-in, run plumbing, command line.

CPU, teaching run (no downloads: closed-form Gaussian teacher, tiny UNets; prints the exact Frechet distance of the
student to the data, per class; about a minute on a laptop):
    python imagenet64.py --preset gaussian

The paper's two ImageNet-64 results, each next to the official script it mirrors (tianweiy/DMD2 experiments/imagenet/;
7 GPUs x 40 = batch 280; one GPU: replace torchrun by `python` and add --batch_gpu 40 for 7 accumulation rounds).
T = --teacher edm-imagenet-64x64-cond-adm.pkl, D = --data imagenet-64x64.zip,
E = --fid_ref imagenet-64x64.npz --inception inception-2015-12-05.pkl:
  FID 1.51, one run with the GAN from the start (imagenet_gan_classifier_genloss3e-3_diffusion1000_lr2e-6_scratch.sh;
  the paper's checkpoint is at 193.5k iterations):
    torchrun --nproc_per_node=7 imagenet64.py T D --outdir out/gan --total_steps 200000 --keep_every 5000
    python imagenet64.py evaluate --folder out/gan E
  FID 1.28, two stages:
    stage 1, no GAN (imagenet_lr2e-6_scratch.sh; best checkpoint at 405.5k, FID 2.61; needs no real images):
    torchrun --nproc_per_node=7 imagenet64.py T --no-gan --outdir out/stage1 --total_steps 410000 --keep_every 5000
    python imagenet64.py evaluate --folder out/stage1 E          # -> out/stage1/fid.json names the best file
    stage 2, from stage 1's best generator and fake score, weights only (fresh optimisers, warm-up and GAN head,
    as the official --ckpt_only_path), GAN on, lr 5e-7 (imagenet_gan_classifier_genloss3e-3_diffusion1000_lr5e-7_
    resume.sh; the paper's checkpoint is 142.5k iterations later):
    torchrun --nproc_per_node=7 imagenet64.py T D --init_from out/stage1/generator_0405000.pt --generator_lr 5e-7 \
        --fake_score_lr 5e-7 --outdir out/stage2 --total_steps 150000 --keep_every 5000
    python imagenet64.py evaluate --folder out/stage2 E
  The released generator (huggingface tianweiy/DMD2, model/imagenet/..._checkpoint_model_XXXXXX/pytorch_model.bin):
    python imagenet64.py evaluate --folder out/release --ckpt pytorch_model.bin E
Resume after a crash or a time limit (same --outdir):            ... --resume
Sample (PNG folder or .npz; image k depends only on seed k; fp32, DMD2's quantisation):
    python imagenet64.py sample --ckpt out/gan/generator.pt --seeds 0-63 --out samples/
Overhead of the loop vs. its network passes, and the full-size FLOPs per iteration:
    python imagenet64.py --preset gaussian --bench
    python imagenet64.py --teacher random --data random --batch_size 40 --bench      # on a GPU, full size

Expected (the PAPER's figures, not measured by us): FID 1.51 after ~200k iterations at batch 280 on 7 A100 (~53 h);
1.28 with the two-stage schedule (~410k without GAN, then ~140k at lr 5e-7 with GAN). The EDM teacher itself: 2.32
(ODE) / 1.36 (SDE) at 511 function evaluations.
Measured (README, GPU figures): one H200 trains at 80.5 images/s in bf16 at 40 images per GPU, so the FID 1.51 run's
200k iterations at batch 280 would take about 8 days on one H200 alone (several GPUs: not measured yet).
"""
import argparse
import collections
import contextlib
import copy
import dataclasses
import glob
import io
import json
import os
import random
import sys
import time
import warnings
import zipfile
from dataclasses import dataclass, field

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

OFFICIAL_WARMUP = 500 / 7   # accelerate steps the scheduler once per process: 500 warm-up steps / 7 GPUs = 71.4 iters


@dataclass
class Config:
    preset: str = ""                    # "" = ImageNet-64; "gaussian" = CPU teaching run (closed-form teacher,
                                        # tiny UNets)
    teacher: str = ""                   # EDM pickle, e.g. edm-imagenet-64x64-cond-adm.pkl ("random": untrained,
                                        # full size, for --bench; "random-tiny": untrained 8x8, 10 classes, CPU)
    data: str = ""                      # real images for the GAN: EDM zip/folder with dataset.json, or one subfolder
                                        # per class ("random": noise, for --bench); not needed with --no-gan
    outdir: str = "out/imagenet64"      # checkpoint.pt, generator.pt, generator_XXXXXXX.pt, samples_*.png, log.txt
    seed: int = 0                       # batches are a pure function of (seed, step, micro-batch)
    device: str = ""                    # "" = cuda if available, else cpu
    total_steps: int = 200_000          # iterations (each one fake-score update; every 5th also a generator update)
    batch_size: int = 280               # global batch: 40 per GPU x 7 GPUs in the paper
    batch_gpu: int = 0                  # micro-batch per process; 0 = batch_size / world_size (no accumulation)
    dfake_gen_update_ratio: int = 5     # TTUR: fake-score updates per generator update (DMD2 Sec. 4.2)
    generator_lr: float = 2e-6          # AdamW learning rate of the generator (stage 2 of the 1.28 recipe: 5e-7)
    fake_score_lr: float = 2e-6         # AdamW learning rate of the fake score + GAN head (official: guidance_lr)
    beta1: float = 0.9                  # AdamW beta1 (PyTorch default, as official)
    beta2: float = 0.999                # AdamW beta2
    weight_decay: float = 0.01          # AdamW weight decay
    warmup_steps: float = OFFICIAL_WARMUP  # iterations of linear warm-up from 0. Default = the official run: its
                                        # 500 scheduler steps are counted per process, so on 7 GPUs 500/7 iterations
    max_grad_norm: float = 10.0         # gradient clipping of both networks
    conditioning_sigma: float = 80.0    # the generator is D(80 z; sigma=80, y)
    sigma_min: float = 0.002            # Karras grid: smallest sigma
    sigma_max: float = 80.0             # Karras grid: largest sigma
    rho: float = 7.0                    # Karras grid: rho
    num_train_timesteps: int = 1000     # points on the Karras grid
    min_step_percent: float = 0.02      # DM gradient: grid indices from 0.02*1000 = 20 ...
    max_step_percent: float = 0.98      # ... to 0.98*1000 = 980 (inclusive)
    sigma_data: float = 0.5             # EDM's data std, in the fake-score weighting 1/sigma^2 + 1/sigma_data^2
    gan: bool = True                    # the GAN head and its losses; --no-gan skips every GAN pass (stage 1 of 1.28)
    gen_gan_weight: float = 3e-3        # GAN weight in the generator loss (official: gen_cls_loss_weight)
    fake_gan_weight: float = 1e-2       # GAN weight in the fake-score loss (official: guidance_cls_loss_weight)
    init_from: str = ""                 # start from this run's generator + fake score weights only (official:
                                        # --ckpt_only_path): fresh optimisers, warm-up and GAN head, step 0
    precision: str = "bf16"             # "bf16" autocast on CUDA (fp16 diverges, DMD2 README) or "fp32"; CPU: fp32.
                                        # FID samples are always drawn in fp32
    tf32: bool = True                   # allow TF32 matmuls/convs on Ampere+ (official does)
    compile: bool = False               # torch.compile the networks
    ema_decay: float = 0.0              # EMA of the generator weights; 0 = off (official: no EMA; FastGen: EMA)
    log_every: int = 100                # print losses every N steps
    ckpt_every: int = 1000              # write checkpoint.pt + generator.pt every N steps (0 = only at the end)
    keep_every: int = 5000              # keep generator_XXXXXXX.pt (generator + fake score, ~2.4 GB at full size)
                                        # every N steps, for `evaluate` and --init_from (0 = never)
    sample_every: int = 1000            # write a sample grid PNG every N steps (0 = never)
    resume: bool = False                # continue from outdir/checkpoint.pt
    fid_every: int = 0                  # FID every N steps during training (0 = never; `evaluate` is the protocol)
    fid_ref: str = ""                   # reference statistics .npz (EDM's imagenet-64x64.npz)
    inception: str = ""                 # Inception weights for fid.load_inception ("" = fid.py's default)
    fid_num: int = 50_000               # class-balanced samples for FID
    quantize: str = "dmd2"              # images -> uint8 for FID: "dmd2" ((x+1)*127.5, clamp, truncate, as DMD2's
                                        # evaluator) or "edm" (EDM's rounding)
    bench: bool = False                 # time the loop against the sum of its network passes, then exit
    # Only for --preset gaussian:
    gauss_classes: int = 4              # number of classes of the Gaussian data model
    gauss_resolution: int = 8           # images are 3 x R x R
    gauss_noise_std: float = 0.1        # white-noise part of each class covariance
    pretrain_steps: int = 200           # EDM-loss pre-training of the tiny UNet that plays the "teacher checkpoint"
    eval_per_class: int = 2000          # samples per class for the exact Frechet distance (floor ~0.1-0.3)


PRESETS = {
    "gaussian": dict(outdir="out/gaussian", total_steps=400, batch_size=64, generator_lr=2e-3, fake_score_lr=2e-3,
                     warmup_steps=0, ema_decay=0.9, log_every=100, ckpt_every=200, keep_every=0, sample_every=100,
                     precision="fp32"),
}

# The tiny EDM/ADM network for generator and fake score on the CPU path (88k parameters): one 8x8 level, so its
# "bottleneck" is [B, 32, 8, 8] and the GAN head has the full-size head's layers. Chosen for CPU speed.
TINY_UNET = dict(model_channels=32, channel_mult=[1], channel_mult_emb=2, num_blocks=0, attn_resolutions=[],
                 dropout=0.0)

# ----------------------------------------------------------------------------------------------
# Data: real images for the GAN branch (DMD2 Sec. 4.3 trains the discriminator on real ImageNet images).

IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
MAX_IMAGE_FILE = 64 << 20             # bytes; a 64x64 PNG is ~10 kB, so anything larger is refused before reading


def decode_image(data, where, resolution, channels):
    """Bytes of one image file -> uint8 [C, H, W]. Every failure (truncated, empty, not an image, a decompression bomb,
    an oversized text chunk, a wrong size or pixel format) is one ValueError that names the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            image = PIL.Image.open(io.BytesIO(data), formats=unet.IMAGE_FORMATS)   # not EPS, ICO, ... (unet.py)
            if image.size == (resolution, resolution):
                image.load()                                   # decode now: a truncated file fails here, not later
    except Exception as e:                                      # PIL raises OSError, ValueError, SyntaxError, ...
        raise ValueError(f"{where}: not a readable image ({type(e).__name__}: {e})") from None
    if image.size != (resolution, resolution):
        raise ValueError(f"{where}: image is {image.size[0]}x{image.size[1]}, expected {resolution}x{resolution} "
                         f"(resize with EDM's dataset_tool)")
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):  # 16-bit grey: PIL's convert("RGB") would clip it
        a = np.asarray(image).astype(np.int64)
        if a.min() < 0 or a.max() > 65535:
            raise ValueError(f"{where}: {image.mode} pixels outside 0..65535; expected 8- or 16-bit images")
        image = PIL.Image.fromarray(np.rint(a / 257).astype(np.uint8), "L")   # 0..65535 -> 0..255
    elif image.mode == "F":
        raise ValueError(f"{where}: floating-point image (mode F); expected 8- or 16-bit images")
    try:
        image = image.convert("RGB" if channels == 3 else "L")
    except ValueError as e:                                  # e.g. a LAB TIFF: PIL has no conversion for it
        raise ValueError(f"{where}: {e}") from None
    a = np.asarray(image).reshape(resolution, resolution, -1)
    return torch.from_numpy(a.transpose(2, 0, 1).copy())


class ImageDataset:
    """ImageNet-64 as EDM's dataset_tool writes it (zip or folder of PNGs + dataset.json with
    {"labels": [["00000/img00000000.png", 3], ...]}), or a folder with one subfolder per class
    (sorted subfolder names -> class indices; with label_dim, exactly that many subfolders). Images come out as floats
    in [-1, 1]. Labels are checked when the dataset is opened: integers (not booleans or floats) in 0..label_dim-1."""

    def __init__(self, path, resolution, channels=3, label_dim=None):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: dataset not found")
        self.path, self.resolution, self.channels, self.label_dim = path, resolution, channels, label_dim
        try:
            self.zip = zipfile.ZipFile(path) if os.path.isfile(path) else None
        except unet.ZIP_ERRORS as e:
            raise ValueError(f"{path}: not a zip file (expected a zip or a folder of images): {e}") from None
        if self.zip is not None:
            names = self.zip.namelist()
        else:
            names = [os.path.relpath(os.path.join(d, f), path).replace(os.sep, "/") for d, _, fs in os.walk(path)
                     for f in fs]
        self.files = sorted(n for n in names if n.lower().endswith(IMAGE_EXT))
        if not self.files:
            raise ValueError(f"{path}: no images ({', '.join(IMAGE_EXT)}) found")
        self.labels = self._json_labels(names) if "dataset.json" in names else self._folder_labels()
        bad = [(f, y) for f, y in zip(self.files, self.labels) if y < 0 or (label_dim is not None and y >= label_dim)]
        if bad:
            limit = f"0..{label_dim - 1} (the teacher's classes)" if label_dim is not None else "0 or more"
            raise ValueError(f"{path}: {bad[0][0]} has class {bad[0][1]}, outside {limit}; {len(bad)} such labels")
        self.num_classes = max(self.labels) + 1
        self.load(0)  # fail early on a wrong resolution or an unreadable first image

    def _folder_labels(self):
        if self.zip is None and all("/" in f for f in self.files):
            classes = sorted({f.split("/")[0] for f in self.files})
            if self.label_dim is not None and len(classes) != self.label_dim:
                # a missing or extra class folder would shift the label of every class sorted after it
                raise ValueError(f"{self.path}: {len(classes)} class subfolders, but the teacher has {self.label_dim} "
                                 f"classes; give one subfolder per class, or a dataset.json with the labels")
            index = {c: i for i, c in enumerate(classes)}
            return [index[f.split("/")[0]] for f in self.files]
        raise ValueError(f"{self.path}: missing labels: expected dataset.json (EDM dataset_tool) or one subfolder "
                         f"per class")

    def _json_labels(self, names):
        where = f"{self.path}/dataset.json"
        raw = self._read("dataset.json")
        # A few kB deflated can hold tens of millions of JSON values, which json.loads would all build (1.4 GB for 20
        # million empty lists). The labels need one list and two commas per file, so a file with far more of them than
        # the files here need (beyond those in file names) is refused, unless there are at most 2**22: ImageNet's full
        # dataset.json (3.8 million), which a folder of a few of its images may keep; 2**22 empty lists take 150 MB.
        values = raw.count(b",") + raw.count(b"[") + raw.count(b"{")
        allowed = max(8 * (len(names) + 128), 2**22) + sum(n.count(",") + n.count("[") + n.count("{") for n in names)
        if values > allowed:
            raise ValueError(f"{where}: {values} commas and brackets, far more than labels for {len(names)} "
                             "files need")
        try:
            meta = json.loads(raw)
        except (ValueError, RecursionError) as e:              # JSONDecodeError, UnicodeDecodeError, nesting
            raise ValueError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(meta, dict):
            raise ValueError(f"{where}: expected an object {{\"labels\": [[file, class], ...]}}, "
                             f"found a {type(meta).__name__}")
        labels = meta.get("labels")
        if labels is None:
            raise ValueError(f"{where}: no labels (this is an unconditional dataset)")
        if not isinstance(labels, list) or not all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], str)
                                                   for p in labels):
            raise ValueError(f"{where}: \"labels\" must be a list of [file name, class index] pairs")
        wrong = [p for p in labels if type(p[1]) is not int or abs(p[1]) >= 2 ** 31]  # true/false, 3.0, "3", 2**63
        if wrong:
            raise ValueError(f"{where}: the class of {wrong[0][0]} is {json.dumps(wrong[0][1])}, not an integer "
                             "below 2**31")
        table = {name.replace("\\", "/"): y for name, y in labels}
        missing = [f for f in self.files if f not in table]
        if missing:
            raise ValueError(f"{where}: no label for {missing[0]} (and {len(missing) - 1} more)")
        return [table[f] for f in self.files]

    def _read(self, name):
        where = f"{self.path}/{name}"
        try:
            if self.zip is not None:
                if self.zip.getinfo(name).file_size > MAX_IMAGE_FILE:
                    raise ValueError(f"declares {self.zip.getinfo(name).file_size} bytes (limit {MAX_IMAGE_FILE})")
                return self.zip.read(name)
            if os.path.getsize(unet.check_regular_file(os.path.join(self.path, name))) > MAX_IMAGE_FILE:
                raise ValueError(f"larger than {MAX_IMAGE_FILE} bytes")
            with open(os.path.join(self.path, name), "rb") as f:
                return f.read(MAX_IMAGE_FILE + 1)
        except Exception as e:                                  # a corrupt zip member, an unreadable file, ...
            raise ValueError(f"{where}: cannot be read ({type(e).__name__}: {e})") from None

    def __len__(self):
        return len(self.files)

    def load(self, i):
        """Image i as uint8 [C, H, W]."""
        where = f"{self.path}/{self.files[i]}"
        return decode_image(self._read(self.files[i]), where, self.resolution, self.channels)

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


def one_hot(y, num_classes):
    return F.one_hot(y, num_classes).float()   # [B, num_classes]: EDM's class_labels

# ----------------------------------------------------------------------------------------------
# Models: teacher (real score, frozen), generator and fake score (both copies of the teacher), GAN head.

def build_gan_head(channels, resolution):
    """gan_head (official: cls_pred_branch; DMD2 Sec. 4.3, App. F.1): on the fake score's bottleneck [B, 768, 8, 8],
    conv 4x4/2 -> GN -> SiLU (to 4x4), conv 4x4/4 -> GN -> SiLU (to 1x1), conv 1x1 -> one logit.
    Smaller bottlenecks skip stride-2 stages; the Sequential indices match the official state dict."""
    groups = min(32, channels // 4)
    layers = []
    while resolution > 4:
        layers += [nn.Conv2d(channels, channels, 4, stride=2, padding=1), nn.GroupNorm(groups, channels), nn.SiLU()]
        resolution //= 2
    k = min(4, resolution)                                  # 4 at full size; tiny test networks may end below 4x4
    layers += [nn.Conv2d(channels, channels, k, stride=k), nn.GroupNorm(groups, channels), nn.SiLU(),
               nn.Conv2d(channels, 1, 1)]
    return nn.Sequential(*layers)


class FakeScore(nn.Module):
    """Everything the fake-score update trains (official: guidance model): the fake score's denoiser (`unet`,
    official fake_unet) and the GAN head on its bottleneck (`gan_head`, official cls_pred_branch). One module, so
    that one AdamW and one DDP wrapper cover both."""

    def __init__(self, fake_unet, gan_head):
        super().__init__()
        self.unet, self.gan_head = fake_unet, gan_head

    def forward(self, x, sigma, class_labels, classify=False):
        if not classify:
            return self.unet(x, sigma, class_labels)                    # x0_fake: [B, C, H, W]
        # The head needs only the encoder: bottleneck_only stops there (as the official code does), ~0.3 of a pass.
        rep = self.unet(x, sigma, class_labels, bottleneck_only=True)   # [B, 768, 8, 8]
        with torch.autocast(x.device.type, enabled=False):              # the head runs in fp32, as official
            return self.gan_head(rep.float()).flatten(1)                # logits: [B, 1]


def set_trainable(fake_score, gan):
    """The fake score trains; the GAN head only when the GAN is on (a frozen head is no DDP parameter either)."""
    fake_score.unet.requires_grad_(True)
    fake_score.gan_head.requires_grad_(gan)


def build_models(cfg, device, fresh=True):
    """-> teacher (frozen), generator, fake_score, real data (None with --no-gan and no --data), net_kwargs."""
    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    if cfg.preset == "gaussian":
        teacher, net, net_kwargs = gaussian_stand_in(cfg, fresh)
        data = teacher
    else:
        net = load_teacher_network(cfg)
        net_kwargs = dict(net.init_kwargs)
        teacher, data = net, load_data(cfg, net_kwargs)
    teacher = teacher.to(device).eval().requires_grad_(False)
    fake_unet = copy.deepcopy(net).to(device).train().requires_grad_(True)      # mu_fake starts as the teacher
    generator = copy.deepcopy(net).to(device).train().requires_grad_(True)      # so does G (--initialie_generator)
    with torch.no_grad():  # probe the bottleneck's shape for the head
        res = net_kwargs["img_resolution"]
        x = torch.zeros(1, net_kwargs["img_channels"], res, res, device=device)
        rep = fake_unet(x, torch.ones(1, device=device), torch.zeros(1, net_kwargs["label_dim"], device=device),
                        bottleneck_only=True)
    fake_score = FakeScore(fake_unet, build_gan_head(rep.shape[1], rep.shape[2]).to(device))
    set_trainable(fake_score, cfg.gan)
    return teacher, generator, fake_score, data, net_kwargs


def load_teacher_network(cfg):
    if cfg.teacher == "random":                                      # untrained full-size net: only for --bench timings
        return unet.EDMPrecond(**dict(unet.EDM_IMAGENET64, dropout=0.0))
    if cfg.teacher == "random-tiny":                                 # untrained tiny net: CPU dry runs of the same code
        return unet.EDMPrecond(**dict(unet.EDM_IMAGENET64, img_resolution=8, label_dim=10, **TINY_UNET))
    if cfg.teacher:
        net = unet.load_edm_pickle(cfg.teacher, dropout=0.0)         # DMD2 rebuilds the nets with dropout 0
        # load_edm_pickle keeps a tensor the file saved as an expanded view (one number at full shape) a view, but the
        # generator and the fake score copy the teacher in full: 228 kB can declare a network of 19 GB
        views = [k for k, p in net.state_dict().items() if p.numel() * p.element_size() > p.untyped_storage().nbytes()]
        if views:
            raise ValueError(f"{cfg.teacher}: {len(views)} of its tensors ({views[0]}, ...) are expanded views of "
                             "fewer numbers than their shapes hold; a trained network stores every weight")
        return net
    raise ValueError("--teacher is required (EDM pickle, e.g. edm-imagenet-64x64-cond-adm.pkl), "
                     "or use --preset gaussian")


def load_data(cfg, net_kwargs):
    res, chans, K = net_kwargs["img_resolution"], net_kwargs["img_channels"], net_kwargs["label_dim"]
    if cfg.data == "random":
        return RandomImages(res, K, chans)
    if cfg.data:
        return ImageDataset(cfg.data, res, chans, label_dim=K)
    if not cfg.gan:
        return None                                                  # stage 1 of the 1.28 recipe sees no real image
    raise ValueError("--data is required (ImageNet-64 zip/folder from EDM's dataset_tool, or one subfolder per class)")


def generate(generator, z, y, num_classes, conditioning_sigma=80.0):
    """The one-step generator (DMD2 Sec. 6 / App. F.2): x = G(80 z; sigma=80, y), z ~ N(0, I). [B, C, H, W]"""
    sigma = torch.full((z.shape[0], 1, 1, 1), conditioning_sigma, device=z.device)
    return generator(conditioning_sigma * z, sigma, one_hot(y, num_classes))


# The noise grid of all three losses: 1000 Karras sigmas (0.002..80, rho 7), flipped so that index 0 is the smallest.

def sigma_grid(cfg, device="cpu"):
    """[num_train_timesteps] ascending: the official karras_sigmas buffer."""
    return unet.karras_sigmas(cfg.num_train_timesteps, cfg.sigma_min, cfg.sigma_max, cfg.rho).flip(0).to(device)


def grid_sigmas(karras, lo, hi, n, g):
    """sigma_t for t ~ UniformInt[lo, hi), one per sample: [n, 1, 1, 1]."""
    return karras[torch.randint(lo, hi, (n,), generator=g, device=g.device)].reshape(n, 1, 1, 1)

# ----------------------------------------------------------------------------------------------
# 1. Distribution matching gradient (DMD Eq. 7-8, DMD2 Sec. 3).

def loss_distribution_matching(x, class_labels, teacher, fake_unet, karras, cfg, g):
    """Noise the generator output at a sigma from grid indices 20..980, denoise it with the teacher (x0_real) and the
    fake score (x0_fake), and form grad = (p_real - p_fake) / mean|p_real| with p = x - x0, i.e.
    grad = (x0_fake - x0_real) / mean|x - x0_real| (official compute_distribution_matching_loss). The surrogate
    0.5 * mse(x, stopgrad(x - grad)) has gradient grad / x.numel() w.r.t. x, so gradient descent moves x along -grad:
    along x0_real - x0_fake, toward what the teacher's denoiser expects and away from what the fake score explains."""
    lo, hi = int(cfg.min_step_percent * len(karras)), min(int(cfg.max_step_percent * len(karras)) + 1, len(karras))
    with torch.no_grad():
        sigma = grid_sigmas(karras, lo, hi, x.shape[0], g)                               # [B, 1, 1, 1]
        x_t = x + sigma * torch.randn(x.shape, generator=g, device=x.device)
        x0_real = teacher(x_t, sigma, class_labels).float()                               # mu_real
        x0_fake = fake_unet(x_t, sigma, class_labels).float()                             # mu_fake
        p_real = x - x0_real
        p_fake = x - x0_fake
        w = p_real.abs().mean(dim=[1, 2, 3], keepdim=True)                                # per-sample normaliser
        grad = torch.nan_to_num((p_real - p_fake) / w)                                    # [B, C, H, W]
    # "mean" reduction, as official: the step size scales with 1/(B*C*H*W), which the learning rate was tuned for.
    return 0.5 * F.mse_loss(x, (x - grad).detach())

# ----------------------------------------------------------------------------------------------
# 2. Fake score and the two time-scale update rule (DMD2 Sec. 4.2; TTUR: dfake_gen_update_ratio in the loop).

def loss_fake_score(fake_score, x, class_labels, karras, sigma_data, g):
    """The fake score's denoising loss on detached generator samples (DMD v1 Alg. 3): sigma over the whole grid,
    weight lambda(sigma) = 1/sigma^2 + 1/sigma_data^2 (EDM's weighting), mean reduction."""
    sigma = grid_sigmas(karras, 0, len(karras), x.shape[0], g)                           # [B, 1, 1, 1]
    x_t = x + sigma * torch.randn(x.shape, generator=g, device=x.device)
    x0_fake = fake_score(x_t, sigma, class_labels).float()
    weight = 1 / sigma ** 2 + 1 / sigma_data ** 2
    return (weight * (x0_fake - x) ** 2).mean()

# ----------------------------------------------------------------------------------------------
# 3. GAN head (DMD2 Sec. 4.3): a classifier on the fake score's encoder, real vs generated, both noised.

def gan_logits(fake_score, x, class_labels, karras, g):
    """Noise x at a random grid sigma ("diffusion GAN"), run the fake score's encoder and the head on its
    bottleneck. -> logits [B, 1]"""
    sigma = grid_sigmas(karras, 0, len(karras), x.shape[0], g)
    x_t = x + sigma * torch.randn(x.shape, generator=g, device=x.device)
    return fake_score(x_t, sigma, class_labels, classify=True)


def loss_gan_generator(fake_score, x_fake, class_labels, karras, g):
    """The generator's GAN loss: mean softplus(-D(x_fake)) (the logit form of -log D, issue #26)."""
    return F.softplus(-gan_logits(fake_score, x_fake, class_labels, karras, g)).mean()


def loss_gan_discriminator(fake_score, x_fake, labels_fake, x_real, labels_real, karras, g):
    """The head's loss: softplus(D(x_fake)) + softplus(-D(x_real)), each noised on its own."""
    logits_fake = gan_logits(fake_score, x_fake, labels_fake, karras, g)                 # [B, 1]
    logits_real = gan_logits(fake_score, x_real, labels_real, karras, g)                 # [B, 1]
    return (F.softplus(logits_fake) + F.softplus(-logits_real)).mean()

# ----------------------------------------------------------------------------------------------
# 4. Backward simulation (DMD2 Sec. 4.5) is for multi-step generators; this one is one-step, so it has none.
#    See sdxl.py (4-step SDXL) and toy2d.py.

# ----------------------------------------------------------------------------------------------
# The training loop (DMD2 Algorithm 1 with TTUR): every iteration a fake-score turn on the generator's samples; every
# dfake_gen_update_ratio-th iteration a generator turn first. Set-up, resume and bookkeeping follow after the loop.

def train(cfg):
    """Train from scratch, from --init_from's weights, or --resume; -> the Run (models, timings, Frechet log)."""
    run = setup(cfg)
    start_step = start(run)
    for step in range(start_step, cfg.total_steps):
        t0 = time.perf_counter()
        train_step(run, step)
        run.iter_times.append(time.perf_counter() - t0)
        bookkeeping(run, step + 1)
    if run.log is not None:
        run.log.close()
    return run


def train_step(run, step):
    """One iteration: this step's random draws, the learning rates, then the two turns."""
    cfg = run.cfg
    set_learning_rates(run, step)
    gens = [unet.batch_generator(cfg.seed, step, run.rank * run.rounds + r, run.device)   # one RNG per micro-batch,
            for r in range(run.rounds)]                                                   # same on 1 or 7 GPUs
    update_generator = step % cfg.dfake_gen_update_ratio == 0     # TTUR (DMD2 Sec. 4.2): 1 G update per 5 fake updates
    fakes = generator_turn(run, gens, step, update_generator)
    fake_score_turn(run, fakes, gens, step)


def generator_turn(run, gens, step, update):
    """x_fake = G(80 z; 80, y) for uniformly drawn classes, one micro-batch per RNG. On update steps also minimise
    loss_dm + gen_gan_weight * loss_g_gan with the fake score frozen (the GAN gradient reaches G only) and step G.
    -> [(x_fake [B, C, H, W] detached, y [B])] per micro-batch, for the fake score's turn on the same samples."""
    cfg, K, fakes, stats = run.cfg, run.num_classes, [], {}
    run.fake_score.requires_grad_(False)
    for r, g in enumerate(gens):
        with accumulating(run, run.G_ddp, r):
            z = torch.randn(run.batch_gpu, *run.image_shape, generator=g, device=run.device)   # [B, C, H, W]
            y = torch.randint(K, (run.batch_gpu,), generator=g, device=run.device)            # [B]
            with run.amp, torch.set_grad_enabled(update):
                x_fake = generate(run.G, z, y, K, cfg.conditioning_sigma).float()
            if update:
                add_stats(stats, generator_loss(run, x_fake, y, g), run.rounds)
            fakes.append((x_fake.detach(), y))
    set_trainable(run.fake_score, cfg.gan)
    if update:
        run.stats_g = optimiser_step(run, run.opt_g, run.generator, stats, step, "generator")
        update_ema(run)
    return fakes


def generator_loss(run, x_fake, y, g):
    """loss_dm (1.) + gen_gan_weight * loss_g_gan (3.), backpropagated into G. -> the losses, for the log."""
    cfg, labels = run.cfg, one_hot(y, run.num_classes)
    with run.amp:
        loss_dm = loss_distribution_matching(x_fake, labels, run.teacher_fn, run.fake_unet_fn, run.karras, cfg, g)
        loss, stats = loss_dm, dict(loss_dm=loss_dm)
        if cfg.gan:
            loss_g_gan = loss_gan_generator(run.fake_score_fn, x_fake, labels, run.karras, g)
            loss, stats["loss_g_gan"] = loss + cfg.gen_gan_weight * loss_g_gan, loss_g_gan
    (loss / run.rounds).backward()
    return stats


def fake_score_turn(run, fakes, gens, step):
    """Every iteration: the fake score learns the generator's current samples (2.) and, with the GAN on, the head
    learns real from generated (3.); then one AdamW step of both."""
    stats = {}
    for r, ((x_fake, y), g) in enumerate(zip(fakes, gens)):
        with accumulating(run, run.D_ddp, r):
            add_stats(stats, fake_score_loss(run, x_fake, y, g), run.rounds)
    run.stats_d = optimiser_step(run, run.opt_d, run.fake_score, stats, step, "fake score")


def fake_score_loss(run, x_fake, y, g):
    """loss_fake (2.) + fake_gan_weight * loss_d (3.) on one micro-batch, backpropagated. -> the losses."""
    cfg, K = run.cfg, run.num_classes
    x_real, y_real = run.data.sample(run.batch_gpu, g) if cfg.gan else (None, None)      # [B, C, H, W], [B]
    with run.amp:
        loss_fake = loss_fake_score(run.D, x_fake, one_hot(y, K), run.karras, cfg.sigma_data, g)
        loss, stats = loss_fake, dict(loss_fake=loss_fake)
        if cfg.gan:                                             # --no-gan: no real batch, no head pass at all
            loss_d = loss_gan_discriminator(run.D, x_fake, one_hot(y, K), x_real, one_hot(y_real, K), run.karras, g)
            loss, stats["loss_d"] = loss + cfg.fake_gan_weight * loss_d, loss_d
    (loss / run.rounds).backward()
    return stats


def optimiser_step(run, opt, module, stats, step, name):
    """Clip, stop every rank on a non-finite loss (before the step), step, and stop on non-finite weights (after the
    step, before any save: a corrupted optimiser state can turn finite gradients into NaN weights)."""
    key = "grad_norm_g" if module is run.generator else "grad_norm_fake"
    stats[key] = torch.nn.utils.clip_grad_norm_(module.parameters(), run.cfg.max_grad_norm, foreach=True)
    logged = unet.check_finite(stats, step, run.world, run.ckpt_path)
    opt.step()
    opt.zero_grad(set_to_none=True)
    unet.check_finite_weights({name: module}, step, run.world, run.ckpt_path)
    return logged


def set_learning_rates(run, step):
    """Constant after a linear warm-up from 0 (diffusers' "constant_with_warmup"; warmup_steps in iterations)."""
    for opt, lr in ((run.opt_g, run.cfg.generator_lr), (run.opt_d, run.cfg.fake_score_lr)):
        opt.param_groups[0]["lr"] = lr * min(1.0, step / run.cfg.warmup_steps) if run.cfg.warmup_steps else lr


def accumulating(run, ddp, r):
    """Gradient accumulation over micro-batches: DDP all-reduces once, at the last round."""
    return contextlib.nullcontext() if run.world == 1 or r == run.rounds - 1 else ddp.no_sync()


def add_stats(stats, new, rounds):
    for k, v in new.items():
        stats[k] = stats.get(k, 0) + v.detach() / rounds


@torch.no_grad()
def update_ema(run):
    if run.generator_ema is not None:                  # ema += (1 - decay) (p - ema), all tensors in one call
        torch._foreach_lerp_(list(run.generator_ema.parameters()), list(run.generator.parameters()),
                             1 - run.cfg.ema_decay)

# ----------------------------------------------------------------------------------------------
# Set-up, resume and bookkeeping of the loop.

@dataclass
class Run:
    """What the loop works on; built by setup()."""
    cfg: Config
    rank: int
    world: int
    device: torch.device
    teacher: nn.Module
    generator: nn.Module
    fake_score: FakeScore
    data: object
    net_kwargs: dict
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    generator_ema: nn.Module            # None without --ema_decay
    karras: torch.Tensor                # [1000] ascending sigma grid
    batch_gpu: int
    rounds: int                         # gradient-accumulation rounds per iteration
    amp: object
    G: nn.Module = None                 # what the loop calls (DDP-wrapped and/or compiled); G_ddp/D_ddp for no_sync
    D: nn.Module = None
    G_ddp: nn.Module = None
    D_ddp: nn.Module = None
    teacher_fn: object = None           # teacher, fake_score.unet and fake_score as called without parameter gradients
    fake_unet_fn: object = None
    fake_score_fn: object = None
    log: object = None
    iter_times: list = field(default_factory=list)
    frechet: list = field(default_factory=list)     # (step, exact FD per class), Gaussian preset
    stats_g: dict = field(default_factory=dict)
    stats_d: dict = field(default_factory=dict)
    best_fid: float = float("inf")
    fid_tools: tuple = None
    t_log: float = 0.0
    step_log: int = 0

    num_classes = property(lambda self: self.net_kwargs["label_dim"])
    image_shape = property(lambda self: (self.net_kwargs["img_channels"],) + (self.net_kwargs["img_resolution"],) * 2)
    ckpt_path = property(lambda self: os.path.join(self.cfg.outdir, "checkpoint.pt"))
    gen_path = property(lambda self: os.path.join(self.cfg.outdir, "generator.pt"))
    ema_or_g = property(lambda self: self.generator_ema if self.generator_ema is not None else self.generator)


def setup(cfg):
    """Processes, batch split, models, optimisers, precision. -> Run (weights as initialised; start() loads)."""
    check_config(cfg)
    rank, world, device = unet.init_distributed(cfg.device)
    if cfg.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if cfg.batch_gpu == 0 and cfg.batch_size % world:
        raise ValueError(f"--batch_size {cfg.batch_size} is not divisible by {world} processes")
    batch_gpu = cfg.batch_gpu or cfg.batch_size // world
    rounds = cfg.batch_size // (batch_gpu * world)
    if rounds * batch_gpu * world != cfg.batch_size:
        raise ValueError(f"--batch_size {cfg.batch_size} != batch_gpu {batch_gpu} x {world} processes x an integer")
    resuming = cfg.resume and os.path.exists(os.path.join(cfg.outdir, "checkpoint.pt"))
    teacher, generator, fake_score, data, net_kwargs = build_models(cfg, device, fresh=not (resuming or cfg.init_from))
    adamw = dict(betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay, fused=True)  # one kernel: same update
    opt_g = torch.optim.AdamW(generator.parameters(), lr=cfg.generator_lr, **adamw)
    opt_d = torch.optim.AdamW(fake_score.parameters(), lr=cfg.fake_score_lr, **adamw)
    generator_ema = copy.deepcopy(generator).eval().requires_grad_(False) if cfg.ema_decay > 0 else None
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and cfg.precision == "bf16")
    return Run(cfg, rank, world, device, teacher, generator, fake_score, data, net_kwargs, opt_g, opt_d, generator_ema,
               sigma_grid(cfg, device), batch_gpu, rounds, amp)


def start(run):
    """Remove a killed run's temporaries, load --resume or --init_from, wrap for DDP/compile, open the log.
    -> the first step."""
    cfg = run.cfg
    if not cfg.bench:                                                     # --bench writes nothing
        os.makedirs(cfg.outdir, exist_ok=True)
    if run.rank == 0 and not cfg.bench:
        unet.remove_stale_temporaries(cfg.outdir, own_files(cfg))
    if cfg.resume and os.path.exists(run.ckpt_path):
        start_step = resume(run)
    else:
        if cfg.resume and run.rank == 0 and not cfg.bench:      # a mistyped --outdir should not pass unnoticed
            print(f"--resume: no {run.ckpt_path} yet, so this run starts at step 0")
        if cfg.init_from:
            init_from(run, cfg.init_from)
        torch.manual_seed(cfg.seed + run.rank)                            # per-rank seeds (dropout etc.)
        np.random.seed(cfg.seed + run.rank)
        random.seed(cfg.seed + run.rank)
        start_step = 0
    wrap(run)
    if cfg.fid_every:  # load the detector and the reference statistics now, so that a bad path fails before training
        run.fid_tools = (fid.load_inception(cfg.inception or None, run.device), fid.load_reference(cfg.fid_ref))
    run.log = unet.open_run_log(cfg.outdir, start_step) if run.rank == 0 and not cfg.bench else None
    run.t_log, run.step_log = time.time(), start_step
    if cfg.preset == "gaussian" and run.rank == 0 and start_step == 0 and cfg.sample_every:
        run.frechet.append((0, report_frechet(0, run.ema_or_g, run.teacher, cfg, run.log)))
    return start_step


def wrap(run):
    """DDP averages gradients over ranks (broadcast_buffers=False: the buffers are constants); optional compile."""
    run.G_ddp = DDP(run.generator, broadcast_buffers=False) if run.world > 1 else run.generator
    run.D_ddp = DDP(run.fake_score, broadcast_buffers=False) if run.world > 1 else run.fake_score
    compiled = torch.compile if run.cfg.compile else (lambda m: m)
    run.G, run.D = compiled(run.G_ddp), compiled(run.D_ddp)
    run.teacher_fn, run.fake_unet_fn = compiled(run.teacher), compiled(run.fake_score.unet)   # no DDP: no param grads
    run.fake_score_fn = compiled(run.fake_score)


def bookkeeping(run, done):
    """After `done` iterations: log line, sample grid (+ exact Frechet distance), FID, checkpoints."""
    cfg = run.cfg
    if run.rank == 0 and (done % cfg.log_every == 0 or done == cfg.total_steps):
        stats = [f"{k} {v:.4g}" for k, v in {**run.stats_g, **run.stats_d}.items()]
        speed = cfg.batch_size * (done - run.step_log) / max(time.time() - run.t_log, 1e-9)
        write_log(run, "  ".join([f"step {done:7d}", *stats, f"{speed:.1f} img/s"]))
        run.t_log, run.step_log = time.time(), done
    if cfg.sample_every and done % cfg.sample_every == 0 and run.rank == 0:
        with torch.no_grad(), run.amp:
            grid_z, grid_y = sample_grid_inputs(run)
            save_grid(generate(run.ema_or_g, grid_z, grid_y, run.num_classes, cfg.conditioning_sigma),
                      os.path.join(cfg.outdir, f"samples_{done:07d}.png"))
        if cfg.preset == "gaussian":
            run.frechet.append((done, report_frechet(done, run.ema_or_g, run.teacher, cfg, run.log)))
    if cfg.fid_every and done % cfg.fid_every == 0:
        fid_during_training(run, done)
    if cfg.bench:
        return
    if cfg.keep_every and done % cfg.keep_every == 0 and run.rank == 0:
        keep(run, done)           # before checkpoint.pt: a kill between the two redoes this step on --resume
    if (cfg.ckpt_every and done % cfg.ckpt_every == 0) or done == cfg.total_steps:
        save(run, done)


def keep(run, step):
    """generator_XXXXXXX.pt: the generator, its EMA and the fake score at `step` (--keep_every; evaluate scores
    them, and stage 2 starts from one)."""
    record = generator_record(run, step, with_fake_score=True)
    unet.save_checkpoint(record, os.path.join(run.cfg.outdir, kept_name(step)))


def write_log(run, line):
    print(line, flush=True)
    if run.log is not None:
        run.log.write(line + "\n")
        run.log.flush()


def sample_grid_inputs(run):
    """The same 64 noises and classes for every grid: rows cycle through (or spread over) the classes."""
    K, device = run.num_classes, run.device
    grid_z = torch.randn(64, *run.image_shape, generator=torch.Generator().manual_seed(1)).to(device)
    rows = torch.arange(64, device=device) // 8
    return grid_z, rows * K // 8 if K >= 8 else rows % K


def fid_during_training(run, done):
    score = evaluate_fid(run.ema_or_g, run.num_classes, *run.fid_tools, run.cfg.fid_num, run.device, run.rank,
                         run.world, quantize=run.cfg.quantize, conditioning_sigma=run.cfg.conditioning_sigma)
    if run.rank == 0:
        write_log(run, f"step {done:7d}  FID {score:.3f}")
        if score < run.best_fid:
            run.best_fid = score
            record = dict(generator_record(run, done), fid=score)
            unet.save_checkpoint(record, os.path.join(run.cfg.outdir, "generator_best.pt"))

# ----------------------------------------------------------------------------------------------
# Evaluation as DMD2 reports it (main/edm/test_folder_edm.py, paper App. G): 50,000 class-balanced one-step samples
# drawn in fp32, quantised as ((x + 1) * 127.5).clamp(0, 255) -> uint8 (truncation), FID with EDM's Inception and
# reference statistics (fid.py; fid.to_uint8 quantises); every kept checkpoint is scored and the best one is reported.

def parse_range(s, flag="--seeds"):
    """'0-63' or '1,5,9-11' -> [0, ..., 63] / [1, 5, 9, 10, 11]."""
    out = []
    for part in s.split(","):
        a, _, b = part.partition("-")
        try:
            first, last = int(a), int(b or a)
        except ValueError:
            raise ValueError(f"{flag} {s!r}: expected numbers and ranges such as 0-63 or 1,5,9-11") from None
        if last < first:
            raise ValueError(f"{flag} {s!r}: the range {part} is empty (write it low-high)")
        out += list(range(first, last + 1))
    return out


@torch.no_grad()
def generate_uint8(generator, seeds, labels, num_classes, device, batch=64, quantize="dmd2", conditioning_sigma=80.0):
    """Yield uint8 image batches [B, C, H, W], drawn in fp32 (autocast off, whatever the caller's context). Image k's
    z comes from seed seeds[k] alone (EDM's per-seed noise), so it does not depend on the batch size or GPU count."""
    shape = (generator.img_channels, generator.img_resolution, generator.img_resolution)
    for i in range(0, len(seeds), batch):
        z = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds[i:i + batch]])
        y = torch.as_tensor(labels[i:i + batch], device=device)
        with torch.autocast(torch.device(device).type, enabled=False):
            x = generate(generator, z.to(device), y, num_classes, conditioning_sigma)
        yield fid.to_uint8(x, quantize)


@torch.no_grad()
def evaluate_fid(generator, num_classes, detector, ref, num=50_000, device="cpu", rank=0, world=1, batch=64,
                 quantize="dmd2", conditioning_sigma=80.0):
    """FID (through fid.py) of `num` class-balanced samples: image i has seed i and class i % num_classes. Rank r
    makes images r, r + world, ...; the float64 feature moments are summed over ranks."""
    seeds = list(range(rank, num, world))
    images = generate_uint8(generator, seeds, [s % num_classes for s in seeds], num_classes, device, batch, quantize,
                            conditioning_sigma)
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
    """A generator from our checkpoint.pt / generator*.pt, or a bare EDMPrecond state dict such as the official DMD2
    ImageNet release (pytorch_model.bin), which has the full-size EDM_IMAGENET64 config. -> (net, net_kwargs)"""
    ckpt = unet.load_checkpoint(path)
    if isinstance(ckpt, dict) and "generator" in ckpt:
        unet.require_keys(ckpt, ["net_kwargs", "generator"], path, "an imagenet64.py generator or checkpoint")
        check_net_kwargs(ckpt["net_kwargs"], path)
        net_kwargs, state = ckpt["net_kwargs"], ema_or_generator_state(ckpt)
    elif isinstance(ckpt, dict) and ckpt and all(isinstance(k, str) and k.startswith("model.") for k in ckpt):
        net_kwargs, state = dict(unet.EDM_IMAGENET64, dropout=0.0), ckpt
    else:
        raise ValueError(f"{path}: neither an imagenet64.py checkpoint nor an EDMPrecond state dict")
    if not (type(net_kwargs.get("label_dim")) is int and net_kwargs["label_dim"] >= 1):
        raise ValueError(f"{path}: net_kwargs has label_dim {unet.describe_value(net_kwargs.get('label_dim'))}; "
                         "a class-conditional generator needs an integer of at least 1")
    # Samples are written as grey or RGB images.
    channels = net_kwargs.get("img_channels")
    if channels not in (1, 3):
        raise ValueError(f"{path}: net_kwargs has img_channels {unet.describe_value(channels)}; a generator here makes "
                         f"images with 1 or 3 channels")
    try:                                    # the sizes come from the file: checked on meta before any allocation
        with torch.device("meta"):
            probe = unet.EDMPrecond(**net_kwargs)
    except Exception as e:
        raise ValueError(f"{path}: net_kwargs do not describe an EDMPrecond: {type(e).__name__}: "
                         f"{str(e)[:300]}") from None
    problem = unet.edm_size_problem(net_kwargs, probe)    # 32768 pixels a side wanted 12.9 GB per image
    if problem:
        raise ValueError(f"{path}: the generator is too large to use: {problem}")
    with warnings.catch_warnings():       # keys and shapes checked on meta: torch warns that it copies nothing
        warnings.simplefilter("ignore", UserWarning)
        load_state(probe, state, path, "the generator")
    net = unet.EDMPrecond(**net_kwargs)
    load_state(net, state, path, "the generator")
    check_finite_weights(net, path, "the generator")          # else it would write black images, with no error
    return net.to(device).eval().requires_grad_(False), net_kwargs


def check_finite_weights(module, path, what):
    """ValueError naming path and what if any of module's weights is NaN or inf (a file's, before they are used)."""
    bad = [name for name, p in module.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise ValueError(f"{path}: {what} has non-finite weights (NaN or inf) in {len(bad)} tensors, e.g. {bad[0]}")


def evaluate_folder(folder, detector, ref, extra=(), num=50_000, device="cpu", rank=0, world=1, batch=64,
                    quantize="dmd2", ref_name=""):
    """Score every kept generator_XXXXXXX.pt in `folder` and the files in `extra` (e.g. the official
    pytorch_model.bin), as the official polling evaluator does; folder/fid.json records every score and the best.
    Files already scored under the same protocol are not scored again. -> dict(scores={file: fid}, best=file)"""
    files = sorted(glob.glob(os.path.join(folder, "generator_[0-9]*.pt"))) + [os.fspath(e) for e in extra]
    if not files:
        raise FileNotFoundError(f"{folder}: no generator_XXXXXXX.pt to score (train with --keep_every) and no --ckpt")
    protocol = dict(num=num, quantize=quantize, ref=ref_name, precision="fp32", classes="balanced, seed i: class i%K")
    os.makedirs(folder, exist_ok=True)                                   # e.g. a folder just for the release's score
    record_path = os.path.join(folder, "fid.json")
    stamps = {path: file_stamp(path) for path in files}
    scores, scored = previous_scores(record_path, protocol, stamps)
    for path in files:
        if path in scores:
            continue
        generator, kw = load_generator(path, device)
        scores[path] = evaluate_fid(generator, kw["label_dim"], detector, ref, num, device, rank, world, batch,
                                    quantize)
        scored[path] = stamps[path]
        if rank == 0:
            print(f"{path}: FID {scores[path]:.4f} ({num} samples)", flush=True)
            write_json(record_path, dict(protocol=protocol, scores=scores, best=min(scores, key=scores.get),
                                         files=scored))
    best = min(scores, key=scores.get)
    if rank == 0:
        write_json(record_path, dict(protocol=protocol, scores=scores, best=best, files=scored))
        print(f"best: {best}  FID {scores[best]:.4f}  (all scores in {record_path})")
    return dict(scores=scores, best=best)


def file_stamp(path):
    """[size, modification time in ns]: a kept file written again (e.g. by another run) is scored again."""
    try:
        st = os.stat(path)
    except OSError:                     # missing: load_generator says so
        return None
    return [st.st_size, st.st_mtime_ns]


MAX_FID_RECORD_BYTES = 2 ** 24     # fid.json: a score and a stamp per file, about 200 bytes each


def previous_scores(path, protocol, stamps):
    """({file: FID}, {file: file_stamp}) from an earlier evaluate of the same folder with the same protocol, without
    the files that have changed since (stamps: each file's stamp now). A file since removed keeps its score."""
    try:
        with open(unet.check_regular_file(path), "rb") as f:  # not a pipe or a device, which would block or never end
            raw = f.read(MAX_FID_RECORD_BYTES + 1)
        if len(raw) > MAX_FID_RECORD_BYTES:                 # json.load would take about 25x its size in memory
            return {}, {}
        old = json.loads(raw)
        if old.get("protocol") != protocol:
            return {}, {}
        scores, scored = dict(old["scores"]), dict(old.get("files", {}))
        # A record edited by hand: score again. An FID is a finite number from 0; NaN would make min() pick by
        # order, and an integer of 400 digits has no float to print.
        if not all(isinstance(f, str) and type(v) in (int, float) and 0 <= v < 1e6 for f, v in scores.items()):
            return {}, {}
        scores = {f: float(v) for f, v in scores.items()}
        changed = [f for f in scores if f in stamps and scored.get(f) != stamps[f]]
        for f in changed:
            del scores[f]
            scored.pop(f, None)
        return scores, scored
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return {}, {}


def write_json(path, obj):
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def evaluate_main(argv):
    p = argparse.ArgumentParser(prog="imagenet64.py evaluate", formatter_class=unet.HelpFormatter,
                                description="FID of every kept generator in a folder (and of extra files), as DMD2 "
                                            "reports it: fp32 samples, DMD2's uint8 quantisation, class-balanced.")
    p.add_argument("--folder", required=True, help="run folder with generator_XXXXXXX.pt; fid.json is written here")
    p.add_argument("--ckpt", action="append", default=[], help="also score this file (repeatable), e.g. the "
                   "official pytorch_model.bin")
    p.add_argument("--fid_ref", required=True, help="reference statistics .npz (EDM's imagenet-64x64.npz)")
    p.add_argument("--inception", default="", help="Inception weights for fid.load_inception ('' = fid.py's default)")
    p.add_argument("--num", type=int, default=50_000, help="samples per checkpoint (class-balanced)")
    p.add_argument("--quantize", default="dmd2", choices=fid.QUANTIZE, help="dmd2: truncate as DMD2; edm: round as EDM")
    p.add_argument("--batch", type=int, default=64, help="images per forward pass")
    p.add_argument("--device", default="", help="'' = cuda if available")
    a = p.parse_args(argv)
    if a.num < 2 or a.batch < 1:                # a covariance needs two samples
        raise ValueError(f"need --num >= 2 and --batch >= 1, got {a.num} and {a.batch}")
    rank, world, device = unet.init_distributed(a.device)
    ref = fid.load_reference(a.fid_ref)         # before the detector: a wrong file fails in seconds
    detector = fid.load_inception(a.inception or None, device)
    return evaluate_folder(a.folder, detector, ref, a.ckpt, a.num, device, rank, world, a.batch, a.quantize,
                           os.path.basename(a.fid_ref))


def sample_main(argv):
    p = argparse.ArgumentParser(prog="imagenet64.py sample", formatter_class=unet.HelpFormatter,
                                description="Write one-step samples of a trained generator as PNGs or one .npz.")
    p.add_argument("--ckpt", required=True, help="checkpoint.pt / generator.pt, or an EDMPrecond state dict")
    p.add_argument("--seeds", default="0-63", help="e.g. 0-63 or 0,5,9-11")
    p.add_argument("--classes", default="", help="classes cycled over the seeds, e.g. 0-9 "
                                                 "(default: seed %% num_classes)")
    p.add_argument("--out", required=True, help="a folder (PNGs named by seed) or a file ending in .npz "
                                                "(arr_0 [N,H,W,C] uint8, labels)")
    p.add_argument("--quantize", default="dmd2", choices=fid.QUANTIZE, help="dmd2: truncate as DMD2; edm: round as EDM")
    p.add_argument("--batch", type=int, default=64, help="images per forward pass")
    p.add_argument("--device", default="", help="'' = cuda if available")
    a = p.parse_args(argv)
    device = unet.check_device(a.device)
    if a.batch < 1:
        raise ValueError(f"--batch must be at least 1, got {a.batch}")
    seeds = parse_range(a.seeds)
    repeated = sorted(k for k, n in collections.Counter(seeds).items() if n > 1)
    if repeated:                                # one file per seed: a repeat would be counted but not written
        raise ValueError(f"--seeds {a.seeds}: lists seed(s) {repeated[:5]} more than once")
    classes = parse_range(a.classes, "--classes") if a.classes else None
    if os.path.splitext(a.out)[1].lower() in (".png", ".jpg", ".jpeg", ".npy", ".pt"):
        raise ValueError(f"--out {a.out}: give a folder (PNGs named by seed) or a file ending in .npz")
    made = fid.missing_folders(a.out if a.out.endswith(".npz") else os.path.join(a.out, "x.png"))
    if a.out.endswith(".npz"):                  # the destination is checked before the images are made, not after
        fid.check_dest(a.out)
    else:
        fid.check_folder(a.out)
    try:
        write_samples(a, seeds, classes, device)
    except BaseException:                       # an error or Ctrl-C: no empty folders left behind
        fid.remove_empty_folders(made)
        raise


def write_samples(a, seeds, classes, device):
    """sample_main's work once its options are checked: load the generator, make the images, write them."""
    generator, net_kwargs = load_generator(a.ckpt, device)
    K = net_kwargs["label_dim"]
    if classes and not 0 <= min(classes) <= max(classes) < K:
        raise ValueError(f"--classes {a.classes}: this generator has classes 0-{K - 1}")
    labels = [classes[i % len(classes)] for i in range(len(seeds))] if classes else [s % K for s in seeds]
    batches = generate_uint8(generator, seeds, labels, K, device, a.batch, a.quantize)
    images = torch.cat([x.cpu() for x in batches]).permute(0, 2, 3, 1).numpy()          # [N, H, W, C]
    if a.out.endswith(".npz"):
        tmp = f"{a.out}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:              # a stopped run leaves no half-written .npz under the final name
            np.savez(f, arr_0=images, labels=np.asarray(labels))
        os.replace(tmp, a.out)
    else:
        for s, img in zip(seeds, images):
            PIL.Image.fromarray(img.squeeze(2) if img.shape[2] == 1 else img).save(os.path.join(a.out, f"{s:06d}.png"))
    print(f"wrote {len(seeds)} images to {a.out}")

# ----------------------------------------------------------------------------------------------
# The CPU stand-in for the teacher (--preset gaussian): class-conditional Gaussians x|y ~ N(mu_y, Sigma_y), whose
# denoiser is exact, a short EDM pre-training that plays the teacher checkpoint, and the exact Frechet distance.

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

    def __init__(self, num_classes=4, img_resolution=8, img_channels=3, seed=0, noise_std=0.1, kernel_size=5,
                 widths=(1.3, 2.0), scale=0.8):
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
        bump = bump / bump.square().sum((1, 2), keepdim=True).sqrt()       # unit-norm spatial kernels
        kernel = scale * mix[:, :, :, None, None] * bump[:, None, None]
        eye = torch.eye(d, dtype=torch.float64).reshape(d, C, R, R)
        T = torch.stack([F.conv2d(eye, kernel[y], padding=k // 2).reshape(d, d).T
                         for y in range(num_classes)])                    # [K, d, d]
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
        eps = torch.randn(n, self.mu.shape[1], generator=generator, device=generator.device)   # [n, d]
        x = self.mu[y].clone()                                           # [n, d]
        for k in range(self.num_classes):                                # per class: no [n, d, d] gather of U
            idx = (y == k).nonzero().squeeze(1)
            x[idx] += (eps[idx] * self.lam[k].sqrt()) @ self.U[k].T
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
            shape = (n, teacher.img_channels, teacher.img_resolution, teacher.img_resolution)
            z = torch.randn(shape, generator=g, device=device)
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


def gaussian_stand_in(cfg, fresh=True):
    """-> the exact Gaussian teacher (also the real data), the tiny network that generator and fake score copy
    (pre-trained on the Gaussians unless its weights come from a checkpoint anyway), and its kwargs."""
    teacher = GaussianTeacher(cfg.gauss_classes, cfg.gauss_resolution, 3, cfg.seed, cfg.gauss_noise_std)
    net_kwargs = dict(img_resolution=cfg.gauss_resolution, img_channels=3, label_dim=cfg.gauss_classes,
                      sigma_data=cfg.sigma_data, **TINY_UNET)
    net = unet.EDMPrecond(**net_kwargs)
    if fresh:
        pretrain_edm(net, teacher, cfg.pretrain_steps, seed=cfg.seed, sigma_data=cfg.sigma_data)
    return teacher, net, net_kwargs

# ----------------------------------------------------------------------------------------------
# Run plumbing: checkpoints, resume and --init_from, RNG states, sample grids, option checks.

RESUME_KEYS = ["step", "cfg", "net_kwargs", "generator", "fake_score", "opt_g", "opt_d", "rng"]


def kept_name(step):
    return f"generator_{step:07d}.pt"


def own_files(cfg):
    """The files this run writes atomically, with save_checkpoint or unet.open_run_log (a kill may leave
    NAME.<random>.tmp beside each)."""
    kept = range(cfg.keep_every, cfg.total_steps + 1, cfg.keep_every) if cfg.keep_every else []
    return ["checkpoint.pt", "generator.pt", "generator_best.pt", "log.txt", *map(kept_name, kept)]


def generator_record(run, step, with_fake_score=False):
    """generator.pt / generator_XXXXXXX.pt: what `sample`, `evaluate` and load_generator need; kept files also hold
    the raw generator and the fake score, for --init_from."""
    record = dict(step=step, net_kwargs=run.net_kwargs, generator=run.ema_or_g.state_dict())
    if with_fake_score:
        record.update(generator=run.generator.state_dict(), fake_score=run.fake_score.state_dict(),
                      generator_ema=run.generator_ema.state_dict() if run.generator_ema is not None else None)
    return record


def save(run, step):
    """generator.pt first, then checkpoint.pt, each atomically (temporary file + rename): a kill between the two
    leaves checkpoint.pt behind generator.pt, never ahead of it, so --resume redoes the steps and rewrites both."""
    rngs = [None] * run.world
    if run.world > 1:
        dist.all_gather_object(rngs, rng_state())
    else:
        rngs = [rng_state()]
    if run.rank != 0:
        return
    unet.save_checkpoint(generator_record(run, step), run.gen_path)
    unet.save_checkpoint(dict(step=step, cfg=dataclasses.asdict(run.cfg), net_kwargs=run.net_kwargs,
                              generator=run.generator.state_dict(), fake_score=run.fake_score.state_dict(),
                              opt_g=run.opt_g.state_dict(), opt_d=run.opt_d.state_dict(),
                              generator_ema=run.generator_ema.state_dict() if run.generator_ema is not None else None,
                              rng=rngs, best_fid=run.best_fid), run.ckpt_path)


def check_net_kwargs(net_kwargs, path):
    """EDMPrecond's arguments as a checkpoint records them (unet.check_plain_dict), checked before they are compared
    or printed."""
    unet.check_plain_dict(net_kwargs, path, "net_kwargs")


def ema_or_generator_state(ckpt):
    """The EMA's weights of a checkpoint, or the generator's where it kept none (None: --ema_decay 0). Not `ema or
    generator`: the truth of a tensor a hostile file put there would raise torch's RuntimeError."""
    ema = ckpt.get("generator_ema")
    return ckpt["generator"] if ema is None or (isinstance(ema, dict) and not ema) else ema


def load_state(module, state, path, what):
    """load_state_dict (strict) with an error that names the file instead of torch's bare RuntimeError."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, TypeError, ValueError, AttributeError, KeyError, IndexError) as e:
        raise ValueError(f"{path}: {what} does not fit this network: {str(e)[:600]}") from None


def resume(run):
    """Everything from checkpoint.pt (weights, optimisers, EMA, RNG states). -> the step to continue from."""
    path, cfg = run.ckpt_path, run.cfg
    ckpt = unet.require_keys(unet.load_checkpoint(path), RESUME_KEYS, path, "an imagenet64.py checkpoint.pt")
    check_net_kwargs(ckpt["net_kwargs"], path)
    unet.check_step(ckpt["step"], path)
    if ckpt["cfg"] is not None:
        unet.check_plain_dict(ckpt["cfg"], path, "its cfg")
    if ckpt["net_kwargs"] != run.net_kwargs:
        raise ValueError(f"{path}: written for the network {ckpt['net_kwargs']}, this run builds {run.net_kwargs}")
    load_state(run.generator, ckpt["generator"], path, "the generator")
    load_state(run.fake_score, ckpt["fake_score"], path, "the fake score")
    load_state(run.opt_g, ckpt["opt_g"], path, "the generator's optimiser state")
    load_state(run.opt_d, ckpt["opt_d"], path, "the fake score's optimiser state")
    unet.check_adamw_state(run.opt_g, path, "the generator's optimiser state")
    unet.check_adamw_state(run.opt_d, path, "the fake score's optimiser state")
    if run.generator_ema is not None:
        load_state(run.generator_ema, ema_or_generator_state(ckpt), path, "the generator EMA")
    if isinstance(ckpt["rng"], list) and len(ckpt["rng"]) == run.world:
        try:
            set_rng_state(ckpt["rng"][run.rank])
        except (TypeError, KeyError, ValueError, IndexError, AttributeError, RuntimeError) as e:
            raise ValueError(f"{path}: its RNG state cannot be restored ({type(e).__name__}: {str(e)[:200]})") from None
    if isinstance(ckpt.get("best_fid"), float):      # generator_best.pt is replaced only by a lower FID than this
        run.best_fid = ckpt["best_fid"]
    saved_cfg = ckpt["cfg"] if isinstance(ckpt["cfg"], dict) else {}
    changed = {k: (v, getattr(cfg, k)) for k, v in saved_cfg.items()
               if getattr(cfg, k, v) != v and k not in ("resume", "total_steps")}
    if run.rank == 0:
        print(f"resumed from {path} at step {ckpt['step']}" + (f"; changed settings: {changed}" if changed else ""))
        repair_generator_file(run, ckpt["step"])
    return ckpt["step"]


def repair_generator_file(run, step):
    """A run killed between its two writes may have left generator.pt at another step than checkpoint.pt: rewrite
    it from the checkpoint's weights, so that a finished run always ends with the two in agreement."""
    try:
        written = unet.load_checkpoint(run.gen_path).get("step")
    except (FileNotFoundError, ValueError, AttributeError):
        written = None
    if not (type(written) is int and 0 <= written < 2 ** 62):   # it is printed below
        written = None
    if written != step:
        unet.save_checkpoint(generator_record(run, step), run.gen_path)
        print(f"{run.gen_path}: was at step {written}, rewritten at step {step} from {run.ckpt_path}")


def init_from(run, path):
    """Weights only, as the official --ckpt_only_path: the generator and the fake score's network from another run's
    checkpoint.pt or kept generator_XXXXXXX.pt. The optimisers, the warm-up, the GAN head and the step start fresh."""
    what = "an imagenet64.py checkpoint.pt or generator_XXXXXXX.pt with the generator and the fake score"
    ckpt = unet.require_keys(unet.load_checkpoint(path), ["net_kwargs", "generator", "fake_score"], path, what)
    if not isinstance(ckpt["fake_score"], dict):
        raise ValueError(f"{path}: not {what} (fake_score is a {type(ckpt['fake_score']).__name__})")
    check_net_kwargs(ckpt["net_kwargs"], path)
    if ckpt["net_kwargs"] != run.net_kwargs:
        raise ValueError(f"{path}: written for the network {ckpt['net_kwargs']}, this run builds {run.net_kwargs}")
    load_state(run.generator, ckpt["generator"], path, "the generator")
    fake_unet = {k[len("unet."):]: v for k, v in ckpt["fake_score"].items() if str(k).startswith("unet.")}
    load_state(run.fake_score.unet, fake_unet, path, "the fake score")
    check_finite_weights(run.generator, path, "the generator")   # else training would stop at its first step,
    check_finite_weights(run.fake_score.unet, path, "the fake score")   # naming no file
    if run.generator_ema is not None:
        run.generator_ema.load_state_dict(run.generator.state_dict())
    step = ckpt.get("step")                 # printed only: a hostile value (a list sharing itself) would never end
    if run.rank == 0:
        print(f"initialised generator and fake score from {path} "
              f"(step {step if type(step) is int and 0 <= step < 2 ** 62 else 'unknown'}); optimisers, warm-up and "
              f"GAN head start fresh")


def rng_state():
    """Python / NumPy / torch (CPU and CUDA) RNG states, as tensors and plain values (weights_only-safe)."""
    np_state = np.random.get_state(legacy=False)
    np_state["state"]["key"] = torch.from_numpy(np_state["state"]["key"].astype(np.int64))
    return dict(python=random.getstate(), numpy=np_state, torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def set_rng_state(s):
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    key = s["numpy"]["state"]["key"].numpy().astype(np.uint32)
    np.random.set_state(dict(s["numpy"], state=dict(s["numpy"]["state"], key=key)))
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_grid(images, path, nrow=8):
    """images [N, C, H, W] in [-1, 1] -> one PNG grid."""
    x = (images.float() * 127.5 + 128).clip(0, 255).to(torch.uint8).cpu()
    n, c, h, w = x.shape
    x = x.reshape(-1, nrow, c, h, w).permute(0, 3, 1, 4, 2).reshape(-1, nrow * w, c)  # [rows*H, nrow*W, C]
    PIL.Image.fromarray(x.squeeze(2).numpy()).save(path)


def check_config(cfg):
    """Refuse impossible options at start-up, each with its name and why."""
    errors = unet.option_errors(
        cfg, at_least_one=("batch_size", "dfake_gen_update_ratio", "log_every", "gauss_classes", "gauss_resolution"),
        at_least_zero=("total_steps", "batch_gpu", "generator_lr", "fake_score_lr", "weight_decay", "warmup_steps",
                       "max_grad_norm", "gen_gan_weight", "fake_gan_weight", "ckpt_every", "keep_every", "sample_every",
                       "fid_every", "pretrain_steps"), below_one=("ema_decay", "beta1", "beta2"))
    if cfg.num_train_timesteps < 2:
        errors.append(f"--num_train_timesteps must be at least 2 (a grid from sigma_min to sigma_max), "
                      f"got {cfg.num_train_timesteps}")
    for name in ("fid_num", "eval_per_class"):           # a covariance needs two samples
        if getattr(cfg, name) < 2:
            errors.append(f"--{name} must be at least 2, got {getattr(cfg, name)}")
    if cfg.fid_every and not cfg.fid_ref:
        errors.append("--fid_every needs --fid_ref, the reference statistics (EDM's imagenet-64x64.npz)")
    if cfg.quantize not in fid.QUANTIZE:
        errors.append(f"--quantize must be one of {fid.QUANTIZE}, not {cfg.quantize!r}")
    if cfg.precision not in ("bf16", "fp32"):
        errors.append(f"--precision must be bf16 or fp32, not {cfg.precision!r}")
    if os.path.exists(cfg.outdir) and not os.path.isdir(cfg.outdir):
        errors.append(f"--outdir {cfg.outdir}: is a file; give a folder for the run")
    if not (cfg.resume or cfg.bench) and os.path.exists(os.path.join(cfg.outdir, "checkpoint.pt")):
        errors.append(f"--outdir {cfg.outdir}: holds a run's checkpoint.pt; add --resume to continue it, or give "
                      "another folder (a new run would overwrite it, and evaluate would score both runs' generators)")
    if errors:
        raise ValueError("invalid options:\n  " + "\n  ".join(errors))
    if cfg.resume and cfg.init_from and os.path.exists(os.path.join(cfg.outdir, "checkpoint.pt")):
        print(f"--resume: {cfg.outdir}/checkpoint.pt exists, so --init_from {cfg.init_from} is not used")

# ----------------------------------------------------------------------------------------------
# --bench: the loop's time vs. the sum of the network passes it needs, and the full-size FLOPs per iteration.

def bench(cfg, cycles=24):
    """ABAB: one TTUR cycle of the real loop (train_step), then every network pass of that cycle timed alone on the
    same networks and shapes; repeated, the first round being warm-up. The ratio is the median over rounds of
    loop / sum of passes, so both halves of a ratio see the same moment of a shared machine. Set-up is not timed
    (the stand-in teacher's pre-training is skipped: random weights time the same), and on the CPU the thread count
    is pinned to one. Also prints the full-size FLOPs per iteration (flops_per_iteration)."""
    cfg = dataclasses.replace(cfg, pretrain_steps=0, fid_every=0, sample_every=0, log_every=10 ** 9, resume=False,
                              init_from="", bench=True, keep_every=0)
    run = setup(cfg)
    if run.device.type == "cpu":
        torch.set_num_threads(1)
    start(run)
    sync = torch.cuda.synchronize if run.device.type == "cuda" else (lambda: None)
    R, passes, ratios, loops = cfg.dfake_gen_update_ratio, network_passes(run), [], []
    for c in range(cycles + 1):
        sync()
        t0 = time.perf_counter()
        for step in range(c * R, (c + 1) * R):
            train_step(run, step)
        sync()
        loop = time.perf_counter() - t0
        times = {name: timed(fn, sync, run) for name, (fn, _) in passes.items()}
        if c > 0:
            loops.append(loop)
            ratios.append(loop / (run.rounds * sum(times[k] * n for k, (_, n) in passes.items())))
    ratio, loop = float(np.median(ratios)), float(np.median(loops))
    threads = f", {torch.get_num_threads()} CPU thread(s)" if run.device.type == "cpu" else ""
    memory = (f", peak memory {torch.cuda.max_memory_allocated(run.device) / 2 ** 30:.2f} GiB"
              if run.device.type == "cuda" else "")
    print(f"bench: loop {1000 * loop / R:.1f} ms/iteration, ratio loop / network passes {ratio:.3f} (median of "
          f"{cycles}; per round {min(ratios):.3f}-{max(ratios):.3f}), {cfg.batch_size * R / loop:.1f} img/s"
          f"{threads}{memory}")
    flops = report_flops(cfg)
    peak = torch.cuda.max_memory_allocated(run.device) / 2 ** 30 if run.device.type == "cuda" else None
    return dict(ratio=ratio, ratios=ratios, loop=loop, flops=flops, iterations_per_s=R / loop,
                images_per_s=cfg.batch_size * R / loop, peak_gib=peak, net_kwargs=run.net_kwargs)


def timed(fn, sync, run):
    """Seconds of one pass; then its gradients are dropped (untimed), so the loop's own steps are unaffected."""
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    seconds = time.perf_counter() - t0
    set_trainable(run.fake_score, run.cfg.gan)
    run.generator.zero_grad(set_to_none=True)
    run.fake_score.zero_grad(set_to_none=True)
    return seconds


def network_passes(run):
    """The network passes of one TTUR cycle, per micro-batch: name -> (function, calls per cycle)."""
    cfg, R, K, B = run.cfg, run.cfg.dfake_gen_update_ratio, run.num_classes, run.batch_gpu
    g = unet.batch_generator(cfg.seed, 0, 0, run.device)
    z = torch.randn(B, *run.image_shape, generator=g, device=run.device)
    y = torch.randint(K, (B,), generator=g, device=run.device)
    labels, sigma = one_hot(y, K), run.karras[-1].expand(B).reshape(B, 1, 1, 1)
    with torch.no_grad(), run.amp:
        x = generate(run.generator, z, y, K).float()
    G = lambda z_: generate(run.generator, z_, y, K)
    passes = dict(
        G_forward=(lambda: forward_only(run, G, z), R - 1),
        G_forward_backward=(lambda: forward_backward(run, G, z, True), 1),
        teacher_forward=(lambda: forward_only(run, lambda x_: run.teacher(x_, sigma, labels), x), 1),
        fake_forward=(lambda: forward_only(run, lambda x_: run.fake_score.unet(x_, sigma, labels), x), 1),
        fake_forward_backward=(lambda: forward_backward(run, lambda x_: run.fake_score(x_, sigma, labels), x, True), R))
    if cfg.gan:
        head = lambda x_: run.fake_score(x_, sigma, labels, classify=True)
        passes["head_forward_backward_to_input"] = (lambda: forward_backward(run, head, x, False), 1)
        passes["head_forward_backward"] = (lambda: forward_backward(run, head, x, True), 2 * R)
    return passes


def forward_only(run, fn, x):
    with torch.no_grad(), run.amp:
        return fn(x)


def forward_backward(run, fn, x, params):
    """A forward and its backward: into the parameters, or with the fake score frozen only to the input (as the GAN
    term in the generator's turn)."""
    if not params:
        run.fake_score.requires_grad_(False)
    x = x.detach().requires_grad_(not params)
    with run.amp:
        out = fn(x).float()
    out.sum().backward()


def flops_per_iteration(net_kwargs, batch, ratio=5, gan=True, encoder_only=True):
    """FLOPs of one iteration (a TTUR cycle / ratio) at `batch` images, counted by torch.utils.flop_counter on the meta
    device: shapes only, so the full-size network costs neither memory nor time. encoder_only=False counts the GAN
    head's input as a full forward whose decoder output is thrown away (the code before bottleneck_only)."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        net = unet.EDMPrecond(**net_kwargs)
        res, chans, K = net_kwargs["img_resolution"], net_kwargs["img_channels"], net_kwargs["label_dim"]
        x, sigma, labels = torch.zeros(batch, chans, res, res), torch.ones(batch), torch.zeros(batch, K)
        rep = net(x, sigma, labels, bottleneck_only=True)
        head = build_gan_head(rep.shape[1], rep.shape[2])

    def count(fn, params=True, input_grad=False):
        net.requires_grad_(params)
        head.requires_grad_(params)
        with FlopCounterMode(display=False) as counter:
            fn(x.detach().requires_grad_(input_grad))
        return counter.get_total_flops()

    bottleneck = (lambda x_: net(x_, sigma, labels, bottleneck_only=True)) if encoder_only else (
        lambda x_: net(x_, sigma, labels, return_bottleneck=True)[1])
    forward = count(lambda x_: _no_grad_call(lambda: net(x_, sigma, labels)))
    forward_backward = count(lambda x_: net(x_, sigma, labels).sum().backward())
    gan_to_input = count(lambda x_: head(bottleneck(x_)).sum().backward(), params=False, input_grad=True) if gan else 0
    gan_to_params = count(lambda x_: head(bottleneck(x_)).sum().backward()) if gan else 0
    cycle = (forward_backward + 2 * forward + gan_to_input      # generator step: G, teacher, fake score, GAN term
             + (ratio - 1) * forward                            # G forwards of the other iterations
             + ratio * (forward_backward + 2 * gan_to_params))  # fake score (+ head on fake and real) every iteration
    return cycle / ratio


def _no_grad_call(fn):
    with torch.no_grad():
        return fn()


def report_flops(cfg, batch=280):
    """Full-size (EDM ImageNet-64) FLOPs per iteration at the paper's batch, before and after the encoder-only pass."""
    full = dict(unet.EDM_IMAGENET64, dropout=0.0)
    R = cfg.dfake_gen_update_ratio
    before = flops_per_iteration(full, batch, R, cfg.gan, encoder_only=False)
    after = flops_per_iteration(full, batch, R, cfg.gan, encoder_only=True)
    print(f"full-size FLOPs per iteration at batch {batch} (meta device, torch.utils.flop_counter): "
          f"{before / 1e15:.2f} PFLOP with the GAN through the whole UNet, {after / 1e15:.2f} PFLOP encoder-only "
          f"(-{100 * (1 - after / before):.1f}%)")
    return dict(before=before, after=after)

# ----------------------------------------------------------------------------------------------
# Command line.

def parse_config(argv):
    p = argparse.ArgumentParser(prog="imagenet64.py", formatter_class=unet.HelpFormatter,
                                description="DMD2: distil EDM's ImageNet-64 teacher into a one-step generator. "
                                            "Subcommands: `sample`, `evaluate` (see their --help).")
    helps = field_help()
    for f in dataclasses.fields(Config):
        if f.type in (bool, "bool"):
            p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=f.default,
                           help=helps.get(f.name))
        else:
            p.add_argument(f"--{f.name}", type=type(f.default), default=f.default, help=helps.get(f.name))
    preset = p.parse_known_args(argv)[0].preset
    if preset and preset not in PRESETS:
        p.error(f"unknown --preset {preset}; choose from {list(PRESETS)}")
    p.set_defaults(**PRESETS.get(preset, {}))                              # explicit flags still win
    return Config(**vars(p.parse_args(argv)))


def field_help():
    """--help text: the comments next to Config's fields (continuation lines included). A comment line at the fields'
    own indentation heads a group ("Only for --preset gaussian:"): each field below it gets that note."""
    import inspect
    helps, name, group = {}, None, ""
    for line in inspect.getsource(Config).splitlines():
        code, _, comment = line.partition("#")
        if ":" in code and "=" in code:
            name = code.split(":")[0].strip()
            helps[name] = comment.strip() + (f" ({group.rstrip(':').lower()})" if group else "")
        elif name and not code.strip() and comment and len(code) > 4:          # a continuation, aligned with the above
            helps[name] += " " + comment.strip()
        elif not code.strip() and comment:                                      # a group heading
            name, group = None, comment.strip()
    return {k: v.replace("%", "%%") for k, v in helps.items()}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["sample"]:
        return sample_main(argv[1:])
    if argv[:1] == ["evaluate"]:
        return evaluate_main(argv[1:])
    cfg = parse_config(argv)
    if cfg.bench:
        return bench(cfg)
    try:
        run = train(cfg)
    except KeyboardInterrupt:
        raise unet.interrupted("imagenet64.py", os.path.join(cfg.outdir, "checkpoint.pt")) from None
    if cfg.preset == "gaussian" and run.rank == 0:
        fds = gaussian_frechet(run.ema_or_g, run.teacher, cfg.eval_per_class)
        print("exact Frechet distance to the data, per class: " + "  ".join(f"{v:.3f}" for v in fds))
    if dist.is_initialized():
        dist.barrier()              # rank 0 may still be evaluating: tearing gloo down under it aborted the other rank
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError, unet.NonFiniteLoss) as e:   # these name the option or file and the problem
        raise SystemExit(f"imagenet64.py: {e}")
    except KeyboardInterrupt:
        raise unet.interrupted("imagenet64.py") from None
