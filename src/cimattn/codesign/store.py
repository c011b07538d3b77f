"""The study's persistent store (SQLite, `DIR/study.db`): the evaluation cache and each method's trials.

evaluations  key (hash of the evaluator's identity + the point) → params, metrics; a point
             evaluated once is never evaluated again, by any method or any later run.
trials       (method, seq) → key, status: a proposal is written `pending` before it is
             evaluated and `done` in the same transaction that stores its metrics, so a
             killed study resumes by evaluating exactly its pending proposals, then goes on.
Only the driver process writes (Ray workers return results to it).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS evaluations (key TEXT PRIMARY KEY, params TEXT NOT NULL, metrics TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS trials (method TEXT NOT NULL, seq INTEGER NOT NULL, key TEXT NOT NULL, params TEXT NOT NULL,
                                   status TEXT NOT NULL, PRIMARY KEY (method, seq));
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def point_key(identity: dict, params: dict) -> str:
    blob = json.dumps({"identity": identity, "params": params}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class Store:
    def __init__(self, path: Path, identity: dict):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None)  # autocommit; explicit transactions below
        self.db.executescript(SCHEMA)
        self.identity = identity

    def close(self) -> None:
        self.db.close()

    def key(self, params: dict) -> str:
        return point_key(self.identity, params)

    def lookup(self, params: dict) -> dict | None:
        row = self.db.execute("SELECT metrics FROM evaluations WHERE key = ?", (self.key(params),)).fetchone()
        return json.loads(row[0]) if row else None

    def trials(self, method: str) -> list[tuple[dict, dict | None]]:
        """(params, metrics) of the method's trials in order; metrics None while pending."""
        rows = self.db.execute(
            "SELECT t.params, e.metrics FROM trials t LEFT JOIN evaluations e ON e.key = t.key AND t.status = 'done' "
            "WHERE t.method = ? ORDER BY t.seq", (method,)).fetchall()
        return [(json.loads(p), json.loads(m) if m else None) for p, m in rows]

    def propose(self, method: str, params: dict) -> int:
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            seq = self.db.execute("SELECT COALESCE(MAX(seq) + 1, 0) FROM trials WHERE method = ?", (method,)).fetchone()[0]
            self.db.execute("INSERT INTO trials VALUES (?, ?, ?, ?, 'pending')", (method, seq, self.key(params), json.dumps(params)))
        return seq

    def finish(self, method: str, seq: int, params: dict, metrics: dict) -> None:
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("INSERT OR IGNORE INTO evaluations VALUES (?, ?, ?)", (self.key(params), json.dumps(params), json.dumps(metrics)))
            self.db.execute("UPDATE trials SET status = 'done' WHERE method = ? AND seq = ?", (method, seq))

    def pending(self, method: str) -> list[tuple[int, dict]]:
        rows = self.db.execute("SELECT seq, params FROM trials WHERE method = ? AND status = 'pending' ORDER BY seq", (method,)).fetchall()
        return [(s, json.loads(p)) for s, p in rows]

    def evaluations(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM evaluations").fetchone()[0]

    def get_meta(self, name: str):
        row = self.db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return json.loads(row[0]) if row else None

    def set_meta(self, name: str, value) -> None:
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (name, json.dumps(value)))
