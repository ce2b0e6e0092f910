"""The vision towers run on the model's own sub-config objects and hold only the blocks they read."""

from __future__ import annotations

import pytest
import safetensors.torch
from transformers import AutoModel

from comm import CommForConditionalGeneration, build_from_components
from comm.demo.tiny import tiny_config
from comm.model.towers import transformer_blocks

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tower_configs(tower) -> set[int]:
    """The ids of the config objects the tower's modules read."""
    return {id(module.config) for module in tower.modules() if hasattr(module, "config")}


def test_towers_run_on_the_models_sub_configs_with_only_the_blocks_read(tmp_path):
    config = tiny_config(image_token_index=500, dino_layers=[2])
    model = CommForConditionalGeneration(config)
    assert tower_configs(model.clip_tower) == {id(model.config.clip_config)}
    assert tower_configs(model.dino_tower) == {id(model.config.dino_config)}
    assert len(transformer_blocks(model.dino_tower.encoder)) == 2 and model.config.dino_config.num_hidden_layers == 4
    model.save_pretrained(tmp_path)
    saved = safetensors.torch.load_file(str(tmp_path / "model.safetensors"))
    dino_blocks = {int(key.split(".")[4]) for key in saved if key.startswith("dino_tower.encoder.encoder.layer.")}
    assert dino_blocks == {0, 1}
    reloaded = CommForConditionalGeneration.from_pretrained(tmp_path)
    assert tower_configs(reloaded.dino_tower) == {id(reloaded.config.dino_config)}


def test_built_towers_run_on_the_models_sub_configs(tiny_components, llama_tokenizer):
    model, _ = build_from_components(
        tiny_components["clip"], tiny_components["dino"], tiny_components["llm"], tokenizer=llama_tokenizer,
        **tiny_config(dino_layers=[2]).tower_reading_fields(),
    )  # fmt: skip
    assert tower_configs(model.clip_tower) == {id(model.config.clip_config)}
    assert tower_configs(model.dino_tower) == {id(model.config.dino_config)}
    assert len(transformer_blocks(model.dino_tower.encoder)) == 2
    other = AutoModel.from_config(tiny_config(clip_config={"hidden_size": 32}).clip_config)
    with pytest.raises(ValueError, match="differs from the tower's in hidden_size"):
        model.clip_tower.encoder = other
