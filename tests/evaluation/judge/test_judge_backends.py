"""The judge backends: the OpenAI-compatible client against a fake server (request shape, failures, the API key never
written anywhere), and the transformers backend end to end with a tiny random Qwen2.5-VL built here (garbage replies
must become parse_error rows, not scores)."""

import base64
import io
import json
import re

import httpx
import pytest
from judge_helpers import GOOD_PQ, GOOD_SC, gedit_tree, picture

from editlab.evaluation.judge import cli
from editlab.evaluation.judge.backends import OpenAICompatBackend, Request, ScriptedBackend, build_backend

KEY = "sk-test-SECRET-0123456789abcdef"


def answer(content, finish="stop", model="judge-v1", **message):
    return {"model": model, "choices": [{"finish_reason": finish, "message": {"content": content, **message}}],
            "usage": {"prompt_tokens": 123, "completion_tokens": 9}}


def backend_for(handler, monkeypatch, **kwargs) -> OpenAICompatBackend:
    monkeypatch.setenv("JUDGE_KEY", KEY)
    client = httpx.Client(transport=httpx.MockTransport(handler))
    return OpenAICompatBackend("http://judge.local:8000/v1/", "judge-v1", "JUDGE_KEY", client=client, **kwargs)


def request(text_first=False) -> Request:
    return Request("k1", "SC", 1, "rate this", (b"\x89PNG-a", b"\x89PNG-b"), text_first)


def test_openai_compat_sends_the_protocols_message_and_reads_the_reply(monkeypatch):
    seen = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(req)
        return httpx.Response(200, json=answer(GOOD_SC))

    backend = backend_for(handler, monkeypatch, seed=7)
    reply = backend.ask(request())
    assert (reply.text, reply.status, reply.model) == (GOOD_SC, "ok", "judge-v1")
    assert reply.tokens == {"prompt_tokens": 123, "completion_tokens": 9}
    (sent,) = seen
    assert str(sent.url) == "http://judge.local:8000/v1/chat/completions"
    assert sent.headers["authorization"] == f"Bearer {KEY}"
    body = json.loads(sent.content)
    assert (body["model"], body["temperature"], body["max_tokens"], body["seed"]) == ("judge-v1", 0.0, 1400, 7)
    content = body["messages"][0]["content"]
    assert [part["type"] for part in content] == ["image_url", "image_url", "text"]  # images first (GEdit)
    assert content[0]["image_url"]["url"] == "data:image/png;base64," + base64.b64encode(b"\x89PNG-a").decode()
    backend.ask(request(text_first=True))
    assert [p["type"] for p in json.loads(seen[1].content)["messages"][0]["content"]][0] == "text"  # ImgEdit


@pytest.mark.parametrize(("response", "status", "says"), [
    (httpx.Response(500, text="internal error"), "api_error", "HTTP 500: internal error"),
    (httpx.Response(429, text="rate limit exceeded"), "api_error", "HTTP 429"),
    (httpx.Response(400, json={"error": {"code": "content_filter", "message": "jailbreak detected"}}), "refused",
     "content_filter"),
    (httpx.Response(200, json=answer(None, finish="content_filter")), "refused", "content_filter"),
    (httpx.Response(200, json=answer(None, refusal="I can't help with that.")), "refused", "I can't help"),
    (httpx.Response(200, text="<html>proxy error</html>"), "api_error", "not a chat-completions answer"),
    (httpx.Response(200, json=answer(None)), "api_error", "no text content"),
    (httpx.Response(200, json=answer([{"type": "text", "text": GOOD_PQ}])), "ok", ""),  # content parts
])
def test_openai_compat_failures_become_statuses(monkeypatch, response, status, says):
    reply = backend_for(lambda req: response, monkeypatch).ask(request())
    assert reply.status == status and says in reply.message
    assert (reply.text is None) == (status != "ok")


def test_openai_compat_timeout_and_connection_errors_are_api_errors(monkeypatch):
    def slow(req):
        raise httpx.ReadTimeout("timed out", request=req)

    def down(req):
        raise httpx.ConnectError("connection refused", request=req)

    assert "no answer within 5.0 s" in backend_for(slow, monkeypatch, timeout_s=5.0).ask(request()).message
    reply = backend_for(down, monkeypatch).ask(request())
    assert reply.status == "api_error" and "ConnectError: connection refused" in reply.message


def test_openai_compat_needs_its_key_variable_set(monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(ValueError, match="NO_SUCH_KEY_VAR .* is not set"):
        OpenAICompatBackend("http://x/v1", "m", "NO_SUCH_KEY_VAR")
    with pytest.raises(ValueError, match="needs metrics.backend.base_url"):
        build_backend({"name": "openai_compat", "model": "m"})
    with pytest.raises(ValueError, match=r"metrics.backend.name='vllm'"):
        build_backend({"name": "vllm"})


def test_the_api_key_is_never_written(tmp_path, monkeypatch):
    """A whole pass (judging, with a server that echoes the key in an error) and its replay: no file holds the key."""
    def echo(req: httpx.Request) -> httpx.Response:
        if b"instruction: edit number 1" in req.content:  # one failing call whose message carries the key back
            return httpx.Response(401, text=f"invalid key {req.headers['authorization']}")
        prompt = json.loads(req.content)["messages"][0]["content"][-1]["text"]
        return httpx.Response(200, json=answer(GOOD_SC if "Editing instruction" in prompt else GOOD_PQ))

    backend = backend_for(echo, monkeypatch)
    model, metadata, _ = gedit_tree(tmp_path)
    argv = ["--benchmark", "gedit", "--edits", str(model), "--metadata", str(metadata), "--out", str(tmp_path / "o")]
    scores = cli.main(argv, backend=backend)
    assert list(scores["status"]) == ["ok", "api_error", "ok", "ok"]
    cli.main([*argv, "--from-log"])
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) > 10
    assert not [p for p in written if KEY.encode() in p.read_bytes()]
    record = json.loads((tmp_path / "o" / "judge.json").read_text())
    assert "<api key>" in (tmp_path / "o" / "judge_calls.jsonl").read_text()
    assert record["n_total"] == 4


def test_settings_that_change_replies_are_part_of_the_judges_identity(tmp_path, monkeypatch):
    """A pass with another temperature, max_tokens or seed judges again; the judge id the tables read stays the
    plain model name."""
    calls = []

    def handler(req: httpx.Request) -> httpx.Response:
        calls.append(req)
        prompt = json.loads(req.content)["messages"][0]["content"][-1]["text"]
        return httpx.Response(200, json=answer(GOOD_SC if "Editing instruction" in prompt else GOOD_PQ))

    base = backend_for(handler, monkeypatch)
    assert base.identity() == backend_for(handler, monkeypatch).identity()  # stable
    assert base.identity().startswith("openai_compat:judge-v1@http://judge.local:8000/v1#")
    others = [backend_for(handler, monkeypatch, **change) for change in
              ({"temperature": 0.7}, {"max_tokens": 512}, {"seed": 1})]
    assert len({base.identity(), *(other.identity() for other in others)}) == 4
    assert backend_for(handler, monkeypatch, timeout_s=5).identity() == base.identity()  # not a reply setting
    described = others[0].describe()
    assert described["judge"] == "judge-v1" and described["identity"] == others[0].identity()
    assert len(described["settings_sha256"]) == 64 and described["settings_sha256"] != base.describe()[
        "settings_sha256"]

    model, metadata, _ = gedit_tree(tmp_path, per_type=1)
    argv = ["--benchmark", "gedit", "--edits", str(model), "--metadata", str(metadata), "--out", str(tmp_path / "o")]
    cli.main(argv, backend=base)
    cli.main(argv, backend=backend_for(handler, monkeypatch))
    assert len(calls) == 4  # the same settings: every reply reused
    cli.main(argv, backend=others[0])
    assert len(calls) == 8  # another temperature: judged again


def test_a_judge_model_path_that_is_no_judge_is_a_clean_cli_error(tmp_path, capsys):
    model, metadata, _ = gedit_tree(tmp_path, per_type=1)
    argv = ["--benchmark", "gedit", "--edits", str(model), "--metadata", str(metadata), "--out", str(tmp_path / "o"),
            "--backend", "transformers", "--device", "cpu"]
    with pytest.raises(SystemExit, match=r"^error: --model-path='/nonexistent/judge' is not a directory; point "
                                         "--model-path at a vision-language judge model folder or hub id"):
        cli.main([*argv, "--model-path", "/nonexistent/judge"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as stopped:
        cli.main([*argv, "--model-path", str(tmp_path / "empty")])
    message = str(stopped.value)
    assert message.startswith(f"error: cannot load the judge --model-path={str(tmp_path / 'empty')!r}: ValueError: ")
    assert "vision-language judge model folder or hub id" in message and "diffusers" not in message
    assert not (tmp_path / "o" / "judge_calls.jsonl").exists()


def test_openai_compat_describes_its_endpoint_without_user_info_or_query(monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", KEY)
    backend = OpenAICompatBackend("https://user:pw@api.example.com:8443/v1?token=abc", "gpt-4.1", "JUDGE_KEY")
    described = json.dumps(backend.describe())
    assert backend.endpoint() == "https://api.example.com:8443/v1"
    assert "pw" not in described and "abc" not in described and KEY not in described
    assert backend.describe()["api_key_env"] == "JUDGE_KEY"


def test_scripted_replies_from_a_file_by_item_case_and_attempt(tmp_path):
    path = tmp_path / "replies.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in [
        {"key": "k1", "case": "SC", "reply": "first"}, {"key": "k1", "case": "SC", "reply": "second"},
        {"key": "k2", "case": "SC", "status": "refused", "message": "blocked"},
        {"case": "PQ", "reply": "any PQ"}, {"reply": "anything else"}]) + "\n")
    backend = ScriptedBackend.from_file(path)

    def ask(key, case, attempt=1):
        return backend.ask(Request(key, case, attempt, "", (), False))

    assert [ask("k1", "SC", a).text for a in (1, 2, 3)] == ["first", "second", "second"]
    assert (ask("k2", "SC").status, ask("k2", "SC").message) == ("refused", "blocked")
    assert (ask("k9", "PQ").text, ask("k9", "SC").text) == ("any PQ", "anything else")
    assert ask("en/k1", "SC").text == "first"  # GEdit's calls are keyed <language>/<key>: the bare key matches
    assert ScriptedBackend().ask(Request("k", "SC", 1, "", (), False)).status == "api_error"
    path.write_text('{"key": "k1", "case": "SC"}\n')
    with pytest.raises(ValueError, match="line 1: expected an object with 'reply' or 'status'"):
        ScriptedBackend.from_file(path)


@pytest.mark.parametrize(("line", "says"), [
    ({"key": "k1", "case": "SC", "status": "timeout", "message": "slow"}, "status 'timeout' is not one a judge "
                                                                          "backend gives (ok, api_error, refused"),
    ({"status": "parse_error"}, "status 'parse_error' is not one"),
    ({"key": "k1", "status": "ok"}, "a reply with status 'ok' needs 'reply'"),
    ({"key": "k1", "reply": 7}, "a reply with status 'ok' needs 'reply'"),
    ({"case": "sc", "reply": "{}"}, "case 'sc' is not a protocol's call: SC, PQ, imgedit"),
])
def test_scripted_replies_file_refuses_an_unknown_status_naming_file_and_line(tmp_path, line, says):
    path = tmp_path / "replies.jsonl"
    path.write_text(json.dumps({"reply": "fine"}) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} line 2: {re.escape(says)}"):
        ScriptedBackend.from_file(path)


# ---------------------------------------------------------------------------------------------------------------
# a tiny random Qwen2.5-VL judge, built in memory and saved as a checkpoint folder (sizes after transformers' own
# Qwen2.5-VL model tester, tests/models/qwen2_5_vl/test_modeling_qwen2_5_vl.py)

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
           "<|video_pad|>"]
WORDS = "score the image edit json reasoning 0 1 2 3 4 5 6 7 8 9 10 { } [ ] : , user assistant".split()
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
            "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}"
            "{% endif %}{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
            "{% endif %}")


def tiny_qwen25_vl(folder):
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    vocab = {token: i for i, token in enumerate([*SPECIAL, *WORDS, "[UNK]"])}
    words = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]", pad_token="<|endoftext|>",
                                        eos_token="<|im_end|>", additional_special_tokens=SPECIAL)
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=784, max_pixels=3136),
                                    video_processor=Qwen2VLVideoProcessor(), tokenizer=tokenizer,
                                    chat_template=TEMPLATE)
    config = Qwen2_5_VLConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
                     "max_window_layers": 2, "tie_word_embeddings": True, "bos_token_id": 0,
                     "eos_token_id": vocab["<|im_end|>"], "pad_token_id": 0,
                     "rope_parameters": {"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 1e4}},
        vision_config={"depth": 2, "hidden_size": 32, "intermediate_size": 32, "out_hidden_size": 32, "num_heads": 4,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 56,
                       "fullatt_block_indexes": [1]},
        image_token_id=vocab["<|image_pad|>"], video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"], vision_end_token_id=vocab["<|vision_end|>"])
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_a_tiny_random_qwen25_vl_judges_end_to_end_and_its_garbage_is_parse_error(tmp_path, monkeypatch):
    import transformers

    judge_folder = tiny_qwen25_vl(tmp_path / "tiny_judge")
    loads, load = [], transformers.AutoProcessor.from_pretrained
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained",
                        lambda *args, **kwargs: loads.append(kwargs) or load(*args, **kwargs))
    backend = build_backend({"name": "transformers", "path": str(judge_folder), "dtype": "float32",
                             "max_pixels": 1568, "max_new_tokens": 8}, "cpu")
    assert len(loads) == 1 and loads[0]["max_pixels"] == 1568  # one processor load, with the pixel limit
    png = io.BytesIO()
    picture(3).save(png, format="PNG")
    first = backend.ask(Request("k", "SC", 1, "score the image edit", (png.getvalue(),) * 2, False))
    assert first.status == "ok" and first.tokens["completion_tokens"] <= 8 and first.tokens["prompt_tokens"] > 8
    assert backend.ask(Request("k", "SC", 1, "score the image edit", (png.getvalue(),) * 2, False)).text == \
        first.text  # greedy: deterministic
    described = backend.describe()
    assert described["model_class"] == "Qwen2_5_VLForConditionalGeneration" and described["decoding"]["greedy"]
    assert described["image_processor_size"] == {"shortest_edge": 784, "longest_edge": 1568}  # saved min, given max

    model, metadata, _ = gedit_tree(tmp_path, per_type=1)
    out = tmp_path / "out"
    scores = cli.main(["--benchmark", "gedit", "--edits", str(model), "--metadata", str(metadata), "--out", str(out),
                       "--max-attempts", "2"], backend=backend)
    assert list(scores["status"]) == ["parse_error", "parse_error"]
    assert scores[["gedit_sc", "gedit_pq", "gedit_o"]].isna().all().all()
    calls = [json.loads(line) for line in (out / "judge_calls.jsonl").read_text().splitlines()]
    assert len(calls) == 2 * 2 * 2  # items x cases x attempts
    assert all(c["status"] == "parse_error" and isinstance(c["reply"], str) and c["backend_status"] == "ok"
               for c in calls)  # the model answered; its answer is not a score
    assert {c["judge"] for c in calls} == {backend.identity()} == {described["identity"]}
    assert backend.identity().startswith(f"transformers:{judge_folder}@unpinned#")
    assert described["judge"] == str(judge_folder)  # what the tables compare with: the plain path
    other = build_backend({"name": "transformers", "path": str(judge_folder), "dtype": "float32",
                           "max_pixels": 1568, "max_new_tokens": 16}, "cpu")
    assert other.identity() != backend.identity()  # another decoding length: not the same judge for resuming
