"""``comm data check``: read a training mixture exactly as `comm-train` would, without a model, and report on it.

It takes comm-train's own model-source and data options (a processor is all it needs: a COMM folder's, or one
made from the tower and LLM configs and tokenizer, no weights read) and prints the records per file and in the
mixture, the bad records by kind with the first few file:line examples, missing images, the token lengths after
image expansion against ``--model_max_length``, the share of tokens that carry the loss and the steps per epoch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np

from comm.build import build_processor, components_config_and_tokenizer
from comm.data import IssueKind, IssueLog, SupervisedDataset, build_dataset, parse_data_specs
from comm.errors import UserError
from comm.processing import CommProcessor
from comm.training.arguments import DataArguments, ModelArguments

PERCENTILES = (50, 90, 99)


@dataclass
class CheckArguments:
    """What the report needs beyond the data: the run's batch and seeds, and its form."""

    global_batch_size: int = field(
        default=64, metadata={"help": "Samples per optimizer step over all GPUs (per device x GPUs x accumulation)."}
    )
    seed: int = field(default=42, metadata={"help": "The training run's --seed (the mixture draw uses it)."})
    data_seed: int | None = field(default=None, metadata={"help": "The training run's --data_seed, if it sets one."})
    examples: int = field(default=3, metadata={"help": "Bad records spelled out per kind."})
    json: bool = field(default=False, metadata={"help": "Print the report as JSON instead of text."})

    def validate(self) -> None:
        """Raise ValueError naming the argument when a value is out of range."""
        if self.global_batch_size < 1:
            raise ValueError(f"--global_batch_size must be >= 1, got {self.global_batch_size}")
        if self.examples < 0:
            raise ValueError(f"--examples must be >= 0, got {self.examples}")


# The options of ``comm data check``, in the order `check_data` takes them: comm-train's model source and data,
# then the report's own.
CHECK_ARGUMENTS = (ModelArguments, DataArguments, CheckArguments)


def load_processor(model_args: ModelArguments, data_args: DataArguments) -> CommProcessor:
    """The processor training would use: a COMM folder's, or one of ``--clip --dino --llm`` (configs and
    tokenizer only)."""
    if model_args.model_name_or_path:
        return CommProcessor.from_pretrained(model_args.model_name_or_path, model_max_length=data_args.model_max_length)
    config, tokenizer = components_config_and_tokenizer(
        model_args.clip, model_args.dino, model_args.llm, model_args.tokenizer, **model_args.config_fields()
    )
    return build_processor(
        tokenizer, config, model_args.clip, model_args.dino, model_max_length=data_args.model_max_length
    )


def data_report(
    dataset: SupervisedDataset, issues: IssueLog, model_max_length: int, global_batch_size: int, examples: int = 3
) -> dict:
    """What ``comm data check`` prints, as a JSON-ready dict (see the module docstring)."""
    summary = issues.summary()
    bad_by_kind = {}
    for kind, count in sorted(summary["skipped_by_kind"].items()):
        found = [issue for issue in issues.issues if issue.kind.value == kind]
        bad_by_kind[kind] = {"count": count, "examples": [str(issue) for issue in found[:examples]]}
    missing = {issue.message for issue in issues.issues if issue.kind is IssueKind.MISSING_IMAGE}
    lengths = np.asarray(dataset.lengths, dtype=np.int64)
    labelled = sum(
        end - start for position in range(len(dataset)) for start, end in dataset.encoded(position).target_ranges
    )
    tokens: dict = {"model_max_length": model_max_length}
    if len(lengths):
        tokens.update(
            {
                "min": int(lengths.min()),
                **{f"p{p}": int(np.percentile(lengths, p)) for p in PERCENTILES},
                "max": int(lengths.max()),
                "mean": round(float(lengths.mean()), 1),
                "total": int(lengths.sum()),
                "loss_share": round(labelled / int(lengths.sum()), 4),
            }
        )
    return {
        "files": summary["files"],
        "records": summary["samples_loaded"],
        "valid": summary["samples_kept"],
        "bad": summary["samples_skipped"],
        "samples_per_epoch": len(dataset),
        "bad_by_kind": bad_by_kind,
        "missing_image_files": len(missing),
        "tokens": tokens,
        "global_batch_size": global_batch_size,
        "steps_per_epoch": math.ceil(len(dataset) / global_batch_size),
    }


def format_report(report: dict, ratios: dict[str, float]) -> str:
    """`data_report` as text."""
    width = max([len(name) for name in report["files"]] + [4])
    lines = [f"{'file':<{width}}  {'ratio':>5}  {'records':>8}  {'valid':>8}  {'bad':>6}  {'in mixture':>10}"]
    for name, counts in report["files"].items():
        lines.append(
            f"{name:<{width}}  {ratios.get(name, 1.0):>5g}  {counts['loaded']:>8}  {counts['kept']:>8}  "
            f"{counts['skipped']:>6}  {counts['used']:>10}"
        )
    lines.append(
        f"{'total':<{width}}  {'':>5}  {report['records']:>8}  {report['valid']:>8}  {report['bad']:>6}  "
        f"{report['samples_per_epoch']:>10}"
    )
    lines.append(f"bad records: {report['bad']}" + (":" if report["bad"] else ""))
    for kind, found in report["bad_by_kind"].items():
        lines.append(f"  {kind}: {found['count']}")
        lines += [f"    - {example}" for example in found["examples"]]
    lines.append(f"missing image files: {report['missing_image_files']}")
    tokens = report["tokens"]
    limit = tokens["model_max_length"]
    if "max" in tokens:
        spread = ", ".join(f"p{p} {tokens[f'p{p}']}" for p in PERCENTILES)
        lines += [
            f"tokens per sample (image tokens included) against --model_max_length {limit}: min {tokens['min']}, "
            f"{spread}, max {tokens['max']} ({tokens['max'] / limit:.0%} of the limit), mean {tokens['mean']}",
            f"loss on {tokens['loss_share']:.1%} of the tokens (the assistant replies; image, system prompt and "
            "questions carry none)",
        ]
    lines.append(
        f"steps per epoch at a global batch of {report['global_batch_size']}: {report['steps_per_epoch']} "
        f"({report['samples_per_epoch']} samples)"
    )
    return "\n".join(lines)


def check_data(model_args: ModelArguments, data_args: DataArguments, check_args: CheckArguments) -> dict:
    """Run ``comm data check``: print the report and return it; UserError when nothing would train."""
    model_args.validate()
    data_args.validate()
    check_args.validate()
    specs = parse_data_specs(data_args.data)
    processor = load_processor(model_args, data_args)
    issues = IssueLog(strict=data_args.strict)
    dataset = build_dataset(
        specs,
        processor,
        issues,
        seed=check_args.data_seed if check_args.data_seed is not None else check_args.seed,
        image_folder=data_args.image_folder,
        model_max_length=data_args.model_max_length,
        verify_images=data_args.verify_images,
    )
    report = data_report(dataset, issues, data_args.model_max_length, check_args.global_batch_size, check_args.examples)
    if check_args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report, {str(spec.path): spec.ratio for spec in specs}))
    if len(dataset) == 0:
        raise UserError("no sample would train: every record is bad (see the report above)")
    return report
