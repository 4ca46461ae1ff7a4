"""Test helpers of the FID harness: a tiny random CLIP saved as a local folder (no download)."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

import tiny


def save_tiny_clip(path: Path) -> Path:
    """A random CLIP (2-layer text and vision towers of width 32, 32 px images) and its processor
    (the in-memory tokenizer of :func:`tiny.tokenizer`), saved to ``path``; returns ``path``."""
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=512, eos_token_id=513,
                         pad_token_id=513),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tiny.tokenizer()).save_pretrained(path)
    return path
