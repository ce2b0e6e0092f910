"""transformers' own common tests, as they run for Llava: ``ModelTesterMixin`` against `CommForConditionalGeneration`
and `CommModel`, and ``ProcessorTesterMixin`` against `CommProcessor`, from the released source of the installed
transformers version (fetched with ``pip download --no-binary :all:`` on first use and cached, never copied here).

The sdist's ``tests/`` holds the common test files but not three modules they import: ``exporters/test_export.py``
(``ExportTesterMixin``, ``ModelTesterMixin``'s base), ``generation/test_utils.py`` (``GenerationTesterMixin``) and the
repository's ``utils/fetch_hub_objects_for_ci.py``. They enter ``sys.modules`` here as empty mixins and an identity
URL mapping, so the export and generation suites do not run; COMM's generation is tested in test_generation.py and
test_transformers_conventions.py (padding-free packing among them).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tarfile
import tempfile
import types
import unittest
import unittest.mock
from pathlib import Path

import pytest
import torch
import transformers
from transformers import LlamaTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES as IMAGE_TEXT_NAMES
from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

from comm import CommConfig, CommForConditionalGeneration, CommProcessor
from comm.build import add_image_tokens
from comm.conversation import IMAGE_PLACEHOLDER
from comm.model.modeling import PIXEL_VALUES_CLIP, CommModel
from comm.processing import IMAGE_PROCESSOR_ATTRIBUTES, tower_image_processor

PACKAGE = "comm_hf_tests"  # the sdist's tests/ folder, importable under this name
LLAMA_TOKENIZER_DIR = Path(__file__).parent / "fixtures" / "tokenizer-llama-family"
CACHE = Path(os.environ.get("COMM_TRANSFORMERS_TESTS", Path(tempfile.gettempdir()) / "comm-transformers-tests"))


def fetch_common_tests(version: str = transformers.__version__) -> Path:
    """The folder holding `PACKAGE` (transformers ``version``'s ``tests/*.py``), downloaded once and cached."""
    root = CACHE / version
    package = root / PACKAGE
    if (package / "test_modeling_common.py").is_file():
        return root
    download = root / "sdist"
    download.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(download)]
    subprocess.run([*command, f"transformers=={version}"], check=True, capture_output=True)
    sdist = next(download.glob("transformers-*.tar.gz"))
    staging = Path(tempfile.mkdtemp(dir=root))
    with tarfile.open(sdist) as archive:
        members = [m for m in archive.getmembers() if m.isfile() and m.name.count("/") == 2 and "/tests/" in m.name]
        for member in members:
            member.name = Path(member.name).name
        archive.extractall(staging / PACKAGE, members=members, filter="data")
    (staging / PACKAGE / "__init__.py").write_text("")
    (staging / PACKAGE).rename(package)  # atomic: a half-written folder is never seen as the cache
    staging.rmdir()
    return root


def import_common_tests() -> tuple[types.ModuleType, types.ModuleType]:
    """transformers' ``test_modeling_common`` and ``test_processing_common`` modules, with the three modules the sdist
    lacks (see the module docstring) in ``sys.modules``."""
    root = str(fetch_common_tests())
    if root not in sys.path:
        sys.path.insert(0, root)
    missing = {
        f"{PACKAGE}.exporters": {},
        f"{PACKAGE}.exporters.test_export": {"ExportTesterMixin": type("ExportTesterMixin", (), {})},
        f"{PACKAGE}.generation": {},
        f"{PACKAGE}.generation.test_utils": {"GenerationTesterMixin": type("GenerationTesterMixin", (), {})},
        "fetch_hub_objects_for_ci": {"url_to_local_path": lambda url, *args, **kwargs: url},
    }
    for name, attributes in missing.items():
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__dict__.update(attributes)
            sys.modules[name] = module
    return (
        importlib.import_module(f"{PACKAGE}.test_modeling_common"),
        importlib.import_module(f"{PACKAGE}.test_processing_common"),
    )


modeling_common, processing_common = import_common_tests()
GenerationTesterMixin = sys.modules[f"{PACKAGE}.generation.test_utils"].GenerationTesterMixin


class CommModelTester:
    """Tiny COMM models and their inputs, as Llava's tester makes them: text with one image block per row."""

    def __init__(self, parent: unittest.TestCase, batch_size: int = 3, text_length: int = 7):
        self.parent = parent
        self.batch_size = batch_size
        self.is_training = True
        self.vocab_size = 99
        # Low ids, as Llava's tester has them: test_resize_tokens_embeddings clamps the ids under a shrunk vocabulary.
        self.image_token_index, self.image_start_token_index, self.image_end_token_index = 3, 4, 5
        self.grid_size = 2
        self.num_image_tokens = self.grid_size**2
        self.seq_length = text_length + self.num_image_tokens + 2  # + <im_start>, <im_end>
        self.text_config = {
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 64,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "tie_word_embeddings": False,
        }
        tower = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 16, "patch_size": 8}
        self.clip_config = {"model_type": "clip_vision_model", "intermediate_size": 24, "projection_dim": 8, **tower}
        self.dino_config = {"model_type": "dinov2", "mlp_ratio": 2, **tower}
        self.hidden_size = self.text_config["hidden_size"]
        self.num_hidden_layers = self.text_config["num_hidden_layers"]
        self.num_attention_heads = self.text_config["num_attention_heads"]

    def get_config(self) -> CommConfig:
        return CommConfig(
            clip_config=self.clip_config,
            dino_config=self.dino_config,
            text_config=self.text_config,
            clip_layers=[1, 2],
            dino_layers=[2],
            grid_size=self.grid_size,
            dino_image_size=16,
            image_token_index=self.image_token_index,
            image_start_token_index=self.image_start_token_index,
            image_end_token_index=self.image_end_token_index,
            # On, so that every vision module is built and the checkpoint renaming of each has a key to rename.
            image_position_embedding=True,
        )

    def prepare_config_and_inputs_for_common(self) -> tuple[CommConfig, dict[str, torch.Tensor]]:
        config = self.get_config()
        text = modeling_common.ids_tensor([self.batch_size, self.seq_length], self.vocab_size - 6) + 6  # no image id
        text[:, 1] = self.image_start_token_index
        text[:, 2 : 2 + self.num_image_tokens] = self.image_token_index
        text[:, 2 + self.num_image_tokens] = self.image_end_token_index
        pixels = {
            "pixel_values_clip": modeling_common.floats_tensor([self.batch_size, 3, 16, 16]),
            "pixel_values_dino": modeling_common.floats_tensor([self.batch_size, 3, 16, 16]),
        }
        return config, {"input_ids": text, "attention_mask": torch.ones_like(text), **pixels}


@pytest.mark.usefixtures("one_torch_thread")
class CommModelCommonTest(modeling_common.ModelTesterMixin, GenerationTesterMixin, unittest.TestCase):
    """``ModelTesterMixin`` on COMM's headless model and its conditional-generation model."""

    all_model_classes = (CommModel, CommForConditionalGeneration)
    _is_composite = True
    # The image-feature tests find the batch size under "pixel_values"; COMM has one tensor per tower
    # (pixel_values_clip, pixel_values_dino), so only their output-type checks apply, not the shape checks.
    skip_test_image_features_output_shape = True

    def setUp(self) -> None:
        self.model_tester = CommModelTester(self)
        # The mixin finds a model's task (base model: no loss; image-text-to-text: labels) in transformers' own tables
        # of model names, which a model registered from outside (AutoModel.register...) is not in: COMM enters them
        # for the test, as Llava is in them.
        for table, model_class in ((MODEL_MAPPING_NAMES, CommModel), (IMAGE_TEXT_NAMES, CommForConditionalGeneration)):
            patch = unittest.mock.patch.dict(table, {CommConfig.model_type: model_class.__name__})
            patch.start()
            self.addCleanup(patch.stop)

    # The mixin checks that the first GradientCheckpointingLayer in module order re-runs in the backward. COMM's
    # first is a block of the frozen CLIP tower, which runs in eval mode under torch.no_grad() and is never re-run by
    # design; the LLM's checkpointed layers (re-run, same gradients) are tested in test_transformers_conventions.py.
    FROZEN_TOWER_FIRST = "the first checkpointing layer is a frozen tower's block, never re-run by design"

    @unittest.skip(FROZEN_TOWER_FIRST)
    def test_training_gradient_checkpointing(self) -> None: ...

    @unittest.skip(FROZEN_TOWER_FIRST)
    def test_training_gradient_checkpointing_use_reentrant_false(self) -> None: ...

    @unittest.skip(FROZEN_TOWER_FIRST)
    def test_training_gradient_checkpointing_use_reentrant_true(self) -> None: ...

    def _image_features_get_expected_num_attentions(self, model_tester=None) -> int:
        # Two towers: get_image_features returns CLIP's attentions, then DINOv2's.
        tester = model_tester or self.model_tester
        return tester.clip_config["num_hidden_layers"] + tester.dino_config["num_hidden_layers"]

    def _image_features_get_expected_num_hidden_states(self, model_tester=None) -> int:
        return self._image_features_get_expected_num_attentions(model_tester) + 2  # + each tower's embeddings


class CommProcessorCommonTest(processing_common.ProcessorTesterMixin, unittest.TestCase):
    """``ProcessorTesterMixin`` on `CommProcessor`: the test fixtures' Llama tokenizer with the image tokens, and the
    towers' PIL image processors at 32 pixels."""

    processor_class = CommProcessor
    images_input_name = PIXEL_VALUES_CLIP  # the CLIP tower's pixels (the DINOv2 tower's come beside them)
    image_token = IMAGE_PLACEHOLDER

    @classmethod
    def _setup_tokenizer(cls):
        tokenizer = LlamaTokenizer.from_pretrained(LLAMA_TOKENIZER_DIR)
        add_image_tokens(tokenizer)
        return tokenizer

    @classmethod
    def _setup_clip_image_processor(cls):
        return tower_image_processor("clip", 32)

    @classmethod
    def _setup_dino_image_processor(cls):
        return tower_image_processor("dino", 32)

    @staticmethod
    def prepare_processor_dict() -> dict:
        return {"num_image_tokens": 4}

    # The processor's chat template is written from its ConversationTemplate, the one source of the chat format that
    # training and generation render with; a different template text passed in is replaced, with a warning.
    @unittest.skip("the chat template is written from the processor's ConversationTemplate fields")
    def test_chat_template_save_loading(self) -> None: ...

    # The mixin finds each sub-processor through its modality's Auto class (AutoImageProcessor for "image_processor"),
    # which has no entry for a processor with two named image processors: here the named ones are loaded through
    # CommProcessor, and the images' sub-processor is the CLIP tower's (the DINOv2 tower's sees the same images).
    def get_component(self, attribute: str, use_tiny_ckpt: bool = True, **kwargs):
        if attribute in IMAGE_PROCESSOR_ATTRIBUTES:
            saved = getattr(CommProcessor.from_pretrained(self.tmpdirname), attribute)
            return type(saved).from_dict(saved.to_dict(), **kwargs)
        return super().get_component(attribute, use_tiny_ckpt, **kwargs)

    def get_subprocessor_name(self, modality: str, attributes: list) -> str:
        if modality == "images":
            return IMAGE_PROCESSOR_ATTRIBUTES[0]
        return super().get_subprocessor_name(modality, attributes)

    @unittest.skip(
        "it loads each sub-processor with its modality's Auto class, which has none for a named image processor"
    )
    def test_processor_from_and_save_pretrained_as_nested_dict(self) -> None: ...
