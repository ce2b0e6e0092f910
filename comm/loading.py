"""Loading a saved COMM model and its processor: the folder checked first, then the device and dtype chosen."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from comm.io import read_json
from comm.model.modeling import CommForConditionalGeneration
from comm.processing import CommProcessor
from comm.processor_folder import HUB_ID, PROCESSOR_CONFIG, missing_image_processors

MODEL_CONFIG = "config.json"
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def default_device() -> torch.device:
    """CUDA when available, else CPU.

    >>> default_device()  # on a machine without a GPU
    device(type='cpu')
    """
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a torch device (`default_device` for None); asking for CUDA where there is none is an error."""
    resolved = torch.device(device) if device is not None else default_device()
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {resolved} asked for, but CUDA is not available here (use device='cpu')")
    return resolved


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """``dtype`` as a torch dtype; by default bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU.

    >>> resolve_dtype("bf16", torch.device("cpu"))
    torch.bfloat16
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        key = dtype.lower().removeprefix("torch.")
        if key not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}: use one of {', '.join(sorted(_DTYPES))}")
        return _DTYPES[key]
    if dtype is not None:
        raise TypeError(f"dtype must be a torch.dtype, a string or None, got {type(dtype).__name__}")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _missing_image_processors(path: Path) -> list[str]:
    """The image processors neither in ``processor_config.json`` nor in an older folder's subfolders."""
    settings = read_json(path / PROCESSOR_CONFIG)
    if not isinstance(settings, dict):
        raise ValueError(f"{path / PROCESSOR_CONFIG} is not a JSON object")
    return [f"{attribute} in {PROCESSOR_CONFIG}" for attribute in missing_image_processors(path, settings)]


def check_model_folder(folder: str | Path, require_weights: bool = True) -> Path:
    """Raise a clear error naming ``folder`` and what it lacks unless it holds a complete COMM model + processor.

    Only small files are read: nothing here loads weights.

    >>> check_model_folder("runs/stage2/final")  # doctest: +SKIP
    PosixPath('runs/stage2/final')
    """
    path = Path(folder)
    if not path.exists():
        raise FileNotFoundError(f"model folder not found: {path}")
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is a file, not a model folder")
    missing = [name for name in (MODEL_CONFIG, PROCESSOR_CONFIG) if not (path / name).is_file()]
    if PROCESSOR_CONFIG not in missing:
        missing += _missing_image_processors(path)
    if require_weights and not any((path / name).is_file() for name in WEIGHT_FILES):
        missing.append(" or ".join(WEIGHT_FILES[:2]) + " (the weights)")
    if missing:
        hint = ""
        if PROCESSOR_CONFIG in missing and MODEL_CONFIG not in missing:
            hint = " (save the processor next to the model: processor.save_pretrained(folder))"
        raise FileNotFoundError(f"{path} is not a complete COMM model folder: missing {', '.join(missing)}{hint}")
    config = read_json(path / MODEL_CONFIG)
    if not isinstance(config, dict):
        raise ValueError(f"{path / MODEL_CONFIG} is not a valid model config (not a JSON object)")
    model_type = config.get("model_type")
    if model_type != "comm":
        raise ValueError(f"{path / MODEL_CONFIG} has model_type {model_type!r}, expected 'comm'")
    return path


def resolve_model_folder(path_or_name: str | Path) -> Path:
    """A local folder as is; a Hugging Face Hub id (``owner/name``, not a local path) downloaded to the cache.

    The hub repo's small files are fetched and checked before its weights are downloaded.

    >>> resolve_model_folder("runs/stage2/final")  # doctest: +SKIP
    PosixPath('runs/stage2/final')
    """
    path = Path(path_or_name)
    name = str(path_or_name)
    if path.exists() or not HUB_ID.match(name):
        return check_model_folder(path)
    from huggingface_hub import snapshot_download

    def download(**kwargs: Any) -> Path:
        try:
            return Path(snapshot_download(name, **kwargs))
        except Exception as error:  # network, auth, offline mode, unknown repo: one clear message
            raise FileNotFoundError(
                f"model folder not found: {name} (no such local folder, and fetching it from the Hugging Face Hub "
                f"failed: {type(error).__name__}: {error})"
            ) from None

    check_model_folder(download(allow_patterns=["*.json", "*.model", "*.txt"]), require_weights=False)
    return check_model_folder(download())


def load_model_and_processor(
    path_or_name: str | Path,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    model_max_length: int | None = None,
    **model_kwargs: Any,
) -> tuple[CommForConditionalGeneration, CommProcessor]:
    """The model (in eval mode, on ``device``, in ``dtype``) and the processor of one COMM folder or hub id.

    Everything that can be checked cheaply is checked before any weight is read: the folder (``config.json``,
    ``processor_config.json``, both image processors, the weights), the device and the dtype. The device defaults
    to CUDA when available, else CPU; the dtype to bf16 on GPUs that support it (fp16 on older GPUs) and float32
    on CPU. ``model_max_length`` replaces the processor's saved limit; ``model_kwargs`` go to
    `CommForConditionalGeneration.from_pretrained` (``attn_implementation``...).

    >>> model, processor = load_model_and_processor("runs/stage2/final", device="cpu")  # doctest: +SKIP
    """
    folder = resolve_model_folder(path_or_name)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    overrides = {} if model_max_length is None else {"model_max_length": model_max_length}
    processor = CommProcessor.from_pretrained(folder, **overrides)
    model = CommForConditionalGeneration.from_pretrained(folder, dtype=torch_dtype, **model_kwargs)
    return model.to(torch_device).eval(), processor
