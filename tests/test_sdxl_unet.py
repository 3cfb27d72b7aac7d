"""SDXL UNet (sgm names) and the diffusers -> sgm renaming, checked against diffusers' UNet2DConditionModel.

diffusers is only an independent reference here; the project's code never imports it."""
import math
import warnings

import pytest
import torch

from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm
from diffusers.models.embeddings import get_timestep_embedding

from unet import (SDXLUNet, SDXLUNetConfig, TransformerBlock, ResBlock, diffusers_to_sgm_unet, infer_sdxl_unet_config,
                  load_sdxl_unet_state, sgm_key, sgm_to_diffusers_unet, timestep_embedding)

# Two tiny configurations: SDXL-like (no attention at level 0), and one with attention at level 0,
# none at level 1 (its upsampler then sits at output index .1) and a single ResBlock per level.
# adm_in_channels = pooled width + 6 size embeddings of `time_dim` each, as in SDXL (1280 + 6 * 256).
TINY = {
    "sdxl_like": (SDXLUNetConfig(model_channels=32, channel_mult=(1, 2, 4), num_res_blocks=2, transformer_depth=(0, 1, 2),
                                 num_head_channels=16, context_dim=24, adm_in_channels=16 + 6 * 8), 8),
    "attn_level0": (SDXLUNetConfig(model_channels=32, channel_mult=(1, 1, 2), num_res_blocks=1, transformer_depth=(1, 0, 2),
                                   num_head_channels=8, context_dim=20, adm_in_channels=12 + 6 * 4), 4),
}

# configs/inference/sd_xl_base.yaml, network_config.params (sdxl.md §1.1), for diffusers' own sgm -> diffusers config code
SGM_SDXL_YAML = {"model": {"params": {
    "network_config": {"params": dict(adm_in_channels=2816, num_classes="sequential", in_channels=4, out_channels=4,
                                      model_channels=320, attention_resolutions=[4, 2], num_res_blocks=2, channel_mult=[1, 2, 4],
                                      num_head_channels=64, use_linear_in_transformer=True, transformer_depth=[1, 2, 10],
                                      context_dim=2048, spatial_transformer_attn_type="softmax-xformers", legacy=False)},
    "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}


def diffusers_config(cfg, time_dim):
    """UNet2DConditionModel arguments equivalent to cfg, written as in SDXL's diffusers config.json."""
    widths = [cfg.model_channels * m for m in cfg.channel_mult]
    return dict(sample_size=16, in_channels=cfg.in_channels, out_channels=cfg.out_channels, block_out_channels=widths,
                down_block_types=["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in cfg.transformer_depth],
                up_block_types=["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(cfg.transformer_depth)],
                layers_per_block=cfg.num_res_blocks, transformer_layers_per_block=[max(d, 1) for d in cfg.transformer_depth],
                attention_head_dim=[w // cfg.num_head_channels for w in widths],  # diffusers' name for the number of heads
                cross_attention_dim=cfg.context_dim, use_linear_projection=True, flip_sin_to_cos=True, freq_shift=0,
                addition_embed_type="text_time", addition_time_embed_dim=time_dim,
                projection_class_embeddings_input_dim=cfg.adm_in_channels)


def randomize_(model, seed):
    """Every parameter random and non-zero (diffusers/sgm zero-init some layers): norms 1 +- 0.1, biases +- 0.1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            else:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
    return model


def tiny_pair(name, seed=0):
    """(cfg, time_dim, random diffusers UNet, our SDXLUNet loaded with its renamed weights)"""
    cfg, time_dim = TINY[name]
    ref = randomize_(UNet2DConditionModel(**diffusers_config(cfg, time_dim)), seed).eval()
    ours = SDXLUNet(cfg).eval()
    load_sdxl_unet_state(ours, diffusers_to_sgm_unet(ref.state_dict(), cfg), f"tiny {name}")
    return cfg, time_dim, ref, ours


def inputs(cfg, time_dim, seed=1, B=2, hw=8, tokens=7):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, cfg.in_channels, hw, hw, generator=g)                              # [B, 4, h, w]
    context = torch.randn(B, tokens, cfg.context_dim, generator=g)                       # [B, 77, 2048] in SDXL
    text_embeds = torch.randn(B, cfg.adm_in_channels - 6 * time_dim, generator=g)        # pooled bigG [B, 1280] in SDXL
    time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0], [768.0, 1344.0, 64.0, 16.0, 832.0, 1216.0]])[:B]
    return x, context, text_embeds, time_ids


def test_timestep_embedding_matches_diffusers():
    t = torch.tensor([0.0, 1.0, 249.0, 399.0, 999.0, 12.5])
    for dim, values in ((320, t), (256, torch.tensor([0.0, 64.0, 768.0, 1024.0, 1344.0]))):
        ref = get_timestep_embedding(values, dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        torch.testing.assert_close(timestep_embedding(values, dim), ref, rtol=0, atol=1e-6)
    emb = timestep_embedding(torch.tensor([0.0]), 320)
    assert emb[0, :160].eq(1).all() and emb[0, 160:].eq(0).all()                          # cos half first


@pytest.mark.parametrize("name", list(TINY))
def test_tiny_matches_diffusers(name):
    cfg, time_dim, ref, ours = tiny_pair(name)
    x, context, text_embeds, time_ids = inputs(cfg, time_dim)
    t = torch.tensor([999, 249]) if name == "sdxl_like" else torch.tensor([399.0, 12.5])  # int and float DDPM t
    # diffusers builds the 2816-vector itself: [text_embeds | Timesteps(time_ids) each value embedded separately]
    y = torch.cat([text_embeds, ref.add_time_proj(time_ids.flatten()).reshape(len(x), -1)], dim=1)
    mids = []
    ref.mid_block.register_forward_hook(lambda module, args, out: mids.append(out))
    with torch.no_grad():
        expected = ref(x, t, encoder_hidden_states=context, added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}).sample
        eps, mid = ours(x, t, context, y, return_mid=True)
        mid_only = ours.mid_features(x, t, context, y)
    # every normalization layer has diffusers' eps (GroupNorm 1e-5 in ResBlocks and out, 1e-6 in transformers; LayerNorm 1e-5)
    norms = [(n, m) for n, m in ref.named_modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))]
    assert len(norms) > 10
    for n, m in norms:
        theirs = ours.get_submodule(sgm_key(n + ".weight", cfg).removesuffix(".weight"))
        assert isinstance(theirs, type(m)) and theirs.eps == m.eps, n
    assert expected.std() > 0.1 and mids[0].std() > 0.1                                   # the comparison is not between near-zeros
    assert eps.shape == x.shape and mid.shape == (2, cfg.model_channels * cfg.channel_mult[-1], 2, 2)   # h/4, w/4
    assert (eps - expected).abs().max() <= 1e-4
    assert (mid - mids[0]).abs().max() <= 1e-4
    torch.testing.assert_close(mid_only, mid, rtol=0, atol=0)


def test_scalar_timestep_broadcasts():
    cfg, time_dim, _, ours = tiny_pair("attn_level0")
    x, context, _, _ = inputs(cfg, time_dim)
    y = torch.randn(2, cfg.adm_in_channels)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, 500, context, y), ours(x, torch.tensor([500.0, 500.0]), context, y), rtol=0, atol=0)


def test_full_size_matches_sgm_layout():
    with torch.device("meta"):
        model = SDXLUNet()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sum(math.prod(s) for s in shapes.values()) == 2_567_463_684                  # sdxl.md §1.1 / §9
    assert len(shapes) == 1680
    assert sum(p.numel() for m in model.modules() if isinstance(m, TransformerBlock) for p in m.parameters()) == 2_185_401_600
    assert sum(isinstance(m, ResBlock) for m in model.modules()) == 17
    assert sum(isinstance(m, TransformerBlock) for m in model.modules()) == 70
    for key, shape in {"time_embed.0.weight": (1280, 320), "label_emb.0.0.weight": (1280, 2816), "input_blocks.0.0.weight": (320, 4, 3, 3),
                       "input_blocks.3.0.op.weight": (320, 320, 3, 3), "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
                       "input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
                       "middle_block.1.transformer_blocks.9.ff.net.0.proj.weight": (10240, 1280),
                       "middle_block.1.proj_in.weight": (1280, 1280), "output_blocks.0.0.in_layers.0.weight": (2560,),
                       "output_blocks.2.2.conv.weight": (1280, 1280, 3, 3), "output_blocks.5.2.conv.weight": (640, 640, 3, 3),
                       "output_blocks.5.1.transformer_blocks.1.attn2.to_k.weight": (640, 2048),
                       "output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1), "out.2.weight": (4, 320, 3, 3)}.items():
        assert shapes[key] == shape, key
    assert "input_blocks.1.1.norm.weight" not in shapes                                  # no attention at level 0
    # shapes flow through the full network: 1024^2 image -> 128^2 latent; the GAN head sees [B, 1280, 32, 32]
    x = torch.empty(2, 4, 128, 128, device="meta")
    eps, mid = model(x, torch.tensor([999, 249], device="meta"), torch.empty(2, 77, 2048, device="meta"),
                     torch.empty(2, 2816, device="meta"), return_mid=True)
    assert eps.shape == (2, 4, 128, 128) and mid.shape == (2, 1280, 32, 32)


def test_full_size_renaming_against_diffusers():
    # diffusers' own sgm-yaml -> diffusers-config code gives the SDXL UNet2DConditionModel; build it without weights
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcfg = create_unet_diffusers_config_from_ldm(SGM_SDXL_YAML, None, image_size=1024)
    with torch.device("meta"):
        ref = UNet2DConditionModel(**dcfg)
    ref_sd = ref.state_dict()
    assert len(ref_sd) == 1680 and sum(v.numel() for v in ref_sd.values()) == 2_567_463_684
    cfg = SDXLUNetConfig()
    renamed = diffusers_to_sgm_unet(ref_sd, cfg)          # raises unless a key- and shape-exact bijection onto SDXLUNet
    assert len(renamed) == 1680
    # independent direction: diffusers' sgm -> diffusers single-file converter applied to our key names
    with torch.device("meta"):
        ours = SDXLUNet(cfg).state_dict()
    back = convert_ldm_unet_checkpoint({"model.diffusion_model." + k: k for k in ours}, dcfg)
    assert set(back) == set(ref_sd)
    mismatched = [d for d in ref_sd if sgm_key(d, cfg) != back[d]]
    assert not mismatched, mismatched[:10]
    exported = sgm_to_diffusers_unet(ours, cfg)           # the inverse, for `sdxl.py export --format diffusers`
    assert {k: tuple(v.shape) for k, v in exported.items()} == {k: tuple(v.shape) for k, v in ref_sd.items()}


def test_renaming_errors_list_every_problem():
    cfg, time_dim = TINY["sdxl_like"]
    with torch.device("meta"):
        sd = UNet2DConditionModel(**diffusers_config(cfg, time_dim)).state_dict()
    sd["encoder_hid_proj.weight"] = torch.empty(4, 4)                                  # no rule for it
    del sd["conv_in.bias"]
    w = sd["up_blocks.0.attentions.0.proj_in.weight"]
    sd["up_blocks.0.attentions.0.proj_in.weight"] = w[:, :, None, None]                # conv proj_in (use_linear_projection=False)
    with pytest.raises(ValueError) as err:
        diffusers_to_sgm_unet(sd, cfg, source_name="dmd2_tiny_unet_fp16.bin")
    msg = str(err.value)
    for text in ("dmd2_tiny_unet_fp16.bin", "no renaming rule", "encoder_hid_proj.weight", "missing keys (1)",
                 "input_blocks.0.0.bias", "shape mismatches (1)", "output_blocks.0.1.proj_in.weight: file [128, 128, 1, 1], model [128, 128]"):
        assert text in msg, (text, msg)
    # a key that two rules would send to one sgm name is reported, not silently overwritten
    sd = dict(UNet2DConditionModel(**diffusers_config(cfg, time_dim)).state_dict())
    sd["mid_block.resnets.0.conv1.weight_dup"] = sd.pop("mid_block.resnets.0.conv1.weight")
    with pytest.raises(ValueError, match="middle_block.0.in_layers.2.weight_dup"):
        diffusers_to_sgm_unet(sd, cfg)


def test_load_errors_name_the_file_and_give_hints():
    cfg, time_dim = TINY["attn_level0"]
    model = SDXLUNet(cfg)
    good = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as err:
        load_sdxl_unet_state(model, {"model.diffusion_model." + k: v for k, v in good.items()}, "sd_xl_base_1.0.safetensors")
    assert "sd_xl_base_1.0.safetensors" in str(err.value) and "'model.diffusion_model.' prefix" in str(err.value)
    ref = UNet2DConditionModel(**diffusers_config(cfg, time_dim))
    with pytest.raises(ValueError, match="diffusers_to_sgm_unet"):
        load_sdxl_unet_state(model, ref.state_dict(), "dmd2.bin")
    bad = dict(good)
    del bad["out.2.bias"]
    bad["label_emb.0.0.weight"] = torch.zeros(model.label_emb[0][0].weight.shape[0], 999)
    bad["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as err:
        load_sdxl_unet_state(model, bad, "broken.safetensors")
    msg = str(err.value)
    for text in ("broken.safetensors", "missing keys (1)", "out.2.bias", "unexpected keys (1)", "extra.weight",
                 f"label_emb.0.0.weight: file [128, 999], model [128, {cfg.adm_in_channels}]"):
        assert text in msg, (text, msg)


def test_fp16_file_roundtrip(tmp_path):
    """DMD2 ships a torch-saved fp16 diffusers state dict; it loads with weights_only=True and renames exactly."""
    cfg, time_dim = TINY["sdxl_like"]
    ref = randomize_(UNet2DConditionModel(**diffusers_config(cfg, time_dim)), seed=3)
    path = tmp_path / "dmd2_tiny_unet_fp16.bin"
    torch.save({k: v.half() for k, v in ref.state_dict().items()}, path)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    model = load_sdxl_unet_state(SDXLUNet(cfg), diffusers_to_sgm_unet(sd, cfg, str(path)), str(path))
    ours = model.state_dict()
    for key, tensor in sd.items():
        assert torch.equal(ours[sgm_key(key, cfg)], tensor.float()), key
    # weight-free construction on the meta device, then take the file's fp16 tensors as the parameters
    with torch.device("meta"):
        empty = SDXLUNet(cfg)
    load_sdxl_unet_state(empty, diffusers_to_sgm_unet(sd, cfg, str(path)), str(path), assign=True)
    for key, tensor in empty.state_dict().items():
        assert tensor.device.type == "cpu" and tensor.dtype == torch.float16 and torch.equal(tensor.float(), ours[key]), key


def test_checkpointing_gives_same_gradients_and_stores_less():
    cfg, time_dim, _, plain = tiny_pair("sdxl_like", seed=4)
    ckpt = SDXLUNet(cfg, checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x, context, _, _ = inputs(cfg, time_dim, seed=5)
    y = torch.randn(2, cfg.adm_in_channels)
    results = []
    for model in (plain, ckpt):
        saved = []                                   # bytes autograd keeps for backward outside checkpointed regions
        xg = x.clone().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.nbytes) or t, lambda t: t):
            eps, mid = model.train()(xg, torch.tensor([999, 249]), context, y, return_mid=True)
        (eps.square().mean() + mid.square().mean()).backward()
        results.append((sum(saved), xg.grad, {k: p.grad for k, p in model.named_parameters()}))
    (saved_plain, gx_plain, g_plain), (saved_ckpt, gx_ckpt, g_ckpt) = results
    assert saved_ckpt < 0.3 * saved_plain, (saved_ckpt, saved_plain)
    torch.testing.assert_close(gx_ckpt, gx_plain, rtol=1e-5, atol=1e-7)
    for key in g_plain:
        torch.testing.assert_close(g_ckpt[key], g_plain[key], rtol=1e-5, atol=1e-7, msg=key)


def test_bf16_autocast_on_cpu_is_close_to_fp32():
    cfg, time_dim, _, model = tiny_pair("sdxl_like", seed=6)
    x, context, _, _ = inputs(cfg, time_dim, seed=7)
    y = torch.randn(2, cfg.adm_in_channels)
    t = torch.tensor([999, 249])
    with torch.no_grad():
        ref = model(x, t, context, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, t, context, y)
    assert low.dtype == torch.bfloat16                                                   # autocast really ran in bf16
    rel = ((low.float() - ref).norm() / ref.norm()).item()
    assert rel < 3e-2, rel


def test_config_validation():
    with pytest.raises(ValueError, match="transformer_depth"):
        SDXLUNetConfig(transformer_depth=(0, 2))
    with pytest.raises(ValueError, match="middle block"):
        SDXLUNetConfig(transformer_depth=(0, 2, 0))
    with pytest.raises(ValueError, match="multiples of 32"):
        SDXLUNetConfig(model_channels=48)


# Config inference from shapes: two layouts no other test uses, each following SDXL's 64-channel-head convention
# (narrower models: the largest width dividing every level's and 64).
UNSEEN = [SDXLUNetConfig(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2, transformer_depth=(0, 1, 2),
                         num_head_channels=64, context_dim=192, adm_in_channels=96 + 6 * 256),
          SDXLUNetConfig(model_channels=32, channel_mult=(1, 3), num_res_blocks=1, transformer_depth=(1, 3),
                         num_head_channels=32, context_dim=192, adm_in_channels=32 + 6 * 256, in_channels=8, out_channels=4)]


def meta_shapes(cfg):
    with torch.device("meta"):
        return {k: v.shape for k, v in SDXLUNet(cfg).state_dict().items()}


def test_config_inferred_from_shapes_full_size_on_meta():
    cfg = infer_sdxl_unet_config(meta_shapes(SDXLUNetConfig()), "sd_xl_base_1.0.safetensors")
    assert cfg == SDXLUNetConfig()
    with torch.device("meta"):
        assert sum(p.numel() for p in SDXLUNet(cfg).parameters()) == 2_567_463_684


@pytest.mark.parametrize("cfg", UNSEEN, ids=["three_levels", "two_levels_8ch_in"])
def test_config_inferred_from_shapes_unseen_layouts(cfg):
    assert infer_sdxl_unet_config(meta_shapes(cfg)) == cfg


def test_config_inference_errors_name_the_file_and_what():
    full = meta_shapes(SDXLUNetConfig())
    cases = [({k: v for k, v in full.items() if k != "label_emb.0.0.weight"}, "no tensor label_emb.0.0.weight"),
             ({k: v for k, v in full.items() if not k.startswith("input_blocks.2.")}, "ResBlocks per level [1, 2, 2] differ"),
             ({k: v for k, v in full.items() if not k.startswith("input_blocks.8.1.transformer_blocks.9.")},
              "transformer depths per block [[0], [2], [9, 10]]"),
             ({k: v for k, v in full.items() if not k.startswith("output_blocks.0.")}, "missing keys"),
             ({k: v for k, v in full.items() if "attn2" not in k}, "no cross-attention")]
    for shapes, words in cases:
        with pytest.raises(ValueError) as err:
            infer_sdxl_unet_config(shapes, "smaller.safetensors")
        assert "smaller.safetensors" in str(err.value) and words in str(err.value), str(err.value)
