"""Trials behind README's toy2d figures that one `python toy2d.py` run does not give: each seed's students trained
again on that seed's teacher, with other student seeds or other options, and scored on many samples against the
mixture itself (run from the repository root; CPU):

    python tests/toy_trials.py defaults --seeds 0-9 --row 1 --students 4                    # one "set" (README)
    python tests/toy_trials.py lognormal50 --seeds 0-9 --row 1 --students 4 fake_score_lognormal=0.5
    python tests/toy_trials.py center --seeds 6,123 --students 1,4 center_data=true

NAME=VALUE arguments are toy2d.py's options (`python toy2d.py --help`). Each seed's teacher is trained once, with
toy2d's defaults and the options given, on --teacher_threads threads, and kept in --cache for every later trial with
the same teacher options. Each student trains in a worker process on one thread, with the student seed
`toy2d.student_seed(seed, steps, row)`: row 0 gives the student seeds of `python toy2d.py --seed S`, and each other
row another set of student seeds. Ten 4-step students take 3 to 4 minutes on 2 cores once their
teachers are cached.

Each student's record, one JSON line printed and appended to --outdir/NAME.jsonl:
  exact     the exact energy distance of its first 20,000 samples (toy2d.energy_to_mixture), in 1e-4
  weights   the mode weights' part of it (toy2d.weight_part), on all --num samples, in 1e-4
  shape     the mode shape KL averaged over the modes, and shape_worst, its worst mode; tv: the weight TV
  dw        each mode's share minus its weight, in 1e-3 (modes in toy2d.make_mixture's order: the k-th at 45k degrees)
  dw_steps  K-step students: dw of the x0 that each step predicts on its backward-simulation input (the same --num)
The teacher of each seed is scored the same way, and its record adds mean_shortfall: at sigma = 20, 40 and 70, by
how much its average denoised value E[D(x_sigma; sigma)] falls short of the mixture's mean along the mean's direction,
as a fraction of the mean's length (by Tweedie's formula the exact denoiser's average is the mean itself; EDM's
preconditioning assumes data of mean 0, and the ring's is not: README). Last, a summary per student: mean, median and
worst over the seeds.
Not a test: the figures are the trials' own; a run repeats bit for bit on the same machine.
"""
import argparse
import concurrent.futures
import dataclasses
import hashlib
import json
import multiprocessing
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import toy2d  # noqa: E402

# The options that change a teacher: a cached teacher is reused only when all of them are equal.
TEACHER_FIELDS = ("dataset", "sigma_min", "sigma_max", "rho", "width", "depth", "noise_freq_max", "center_data",
                  "x_features", "x_feature_scale", "x_feature_sigma", "teacher_iters", "teacher_batch",
                  "teacher_grid_batch", "teacher_lr")
EVAL_SEED = 777            # the generator of the evaluation's latents and chain noise: the same for every trial
EXACT_N = 20_000           # samples in the exact energy distance (its E|X - X'| is quadratic in N)


def parse_seeds(text):
    """'0-9' or '6,123' or '0-2,6' -> a list of ints."""
    seeds = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        seeds += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    return seeds


def parse_options(pairs):
    """['fake_score_lognormal=0.5', 'center_data=true'] -> {name: value}, typed as toy2d.Config's fields."""
    kinds = {f.name: type(f.default) for f in dataclasses.fields(toy2d.Config)}
    options = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or name not in kinds:
            raise SystemExit(f"toy_trials.py: {pair!r} is not NAME=VALUE with NAME one of toy2d.py's options")
        options[name] = toy2d.parse_bool(value) if kinds[name] is bool else kinds[name](value)
    return options


def cache_path(cache, kind, key, ext):
    """The cache file of `kind` for a key (the JSON text of what made it); the file holds the key too, and is used
    only when it matches."""
    return os.path.join(cache, f"{kind}_{hashlib.sha256(key.encode()).hexdigest()[:16]}{ext}")


def teacher_state(cfg, cache, threads):
    """The seed's teacher (a state_dict), trained as `python toy2d.py` trains it, or read back from the cache."""
    key = json.dumps({f: getattr(cfg, f) for f in TEACHER_FIELDS} | {"seed": cfg.seed, "threads": threads},
                     sort_keys=True)
    path = cache_path(cache, "teacher", key, ".pt")
    if os.path.exists(path):
        saved = torch.load(path, weights_only=True)
        if saved["key"] == key:
            return saved["state"]
    toy2d.setup(dataclasses.replace(cfg, threads=threads))
    mix = toy2d.make_mixture(cfg.dataset)
    state = {k: v.cpu() for k, v in toy2d.train_teacher(cfg, mix, torch.device("cpu"), False).state_dict().items()}
    os.makedirs(cache, exist_ok=True)
    torch.save({"key": key, "state": state}, path + ".tmp")
    os.replace(path + ".tmp", path)                       # atomic: a half-written teacher is never read back
    return state


@torch.no_grad()
def score(mix, x):
    """The record's figures for samples x [N, 2] (the module docstring)."""
    M = toy2d.mode_distances(mix)
    assign, _ = toy2d.nearest_mode(mix, x)
    found = toy2d.mode_shares(mix, assign).double()
    d = found - mix.weights.double()
    xs = x[:EXACT_N]
    exact = toy2d.energy_to_mixture(mix, xs, toy2d.self_distances(xs)[0], M)
    shape = toy2d.mode_shape_kl(mix, x, assign)
    return dict(exact=round(1e4 * exact, 3), weights=round(1e4 * toy2d.weight_part(mix, found, M), 3),
                shape=round(float(shape.mean()), 4), shape_worst=round(float(shape.max()), 4),
                tv=round(float(0.5 * d.abs().sum()), 4), dw=[round(1000 * v, 1) for v in d.tolist()])


@torch.no_grad()
def sample_student(cfg, mix, state, sigmas, n):
    """n samples [n, 2] of the student whose generator state is `state`, drawn as toy2d.generate draws them (latents and
    chain noise from EVAL_SEED), and for a K-step student dw_steps (the module docstring); None for a 1-step one."""
    G = toy2d.make_denoiser(cfg, mix)
    extra = state.get("extra.weight")
    if extra is not None:                                 # the 1-step student's generator features (toy2d.py)
        G.add_input_features(extra.shape[1] // 2, cfg.x_feature_scale)
    G.load_state_dict(state)
    G.eval().requires_grad_(False)
    g = torch.Generator().manual_seed(EVAL_SEED)
    z = torch.randn(n, 2, generator=g)
    x = toy2d.generate(G, z, sigmas, generator=g).float()
    if len(sigmas) == 1:
        return x, None
    dw_steps = []
    for k, sigma in enumerate(sigmas):                   # each step's own x0, as toy2d.per_step_metrics makes them
        x0 = G(toy2d.backward_simulation(G, z, sigmas, k, generator=g), sigma).float()
        d = toy2d.mode_shares(mix, toy2d.nearest_mode(mix, x0)[0]).double() - mix.weights.double()
        dw_steps.append([round(1000 * v, 1) for v in d.tolist()])
    return x, dw_steps


def load_teacher(cfg, mix, state):
    """The teacher's Denoiser from its state_dict, frozen."""
    D = toy2d.make_denoiser(cfg, mix)
    D.load_state_dict(state)
    return D.eval().requires_grad_(False)


@torch.no_grad()
def sample_teacher(cfg, D, n):
    """n teacher samples [n, 2]: EDM's Heun sampler, as toy2d.py samples its teacher, from latents of EVAL_SEED."""
    z = torch.randn(n, 2, generator=torch.Generator().manual_seed(EVAL_SEED))
    return toy2d.heun_sampler(D, z, cfg.heun_steps, cfg.sigma_min, cfg.sigma_max, cfg.rho).float()


@torch.no_grad()
def mean_shortfall(D, mix, n, sigmas=(20.0, 40.0, 70.0)):
    """1 - <E[D(x; sigma)], mu> / |mu|^2 for x = x0 + sigma n, x0 ~ the mixture, at each sigma (the docstring)."""
    g = torch.Generator().manual_seed(EVAL_SEED)
    mu = toy2d.mixture_mean(mix).double()                                                    # [2]
    out = []
    for sigma in sigmas:
        x = toy2d.sample_mixture(mix, n, generator=g) + sigma * torch.randn(n, 2, generator=g)  # [n, 2]
        m = D(x, sigma).double().mean(0)                                                     # [2]
        out.append(round(float(1 - (m @ mu) / (mu @ mu)), 4))
    return out


def teacher_scores(cfg, mix, state, a):
    """The teacher's part of its record, computed once per cached teacher and --num (every trial shares them)."""
    key = json.dumps({f: getattr(cfg, f) for f in TEACHER_FIELDS + ("heun_steps",)} |
                     {"seed": cfg.seed, "threads": a.teacher_threads, "num": a.num}, sort_keys=True)
    path = cache_path(a.cache, "scores", key, ".json")
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if saved.get("key") == key:
            return saved["scores"]
    D = load_teacher(cfg, mix, state)
    scores = score(mix, sample_teacher(cfg, D, a.num)) | dict(mean_shortfall=mean_shortfall(D, mix, a.num))
    with open(path + ".tmp", "w") as f:
        json.dump({"key": key, "scores": scores}, f)
    os.replace(path + ".tmp", path)
    return scores


def summary(records):
    """Per row of the table: mean, median and worst exact distance over the seeds, and the worst shape KL and TV."""
    lines = []
    for who in sorted({r["student"] for r in records}):
        rs = [r for r in records if r["student"] == who]
        ex = [r["exact"] for r in rs]
        lines.append(f"{who}: {len(rs)} seeds; exact energy distance (1e-4) mean {statistics.mean(ex):.2f}, median "
                     f"{statistics.median(ex):.2f}, worst {max(ex):.2f} (seed {rs[ex.index(max(ex))]['seed']}); "
                     f"weights' part mean {statistics.mean(r['weights'] for r in rs):.2f}; worst shape KL "
                     f"{max(r['shape'] for r in rs):.4f}, worst TV {max(r['tv'] for r in rs):.4f}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", help="the trial's name: its records go to OUTDIR/NAME.jsonl")
    p.add_argument("options", nargs="*", help="toy2d.py options as NAME=VALUE")
    p.add_argument("--seeds", default="0-9", help="run seeds: '0-9', '6,123'")
    p.add_argument("--row", type=int, default=1, help="set of student seeds (0: python toy2d.py's own)")
    p.add_argument("--students", default="1,4", help="which students, by steps: 1, the K-step (ksteps), or both")
    p.add_argument("--num", type=int, default=100_000, help="samples per student (the exact distance uses 20,000)")
    p.add_argument("--workers", type=int, default=2, help="student processes, one thread each")
    p.add_argument("--teacher_threads", type=int, default=2, help="threads of each teacher's training")
    p.add_argument("--outdir", default="out/toy_trials")
    p.add_argument("--cache", default="out/toy_trials/teachers")
    a = p.parse_intermixed_args(argv)
    options = parse_options(a.options)
    cfg0 = toy2d.Config(quiet=True, **options)
    toy2d.check_config(cfg0)
    steps = [int(s) for s in a.students.split(",")]
    if any(s not in (1, cfg0.ksteps) for s in steps) or a.num < EXACT_N:
        raise SystemExit(f"toy_trials.py: --students takes 1 and {cfg0.ksteps} (ksteps); --num at least {EXACT_N}")
    mix = toy2d.make_mixture(cfg0.dataset)
    os.makedirs(a.outdir, exist_ok=True)
    records, threads = [], torch.get_num_threads()
    try:
        trials(a, options, cfg0, steps, mix, records)
    finally:
        torch.set_num_threads(threads)                    # setup() and the teachers' training change it
    print(summary(records))
    return records


def trials(a, options, cfg0, steps, mix, records):
    """Teachers in this process, students in workers, records as they come: main()'s work."""
    with open(os.path.join(a.outdir, f"{a.name}.jsonl"), "a") as out, concurrent.futures.ProcessPoolExecutor(
            a.workers, multiprocessing.get_context("spawn"), initializer=torch.set_num_threads, initargs=(1,)) as pool:
        def record(r):
            print(json.dumps(r), flush=True)
            out.write(json.dumps(r) + "\n")
            out.flush()
            records.append(r)
        jobs = []
        for seed in parse_seeds(a.seeds):
            cfg = dataclasses.replace(cfg0, seed=seed)
            state = teacher_state(cfg, a.cache, a.teacher_threads)
            for s in steps:
                sigmas = [cfg.one_step_sigma] if s == 1 else toy2d.parse_sigmas(cfg.kstep_sigmas)
                job = pool.submit(toy2d.student_job, cfg=cfg, mix=mix, teacher_state=state, sigmas=sigmas,
                                  seed=toy2d.student_seed(seed, s, a.row), progress=False)
                jobs.append((cfg, s, sigmas, job))
            torch.set_num_threads(a.teacher_threads)
            base = dict(name=a.name, seed=seed, row=a.row, options=options)
            record(base | dict(student="teacher") | teacher_scores(cfg, mix, state, a))
        for cfg, s, sigmas, job in jobs:
            x, dw_steps = sample_student(cfg, mix, job.result()[0], sigmas, a.num)
            base = dict(name=a.name, seed=cfg.seed, row=a.row, options=options)
            record(base | dict(student=f"{s}-step") | score(mix, x) | ({} if dw_steps is None else
                                                                        dict(dw_steps=dw_steps)))


if __name__ == "__main__":
    main()
