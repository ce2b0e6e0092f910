"""What a COMM model is made of and what its LLN-Layerscale mergers learned (the ``comm inspect`` command)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from comm.loading import WEIGHT_FILES, check_model_folder
from comm.model.configuration import CommConfig
from comm.model.modeling import CommForConditionalGeneration

LAYER_WEIGHTS_PLOT = "layer_weights.png"
TOWERS = {"clip": "CLIP", "dino": "DINOv2"}
# The model's parts in the order an image goes through them.
PARTS = (
    "clip_tower",
    "dino_tower",
    "clip_merger",
    "dino_merger",
    "clip_projection",
    "dino_aligner",
    "projector",
    "image_position_embedding",
    "language_model",
    "lm_head",
)
MERGERS = ("clip_merger", "dino_merger")


def _merger(model: CommForConditionalGeneration, tower: str) -> Any:
    return getattr(model, f"{tower}_merger")


def layer_weights(model: CommForConditionalGeneration) -> dict[str, list[tuple[int, float]]]:
    """Per tower (``"clip"``, ``"dino"``), ``(layer, weight)`` for each merged layer: the LLN-Layerscale scales the
    merger applies (after the softmax when ``layerscale_softmax``), layers numbered from 1 as in the config."""
    layers = {"clip": model.config.clip_layers, "dino": model.config.dino_layers}
    return {
        tower: list(zip(layers[tower], _merger(model, tower).scales().detach().float().cpu().tolist()))
        for tower in TOWERS
    }


def initial_layer_weight(model: CommForConditionalGeneration, tower: str) -> float:
    """The weight every layer of ``tower``'s merger starts from (what a layer gained or lost is measured against)."""
    merger = _merger(model, tower)
    if merger.softmax:
        return 1.0 / len(merger.blocks)  # equal logits: a uniform softmax
    return float(merger.scale_init)


def model_parts(model: CommForConditionalGeneration) -> list[dict[str, Any]]:
    """Each part (towers, mergers, aligners, projector, LLM decoder, LM head): its parameters and how many train."""
    rows = []
    for name in PARTS:
        part = getattr(model, name)
        if part is None:  # an optional part the config leaves out
            continue
        parameters = list(part.parameters())
        rows.append(
            {
                "part": name,
                "parameters": sum(p.numel() for p in parameters),
                "trainable": sum(p.numel() for p in parameters if p.requires_grad),
            }
        )
    return rows


def model_summary(model: CommForConditionalGeneration) -> dict[str, Any]:
    """The towers, merged layers, token counts, parts and learned layer weights as one JSON-ready dict."""
    config = model.config
    towers = {}
    for tower, tower_config, layers, image_size in (
        ("clip", config.clip_config, config.clip_layers, config.clip_config.image_size),
        ("dino", config.dino_config, config.dino_layers, config.dino_image_size),
    ):
        towers[tower] = {
            "model_type": tower_config.model_type,
            "layers": tower_config.num_hidden_layers,
            "built_layers": max(layers),
            "merged_layers": list(layers),
            "hidden_size": tower_config.hidden_size,
            "image_size": image_size,
            "patch_tokens": (image_size // tower_config.patch_size) ** 2,
            "initial_layer_weight": initial_layer_weight(model, tower),
        }
    return {
        "towers": towers,
        "grid_size": config.grid_size,
        "concat": config.concat,
        "image_tokens": config.num_image_tokens,
        "llm": {
            "model_type": config.text_config.model_type,
            "layers": config.text_config.num_hidden_layers,
            "hidden_size": config.text_config.hidden_size,
            "vocab_size": config.text_config.vocab_size,
        },
        "layerscale_softmax": bool(config.layerscale_softmax),
        "parts": model_parts(model),
        "layer_weights": {tower: [list(pair) for pair in pairs] for tower, pairs in layer_weights(model).items()},
    }


def _count(number: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if number >= size:
            return f"{number / size:.2f}{unit}"
    return str(number)


def _layer_span(layers: list[int]) -> str:
    contiguous = layers == list(range(layers[0], layers[-1] + 1))
    return f"{layers[0]}..{layers[-1]}" if contiguous and len(layers) > 1 else ",".join(map(str, layers))


def format_summary(summary: dict[str, Any]) -> str:
    """`model_summary` as the text ``comm inspect`` prints."""
    lines = ["towers (frozen):"]
    for tower, info in summary["towers"].items():
        lines.append(
            f"  {TOWERS[tower]:<7} {info['model_type']}, {info['layers']} layers ({info['built_layers']} built), "
            f"width {info['hidden_size']}, {info['image_size']} px input, {info['patch_tokens']} patch tokens; "
            f"merged layers {_layer_span(info['merged_layers'])} ({len(info['merged_layers'])})"
        )
    llm = summary["llm"]
    lines += [
        f"image tokens: {summary['image_tokens']} per image (each tower pooled to {summary['grid_size']}x"
        f"{summary['grid_size']}, {summary['concat']} concatenation)",
        f"LLM: {llm['model_type']}, {llm['layers']} layers, width {llm['hidden_size']}, vocabulary {llm['vocab_size']}",
        "parts:",
        f"  {'part':<16}{'parameters':>12}  trains",
    ]
    for row in summary["parts"]:
        if row["trainable"] == 0:
            trains = "frozen"
        elif row["trainable"] == row["parameters"]:
            trains = "yes"
        else:
            trains = f"{_count(row['trainable'])} of them"
        lines.append(f"  {row['part']:<16}{_count(row['parameters']):>12}  {trains}")
    softmax = " (softmax over layers)" if summary["layerscale_softmax"] else ""
    lines.append(f"LLN-Layerscale weights per merged layer{softmax}:")
    for tower, pairs in summary["layer_weights"].items():
        initial = summary["towers"][tower]["initial_layer_weight"]
        lines.append(f"  {TOWERS[tower]} (each layer started at {initial:.4f}):")
        lines += [f"    layer {layer:>3}  {weight:8.4f}  ({weight - initial:+.4f})" for layer, weight in pairs]
    return "\n".join(lines)


def save_layer_weights_plot(model: CommForConditionalGeneration, path: str | Path, title: str | None = None) -> Path:
    """Write a bar chart of `layer_weights` per tower (layer on the x axis, the initial weight dashed) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    weights = layer_weights(model)
    figure, axes = plt.subplots(1, len(weights), figsize=(5 * len(weights), 3.6), squeeze=False)
    for axis, (tower, pairs) in zip(axes[0], weights.items()):
        layers = [layer for layer, _ in pairs]
        axis.bar(layers, [weight for _, weight in pairs], color="tab:blue" if tower == "clip" else "tab:orange")
        axis.axhline(initial_layer_weight(model, tower), color="black", linestyle="--", linewidth=1, label="initial")
        axis.set_title(f"{TOWERS[tower]} merger")
        axis.set_xlabel("layer")
        axis.set_ylabel("LLN-Layerscale weight")
        axis.set_xticks(layers)
        axis.tick_params(axis="x", labelsize=7 if len(layers) > 12 else 9)
        axis.legend(loc="best", fontsize=8)
    figure.suptitle(title or "learned layer weights")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _weight_files(folder: Path, prefixes: tuple[str, ...]) -> list[Path]:
    """The weight files of ``folder`` that hold tensors named with one of ``prefixes`` (one shard, not all)."""
    for name in WEIGHT_FILES:
        file = folder / name
        if not file.is_file():
            continue
        if name.endswith(".index.json"):
            weight_map = json.loads(file.read_text())["weight_map"]
            return sorted({folder / shard for key, shard in weight_map.items() if key.startswith(prefixes)})
        return [file]
    return []


def _checkpoint_tensors(folder: Path, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The tensors of ``folder``'s weights whose names start with one of ``prefixes`` (only those are read)."""
    tensors: dict[str, torch.Tensor] = {}
    for file in _weight_files(folder, prefixes):
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as handle:
                tensors.update({key: handle.get_tensor(key) for key in handle.keys() if key.startswith(prefixes)})
        else:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            tensors.update({key: value for key, value in state.items() if key.startswith(prefixes)})
    return tensors


def load_for_inspection(folder: str | Path) -> CommForConditionalGeneration:
    """A COMM checkpoint's structure with only its mergers' weights loaded: the rest stays on the meta device, so a
    7B checkpoint is inspected in seconds and without its memory. Parts train as a fresh training run would have
    them (towers frozen)."""
    path = check_model_folder(folder)
    config = CommConfig.from_pretrained(path)
    with torch.device("meta"):
        model = CommForConditionalGeneration(config)
    tensors = _checkpoint_tensors(path, tuple(f"{name}." for name in MERGERS))
    for name in MERGERS:
        merger = getattr(model, name).to_empty(device="cpu")
        state = {key.removeprefix(f"{name}."): value.float() for key, value in tensors.items() if key.startswith(name)}
        missing = sorted(set(merger.state_dict()) - set(state))
        if missing:
            raise ValueError(f"{path}: the weights lack {name}.{missing[0]} (not a COMM checkpoint?)")
        merger.load_state_dict(state)
    return model


def inspect_checkpoint(folder: str | Path, out: str | Path | None = None) -> tuple[dict[str, Any], Path | None]:
    """`model_summary` of the checkpoint in ``folder``, and ``layer_weights.png`` written to ``out`` (if given)."""
    model = load_for_inspection(folder)
    plot = None
    if out is not None:
        plot = save_layer_weights_plot(model, Path(out) / LAYER_WEIGHTS_PLOT, title=f"learned layer weights: {folder}")
    return model_summary(model), plot
