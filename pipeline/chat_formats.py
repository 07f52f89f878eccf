"""Records of other chat formats → the official IXC2.5 record (`xc-prep convert`'s per-record work).

One reader covers the formats that LLaVA, ShareGPT (LLaMA-Factory, ms-swift) and OpenAI's chat
API write, because they differ only in key names:

- turns: `conversations` or `messages`, each `{"from", "value"}` or `{"role", "content"}`;
  roles human/user → user, gpt/assistant/bot/model → assistant, system → system;
- text: a string, where `<image>` and `<video>` stand for the record's next `image`/`images` and
  `videos` entry (LLaVA, ShareGPT), or a list of content parts (OpenAI): `{"type": "text"}`, and
  `{"type": "image_url" | "image" | "input_image" | "video" | "video_url"}` naming its file, URL or
  data: URL, or naming nothing and taking the record's next `images` entry (the Hugging Face
  TRL layout);
- media values: local paths (relative ones resolved by the caller's `MediaStore`), `file://` and
  `data:` URLs, and Hugging Face image cells `{"bytes", "path"}`.

The result follows the README's rules: `<ImageHere>` once per image or video, in order, in user
turns; a single image needs none (it goes before the first question, as the official code puts
it), so a lone placeholder that opens the first user turn is dropped. The official format has no
system turn: `system="merge"` puts its text, then a blank line, before the first question's text
(a single image without placeholder still comes first); `system="drop"` leaves it out.
Consecutive turns of one role are joined with a newline (OpenAI's API reads them as one).
Anything else the official format cannot hold raises `DataError` with a code of `CONVERT_HINTS`,
a message and a fix.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pipeline.errors import DataError
from schemas.record import IMAGE_PLACEHOLDER, VIDEO_EXTENSIONS, is_video_path

MediaKind = Literal["image", "video"]
SystemPolicy = Literal["merge", "drop"]
SYSTEM_POLICIES: tuple[SystemPolicy, ...] = ("merge", "drop")

ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "system": "system",
    "developer": "system",  # OpenAI's newer name for the system message
}
TOOL_ROLES = frozenset({"tool", "function", "function_call", "observation", "ipython"})
TURN_LIST_KEYS = ("conversations", "messages")
IMAGE_LIST_KEYS = ("images", "image")
VIDEO_LIST_KEYS = ("videos", "video")
PLACEHOLDERS: dict[str, MediaKind] = {"<image>": "image", "<video>": "video"}
_PLACEHOLDER_RE = re.compile("(" + "|".join(map(re.escape, PLACEHOLDERS)) + ")")
TEXT_PART_TYPES = frozenset({"text", "input_text", "output_text"})
IMAGE_PART_TYPES = frozenset({"image", "image_url", "input_image"})
VIDEO_PART_TYPES = frozenset({"video", "video_url"})
TURN_JOIN = "\n"
SYSTEM_JOIN = "\n\n"

CONVERT_HINTS: dict[str, str] = {
    "json_syntax": "fix the JSON of that line (JSON Lines: one record per line)",
    "record_not_object": "each record must be a JSON object",
    "turns_missing": 'give the record its turns as "conversations" (from/value) or "messages" (role/content)',
    "turns_ambiguous": 'keep one of "conversations" and "messages"',
    "turns_bad_type": "the turns must be a non-empty list of objects",
    "turn_not_object": 'each turn must be an object such as {"from": "human", "value": ...} or {"role": "user", "content": ...}',
    "unknown_role": "use human/user, gpt/assistant (or bot/model) and system",
    "tool_turn": "the official format has no tool or function turns: drop such records or rewrite the calls as text",
    "content_bad_type": "a turn's text must be a string or a list of content parts",
    "part_unsupported": "only text, image and video content parts can be converted; drop the others",
    "system_not_first": "a system turn may only open the conversation",
    "turn_order": "start with a user turn and alternate user and assistant",
    "last_turn_not_assistant": "end with an assistant answer (drop the unanswered question)",
    "turn_empty": "write the turn's text, or drop the record",
    "media_not_in_question": "images and videos belong to user turns: move them to the question",
    "media_ambiguous": 'keep one of "image" and "images" (or "video" and "videos")',
    "media_bad_type": "give media as a path, a file:// or data: URL, or a list of them",
    "media_count_mismatch": "write one <image> (or <video>) per entry of the record's images (videos), in order",
    "media_missing": "fix the path, or pass --image-folder FOLDER that the relative paths start from",
    "media_remote": "download the file and give its local path: convert never fetches URLs",
    "media_data_url": "use a base64 data: URL of an image (data:image/png;base64,...)",
    "image_bytes_unreadable": "the image bytes are not an image Pillow can read: re-export the image",
    "video_extension": f"rename or re-encode the video to one of {' '.join(VIDEO_EXTENSIONS)} (the official format tells videos by extension)",
    "official_placeholder": "the text already holds <ImageHere>: validate such a file as it is instead of converting it",
    "duplicate_id": "give every record of the file its own id",
}
"""Every reason a record is not converted, with its fix."""


@dataclass(frozen=True)
class Slot:
    """An image or video at a position in a turn's text; `source` None takes the record's next entry."""

    kind: MediaKind
    source: Any = None


Segment = str | Slot
Resolve = Callable[[Any, MediaKind], str]
"""(media value as written, kind) → the path to write in the official record; raises DataError."""


@dataclass
class Converted:
    """One official record and what the conversion did to get it."""

    record: dict[str, Any]
    layout: Literal["from/value", "role/content"]
    system: Literal["none", "merged", "dropped"] = "none"
    joined_turns: int = 0


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    names = {dict: "object", list: "list", str: "string", int: "number", float: "number"}
    return names.get(type(value), type(value).__name__)


def reject(code: str, message: str) -> DataError:
    assert code in CONVERT_HINTS, f"unknown reject code {code}"
    return DataError(code, message, CONVERT_HINTS[code])


def convert_record(raw: Any, resolve: Resolve, system: SystemPolicy = "merge") -> Converted:
    """One record of LLaVA/ShareGPT/OpenAI shape → the official `{"id"?, "image"?, "conversations"}`.

    The id is left to the caller (it needs the whole file to keep ids unique).
    """
    if not isinstance(raw, dict):
        raise reject("record_not_object", f"the record is a JSON {json_type(raw)}, not an object")
    present = [k for k in TURN_LIST_KEYS if k in raw]
    if not present:
        raise reject("turns_missing", f'no "conversations" or "messages" (keys: {", ".join(map(str, raw))})')
    if len(present) > 1:
        raise reject("turns_ambiguous", 'the record has both "conversations" and "messages"')
    messages = raw[present[0]]
    if not isinstance(messages, list) or not messages:
        raise reject("turns_bad_type", f'"{present[0]}" is not a non-empty list')
    images = _media_list(raw, IMAGE_LIST_KEYS)
    videos = _media_list(raw, VIDEO_LIST_KEYS)

    turns: list[tuple[str, list[Segment]]] = []
    layout: Literal["from/value", "role/content"] = "from/value"
    for t, message in enumerate(messages):
        if not isinstance(message, dict):
            raise reject("turn_not_object", f"turn {t} is a JSON {json_type(message)}")
        if message.get("role") is not None or message.get("content") is not None:
            layout = "role/content"
        if _first(message, ("tool_calls", "function_call")) is not None:
            raise reject("tool_turn", f"turn {t} calls a tool")
        role_value = _first(message, ("from", "role"))
        role = ROLES.get(role_value.strip().lower()) if isinstance(role_value, str) else None
        if role is None:
            code = "tool_turn" if str(role_value).strip().lower() in TOOL_ROLES else "unknown_role"
            raise reject(code, f"turn {t} has the role {role_value!r}")
        turns.append((role, _segments(t, _first(message, ("value", "content")))))

    system_parts: list[str] = []
    if isinstance(raw.get("system"), str) and raw["system"].strip():
        system_parts.append(raw["system"].strip())
    if turns and turns[0][0] == "system":
        if any(isinstance(s, Slot) for s in turns[0][1]):
            raise reject("media_not_in_question", "the system turn holds an image or video")
        system_parts.append("".join(s for s in turns[0][1] if isinstance(s, str)).strip())
        turns = turns[1:]
    if any(role == "system" for role, _ in turns):
        raise reject("system_not_first", "a system turn follows other turns")

    joined, turns = _join_same_roles(turns)
    if not turns or turns[0][0] != "user":
        raise reject("turn_order", "the conversation does not start with a user turn")
    if turns[-1][0] != "assistant":
        raise reject("last_turn_not_assistant", f"the last turn ({len(turns) - 1}) is a user turn")
    for t, (role, segments) in enumerate(turns):
        if role == "assistant" and any(isinstance(s, Slot) for s in segments):
            raise reject("media_not_in_question", f"turn {t}, an answer, holds an image or video")

    paths = _place_media(turns, images, videos, resolve)
    conversations = []
    for t, (role, segments) in enumerate(turns):
        value = "".join(IMAGE_PLACEHOLDER if isinstance(s, Slot) else s for s in segments).strip()
        if not value:
            raise reject("turn_empty", f"turn {t} ({role}) has no text")
        conversations.append({"from": "human" if role == "user" else "gpt", "value": value})
    if len(paths) == 1:
        conversations[0]["value"] = _drop_leading_placeholder(conversations[0]["value"])
    system_text = SYSTEM_JOIN.join(p for p in system_parts if p)
    system_state: Literal["none", "merged", "dropped"] = "none"
    if system_text:
        system_state = "merged" if system == "merge" else "dropped"
        if system == "merge":
            conversations[0]["value"] = system_text + SYSTEM_JOIN + conversations[0]["value"]
    record: dict[str, Any] = {}
    if paths:
        record["image"] = paths[0] if len(paths) == 1 else paths
    record["conversations"] = conversations
    return Converted(record, layout, system_state, joined)


def _first(obj: dict[str, Any], keys: tuple[str, ...]) -> Any:
    """The first of `keys` whose value is not null (Arrow rows hold every key of a merged schema)."""
    return next((obj[k] for k in keys if obj.get(k) is not None), None)


def _media_list(raw: dict[str, Any], keys: tuple[str, str]) -> list[Any]:
    present = [k for k in keys if k in raw and raw[k] is not None]
    if len(present) > 1:
        raise reject("media_ambiguous", f'the record has both "{keys[0]}" and "{keys[1]}"')
    if not present:
        return []
    value = raw[present[0]]
    if isinstance(value, str | dict):
        return [value]
    if isinstance(value, list):
        return value
    raise reject("media_bad_type", f'"{present[0]}" is a JSON {json_type(value)}')


def _segments(t: int, content: Any) -> list[Segment]:
    """A turn's text as strings and media slots, in order."""
    if isinstance(content, str):
        return _split_placeholders(t, content)
    if not isinstance(content, list):
        raise reject("content_bad_type", f"turn {t}'s text is a JSON {json_type(content)}")
    out: list[Segment] = []
    for part in content:
        if isinstance(part, str):
            out.extend(_split_placeholders(t, part))
            continue
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in TEXT_PART_TYPES and isinstance(part.get("text"), str):
            out.extend(_split_placeholders(t, part["text"]))
        elif kind in IMAGE_PART_TYPES:
            out.append(Slot("image", _part_source(part, ("image_url", "image", "url", "path"))))
        elif kind in VIDEO_PART_TYPES:
            out.append(Slot("video", _part_source(part, ("video_url", "video", "url", "path"))))
        else:
            raise reject("part_unsupported", f"turn {t} holds a content part of type {kind!r}")
    return out


def _part_source(part: dict[str, Any], keys: tuple[str, ...]) -> Any:
    """The file or URL a content part names; None when it names none (the record's next entry)."""
    for key in keys:
        value = part.get(key)
        if isinstance(value, dict) and "url" in value:  # {"image_url": {"url": ...}}
            value = value["url"]
        if value is not None:
            return value
    return None


def _split_placeholders(t: int, text: str) -> list[Segment]:
    if IMAGE_PLACEHOLDER in text:
        raise reject("official_placeholder", f"turn {t} already holds {IMAGE_PLACEHOLDER}")
    return [
        Slot(PLACEHOLDERS[piece]) if piece in PLACEHOLDERS else piece for piece in _PLACEHOLDER_RE.split(text)
    ]


def _join_same_roles(turns: list[tuple[str, list[Segment]]]) -> tuple[int, list[tuple[str, list[Segment]]]]:
    out: list[tuple[str, list[Segment]]] = []
    joined = 0
    for role, segments in turns:
        if out and out[-1][0] == role:
            out[-1] = (role, [*out[-1][1], TURN_JOIN, *segments])
            joined += 1
        else:
            out.append((role, list(segments)))
    return joined, out


def _place_media(
    turns: list[tuple[str, list[Segment]]], images: list[Any], videos: list[Any], resolve: Resolve
) -> list[str]:
    """Bind every slot to its media (record lists in order), resolve them; the paths in slot order.

    A record whose single image (or video) has no slot gets one at the start of the first turn.
    """
    slots = [s for _, segments in turns for s in segments if isinstance(s, Slot)]
    listed = {"image": images, "video": videos}
    if not slots and len(images) + len(videos) == 1:
        kind: MediaKind = "image" if images else "video"
        turns[0][1].insert(0, Slot(kind))
        slots = [turns[0][1][0]]  # type: ignore[list-item]
    unsourced = {k: sum(1 for s in slots if s.kind == k and s.source is None) for k in listed}
    for k, entries in listed.items():
        if unsourced[k] != len(entries):
            raise reject(
                "media_count_mismatch",
                f"{unsourced[k]} <{k}> placeholder(s) or unnamed {k} part(s) for {len(entries)} "
                f"{k}(s) listed in the record",
            )
    next_entry = {"image": iter(images), "video": iter(videos)}
    paths = []
    for slot in slots:
        value = next(next_entry[slot.kind]) if slot.source is None else slot.source
        path = resolve(value, slot.kind)
        if slot.kind == "video" and not is_video_path(path):
            raise reject(
                "video_extension", f"the video {path!r} does not end in {' '.join(VIDEO_EXTENSIONS)}"
            )
        paths.append(path)
    return paths


def _drop_leading_placeholder(value: str) -> str:
    """A single image's placeholder that opens the first question goes: the official single-image
    layout puts the image before the first question anyway. Kept when it is the turn's only text."""
    if value.startswith(IMAGE_PLACEHOLDER) and value[len(IMAGE_PLACEHOLDER) :].strip():
        return value[len(IMAGE_PLACEHOLDER) :].lstrip()
    return value
