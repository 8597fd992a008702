"""PIE-Bench data: `mapping_file.json` items, their run-length masks, and robust source-image loading.

Masks are stored as a flat list ``[s0, n0, s1, n1, ...]``: ``s`` is an absolute index into the row-major
flattening of the grid, ``n`` a run of ones (runs may wrap rows and are clipped at the end of the grid).
After decoding, the reference evaluator forces the one-pixel frame to 1 ("avoid annotation errors at the
boundary"), so a decoded mask is never empty and its complement never covers the whole image.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

PIE_BENCH_SIZE = 512


def rle_decode(
    rle: list[int], height: int = PIE_BENCH_SIZE, width: int | None = None, frame: bool = True
) -> np.ndarray:
    """Decode a PIE-Bench RLE mask to a (height, width) float array of 0/1 (1 = edited region)."""
    width = height if width is None else width
    if len(rle) % 2:
        raise ValueError(f"RLE mask must hold (start, length) pairs, got {len(rle)} numbers")
    size = height * width
    flat = np.zeros(size, dtype=np.float64)
    for start, length in zip(rle[0::2], rle[1::2]):
        start, length = int(start), int(length)
        if start < 0 or length < 0:
            raise ValueError(f"RLE run ({start}, {length}) is negative")
        flat[start : start + min(length, max(size - start, 0))] = 1.0
    mask = flat.reshape(height, width)
    if frame:
        mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = 1.0
    return mask


def rle_encode(mask: np.ndarray) -> list[int]:
    """Encode a 2-D binary mask as PIE-Bench RLE (absolute row-major starts). Inverse of `rle_decode`."""
    flat = np.asarray(mask).reshape(-1) > 0.5
    padded = np.concatenate([[False], flat, [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    starts, ends = edges[0::2], edges[1::2]
    return [int(v) for pair in zip(starts, ends - starts) for v in pair]


def strip_brackets(prompt: str) -> str:
    """PIE-Bench prompts mark the edited span with [...]; every reference runner and the evaluator drop them."""
    return prompt.replace("[", "").replace("]", "")


@dataclass(frozen=True)
class PieBenchItem:
    image_id: str
    image_path: str  # relative to `annotation_images/`
    source_prompt: str  # brackets stripped
    target_prompt: str
    source_prompt_raw: str
    target_prompt_raw: str
    instruction: str
    edit_type: str  # "0".."9", kept a string as in the mapping file
    blend_words: tuple[str, str] | None
    mask_rle: list[int]

    @classmethod
    def from_entry(cls, image_id: str, entry: Mapping) -> PieBenchItem:
        try:
            src, tgt = entry["original_prompt"], entry["editing_prompt"]
            image_path, edit_type, rle = entry["image_path"], entry["editing_type_id"], entry["mask"]
        except KeyError as err:
            raise ValueError(f"PIE-Bench entry {image_id}: missing field {err}") from None
        blended = entry.get("blended_word", "")
        blend_words = None
        if blended:
            parts = blended.split(" ")
            if len(parts) != 2 or not all(parts):
                raise ValueError(f"PIE-Bench entry {image_id}: blended_word {blended!r} is not '<source> <target>'")
            blend_words = (parts[0], parts[1])
        return cls(
            image_id=image_id,
            image_path=image_path,
            source_prompt=strip_brackets(src),
            target_prompt=strip_brackets(tgt),
            source_prompt_raw=src,
            target_prompt_raw=tgt,
            instruction=entry.get("editing_instruction", ""),
            edit_type=str(edit_type),
            blend_words=blend_words,
            mask_rle=[int(v) for v in rle],
        )


class PieBenchDataset:
    """Items of `root/mapping_file.json`, sorted by image id, then filtered, limited and sharded (in that order)."""

    def __init__(
        self,
        root: str | Path,
        edit_types: Iterable[str | int] | None = None,
        ids: Iterable[str] | None = None,
        limit: int | None = None,
        shard: int = 0,
        num_shards: int = 1,
    ) -> None:
        if not 0 <= shard < num_shards:
            raise ValueError(f"need 0 <= shard < num_shards, got shard={shard}, num_shards={num_shards}")
        self.root = Path(root)
        mapping_path = self.root / "mapping_file.json"
        if not mapping_path.is_file():
            raise FileNotFoundError(
                f"PIE-Bench mapping file not found: {mapping_path}. Set dataset.root to the PIE-Bench folder "
                "(the one holding mapping_file.json and annotation_images/)."
            )
        mapping = json.loads(mapping_path.read_text())
        items = [PieBenchItem.from_entry(image_id, mapping[image_id]) for image_id in sorted(mapping)]
        if edit_types is not None:
            wanted_types = {str(t) for t in edit_types}
            items = [item for item in items if item.edit_type in wanted_types]
        if ids is not None:
            wanted_ids = {str(i) for i in ids}
            if unknown := sorted(wanted_ids - mapping.keys()):
                raise ValueError(f"image ids not in {mapping_path}: {', '.join(unknown)}")
            items = [item for item in items if item.image_id in wanted_ids]
        if limit is not None:
            items = items[:limit]
        self.items: list[PieBenchItem] = items[shard::num_shards]

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[PieBenchItem]:
        return iter(self.items)

    def __getitem__(self, index: int) -> PieBenchItem:
        return self.items[index]

    def image_file(self, item: PieBenchItem) -> Path:
        return self.root / "annotation_images" / item.image_path

    def load_mask(self, item: PieBenchItem, height: int = PIE_BENCH_SIZE, width: int | None = None) -> np.ndarray:
        """Edit mask (1 = edited) at the source image's size, frame forced to 1 like the reference evaluator."""
        return rle_decode(item.mask_rle, height, width)


_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def load_rgb_image(path: str | Path) -> tuple[Image.Image, str]:
    """Open an image as 8-bit RGB; the note says what was converted ("" when it already was 8-bit RGB)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            if mode == "RGB":
                return image.copy(), ""
            if mode in _SIXTEEN_BIT_MODES:
                # PIL's convert() clips 16-bit values at 255; scale the full range instead (65535 -> 255).
                # Mode "I" is 32-bit but is what 16-bit TIFF/PNG greys often decode to, so read it as 16-bit too.
                grey = np.clip(np.asarray(image, dtype=np.float64), 0, 65535) / 257.0
                grey = np.round(grey).astype(np.uint8)
                return Image.fromarray(np.repeat(grey[..., None], 3, axis=2)), f"{mode}->RGB (16-bit scaled to 8-bit)"
            # RGBA/LA: alpha is dropped, not composited; L/P/CMYK/1/YCbCr: PIL's standard conversion.
            return image.convert("RGB"), f"{mode}->RGB"
    except (OSError, SyntaxError, ValueError) as err:  # PIL reports corrupt files with all three
        raise ValueError(f"cannot read image {path}: {err}") from err
