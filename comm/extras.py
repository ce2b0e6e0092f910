"""Optional extras (deepspeed, flash-attn, eval scorers, gradio): checked where used, never imported on load."""

from __future__ import annotations

import importlib.util

# import name -> (pip extra, what needs it)
EXTRAS: dict[str, tuple[str, str]] = {
    "deepspeed": ("deepspeed", "training with --deepspeed"),
    "flash_attn": ("flash-attn", "attn_implementation='flash_attention_2'"),
    "pycocoevalcap": ("eval", "caption scoring (BLEU, METEOR, ROUGE-L, CIDEr)"),
    "pycocotools": ("eval", "COCO annotation files"),
    "gradio": ("web", "the web demo (comm web)"),
    "selenium": ("test", "driving a browser (comm.web.browser: the browser test and the screenshot)"),
}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


def is_installed(module: str) -> bool:
    """True when ``module`` can be imported (without importing it)."""
    return importlib.util.find_spec(module) is not None


def require_extra(module: str, purpose: str | None = None) -> None:
    """Raise `MissingExtraError` naming the pip extra when ``module`` is not installed."""
    if is_installed(module):
        return
    extra, default_purpose = EXTRAS.get(module, (module, "this feature"))
    raise MissingExtraError(
        f"{purpose or default_purpose} needs {module}, which is not installed: pip install 'comm[{extra}]'"
    )
