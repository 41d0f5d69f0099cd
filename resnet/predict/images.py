"""Any image file to what the export takes: decode, resize the shorter side to 32, centre crop.

The steps are torchvision's ``Resize(32)`` + ``CenterCrop(32)`` on a PIL image (bilinear,
antialiased; the same output sizes and crop offsets), the usual evaluation transform of a
classifier trained on 32 x 32 images: the whole image, scaled down, minus the ends of its longer
side. Before them: the EXIF orientation is applied (photos from phones), every mode becomes
8-bit RGB (greyscale is repeated over the channels, alpha and palettes are dropped as
``convert("RGB")`` drops them, 16-bit channels keep their top 8 bits), and a JPEG at least twice
as large as needed is decoded at 1/2, 1/4 or 1/8 scale by libjpeg (``Image.draft``, as
``thumbnail`` does), still at least 32 pixels on its shorter side.

A file that is not an image, or is truncated or corrupt, raises ``Unreadable`` with a short
reason; ``decode_many`` turns that into a skip, so one bad file never stops a batch.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

SIZE = 32  # the export's input: float32 N x 3 x 32 x 32 in [0, 1]
ORIENTATION = 0x0112  # the EXIF tag
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16 bits per pixel (PNG, TIFF)


class Unreadable(Exception):
    """A file that gives no image; the message is the reason listed in summary.json."""


def decode(data: bytes) -> tuple[np.ndarray, int, int]:
    """(uint8 32 x 32 x 3 RGB, width, height of the image as shown, after EXIF orientation)."""
    if not data:
        raise Unreadable("empty file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            orientation = _orientation(img)
            width, height = img.size
            if orientation in (5, 6, 7, 8):  # a quarter turn: shown as height x width
                width, height = height, width
            if img.format == "JPEG":
                img.draft("RGB", (SIZE, SIZE))  # decode at a reduced scale, >= 32 x 32
            rgb = _to_rgb(img)
    except UnidentifiedImageError:
        raise Unreadable("not an image (no format Pillow reads)") from None
    except Image.DecompressionBombError as exc:
        raise Unreadable(f"too large to decode ({exc})") from None
    except Exception as exc:  # truncated and corrupt files fail in many ways inside Pillow
        raise Unreadable(f"corrupt image ({type(exc).__name__}: {_short(exc)})") from None
    if orientation not in (None, 1):
        rgb = _transpose(rgb, orientation)  # on the (drafted) RGB image: cheaper, same pixels
    return np.asarray(resize_and_crop(rgb)), width, height


def resize_and_crop(img: Image.Image, size: int = SIZE) -> Image.Image:
    """Shorter side to ``size`` (bilinear, antialiased), then the centre ``size`` x ``size``,
    with torchvision's rounding of the longer side and of the crop offsets."""
    width, height = img.size
    if (width, height) != (size, size):
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(size * long / short)
        new = (size, new_long) if width <= height else (new_long, size)
        if new != (width, height):
            img = img.resize(new, Image.BILINEAR)
        width, height = img.size
        top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
        img = img.crop((left, top, left + size, top + size))
    return img


def decode_many(blobs: list[bytes | None]) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                    list[str | None]]:
    """Decode a batch: (uint8 M x 32 x 32 x 3 of the M readable files, width and height per
    file (int32, 0 when skipped), the reason per file or None)."""
    images, widths, heights, reasons = [], [], [], []
    with warnings.catch_warnings():  # Pillow's notes on odd files (EXIF, palettes) are no news
        warnings.simplefilter("ignore")
        for blob in blobs:
            try:
                pixels, width, height = decode(blob if blob is not None else b"")
            except Unreadable as exc:
                reasons.append(str(exc))
                widths.append(0), heights.append(0)
                continue
            images.append(pixels)
            widths.append(width), heights.append(height)
            reasons.append(None)
    stacked = np.stack(images) if images else np.zeros((0, SIZE, SIZE, 3), np.uint8)
    return stacked, np.array(widths, np.int32), np.array(heights, np.int32), reasons


def to_input(images: np.ndarray, device="cpu"):
    """uint8 N x 32 x 32 x 3 -> the export's float32 N x 3 x 32 x 32 in [0, 1] on ``device``
    (channels converted on the device: a quarter of the bytes cross to a GPU)."""
    import torch
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device, non_blocking=True)
    return x.permute(0, 3, 1, 2).float().div_(255).contiguous()


def _orientation(img: Image.Image) -> int | None:
    try:
        return img.getexif().get(ORIENTATION)
    except Exception:  # a malformed EXIF block: show the image as stored
        return None


def _transpose(img: Image.Image, orientation: int) -> Image.Image:
    method = {2: Image.FLIP_LEFT_RIGHT, 3: Image.ROTATE_180, 4: Image.FLIP_TOP_BOTTOM,
              5: Image.TRANSPOSE, 6: Image.ROTATE_270, 7: Image.TRANSVERSE,
              8: Image.ROTATE_90}.get(orientation)
    return img.transpose(method) if method is not None else img


def _to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB; 16-bit greyscale scaled down (v / 257: 65535 -> 255), not clipped."""
    if img.mode in _SIXTEEN_BIT:
        values = np.asarray(img, dtype=np.float32)
        grey = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    return img.convert("RGB")  # also loads (decodes) the pixels


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:120] if text else "no detail"
