"""SDXL UNet with Stability's sgm parameter names (to be merged into unet.py as its SDXL section).

Attribute names reproduce the keys of `sd_xl_base_1.0.safetensors` under `model.diffusion_model.`
(`time_embed.0`, `label_emb.0.0`, `input_blocks.N.M...`, `middle_block.*`, `output_blocks.*`, `out.0`, `out.2`),
so that subtree loads with strict=True and no renaming table. DMD2's released UNets are diffusers-named
state dicts (`dmd2_sdxl_4step_unet_fp16.bin`); `diffusers_to_sgm_unet` renames them by a short rule.

    model = SDXLUNet(SDXLUNetConfig())                           # full SDXL base: 2,567,463,684 parameters
    sd = torch.load("dmd2_sdxl_4step_unet_fp16.bin", map_location="cpu", weights_only=True)
    load_sdxl_unet_state(model, diffusers_to_sgm_unet(sd, model.cfg), "dmd2_sdxl_4step_unet_fp16.bin")
    eps = model(x, t, context, y)                                # [B,4,h,w], [B], [B,77,2048], [B,2816] -> [B,4,h,w]

Layout and numerics: /work/shared/reference/sdxl.md §1-2, §6 (sgm `openaimodel.py`, `attention.py`, `util.py`).
"""
import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class SDXLUNetConfig:
    in_channels: int = 4                       # latent channels in
    out_channels: int = 4                      # eps channels out
    model_channels: int = 320                  # width of level 0; the time embedding is 4x wider (1280)
    channel_mult: tuple = (1, 2, 4)            # width multiplier per level; every level but the last ends in a 2x downsample
    num_res_blocks: int = 2                    # ResBlocks per level going down (one more going up)
    transformer_depth: tuple = (0, 2, 10)      # transformer blocks per SpatialTransformer at each level (0: no attention); the middle block uses the last
    num_head_channels: int = 64                # attention head width; heads = channels // num_head_channels
    context_dim: int = 2048                    # cross-attention input width: [CLIP-L 768 | bigG 1280]
    adm_in_channels: int = 2816                # width of y: pooled bigG 1280 + 6 size embeddings x 256

    def __post_init__(self):
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
    """GroupNorm whose statistics are computed in fp32 and cast back (sgm util.GroupNorm32), so fp16/bf16 weights stay accurate."""

    def forward(self, x):
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


class ResBlock(nn.Module):
    """GN-SiLU-conv, add the embedding, GN-SiLU-conv, plus a (1x1 conv) skip. No scale-shift norm in SDXL."""

    def __init__(self, cin, cout, emb_dim):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(32, cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, cout))
        self.out_layers = nn.Sequential(GroupNorm32(32, cout), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(cout, cout, 3, padding=1))
        self.skip_connection = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):                                               # x [B, cin, H, W], emb [B, 1280]
        h = self.in_layers(x)                                                # [B, cout, H, W]
        h = h + self.emb_layers(emb)[:, :, None, None]                       # timestep + size conditioning, added per channel
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
        self.proj_in = nn.Linear(dim, dim)                                   # use_linear_in_transformer=True: Linear, not 1x1 conv
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
        self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(cfg.adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)))

        self.input_blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(cfg.in_channels, C, 3, padding=1))])
        skips, ch = [C], C                                                   # widths of the features pushed for the skips
        for level, (mult, depth) in enumerate(zip(cfg.channel_mult, cfg.transformer_depth)):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, mult * C, emb_dim)] + ([st(mult * C, depth)] if depth else [])
                self.input_blocks.append(nn.Sequential(*layers))
                ch = mult * C
                skips.append(ch)
            if level < levels - 1:
                self.input_blocks.append(nn.Sequential(Downsample(ch)))
                skips.append(ch)

        self.middle_block = nn.Sequential(ResBlock(ch, ch, emb_dim), st(ch, cfg.transformer_depth[-1]), ResBlock(ch, ch, emb_dim))

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
        """Middle-block output only, without running the decoder: the features of DMD2's GAN head. [B, 1280, h/4, w/4]"""
        return self.encode(x, timesteps, context, y)[0]

    def forward(self, x, timesteps, context, y, return_mid=False):
        """x [B, 4, h, w] latents, timesteps [B] (or a scalar) DDPM t as float or int, context [B, 77, 2048],
        y [B, 2816] -> eps [B, 4, h, w]; with return_mid also the middle-block output [B, 1280, h/4, w/4]."""
        mid, hs, emb = self.encode(x, timesteps, context, y)
        h = mid
        for block in self.output_blocks:
            h = self.run_block(block, torch.cat([h, hs.pop()], dim=1), emb, context)  # current features first, skip second
        eps = self.out(h)
        return (eps, mid) if return_mid else eps


# ---- loading: diffusers -> sgm renaming (sdxl.md §6.2) and a strict, explained load ----

RESNET_RENAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                  "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
TOP_RENAMES = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
               "conv_norm_out": "out.0", "conv_out": "out.2"}
BLOCK_KEY = re.compile(r"(down_blocks|mid_block|up_blocks)\.(?:(\d+)\.)?(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)")


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


def _listing(title, items, limit=12):
    shown = "\n    ".join(items[:limit]) + (f"\n    ... and {len(items) - limit} more" if len(items) > limit else "")
    return f"  {title} ({len(items)}):\n    {shown}"


def _state_problems(state_dict, expected_shapes):
    """Lines describing missing keys, unexpected keys and shape mismatches of state_dict against {key: shape}."""
    missing = sorted(expected_shapes.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected_shapes.keys())
    wrong = [f"{k}: file {list(state_dict[k].shape)}, model {list(expected_shapes[k])}"
             for k in sorted(expected_shapes.keys() & state_dict.keys()) if tuple(state_dict[k].shape) != tuple(expected_shapes[k])]
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
        raise ValueError(f"{source_name}: does not map onto SDXLUNet({cfg}) (after renaming diffusers -> sgm):\n" + "\n".join(problems))
    return renamed


def load_sdxl_unet_state(model, state_dict, source_name, assign=False):
    """Strict load of sgm-named weights into an SDXLUNet; ValueError naming source_name and listing every problem.

    The state dict must be the `model.diffusion_model.` subtree with that prefix removed. assign=True keeps the
    file's tensors (and dtype) instead of copying them into the existing parameters (useful from the meta device)."""
    problems = _state_problems(state_dict, {k: v.shape for k, v in model.state_dict().items()})
    if problems:
        if any(k.startswith("model.diffusion_model.") for k in state_dict):
            problems.append("  hint: keys carry the 'model.diffusion_model.' prefix of the full sgm checkpoint: strip it first")
        if "conv_in.weight" in state_dict:
            problems.append("  hint: keys are diffusers names: pass the state dict through diffusers_to_sgm_unet first")
        raise ValueError(f"{source_name}: cannot load into SDXLUNet({model.cfg}):\n" + "\n".join(problems))
    model.load_state_dict(state_dict, strict=True, assign=assign)
    return model
