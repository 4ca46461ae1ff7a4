#!/usr/bin/env python
"""Save a Stable Diffusion 1.5-architecture pipeline with random weights, for timing only.

SD1.5 weights cannot be downloaded everywhere; its architecture can be built from configs. The
UNet is SD1.5's (860 M parameters), the autoencoder SD's (4 levels, 128-512 channels), the text
encoder a 12-layer, 768-wide CLIP text model; the tokenizer and the PNDM scheduler come from the
embedded reference model. Images drawn by it are noise, but every step costs what SD1.5's does,
so `scripts/benchmark_fid.py --model OUT --skip-metrics` times whole generations with it:

  python scripts/make_random_sd15.py --out /tmp/sd15-random
  python scripts/benchmark_fid.py --model /tmp/sd15-random --size 1024 --steps 50 --ratios 0.4 \\
      --num-images 16 --batch-size 8 --skip-metrics --out runs/pipeline_1024
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder to save the pipeline in")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    args = p.parse_args(argv)

    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from eval import REFERENCE_MODEL
    from eval.latency import SD15_UNET_CONFIG

    torch.manual_seed(args.seed)
    tokenizer = CLIPTokenizer.from_pretrained(REFERENCE_MODEL, subfolder="tokenizer")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
    )
    pipe = StableDiffusionPipeline(
        unet=UNet2DConditionModel(**SD15_UNET_CONFIG), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        scheduler=PNDMScheduler.from_pretrained(REFERENCE_MODEL, subfolder="scheduler"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(args.out)
    print(f"saved an SD1.5-architecture pipeline with random weights to {args.out}")


if __name__ == "__main__":
    main()
