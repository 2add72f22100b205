"""Images: opened, checked, converted and resized in one place, for rollout, scoring and training alike.

:func:`check_image` runs before any model loads: the file exists, PIL can read its header and
verify its data, and it is under PIL's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``,
twice of which PIL refuses outright). :func:`open_image` decodes an image to RGB the way the Qwen2.5-VL
model card does (``qwen_vl_utils``' ``to_rgb``: RGBA over a white background, every other mode
through PIL's ``convert("RGB")``), with one deliberate difference: 16-bit images (PNG's ``I;16``
modes, and 32-bit integer ``I``) are scaled to 8 bits (value v -> round(v * 255 / 65535)), where
``convert`` would clip everything above 255 to white. EXIF orientation is not applied, as neither
``qwen_vl_utils`` nor the Hugging Face processors apply it.

:func:`fit_image` is the resize: for the Qwen family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, GLM-4.1V:
processors that cut images into patches merged 2 x 2) it is ``qwen_vl_utils.fetch_image`` itself,
given the processor's own pixel bounds and patch size: both sides rounded to the patch grid
(28 pixels for 14-pixel patches), the area brought inside ``[min_pixels, max_pixels]`` with the aspect
ratio kept, one PIL bicubic resize. The processor then finds the image already on its grid and does
not resize it again, so HF rollout, vLLM rollout, scoring and training all see these pixels, the
model card's. Images wider than 200:1 (``qwen_vl_utils``' limit) are refused by :func:`check_image`
at load, for every family (the Qwen resize and the Qwen2.5-VL reward model cannot take them; no
family's resize leaves such a strip readable), naming the file. An animated image (GIF, APNG, WebP)
is used by its first frame, as the processors and ``qwen_vl_utils`` use it; :func:`check_image`
says so once per file.

Images given as ``data:image/...;base64,`` URIs are decoded as ``qwen_vl_utils`` decodes them
(:func:`data_uri_bytes`), and ``http(s)://`` images are fetched once (:func:`fetch_url`); the data
loaders write both into the run's image cache, so every stage reads the same file.
A family whose processor resizes its own way (tiles, crops) has no rule here
(:data:`RESIZE_RULES`): its images go to its processor as they are.
"""

from __future__ import annotations

import os
import sys

from mpo.errors import MpoError

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
MAX_RATIO = 200  # qwen_vl_utils.vision_process.MAX_RATIO (a test keeps them equal; importing it loads torch)
FETCH_TIMEOUT_S = 30
FETCH_MAX_BYTES = 256 << 20
_ANIMATED_NOTED: set[str] = set()
_CHECKED: dict[tuple, tuple[int, int]] = {}  # (path, size, mtime) of files check_image passed -> size
FITTED = "mpo_fitted_for"  # PIL info key: the resize rule fit_image applied to this image


class ImageError(MpoError):
    """An image that cannot be used; the message names the file (the caller adds file:line)."""


def _name(image, default: str = "embedded image"):
    """What a message calls an image: its path, an open file's ``name``, else ``default``."""
    return image if isinstance(image, (str, os.PathLike)) else getattr(image, "name", default)


def _opened(path, name=None):
    """``Image.open`` with every failure as one :class:`ImageError` naming the path (an open file:
    its ``name``, or "embedded image")."""
    from PIL import Image, UnidentifiedImageError

    name = name or _name(path)
    try:
        return Image.open(path)
    except FileNotFoundError:
        raise ImageError(f"image not found: {name}") from None
    except Image.DecompressionBombError as err:
        raise ImageError(f"image too large: {name} ({err})") from None
    except IsADirectoryError:
        raise ImageError(f"image not found: {name} is a folder") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        said = str(name) if isinstance(path, (str, os.PathLike)) else ""  # not a BytesIO's repr
        raise ImageError(f"image unreadable: {name} ({str(err).replace(repr(path), said).strip()})") from None


def _too_large(path, size: tuple[int, int]) -> None:
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    if limit and size[0] * size[1] > limit:
        raise ImageError(
            f"image too large: {path} is {size[0]} x {size[1]} = {size[0] * size[1]} pixels, over PIL's "
            f"decompression-bomb limit of {limit} (PIL.Image.MAX_IMAGE_PIXELS; raise it only for files you trust)"
        )


def check_image(path: str | os.PathLike) -> tuple[int, int]:
    """Verify an image file without keeping it decoded (size, aspect ratio, data); returns its
    ``(width, height)``. An animated image is noted once on stderr: its first frame is used. A file
    that passed is not opened again in this process while its size and time stay (a run's pairs
    reloaded for training name the images its prompts' loading checked)."""
    stat = os.stat(path) if os.path.isfile(path) else None
    memo = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns) if stat else None
    if memo in _CHECKED:
        return _CHECKED[memo]
    image = _opened(path)
    with image:
        size = image.size
        _too_large(path, size)
        check_aspect(size, path)
        frames = getattr(image, "n_frames", 1)
        try:
            image.verify()
        except Exception as err:  # PIL raises many kinds for corrupt data
            raise ImageError(f"image unreadable: {path} ({err})") from None
    _note_animated(path, frames)
    if memo is not None:
        _CHECKED[memo] = size
    return size


def _note_animated(path, frames: int) -> None:
    if frames > 1 and str(path) not in _ANIMATED_NOTED:
        _ANIMATED_NOTED.add(str(path))
        print(f"note: {path} is animated ({frames} frames); its first frame is used", file=sys.stderr)


def check_bytes(data: bytes, name: str) -> None:
    """That ``data`` is an image PIL can identify; the error calls it ``name``."""
    import io

    _opened(io.BytesIO(data), name).close()


def shown(text: str, limit: int = 60) -> str:
    """``text`` cut to ``limit`` characters for a message (a data URI's base64 is never printed whole)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def data_uri_bytes(uri: str) -> bytes:
    """The bytes of a ``data:image/...;base64,`` URI, decoded as ``qwen_vl_utils.fetch_image``
    does: everything after the first ``base64,``, by ``base64.b64decode``."""
    import base64
    import binascii

    _, found, payload = uri.partition("base64,")
    if not found:
        raise ImageError(f"data URI without base64 data: {shown(uri)} (expected data:image/<type>;base64,<data>)")
    try:
        return base64.b64decode(payload)
    except (binascii.Error, ValueError) as err:
        raise ImageError(f"data URI is not valid base64: {shown(uri)} ({err})") from None


def fetch_url(url: str) -> bytes:
    """The bytes at an ``http(s)://`` URL (at most ``FETCH_MAX_BYTES``, ``FETCH_TIMEOUT_S`` per
    read), or one :class:`ImageError` saying why they could not be fetched."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, headers={"User-Agent": "mpo-vl"})
    try:
        with urllib.request.urlopen(request, timeout=FETCH_TIMEOUT_S) as response:
            data = response.read(FETCH_MAX_BYTES + 1)
    except urllib.error.HTTPError as err:
        reason = f"HTTP {err.code} {err.reason}"
    except urllib.error.URLError as err:
        reason = str(err.reason)
    except (OSError, ValueError) as err:  # timeouts, resets, malformed URLs
        reason = str(err) or type(err).__name__
    else:
        if len(data) <= FETCH_MAX_BYTES:
            return data
        reason = f"larger than {FETCH_MAX_BYTES >> 20} MB"
    raise ImageError(f"could not fetch {shown(url, 200)}: {reason}")


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
    :class:`ImageError` naming it (an animated file is noted as :func:`check_image` notes it)."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return to_rgb(image)
    name = _name(image)
    opened = _opened(image)
    with opened:
        _too_large(name, opened.size)
        try:
            opened.load()
        except Exception as err:
            raise ImageError(f"image unreadable: {name} ({err})") from None
        if isinstance(image, (str, os.PathLike)):
            _note_animated(image, getattr(opened, "n_frames", 1))
        return to_rgb(opened)


def _qwen_rule(image_processor):
    """``(min_pixels, max_pixels, patch_size)`` of a processor that resizes as Qwen2-VL does."""
    size = image_processor.size
    return size["shortest_edge"], size["longest_edge"], image_processor.patch_size


# image processor class name (its prefix) -> the rule's parameters; one entry per family that
# resizes as qwen_vl_utils does. Families not listed keep their processor's own resize.
RESIZE_RULES = {
    "Qwen2VLImageProcessor": _qwen_rule,  # Qwen2-VL and Qwen2.5-VL (and the "Fast" variant)
    "Qwen3VLImageProcessor": _qwen_rule,
    "Glm4vImageProcessor": _qwen_rule,
}


def resize_rule(image_processor):
    """The Qwen-family rule's ``(min_pixels, max_pixels, patch_size)`` for this processor, or None."""
    name = type(image_processor).__name__
    for prefix, rule in RESIZE_RULES.items():
        if name.startswith(prefix):
            return rule(image_processor)
    return None


def check_aspect(size: tuple[int, int], name) -> None:
    width, height = size
    if max(width, height) > MAX_RATIO * min(width, height):
        raise ImageError(
            f"image too thin: {name} is {width} x {height}, an aspect ratio over {MAX_RATIO}:1, which the "
            "Qwen-family resize (qwen_vl_utils) refuses; crop or pad it"
        )


def fitted_size(size: tuple[int, int], rule, name="an image") -> tuple[int, int]:
    """``(width, height)`` an image of ``size`` gets under ``rule`` (see :func:`fit_image`)."""
    from qwen_vl_utils.vision_process import SPATIAL_MERGE_SIZE, smart_resize

    low, high, patch = rule
    check_aspect(size, name)
    height, width = smart_resize(size[1], size[0], factor=patch * SPATIAL_MERGE_SIZE, min_pixels=low,
                                 max_pixels=high)
    return width, height


def fit_image(image, image_processor):
    """An image (path, open file or PIL image) opened, checked (size, aspect ratio, data) and
    resized for ``image_processor`` in one pass, the one way every stage reads an image: by the
    Qwen-family rule (``qwen_vl_utils.fetch_image``) where it has one, else as it is. An image this
    function already gave back for the same rule is returned as it is (the scorer fits each image
    once, naming the item a bad one came from, then hands the result to :class:`mpo.chat.ChatEncoder`)."""
    rule = resize_rule(image_processor)
    if getattr(image, "info", {}).get(FITTED, False) == rule:
        return image
    rgb = open_image(image)
    if rule is not None:
        from qwen_vl_utils.vision_process import fetch_image

        check_aspect(rgb.size, _name(image, "an embedded image"))
        low, high, patch = rule
        rgb = fetch_image({"image": rgb, "min_pixels": low, "max_pixels": high}, image_patch_size=patch)
    rgb.info[FITTED] = rule
    return rgb
