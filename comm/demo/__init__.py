"""The self-contained demo: a generated grounding world of coloured shapes and an in-process tokenizer."""
