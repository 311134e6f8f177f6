"""Decoding pixels, all of it: image files to RGB PIL images (`decode_image`, `to_rgb`) under
featx's size and aspect-ratio limits (`check_size`, FEATX_MAX_IMAGE_PIXELS /
FEATX_MAX_ASPECT_RATIO), and JPEGs decoded on the extraction device (the `torchvision` decoder).

On a GPU, decoding and resizing JPEGs on the CPU starves the device. With `decoder="torchvision"`
data-loader workers only read the file bytes (and the image size from its header, for the
size and aspect-ratio limits, checked before anything is decoded); the main process decodes the whole batch at once with
`torchvision.io.decode_jpeg(..., device=DEVICE)` (nvjpeg on CUDA), then resizes (antialiased)
and centre-crops on the device. Non-JPEG files and in-memory images take the PIL path in the
workers, as with the `pil` decoder.

Pixels differ slightly from PIL's resize (different antialiasing kernels), so the decoder is part
of the cache key; codes agree with the PIL path within the tolerance the tests check.
"""

from __future__ import annotations

import os
import re
import warnings

import numpy as np

from featx.errors import FeatxError, UsageError, first_line


class ImageError(FeatxError):
    """An image that cannot be decoded or is over the size limits; `str()` is 'path: reason'."""

    def __init__(self, ident: str, reason: str):
        super().__init__(f"{ident}: {reason}")
        self.ident, self.reason = ident, reason


def printable(path: str) -> str:
    """A str that always encodes to UTF-8 (non-UTF-8 file names keep their bytes as \\x escapes)."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


_BAD_LIMITS: list[str] = []  # settings that are not positive integers, reported by check_limits


def _env_limit(name: str, default: int) -> int:
    text = os.environ.get(name, "").strip()
    try:
        value = int(text) if text else default
    except ValueError:
        value = 0
    if value < 1:
        _BAD_LIMITS.append(f"{name}={text!r}: must be a positive integer (unset it for {default})")
        return default
    return value


# The most pixels an image may have, decoded or resized (Pillow's default limit; featx sets Pillow's
# own to it, so that FEATX_MAX_IMAGE_PIXELS governs both), and the widest aspect ratio it may have.
MAX_IMAGE_PIXELS = _env_limit("FEATX_MAX_IMAGE_PIXELS", 89_478_485)
MAX_ASPECT_RATIO = _env_limit("FEATX_MAX_ASPECT_RATIO", 100)
DEFAULT_LIMITS = (89_478_485, 100)


def limits_key() -> str:
    """What the size limits add to a cache key: nothing at the defaults (existing entries stay hits);
    other limits skip other images, so their codes are another entry."""
    if (MAX_IMAGE_PIXELS, MAX_ASPECT_RATIO) == DEFAULT_LIMITS:
        return ""
    return f"|limits:pixels={MAX_IMAGE_PIXELS},aspect={MAX_ASPECT_RATIO}"


def check_limits() -> None:
    """Raise UsageError when FEATX_MAX_IMAGE_PIXELS or FEATX_MAX_ASPECT_RATIO is not a positive integer."""
    if _BAD_LIMITS:
        raise UsageError(_BAD_LIMITS[0])


def check_size(ident: str, w: int, h: int, resized: tuple[int, int] | None = None) -> None:
    """Raise ImageError(ident, reason) when a w x h image, or its `resized` (w, h), is over the
    limits; called with the header's size, before anything is decoded or resized."""
    pixels, aspect = MAX_IMAGE_PIXELS, MAX_ASPECT_RATIO
    if min(w, h) < 1:
        raise ImageError(ident, f"empty ({w}x{h} pixels)")
    if w * h > pixels:
        raise ImageError(
            ident, f"too large ({w}x{h} pixels, over {pixels}); raise FEATX_MAX_IMAGE_PIXELS to allow it"
        )
    if max(w, h) > aspect * min(w, h):
        raise ImageError(
            ident,
            f"too elongated ({w}x{h} pixels, aspect ratio over {aspect}:1); "
            f"raise FEATX_MAX_ASPECT_RATIO to allow it",
        )
    if resized is not None and resized[0] * resized[1] > pixels:
        raise ImageError(
            ident,
            f"too large once resized ({w}x{h} -> {resized[0]}x{resized[1]} pixels, over {pixels}); "
            f"raise FEATX_MAX_IMAGE_PIXELS to allow it",
        )


def pil_with_limits():
    """PIL.Image with its decompression-bomb limit set to featx's (Pillow refuses images over
    twice its limit at open, whatever featx allows)."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    return Image


def decode_image(path: str, ident: str | None = None):
    """Open an image file as an RGB PIL image, or raise ImageError(ident, reason)."""
    ident = ident or printable(path)
    if not os.path.isfile(path):  # a FIFO or device would block or mislead the decoder
        raise ImageError(ident, "missing" if not os.path.exists(path) else "not a regular file")
    return _decode(path, ident)


def decode_bytes(data: bytes, ident: str):
    """An image file's bytes (e.g. a member of a tar shard) as an RGB PIL image, under the same
    limits and with the same reasons as `decode_image`."""
    import io

    return _decode(io.BytesIO(data), ident)


def _decode(source, ident: str):
    from PIL import ImageOps

    Image = pil_with_limits()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # featx applies its own limit
            with Image.open(source) as im:
                check_size(ident, *im.size)
                im.load()  # the first frame of an animation
                if im.getexif().get(0x0112, 1) != 1:  # only then: exif_transpose copies the image
                    im = ImageOps.exif_transpose(im) or im
                return to_rgb(im)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:  # over twice the limit: Pillow refuses at open
        n = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{n.group(1)} pixels, over {MAX_IMAGE_PIXELS}" if n else first_line(e)
        raise ImageError(ident, f"too large ({size}); raise FEATX_MAX_IMAGE_PIXELS to allow it") from None
    except Exception as e:  # decoders raise many types on hostile files; each is this file's fault
        reason = e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)
        raise ImageError(ident, f"cannot decode ({type(e).__name__}: {reason})") from None


def to_rgb(im):
    """Any PIL mode -> RGB; 16/32-bit integer and float images are scaled to 8 bits."""
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or (im.mode == "I" and a.max(initial=0) > 255) else 255.0
        if im.mode == "F" and a.max(initial=0) <= 1.0:
            top = 1.0
        im = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    return im if im.mode == "RGB" else im.convert("RGB")


# -- array sources -------------------------------------------------------------------------------


JPEG_MAGIC = b"\xff\xd8\xff"


class RawImages:
    """Images [start, n) for a data loader: (index, payload, error). The payload is
    ('jpeg', uint8 byte tensor) for JPEG files, or ('ready', uint8 CHW tensor) for anything
    decoded with PIL in the worker."""

    def __init__(self, loader, n: int, preprocess, start: int = 0):
        self.loader, self.n, self.pre, self.start = loader, n, preprocess, start
        self.paths = getattr(loader, "paths", None)

    def __len__(self) -> int:
        return self.n - self.start

    def __getitem__(self, k: int):
        import torch

        i = self.start + k
        try:
            if self.paths is not None:
                raw = _jpeg_bytes(self.paths[i], self.loader.ids[i], self.pre)
                if raw is not None:
                    return i, ("jpeg", torch.frombuffer(bytearray(raw), dtype=torch.uint8)), None
            return i, ("ready", self.pre.to_uint8(self.loader(i))), None
        except ImageError as e:
            return i, None, e.reason


def _jpeg_bytes(path: str, ident: str, preprocess) -> bytes | None:
    """The file's bytes when it is a JPEG whose header size, aspect ratio and resized size are
    within featx's limits (else ImageError); None for other formats."""

    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ImageError(ident, f"cannot read ({e.strerror})") from None
    if not raw.startswith(JPEG_MAGIC):
        return None
    try:
        import io
        import warnings

        Image = pil_with_limits()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # check_size says it
            with Image.open(io.BytesIO(raw)) as im:  # reads the header only
                w, h = im.size
    except Exception as e:  # a header PIL cannot parse, or a bomb: let the PIL path report it precisely
        del e
        return None
    check_size(ident, w, h, resized=preprocess.resized_size(w, h))
    return raw


def collate_raw(items):
    ok = [(i, p) for i, p, _ in items if p is not None]
    bad = [(i, err) for i, p, err in items if p is None]
    return np.array([i for i, _ in ok], dtype=np.int64), [p for _, p in ok], bad, items[-1][0] + 1


def decode_batch(payloads, preprocess, device):
    """Payloads of one batch -> (uint8 [N, 3, S, S] on `device`, kept positions, [(position, reason)])."""
    import warnings

    # torchvision 0.29 deprecates its decoders in favour of TorchCodec; they still work
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return _decode_batch(payloads, preprocess, device)


def _decode_batch(payloads, preprocess, device):
    import torch
    import torchvision.transforms.v2.functional as F
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms import InterpolationMode

    out: list = [None] * len(payloads)
    bad = []
    jpeg_pos = [k for k, (kind, _) in enumerate(payloads) if kind == "jpeg"]
    if jpeg_pos:
        datas = [payloads[k][1] for k in jpeg_pos]
        try:
            decoded = decode_jpeg(datas, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
        except RuntimeError:  # one bad file fails the batch call: find it
            decoded = []
            for k, data in zip(jpeg_pos, datas):
                try:
                    decoded.append(
                        decode_jpeg(data, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
                    )
                except RuntimeError as e:
                    decoded.append(None)
                    bad.append((k, f"cannot decode (torchvision: {first_line(e, 160)})"))
        mode = InterpolationMode(preprocess.interpolation)
        for k, img in zip(jpeg_pos, decoded):
            if img is None:
                continue
            size = (
                [preprocess.resize_size] * 2 if preprocess.crop_mode == "squash" else [preprocess.resize_size]
            )
            img = F.resize(img, size, interpolation=mode, antialias=True)
            out[k] = F.center_crop(img, [preprocess.crop_size])
    for k, (kind, t) in enumerate(payloads):
        if kind == "ready":
            out[k] = t.to(device, non_blocking=True)
    kept = [k for k, t in enumerate(out) if t is not None]
    batch = torch.stack([out[k] for k in kept]) if kept else None
    return batch, kept, bad
