"""Pretrain the demo's tiny CLIP and DINOv2 towers on generated shapes: how ``comm/demo/towers`` was made.

Real COMM starts from pretrained towers; random ones give the LLM features that say little about colour, shape or
place, and the demo's model then learns grounding about half as fast (README, findings). This module makes the
tiny stand-ins: a 4-layer 64-wide CLIP trained contrastively on captions that name each object and where it is,
and a 4-layer 64-wide DINOv2 trained to fill in masked patches (SimMIM's L1 on pixels). Both keep a fixed 2D
sin-cos position table, so every patch token says where it is.

    python -m comm.demo.pretrain_towers --out comm/demo/towers   # the shipped towers; ~20 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from comm.demo.scenes import COLOURS, DEFAULT_SHAPES, SIZES, Scene, WorldConfig, render_scene, sample_scene

IMAGE_SIZE = 64
PATCH_SIZE = 8
WIDTH = 64
REGION_WORDS = ("top", "middle", "bottom", "left", "centre", "right")
HELD_OUT = 1024  # the last generated scenes, never trained on


@dataclass
class PretrainConfig:
    """What decides the pretrained towers; the defaults made the shipped ones."""

    out: Path = Path("towers")
    images: int = 16000  # generated scenes (the last HELD_OUT are never trained on)
    clip_steps: int = 1500
    dino_steps: int = 1500
    batch: int = 128
    seed: int = 1234
    threads: int = 1
    position_norm: float = 2.0  # row norm of the sin-cos table (patch content has norm ~1-3 after the patch conv)
    mask_ratio: float = 0.5  # share of DINOv2's patches masked per image


def sincos_position_table(side: int, dim: int, norm: float) -> torch.Tensor:
    """MAE's fixed 2D sin-cos table for a ``side x side`` patch grid (x then y), each row scaled to ``norm``."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim // 4))
    ys, xs = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    parts = []
    for coordinate in (xs.reshape(-1), ys.reshape(-1)):
        angles = coordinate[:, None] * omega[None]
        parts += [np.sin(angles), np.cos(angles)]
    table = torch.tensor(np.concatenate(parts, axis=1), dtype=torch.float32)
    return table / table.norm(dim=1, keepdim=True) * norm


def region(centre: tuple[float, float], image_size: int) -> str:
    """The third of the image a point falls in, as words: ``"top left"``, ``"middle centre"``..."""
    column = ("left", "centre", "right")[min(2, int(3 * centre[0] / image_size))]
    row = ("top", "middle", "bottom")[min(2, int(3 * centre[1] / image_size))]
    return f"{row} {column}"


def positional_caption(scene: Scene, rng: random.Random) -> str:
    """CLIP's training text: every object with size, colour, shape and region, in drawing or shuffled order."""
    objects = list(scene.objects)
    if rng.random() < 0.5:
        rng.shuffle(objects)
    return " and ".join(
        f"a {obj.size} {obj.colour} {obj.shape} at the {region(obj.centre, scene.image_size)}" for obj in objects
    )


class CaptionEncoder(nn.Module):
    """CLIP's text side for the pretraining only: a 2-layer transformer over words, mean-pooled."""

    def __init__(self, vocab_size: int, dim: int, max_length: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.position = nn.Parameter(torch.randn(max_length, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, 4, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, 2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.body(self.embed(ids) + self.position[: ids.shape[1]], src_key_padding_mask=~mask))
        return (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)


def _normalise(pixels: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    return (pixels - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def _optimizer(parameters: list[nn.Parameter], steps: int):
    """AdamW (lr 1e-3, weight decay 0.05) and its one-cycle schedule over ``steps``: both towers train with them."""
    optimizer = torch.optim.AdamW(parameters, lr=1e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, 1e-3, total_steps=steps, pct_start=min(0.5, max(0.05, 3 / steps))
    )
    return optimizer, schedule


def _update(loss: torch.Tensor, optimizer: torch.optim.Optimizer, schedule) -> None:
    """One optimizer and schedule step on ``loss``."""
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    schedule.step()


def pretrain_clip(images: torch.Tensor, scenes: list[Scene], config: PretrainConfig, rng: random.Random):
    """CLIP's vision tower trained contrastively (symmetric InfoNCE) against `positional_caption` texts."""
    words = sorted(set(COLOURS) | set(DEFAULT_SHAPES) | set(SIZES) | {"a", "at", "the", "and"} | set(REGION_WORDS))
    vocab = {word: index + 1 for index, word in enumerate(words)}
    clip = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=WIDTH,
            intermediate_size=2 * WIDTH,
            num_hidden_layers=4,
            num_attention_heads=4,
            image_size=IMAGE_SIZE,
            patch_size=PATCH_SIZE,
            projection_dim=WIDTH,
        )
    )
    side = IMAGE_SIZE // PATCH_SIZE
    with torch.no_grad():
        clip.embeddings.position_embedding.weight[0] = 0  # the class token has no place
        clip.embeddings.position_embedding.weight[1:] = sincos_position_table(side, WIDTH, config.position_norm)
    clip.embeddings.position_embedding.weight.requires_grad_(False)
    text = CaptionEncoder(len(vocab) + 1, WIDTH)
    image_head, text_head = nn.Linear(WIDTH, WIDTH, bias=False), nn.Linear(WIDTH, WIDTH, bias=False)
    logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    parameters = [p for p in clip.parameters() if p.requires_grad] + list(text.parameters())
    parameters += list(image_head.parameters()) + list(text_head.parameters()) + [logit_scale]
    optimizer, schedule = _optimizer(parameters, config.clip_steps)
    trained = len(scenes) - HELD_OUT
    for _ in (bar := tqdm(range(config.clip_steps), desc="CLIP (contrastive)")):
        index = torch.randint(0, trained, (config.batch,))
        tokens = [[vocab[w] for w in positional_caption(scenes[i], rng).split()] for i in index.tolist()]
        length = max(map(len, tokens))
        ids = torch.zeros(len(tokens), length, dtype=torch.long)
        mask = torch.zeros(len(tokens), length, dtype=torch.bool)
        for row, caption_ids in enumerate(tokens):
            ids[row, : len(caption_ids)] = torch.tensor(caption_ids)
            mask[row, : len(caption_ids)] = True
        pooled = clip(pixel_values=_normalise(images[index], OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)).pooler_output
        image_embedding = F.normalize(image_head(pooled), dim=-1)
        text_embedding = F.normalize(text_head(text(ids, mask)), dim=-1)
        logits = logit_scale.exp().clamp(max=100) * image_embedding @ text_embedding.T
        target = torch.arange(len(index))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        _update(loss, optimizer, schedule)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return clip


def pretrain_dino(images: torch.Tensor, config: PretrainConfig) -> Dinov2Model:
    """DINOv2's tower trained to predict the pixels of masked patches (L1 on masked patches only, as SimMIM)."""
    dino = Dinov2Model(
        Dinov2Config(
            hidden_size=WIDTH,
            num_hidden_layers=4,
            num_attention_heads=4,
            mlp_ratio=2,
            image_size=IMAGE_SIZE,
            patch_size=PATCH_SIZE,
        )
    )
    side = IMAGE_SIZE // PATCH_SIZE
    with torch.no_grad():
        dino.embeddings.position_embeddings[0, 0] = 0
        dino.embeddings.position_embeddings[0, 1:] = sincos_position_table(side, WIDTH, config.position_norm)
    dino.embeddings.position_embeddings.requires_grad_(False)
    head = nn.Linear(WIDTH, PATCH_SIZE * PATCH_SIZE * 3)
    parameters = [p for p in dino.parameters() if p.requires_grad] + list(head.parameters())
    optimizer, schedule = _optimizer(parameters, config.dino_steps)
    trained = len(images) - HELD_OUT
    for _ in (bar := tqdm(range(config.dino_steps), desc="DINOv2 (masked patches)")):
        index = torch.randint(0, trained, (config.batch,))
        batch = images[index]
        masked = torch.rand(len(index), side * side) < config.mask_ratio
        hidden = dino(
            pixel_values=_normalise(batch, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD), bool_masked_pos=masked
        ).last_hidden_state
        patches = batch.unfold(2, PATCH_SIZE, PATCH_SIZE).unfold(3, PATCH_SIZE, PATCH_SIZE)
        target = patches.permute(0, 2, 3, 1, 4, 5).reshape(len(index), side * side, -1)
        loss = (head(hidden[:, 1:]) - target).abs()[masked].mean()
        _update(loss, optimizer, schedule)
        bar.set_postfix(l1=f"{loss.item():.4f}")
    return dino


def pretrain_towers(config: PretrainConfig) -> dict[str, Path]:
    """Generate the scenes, pretrain both towers and save them as ``out/clip`` and ``out/dino`` checkpoints."""
    if config.images <= HELD_OUT or min(config.clip_steps, config.dino_steps) < 4 or config.batch < 1:
        raise ValueError(f"images must exceed {HELD_OUT}, steps be at least 4 and batch positive, got {config}")
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    rng = random.Random(f"pretrain:{config.seed}")
    world = WorldConfig(seed=config.seed)
    start = time.perf_counter()
    scenes = [sample_scene(rng, world, f"p{i}", "pretrain") for i in range(config.images)]
    pixels = np.stack([np.asarray(render_scene(scene)) for scene in scenes])
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
    clip = pretrain_clip(images, scenes, config, rng)
    dino = pretrain_dino(images, config)
    config.out.mkdir(parents=True, exist_ok=True)
    paths = {"clip": config.out / "clip", "dino": config.out / "dino"}
    clip.save_pretrained(paths["clip"])
    dino.save_pretrained(paths["dino"])
    settings = {**asdict(config), "out": str(config.out), "seconds": round(time.perf_counter() - start)}
    (config.out / "pretrain.json").write_text(json.dumps(settings, indent=1) + "\n")
    return paths


def main(argv: list[str] | None = None) -> int:
    """``python -m comm.demo.pretrain_towers``: pretrain the towers with the given settings."""
    defaults = PretrainConfig()
    parser = argparse.ArgumentParser(prog="python -m comm.demo.pretrain_towers", description=__doc__)
    for name, value in asdict(defaults).items():
        kind = Path if name == "out" else type(value)
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=value, help="default: %(default)s")
    paths = pretrain_towers(PretrainConfig(**vars(parser.parse_args(argv))))
    print(f"saved {paths['clip']} and {paths['dino']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
