"""The conversation templates (Vicuna v1.1, ChatML) and the task prompts (caption, REC, POPE), in one place."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

IMAGE_PLACEHOLDER = "<image>"

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

CAPTION_PROMPT = "Summarize the content of the photo <image>."
REC_PROMPT = "Can you point out {expression} in the image <image> and provide the coordinates of its location?"

# Template styles: FastChat's SeparatorStyle.TWO (Vicuna v1.1) and ChatML (SmolLM2, Qwen2...).
STYLES = ("two", "chatml")
CHATML_TURN_START = "<|im_start|>"


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
    """A two-role chat template, in the FastChat ``SeparatorStyle.TWO`` style (Vicuna v1.1) or ChatML.

    ``style="two"``: ``SYSTEM USER: q1 ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>``; with ``system=""`` the text
    starts at ``USER:``. ``style="chatml"`` (`chatml`): ``<|im_start|>system\nSYSTEM<|im_end|>\n<|im_start|>user\nq1``
    ``<|im_end|>\n<|im_start|>assistant\na1<|im_end|>\n...``, with ``sep`` after each role name and each turn's end.
    """

    system: str = VICUNA_SYSTEM
    user_role: str = "USER"
    assistant_role: str = "ASSISTANT"
    sep: str = " "
    end_of_turn: str = "</s>"
    style: str = "two"

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise ValueError(f"unknown conversation template style {self.style!r}; known: {list(STYLES)}")

    @classmethod
    def from_dict(cls, settings: Mapping[str, Any]) -> ConversationTemplate:
        """A template from its saved fields (`to_dict`); a field left out keeps its Vicuna v1.1 default."""
        if not isinstance(settings, Mapping):
            raise ValueError(f"a conversation template must be a dict of its fields, got {type(settings).__name__}")
        names = {field.name for field in fields(cls)}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise ValueError(f"unknown conversation template field(s) {unknown}; known: {sorted(names)}")
        wrong = [name for name, value in settings.items() if not isinstance(value, str)]
        if wrong:
            raise ValueError(f"conversation template field(s) {wrong} must be strings")
        return cls(**settings)

    def to_dict(self) -> dict[str, str]:
        """The fields as a JSON-ready dict (saved with the processor)."""
        return asdict(self)

    @property
    def reply_prefix(self) -> str:
        """What comes between the prompt (`prompt`'s text) and the reply's first word: a space in the TWO style."""
        return " " if self.style == "two" else ""

    def _start(self) -> str:
        if not self.system:
            return ""
        if self.style == "chatml":
            return f"{CHATML_TURN_START}system{self.sep}{self.system}{self.end_of_turn}{self.sep}"
        return self.system + self.sep

    def _question(self, question: str) -> str:
        if self.style == "chatml":
            return (
                f"{CHATML_TURN_START}{self.user_role}{self.sep}{question}{self.end_of_turn}{self.sep}"
                f"{CHATML_TURN_START}{self.assistant_role}{self.sep}"
            )
        return f"{self.user_role}: {question}{self.sep}{self.assistant_role}:"

    def render(self, turns: Sequence[tuple[str, str]]) -> RenderedConversation:
        """Render ``(question, answer)`` turns; each answer (with `reply_prefix` before it) is a target span.

        The space after ``ASSISTANT:`` belongs to the answer because SentencePiece tokenizers glue it to the
        first word ("▁Yes"), so no token straddles a prompt/answer boundary. In ChatML the reply starts after the
        newline that ends the assistant's header, and the newline after its end-of-turn is outside the target.
        """
        text = self._start()
        spans = []
        for question, answer in turns:
            text += self._question(question)
            start = len(text)
            text += f"{self.reply_prefix}{answer}{self.end_of_turn}"
            spans.append((start, len(text)))
            if self.style == "chatml":
                text += self.sep
        return RenderedConversation(text=text, target_spans=spans)

    def prompt(self, question: str, history: Sequence[tuple[str, str]] = ()) -> str:
        """The text the model continues to answer ``question`` after ``history``."""
        prefix = self.render(history).text if history else self._start()
        return prefix + self._question(question)

    def chat_template(self) -> str:
        """This template as a transformers Jinja chat template (what ``apply_chat_template`` renders).

        Messages are ``{"role": "system" | "user" | "assistant", "content": str | [{"type": "image"}, {"type":
        "text", "text": ...}]}``; a first system message replaces `system`; in a message, each image becomes
        ``<image>\\n`` in front of the text (as `with_image` puts it). With ``add_generation_prompt=True`` the
        result equals `prompt`, without it a conversation ending on a reply equals `render`'s text.
        """
        literal = {name: json.dumps(value) for name, value in self.to_dict().items()}
        image = json.dumps(f"{IMAGE_PLACEHOLDER}\n")
        if self.style == "chatml":
            turn, sep, end = json.dumps(CHATML_TURN_START), literal["sep"], literal["end_of_turn"]
            system_text = f"{turn} + 'system' + {sep} + system + {end} + {sep}"
            user_text = f"{turn} + {literal['user_role']} + {sep} + text + {end} + {sep}"
            assistant_text = f"{turn} + {literal['assistant_role']} + {sep} + text + {end} + {sep}"
            generation_prompt = f"{turn} + {literal['assistant_role']} + {sep}"
        else:
            system_text = f"system + {literal['sep']}"
            user_text = f"{literal['user_role']} + ': ' + text + {literal['sep']}"
            assistant_text = f"{literal['assistant_role']} + ': ' + text + {literal['end_of_turn']}"
            generation_prompt = f"{literal['assistant_role']} + ':'"
        return (
            f"{{%- set system = {literal['system']} -%}}"
            "{%- if messages and messages[0]['role'] == 'system' -%}"
            "{%- set content = messages[0]['content'] -%}"
            "{%- set system = content if content is string "
            "else content | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') -%}"
            "{%- set messages = messages[1:] -%}"
            "{%- endif -%}"
            f"{{%- if system -%}}{{{{ {system_text} }}}}{{%- endif -%}}"
            "{%- for message in messages -%}"
            "{%- if message['role'] != ('user' if loop.index0 % 2 == 0 else 'assistant') -%}"
            "{{ raise_exception('roles must alternate user, assistant, user... (after an optional system message)') }}"
            "{%- endif -%}"
            "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
            "{%- else -%}"
            f"{{%- set text = {image} * (message['content'] | selectattr('type', 'equalto', 'image') | list | length)"
            " + message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') -%}"
            "{%- endif -%}"
            "{%- if message['role'] == 'user' -%}"
            f"{{{{ {user_text} }}}}"
            "{%- else -%}"
            f"{{{{ {assistant_text} }}}}"
            "{%- endif -%}"
            "{%- endfor -%}"
            f"{{%- if add_generation_prompt -%}}{{{{ {generation_prompt} }}}}{{%- endif -%}}"
        )


VICUNA_V1 = ConversationTemplate()


def chatml(system: str = "") -> ConversationTemplate:
    """The ChatML template (SmolLM2, Qwen2...): ``<|im_start|>user\n...<|im_end|>\n<|im_start|>assistant\n``.

    ``system=""`` leaves the system turn out; give the LLM's own default system prompt to render exactly as its
    tokenizer's chat template does.
    """
    return ConversationTemplate(
        system=system, user_role="user", assistant_role="assistant", sep="\n", end_of_turn="<|im_end|>", style="chatml"
    )


def with_image(question: str) -> str:
    """Make sure ``question`` carries exactly one image placeholder (LLaVA puts it first)."""
    return question if IMAGE_PLACEHOLDER in question else f"{IMAGE_PLACEHOLDER}\n{question}"


def rec_prompt(expression: str) -> str:
    """The Shikra-style referring-expression question for ``expression``."""
    return REC_PROMPT.format(expression=expression)


def template_for_tokenizer(tokenizer: Any, default: ConversationTemplate) -> ConversationTemplate:
    """The chat format ``tokenizer``'s own chat template uses when comm has it (ChatML), else ``default``.

    A pretrained chat LLM ends its turns with its own end-of-turn token: rendered in another format, its answers
    would never end.
    """
    chat_template = getattr(tokenizer, "chat_template", None) or ""
    return chatml() if isinstance(chat_template, str) and "<|im_start|>" in chat_template else default
