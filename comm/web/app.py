"""The web demo's page (gradio Blocks) and its server: ``comm web [CHECKPOINT]``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from comm.extras import require_extra
from comm.pipeline import CommPipeline
from comm.web import DEFAULT_HOST, DEFAULT_PORT
from comm.web.checkpoint import Example, model_facts
from comm.web.handlers import WebHandlers

if TYPE_CHECKING:
    import gradio

MAX_UPLOAD = "50mb"
TITLE = "COMM web demo"
INTRO = (
    "Upload an image or pick an example, then **caption** it, **ground** a referring expression (the box is drawn "
    "on the image) or **chat** about it over several turns. One request runs at a time."
)


def import_gradio() -> Any:
    """gradio, with its telemetry and version check off, or a one-line error naming the ``web`` extra."""
    require_extra("gradio")
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read when gradio is imported and when a page is built
    import gradio

    return gradio


def build_app(
    pipe: CommPipeline, checkpoint: str | Path, examples: Sequence[Example] = (), max_new_tokens: int | None = None
) -> gradio.Blocks:
    """The demo page for ``pipe``: image upload and examples, caption, ground, chat, and the checkpoint's facts."""
    gr = import_gradio()
    handlers = WebHandlers(pipe, max_new_tokens)
    with gr.Blocks(title=TITLE, analytics_enabled=False) as app:
        gr.Markdown(f"# {TITLE}\n{INTRO}")
        image_state = gr.State(None)
        turns = gr.State([])
        status = gr.Textbox(
            label="Status", value="upload an image or pick an example", interactive=False, elem_id="status"
        )
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="Image file", type="filepath", file_types=["image"], elem_id="upload")
                preview = gr.Image(label="Image", type="pil", interactive=False, format="png", elem_id="preview")
            with gr.Column(scale=1):
                caption_button = gr.Button("Caption", variant="primary", elem_id="caption-button")
                caption = gr.Textbox(label="Caption", interactive=False, elem_id="caption")
                expression = gr.Textbox(
                    label="Referring expression", placeholder="the red circle", elem_id="expression"
                )
                ground_button = gr.Button("Ground", variant="primary", elem_id="ground-button")
                ground_text = gr.Textbox(label="Answer and box", lines=2, interactive=False, elem_id="ground-answer")
                ground_image = gr.Image(
                    label="Box", type="pil", interactive=False, format="png", elem_id="ground-image"
                )
        if examples:
            gr.Examples(
                [[str(example.image), example.expression] for example in examples],
                inputs=[upload, expression],
                label="Examples",
                elem_id="examples",
            )
        gr.Markdown("## Chat about the image")
        chatbot = gr.Chatbot(label="Chat", height=300, elem_id="chat")
        with gr.Row():
            message = gr.Textbox(
                label="Question", placeholder="What colour is the circle?", scale=4, elem_id="question"
            )
            send = gr.Button("Send", variant="primary", scale=1, elem_id="send-button")
            start_over = gr.Button("Start over", scale=1, elem_id="start-over")
        with gr.Accordion("Checkpoint", open=True):
            gr.Code(model_facts(checkpoint, pipe), language=None, label="comm inspect", elem_id="model-facts")

        # Model calls take no queue slot limit: the handlers answer a second request with a busy message at once.
        model_call = {"concurrency_limit": None, "show_progress": "minimal"}
        upload.change(
            handlers.open_image,
            inputs=upload,
            outputs=[preview, image_state, caption, ground_text, ground_image, chatbot, turns, status],
        )
        caption_button.click(handlers.caption, inputs=image_state, outputs=[caption, status], **model_call)
        ground_inputs = {"inputs": [image_state, expression], "outputs": [ground_text, ground_image, status]}
        ground_button.click(handlers.ground, **ground_inputs, **model_call)
        expression.submit(handlers.ground, **ground_inputs, **model_call)
        chat_inputs = {"inputs": [image_state, message, turns], "outputs": [chatbot, turns, message, status]}
        send.click(handlers.chat, **chat_inputs, **model_call)
        message.submit(handlers.chat, **chat_inputs, **model_call)
        start_over.click(handlers.start_over, outputs=[chatbot, turns, message, status])
    return app


def serve(
    checkpoint: str | Path,
    device: str | None = None,
    dtype: str | None = None,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    examples: Sequence[Example] = (),
    max_new_tokens: int | None = None,
    share: bool = False,
) -> None:
    """Load ``checkpoint`` (`comm.loading.load_model_and_processor`) and serve its page on ``host:port`` until
    Ctrl-C; a public gradio link only with ``share``."""
    import_gradio()  # before the slow model load: a missing extra is one line at once
    from transformers.utils import logging as hf_logging

    from comm.loading import load_model_and_processor

    hf_logging.disable_progress_bar()
    pipe = CommPipeline(*load_model_and_processor(checkpoint, device, dtype))
    app = build_app(pipe, checkpoint, examples, max_new_tokens)
    app.queue()
    _, local_url, share_url = app.launch(
        server_name=host,
        server_port=port,
        share=share,
        quiet=True,
        show_error=True,
        ssr_mode=False,
        max_file_size=MAX_UPLOAD,
        allowed_paths=[str(example.image.resolve()) for example in examples],
        prevent_thread_lock=True,
    )
    print(f"comm web: serving {checkpoint} at {local_url}" + (f" and {share_url}" if share_url else ""), flush=True)
    print("Ctrl-C stops it", flush=True)
    app.block_thread()
