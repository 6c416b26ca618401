"""Examples as previews: what a report shows for one training or query example.

An example ``dataset[i]`` is split into its input and label (``(x, y)`` tuples, dicts with a label key,
or anything else as an input without label). The input becomes a :class:`Preview`:

- tensors shaped like images (``C×H×W`` with ``C ∈ {1, 3}``, ``H×W×C``, or ``H×W``) become pixels,
  normalised to ``uint8`` (see :func:`to_uint8`);
- 1-D feature vectors and token ids, scalars and strings become a short text;
- a user's ``render_example(example) -> value`` overrides both: a tensor or array it returns goes through the same
  rules (so ``lambda ex: ex[0].view(8, 8)`` shows flat digits as images), a string is text, and anything
  else (a ``wandb.Image``, ``wandb.Html``, …) is passed to W&B unchanged;
- a user's ``decode(token_ids: list[int]) -> str`` (a tokenizer's ``decode``) turns token ids into text:
  every 1-D integer tensor, array or list of ints shown (an input, a sequence label such as a language
  model's targets, what ``render_example`` returned, a token of the per-token heat map) is decoded, its
  ``-100`` (padding) entries dropped first. Precedence: ``render_example`` picks *what* is shown, ``decode``
  then shows token ids as text; without either, ids are listed (``[273 109 …] (32 token ids)``). A ``decode``
  that raises or returns a non-string falls back to the ids for that example, with one warning naming
  ``decode`` (a failing preview never loses a report).

Previews are made only for the examples a report shows (:class:`ExampleCatalog` caches them by index),
never for the whole dataset.
"""

from __future__ import annotations

import base64
import html
import io
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

from ..errors import InfluenceConfigError
from ..objective import IGNORE_INDEX

__all__ = [
    "Preview",
    "Decoder",
    "ExampleCatalog",
    "check_decode",
    "token_ids_of",
    "split_example",
    "make_preview",
    "to_uint8",
    "encode_png",
    "png_data_uri",
]

_LABEL_KEYS = ("label", "labels", "target", "targets", "y", "class")
_INPUT_KEYS = ("input", "inputs", "x", "image", "pixels", "input_ids", "text", "features")
#: W&B images are upscaled (nearest neighbour) until their longer side reaches this many pixels
_WANDB_MIN_SIDE = 64
#: HTML images are subsampled until their longer side is at most this many pixels
_HTML_MAX_SIDE = 128
_TEXT_VALUES = 8
_TEXT_CHARS = 160
#: decoded text is kept to this many characters in a preview
_DECODED_CHARS = 400
#: what ``decode`` must be (the messages name it)
DECODE_SIGNATURE = "decode(token_ids: list[int]) -> str (e.g. a tokenizer's decode)"


def check_decode(decode: Any) -> Optional[Callable[[List[int]], str]]:
    """``decode`` if it is ``None`` or callable; anything else raises
    :class:`~lightning_influence.errors.InfluenceConfigError` naming the argument and its signature."""
    if decode is not None and not callable(decode):
        raise InfluenceConfigError(f"decode={decode!r} is not callable; pass a function {DECODE_SIGNATURE}, or None "
                                   "to show token ids.")
    return decode


def token_ids_of(value: Any) -> Optional[List[int]]:
    """The token ids of ``value`` as a list of ints (``-100`` entries dropped) when it is a 1-D integer tensor
    or array or a list/tuple of ints; ``None`` otherwise."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        arr = _numpy(value)
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            return None
        ids = arr.tolist()
    elif isinstance(value, (list, tuple)) and value and all(
            isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in value):
        ids = [int(v) for v in value]
    else:
        return None
    return [int(i) for i in ids if int(i) != IGNORE_INDEX]


class Decoder:
    """A user's ``decode`` with a per-call fallback: :meth:`text` returns the decoded text, or, when
    ``decode`` raises or returns something other than a ``str``, the ids as text (``[1 2 3] (3 token ids,
    decode failed)``) and warns once naming ``decode`` and the fix."""

    def __init__(self, decode: Optional[Callable[[List[int]], str]]) -> None:
        self.decode = check_decode(decode)
        self._warned = False

    def __bool__(self) -> bool:
        return self.decode is not None

    def text(self, ids: Sequence[int]) -> str:
        """``decode(ids)``; without ``decode``, the ids as text."""
        ids = [int(i) for i in ids]
        if self.decode is None:
            return _vector_text(np.asarray(ids, dtype=np.int64))
        try:
            out = self.decode(ids)
            if not isinstance(out, str):
                raise TypeError(f"it returned {type(out).__name__}, not str")
            return out
        except Exception as err:  # noqa: BLE001 - a failing preview falls back to the ids
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"decode failed on token ids {ids[:8]}{' …' if len(ids) > 8 else ''} ({type(err).__name__}: "
                    f"{err}); the reports show those examples' token ids instead. decode must be {DECODE_SIGNATURE}, "
                    "e.g. decode=lambda ids: tokenizer.decode(ids).",
                    UserWarning,
                    stacklevel=2,
                )
            return _vector_text(np.asarray(ids, dtype=np.int64)).replace("token ids)", "token ids, decode failed)")


@dataclass(frozen=True)
class Preview:
    """One example as a report shows it: ``pixels`` (``uint8``, ``H×W`` or ``H×W×3``), ``text``, or a
    user-rendered ``value`` (whatever ``render_example`` returned, for W&B)."""

    pixels: Optional[np.ndarray] = None
    text: Optional[str] = None
    value: Any = None

    @property
    def kind(self) -> str:
        return "image" if self.pixels is not None else ("text" if self.text is not None else "custom")

    def to_wandb(self, caption: Optional[str] = None) -> Any:
        """A ``wandb.Image`` for pixels (small images upscaled for visibility), text as a ``str``, or the
        user's value unchanged."""
        if self.pixels is not None:
            import wandb

            return wandb.Image(_upscale(self.pixels, _WANDB_MIN_SIDE), caption=caption)
        if self.text is not None:
            return self.text
        return self.value

    def to_html(self, alt: str, size: int = 72) -> str:
        """An ``<img>`` with a PNG data URI (displayed ``size`` px on its longer side), or escaped text."""
        png = self.png()
        if png is not None:
            h, w = _png_size(png)
            scale = size / max(h, w)
            return (
                f'<img class="preview" src="{png_data_uri(png)}" alt="{html.escape(alt)}" '
                f'width="{max(1, round(w * scale))}" height="{max(1, round(h * scale))}">'
            )
        text = self.text if self.text is not None else _value_text(self.value)
        return f'<div class="preview text">{html.escape(text)}</div>'

    def png(self) -> Optional[bytes]:
        """PNG bytes of the preview when it is an image (also for a user's ``wandb.Image``)."""
        if self.pixels is not None:
            return encode_png(_downsample(self.pixels, _HTML_MAX_SIDE))
        return _wandb_image_png(self.value) if self.value is not None else None


# ---------------------------------------------------------------------- examples
def split_example(example: Any) -> Tuple[Any, Any]:
    """``(input, label)`` of one dataset item: ``(x, y, ...)`` sequences, dicts with a label key
    (``label``, ``target``, ``y``, …), else the whole item as input and ``None`` as label."""
    if isinstance(example, (tuple, list)):
        if len(example) >= 2:
            return example[0], example[1]
        return (example[0] if example else None), None
    if isinstance(example, dict):
        label_key = next((k for k in _LABEL_KEYS if k in example), None)
        label = example[label_key] if label_key is not None else None
        input_key = next((k for k in _INPUT_KEYS if k in example), None)
        if input_key is None:
            rest = [k for k in example if k != label_key]
            input_key = rest[0] if len(rest) == 1 else None
        return (example[input_key] if input_key is not None else {k: v for k, v in example.items() if k != label_key}), label
    return example, None


def label_value(label: Any, classes: Optional[Sequence[str]] = None, decoder: Optional[Decoder] = None) -> Any:
    """A label as a plain value for tables: ``int``/``float`` for scalars (``"3 (cat)"`` with class
    names), short text otherwise (token ids decoded by ``decoder`` when it has a ``decode``), ``None`` when
    absent."""
    if label is None:
        return None
    if isinstance(label, (torch.Tensor, np.ndarray)):
        arr = _numpy(label)
        if arr.size != 1:
            ids = token_ids_of(arr) if decoder else None
            return _short(decoder.text(ids), _DECODED_CHARS) if ids is not None and decoder else _vector_text(arr)
        label = arr.reshape(-1)[0].item()
    if isinstance(label, (bool, np.bool_)):
        label = int(label)
    if isinstance(label, (int, np.integer)):
        label = int(label)
        if classes is not None and 0 <= label < len(classes):
            return f"{label} ({classes[label]})"
        return label
    if isinstance(label, (float, np.floating)):
        return float(label)
    return _short(str(label))


def make_preview(value: Any, decoder: Optional[Decoder] = None) -> Preview:
    """The :class:`Preview` of an input (or of what ``render_example`` returned); token ids become the text
    ``decoder`` gives them when it has a ``decode``."""
    if isinstance(value, Preview):
        return value
    if decoder:
        ids = token_ids_of(value)
        if ids is not None:
            return Preview(text=_short(decoder.text(ids), _DECODED_CHARS))
    if isinstance(value, str):
        return Preview(text=_short(value))
    if isinstance(value, (torch.Tensor, np.ndarray)):
        arr = _numpy(value)
        image = _as_image(arr)
        if image is not None:
            return Preview(pixels=to_uint8(image))
        if arr.ndim == 0:
            return Preview(text=_short(str(arr.item())))
        return Preview(text=_vector_text(arr))
    if isinstance(value, (int, float, bool, np.generic)):
        return Preview(text=str(value))
    if isinstance(value, dict):
        parts = [f"{k}: {_value_text(v)}" for k, v in value.items()]
        return Preview(text=_short("; ".join(parts)))
    if _is_plain_data(value):
        return Preview(text=_short(repr(value)))
    return Preview(value=value)


class ExampleCatalog:
    """Labels and previews of a dataset's examples, computed on first request and cached by index.

    Args:
        dataset: any map-style dataset.
        render_example: optional ``render_example(example) -> value``; see the module docstring.
        classes: class names for integer labels (default: ``dataset.classes`` when it exists).
        decode: optional ``decode(token_ids: list[int]) -> str`` for token ids (see the module docstring), or a
            :class:`Decoder` shared with other catalogs (one warning for all of them).
    """

    def __init__(
        self,
        dataset: Any,
        render_example: Optional[Callable[[Any], Any]] = None,
        classes: Optional[Sequence[str]] = None,
        decode: Union[Callable[[List[int]], str], "Decoder", None] = None,
    ) -> None:
        self.dataset = dataset
        self.render_example = render_example
        self.classes = classes if classes is not None else _dataset_classes(dataset)
        self.decoder = decode if isinstance(decode, Decoder) else Decoder(decode)
        self._cache: Dict[int, Tuple[Preview, Any]] = {}

    def _get(self, index: int) -> Tuple[Preview, Any]:
        index = int(index)
        if index not in self._cache:
            example = self.dataset[index]
            x, y = split_example(example)
            rendered = self.render_example(example) if self.render_example is not None else x
            self._cache[index] = (make_preview(rendered, self.decoder), label_value(y, self.classes, self.decoder))
        return self._cache[index]

    def example(self, index: int) -> Tuple[Any, Any]:
        """``(input, label)`` of example ``index`` as stored (no preview), or ``(None, None)`` without a dataset."""
        if self.dataset is None:
            return None, None
        return split_example(self.dataset[int(index)])

    def token_text(self, token_id: int) -> str:
        """One token as text: ``decode([token_id])``, or its id without ``decode``."""
        return self.decoder.text([int(token_id)]) if self.decoder else str(int(token_id))

    def preview(self, index: int) -> Preview:
        return self._get(index)[0]

    def label(self, index: int) -> Any:
        return self._get(index)[1]

    def __len__(self) -> int:
        """How many examples have been rendered so far."""
        return len(self._cache)


# ---------------------------------------------------------------------- pixels
def _as_image(arr: np.ndarray) -> Optional[np.ndarray]:
    """``H×W`` or ``H×W×3`` view of an image-shaped array, else ``None``."""
    if arr.dtype.kind not in "biuf":
        return None
    if arr.ndim == 2 and min(arr.shape) >= 2:
        return arr
    if arr.ndim == 3:
        if arr.shape[0] in (1, 3) and min(arr.shape[1:]) >= 2:
            arr = np.moveaxis(arr, 0, -1)
        elif not (arr.shape[2] in (1, 3) and min(arr.shape[:2]) >= 2):
            return None
        return arr[..., 0] if arr.shape[2] == 1 else arr
    return None


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Pixels as ``uint8``: ``uint8`` unchanged, ``bool`` as 0/255, values within ``[0, 1]`` times 255,
    integers within ``[0, 255]`` unchanged, anything else (e.g. mean/std-normalised inputs) min–max
    scaled per image. NaN and ±inf become the minimum."""
    if image.dtype == np.uint8:
        return np.ascontiguousarray(image)
    if image.dtype == np.bool_:
        return image.astype(np.uint8) * 255
    x = image.astype(np.float64)
    finite = np.isfinite(x)
    if not finite.all():
        x = np.where(finite, x, x[finite].min() if finite.any() else 0.0)
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    if lo >= 0.0 and hi <= 1.0 and image.dtype.kind == "f":
        x = x * 255.0
    elif lo >= 0.0 and hi <= 255.0 and (image.dtype.kind in "iu" or np.all(x == np.round(x))) and hi > 1.0:
        pass
    elif hi > lo:
        x = (x - lo) / (hi - lo) * 255.0
    else:
        x = np.zeros_like(x)
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def _upscale(pixels: np.ndarray, min_side: int) -> np.ndarray:
    factor = max(1, min_side // max(pixels.shape[:2]))
    if factor == 1:
        return pixels
    return np.repeat(np.repeat(pixels, factor, axis=0), factor, axis=1)


def _downsample(pixels: np.ndarray, max_side: int) -> np.ndarray:
    step = -(-max(pixels.shape[:2]) // max_side)
    return np.ascontiguousarray(pixels[::step, ::step]) if step > 1 else pixels


def encode_png(pixels: np.ndarray) -> bytes:
    """A PNG (8-bit greyscale or RGB, written by Pillow) of ``uint8`` pixels ``H×W`` or ``H×W×3``."""
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] != 3):
        raise ValueError(f"encode_png takes uint8 H×W or H×W×3 pixels, got {pixels.dtype} {pixels.shape}.")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buf, format="PNG")
    return buf.getvalue()


def _png_size(png: bytes) -> Tuple[int, int]:
    """``(height, width)`` of a PNG."""
    with Image.open(io.BytesIO(png)) as image:
        w, h = image.size
    return h, w


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _wandb_image_png(value: Any) -> Optional[bytes]:
    """PNG bytes of a ``wandb.Image`` a user's renderer returned (read from the file wandb wrote)."""
    if type(value).__name__ != "Image" or not type(value).__module__.startswith("wandb"):
        return None
    path = getattr(value, "_path", None)
    if path and os.path.isfile(path) and str(path).lower().endswith(".png"):
        with open(path, "rb") as fh:
            return fh.read()
    image = getattr(value, "image", None)  # a PIL image when wandb still holds one
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()
    return None


# ---------------------------------------------------------------------- text
def _short(text: str, limit: int = _TEXT_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _vector_text(arr: np.ndarray) -> str:
    flat = arr.reshape(-1)
    n = flat.size
    shown = flat[:_TEXT_VALUES]
    if arr.dtype.kind in "iub":
        body = " ".join(str(int(v)) for v in shown)
        what = "token ids" if arr.ndim == 1 else f"ints {tuple(arr.shape)}"
    else:
        body = " ".join(f"{float(v):.3g}" for v in shown)
        what = "values" if arr.ndim == 1 else f"values {tuple(arr.shape)}"
    more = " …" if n > _TEXT_VALUES else ""
    return f"[{body}{more}] ({n} {what})" if arr.ndim == 1 else f"[{body}{more}] ({what})"


def _value_text(value: Any) -> str:
    if isinstance(value, (torch.Tensor, np.ndarray)):
        arr = _numpy(value)
        return _vector_text(arr) if arr.ndim else str(arr.item())
    return _short(str(value), 80)


def _numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype in (torch.bfloat16, torch.float16):
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def _is_plain_data(value: Any) -> bool:
    return isinstance(value, (list, tuple)) or value is None


def _dataset_classes(dataset: Any) -> Optional[Sequence[str]]:
    for ds in (dataset, getattr(dataset, "dataset", None)):  # Subset-style wrappers
        classes = getattr(ds, "classes", None)
        if isinstance(classes, (list, tuple)) and all(isinstance(c, str) for c in classes):
            return classes
    return None
