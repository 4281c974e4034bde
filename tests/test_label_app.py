"""The labelling web app over HTTP (in process): sign-in and its errors, the labelling form,
CSRF and cross-site refusals, the body size limit, escaping of hostile prompts, the admin page,
the JSON API, out-of-range ids, deeply nested JSON and the Host allow-list."""

import re

import pytest
from starlette.testclient import TestClient

from rlhfkit.data.records import user
from rlhfkit.hosts import allowed_hosts
from rlhfkit.label.app import create_app
from rlhfkit.label.store import NewTask, Store

ADMIN = "admin-token-for-tests"
XSS_PROMPT = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'
XSS_RESPONSE = "</div><script>window.__pwned = 3</script>"


@pytest.fixture
def env(tmp_path):
    store = Store(str(tmp_path / "labels.db"), labels_per_task=2)
    store.set_admin_token(ADMIN)
    tokens = {name: store.add_labeller(name) for name in ("ann", "bob")}
    store.add_tasks([NewTask("xss", user(XSS_PROMPT), (XSS_RESPONSE, "a plain answer", "a third"), "test"),
                     NewTask("t2", user("Name a colour."), ("red", "blue", "green"), "test")])
    return store, TestClient(create_app(store)), tokens


def sign_in(client, token) -> str:
    """Sign in through the form; return the CSRF token of the page that follows."""
    page = client.get("/login").text
    login_csrf = re.search(r'name="login_csrf" value="([^"]+)"', page).group(1)
    response = client.post("/login", data={"token": token, "login_csrf": login_csrf})
    assert response.status_code == 200, response.text
    return re.search(r'name="csrf" value="([^"]+)"', response.text).group(1)


def form_fields(page: str) -> dict:
    return dict(re.findall(r'<input type="hidden" name="(\w+)" value="([^"]*)"', page))


def test_signed_out_is_sent_to_sign_in_and_a_bad_token_is_refused_clearly(env):
    store, client, _ = env
    for path in ("/", "/admin"):
        response = client.get(path, follow_redirects=False)
        assert (response.status_code, response.headers["location"]) == (303, "/login")
    page = client.get("/login").text
    login_csrf = re.search(r'name="login_csrf" value="([^"]+)"', page).group(1)
    response = client.post("/login", data={"token": "wrong", "login_csrf": login_csrf})
    assert response.status_code == 401
    assert "That token is not valid" in response.text and "rlhfkit label add-labeller" in response.text
    assert client.post("/login", data={"token": "wrong"}).status_code == 403  # no sign-in form token
    response = client.get("/api/task", headers={"authorization": "Bearer wrong"})
    assert response.status_code == 401 and "Bearer" in response.json()["detail"]
    assert client.get("/api/task").status_code == 401


def test_session_cookie_is_httponly_and_samesite_strict(env):
    _, client, tokens = env
    page = client.get("/login").text
    login_csrf = re.search(r'name="login_csrf" value="([^"]+)"', page).group(1)
    response = client.post("/login", data={"token": tokens["ann"], "login_csrf": login_csrf}, follow_redirects=False)
    cookie = response.headers["set-cookie"].lower()
    assert "rlhfkit_session=" in cookie and "httponly" in cookie and "samesite=strict" in cookie


def test_rank_flag_and_a_better_answer_through_the_form(env):
    store, client, tokens = env
    sign_in(client, tokens["ann"])
    page = client.get("/").text
    fields = form_fields(page)
    ranking = {"rank_0": "2", "rank_1": "1", "rank_2": "2", "action": "rank",
               "demonstration": "Blue, the sky's colour."}
    response = client.post("/label", data={**fields, **ranking}, follow_redirects=False)
    assert (response.status_code, response.headers["location"]) == (303, "/?saved=1")
    assert client.post("/label", data={**fields, **ranking}, follow_redirects=False).status_code == 303  # a resend
    page = client.get("/?saved=1").text
    assert "Saved." in page and "answered 1 task." in page
    second = form_fields(page)
    assert second["task_id"] != fields["task_id"]
    response = client.post("/label", data={**second, "action": "flag", "note": "harmful"})
    assert "No task for you right now" in response.text
    labels = store.labels()
    assert [(r.kind, r.ranks, r.demonstration, r.note) for r in labels] == [
        ("rank", (1, 0, 1), "Blue, the sky's colour.", ""), ("flag", None, "", "harmful")]


def test_an_unranked_submission_shows_the_task_again_with_the_reason(env):
    _, client, tokens = env
    sign_in(client, tokens["ann"])
    fields = form_fields(client.get("/").text)
    response = client.post("/label", data={**fields, "action": "rank", "rank_0": "1", "rank_1": "", "rank_2": "2"})
    assert response.status_code == 422 and "give every response a rank" in response.text
    assert form_fields(response.text)["task_id"] == fields["task_id"]


def test_posts_without_the_csrf_token_or_from_another_site_are_refused(env):
    store, client, tokens = env
    sign_in(client, tokens["ann"])
    fields = form_fields(client.get("/").text)
    skip = {**fields, "action": "skip"}
    no_csrf = {k: v for k, v in skip.items() if k != "csrf"}
    assert client.post("/label", data=no_csrf).status_code == 403
    assert client.post("/label", data={**skip, "csrf": "forged"}).status_code == 403
    for headers in ({"origin": "http://evil.example"}, {"origin": "null"}, {"sec-fetch-site": "cross-site"},
                    {"sec-fetch-site": "same-site"}):  # another port of this machine is same-site
        response = client.post("/label", data=skip, headers=headers)
        assert response.status_code == 403 and "cross-site" in response.text
    api = {"task_id": int(fields["task_id"]), "submission_id": "api-sub-0001", "action": "skip"}
    assert client.post("/api/label", json=api).status_code == 403  # cookie, no X-CSRF-Token
    assert store.labels() == []
    ok = client.post("/label", data=skip, headers={"origin": "http://testserver"}, follow_redirects=False)
    assert ok.status_code == 303 and len(store.labels()) == 1


def test_bodies_over_64_kb_are_refused_with_413(env):
    store, client, tokens = env
    csrf = sign_in(client, tokens["ann"])
    fields = form_fields(client.get("/").text)
    big = {**fields, "action": "skip", "demonstration": "x" * 70_000}
    assert client.post("/label", data=big).status_code == 413  # Content-Length over the limit

    def chunks():  # no Content-Length: counted as it streams in
        for _ in range(20):
            yield b"y" * 4096

    response = client.post("/api/label", content=chunks(), headers={"x-csrf-token": csrf,
                                                                     "content-type": "application/json"})
    assert response.status_code == 413
    assert store.labels() == []


def test_hostile_prompts_and_responses_render_as_text(env):
    _, client, tokens = env
    sign_in(client, tokens["ann"])
    response = client.get("/")
    page = response.text
    assert "<script>window.__pwned" not in page and "<img src=x" not in page
    assert ("&lt;script&gt;window.__pwned = 1&lt;/script&gt;"
            "&lt;img src=x onerror=&#34;window.__pwned = 2&#34;&gt;") in page
    assert "&lt;/div&gt;&lt;script&gt;window.__pwned = 3&lt;/script&gt;" in page
    assert page.count("<script") == 1  # our own script file, nothing else
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp


def test_admin_page_and_stats(env):
    store, client, tokens = env
    sign_in(client, tokens["ann"])
    fields = form_fields(client.get("/").text)
    client.post("/label", data={**fields, "action": "rank", "rank_0": "1", "rank_1": "2", "rank_2": "3"})
    assert client.get("/admin").status_code == 403  # a labeller is not the admin
    admin = TestClient(client.app)
    sign_in_page = admin.get("/login").text
    login_csrf = re.search(r'name="login_csrf" value="([^"]+)"', sign_in_page).group(1)
    page = admin.post("/login", data={"token": ADMIN, "login_csrf": login_csrf}).text
    assert "<h1>Progress</h1>" in page and "<td>ann</td>" in page
    stats = admin.get("/api/stats").json()
    assert stats["labels"] == {"rank": 1, "skip": 0, "flag": 0} and stats["tasks"] == 2
    assert client.get("/api/stats").status_code == 403


def test_json_api_with_a_bearer_token(env):
    store, client, tokens = env
    headers = {"authorization": f"Bearer {tokens['bob']}"}
    task = client.get("/api/task", headers=headers).json()["task"]
    assert task["prompt"] == [{"role": "user", "content": XSS_PROMPT}] and len(task["responses"]) == 3
    body = {"task_id": task["id"], "submission_id": "bob-0001", "action": "rank", "ranks": [0, 2, 1]}
    first = client.post("/api/label", json=body, headers=headers)
    assert first.status_code == 201 and first.json()["duplicate"] is False
    again = client.post("/api/label", json=body, headers=headers)  # a retry: stored once
    assert again.status_code == 200 and again.json() == {"label_id": first.json()["label_id"], "duplicate": True}
    assert client.post("/api/label", json={**body, "submission_id": "bob-0002"}, headers=headers).status_code == 409
    second = client.get("/api/task", headers=headers).json()["task"]
    short = {**body, "task_id": second["id"], "submission_id": "bob-0003", "ranks": [0]}
    response = client.post("/api/label", json=short, headers=headers)
    assert response.status_code == 422 and "every one of the 3" in response.json()["detail"]
    assert client.post("/api/label", content=b"{", headers=headers).status_code == 422
    assert len(store.labels()) == 1


def test_task_ids_past_sqlites_integer_range_are_refused_clearly(env):
    store, client, tokens = env
    headers = {"authorization": f"Bearer {tokens['bob']}"}
    body = {"submission_id": "bob-0001", "action": "skip"}
    for task_id in (2**63, -(2**63) - 1, 0):  # the driver overflowed (500) on the first two
        response = client.post("/api/label", json={**body, "task_id": task_id}, headers=headers)
        assert response.status_code == 422 and "task_id must be a whole number from 1 to" in response.json()["detail"]
    response = client.post("/api/label", json={**body, "task_id": 2**63 - 1}, headers=headers)
    assert response.status_code == 404  # in range: the database is asked, and has no such task
    sign_in(client, tokens["ann"])
    fields = form_fields(client.get("/").text)
    response = client.post("/label", data={**fields, "action": "skip", "task_id": str(2**63)})
    assert response.status_code == 422 and "task_id must be a whole number from 1 to" in response.text
    assert store.labels() == []


def test_deeply_nested_json_is_a_clear_400_and_huge_numbers_a_422(env):
    store, client, tokens = env
    headers = {"authorization": f"Bearer {tokens['bob']}"}
    deep = b"[" * 20_000 + b"]" * 20_000  # 40 KB, under the body limit; json.loads recursed out (500)
    response = client.post("/api/label", content=deep, headers=headers)
    assert response.status_code == 400 and "nested too deeply" in response.json()["detail"]
    response = client.post("/api/label", content=b'{"task_id": ' + b"1" * 5000 + b"}", headers=headers)
    assert response.status_code == 422 and "not JSON" in response.json()["detail"]  # past int()'s digit limit
    assert store.labels() == []


def test_host_allow_list_refuses_other_names_as_rlhfkit_serve_does(env):
    store, _, _ = env
    assert allowed_hosts("127.0.0.1") == ["127.0.0.1", "localhost"]
    assert allowed_hosts("::1", ["Labels.Example.com"]) == ["127.0.0.1", "localhost", "[::1]", "labels.example.com"]
    assert allowed_hosts("10.0.0.5") == ["127.0.0.1", "localhost", "10.0.0.5"]
    assert allowed_hosts("0.0.0.0") is None  # every address: no names to check against
    with pytest.raises(ValueError, match="no port"):
        allowed_hosts("127.0.0.1", ["labels.example.com:443"])
    client = TestClient(create_app(store, allowed_hosts=allowed_hosts("127.0.0.1", ["labels.example.com"])),
                        base_url="http://127.0.0.1:8000")
    for host in ("127.0.0.1:8000", "localhost", "labels.example.com"):
        assert client.get("/healthz", headers={"host": host}).status_code == 200
    for host in ("rebound.evil.example", "127.0.0.1.evil.example:8000"):  # DNS rebinding: another name
        response = client.get("/login", headers={"host": host})
        assert response.status_code == 400 and "nosniff" in response.headers["x-content-type-options"]
