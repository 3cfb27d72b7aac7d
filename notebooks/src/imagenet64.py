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
# # DMD2 on ImageNet 64x64: a walk through `imagenet64.py`
#
# [`imagenet64.py`](../imagenet64.py) distills EDM's class-conditional ImageNet-64 model (Karras et al. 2022) into a
# generator that makes an image in one network call, as in the DMD2 paper (FID 1.51). The real teacher is a
# 296 M-parameter UNet and the run takes days on 7 GPUs; this notebook shows every part of it on a CPU in a couple of
# minutes:
#
# 1. the EDM network ([`unet.py`](../unet.py)) in a tiny configuration, and its preconditioning,
# 2. what EDM's pickle holds, and how `unet.load_edm_pickle` reads it without running anything from the file,
# 3. one DMD2 iteration, dissected tensor by tensor,
# 4. the CPU teaching run: a teacher whose data is Gaussian, so the Fréchet distance of the student is exact,
# 5. what changes on a GPU with the real teacher.
#
# Regenerate this notebook with `python notebooks/build.py imagenet64`.

# %%
import dataclasses
import io
import os
import pickle
import pickletools
import re
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "imagenet64.py").exists())   # the repository root
sys.path.insert(0, str(ROOT))

import torch
import torch.nn.functional as F
from IPython import get_ipython
from IPython.display import Markdown, display
from PIL import Image, ImageDraw

import imagenet64
import unet

FAST = os.environ.get("MINDMD2_NB_FAST") == "1"   # CI's smoke run: the same cells with fewer training steps
if FAST:
    print("MINDMD2_NB_FAST=1: reduced sizes, as in CI (the committed notebook is built without it)")
torch.set_num_threads(1)                            # steady timings on a shared CPU
torch.manual_seed(0)
workdir = tempfile.TemporaryDirectory(prefix="imagenet64_notebook_")   # removed when the kernel exits
work = Path(workdir.name)                                          # every file this notebook writes goes here


def png_256(img):
    """Figures are stored in the notebook as 256-colour PNGs, which keeps the .ipynb small."""
    buf = io.BytesIO()
    img.convert("RGB").quantize(256).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


formatters = get_ipython().display_formatter.formatters
formatters["image/png"].for_type(Image.Image, png_256)
formatters["image/jpeg"].for_type(Image.Image, lambda img: None)   # and not a second time as JPEG


def image_grid(rows, scale=6, gap=3, labels=(), label_width=0):
    """rows of [3, H, W] tensors in about [-1, 1] -> one enlarged PIL image, an optional label per row."""
    h, w = rows[0][0].shape[1] * scale, rows[0][0].shape[2] * scale
    fig = Image.new("RGB", (label_width + len(rows[0]) * (w + gap), len(rows) * (h + gap)), "white")
    draw = ImageDraw.Draw(fig)
    for r, row in enumerate(rows):
        if r < len(labels):
            draw.text((4, r * (h + gap) + h // 2 - 6), labels[r], fill=(0, 0, 0))
        for c, x in enumerate(row):
            img = Image.fromarray(((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())
            fig.paste(img.resize((w, h), Image.NEAREST), (label_width + c * (w + gap), r * (h + gap)))
    return fig


def line_plot(series, title, xlabel, size=(520, 240), log_x=False, log_y=False):
    """series = {name: (xs, ys)} -> a small PIL line plot with the y range written on the axis."""
    colors = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
    tx = (lambda v: torch.tensor(v).log10().item()) if log_x else float
    ty = (lambda v: torch.tensor(v).log10().item()) if log_y else float
    pts = {k: [(tx(x), ty(y)) for x, y in zip(*v)] for k, v in series.items()}
    xs, ys = [p[0] for v in pts.values() for p in v], [p[1] for v in pts.values() for p in v]
    x0, x1, y0, y1 = min(xs), max(xs) + 1e-12, min(ys), max(ys) + 1e-12
    w, h = size
    left, top, right, bottom = 60, 22, w - 10, h - 30
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    draw.rectangle((left, top, right, bottom), outline=(0, 0, 0))
    for i, (name, p) in enumerate(pts.items()):
        xy = [(left + (a - x0) / (x1 - x0) * (right - left), bottom - (b - y0) / (y1 - y0) * (bottom - top))
              for a, b in p]
        draw.line(xy, fill=colors[i % 6], width=2)
        draw.text((left + 8 + 110 * (i % 4), top + 4 + 12 * (i // 4)), name, fill=colors[i % 6])
    fmt_y = (lambda v: f"{10 ** v:.3g}") if log_y else (lambda v: f"{v:.3g}")
    fmt_x = (lambda v: f"{10 ** v:.3g}") if log_x else (lambda v: f"{v:.3g}")
    draw.text((4, top - 4), fmt_y(y1), fill=(0, 0, 0))
    draw.text((4, bottom - 8), fmt_y(y0), fill=(0, 0, 0))
    draw.text((left, bottom + 4), fmt_x(x0), fill=(0, 0, 0))
    draw.text((right - 40, bottom + 4), fmt_x(x1), fill=(0, 0, 0))
    draw.text((left + 60, bottom + 14), xlabel, fill=(0, 0, 0))
    draw.text((left + 4, 4), title, fill=(0, 0, 0))
    return img


# %% [markdown]
# ## 1. The EDM network
#
# The teacher is EDM's ADM UNet (`unet.DhariwalUNet`) inside EDM's preconditioning (`unet.EDMPrecond`, EDM Table 1):
#
# ```
# D(x; sigma, y) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma), y)
# c_skip = sigma_data^2 / (sigma^2 + sigma_data^2)     c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2)
# c_in   = 1 / sqrt(sigma^2 + sigma_data^2)             c_noise = ln(sigma) / 4        (sigma_data = 0.5)
# ```
#
# The scalings are chosen so that the network `F` sees inputs of unit variance and predicts a target of unit variance
# (for data of standard deviation sigma_data); at small sigma `D` is mostly the input itself (c_skip near 1), at large
# sigma mostly the network's output. DMD2's one-step generator is this network called at sigma = 80, where
# `c_skip = 4e-5`: the image is almost entirely `c_out F`.

# %%
sigmas = torch.logspace(-3, 2, 200)
sd = 0.5
curves = {"c_skip": sd**2 / (sigmas**2 + sd**2), "c_out": sigmas * sd / (sigmas**2 + sd**2).sqrt(),
          "c_in": 1 / (sigmas**2 + sd**2).sqrt()}
line_plot({k: (sigmas.tolist(), v.tolist()) for k, v in curves.items()}, "EDM preconditioning (sigma_data = 0.5)",
          "sigma (log scale)", log_x=True)

# %% [markdown]
# The full ImageNet-64 configuration (`unet.EDM_IMAGENET64`) has 296 M parameters; built on PyTorch's meta device it
# costs no memory, which is enough to list its blocks and shapes. Below it, a two-level network of the same code with
# 8x8 images, 4 classes and a few channels (the CPU preset of `imagenet64.py` uses an even smaller one,
# `imagenet64.TINY_UNET`). Forward hooks record what each block outputs: the encoder halves the resolution per level,
# the decoder concatenates the encoder's outputs (the skips) and doubles it back. The encoder's last output is the
# *bottleneck* (`[B, 768, 8, 8]` at full size), which DMD2's GAN head classifies.

# %%
with torch.device("meta"):
    full = unet.EDMPrecond(**unet.EDM_IMAGENET64)
print(f"EDM ImageNet-64: {sum(p.numel() for p in full.parameters()):,} parameters, "
      f"{len(full.state_dict())} tensors, blocks: {', '.join(list(full.model.enc)[:5])}, ...")

tiny_kwargs = dict(img_resolution=8, img_channels=3, label_dim=4, model_channels=32, channel_mult=[1, 2],
                   channel_mult_emb=2, num_blocks=1, attn_resolutions=[4], dropout=0.0)
net = unet.EDMPrecond(**tiny_kwargs).eval()
shapes = {}


def record_shape(name):
    def hook(module, inputs, output):              # returns None: a hook that returned a value would replace the output
        shapes[name] = tuple(output.shape)
    return hook


blocks = [*net.model.enc.items(), *net.model.dec.items()]
hooks = [block.register_forward_hook(record_shape(name)) for name, block in blocks]
x = torch.randn(2, 3, 8, 8)
y = F.one_hot(torch.tensor([0, 3]), 4).float()                                  # [2, 4] one-hot class labels
with torch.no_grad():
    D_x, h = net(x, torch.tensor([0.5, 80.0]), y, return_bottleneck=True)
for hook in hooks:
    hook.remove()
print(f"tiny: {sum(p.numel() for p in net.parameters()):,} parameters; D(x) {tuple(D_x.shape)}, "
      f"bottleneck {tuple(h.shape)}")
display(Markdown("| block | output |\n|---|---|\n" + "\n".join(f"| `{k}` | {v} |" for k, v in shapes.items())))

# %% [markdown]
# ## 2. What EDM's pickle holds, and how it is read safely
#
# EDM ships `edm-imagenet-64x64-cond-adm.pkl`, a Python pickle of the training snapshot
# `dict(ema=<network>, loss_fn=..., augment_pipe=..., dataset_kwargs=...)`. EDM's classes are pickled by its
# `torch_utils.persistence` module, which stores each network object as a call
# `_reconstruct_persistent_obj(meta)`, with `meta` holding the object's class name, its state (parameters, buffers,
# submodules, constructor arguments) and the *Python source code of the module that defines it*. EDM's loader
# `exec()`s that source: opening such a file runs whatever code it carries. A plain `pickle.load` is no safer, since a
# pickle can ask for any function to be called.
#
# We cannot download the 1.2 GB file here, so we write one of the same format for the tiny network: while writing, a
# stand-in `torch_utils.persistence` module exists, and a pickler turns each of EDM's classes into a persistence record.

# %%
EDM_CLASS_NAMES = {unet.EDMPrecond: "EDMPrecond", unet.DhariwalUNet: "DhariwalUNet", unet.UNetBlock: "UNetBlock",
                   unet.Conv2d: "Conv2d", unet.Linear32: "Linear", torch.nn.GroupNorm: "GroupNorm",
                   unet.PositionalEmbedding: "PositionalEmbedding"}
SOURCE = "# here EDM stores the source of training/networks.py; EDM's loader would exec() it\n"


class EDMLoss:                                          # the snapshot's loss_fn: EDM's training loss settings
    P_mean, P_std, sigma_data = -1.2, 1.2, 0.5


def write_edm_style_pickle(path, net):
    """Pickle a training snapshot holding `net` the way EDM's torch_utils.persistence does."""
    persistence = types.ModuleType("torch_utils.persistence")
    package = types.ModuleType("torch_utils")
    package.persistence = persistence

    def _reconstruct_persistent_obj(meta):              # only needs a name here: the pickle refers to it by name
        raise RuntimeError("not for loading")
    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"          # pickled by these two names
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj

    class PersistencePickler(pickle.Pickler):
        def reducer_override(self, obj):
            name = "EDMLoss" if isinstance(obj, EDMLoss) else EDM_CLASS_NAMES.get(type(obj))
            if name is None:
                return NotImplemented                    # tensors, dicts, ModuleDict, ...: pickled normally
            state = dict(vars(obj), _init_args=(), _init_kwargs={})
            if name == "EDMPrecond":                     # the constructor arguments EDM records for its network
                state["_init_kwargs"] = {**obj.init_kwargs, "model_type": "DhariwalUNet", "use_fp16": True}
            meta = dict(type="class", version=6, module_src=SOURCE, class_name=name, state=state)
            return _reconstruct_persistent_obj, (meta,), None

    sys.modules.update({"torch_utils": package, "torch_utils.persistence": persistence})
    try:
        snapshot = dict(ema=net, loss_fn=EDMLoss(), augment_pipe=None,
                        dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset",
                                            path="imagenet-64x64.zip"))
        with open(path, "wb") as f:
            PersistencePickler(f, protocol=4).dump(snapshot)
    finally:
        del sys.modules["torch_utils"], sys.modules["torch_utils.persistence"]


edm_pkl = work / "edm-tiny-cond-adm.pkl"
write_edm_style_pickle(edm_pkl, net)
raw = edm_pkl.read_bytes()
print(f"{edm_pkl.name}: {len(raw):,} bytes; the stored source is in it: {SOURCE.encode() in raw}")


# %% [markdown]
# Which functions does the file ask the unpickler to call? `pickletools` walks its opcodes without executing any:
# each `STACK_GLOBAL` names a module and an attribute, pushed as the two strings before it.

# %%
def pickle_globals(raw):
    """The set of (module, name) globals a pickle refers to, found by reading its opcodes (nothing runs)."""
    memo, pushed, found = {}, [], set()
    for op, arg, _ in pickletools.genops(raw):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            pushed.append(arg)
        elif op.name in ("BINGET", "LONG_BINGET"):
            pushed.append(memo.get(arg))
        elif op.name == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else None
        elif op.name == "STACK_GLOBAL":
            found.add((pushed[-2], pushed[-1]))
        if op.name not in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINGET", "LONG_BINGET", "MEMOIZE"):
            pushed.append(None)                         # anything else on the stack is not a string
    return found


display(Markdown("| globals this file asks for |\n|---|\n" +
                 "\n".join(f"| `{m}.{n}` |" for m, n in sorted(pickle_globals(raw)))))

# %% [markdown]
# `unet.load_edm_pickle` reads the file with a restricted unpickler: each of these globals is replaced by a
# data-only stand-in (the persistence call keeps the class name and state and drops the source; tensor storages are
# decoded with `torch.load(weights_only=True)`), and any other global is refused by name. EDM's real file also asks
# for `numpy.dtype` and numpy's scalar constructor, for numbers stored in constructor arguments; those are decoded
# from raw bytes. From the class names, states and recorded constructor arguments it builds our `EDMPrecond` and
# loads the weights strictly. `unet.load_persistence_pickle` shows the raw tree it reads:

# %%
tree = unet.load_persistence_pickle(edm_pkl)
ema = tree["ema"]
print("top level:", {k: type(v).__name__ for k, v in tree.items()})
print("ema:", ema.class_name, "| state keys:", sorted(k for k in ema.state if not k.startswith("_"))[:6], "...")
print("recorded constructor arguments:", ema.state["_init_kwargs"])
loaded = unet.load_edm_pickle(edm_pkl)
with torch.no_grad():
    same = torch.equal(loaded(x, 0.5, y), net(x, 0.5, y))
print(f"load_edm_pickle -> {type(loaded).__name__}, eval mode: {not loaded.training}, "
      f"same outputs as the original: {same}")


# %% [markdown]
# A pickle that asks for anything else is refused before it can run. This one would write a file if it were loaded
# with `pickle.load`:

# %%
class Payload:
    def __reduce__(self):
        return exec, (f"open({str(work / 'PWNED')!r}, 'w').write('code from the file ran')",)


evil = work / "evil.pkl"
evil.write_bytes(pickle.dumps({"ema": Payload()}))
try:
    unet.load_edm_pickle(evil)
except unet.ForbiddenGlobal as e:
    print("refused:", str(e).replace(str(work) + os.sep, ""))
print("the payload ran:", (work / "PWNED").exists())

# %% [markdown]
# Our own checkpoints (`checkpoint.pt`, `generator.pt`) are plain dicts of tensors and numbers, written atomically by
# `unet.save_checkpoint` (temporary file, then `os.replace`) and read by `unet.load_checkpoint` with
# `torch.load(weights_only=True)`.
#
# ## 3. One DMD2 iteration, tensor by tensor
#
# The CPU preset (`--preset gaussian`) replaces ImageNet by a data set whose every number is known: each of 4 classes
# is a Gaussian "texture" `x | y ~ N(mu_y, Sigma_y)` on 3x8x8 images (`imagenet64.GaussianTeacher`). Its exact
# denoiser, `D(x; sigma, y) = mu_y + Sigma_y (Sigma_y + sigma^2 I)^-1 (x - mu_y)`, plays the teacher. The
# generator and the fake score are tiny EDM networks, both copies of one network pre-trained with the EDM loss on
# samples of the data (`imagenet64.pretrain_edm`), as DMD2 copies both from the teacher checkpoint.
#
# `imagenet64.train(cfg)` is the whole loop. Run for one iteration, it builds everything (`imagenet64.setup`,
# `imagenet64.start`), reports the exact Fréchet distance of the student before training, trains one step and writes
# `checkpoint.pt`; section 4 resumes from there. It returns the `Run` it worked on (models, optimisers, settings),
# which we take apart now (the changes we make to it below do not touch the checkpoint).

# %%
steps, every = (24, 8) if FAST else (300, 60)   # section 4's run (the preset's full run is longer), report interval
cfg = imagenet64.parse_config(["--preset", "gaussian", "--outdir", str(work / "run"), "--total_steps", "1",
                               "--eval_per_class", "500", "--sample_every", str(every), "--log_every", str(every),
                               "--ckpt_every", "0", *(["--pretrain_steps", "50"] if FAST else [])])
t0 = time.time()
run = imagenet64.train(cfg)
teacher, generator, fake_score, data = run.teacher, run.generator, run.fake_score, run.data
K = run.num_classes
print(f"{time.time() - t0:.1f} s: teacher {type(teacher).__name__} ({K} classes), generator and fake score "
      f"{sum(p.numel() for p in generator.parameters()):,} parameters each, GAN head "
      f"{sum(p.numel() for p in fake_score.gan_head.parameters()):,}; wrote {sorted(os.listdir(cfg.outdir))}")
g = torch.Generator().manual_seed(0)
real, real_y = data.sample(16, g)
display(Markdown("Real samples, sorted by class:"))
image_grid([list(real[real_y.argsort()])], scale=6)

# %% [markdown]
# **The distribution-matching gradient.** A batch of noise `z` and classes `y` gives the one-step samples
# `x = G(80 z; sigma = 80, y)` (`imagenet64.generate`). The distribution-matching loss
# (`imagenet64.loss_distribution_matching`) then draws one sigma per sample from indices 20..980 of the 1000-point
# Karras grid, noises `x`, and compares the two denoisers there: `x0_real` from the teacher, `x0_fake` from the fake
# score. Below, the script's loss is computed first; then the random state is rewound and the same draws are
# replayed by hand, to see every tensor.

# %%
B = 8
karras = imagenet64.sigma_grid(cfg)                                              # [1000], ascending
lo, hi = int(cfg.min_step_percent * len(karras)), int(cfg.max_step_percent * len(karras)) + 1


def dm_tensors(x, labels, g):
    """Replay loss_distribution_matching's random draws with g: -> sigma, x_t, x0_real, x0_fake, grad."""
    sigma = imagenet64.grid_sigmas(karras, lo, hi, len(x), g)                   # [B, 1, 1, 1]
    with torch.no_grad():
        x_t = x + sigma * torch.randn(x.shape, generator=g)                     # noised samples
        x0_real = teacher(x_t, sigma, labels)                                   # exact denoiser of the data
        x0_fake = fake_score.unet(x_t, sigma, labels)                           # the fake score's denoiser
        p_real, p_fake = x - x0_real, x - x0_fake
        w = p_real.abs().mean(dim=[1, 2, 3], keepdim=True)                      # [B, 1, 1, 1] per-sample normaliser
        grad = (p_real - p_fake) / w                                            # = (x0_fake - x0_real) / w
    return sigma, x_t, x0_real, x0_fake, grad


g = torch.Generator().manual_seed(1)
z = torch.randn(B, 3, 8, 8, generator=g)                                         # [B, 3, 8, 8]
y = torch.arange(B) % K                                                          # [B] classes
labels = imagenet64.one_hot(y, K)                                                # [B, K]
x = imagenet64.generate(generator, z, y, K)                                      # [B, 3, 8, 8], with grad into G
rng_before = g.get_state()
loss_dm = imagenet64.loss_distribution_matching(x, labels, teacher, fake_score.unet, karras, cfg, g)
(dloss_dx,) = torch.autograd.grad(loss_dm, x)
g.set_state(rng_before)                                                          # replay the same random draws
sigma, x_t, x0_real, x0_fake, grad = dm_tensors(x.detach(), labels, g)
print("sigma per sample:", [round(s, 3) for s in sigma.flatten().tolist()])
print(f"loss_dm = {loss_dm.item():.4f} = 0.5 * mean(grad^2) = {0.5 * grad.pow(2).mean().item():.4f}")
print("d loss_dm / d x == grad / x.numel():", torch.allclose(dloss_dx, grad / x.numel(), rtol=1e-4, atol=1e-9))
direction = -grad / grad.abs().amax(dim=[1, 2, 3], keepdim=True)                 # scaled to [-1, 1] for display
image_grid([list(x.detach()), list(x_t), list(x0_real), list(x0_fake), list(direction)],
           labels=["x = G(80z)", "x_t", "x0_real", "x0_fake", "-grad (scaled)"], label_width=110)

# %% [markdown]
# The loss value itself means little (it is `0.5 mean(grad^2)` by construction); what matters is its gradient, which
# is exactly `grad / x.numel()`. Gradient descent moves each pixel along `-grad`, i.e. along `x0_real - x0_fake`:
# towards what the data's denoiser expects and away from what the generator's own distribution explains.
#
# **The generator's turn** (`imagenet64.generator_turn`, what the loop calls every `dfake_gen_update_ratio = 5`-th
# iteration): it draws `z` and `y` for each micro-batch from that iteration's random generator, makes the samples,
# adds the GAN term `softplus(-logit)` (weighted by `gen_gan_weight`, 3e-3 on ImageNet) to `loss_dm` with the fake
# score frozen, clips the gradient at norm 10 and takes an AdamW step. We call it for iteration 1 and replay its
# draws, so that we know its samples and their DM direction before the step. The cosine between each sample's change
# and its `x0_real - x0_fake` is positive when the sample moved along the DM direction. It is not 1: AdamW rescales
# every parameter's step, the GAN term adds its own push, and one parameter update moves all samples at once.

# %%
step = 1
gens = [unet.batch_generator(cfg.seed, step, r, run.device) for r in range(run.rounds)]   # the loop's draws
g = unet.batch_generator(cfg.seed, step, 0, run.device)                                   # the same, replayed
z = torch.randn(run.batch_gpu, *run.image_shape, generator=g)
y = torch.randint(K, (run.batch_gpu,), generator=g)
with torch.no_grad():
    x_before = imagenet64.generate(generator, z, y, K)
_, _, x0_real, x0_fake, _ = dm_tensors(x_before, imagenet64.one_hot(y, K), g)
fakes = imagenet64.generator_turn(run, gens, step, update=True)                         # [(x_fake, y)] per micro-batch
with torch.no_grad():
    moved = imagenet64.generate(generator, z, y, K) - x_before                          # [B, 3, 8, 8]
cos = F.cosine_similarity(moved.flatten(1), (x0_real - x0_fake).flatten(1))
print("the turn's samples are the replayed ones:", torch.equal(fakes[0][0], x_before))
print("generator turn:", {k: round(v, 4) for k, v in run.stats_g.items()})
print(f"cosine(change of each sample, x0_real - x0_fake): mean {cos.mean():.2f}, "
      f"positive for {(cos > 0).sum().item()} of {len(cos)} samples")

# %% [markdown]
# **The fake score's turn** (`imagenet64.fake_score_turn`), every iteration, on the same detached samples: the fake
# score learns the generator's current samples with EDM's denoising loss, weighted `1/sigma^2 + 1/sigma_data^2`, at
# sigmas over the whole grid (`imagenet64.loss_fake_score`), and the GAN head on its encoder's output learns to tell
# noised real images from noised generated ones (`imagenet64.loss_gan_discriminator`, loss
# `softplus(D(fake)) + softplus(-D(real))`, weight `fake_gan_weight` = 1e-2). Both live in one module
# (`imagenet64.FakeScore`: `unet` and `gan_head`) with one AdamW. The head needs only the encoder, so every GAN call
# stops there (`bottleneck_only=True`), about 0.3 of a full pass at full size. `imagenet64.train_step` is these two
# calls (plus the learning-rate warm-up), and `imagenet64.train` loops over it: DMD2's Algorithm 1.

# %%
imagenet64.fake_score_turn(run, fakes, gens, step)
print("fake score turn:", {k: round(v, 4) for k, v in run.stats_d.items()},
      f"(loss_d = log 4 = {torch.tensor(4.0).log().item():.4f} for an undecided head)")
g = torch.Generator().manual_seed(3)
x_real, y_real = data.sample(B, g)
with torch.no_grad():
    logits_fake = imagenet64.gan_logits(fake_score, fakes[0][0][:B], imagenet64.one_hot(fakes[0][1][:B], K), karras, g)
    logits_real = imagenet64.gan_logits(fake_score, x_real, imagenet64.one_hot(y_real, K), karras, g)
print("head logits on generated:", [round(v, 3) for v in logits_fake.flatten().tolist()])
print("head logits on real:     ", [round(v, 3) for v in logits_real.flatten().tolist()])

# %% [markdown]
# ## 4. The Gaussian-teacher run: the exact Fréchet distance falls
#
# Because every class of the data is a Gaussian with known mean and covariance, the Fréchet distance between the
# student's samples and the data needs no Inception network and no reference samples: it is computed against the
# true `mu_y, Sigma_y`, per class (`imagenet64.gaussian_frechet`; with ImageNet the same formula runs on Inception
# features, `fid.py`). The run resumes the checkpoint written in section 3 and logs the distance every few steps.

# %%
t0 = time.time()
out = imagenet64.train(dataclasses.replace(cfg, total_steps=steps, resume=True))
print(f"{steps - 1} more iterations in {time.time() - t0:.1f} s")
log = (Path(cfg.outdir) / "log.txt").read_text()
fd = {int(m[1]): [float(v) for v in m[2].split()]
      for m in re.finditer(r"step\s+(\d+)\s+exact Frechet distance per class: ([\d. ]+)", log)}
assert fd, f"no 'exact Frechet distance' lines in {cfg.outdir}/log.txt: has imagenet64.py's log format changed?"
at = sorted(fd)
display(line_plot({f"class {c}": (at, [fd[s][c] for s in at]) for c in range(K)},
                  "exact Frechet distance to the data, per class", "iteration"))
print("iteration:", at)
print("mean Frechet distance:", [round(sum(fd[s]) / K, 3) for s in at])

# %% [markdown]
# The distance falls as the student learns (early iterations can be flat); `python imagenet64.py --preset gaussian`
# runs the preset's full length and prints the final distances. The sample grids the run wrote (`samples_*.png`;
# rows cycle through the classes; the same noise every time), next to real samples in the same layout:

# %%
grids = sorted(Path(cfg.outdir).glob("samples_*.png"))                         # 8 x 8 images of 8 x 8 pixels
x_all, y_all = data.sample(512, torch.Generator().manual_seed(2))
imagenet64.save_grid(torch.cat([x_all[y_all == r % K][:8] for r in range(8)]), work / "real.png")   # row r: class r % K
panels = [(f"iteration {int(g.stem.split('_')[1])}", g) for g in (grids[0], grids[-1])]
panels.append(("real data", work / "real.png"))
fig = Image.new("RGB", (3 * 260, 280), "white")
draw = ImageDraw.Draw(fig)
for i, (title, path) in enumerate(panels):
    fig.paste(Image.open(path).convert("RGB").resize((256, 256), Image.NEAREST), (i * 260, 20))
    draw.text((i * 260 + 4, 4), title, fill=(0, 0, 0))
fig

# %% [markdown]
# ## 5. On a GPU, with the real teacher
#
# The same `train(cfg)` runs the paper's ImageNet-64 experiment when it is given EDM's checkpoint and the data
# instead of `--preset gaussian`; nothing else in the loop changes. The settings that differ, read from
# `imagenet64.Config` (whose defaults are the official run) and from the preset (this notebook ran fewer steps):

# %%
official, preset = imagenet64.Config(), imagenet64.parse_config(["--preset", "gaussian"])
rows = [("teacher", "closed-form Gaussian denoiser",
         "`edm-imagenet-64x64-cond-adm.pkl` (296 M parameters), `unet.load_edm_pickle`"),
        ("generator, fake score", "tiny EDM nets, pre-trained here", "copies of the teacher"),
        ("real images for the GAN", "exact samples of the Gaussians", "ImageNet 64x64, EDM's `dataset_tool` zip"),
        ("precision", "fp32", "bf16 autocast (fp16 diverges)"),
        ("metric", "exact Fréchet distance", "FID-50k of fp32 samples, DMD2's quantisation, `fid.py` against EDM's "
                                              "`imagenet-64x64.npz`")]
rows += [(name, getattr(preset, name), getattr(official, name)) for name in
         ("batch_size", "generator_lr", "fake_score_lr", "warmup_steps", "dfake_gen_update_ratio", "gen_gan_weight",
          "fake_gan_weight", "ema_decay", "total_steps")
         if getattr(preset, name) != getattr(official, name) or name == "dfake_gen_update_ratio"]
display(Markdown("| | CPU preset (this notebook) | ImageNet-64 (paper, App. F.2) |\n|---|---|---|\n" +
                 "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)))

# %% [markdown]
# The paper's two results, as the README and the script's docstring give them (`T` = `--teacher
# edm-imagenet-64x64-cond-adm.pkl`, `D` = `--data imagenet-64x64.zip`, `E` = `--fid_ref imagenet-64x64.npz`):
# ```
# torchrun --nproc_per_node=7 imagenet64.py T D --outdir out/gan --total_steps 200000     # FID 1.51
# torchrun --nproc_per_node=7 imagenet64.py T --no-gan --outdir out/stage1 --total_steps 410000   # 1.28, stage 1
# python imagenet64.py evaluate --folder out/stage1 E                                      # finds the best kept file
# torchrun --nproc_per_node=7 imagenet64.py T D --init_from out/stage1/generator_0405000.pt \
#     --generator_lr 5e-7 --fake_score_lr 5e-7 --outdir out/stage2 --total_steps 150000     # 1.28, stage 2
# python imagenet64.py evaluate --folder out/stage2 E
# python imagenet64.py --teacher random --data random --batch_size 40 --bench   # loop overhead, no downloads
# ```
#
# The paper trains with 40 images per GPU on 7 A100 for about 53 hours. Expected, from the paper (not measured by
# us): FID 1.51 after about 200k iterations; 1.28 with the two-stage schedule (about 400k iterations without the
# GAN, then about 140k more at learning rate 5e-7 with it). The one-step student beats the teacher's deterministic
# sampler (2.32 at 511 network calls; EDM's stochastic sampler reaches 1.36). Without the GAN term, the only part
# that sees real images, DMD2 reaches 2.61 (paper, Table 3).
