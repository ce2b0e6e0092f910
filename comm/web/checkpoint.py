"""Which checkpoint ``comm web`` serves, the example images it offers, and the facts it shows about the model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from comm.demo.world import WorldFiles
from comm.errors import UserError
from comm.evaluation.rec import load_rec_jsonl
from comm.inspection import format_summary, model_summary
from comm.pipeline import CommPipeline

# `comm demo`'s default --out; its trained model is exported to stage2/final and its world lies in world/.
DEMO_OUT = Path("comm-demo")
DEFAULT_CHECKPOINT = DEMO_OUT / "stage2" / "final"
EXAMPLES_SHOWN = 4


@dataclass(frozen=True)
class Example:
    """An example the page offers: an image file and a referring expression to ground in it ("" for none)."""

    image: Path
    expression: str = ""


def resolve_checkpoint(checkpoint: str | Path | None) -> Path:
    """The folder to serve: ``checkpoint``, or the demo's trained model when None (an error if it is missing)."""
    if checkpoint is not None:
        return Path(checkpoint)
    if not DEFAULT_CHECKPOINT.is_dir():
        raise UserError(
            f"no checkpoint given and no demo model at {DEFAULT_CHECKPOINT}: run `comm demo` first or pass a "
            "checkpoint (comm web CHECKPOINT)"
        )
    return DEFAULT_CHECKPOINT


def demo_examples(checkpoint: Path, limit: int = EXAMPLES_SHOWN) -> list[Example]:
    """The demo world's held-out images with one referring expression each, for a checkpoint that `comm demo`
    trained (``OUT/stage2/final`` beside ``OUT/world``); an empty list for any other checkpoint."""
    world = WorldFiles(checkpoint.resolve().parent.parent / "world")
    if checkpoint.resolve().parent.name != "stage2" or not world.test_rec.is_file():
        return []
    examples: dict[str, Example] = {}
    for sample in load_rec_jsonl(world.test_rec, image_root=world.root):
        if sample.image not in examples and Path(sample.image).is_file():
            examples[sample.image] = Example(Path(sample.image), sample.expression)
        if len(examples) == limit:
            break
    return list(examples.values())


def examples_from_files(images: Sequence[str | Path]) -> list[Example]:
    """Examples from image files named on the command line (no expression); a missing file is an error."""
    missing = [str(image) for image in images if not Path(image).is_file()]
    if missing:
        raise UserError(f"--examples: no such image file: {missing[0]}")
    return [Example(Path(image)) for image in images]


def model_facts(checkpoint: str | Path, pipe: CommPipeline) -> str:
    """The checkpoint served, its device and dtype, then what ``comm inspect`` prints: towers, merged layers,
    parts and the learned LLN-Layerscale weight of every merged layer."""
    dtype = str(pipe.dtype).removeprefix("torch.")
    header = f"COMM checkpoint {checkpoint}\nrunning on {pipe.device}, {dtype}"
    return f"{header}\n{format_summary(model_summary(pipe.model))}"
