"""One prepared GPU check: the full-size figures README's GPU table reports, in one run of under 9 minutes.

    python tests/gpu_check.py                       # one CUDA GPU: every part, under 9 minutes: gpu_check.json, a table
    python tests/gpu_check.py --dry-run             # the same code paths on the CPU at tiny sizes (CI runs this, < 1 min);
                                                    # out/gpu_check_dry_run.json
    python tests/gpu_check.py --parts fid,toy2d     # a subset
    python tests/gpu_check.py --parts toy2d --cap toy2d=300   # a longer time cap for one part (a slower GPU)

Nothing is downloaded: every full-size network gets random weights at the real shapes (timing and memory do not depend
on the values). The SDXL comparison needs diffusers (a test requirement); without it that row says so and the rest runs.
Each part runs in its own process with its own time cap, so one that runs over (or runs out of memory) is reported and
skipped, and the others still run. The parent prints a markdown table and writes JSON with the GPU, torch and CUDA
versions.

Parts:
  imagenet64          full-size ADM (296M parameters) DMD2 iterations at 40 images per GPU in bf16: iterations/s,
                      images/s, peak memory, the loop's time over the sum of its network passes, and the fraction of
                      the GPU's bf16 peak that the counted FLOPs reach (FLOPs counted on the meta device)
  imagenet64_compile  the same with --compile
  imagenet64_finite   50 full-size bf16 training iterations stay finite
  sdxl_generate       1024x1024, 4 steps, bf16: latency and peak memory, ours against diffusers' pipeline, and how
                      far their images differ (both saved beside the JSON as gpu_check_sdxl_{ours,diffusers}.png)
  sdxl_train          one full-size DMD2 SDXL iteration (three UNets, two AdamW) at batch 1: time and peak memory
  fid                 Inception features per second
  toy2d               the default toy run's wall time on the GPU and on the CPU
"""
import argparse
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# bf16 dense peak of the GPUs we quote against (vendor data sheets, TFLOP/s without sparsity).
BF16_PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "4090": 165.2}

# Seconds each part may take on the GPU (the whole check stays under 9 minutes); the dry run uses DRY_CAP for all.
# On one H200: imagenet64 56 s, imagenet64_compile 188 s (most of it compiling), imagenet64_finite 52 s, sdxl_generate
# 36 s, sdxl_train 30 s, fid 6 s; the toy's two runs took over 120 s together.
CAPS = dict(imagenet64=75, imagenet64_compile=210, imagenet64_finite=60, sdxl_generate=90, sdxl_train=60, fid=20,
            toy2d=150)
TOTAL_BUDGET = 540      # seconds for the whole check: a part gets min(its cap, what is left) and is skipped at 0
DRY_CAP = 120


# ----------------------------------------------------------------------------------------------------------------
# Helpers shared by the parts.

def device_and_sync(dry):
    import torch
    if dry:
        return torch.device("cpu"), (lambda: None)
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run on a CPU")
    return torch.device("cuda"), torch.cuda.synchronize


def peak_gib(device):
    import torch
    return round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2) if device.type == "cuda" else None


PARTIAL = ""            # in a part's process: where it keeps the figures it has so far, read if it runs over its cap
IMAGE_DIR = ""          # in a part's process: the folder of the JSON results, where sdxl_generate leaves its images


def part_tmpdir():
    """A temporary folder for a part's files, inside the folder run_part removes: a part killed at its cap cannot clean
    up after itself."""
    return tempfile.TemporaryDirectory(dir=os.path.dirname(PARTIAL) or None)


def keep_partial(figures):
    """Save the figures so far: a part that then runs over its cap still reports them."""
    if PARTIAL:
        with open(PARTIAL, "w") as f:
            json.dump(figures, f)


def reset_peak(device):
    import torch
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def bf16_peak_tflops():
    import torch
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)


# ----------------------------------------------------------------------------------------------------------------
# The parts. Each returns a dict of figures (floats, ints or short strings).

def imagenet64_config(dry, **over):
    import imagenet64
    kw = dict(teacher="random-tiny" if dry else "random", data="random", batch_size=4 if dry else 40,
              precision="bf16", **over)
    flags = [f"--{k}" if v is True else f"--{k}={v}" for k, v in kw.items()]
    return imagenet64.parse_config(flags)


def part_imagenet64(dry, compile=False):
    """imagenet64.bench: ABAB timing of the real loop against its network passes; FLOPs from imagenet64's counter
    (torch.utils.flop_counter on the meta device) for the network actually timed."""
    import imagenet64
    device, _ = device_and_sync(dry)
    cfg = imagenet64_config(dry, **({"compile": True} if compile else {}))
    reset_peak(device)
    r = imagenet64.bench(cfg, cycles=8)            # a GPU to itself is far less noisy than a shared CPU
    per_image = imagenet64.flops_per_iteration(r["net_kwargs"], 1, cfg.dfake_gen_update_ratio, cfg.gan) / 1e12
    out = dict(iterations_per_s=round(r["iterations_per_s"], 3), images_per_s=round(r["images_per_s"], 1),
               peak_gib=peak_gib(device), loop_over_passes=round(r["ratio"], 3), gflop_per_image=round(per_image * 1000, 3),
               full_size_pflop_per_iteration_at_280=round(r["flops"]["after"] / 1e15, 3))
    peak = bf16_peak_tflops()
    if peak:
        out["fraction_of_bf16_peak"] = round(r["images_per_s"] * per_image / peak, 3)
    return out


def part_imagenet64_compile(dry):
    if dry:   # the dry run checks the --compile code path; inductor's C++ build alone would take minutes on a CPU
        import functools

        import torch
        torch.compile = functools.partial(torch.compile, backend="eager")
    return part_imagenet64(dry, compile=True)


def part_imagenet64_finite(dry):
    import imagenet64
    import unet
    device, _ = device_and_sync(dry)
    steps = 10 if dry else 50
    with part_tmpdir() as outdir:
        cfg = imagenet64_config(dry, total_steps=steps, outdir=outdir, ckpt_every=0, sample_every=0, log_every=10)
        reset_peak(device)
        t = time.perf_counter()
        try:
            imagenet64.train(cfg)
            finite = "yes"
        except unet.NonFiniteLoss as e:
            finite = f"no: {e}"
    return dict(iterations=steps, finite=finite, seconds=round(time.perf_counter() - t, 1), peak_gib=peak_gib(device))


def part_sdxl_generate(dry):
    """sdxl.bench_pipelines: prompt embeddings -> image, 4 DMD2 steps + VAE decode, ours and diffusers' pipeline on the
    same random weights (--preset random: SDXL base's shapes)."""
    import torch

    import sdxl
    device, _ = device_and_sync(dry)
    dtype = torch.float32 if dry else torch.bfloat16
    parts = sdxl.load_parts("tiny" if dry else "random", "", device, dtype)
    net = sdxl.build_unet(parts["unet_state"], parts["unet_cfg"], device, dtype, parts["source"])
    del parts["unet_state"]
    try:
        from sdxl_diffusers import diffusers_pipeline
    except ImportError as e:
        diffusers_pipeline, note = None, f"diffusers not installed ({e.name})"
    else:
        note = ""
    size = 64 if dry else 1024
    r = sdxl.bench_pipelines(net, parts["clip_l"], parts["clip_g"], parts["vae"], parts["vae_cfg"], height=size,
                             width=size, steps=4, reps=2 if dry else 5, reference=diffusers_pipeline)
    gib = lambda v: round(v, 2) if math.isfinite(v) else None               # bench_pipelines gives NaN on a CPU
    out = dict(resolution=size, ours_s=round(r["ours"]["median"], 3), ours_peak_gib=gib(r["ours"]["peak_gib"]))
    if "diffusers" in r:
        diff = (r["ours"]["image"] - r["diffusers"]["image"]).abs()                  # [1, 3, H, W], pixels in [0, 1]
        out.update(diffusers_s=round(r["diffusers"]["median"], 3), diffusers_peak_gib=gib(r["diffusers"]["peak_gib"]),
                   latency_ratio=round(r["ours"]["median"] / r["diffusers"]["median"], 3),
                   max_abs_diff=float(f"{diff.max():.3g}"), mean_abs_diff=float(f"{diff.mean():.3g}"),
                   share_over_0_05=float(f"{(diff > 0.05).float().mean():.3g}"))   # a few pixels, or the whole image?
        if IMAGE_DIR:                                   # both images, to look at where they differ
            from PIL import Image
            for who in ("ours", "diffusers"):
                pixels = (r[who]["image"][0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()   # [H, W, 3]
                Image.fromarray(pixels).save(os.path.join(IMAGE_DIR, f"gpu_check_sdxl_{who}.png"))
    if note:
        out["note"] = note
    return out


def write_random_latents(folder, resolution, n=4):
    """A latent shard as `sdxl.py encode` writes it, with random latents: the loop's cost does not depend on them."""
    import torch

    import sdxl
    os.makedirs(folder, exist_ok=True)
    latents = torch.randn(n, 4, resolution // 8, resolution // 8, generator=torch.Generator().manual_seed(0))
    sdxl.write_safetensors(os.path.join(folder, "latents_00000.safetensors"), {"latents": latents.half()},
                           {"captions": json.dumps([f"a photo of thing {i}" for i in range(n)])})


def part_sdxl_train(dry):
    """DMD2 SDXL iterations at batch 1 with the script's own turn functions: one generator iteration (teacher CFG, DM
    and GAN losses, then the fake-score update) and one fake-score-only iteration. The loop's checkpoint writes are
    left out (at full size they are tens of GB)."""
    import torch

    import sdxl
    device, sync = device_and_sync(dry)
    with part_tmpdir() as tmp:
        resolution = 128 if dry else 1024
        write_random_latents(os.path.join(tmp, "latents"), resolution)
        cfg = sdxl.Config(preset="tiny" if dry else "random", latents=os.path.join(tmp, "latents"), outdir=tmp,
                          resolution=resolution, batch_size=1, batch_gpu=1, warmup_steps=0,
                          precision="fp32" if dry else "bf16", device=str(device))
        reset_peak(device)
        try:
            run = sdxl.setup_training(cfg)
            seconds = [sdxl_iteration(run, step, sync) for step in range(3)]   # generator, fake only, generator
        except torch.cuda.OutOfMemoryError as e:
            return dict(fits="no", failed_at_gib=peak_gib(device), error=str(e).splitlines()[0][:200])
        finally:
            if "run" in locals() and run.log is not None:
                run.log.close()
    return dict(fits="yes", generator_iteration_s=round(seconds[2], 2), fake_score_iteration_s=round(seconds[1], 2),
                peak_gib=peak_gib(device))


def sdxl_iteration(run, step, sync):
    import sdxl
    sync()
    t = time.perf_counter()
    run.step = step
    sdxl.set_learning_rates(run, step)
    k = sdxl.shared_step_index(len(run.timesteps), run.cfg.seed, step, run.device)
    batches = [sdxl.draw_micro_batch(run, step, run.rank * run.rounds + r, k) for r in range(run.rounds)]
    fakes, _ = sdxl.generator_turn(run, batches, train_generator=step % 2 == 0)
    sdxl.fake_score_turn(run, batches, fakes)
    sync()
    return time.perf_counter() - t


def part_fid(dry):
    import torch

    import fid
    device, _ = device_and_sync(dry)
    torch.manual_seed(0)
    detector = fid.InceptionV3().eval().requires_grad_(False).to(device)   # random weights: the cost is the same
    batch, num = (4, 8) if dry else (250, 5000)
    reset_peak(device)
    return dict(images_per_s=round(fid.bench(detector, batch=batch, num=num, res=64, device=str(device)), 1),
                batch=batch, peak_gib=peak_gib(device))


def part_toy2d(dry):
    """The toy's default run, as a user types it, with --device cpu and then --device cuda (whole-process wall times;
    one after the other, so that neither takes the other's cores; the CPU run uses the GPU machine's cores)."""
    small = ["--teacher_iters", "20", "--total_steps", "20", "--num_eval", "500", "--eval_every", "10",
             "--workers", "1", "--threads", "1"] if dry else []
    devices = ["cpu"] if dry else ["cpu", "cuda"]          # the CPU first: its figure is kept if CUDA runs over
    out = {}
    with part_tmpdir() as tmp:
        for dev in devices:
            cmd = [sys.executable, os.path.join(ROOT, "toy2d.py"), "--device", dev, "--outdir", os.path.join(tmp, dev),
                   "--quiet", *small]
            t = time.perf_counter()
            code = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL).returncode
            if code != 0:
                raise RuntimeError(f"toy2d.py --device {dev} exited with {code}")
            out[f"{dev}_wall_s"] = round(time.perf_counter() - t, 1)
            keep_partial(out)
            with open(os.path.join(tmp, dev, "metrics.json")) as f:
                metrics = json.load(f)["metrics"]
            out[f"{dev}_1step_tv"] = round(metrics["student_1step"]["weight_tv"], 3)
    if "cuda_wall_s" in out:
        out["faster"] = "cuda" if out["cuda_wall_s"] < out["cpu_wall_s"] else "cpu"
    return out


PARTS = dict(imagenet64=part_imagenet64, imagenet64_compile=part_imagenet64_compile,
             imagenet64_finite=part_imagenet64_finite, sdxl_generate=part_sdxl_generate, sdxl_train=part_sdxl_train,
             fid=part_fid, toy2d=part_toy2d)


# ----------------------------------------------------------------------------------------------------------------
# Running the parts in child processes, each under its cap.

def run_in_group(cmd, timeout):
    """subprocess.run in a process group of its own: on a timeout the whole group is killed, so that what the part
    started (the toy's run and its workers) stops with it. -> CompletedProcess; raises TimeoutExpired."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def run_part(name, dry, cap, image_dir=""):
    """-> (status, figures, seconds). The child writes its figures as JSON; a timeout or a crash is a status."""
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--part", name, "--result", result] + (["--dry-run"] if dry else [])
        cmd += ["--image_dir", image_dir] if image_dir else []
        t = time.perf_counter()
        try:
            proc = run_in_group(cmd, cap)
        except subprocess.TimeoutExpired:
            partial = {}
            if os.path.exists(result + ".partial"):
                with open(result + ".partial") as f:
                    partial = json.load(f)
            return f"skipped: over its {cap} s cap", partial, time.perf_counter() - t
        seconds = time.perf_counter() - t
        if proc.returncode != 0 or not os.path.exists(result):
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            return f"failed (exit {proc.returncode}): {tail[0][:300]}", {}, seconds
        with open(result) as f:
            return "ok", json.load(f), seconds


def environment():
    import torch
    env = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda or "none",
               device=torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)")
    if torch.cuda.is_available():
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1)
    return env


def markdown(env, rows):
    lines = [f"GPU check on {env['device']}, torch {env['torch']}, CUDA {env['cuda']}", "",
             "| part | status | seconds | figures |", "|---|---|---|---|"]
    for name, (status, figures, seconds) in rows.items():
        text = ", ".join(f"{k} {v}" for k, v in figures.items())
        lines.append(f"| {name} | {status} | {seconds:.0f} | {text} |")
    return "\n".join(lines)


def check_args(p, args):
    """Everything that would fail later, refused now, before any part runs or any file is written.
    -> (part names, caps, the JSON's path)"""
    names = [n for n in args.parts.split(",") if n]
    unknown = [n for n in names if n not in PARTS]
    if unknown:
        p.error(f"unknown parts {unknown}; choose from {list(PARTS)}")
    if not names or len(set(names)) < len(names):
        p.error(f"--parts {args.parts!r}: give each part once, at least one, from {list(PARTS)}")
    if args.budget < 1:
        p.error(f"--budget must be at least 1 second, got {args.budget}")
    caps = dict(CAPS)
    for item in args.cap:
        name, _, seconds = item.partition("=")
        if name not in PARTS or not seconds.isdigit() or int(seconds) < 1:
            p.error(f"--cap {item!r}: expected PART=SECONDS with a part from {list(PARTS)} and whole seconds >= 1")
        caps[name] = int(seconds)
    if not args.dry_run:
        import torch
        if not torch.cuda.is_available():                  # before any part runs, and before any file is written
            p.error("no CUDA device: run with --dry-run on a CPU")
    out = args.out or (os.path.join("out", "gpu_check_dry_run.json") if args.dry_run else "gpu_check.json")
    import fid
    try:
        fid.check_dest(out)                                # before minutes of parts, not after
    except ValueError as e:
        p.error(f"--out {e}")
    return names, caps, out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: checks every code path")
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of: " + ", ".join(PARTS))
    p.add_argument("--out", default="", help="where to write the JSON results (default: gpu_check.json; with "
                   "--dry-run out/gpu_check_dry_run.json, so that a dry run never overwrites a GPU run's figures)")
    p.add_argument("--cap", action="append", default=[], metavar="PART=SECONDS",
                   help="a GPU run: another time cap for one part (repeatable), e.g. imagenet64_compile=240 on a "
                   "slower GPU")
    p.add_argument("--budget", type=int, default=TOTAL_BUDGET,
                   help=f"a GPU run: seconds for the whole check (default {TOTAL_BUDGET}; the dry run caps each "
                   f"part at {DRY_CAP} s)")
    p.add_argument("--part", help=argparse.SUPPRESS)      # internal: run one part in this process
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--image_dir", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.part:                                          # child process: one part, figures to --result
        if args.dry_run:                                   # tiny tensors: one thread is fastest and least noisy
            import torch
            torch.set_num_threads(1)
        global PARTIAL, IMAGE_DIR
        PARTIAL, IMAGE_DIR = args.result + ".partial", args.image_dir
        figures = PARTS[args.part](args.dry_run)
        with open(args.result, "w") as f:
            json.dump(figures, f)
        return 0
    names, caps, out = check_args(p, args)
    env, rows, start = environment(), {}, time.perf_counter()
    for name in names:
        left = int(args.budget - (time.perf_counter() - start))
        if not args.dry_run and left < 5:
            rows[name] = ("skipped: the whole check's time budget is spent", {}, 0.0)
        else:
            rows[name] = run_part(name, args.dry_run, DRY_CAP if args.dry_run else min(caps[name], left),
                                  os.path.dirname(os.path.abspath(out)))
        print(f"{name}: {rows[name][0]} ({rows[name][2]:.0f} s) {rows[name][1]}", flush=True)
    env["total_seconds"] = round(time.perf_counter() - start, 1)
    table = markdown(env, rows)
    print("\n" + table)
    with open(out, "w") as f:
        json.dump(dict(environment=env, dry_run=args.dry_run, parts={n: dict(fig, status=s, wall_s=round(t, 1))
                                                                     for n, (s, fig, t) in rows.items()}), f, indent=1)
    failed = [n for n, (s, _, _) in rows.items() if s.startswith("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
