"""``comm web`` driven as a person uses it: the server in its own process, Debian's headless Chromium through
selenium and chromedriver, and the page's controls (what the browser test and the README's screenshot run)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from io import BytesIO
from pathlib import Path
from typing import Any

from PIL import Image

from comm.extras import require_extra
from comm.web.handlers import NO_IMAGE

CHROMIUM = "chromium"
CHROMEDRIVER = "chromedriver"
# Headless, and nothing reaching out of this machine: no QUIC, sync, component updates or background traffic.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
WINDOW = (1280, 1000)
SERVER_START_S = 600.0  # a model load on a busy 2-core machine
ANSWER_S = 300.0
WORKING = "..."  # a status line ending so means a request is running


def browser_paths() -> tuple[str, str] | None:
    """The paths of ``chromium`` and ``chromedriver`` (Debian's packages), or None when either is missing."""
    chromium, driver = shutil.which(CHROMIUM), shutil.which(CHROMEDRIVER)
    return (chromium, driver) if chromium and driver else None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll ``condition`` until it returns something true, and return that; TimeoutError naming ``what``."""
    end = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > end:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


@contextlib.contextmanager
def web_server(checkpoint: str | Path, port: int | None = None, extra_args: Sequence[str] = ()) -> Iterator[str]:
    """``comm web CHECKPOINT`` on 127.0.0.1 in its own process (CPU); yields its URL once it answers, and stops it
    (Ctrl-C, as a person would) afterwards. Its output goes to a log whose end is shown if it fails to start."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}/"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "comm", "web", str(checkpoint), "--port", str(port), "--device", "cpu"]
    with tempfile.TemporaryFile("w+") as log:
        server = subprocess.Popen([*command, *extra_args], stdout=log, stderr=subprocess.STDOUT, env=env)

        def ready() -> bool:
            if server.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"comm web exited with status {server.returncode}: {log.read()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    return response.status == 200
            except (urllib.error.URLError, OSError):
                return False

        try:
            wait_until(ready, SERVER_START_S, f"comm web to answer at {url}", interval=1.0)
            yield url
        finally:
            if server.poll() is None:
                server.send_signal(signal.SIGINT)
                try:
                    server.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    server.kill()
                    server.wait()


@contextlib.contextmanager
def headless_chromium(window: tuple[int, int] = WINDOW) -> Iterator[Any]:
    """A selenium WebDriver on Debian's headless Chromium with a fresh profile (nothing is downloaded)."""
    require_extra("selenium")
    paths = browser_paths()
    if paths is None:
        raise FileNotFoundError(
            f"{CHROMIUM} and {CHROMEDRIVER} are needed (Debian: apt-get install -y chromium chromium-driver)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    with tempfile.TemporaryDirectory(prefix="comm-chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = paths[0]
        for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={window[0]},{window[1]}"):
            options.add_argument(flag)
        driver = webdriver.Chrome(options=options, service=Service(executable_path=paths[1]))
        try:
            yield driver
        finally:
            driver.quit()


class DemoPage:
    """The ``comm web`` page in a browser, used through its controls: upload, examples, buttons, text boxes."""

    def __init__(self, driver: Any, url: str):
        self.driver = driver
        self.url = url

    def open(self) -> DemoPage:
        """Load the page and wait until its controls are there."""
        self.driver.get(self.url)
        wait_until(lambda: self._find_all("#caption-button"), ANSWER_S, "the page to load")
        return self

    def _find_all(self, css: str) -> list[Any]:
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def _find(self, css: str) -> Any:
        return wait_until(lambda: (self._find_all(css) or [None])[0], ANSWER_S, f"{css} on the page")

    def _value(self, css: str) -> str:
        """The text in a text box (``css`` names the gradio component)."""
        return self._find(f"{css} textarea, {css} input").get_attribute("value") or ""

    def model_facts(self) -> str:
        """The text of the checkpoint panel (what ``comm inspect`` prints)."""
        return self._find("#model-facts").text

    def status(self) -> str:
        """The page's status line."""
        return self._value("#status")

    def _settled(self) -> str:
        """The status line when no request is running (it does not end in "..."), else ""."""
        status = self.status()
        return "" if status.endswith(WORKING) else status

    def _act(self, action: Callable[[], None]) -> str:
        """Do ``action`` and return the status line once it has changed and no request is running."""
        before = self.status()
        action()
        wait_until(lambda: self.status() != before, ANSWER_S, f"the status line to change from {before!r}")
        return wait_until(self._settled, ANSWER_S, "the request to finish")

    def upload(self, path: str | Path) -> str:
        """Choose ``path`` in the image file box (clearing the file there first); returns the status line."""
        clear = self._find_all("#upload button[aria-label='Clear']")
        if clear:
            clear[0].click()
            # Emptying the box is a request of its own: its status must be back before the upload's is awaited.
            wait_until(lambda: self.status() == NO_IMAGE, ANSWER_S, "the file box to be emptied")
        field = self._find("#upload input[type=file]")
        return self._act(lambda: field.send_keys(str(Path(path).resolve())))

    def pick_example(self, index: int = 0) -> str:
        """Click example ``index``; returns the status line once its image is open."""
        samples = wait_until(
            lambda: self._find_all("#examples tbody tr, #examples button.gallery-item"), 30, "examples"
        )
        return self._act(samples[index].click)

    def examples(self) -> int:
        """How many examples the page offers."""
        return len(self._find_all("#examples tbody tr, #examples button.gallery-item"))

    def caption(self) -> tuple[str, str]:
        """Click Caption: (caption, status)."""
        status = self._act(self._find("#caption-button").click)
        return self._value("#caption"), status

    def _type(self, css: str, text: str) -> None:
        box = self._find(f"{css} textarea, {css} input")
        box.clear()
        box.send_keys(text)

    def ground(self, expression: str | None = None) -> tuple[str, str]:
        """Type ``expression`` (None keeps the box's text, an example's) and click Ground: (answer text, status)."""
        if expression is not None:
            self._type("#expression", expression)
        status = self._act(self._find("#ground-button").click)
        return self._value("#ground-answer"), status

    def ground_picture(self) -> Image.Image | None:
        """The picture with the box drawn, as the page shows it (fetched from the page's own image address)."""
        images = self._find_all("#ground-image img")
        source = images[0].get_attribute("src") if images else None
        if not source:
            return None
        with urllib.request.urlopen(source, timeout=30) as response:
            return Image.open(BytesIO(response.read())).convert("RGB")

    def chat_answers(self) -> list[str]:
        """The assistant's messages in the chat, in order."""
        return [element.text for element in self._find_all("#chat [data-testid='bot']")]

    def send(self, question: str) -> str:
        """Type ``question`` and click Send; returns the status line once the request is over (for a question that
        gets an error; `ask` waits for the answer)."""
        self._type("#question", question)
        return self._act(self._find("#send-button").click)

    def ask(self, question: str) -> tuple[str, str]:
        """Type ``question`` and click Send: (the new answer, status)."""
        count = len(self.chat_answers())
        self._type("#question", question)
        self._find("#send-button").click()
        wait_until(lambda: len(self.chat_answers()) > count, ANSWER_S, "an answer in the chat")
        status = wait_until(self._settled, ANSWER_S, "the answer")
        return self.chat_answers()[-1], status

    def start_over(self) -> str:
        """Click Start over; returns the status line."""
        return self._act(self._find("#start-over").click)

    def resources(self) -> list[str]:
        """Every address the page has loaded from (scripts, styles, fonts, images, API calls)."""
        script = "return performance.getEntriesByType('resource').map(e => e.name).concat([location.href])"
        return list(self.driver.execute_script(script))

    def screenshot(self, path: str | Path) -> Path:
        """A PNG of the whole page (the window grown to the page's height) at ``path``."""
        for _ in range(5):  # the page may grow with the window (a taller code panel): until it fits
            height = int(self.driver.execute_script("return document.documentElement.scrollHeight"))
            if height <= self.driver.execute_script("return window.innerHeight"):
                break
            self.driver.set_window_size(WINDOW[0], max(WINDOW[1], height + 200))
            time.sleep(0.5)
        self.driver.execute_script("window.scrollTo(0, 0)")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.driver.save_screenshot(str(path))
        return path
