"""Input contract: the upstream IXC2.5 JSON record and the `data.txt` source list (docs/IXC25.md#data-format).

A JSON file is a list of records `{"id", "conversations", "image"?}`; `image` is one path or a list
of paths (images or videos). `data.txt` lists `<json path> <k>` lines; a source contributes
`int(k * 1000)` samples per epoch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

IMAGE_PLACEHOLDER = "<ImageHere>"
USER_ROLES = frozenset({"human", "user"})
ASSISTANT_ROLES = frozenset({"bot", "gpt", "assistant"})
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".wmv")

Role = Literal["user", "assistant"]

MAX_K = 100_000
"""The largest k a data.txt line may give: int(k * 1000) = 100,000,000 samples per epoch from one
source. The trainer's epoch plan holds tens of bytes per drawn sample (ids, lengths, packs), so a
larger k asks for gigabytes before the first step (k = 1e9: terabytes); it is a typo far more often
than a wish. `xc-prep validate`/`shard` refuse it at its data.txt line, the trainer's plan too."""
MAX_SAMPLES_PER_EPOCH = MAX_K * 1000


def role_of(from_value: str) -> Role | None:
    """Map a turn's `from` to our role name, case-insensitively; None for an unknown role."""
    lowered = from_value.strip().lower()
    if lowered in USER_ROLES:
        return "user"
    if lowered in ASSISTANT_ROLES:
        return "assistant"
    return None


def is_video_path(path: str) -> bool:
    """Whether a media path names a video (by extension, as upstream decides)."""
    return path.lower().endswith(VIDEO_EXTENSIONS)


@dataclass(frozen=True)
class Turn:
    """One conversation turn after validation."""

    role: Role
    value: str


@dataclass(frozen=True)
class Record:
    """One validated input record.

    `media` holds the paths as written in the JSON file; `media_paths` the resolved files.
    """

    id: Any
    turns: tuple[Turn, ...]
    media: tuple[str, ...]
    media_paths: tuple[Path, ...]

    @property
    def has_placeholders(self) -> bool:
        return any(IMAGE_PLACEHOLDER in t.value for t in self.turns)


@dataclass(frozen=True)
class Source:
    """One `data.txt` line: a JSON file and its per-epoch weight."""

    path: str
    """The JSON path exactly as written in data.txt (used in reports and the manifest)."""
    resolved: Path
    """The file it resolved to (current directory first, then data.txt's folder)."""
    k: float
    """Weight from data.txt: the source contributes int(k * 1000) samples per epoch."""
    line: int
    """1-based line number in data.txt."""

    @property
    def samples_per_epoch(self) -> int:
        return int(self.k * 1000)

    @property
    def name(self) -> str:
        """A stable, file-system safe name for this source (its index keeps names unique)."""
        stem = Path(self.path).stem or "source"
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)
        return f"{self.line:03d}-{safe}"


# JSON Schema of one input record, exported to `schemas/record.schema.json` for other tools.
_MEDIA_PATH = {"type": "string", "minLength": 1}
RECORD_JSON_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://github.com/xcomposer-finetune/schemas/record.schema.json",
    "title": "IXC2.5 fine-tuning record",
    "description": (
        "One element of an upstream InternLM-XComposer 2.5 fine-tuning JSON file (a list of these). "
        "Multi-image records hold one <ImageHere> per image in user turns; a single image needs none."
    ),
    "type": "object",
    "required": ["id", "conversations"],
    "properties": {
        "id": {"description": "Record id, unique within its file.", "type": ["string", "integer"]},
        "conversations": {
            "type": "array",
            "minItems": 2,
            "description": "Alternating user/assistant turns, starting with user, ending with assistant.",
            "items": {
                "type": "object",
                "required": ["from", "value"],
                "properties": {
                    "from": {
                        "type": "string",
                        "description": "human/user for the user; bot/gpt/assistant for the assistant "
                        "(case-insensitive).",
                        "pattern": "^(?i:human|user|bot|gpt|assistant)$",
                    },
                    "value": {"type": "string", "pattern": "\\S"},
                },
            },
        },
        "image": {
            "description": "One image or video path, or a list of them (relative to the working "
            "directory, then to the JSON file's folder).",
            "oneOf": [_MEDIA_PATH, {"type": "array", "minItems": 1, "items": _MEDIA_PATH}],
        },
    },
}

RECORD_SCHEMA_FILE = Path(__file__).with_name("record.schema.json")


def render_record_json_schema() -> str:
    """The exported JSON Schema file's exact text."""
    return json.dumps(RECORD_JSON_SCHEMA, indent=2) + "\n"


if __name__ == "__main__":  # python -m schemas.record  -> rewrites the exported schema file
    RECORD_SCHEMA_FILE.write_text(render_record_json_schema())
    print(f"wrote {RECORD_SCHEMA_FILE}")
