"""Opening images from users' files and data sets: one helper, one exception, one line that says why.

PIL reports a bad image in several ways (UnidentifiedImageError naming a BytesIO object, OSError for a
truncated file, DecompressionBombError, and only a *warning* for an image between one and two times its
pixel limit). Every caller wants the same thing: an RGB image, or a MatvlmError naming the file or row.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
import zlib
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .errors import MatvlmError

# What PIL's decoders raise on broken data, beside OSError (UnidentifiedImageError is one).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error, Image.DecompressionBombError)


class ImageError(MatvlmError):
    """An image that cannot be used; `reason` is the why without the where."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: cannot be read as an image ({reason})")
        self.where, self.reason = where, reason


def _reason(err: BaseException) -> str:
    if isinstance(err, UnidentifiedImageError):
        return "not a recognised image format"  # PIL's own message names a BytesIO object, not the source
    if isinstance(err, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"too large, a possible decompression bomb: {err}"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err).strip() or type(err).__name__


def open_rgb(source: str | os.PathLike | bytes | bytearray, where: str | None = None) -> Image.Image:
    """Decode a path or encoded bytes fully into an RGB image; raise ImageError naming `where` (the path
    by default) on anything PIL cannot decode, including images over PIL's decompression-bomb limit."""
    is_bytes = isinstance(source, (bytes, bytearray))
    where = where or ("image bytes" if is_bytes else str(source))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(source) if is_bytes else Path(source)) as image:
                return image.convert("RGB")  # decodes now, inside the checks, not later in the caller
    except (*_DECODE_ERRORS, Image.DecompressionBombWarning) as err:
        raise ImageError(where, _reason(err)) from None
