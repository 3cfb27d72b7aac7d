"""SDXL in plain PyTorch, for DMD2 text-to-image distillation (Yin et al. 2024, Sec. 5 and App. C).

Reads Stability's single-file checkpoint `sd_xl_base_1.0.safetensors` with a hand-written safetensors reader
and rebuilds the two text encoders (CLIP ViT-L/14, OpenCLIP ViT-bigG/14), their BPE tokenizer, the
micro-conditioning vector and the VAE, with module names equal to the checkpoint's keys so that loading
needs no renaming table. Only torch, numpy, pillow, tqdm and scipy are imported.
Upstream sources of each part are named where it is built: Stability-AI/generative-models ("sgm"), openai/CLIP,
mlfoundations/open_clip, huggingface transformers/diffusers (test references), tianweiy/DMD2.

Run it (CPU is fine for these; no weights are needed for `tokenize`):
    python sdxl.py tokenize "a photo of a cat"               # CLIP BPE ids for both encoders (< 1 s)
    python sdxl.py inspect sd_xl_base_1.0.safetensors        # tensor counts, dtypes and bytes per prefix (< 1 s)
In Python (one GPU; ~1.7 GB of text encoders in fp16 + 0.33 GB of VAE in fp32):
    clip_l, clip_g, vae = load_sdxl_parts("sd_xl_base_1.0.safetensors", device="cuda", dtype=torch.float16)
    context, pooled = encode_prompt(clip_l, clip_g, ["a photo of a cat"])     # [1, 77, 2048], [1, 1280]
    y = vector_cond(pooled, (1024, 1024), (0, 0), (1024, 1024))               # [1, 2816]
    images = vae.decode(latents)                                              # [B, 3, 8h, 8w] in about [-1, 1]
"""
import argparse
import functools
import gzip
import html
import json
import math
import mmap
import os
import re
import unicodedata
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
VOCAB_PATH = os.path.join(HERE, "bpe_simple_vocab_16e6.txt.gz")  # CLIP's BPE merges (MIT, from open_clip/openai CLIP)

# Prefixes of the three parts inside sd_xl_base_1.0.safetensors (587 + 248 + 1680 = 2515 tensors, all F16).
PREFIX_CLIP_L = "conditioner.embedders.0.transformer.text_model."  # CLIP ViT-L/14, Hugging Face names
PREFIX_CLIP_G = "conditioner.embedders.1.model."                    # OpenCLIP ViT-bigG/14, open_clip names
PREFIX_VAE = "first_stage_model."                                   # ldm/sgm AutoencoderKL names
PREFIX_UNET = "model.diffusion_model."                              # sgm UNet names (see unet.py)
UNUSED_KEYS = {PREFIX_CLIP_L + "embeddings.position_ids",           # the constant arange(77), stored as F16
               PREFIX_CLIP_G + "logit_scale"}                       # CLIP's contrastive temperature, unused by SDXL


# ----------------------------------------------------------------------------------------------------------------
# safetensors by hand (huggingface/safetensors format): [8-byte little-endian header length N][N bytes of JSON][raw little-endian tensor data].
# Each JSON entry is name -> {"dtype", "shape", "data_offsets": [begin, end]}, offsets relative to the data section.

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's limit; a real header is ~200 KB


def _reject_duplicates(pairs):
    """json object_pairs_hook: a name listed twice would silently keep only the last entry."""
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate keys {sorted({k for k in keys if keys.count(k) > 1})[:5]}")
    return dict(pairs)


def read_safetensors_header(path):
    """Parse and validate the header without reading tensor data.

    Returns (entries, metadata, data_start) with entries[name] = (torch dtype, shape tuple, begin, end),
    begin/end relative to the data section that starts at byte data_start. Raises ValueError naming the file."""
    size = os.path.getsize(path)
    if size < 8:
        raise ValueError(f"{path}: {size} bytes is too short for a safetensors file (needs an 8-byte header length)")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > MAX_HEADER_BYTES or n > size - 8:  # checked before allocating anything: a corrupt length never becomes a giant read
            raise ValueError(f"{path}: header length {n} is larger than the file ({size} bytes) or the {MAX_HEADER_BYTES}-byte limit")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(f"{path}: header is not valid UTF-8 JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: header must be a JSON object, got {type(header).__name__}")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError(f"{path}: __metadata__ must map strings to strings")
    data_start, data_size = 8 + n, size - 8 - n
    entries = {}
    for name, e in header.items():
        if not (isinstance(e, dict) and {"dtype", "shape", "data_offsets"} <= e.keys()):
            raise ValueError(f"{path}: tensor {name!r} needs 'dtype', 'shape' and 'data_offsets', got {e!r:.200}")
        dtype, shape, offsets = SAFETENSORS_DTYPES.get(e["dtype"]), e["shape"], e["data_offsets"]
        if dtype is None:
            raise ValueError(f"{path}: tensor {name!r} has unknown dtype {e['dtype']!r} (known: {', '.join(SAFETENSORS_DTYPES)})")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise ValueError(f"{path}: tensor {name!r} has invalid shape {shape!r:.200}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_size):
            raise ValueError(f"{path}: tensor {name!r} has data_offsets {offsets!r:.200} outside the {data_size}-byte data section")
        nbytes = math.prod(shape) * dtype.itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise ValueError(f"{path}: tensor {name!r} is {e['dtype']} {shape}, i.e. {nbytes} bytes, "
                             f"but its data_offsets {offsets} span {offsets[1] - offsets[0]} bytes")
        entries[name] = (dtype, tuple(shape), offsets[0], offsets[1])
    # The format requires the tensors to tile the data section exactly: no gaps, no overlaps, nothing after the end.
    end = 0
    for name, (_, _, begin, stop) in sorted(entries.items(), key=lambda item: item[1][2:]):
        if begin != end:
            raise ValueError(f"{path}: tensor {name!r} starts at byte {begin} of the data section, expected {end} "
                             f"({'overlap' if begin < end else 'gap'} between tensors)")
        end = stop
    if end != data_size:
        raise ValueError(f"{path}: tensors cover {end} bytes but the data section has {data_size} (truncated or trailing bytes)")
    return entries, metadata, data_start


def read_safetensors(path, prefix=None, device="cpu"):
    """{name: tensor} for the tensors whose names start with prefix (the prefix is removed from the names).

    Tensors are views of a copy-on-write memory map of the file: nothing is read until it is used, so a 7 GB
    checkpoint costs no RAM until its tensors are copied somewhere (e.g. converted by .to(dtype) or moved to a GPU)."""
    entries, _, data_start = read_safetensors_header(path)
    with open(path, "rb") as f:  # the map stays valid after the file is closed
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # ACCESS_COPY: writable for torch, never written back
    tensors = {}
    for name, (dtype, shape, begin, end) in entries.items():
        if prefix is not None and not name.startswith(prefix):
            continue
        start = data_start + begin
        if begin == end:  # torch.frombuffer refuses empty buffers
            t = torch.empty(shape, dtype=dtype)
        elif start % dtype.itemsize:  # unaligned (some writers do not pad the header): copy instead of a misaligned view
            t = torch.frombuffer(bytearray(mm[start:data_start + end]), dtype=dtype).reshape(shape)
        else:
            t = torch.frombuffer(mm, dtype=dtype, count=math.prod(shape), offset=start).reshape(shape)
        tensors[name[len(prefix or ""):]] = t.to(device)
    return tensors


def write_safetensors(path, tensors, metadata=None):
    """Write {name: tensor} (and optional {str: str} metadata) as safetensors, atomically (temp file + os.replace)."""
    if not all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in tensors.items()) or "__metadata__" in tensors:
        raise ValueError(f"{path}: write_safetensors needs {{str name: tensor}} (and no tensor named __metadata__)")
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError(f"{path}: metadata must map strings to strings")
    unsupported = {k: t.dtype for k, t in tensors.items() if t.dtype not in DTYPE_NAMES}
    if unsupported:
        raise ValueError(f"{path}: cannot store dtypes {unsupported} (supported: {', '.join(SAFETENSORS_DTYPES)})")
    names = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))  # widest dtypes first keeps every tensor aligned
    header, offset = ({"__metadata__": dict(metadata)} if metadata else {}), 0
    for k in names:
        nbytes = tensors[k].numel() * tensors[k].element_size()
        header[k] = {"dtype": DTYPE_NAMES[tensors[k].dtype], "shape": list(tensors[k].shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # pad with spaces so the data section starts 8-byte aligned
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            for k in names:  # one tensor at a time, straight from its memory (no second copy of the whole dict)
                t = tensors[k].detach().to("cpu").contiguous().reshape(-1)
                if t.numel():
                    f.write(t.view(torch.uint8).numpy().data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# ----------------------------------------------------------------------------------------------------------------
# CLIP BPE tokenizer (openai/CLIP simple_tokenizer.py, open_clip tokenizer.py), shared by both encoders; only the
# padding id differs.
# Pipeline: clean text -> split into pre-tokens -> UTF-8 bytes as printable characters -> byte-pair merges -> ids.

SOT, EOT = 49406, 49407                                  # <|startoftext|>, <|endoftext|>
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
NUM_MERGES = 49152 - 256 - 2                             # CLIP's vocabulary is 49,408 = 2*256 byte symbols + 48,894 merges + 2 specials


def bytes_to_unicode():
    """byte -> printable character (GPT-2/CLIP): the 188 printable bytes map to themselves, the other 68 to chr(256+n),
    so BPE works on visible characters. Returned in vocabulary order (printable bytes first)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


BYTE_TO_CHAR = bytes_to_unicode()


@functools.lru_cache(maxsize=4)
def load_clip_vocab(path=VOCAB_PATH):
    """(vocab {symbol: id}, merge ranks {(left, right): rank}) from bpe_simple_vocab_16e6.txt.gz."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read the CLIP BPE vocabulary ({e})") from None
    merges = [tuple(line.split()) for line in lines[1:1 + NUM_MERGES]]  # line 0 is a version header
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{path}: expected {NUM_MERGES} merge lines of two symbols after the header")
    base = list(BYTE_TO_CHAR.values())
    symbols = base + [s + "</w>" for s in base] + ["".join(m) for m in merges] + list(SPECIAL_TOKENS)
    return {s: i for i, s in enumerate(symbols)}, {m: i for i, m in enumerate(merges)}


def clean_text(text):
    """CLIP's clean-up without ftfy: unescape HTML twice, NFC-normalise, collapse whitespace, lowercase.

    ftfy.fix_text (upstream; not a dependency here) would also repair mojibake, uncurl quotes and fold some compatibility
    characters; Hugging Face's fast CLIP tokenizer (used by diffusers and DMD2) skips ftfy too. ASCII prompts are
    unaffected either way."""
    text = unicodedata.normalize("NFC", html.unescape(html.unescape(text)))
    return re.sub(r"\s+", " ", text).strip().lower()


def _char_class(ch):
    """'L' letter, 'N' number, ' ' whitespace, 'P' anything else (\\p{L}, \\p{N}, \\s of CLIP's pattern)."""
    if ch.isspace():
        return " "
    kind = unicodedata.category(ch)[0]
    return kind if kind in "LN" else "P"


def pre_tokenize(text):
    """Split cleaned text like CLIP's pattern (which needs the third-party `regex` module for \\p{L}, \\p{N}):
        <|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|\\p{L}+|\\p{N}|[^\\s\\p{L}\\p{N}]+
    At each position: a special token or contraction if one starts here, else a maximal run of letters, ONE number
    character (so "2024" gives four pre-tokens), or a maximal run of other non-space characters; spaces separate."""
    words, i = [], 0
    while i < len(text):
        literal = next((s for s in SPECIAL_TOKENS + CONTRACTIONS if text.startswith(s, i)), None)
        kind = _char_class(text[i])
        if literal:
            j = i + len(literal)
        elif kind == " ":
            i += 1
            continue
        else:
            j = i + 1
            while kind != "N" and j < len(text) and _char_class(text[j]) == kind:
                j += 1
        words.append(text[i:j])
        i = j
    return words


def bpe(word, ranks):
    """Byte-pair encode one pre-token given as byte characters: the last symbol carries the end-of-word mark </w>;
    repeatedly merge every occurrence (left to right) of the adjacent pair with the lowest rank until none is ranked."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        rank, pair = min((ranks.get(p, math.inf), p) for p in zip(parts, parts[1:]))
        if rank == math.inf:
            break
        merged, i = [], 0
        while i < len(parts):
            if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def encode_text(text, vocab_path=VOCAB_PATH):
    """Token ids of one string, without start/end tokens or padding."""
    vocab, ranks = load_clip_vocab(vocab_path)
    ids = []
    for word in pre_tokenize(clean_text(text)):
        if word in SPECIAL_TOKENS:
            ids.append(vocab[word])
        else:
            ids += [vocab[p] for p in bpe("".join(BYTE_TO_CHAR[b] for b in word.encode("utf-8")), ranks)]
    return ids


def tokenize(texts, pad_with="end", context_length=77, vocab_path=VOCAB_PATH):
    """[SOT] + at most context_length-2 tokens + [EOT] + padding -> LongTensor [B, context_length].

    pad_with="end" pads with EOT 49407 (CLIP-L: Hugging Face's tokenizer, as sgm and DMD2 use it);
    pad_with="zero" pads with id 0, i.e. "!" (bigG: open_clip.tokenize). The padded positions are not masked in the
    UNet's cross-attention, so the difference reaches the image."""
    if pad_with not in ("end", "zero"):
        raise ValueError(f"pad_with must be 'end' (CLIP-L) or 'zero' (bigG), got {pad_with!r}")
    pad = EOT if pad_with == "end" else 0
    rows = []
    for text in [texts] if isinstance(texts, str) else texts:
        ids = [SOT] + encode_text(text, vocab_path)[:context_length - 2] + [EOT]  # long prompts keep their EOT
        rows.append(ids + [pad] * (context_length - len(ids)))
    return torch.tensor(rows, dtype=torch.long)


# ----------------------------------------------------------------------------------------------------------------
# Text encoders (sgm FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder2): pre-LN causal transformers.
# CLIP-L keeps Hugging Face's names, bigG keeps open_clip's.

@dataclass
class TextConfig:
    width: int = 768          # hidden size; the MLP is 4x wider
    layers: int = 12          # transformer blocks
    heads: int = 12           # attention heads of width//heads channels
    act: str = "quick_gelu"   # "quick_gelu" x*sigmoid(1.702x) (CLIP-L) or "gelu", exact erf GELU (bigG)
    embed_dim: int = 0        # text_projection output width (bigG 1280); 0: no projection (CLIP-L)
    vocab: int = 49408        # token embedding rows
    context: int = 77         # positions


CLIP_L = TextConfig()                                                                  # 123,060,480 parameters
CLIP_G = TextConfig(width=1280, layers=32, heads=20, act="gelu", embed_dim=1280)       # 694,659,840 parameters


def activation(name, x):
    return x * torch.sigmoid(1.702 * x) if name == "quick_gelu" else F.gelu(x)


def causal_attention(q, k, v, heads):
    """Multi-head softmax attention where token i sees tokens <= i. q, k, v [B, T, W] -> [B, T, W]."""
    B, T, W = q.shape
    q, k, v = (x.view(B, T, heads, W // heads).transpose(1, 2) for x in (q, k, v))  # [B, heads, T, W/heads]
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, W)


class CLIPLayer(nn.Module):
    """One CLIP-L block, Hugging Face names: x += attn(LN1(x)); x += fc2(act(fc1(LN2(x))))."""

    def __init__(self, cfg):
        super().__init__()
        W, self.heads, self.act = cfg.width, cfg.heads, cfg.act
        self.self_attn = nn.ModuleDict({n: nn.Linear(W, W) for n in ("q_proj", "k_proj", "v_proj", "out_proj")})
        self.layer_norm1 = nn.LayerNorm(W)
        self.mlp = nn.ModuleDict(dict(fc1=nn.Linear(W, 4 * W), fc2=nn.Linear(4 * W, W)))
        self.layer_norm2 = nn.LayerNorm(W)

    def forward(self, x):  # [B, T, W]
        a, h = self.self_attn, self.layer_norm1(x)
        x = x + a.out_proj(causal_attention(a.q_proj(h), a.k_proj(h), a.v_proj(h), self.heads))
        return x + self.mlp.fc2(activation(self.act, self.mlp.fc1(self.layer_norm2(x))))


class CLIPTextModel(nn.Module):
    """CLIP ViT-L/14 text tower; state_dict keys = the checkpoint's under PREFIX_CLIP_L."""

    def __init__(self, cfg=CLIP_L):
        super().__init__()
        self.embeddings = nn.ModuleDict(dict(token_embedding=nn.Embedding(cfg.vocab, cfg.width),
                                        position_embedding=nn.Embedding(cfg.context, cfg.width)))
        self.encoder = nn.ModuleDict(dict(layers=nn.ModuleList(CLIPLayer(cfg) for _ in range(cfg.layers))))
        self.final_layer_norm = nn.LayerNorm(cfg.width)  # in the checkpoint, unused by SDXL

    def forward(self, ids):  # ids [B, T] -> penultimate hidden state [B, T, W]
        x = self.embeddings.token_embedding(ids) + self.embeddings.position_embedding.weight[:ids.shape[1]]
        for layer in self.encoder.layers[:-1]:  # SDXL takes the output of layer 11 of 12, without the final LayerNorm
            x = layer(x)
        return x


class OpenCLIPBlock(nn.Module):
    """One bigG block, open_clip names; attn.in_proj_weight stacks the q, k, v rows as nn.MultiheadAttention does."""

    def __init__(self, cfg):
        super().__init__()
        W, self.heads, self.act = cfg.width, cfg.heads, cfg.act
        self.ln_1 = nn.LayerNorm(W)
        self.attn = nn.Module()
        self.attn.in_proj_weight = nn.Parameter(torch.randn(3 * W, W) * W ** -0.5)  # [q; k; v] rows
        self.attn.in_proj_bias = nn.Parameter(torch.zeros(3 * W))
        self.attn.out_proj = nn.Linear(W, W)
        self.ln_2 = nn.LayerNorm(W)
        self.mlp = nn.ModuleDict(dict(c_fc=nn.Linear(W, 4 * W), c_proj=nn.Linear(4 * W, W)))

    def forward(self, x):  # [B, T, W]
        q, k, v = F.linear(self.ln_1(x), self.attn.in_proj_weight, self.attn.in_proj_bias).chunk(3, dim=-1)
        x = x + self.attn.out_proj(causal_attention(q, k, v, self.heads))
        return x + self.mlp.c_proj(activation(self.act, self.mlp.c_fc(self.ln_2(x))))


class OpenCLIPTextModel(nn.Module):
    """OpenCLIP ViT-bigG/14 text tower; state_dict keys = the checkpoint's under PREFIX_CLIP_G."""

    def __init__(self, cfg=CLIP_G):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab, cfg.width)
        self.positional_embedding = nn.Parameter(torch.randn(cfg.context, cfg.width) * 0.01)
        self.transformer = nn.ModuleDict(dict(resblocks=nn.ModuleList(OpenCLIPBlock(cfg) for _ in range(cfg.layers))))
        self.ln_final = nn.LayerNorm(cfg.width)
        self.text_projection = nn.Parameter(torch.randn(cfg.width, cfg.embed_dim) * cfg.width ** -0.5)  # used as x @ W

    def forward(self, ids):  # ids [B, T] (EOT = largest id) -> penultimate [B, T, W], pooled [B, embed_dim]
        x = self.token_embedding(ids) + self.positional_embedding[:ids.shape[1]]
        for block in self.transformer.resblocks[:-1]:
            x = block(x)
        penultimate = x                                           # input of the last block, no ln_final (layer="penultimate")
        x = self.ln_final(self.transformer.resblocks[-1](x))
        eot = x[torch.arange(len(ids), device=ids.device), ids.argmax(dim=-1)]  # [B, W] features at each EOT token
        return penultimate, eot @ self.text_projection


def encode_prompt(clip_l, clip_g, prompts, vocab_path=VOCAB_PATH):
    """prompts (list of str) -> context [B, 77, 768+1280] = [CLIP-L | bigG] penultimate states, pooled bigG [B, 1280]."""
    device = clip_l.embeddings.token_embedding.weight.device
    ids_l = tokenize(prompts, "end", clip_l.embeddings.position_embedding.num_embeddings, vocab_path).to(device)
    ids_g = tokenize(prompts, "zero", clip_g.positional_embedding.shape[0], vocab_path).to(device)
    context_g, pooled = clip_g(ids_g)
    return torch.cat([clip_l(ids_l).to(context_g.dtype), context_g], dim=-1), pooled


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding with the cos half first (sgm's util.timestep_embedding). t [N] -> [N, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)  # [half]
    args = t.float()[:, None] * freqs[None]                                                                   # [N, half]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def vector_cond(pooled, original_size=(1024, 1024), crop_coords=(0, 0), target_size=(1024, 1024)):
    """SDXL micro-conditioning y (SDXL paper Sec. 2.2; sgm ConcatTimestepEmbedderND): [pooled bigG | E(orig h) E(orig w) E(crop top) E(crop left) E(target h) E(target w)],
    each E a 256-d embedding of the raw pixel number. pooled [B, 1280] -> y [B, 1280 + 6*256 = 2816]; sizes are (height, width)."""
    sizes = torch.tensor([*original_size, *crop_coords, *target_size], dtype=torch.float32, device=pooled.device)  # [6]
    emb = timestep_embedding(sizes, 256).reshape(1, 6 * 256).expand(len(pooled), -1)                               # [B, 1536]
    return torch.cat([pooled, emb.to(pooled.dtype)], dim=1)


# ----------------------------------------------------------------------------------------------------------------
# VAE (sgm diffusionmodules/model.py): ldm/sgm AutoencoderKL with its names. Encoder: image [-1, 1] -> 8x smaller latent; decoder: back.
# All GroupNorms are 32 groups, eps 1e-6. Run it in fp32 or bf16: SDXL's VAE overflows in fp16 (NaN / black images).

@dataclass
class VAEConfig:
    ch: int = 128                   # width of the full-resolution level (a multiple of 32 for GroupNorm)
    ch_mult: tuple = (1, 2, 4, 4)   # width multiplier per level; every level but the last changes resolution by 2
    num_res_blocks: int = 2         # ResnetBlocks per encoder level (the decoder has one more)
    z_channels: int = 4             # latent channels
    scale_factor: float = 0.13025   # latents = z * scale_factor have roughly unit variance (SDXL's value)


def group_norm(channels):
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm1, self.conv1 = group_norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = group_norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):  # [B, cin, H, W] -> [B, cout, H, W]
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions; q, k, v, proj_out are 1x1 convs."""

    def __init__(self, C):
        super().__init__()
        self.norm = group_norm(C)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(C, C, 1) for _ in range(4))

    def forward(self, x):  # [B, C, H, W]
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (conv(h).flatten(2).transpose(1, 2) for conv in (self.q, self.k, self.v))  # [B, HW, C]
        h = F.scaled_dot_product_attention(q, k, v)                                          # softmax(q k^T / sqrt(C)) v
        return x + self.proj_out(h.transpose(1, 2).reshape(B, C, H, W))


def mid_block(C):
    return nn.ModuleDict(dict(block_1=ResnetBlock(C, C), attn_1=AttnBlock(C), block_2=ResnetBlock(C, C)))


def run_mid(mid, x):
    return mid.block_2(mid.attn_1(mid.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, padding=1)
        self.down, cin = nn.ModuleList(), cfg.ch
        for i, cout in enumerate(widths):
            level = nn.ModuleDict(dict(block=nn.ModuleList(ResnetBlock(cin if j == 0 else cout, cout) for j in range(cfg.num_res_blocks))))
            if i < len(widths) - 1:
                level["downsample"] = nn.ModuleDict(dict(conv=nn.Conv2d(cout, cout, 3, stride=2)))
            self.down.append(level)
            cin = cout
        self.mid = mid_block(cin)
        self.norm_out, self.conv_out = group_norm(cin), nn.Conv2d(cin, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x):  # [B, 3, H, W] -> mean and log-variance [B, 2*z, H/f, W/f]
        x = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                x = block(x)
            if "downsample" in level:
                x = level.downsample.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric zero pad, then stride-2 conv without padding
        return self.conv_out(F.silu(self.norm_out(run_mid(self.mid, x))))


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        cin = widths[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, cin, 3, padding=1)
        self.mid = mid_block(cin)
        levels = []
        for i in reversed(range(len(widths))):  # built deepest first, stored by level index: up.0 is full resolution
            level = nn.ModuleDict(dict(block=nn.ModuleList(ResnetBlock(cin if j == 0 else widths[i], widths[i]) for j in range(cfg.num_res_blocks + 1))))
            if i > 0:
                level["upsample"] = nn.ModuleDict(dict(conv=nn.Conv2d(widths[i], widths[i], 3, padding=1)))
            levels.insert(0, level)
            cin = widths[i]
        self.up = nn.ModuleList(levels)
        self.norm_out, self.conv_out = group_norm(cin), nn.Conv2d(cin, 3, 3, padding=1)

    def forward(self, z):  # [B, z, h, w] -> [B, 3, h*f, w*f]
        x = run_mid(self.mid, self.conv_in(z))
        for level in reversed(self.up):  # up.3 (deepest) ... up.0
            for block in level.block:
                x = block(x)
            if "upsample" in level:
                x = level.upsample.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(x)))


class AutoencoderKL(nn.Module):
    """SDXL's VAE; state_dict keys = the checkpoint's under PREFIX_VAE. Latents are scaled by scale_factor."""

    def __init__(self, cfg=VAEConfig()):
        super().__init__()
        self.scale_factor = cfg.scale_factor
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)

    def encode(self, images, sample=False, generator=None):
        """images [B, 3, H, W] in [-1, 1] -> scaled latents [B, z, H/f, W/f]: the posterior mean, or a sample of
        N(mean, exp(logvar)) when sample=True (DMD2's real images for the GAN branch are sampled)."""
        dtype = self.quant_conv.weight.dtype
        mean, logvar = self.quant_conv(self.encoder(images.to(dtype))).chunk(2, dim=1)
        if sample:
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            mean = mean + std * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean * self.scale_factor

    def decode(self, latents):
        """scaled latents [B, z, h, w] -> images [B, 3, f*h, f*w], roughly in [-1, 1]."""
        z = latents.to(self.post_quant_conv.weight.dtype) / self.scale_factor
        return self.decoder(self.post_quant_conv(z))


# ----------------------------------------------------------------------------------------------------------------
# Loading the single-file checkpoint.

def check_state(module, state, path, what):
    """Raise ValueError naming path if state's keys or shapes differ from module's (missing, unexpected, mismatched)."""
    own = module.state_dict()
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    mismatched = [f"{k}: file {list(state[k].shape)}, model {list(own[k].shape)}"
                  for k in sorted(own.keys() & state.keys()) if state[k].shape != own[k].shape]
    problems = [f"  {title} ({len(keys)}): {', '.join(keys[:10])}{' ...' if len(keys) > 10 else ''}"
                for title, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)) if keys]
    if problems:
        raise ValueError(f"{path}: the {what} weights do not match the model:\n" + "\n".join(problems))


def load_part(module_fn, path, prefix, what, device, dtype):
    """Build a module on the meta device (no memory, no init), check the file's tensors under prefix, then adopt them
    one by one converted to (device, dtype): peak memory is the converted module, never the whole file."""
    with torch.device("meta"):
        module = module_fn()
    state = {k: v for k, v in read_safetensors(path, prefix).items() if prefix + k not in UNUSED_KEYS}
    check_state(module, state, path, what)
    module.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, assign=True)
    return module.eval().requires_grad_(False)


def load_sdxl_parts(path, device="cpu", dtype=torch.float32, vae_dtype=torch.float32, clip_l=CLIP_L, clip_g=CLIP_G, vae=VAEConfig()):
    """(CLIPTextModel, OpenCLIPTextModel, AutoencoderKL), frozen, from sd_xl_base_1.0.safetensors (strict, checked).

    The UNet lives under PREFIX_UNET of the same file: read_safetensors(path, PREFIX_UNET) gives its sgm-named
    state dict for the SDXL UNet in unet.py."""
    if vae_dtype == torch.float16:
        raise ValueError("vae_dtype=float16: SDXL's VAE overflows in fp16 (NaN/black images); use float32 or bfloat16")
    return (load_part(lambda: CLIPTextModel(clip_l), path, PREFIX_CLIP_L, "CLIP ViT-L text encoder", device, dtype),
            load_part(lambda: OpenCLIPTextModel(clip_g), path, PREFIX_CLIP_G, "OpenCLIP ViT-bigG text encoder", device, dtype),
            load_part(lambda: AutoencoderKL(vae), path, PREFIX_VAE, "VAE", device, vae_dtype))


# ----------------------------------------------------------------------------------------------------------------
# Command line. Sampling and DMD2 training sub-commands come with their sections.

def cmd_tokenize(args):
    for name, pad in (("CLIP-L", "end"), ("bigG", "zero")):
        ids = tokenize(args.prompt, pad)[0].tolist()
        n = ids.index(EOT) + 1  # SOT, the prompt's tokens, EOT
        print(f"{name} ids ({n} of 77 used, padded with {ids[-1] if n < 77 else 'nothing'}): {' '.join(map(str, ids[:n]))}")
    symbols = {i: s for s, i in load_clip_vocab()[0].items()}
    print("pieces:", " ".join(symbols[i] for i in ids[1:n - 1]))


def cmd_inspect(args):
    entries, metadata, data_start = read_safetensors_header(args.path)
    groups = {}
    for name, (dtype, shape, begin, end) in entries.items():
        prefix = next((p for p in (PREFIX_CLIP_L, PREFIX_CLIP_G, PREFIX_VAE, PREFIX_UNET) if name.startswith(p)), name.split(".")[0])
        count, nbytes, numel, dtypes = groups.get(prefix, (0, 0, 0, set()))
        groups[prefix] = (count + 1, nbytes + end - begin, numel + math.prod(shape), dtypes | {DTYPE_NAMES[dtype]})
    print(f"{args.path}: {len(entries)} tensors, header {data_start - 8} bytes, {len(metadata)} metadata keys")
    for prefix, (count, nbytes, numel, dtypes) in sorted(groups.items()):
        print(f"  {prefix:50s} {count:5d} tensors {numel:>14,d} numbers {nbytes:>15,d} bytes  {'/'.join(sorted(dtypes))}")
    for k, v in sorted(metadata.items()):
        print(f"  __metadata__ {k} = {v[:100]}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("tokenize", help="print CLIP BPE token ids of a prompt for both text encoders")
    p.add_argument("prompt", help="text to tokenize")
    p.set_defaults(run=cmd_tokenize)
    p = sub.add_parser("inspect", help="summarise a .safetensors file's header (tensors, dtypes, bytes per prefix)")
    p.add_argument("path", help="a .safetensors file, e.g. sd_xl_base_1.0.safetensors")
    p.set_defaults(run=cmd_inspect)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except ValueError as e:  # our errors name the file and the problem; a traceback adds nothing
        parser.exit(1, f"error: {e}\n")


if __name__ == "__main__":
    main()
