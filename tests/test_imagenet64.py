"""Tests of imagenet64.py: the DMD2 losses against closed forms (and the direction of a DM step), the Gaussian
teacher against autograd, the GAN head's layout and its encoder-only passes, --no-gan, --init_from, the data loaders
and their errors on broken files, kill-and-resume bit for bit, the NaN stops (loss and weights), a kill at the final
save, 2-process DDP against gradient accumulation, sampling, FID plumbing and DMD2's evaluation protocol, --bench,
the two-stage recipe end to end, and the headline bar: the unchanged loop cuts the exact Frechet distance of the
one-step student by >= 10x per class."""
import io
import json
import os
import struct
import subprocess
import sys
import zipfile
import zlib

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

import fid
import imagenet64 as m
import unet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def tiny_cfg(tmp_path, *flags):
    """The CPU preset, shortened: no pre-training, no grids, for the plumbing tests."""
    return m.parse_config(["--preset", "gaussian", "--outdir", str(tmp_path), "--pretrain_steps", "0",
                           "--sample_every", "0",
                           "--log_every", "1000", "--batch_size", "16", *flags])


def logged_steps(path):
    return [int(line.split()[1]) for line in open(path)]


def all_state(run):
    return {**{f"G.{k}": v for k, v in run.generator.state_dict().items()},
            **{f"D.{k}": v for k, v in run.fake_score.state_dict().items()}}

# ----------------------------------------------------------------------------------------------
# Formulas.

def test_gaussian_teacher_is_tweedie_denoiser():
    """D(x; sigma, y) = x + sigma^2 grad log N(x; mu_y, Sigma_y + sigma^2 I), by autograd of MultivariateNormal."""
    teacher = m.GaussianTeacher(num_classes=3, img_resolution=4, seed=1)
    g = torch.Generator().manual_seed(0)
    x0, y = teacher.sample(6, g)
    sigma = torch.tensor([0.01, 0.1, 0.5, 1.0, 5.0, 40.0])
    x = (x0 + sigma.view(-1, 1, 1, 1) * torch.randn(x0.shape, generator=g)).double().requires_grad_(True)
    d = x[0].numel()
    eye = torch.eye(d, dtype=torch.float64)
    covs = [teacher.Sigma[y[i]] + sigma[i].double() ** 2 * eye for i in range(6)]
    logp = sum(torch.distributions.MultivariateNormal(teacher.mu[y[i]].double(), covs[i]).log_prob(x[i].flatten())
               for i in range(6))
    (score,) = torch.autograd.grad(logp, x)
    expected = x + sigma.double().view(-1, 1, 1, 1) ** 2 * score
    got = teacher(x.detach().float(), sigma, F.one_hot(y, 3).float())
    assert torch.allclose(got.double(), expected, atol=2e-4, rtol=1e-4)


def test_gaussian_teacher_samples_have_the_stated_moments():
    teacher = m.GaussianTeacher(num_classes=2, img_resolution=4, seed=2)
    x, y = teacher.sample(40000, torch.Generator().manual_seed(0))
    for k in range(2):
        xk = x[y == k].flatten(1).double()
        assert torch.allclose(xk.mean(0), teacher.mu[k].double(), atol=0.03)
        assert torch.allclose(torch.cov(xk.T), teacher.Sigma[k], atol=0.03)
    assert (teacher.mu[0] - teacher.mu[1]).abs().max() > 0.1            # the classes differ


def test_karras_grid_matches_reference_values():
    """1000 Karras sigmas flipped so that index 0 is the smallest (values from dmd2.md section 2.2)."""
    grid = unet.karras_sigmas(1000, 0.002, 80.0, 7.0).flip(0)
    for idx, value in [(0, 0.002), (20, 0.00323), (500, 2.53), (980, 72.1), (999, 80.0)]:
        assert abs(grid[idx].item() - value) / value < 0.01


def test_distribution_matching_gradient_closed_form():
    """d loss_dm / dx = (x0_fake - x0_real) / mean|x - x0_real| / numel(x), with sigma from grid indices 20..980."""
    cfg = m.Config()
    real, fake = m.GaussianTeacher(3, 4, seed=0), m.GaussianTeacher(3, 4, seed=5)
    karras = unet.karras_sigmas(1000).flip(0).float()
    x = real.sample(8, torch.Generator().manual_seed(1))[0].requires_grad_(True)
    y = F.one_hot(torch.arange(8) % 3, 3).float()
    loss = m.loss_distribution_matching(x, y, real, fake, karras, cfg, torch.Generator().manual_seed(7))
    (grad,) = torch.autograd.grad(loss, x)
    g = torch.Generator().manual_seed(7)                                   # replay the same draws
    idx = torch.randint(20, 981, (8,), generator=g)
    sigma = karras[idx].view(8, 1, 1, 1)
    x_t = x.detach() + sigma * torch.randn(x.shape, generator=g)
    x0_real, x0_fake = real(x_t, sigma, y), fake(x_t, sigma, y)
    w = (x.detach() - x0_real).abs().mean(dim=[1, 2, 3], keepdim=True)
    assert torch.allclose(grad, (x0_fake - x0_real) / w / x.numel(), atol=1e-9, rtol=1e-4)
    assert grad.abs().max() > 0


def test_loss_fake_score_weighting():
    """loss_fake = mean((1/sigma^2 + 1/sigma_data^2) (fake_score(x + sigma n) - x)^2) with sigma over the whole grid."""
    fake = m.GaussianTeacher(2, 4, seed=3)
    karras = unet.karras_sigmas(1000).flip(0).float()
    x = m.GaussianTeacher(2, 4, seed=4).sample(5, torch.Generator().manual_seed(0))[0]
    y = F.one_hot(torch.arange(5) % 2, 2).float()
    loss = m.loss_fake_score(fake, x, y, karras, 0.5, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    sigma = karras[torch.randint(0, 1000, (5,), generator=g)].view(5, 1, 1, 1)
    D = fake(x + sigma * torch.randn(x.shape, generator=g), sigma, y)
    assert torch.allclose(loss, ((1 / sigma ** 2 + 4) * (D - x) ** 2).mean())


def test_gan_head_is_the_official_layout_on_the_full_size_bottleneck():
    """On EDM's full-size network (built on the meta device: shapes only) the bottleneck is 768x8x8 and the head is
    conv4x4/2-GN-SiLU-conv4x4/4-GN-SiLU-conv1x1 with the official cls_pred_branch keys."""
    with torch.device("meta"):
        net = unet.EDMPrecond(**unet.EDM_IMAGENET64)
        _, rep = net(torch.zeros(2, 3, 64, 64), torch.ones(2), torch.zeros(2, 1000), return_bottleneck=True)
    assert tuple(rep.shape) == (2, 768, 8, 8)
    head = m.build_gan_head(rep.shape[1], rep.shape[2])
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert shapes == {"0.weight": (768, 768, 4, 4), "0.bias": (768,), "1.weight": (768,), "1.bias": (768,),
                      "3.weight": (768, 768, 4, 4), "3.bias": (768,), "4.weight": (768,), "4.bias": (768,),
                      "6.weight": (1, 768, 1, 1), "6.bias": (1,)}
    assert (head[0].stride, head[0].padding, head[3].stride, head[3].padding) == ((2, 2), (1, 1), (4, 4), (0, 0))
    assert head[1].num_groups == 32 and isinstance(head[2], torch.nn.SiLU)
    assert head(torch.randn(3, 768, 8, 8)).flatten(1).shape == (3, 1)

def test_dm_step_moves_a_sample_toward_the_teachers_denoised_output():
    """Gradient descent on the surrogate moves x along x0_real - x0_fake. With a fake score that explains x itself
    (x0_fake = x), that is straight toward the teacher's denoised output: one small step brings every sample closer."""
    cfg = m.Config()
    teacher = m.GaussianTeacher(3, 4, seed=0)
    karras = unet.karras_sigmas(1000).flip(0).float()
    x = (teacher.sample(6, torch.Generator().manual_seed(1))[0] + 0.5).requires_grad_(True)   # off the data
    y = F.one_hot(torch.arange(6) % 3, 3).float()
    fake = lambda x_t, sigma, labels: x.detach()                         # x0_fake = x
    loss = m.loss_distribution_matching(x, y, teacher, fake, karras, cfg, torch.Generator().manual_seed(7))
    (grad,) = torch.autograd.grad(loss, x)
    g = torch.Generator().manual_seed(7)                                   # replay the draws: the teacher's x0_real
    sigma = karras[torch.randint(20, 981, (6,), generator=g)].view(6, 1, 1, 1)
    x0_real = teacher(x.detach() + sigma * torch.randn(x.shape, generator=g), sigma, y)
    stepped = x.detach() - 1e-3 * x.numel() * grad                         # a small step of gradient descent
    before = (x.detach() - x0_real).flatten(1).norm(dim=1)
    after = (stepped - x0_real).flatten(1).norm(dim=1)
    assert (after < before).all(), (before, after)
    cosine = F.cosine_similarity((stepped - x.detach()).flatten(1), (x0_real - x.detach()).flatten(1))
    assert torch.allclose(cosine, torch.ones(6), atol=1e-5)                # along x0_real - x0_fake exactly


def test_gan_calls_run_the_encoder_only_and_save_flops():
    """All three GAN calls go through FakeScore(classify=True), which stops after the encoder: no decoder block runs.
    Counted on the meta device at full size, the per-iteration FLOPs drop by the decoder passes the head never used."""
    net = unet.EDMPrecond(img_resolution=8, img_channels=3, label_dim=4, **m.TINY_UNET)
    fake_score = m.FakeScore(net, m.build_gan_head(32, 8))
    calls = []
    net.model.out_conv.register_forward_hook(lambda *a: calls.append("decoder"))
    for block in net.model.dec.values():
        block.register_forward_hook(lambda *a: calls.append("decoder"))
    x, y = torch.randn(2, 3, 8, 8), F.one_hot(torch.tensor([0, 3]), 4).float()
    logits = m.gan_logits(fake_score, x, y, unet.karras_sigmas(1000).flip(0), torch.Generator().manual_seed(0))
    assert logits.shape == (2, 1) and calls == []
    fake_score(x, torch.ones(2), y)
    assert "decoder" in calls                                            # the hooks do see a full pass
    full = dict(unet.EDM_IMAGENET64, dropout=0.0)
    before = m.flops_per_iteration(full, 1, encoder_only=False)
    after = m.flops_per_iteration(full, 1, encoder_only=True)
    no_gan = m.flops_per_iteration(full, 1, gan=False)
    print(f"full-size FLOPs per image and iteration: {before / 1e9:.0f} G -> {after / 1e9:.0f} G, "
          f"no GAN {no_gan / 1e9:.0f} G")
    assert no_gan < after < 0.9 * before


def test_no_gan_runs_no_gan_pass_and_needs_no_data(tmp_path, monkeypatch):
    """--no-gan skips every GAN pass (none of the three head calls, no real batch), not just their weights."""
    calls = {"head": 0, "encoder_only": 0, "real": 0}
    real_forward, real_sample = unet.EDMPrecond.forward, m.GaussianTeacher.sample

    def counting_forward(self, *args, bottleneck_only=False, **kwargs):
        calls["encoder_only"] += bottleneck_only
        return real_forward(self, *args, bottleneck_only=bottleneck_only, **kwargs)

    def counting_sample(self, n, generator):
        calls["real"] += 1
        return real_sample(self, n, generator)

    monkeypatch.setattr(unet.EDMPrecond, "forward", counting_forward)
    monkeypatch.setattr(m.GaussianTeacher, "sample", counting_sample)
    for gan in ("--gan", "--no-gan"):
        run = m.setup(tiny_cfg(tmp_path / gan, "--total_steps", "4", "--dfake_gen_update_ratio", "2", gan))
        run.fake_score.gan_head.register_forward_hook(lambda *a: calls.__setitem__("head", calls["head"] + 1))
        calls.update(head=0, encoder_only=0, real=0)
        m.start(run)
        for step in range(4):
            m.train_step(run, step)
        if gan == "--gan":                                               # 2 generator turns x 1 + 4 fake turns x 2
            assert calls == {"head": 10, "encoder_only": 10, "real": 4}
        else:
            assert calls == {"head": 0, "encoder_only": 0, "real": 0}
            assert all(p.grad is None and not p.requires_grad for p in run.fake_score.gan_head.parameters())
        run.log.close()
    cfg = m.parse_config(["--teacher", "x.pkl", "--no-gan"])
    assert m.load_data(cfg, dict(img_resolution=8, img_channels=3, label_dim=4)) is None    # stage 1 needs no images
    with pytest.raises(ValueError, match="--data is required"):
        m.load_data(m.parse_config(["--teacher", "x.pkl"]), dict(img_resolution=8, img_channels=3, label_dim=4))


def test_command_line_errors_are_one_line_without_a_traceback(tmp_path):
    """From the shell, a bad option or file ends the run with its message and exit status 1, not a traceback."""
    (tmp_path / "a_file").write_text("")
    for args, message in ((["--preset", "gaussian", "--precision", "fp16"], "--precision must be bf16 or fp32"),
                          (["--preset", "gaussian", "--outdir", str(tmp_path / "a_file")],
                           "is a file; give a folder for the run"),
                          (["sample", "--ckpt", str(tmp_path / "a_file"), "--seeds", "0-1", "--out", str(tmp_path)],
                           "a_file: not a weights-only torch checkpoint")):
        run = subprocess.run([sys.executable, os.path.join(ROOT, "imagenet64.py"), *args], capture_output=True,
                             text=True, cwd=tmp_path)
        assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
        assert run.stderr.startswith("imagenet64.py: ") and message in run.stderr, run.stderr


def test_init_from_loads_weights_only(tmp_path):
    """--init_from takes the generator and the fake score's network from another run and nothing else: the GAN head is
    freshly initialised, the optimisers have no state, the warm-up starts again, the step count starts at 0."""
    source = m.train(tiny_cfg(tmp_path / "s1", "--total_steps", "3", "--keep_every", "3", "--no-gan"))
    kept = tmp_path / "s1" / "generator_0000003.pt"
    run = m.setup(tiny_cfg(tmp_path / "s2", "--total_steps", "2", "--init_from", str(kept), "--warmup_steps", "4"))
    fresh = m.setup(tiny_cfg(tmp_path / "fresh", "--total_steps", "2"))
    assert m.start(run) == 0
    same = lambda a, b: all(torch.equal(u, v) for u, v in zip(a.state_dict().values(), b.state_dict().values()))
    assert same(run.generator, source.generator) and same(run.fake_score.unet, source.fake_score.unet)
    assert not same(run.generator, fresh.generator)
    assert same(run.fake_score.gan_head, fresh.fake_score.gan_head)    # the head as a new run initialises it
    assert not run.opt_g.state and not run.opt_d.state
    m.train_step(run, 0)
    assert run.opt_g.param_groups[0]["lr"] == 0 and run.opt_d.param_groups[0]["lr"] == 0   # warm-up from 0 again
    assert all(s["step"] == 1 for s in run.opt_g.state.values())
    run.log.close()
    with pytest.raises(ValueError, match=r"generator.pt: not an imagenet64.py checkpoint.pt or generator_XXXXXXX.pt"
                                         r".*missing fake_score"):
        m.start(m.setup(tiny_cfg(tmp_path / "s3", "--init_from", str(tmp_path / "s1" / "generator.pt"))))
    with pytest.raises(ValueError, match=r"generator_0000003.pt: written for the network .*, this run builds"):
        m.start(m.setup(tiny_cfg(tmp_path / "s4", "--init_from", str(kept), "--gauss_classes", "3")))

# ----------------------------------------------------------------------------------------------
# Data.

def write_png(path_or_file, array):
    PIL.Image.fromarray(array).save(path_or_file, format="PNG")


def test_edm_zip_folder_and_class_folders(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    names, labels = ["00000/img00000000.png", "00000/img00000001.png", "00000/img00000002.png"], [5, 0, 2]
    with zipfile.ZipFile(tmp_path / "ds.zip", "w") as z:
        for name, img in zip(names, images):
            with z.open(name, "w") as f:
                write_png(f, img)
        z.writestr("dataset.json", json.dumps({"labels": [[n, y] for n, y in zip(names, labels)]}))
    for i, name in enumerate(names):                                      # the same as an EDM folder
        os.makedirs(tmp_path / "ds" / "00000", exist_ok=True)
        write_png(tmp_path / "ds" / name, images[i])
    (tmp_path / "ds" / "dataset.json").write_text(json.dumps({"labels": [[n, y] for n, y in zip(names, labels)]}))
    for source in (tmp_path / "ds.zip", tmp_path / "ds"):
        ds = m.ImageDataset(str(source), 8)
        assert len(ds) == 3 and ds.labels == labels and ds.num_classes == 6
        assert torch.equal(ds.load(1), torch.from_numpy(images[1]).permute(2, 0, 1))
        x, y = ds.sample(10, torch.Generator().manual_seed(0))
        assert x.shape == (10, 3, 8, 8) and x.min() >= -1 and x.max() <= 1
        for xi, yi in zip(x, y.tolist()):                                 # every sample is an image, with its label
            i = labels.index(yi)
            assert torch.allclose(xi, torch.from_numpy(images[i]).permute(2, 0, 1).float() / 127.5 - 1)
    for cls, idx in (("cat", [0, 1]), ("dog", [2])):                     # class-per-subfolder: sorted names -> 0, 1
        os.makedirs(tmp_path / "cls" / cls)
        for i in idx:
            write_png(tmp_path / "cls" / cls / f"{i}.png", images[i])
    ds = m.ImageDataset(str(tmp_path / "cls"), 8)
    assert ds.files == ["cat/0.png", "cat/1.png", "dog/2.png"] and ds.labels == [0, 0, 1]
    assert m.ImageDataset(str(tmp_path / "cls"), 8, label_dim=2).labels == [0, 0, 1]
    with pytest.raises(ValueError, match="cls: 2 class subfolders, but the teacher has 3 classes"):
        m.ImageDataset(str(tmp_path / "cls"), 8, label_dim=3)       # a missing class would shift every later label


def test_data_errors_name_the_file_and_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.zip"):
        m.ImageDataset(str(tmp_path / "nope.zip"), 8)
    os.makedirs(tmp_path / "flat")
    write_png(tmp_path / "flat" / "a.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="missing labels"):
        m.ImageDataset(str(tmp_path / "flat"), 8)
    (tmp_path / "flat" / "dataset.json").write_text(json.dumps({"labels": None}))
    with pytest.raises(ValueError, match="dataset.json: no labels"):
        m.ImageDataset(str(tmp_path / "flat"), 8)
    write_png(tmp_path / "flat" / "b.png", np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "flat" / "dataset.json").write_text(json.dumps({"labels": [["a.png", 1]]}))
    with pytest.raises(ValueError, match="no label for b.png"):
        m.ImageDataset(str(tmp_path / "flat"), 8)
    os.makedirs(tmp_path / "big" / "c0")
    write_png(tmp_path / "big" / "c0" / "x.png", np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match=r"c0/x.png: image is 16x16, expected 8x8"):
        m.ImageDataset(str(tmp_path / "big"), 8)
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match="no images"):
        m.ImageDataset(str(tmp_path / "empty"), 8)

# ----------------------------------------------------------------------------------------------
# Broken and hostile files: one clear error that names the file.

def png_bytes(array):
    buf = io.BytesIO()
    PIL.Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def corrupt_images():
    good = png_bytes(np.full((8, 8, 3), 100, np.uint8))
    ihdr_end = 8 + 8 + 13 + 4                                             # signature, IHDR length+type, data, CRC
    huge = bytearray(good)                                                # IHDR claims 100000 x 100000 pixels
    huge[16:24] = struct.pack(">II", 100_000, 100_000)
    huge[29:33] = struct.pack(">I", zlib.crc32(bytes(huge[12:29])))
    ztxt = png_chunk(b"zTXt", b"comment\x00\x00" + zlib.compress(b"a" * (4 << 20)))   # 4 MB of text in 4 kB
    return {"truncated.png": good[: len(good) // 2], "empty.png": b"", "text.png": b"this is not an image\n",
            "bomb.png": bytes(huge), "ztxt.png": good[:ihdr_end] + ztxt + good[ihdr_end:]}


@pytest.mark.parametrize("name", ["truncated.png", "empty.png", "text.png", "bomb.png", "ztxt.png"])
def test_corrupt_images_give_one_error_naming_the_file(tmp_path, name):
    os.makedirs(tmp_path / "ds" / "c0")
    (tmp_path / "ds" / "c0" / "a.png").write_bytes(png_bytes(np.zeros((8, 8, 3), np.uint8)))
    (tmp_path / "ds" / "c0" / name).write_bytes(corrupt_images()[name])
    ds = m.ImageDataset(str(tmp_path / "ds"), 8)
    with pytest.raises(ValueError, match=rf"ds/c0/{name}: not a readable image"):
        ds.load(ds.files.index(f"c0/{name}"))


@pytest.mark.parametrize("content, problem", [
    ("{not json", "not valid JSON"),
    ('[["a.png", 0]]', "expected an object"),
    ('{"labels": {"a.png": 0}}', "list of \\[file name, class index\\] pairs"),
    ('{"labels": [["a.png", 0, 1]]}', "list of \\[file name, class index\\] pairs"),
    ('{"labels": [[0, "a.png"]]}', "list of \\[file name, class index\\] pairs"),
    ('{"labels": [["a.png", "3"]]}', 'the class of a.png is "3", not an integer'),
    ('{"labels": [["a.png", true]]}', "the class of a.png is true, not an integer"),
    ('{"labels": [["a.png", 1.0]]}', "the class of a.png is 1.0, not an integer"),
    ('{"labels": [["a.png", -1]]}', "a.png has class -1, outside 0..3"),
    ('{"labels": [["a.png", 4]]}', "a.png has class 4, outside 0..3"),
])
def test_malformed_dataset_json_is_refused_when_opened(tmp_path, content, problem):
    os.makedirs(tmp_path / "ds")
    (tmp_path / "ds" / "a.png").write_bytes(png_bytes(np.zeros((8, 8, 3), np.uint8)))
    (tmp_path / "ds" / "dataset.json").write_text(content)
    with pytest.raises(ValueError, match=f"ds(/dataset.json)?: .*{problem}"):
        m.ImageDataset(str(tmp_path / "ds"), 8, label_dim=4)


def test_sixteen_bit_png_is_converted_not_clipped(tmp_path):
    grey16 = np.tile(np.array([0, 257 * 100, 257 * 128, 65535], dtype=np.uint16), (8, 2))                # [8, 8]
    os.makedirs(tmp_path / "ds" / "c0")
    PIL.Image.fromarray(grey16).save(tmp_path / "ds" / "c0" / "a.png")
    assert PIL.Image.open(tmp_path / "ds" / "c0" / "a.png").mode.startswith("I")   # really a 16-bit file
    image = m.ImageDataset(str(tmp_path / "ds"), 8).load(0)                        # [3, 8, 8] uint8
    assert image.shape == (3, 8, 8) and image[:, 0, :4].tolist() == [[0, 100, 128, 255]] * 3


def test_wrong_checkpoints_give_one_error_naming_the_file(tmp_path):
    """load_generator and --resume on a checkpoint of another kind (wrong keys, or sdxl.py's layout)."""
    sdxl_like = dict(step=3, cfg={}, generator={"w": torch.zeros(1)}, guidance={}, opt_g={}, opt_d={})
    torch.save(sdxl_like, tmp_path / "sdxl_checkpoint.pt")
    with pytest.raises(ValueError, match=r"sdxl_checkpoint.pt: not an imagenet64.py generator .*missing net_kwargs"):
        m.load_generator(str(tmp_path / "sdxl_checkpoint.pt"))
    wrong = dict(step=3, net_kwargs=dict(img_resolution=8, img_channels=3, label_dim=4, **m.TINY_UNET),
                 generator={"model.nope": torch.zeros(1)})
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match=r"wrong.pt: the generator does not fit this network"):
        m.load_generator(str(tmp_path / "wrong.pt"))
    os.makedirs(tmp_path / "run")
    torch.save(sdxl_like, tmp_path / "run" / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"run/checkpoint.pt: not an imagenet64.py checkpoint.pt: missing "
                                         r"net_kwargs, fake_score, rng"):
        m.train(tiny_cfg(tmp_path / "run", "--total_steps", "2", "--resume"))


def test_nan_weights_from_a_corrupted_optimiser_state_are_never_saved(tmp_path):
    """A negative second moment in the optimiser state: the losses stay finite, AdamW's step writes NaN weights.
    The run must stop before any save, and checkpoint.pt must keep the last good (finite) state."""
    m.train(tiny_cfg(tmp_path, "--total_steps", "2", "--ckpt_every", "2"))
    ckpt = unet.load_checkpoint(str(tmp_path / "checkpoint.pt"))
    for state in ckpt["opt_d"]["state"].values():
        state["exp_avg_sq"] = -state["exp_avg_sq"] - 1.0
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    with pytest.raises(unet.NonFiniteLoss, match=r"non-finite weights in fake score .* step 2.*checkpoint.pt"):
        m.train(tiny_cfg(tmp_path, "--total_steps", "6", "--ckpt_every", "1", "--resume"))
    after = unet.load_checkpoint(str(tmp_path / "checkpoint.pt"))
    assert after["step"] == 2 and all(torch.isfinite(v).all() for v in after["fake_score"].values())
    generator = unet.load_checkpoint(str(tmp_path / "generator.pt"))["generator"]
    assert all(torch.isfinite(v).all() for v in generator.values())


def train_until_killed(tmp_path, monkeypatch, flags, kill_at):
    """Train until a file is written for which kill_at(file name, what is written) is true: a kill there."""
    real_save = unet.save_checkpoint

    def killed(obj, path):
        if kill_at(os.path.basename(path), obj):
            raise Killed()
        return real_save(obj, path)

    monkeypatch.setattr(unet, "save_checkpoint", killed)
    with pytest.raises(Killed):
        m.train(tiny_cfg(tmp_path, *flags))
    monkeypatch.setattr(unet, "save_checkpoint", real_save)


@pytest.mark.parametrize("killed_file", ["generator.pt", "checkpoint.pt"])
def test_a_kill_at_the_final_save_never_leaves_a_stale_generator(tmp_path, monkeypatch, killed_file):
    """Killed while writing either file at the last step, then --resume: generator.pt ends at the final step with the
    final weights (both write orders and both kill points are covered by the two cases)."""
    flags = ["--total_steps", "6", "--ckpt_every", "2"]
    train_until_killed(tmp_path, monkeypatch, flags, lambda name, obj: name == killed_file and obj.get("step") == 6)
    m.train(tiny_cfg(tmp_path, *flags, "--resume"))
    ckpt, gen = (unet.load_checkpoint(str(tmp_path / f)) for f in ("checkpoint.pt", "generator.pt"))
    assert ckpt["step"] == gen["step"] == 6
    final = ckpt["generator_ema"] or ckpt["generator"]                   # generator.pt holds the EMA when there is one
    assert all(torch.equal(gen["generator"][k], v) for k, v in final.items())


def test_a_kill_while_keeping_a_generator_is_redone_on_resume(tmp_path, monkeypatch):
    """The kept generator_XXXXXXX.pt is written before checkpoint.pt: a run killed while writing it resumes from the
    checkpoint before, redoes the step and keeps the file (stage 2 starts from one)."""
    flags = ["--total_steps", "6", "--ckpt_every", "2", "--keep_every", "4"]
    train_until_killed(tmp_path, monkeypatch, flags, lambda name, obj: name == "generator_0000004.pt")
    assert unet.load_checkpoint(str(tmp_path / "checkpoint.pt"))["step"] == 2
    m.train(tiny_cfg(tmp_path, *flags, "--resume"))
    assert unet.load_checkpoint(str(tmp_path / "generator_0000004.pt"))["step"] == 4


def test_resume_keeps_the_best_fid_so_far(tmp_path, monkeypatch):
    """generator_best.pt is replaced only by a lower FID than any before it, across --resume too."""
    monkeypatch.setattr(m.fid, "load_inception", lambda *a: None)
    monkeypatch.setattr(m.fid, "load_reference", lambda *a: None)
    scores = {2: 5.0, 4: 3.0, 6: 4.0}                                      # the best is step 4's, before the resume
    order = iter(scores.values())
    monkeypatch.setattr(m, "evaluate_fid", lambda *a, **k: next(order))
    flags = ["--ckpt_every", "2", "--fid_every", "2", "--fid_ref", "ref.npz"]
    m.train(tiny_cfg(tmp_path, "--total_steps", "4", *flags))
    m.train(tiny_cfg(tmp_path, "--total_steps", "6", *flags, "--resume"))
    best = unet.load_checkpoint(str(tmp_path / "generator_best.pt"))
    assert (best["step"], best["fid"]) == (4, 3.0) and scores[best["step"]] == best["fid"]


def test_a_new_run_into_a_folder_holding_a_checkpoint_is_refused(tmp_path):
    m.train(tiny_cfg(tmp_path, "--total_steps", "2"))
    with pytest.raises(ValueError, match="holds a run's checkpoint.pt; add --resume to continue it"):
        m.train(tiny_cfg(tmp_path, "--total_steps", "4"))
    assert unet.load_checkpoint(str(tmp_path / "checkpoint.pt"))["step"] == 2
    m.train(tiny_cfg(tmp_path, "--total_steps", "2", "--bench"))          # --bench writes nothing: allowed


def test_stale_temporaries_of_the_runs_own_files_are_removed_at_start(tmp_path):
    for name in ("checkpoint.pt.k2j4.tmp", "generator.pt.a8f1.tmp", "generator_0000002.pt.x.tmp", "notes.txt.tmp"):
        (tmp_path / name).write_bytes(b"partial")
    m.train(tiny_cfg(tmp_path, "--total_steps", "2", "--keep_every", "2"))
    left = sorted(f for f in os.listdir(tmp_path) if f.endswith(".tmp"))
    assert left == ["notes.txt.tmp"]                                     # someone else's file is never touched

# ----------------------------------------------------------------------------------------------
# Run management.

def test_presets_and_flags():
    cfg = m.parse_config(["--preset", "gaussian", "--batch_size", "8", "--no-tf32"])
    assert cfg.batch_size == 8 and cfg.generator_lr == m.PRESETS["gaussian"]["generator_lr"] and cfg.tf32 is False
    full = m.parse_config([])
    assert (full.batch_size, full.generator_lr, full.fake_score_lr, full.dfake_gen_update_ratio, full.max_grad_norm,
            full.gen_gan_weight, full.fake_gan_weight, full.ema_decay, full.gan, full.quantize) == \
        (280, 2e-6, 2e-6, 5, 10.0, 3e-3, 1e-2, 0.0, True, "dmd2")
    # The official run steps accelerate's scheduler once per process: 500 warm-up steps on 7 GPUs = 500/7 iterations.
    assert full.warmup_steps == pytest.approx(500 / 7)
    assert m.parse_config(["--no-gan"]).gan is False


class Killed(Exception):
    pass


def test_ctrl_c_says_which_checkpoint_is_kept(tmp_path, monkeypatch, capsys):
    """Ctrl-C in training: one line naming the checkpoint a --resume goes on from (or that none was written yet),
    status 130, no traceback."""
    argv = ["--preset", "gaussian", "--pretrain_steps", "0", "--sample_every", "0", "--log_every", "1000",
            "--batch_size", "16", "--total_steps", "6", "--ckpt_every", "2", "--dfake_gen_update_ratio", "1"]
    real = m.loss_fake_score
    for at, kept in ((1, "no checkpoint was written yet"), (4, "checkpoint.pt is kept: add --resume")):
        calls = [0]

        def ctrl_c(*args, at=at, **kwargs):
            calls[0] += 1
            if calls[0] == at:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        monkeypatch.setattr(m, "loss_fake_score", ctrl_c)
        with pytest.raises(SystemExit) as exit_info:
            m.main(argv + ["--outdir", str(tmp_path / str(at))])
        err = capsys.readouterr().err
        assert exit_info.value.code == 130 and err.startswith("imagenet64.py: interrupted") and kept in err, err


def test_kill_and_resume_is_bit_identical(tmp_path, monkeypatch):
    """12 iterations (with 2 gradient-accumulation rounds) straight through, vs. killed in the middle of
    iteration 7 (after its generator update, before its critic update) and resumed from the step-4 checkpoint."""
    flags = ["--total_steps", "12", "--ckpt_every", "4", "--batch_gpu", "8", "--dfake_gen_update_ratio", "3",
             "--log_every", "1"]
    straight = m.train(tiny_cfg(tmp_path / "a", *flags))
    calls, real = [0], m.loss_fake_score

    def dies(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 2 * 6 + 1:                                         # first critic micro-batch of iteration 7
            raise Killed()
        return real(*args, **kwargs)

    monkeypatch.setattr(m, "loss_fake_score", dies)
    with pytest.raises(Killed):
        m.train(tiny_cfg(tmp_path / "b", *flags))
    monkeypatch.setattr(m, "loss_fake_score", real)
    assert unet.load_checkpoint(str(tmp_path / "b" / "checkpoint.pt"))["step"] == 4
    assert not [f for f in os.listdir(tmp_path / "b") if f.endswith(".tmp")]
    resumed = m.train(tiny_cfg(tmp_path / "b", *flags, "--resume"))
    assert len(resumed.iter_times) == 8                                # steps 4..11 only
    for d in ("a", "b"):              # b's log: steps 5 and 6, logged before the kill and again after it, once each
        assert logged_steps(tmp_path / d / "log.txt") == list(range(1, 13))
    a, b = all_state(straight), all_state(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ca, cb = (unet.load_checkpoint(str(tmp_path / d / "checkpoint.pt")) for d in ("a", "b"))
    assert ca["step"] == cb["step"] == 12
    for opt in ("opt_g", "opt_d"):
        sa, sb = ca[opt]["state"], cb[opt]["state"]
        assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real = m.GaussianTeacher.sample
    calls = [0]

    def poisoned(self, n, generator):                                     # real images turn NaN at iteration 6
        calls[0] += 1
        x, y = real(self, n, generator)
        return (x * float("nan"), y) if calls[0] == 6 else (x, y)

    monkeypatch.setattr(m.GaussianTeacher, "sample", poisoned)
    with pytest.raises(unet.NonFiniteLoss, match=r"non-finite loss at step 5: .*loss_d=nan.*checkpoint.pt"):
        m.train(tiny_cfg(tmp_path, "--total_steps", "10", "--ckpt_every", "2"))
    ckpt = unet.load_checkpoint(str(tmp_path / "checkpoint.pt"))
    assert ckpt["step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["fake_score"].values())


def test_ddp_two_processes_equal_one_process_with_accumulation(tmp_path):
    """torchrun, 2 CPU processes (gloo), batch 16 = 2 x 8, against 1 process with 2 accumulation rounds of 8:
    the micro-batches are the same, so the weights must agree up to float summation order."""
    flags = ["--preset", "gaussian", "--pretrain_steps", "0", "--sample_every", "0", "--batch_size", "16",
             "--total_steps", "2", "--dfake_gen_update_ratio", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # --standalone: torchrun picks a free port itself, so a port left busy by an earlier run cannot fail this test.
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          os.path.join(ROOT, "imagenet64.py"), *flags, "--outdir", str(tmp_path / "ddp")],
                         env=env, cwd=ROOT, timeout=300, capture_output=True, text=True)
    assert run.returncode == 0, f"torchrun failed ({run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    cfg = m.parse_config([*flags, "--batch_gpu", "8", "--outdir", str(tmp_path / "one")])
    init = m.build_models(cfg, torch.device("cpu"))[1].state_dict()
    single = m.train(cfg)
    assert max((single.generator.state_dict()[k] - v).abs().max() for k, v in init.items()) > 1e-3  # it did train
    ddp = unet.load_checkpoint(str(tmp_path / "ddp" / "checkpoint.pt"))
    for name, state in (("generator", single.generator.state_dict()), ("fake_score", single.fake_score.state_dict())):
        for k, v in state.items():
            assert torch.allclose(ddp[name][k], v, atol=1e-5), (name, k)

# ----------------------------------------------------------------------------------------------
# Sampling, FID and --bench.

def test_sample_command_png_and_npz_are_per_seed(tmp_path):
    m.train(tiny_cfg(tmp_path, "--total_steps", "1"))
    gen = str(tmp_path / "generator.pt")
    with pytest.raises(ValueError, match="--classes 2,4: this generator has classes 0-3"):
        m.main(["sample", "--ckpt", gen, "--seeds", "0-1", "--classes", "2,4", "--out", str(tmp_path / "no")])
    m.main(["sample", "--ckpt", gen, "--seeds", "0-5", "--out", str(tmp_path / "png"), "--batch", "4"])
    m.main(["sample", "--ckpt", gen, "--seeds", "3,4-5", "--out", str(tmp_path / "a.npz"), "--batch", "1",
            "--classes", "2"])
    data = np.load(tmp_path / "a.npz")
    assert data["arr_0"].shape == (3, 8, 8, 3) and data["arr_0"].dtype == np.uint8 and list(data["labels"]) == [2, 2, 2]
    assert sorted(os.listdir(tmp_path / "png")) == [f"{s:06d}.png" for s in range(6)]
    generator, kw = m.load_generator(gen)
    z = torch.randn((3, 8, 8), generator=torch.Generator().manual_seed(4))[None]
    with torch.no_grad():
        x = m.generate(generator, z, torch.tensor([4 % kw["label_dim"]]), kw["label_dim"])
    png = np.asarray(PIL.Image.open(tmp_path / "png" / "000004.png"))
    assert np.array_equal(png, ((x[0].permute(1, 2, 0) + 1) * 127.5).clamp(0, 255).to(torch.uint8).numpy())  # DMD2's
    with torch.no_grad():                                                 # class 2 for seed 4 differs from class 0
        x2 = m.generate(generator, z, torch.tensor([2]), kw["label_dim"])
    assert np.array_equal(data["arr_0"][1], fid.to_uint8(x2[0].permute(1, 2, 0)).numpy())
    assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]                  # the .npz went in by a rename


def test_sample_checks_its_destination_before_loading_the_generator(tmp_path, monkeypatch):
    monkeypatch.setattr(m, "load_generator", lambda *a: pytest.fail("loaded the generator before checking --out"))
    (tmp_path / "a_file").write_text("")
    for out, problem in ((tmp_path / "a_file", "is a file"), (tmp_path / "a_file" / "x.npz", "cannot make its folder"),
                         (tmp_path / "a_file" / "pngs", "cannot make this folder")):
        with pytest.raises(ValueError, match=problem):
            m.main(["sample", "--ckpt", "g.pt", "--seeds", "0-1", "--out", str(out)])


def test_sample_that_fails_leaves_no_empty_folder_and_a_bad_device_is_one_line(tmp_path):
    for out in (tmp_path / "new" / "pngs", tmp_path / "new" / "deeper" / "x.npz"):
        with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
            m.main(["sample", "--ckpt", str(tmp_path / "missing.pt"), "--out", str(out)])
        assert os.listdir(tmp_path) == []
    for device, problem in (("banana", "is not a torch device"), ("cuda", "this torch sees no CUDA device")):
        if device == "cuda" and torch.cuda.is_available():
            continue
        with pytest.raises(ValueError, match=f"--device .*{device}.*{problem}"):
            m.main(["sample", "--ckpt", "g.pt", "--out", str(tmp_path / "s"), "--device", device])
        with pytest.raises(ValueError, match=problem):
            unet.init_distributed(device)                       # training and evaluate (and sdxl.py) start here
    assert os.listdir(tmp_path) == []


def test_a_file_as_outdir_or_a_folder_as_checkpoint_is_named(tmp_path):
    (tmp_path / "log.txt").write_text("")
    with pytest.raises(ValueError, match=r"--outdir .*log.txt: is a file; give a folder for the run"):
        m.check_config(tiny_cfg(tmp_path, "--outdir", str(tmp_path / "log.txt")))
    with pytest.raises(FileNotFoundError, match=r": a folder; give a checkpoint file"):
        m.main(["sample", "--ckpt", str(tmp_path), "--out", str(tmp_path / "s")])


def test_load_generator_accepts_a_bare_edmprecond_state_dict(tmp_path, monkeypatch):
    """The official DMD2 ImageNet release is a bare EDMPrecond state dict (full size; a tiny config stands in here)."""
    tiny = dict(img_resolution=8, img_channels=3, label_dim=4, **m.TINY_UNET)
    net = unet.EDMPrecond(**tiny)
    torch.save(net.state_dict(), tmp_path / "pytorch_model.bin")
    monkeypatch.setattr(unet, "EDM_IMAGENET64", tiny)
    loaded, kw = m.load_generator(str(tmp_path / "pytorch_model.bin"))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), net.state_dict().values()))
    torch.save({"foo": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt: neither"):
        m.load_generator(str(tmp_path / "other.pt"))


def test_evaluate_fid_matches_fid_py_on_the_same_images(tmp_path):
    """evaluate_fid's streamed moments vs fid.compute_statistics on the same 40 images, with a stand-in detector."""
    generator = m.train(tiny_cfg(tmp_path, "--total_steps", "1")).generator.eval()
    detector = lambda x: x.float().flatten(1)[:, ::8]                      # uint8 [B, 3, 8, 8] -> 24 "features"
    rng = np.random.default_rng(0)
    ref = (rng.normal(size=24) * 10 + 128, np.cov(rng.normal(size=(100, 24)) * 30, rowvar=False))
    score = m.evaluate_fid(generator, 4, detector, ref, num=40, batch=16)
    images = torch.cat(list(m.generate_uint8(generator, list(range(40)), [i % 4 for i in range(40)], 4, "cpu",
                                             batch=7)))
    mu, sigma = fid.compute_statistics(fid.compute_features(images, detector, progress=False))
    assert score == pytest.approx(fid.frechet_distance(mu, sigma, *ref), rel=1e-9)


def test_bench_prints_the_ratio_and_writes_nothing(tmp_path, capsys):
    res = m.main(["--preset", "gaussian", "--bench", "--batch_size", "8", "--outdir", str(tmp_path / "run")])
    assert "ratio" in capsys.readouterr().out and res["ratio"] > 0
    assert not os.path.exists(tmp_path / "run")                          # no folder, no log.txt, no checkpoint


def test_impossible_options_are_refused_at_start_each_by_name(tmp_path):
    """A 0 or a negative number, or an impossible range, fails before anything is built, not as a ZeroDivisionError
    or a hang (a covariance of one sample is NaN, and scipy's sqrtm never returns on it) later in the run."""
    flags = {"--batch_size": "0", "--dfake_gen_update_ratio": "0", "--log_every": "0", "--num_train_timesteps": "1",
             "--gauss_classes": "0", "--ema_decay": "1.5", "--fid_num": "1", "--eval_per_class": "1",
             "--min_step_percent": "0.9", "--max_step_percent": "0.1", "--total_steps": "-1", "--fid_every": "1"}
    cfg = tiny_cfg(tmp_path, *[x for kv in flags.items() for x in kv])
    with pytest.raises(ValueError) as e:
        m.check_config(cfg)
    for name in ("batch_size", "dfake_gen_update_ratio", "log_every", "num_train_timesteps", "gauss_classes",
                 "ema_decay", "fid_num", "eval_per_class", "min_step_percent", "total_steps", "fid_ref"):
        assert f"--{name}" in str(e.value), name
    m.check_config(tiny_cfg(tmp_path))                                   # the preset itself passes


def test_help_text_is_each_fields_comment_and_its_groups_note():
    helps = m.field_help()
    assert helps["bench"] == "time the loop against the sum of its network passes, then exit"      # no heading in it
    assert helps["gauss_classes"] == "number of classes of the Gaussian data model (only for --preset gaussian)"
    assert helps["quantize"].endswith("or \"edm\" (EDM's rounding)")                                # a continuation


def test_evaluate_and_sample_refuse_impossible_counts_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(m.fid, "load_inception", lambda *a: pytest.fail("loaded Inception before checking --num"))
    for argv, problem in ((["evaluate", "--folder", str(tmp_path), "--fid_ref", "r.npz", "--num", "1"], "--num >= 2"),
                          (["sample", "--ckpt", "g.pt", "--seeds", "5-2", "--out", str(tmp_path)], "range 5-2 is empty"),
                          (["sample", "--ckpt", "g.pt", "--seeds", "0-x", "--out", str(tmp_path)], "expected numbers"),
                          (["sample", "--ckpt", "g.pt", "--seeds", "0,0-3", "--out", str(tmp_path)],
                           r"lists seed\(s\) \[0\] more than once"),
                          (["sample", "--ckpt", "g.pt", "--out", str(tmp_path / "x.jpg")], "give a folder"),
                          (["sample", "--ckpt", "g.pt", "--batch", "0", "--out", str(tmp_path)], "--batch must")):
        with pytest.raises(ValueError, match=problem):
            m.main(argv)
    assert not os.path.exists(tmp_path / "x.jpg")
    fid.save_stats(tmp_path / "small.npz", np.zeros(64), np.eye(64))      # statistics, but not Inception's 2048
    with pytest.raises(ValueError, match=r"small.npz: reference statistics must be mu \[2048\].* has mu \[64\]"):
        m.main(["evaluate", "--folder", str(tmp_path), "--fid_ref", str(tmp_path / "small.npz"), "--num", "2"])

# ----------------------------------------------------------------------------------------------
# Evaluation as DMD2 reports it.

def test_dmd2_quantisation_is_bit_exact_on_known_inputs():
    """DMD2: ((x + 1) * 127.5).clamp(0, 255) then uint8, which truncates; EDM: x * 127.5 + 128, clipped, truncated."""
    x = torch.tensor([-2.0, -1.0, -0.999, -0.5, 0.0, 0.001, 0.5, 0.999, 1.0, 1.5])
    #  (x + 1) * 127.5 = -127.5, 0, 0.1275, 63.75, 127.5, 127.6275, 191.25, 254.8725, 255, 318.75
    assert fid.to_uint8(x, "dmd2").tolist() == [0, 0, 0, 63, 127, 127, 191, 254, 255, 255]
    #  x * 127.5 + 128 = -127, 0.5, 0.6275, 64.25, 128, 128.1275, 191.75, 255.3725, 255.5, 319.25
    assert fid.to_uint8(x, "edm").tolist() == [0, 0, 0, 64, 128, 128, 191, 255, 255, 255]
    assert fid.to_uint8(x, "dmd2").dtype == torch.uint8
    with pytest.raises(ValueError, match="quantize"):
        fid.to_uint8(x, "round")


def random_net(seed):
    """A tiny EDM network with random weights everywhere (EDM zero-initialises its output layer)."""
    torch.manual_seed(seed)
    net = unet.EDMPrecond(img_resolution=8, img_channels=3, label_dim=4, **m.TINY_UNET).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn(p.shape))
    return net


def test_fid_samples_are_drawn_in_fp32_even_under_autocast():
    net = random_net(0)
    plain = torch.cat(list(m.generate_uint8(net, list(range(6)), [0, 1, 2, 3, 0, 1], 4, "cpu")))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = torch.cat(list(m.generate_uint8(net, list(range(6)), [0, 1, 2, 3, 0, 1], 4, "cpu")))
        with torch.no_grad():
            z = torch.stack([torch.randn((3, 8, 8), generator=torch.Generator().manual_seed(s)) for s in range(6)])
            bf16 = fid.to_uint8(m.generate(net, z, torch.tensor([0, 1, 2, 3, 0, 1]), 4))
    assert torch.equal(plain, inside) and not torch.equal(plain, bf16)  # autocast would have changed the images


class MeanColour(torch.nn.Module):
    """A stand-in detector: 6 features per uint8 image (per-channel mean and std), cheap and deterministic."""

    def forward(self, x):
        x = x.float()
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)


def write_generator(path, net, step):
    unet.save_checkpoint(dict(step=step, net_kwargs=net.init_kwargs, generator=net.state_dict()), path)


def test_evaluator_scores_every_kept_checkpoint_and_the_release_and_picks_the_best(tmp_path, monkeypatch):
    """Four kept generators and a bare state dict (the release's format): the reference statistics are those of one
    of them under the same protocol, so that one must score ~0 and be chosen; a second call scores nothing again."""
    kw = dict(img_resolution=8, img_channels=3, label_dim=4, **m.TINY_UNET)
    nets = [random_net(i) for i in range(4)]
    for i in range(4):
        write_generator(str(tmp_path / f"generator_{1000 * (i + 1):07d}.pt"), nets[i], 1000 * (i + 1))
    monkeypatch.setattr(unet, "EDM_IMAGENET64", kw)                     # the release is full size; tiny here
    torch.save(nets[1].state_dict(), tmp_path / "pytorch_model.bin")
    detector = MeanColour()
    images = torch.cat(list(m.generate_uint8(nets[2], list(range(64)), [i % 4 for i in range(64)], 4, "cpu")))
    ref = fid.compute_statistics(fid.compute_features(images, detector, progress=False))
    out = m.evaluate_folder(str(tmp_path), detector, ref, [str(tmp_path / "pytorch_model.bin")], num=64, batch=16)
    assert len(out["scores"]) == 5 and out["best"].endswith("generator_0003000.pt")
    assert out["scores"][out["best"]] < 1e-3 < min(v for k, v in out["scores"].items() if k != out["best"])
    assert out["scores"][str(tmp_path / "pytorch_model.bin")] == pytest.approx(
        out["scores"][str(tmp_path / "generator_0002000.pt")], abs=1e-9)  # same weights, same score
    record = json.loads((tmp_path / "fid.json").read_text())
    assert record["best"] == out["best"] and record["protocol"]["quantize"] == "dmd2"
    monkeypatch.setattr(m, "evaluate_fid", lambda *a, **k: pytest.fail("scored twice"))
    assert m.evaluate_folder(str(tmp_path), detector, ref, [str(tmp_path / "pytorch_model.bin")], num=64,
                             batch=16)["best"] == out["best"]
    # a kept file written again (another run into the folder) is scored again, the others are not
    write_generator(str(tmp_path / "generator_0001000.pt"), nets[2], 1000)
    monkeypatch.setattr(m, "evaluate_fid", lambda *a, **k: 0.5)
    again = m.evaluate_folder(str(tmp_path), detector, ref, [str(tmp_path / "pytorch_model.bin")], num=64, batch=16)
    assert again["scores"] == {**out["scores"], str(tmp_path / "generator_0001000.pt"): 0.5}

# ----------------------------------------------------------------------------------------------
# The 1.28 recipe end to end: stage 1 without GAN, stage 2 from its kept checkpoint, then the evaluator.

def test_two_stage_recipe_end_to_end_on_edm_format_files(tmp_path):
    """Through the command line, on a tiny teacher pickle in EDM's format and a tiny dataset zip in EDM's format."""
    from test_unet_edm import tiny_net, write_edm_pickle               # tests/test_unet_edm.py writes EDM pickles
    write_edm_pickle(tmp_path / "edm-tiny.pkl", tiny_net(seed=3, label_dim=4, channel_mult=[1, 2]), tmp_path / "ran")
    rng = np.random.default_rng(0)
    names = [f"00000/img{i:08d}.png" for i in range(12)]
    with zipfile.ZipFile(tmp_path / "imagenet-tiny.zip", "w") as z:
        for name in names:
            z.writestr(name, png_bytes(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)))
        z.writestr("dataset.json", json.dumps({"labels": [[n, i % 4] for i, n in enumerate(names)]}))
    common = ["--teacher", str(tmp_path / "edm-tiny.pkl"), "--batch_size", "4", "--total_steps", "4", "--device", "cpu",
              "--sample_every", "0", "--log_every", "2", "--keep_every", "2"]
    m.main([*common, "--no-gan", "--outdir", str(tmp_path / "stage1")])            # no --data: no real images needed
    stage1 = unet.load_checkpoint(str(tmp_path / "stage1" / "generator_0000004.pt"))
    m.main([*common, "--data", str(tmp_path / "imagenet-tiny.zip"), "--outdir", str(tmp_path / "stage2"),
            "--init_from", str(tmp_path / "stage1" / "generator_0000004.pt"), "--generator_lr", "5e-7",
            "--fake_score_lr", "5e-7", "--warmup_steps", "2", "--dfake_gen_update_ratio", "2"])
    stage2 = unet.load_checkpoint(str(tmp_path / "stage2" / "checkpoint.pt"))
    assert stage2["step"] == 4 and stage2["cfg"]["gan"] and stage2["cfg"]["generator_lr"] == 5e-7
    assert stage2["cfg"]["init_from"].endswith("generator_0000004.pt")
    moved = max((stage2["generator"][k] - v).abs().max() for k, v in stage1["generator"].items())
    assert 0 < moved < 1e-3                                              # trained on, from stage 1, at a small lr
    head = [k for k in stage2["fake_score"] if k.startswith("gan_head.")]   # the head trained in stage 2
    assert head and all(not torch.equal(stage2["fake_score"][k], stage1["fake_score"][k]) for k in head)
    real = torch.stack([m.decode_image(png_bytes(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)), "x", 8, 3)
                        for _ in range(32)])
    ref = fid.compute_statistics(fid.compute_features(real, MeanColour(), progress=False))
    out = m.evaluate_folder(str(tmp_path / "stage2"), MeanColour(), ref, num=32, batch=16)
    assert sorted(os.path.basename(f) for f in out["scores"]) == ["generator_0000002.pt", "generator_0000004.pt"]
    assert json.loads((tmp_path / "stage2" / "fid.json").read_text())["best"] == out["best"]
    assert not (tmp_path / "ran").exists()                                # nothing from the pickle was executed

# ----------------------------------------------------------------------------------------------
# The bar: the one-step student approaches the data, per class.

def test_gaussian_preset_cuts_the_exact_frechet_distance_tenfold_per_class(tmp_path):
    """The unchanged loop with the CPU preset (closed-form teacher, tiny UNets, 400 iterations): the exact
    Frechet distance of the one-step student to N(mu_y, Sigma_y) falls >= 10x from initialisation for every
    class, with samples drawn per class (so a generator that ignored the label would fail)."""
    cfg = m.parse_config(["--preset", "gaussian", "--outdir", str(tmp_path), "--sample_every", "400",
                          "--ckpt_every", "0",
                          "--log_every", "100"])
    out = m.train(cfg)
    (s0, fd0), (s1, fd1) = out.frechet
    assert (s0, s1) == (0, cfg.total_steps) == (0, 400)
    ratios = [a / b for a, b in zip(fd0, fd1)]
    print("exact FD per class", fd0, "->", fd1, "ratios", ratios)
    assert min(fd0) > 10                                                  # the start is far from the data ...
    assert all(r >= 10 for r in ratios), ratios                           # ... and every class comes >= 10x closer
    # Labels respected: class 0's samples are far from the other classes' Gaussians.
    g, teacher = out.ema_or_g, out.teacher
    z = torch.randn(2000, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        x = m.generate(g, z, torch.zeros(2000, dtype=torch.long), 4).flatten(1).double().numpy()
    mu, cov = x.mean(0), np.cov(x, rowvar=False)
    own = fid.frechet_distance(mu, cov, teacher.mu[0].double().numpy(), teacher.Sigma[0].numpy())
    other = min(fid.frechet_distance(mu, cov, teacher.mu[k].double().numpy(), teacher.Sigma[k].numpy())
                for k in (1, 2, 3))
    assert other > 3 * own
