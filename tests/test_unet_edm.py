"""Tests of unet.py, section EDM ImageNet-64: the network against an independent functional formulation and EDM's
state-dict listing, the safe pickle loader against pickles written the way EDM writes them, checkpoints, and the sampler.

There is no EDM package on PyPI, so the reference here is (a) the key/shape listing of edm_fid.md §1.3 written out
literally, (b) a functional re-derivation of the forward pass built from other PyTorch primitives (nearest upsampling,
average pooling, scaled_dot_product_attention, an explicit qkv index map), and (c) closed forms (Table 1 of EDM, the
Gaussian-data probability-flow ODE). The full-size network is checked on the meta device: a real 296M-parameter CPU
forward pass costs 219 GFLOP (tens of seconds on 2 shared cores); numerics are checked on a tiny configuration.
"""
import collections
import contextlib
import math
import os
import pickle
import sys
import types
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import unet

TINY = dict(img_resolution=8, img_channels=3, label_dim=10, model_channels=64, channel_mult=[1, 2, 2], channel_mult_emb=2,
            num_blocks=1, attn_resolutions=[4], dropout=0.0)   # 64/128/128 channels at 8/4/2 px; 2 heads at 128 channels
R = TINY["img_resolution"]


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def randomize_(net, seed=0):
    """Random weights everywhere (EDM zero-inits conv1, proj and out_conv, which would hide most of the network)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            elif ".norm" in name or "out_norm" in name:
                p.copy_((1 if name.endswith("weight") else 0) + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return net


def tiny_net(seed=0, **overrides):
    torch.manual_seed(seed)
    return randomize_(unet.EDMPrecond(**{**TINY, **overrides}), seed).eval()


def one_hot(labels, n):
    return F.one_hot(torch.as_tensor(labels), n).float()


# ------------------------------------------------------------------------------------------------------------------------
# EDM's state-dict listing (edm_fid.md §1.3), written out by hand for the full ImageNet-64 configuration.

DOC_TABLE_ENC = [  # (name, Ci, Co, attention, resample)
    ("64x64_block0", 192, 192, False, None), ("64x64_block1", 192, 192, False, None), ("64x64_block2", 192, 192, False, None),
    ("32x32_down", 192, 192, False, "down"),
    ("32x32_block0", 192, 384, True, None), ("32x32_block1", 384, 384, True, None), ("32x32_block2", 384, 384, True, None),
    ("16x16_down", 384, 384, False, "down"),
    ("16x16_block0", 384, 576, True, None), ("16x16_block1", 576, 576, True, None), ("16x16_block2", 576, 576, True, None),
    ("8x8_down", 576, 576, False, "down"),
    ("8x8_block0", 576, 768, True, None), ("8x8_block1", 768, 768, True, None), ("8x8_block2", 768, 768, True, None),
]
DOC_TABLE_DEC = [
    ("8x8_in0", 768, 768, True, None), ("8x8_in1", 768, 768, False, None),
    ("8x8_block0", 1536, 768, True, None), ("8x8_block1", 1536, 768, True, None), ("8x8_block2", 1536, 768, True, None),
    ("8x8_block3", 1344, 768, True, None),
    ("16x16_up", 768, 768, False, "up"),
    ("16x16_block0", 1344, 576, True, None), ("16x16_block1", 1152, 576, True, None), ("16x16_block2", 1152, 576, True, None),
    ("16x16_block3", 960, 576, True, None),
    ("32x32_up", 576, 576, False, "up"),
    ("32x32_block0", 960, 384, True, None), ("32x32_block1", 768, 384, True, None), ("32x32_block2", 768, 384, True, None),
    ("32x32_block3", 576, 384, True, None),
    ("64x64_up", 384, 384, False, "up"),
    ("64x64_block0", 576, 192, False, None), ("64x64_block1", 384, 192, False, None), ("64x64_block2", 384, 192, False, None),
    ("64x64_block3", 384, 192, False, None),
]


def block_table(img_resolution, model_channels, channel_mult, num_blocks, attn_resolutions, **_):
    """The block table for any configuration, following the rules stated in edm_fid.md §1.3 (checked against the literal
    table above for the full configuration)."""
    enc, widths, skips = [], [model_channels * m for m in channel_mult], [model_channels * channel_mult[0]]
    c = widths[0]
    for level, w in enumerate(widths):
        res = img_resolution >> level
        if level > 0:
            enc.append((f"{res}x{res}_down", c, c, False, "down"))
            skips.append(c)
        for i in range(num_blocks):
            enc.append((f"{res}x{res}_block{i}", c, w, res in attn_resolutions, None))
            c = w
            skips.append(c)
    dec = []
    for level in reversed(range(len(widths))):
        res, w = img_resolution >> level, widths[level]
        if level == len(widths) - 1:
            dec += [(f"{res}x{res}_in0", c, c, True, None), (f"{res}x{res}_in1", c, c, False, None)]
        else:
            dec.append((f"{res}x{res}_up", c, c, False, "up"))
        for i in range(num_blocks + 1):
            dec.append((f"{res}x{res}_block{i}", c + skips.pop(), w, res in attn_resolutions, None))
            c = w
    return enc, dec


def edm_listing(cfg):
    """[(key, shape)] in EDM's state_dict order for an EDMPrecond(DhariwalUNet) configuration."""
    mc, E = cfg["model_channels"], cfg["model_channels"] * cfg.get("channel_mult_emb", 4)
    C0, img = mc * cfg["channel_mult"][0], cfg["img_channels"]
    out = [("map_layer0.weight", (E, mc)), ("map_layer0.bias", (E,)), ("map_layer1.weight", (E, E)), ("map_layer1.bias", (E,))]
    if cfg["label_dim"]:
        out.append(("map_label.weight", (E, cfg["label_dim"])))
    res = cfg["img_resolution"]
    out += [(f"enc.{res}x{res}_conv.weight", (C0, img, 3, 3)), (f"enc.{res}x{res}_conv.bias", (C0,))]
    enc, dec = block_table(**cfg)
    for part, table in (("enc", enc), ("dec", dec)):
        for name, ci, co, attn, resample in table:
            p = f"{part}.{name}."
            out += [(p + "norm0.weight", (ci,)), (p + "norm0.bias", (ci,)), (p + "conv0.weight", (co, ci, 3, 3)), (p + "conv0.bias", (co,))]
            if resample:
                out.append((p + "conv0.resample_filter", (1, 1, 2, 2)))
            out += [(p + "affine.weight", (2 * co, E)), (p + "affine.bias", (2 * co,)), (p + "norm1.weight", (co,)),
                    (p + "norm1.bias", (co,)), (p + "conv1.weight", (co, co, 3, 3)), (p + "conv1.bias", (co,))]
            if ci != co:
                out += [(p + "skip.weight", (co, ci, 1, 1)), (p + "skip.bias", (co,))]
            if resample:
                out.append((p + "skip.resample_filter", (1, 1, 2, 2)))
            if attn:
                out += [(p + "norm2.weight", (co,)), (p + "norm2.bias", (co,)), (p + "qkv.weight", (3 * co, co, 1, 1)),
                        (p + "qkv.bias", (3 * co,)), (p + "proj.weight", (co, co, 1, 1)), (p + "proj.bias", (co,))]
    out += [("out_norm.weight", (C0,)), ("out_norm.bias", (C0,)), ("out_conv.weight", (img, C0, 3, 3)), ("out_conv.bias", (img,))]
    return [("model." + k, s) for k, s in out]


def test_full_config_state_dict_is_edms():
    assert block_table(**unet.EDM_IMAGENET64) == (DOC_TABLE_ENC, DOC_TABLE_DEC)
    with torch.device("meta"):
        net = unet.EDMPrecond(**unet.EDM_IMAGENET64)
    sd = net.state_dict()
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == edm_listing(unet.EDM_IMAGENET64)   # names, shapes and order
    assert len(sd) == 553
    assert sum(p.numel() for p in net.parameters()) == 295_899_267
    assert len(list(net.parameters())) == 541
    buffers = dict(net.named_buffers())
    assert len(buffers) == 12 and all(k.endswith("resample_filter") for k in buffers)
    assert not any(k.startswith(("model.map_noise", "model.map_augment")) for k in sd)
    # A dict with exactly EDM's names and shapes loads strictly (on meta: no memory).
    edm_sd = {k: torch.empty(s, device="meta") for k, s in edm_listing(unet.EDM_IMAGENET64)}
    net.load_state_dict(edm_sd, strict=True, assign=True)


def test_tiny_config_state_dict_follows_the_same_rules():
    net = unet.EDMPrecond(**TINY)
    assert [(k, tuple(v.shape)) for k, v in net.state_dict().items()] == edm_listing(TINY)
    gn = {n: m.num_groups for n, m in net.named_modules() if isinstance(m, torch.nn.GroupNorm)}
    assert gn["model.enc.8x8_block0.norm0"] == 16                                  # min(32, 64 // 4): at least 4 channels a group
    assert gn["model.enc.4x4_block0.norm1"] == 32 and gn["model.dec.2x2_block0.norm0"] == 32
    assert all(m.eps == 1e-5 for m in net.modules() if isinstance(m, torch.nn.GroupNorm))


# ------------------------------------------------------------------------------------------------------------------------
# An independent functional formulation of EDMPrecond(DhariwalUNet), from the facts of edm_fid.md §1.2-1.4.

def ref_group_norm(x, W, p):
    return F.group_norm(x, min(32, x.shape[1] // 4), W[p + ".weight"], W[p + ".bias"], eps=1e-5)


def ref_resample(x, resample):
    if resample == "up":
        return F.interpolate(x, scale_factor=2, mode="nearest")
    if resample == "down":
        return F.avg_pool2d(x, 2)
    return x


def ref_attention(h, W, p):
    """Heads of 64 channels; within a head's 3*64 qkv channels, channel 3c+j holds (q, k, v)[j] of channel c."""
    B, C, H, Wd = h.shape
    nh, ch = C // 64, 64
    qkv = F.conv2d(ref_group_norm(h, W, p + "norm2"), W[p + "qkv.weight"], W[p + "qkv.bias"])      # [B, 3C, H, W]
    idx = torch.arange(3 * C).reshape(nh, ch, 3)                                                 # channel index of (head, c, j)
    q, k, v = (qkv[:, idx[:, :, j].flatten()].reshape(B, nh, ch, H * Wd).transpose(2, 3) for j in range(3))  # [B, nh, L, ch]
    a = F.scaled_dot_product_attention(q, k, v)                                                 # softmax(q k^T / sqrt(ch)) v
    return F.conv2d(a.transpose(2, 3).reshape(B, C, H, Wd), W[p + "proj.weight"], W[p + "proj.bias"])


def ref_block(x, emb, W, p, resample):
    h = F.silu(ref_group_norm(x, W, p + "norm0"))
    h = F.conv2d(ref_resample(h, resample), W[p + "conv0.weight"], W[p + "conv0.bias"], padding=1)
    Co = h.shape[1]
    ss = F.linear(emb, W[p + "affine.weight"], W[p + "affine.bias"])                           # [B, 2 Co]: scale, then shift
    h = F.silu(ref_group_norm(h, W, p + "norm1") * (1 + ss[:, :Co, None, None]) + ss[:, Co:, None, None])
    h = F.conv2d(h, W[p + "conv1.weight"], W[p + "conv1.bias"], padding=1)
    s = ref_resample(x, resample)
    if p + "skip.weight" in W:
        s = F.conv2d(s, W[p + "skip.weight"], W[p + "skip.bias"])
    h = h + s
    if p + "qkv.weight" in W:
        h = h + ref_attention(h, W, p)
    return h


def ref_denoiser(W, cfg, x, sigma, labels):
    """D(x; sigma, y) in float64 coefficients around a float32 network; returns (D, bottleneck)."""
    sd = 0.5
    sigma64 = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
    c_skip, c_out = sd ** 2 / (sigma64 ** 2 + sd ** 2), sigma64 * sd / (sigma64 ** 2 + sd ** 2).sqrt()
    c_in, c_noise = 1 / (sigma64 ** 2 + sd ** 2).sqrt(), sigma64.log() / 4
    mc = cfg["model_channels"]
    freqs = torch.tensor([10000.0 ** (-i / (mc // 2)) for i in range(mc // 2)], dtype=torch.float64)
    arg = c_noise[:, None] * freqs                                                               # [B, mc/2]
    emb = torch.cat([arg.cos(), arg.sin()], dim=1).float()                                       # cos first
    emb = F.linear(F.silu(F.linear(emb, W["map_layer0.weight"], W["map_layer0.bias"])), W["map_layer1.weight"], W["map_layer1.bias"])
    emb = F.silu(emb + labels @ W["map_label.weight"].T)                                         # label added before the SiLU
    h = F.conv2d((c_in[:, None, None, None] * x.double()).float(), W[f"enc.{cfg['img_resolution']}x{cfg['img_resolution']}_conv.weight"],
                 W[f"enc.{cfg['img_resolution']}x{cfg['img_resolution']}_conv.bias"], padding=1)
    skips = [h]
    enc, dec = block_table(**cfg)
    for name, ci, co, attn, resample in enc:
        h = ref_block(h, emb, W, f"enc.{name}.", resample)
        skips.append(h)
    bottleneck = h
    for name, ci, co, attn, resample in dec:
        if "_block" in name:                                                                      # only _block{i} take a skip
            h = torch.cat([h, skips.pop()], dim=1)
        h = ref_block(h, emb, W, f"dec.{name}.", resample)
    Fx = F.conv2d(F.silu(ref_group_norm(h, W, "out_norm")), W["out_conv.weight"], W["out_conv.bias"], padding=1)
    D = c_skip[:, None, None, None] * x.double() + c_out[:, None, None, None] * Fx.double()
    return D, bottleneck


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("sigma", [0.002, 0.3, 2.5, 80.0])
def test_tiny_forward_matches_functional_reference(sigma):
    net = tiny_net(seed=1)
    W = {k[len("model."):]: v for k, v in net.state_dict().items()}
    g = torch.Generator().manual_seed(2)
    x = torch.randn([3, 3, R, R], generator=g) * math.sqrt(sigma ** 2 + 0.25)
    y = one_hot([1, 7, 3], 10)
    with torch.no_grad():
        D, h = net(x, sigma, y, return_bottleneck=True)
        D_plain = net(x, torch.full([3], sigma), y)                                              # sigma as a [B] tensor
        h_only = net(x, sigma, y, bottleneck_only=True)                                          # encoder only (GAN head)
        D_ref, h_ref = ref_denoiser(W, TINY, x, [sigma] * 3, y)
    assert D.dtype == torch.float32 and D.shape == x.shape and h.shape == (3, 128, 2, 2)
    assert rel_err(D, D_plain) < 1e-5                                                            # scalar sigma = per-sample sigma
    assert rel_err(h, h_ref) < 1e-4 and torch.equal(h_only, h)
    skip = x.double() * 0.25 / (sigma ** 2 + 0.25)                                               # c_skip x; compare the rest
    assert rel_err(D.double() - skip, D_ref - skip) < 1e-3


def test_per_sample_sigmas_and_missing_labels():
    net = tiny_net(seed=3)
    W = {k[len("model."):]: v for k, v in net.state_dict().items()}
    sigmas = torch.tensor([0.05, 1.0, 20.0])
    x = torch.randn([3, 3, R, R]) * (sigmas ** 2 + 0.25).sqrt()[:, None, None, None]
    with torch.no_grad():
        D = net(x, sigmas, None)                                                                  # None = all-zero label row
        D_ref, _ = ref_denoiser(W, TINY, x, sigmas, torch.zeros([3, 10]))
        D_zero = net(x, sigmas, torch.zeros([3, 10]))
        D_cls = net(x, sigmas, one_hot([4, 4, 4], 10))
    skip = x.double() * 0.25 / (sigmas.double() ** 2 + 0.25)[:, None, None, None]
    assert rel_err(D - skip, D_ref - skip) < 1e-4
    assert torch.equal(D, D_zero)
    assert rel_err(D_cls, D) > 1e-3                                                              # the class does matter


def test_positional_embedding_is_cos_then_sin():
    emb = unet.PositionalEmbedding(192)(torch.tensor([0.0, -1.3, 0.7]))
    assert emb.shape == (3, 192) and emb.dtype == torch.float32
    assert torch.equal(emb[0], torch.cat([torch.ones(96), torch.zeros(96)]))
    expect = [[math.cos(c * 10000 ** (-i / 96)) for i in range(96)] + [math.sin(c * 10000 ** (-i / 96)) for i in range(96)]
              for c in (0.0, -1.3, 0.7)]
    assert torch.allclose(emb.double(), torch.tensor(expect, dtype=torch.float64), atol=2e-6)


def test_resampling_is_nearest_up_and_average_down():
    x = torch.randn(2, 5, 6, 6)
    up, down = unet.Conv2d(5, 5, 0, up=True), unet.Conv2d(5, 5, 0, down=True)
    assert up.weight is None and dict(up.named_buffers())["resample_filter"].eq(0.25).all()
    assert torch.equal(up(x), F.interpolate(x, scale_factor=2, mode="nearest"))
    assert torch.allclose(down(x), F.avg_pool2d(x, 2), atol=1e-6)
    conv = unet.Conv2d(5, 4, 3, down=True)                                                      # resampling happens first
    assert torch.allclose(conv(x), F.conv2d(F.avg_pool2d(x, 2), conv.weight, conv.bias, padding=1), atol=1e-5)


def test_attention_block_matches_sdpa_with_interleaved_qkv():
    torch.manual_seed(0)
    blk = randomize_(unet.UNetBlock(128, 192, emb_channels=32, attention=True))               # 3 heads of 64
    W = {f"b.{k}": v.clone() for k, v in blk.state_dict().items()}
    x, emb = torch.randn(2, 128, 5, 5), torch.randn(2, 32)
    with torch.no_grad():
        assert rel_err(blk(x, emb), ref_block(x, emb, W, "b.", None)) < 1e-5
        # The q/k/v order matters: swapping q and k inside each head changes the result.
        w = blk.qkv.weight.reshape(3, 64, 3, 192)
        blk.qkv.weight.copy_(w[:, :, [1, 0, 2]].reshape(576, 192, 1, 1))
        assert rel_err(blk(x, emb), ref_block(x, emb, W, "b.", None)) > 1e-3


def test_training_mode_dropout_and_label_dropout():
    net = tiny_net(seed=4, dropout=0.5, label_dropout=1.0)
    x, y = torch.randn(2, 3, R, R), one_hot([1, 2], 10)
    blocks = [m for m in net.modules() if isinstance(m, unet.UNetBlock)]
    with torch.no_grad():
        assert torch.equal(net(x, 1.0, y), net(x, 1.0, y))                                       # eval: no dropout at all
        net.train()
        assert not torch.equal(net(x, 1.0, y), net(x, 1.0, y))                                   # training: dropout is active
        for m in blocks:
            m.dropout = 0.0
        assert torch.equal(net(x, 1.0, y), net(x, 1.0, torch.zeros(2, 10)))                      # label_dropout=1 drops every label
        net.eval()
        assert not torch.equal(net(x, 1.0, y), net(x, 1.0, torch.zeros(2, 10)))


def test_augment_labels():
    net = tiny_net(seed=5, augment_dim=9)
    assert tuple(net.state_dict()["model.map_augment.weight"].shape) == (64, 9)
    x, a, sigma = torch.randn(2, 3, R, R), torch.randn(2, 9), torch.ones(2)
    with torch.no_grad():
        assert not torch.equal(net(x, sigma, None, augment_labels=a), net(x, sigma, None))
        net.model.map_augment.weight.zero_()                                                      # EDM's init: no effect
        assert torch.equal(net(x, sigma, None, augment_labels=a), net(x, sigma, None))


def test_bf16_autocast_on_cpu():
    net = tiny_net(seed=6)
    x, y = torch.randn(2, 3, R, R) * 1.5, one_hot([0, 9], 10)
    dtypes = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: dtypes.update({n: o.dtype}))
             for n, m in net.named_modules() if isinstance(m, (unet.Conv2d, unet.Linear32))]
    with torch.no_grad():
        D32, h32 = net(x, 1.5, y, return_bottleneck=True)
        dtypes.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            D16, h16 = net(x, 1.5, y, return_bottleneck=True)
    for h in hooks:
        h.remove()
    assert D16.dtype == torch.float32 and h16.dtype == torch.bfloat16
    assert dtypes["model.enc.4x4_block0.conv0"] == torch.bfloat16                               # image path in bf16
    assert dtypes["model.map_layer1"] == torch.float32 and dtypes["model.enc.4x4_block0.affine"] == torch.float32
    skip = x * 0.25 / (1.5 ** 2 + 0.25)
    assert 1e-5 < rel_err(D16 - skip, D32 - skip) < 5e-2                                         # close, but really bf16
    # The attention weights are computed in float32 under autocast (which would otherwise run that einsum in bf16).
    q, k, v = (3 * torch.randn(4, 64, 50).bfloat16() for _ in range(3))
    w32 = torch.einsum("ncq,nck->nqk", q.float(), k.float() / 8).softmax(dim=2)                 # [4, 50, 50], outside autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = unet.attention_fp32(q, k, v)
        a_ref = torch.einsum("nqk,nck->ncq", w32.bfloat16(), v)
        w_naive = torch.einsum("ncq,nck->nqk", q.float(), k.float() / 8).softmax(dim=2)         # autocast: bf16 logits
    assert a.dtype == torch.bfloat16 and torch.equal(a, a_ref)
    assert not torch.equal(w_naive.bfloat16(), w32.bfloat16())                                   # so the guard is needed


# ------------------------------------------------------------------------------------------------------------------------
# Pickles in EDM's format, written through a stand-in for torch_utils.persistence that exists only while writing.

EDM_CLASS_NAMES = {unet.EDMPrecond: "EDMPrecond", unet.DhariwalUNet: "DhariwalUNet", unet.UNetBlock: "UNetBlock",
                   unet.Conv2d: "Conv2d", unet.Linear32: "Linear", torch.nn.GroupNorm: "GroupNorm",
                   unet.PositionalEmbedding: "PositionalEmbedding"}


class EDMLoss:                                                                                   # the 'loss_fn' entry of a snapshot
    def __init__(self):
        self.P_mean, self.P_std, self.sigma_data = -1.2, 1.2, 0.5


@contextlib.contextmanager
def fake_persistence(reconstruct=None):
    """Registers modules named like EDM's torch_utils.persistence only for the duration of the block."""
    assert "torch_utils" not in sys.modules
    pkg, mod = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):
        return reconstruct(meta) if reconstruct else None
    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    mod._reconstruct_persistent_obj, pkg.persistence = _reconstruct_persistent_obj, mod
    sys.modules.update({"torch_utils": pkg, "torch_utils.persistence": mod})
    try:
        yield mod
    finally:
        del sys.modules["torch_utils"], sys.modules["torch_utils.persistence"]


class EDMStylePickler(pickle.Pickler):
    """Pickles our modules the way persistence.persistent_class.__reduce__ pickles EDM's: (_reconstruct_persistent_obj,
    (meta,), None) with meta = dict(type='class', version=6, module_src, class_name, state=object.__reduce__()[2]), the
    state carrying _init_args/_init_kwargs. ModuleDict, tensors and everything else pickle normally."""

    def __init__(self, f, persistence, module_src, root_kwargs):
        super().__init__(f, protocol=4)                                                          # pickle.dump's default in EDM's Python
        self.persistence, self.module_src, self.root_kwargs = persistence, module_src, root_kwargs

    def reducer_override(self, obj):
        name = EDM_CLASS_NAMES.get(type(obj), "EDMLoss" if isinstance(obj, EDMLoss) else None)
        if name is None:
            return NotImplemented
        state = dict(object.__reduce__(obj)[2])
        state["_init_args"] = ()
        state["_init_kwargs"] = self.root_kwargs if name == "EDMPrecond" else dict(init_weight=np.sqrt(1 / 3), init_mode="kaiming_uniform")
        meta = dict(type="class", version=6, module_src=self.module_src, class_name=name, state=state)
        return self.persistence._reconstruct_persistent_obj, (meta,), None


def marker_src(marker):
    """Stands in for the source text EDM embeds: if anything executed it, `marker` would appear."""
    return f"open({str(marker)!r}, 'w').write('module_src was executed')\n"


def edm_kwargs(net, **extra):
    """What EDM records as EDMPrecond's _init_kwargs: train.py's network_kwargs + dataset interface kwargs."""
    kw = {k: v for k, v in net.init_kwargs.items() if k != "sigma_data"}
    return {**kw, "model_type": "DhariwalUNet", "use_fp16": True, **extra}


def write_edm_pickle(path, net, marker, root_kwargs=None, **data):
    """A snapshot like EDM's training_loop.py writes: ema (eval, requires_grad False), loss_fn, augment_pipe, dataset_kwargs."""
    with fake_persistence() as persistence, open(path, "wb") as f:
        snapshot = dict(ema=net.eval().requires_grad_(False), loss_fn=EDMLoss(), augment_pipe=None,
                        dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset", path="x.zip", use_labels=True))
        snapshot.update(data)
        EDMStylePickler(f, persistence, marker_src(marker), root_kwargs or edm_kwargs(net)).dump(snapshot)


def pickle_globals(path):
    """(module, name) of every global the file asks for, recorded while reading it with the restricted unpickler."""
    seen = set()

    class Recorder(unet._RestrictedUnpickler):
        def find_class(self, module, name):
            seen.add((module, name))
            return super().find_class(module, name)
    with open(path, "rb") as f, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
        Recorder(f, path).load()
    return seen


def test_edm_pickle_loads_into_equal_network(tmp_path):
    src = tiny_net(seed=7, dropout=0.1)
    path, marker = tmp_path / "network-snapshot.pkl", tmp_path / "marker"
    write_edm_pickle(path, src, marker)
    found = pickle_globals(path)                                                                  # the structure EDM's files have
    assert {("torch_utils.persistence", "_reconstruct_persistent_obj"), ("torch.storage", "_load_from_bytes"),
            ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"), ("collections", "OrderedDict"),
            ("torch.nn.modules.container", "ModuleDict"), ("numpy", "dtype")} <= found
    assert ("numpy._core.multiarray", "scalar") in found or ("numpy.core.multiarray", "scalar") in found

    net = unet.load_edm_pickle(path)
    assert "torch_utils" not in sys.modules and not marker.exists()                              # nothing from the file ran
    assert isinstance(net, unet.EDMPrecond) and not net.training
    assert not any(p.requires_grad for p in net.parameters())
    assert net.init_kwargs == {**src.init_kwargs}                                                 # read from the file
    src_sd, sd = src.state_dict(), net.state_dict()
    assert list(sd) == list(src_sd) and all(torch.equal(sd[k], src_sd[k]) for k in sd)
    x, y = torch.randn(2, 3, R, R), one_hot([2, 5], 10)
    with torch.no_grad():
        assert torch.equal(net(x, 0.7, y), src(x, 0.7, y))
    assert all(m.dropout == 0.1 for m in net.modules() if isinstance(m, unet.UNetBlock))
    net0 = unet.load_edm_pickle(path, dropout=0.0)
    assert all(m.dropout == 0.0 for m in net0.modules() if isinstance(m, unet.UNetBlock))


def test_plain_pickle_load_of_such_a_file_would_run_its_source(tmp_path):
    """Control for the test above: EDM's own loader (which execs module_src) does create the marker."""
    path, marker = tmp_path / "snap.pkl", tmp_path / "marker"
    write_edm_pickle(path, tiny_net(seed=8), marker)
    with fake_persistence(lambda meta: exec(meta["module_src"], {})):
        with open(path, "rb") as f:
            pickle.load(f)
    assert marker.exists()


def test_full_size_pickle_loads_and_runs_on_meta(tmp_path):
    """The real ImageNet-64 structure through load_edm_pickle. Each tensor is a stride-0 view of one number (the key's
    index), so the pickle is small; the forward pass at batch 1 then runs on the meta device (shapes only)."""
    with torch.device("meta"):
        src = unet.EDMPrecond(**unet.EDM_IMAGENET64)
    index = {}
    for mname, m in src.named_modules():
        for group in (m._parameters, m._buffers):
            for k, t in group.items():
                if t is not None:
                    key = f"{mname}.{k}"
                    index[key] = float(len(index)) if k != "resample_filter" else 0.25
                    group[k] = torch.full([1], index[key]).expand(t.shape)
    path, marker = tmp_path / "edm-imagenet-64x64-cond-adm.pkl", tmp_path / "marker"
    root_kwargs = dict(img_resolution=64, img_channels=3, label_dim=1000, model_type="DhariwalUNet", model_channels=192,
                       channel_mult=[1, 2, 3, 4], dropout=0.10, use_fp16=True)                   # as EDM's train.py records them
    write_edm_pickle(path, src, marker, root_kwargs=root_kwargs)
    net = unet.load_edm_pickle(path)
    assert not marker.exists()
    assert net.init_kwargs == {"img_resolution": 64, "img_channels": 3, "label_dim": 1000,
                                                          "sigma_data": 0.5, "model_channels": 192, "channel_mult": [1, 2, 3, 4],
                                                          "dropout": 0.10}
    sd = net.state_dict()
    assert len(sd) == 553 and sum(p.numel() for p in net.parameters()) == 295_899_267
    for k, t in sd.items():
        assert t.device.type == "cpu" and t[(0,) * t.dim()].item() == index[k], k
    net.to("meta")
    x, y = torch.randn(1, 3, 64, 64, device="meta"), torch.zeros(1, 1000, device="meta")
    D, h = net(x, torch.ones(1, device="meta"), y, return_bottleneck=True)
    assert D.shape == (1, 3, 64, 64) and D.dtype == torch.float32 and h.shape == (1, 768, 8, 8)


class Evil:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return self.fn, (self.arg,)


def nested_storage_gadget(marker):
    """A second pickle hidden in torch.storage._load_from_bytes' bytes (stock torch loads it with weights_only=False)."""
    class Gadget:
        def __reduce__(self):
            return torch.storage._load_from_bytes, (pickle.dumps(Evil(os.system, f"touch {marker}"), protocol=2),)
    return Gadget()


@pytest.mark.parametrize("kind", ["os.system", "builtins.exec", "nested storage bytes"])
def test_harmful_pickles_are_refused_and_nothing_runs(tmp_path, kind):
    marker = tmp_path / "marker"
    payload = {"os.system": lambda: Evil(os.system, f"touch {marker}"),
               "builtins.exec": lambda: Evil(exec, f"open({str(marker)!r}, 'w').close()"),
               "nested storage bytes": lambda: nested_storage_gadget(marker)}[kind]
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"ema": payload()}, protocol=4))
    with pytest.raises((pickle.UnpicklingError, ValueError)) as err:
        unet.load_edm_pickle(path)
    assert str(path) in str(err.value) and not marker.exists()
    if kind != "nested storage bytes":
        assert isinstance(err.value, unet.ForbiddenGlobal) and kind.split(".")[1] in str(err.value)   # names the global
    with contextlib.suppress(Exception):
        pickle.loads(path.read_bytes())                                                          # control: a plain load runs it
    assert marker.exists()


def test_loader_errors_name_the_file_and_the_problem(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ValueError, match="not a readable network pickle") as err:
        unet.load_edm_pickle(text)
    assert str(text) in str(err.value)

    zipped = tmp_path / "ckpt.pt"
    torch.save({"w": torch.ones(2)}, zipped)
    with pytest.raises(ValueError, match="load_checkpoint"):
        unet.load_edm_pickle(zipped)

    no_ema = tmp_path / "plain.pkl"
    no_ema.write_bytes(pickle.dumps({"net": [1, 2]}))
    with pytest.raises(ValueError, match="not an EDM network pickle") as err:
        unet.load_edm_pickle(no_ema)
    assert str(no_ema) in str(err.value)

    src = tiny_net(seed=9)
    song = tmp_path / "song.pkl"
    write_edm_pickle(song, src, tmp_path / "m", root_kwargs=edm_kwargs(src, model_type="SongUNet"))
    with pytest.raises(ValueError, match="SongUNet"):
        unet.load_edm_pickle(song)

    # Missing, unexpected and mis-shaped tensors are all listed.
    src.model.map_layer1.bias = None                                                              # missing
    src.model.register_buffer("bogus", torch.zeros(3))                                            # unexpected
    src.model.out_conv.bias = torch.nn.Parameter(torch.zeros(5))                                   # wrong shape
    bad = tmp_path / "bad.pkl"
    write_edm_pickle(bad, src, tmp_path / "m")
    with pytest.raises(ValueError) as err:
        unet.load_edm_pickle(bad)
    msg = str(err.value)
    assert str(bad) in msg and "model.map_layer1.bias" in msg and "model.bogus" in msg
    assert "model.out_conv.bias: file (5,), network (3,)" in msg
    assert not (tmp_path / "m").exists()


def test_tensor_records_must_fit_their_storage(tmp_path):
    class Overlong:                                                                              # claims 100 elements of a 4-element storage
        def __reduce__(self):
            return torch._utils._rebuild_tensor_v2, (torch.zeros(4)._typed_storage(), 0, (100,), (1,), False,
                                                     collections.OrderedDict())
    path = tmp_path / "overlong.pkl"
    path.write_bytes(pickle.dumps({"ema": Overlong()}, protocol=4))
    with pytest.raises(ValueError, match="reaches past the end of its storage") as err:
        unet.load_edm_pickle(path)
    assert str(path) in str(err.value)


@pytest.mark.skipif(not os.environ.get("MINDMD2_SLOW"), reason="full-size CPU round trip (~1 min, 2.5 GB); set MINDMD2_SLOW=1")
def test_full_size_real_weights_round_trip(tmp_path):
    """The real thing at full size: 1.2 GB of random weights through an EDM-format pickle, then one forward pass at batch 1."""
    with torch.device("meta"):
        src = unet.EDMPrecond(**unet.EDM_IMAGENET64)
    src.to_empty(device="cpu").eval()
    with torch.no_grad():
        for p in src.parameters():
            p.normal_(0, 0.02)
        for b in src.buffers():
            b.fill_(0.25)
    path, marker = tmp_path / "edm-imagenet-64x64-cond-adm.pkl", tmp_path / "marker"
    write_edm_pickle(path, src, marker)
    net = unet.load_edm_pickle(path)
    sd, src_sd = net.state_dict(), src.state_dict()
    assert list(sd) == list(src_sd) and all(torch.equal(sd[k], src_sd[k]) for k in sd) and not marker.exists()
    x, y = torch.randn(1, 3, 64, 64), one_hot([207], 1000)
    with torch.no_grad():
        D, h = net(x, 2.0, y, return_bottleneck=True)
        assert torch.equal(D, src(x, 2.0, y)) and h.shape == (1, 768, 8, 8)


# ------------------------------------------------------------------------------------------------------------------------
# Plain checkpoints.

def test_checkpoint_roundtrip_and_atomic_write(tmp_path):
    src = tiny_net(seed=10)
    path = tmp_path / "sub" / "gen.pt"
    unet.save_checkpoint({"init_kwargs": src.init_kwargs, "state_dict": src.state_dict(), "step": 3}, path)
    ck = unet.load_checkpoint(path)
    net = unet.EDMPrecond(**ck["init_kwargs"]).eval()
    net.load_state_dict(ck["state_dict"])
    x = torch.randn(2, 3, R, R)
    with torch.no_grad():
        assert torch.equal(net(x, 3.0, None), src(x, 3.0, None)) and ck["step"] == 3
    before = path.read_bytes()
    with pytest.raises(Exception):
        unet.save_checkpoint({"bad": lambda: 0}, path)                                           # fails while writing
    assert path.read_bytes() == before                                                           # old file intact
    assert os.listdir(path.parent) == ["gen.pt"]                                                  # no temp file left


def test_load_checkpoint_refuses_code_and_names_the_file(tmp_path):
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pt"
    torch.save({"x": Evil(os.system, f"touch {marker}")}, evil)
    with pytest.raises(ValueError) as err:
        unet.load_checkpoint(evil)
    assert str(evil) in str(err.value) and not marker.exists()
    # one line naming what the file asked for, without torch's advice to load it with weights_only=False
    assert "\n" not in str(err.value) and "system" in str(err.value) and "weights_only" not in str(err.value)
    from fid import load_inception
    with pytest.raises(pickle.UnpicklingError) as err:
        load_inception(str(evil))
    assert str(err.value).startswith(f"{evil}: refused:") and "\n" not in str(err.value) and not marker.exists()
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        unet.load_checkpoint(tmp_path / "missing.pt")


# ------------------------------------------------------------------------------------------------------------------------
# Sampler.

def test_karras_sigmas_closed_form():
    s = unet.karras_sigmas(18)
    assert s.dtype == torch.float64 and s.shape == (18,)
    assert s[0].item() == pytest.approx(80.0, rel=1e-12) and s[-1].item() == pytest.approx(0.002, rel=1e-12)
    assert (s[1:] < s[:-1]).all()
    i = 7
    expect = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert s[i].item() == pytest.approx(expect, rel=1e-12)
    assert unet.karras_sigmas(1).tolist() == pytest.approx([80.0])


class GaussianDenoiser:
    """Exact D(x; sigma) for data ~ N(0, s^2 I): x s^2 / (s^2 + sigma^2). Records the sigmas it is called with."""

    def __init__(self, s=0.5):
        self.s, self.sigmas = s, []

    def __call__(self, x, sigma, class_labels=None):
        self.sigmas.append(float(sigma))
        return x * self.s ** 2 / (self.s ** 2 + sigma ** 2)


def test_deterministic_sampler_solves_the_probability_flow_ode():
    """For Gaussian data the ODE dx/dsigma = (x - D)/sigma has x(sigma) proportional to sqrt(s^2 + sigma^2)."""
    z = torch.randn(4, 1, 3, 3, dtype=torch.float64)
    exact = z * 80 * 0.5 / math.sqrt(0.25 + 80 ** 2)
    den = GaussianDenoiser()
    x18 = unet.edm_sampler(den, z, num_steps=18)
    t = unet.karras_sigmas(18).tolist()
    assert x18.dtype == torch.float64 and len(den.sigmas) == 2 * 18 - 1                           # NFE = 2N - 1
    assert den.sigmas == pytest.approx([t[0]] + [s for s in t[1:] for _ in range(2)])             # Euler at t_i, Heun at t_i+1
    err64, err128 = (rel_err(unet.edm_sampler(GaussianDenoiser(), z, num_steps=n), exact) for n in (64, 128))
    assert err128 < 1e-3 and 3.5 < err64 / err128 < 4.5                                          # 2nd order: error ~ N^-2


def test_stochastic_sampler_churn():
    z = torch.randn(20000, 1, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    kw = dict(num_steps=128, S_churn=40, S_min=0.05, S_max=50, S_noise=1.0)
    x1 = unet.edm_sampler(GaussianDenoiser(), z, generator=torch.Generator().manual_seed(1), **kw)
    x2 = unet.edm_sampler(GaussianDenoiser(), z, generator=torch.Generator().manual_seed(1), **kw)
    x_ode = unet.edm_sampler(GaussianDenoiser(), z, num_steps=128)
    assert torch.equal(x1, x2)                                                                    # reproducible
    assert x1.std().item() == pytest.approx(0.5, rel=0.03)                                       # churn keeps the marginal N(0, s^2)
    assert np.corrcoef(x1.flatten(), x_ode.flatten())[0, 1] < 0.99                               # but fresh noise was added
    # gamma = min(S_churn / N, sqrt(2) - 1), applied only where S_min <= t_i <= S_max.
    den = GaussianDenoiser()
    unet.edm_sampler(den, z[:4], num_steps=4, S_churn=1000, S_min=1.0, S_max=100)
    t = unet.karras_sigmas(4).tolist()
    assert den.sigmas[0] == pytest.approx(t[0] * math.sqrt(2)) and den.sigmas[2] == pytest.approx(t[1] * math.sqrt(2))
    assert den.sigmas[-1] == pytest.approx(t[3])                                                  # t_3 = 0.002 < S_min: no churn
    outside = unet.edm_sampler(GaussianDenoiser(), z[:4], num_steps=8, S_churn=40, S_min=100, S_max=200)
    assert torch.equal(outside, unet.edm_sampler(GaussianDenoiser(), z[:4], num_steps=8))


def test_sampler_with_network_and_command_line(tmp_path):
    src = tiny_net(seed=11)
    with torch.no_grad():
        src.model.out_conv.weight.mul_(0.01)
    pkl, marker = tmp_path / "snap.pkl", tmp_path / "marker"
    write_edm_pickle(pkl, src, marker)
    out, grid = tmp_path / "net.pt", tmp_path / "grid.png"
    unet.main([str(pkl), "--out", str(out), "--grid", str(grid), "--num", "3", "--steps", "3", "--device", "cpu"])
    ck = unet.load_checkpoint(out)
    net = unet.EDMPrecond(**ck["init_kwargs"])
    net.load_state_dict(ck["state_dict"])
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in net.state_dict().items())
    from PIL import Image
    img = Image.open(grid)
    assert img.size == (2 * R, 2 * R) and img.mode == "RGB"
    x = unet.edm_sampler(src, torch.randn(2, 3, R, R), one_hot([1, 2], 10), num_steps=3)
    assert x.shape == (2, 3, R, R) and torch.isfinite(x).all() and not marker.exists()


def test_command_line_errors_are_one_line_and_come_before_the_work(tmp_path, capsys, monkeypatch):
    """A hostile or missing file, an impossible option or a grid path that could not be written: one line naming it,
    exit status 1, and the options are checked before the pickle is read (sampling a full-size grid takes minutes)."""
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"x": Evil(os.system, f"touch {tmp_path / 'ran'}")}))
    for argv, words in (([str(evil)], "refusing to load the global"),
                        ([str(tmp_path / "none.pkl")], "none.pkl"),
                        ([str(evil), "--steps", "0"], "need --steps >= 1"),
                        ([str(evil), "--num", "-2"], "--num >= 1"),
                        ([str(evil), "--device", "foo"], "--device 'foo' is not a torch device"),
                        ([str(evil), "--grid", str(tmp_path / "g.txt")], "give an image file name"),
                        ([str(evil), "--grid", str(tmp_path / "g.png"), "--out", str(tmp_path / "g.png")],
                         "--grid and --out are the same file"),
                        ([str(evil), "--out", str(tmp_path)], "is a folder; give the path of the file to write"),
                        ([str(evil), "--out", str(evil)], "is the pickle being read"),
                        ([str(evil), "--out", str(tmp_path / "new") + "/"], "ends with a slash"),
                        ([str(evil), "--out", str(tmp_path / "evil.pkl" / "x.pt")], "cannot make its folder"),
                        ([str(tmp_path / "none.pkl"), "--grid", str(tmp_path / "g1" / "a" / "grid.png")], "none.pkl")):
        with pytest.raises(SystemExit) as exit_:
            unet.main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 1 and err.startswith("unet.py: error:") and words in err and err.count("\n") == 1, err
    assert not (tmp_path / "ran").exists() and not (tmp_path / "g1").exists()        # no folder made for a failed run


def stride0_net(**kwargs):
    """An EDMPrecond built on meta whose every tensor is a stride-0 view of one number: a file of a few KB that declares
    a network of any size (its weights do not need to exist)."""
    with torch.device("meta"):
        net = unet.EDMPrecond(**kwargs)
    for m in net.modules():
        for group in (m._parameters, m._buffers):
            for k, t in group.items():
                if t is not None:
                    group[k] = torch.full([1], 0.25).expand(t.shape)
    return net


@pytest.mark.parametrize("change, words", [
    (dict(label_dim=131_073), "label_dim 131073: at most 131,072 classes"),
    (dict(model_channels=16384), "47,246,753,795 weights: at most 2,147,483,648"),
    (dict(img_resolution=4096), "img_resolution 4096: at most 1024")], ids=["classes", "weights", "resolution"])
def test_edm_networks_too_large_to_use_are_refused_before_anything_is_allocated(tmp_path, change, words):
    """A stride-0 pickle of a few KB loaded in a moment, and training or sampling then asked for terabytes (a real copy
    and AdamW's moments, the one-hot labels [B, label_dim], the images). (imagenet64.py's own checkpoints must hold
    dense tensors, so their size bounds their weights; their resolution goes through the same check.)"""
    kw = {**dict(img_resolution=8, img_channels=3, label_dim=3, model_channels=16, channel_mult=[1], num_blocks=1,
                 attn_resolutions=[]), **change}
    net = stride0_net(**kw)
    write_edm_pickle(tmp_path / "big.pkl", net, tmp_path / "marker",
                     root_kwargs=dict(kw, model_type="DhariwalUNet", use_fp16=False))
    with pytest.raises(ValueError, match=f"big.pkl: the pickle's EDMPrecond is too large to use: {words}"):
        unet.load_edm_pickle(tmp_path / "big.pkl")
