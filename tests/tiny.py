"""Tiny random-weight diffusers models built from configs, for tests (no download)."""
from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    PNDMScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer


def tokenizer() -> CLIPTokenizer:
    """A byte-level character CLIP tokenizer without merges: tokenizes any text offline."""
    # GPT-2 byte-level alphabet: printable bytes map to themselves, the rest to code points >= 256.
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def text_encoder(hidden: int = 32, projection: bool = False) -> CLIPTextModel:
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=1000, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=hidden,
        bos_token_id=512, eos_token_id=513, pad_token_id=513,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def vae(latent_channels: int = 4, **config) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8, 8, 8), in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=8, layers_per_block=1, sample_size=32, **config,
    ).eval()


def unet(style: str = "sd1", in_channels: int = 4) -> UNet2DConditionModel:
    """A tiny UNet: ``sd1`` (attention on all levels), ``sd2`` (linear projections, head dims per
    level, upcast attention) or ``sdxl`` (no attention at the highest level, added conditions)."""
    torch.manual_seed(0)
    common = dict(
        in_channels=in_channels, out_channels=4, layers_per_block=1, norm_num_groups=8,
        sample_size=16, cross_attention_dim=32,
    )
    if style == "sd1":
        model = UNet2DConditionModel(
            block_out_channels=(16, 32), attention_head_dim=4,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), **common,
        )
    elif style == "sd2":
        model = UNet2DConditionModel(
            block_out_channels=(16, 32), attention_head_dim=(2, 4), use_linear_projection=True,
            upcast_attention=True,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), **common,
        )
    elif style == "sdxl":
        common["cross_attention_dim"] = 64
        model = UNet2DConditionModel(
            block_out_channels=(16, 32, 32), attention_head_dim=(2, 4, 4), use_linear_projection=True,
            transformer_layers_per_block=(1, 1, 2),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=8 * 6 + 32, **common,
        )
    else:
        raise ValueError(style)
    return model.eval()


def sd_pipeline(style: str = "sd1", cls=StableDiffusionPipeline, scheduler=None, **kwargs):
    """A tiny text-to-image (or img2img / inpaint) Stable Diffusion pipeline (latents = px / 4)."""
    if scheduler is None:
        scheduler = PNDMScheduler(skip_prk_steps=True, steps_offset=1)
        if style == "sd2":
            scheduler = DDIMScheduler(prediction_type="v_prediction")
    in_channels = 9 if cls is StableDiffusionInpaintPipeline else 4
    pipe = cls(
        unet=unet(style, in_channels), vae=vae(), text_encoder=text_encoder(), tokenizer=tokenizer(),
        scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False, **kwargs,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_pipeline() -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline(
        unet=unet("sdxl"), vae=vae(), text_encoder=text_encoder(), tokenizer=tokenizer(),
        text_encoder_2=text_encoder(projection=True), tokenizer_2=tokenizer(),
        scheduler=EulerDiscreteScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def controlnet_pipeline() -> StableDiffusionControlNetPipeline:
    torch.manual_seed(0)
    controlnet = ControlNetModel(
        block_out_channels=(16, 32), attention_head_dim=4, layers_per_block=1, norm_num_groups=8,
        cross_attention_dim=32, conditioning_embedding_out_channels=(8, 8, 16),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    ).eval()
    return sd_pipeline(cls=StableDiffusionControlNetPipeline, controlnet=controlnet)




def pixart_transformer(num_layers: int = 3) -> PixArtTransformer2DModel:
    """A tiny PixArt transformer (ada_norm_single blocks, patch 2): 64 px images are an 8x8 grid."""
    torch.manual_seed(0)
    return PixArtTransformer2DModel(
        sample_size=16, num_layers=num_layers, patch_size=2, attention_head_dim=8, num_attention_heads=3,
        caption_channels=32, in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6,
    ).eval()


def sd3_transformer(num_layers: int = 3, dual: bool = True) -> SD3Transformer2DModel:
    """A tiny SD3 transformer (patch 1: 64 px images are a 16x16 grid); ``dual``: SD3.5's
    image-only ``attn2`` in its first two blocks and RMS qk-norm."""
    torch.manual_seed(0)
    extra = dict(dual_attention_layers=(0, 1), qk_norm="rms_norm") if dual else {}
    return SD3Transformer2DModel(
        sample_size=16, patch_size=1, in_channels=4, num_layers=num_layers, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64,
        out_channels=4, **extra,
    ).eval()


def pixart_pipeline(**kwargs) -> PixArtAlphaPipeline:
    """A tiny PixArt pipeline without a text encoder: call it with :func:`pixart_prompt`."""
    pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=vae(), transformer=pixart_transformer(**kwargs),
                               scheduler=DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixart_prompt(batch: int = 1, seed: int = 0) -> dict:
    """Prompt embeddings (and masks) for :func:`pixart_pipeline`, with guidance, at any size."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, 8, dtype=torch.long)
    return dict(prompt_embeds=torch.randn(batch, 8, 32, generator=g), prompt_attention_mask=mask,
                negative_prompt=None, negative_prompt_embeds=torch.randn(batch, 8, 32, generator=g),
                negative_prompt_attention_mask=mask, use_resolution_binning=False)


def sd3_pipeline(**kwargs) -> StableDiffusion3Pipeline:
    """A tiny SD3 pipeline without text encoders: call it with :func:`sd3_prompt`."""
    pipe = StableDiffusion3Pipeline(
        transformer=sd3_transformer(**kwargs), scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae(shift_factor=0.0), text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        text_encoder_3=None, tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd3_prompt(batch: int = 1, seed: int = 0) -> dict:
    """Prompt embeddings for :func:`sd3_pipeline`, with guidance."""
    g = torch.Generator().manual_seed(seed)
    return dict(prompt_embeds=torch.randn(batch, 8, 32, generator=g),
                pooled_prompt_embeds=torch.randn(batch, 64, generator=g),
                negative_prompt_embeds=torch.randn(batch, 8, 32, generator=g),
                negative_pooled_prompt_embeds=torch.randn(batch, 64, generator=g))


def record_phases(model) -> list[str]:
    """The phase of every call of a patched model from now on, ``"agent"`` or ``"late"``, read by
    a forward pre-hook that runs after AgentSD's (it must be patched first)."""
    from agentsd import context

    phases: list[str] = []
    denoiser = getattr(model, "unet", None) or getattr(model, "transformer", None) or model
    denoiser.register_forward_pre_hook(
        lambda m, a: phases.append("agent" if context.current().phase.agent_ratio is not None else "late"))
    return phases


def self_attention_hooks(unet) -> dict:
    """``{attn1 name: its AgentSD hook}`` of a patched UNet."""
    return {name: m._diffusers_hook.get_hook("agentsd.self_attention") for name, m in unet.named_modules()
            if getattr(m, "_diffusers_hook", None) is not None and m._diffusers_hook.get_hook("agentsd.self_attention")}


__all__ = [
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
    "controlnet_pipeline",
    "pixart_pipeline",
    "pixart_prompt",
    "pixart_transformer",
    "record_phases",
    "sd_pipeline",
    "sd3_pipeline",
    "sd3_prompt",
    "sd3_transformer",
    "sdxl_pipeline",
    "self_attention_hooks",
    "tokenizer",
    "unet",
]
