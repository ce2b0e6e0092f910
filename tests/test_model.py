"""The COMM model: vision-path shapes, LLN-Layerscale maths, frozen towers, save/load and generation."""

from __future__ import annotations

import warnings

import pytest
import torch
from PIL import Image

from comm import CommConfig, CommForConditionalGeneration, CommProcessor
from comm.conversation import CAPTION_PROMPT, VICUNA_V1
from comm.demo.tiny import tiny_config
from comm.model.merge import LLNLayerscale
from comm.model.towers import pool_to_grid, transformer_blocks


def _random_model(**overrides) -> CommForConditionalGeneration:
    torch.manual_seed(0)
    config = tiny_config(image_token_index=500, **overrides)
    return CommForConditionalGeneration(config).eval()


def _pixels(batch: int = 2):
    return torch.randn(batch, 3, 64, 64), torch.randn(batch, 3, 64, 64)


def test_paper_defaults():
    config = CommConfig()
    assert config.clip_layers == list(range(1, 25))
    assert config.dino_layers == list(range(19, 25))
    assert config.grid_size == 14 and config.num_image_tokens == 196
    assert CommConfig(concat="sequence").num_image_tokens == 392


def test_vision_path_shapes():
    model = _random_model()
    clip_pixels, dino_pixels = _pixels()
    clip_layers = model.clip_tower(clip_pixels)
    dino_layers = model.dino_tower(dino_pixels)
    assert len(clip_layers) == 4 and len(dino_layers) == 2
    assert all(h.shape == (2, 16, 64) for h in clip_layers)  # 8x8 patches pooled to 4x4, CLIP width 64
    assert all(h.shape == (2, 16, 48) for h in dino_layers)  # DINOv2 width 48
    clip = model.clip_merger(clip_layers)
    dino = model.dino_merger(dino_layers)
    assert clip.shape == (2, 16, 64) and dino.shape == (2, 16, 48)
    assert model.clip_projection(clip).shape == (2, 16, 64)
    assert model.dino_aligner(dino).shape == (2, 16, 64)  # aligned to CLIP's width
    assert [m.out_features for m in model.dino_aligner if isinstance(m, torch.nn.Linear)] == [4 * 48, 64]
    features = model.get_image_features(clip_pixels, dino_pixels)
    assert features.pooler_output.shape == (2, model.config.num_image_tokens, 128)  # to the LLM's width
    assert features.last_hidden_state.shape == (2, model.config.num_image_tokens, 2 * 64)  # the projector's input


def test_sequence_concat_doubles_tokens():
    model = _random_model(concat="sequence")
    features = model.get_image_features(*_pixels(1)).pooler_output
    assert features.shape == (1, 32, 128)


def test_towers_truncated_to_deepest_layer():
    model = _random_model(dino_layers=[2])
    assert len(transformer_blocks(model.dino_tower.encoder)) == 2
    assert len(transformer_blocks(model.clip_tower.encoder)) == 4


def test_tower_layers_are_the_hidden_states_minus_prefix_tokens():
    model = _random_model(grid_size=8)  # 8x8 patches, no pooling
    clip_pixels, dino_pixels = _pixels(1)
    with torch.no_grad():
        full = model.dino_tower.encoder(pixel_values=dino_pixels, output_hidden_states=True).hidden_states
    captured = model.dino_tower(dino_pixels)
    for layer, tokens in zip(model.config.dino_layers, captured):
        torch.testing.assert_close(tokens, full[layer][:, 1:])  # CLS dropped, 64 patch tokens kept


def test_pool_to_grid_is_average_pooling():
    tokens = torch.arange(16.0).reshape(1, 16, 1)  # a 4x4 grid
    pooled = pool_to_grid(tokens, 2)
    assert pooled.flatten().tolist() == [2.5, 4.5, 10.5, 12.5]


def test_lln_layerscale_matches_formula():
    torch.manual_seed(1)
    merger = LLNLayerscale(num_layers=3, dim=8, scale_init=0.5)
    with torch.no_grad():
        merger.layer_scale.copy_(torch.tensor([0.2, -1.0, 3.0]))
    hidden = [torch.randn(2, 5, 8) for _ in range(3)]
    expected = torch.zeros(2, 5, 8)
    for i, h in enumerate(hidden):
        norm, linear = merger.blocks[i]
        mean = h.mean(-1, keepdim=True)
        var = h.var(-1, unbiased=False, keepdim=True)
        normalised = (h - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias
        expected += merger.layer_scale[i] * (normalised @ linear.weight.T + linear.bias)
    torch.testing.assert_close(merger(hidden), expected)

    softmax_merger = LLNLayerscale(num_layers=3, dim=8, softmax=True)
    softmax_merger.load_state_dict(merger.state_dict())
    weights = torch.softmax(torch.tensor([0.2, -1.0, 3.0]), 0)
    direct = sum(weights[i] * softmax_merger.blocks[i](hidden[i]) for i in range(3))
    torch.testing.assert_close(softmax_merger(hidden), direct)


def test_layerscale_default_init_is_one_over_layers():
    model = _random_model()
    assert torch.allclose(model.clip_merger.layer_scale, torch.full((4,), 0.25))
    assert torch.allclose(model.dino_merger.layer_scale, torch.full((2,), 0.5))


def test_gradients_reach_trainable_parts_never_towers():
    model = _random_model()
    model.train()
    assert not model.clip_tower.training and not model.dino_tower.training
    ids = torch.randint(0, 400, (2, 24))
    ids[:, 4:20] = 500
    out = model(input_ids=ids, pixel_values_clip=_pixels()[0], pixel_values_dino=_pixels()[1], labels=ids)
    out.loss.backward()
    towers = [
        name for name, _ in model.named_parameters() if name.startswith(("model.clip_tower.", "model.dino_tower."))
    ]
    assert towers
    for name, param in model.named_parameters():
        if name in towers:
            assert not param.requires_grad and param.grad is None, name
    for name, module in model.trainable_vision_modules().items():
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters()), name
    assert model.language_model.get_input_embeddings().weight.grad is not None
    assert model.get_output_embeddings().weight.grad.abs().sum() > 0


def test_placeholder_count_mismatch_is_an_error():
    model = _random_model()
    ids = torch.randint(0, 400, (1, 24))
    ids[:, 4:10] = 500  # 6 placeholders, 16 visual tokens per image
    with pytest.raises(ValueError, match="6 image placeholder tokens but 1 images give 16"):
        model(input_ids=ids, pixel_values_clip=_pixels(1)[0], pixel_values_dino=_pixels(1)[1])
    with pytest.raises(ValueError, match="pass both pixel_values_clip and pixel_values_dino"):
        model(input_ids=ids, pixel_values_clip=_pixels(1)[0])


def test_bad_layer_index_is_a_clear_error():
    with pytest.raises(ValueError, match=r"clip_layers has layer indices \[5\].*1\.\.4"):
        tiny_config(clip_layers=[1, 5])
    with pytest.raises(ValueError, match=r"dino_layers has layer indices \[0\]"):
        tiny_config(dino_layers=[0, 2])
    with pytest.raises(ValueError, match="concat"):
        tiny_config(concat="depth")


def _inputs(processor: CommProcessor):
    images = [Image.new("RGB", (90, 60), (200, 30, 30)), Image.new("RGB", (40, 70), (30, 30, 200))]
    prompts = [VICUNA_V1.prompt(CAPTION_PROMPT), VICUNA_V1.prompt("What is the colour? <image>")]
    return processor(text=prompts, images=images, padding_side="left")


def test_save_load_roundtrip_same_logits_and_text(tiny_model_dir, tmp_path):
    model = CommForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    processor = CommProcessor.from_pretrained(tiny_model_dir)
    assert all(not p.requires_grad for p in model.clip_tower.parameters())
    inputs = _inputs(processor)
    with torch.no_grad():
        logits = model(**inputs).logits
    generated = model.generate(**inputs, max_new_tokens=6, do_sample=False)

    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    reloaded = CommForConditionalGeneration.from_pretrained(tmp_path).eval()
    reprocessor = CommProcessor.from_pretrained(tmp_path)
    reinputs = _inputs(reprocessor)
    assert torch.equal(reinputs["input_ids"], inputs["input_ids"])
    assert torch.equal(reinputs["pixel_values_dino"], inputs["pixel_values_dino"])
    with torch.no_grad():
        assert torch.equal(reloaded(**reinputs).logits, logits)
    regenerated = reloaded.generate(**reinputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(regenerated, generated)
    assert processor.batch_decode(regenerated) == processor.batch_decode(generated)


def test_generate_with_cache_matches_without(tiny_model_dir):
    model = CommForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    inputs = _inputs(CommProcessor.from_pretrained(tiny_model_dir))
    cached = model.generate(**inputs, max_new_tokens=5, do_sample=False, use_cache=True)
    uncached = model.generate(**inputs, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_generate_passes_the_cache_under_the_llms_name(tiny_model_dir):
    """No 'both past_key_values and cache' deprecation warning at every decode step."""
    model = CommForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    inputs = _inputs(CommProcessor.from_pretrained(tiny_model_dir))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert not [w for w in caught if "past_key_values" in str(w.message)]


def test_new_token_embeddings_start_at_mean(tiny_model_dir, tiny_components):
    from transformers import AutoModelForCausalLM

    model = CommForConditionalGeneration.from_pretrained(tiny_model_dir)
    original = AutoModelForCausalLM.from_pretrained(tiny_components["llm"])
    old = original.get_input_embeddings().weight
    new = model.get_input_embeddings().weight
    assert new.shape[0] == old.shape[0] + 3
    for row in (model.config.image_token_index, model.config.image_start_token_index):
        torch.testing.assert_close(new[row], old.mean(0))
    torch.testing.assert_close(model.get_output_embeddings().weight[-1], original.lm_head.weight.mean(0))


def test_attn_implementation_passes_through(tiny_model_dir):
    model = CommForConditionalGeneration.from_pretrained(tiny_model_dir, attn_implementation="eager")
    parts = (model.language_model, model.clip_tower.encoder, model.dino_tower.encoder)
    assert [part.config._attn_implementation for part in parts] == ["eager"] * 3
    default = CommForConditionalGeneration.from_pretrained(tiny_model_dir)
    assert default.language_model.config._attn_implementation == "sdpa"


def test_qwen2_llm_works():
    config = tiny_config(
        image_token_index=500,
        text_config={
            "model_type": "qwen2",
            "vocab_size": 512,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        },
    )
    model = CommForConditionalGeneration(config).eval()
    assert type(model.language_model).__name__ == "Qwen2Model"
    ids = torch.randint(0, 400, (1, 20))
    ids[:, 2:18] = 500
    out = model.generate(
        input_ids=ids, pixel_values_clip=_pixels(1)[0], pixel_values_dino=_pixels(1)[1], max_new_tokens=3
    )
    assert out.shape == (1, 23)
