"""The instruction benchmarks' readers (GEdit-Bench arrow/parquet, ImgEdit Basic JSON), their masks (CoCoEdit's
layout, an explicit polarity) and the download command, on miniature copies written in the real formats."""

import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from editlab.evaluation import benchset_fixtures as F
from editlab.evaluation import benchsets
from editlab.evaluation.gedit import REPO, GEditDataset
from editlab.evaluation.imgedit import EDIT_TYPES, ImgEditDataset
from editlab.evaluation.instruction_sets import MaskFolder
from editlab.evaluation.metrics import psnr_unedit_part

SHA = "0123456789abcdef0123456789abcdef01234567"
EN = {F.fixture_key(k): row for k, row in enumerate(F.GEDIT_ROWS)}  # key -> (type, en, cn, intersection)


def rows() -> list[dict]:
    """The fixture's rows with plain image bytes, to alter and write again (`F.write_gedit(rows=...)`)."""
    table = F.gedit_table().to_pylist()
    return [{**row, "input_image": row["input_image"]["bytes"]} for row in table]


def gedit(root: Path, cache: Path, **options) -> GEditDataset:
    return GEditDataset(root, cache, **options)


@pytest.fixture
def arrow_copy(tmp_path) -> Path:
    return F.write_gedit(tmp_path / "GEdit-Bench")


def listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# ----------------------------------------------------------------------------------------------- GEdit-Bench


def test_fixture_has_the_schema_and_metadata_datasets_writes(arrow_copy):
    with pa.memory_map(str(arrow_copy / "data" / "train-00000-of-00001.arrow")) as source:
        schema = pa.ipc.open_stream(source).schema  # a stream, not the random-access file format
    features = json.loads(schema.metadata[b"huggingface"])["info"]["features"]
    assert features["input_image"] == {"_type": "Image"} and features["Intersection_exist"]["dtype"] == "bool"
    assert schema.field("input_image").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def test_gedit_reads_the_arrow_stream_into_instruction_items(arrow_copy, tmp_path):
    before = listing(arrow_copy)
    data = gedit(arrow_copy, tmp_path / "cache")
    assert [item.key for item in data] == sorted(EN)
    assert data.provenance == {"repo": REPO, "revision": "editlab-fixture-1"}
    for item in data:
        task, en, _, both = EN[item.key]
        assert (item.task_type, item.edit_type, item.instruction, item.language, item.intersection) == \
            (task, task, en, "en", both)
        assert item.source_prompt == item.target_prompt == "" and item.blend_words is None
        assert item.image_path == f"fullset/{task}/en/{item.key}.png"  # the official output tree
    assert data.provides == {"source", "instruction"} and data.load_mask(data[0]) is None
    item = data[0]
    source = data.image_file(item)
    k = list(EN).index(item.key)
    assert source == tmp_path / "cache" / "editlab-fixture-1" / "en" / f"{item.key}.png"
    assert source.read_bytes() == F.encoded(F.source_image(k))  # the bytes, not a re-encoding
    assert data.image_file(item) == source and listing(arrow_copy) == before  # nothing written into the copy


def test_parquet_and_arrow_file_copies_read_alike(arrow_copy, tmp_path):
    parquet = F.write_gedit(tmp_path / "parquet", "parquet")
    random_access = tmp_path / "file_format"
    (random_access / "data").mkdir(parents=True)
    (random_access / "editlab_download.json").write_text((arrow_copy / "editlab_download.json").read_text())
    table = F.gedit_table()
    with pa.OSFile(str(random_access / "data" / "train.arrow"), "wb") as sink:
        with pa.ipc.new_file(sink, table.schema) as writer:  # the random-access format, not a stream
            writer.write_table(table)
    items = [list(gedit(root, tmp_path / "cache")) for root in (arrow_copy, parquet, random_access)]
    assert items[0] == items[1] == items[2] and len(items[0]) == 5


def test_language_subset_types_ids_limit_and_shards(arrow_copy, tmp_path):
    cache = tmp_path / "cache"
    cn = gedit(arrow_copy, cache, language="cn")
    assert {item.instruction for item in cn} == {row[2] for row in F.GEDIT_ROWS} and cn[0].language == "cn"
    assert cn[0].image_path.startswith(f"fullset/{cn[0].task_type}/cn/")
    both = gedit(arrow_copy, cache, subset="intersection")
    assert {item.key for item in both} == {key for key, row in EN.items() if row[3]} and len(both) == 3
    picked = gedit(arrow_copy, cache, task_types=["color_alter", "subject-add"])
    assert sorted(item.task_type for item in picked) == ["color_alter", "subject-add"]
    keys = sorted(EN)
    assert [item.key for item in gedit(arrow_copy, cache, ids=[keys[3], keys[1]])] == [keys[1], keys[3]]
    assert [item.key for item in gedit(arrow_copy, cache, limit=2)] == keys[:2]
    shards = [[item.key for item in gedit(arrow_copy, cache, shard=s, num_shards=2)] for s in (0, 1)]
    assert shards == [keys[0::2], keys[1::2]]


@pytest.mark.parametrize(("options", "message"), [
    ({"language": "zh"}, "dataset.language=cn"),
    ({"language": "fr"}, "dataset.language: fr not known"),
    ({"subset": "half"}, "dataset.subset: half not known"),
    ({"task_types": ["recolor"]}, "dataset.task_types: recolor not known"),
    ({"ids": ["0" * 32]}, "dataset.ids: " + "0" * 32),
    ({"task_types": ["ps_human"]}, "no item of stepfun-ai/GEdit-Bench"),  # an empty selection
    ({"subset": "intersection", "task_types": ["subject-remove"]}, "no item"),
    ({"shard": 2, "num_shards": 2}, "0 <= shard < num_shards"),
])
def test_bad_options_are_refused(arrow_copy, tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        gedit(arrow_copy, tmp_path / "cache", **options)


def test_the_revision_is_the_copys_and_a_pinned_one_must_match(arrow_copy, tmp_path):
    cache = tmp_path / "cache"
    assert gedit(arrow_copy, cache, revision="editlab-fixture-1").revision == "editlab-fixture-1"
    with pytest.raises(ValueError, match=f"dataset.revision={SHA} but .* holds revision editlab-fixture-1"):
        gedit(arrow_copy, cache, revision=SHA)
    snapshot = F.write_gedit(tmp_path / "datasets--stepfun-ai--GEdit-Bench" / "snapshots" / SHA, revision=None)
    assert gedit(snapshot, cache).provenance["revision"] == SHA  # the hub cache's folder name
    unknown = F.write_gedit(tmp_path / "copied", revision=None)
    with pytest.raises(ValueError, match="cannot tell which revision .*benchsets download gedit"):
        gedit(unknown, cache)
    (unknown / "editlab_download.json").write_text(json.dumps({"repo": "someone/else", "revision": SHA}))
    with pytest.raises(ValueError, match="holds someone/else, not stepfun-ai/GEdit-Bench"):
        gedit(unknown, cache)
    (unknown / "editlab_download.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot be read"):
        gedit(unknown, cache)


def _altered(tmp_path: Path, change) -> Path:
    table = rows()
    change(table)
    return F.write_gedit(tmp_path / "altered", rows=table)


@pytest.mark.parametrize(("change", "message"), [
    (lambda t: t[0].update(key="not-a-key"), "row 0: key 'not-a-key' is not 32 lower-case hex digits"),
    (lambda t: t[0].update(key=t[0]["key"].upper()), "is not 32 lower-case hex"),
    (lambda t: t[1].update(key=t[0]["key"]), f"key {F.fixture_key(0)} \\(en\\) appears twice"),
    (lambda t: t[0].update(task_type="recolor"), "task_type 'recolor' is not one of GEdit-Bench's"),
    (lambda t: t[0].update(instruction_language="zh"), "instruction_language 'zh' is not one of en, cn"),
    (lambda t: t[0].update(Intersection_exist=None), "Intersection_exist None is not true or false"),
    (lambda t: t[0].update(instruction="  "), "the instruction is empty"),
    (lambda t: t[0].update(input_image=None), "input_image holds no bytes"),
])
def test_malformed_rows_are_refused_naming_the_file_and_row(tmp_path, change, message):
    with pytest.raises(ValueError, match=message) as err:
        gedit(_altered(tmp_path, change), tmp_path / "cache")
    assert "train-00000-of-00001.arrow" in str(err.value)


def test_an_unreadable_image_fails_its_item_naming_the_key_and_file(tmp_path):
    data = gedit(_altered(tmp_path, lambda t: t[0].update(input_image=b"\x89PNG not really")), tmp_path / "cache")
    broken = next(item for item in data if item.key == F.fixture_key(0))
    with pytest.raises(ValueError, match=f"input_image of {broken.key} in .*train-00000-of-00001.arrow is not a "
                                         "readable image"):
        data.image_file(broken)
    assert data.image_file(next(item for item in data if item is not broken)).is_file()  # the others are fine


def test_malformed_copies_are_refused(arrow_copy, tmp_path):
    cache = tmp_path / "cache"
    table = F.gedit_table()
    lacking = tmp_path / "lacking"
    F.write_gedit(lacking)
    F.write_table(lacking / "data" / "train-00000-of-00001.arrow", table.drop_columns(["Intersection_exist"]))
    with pytest.raises(ValueError, match="lacks the column\\(s\\) Intersection_exist"):
        gedit(lacking, cache)
    plain = tmp_path / "plain"
    F.write_gedit(plain)
    binary = table.set_column(table.schema.get_field_index("input_image"), "input_image",
                              pa.array([b"x"] * len(table), pa.binary()))
    F.write_table(plain / "data" / "train-00000-of-00001.arrow", binary)
    with pytest.raises(ValueError, match="input_image is binary, not an image column"):
        gedit(plain, cache)
    garbage = F.write_gedit(tmp_path / "garbage")
    (garbage / "data" / "train-00000-of-00001.arrow").write_bytes(b"not arrow at all")
    with pytest.raises(ValueError, match="is not a readable arrow/parquet file"):
        gedit(garbage, cache)
    F.write_table(arrow_copy / "data" / "train.parquet", table)
    with pytest.raises(ValueError, match="both .arrow and .parquet"):
        gedit(arrow_copy, cache)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .arrow or .parquet file"):
        gedit(tmp_path / "empty", cache)
    with pytest.raises(FileNotFoundError, match="benchsets download gedit"):
        gedit(tmp_path / "absent", cache)


def test_two_copies_under_one_root_are_duplicate_keys(tmp_path):
    root = F.write_gedit(tmp_path / "root")
    F.write_table(root / "data" / "train-00001-of-00002.arrow", F.gedit_table())
    with pytest.raises(ValueError, match="appears twice"):
        gedit(root, tmp_path / "cache")


# ----------------------------------------------------------------------------------------------- ImgEdit-Bench


@pytest.fixture
def imgedit_copy(tmp_path) -> tuple[Path, Path]:
    return F.write_imgedit(tmp_path / "ImgEdit")


def test_imgedit_reads_the_basic_json(imgedit_copy):
    json_path, images = imgedit_copy
    data = ImgEditDataset(json_path, images)
    assert [item.image_id for item in data] == ["3", "7", "12", "40"]  # numeric key order
    by_key = {key: (path, prompt, kind) for key, path, prompt, kind in F.IMGEDIT_ROWS}
    for item in data:
        path, prompt, kind = by_key[item.image_id]
        assert (item.instruction, item.edit_type, item.image_path) == (prompt, kind, f"{item.image_id}.png")
        assert data.image_file(item) == images / path and item.source_prompt == ""
    assert data.provides == {"source", "instruction"} and data.load_mask(data[0]) is None
    assert [i.image_id for i in ImgEditDataset(json_path, images, edit_types=["remove", "style"])] == ["3", "7"]
    assert [i.image_id for i in ImgEditDataset(json_path, images, ids=["40"], limit=1)] == ["40"]
    assert [i.image_id for i in ImgEditDataset(json_path, images, shard=1, num_shards=2)] == ["7", "40"]
    with pytest.raises(ValueError, match="dataset.edit_types: recolor not known"):
        ImgEditDataset(json_path, images, edit_types=["recolor"])
    with pytest.raises(ValueError, match="no item of .*basic_edit.json matches"):
        ImgEditDataset(json_path, images, edit_types=["compose"])
    assert set(EDIT_TYPES) == {"add", "adjust", "extract", "replace", "remove", "background", "style", "action",
                               "compose"}


@pytest.mark.parametrize(("entry", "message"), [
    ({"prompt": "x", "edit_type": "add"}, "item '9' lacks id"),
    ({"id": "a/b.jpg", "prompt": "x", "edit_type": "recolor"}, "edit_type 'recolor' is not one of"),
    ({"id": "../outside.jpg", "prompt": "x", "edit_type": "add"}, "relative to dataset.images that stays inside"),
    ({"id": 5, "prompt": "x", "edit_type": "add"}, "id 5 must be a path"),
    ({"id": "a/b.jpg", "prompt": "", "edit_type": "add"}, "item 9: the instruction is empty"),
    (["a/b.jpg"], "is a list, expected an object"),
])
def test_malformed_imgedit_entries_are_refused(imgedit_copy, entry, message):
    json_path, images = imgedit_copy
    mapping = json.loads(json_path.read_text())
    json_path.write_text(json.dumps({**mapping, "9": entry}))
    with pytest.raises(ValueError, match=message):
        ImgEditDataset(json_path, images)


def test_malformed_imgedit_files_are_refused(imgedit_copy, tmp_path):
    json_path, images = imgedit_copy
    text = json_path.read_text()
    json_path.write_text('{"1": {"id": "a.jpg", "prompt": "x", "edit_type": "add"}, ' + text[1:].replace(
        '"12"', '"1"', 1))
    with pytest.raises(ValueError, match="duplicate key '1'"):
        ImgEditDataset(json_path, images)
    json_path.write_text(json.dumps({"a/b": {"id": "a.jpg", "prompt": "x", "edit_type": "add"}}))
    with pytest.raises(ValueError, match="cannot hold a path separator"):
        ImgEditDataset(json_path, images)
    json_path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="holds a JSON list"):
        ImgEditDataset(json_path, images)
    json_path.write_text("{")
    with pytest.raises(ValueError, match="is not valid JSON"):
        ImgEditDataset(json_path, images)
    with pytest.raises(FileNotFoundError, match="dataset.json=.*basic_edit.json"):
        ImgEditDataset(tmp_path / "none.json", images)
    with pytest.raises(FileNotFoundError, match="dataset.images=.* is not a folder"):
        ImgEditDataset(json_path, tmp_path / "nowhere")


# ----------------------------------------------------------------------------------------------- masks


@pytest.fixture
def masks(tmp_path) -> Path:
    return F.write_imgedit_masks(F.write_gedit_masks(tmp_path / "masks"))


def test_masks_need_a_polarity(masks, tmp_path):
    assert MaskFolder.from_config(None, None) is None
    with pytest.raises(ValueError, match=r"mask_polarity is not set: .*\(white_is_edited or white_is_kept\).*Open"):
        MaskFolder.from_config(masks, None)
    with pytest.raises(ValueError, match="mask_polarity='white'"):
        MaskFolder.from_config(masks, "white")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        MaskFolder.from_config(tmp_path / "nowhere", "white_is_edited")


@pytest.mark.parametrize("layout", ["download", "subfolder"])
def test_both_polarities_read_the_object_as_the_edit(arrow_copy, imgedit_copy, masks, tmp_path, layout):
    base = {"download": masks, "subfolder": masks / "geditbench"}[layout]  # the download or its geditbench/
    for polarity, edited_value in (("white_is_edited", 1.0), ("white_is_kept", 0.0)):
        data = gedit(arrow_copy, tmp_path / "cache", masks=MaskFolder.from_config(base, polarity))
        assert data.provides == {"source", "instruction", "mask"}
        for item in data:
            k = list(EN).index(item.key)
            left, top, right, bottom = F.object_box(k)
            mask, area = data.load_mask(item), (right - left) * (bottom - top)
            assert mask.shape == (F.SIZE[1], F.SIZE[0]) and set(np.unique(mask)) == {0.0, 1.0}
            assert (mask[top:bottom, left:right] == edited_value).all()
            assert mask.sum() == (area if edited_value else mask.size - area)  # the rest is the other value
    data = ImgEditDataset(*imgedit_copy, masks=MaskFolder.from_config(masks, "white_is_edited"))
    shared = [data.load_mask(item) for item in data if item.image_id in ("3", "12")]  # one image, one mask
    assert np.array_equal(*shared)


def test_the_pie_background_metrics_score_the_region_the_polarity_names(arrow_copy, masks, tmp_path):
    item_data = {p: gedit(arrow_copy, tmp_path / "cache", masks=MaskFolder.from_config(masks, p))
                 for p in ("white_is_edited", "white_is_kept")}
    item = item_data["white_is_edited"][0]
    k = list(EN).index(item.key)
    source = np.asarray(F.source_image(k))
    object_only = source.copy()  # an edit that changes the object and nothing else
    left, top, right, bottom = F.object_box(k)
    object_only[top:bottom, left:right] = 255 - object_only[top:bottom, left:right]
    scores = {p: psnr_unedit_part(source, object_only, data.load_mask(item)) for p, data in item_data.items()}
    assert math.isinf(scores["white_is_edited"]) and scores["white_is_kept"] < 30  # the background kept, or not


def _mask_file(masks: Path, k: int) -> Path:
    return masks / "geditbench" / "fullset" / F.GEDIT_ROWS[k][0] / "en" / f"{F.fixture_key(k)}_mask.png"


@pytest.mark.parametrize(("pixels", "message"), [
    (lambda m: np.full_like(m, 255), "is all white"),
    (lambda m: np.zeros_like(m), "is all black"),
    (lambda m: np.random.default_rng(0).integers(0, 256, m.shape).astype(np.uint8), "is not binary"),
    (lambda m: m[:, :20], "is 20x80 but its image is 48x80: another aspect"),
])
def test_bad_masks_are_refused_naming_the_item(arrow_copy, masks, tmp_path, pixels, message):
    Image.fromarray(pixels(np.asarray(Image.open(_mask_file(masks, 0))))).save(_mask_file(masks, 0))
    data = gedit(arrow_copy, tmp_path / "cache", masks=MaskFolder.from_config(masks, "white_is_edited"))
    item = next(i for i in data if i.key == F.fixture_key(0))
    with pytest.raises(ValueError, match=f"mask of {item.key} .*{message}"):
        data.load_mask(item, F.SIZE[1], F.SIZE[0])


def test_masks_of_the_same_aspect_are_resized_and_missing_ones_named(arrow_copy, masks, tmp_path):
    mask = Image.open(_mask_file(masks, 0))
    mask.resize((96, 160), Image.NEAREST).save(_mask_file(masks, 0))  # twice the image's size
    softened = np.asarray(mask).copy()
    softened[softened == 255] = 240  # light grey: still binary-ish
    Image.fromarray(softened).save(_mask_file(masks, 1))
    data = gedit(arrow_copy, tmp_path / "cache", masks=MaskFolder.from_config(masks, "white_is_edited"))
    by_key = {item.key: item for item in data}
    assert np.array_equal(data.load_mask(by_key[F.fixture_key(0)], 80, 48), np.asarray(mask) / 255)
    assert data.load_mask(by_key[F.fixture_key(1)], 80, 48).sum() == (np.asarray(mask) > 0).sum()
    _mask_file(masks, 2).unlink()
    with pytest.raises(FileNotFoundError, match=f"mask of {F.fixture_key(2)} not found: .*_mask.png"):
        data.load_mask(by_key[F.fixture_key(2)], 80, 48)


# ----------------------------------------------------------------------------------------------- download


@pytest.fixture
def fake_hub(monkeypatch):
    """huggingface_hub.snapshot_download recording its calls and writing what the repository would hold."""
    import huggingface_hub

    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append({"repo_id": repo_id, **kwargs})
        folder = Path(kwargs["local_dir"])
        if repo_id == REPO:
            F.write_gedit(folder, revision=None)
        elif kwargs.get("allow_patterns") == ["Benchmark.tar"]:
            json_path, _ = F.write_imgedit(folder / "packed")
            with tarfile.open(folder / "Benchmark.tar", "w") as archive:
                archive.add(json_path.parent, arcname="Benchmark")
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_download_pins_the_revision_and_records_it(fake_hub, tmp_path, capsys):
    benchsets.main(["download", "gedit", "--revision", SHA, "--to", str(tmp_path / "GEdit-Bench")])
    assert fake_hub == [{"repo_id": REPO, "repo_type": "dataset", "revision": SHA,
                         "local_dir": tmp_path / "GEdit-Bench", "allow_patterns": None}]
    assert capsys.readouterr().out.strip() == str(tmp_path / "GEdit-Bench")
    data = gedit(tmp_path / "GEdit-Bench", tmp_path / "cache", revision=SHA)  # the reader finds the pin
    assert data.provenance == {"repo": REPO, "revision": SHA} and len(data) == 5
    benchsets.main(["download", "imgedit", "--revision", SHA, "--to", str(tmp_path / "ImgEdit")])
    assert fake_hub[-1]["repo_id"] == "sysuyy/ImgEdit" and fake_hub[-1]["allow_patterns"] == ["Benchmark.tar"]
    unpacked = tmp_path / "ImgEdit" / "Benchmark"
    assert len(ImgEditDataset(unpacked / "basic_edit.json", unpacked / "images")) == 4


def test_download_refuses_a_branch_for_a_revision(fake_hub, tmp_path):
    with pytest.raises(SystemExit, match="pin a commit"):
        benchsets.main(["download", "gedit", "--revision", "main", "--to", str(tmp_path / "x")])
    assert fake_hub == [] and not (tmp_path / "x").exists()



def test_download_writes_over_nothing_it_did_not_put_there(fake_hub, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's")
    with pytest.raises(SystemExit, match="holds files that no download of this command put there"):
        benchsets.main(["download", "gedit", "--revision", SHA, "--to", str(mine)])
    assert fake_hub == [] and (mine / "notes.txt").read_text() == "the user's"
    copy = tmp_path / "GEdit-Bench"
    benchsets.main(["download", "gedit", "--revision", SHA, "--to", str(copy)])
    benchsets.main(["download", "gedit", "--revision", SHA, "--to", str(copy)])  # the same commit: completes it
    with pytest.raises(SystemExit, match=f"holds {REPO} at {SHA}, not {REPO} at {'b' * 40}"):
        benchsets.main(["download", "gedit", "--revision", "b" * 40, "--to", str(copy)])
    assert len(fake_hub) == 2


def test_a_killed_download_is_completed_by_the_same_command_and_not_read_before(fake_hub, tmp_path, monkeypatch):
    import huggingface_hub

    complete = huggingface_hub.snapshot_download

    def killed(repo_id, **kwargs):
        (Path(kwargs["local_dir"]) / "half.arrow").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(huggingface_hub, "snapshot_download", killed)
    copy = tmp_path / "GEdit-Bench"
    with pytest.raises(KeyboardInterrupt):
        benchsets.main(["download", "gedit", "--revision", SHA, "--to", str(copy)])
    with pytest.raises(ValueError, match="is an unfinished download: run .*benchsets download gedit --revision"):
        gedit(copy, tmp_path / "cache", revision=SHA)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", complete)
    (copy / "half.arrow").unlink()  # what the hub client would replace
    benchsets.main(["download", "gedit", "--revision", SHA, "--to", str(copy)])  # the same command resumes
    assert len(gedit(copy, tmp_path / "cache", revision=SHA)) == 5
