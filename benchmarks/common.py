"""Shared helpers of the benchmarks: one-JSON-line output, machine description, timing, tiny and random models."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from comm import CommConfig, CommForConditionalGeneration, CommProcessor

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = ROOT / "tests" / "fixtures" / "tokenizer-llama-family"

# LLaMA-2-7B / Vicuna-7B shapes (the paper's 7B LLM).
LLAMA_7B = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}


# ---------------------------------------------------------------------------------------------------------------
# Output and machine
# ---------------------------------------------------------------------------------------------------------------


def print_result(result: dict[str, Any]) -> None:
    """Print ``result`` as the benchmark's one JSON line on stdout (flushed: a parent process reads it)."""
    print(json.dumps(result), flush=True)


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send library chatter printed on stdout (DeepSpeed's accelerator notice...) to stderr for the duration."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """What the figures were measured on: CPU model and cores, load, RAM, GPU, library versions."""
    import transformers

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        info["ram_gib"] = round(pages / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        info["ram_gib"] = None
    return info


def module_command(script: str | Path) -> list[str]:
    """The command that runs benchmark ``script`` as a module of this package; run it with ``cwd=ROOT``."""
    return [sys.executable, "-m", f"{__package__}.{Path(script).stem}"]


def finish(result: dict[str, Any], quick: bool) -> int:
    """Print ``result`` with ``quick`` and `machine_info` appended as the one JSON line; returns exit code 0."""
    print_result({**result, "quick": quick, "machine": machine_info()})
    return 0


def skip_gpu(benchmark: str, reason: str, args: argparse.Namespace) -> int:
    """Print a GPU benchmark's skip line (exit code 0: nothing is wrong, there is nothing to measure here)."""
    print(f"{benchmark}: skipped: {reason}", file=sys.stderr)
    fields = {"benchmark": benchmark, "value": None, "unit": "samples/s", "skipped": reason, "attn": args.attn}
    return finish(fields, args.quick)


def gpu_device(benchmark: str, args: argparse.Namespace, parser: argparse.ArgumentParser) -> torch.device | None:
    """The device a GPU benchmark runs on (the CPU with ``--smoke-cpu``), or None once its skip line is printed."""
    if args.smoke_cpu:
        if args.attn != "sdpa":
            skip_gpu(benchmark, "flash-attention needs CUDA (--smoke-cpu runs with --attn sdpa)", args)
            return None
        return torch.device("cpu")
    if not torch.cuda.is_available():
        skip_gpu(benchmark, "no CUDA device", args)
        return None
    if args.attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        skip_gpu(benchmark, "flash-attn is not installed (pip install flash-attn)", args)
        return None
    return torch.device("cuda")


def set_threads(threads: int) -> int:
    """Use ``threads`` torch CPU threads (0 keeps torch's default); returns the number in use."""
    if threads > 0:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


# ---------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------


def synchronize(device: torch.device | str | None = None) -> None:
    """Wait for queued GPU work so wall-clock timings are complete (no-op on CPU)."""
    device = torch.device(device) if device is not None else None
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        torch.cuda.synchronize(device)


def time_repeats(fn: Callable[[], Any], repeats: int, warmup: int = 1, device: str | None = None) -> list[float]:
    """Wall seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones (GPU work waited for)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    """The median of ``values``."""
    return statistics.median(values)


def fastest(fn: Callable[[], T], repeats: int, device: torch.device | str | None = None) -> tuple[T, float]:
    """The result and the wall seconds of the fastest of ``repeats`` calls of ``fn`` (GPU work waited for)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    best: tuple[T, float] | None = None
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        seconds = time.perf_counter() - start
        if best is None or seconds < best[1]:
            best = (result, seconds)
    assert best is not None
    return best


class TimedProcessor:
    """A processor proxy that adds the time of each call (image preprocessing + tokenization) to ``seconds``."""

    def __init__(self, processor: Any):
        self.processor = processor
        self.seconds = 0.0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return self.processor(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start

    def __getattr__(self, name: str) -> Any:
        return getattr(self.processor, name)


def timed_method(owner: Any, name: str, totals: dict[str, float]) -> Callable[[], None]:
    """Wrap ``owner.name`` so its time adds to ``totals[name]``; returns a function restoring the original."""
    original = getattr(owner, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            totals[name] = totals.get(name, 0.0) + time.perf_counter() - start

    setattr(owner, name, timed)
    return lambda: delattr(owner, name)


class TokenCounter:
    """Wrap ``model.generate`` to record how many new tokens each call produced (to check the fixed length) and
    the seconds spent in it (GPU work waited for): generation alone, without preprocessing."""

    def __init__(self, model: Any):
        self.model = model
        self.original = model.generate
        self.new_tokens: list[int] = []
        self.seconds = 0.0
        model.generate = self  # generate_answers calls model.generate(**inputs, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        start = time.perf_counter()
        output = self.original(*args, **kwargs)
        synchronize(output.device)
        self.seconds += time.perf_counter() - start
        self.new_tokens.append(output.shape[1] - kwargs["input_ids"].shape[1])
        return output


# ---------------------------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------------------------


class PeakTensorMemory(TorchDispatchMode):
    """Within the block, the peak bytes of tensor storages that ops created there and that are still alive.

    The CPU counterpart of ``torch.cuda.max_memory_allocated`` measured from a reset inside the block: tensors
    that existed before (weights, optimizer state) are not counted, nor what the allocator keeps without a tensor
    (a glibc heap's RSS does). Counts every op's fresh outputs (aliases and in-place results are not new memory),
    autograd's saved tensors and gradients included; buffers a kernel frees before returning are not seen.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._alive: dict[int, weakref.ref] = {}

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._alive:
            return
        size = storage.nbytes()

        def freed(_: object, key: int = key, size: int = size) -> None:
            self.current -= size
            self._alive.pop(key, None)

        self._alive[key] = weakref.ref(storage, freed)
        self.current += size
        self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        output = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        outputs = output if isinstance(output, tuple) and len(returns) > 1 else (output,)
        for schema, value in zip(returns, outputs):
            if schema.alias_info is None:  # a view or an in-place/out= result aliases an existing tensor
                for leaf in tree_leaves(value):
                    if isinstance(leaf, torch.Tensor) and leaf.device.type != "meta":
                        self._track(leaf)
        return output


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------


def llama_tokenizer() -> PreTrainedTokenizerBase:
    """The tests' LLaMA-family SentencePiece tokenizer (32000 pieces), fast."""
    from transformers import LlamaTokenizer

    return LlamaTokenizer.from_pretrained(TOKENIZER_DIR)


def build_tiny_model(
    folder: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32, model_max_length: int | None = 256
) -> tuple[CommForConditionalGeneration, CommProcessor]:
    """The tests' tiny random COMM model (LLaMA tokenizer fixture, 32k vocabulary) built in ``folder``, eval mode.

    Built as a user would: random components saved with `save_random_components`, then `build_from_components`.
    Returns ``(model, processor)``.
    """
    from comm import build_from_components
    from comm.demo.tiny import save_random_components, tiny_config

    with stdout_to_stderr():  # save_pretrained may import DeepSpeed, which prints a notice on stdout
        torch.manual_seed(seed)
        components = save_random_components(folder, tiny_config(vocab_size=32000))
        model, processor = build_from_components(
            components["clip"],
            components["dino"],
            components["llm"],
            tokenizer=llama_tokenizer(),
            dtype=dtype,
            model_max_length=model_max_length,
            **tiny_config().tower_reading_fields(),
        )
    return model.eval(), processor


def initialize_sub_models(module: torch.nn.Module) -> None:
    """Run ``initialize_weights`` of every outermost transformers sub-model of ``module`` (towers, LLM), each alone.

    Called from the composite COMM model instead, transformers treats them as custom code and skips their
    model-specific re-inits (CLIP's scaled attention and MLP stds): alone, they get the init `from_config` gives.
    COMM's own models (`CommModel`) are looked into.
    """
    from transformers import PreTrainedModel

    for child in module.children():
        if isinstance(child, PreTrainedModel) and not child.is_custom_code():
            child.initialize_weights()
        else:
            initialize_sub_models(child)


def build_on_meta(
    config: CommConfig, device: torch.device | str, dtype: torch.dtype, seed: int = 0
) -> CommForConditionalGeneration:
    """A random-weight `CommForConditionalGeneration` of ``config``: built on the meta device, materialised on
    ``device`` with `to_empty` and initialised there by every sub-model's own ``_init_weights``.

    Parameters are made directly in ``dtype`` (no float32 copy, no slow CPU init of a 7B LLM); float32 buffers
    (RoPE inverse frequencies) stay float32 and are recomputed by the init, like position ids.
    """
    from comm import CommForConditionalGeneration

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = CommForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    model.to_empty(device=device)
    torch.manual_seed(seed)
    with torch.device(device):
        initialize_sub_models(model)
        model.initialize_weights()  # the modules between the towers and the LLM (sub-models are flagged done)
    model.tie_weights()
    model.freeze_towers()
    leftover = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if leftover:
        raise RuntimeError(f"tensors left on the meta device: {leftover[:5]}")
    return model


def count_parameters(module: torch.nn.Module, trainable: bool | None = None) -> int:
    """Number of parameters of ``module`` (only trainable ones, or only frozen ones, when asked)."""
    return sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)
