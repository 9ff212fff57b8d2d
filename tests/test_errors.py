"""Bad input across the subcommands: one line on stderr naming what and where, exit 2, nothing left
half-written (issue #18). The helpers here are shared with the other test files' error cases."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib

import pytest
from PIL import Image

from matvlm_cli.images import ImageError, open_rgb


def matvlm(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "matvlm_cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env)


def assert_one_line(result, *fragments):
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A PNG whose header claims width x height pixels: a few dozen bytes that PIL would expand to
    hundreds of megabytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def png_bytes(size=(16, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, "red").save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "data,reason",
    [
        (bomb_png(), "decompression bomb"),  # over twice PIL's limit: DecompressionBombError
        (bomb_png(10000, 10000), "decompression bomb"),  # over the limit: only a warning in PIL
        (b"not an image", "not a recognised image format"),
        (png_bytes((64, 64))[:70], "truncated"),
    ],
)
def test_open_rgb_turns_every_decoding_failure_into_one_error(data, reason):
    with pytest.raises(ImageError) as error:
        open_rgb(data, "row 3")
    message = str(error.value)
    assert message.startswith("row 3: cannot be read as an image (") and reason in message
    assert "BytesIO" not in message and "\n" not in message


def test_open_rgb_names_the_path_and_converts_to_rgb(tmp_path):
    path = tmp_path / "grey.png"
    Image.new("L", (5, 4), 7).save(path)
    image = open_rgb(path)
    assert image.mode == "RGB" and image.size == (5, 4)
    with pytest.raises(ImageError, match=f"^{tmp_path / 'missing.png'}: cannot be read as an image"):
        open_rgb(tmp_path / "missing.png")
