"""The labelling store and its files: task assignment (up to R labellers, never the same task
twice), skips and flags, ties, idempotent submissions, agreement math, task files, the export
read back by the training stages' readers, and the commands."""

import json
import math
import os
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from rlhfkit.cli import main
from rlhfkit.data.formats import read_comparisons, read_demonstrations, read_rankings
from rlhfkit.data.records import Message, user
from rlhfkit.errors import ConfigError, DataError
from rlhfkit.label import agreement
from rlhfkit.label.app import admin_stats
from rlhfkit.label.export import export
from rlhfkit.label.store import Conflict, InvalidSubmission, NewTask, NotAssigned, Store, Submission
from rlhfkit.label.tasks import read_task_file


def make_store(tmp_path, n_tasks=3, k=3, r=2, **kw) -> Store:
    store = Store(str(tmp_path / "labels.db"), labels_per_task=r, **kw)
    store.add_tasks(NewTask(f"key{i}", user(f"prompt {i}"), tuple(f"p{i} response {j}" for j in range(k)), "test")
                    for i in range(n_tasks))
    return store


def labellers(store, *names) -> dict[str, int]:
    """Create labellers; their ids by name."""
    return {name: store.authenticate(store.add_labeller(name)).labeller_id for name in names}


def answer(store, who, task, action="rank", ranks=(0, 1, 2), demo="", note="", sid=None):
    sub = Submission(task.id, sid or f"sub-{who}-{task.id}-{action}", action,
                     tuple(ranks) if action == "rank" else None, demo, note)
    return store.submit(who, sub)


# --- agreement -------------------------------------------------------------------------------


def test_agreement_hand_checked():
    """a = (0, 1, 2) vs b = (0, 2, 1): pairs (0,1) and (0,2) agree, (1,2) is reversed -> 2/3;
    tau = (C - D) / n0 = (2 - 1) / 3. With a tie, a = (0, 0, 1) vs b = (0, 1, 2): pair (0,1) is
    tied in a and not counted; the other two agree -> 2/2; tau-b = 2 / sqrt((3-1)(3-0)) = 0.8165."""
    assert agreement.pair_agreement((0, 1, 2), (0, 2, 1)) == (2, 3)
    assert agreement.kendall_tau_b((0, 1, 2), (0, 2, 1)) == pytest.approx(1 / 3)
    assert agreement.pair_agreement((0, 0, 1), (0, 1, 2)) == (2, 2)
    assert agreement.kendall_tau_b((0, 0, 1), (0, 1, 2)) == pytest.approx(2 / math.sqrt(6))
    assert agreement.kendall_tau_b((0, 0, 0), (0, 1, 2)) is None  # all tied: no order to compare
    assert agreement.kendall_tau_b((2, 1, 0), (0, 1, 2)) == -1

    # Three labellers, two tasks: ann & bob share both, cat shares task 1 with both.
    pairs = agreement.pairwise([(1, "ann", (0, 1, 2)), (1, "bob", (0, 2, 1)), (1, "cat", (2, 1, 0)),
                                (2, "ann", (0, 1)), (2, "bob", (0, 1))])
    by = {(p.a, p.b): p for p in pairs}
    assert (by["ann", "bob"].agree, by["ann", "bob"].pairs, by["ann", "bob"].tasks) == (3, 4, 2)
    assert by["ann", "bob"].tau == pytest.approx((1 / 3 + 1) / 2)
    assert (by["ann", "cat"].agree, by["ann", "cat"].pairs) == (0, 3)  # fully reversed
    assert (by["bob", "cat"].agree, by["bob", "cat"].pairs) == (1, 3)  # only (1,2) agrees
    overall = agreement.total(pairs)
    assert overall.rate == pytest.approx(4 / 10)


# --- assignment ------------------------------------------------------------------------------


def test_each_task_goes_to_at_most_r_labellers_and_never_twice_to_one(tmp_path):
    store = make_store(tmp_path, n_tasks=2, r=2)
    ids = labellers(store, "ann", "bob", "cat")
    seen = {name: [] for name in ids}
    for _ in range(3):  # each labeller keeps asking and answering until nothing is left for them
        for name, lid in ids.items():
            task = store.next_task(lid)
            if task is not None:
                seen[name].append(task.id)
                answer(store, lid, task)
    counts = {}
    for name, tasks in seen.items():
        assert len(tasks) == len(set(tasks)), f"{name} got a task twice: {tasks}"
        for t in tasks:
            counts[t] = counts.get(t, 0) + 1
    assert counts == {1: 2, 2: 2}  # every task answered by exactly R = 2 labellers
    assert all(store.next_task(lid) is None for lid in ids.values())


def test_held_task_returns_on_reload_and_an_expired_hold_frees_the_slot(tmp_path):
    store = make_store(tmp_path, n_tasks=1, r=1, lease_seconds=0.2)
    ids = labellers(store, "ann", "bob")
    first = store.next_task(ids["ann"])
    assert store.next_task(ids["ann"]).id == first.id  # a reload shows the same task
    assert store.next_task(ids["bob"]) is None  # R = 1: the one slot is held by ann
    time.sleep(0.3)
    assert store.next_task(ids["bob"]).id == first.id  # ann's hold expired
    # ann comes back: the task is full now, so she gets nothing, but her late answer still counts
    assert store.next_task(ids["ann"]) is None
    answer(store, ids["ann"], first)
    answer(store, ids["bob"], first)
    assert store.stats()["labels"]["rank"] == 2


def test_skip_frees_the_slot_and_flag_takes_it(tmp_path):
    store = make_store(tmp_path, n_tasks=1, r=1)
    ids = labellers(store, "ann", "bob", "cat")
    task = store.next_task(ids["ann"])
    answer(store, ids["ann"], task, "skip")
    assert store.next_task(ids["ann"]) is None  # never the same task twice, even after a skip
    bob_task = store.next_task(ids["bob"])
    assert bob_task.id == task.id  # the skip gave the slot back
    answer(store, ids["bob"], bob_task, "flag", note="asks for something harmful")
    assert store.next_task(ids["cat"]) is None  # the flag took it
    kinds = [(r.labeller, r.kind, r.ranks, r.note) for r in store.labels()]
    assert kinds == [("ann", "skip", None, ""), ("bob", "flag", None, "asks for something harmful")]


def test_ties_are_kept_as_dense_ranks_and_bad_rankings_are_refused(tmp_path):
    store = make_store(tmp_path, n_tasks=3, k=3, r=1)
    lid = labellers(store, "ann")["ann"]
    task = store.next_task(lid)
    with pytest.raises(InvalidSubmission, match="every one of the 3"):
        answer(store, lid, task, ranks=(1, 2))
    with pytest.raises(InvalidSubmission, match="submission_id"):
        answer(store, lid, task, sid="bad id!")
    with pytest.raises(InvalidSubmission, match="action"):
        answer(store, lid, task, action="love")
    answer(store, lid, task, ranks=(3, 1, 3))  # the 1-based ranks of the form, a tie for last
    assert store.labels()[0].ranks == (1, 0, 1)


def test_a_retried_submission_is_stored_once(tmp_path):
    store = make_store(tmp_path, n_tasks=2, r=2)
    ids = labellers(store, "ann", "bob")
    task = store.next_task(ids["ann"])
    first = answer(store, ids["ann"], task, sid="same-id-123")
    assert answer(store, ids["ann"], task, sid="same-id-123") == (first[0], True)
    with pytest.raises(Conflict, match="already answered"):  # a new id for an answered task
        answer(store, ids["ann"], task, sid="other-id-456")
    with pytest.raises(Conflict, match="another answer"):  # someone else's id
        answer(store, ids["bob"], store.next_task(ids["bob"]), sid="same-id-123")
    with pytest.raises(NotAssigned):  # a task never handed out
        store.submit(ids["bob"], Submission(2, "never-given-1", "skip"))
    assert len(store.labels()) == 1


def test_a_database_that_cannot_be_opened_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    url = f"sqlite:///{blocker}/labels.db"  # a "folder" that is a file: SQLite cannot open it
    with pytest.raises(ConfigError, match=f"cannot open the label database {re.escape(url)}: unable to open"):
        Store(url)
    with pytest.raises(ConfigError, match="not a database URL"):
        Store("nosuchdialect://x")


def test_an_unreachable_postgres_server_is_named_without_its_password():
    pytest.importorskip("psycopg", reason="the PostgreSQL driver (psycopg) is not installed")
    # port 1 on 127.0.0.1: nothing listens there, so the connection is refused at once
    with pytest.raises(ConfigError, match=r"cannot open the label database "
                       r"postgresql\+psycopg://bob:\*\*\*@127\.0\.0\.1:1/labels: .*refused") as info:
        Store("postgresql+psycopg://bob:secret@127.0.0.1:1/labels")
    assert "secret" not in str(info.value)


def test_tokens_are_stored_hashed_and_rotate(tmp_path):
    store = make_store(tmp_path)
    token = store.add_labeller("ann")
    with pytest.raises(ConfigError, match="already exists"):
        store.add_labeller("ann")
    assert store.authenticate(token).name == "ann"
    assert token not in (tmp_path / "labels.db").read_bytes().decode("latin-1")
    new = store.add_labeller("ann", rotate=True)
    assert store.authenticate(token) is None and store.authenticate(new).name == "ann"
    made = store.set_admin_token()
    assert made and store.authenticate(made).admin
    assert store.set_admin_token() == ""  # made once, then kept


# --- task files ---------------------------------------------------------------------------------


def test_task_files_responses_rows_and_sample_output(tmp_path):
    rows = tmp_path / "tasks.jsonl"
    rows.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "one", "responses": ["a", "b", "a", " "]},  # a repeat and a blank are dropped
        {"prompt": [{"role": "user", "content": "two"}], "responses": ["only one"]},  # < 2 left
        {"prompt": "three", "completions": ["x", "y"], "ranking": [0, 1]},  # a rankings file works too
    ]) + "\n")
    tasks, dropped = read_task_file(str(rows))
    assert [(t.prompt, t.responses) for t in tasks] == [(user("one"), ("a", "b")), (user("three"), ("x", "y"))]
    assert dropped == 1

    sample = tmp_path / "samples.jsonl"  # what `rlhfkit sample --n 2` writes
    msgs = [{"role": "user", "content": "q"}]
    sample.write_text("".join(json.dumps({"prompt": msgs, "completion": c, "finished": True, "tokens": 3,
                                          "sample": i % 2}) + "\n" for i, c in enumerate(["c1", "c2"])))
    tasks, _ = read_task_file(str(sample))
    assert [(t.prompt, t.responses) for t in tasks] == [((Message("user", "q"),), ("c1", "c2"))]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "responses": "not a list"}) + "\n")
    with pytest.raises(DataError, match="bad.jsonl, line 1: field 'responses'"):
        read_task_file(str(bad))

    store = Store(str(tmp_path / "l.db"))
    assert store.add_tasks(read_task_file(str(rows))[0]) == 2
    assert store.add_tasks(read_task_file(str(rows))[0]) == 0  # a restart adds nothing twice


# --- export ---------------------------------------------------------------------------------------


def test_export_reads_back_through_the_training_readers(tmp_path):
    store = make_store(tmp_path, n_tasks=4, k=3, r=2)
    ids = labellers(store, "ann", "bob")
    ann, bob = ids["ann"], ids["bob"]
    t = store.next_task(ann)
    answer(store, ann, t, ranks=(0, 0, 1), demo="A better answer to prompt 0.")  # a tie
    answer(store, bob, store.next_task(bob), ranks=(2, 1, 0))
    t2 = store.next_task(ann)
    answer(store, ann, t2, ranks=(0, 1, 2))
    answer(store, bob, store.next_task(bob), "flag", note="unsafe", demo="I can't help with that.")
    t3 = store.next_task(ann)
    answer(store, ann, t3, "skip")
    answer(store, ann, store.next_task(ann), ranks=(1, 1, 1))  # all tied: no preference

    meta = export(store, tmp_path / "out")
    rankings, _ = read_rankings(tmp_path / "out" / "rankings.jsonl")
    comparisons, _ = read_comparisons(tmp_path / "out" / "comparisons.jsonl")
    demos, _ = read_demonstrations(tmp_path / "out" / "demonstrations.jsonl")

    # Task 1: ann (tie) and bob; task 2 was flagged by bob, so ann's ranking of it is left out.
    assert [(r.prompt, r.ranks, r.meta["labeller"]) for r in rankings] == [
        (user("prompt 0"), (0, 0, 1), "ann"), (user("prompt 0"), (2, 1, 0), "bob")]
    pairs = {(c.meta["labeller"], c.chosen, c.rejected) for c in comparisons}
    assert pairs == {("ann", "p0 response 0", "p0 response 2"), ("ann", "p0 response 1", "p0 response 2"),
                     ("bob", "p0 response 2", "p0 response 1"), ("bob", "p0 response 2", "p0 response 0"),
                     ("bob", "p0 response 1", "p0 response 0")}  # the tie gives no pair
    assert [(d.prompt, d.response) for d in demos] == [(user("prompt 0"), "A better answer to prompt 0."),
                                                      (user("prompt 1"), "I can't help with that.")]
    flags = [json.loads(line) for line in (tmp_path / "out" / "flags.jsonl").read_text().splitlines()]
    assert [(f["meta"]["labeller"], f["note"], len(f["responses"])) for f in flags] == [("bob", "unsafe", 3)]
    assert meta["left_out"] == {"skipped": 1, "all_tied": 1, "rankings_of_flagged_tasks": 1}
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["exported"]["comparisons.jsonl"] == 5


def test_admin_stats_counts_and_agreement(tmp_path):
    store = make_store(tmp_path, n_tasks=2, k=3, r=2)
    ids = labellers(store, "ann", "bob")
    for lid, ranks in ((ids["ann"], (0, 1, 2)), (ids["bob"], (0, 2, 1))):
        answer(store, lid, store.next_task(lid), ranks=ranks)
    stats = admin_stats(store)
    assert (stats["tasks"], stats["complete"], stats["labels"]["rank"]) == (2, 1, 2)
    assert stats["agreement"]["rate"] == pytest.approx(2 / 3)
    ann = next(p for p in stats["labellers"] if p["name"] == "ann")
    assert ann["rank"] == 1 and ann["per_hour"] > 0 and ann["agreement"] == pytest.approx(2 / 3)


# --- commands -----------------------------------------------------------------------------------


def test_commands_add_labeller_and_export(tmp_path, capsys):
    db = str(tmp_path / "cli.db")
    main(["label", "add-labeller", "ann", "--db", db])
    token = capsys.readouterr().out.strip().split()[-1]
    store = Store(db)
    assert store.authenticate(token).name == "ann"
    with pytest.raises(SystemExit):
        main(["label", "add-labeller", "ann", "--db", db])
    assert "already exists; --rotate" in capsys.readouterr().err
    main(["label", "export", "--db", db, "--out", str(tmp_path / "o")])
    assert {p.name for p in (tmp_path / "o").iterdir()} == {"rankings.jsonl", "comparisons.jsonl",
                                                            "demonstrations.jsonl", "flags.jsonl", "meta.json"}
    with pytest.raises(SystemExit):
        main(["label", "export", "--db", str(tmp_path / "missing.db"), "--out", str(tmp_path / "o")])
    assert "no labelling database" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["label", "serve", "--db", db, "--prompts", "p.jsonl"])
    assert "--prompts needs --model" in capsys.readouterr().err


def serve_app(monkeypatch, *args: str):
    """`rlhfkit label serve ARGS` up to the point it would listen: the app it would serve."""
    import uvicorn
    from starlette.testclient import TestClient

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(app=app, **kw))
    main(["label", "serve", *args])
    return TestClient(served["app"], base_url=f"http://{served['host']}:{served['port']}")


def test_serve_takes_the_admin_token_from_the_environment_and_the_flag_wins(tmp_path, monkeypatch, capsys):
    db = str(tmp_path / "cli.db")
    monkeypatch.setenv("RLHFKIT_ADMIN_TOKEN", "admin-from-the-environment")
    serve_app(monkeypatch, "--db", db)
    assert "admin token (shown this once" not in capsys.readouterr().out  # none made: the variable's is kept
    assert Store(db).authenticate("admin-from-the-environment").admin
    serve_app(monkeypatch, "--db", db, "--admin-token", "admin-from-the-flag")
    assert Store(db).authenticate("admin-from-the-flag").admin
    assert Store(db).authenticate("admin-from-the-environment") is None


def test_serve_answers_only_its_own_host_names(tmp_path, monkeypatch, capsys):
    db = str(tmp_path / "cli.db")
    client = serve_app(monkeypatch, "--db", db, "--admin-token", "admin-token-for-tests")
    assert client.get("/healthz").status_code == 200  # Host: 127.0.0.1:8000
    assert client.get("/healthz", headers={"host": "rebound.evil.example"}).status_code == 400
    client = serve_app(monkeypatch, "--db", db, "--allowed-host", "labels.example.com", "--allowed-host", "*.lab")
    for host in ("localhost:8000", "labels.example.com", "a.lab"):
        assert client.get("/healthz", headers={"host": host}).status_code == 200
    assert client.get("/healthz", headers={"host": "rebound.evil.example"}).status_code == 400
    client = serve_app(monkeypatch, "--db", db, "--host", "0.0.0.0")
    assert client.get("/healthz", headers={"host": "anything.example"}).status_code == 200
    assert "any Host header is answered" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        serve_app(monkeypatch, "--db", db, "--allowed-host", "labels.example.com:443")
    assert "--allowed-host" in capsys.readouterr().err


# --- a server database ----------------------------------------------------------------------------

POSTGRES = os.environ.get("RLHFKIT_TEST_POSTGRES", "")


@pytest.mark.skipif(not POSTGRES, reason="set RLHFKIT_TEST_POSTGRES=postgresql+psycopg://... (a scratch database: "
                                         "its label tables are dropped) to run the store against PostgreSQL")
def test_postgres_concurrent_labellers_respect_r_and_resent_submissions_store_once(tmp_path):
    from rlhfkit.label.store import metadata

    scratch = Store(POSTGRES)
    metadata.drop_all(scratch.engine)
    scratch.close()
    store = Store(POSTGRES, labels_per_task=3)
    store.add_tasks(NewTask(f"key{i}", user(f"prompt {i}"), ("a", "b", "c"), "test") for i in range(40))
    ids = list(labellers(store, *(f"l{i}" for i in range(12))).values())

    def work(lid):
        for n in range(8):
            task = store.next_task(lid)
            if task is None:
                return
            sub = Submission(task.id, f"submission-{lid}-{n}", "rank", (0, 1, 2))
            with ThreadPoolExecutor(2) as twice:  # the same submission sent twice at once
                results = list(twice.map(lambda s: store.submit(lid, s), [sub, sub]))
            assert sorted(dup for _, dup in results) == [False, True] and results[0][0] == results[1][0]

    with ThreadPoolExecutor(len(ids)) as pool:
        list(pool.map(work, ids))
    labels = store.labels()
    per_task = Counter(r.task_id for r in labels)
    assert len(labels) == 12 * 8 and max(per_task.values()) <= 3
    assert len({(r.task_id, r.labeller) for r in labels}) == len(labels)
    assert admin_stats(store)["labels"]["rank"] == 96
    export(store, tmp_path / "out")
    assert len(read_rankings(tmp_path / "out" / "rankings.jsonl")[0]) == 96
