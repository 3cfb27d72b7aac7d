"""sdxl.py part 1: safetensors I/O, CLIP tokenizer, CLIP-L / bigG text towers, micro-conditioning, VAE, loader.

Independent references (test-only packages): `safetensors` for the file format, transformers' CLIPTokenizer /
CLIPTextModel / CLIPTextModelWithProjection, the `regex` module (a transformers dependency) for CLIP's official
pre-tokenising pattern, diffusers' AutoencoderKL and get_timestep_embedding. Random tiny weights, fp32, max abs diff <= 1e-4.
"""
import gzip
import hashlib
import html
import json
import os
import random
import re
import struct
import subprocess
import sys

import pytest
import torch

import sdxl
import unet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def randomize(module, seed=0):
    """Random weights at a scale that keeps activations O(1): norms near 1, other matrices ~ 1/sqrt(fan-in)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            for name, p in m.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=g)
                if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm)):
                    p.copy_((1.0 if name == "weight" else 0.0) + 0.1 * noise)
                else:
                    p.copy_(noise * (p[0].numel() ** -0.5 if p.ndim >= 2 else 0.1))
    return module


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


# ---------------------------------------------------------------------------------------------------------------
# safetensors

def every_dtype():
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, dtype in unet.SAFETENSORS_DTYPES.items():      # the reader is unet.py section 8
        if dtype.is_floating_point:
            t = torch.randn(3, 5, generator=g).to(dtype)
        elif dtype == torch.bool:
            t = torch.rand(3, 5, generator=g) > 0.5
        else:
            lo = 0 if name.startswith("U") else -100
            t = torch.randint(lo, 100, (3, 5), generator=g).to(dtype)
        out[f"x.{name}"] = t
        out[f"x.{name}.odd"] = t.reshape(-1)[:7].clone()  # odd byte counts push the next tensors off alignment
    out["scalar"] = torch.tensor(1.5, dtype=torch.float16)  # shape [] like SDXL's logit_scale
    out["empty"] = torch.zeros(0, 4)
    return out


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def test_safetensors_round_trip_against_reference(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    tensors, meta = every_dtype(), {"format": "pt", "note": "ü"}
    ours, theirs = str(tmp_path / "ours.safetensors"), str(tmp_path / "theirs.safetensors")
    sdxl.write_safetensors(ours, tensors, meta)
    loaded = load_file(ours)
    assert loaded.keys() == tensors.keys() and all(same_bits(loaded[k], tensors[k]) for k in tensors)
    with safe_open(ours, "pt") as f:
        assert f.metadata() == meta
    save_file(tensors, theirs, metadata=meta)
    entries, metadata, _ = sdxl.read_safetensors_header(theirs)
    assert metadata == meta and entries.keys() == tensors.keys()
    got = sdxl.read_safetensors(theirs)
    assert got.keys() == tensors.keys() and all(same_bits(got[k], tensors[k]) for k in tensors)
    part = sdxl.read_safetensors(theirs, prefix="x.BF16")  # prefix filter strips the prefix
    assert part.keys() == {"", ".odd"} and same_bits(part[""], tensors["x.BF16"])
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]  # the atomic writer cleaned up


def test_read_is_a_memory_map_view(tmp_path):
    path = str(tmp_path / "m.safetensors")
    sdxl.write_safetensors(path, {"a": torch.arange(6.0), "b": torch.arange(10.0)})
    entries, _, _ = sdxl.read_safetensors_header(path)
    t = sdxl.read_safetensors(path)
    # Both tensors are views into one mapping of the file (not per-tensor copies): pointers differ by the file offsets.
    assert t["b"].data_ptr() - t["a"].data_ptr() == entries["b"][2] - entries["a"][2]
    assert torch.equal(t["b"], torch.arange(10.0))


def test_read_unaligned_file(tmp_path):
    # A writer that does not pad the header (allowed by the format) leaves F32 data at an odd file offset.
    from safetensors.torch import load_file
    values = torch.tensor([1.0, -2.5, 3.25])
    header = json.dumps({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}}).encode()
    header += b" " * ((5 - len(header)) % 8)  # make 8 + len(header) odd
    path = tmp_path / "u.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + values.numpy().tobytes())
    assert (8 + len(header)) % 4 != 0
    got = sdxl.read_safetensors(str(path))["w"]
    assert torch.equal(got, values) and got.data_ptr() % 4 == 0  # copied to aligned memory, not a misaligned view
    assert torch.equal(load_file(str(path))["w"], values)


def corrupt_file(tmp_path, case):
    """Bytes of a broken file for each case, built from a valid two-tensor file."""
    good = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F16", "shape": [2], "data_offsets": [8, 12]}}
    data = bytes(12)

    def pack(header, data=data, n=None):
        raw = json.dumps(header).encode() if isinstance(header, dict) else header
        return struct.pack("<Q", len(raw) if n is None else n) + raw + data

    def edit(**entry):
        return pack({**good, "a": {**good["a"], **entry}})

    return {
        "short file": b"\x01\x02\x03",
        "truncated data": pack(good)[:-3],
        "header length huge": pack(good, n=2 ** 62),
        "header length past end": pack(good, n=1000),
        "bad json": pack(b'{"a": {"dtype": "F32", "shape": [2], ', b""),
        "not utf-8": pack(b'{"\xff\xfe": 1}', b""),
        "header not an object": pack(b"[1, 2, 3]", b""),
        "offsets out of range": edit(data_offsets=[0, 800]),
        "wrong size": edit(shape=[3], data_offsets=[0, 8]),
        "unknown dtype": edit(dtype="F13"),
        "negative shape": edit(shape=[-2]),
        "missing field": pack({**good, "a": {"dtype": "F32", "shape": [2]}}),
        "overlap": pack({**good, "b": {"dtype": "F16", "shape": [3], "data_offsets": [6, 12]}}),  # ends exactly at the end
        "gap": pack({**good, "b": {"dtype": "F16", "shape": [2], "data_offsets": [10, 14]}}, bytes(14)),
        "trailing bytes": pack(good, data + bytes(4)),
        "duplicate key": pack(b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},'
                              b' "a": {"dtype": "F16", "shape": [2], "data_offsets": [8, 12]}}'),
        "metadata []": pack({"__metadata__": [], **good}),
        "metadata 0": pack({"__metadata__": 0, **good}),
        "metadata false": pack({"__metadata__": False, **good}),
        'metadata ""': pack({"__metadata__": "", **good}),
        "metadata value not a string": pack({"__metadata__": {"step": 3}, **good}),
        "dtype not a string": edit(dtype=["F32"]),
        "deeply nested": pack(b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", b""),
        "zero-size dim 2**63": pack({**good, "z": {"dtype": "F32", "shape": [0, 2 ** 63], "data_offsets": [12, 12]}}),
        "zero-size dim 2**64": pack({**good, "z": {"dtype": "F32", "shape": [0, 2 ** 64], "data_offsets": [12, 12]}}),
        "zero-size strides overflow": pack({**good, "z": {"dtype": "F32", "shape": [0, 2 ** 62, 4],
                                                          "data_offsets": [12, 12]}}),
        "too many dims": pack({**good, "z": {"dtype": "F32", "shape": [0] * 1000, "data_offsets": [12, 12]}}),
    }[case]


CORRUPT_CASES = ["short file", "truncated data", "header length huge", "header length past end", "bad json", "not utf-8",
                 "header not an object", "offsets out of range", "wrong size", "unknown dtype", "negative shape",
                 "missing field", "overlap", "gap", "trailing bytes", "duplicate key",
                 "metadata []", "metadata 0", "metadata false", 'metadata ""', "metadata value not a string",
                 "dtype not a string", "deeply nested", "zero-size dim 2**63", "zero-size dim 2**64",
                 "zero-size strides overflow", "too many dims"]
# The Rust reader's JSON map keeps the last of two equal keys; we refuse the ambiguity. A zero-size tensor whose
# strides overflow int64, or with 1000 dims, is accepted there; torch cannot make the first, and nothing real has the
# second (a 100 MB header could otherwise list 50M dims).
REFERENCE_ACCEPTS = {"duplicate key", "zero-size strides overflow", "too many dims"}


@pytest.mark.parametrize("case", CORRUPT_CASES)
def test_corrupt_files_are_refused(tmp_path, case):
    from safetensors.torch import load_file
    path = tmp_path / "bad.safetensors"
    path.write_bytes(corrupt_file(tmp_path, case))
    with pytest.raises(ValueError, match=re.escape(str(path))):
        sdxl.read_safetensors(str(path))
    if case not in REFERENCE_ACCEPTS:  # our notion of "corrupt" agrees with the reference reader
        with pytest.raises(Exception):
            load_file(str(path))


def test_missing_or_null_metadata_is_none(tmp_path):
    from safetensors.torch import load_file
    good = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    for i, header in enumerate([good, {"__metadata__": None, **good}, {"__metadata__": {}, **good}]):
        path = tmp_path / f"m{i}.safetensors"
        raw = json.dumps(header).encode()
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(8))
        assert sdxl.read_safetensors_header(str(path))[1] == {}
        assert torch.equal(sdxl.read_safetensors(str(path))["a"], load_file(str(path))["a"])


def test_write_is_atomic_and_validates(tmp_path):
    path = str(tmp_path / "c.safetensors")
    sdxl.write_safetensors(path, {"a": torch.ones(2)})
    with pytest.raises(ValueError, match="complex64"):
        sdxl.write_safetensors(path, {"a": torch.zeros(2), "z": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(ValueError, match="metadata"):
        sdxl.write_safetensors(path, {"a": torch.zeros(2)}, metadata={"step": 3})
    assert torch.equal(sdxl.read_safetensors(path)["a"], torch.ones(2))  # the old file survived both failures
    assert os.listdir(tmp_path) == ["c.safetensors"]


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer

@pytest.fixture(scope="module")
def hf_tokenizer():
    """transformers' CLIPTokenizer built from our shipped vocabulary file, the way open_clip/openai CLIP build it."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    with gzip.open(os.path.join(ROOT, "bpe_simple_vocab_16e6.txt.gz"), "rt", encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f.read().split("\n")[1:49152 - 256 - 2 + 1]]
    symbols = list(bytes_to_unicode().values())
    symbols += [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={s: i for i, s in enumerate(symbols)}, merges=merges)


def hf_ids(tok, texts, pad_with):
    enc = tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    ids = enc["input_ids"]
    return ids if pad_with == "end" else torch.where(enc["attention_mask"].bool(), ids, 0)  # open_clip pads with 0


PROMPTS = [
    "a photo of a cat",
    "A cinematic shot of a baby racoon wearing an intricate Italian priest robe.",
    "Hello, World!!! It's 3.14159 o'clock; we're here, they'll've gone... (maybe) [x] {y} #tag @user",
    "don't   stop\tbelievin'\n\nI'M HERE, YOU'D SEE, WE'VE 'S 'T",
    "naïve café résumé Ångström Straße façade",
    "东京タワーの夜景, 水彩画, 한국어 텍스트",
    "emoji 🐱🚀 test 👍🏽 and ❤️ flags 🇯🇵",
    "ΑΘΗΝΑ σίσυφος Москва İstanbul العربية हिन्दी",
    "x² + ½ = ⅓ ① Ⅻ ٣ ๓ price: $1,000,000.00",
    "e\u0301clair (decomposed accent) and ﬁ ligature",
    "snake_case-and-kebab--case__x ~~~ ... --- ___ ''' \"quoted\"",
    "1girl, masterpiece, best quality, 8k uhd, dslr, soft lighting, film grain, Fujifilm XT3",
    "",
    "   ",
    "a <|endoftext|> in the middle",
    " ".join(["a very long prompt about a red dog"] * 20),
    "supercalifragilisticexpialidocious antidisestablishmentarianism pneumonoultramicroscopic",
]


def test_tokenizer_matches_transformers(hf_tokenizer):
    for pad_with in ("end", "zero"):
        ours = sdxl.tokenize(PROMPTS, pad_with)
        ref = hf_ids(hf_tokenizer, PROMPTS, pad_with)
        assert ours.shape == (len(PROMPTS), 77)
        mismatched = [p for p, a, b in zip(PROMPTS, ours, ref) if not torch.equal(a, b)]
        assert not mismatched, mismatched
    # Known divergence: Python's str.lower (openai CLIP, open_clip and ours) turns a word-final capital sigma into
    # "ς"; the Rust lowercase of the HF fast tokenizer gives "σ". We follow the original tokenizers.
    assert torch.equal(sdxl.tokenize("ΣΊΣΥΦΟΣ"), sdxl.tokenize("σίσυφος"))
    assert not torch.equal(sdxl.tokenize("ΣΊΣΥΦΟΣ"), hf_ids(hf_tokenizer, ["ΣΊΣΥΦΟΣ"], "end"))


def test_word_cache_gives_the_reference_ids(hf_tokenizer):
    """The per-word BPE cache: 300 prompts that reuse words, cold cache then warm, give transformers' ids both times,
    and repeated words are merged once. (Speed against open_clip is measured in tests/bench_sdxl.py, not asserted.)"""
    words = " ".join(PROMPTS).split()
    rng = random.Random(1)
    prompts = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 30))) for _ in range(300)]
    ref = hf_ids(hf_tokenizer, prompts, "end")
    sdxl.word_ids.cache_clear()
    cold = sdxl.tokenize(prompts)
    info = sdxl.word_ids.cache_info()
    assert info.hits > 2 * info.misses                          # each distinct word was merged once
    assert torch.equal(cold, ref) and torch.equal(sdxl.tokenize(prompts), ref)


def test_tokenizer_reference_ids_and_truncation():
    assert sdxl.tokenize("a photo of a cat")[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 49407]  # CLIP docs
    long = sdxl.tokenize(" ".join(["dog"] * 100), "zero")[0]
    assert long[0] == sdxl.SOT and long[-1] == sdxl.EOT and (long[1:-1] != sdxl.EOT).all()  # 75 words kept, EOT kept
    short = sdxl.tokenize("a dog", "zero")[0].tolist()
    assert short[:4] == [49406, 320, 1929, 49407] and short[4:] == [0] * 73
    with pytest.raises(ValueError, match="pad_with"):
        sdxl.tokenize("x", "left")


def test_html_entities_are_unescaped(hf_tokenizer):
    # Without ftfy, CLIP's clean-up is html.unescape twice; the HF fast tokenizer skips it, so compare on unescaped text.
    texts = ["Tom &amp; Jerry &lt;3 &quot;quoted&quot; &#39;s", "fish &amp;amp; chips", "caf&eacute; &#x1F431;"]
    ref = hf_ids(hf_tokenizer, [html.unescape(html.unescape(t)) for t in texts], "end")
    assert torch.equal(sdxl.tokenize(texts), ref)
    assert torch.equal(sdxl.tokenize("Tom &amp; Jerry"), sdxl.tokenize("Tom & Jerry"))


def test_pre_tokenize_matches_official_pattern():
    regex = pytest.importorskip("regex")  # installed with transformers and diffusers
    official = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                             regex.IGNORECASE)
    alphabet = list("abcXYZ019 '',.!?-_<|>sdtrvmlé") + ["<|endoftext|>", "'re", "'ll", "  "] + \
        list("ñßΣσςжЖ東京ー한½²③٣Ⅻ🐱👍🏽\u0301\u00a0\u2003\u3000") + ["\t", "\n"]
    rng = random.Random(0)
    ascii_alphabet = [c for c in alphabet if c.isascii()]
    for i in range(3000):                 # both the `re` path and the character scanner, on any text and on ASCII
        text = sdxl.clean_text("".join(rng.choice(alphabet if i % 2 else ascii_alphabet)
                                       for _ in range(rng.randint(0, 30))))
        expected = official.findall(text)
        assert sdxl.pre_tokenize(text) == expected and sdxl.scan_pre_tokens(text) == expected, repr(text)


def test_vocab_file_is_clip_vocab(tmp_path):
    with open(os.path.join(ROOT, "bpe_simple_vocab_16e6.txt.gz"), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
    vocab, ranks = sdxl.load_clip_vocab()
    assert len(vocab) == 49408 and len(ranks) == 48894 and vocab["!"] == 0 and vocab["<|endoftext|>"] == 49407
    bad = tmp_path / "vocab.txt.gz"
    bad.write_bytes(b"not gzip")
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        sdxl.load_clip_vocab(str(bad))


# ---------------------------------------------------------------------------------------------------------------
# Text encoders and conditioning

def hf_text_config(cfg, vocab):
    from transformers import CLIPTextConfig
    return CLIPTextConfig(vocab_size=vocab, hidden_size=cfg.width, intermediate_size=4 * cfg.width, num_hidden_layers=cfg.layers,
                          num_attention_heads=cfg.heads, max_position_embeddings=cfg.context, hidden_act=cfg.act,
                          layer_norm_eps=1e-5, projection_dim=cfg.embed_dim or cfg.width, bos_token_id=vocab - 2,
                          eos_token_id=vocab - 1, pad_token_id=0, attn_implementation="eager")


def random_ids(vocab, context, pad, seed=0):
    """[3, context] ids: SOT, random tokens, EOT (the largest id), padding; rows of different lengths."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((3, context), pad)
    for row, n in enumerate((3, 7, context - 2)):
        ids[row, 0], ids[row, n + 1] = vocab - 2, vocab - 1
        ids[row, 1:n + 1] = torch.randint(0, vocab - 2, (n,), generator=g)
    return ids


def openclip_to_hf(state):
    """open_clip text-tower names (ours, bigG) -> transformers CLIPTextModelWithProjection names (sdxl.md §3.2)."""
    out = {}
    for k, v in state.items():
        if k == "text_projection":
            out["text_projection.weight"] = v.T  # open_clip right-multiplies, a Linear stores the transpose
            continue
        m = re.match(r"transformer\.resblocks\.(\d+)\.(.+)", k)
        if m and m.group(2).startswith("attn.in_proj_"):
            for name, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3)):
                out[f"text_model.encoder.layers.{m.group(1)}.self_attn.{name}.{m.group(2)[len('attn.in_proj_'):]}"] = part
            continue
        if m:
            rest = m.group(2)
            for a, b in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                if rest.startswith(a + "."):
                    rest = b + rest[len(a):]
            out[f"text_model.encoder.layers.{m.group(1)}.{rest}"] = v
            continue
        out["text_model." + {"token_embedding.weight": "embeddings.token_embedding.weight",
                             "positional_embedding": "embeddings.position_embedding.weight",
                             "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}[k]] = v
    return out


def test_clip_l_matches_transformers():
    from transformers import CLIPTextModel
    cfg, vocab = sdxl.TextConfig(width=64, layers=3, heads=4, act="quick_gelu", vocab=100, context=16), 100
    ours = randomize(sdxl.CLIPTextModel(cfg)).eval()
    ref = CLIPTextModel(hf_text_config(cfg, vocab)).eval()
    prefix = "text_model." if hasattr(ref, "text_model") else ""  # transformers 5 flattened CLIPTextModel
    missing, unexpected = ref.load_state_dict({prefix + k: v for k, v in ours.state_dict().items()}, strict=False)
    assert set(missing) <= {prefix + "embeddings.position_ids"} and not unexpected  # same names as the checkpoint
    ids = random_ids(vocab, cfg.context, pad=vocab - 1)  # CLIP-L pads with EOT
    with torch.no_grad():
        expected = ref(input_ids=ids, output_hidden_states=True).hidden_states[-2]  # after 2 of 3 layers, no final LN
        assert max_diff(ours(ids), expected) <= 1e-4


def test_bigg_matches_transformers():
    from transformers import CLIPTextModelWithProjection
    cfg, vocab = sdxl.TextConfig(width=64, layers=3, heads=4, act="gelu", embed_dim=48, vocab=100, context=16), 100
    ours = randomize(sdxl.OpenCLIPTextModel(cfg), seed=1).eval()
    ref = CLIPTextModelWithProjection(hf_text_config(cfg, vocab)).eval()
    missing, unexpected = ref.load_state_dict(openclip_to_hf(ours.state_dict()), strict=False)
    assert set(missing) <= {"text_model.embeddings.position_ids"} and not unexpected
    ids = random_ids(vocab, cfg.context, pad=0)  # bigG pads with 0
    with torch.no_grad():
        out = ref(input_ids=ids, output_hidden_states=True)
        penultimate, pooled = ours(ids)
    assert pooled.shape == (3, 48)
    assert max_diff(penultimate, out.hidden_states[-2]) <= 1e-4
    assert max_diff(pooled, out.text_embeds) <= 1e-4


def test_full_size_text_encoders_on_meta():
    with torch.device("meta"):
        clip_l, clip_g = sdxl.CLIPTextModel(), sdxl.OpenCLIPTextModel()
    assert sum(p.numel() for p in clip_l.parameters()) == 123_060_480
    assert sum(p.numel() for p in clip_g.parameters()) == 694_659_840
    # The checkpoint holds 197 + 390 conditioner tensors: ours plus position_ids and logit_scale (sdxl.md §0, §9).
    assert len(clip_l.state_dict()) + 1 == 197 and len(clip_g.state_dict()) + 1 == 390
    assert clip_g.state_dict()["transformer.resblocks.31.attn.in_proj_weight"].shape == (3840, 1280)


def test_encode_prompt_and_vector_cond():
    from diffusers.models.embeddings import get_timestep_embedding
    tiny_l = sdxl.TextConfig(width=32, layers=2, heads=2)
    tiny_g = sdxl.TextConfig(width=48, layers=2, heads=2, act="gelu", embed_dim=40)
    clip_l, clip_g = randomize(sdxl.CLIPTextModel(tiny_l)).eval(), randomize(sdxl.OpenCLIPTextModel(tiny_g), 1).eval()
    prompts = ["a photo of a cat", "an astronaut riding a horse, 4k"]
    with torch.no_grad():
        context, pooled = sdxl.encode_prompt(clip_l, clip_g, prompts)
        assert context.shape == (2, 77, 32 + 48) and pooled.shape == (2, 40)
        assert torch.equal(context[..., :32], clip_l(sdxl.tokenize(prompts, "end")))        # CLIP-L first, EOT padding
        assert torch.equal(context[..., 32:], clip_g(sdxl.tokenize(prompts, "zero"))[0])    # then bigG, zero padding
        assert not torch.allclose(clip_g(sdxl.tokenize(prompts, "end"))[0], context[..., 32:])  # the padding matters
    # y as diffusers' SDXL UNet builds it: add_time_proj (flip_sin_to_cos, shift 0) of the 6 time ids, after the pooled text.
    pooled = torch.randn(2, 1280)
    y = sdxl.vector_cond(pooled, (896, 1152), (16, 32), (1024, 768))
    time_ids = torch.tensor([[896, 1152, 16, 32, 1024, 768]] * 2, dtype=torch.float32)
    ref = torch.cat([pooled, get_timestep_embedding(time_ids.flatten(), 256, True, 0).reshape(2, -1)], dim=1)
    assert y.shape == (2, 2816) and max_diff(y, ref) <= 1e-5


# ---------------------------------------------------------------------------------------------------------------
# VAE

def sgm_vae_to_diffusers(state, levels):
    """ldm/sgm VAE names (ours) -> diffusers AutoencoderKL names; the decoder's up.i is up_blocks.(levels-1-i)."""
    out = {}
    for k, v in state.items():
        k2 = re.sub(r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets.", k)
        k2 = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", k2)
        k2 = re.sub(r"^decoder\.up\.(\d+)\.block\.", lambda m: f"decoder.up_blocks.{levels - 1 - int(m.group(1))}.resnets.", k2)
        k2 = re.sub(r"^decoder\.up\.(\d+)\.upsample\.", lambda m: f"decoder.up_blocks.{levels - 1 - int(m.group(1))}.upsamplers.0.", k2)
        k2 = re.sub(r"\.mid\.block_(\d)\.", lambda m: f".mid_block.resnets.{int(m.group(1)) - 1}.", k2)
        k2 = k2.replace(".nin_shortcut.", ".conv_shortcut.").replace(".norm_out.", ".conv_norm_out.")
        if ".mid.attn_1." in k2:
            name = k2.split(".mid.attn_1.")[1].split(".")[0]
            k2 = k2.replace(f".mid.attn_1.{name}.", ".mid_block.attentions.0." +
                            {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}[name] + ".")
            v = v.reshape(v.shape[:2]) if v.ndim == 4 else v  # 1x1 convs -> Linear
        out[k2] = v
    return out


@pytest.fixture(scope="module")
def tiny_vaes():
    from diffusers import AutoencoderKL
    cfg = sdxl.VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1)
    ours = randomize(sdxl.AutoencoderKL(cfg), seed=2).eval()
    ref = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=4, norm_num_groups=32,
                        scaling_factor=0.13025).eval()
    ref.load_state_dict(sgm_vae_to_diffusers(ours.state_dict(), 3), strict=True)
    return ours, ref


def test_vae_matches_diffusers(tiny_vaes):
    ours, ref = tiny_vaes
    images = torch.rand(2, 3, 32, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = torch.randn(2, 4, 8, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        posterior = ref.encode(images).latent_dist
        assert max_diff(ours.encode(images), posterior.mean * 0.13025) <= 1e-4
        sample = ours.encode(images, sample=True, generator=torch.Generator().manual_seed(3))
        assert max_diff(sample, posterior.sample(torch.Generator().manual_seed(3)) * 0.13025) <= 1e-4
        decoded = ours.decode(latents)
        assert decoded.shape == (2, 3, 32, 24)
        assert max_diff(decoded, ref.decode(latents / 0.13025).sample) <= 1e-4


def test_vae_bf16_close_to_fp32(tiny_vaes):
    ours, _ = tiny_vaes
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1
    bf16 = sdxl.AutoencoderKL(sdxl.VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1)).to(torch.bfloat16).eval()
    bf16.load_state_dict(ours.state_dict())
    with torch.no_grad():
        for a, b in ((ours.decode(latents), bf16.decode(latents)), (ours.encode(images), bf16.encode(images))):
            assert b.dtype == torch.bfloat16 and torch.isfinite(b).all()
            assert max_diff(a, b) <= 0.05 * a.abs().max().item()


def test_full_size_vae_on_meta():
    with torch.device("meta"):
        vae = sdxl.AutoencoderKL()
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert (count(vae), count(vae.encoder), count(vae.decoder)) == (83_653_863, 34_163_592, 49_490_179)
    sd = vae.state_dict()
    assert len(sd) == 248  # first_stage_model tensors in sd_xl_base_1.0 (sdxl.md §0)
    assert sd["decoder.up.1.block.0.nin_shortcut.weight"].shape == (256, 512, 1, 1)
    assert sd["encoder.down.2.downsample.conv.weight"].shape == (512, 512, 3, 3) and "encoder.down.3.downsample.conv.weight" not in sd
    with torch.device("meta"):
        assert vae.decode(torch.zeros(1, 4, 128, 96)).shape == (1, 3, 1024, 768)


# ---------------------------------------------------------------------------------------------------------------
# Loading the single-file checkpoint

TINY = dict(clip_l=sdxl.TextConfig(width=32, layers=2, heads=2, vocab=60, context=12),
            clip_g=sdxl.TextConfig(width=32, layers=2, heads=2, act="gelu", embed_dim=24, vocab=60, context=12),
            vae=sdxl.VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1))


def fake_checkpoint(path, drop=None, extra=None, reshape=None):
    """A tiny sgm-layout fp16 file written by the reference `safetensors` package; returns the fp32 source modules."""
    from safetensors.torch import save_file
    parts = (randomize(sdxl.CLIPTextModel(TINY["clip_l"]), 0), randomize(sdxl.OpenCLIPTextModel(TINY["clip_g"]), 1),
             randomize(sdxl.AutoencoderKL(TINY["vae"]), 2))
    state = {prefix + k: v.half() for prefix, m in zip((sdxl.PREFIX_CLIP_L, sdxl.PREFIX_CLIP_G, sdxl.PREFIX_VAE), parts)
             for k, v in m.state_dict().items()}
    state.update({sdxl.PREFIX_CLIP_L + "embeddings.position_ids": torch.arange(12.0).half()[None],
                  sdxl.PREFIX_CLIP_G + "logit_scale": torch.tensor(4.6).half(),
                  sdxl.PREFIX_UNET + "out.2.bias": torch.zeros(4).half()})
    state.pop(drop, None)
    state.update(extra or {})
    if reshape:
        state[reshape] = torch.zeros(3, 3).half()
    save_file(state, str(path), metadata={"modelspec.architecture": "stable-diffusion-xl-v1-base"})
    return parts


def test_load_sdxl_parts(tmp_path):
    path = tmp_path / "sdxl.safetensors"
    sources = fake_checkpoint(path)
    loaded = sdxl.load_sdxl_parts(str(path), **TINY)
    for src, got in zip(sources, loaded):
        assert not got.training and not any(p.requires_grad for p in got.parameters())
        src_state, got_state = src.state_dict(), got.state_dict()
        assert src_state.keys() == got_state.keys()
        assert all(torch.equal(got_state[k], src_state[k].half().float()) for k in src_state)
    ids = torch.tensor([[58, 5, 9, 59] + [0] * 8])
    with torch.no_grad():
        assert torch.equal(loaded[1](ids)[1], sources[1].half().float()(ids)[1])
    assert sdxl.read_safetensors(str(path), sdxl.PREFIX_UNET).keys() == {"out.2.bias"}  # the UNet's hook
    bf16 = sdxl.load_sdxl_parts(str(path), dtype=torch.bfloat16, vae_dtype=torch.bfloat16, **TINY)
    assert {p.dtype for m in bf16 for p in m.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("problem, kwargs, words", [
    ("missing", dict(drop=sdxl.PREFIX_VAE + "decoder.conv_out.bias"), ["VAE", "missing keys (1)", "decoder.conv_out.bias"]),
    ("unexpected", dict(extra={sdxl.PREFIX_CLIP_G + "transformer.resblocks.7.ln_1.weight": torch.ones(32).half()}),
     ["bigG", "unexpected keys (1)", "resblocks.7.ln_1.weight"]),
    ("shape", dict(reshape=sdxl.PREFIX_CLIP_L + "final_layer_norm.weight"), ["ViT-L", "shape mismatches (1)", "file [3, 3], model [32]"]),
])
def test_load_errors_name_file_and_keys(tmp_path, problem, kwargs, words):
    path = tmp_path / f"{problem}.safetensors"
    fake_checkpoint(path, **kwargs)
    with pytest.raises(ValueError) as err:
        sdxl.load_sdxl_parts(str(path), **TINY)
    assert all(w in str(err.value) for w in [str(path)] + words), str(err.value)


def test_fp16_vae_refused(tmp_path):
    with pytest.raises(ValueError, match="overflows"):
        sdxl.load_sdxl_parts(str(tmp_path / "unused.safetensors"), vae_dtype=torch.float16)


def test_command_line(tmp_path, capsys):
    path = tmp_path / "sdxl.safetensors"
    fake_checkpoint(path)
    out = subprocess.run([sys.executable, os.path.join(ROOT, "sdxl.py"), "tokenize", "a photo of a cat"],
                         capture_output=True, text=True, check=True).stdout
    assert "CLIP-L ids (7 of 77 used, padded with 49407): 49406 320 1125 539 320 2368 49407" in out
    assert "bigG ids (7 of 77 used, padded with 0)" in out and "cat</w>" in out
    sdxl.main(["inspect", str(path)])  # in-process: one interpreter start is enough
    out = capsys.readouterr().out
    assert f"{len(sdxl.read_safetensors_header(str(path))[0])} tensors" in out
    assert "stable-diffusion-xl-v1-base" in out and sdxl.PREFIX_VAE in out


def test_bench_sdxl_command_line_prints_its_usage_for_what_it_cannot_run():
    """tests/bench_sdxl.py: --help is the usage (status 0); no command, an unknown one or a `pipelines` size that is
    missing or not a multiple of 64 (at least 64) is the usage with status 1, before any model is built."""
    script = os.path.join(ROOT, "tests", "bench_sdxl.py")
    run = lambda *a: subprocess.run([sys.executable, script, *a], capture_output=True, text=True, timeout=120)
    proc = run("--help")
    assert proc.returncode == 0 and "pipelines 512" in proc.stdout
    for argv in ([], ["pipelines"], ["pipelines", "100"], ["precision", "64"]):
        proc = run(*argv)
        assert proc.returncode == 1 and "pipelines 512" in proc.stderr, argv
