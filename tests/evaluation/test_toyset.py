"""The built-in toy PIE-Bench set: deterministic, in the PIE-Bench format, with exact masks and targets."""

import json
import re

import numpy as np
import pytest
from PIL import Image

from editlab.evaluation import piebench
from editlab.evaluation.piebench import EDIT_TYPES, rle_decode
from editlab.evaluation.toyset import write_piebench
from editlab.toyworld.scenes import MAX_PROMPT_CHARS, Obj, Scene, bracket, edit_mask, random_scene, toy_edits

N, SIZE, SEED = 2, 32, 0
FIELDS = ["image_path", "original_prompt", "editing_prompt", "editing_instruction", "editing_type_id",
          "blended_word", "mask"]


def strip(prompt):
    return prompt.replace("[", "").replace("]", "")


def files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def load(path):
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = write_piebench(tmp_path_factory.mktemp("toy"), n_per_type=N, size=SIZE, seed=SEED)
    return root, json.loads((root / "mapping_file.json").read_text())


@pytest.fixture(scope="module")
def edits():
    return toy_edits(N, SEED, size=SIZE)


def test_two_writes_are_byte_identical_and_rewrites_are_skipped(toy, tmp_path):
    root, _ = toy
    assert files(write_piebench(tmp_path / "again", n_per_type=N, size=SIZE, seed=SEED)) == files(root)
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    write_piebench(root, n_per_type=N, size=SIZE, seed=SEED)
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == stamps


def test_other_parameters_replace_the_set(tmp_path):
    write_piebench(tmp_path, n_per_type=2, size=32, seed=1, edit_types=("6", "9"))
    write_piebench(tmp_path, n_per_type=1, size=32, seed=1, edit_types=("6",))
    mapping = json.loads((tmp_path / "mapping_file.json").read_text())
    assert list(mapping) == ["600000000000"]
    # No stale images of the first set remain.
    assert sorted(p.name for p in (tmp_path / "annotation_images").rglob("*.png")) == ["600000000000.png"]
    assert json.loads((tmp_path / "toyset.json").read_text())["n_per_type"] == 1
    assert load(tmp_path / "ground_truth" / mapping["600000000000"]["image_path"]).shape == (32, 32, 3)


def test_mapping_fields_and_ids_follow_piebench(toy):
    root, mapping = toy
    assert sorted({e["editing_type_id"] for e in mapping.values()}) == list(EDIT_TYPES)
    assert len(mapping) == N * len(EDIT_TYPES)
    for image_id, entry in mapping.items():
        assert re.fullmatch(r"\d{12}", image_id) and image_id[0] == entry["editing_type_id"]
        assert list(entry) == FIELDS
        assert all(isinstance(entry[f], str) for f in FIELDS if f != "mask")
        assert entry["mask"] and all(type(v) is int for v in entry["mask"])
        folder, name = entry["image_path"].split("/")
        assert folder.startswith(f"{image_id[0]}_") and name == f"{image_id}.png"
        for side in ("annotation_images", "ground_truth"):
            with Image.open(root / side / entry["image_path"]) as img:
                assert (img.format, img.mode, img.size) == ("PNG", "RGB", (SIZE, SIZE))


def test_rle_round_trip_and_frame(toy, edits):
    _, mapping = toy
    assert mapping.keys() == edits.keys()
    for image_id, entry in mapping.items():
        mask = edit_mask(edits[image_id], SIZE)
        assert mask[0].all() and mask[-1].all() and mask[:, 0].all() and mask[:, -1].all()
        # The frame is stored in the RLE itself, as in PIE-Bench; decoding with or without forcing it agrees.
        assert np.array_equal(rle_decode(entry["mask"], SIZE, SIZE, frame=False), mask)
        assert np.array_equal(rle_decode(entry["mask"], SIZE, SIZE), mask)


def test_mask_covers_every_changed_pixel_and_targets_match_the_scenes(toy, edits):
    root, mapping = toy
    for image_id, entry in mapping.items():
        src = load(root / "annotation_images" / entry["image_path"])
        gt = load(root / "ground_truth" / entry["image_path"])
        assert np.array_equal(src, edits[image_id].source.render(SIZE))
        assert np.array_equal(gt, edits[image_id].target.render(SIZE))
        changed = (src != gt).any(axis=-1)
        assert changed.any(), image_id
        assert not (changed & (rle_decode(entry["mask"], SIZE, SIZE) == 0)).any(), image_id


def test_prompts_brackets_and_blend_words(toy, edits):
    _, mapping = toy
    for image_id, entry in mapping.items():
        edit = edits[image_id]
        src, tgt = strip(entry["original_prompt"]), strip(entry["editing_prompt"])
        assert (src, tgt) == (edit.source.caption(), edit.target.caption())
        for raw in (entry["original_prompt"], entry["editing_prompt"], entry["editing_instruction"]):
            assert len(raw) <= MAX_PROMPT_CHARS and raw.count("[") == raw.count("]") <= 1
        assert "[" in entry["editing_prompt"] or "[" in entry["original_prompt"]
        if entry["editing_type_id"] == "9":
            assert entry["blended_word"] == ""
        if entry["blended_word"]:
            src_word, tgt_word = entry["blended_word"].split(" ")
            assert src_word in src.split(" ") and tgt_word in tgt.split(" ")


def test_colour_edit_changes_only_the_object(toy, edits):
    root, mapping = toy
    for image_id, entry in mapping.items():
        if entry["editing_type_id"] != "6":
            continue
        edit, mask = edits[image_id], rle_decode(entry["mask"], SIZE, SIZE)
        src = load(root / "annotation_images" / entry["image_path"])
        gt = load(root / "ground_truth" / entry["image_path"])
        assert np.array_equal(src[mask == 0], gt[mask == 0])
        assert mask.mean() < 0.5  # a local edit, not the whole image
        if edit.source.style == "none":  # unstyled: exactly the object's own pixels change
            (i,) = edit.source_objects
            frame = np.zeros_like(mask, dtype=bool)
            frame[[0, -1]] = frame[:, [0, -1]] = True
            assert np.array_equal(mask.astype(bool), edit.source.object_mask(i, SIZE) | frame)


def test_background_and_style_masks_are_full(toy):
    _, mapping = toy
    for entry in mapping.values():
        if entry["editing_type_id"] in ("8", "9"):
            assert entry["mask"] == [0, SIZE * SIZE]


def test_many_edits_keep_the_rules():
    """More draws than the written set, at 64 px, for the length and blend-word rules."""
    for edit in toy_edits(8, seed=7, size=64).values():
        assert max(len(edit.source_prompt), len(edit.target_prompt)) <= MAX_PROMPT_CHARS
        for words, prompt in zip(edit.blended_word.split(" ") if edit.blended_word else (),
                                 (edit.source_prompt, edit.target_prompt)):
            assert words in strip(prompt).split(" ")


def test_bracket_conventions():
    assert bracket("a red circle on a gray background", "a red circle and a blue circle on a gray background") == (
        "a red circle on a gray background", "a red circle [and a blue circle] on a gray background")
    assert bracket("a red circle on a gray background", "a sketch of a red circle on a gray background") == (
        "a red circle on a gray background", "[a sketch of] a red circle on a gray background")
    assert bracket("a red circle and a red square on x", "a red circle and a blue square on x") == (
        "a red circle and a [red] square on x", "a red circle and a [blue] square on x")


def test_scene_caption_render_and_masks():
    scene = Scene((Obj("circle", "red", "striped", "large", (0.27, 0.5)), Obj("square", "yellow", pos=(0.75, 0.5))),
                  background="white", style="none")
    assert scene.caption() == "a large striped red circle and a yellow square on a white background"
    img = scene.render(48)
    assert img.dtype == np.uint8 and img.shape == (48, 48, 3)
    circle, square = scene.object_mask(0, 48), scene.object_mask(1, 48)
    assert circle[24, 13] and square[24, 36] and not (circle & square).any()
    assert np.abs(img[24, 36].astype(int) - (240, 210, 40)).max() <= 1  # the square's plain fill colour
    striped = scene.render(48)[circle]
    assert len(np.unique(striped, axis=0)) > 2  # two tones and their anti-aliased mixes
    assert Scene([("circle", "red")]).caption() == "a red circle on a gray background"  # plain tuples work
    assert np.array_equal(random_scene(np.random.default_rng(3)).render(32),
                          random_scene(np.random.default_rng(3)).render(32))


def test_written_set_loads_through_the_piebench_reader(toy):
    root, mapping = toy
    dataset = piebench.PieBenchDataset(root)
    assert dataset.mask_size == SIZE  # the toy set records the grid its masks index
    assert [item.image_id for item in dataset] == sorted(mapping)
    for item in dataset:
        assert "[" not in item.source_prompt + item.target_prompt
        assert dataset.image_file(item).is_file()
        mask = dataset.load_mask(item, SIZE, SIZE)
        assert np.array_equal(mask, rle_decode(mapping[item.image_id]["mask"], SIZE, SIZE))


def test_unknown_edit_type_is_rejected():
    with pytest.raises(ValueError, match="edit type"):
        toy_edits(1, edit_types=("45",))


# ------------------------------------------------------------------------------------------------ finding the set
def test_the_toyset_command_writes_the_set_a_run_reads_and_prints_its_folder(tmp_path, monkeypatch, capsys):
    from editlab.evaluation import toyset

    monkeypatch.setenv("EDITLAB_CACHE", str(tmp_path / "cache"))
    root = toyset.main([])  # the toy tour's set (toy model: 32 px), in the cache
    assert root == tmp_path / "cache" / "builtin_piebench" / f"v{toyset.TOYSET_VERSION}_n1_size32_seed0"
    assert (root / "mapping_file.json").is_file() and capsys.readouterr().out == f"{root}\n"
    out = toyset.main(["experiment=toy", "--out", str(tmp_path / "mine")])  # experiment=toy's set, where asked
    assert out == tmp_path / "mine" and len(json.loads((out / "mapping_file.json").read_text())) == 2 * 10
    assert capsys.readouterr().out == f"{out}\n"


def test_scoring_against_the_cache_folder_names_the_sets_in_it(tmp_path, capsys):
    from editlab.evaluation import score

    cache = tmp_path / "builtin_piebench"
    sets = [write_piebench(cache / name, n_per_type=1, size=32, edit_types=("1",)) for name in ("a", "b")]
    (tmp_path / "edits").mkdir()
    with pytest.raises(SystemExit) as stop:
        score.main(["--data", str(cache), "--edits", str(tmp_path / "edits")])
    message = str(stop.value)
    assert f"{cache} is the built-in toy set's cache; pass one of its sets as --data: {sets[0]}, {sets[1]}" in message
    assert "python -m editlab.evaluation.toyset" in message
