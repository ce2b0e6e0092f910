"""The evaluation commands, ``comm eval rec|pope|caption`` and the scripts in ``eval/``: each option declared once,
then a model run of the command's tasks (`comm.evaluation.runner`) or, with ``--score``, what a run wrote re-scored.

Exit status: 0, 2 with one ``error:`` line for a user error (other ranks name themselves), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from comm.errors import ArgumentParser, run_command
from comm.evaluation.caption import (
    CAPTION_MAX_NEW_TOKENS,
    CAPTION_TOKENIZERS,
    KARPATHY_SPLITS,
    CaptionTask,
    load_caption_file,
    rescore_caption_file,
)
from comm.evaluation.pope import (
    ANSWER_MODES,
    POPE_MAX_NEW_TOKENS,
    PopeTask,
    evaluate_pope_splits,
    load_pope_splits,
    rescore_pope_files,
)
from comm.evaluation.processes import process_state
from comm.evaluation.rec import REC_MAX_NEW_TOKENS, RecTask, load_rec_jsonl, load_refer, rescore_predictions_file
from comm.evaluation.records import METRICS_FILE, PREDICTIONS_FILE, check_files_exist
from comm.evaluation.run_options import RunOptions, add_run_arguments
from comm.evaluation.runner import run_task
from comm.evaluation.tables import format_metrics
from comm.evaluation.task import EvaluationTask
from comm.refer import REFER_SPLITS

if TYPE_CHECKING:
    from comm.model.modeling import CommForConditionalGeneration
    from comm.processing import CommProcessor


class EvalCommand(ABC):
    """One evaluation command: its data options, its tasks, how it runs them and how ``--score`` re-scores."""

    help: ClassVar[str]  # one line, in ``comm eval --help``
    scored: ClassVar[str] = "a predictions file"  # what --score re-scores
    max_new_tokens: ClassVar[int]

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """The command's data options and ``--score``, then the run options."""
        self.add_data_arguments(parser)
        add_run_arguments(parser, max_new_tokens=self.max_new_tokens)

    @abstractmethod
    def add_data_arguments(self, parser: argparse.ArgumentParser) -> None:
        """What to evaluate, and ``--score``."""

    def check(self, parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:  # noqa: B027
        """Usage errors of the data options for a model run (none unless overridden)."""

    @abstractmethod
    def rescore(self, args: argparse.Namespace) -> dict[str, Any]:
        """The metrics of the files ``--score`` names, no model."""

    @abstractmethod
    def tasks(self, args: argparse.Namespace) -> list[EvaluationTask[Any]]:
        """The tasks to run, their data read (before the model loads)."""

    @abstractmethod
    def title(self, args: argparse.Namespace) -> str:
        """The heading of the printed metrics."""

    def evaluate(
        self,
        tasks: Sequence[EvaluationTask[Any]],
        model: CommForConditionalGeneration,
        processor: CommProcessor,
        options: RunOptions,
    ) -> dict[str, Any]:
        """Run the one task into ``predictions.jsonl`` and ``metrics.json`` in the output folder."""
        (task,) = tasks
        out = options.output_dir
        return run_task(
            task,
            model,
            processor,
            out / PREDICTIONS_FILE,
            out / METRICS_FILE,
            batch_size=options.batch_size,
            progress=options.progress,
            **options.generate_kwargs(),
        )


class RecCommand(EvalCommand):
    """REC on a REFER split or a JSON-lines file: Acc@0.5."""

    help = "referring expression comprehension (RefCOCO/+/g, Acc@0.5), or --score a predictions file"
    max_new_tokens = REC_MAX_NEW_TOKENS

    def add_data_arguments(self, parser: argparse.ArgumentParser) -> None:
        """REFER or JSON-lines data, ``--visualize`` and ``--score``."""
        parser.add_argument(
            "--score", type=Path, metavar="PREDICTIONS.jsonl", help="re-score a predictions file, no model"
        )
        refer = parser.add_argument_group("REFER data (refcoco, refcoco+, refcocog)")
        refer.add_argument("--refer-root", type=Path, help="folder holding refcoco/, refcoco+/, refcocog/")
        refer.add_argument("--dataset", choices=sorted(REFER_SPLITS), help="REFER dataset")
        refer.add_argument("--split", help="val, testA, testB (refcoco, refcoco+) or val, test (refcocog)")
        refer.add_argument("--split-by", default=None, help="unc / google / umd (default: unc, umd for refcocog)")
        refer.add_argument("--image-dir", type=Path, help="COCO train2014 images folder")
        jsonl = parser.add_argument_group("JSON-lines data")
        jsonl.add_argument("--jsonl", type=Path, help='samples {"image", "expression", "bbox": [x, y, w, h], "id"?}')
        jsonl.add_argument(
            "--image-root", type=Path, default=None, help="folder the jsonl's image paths are relative to"
        )
        parser.add_argument(
            "--visualize",
            type=int,
            default=0,
            metavar="N",
            help="draw N examples (gt green, prediction red) into a PNG",
        )

    def check(self, parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
        """One data source, complete; ``--visualize`` >= 0."""
        if (args.refer_root is None) == (args.jsonl is None):
            parser.error("give the data as --refer-root (with --dataset, --split, --image-dir) or as --jsonl")
        if args.refer_root is not None:
            missing = [
                f"--{name.replace('_', '-')}" for name in ("dataset", "split", "image_dir") if not getattr(args, name)
            ]
            if missing:
                parser.error(f"--refer-root needs {', '.join(missing)}")
        if args.visualize < 0:
            parser.error(f"--visualize must be >= 0, got {args.visualize}")

    def rescore(self, args: argparse.Namespace) -> dict[str, Any]:
        """Acc@0.5 of the predictions file."""
        return rescore_predictions_file(args.score)

    def tasks(self, args: argparse.Namespace) -> list[EvaluationTask[Any]]:
        """The REFER split's or the JSON-lines file's samples."""
        if args.jsonl is not None:
            samples = load_rec_jsonl(args.jsonl, args.image_root)
        else:
            samples = load_refer(args.refer_root, args.dataset, args.split_by, args.split, args.image_dir)
        return [RecTask(samples, visualize=args.visualize)]

    def title(self, args: argparse.Namespace) -> str:
        """``REC`` and the data's name."""
        return f"REC {args.jsonl.name}" if args.jsonl is not None else f"REC {args.dataset} {args.split}"


class PopeCommand(EvalCommand):
    """POPE on one or more question files, a split each: the official yes/no metrics and their means."""

    help = "POPE object hallucination (yes/no questions), or --score answers files"
    scored = "answers files"
    max_new_tokens = POPE_MAX_NEW_TOKENS

    def add_data_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Question files, image folder, answer mode, model id and ``--score``."""
        parser.add_argument(
            "--questions",
            type=Path,
            nargs="+",
            required=True,
            metavar="QUESTIONS.json",
            help="POPE question files (one JSON object a line); each file is a split named after it",
        )
        parser.add_argument(
            "--score",
            type=Path,
            nargs="+",
            metavar="ANSWERS.jsonl",
            help="re-score answers files (one per --questions file, same order), no model",
        )
        parser.add_argument("--image-dir", type=Path, default=None, help="folder the questions' image names are in")
        parser.add_argument(
            "--answer-mode",
            choices=ANSWER_MODES,
            default="generate",
            help="generate: free-form answers (default); logits: one forward pass, next-token 'Yes' vs 'No' logits",
        )
        parser.add_argument(
            "--model-id", default=None, help="model_id written in the answers (default: the model folder)"
        )

    def rescore(self, args: argparse.Namespace) -> dict[str, Any]:
        """`rescore_pope_files`: each answers file against its question file, the summary for several."""
        if len(args.score) != len(args.questions):
            raise ValueError(
                f"--score got {len(args.score)} answers file(s) but --questions {len(args.questions)}: give one each"
            )
        return rescore_pope_files(args.score, args.questions)

    def tasks(self, args: argparse.Namespace) -> list[EvaluationTask[Any]]:
        """One task a question file; the model id defaults to the model folder's name."""
        model_id = args.model_id or Path(args.model).name
        return [
            PopeTask(questions, answer_mode=args.answer_mode, model_id=model_id, split=split)
            for split, questions in load_pope_splits(args.questions, args.image_dir).items()
        ]

    def title(self, args: argparse.Namespace) -> str:
        """``POPE`` and the answer mode."""
        return f"POPE ({args.answer_mode})"

    def evaluate(
        self,
        tasks: Sequence[EvaluationTask[Any]],
        model: CommForConditionalGeneration,
        processor: CommProcessor,
        options: RunOptions,
    ) -> dict[str, Any]:
        """`evaluate_pope_splits`: ``answers_{split}.jsonl`` each, one ``metrics.json``."""
        return evaluate_pope_splits(
            tasks,  # type: ignore[arg-type]  # PopeCommand.tasks makes PopeTasks
            model,
            processor,
            options.output_dir,
            batch_size=options.batch_size,
            progress=options.progress,
            **options.generate_kwargs(),
        )


class CaptionCommand(EvalCommand):
    """Captioning on a Karpathy split or a COCO caption file: BLEU-4, METEOR, ROUGE-L, CIDEr (SPICE)."""

    help = "image captioning (COCO Karpathy test, Flickr30k), or --score a predictions file"
    max_new_tokens = CAPTION_MAX_NEW_TOKENS

    def add_data_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Annotation file, split, image folder, metric options and ``--score``."""
        parser.add_argument(
            "--annotations",
            type=Path,
            required=True,
            help="Karpathy split file (dataset_coco.json, dataset_flickr30k.json) or a COCO caption annotation file",
        )
        parser.add_argument(
            "--split",
            default="test",
            choices=KARPATHY_SPLITS,
            help="Karpathy split (default test; unused for COCO files)",
        )
        parser.add_argument("--image-root", type=Path, default=None, help="folder the annotation's image paths are in")
        parser.add_argument("--spice", action="store_true", help="also compute SPICE (needs Java and Stanford CoreNLP)")
        parser.add_argument(
            "--tokenizer",
            default="ptb",
            choices=CAPTION_TOKENIZERS,
            help="ptb: the official PTB tokenizer and METEOR (both need Java); python: no Java, METEOR skipped",
        )
        parser.add_argument(
            "--score", type=Path, metavar="PREDICTIONS.jsonl", help="re-score a predictions file, no model"
        )

    def rescore(self, args: argparse.Namespace) -> dict[str, Any]:
        """The caption metrics of the predictions file against the annotations."""
        samples = load_caption_file(args.annotations, args.split, args.image_root)
        return rescore_caption_file(args.score, samples, spice=args.spice, tokenizer=args.tokenizer)

    def tasks(self, args: argparse.Namespace) -> list[EvaluationTask[Any]]:
        """The annotation file's samples."""
        samples = load_caption_file(args.annotations, args.split, args.image_root)
        return [CaptionTask(samples, spice=args.spice, tokenizer=args.tokenizer)]

    def title(self, args: argparse.Namespace) -> str:
        """``captions``, the annotation file and the split."""
        return f"captions {args.annotations.name} {args.split}"


EVAL_COMMANDS: dict[str, EvalCommand] = {"rec": RecCommand(), "pope": PopeCommand(), "caption": CaptionCommand()}


def add_eval_commands(subparsers: Any) -> None:
    """Register ``rec``, ``pope`` and ``caption`` on ``subparsers`` (``add_subparsers()``'s), each with its handler."""
    for name, command in EVAL_COMMANDS.items():
        parser = subparsers.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(parser)
        parser.set_defaults(handler=partial(run_eval_command, command, parser))


def eval_script_main(name: str, argv: Sequence[str] | None, description: str | None) -> int:
    """An ``eval/`` script: the ``name`` command's options parsed from ``argv``, then `run_eval_command`."""
    parser = ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    command = EVAL_COMMANDS[name]
    command.add_arguments(parser)
    return run_eval_command(command, parser, parser.parse_args(argv))


def run_eval_command(command: EvalCommand, parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``--score`` (no model) or a model run after the usage checks; returns the exit status."""
    if args.score is not None:
        if args.model:
            parser.error(f"--score re-scores {command.scored} without a model: drop --model")
        return cli_main(partial(_print_rescored, command, args))
    options = RunOptions.from_arguments(parser, args)
    command.check(parser, args)
    if args.local_rank is not None and "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(args.local_rank)
    return cli_main(partial(_run, command, args, options))


def cli_main(run: Callable[[], int]) -> int:
    """`comm.errors.run_command` for a command's body; other ranks name themselves in their error line."""
    rank = process_state().process_index
    return run_command(
        run,
        prefix="error" if rank == 0 else f"error (rank {rank})",
        interrupted="interrupted: run the same command again to resume from the predictions written",
    )


def _print_rescored(command: EvalCommand, args: argparse.Namespace) -> int:
    print_json(command.rescore(args))
    return 0


def _run(command: EvalCommand, args: argparse.Namespace, options: RunOptions) -> int:
    """Join the processes, seed, read the data, check its images, load the model, run, print the metrics."""
    from transformers import set_seed

    state = process_state()
    set_seed(options.seed)  # Python, NumPy and torch: two runs give the same predictions
    tasks = command.tasks(args)
    check_files_exist((task.image_path(item) for task in tasks for item in task.items), "image")  # before the model
    model, processor = load_model(options.model, options.device, options.dtype)
    metrics = command.evaluate(tasks, model, processor, options)
    print_metrics(metrics, command.title(args), options.output_dir / METRICS_FILE)
    state.wait_for_everyone()
    state.destroy_process_group()  # after a successful run; a failed one just exits
    return 0


def load_model(
    path: str | os.PathLike[str], device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
) -> tuple[CommForConditionalGeneration, CommProcessor]:
    """``(model, processor)`` in eval mode with `comm.loading.load_model_and_processor`.

    The device defaults to this process's GPU when CUDA is available (under a launcher, the one accelerate gives
    its local rank), else the CPU; the dtype to bf16 on GPUs that support it and float32 on CPU (``"auto"``).
    """
    from comm.loading import load_model_and_processor

    if device is None and torch.cuda.is_available():
        device = process_state().device
    if isinstance(dtype, str) and dtype.lower() == "auto":
        dtype = None
    return load_model_and_processor(path, device, dtype)


def print_metrics(metrics: dict[str, Any], title: str, path: str | os.PathLike[str]) -> None:
    """Print the metrics table and where the JSON was written, on rank 0."""
    if process_state().is_main_process:
        print(format_metrics(metrics, title))
        print(f"metrics written to {path}")


def print_json(obj: Any) -> None:
    """Print ``obj`` as indented JSON on rank 0 (what ``--score`` prints)."""
    if process_state().is_main_process:
        print(json.dumps(obj, indent=2, ensure_ascii=False))
