"""Images made on the fly for tests (importable: ``tests/`` is on ``sys.path`` through its conftest)."""

from __future__ import annotations

import struct
import zlib


def bomb_png(path, width=30000, height=30000):
    """A PNG whose header claims ``width`` x ``height`` pixels (PIL refuses it at open: more than twice
    its decompression-bomb limit) in a few hundred bytes."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grayscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path
