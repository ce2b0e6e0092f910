"""Benchmark (GPU): one training step of the real towers + a LLaMA-architecture LLM (1.3B, or 7B with LoRA), random
weights, bf16.

CLIP ViT-L/14-336 (24 layers merged) and DINOv2-L (19..24) frozen towers, LLN-Layerscale mergers, aligners and
projector, and a LLaMA LLM: ``--llm 1b`` hidden 2048, 16 layers, 16 heads, intermediate 5504 (1.3B parameters with
its 32000 vocabulary), or ``--llm 7b`` (LLaMA-2-7B shapes; with ``--lora R`` only LoRA adapters of rank R train in
it). The model is built on the meta device and materialised with ``to_empty(device="cuda")`` and each sub-model's
own init (no CPU init). What trains is set by the training code (`configure_trainable`, ``--tune all``).
Step: forward + backward + `torch.optim.AdamW` step + ``zero_grad``, at ``--batch-size`` samples of ``--seq-len``
LLM tokens (196 of them image tokens, a quarter of the text before them as prompt), no padding; the loss covers
the answer after the image (``--seq-len 512``: 236 tokens, 46 %).

The levers, each a switch so that one run measures it: ``--precision amp|bf16`` (fp32 weights + bf16 autocast, or
bf16 weights and AdamW state), ``--activation-checkpointing`` (the LLM's layers), ``--loss labelled|full`` (LM head
and cross-entropy at the labelled positions only, the model's default, or the LLM's own full-logits loss),
``--optimizer foreach|fused`` (torch's AdamW implementations), ``--compile`` (``torch.compile`` of each LLM decoder
layer), ``--attn sdpa|flash_attention_2``.

Reports samples/s, peak memory (``torch.cuda.max_memory_allocated``) and model FLOPs utilisation: model FLOPs per
step / step time / ``--peak-tflops`` (default 989: H100 SXM and H200 bf16 dense). Model FLOPs: the LLM's forward
(2 x its matmul params, i.e. all but the input embedding, x LLM tokens), the backward to its input (the same again:
the projector below trains) and its weight gradients (2 x trainable matmul params x tokens), so 6 x params x tokens
when all of it trains and 4 x params (+ 2 x adapters) under LoRA; + 6 x trainable vision-side params x 196 x images
+ 2 x tower params x tower tokens x images (forward only); attention score FLOPs are not counted. ``mfu`` counts the
LM head at every position (the usual convention, as before the labelled loss existed); ``mfu_head_labelled``
counts it only where the loss needs it.

Prints ONE JSON line ``{"benchmark": "train_gpu", "value": <samples/s>, "unit": "samples/s", "mfu": ...}``; without a
CUDA device it prints ``{"benchmark": "train_gpu", "skipped": "no CUDA device", ...}`` and exits 0.

    python -m benchmarks.bench_train_gpu --attn sdpa
    python -m benchmarks.bench_train_gpu --precision bf16 --activation-checkpointing --optimizer fused
    python -m benchmarks.bench_train_gpu --llm 7b --lora 128 --precision bf16
    python -m benchmarks.bench_train_gpu --smoke-cpu     # the same code on tiny shapes on the CPU (a check, no figure)
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from benchmarks.common import (
    LLAMA_7B,
    build_on_meta,
    count_parameters,
    finish,
    gpu_device,
    set_threads,
    stdout_to_stderr,
    synchronize,
)

if TYPE_CHECKING:
    from comm import CommConfig, CommForConditionalGeneration

BENCHMARK = "train_gpu"
VOCAB = 32000
# A ~1B LLaMA-architecture LLM (TinyLlama-like widths, LLaMA-2 MLP ratio).
LLAMA_1B = {
    "hidden_size": 2048,
    "intermediate_size": 5504,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}


LLMS = {"1b": LLAMA_1B, "7b": LLAMA_7B}
MODEL_NAMES = {"1b": "1.3B (h2048 x16)", "7b": "2-7B shapes (h4096 x32)"}


def make_config(attn: str, smoke: bool, llm: str = "1b") -> CommConfig:
    """The benchmark's `CommConfig` (real towers + the ``llm`` shapes, or tiny shapes with ``smoke``); LLM attention
    ``attn``."""
    from transformers import LlamaConfig

    from comm import CommConfig
    from comm.demo.tiny import tiny_config

    if smoke:
        config = tiny_config(vocab_size=VOCAB)
    else:
        config = CommConfig(text_config=LlamaConfig(vocab_size=VOCAB, **LLMS[llm]))
    config.image_token_index = VOCAB - 1
    # The towers keep SDPA (PyTorch picks its flash kernel on Hopper); the LLM gets the requested implementation.
    config._attn_implementation = {"": "sdpa", "clip_config": "sdpa", "dino_config": "sdpa", "text_config": attn}
    return config


def make_batch(
    config: CommConfig, batch_size: int, seq_len: int, device: torch.device, pixel_dtype: torch.dtype, seed: int
) -> dict[str, torch.Tensor]:
    """Random inputs: BOS, prompt, the image tokens, an answer carrying the loss; ``seq_len`` LLM tokens per row."""
    from comm.model.modeling import PIXEL_VALUES_CLIP, PIXEL_VALUES_DINO

    generator = torch.Generator().manual_seed(seed)
    image_tokens = config.num_image_tokens
    text = seq_len - 1 - image_tokens
    if text < 2:
        raise ValueError(f"--seq-len {seq_len} leaves no room for text besides BOS and {image_tokens} image tokens")
    prompt = text // 4
    answer = text - prompt
    ids = torch.cat(
        [
            torch.ones(batch_size, 1, dtype=torch.long),
            torch.randint(3, VOCAB - 8, (batch_size, prompt), generator=generator),
            torch.full((batch_size, image_tokens), config.image_token_index, dtype=torch.long),
            torch.randint(3, VOCAB - 8, (batch_size, answer), generator=generator),
        ],
        dim=1,
    )
    labels = ids.clone()
    labels[:, : 1 + prompt + image_tokens] = -100
    clip_side, dino_side = config.clip_config.image_size, config.dino_image_size
    pixels_clip = torch.randn(batch_size, 3, clip_side, clip_side, generator=generator)
    pixels_dino = torch.randn(batch_size, 3, dino_side, dino_side, generator=generator)
    return {
        "input_ids": ids.to(device),
        "labels": labels.to(device),
        PIXEL_VALUES_CLIP: pixels_clip.to(device, pixel_dtype),
        PIXEL_VALUES_DINO: pixels_dino.to(device, pixel_dtype),
    }


def model_flops_per_step(
    model: CommForConditionalGeneration, batch_size: int, seq_len: int, head_positions: int
) -> dict[str, float]:
    """Model FLOPs of one training step, by part (see the module docstring); the LM head at ``head_positions``
    positions per sample."""
    llm = model.language_model  # the decoder body; the head is model.lm_head
    embedding = llm.get_input_embeddings().weight
    head = model.get_output_embeddings()
    head_params = count_parameters(head)
    head_trainable = count_parameters(head, trainable=True)
    body_params = count_parameters(llm) - embedding.numel()
    body_trainable = count_parameters(llm, trainable=True) - embedding.numel() * embedding.requires_grad
    tokens, head_tokens = batch_size * seq_len, batch_size * head_positions
    vision_trainable = sum(count_parameters(m, trainable=True) for m in model.trainable_vision_modules().values())
    images = batch_size
    towers = 0
    for tower in (model.clip_tower, model.dino_tower):
        towers += 2 * count_parameters(tower) * (tower.num_patches + 1) * images
    parts = {
        # forward + backward to the input (4 x params), weight gradients (2 x trainable params)
        "llm_body": float((4 * body_params + 2 * body_trainable) * tokens),
        "lm_head": float((4 * head_params + 2 * head_trainable) * head_tokens),
        "vision_trainable": 6.0 * vision_trainable * model.config.grid_size**2 * images,
        "towers_forward": float(towers),
    }
    parts["total"] = sum(parts.values())
    return parts


def trainable_setup(model: CommForConditionalGeneration, lora: int) -> None:
    """What trains, set by the training code: everything but the towers, or LoRA adapters of rank ``lora`` in the LLM
    (LLaVA's alpha = 2 x rank, dropout 0.05) and the vision-side modules."""
    from comm.training.arguments import ModelArguments
    from comm.training.train import configure_trainable

    if lora:
        configure_trainable(model, ModelArguments(lora_r=lora, lora_alpha=2 * lora, lora_dropout=0.05))
    else:
        configure_trainable(model, ModelArguments(tune="all"))


def compile_llm_layers(model: CommForConditionalGeneration, backend: str) -> int:
    """``torch.compile`` each decoder layer of the LLM in place (one compiled code for the identical layers, and no
    graph break from the mask and cache logic around them); returns the number of layers compiled."""
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise ValueError("--compile needs an LLM whose decoder has .layers")
    for layer in layers:
        layer.compile(backend=backend)
    return len(layers)


def run(args: argparse.Namespace, device: torch.device, smoke: bool) -> dict[str, Any]:
    """Build, warm up and time the training step; returns the result fields."""
    config = make_config(args.attn, smoke, args.llm)
    weights_dtype = torch.float32 if args.precision == "amp" else torch.bfloat16
    build_start = time.perf_counter()
    model = build_on_meta(config, device, weights_dtype, seed=args.seed)
    synchronize(device)
    build_s = time.perf_counter() - build_start
    trainable_setup(model, args.lora)
    model.labelled_logits_only = args.loss == "labelled"
    if args.activation_checkpointing:
        model.activation_checkpointing_enable()  # the LLM's decoder layers only
    compiled_layers = compile_llm_layers(model, args.compile_backend) if args.compile else 0
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, **{args.optimizer: True})
    batch_size = args.batch_size if not smoke else 2
    seq_len = args.seq_len if not smoke else config.num_image_tokens + 33
    batch = make_batch(config, batch_size, seq_len, device, weights_dtype, args.seed)
    head_positions = int((batch["labels"][0, 1:] != -100).sum())
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "amp")

    def step() -> float:
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    for _ in range(args.warmup):
        step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    steps = args.steps or (4 if args.quick else 10)
    start = time.perf_counter()
    losses = [step() for _ in range(steps)]
    synchronize(device)
    seconds = time.perf_counter() - start
    step_s = seconds / steps
    flops = model_flops_per_step(model, batch_size, seq_len, head_positions=seq_len)
    flops_labelled = model_flops_per_step(model, batch_size, seq_len, head_positions=head_positions)
    achieved = flops["total"] / step_s
    fields: dict[str, Any] = {
        "value": round(batch_size / step_s, 3),
        "unit": "samples/s",
        "mfu": round(achieved / (args.peak_tflops * 1e12), 4),
        "mfu_head_labelled": round(flops_labelled["total"] / step_s / (args.peak_tflops * 1e12), 4),
        "achieved_tflops": round(achieved / 1e12, 2),
        "peak_tflops": args.peak_tflops,
        "step_s": round(step_s, 4),
        "tokens_per_s": round(batch_size * seq_len / step_s, 1),
        "model_tflops_per_step": {name: round(value / 1e12, 3) for name, value in flops.items()},
        "loss_last": round(float(losses[-1]), 4),
        "finite": bool(all(torch.isfinite(loss) for loss in losses)),
        "params": {
            "llm": count_parameters(model.language_model) + count_parameters(model.lm_head),
            "towers": count_parameters(model.clip_tower) + count_parameters(model.dino_tower),
            "trainable": sum(p.numel() for p in trainable),
        },
        "batch_size": batch_size,
        "seq_len": seq_len,
        "image_tokens": config.num_image_tokens,
        "labelled_positions_per_sample": head_positions,
        "compiled_layers": compiled_layers,
        "steps": steps,
        "warmup": args.warmup,
        "build_s": round(build_s, 1),
    }
    if device.type == "cuda":
        fields["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        fields["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
    return fields


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (or print the skip line) and print its JSON line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 timed steps instead of 10")
    parser.add_argument("--attn", choices=["sdpa", "flash_attention_2"], default="sdpa", help="LLM attention")
    parser.add_argument(
        "--precision",
        choices=["amp", "bf16"],
        default="amp",
        help="amp: fp32 weights + bf16 autocast (comm-train --bf16 on one GPU); bf16: bf16 weights and AdamW "
        "states (DeepSpeed bf16's compute, without its fp32 master copy)",
    )
    parser.add_argument("--llm", choices=sorted(LLMS), default="1b", help="LLM shapes: 1b (default) or 7b (LLaMA-2-7B)")
    parser.add_argument("--lora", type=int, default=0, help="LoRA rank on the LLM (default 0: all of it trains)")
    parser.add_argument("--loss", choices=["labelled", "full"], default="labelled",
                        help="LM head + loss at the labelled positions only (the default) or everywhere")  # fmt: skip
    parser.add_argument("--optimizer", choices=["foreach", "fused"], default="foreach",
                        help="torch AdamW implementation (default foreach: --optim adamw_torch on GPU)")  # fmt: skip
    parser.add_argument("--compile", action="store_true", help="torch.compile each LLM decoder layer")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor)")
    parser.add_argument("--batch-size", type=int, default=16, help="samples per step (default 16, LLaVA's per GPU)")
    parser.add_argument("--seq-len", type=int, default=512, help="LLM tokens per sample, 196 image tokens included")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10, 4 with --quick)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--activation-checkpointing", action="store_true", help="checkpoint the LLM's layers")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="GPU peak bf16 dense TFLOP/s (H100 SXM 989)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--smoke-cpu", action="store_true", help="run the same code on tiny shapes on the CPU (a check, no figure)"
    )
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.warmup < 0 or (args.steps is not None and args.steps < 1) or args.peak_tflops <= 0:
        parser.error("need --batch-size >= 1, --warmup >= 0, --steps >= 1 and --peak-tflops > 0")
    if args.lora < 0:
        parser.error("--lora must be >= 0")
    set_threads(args.threads)

    device = gpu_device(BENCHMARK, args, parser)
    if device is None:
        return 0
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    with stdout_to_stderr():
        fields = run(args, device, args.smoke_cpu)
    result = {
        "benchmark": BENCHMARK,
        **fields,
        "attn": args.attn,
        "precision": args.precision,
        "activation_checkpointing": args.activation_checkpointing,
        "loss": args.loss,
        "optimizer": args.optimizer,
        "compile": args.compile,
        "llm": args.llm,
        "lora": args.lora,
        "model": "tiny (smoke check)" if args.smoke_cpu else f"ViT-L/14-336 + DINOv2-L + LLaMA {MODEL_NAMES[args.llm]}",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "smoke": args.smoke_cpu,
    }
    return finish(result, args.quick)


if __name__ == "__main__":
    raise SystemExit(main())
