"""Small fixtures in the judged benchmarks' real layouts, and scripted judges."""

import json
from pathlib import Path

import numpy as np
from PIL import Image

from editlab.evaluation.judge.backends import ScriptedBackend

# Replies the official GEdit parser (stepfun-ai/Step1X-Edit@570eba6 GEdit-Bench/viescore/utils.py, mllm_output_to_dict,
# retried by VIEScore.evaluate) mishandles, with what editlab makes of them
GEDIT_REPLIES = [
    ('{"score": [7, 9], "reasoning": "good"}', "ok", (7, 9)),
    ('```json\n{"score": [7, 9], "reasoning": "good"}\n```', "ok", (7, 9)),  # fenced
    ('Here is my answer: {"score": [0, 10], "reasoning": "..."} Done.', "ok", (0, 10)),  # prose around one object
    ('{"score": [3, 4], "reasoning": "a {brace} inside"}', "ok", (3, 4)),
    ('{"score": 4}', "parse_error", ()),  # scalar: the official parser makes it [4]
    ("[6, 0]", "parse_error", ()),  # bare list: parsed, then random on the second pass
    ("7", "parse_error", ()),  # bare number: likewise
    ("I'm sorry, I can't help with rating these images.", "parse_error", ()),  # refusal text: random
    ("", "parse_error", ()),  # empty (the GPT wrapper's reply to every API error): random
    ('{"score": [12, 15]}', "out_of_range", (12, 15)),  # accepted as is by the official parser
    ('{"score": [-1, 5]}', "out_of_range", (-1, 5)),
    ('{"score": [1, 2]} {"score": [3, 4]}', "parse_error", ()),  # two objects: endless loop officially
    ("{'score': [1, 2], 'reasoning': 'x'}", "parse_error", ()),  # single-quoted: endless loop officially
    ('{"score": [7.0, 8.0]}', "parse_error", ()),  # strict: JSON integers only
    ('{"score": ["7", "8"]}', "parse_error", ()),
    ('{"score": [true, 8]}', "parse_error", ()),
    ('{"score": [7, 8, 9]}', "parse_error", ()),
    ('{"score": [NaN, 8]}', "parse_error", ()),
    ('{"reasoning": "no score"}', "parse_error", ()),
    ('{"score": [7, 8], "reasoning": "unterminated}', "parse_error", ()),  # braced non-JSON
]

GOOD_SC, GOOD_PQ = '{"score": [7, 9], "reasoning": "done"}', '```json\n{"score": [8, 6], "reasoning": "clean"}\n```'


def picture(seed: int, size=(64, 48)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def gedit_tree(root: Path, types=("background_change", "color_alter"), per_type=2, language="en",
               missing=()) -> tuple[Path, Path, list[str]]:
    """``root/model/fullset/<type>/<lang>/<key>.png`` + ``<key>_SRCIMG.png``, and a metadata JSON in the dataset's
    fields; the edits are larger than the sources (the judge sees them resized). ``missing``: keys without an edit."""
    model, entries = root / "model", []
    for number in range(per_type * len(types)):
        task_type, key = types[number % len(types)], f"{number:032x}"
        folder = model / "fullset" / task_type / language
        folder.mkdir(parents=True, exist_ok=True)
        picture(number).save(folder / f"{key}_SRCIMG.png")
        if key not in missing:
            picture(100 + number, (96, 72)).save(folder / f"{key}.png")
        entries.append({"key": key, "task_type": task_type, "instruction": f"edit number {number}",
                        "instruction_language": language, "Intersection_exist": number % 2 == 0})
    metadata = root / "gedit_meta.json"
    metadata.write_text(json.dumps(entries))
    return model, metadata, [e["key"] for e in entries]


def imgedit_flat(root: Path, types=("add", "style", "extract")) -> tuple[Path, Path, Path, list[str]]:
    """ImgEdit's layout: ``basic_edit.json`` ({key: {id, prompt, edit_type}}), originals under an image root, the
    edits as ``<key>.png`` in one folder."""
    images, edits, entries = root / "originals", root / "edits", {}
    for number, edit_type in enumerate(types):
        key, source = str(1000 + number), f"{edit_type}/{number:09d}.jpg"
        (images / edit_type).mkdir(parents=True, exist_ok=True)
        picture(number).save(images / source, format="JPEG")
        edits.mkdir(exist_ok=True)
        picture(50 + number).save(edits / f"{key}.png")
        entries[key] = {"id": source, "prompt": f"{edit_type} something", "edit_type": edit_type}
    metadata = root / "basic_edit.json"
    metadata.write_text(json.dumps(entries, indent=4))
    return edits, metadata, images, list(entries)


def scripted(by_case=None, sc=(GOOD_SC,), pq=(GOOD_PQ,)) -> ScriptedBackend:
    """Replies by (log key, case); any other case gets a good reply."""
    return ScriptedBackend(by_case, {"SC": list(sc), "PQ": list(pq)})


class Killed(BaseException):
    """A kill: not an Exception, so nothing on the way catches it."""


class KilledAfter:
    """A backend that dies (as a killed process would) when asked for call number ``after + 1``."""

    def __init__(self, inner, after: int) -> None:
        self.inner, self.after, self.calls = inner, after, 0

    def ask(self, request):
        if self.calls == self.after:
            raise Killed
        self.calls += 1
        return self.inner.ask(request)

    def identity(self):
        return self.inner.identity()

    def describe(self):
        return self.inner.describe()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def gedit_job_folder(root: Path, language: str = "en") -> tuple[Path, list[str]]:
    """A run.py job folder over the GEdit-Bench fixture (`benchset_fixtures.write_gedit`) in ``language``: job.json
    naming dataset=gedit, results.csv, the edits and their ``_SRCIMG`` sources in the official tree."""
    import pandas as pd

    from editlab.evaluation import benchset_fixtures
    from editlab.evaluation.gedit import GEditDataset
    from editlab.evaluation.piebench import edited_image_path

    data, cache, job = root / "GEdit-Bench", root / "cache", root / "job"
    benchset_fixtures.write_gedit(data)
    rows = []
    for number, item in enumerate(GEditDataset(data, cache, language=language)):
        edit = edited_image_path(job, item)
        edit.parent.mkdir(parents=True, exist_ok=True)
        picture(number).save(edit)
        picture(50 + number).save(edit.with_name(f"{item.image_id}_SRCIMG.png"))
        rows.append({"run": "default", "editor": "x", "model": "tiny", "precision": "fp32", "image_id": item.image_id,
                     "edit_type": item.edit_type, "error": "", "note": ""})
    pd.DataFrame(rows).to_csv(job / "results.csv", index=False)
    config = {"dataset.name": "gedit", "dataset.language": language, "dataset.cache": str(cache)}
    (job / "job.json").write_text(json.dumps({"config": config, "dataset_root": str(data)}))
    return job, [row["image_id"] for row in rows]
