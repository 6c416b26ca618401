"""Previews: how examples become images or short texts, only for the rows a report shows."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_influence.reporting.previews import (
    ExampleCatalog,
    Preview,
    encode_png,
    label_value,
    make_preview,
    split_example,
    to_uint8,
)


@pytest.mark.parametrize("shape", [(5, 7), (7, 5, 3)])
def test_png_round_trip(shape):
    pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    png = encode_png(pixels)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(png)) as image:
        assert image.mode == ("L" if len(shape) == 2 else "RGB")
        np.testing.assert_array_equal(np.asarray(image), pixels)


def test_encode_png_rejects_other_pixels():
    with pytest.raises(ValueError, match="uint8"):
        encode_png(np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="H×W×3"):
        encode_png(np.zeros((4, 4, 4), dtype=np.uint8))


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
    img = make_preview(torch.rand(1, 8, 8)).to_wandb(caption="c")
    assert isinstance(img, wandb.Image) and (img._width, img._height) == (64, 64)
    # a user's wandb.Image still shows in the HTML report
    user = make_preview(wandb.Image(np.zeros((5, 6), dtype=np.uint8)))
    assert user.kind == "custom" and user.png() is not None
    assert "data:image/png;base64," in user.to_html("u")
