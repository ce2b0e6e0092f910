"""The fast generation path (static KV cache, compiled decode step, prefetched preprocessing) answers as today's."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import CompileConfig

from comm import CommForConditionalGeneration, CommProcessor
from comm.generation import fast_generate_kwargs, generate_answers

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUESTIONS = [
    "<image>\nWhat is this?",
    "<image>\nDescribe the picture in a few words, please, and mention every colour you can see.",
    "<image>\nhi",
    "Where is the dog on the left side of the road? <image>",
    "<image> Caption",
]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir) -> tuple[CommForConditionalGeneration, CommProcessor]:
    model = CommForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    return model, CommProcessor.from_pretrained(tiny_model_dir)


def images() -> list[Image.Image]:
    colours = [(200, 30, 30), (30, 30, 200), (20, 200, 20), (240, 240, 240), (10, 10, 10)]
    return [Image.new("RGB", (60 + 10 * i, 50), colour) for i, colour in enumerate(colours)]


def test_fast_path_is_a_static_cache_on_cuda_only():
    assert fast_generate_kwargs("cuda") == {"cache_implementation": "static"}
    assert fast_generate_kwargs(torch.device("cuda", 0)) == {"cache_implementation": "static"}
    assert fast_generate_kwargs("cpu") == {}


def test_static_cache_compiled_decode_and_prefetch_answer_as_today(tiny):
    """Left-padded batches of different prompt lengths: the same greedy answers from the CUDA default path (static
    cache, decode step compiled as ONE graph: fullgraph fails on any graph break) and prefetching, here on the CPU."""
    model, processor = tiny
    today = generate_answers(model, processor, images(), QUESTIONS, batch_size=3, max_new_tokens=12, prefetch=False)
    graphs = []

    def counting_backend(graph: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(graph)
        return graph.forward

    config = CompileConfig(fullgraph=True, backend=counting_backend, mode=None)
    config._compile_all_devices = True  # transformers compiles on CUDA only unless told
    fast = generate_answers(
        model, processor, images(), QUESTIONS, batch_size=3, max_new_tokens=12, prefetch=True,
        cache_implementation="static", compile_config=config,
    )  # fmt: skip
    assert graphs, "the decode step was not compiled"
    assert fast == today
    assert len(set(today)) > 1  # the answers depend on the inputs


def test_a_generated_image_token_is_just_a_token(tiny):
    """Decode steps embed the new tokens without the prefill's placeholder check (which would reject it)."""
    model, processor = tiny
    inputs = processor(text=[QUESTIONS[0]], images=images()[:1], padding_side="left")
    image_token = model.config.image_token_index
    output = model.generate(**inputs, max_new_tokens=3, do_sample=False, sequence_bias={(image_token,): 100.0})
    assert output[0, inputs["input_ids"].shape[1] :].tolist() == [image_token] * 3


def test_prompts_follow_the_processors_template_unless_one_is_passed(tiny):
    """A processor saved with another template (here no system prompt) is what generate_answers renders with."""
    from dataclasses import replace

    from comm.conversation import VICUNA_V1

    model, base = tiny
    processor = CommProcessor(
        base.tokenizer,
        base.clip_image_processor,
        base.dino_image_processor,
        num_image_tokens=base.num_image_tokens,
        template=replace(VICUNA_V1, system=""),
    )
    seen: list[str] = []
    real_call = CommProcessor.__call__

    def recording_call(self, text=None, **kwargs):
        seen.extend(text)
        return real_call(self, text=text, **kwargs)

    question = ["<image>\nWhat is this?"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(CommProcessor, "__call__", recording_call)
        generate_answers(model, processor, images()[:1], question, max_new_tokens=1)
        generate_answers(model, processor, images()[:1], question, max_new_tokens=1, template=VICUNA_V1)
    assert seen == [processor.template.prompt(question[0]), VICUNA_V1.prompt(question[0])]
    assert seen[0].startswith("USER:") and seen[0] != seen[1]
