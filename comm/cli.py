"""The ``comm`` command: ``caption``, ``ground``, ``ask`` with a trained model, ``inspect`` a checkpoint, ``train``
one (comm-train's options), ``eval`` it (``rec``, ``pope``, ``caption``), ``data`` preparation (``refer``,
``check``), ``demo`` and the browser demo ``web``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from comm.dataclass_options import add_options, from_options
from comm.demo.config import DemoConfig
from comm.errors import ArgumentParser, UserError, run_command
from comm.evaluation.commands import add_eval_commands
from comm.inspection import LAYER_WEIGHTS_PLOT
from comm.refer import REFER_SPLITS
from comm.training.arguments import TRAINING_ARGUMENTS, OneLineArgumentParser, dataclasses_from_namespace
from comm.training.data_check import CHECK_ARGUMENTS
from comm.web import DEFAULT_HOST, DEFAULT_PORT

MODEL_ENV = "COMM_MODEL"
EXIT_NO_BOX = 1
Subcommands = argparse._SubParsersAction  # what add_subparsers returns (argparse names no public type for it)


def _model_options() -> argparse.ArgumentParser:
    parent = ArgumentParser(add_help=False)
    parent.add_argument(
        "--model",
        default=None,
        help=f"COMM model folder (training export or hub-style folder); default: ${MODEL_ENV}",
    )
    parent.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: cuda when available)")
    parent.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: bf16 on GPU, fp32 on CPU)")
    parent.add_argument("--max-new-tokens", type=int, default=None, help="most tokens to generate per answer")
    return parent


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``comm`` command: one subcommand (group) per function of `COMMANDS`.

    >>> build_parser().parse_args(["caption", "a.jpg", "--json"]).json
    True
    """
    parser = ArgumentParser(
        prog="comm",
        description="COMM multimodal LLM: caption images, ground referring expressions, answer questions; train a "
        "model, prepare its data, inspect it, serve it in the browser or run the demo.",
        epilog=f"The model folder comes from --model or the {MODEL_ENV} environment variable.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in COMMANDS:
        add_command(commands)
    return parser


def _add_caption(commands: Subcommands) -> None:
    caption = commands.add_parser("caption", parents=[_model_options()], help="caption one or more images")
    caption.add_argument("images", nargs="+", metavar="IMAGE")
    caption.add_argument("--json", action="store_true", help="print a JSON list of {image, caption}")
    caption.add_argument("--batch-size", type=int, default=8, help="images per generation batch (default 8)")
    caption.add_argument("--prompt", default=None, help="caption prompt (default: the training caption prompt)")
    caption.set_defaults(handler=_caption)


def _add_ground(commands: Subcommands) -> None:
    ground = commands.add_parser("ground", parents=[_model_options()], help="find the box of a referring expression")
    ground.add_argument("image", metavar="IMAGE")
    ground.add_argument("expression", metavar="EXPRESSION")
    ground.add_argument("--draw", metavar="OUT.png", default=None, help="write the image with the box drawn")
    ground.add_argument("--json", action="store_true", help="print {image, expression, box, answer, image_size}")
    ground.set_defaults(handler=_ground)


def _add_ask(commands: Subcommands) -> None:
    ask = commands.add_parser("ask", parents=[_model_options()], help="answer a question about an image")
    ask.add_argument("image", metavar="IMAGE")
    ask.add_argument("question", metavar="QUESTION")
    ask.add_argument("--stream", action="store_true", help="print the answer token by token")
    ask.set_defaults(handler=_ask)


def _add_inspect(commands: Subcommands) -> None:
    inspect = commands.add_parser(
        "inspect", help="print a checkpoint's parts and learned LLN-Layerscale layer weights (no full load)"
    )
    inspect.add_argument("checkpoint", metavar="CHECKPOINT", help="a COMM model folder")
    inspect.add_argument("--out", metavar="DIR", default=None, help=f"write DIR/{LAYER_WEIGHTS_PLOT}")
    inspect.add_argument("--json", action="store_true", help="print the summary as JSON")
    inspect.set_defaults(handler=_inspect)


def _add_train(commands: Subcommands) -> None:
    train = commands.add_parser(
        "train",
        parents=[OneLineArgumentParser(TRAINING_ARGUMENTS, add_help=False)],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="train COMM, stage 1 or 2, as comm-train does (its options; --help lists them)",
        description="COMM stage 1 / stage 2 training with the transformers Trainer: comm-train's options.",
    )
    train.set_defaults(handler=_train)


def _add_data(commands: Subcommands) -> None:
    data = commands.add_parser("data", help="prepare and check training data")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    refer = data_commands.add_parser(
        "refer", help="REFER annotations (refs(*).p + instances.json) to a grounding training jsonl"
    )
    refer.add_argument("root", metavar="ROOT", help="the REFER folder: ROOT/DATASET/refs(unc).p and instances.json")
    refer.add_argument("--dataset", required=True, choices=sorted(REFER_SPLITS))
    refer.add_argument("--split", required=True, help="train, val, testA, testB or test (as the dataset has them)")
    refer.add_argument("--split-by", default=None, help="unc, umd or google (default: unc, refcocog umd)")
    refer.add_argument("--out", required=True, metavar="OUT.jsonl", help="the training file to write")
    refer.add_argument(
        "--image-dir",
        default=None,
        metavar="DIR",
        help="the COCO folder of the images (train2014): image paths are then written relative to OUT's folder",
    )
    refer.set_defaults(handler=_data_refer)
    check = data_commands.add_parser(
        "check",
        parents=[OneLineArgumentParser(CHECK_ARGUMENTS, add_help=False)],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="read a training mixture as comm-train would and report on it (takes comm-train's options; --help)",
        description="Read a training mixture exactly as comm-train would, without a model, and report on it.",
    )
    check.set_defaults(handler=_data_check)


def _add_web(commands: Subcommands) -> None:
    web = commands.add_parser(
        "web", help="serve a checkpoint in the browser: caption, ground with the box drawn, chat (needs comm[web])"
    )
    web.add_argument(
        "checkpoint", nargs="?", default=None, metavar="CHECKPOINT", help="a COMM model folder (default: comm demo's)"
    )
    web.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: cuda when available)")
    web.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: bf16 on GPU, fp32 on CPU)")
    web.add_argument(
        "--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST}: this machine only)"
    )
    web.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to serve on (default {DEFAULT_PORT})")
    web.add_argument("--examples", nargs="+", default=None, metavar="IMAGE", help="example images offered on the page")
    web.add_argument("--max-new-tokens", type=int, default=None, help="most tokens to generate per answer")
    web.add_argument("--share", action="store_true", help="also make a public gradio link (off unless asked)")
    web.set_defaults(handler=_web)


def _add_eval(commands: Subcommands) -> None:
    evaluate = commands.add_parser(
        "eval", help="evaluate a model: REC (RefCOCO/+/g), POPE, captions (the eval/ scripts' options)"
    )
    add_eval_commands(evaluate.add_subparsers(dest="eval_command", required=True, metavar="BENCHMARK"))


def _add_demo(commands: Subcommands) -> None:
    demo = commands.add_parser(
        "demo",
        help="train and evaluate a tiny model on a generated world",
        description="Generate a shapes world, train a tiny COMM model in two stages, evaluate, caption, report.",
    )
    add_options(demo, DemoConfig)
    demo.set_defaults(handler=_demo)


def _model_path(args: argparse.Namespace) -> str:
    model = args.model or os.environ.get(MODEL_ENV)
    if not model:
        raise UserError(f"no model given: pass --model PATH or set {MODEL_ENV}")
    return model


def _generation_options(args: argparse.Namespace) -> dict[str, Any]:
    if args.max_new_tokens is None:
        return {}
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    return {"max_new_tokens": args.max_new_tokens}


def _load(args: argparse.Namespace, images: Sequence[str]):
    """Check the images, then the model folder, device and dtype (cheap) before loading the model (slow)."""
    from transformers.utils import logging as hf_logging

    from comm.pipeline import CommPipeline, load_images

    loaded = load_images(list(images))
    model_path = _model_path(args)
    hf_logging.disable_progress_bar()  # keep stdout/stderr to the answers
    return CommPipeline.from_pretrained(model_path, device=args.device, dtype=args.dtype), loaded


def _caption(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    options = _generation_options(args)
    pipe, loaded = _load(args, args.images)
    captions = pipe.caption(loaded, prompt=args.prompt, batch_size=args.batch_size, **options)
    if args.json:
        records = [{"image": image, "caption": text} for image, text in zip(args.images, captions)]
        print(json.dumps(records, ensure_ascii=False))
    elif len(captions) == 1:
        print(captions[0])
    else:
        for image, text in zip(args.images, captions):
            print(f"{image}\t{text}")
    return 0


def _ground(args: argparse.Namespace) -> int:
    options = _generation_options(args)
    if args.draw is not None and not Path(args.draw).suffix:
        raise UserError(f"--draw {args.draw}: give a file name with an image extension (.png, .jpg)")
    pipe, loaded = _load(args, [args.image])
    (result,) = pipe.ground_detailed(loaded[0], [args.expression], **options)
    box = None if result.box is None else [round(v, 2) for v in result.box]
    if args.draw is not None:
        from comm.visualize import draw_boxes

        label = args.expression if len(args.expression) <= 40 else args.expression[:37] + "..."
        out = Path(args.draw)
        out.parent.mkdir(parents=True, exist_ok=True)
        draw_boxes(loaded[0], [(result.box, "red", label)]).save(out)
    if args.json:
        record = {
            "image": args.image,
            "expression": args.expression,
            "box": box,
            "answer": result.answer,
            "image_size": list(result.image_size),
        }
        print(json.dumps(record, ensure_ascii=False))
    elif box is not None:
        print(f"[{box[0]:.1f}, {box[1]:.1f}, {box[2]:.1f}, {box[3]:.1f}]")
    if box is None:
        print(f"no box in the answer: {result.answer!r}", file=sys.stderr)
        return EXIT_NO_BOX
    return 0


def _ask(args: argparse.Namespace) -> int:
    options = _generation_options(args)
    pipe, loaded = _load(args, [args.image])
    if args.stream:
        from transformers import TextStreamer

        streamer = TextStreamer(pipe.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        pipe.ask(loaded[0], args.question, streamer=streamer, **options)  # the streamer prints, newline included
    else:
        print(pipe.ask(loaded[0], args.question, **options))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from comm.inspection import format_summary, inspect_checkpoint

    summary, plot = inspect_checkpoint(args.checkpoint, args.out)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"COMM checkpoint {args.checkpoint}")
        print(format_summary(summary))
    if plot is not None:
        print(f"layer weights: {plot}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _data_refer(args: argparse.Namespace) -> int:
    from comm.data.refer import write_refer_jsonl

    count = write_refer_jsonl(args.root, args.dataset, args.split, args.out, args.split_by, args.image_dir)
    print(f"wrote {count} expressions of {args.dataset} {args.split} to {args.out}")
    return 0


def _data_check(args: argparse.Namespace) -> int:
    from comm.training.data_check import check_data

    check_data(*dataclasses_from_namespace(args, CHECK_ARGUMENTS))
    return 0


def _train(args: argparse.Namespace) -> int:
    from comm.training.stopping import continue_command
    from comm.training.train import run_training

    # A run stopped by a signal prints how to continue it: this command again, its options (after "train") as given.
    continue_with = continue_command(args.argv[1:], program=["comm", "train"])
    return run_training(dataclasses_from_namespace(args, TRAINING_ARGUMENTS), continue_with)


def _demo(args: argparse.Namespace) -> int:
    from comm.demo.run import main as run_demo

    return run_demo(from_options(DemoConfig, args))


def _web(args: argparse.Namespace) -> int:
    from comm.web.app import import_gradio, serve
    from comm.web.checkpoint import demo_examples, examples_from_files, resolve_checkpoint

    import_gradio()  # a missing extra is one line before anything else
    options = _generation_options(args)
    checkpoint = resolve_checkpoint(args.checkpoint)
    examples = examples_from_files(args.examples) if args.examples else demo_examples(checkpoint)
    serve(
        checkpoint, args.device, args.dtype, args.host, args.port, examples, options.get("max_new_tokens"), args.share
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``comm`` command on ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    >>> main(["caption", "photo.jpg", "--model", "runs/stage2/final", "--json"])  # doctest: +SKIP
    [{"image": "photo.jpg", "caption": "A dog on a couch."}]
    0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    # The namespace keeps the command line as given: `comm train` prints it back to continue a stopped run.
    args = build_parser().parse_args(argv, namespace=argparse.Namespace(argv=argv))
    return run_command(lambda: args.handler(args))


# The subcommands of ``comm`` in the order its help lists them, each added by one function.
COMMANDS: tuple[Callable[[Subcommands], None], ...] = (
    _add_caption,
    _add_ground,
    _add_ask,
    _add_inspect,
    _add_train,
    _add_eval,
    _add_data,
    _add_web,
    _add_demo,
)


if __name__ == "__main__":
    sys.exit(main())
