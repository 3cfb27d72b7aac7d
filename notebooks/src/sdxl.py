# ---
# jupyter:
#   jupytext:
#     formats: ipynb,src//py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # SDXL in plain PyTorch, and DMD2's 4-step sampler: a walk through `sdxl.py`
#
# [`sdxl.py`](../sdxl.py) reads Stability's single-file checkpoint `sd_xl_base_1.0.safetensors` without any
# library beyond PyTorch, rebuilds the two text encoders, their tokenizer, the conditioning vector and the VAE,
# and runs DMD2's 4-step generator (the UNet itself is in [`unet.py`](../unet.py)). The real weights are 7 GB and
# want a GPU; this notebook runs every piece on a CPU in seconds, on files it writes itself and on tiny random models
# built from the same code:
#
# 1. the safetensors format, byte by byte,
# 2. the CLIP tokenizer on real prompts,
# 3. the conditioning: text context, pooled embedding and the micro-conditioning vector `y`,
# 4. the DDPM schedule and DMD2's 4-step sampler, then the whole pipeline on a tiny random model,
# 5. renaming DMD2's diffusers-named UNet to Stability's (sgm) names,
# 6. one DMD2 training iteration with the script's own turn functions,
# 7. how to point all of it at the real checkpoints.
#
# Regenerate this notebook with `python notebooks/build.py sdxl`.

# %%
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "sdxl.py").exists())   # the repository root
sys.path.insert(0, str(ROOT))

import torch
from IPython import get_ipython
from IPython.display import Markdown, display
from PIL import Image, ImageDraw

import sdxl
import unet

FAST = os.environ.get("MINDMD2_NB_FAST") == "1"   # CI's smoke run; this notebook is small either way
if FAST:
    print("MINDMD2_NB_FAST=1: as in CI (this notebook has nothing to shorten)")
torch.set_num_threads(1)                            # steady timings on a shared CPU
torch.manual_seed(0)
device = torch.device("cpu")
workdir = tempfile.TemporaryDirectory(prefix="sdxl_notebook_")   # removed when the kernel exits
work = Path(workdir.name)                                          # every file this notebook writes goes here


def png_256(img):
    """Figures are stored in the notebook as 256-colour PNGs, which keeps the .ipynb small."""
    buf = io.BytesIO()
    img.convert("RGB").quantize(256).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


formatters = get_ipython().display_formatter.formatters
formatters["image/png"].for_type(Image.Image, png_256)
formatters["image/jpeg"].for_type(Image.Image, lambda img: None)   # and not a second time as JPEG


def to_image(x, scale=1):
    """[3, H, W] in about [-1, 1] -> PIL image, optionally enlarged by an integer factor (nearest neighbour)."""
    img = Image.fromarray(((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img


def grid(rows, labels=(), gap=4, label_width=0):
    """rows of PIL images -> one image; labels (one per row) are written in a left margin."""
    w, h = rows[0][0].size
    fig = Image.new("RGB", (label_width + len(rows[0]) * (w + gap), len(rows) * (h + gap)), "white")
    draw = ImageDraw.Draw(fig)
    for r, images in enumerate(rows):
        if r < len(labels):
            draw.text((4, r * (h + gap) + h // 2 - 6), labels[r], fill=(0, 0, 0))
        for c, img in enumerate(images):
            fig.paste(img, (label_width + c * (w + gap), r * (h + gap)))
    return fig


# %% [markdown]
# ## 1. The safetensors format
#
# A `.safetensors` file is three things in a row: 8 bytes holding the header length N (little-endian), N bytes of
# JSON that give every tensor's dtype, shape and byte range, then the raw little-endian tensor data. Nothing in
# it is executable, unlike a pickle, and a reader can memory-map the data and touch only the tensors it needs.
# `sdxl.write_safetensors` writes one (atomically: temp file, then `os.replace`); here is a small file, byte by byte:

# %%
tensors = {"text.weight": torch.randn(4, 3), "vae.scale": torch.tensor([0.13025], dtype=torch.float16),
           "ids": torch.arange(6)}
path = work / "small.safetensors"
sdxl.write_safetensors(path, tensors, metadata={"format": "pt", "note": "written by the notebook"})
raw = path.read_bytes()
n = int.from_bytes(raw[:8], "little")
print(f"{len(raw)} bytes in total; the first 8 bytes {raw[:8].hex(' ')} = header length {n}")
print(json.dumps(json.loads(raw[8:8 + n]), indent=1))


# %%
def layout_figure(path, width=900, min_width=120):
    """The byte layout of a safetensors file: length field, JSON header, then each tensor's byte range.
    Widths are proportional to bytes, but at least min_width pixels so that every label fits."""
    entries, metadata, data_start = sdxl.read_safetensors_header(path)
    parts = [("length", 0, 8), ("JSON header", 8, data_start)]
    by_offset = sorted(entries.items(), key=lambda kv: kv[1][2])
    parts += [(name, data_start + b, data_start + e) for name, (_, _, b, e) in by_offset]
    spare = width - 20 - min_width * len(parts)
    widths = [min_width + spare * (e - b) / parts[-1][2] for _, b, e in parts]
    img = Image.new("RGB", (width, 70), "white")
    draw = ImageDraw.Draw(img)
    colors = [(200, 200, 200), (250, 220, 150), (150, 200, 250), (170, 230, 170), (240, 170, 170), (200, 170, 240)]
    x = 10
    for i, ((name, b, e), w) in enumerate(zip(parts, widths)):
        draw.rectangle((x, 10, x + w, 60), fill=colors[i % len(colors)], outline=(0, 0, 0))
        draw.text((x + 4, 18), name, fill=(0, 0, 0))
        draw.text((x + 4, 38), f"bytes {b}..{e - 1}", fill=(0, 0, 0))
        x += w
    return img


layout_figure(path)

# %% [markdown]
# The data section starts at a multiple of 8 (the writer pads the JSON with spaces), and the widest dtypes come
# first, so every tensor is aligned and can be a view into the memory-mapped file. `sdxl.read_safetensors` checks
# everything before it trusts the file: the header length, the JSON, dtypes, shapes, that each byte range has
# exactly the tensor's size and that the ranges tile the data section with no gap or overlap. A broken file is
# refused with a message naming the file and the problem:

# %%
back = sdxl.read_safetensors(path)
print({k: (str(v.dtype), tuple(v.shape), torch.equal(v, tensors[k])) for k, v in back.items()})


def try_read(name, data):
    bad = work / name
    bad.write_bytes(data)
    try:
        sdxl.read_safetensors(bad)
    except ValueError as e:
        print(f"{name}: refused: {str(e).replace(str(work) + os.sep, '')}")


try_read("truncated.safetensors", raw[:-5])
try_read("huge_header.safetensors", (10**12).to_bytes(8, "little") + raw[8:])
header = json.loads(raw[8:8 + n])
header["ids"]["data_offsets"][1] += 8                       # claims 8 more bytes than 6 int64 need
fake = json.dumps(header).encode()
try_read("wrong_offsets.safetensors", len(fake).to_bytes(8, "little") + fake + raw[8 + n:])

# %% [markdown]
# ## 2. The tokenizer on real prompts
#
# Both SDXL text encoders use CLIP's byte-pair encoding with a 49,408-token vocabulary
# (`bpe_simple_vocab_16e6.txt.gz`, in the repository): clean the text, split it into words, punctuation and single
# digits, turn each word's UTF-8 bytes into printable characters, then merge pairs in the learned order. `</w>`
# marks the end of a word. The sequence is `[start] tokens [end]`, cut or padded to 77. Bytes outside printable
# ASCII show as their stand-in characters: `é` is two UTF-8 bytes, printed `Ã©`, and the cat emoji is four.

# %%
vocab, _ = sdxl.load_clip_vocab()
symbol = {i: s for s, i in vocab.items()}
prompts = ["a photo of a cat", "An astronaut riding a green horse on Mars, 4k, photorealistic!!",
           "Ein Fuchs im Schnee, Aquarell", "a café at 3:45pm &amp; neon signs", "🐱 emoji cat"]
lines = ["| prompt | tokens | BPE pieces |", "|---|---|---|"]
for p in prompts:
    ids = sdxl.encode_text(p)
    lines.append(f"| `{p}` | {len(ids)} | `{' '.join(symbol[i] for i in ids)}` |")
display(Markdown("\n".join(lines)))

# %% [markdown]
# The two encoders differ only in padding: the CLIP ViT-L tokenizer (Hugging Face's, as SDXL and DMD2 use it) pads
# with the end token 49407, open_clip's bigG tokenizer pads with 0. The padding is not masked in the UNet's
# cross-attention, so getting it right matters for the image. Prompts longer than 75 tokens are cut and keep
# their end token.

# %%
ids_l = sdxl.tokenize(prompts[:1], pad_with="end")          # [1, 77] for CLIP-L
ids_g = sdxl.tokenize(prompts[:1], pad_with="zero")         # [1, 77] for bigG
print("CLIP-L:", ids_l[0, :10].tolist(), "...", ids_l[0, -3:].tolist())
print("bigG:  ", ids_g[0, :10].tolist(), "...", ids_g[0, -3:].tolist())
long_ids = sdxl.tokenize(["a very long prompt " * 30], pad_with="end")
print("a 120-word prompt:", tuple(long_ids.shape), "ends with", long_ids[0, -3:].tolist(), "(end token 49407 kept)")

# %% [markdown]
# ## 3. The conditioning
#
# SDXL conditions its UNet on two things (SDXL paper Sec. 2; `sdxl.encode_prompt`, `sdxl.vector_cond`):
#
# * `context` `[B, 77, 2048]`: the penultimate hidden states of CLIP ViT-L (768 wide) and OpenCLIP bigG (1280 wide),
#   concatenated; the UNet reads them through cross-attention.
# * `y` `[B, 2816]`: bigG's pooled embedding (1280) followed by six 256-d sinusoidal embeddings of the
#   "micro-conditioning": original height and width, crop top and left, target height and width. A small MLP maps
#   it to the width of the timestep embedding, to which it is added.
#
# The real encoders have 123 M and 695 M parameters. The tiny ones of `sdxl.py --preset tiny` have the same code and
# the real tokenizer, with width 32 and 2 layers, so only the widths of the outputs differ.

# %%
parts = sdxl.load_parts("tiny", "", device)
clip_l, clip_g, vae = parts["clip_l"], parts["clip_g"], parts["vae"]
context, pooled = sdxl.encode_prompt(clip_l, clip_g, ["a photo of a cat", "a painting of a fox"])
y = sdxl.vector_cond(pooled, original_size=(1024, 1024), crop_coords=(0, 0), target_size=(1024, 1024))
print(f"tiny:  context {tuple(context.shape)}, pooled {tuple(pooled.shape)}, y {tuple(y.shape)}")
print(f"SDXL:  context (2, 77, {sdxl.CLIP_L.width + sdxl.CLIP_G.width}), pooled (2, {sdxl.CLIP_G.embed_dim}), "
      f"y (2, {sdxl.CLIP_G.embed_dim + sdxl.SIZE_COND_DIM})")


# %% [markdown]
# The six size embeddings, drawn as rows of 256 values (blue negative, red positive), for three settings. DMD2 and
# the base model's text-to-image use original = target = the output size and crop (0, 0); the other rows show how
# a different size moves the embedding. For classifier-free guidance the *unconditional* input is zero text
# context and a zero pooled embedding with the same size embeddings (`sdxl.cfg_eps`).

# %%
def heat_rows(rows, cell=(3, 13)):
    """[R, N] values in [-1, 1] -> an image with one coloured strip per row."""
    a = rows.clamp(-1, 1)
    rgb = torch.stack([255 - 255 * (-a).clamp(min=0), 255 - 255 * a.abs(), 255 - 255 * a.clamp(min=0)], -1)  # [R, N, 3]
    img = Image.fromarray(rgb.round().byte().numpy())
    return img.resize((img.width * cell[0], img.height * cell[1]), Image.NEAREST)


names = ["orig h", "orig w", "crop top", "crop left", "target h", "target w"]
settings = {"1024x1024, no crop": ((1024, 1024), (0, 0), (1024, 1024)),
            "512x512 upscaled, no crop": ((512, 512), (0, 0), (1024, 1024)),
            "1024x1024, cropped at (256, 0)": ((1024, 1024), (256, 0), (1024, 1024))}
panels = []
for title, (orig, crop, target) in settings.items():
    size_part = sdxl.vector_cond(torch.zeros(1, 0), orig, crop, target).reshape(6, 256)      # [6, 256]
    strip = heat_rows(size_part)
    fig = Image.new("RGB", (strip.width + 70, strip.height + 16), "white")
    fig.paste(strip, (70, 16))
    draw = ImageDraw.Draw(fig)
    draw.text((70, 2), title, fill=(0, 0, 0))
    for i, name in enumerate(names):
        draw.text((2, 17 + 13 * i), name, fill=(0, 0, 0))
    panels.append(fig)
grid([[p] for p in panels])

# %% [markdown]
# ## 4. The noise schedule and DMD2's 4-step sampler
#
# SDXL is a discrete-time DDPM that predicts the noise: `x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps`
# for t = 0..999, with "scaled linear" betas (`sdxl.ddpm_alphas_cumprod`). The clean-image prediction is
# `x0 = (x_t - sqrt(1 - alpha_bar_t) eps_hat) / sqrt(alpha_bar_t)` (`sdxl.x0_from_eps`). DMD2's 4-step generator
# works at the fixed timesteps 999, 749, 499, 249 (`sdxl.dmd2_timesteps`). At t = 999 a little signal is left
# (sqrt(alpha_bar) = 0.068), yet the generator starts there from pure noise, in training as in sampling, so that it
# never learns to rely on signal that sampling cannot give it.

# %%
alphas_cumprod = sdxl.ddpm_alphas_cumprod()                 # [1000], float64
timesteps = sdxl.dmd2_timesteps(4)
print("DMD2 4-step timesteps:", timesteps, " 1-step:", sdxl.dmd2_timesteps(1))
print("sqrt(alpha_bar) there:", [round(float(alphas_cumprod[t].sqrt()), 3) for t in timesteps])


def schedule_plot(alphas_cumprod, marks, size=(560, 240)):
    """sqrt(alpha_bar_t) (signal) and sqrt(1 - alpha_bar_t) (noise) against t, with the sampler's timesteps."""
    w, h = size
    left, top, right, bottom = 40, 10, w - 10, h - 30
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    draw.rectangle((left, top, right, bottom), outline=(0, 0, 0))
    px = lambda t: left + t / 999 * (right - left)
    py = lambda v: bottom - v * (bottom - top)
    for t in marks:
        draw.line((px(t), top, px(t), bottom), fill=(180, 180, 180))
        draw.text((px(t) - 10, bottom + 4), str(t), fill=(0, 0, 0))
    for values, color, name in ((alphas_cumprod.sqrt(), (31, 119, 180), "signal sqrt(alpha_bar_t)"),
                                ((1 - alphas_cumprod).sqrt(), (214, 39, 40), "noise sqrt(1 - alpha_bar_t)")):
        draw.line([(px(t), py(float(v))) for t, v in enumerate(values)], fill=color, width=2)
        draw.text((left + 8, top + 4 + 14 * (color[0] > 100)), name, fill=color)
    draw.text((4, top), "1", fill=(0, 0, 0))
    draw.text((4, bottom - 10), "0", fill=(0, 0, 0))
    draw.text((right - 90, bottom + 16), "timestep t", fill=(0, 0, 0))
    return img


schedule_plot(alphas_cumprod, timesteps)


# %% [markdown]
# The sampler (`sdxl.sample_dmd2`, paper Sec. 4.4) is "predict x0, re-noise with fresh noise to the next
# timestep, predict again". To watch it without a 2.6 B-parameter UNet, give it a noise predictor we can write in
# closed form: the exact one for a data set of four tiny 8x8 pictures m_k, each equally likely. Given `x_t`, the
# posterior over the pictures is `softmax_k(-|x_t - sqrt(alpha_bar_t) m_k|^2 / (2 (1 - alpha_bar_t)))`, and the
# exact `x0` is the posterior mean. Each row is one seed; the columns alternate between what the model is given and the
# `x0` it predicts.

# %%
def tiny_pictures(size=8):
    """Four 8x8 RGB pictures in [-1, 1], the whole 'data set': a disc, a square, stripes and a diagonal.
    -> [4, 3, 8, 8]"""
    r = torch.arange(size, dtype=torch.float32)
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    masks = [((yy - 3.5) ** 2 + (xx - 3.5) ** 2 < 8).float(),                  # disc
             ((yy - 3.5).abs() < 2.5).float() * ((xx - 3.5).abs() < 2.5).float(),  # square
             (yy % 3 == 0).float(),                                            # horizontal stripes
             ((yy - xx).abs() < 1.5).float()]                                  # diagonal
    colours = [((30, 60, 160), (250, 210, 40)), ((120, 20, 20), (250, 160, 60)),
               ((20, 110, 40), (240, 240, 240)), ((10, 10, 10), (90, 200, 250))]
    pics = [torch.tensor(bg)[:, None, None] * (1 - m) + torch.tensor(fg)[:, None, None] * m
            for m, (bg, fg) in zip(masks, colours)]
    return torch.stack(pics).float() / 127.5 - 1


pictures = tiny_pictures()                                                 # [4, 3, 8, 8]
calls = []


def exact_eps(x_t, t, context, y):
    """eps_hat = (x_t - sqrt(ab) E[x0 | x_t]) / sqrt(1 - ab) for x0 uniform over `pictures`. Records its calls."""
    ab = sdxl.alpha_bar(alphas_cumprod, t).float()                                          # [B, 1, 1, 1]
    d2 = ((x_t[:, None] - ab.sqrt()[:, None] * pictures[None]) ** 2).flatten(2).sum(-1)     # [B, 4]
    post = torch.softmax(-d2 / (2 * (1 - ab.reshape(-1, 1))), dim=1)                        # [B, 4] posterior
    x0 = torch.einsum("bk,kchw->bchw", post, pictures)
    calls.append((x_t.clone(), x0))
    return (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()


g = torch.Generator().manual_seed(0)
noise = torch.randn(4, 3, 8, 8, generator=g)
out = sdxl.sample_dmd2(exact_eps, noise, None, None, timesteps, alphas_cumprod, g)
rows = [[to_image(v[b], 8) for x_t, x0 in calls for v in (x_t, x0)] for b in range(len(noise))]
display(Markdown("Columns: " + ", ".join(f"input at t={t}, x0 at t={t}" for t in timesteps)))
grid(rows)

# %% [markdown]
# At t = 999 the input is almost pure noise and the exact prediction is close to the *average* of the pictures:
# under a squared error the best guess is a blend. A DMD2 generator is trained to output a sharp *sample* at every
# step instead (that is what the distribution-matching loss rewards). The inputs at 749, 499 and 249 are the
# previous `x0` re-noised with fresh noise, each time keeping more of it (the blue curve above). Fresh noise can
# change the outcome: a prediction that leaned towards one picture at 749 may end as another.

# %% [markdown]
# ### The whole pipeline on a tiny random model
#
# `sdxl.generate` strings it together: tokenize, encode, `y`, noise from a seeded CPU generator, the 4-step
# sampler with the UNet, and the VAE decoder. To exercise the real loading path too, we write a single-file
# checkpoint with the same layout as `sd_xl_base_1.0.safetensors` (the same key prefixes, fp16 tensors) holding the
# tiny random models, and load it back with the functions that read the real file. With random weights the images
# are noise; the point is the shapes and the plumbing.

# %%
prefixes = {sdxl.PREFIX_CLIP_L: clip_l, sdxl.PREFIX_CLIP_G: clip_g, sdxl.PREFIX_VAE: vae}
state = {prefix + k: v.half() for prefix, module in prefixes.items() for k, v in module.state_dict().items()}
state.update({sdxl.PREFIX_UNET + k: v.half() for k, v in parts["unet_state"].items()})
ckpt = work / "tiny_sd_xl_base.safetensors"
sdxl.write_safetensors(ckpt, state)
sdxl.main(["inspect", str(ckpt)])                                   # what `python sdxl.py inspect FILE` prints

clip_l2, clip_g2, vae2 = sdxl.load_sdxl_parts(str(ckpt), device, clip_l=sdxl.TINY_CLIP_L, clip_g=sdxl.TINY_CLIP_G,
                                              vae=sdxl.TINY_VAE)
net = sdxl.build_unet(sdxl.load_unet_state(str(ckpt), sdxl.TINY_UNET), sdxl.TINY_UNET, device, torch.float32, str(ckpt))
print(f"tiny UNet: {sum(p.numel() for p in net.parameters()):,} parameters (SDXL's: 2,567,463,684)")
t0 = time.time()
images = sdxl.generate(net, clip_l2, clip_g2, vae2, ["a photo of a cat", "a painting of a fox"], 128, 128,
                       seed=0, sampler="dmd2", steps=4)                 # uint8 [2, 128, 128, 3]
print(f"generate: {images.shape} {images.dtype} in {time.time() - t0:.1f} s")
grid([[Image.fromarray(im) for im in images]])

# %% [markdown]
# ## 5. From diffusers names to Stability's
#
# The SDXL checkpoint names its UNet weights the way Stability's `sgm` code does (`input_blocks.4.1...`), and
# `unet.SDXLUNet` uses exactly those names, so `sd_xl_base_1.0.safetensors` loads with `strict=True` and no table.
# DMD2's released UNets (`dmd2_sdxl_4step_unet_fp16.bin`) are diffusers state dicts (`down_blocks.1.attentions.0...`);
# `unet.diffusers_to_sgm_unet` renames them with a handful of rules (`unet.sgm_key`) and checks every key and shape
# against the model. With 2 resnets per level going down (3 going up), the blocks map like this for SDXL:

# %%
cfg = unet.SDXLUNetConfig()
levels, n_down = len(cfg.channel_mult), cfg.num_res_blocks
blocks = ["conv_in", "time_embedding.linear_1", "add_embedding.linear_1"]
for i in range(levels):
    blocks += [f"down_blocks.{i}.resnets.{j}.conv1" for j in range(n_down)]
    blocks += [f"down_blocks.{i}.attentions.{j}.proj_in" for j in range(n_down) if cfg.transformer_depth[i]]
    blocks += [f"down_blocks.{i}.downsamplers.0.conv"] if i < levels - 1 else []
blocks += ["mid_block.resnets.0.conv1", "mid_block.attentions.0.proj_in", "mid_block.resnets.1.conv1"]
for i in range(levels):
    blocks += [f"up_blocks.{i}.resnets.{j}.conv1" for j in range(n_down + 1)]
    if cfg.transformer_depth[levels - 1 - i]:
        blocks += [f"up_blocks.{i}.attentions.{j}.proj_in" for j in range(n_down + 1)]
    blocks += [f"up_blocks.{i}.upsamplers.0.conv"] if i < levels - 1 else []
blocks += ["conv_norm_out", "conv_out"]

with torch.device("meta"):                                  # the full-size UNet's names and shapes, no memory
    sgm_state = unet.SDXLUNet(cfg).state_dict()
rows = [(d, unet.sgm_key(d + ".weight", cfg)) for d in blocks]
assert all(s in sgm_state for _, s in rows), "a renamed key is not in SDXLUNet"
print(f"SDXLUNet: {len(sgm_state)} tensors, {sum(v.numel() for v in sgm_state.values()):,} parameters; "
      f"all {len(rows)} renamed keys below exist in it")
display(Markdown("| diffusers (DMD2's .bin) | sgm (sd_xl_base_1.0, unet.SDXLUNet) |\n|---|---|\n" +
                 "\n".join(f"| `{d}.weight` | `{s}` |" for d, s in rows)))

# %% [markdown]
# Inside the attention blocks nothing changes (`...transformer_blocks.0.attn1.to_q.weight` keeps its tail), and
# inside the resnets six layer names change (`norm1` -> `in_layers.0`, `conv1` -> `in_layers.2`, ...). Files that do
# not fit are refused with the list of what is wrong, and a hint where the cause is a common one:

# %%
tiny_unet = unet.SDXLUNet(sdxl.TINY_UNET)
prefixed = {sdxl.PREFIX_UNET + k: v for k, v in tiny_unet.state_dict().items()}     # the full checkpoint's keys
try:
    unet.load_sdxl_unet_state(tiny_unet, prefixed, "tiny_sd_xl_base.safetensors")
except ValueError as e:
    print("\n".join(str(e).splitlines()[:4] + ["    ..."] + str(e).splitlines()[-1:]))
print()
try:
    unet.diffusers_to_sgm_unet({"conv_in.weight": torch.zeros(32, 4, 3, 3), "conv_in.bias": torch.zeros(16),
                                "lora_unet_conv_in.alpha": torch.tensor(8.0)}, sdxl.TINY_UNET, "broken_unet.bin")
except ValueError as e:
    print("\n".join(line for line in str(e).splitlines() if not line.startswith("    ")))   # the section titles

# %% [markdown]
# ## 6. One DMD2 iteration, with the script's own turns
#
# `sdxl.train` loops over iterations, and each iteration is two calls, as in the paper's Algorithm 1:
# `generator_turn` (the generator's x0 at the step k that backward simulation chose; on every
# `dfake_gen_update_ratio`-th iteration also the distribution-matching and GAN losses and an optimiser step) and
# `fake_score_turn` (the fake score's denoising loss and the discriminator loss on real latents, every iteration).
# Below, the tiny preset on four random images with captions: `encode` turns them into latents, `setup_training`
# builds everything `train` would, and we call the turns ourselves. The generator's prompts are the captions of a
# batch of real latents, as in the official 4-step run.

# %%
import numpy as np

images_dir, latents_dir = work / "images", work / "latents"
images_dir.mkdir(exist_ok=True)
rng = np.random.default_rng(0)
for i, caption in enumerate(["a red square", "a blue circle on a table", "a green field", "a cat on a mat"]):
    Image.fromarray(rng.integers(0, 255, (160, 160, 3), dtype=np.uint8)).save(images_dir / f"im{i}.png")
    (images_dir / f"im{i}.txt").write_text(caption)
sdxl.main(["encode", "--preset", "tiny", "--images", str(images_dir), "--out", str(latents_dir), "--device", "cpu"])

cfg = sdxl.Config(**{**sdxl.PRESETS["tiny"], "preset": "tiny", "latents": str(latents_dir), "outdir": str(work / "run"),
                     "device": "cpu", "dfake_gen_update_ratio": 2})
run = sdxl.setup_training(cfg)
print(f"global batch {cfg.batch_size} = {run.batch_gpu} per process x {run.world} process x {run.rounds} round(s)")
for step in range(4):
    run.step = step
    sdxl.set_learning_rates(run, step)
    k = sdxl.shared_step_index(len(run.timesteps), cfg.seed, step, run.device)         # one chain step per iteration
    batches = [sdxl.draw_micro_batch(run, step, run.rank * run.rounds + r, k) for r in range(run.rounds)]
    fakes, stats = sdxl.generator_turn(run, batches, train_generator=step % cfg.dfake_gen_update_ratio == 0)
    stats.update(sdxl.fake_score_turn(run, batches, fakes))
    print(f"step {step}  k {k} (t = {run.timesteps[k]})  " + "  ".join(f"{n} {v:.4g}" for n, v in stats.items()))

# %% [markdown]
# Step 0 and 2 update the generator (`loss_dm`, `loss_g_gan`), steps 1 and 3 only the fake score: TTUR with ratio 2
# here, 5 in the official run. Table 4's ablations are flags of `train`: `--no-backward_simulation` (the generator's
# input is a real latent noised to a random step) and `--gan_only` (no distribution matching).

# %% [markdown]
# ## 7. Pointing it at the real checkpoints
#
# Everything above runs unchanged on the real files; only the sizes differ. You need (GPU recommended; the UNet
# alone is 5 GB in fp16):
#
# * `sd_xl_base_1.0.safetensors` from `stabilityai/stable-diffusion-xl-base-1.0` (6.9 GB: text encoders, VAE, UNet),
# * for DMD2's generator, `dmd2_sdxl_4step_unet_fp16.bin` (or `dmd2_sdxl_1step_unet_fp16.bin`) from `tianweiy/DMD2`.
#
# ```
# python sdxl.py inspect sd_xl_base_1.0.safetensors            # tensor counts and bytes per part (CPU, < 1 s)
# python sdxl.py tokenize "a photo of a cat"                   # the ids of section 2
# python sdxl.py generate --ckpt sd_xl_base_1.0.safetensors --unet dmd2_sdxl_4step_unet_fp16.bin \
#     --prompt "a photo of a cat" --steps 4 --out cat.png      # DMD2, 4 steps: t = 999, 749, 499, 249
# python sdxl.py generate --ckpt sd_xl_base_1.0.safetensors --prompt "a photo of a cat" --steps 30 --guidance 8 \
#     --out base.png                                           # the teacher: Euler + CFG 8
# ```
#
# Training DMD2 on SDXL needs several GPUs (three 2.6 B-parameter UNets, FSDP); see the docstring of `sdxl.py` and the
# README. The paper reports COCO-10k FID 19.32 for the 4-step generator (19.01 for 1 step, 20.39 for the teacher
# with 100 network calls at CFG 8); we have not measured these.
#
# The cell below does the same as `generate` above with the real files when you point `SDXL_CKPT` (and optionally
# `DMD2_UNET`) at them; without them it only says what it would do.

# %%
real_ckpt, dmd2_unet = os.environ.get("SDXL_CKPT", ""), os.environ.get("DMD2_UNET", "")
if real_ckpt and os.path.exists(real_ckpt):
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    parts = sdxl.load_parts("", real_ckpt, dev, dtype)
    state = sdxl.load_unet_state(dmd2_unet) if dmd2_unet else parts["unet_state"]
    net = sdxl.build_unet(state, parts["unet_cfg"], dev, dtype, dmd2_unet or real_ckpt)
    image = sdxl.generate(net, parts["clip_l"], parts["clip_g"], parts["vae"], ["a photo of a cat"], 1024, 1024,
                          sampler="dmd2" if dmd2_unet else "euler", steps=4 if dmd2_unet else 30)[0]
    display(Image.fromarray(image).resize((512, 512)))
else:
    print("SDXL_CKPT is not set to an existing file: set SDXL_CKPT=/path/to/sd_xl_base_1.0.safetensors "
          "(and DMD2_UNET=/path/to/dmd2_sdxl_4step_unet_fp16.bin) before starting Jupyter to run this cell on them.")
