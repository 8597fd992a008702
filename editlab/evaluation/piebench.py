"""PIE-Bench data: `mapping_file.json` items, their run-length masks, and robust source-image loading.

Masks are stored as a flat list ``[s0, n0, s1, n1, ...]``: ``s`` is an absolute index into the row-major
flattening of the grid, ``n`` a run of ones (runs may wrap rows and are clipped at the end of the grid).
After decoding, the reference evaluator forces the one-pixel frame to 1 ("avoid annotation errors at the
boundary"), so a decoded mask is never empty and its complement never covers the whole image.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
from PIL import Image, ImageOps

PIE_BENCH_SIZE = 512
EDIT_TYPES = {  # PIE-Bench's editing_type_id -> the name of its folder
    "0": "random", "1": "change_object", "2": "add_object", "3": "delete_object",
    "4": "change_attribute_content", "5": "change_attribute_pose", "6": "change_attribute_color",
    "7": "change_attribute_material", "8": "change_background", "9": "change_style",
}


def rle_decode(
    rle: list[int], height: int = PIE_BENCH_SIZE, width: int | None = None, frame: bool = True
) -> np.ndarray:
    """Decode a PIE-Bench RLE mask to a (height, width) float array of 0/1 (1 = edited region)."""
    width = height if width is None else width
    if not rle:
        raise ValueError("RLE mask is empty (every PIE-Bench mask holds at least its frame)")
    if len(rle) % 2:
        raise ValueError(f"RLE mask must hold (start, length) pairs, got {len(rle)} numbers")
    size = height * width
    flat = np.zeros(size, dtype=np.float64)
    for start, length in zip(rle[0::2], rle[1::2]):
        start, length = int(start), int(length)
        if start < 0 or length < 0:
            raise ValueError(f"RLE run ({start}, {length}) is negative")
        if start >= size:
            raise ValueError(f"RLE run ({start}, {length}) starts past the end of a {height}x{width} mask")
        flat[start : start + min(length, size - start)] = 1.0
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


def _control_characters(text: str) -> list[str]:
    """Control characters other than white space (a NUL byte, an escape ...): no prompt or id has a use for them."""
    return sorted({repr(c) for c in text if unicodedata.category(c) == "Cc" and not c.isspace()})


def check_image_id(image_id: str) -> None:
    """One rule for ids, checked at load: no white space at either end, no tab or line break, no control character.
    (A results row stores its id with white space folded, so such an id would never count as done.)"""
    if not image_id or image_id != " ".join(image_id.split()) or _control_characters(image_id):
        raise ValueError(f"image id {image_id!r} has white space at an end, a tab, a line break or a control "
                         "character; rename it in the benchmark file")


@dataclass(frozen=True)
class PieBenchItem:
    image_id: str
    image_path: str  # relative to `annotation_images/`
    source_prompt: str  # brackets stripped
    target_prompt: str
    instruction: str
    edit_type: str  # "0".."9", kept a string as in the mapping file
    blend_words: tuple[str, str] | None
    mask_rle: list[int]

    def __post_init__(self) -> None:
        """Checks the id and the texts, and folds every run of white space in a text (a caption spanning lines) to
        one space, as the tokenizers and the blend-word lookup read it."""
        check_image_id(self.image_id)
        for name in ("source_prompt", "target_prompt", "instruction"):
            text = getattr(self, name)
            if bad := _control_characters(text):
                raise ValueError(f"item {self.image_id}: {name} holds control characters ({', '.join(bad)}); "
                                 "remove them from the benchmark file")
            object.__setattr__(self, name, " ".join(text.split()))

    @classmethod
    def from_entry(cls, image_id: str, entry: Mapping) -> PieBenchItem:
        def bad(what: str) -> ValueError:
            return ValueError(f"PIE-Bench entry {image_id}: {what}")

        if not isinstance(entry, Mapping):
            raise bad(f"is a {type(entry).__name__}, expected an object with the PIE-Bench fields")
        try:
            src, tgt = entry["original_prompt"], entry["editing_prompt"]
            image_path, edit_type, rle = entry["image_path"], entry["editing_type_id"], entry["mask"]
        except KeyError as err:
            raise bad(f"missing field {err}") from None
        for key in ("original_prompt", "editing_prompt", "image_path", "editing_instruction", "blended_word"):
            if not isinstance(entry.get(key, ""), str):
                raise bad(f"{key} is a {type(entry[key]).__name__}, expected a string")
        if not isinstance(edit_type, (str, int)) or isinstance(edit_type, bool) or not str(edit_type).strip():
            raise bad(f"editing_type_id {edit_type!r} is not a type id such as \"1\"")
        if not isinstance(rle, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in rle):
            raise bad("mask is not a list of integers (run-length pairs [start, length, ...])")
        blended = entry.get("blended_word", "")
        blend_words = None
        if blended:
            parts = blended.split(" ")
            if len(parts) != 2 or not all(parts):
                raise bad(f"blended_word {blended!r} is not '<source> <target>'")
            blend_words = (parts[0], parts[1])
        return cls(
            image_id=image_id,
            image_path=relative_image_path(image_path, image_id),
            source_prompt=strip_brackets(src),
            target_prompt=strip_brackets(tgt),
            instruction=entry.get("editing_instruction", ""),
            edit_type=str(edit_type),
            blend_words=blend_words,
            mask_rle=list(rle),
        )


def relative_image_path(image_path: str, image_id: str) -> str:
    """``image_path`` as a normalised relative POSIX path; one that is empty, absolute or climbs out with ``..``
    is refused: results are written under ``<output_dir>/annotation_images/<image_path>``, never elsewhere."""
    posix, windows = PurePosixPath(image_path.replace("\\", "/")), PureWindowsPath(image_path)
    parts = [part for part in posix.parts if part != "."]
    if not image_path.strip() or not parts or posix.is_absolute() or windows.anchor or ".." in parts:
        raise ValueError(f"PIE-Bench entry {image_id}: image_path {image_path!r} must be a path relative to "
                         "annotation_images/ that stays inside it")
    return str(PurePosixPath(*parts))


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    keys = [key for key, _ in pairs]
    if duplicated := sorted({key for key in keys if keys.count(key) > 1}):
        raise ValueError(f"duplicate key {', '.join(map(repr, duplicated))} (each image id, and each field of an "
                         "entry, must appear once)")
    return dict(pairs)


def read_mapping(path: Path) -> dict[str, Mapping]:
    """The raw entries of a mapping file; a file that is not one JSON object of unique ids raises, naming it."""
    try:
        mapping = json.loads(path.read_text(), object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: {err}") from None
    if not isinstance(mapping, dict):
        raise ValueError(f"{path} holds a JSON {type(mapping).__name__}; expected an object keyed by image id")
    return mapping


def _check_collisions(items: list[PieBenchItem], path: Path) -> None:
    """Items whose edits would land on one output file (``<image_path stem>.png``) would overwrite each other."""
    by_output: dict[str, list[str]] = {}
    for item in items:
        by_output.setdefault(str(PurePosixPath(item.image_path).with_suffix("")), []).append(item.image_id)
    if clashes := [ids for ids in by_output.values() if len(ids) > 1]:
        listed = "; ".join(", ".join(ids) for ids in clashes)
        raise ValueError(f"{path}: items share an image_path (the same path, or the same stem with another "
                         f"extension), so their edits would overwrite each other: {listed}")


def _own_mask_size(root: Path) -> int | None:
    """The mask grid a generated set records (the toy sets' ``toyset.json``), else None (PIE-Bench's 512²)."""
    try:
        return int(json.loads((root / "toyset.json").read_text())["size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


class ItemSet:
    """A benchmark's items (``items``, in order) as a sequence; subclasses also say where an item's image is
    (``image_file``) and give its edit mask (``load_mask``)."""

    items: list[PieBenchItem]
    # what its items offer an editor (`Editor.needs`) and the metrics (`Metric.needs`): a PIE-Bench item has captions,
    # an instruction and an edit mask; an instruction benchmark's has no captions (`evaluation.instruction_sets`)
    provides: frozenset[str] = frozenset({"source", "prompts", "instruction", "mask"})

    @property
    def provenance(self) -> dict[str, str]:
        """What identifies the benchmark's copy beyond its folder (a hub revision), recorded in job.json; {}: none."""
        return {}

    def source_beside_edit(self, output_dir: Path, item: PieBenchItem) -> Path | None:
        """Where a run also saves the source as the editor saw it, for a scorer that reads it beside the edit;
        None: nowhere."""
        return None

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[PieBenchItem]:
        return iter(self.items)

    def __getitem__(self, index: int) -> PieBenchItem:
        return self.items[index]


class PieBenchDataset(ItemSet):
    """Items of `root/mapping_file.json`, sorted by image id, then filtered, limited and sharded (in that order).
    Masks index a ``mask_size``² grid: by default the one a generated set records, else PIE-Bench's 512²."""

    def __init__(
        self,
        root: str | Path,
        edit_types: Iterable[str | int] | None = None,
        ids: Iterable[str] | None = None,
        limit: int | None = None,
        shard: int = 0,
        num_shards: int = 1,
        mask_size: int | None = None,
    ) -> None:
        if not 0 <= shard < num_shards:
            raise ValueError(f"need 0 <= shard < num_shards, got shard={shard}, num_shards={num_shards}")
        self.root = Path(root)
        self.mask_size = mask_size or _own_mask_size(self.root) or PIE_BENCH_SIZE
        mapping_path = self.root / "mapping_file.json"
        if not mapping_path.is_file():
            raise FileNotFoundError(
                f"PIE-Bench mapping file not found: {mapping_path}. Set dataset.root to the PIE-Bench folder "
                "(the one holding mapping_file.json and annotation_images/)."
            )
        mapping = read_mapping(mapping_path)
        try:
            items = [PieBenchItem.from_entry(image_id, mapping[image_id]) for image_id in sorted(mapping)]
        except ValueError as err:
            raise ValueError(f"{mapping_path}: {err}") from None
        _check_collisions(items, mapping_path)
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

    def image_file(self, item: PieBenchItem) -> Path:
        return file_inside(self.root / "annotation_images", item.image_path, item.image_id)

    def load_mask(self, item: PieBenchItem, height: int | None = None, width: int | None = None) -> np.ndarray:
        """Edit mask (1 = edited) at the source image's size (default: the benchmark's), frame forced to 1 like the
        reference evaluator. The RLE is decoded at the benchmark's mask size (512² for PIE-Bench) and resized (nearest)
        to an image of another size with the same aspect; any other image cannot be matched to its mask."""
        side = self.mask_size
        height = side if height is None else height
        width = height if width is None else width
        try:
            mask = rle_decode(item.mask_rle, side, side)
        except ValueError as err:
            raise ValueError(f"mask of {item.image_id}: {err}") from None
        if (height, width) == (side, side):
            return mask
        if abs(width / height - 1) > 0.01:
            raise ValueError(f"mask of {item.image_id} is {side}x{side} but its image is {width}x{height}: the mask "
                             "only fits a square image; crop the image to a square as the benchmark's was")
        resized = Image.fromarray((mask * 255).astype(np.uint8)).resize((width, height), Image.NEAREST)
        return (np.asarray(resized) > 127).astype(np.float64)


def file_inside(folder: Path, relative: str, image_id: str) -> Path:
    """``folder / relative``, refused when it resolves outside ``folder`` (an image that is a link to a file
    elsewhere): the benchmark's items come from its own folder. ``folder`` itself may be a link."""
    path = folder / relative
    if path.is_symlink() and folder.resolve() not in path.resolve().parents:
        raise ValueError(f"image of {image_id}: {path} is a link to {path.resolve()}, outside {folder}; copy the "
                         "image into the benchmark's folder")
    return path


def edited_image_path(output_dir: Path, item: PieBenchItem) -> Path:
    """Where a run saves an item's edit: ``<output_dir>/annotation_images/<image_path stem>.png``, the layout
    `evaluation.score` reads; ``image_path`` is relative and stays inside (`relative_image_path`)."""
    return output_dir / "annotation_images" / Path(item.image_path).with_suffix(".png")


ORIENTATION_TAG = 0x0112  # EXIF Orientation
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def load_rgb_image(path: str | Path) -> tuple[Image.Image, str]:
    """Open an image as 8-bit RGB; the note says what was converted ("" when it already was 8-bit RGB)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as opened:
            opened.load()
            notes = [f"first of {frames} frames"] if (frames := getattr(opened, "n_frames", 1)) > 1 else []
            if (orientation := opened.getexif().get(ORIENTATION_TAG, 1)) not in (0, 1):
                notes.append(f"EXIF orientation {orientation} applied")
            image = ImageOps.exif_transpose(opened)  # upright, as viewers show it
            rgb, note = _to_rgb(image)
            return rgb, "; ".join(n for n in (note, *notes) if n)
    except (OSError, SyntaxError, ValueError) as err:  # PIL reports corrupt files with all three
        raise ValueError(f"cannot read image {path}: {err}") from err


def _to_rgb(image: Image.Image) -> tuple[Image.Image, str]:
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
