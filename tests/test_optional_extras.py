"""The main path (CLI, demo, training, evaluation, pipeline) imports with the optional extras missing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from comm.errors import UserError
from comm.evaluation.caption_metrics import python_tokenize, score_captions

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("deepspeed", "flash_attn", "timm", "torchvision", "pycocotools", "pycocoevalcap", "gradio", "selenium")

# A meta-path finder that makes the optional extras look uninstalled, as on a fresh `pip install -e .` machine.
BLOCKER = textwrap.dedent(
    f"""
    import sys
    BLOCKED = {BLOCKED!r}

    class _Hidden:
        # Wraps a meta-path finder so that it never finds the blocked packages: find_spec() then answers None and
        # import raises ModuleNotFoundError, exactly as when they are not installed.
        def __init__(self, inner):
            self.inner = inner

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                return None
            return self.inner.find_spec(name, path, target)

        def __getattr__(self, attribute):
            return getattr(self.inner, attribute)

    sys.meta_path[:] = [_Hidden(finder) for finder in sys.meta_path]
    """
)


def run_blocked(code: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter where the optional extras cannot be imported."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )


def test_every_module_on_the_main_path_imports_without_the_extras():
    result = run_blocked(
        """
        import importlib, pkgutil, runpy, json
        import comm
        names = [m.name for m in pkgutil.walk_packages(comm.__path__, "comm.")]
        for name in names:
            importlib.import_module(name)
        for script in ("train/train.py", "eval/eval_rec.py", "eval/eval_pope.py", "eval/eval_caption.py"):
            runpy.run_path(script, run_name="not_main")
        import importlib.util
        assert importlib.util.find_spec("deepspeed") is None
        print(json.dumps(names))
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    imported = json.loads(result.stdout.strip().splitlines()[-1])
    for name in ("comm.cli", "comm.demo.run", "comm.training.train", "comm.training.trainer", "comm.pipeline"):
        assert name in imported


def test_a_missing_extra_is_one_line_naming_it(tmp_path):
    config = tmp_path / "zero2.json"
    config.write_text("{}")
    result = run_blocked(
        """
        import sys
        from comm.extras import MissingExtraError
        from comm.training.arguments import CommTrainingArguments
        try:
            CommTrainingArguments(output_dir=sys.argv[1], deepspeed=sys.argv[2])
        except MissingExtraError as error:
            print(error)
        """,
        str(tmp_path / "out"),
        str(config),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    message = result.stdout.strip()
    assert "\n" not in message and "pip install 'comm[deepspeed]'" in message and "--deepspeed" in message


def test_python_tokenization_needs_no_java_and_skips_meteor(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)  # as on a machine without Java
    references = {1: ["A large red circle."], 2: ["A small blue square and a large green triangle."]}
    scores = score_captions({1: "A large red circle.", 2: "A small blue square."}, references, tokenizer="python")
    assert scores["METEOR"] is None and "Java" in scores["skipped"]["METEOR"]
    assert scores["tokenizer"] == "python" and 0 < scores["CIDEr"] and 0 < scores["ROUGE-L"] <= 1
    with pytest.raises(UserError, match="--tokenizer python"):
        score_captions({1: "a"}, {1: ["a"]}, tokenizer="ptb")


@pytest.mark.skipif(not __import__("shutil").which("java"), reason="the PTB tokenizer needs Java")
def test_python_tokenization_matches_ptb_on_plain_captions():
    from comm.evaluation.caption_metrics import _ptb_tokenize

    captions = [
        "A large green square, a small purple square and a small red triangle.",
        "Two men don't like it's black-and-white dog...",
        "A woman's bag, on a 3.5 m table; ok!",
        'A DOG -- running "fast"?',
    ]
    ptb = _ptb_tokenize({str(i): [{"caption": c}] for i, c in enumerate(captions)})
    assert [ptb[str(i)][0] for i in range(len(captions))] == [python_tokenize(c) for c in captions]
