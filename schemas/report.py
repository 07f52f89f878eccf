"""Findings and reports: what `xc-prep validate` prints/writes and `rejects.jsonl` holds.

A finding names the file (as written in data.txt, or data.txt itself), the 1-based line for
data.txt problems, the 0-based record index and the record id, a stable snake_case code and a
message. `hint` says what to do: the human report prints it, and the JSON report and each
rejects.jsonl line carry it as "hint" (empty when there is no fix to suggest).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Finding:
    file: str
    line: int | None
    index: int | None
    id: Any
    code: str
    message: str
    severity: Severity = "error"
    hint: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "line": self.line,
            "index": self.index,
            "id": self.id,
            "code": self.code,
            "message": self.message,
            "hint": self.hint,
        }

    def sort_key(self) -> tuple[str, int, int, str]:
        return (self.file, self.line or 0, -1 if self.index is None else self.index, self.code)


@dataclass
class SourceSummary:
    """Per-source counts for the summary table and the `sources` list of the JSON report."""

    file: str
    k: float | None
    records: int = 0
    images: int = 0
    videos: int = 0
    errors: int = 0
    warnings: int = 0
    tokens_total: int | None = None
    tokens_max: int | None = None
    trained_tokens_total: int | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)
    sources: list[SourceSummary] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """Things the user should know that are not findings (e.g. 'length check skipped: no tokenizer')."""

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "errors": [f.to_json() for f in sorted(self.errors, key=Finding.sort_key)],
            "warnings": [f.to_json() for f in sorted(self.warnings, key=Finding.sort_key)],
            "sources": [s.to_json() for s in self.sources],
            "notes": list(self.notes),
        }
