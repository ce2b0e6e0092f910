"""The browser demo (``comm web``): a gradio page that captions, grounds and chats with any COMM checkpoint.

gradio is the optional ``web`` extra: only `comm.web.app` imports it, inside its functions, so every module here
imports without it.
"""

DEFAULT_HOST = "127.0.0.1"  # this machine only: nothing is reachable from elsewhere unless asked (--host, --share)
DEFAULT_PORT = 7860
