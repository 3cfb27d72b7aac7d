"""Tests of the objectives written in notebooks/src/neighbours.py.

The notebook's cells tagged "defs" only define data, networks and objectives; these tests execute exactly those
cells (read with jupytext from the source) and train each objective on a tiny budget: its samples must move toward
the data (unconditional rows) or toward the many-step guided sampler's output (guided rows). The closed-form
pieces of the conditional toy are checked against independent computations.
"""
import math
import os

import jupytext
import pytest
import torch

import toy2d

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "notebooks", "src", "neighbours.py")


@pytest.fixture(scope="module")
def nb():
    """The namespace of the notebook's definition cells."""
    ns = {}
    cells = [c for c in jupytext.read(SOURCE).cells if c.cell_type == "code" and "defs" in c.metadata.get("tags", [])]
    assert len(cells) >= 5, "the notebook lost its definition cells (tags=[\"defs\"])"
    cwd, threads = os.getcwd(), torch.get_num_threads()
    os.chdir(ROOT)                       # the first cell finds the repository from the working directory
    try:
        for cell in cells:
            exec(compile(cell.source, SOURCE, "exec"), ns)
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)   # the cell sets one thread; tests/conftest.py's fixture decides here
    return ns


@pytest.fixture(scope="module")
def small(nb):
    """A small teacher with toy2d's architecture, and a small distillation config."""
    cfg = toy2d.Config(width=64, teacher_iters=400, teacher_batch=512, batch_size=128, quiet=True, x_features=0,
                       teacher_grid_batch=0, one_step_fake_features=0, one_step_generator_features=0,
                       gen_gan_weight=0.3, fake_gan_weight=0.3)  # the notebook's ("Sizes" cell)
    mix = toy2d.make_mixture("ring")
    torch.manual_seed(0)
    teacher = toy2d.train_teacher(cfg, mix, torch.device("cpu"), progress=False)
    return cfg, mix, teacher


def test_definition_cells_train_nothing(nb):
    """The defs cells are cheap to execute and define every objective of the table."""
    assert list(nb["OBJECTIVES"]) == ["DMD2", "DMD", "VSD / SwiftBrush", "Diff-Instruct", "SiD",
                                      "consistency distillation", "GAN only", "f-distill (JS)", "BOOT"]
    assert "teacher" not in nb and "results" not in nb


@pytest.mark.parametrize("name", ["DMD2", "DMD", "VSD / SwiftBrush", "Diff-Instruct", "SiD",
                                  "consistency distillation", "GAN only", "f-distill (JS)", "BOOT"])
def test_objective_moves_samples_toward_the_data(nb, small, name):
    cfg, mix, teacher = small
    x, curve, log = nb["train"](name, cfg, teacher, mix, seed=0, updates=120, curve_every=120, num_eval=2000)
    (u0, start), (u1, end) = curve[0], curve[-1]
    assert (u0, u1) == (0, 120)
    assert all(math.isfinite(v) for v in log.values()) and torch.isfinite(x).all()
    assert end["energy"] < 0.8 * start["energy"], (name, start, end)


def test_boot_generator_starts_as_the_other_rows_generator(nb, small):
    """At s = 80, BOOT's student is exactly the teacher's D(80 z; 80), every other row's initial G."""
    _, _, teacher = small
    z = torch.randn(256, 2)
    with torch.no_grad():
        torch.testing.assert_close(nb["BootGenerator"](teacher)(z, 80.0), teacher(80.0 * z, 80.0), rtol=1e-5, atol=1e-5)


def test_f_distill_js_weight_is_f_second_derivative_times_r_squared():
    """h(r) = f''(r) r^2 for Jensen-Shannon's f(r) = r log r - (r + 1) log((r + 1) / 2) is sigmoid(log r)."""
    r = torch.tensor([0.05, 0.5, 1.0, 3.0, 20.0], dtype=torch.float64, requires_grad=True)
    f = r * r.log() - (r + 1) * ((r + 1) / 2).log()
    (d1,) = torch.autograd.grad(f.sum(), r, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), r)
    torch.testing.assert_close(d2 * r.detach() ** 2, torch.sigmoid(r.detach().log()))


def test_conditional_denoiser_is_tweedie_of_the_class_mixture(nb):
    """D(x; sigma, c) = x + sigma^2 grad log p_sigma(x | c) for every class, and the null class gives the ring's."""
    mix = toy2d.make_mixture("ring")
    x = (torch.rand(500, 2) * 6 - 3).double()
    for sigma in (0.1, 0.7, 3.0):
        for c in range(nb["NUM_CLASSES"] + 1):
            sub = mix if c == nb["NUM_CLASSES"] else nb["class_mixture"](mix, c)
            sub = toy2d.Mixture(sub.means.double(), sub.stds.double(), sub.weights.double())
            xg = x.clone().requires_grad_(True)
            (score,) = torch.autograd.grad(toy2d.mixture_log_prob(sub, xg, sigma).sum(), xg)
            D = nb["exact_cond_denoiser"](mix, x.float(), sigma, torch.full((500,), c))
            torch.testing.assert_close(D.double(), x + sigma**2 * score, rtol=1e-4, atol=1e-4)


def test_guided_closed_form_is_cfg(nb):
    """Guided(exact) = D_u + w (D_c - D_u): w = 0 is unconditional, w = 1 conditional, and it is linear in w."""
    mix = toy2d.make_mixture("ring")
    x, c = torch.randn(300, 2) * 2, torch.randint(0, nb["NUM_CLASSES"], (300,))
    state = type("State", (), {})()
    state.c = c
    out = {}
    for w in (0.0, 1.0, 4.0):
        state.w = w
        out[w] = nb["Guided"](state, exact=mix)(x, 0.5)
    torch.testing.assert_close(out[0.0], toy2d.exact_denoiser(mix, x, 0.5))
    torch.testing.assert_close(out[1.0], nb["exact_cond_denoiser"](mix, x, 0.5, c))
    torch.testing.assert_close(out[4.0], out[0.0] + 4 * (out[1.0] - out[0.0]), rtol=1e-5, atol=1e-5)


def test_compare_with_separates_a_dropped_mode(nb):
    """Two sample sets of the ring score near zero; dropping the lightest mode (weight 0.05) shows in every column."""
    mix = toy2d.make_mixture("ring")
    g = torch.Generator().manual_seed(0)
    a, b = (toy2d.sample_mixture(mix, 10000, generator=g) for _ in range(2))
    same = nb["compare_with"](mix, a, b)
    dropped = toy2d.Mixture(mix.means, mix.stds, torch.cat([torch.zeros(1), mix.weights[1:]]) / mix.weights[1:].sum())
    worse = nb["compare_with"](mix, toy2d.sample_mixture(dropped, 10000, generator=g), b)
    assert same["weight TV"] < 0.025 and same["mode shape KL"] < 0.02 and same["energy"] < 0.002, same
    assert worse["weight TV"] > 0.04 and worse["mode shape KL"] == math.inf and worse["energy"] > 2 * same["energy"]


@pytest.fixture(scope="module")
def cond_small(nb):
    cfg = toy2d.Config(width=64, teacher_iters=600, teacher_batch=512, batch_size=128, quiet=True, x_features=0,
                       teacher_grid_batch=0, one_step_fake_features=0, one_step_generator_features=0,
                       gen_gan_weight=0.3, fake_gan_weight=0.3)
    mix = toy2d.make_mixture("ring")
    torch.manual_seed(0)
    return cfg, mix, nb["train_cond_teacher"](cfg, mix)


def test_conditional_teacher_follows_its_class(nb, cond_small):
    """Guided Heun at w = 1 puts most samples of class c on class c's two modes."""
    cfg, mix, cond_teacher = cond_small
    c = torch.randint(0, nb["NUM_CLASSES"], (1000,))
    with torch.no_grad():
        x = nb["guided_heun"](cfg, cond_teacher, c, 1.0, torch.randn(1000, 2))
    on_class = nb["mode_class"](mix)[nb["assign_modes"](mix, x)] == c
    assert on_class.float().mean() > 0.9


@pytest.mark.parametrize("kind,w", [("DMD2", 1.0), ("VSD", 4.0), ("SNOOPI", (2.0, 6.0))])
def test_guided_student_moves_toward_the_guided_sampler(nb, cond_small, kind, w):
    cfg, mix, cond_teacher = cond_small
    c = torch.multinomial(nb["class_prior"](mix), 2000, replacement=True)
    with torch.no_grad():
        ref = nb["guided_heun"](cfg, cond_teacher, c, nb["reference_scale"](w), torch.randn(2000, 2))
    torch.manual_seed(0)
    sample, _ = nb["cond_objective"](kind, cfg, cond_teacher, mix, w)
    with torch.no_grad():
        start = toy2d.energy_distance(sample(torch.randn(2000, 2), c), ref)
    x = nb["train_cond"](kind, w, cfg, cond_teacher, mix, seed=0, updates=120, c_eval=c)
    end = toy2d.energy_distance(x, ref)
    assert end < 0.8 * start, (kind, start, end)


@pytest.mark.parametrize("kind", ["DMD2", "Decoupled DMD"])
def test_cfg_pushes_dmd_students_away_from_the_unconditional_denoiser(nb, cond_small, kind):
    """With teacher CFG 4 the DMD-type students do not approach the guided Heun sampler on a tiny budget (the
    notebook's table shows how far they end up); what their gradient must do is extrapolate away from the
    unconditional denoiser, whose large-sigma answer is the ring's centre: the samples stay on their class and
    move outward (mean radius up by more than 0.2), which the guided Heun sampler's samples do not."""
    cfg, mix, cond_teacher = cond_small
    c = torch.multinomial(nb["class_prior"](mix), 2000, replacement=True)
    torch.manual_seed(0)
    sample, _ = nb["cond_objective"](kind, cfg, cond_teacher, mix, 4.0)
    with torch.no_grad():
        start = sample(torch.randn(2000, 2), c).norm(dim=1).mean()
    x = nb["train_cond"](kind, 4.0, cfg, cond_teacher, mix, seed=0, updates=120, c_eval=c)
    assert (nb["mode_class"](mix)[nb["assign_modes"](mix, x)] == c).float().mean() > 0.98
    assert x.norm(dim=1).mean() > start + 0.2
