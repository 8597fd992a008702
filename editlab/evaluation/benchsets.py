"""Local copies of the judged benchmarks' hub files, pinned to one commit:

    python -m editlab.evaluation.benchsets download gedit --revision <sha> --to /data/GEdit-Bench
    python -m editlab.evaluation.benchsets download imgedit --revision <sha> --to /data/ImgEdit
    python -m editlab.evaluation.benchsets download masks --revision <sha> --to /data/cocoedit_masks

``gedit``: the hub dataset ``stepfun-ai/GEdit-Bench`` (dataset.root=<to>). ``imgedit``: ``Benchmark.tar`` of
``sysuyy/ImgEdit`` (the Basic set's source images; its ``basic_edit.json`` is in the GitHub repository
PKU-YuanGroup/ImgEdit, ``Benchmark/Basic/``), unpacked into <to>. ``masks``: CoCoEdit's masks,
``wyh6666/GEditBench_ImgEditBench_with_mask`` (dataset.masks=<to>; archives in it are not unpacked). ``--revision``
is a commit (40 hex digits, from the dataset's "History" on the hub), recorded in ``<to>/editlab_download.json``,
where the readers find it (`evaluation.gedit.local_revision`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
from pathlib import Path

from editlab.evaluation.gedit import REPO, REVISION_FILE, SHA

HUB = {  # benchmark -> (hub dataset, the files to fetch; None: all)
    "gedit": (REPO, None),
    "imgedit": ("sysuyy/ImgEdit", ["Benchmark.tar"]),  # the repository also holds the 1.2M-pair training set
    "masks": ("wyh6666/GEditBench_ImgEditBench_with_mask", None),
}


def check_target(to: Path, repo: str, revision: str) -> None:
    """``to`` is new, empty, or a (partial) copy of the same repository at the same commit: a download never writes
    over files it did not put there, and a folder never mixes two commits under one record."""
    if not to.exists() or (to.is_dir() and not any(to.iterdir())):
        return
    if not to.is_dir():
        raise ValueError(f"--to {to} is a file: give a folder to download into")
    try:
        record = json.loads((to / REVISION_FILE).read_text())
    except (OSError, ValueError):
        record = None
    if not isinstance(record, dict):
        raise ValueError(f"--to {to} holds files that no download of this command put there: give a new or empty "
                         "folder (nothing in it is overwritten)")
    if (record.get("repo"), record.get("revision")) != (repo, revision):
        raise ValueError(f"--to {to} holds {record.get('repo')} at {record.get('revision')}, not {repo} at "
                         f"{revision}: give a new folder for another commit")


def download(benchmark: str, revision: str, to: str | Path) -> Path:
    """The files of ``benchmark`` at commit ``revision`` in the folder ``to`` (new or empty; or a partial copy of the
    same commit, which it completes)."""
    if not SHA.fullmatch(revision):
        raise ValueError(f"--revision {revision!r}: pin a commit, 40 lower-case hex digits (a branch moves)")
    from huggingface_hub import snapshot_download

    repo, patterns = HUB[benchmark]
    check_target(Path(to), repo, revision)
    Path(to).mkdir(parents=True, exist_ok=True)  # the record first: a killed download is resumed, never mistaken
    (Path(to) / REVISION_FILE).write_text(json.dumps({"repo": repo, "revision": revision, "complete": False}))
    folder = Path(snapshot_download(repo_id=repo, repo_type="dataset", revision=revision, local_dir=to,
                                    allow_patterns=patterns))
    if benchmark == "imgedit":
        with tarfile.open(folder / "Benchmark.tar") as archive:
            archive.extractall(folder, filter="data")  # no file outside the folder, no links out of it
    (folder / REVISION_FILE).write_text(json.dumps({"repo": repo, "revision": revision, "complete": True}))
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m editlab.evaluation.benchsets", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("download", help="a benchmark's hub files at one commit")
    fetch.add_argument("benchmark", choices=sorted(HUB))
    fetch.add_argument("--revision", required=True, help="the commit (40 hex digits)")
    fetch.add_argument("--to", required=True, type=Path, help="the folder to download into")
    args = parser.parse_args(argv)
    try:
        folder = download(args.benchmark, args.revision, args.to)
    except (ValueError, OSError, tarfile.TarError) as err:
        sys.exit(f"error: {err}")
    except TypeError as err:  # tarfile's extraction filters came with Python 3.10.12 / 3.11.4
        sys.exit(f"error: unpacking needs Python >= 3.10.12 (or 3.11.4), which filters what an archive may write "
                 f"({err})")
    print(folder)


if __name__ == "__main__":
    main()
