"""The Vicuna v1.1 conversation template and the task prompts (caption, REC, POPE), in one place."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

IMAGE_PLACEHOLDER = "<image>"

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

CAPTION_PROMPT = "Summarize the content of the photo <image>."
REC_PROMPT = "Can you point out {expression} in the image <image> and provide the coordinates of its location?"


@dataclass(frozen=True)
class RenderedConversation:
    """A conversation as one string, with the character spans the loss is computed on."""

    text: str
    target_spans: list[tuple[int, int]]

    def targets(self) -> list[str]:
        """The text of each target span (assistant replies with their end-of-turn marker)."""
        return [self.text[start:end] for start, end in self.target_spans]


@dataclass(frozen=True)
class ConversationTemplate:
    """A two-role chat template in the FastChat ``SeparatorStyle.TWO`` style (Vicuna v1.1).

    ``SYSTEM USER: q1 ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>``
    """

    system: str = VICUNA_SYSTEM
    user_role: str = "USER"
    assistant_role: str = "ASSISTANT"
    sep: str = " "
    end_of_turn: str = "</s>"

    def render(self, turns: Sequence[tuple[str, str]]) -> RenderedConversation:
        """Render ``(question, answer)`` turns; each answer (with the space before it) is a target span.

        The space after ``ASSISTANT:`` belongs to the answer because SentencePiece tokenizers glue it to the
        first word ("▁Yes"), so no token straddles a prompt/answer boundary.
        """
        text = self.system + self.sep
        spans = []
        for question, answer in turns:
            text += f"{self.user_role}: {question}{self.sep}{self.assistant_role}:"
            start = len(text)
            text += f" {answer}{self.end_of_turn}"
            spans.append((start, len(text)))
        return RenderedConversation(text=text, target_spans=spans)

    def prompt(self, question: str, history: Sequence[tuple[str, str]] = ()) -> str:
        """The text the model continues to answer ``question`` after ``history``."""
        prefix = self.render(history).text if history else self.system + self.sep
        return f"{prefix}{self.user_role}: {question}{self.sep}{self.assistant_role}:"


VICUNA_V1 = ConversationTemplate()


def with_image(question: str) -> str:
    """Make sure ``question`` carries exactly one image placeholder (LLaVA puts it first)."""
    return question if IMAGE_PLACEHOLDER in question else f"{IMAGE_PLACEHOLDER}\n{question}"


def rec_prompt(expression: str) -> str:
    """The Shikra-style referring-expression question for ``expression``."""
    return REC_PROMPT.format(expression=expression)
