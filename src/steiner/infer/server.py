"""``steiner serve``: an OpenAI-compatible server (FastAPI + uvicorn): chat completions, and
text completions for clients that write the prompt out themselves.

Concurrent requests are queued and run together: a batcher takes up to ``max_batch``
waiting requests and runs one ``generate`` for all of them (the step budget, temperature,
top-p and seed are per row; a seeded request gets the same completion alone or batched).
Streaming sends the reasoning and the answer as SSE deltas once that batch is done (a batch
is generated as a whole; the deltas are not token by token).
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import json
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from steiner.infer.budget import BUDGET_FIELDS, EXTEND_WITH, Budget
from steiner.infer.generate import (
    Completion,
    Prompt,
    completion_from_text,
    count_prompt_tokens,
    generate,
    is_token_ids,
    load,
    position_limit,
)
from steiner.io import derived_seed, not_a_boolean


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str

    @field_validator("content", mode="before")
    @classmethod
    def join_text_parts(cls, content: Any) -> Any:
        """OpenAI clients may send content as parts, ``[{"type": "text", "text": ...}]``; a
        text model takes their texts joined by newlines and refuses any other kind of part."""
        if not isinstance(content, list):
            return content
        texts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind != "text":
                raise ValueError(
                    f"only text parts are supported ({{'type': 'text', 'text': ...}}), got {kind!r}"
                )
            if not isinstance(part.get("text"), str):
                raise ValueError("a text part's 'text' must be a string")
            texts.append(part["text"])
        return "\n".join(texts)

    @field_validator("role")
    @classmethod
    def developer_is_system(cls, role: str) -> str:
        # OpenAI's newer name for the system message; the chat template knows "system"
        return "system" if role == "developer" else role


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


# Fields of OpenAI's API and vLLM's that would change the completion, which this server does
# not implement: at their default (as many clients send them) they are accepted; otherwise a
# 400, as for logprobs, where they were left out and the client got another completion than
# it asked for. The values each may take, unused (the first after None is the one named).
UNSUPPORTED_FIELDS: dict[str, tuple[Any, ...]] = {
    # vLLM's: true drops the special tokens from the text, the format's 14 among them; this
    # server keeps them, as vLLM does with false
    "skip_special_tokens": (None, False),
    "suffix": (None, ""),  # /v1/completions
    "best_of": (None, 1),  # /v1/completions
    "tools": (None, []),
    "functions": (None, []),
    "response_format": (None, {"type": "text"}),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "top_k": (None, 0, -1),
    "min_p": (None, 0),
    "repetition_penalty": (None, 1),
}


class _SamplingFields(BaseModel):
    """The fields chat and text completions share: OpenAI's and the Steiner extras."""

    # unknown OpenAI fields are accepted, unused (kept, so UNSUPPORTED_FIELDS can be checked)
    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=128)  # choices per prompt (OpenAI's range)
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)  # int64, as vLLM
    # OpenAI's stop sequences (a string or up to 4), applied to the answer: see cut_at_stop
    stop: list[str] = Field(default_factory=list, max_length=4)
    # Steiner extras (also accepted inside "extra_body" by the openai client, which merges them)
    min_steps: int | None = Field(default=None, ge=0)
    max_steps: int | None = Field(default=None, ge=1)
    max_reasoning_tokens: int | None = Field(default=None, ge=1)
    max_step_tokens: int | None = Field(default=None, ge=1)
    extend_with: Literal[EXTEND_WITH] | None = None  # type: ignore[valid-type]

    @model_validator(mode="before")
    @classmethod
    def null_is_not_given(cls, body: Any) -> Any:
        """OpenAI's API types these as "or null", null meaning the default, and clients
        built on its spec send it (``"temperature": null``); a 400 would refuse them."""
        if isinstance(body, dict):
            nullable = ("temperature", "top_p", "n", "stream", "logprobs", "echo")
            return {k: v for k, v in body.items() if not (k in nullable and v is None)}
        return body

    @model_validator(mode="before")
    @classmethod
    def budget_from_vllm_xargs(cls, body: Any) -> Any:
        """The budget fields as vLLM takes them, in ``vllm_xargs`` (its ``extra_args`` for
        logits processors: ``steiner.infer.vllm_budget``), so that one client's requests get
        the same budget from ``vllm serve`` and from here; other keys there are left, as
        vLLM leaves those no processor reads."""
        xargs = body.get("vllm_xargs") if isinstance(body, dict) else None
        if xargs is None:
            return body
        if not isinstance(xargs, dict):
            raise ValueError(f"vllm_xargs: expected an object, got {type(xargs).__name__}")
        body = dict(body)
        for key in BUDGET_FIELDS:
            if key not in xargs:
                continue
            if key in body and body[key] != xargs[key]:
                raise ValueError(
                    f"{key} is given twice, as {body[key]!r} and in vllm_xargs as {xargs[key]!r}"
                )
            body[key] = xargs[key]
        return body

    @field_validator(
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "n",
        "seed",
        "top_logprobs",
        "min_steps",
        "max_steps",
        "max_reasoning_tokens",
        "max_step_tokens",
        mode="before",
        check_fields=False,  # max_completion_tokens and top_logprobs are chat's alone
    )
    @classmethod
    def number_not_boolean(cls, value: Any) -> Any:
        return not_a_boolean(value, "a number")  # OpenAI's API refuses one too

    @field_validator("stop", mode="before")
    @classmethod
    def stop_as_list(cls, stop: Any) -> Any:
        if stop is None:
            return []
        stops = [stop] if isinstance(stop, str) else stop
        if isinstance(stops, list) and "" in stops:
            raise ValueError("a stop sequence must not be empty")
        return stops

    def wanted_max_tokens(self) -> int | None:
        return self.max_tokens

    def asks_logprobs(self) -> bool:
        raise NotImplementedError


class ChatRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = None

    def wanted_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def prompts(self) -> list[Prompt]:
        return [[m.model_dump() for m in self.messages]]

    def asks_logprobs(self) -> bool:
        return self.logprobs or bool(self.top_logprobs)


class CompletionRequest(_SamplingFields):
    """``/v1/completions``: prompts already written out, as text or token ids, each answered
    as it is (no chat template), as a client that applies the template itself sends them
    (lm-evaluation-harness's ``local-completions`` with ``--apply_chat_template``)."""

    prompt: list[str] | list[list[StrictInt]] = Field(min_length=1)
    logprobs: int | None = None  # refused when given, as chat's: see ``refusal``
    echo: bool = False

    @field_validator("prompt", mode="before")
    @classmethod
    def prompts_as_list(cls, prompt: Any) -> Any:
        """OpenAI's four forms, as a list of prompts: a text, a list of texts, a list of
        token ids, a list of those (one error naming them, not pydantic's for each type)."""

        def token_ids(p: Any) -> bool:
            return isinstance(p, list) and all(
                isinstance(t, int) and not isinstance(t, bool) for t in p
            )

        if prompt in ("", []) or (isinstance(prompt, list) and any(p in ("", []) for p in prompt)):
            raise ValueError("a prompt must not be empty")
        if isinstance(prompt, str) or token_ids(prompt):
            return [prompt]
        if isinstance(prompt, list) and (
            all(isinstance(p, str) for p in prompt) or all(token_ids(p) for p in prompt)
        ):
            return prompt
        raise ValueError(
            "expected a string, a list of strings, a list of token ids or a list of such lists"
        )

    def prompts(self) -> list[Prompt]:
        return list(self.prompt)

    def asks_logprobs(self) -> bool:
        return self.logprobs is not None  # 0 asks for the chosen tokens' own


class TokenizeRequest(BaseModel):
    """vLLM's ``POST /tokenize``: a text, or a chat through the chat template."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: bool | None = None  # vLLM's default: a text's yes, a chat's no
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @model_validator(mode="before")
    @classmethod
    def chat_sent_as_prompt(cls, body: Any) -> Any:
        """A chat in ``prompt`` reads as ``messages``: lm-evaluation-harness's remote
        tokenizer sends one so (``local-completions --apply_chat_template``, the tokenizer
        routes found), and vLLM's own route would refuse it, leaving that client no way in."""
        prompt = body.get("prompt") if isinstance(body, dict) else None
        if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
            if body.get("messages") is None:
                return {k: v for k, v in body.items() if k != "prompt"} | {"messages": prompt}
        return body

    @model_validator(mode="after")
    def text_or_chat(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("expected one of 'prompt' or 'messages'")
        return self


class DetokenizeRequest(BaseModel):
    """vLLM's ``POST /detokenize``."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    tokens: list[StrictInt]


def plain_jinja(template: str) -> str:
    """The chat template without transformers' ``{% generation %}`` markers, which only mark
    the assistant's tokens for training: clients that render a served template with plain
    Jinja (lm-evaluation-harness's remote tokenizer) fail on the unknown tag, and the text
    it renders is the same without them."""
    return re.sub(r"\{%-?\s*(?:end)?generation\s*-?%\}", "", template)


@dataclass
class ServerSettings:
    model_dir: str
    model_name: str | None = None
    max_batch: int = 16
    batch_wait_s: float = 0.01
    max_tokens_limit: int = 4096
    default_max_tokens: int = 1024
    max_request_bytes: int = 1 << 20
    max_prompt_tokens: int = 8192
    disconnect_poll_s: float = 0.25
    # required as "Authorization: Bearer KEY" on the /v1 routes, as vllm serve --api-key does
    api_key: str | None = None


@dataclass
class _Job:
    request: _SamplingFields
    prompt: Prompt
    seed: int | None  # the request's, or one derived from it for its n choices
    budget: Budget | None
    max_tokens: int
    future: asyncio.Future = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    cancelled: bool = False  # its client left: not started, or ended where it is


def error(
    status: int,
    message: str,
    kind: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(status_code=status, content=body)


class RequireApiKey:
    """With an API key, the /v1 routes answer only requests that carry it, as vLLM's do;
    /health and the tokenizer routes stay open there too. Plain ASGI, not
    ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware hides a client's disconnect
    from the route, so a request whose client left would run on to its max_tokens."""

    def __init__(self, app: Any, key: str):
        self.app, self.wanted = app, f"Bearer {key}".encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.wanted):
                refusal = error(
                    401,
                    "a missing or wrong API key (Authorization: Bearer KEY)",
                    code="invalid_api_key",
                )
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)


class Route(NamedTuple):
    """What tells the chat and text completion routes apart: the request model, the reply's id
    prefix and object names, and how a choice is written whole and as streamed chunks."""

    request: type[BaseModel]
    id_prefix: str
    object: str
    chunk_object: str
    choice: Callable[[int, Completion], dict[str, Any]]
    chunks: Callable[[int, Completion], Iterator[dict[str, Any]]]


def create_app(settings: ServerSettings) -> FastAPI:
    model, tokenizer = load(settings.model_dir)
    # A fast tokenizer keeps its padding setting in the shared Rust object: each call sets it
    # and then encodes. The handlers (event loop thread) and a batch (executor thread) each
    # encode at once, so with one instance a handler's unpadded call could switch padding off
    # between a batch's set and encode, and that batch failed with "Unable to create tensor"
    # (a 500 for all its requests). Handlers get their own copy; `tokenizer` is the batch's.
    request_tokenizer = copy.deepcopy(tokenizer)
    # a prompt must leave the model a position to answer in (vLLM refuses one past its
    # max_model_len); a longer one got an empty completion, 200 and finish_reason "length"
    positions = position_limit(model)
    prompt_limit, why_limit = settings.max_prompt_tokens, ""
    if positions and positions - 1 < prompt_limit:
        prompt_limit, why_limit = positions - 1, f" (the model has {positions} positions)"
    name = settings.model_name or Path(settings.model_dir).name
    vocabulary = model.get_input_embeddings().num_embeddings
    queue: asyncio.Queue[_Job] = asyncio.Queue()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.batcher = asyncio.create_task(batcher())
        yield
        app.state.batcher.cancel()

    app = FastAPI(title="steiner serve", lifespan=lifespan)

    if settings.api_key:
        app.add_middleware(RequireApiKey, key=settings.api_key)

    async def batcher() -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await queue.get()
            await asyncio.sleep(settings.batch_wait_s)  # let concurrent requests join
            jobs = [first]
            while not queue.empty() and len(jobs) < settings.max_batch:
                jobs.append(queue.get_nowait())
            jobs = [j for j in jobs if not j.cancelled]
            if not jobs:
                continue
            try:
                outs = await loop.run_in_executor(None, run_batch, jobs)
                for job, out in zip(jobs, outs, strict=True):
                    job.future.set_result(out)
            except Exception as exc:  # a failed batch fails its requests, not the server
                for job in jobs:
                    # a request whose client left is not waited on: an exception set there
                    # would be logged as never retrieved
                    if not job.future.done() and not job.cancelled:
                        job.future.set_exception(exc)

    def run_batch(jobs: list[_Job]) -> list[Completion]:
        outs = generate(
            model,
            tokenizer,
            [j.prompt for j in jobs],
            [j.budget for j in jobs],
            max_new_tokens=max(j.max_tokens for j in jobs),
            temperature=[j.request.temperature for j in jobs],
            top_p=[j.request.top_p for j in jobs],
            seed=[j.seed for j in jobs],
            cancelled=[lambda job=j: job.cancelled for j in jobs],
        )
        return [truncate(out, job.max_tokens) for out, job in zip(outs, jobs, strict=True)]

    def truncate(out: Completion, max_tokens: int) -> Completion:
        """A row of a batch may run past its own max_tokens (the batch uses the largest)."""
        if out.completion_tokens <= max_tokens:
            return out
        ids = tokenizer(out.text, add_special_tokens=False)["input_ids"][:max_tokens]
        return completion_from_text(
            tokenizer.decode(ids),
            prompt_tokens=out.prompt_tokens,
            completion_tokens=max_tokens,
            reasoning_tokens=min(out.reasoning_tokens, max_tokens),
            finish_reason="length",
        )

    def cut_at_stop(out: Completion, stops: list[str]) -> Completion:
        """OpenAI's stop sequences, applied to the answer only: the reasoning is delimited by
        the format's own tokens, and a client's stops (lm-evaluation-harness sends
        "Question:", "\\n\\n" or the EOS text) are meant for the answer it reads. The answer
        ends before the first stop found, finish_reason is "stop", and completion_tokens
        counts the message up to there. The whole completion was generated already (a batch
        runs as a whole), so this cuts text and does not save time."""
        cuts = [i for i in (out.answer.find(s) for s in stops) if i >= 0]
        if not cuts:
            return out
        answer = out.answer[: min(cuts)]
        kept = out.text[: out.text.rindex(out.answer) + len(answer)]
        tokens = len(request_tokenizer(kept, add_special_tokens=False)["input_ids"])
        return replace(
            out,
            text=kept,
            answer=answer,
            completion_tokens=min(tokens, out.completion_tokens),
            finish_reason="stop",
        )

    async def finished_or_left(job: _Job, request: Request) -> Completion | None:
        """The job's completion, or None once its client has disconnected (asked every
        ``disconnect_poll_s``: uvicorn does not cancel a handler whose client left)."""
        while True:
            try:
                return await asyncio.wait_for(
                    asyncio.shield(job.future), timeout=settings.disconnect_poll_s
                )
            except TimeoutError:
                if await request.is_disconnected():
                    job.cancelled = True
                    return None

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error(
            400,
            f"{where}: {first.get('msg')}" if where else str(first.get("msg")),
            param=where or None,
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail), code=str(exc.status_code))

    def loop_ended(request: Request) -> JSONResponse | None:
        """A 503 once the batch loop has ended: nothing would answer a request."""
        if request.app.state.batcher.done():
            return error(503, "the batch loop has ended", kind="server_error", code="503")
        return None

    @app.get("/health", response_model=None)
    async def health(request: Request) -> Response | JSONResponse:
        """vLLM's readiness check, which load balancers and Kubernetes probes poll: 200 with
        no body while requests can be answered, 503 once the batch loop has ended."""
        return loop_ended(request) or Response(status_code=200)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": name, "object": "model", "created": 0, "owned_by": "steiner"}],
        }

    async def parsed(request: Request, kind: type[BaseModel]) -> Any:
        """The request's body as ``kind``, or the error response (413, 400, or 404 for a
        model this server does not have)."""
        raw = await request.body()
        if len(raw) > settings.max_request_bytes:
            return error(
                413,
                f"request body over {settings.max_request_bytes} bytes",
                code="request_too_large",
            )
        try:
            body = kind.model_validate_json(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            return error(
                400, f"{where}: {first['msg']}" if where else first["msg"], param=where or None
            )
        model_name = getattr(body, "model", None)
        if model_name is not None and model_name != name:
            return error(
                404,
                f"the model '{model_name}' does not exist; this server has '{name}'",
                code="model_not_found",
            )
        return body

    def outside_vocabulary(ids: list[int], where: str) -> JSONResponse | None:
        """A 400 for a token id outside the model's embedding (in a batch, it would fail
        every request in it)."""
        bad = next((t for t in ids if not 0 <= t < vocabulary), None)
        if bad is None:
            return None
        return error(
            400,
            f"{where}: token id {bad} is not in the model's vocabulary (0 to {vocabulary - 1})",
            param=where.split(".")[0],
        )

    # vLLM's tokenizer routes, at the root as there: lm-evaluation-harness's local-completions
    # finds them and tokenizes through the server, with no tokenizer of its own to name
    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        tok = request_tokenizer
        return {
            "tokenizer_class": type(tok).__name__,
            "eos_token": tok.eos_token,
            "bos_token": tok.bos_token,
            "pad_token": tok.pad_token,
            "unk_token": tok.unk_token,
            "model_max_length": positions,
            "chat_template": plain_jinja(tok.chat_template or ""),
        }

    @app.post("/tokenize", response_model=None)
    async def tokenize(request: Request) -> Any:
        body = await parsed(request, TokenizeRequest)
        if isinstance(body, Response):
            return body
        chat = body.messages is not None
        special = body.add_special_tokens if body.add_special_tokens is not None else not chat
        text = (
            request_tokenizer.apply_chat_template(
                [m.model_dump() for m in body.messages],
                tokenize=False,
                add_generation_prompt=body.add_generation_prompt,
            )
            if chat
            else body.prompt
        )
        ids = request_tokenizer(text, add_special_tokens=special)["input_ids"]
        strs = request_tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": positions, "tokens": ids, "token_strs": strs}

    @app.post("/detokenize", response_model=None)
    async def detokenize(request: Request) -> Any:
        body = await parsed(request, DetokenizeRequest)
        if isinstance(body, Response):
            return body
        if refused := outside_vocabulary(body.tokens, "tokens"):
            return refused
        return {"prompt": request_tokenizer.decode(body.tokens, skip_special_tokens=False)}

    async def answered(
        request: Request, kind: type[_SamplingFields]
    ) -> tuple[Any, list[Completion]] | Response:
        """A request's body and its completions, ``n`` per prompt (stops applied), or the
        error response: what chat and text completions do alike."""
        body = await parsed(request, kind)
        if isinstance(body, Response):
            return body
        max_tokens = body.wanted_max_tokens() or min(
            settings.default_max_tokens, settings.max_tokens_limit
        )
        if max_tokens > settings.max_tokens_limit:
            return error(
                400,
                f"max_tokens {max_tokens} is over this server's limit of "
                f"{settings.max_tokens_limit}",
                param="max_tokens",
            )
        prompts = body.prompts()
        field_name = "messages" if isinstance(body, ChatRequest) else "prompt"
        for i, prompt in enumerate(prompts):
            if is_token_ids(prompt) and (
                refused := outside_vocabulary(prompt, f"{field_name}.{i}")
            ):
                return refused
        for i, n_prompt in enumerate(count_prompt_tokens(request_tokenizer, prompts)):
            if n_prompt > prompt_limit:
                which = f"{field_name}.{i}: " if len(prompts) > 1 else ""
                return error(
                    400,
                    f"{which}the prompt has {n_prompt} tokens, over the limit of "
                    f"{prompt_limit}{why_limit}",
                    param=field_name,
                    code="context_length_exceeded",
                )
        if refused := refusal(body):
            return refused
        try:
            budget = Budget.from_extra(body.model_dump())
        except ValueError as exc:
            return error(400, str(exc), param="min_steps")
        if ended := loop_ended(request):  # else the job would wait for it forever
            return ended
        # n choices of each prompt, in OpenAI's order (prompt by prompt), each a row of its
        # own: the first keeps the request's seed, so n=1 draws what it drew before
        jobs = [
            _Job(body, prompt, choice_seed(body.seed, i), budget, max_tokens)
            for prompt in prompts
            for i in range(body.n)
        ]
        for job in jobs:
            await queue.put(job)
        done = await asyncio.gather(*(finished_or_left(job, request) for job in jobs))
        if any(d is None for d in done):
            # a client that left is not answered; its batch ended its rows (or never started
            # them), so a batch of such requests does not hold the next ones up to max_tokens
            for job in jobs:
                job.cancelled = True
            return Response(status_code=499)
        return body, [cut_at_stop(d, body.stop) for d in done if d is not None]

    def choice_seed(seed: int | None, i: int) -> int | None:
        return seed if seed is None or i == 0 else derived_seed(seed, "choice", i)

    def refusal(body: _SamplingFields) -> JSONResponse | None:
        """A 400 for a field this server would have to leave out (UNSUPPORTED_FIELDS)."""
        if body.asks_logprobs():
            # refused, not left out: a client reading choice.logprobs would get None
            return error(400, "logprobs are not supported by this server", param="logprobs")
        if getattr(body, "echo", False):
            return error(400, "echo is not supported by this server", param="echo")
        for given, value in (body.model_extra or {}).items():
            if given in UNSUPPORTED_FIELDS and value not in UNSUPPORTED_FIELDS[given]:
                unused = json.dumps(UNSUPPORTED_FIELDS[given][1])
                return error(
                    400,
                    f"{given} is not supported by this server; leave it out or give {unused}",
                    param=given,
                )
        return None

    def usage_of(outs: list[Completion], n: int) -> dict[str, Any]:
        # a prompt counts once for its n choices, as OpenAI and vLLM count it
        prompt = sum(o.prompt_tokens for o in outs[::n])
        completion = sum(o.completion_tokens for o in outs)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "completion_tokens_details": {
                "reasoning_tokens": sum(o.reasoning_tokens for o in outs)
            },
        }

    def chat_choice(i: int, out: Completion) -> dict[str, Any]:
        message = {"role": "assistant", "content": out.answer, "reasoning_content": out.reasoning}
        return {"index": i, "message": message, "finish_reason": out.finish_reason}

    def chat_chunks(i: int, out: Completion) -> Iterator[dict[str, Any]]:
        """A chat choice streamed as deltas: the role, the reasoning, the answer, the end."""
        role = {"role": "assistant", "content": ""}
        for fields in (role, {"reasoning_content": out.reasoning}, {"content": out.answer}):
            yield {"index": i, "delta": fields, "finish_reason": None}
        yield {"index": i, "delta": {}, "finish_reason": out.finish_reason}

    def text_choice(i: int, out: Completion) -> dict[str, Any]:
        return {"index": i, "text": out.text, "logprobs": None, "finish_reason": out.finish_reason}

    def text_chunks(i: int, out: Completion) -> Iterator[dict[str, Any]]:
        yield {"index": i, "text": out.text, "logprobs": None, "finish_reason": None}
        yield {"index": i, "text": "", "logprobs": None, "finish_reason": out.finish_reason}

    # a text completion's chunks are text_completion objects; chat's have their own
    chat_route = Route(
        request=ChatRequest,
        id_prefix="chatcmpl",
        object="chat.completion",
        chunk_object="chat.completion.chunk",
        choice=chat_choice,
        chunks=chat_chunks,
    )
    text_route = Route(
        request=CompletionRequest,
        id_prefix="cmpl",
        object="text_completion",
        chunk_object="text_completion",
        choice=text_choice,
        chunks=text_chunks,
    )

    async def reply(request: Request, route: Route) -> Any:
        """A route's answer: its choices, whole or streamed (a batch is generated as a whole,
        so the chunks come once it is done)."""
        result = await answered(request, route.request)
        if isinstance(result, Response):
            return result
        body, outs = result
        cid, created = f"{route.id_prefix}-{uuid.uuid4().hex[:24]}", int(time.time())
        usage = usage_of(outs, body.n)
        if body.stream:
            options = body.stream_options or StreamOptions()
            shown = usage if options.include_usage else None
            pieces = [c for i, out in enumerate(outs) for c in route.chunks(i, out)]
            return StreamingResponse(
                stream(cid, created, route.chunk_object, pieces, shown),
                media_type="text/event-stream",
            )
        return {
            "id": cid,
            "object": route.object,
            "created": created,
            "model": name,
            "choices": [route.choice(i, out) for i, out in enumerate(outs)],
            "usage": usage,
        }

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: Request) -> Any:
        return await reply(request, chat_route)

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Any:
        """OpenAI's text completions, as vLLM serves them: each prompt is continued as it is
        written, and a choice's text is all the model wrote, the reasoning with its format
        tokens and then the answer (a client that reads the answer alone takes what follows
        ``<|reasoning_end|>``, as the filter of ``examples/lm_eval``'s task does)."""
        return await reply(request, text_route)

    async def stream(
        cid: str, created: int, chunk_object: str, pieces: list[dict], usage: dict | None
    ) -> AsyncIterator[str]:
        """OpenAI's chunks, one per piece of a choice, the n choices one after another by
        their index. With ``stream_options.include_usage`` (``usage`` given), every chunk
        carries ``"usage": null`` and one more, with no choices, the usage; without it no
        chunk has a usage field, as OpenAI and vLLM stream."""

        def chunk(choices: list[dict], **extra: Any) -> str:
            data = {
                "id": cid,
                "object": chunk_object,
                "created": created,
                "model": name,
                "choices": choices,
                **({"usage": None} if usage is not None else {}),
                **extra,
            }
            return f"data: {json.dumps(data)}\n\n"

        for piece in pieces:
            yield chunk([piece])
        if usage is not None:
            yield chunk([], usage=usage)
        yield "data: [DONE]\n\n"

    return app


def check_address(host: str, port: int) -> None:
    """Bind once before the model loads, so a port in use or an unknown host is one error
    line at once (an OSError naming ``host:port``), not uvicorn's log line after the load."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind(address)
    except OSError as exc:  # socket.gaierror too
        raise OSError(exc.errno, exc.strerror, f"{host}:{port}") from None


def serve(settings: ServerSettings, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    uvicorn.run(create_app(settings), host=host, port=port, log_level="warning")
