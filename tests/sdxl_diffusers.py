"""The diffusers reference for sdxl.py's benchmark and tests: StableDiffusionXLPipeline + LCMScheduler (DMD2's README
recipe) built from our UNet's and VAE's weights with diffusers' own single-file converters. Test-only: sdxl.py never
imports diffusers.

    python tests/sdxl_diffusers.py --ckpt sd_xl_base_1.0.safetensors --unet dmd2_sdxl_4step_unet_fp16.bin   # = sdxl.py bench + diffusers
"""
import os
import sys

import torch
from diffusers import AutoencoderKL as DiffusersVAE, LCMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sdxl  # noqa: E402
from sdxl import NUM_TRAIN_TIMESTEPS, PREFIX_UNET, PREFIX_VAE  # noqa: E402


def diffusers_unet_config(cfg):
    """UNet2DConditionModel arguments equal to an SDXLUNetConfig (SDXL's diffusers config.json for the default)."""
    widths = [cfg.model_channels * m for m in cfg.channel_mult]
    return dict(sample_size=128, in_channels=cfg.in_channels, out_channels=cfg.out_channels, block_out_channels=widths,
                down_block_types=["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in cfg.transformer_depth],
                up_block_types=["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(cfg.transformer_depth)],
                layers_per_block=cfg.num_res_blocks, transformer_layers_per_block=[max(d, 1) for d in cfg.transformer_depth],
                attention_head_dim=[w // cfg.num_head_channels for w in widths], cross_attention_dim=cfg.context_dim,
                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=cfg.adm_in_channels)


def diffusers_pipeline(net, vae, vae_cfg, device, dtype):
    """StableDiffusionXLPipeline with net's and vae's weights (converted by diffusers' own single-file converters), no
    text encoders (it takes our embeddings) and DMD2's scheduler."""
    unet_config = diffusers_unet_config(net.cfg)
    vae_config = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * len(vae_cfg.ch_mult),
                      up_block_types=["UpDecoderBlock2D"] * len(vae_cfg.ch_mult), block_out_channels=[vae_cfg.ch * m for m in vae_cfg.ch_mult],
                      layers_per_block=vae_cfg.num_res_blocks, latent_channels=vae_cfg.z_channels, norm_num_groups=32,
                      scaling_factor=vae_cfg.scale_factor, force_upcast=True, sample_size=1024)

    def build(cls, config, state, dtype):  # on the meta device, then adopt the converted weights
        with torch.device("meta"):
            model = cls(**config)
        model.load_state_dict(state, strict=True, assign=True)
        return model.to(device, dtype).eval().requires_grad_(False)

    d_unet = build(UNet2DConditionModel, unet_config, convert_ldm_unet_checkpoint(
        {PREFIX_UNET + k: v for k, v in net.state_dict().items()}, unet_config), dtype)
    d_vae = build(DiffusersVAE, vae_config, convert_ldm_vae_checkpoint(
        {PREFIX_VAE + k: v for k, v in vae.state_dict().items()}, vae_config), next(vae.parameters()).dtype)
    # The pipeline hands the VAE latents in the UNet's dtype and upcasts only an fp16 VAE, so an fp32 VAE beside a bf16
    # UNet (our default) would meet bf16 latents: cast them at the VAE's first layer, as our decode does.
    d_vae.post_quant_conv.register_forward_pre_hook(lambda m, args: (args[0].to(m.weight.dtype), *args[1:]))
    scheduler = LCMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_start=0.00085, beta_end=0.012,
                             beta_schedule="scaled_linear", prediction_type="epsilon", clip_sample=False)
    pipe = StableDiffusionXLPipeline(vae=d_vae, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
                                     unet=d_unet, scheduler=scheduler, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


if __name__ == "__main__":
    sdxl.cmd_bench(sdxl.build_parser()[0].parse_args(["bench", *sys.argv[1:]]), reference=diffusers_pipeline)
