"""`rlhfkit serve MODEL`: an OpenAI-compatible HTTP API for one model, and a chat page.

``POST /v1/chat/completions`` (streaming as Server-Sent Events or not), ``GET /v1/models``,
``GET /health`` and a static chat page at ``/``, so the official ``openai`` client, curl or a
browser can talk to a model trained here. Prompts are rendered by the tokenizer's chat template
(``prompt_ids``, as in training and ``rlhfkit chat``); an answer ends at the end-of-turn token,
at ``max_tokens`` or at a ``stop`` string.

One model sits in memory and one worker thread runs every generation: a CPU model cannot run two
at once any faster than one after the other, so requests queue for it in arrival order. The
worker hands text pieces to the request's event loop as they are decoded, and stops when the
client goes away (a request still waiting its turn then never starts). Prompts are tokenised on
a thread of their own, so a long one holds up neither the event loop nor the generations.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from importlib import resources
from typing import Annotated, Any, Literal

import torch
import tyro
from jinja2 import TemplateError
from pydantic import BaseModel, Field
from starlette.requests import Request  # FastAPI finds endpoint types in module globals

from rlhfkit.config import ModelConfig, require_positive
from rlhfkit.data.records import Message
from rlhfkit.data.tokenize import prompt_ids
from rlhfkit.errors import ConfigError
from rlhfkit.hosts import LOOPBACK
from rlhfkit.generation import Answerer, Detokenizer

log = logging.getLogger("rlhfkit.serve")

API_KEY_ENV = "RLHFKIT_API_KEY"


@dataclass
class ServeConfig:
    """OpenAI-compatible HTTP API (/v1/chat/completions, streaming) and a chat page for one model."""

    model: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="MODEL")]
    """Built-in name (`tiny`, `smollm2-135m-instruct`), a local model folder (e.g. the output of `rlhfkit sft`), or a hub id."""
    host: str = "127.0.0.1"
    """Address to listen on. The default admits this machine only; `0.0.0.0` admits the network (set an API key)."""
    port: int = 8000
    """TCP port to listen on."""
    model_name: str = ""
    """The model's id in the API (`GET /v1/models`, the `model` field of requests). Empty: MODEL as given."""
    api_key: str = ""
    """Require `Authorization: Bearer KEY` on /v1/ requests. Empty: $RLHFKIT_API_KEY (hidden from `ps`) or no key."""
    max_tokens: int = 512
    """Longest answer when a request does not set max_tokens. Every answer also stops at the model's context length."""
    max_request_bytes: int = 1_000_000
    """Larger request bodies are refused (413) before they are parsed."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """`auto` (default): bf16 autocast where it measures clearly faster for this model on this machine, else fp32 (measured once, cached). `bf16`: forward passes under bf16 autocast, weights stay fp32. `fp32`."""
    seed: int = 0
    """The `tiny` model's initialisation. Requests choose their own sampling seed (`seed`), else a random one."""

    def check(self) -> None:
        require_positive(self, "max_tokens", "max_request_bytes")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in 0..65535, got {self.port}")


# --- errors in OpenAI's shape -----------------------------------------------------------------


class ApiError(Exception):
    """An error the client caused, answered as OpenAI does: ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_response(error: ApiError, headers: dict[str, str] | None = None):
    from fastapi.responses import JSONResponse

    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def field_path(loc: tuple) -> str | None:
    """pydantic's error location as a parameter name: ("body", "messages", 0, "role") -> messages[0].role."""
    path = ""
    for part in loc[1:]:
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else str(part)
    return path or None


# --- the request ------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    # A string, or OpenAI's list of content parts (text parts only: the models here read text).
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(BaseModel):
    """The fields of OpenAI's chat completion request that apply here; other fields are ignored."""

    messages: list[ChatMessage]
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None


@dataclass(frozen=True)
class Params:
    max_tokens: int
    temperature: float  # 0: greedy
    top_p: float
    stop: tuple[str, ...]
    seed: int | None


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" (end of turn or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int  # every generated token, the end-of-turn token included

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


def message_text(message: ChatMessage, i: int) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    texts = []
    for part in message.content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ApiError(400, f"messages[{i}].content: only text parts ({{'type': 'text', 'text': ...}}) are "
                                f"supported, got type {part.get('type')!r}", param=f"messages[{i}].content")
        texts.append(part["text"])
    return "".join(texts)


# --- generation -------------------------------------------------------------------------------


class Engine:
    """The model, and the one worker thread that runs its generations one after the other."""

    def __init__(self, model, tokenizer, precision: str = "fp32"):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.answerer = Answerer(model, tokenizer, precision)
        self.stop_ids = set(self.answerer.stop)
        self.context = getattr(model.config, "max_position_embeddings", None)
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rlhfkit-generate")

    def tokens(self, ids: list[int], params: Params, generator: torch.Generator) -> Iterator[int]:
        """The answer's tokens as they are sampled, through the end-of-turn token if one comes."""
        return self.answerer.stream(ids, params.max_tokens, params.temperature, params.top_p, generator)

    def complete(self, ids: list[int], params: Params, cancelled: threading.Event,
                 send: Callable[[str], None]) -> Completion:
        """Generate an answer to the prompt ``ids`` (in the worker thread), ``send``-ing its text as it comes."""
        generator = torch.Generator(device=self.model.device)
        if params.seed is None:
            generator.seed()
        else:
            generator.manual_seed(params.seed % 2**63)
        text = Detokenizer(self.tokenizer, params.stop)
        finish, count = "length", 0
        if cancelled.is_set():  # the client left while this request waited its turn
            return Completion("", finish, len(ids), 0)
        with contextlib.closing(self.tokens(ids, params, generator)) as tokens:  # closing stops the decoder
            for token in tokens:
                if cancelled.is_set():  # the client left
                    break
                count += 1
                if token in self.stop_ids:
                    finish = "stop"
                    break
                if piece := text.add(token):
                    send(piece)
                if text.stopped:
                    finish = "stop"
                    break
        if piece := text.flush():
            send(piece)
        return Completion(text.sent, finish, len(ids), count)

    async def run(self, ids: list[int], params: Params) -> AsyncIterator[str | Completion]:
        """The answer's text pieces as they are generated, then its Completion. Closing the
        iterator early (the client disconnected) stops the generation."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        cancelled = threading.Event()

        def send(piece: str | None) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, piece)
            except RuntimeError:  # the event loop is gone: the server is shutting down
                cancelled.set()

        def work() -> Completion:
            try:
                return self.complete(ids, params, cancelled, send)
            finally:
                send(None)  # the end of the pieces, whether the answer is done or failed

        future = loop.run_in_executor(self.worker, work)
        try:
            while (piece := await queue.get()) is not None:
                yield piece
            yield await future
        finally:
            cancelled.set()  # stops a running generation at its next token
            future.cancel()  # takes a queued one off the worker's queue before it starts


async def disconnected(receive) -> None:
    """Returns once the client has gone. Call it after the body is read: every message left
    is then ``http.disconnect`` (uvicorn also sends it once the response is complete)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def last_item(answer: AsyncIterator[str | Completion]) -> Completion:
    async for item in answer:
        done = item  # the pieces are in the Completion's text; only the last item matters
    return done


async def unless_disconnected(answer: AsyncIterator[str | Completion], receive) -> Completion | None:
    """The answer's Completion, or None once the client disconnects: the server would go on
    generating for nobody (keeping every later request waiting), so the answer is then closed."""
    result, gone = asyncio.ensure_future(last_item(answer)), asyncio.ensure_future(disconnected(receive))
    try:
        await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        result.cancel()  # no-op once it is done; else the CancelledError closes the answer
        gone.cancel()
        await asyncio.wait({result, gone})  # the answer's cleanup (cancelling its generation) has run
        await answer.aclose()
    return None if result.cancelled() else result.result()


# --- the app ----------------------------------------------------------------------------------


class Guard:
    """ASGI middleware: the API key on /v1/ routes, then the request body size limit.

    Both run before FastAPI reads the body, so an unauthenticated or oversized request never
    reaches JSON parsing. A body without Content-Length (chunked) is counted as it arrives.
    """

    def __init__(self, app, api_key: str, max_bytes: int):
        self.app, self.api_key, self.max_bytes = app, api_key.encode(), max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.api_key and scope["path"].startswith("/v1/"):
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, b"Bearer " + self.api_key):  # constant time: no guessing by timing
                said = "an incorrect API key" if given else "no API key"
                error = ApiError(401, f"You provided {said}: send the server's key as 'Authorization: Bearer KEY'.",
                                 code="invalid_api_key")
                return await error_response(error, {"WWW-Authenticate": "Bearer"})(scope, receive, send)
        too_large = ApiError(413, f"The request body is larger than this server's limit of {self.max_bytes} bytes.",
                             code="request_too_large")
        declared = headers.get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_bytes:
            return await error_response(too_large)(scope, receive, send)
        body, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client disconnected
                return
            body.append(message.get("body", b""))
            more = message.get("more_body", False)
            if sum(map(len, body)) > self.max_bytes:
                return await error_response(too_large)(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:  # later receives wait for the disconnect, as the server's would
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(body), "more_body": False}

        await self.app(scope, replay, send)


def chat_page() -> tuple[str, str]:
    """The chat page and its Content-Security-Policy: only the page's own script runs (pinned by
    its hash), and it may only talk to this server, so model text could not run script even
    if the page ever rendered it as HTML (it uses textContent)."""
    html = resources.files("rlhfkit.serve").joinpath("static/chat.html").read_text(encoding="utf-8")
    script = re.search(r"<script>(.*?)</script>", html, re.DOTALL).group(1)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    csp = (f"default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; connect-src 'self'; "
           "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return html, csp


def create_app(cfg: ServeConfig, model, tokenizer):
    """The FastAPI app serving ``model`` under ``cfg.model_name or cfg.model``."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.middleware.trustedhost import TrustedHostMiddleware
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException
    from starlette.responses import Response

    name = cfg.model_name or cfg.model
    from rlhfkit.precision import resolve

    engine = Engine(model, tokenizer, resolve(cfg.precision, cfg.model, None))  # `serve` said what auto chose
    # Not the generation worker, where a prompt would wait for the answers queued before it.
    tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rlhfkit-tokenize")
    # No token stands for more characters than its vocabulary string has (byte-level BPE spells
    # each byte as one), so longer text cannot fit in the context: refused without tokenising it.
    longest_token = max(map(len, tokenizer.get_vocab()))
    max_prompt_chars = None if engine.context is None else (engine.context - 1) * longest_token
    created = int(time.time())
    page, csp = chat_page()
    app = FastAPI(title="rlhfkit serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.add_middleware(Guard, api_key=cfg.api_key, max_bytes=cfg.max_request_bytes)
    if cfg.host in LOOPBACK:
        # A web page can point its own domain at 127.0.0.1 (DNS rebinding) and then call this
        # server as same-origin; its requests carry that domain as Host, so only accept ours.
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(LOOPBACK))

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        param = field_path(tuple(first["loc"]))
        if first["type"] == "json_invalid":
            message, param = f"The request body is not valid JSON: {first.get('ctx', {}).get('error', '')}", None
        elif param is None:
            message = "The request body must be a JSON object, sent with 'Content-Type: application/json'."
        else:
            message = f"{param}: {first['msg']}"
        return error_response(ApiError(400, message, param=param))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return error_response(ApiError(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}"))

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        log.exception("request failed")
        return error_response(ApiError(500, f"The server failed: {exc.__class__.__name__}", type="server_error"))

    def model_card() -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "rlhfkit"}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page, headers={"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff"})

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def one_model(model_id: str):
        if model_id != name:
            raise unknown_model(model_id)
        return model_card()

    def unknown_model(asked: str) -> ApiError:
        return ApiError(404, f"The model '{asked}' does not exist; this server serves '{name}'.",
                        param="model", code="model_not_found")

    def checked_messages(req: ChatRequest) -> tuple[Message, ...]:
        """The request's messages once its fields are valid, or the ApiError to answer (cheap: on the loop)."""
        if req.model is not None and req.model != name:
            raise unknown_model(req.model)
        if req.n not in (None, 1):
            raise ApiError(400, f"n={req.n}: this server generates one choice per request; send n=1 or leave n out "
                                "(and send several requests for several answers).", param="n")
        if not req.messages:
            raise ApiError(400, "messages must hold at least one message.", param="messages")
        roles = {"developer": "system"}  # OpenAI's newer name for the system role
        messages = tuple(Message(roles.get(m.role, m.role), message_text(m, i)) for i, m in enumerate(req.messages))
        chars = sum(len(m.content) for m in messages)
        if max_prompt_chars is not None and chars > max_prompt_chars:
            raise ApiError(400, f"The messages are {chars} characters; the model's context of {engine.context} "
                                f"tokens cannot hold more than {max_prompt_chars}.", param="messages",
                           code="context_length_exceeded")
        return messages

    def tokenize(messages: tuple[Message, ...]) -> list[int]:
        """The prompt's token ids (in the tokenizing thread: a long prompt takes seconds)."""
        try:
            return prompt_ids(tokenizer, messages)
        except (TemplateError, ValueError) as e:  # a template refusing these messages (e.g. roles not alternating)
            raise ApiError(400, f"The model's chat template rejects these messages: {e}", param="messages") from None

    def generation_params(req: ChatRequest, ids: list[int]) -> Params:
        """The generation parameters, or the ApiError to answer when the prompt leaves no room."""
        room = cfg.max_tokens if engine.context is None else engine.context - len(ids)
        if room <= 0:
            raise ApiError(400, f"The messages are {len(ids)} tokens; the model's context holds {engine.context} "
                                "with the answer.", param="messages", code="context_length_exceeded")
        asked = req.max_completion_tokens or req.max_tokens or cfg.max_tokens
        stop = [req.stop] if isinstance(req.stop, str) else req.stop or []
        return Params(max_tokens=min(asked, room), temperature=1.0 if req.temperature is None else req.temperature,
                      top_p=1.0 if req.top_p is None else req.top_p, stop=tuple(s for s in stop if s), seed=req.seed)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        messages = checked_messages(req)
        ids = await asyncio.get_running_loop().run_in_executor(tokenizing, tokenize, messages)
        params = generation_params(req, ids)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": name}
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(stream(head, engine.run(ids, params), usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        done = await unless_disconnected(engine.run(ids, params), request.receive)
        if done is None:  # nobody is left to read an answer
            return Response(status_code=499)  # nginx's "client closed request", for the record
        return JSONResponse({**head, "object": "chat.completion", "choices": [{
            "index": 0, "message": {"role": "assistant", "content": done.text}, "logprobs": None,
            "finish_reason": done.finish_reason}], "usage": done.usage()})

    async def stream(head: dict, answer: AsyncIterator[str | Completion], usage: bool) -> AsyncIterator[str]:
        """Server-Sent Events: a chunk with the role, one per text piece, one with the finish reason, [DONE]."""

        def event(data: dict) -> str:
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        def chunk(delta: dict, finish: str | None) -> str:
            return event({**head, "object": "chat.completion.chunk",
                          "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})

        yield chunk({"role": "assistant", "content": ""}, None)  # at once, even while waiting for the model
        try:
            async for item in answer:
                if isinstance(item, str):
                    yield chunk({"content": item}, None)
                else:
                    done = item
        except Exception as e:  # the status line went out long ago: report it in the stream, as OpenAI does
            log.exception("generation failed")
            yield event(ApiError(500, f"Generation failed: {e.__class__.__name__}", type="server_error").body())
            return
        finally:
            await answer.aclose()  # stops the generation when the client has left
        yield chunk({}, done.finish_reason)
        if usage:
            yield event({**head, "object": "chat.completion.chunk", "choices": [], "usage": done.usage()})
        yield "data: [DONE]\n\n"

    return app


def serve(cfg: ServeConfig) -> None:
    import uvicorn

    from rlhfkit.models import load_model, load_tokenizer

    from rlhfkit.precision import resolve

    cfg.check()
    cfg = replace(cfg, api_key=cfg.api_key or os.environ.get(API_KEY_ENV, ""),
                  precision=resolve(cfg.precision, cfg.model, flag="--precision"))
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(ModelConfig(name=cfg.model, precision=cfg.precision), tokenizer, seed=cfg.seed,
                       training=False)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    app = create_app(cfg, model, tokenizer)
    url = f"http://{cfg.host}:{cfg.port}"
    print(f"rlhfkit serve: {cfg.model_name or cfg.model} | API {url}/v1 | chat page {url}/"
          + (" | API key required" if cfg.api_key else ""), flush=True)
    if cfg.host not in LOOPBACK and not cfg.api_key:
        print(f"warning: listening on {cfg.host} without an API key: anyone who can reach this port can use the "
              f"model (set --api-key or ${API_KEY_ENV})", flush=True)
    # A streaming answer ends when its client leaves; a short grace period stops Ctrl-C from
    # waiting on clients that keep connections open.
    uvicorn.run(app, host=cfg.host, port=cfg.port, timeout_graceful_shutdown=3, server_header=False)
