"""Evaluation as tasks: REC (`rec`), POPE (`pope`) and captioning (`caption`) each define, as a `task.EvaluationTask`,
how items load, how prompts are made, how answers parse and how records score; `runner` runs any task (batched,
sharded over processes, resumable); `commands` holds ``comm eval rec|pope|caption`` and the ``eval/`` scripts."""
