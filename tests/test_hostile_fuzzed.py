"""Hostile files from fuzzing the readers: deflated zip members (torch.load and the TorchScript reader inflate them
whole), zip entries that cannot be opened, .npz sizes beyond the archive, images that declare too many pixels,
checkpoint arguments that would build a network before its weights are checked, JSON nested too deeply, and malformed
LoRA files. Every one must be a ValueError (or UnpicklingError) naming the file. Every file here is small, and small
enough inflated that a reader that accepted one would still not exhaust memory."""
import collections
import dataclasses
import io
import json
import os
import pickle
import signal
import struct
import types
import zipfile
import zlib

import numpy as np
import PIL.Image
import pytest
import torch

import fid
import imagenet64
import sdxl
import unet
from test_hostile import expand_every_tensor, torch_legacy


def png(w=8, h=8):
    f = io.BytesIO()
    PIL.Image.new("RGB", (w, h)).save(f, "PNG")
    return f.getvalue()


def png_chunk(kind, data):
    """One PNG chunk: length, type, data, CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def deflated_torch_save(path, n=20):
    """A torch.save zip re-written with deflated members: n MiB of zeros in ~30 kB."""
    buf = io.BytesIO()
    torch.save({f"t{k}": torch.zeros(1 << 18) for k in range(n)}, buf)
    source = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name in source.namelist():
            z.writestr(name, source.read(name))


def test_deflated_torch_zip_is_refused_by_every_torch_load(tmp_path):
    path = tmp_path / "bomb.pt"
    deflated_torch_save(path)
    assert path.stat().st_size < 100_000
    for reader in (unet.load_checkpoint, fid.read_inception_weights, fid.read_open_clip_weights):
        with pytest.raises(ValueError, match="more than the file"):
            reader(str(path))


def test_deflated_torchscript_storages_are_refused(tmp_path):
    """300 storages of 32 KiB zeros, each deflated to ~100 bytes: each member alone fits the file, together 160x."""
    n, size = 300, 32 << 10
    items = b"".join(b"(X\x07\x00\x00\x00storagectorch\nByteStorage\n" + b"X" + struct.pack("<I", len(str(k)))
                     + str(k).encode() + b"X\x03\x00\x00\x00cpuJ" + struct.pack("<i", size) + b"tQ" for k in range(n))
    path = tmp_path / "ts.pt"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("m/code/__torch__.py", "x")
        z.writestr("m/data.pkl", b"\x80\x02(" + items + b"l.")
        for k in range(n):
            z.writestr(f"m/data/{k}", bytes(size))
    with pytest.raises((ValueError, pickle.UnpicklingError), match="more than the file"):
        fid.read_inception_weights(str(path))


def corrupt_zip(path, how):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("a.png", png())
        z.writestr("b.png", png())
    raw = bytearray(path.read_bytes())
    if how == "bad local header":
        raw[0:4] = b"XXXX"
    for at in range(len(raw) - 4):
        if raw[at:at + 4] == b"PK\x01\x02":
            if how == "encrypted":
                raw[at + 8] |= 1
            elif how == "unknown compression":
                raw[at + 10:at + 12] = struct.pack("<H", 99)
    path.write_bytes(raw)


@pytest.mark.parametrize("how", ["encrypted", "bad local header", "unknown compression"])
def test_zip_of_images_whose_entries_cannot_be_opened(tmp_path, how):
    path = tmp_path / "images.zip"
    corrupt_zip(path, how)
    _, batches = fid.image_batches(str(path))
    with pytest.raises(ValueError, match="images.zip/a.png"):
        next(batches)


def test_npz_member_declaring_more_than_the_archive(tmp_path):
    """A 3 kB .npz whose zip64 directory says its stored member is 100 GiB, as its .npy header does: np.load would
    ask for 100 GiB before reading (a raw MemoryError)."""
    declared = 100 << 30
    header = f"{{'descr': '|u1', 'fortran_order': False, 'shape': ({declared - 128}, 1, 1, 1), }}"
    header += " " * (-(10 + len(header) + 1) % 64) + "\n"
    assert 10 + len(header) == 128
    member = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + bytes(3000)
    f = io.BytesIO()
    with zipfile.ZipFile(f, "w") as z:
        z.writestr("arr_0.npy", member)
    raw = f.getvalue()
    cd, eocd = raw.find(b"PK\x01\x02"), raw.find(b"PK\x05\x06")
    entry = bytearray(raw[cd:eocd])
    name_len, extra_len = struct.unpack("<HH", entry[28:32])
    entry[20:28] = struct.pack("<II", 0xFFFFFFFF, 0xFFFFFFFF)
    entry[30:32] = struct.pack("<H", extra_len + 20)
    at = 46 + name_len + extra_len
    entry[at:at] = struct.pack("<HHQQ", 1, 16, declared, declared)
    end = bytearray(raw[eocd:])
    end[12:16] = struct.pack("<I", len(entry))
    path = tmp_path / "images.npz"
    path.write_bytes(raw[:cd] + bytes(entry) + bytes(end))
    with pytest.raises(ValueError, match="images.npz"):
        fid.image_batches(str(path))


TINY_KW = dict(img_resolution=8, img_channels=3, model_channels=16, channel_mult=[1], num_blocks=1, attn_resolutions=[])


@pytest.mark.parametrize("change, words", [(dict(label_dim=3, model_channels=-5), "negative dimension"),
                                           (dict(), "label_dim None"), (dict(label_dim=0), "label_dim 0"),
                                           # the weights do not depend on img_resolution: 32768 asked for 12.9 GB
                                           # per image; 5 channels crashed in PIL after all the sampling
                                           (dict(label_dim=3, img_resolution=32768), "img_resolution 32768"),
                                           (dict(label_dim=3, img_channels=5), "img_channels 5")])
def test_generator_arguments_are_checked_before_a_network_is_built(tmp_path, change, words):
    kw = {**TINY_KW, **change}
    state = unet.EDMPrecond(**{**kw, "model_channels": 16}).state_dict()
    path = tmp_path / "gen.pt"
    unet.save_checkpoint({"net_kwargs": kw, "generator": state}, path)
    with pytest.raises(ValueError, match=words):
        imagenet64.load_generator(str(path))


def test_a_generator_with_non_finite_weights_is_refused_by_name(tmp_path):
    """It loaded and sampled black images, with no error."""
    kw = dict(TINY_KW, label_dim=3)
    state = unet.EDMPrecond(**kw).state_dict()
    name = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
    state[name] = torch.full_like(state[name], float("nan"))
    unet.save_checkpoint({"net_kwargs": kw, "generator": state}, tmp_path / "gen.pt")
    with pytest.raises(ValueError, match="gen.pt: the generator has non-finite weights"):
        imagenet64.load_generator(str(tmp_path / "gen.pt"))


def test_generator_loads_as_before(tmp_path):
    kw = dict(TINY_KW, label_dim=3)
    net = unet.EDMPrecond(**kw)
    unet.save_checkpoint({"net_kwargs": kw, "generator": net.state_dict()}, tmp_path / "gen.pt")
    loaded, _ = imagenet64.load_generator(str(tmp_path / "gen.pt"))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), net.state_dict().values()))


DEEP = "[" * 100_000


def test_deeply_nested_json_is_refused_with_the_file_name(tmp_path):
    (tmp_path / "ds" / "0").mkdir(parents=True)
    (tmp_path / "ds" / "0" / "a.png").write_bytes(png())
    (tmp_path / "ds" / "dataset.json").write_text('{"labels": ' + DEEP)
    with pytest.raises(ValueError, match="dataset.json"):
        imagenet64.ImageDataset(str(tmp_path / "ds"), 8)
    (tmp_path / "lat").mkdir()
    unet.write_safetensors(str(tmp_path / "lat" / "latents_00000.safetensors"),
                           {"latents": torch.zeros(2, 4, 8, 8).half()}, {"captions": DEEP})
    with pytest.raises(ValueError, match="latents_00000"):
        sdxl.LatentDataset(str(tmp_path / "lat"), 64)


def lora_file(path, alpha=None, rank=4, down=0.0, **metadata):
    cfg = sdxl.TINY_UNET
    name = next(n for n in unet.lora_names(cfg) if n.endswith("attn1.to_q"))
    width = cfg.model_channels * cfg.channel_mult[1]
    state = {f"{name}.lora_down.weight": torch.full((rank, width), down),
             f"{name}.lora_up.weight": torch.ones(width, rank)}
    if alpha is not None:
        state[f"{name}.alpha"] = alpha
    metadata.setdefault("unet_config", json.dumps(dataclasses.asdict(cfg)))
    unet.write_safetensors(str(path), state, metadata)
    return str(path)


@pytest.mark.parametrize("kwargs, words", [
    (dict(unet_config=DEEP), "no UNet layout"),
    (dict(unet_config=json.dumps(dict(dataclasses.asdict(sdxl.TINY_UNET), num_head_channels=0))), "no UNet layout"),
    (dict(unet_config=json.dumps(dict(dataclasses.asdict(sdxl.TINY_UNET), model_channels=-32))), "no UNet layout"),
    (dict(unet_config=json.dumps(dict(dataclasses.asdict(sdxl.TINY_UNET), num_res_blocks=10 ** 7))), "no UNet layout"),
    # these raised AttributeError, IndexError, TypeError and RuntimeError, and the largest layout that the bounds
    # on each number allowed built two meta UNets of 8,500 transformer blocks (33 s, 0.9 GB) before it was refused
    (dict(unet_config="[1, 2]"), "no UNet layout .*not a JSON object"),
    (dict(unet_config=json.dumps(dict(dataclasses.asdict(sdxl.TINY_UNET), channel_mult=[], transformer_depth=[]))),
     "channel_mult needs at least one level"),
    (dict(unet_config=json.dumps(dict(dataclasses.asdict(sdxl.TINY_UNET), model_channels=2 ** 62))),
     "channel counts up to"),
    (dict(unet_config=json.dumps(dict(dataclasses.asdict(sdxl.TINY_UNET), in_channels=2 ** 62))),
     "channel counts up to"),
    (dict(unet_config=json.dumps(dict(dataclasses.asdict(sdxl.TINY_UNET), num_res_blocks=16, channel_mult=[1] * 8,
                                      transformer_depth=[32] * 8))), "8480 transformer blocks"),
    (dict(lora_adapter_metadata=DEEP), "lora_adapter_metadata"),
    (dict(alpha=torch.ones(3)), "not one"),
    (dict(rank=0), "rank >= 1")])
def test_malformed_lora_files_are_refused_by_name(tmp_path, kwargs, words):
    path = lora_file(tmp_path / "lora.safetensors", **kwargs)
    with pytest.raises(ValueError, match=words):
        state, metadata = sdxl.read_lora(path)
        cfg = sdxl.lora_unet_config(metadata, path)
        factors = unet.lora_from_file_state(state, cfg, path, metadata)
        unet.merge_lora(unet.SDXLUNet(cfg), factors, 1.0, path)


def latent_shard(folder, latents, captions):
    folder.mkdir(exist_ok=True)
    unet.write_safetensors(str(folder / "latents_00000.safetensors"), {"latents": latents},
                           {"captions": json.dumps(captions)})


@pytest.mark.parametrize("captions, words", [
    (["a cat", "\udcff a lone surrogate"], "caption 1: not encodable as UTF-8"),
    (["a cat", "x" * (sdxl.MAX_CAPTION_CHARS + 1)], f"caption 1: {sdxl.MAX_CAPTION_CHARS + 1} characters, more than")],
    ids=["lone surrogate", "too long"])
def test_latent_shard_captions_that_could_not_be_tokenised_are_refused_when_read(tmp_path, captions, words):
    """A lone surrogate was accepted and raised UnicodeEncodeError when a training batch first drew it, hours in."""
    latent_shard(tmp_path / "lat", torch.zeros(2, 4, 8, 8).half(), captions)
    with pytest.raises(ValueError, match=f"latents_00000.safetensors: {words}"):
        sdxl.LatentDataset(str(tmp_path / "lat"), 64)


def test_latents_of_other_dtypes_are_refused_and_non_finite_ones_are_named_when_drawn(tmp_path):
    """float8 latents beside float16 ones crashed the first batch with a RuntimeError that named no file."""
    latent_shard(tmp_path / "f8", torch.zeros(2, 4, 8, 8).to(torch.float8_e5m2), ["a", "b"])
    with pytest.raises(ValueError, match="latents_00000.safetensors: 'latents' are float8_e5m2, not float16"):
        sdxl.LatentDataset(str(tmp_path / "f8"), 64)
    latents = torch.zeros(2, 4, 8, 8).half()
    latents[1, 0, 3, 3] = float("nan")
    latent_shard(tmp_path / "nan", latents, ["a", "b"])
    data = sdxl.LatentDataset(str(tmp_path / "nan"), 64)
    with pytest.raises(ValueError, match="latents_00000.safetensors: latent 1 holds NaN or infinite values"):
        for seed in range(20):                                  # each draw takes row 1 with probability 3/4
            data.sample(2, torch.Generator().manual_seed(seed))


def test_prompts_and_captions_too_long_for_clip_are_refused_by_name(tmp_path, monkeypatch):
    """An 80 MB prompt line took 20 s and 0.7 GB to clean and tokenise, each time a batch used it; a 36 MB caption
    file made a shard whose header the reader refused, but only at train time."""
    monkeypatch.setattr(sdxl, "MAX_CAPTION_CHARS", 50)
    (tmp_path / "prompts.txt").write_text("a cat\n" + "a dog " * 20 + "\n")
    with pytest.raises(ValueError, match="prompts.txt: line 2: 119 characters, more than 50"):
        sdxl.read_prompts(str(tmp_path / "prompts.txt"))
    (tmp_path / "a.png").write_bytes(png())
    (tmp_path / "a.txt").write_text("a dog " * 20)
    with pytest.raises(ValueError, match="a.txt: the caption has 51 characters, more than 50"):
        sdxl.image_caption_pairs(str(tmp_path))
    (tmp_path / "a.txt").write_text("a dog " * 8)
    assert sdxl.image_caption_pairs(str(tmp_path)) == [(str(tmp_path / "a.png"), ("a dog " * 8).strip())]


def test_a_safetensors_header_too_large_to_read_back_is_not_written(tmp_path, monkeypatch):
    monkeypatch.setattr(unet, "MAX_HEADER_BYTES", 200)
    unet.write_safetensors(str(tmp_path / "ok.safetensors"), {"x": torch.zeros(2)}, {"m": "y" * 100})
    with pytest.raises(ValueError, match="big.safetensors: its header would be 2.. bytes, more than"):
        unet.write_safetensors(str(tmp_path / "big.safetensors"), {"x": torch.zeros(2)}, {"m": "y" * 200})
    assert sorted(os.listdir(tmp_path)) == ["ok.safetensors"]


def test_encode_inputs_name_the_file(tmp_path):
    (tmp_path / "a.png").write_bytes(png())
    (tmp_path / "a.txt").write_bytes(b"\xff\xfe caption")
    with pytest.raises(ValueError, match="a.txt"):
        sdxl.image_caption_pairs(str(tmp_path))

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0))
                     + png_chunk(b"IEND", b""))
    with pytest.raises(ValueError, match="bomb.png"):
        sdxl.load_image(str(bomb), 64)


def test_npz_of_empty_images_is_refused_before_the_detector(tmp_path):
    np.savez(tmp_path / "empty.npz", arr_0=np.zeros((4, 0, 0, 3), np.uint8))
    with pytest.raises(ValueError, match="empty.npz: images of 0x0"):
        fid.image_batches(str(tmp_path / "empty.npz"))


def test_images_declaring_more_pixels_than_fid_reads_are_refused_before_decoding(tmp_path):
    """A 5000 x 4000 PNG of zeros is a few kB; 64 of them in a batch would decode to 3.8 GB."""
    (tmp_path / "big").mkdir()
    PIL.Image.new("L", (5000, 4000)).save(tmp_path / "big" / "a.png")
    assert (tmp_path / "big" / "a.png").stat().st_size < 100_000
    _, batches = fid.image_batches(str(tmp_path / "big"))
    with pytest.raises(ValueError, match=r"a.png: cannot read image \(5000x4000 pixels, more than fid.py reads"):
        next(batches)


def test_npz_images_whose_layout_cannot_be_told_are_refused(tmp_path):
    """[N, 1, 1, 3] is 1x1 RGB images stored channels-last, but reads as 3 channels-first images of 1x3 pixels."""
    np.savez(tmp_path / "tiny.npz", arr_0=np.zeros((4, 1, 1, 3), np.uint8))
    _, batches = fid.image_batches(str(tmp_path / "tiny.npz"))
    with pytest.raises(ValueError, match=r"tiny.npz.*could be \[C, H, W\] or \[H, W, C\]"):
        next(batches)


# A second fuzzing round: corrupt deflate streams, zip fields that zipfile itself refuses, shapes of the wrong rank
# for config inference, tensors whose data is one number viewed many times, and LoRA numbers that are not finite.

def deflated_npz(path):
    """An .npz whose first member's deflate stream starts with an invalid block type."""
    f = io.BytesIO()
    np.savez_compressed(f, mu=np.zeros(3), sigma=np.eye(3))
    raw = bytearray(f.getvalue())
    name_len, extra_len = struct.unpack("<HH", raw[26:30])
    raw[30 + name_len + extra_len] = 0xFF
    path.write_bytes(raw)
    return str(path)


def test_corrupt_deflate_streams_are_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="stats.npz"):
        fid.load_stats(deflated_npz(tmp_path / "stats.npz"))
    raw = bytearray(open(sdxl.VOCAB_PATH, "rb").read())
    raw[20:30] = b"\xff" * 10
    (tmp_path / "vocab.txt.gz").write_bytes(raw)
    with pytest.raises(ValueError, match="vocab.txt.gz"):
        sdxl.load_clip_vocab(str(tmp_path / "vocab.txt.gz"))


@pytest.mark.parametrize("content", [b"\n" * (100 << 20), b"x" * (100 << 20)], ids=["newlines", "one long line"])
def test_clip_vocabulary_reads_only_the_lines_it_uses(tmp_path, content):
    """100 MiB of newlines, or one 100 MiB line, gzip to about 100 kB. The reader used to inflate and split all of
    it; it now reads the 48,895 lines it uses, each at most MAX_VOCAB_LINE characters."""
    import gzip
    import tracemalloc
    path = tmp_path / "vocab.txt.gz"
    with gzip.open(path, "wb", compresslevel=9) as f:
        f.write(content)
    assert path.stat().st_size < 200_000
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="vocab.txt.gz"):
            sdxl.load_clip_vocab(str(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 << 20


def zip_of_png(name="a.png", data=None):
    f = io.BytesIO()
    with zipfile.ZipFile(f, "w") as z:
        z.writestr(name, png() if data is None else data)
    return bytearray(f.getvalue())


def zip_version_225(raw):            # zipfile: NotImplementedError("zip file version 22.5")
    cd = raw.find(b"PK\x01\x02")
    raw[cd + 6:cd + 8] = struct.pack("<H", 225)
    return raw


def zip_directory_name_not_utf8(raw):  # the UTF-8 flag on a name that is not: UnicodeDecodeError when opened
    cd = raw.find(b"PK\x01\x02")
    raw[cd + 9] |= 8
    raw[cd + 46] = 0xFF
    return raw


def zip_local_name_not_utf8(raw):    # the same in the member's own header: UnicodeDecodeError when read
    raw[7] |= 8
    raw[30] = 0xFF
    return raw


@pytest.mark.parametrize("damage", [zip_version_225, zip_directory_name_not_utf8, zip_local_name_not_utf8])
def test_zips_that_zipfile_refuses_are_refused_by_name(tmp_path, damage):
    path = tmp_path / "images.zip"
    path.write_bytes(damage(zip_of_png()))
    with pytest.raises(ValueError, match="images.zip"):
        _, batches = fid.image_batches(str(path))
        next(batches)
    with pytest.raises(ValueError, match="images.zip"):
        imagenet64.ImageDataset(str(path), 8)


def test_a_zip_member_with_an_absolute_name_is_reported_inside_the_zip(tmp_path):
    path = tmp_path / "images.zip"
    path.write_bytes(zip_of_png("/a.png", b"not a png"))
    _, batches = fid.image_batches(str(path))
    with pytest.raises(ValueError, match="images.zip/a.png: cannot read image"):
        next(batches)


L, G, V, U = sdxl.PREFIX_CLIP_L, sdxl.PREFIX_CLIP_G, sdxl.PREFIX_VAE, sdxl.PREFIX_UNET
CLIP_L_OK = {L + "embeddings.token_embedding.weight": [49408, 64], L + "encoder.layers.0.mlp.fc1.weight": [256, 64]}
CLIP_G_OK = {G + "token_embedding.weight": [49408, 64], G + "transformer.resblocks.0.mlp.c_fc.weight": [256, 64],
             G + "positional_embedding": [3, 64]}


@pytest.mark.parametrize("part, shapes", [
    ("clip_l", {L + "embeddings.token_embedding.weight": [64]}),
    ("clip_l", {**CLIP_L_OK, L + "embeddings.position_embedding.weight": []}),
    ("clip_g", {**CLIP_G_OK, G + "text_projection": [64]}),
    ("vae", {V + "encoder.conv_in.weight": []}),
    ("vae", {V + "encoder.conv_in.weight": [0, 3, 3, 3], V + "encoder.down.0.block.0.conv2.weight": [0, 0, 3, 3],
             V + "encoder.conv_out.weight": [8, 0, 3, 3]}),
    ("unet", {U + "input_blocks.0.0.weight": [32, 4, 3, 3], U + "input_blocks.x.weight": [1]}),
    ("unet", {U + "input_blocks.0.0.weight": [32]}),
    ("unet", {U + "input_blocks.0.0.weight": [0, 4, 3, 3], U + "input_blocks.1.0.in_layers.2.weight": [0, 0, 3, 3]}),
])
def test_config_inference_refuses_shapes_of_the_wrong_rank_by_name(tmp_path, part, shapes):
    """Each used to raise IndexError, ZeroDivisionError or an unpacking ValueError without the file's name."""
    path = str(tmp_path / "model.safetensors")
    unet.write_safetensors(path, {k: torch.zeros(s, dtype=torch.float16) for k, s in shapes.items()})
    with pytest.raises(ValueError, match="model.safetensors.*: cannot infer"):
        sdxl.infer_configs(path, [part])


@pytest.mark.parametrize("part, shapes, words", [
    ("clip_l", {**CLIP_L_OK, **{f"{L}encoder.layers.{i}.x": [0] for i in range(1, 20_000)}}, "20000 layers"),
    ("clip_l", {**CLIP_L_OK, L + "embeddings.token_embedding.weight": [60, 64]}, "60 tokens"),
    ("vae", {V + "encoder.conv_in.weight": [32, 3, 3, 3],
             **{f"{V}encoder.down.{i}.block.0.conv2.weight": [32, 32, 3, 3] for i in range(11)}}, "11 levels"),
    ("vae", {V + "encoder.conv_in.weight": [48, 3, 3, 3],
             **{f"{V}encoder.down.{i}.block.0.conv2.weight": [48, 48, 3, 3] for i in range(4)}}, "width 48")],
    ids=["20,000 CLIP layers", "60 tokens", "11 VAE levels", "VAE width 48"])
def test_text_encoder_and_vae_layouts_are_bounded_before_a_model_is_built(tmp_path, part, shapes, words):
    """20,000 zero-size CLIP layers built a meta model of 1.3 GB in 22 s before the missing weights were named; a
    VAE of 11 levels decoded 64 px latents to 8192 px (out of memory) and one of 2 levels wrote 16 px images; 60
    tokens failed at the first prompt with IndexError; a width of 48 failed in GroupNorm without the file's name."""
    path = str(tmp_path / "model.safetensors")
    unet.write_safetensors(path, {k: torch.zeros(s, dtype=torch.float16) for k, s in shapes.items()})
    with pytest.raises(ValueError, match=f"model.safetensors: cannot infer .*{words}"):
        within(20, "a model was built first", lambda: sdxl.infer_configs(path, [part]))


def test_sdxl_weights_that_are_not_finite_floats_are_refused_by_name(tmp_path):
    """NaN UNet weights gave a black image with exit status 0; int and bool tensors were cast."""
    parts = sdxl.load_parts("tiny", "", "cpu")
    state = dict(parts["unet_state"])
    state["out.2.weight"] = torch.full_like(state["out.2.weight"], float("nan"))
    with pytest.raises(ValueError, match="u.safetensors: 1 of the UNet's tensors hold NaN or inf"):
        sdxl.build_unet(state, sdxl.TINY_UNET, "cpu", torch.float32, "u.safetensors")
    state["out.2.weight"] = torch.full_like(state["out.2.weight"], 7e4)              # finite, but not in fp16
    with pytest.raises(ValueError, match="hold NaN or inf in the run's dtype, e.g. out.2.weight"):
        sdxl.build_unet(state, sdxl.TINY_UNET, "cpu", torch.float16, "u.safetensors")
    state["out.2.weight"] = state["out.2.weight"].to(torch.int16)
    with pytest.raises(ValueError, match=r"u.safetensors: 1 of the UNet's tensors are not floating point, e.g. "
                                         r"out.2.weight \(int16\)"):
        sdxl.build_unet(state, sdxl.TINY_UNET, "cpu", torch.float32, "u.safetensors")


def test_a_unet_that_does_not_fit_the_text_encoders_and_vae_is_refused_by_name():
    """An 8-channel UNet, or one whose cross-attention is not the text encoders' width, failed at the first step."""
    parts = sdxl.load_parts("tiny", "", "cpu")
    sdxl.check_parts_fit(parts, sdxl.TINY_UNET, "u.safetensors")
    wrong = dataclasses.replace(sdxl.TINY_UNET, in_channels=8, context_dim=128)
    with pytest.raises(ValueError, match="u.safetensors: the UNet does not fit: context_dim 128, but the text encoders "
                                         "and VAE of the tiny random UNet give 64; in_channels 8, .* give 4"):
        sdxl.check_parts_fit(parts, wrong, "u.safetensors")


def test_a_generator_ema_that_is_a_tensor_is_refused_by_name(tmp_path):
    kw = dict(TINY_KW, label_dim=3)
    unet.save_checkpoint({"net_kwargs": kw, "generator": unet.EDMPrecond(**kw).state_dict(),
                          "generator_ema": torch.zeros(3)}, tmp_path / "gen.pt")
    with pytest.raises(ValueError, match="gen.pt: the generator does not fit"):
        imagenet64.load_generator(str(tmp_path / "gen.pt"))


def test_tensors_viewing_one_number_many_times_are_refused_by_every_torch_reader(tmp_path):
    """torch.save keeps a view's strides: zeros(1).expand(...) stores 4 bytes. A 2 kB LoRA of two such rank-2^28
    factors asked the merge for 64 GiB; a 172 kB generator checkpoint built a 4.5 GB network."""
    path = tmp_path / "views.pt"
    torch.save({"w": torch.zeros(1).expand(1 << 14, 1 << 14)}, path)
    assert path.stat().st_size < 10_000
    readers = [unet.load_checkpoint, sdxl.read_lora, fid.read_inception_weights, fid.read_open_clip_weights,
               imagenet64.load_generator, sdxl.load_training_checkpoint]
    for reader in readers:
        with pytest.raises(ValueError, match="views.pt.*expanded view"):
            reader(str(path))
    loop = []                                           # a list that contains itself loads, and is walked once
    loop.append(loop)
    torch.save({"loop": loop, "w": torch.ones(2)}, tmp_path / "loop.pt")
    loaded = within(60, "the checkpoint walker went round the loop",
                    lambda: unet.load_checkpoint(str(tmp_path / "loop.pt")))
    assert loaded["loop"][0] is loaded["loop"]
    dense = tmp_path / "dense.pt"                       # a view of a real tensor's data is not refused
    torch.save({"w": torch.arange(6.0).reshape(2, 3).t()}, dense)
    assert torch.equal(unet.load_checkpoint(str(dense))["w"], torch.arange(6.0).reshape(2, 3).t())


@pytest.mark.parametrize("kwargs, words", [
    (dict(lora_adapter_metadata=json.dumps({"unet.lora_alpha": 10 ** 400})), "not a finite number"),
    (dict(lora_adapter_metadata=json.dumps({"unet.lora_alpha": float("nan")})), "not a finite number"),
    (dict(lora_adapter_metadata=json.dumps({"unet.lora_alpha": True})), "not a number"),
    (dict(alpha=torch.tensor(float("inf"))), "not a finite number"),
    (dict(down=float("nan")), "NaN or infinite"),
    (dict(rank=200), "rank 200 is more than")])
def test_lora_numbers_that_would_spoil_the_weights_are_refused(tmp_path, kwargs, words):
    path = lora_file(tmp_path / "lora.safetensors", **kwargs)
    state, metadata = sdxl.read_lora(path)
    cfg = sdxl.lora_unet_config(metadata, path)
    model = unet.SDXLUNet(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=words):
        unet.merge_lora(model, unet.lora_from_file_state(state, cfg, path, metadata), 1.0, path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())   # nothing was changed


def test_a_lora_whose_merge_overflows_an_fp16_unet_is_refused(tmp_path):
    """Factors of 100 and an alpha of 60,000 are finite in fp16, and so is their product in float32, but the merged
    fp16 weights were inf, with no error (generate --dtype fp16 merges into an fp16 UNet)."""
    path = lora_file(tmp_path / "lora.safetensors", down=100.0, alpha=torch.tensor(60000.0, dtype=torch.float16))
    state, metadata = sdxl.read_lora(path)
    cfg = sdxl.lora_unet_config(metadata, path)
    factors = unet.lora_from_file_state(state, cfg, path, metadata)
    model = unet.SDXLUNet(cfg).half()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="(?s)lora.safetensors: cannot merge.*merged into its float16 weight it is not "
                                         "finite"):
        unet.merge_lora(model, factors, 1.0, path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())   # nothing was changed
    unet.merge_lora(unet.SDXLUNet(cfg), factors, 1.0, path)                       # float32 holds the sum


def test_a_complex_lora_alpha_is_refused_by_name(tmp_path):
    """safetensors has no complex dtype, but a torch file does: reading it refuses complex tensors, and the merge
    refuses a complex alpha however it got into the state."""
    state, metadata = sdxl.read_lora(lora_file(tmp_path / "lora.safetensors"))
    alpha_key = next(k for k in state if k.endswith(".lora_down.weight")).replace(".lora_down.weight", ".alpha")
    torch.save({**state, alpha_key: torch.tensor(1 + 2j)}, tmp_path / "lora.pt")
    with pytest.raises(ValueError, match=r"lora\.pt: tensor .*alpha'\] of shape \[\] holds torch.complex64 numbers"):
        sdxl.read_lora(str(tmp_path / "lora.pt"))
    with pytest.raises(ValueError, match="lora.pt: .*alpha is not a real number"):
        unet.lora_from_file_state({**state, alpha_key: torch.tensor(1 + 2j)}, sdxl.TINY_UNET, str(tmp_path / "lora.pt"),
                                  metadata)


# A third round, on the readers the second did not cover: tensors without dense data, dictionary keys whose repr is
# exponential, images whose PIL plugin raises something else than OSError, and JSON or checkpoint values of a wrong
# type.

@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("tensor", [lambda: torch.zeros(3).to_sparse(), lambda: torch.eye(3).to_sparse_csr(),
                                    lambda: torch.empty(32, device="meta")], ids=["sparse", "sparse csr", "meta"])
def test_tensors_without_dense_data_are_refused_by_every_torch_reader(tmp_path, tensor):
    path = tmp_path / "odd.pt"
    torch.save({"Conv2d_1a_3x3.bn.weight": tensor()}, path)
    for reader in (unet.load_checkpoint, fid.read_inception_weights, fid.read_open_clip_weights,
                   sdxl.load_training_checkpoint):
        with pytest.raises(ValueError, match="odd.pt.*checkpoints hold dense tensors"):
            reader(str(path))


def within(seconds, what, call):
    """call(), failed (not hung) if it runs past `seconds`: the cases below used to take minutes or for ever."""
    def too_long(*_):
        raise TimeoutError(what)
    previous = signal.signal(signal.SIGALRM, too_long)
    signal.alarm(seconds)
    try:
        return call()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_key_whose_repr_is_exponential_is_named_briefly(tmp_path):
    """A tuple nesting one shared tuple twice, 19 deep: 2 kB in the file, 2**19 leaves in its repr (one 20 deep is
    refused before it is unpickled: test_tuples_unsafe_to_hash_are_refused_before_they_are_unpickled)."""
    key = ()
    for _ in range(19):
        key = (key, key)
    torch.save({key: torch.zeros(1).expand(10)}, tmp_path / "key.pt")
    with pytest.raises(ValueError, match="key.pt: tensor .{0,300} of shape"):
        within(30, "the key was printed whole", lambda: unet.load_checkpoint(str(tmp_path / "key.pt")))


def test_a_png_whose_plugin_raises_an_index_error_is_refused_by_name(tmp_path):
    path = tmp_path / "iccp.png"                       # an empty iCCP chunk after the image data
    path.write_bytes(png()[:33] + png_chunk(b"IDAT", zlib.compress(bytes(200))) + png_chunk(b"iCCP", b"")
                     + png_chunk(b"IEND", b""))
    with pytest.raises(ValueError, match="iccp.png: cannot read the image"):
        sdxl.load_image(str(path), 8)


def test_an_image_pil_cannot_convert_is_refused_by_name():
    f = io.BytesIO()
    PIL.Image.new("LAB", (8, 8)).save(f, "TIFF")
    with pytest.raises(ValueError, match="lab.tif: conversion from LAB"):
        imagenet64.decode_image(f.getvalue(), "lab.tif", 8, 1)


def test_a_fid_record_that_is_not_ours_is_scored_again(tmp_path):
    (tmp_path / "deep.json").write_text("[" * 100_000)
    assert imagenet64.previous_scores(str(tmp_path / "deep.json"), {}, {}) == ({}, {})
    (tmp_path / "text.json").write_text(json.dumps({"protocol": {}, "scores": {"g.pt": "1.0"}, "files": {}}))
    assert imagenet64.previous_scores(str(tmp_path / "text.json"), {}, {}) == ({}, {})


@pytest.mark.parametrize("score", ["-" + "9" * 400, "NaN", "-Infinity", "1e999", "-1"],
                         ids=["400-digit integer", "NaN", "-inf", "1e999", "negative"])
def test_a_fid_record_whose_score_is_no_fid_is_scored_again(tmp_path, score):
    """A 400-digit integer score crashed evaluate's report (OverflowError) after it had been written back, so every
    later evaluate crashed too; NaN or -inf made min() pick that file as the best."""
    path = tmp_path / "fid.json"
    path.write_text('{"protocol": {}, "scores": {"a.pt": %s, "b.pt": 3.0}, "files": {}}' % score)
    assert imagenet64.previous_scores(str(path), {}, {}) == ({}, {})
    path.write_text('{"protocol": {}, "scores": {"a.pt": 2, "b.pt": 3.0}, "files": {}}')
    scores, _ = imagenet64.previous_scores(str(path), {}, {})
    assert scores == {"a.pt": 2.0, "b.pt": 3.0} and type(scores["a.pt"]) is float


def test_a_fid_record_too_large_to_be_ours_is_not_parsed(tmp_path, monkeypatch):
    """30 MB of empty lists took about 1 GB to parse."""
    path = tmp_path / "fid.json"
    record = json.dumps({"protocol": {}, "scores": {"a.pt": 2.0}, "files": {}})
    path.write_text(record + " " * 100)
    monkeypatch.setattr(imagenet64, "MAX_FID_RECORD_BYTES", len(record) + 100)
    assert imagenet64.previous_scores(str(path), {}, {})[0] == {"a.pt": 2.0}
    path.write_text(record + " " * 101)
    assert imagenet64.previous_scores(str(path), {}, {}) == ({}, {})


def test_a_generate_json_that_is_not_an_object_is_refused_by_name(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "generate.json").write_text("[1, 2]")
    (tmp_path / "prompts.txt").write_text("a cat\n")
    args = sdxl.build_parser()[0].parse_args(["generate", "--prompts", str(tmp_path / "prompts.txt"),
                                              "--outdir", str(tmp_path / "out")])
    with pytest.raises(ValueError, match="generate.json: not the settings object"):
        sdxl.check_image_folder(args)
    (tmp_path / "out" / "generate.json").write_text("[]," * (sdxl.MAX_SETTINGS_BYTES // 3 + 1))
    with pytest.raises(ValueError, match=f"generate.json: cannot read it \\(more than {sdxl.MAX_SETTINGS_BYTES} bytes"):
        sdxl.check_image_folder(args)


def shared_list(depth):
    items = []
    for _ in range(depth):
        items = [items, items]
    return items


@pytest.mark.parametrize("value", [torch.zeros(2), shared_list(30)], ids=["tensor", "shared list"])
def test_net_kwargs_that_are_not_plain_values_are_refused_by_name(tmp_path, value):
    """A tensor has no truth value for `!=`, and the shared list printed for ever in the mismatch message."""
    kw = dict(TINY_KW, label_dim=3)
    path = tmp_path / "checkpoint.pt"
    net = unet.EDMPrecond(**kw).state_dict()
    torch.save({**{k: None for k in imagenet64.RESUME_KEYS}, "net_kwargs": dict(kw, img_resolution=value),
                "generator": net, "fake_score": {}}, path)
    run = types.SimpleNamespace(ckpt_path=str(path), cfg=None, net_kwargs=kw)
    for call in (lambda: imagenet64.resume(run), lambda: imagenet64.init_from(run, str(path)),
                 lambda: imagenet64.load_generator(str(path))):
        with pytest.raises(ValueError, match=r"checkpoint.pt: net_kwargs\['img_resolution'\] is not a number"):
            within(30, "net_kwargs were printed whole", call)


@pytest.mark.parametrize("net_kwargs, words", [([1, 2], "net_kwargs is not a dict"),
                                               ({3: 1}, "net_kwargs has a key that is not a string")])
def test_net_kwargs_that_are_not_a_dict_of_named_values_are_refused(tmp_path, net_kwargs, words):
    path = tmp_path / "checkpoint.pt"
    torch.save({"net_kwargs": net_kwargs, "generator": {}}, path)
    with pytest.raises(ValueError, match=f"checkpoint.pt: {words}"):
        imagenet64.load_generator(str(path))


def test_a_lora_rank_that_is_a_tensor_is_refused_by_name(tmp_path):
    torch.save({"step": 1, "cfg": {"lora_rank": torch.zeros(2)}, "generator": {}, "fake_score": {}, "opt_g": {},
                "opt_d": {}}, tmp_path / "checkpoint.pt")
    run = types.SimpleNamespace(ckpt_path=str(tmp_path / "checkpoint.pt"), cfg=types.SimpleNamespace(lora_rank=0))
    with pytest.raises(ValueError, match=r"checkpoint.pt: its cfg\['lora_rank'\] is not a number"):
        sdxl.resume_training(run)


def test_latent_shards_holding_no_latents_are_refused_when_opened(tmp_path):
    unet.write_safetensors(str(tmp_path / "latents_00000.safetensors"), {"latents": torch.zeros(0, 4, 8, 8).half()},
                           {"captions": "[]"})
    with pytest.raises(ValueError, match="shards hold no latents"):
        sdxl.LatentDataset(str(tmp_path), 64)


def legacy_file(path, state, edit):
    """A legacy (pre-zip) torch.save of state (test_hostile.torch_legacy), its bytes passed through edit(raw)."""
    path.write_bytes(edit(torch_legacy(state)))
    return str(path)


def sized_past_storage(raw):
    """The 2 x 2 int64 tensor's record says 2 x 2**26, and the list of storage keys is empty, so torch grows the
    storage to 1 GiB (its set_ resizes a legacy storage to fit) and never reads it back: uninitialised memory."""
    raw = raw.replace(b"K\x02K\x02\x86", b"K\x02J\x00\x00\x00\x04\x86")
    return raw[:raw.index(b"\x80\x02]", raw.index(b"cpu"))] + b"\x80\x02]."


def key_list_declaring_1_gib(raw):
    """The list of storage keys, the last pickle, declares a 1 GiB string: torch's unpickler reads it at once."""
    return raw[:raw.index(b"\x80\x02]", raw.index(b"cpu"))] + b"\x80\x02]X" + struct.pack("<I", 1 << 30) + b"0"


@pytest.mark.parametrize("edit, words", [(sized_past_storage, "shape \\[2, 67108864\\] reaches element"),
                                         (key_list_declaring_1_gib, "declares 1073741824 bytes")],
                         ids=["tensor sized past its storage", "key list declaring 1 GiB"])
def test_legacy_torch_files_that_claim_more_than_they_hold_are_refused(tmp_path, edit, words):
    path = legacy_file(tmp_path / "legacy.pt", {"layers.conv.weight": torch.zeros(2, 2, dtype=torch.int64).t()}, edit)
    for reader in (unet.load_checkpoint, fid.read_inception_weights, fid.read_open_clip_weights):
        with pytest.raises((ValueError, pickle.UnpicklingError), match=f"legacy.pt.*{words}"):
            reader(path)


def test_storages_holding_more_than_the_file_are_refused():
    """The check behind the one above, for storages grown some other way: they may not hold more than the file."""
    a = torch.zeros(100)
    state = {"a": a, "view of a": a[:10], "b": torch.zeros(100)}          # a's storage counts once: 800 bytes
    assert unet.check_dense_tensors(state, "f.pt", file_size=800) is state
    with pytest.raises(ValueError, match="f.pt: its tensors' storages hold 800 bytes, more than the file's 799"):
        unet.check_dense_tensors(state, "f.pt", file_size=799)


def test_a_class_index_beyond_int64_is_refused_when_the_dataset_opens(tmp_path):
    with zipfile.ZipFile(tmp_path / "data.zip", "w") as z:
        z.writestr("a.png", png())
        z.writestr("dataset.json", json.dumps({"labels": [["a.png", 2 ** 63]]}))
    with pytest.raises(ValueError, match="dataset.json: the class of a.png is 9223372036854775808, not an integer"):
        imagenet64.ImageDataset(str(tmp_path / "data.zip"), 8)


def test_a_byte_order_mark_is_not_part_of_the_first_prompt_or_caption(tmp_path):
    """Windows editors may start a UTF-8 file with U+FEFF, which str.strip() keeps: the first prompt would be
    tokenized with it."""
    (tmp_path / "prompts.txt").write_bytes("\ufeffa cat\nbig dog\n".encode())
    assert sdxl.read_prompts(str(tmp_path / "prompts.txt")) == ["a cat", "big dog"]
    (tmp_path / "a.png").write_bytes(png())
    (tmp_path / "a.txt").write_bytes("\ufeffa red car".encode())
    assert sdxl.image_caption_pairs(str(tmp_path)) == [(str(tmp_path / "a.png"), "a red car")]


# ---------------------------------------------------------------------------------------------------------------
# Fourth round: .npz members that np.load would read instead of the checked ones, sizes in folders and batches,
# formats PIL decodes on opening, and headers that cost quadratic time.

def npy_bytes(array):
    f = io.BytesIO()
    np.save(f, array)
    return f.getvalue()


def npy_declaring(shape, descr, data=b""):
    """A .npy file's bytes with a hand-written header (numpy would not write these shapes)."""
    header = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}"
    header += " " * (-(11 + len(header)) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + data


def npz_file(path, members, prefix=b""):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, raw in members:
            z.writestr(name, raw)
    path.write_bytes(prefix + buf.getvalue())
    return str(path)


STATS = [("mu.npy", npy_bytes(np.arange(3.0))), ("sigma.npy", npy_bytes(np.eye(3)))]
IMAGES = ("arr_0.npy", npy_bytes(np.full((2, 8, 8, 3), 7, np.uint8)))


@pytest.mark.parametrize("shadow", [("mu", b"junk"), ("sigma", npy_bytes(np.eye(5))),
                                    ("mu", npy_declaring("(100000000000,)", "<f8"))], ids=["junk", "5x5", "745 GiB"])
def test_stats_come_from_the_checked_npy_members_not_a_member_named_like_the_key(tmp_path, shadow):
    """numpy maps key 'mu' to a member named exactly 'mu' when there is one, which nothing had checked."""
    mu, sigma = fid.load_stats(npz_file(tmp_path / "stats.npz", STATS + [shadow]))
    assert np.array_equal(mu, np.arange(3.0)) and np.array_equal(sigma, np.eye(3))


def test_images_come_from_the_zip_even_when_the_file_starts_like_one_npy(tmp_path):
    """A zip may follow anything: np.load read such a file as the .npy at its start, whose header declared 17.5 TiB."""
    for prefix in (IMAGES[1], npy_declaring("(100000000000, 8, 8, 3)", "|u1")):
        _, batches = fid.image_batches(npz_file(tmp_path / "images.npz", [IMAGES], prefix=prefix))
        assert torch.equal(next(batches), torch.full((2, 3, 8, 8), 7, dtype=torch.uint8))


def test_npy_shapes_of_booleans_are_refused_by_name(tmp_path):
    path = npz_file(tmp_path / "stats.npz", [("mu.npy", npy_declaring("(True,)", "<f8", bytes(8))),
                                             ("sigma.npy", npy_bytes(np.eye(1)))])
    with pytest.raises(ValueError, match=r"stats.npz: .*mu.npy has a shape of non-integers, \(True,\)"):
        fid.load_stats(path)


def test_a_trillion_empty_images_are_refused_before_any_index_is_made(tmp_path):
    path = npz_file(tmp_path / "images.npz", [("arr_0.npy", npy_declaring("(1000000000000, 0, 8, 3)", "|u1"))])
    with pytest.raises(ValueError, match=r"images.npz: images of 8x0 pixels"):
        fid.image_batches(path, num=10)


@pytest.mark.parametrize("sigma, words", [(np.zeros((4097, 4097), np.uint8), r"1 <= D <= 4096"),
                                          (np.full((3, 3), np.nan), "must be finite")], ids=["4097 features", "NaN"])
def test_statistics_too_large_or_not_finite_are_refused_when_read(tmp_path, sigma, words):
    """A sigma of bytes becomes 8 times as large in float64 (a 1 MB .npz of them, deflated within the allowed 64x,
    took 550 MB); NaN failed only after hours of features, in a message without the file's name."""
    np.savez(tmp_path / "stats.npz", mu=np.zeros(len(sigma), sigma.dtype), sigma=sigma)
    with pytest.raises(ValueError, match=f"stats.npz: .*{words}"):
        fid.load_stats(str(tmp_path / "stats.npz"))


def test_a_zip_member_larger_than_an_image_file_is_refused_before_it_is_read(tmp_path):
    """PIL's WebP plugin reads a whole file when it opens it: 65 MiB of zeros deflate to 65 kB."""
    with zipfile.ZipFile(tmp_path / "images.zip", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("a.webp", b"RIFF" + struct.pack("<I", 65 << 20) + b"WEBPVP8 " + bytes(65 << 20))
    _, batches = fid.image_batches(str(tmp_path / "images.zip"))
    with pytest.raises(ValueError, match=r"images.zip/a.webp: cannot read image .*more than fid.py reads"):
        next(batches)


def test_batches_of_large_images_hold_at_most_max_batch_pixels(tmp_path, monkeypatch):
    """Each 4096 x 4096 image is allowed, but 64 of them in one batch were 3.2 GB from a 1 MB zip."""
    with zipfile.ZipFile(tmp_path / "images.zip", "w") as z:
        for k in range(5):
            z.writestr(f"{k}.png", png_of(k))
    _, batches = fid.image_batches(str(tmp_path / "images.zip"))
    whole = list(batches)
    monkeypatch.setattr(fid, "MAX_BATCH_PIXELS", 2 * 8 * 8)
    _, batches = fid.image_batches(str(tmp_path / "images.zip"))
    limited = list(batches)
    assert [len(b) for b in whole] == [5] and [len(b) for b in limited] == [2, 2, 1]
    assert torch.equal(torch.cat(limited), whole[0])


def png_of(value):
    f = io.BytesIO()
    PIL.Image.new("RGB", (8, 8), (value, value, value)).save(f, "PNG")
    return f.getvalue()


def ico(size=8):
    f = io.BytesIO()
    PIL.Image.new("RGB", (size, size)).save(f, "ICO", sizes=[(size, size)])
    return f.getvalue()


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n0 0 moveto showpage\n%%EOF\n"


@pytest.mark.parametrize("data", [ico(), EPS], ids=["ICO", "EPS"])
def test_formats_pil_decodes_on_opening_or_renders_with_a_program_are_not_read(tmp_path, data):
    """PIL decodes an ICO whole when it opens it (a 64x64 entry may hold a 9000 x 9000 PNG), and renders EPS with
    Ghostscript, a program run on the file: the readers decode only the usual image formats (unet.IMAGE_FORMATS)."""
    assert PIL.Image.open(io.BytesIO(data)).format in ("ICO", "EPS")            # PIL itself would take them
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(data)
    _, batches = fid.image_batches(str(tmp_path / "images"))
    with pytest.raises(ValueError, match="a.png: cannot read image .*cannot identify"):
        next(batches)
    with pytest.raises(ValueError, match="a.png: not a readable image .*cannot identify"):
        imagenet64.decode_image(data, "a.png", 8, 3)
    with pytest.raises(ValueError, match="a.png: cannot read the image .*cannot identify"):
        sdxl.load_image(str(tmp_path / "images" / "a.png"), 8)


def test_a_dataset_json_of_millions_of_values_is_refused_before_it_is_parsed(tmp_path):
    """60 MB of '[],' deflate to 61 kB, and json.loads built 20 million lists (1.4 GB) before the labels were read.
    A json with the labels of a larger dataset than the files present (a subset of ImageNet keeping its dataset.json)
    is read."""
    with zipfile.ZipFile(tmp_path / "data.zip", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("a.png", png())
        z.writestr("dataset.json", b'{"labels": [' + b"[]," * 2_200_000 + b'["a.png", 0]]}')
    with pytest.raises(ValueError, match="dataset.json: 4400004 commas and brackets, far more than labels for 2 files"):
        imagenet64.ImageDataset(str(tmp_path / "data.zip"), 8)
    labels = [[f"{i // 1000:05d}/img{i:08d}.png", i % 1000] for i in range(300_000)] + [["a.png", 7]]
    with zipfile.ZipFile(tmp_path / "subset.zip", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("a.png", png())
        z.writestr("dataset.json", json.dumps({"labels": labels}))
    assert imagenet64.ImageDataset(str(tmp_path / "subset.zip"), 8).labels == [7]


def test_duplicate_names_in_a_safetensors_header_are_found_in_linear_time(tmp_path):
    """keys.count(k) for every key: a 1 MB header of 80,000 names took 44 s, and 100 MB are allowed."""
    n = 300_000
    body = ('{"__metadata__":{' + ",".join(f'"k{i}":""' for i in range(n)) + ',"k0":""}}').encode()
    (tmp_path / "dup.safetensors").write_bytes(len(body).to_bytes(8, "little") + body)
    with pytest.raises(ValueError, match=r"dup.safetensors: .*duplicate keys \['k0'\]"):
        within(20, "the duplicate check is quadratic", lambda: unet.read_safetensors(str(tmp_path / "dup.safetensors")))


def special_files(folder):
    """A named pipe (opening it blocks for ever) and a link to /dev/zero (reading it never ends), named as images."""
    os.mkfifo(folder / "b.png")
    os.symlink("/dev/zero", folder / "c.png")
    os.mkdir(folder / "latents_00000.safetensors")


@pytest.mark.skipif(not hasattr(os, "mkfifo") or not os.path.exists("/dev/zero"), reason="POSIX pipes and devices")
def test_pipes_devices_and_folders_named_as_files_are_refused_by_name(tmp_path):
    (tmp_path / "a.png").write_bytes(png())
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": [[n, 0] for n in ("a.png", "b.png", "c.png")]}))
    special_files(tmp_path)
    data = imagenet64.ImageDataset(str(tmp_path), 8)
    for i in (1, 2):
        with pytest.raises(ValueError, match=f"{data.files[i]}: cannot be read .*not a regular file"):
            within(20, "a pipe or a device was opened", lambda: data.load(i))
    for name in ("b.png", "c.png"):
        with pytest.raises(ValueError, match=f"{name}: cannot read .*not a regular file"):
            within(20, "a pipe or a device was opened", lambda: sdxl.load_image(str(tmp_path / name), 8))
    _, batches = fid.image_batches(str(tmp_path))
    with pytest.raises(ValueError, match="b.png: cannot read image .*not a regular file"):
        within(20, "a pipe was opened", lambda: list(batches))
    with pytest.raises(ValueError, match="latents_00000.safetensors: not a regular file"):
        sdxl.LatentDataset(str(tmp_path), 64)


# ---------------------------------------------------------------------------------------------------------------
# Fifth round: training checkpoints read back on --resume, pickled dicts, and the run's own small files.

def imagenet64_checkpoint(folder):
    """A two-iteration run of imagenet64.py's CPU preset -> (its flags, its checkpoint dict)."""
    flags = ["--preset", "gaussian", "--outdir", str(folder), "--pretrain_steps", "0", "--sample_every", "0",
             "--log_every", "1000", "--batch_size", "16"]
    imagenet64.train(imagenet64.parse_config(flags + ["--total_steps", "2"]))
    return flags, torch.load(folder / "checkpoint.pt", weights_only=True)


def edit_moments(ckpt):
    for state in ckpt["opt_d"]["state"].values():
        state["exp_avg"] = torch.zeros(1)


def edit_betas(ckpt):
    ckpt["opt_g"]["param_groups"][0]["betas"] = (0.9, 0.99, 0.5)


def edit_rng(ckpt):
    ckpt["rng"] = [{}]


def edit_state_entry(ckpt):
    ckpt["opt_g"]["state"] = {0: torch.zeros(2)}


@pytest.mark.parametrize("edit, words", [
    (edit_moments, "the fake score's optimiser state: parameter 0 .* not its parameter's shape"),
    (edit_betas, "the generator's optimiser state: the hyper-parameters .* are not AdamW's"),
    (lambda c: c.update(step="2"), "its step is '2', not an integer from 0"),
    (lambda c: c.update(step=-5), "its step is -5, not an integer from 0"),
    (lambda c: c.update(step=2.0), "its step is 2.0, not an integer from 0"),
    (lambda c: c.update(cfg={3: 1}), "its cfg has a key that is not a string"),
    (edit_rng, "its RNG state cannot be restored"),
    (edit_state_entry, "the generator's optimiser state does not fit")],
    ids=["moments of shape [1]", "three betas", "step '2'", "step -5", "step 2.0", "cfg key 3", "empty RNG state",
         "a tensor as a state entry"])
@pytest.mark.filterwarnings("ignore:Using a non-tuple sequence")       # torch's, indexing the tensor state entry
def test_imagenet64_resume_refuses_checkpoint_values_a_step_could_not_use(tmp_path, edit, words):
    """Moments smaller than their parameters made the fused CPU AdamW read and write out of bounds (a crash); the
    others raised TypeError, KeyError, IndexError or unnamed errors, some only at the first step."""
    flags, ckpt = imagenet64_checkpoint(tmp_path / "run")
    edit(ckpt)
    torch.save(ckpt, tmp_path / "run" / "checkpoint.pt")
    with pytest.raises(ValueError, match=f"checkpoint.pt: {words}"):
        imagenet64.train(imagenet64.parse_config(flags + ["--total_steps", "4", "--resume"]))


def test_init_from_a_fake_score_with_a_key_that_is_not_a_string(tmp_path):
    kw = dict(TINY_KW, label_dim=3)
    net = unet.EDMPrecond(**kw)
    torch.save({"net_kwargs": kw, "generator": net.state_dict(), "fake_score": {3: torch.zeros(1)}}, tmp_path / "i.pt")
    run = types.SimpleNamespace(net_kwargs=kw, generator=net, fake_score=types.SimpleNamespace(unet=net),
                                generator_ema=None, rank=1)
    with pytest.raises(ValueError, match="i.pt: the fake score does not fit"):
        imagenet64.init_from(run, str(tmp_path / "i.pt"))


def init_from_run(kw):
    """A stand-in for imagenet64's Run with what init_from reads: fresh networks, rank 0 (it prints)."""
    return types.SimpleNamespace(net_kwargs=kw, generator=unet.EDMPrecond(**kw),
                                 fake_score=types.SimpleNamespace(unet=unet.EDMPrecond(**kw)), generator_ema=None, rank=0)


def test_init_from_prints_only_a_step_that_is_an_integer(tmp_path, capsys):
    """--init_from printed the file's step whole: a list nesting one shared list twice, 40 deep, took a few bytes
    and never finished printing (memory grew without bound)."""
    kw = dict(TINY_KW, label_dim=3)
    net = unet.EDMPrecond(**kw).state_dict()
    for step, shown in ((shared_list(40), "step unknown"), (1234, "step 1234")):
        torch.save({"net_kwargs": kw, "generator": net, "fake_score": {f"unet.{k}": v for k, v in net.items()},
                    "step": step}, tmp_path / "i.pt")
        within(30, "the step was printed whole", lambda: imagenet64.init_from(init_from_run(kw), str(tmp_path / "i.pt")))
        assert shown in capsys.readouterr().out


@pytest.mark.parametrize("which", ["generator", "fake_score"])
def test_init_from_refuses_non_finite_weights_by_name(tmp_path, which):
    """NaN weights were taken, and training then stopped at its first step with an error that named no file."""
    kw = dict(TINY_KW, label_dim=3)
    net = unet.EDMPrecond(**kw).state_dict()
    ckpt = {"net_kwargs": kw, "generator": dict(net), "fake_score": {f"unet.{k}": v.clone() for k, v in net.items()}}
    state = ckpt[which]
    name = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
    state[name] = state[name].clone().fill_(float("nan"))
    torch.save(ckpt, tmp_path / "i.pt")
    what = "the generator" if which == "generator" else "the fake score"
    with pytest.raises(ValueError, match=f"i.pt: {what} has non-finite weights"):
        imagenet64.init_from(init_from_run(kw), str(tmp_path / "i.pt"))


@pytest.mark.parametrize("name", ["get", "items", "__class__"])
def test_a_pickled_ordered_dict_cannot_shadow_its_methods(tmp_path, name):
    """BUILD copied any state into the instance's __dict__: an attribute 'get' replaced dict.get, and the reader's
    own data.get("ema") raised TypeError."""
    od = collections.OrderedDict(ema=None)
    raw = pickle.dumps(od, protocol=2)
    raw = raw[:-1] + b"}" + pickle.dumps(name, protocol=2)[2:-1] + b"K\x05sb."   # BUILD {name: 5}, then STOP
    (tmp_path / "od.pkl").write_bytes(raw)
    with pytest.raises((ValueError, pickle.UnpicklingError), match=f"od.pkl.*sets attributes named \\['{name}'\\]"):
        unet.load_edm_pickle(str(tmp_path / "od.pkl"))


def test_a_log_line_with_a_step_of_thousands_of_digits_is_dropped(tmp_path):
    (tmp_path / "log.txt").write_text("step 1 ok\nstep " + "9" * 5000 + " ok\nstep 2 ok\n")
    unet.open_run_log(str(tmp_path), 5).close()
    assert (tmp_path / "log.txt").read_text() == "step 1 ok\nstep 2 ok\n"


@pytest.mark.skipif(not hasattr(os, "mkfifo") or not os.path.exists("/dev/zero"), reason="POSIX pipes and devices")
def test_the_runs_small_files_refuse_pipes_and_devices(tmp_path):
    """Prompts, the CLIP vocabulary, generate.json, fid.json and log.txt were opened as they were: a pipe blocked the
    command for ever, /dev/zero read until memory ran out."""
    os.mkfifo(tmp_path / "pipe")
    os.symlink("/dev/zero", tmp_path / "zero")
    for path in (tmp_path / "pipe", tmp_path / "zero"):
        with pytest.raises(ValueError, match="not a regular file"):
            within(20, "a pipe or a device was read", lambda: sdxl.read_prompts(str(path)))
        with pytest.raises(ValueError, match="not a regular file"):
            within(20, "a pipe or a device was read", lambda: sdxl.load_clip_vocab(str(path)))
        assert within(20, "fid.json was read", lambda: imagenet64.previous_scores(str(path), {}, {})) == ({}, {})
    os.mkfifo(tmp_path / "log.txt")
    with pytest.raises(ValueError, match="log.txt: not a regular file"):
        within(20, "log.txt was opened", lambda: unet.open_run_log(str(tmp_path), 0))
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(png())
    os.mkfifo(tmp_path / "images" / "a.txt")                    # was reported as a missing caption
    with pytest.raises(ValueError, match="a.txt: not a regular file"):
        sdxl.image_caption_pairs(str(tmp_path / "images"))


@pytest.mark.parametrize("kwargs, dtype, words", [
    (dict(alpha=torch.tensor(3e38)), "fp16", "NaN or infinite in torch.float16"),
    (dict(down=float("nan")), "fp32", "NaN or infinite"),
    (dict(rank=70), "fp32", "rank 70 is more than")], ids=["alpha past fp16", "NaN factors", "rank above the weight's"])
def test_export_of_a_lora_refuses_what_a_merge_would_refuse(tmp_path, kwargs, dtype, words):
    """export --lora wrote such factors as they were: a file that generate --lora then refused (or, in fp16, an alpha
    of inf)."""
    path = lora_file(tmp_path / "lora.safetensors", **kwargs)
    out = tmp_path / "kohya.safetensors"
    with pytest.raises(ValueError, match=f"(?s)lora.safetensors: cannot export .*{words}"):
        sdxl.export_lora(types.SimpleNamespace(lora=path, format="kohya", dtype=dtype, out=str(out)))
    assert not out.exists()


def torch_zip_with_pickle(path, data_pkl):
    """A torch.save zip whose data.pkl is replaced by the given pickle bytes."""
    buf = io.BytesIO()
    torch.save({}, buf)
    with zipfile.ZipFile(buf) as src, zipfile.ZipFile(path, "w") as out:
        for info in src.infolist():
            out.writestr(info, data_pkl if info.filename.endswith("data.pkl") else src.read(info))


# {key: 1} whose key nests 200,000 tuples (hashing it overflows the C stack: a segfault), and one whose key nests one
# shared tuple twice, 60 deep (hashing it takes 2**60 steps)
DEEP_KEY = b"\x80\x02}K\x00" + b"\x85" * 200_000 + b"K\x01s."
SHARED_KEY = b"\x80\x02}K\x00" + b"q\x00h\x00\x86" * 60 + b"K\x01s."


@pytest.mark.parametrize("data", [DEEP_KEY, SHARED_KEY], ids=["deep", "shared"])
def test_tuples_unsafe_to_hash_are_refused_before_they_are_unpickled(tmp_path, data):
    """A dict key, a set item or a constructor hashes a tuple in C: one 200,000 deep crashed the process (segfault),
    one nesting a shared tuple twice at each of 60 levels would hash for ever. Every pickle reader refuses both."""
    (tmp_path / "a.pkl").write_bytes(data)
    torch_zip_with_pickle(tmp_path / "a.pt", data)
    for call in (lambda: unet.load_edm_pickle(str(tmp_path / "a.pkl")),
                 lambda: unet.load_checkpoint(str(tmp_path / "a.pt")),
                 lambda: sdxl.load_training_checkpoint(str(tmp_path / "a.pt")),
                 lambda: fid.read_inception_weights(str(tmp_path / "a.pt"))):
        with pytest.raises((ValueError, pickle.UnpicklingError), match=r"a\.p.*a tuple \d+ deep with \d+ items"):
            within(20, "hashing a hostile tuple", call)


def test_weights_files_with_small_tuples_still_load(tmp_path):
    """Shapes, strides and argument tuples, shared by memo references as a pickler writes them, pass the scan."""
    shared = (3, 4)
    obj = {"w": torch.ones(3, 4), "meta": {(shared, shared): [shared] * 100, ((1, 2), (3, (4, (5,)))): 1}}
    unet.save_checkpoint(obj, tmp_path / "ok.pt")
    assert unet.load_checkpoint(str(tmp_path / "ok.pt"))["meta"][(shared, shared)][0] == (3, 4)


def test_deep_nesting_is_checked_in_linear_time():
    """check_dense_tensors copied the path of keys at every level: 80,000 nested lists took 7.7 s, 1M for minutes."""
    obj = [torch.zeros(1)]
    for _ in range(300_000):
        obj = [obj]
    within(20, "a deep container", lambda: unet.check_dense_tensors({"a": obj}, "x.pt"))
    obj[0] = torch.zeros(1).expand(10)
    with pytest.raises(ValueError, match=r"x\.pt: tensor \['a'\]\[0\] of shape \[10\] .*expanded view"):
        unet.check_dense_tensors({"a": obj}, "x.pt")


def test_an_sdxl_training_checkpoint_of_deflated_members_is_refused(tmp_path):
    """sdxl.py --resume read checkpoint.pt with torch.load directly: 1.5 MB of deflated zeros loaded as 3 GB."""
    buf = io.BytesIO()
    torch.save({"step": 0}, buf)
    with zipfile.ZipFile(buf) as src, zipfile.ZipFile(tmp_path / "checkpoint.pt", "w") as out:
        for info in src.infolist():
            data = src.read(info)
            deflate = info.filename.endswith("data.pkl")
            out.writestr(info, data + b"\0" * (50 << 20) if deflate else data,
                         compress_type=zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED)
    with pytest.raises(ValueError, match=r"checkpoint\.pt: .*zip members declare \d+ bytes, more than the file"):
        sdxl.load_training_checkpoint(str(tmp_path / "checkpoint.pt"))


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
def test_nested_and_complex_tensors_are_refused(tmp_path):
    """A nested tensor reports the strided layout, and export --unet then failed on its shape with a traceback."""
    torch.save({"input_blocks.0.0.weight": torch.nested.nested_tensor([torch.zeros(2), torch.zeros(3)])},
               tmp_path / "nested.pt")
    torch.save({"w": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "complex.pt")
    with pytest.raises(ValueError, match=r"nested\.pt: tensor \['input_blocks.0.0.weight'\] of shape \(nested\) is"):
        unet.load_checkpoint(str(tmp_path / "nested.pt"))
    with pytest.raises(ValueError, match=r"complex\.pt: tensor \['w'\] of shape \[2\] holds torch.complex64 numbers"):
        unet.load_checkpoint(str(tmp_path / "complex.pt"))


def test_an_edm_teacher_of_expanded_views_is_refused_before_it_is_copied(tmp_path):
    """load_edm_pickle keeps a tensor saved as one number viewed at full shape a view (valid, and cheap), but the
    generator and the fake score copy the teacher: a 228 kB file declaring a network 4x wider cost 19 GB per copy."""
    from test_unet_edm import write_edm_pickle
    kwargs = {**unet.EDM_IMAGENET64, "model_channels": 32, "img_resolution": 16, "label_dim": 10}
    with torch.device("meta"):
        src = expand_every_tensor(unet.EDMPrecond(**kwargs), torch.float32)
    write_edm_pickle(tmp_path / "views.pkl", src, tmp_path / "marker",
                     root_kwargs={**kwargs, "model_type": "DhariwalUNet"})
    cfg = imagenet64.Config(teacher=str(tmp_path / "views.pkl"))
    with pytest.raises(ValueError, match=r"views\.pkl: \d+ of its tensors .* are expanded views"):
        imagenet64.load_teacher_network(cfg)


def test_an_sdxl_layout_of_thousands_of_blocks_is_refused_before_a_model_is_built(tmp_path):
    """Zero-size tensors named like 6,000 ResBlocks made infer_sdxl_unet_config build a 6,000-block UNet on the meta
    device (2 GB, 41 s): a layout is bounded as a LoRA's is."""
    shapes = {"input_blocks.0.0.weight": (32, 4, 3, 3), "input_blocks.1.0.in_layers.2.weight": (32, 32, 3, 3),
              "out.2.weight": (4, 32, 3, 3), "label_emb.0.0.weight": (32, 8), "x.attn2.to_k.weight": (32, 8),
              "middle_block.1.transformer_blocks.0.x": (0,), "input_blocks.1.1.transformer_blocks.0.x": (0,)}
    for i in range(2, 6001):
        shapes[f"input_blocks.{i}.0.x"] = shapes[f"input_blocks.{i}.1.transformer_blocks.0.x"] = (0,)
    with pytest.raises(ValueError, match=r"blocks\.safetensors: .* 1 levels of 6000 ResBlocks \(at most 8 of 16\)"):
        within(20, "a 6000-block layout", lambda: unet.infer_sdxl_unet_config(shapes, "blocks.safetensors"))


def test_a_prompt_of_one_enormous_word_tokenizes_at_once():
    """BPE's time grows faster than a word's length (a 128 kB word took 99 s): a word is cut at 2,560 bytes, and a
    prompt's words after its 75th token are not encoded. The 75 tokens kept are those of the word's first bytes."""
    rng = np.random.default_rng(0)
    word = "".join(chr(c) for c in rng.integers(ord("a"), ord("z") + 1, 1_000_000))
    ids = within(20, "a 1 MB word", lambda: sdxl.tokenize([word, "a cat " * 100_000]))
    assert ids.shape == (2, 77) and ids[0, 76] == sdxl.EOT and ids[1, 76] == sdxl.EOT
    assert torch.equal(ids[0], sdxl.tokenize(word[:3000])[0])


def progressive_jpeg_with_repeated_scans(path, repeats, side=64):
    """A valid progressive JPEG whose second scan (an AC band) is repeated before the end marker."""
    buf = io.BytesIO()
    PIL.Image.new("L", (side, side), 128).save(buf, "JPEG", progressive=True, quality=90)
    b, segments, i = buf.getvalue(), [], 2
    while b[i + 1] != 0xD9:
        j = i + 2 + int.from_bytes(b[i + 2:i + 4], "big")
        if b[i + 1] == 0xDA:                                   # entropy-coded data runs to the next marker
            while not (b[j] == 0xFF and b[j + 1] not in (0x00, *range(0xD0, 0xD8))):
                j += 1
        segments.append(b[i:j])
        i = j
    scans = [s for s in segments if s[1] == 0xDA]
    path.write_bytes(b"\xff\xd8" + b"".join(segments) + scans[1] * repeats + b"\xff\xd9")


def test_a_jpeg_of_thousands_of_scans_is_refused_before_decoding(tmp_path):
    """Each scan is decoded over the whole image: 30,000 repeats of one scan (1 MB) took 28 s at 4096 x 4096."""
    (tmp_path / "images").mkdir()
    progressive_jpeg_with_repeated_scans(tmp_path / "images" / "a.jpg", 1000)
    progressive_jpeg_with_repeated_scans(tmp_path / "ok.jpg", 0)
    assert PIL.Image.open(tmp_path / "images" / "a.jpg").load() is not None          # PIL itself decodes it
    _, batches = fid.image_batches(str(tmp_path / "images"))
    with pytest.raises(ValueError, match=r"a\.jpg: cannot read image \(a JPEG of 100\d scans \(at most 100\)"):
        next(batches)
    with pytest.raises(ValueError, match=r"a\.jpg: cannot read the image .*a JPEG of 100\d scans"):
        sdxl.load_image(str(tmp_path / "images" / "a.jpg"), 32)
    assert sdxl.load_image(str(tmp_path / "ok.jpg"), 32).shape == (3, 32, 32)


def test_sdxl_reads_no_image_file_over_the_size_limit(tmp_path):
    """PIL's WebP plugin reads a whole file when it opens it: sdxl.py's images have fid.py's size limit."""
    path = tmp_path / "big.png"
    path.write_bytes(png() + b"\0" * fid.MAX_IMAGE_BYTES)
    with pytest.raises(ValueError, match=r"big\.png: cannot read the image .*bytes, more than an image may have"):
        sdxl.load_image(str(path), 8)


# A seventh round went around the pickle scan: each reader must scan the bytes that torch then unpickles, and no
# allowed global may hand an unscanned tuple (or a numpy dtype that hashes for ever) to a dict key.

def test_a_pickle_torch_finds_under_another_case_is_scanned(tmp_path):
    """torch's zip reader finds archive/DATA.PKL when it looks for data.pkl; the scan looked for '.pkl' only."""
    buf = io.BytesIO()
    torch.save({}, buf)
    with zipfile.ZipFile(buf) as src, zipfile.ZipFile(tmp_path / "a.pt", "w") as out:
        for info in src.infolist():
            if info.filename.endswith("data.pkl"):
                out.writestr(info.filename.replace("data.pkl", "DATA.PKL"), SHARED_KEY)
            else:
                out.writestr(info, src.read(info))
    with pytest.raises(ValueError, match=r"a\.pt: .*a tuple 20 deep"):
        within(20, "an unscanned pickle", lambda: unet.load_checkpoint(str(tmp_path / "a.pt")))


def test_a_zip_whose_directory_is_not_where_its_end_record_says_is_refused(tmp_path):
    """Python's zipfile shifts offsets by the bytes it finds in front of the directory, torch's reader does not: a
    file with two directories showed Python a harmless data.pkl and torch another (or a zip bomb)."""
    buf = io.BytesIO()
    torch.save({"a": 1}, buf)
    raw = buf.getvalue()
    start = zipfile._EndRecData(io.BytesIO(raw))[zipfile._ECD_OFFSET]
    (tmp_path / "two.pt").write_bytes(raw[:start] + bytes(64) + raw[start:])
    with pytest.raises(ValueError, match=r"two\.pt: .*zip directory is 64 bytes away from where its end record"):
        unet.load_checkpoint(str(tmp_path / "two.pt"))


def test_a_legacy_file_ending_in_a_zip_end_record_is_scanned_as_torch_reads_it(tmp_path):
    """zipfile.is_zipfile finds an end record anywhere near the end; torch decides by the first four bytes, so a
    legacy file with an empty zip's end record appended went unscanned."""
    legacy = torch_legacy({"a": 1})
    main = legacy.index(b"\x80\x02}", len(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)) + 8)  # after 3 headers
    header = legacy[:main]
    (tmp_path / "a.pt").write_bytes(header + SHARED_KEY + pickle.dumps([], protocol=2) + b"PK\x05\x06" + bytes(18))
    with pytest.raises(ValueError, match=r"a\.pt: .*a tuple 20 deep"):
        within(20, "an unscanned legacy file", lambda: unet.load_checkpoint(str(tmp_path / "a.pt")))


def test_callables_cannot_hand_a_pickle_unscanned_tuples_or_dtypes():
    """scan_pickle counts every call's result as one item, so no allowed global may return its argument (a tuple
    built one level at a time) or a numpy dtype a BUILD can give fields (numpy hashes them again at every
    reference); and a legacy storage record is refused if torch would read it as a zip, which the scan cannot see."""
    for rebuild in (unet._rebuild_parameter, fid._rebuild_parameter):
        with pytest.raises(pickle.UnpicklingError, match="holds a tuple, not a tensor"):
            rebuild(((),))
    record = unet._numpy_dtype("f8")
    with pytest.raises(pickle.UnpicklingError, match="fields or subarrays"):
        record.__setstate__((3, "<", None, ("x",), {"x": (record, 0)}, 8, 1, 16))
    record.__setstate__(np.dtype("f8").__reduce__()[2])
    assert unet._numpy_scalar(record, np.float64(0.5).tobytes()) == 0.5 and hash(record) is not None
    with pytest.raises(pickle.UnpicklingError, match="holds a zip, not torch's legacy storage format"):
        unet.load_legacy_storage(b"PK\x03\x04" + bytes(100))


def test_a_safetensors_header_of_millions_of_values_is_refused_before_it_is_parsed(tmp_path):
    """json.loads built every value of a header before any entry was checked: the 100 MB a header may have, as empty
    lists, peaked at 2.5 GB (7.5 MB at 0.2 GB). Commas and brackets are counted first; a real header needs about ten
    per tensor."""
    raw = b'{"a": [' + b"[]," * 2_500_000 + b"[]]}"
    path = tmp_path / "lists.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(ValueError, match=r"lists.safetensors: header holds 5,000,003 commas and brackets"):
        unet.read_safetensors_header(str(path))
    real = {f"t{i}": {"dtype": "F16", "shape": [320, 320, 3, 3], "data_offsets": [0, 0]} for i in range(3)}
    text = json.dumps(real)
    assert text.count(",") + text.count("[") + text.count("{") == 30          # ten per tensor, as unet.py says
