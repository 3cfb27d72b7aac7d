"""Measurements behind README's SDXL figures (CPU; tiny random models unless a command says otherwise; run from the
repository root):

    python tests/bench_sdxl.py precision    # bf16 vs fp32 on the passes the official run keeps in fp32
    python tests/bench_sdxl.py tokenizer    # our CLIP tokenizer vs open_clip's SimpleTokenizer, 1,000 prompts
    python tests/bench_sdxl.py pipelines 512   # full-size random weights: our pipeline in bf16 and fp32 against
                                               # diffusers' in bf16, image differences at 512x512 (minutes, ~20 GB);
                                               # the size is needed: a multiple of 64, at least 64

Not a test: timings depend on the machine; the figures are ratios measured side by side in one run.
"""
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sdxl  # noqa: E402


def precision():
    """Relative L2 difference, bf16 autocast vs fp32, on the tiny preset's random models: the text context, the
    backward-simulation input after 3 chain steps, and the generator's x0 at t = 999 (1 / sqrt(alpha_bar) = 14.6)."""
    parts = sdxl.load_parts("tiny", "", "cpu")
    net = sdxl.build_unet(parts["unet_state"], parts["unet_cfg"], "cpu", torch.float32, "tiny")
    ab, ts = sdxl.ddpm_alphas_cumprod(), sdxl.dmd2_timesteps(4)
    prompts = ["a photo of a cat", "a red square on a table"]

    def passes(bf16):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            context, y = sdxl.encode_condition(parts["clip_l"], parts["clip_g"], prompts, 128, 128)
            x_t = sdxl.backward_simulation(net, (2, 4, 16, 16), context, y, 3, ts, ab, torch.Generator().manual_seed(0))
            noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
            t = torch.full((2,), 999)
            x0 = sdxl.x0_from_eps(noise, net(noise, t, context, y).float(), t, ab)
        return dict(text_context=context.float(), chain_x_t=x_t.float(), x0_at_999=x0.float())

    low, high = passes(True), passes(False)
    for name in high:
        print(f"{name:14s} relative difference bf16 vs fp32: {((low[name] - high[name]).norm() / high[name].norm()):.2e}")


def pipelines(size):
    """sdxl.bench_pipelines' images (prompt -> 4 DMD2 steps -> VAE decode, pixels in [0, 1]) on SDXL base's shapes with
    random weights (--preset random), at size x size: our pipeline with the UNet and text encoders in bf16 and in
    fp32, and diffusers' StableDiffusionXLPipeline in bf16 on the same weights, all with the fp32 VAE. The bf16
    weights are the fp32 ones rounded, so ours bf16 vs ours fp32 is bf16's own effect, the yardstick for the other
    two differences."""
    import gc

    from sdxl_diffusers import diffusers_pipeline
    size = int(size)
    torch.set_num_threads(os.cpu_count())
    parts = sdxl.load_parts("random", "", "cpu", torch.bfloat16)        # bf16 UNet state, fp32 VAE
    state = parts.pop("unet_state")
    images = {}
    for dtype in (torch.float32, torch.bfloat16):
        net = sdxl.build_unet(state, parts["unet_cfg"], "cpu", dtype, "random")
        clip_l, clip_g = parts["clip_l"].to(dtype), parts["clip_g"].to(dtype)
        r = sdxl.bench_pipelines(net, clip_l, clip_g, parts["vae"], parts["vae_cfg"], "a photo of a cat", size, size,
                                 reps=1, reference=diffusers_pipeline if dtype == torch.bfloat16 else None)
        images["ours fp32" if dtype == torch.float32 else "ours bf16"] = r["ours"]["image"]
        if "diffusers" in r:
            images["diffusers bf16"] = r["diffusers"]["image"]
        del net, r
        gc.collect()
    for a, b in [("ours bf16", "ours fp32"), ("diffusers bf16", "ours fp32"), ("ours bf16", "diffusers bf16")]:
        d = (images[a] - images[b]).abs()
        print(f"{size}x{size} {a} vs {b}: max {d.max():.4f}, mean {d.mean():.5f}")


def varied_prompts(n=1000, seed=0):
    """n prompts of 3-80 words drawn Zipf-like (weight 1 / rank) from the ~30k whole words of CLIP's own vocabulary,
    with punctuation, numbers, accents and HTML entities mixed in: about 8k distinct words in 40k, like real captions."""
    vocab = sdxl.load_clip_vocab()[0]
    words = sorted({s[:-4] for s in vocab if s.endswith("</w>") and s[:-4].isalpha() and s[:-4].isascii()},
                   key=lambda w: vocab[w + "</w>"])                         # BPE merge order: frequent words first
    extras = [",", ".", "!", "(", ")", "'s", "#1", "2024", "4k", "caf\u00e9", "na\u00efve", "\u00fcber", "&amp;",
              "don't", "x-ray", "8k uhd", "--ar", "f/1.8"]
    rng = random.Random(seed)
    weights = [1 / (rank + 1) for rank in range(len(words))]
    prompts = []
    for _ in range(n):
        picked = rng.choices(words, weights, k=rng.randint(3, 80))
        prompts.append(" ".join(w if rng.random() > 0.1 else rng.choice(extras) for w in picked))
    return prompts


def open_clip_tokenizer():
    """open_clip/tokenizer.py alone (pip install --no-deps open_clip_torch==3.3.0 ftfy==6.3.1): importing the open_clip
    package would also import its models, which need torchvision and timm."""
    import importlib.util
    folder = importlib.util.find_spec("open_clip").submodule_search_locations[0]
    spec = importlib.util.spec_from_file_location("open_clip_tokenizer", os.path.join(folder, "tokenizer.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tokenizer():
    """Both tokenizers on the same 1,000 prompts, per-word caches emptied before each run, best of 3 runs."""
    ref = open_clip_tokenizer().SimpleTokenizer()                  # both vocabularies loaded before timing
    sdxl.load_clip_vocab()
    prompts, times = varied_prompts(), {}
    for name in ("ours", "open_clip"):
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            if name == "ours":
                sdxl.word_ids.cache_clear()
                ids = sdxl.tokenize(prompts)
            else:
                ref.cache = {t: t for t in ("<start_of_text>", "<end_of_text>")}   # its per-word cache, emptied
                ref_ids = [ref.encode(p) for p in prompts]
            best = min(best, time.perf_counter() - t0)
        times[name] = best
    same = all(ids[i, 1:1 + min(len(r), 75)].tolist() == r[:75] for i, r in enumerate(ref_ids))
    print(f"1,000 prompts: ours {times['ours']:.3f} s, open_clip SimpleTokenizer {times['open_clip']:.3f} s, "
          f"ratio {times['ours'] / times['open_clip']:.2f}; identical ids: {same}")


if __name__ == "__main__":
    commands = {"precision": precision, "tokenizer": tokenizer, "pipelines": pipelines}
    if sys.argv[1:] in (["-h"], ["--help"]):
        print(__doc__)
        sys.exit(0)
    sized = sys.argv[1:2] == ["pipelines"] and len(sys.argv) == 3 and sys.argv[2].isdigit() and int(sys.argv[2]) >= 64 \
        and int(sys.argv[2]) % 64 == 0
    if not sized and (len(sys.argv) != 2 or sys.argv[1] not in commands or sys.argv[1] == "pipelines"):
        sys.exit(__doc__)                                 # no command or an unknown one: the usage above, status 1
    torch.set_num_threads(1)
    commands[sys.argv[1]](*sys.argv[2:])
