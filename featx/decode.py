"""Decoding JPEGs on the extraction device (the `torchvision` decoder).

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

import numpy as np

from featx.data import ImageError, check_size

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
    from featx.data import pil_with_limits

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
                    bad.append((k, f"cannot decode (torchvision: {str(e).splitlines()[0][:160]})"))
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
