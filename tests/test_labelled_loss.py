"""The training loss on labelled positions only equals the LLM's full-logits loss: value and gradients."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from comm import CommForConditionalGeneration, CommProcessor
from comm.conversation import VICUNA_V1
from comm.demo.tiny import tiny_config
from comm.model.loss import IGNORE_INDEX, labelled_positions
from comm.training.arguments import ModelArguments
from comm.training.train import configure_trainable

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RTOL = 1e-5
CONVERSATIONS = [
    ("What colour is the square? <image>", "It is red."),
    ("<image>\nDescribe the picture in one long sentence, please.", "A blue square on a white background."),
    ("<image>\nIs there a cat?", "No."),
]


def training_batch(processor: CommProcessor) -> dict[str, torch.Tensor]:
    """Three conversations right-padded as the training collator pads them; loss on the answers only, and none at
    all in the last row (a sample whose reply was truncated away)."""
    prompts = [VICUNA_V1.prompt(question) for question, _ in CONVERSATIONS]
    texts = [prompt + " " + answer for prompt, (_, answer) in zip(prompts, CONVERSATIONS)]
    images = [Image.new("RGB", (90, 60), (200, 30, 30)), Image.new("RGB", (40, 70), (30, 30, 200))]
    images.append(Image.new("RGB", (50, 50), (20, 200, 20)))
    batch = processor(text=texts, images=images, padding_side="right")
    prompt_lengths = processor(text=prompts, images=images, padding_side="right")["attention_mask"].sum(1).tolist()
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = IGNORE_INDEX
    for row, length in enumerate(prompt_lengths):
        labels[row, :length] = IGNORE_INDEX
    labels[-1] = IGNORE_INDEX
    assert batch["attention_mask"].min() == 0, "the batch must hold padding"
    return {**batch, "labels": labels}


def loss_and_grads(model: CommForConditionalGeneration, batch: dict, labelled: bool, **kwargs):
    """The loss, the output logits' shape and every trainable parameter's gradient from one forward + backward."""
    model.labelled_logits_only = labelled
    model.zero_grad(set_to_none=True)
    output = model(**batch, **kwargs)
    output.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return output.loss.detach(), tuple(output.logits.shape), grads


def assert_same(reference, candidate) -> None:
    """Losses and gradients within `RTOL` relative difference (gradients: of their norms)."""
    loss_ref, _, grads_ref = reference
    loss, _, grads = candidate
    assert abs(loss - loss_ref) <= RTOL * abs(loss_ref), (float(loss), float(loss_ref))
    assert grads.keys() == grads_ref.keys() and grads_ref
    for name, grad in grads.items():
        scale = grads_ref[name].norm()
        assert (grad - grads_ref[name]).norm() <= RTOL * scale, name


@pytest.fixture
def trainable_model(tiny_model_dir) -> tuple[CommForConditionalGeneration, dict]:
    model = CommForConditionalGeneration.from_pretrained(tiny_model_dir)
    configure_trainable(model, ModelArguments(tune="all"))
    model.train()
    return model, training_batch(CommProcessor.from_pretrained(tiny_model_dir))


def test_labelled_positions_follow_the_causal_shift():
    labels = torch.tensor([[-100, -100, 7, 8, -100], [-100, 5, -100, -100, 9]])
    keep, targets = labelled_positions(labels)
    assert keep.tolist() == [1, 2, 5, 8] and targets.tolist() == [7, 8, 5, 9]


def test_labelled_loss_and_gradients_equal_full_logits(trainable_model):
    model, batch = trainable_model
    full = loss_and_grads(model, batch, labelled=False)
    labelled = loss_and_grads(model, batch, labelled=True)
    assert_same(full, labelled)
    labelled_count = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    vocab = model.config.text_config.vocab_size
    assert full[1] == (*batch["input_ids"].shape, vocab)
    assert labelled[1] == (labelled_count, vocab) and 0 < labelled_count < batch["input_ids"].numel() // 4


def test_labelled_loss_with_num_items_in_batch(trainable_model):
    """The Trainer's gradient-accumulation normalisation: summed loss over a count of the whole accumulated batch."""
    model, batch = trainable_model
    items = torch.tensor(3 * int((batch["labels"] != IGNORE_INDEX).sum()))
    full = loss_and_grads(model, batch, labelled=False, num_items_in_batch=items)
    labelled = loss_and_grads(model, batch, labelled=True, num_items_in_batch=items)
    assert_same(full, labelled)
    mean = loss_and_grads(model, batch, labelled=True)[0]
    torch.testing.assert_close(labelled[0], mean / 3)  # the sum over this third of the accumulated tokens


def full_logits_token_losses(model: CommForConditionalGeneration, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Every position's next-token loss from the full logits ``(batch, seq - 1)``, and where a label is set: the
    reference the labelled-positions loss is checked against."""
    model.labelled_logits_only = False
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
    targets = batch["labels"][:, 1:]
    token_losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), targets.clamp(min=0), reduction="none"
    )
    return token_losses, targets != IGNORE_INDEX


def test_sample_weighting_gives_every_sample_the_same_weight(trainable_model):
    """loss_weighting="sample": the mean over labelled samples of each sample's mean token loss, computed here from
    the full logits; with num_items_in_batch, the same scaled as the token-weighted loss is."""
    model, batch = trainable_model
    token_losses, labelled = full_logits_token_losses(model, batch)
    per_sample = [token_losses[row][labelled[row]].mean() for row in range(len(labelled)) if labelled[row].any()]
    assert len(per_sample) == 2 and labelled[0].sum() != labelled[1].sum()  # answers of different lengths
    expected = torch.stack(per_sample).mean()

    model.config.loss_weighting = "sample"
    try:
        for labelled_only in (True, False):  # sample weighting always takes the labelled-positions loss
            loss, _, grads = loss_and_grads(model, batch, labelled=labelled_only)
            torch.testing.assert_close(loss, expected, rtol=RTOL, atol=0)
            assert grads
        items = torch.tensor(3 * int(labelled.sum()))
        loss = loss_and_grads(model, batch, labelled=True, num_items_in_batch=items)[0]
        torch.testing.assert_close(loss, expected / 3, rtol=RTOL, atol=0)
    finally:
        model.config.loss_weighting = "token"
    token_weighted = loss_and_grads(model, batch, labelled=True)[0]
    torch.testing.assert_close(token_weighted, token_losses[labelled].mean(), rtol=RTOL, atol=0)
    assert abs(token_weighted - expected) > 1e-3  # the two weightings differ on this batch


def test_loss_weights_multiply_each_samples_loss(trainable_model):
    """loss_weight (a training file's weight, per sample) multiplies that sample's token losses, under either
    weighting, and reaches the loss through the full-logits setting too."""
    model, batch = trainable_model
    token_losses, labelled = full_logits_token_losses(model, batch)
    weights = torch.tensor([3.0, 0.5, 7.0])
    expected = (token_losses * weights[:, None])[labelled].sum() / labelled.sum()
    loss = loss_and_grads(model, batch, labelled=False, loss_weight=weights)[0]
    torch.testing.assert_close(loss, expected, rtol=RTOL, atol=0)
    unweighted = loss_and_grads(model, batch, labelled=True, loss_weight=torch.ones(3))[0]
    torch.testing.assert_close(unweighted, token_losses[labelled].mean(), rtol=RTOL, atol=0)
    model.config.loss_weighting = "sample"
    try:
        per_sample = [token_losses[row][labelled[row]].mean() * weights[row] for row in range(2)]
        loss = loss_and_grads(model, batch, labelled=True, loss_weight=weights)[0]
        torch.testing.assert_close(loss, torch.stack(per_sample).mean(), rtol=RTOL, atol=0)
    finally:
        model.config.loss_weighting = "token"


def test_loss_weighting_is_checked():
    with pytest.raises(ValueError, match="loss_weighting must be 'token' or 'sample'"):
        tiny_config(loss_weighting="answer")


def test_labelled_loss_through_lora(tiny_model_dir):
    model = CommForConditionalGeneration.from_pretrained(tiny_model_dir)
    configure_trainable(model, ModelArguments(lora_r=4, lora_alpha=8, lora_dropout=0.0))
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: move it so the adapters change the forward
            param.data.normal_(0, 0.02)
    model.train()
    batch = training_batch(CommProcessor.from_pretrained(tiny_model_dir))
    full = loss_and_grads(model, batch, labelled=False)
    labelled = loss_and_grads(model, batch, labelled=True)
    assert_same(full, labelled)
    assert any("lora_A" in name for name in labelled[2]) and labelled[1][0] < full[1][0] * full[1][1]


def test_labelled_loss_of_an_llm_that_softcaps_its_logits():
    """Gemma-2 softcaps its logits after the LM head: the labelled positions' logits are softcapped too."""
    text_config = {
        "model_type": "gemma2",
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "final_logit_softcapping": 5.0,
    }
    torch.manual_seed(0)
    model = CommForConditionalGeneration(tiny_config(image_token_index=500, text_config=text_config)).train()
    ids = torch.randint(0, 400, (2, 24))
    ids[:, 4:20] = 500
    labels = ids.clone()
    labels[:, :20] = IGNORE_INDEX
    pixels = {"pixel_values_clip": torch.randn(2, 3, 64, 64), "pixel_values_dino": torch.randn(2, 3, 64, 64)}
    batch = {"input_ids": ids, "labels": labels, **pixels}
    full = loss_and_grads(model, batch, labelled=False)
    labelled = loss_and_grads(model, batch, labelled=True)
    assert_same(full, labelled)
    assert full[1] == (2, 24, 512) and labelled[1] == (2 * 4, 512)  # positions 19..22 predict labels 20..23
    model.labelled_logits_only = True
    assert model(**batch).logits.abs().max() <= 5.0
