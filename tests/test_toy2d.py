"""Tests of toy2d.py: the closed-form pieces against independent computations, each DMD2 ingredient
on its own, and a short end-to-end run with quality thresholds."""
import copy
import dataclasses
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn as nn

import toy2d


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


# ---- the mixture and its exact denoiser ------------------------------------------------------


@pytest.mark.parametrize("name", ["ring", "grid"])
def test_mixture_definition(name):
    mix = toy2d.make_mixture(name)
    K = {"ring": 8, "grid": 25}[name]
    assert mix.means.shape == (K, 2) and mix.stds.shape == (K,) and mix.weights.shape == (K,)
    assert torch.isclose(mix.weights.sum(), torch.tensor(1.0))
    assert float(mix.weights.max() / mix.weights.min()) == pytest.approx(4.0, rel=1e-5)  # weights differ 4x
    # Sampling follows the weights (binomial 5-sigma band on 200k draws).
    x = toy2d.sample_mixture(mix, 200_000, generator=torch.Generator().manual_seed(0))
    d = torch.cdist(x, mix.means).argmin(1)
    found = torch.bincount(d, minlength=K).double() / len(x)
    assert (found - mix.weights.double()).abs().max() < 5 * math.sqrt(0.25 / len(x)) + 1e-3


def test_exact_denoiser_matches_monte_carlo():
    """E[x0 | x0 + sigma*eps = x] estimated by self-normalised importance sampling from the prior."""
    mix = toy2d.make_mixture("ring")
    g = torch.Generator().manual_seed(1)
    x0 = toy2d.sample_mixture(mix, 400_000, generator=g).double()                          # [N, 2]
    points = torch.tensor([[0.0, 0.0], [2.0, 0.3], [1.0, 1.0], [-1.5, 0.2], [0.3, -2.4]], dtype=torch.float64)
    for sigma in [0.3, 1.0, 3.0]:
        logw = -((points[:, None] - x0[None]) ** 2).sum(-1) / (2 * sigma**2)                 # [P, N]
        w = torch.softmax(logw, dim=1)
        mc = w @ x0                                                                          # [P, 2]
        ess = 1 / (w**2).sum(1)                                                              # effective sample size
        exact = toy2d.exact_denoiser(mix, points.float(), sigma).double()
        tol = 6 * x0.std() / ess.sqrt()[:, None] + 1e-3
        assert ((mc - exact).abs() < tol).all(), (sigma, mc, exact, tol)


def test_exact_denoiser_is_tweedie_of_exact_log_density():
    """D(x; sigma) = x + sigma^2 grad log p_sigma(x), with the gradient from autograd of the log density."""
    mix = toy2d.make_mixture("grid")
    x = (torch.randn(64, 2) * 2).requires_grad_(True)
    for sigma in [0.01, 0.2, 1.0, 10.0]:
        (score,) = torch.autograd.grad(toy2d.mixture_log_prob(mix, x, sigma).sum(), x)
        expected = x + sigma**2 * score
        assert torch.allclose(toy2d.exact_denoiser(mix, x.detach(), sigma), expected, atol=2e-4 * (1 + sigma))


def test_karras_grid_and_sigma_range():
    grid = toy2d.sigma_grid(1000, 0.002, 80.0, 7.0)
    assert grid[0] == pytest.approx(0.002) and grid[-1] == pytest.approx(80.0)
    assert (grid[1:] > grid[:-1]).all()
    # The DM gradient's range, grid indices 20..980 (dmd2.md lists sigma 0.00323 and 72.1 there).
    assert grid[20] == pytest.approx(0.00323, rel=2e-2) and grid[980] == pytest.approx(72.1, rel=1e-2)
    assert toy2d.dm_index_range(toy2d.Config()) == (20, 980)
    # --max_step_percent 1 (allowed) reaches the grid's last index, not one past it, as DMD2's code clamps it.
    lo, hi = toy2d.dm_index_range(toy2d.Config(min_step_percent=0.0, max_step_percent=1.0))
    assert (lo, hi) == (0, 999)
    torch.manual_seed(0)
    x = torch.randn(20000, 2, requires_grad=True)
    seen = []
    D = lambda x_t, sigma: seen.append(sigma) or x_t                                   # noqa: E731
    toy2d.loss_distribution_matching(x, D, D, grid, lo, hi)
    assert torch.isin(seen[0], grid[999]).any() and torch.isin(seen[0], grid[0]).any()


# ---- the four DMD2 ingredients ---------------------------------------------------------------


def gaussian_denoiser(mean, sigma_data=1.0):
    """Exact denoiser of N(mean, I) in 2D: D(x; sigma) = (x + sigma^2 mean) / (1 + sigma^2)."""
    def D(x, sigma, features=False):
        s2 = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1) ** 2
        return (x + s2 * torch.as_tensor(mean, dtype=x.dtype)) / (1 + s2)
    return D


def test_dm_gradient_sign_and_scale():
    """Real N(0, I) and fake N(m, I): x0_fake - x0_real = sigma^2 m / (1 + sigma^2) for every x_t,
    so the normalised grad is known in closed form, and descending the surrogate moves x toward the real mean."""
    m = torch.tensor([1.5, -0.5])
    grid = toy2d.sigma_grid(1000, 0.002, 80.0, 7.0)
    torch.manual_seed(0)
    x = (torch.randn(256, 2) + m).requires_grad_(True)       # generator samples, currently around m
    torch.manual_seed(1)
    real, fake = gaussian_denoiser(torch.zeros(2)), gaussian_denoiser(m)
    loss, grad = toy2d.loss_distribution_matching(x, real, fake, grid, 20, 980)
    # Recompute with the same sigmas and noise: grad * mean|x - D_real| must equal sigma^2 m / (1 + sigma^2).
    torch.manual_seed(1)
    idx = torch.randint(20, 981, (256,))
    sigma = grid[idx].unsqueeze(1)
    x_t = x.detach() + sigma * torch.randn(256, 2)
    w = (x.detach() - gaussian_denoiser(torch.zeros(2))(x_t, sigma)).abs().mean(1, keepdim=True)
    assert torch.allclose(grad * w, sigma**2 * m / (1 + sigma**2), atol=1e-5)
    # The surrogate's autograd gradient is grad / numel(x): DMD2's "mean" reduction.
    loss.backward()
    assert torch.allclose(x.grad, grad / x.numel(), atol=1e-9)
    # Sign: a gradient-descent step moves every sample toward the real mean (0), i.e. along -m.
    assert ((x.grad @ m) > 0).all()
    # Identical real and fake scores give no gradient at all.
    _, zero = toy2d.loss_distribution_matching(x.detach(), gaussian_denoiser(m), gaussian_denoiser(m), grid, 20, 980)
    assert zero.abs().max() == 0


def test_fake_score_loss_goes_down():
    """The critic learns the distribution of (fixed) generator samples: its loss on fixed noise falls, and
    it approaches the exact denoiser of that distribution (here a shifted ring, known in closed form)."""
    torch.manual_seed(0)
    fake_mix = toy2d.make_mixture("ring")
    fake_mix.means = fake_mix.means + torch.tensor([0.5, -0.3])
    fake_score = toy2d.Denoiser(toy2d.mixture_std(fake_mix), width=64, depth=2)
    opt = torch.optim.Adam(fake_score.parameters(), lr=3e-3)
    grid = toy2d.sigma_grid(1000, 0.002, 80.0, 7.0)
    x_eval = toy2d.sample_mixture(fake_mix, 4096)
    sig_eval = grid[torch.randint(300, 900, (4096,))].unsqueeze(1)        # sigma ~ 0.05..20
    x_t = x_eval + sig_eval * torch.randn(4096, 2)
    weight = 1 / sig_eval**2 + 1 / fake_score.sigma_data**2

    def fixed_noise_loss_and_error():
        with torch.no_grad():
            D = fake_score(x_t, sig_eval)
            loss = (weight * (D - x_eval) ** 2).mean()
            error = (weight * (D - toy2d.exact_denoiser(fake_mix, x_t, sig_eval)) ** 2).mean()
        return loss.item(), error.item()

    loss0, err0 = fixed_noise_loss_and_error()
    for _ in range(300):
        loss, _, _ = toy2d.loss_fake_score(fake_score, toy2d.sample_mixture(fake_mix, 512), grid)
        opt.zero_grad()
        loss.backward()
        opt.step()
    loss1, err1 = fixed_noise_loss_and_error()
    assert loss1 < loss0 and err1 < err0 / 2, (loss0, loss1, err0, err1)


def test_gan_losses_and_head():
    """The discriminator loss is log 4 at chance and falls when the head separates real from fake."""
    assert toy2d.loss_gan_discriminator(torch.zeros(8), torch.zeros(8)).item() == pytest.approx(2 * math.log(2))
    assert toy2d.loss_gan_generator(torch.zeros(8)).item() == pytest.approx(math.log(2))
    torch.manual_seed(0)
    mix = toy2d.make_mixture("ring")
    fake_score = toy2d.Denoiser(toy2d.mixture_std(mix), width=64, depth=2)
    gan_head = toy2d.make_gan_head(64)
    opt = torch.optim.Adam([*fake_score.parameters(), *gan_head.parameters()], lr=3e-3)
    grid = toy2d.sigma_grid(1000, 0.002, 80.0, 7.0)[:500]     # sigma <= ~1: the two sets stay distinguishable
    losses = []
    for _ in range(200):
        real = toy2d.sample_mixture(mix, 256)
        fake = 0.3 * torch.randn(256, 2)                           # a collapsed "generator" at the origin
        loss = toy2d.loss_gan_discriminator(toy2d.gan_logits(fake_score, gan_head, real, grid),
                                            toy2d.gan_logits(fake_score, gan_head, fake, grid))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-20:]) < 0.5 * 2 * math.log(2)


class Recorder(torch.nn.Module):
    """A stand-in generator that records the sigma of each call and returns a constant x0."""

    def __init__(self, value):
        super().__init__()
        self.value, self.calls = value, []

    def forward(self, x, sigma):
        self.calls.append(float(sigma))
        return torch.full_like(x, self.value)


def test_fake_score_that_knows_the_step_starts_as_the_teacher():
    """--fake_score_knows_step adds one learned vector per step, zero at first: the fake score starts as the
    teacher for every step, and a trained vector changes only its own step's output."""
    torch.manual_seed(0)
    teacher = toy2d.Denoiser(1.0, width=32, depth=2)
    fake_score = copy.deepcopy(teacher)
    fake_score.add_steps(4)
    x, sigma = torch.randn(64, 2), torch.rand(64) + 0.1
    for k in range(4):
        fake_score.step = k
        assert torch.equal(fake_score(x, sigma), teacher(x, sigma))
    with torch.no_grad():
        fake_score.step_emb[2] += 1.0
    fake_score.step = 1
    assert torch.equal(fake_score(x, sigma), teacher(x, sigma))
    fake_score.step = 2
    assert not torch.allclose(fake_score(x, sigma), teacher(x, sigma))


def test_a_gan_head_per_step():
    """--gan_head_per_step: the K-step student gets K GAN heads, the loop's step picks one, and a discriminator update
    trains that head alone; the 1-step student keeps one head."""
    cfg = toy2d.Config(width=32, depth=2, gan_head_per_step=True)
    torch.manual_seed(0)
    teacher = toy2d.Denoiser(1.0, width=32, depth=2).requires_grad_(False)
    t = toy2d.make_trainables(cfg, teacher, torch.device("cpu"), ksteps=4)
    assert isinstance(t.gan_head, toy2d.StepHeads) and len(t.gan_head) == 4
    before = copy.deepcopy(t.gan_head.state_dict())
    t.fake_score.step = t.gan_head.step = 2
    toy2d.fake_score_turn(cfg, t, torch.randn(32, 2), torch.randn(32, 2))
    changed = {k.split(".")[0] for k, v in t.gan_head.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"2"}
    h = torch.randn(8, 32)
    assert torch.equal(t.gan_head(h), t.gan_head[2](h)) and not torch.equal(t.gan_head(h), t.gan_head[1](h))
    assert isinstance(toy2d.make_trainables(cfg, teacher, torch.device("cpu"), ksteps=1).gan_head, nn.Sequential)


def test_one_step_student_gets_extra_features_and_still_starts_as_the_teacher():
    """--one_step_fake_features and --one_step_generator_features: only the 1-step student's fake score and generator
    get them, each its own draw of frequencies; their first-layer weights start at zero (each network equals the
    teacher at every sigma), the optimisers train them, and they act at small sigma, where the input features of the
    teacher's architecture are faded out. Adding them draws nothing from the global RNG."""
    cfg = toy2d.Config(width=32, depth=2, x_features=4, one_step_fake_features=8, one_step_generator_features=6)
    torch.manual_seed(0)
    teacher = toy2d.Denoiser(1.0, width=32, depth=2, x_features=4).requires_grad_(False)
    t1 = toy2d.make_trainables(cfg, teacher, torch.device("cpu"), ksteps=1)
    t4 = toy2d.make_trainables(cfg, teacher, torch.device("cpu"), ksteps=4)
    assert t4.fake_score.extra is None and t4.G.extra is None
    assert t1.fake_score.extra_freqs.shape == (2, 8) and t1.G.extra_freqs.shape == (2, 6)
    assert not torch.allclose(t1.fake_score.extra_freqs[:, :6], t1.G.extra_freqs)            # two different draws
    x = torch.randn(64, 2)
    for net, opt in ((t1.fake_score, t1.opt_fake), (t1.G, t1.opt_G)):
        for sigma in (0.01, 0.3, 2.5, 40.0):
            assert torch.equal(net(x, sigma), teacher(x, sigma))
        trained = {id(p) for group in opt.param_groups for p in group["params"]}
        assert id(net.extra.weight) in trained
        before = teacher(x, 0.01)
        with torch.no_grad():
            net.extra.weight += 0.1
        assert not torch.allclose(net(x, 0.01), before)
    torch.manual_seed(0)
    toy2d.Denoiser(1.0, width=32, depth=2, x_features=4).add_input_features(8, 10.0)
    after = torch.rand(3)
    torch.manual_seed(0)
    toy2d.Denoiser(1.0, width=32, depth=2, x_features=4)
    assert torch.equal(torch.rand(3), after)                      # the features' zeroed weights drew no numbers
    for name in ("one_step_fake_features", "one_step_generator_features"):
        with pytest.raises(SystemExit, match=f"--{name} must be 0 or more"):
            toy2d.main([f"--{name}", "-1"])


def test_backward_simulation_feeds_the_right_sigmas():
    sigmas = [80.0, 1.5, 0.5, 0.15]
    z = torch.randn(20_000, 2)
    for k in range(4):
        G = Recorder(0.7)
        x_k = toy2d.backward_simulation(G, z, sigmas, k)
        assert G.calls == sigmas[:k]                                   # the chain runs steps 0..k-1, as at inference
        if k == 0:
            assert torch.equal(x_k, sigmas[0] * z)                     # step 0 sees pure noise
        else:                                                          # re-noised last x0: mean 0.7, std sigma_k
            assert x_k.mean().item() == pytest.approx(0.7, abs=0.02 * sigmas[k] + 1e-3)
            assert x_k.std().item() == pytest.approx(sigmas[k], rel=0.03)
    # generate() is the same chain run to the end.
    G = Recorder(0.7)
    assert torch.equal(toy2d.generate(G, z[:4], sigmas), torch.full((4, 2), 0.7)) and G.calls == sigmas


def test_distill_trains_kstep_generator_on_backward_simulated_inputs(monkeypatch):
    """Inside the training loop, each generator call is at sigma_k with the input from backward simulation."""
    seen = []
    real_bs = toy2d.backward_simulation

    def spy(G, z, sigmas, k, generator=None):
        x = real_bs(G, z, sigmas, k, generator)
        seen.append(k)
        return x

    monkeypatch.setattr(toy2d, "backward_simulation", spy)
    cfg = toy2d.Config(width=32, depth=2, total_steps=12, batch_size=64, eval_every=1000, quiet=True)
    mix = toy2d.make_mixture("ring")
    teacher = toy2d.Denoiser(toy2d.mixture_std(mix), 32, 2)
    torch.manual_seed(0)
    toy2d.distill(cfg, mix, teacher, teacher, [80.0, 1.5, 0.5, 0.15], torch.device("cpu"), progress=False)
    assert len(seen) == 12 and set(seen) <= {0, 1, 2, 3} and len(set(seen)) > 1


def test_distill_alternates_generator_and_fake_score_turns(monkeypatch):
    """Algorithm 1 with TTUR: a fake-score turn every iteration, a generator turn before it every
    dfake_gen_update_ratio-th iteration on generator_batch_size samples, and the fake score learns from the first
    batch_size of that turn's own samples."""
    calls = []
    real_gen, real_fake = toy2d.generator_turn, toy2d.fake_score_turn

    def gen_spy(cfg, t, D_real, x_in, sigma_k):
        x, log = real_gen(cfg, t, D_real, x_in, sigma_k)
        calls.append(("G", x))
        return x, log

    def fake_spy(cfg, t, x_fake, x_real):
        calls.append(("fake", x_fake))
        return real_fake(cfg, t, x_fake, x_real)

    monkeypatch.setattr(toy2d, "generator_turn", gen_spy)
    monkeypatch.setattr(toy2d, "fake_score_turn", fake_spy)
    cfg = toy2d.Config(width=32, depth=2, total_steps=11, batch_size=64, generator_batch_size=96, eval_every=1000,
                       dfake_gen_update_ratio=5, quiet=True, one_step_steps_ratio=1.0)
    mix = toy2d.make_mixture("ring")
    teacher = toy2d.Denoiser(toy2d.mixture_std(mix), 32, 2)
    torch.manual_seed(0)
    toy2d.distill(cfg, mix, teacher, teacher, [80.0], torch.device("cpu"), progress=False)
    kinds = [kind for kind, _ in calls]
    assert kinds == ["G", "fake"] + ["fake"] * 4 + ["G", "fake"] + ["fake"] * 4 + ["G", "fake"]
    for i, (kind, x) in enumerate(calls):
        if kind == "G":
            assert x.shape == (96, 2) and calls[i + 1][1].shape == (64, 2)
            assert calls[i + 1][1].data_ptr() == x.data_ptr()  # the same detached samples, not a fresh draw
        else:
            assert x.shape == (64, 2)


def test_generator_turn_takes_another_dm_objective_and_keeps_the_rest_of_the_turn():
    """generator_turn(..., dm_objective=f) uses f(x) where DMD2's DM loss would be (the neighbours notebook's other
    objectives): given DMD2's own loss it makes the same update bit for bit; another objective makes another update
    and still adds the GAN generator loss; the fake score and the GAN head take no gradient and stay trainable."""
    cfg = toy2d.Config(width=32, depth=2, x_features=0, one_step_fake_features=0, one_step_generator_features=0)
    torch.manual_seed(0)
    teacher = toy2d.Denoiser(1.0, width=32, depth=2, x_features=0).requires_grad_(False)
    x_in = 2.5 * torch.randn(128, 2)

    def turn(dm_objective=None, gan_weight=2.0):
        torch.manual_seed(1)
        t = toy2d.make_trainables(cfg, teacher, torch.device("cpu"))
        objective = None if dm_objective is None else (lambda x: dm_objective(x, t))
        c = dataclasses.replace(cfg, gen_gan_weight=gan_weight)
        x, log = toy2d.generator_turn(c, t, teacher, x_in, 2.5, dm_objective=objective)
        assert all(p.requires_grad and p.grad is None for p in [*t.fake_score.parameters(), *t.gan_head.parameters()])
        return torch.cat([p.detach().flatten() for p in t.G.parameters()]), log

    dmd2 = lambda x, t: toy2d.loss_distribution_matching(x, teacher, t.fake_score, t.sigma_grid, *t.dm_range)[0]
    pull = lambda x, t: 0.5 * (x - 1.0).pow(2).mean()                  # pulls every sample towards (1, 1)
    default, log = turn()
    assert torch.equal(turn(dmd2)[0], default)
    other, other_log = turn(pull)
    assert not torch.allclose(other, default) and other_log["loss_dm"] != log["loss_dm"]
    assert "loss_g_gan" in other_log and not torch.equal(turn(pull, gan_weight=0.0)[0], other)


def test_generator_batch_size_zero_is_the_fake_score_batch_and_more_changes_training():
    """--generator_batch_size 0 (the default) and --generator_batch_size equal to --batch_size train the same
    generator bit for bit (the paper's one batch); a larger generator batch trains a different one."""
    mix = toy2d.make_mixture("ring")
    torch.manual_seed(0)
    teacher = toy2d.Denoiser(toy2d.mixture_std(mix), 32, 2)
    z = torch.randn(16, 2, generator=torch.Generator().manual_seed(2)) * 2.5
    outs = []
    for n in (0, 64, 128):
        cfg = toy2d.Config(width=32, depth=2, total_steps=11, batch_size=64, generator_batch_size=n,
                           eval_every=1000, quiet=True)
        torch.manual_seed(1)
        G, _ = toy2d.distill(cfg, mix, teacher, teacher, [2.5], torch.device("cpu"), progress=False)
        outs.append(G(z, 2.5))
    assert torch.equal(outs[0], outs[1])
    assert not torch.allclose(outs[0], outs[2])


def test_kstep_student_takes_its_own_batches_fake_score_lr_and_ema_span(monkeypatch):
    """--kstep_batch_size, --kstep_generator_batch_size, --kstep_fake_score_lr and --kstep_ema_span act on the K-step
    student alone: its fake-score turns see that batch, its generator turns at least that many samples, its fake score
    (and GAN head) trains at that rate, cosine-decayed like the generator's, and 0 (negative for the EMA span) gives
    it the 1-step student's settings. The 1-step student keeps --batch_size, --generator_batch_size, --fake_score_lr
    and --ema_span."""
    cfg = toy2d.Config(batch_size=64, generator_batch_size=0, kstep_generator_batch_size=96, kstep_fake_score_lr=3e-3,
                       kstep_batch_size=48, ema_span=0.2, kstep_ema_span=0.4, one_step_steps_ratio=1.0)

    def settings(c):
        return c.batch_size, c.generator_batch_size or c.batch_size, c.fake_score_lr, c.ema_span

    assert settings(toy2d.student_config(cfg, 1)) == (64, 64, cfg.fake_score_lr, 0.2)
    assert settings(toy2d.student_config(cfg, 4)) == (48, 96, 3e-3, 0.4)
    off = dataclasses.replace(cfg, generator_batch_size=80, kstep_generator_batch_size=0, kstep_fake_score_lr=0,
                              kstep_batch_size=0, kstep_ema_span=-1)
    assert settings(toy2d.student_config(off, 4)) == settings(toy2d.student_config(off, 1)) == \
        (64, 80, off.fake_score_lr, 0.2)
    assert toy2d.student_config(dataclasses.replace(cfg, kstep_ema_span=0), 4).ema_span == 0     # 0: no EMA
    # never below --generator_batch_size or its own batch: the K-step value is a floor
    assert toy2d.student_config(dataclasses.replace(cfg, generator_batch_size=128), 4).generator_batch_size == 128
    assert toy2d.student_config(dataclasses.replace(cfg, kstep_batch_size=160), 4).generator_batch_size == 160
    # applying it twice changes nothing (make_trainables applies it to distill's already-student options)
    for k in (1, 4):
        assert toy2d.student_config(toy2d.student_config(cfg, k), k) == toy2d.student_config(cfg, k)
    # the defaults: the K-step student's larger batches, faster fake score and longer EMA (README)
    assert settings(toy2d.student_config(toy2d.Config(), 4)) == (384, 768, 2e-3, 0.3)
    default = toy2d.Config()
    assert settings(toy2d.student_config(default, 1)) == (default.batch_size, default.batch_size,
                                                          default.fake_score_lr, default.ema_span)
    t4 = toy2d.make_trainables(dataclasses.replace(cfg, width=32, depth=2), toy2d.Denoiser(1.0, 32, 2),
                               torch.device("cpu"), ksteps=4)
    assert t4.opt_fake.param_groups[0]["lr"] == 3e-3       # make_trainables takes the student's own options too

    seen = []
    real_gen, real_fake = toy2d.generator_turn, toy2d.fake_score_turn

    def gen_spy(cfg, t, D_real, x_in, sigma_k):
        seen.append(("G", x_in.shape[0]))
        return real_gen(cfg, t, D_real, x_in, sigma_k)

    def fake_spy(cfg, t, x_fake, x_real):
        seen.append(("fake", x_fake.shape[0], [g["lr"] for g in t.opt_fake.param_groups]))
        return real_fake(cfg, t, x_fake, x_real)

    monkeypatch.setattr(toy2d, "generator_turn", gen_spy)
    monkeypatch.setattr(toy2d, "fake_score_turn", fake_spy)
    mix = toy2d.make_mixture("ring")
    teacher = toy2d.Denoiser(toy2d.mixture_std(mix), 32, 2)
    run = dataclasses.replace(cfg, width=32, depth=2, total_steps=6, eval_every=1000, quiet=True)
    for sigmas, batch, gen_batch, lr in (([2.5], 64, 64, run.fake_score_lr), ([2.5, 0.6, 0.3, 0.12], 48, 96, 3e-3)):
        seen.clear()
        torch.manual_seed(0)
        toy2d.distill(run, mix, teacher, teacher, sigmas, torch.device("cpu"), progress=False)
        assert [s[1] for s in seen if s[0] == "G"] == [gen_batch, gen_batch]
        fakes = [s for s in seen if s[0] == "fake"]
        assert all(n == batch for _, n, _ in fakes)
        for it, (_, _, lrs) in enumerate(fakes):
            decay = 0.5 * (1 + math.cos(math.pi * it / run.total_steps))
            assert lrs == pytest.approx([lr * decay] * len(lrs))


def test_one_step_student_takes_its_own_number_of_updates(monkeypatch):
    """--one_step_steps_ratio acts on the 1-step student alone: it makes total_steps times that many iterations, with
    its learning rates cosine-decayed over them and its EMA's time constant a share of its own generator updates; the
    K-step student keeps --total_steps, and 1 gives both --total_steps (the default is 1.5)."""
    def steps(c, k):
        return toy2d.student_config(c, k).total_steps

    assert (steps(toy2d.Config(), 1), steps(toy2d.Config(), 4)) == (7500, 5000)      # the defaults: ratio 1.5
    assert steps(toy2d.Config(one_step_steps_ratio=1.0), 1) == 5000
    cfg = toy2d.Config(width=32, depth=2, total_steps=6, batch_size=64, kstep_generator_batch_size=64,
                       kstep_batch_size=64, dfake_gen_update_ratio=2, eval_every=1000, quiet=True,
                       one_step_steps_ratio=1.5)
    assert (steps(cfg, 1), steps(cfg, 4)) == (9, 6)
    assert steps(dataclasses.replace(cfg, one_step_steps_ratio=0.01), 1) == 1     # never 0 iterations
    assert toy2d.ema_decay(toy2d.student_config(cfg, 1)) == pytest.approx(1 - 1 / (cfg.ema_span * 5))  # 5 updates
    lrs = []
    real_fake = toy2d.fake_score_turn

    def fake_spy(cfg, t, x_fake, x_real):
        lrs.append(t.opt_fake.param_groups[0]["lr"])
        return real_fake(cfg, t, x_fake, x_real)

    monkeypatch.setattr(toy2d, "fake_score_turn", fake_spy)
    mix = toy2d.make_mixture("ring")
    teacher = toy2d.Denoiser(toy2d.mixture_std(mix), 32, 2)
    for sigmas, steps in (([2.5], 9), ([2.5, 0.6, 0.3, 0.12], 6)):
        lrs.clear()
        torch.manual_seed(0)
        _, history = toy2d.distill(cfg, mix, teacher, teacher, sigmas, torch.device("cpu"), progress=False)
        assert len(history) == len(lrs) == steps
        assert "energy" in history[-1]                                     # the last iteration's quick metric
        fake_lr = toy2d.student_config(cfg, len(sigmas)).fake_score_lr
        assert lrs == pytest.approx([fake_lr * 0.5 * (1 + math.cos(math.pi * it / steps)) for it in range(steps)])


def test_students_are_the_ema_of_the_generators_updates():
    """--ema_span: distill returns G_ema <- d G_ema + (1 - d) G after each generator update, starting from the teacher,
    with d = 1 - 1/(ema_span * number of generator updates); --ema_span 0 returns the last G itself."""
    mix = toy2d.make_mixture("ring")
    torch.manual_seed(0)
    teacher = toy2d.Denoiser(toy2d.mixture_std(mix), 32, 2)
    cfg = toy2d.Config(width=32, depth=2, total_steps=12, batch_size=64, dfake_gen_update_ratio=3, eval_every=1000,
                       quiet=True, ema_span=0.5, one_step_steps_ratio=1.0)
    assert toy2d.ema_decay(cfg) == pytest.approx(0.5)                       # 4 generator updates, time constant 2
    assert toy2d.ema_decay(dataclasses.replace(cfg, ema_span=0)) == 0
    assert toy2d.ema_decay(toy2d.Config()) == pytest.approx(1 - 1 / 200)   # 1,000 updates at span 0.2
    # the default students: the 1-step one's 1,500 updates at span 0.2, the K-step one's 1,000 at span 0.3
    assert toy2d.ema_decay(toy2d.student_config(toy2d.Config(), 1)) == pytest.approx(1 - 1 / 300)
    assert toy2d.ema_decay(toy2d.student_config(toy2d.Config(), 4)) == pytest.approx(1 - 1 / 300)
    z = torch.randn(16, 2, generator=torch.Generator().manual_seed(2)) * 2.5
    outs = {}
    for span in (0.5, 0.0):
        after_updates = []

        def record(it, G, fake_score, gan_head, log):
            if it % cfg.dfake_gen_update_ratio == 0:                     # this iteration's generator turn is done
                after_updates.append(copy.deepcopy(G.state_dict()))

        torch.manual_seed(1)
        G, _ = toy2d.distill(dataclasses.replace(cfg, ema_span=span), mix, teacher, teacher, [2.5],
                             torch.device("cpu"), progress=False, callback=record)
        outs[span] = (G.state_dict(), after_updates)
    ema_state, updates = outs[0.5]
    assert len(updates) == 4
    expected = {k: v.clone() for k, v in teacher.state_dict().items()}
    expected["extra_freqs"] = updates[0]["extra_freqs"]                     # the 1-step generator's own features,
    expected["extra.weight"] = torch.zeros_like(updates[0]["extra.weight"])  # whose weights start at zero
    assert set(expected) == set(ema_state)
    for state in updates:
        for k in expected:
            expected[k] = 0.5 * expected[k] + 0.5 * state[k]
    for k, v in ema_state.items():
        torch.testing.assert_close(v, expected[k], rtol=1e-5, atol=1e-6)
    raw_state, raw_updates = outs[0.0]
    for k, v in raw_state.items():                                          # the same run: the same updates
        torch.testing.assert_close(raw_updates[-1][k], updates[-1][k], rtol=0, atol=0)
        torch.testing.assert_close(v, raw_updates[-1][k], rtol=0, atol=0)
    assert not torch.allclose(ema_state["out.weight"], raw_state["out.weight"])


def test_dm_field_recording_leaves_training_unchanged():
    """The DM field is recorded through distill's callback in a forked RNG: same generator with and without it."""
    cfg = toy2d.Config(width=32, depth=2, total_steps=12, batch_size=64, eval_every=1000, quiet=True)
    mix = toy2d.make_mixture("ring")
    torch.manual_seed(0)
    teacher = toy2d.Denoiser(toy2d.mixture_std(mix), 32, 2)
    field, callback = toy2d.dm_field_recorder(6, teacher, [80.0], cfg, mix)
    outs = []
    for cb in (None, callback):
        torch.manual_seed(1)
        G, _ = toy2d.distill(cfg, mix, teacher, teacher, [80.0], torch.device("cpu"), progress=False, callback=cb)
        outs.append(G(torch.randn(16, 2, generator=torch.Generator().manual_seed(2)) * 80, 80.0))
    assert torch.equal(outs[0], outs[1])
    assert field["iter"] == 6 and field["points"].shape == (21 * 21, 2) and field["direction"].shape == (21 * 21, 2)
    assert field["direction"].abs().sum() > 0


def test_energy_distance_matches_brute_force():
    """The chunked, symmetric-block energy distance equals the formula written with one full distance matrix each."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(700, 2, generator=g), torch.randn(500, 2, generator=g) * 1.5 + 0.5
    full = lambda a, b: float(torch.cdist(a.double(), b.double()).mean())
    expected = 2 * full(x, y) - full(x, x) - full(y, y)
    assert toy2d.mean_distance(x, chunk=128) == pytest.approx(full(x, x), rel=1e-12)
    assert toy2d.energy_distance(x, y) == pytest.approx(expected, rel=1e-10)
    assert toy2d.energy_distance(x, y, yy=full(y, y)) == pytest.approx(expected, rel=1e-10)
    assert expected > 0.2 and abs(toy2d.energy_distance(x[:350], x[350:])) < 0.05    # same law: near zero


def test_mean_distance_to_gaussian_matches_monte_carlo():
    """E|d + s Z| (the Rice mean) against 2M draws: at the mode (the Rayleigh mean s sqrt(pi/2)), near it, far away."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2_000_000, 2, generator=g, dtype=torch.float64)
    for d, s in [(0.0, 0.3), (0.5, 0.3), (1.53, 0.42), (4.0, 1.0)]:
        mc = float((torch.tensor([d, 0.0], dtype=torch.float64) + s * z).norm(dim=1).mean())
        exact = float(toy2d.mean_distance_to_gaussian(torch.tensor(d, dtype=torch.float64), torch.tensor(s)))
        assert exact == pytest.approx(mc, rel=2e-3), (d, s)
    assert float(toy2d.mean_distance_to_gaussian(torch.tensor(0.0), torch.tensor(2.0))) == pytest.approx(
        2 * math.sqrt(math.pi / 2), rel=1e-6)
    f64 = dict(dtype=torch.float64)
    far = toy2d.mean_distance_to_gaussian(torch.tensor(500.0, **f64), torch.tensor(0.3, **f64))
    assert float(far) == pytest.approx(500 + 0.3**2 / (2 * 500), rel=1e-7)      # no overflow: d + s^2 / 2d far away


def test_energy_to_mixture_is_unbiased_and_matches_sampled_terms():
    """energy_exact: its closed-form terms equal Monte Carlo ones, exact samples score 0 on average (the biased
    all-pairs self term would not), and a re-weighted or shifted sample scores above the noise."""
    mix = toy2d.make_mixture("ring")
    g = torch.Generator().manual_seed(0)
    y1, y2 = toy2d.sample_mixture(mix, 1_000_000, g).double(), toy2d.sample_mixture(mix, 1_000_000, g).double()
    w = mix.weights.double()
    assert float(w @ toy2d.mode_distances(mix) @ w) == pytest.approx(float((y1 - y2).norm(dim=1).mean()), rel=2e-3)
    x = toy2d.sample_mixture(mix, 50, g)
    xx = toy2d.self_distances(x)[0]
    yy = float((y1 - y2).norm(dim=1).mean())
    sampled = 2 * float(torch.cdist(x.double(), y1[:200_000]).mean()) - xx * 50 / 49 - yy
    assert toy2d.energy_to_mixture(mix, x, xx) == pytest.approx(sampled, abs=0.01)
    draws, biased = [], []
    for _ in range(40):
        x = toy2d.sample_mixture(mix, 400, g)
        xx = toy2d.self_distances(x)[0]
        draws.append(toy2d.energy_to_mixture(mix, x, xx))
        biased.append(draws[-1] + xx / 399)                    # the same with the diagonal's zeros kept in E|X-X'|
    mean, se = float(np.mean(draws)), float(np.std(draws) / math.sqrt(len(draws)))
    assert abs(mean) < 3 * se, (mean, se)
    assert float(np.mean(biased)) > 3 * se + abs(mean)         # E|X-X'| / N = 0.006 here: the bias this removes
    x = toy2d.sample_mixture(mix, 4000, g)
    shifted = x + torch.tensor([0.2, 0.0])                  # the whole ring moved by two thirds of a mode's std
    assert abs(toy2d.energy_to_mixture(mix, x, toy2d.self_distances(x)[0])) < 1.5e-3
    assert toy2d.energy_to_mixture(mix, shifted, toy2d.self_distances(shifted)[0]) > 4e-3


def test_energy_weight_part_is_the_reweighted_mixtures_distance():
    """Two far-apart modes drawn exactly, with shares 0.7 / 0.3 instead of 0.5 / 0.5: the mode-weight part is
    delta^2 (2 E|Y0 - Y1| - E|Y0 - Y0'| - E|Y1 - Y1'|) = 0.04 (2 * 20 - 0.5 sqrt(pi) - 0.3 sqrt(pi)) up to 1e-4, and the
    whole exact energy distance is close to it (the modes themselves are exact)."""
    mix = toy2d.Mixture(torch.tensor([[-10.0, 0.0], [10.0, 0.0]]), torch.tensor([0.5, 0.3]), torch.tensor([0.5, 0.5]))
    g = torch.Generator().manual_seed(0)
    x = torch.cat([mix.means[0] + 0.5 * torch.randn(7000, 2, generator=g),
                   mix.means[1] + 0.3 * torch.randn(3000, 2, generator=g)])
    m = toy2d.evaluate(mix, x, toy2d.sample_mixture(mix, 1000, g))
    expected = 0.2**2 * (2 * 20 - (0.5 + 0.3) * math.sqrt(math.pi))
    assert m["energy_exact_weights"] == pytest.approx(expected, rel=1e-3)
    assert m["energy_exact"] == pytest.approx(expected, rel=0.02)


def test_per_step_metrics_score_each_steps_output():
    """The two far-apart modes above, and a 'chain' whose steps before the last give exact samples with the right
    shares (0.5 / 0.5) and whose last step gives 0.7 / 0.3: only the last step has a mode-weight part, the one of the
    test above, and every step has the data's shapes."""
    mix = toy2d.Mixture(torch.tensor([[-10.0, 0.0], [10.0, 0.0]]), torch.tensor([0.5, 0.3]), torch.tensor([0.5, 0.5]))
    g = torch.Generator().manual_seed(0)
    sigmas = [2.5, 0.6, 0.3]

    def G(x, sigma, g=g):
        n0 = 7000 if sigma == sigmas[-1] else 5000
        return torch.cat([mix.means[0] + 0.5 * torch.randn(n0, 2, generator=g),
                          mix.means[1] + 0.3 * torch.randn(10000 - n0, 2, generator=g)])

    shapes, weights = toy2d.per_step_metrics(mix, G, torch.randn(10000, 2), sigmas)
    assert weights[:2] == [0.0, 0.0]
    assert weights[2] == pytest.approx(0.2**2 * (2 * 20 - (0.5 + 0.3) * math.sqrt(math.pi)), rel=1e-3)
    assert len(shapes) == 3 and max(shapes) < 0.01


def test_mode_shape_kl_known_answers():
    """Two far-apart modes (no sample is assigned to the wrong one): one drawn with its std scaled by c,
    KL = c^2 - 1 - 2 ln c; the other shifted by d, KL = d^2 / (2 s^2). evaluate() reports their mean and max."""
    mix = toy2d.Mixture(torch.tensor([[-10.0, 0.0], [10.0, 0.0]]), torch.tensor([0.5, 0.3]), torch.tensor([0.5, 0.5]))
    g = torch.Generator().manual_seed(0)
    n, c, d = 200_000, 0.7, 0.15
    x = torch.cat([mix.means[0] + c * 0.5 * torch.randn(n, 2, generator=g),
                   mix.means[1] + torch.tensor([d, 0.0]) + 0.3 * torch.randn(n, 2, generator=g)])
    assign = torch.cat([torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long)])
    kl = toy2d.mode_shape_kl(mix, x, assign)
    expected = torch.tensor([c**2 - 1 - 2 * math.log(c), d**2 / (2 * 0.3**2)], dtype=torch.float64)
    assert torch.allclose(kl, expected, atol=3e-3), (kl, expected)
    m = toy2d.evaluate(mix, x[::20], x[::100])                  # 10,000 of each mode's samples
    assert m["mode_shape_kl"] == pytest.approx(float(expected.mean()), abs=0.02)
    assert m["mode_shape_kl_worst"] == pytest.approx(float(expected.max()), abs=0.02)
    # A mode that receives (almost) nothing has no shape: +inf, so the mean cannot hide it.
    assert math.isinf(toy2d.evaluate(mix, x[:n:20], x[::100])["mode_shape_kl_worst"])
    # Exact samples of the default ring: near 0, above 0 only by the cut tails of the nearest-mode assignment.
    ring = toy2d.make_mixture("ring")
    y = toy2d.sample_mixture(ring, 10_000, generator=g)
    assert 0 < toy2d.evaluate(ring, y, y[::10])["mode_shape_kl"] < 0.01


# ---- whole runs ------------------------------------------------------------------------------

TINY = ["--teacher_iters", "150", "--total_steps", "60", "--batch_size", "128", "--width", "32", "--depth", "2",
        "--num_eval", "2000", "--eval_every", "30", "--heun_steps", "8", "--quiet"]


def test_nn_entropy_and_reverse_kl_known_answers():
    """The nearest-neighbour entropy against closed forms, and reverse_kl on samples that only look right to the
    other metrics: each mode's samples laid on a line through its centre (the folded 1-step student, in miniature)."""
    g = torch.Generator().manual_seed(0)
    for scale in (1.0, 0.3):                                   # H(N(0, s^2 I_2)) = 1 + ln(2 pi) + 2 ln s
        x = scale * torch.randn(4000, 2, generator=g)
        assert toy2d.nn_entropy(x) == pytest.approx(1 + math.log(2 * math.pi) + 2 * math.log(scale), abs=0.06)
    x = torch.rand(4000, 2, generator=g) * torch.tensor([2.0, 0.5])                # uniform: H = ln(area) = 0
    assert toy2d.nn_entropy(x) == pytest.approx(0.0, abs=0.06)
    mix = toy2d.make_mixture("ring")
    data = toy2d.sample_mixture(mix, 6000, generator=g)
    ref = toy2d.sample_mixture(mix, 6000, generator=g)
    assign = toy2d.nearest_mode(mix, data)[0]
    offset = data - mix.means[assign]                                                  # [N, 2]
    folded = mix.means[assign] + torch.stack([offset.norm(dim=1) * torch.sign(offset[:, 0]), 0 * offset[:, 0]], 1)
    m_data, m_folded = toy2d.evaluate(mix, data, ref), toy2d.evaluate(mix, folded, ref)
    assert abs(m_data["reverse_kl"]) < 0.06                    # the estimator's bias and noise
    assert m_folded["weight_tv"] < 0.05 and m_folded["modes_covered"] == 8
    assert m_folded["reverse_kl"] > 2.0                        # lines in 2-D: entropy far below the data's


def test_input_fourier_features_fade_out_at_small_sigma():
    """The random input features (x_features) enter only above x_sigma: at small sigma the network is the plain MLP's
    function of (x, y), at the 1-step student's sigma they change its output. Copies share the frequencies."""
    torch.manual_seed(0)
    net = toy2d.Denoiser(1.45, width=32, depth=2, x_features=8, x_scale=10.0, x_sigma=1.0)
    twin = copy.deepcopy(net)
    assert torch.equal(twin.x_freqs, net.x_freqs) and "x_freqs" in net.state_dict()
    with torch.no_grad():
        twin.x_freqs.mul_(-3.0)                                 # other frequencies, same weights
        x = torch.randn(64, 2)
        for sigma, differs in ((0.002, False), (0.05, False), (2.5, True)):
            gap = float((net(x, sigma) - twin(x, sigma)).abs().max())
            assert (gap > 1e-3) == differs, (sigma, gap)
    plain = toy2d.Denoiser(1.45, width=32, depth=2)
    assert plain.x_freqs.shape == (2, 0) and plain.inp.in_features == 2 + 16


def test_networks_work_on_data_centred_at_its_mean():
    """--center_data: D(x; sigma) = mu + D0(x - mu; sigma), with D0 the same weights on uncentred coordinates, and
    mu the mixture's mean (checked against samples); the copies that become the generator and the fake score keep
    it, and without it (the default) mu = 0."""
    mix = toy2d.make_mixture("ring")
    mu = toy2d.mixture_mean(mix)
    x = toy2d.sample_mixture(mix, 400_000, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(x.mean(0), mu, atol=5 * 2.0 / math.sqrt(len(x)))          # 5 standard errors
    net = toy2d.make_denoiser(toy2d.Config(width=32, depth=2, center_data=True), mix)
    assert torch.equal(net.data_mean, mu) and torch.equal(copy.deepcopy(net).data_mean, mu)
    plain = toy2d.make_denoiser(toy2d.Config(width=32, depth=2, center_data=False), mix)
    assert torch.equal(plain.data_mean, torch.zeros(2))
    plain.load_state_dict({k: v for k, v in net.state_dict().items() if k != "data_mean"}, strict=False)
    with torch.no_grad():
        for sigma in (0.01, 0.5, 2.5, 40.0):
            z = torch.randn(64, 2)
            assert torch.allclose(net(z, sigma), mu + plain(z - mu, sigma), atol=1e-5), sigma


def test_seed_makes_runs_bit_for_bit_repeatable(tmp_path):
    """Also: --eval_redraws draws its fresh evaluations after everything else, so the run is otherwise unchanged."""
    def run(seed, name, *extra):
        toy2d.main(TINY + ["--seed", str(seed), "--outdir", str(tmp_path / name), *extra])
        return np.load(tmp_path / name / "samples.npz")
    a, b, c = run(0, "a"), run(0, "b", "--eval_redraws", "2"), run(1, "c")
    for key in ("teacher", "student_1step", "student_4step"):
        assert np.array_equal(a[key], b[key])
        assert not np.array_equal(a[key], c[key])
    ma, mb = (json.load(open(tmp_path / name / "metrics.json"))["metrics"] for name in ("a", "b"))
    for name in ("data", "teacher", "student_1step", "student_4step"):
        for key in [k for k in mb[name] if k.endswith("_redraws")]:
            assert len(mb[name].pop(key)) == 2, key
    assert ma == mb


def test_energy_ratio_redraws_are_fresh_evaluations_of_the_bar():
    """Each redraw is a new reference, teacher, data and student sample, and a second teacher sample whose noise
    comes from a generator of its own; its ratios match a brute-force energy distance on the same draws, and they
    differ from draw to draw."""
    cfg = toy2d.Config(num_eval=300, heun_steps=16)
    mix = toy2d.make_mixture("ring")
    teacher = toy2d.ExactDenoiser(mix)
    G = toy2d.make_denoiser(cfg, mix).eval().requires_grad_(False)    # untrained: far from the data
    torch.manual_seed(5)
    got = toy2d.energy_ratio_redraws(cfg, mix, teacher, {"G": (G, [2.5])}, 2, torch.device("cpu"))
    ratio, energy, exact = ({k: v[key] for k, v in got.items()} for key in
                            ("energy_ratio_redraws", "energy_redraws", "energy_exact_redraws"))

    def brute_energy(x, y):                     # all pairs, float64, diagonals included as in the table
        x, y = x.double(), y.double()
        return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())

    def brute_exact(x):                         # to the mixture: E|X - Y| in closed form (tested on its own),
        x = x.double()                          # E|X - X'| over all distinct pairs at once
        xx = float(torch.cdist(x, x).sum()) / (len(x) * (len(x) - 1))
        xy = (toy2d.mean_distance_to_gaussian(torch.cdist(x, mix.means.double()), mix.stds.double())
              * mix.weights.double()).sum(1).mean()
        return float(2 * xy - xx - mix.weights.double() @ toy2d.mode_distances(mix) @ mix.weights.double())
    torch.manual_seed(5)
    again = torch.Generator().manual_seed(cfg.seed + 3)
    for i in range(2):
        ref = toy2d.sample_mixture(mix, 300)
        x_teacher = toy2d.heun_sampler(teacher, torch.randn(300, 2), 16, cfg.sigma_min, cfg.sigma_max, cfg.rho)
        data = toy2d.sample_mixture(mix, 300)
        x_again = toy2d.heun_sampler(teacher, torch.randn(300, 2, generator=again), 16, cfg.sigma_min, cfg.sigma_max,
                                     cfg.rho)
        with torch.no_grad():
            x_G = toy2d.generate(G, torch.randn(300, 2), [2.5])
        e_teacher = brute_energy(x_teacher, ref)
        assert ratio["data"][i] == pytest.approx(brute_energy(data, ref) / e_teacher, rel=1e-9)
        assert ratio["teacher"][i] == pytest.approx(brute_energy(x_again, ref) / e_teacher, rel=1e-9)
        assert ratio["G"][i] == pytest.approx(brute_energy(x_G, ref) / e_teacher, rel=1e-9)
        # The distances themselves: the teacher's row keeps its first sample's (each ratio's denominator), and its
        # second sample's apart; each row's exact distance is to the mixture itself.
        assert energy["teacher"][i] == pytest.approx(e_teacher, rel=1e-9)
        assert got["teacher"]["energy_again_redraws"][i] == pytest.approx(brute_energy(x_again, ref), rel=1e-9)
        assert energy["G"][i] == pytest.approx(brute_energy(x_G, ref), rel=1e-9)
        assert exact["teacher"][i] == pytest.approx(brute_exact(x_teacher), rel=1e-6)
        assert got["teacher"]["energy_exact_again_redraws"][i] == pytest.approx(brute_exact(x_again), rel=1e-6)
        assert exact["data"][i] == pytest.approx(brute_exact(data), rel=1e-6, abs=1e-9)
        assert exact["G"][i] == pytest.approx(brute_exact(x_G), rel=1e-6)
    assert not torch.equal(x_again, x_teacher)
    assert all(ratio[k][0] != ratio[k][1] for k in ("data", "teacher", "G"))
    assert min(ratio["G"]) > 2 * max(ratio["data"] + ratio["teacher"])
    assert min(exact["G"]) > 10 * max(abs(v) for v in exact["data"])     # far from the data, exact samples near 0


def test_redraws_summary_takes_the_bar_on_mean_distances():
    """redraws_summary: per row the median, range and count above 2 of the ratios, and the bar on the mean distance
    over the draws (a ratio of means, not a mean of ratios); redraws_table adds the draws above 2 over all seeds."""
    def row(ratios, energies, exact):
        return {"energy_ratio_redraws": ratios, "energy_redraws": energies, "energy_exact_redraws": exact}
    metrics = {"data": row([0.5, 0.25, 0.5], [2.0, 1.0, 0.5], [0.0, 0.1, -0.1]),
               "teacher": {**row([1.0, 3.0, 0.5], [4.0, 4.0, 1.0], [1.0, 2.0, 3.0]),
                           "energy_again_redraws": [4.0, 12.0, 0.5], "energy_exact_again_redraws": [2.0, 2.0, 5.0]},
               "student_1step": row([2.5, 0.5, 4.0], [10.0, 2.0, 4.0], [3.0, 3.0, 6.0]),
               "student_4step": {"log_likelihood": -2.4}}          # a row without redraws: left out
    s = toy2d.redraws_summary(metrics)
    assert list(s) == ["teacher", "data", "teacher again", "student_1step"]
    assert s["teacher"] == {"mean_energy": 3.0, "mean_exact": 2.0}
    assert s["student_1step"] == {"median": 2.5, "lowest": 0.5, "highest": 4.0, "draws": 3, "above_2": 2,
                                  "mean_ratio": pytest.approx(16 / 9), "mean_exact": 4.0}
    assert s["teacher again"]["mean_ratio"] == pytest.approx(16.5 / 9)         # not the mean ratio, 1.5
    assert s["teacher again"]["above_2"] == 1 and s["teacher again"]["mean_exact"] == 3.0
    assert s["data"]["mean_ratio"] == pytest.approx(3.5 / 9) and s["data"]["mean_exact"] == pytest.approx(0.0)
    assert toy2d.redraws_summary({"data": {}, "teacher": {"energy_distance": 1.0}}) == {}
    lines = toy2d.redraws_lines(s)
    assert "teacher" in s and len(lines) == 4
    assert lines[-1] == ("student_1step: energy distance / teacher's over 3 fresh draws: median 2.50, range "
                         "0.50-4.00, above 2 in 2; mean / teacher's mean 1.78; mean exact 40000.00e-4")
    # A second seed, where only the student's ratios differ (1 draw above 2 instead of 2; its distances, and so its
    # mean ratio, stay the same).
    other = {**metrics["student_1step"], "energy_ratio_redraws": [0.5, 0.5, 3.0]}
    table = toy2d.redraws_table({0: toy2d.redraws_summary({**metrics, "student_1step": other}), 1: s})
    assert "| 0 | student_1step | 0.50 (0.50-3.00) | 1 | 1.78 | 40000.00 |" in table
    assert "| 1 | student_1step | 2.50 (0.50-4.00) | 2 | 1.78 | 40000.00 |" in table
    assert "| worst | student_1step | highest 4.00 | 3 of 6 | 1.78 | 40000.00 |" in table   # 2 + 1 draws above 2
    assert "| worst | teacher again | highest 3.00 | 2 of 6 | 1.83 | 30000.00 |" in table


def test_students_in_worker_processes_match_students_in_turn(tmp_path):
    """--workers 2 trains the two students in two spawned processes; each student seeds itself, so the
    samples are bit for bit those of training them one after the other in this process."""
    def run(workers, name):
        toy2d.main(TINY + ["--threads", "1", "--workers", str(workers), "--outdir", str(tmp_path / name)])
        return np.load(tmp_path / name / "samples.npz")
    a, b = run(1, "in_turn"), run(2, "parallel")
    for key in ("data", "teacher", "student_1step", "student_4step"):
        assert np.array_equal(a[key], b[key]), key


WORKER_HOLDER = """
import os, sys, time, torch
sys.path.insert(0, sys.argv[1])
import toy2d
if __name__ == "__main__":
    pool = toy2d.student_pool(toy2d.Config(workers=2), torch.device("cpu"), 2)
    pool.submit(time.sleep, 0.5).result()
    print("ready", flush=True)
    time.sleep(120)
"""


def _state_and_parent(pid):
    """(state letter, parent pid) of a process from /proc/PID/stat, or None if it is gone."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[1])


def _alive(pid):
    stat = _state_and_parent(pid)
    return stat is not None and stat[0] != "Z"          # a zombie has ended; only its reaping is left


def _children(pid):
    """Live processes whose parent is pid."""
    return [int(e) for e in os.listdir("/proc") if e.isdigit() and _alive(int(e))
            and (_state_and_parent(int(e)) or ("", -1))[1] == pid]


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads processes from /proc (Linux)")
def test_student_workers_exit_when_the_run_is_killed(tmp_path):
    """The workers start before the teacher trains; if the run dies without shutting them down (kill -9), they
    must not live on as orphans."""
    script = tmp_path / "hold.py"
    script.write_text(WORKER_HOLDER)
    proc = subprocess.Popen([sys.executable, str(script), os.path.dirname(os.path.abspath(toy2d.__file__))],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        workers = [c for c in _children(proc.pid) if "spawn_main" in open(f"/proc/{c}/cmdline").read()]
        assert len(workers) == 2, workers
    finally:
        proc.kill()
        proc.wait()
    deadline = time.time() + 30
    while any(_alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(_alive(w) for w in workers), workers


INTERRUPT_HOLDER = """
import os, sys, time, torch
sys.path.insert(0, sys.argv[1])
import toy2d
if __name__ == "__main__":
    pool = toy2d.student_pool(toy2d.Config(workers=2), torch.device("cpu"), 2)
    pids = set()
    while len(pids) < 2:                                 # both workers started (start-up done) and taking jobs
        pids |= {f.result() for f in [pool.submit(os.getpid) for _ in range(4)]}
    busy = pool.submit(toy2d._worker_job, time.sleep, 60)   # one worker in a job, the other waiting for one
    time.sleep(0.5)
    try:
        print("ready", flush=True)                      # the signal may come as soon as this is written
        busy.result()
    except KeyboardInterrupt:
        pool.shutdown(cancel_futures=True)
        print("interrupted", flush=True)
"""


@pytest.mark.skipif(os.name != "posix", reason="sends SIGINT to a process group")
def test_ctrl_c_stops_the_run_and_its_workers_with_one_line(tmp_path):
    """Ctrl-C reaches every process of the run: the student workers, busy or idle, end without a traceback each,
    and toy2d.py itself says it was interrupted (status 130) instead of printing one."""
    import signal

    def sigint_as_in_a_terminal():     # a shell that starts pytest in the background (cmd &) makes it ignore SIGINT,
        signal.signal(signal.SIGINT, signal.SIG_DFL)      # and its children inherit that: give them the default
    script = tmp_path / "hold.py"
    script.write_text(INTERRUPT_HOLDER)
    proc = subprocess.Popen([sys.executable, str(script), os.path.dirname(os.path.abspath(toy2d.__file__))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=sigint_as_in_a_terminal)
    try:
        assert proc.stdout.readline().strip() == "ready"
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=30)              # the busy worker's 60 s job ends at once
    finally:
        proc.kill()
    assert out.strip() == "interrupted" and "Traceback" not in err, err
    out_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, os.path.abspath(toy2d.__file__), "--quiet", "--workers", "1",
                             "--teacher_iters", "1000000", "--outdir", str(out_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=sigint_as_in_a_terminal)
    try:
        deadline = time.time() + 60
        while not out_dir.exists() and time.time() < deadline:    # made inside main(), before the teacher trains
            time.sleep(0.1)
        time.sleep(1)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130 and err == "toy2d.py: interrupted\n", err


def test_seeds_table_has_every_seed_median_and_worst(tmp_path):
    """--seeds N runs the main run per seed and summarises each student: one row per seed, then median and worst."""
    toy2d.main(TINY + ["--seeds", "2", "--outdir", str(tmp_path)])
    table = (tmp_path / "seeds.md").read_text()
    assert table.startswith("Seeds 0..1 of 0..1; options: --width 32 --depth 2 --teacher_iters 150 --heun_steps 8 "
                            "--total_steps 60 --batch_size 128 --num_eval 2000 --eval_every 30.")   # what made it
    assert toy2d.options_text(toy2d.Config(outdir="x", workers=1, seeds=3)) == "default options"
    for student in ("student_1step", "student_4step"):
        for row in ("| 0 |", "| 1 |", "| median |", "| worst |"):
            assert f"{row} {student} |" in table
    per_seed = [json.loads((tmp_path / f"seed_{s}" / "metrics.json").read_text())["metrics"] for s in (0, 1)]
    worst_tv = max(m["student_1step"]["weight_tv"] for m in per_seed)
    worst_row = next(line for line in table.splitlines() if line.startswith("| worst | student_1step |"))
    assert float(worst_row.split("|")[4]) == pytest.approx(worst_tv, rel=1e-2)
    assert "fresh draws" not in table                       # the redraws table only with --eval_redraws


def test_metrics_files_are_strict_json():
    """A mode with too few samples has shape KL inf; JSON has no infinity, so the files say null there."""
    assert toy2d.strict_json({"kl": [0.5, float("inf")], "m": {"x": float("nan"), "n": 3}}) == \
        {"kl": [0.5, None], "m": {"x": None, "n": 3}}


def test_bad_options_get_clear_errors():
    with pytest.raises(SystemExit, match="--ablation runs its own seeds"):
        toy2d.main(["--ablation", "--seeds", "3"])
    with pytest.raises(SystemExit, match="--kstep_sigmas has 3 values but --ksteps is 4"):
        toy2d.main(["--kstep_sigmas", "80,1,0.1"])
    with pytest.raises(SystemExit, match=r"--ksteps must be at least 2 \(the 1-step student always trains beside"):
        toy2d.main(["--ksteps", "1", "--kstep_sigmas", "2.5"])
    with pytest.raises(SystemExit, match="--dataset must be 'ring' or 'grid'"):
        toy2d.main(["--dataset", "moons"])
    with pytest.raises(SystemExit, match="strictly decreasing"):
        toy2d.main(["--kstep_sigmas", "80,1,2,0.1"])
    with pytest.raises(SystemExit, match="at or below --sigma_max"):
        toy2d.main(["--kstep_sigmas", "90,1,0.5,0.1"])
    with pytest.raises(SystemExit, match="--x_features >= 0"):
        toy2d.main(["--x_features", "-1"])
    with pytest.raises(SystemExit, match=r"--teacher_lr must be 0 \(the dataset's own\) or more, got -0.1"):
        toy2d.main(["--teacher_lr", "-0.1"])
    with pytest.raises(SystemExit, match="--teacher_grid_batch must be 0 or more"):
        toy2d.main(["--teacher_grid_batch", "-1"])
    with pytest.raises(SystemExit, match=r"--generator_batch_size must be 0 \(the same as --batch_size\) or at least "
                       r"--batch_size=192, got 100"):
        toy2d.main(["--generator_batch_size", "100"])
    with pytest.raises(SystemExit, match=r"--kstep_generator_batch_size must be 0 \(as the 1-step student\) or more"):
        toy2d.main(["--kstep_generator_batch_size", "-1"])
    with pytest.raises(SystemExit, match=r"--kstep_batch_size must be 0 \(as the 1-step student\) or more"):
        toy2d.main(["--kstep_batch_size", "-1"])
    with pytest.raises(SystemExit, match=r"--kstep_ema_span must be at most 1"):
        toy2d.main(["--kstep_ema_span", "1.5"])
    with pytest.raises(SystemExit, match=r"--kstep_fake_score_lr >= 0 .* got 0.001, 0.001 and -0.1"):
        toy2d.main(["--kstep_fake_score_lr", "-0.1"])
    with pytest.raises(SystemExit, match=r"need --generator_lr > 0, .* got 0.0, 0.001 and 0.002"):
        toy2d.main(["--generator_lr", "0"])
    with pytest.raises(SystemExit, match=r"--ema_span must be between 0 \(no EMA\) and 1 \(the whole run\), got 1.5"):
        toy2d.main(["--ema_span", "1.5"])
    with pytest.raises(SystemExit, match=r"--eval_redraws must be 0 \(off\) or more, got -1"):
        toy2d.main(["--eval_redraws", "-1"])
    with pytest.raises(SystemExit, match=r"--fake_score_lognormal must be between 0 \(DMD2's\) and 1, got 1.5"):
        toy2d.main(["--fake_score_lognormal", "1.5"])
    for bad in ("0", "-1"):
        with pytest.raises(SystemExit, match=rf"--one_step_steps_ratio must be positive \(1: --total_steps\), "
                           rf"got {bad}"):
            toy2d.main(["--one_step_steps_ratio", bad])
    # every mode expects 20 samples: at --num_eval 100 the ring's lightest mode got 5 and every shape KL was inf
    with pytest.raises(SystemExit, match=r"--num_eval must be at least 400 for the ring, .* got 100"):
        toy2d.main(["--num_eval", "100"])
    with pytest.raises(SystemExit, match=r"--num_eval must be at least 1180 for the grid, .* got 1000"):
        toy2d.main(["--dataset", "grid", "--num_eval", "1000"])


def test_numbers_out_of_range_or_not_finite_get_clear_errors():
    """Each of these used to crash after the teacher had trained (NaN sigmas, --rho 0, an ablation with no generator
    update, a seed numpy refuses) or train silently backwards (--max_grad_norm -1 flips every gradient)."""
    for argv, message in (
            (["--kstep_sigmas", "2.5,nan,0.3,0.12"], "--kstep_sigmas must be finite, positive and strictly decreasing"),
            (["--sigma_max", "inf"], "--sigma_max must be a finite number, got inf"),
            (["--rho", "0"], r"--rho must be positive \(EDM: 7\), got 0.0"),
            (["--max_grad_norm", "-1"], r"--max_grad_norm must be positive"),
            (["--gen_gan_weight", "-1"], r"--gen_gan_weight and --fake_gan_weight must be 0 \(no GAN\) or more"),
            (["--ablation", "--total_steps", "3"], r"--ablation needs --total_steps >= --dfake_gen_update_ratio \(5\)"),
            (["--seed", "-1"], r"--seed and every seed after it .* between 0 and 2\*\*32 - 1, got -1 to -1"),
            (["--seed", str(2**32 - 1), "--seeds", "2"], f"got {2**32 - 1} to {2**32}")):
        with pytest.raises(SystemExit, match=message):
            toy2d.main(argv)


def test_an_outdir_that_cannot_hold_the_outputs_fails_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(toy2d, "train_teacher", lambda *a, **k: pytest.fail("trained before checking --outdir"))
    monkeypatch.setattr(toy2d, "student_pool", lambda *a, **k: pytest.fail("started workers before checking --outdir"))
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(SystemExit, match=r"--outdir '.*a_file' is a file, not a folder"):
        toy2d.main(["--outdir", str(tmp_path / "a_file"), "--quiet"])
    with pytest.raises(SystemExit, match=r"--outdir '.*a_file/run' cannot be created: Not a directory"):
        toy2d.main(["--outdir", str(tmp_path / "a_file" / "run"), "--quiet"])
    toy2d.make_outdir(str(tmp_path / "new" / "run"))                                   # parents are made
    assert (tmp_path / "new" / "run").is_dir()


def test_grid_teacher_learns_its_25_modes_at_its_own_learning_rate():
    """--dataset grid with the default 3,000 teacher steps: its learning rate is the grid's own (toy2d.teacher_lr), and
    its teacher's samples have every mode's shape. At the ring's 3e-3 they smeared each row of modes into a line (mode
    shape KL 7.4 and 8.0, log-likelihood -10.1 and -10.5 on seeds 0 and 1); at 1e-2, 0.19-0.36 and -1.45 to -1.76 on
    seeds 0-4 (data: 0.006-0.011 and -0.87 to -0.91; python toy2d.py --dataset grid --seeds 5 --threads 1)."""
    cfg = toy2d.Config(dataset="grid")
    assert toy2d.teacher_lr(cfg) == 1e-2 and toy2d.teacher_lr(toy2d.Config()) == 3e-3
    assert toy2d.teacher_lr(dataclasses.replace(cfg, teacher_lr=5e-3)) == 5e-3       # a flag wins
    mix = toy2d.make_mixture("grid")
    torch.manual_seed(0)
    teacher = toy2d.train_teacher(cfg, mix, torch.device("cpu"), progress=False)
    x = toy2d.heun_sampler(teacher, torch.randn(4000, 2), cfg.heun_steps, cfg.sigma_min, cfg.sigma_max, cfg.rho)
    reference = toy2d.sample_mixture(mix, 4000)
    m, data = toy2d.evaluate(mix, x, reference), toy2d.evaluate(mix, toy2d.sample_mixture(mix, 4000), reference)
    assert m["modes_covered"] == 25 and m["mode_shape_kl"] < 1.0 and m["mode_shape_kl_worst"] < 2.0, m
    assert m["log_likelihood"] > data["log_likelihood"] - 1.5 and m["weight_tv"] < 0.06, (m, data)


def test_teacher_grid_rows_draw_sigma_where_distillation_queries_the_teacher():
    """--teacher_grid_batch: the last n_grid rows of a teacher batch take sigma from the distillation grid, the others
    EDM's lognormal; and the numbers train_teacher's comment gives for the two distributions."""
    seen = []

    class Probe(nn.Module):
        sigma_data = 0.5

        def forward(self, x, sigma):
            seen.append(sigma.reshape(-1))
            return torch.zeros_like(x)

    grid = toy2d.sigma_grid(1000, 0.002, 80.0, 7.0)
    torch.manual_seed(0)
    toy2d.edm_loss(Probe(), torch.zeros(8192, 2), sigma_grid=grid, n_grid=2048)
    sigma = seen[0]
    edm, extra = sigma[:6144], sigma[6144:]
    assert torch.isin(extra, grid).all() and not torch.isin(edm, grid).any()
    assert (edm > 20).sum() <= 6 and 0.02 < (edm > 2.5).float().mean() < 0.06       # 0.02% and 4%
    dm = grid[20:981]                                                                  # the DM gradient's draws
    assert 0.45 < (dm > 2.5).float().mean() < 0.55 and 0.17 < (dm > 20).float().mean() < 0.25
    assert 0.45 < (extra > 2.5).float().mean() < 0.55 and 0.17 < (extra > 20).float().mean() < 0.28


def test_fake_score_sigmas_grid_and_lognormal_share():
    """--fake_score_lognormal: share 0 is DMD2's draw, uniform over the grid's indices, bit for bit as the loss drew it
    before the option; share p puts about p of the rows on EDM's lognormal (median 0.3), inside the grid's range."""
    grid = toy2d.sigma_grid(1000, 0.002, 80.0, 7.0)
    torch.manual_seed(0)
    paper = grid[torch.randint(0, len(grid), (20_000,))].unsqueeze(1)
    torch.manual_seed(0)
    assert torch.equal(toy2d.fake_score_sigmas(grid, 20_000), paper)
    torch.manual_seed(0)
    sigma = toy2d.fake_score_sigmas(grid, 20_000, lognormal=0.75).reshape(-1)
    edm = sigma[~torch.isin(sigma, grid)]
    assert 0.74 < len(edm) / len(sigma) < 0.76
    assert 0.28 < float(edm.median()) < 0.32 and 0.02 < (edm > 2.5).float().mean() < 0.06
    assert sigma.min() >= grid[0] and sigma.max() <= grid[-1]
    on_grid = sigma[torch.isin(sigma, grid)]
    assert 0.45 < (on_grid > 2.5).float().mean() < 0.55                    # the rest stay uniform over the grid
    # the loss uses it: the same draw reaches the network
    seen = []

    class Probe(nn.Module):
        sigma_data = 0.5

        def forward(self, x, sigma, features=False):
            seen.append(sigma.reshape(-1))
            return torch.zeros_like(x), torch.zeros(len(x), 4)

    torch.manual_seed(1)
    toy2d.loss_fake_score(Probe(), torch.zeros(4096, 2), grid, torch.zeros(4096, 2), lognormal=0.75)
    torch.manual_seed(1)
    assert torch.equal(seen[0], toy2d.fake_score_sigmas(grid, 8192, lognormal=0.75).reshape(-1))


SHAPE_BAR = 0.2         # this shortened run (a quarter of the default run) measured 0.044 (1-step), 0.035 (4-step)
REVERSE_KL_BAR = 0.9    # measured 0.589 (1-step), 0.102 (4-step); the earlier defaults' full-length 1-step: 0.79-0.88


def test_end_to_end_quality(tmp_path):
    """A shortened default run: files as documented, and both students near the data on every metric."""
    out = tmp_path / "run"
    toy2d.main(["--total_steps", "1500", "--quiet", "--outdir", str(out)])
    s = np.load(out / "samples.npz")
    assert s["means"].shape == (8, 2) and s["stds"].shape == (8,) and s["weights"].shape == (8,)
    for key in ("data", "teacher", "student_1step", "student_4step"):
        assert s[key].shape == (10_000, 2) and np.isfinite(s[key]).all()
    result = json.loads((out / "metrics.json").read_text())
    m = result["metrics"]
    assert result["wall_time_s"] > 0
    assert result["config"]["teacher_lr"] == 3e-3       # the ring's own rate, which --teacher_lr 0 picks
    for key in ("teacher", "student_1step", "student_4step"):
        assert m[key]["modes_covered"] == 8, (key, m[key])
        assert m[key]["weight_tv"] < 0.1, (key, m[key])
        assert m[key]["log_likelihood"] > m["data"]["log_likelihood"] - 1.0, (key, m[key])
        assert m[key]["energy_distance"] < 0.05, (key, m[key])
    # Per-mode shape: exact samples near 0, the teacher close (0.008 measured), and students whose modes already
    # have roughly the data's shape after a quarter of the default run (the notebook's short run without TTUR: 1.03).
    # The reverse KL also sees samples folded onto curves (teacher: 0.056 measured).
    assert m["data"]["mode_shape_kl"] < 0.01 and m["teacher"]["mode_shape_kl"] < 0.03, m
    assert abs(m["data"]["reverse_kl"]) < 0.06 and m["teacher"]["reverse_kl"] < 0.15, m
    for key in ("student_1step", "student_4step"):
        assert m[key]["mode_shape_kl"] < SHAPE_BAR and m[key]["reverse_kl"] < REVERSE_KL_BAR, (key, m[key])
        assert m[key]["weight_tv"] < 0.05, (key, m[key])          # measured 0.007 (1-step), 0.018 (4-step)
    per_step = m["student_4step"]
    assert len(per_step["mode_shape_kl_per_step"]) == len(per_step["energy_exact_weights_per_step"]) == 4
    for png in ("samples.png", "dm_field.png", "curves.png"):
        assert (out / png).stat().st_size > 1000


def test_bf16_autocast_path_runs_on_cpu(tmp_path):
    """The AMP loop is one code path: bf16 autocast (the CUDA default) also runs on the CPU and gives finite output."""
    toy2d.main(TINY + ["--precision", "bf16", "--outdir", str(tmp_path)])
    s = np.load(tmp_path / "samples.npz")
    assert np.isfinite(s["student_1step"]).all() and np.isfinite(s["student_4step"]).all()


def test_ablation_writes_every_row(tmp_path):
    """--ablation runs each row of the paper's ablation (tiny here) and writes the table, the numbers and a figure."""
    toy2d.main(TINY + ["--ablation", "--ablation_seeds", "1", "--outdir", str(tmp_path)])
    table = (tmp_path / "ablation.md").read_text()
    summary = json.loads((tmp_path / "ablation.json").read_text())
    for name, _, _ in toy2d.ablation_rows(toy2d.Config()):
        assert f"| {name} |" in table and name in summary
        assert 0 <= summary[name]["mean"]["weight_tv"] <= 1
    assert (tmp_path / "ablation.png").stat().st_size > 1000
    assert "DMD2, 4-step" in table and "4-step without backward simulation" in table
    assert [n for n, _, _ in toy2d.ablation_rows(toy2d.Config(ksteps=3))][4:] == [
        "DMD2, 3-step", "3-step without backward simulation"]


def _toy_trials():
    import importlib.util
    path = os.path.join(os.path.dirname(__file__), "toy_trials.py")
    spec = importlib.util.spec_from_file_location("toy_trials", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_toy_trials_score_and_cache(tmp_path):
    """tests/toy_trials.py (README's trials): exact samples score about 0; a tiny trial writes a record per teacher and
    student, reads its cached teacher back, repeats bit for bit, and refuses an option toy2d.py does not have."""
    trials = _toy_trials()
    ring = toy2d.make_mixture("ring")
    exact = trials.score(ring, toy2d.sample_mixture(ring, 100_000, generator=torch.Generator().manual_seed(0)))
    assert abs(exact["exact"]) < 1.0 and exact["weights"] > -0.3 and exact["tv"] < 0.01 and exact["shape"] < 0.01
    off = torch.tensor([0.3, 0.0])                          # every sample moved: a distance far above the noise
    moved = trials.score(ring, toy2d.sample_mixture(ring, 100_000, generator=torch.Generator().manual_seed(0)) + off)
    assert moved["exact"] > 100 and moved["shape"] > 0.1
    exact_short = trials.mean_shortfall(toy2d.ExactDenoiser(ring), ring, 100_000)    # Tweedie: E[D] is the mean
    assert all(abs(v) < 0.02 for v in exact_short), exact_short
    half = trials.mean_shortfall(lambda x, s: 0.5 * toy2d.ExactDenoiser(ring)(x, s), ring, 100_000)
    assert all(abs(v - 0.5) < 0.02 for v in half), half
    tiny = ["teacher_iters=150", "total_steps=60", "batch_size=128", "width=32", "depth=2", "heun_steps=8"]
    argv = ["t", *tiny, "--seeds", "0", "--num", "20000", "--outdir", str(tmp_path), "--cache", str(tmp_path / "c"),
            "--teacher_threads", "1"]
    first = trials.main(argv)
    assert [r["student"] for r in first] == ["teacher", "1-step", "4-step"]
    assert len(first[2]["dw_steps"]) == 4 and all(len(dw) == 8 for dw in first[2]["dw_steps"])
    assert abs(sum(first[2]["dw"])) < 0.5 and "dw_steps" not in first[1]       # shares minus weights sum to 0
    cached = sorted(os.listdir(tmp_path / "c"))                       # the teacher, and its scores
    assert [n.split("_")[0] for n in cached] == ["scores", "teacher"]
    assert (tmp_path / "t.jsonl").read_text().count("\n") == 3
    assert trials.main(argv) == first                                # the cached teacher, the same students
    assert sorted(os.listdir(tmp_path / "c")) == cached
    with pytest.raises(SystemExit, match="no_such_option"):
        trials.main(["t", "no_such_option=1"])
    assert trials.parse_seeds("0-2,6") == [0, 1, 2, 6]
