"""The labelling database: its tables and every transaction (SQLAlchemy 2 Core; SQLite by default).

Durability: SQLite runs in WAL mode with ``synchronous=FULL`` and every write commits before the
web layer answers, so a label whose submission was acknowledged survives a crash or power cut.

Concurrency: SQLite write transactions start with ``BEGIN IMMEDIATE`` (one writer at a time, the
others wait), so "count a task's free slots, then assign it" cannot race and a transaction never
fails with SQLITE_BUSY when it upgrades from reader to writer. On a server database (PostgreSQL)
the chosen task row is locked (``FOR UPDATE SKIP LOCKED``) and its free slots re-counted under
the lock.

Tokens are 192-bit random strings, so a plain SHA-256 is the right way to store them (a slow
password hash guards guessable secrets; these are not guessable) and lets a token be looked up.

Core rather than the ORM, and the hot statements built once at import: on SQLite, building a
statement and the ORM's unit of work cost several times more than running the SQL.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import re
import secrets
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import (
    Column,
    Connection,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    bindparam,
    case,
    create_engine,
    delete,
    event,
    exists,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, OperationalError

from rlhfkit.data.records import Message, Messages, messages_to_dicts
from rlhfkit.errors import ConfigError, RlhfkitError

LEASE_SECONDS = 30 * 60  # a task handed out and not answered is held for its labeller this long
SESSION_SECONDS = 12 * 3600  # a sign-in lasts a working day
MAX_RESPONSES = 16
MAX_DEMONSTRATION = 8000  # characters; with the 64 KB request limit even 4-byte UTF-8 fits
MAX_NOTE = 500
ACTIONS = ("rank", "skip", "flag")
THINKING_CAP_SECONDS = 600  # one answer counts at most this long towards time on task (breaks)
_SUBMISSION_ID = re.compile(r"[A-Za-z0-9_-]{8,64}")
_ADMIN_KEY = "admin_token_sha256"

# --- tables ------------------------------------------------------------------------------------

metadata = MetaData()

setting_table = Table(
    "settings", metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)
labeller_table = Table(
    "labellers", metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("token_sha256", String(64), nullable=False, unique=True),
    Column("created_at", Float, nullable=False),
)
session_table = Table(
    "sessions", metadata,
    Column("id_sha256", String(64), primary_key=True),  # the cookie, hashed
    Column("labeller_id", ForeignKey("labellers.id")),  # NULL: the admin
    Column("csrf", String(64), nullable=False),
    Column("expires_at", Float, nullable=False),
)
task_table = Table(
    "tasks", metadata,
    Column("id", Integer, primary_key=True),
    Column("key", String(64), nullable=False, unique=True),  # reloading a file adds nothing twice
    Column("prompt", Text, nullable=False),  # JSON list of {role, content}
    Column("responses", Text, nullable=False),  # JSON list of strings
    Column("meta", Text, nullable=False),  # JSON object, exported with each label
    Column("source", String(300), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("done", Integer, nullable=False, index=True),  # rank and flag answers so far
)
# A task handed to a labeller: "open" until answered ("done", "skipped") or "expired".
assignment_table = Table(
    "assignments", metadata,
    Column("id", Integer, primary_key=True),
    Column("task_id", ForeignKey("tasks.id"), nullable=False),
    Column("labeller_id", ForeignKey("labellers.id"), nullable=False, index=True),
    Column("state", String(16), nullable=False),
    Column("assigned_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    UniqueConstraint("task_id", "labeller_id"),  # never the same task twice
    Index("ix_assignments_task_state", "task_id", "state"),
)
label_table = Table(
    "labels", metadata,
    Column("id", Integer, primary_key=True),
    Column("submission_id", String(64), nullable=False, unique=True),  # a retried POST stores nothing new
    Column("task_id", ForeignKey("tasks.id"), nullable=False),
    Column("labeller_id", ForeignKey("labellers.id"), nullable=False),
    Column("kind", String(8), nullable=False),  # rank, skip or flag
    Column("ranks", Text),  # JSON dense ranks, 0 = best; rank answers only
    Column("demonstration", Text, nullable=False),
    Column("note", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("seconds", Float, nullable=False),  # from the task being handed out to the answer
    UniqueConstraint("task_id", "labeller_id"),
)

A, T, L, LB, S = assignment_table.c, task_table.c, label_table.c, labeller_table.c, session_table.c

# A slot of a task is taken by an answer (skips excepted) or by a hand-out that has not expired.
_SLOT_TAKEN = (A.state == "done") | ((A.state == "open") & (A.expires_at > bindparam("now")))
_TAKEN = select(func.count()).select_from(assignment_table).where(A.task_id == bindparam("task_id"), _SLOT_TAKEN)
_HELD = select(A.id, A.task_id, A.expires_at).where(A.labeller_id == bindparam("lid"), A.state == "open").order_by(A.id)
_CANDIDATE = (
    select(T.id, T.prompt, T.responses)
    .where(T.done < bindparam("r"),
           ~exists().where(A.task_id == T.id, A.labeller_id == bindparam("lid")),
           select(func.count()).select_from(assignment_table).where(A.task_id == T.id, _SLOT_TAKEN)
           .scalar_subquery() < bindparam("r"))
    .order_by(T.id).limit(1).with_for_update(skip_locked=True)
)
_TASK = select(T.id, T.prompt, T.responses).where(T.id == bindparam("task_id"))
_ASSIGN = insert(assignment_table).values(task_id=bindparam("task_id"), labeller_id=bindparam("lid"), state="open",
                                           assigned_at=bindparam("now"), expires_at=bindparam("expires"))
_RENEW = update(assignment_table).where(A.id == bindparam("aid")).values(expires_at=bindparam("expires"))
_SET_STATE = update(assignment_table).where(A.id == bindparam("aid")).values(state=bindparam("state"))
_ASSIGNMENT = (select(A.id, A.state, A.assigned_at)
               .where(A.task_id == bindparam("task_id"), A.labeller_id == bindparam("lid")).with_for_update())
_LABEL_BY_SUBMISSION = select(L.id, L.labeller_id, L.task_id).where(L.submission_id == bindparam("sid"))
_COUNT_DONE = update(task_table).where(T.id == bindparam("task_id")).values(done=T.done + 1)
_BY_TOKEN = select(LB.id, LB.name).where(LB.token_sha256 == bindparam("digest"))
_SETTING = select(setting_table.c.value).where(setting_table.c.key == bindparam("key"))
_SESSION = (select(S.labeller_id, S.csrf, S.expires_at, LB.name)
            .select_from(session_table.outerjoin(labeller_table, S.labeller_id == LB.id))
            .where(S.id_sha256 == bindparam("digest")))


# --- records handed to the web layer and the exporter --------------------------------------------


class InvalidSubmission(RlhfkitError):
    """The submission is malformed (missing ranks, text too long, unknown action)."""


class NotAssigned(RlhfkitError):
    """The task does not exist or was never handed to this labeller."""


class Conflict(RlhfkitError):
    """The labeller already answered the task, or the submission id belongs to another answer."""


@dataclass(frozen=True)
class Principal:
    """Who is signed in: a labeller (``labeller_id``) or the admin (``labeller_id`` None)."""

    labeller_id: int | None
    name: str

    @property
    def admin(self) -> bool:
        return self.labeller_id is None


@dataclass(frozen=True)
class NewTask:
    key: str
    prompt: Messages
    responses: tuple[str, ...]
    source: str
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TaskView:
    id: int
    prompt: Messages
    responses: tuple[str, ...]


@dataclass(frozen=True)
class Submission:
    task_id: int
    submission_id: str  # made by the client, once per answer; a resend carries the same one
    action: str  # rank, skip or flag
    ranks: tuple[int, ...] | None = None  # rank only; lower is better, equal ranks are ties
    demonstration: str = ""  # a better answer, written by the labeller (any action)
    note: str = ""  # why a task was flagged


@dataclass(frozen=True)
class LabelRecord:
    """One answer with its task, as the exporter reads it."""

    label_id: int
    task_id: int
    prompt: Messages
    responses: tuple[str, ...]
    task_meta: dict
    labeller: str
    kind: str
    ranks: tuple[int, ...] | None
    demonstration: str
    note: str
    created_at: float
    submission_id: str


# --- engine --------------------------------------------------------------------------------------


def database_url(db: str) -> str:
    """A SQLAlchemy URL as given, or a file path turned into a SQLite URL."""
    if "://" in db:
        return db
    path = Path(db).expanduser().resolve()
    if not path.parent.is_dir():
        raise ConfigError(f"cannot create the database {db}: folder {path.parent} does not exist")
    return f"sqlite:///{path}"


def _engine(url: str):
    sqlite = url.startswith("sqlite")
    try:
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False} if sqlite else {},
                               pool_pre_ping=not sqlite)
    except ArgumentError as e:
        raise ConfigError(f"not a database URL: {url!r} ({e})") from None
    except ModuleNotFoundError as e:
        raise ConfigError(f"the database driver for {url.split('://')[0]} is not installed ({e}); "
                          "for PostgreSQL: pip install 'psycopg[binary]'") from None
    if sqlite:
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
    return engine


def _sqlite_connect(dbapi_connection, _record) -> None:
    # Let SQLAlchemy's "begin" hook issue BEGIN itself (the driver's own would be DEFERRED).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
    cursor.execute("PRAGMA synchronous=FULL")  # fsync the WAL at every commit: acked = on disk
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_begin(connection) -> None:
    connection.exec_driver_sql("BEGIN " + connection.get_execution_options().get("sqlite_begin", ""))


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(24)


def _prompt(text: str) -> Messages:
    return tuple(Message(m["role"], m["content"]) for m in json.loads(text))


def _view(row) -> TaskView:
    return TaskView(row.id, _prompt(row.prompt), tuple(json.loads(row.responses)))


# --- the store -----------------------------------------------------------------------------------


class Store:
    """Every read and write of the labelling database, each one transaction."""

    def __init__(self, db: str, labels_per_task: int = 3, lease_seconds: float = LEASE_SECONDS):
        if labels_per_task < 1:
            raise ConfigError(f"labels_per_task must be positive, got {labels_per_task}")
        self.url = database_url(db)
        self.engine = _engine(self.url)
        self.sqlite = self.url.startswith("sqlite")
        self.labels_per_task = labels_per_task
        self.lease_seconds = lease_seconds
        self._writer = self.engine.execution_options(sqlite_begin="IMMEDIATE")
        # SQLite admits one writer; threads of this process queue on a lock that hands over at
        # once, instead of on SQLite's busy handler, which sleeps in steps of up to 100 ms.
        self._write_lock = threading.Lock() if self.sqlite else contextlib.nullcontext()
        try:
            metadata.create_all(self.engine)  # the first connection: where a bad URL shows
        except OperationalError as e:
            shown = make_url(self.url).render_as_string(hide_password=True)
            reason = str(e.orig).strip().splitlines()[0] if e.orig else str(e)
            raise ConfigError(f"cannot open the label database {shown}: {reason}") from None

    def close(self) -> None:
        self.engine.dispose()

    @contextlib.contextmanager
    def _write(self) -> Iterator[Connection]:
        """A transaction that commits on leaving the block: before any response is sent."""
        with self._write_lock, self._writer.begin() as conn:
            yield conn

    def _read(self):
        return self.engine.begin()

    # --- people and sign-in ----------------------------------------------------------------------

    def add_labeller(self, name: str, rotate: bool = False) -> str:
        """Create a labeller (or, with ``rotate``, replace its token) and return the new token."""
        if not re.fullmatch(r"[\w.@+-]{1,64}", name):
            raise ConfigError(f"labeller name {name!r}: use 1-64 letters, digits or . _ @ + -")
        token = new_token()
        with self._write() as conn:
            found = conn.execute(select(LB.id).where(LB.name == name)).scalar()
            if found is not None and not rotate:
                raise ConfigError(f"labeller '{name}' already exists; --rotate gives it a new token "
                                  "(the old one stops working)")
            if found is None:
                conn.execute(insert(labeller_table).values(name=name, token_sha256=hash_token(token),
                                                           created_at=time.time()))
            else:
                conn.execute(update(labeller_table).where(LB.id == found).values(token_sha256=hash_token(token)))
                conn.execute(delete(session_table).where(S.labeller_id == found))
        return token

    def labeller_names(self) -> list[str]:
        with self._read() as conn:
            return list(conn.execute(select(LB.name).order_by(LB.name)).scalars())

    def set_admin_token(self, token: str = "") -> str:
        """Store the admin token's hash. With no token: keep the one stored, or make one on first
        start and return it (the only time it is shown); "" when nothing new was made."""
        with self._write() as conn:
            stored = conn.execute(_SETTING, {"key": _ADMIN_KEY}).scalar()
            if stored is not None and not token:
                return ""
            made = "" if token else new_token()
            conn.execute(delete(setting_table).where(setting_table.c.key == _ADMIN_KEY))
            conn.execute(insert(setting_table).values(key=_ADMIN_KEY, value=hash_token(token or made)))
            return made

    def authenticate(self, token: str) -> Principal | None:
        digest = hash_token(token)
        with self._read() as conn:
            admin = conn.execute(_SETTING, {"key": _ADMIN_KEY}).scalar()
            if admin is not None and hmac.compare_digest(admin, digest):
                return Principal(None, "admin")
            row = conn.execute(_BY_TOKEN, {"digest": digest}).first()
        return Principal(row.id, row.name) if row else None

    def open_session(self, who: Principal) -> tuple[str, str]:
        """A new sign-in: (session id for the cookie, CSRF token for the forms)."""
        session_id, csrf, now = new_token(), new_token(), time.time()
        with self._write() as conn:
            conn.execute(delete(session_table).where(S.expires_at < now))
            conn.execute(insert(session_table).values(id_sha256=hash_token(session_id), labeller_id=who.labeller_id,
                                                      csrf=csrf, expires_at=now + SESSION_SECONDS))
        return session_id, csrf

    def session(self, session_id: str) -> tuple[Principal, str] | None:
        """(who, CSRF token) of a live session, or None."""
        with self._read() as conn:
            row = conn.execute(_SESSION, {"digest": hash_token(session_id)}).first()
        if row is None or row.expires_at < time.time():
            return None
        return Principal(row.labeller_id, row.name or "admin"), row.csrf

    def close_session(self, session_id: str) -> None:
        with self._write() as conn:
            conn.execute(delete(session_table).where(S.id_sha256 == hash_token(session_id)))

    # --- tasks -----------------------------------------------------------------------------------

    def add_tasks(self, tasks: Iterable[NewTask]) -> int:
        """Insert the tasks whose key is new; return how many were added."""
        tasks = list({t.key: t for t in tasks}.values())
        now, added = time.time(), 0
        with self._write() as conn:
            for start in range(0, len(tasks), 500):  # bounded IN lists
                chunk = tasks[start : start + 500]
                known = set(conn.execute(select(T.key).where(T.key.in_([t.key for t in chunk]))).scalars())
                rows = [{"key": t.key, "prompt": json.dumps(messages_to_dicts(t.prompt), ensure_ascii=False),
                         "responses": json.dumps(list(t.responses), ensure_ascii=False),
                         "meta": json.dumps(t.meta, ensure_ascii=False), "source": t.source[:300],
                         "created_at": now, "done": 0} for t in chunk if t.key not in known]
                if rows:
                    conn.execute(insert(task_table), rows)
                added += len(rows)
        return added

    def known_keys(self, keys: Iterable[str]) -> set[str]:
        keys, found = list(keys), set()
        with self._read() as conn:
            for start in range(0, len(keys), 500):
                found |= set(conn.execute(select(T.key).where(T.key.in_(keys[start : start + 500]))).scalars())
        return found

    def next_task(self, labeller_id: int) -> TaskView | None:
        """The task this labeller should answer now, or None when none is left for them.

        A task already handed to them and not answered comes back (a page reload must not lose
        it); otherwise the oldest task with a free slot that they were never given. A task has
        ``labels_per_task`` slots, taken by answers (skips excepted) and by unexpired hand-outs.
        """
        now, r = time.time(), self.labels_per_task
        expires = now + self.lease_seconds
        with self._write() as conn:
            for held in conn.execute(_HELD, {"lid": labeller_id}).all():
                if held.expires_at > now or conn.execute(_TAKEN, {"task_id": held.task_id, "now": now}).scalar() < r:
                    conn.execute(_RENEW, {"aid": held.id, "expires": expires})
                    return _view(conn.execute(_TASK, {"task_id": held.task_id}).one())
                # Others filled it meanwhile: it is not shown again, though an answer still counts.
                conn.execute(_SET_STATE, {"aid": held.id, "state": "expired"})
            for _ in range(20):  # a server database may lose the slot to another labeller under the lock
                task = conn.execute(_CANDIDATE, {"lid": labeller_id, "r": r, "now": now}).first()
                if task is None:
                    return None
                if self.sqlite or conn.execute(_TAKEN, {"task_id": task.id, "now": now}).scalar() < r:
                    conn.execute(_ASSIGN, {"task_id": task.id, "lid": labeller_id, "now": now, "expires": expires})
                    return _view(task)
            return None

    def answered(self, labeller_id: int) -> int:
        """How many tasks this labeller has answered (skips included)."""
        with self._read() as conn:
            return conn.execute(select(func.count()).select_from(label_table)
                                .where(L.labeller_id == labeller_id)).scalar()

    # --- answers ---------------------------------------------------------------------------------

    def submit(self, labeller_id: int, sub: Submission) -> tuple[int, bool]:
        """Store one answer; (label id, True when this submission id was already stored).

        A resent submission (same id, same labeller and task) returns the stored label instead
        of adding a second one.
        """
        _check_shape(sub)
        try:
            with self._write() as conn:
                # The hand-out first, locked: on a server database a second copy of this submission
                # waits here until the first commits, then finds its label just below.
                given = conn.execute(_ASSIGNMENT, {"task_id": sub.task_id, "lid": labeller_id}).first()
                prior = conn.execute(_LABEL_BY_SUBMISSION, {"sid": sub.submission_id}).first()
                if prior is not None:
                    return _replay(prior, labeller_id, sub), True
                if given is None:
                    raise NotAssigned(f"task {sub.task_id} was not given to you; reload the page for your next task")
                if given.state in ("done", "skipped"):
                    raise Conflict(f"you already answered task {sub.task_id}")
                task = conn.execute(_TASK, {"task_id": sub.task_id}).one()
                ranks = _check_ranks(sub, len(json.loads(task.responses)))
                now = time.time()
                label_id = conn.execute(insert(label_table).values(
                    submission_id=sub.submission_id, task_id=sub.task_id, labeller_id=labeller_id, kind=sub.action,
                    ranks=None if ranks is None else json.dumps(ranks), demonstration=sub.demonstration.strip(),
                    note=sub.note.strip(), created_at=now, seconds=max(0.0, now - given.assigned_at),
                )).inserted_primary_key[0]
                conn.execute(_SET_STATE, {"aid": given.id, "state": "skipped" if sub.action == "skip" else "done"})
                if sub.action != "skip":  # a skip gives the slot back for someone else
                    conn.execute(_COUNT_DONE, {"task_id": sub.task_id})
                return label_id, False
        except IntegrityError:
            # Two copies of one submission raced on a server database, and the other one won.
            with self._read() as conn:
                prior = conn.execute(_LABEL_BY_SUBMISSION, {"sid": sub.submission_id}).first()
            if prior is None:
                raise Conflict(f"you already answered task {sub.task_id}") from None
            return _replay(prior, labeller_id, sub), True

    # --- reading back ----------------------------------------------------------------------------

    def labels(self) -> list[LabelRecord]:
        """Every answer with its task and labeller, oldest first."""
        query = (select(label_table, T.prompt, T.responses, T.meta, LB.name)
                 .select_from(label_table.join(task_table, L.task_id == T.id)
                              .join(labeller_table, L.labeller_id == LB.id))
                 .order_by(L.id))
        with self._read() as conn:
            rows = conn.execute(query).all()
        return [LabelRecord(row.id, row.task_id, _prompt(row.prompt), tuple(json.loads(row.responses)),
                            json.loads(row.meta), row.name, row.kind,
                            None if row.ranks is None else tuple(json.loads(row.ranks)),
                            row.demonstration, row.note, row.created_at, row.submission_id)
                for row in rows]

    def stats(self) -> dict:
        """Counts for the admin page, and the rankings its agreement is computed from."""
        now, r = time.time(), self.labels_per_task
        capped = (func.min if self.sqlite else func.least)(L.seconds, THINKING_CAP_SECONDS)
        count = select(func.count())
        with self._read() as conn:
            tasks = conn.execute(count.select_from(task_table)).scalar()
            complete = conn.execute(count.select_from(task_table).where(T.done >= r)).scalar()
            started = conn.execute(count.select_from(task_table).where(T.done > 0, T.done < r)).scalar()
            in_hand = conn.execute(count.select_from(assignment_table)
                                   .where(A.state == "open", A.expires_at > now)).scalar()
            kinds = dict(conn.execute(select(L.kind, func.count()).group_by(L.kind)).all())
            demos = conn.execute(count.select_from(label_table).where(L.demonstration != "")).scalar()
            per = conn.execute(
                select(LB.name, L.kind, func.count(L.id), func.sum(capped), func.max(L.created_at),
                       func.sum(case((L.demonstration != "", 1), else_=0)))
                .select_from(labeller_table.outerjoin(label_table, L.labeller_id == LB.id))
                .group_by(LB.name, L.kind)).all()
            ranked = conn.execute(select(L.task_id, LB.name, L.ranks).where(L.kind == "rank")
                                  .select_from(label_table.join(labeller_table, L.labeller_id == LB.id))).all()
        rankings = [(task, name, tuple(json.loads(ranks))) for task, name, ranks in ranked]
        people: dict[str, dict] = {}
        for name, kind, n, seconds, last, n_demos in per:
            row = people.setdefault(name, {"name": name, "rank": 0, "skip": 0, "flag": 0, "demonstrations": 0,
                                           "seconds": 0.0, "last": None})
            if kind is not None:
                row[kind] = n
                row["seconds"] += seconds or 0.0
                row["demonstrations"] += int(n_demos or 0)
                row["last"] = max(filter(None, [row["last"], last]), default=None)
        return {"labels_per_task": r, "tasks": tasks, "complete": complete, "started": started,
                "in_hand": in_hand, "labels": {k: kinds.get(k, 0) for k in ACTIONS}, "demonstrations": demos,
                "labellers": sorted(people.values(), key=lambda p: p["name"]), "rankings": rankings}


def _replay(prior, labeller_id: int, sub: Submission) -> int:
    if prior.labeller_id != labeller_id or prior.task_id != sub.task_id:
        raise Conflict(f"submission id {sub.submission_id} was already used for another answer; "
                       "send a fresh id with each new answer")
    return prior.id


def _check_shape(sub: Submission) -> None:
    if not _SUBMISSION_ID.fullmatch(sub.submission_id or ""):
        raise InvalidSubmission("submission_id must be 8-64 letters, digits, '-' or '_' (e.g. a UUID)")
    if sub.action not in ACTIONS:
        raise InvalidSubmission(f"action must be one of {', '.join(ACTIONS)}, got {sub.action!r}")
    if len(sub.demonstration) > MAX_DEMONSTRATION:
        raise InvalidSubmission(f"the better answer is {len(sub.demonstration)} characters; at most "
                                f"{MAX_DEMONSTRATION} are kept")
    if len(sub.note) > MAX_NOTE:
        raise InvalidSubmission(f"the note is {len(sub.note)} characters; at most {MAX_NOTE}")


def _check_ranks(sub: Submission, k: int) -> list[int] | None:
    """The labeller's ranks made dense and 0-based; None unless ranking.

    Any non-negative numbers are accepted, lower is better: the form's 1-based (3, 1, 3) and the
    API's 0-based (1, 0, 1) both become (1, 0, 1).
    """
    if sub.action != "rank":
        return None
    ranks = sub.ranks
    if ranks is None or len(ranks) != k:
        raise InvalidSubmission(f"give every one of the {k} responses a rank (1 = best; equal numbers for ties)")
    if not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= 1000 for x in ranks):
        raise InvalidSubmission(f"ranks must be small non-negative whole numbers, got {list(ranks)}")
    order = {rank: dense for dense, rank in enumerate(sorted(set(ranks)))}
    return [order[x] for x in ranks]
