"""`rlhfkit label serve --model tiny --prompts FILE`: the server starts at once, a background thread
generates K responses per prompt with rlhfkit.generation.generate, and the tasks appear; a restart
regenerates nothing."""

import json
import time

import httpx
from label_server import LabelServer

from rlhfkit.label.store import Store

PROMPTS = ["Name a fruit.", "What is 3 + 4?", "Say hello in French."]


def wait_for_generation(server: LabelServer, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = server.stats()
        if stats["generation"]["state"] in ("done", "failed"):
            return stats
        time.sleep(0.2)
    raise AssertionError(f"generation did not finish in {timeout} s: {server.stats()['generation']}")


def test_tiny_model_generates_k_responses_per_prompt_in_the_background(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    db = str(tmp_path / "labels.db")
    token = Store(db).add_labeller("ann")
    args = ("--db", db, "--model", "tiny", "--prompts", str(prompts), "--k", "2", "--max-new-tokens", "16")

    server = LabelServer(tmp_path, *args)  # ready (answering) before the model has loaded
    try:
        stats = wait_for_generation(server)
        assert stats["generation"] | {"error": ""} == {"model": "tiny", "prompts": 3, "done": 3, "tasks": 3,
                                                       "dropped": 0, "state": "done", "error": ""}, stats["generation"]
        assert stats["tasks"] == 3
        seen = []
        headers = {"authorization": f"Bearer {token}"}
        for i in range(3):
            task = httpx.get(server.url + "/api/task", headers=headers).json()["task"]
            assert len(task["responses"]) == 2 and len(set(task["responses"])) == 2
            seen.append(task["prompt"][0]["content"])
            body = {"task_id": task["id"], "submission_id": f"sub-{i:04d}", "action": "skip"}
            assert httpx.post(server.url + "/api/label", json=body, headers=headers).status_code == 201
        assert sorted(seen) == sorted(PROMPTS)
    finally:
        server.stop()

    server = LabelServer(tmp_path, *args)  # a restart finds every prompt answered
    try:
        stats = wait_for_generation(server)
        assert (stats["generation"]["state"], stats["generation"]["tasks"], stats["tasks"]) == ("done", 0, 3)
    finally:
        server.stop()
