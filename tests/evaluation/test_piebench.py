import json

import numpy as np
import pytest
from PIL import Image

from editlab.evaluation.piebench import PieBenchDataset, load_rgb_image, rle_decode, rle_encode, strip_brackets

N = 512 * 512

# ---------------------------------------------------------------------------------------------------------
# RLE masks


def test_decode_stored_form_with_frame_runs():
    # head of entry 000000000000: the first row, then runs of 2 joining each right border pixel to the next left one
    mask = rle_decode([0, 513, 1023, 2, 1535, 2])
    assert mask.shape == (512, 512) and set(np.unique(mask)) == {0.0, 1.0}
    raw = rle_decode([0, 513, 1023, 2, 1535, 2], frame=False)
    ones = {divmod(int(i), 512) for i in np.flatnonzero(raw)}
    assert ones == {(0, c) for c in range(512)} | {(1, 0), (1, 511), (2, 0), (2, 511), (3, 0)}
    assert np.array_equal(raw[:3], mask[:3])  # the stored runs already hold the frame


def test_full_masks_and_the_frame():
    assert rle_decode([0, N]).sum() == N
    assert rle_decode([0, 1]).sum() == 4 * 512 - 4 == 2044  # one corner pixel, then the forced frame
    assert rle_decode([0, 1], frame=False).sum() == 1


def test_run_wraps_rows_in_row_major_order():
    raw = rle_decode([510, 5], frame=False)
    assert {divmod(int(i), 512) for i in np.flatnonzero(raw)} == {(0, 510), (0, 511), (1, 0), (1, 1), (1, 2)}


def test_overlong_runs_are_clipped():
    raw = rle_decode([N - 4, 100], frame=False)
    assert raw.sum() == 4 and raw[-1, -4:].all()


def test_bad_rle_rejected():
    with pytest.raises(ValueError, match="pairs"):
        rle_decode([0, 1, 2])
    with pytest.raises(ValueError, match="negative"):
        rle_decode([5, -1])
    with pytest.raises(ValueError, match="empty"):  # would decode to a frame-only mask: nothing marked as edited
        rle_decode([])
    with pytest.raises(ValueError, match="past the end"):  # so would a run that starts outside the grid
        rle_decode([N - 4, 2, N + 10, 3])


def test_encode_decode_round_trip():
    rng = np.random.default_rng(0)
    for density in (0.05, 0.5, 0.95):
        mask = (rng.random((512, 512)) < density).astype(np.float64)
        mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = 1
        assert np.array_equal(rle_decode(rle_encode(mask)), mask)
    assert rle_encode(rle_decode([0, N])) == [0, N]
    small = np.zeros((64, 48))
    small[10:20, 5:30] = 1
    assert np.array_equal(rle_decode(rle_encode(small), 64, 48, frame=False), small)


# ---------------------------------------------------------------------------------------------------------
# dataset


def entry(edit_type, src="a [round] cake", tgt="a [square] cake", blend="cake cake", folder="x", name="img"):
    return {
        "image_path": f"{folder}/{name}.jpg",
        "original_prompt": src,
        "editing_prompt": tgt,
        "editing_instruction": "make it square",
        "editing_type_id": str(edit_type),
        "blended_word": blend,
        "mask": [0, 10],
    }


@pytest.fixture
def root(tmp_path):
    mapping = {  # deliberately unsorted
        "924000000009": entry(9, "a horse", "[watercolor of] a horse", "", name="924000000009"),
        "000000000001": entry(0, name="000000000001"),
        "111000000000": entry(1, name="111000000000"),
        "211000000000": entry(2, name="211000000000"),
        "000000000000": entry(0, name="000000000000"),
        "111000000001": entry(1, name="111000000001"),
    }
    (tmp_path / "mapping_file.json").write_text(json.dumps(mapping))
    return tmp_path


def ids(dataset):
    return [item.image_id for item in dataset]


def test_dataset_sorted_and_parsed(root):
    data = PieBenchDataset(root)
    assert ids(data) == sorted(ids(data)) and len(data) == 6
    item = data[0]
    assert (item.source_prompt, item.target_prompt) == ("a round cake", "a square cake")
    assert item.edit_type == "0" and item.instruction == "make it square" and item.blend_words == ("cake", "cake")
    style = data[-1]
    assert style.blend_words is None and style.target_prompt == "watercolor of a horse"
    assert data.image_file(item) == root / "annotation_images" / "x/000000000000.jpg"
    assert data.load_mask(item).shape == (512, 512)
    assert strip_brackets("[a] [b]") == "a b"


def test_dataset_filters_limit_and_shards(root):
    assert ids(PieBenchDataset(root, edit_types=["1", 9])) == ["111000000000", "111000000001", "924000000009"]
    assert ids(PieBenchDataset(root, ids=["211000000000", "000000000000"])) == ["000000000000", "211000000000"]
    assert ids(PieBenchDataset(root, edit_types=[0], ids=["111000000000"])) == []
    assert ids(PieBenchDataset(root, limit=2)) == ["000000000000", "000000000001"]
    everything = ids(PieBenchDataset(root))
    shards = [ids(PieBenchDataset(root, shard=s, num_shards=3)) for s in range(3)]
    assert shards[1] == everything[1::3] and sorted(sum(shards, [])) == everything
    # limit applies before sharding
    assert ids(PieBenchDataset(root, limit=4, shard=1, num_shards=2)) == everything[1:4:2]
    with pytest.raises(ValueError, match="shard"):
        PieBenchDataset(root, shard=2, num_shards=2)
    with pytest.raises(ValueError, match="999"):
        PieBenchDataset(root, ids=["999"])


@pytest.mark.parametrize("blend", ["cake", "a b c", "cake  cake", " cake"])
def test_malformed_blend_word_names_the_image(tmp_path, blend):
    (tmp_path / "mapping_file.json").write_text(json.dumps({"123000000000": entry(1, blend=blend)}))
    with pytest.raises(ValueError, match="123000000000"):
        PieBenchDataset(tmp_path)


def _write(root, text):
    (root / "mapping_file.json").write_text(text)
    return root


MALFORMED = {  # mapping file text -> what the message must name besides the file
    "bad json": ('{"111000000000": {"image_path": "a.jpg",}', "line 1"),
    "not an object": ('[1, 2]', "list"),
    "entry is a list": (json.dumps({"111000000000": ["a.jpg"]}), "111000000000"),
    "mask of strings": (json.dumps({"111000000000": entry(1) | {"mask": ["0", "10"]}}), "111000000000"),
    "mask not a list": (json.dumps({"111000000000": entry(1) | {"mask": 7}}), "mask"),
    "prompt not a string": (json.dumps({"111000000000": entry(1) | {"editing_prompt": 3}}), "editing_prompt"),
    "missing field": (json.dumps({"111000000000": {"image_path": "a.jpg"}}), "original_prompt"),
    "duplicate ids": ('{"111000000000": %s, "111000000000": %s}' % (json.dumps(entry(1)), json.dumps(entry(1))),
                      "111000000000"),
    "absolute image_path": (json.dumps({"111000000000": entry(1) | {"image_path": "/etc/passwd.png"}}), "passwd"),
    "image_path leaves the folder": (json.dumps({"111000000000": entry(1) | {"image_path": "../../x.png"}}), ".."),
    "image_path that is no file": (json.dumps({"111000000000": entry(1) | {"image_path": "./."}}), "111000000000"),
    "windows drive path": (json.dumps({"111000000000": entry(1) | {"image_path": "C:\\\\x.png"}}), "111000000000"),
    "shared image_path": (json.dumps({"111000000000": entry(1), "111000000001": entry(1)}),
                          "111000000000, 111000000001"),
    "same stem, other extension": (json.dumps({"111000000000": entry(1), "111000000001": entry(1) | {
        "image_path": "x/img.png"}}), "111000000000, 111000000001"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_mapping_file_names_the_file_and_the_entry(tmp_path, case):
    text, named = MALFORMED[case]
    with pytest.raises(ValueError) as info:
        PieBenchDataset(_write(tmp_path, text))
    assert str(tmp_path / "mapping_file.json") in str(info.value) and named in str(info.value), str(info.value)


def test_image_paths_are_normalised_relative_paths(tmp_path):
    data = PieBenchDataset(_write(tmp_path, json.dumps({"111000000000": entry(1) | {"image_path": "./x/./a.jpg"}})))
    assert data[0].image_path == "x/a.jpg"


def test_masks_decode_at_the_benchmark_size_and_follow_the_image(tmp_path):
    """A 512² PIE-Bench mask marking a quarter of the image marks a quarter of any square image: it is decoded at
    512² and resized with the image, not decoded on the image's own grid."""
    quarter = np.zeros((512, 512))
    quarter[:256, :256] = 1
    data = PieBenchDataset(_write(tmp_path, json.dumps({"111000000000": entry(1) | {"mask": rle_encode(quarter)}})))
    for side in (512, 1000, 64):
        mask = data.load_mask(data[0], side, side)
        assert mask.shape == (side, side) and abs(mask.mean() - 0.25) < 0.01, (side, mask.mean())
    with pytest.raises(ValueError, match="4000x3000"):  # a mask cannot be placed on an image of another shape
        data.load_mask(data[0], 3000, 4000)
    small = PieBenchDataset(tmp_path, mask_size=8)  # the toy set's masks index its own grid
    with pytest.raises(ValueError, match="111000000000.*past the end"):
        small.load_mask(small[0])


def test_missing_mapping_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset.root") as info:
        PieBenchDataset(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere" / "mapping_file.json") in str(info.value)


# ---------------------------------------------------------------------------------------------------------
# image loading


def test_load_rgb_modes(tmp_path):
    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 0  # fully transparent red stays red: alpha is dropped, not composited
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    image, note = load_rgb_image(tmp_path / "rgba.png")
    assert image.mode == "RGB" and note == "RGBA->RGB" and np.array_equal(np.asarray(image), rgba[..., :3])

    grey = np.arange(20, dtype=np.uint8).reshape(4, 5)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    image, note = load_rgb_image(tmp_path / "grey.png")
    assert note == "L->RGB" and np.array_equal(np.asarray(image), np.repeat(grey[..., None], 3, 2))

    palette = Image.fromarray(grey).convert("P")
    palette.save(tmp_path / "palette.png")
    image, note = load_rgb_image(tmp_path / "palette.png")
    assert note == "P->RGB" and np.array_equal(np.asarray(image)[..., 1], grey)

    Image.fromarray(np.full((4, 5, 3), 7, np.uint8)).save(tmp_path / "rgb.png")
    image, note = load_rgb_image(tmp_path / "rgb.png")
    assert note == "" and image.mode == "RGB" and np.asarray(image).max() == 7


def test_load_16_bit_scales_instead_of_clipping(tmp_path):
    deep = np.array([[0, 257, 32896, 65535]], np.uint16)  # -> 0, 1, 128, 255
    Image.fromarray(deep).save(tmp_path / "deep.png")  # mode I;16
    Image.frombytes("I;16B", (4, 1), deep.astype(">u2").tobytes()).save(tmp_path / "deep_be.tif")
    Image.fromarray(deep.astype(np.int32)).save(tmp_path / "deep_i.tif")  # mode I
    for name, mode in [("deep.png", "I;16"), ("deep_be.tif", "I;16B"), ("deep_i.tif", "I")]:
        image, note = load_rgb_image(tmp_path / name)
        assert note.startswith(f"{mode}->RGB") and image.mode == "RGB"
        assert np.asarray(image)[0, :, 2].tolist() == [0, 1, 128, 255]


def test_load_missing_and_corrupt(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_rgb_image(tmp_path / "nope.png")
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="cannot read image .*junk.jpg"):
        load_rgb_image(tmp_path / "junk.jpg")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "whole.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "whole.png").read_bytes()[:60])
    with pytest.raises(ValueError, match="cannot read image .*cut.png"):
        load_rgb_image(tmp_path / "cut.png")
