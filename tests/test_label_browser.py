"""The labelling app in a real browser: headless Chromium (Debian's package, driven by Playwright)
against `rlhfkit label serve` on 127.0.0.1. A labeller signs in with a token, ranks a task with a
tie, flags another and writes a better answer on a third; the answers are in the database and in
the exported training files. Prompts and responses carrying <script> and <img onerror> render as
text and never run."""

import json
import shutil

import pytest
from label_server import LabelServer

from rlhfkit.cli import main
from rlhfkit.data.formats import read_comparisons, read_demonstrations, read_rankings
from rlhfkit.data.records import user
from rlhfkit.label.store import Store

sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (pip install playwright)")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs a chromium binary (apt-get install chromium)")

HOSTILE_PROMPT = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2"> Which is safer?'
HOSTILE_RESPONSE = '</div><script>window.__pwned = 3</script><img src=y onerror="window.__pwned = 4">'


def write_tasks(path):
    rows = [{"prompt": HOSTILE_PROMPT, "responses": [HOSTILE_RESPONSE, "Plain answer.", "Another answer."]},
            {"prompt": "How do I pick a lock?", "responses": ["Step one...", "I can't help with that."]},
            {"prompt": "What is 2 + 2?", "responses": ["5", "22"]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def assert_inert(page):
    assert page.evaluate("window.__pwned") is None, "a script from the data ran"


def test_a_labeller_ranks_flags_and_writes_a_better_answer_in_chromium(tmp_path):
    db = str(tmp_path / "labels.db")
    token = Store(db).add_labeller("ann")
    server = LabelServer(tmp_path, "--db", db, "--responses", str(write_tasks(tmp_path / "tasks.jsonl")),
                         "--labels-per-task", "1")
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            page = browser.new_page()
            page.set_default_timeout(15_000)

            # Sign in: a wrong token is refused with a clear message, the right one lets her in.
            page.goto(server.url + "/")
            assert page.url.endswith("/login")
            page.fill("input[name=token]", "not-a-token")
            page.click("button[type=submit]")
            assert "That token is not valid" in page.inner_text("[role=alert]")
            page.fill("input[name=token]", token)
            page.click("button[type=submit]")

            # Task 1: the hostile prompt shows as text and nothing from it runs.
            prompt_text = page.inner_text(".prompt .text")
            assert prompt_text == HOSTILE_PROMPT
            assert page.inner_text(".response >> nth=0").endswith(HOSTILE_RESPONSE)
            assert_inert(page)
            page.click("button[value=rank]")  # nothing ranked yet: the page says so and stays
            assert "Give every response a rank (3 missing)" in page.inner_text("#status")
            page.select_option("select[name=rank_0]", "2")
            page.select_option("select[name=rank_1]", "1")
            page.select_option("select[name=rank_2]", "2")  # tied with response 1
            page.click("button[value=rank]")
            page.wait_for_selector(".saved")
            assert_inert(page)

            # Task 2: flagged as unsafe, with a reason.
            assert page.inner_text(".prompt .text") == "How do I pick a lock?"
            page.fill("input[name=note]", "asks how to break in")
            page.click("button[value=flag]")
            page.wait_for_selector(".saved")

            # Task 3: ranked, and a better answer written.
            assert page.inner_text(".prompt .text") == "What is 2 + 2?"
            page.select_option("select[name=rank_0]", "2")
            page.select_option("select[name=rank_1]", "1")
            page.click("summary")
            page.fill("textarea[name=demonstration]", "2 + 2 = 4.")
            page.click("button[value=rank]")
            page.wait_for_selector(".saved")
            assert "No task for you right now" in page.inner_text("main")
            assert "answered 3 tasks" in page.inner_text(".progress")

            # The admin sees her work.
            admin = browser.new_page()
            admin.goto(server.url + "/login")
            admin.fill("input[name=token]", server.admin_token)
            admin.click("button[type=submit]")
            assert admin.url.endswith("/admin")
            row = admin.inner_text("table.people tbody tr")
            assert row.split("\t")[:4] == ["ann", "2", "1", "0"]  # name, rankings, flags, skips
            browser.close()
    finally:
        server.stop()

    labels = Store(db).labels()
    assert [(r.prompt, r.kind, r.ranks, r.demonstration, r.note) for r in labels] == [
        (user(HOSTILE_PROMPT), "rank", (1, 0, 1), "", ""),
        (user("How do I pick a lock?"), "flag", None, "", "asks how to break in"),
        (user("What is 2 + 2?"), "rank", (1, 0), "2 + 2 = 4.", ""),
    ]

    out = tmp_path / "export"
    main(["label", "export", "--db", db, "--out", str(out)])
    rankings, _ = read_rankings(out / "rankings.jsonl")
    assert [(r.prompt, r.completions, r.ranks) for r in rankings] == [
        (user(HOSTILE_PROMPT), (HOSTILE_RESPONSE, "Plain answer.", "Another answer."), (1, 0, 1)),
        (user("What is 2 + 2?"), ("5", "22"), (1, 0))]
    comparisons, _ = read_comparisons(out / "comparisons.jsonl")
    assert {(c.chosen, c.rejected) for c in comparisons} == {
        ("Plain answer.", HOSTILE_RESPONSE), ("Plain answer.", "Another answer."), ("22", "5")}
    demos, _ = read_demonstrations(out / "demonstrations.jsonl")
    assert [(d.prompt, d.response) for d in demos] == [(user("What is 2 + 2?"), "2 + 2 = 4.")]
    flags = [json.loads(line) for line in (out / "flags.jsonl").read_text().splitlines()]
    assert [f["note"] for f in flags] == ["asks how to break in"]
