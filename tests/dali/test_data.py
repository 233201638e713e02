"""Data sources: embedded digits, MNIST idx files (and damaged ones), image folders."""

import gzip

import numpy as np
import pytest
import torch
from PIL import Image

from dali.data import DaliError, load_digits, load_images, read_idx, save_grid


def test_digits_are_embedded_and_scaled_to_minus_one_one():
    data = load_digits()
    assert data.images.shape == (1797, 1, 8, 8)
    assert data.images.min() == -1 and data.images.max() == 1
    assert sorted(data.labels.unique().tolist()) == list(range(10))


def test_mnist_test_split_reads(shared_data):
    data = load_images(f"mnist:{shared_data / 'mnist'}", 28, 1)
    assert data.images.shape == (10000, 1, 28, 28) and data.labels.shape == (10000,)
    assert data.labels.bincount().tolist()[:3] == [980, 1135, 1032]  # the official counts
    assert data.images.min() == -1 and data.images.max() == 1


def _write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_idx_round_trip_and_damaged_files(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(5, 28, 28))
    _write_idx(tmp_path / "x-images-idx3-ubyte.gz", images)
    np.testing.assert_array_equal(read_idx(tmp_path / "x-images-idx3-ubyte.gz"), images)
    truncated = tmp_path / "t-images-idx3-ubyte.gz"
    raw = gzip.decompress((tmp_path / "x-images-idx3-ubyte.gz").read_bytes())
    truncated.write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(DaliError, match="damaged idx file .*header promises 3920 bytes"):
        read_idx(truncated)
    not_gzip = tmp_path / "n-images-idx3-ubyte.gz"
    not_gzip.write_bytes(b"hello, not gzip")
    with pytest.raises(DaliError, match="damaged idx file"):
        read_idx(not_gzip)
    bad_magic = tmp_path / "b-images-idx3-ubyte"
    bad_magic.write_bytes(b"\x12\x34\x08\x03" + bytes(20))
    with pytest.raises(DaliError, match="bad header"):
        read_idx(bad_magic)


def _png(path, size, mode="RGB", value=128):
    Image.new(mode, size, value if mode == "L" else (value, 0, 255 - value)).save(path)


def test_image_folder_is_resized_centre_cropped_and_converted(tmp_path):
    for i in range(3):
        _png(tmp_path / f"{i}.png", (40, 20), value=50 * i)
    rgb = load_images(f"folder:{tmp_path}", 16, 3)
    assert rgb.images.shape == (3, 3, 16, 16) and rgb.labels is None
    assert rgb.images[1, 2].mean().item() == pytest.approx((255 - 50) / 127.5 - 1, abs=0.02)
    gray = load_images(f"folder:{tmp_path}", 8, 1)
    assert gray.images.shape == (3, 1, 8, 8)


def test_empty_and_mixed_size_folders_are_refused(tmp_path):
    with pytest.raises(DaliError, match="no PNG or JPEG images"):
        load_images(f"folder:{tmp_path}", 8, 1)
    _png(tmp_path / "a.png", (10, 10))
    _png(tmp_path / "b.png", (12, 10))
    with pytest.raises(DaliError, match=r"different sizes.*a.png is 10×10, b.png is 12×10"):
        load_images(f"folder:{tmp_path}", 8, 1)
    with pytest.raises(DaliError, match="unknown --data"):
        load_images("imagenet", 8, 1)


def test_grayscale_data_for_an_rgb_model_is_refused():
    with pytest.raises(DaliError, match="digits has grayscale images but the model expects RGB"):
        load_images("digits", 8, 3)


def test_save_grid(tmp_path):
    path = save_grid(torch.zeros(5, 1, 8, 8), tmp_path / "g.png", nrow=5, scale=2)
    assert Image.open(path).size == (2 * (5 * 9 + 1), 2 * (8 + 2))
