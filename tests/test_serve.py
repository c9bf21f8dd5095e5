"""serve.py: OpenAI-compatible chat API and chat page over a real nano model, in-process (TestClient) and
over a socket (uvicorn in a thread) for the queue limit, client disconnects, the official openai client,
the chat page in headless Chromium (Debian's chromium + chromium-driver, installed by make setup) and a
bounded load of concurrent clients (bench/serve_load.py's load pattern)."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from fastapi.testclient import TestClient

from bench.serve_load import run_load
from step1_pretrain_sft.serve import ServeConfig, StopText, create_app
from step1_pretrain_sft.serve import main as serve_main
from utils.chat import prompt_ids
from utils.generation import SamplingConfig, generate_ids, generate_replies
from utils.model import load_for_inference

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


# ----------------------------------------------------------------------------------------------------
# A real server for the official openai client and the browser: max_queue 0, so while one generation
# runs a second request is a 429


@pytest.fixture(scope="module")
def live(loaded, model_dir):
    """(base URL, worker) of one uvicorn server shared by the openai-client and browser tests."""
    app = make_app(loaded, model_dir, max_queue=0, max_body_bytes=65536)
    with uvicorn_server(app) as base:
        yield base, app.state.service.worker


@pytest.fixture(scope="module")
def openai_client(live):
    """No retries: the client would otherwise retry a 429 after Retry-After and hide it."""
    with openai.OpenAI(base_url=live[0] + "/v1", api_key="unused", max_retries=0, timeout=60) as client:
        yield client


def wait_idle(worker, timeout: float = 10.0) -> None:
    """Until no generation runs or waits, so the next test starts on an idle server (admits one)."""
    deadline = time.monotonic() + timeout
    while worker.admitted and time.monotonic() < deadline:
        time.sleep(0.02)
    assert worker.admitted == 0, "a generation is still running"


def assert_openai_error(err: openai.APIStatusError, status: int, param=None, code=None) -> None:
    """The client raised for `status` and kept OpenAI's error object, field for field."""
    assert err.status_code == status
    body = err.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert err.body == body["error"] and body["error"]["message"] in err.message
    assert (err.param, err.code, err.type) == (param, code, body["error"]["type"])


def test_openai_client_plain_and_streamed_replies_agree(openai_client):
    assert [m.id for m in openai_client.models.list()] == ["nano-chat"]
    args = {"model": "nano-chat", "messages": MESSAGES, "temperature": 1.0, "seed": 3, "max_tokens": 20}
    reply = openai_client.chat.completions.create(**args)
    text = reply.choices[0].message.content
    assert reply.model == "nano-chat" and text and reply.usage.completion_tokens >= 1
    with openai_client.chat.completions.create(**args, stream=True) as stream:
        chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason


LONG = [{"role": "user", "content": "房间干净，服务热情，下次还住。" * 120}]


@pytest.mark.parametrize("overrides, error, status, param, code", [
    ({"temperature": "hot"}, openai.BadRequestError, 400, "temperature", None),
    ({"model": "gpt-4o"}, openai.NotFoundError, 404, "model", "model_not_found"),
    ({"messages": LONG}, openai.BadRequestError, 400, "messages", "context_length_exceeded"),
    ({"messages": [{"role": "user", "content": "x" * 70_000}]}, openai.APIStatusError, 413, None,
     "request_too_large"),
], ids=["bad-type", "unknown-model", "prompt-too-long", "body-too-large"])
def test_openai_client_raises_the_matching_error(openai_client, overrides, error, status, param, code):
    args = {"model": "nano-chat", "messages": MESSAGES, "max_tokens": 2, **overrides}
    with pytest.raises(openai.APIStatusError) as info:
        openai_client.chat.completions.create(**args)
    assert type(info.value) is error  # 413 has no subclass of its own in the client
    assert_openai_error(info.value, status, param, code)


def test_openai_client_full_queue_is_a_rate_limit_error(openai_client, live):
    long = {"model": "nano-chat", "messages": MESSAGES, "temperature": 0, "max_tokens": 1000}
    with openai_client.chat.completions.create(**long, stream=True) as running:
        assert next(iter(running)).choices[0].delta.role == "assistant"  # admitted and generating
        with pytest.raises(openai.RateLimitError) as info:
            openai_client.chat.completions.create(model="nano-chat", messages=MESSAGES, max_tokens=2)
    assert_openai_error(info.value, 429, code="queue_full")
    wait_idle(live[1])  # closing the stream cancelled the generation


# ----------------------------------------------------------------------------------------------------
# The chat page in a real browser

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@contextmanager
def chromium():
    """Headless Debian chromium through its chromedriver (given paths: Selenium Manager never downloads)."""
    from selenium import webdriver

    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    assert not missing, f"{missing} missing: run make setup (apt-get install chromium chromium-driver)"
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1000,700"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()


def test_chat_page_streams_a_reply_in_headless_chromium(live, openai_client, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    prompt = "评价一下这家酒店。"
    expected = openai_client.chat.completions.create(  # the page's settings below; greedy, so one reply
        model="nano-chat", messages=[{"role": "user", "content": prompt}], temperature=0, top_p=0.9,
        max_tokens=12).choices[0].message.content
    assert expected
    with chromium() as driver:
        driver.get(live[0] + "/")
        WebDriverWait(driver, 10).until(lambda d: d.find_element(By.ID, "model").text == "nano-chat")
        for name, value in (("temperature", "0"), ("max_tokens", "12")):
            field = driver.find_element(By.ID, name)
            field.clear()
            field.send_keys(value)
        driver.find_element(By.ID, "prompt").send_keys(prompt)
        driver.find_element(By.ID, "send").click()  # the button reads Stop until the stream ends

        def replied(d):
            bubbles = d.find_elements(By.CSS_SELECTOR, "#log .msg")
            done = d.find_element(By.ID, "send").text.startswith("发送")
            return done and len(bubbles) == 2 and bubbles[1]

        reply = WebDriverWait(driver, 30).until(replied)
        assert reply.get_attribute("class") == "msg assistant"  # not an error bubble
        assert reply.get_property("textContent") == expected
        shot = tmp_path / "chat.png"
        assert driver.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------------------
# Bounded load


def test_load_every_request_is_answered_or_refused(loaded, model_dir):
    app = make_app(loaded, model_dir, max_queue=2)
    clients, requests = 32, 3
    with uvicorn_server(app) as base:
        outcomes, _ = run_load(base, clients, requests, {"messages": MESSAGES, "max_tokens": 4}, timeout=30)
        assert httpx.get(base + "/v1/models", timeout=10).status_code == 200
    assert [o.error for o in outcomes if o.error] == []
    statuses = Counter(o.status for o in outcomes)
    assert sum(statuses.values()) == clients * requests and set(statuses) <= {200, 429}, statuses
    assert statuses[200] >= 1 and statuses[429] >= 1, statuses  # the queue bound was reached, not lost
