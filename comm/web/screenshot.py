"""A screenshot of the ``comm web`` page after grounding: ``python -m comm.web.screenshot CHECKPOINT OUT.png``.

It runs the browser test's code path (`comm.web.browser`): the server in its own process, headless Chromium, an
example image opened and captioned, and its expression grounded. The examples are tried in turn until an answer
holds a box, so the picture shows one when the model gives one.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from comm.errors import ArgumentParser, UserError, run_command
from comm.web.browser import DemoPage, headless_chromium, web_server

BOX_DRAWN = "box drawn"


def screenshot_after_grounding(page: DemoPage, out: str | Path) -> tuple[Path, str]:
    """On an open page: pick each example in turn, caption it and ground its expression, until an answer holds a
    box (or none is left); then save the whole page to ``out``. Returns the file and the last status line."""
    count = page.examples()
    if count == 0:
        raise UserError("the page offers no example images (a `comm demo` checkpoint comes with them)")
    status = ""
    for index in range(count):
        page.pick_example(index)
        page.caption()
        _, status = page.ground()
        if status == BOX_DRAWN:
            break
    return page.screenshot(out), status


def take_screenshot(checkpoint: str | Path, out: str | Path) -> tuple[Path, str]:
    """Serve ``checkpoint`` with ``comm web``, open it in headless Chromium and `screenshot_after_grounding`."""
    with web_server(checkpoint) as url, headless_chromium() as driver:
        return screenshot_after_grounding(DemoPage(driver, url).open(), out)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: ``CHECKPOINT OUT.png``."""
    parser = ArgumentParser(prog="python -m comm.web.screenshot", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="a COMM checkpoint `comm demo` trained")
    parser.add_argument("out", metavar="OUT.png", help="where to write the screenshot")
    args: argparse.Namespace = parser.parse_args(argv)

    def body() -> int:
        path, status = take_screenshot(args.checkpoint, args.out)
        print(f"wrote {path} (status: {status})")
        return 0

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
