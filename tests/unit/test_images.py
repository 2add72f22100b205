"""Images: every failure is one line naming the file; 16-bit images are scaled, not clipped."""

from __future__ import annotations

import numpy as np
import pytest
from fixture_images import bomb_png
from PIL import Image

from mpo.data.images import ImageError, check_image, image_size, open_image


def test_a_decompression_bomb_is_one_line(tmp_path):
    bomb = bomb_png(tmp_path / "bomb.png")
    for call in (check_image, open_image, image_size):
        with pytest.raises(ImageError, match=rf"image too large: {bomb}"):
            call(bomb)


def test_an_image_over_the_warning_limit_is_refused_too(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    path = tmp_path / "big.png"
    Image.new("RGB", (12, 12)).save(path)  # 144 pixels: over the limit, under twice it
    with pytest.raises(ImageError, match=r"is 12 x 12 = 144 pixels, over PIL's decompression-bomb limit of 100"):
        check_image(path)


def test_sixteen_bit_png_is_scaled_to_eight_bits(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((6, 5), 40000, dtype=np.uint16)).save(path)
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")  # PIL keeps the 16 bits
        assert raw.convert("RGB").getpixel((0, 0)) == (255, 255, 255)  # what a plain convert does
    rgb = open_image(path)
    assert rgb.mode == "RGB" and rgb.size == (5, 6)
    assert rgb.getpixel((0, 0)) == (156, 156, 156)  # round(40000 * 255 / 65535) = 156
    Image.fromarray(np.array([[0, 65535, 257]], dtype=np.uint16)).save(path)
    assert [open_image(path).getpixel((x, 0))[0] for x in range(3)] == [0, 255, 1]


def test_rgba_goes_over_white_as_the_model_card_does(tmp_path):
    path = tmp_path / "alpha.png"
    Image.new("RGBA", (4, 4), (200, 10, 10, 0)).save(path)
    assert open_image(path).getpixel((0, 0)) == (255, 255, 255)
    Image.new("RGBA", (4, 4), (200, 10, 10, 255)).save(path)
    assert open_image(path).getpixel((0, 0)) == (200, 10, 10)


@pytest.mark.parametrize("content, expected", [(None, "image not found"), (b"not an image", "image unreadable"),
                                               (b"\x89PNG\r\n\x1a\n\0\0", "image unreadable")])
def test_missing_and_corrupt_files_name_themselves(tmp_path, content, expected):
    path = tmp_path / "x.png"
    if content is not None:
        path.write_bytes(content)
    for call in (check_image, open_image):
        with pytest.raises(ImageError, match=rf"{expected}: {path}"):
            call(path)


def test_truncated_png_fails_verification(tmp_path):
    path = tmp_path / "cut.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(ImageError, match=rf"image unreadable: {path}"):
        check_image(path)
