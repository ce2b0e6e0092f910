"""Run every ``benchmarks.bench_*`` module in a subprocess, gather the JSON lines in ``results.jsonl``, print a table.

The first line of ``results.jsonl`` is a header with the machine (CPU model, cores, load, RAM, GPU, torch and
transformers versions) and the command; then one line per benchmark: its own JSON line plus ``script``,
``seconds`` and ``returncode`` (a benchmark that printed no JSON line gets an ``error`` line instead).

    python -m benchmarks.run_all --quick              # every benchmark with --quick (< 10 min on 2 CPU cores)
    python -m benchmarks.run_all --only padding processor
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, machine_info, module_command

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results.jsonl"
BUDGET_S = 600.0
# Figures worth a column in the table besides the headline value, per benchmark.
DETAILS = {
    "batched_generation": ("batched_items_per_s", "sequential_items_per_s", "identical", "threads"),
    "caption_throughput": ("images_per_s_batch1", "images_per_s_batch16", "threads"),
    "pope_scoring": ("logits_items_per_s", "generate_items_per_s", "agreement_restricted", "threads"),
    "vision_merger": (
        "towers_s",
        "merger_s",
        "flops_percent",
        "merger_train_percent_of_towers",
        "pool_after_merge_vs_before.head_time_ratio",
    ),
    "train_memory": (
        "speedup_vs_naive",
        "summary.small.peak_step_mb",
        "summary.tiny.memory_saved_vs_naive",
        "summary.small.checkpointing_memory_vs_frozen",
        "summary.small.checkpointing_speed_vs_frozen",
    ),
    "processor": (
        "preprocess_images_per_s",
        "dataloader.workers_0.images_per_s",
        "dataloader.workers_2.images_per_s",
        "stage_ms_per_image",
    ),
    "padding": ("random.fraction", "group_by_length.fraction", "sorted_lower_bound", "length_tokens.median"),
    "labelled_logits": (
        "settings.fp32.loss_step_ratio",
        "settings.bf16.loss_step_ratio",
        "settings.bf16_checkpointing.training_step_ratio",
        "settings.bf16_checkpointing.loss_step_speedup",
    ),
    "train_gpu": ("mfu", "peak_memory_gib", "attn"),
    "generation_gpu": ("samples_per_s", "attn"),
}
MISSING = object()


def discover(only: Sequence[str] | None) -> list[Path]:
    """The benchmark scripts, sorted; with ``only``, those whose name contains one of the given words."""
    scripts = sorted(HERE.glob("bench_*.py"))
    if only:
        scripts = [s for s in scripts if any(word in s.stem for word in only)]
    return scripts


def accepts(script: Path, option: str) -> bool:
    """Whether ``script`` defines the command-line ``option``."""
    return f'"{option}"' in script.read_text()


def last_json_line(stdout: str) -> dict[str, Any] | None:
    """The last stdout line that is a JSON object with a ``benchmark`` key."""
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict) and "benchmark" in value:
            return value
    return None


def run_script(script: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Run one benchmark script; its JSON line with ``script``, ``seconds`` and ``returncode`` added."""
    command = module_command(script)
    if args.quick:
        command.append("--quick")
    if args.threads and accepts(script, "--threads"):
        command += ["--threads", str(args.threads)]
    print(f"[run_all] {' '.join(command[1:])}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, check=False, cwd=ROOT)
        stdout, stderr, returncode = completed.stdout, completed.stderr, completed.returncode
    except subprocess.TimeoutExpired as expired:
        stdout = expired.stdout.decode() if isinstance(expired.stdout, bytes) else expired.stdout or ""
        stderr = expired.stderr.decode() if isinstance(expired.stderr, bytes) else expired.stderr or ""
        returncode = -9
    seconds = time.perf_counter() - start
    result = last_json_line(stdout)
    if result is None:
        tail = (stderr or "").strip().splitlines()[-5:]
        reason = f"timed out after {args.timeout} s" if returncode == -9 else "printed no JSON line"
        result = {"benchmark": script.stem.removeprefix("bench_"), "error": reason, "stderr_tail": tail}
    result.update({"script": script.name, "seconds": round(seconds, 1), "returncode": returncode})
    if args.verbose and stderr:
        sys.stderr.write(stderr)
    return result


def lookup(result: dict[str, Any], path: str) -> Any:
    """``result``'s value at a dotted ``path`` (``"random.fraction"``), or `MISSING`."""
    value: Any = result
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            return MISSING
        value = value[key]
    return value


def short(value: Any, width: int = 70) -> str:
    """A compact one-line rendering of a JSON value."""
    if isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, (dict, list)):
        text = json.dumps(value, separators=(",", ":"))
    else:
        text = str(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def table(results: Sequence[dict[str, Any]]) -> str:
    """A markdown table of the results: benchmark, value, unit, bar, details, seconds, exit code."""
    rows = ["| benchmark | value | unit | bar | details | s | rc |", "|---|---|---|---|---|---|---|"]
    for result in results:
        name = result.get("benchmark", "?")
        if "skipped" in result:
            value, details = "skipped", result["skipped"]
        elif "error" in result:
            value, details = "ERROR", f"{result['error']}: {' / '.join(result.get('stderr_tail', []))}"
        else:
            value = short(result.get("value"))
            found = [(key, lookup(result, key)) for key in DETAILS.get(name, ())]
            details = "; ".join(f"{key}={short(value, 60)}" for key, value in found if value is not MISSING)
        bar = ""
        if "bar" in result:
            bar = f"{result['bar']} ({'met' if result.get('bar_met') else 'NOT met'})"
        rows.append(
            f"| {name} | {value} | {result.get('unit', '')} | {bar} | {details} | {result.get('seconds', '')} "
            f"| {result.get('returncode', '')} |"
        )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmarks, write results.jsonl, print the table; exit 1 when one failed."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
    parser.add_argument("--only", nargs="+", default=None, help="run the benchmarks whose name contains these words")
    parser.add_argument("--threads", type=int, default=1,
                        help="--threads passed to every benchmark that has it (default 1: the figures are ratios "
                        "measured on a shared machine; 0 passes nothing)")  # fmt: skip
    parser.add_argument("--timeout", type=int, default=480, help="seconds allowed per benchmark (default 480)")
    parser.add_argument("--output", type=Path, default=RESULTS, help="results file (overwritten)")
    parser.add_argument("--verbose", action="store_true", help="echo every benchmark's stderr")
    args = parser.parse_args(argv)
    scripts = discover(args.only)
    if not scripts:
        parser.error("no benchmark script matches")

    started = datetime.datetime.now(datetime.timezone.utc)
    header = {
        "header": True,
        "machine": machine_info(),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "started_utc": started.isoformat(timespec="seconds"),
        "cwd": os.getcwd(),
    }
    start = time.perf_counter()
    results = []
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with args.output.open("w") as out:
        out.write(json.dumps(header) + "\n")
        for script in scripts:
            result = run_script(script, args)
            results.append(result)
            out.write(json.dumps(result) + "\n")
            out.flush()
            print(f"[run_all] {script.name}: {result.get('seconds')} s, exit {result['returncode']}", file=sys.stderr)
    total = time.perf_counter() - start

    machine = header["machine"]
    print(
        f"Machine: {machine['cpu']}, {machine['cores_usable']} cores usable, load {machine['load_avg_1m']}, "
        f"{machine['ram_gib']} GiB RAM, GPU {machine['gpu'] or 'none'}, torch {machine['torch']}, "
        f"transformers {machine['transformers']}"
    )
    print(table(results))
    print(f"\nTotal: {total:.0f} s for {len(results)} benchmarks{' (--quick)' if args.quick else ''}; "
          f"results in {args.output}")  # fmt: skip
    if args.quick and total > BUDGET_S:
        print(f"warning: --quick took {total:.0f} s, over the {BUDGET_S:.0f} s budget", file=sys.stderr)
    failed = [r["script"] for r in results if r["returncode"] != 0 or "error" in r]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
