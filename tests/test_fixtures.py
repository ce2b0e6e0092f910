"""The test fixtures are loaded the way their READMEs say."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_README = REPO / "tests" / "fixtures" / "tokenizer-llama-family" / "README.md"


def test_llama_tokenizer_readme_loads_all_32000_pieces(monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", TOKENIZER_README.read_text(), flags=re.DOTALL)
    assert len(blocks) == 1, f"{TOKENIZER_README} should show exactly one Python block of how to load it"
    monkeypatch.chdir(REPO)
    namespace: dict = {}
    exec(compile(blocks[0], str(TOKENIZER_README), "exec"), namespace)
    tokenizer = namespace["tokenizer"]
    assert len(tokenizer) == 32000
    assert tokenizer.convert_ids_to_tokens(tokenizer("Hello world", add_special_tokens=False)["input_ids"]) == [
        "\u2581Hello",
        "\u2581world",
    ]


def test_vocab_file_construction_is_what_the_readme_warns_about():
    from transformers import LlamaTokenizer

    tokenizer = LlamaTokenizer(vocab_file=str(TOKENIZER_README.with_name("tokenizer.model")))
    assert len(tokenizer) == 3, "LlamaTokenizer(vocab_file=...) changed: update the fixture README"
