"""COMM as transformers runs its image-text models (Llava's layout and conventions): continuing from a returned
cache, placeholders without pixel values, image features as an output object, eager and sdpa attention, the
headless base model, activation checkpointing, the checkpoint layouts and an
LM head that is the LLM's own."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image
from transformers import AutoModel, AutoModelForCausalLM

from comm import CommForConditionalGeneration, CommProcessor
from comm.conversation import VICUNA_V1
from comm.demo.tiny import tiny_config
from comm.model.modeling import CommImageOutput, CommModel
from comm.model.towers import pool_to_grid, transformer_blocks
from comm.training.arguments import ModelArguments
from comm.training.train import configure_trainable

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUESTIONS = ["<image>\nWhat is in the picture?", "Describe it in a few words, please. <image>"]


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tiny(tiny_model_dir) -> tuple[CommForConditionalGeneration, CommProcessor]:
    return CommForConditionalGeneration.from_pretrained(tiny_model_dir).eval(), CommProcessor.from_pretrained(
        tiny_model_dir
    )


def batch(processor: CommProcessor, padding_side: str = "left") -> dict[str, torch.Tensor]:
    """Two prompts of different lengths, one image each, padded."""
    images = [noise_image(90, 60, 0), noise_image(40, 70, 1)]
    inputs = processor(text=[VICUNA_V1.prompt(q) for q in QUESTIONS], images=images, padding_side=padding_side)
    assert inputs["attention_mask"].min() == 0, "the batch must hold padding"
    return dict(inputs)


GREEDY = {"do_sample": False, "return_dict_in_generate": True, "eos_token_id": None, "pad_token_id": 0}


# --- continuing from a returned cache --------------------------------------------------------------------------------


def test_generate_continues_a_conversation_from_its_returned_cache(tiny):
    model, processor = tiny
    inputs = batch(processor)
    full = model.generate(**inputs, max_new_tokens=6, **GREEDY)
    first = model.generate(**inputs, max_new_tokens=4, **GREEDY)
    assert torch.equal(first.sequences, full.sequences[:, :-2])
    grown_mask = torch.nn.functional.pad(inputs["attention_mask"], (0, 4), value=1)
    continued = {**inputs, "input_ids": first.sequences, "attention_mask": grown_mask}
    pixels_again = model.generate(**continued, cache=copy.deepcopy(first.cache), max_new_tokens=2, **GREEDY)
    assert torch.equal(pixels_again.sequences, full.sequences)
    text_only = {k: v for k, v in continued.items() if not k.startswith("pixel_values")}
    without_pixels = model.generate(**text_only, cache=copy.deepcopy(first.cache), max_new_tokens=2, **GREEDY)
    assert torch.equal(without_pixels.sequences, full.sequences)
    with pytest.warns(FutureWarning, match="past_key_values"):  # the old name still works, with a warning
        old_name = model.generate(**continued, past_key_values=copy.deepcopy(first.cache), max_new_tokens=2, **GREEDY)
    assert torch.equal(old_name.sequences, full.sequences)


def test_a_conversation_continues_with_a_new_image(tiny):
    """Each row's second image is read at the continued prefill, whether all images are passed or only the new ones."""
    model, processor = tiny
    config = model.config
    inputs = batch(processor)
    first = model.generate(**inputs, max_new_tokens=3, **GREEDY)
    block = [config.image_start_token_index, *[config.image_token_index] * config.num_image_tokens]
    turn = [*processor.tokenizer.encode("And here?", add_special_tokens=False), *block, config.image_end_token_index]
    ids = torch.cat([first.sequences, torch.tensor([turn, turn])], dim=1)
    mask = torch.nn.functional.pad(inputs["attention_mask"], (0, ids.shape[1] - inputs["input_ids"].shape[1]), value=1)
    new = processor(text=[QUESTIONS[0]] * 2, images=[noise_image(50, 80, 2), noise_image(70, 30, 3)])
    pixel_keys = ("pixel_values_clip", "pixel_values_dino")
    # images in reading order: row 0's two, then row 1's
    every = {key: torch.stack([inputs[key][0], new[key][0], inputs[key][1], new[key][1]]) for key in pixel_keys}
    options = {"max_new_tokens": 3, "output_logits": True, **GREEDY}
    expected = model.generate(input_ids=ids, attention_mask=mask, **every, **options)
    for given in (every, {key: new[key] for key in pixel_keys}):
        cache = copy.deepcopy(first.cache)
        continued = model.generate(input_ids=ids, attention_mask=mask, **given, cache=cache, **options)
        assert torch.equal(continued.sequences, expected.sequences)
        torch.testing.assert_close(continued.logits, expected.logits, rtol=1e-4, atol=1e-4)


def test_forward_takes_and_returns_the_cache(tiny):
    model, processor = tiny
    inputs = batch(processor)
    with torch.no_grad():
        prefill = model(**inputs, use_cache=True)
        step = torch.tensor([[5], [6]])
        mask = torch.nn.functional.pad(inputs["attention_mask"], (0, 1), value=1)
        cached = model(input_ids=step, attention_mask=mask, cache=prefill.cache).logits[:, -1]
        whole = model(**{**inputs, "input_ids": torch.cat([inputs["input_ids"], step], 1), "attention_mask": mask})
    torch.testing.assert_close(cached, whole.logits[:, -1], rtol=1e-4, atol=1e-4)


# --- placeholders without pixel values -------------------------------------------------------------------------------


def test_image_placeholders_without_pixel_values_are_text(tiny):
    """As Llava: what transformers sends in text-only checks and to an assistant model."""
    model, processor = tiny
    ids = batch(processor)["input_ids"]
    assert (ids == model.config.image_token_index).any()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        body = model.language_model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(logits, model.compute_logits(body))


def test_assisted_and_prompt_lookup_decoding_answer_as_greedy(tiny):
    model, processor = tiny
    inputs = processor(text=[VICUNA_V1.prompt(QUESTIONS[0])], images=[noise_image(90, 60, 0)])  # batch 1 only
    greedy = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assisted = model.generate(**inputs, max_new_tokens=6, do_sample=False, assistant_model=copy.deepcopy(model))
    lookup = model.generate(**inputs, max_new_tokens=6, do_sample=False, prompt_lookup_num_tokens=3)
    assert torch.equal(assisted, greedy) and torch.equal(lookup, greedy)


# --- image features --------------------------------------------------------------------------------------------------


def test_image_features_are_an_output_object(tiny):
    model, processor = tiny
    inputs = batch(processor)
    clip, dino = inputs["pixel_values_clip"], inputs["pixel_values_dino"]
    with torch.no_grad():
        features = model.get_image_features(clip, dino)
        forward = model(**inputs)
        as_tuple = model.get_image_features(clip, dino, return_dict=False)
        hidden = model.get_image_features(clip, dino, output_hidden_states=True)
    config = model.config
    assert isinstance(features, CommImageOutput) and features.hidden_states is None
    assert features.pooler_output.shape == (2, config.num_image_tokens, config.text_config.hidden_size)
    torch.testing.assert_close(forward.image_outputs.pooler_output, features.pooler_output)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[1], features.pooler_output)
    torch.testing.assert_close(hidden.pooler_output, features.pooler_output)
    clip_depth, dino_depth = max(config.clip_layers), max(config.dino_layers)
    assert len(hidden.clip_hidden_states) == clip_depth + 1 and len(hidden.dino_hidden_states) == dino_depth + 1
    assert hidden.hidden_states == (*hidden.clip_hidden_states, *hidden.dino_hidden_states)
    # the merged layers are these hidden states' patch tokens, pooled
    merged = model.clip_tower(clip)
    for layer, pooled in zip(config.clip_layers, merged):
        patches = hidden.clip_hidden_states[layer][:, -model.clip_tower.num_patches :]
        torch.testing.assert_close(pool_to_grid(patches, config.grid_size), pooled)


def test_image_attentions_under_eager_attention(tiny_model_dir):
    model = CommForConditionalGeneration.from_pretrained(tiny_model_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        out = model.get_image_features(torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64), output_attentions=True)
    assert len(out.clip_attentions) == max(model.config.clip_layers)
    assert len(out.dino_attentions) == max(model.config.dino_layers)
    assert out.clip_attentions[0].shape == (1, 4, 65, 65)  # 4 heads, CLS + 64 patches
    assert len(out.attentions) == len(out.clip_attentions) + len(out.dino_attentions)
    model.config.output_attentions = model.config.output_hidden_states = True  # unset flags follow the config
    with torch.no_grad():
        out = model.get_image_features(torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64))
    assert len(out.attentions) == len(out.clip_attentions) + len(out.dino_attentions) > 0
    assert len(out.hidden_states) == len(out.attentions) + 2  # each tower's embeddings too


# --- attention implementations ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_eager_and_sdpa_agree_with_padding_and_images(tiny_model_dir, padding_side):
    processor = CommProcessor.from_pretrained(tiny_model_dir)
    inputs = batch(processor, padding_side)
    outputs = {}
    for implementation in ("eager", "sdpa"):
        model = CommForConditionalGeneration.from_pretrained(tiny_model_dir, attn_implementation=implementation)
        parts = (model.language_model, model.clip_tower.encoder, model.dino_tower.encoder)
        assert {part.config._attn_implementation for part in parts} == {implementation}
        with torch.no_grad():
            outputs[implementation] = model.eval()(**inputs, output_hidden_states=True)
    attended = inputs["attention_mask"].bool()
    eager, sdpa = outputs["eager"], outputs["sdpa"]
    torch.testing.assert_close(sdpa.logits[attended], eager.logits[attended], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sdpa.image_outputs.pooler_output, eager.image_outputs.pooler_output)
    torch.testing.assert_close(sdpa.hidden_states[-1][attended], eager.hidden_states[-1][attended])


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_padding_free_packed_batch_gives_the_padded_batchs_logits(tiny_model_dir, implementation, dtype):
    """transformers' padding-free check: the rows packed into one without padding, position ids restarting per row."""
    model = CommForConditionalGeneration.from_pretrained(
        tiny_model_dir, attn_implementation=implementation, dtype=dtype
    )
    inputs = batch(CommProcessor.from_pretrained(tiny_model_dir), "right")
    attended = inputs["attention_mask"].bool()
    pixels = {key: value for key, value in inputs.items() if key.startswith("pixel_values")}
    position_ids = torch.cat([torch.arange(int(length)) for length in attended.sum(1)])[None]
    with torch.no_grad():
        padded = model.eval()(**inputs, use_cache=False).logits[attended]
        packed = model(
            input_ids=inputs["input_ids"][attended][None], position_ids=position_ids, use_cache=False, **pixels
        )
    tolerance = torch.finfo(dtype).eps if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(packed.logits[0], padded, rtol=tolerance, atol=tolerance)


# --- the headless model ----------------------------------------------------------------------------------------------


def test_the_headless_model_is_the_base_model(tiny, tiny_model_dir):
    model, processor = tiny
    assert CommForConditionalGeneration.base_model_prefix == "model" and model.base_model is model.model
    assert isinstance(model.model, CommModel) and model.get_decoder() is model.model.language_model
    base, info = AutoModel.from_pretrained(tiny_model_dir, output_loading_info=True)
    assert type(base) is CommModel and not info["missing_keys"]
    assert not any(p.requires_grad for p in base.clip_tower.parameters())
    inputs = batch(processor)
    with torch.no_grad():
        hidden = base.eval()(**inputs).last_hidden_state
        logits = model(**inputs).logits
    torch.testing.assert_close(model.compute_logits(hidden), logits)
    for name in ("clip_merger", "dino_merger", "projector", "clip_tower"):
        assert getattr(model, name) is getattr(model.model, name)


def test_assigning_a_causal_lm_splits_it_into_body_and_head(tiny_components):
    model = CommForConditionalGeneration(tiny_config(vocab_size=32000))
    llm = AutoModelForCausalLM.from_pretrained(tiny_components["llm"])
    model.language_model = llm
    assert model.language_model is llm.model and model.lm_head is llm.lm_head
    assert "language_model" not in model._modules
    phi = AutoModelForCausalLM.from_config(
        tiny_config(text_config={"model_type": "phi", "hidden_size": 128, "num_attention_heads": 4}).text_config
    )
    with pytest.raises(ValueError, match="without bias"):
        model.language_model = phi


# --- activation checkpointing ----------------------------------------------------------------------------------------


def checkpointing(model: CommForConditionalGeneration) -> dict[str, set[bool]]:
    """The gradient_checkpointing flags of the towers' modules and of the LLM's decoder layers."""
    flags = {"towers": set(), "llm_layers": set()}
    for tower in (model.clip_tower, model.dino_tower):
        flags["towers"] |= {m.gradient_checkpointing for m in tower.modules() if hasattr(m, "gradient_checkpointing")}
    flags["llm_layers"] = {layer.gradient_checkpointing for layer in model.get_decoder().layers}
    return flags


@pytest.mark.parametrize("lora", [False, True])
def test_activation_checkpointing_marks_every_module_and_checkpoints_the_llms_layers(tiny_model_dir, lora):
    """Every module with the flag gets it, as transformers does it; the towers are never re-run (see below)."""
    model = CommForConditionalGeneration.from_pretrained(tiny_model_dir)
    configure_trainable(model, ModelArguments(lora_r=4 if lora else 0))
    model.activation_checkpointing_enable()
    assert checkpointing(model) == {"towers": {True}, "llm_layers": {True}} and model.is_activation_checkpointing
    model.activation_checkpointing_disable()
    assert checkpointing(model) == {"towers": {False}, "llm_layers": {False}}
    with pytest.warns(FutureWarning, match="gradient_checkpointing_enable"):  # transformers' deprecated name
        model.gradient_checkpointing_enable()
    assert checkpointing(model) == {"towers": {True}, "llm_layers": {True}}
    model.activation_checkpointing_enable(every_n_layers=2)  # counts the LLM's layers alone
    assert [layer.gradient_checkpointing for layer in model.get_decoder().layers] == [True, False]


def count_runs(module: torch.nn.Module, runs: list) -> None:
    """Append to ``runs`` each time ``module``'s forward runs (a checkpoint's recomputation skips module hooks)."""
    forward = module.forward

    def counted(*args, **kwargs):
        runs.append(1)
        return forward(*args, **kwargs)

    module.forward = counted


def test_checkpointed_training_step_has_the_same_gradients(tiny_model_dir):
    model = CommForConditionalGeneration.from_pretrained(tiny_model_dir)
    configure_trainable(model, ModelArguments(tune="all"))
    inputs = batch(CommProcessor.from_pretrained(tiny_model_dir), "right")
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    grads, tower_runs, layer_runs = [], [], []
    count_runs(transformer_blocks(model.clip_tower.encoder)[0].mlp, tower_runs)
    count_runs(model.get_decoder().layers[0].mlp, layer_runs)
    for enable in (False, True):
        if enable:
            model.activation_checkpointing_enable()
        tower_runs.clear(), layer_runs.clear()
        model.train().zero_grad()
        model(**inputs, labels=labels).loss.backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
        # The checkpointed LLM layer runs again in the backward; the marked but frozen tower does not.
        assert (len(tower_runs), len(layer_runs)) == (1, 2 if enable else 1)
    assert grads[0].keys() == grads[1].keys() and any(".layers." in name for name in grads[0])
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)


# --- checkpoint layouts ----------------------------------------------------------------------------------------------


def legacy_name(key: str) -> str:
    """A parameter's name in checkpoints written before `CommModel` (towers, mergers... at the top, the LLM a causal
    LM under ``language_model``)."""
    if key.startswith("lm_head."):
        return "language_model." + key
    if key.startswith("model.language_model."):
        return "language_model.model." + key.removeprefix("model.language_model.")
    return key.removeprefix("model.")


def assert_same_weights(model: CommForConditionalGeneration, reference: CommForConditionalGeneration) -> None:
    state, expected = model.state_dict(), reference.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


def test_a_checkpoint_in_the_layout_before_comm_model_loads(tiny, tmp_path):
    model = tiny[0]
    legacy = {legacy_name(key): value.contiguous() for key, value in model.state_dict().items()}
    assert any(key.startswith("language_model.model.layers.") for key in legacy)
    assert "language_model.lm_head.weight" in legacy and "clip_merger.layer_scale" in legacy
    safetensors.torch.save_file(legacy, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(tmp_path)
    loaded, info = CommForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert_same_weights(loaded, model)


def test_save_writes_the_same_layout_and_loads_either(tiny, tmp_path):
    """As Llava: the checkpoint keeps its published layout (older COMM code reads it); the in-memory names load too."""
    model = tiny[0]
    model.save_pretrained(tmp_path / "default")
    saved = safetensors.torch.load_file(str(tmp_path / "default" / "model.safetensors"))
    assert "language_model.lm_head.weight" in saved and "clip_merger.layer_scale" in saved
    assert not any(key.startswith(("model.", "lm_head.")) for key in saved)
    assert {key.split(".")[0] for key in saved} == {legacy_name(key).split(".")[0] for key in model.state_dict()}
    model.save_pretrained(tmp_path / "current", save_original_format=False)
    current = safetensors.torch.load_file(str(tmp_path / "current" / "model.safetensors"))
    assert set(current) == set(model.state_dict())
    for folder in ("default", "current"):
        assert_same_weights(CommForConditionalGeneration.from_pretrained(tmp_path / folder), model)


def test_an_llm_with_tied_embeddings_keeps_them_tied(tmp_path):
    config = tiny_config(image_token_index=500, text_config={"tie_word_embeddings": True})
    assert config.tie_word_embeddings
    model = CommForConditionalGeneration(config)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    model.save_pretrained(tmp_path)
    assert "language_model.lm_head.weight" not in safetensors.torch.load_file(str(tmp_path / "model.safetensors"))
    reloaded = CommForConditionalGeneration.from_pretrained(tmp_path)
    assert reloaded.lm_head.weight is reloaded.get_input_embeddings().weight
    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"] is True
    # Tensor parallelism shards the tied head and the embedding alike (the head is the embedding's parameter).
    assert {"lm_head", "model.language_model.embed_tokens"} <= set(reloaded.tp_plan)


# --- the LM head is the LLM's own ------------------------------------------------------------------------------------

LLMS = {
    "llama": {},
    "qwen2": {},
    "gemma2": {"head_dim": 32, "final_logit_softcapping": 2.0},  # softcapped
    "cohere": {"logit_scale": 0.25},  # multiplied
    "granite": {"logits_scaling": 4.0},  # divided
}


@pytest.mark.parametrize("model_type", sorted(LLMS))
def test_the_lm_head_gives_the_llms_own_logits(model_type):
    text_config = {"model_type": model_type, "vocab_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2}
    config = tiny_config(image_token_index=500, text_config={**text_config, **LLMS[model_type]})
    torch.manual_seed(0)
    model = CommForConditionalGeneration(config).eval()
    llm = AutoModelForCausalLM.from_config(config.text_config).eval()
    llm.get_decoder().load_state_dict(model.language_model.state_dict())
    llm.get_output_embeddings().load_state_dict(model.lm_head.state_dict())
    ids = torch.randint(0, 400, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, llm(input_ids=ids).logits)


def test_llms_whose_logits_comm_would_get_wrong_are_refused():
    with pytest.raises(ValueError, match=r"scales its logits \(logit_scale\)"):
        CommForConditionalGeneration(tiny_config(text_config={"model_type": "mpt", "logit_scale": 0.5}))
    moe = {"model_type": "mixtral", "output_router_logits": True, "num_local_experts": 2}
    with pytest.raises(ValueError, match="output_router_logits"):
        CommForConditionalGeneration(tiny_config(text_config=moe))
