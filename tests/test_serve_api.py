"""`rlhfkit serve`: the official openai client against a real server process (models, plain and
streamed completions, the API key, n, max_tokens, the body limit), and the app in-process for
the rest: stop strings, seeds, validation errors in OpenAI's shape, the chat page, cancelling,
the loopback default; and the app under uvicorn in a thread, where a client can hang up. The tiny model's text is gibberish, so checks are on structure."""

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from rlhfkit.data.records import Message
from rlhfkit.data.tokenize import prompt_ids
from rlhfkit.serve import api
from rlhfkit.generation import Detokenizer
from rlhfkit.serve.api import Params, ServeConfig, create_app

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-test-key"
QUESTION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`rlhfkit serve tiny --api-key KEY` as a real process on a free port; yields its base URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env.pop("RLHFKIT_API_KEY", None)
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "rlhfkit.cli", "serve", "tiny", "--port", str(port),
                                 "--api-key", KEY], stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited with {proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline:
                pytest.fail(f"the server did not come up:\n{log.read_text()}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tiny_model(tiny_tokenizer):
    from rlhfkit.models import build_tiny_model

    return build_tiny_model(tiny_tokenizer)


@pytest.fixture(scope="module")
def app_client(tiny_model, tiny_tokenizer):
    return TestClient(create_app(ServeConfig(model="tiny"), tiny_model, tiny_tokenizer), base_url="http://127.0.0.1")


def post(http: TestClient, **body):
    return http.post("/v1/chat/completions", json={"messages": QUESTION, **body})


def streamed(http: TestClient, **body) -> tuple[str, list[dict]]:
    """The concatenated content of a streamed answer, and its chunks."""
    response = post(http, stream=True, **body)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    lines = [line for line in response.text.split("\n") if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]), chunks


# --- the openai client against a real server --------------------------------------------------


def test_openai_client_models_completion_and_stream(client, tiny_tokenizer):
    assert [m.id for m in client.models.list()] == ["tiny"]
    plain = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=12, temperature=0)
    choice = plain.choices[0]
    assert isinstance(choice.message.content, str) and choice.message.role == "assistant"
    assert choice.finish_reason in {"stop", "length"}
    usage = plain.usage
    assert usage.prompt_tokens == len(prompt_ids(tiny_tokenizer, tuple(Message(**m) for m in QUESTION)))
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.completion_tokens == 12 if choice.finish_reason == "length" else 1 <= usage.completion_tokens <= 12

    chunks = list(client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=12, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content  # greedy: same text
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_openai_client_key_n_and_max_tokens(client, server):
    anonymous = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.models.list()
    bare = httpx.post(f"{server}/v1/chat/completions", json={"messages": QUESTION})
    assert bare.status_code == 401 and bare.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server}/health").status_code == 200 and httpx.get(f"{server}/").status_code == 200

    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="tiny", messages=QUESTION, n=2)
    assert bad.value.body["param"] == "n" and "n=2" in bad.value.body["message"]
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=QUESTION)
    assert missing.value.body["code"] == "model_not_found"

    for limit in dict(max_tokens=3), dict(max_completion_tokens=5):
        cut = client.chat.completions.create(model="tiny", messages=QUESTION, temperature=0, **limit)
        n = next(iter(limit.values()))
        assert cut.usage.completion_tokens <= n
        if cut.choices[0].finish_reason == "length":
            assert cut.usage.completion_tokens == n


def test_oversized_body_is_refused_over_http(server):
    huge = {"messages": [{"role": "user", "content": "x" * 1_100_000}]}
    response = httpx.post(f"{server}/v1/chat/completions", json=huge, headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


# --- the app in-process -----------------------------------------------------------------------


def test_stop_strings_cut_both_ways_and_seeds_repeat(app_client):
    sampled = dict(temperature=1.0, seed=7, max_tokens=40)
    full = post(app_client, **sampled).json()["choices"][0]["message"]["content"]
    assert full == post(app_client, **sampled).json()["choices"][0]["message"]["content"]  # same seed, same text
    assert len(full) >= 10
    stop = full[6:9]
    expected = full[: full.find(stop)]
    cut = post(app_client, stop=[stop, "never generated"], **sampled).json()
    assert cut["choices"][0]["message"]["content"] == expected and cut["choices"][0]["finish_reason"] == "stop"
    text, chunks = streamed(app_client, stop=stop, **sampled)
    assert text == expected and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    # include_usage: one more chunk, with no choices and the usage
    _, chunks = streamed(app_client, stream_options={"include_usage": True}, **sampled)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 40


def test_detokenizer_never_sends_half_a_character(tiny_tokenizer):
    text = "héllo €uro 🙂 fin"
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = Detokenizer(tiny_tokenizer, stops=("fin",))
    pieces = [detok.add(t) for t in ids]
    assert all("\ufffd" not in p for p in pieces) and "".join(pieces) == "héllo €uro 🙂 " and detok.stopped


def test_errors_have_openai_shape_and_name_the_field(app_client):
    def error(response, status):
        assert response.status_code == status, response.text
        body = response.json()["error"]
        assert set(body) == {"message", "type", "param", "code"}
        return body

    assert error(post(app_client, temperature=3), 400)["param"] == "temperature"
    assert error(post(app_client, top_p=0), 400)["param"] == "top_p"
    assert error(post(app_client, max_tokens=0), 400)["param"] == "max_tokens"
    assert error(post(app_client, n=3), 400)["param"] == "n"
    assert error(post(app_client, model="other"), 404)["code"] == "model_not_found"
    def send(messages):
        return app_client.post("/v1/chat/completions", json={"messages": messages})

    assert error(send([{"role": "tool", "content": "x"}]), 400)["param"] == "messages[0].role"
    assert error(send([]), 400)["param"] == "messages"
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    assert error(send(image), 400)["param"] == "messages[0].content"
    assert error(send([{"role": "user", "content": "zq" * 3000}]), 400)["code"] == "context_length_exceeded"
    assert "not valid JSON" in error(app_client.post("/v1/chat/completions", content=b"{oops",
                                                     headers={"Content-Type": "application/json"}), 400)["message"]
    assert error(app_client.post("/v1/chat/completions", content=b"{}" + b" " * 1_000_000,
                                 headers={"Content-Type": "application/json"}), 413)["code"] == "request_too_large"
    assert error(app_client.get("/v1/nothing"), 404)["param"] is None
    # Text parts are accepted and joined; the model's own name is accepted.
    parts = [{"role": "user", "content": [{"type": "text", "text": "Name "}, {"type": "text", "text": "a colour."}]}]
    assert post(app_client, messages=parts, model="tiny", max_tokens=2).status_code == 200


def test_chat_page_is_static_and_renders_with_text_content(app_client):
    page = app_client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.text == (ROOT / "src/rlhfkit/serve/static/chat.html").read_text()  # nothing is filled in
    assert "textContent" in page.text and "/v1/chat/completions" in page.text and 'id="reset"' in page.text
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in page.text
    csp = page.headers["content-security-policy"]
    assert "script-src 'sha256-" in csp and "connect-src 'self'" in csp and "unsafe-inline' ;" not in csp


def test_only_loopback_host_names_reach_a_loopback_server(tiny_model, tiny_tokenizer):
    app = create_app(ServeConfig(model="tiny", model_name="mine"), tiny_model, tiny_tokenizer)
    assert TestClient(app, base_url="http://attacker.example").get("/health").status_code == 400
    local = TestClient(app, base_url="http://localhost:8000")
    assert local.get("/v1/models").json()["data"][0]["id"] == "mine"
    assert post(local, model="tiny").status_code == 404


def test_a_client_leaving_stops_the_generation(tiny_model, tiny_tokenizer, monkeypatch):
    engine = api.Engine(tiny_model, tiny_tokenizer)
    made = []
    original = engine.tokens

    def counted(*args):
        for token in original(*args):
            made.append(token)
            yield token

    monkeypatch.setattr(engine, "tokens", counted)
    ids = prompt_ids(tiny_tokenizer, (Message("user", "hi"),))

    async def leave_early():
        answer = engine.run(ids, Params(max_tokens=900, temperature=1.0, top_p=1.0, stop=(), seed=0))
        await anext(answer)
        await answer.aclose()

    asyncio.run(leave_early())
    engine.worker.submit(lambda: None).result(timeout=30)  # the worker is free again
    assert 0 < len(made) < 100


def test_an_over_long_prompt_is_refused_before_tokenising(app_client, monkeypatch):
    calls, real = [], api.prompt_ids
    monkeypatch.setattr(api, "prompt_ids", lambda *args: calls.append(args) or real(*args))
    # The tiny model: a 1024-token context, no token longer than 12 characters.
    response = app_client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * 13_000}]})
    assert calls == []  # refused on its length in characters, not tokenised
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "messages" and error["code"] == "context_length_exceeded" and "13000" in error["message"]


@pytest.fixture
def live(tiny_model, tiny_tokenizer):
    """The app under uvicorn in a thread, on a real socket; yields its port and its Engine."""
    import uvicorn

    app = create_app(ServeConfig(model="tiny"), tiny_model, tiny_tokenizer)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert until(lambda: server.started)
    yield port, app.state.engine
    server.should_exit = True
    thread.join(timeout=30)


def until(condition, timeout: float = 30) -> bool:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            return False
        time.sleep(0.02)
    return True


def send_raw(port: int, body: dict) -> socket.socket:
    """A chat request on a raw socket, so the test can hang up before the answer."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    return sock


def test_a_client_hanging_up_frees_the_worker(live, monkeypatch):
    """Two non-streaming requests whose clients hang up, one generating and one waiting its turn:
    the first stops, the second never starts, and the next request is answered at once."""
    port, engine = live
    monkeypatch.setattr(engine, "stop_ids", set())  # every answer runs to its max_tokens
    made, ended, original_tokens, original_run = [], [], engine.tokens, engine.run

    def counted(*args):  # tokens made, per generation
        made.append(0)
        for token in original_tokens(*args):
            made[-1] += 1
            time.sleep(0.005)  # ~900 tokens take seconds, whatever the machine
            yield token

    async def watched(*args):  # requests whose answer is over, done or closed
        try:
            async for item in original_run(*args):
                yield item
        finally:
            ended.append(True)

    monkeypatch.setattr(engine, "tokens", counted)
    monkeypatch.setattr(engine, "run", watched)
    long = {"messages": QUESTION, "max_tokens": 900, "temperature": 0}
    generating = send_raw(port, long)
    assert until(lambda: made and made[0] > 0)
    waiting = send_raw(port, long)
    time.sleep(0.3)  # queued behind the first by now (if not, it finds its client gone once it is)
    waiting.close()
    assert until(lambda: len(ended) == 1, timeout=10), "the queued request's client left, yet it is still waiting"
    generating.close()
    assert until(lambda: len(ended) == 2, timeout=10), "the generating request's client left, yet it goes on"
    next_one = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 1},
                          timeout=60)
    assert next_one.status_code == 200 and next_one.json()["usage"]["completion_tokens"] == 1
    assert len(made) == 2 and made[0] < 450 and made[1] == 1  # the queued one never generated


def test_health_answers_while_a_prompt_is_tokenised(live, monkeypatch):
    port, _ = live
    started, release, released = threading.Event(), threading.Event(), []
    real = api.prompt_ids

    def slow(*args):  # a long prompt's tokenising, over once the test has its /health answer
        started.set()
        released.append(release.wait(timeout=10))
        return real(*args)

    monkeypatch.setattr(api, "prompt_ids", slow)
    url = f"http://127.0.0.1:{port}"
    chat = threading.Thread(target=lambda: httpx.post(f"{url}/v1/chat/completions", timeout=60,
                                                      json={"messages": QUESTION, "max_tokens": 1}))
    chat.start()
    try:
        assert started.wait(timeout=30)
        assert httpx.get(f"{url}/health", timeout=30).status_code == 200
    finally:
        release.set()
        chat.join(timeout=60)
    assert released == [True]  # /health was answered while the tokenizer was still at work


def test_a_request_abandoned_while_queued_never_starts(tiny_model, tiny_tokenizer, monkeypatch):
    engine = api.Engine(tiny_model, tiny_tokenizer)
    started = []
    monkeypatch.setattr(engine, "complete", lambda *args: started.append(args))
    gate = threading.Event()
    engine.worker.submit(gate.wait, 30)  # the worker is busy with an earlier answer

    async def leave_while_queued():
        answer = engine.run([1, 2, 3], Params(max_tokens=5, temperature=0.0, top_p=1.0, stop=(), seed=0))
        with pytest.raises(TimeoutError):  # cancelled waiting for its first piece: the client left
            await asyncio.wait_for(anext(answer), timeout=0.2)

    asyncio.run(leave_while_queued())
    gate.set()
    engine.worker.submit(lambda: None).result(timeout=30)  # everything queued before this has run
    assert started == []


def test_serve_binds_loopback_by_default(monkeypatch, tiny_tokenizer):
    from rlhfkit.cli import parse

    cfg = parse("serve", ["tiny"])
    assert cfg == ServeConfig(model="tiny") and cfg.host == "127.0.0.1" and cfg.port == 8000
    calls = []
    monkeypatch.setattr("uvicorn.run", lambda app, **kwargs: calls.append((app, kwargs)))
    monkeypatch.setattr("rlhfkit.models.load_tokenizer", lambda name: tiny_tokenizer)
    monkeypatch.setenv("RLHFKIT_API_KEY", "from-env")
    api.serve(cfg)
    app, kwargs = calls[0]
    assert kwargs["host"] == "127.0.0.1" and kwargs["port"] == 8000
    # The key from the environment applies when --api-key is not given.
    http = TestClient(app, base_url="http://127.0.0.1")
    assert http.get("/v1/models").status_code == 401
    assert http.get("/v1/models", headers={"Authorization": "Bearer from-env"}).status_code == 200


def test_bf16_engine_answers_the_same_with_its_weights_cast_once(tiny_tokenizer):
    """In bf16 the engine casts the weights once at start (a Llama is covered) and decodes with
    the lean step; its answers are those of the model's own forward under autocast's per-call
    casting, token for token."""
    import threading

    from rlhfkit.data.records import user
    from rlhfkit.engines.builtin import BuiltinEngine
    from rlhfkit.models import build_tiny_model

    engine = api.Engine(build_tiny_model(tiny_tokenizer), tiny_tokenizer, "bf16")
    assert engine.answerer.engine._step is not None  # cast once, here
    ids = prompt_ids(tiny_tokenizer, user("What is 12 + 30?"))
    answers = []
    for plain in (False, True):
        if plain:
            engine.answerer.engine = BuiltinEngine(engine.model, tiny_tokenizer.pad_token_id, "bf16", fast_steps=False)
        for temperature in (0.0, 1.0):
            params = Params(max_tokens=12, temperature=temperature, top_p=1.0, stop=(), seed=3)
            answers.append(engine.complete(ids, params, threading.Event(), lambda piece: None))
    assert answers[:2] == answers[2:]
    assert answers[0].completion_tokens > 0
