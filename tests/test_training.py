"""Training: real DeepSpeed jobs on CPU (ZeRO-2 stage 1 -> stage 2, a rank killed in a save, ZeRO-3), resume,
projector-only, LoRA, configs."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import single_torch_thread
from PIL import Image, ImageDraw
from transformers import AutoTokenizer, TrainerCallback, set_seed

from comm import CommForConditionalGeneration, CommProcessor, build_from_components
from comm.data import DataError
from comm.demo.tiny import save_random_components, tiny_config
from comm.demo.tokenizer import train_demo_tokenizer
from comm.training.arguments import parse_arguments
from comm.training.checkpoints import COMPLETE, FAULT_ENV, checkpoint_problem
from comm.training.train import TrainResult, train
from comm.training.trainer import TRAINABLE_WEIGHTS

REPO = Path(__file__).resolve().parents[1]
ZERO_CONFIGS = REPO / "zero_configs"
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 230), "yellow": (240, 205, 0)}
VISION_MODULES = ("clip_merger", "dino_merger", "clip_projection", "dino_aligner", "projector")
TRAINED_GROUPS = (*VISION_MODULES, "language_model")
SEED = 0


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread_per_module():
    """Tiny models run fastest on one thread: two OpenMP threads on a busy 2-core machine can be ~50x slower."""
    with single_torch_thread():
        yield


def tiny_cli_fields() -> list[str]:
    """The CommConfig fields of `tiny_config()` that component checkpoints do not carry, as CLI options."""
    config = tiny_config()
    return [
        "--grid_size", str(config.grid_size),
        "--dino_image_size", str(config.dino_image_size),
        "--clip_layers", *map(str, config.clip_layers),
        "--dino_layers", *map(str, config.dino_layers),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """Tiny random components, a demo tokenizer and 8 samples (4 conversations, 4 REC) on non-square images."""
    root = tmp_path_factory.mktemp("train_world")
    conversations, rec = [], []
    for i, (name, colour) in enumerate(COLOURS.items()):
        image = Image.new("RGB", (64, 48), (200, 200, 200))
        ImageDraw.Draw(image).rectangle([8 + 8 * i, 8, 24 + 8 * i, 30], fill=colour)
        image.save(root / f"img{i}.png")
        conversations.append(
            {
                "id": f"c{i}",
                "image": f"img{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat colour is the box?"},
                    {"from": "gpt", "value": f"The box is {name}."},
                ],
            }
        )
        rec.append({"image": f"img{i}.png", "expression": f"the {name} box", "bbox": [8 + 8 * i, 8, 17, 23]})
    (root / "conv.json").write_text(json.dumps(conversations, indent=1))
    (root / "rec.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rec))
    text_only = [
        {"conversations": [{"from": "human", "value": f"Name colour {i}."}, {"from": "gpt", "value": f"{name}."}]}
        for i, name in enumerate(COLOURS)
    ]
    (root / "text.jsonl").write_text("".join(json.dumps(r) + "\n" for r in text_only))
    tokenizer = train_demo_tokenizer([c["conversations"][1]["value"] for c in conversations])
    tokenizer.save_pretrained(root / "tokenizer")
    torch.manual_seed(SEED)
    components = save_random_components(root / "components", tiny_config(vocab_size=len(tokenizer)))
    component_args = [
        "--clip", components["clip"], "--dino", components["dino"], "--llm", components["llm"],
        "--tokenizer", str(root / "tokenizer"),
    ]  # fmt: skip
    common = [
        "--data", str(root / "conv.json"), str(root / "rec.jsonl"),
        "--model_max_length", "256",
        "--learning_rate", "1e-3",
        "--warmup_steps", "0",
        "--logging_steps", "1",
        "--seed", str(SEED),
        "--disable_tqdm", "True",
        "--report_to", "none",
        "--bf16", "False",
    ]  # fmt: skip
    return {
        "root": root,
        "components": components,
        "from_components": [*component_args, *tiny_cli_fields()],
        "common": common,
        "vocab_size": len(tokenizer),
    }


def train_with_argv(argv: list[str], callbacks: list[TrainerCallback] | tuple = ()) -> TrainResult:
    """`train` with the arguments comm-train's command line ``argv`` gives (how these tests spell a run)."""
    return train(*parse_arguments(argv), callbacks=callbacks)


def weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a single-file safetensors checkpoint folder."""
    return safetensors.torch.load_file(str(Path(folder) / "model.safetensors"))


@pytest.fixture(scope="module")
def initial_model_dir(world, tmp_path_factory) -> Path:
    """The model `main` builds from the components before training (same seed, same random vision modules), saved."""
    set_seed(SEED)
    model, _ = build_from_components(
        world["components"]["clip"],
        world["components"]["dino"],
        world["components"]["llm"],
        tokenizer=AutoTokenizer.from_pretrained(world["root"] / "tokenizer"),
        model_max_length=256,
        **{k: getattr(tiny_config(), k) for k in ("grid_size", "dino_image_size", "clip_layers", "dino_layers")},
    )
    folder = tmp_path_factory.mktemp("initial")
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def initial_weights(initial_model_dir) -> dict[str, torch.Tensor]:
    """The initial model's checkpoint tensors (named as exports name them)."""
    return weights(initial_model_dir)


def group(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``state`` under ``prefix.``."""
    return {k: v for k, v in state.items() if k.startswith(prefix + ".")}


def assert_towers_equal_components(exported: dict[str, torch.Tensor], components: dict[str, str]) -> None:
    """Every tower weight of the export equals the component checkpoint's, bit for bit."""
    for tower, name in (("clip_tower", "clip"), ("dino_tower", "dino")):
        reference = weights(components[name])
        tower_weights = group(exported, f"{tower}.encoder")
        assert tower_weights, f"no {tower} weights in the export"
        for key, value in tower_weights.items():
            original = reference[key.removeprefix(f"{tower}.encoder.")]
            assert torch.equal(value, original), f"{key} changed"


def assert_llm_equals_component(exported: dict[str, torch.Tensor], component: dict[str, torch.Tensor]) -> None:
    """The LLM is the component's (embedding rows of the original vocabulary compared)."""
    for key, value in group(exported, "language_model").items():
        original = component[key.removeprefix("language_model.")]
        assert torch.equal(value[: original.shape[0]], original), f"{key} changed"


def changed_groups(after: dict[str, torch.Tensor], before: dict[str, torch.Tensor]) -> set[str]:
    """The trained groups with at least one tensor that differs between ``before`` and ``after``."""
    changed = set()
    for name in TRAINED_GROUPS:
        for key, value in group(after, name).items():
            if value.shape != before[key].shape or not torch.equal(value, before[key]):
                changed.add(name)
                break
    return changed


def losses(log_history: list[dict]) -> dict[int, float]:
    """Per-step training loss from a log history."""
    return {entry["step"]: entry["loss"] for entry in log_history if "loss" in entry}


def assert_loss_goes_down(log_history: list[dict]) -> None:
    """The mean of the last two logged losses is clearly below the mean of the first two."""
    values = list(losses(log_history).values())
    assert len(values) >= 4, values
    assert sum(values[-2:]) / 2 < sum(values[:2]) / 2 - 0.2, f"loss did not go down: {values}"


# ---------------------------------------------------------------------------------------------------------------
# DeepSpeed configs
# ---------------------------------------------------------------------------------------------------------------


def has_auto(value) -> bool:
    """Whether an "auto" placeholder remains anywhere in a (nested) config."""
    if isinstance(value, dict):
        return any(has_auto(v) for v in value.values())
    return value == "auto"


@pytest.mark.parametrize("name", ["zero2.json", "zero3.json", "zero3_offload.json"])
def test_zero_configs_parse_with_deepspeed(name, tmp_path):
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers.integrations import HfTrainerDeepSpeedConfig

    from comm.training.arguments import CommTrainingArguments

    raw = json.loads((ZERO_CONFIGS / name).read_text())
    assert "optimizer" not in raw and "scheduler" not in raw  # the Trainer's torch AdamW and cosine schedule
    assert has_auto(raw)
    args = CommTrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, gradient_accumulation_steps=1, bf16=True
    )
    config = HfTrainerDeepSpeedConfig(str(ZERO_CONFIGS / name))
    config.trainer_config_process(args)
    model = type("Model", (), {"config": tiny_config()})()
    config.trainer_config_finalize(args, model, num_training_steps=100)
    assert not has_auto(config.config)
    parsed = DeepSpeedConfig(config.config)
    assert parsed.bfloat16_config.enabled
    assert parsed.gradient_clipping == 1.0
    assert parsed.train_micro_batch_size_per_gpu == 8
    zero = parsed.zero_config
    if name == "zero2.json":
        assert zero.stage == 2
    else:
        assert zero.stage == 3 and zero.gather_16bit_weights_on_model_save
    if name == "zero3_offload.json":
        assert zero.offload_optimizer.device == "cpu" and zero.offload_param.device == "cpu"
        assert parsed.zero_force_ds_cpu_optimizer is False
    else:
        assert zero.offload_optimizer is None and zero.offload_param is None


# ---------------------------------------------------------------------------------------------------------------
# Real DeepSpeed jobs (2 processes on CPU over gloo)
# ---------------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_deepspeed(args: list[str], timeout: int = 400, fault: str | None = None) -> str:
    """Run ``deepspeed --num_gpus 2 train/train.py ARGS``; return its output, failing the test on an error.

    With ``fault`` (a ``$COMM_TEST_SAVE_FAULT`` spec, see comm/training/checkpoints.py) the job must fail instead.
    """
    pytest.importorskip("deepspeed")
    launcher = Path(sys.executable).with_name("deepspeed")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "TRANSFORMERS_VERBOSITY": "error",
        **({FAULT_ENV: fault} if fault else {}),
    }
    command = [str(launcher), "--num_gpus", "2", "--master_port", str(free_port()), "train/train.py", *args]
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # its own process group: a hung job's workers can all be killed
    )  # fmt: skip
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"deepspeed run hung for {timeout} s:\n{output[-6000:]}")
    if fault:
        assert process.returncode != 0, f"deepspeed run with {fault} did not fail:\n{output[-6000:]}"
    else:
        assert process.returncode == 0, f"deepspeed run failed ({process.returncode}):\n{output[-6000:]}"
    return output


def run_outputs(output_dir: Path, samples: int = 8) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """The log history and the exported weights of a finished run (and check the export loads)."""
    export = output_dir / "final"
    model = CommForConditionalGeneration.from_pretrained(export)
    processor = CommProcessor.from_pretrained(export)
    assert processor.num_image_tokens == model.config.num_image_tokens
    assert (output_dir / "loss.png").stat().st_size > 0
    assert json.loads((output_dir / "data_summary.json").read_text())["samples_used"] == samples
    return json.loads((output_dir / "log_history.json").read_text()), weights(export)


ZERO2_STAGE1 = [
    "--deepspeed",
    str(ZERO_CONFIGS / "zero2.json"),
    "--per_device_train_batch_size",
    "2",
    "--max_steps",
    "4",
]


@pytest.fixture(scope="module")
def zero2_stage1(world, tmp_path_factory) -> Path:
    """A 2-process ZeRO-2 stage-1 run of 4 steps, uninterrupted: its output folder."""
    stage1 = tmp_path_factory.mktemp("zero2") / "stage1"
    output = launch_deepspeed(
        ["--stage", "1", *world["from_components"], *world["common"], *ZERO2_STAGE1,
         "--output_dir", str(stage1), "--save_strategy", "no"]
    )  # fmt: skip
    assert f"exported model and processor to {stage1 / 'final'}" in output
    return stage1


@pytest.mark.slow
def test_deepspeed_zero2_stage1_then_stage2(world, initial_weights, zero2_stage1, tmp_path):
    stage1 = zero2_stage1
    history1, exported1 = run_outputs(stage1)
    assert_loss_goes_down(history1)
    assert history1[-1]["train_samples_per_second"] > 0
    assert_towers_equal_components(exported1, world["components"])
    assert changed_groups(exported1, initial_weights) == set(TRAINED_GROUPS)

    stage2 = tmp_path / "stage2"
    launch_deepspeed(
        ["--stage", "2", "--model_name_or_path", str(stage1 / "final"), *world["common"], *ZERO2_STAGE1,
         "--output_dir", str(stage2), "--save_strategy", "no"]
    )  # fmt: skip
    history2, exported2 = run_outputs(stage2)
    assert_loss_goes_down(history2)
    assert_towers_equal_components(exported2, world["components"])
    assert changed_groups(exported2, exported1) == set(TRAINED_GROUPS)


@pytest.mark.slow
def test_deepspeed_rank_killed_during_a_save_leaves_no_checkpoint_and_the_run_resumes_exactly(
    world, zero2_stage1, tmp_path
):
    # Rank 1 is killed (SIGKILL) right after writing its ZeRO shards of checkpoint-4, before its RNG state and before
    # rank 0 could rename the checkpoint into place: checkpoint-4 must not appear; the resume from checkpoint-2 must
    # reproduce the uninterrupted run.
    out = tmp_path / "killed"
    args = ["--stage", "1", *world["from_components"], *world["common"], *ZERO2_STAGE1, "--output_dir", str(out),
            "--save_strategy", "steps", "--save_steps", "2"]  # fmt: skip
    launch_deepspeed(args, fault="optimizer:4:kill:1")
    assert not (out / "checkpoint-4").exists() and not (out / "final").exists()
    assert checkpoint_problem(out / "checkpoint-2") is None
    record = json.loads((out / "checkpoint-2" / COMPLETE).read_text())["files"]
    for rank in (0, 1):  # every rank's part is in the record
        assert f"rng_state_{rank}.pth" in record
        assert f"global_step2/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in record, sorted(record)
    assert (out / ".partial" / "checkpoint-4" / "global_step4").is_dir()  # the killed save, never renamed

    output = launch_deepspeed([*args, "--resume_from_checkpoint", "auto"])
    assert f"resuming from {out / 'checkpoint-2'}" in output and str(out / ".partial" / "checkpoint-4") in output
    history, exported = run_outputs(out)
    reference_history, reference = run_outputs(zero2_stage1)
    expected, got = losses(reference_history), losses(history)
    assert sorted(got) == [1, 2, 3, 4]
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), (step, got, expected)
    assert exported.keys() == reference.keys()
    for key, value in reference.items():
        torch.testing.assert_close(exported[key], value, rtol=1e-6, atol=1e-7, msg=key)
    assert checkpoint_problem(out / "checkpoint-4") is None and not (out / ".partial").exists()


@pytest.mark.slow
def test_deepspeed_zero3(world, initial_weights, tmp_path):
    # One sample per rank and text-only samples in the mix: some steps have an image on one rank only, which
    # desynchronises ZeRO-3's collective parameter gathering unless every batch runs the vision modules.
    out = tmp_path / "zero3"
    launch_deepspeed(
        ["--stage", "1", *world["from_components"], *world["common"], "--data", str(world["root"] / "text.jsonl"),
         "--deepspeed", str(ZERO_CONFIGS / "zero3.json"), "--per_device_train_batch_size", "1", "--max_steps", "6",
         "--output_dir", str(out), "--save_strategy", "steps", "--save_steps", "6"]
    )  # fmt: skip
    history, exported = run_outputs(out, samples=12)
    assert_loss_goes_down(history)
    assert_towers_equal_components(exported, world["components"])
    assert changed_groups(exported, initial_weights) == set(TRAINED_GROUPS)
    # the checkpoint holds what trains, gathered from the ZeRO-3 partitions, and never the frozen towers
    trained = safetensors.torch.load_file(str(out / "checkpoint-6" / TRAINABLE_WEIGHTS))
    assert not any("_tower." in key for key in trained)
    loaded = CommForConditionalGeneration.from_pretrained(out / "final").state_dict()
    for key, value in trained.items():
        assert torch.equal(value, loaded[key]), key
    module_states = torch.load(
        out / "checkpoint-6" / "global_step6" / "zero_pp_rank_0_mp_rank_00_model_states.pt", weights_only=False
    )
    assert not any("_tower." in key for key in module_states["module"])


# ---------------------------------------------------------------------------------------------------------------
# In-process runs (the Trainer without DeepSpeed)
# ---------------------------------------------------------------------------------------------------------------


def peft_merged(initial_dir: Path, trained: dict[str, torch.Tensor], r: int, alpha: int) -> dict[str, torch.Tensor]:
    """What peft's own ``merge_and_unload`` makes of the initial model plus a checkpoint's trained weights."""
    from peft import LoraConfig, LoraModel

    reference = CommForConditionalGeneration.from_pretrained(initial_dir)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets)
    reference.language_model = LoraModel(reference.language_model, config, "default")  # LoRA on the LLM's body
    _, unexpected = reference.load_state_dict(trained, strict=False)
    assert not unexpected
    reference.language_model = reference.language_model.merge_and_unload()
    return reference.state_dict()


def assert_lora_export(
    export_dir: Path, checkpoint: Path, initial_dir: Path, components: dict, r: int = 4, alpha: int = 8
) -> None:
    """The export is a plain loadable model whose LLM is peft's merge of the checkpoint's adapters."""
    exported = weights(export_dir)  # checkpoint names (the layout save_pretrained writes)
    initial = weights(initial_dir)
    assert not any("lora" in key or "base_layer" in key for key in exported)
    assert set(exported) == set(initial)  # nothing missing or unexpected
    assert changed_groups(exported, initial) == set(TRAINED_GROUPS)
    assert_towers_equal_components(exported, components)
    loaded = CommForConditionalGeneration.from_pretrained(export_dir).state_dict()
    trained = safetensors.torch.load_file(str(checkpoint / TRAINABLE_WEIGHTS))
    assert any(".lora_A." in key for key in trained) and not any("_tower." in key for key in trained)
    for key, value in peft_merged(initial_dir, trained, r, alpha).items():
        torch.testing.assert_close(loaded[key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.slow
def test_deepspeed_zero3_offload_lora_export(world, initial_model_dir, tmp_path):
    # The export gathers the ZeRO-3 partitions and merges LoRA on the main process only.
    out = tmp_path / "zero3_lora"
    launch_deepspeed(
        ["--stage", "2", *world["from_components"], *world["common"], "--lora_r", "4", "--lora_alpha", "8",
         "--lora_dropout", "0", "--deepspeed", str(ZERO_CONFIGS / "zero3_offload.json"),
         "--per_device_train_batch_size", "2", "--max_steps", "3", "--output_dir", str(out), "--save_steps", "3"]
    )  # fmt: skip
    assert_lora_export(out / "final", out / "checkpoint-3", initial_model_dir, world["components"])


class StopAtStep(TrainerCallback):
    """Simulates an interruption: stop training after ``step`` optimizer steps."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def test_resume_reproduces_the_uninterrupted_run(world, tmp_path):
    # 8 samples, batch 2: 4 steps per epoch, so the resumed part (steps 4-5) crosses an epoch boundary
    args = [*world["from_components"], *world["common"], "--per_device_train_batch_size", "2", "--max_steps", "5"]
    full = train_with_argv([*args, "--output_dir", str(tmp_path / "full"), "--save_strategy", "no"])
    interrupted_dir = tmp_path / "interrupted"
    first = train_with_argv(
        [*args, "--output_dir", str(interrupted_dir), "--save_strategy", "steps", "--save_steps", "3"],
        callbacks=[StopAtStep(3)],
    )
    assert losses(first.log_history) == {step: losses(full.log_history)[step] for step in (1, 2, 3)}
    assert (interrupted_dir / "checkpoint-3" / TRAINABLE_WEIGHTS).is_file()
    resumed = train_with_argv(
        [*args, "--output_dir", str(interrupted_dir), "--save_strategy", "no", "--resume_from_checkpoint", "auto"]
    )
    expected, got = losses(full.log_history), losses(resumed.log_history)
    assert sorted(got) == [1, 2, 3, 4, 5]  # the checkpoint's history (steps 1-3) continues
    for step in (4, 5):
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), (step, got, expected)
    rates = {e["step"]: e["learning_rate"] for e in full.log_history if "learning_rate" in e}
    for entry in resumed.log_history:
        if "learning_rate" in entry:
            assert entry["learning_rate"] == pytest.approx(rates[entry["step"]], rel=1e-9)


class SignalAtStep(TrainerCallback):
    """Sends this process ``signum`` as optimizer step ``step`` begins."""

    def __init__(self, signum: int, step: int):
        self.signum, self.step = signum, step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            os.kill(os.getpid(), self.signum)


def test_a_run_from_python_stopped_by_a_signal_says_how_to_continue(world, tmp_path, capsys):
    out = tmp_path / "stopped"
    model_args, data_args, training_args = parse_arguments(
        [*world["from_components"], *world["common"], "--per_device_train_batch_size", "4", "--max_steps", "3",
         "--save_strategy", "no", "--output_dir", str(out)]
    )  # fmt: skip
    result = train(model_args, data_args, training_args, callbacks=[SignalAtStep(signal.SIGTERM, 2)])
    assert result.stopped_by == signal.SIGTERM and result.checkpoint == out / "checkpoint-2"
    assert (
        f"stopped by SIGTERM after step 2 of 3: checkpoint {out / 'checkpoint-2'}; continue with: train() again "
        "with the same arguments and resume_from_checkpoint='auto'"
    ) in capsys.readouterr().err


def test_projector_only_checkpoints_hold_only_the_vision_side(world, initial_weights, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "nowhere.png", "expression": "x", "bbox": [0, 0, 1, 1]}) + "\n")
    out = tmp_path / "projector"
    result = train_with_argv(
        [*world["from_components"], *world["common"], "--data", str(bad), "--tune", "projector",
         "--per_device_train_batch_size", "4", "--max_steps", "2", "--save_steps", "2", "--output_dir", str(out)]
    )  # fmt: skip
    assert result.data_summary["skipped_by_kind"] == {"missing_image": 1}
    summary = json.loads((out / "data_summary.json").read_text())
    assert summary["issues"][0]["file"] == str(bad) and summary["issues"][0]["line"] == 1

    checkpoint = out / "checkpoint-2"
    trained = safetensors.torch.load_file(str(checkpoint / TRAINABLE_WEIGHTS))
    vision_keys = {k for k in initial_weights if k.split(".")[0] in VISION_MODULES}
    assert {k.removeprefix("model.") for k in trained} == vision_keys
    assert not (checkpoint / "model.safetensors").exists()
    optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert sum(len(g["params"]) for g in optimizer["param_groups"]) == len(vision_keys)
    llm_bytes = sum(v.numel() * v.element_size() for v in group(initial_weights, "language_model").values())
    assert sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file()) < llm_bytes

    exported = weights(result.export_dir)
    assert_llm_equals_component(exported, weights(world["components"]["llm"]))
    assert changed_groups(exported, initial_weights) == set(VISION_MODULES)
    assert_towers_equal_components(exported, world["components"])


def test_lora_export_is_merged_and_loads(world, initial_model_dir, tmp_path, capsys):
    out = tmp_path / "lora"
    result = train_with_argv(
        [*world["from_components"], *world["common"], "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0",
         "--per_device_train_batch_size", "4", "--max_steps", "2", "--save_steps", "2", "--output_dir", str(out),
         "--disable_tqdm", "False", "--group_by_length", "True"]
    )  # fmt: skip
    bar = capsys.readouterr().err
    assert "samples/s=" in bar and "loss=" in bar and "lr=" in bar
    assert_lora_export(result.export_dir, out / "checkpoint-2", initial_model_dir, world["components"])


def test_strict_mode_stops_the_run_before_training(world, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "img0.png", "expression": "x", "bbox": [0, 0, 1, 1]}) + "\n{oops\n")
    out = tmp_path / "strict"
    with pytest.raises(DataError, match=rf"{re.escape(str(bad))}:2 \(sample 1\): bad_json"):
        train_with_argv(
            [*world["from_components"], *world["common"], "--data", str(bad), "--image_folder", str(world["root"]),
             "--strict", "--max_steps", "1", "--output_dir", str(out)]
        )  # fmt: skip
    assert not (out / "final").exists()


def test_argument_errors_name_the_arguments(world, tmp_path):
    with pytest.raises(ValueError, match="missing --dino"):
        train_with_argv(["--clip", "a", "--llm", "b", *world["common"], "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="--grid_size only apply"):
        train_with_argv(
            ["--model_name_or_path", "x", "--grid_size", "4", *world["common"], "--output_dir", str(tmp_path)]
        )
    with pytest.raises(ValueError, match="--tune projector freezes it"):
        train_with_argv([*world["from_components"], *world["common"], "--tune", "projector", "--lora_r", "4",
                         "--output_dir", str(tmp_path)])  # fmt: skip


def test_group_by_length_uses_the_lengths_measured_at_tokenization(tiny_model_dir, tmp_path):
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from comm.training.arguments import CommTrainingArguments
    from comm.training.trainer import CommTrainer

    class Measured(torch.utils.data.Dataset):
        lengths = [5, 50, 7, 30, 9, 12, 44, 3]

        def __len__(self):
            return len(self.lengths)

        def __getitem__(self, index):
            raise AssertionError("the sampler must not decode samples to measure them")

    args = CommTrainingArguments(
        output_dir=str(tmp_path), group_by_length=True, per_device_train_batch_size=2, report_to="none"
    )
    assert args.train_sampling_strategy == "group_by_length" and args.use_cpu == (not torch.cuda.is_available())
    trainer = CommTrainer(
        model=CommForConditionalGeneration.from_pretrained(tiny_model_dir), args=args, train_dataset=Measured()
    )
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, LengthGroupedSampler) and sampler.lengths == Measured.lengths
    assert sorted(sampler) == list(range(8))
