"""LoRA for the SDXL UNet (unet.py section 7), checked against diffusers + peft: the same target modules as DMD2's
peft config, Kohya files we write load into diffusers and give our outputs, and LoRA files written by diffusers/peft
(diffusers format) or converted from peft the way DMD2's extract_lora_module.py does (Kohya format) merge into our UNet
to the weights diffusers' load_lora_weights + fuse_lora gives.

diffusers, peft and safetensors are only independent references here; the project's code never imports them."""
import math
import os

import pytest
import torch
from diffusers import LCMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from peft import LoraConfig, get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file

from test_sdxl_unet import randomize_  # every parameter random and non-zero
from unet import (LoRALayer, SDXLUNet, SDXLUNetConfig, add_lora, diffusers_to_sgm_unet, kohya_lora_state,
                  load_lora_state, load_sdxl_unet_state, lora_factors, lora_from_file_state, lora_state_dict,
                  lora_targets, merge_lora, sgm_key)

pytestmark = pytest.mark.usefixtures("one_thread")

# DMD2's peft target_modules (tianweiy/DMD2 main/sdxl/extract_lora_module.py), in diffusers names.
DMD2_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]
TIME_DIM = 8
# SDXL-like (no attention at level 0) and one with attention at level 0, none at level 1 and one ResBlock per level.
TINY = {"sdxl_like": SDXLUNetConfig(model_channels=32, channel_mult=(1, 2, 4), num_res_blocks=2,
                                    transformer_depth=(0, 1, 2), num_head_channels=16, context_dim=24,
                                    adm_in_channels=16 + 6 * TIME_DIM),
        "attn_level0": SDXLUNetConfig(model_channels=32, channel_mult=(1, 1, 2), num_res_blocks=1,
                                      transformer_depth=(1, 0, 2), num_head_channels=8, context_dim=20,
                                      adm_in_channels=12 + 6 * TIME_DIM)}


def diffusers_config(cfg):
    widths = [cfg.model_channels * m for m in cfg.channel_mult]
    return dict(sample_size=16, in_channels=cfg.in_channels, out_channels=cfg.out_channels, block_out_channels=widths,
                down_block_types=["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in cfg.transformer_depth],
                up_block_types=["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(cfg.transformer_depth)],
                layers_per_block=cfg.num_res_blocks,
                transformer_layers_per_block=[max(d, 1) for d in cfg.transformer_depth],
                attention_head_dim=[w // cfg.num_head_channels for w in widths], cross_attention_dim=cfg.context_dim,
                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
                projection_class_embeddings_input_dim=cfg.adm_in_channels)


def pair(name, seed=0):
    """(cfg, random diffusers UNet, our SDXLUNet with the same weights)"""
    cfg = TINY[name]
    ref = randomize_(UNet2DConditionModel(**diffusers_config(cfg)), seed).eval()
    ours = SDXLUNet(cfg).eval()
    load_sdxl_unet_state(ours, diffusers_to_sgm_unet(ref.state_dict(), cfg), f"tiny {name}")
    return cfg, ref, ours


def pipeline(unet):
    """A diffusers SDXL pipeline holding only the UNet: its load_lora_weights and fuse_lora are the reference."""
    return StableDiffusionXLPipeline(vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
                                     unet=unet, scheduler=LCMScheduler(), add_watermarker=False)


def outputs(cfg, ref, ours, seed=1):
    """(diffusers eps, our eps) on the same random inputs. [2, 4, 8, 8] each"""
    g = torch.Generator().manual_seed(seed)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 7, cfg.context_dim, generator=g)
    text_embeds = torch.randn(2, cfg.adm_in_channels - 6 * TIME_DIM, generator=g)
    time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0], [768.0, 1344.0, 64.0, 16.0, 832.0, 1216.0]])
    t = torch.tensor([999, 249])
    with torch.no_grad():
        y = torch.cat([text_embeds, ref.add_time_proj(time_ids.flatten()).reshape(2, -1)], dim=1)
        expected = ref(x, t, encoder_hidden_states=context,
                       added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}).sample
        return expected, ours(x, t, context, y)


def randomize_lora_(model, seed, std=0.3):
    """Non-zero up weights (they start at zero), so that every LoRA changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALayer):
                m.lora_up.weight.copy_(std * torch.randn(m.lora_up.weight.shape, generator=g) / math.sqrt(m.rank))


def peft_lora(ref, rank, alpha, seed):
    """DMD2's peft adapter on a diffusers UNet, with random lora_B (peft starts it at zero)."""
    ref.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=DMD2_TARGETS, lora_dropout=0.0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g) / math.sqrt(rank))
    return get_peft_model_state_dict(ref)


def read_safetensors(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.mark.parametrize("name", list(TINY))
def test_targets_are_dmd2_peft_targets(name):
    """Our targets, in diffusers names, are exactly the modules peft wraps with DMD2's target_modules."""
    cfg, ref, ours = pair(name)
    ref.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=DMD2_TARGETS))
    wrapped = {n.removesuffix(".lora_A") for n, _ in ref.named_modules() if n.endswith(".lora_A")}
    targets = lora_targets(ours)
    assert set(targets.values()) == wrapped and len(targets) == len(wrapped) > 40
    assert all(sgm_key(f"{d}.weight", cfg) == f"{s}.weight" for s, d in targets.items())
    assert not any(n.startswith(("input_blocks.0.", "out.", "time_embed", "label_emb")) for n in targets)


def test_lora_starts_as_base_trains_only_lora_and_reloads(tmp_path):
    cfg, ref, ours = pair("sdxl_like")
    # Frozen, as add_lora leaves the base weights: whether a weight requires grad picks torch's matmul path for a
    # non-contiguous input, and on some CPUs the two paths round differently.
    base = outputs(cfg, ref, ours.requires_grad_(False))[1]
    names = add_lora(ours, rank=4, alpha=8)
    assert all(isinstance(ours.get_submodule(n), LoRALayer) for n in names)
    torch.testing.assert_close(outputs(cfg, ref, ours)[1], base, rtol=0, atol=0)      # up = 0: the base UNet exactly
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    state = lora_state_dict(ours)
    assert trainable == set(state) and len(state) == 2 * len(names)
    assert set(ours.state_dict()) - set(state) == set(SDXLUNet(cfg).state_dict())      # base names unchanged
    randomize_lora_(ours, 3)
    changed = outputs(cfg, ref, ours)[1]
    assert (changed - base).abs().max() > 1e-2
    other = SDXLUNet(cfg).eval()
    other.load_state_dict(ours.state_dict(), strict=False)
    add_lora(other, rank=4, alpha=8)
    load_lora_state(other, state, "lora.pt")
    torch.testing.assert_close(outputs(cfg, ref, other)[1], changed, rtol=0, atol=0)
    with pytest.raises(ValueError, match="(?s)lora.pt: .*missing keys"):
        load_lora_state(other, dict(list(state.items())[1:]), "lora.pt")


@pytest.mark.parametrize("name", list(TINY))
def test_trained_lora_exported_as_kohya_loads_into_diffusers(tmp_path, name):
    """A few optimizer steps on a LoRA UNet, Kohya export, diffusers load_lora_weights + fuse_lora: same UNet output."""
    cfg, ref, ours = pair(name)
    add_lora(ours, rank=4, alpha=8)
    opt = torch.optim.Adam([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(5)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 7, cfg.context_dim, generator=g)
    y = torch.randn(2, cfg.adm_in_channels, generator=g)
    for _ in range(3):
        loss = ours(x, torch.tensor([999, 499]), context, y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path / "lora.safetensors"
    save_file(kohya_lora_state(lora_factors(ours), cfg), str(path))
    keys = read_safetensors(path)[0]
    assert all(k.startswith("lora_unet_") for k in keys)
    assert any(k.endswith("_attn1_to_out_0.lora_up.weight") for k in keys)
    assert keys[next(k for k in keys if k.endswith(".alpha"))].ndim == 0
    pipe = pipeline(ref)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=1.0, components=["unet"])
    expected, got = outputs(cfg, ref, ours)
    assert (got - outputs(cfg, pair(name)[1], pair(name)[2])[1]).abs().max() > 1e-3    # training changed the output
    assert (got - expected).abs().max() <= 1e-4


def fused_reference(name, lora_file, scale, seed=0):
    """diffusers' merged UNet weights in our names, after load_lora_weights + fuse_lora(lora_scale=scale)."""
    cfg, ref, _ = pair(name, seed)
    pipe = pipeline(ref)
    pipe.load_lora_weights(str(lora_file))
    pipe.fuse_lora(lora_scale=scale, components=["unet"])
    pipe.unload_lora_weights()                       # the fused weights stay, the LoRA layers go
    return diffusers_to_sgm_unet(ref.state_dict(), cfg)


def assert_merges_like_diffusers(name, path, scale, expect_alpha):
    cfg, _, ours = pair(name)
    state, metadata = read_safetensors(path)
    factors = lora_from_file_state(state, cfg, str(path), metadata)
    assert {alpha for _, _, alpha in factors.values()} == {expect_alpha}
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    merge_lora(ours, factors, scale, str(path))
    expected = fused_reference(name, path, scale)
    moved = [k for k, v in ours.state_dict().items() if not torch.equal(v, before[k])]
    assert len(moved) == len(factors) > 40
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=1e-6, msg=k)


@pytest.mark.parametrize("name", ["attn_level0"])
def test_diffusers_format_lora_merges_like_fuse_lora(tmp_path, name):
    """A LoRA saved by diffusers (peft lora_A/lora_B keys, alpha in the metadata) merges to diffusers' fused weights."""
    _, ref, _ = pair(name)
    state = peft_lora(ref, rank=4, alpha=2, seed=7)
    StableDiffusionXLPipeline.save_lora_weights(str(tmp_path), unet_lora_layers=state,
                                                unet_lora_adapter_metadata=ref.peft_config["default"].to_dict())
    assert_merges_like_diffusers(name, tmp_path / "pytorch_lora_weights.safetensors", 0.7, 2.0)


def kohya_from_peft(state, alpha):
    """DMD2's extract_lora_module.py conversion of a peft state dict to Kohya keys (rewritten here from its rules)."""
    out = {}
    for k, v in state.items():
        k = k.replace("lora_A", "lora_down").replace("lora_B", "lora_up")
        parts = k.split(".")
        stem = "lora_unet_" + "_".join(parts[:-2])
        out[f"{stem}.{parts[-2]}.{parts[-1]}"] = v
        out[f"{stem}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return out


@pytest.mark.parametrize("name", list(TINY))
def test_kohya_lora_from_peft_merges_like_fuse_lora(tmp_path, name):
    """DMD2's released format (Kohya keys from a peft adapter, alpha keys) merges to diffusers' fused weights; the same
    LoRA under kohya sd-scripts' sgm-style names merges to the same weights."""
    cfg, ref, _ = pair(name)
    kohya = kohya_from_peft(peft_lora(ref, rank=4, alpha=8, seed=11), 8.0)
    path = tmp_path / "dmd2_style.safetensors"
    save_file(kohya, str(path))
    assert_merges_like_diffusers(name, path, 1.0, 8.0)
    ours_a, ours_b = pair(name)[2], pair(name)[2]
    merge_lora(ours_a, lora_from_file_state(kohya, cfg, "diffusers names"))
    targets = {"lora_unet_" + d.replace(".", "_"): "lora_unet_" + s.replace(".", "_")
               for s, d in lora_targets(ours_b).items()}
    sgm_style = {targets[k.split(".")[0]] + k[k.index("."):]: v for k, v in kohya.items()}
    assert set(sgm_style) != set(kohya)
    merge_lora(ours_b, lora_from_file_state(sgm_style, cfg, "sgm names"))
    for k, v in ours_a.state_dict().items():
        torch.testing.assert_close(ours_b.state_dict()[k], v, rtol=0, atol=0)


def test_bad_lora_files_list_every_problem():
    cfg, ref, ours = pair("sdxl_like")
    kohya = kohya_from_peft(peft_lora(ref, rank=4, alpha=8, seed=1), 8.0)
    down = next(k for k in kohya if k.endswith("lora_down.weight"))
    bad = dict(kohya, **{"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 8),
                         "lora_unet_not_a_module.lora_up.weight": torch.zeros(8, 4)})
    del bad[down]
    with pytest.raises(ValueError) as e:
        lora_from_file_state(bad, cfg, "community.safetensors")
    message = str(e.value)
    assert message.startswith("community.safetensors: ")
    for text in ("lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight",
                 "lora_unet_not_a_module.lora_up.weight",
                 "without both lora_down and lora_up", "text-encoder LoRA keys"):
        assert text in message
    wrong = dict(kohya)
    wrong[down] = torch.zeros(4, 3)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(ValueError, match="(?s)wrong.safetensors: cannot merge.*in_layers.2: down \\[4, 3\\]"):
        merge_lora(ours, lora_from_file_state(wrong, cfg, "wrong.safetensors"), 1.0, "wrong.safetensors")
    assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())         # nothing half-merged
    with pytest.raises(ValueError, match="(?s)x.safetensors: .*no LoRA keys"):
        lora_from_file_state({}, cfg, "x.safetensors")


# ----------------------------------------------------------------------------
# sdxl.py: a tiny LoRA run (backward simulation on), its files, Kohya export into diffusers, generate --lora.

@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    import numpy as np
    import PIL.Image
    import sdxl
    root = tmp_path_factory.mktemp("lora_run")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        PIL.Image.fromarray(rng.integers(0, 255, (140, 160, 3), dtype=np.uint8)).save(root / "images" / f"im{i}.png")
        (root / "images" / f"im{i}.txt").write_text(f"a test caption {i}\n")
    sdxl.main(["encode", "--preset", "tiny", "--images", str(root / "images"), "--out", str(root / "latents"),
               "--device", "cpu"])
    args = ["train", "--preset", "tiny", "--latents", str(root / "latents"), "--outdir", str(root / "out"),
            "--dfake_gen_update_ratio", "1", "--lora_rank", "4", "--lora_alpha", "8", "--device", "cpu",
            "--sample_every", "0", "--ckpt_every", "0"]
    sdxl.main(args + ["--total_steps", "2"])
    return dict(root=root, out=root / "out", args=args)


def test_lora_run_trains_the_lora_only_and_keeps_lora_only_files(lora_run):
    import sdxl
    ckpt = torch.load(lora_run["out"] / "checkpoint.pt", weights_only=True)
    assert ckpt["generator"] and all(".lora_down." in k or ".lora_up." in k for k in ckpt["generator"])
    assert len(ckpt["fake_score"]) > len(SDXLUNet(sdxl.TINY_UNET).state_dict())            # the fake score stays full
    ups = [v for k, v in ckpt["generator"].items() if ".lora_up." in k]
    assert max(v.abs().max() for v in ups) > 0                                             # trained away from zero
    state, metadata = sdxl.read_lora(str(lora_run["out"] / "generator.safetensors"))
    assert set(state) == set(ckpt["generator"]) and metadata["step"] == "2"
    assert set(lora_targets(SDXLUNet(sdxl.TINY_UNET))) == {k.rsplit(".", 2)[0] for k in state}
    sdxl.main(lora_run["args"] + ["--total_steps", "3", "--resume"])                         # resumes from LoRA-only
    assert sdxl.read_lora(str(lora_run["out"] / "generator.safetensors"))[1]["step"] == "3"


def test_lora_files_given_where_a_unet_is_expected_or_at_another_rank_say_so(lora_run, capsys):
    import sdxl
    gen = str(lora_run["out"] / "generator.safetensors")
    with pytest.raises(ValueError, match=f"{gen}: a LoRA, not a UNet: pass it with --lora"):
        sdxl.load_unet_state(gen, sdxl.TINY_UNET)
    with pytest.raises(SystemExit):                  # one line, not a size mismatch for each LoRA tensor
        sdxl.main(lora_run["args"] + ["--total_steps", "4", "--resume", "--lora_rank", "8"])
    err = capsys.readouterr().err
    assert "its run had --lora_rank 4, this one has 8; resume with --lora_rank 4" in err and err.count("\n") == 1, err


def test_lora_run_exported_as_kohya_gives_diffusers_our_unet(lora_run, tmp_path):
    """export --lora --format kohya -> diffusers load_lora_weights + fuse_lora on the tiny base UNet = our base UNet
    with the run's LoRA (loaded by generate's path), to 1e-4."""
    import sdxl
    import sdxl_diffusers
    gen, out = str(lora_run["out"] / "generator.safetensors"), str(tmp_path / "kohya.safetensors")
    sdxl.main(["export", "--lora", gen, "--format", "kohya", "--dtype", "fp32", "--out", out])
    assert all(k.startswith("lora_unet_") for k in read_safetensors(out)[0])
    cfg, base = sdxl.TINY_UNET, sdxl.load_parts("tiny", "", "cpu")["unet_state"]
    ref = UNet2DConditionModel(**sdxl_diffusers.diffusers_unet_config(cfg))
    ref.load_state_dict(sdxl.unet.sgm_to_diffusers_unet(base, cfg, "tiny"), strict=True)
    pipe = pipeline(ref.eval())
    pipe.load_lora_weights(out)
    pipe.fuse_lora(lora_scale=1.0, components=["unet"])
    args = sdxl.build_parser()[0].parse_args(["generate", "--preset", "tiny", "--lora", gen, "--prompt", "x",
                                              "--device", "cpu", "--dtype", "fp32"])
    ours = sdxl.load_for_inference(args)[0]
    plain = sdxl.build_unet(base, cfg, "cpu", torch.float32, "tiny")
    g = torch.Generator().manual_seed(0)
    x, t, context = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([999, 249]), torch.randn(2, 77, cfg.context_dim)
    text_embeds, time_ids = torch.randn(2, 32, generator=g), torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]] * 2)
    y = sdxl.vector_cond(text_embeds, (128, 128), (0, 0), (128, 128))
    with torch.no_grad():
        expected = ref(x, t, encoder_hidden_states=context,
                       added_cond_kwargs=dict(text_embeds=text_embeds, time_ids=time_ids)).sample
        got, before = ours(x, t, context, y), plain(x, t, context, y)
    assert (got - before).abs().max() > 1e-6                    # the LoRA changes the output
    assert (got - expected).abs().max() <= 1e-4


def test_generate_with_a_lora_and_its_errors(lora_run, tmp_path, capsys):
    import sdxl
    gen = str(lora_run["out"] / "generator.safetensors")
    png = str(tmp_path / "x.png")
    sdxl.main(["generate", "--preset", "tiny", "--lora", gen, "--lora_scale", "0.5", "--prompt", "a cat",
               "--out", png, "--device", "cpu"])
    assert os.path.getsize(png) > 0 and "at scale 0.5" in capsys.readouterr().out
    (tmp_path / "prompts.txt").write_text("a cat\na dog\na bird\n")
    folder = ["generate", "--preset", "tiny", "--lora", gen, "--prompts", str(tmp_path / "prompts.txt"), "--outdir",
              str(tmp_path / "images"), "--batch", "2", "--device", "cpu"]
    sdxl.main(folder)
    assert sorted(os.listdir(tmp_path / "images")) == ["00000.png", "00001.png", "00002.png", "generate.json"]
    first = (tmp_path / "images" / "00002.png").read_bytes()
    (tmp_path / "images" / "00002.png").unlink()                        # as if stopped before the last batch
    capsys.readouterr()
    sdxl.main(folder)                                                    # the same settings: it continues
    assert (tmp_path / "images" / "00002.png").read_bytes() == first
    printed = capsys.readouterr().out                                    # it says what it wrote, not all three
    assert "wrote 1 images to" in printed and "kept the 2 an earlier run had written" in printed
    with pytest.raises(SystemExit):                                      # other settings: refused, nothing replaced
        sdxl.main([*folder, "--seed", "5", "--lora_scale", "0.5"])
    assert "other settings (different: lora_scale, seed)" in capsys.readouterr().err
    assert (tmp_path / "images" / "00002.png").read_bytes() == first
    bad = str(tmp_path / "bad.safetensors")
    state, _ = sdxl.read_lora(gen)
    sdxl.write_safetensors(bad, {**state, "lora_te1_text_model_x.lora_down.weight": torch.zeros(4, 4)})
    with pytest.raises(SystemExit):
        sdxl.main(["generate", "--preset", "tiny", "--lora", bad, "--prompt", "a", "--out", png, "--device", "cpu"])
    err = capsys.readouterr().err
    assert f"{bad}: not a LoRA" in err and "lora_te1_text_model_x.lora_down.weight" in err


def test_full_size_rank_64_lora_has_the_released_files_size():
    """On SDXL base (meta device), DMD2's targets at rank 64 hold as many weights as the released LoRA files hold
    bytes: 787 MB in fp32 and 394 MB in fp16 (huggingface.co/tianweiy/DMD2, dmd2.md §8.1; the alphas add 788 values)."""
    with torch.device("meta"):
        net = SDXLUNet(SDXLUNetConfig())
        names = add_lora(net, rank=64, alpha=8)
    count = sum(v.numel() for v in lora_state_dict(net).values())
    assert len(names) == 788
    assert abs(4 * count / 1e6 - 787) < 0.5 and abs(2 * count / 1e6 - 394) < 0.6
