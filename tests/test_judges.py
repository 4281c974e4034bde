"""Pairwise judges: an LLM behind a real OpenAI-compatible HTTP server started here, and a reward model.

The server is stdlib ``http.server`` on 127.0.0.1 (port 0) in a thread. Its "model" reads the
request's messages and decides: it prefers the response that contains MARKER.
"""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rlhfkit.data.records import Prompt, user
from rlhfkit.errors import RlhfkitError
from rlhfkit.eval.judges import llm_judge, parse_verdict, reward_model_judge
from rlhfkit.eval.winrate import win_rate

PROMPTS = [Prompt(user(f"Question {i}: name a colour.")) for i in range(6)]
MARKED = [f"MARKER answer {i}" for i in range(6)]
PLAIN = [f"plain answer {i}" for i in range(6)]


def _section(text: str, label: str) -> str:
    return text.split(f"[Response {label}]\n", 1)[1].split(f"\n[End of Response {label}]", 1)[0]


def prefers_marker(body: dict, index: int) -> tuple[int, str]:
    """Read Response A and B out of the last message; the one with MARKER wins, else a tie."""
    text = body["messages"][-1]["content"]
    a, b = "MARKER" in _section(text, "A"), "MARKER" in _section(text, "B")
    return 200, "A" if a and not b else "B" if b and not a else "tie"


class JudgeServer:
    """An OpenAI-compatible POST /v1/chat/completions; ``decide(body, index) -> (status, content)``."""

    def __init__(self, decide):
        self.bodies: list[dict] = []
        self.auth: list[str | None] = []
        lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    index = len(server.bodies)
                    server.bodies.append(body)
                    server.auth.append(self.headers.get("Authorization"))
                if self.path != "/v1/chat/completions":
                    status, content = 404, "not found"
                else:
                    status, content = decide(body, index)
                reply = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}
                                   if status == 200 else {"error": {"message": content}}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):  # keep the test output clean
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "JudgeServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(autouse=True)
def no_proxy_for_localhost(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


def test_llm_judge_over_http_prefers_the_marked_response_in_both_orders():
    with JudgeServer(prefers_marker) as server:
        judge = llm_judge(server.url, "judge-model", concurrency=3)
        result = win_rate(judge, PROMPTS, MARKED, PLAIN)
        assert (result.win_rate, result.wins, result.position_consistency) == (1.0, 6, 1.0)
        assert win_rate(judge, PROMPTS, PLAIN, MARKED).win_rate == 0.0
    # 6 pairs x 2 orders x 2 calls; each pair was shown with the marked answer as A and as B.
    assert len(server.bodies) == 24 and judge.requests == 24 and judge.unparseable == 0
    body = server.bodies[0]
    assert body["model"] == "judge-model" and body["temperature"] == 0
    assert "exactly one word: A, B or tie" in body["messages"][-1]["content"]
    shown_first = {_section(b["messages"][-1]["content"], "A") for b in server.bodies[:12]}
    assert shown_first == set(MARKED) | set(PLAIN)
    assert server.auth[0] is None  # no key configured: no Authorization header


def test_a_judge_that_always_answers_A_scores_exactly_50_percent():
    with JudgeServer(lambda body, i: (200, "A")) as server:
        judge = llm_judge(server.url, "m")
        assert judge(PROMPTS, PLAIN, MARKED) == [1.0] * 6  # the judge itself never swaps
        result = win_rate(judge, PROMPTS, MARKED, PLAIN)
    assert (result.win_rate, result.ties, result.position_consistency) == (0.5, 6, 0.0)


def test_unparseable_answers_count_as_ties_and_are_reported():
    with JudgeServer(lambda body, i: (200, "I cannot decide between these.")) as server:
        judge = llm_judge(server.url, "m")
        assert judge(PROMPTS, MARKED, PLAIN) == [0.5] * 6
        result = win_rate(judge, PROMPTS, MARKED, PLAIN)
    assert (result.win_rate, result.ties) == (0.5, 6)
    assert judge.unparseable == 18 and judge.examples_unparseable[0].startswith("I cannot decide")


def test_server_errors_are_retried():
    """The first request gets HTTP 500; the judge retries it and every verdict still arrives."""
    with JudgeServer(lambda body, i: (500, "overloaded") if i == 0 else prefers_marker(body, i)) as server:
        judge = llm_judge(server.url, "m", backoff=0.01)
        result = win_rate(judge, PROMPTS, MARKED, PLAIN)
    assert result.win_rate == 1.0 and len(server.bodies) == 13


def test_unauthorised_is_a_clear_error_that_never_shows_the_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-123")
    with JudgeServer(lambda body, i: (401, "bad key")) as server:
        judge = llm_judge(server.url, "m", backoff=0.01)
        with pytest.raises(RlhfkitError, match="401") as error:
            judge(PROMPTS[:1], MARKED[:1], PLAIN[:1])
    assert server.url in str(error.value) and "sk-secret-123" not in str(error.value)
    assert "sk-secret-123" not in repr(judge)
    assert server.auth[0] == "Bearer sk-secret-123" and len(server.bodies) == 1  # read from the env; no retry


def test_an_unreachable_server_fails_after_retries_naming_the_url():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge = llm_judge(f"http://127.0.0.1:{port}/v1", "m", max_retries=2, backoff=0.01)
    with pytest.raises(RlhfkitError, match=f"127.0.0.1:{port}/v1/chat/completions.*3 attempts"):
        judge(PROMPTS[:1], MARKED[:1], PLAIN[:1])


@pytest.mark.parametrize("text, verdict", [
    ("A", 1.0), ("B", 0.0), ("tie", 0.5), ("Tie.", 0.5), ("**B**", 0.0), ("Response A is better.", 1.0),
    ("It is a tie", 0.5), ("<think>A looks short, but B...</think>\nB", 0.0), ("a banana", None), ("", None),
])
def test_parse_verdict_takes_the_first_standalone_A_B_or_tie(text, verdict):
    assert parse_verdict(text) == verdict


def test_llm_judge_needs_a_url_and_a_model():
    with pytest.raises(RlhfkitError, match="base-url"):
        llm_judge("", "m")


# --- reward-model judge ---------------------------------------------------------------------------


class LengthRM:
    """A stand-in RewardModel: the reward is the response's length; counts score() calls."""

    calls = 0

    def score(self, prompts, responses, batch_size=16):
        self.calls += 1
        return [float(len(r)) for r in responses]


def test_reward_model_judge_higher_reward_wins_and_margins_tie():
    """Rewards are lengths: 'abcd' (4) beats 'ab' (2); 'abc' vs 'abcd' differ by 1 <= margin 1: tie."""
    prompts = PROMPTS[:3]
    a, b = ["abcd", "ab", "abc"], ["ab", "abcd", "abcd"]
    rm = LengthRM()
    assert reward_model_judge(rm)(prompts, a, b) == [1.0, 0.0, 0.0]
    judge = reward_model_judge(rm, margin=1.0)
    result = win_rate(judge, prompts, a, b)
    assert result.per_pair == [1.0, 0.0, 0.5] and result.position_consistency == 1.0
    assert rm.calls == 2  # one call for each judge; the second order reuses the scores


def test_reward_model_judge_on_a_tiny_reward_model(tiny_tokenizer):
    from rlhfkit.reward import RewardModel, build_reward_model

    rm = RewardModel(build_reward_model("tiny", tiny_tokenizer), tiny_tokenizer)
    a, b = ["Paris.", "Four", "no"], ["London is the capital.", "4", "yes, sure"]
    scores_a, scores_b = rm.score([p.messages for p in PROMPTS[:3]], a), rm.score([p.messages for p in PROMPTS[:3]], b)
    expected = [float(x > y) for x, y in zip(scores_a, scores_b)]
    judge = reward_model_judge(rm)
    assert judge(PROMPTS[:3], a, b) == expected
    assert judge(PROMPTS[:3], b, a) == [1 - e for e in expected]


def test_rlhfkit_eval_with_an_llm_judge_never_prints_or_saves_the_api_key(tmp_path, capsys):
    """The whole command through the CLI: the key from the flag is sent as a bearer token, and
    appears neither in the output nor in the JSON written."""
    from rlhfkit.cli import main

    out = tmp_path / "eval.json"
    with JudgeServer(prefers_marker) as server:
        main(["eval", "--model", "tiny", "--n-prompts", "4", "--max-new-tokens", "8", "--judge", "llm",
              "--llm.base-url", server.url, "--llm.model", "judge-model", "--llm.api-key", "sk-flag-456",
              "--out", str(out)])
    assert set(server.auth) == {"Bearer sk-flag-456"} and len(server.bodies) == 8
    printed, saved = capsys.readouterr(), out.read_text()
    assert "sk-flag-456" not in printed.out + printed.err and "sk-flag-456" not in saved
    report = json.loads(saved)
    assert report["llm_judge"]["requests"] == 8 and report["llm_judge"]["unparseable"] == 0
    assert report["win_rate"]["ties"] == 4  # no MARKER on either side: the server says tie
    assert "win rate" in printed.out
