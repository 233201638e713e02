"""Images for training and evaluation, as float tensors (N, C, H, W) scaled to [-1, 1] (§4: "We
assume that image data consists of integers in {0, ..., 255} scaled linearly to [-1, 1]").

Three sources, named by a spec string:
- `digits` (the default, offline): the 1,797 handwritten 8×8 digits that ship inside scikit-learn
  (`sklearn.datasets.load_digits`, 17 grey levels), with labels.
- `mnist:DIR`: MNIST idx files in DIR (`*images-idx3-ubyte[.gz]` and, if present,
  `*labels-idx1-ubyte[.gz]`), 28×28, with labels.
- `folder:DIR`: a folder of PNG/JPEG images of one size (searched recursively), resized (shorter side)
  and centre-cropped to the model's resolution, converted to RGB or grayscale; no labels.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from transformer.training import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


class DaliError(UserError):
    """A user mistake in the DDPM commands: bad data, incompatible checkpoint, bad flags."""


@dataclass
class ImageDataset:
    images: Tensor
    """(N, C, H, W) float32 in [-1, 1]."""
    labels: Tensor | None
    """(N,) int64 class labels, or None for unlabelled folders."""
    name: str
    """The spec the data came from (digits, mnist:DIR, folder:DIR)."""

    @property
    def channels(self) -> int:
        return self.images.size(1)

    @property
    def image_size(self) -> int:
        return self.images.size(-1)

    def __len__(self) -> int:
        return self.images.size(0)


def to_unit_range(pixels: np.ndarray, max_value: float) -> Tensor:
    """Integers in {0..max_value} -> floats in [-1, 1]."""
    return torch.from_numpy(pixels.astype(np.float32) / max_value * 2.0 - 1.0)


def to_uint8(images: Tensor) -> np.ndarray:
    """Floats in [-1, 1] (N, C, H, W) -> uint8 (N, H, W, C)."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def load_digits() -> ImageDataset:
    """scikit-learn's 1,797 8×8 digits (grey levels 0..16), offline."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = to_unit_range(digits.images, 16.0)[:, None]
    return ImageDataset(images, torch.from_numpy(digits.target.astype(np.int64)), "digits")


# -- MNIST idx files ------------------------------------------------------------------------------
def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (gzip or raw): magic 0x0000 + type byte 0x08 (uint8) + ndim, big-endian
    dimensions, then the data. A truncated or otherwise damaged file is a `DaliError`."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DaliError(f"damaged idx file {path}: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or not 1 <= raw[3] <= 4:
        raise DaliError(f"damaged idx file {path}: bad header (not an unsigned-byte idx file)")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise DaliError(f"damaged idx file {path}: truncated header")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    expected = int(np.prod(shape))
    data = raw[4 + 4 * ndim :]
    if len(data) != expected:
        raise DaliError(
            f"damaged idx file {path}: header promises {expected} bytes of data {shape}, "
            f"found {len(data)}"
        )
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


def _find(directory: Path, pattern: str) -> Path | None:
    matches = sorted(directory.glob(pattern + ".gz")) + sorted(directory.glob(pattern))
    return matches[0] if matches else None


def load_mnist(directory: Path) -> ImageDataset:
    """MNIST (or Fashion-MNIST) idx files in `directory`, with labels when a labels file is there."""
    directory = Path(directory)
    if not directory.is_dir():
        what = "is a file, not a directory" if directory.exists() else "not found"
        raise DaliError(f"MNIST directory {what}: {directory}")
    images_path = _find(directory, "*images-idx3-ubyte") or _find(directory, "*images.idx3-ubyte")
    if images_path is None:
        raise DaliError(f"no *images-idx3-ubyte[.gz] file in {directory}")
    pixels = read_idx(images_path)
    if pixels.ndim != 3:
        raise DaliError(f"damaged idx file {images_path}: expected 3 dimensions, got {pixels.ndim}")
    labels = None
    labels_path = _find(directory, images_path.name.split("images")[0] + "labels-idx1-ubyte")
    if labels_path is not None:
        raw_labels = read_idx(labels_path)
        if raw_labels.shape != (pixels.shape[0],):
            raise DaliError(
                f"{labels_path} holds {raw_labels.shape} labels for {pixels.shape[0]} images"
            )
        labels = torch.from_numpy(raw_labels.astype(np.int64))
    return ImageDataset(to_unit_range(pixels, 255.0)[:, None], labels, f"mnist:{directory}")


# -- a folder of images ---------------------------------------------------------------------------
def resize_and_crop(image, size: int):
    """Resize so the shorter side is `size` (bicubic), then crop the centre size×size square."""
    from PIL import Image

    w, h = image.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def load_image_folder(directory: Path, image_size: int, channels: int) -> ImageDataset:
    """Every PNG/JPEG under `directory`; all must share one size (a dataset, not a mixture)."""
    from PIL import Image, UnidentifiedImageError

    directory = Path(directory)
    if not directory.is_dir():
        what = "is a file, not a directory" if directory.exists() else "not found"
        raise DaliError(f"image folder {what}: {directory}")
    if channels not in (1, 3):
        raise DaliError(f"images must have 1 (grayscale) or 3 (RGB) channels, not {channels}")
    paths = sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise DaliError(f"no PNG or JPEG images in {directory}")
    arrays, first_size = [], None
    for path in paths:
        try:
            with Image.open(path) as image:
                if first_size is None:
                    first_size, first_path = image.size, path
                elif image.size != first_size:
                    raise DaliError(
                        f"images of different sizes in {directory}: {first_path.name} is "
                        f"{first_size[0]}×{first_size[1]}, {path.name} is "
                        f"{image.size[0]}×{image.size[1]}; resize them to one size first"
                    )
                image = image.convert("L" if channels == 1 else "RGB")
                arrays.append(np.asarray(resize_and_crop(image, image_size)))
        except (UnidentifiedImageError, OSError) as exc:
            raise DaliError(f"cannot read image {path}: {exc}") from None
    pixels = np.stack(arrays)
    if channels == 1:
        pixels = pixels[..., None]
    images = to_unit_range(pixels, 255.0).permute(0, 3, 1, 2).contiguous()
    return ImageDataset(images, None, f"folder:{directory}")


# -- one entry point -------------------------------------------------------------------------------
def load_images(
    spec: str, image_size: int | None = None, channels: int | None = None
) -> ImageDataset:
    """`digits`, `mnist:DIR` or `folder:DIR`; resized to `image_size` if given, and checked against
    the model's `channels`."""
    kind, _, path = spec.partition(":")
    if kind == "digits" and not path:
        data = load_digits()
    elif kind == "mnist" and path:
        data = load_mnist(Path(path))
    elif kind == "folder" and path:
        data = load_image_folder(Path(path), image_size or 32, channels or 3)
    else:
        raise DaliError(f"unknown --data {spec!r}: use digits, mnist:DIR or folder:DIR")
    if channels is not None and data.channels != channels:
        raise DaliError(
            f"{spec} has {_kind(data.channels)} images but the model expects "
            f"{_kind(channels)} ({channels} channel{'s' if channels > 1 else ''})"
        )
    if image_size is not None and data.image_size != image_size:
        data.images = F.interpolate(
            data.images,
            size=(image_size, image_size),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        ).clamp(-1, 1)
    return data


def _kind(channels: int) -> str:
    return {1: "grayscale", 3: "RGB"}.get(channels, f"{channels}-channel")


def save_grid(
    images: Tensor, path: Path, nrow: int | None = None, scale: int = 1, pad: int = 1
) -> Path:
    """Save a batch (N, C, H, W) in [-1, 1] as one PNG grid (nearest-neighbour upscaled by `scale`)."""
    from PIL import Image

    pixels = to_uint8(images)
    n, h, w, c = pixels.shape
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / nrow))
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[
            pad + r * (h + pad) : pad + r * (h + pad) + h,
            pad + col * (w + pad) : pad + col * (w + pad) + w,
        ] = pixels[i]
    image = Image.fromarray(grid[..., 0] if c == 1 else grid, mode="L" if c == 1 else "RGB")
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
