"""``generate`` against an OpenAI-compatible server: `eval` and `scale` with ``--base-url``.

The server is ``steiner serve`` or ``vllm serve MODEL --logits-processors
steiner.infer.vllm_budget:StepBudgetVLLM`` (a cluster's GPUs, vLLM's speed). Each
conversation is one chat request, ``concurrency`` at a time; the step budget goes in
``vllm_xargs``, which both servers read, and ``skip_special_tokens: false`` keeps the format's
14 tokens in vLLM's text (``steiner serve`` always keeps them). A reply's text is
``reasoning_content`` (``steiner serve``, or vLLM with a reasoning parser) followed by
``content`` (vLLM without one: the whole text), parsed as a local completion is.
"""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from steiner.format import REASONING_END, reasoning_and_answer
from steiner.infer.budget import Budget
from steiner.infer.generate import Completion, completion_from_text, per_row
from steiner.io import InputError


@dataclass(frozen=True)
class Endpoint:
    base_url: str  # ``http://host:8000/v1``
    model: str  # the name the server serves the model under
    api_key: str = "none"
    concurrency: int = 16
    timeout_s: float = 600.0


def budget_xargs(budget: Budget | None) -> dict[str, Any]:
    """A budget as request fields, its nulls left out (vLLM takes none in ``vllm_xargs``);
    ``Budget()`` is ``min_steps: 0`` with the default ``extend_with``: the format rules alone,
    as locally."""
    fields = asdict(budget or Budget())
    return {k: v for k, v in fields.items() if v is not None}


def generate_remote(
    endpoint: Endpoint,
    conversations: Sequence[list[dict[str, str]]],
    budgets: Sequence[Budget | None] | None = None,
    max_new_tokens: int = 512,
    temperature: float | Sequence[float] = 0.0,
    top_p: float | Sequence[float] = 1.0,
    seed: int | None | Sequence[int | None] = None,
) -> list[Completion]:
    """``steiner.infer.generate.generate``'s completions, from the server: one request per
    conversation, each with its own temperature, top-p and seed as there. A server that
    cannot be reached, or refuses a request, is one InputError naming ``--base-url``."""
    import openai

    n = len(conversations)
    rows = list(
        zip(
            conversations,
            per_row(budgets, n),
            per_row(temperature, n),
            per_row(top_p, n),
            per_row(seed, n),
            strict=True,
        )
    )
    client = openai.OpenAI(
        base_url=endpoint.base_url,
        api_key=endpoint.api_key,
        max_retries=2,
        timeout=endpoint.timeout_s,
    )

    def ask(row: tuple) -> Completion:
        messages, budget, t, p, s = row
        reply = client.chat.completions.create(
            model=endpoint.model,
            messages=messages,
            max_tokens=max_new_tokens,
            temperature=t,
            top_p=p,
            seed=s,
            extra_body={"vllm_xargs": budget_xargs(budget), "skip_special_tokens": False},
        )
        return completion_of(reply, lambda text: count_tokens(endpoint, text))

    try:
        with cf.ThreadPoolExecutor(max(1, endpoint.concurrency)) as pool:
            return list(pool.map(ask, rows))
    except openai.APIStatusError as exc:
        # the server's own words: the openai client hands over the body's "error" object
        body = exc.body if isinstance(exc.body, dict) else {}
        body = body.get("error") if isinstance(body.get("error"), dict) else body
        message = body.get("message") or exc.message
        raise InputError(
            "--base-url", None, f"{endpoint.base_url} answered {exc.status_code}: {message}"
        ) from None
    except openai.APIConnectionError as exc:
        cause = exc.__cause__ or exc
        raise InputError("--base-url", None, f"cannot reach {endpoint.base_url}: {cause}") from None


def count_tokens(endpoint: Endpoint, text: str) -> int:
    """Tokens of ``text`` by the server's ``/tokenize`` (vLLM's route, ``steiner serve``'s
    too), for a reply whose usage does not count its reasoning tokens."""
    import httpx

    root = endpoint.base_url.rstrip("/").removesuffix("/v1")
    reply = httpx.post(
        f"{root}/tokenize",
        json={"model": endpoint.model, "prompt": text, "add_special_tokens": False},
        headers={"Authorization": f"Bearer {endpoint.api_key}"},
        timeout=endpoint.timeout_s,
    )
    reply.raise_for_status()
    return int(reply.json()["count"])


def completion_of(reply: Any, count: Any) -> Completion:
    """A chat reply as a local ``Completion``: its text parsed, its usage's counts."""
    choice = reply.choices[0]
    message = choice.message
    # steiner serve's field, and vLLM's under a reasoning parser (``reasoning`` in newer vLLM)
    reasoning = getattr(message, "reasoning_content", None) or getattr(message, "reasoning", None)
    content = message.content or ""
    text = f"{reasoning}{content}" if reasoning else content
    usage = reply.usage
    details = getattr(usage, "completion_tokens_details", None)
    n_reasoning = getattr(details, "reasoning_tokens", None)
    if n_reasoning is None:
        thought = reasoning_and_answer(text)[0]
        n_reasoning = count(thought) if REASONING_END in text else usage.completion_tokens
    return completion_from_text(
        text,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        reasoning_tokens=n_reasoning,
        finish_reason=choice.finish_reason or "stop",
    )
