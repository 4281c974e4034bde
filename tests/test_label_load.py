"""Load and crash safety of the labelling server, run as a real process on 127.0.0.1.

Phase 1: 50 simulated labellers, each in a thread with its own connection, answer 20 tasks each
through the JSON API -> exactly 1,000 labels, no submission stored twice, no task given to one
labeller twice or to more than R labellers.
Phase 2: the labellers keep going while the server is killed with SIGKILL (no shutdown code
runs) -> after a restart the SQLite file passes `PRAGMA integrity_check` and holds every label
whose POST was acknowledged with a 2xx; the submissions that were in flight, resent with the
same submission ids, are stored at most once.
"""

import sqlite3
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
from label_server import LabelServer, write_tasks

from rlhfkit.label.store import Store

LABELLERS, PER_LABELLER, R = 50, 20, 3


class Labeller:
    """One simulated person: fetch a task, rank it, remember what the server acknowledged."""

    def __init__(self, token: str):
        self.token = token
        self.acked: list[str] = []
        self.in_flight: dict | None = None  # a submission sent when the connection broke

    def run(self, url: str, n: int, stop: threading.Event | None = None) -> None:
        headers = {"authorization": f"Bearer {self.token}"}
        with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
            for _ in range(n):
                if stop is not None and stop.is_set():
                    return
                try:
                    task = client.get("/api/task").json()["task"]
                    body = {"task_id": task["id"], "submission_id": uuid.uuid4().hex, "action": "rank",
                            "ranks": list(range(len(task["responses"])))}
                    self.in_flight = body
                    response = client.post("/api/label", json=body)
                except httpx.TransportError:
                    return  # the server went away (phase 2)
                assert response.status_code == 201, response.text
                self.acked.append(body["submission_id"])
                self.in_flight = None


def db_rows(db: str, sql: str) -> list[tuple]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        return con.execute(sql).fetchall()


def test_fifty_labellers_then_a_killed_server_keeps_every_acknowledged_label(tmp_path):
    db = str(tmp_path / "labels.db")
    tasks = write_tasks(tmp_path / "tasks.jsonl", [f"Question number {i}?" for i in range(800)])
    store = Store(db)
    people = [Labeller(store.add_labeller(f"labeller{i}")) for i in range(LABELLERS)]
    store.close()
    server = LabelServer(tmp_path, "--db", db, "--responses", str(tasks), "--labels-per-task", str(R))
    try:
        # --- phase 1: 50 at once, 20 labels each ------------------------------------------------
        start = time.perf_counter()
        with ThreadPoolExecutor(LABELLERS) as pool:
            list(pool.map(lambda p: p.run(server.url, PER_LABELLER), people))
        seconds = time.perf_counter() - start
        print(f"\nphase 1: {LABELLERS * PER_LABELLER} labels in {seconds:.1f} s "
              f"({LABELLERS * PER_LABELLER / seconds:.0f} labels/s, each a GET and a POST)")
        assert sum(len(p.acked) for p in people) == 1000
        assert db_rows(db, "SELECT count(*), count(DISTINCT submission_id) FROM labels") == [(1000, 1000)]
        assert db_rows(db, "SELECT count(*) FROM (SELECT task_id, labeller_id FROM assignments "
                           "GROUP BY task_id, labeller_id HAVING count(*) > 1)") == [(0,)]
        assert db_rows(db, "SELECT max(n) FROM (SELECT count(*) AS n FROM labels GROUP BY task_id)") == [(R,)]
        assert server.stats()["labels"]["rank"] == 1000

        # --- phase 2: SIGKILL mid-load, restart ---------------------------------------------------
        before = {sid for p in people for sid in p.acked}
        for p in people:
            p.acked = []
        stop = threading.Event()
        threads = [threading.Thread(target=p.run, args=(server.url, PER_LABELLER, stop)) for p in people]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while sum(len(p.acked) for p in people) < 150 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert all(t.is_alive() for t in threads), "a labeller stopped before the kill (see its error above)"
        server.kill()
        stop.set()
        for t in threads:
            t.join(30)
        acked = {sid for p in people for sid in p.acked}
        in_flight = [(p, p.in_flight) for p in people if p.in_flight is not None]
        print(f"phase 2: killed after {len(acked)} more acknowledged labels, {len(in_flight)} in flight")

        server = LabelServer(tmp_path, "--db", db, "--responses", str(tasks), "--labels-per-task", str(R))
        assert db_rows(db, "PRAGMA integrity_check") == [("ok",)]
        stored = {sid for (sid,) in db_rows(db, "SELECT submission_id FROM labels")}
        assert before | acked <= stored, f"lost {len((before | acked) - stored)} acknowledged labels"

        # The in-flight submissions, resent with their ids: each stored once, whether or not the
        # killed server had committed it before dying.
        for person, body in in_flight:
            response = httpx.post(server.url + "/api/label", json=body, timeout=30,
                                  headers={"authorization": f"Bearer {person.token}"})
            assert response.status_code in (200, 201), response.text
        total = len(before | acked | {body["submission_id"] for _, body in in_flight})
        assert db_rows(db, "SELECT count(*), count(DISTINCT submission_id) FROM labels") == [(total, total)]
    finally:
        server.stop()
