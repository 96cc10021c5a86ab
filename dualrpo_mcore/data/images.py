"""Image decoding (with size limits) and Qwen2.5-VL image processing.

Processing runs once per prompt: the loader hands the rollout one ``pixel_values`` /
``image_grid_thw`` pair per prompt and the G samples of its group share those tensors.
The processor is transformers' own Qwen2-VL image processor (the one Qwen2.5-VL uses); without
torchvision, transformers picks its PIL backend, which is what runs here.
"""
from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

# Qwen2.5-VL vision geometry: 14 px patches, 2x2 merged into one LM token.
PATCH_SIZE = 14
MERGE_SIZE = 2
FACTOR = PATCH_SIZE * MERGE_SIZE


class ImageError(ValueError):
    """An image that cannot be used (corrupt, missing, oversized); message says why."""


def open_image(entry: Dict[str, Any], *, base_dir: str = "", max_image_pixels: int = 0):
    """Decode ``{"bytes"|"path"}`` to an RGB PIL image; raises :class:`ImageError`.

    The size is checked from the header before the pixels are decoded, so a decompression bomb
    costs nothing; ``max_image_pixels`` <= 0 disables the check.
    """
    from PIL import Image

    data, path = entry.get("bytes"), entry.get("path")
    try:
        if data:
            src: Any = io.BytesIO(data)
        else:
            src = path if os.path.isabs(path) or not base_dir else os.path.join(base_dir, path)
            if not os.path.exists(src):
                raise ImageError(f"file not found: {src}")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(src)
            w, h = img.size
            if max_image_pixels > 0 and w * h > max_image_pixels:
                raise ImageError(f"oversized: {w}x{h} = {w * h} px > max_image_pixels={max_image_pixels}")
            img.load()
    except ImageError:
        raise
    except Exception as e:  # PIL raises many types for corrupt data; all mean "unusable"
        raise ImageError(f"cannot decode ({type(e).__name__}: {e})") from None
    if min(w, h) < 1 or max(w, h) / min(w, h) > 200:
        raise ImageError(f"bad aspect ratio {w}x{h} (Qwen2.5-VL needs < 200)")
    return img.convert("RGB") if img.mode != "RGB" else img


def resize_to_area(img, min_pixels: int, max_pixels: int):
    """V-Triune's image sizing (their ``rl_dataset.process_image``), run before the processor: an
    image above ``max_pixels`` is shrunk, then one below ``min_pixels`` is enlarged, each by the
    square root of the area ratio with the new sides truncated to integers (PIL's default filter).

    It changes the pixels both the trainer and the rollout engine receive, so both count the same
    image tokens; the processor's own bounds (``DataConfig.min_pixels``/``max_pixels``) still
    apply afterwards."""
    if max_pixels > 0 and img.width * img.height > max_pixels:
        img = _scale_to(img, max_pixels)
    if min_pixels > 0 and img.width * img.height < min_pixels:
        img = _scale_to(img, min_pixels)
    return img


def _scale_to(img, area: int):
    import math

    f = math.sqrt(area / (img.width * img.height))
    return img.resize((int(img.width * f), int(img.height * f)))


def num_image_tokens(grid_thw: Sequence[int]) -> int:
    """LM placeholder tokens for one image: t*h*w patches, merged 2x2."""
    t, h, w = (int(x) for x in grid_thw)
    return t * h * w // (MERGE_SIZE * MERGE_SIZE)


@dataclass
class ProcessedImages:
    pixel_values: Any  # torch.FloatTensor [sum(t*h*w), 3*2*14*14]
    image_grid_thw: Any  # torch.LongTensor [num_images, 3]

    @property
    def num_tokens(self) -> List[int]:
        return [num_image_tokens(g) for g in self.image_grid_thw.tolist()]


class ImageProcessor:
    """Qwen2.5-VL image preprocessing with configurable pixel bounds.

    ``processor_dir`` (a model directory with ``preprocessor_config.json``) wins when given;
    ``min_pixels`` / ``max_pixels`` then override what it holds.
    """

    def __init__(self, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280,
                 processor_dir: Optional[str] = None):
        self.min_pixels, self.max_pixels = int(min_pixels), int(max_pixels)
        self.processor_dir = processor_dir
        self._hf = None
        self.calls = 0  # how many times images were processed (tests: once per prompt)

    @property
    def hf(self):
        """transformers' processor, built on first use (importing it costs seconds; text-only
        data never pays)."""
        if self._hf is None:
            if self.processor_dir:
                from transformers import AutoImageProcessor

                hf = AutoImageProcessor.from_pretrained(self.processor_dir)
            else:
                from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as m

                hf = m.Qwen2VLImageProcessorPil()
            hf.size = {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}
            self._hf = hf
        return self._hf

    def __call__(self, images: List[Any]) -> Optional[ProcessedImages]:
        if not images:
            return None
        self.calls += 1
        out = self.hf(images=images, return_tensors="pt")
        return ProcessedImages(out["pixel_values"], out["image_grid_thw"])

    def grid_for_size(self, height: int, width: int) -> Tuple[int, int, int]:
        """``(t, h, w)`` patch grid an image of this size gets, without processing it."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        rh, rw = smart_resize(height, width, factor=FACTOR, min_pixels=self.min_pixels,
                              max_pixels=self.max_pixels)
        return 1, rh // PATCH_SIZE, rw // PATCH_SIZE
