"""`CommTrainer` overrides private `transformers.Trainer` methods: each must still exist, take the same parameters,
be called by the Trainer, and (where the override replays part of it) still do what the override replays.

These fail loudly when a transformers upgrade renames or reshapes what the overrides stand in for."""

from __future__ import annotations

import inspect

import pytest
import transformers.trainer
from transformers import ProgressCallback, Trainer
from transformers.integrations import deepspeed as hf_deepspeed

from comm.training.trainer import CommTrainer, ProgressBarCallback

# Why each one is overridden: see its docstring in comm/training/trainer.py.
OVERRIDES = {
    "_get_train_sampler": "length-grouped batches from the lengths measured at tokenization",
    "_save": "checkpoints hold only the trained weights",
    "_save_optimizer_and_scheduler": "DeepSpeed checkpoints without the frozen parameters",
    "_load_from_checkpoint": "resume from the trained weights on top of the frozen ones",
    "_prepare_for_training": "resume a DeepSpeed checkpoint that lacks the frozen parameters",
    "_save_checkpoint": "write into .partial, rename to checkpoint-N when every process's part is there, then rotate",
    "_get_output_dir": "points the Trainer's checkpoint writing at the staging folder during a save",
}


def own_private_methods(cls: type) -> set[str]:
    """The single-underscore methods ``cls`` itself defines."""
    return {
        name
        for name, value in vars(cls).items()
        if callable(value) and name.startswith("_") and not name.startswith("__")
    }


def test_every_private_override_is_listed_here():
    assert own_private_methods(CommTrainer) == set(OVERRIDES)


@pytest.mark.parametrize("name", sorted(OVERRIDES))
def test_override_has_the_trainer_methods_parameters(name):
    original = getattr(Trainer, name, None)
    assert original is not None, f"transformers.Trainer has no {name} any more ({OVERRIDES[name]})"
    expected = list(inspect.signature(original).parameters)
    assert list(inspect.signature(getattr(CommTrainer, name)).parameters) == expected, name


@pytest.mark.parametrize("name", sorted(OVERRIDES))
def test_the_trainer_still_uses_the_overridden_method(name):
    # a call, or a reference handed on (the train dataloader gets ``sampler_fn=self._get_train_sampler``)
    assert f"self.{name}" in inspect.getsource(transformers.trainer), f"the Trainer no longer uses {name}"


def test_deepspeed_resume_replays_what_prepare_for_training_does_on_resume():
    # CommTrainer._prepare_for_training calls the Trainer's with no checkpoint, then loads the DeepSpeed checkpoint
    # non-strictly and the optimizer, scheduler and scaler states itself: the Trainer's resume must be those steps.
    source = inspect.getsource(Trainer._prepare_for_training)
    resume = source[source.index("if resume_from_checkpoint is not None:") :]
    for step in ("deepspeed_load_checkpoint(", "self._load_optimizer_and_scheduler(", "self._load_scaler("):
        assert step in resume, step


def test_the_trainer_writes_a_checkpoint_under_get_output_dir_and_rotates_there():
    # CommTrainer._save_checkpoint makes _get_output_dir return the staging folder while the Trainer's
    # _save_checkpoint runs: every file of the checkpoint must go under that folder, and the Trainer's own rotation
    # (which would delete the last complete checkpoint before the new one is complete) must only see that folder.
    source = inspect.getsource(Trainer._save_checkpoint)
    uses = [line.strip() for line in source.splitlines() if "run_dir" in line]
    assert uses == [
        "run_dir = self._get_output_dir(trial=trial)",
        "output_dir = os.path.join(run_dir, checkpoint_folder)",
        "best_checkpoint_dir = os.path.join(run_dir, best_checkpoint_folder)",  # CommTrainer maps it back
        "output_dir=run_dir,",  # rotate_checkpoints(...)
    ], uses
    for writer in ("self.save_model(output_dir", "self._save_optimizer_and_scheduler(output_dir)",
                   "self._save_scaler(output_dir)", "self._save_rng_state(output_dir)",
                   "os.path.join(output_dir, TRAINER_STATE_NAME)"):  # fmt: skip
        assert writer in source, writer
    assert "self.args.output_dir" not in source


def test_the_deepspeed_checkpoint_call_takes_exclude_frozen_parameters():
    deepspeed = pytest.importorskip("deepspeed")
    parameters = inspect.signature(deepspeed.DeepSpeedEngine.save_checkpoint).parameters
    assert "exclude_frozen_parameters" in parameters


def test_private_transformers_state_the_training_code_reads_is_there():
    # zero3_init_disabled clears the reference by which transformers decides to build models under zero.Init.
    assert hasattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref")
    # ProgressBarCallback writes its postfix on the bar ProgressCallback keeps.
    assert ProgressCallback().training_bar is None and issubclass(ProgressBarCallback, ProgressCallback)
