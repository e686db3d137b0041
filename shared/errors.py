"""Errors the user can act on, and the record of what `--skip-bad` skipped.

Every message names the file, the record (line number or id) and the fix, so that a user
running on millions of chunks can find the culprit without a debugger.
"""
from __future__ import annotations

import json
from pathlib import Path


class BadInput(Exception):
    """Input the user must fix (or skip with --skip-bad). The CLI prints it and exits 2."""

    def __init__(self, message: str, *, file: str | Path | None = None, record: str | int | None = None,
                 fix: str | None = None):
        self.file = str(file) if file is not None else None
        self.record = record
        self.fix = fix
        self.reason = message
        parts = []
        if self.file is not None:
            where = self.file
            if record is not None:
                where += f", {'line ' if isinstance(record, int) else ''}{record}"
            parts.append(where + ":")
        parts.append(message)
        text = " ".join(parts)
        if fix:
            text += f"; {fix}"
        super().__init__(text)


class RejectLog:
    """Collects records skipped under --skip-bad and writes them to rejected.jsonl with the reason.

    Nothing is dropped silently: the caller prints `summary()` and totals must add up
    (read = kept + rejected).
    """

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path is not None else None
        self.items: list[dict] = []

    def add(self, err: BadInput | str, record: dict | None = None, **extra) -> None:
        if isinstance(err, BadInput):
            item = {"file": err.file, "record": err.record, "reason": err.reason}
        else:
            item = {"reason": str(err)}
        item.update(extra)
        if record is not None:
            item["data"] = record
        self.items.append(item)

    def __len__(self) -> int:
        return len(self.items)

    def write(self) -> None:
        if self.path is None or not self.items:
            return
        from shared.atomic import atomic_path
        with atomic_path(self.path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for item in self.items:
                f.write(json.dumps(item, ensure_ascii=False, default=str) + "\n")

    def summary(self) -> str:
        if not self.items:
            return "rejected 0"
        return f"rejected {len(self.items)} (see {self.path})"
