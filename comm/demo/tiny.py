"""Tiny random-init COMM models for the demo, the tests and the benchmarks: a small configuration, and its towers and
LLM saved as separate checkpoints (the form a user downloads them in)."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoModel, AutoModelForCausalLM

from comm.model.configuration import CommConfig


def tiny_config(vocab_size: int = 512, **overrides) -> CommConfig:
    """A small random-init configuration (CPU-friendly, seconds a step); ``overrides`` replace fields, and a dict for a
    ``*_config`` updates that sub-config."""
    fields = {
        "clip_config": {
            "model_type": "clip_vision_model",
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "image_size": 64,
            "patch_size": 8,
            "projection_dim": 32,
        },
        "dino_config": {
            "model_type": "dinov2",
            "hidden_size": 48,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "mlp_ratio": 2,
            "image_size": 64,
            "patch_size": 8,
        },
        "text_config": {
            "model_type": "llama",
            "vocab_size": vocab_size,
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 512,
            "tie_word_embeddings": False,
        },
        "clip_layers": [1, 2, 3, 4],
        "dino_layers": [3, 4],
        "grid_size": 4,
        "dino_image_size": 64,
    }
    for key, value in overrides.items():
        if key.endswith("_config") and isinstance(value, dict):
            fields[key] = {**fields[key], **value}
        else:
            fields[key] = value
    return CommConfig(**fields)


def save_random_components(folder: str | Path, config: CommConfig) -> dict[str, str]:
    """Write random-init towers and LLM of ``config`` as separate checkpoints (what a user downloads)."""
    folder = Path(folder)
    paths = {}
    for name, sub_config, model_class in (
        ("clip", config.clip_config, AutoModel),
        ("dino", config.dino_config, AutoModel),
        ("llm", config.text_config, AutoModelForCausalLM),
    ):
        path = folder / name
        model_class.from_config(sub_config).save_pretrained(path)
        paths[name] = str(path)
    return paths
