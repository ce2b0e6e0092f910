"""A small BPE tokenizer trained in-process for the demo: single-digit tokens, exact round trips, offsets."""

from __future__ import annotations

import string
from collections.abc import Iterable, Sequence

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from comm.conversation import CAPTION_PROMPT, IMAGE_PLACEHOLDER, VICUNA_V1, ConversationTemplate, rec_prompt

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
SPECIAL_TOKENS: tuple[str, ...] = (UNK, BOS, EOS, PAD)  # ids 0, 1, 2, 3
SPACE_MARKER = "\u2581"  # SentencePiece's "▁": a space glued to the front of the following word
# Characters that always stand alone (box punctuation and the like; "<image>" stays one word);
# digits are split by their own rule.
ISOLATED_CHARACTERS = r"[\[\](){},.?:;!\"'\n\t]"
# Every character the tokenizer can spell without <unk>: printable ASCII, newline, tab and the space marker.
ALPHABET: tuple[str, ...] = tuple(sorted(set(string.printable) - {" ", "\r", "\x0b", "\x0c"})) + (SPACE_MARKER,)
DEFAULT_MODEL_MAX_LENGTH = 2048


def template_texts(template: ConversationTemplate = VICUNA_V1) -> list[str]:
    """Texts carrying every word of the prompts the demo uses: ``template``'s roles and system prompt, the caption
    and REC prompts (box digits are single tokens whatever the decimals)."""
    return [
        template.render([(f"{IMAGE_PLACEHOLDER}\nIs there a red circle in the image?", "Yes")]).text,
        template.prompt(CAPTION_PROMPT),
        template.prompt(rec_prompt("the red circle")) + " [0.123,0.456,0.789,0.900]" + template.end_of_turn,
    ]


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """Spaces become ``▁`` glued to the next word; punctuation, newlines and each digit stand alone."""
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement=SPACE_MARKER, prepend_scheme="never", split=True),
            pre_tokenizers.Split(Regex(ISOLATED_CHARACTERS), behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )


def train_demo_tokenizer(
    texts: Iterable[str],
    extra_texts: Sequence[str] = (),
    vocab_size: int = 512,
    model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
    template: ConversationTemplate = VICUNA_V1,
) -> PreTrainedTokenizerFast:
    """Train a BPE tokenizer on ``texts`` + ``extra_texts`` (+ the demo's prompts in ``template``, `template_texts`)
    and wrap it for HF.

    Special tokens ``<unk>``, ``<s>``, ``</s>``, ``<pad>`` get ids 0-3. Spaces are SentencePiece-style ``▁``
    prefixes with no space prepended to the text, so ``decode(encode(text)) == text`` for any ASCII text
    (spaces and newlines included) and a span starting at a space starts at a token boundary. Digits are
    single tokens. ``add_special_tokens=True`` prepends ``<s>`` and appends nothing. Unknown words are spelt
    character by character; only characters outside printable ASCII become ``<unk>``.
    """
    if vocab_size < len(SPECIAL_TOKENS) + len(ALPHABET):
        raise ValueError(f"vocab_size must be at least {len(SPECIAL_TOKENS) + len(ALPHABET)}, got {vocab_size}")
    if model_max_length < 1:
        raise ValueError(f"model_max_length must be positive, got {model_max_length}")
    corpus = []
    for text in [*texts, *extra_texts, *template_texts(template)]:
        if not isinstance(text, str):
            raise TypeError(f"texts and extra_texts must hold strings, got {type(text).__name__}")
        corpus.append(text)
    # The special tokens are not learnt from text: cut them out so BPE never merges their characters.
    for token in SPECIAL_TOKENS:
        corpus = [piece for text in corpus for piece in text.split(token)]
    # In a rendered chat every turn follows a space ("ASSISTANT: Yes"), so learn the "▁word" forms too.
    corpus += [" " + text for text in corpus if text and not text[0].isspace()]

    backend = Tokenizer(models.BPE(unk_token=UNK))
    backend.pre_tokenizer = _pre_tokenizer()
    backend.decoder = decoders.Metaspace(replacement=SPACE_MARKER, prepend_scheme="never", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=list(ALPHABET),
        limit_alphabet=len(ALPHABET),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    bos_id = backend.token_to_id(BOS)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B:1", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        padding_side="right",
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
    )
