"""Teachers continue a truncated solution (answer hidden), then judge the continuation
(answer revealed). Two kinds share one interface: the offline ``oracle`` for domains with a
solver, and ``openai`` for any OpenAI-compatible chat endpoint."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from steiner.domains.base import ALIVE, ANSWER, DEAD, Domain
from steiner.io import InputError, check_http_url, write_lines

STATUSES = (ALIVE, DEAD, ANSWER)


@dataclass
class Job:
    """Continue ``problem`` after the shortcut steps in ``prefix``; ``seed`` names the attempt."""

    problem: dict[str, Any]
    prefix: list[str]
    seed: int


@dataclass
class StepOut:
    """One judged step of a continuation."""

    text: str
    state: Any
    status: str
    content: dict[str, str] = field(default_factory=dict)


class Teacher(Protocol):
    faults: Counter[str]

    def continue_all(self, jobs: list[Job]) -> list[list[StepOut] | None]:
        """One judged continuation per job (None: the teacher failed; counted in faults)."""


def prefix_state(domain: Domain, job: Job) -> Any:
    state = domain.start_state(job.problem)
    for text in job.prefix:
        state = domain.apply_step(job.problem, state, text)
        if state is None:
            raise ValueError(f"problem {job.problem['id']}: invalid shortcut step {text!r}")
    return state


class OracleTeacher:
    """Offline teacher for domains with a solver: a noisy forward policy, exact judging."""

    def __init__(self, domain: Domain, max_forward: int = 8):
        self.domain = domain
        self.max_forward = max_forward
        self.faults: Counter[str] = Counter()
        self.requests = 0

    def continue_all(self, jobs: list[Job]) -> list[list[StepOut] | None]:
        return [self.continue_one(job) for job in jobs]

    def continue_one(self, job: Job) -> list[StepOut]:
        domain, problem = self.domain, job.problem
        rng = random.Random(job.seed)
        state = prefix_state(domain, job)
        # 1. answer hidden: propose forward steps
        proposed: list[tuple[str, Any, Any]] = []
        for _ in range(self.max_forward):
            text = domain.propose_step(problem, state, rng)
            if text is None:
                break
            after = domain.apply_step(problem, state, text)
            proposed.append((text, state, after))
            state = after
            if domain.label(problem, state) != ALIVE:
                break  # the answer, or a dead end (judged below)
        # 2. answer revealed: label each new state and write the step
        out: list[StepOut] = []
        for text, before, after in proposed:
            status = domain.label(problem, after)
            content = domain.write_step(problem, before, text, after, status)
            out.append(StepOut(text, after, status, content))
        return out


PROPOSE_PROMPT = """You are solving a problem step by step. Do not give the final answer.

Problem:
{question}

Steps so far:
{prefix}

Write the next {k} step(s) or fewer. Reply with JSON only:
{{"steps": [{{"name": "short title", "thought": "the step itself",
             "summary": "the state after it"}}]}}"""

JUDGE_PROMPT = """A student is solving this problem.

Problem:
{question}

The correct final answer is: {answer}

Steps before the new ones:
{prefix}

New steps:
{steps}

For each new step, in order, say whether the reasoning after it can still reach the correct
answer ("alive"), cannot ("dead"), or has reached it ("answer"), and write a one-sentence
reflection (keep going, or go back to the last good state). Reply with JSON only:
{{"steps": [{{"status": "alive|dead|answer", "reflection": "..."}}]}}"""


def _numbered(lines: list[str]) -> str:
    return "\n".join(f"{i + 1}. {t}" for i, t in enumerate(lines)) or "(none)"


class Malformed(ValueError):
    pass


class _Fault(Exception):
    def __init__(self, kind: str, detail: str | None = None):
        super().__init__(kind)
        self.kind, self.detail = kind, detail


# a reasoning model served without a reasoning parser (vLLM without --reasoning-parser, Ollama,
# llama.cpp: Qwen3, DeepSeek-R1, QwQ) writes its thinking into the content, before the reply
THINKING = re.compile(r"\A\s*<think>.*?</think>", re.DOTALL)


def _json_steps(text: str) -> list[Any]:
    """Strict: the reply must be one JSON object with a "steps" list (a ```json fence
    around it is tolerated, and so is a reasoning model's ``<think>...</think>`` before it;
    thinking cut off before its end is malformed)."""
    body = THINKING.sub("", text, count=1).strip()
    if body.startswith("```"):
        body = body.strip("`").removeprefix("json").strip()
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as exc:
        raise Malformed(f"not JSON: {exc.msg}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("steps"), list):
        raise Malformed('expected an object with a "steps" list')
    return obj["steps"]


class ResponseCache:
    """On-disk cache of chat replies keyed by the request: a re-run makes no calls.

    Failures (timeouts, 5xx) are cached too, so a re-run reproduces the same files; set
    ``retry_failed`` to ask again."""

    def __init__(self, directory: str | os.PathLike, retry_failed: bool = False):
        self.dir = Path(directory)
        self.retry_failed = retry_failed

    @staticmethod
    def key(request: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        path = self._path(key)
        if not path.exists():
            return None
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            entry = None
        # entries are written atomically, so a bad one is disk damage or a hand edit: asking
        # again in its place would quietly change a run that the cache should reproduce
        ok = entry.get("ok") if isinstance(entry, dict) else None
        if not isinstance(ok, bool) or not isinstance(entry.get("content" if ok else "fault"), str):
            raise InputError(
                path,
                None,
                'corrupt teacher-cache entry; expected {"ok": true, "content": ...} or '
                '{"ok": false, "fault": ...}; delete it to ask the teacher again',
            )
        if not ok and self.retry_failed:
            return None
        return entry

    def put(self, key: str, entry: dict[str, Any]) -> None:
        write_lines(self._path(key), [json.dumps(entry)])


@dataclass
class OpenAISettings:
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "default"
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 8
    timeout: float = 60.0
    max_retries: int = 3  # the openai client retries timeouts and 5xx with exponential backoff
    temperature: float = 0.7
    cache_dir: str | None = None
    retry_failed: bool = False

    def check(self) -> None:
        """Settings no request could succeed with are one error line before any request (they
        came back as a fault per call, a timeout fault cached, blaming --base-url)."""
        check_http_url(self.base_url, "--base-url")
        if not self.timeout > 0:
            raise InputError("--timeout", None, f"expected > 0 seconds, got {self.timeout}")
        if not 0 <= self.temperature <= 2:  # the OpenAI API's range
            raise InputError("--temperature", None, f"expected 0 to 2, got {self.temperature}")


# faults that say the request never reached a model (no server, a wrong key, model or path):
# not cached, so a re-run once the teacher is set up asks again
UNREACHED = frozenset({"connection", "http_401", "http_403", "http_404"})


class OpenAITeacher:
    """The same two calls as prompts to an OpenAI-compatible chat endpoint."""

    def __init__(
        self,
        domain: Domain,
        settings: OpenAISettings,
        cache_dir: str | os.PathLike,
        max_forward: int,  # SynthConfig.max_forward: no default here that could drift from it
    ):
        self.domain = domain
        self.settings = settings
        self.max_forward = max_forward
        self.cache = ResponseCache(settings.cache_dir or cache_dir, settings.retry_failed)
        self.faults: Counter[str] = Counter()
        # one message per fault kind (the server's error, what was malformed), for the user
        # to see why: a count of 12 "http_400" or "malformed" says nothing of the cause
        self.fault_examples: dict[str, str] = {}
        self.requests = 0
        self.replies = 0  # calls answered (made or cached), whatever the reply said

    def continue_all(self, jobs: list[Job]) -> list[list[StepOut] | None]:
        return asyncio.run(self._continue_all(jobs))

    async def _continue_all(self, jobs: list[Job]) -> list[list[StepOut] | None]:
        from openai import AsyncOpenAI

        s = self.settings
        client = AsyncOpenAI(
            base_url=s.base_url,
            api_key=os.environ.get(s.api_key_env) or "none",
            timeout=s.timeout,
            max_retries=s.max_retries,
        )
        gate = asyncio.Semaphore(s.concurrency)
        try:
            return list(await asyncio.gather(*(self._continue(client, gate, j) for j in jobs)))
        finally:
            await client.close()

    async def _chat(self, client: Any, gate: asyncio.Semaphore, prompt: str, seed: int) -> str:
        import openai

        request = {
            "model": self.settings.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": self.settings.temperature,
            "seed": seed,
        }
        key = self.cache.key(request)
        entry = self.cache.get(key)
        if entry is None:
            async with gate:
                self.requests += 1
                try:
                    reply = await client.chat.completions.create(**request)
                    entry = {"ok": True, "content": reply.choices[0].message.content or ""}
                except openai.APITimeoutError:
                    wait = f"no reply within {self.settings.timeout:g} s (--timeout)"
                    entry = {"ok": False, "fault": "timeout", "detail": wait}
                except openai.APIStatusError as exc:
                    body = exc.body if isinstance(exc.body, dict) else {}
                    detail = body.get("message") if isinstance(body.get("message"), str) else None
                    entry = {"ok": False, "fault": f"http_{exc.status_code}"}
                    entry |= {"detail": detail or exc.message}
                except openai.APIConnectionError as exc:
                    # the client's own message is "Connection error."; its cause says which
                    why = str(exc.__cause__ or exc)
                    entry = {"ok": False, "fault": "connection", "detail": why}
                except (IndexError, AttributeError, TypeError):
                    entry = {"ok": True, "content": ""}  # a 200 with an odd body: malformed
            if entry.get("fault") not in UNREACHED:
                self.cache.put(key, entry)
        if not entry["ok"]:
            detail = entry.get("detail")  # entries from before details were kept have none
            raise _Fault(entry["fault"], detail if isinstance(detail, str) else None)
        self.replies += 1
        return entry["content"]

    async def _continue(
        self, client: Any, gate: asyncio.Semaphore, job: Job
    ) -> list[StepOut] | None:
        domain, problem, k = self.domain, job.problem, self.max_forward
        try:
            state = prefix_state(domain, job)
            prompt = PROPOSE_PROMPT.format(
                question=problem["question"], prefix=_numbered(job.prefix), k=k
            )
            proposed = _json_steps(await self._chat(client, gate, prompt, job.seed))[:k]
            steps: list[tuple[dict[str, str], Any]] = []
            for item in proposed:
                if not isinstance(item, dict) or not isinstance(item.get("thought"), str):
                    raise Malformed("each step needs a string 'thought'")
                after = domain.apply_step(problem, state, item["thought"])
                if after is None:
                    self.fault("invalid_step", f"the step {item['thought']!r} does not apply")
                    break
                fields = ("name", "thought", "summary")
                steps.append(({f: str(item.get(f, "")) for f in fields}, after))
                state = after
            if not steps:
                return []
            prompt = JUDGE_PROMPT.format(
                question=problem["question"],
                answer=problem["answer"],
                prefix=_numbered(job.prefix),
                steps=_numbered([content["thought"] for content, _ in steps]),
            )
            judged = _json_steps(await self._chat(client, gate, prompt, job.seed))
            if len(judged) != len(steps):
                raise Malformed("the judge must label every new step")
            out: list[StepOut] = []
            for (content, after), verdict in zip(steps, judged, strict=True):
                status = verdict.get("status") if isinstance(verdict, dict) else None
                if status not in STATUSES:
                    raise Malformed(f"unknown status {status!r}")
                status = (
                    domain.label(problem, after) or status
                )  # a solver, where there is one, wins
                content = {**content, "reflection": str(verdict.get("reflection", ""))}
                out.append(StepOut(content["thought"], after, status, content))
                if status != ALIVE:
                    break
            return out
        except Malformed as exc:
            self.fault("malformed", str(exc))
        except _Fault as fault:
            self.fault(fault.kind, fault.detail)
        return None

    def fault(self, kind: str, detail: str | None) -> None:
        """Count a fault and keep an example message of its kind: the least one, so that the
        example does not depend on which of the concurrent calls failed first."""
        self.faults[kind] += 1
        if detail:
            detail = " ".join(detail.split())[:300]
            self.fault_examples[kind] = min(self.fault_examples.get(kind, detail), detail)
