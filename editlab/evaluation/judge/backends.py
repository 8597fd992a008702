"""Judge backends: one call = one `Request` (a rendered prompt and PNG images) -> one `Reply` (the raw text, or why
there is none).

- ``scripted``: canned replies (tests, demos): by item and case from a JSONL file or a mapping, else a default list;
  attempt n takes a case's n-th reply (its last one repeats), so a resumed pass gets the reply it would have got.
- ``openai_compat``: any OpenAI-compatible chat-completions server (vLLM, SGLang, a hosted model) over httpx; the
  API key is read from the environment variable whose *name* is configured and is never logged nor written.
- ``transformers``: a local Qwen2.5-VL / Qwen3-VL / ImgEdit_Judge checkpoint (``AutoModelForImageTextToText``,
  ``trust_remote_code=False``, safetensors only), greedy decoding.

A backend reports a server or model failure as a `Reply` with status ``api_error`` (``refused`` for a content
filter or an explicit refusal) and the message; it never invents a reply. ``identity()`` is what the calls log
matches a stored reply on: the backend, the model and its revision or endpoint, and the first 12 hex digits of
`settings_sha256` over the settings that change replies (decoding, pixel limits, dtype, revision), so changed settings
judge again. ``describe()`` is what ``judge.json`` records of it (no secret): ``judge`` is the plain model id or path
(what the tables compare with published numbers), with the identity and the full settings hash beside it.
"""

from __future__ import annotations

import base64
import io
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from PIL import Image

from editlab.evaluation.judge.protocols import GEditProtocol, ImgEditProtocol, sha256


@dataclass(frozen=True)
class Request:
    key: str
    case: str
    attempt: int
    prompt: str
    images: tuple[bytes, ...]  # PNG
    text_first: bool


REPLY_STATUSES = ("ok", "api_error", "refused")  # what a backend may say of a call (parsing gives the others)


@dataclass
class Reply:
    text: str | None
    status: str = "ok"  # one of REPLY_STATUSES
    message: str = ""
    model: str = ""  # the model the server says answered
    tokens: dict[str, int] = field(default_factory=dict)


SCRIPTED_CASES = ("", *GEditProtocol.cases, *ImgEditProtocol.cases)  # "": any case


class ScriptedBackend:
    """Canned replies. ``by_case``: ``{(key, case): [reply, ...]}``; ``default``: replies for any other item, a list
    or ``{case: [reply, ...]}`` (case "" = any case). A reply is a string, or ``{"reply": str}`` /
    ``{"status": "api_error"|"refused", "message": str}``."""

    name = "scripted"

    def __init__(self, by_case: Mapping[tuple[str, str], Sequence] | None = None,
                 default: Sequence | Mapping[str, Sequence] = (), source: str = "") -> None:
        self.by_case, self.source = dict(by_case or {}), source
        by_name = default if isinstance(default, Mapping) else {"": default}
        self.default = {case: list(replies) for case, replies in by_name.items()}
        self.calls = 0

    @classmethod
    def from_file(cls, path: str | Path) -> ScriptedBackend:
        """A JSONL file, one reply per line: ``{"key", "case", "reply"}`` (or ``"status"``/``"message"`` instead of
        ``reply``); a line without ``key`` is a default reply (for its ``case``, or for any)."""
        by_case: dict[tuple[str, str], list] = {}
        default: dict[str, list] = {}
        for number, line in enumerate(Path(path).read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                if not isinstance(entry, dict) or not ({"reply", "status"} & entry.keys()):
                    raise ValueError("expected an object with 'reply' or 'status'")
                if (status := entry.get("status", "ok")) not in REPLY_STATUSES:
                    raise ValueError(f"status {status!r} is not one a judge backend gives ({', '.join(REPLY_STATUSES)}"
                                     "; a reply's parse status comes from parsing its 'reply')")
                if status == "ok" and not isinstance(entry.get("reply"), str):
                    raise ValueError("a reply with status 'ok' needs 'reply', the judge's text")
                if (case := entry.get("case", "")) not in SCRIPTED_CASES:
                    raise ValueError(f"case {case!r} is not a protocol's call: {', '.join(SCRIPTED_CASES[1:])} "
                                     "(or no case: any)")
            except ValueError as err:
                raise ValueError(f"{path} line {number}: {err}; each line is a JSON object such as "
                                 '{"key": "k1", "case": "SC", "reply": "..."}') from None
            if "key" in entry:
                by_case.setdefault((str(entry["key"]), str(entry.get("case", ""))), []).append(entry)
            else:
                default.setdefault(str(entry.get("case", "")), []).append(entry)
        return cls(by_case, default, str(path))

    def ask(self, request: Request) -> Reply:
        self.calls += 1
        bare = request.key.rsplit("/", 1)[-1]  # GEdit's calls are keyed <language>/<key>: a reply may name either
        replies = (self.by_case.get((request.key, request.case)) or self.by_case.get((bare, request.case))
                   or self.default.get(request.case) or self.default.get(""))
        if not replies:
            return Reply(None, "api_error", f"no scripted reply for {request.key}/{request.case}")
        entry = replies[min(request.attempt, len(replies)) - 1]
        if isinstance(entry, str):
            return Reply(entry, model="scripted")
        if entry.get("status", "ok") != "ok":
            return Reply(None, entry["status"], entry.get("message", ""), "scripted")
        return Reply(entry["reply"], model="scripted")

    def identity(self) -> str:
        return "scripted"

    def describe(self) -> dict[str, Any]:
        return {"backend": "scripted", "judge": "scripted", "identity": self.identity(),
                "replies": self.source or "in memory"}


def settings_sha256(settings: Mapping[str, Any]) -> str:
    """SHA-256 of the settings that change a judge's replies (canonical JSON): part of the judge's identity, so a
    pass with other settings judges again instead of reusing replies made under the old ones."""
    return sha256(json.dumps(dict(settings), sort_keys=True))


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


class OpenAICompatBackend:
    """POST ``{base_url}/chat/completions``. ``client``: an ``httpx.Client`` to use (tests pass a mock transport)."""

    name = "openai_compat"

    def __init__(self, base_url: str, model: str, api_key_env: str | None = None, timeout_s: float = 120.0,
                 temperature: float = 0.0, max_tokens: int = 1400, seed: int | None = None, client=None) -> None:
        import httpx

        if not base_url or not model:
            raise ValueError("the openai_compat judge needs a base URL (e.g. http://localhost:8000/v1) and a model")
        self.base_url, self.model, self.api_key_env = base_url.rstrip("/"), model, api_key_env
        self.timeout_s, self.temperature, self.max_tokens, self.seed = timeout_s, temperature, max_tokens, seed
        key = ""
        if api_key_env:
            key = os.environ.get(api_key_env, "")
            if not key:
                raise ValueError(f"the environment variable {api_key_env} (the judge's API key) is not set: export "
                                 "it, or give no key variable for a server that needs none")
        self._key = key  # only ever sent in the Authorization header
        self.client = client or httpx.Client(timeout=timeout_s)

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "<api key>") if self._key else text

    def _body(self, request: Request) -> dict[str, Any]:
        text = [{"type": "text", "text": request.prompt}]
        images = [{"type": "image_url", "image_url": {"url": data_uri(png)}} for png in request.images]
        body = {"model": self.model, "temperature": self.temperature, "max_tokens": self.max_tokens,
                "messages": [{"role": "user", "content": text + images if request.text_first else images + text}]}
        return body | ({"seed": self.seed} if self.seed is not None else {})

    def ask(self, request: Request) -> Reply:
        import httpx

        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        try:
            response = self.client.post(f"{self.base_url}/chat/completions", json=self._body(request),
                                        headers=headers, timeout=self.timeout_s)
        except httpx.TimeoutException:
            return Reply(None, "api_error", f"no answer within {self.timeout_s} s (timeout_s)")
        except httpx.HTTPError as err:
            return Reply(None, "api_error", self._redact(f"{type(err).__name__}: {err}"))
        body = response.text
        if response.status_code != 200:
            status = "refused" if "content_filter" in body or "content_policy" in body else "api_error"
            return Reply(None, status, self._redact(f"HTTP {response.status_code}: {body[:500]}"))
        try:
            answer = response.json()
            choice = answer["choices"][0]
            message = choice["message"]
        except (ValueError, KeyError, IndexError, TypeError):
            return Reply(None, "api_error", self._redact(f"not a chat-completions answer: {body[:500]}"))
        model = str(answer.get("model", ""))
        usage = answer.get("usage") or {}
        tokens = {k: int(usage[k]) for k in ("prompt_tokens", "completion_tokens") if isinstance(usage.get(k), int)}
        if choice.get("finish_reason") == "content_filter" or message.get("refusal"):
            return Reply(None, "refused", self._redact(str(message.get("refusal") or "finish_reason content_filter")),
                         model, tokens)
        content = message.get("content")
        if isinstance(content, list):  # some servers answer with content parts
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        if not isinstance(content, str):
            return Reply(None, "api_error", "the answer has no text content", model, tokens)
        return Reply(content, model=model, tokens=tokens)

    def endpoint(self) -> str:
        """Scheme, host, port and path of the base URL: no user info, query or fragment."""
        parts = urlsplit(self.base_url)
        host = parts.hostname or ""
        return f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}{parts.path}"

    def settings(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "max_tokens": self.max_tokens, "seed": self.seed}

    def identity(self) -> str:
        return f"openai_compat:{self.model}@{self.endpoint()}#{settings_sha256(self.settings())[:12]}"

    def describe(self) -> dict[str, Any]:
        return {"backend": "openai_compat", "judge": self.model, "identity": self.identity(),
                "endpoint": self.endpoint(), "api_key_env": self.api_key_env, "decoding": self.settings(),
                "settings_sha256": settings_sha256(self.settings()), "timeout_s": self.timeout_s,
                "image_encoding": "PNG data URIs"}


class TransformersBackend:
    """A local vision-language judge; ``path`` a hub id or a local folder, ``revision`` pinned for hub ids."""

    name = "transformers"

    def __init__(self, path: str, revision: str | None = None, dtype: str = "bfloat16", device: str = "cpu",
                 min_pixels: int | None = None, max_pixels: int | None = None, max_new_tokens: int = 512,
                 attn_implementation: str | None = None, seed: int = 42, key: str = "metrics.backend.path") -> None:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from editlab.models.errors import ModelLoadError
        from editlab.models.hub import hub_kwargs, is_local, resolve_local
        from editlab.models.safe_load import UnsafeWeightsError, weights_only_loading

        if dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype={dtype!r}: the judge runs in float32, float16 or bfloat16")
        self.path, self.revision, self.dtype, self.device = path, revision, dtype, device
        self.min_pixels, self.max_pixels, self.max_new_tokens, self.seed = min_pixels, max_pixels, max_new_tokens, seed
        self.attn_implementation = attn_implementation
        what = f"point {key} at a vision-language judge model folder or hub id (e.g. Qwen/Qwen2.5-VL-7B-Instruct)"
        if is_local(path) and not resolve_local(path).is_dir():
            raise ModelLoadError(f"{key}={path!r} is not a directory; {what}")
        source = str(resolve_local(path)) if is_local(path) else path
        common = {"revision": revision, "trust_remote_code": False, **hub_kwargs(source, key)}
        # the pixel limits as transformers 5 takes them: each given one replaces that bound of the saved size
        limits = {name: value for name, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if value}
        try:
            with weights_only_loading():
                self.processor = AutoProcessor.from_pretrained(source, **common, **limits)
                extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
                placement = {"device_map": "auto"} if device == "auto" else {}
                self.model = AutoModelForImageTextToText.from_pretrained(
                    source, dtype=getattr(torch, dtype), use_safetensors=True, **common, **extra, **placement).eval()
        except UnsafeWeightsError:
            raise
        except Exception as err:  # noqa: BLE001 - transformers fails in many ways on a folder that is no judge
            raise ModelLoadError(f"cannot load the judge {key}={path!r}: {type(err).__name__}: {err}; {what}") from err
        if device != "auto":
            self.model.to(device)

    def ask(self, request: Request) -> Reply:
        import torch

        images = [Image.open(io.BytesIO(png)) for png in request.images]
        text = [{"type": "text", "text": request.prompt}]
        slots = [{"type": "image"} for _ in images]
        messages = [{"role": "user", "content": text + slots if request.text_first else slots + text}]
        prompt = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = self.processor(text=[prompt], images=images or None, return_tensors="pt").to(self.model.device)
        torch.manual_seed(self.seed)  # greedy decoding draws nothing; seeded anyway, as recorded
        with torch.inference_mode():
            output = self.model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=self.max_new_tokens)
        new = output[:, inputs["input_ids"].shape[1]:]
        reply = self.processor.batch_decode(new, skip_special_tokens=True)[0]
        return Reply(reply, model=self.identity(), tokens={"prompt_tokens": int(inputs["input_ids"].shape[1]),
                                                           "completion_tokens": int(new.shape[1])})

    def settings(self) -> dict[str, Any]:
        return {"revision": self.revision, "dtype": self.dtype, "min_pixels": self.min_pixels,
                "max_pixels": self.max_pixels, "max_new_tokens": self.max_new_tokens, "greedy": True,
                "attn_implementation": self.attn_implementation, "seed": self.seed}

    def identity(self) -> str:
        return f"transformers:{self.path}@{self.revision or 'unpinned'}#{settings_sha256(self.settings())[:12]}"

    def describe(self) -> dict[str, Any]:
        import torch
        import transformers

        processor = getattr(self.processor, "image_processor", None)
        size = getattr(processor, "size", None)
        return {"backend": "transformers", "judge": self.path, "identity": self.identity(),
                "settings_sha256": settings_sha256(self.settings()), "revision": self.revision, "dtype": self.dtype,
                "device": str(self.model.device), "model_class": type(self.model).__name__,
                "attn_implementation": getattr(self.model.config, "_attn_implementation", None),
                "image_processor_size": dict(size) if size else None,
                "decoding": {"greedy": True, "num_beams": 1, "max_new_tokens": self.max_new_tokens},
                "seed": self.seed,
                "library_versions": {"torch": torch.__version__, "transformers": transformers.__version__},
                "gpu": torch.cuda.get_device_name(self.model.device) if self.model.device.type == "cuda" else None}


BACKENDS = ("transformers", "openai_compat", "scripted")
BACKEND_SETTINGS = {"path": str, "revision": str, "dtype": str, "device": str, "min_pixels": int, "max_pixels": int,
                    "max_new_tokens": int, "attn_implementation": str, "seed": int, "base_url": str, "model": str,
                    "api_key_env": str, "timeout_s": float, "temperature": float, "max_tokens": int, "replies": str}
BACKEND_KEYS = ("name", *BACKEND_SETTINGS)  # a backend config's keys (the CLI's flags name the settings)


def build_backend(cfg: Mapping[str, Any], device: str = "cpu", names: Mapping[str, str] | None = None):
    """The backend a config mapping names (``name`` and that backend's keys). ``names``: what the user sets for each
    key (default ``metrics.backend.<key>``, run.py's; the CLI names its flags), so the messages name what to change."""
    def flag(key: str) -> str:
        return (names or {}).get(key, f"metrics.backend.{key}")

    name = cfg.get("name")
    if name == "scripted":
        if not cfg.get("replies"):
            raise ValueError(f"{flag('replies')}: the scripted judge needs a JSONL file of replies")
        return ScriptedBackend.from_file(cfg["replies"])
    if name == "openai_compat":
        if not cfg.get("base_url") or not cfg.get("model"):
            raise ValueError(f"the openai_compat judge needs {flag('base_url')} (e.g. http://localhost:8000/v1) and "
                             f"{flag('model')}")
        return OpenAICompatBackend(cfg["base_url"], cfg["model"], cfg.get("api_key_env"),
                                   float(cfg.get("timeout_s", 120)), float(cfg.get("temperature", 0.0)),
                                   int(cfg.get("max_tokens", 1400)), cfg.get("seed"))
    if name == "transformers":
        if not cfg.get("path"):
            raise ValueError(f"{flag('path')}: the transformers judge needs a model (hub id or local folder)")
        return TransformersBackend(cfg["path"], cfg.get("revision"), cfg.get("dtype") or "bfloat16",
                                   cfg.get("device") or str(device), cfg.get("min_pixels"), cfg.get("max_pixels"),
                                   int(cfg.get("max_new_tokens", 512)), cfg.get("attn_implementation"),
                                   int(cfg.get("seed", 42)), flag("path"))
    raise ValueError(f"{flag('name')}={name!r}; expected one of {', '.join(BACKENDS)}")


def timed(backend, request: Request) -> tuple[Reply, float]:
    """The backend's reply and its latency; an exception inside the backend is an ``api_error`` reply."""
    start = time.perf_counter()
    try:
        reply = backend.ask(request)
    except Exception as err:  # noqa: BLE001 - a failed call is recorded as such, and the pass goes on
        reply = Reply(None, "api_error", f"{type(err).__name__}: {err}")
    return reply, time.perf_counter() - start
