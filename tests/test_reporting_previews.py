"""Previews: how examples become images or short texts, only for the rows a report shows."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

from lightning_influence.reporting.previews import (
    ExampleCatalog,
    Preview,
    encode_png,
    label_value,
    make_preview,
    split_example,
    to_uint8,
)


def _decode_png(png: bytes) -> np.ndarray:
    """Decoder for the unfiltered 8-bit PNGs :func:`encode_png` writes."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    channels = {0: 1, 2: 3}[png[25]]
    pos, idat = 8, b""
    while pos < len(png):
        n = int.from_bytes(png[pos : pos + 4], "big")
        if png[pos + 4 : pos + 8] == b"IDAT":
            idat += png[pos + 8 : pos + 8 + n]
        pos += 12 + n
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + w * channels)
    assert (raw[:, 0] == 0).all()
    return raw[:, 1:].reshape(h, w, channels).squeeze(-1) if channels == 1 else raw[:, 1:].reshape(h, w, 3)


@pytest.mark.parametrize("shape", [(5, 7), (7, 5, 3)])
def test_png_round_trip(shape):
    pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    np.testing.assert_array_equal(_decode_png(encode_png(pixels)), pixels)


def test_png_readable_by_pillow():
    pil = pytest.importorskip("PIL.Image")
    import io

    pixels = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    np.testing.assert_array_equal(np.asarray(pil.open(io.BytesIO(encode_png(pixels)))), pixels)


def test_to_uint8_rules():
    np.testing.assert_array_equal(to_uint8(np.array([[0.0, 0.5, 1.0]])), [[0, 128, 255]])  # [0, 1] × 255
    np.testing.assert_array_equal(to_uint8(np.array([[0, 16, 255]], dtype=np.int64)), [[0, 16, 255]])  # 0..255 kept
    np.testing.assert_array_equal(to_uint8(np.array([[-2.0, 0.0, 2.0]])), [[0, 128, 255]])  # normalised: min-max
    np.testing.assert_array_equal(to_uint8(np.array([[True, False]])), [[255, 0]])
    np.testing.assert_array_equal(to_uint8(np.full((2, 2), 3.5)), np.zeros((2, 2)))  # constant image
    assert to_uint8(np.array([[np.nan, 1.0, 0.0]])).tolist() == [[0, 255, 0]]


@pytest.mark.parametrize(
    "x, shape",
    [
        (torch.rand(1, 8, 8), (8, 8)),
        (torch.rand(3, 6, 5), (6, 5, 3)),
        (torch.rand(8, 8), (8, 8)),
        (np.random.rand(6, 5, 3), (6, 5, 3)),
        (torch.randint(0, 255, (1, 4, 4), dtype=torch.uint8), (4, 4)),
    ],
)
def test_image_shaped_inputs_become_pixels(x, shape):
    p = make_preview(x)
    assert p.kind == "image" and p.pixels.shape == shape and p.pixels.dtype == np.uint8


def test_vectors_tokens_and_strings_become_short_text():
    p = make_preview(torch.linspace(0, 1, 64))
    assert p.kind == "text" and p.text.endswith("(64 values)") and "…" in p.text and len(p.text) < 80
    t = make_preview(torch.tensor([101, 7592, 2088, 102]))
    assert t.text == "[101 7592 2088 102] (4 token ids)"
    assert make_preview("a " * 500).text.endswith("…")
    assert make_preview(torch.tensor(3.0)).text == "3.0"
    assert make_preview(torch.rand(4, 8, 8)).kind == "text"  # 4 channels: not an image


def test_user_values_pass_through():
    marker = object()
    p = make_preview(marker)
    assert p.kind == "custom" and p.to_wandb() is marker


def test_split_example_and_labels():
    x = torch.zeros(3)
    assert split_example((x, 4))[1] == 4
    assert split_example({"pixels": x, "label": torch.tensor(2)})[0] is x
    assert split_example(x) == (x, None)
    assert label_value(torch.tensor(3)) == 3
    assert label_value(torch.tensor(3), classes=["a", "b", "c", "cat"]) == "3 (cat)"
    assert label_value(torch.tensor([0.5])) == 0.5
    assert label_value(None) is None


class CountingDataset(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n, self.seen = n, []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        self.seen.append(i)
        return torch.full((1, 4, 4), float(i) / self.n), i % 3


def test_catalog_renders_only_requested_rows_once():
    ds = CountingDataset(10_000)
    cat = ExampleCatalog(ds)
    for _ in range(3):
        cat.preview(5), cat.label(5), cat.preview(9_999)
    assert sorted(ds.seen) == [5, 9_999] and len(cat) == 2
    assert cat.label(5) == 2


def test_render_example_overrides():
    ds = CountingDataset(4)
    flat = ExampleCatalog(ds, render_example=lambda ex: ex[0].reshape(16))
    assert flat.preview(1).kind == "text"
    img = ExampleCatalog(ds, render_example=lambda ex: f"example with label {ex[1]}")
    assert img.preview(2).text == "example with label 2"


def test_html_rendering_of_previews():
    html = make_preview(torch.rand(1, 8, 8)).to_html("train #3")
    assert html.startswith('<img class="preview" src="data:image/png;base64,') and 'alt="train #3"' in html
    assert 'width="72"' in html
    assert "&lt;b&gt;" in Preview(text="<b>").to_html("x")


def test_wandb_image_preview():
    wandb = pytest.importorskip("wandb")
    pytest.importorskip("PIL")
    img = make_preview(torch.rand(1, 8, 8)).to_wandb(caption="c")
    assert isinstance(img, wandb.Image) and (img._width, img._height) == (64, 64)
    # a user's wandb.Image still shows in the HTML report
    user = make_preview(wandb.Image(np.zeros((5, 6), dtype=np.uint8)))
    assert user.kind == "custom" and user.png() is not None
    assert "data:image/png;base64," in user.to_html("u")


def test_without_pillow_wandb_previews_fall_back_to_text(monkeypatch):
    from lightning_influence.reporting import previews

    monkeypatch.setattr(previews, "pillow_available", lambda: False)
    text = make_preview(torch.rand(1, 8, 8)).to_wandb()
    assert text.startswith("image 8×8") and "pillow" in text
