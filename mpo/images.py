"""Images: opened, checked and converted in one place, for rollout, scoring and training alike.

:func:`check_image` runs before any model loads: the file exists, PIL can read its header and
verify its data, and it is under PIL's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``,
twice of which PIL refuses outright). :func:`open_image` decodes an image to RGB the way the Qwen2.5-VL
model card does (``qwen_vl_utils``' ``to_rgb``: RGBA over a white background, every other mode
through PIL's ``convert("RGB")``), with one deliberate difference: 16-bit images (PNG's ``I;16``
modes, and 32-bit integer ``I``) are scaled to 8 bits (value v -> round(v * 255 / 65535)), where
``convert`` would clip everything above 255 to white. EXIF orientation is not applied, as neither
``qwen_vl_utils`` nor the Hugging Face processors apply it.
"""

from __future__ import annotations

import os

from mpo.errors import MpoError

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageError(MpoError):
    """An image that cannot be used; the message names the file (the caller adds file:line)."""


def _opened(path):
    """``Image.open`` with every failure as one :class:`ImageError` naming the path (an open file:
    its ``name``, or "embedded image")."""
    from PIL import Image, UnidentifiedImageError

    name = path if isinstance(path, (str, os.PathLike)) else getattr(path, "name", "embedded image")
    try:
        return Image.open(path)
    except FileNotFoundError:
        raise ImageError(f"image not found: {name}") from None
    except Image.DecompressionBombError as err:
        raise ImageError(f"image too large: {name} ({err})") from None
    except IsADirectoryError:
        raise ImageError(f"image not found: {name} is a folder") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"image unreadable: {name} ({str(err).replace(repr(path), str(name))})") from None


def _too_large(path, size: tuple[int, int]) -> None:
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    if limit and size[0] * size[1] > limit:
        raise ImageError(
            f"image too large: {path} is {size[0]} x {size[1]} = {size[0] * size[1]} pixels, over PIL's "
            f"decompression-bomb limit of {limit} (PIL.Image.MAX_IMAGE_PIXELS; raise it only for files you trust)"
        )


def check_image(path: str | os.PathLike) -> tuple[int, int]:
    """Verify an image file without keeping it decoded; returns its ``(width, height)``."""
    image = _opened(path)
    with image:
        size = image.size
        _too_large(path, size)
        try:
            image.verify()
        except Exception as err:  # PIL raises many kinds for corrupt data
            raise ImageError(f"image unreadable: {path} ({err})") from None
    return size


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` from the header alone."""
    with _opened(path) as image:
        return image.size


def to_rgb(image):
    """A PIL image as RGB: 16-bit scaled to 8 bits, RGBA over white, the rest by ``convert("RGB")``."""
    from PIL import Image

    if image.mode in SIXTEEN_BIT_MODES:
        import numpy as np

        values = np.asarray(image, dtype=np.int64).clip(0, 65535)
        image = Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8))
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.split()[3])
        return background
    return image.convert("RGB")


def open_image(image):
    """A path, an open binary file or a PIL image as an RGB PIL image; a bad file is an
    :class:`ImageError` naming it."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return to_rgb(image)
    name = image if isinstance(image, (str, os.PathLike)) else getattr(image, "name", "embedded image")
    opened = _opened(image)
    with opened:
        _too_large(name, opened.size)
        try:
            opened.load()
        except Exception as err:
            raise ImageError(f"image unreadable: {name} ({err})") from None
        return to_rgb(opened)
