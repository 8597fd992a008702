"""iCD training data: image folder (jsonl / csv), COCO captions, tar shards; resize + crop; bad samples skipped and
counted, never fatal."""

from __future__ import annotations

import csv
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from editlab.icd.data import (
    CaptionedFiles,
    ICDDataModule,
    TarShards,
    collate,
    expand_shards,
    read_coco,
    read_imagefolder,
    to_pixels,
    write_toy_imagefolder,
)


def png(width: int, height: int, value: int = 128) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), value, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_resize_short_side_and_centre_crop():
    black, white = np.zeros((40, 40, 3)), np.full((40, 40, 3), 255)
    image = Image.fromarray(np.concatenate([black, white, black], 1).astype(np.uint8))
    x = to_pixels(image, 20)  # 120x40 -> 60x20 -> the centre 20x20 is the white third (bicubic blurs its rim)
    assert x.shape == (3, 20, 20) and x[:, :, 2:-2].min() == 1.0 and x.min() > 0.5


def test_imagefolder_jsonl_and_csv_with_a_broken_file(tmp_path):
    (tmp_path / "a.png").write_bytes(png(48, 32))
    (tmp_path / "b.png").write_bytes(b"not an image")
    rows = [{"file_name": "a.png", "text": "a gray square"}, {"file_name": "b.png", "text": "broken"},
            {"file_name": "missing.png", "text": "gone"}, {"file_name": "a.png", "text": ""}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    dataset = CaptionedFiles(read_imagefolder(tmp_path), 16)
    batch = collate([dataset[i] for i in range(len(dataset))])
    assert batch["pixels"].shape == (1, 3, 16, 16) and batch["captions"] == ["a gray square"]
    assert batch["skipped"] == 3

    (tmp_path / "metadata.jsonl").unlink()
    with (tmp_path / "metadata.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, ["file_name", "caption"])
        writer.writeheader()
        writer.writerow({"file_name": "a.png", "caption": "a gray square"})
    assert read_imagefolder(tmp_path) == [(tmp_path / "a.png", "a gray square")]
    assert collate([None, None]) == {"captions": [], "skipped": 2}


def test_coco_captions(tmp_path):
    (tmp_path / "1.png").write_bytes(png(32, 32))
    annotations = {"images": [{"id": 1, "file_name": "1.png"}],
                   "annotations": [{"image_id": 1, "caption": "one"}, {"image_id": 1, "caption": "uno"},
                                   {"image_id": 7, "caption": "no image"}]}
    (tmp_path / "captions.json").write_text(json.dumps(annotations))
    pairs = read_coco(tmp_path, tmp_path / "captions.json")
    assert pairs == [(tmp_path / "1.png", "one"), (tmp_path / "1.png", "uno")]


def _write_shard(path, samples):
    with tarfile.open(path, "w") as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_tar_shards_stream_and_skip_bad_samples(tmp_path):
    _write_shard(tmp_path / "000.tar", [("k1.png", png(20, 30)), ("k1.txt", b"first"),
                                        ("k2.jpg", b"corrupt"), ("k2.txt", b"second"),
                                        ("k3.json", json.dumps({"caption": "no image"}).encode())])
    _write_shard(tmp_path / "001.tar", [("k4.png", png(30, 20)), ("k4.json", json.dumps({"text": "fourth"}).encode())])
    (tmp_path / "002.tar").write_bytes(b"not a tar")
    shards = expand_shards(str(tmp_path / "{000..002}.tar"))
    assert [p.rsplit("/", 1)[1] for p in shards] == ["000.tar", "001.tar", "002.tar"]
    assert expand_shards(str(tmp_path / "00[01].tar")) == shards[:2]
    stream = iter(TarShards(shards, 16, seed=0))
    samples = [next(stream) for _ in range(6)]  # one pass: 2 good, 3 bad (corrupt, no image, broken shard)
    good = [s for s in samples if s is not None]
    assert sorted(s["caption"] for s in good[:2]) == ["first", "fourth"]
    assert samples[:5].count(None) == 3 and good[0]["pixels"].shape == (3, 16, 16)


def test_toy_datamodule_holds_out_validation_images(tmp_path):
    root = write_toy_imagefolder(tmp_path / "toy", n_images=10, size=32, seed=0)
    assert len(read_imagefolder(root)) == 10
    datamodule = ICDDataModule(kind="toy", root=str(root), resolution=32, batch_size=4, n_images=10,
                               validation_size=2)
    datamodule.prepare_data()
    datamodule.setup("fit")
    assert datamodule.validation["pixels"].shape == (2, 3, 32, 32) and len(datamodule.train_set) == 8
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["pixels"].shape == (4, 3, 32, 32) and batch["skipped"] == 0
    assert torch.is_tensor(batch["pixels"]) and all(isinstance(c, str) for c in batch["captions"])
    with pytest.raises(ValueError, match="data.kind"):
        ICDDataModule(kind="laion")
