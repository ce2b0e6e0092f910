"""Benchmark: cost of the LLN-Layerscale mergers + aligners + projection vs the two frozen ViT-L towers (CPU, fp32).

Real shapes (`CommConfig()` defaults, random weights): CLIP ViT-L/14 at 336 px with its 24 layers merged, DINOv2-L
at 224 px with layers 19..24 merged, 14x14 grid, projector 2048 -> 4096. The model is built on the meta device
and only its vision path is materialised (the 7B LLM is dropped before any memory is given to it), so the timed
code is `CommForConditionalGeneration`'s own: ``clip_tower`` + ``dino_tower`` against the rest of
``get_image_features`` (mergers, CLIP projection, DINOv2 aligner, concatenation, projector) on the towers' outputs.

Prints ONE JSON line: ``{"benchmark": "vision_merger", "value": <merger time / towers time in %>, "unit": "%"}``
(bar: <= 5 %), with the per-module breakdown, the blocks built per tower, the analytic FLOP ratio, the merger's
forward+backward cost (what a training step pays), and the cost of merging BEFORE pooling (576 + 256 tokens)
relative to the design's pooling first (196 + 196 tokens).

    python -m benchmarks.bench_vision_merger            # 5 tower runs, median (about 2 min on 1 thread)
    python -m benchmarks.bench_vision_merger --quick    # 3 tower runs, same real shapes
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import finish, initialize_sub_models, median, set_threads
from comm import CommConfig, CommForConditionalGeneration
from comm.model.towers import pool_to_grid, transformer_blocks

BAR_PERCENT = 5.0
HEAD_MODULES = ("clip_merger", "clip_projection", "dino_merger", "dino_aligner", "projector")


def build_vision_path(config: CommConfig, seed: int = 0) -> CommForConditionalGeneration:
    """The model of ``config`` with only its vision path materialised on the CPU (random init, eval mode).

    The whole model is built on the meta device (no memory), the LLM is replaced by an empty module, and the rest
    is materialised with `to_empty` and initialised as `CommForConditionalGeneration(config)` would be.
    """
    with torch.device("meta"):
        model = CommForConditionalGeneration(config)
    model.language_model = nn.Module()  # the 7B LLM is never allocated, nor its head
    model.lm_head = nn.Module()
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    initialize_sub_models(model)  # each tower with its own init scheme, as `from_config` gives
    model.initialize_weights()  # the mergers, aligners and projector
    model.freeze_towers()
    return model.eval()


def towers_forward(
    model: CommForConditionalGeneration, px_clip: torch.Tensor, px_dino: torch.Tensor
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Both towers' pooled per-layer tokens."""
    return model.clip_tower(px_clip), model.dino_tower(px_dino)


def head_with_cached_towers(
    model: CommForConditionalGeneration,
    clip_states: list[torch.Tensor],
    dino_states: list[torch.Tensor],
    px_clip: torch.Tensor,
    px_dino: torch.Tensor,
) -> Callable[[], torch.Tensor]:
    """A call of the model's own ``get_image_features`` whose towers return the given (already computed) outputs."""

    def run() -> torch.Tensor:
        model.clip_tower.forward = lambda _pixels: clip_states
        model.dino_tower.forward = lambda _pixels: dino_states
        try:
            return model.get_image_features(px_clip, px_dino).pooler_output
        finally:
            del model.clip_tower.forward, model.dino_tower.forward

    return run


def head_pool_after_merge(
    model: CommForConditionalGeneration, clip_full: list[torch.Tensor], dino_full: list[torch.Tensor]
) -> torch.Tensor:
    """The alternative design: merge every patch token (576 CLIP, 256 DINOv2), then pool, then align and project."""
    grid = model.config.grid_size
    clip = model.clip_projection(pool_to_grid(model.clip_merger(clip_full), grid))
    dino = model.dino_aligner(pool_to_grid(model.dino_merger(dino_full), grid))
    return model.projector(torch.cat([clip, dino], dim=-1))


def module_calls(
    model: CommForConditionalGeneration, clip_states: list[torch.Tensor], dino_states: list[torch.Tensor]
) -> dict[str, Callable[[], torch.Tensor]]:
    """One call per vision-side module on inputs of its real shape (for the per-module breakdown)."""
    clip_merged = model.clip_merger(clip_states)
    dino_merged = model.dino_merger(dino_states)
    fused = torch.cat([model.clip_projection(clip_merged), model.dino_aligner(dino_merged)], dim=-1)
    return {
        "clip_merger": lambda: model.clip_merger(clip_states),
        "clip_projection": lambda: model.clip_projection(clip_merged),
        "dino_merger": lambda: model.dino_merger(dino_states),
        "dino_aligner": lambda: model.dino_aligner(dino_merged),
        "projector": lambda: model.projector(fused),
    }


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` as counted by `torch.utils.flop_counter` (matmuls, convolutions, attention)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def timed(fn: Callable[[], object]) -> float:
    """Wall seconds of one call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def unpooled_states(
    model: CommForConditionalGeneration, px_clip: torch.Tensor, px_dino: torch.Tensor
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The towers' chosen layers with every patch token (the towers' grid set to their full patch side)."""
    saved = model.clip_tower.grid_size, model.dino_tower.grid_size
    model.clip_tower.grid_size = int(round(model.clip_tower.num_patches**0.5))
    model.dino_tower.grid_size = int(round(model.dino_tower.num_patches**0.5))
    try:
        return towers_forward(model, px_clip, px_dino)
    finally:
        model.clip_tower.grid_size, model.dino_tower.grid_size = saved


def merger_train_step(
    model: CommForConditionalGeneration, clip_states: list[torch.Tensor], dino_states: list[torch.Tensor]
) -> Callable[[], None]:
    """Forward + backward of the vision-side modules (what a training step adds on top of the frozen towers)."""
    head = [model.get_submodule(name) for name in HEAD_MODULES]

    def run() -> None:
        for module in head:
            module.zero_grad(set_to_none=True)
        clip = model.clip_projection(model.clip_merger(clip_states))
        dino = model.dino_aligner(model.dino_merger(dino_states))
        model.projector(torch.cat([clip, dino], dim=-1)).square().mean().backward()

    return run


def layer_span(layers: Sequence[int]) -> str | list[int]:
    """``"first..last"`` for a contiguous run of layer indices, else the list."""
    ordered = sorted(layers)
    contiguous = ordered == list(range(ordered[0], ordered[-1] + 1))
    return f"{ordered[0]}..{ordered[-1]}" if contiguous else ordered


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print its JSON line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 tower runs instead of 5 (same real shapes)")
    parser.add_argument("--repeats", type=int, default=None, help="timed tower runs, median kept (default 5, 3 quick)")
    parser.add_argument("--head-repeats", type=int, default=5, help="timed merger runs per tower run (default 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads; 0 keeps torch's default (1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 5)
    if repeats < 1 or args.head_repeats < 1:
        parser.error("--repeats and --head-repeats must be >= 1")
    threads = set_threads(args.threads)

    config = CommConfig()  # the paper's shapes: CLIP ViT-L/14-336 (24 layers merged), DINOv2-L (19..24), grid 14
    build_start = time.perf_counter()
    model = build_vision_path(config, args.seed)
    build_s = time.perf_counter() - build_start
    generator = torch.Generator().manual_seed(args.seed)
    px_clip = torch.randn(1, 3, model.clip_tower.image_size, model.clip_tower.image_size, generator=generator)
    px_dino = torch.randn(1, 3, model.dino_tower.image_size, model.dino_tower.image_size, generator=generator)

    with torch.inference_mode():
        # First (untimed) tower pass, counted: also warms the allocator and the oneDNN kernels.
        with FlopCounterMode(display=False) as counter:
            clip_states, dino_states = towers_forward(model, px_clip, px_dino)
        towers_flops = int(counter.get_total_flops())
        head = head_with_cached_towers(model, clip_states, dino_states, px_clip, px_dino)
        features = head()
        reference = torch.cat(
            [
                model.clip_projection(model.clip_merger(clip_states)),
                model.dino_aligner(model.dino_merger(dino_states)),
            ],
            dim=-1,
        )
        if not torch.equal(features, model.projector(reference)):
            raise RuntimeError("get_image_features with cached tower outputs does not match the modules' chain")
        head_flops = count_flops(head)

        # Interleaved timing (towers, then the head several times): drift of a shared machine hits both alike.
        for _ in range(2):
            head()
        tower_times, head_times = [], []
        clip_times, dino_times = [], []
        for _ in range(repeats):
            clip_times.append(timed(lambda: model.clip_tower(px_clip)))
            dino_times.append(timed(lambda: model.dino_tower(px_dino)))
            tower_times.append(clip_times[-1] + dino_times[-1])
            head_times.extend(timed(head) for _ in range(args.head_repeats))
        towers_s, head_s = median(tower_times), median(head_times)

        # Per-module breakdown.
        calls = module_calls(model, clip_states, dino_states)
        breakdown = {}
        for name, call in calls.items():
            call()
            breakdown[name] = median([timed(call) for _ in range(max(3, args.head_repeats))])

        # Alternative: pooling after merging (every patch token through the per-layer LayerNorm + Linear).
        clip_full, dino_full = unpooled_states(model, px_clip, px_dino)
        alternative = lambda: head_pool_after_merge(model, clip_full, dino_full)  # noqa: E731
        alternative()
        alt_flops = count_flops(alternative)
        current_times, alt_times = [], []
        for _ in range(max(3, args.head_repeats)):
            current_times.append(timed(head))
            alt_times.append(timed(alternative))
        mergers = lambda: (model.clip_merger(clip_states), model.dino_merger(dino_states))  # noqa: E731
        mergers_full = lambda: (model.clip_merger(clip_full), model.dino_merger(dino_full))  # noqa: E731
        mergers(), mergers_full()
        merger_times = [timed(mergers) for _ in range(max(3, args.head_repeats))]
        merger_full_times = [timed(mergers_full) for _ in range(max(3, args.head_repeats))]

    # Training: the mergers etc. also run backward; the frozen towers only forward.
    for name in HEAD_MODULES:
        model.get_submodule(name).requires_grad_(True)
    # Clones: tensors made under inference_mode cannot be saved for backward (training gets no_grad outputs).
    train_step = merger_train_step(model, [s.clone() for s in clip_states], [s.clone() for s in dino_states])
    train_step()
    train_s = median([timed(train_step) for _ in range(max(3, args.head_repeats))])

    towers = {"clip": model.clip_tower, "dino": model.dino_tower}
    full_depth = {"clip": config.clip_config.num_hidden_layers, "dino": config.dino_config.num_hidden_layers}
    percent = 100.0 * head_s / towers_s
    result = {
        "benchmark": "vision_merger",
        "value": round(percent, 3),
        "unit": "%",
        "bar": f"<= {BAR_PERCENT} %",
        "bar_met": percent <= BAR_PERCENT,
        "towers_s": round(towers_s, 4),
        "clip_tower_s": round(median(clip_times), 4),
        "dino_tower_s": round(median(dino_times), 4),
        "merger_s": round(head_s, 5),
        "merger_breakdown_s": {name: round(seconds, 5) for name, seconds in breakdown.items()},
        "towers_gflops": round(towers_flops / 1e9, 2),
        "merger_gflops": round(head_flops / 1e9, 2),
        "flops_percent": round(100.0 * head_flops / towers_flops, 3),
        "towers_gflop_per_s": round(towers_flops / 1e9 / towers_s, 1),
        "merger_gflop_per_s": round(head_flops / 1e9 / head_s, 1),
        "merger_train_fwd_bwd_s": round(train_s, 5),
        "merger_train_percent_of_towers": round(100.0 * train_s / towers_s, 3),
        "blocks_built": {name: len(transformer_blocks(tower.encoder)) for name, tower in towers.items()},
        "blocks_full_depth": full_depth,
        "layers_merged": {"clip": layer_span(config.clip_layers), "dino": layer_span(config.dino_layers)},
        "tokens_per_layer": {
            "pooled_before_merge": {name: config.grid_size**2 for name in towers},
            "unpooled": {name: tower.num_patches for name, tower in towers.items()},
        },
        "pool_after_merge_vs_before": {
            "mergers_time_ratio": round(median(merger_full_times) / median(merger_times), 3),
            "head_time_ratio": round(median(alt_times) / median(current_times), 3),
            "head_flops_ratio": round(alt_flops / head_flops, 3),
            "head_percent_of_towers": round(100.0 * median(alt_times) / towers_s, 3),
        },
        "shapes": {
            "clip": f"ViT-L/14 @ {model.clip_tower.image_size}",
            "dino": f"DINOv2-L/14 @ {model.dino_tower.image_size}",
            "grid": config.grid_size,
            "projector": f"{model.projector.in_features} -> {model.projector.out_features}",
        },
        "batch": 1,
        "dtype": "float32",
        "device": "cpu",
        "threads": threads,
        "repeats": repeats,
        "head_repeats_per_tower_run": args.head_repeats,
        "build_s": round(build_s, 1),
    }
    return finish(result, args.quick)


if __name__ == "__main__":
    raise SystemExit(main())
