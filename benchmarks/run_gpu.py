"""Every GPU figure in one command: training (1.3B: amp / bf16 weights, with and without activation checkpointing, and
each other lever; 7B with LoRA), 7B REC generation at batch 1 and 32 (today's path and the fast one, with a
profile), POPE logits mode at 7B, and the data-loading rate that sizes the DataLoader workers.

Each run is a benchmark module in its own subprocess; its JSON line is printed as it finishes (with ``run``,
``seconds`` and ``returncode`` added) and written to ``benchmarks/results_gpu.jsonl`` (a machine header first);
then a markdown table and the issue's bars. The most wanted figures run first, and once ``--budget-s`` (default
480: 8 minutes) is spent the remaining runs are listed as not run. Random weights, nothing downloaded.

    python -m benchmarks.run_gpu                  # one H100/H200: about 8 minutes
    python -m benchmarks.run_gpu --only generation train_amp
    python -m benchmarks.run_gpu --smoke-cpu      # the same runs on tiny shapes on the CPU (a check, no figure)
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, machine_info
from benchmarks.run_all import MISSING, last_json_line, lookup, short

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results_gpu.jsonl"
BUDGET_S = 480.0
# The bars on one H100/H200.
MFU_BAR = 0.40
REC_BATCH32_BAR = 30.0  # samples/s, 7B, batch 32
BATCH1_MS_BAR = 25.0  # ms per new token, 7B, batch 1


@dataclass(frozen=True)
class Run:
    """One benchmark invocation: its name, module, arguments on the GPU and under ``--smoke-cpu``, table columns."""

    name: str
    module: str
    args: tuple[str, ...]
    smoke_args: tuple[str, ...]
    details: tuple[str, ...] = field(default=())


TRAIN_DETAILS = ("mfu", "mfu_head_labelled", "peak_memory_gib", "step_s")
GENERATION_DETAILS = (
    "samples_per_s",
    "ms_per_new_token",
    "fast_vs_today",
    "runs.today.32.prefill_ms_per_call",
    "runs.today.32.decode_ms_per_step",
    "runs.fast.32.decode_ms_per_step",
    "peak_memory_gib",
)
# Smoke runs: the same options on tiny shapes, one step or a few tokens, one thread (a loaded 2-core machine
# otherwise thrashes); the compiled run uses the eager backend (no C++ toolchain needed) and the data-loading run
# a few images without workers.
SMOKE_TRAIN = ("--smoke-cpu", "--steps", "1", "--warmup", "1", "--threads", "1")


def train_run(name: str, *args: str) -> Run:
    """A `bench_train_gpu` run with ``args``; its smoke run adds `SMOKE_TRAIN` (and the eager backend to compile)."""
    smoke = (*args, *SMOKE_TRAIN, *(("--compile-backend", "eager") if "--compile" in args else ()))
    smoke = tuple("8" if previous == "--lora" else arg for previous, arg in zip(("", *smoke), smoke))
    return Run(name, "bench_train_gpu", args, smoke, TRAIN_DETAILS)


RUNS = (
    Run("generation_7b", "bench_generation_gpu", ("--profile",),
        ("--profile", "--smoke-cpu", "--batch-sizes", "1", "4", "--items", "8", "--new-tokens", "4", "--threads", "1"),
        GENERATION_DETAILS),
    train_run("train_amp", "--precision", "amp"),
    train_run("train_amp_full_logits", "--precision", "amp", "--loss", "full"),
    train_run("train_bf16", "--precision", "bf16"),
    train_run("train_amp_checkpointing", "--precision", "amp", "--activation-checkpointing"),
    train_run("train_bf16_checkpointing", "--precision", "bf16", "--activation-checkpointing"),
    train_run("train_amp_fused_adamw", "--precision", "amp", "--optimizer", "fused"),
    train_run("train_7b_lora_bf16", "--llm", "7b", "--lora", "128", "--precision", "bf16"),
    Run("pope_7b", "bench_pope_scoring", ("--real-size", "--batch-size", "32", "--items", "64"),
        ("--smoke-cpu", "--batch-size", "4", "--items", "8", "--max-new-tokens", "3", "--threads", "1"),
        ("logits_items_per_s", "generate_items_per_s", "agreement_restricted", "peak_memory_gib")),
    train_run("train_amp_compiled", "--precision", "amp", "--compile"),
    train_run("train_amp_flash_attn", "--precision", "amp", "--attn", "flash_attention_2"),
    Run("data_loading", "bench_processor", ("--workers", "0", "4"),
        ("--images", "8", "--batch-size", "4", "--workers", "0", "--repeats", "1"),
        ("preprocess_images_per_s", "dataloader.workers_0.images_per_s", "dataloader.workers_4.images_per_s")),
)  # fmt: skip


def command(run: Run, smoke: bool) -> list[str]:
    """The subprocess command of ``run`` (``--quick`` always: one GPU session has minutes)."""
    return [sys.executable, "-m", f"{__package__}.{run.module}", "--quick", *(run.smoke_args if smoke else run.args)]


def execute(run: Run, smoke: bool, timeout: float) -> dict[str, Any]:
    """Run one benchmark; its JSON line with ``run``, ``seconds`` and ``returncode`` added (or an ``error`` line)."""
    cmd = command(run, smoke)
    print(f"[run_gpu] {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, cwd=ROOT)
        stdout, stderr, returncode = done.stdout, done.stderr, done.returncode
    except subprocess.TimeoutExpired as expired:
        stdout = expired.stdout.decode() if isinstance(expired.stdout, bytes) else expired.stdout or ""
        stderr = expired.stderr.decode() if isinstance(expired.stderr, bytes) else expired.stderr or ""
        returncode = -9
    result = last_json_line(stdout)
    if result is None:
        reason = f"timed out after {timeout:.0f} s" if returncode == -9 else "printed no JSON line"
        result = {"benchmark": run.module, "error": reason, "stderr_tail": (stderr or "").strip().splitlines()[-5:]}
    elif returncode != 0:
        result["stderr_tail"] = (stderr or "").strip().splitlines()[-5:]
    result.update({"run": run.name, "seconds": round(time.perf_counter() - start, 1), "returncode": returncode})
    result.pop("machine", None)  # once, in the header
    return result


def details(result: dict[str, Any], keys: Sequence[str]) -> str:
    """The figures of ``keys`` present in ``result``, as ``key=value; ...``."""
    found = [(key, lookup(result, key)) for key in keys]
    return "; ".join(f"{key}={short(value, 60)}" for key, value in found if value is not MISSING)


def table(runs: Sequence[Run], results: dict[str, dict[str, Any]]) -> str:
    """A markdown table: run, value, unit, details, seconds, status."""
    rows = ["| run | value | unit | details | s | status |", "|---|---|---|---|---|---|"]
    for run in runs:
        result = results.get(run.name)
        if result is None:
            rows.append(f"| {run.name} | not run | | over the time budget | | |")
            continue
        if "skipped" in result:
            value, info = "skipped", result["skipped"]
        elif "error" in result:
            value, info = "ERROR", f"{result['error']}: {' / '.join(result.get('stderr_tail', []))}"
        else:
            value, info = short(result.get("value")), details(result, run.details)
        status = "ok" if result.get("returncode") == 0 and "error" not in result else f"exit {result.get('returncode')}"
        rows.append(f"| {run.name} | {value} | {result.get('unit', '')} | {info} | {result.get('seconds', '')} "
                    f"| {status} |")  # fmt: skip
    return "\n".join(rows)


def bars(results: dict[str, dict[str, Any]]) -> list[str]:
    """The issue's bars against what was measured, and the DataLoader workers the training rate needs."""
    lines = []
    trains = {name: r for name, r in results.items() if name.startswith("train_") and r.get("mfu") is not None}
    one_b = {name: r for name, r in trains.items() if r.get("llm") == "1b"}
    if one_b:
        name, best = max(one_b.items(), key=lambda item: item[1]["mfu"])
        met = "met" if best["mfu"] >= MFU_BAR else "NOT met"
        lines.append(f"- training MFU >= {MFU_BAR:.0%} at 1.3B: best {best['mfu']:.1%} ({name}): {met}")
    generation = results.get("generation_7b", {})
    fast = lookup(generation, "samples_per_s.fast.32")
    if fast is not MISSING and fast is not None:
        met = "met" if fast >= REC_BATCH32_BAR else "NOT met"
        lines.append(f"- 7B REC at batch 32 >= {REC_BATCH32_BAR:g} samples/s: {fast:g} (fast path): {met}")
    per_token = lookup(generation, "ms_per_new_token.fast.1")
    if per_token is not MISSING and per_token is not None:
        met = "met" if per_token <= BATCH1_MS_BAR else "NOT met"
        lines.append(f"- 7B batch 1 <= {BATCH1_MS_BAR:g} ms per new token: {per_token:g} (fast path): {met}")
    rate = lookup(results.get("data_loading", {}), "dataloader.workers_0.images_per_s")
    if one_b and rate is not MISSING and rate:
        fastest_rate = max(r["value"] for r in one_b.values())
        lines.append(
            f"- DataLoader workers per GPU for {fastest_rate:g} samples/s at {rate:g} images/s per process: "
            f">= {math.ceil(fastest_rate / rate)} (one core each)"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Run the GPU benchmarks within the budget, write results_gpu.jsonl, print the table and the bars."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke-cpu", action="store_true", help="tiny shapes on the CPU: a check of every run")
    parser.add_argument("--only", nargs="+", default=None, help="runs whose name contains one of these words")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="start no run after this many seconds")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds allowed per run (default 300)")
    parser.add_argument("--output", type=Path, default=RESULTS, help="results file (overwritten)")
    args = parser.parse_args(argv)
    runs = [run for run in RUNS if not args.only or any(word in run.name for word in args.only)]
    if not runs:
        parser.error("no run matches --only")

    header = {
        "header": True,
        "machine": machine_info(),
        "command": " ".join(["python -m benchmarks.run_gpu", *(argv if argv is not None else sys.argv[1:])]),
        "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    start = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with args.output.open("w") as out:
        out.write(json.dumps(header) + "\n")
        for run in runs:
            elapsed = time.perf_counter() - start
            if elapsed > args.budget_s:
                print(f"[run_gpu] {run.name}: not run, {elapsed:.0f} s spent of {args.budget_s:.0f}", file=sys.stderr)
                continue
            result = execute(run, args.smoke_cpu, args.timeout)
            results[run.name] = result
            line = json.dumps(result)
            out.write(line + "\n")
            out.flush()
            print(line, flush=True)
    total = time.perf_counter() - start

    machine = header["machine"]
    smoke = " (smoke check: tiny shapes, no figure)" if args.smoke_cpu else ""
    print(f"\nMachine: {machine['gpu'] or 'no GPU'}, torch {machine['torch']}, transformers {machine['transformers']}, "
          f"{machine['cpu']} x {machine['cores_usable']}{smoke}")  # fmt: skip
    print(table(runs, results))
    if args.smoke_cpu:
        print("- bars: not judged (smoke check)")
    for line in [] if args.smoke_cpu else bars(results):
        print(line)
    print(f"\nTotal: {total:.0f} s for {len(results)} of {len(runs)} runs; results in {args.output}")
    failed = [name for name, r in results.items() if r["returncode"] != 0 or "error" in r]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed or len(results) < len(runs) else 0


if __name__ == "__main__":
    raise SystemExit(main())
