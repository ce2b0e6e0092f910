"""What a usable image is, decided in one place: training data checks, the processor, evaluation and the pipeline.

An image file is usable when it exists, PIL can read it, its header names a size from 2x2 pixels up to PIL's
``Image.MAX_IMAGE_PIXELS`` (about 89 million by default), and it decodes. The size is checked from the header
before anything is decoded, so a small file that claims a huge image (a decompression bomb) costs nothing. An
image already in memory (PIL image, array) needs only the 2x2 minimum.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

ImageInput = Image.Image | str | Path | np.ndarray

# Kinds of `UnusableImageError`; training reports them under the same names (`comm.data.issues.IssueKind`).
UNREADABLE_IMAGE = "unreadable_image"
IMAGE_TOO_LARGE = "image_too_large"


class UnusableImageError(ValueError):
    """An image that exists but cannot be used; ``kind`` is `UNREADABLE_IMAGE` or `IMAGE_TOO_LARGE`."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@contextlib.contextmanager
def _bomb_warnings_silenced() -> Iterator[None]:
    """PIL's DecompressionBombWarning silenced: every image it warns about is over the limit and refused here.

    Entered in the calling thread only (``warnings.catch_warnings`` is not thread-safe), around a whole thread pool.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


def check_image_size(width: int, height: int, what: str = "image", limit: bool = True) -> None:
    """Raise `UnusableImageError` for an image under 2x2 pixels or (with ``limit``) over ``Image.MAX_IMAGE_PIXELS``."""
    if min(width, height) < 2:
        raise UnusableImageError(
            UNREADABLE_IMAGE, f"{what}: image of size {width}x{height} is too small (at least 2x2 pixels)"
        )
    most = Image.MAX_IMAGE_PIXELS
    if limit and most is not None and width * height > most:
        raise UnusableImageError(
            IMAGE_TOO_LARGE,
            f"{what}: image of size {width}x{height} is too large ({width * height} pixels, over "
            f"PIL.Image.MAX_IMAGE_PIXELS = {most}), refused unread as a possible decompression bomb",
        )


@contextlib.contextmanager
def _open_checked(path: Path, name: str) -> Iterator[Image.Image]:
    """The image file opened (header read, nothing decoded), once its size has passed `check_image_size`."""
    if not path.is_file():
        raise FileNotFoundError(f"{name}: no such image file: {path}")
    what = f"{name}: {path}"
    try:
        image = Image.open(path)
    except Image.DecompressionBombError as error:  # PIL's own refusal, above twice its limit
        raise UnusableImageError(
            IMAGE_TOO_LARGE, f"{what}: image too large, refused unread as a possible decompression bomb ({error})"
        ) from None
    except Exception as error:  # whatever a hostile file makes a PIL plugin raise, the file is unreadable
        raise UnusableImageError(UNREADABLE_IMAGE, f"{what} is not a readable image ({error})") from None
    with image:
        check_image_size(*image.size, what)
        yield image


def _decode(image: Image.Image, what: str) -> None:
    """Decode an opened image file's pixels, or raise `UnusableImageError`."""
    try:
        image.load()
    except Exception as error:  # a truncated or hostile file can make any decoder fail, with any error
        raise UnusableImageError(UNREADABLE_IMAGE, f"{what} is not a readable image ({error})") from None


def _read_size(path: Path, decode: bool) -> tuple[int, int]:
    with _open_checked(path, "image") as image:
        if decode:
            _decode(image, f"image: {path}")
        return image.size


def read_image_sizes(
    paths: Sequence[Path], decode: bool = False, workers: int = 8
) -> dict[Path, tuple[int, int] | FileNotFoundError | UnusableImageError]:
    """``(width, height)`` of each usable image file from its header (and a full decode with ``decode``), or why not.

    A missing file gets a FileNotFoundError, an unusable one an `UnusableImageError`; the files are read in a
    thread pool (header reads wait on the disk).
    """

    def one(path: Path) -> tuple[int, int] | FileNotFoundError | UnusableImageError:
        try:
            return _read_size(path, decode)
        except (FileNotFoundError, UnusableImageError) as error:
            return error

    unique = sorted(set(paths))
    with _bomb_warnings_silenced():
        if len(unique) < 64 or workers <= 1:
            return {path: one(path) for path in unique}
        with ThreadPoolExecutor(workers) as pool:
            return dict(zip(unique, pool.map(one, unique)))


def load_image(image: ImageInput, name: str = "image") -> Image.Image:
    """A usable image as RGB from a PIL image, a path or an HxW(x1/3/4) array; errors name ``name`` and the file.

    A path is decoded once; an RGB PIL image comes back as it is (not copied), so loading an already loaded image
    again only re-checks its size.

    Raises FileNotFoundError for a missing file, `UnusableImageError` (a ValueError) for an unusable image,
    ValueError for an array of the wrong shape and TypeError for anything else.
    """
    if isinstance(image, (str, Path)):
        path = Path(image)
        with _bomb_warnings_silenced(), _open_checked(path, name) as opened:
            _decode(opened, f"{name}: {path}")
        return to_rgb(opened)  # decoded: closing the file keeps the pixels (no copy needed)
    if isinstance(image, np.ndarray):
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            raise ValueError(f"{name}: expected an HxW or HxWxC array with C in 1/3/4, got shape {image.shape}")
        check_image_size(image.shape[1], image.shape[0], name, limit=False)
        array = image if image.dtype == np.uint8 else np.clip(image, 0, 255).astype(np.uint8)
        pil = Image.fromarray(array.squeeze(2) if array.ndim == 3 and array.shape[2] == 1 else array)
    elif isinstance(image, Image.Image):
        pil = image
    else:
        raise TypeError(f"{name}: expected a PIL image, a path or a numpy array, got {type(image).__name__}")
    check_image_size(*pil.size, name, limit=False)
    return to_rgb(pil)


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert any PIL mode (RGBA, LA, L, P, CMYK, I;16...) to RGB; transparency is composited on ``background``."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if image.mode.startswith("I;16") or image.mode == "I":
        array = np.asarray(image, dtype=np.float32)
        scale = 255.0 / max(float(array.max()), 1.0)
        return Image.fromarray((array * scale).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")
