"""Pairwise judges beyond the world's gold judge: a reward model, and an LLM behind any
OpenAI-compatible endpoint (vLLM, llama.cpp's server, Ollama, OpenAI ...).

Every judge has the ``PairJudge`` signature of ``winrate.py``: (prompts, first responses, second
responses) -> preference for the first in [0, 1]. ``win_rate`` asks for each pair in both orders
and averages, so a judge must show the pair in the order it is given (no swapping of its own).
The gold judge is ``winrate.gold_pair_judge``.
"""

from __future__ import annotations

import os
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from rlhfkit.data.records import Messages, Prompt
from rlhfkit.errors import RlhfkitError
from rlhfkit.eval.winrate import PairJudge


# --- reward model -----------------------------------------------------------------------------


def reward_model_judge(rm, margin: float = 0.0, batch_size: int = 16) -> PairJudge:
    """The higher reward wins; rewards within ``margin`` of each other tie.

    ``rm`` is a ``reward.RewardModel`` (anything with ``score(prompts, responses, batch_size)``).
    A reward model has no position bias, so both orders give mirror verdicts; scores are
    remembered per (prompt, response) so the second order costs no forward passes.
    """
    cache: dict[tuple[Messages, str], float] = {}

    def judge(prompts: list[Prompt], first: list[str], second: list[str]) -> list[float]:
        todo = list(dict.fromkeys((p.messages, r) for p, r in zip(prompts + prompts, first + second)
                                  if (p.messages, r) not in cache))
        if todo:
            scores = rm.score([m for m, _ in todo], [r for _, r in todo], batch_size=batch_size)
            cache.update(zip(todo, scores))
        out = []
        for p, a, b in zip(prompts, first, second):
            diff = cache[(p.messages, a)] - cache[(p.messages, b)]
            out.append(0.5 if abs(diff) <= margin else float(diff > 0))
        return out

    return judge


# --- LLM judge --------------------------------------------------------------------------------

SYSTEM_PROMPT = (
    "You are an impartial judge of AI assistant responses. You will see a conversation between a "
    "user and an assistant, then two candidate responses for the assistant's next turn, labelled "
    "Response A and Response B. Decide which response is better: more helpful, correct and honest, "
    "harmless, and following the user's instructions (including any requested format or length). "
    "The order in which the responses are shown and their length must not influence you. "
    "Answer with exactly one word: A, B or tie."
)


def judge_messages(prompt: Messages, first: str, second: str) -> list[dict]:
    """The chat request for one verdict: the conversation, Response A (first), Response B."""
    conversation = "\n\n".join(f"{m.role.capitalize()}: {m.content}" for m in prompt)
    user_text = (f"[Conversation]\n{conversation}\n\n"
                 f"[Response A]\n{first}\n[End of Response A]\n\n"
                 f"[Response B]\n{second}\n[End of Response B]\n\n"
                 "Which response is better? Answer with exactly one word: A, B or tie.")
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user_text}]


# A standalone A or B (upper case only: "a" is an English article) or "tie" in any case.
_VERDICT = re.compile(r"(?<![A-Za-z0-9])(A|B|[Tt][Ii][Ee])(?![A-Za-z0-9])")
_THINKING = re.compile(r"<think>.*?</think>", re.DOTALL)


def parse_verdict(text: str) -> float | None:
    """Preference for Response A from the judge's answer: the first standalone A, B or tie
    (after any <think>...</think> block that reasoning models write first); None if there is none."""
    match = _VERDICT.search(_THINKING.sub("", text))
    if match is None:
        return None
    return {"A": 1.0, "B": 0.0}.get(match.group(1), 0.5)


RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


@dataclass
class LLMJudge:
    """A ``PairJudge`` that asks a chat model at ``{base_url}/chat/completions`` (temperature 0).

    Unparseable answers count as ties; ``unparseable`` and ``requests`` say how many there were.
    """

    base_url: str
    model: str
    api_key: str = field(default="", repr=False)  # never printed
    concurrency: int = 4
    timeout: float = 60.0
    max_retries: int = 4
    backoff: float = 1.0  # seconds before the first retry; doubles each time
    max_tokens: int = 16
    requests: int = 0
    unparseable: int = 0
    examples_unparseable: list[str] = field(default_factory=list)  # the first few raw answers

    def __post_init__(self) -> None:
        import httpx

        self.url = self.base_url.rstrip("/") + "/chat/completions"
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._client = httpx.Client(headers=headers, timeout=self.timeout)
        self._lock = threading.Lock()

    def __call__(self, prompts: list[Prompt], first: list[str], second: list[str]) -> list[float]:
        jobs = [judge_messages(p.messages, a, b) for p, a, b in zip(prompts, first, second)]
        pool = ThreadPoolExecutor(max_workers=max(1, self.concurrency))
        try:
            answers = list(pool.map(self._ask, jobs))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # after a failure, send nothing more
        verdicts = []
        for answer in answers:
            verdict = parse_verdict(answer)
            if verdict is None:
                self.unparseable += 1
                if len(self.examples_unparseable) < 3:
                    self.examples_unparseable.append(answer[:200])
            verdicts.append(0.5 if verdict is None else verdict)
        return verdicts

    def _ask(self, messages: list[dict]) -> str:
        import httpx

        body = {"model": self.model, "messages": messages, "temperature": 0.0, "max_tokens": self.max_tokens}
        problem, retry_after = "", None
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self._delay(attempt, retry_after))
            with self._lock:
                self.requests += 1
            try:
                response = self._client.post(self.url, json=body)
            except httpx.TransportError as e:  # refused, reset, timed out: worth another try
                problem, retry_after = f"{type(e).__name__}: {e}", None
                continue
            if response.status_code in (401, 403):
                raise RlhfkitError(f"LLM judge at {self.url}: HTTP {response.status_code} (not authorised); "
                                   "check --llm.api-key or the OPENAI_API_KEY environment variable")
            if response.status_code in RETRY_STATUS:
                problem, retry_after = f"HTTP {response.status_code}", response.headers.get("retry-after")
                continue
            if response.status_code != 200:
                raise RlhfkitError(f"LLM judge at {self.url}: HTTP {response.status_code}: {response.text[:300]}")
            try:
                content = response.json()["choices"][0]["message"]["content"]
            except (ValueError, KeyError, IndexError, TypeError):
                raise RlhfkitError(f"LLM judge at {self.url}: not an OpenAI chat completion response: "
                                   f"{response.text[:300]}") from None
            return content or ""
        raise RlhfkitError(f"LLM judge at {self.url}: no answer after {self.max_retries + 1} attempts "
                           f"(last: {problem}); is the server running and --llm.base-url right?")

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        """Exponential backoff with jitter (threads that failed together retry apart); the server's
        Retry-After (seconds, capped at a minute) when it asks for longer."""
        delay = self.backoff * 2 ** (attempt - 1) * (1 + 0.25 * random.random())
        if retry_after and retry_after.isdigit():
            delay = max(delay, min(float(retry_after), 60.0))
        return delay

    def close(self) -> None:
        self._client.close()


def llm_judge(base_url: str, model: str, api_key: str = "", *, concurrency: int = 4, timeout: float = 60.0,
              max_retries: int = 4, backoff: float = 1.0, max_tokens: int = 16) -> LLMJudge:
    """An LLM judge at an OpenAI-compatible ``base_url`` (e.g. http://localhost:8000/v1).
    ``api_key`` empty reads ``OPENAI_API_KEY``; local servers usually need none."""
    if not base_url or not model:
        raise RlhfkitError("the LLM judge needs --llm.base-url (an OpenAI-compatible API root, e.g. "
                           "http://localhost:8000/v1) and --llm.model (the judge model's name there)")
    return LLMJudge(base_url, model, api_key or os.environ.get("OPENAI_API_KEY", ""), concurrency=concurrency,
                    timeout=timeout, max_retries=max_retries, backoff=backoff, max_tokens=max_tokens)
