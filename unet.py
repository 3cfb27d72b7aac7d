"""The networks of minDMD2 and the small utilities the training scripts share.

Section 1 is NVIDIA EDM's class-conditional ImageNet-64 model (`edm-imagenet-64x64-cond-adm.pkl`): the ADM UNet of
Dhariwal & Nichol (2021) as EDM's `DhariwalUNet` computes it, wrapped in EDM's preconditioning `EDMPrecond`
(Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"). The state-dict keys are EDM's,
so EDM weights load with strict=True and no renaming table. Section 2 reads EDM's pickle WITHOUT executing anything
stored in it (EDM's own loader execs the Python source embedded in the file). Section 3 saves/loads our own
checkpoints as plain state dicts. Section 4 is EDM's Heun sampler (Algorithm 2), used to draw teacher samples.
Section 5 is SDXL base's UNet with Stability's parameter names (sd_xl_base_1.0.safetensors loads with strict=True) and
the short rule that renames DMD2's diffusers-named UNets into it; sdxl.py builds on it. Section 6 is the run plumbing
imagenet64.py and sdxl.py share: process setup, per-step RNG, the stop on NaN losses or weights, stale temporaries.
Section 7 is LoRA for the SDXL UNet: DMD2's LoRA generator (a small wrapper on Linear and Conv2d layers), LoRA-only
weights, reading Kohya- and diffusers-style SDXL LoRA files, merging them into the UNet, writing DMD2's Kohya format.
Section 8 reads and writes safetensors files by hand (validated headers, memory-mapped tensors), for sdxl.py and fid.py.

Library use (the training scripts do this):
    import torch, unet
    net = unet.load_edm_pickle("edm-imagenet-64x64-cond-adm.pkl")                # 295,899,267 params, eval, no grad
    y = torch.nn.functional.one_hot(torch.arange(8) % 1000, 1000).float()       # [8, 1000] class labels
    D_x = net(80 * torch.randn(8, 3, 64, 64), 80.0, y)                          # denoised images D(x; sigma, y)
    D_x, h = net(x, sigma, y, return_bottleneck=True)                           # + encoder output h [8, 768, 8, 8]
    with torch.autocast("cuda", dtype=torch.bfloat16): D_x = net(x, sigma, y)   # mixed precision on GPU (DMD2 trains in bf16)
    x0 = unet.edm_sampler(net, torch.randn(8, 3, 64, 64), y, num_steps=256, S_churn=40, S_min=0.05, S_max=50, S_noise=1.003)

Command line (check a downloaded pickle, convert it to a plain checkpoint, draw a grid of teacher samples):
    python unet.py edm-imagenet-64x64-cond-adm.pkl --out edm_imagenet64.pt                # ~20 s on CPU, writes 1.2 GB
    python unet.py edm-imagenet-64x64-cond-adm.pkl --grid teacher.png --num 4 --steps 18   # CPU: ~15 min; one GPU: seconds
    python unet.py edm-imagenet-64x64-cond-adm.pkl --grid teacher.png --num 64 --steps 256 --churn 40 --s_min 0.05 --s_max 50 --s_noise 1.003
        # EDM's FID-1.36 settings (NFE 511) on one GPU
One forward pass costs 219 GFLOP per 64x64 image (measured: ~6 s at batch 1 on one busy CPU core).
"""
import argparse
import collections
import contextlib
import functools
import io
import json
import mmap
import math
import os
import pickle
import pickletools
import re
import reprlib
import struct
import sys
import tempfile
import warnings
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# ------------------------------------------------------------------------------------------------------------------------
# 1. EDM's ImageNet-64 network: DhariwalUNet (ADM) inside EDMPrecond, as in NVlabs/edm training/networks.py.

# The kwargs of EDMPrecond for `edm-imagenet-64x64-cond-adm.pkl` (EDM train.py --cond=1 --arch=adm --dropout=0.10 --augment=0).
EDM_IMAGENET64 = dict(
    img_resolution=64,          # 64x64 RGB images
    img_channels=3,
    label_dim=1000,             # one-hot ImageNet class
    model_channels=192,         # widths 192/384/576/768 at 64/32/16/8 px; embedding width 192*4 = 768
    channel_mult=[1, 2, 3, 4],
    channel_mult_emb=4,
    num_blocks=3,               # 3 blocks per level in the encoder, 4 in the decoder
    attn_resolutions=[32, 16, 8],
    dropout=0.10,               # what the pickle stores; inactive in eval(). DMD2 rebuilds its nets with 0.0
    label_dropout=0,            # not trained for classifier-free guidance
    augment_dim=0,              # no augmentation conditioning, so no map_augment weights
)

# The most an EDM network read from a file may declare. Its weights do not depend on the resolution, and a tensor stored
# as a stride-0 view of one number can declare any shape, so a small file could otherwise ask for terabytes once the
# network is trained (a copy and AdamW's moments are real tensors) or sampled (a one-hot class label is [B, label_dim]).
MAX_RESOLUTION = 1024           # pixels a side (EDM's ImageNet: 64)
MAX_LABEL_DIM = 1 << 17         # classes (EDM's ImageNet: 1,000; ImageNet-21k has 21,841)
MAX_EDM_PARAMS = 1 << 31        # weights (EDM's ImageNet-64 ADM: 296 M)


def edm_size_problem(kwargs, net):
    """Why an EDMPrecond built from a file's kwargs (net: on the meta device, so it holds no memory) is too large to
    use, or None: the bounds above."""
    res, label_dim = kwargs.get("img_resolution"), kwargs.get("label_dim", 0)
    if not (type(res) is int and 1 <= res <= MAX_RESOLUTION):
        return f"img_resolution {describe_value(res)}: at most {MAX_RESOLUTION} pixels a side"
    if not (type(label_dim) is int and 0 <= label_dim <= MAX_LABEL_DIM):
        return f"label_dim {describe_value(label_dim)}: at most {MAX_LABEL_DIM:,} classes"
    n = sum(t.numel() for t in net.state_dict().values())
    if n > MAX_EDM_PARAMS:
        return f"{n:,} weights: at most {MAX_EDM_PARAMS:,}"
    return None


def _uniform(shape, fan_in, zero=False):
    """EDM's init for DhariwalUNet: kaiming_uniform * sqrt(1/3) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)), or zeros (init_zero)."""
    return torch.zeros(shape) if zero else (torch.rand(shape) * 2 - 1) / math.sqrt(fan_in)


def no_autocast(device):
    """Context that turns autocast off, so the ops inside run in the dtype of their inputs (a no-op on the meta device)."""
    return torch.autocast(device.type, enabled=False) if torch.amp.is_autocast_available(device.type) else contextlib.nullcontext()


def group_norm(num_channels, eps=1e-5):
    """EDM's GroupNorm: 32 groups, but at least 4 channels per group (so 16 groups at 64 channels)."""
    return nn.GroupNorm(min(32, num_channels // 4), num_channels, eps=eps)


class Linear32(nn.Linear):
    """nn.Linear that stays in float32 under autocast. EDM casts only the image path to fp16 (DMD2: bf16); the noise/label
    embedding and every block's affine(emb) are computed from fp32 inputs, hence in fp32.
    nn.Linear's default init U(+-1/sqrt(fan_in)) is exactly EDM's `init` for DhariwalUNet."""

    def forward(self, x):
        with no_autocast(x.device):
            return super().forward(x.float())


class Conv2d(nn.Module):
    """EDM's Conv2d: an optional 2x up- or down-sampling BEFORE a k x k convolution; kernel=0 means resampling only.
    The resampling filter f = outer([1,1], [1,1]) / 4 is kept as the buffer `resample_filter` because EDM's state dict has it."""

    def __init__(self, in_channels, out_channels, kernel, up=False, down=False, init_zero=False):
        super().__init__()
        self.in_channels, self.out_channels, self.up, self.down = in_channels, out_channels, up, down
        fan_in = in_channels * kernel * kernel
        self.weight = nn.Parameter(_uniform([out_channels, in_channels, kernel, kernel], fan_in, init_zero)) if kernel else None
        self.bias = nn.Parameter(_uniform([out_channels], fan_in, init_zero)) if kernel else None
        self.register_buffer("resample_filter", torch.full([1, 1, 2, 2], 0.25) if up or down else None)

    def forward(self, x):                                                          # x [B, C, H, W]
        C = x.shape[1]
        if self.up:    # depthwise transposed conv with 4f = ones(2,2), stride 2: nearest-neighbour upsampling -> [B, C, 2H, 2W]
            x = F.conv_transpose2d(x, (4 * self.resample_filter).tile([C, 1, 1, 1]), groups=C, stride=2)
        if self.down:  # depthwise conv with f = 0.25 ones(2,2), stride 2: 2x2 average pooling -> [B, C, H/2, W/2]
            x = F.conv2d(x, self.resample_filter.tile([C, 1, 1, 1]), groups=C, stride=2)
        if self.weight is not None:
            x = F.conv2d(x, self.weight, self.bias, padding=self.weight.shape[-1] // 2)
        return x


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of c_noise with frequencies f_i = 10000^(-i/(C/2)); COS FIRST, then sin (as ADM's
    timestep_embedding; only EDM's SongUNet flips it). Computed in float32. No parameters."""

    def __init__(self, num_channels, max_positions=10000):
        super().__init__()
        self.num_channels, self.max_positions = num_channels, max_positions

    def forward(self, x):                                                          # x [B] -> [B, num_channels]
        half = self.num_channels // 2
        freqs = (1 / self.max_positions) ** (torch.arange(half, dtype=torch.float32, device=x.device) / half)  # [half]
        x = torch.outer(x.float(), freqs)                                          # [B, half]
        return torch.cat([x.cos(), x.sin()], dim=1)


def attention_fp32(q, k, v):
    """softmax(q^T k / sqrt(c)) applied to v, the attention weights in float32 as EDM's AttentionOp does even in fp16/bf16.
    q, k, v: [N, c, L] (N = batch * heads, c = channels per head, L = H*W) -> [N, c, L]."""
    with no_autocast(q.device):                                                    # autocast would run the einsum in bf16
        w = torch.einsum("ncq,nck->nqk", q.float(), k.float() / math.sqrt(k.shape[1])).softmax(dim=2)  # [N, L, L]
    return torch.einsum("nqk,nck->ncq", w.to(v.dtype), v)


class UNetBlock(nn.Module):
    """One ADM residual block (+ optional self-attention), as EDM's UNetBlock with DhariwalUNet's settings
    (adaptive_scale=True, skip_scale=1, resample_filter [1,1], resample_proj=False, 64 channels per head).
    Children are registered in EDM's order so that state_dict() lists the keys as EDM's does."""

    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False, attention=False, dropout=0.0, eps=1e-5):
        super().__init__()
        self.in_channels, self.out_channels, self.dropout = in_channels, out_channels, dropout
        self.num_heads = out_channels // 64 if attention else 0
        self.norm0 = group_norm(in_channels, eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down)
        self.affine = Linear32(emb_channels, 2 * out_channels)                    # -> [scale, shift]
        self.norm1 = group_norm(out_channels, eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3, init_zero=True)
        self.skip = None                                                           # identity when shapes agree
        if out_channels != in_channels or up or down:                             # 1x1 conv if widths differ, else resample only
            self.skip = Conv2d(in_channels, out_channels, 1 if out_channels != in_channels else 0, up=up, down=down)
        if self.num_heads:
            self.norm2 = group_norm(out_channels, eps)
            self.qkv = Conv2d(out_channels, 3 * out_channels, 1)
            self.proj = Conv2d(out_channels, out_channels, 1, init_zero=True)

    def forward(self, x, emb):                                                     # x [B, C_in, H, W], emb [B or 1, E]
        h = self.conv0(F.silu(self.norm0(x)))                                      # [B, C, H', W'] (resampled first)
        scale, shift = self.affine(emb)[:, :, None, None].chunk(2, dim=1)          # [B, C, 1, 1] each; the SCALE comes first
        h = F.silu(shift + self.norm1(h) * (scale + 1))                            # ADM's scale-shift norm
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        h = h + (self.skip(x) if self.skip is not None else x)
        if self.num_heads:
            B, C, H, W = h.shape
            # EDM's qkv layout: inside each head's 3*C/heads channels, channel c*3 + j is q (j=0), k (j=1) or v (j=2).
            q, k, v = self.qkv(self.norm2(h)).reshape(B * self.num_heads, C // self.num_heads, 3, H * W).unbind(2)
            h = h + self.proj(attention_fp32(q, k, v).reshape(B, C, H, W))
        return h


class DhariwalUNet(nn.Module):
    """The ADM architecture as EDM's DhariwalUNet builds and runs it; constructor arguments are EDM's.
    forward(x, noise_labels, class_labels) -> F_x [B, out_channels, H, W], the raw network output of EDM eq. 7."""

    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0, model_channels=192,
                 channel_mult=(1, 2, 3, 4), channel_mult_emb=4, num_blocks=3, attn_resolutions=(32, 16, 8), dropout=0.10,
                 label_dropout=0.0):
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        block = functools.partial(UNetBlock, emb_channels=emb_channels, dropout=dropout)

        # Mapping network: c_noise -> sinusoids -> 2-layer MLP, + class embedding, then SiLU.
        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear32(augment_dim, model_channels, bias=False) if augment_dim else None
        self.map_layer0 = Linear32(model_channels, emb_channels)
        self.map_layer1 = Linear32(emb_channels, emb_channels)
        self.map_label = Linear32(label_dim, emb_channels, bias=False) if label_dim else None  # no bias, no sqrt(label_dim) scaling
        with torch.no_grad():                                                      # EDM's init for these two
            if self.map_augment is not None:
                self.map_augment.weight.zero_()
            if self.map_label is not None:
                self.map_label.weight.normal_()                                    # kaiming_normal * sqrt(label_dim) = N(0, 1)

        # Encoder: per level, a downsampling block (a 3x3 conv at the top level), then num_blocks blocks.
        self.enc = nn.ModuleDict()
        c = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(c, model_channels * mult, 3)
                c = model_channels * mult
            else:
                self.enc[f"{res}x{res}_down"] = block(c, c, down=True)
            for i in range(num_blocks):
                self.enc[f"{res}x{res}_block{i}"] = block(c, model_channels * mult, attention=res in attn_resolutions)
                c = model_channels * mult
        skips = [m.out_channels for m in self.enc.values()]                        # every encoder output is a skip

        # Decoder: two blocks at the bottom (or an upsampling block), then num_blocks+1 blocks that each take a skip.
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = block(c, c, attention=True)
                self.dec[f"{res}x{res}_in1"] = block(c, c)
            else:
                self.dec[f"{res}x{res}_up"] = block(c, c, up=True)
            for i in range(num_blocks + 1):
                self.dec[f"{res}x{res}_block{i}"] = block(c + skips.pop(), model_channels * mult, attention=res in attn_resolutions)
                c = model_channels * mult
        self.out_norm = group_norm(c)
        self.out_conv = Conv2d(c, out_channels, 3, init_zero=True)

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None, return_bottleneck=False,
                bottleneck_only=False):
        # x [B, C, H, W]; noise_labels [B] or [1]; class_labels [B, label_dim] or [1, label_dim]
        emb = self.map_noise(noise_labels)                                         # [B, model_channels]
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))                        # [B, E]
        if self.map_label is not None:
            y = class_labels
            if self.training and self.label_dropout:                              # drop whole label vectors (CFG training)
                y = y * (torch.rand([x.shape[0], 1], device=x.device) >= self.label_dropout).to(y.dtype)
            emb = emb + self.map_label(y)                                          # the class is added BEFORE the last SiLU
        emb = F.silu(emb)

        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        bottleneck = x                                                             # [B, 768, 8, 8] at full size: DMD2's GAN input
        if bottleneck_only:                                                        # the GAN head needs no decoder
            return bottleneck

        for block in self.dec.values():
            if x.shape[1] != block.in_channels:                                   # true for every _block{i}, never for in0/in1/up
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        x = self.out_conv(F.silu(self.out_norm(x)))                                # [B, out_channels, H, W]
        return (x, bottleneck) if return_bottleneck else x


class EDMPrecond(nn.Module):
    """EDM's preconditioned denoiser D(x; sigma, y) = c_skip x + c_out F(c_in x; c_noise, y) (EDM eq. 7 and Table 1).
    It has no tensors of its own; the network is self.model, so every state-dict key starts with `model.`.
    Mixed precision comes from the caller's autocast; unlike EDM there is no use_fp16 switch."""

    def __init__(self, img_resolution, img_channels, label_dim=0, sigma_data=0.5, **model_kwargs):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim, self.sigma_data = img_resolution, img_channels, label_dim, sigma_data
        self.init_kwargs = dict(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                                sigma_data=sigma_data, **model_kwargs)             # to rebuild the net from a checkpoint
        self.model = DhariwalUNet(img_resolution=img_resolution, in_channels=img_channels, out_channels=img_channels,
                                  label_dim=label_dim, **model_kwargs)

    def forward(self, x, sigma, class_labels=None, return_bottleneck=False, augment_labels=None, bottleneck_only=False):
        # bottleneck_only=True returns just the encoder output h [B, C_b, H/8, W/8] and skips the decoder, as DMD2's
        # GAN branch does: at full size 60 of a full forward's 219 GFLOP per image (0.27; 0.27-0.32 of its time).
        x = x.float()                                                              # [B, C, H, W]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)  # [B or 1, 1, 1, 1]
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:                                                 # "no class": a zero label row, broadcast
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            class_labels = class_labels.float().reshape(-1, self.label_dim)       # [B, label_dim]

        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)                                  # EDM Table 1
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4
        out = self.model(c_in * x, c_noise.flatten(), class_labels, augment_labels=augment_labels,
                         return_bottleneck=return_bottleneck, bottleneck_only=bottleneck_only)
        if bottleneck_only:
            return out
        F_x, bottleneck = out if return_bottleneck else (out, None)
        D_x = c_skip * x + c_out * F_x.float()                                     # EDM eq. 7; float32 even under autocast
        return (D_x, bottleneck) if return_bottleneck else D_x


# ------------------------------------------------------------------------------------------------------------------------
# 2. Reading EDM's pickle without executing it (format: NVlabs/edm torch_utils/persistence.py, training/training_loop.py).
#
# EDM's snapshot is pickle.dump(dict(ema=..., loss_fn=..., augment_pipe=..., dataset_kwargs=...)). Every EDM class is
# pickled by torch_utils.persistence as _reconstruct_persistent_obj(meta), meta = dict(type='class', version=6,
# module_src=<source of training/networks.py>, class_name=..., state=<the object's __dict__>). EDM's loader execs
# module_src; we keep only class_name and state. Tensors arrive as torch._utils._rebuild_tensor_v2(storage, ...) whose
# storage is torch.storage._load_from_bytes(<a legacy torch.save of it>), which we decode with weights_only=True.
# Any other global in the file is refused.

# Hostile files. Besides running code, a pickle can make the reader allocate far more than the file holds: the C
# unpickler allocates a string's or frame's declared length before reading it and grows its memo table to any index
# the file names; torch's legacy loader allocates each storage's declared size before reading its bytes; a memo
# reference hands one object to any number of calls (nested, 2**n copies: "billion laughs"); a stride-0 view can
# declare any shape; a tuple can nest too deep for C's hash to return (a segfault), or repeat a shared child until
# hashing it never ends, and a dict key, a set or a constructor hashes it. So: scan_pickle checks lengths, memo
# indices and tuples before the C unpickler runs (on the bytes torch will unpickle: check_torch_file), no allowed
# global returns its argument or a numpy dtype the file can extend, storages are checked against their bytes,
# copying calls are charged to a budget tied to the file's size, nothing from the file is stringified or compared in
# depth, and tensors stay views until their shapes match the model.

class _BoundedReader:
    """File wrapper for pickletools.genops that refuses any read longer than what is left of the stream."""

    def __init__(self, f, end):
        self.f, self.end = f, end

    def read(self, n):
        if n > self.end - self.f.tell():
            raise pickle.UnpicklingError(f"an opcode at byte {self.f.tell()} declares {n} bytes, but only "
                                         f"{self.end - self.f.tell()} are left")
        return self.f.read(n)

    def readline(self):
        return self.f.readline()

    def tell(self):
        return self.f.tell()


def scan_pickle(f):
    """Walk one pickle's opcodes (pickletools.genops decodes them and builds nothing) and return the offset just past
    its STOP, leaving f where it was. A declared length may not exceed the bytes left, and a memo index may not exceed
    the number of opcodes read so far (picklers number memo entries 0, 1, 2, ..., one per object of at least one
    opcode), so both stay below the file's size; and no tuple may be unsafe to hash (_TupleSizes). Overriding the
    memo opcodes instead would need the slow pure-Python unpickler; a pre-scan keeps the C one and checks the stream
    exactly as it will be read."""
    start = f.tell()
    end = f.seek(0, os.SEEK_END)
    f.seek(start)
    tuples = _TupleSizes()
    try:
        for count, (op, arg, _) in enumerate(pickletools.genops(_BoundedReader(f, end))):
            if op.name in ("PUT", "BINPUT", "LONG_BINPUT") and not 0 <= arg <= count:
                raise pickle.UnpicklingError(f"memo index {arg} at opcode {count} (a pickler numbers them 0, 1, ...)")
            if op.name == "FRAME" and arg > end - f.tell():
                raise pickle.UnpicklingError(f"a frame declares {arg} bytes, but only {end - f.tell()} are left")
            tuples.step(op, arg)
    except ValueError as e:                                                        # genops: truncated, unknown opcode
        raise pickle.UnpicklingError(f"malformed pickle stream ({e})") from None
    stop = f.tell()
    f.seek(start)
    return stop


class _TupleSizes:
    """Follows a pickle's stack and memo as (depth, items counted with repeats) of each tuple, so that scan_pickle can
    refuse a tuple that would be dangerous to hash, before the unpickler builds it and a dict key, a set or a
    constructor hashes it: hashing recurses in C (200,000 nested tuples overflow its stack) and visits a shared child
    once per reference (a tuple nesting one shared tuple twice, 60 deep, takes 2**60 steps). Weights files hold
    shallow, small tuples (shapes, strides, arguments); everything but a tuple counts as one item."""
    MAX_DEPTH, MAX_ITEMS = 1000, 1 << 20
    LEAF = (0, 1)

    def __init__(self):
        self.stack, self.memo, self.marks = [], {}, []           # marks: the stack's length at each MARK

    def free(self):
        """How many items lie above the last mark."""
        return len(self.stack) - (self.marks[-1] if self.marks else 0)

    def pop(self, n):
        if n > self.free():
            raise pickle.UnpicklingError("an opcode finds too few items on the pickle's stack")
        items = self.stack[len(self.stack) - n:]
        del self.stack[len(self.stack) - n:]
        return items

    def pop_to_mark(self):
        if not self.marks:
            raise pickle.UnpicklingError("an opcode finds no mark on the pickle's stack")
        i = self.marks.pop()
        items = self.stack[i:]
        del self.stack[i:]
        return items

    def step(self, op, arg):
        if op.name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):              # the top item, kept on the stack
            if not self.free():
                raise pickle.UnpicklingError("a memo opcode finds no item on the pickle's stack")
            self.memo[len(self.memo) if op.name == "MEMOIZE" else arg] = self.stack[-1]
            return
        before, after = op.stack_before, op.stack_after
        if pickletools.markobject in before:
            items = self.pop_to_mark()
            below = self.pop(before.index(pickletools.markobject))
        else:
            items, below = [], self.pop(len(before))
        if op.name in ("TUPLE", "TUPLE1", "TUPLE2", "TUPLE3"):
            parts = items if op.name == "TUPLE" else below
            depth = 1 + max((d for d, _ in parts), default=0)
            count = 1 + sum(n for _, n in parts)
            if depth > self.MAX_DEPTH or count > self.MAX_ITEMS:
                raise pickle.UnpicklingError(f"a tuple {depth} deep with {count} items counted with repeats (at most "
                                             f"{self.MAX_DEPTH} deep and {self.MAX_ITEMS} items): weights files "
                                             "hold small tuples, and hashing this one would not end or would crash")
            self.stack.append((depth, count))
        elif op.name in ("BINGET", "GET", "LONG_BINGET"):
            self.stack.append(self.memo.get(arg, self.LEAF))
        elif op.name == "DUP":
            self.stack.extend(below * 2)
        elif op.name == "MARK":
            self.marks.append(len(self.stack))
        elif after and after[0] in (pickletools.pydict, pickletools.pylist, pickletools.pyset) and below:
            self.stack.append(below[0])                                 # SETITEM(S), APPEND(S), ADDITEMS: the container
        else:
            self.stack.extend([self.LEAF] * len(after))


_STORAGE_ITEMSIZE = {"FloatStorage": 4, "DoubleStorage": 8, "HalfStorage": 2, "BFloat16Storage": 2, "LongStorage": 8,
                     "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1, "ByteStorage": 1, "BoolStorage": 1,
                     "UntypedStorage": 1}


class _Inert:
    """Stand-in for every object of a legacy torch.save pickle while only its storage records are counted."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass


class _StorageRef(_Inert):
    """A storage record's stand-in, which remembers its key."""

    def __init__(self, key):
        self.key = key


class _StorageSizes(pickle.Unpickler):
    """Reads the main pickle of a legacy torch.save stream for its storage records ('storage', type, key, device,
    numel, ...) only: {key: declared bytes}. Every global is an inert stand-in; nothing is built from the data, but
    each tensor record is checked to lie within its storage: torch's set_ would grow a legacy storage to fit it."""

    def __init__(self, file):
        super().__init__(file)
        self.nbytes, self.numel = {}, {}

    def find_class(self, module, name):
        if module == "torch" and name in _STORAGE_ITEMSIZE:
            return _STORAGE_ITEMSIZE[name]
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            return self.check_tensor
        return _Inert

    def check_tensor(self, storage, offset, size, stride, *rest):
        """_rebuild_tensor(_v2)'s arguments: the last element a tensor of this size and stride reaches."""
        if isinstance(storage, _StorageRef) and isinstance(size, tuple) and isinstance(stride, tuple) \
                and len(size) == len(stride) and all(type(v) is int for v in (offset, *size, *stride)):
            last = offset + sum((n - 1) * st for n, st in zip(size, stride)) if all(n > 0 for n in size) else -1
            if last >= self.numel[storage.key]:
                raise pickle.UnpicklingError(f"a tensor record of shape {list(size)} reaches element {last} of a "
                                             f"storage of {self.numel[storage.key]}")
        return _Inert()

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and type(pid[1]) is int
                and type(pid[4]) is int and pid[4] >= 0 and isinstance(pid[2], str)):
            raise pickle.UnpicklingError("malformed storage record in a torch.save stream")
        self.nbytes[pid[2]] = max(self.nbytes.get(pid[2], 0), pid[1] * pid[4])      # torch keeps the first claim
        self.numel.setdefault(pid[2], pid[4])
        return _StorageRef(pid[2])


def legacy_storage_nbytes(f):
    """Total bytes the storages of a legacy torch.save stream declare (torch allocates them before reading them).
    The stream is 3 small pickles (magic number, protocol, system info), the main pickle, the list of storage keys,
    then the raw storages. Each pickle is scanned before torch reads it: a declared string length is read at once."""
    start = f.tell()
    for _ in range(3):
        f.seek(scan_pickle(f))
    scan_pickle(f)
    sizes = _StorageSizes(f)
    sizes.load()
    scan_pickle(f)                                   # the storage keys
    f.seek(start)
    return sum(sizes.nbytes.values())


def load_legacy_storage(data):
    """torch.storage._load_from_bytes with torch's safe unpickler, after checking that the storages it declares fit
    in the bytes given (torch would allocate them first)."""
    if not isinstance(data, bytes):
        raise pickle.UnpicklingError("a tensor storage record does not hold bytes")
    if data[:4] == b"PK\x03\x04":       # torch.load would read it as a zip, which the scan below reads as pickles
        raise pickle.UnpicklingError("a tensor storage record holds a zip, not torch's legacy storage format")
    declared = legacy_storage_nbytes(io.BytesIO(data))
    if declared > len(data):
        raise pickle.UnpicklingError(f"a storage record declares {declared} bytes but holds only {len(data)}")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


class PickledOrderedDict(collections.OrderedDict):
    """collections.OrderedDict as the restricted unpicklers build it. BUILD on an object without __setstate__ copies
    the whole state into its __dict__, and a memo reference can hand one large state to every instance; torch's
    pickles set at most one attribute here (state_dict()'s _metadata), so a few are allowed and no more."""

    def __setstate__(self, state):
        if not (isinstance(state, dict) and len(state) <= 8):
            raise pickle.UnpicklingError("an OrderedDict record sets more than 8 attributes")
        shadowing = [k for k in state if not isinstance(k, str) or k.startswith("__") or hasattr(type(self), k)]
        if shadowing:                  # an attribute named "get" or "items" would replace the dict's own method
            raise pickle.UnpicklingError(f"an OrderedDict record sets attributes named {shadowing[:3]!r}")
        self.__dict__.update(state)


def describe_value(x):
    """A short text for a value read from a file, for error messages: str() of a nested structure of memo references
    can be exponentially long, and repr() of a huge int raises."""
    if isinstance(x, str):
        return repr(x[:60]) + ("..." if len(x) > 60 else "")
    if x is None or isinstance(x, (bool, float)) or (isinstance(x, int) and abs(x) < 10 ** 18):
        return repr(x)
    if isinstance(x, (list, tuple)) and len(x) <= 8 and all(isinstance(v, (str, int, float)) for v in x):
        return "[" + ", ".join(describe_value(v) for v in x) + "]"
    return f"a {type(x).__name__}"


class _Node:
    """Data-only stand-in for one pickled object: its class name and its state (the object's __dict__)."""
    class_name, state = None, None

    def __setstate__(self, state):                                                 # BUILD opcode of an object pickled by reference
        self.state = state


class _ModuleDictNode(_Node):
    class_name = "ModuleDict"                                                     # DhariwalUNet.enc / .dec


def _persistent_node(meta):
    """Replaces torch_utils.persistence._reconstruct_persistent_obj: keeps class_name and state, never runs module_src."""
    if not (isinstance(meta, dict) and meta.get("type") == "class" and meta.get("version") == 6 and "state" in meta
            and isinstance(meta.get("class_name"), str)):
        raise pickle.UnpicklingError("unsupported torch_utils.persistence record (expected type 'class', version 6 "
                                     "and a class name)")
    node = _Node()
    node.class_name, node.state = meta["class_name"], meta["state"]
    return node


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """torch._utils._rebuild_tensor_v2 without backward hooks or metadata: a plain tensor viewing `storage`, which must
    contain the whole view (torch would silently grow the storage instead)."""
    if not isinstance(storage, torch.storage.TypedStorage):
        raise pickle.UnpicklingError(f"a tensor record refers to a {type(storage).__name__}, not a tensor storage")
    if not (isinstance(size, (tuple, list)) and isinstance(stride, (tuple, list)) and len(size) == len(stride) <= 64):
        raise pickle.UnpicklingError("malformed tensor record: size and stride must be sequences of one length")
    size, stride = tuple(size), tuple(stride)
    if not all(type(v) is int and 0 <= v < 2 ** 63 for v in (storage_offset, *size, *stride)):
        raise pickle.UnpicklingError(f"malformed tensor record: offset {describe_value(storage_offset)}, size "
                                     f"{describe_value(size)}, stride {describe_value(stride)}")
    if math.prod(size) and storage_offset + sum((n - 1) * s for n, s in zip(size, stride)) >= storage.size():
        raise pickle.UnpicklingError(f"a tensor of size {size} reaches past the end of its storage ({storage.size()} elements)")
    return torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, False, collections.OrderedDict())


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    """The parameter's values. Only a tensor passes: a callable that hands back its argument would let a tuple reach
    a dict key unseen by scan_pickle, which counts every call's result as one item."""
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError(f"a parameter record holds {describe_value(data)}, not a tensor")
    return data


NUMPY_NAMES = ("f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "b1")


class NumpyDtypeRecord:
    """numpy.dtype(name) as the restricted unpicklers build it: the type string, and the byte order the BUILD that
    follows gives it; nothing else. A real np.dtype takes any state from that BUILD, such as fields whose dtypes
    hold earlier ones: numpy's hash walks them again at every reference (40 shared levels hash for ever), and a
    field of object type makes numpy read a pointer from the file's bytes."""

    def __init__(self, name):
        if not isinstance(name, str) or name not in NUMPY_NAMES:
            raise pickle.UnpicklingError(f"numpy dtype {describe_value(name)} is not a plain numeric type")
        self.name, self.order = name, "="

    def __setstate__(self, state):
        # np.dtype's state: (version, byte order, subarray, names, fields, itemsize, alignment, flags)
        if not (isinstance(state, tuple) and len(state) >= 5 and state[1] in ("<", ">", "|", "=")
                and all(part is None for part in state[2:5])):
            raise pickle.UnpicklingError("a numpy dtype with fields or subarrays: not a plain numeric type")
        self.order = state[1]

    def dtype(self):
        return np.dtype(self.order + self.name)


def _numpy_dtype(name, align=False, copy=False):
    return NumpyDtypeRecord(name)


def _numpy_scalar(dtype, data):
    """numpy scalars (EDM's init kwargs hold np.sqrt(1/3)) decoded from their raw bytes into a Python number, with a
    fresh dtype built from the record's type string and byte order."""
    if not isinstance(dtype, NumpyDtypeRecord):
        raise pickle.UnpicklingError("numpy scalars must have a plain numeric dtype (no fields, subarrays or objects)")
    plain = dtype.dtype()
    if not (isinstance(data, bytes) and len(data) == plain.itemsize):
        raise pickle.UnpicklingError("malformed numpy scalar")
    return np.frombuffer(data, dtype=plain)[0].item()


_ALLOWED_GLOBALS = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_node,
    ("torch.nn.modules.container", "ModuleDict"): _ModuleDictNode,
    ("collections", "OrderedDict"): PickledOrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): load_legacy_storage,                    # charged: see _RestrictedUnpickler
    ("numpy", "dtype"): _numpy_dtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,                           # numpy 1.x name
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,                          # numpy 2.x name
}


class ForbiddenGlobal(pickle.UnpicklingError):
    """A pickle asked for a function or class that the restricted unpickler does not allow."""


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals in _ALLOWED_GLOBALS (to our data-only stand-ins); anything else is refused by name.
    The stream is pre-scanned (scan_pickle), and every call to an allowed global is charged the length of its sized
    arguments (OrderedDict copies its items, a storage allocates its bytes): at most twice the stream's size plus
    1 MiB in all, which a file storing each object once never reaches."""

    def __init__(self, file, path):
        super().__init__(file)
        self.file, self.path, self.budget = file, path, 0

    def load(self):
        self.budget = 2 * scan_pickle(self.file) + (1 << 20)
        return super().load()

    def _charged(self, fn):
        def call(*args):
            self.budget -= sum(len(a) for a in args if isinstance(a, (str, bytes, list, tuple, dict)))
            if self.budget < 0:
                raise pickle.UnpicklingError("the pickle builds more data than it holds (repeated references to "
                                             "large objects); a network pickle stores each tensor once")
            return fn(*args)
        return call

    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            fn = _ALLOWED_GLOBALS[module, name]
            return fn if fn is _ModuleDictNode else self._charged(fn)                  # NEWOBJ needs the class itself
        raise ForbiddenGlobal(f"{self.path}: refusing to load the global '{module}.{name}': an EDM network pickle needs "
                              "only tensors, plain containers and torch_utils.persistence records")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError(f"unexpected persistent id {describe_value(pid)}")


def load_persistence_pickle(path):
    """Unpickle an EDM network pickle (torch_utils.persistence format) into plain data: dicts, lists, tensors and _Node
    objects. No code from the file runs. Raises ForbiddenGlobal naming any global outside _ALLOWED_GLOBALS, ValueError if
    the file is not such a pickle."""
    with open(path, "rb") as f, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TypedStorage is deprecated")       # the file's storages are typed ones
        try:
            return _RestrictedUnpickler(f, path).load()
        except ForbiddenGlobal:
            raise
        except Exception as e:
            raise ValueError(f"{path}: not a readable network pickle ({type(e).__name__}: {e}); "
                             "torch.save checkpoints go through load_checkpoint") from None


def persistent_state_dict(node, prefix=""):
    """The state_dict() of a pickled module tree, computed from the data alone, in Module.state_dict()'s order:
    own parameters, own persistent buffers, then children (None entries are skipped, as torch does). Iterative, and
    each node is visited once: a pickle can nest modules thousands deep, make one its own child, or share a child
    between two parents at every level so that the names double with each level."""
    out, seen, todo = {}, set(), [(node, prefix)]
    while todo:
        node, prefix = todo.pop()
        where = prefix.rstrip(".") or "root"
        if id(node) in seen:
            raise ValueError(f"module '{where}' occurs twice in the tree (a cycle or a shared module)")
        seen.add(id(node))
        state = node.state if isinstance(node, _Node) else None
        if not (isinstance(state, dict)
                and all(isinstance(state.get(k), dict) for k in ("_parameters", "_buffers", "_modules"))):
            raise ValueError(f"'{where}' is not a pickled torch module")
        skip = state.get("_non_persistent_buffers_set")                  # not `or set()`: a tensor has no truth
        skip = set() if skip is None else skip
        if not isinstance(skip, (set, frozenset, list, tuple)):
            raise ValueError(f"'{where}' has a _non_persistent_buffers_set that is a {type(skip).__name__}")
        tensors = list(state["_parameters"].items()) + [(k, v) for k, v in state["_buffers"].items() if k not in skip]
        for name, t in tensors:
            if t is not None and not (isinstance(name, str) and isinstance(t, torch.Tensor)):
                raise ValueError(f"'{prefix}{describe_value(name)}' is a {type(t).__name__}, not a tensor")
            if t is not None:
                out[prefix + name] = t.detach()    # a BUILD in the file may have set requires_grad or hooks: values only
        children = [(name, child) for name, child in state["_modules"].items() if child is not None]
        if not all(isinstance(name, str) for name, _ in children):
            raise ValueError(f"'{where}' has a child module whose name is not a string")
        todo.extend((child, f"{prefix}{name}.") for name, child in reversed(children))
    return out


def _as_float32(t, converted):
    """t as float32 without materialising a view: the storage is converted once (cached in `converted`) and viewed
    again with t's size and strides, so a stride-0 view costs its storage, not its shape."""
    if t.dtype == torch.float32:
        return t
    storage = t.untyped_storage()
    key = (storage.data_ptr(), storage.nbytes(), t.dtype)
    if key not in converted:
        flat = torch.empty(0, dtype=t.dtype).set_(storage, 0, (storage.nbytes() // t.element_size(),))
        converted[key] = flat.float()
    return converted[key].as_strided(t.size(), t.stride(), t.storage_offset())


def _edm_kwargs(path, ema, dropout, n_tensors):
    """EDMPrecond's constructor arguments as persistence.persistent_class recorded them, minus those our EDMPrecond
    does not take. They come from the file, so they are checked before a network (even on meta) is built from them:
    each DhariwalUNet block holds several tensors, so a file cannot declare more blocks than it has tensors."""
    kwargs, args = ema.state.get("_init_kwargs"), ema.state.get("_init_args")
    positional = args is not None and not (isinstance(args, (tuple, list)) and not args)    # EDM passes none
    if not isinstance(kwargs, dict) or positional or not all(isinstance(k, str) for k in kwargs):
        raise ValueError(f"{path}: the EDMPrecond in 'ema' has no usable recorded constructor arguments (_init_kwargs)")
    kwargs = dict(kwargs)
    model_type = kwargs.pop("model_type", "DhariwalUNet")
    if model_type != "DhariwalUNet":
        raise ValueError(f"{path}: only EDM's DhariwalUNet (ADM) is supported, this pickle's model_type is "
                         f"{describe_value(model_type)}")
    kwargs.pop("use_fp16", None)                                                   # EDM's fp16 switch; we use autocast instead
    for name, default in (("sigma_min", 0), ("sigma_max", float("inf"))):       # EDMPrecond's defaults, never changed by EDM
        value = kwargs.pop(name, default)
        if not (isinstance(value, (int, float)) and value == default):
            raise ValueError(f"{path}: {name}={describe_value(value)} is not supported (only EDM's default {default})")
    if dropout is not None:
        kwargs["dropout"] = dropout
    levels, blocks = kwargs.get("channel_mult", (1, 2, 3, 4)), kwargs.get("num_blocks", 3)
    if not (isinstance(levels, (list, tuple)) and type(blocks) is int and 0 <= blocks
            and len(levels) * (blocks + 1) <= n_tensors):
        raise ValueError(f"{path}: channel_mult={describe_value(levels)} and num_blocks={describe_value(blocks)} "
                         f"declare more blocks than the file's {n_tensors} tensors could fill")
    return kwargs


def load_edm_pickle(path, device="cpu", dropout=None):
    """Our EDMPrecond with the `ema` weights of an EDM network pickle (e.g. edm-imagenet-64x64-cond-adm.pkl), built
    from the constructor arguments stored in the file; eval mode, requires_grad False. `dropout` overrides the stored
    value (0.10 for ImageNet-64; DMD2 uses 0.0 for the nets it trains). Errors name the file and the problem."""
    data = load_persistence_pickle(path)
    ema = data.get("ema") if isinstance(data, dict) else None
    if not isinstance(ema, _Node) or ema.class_name != "EDMPrecond" or not isinstance(ema.state, dict):
        found = (f"a {type(data).__name__}" if not isinstance(data, dict)
                 else f"'ema' = {describe_value(getattr(ema, 'class_name', ema))}")
        raise ValueError(f"{path}: not an EDM network pickle: expected a dict whose 'ema' is a persistent EDMPrecond, "
                         f"found {found}")
    try:
        sd = persistent_state_dict(ema)
    except ValueError as e:
        raise ValueError(f"{path}: not an EDM network pickle: {e}") from None
    kwargs = _edm_kwargs(path, ema, dropout, len(sd))
    described = ", ".join(f"{k}={describe_value(v)}" for k, v in kwargs.items())
    try:
        with torch.device("meta"):                                 # no memory, no init: weights come from the file
            net = EDMPrecond(**kwargs)
    except Exception as e:                                         # any failure here means arguments we cannot use
        raise ValueError(f"{path}: cannot build EDMPrecond from the pickle's arguments ({described}): "
                         f"{type(e).__name__}: {str(e)[:200]}") from None
    problem = edm_size_problem(kwargs, net)
    if problem:
        raise ValueError(f"{path}: the pickle's EDMPrecond is too large to use: {problem}")

    expected = net.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    mismatched = [f"{k}: file {tuple(sd[k].shape)}, network {tuple(expected[k].shape)}"
                  for k in expected if k in sd and sd[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        raise ValueError(f"{path}: the 'ema' weights do not fit EDMPrecond({described}):\n"
                         f"  missing keys: {missing}\n  unexpected keys: {unexpected}\n  shape mismatches: {mismatched}")
    # The shapes are the model's, but the model's size was declared by the file: _as_float32 keeps each tensor a view
    # (a stride-0 one stays one), so loading costs the storages' bytes, not the declared shapes'.
    converted = {}
    net.load_state_dict({k: _as_float32(v, converted) for k, v in sd.items()}, strict=True, assign=True)
    return net.to(device).eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------------------------------
# 3. Our own checkpoints: plain dicts of tensors and plain data, e.g.
#    save_checkpoint({"init_kwargs": net.init_kwargs, "state_dict": net.state_dict()}, "gen.pt")
#    ck = load_checkpoint("gen.pt"); net = EDMPrecond(**ck["init_kwargs"]); net.load_state_dict(ck["state_dict"])

def save_checkpoint(obj, path):
    """torch.save, atomically (write_atomically): a crash never leaves a half-written checkpoint."""
    write_atomically(path, lambda f: torch.save(obj, f))


def write_atomically(path, write):
    """write(f) to a binary temporary file PATH.<random>.tmp in the same folder, fsync, then os.replace it onto path:
    a crash leaves the old file or the new one, never half of one, and a failure removes the temporary."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)                         # mkstemp makes 0600; give the file open()'s usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path, map_location="cpu"):
    """torch.load(weights_only=True): tensors and plain containers only, nothing in the file is executed."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: " + ("a folder; give a checkpoint file" if os.path.isdir(path) else
                                               "no such checkpoint file"))
    try:
        check_torch_file(path)
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a weights-only torch checkpoint (EDM .pkl files go through load_edm_pickle): "
                         f"{torch_load_error(e)}") from None
    return check_dense_tensors(obj, path, os.path.getsize(path))


SHORT_REPR = reprlib.Repr()              # a key read from a file, in an error message: a few levels and characters
SHORT_REPR.maxlevel, SHORT_REPR.maxstring, SHORT_REPR.maxother = 3, 60, 60


def shape_text(t):
    """A tensor's shape for an error message; a nested tensor has none (its parts differ in shape)."""
    return "(nested)" if t.is_nested else str(list(t.shape))


def check_dense_tensors(obj, path, file_size=None):
    """obj, once every tensor in it (in dicts, lists and tuples, at any depth) is checked to hold as many elements as
    its storage: a file can save zeros(1).expand(10**9), a view of one number with a billion elements, and a network
    built or merged from it would allocate them all. Checkpoints hold dense tensors (views of them included).
    Each container is visited once: a pickle can hold a list that contains itself. With file_size, the storages
    together may not hold more than the file: a legacy torch.save record can size a tensor past its storage, which
    torch then grows (uninitialised memory, if the file never fills it)."""
    # (item, link): link = (key, the parent's link), so a path of keys is put together only for an error (copying it
    # at every level would be quadratic in the depth, and a key's repr can be exponential: a tuple nesting one shared
    # tuple twice, 30 deep); storages: {data pointer: bytes}, each storage counted once
    todo, seen, storages = [(obj, None)], set(), {}
    while todo:
        item, link = todo.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, torch.Tensor):
            problem = ("is not a dense tensor" if item.layout != torch.strided or item.is_nested else
                       f"holds {item.dtype} numbers (complex or quantized)"
                       if item.is_complex() or item.is_quantized else
                       "is on the meta device: it holds no numbers" if item.is_meta else
                       f"has more elements than its storage of {item.untyped_storage().nbytes()} bytes holds (an "
                       "expanded view)" if item.numel() * item.element_size() > item.untyped_storage().nbytes() else
                       None)
            if problem:
                keys = []
                while link is not None:
                    keys.append(link[0])
                    link = link[1]
                where = "".join(f"[{SHORT_REPR.repr(k)}]" for k in reversed(keys)) or "(the whole file)"
                raise ValueError(f"{path}: tensor {where} of shape {shape_text(item)} {problem}; checkpoints hold "
                                 "dense tensors")
            storages[item.untyped_storage().data_ptr()] = item.untyped_storage().nbytes()
        elif isinstance(item, dict):
            todo.extend((v, (k, link)) for k, v in item.items())
        elif isinstance(item, (list, tuple)):
            todo.extend((v, (i, link)) for i, v in enumerate(item))
    if file_size is not None and sum(storages.values()) > file_size:
        raise ValueError(f"{path}: its tensors' storages hold {sum(storages.values())} bytes, more than the file's "
                         f"{file_size}")
    return obj


# What reading a corrupt or hostile zip can raise besides BadZipFile: a bad version field (NotImplementedError), a name
# flagged UTF-8 that is not (UnicodeDecodeError), a broken deflate stream (zlib.error), offsets past the end (OSError,
# EOFError, struct.error), an encrypted member (RuntimeError). Readers turn these into a ValueError naming the file.
ZIP_ERRORS = (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError, NotImplementedError, OverflowError,
              zlib.error, struct.error)


# The PIL formats the image readers decode: the usual photo and dataset formats. Not EPS (PIL hands it to Ghostscript,
# a program, to render), nor ICO (PIL decodes it whole on opening, before a reader can check its size), nor the rarer
# plugins, whose damaged files raise nearly anything.
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")
# A JPEG decodes each of its scans over the whole image: a progressive file repeating one 33-byte scan 30,000 times
# (1 MB) took 28 s at 4096 x 4096. Photos hold 1 scan, or about 10 if progressive.
MAX_JPEG_SCANS = 100


def check_jpeg_scans(image, file):
    """Raise ValueError if the opened PIL image is a JPEG of more than MAX_JPEG_SCANS scans, before it is decoded.
    Counts the start-of-scan markers 0xFFDA in the file object it was opened from (the entropy-coded data cannot hold
    one: it follows every 0xFF byte with a 0x00), leaving the file where it was."""
    if image.format != "JPEG":
        return
    where = file.tell()
    file.seek(0)
    scans = file.read().count(b"\xff\xda")
    file.seek(where)
    if scans > MAX_JPEG_SCANS:
        raise ValueError(f"a JPEG of {scans} scans (at most {MAX_JPEG_SCANS}); decoding it would take minutes")


def check_regular_file(path):
    """A ValueError naming path if it exists but is not a regular file: opening a named pipe blocks for ever, and a
    device such as /dev/zero (a link to it, say) never ends. A missing path is left to the caller's open()."""
    if os.path.exists(path) and not os.path.isfile(path):
        raise ValueError(f"{path}: not a regular file (a folder, a pipe or a device)")
    return path


def check_zip_inflation(path):
    """torch.save writes its zip members uncompressed, so together they hold no more than the file; torch.load
    inflates deflated members whole, so a 1 MB zip of deflated zeros would otherwise load as 1 GB of tensors."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            declared = sum(info.file_size for info in archive.infolist())
        if declared > os.path.getsize(path):
            raise ValueError(f"its zip members declare {declared} bytes, more than the file's "
                             f"{os.path.getsize(path)} (compressed members; torch.save stores them uncompressed)")


def check_torch_file(path):
    """Checks a torch.save file before torch.load(weights_only=True) reads it, raising ValueError or UnpicklingError
    (the caller names the file). Zip or legacy is decided as torch decides, by the first four bytes. A zip
    (torch.save's format): its directory must be where its end record says (check_zip_directory: Python and torch
    then see the same members), its members may not inflate beyond the file (check_zip_inflation), and its pickles
    are scanned (scan_pickle: declared lengths, memo indices, tuples unsafe to hash, which torch's unpickler would hash
    as dict keys). A legacy file: its pickles are scanned too, and its storages may not declare more bytes than the
    file holds (torch allocates what they declare before reading)."""
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"       # torch's own test: a legacy file may end with a zip's end record
    if is_zip:
        check_zip_directory(path)
        check_zip_inflation(path)
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.filename.lower().endswith(".pkl"):           # torch's zip reader finds names in any case
                    scan_pickle(io.BytesIO(archive.read(info)))
        return
    with open(path, "rb") as f:
        declared = legacy_storage_nbytes(f)
    if declared > os.path.getsize(path):
        raise ValueError(f"its storages declare {declared} bytes, more than the file's {os.path.getsize(path)}")


def check_zip_directory(path):
    """Raise ValueError unless the zip's central directory lies where its end record says. Python's zipfile reads
    the directory just before the end record and shifts every offset by any bytes in front of the archive; torch's
    reader takes the recorded offset as it is: a file holding two directories shows each reader other members."""
    with open(path, "rb") as f:
        end = zipfile._EndRecData(f)
    if end is None:
        raise ValueError("no zip end record")
    shift = end[zipfile._ECD_LOCATION] - end[zipfile._ECD_SIZE] - end[zipfile._ECD_OFFSET]
    if end[zipfile._ECD_SIGNATURE] == zipfile.stringEndArchive64:
        shift -= zipfile.sizeEndCentDir64 + zipfile.sizeEndCentDir64Locator
    if shift:
        raise ValueError(f"its zip directory is {shift} bytes away from where its end record puts it (torch.save "
                         "writes no bytes before the archive)")


def torch_load_error(e):
    """One line for a torch.load(weights_only=True) failure. torch's own text for a refused global runs to several
    paragraphs and advises loading with weights_only=False, which would run the file's code: keep the line that names
    what the file asked for."""
    text = str(e)
    if "weights only load failed" not in text.lower():
        return f"{type(e).__name__}: {text}"
    named = [line.strip() for line in text.splitlines() if "GLOBAL" in line]
    return "refused: " + (named[0] if named else "the file needs more than tensors and plain containers")


# ------------------------------------------------------------------------------------------------------------------------
# 4. EDM's sampler (Karras et al. 2022, Algorithm 2), to draw teacher samples.

def karras_sigmas(num_steps, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """EDM eq. 5: sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, i = 0..N-1.
    Descending float64 [N], without the final sigma_N = 0."""
    i = torch.arange(num_steps, dtype=torch.float64)
    return (sigma_max ** (1 / rho) + i / max(num_steps - 1, 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


@torch.no_grad()
def edm_sampler(net, latents, class_labels=None, num_steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0,
                S_churn=0.0, S_min=0.0, S_max=float("inf"), S_noise=1.0, generator=None):
    """Heun's 2nd-order sampler with optional churn (EDM Algorithm 2); NFE = 2 num_steps - 1. S_churn=0 is the
    deterministic probability-flow ODE. latents ~ N(0, I) [B, C, H, W]; returns x_0 in float64 (as EDM)."""
    t_steps = torch.cat([karras_sigmas(num_steps, sigma_min, sigma_max, rho), torch.zeros(1, dtype=torch.float64)]).to(latents.device)
    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):          # i = 0..N-1
        x_cur = x_next
        # Increase the noise level temporarily: t_hat = t (1 + gamma), adding fresh noise of the missing variance.
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0.0
        t_hat = t_cur + gamma * t_cur
        x_hat = x_cur
        if gamma > 0:
            eps = torch.randn(x_cur.shape, generator=generator, dtype=torch.float64, device=x_cur.device)
            x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * eps
        # Euler step from t_hat to t_next along dx/dt = (x - D(x; t)) / t.
        d_cur = (x_hat - net(x_hat, t_hat, class_labels).to(torch.float64)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        # 2nd-order (trapezoidal) correction, except on the last step to t = 0.
        if i < num_steps - 1:
            d_prime = (x_next - net(x_next, t_next, class_labels).to(torch.float64)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


# ------------------------------------------------------------------------------------------------------------------------
# 5. SDXL UNet with Stability's sgm parameter names.
#
# Attribute names reproduce the keys of `sd_xl_base_1.0.safetensors` under `model.diffusion_model.`
# (`time_embed.0`, `label_emb.0.0`, `input_blocks.N.M...`, `middle_block.*`, `output_blocks.*`, `out.0`, `out.2`),
# so that subtree loads with strict=True and no renaming table. DMD2's released UNets are diffusers-named
# state dicts (`dmd2_sdxl_4step_unet_fp16.bin`); `diffusers_to_sgm_unet` renames them by a short rule.
#
#     model = SDXLUNet(SDXLUNetConfig())                           # full SDXL base: 2,567,463,684 parameters
#     sd = torch.load("dmd2_sdxl_4step_unet_fp16.bin", map_location="cpu", weights_only=True)
#     load_sdxl_unet_state(model, diffusers_to_sgm_unet(sd, model.cfg), "dmd2_sdxl_4step_unet_fp16.bin")
#     eps = model(x, t, context, y)                                # [B,4,h,w], [B], [B,77,2048], [B,2816] -> [B,4,h,w]
#
# Layout and numerics follow Stability's generative-models (sgm) `openaimodel.py`, `attention.py`, `util.py`.

@dataclass(frozen=True)
class SDXLUNetConfig:
    in_channels: int = 4                       # latent channels in
    out_channels: int = 4                      # eps channels out
    model_channels: int = 320                  # width of level 0; the time embedding is 4x wider (1280)
    channel_mult: tuple = (1, 2, 4)            # width multiplier per level; all but the last end in a 2x downsample
    num_res_blocks: int = 2                    # ResBlocks per level going down (one more going up)
    transformer_depth: tuple = (0, 2, 10)      # transformer blocks per level (0: no attention); the middle block: last
    num_head_channels: int = 64                # attention head width; heads = channels // num_head_channels
    context_dim: int = 2048                    # cross-attention input width: [CLIP-L 768 | bigG 1280]
    adm_in_channels: int = 2816                # width of y: pooled bigG 1280 + 6 size embeddings x 256

    def __post_init__(self):
        if not self.channel_mult:
            raise ValueError("SDXLUNetConfig: channel_mult needs at least one level")
        widths = [self.model_channels * m for m in self.channel_mult]
        if len(self.transformer_depth) != len(widths):
            raise ValueError(f"SDXLUNetConfig: transformer_depth {self.transformer_depth} needs one entry "
                             f"per level of channel_mult {self.channel_mult}")
        if self.transformer_depth[-1] < 1:
            raise ValueError("SDXLUNetConfig: the middle block holds a SpatialTransformer of depth "
                             "transformer_depth[-1], which must be >= 1")
        if any(w % 32 or w % self.num_head_channels for w in widths):
            raise ValueError(f"SDXLUNetConfig: level widths {widths} must be multiples of 32 (GroupNorm groups) "
                             f"and of num_head_channels={self.num_head_channels}")


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding, cos half first (sgm util.timestep_embedding; diffusers flip_sin_to_cos=True, shift 0).

    Used for the DDPM timestep (dim 320) and for each SDXL size/crop value (dim 256). t [B] -> [B, dim]"""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)  # [half]
    args = t.float()[:, None] * freqs[None]                                  # [B, half]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)             # [B, dim]


def maybe_checkpoint(fn, *args, enabled):
    """Activation checkpointing: keep only fn's inputs and recompute its activations during backward."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with statistics in fp32, cast back (sgm util.GroupNorm32), so fp16/bf16 weights stay accurate."""

    def forward(self, x):
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


class ResBlock(nn.Module):
    """GN-SiLU-conv, add the embedding, GN-SiLU-conv, plus a (1x1 conv) skip. No scale-shift norm in SDXL."""

    def __init__(self, cin, cout, emb_dim):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(32, cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, cout))
        self.out_layers = nn.Sequential(GroupNorm32(32, cout), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(cout, cout, 3, padding=1))
        self.skip_connection = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):                                               # x [B, cin, H, W], emb [B, 1280]
        h = self.in_layers(x)                                                # [B, cout, H, W]
        # timestep + size conditioning, added per channel
        h = h + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Attention(nn.Module):
    """Multi-head softmax attention; self-attention when context is None. Heads of num_head_channels (64) each."""

    def __init__(self, dim, context_dim, head_channels):
        super().__init__()
        self.heads = dim // head_channels
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))

    def forward(self, x, context=None):                                      # x [B, N, C], context [B, M, Cc]
        context = x if context is None else context
        B, N, C = x.shape
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2)        # [B, heads, N or M, C / heads]
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        out = F.scaled_dot_product_attention(q, k, v)                        # softmax(q k^T / sqrt(d_head)) v, no mask
        return self.to_out(out.transpose(1, 2).reshape(B, N, C))


class GEGLU(nn.Module):
    """proj to 2 x inner; first half is the value, second half the gate through exact (erf) GELU."""

    def __init__(self, dim, inner):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x):
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim))

    def forward(self, x):
        return self.net(x)


class TransformerBlock(nn.Module):
    """Pre-LN: self-attention, cross-attention to the text context, GEGLU feed-forward (sgm BasicTransformerBlock)."""

    def __init__(self, dim, context_dim, head_channels):
        super().__init__()
        self.attn1 = Attention(dim, dim, head_channels)
        self.ff = FeedForward(dim)
        self.attn2 = Attention(dim, context_dim, head_channels)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context):                                           # x [B, HW, C], context [B, 77, 2048]
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm, linear proj_in over pixels as tokens, `depth` transformer blocks, linear proj_out, residual."""

    def __init__(self, dim, depth, context_dim, head_channels):
        super().__init__()
        self.norm = GroupNorm32(32, dim, eps=1e-6)
        # use_linear_in_transformer=True: Linear, not 1x1 conv
        self.proj_in = nn.Linear(dim, dim)
        self.transformer_blocks = nn.ModuleList(TransformerBlock(dim, context_dim, head_channels) for _ in range(depth))
        self.proj_out = nn.Linear(dim, dim)

    def forward(self, x, context, checkpointing=False):                      # x [B, C, H, W]
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))            # [B, HW, C]
        for block in self.transformer_blocks:
            h = maybe_checkpoint(block, h, context, enabled=checkpointing)
        h = self.proj_out(h).transpose(1, 2).reshape(B, C, H, W)
        return x + h


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)                  # strided conv, symmetric padding

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class SDXLUNet(nn.Module):
    """sgm UNetModel for SDXL: eps = UNet(x_t, t, context, y).

    input_blocks: conv_in, then per level num_res_blocks x [ResBlock (+ SpatialTransformer)] and a Downsample
    (except the last level); middle_block: ResBlock, SpatialTransformer, ResBlock; output_blocks: per level
    (deepest first) num_res_blocks + 1 x [ResBlock (+ SpatialTransformer)], the last one with an Upsample
    (except level 0), each fed cat([h, skip]); out: GroupNorm, SiLU, conv."""

    def __init__(self, cfg: SDXLUNetConfig = SDXLUNetConfig(), checkpointing=False):
        super().__init__()
        self.cfg, self.checkpointing = cfg, checkpointing
        C, emb_dim, levels = cfg.model_channels, 4 * cfg.model_channels, len(cfg.channel_mult)
        st = lambda ch, depth: SpatialTransformer(ch, depth, cfg.context_dim, cfg.num_head_channels)
        self.time_embed = nn.Sequential(nn.Linear(C, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(cfg.adm_in_channels, emb_dim), nn.SiLU(),
                                                     nn.Linear(emb_dim, emb_dim)))

        self.input_blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(cfg.in_channels, C, 3, padding=1))])
        # widths of the features pushed for the skips
        skips, ch = [C], C
        for level, (mult, depth) in enumerate(zip(cfg.channel_mult, cfg.transformer_depth)):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, mult * C, emb_dim)] + ([st(mult * C, depth)] if depth else [])
                self.input_blocks.append(nn.Sequential(*layers))
                ch = mult * C
                skips.append(ch)
            if level < levels - 1:
                self.input_blocks.append(nn.Sequential(Downsample(ch)))
                skips.append(ch)

        self.middle_block = nn.Sequential(ResBlock(ch, ch, emb_dim), st(ch, cfg.transformer_depth[-1]),
                                          ResBlock(ch, ch, emb_dim))

        self.output_blocks = nn.ModuleList()
        for level in reversed(range(levels)):
            mult, depth = cfg.channel_mult[level], cfg.transformer_depth[level]
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skips.pop(), mult * C, emb_dim)] + ([st(mult * C, depth)] if depth else [])
                ch = mult * C
                if level > 0 and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))                              # index 2 after a transformer, else 1
                self.output_blocks.append(nn.Sequential(*layers))

        self.out = nn.Sequential(GroupNorm32(32, ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    def run_block(self, block, h, emb, context):
        """One sgm TimestepEmbedSequential: ResBlocks get emb, SpatialTransformers get context, the rest only h."""
        for layer in block:
            if isinstance(layer, ResBlock):
                h = maybe_checkpoint(layer, h, emb, enabled=self.checkpointing)
            elif isinstance(layer, SpatialTransformer):
                h = layer(h, context, self.checkpointing)
            else:
                h = layer(h)
        return h

    def encode(self, x, timesteps, context, y):
        """Input blocks and middle block. -> mid [B, 4C, h/4, w/4], skip features (list), emb [B, 4C]"""
        t = torch.as_tensor(timesteps, device=x.device).reshape(-1).expand(x.shape[0])      # scalar or [B] -> [B]
        t_emb = timestep_embedding(t, self.cfg.model_channels).to(x.dtype)                 # [B, 320]
        emb = self.time_embed(t_emb) + self.label_emb(y)                                    # [B, 1280]
        hs, h = [], x
        for block in self.input_blocks:
            h = self.run_block(block, h, emb, context)
            hs.append(h)
        return self.run_block(self.middle_block, h, emb, context), hs, emb

    def mid_features(self, x, timesteps, context, y):
        """Middle-block output only, without the decoder: the features of DMD2's GAN head. [B, 1280, h/4, w/4]"""
        return self.encode(x, timesteps, context, y)[0]

    def forward(self, x, timesteps, context, y, return_mid=False):
        """x [B, 4, h, w] latents, timesteps [B] (or a scalar) DDPM t as float or int, context [B, 77, 2048],
        y [B, 2816] -> eps [B, 4, h, w]; with return_mid also the middle-block output [B, 1280, h/4, w/4]."""
        mid, hs, emb = self.encode(x, timesteps, context, y)
        h = mid
        for block in self.output_blocks:
            # current features first, skip second
            h = self.run_block(block, torch.cat([h, hs.pop()], dim=1), emb, context)
        eps = self.out(h)
        return (eps, mid) if return_mid else eps


# ---- loading: diffusers -> sgm renaming (sdxl.md §6.2) and a strict, explained load ----

RESNET_RENAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                  "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
TOP_RENAMES = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
               "time_embedding.linear_2": "time_embed.2",
               "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
               "conv_norm_out": "out.0", "conv_out": "out.2"}
BLOCK_KEY = re.compile(r"(down_blocks|mid_block|up_blocks)\.(?:(\d+)\.)?"
                       r"(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)")


def sgm_key(key, cfg):
    """The sgm name of one diffusers UNet2DConditionModel key, or None if no rule applies.

    diffusers level i has n = num_res_blocks + 1 sgm blocks: going down, resnet j is input block n*i + j + 1 and
    the downsampler is n*i + n; going up (deepest level first), resnet j is output block n*i + j and the upsampler
    sits after it. Attention layers are the `.1` beside their resnet; inside them nothing is renamed."""
    top, _, param = key.rpartition(".")
    if top in TOP_RENAMES:
        return f"{TOP_RENAMES[top]}.{param}"
    m = BLOCK_KEY.fullmatch(key)
    if m is None:
        return None
    where, part, j, rest = m[1], m[3], int(m[4]), m[5]
    i, n = int(m[2] or 0), cfg.num_res_blocks + 1
    if part == "resnets":
        layer, _, tail = rest.partition(".")
        rest = f"{RESNET_RENAMES.get(layer, layer)}.{tail}"
    if where == "mid_block":
        return f"middle_block.{2 * j if part == 'resnets' else 2 * j + 1}.{rest}"
    if where == "down_blocks":
        if part == "downsamplers":
            return f"input_blocks.{n * i + n}.0.{rest.replace('conv.', 'op.', 1)}"
        return f"input_blocks.{n * i + j + 1}.{0 if part == 'resnets' else 1}.{rest}"
    if part == "upsamplers":
        has_attention = cfg.transformer_depth[len(cfg.channel_mult) - 1 - i] > 0
        return f"output_blocks.{n * i + n - 1}.{2 if has_attention else 1}.{rest}"
    return f"output_blocks.{n * i + j}.{0 if part == 'resnets' else 1}.{rest}"


def diffusers_key(key, cfg):
    """The diffusers UNet2DConditionModel name of one sgm key (the inverse of sgm_key), or None if no rule applies."""
    top, _, param = key.rpartition(".")
    inverse_top = {v: k for k, v in TOP_RENAMES.items()}
    if top in inverse_top:
        return f"{inverse_top[top]}.{param}"
    m = re.fullmatch(r"(input_blocks|middle_block|output_blocks)\.(?:(\d+)\.)?(\d+)\.(.+)", key)
    if m is None:
        return None
    where, block, layer, rest = m[1], int(m[2] or 0), int(m[3]), m[4]
    n, levels = cfg.num_res_blocks + 1, len(cfg.channel_mult)
    if where == "middle_block":
        block, where, i, j, part = 0, "mid_block", None, layer // 2, ("resnets", "attentions", "resnets")[layer]
    elif where == "input_blocks":
        i, j = (block - 1) // n, (block - 1) % n
        part = "downsamplers" if j == n - 1 else ("resnets", "attentions")[layer]
        j, rest = (0, rest.replace("op.", "conv.", 1)) if part == "downsamplers" else (j, rest)
        where = "down_blocks"
    else:
        i, j, where = block // n, block % n, "up_blocks"
        has_attention = cfg.transformer_depth[levels - 1 - i] > 0
        part = "resnets" if layer == 0 else ("attentions" if layer == 1 and has_attention else "upsamplers")
        j = 0 if part == "upsamplers" else j
    if part == "resnets":
        rest = next((ours + rest[len(theirs):] for ours, theirs in RESNET_RENAMES.items()
                     if rest.startswith(theirs + ".")), rest)
    return f"{where}.{'' if i is None else str(i) + '.'}{part}.{j}.{rest}"


def sgm_to_diffusers_unet(state_dict, cfg=SDXLUNetConfig(), source_name="sgm UNet state dict"):
    """Rename SDXLUNet's sgm keys to diffusers UNet2DConditionModel's (the names DMD2's release, diffusers and
    ComfyUI load): the inverse of diffusers_to_sgm_unet, checked by mapping every name back."""
    wrong = sorted(k for k in state_dict if sgm_key(diffusers_key(k, cfg) or "", cfg) != k)
    if wrong:
        raise ValueError(f"{source_name}: cannot rename to diffusers names:\n"
                         + _listing("keys without an inverse", wrong))
    return {diffusers_key(k, cfg): v for k, v in state_dict.items()}


def _listing(title, items, limit=12):
    shown = "\n    ".join(items[:limit]) + (f"\n    ... and {len(items) - limit} more" if len(items) > limit else "")
    return f"  {title} ({len(items)}):\n    {shown}"


def _state_problems(state_dict, expected_shapes):
    """Lines describing missing keys, unexpected keys and shape mismatches of state_dict against {key: shape}."""
    missing = sorted(expected_shapes.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected_shapes.keys())
    wrong = [f"{k}: file {list(state_dict[k].shape)}, model {list(expected_shapes[k])}"
             for k in sorted(expected_shapes.keys() & state_dict.keys())
             if tuple(state_dict[k].shape) != tuple(expected_shapes[k])]
    return [_listing(title, items) for title, items in
            (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong)) if items]


def diffusers_to_sgm_unet(state_dict, cfg=SDXLUNetConfig(), source_name="diffusers UNet state dict"):
    """Rename a diffusers UNet2DConditionModel state dict (DMD2's .bin files) to SDXLUNet's sgm keys.

    Checked key by key and shape by shape against SDXLUNet(cfg) built on the meta device; raises ValueError
    listing keys no rule matches, keys two rules send to one name, missing/unexpected keys and wrong shapes."""
    renamed, unmatched, collisions = {}, [], []
    for key, tensor in state_dict.items():
        new = sgm_key(key, cfg)
        if new is None:
            unmatched.append(key)
        elif new in renamed:
            collisions.append(f"{key} -> {new}")
        else:
            renamed[new] = tensor
    with torch.device("meta"):
        expected = {k: v.shape for k, v in SDXLUNet(cfg).state_dict().items()}
    problems = _state_problems(renamed, expected)
    if unmatched:
        problems.insert(0, _listing("diffusers keys no renaming rule matches", unmatched))
    if collisions:
        problems.insert(0, _listing("keys renamed onto an already used name", collisions))
    if problems:
        raise ValueError(f"{source_name}: does not map onto SDXLUNet({cfg}) (after renaming diffusers -> sgm):\n"
                         + "\n".join(problems))
    return renamed


def _transformer_blocks(shapes):
    """{prefix: the numbers of its transformer blocks}, e.g. 'input_blocks.4.1.': {'0', '1'}, in one pass."""
    found = collections.defaultdict(set)
    for k in shapes:
        prefix, sep, rest = k.partition("transformer_blocks.")
        if sep:
            found[prefix].add(rest.split(".", 1)[0])
    return found


def _transformer_depth(blocks, prefix):
    """Number of transformer blocks under prefix (e.g. 'input_blocks.4.1.'), 0 without a SpatialTransformer, -1 if
    they are not numbered 0, 1, ... (blocks: _transformer_blocks(shapes))."""
    names = blocks.get(prefix, set())
    return len(names) if names == {str(i) for i in range(len(names))} else -1


# Bounds on a layout read from a file's names before a model of it is built (on the meta device, but every block is
# still a Python module): SDXL has 3 levels of 2 ResBlocks and 10 transformer blocks at most; these allow far more.
MAX_SDXL_LEVELS, MAX_SDXL_RES_BLOCKS, MAX_SDXL_TRANSFORMER_BLOCKS = 8, 16, 256
MAX_SDXL_ALL_TRANSFORMER_BLOCKS = 1024     # in the whole UNet (SDXL: 70); each bound alone allows about 8,500
MAX_SDXL_WIDTH = 2 ** 14                   # any channel count (SDXL's widest: 2816); larger overflows meta sizes


def check_sdxl_layout_size(cfg, source_name):
    """Refuse a layout from a file whose UNet would have more than MAX_SDXL_ALL_TRANSFORMER_BLOCKS transformer blocks
    in all (each level's depth counts once per ResBlock: num_res_blocks going down, one more going up; and once in
    the middle block) or a channel count above MAX_SDXL_WIDTH, before a model of it is built. -> cfg"""
    total = sum(cfg.transformer_depth) * (2 * cfg.num_res_blocks + 1) + cfg.transformer_depth[-1]
    widths = [cfg.in_channels, cfg.out_channels, cfg.context_dim, cfg.adm_in_channels,
              *(cfg.model_channels * m for m in cfg.channel_mult)]
    if total > MAX_SDXL_ALL_TRANSFORMER_BLOCKS or max(widths) > MAX_SDXL_WIDTH:
        raise ValueError(f"{source_name}: a UNet layout of {total} transformer blocks and channel counts up to "
                         f"{max(widths)} (at most {MAX_SDXL_ALL_TRANSFORMER_BLOCKS} and {MAX_SDXL_WIDTH}; SDXL: 70 "
                         f"and 2816)")
    return cfg


def infer_sdxl_unet_config(shapes, source_name="UNet state dict", head_channels=64):
    """The SDXLUNetConfig that explains an sgm-named UNet's tensor shapes {key: shape} (no model.diffusion_model.):
    widths from the ResBlock convs, ResBlocks per level from the input blocks between downsamplers, transformer depth
    per level from the numbered transformer_blocks, cross-attention width from attn2.to_k, and heads by SDXL's
    convention of 64-channel heads (on narrower models, the largest width dividing every level's and 64). Checked
    against SDXLUNet(cfg) on the meta device; ValueError naming source_name and what could not be inferred."""
    def dims(key, ndim):
        if key not in shapes:
            raise ValueError(f"{source_name}: cannot infer the SDXL UNet's config: no tensor {key}")
        if len(shapes[key]) != ndim or 0 in shapes[key]:
            raise ValueError(f"{source_name}: cannot infer the SDXL UNet's config: {key} has shape "
                             f"{list(shapes[key])}, not {ndim} non-zero dimensions")
        return tuple(shapes[key])

    C, in_channels = dims("input_blocks.0.0.weight", 4)[:2]
    # block numbers; other names under input_blocks. are left to the strict check at the end
    blocks = sorted({int(m[1]) for k in shapes if (m := re.match(r"input_blocks\.(\d{1,6})\.", k))})[1:]
    levels = [[]]
    for i in blocks:
        if f"input_blocks.{i}.0.op.weight" in shapes:
            levels.append([])                                          # a Downsample ends the level
        else:
            levels[-1].append(i)
    if len({len(level) for level in levels}) != 1 or not levels[0]:
        raise ValueError(f"{source_name}: cannot infer the SDXL UNet's config: ResBlocks per level "
                         f"{[len(level) for level in levels]} differ (SDXLUNetConfig has one num_res_blocks)")
    if len(levels) > MAX_SDXL_LEVELS or len(levels[0]) > MAX_SDXL_RES_BLOCKS:
        raise ValueError(f"{source_name}: cannot infer the SDXL UNet's config: {len(levels)} levels of "
                         f"{len(levels[0])} ResBlocks (at most {MAX_SDXL_LEVELS} of {MAX_SDXL_RES_BLOCKS})")
    widths = [dims(f"input_blocks.{level[0]}.0.in_layers.2.weight", 4)[0] for level in levels]
    blocks = _transformer_blocks(shapes)
    depths = [{_transformer_depth(blocks, f"input_blocks.{i}.1.") for i in level} for level in levels]
    if any(len(d) != 1 or -1 in d for d in depths) or any(w % C for w in widths):
        raise ValueError(f"{source_name}: cannot infer the SDXL UNet's config: transformer depths per block "
                         f"{[sorted(d) for d in depths]} or widths {widths} are not one value per level, "
                         f"a multiple of {C}")
    depths = [d.pop() for d in depths]
    if sum(depths) > MAX_SDXL_TRANSFORMER_BLOCKS:
        raise ValueError(f"{source_name}: cannot infer the SDXL UNet's config: transformer depths {depths} (at most "
                         f"{MAX_SDXL_TRANSFORMER_BLOCKS} blocks per ResBlock, summed over the levels)")
    if _transformer_depth(blocks, "middle_block.1.") != depths[-1]:
        raise ValueError(f"{source_name}: cannot infer the SDXL UNet's config: the middle block's transformer depth "
                         f"{_transformer_depth(blocks, 'middle_block.1.')} differs from the last level's {depths[-1]}")
    to_k = sorted(k for k in shapes if k.endswith("attn2.to_k.weight"))
    if not to_k:
        raise ValueError(f"{source_name}: cannot infer the SDXL UNet's config: no cross-attention (attn2.to_k) weights")
    try:
        cfg = SDXLUNetConfig(in_channels=in_channels, out_channels=dims("out.2.weight", 4)[0], model_channels=C,
                             channel_mult=tuple(w // C for w in widths), num_res_blocks=len(levels[0]),
                             transformer_depth=tuple(depths), num_head_channels=math.gcd(head_channels, *widths),
                             context_dim=dims(to_k[0], 2)[1], adm_in_channels=dims("label_emb.0.0.weight", 2)[1])
        check_sdxl_layout_size(cfg, source_name)
    except ValueError as e:
        raise ValueError(e if str(e).startswith(source_name) else f"{source_name}: {e}") from None
    with torch.device("meta"):
        expected = {k: v.shape for k, v in SDXLUNet(cfg).state_dict().items()}
    problems = _state_problems({k: torch.empty(v, device="meta") for k, v in shapes.items()}, expected)
    if problems:
        raise ValueError(f"{source_name}: the inferred {cfg} does not explain the file:\n" + "\n".join(problems))
    return cfg


def load_sdxl_unet_state(model, state_dict, source_name, assign=False):
    """Strict load of sgm-named weights into an SDXLUNet; ValueError naming source_name and listing every problem.

    The state dict must be the `model.diffusion_model.` subtree with that prefix removed. assign=True keeps the
    file's tensors (and dtype) instead of copying them into the existing parameters (useful from the meta device)."""
    problems = _state_problems(state_dict, {k: v.shape for k, v in model.state_dict().items()})
    if problems:
        if any(k.startswith("model.diffusion_model.") for k in state_dict):
            problems.append("  hint: keys carry the 'model.diffusion_model.' prefix of the full sgm checkpoint: "
                            "strip it first")
        if "conv_in.weight" in state_dict:
            problems.append("  hint: keys are diffusers names: pass the state dict through diffusers_to_sgm_unet first")
        raise ValueError(f"{source_name}: cannot load into SDXLUNet({model.cfg}):\n" + "\n".join(problems))
    model.load_state_dict(state_dict, strict=True, assign=assign)
    return model


# ------------------------------------------------------------------------------------------------------------------------
# 6. Run plumbing shared by imagenet64.py and sdxl.py: processes, per-step RNG, stopping on NaN, files a kill may leave.

def init_distributed(device=""):
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them this is one process. -> (rank, world, device).
    device "" picks cuda:LOCAL_RANK when CUDA exists, else the CPU; "cuda" means cuda:LOCAL_RANK."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = check_device(device)
    if device.type == "cuda":
        device = torch.device("cuda", local if device.index is None else device.index)
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def batch_generator(seed, step, rank, device):
    """This iteration's RNG on this rank: a pure function of (seed, step, rank), so resuming needs no RNG state."""
    s = np.random.SeedSequence([seed, step, rank]).generate_state(2, dtype=np.uint32)
    return torch.Generator(device).manual_seed(int(s[0]) << 31 ^ int(s[1]))


class NonFiniteLoss(FloatingPointError):
    """Raised on every rank together when a loss or a weight stops being finite; the message names the last good file."""


def _all_ranks_sum(t, world):
    if world > 1:
        torch.distributed.all_reduce(t)
    return t


def _last_good(ckpt_path):
    return ckpt_path if os.path.exists(ckpt_path) else "none written yet"


def interrupted(script, ckpt_path=None):
    """Ctrl-C: one line on stderr instead of a traceback, saying what a training run keeps, and the SystemExit to
    raise (status 130, as a shell reports SIGINT). The atomic writers leave no half-written file behind."""
    if ckpt_path is None:
        kept = ""
    elif os.path.exists(ckpt_path):
        kept = f"; {ckpt_path} is kept: add --resume to go on from it"
    else:
        kept = "; no checkpoint was written yet"
    print(f"{script}: interrupted{kept}", file=sys.stderr, flush=True)
    return SystemExit(130)


def check_finite(stats, step, world, ckpt_path):
    """Average logged scalars over ranks and stop every rank together on NaN/inf, BEFORE the optimiser step, so that
    neither the weights in memory nor the last checkpoint on disk see the bad update. -> {name: float}"""
    t = _all_ranks_sum(torch.stack([v.detach().float().reshape(()) for v in stats.values()]), world) / world
    out = dict(zip(stats, t.tolist()))
    if not all(math.isfinite(v) for v in out.values()):
        bad = ", ".join(f"{k}={v}" for k, v in out.items())
        raise NonFiniteLoss(f"non-finite loss at step {step}: {bad}; stopping. Last good checkpoint: {_last_good(ckpt_path)}")
    return out


def check_finite_weights(modules, step, world, ckpt_path):
    """After the optimiser step and before any save: finite losses do not imply finite weights (a corrupted
    optimiser state, e.g. a negative second moment, turns a finite gradient into NaN weights). Each rank checks its
    own shard (FSDP2 DTensors through to_local), then the ranks agree. Raises NonFiniteLoss naming the bad module."""
    flags = []
    for module in modules.values():
        local = [p.detach().to_local() if hasattr(p, "to_local") else p.detach() for p in module.parameters()]
        local = [p for p in local if p.numel()]
        # One fused pass: a NaN or inf anywhere makes that tensor's norm non-finite (weights never reach 1e19, where
        # a finite tensor's squared norm would overflow float32).
        norms = torch.stack(torch._foreach_norm(local)).float() if local else torch.zeros(1)
        flags.append((~torch.isfinite(norms)).any().float())
    flags = _all_ranks_sum(torch.stack(flags), world).tolist()                     # one synchronisation for all
    bad = [name for name, flag in zip(modules, flags) if flag > 0]
    if bad:
        raise NonFiniteLoss(f"non-finite weights in {', '.join(bad)} after the optimiser step at step {step}; "
                            f"stopping without saving them. Last good checkpoint: {_last_good(ckpt_path)}")


def remove_stale_temporaries(folder, names):
    """Delete the temporaries (NAME.<random>.tmp, as save_checkpoint and atomic writers make them) that a killed run
    left beside its own files NAME in folder. Other files are never touched. -> list of removed paths"""
    removed = []
    if not os.path.isdir(folder):
        return removed
    for entry in os.listdir(folder):
        if entry.endswith(".tmp") and any(entry.startswith(n + ".") for n in names):
            path = os.path.join(folder, entry)
            if os.path.isfile(path):
                os.remove(path)
                removed.append(path)
    return removed


def open_run_log(folder, start_step):
    """FOLDER/log.txt, opened to append, for a training run that starts at `start_step`. Every line the training
    scripts write begins with "step N". A run resumed from its checkpoint at step S redoes the steps after S that the
    killed run had already logged, so their lines go first; a new run (step 0) continues no earlier run, so an old
    log.txt (of a run that left no checkpoint) is started afresh. It is rewritten with write_atomically."""
    path = check_regular_file(os.path.join(folder, "log.txt"))          # a pipe there would block the run for ever
    if os.path.isfile(path):
        with open(path, encoding="utf-8", errors="replace", newline="") as f:
            lines = f.readlines()
        kept = [line for line in lines if start_step > 0 and line.endswith("\n")
                and (m := re.match(r"step +(\d{1,18})\b", line)) and int(m.group(1)) <= start_step]
        if len(kept) < len(lines):
            write_atomically(path, lambda f: f.write("".join(kept).encode("utf-8")))
    return open(path, "a", encoding="utf-8")


def check_plain_dict(obj, path, what):
    """A dict read from a checkpoint (a run's cfg, a network's arguments) that is compared and printed as it is: string
    keys, and values that are numbers, strings or flat lists of them. A tensor has no truth value for `!=`, and a list
    nesting one shared list twice, 30 deep, would print for ever."""
    plain = (type(None), bool, int, float, str)           # torch.load refuses ints too long to print
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: {what} is not a dict ({describe_value(obj)})")
    for k, v in obj.items():
        if not isinstance(k, str):
            raise ValueError(f"{path}: {what} has a key that is not a string ({describe_value(k)})")
        if not (isinstance(v, plain) or (isinstance(v, (list, tuple)) and all(isinstance(x, plain) for x in v))):
            raise ValueError(f"{path}: {what}[{k[:80]!r}] is not a number, a string or a flat list of them "
                             f"({describe_value(v)})")
    return obj


def check_step(step, path):
    """A checkpoint's step: an int from 0 (not a bool, a float or a tensor, which range() and comparisons refuse)."""
    if type(step) is not int or not 0 <= step < 2 ** 62:
        raise ValueError(f"{path}: its step is {describe_value(step)}, not an integer from 0")
    return step


def check_adamw_state(opt, path, what):
    """An AdamW state after load_state_dict, checked before any step reads it: torch checks neither the moments'
    shapes (the fused CPU kernel reads and writes past a moment smaller than its parameter: a crash, not an error)
    nor the hyper-parameters' types. Each parameter's state must be empty or hold a scalar step and exp_avg and
    exp_avg_sq of its parameter's shape; each group's betas two numbers in [0, 1), lr, eps and weight_decay numbers,
    amsgrad off (neither script uses it)."""
    def number(x):
        return type(x) in (int, float) and math.isfinite(x)
    for group in opt.param_groups:
        betas = group.get("betas")
        if not (isinstance(betas, (list, tuple)) and len(betas) == 2 and all(number(b) and 0 <= b < 1 for b in betas)
                and all(number(group.get(k)) for k in ("lr", "eps", "weight_decay")) and group.get("amsgrad") is False):
            raise ValueError(f"{path}: {what}: the hyper-parameters {describe_value(betas)} (betas), "
                             f"{describe_value(group.get('lr'))} (lr), {describe_value(group.get('eps'))} (eps), "
                             f"{describe_value(group.get('weight_decay'))} (weight decay), "
                             f"{describe_value(group.get('amsgrad'))} (amsgrad) are not AdamW's")
        for i, param in enumerate(group["params"]):
            state = opt.state.get(param, {})
            if not state:
                continue
            step = state.get("step")
            moments = [state.get(k) for k in ("exp_avg", "exp_avg_sq")]
            if not (isinstance(step, torch.Tensor) and step.numel() == 1 and step.is_floating_point()
                    and all(isinstance(m, torch.Tensor) and m.shape == param.shape and m.dtype == param.dtype
                            for m in moments) and set(state) == {"step", "exp_avg", "exp_avg_sq"}):
                shapes = [list(m.shape) if isinstance(m, torch.Tensor) else describe_value(m) for m in moments]
                raise ValueError(f"{path}: {what}: parameter {i} of shape {list(param.shape)} has the AdamW state "
                                 f"{sorted(map(str, state))} with moments {shapes}, not its parameter's shape")


def require_keys(obj, keys, path, what):
    """A checkpoint read back must be the kind we expect: name the file, what it should be and what is missing."""
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: not {what} (expected a dict, found {type(obj).__name__})")
    missing = [k for k in keys if k not in obj]
    if missing:
        found = ", ".join(sorted(map(str, obj))[:12]) or "nothing"
        raise ValueError(f"{path}: not {what}: missing {', '.join(missing)} (it holds: {found})")
    return obj


def option_errors(cfg, at_least_one=(), at_least_zero=(), below_one=()):
    """The training scripts' start-up checks of numeric options, so that a 0 or a negative number fails at once with
    the option's name, not as a ZeroDivisionError hours into a run. -> [messages]"""
    errors = [f"--{n} must be at least 1, got {getattr(cfg, n)}" for n in at_least_one if getattr(cfg, n) < 1]
    errors += [f"--{n} must be 0 or more, got {getattr(cfg, n)}" for n in at_least_zero if getattr(cfg, n) < 0]
    errors += [f"--{n} must be at least 0 and below 1, got {getattr(cfg, n)}" for n in below_one
               if not 0 <= getattr(cfg, n) < 1]
    if not 0 <= cfg.min_step_percent < cfg.max_step_percent <= 1:     # the DM gradient's share of the noise levels
        errors.append(f"need 0 <= --min_step_percent < --max_step_percent <= 1, got {cfg.min_step_percent} and "
                      f"{cfg.max_step_percent}")
    return errors


# ------------------------------------------------------------------------------------------------------------------------
# 7. LoRA for the SDXL UNet (Hu et al. 2021), as DMD2 trains its LoRA generator (README model zoo: rank 64, alpha 8,
#    dropout 0, lr 5e-5; the fake score stays a full UNet) and as people share SDXL LoRAs.
#
# A target layer W (Linear, or Conv2d of any kernel) gets a trainable low-rank update: y = W x + (alpha / rank) up(down(x)),
# down: in -> rank (a Conv2d keeps W's kernel, stride and padding), up: rank -> out (1x1 for convs), up starts at zero.
# Merged, W' = W + scale * (alpha / rank) * up @ down (flattened over the kernel), which is what diffusers' fuse_lora does.
# The targets are DMD2's peft target_modules (main/sdxl/extract_lora_module.py), in diffusers names: attention
# to_q/to_k/to_v/to_out.0, proj_in/proj_out, ff.net.0.proj, ff.net.2, ResNet conv1/conv2/conv_shortcut/time_emb_proj,
# downsamplers.0.conv and upsamplers.0.conv. Our sgm names are mapped to those through `diffusers_key`.
#
#     targets = add_lora(model, rank=64, alpha=8)      # wraps the targets in place, freezes everything else
#     save_checkpoint({"lora": lora_state_dict(model), "rank": 64, "alpha": 8}, "lora.pt")   # LoRA weights only
#     factors = lora_from_file_state(sd, model.cfg, "dmd2_sdxl_4step_lora_fp16.safetensors")  # Kohya or diffusers keys
#     merge_lora(model, factors, scale=1.0, source_name=...)                   # into a plain (unwrapped) SDXLUNet
#     kohya = kohya_lora_state(factors, model.cfg)    # 'lora_unet_<diffusers name with _>.lora_down.weight', ...

# DMD2's peft target_modules, matched as peft matches them: a module whose diffusers name equals one of these or ends in
# '.' + one of these.
LORA_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                       "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")


def lora_names(cfg):
    """{sgm module name: diffusers module name} of every Linear and Conv2d of SDXLUNet(cfg): what a LoRA may name."""
    with torch.device("meta"):
        model = SDXLUNet(cfg)
    return {name: diffusers_key(f"{name}.weight", cfg).removesuffix(".weight")
            for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def lora_targets(model):
    """{sgm module name: diffusers module name} of DMD2's LoRA targets in this SDXLUNet (for SDXL base: 788 layers)."""
    return {ours: theirs for ours, theirs in lora_names(model.cfg).items()
            if any(theirs == t or theirs.endswith("." + t) for t in LORA_TARGET_MODULES)}


class LoRALayer(nn.Module):
    """A frozen Linear or Conv2d plus a trainable low-rank update. The layer keeps its parameter names ('<name>.weight',
    '<name>.bias'), so base weights load as before; the LoRA weights are '<name>.lora_down.weight' and
    '<name>.lora_up.weight'.
    y = W x + b + (alpha / rank) * up(down(dropout(x)))"""

    def __init__(self, base, rank, alpha, dropout=0.0):
        super().__init__()
        self.conv = isinstance(base, nn.Conv2d)
        if self.conv and (base.groups != 1 or base.dilation != (1, 1) or base.padding_mode != "zeros"):
            raise ValueError("LoRALayer: only plain convolutions (groups 1, dilation 1, zero padding) are supported")
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        kw = dict(device=base.weight.device, dtype=base.weight.dtype, bias=False)
        if self.conv:
            self.stride, self.padding = base.stride, base.padding
            self.lora_down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, **kw)
            self.lora_up = nn.Conv2d(rank, base.out_channels, 1, **kw)
        else:
            self.lora_down = nn.Linear(base.in_features, rank, **kw)
            self.lora_up = nn.Linear(rank, base.out_features, **kw)
        nn.init.zeros_(self.lora_up.weight)      # the update starts at zero: the wrapped UNet starts as the base (peft)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        if self.conv:
            y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding)
        else:
            y = F.linear(x, self.weight, self.bias)
        return y + self.scale * self.lora_up(self.lora_down(self.dropout(x)))


def add_lora(model, rank=64, alpha=8.0, dropout=0.0):
    """Wrap DMD2's LoRA targets of an SDXLUNet in LoRALayers, in place; every other parameter is frozen.
    Returns the wrapped module names. Run it before wrapping the model for FSDP/DDP."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    model.requires_grad_(False)
    names = list(lora_targets(model))
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        layer = getattr(owner, child) if not child.isdigit() else owner[int(child)]
        if isinstance(layer, LoRALayer):
            raise ValueError(f"{name} already holds a LoRA")
        wrapped = LoRALayer(layer, rank, alpha, dropout)
        if child.isdigit():
            owner[int(child)] = wrapped
        else:
            setattr(owner, child, wrapped)
    return names


def lora_init_state(model, seed=0):
    """Initial LoRA weights of a model wrapped by add_lora (it may sit on the meta device), on the CPU, in float32: down
    Kaiming-uniform as nn.Linear/nn.Conv2d initialise themselves (peft's init; bound 1/sqrt(fan_in)), up zero. Seeded,
    so that every process starts from the same weights."""
    g, out = torch.Generator().manual_seed(seed), {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALayer):
            down = m.lora_down.weight
            out[f"{name}.lora_down.weight"] = (2 * torch.rand(down.shape, generator=g) - 1) / math.sqrt(down[0].numel())
            out[f"{name}.lora_up.weight"] = torch.zeros(m.lora_up.weight.shape)
    return out


def is_lora_key(key):
    return ".lora_down." in key or ".lora_up." in key


def lora_state_dict(model):
    """The LoRA weights of a model wrapped by add_lora, and nothing else: {'<name>.lora_down.weight': tensor, ...}."""
    return {k: v for k, v in model.state_dict().items() if is_lora_key(k)}


def load_lora_state(model, state_dict, source_name):
    """Put LoRA-only weights (lora_state_dict's format) into a model wrapped by add_lora; ValueError lists problems."""
    problems = _state_problems(state_dict, {k: v.shape for k, v in lora_state_dict(model).items()})
    if problems:
        raise ValueError(f"{source_name}: LoRA weights do not fit this LoRA UNet:\n" + "\n".join(problems))
    model.load_state_dict(state_dict, strict=False)
    return model


def lora_factors(model):
    """{module name: (down, up, alpha)} of a model wrapped by add_lora: what merge_lora and kohya_lora_state take."""
    return {name: (m.lora_down.weight.detach(), m.lora_up.weight.detach(), m.alpha)
            for name, m in model.named_modules() if isinstance(m, LoRALayer)}


# ---- LoRA files: Kohya ('lora_unet_<module>.lora_down.weight', '.lora_up.weight', '.alpha'; <module> is the diffusers
# or the sgm name with '.' -> '_', as DMD2's extract_lora_module.py and kohya sd-scripts write them) and diffusers/peft
# ('[unet.]<diffusers name>.lora_A.weight' / '.lora_B.weight', or the older '.lora.down.weight' / '.lora.up.weight';
# alpha in the safetensors metadata 'lora_adapter_metadata', else alpha = rank, as diffusers reads them).

LORA_KEY_PARTS = {".lora_down.weight": "down", ".lora_up.weight": "up",
                  ".lora_A.weight": "down", ".lora_B.weight": "up",
                  ".lora.down.weight": "down", ".lora.up.weight": "up", ".alpha": "alpha"}


def _lora_key_table(cfg):
    """Every spelling of a module name a LoRA file may use -> our module name."""
    table = {}
    for ours, theirs in lora_names(cfg).items():
        for name in (theirs, ours):
            table[name] = table[f"unet.{name}"] = table["lora_unet_" + name.replace(".", "_")] = ours
    return table


def _metadata_alpha(metadata, source_name):
    """lora_alpha from diffusers' safetensors metadata ('lora_adapter_metadata': peft's LoraConfig as JSON), or None."""
    raw = (metadata or {}).get("lora_adapter_metadata")
    if raw is None:
        return None
    try:
        config = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{source_name}: metadata 'lora_adapter_metadata' is not JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{source_name}: metadata 'lora_adapter_metadata' is not a JSON object")
    unsupported = [k for k in ("alpha_pattern", "rank_pattern", "use_rslora", "use_dora") if config.get(f"unet.{k}")]
    if unsupported:
        raise ValueError(f"{source_name}: LoRAs with {', '.join(unsupported)} are not supported (plain LoRA only)")
    alpha = config.get("unet.lora_alpha", config.get("lora_alpha"))
    if alpha is None:
        return None
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ValueError(f"{source_name}: lora_alpha in the metadata is not a number")
    if not (-1e30 < alpha < 1e30):             # compared before float(): 10**400 is a valid JSON int; NaN fails too
        raise ValueError(f"{source_name}: lora_alpha in the metadata is {alpha!r:.40}, not a finite number")
    return float(alpha)


def _group_lora_keys(state_dict, table):
    """{our module: {'down'|'up'|'alpha': (key, tensor)}}, the keys no rule matches, and keys claimed twice."""
    groups, unmatched, twice = {}, [], []
    for key, tensor in state_dict.items():
        suffix = next((s for s in LORA_KEY_PARTS if key.endswith(s)), None)
        ours = table.get(key[:-len(suffix)]) if suffix else None
        if ours is None:
            unmatched.append(key)
            continue
        part = groups.setdefault(ours, {})
        if LORA_KEY_PARTS[suffix] in part:
            twice.append(f"{part[LORA_KEY_PARTS[suffix]][0]} and {key} -> {ours}")
        part[LORA_KEY_PARTS[suffix]] = (key, tensor)
    return groups, unmatched, twice


def lora_from_file_state(state_dict, cfg, source_name, metadata=None):
    """A Kohya- or diffusers-style SDXL LoRA state dict -> {our module name: (down, up, alpha)}.

    ValueError naming source_name and listing every key that matches no UNet module (text-encoder LoRAs included),
    every module missing its down or up half, and keys two spellings send to one module."""
    groups, unmatched, twice = _group_lora_keys(state_dict, _lora_key_table(cfg))
    incomplete = [f"{name}: has {sorted(p)}" for name, p in groups.items() if not {"down", "up"} <= p.keys()]
    problems = [_listing(title, items) for title, items in
                (("keys that match no UNet Linear/Conv2d module", unmatched), ("modules without both lora_down and "
                 "lora_up", incomplete), ("keys naming the same module twice", twice)) if items]
    if any(k.startswith(("lora_te", "text_encoder")) for k in unmatched):
        problems.append("  hint: text-encoder LoRA keys (lora_te*, text_encoder*) are not supported: only the UNet's")
    if problems or not groups:
        problems = problems or ["  no LoRA keys"]
        raise ValueError(f"{source_name}: not a LoRA for SDXLUNet({cfg}):\n" + "\n".join(problems))
    default_alpha = _metadata_alpha(metadata, source_name)
    factors = {}
    for name, part in groups.items():
        down, up = part["down"][1], part["up"][1]
        if "alpha" in part and part["alpha"][1].numel() != 1:
            raise ValueError(f"{source_name}: {part['alpha'][0]} holds {part['alpha'][1].numel()} numbers, not one")
        if down.ndim < 2 or down.shape[0] == 0:
            raise ValueError(f"{source_name}: {part['down'][0]} has shape {list(down.shape)}: not a rank >= 1 LoRA")
        try:
            alpha = float(part["alpha"][1]) if "alpha" in part else default_alpha
        except (RuntimeError, ValueError, TypeError) as e:                # e.g. a complex number
            raise ValueError(f"{source_name}: {part['alpha'][0]} is not a real number ({e})") from None
        if alpha is not None and not math.isfinite(alpha):
            raise ValueError(f"{source_name}: {part['alpha'][0]} is {alpha}, not a finite number")
        factors[name] = (down, up, float(down.shape[0] if alpha is None else alpha))
    return factors


def _lora_shape_problem(weight, down, up):
    """Why down [rank, in(, k, k)] and up [out, rank(, 1, 1)] cannot be a low-rank update of weight, or None."""
    rank = down.shape[0]
    if down.ndim != weight.ndim or up.ndim != weight.ndim or up.shape[1] != rank:
        return (f"down {list(down.shape)}, up {list(up.shape)} do not form a rank-{rank} update of a "
                f"{list(weight.shape)} weight")
    if up.shape[0] != weight.shape[0] or down[0].shape != weight[0].shape or up[0, 0].numel() != 1:
        return f"down {list(down.shape)}, up {list(up.shape)} do not fit the weight {list(weight.shape)}"
    if rank > min(weight.shape[0], weight[0].numel()):     # a low-rank update; a huge rank would be a huge product
        return f"rank {rank} is more than the {list(weight.shape)} weight's own rank can be"
    return None


def _lora_merged(layer, down, up, alpha, scale):
    """The layer's weight plus scale * (alpha / rank) * up @ down (summed in float32, then in the weight's dtype), or
    a string saying why not: factors finite in fp16 can still make a sum that overflows fp16."""
    rank, weight = down.shape[0], layer.weight
    problem = _lora_shape_problem(weight, down, up)
    if problem:
        return problem
    delta = up.flatten(1).float().to(weight.device) @ down.flatten(1).float().to(weight.device)      # [out, in * k * k]
    if not torch.isfinite(delta).all():
        return "its factors hold NaN or infinite values"
    merged = weight.float() + (scale * alpha / rank) * delta.reshape(weight.shape)
    cast = merged.to(weight.dtype)
    if not torch.isfinite(cast).all():
        return (f"merged into its {str(weight.dtype).removeprefix('torch.')} weight it is not finite (largest "
                f"|value| {merged.abs().max().item():.3g})")
    return cast


@torch.no_grad()
def merge_lora(model, factors, scale=1.0, source_name="LoRA"):
    """W <- W + scale * (alpha / rank) * up @ down for every module of factors ({name: (down, up, alpha)}), in place.
    Everything is checked first: on any problem nothing is changed and the ValueError lists every module concerned."""
    modules, weights, problems = dict(model.named_modules()), {}, []
    for name, (down, up, alpha) in factors.items():
        layer = modules.get(name)
        if not isinstance(layer, (nn.Linear, nn.Conv2d, LoRALayer)):
            problems.append(f"{name}: no Linear/Conv2d of that name in the model")
            continue
        merged = _lora_merged(layer, down, up, alpha, scale)
        if isinstance(merged, str):
            problems.append(f"{name}: {merged}")
        else:
            weights[name] = merged
    if problems:
        raise ValueError(f"{source_name}: cannot merge into SDXLUNet({model.cfg}):\n" + _listing("problems", problems))
    for name, merged in weights.items():
        modules[name].weight.copy_(merged)
    return model


def kohya_lora_state(factors, cfg, dtype=None, source_name="LoRA"):
    """{our module name: (down, up, alpha)} -> the Kohya keys of DMD2's released LoRA (extract_lora_module.py):
    'lora_unet_<diffusers module name, '.' -> '_'>.lora_down.weight', '.lora_up.weight' and a 0-d '.alpha'. Checked as
    a merge is (each pair fits its layer of SDXLUNet(cfg), built on the meta device) and finite in dtype (an alpha of
    3e38 is inf in fp16): a file that merge_lora would refuse is not written."""
    with torch.device("meta"):
        layers = dict(SDXLUNet(cfg).named_modules())
    problems = []
    for name, (down, up, alpha) in factors.items():
        if not isinstance(layers.get(name), (nn.Linear, nn.Conv2d)):
            problems.append(f"{name}: no Linear/Conv2d of that name in the model")
        elif problem := _lora_shape_problem(layers[name].weight, down, up):
            problems.append(f"{name}: {problem}")
        elif not all(torch.isfinite(t.detach().to(dtype or t.dtype)).all() for t in (down, up, torch.tensor(float(alpha)))):
            problems.append(f"{name}: its factors or alpha are NaN or infinite in {dtype or down.dtype}")
    if problems:
        raise ValueError(f"{source_name}: cannot export for SDXLUNet({cfg}):\n" + _listing("problems", problems))
    names, out = lora_names(cfg), {}
    for name, (down, up, alpha) in factors.items():
        key = "lora_unet_" + names[name].replace(".", "_")
        out[f"{key}.lora_down.weight"] = down.detach().to(dtype or down.dtype).contiguous()
        out[f"{key}.lora_up.weight"] = up.detach().to(dtype or up.dtype).contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(alpha), dtype=dtype or torch.float32)
    return out


# ------------------------------------------------------------------------------------------------------------------------
# 8. safetensors by hand (huggingface/safetensors format), shared by sdxl.py (checkpoints, latents, LoRA files) and
#    fid.py (open_clip weights):
# [8-byte little-endian header length N][N bytes of JSON][raw little-endian tensor data].
# Each JSON entry is name -> {"dtype", "shape", "data_offsets": [begin, end]}, offsets relative to the data section.

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's limit; a real header is ~200 KB
MAX_DIMS = 64  # a generous bound (real tensors have <= 5 dims); without one a 100 MB header could list 50M zero dims
# JSON values a header may hold: json.loads builds them all, and 100 MB of empty lists make 2 GB of Python objects. A
# tensor's entry takes about ten (SDXL's 2,515 tensors: about 25,000); 2**22 of them take about 150 MB.
MAX_HEADER_VALUES = 1 << 22


def _reject_duplicates(pairs):
    """json object_pairs_hook: a name listed twice would silently keep only the last entry."""
    result = dict(pairs)
    if len(result) != len(pairs):                  # one pass: a header may hold a million keys
        seen, twice = set(), set()
        for k, _ in pairs:
            (twice if k in seen else seen).add(k)
        raise ValueError(f"duplicate keys {sorted(twice)[:5]}")
    return result


def _parse_header_json(path, raw):
    """The header's JSON object; a clear error for bad UTF-8/JSON, nesting too deep to parse, too many values (counted
    before parsing: commas and brackets), or a non-object."""
    values = raw.count(b",") + raw.count(b"[") + raw.count(b"{")
    if values > MAX_HEADER_VALUES:
        raise ValueError(f"{path}: header holds {values:,} commas and brackets, more than the {MAX_HEADER_VALUES:,} "
                         "that the entries of 400,000 tensors would need")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(f"{path}: header is not valid UTF-8 JSON or is nested too deeply ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: header must be a JSON object, got {type(header).__name__}")
    # The reference reader (safetensors' Rust serde types) takes a missing or null __metadata__ as none, and refuses
    # anything but a map of strings to strings: [], 0, false and "" are errors there, so they are errors here.
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not (isinstance(metadata, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise ValueError(f"{path}: __metadata__ must be an object mapping strings to strings, got {metadata!r:.200}")
    return header, metadata


def _check_entry(path, name, e, data_size):
    """(torch dtype, shape, begin, end) of one header entry, or a ValueError naming the file, tensor and fault."""
    if not (isinstance(e, dict) and {"dtype", "shape", "data_offsets"} <= e.keys()):
        raise ValueError(f"{path}: tensor {name!r} needs 'dtype', 'shape' and 'data_offsets', got {e!r:.200}")
    dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise ValueError(f"{path}: tensor {name!r} has unknown dtype {dtype!r:.100} "
                         f"(known: {', '.join(SAFETENSORS_DTYPES)})")
    # torch needs every dim, and every stride (the product of the non-zero dims), to fit an int64; a zero-size
    # tensor passes the byte-count check below whatever its other dims are, so this is checked on its own.
    if not (isinstance(shape, list) and len(shape) <= MAX_DIMS and all(type(d) is int and d >= 0 for d in shape)
            and math.prod(max(d, 1) for d in shape) < 2 ** 63):
        raise ValueError(f"{path}: tensor {name!r} has invalid shape {shape!r:.200} (at most {MAX_DIMS} dims of "
                         f"non-negative integers whose non-zero product is below 2**63)")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_size):
        raise ValueError(f"{path}: tensor {name!r} has data_offsets {offsets!r:.200} "
                         f"outside the {data_size}-byte data section")
    nbytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise ValueError(f"{path}: tensor {name!r} is {dtype} {shape}, i.e. {nbytes} bytes, "
                         f"but its data_offsets {offsets} span {offsets[1] - offsets[0]} bytes")
    return SAFETENSORS_DTYPES[dtype], tuple(shape), offsets[0], offsets[1]


def read_safetensors_header(path):
    """Parse and validate the header without reading tensor data.

    Returns (entries, metadata, data_start) with entries[name] = (torch dtype, shape tuple, begin, end),
    begin/end relative to the data section that starts at byte data_start. Raises ValueError naming the file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    check_regular_file(path)
    size = os.path.getsize(path)
    if size < 8:
        raise ValueError(f"{path}: {size} bytes is too short for a safetensors file (needs an 8-byte header length)")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > MAX_HEADER_BYTES or n > size - 8:  # checked before allocating: no giant read
            raise ValueError(f"{path}: header length {n} is larger than the file ({size} bytes) "
                             f"or the {MAX_HEADER_BYTES}-byte limit")
        raw = f.read(n)
    header, metadata = _parse_header_json(path, raw)
    data_start, data_size = 8 + n, size - 8 - n
    entries = {name: _check_entry(path, name, e, data_size) for name, e in header.items()}
    # The format requires the tensors to tile the data section exactly: no gaps, no overlaps, nothing after the end.
    end = 0
    for name, (_, _, begin, stop) in sorted(entries.items(), key=lambda item: item[1][2:]):
        if begin != end:
            raise ValueError(f"{path}: tensor {name!r} starts at byte {begin} of the data section, expected {end} "
                             f"({'overlap' if begin < end else 'gap'} between tensors)")
        end = stop
    if end != data_size:
        raise ValueError(f"{path}: tensors cover {end} bytes but the data section has {data_size} "
                         f"(truncated or trailing bytes)")
    return entries, metadata, data_start


def read_safetensors(path, prefix=None, device="cpu"):
    """{name: tensor} for the tensors whose names start with prefix (the prefix is removed from the names).

    Tensors are views of a copy-on-write memory map of the file: nothing is read until it is used, so a 7 GB
    checkpoint costs no RAM until its tensors are copied somewhere (e.g. converted by .to(dtype) or moved to a GPU)."""
    entries, _, data_start = read_safetensors_header(path)
    with open(path, "rb") as f:  # the map stays valid after the file is closed
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # ACCESS_COPY: writable for torch, never written back
    tensors = {}
    for name, (dtype, shape, begin, end) in entries.items():
        if prefix is not None and not name.startswith(prefix):
            continue
        start = data_start + begin
        if begin == end:  # torch.frombuffer refuses empty buffers
            t = torch.empty(shape, dtype=dtype)
        elif start % dtype.itemsize:  # unaligned (some writers do not pad the header): copy instead of a misaligned view
            t = torch.frombuffer(bytearray(mm[start:data_start + end]), dtype=dtype).reshape(shape)
        else:
            t = torch.frombuffer(mm, dtype=dtype, count=math.prod(shape), offset=start).reshape(shape)
        tensors[name[len(prefix or ""):]] = t.to(device)
    return tensors


def write_safetensors(path, tensors, metadata=None):
    """Write {name: tensor} (and optional {str: str} metadata) as safetensors, atomically (temp file + os.replace)."""
    if not all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in tensors.items()) or "__metadata__" in tensors:
        raise ValueError(f"{path}: write_safetensors needs {{str name: tensor}} (and no tensor named __metadata__)")
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError(f"{path}: metadata must map strings to strings")
    unsupported = {k: t.dtype for k, t in tensors.items() if t.dtype not in DTYPE_NAMES}
    if unsupported:
        raise ValueError(f"{path}: cannot store dtypes {unsupported} (supported: {', '.join(SAFETENSORS_DTYPES)})")
    names = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))  # widest dtypes first keeps every tensor aligned
    header, offset = ({"__metadata__": dict(metadata)} if metadata else {}), 0
    for k in names:
        nbytes = tensors[k].numel() * tensors[k].element_size()
        header[k] = {"dtype": DTYPE_NAMES[tensors[k].dtype], "shape": list(tensors[k].shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # pad with spaces so the data section starts 8-byte aligned
    if len(raw) > MAX_HEADER_BYTES:  # refused here, not when the file is read back (e.g. at train time)
        raise ValueError(f"{path}: its header would be {len(raw)} bytes, more than safetensors readers accept "
                         f"({MAX_HEADER_BYTES})")
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            for k in names:  # one tensor at a time, straight from its memory (no second copy of the whole dict)
                t = tensors[k].detach().to("cpu").contiguous().reshape(-1)
                if t.numel():
                    f.write(t.view(torch.uint8).numpy().data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise



# ------------------------------------------------------------------------------------------------------------------------
# Command line: check and convert an EDM pickle, draw teacher samples.

def main(argv=None):
    p = argparse.ArgumentParser(description="Load an EDM network pickle safely; convert it or sample from it.",
                                formatter_class=HelpFormatter)
    p.add_argument("pkl", help="EDM network pickle, e.g. edm-imagenet-64x64-cond-adm.pkl")
    p.add_argument("--out", default=None, help="write {'init_kwargs', 'state_dict'} here (load with load_checkpoint)")
    p.add_argument("--grid", default=None, help="write a PNG grid of teacher samples here")
    p.add_argument("--num", type=int, default=16, help="number of samples in the grid")
    p.add_argument("--steps", type=int, default=18, help="Heun steps (NFE = 2 steps - 1)")
    p.add_argument("--churn", type=float, default=0.0, help="S_churn (0: deterministic ODE sampler)")
    p.add_argument("--s_min", type=float, default=0.0, help="S_min")
    p.add_argument("--s_max", type=float, default=float("inf"), help="S_max")
    p.add_argument("--s_noise", type=float, default=1.0, help="S_noise")
    p.add_argument("--seed", type=int, default=0, help="seed for latents, labels and churn noise")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    try:
        run_main(args)
    except (OSError, ValueError, pickle.UnpicklingError) as e:    # a bad file or option: the message, no traceback
        p.exit(1, f"unet.py: error: {e}\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each option's default, except where there is none to show: a required option, or a default of None
    (e.g. "use a random subset of this many images"), which argparse would print as "(default: None)"."""

    def _get_help_string(self, action):
        if action.required or action.default is None:
            return action.help
        return super()._get_help_string(action)


def check_device(name):
    """torch.device(name), or a ValueError naming --device: not a device name, or CUDA asked of a torch without it.
    An empty name is the default: CUDA when there is one, else the CPU."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this torch sees no CUDA device")
    return device


def check_main_args(args):
    """What would fail after minutes of sampling fails now: impossible counts, the device, --out and --grid."""
    if args.steps < 1 or args.num < 1 or args.churn < 0:
        raise ValueError(f"need --steps >= 1, --num >= 1 and --churn >= 0, got {args.steps}, {args.num}, {args.churn}")
    check_device(args.device)
    if args.grid:
        from PIL import Image
        if os.path.splitext(args.grid)[1].lower() not in Image.registered_extensions():
            raise ValueError(f"--grid {args.grid}: give an image file name (.png, .jpg, ...)")
        if args.out and os.path.abspath(args.out) == os.path.abspath(args.grid):
            raise ValueError(f"--grid and --out are the same file, {args.grid}: the picture would replace the weights")
    for flag, path in (("--out", args.out), ("--grid", args.grid)):
        if path:
            check_writable(path, flag)
            if os.path.abspath(path) == os.path.abspath(args.pkl):
                raise ValueError(f"{flag} {path} is the pickle being read: it would replace the downloaded network")


def check_writable(path, flag=""):
    """Raise ValueError now if a file could not be written at `path` once the work is done: it ends with a slash or
    names a folder, or its folder neither exists writable nor can be made. Makes nothing, so a run that fails later
    leaves no empty folders (fid.check_dest is this check plus making the folder)."""
    name = f"{flag} {path}" if flag else path
    if not path:
        raise ValueError(f"{flag + ': ' if flag else ''}an empty path: give the name of the file to write")
    if path.endswith(("/", os.sep)):                    # abspath would drop the slash and name the folder's parent
        raise ValueError(f"{name}: ends with a slash; give the path of the file to write")
    if os.path.isdir(path):
        raise ValueError(f"{name}: is a folder; give the path of the file to write")
    folder = existing = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"{name}: cannot make its folder {folder} ({existing} is a file)")
    if not os.access(existing, os.W_OK):
        raise ValueError(f"{name}: its folder {folder} is not writable" if existing == folder else
                         f"{name}: cannot make its folder {folder} ({existing} is not writable)")


def run_main(args):
    """The command line's work: load the pickle, then write --out (a weights-only checkpoint) and --grid (samples)."""
    check_main_args(args)
    net = load_edm_pickle(args.pkl, device=args.device)
    print(f"{args.pkl}: EDMPrecond {net.init_kwargs}, {sum(t.numel() for t in net.parameters()):,} parameters")
    if args.out:
        save_checkpoint({"init_kwargs": net.init_kwargs, "state_dict": net.state_dict()}, args.out)
        print(f"wrote {args.out}")
    if args.grid:
        from PIL import Image
        g = torch.Generator(args.device).manual_seed(args.seed)
        res, C = net.img_resolution, net.img_channels
        latents = torch.randn([args.num, C, res, res], generator=g, device=args.device)
        labels = None
        if net.label_dim:                                                          # random classes, as EDM's generate.py
            labels = F.one_hot(torch.randint(net.label_dim, [args.num], generator=g, device=args.device), net.label_dim).float()
        with torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.device.startswith("cuda")):
            x = edm_sampler(net, latents, labels, num_steps=args.steps, S_churn=args.churn, S_min=args.s_min,
                            S_max=args.s_max, S_noise=args.s_noise, generator=g)
        x = (x * 127.5 + 128).clip(0, 255).to(torch.uint8).cpu()                  # EDM's rounding to uint8
        n = math.ceil(math.sqrt(args.num))
        x = torch.cat([x, torch.zeros([n * n - args.num, C, res, res], dtype=torch.uint8)])
        x = x.reshape(n, n, C, res, res).permute(0, 3, 1, 4, 2).reshape(n * res, n * res, C)  # [n*res, n*res, C]
        os.makedirs(os.path.dirname(os.path.abspath(args.grid)), exist_ok=True)
        Image.fromarray(x.squeeze(-1).numpy() if C == 1 else x.numpy()).save(args.grid)
        print(f"wrote {args.grid}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        raise interrupted("unet.py") from None
