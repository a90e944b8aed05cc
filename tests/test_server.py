"""`steiner serve` against the official openai client, on a loopback port."""

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import openai
import pytest
import uvicorn
from transformers import AutoTokenizer

from steiner.format import REASONING_END, REASONING_START, STEP_START
from steiner.infer.server import ServerSettings, create_app

BUDGET = {"min_steps": 2, "max_steps": 2, "max_step_tokens": 4}
LOOP_THREAD = "steiner-serve-loop"  # the server's event loop thread; batches run elsewhere


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(settings: ServerSettings) -> Iterator[str]:
    """A server on a free loopback port, in a thread; yields its base URL."""
    port = free_port()
    app = create_app(settings)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True, name=LOOP_THREAD)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    settings = ServerSettings(
        str(tiny_model_dir), model_name="tiny", max_tokens_limit=256, max_request_bytes=20_000
    )
    with running(settings) as url:
        yield url


def test_models_and_chat_fields(server):
    client = openai.OpenAI(base_url=server, api_key="none")
    assert [m.id for m in client.models.list().data] == ["tiny"]
    reply = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Reach 79."}],
        max_tokens=80,
        extra_body=BUDGET,
    )
    msg = reply.choices[0].message
    assert msg.reasoning_content.startswith(REASONING_START) and msg.reasoning_content.endswith(
        REASONING_END
    )
    assert msg.reasoning_content.count(STEP_START) == 2
    assert REASONING_START not in msg.content
    usage = reply.usage
    assert usage.completion_tokens >= usage.completion_tokens_details.reasoning_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_content_parts_and_the_developer_role_read_as_their_plain_forms(server):
    """What newer OpenAI clients send: content as a list of text parts, "developer" for
    "system". The reply must be the one the plain form gets (greedy)."""
    client = openai.OpenAI(base_url=server, api_key="none")

    def ask(messages: list[dict]):
        return client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=40, extra_body=BUDGET
        )

    plain = ask([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a\nb"}])
    parts = ask(
        [
            {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
        ]
    )
    assert parts.usage.prompt_tokens == plain.usage.prompt_tokens
    assert parts.choices[0].message.content == plain.choices[0].message.content
    assert parts.choices[0].message.reasoning_content == plain.choices[0].message.reasoning_content


def test_null_fields_read_as_not_given(server):
    """OpenAI's spec types temperature, top_p, n, stream and logprobs "or null" (null: the
    default), and clients built on it send nulls; they got a 400."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Reach 79."}]}
    body |= {"max_tokens": 24, **BUDGET}

    def ask(extra: dict) -> dict:
        r = httpx.post(f"{server}/chat/completions", json=body | extra, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()

    nulls = dict.fromkeys(("temperature", "top_p", "n", "stream", "logprobs", "seed", "stop"))
    given, plain = ask(nulls), ask({})
    assert given["choices"] == plain["choices"] and given["usage"] == plain["usage"]


def test_stop_sequences_end_the_answer_and_not_the_reasoning(server):
    """lm-evaluation-harness sends stop sequences with every request; they cut the answer
    (greedy, so the plain reply is the same text uncut)."""
    client = openai.OpenAI(base_url=server, api_key="none")

    def ask(stop=None, stream=False):
        return client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "Reach 79."}],
            max_tokens=80,
            extra_body=BUDGET,
            stop=stop,
            stream=stream,
        )

    plain = ask()
    content = plain.choices[0].message.content
    assert len(content) >= 8, content  # the tiny model's answer runs on to max_tokens
    stop = content[4:6]
    cut = ask(stop=["never in it", stop])
    assert cut.choices[0].message.content == content[: content.index(stop)]
    assert cut.choices[0].message.reasoning_content == plain.choices[0].message.reasoning_content
    assert cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < plain.usage.completion_tokens
    assert cut.usage.total_tokens == cut.usage.prompt_tokens + cut.usage.completion_tokens
    streamed = "".join(
        c.choices[0].delta.content or "" for c in ask(stop=stop, stream=True) if c.choices
    )
    assert streamed == content[: content.index(stop)]
    # a stop that only the reasoning holds leaves the reply whole
    whole = ask(stop=REASONING_START)
    assert whole.choices[0].message.content == content
    assert whole.choices[0].finish_reason == plain.choices[0].finish_reason


def test_streaming(server):
    client = openai.OpenAI(base_url=server, api_key="none")

    def chunks(**options) -> list:
        return list(
            client.chat.completions.create(
                model="tiny",
                messages=[{"role": "user", "content": "Reach 79."}],
                max_tokens=80,
                stream=True,
                extra_body=BUDGET,
                **options,
            )
        )

    counted = chunks(stream_options={"include_usage": True})
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", "") for c in counted[:-1])
    assert reasoning.startswith(REASONING_START) and reasoning.count(STEP_START) == 2
    # as OpenAI streams: the usage comes last, in a chunk of its own with no choices, and
    # every other chunk's usage is null (it came with the finish chunk, unasked, before)
    *rest, last = counted
    assert last.choices == [] and last.usage.completion_tokens_details.reasoning_tokens > 0
    assert all(c.usage is None and c.choices for c in rest)
    assert rest[-1].choices[0].finish_reason in ("stop", "length")
    plain = chunks()  # without stream_options: no usage at all
    assert [c.choices for c in plain] == [c.choices for c in rest]
    assert all(c.usage is None for c in plain)


def test_a_seeded_request_gets_one_answer_alone_or_batched(server):
    def request(content: str, **sampling) -> dict:
        return dict(
            model="tiny",
            messages=[{"role": "user", "content": content}],
            max_tokens=40,
            extra_body={"max_steps": 2, "max_step_tokens": 5},
            **sampling,
        )

    seeded = request("Reach 79.", temperature=1.0, seed=5)
    others = [
        request("Find a path.", temperature=1.0, seed=5),  # the same settings, another prompt
        request("Go."),  # greedy
        request("Why?", temperature=0.6, top_p=0.9, seed=9),
    ]

    async def run(bodies: list[dict]) -> list[str]:
        client = openai.AsyncOpenAI(base_url=server, api_key="none", max_retries=0)
        try:
            replies = await asyncio.gather(*(client.chat.completions.create(**b) for b in bodies))
        finally:
            await client.close()
        return [
            r.choices[0].message.reasoning_content + r.choices[0].message.content for r in replies
        ]

    [alone] = asyncio.run(run([seeded]))
    batched = asyncio.run(run([seeded, *others]))
    assert batched[0] == alone
    assert asyncio.run(run([seeded, seeded])) == [alone, alone]


def test_200_concurrent_requests_no_5xx(server):
    async def run() -> list:
        client = openai.AsyncOpenAI(base_url=server, api_key="none", max_retries=0, timeout=120)
        gate = asyncio.Semaphore(64)

        async def one(i: int):
            async with gate:
                return await client.chat.completions.create(
                    model="tiny",
                    messages=[{"role": "user", "content": f"Question {i}"}],
                    max_tokens=12 + i % 5,
                    extra_body={"max_steps": 1, "max_step_tokens": 3},
                )

        try:
            return await asyncio.gather(*(one(i) for i in range(200)))
        finally:
            await client.close()

    replies = asyncio.run(run())
    assert len(replies) == 200
    for i, r in enumerate(replies):
        assert r.usage.completion_tokens <= 12 + i % 5


def test_handlers_and_batches_never_share_a_tokenizer(tiny_model_dir, monkeypatch):
    """A fast tokenizer sets padding on its shared Rust object, then encodes: a handler's
    unpadded call on the loop thread, made while a batch padded its prompts on an executor
    thread, made that batch fail (a 500 for its requests, seen once in CI). Race-free means no
    tokenizer instance is encoded on both threads, whatever the timing."""
    from transformers import AutoTokenizer

    cls = type(AutoTokenizer.from_pretrained(tiny_model_dir))
    encode = cls._encode_plus
    threads_of: dict[int, set[str]] = {}

    def spied(self, *args, **kwargs):
        loop = threading.current_thread().name == LOOP_THREAD
        threads_of.setdefault(id(self), set()).add("loop" if loop else "batch")
        return encode(self, *args, **kwargs)

    monkeypatch.setattr(cls, "_encode_plus", spied)

    async def ask(url: str) -> list:
        client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)
        try:  # mixed max_tokens and stops: batch-side truncation and handler-side stop cuts
            return await asyncio.gather(
                *(
                    client.chat.completions.create(
                        model="tiny",
                        messages=[{"role": "user", "content": f"Question {i}"}],
                        max_tokens=8 + i % 4,
                        stop=["a", "e", " "],
                        extra_body={"max_steps": 1, "max_step_tokens": 3},
                    )
                    for i in range(16)
                )
            )
        finally:
            await client.close()

    with running(ServerSettings(str(tiny_model_dir), model_name="tiny")) as url:
        assert len(asyncio.run(ask(url))) == 16
    assert any(seen == {"loop"} for seen in threads_of.values())  # handlers were spied on
    assert any(seen == {"batch"} for seen in threads_of.values())  # so were batches
    assert all(len(seen) == 1 for seen in threads_of.values()), threads_of


@pytest.mark.parametrize(
    "body, status, needle",
    [
        (b"{not json", 400, "JSON"),
        (b'{"model": "tiny"}', 400, "messages"),
        (b'{"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}', 400, "role"),
        (
            b'{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url", '
            b'"image_url": {"url": "http://x/y.png"}}]}]}',
            400,
            "only text parts are supported",
        ),
        (
            b'{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", '
            b'"text": 5}]}]}',
            400,
            "'text' must be a string",
        ),
        (
            b'{"model": "other", "messages": [{"role": "user", "content": "x"}]}',
            404,
            "does not exist",
        ),
        (
            b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], '
            b'"stop": ["a", "b", "c", "d", "e"]}',
            400,
            "at most 4 items",
        ),
        (
            b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "stop": ""}',
            400,
            "a stop sequence must not be empty",
        ),
        (
            # a client reading choice.logprobs would otherwise get None, not an error
            b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "logprobs": true}',
            400,
            "logprobs are not supported",
        ),
        (
            b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], '
            b'"max_tokens": 100000}',
            400,
            "over this server's limit",
        ),
        (
            # past the model's 2048 positions, under the server's 8192-token prompt limit: was
            # a 200 with an empty completion
            b'{"model": "tiny", "messages": [{"role": "user", "content": "'
            + b"7 " * 2100
            + b'"}]}',
            400,
            "tokens, over the limit of 2047 (the model has 2048 positions)",
        ),
        (
            # pydantic's lax int read true as 1: a one-token answer, where OpenAI refuses it
            b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], '
            b'"max_tokens": true}',
            400,
            "max_tokens: Input should be a number, not a boolean",
        ),
        (
            b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "min_steps": 5, '
            b'"max_steps": 2}',
            400,
            "min_steps",
        ),
        (
            # over int64 (vLLM's range too): refused up front, not a failed batch for everyone
            b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], '
            b'"temperature": 0.5, "seed": 99999999999999999999}',
            400,
            "seed",
        ),
        (
            b'{"model": "tiny", "messages": [{"role": "user", "content": "'
            + b"x" * 30_000
            + b'"}]}',
            413,
            "over",
        ),
    ],
)
def test_bad_requests_get_openai_errors(server, body, status, needle):
    r = httpx.post(
        f"{server}/chat/completions",
        content=body,
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_probe_latency_against_serve(server, tmp_path):
    import json
    import subprocess
    import sys

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "steiner.cli",
            "probe-latency",
            "--base-url",
            server,
            "--model",
            "tiny",
            "--n",
            "8",
            "--max-tokens",
            "48",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in (tmp_path / "latency.jsonl").read_text().splitlines()]
    assert len(records) == 8 and all(
        r["seconds"] > 0 and r["completion_tokens"] > 0 for r in records
    )
    fit = json.loads((tmp_path / "latency.json").read_text())
    assert {"intercept_s", "seconds_per_token", "r2"} <= set(fit) and fit["n"] == 8
    assert (tmp_path / "latency.png").stat().st_size > 1000


def test_a_probe_whose_completions_all_have_one_length_fits_no_line(tmp_path):
    """One length has no slope; polyfit returned one anyway (1/3 of the mean seconds per
    token here) and it was reported as the fit. The requests are kept, no fit is written."""
    from steiner.evaluate.latency import save_probe
    from steiner.io import InputError

    records = [
        {"i": i, "prompt": "p", "max_tokens": 8, "seconds": 0.1 + 0.05 * i, "completion_tokens": 8}
        for i in range(3)
    ]
    with pytest.raises(InputError, match="all 3 completions have 8 tokens; a line needs"):
        save_probe(records, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latency.jsonl"]
    assert len((tmp_path / "latency.jsonl").read_text().splitlines()) == 3


@pytest.mark.parametrize("api_key", [None, "k3y"])
def test_a_client_that_leaves_ends_its_generation(tiny_model_dir, monkeypatch, api_key):
    # before: the batch ran the request on to its max_tokens (minutes here), and every
    # request after it waited for that; with an API key, a first version of its check
    # (Starlette's BaseHTTPMiddleware) hid the disconnect from the route again
    import steiner.infer.server as server_module

    finished = []

    def recording(*args, **kwargs):
        outs = real(*args, **kwargs)
        finished.extend(outs)
        return outs

    real = server_module.generate
    monkeypatch.setattr(server_module, "generate", recording)
    settings = ServerSettings(
        str(tiny_model_dir), model_name="tiny", max_tokens_limit=20_000, api_key=api_key
    )
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with running(settings) as url:
        # 5,000 steps cannot end before the 20,000 tokens run out
        long = {"min_steps": 5000, "max_step_tokens": 4}
        body = {"model": "tiny", "messages": [{"role": "user", "content": "Reach 79."}]}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                f"{url}/chat/completions",
                json={**body, "max_tokens": 20_000, **long},
                headers=headers,
                timeout=1.0,
            )
        deadline = time.time() + 60
        while not finished and time.time() < deadline:
            time.sleep(0.1)
        assert [c.finish_reason for c in finished] == ["cancelled"]
        assert 0 < finished[0].completion_tokens < 20_000
        # the next request is answered (and the server still runs)
        reply = httpx.post(
            f"{url}/chat/completions", json={**body, "max_tokens": 8}, headers=headers, timeout=60
        ).json()
        assert reply["usage"]["completion_tokens"] <= 8


def test_health_is_200_while_the_batch_loop_runs_and_503_after(tiny_model_dir):
    # vLLM's readiness route, which load balancers and Kubernetes probes poll; before, a 404
    from fastapi.testclient import TestClient

    app = create_app(ServerSettings(str(tiny_model_dir), model_name="m", max_tokens_limit=64))
    with TestClient(app) as client:
        up = client.get("/health")
        assert (up.status_code, up.content) == (200, b"")
        client.portal.call(app.state.batcher.cancel)
        while not client.portal.call(app.state.batcher.done):
            time.sleep(0.01)
        down = client.get("/health")
        assert down.status_code == 503
        assert down.json()["error"]["message"] == "the batch loop has ended"
        # a request is refused at once, where it waited for a loop that would never take it
        chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        refused = client.post("/v1/chat/completions", json=chat)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "503"


def test_fields_that_would_change_the_completion_are_refused_unless_at_their_default(server):
    # they were accepted and left out: a client asking for JSON, tool calls or a penalty got
    # a completion it had not asked for, with a 200
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4}
    for field, value, unused in (
        ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}], "[]"),
        ("response_format", {"type": "json_object"}, '{"type": "text"}'),
        ("logit_bias", {"5": 100}, "{}"),
        ("presence_penalty", 0.5, "0"),
        ("frequency_penalty", -1.0, "0"),
        ("top_k", 5, "0"),
        ("repetition_penalty", 1.2, "1"),
        ("skip_special_tokens", True, "false"),
    ):
        for stream in (False, True):
            reply = httpx.post(
                f"{server}/chat/completions", json=chat | {field: value, "stream": stream}
            )
            assert reply.status_code == 400, (field, reply.text)
            said = f"{field} is not supported by this server; leave it out or give {unused}"
            assert reply.json()["error"] == {
                "message": said,
                "type": "invalid_request_error",
                "param": field,
                "code": None,
            }
    # what clients send by default is accepted, and so is a field this list does not name
    defaults = {
        "tools": [],
        "response_format": {"type": "text"},
        "logit_bias": {},
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "top_k": -1,
        "repetition_penalty": 1.0,
        "skip_special_tokens": False,  # what a client written for vLLM sends for the format
        "user": "me",
    }
    assert httpx.post(f"{server}/chat/completions", json=chat | defaults).status_code == 200


def test_text_completions_continue_each_prompt_as_written(server, tiny_tokenizer, tiny_model_dir):
    """/v1/completions, for clients that apply the chat template themselves (lm-evaluation-
    harness's local-completions): the chat's own prompt, written out, gets the chat's reply
    as one text (greedy); a list of prompts gets a choice each. Before: 404."""
    client = openai.OpenAI(base_url=server, api_key="none")
    chat = [{"role": "user", "content": "Reach 79."}]
    written = tiny_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    other = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Go."}], tokenize=False, add_generation_prompt=True
    )
    reply = client.chat.completions.create(
        model="tiny", messages=chat, max_tokens=60, extra_body=BUDGET
    )
    text = client.completions.create(
        model="tiny", prompt=[written, other], max_tokens=60, extra_body=BUDGET
    )
    assert text.object == "text_completion" and [c.index for c in text.choices] == [0, 1]
    message = reply.choices[0].message
    first = text.choices[0].text
    assert first.startswith(message.reasoning_content) and first.endswith(message.content)
    assert first.count(STEP_START) == 2 and text.choices[1].text.count(STEP_START) == 2
    assert text.choices[0].finish_reason == reply.choices[0].finish_reason
    alone = client.completions.create(model="tiny", prompt=other, max_tokens=60, extra_body=BUDGET)
    assert alone.choices[0].text == text.choices[1].text
    # token ids, as lm-eval sends the prompts it templated, one or a list of them
    served = AutoTokenizer.from_pretrained(tiny_model_dir)  # a qwen2 config: Qwen's digit rule
    ids = served(other, add_special_tokens=False)["input_ids"]
    for prompt in (ids, [ids, ids]):
        by_ids = client.completions.create(
            model="tiny", prompt=prompt, max_tokens=60, extra_body=BUDGET
        )
        assert all(c.text == alone.choices[0].text for c in by_ids.choices)
        assert by_ids.usage.prompt_tokens == len(by_ids.choices) * len(ids)
    assert text.usage.prompt_tokens == reply.usage.prompt_tokens + alone.usage.prompt_tokens
    assert text.usage.total_tokens == text.usage.prompt_tokens + text.usage.completion_tokens
    # stops cut the answer, as in chat; streamed, the text is the same
    stop = message.content[2:4]
    cut = client.completions.create(
        model="tiny", prompt=written, max_tokens=60, extra_body=BUDGET, stop=[stop]
    ).choices[0]
    assert cut.text == first[: first.rindex(message.content) + message.content.index(stop)]
    assert cut.finish_reason == "stop"
    chunks = list(
        client.completions.create(
            model="tiny", prompt=written, max_tokens=60, extra_body=BUDGET, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks if c.choices) == first
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    # what lm-evaluation-harness sends by default is accepted: echo false, logprobs null
    ok = httpx.post(
        f"{server}/completions",
        json={"model": "tiny", "prompt": "x", "max_tokens": 4, "echo": False, "logprobs": None},
        timeout=60,
    )
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"], ok.text


@pytest.mark.parametrize(
    "body, needle",
    [
        (b'{"model": "tiny"}', "prompt"),
        (b'{"model": "tiny", "prompt": []}', "prompt"),
        (b'{"model": "tiny", "prompt": [1, 99999]}', "prompt.0: token id 99999 is not in"),
        (b'{"model": "tiny", "prompt": [[1], [-1]]}', "prompt.1: token id -1 is not in"),
        (b'{"model": "tiny", "prompt": ["x", ""]}', "a prompt must not be empty"),
        (b'{"model": "tiny", "prompt": [[1], []]}', "a prompt must not be empty"),
        (b'{"model": "tiny", "prompt": [true, 1]}', "expected a string, a list of strings"),
        (b'{"model": "tiny", "prompt": "x", "logprobs": 0}', "logprobs are not supported"),
        (b'{"model": "tiny", "prompt": "x", "echo": true}', "echo is not supported"),
        (b'{"model": "tiny", "prompt": "x", "best_of": 2}', "best_of is not supported"),
        (b'{"model": "tiny", "prompt": "x", "suffix": "y"}', "suffix is not supported"),
        (
            b'{"model": "tiny", "prompt": ["x", "' + b"7 " * 2100 + b'"]}',
            "prompt.1: the prompt has",
        ),
    ],
)
def test_bad_text_completion_requests_get_openai_errors(server, body, needle):
    r = httpx.post(
        f"{server}/completions",
        content=body,
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"]


def test_n_choices_per_prompt(server, tiny_tokenizer):
    """``n`` (OpenAI's 1 to 128): the choices of a seeded request are each seeded, the first
    with the request's seed; a prompt's tokens count once. Before: n over 1 was a 400."""
    client = openai.OpenAI(base_url=server, api_key="none")
    chat = [{"role": "user", "content": "Reach 79."}]
    sampled = dict(model="tiny", max_tokens=30, temperature=1.0, seed=5, extra_body=BUDGET)
    one = client.chat.completions.create(messages=chat, **sampled)
    three = client.chat.completions.create(messages=chat, n=3, **sampled)
    assert [c.index for c in three.choices] == [0, 1, 2]
    said = [c.message.reasoning_content + c.message.content for c in three.choices]
    assert said[0] == one.choices[0].message.reasoning_content + one.choices[0].message.content
    assert len(set(said)) > 1  # three draws, not one three times
    assert three.usage.prompt_tokens == one.usage.prompt_tokens
    assert client.chat.completions.create(messages=chat, n=3, **sampled).choices == three.choices
    streamed = ["", "", ""]
    for chunk in client.chat.completions.create(messages=chat, n=3, stream=True, **sampled):
        for c in chunk.choices:
            streamed[c.index] += (getattr(c.delta, "reasoning_content", None) or "") + (
                c.delta.content or ""
            )
    assert streamed == said
    # text completions: the choices of each prompt in turn
    prompts = [
        tiny_tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q in ("Reach 79.", "Go.")
    ]
    texts = client.completions.create(prompt=prompts, n=2, **sampled)
    assert [c.index for c in texts.choices] == [0, 1, 2, 3]
    alone = [client.completions.create(prompt=p, n=2, **sampled).choices for p in prompts]
    assert [c.text for c in texts.choices] == [c.text for pair in alone for c in pair]
    assert texts.choices[0].text == said[0] and texts.choices[1].text == said[1]
    too_many = httpx.post(
        f"{server}/chat/completions", json={"model": "tiny", "messages": chat, "n": 129}
    )
    assert too_many.status_code == 400 and "n:" in too_many.json()["error"]["message"]


def test_the_budget_in_vllm_xargs_as_vllm_serve_takes_it(server):
    """A client written for `vllm serve --logits-processors ...StepBudgetVLLM` sends the budget
    in vllm_xargs; here it was an unknown field, accepted and unused: no budget at all."""
    client = openai.OpenAI(base_url=server, api_key="none")
    chat = [{"role": "user", "content": "Reach 79."}]
    for steps in (1, 3):
        budget = {"min_steps": steps, "max_steps": steps, "max_step_tokens": 4}
        as_vllm = client.chat.completions.create(
            model="tiny", messages=chat, max_tokens=80, extra_body={"vllm_xargs": budget}
        )
        top_level = client.chat.completions.create(
            model="tiny", messages=chat, max_tokens=80, extra_body=budget
        )
        assert as_vllm.choices[0].message == top_level.choices[0].message
        assert as_vllm.choices[0].message.reasoning_content.count(STEP_START) == steps
    for xargs, needle in (
        ({"vllm_xargs": {"min_steps": 5, "max_steps": 2}}, "min_steps"),
        ({"vllm_xargs": {"max_steps": 2}, "max_steps": 3}, "max_steps is given twice"),
        ({"vllm_xargs": [1]}, "vllm_xargs: expected an object"),
    ):
        r = httpx.post(
            f"{server}/chat/completions", json={"model": "tiny", "messages": chat, **xargs}
        )
        assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text
    # keys no budget reads are left, as vLLM leaves those its processors do not read
    other = httpx.post(
        f"{server}/completions",
        json={"model": "tiny", "prompt": "x", "max_tokens": 4, "vllm_xargs": {"other": 1}},
    )
    assert other.status_code == 200, other.text


def test_tokenizer_routes_as_vllm_serves_them(server, tiny_model_dir):
    """/tokenizer_info, /tokenize and /detokenize at the root, as vLLM has them (404 before):
    lm-evaluation-harness's local-completions finds them and needs no tokenizer of its own."""
    import jinja2

    # the served tokenizer, as loaded from the model directory: a qwen2 config loads it with
    # Qwen's digit rule, so it is not the fixture's object token for token
    tiny_tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)

    root = server.removesuffix("/v1")
    chat = [{"role": "user", "content": "Reach 79."}]
    written = tiny_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    info = httpx.get(f"{root}/tokenizer_info").json()
    assert info["eos_token"] == tiny_tokenizer.eos_token and info["model_max_length"] == 2048
    # rendered with plain Jinja, as that client does: transformers' generation tag is gone
    assert "{%- generation %}" in tiny_tokenizer.chat_template
    assert "{%- generation %}" not in info["chat_template"]
    plain = jinja2.Environment(undefined=jinja2.StrictUndefined).from_string(info["chat_template"])
    assert plain.render(messages=chat, add_generation_prompt=True) == written
    ids = tiny_tokenizer(written, add_special_tokens=False)["input_ids"]
    as_text = httpx.post(f"{root}/tokenize", json={"prompt": written, "add_special_tokens": False})
    as_chat = httpx.post(f"{root}/tokenize", json={"model": "tiny", "messages": chat})
    # a chat in "prompt", as lm-eval's remote tokenizer sends it
    as_lm_eval = httpx.post(f"{root}/tokenize", json={"prompt": chat, "add_special_tokens": False})
    for r in (as_text, as_chat, as_lm_eval):
        assert r.json() == {
            "count": len(ids),
            "max_model_len": 2048,
            "tokens": ids,
            "token_strs": None,
        }
    strs = httpx.post(f"{root}/tokenize", json={"prompt": "ab", "return_token_strs": True}).json()
    assert strs["token_strs"] == tiny_tokenizer.convert_ids_to_tokens(strs["tokens"])
    back = httpx.post(f"{root}/detokenize", json={"model": "tiny", "tokens": ids}).json()
    assert back == {"prompt": written}
    for route, body, status, needle in (
        ("tokenize", {"prompt": "a", "messages": chat}, 400, "one of 'prompt' or 'messages'"),
        ("tokenize", {}, 400, "one of 'prompt' or 'messages'"),
        ("tokenize", {"model": "other", "prompt": "a"}, 404, "does not exist"),
        ("detokenize", {"tokens": [1, 99999]}, 400, "tokens: token id 99999 is not in"),
        ("detokenize", {"tokens": ["a"]}, 400, "tokens.0"),
    ):
        r = httpx.post(f"{root}/{route}", json=body)
        assert r.status_code == status and needle in r.json()["error"]["message"], r.text


def test_eval_and_scale_against_a_server_match_the_local_model(server, tiny_model_dir, tmp_path):
    """`eval --base-url` (and `scale`) asks a served model, as a cluster's vLLM would serve it:
    the same answers, steps and token counts as the local model gives, greedy and sampled
    (each row's seed is the one a local batch gives it). Before: --model had to be a local
    directory, so a GPU server could not be evaluated with these commands."""
    import json
    import subprocess
    import sys

    problems = tmp_path / "p.jsonl"
    problems.write_text(
        "".join(
            json.dumps({"id": f"p{i}", "nums": [3, 4, i + 1], "target": 8 + i}) + "\n"
            for i in range(5)
        )
    )
    common = ["--problems", str(problems), "--max-new-tokens", "40", "--max-steps", "2",
              "--samples", "2", "--batch-size", "3"]  # fmt: skip

    def eval_(*model: str, out: str) -> dict:
        proc = subprocess.run(
            [sys.executable, "-m", "steiner.cli", "eval", *model, *common, "--out", out],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr
        lines = (tmp_path / out / "outputs.jsonl").read_text().splitlines()
        return {rec["id"]: rec for rec in map(json.loads, lines)}

    local = eval_("--model", str(tiny_model_dir), out=str(tmp_path / "local"))
    served = eval_("--model", "tiny", "--base-url", server, out=str(tmp_path / "served"))
    kept = ("answer", "correct", "n_steps", "n_backtracks", "reasoning_tokens",
            "completion_tokens", "finish_reason", "trace")  # fmt: skip
    for pid, rec in local.items():
        for mine, theirs in zip(
            rec["outputs"] + rec["samples"],
            served[pid]["outputs"] + served[pid]["samples"],
            strict=True,
        ):
            assert {k: mine[k] for k in kept} == {k: theirs[k] for k in kept}, pid
    settings = json.loads((tmp_path / "served" / "eval_settings.json").read_text())
    assert settings["model"] == "tiny" and settings["base_url"] == server
    # a YAML recipe may name both: the served name is not checked as a directory
    (tmp_path / "remote.yaml").write_text(f"model: tiny\nbase_url: {server}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "steiner.cli", "scale", "--config", str(tmp_path / "remote.yaml"),
         "--problems", str(problems), "--out", str(tmp_path / "scale"), "--budgets", "1,2",
         "--mode", "cap", "--max-new-tokens", "40", "--limit", "3"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((tmp_path / "scale" / "scale.json").read_text())["rows"]
    assert [r["budget"] for r in rows] == [1, 2] and all(r["control"] == 1.0 for r in rows)
    # a server that is not there: one line naming it
    gone = subprocess.run(
        [sys.executable, "-m", "steiner.cli", "eval", "--model", "tiny", "--base-url",
         f"http://127.0.0.1:{free_port()}/v1", *common, "--out", str(tmp_path / "gone")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert gone.returncode == 2 and len(gone.stderr.splitlines()) == 1, gone.stderr
    assert "--base-url: cannot reach" in gone.stderr
    wrong = subprocess.run(
        [sys.executable, "-m", "steiner.cli", "eval", "--model", "other", "--base-url", server,
         *common, "--out", str(tmp_path / "wrong")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert wrong.returncode == 2 and "answered 404: the model 'other' does not exist" in (
        wrong.stderr
    )


def test_a_reply_without_a_reasoning_field_or_count_reads_as_a_local_completion():
    """vLLM without a reasoning parser puts the whole text in content and does not count the
    reasoning's tokens; they are counted by the server's /tokenize instead."""
    from types import SimpleNamespace as NS

    from steiner.infer.budget import Budget
    from steiner.infer.remote import budget_xargs, completion_of

    reasoning = f"{REASONING_START}{STEP_START} a{REASONING_END}"
    reply = NS(
        choices=[NS(message=NS(content=reasoning + "\n42", reasoning_content=None),
                    finish_reason="stop")],
        usage=NS(prompt_tokens=7, completion_tokens=9, completion_tokens_details=None),
    )  # fmt: skip
    counted = []
    out = completion_of(reply, lambda text: counted.append(text) or 5)
    assert (out.answer, out.reasoning, out.reasoning_tokens, counted) == (
        "42",
        reasoning,
        5,
        [reasoning],
    )
    assert (out.prompt_tokens, out.completion_tokens, out.finish_reason) == (7, 9, "stop")
    # vLLM takes no null in vllm_xargs; Budget() is the format rules alone
    assert budget_xargs(None) == {"min_steps": 0, "extend_with": "model"}
    assert budget_xargs(Budget(max_steps=2)) == {
        "min_steps": 0,
        "max_steps": 2,
        "extend_with": "model",
    }


def test_an_api_key_guards_the_v1_routes(tiny_model_dir):
    """`serve --api-key` (or STEINER_API_KEY), as `vllm serve --api-key`: a server bound
    beyond loopback answered anyone before."""
    settings = ServerSettings(str(tiny_model_dir), model_name="tiny", api_key="s3cret")
    with running(settings) as url:
        chat = dict(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=4)
        keyed = openai.OpenAI(base_url=url, api_key="s3cret", max_retries=0)
        assert keyed.chat.completions.create(**chat).choices[0].finish_reason
        assert [m.id for m in keyed.models.list().data] == ["tiny"]
        for key in ("wrong", "s3cre"):
            with pytest.raises(openai.AuthenticationError) as caught:
                openai.OpenAI(base_url=url, api_key=key, max_retries=0).chat.completions.create(
                    **chat
                )
            assert caught.value.status_code == 401
        bare = httpx.post(f"{url}/completions", json={"model": "tiny", "prompt": "x"})
        assert bare.status_code == 401 and bare.json()["error"]["code"] == "invalid_api_key"
        # the probes of load balancers and tokenizer clients stay open, as in vLLM
        root = url.removesuffix("/v1")
        assert httpx.get(f"{root}/health").status_code == 200
        assert httpx.post(f"{root}/tokenize", json={"prompt": "x"}).status_code == 200


def test_serve_takes_its_api_key_from_the_environment(tiny_model_dir, wait_for_server):
    import os
    import subprocess
    import sys

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "steiner.cli", "serve", "--model", str(tiny_model_dir),
         "--port", str(port)],
        env={**os.environ, "STEINER_API_KEY": "k3y"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_server(f"http://127.0.0.1:{port}/health")
        models = f"http://127.0.0.1:{port}/v1/models"
        assert httpx.get(models).status_code == 401
        assert httpx.get(models, headers={"Authorization": "Bearer k3y"}).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)
