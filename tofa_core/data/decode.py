"""Decoding one image into uint8 pixels, or the reason it cannot be (a quarantine entry).

Runs in worker processes, so it imports nothing heavy (no torch) and touches no global
state: Pillow's own decompression-bomb guard stays on, and our stricter pixel limit is
checked on the header before any pixel is decoded.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

# Modes converted losslessly (or by dropping alpha) to L or RGB; anything else (16-bit,
# float, ...) is quarantined rather than silently rescaled.
_GRAY = {"1": "L", "L": "L", "LA": "L"}
_COLOUR = {"RGB": "RGB", "RGBA": "RGB", "P": "RGB", "PA": "RGB", "CMYK": "RGB", "YCbCr": "RGB"}
# The formats a source may hold. Pillow's other decoders are never tried, so no file reaches
# a rarely used parser or an outside program (EPS would start Ghostscript).
FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP")


@dataclass(slots=True)
class Decoded:
    source_id: str
    content_hash: str = ""
    height: int = 0
    width: int = 0
    channels: int = 0
    pixels: bytes = b""  # HWC uint8
    error: str = ""  # non-empty: the quarantine reason
    offset: int = -1  # where the ingest parked `pixels` in its spill file (then pixels is empty)


def content_hash(pixels: np.ndarray) -> str:
    """Identity of an image: its decoded pixels and shape, not its file encoding."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr(pixels.shape).encode())
    h.update(pixels.tobytes())
    return h.hexdigest()


def from_array(source_id: str, pixels: np.ndarray) -> Decoded:
    """Wrap already-decoded pixels (HW or HWC uint8)."""
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    h, w, c = pixels.shape
    return Decoded(source_id, content_hash(pixels), h, w, c, pixels.tobytes())


def decode_bytes(source_id: str, data: bytes, max_pixels: int, image_size: int | None) -> Decoded:
    try:
        with warnings.catch_warnings():
            # Pillow warns (rather than fails) between its limit and twice it: fail instead.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=FORMATS) as img:
                w, h = img.size
                if w * h > max_pixels:
                    return Decoded(
                        source_id, error=f"decompression bomb: {w}x{h} exceeds max_pixels={max_pixels}"
                    )
                mode = img.mode
                target = _GRAY.get(mode) or _COLOUR.get(mode)
                if target is None:
                    return Decoded(source_id, error=f"unsupported image mode {mode!r}")
                img.load()
                img = img.convert(target) if img.mode != target else img
                if image_size and img.size != (image_size, image_size):
                    img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
                pixels = np.asarray(img, dtype=np.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        return Decoded(source_id, error=f"decompression bomb: {err}")
    except UnidentifiedImageError:
        return Decoded(source_id, error=f"not an image: none of {', '.join(FORMATS)}")
    except (OSError, SyntaxError, ValueError) as err:  # truncated or corrupt files
        return Decoded(source_id, error=f"corrupt image: {err}")
    return from_array(source_id, pixels)
