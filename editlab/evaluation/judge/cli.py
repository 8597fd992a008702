"""Judge a folder of edits after the fact: GEdit-Bench (VIEScore SC / PQ / O) or ImgEdit-Bench Basic.

    python -m editlab.evaluation.judge --benchmark gedit --edits outputs/<job> --backend transformers \\
        --model-path Qwen/Qwen2.5-VL-7B-Instruct --revision <sha>
    editlab-judge --benchmark gedit --edits results/<model> --metadata gedit_en.json --language en \\
        --backend openai_compat --base-url http://localhost:8000/v1 --model <name> --out judged/<model>
    editlab-judge --benchmark imgedit --edits results/<model> --metadata basic_edit.json \\
        --images <originals root> --backend scripted --replies replies.jsonl --out judged/<model>

``--edits`` is an editlab job folder, the official GEdit tree's model folder, or ImgEdit's flat folder
(`judge.layouts`). Writes into ``--out`` (default for a job folder: ``<job>/judge_<benchmark>``): the append-only
``judge_calls.jsonl`` (the same command resumes a killed pass: no reply lost, no call repeated), per-item
``judge_scores.csv``, ``judge_summary.csv`` (per type, ``all_macro`` = GEdit's official mean of type means,
``all_micro`` = the per-item mean, n_scored / n_total, failures by status) and ``judge.json``; prints the summary.
``--from-log`` re-scores from the stored replies without calling a judge (bit-identical scores); when the log holds
several judges' replies, ``--judge`` says whose (its judge.json keeps that judge's description). ``--export
evalscope`` only writes ``evalscope_<language>.jsonl`` (``{"id": key, "image_path": absolute path}``) for
EvalScope's model-free GEdit mode.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from editlab.evaluation.files import FolderLock, atomic_write, atomic_write_json
from editlab.evaluation.judge.backends import BACKEND_SETTINGS, BACKENDS, build_backend
from editlab.evaluation.judge.layouts import editlab_items, gedit_items, imgedit_items, is_job_folder
from editlab.evaluation.judge.protocols import protocol as make_protocol
from editlab.evaluation.judge.record import CallLog, pass_record, replay_judge, replayed_judge
from editlab.evaluation.judge.scoring import STATUS_UNREACHED, Judge, JudgeItem, judge_items
from editlab.evaluation.judge.summary import format_summary, summarize
from editlab.models.errors import ModelLoadError
from editlab.models.safe_load import UnsafeWeightsError

log = logging.getLogger(__name__)
OUR_FILES = ("judge_calls.jsonl", "judge_scores.csv", "judge_summary.csv", "judge.json")
FLAG_OF = {"path": "model_path"}  # a backend setting whose flag has another name (--path would be vague)
BACKEND_FLAGS = {FLAG_OF.get(key, key): kind for key, kind in BACKEND_SETTINGS.items()}  # flag -> type


def parse_args(argv: Sequence[str] | None, backend_given: bool = False) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m editlab.evaluation.judge", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--benchmark", required=True, choices=["gedit", "imgedit"])
    parser.add_argument("--edits", required=True, type=Path,
                        help="an editlab job folder, the GEdit tree's <model> folder, or ImgEdit's <key>.png folder")
    parser.add_argument("--metadata", type=Path, help="GEdit: key -> instruction, task_type, instruction_language, "
                        "Intersection_exist (JSON / JSONL / CSV); ImgEdit: basic_edit.json")
    parser.add_argument("--images", type=Path, help="ImgEdit: the original images' root (<root>/<id>)")
    parser.add_argument("--data", type=Path, help="job folder: the benchmark folder (default: job.json's)")
    parser.add_argument("--language", choices=["en", "cn"], help="GEdit: judge the items of one language only")
    parser.add_argument("--limit", type=int, help="judge the first N items")
    parser.add_argument("--out", type=Path, help="output folder (default for a job folder: <job>/judge_<benchmark>)")
    parser.add_argument("--backend", choices=BACKENDS, help="the judge (not needed with --from-log or --export)")
    parser.add_argument("--max-attempts", type=int, default=3, help="calls per case before its failure is final")
    parser.add_argument("--from-log", action="store_true", help="re-score from judge_calls.jsonl; call no judge")
    parser.add_argument("--judge", help="--from-log: whose stored replies to re-score (a judge identity of the log, "
                        "or its plain model id), when the log holds several judges'")
    parser.add_argument("--export", choices=["evalscope"], help="only write EvalScope's JSONL of the edits")
    group = parser.add_argument_group("backend settings (transformers: --model-path ...; openai_compat: --base-url, "
                                      "--model, --api-key-env ...; scripted: --replies)")
    for flag, kind in BACKEND_FLAGS.items():
        group.add_argument(f"--{flag.replace('_', '-')}", type=kind)
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be a whole number >= 1")
    if args.max_attempts < 1:
        parser.error("--max-attempts must be a whole number >= 1")
    if not (args.backend or args.from_log or args.export or backend_given):
        parser.error("give --backend (or --from-log to re-score stored replies, or --export)")
    if args.language and args.benchmark != "gedit":
        parser.error("--language chooses GEdit-Bench's en or cn items; ImgEdit-Bench's have no language")
    if args.judge is not None and not args.from_log:
        parser.error("--judge chooses whose stored replies --from-log re-scores; a pass that judges uses --backend")
    return args


def read_json(path: Path) -> dict:
    """A JSON object file, or {} when it is missing or not one (an earlier pass's judge.json is a help, not a need)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def read_items(args: argparse.Namespace) -> list[JudgeItem]:
    if not args.edits.is_dir():
        raise ValueError(f"--edits {args.edits} is not a folder")
    if is_job_folder(args.edits):
        if given := [flag for flag, value in (("--metadata", args.metadata), ("--images", args.images)) if value]:
            raise ValueError(f"{' and '.join(given)}: not for an editlab job folder ({args.edits}), whose items, "
                             "instructions and sources come from its job.json and benchmark folder (--data gives "
                             "another copy of that folder)")
        items = (item for item in editlab_items(args.edits, args.data, args.benchmark)
                 if not args.language or item.language == args.language)
    elif args.metadata is None:
        raise ValueError(f"--edits {args.edits} is not an editlab job folder (results.csv, job.json): give --metadata "
                         "(GEdit: the items' instructions and types; ImgEdit: basic_edit.json)")
    elif args.benchmark == "gedit":
        items = gedit_items(args.edits, args.metadata, args.language)
    elif args.images is None:
        raise ValueError("ImgEdit's flat layout needs --images, the original images' root")
    else:
        items = imgedit_items(args.edits, args.metadata, args.images)
    items = list(items)
    if not items:
        raise ValueError(f"no items to judge in {args.edits}" + (f" for --language {args.language}" if args.language
                                                                 else ""))
    return items[: args.limit] if args.limit else items


def backend_config(args: argparse.Namespace) -> dict:
    values = {key: getattr(args, FLAG_OF.get(key, key)) for key in BACKEND_SETTINGS}
    return {"name": args.backend, **{key: value for key, value in values.items() if value is not None}}


def output_folder(args: argparse.Namespace) -> Path:
    out = args.out or (args.edits / f"judge_{args.benchmark}" if is_job_folder(args.edits) else None)
    if out is None:
        raise ValueError("give --out, the folder for the judge's files")
    ours = (*OUR_FILES, ".judge*", "evalscope_*.jsonl")
    if out.is_dir() and (foreign := sorted(p.name for p in out.iterdir()
                                           if not any(fnmatch.fnmatchcase(p.name, name) for name in ours))):
        raise ValueError(f"--out {out} holds files the judge did not write ({', '.join(foreign[:5])}): choose a new "
                         "or empty folder, or the folder of an earlier pass")
    return out


def export_evalscope(items: list[JudgeItem], benchmark: str, out: Path) -> None:
    if benchmark != "gedit":
        raise ValueError("EvalScope has no ImgEdit-Bench benchmark: --export evalscope is for --benchmark gedit")
    by_language: dict[str, list[str]] = {}
    missing = 0
    for item in items:
        if item.edit_path is None or not item.edit_path.is_file():
            missing += 1
            continue
        line = json.dumps({"id": item.key, "image_path": str(item.edit_path.resolve())}, ensure_ascii=False)
        by_language.setdefault(item.language or "all", []).append(line)
    for language, lines in by_language.items():
        path = out / f"evalscope_{language}.jsonl"
        atomic_write(path, lambda f, lines=lines: f.write("\n".join(lines) + "\n"))
        print(f"{len(lines)} edits -> {path}")
    if missing:  # EvalScope drops items missing from the file without a word
        print(f"{missing} items have no edit image and are not in the export: EvalScope will not count them")


def main(argv: Sequence[str] | None = None, backend=None) -> pd.DataFrame | None:
    """Run the CLI; ``backend`` replaces the one the flags build (tests inject theirs)."""
    args = parse_args(argv, backend is not None)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    protocol = make_protocol(args.benchmark)
    try:
        items = read_items(args)
        out = output_folder(args)
        if args.export:
            out.mkdir(parents=True, exist_ok=True)
            export_evalscope(items, args.benchmark, out)
            return None
        if args.from_log and not (out / "judge_calls.jsonl").is_file():
            raise ValueError(f"--from-log: no judge_calls.jsonl in {out}")
        if not args.from_log and backend is None:
            flags = {key: f"--{FLAG_OF.get(key, key).replace('_', '-')}" for key in BACKEND_SETTINGS}
            flags["name"] = "--backend"
            backend = build_backend(backend_config(args), args.device or default_device(), flags)
    except (OSError, ValueError, ModelLoadError, UnsafeWeightsError) as err:  # a judge that cannot be loaded too
        raise SystemExit(f"error: {err}") from None
    with FolderLock(out, ".judge.lock", "a judging pass"):
        calls = CallLog(out / "judge_calls.jsonl")
        if args.from_log:
            try:
                identity = replay_judge(calls, args.judge)
            except ValueError as err:
                raise SystemExit(f"error: --from-log: {err}") from None
            info = replayed_judge(calls, identity, read_json(out / "judge.json"))  # before a new one replaces it
            judge = Judge(protocol, None, calls, args.max_attempts, replay_judge=identity)
        else:
            info = backend.describe()
            judge = Judge(protocol, backend, calls, args.max_attempts)
        scores = judge_items(items, judge)
        summary = summarize(scores, protocol)
        atomic_write(out / "judge_scores.csv", lambda f: scores.to_csv(f, index=False))
        atomic_write(out / "judge_summary.csv", lambda f: summary.to_csv(f, index=False))
        record = pass_record(protocol, info, scores["status"].value_counts().to_dict(),
                             list(scores["language"].fillna("")), args.max_attempts, calls, judge.new_calls,
                             mode="replay of stored replies" if args.from_log else "judge",
                             edits=str(args.edits.resolve()),
                             metadata=str(args.metadata) if args.metadata else None,
                             subset=f"language={args.language or 'all'}", limit=args.limit)
        atomic_write_json(out / "judge.json", record)
    failures = ", ".join(f"{k} {v}" for k, v in record["failures"].items()) or "none"
    print(f"{protocol.title}; judge: {record.get('judge', record['backend'])}; scored {record['n_scored']}/"
          f"{record['n_total']} items (failures: {failures}); {judge.new_calls} judge calls this pass -> {out}")
    print(format_summary(summary))
    if unreached := int((scores["status"] == STATUS_UNREACHED).sum()):
        first = scores.loc[scores["status"] == STATUS_UNREACHED, "message"].iloc[0]
        print(f"{unreached} items: the judge was not reached ({first}); run the same command again to ask it again "
              "(the other items' replies are kept)")
    return scores


def cli() -> None:
    """The ``editlab-judge`` command; exit status 1 when the judge could not be reached for some items."""
    scores = main()
    if scores is not None and (scores["status"] == STATUS_UNREACHED).any():
        raise SystemExit(1)
