"""Captioned images for iCD training: an image folder, COCO captions, webdataset tar shards, or a generated toy set.

Every source yields ``{"pixels": [3, res, res] in [-1, 1], "caption": str}`` (a dataset of precomputed VAE
latents may yield ``"latents"`` instead; the training module then skips the VAE): short side resized to the model
resolution (bicubic), centre-cropped. An unreadable or broken sample yields ``None`` instead of raising; `collate`
drops those and reports how many it dropped in the batch's ``skipped`` field, so the training module can count
them (across DataLoader workers) without a run ever crashing on one bad file.

- ``imagefolder``: the Hugging Face convention, ``root/metadata.jsonl`` (one JSON object per line) or
  ``root/metadata.csv`` with a ``file_name`` column and a ``text`` (or ``caption``) column; files relative to root.
- ``coco``: ``images`` folder + ``captions_*.json`` (one sample per caption annotation).
- ``webdataset``: tar shards (``"shards/{00000..00099}.tar"`` or a glob), samples grouped by key: an image
  (jpg/jpeg/png/webp) and a caption (txt, or json with ``caption`` / ``text``). Streamed, shards split over
  ranks and DataLoader workers, reshuffled each pass, endless (training is driven by ``max_steps``).
- ``toy``: captioned scenes from `toyworld.scenes`, written once as an image folder (offline default run).
"""

from __future__ import annotations

import csv
import glob
import io
import itertools
import json
import logging
import os
import random
import re
import tarfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from editlab.models.images import fit, to_model_pixels
from editlab.toyworld.scenes import TOYSET_VERSION, random_scene

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
Sample = dict[str, Any] | None


def to_pixels(image: Image.Image, resolution: int) -> torch.Tensor:
    """RGB image -> [3, res, res] in [-1, 1]: short side resized to ``resolution``, centre crop."""
    return to_model_pixels(fit(image.convert("RGB"), (resolution, resolution)))


def _load(source: str | Path | bytes, caption: Any, resolution: int, name: str) -> Sample:
    try:
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError("missing caption")
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            return {"pixels": to_pixels(image, resolution), "caption": caption.strip()}
    except Exception as err:  # noqa: BLE001 - a corrupt file, a bad caption: skip the sample, never the run
        log.warning("skipping sample %s: %s: %s", name, type(err).__name__, err)
        return None


def collate(samples: list[Sample]) -> dict[str, Any]:
    """Stack the good samples' tensors (``pixels``, or precomputed ``latents``); ``skipped`` counts the dropped
    ones, so the batch may be smaller, even empty."""
    good = [s for s in samples if s is not None]
    batch = {"captions": [s["caption"] for s in good], "skipped": len(samples) - len(good)}
    for key in ("pixels", "latents"):
        if good and key in good[0]:
            batch[key] = torch.stack([s[key] for s in good])
    return batch


# -- map-style sources ------------------------------------------------------------------------------------------------
class CaptionedFiles(Dataset):
    """(image path, caption) pairs, loaded lazily."""

    def __init__(self, items: list[tuple[Path, str]], resolution: int):
        if not items:
            raise ValueError("the training data is empty")
        self.items = items
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Sample:
        path, caption = self.items[index]
        return _load(path, caption, self.resolution, str(path))


def read_imagefolder(root: str | Path) -> list[tuple[Path, str]]:
    """Pairs from ``metadata.jsonl`` or ``metadata.csv`` (``file_name`` + ``text`` or ``caption``)."""
    root = Path(root)
    if (root / "metadata.jsonl").is_file():
        with (root / "metadata.jsonl").open() as f:
            rows = [json.loads(line) for line in f if line.strip()]
    elif (root / "metadata.csv").is_file():
        with (root / "metadata.csv").open(newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        raise FileNotFoundError(f"{root} has no metadata.jsonl or metadata.csv (imagefolder convention)")
    return [(root / row["file_name"], row.get("text", row.get("caption"))) for row in rows]


def read_coco(images: str | Path, annotations: str | Path) -> list[tuple[Path, str]]:
    """One pair per caption annotation of a COCO ``captions_*.json``."""
    data = json.loads(Path(annotations).read_text())
    files = {image["id"]: image["file_name"] for image in data["images"]}
    return [(Path(images) / files[a["image_id"]], a["caption"]) for a in data["annotations"] if a["image_id"] in files]


# -- streamed tar shards ----------------------------------------------------------------------------------------------
def expand_shards(spec: str | list[str]) -> list[str]:
    """``"a/{000..012}.tar"`` (zero-padded ranges) or globs or a list of either -> sorted shard paths."""
    if isinstance(spec, (list, tuple)):
        return [path for item in spec for path in expand_shards(item)]
    match = re.search(r"\{(\d+)\.\.(\d+)\}", spec)
    if match:
        first, last = match.groups()
        return [path for n in range(int(first), int(last) + 1)
                for path in expand_shards(spec[:match.start()] + str(n).zfill(len(first)) + spec[match.end():])]
    return sorted(glob.glob(spec)) if any(ch in spec for ch in "*?[") else [spec]


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _tar_samples(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for consecutive members sharing a key (the webdataset layout)."""
    with tarfile.open(path) as tar:
        members = (m for m in tar if m.isfile())
        for key, group in itertools.groupby(members, key=lambda m: m.name.split(".", 1)[0]):
            yield key, {m.name.split(".", 1)[1].lower(): tar.extractfile(m).read() for m in group if "." in m.name}


def _caption(fields: dict[str, bytes]) -> str | None:
    if "txt" in fields:
        return fields["txt"].decode("utf-8", errors="replace")
    if "json" in fields:
        meta = json.loads(fields["json"])
        return meta.get("caption", meta.get("text"))
    return None


class TarShards(IterableDataset):
    """Endless stream over tar shards, each rank x worker reading its own shards in a fresh order every pass."""

    def __init__(self, shards: str | list[str], resolution: int, seed: int = 0):
        self.shards = expand_shards(shards)
        if not self.shards:
            raise FileNotFoundError(f"no tar shards match {shards!r}")
        self.resolution = resolution
        self.seed = seed

    def __iter__(self) -> Iterator[Sample]:
        rank, world = _rank_and_world()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        slot, slots = rank * workers + worker, world * workers
        mine = self.shards[slot::slots] or self.shards[slot % len(self.shards)::len(self.shards)]
        for epoch in itertools.count():
            order = list(mine)
            random.Random(self.seed + 1000 * epoch + slot).shuffle(order)
            for path in order:
                try:
                    for key, fields in _tar_samples(path):
                        image = next((fields[e] for e in IMAGE_EXTENSIONS if e in fields), None)
                        if image is None:
                            log.warning("skipping sample %s/%s: no image", path, key)
                            yield None
                            continue
                        yield _load(image, _caption(fields), self.resolution, f"{path}/{key}")
                except (tarfile.TarError, OSError, json.JSONDecodeError) as err:
                    log.warning("skipping the rest of shard %s: %s", path, err)
                    yield None


# -- toy set ----------------------------------------------------------------------------------------------------------
def write_toy_imagefolder(root: str | Path, n_images: int = 64, size: int = 64, seed: int = 0) -> Path:
    """Captioned toy scenes as an image folder (PNG + metadata.jsonl); reused when complete and made by the same
    parameters and toy-world version (``toyset.json``)."""

    root = Path(root)
    metadata, marker = root / "metadata.jsonl", root / "toyset.json"
    params = {"version": TOYSET_VERSION, "n_images": n_images, "size": size, "seed": seed}
    if metadata.is_file() and marker.is_file() and json.loads(marker.read_text()) == params:
        return root
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n_images):
        scene = random_scene(rng)
        name = f"{i:05d}.png"
        Image.fromarray(scene.render(size)).save(root / name)
        lines.append(json.dumps({"file_name": name, "text": scene.caption()}))
    metadata.write_text("\n".join(lines) + "\n")
    marker.write_text(json.dumps(params) + "\n")  # last: the completion marker
    return root


# -- resumable order --------------------------------------------------------------------------------------------------
class EndlessBatches(torch.utils.data.Sampler):
    """Index batches of an endless stream of epochs, each a permutation seeded by ``seed`` and its number, that
    starts after this rank's first ``start`` batches: a resumed run sees exactly the batches the stopped run would
    have seen next. Batch ``k`` of the stream goes to rank ``k % world`` (DDP). An epoch has ``n // batch_size``
    batches (one smaller batch when the set is smaller than a batch)."""

    def __init__(self, n: int, batch_size: int, seed: int = 0, start: int = 0):
        self.n, self.batch_size, self.seed, self.start = n, batch_size, seed, start

    def __iter__(self) -> Iterator[list[int]]:
        rank, world = _rank_and_world()
        per_epoch = max(self.n // self.batch_size, 1)
        first = self.start * world + rank  # this rank's next batch in the stream
        for epoch in itertools.count(first // per_epoch):
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
            for k in range(per_epoch):
                index = epoch * per_epoch + k
                if index >= first and index % world == rank:
                    yield order[k * self.batch_size:(k + 1) * self.batch_size]


# -- Lightning --------------------------------------------------------------------------------------------------------
class ICDDataModule(pl.LightningDataModule):
    """``kind``: imagefolder | coco | webdataset | toy (see module doc). ``validation_size`` images are held out
    (map-style kinds) or taken from the stream's head, for the round-trip validation pass."""

    def __init__(self, kind: str = "toy", resolution: int = 64, batch_size: int = 8, num_workers: int = 0,
                 root: str | None = None, annotations: str | None = None, shards: str | list[str] | None = None,
                 n_images: int = 64, validation_size: int = 4, seed: int = 0):
        super().__init__()
        if kind not in ("imagefolder", "coco", "webdataset", "toy"):
            raise ValueError(f"unknown data.kind={kind!r}; expected imagefolder, coco, webdataset or toy")
        self.kind, self.resolution, self.batch_size, self.num_workers = kind, resolution, batch_size, num_workers
        self.root, self.annotations, self.shards, self.n_images = root, annotations, shards, n_images
        self.validation_size, self.seed = validation_size, seed
        self.train_set: Dataset | None = None
        self.validation: dict[str, Any] | None = None

    def prepare_data(self) -> None:  # rank 0 only: write the toy set once
        if self.kind == "toy":
            write_toy_imagefolder(self._root(), self.n_images, self.resolution, self.seed)

    def _root(self) -> str:
        if not self.root:
            raise ValueError(f"data.kind={self.kind} needs data.root")
        return self.root

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.kind == "webdataset":
            if not self.shards:
                raise ValueError("data.kind=webdataset needs data.shards (e.g. /data/laion/{00000..00999}.tar)")
            self.train_set = TarShards(self.shards, self.resolution, self.seed)
            head = [s for s in itertools.islice(iter(TarShards(self.shards, self.resolution, self.seed + 1)),
                                                4 * self.validation_size) if s is not None]
            self.validation = collate(head[: self.validation_size])
            return
        if self.kind == "coco":
            if not self.annotations:
                raise ValueError("data.kind=coco needs data.root (images) and data.annotations (captions json)")
            items = read_coco(self._root(), self.annotations)
        else:
            items = read_imagefolder(self._root())
        items = sorted(items)
        random.Random(self.seed).shuffle(items)
        held_out = CaptionedFiles(items[: self.validation_size], self.resolution)
        self.validation = collate([held_out[i] for i in range(len(held_out))])
        self.train_set = CaptionedFiles(items[self.validation_size:] or items, self.resolution)

    def train_dataloader(self) -> DataLoader:
        """An endless loader that resumes after the batches the module has already trained on (``batches_seen``,
        restored from the checkpoint), for map-style sources in their seeded order (`EndlessBatches`)."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        start = getattr(module, "batches_seen", 0)
        common = dict(num_workers=self.num_workers, collate_fn=collate, persistent_workers=self.num_workers > 0,
                      pin_memory=torch.cuda.is_available())
        if isinstance(self.train_set, IterableDataset):
            if start:
                log.warning("resuming a streamed data set restarts its shards from the beginning (%d batches were "
                            "already seen)", start)
            return DataLoader(self.train_set, batch_size=self.batch_size, **common)
        sampler = EndlessBatches(len(self.train_set), self.batch_size, self.seed, start)
        return DataLoader(self.train_set, batch_sampler=sampler, generator=torch.Generator().manual_seed(self.seed),
                          **common)
