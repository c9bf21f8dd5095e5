"""serve.py: OpenAI-compatible chat API and chat page over a real nano model, in-process (TestClient) and
over a socket (uvicorn in a thread) for the queue limit and client disconnects."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from step1_pretrain_sft.chat import load_for_inference
from step1_pretrain_sft.serve import ServeConfig, StopText, create_app
from step1_pretrain_sft.serve import main as serve_main
from utils.chat import prompt_ids
from utils.generation import SamplingConfig, generate_ids, generate_replies

CONTEXT = 1024
URL = "/v1/chat/completions"
MESSAGES = [{"role": "system", "content": "你是一个助手"}, {"role": "user", "content": "评价一下这家酒店。"}]


@pytest.fixture(scope="module")
def model_dir(chat_tokenizer, tmp_path_factory):
    """A step-style export: an untrained nano causal LM with its chat tokenizer."""
    from utils.model import create_causal_lm

    path = tmp_path_factory.mktemp("serve") / "final"
    create_causal_lm("nano", len(chat_tokenizer), CONTEXT, seed=0).save_pretrained(path)
    chat_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_for_inference(str(model_dir))


def make_app(loaded, model_dir, **overrides):
    cfg = ServeConfig(model=str(model_dir), served_model_name="nano-chat", **overrides)
    return create_app(*loaded, cfg)


@pytest.fixture(scope="module")
def client(loaded, model_dir):
    with TestClient(make_app(loaded, model_dir, max_body_bytes=65536)) as c:
        yield c


def sse_payloads(lines) -> list:
    """The data of each server-sent event, JSON-decoded except the closing [DONE]."""
    data = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    return [d if d == "[DONE]" else json.loads(d) for d in data]


def streamed(client, body: dict) -> tuple[str, list]:
    with client.stream("POST", URL, json={**body, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_payloads(response.iter_lines())
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"])
    return text, events


def assert_error(response, status: int, param=None, code=None) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param and error["code"] == code
    return error["message"]


@pytest.mark.parametrize("temperature, seed", [(0.0, 0), (1.0, 3)])
def test_completion_equals_generate_replies_and_stream_adds_up(client, loaded, temperature, seed):
    model, tok = loaded
    cfg = ServeConfig()
    sampling = SamplingConfig(20, temperature, cfg.top_k, 0.95, cfg.repetition_penalty, seed)
    expected = generate_replies(model, tok, [MESSAGES], sampling)[0]
    n_reply = len(generate_ids(model, tok, [prompt_ids(tok, MESSAGES)], sampling)[0])
    body = {"model": "nano-chat", "messages": MESSAGES, "temperature": temperature, "top_p": 0.95,
            "max_tokens": 20, "seed": seed}

    reply = client.post(URL, json=body).json()
    assert reply["object"] == "chat.completion" and reply["model"] == "nano-chat"
    choice = reply["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": expected}
    assert choice["finish_reason"] == ("length" if n_reply == 20 else "stop")
    n_prompt = len(prompt_ids(tok, MESSAGES))
    assert reply["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": n_reply,
                              "total_tokens": n_prompt + n_reply}

    text, events = streamed(client, {**body, "stream_options": {"include_usage": True}})
    assert text == expected and events[-1] == "[DONE]"
    assert events[0]["object"] == "chat.completion.chunk"
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[-3]["choices"][0]["finish_reason"] == choice["finish_reason"]
    assert events[-2]["choices"] == [] and events[-2]["usage"] == reply["usage"]


def test_stop_string_ends_the_reply_and_is_never_streamed(client):
    body = {"messages": MESSAGES, "temperature": 1.0, "seed": 3, "max_tokens": 20}
    full = client.post(URL, json=body).json()["choices"][0]["message"]["content"]
    stop = full[6:8]
    expected = full[:full.index(stop)]
    reply = client.post(URL, json={**body, "stop": [stop, "never-seen"]}).json()
    assert reply["choices"][0] == {"index": 0, "message": {"role": "assistant", "content": expected},
                                   "logprobs": None, "finish_reason": "stop"}
    assert reply["usage"]["completion_tokens"] < 20
    text, _ = streamed(client, {**body, "stop": stop})
    assert text == expected


def test_stop_text_holds_back_a_possible_stop_start():
    stop = StopText(["XY", "Z"])
    assert [stop.feed(p) for p in ("ab", "cX", "Yd")] == ["a", "bc", ""] and stop.found
    assert stop.flush() == ""
    partial = StopText(["XY"])
    assert partial.feed("abX") + partial.flush() == "abX" and not partial.found


def test_models_and_chat_page(client):
    assert client.get("/v1/models").json()["data"][0]["id"] == "nano-chat"
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert 'id="chat-form"' in html and 'id="reset"' in html and "getReader" in html
    assert all(f'id="{name}"' in html for name in ("temperature", "top_p", "max_tokens"))
    assert "<script src" not in html and "https://" not in html  # self-contained


def test_errors_are_openai_error_objects(client, loaded):
    post = client.post
    headers = {"content-type": "application/json"}
    assert "not valid JSON" in assert_error(post(URL, content=b"{oops", headers=headers), 400)
    assert_error(post(URL, json={"messages": MESSAGES, "temperature": "hot"}), 400, param="temperature")
    assert_error(post(URL, json={"messages": [{"role": "robot", "content": "hi"}]}), 400,
                 param="messages.0.role")
    assert_error(post(URL, json={"messages": []}), 400, param="messages")
    assert_error(post(URL, json=["not", "an", "object"]), 400)
    assert_error(post(URL, json={"messages": MESSAGES, "model": "gpt-4o"}), 404, param="model",
                 code="model_not_found")
    long = [{"role": "user", "content": "房间干净，服务热情，下次还住。" * 120}]
    n_prompt = len(prompt_ids(loaded[1], long))
    assert n_prompt > CONTEXT
    message = assert_error(post(URL, json={"messages": long}), 400, param="messages",
                           code="context_length_exceeded")
    assert f"{n_prompt} tokens" in message and f"{CONTEXT} tokens" in message
    huge = {"messages": [{"role": "user", "content": "x" * 70_000}]}
    assert_error(post(URL, json=huge), 413, code="request_too_large")
    assert_error(client.get("/no/such/page"), 404)
    assert client.post(URL, json={"messages": MESSAGES, "max_tokens": 2}).status_code == 200  # still healthy


@contextmanager
def uvicorn_server(app):
    """The app behind a real socket (as serve.py runs it), on a free port, in a thread."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)


def test_full_queue_answers_429_and_a_disconnect_stops_generation(loaded, model_dir, caplog):
    caplog.set_level(logging.INFO, logger="serve")
    long = {"messages": MESSAGES, "temperature": 0, "max_tokens": 1000, "stream": True}  # ~3 s if not stopped
    app = make_app(loaded, model_dir, max_queue=0)
    with uvicorn_server(app) as base, httpx.Client(base_url=base) as http:
        with http.stream("POST", URL, json=long) as running:
            lines = running.iter_lines()
            role_chunk = sse_payloads([next(lines)])[0]  # sent once the generation is admitted
            assert role_chunk["choices"][0]["delta"]["role"] == "assistant"
            busy = http.post(URL, json={"messages": MESSAGES, "max_tokens": 2})
            assert_error(busy, 429, code="queue_full")
            assert busy.headers["retry-after"] == "1"
            assert http.get("/v1/models").status_code == 200  # the event loop is not blocked by generation
        deadline = time.time() + 10
        while not any("cancelled after" in r.getMessage() for r in caplog.records) and time.time() < deadline:
            time.sleep(0.05)
        record = next(r for r in caplog.records if "cancelled after" in r.getMessage())
        assert record.args[0] < 1000
        assert http.post(URL, json={"messages": MESSAGES, "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize("argv, words", [(["--model", "MISSING"], "config.json"), ([], "--model")])
def test_cli_bad_model_is_one_error_line_and_exit_2(tmp_path, capsys, argv, words):
    argv = [a.replace("MISSING", str(tmp_path / "missing")) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        serve_main(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0]
