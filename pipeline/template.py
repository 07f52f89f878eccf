"""Chat template, BOS rules, image placement and label mask of IXC2.5 fine-tuning (docs/IXC25.md#chat-template).

The default `layout="official"` reproduces the official training path token for token:
- `conv2text`: each turn is `[UNUSED_TOKEN_146]{user|assistant}\\n{value.strip()}[UNUSED_TOKEN_145]\\n`,
  the conversation ends with `</s>` (whose left whitespace the tokenizer strips: `...92542, 2`).
- `interleav_wrap`: a single image without placeholder goes before all text; otherwise the text is
  split on `<ImageHere>` and image k sits at placeholder k. Each non-empty text part is tokenized on
  its own and only the first gets `<s>`, so a leading image comes BEFORE `<s>`.
- `mask_human_targets`: labels are the ids, then everything from the previous answer's end up to
  and including each user turn's `[UNUSED_TOKEN_145]\\n[UNUSED_TOKEN_146]assistant\\n` is ignored,
  and everything after `</s>`. So answers, their closing 92542 and the final `</s>` are trained.
`layout="inference"` puts `<s>` at position 0 (as the model's chat does) and nowhere else.

`chat_text` + `render_chat_prompt` build the prompt of the official `chat()` (docs/IXC25.md#chat-inference)
from the same turn format and image placement: values unstripped, an optional system turn, the
history, the question and the assistant header; `<s>` first; no labels.

Truncation differs from upstream on purpose: the labels are computed on the whole sample, then it
is cut at `max_length`, never inside an image (the cut moves to the image's start and that image
and later ones are dropped); a sample left with no trained token is a `DataError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from pipeline.errors import DataError
from pipeline.tokenization import END_OF_TURN, EOS, START_OF_TURN
from schemas.record import IMAGE_PLACEHOLDER, Turn
from schemas.sample import IGNORE_INDEX, IMAGE_TOKEN_ID, LAYOUTS, Layout, image_token_count

DEFAULT_MAX_LENGTH = 16384
SPECIAL_TOKEN_HINT = (
    "remove or reword the special string (e.g. write '<|im_start|>' as '< |im_start| >'): "
    "the tokenizer turns it into a control token"
)
ROLE_HEADERS = {"user": f"{START_OF_TURN}user\n", "assistant": f"{START_OF_TURN}assistant\n"}
SYSTEM_HEADER = f"{START_OF_TURN}system\n"
TURN_END = f"{END_OF_TURN}\n"
CONVERSATION_END = EOS
ANSWER_HEADER = TURN_END + ROLE_HEADERS["assistant"]
"""What `mask_human_targets` ignores after a user turn's 92542 (6 tokens with the real tokenizer)."""


class TokenizerLike(Protocol):
    """What the template needs from `pipeline.tokenization.Tokenizer` (a fake may stand in)."""

    @property
    def bos_id(self) -> int: ...
    @property
    def eos_id(self) -> int: ...
    @property
    def end_of_turn_id(self) -> int: ...
    @property
    def start_of_turn_id(self) -> int: ...
    @property
    def control_ids(self) -> frozenset[int]: ...

    def encode(self, text: str) -> list[int]: ...
    def id_to_piece(self, token_id: int) -> str: ...


@dataclass
class Rendered:
    """A tokenized conversation. Shapes: input_ids, labels int32[T]; one span and grid per kept image."""

    input_ids: np.ndarray
    labels: np.ndarray
    spans: list[tuple[int, int]]
    """[start, end) token positions of each kept image block."""
    grids: list[tuple[int, int]]
    """(rows, cols) of each kept image; images past the cut are gone from both lists."""
    truncated: bool = False
    dropped_images: int = 0
    """Images cut away by truncation (the last ones): the caller must drop their tiles."""
    full_length: int = field(default=0)
    """Token count before truncation."""

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_trained(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


def conversation_text(turns: Sequence[Turn]) -> str:
    """The official `conv2text`: the whole conversation as one string, placeholders included."""
    body = "".join(ROLE_HEADERS[t.role] + t.value.strip() + TURN_END for t in turns)
    return body + CONVERSATION_END


def text_parts(turns: Sequence[Turn], num_images: int) -> list[str]:
    """The text pieces between images: image k goes after part k (len = num_images + 1)."""
    return split_at_images(conversation_text(turns), num_images)


def split_at_images(text: str, num_images: int) -> list[str]:
    """`text` cut at its placeholders; a single image without placeholder goes before all of it."""
    placeholders = text.count(IMAGE_PLACEHOLDER)
    if num_images == 1 and placeholders == 0:
        return ["", text]  # a single image without placeholder goes before all text
    if placeholders != num_images:
        raise DataError(
            "image_count_mismatch",
            f"the conversation has {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) for {num_images} image(s)",
            hint=f"put one {IMAGE_PLACEHOLDER} per image, in order (a single image needs none)",
        )
    return text.split(IMAGE_PLACEHOLDER)


def mask_human_targets(
    input_ids: np.ndarray, *, end_of_turn_id: int, eos_id: int, answer_header_len: int
) -> np.ndarray:
    """The official label mask: even-numbered 92542s end user turns, odd ones end answers.

    Upstream hard-codes the answer header as 6 tokens (`i + 6`); we take its length from the
    tokenizer so a tiny tokenizer gets the same mask.
    """
    labels = input_ids.copy()
    end_count = 0
    last_answer_end = 0
    for i in np.flatnonzero((input_ids == end_of_turn_id) | (input_ids == eos_id)).tolist():
        if input_ids[i] == end_of_turn_id:
            if end_count % 2 == 0:  # end of a user turn: ignore it and the answer header
                labels[last_answer_end : i + answer_header_len] = IGNORE_INDEX
            else:
                last_answer_end = i + 1
            end_count += 1
        else:  # `</s>` is trained, anything after it is padding
            labels[i + 1 :] = IGNORE_INDEX
            break
    else:
        # No `</s>`: upstream's text-only truncation. Ends in a user turn → drop all after the
        # last answer (upstream keeps the `\n` at last_answer_end trained; so do we).
        if end_count % 2 == 0:
            labels[last_answer_end + 1 :] = IGNORE_INDEX
    return labels


def _assemble(
    parts: Sequence[str], grids: Sequence[tuple[int, int]], tokenizer: TokenizerLike, layout: Layout
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """input_ids int32[T] (IMAGE_TOKEN_ID on images) and the image spans, untruncated."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r} (expected one of {', '.join(LAYOUTS)})")
    pieces: list[np.ndarray] = []
    spans: list[tuple[int, int]] = []
    length = 0
    need_bos = layout == "official"
    if layout == "inference":
        pieces.append(np.array([tokenizer.bos_id], dtype=np.int32))
        length = 1
    for k, part in enumerate(parts):
        if part:  # upstream skips empty parts (image first, or two adjacent placeholders)
            ids = tokenizer.encode(part)
            if need_bos:
                ids = [tokenizer.bos_id, *ids]
                need_bos = False
            pieces.append(np.asarray(ids, dtype=np.int32))
            length += len(ids)
        if k < len(grids):
            n = image_token_count(*grids[k])
            pieces.append(np.full(n, IMAGE_TOKEN_ID, dtype=np.int32))
            spans.append((length, length + n))
            length += n
    return np.concatenate(pieces), spans


def check_control_ids(input_ids: np.ndarray, num_turns: int, tokenizer: TokenizerLike) -> None:
    """DataError `special_token` unless the control ids in `input_ids` are exactly those the
    template places: one `<s>`, one `</s>`, and one turn start and end per turn.

    The checks refuse the strings of control pieces in a turn's text; this catches whatever else
    text could become a control id through, so a sample never holds one the template did not put.
    """
    expected = {
        tokenizer.bos_id: 1,
        tokenizer.eos_id: 1,
        tokenizer.start_of_turn_id: num_turns,
        tokenizer.end_of_turn_id: num_turns,
    }
    ids, counts = np.unique(input_ids[np.isin(input_ids, list(tokenizer.control_ids))], return_counts=True)
    found = dict(zip(ids.tolist(), counts.tolist(), strict=True))
    extra = {i: found.get(i, 0) - expected.get(i, 0) for i in {*found, *expected}}
    if any(extra.values()):
        shown = ", ".join(
            f"{tokenizer.id_to_piece(i)} (id {i}) {'+' if n > 0 else ''}{n}"
            for i, n in sorted(extra.items())
            if n
        )
        raise DataError(
            "special_token",
            f"the conversation's text becomes control tokens the template does not place: {shown}",
            hint=SPECIAL_TOKEN_HINT,
        )


def chat_text(query: str, history: Sequence[tuple[str, str]] = (), system: str | None = None) -> str:
    """The text of the official `chat()` prompt (placeholders included, nothing stripped): the
    system turn when `system` is non-empty, each (question, answer) of `history`, the question,
    and the assistant header the answer follows."""
    text = f"{SYSTEM_HEADER}{system}{TURN_END}" if system else ""
    for question, answer in history:
        text += ROLE_HEADERS["user"] + question + TURN_END + ROLE_HEADERS["assistant"] + answer + TURN_END
    return text + ROLE_HEADERS["user"] + query + TURN_END + ROLE_HEADERS["assistant"]


def render_chat_prompt(
    text: str,
    grids: Sequence[tuple[int, int]],
    tokenizer: TokenizerLike,
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """input_ids int32[T] (IMAGE_TOKEN_ID on images) and image spans of a `chat_text` prompt.

    `<s>` first, then each text part and image block (the inference layout). Upstream cuts a longer
    prompt at `max_length`, which removes its end (the question, the assistant header): refused
    here with a DataError instead.
    """
    grids = [(int(r), int(c)) for r, c in grids]
    input_ids, spans = _assemble(split_at_images(text, len(grids)), grids, tokenizer, "inference")
    if len(input_ids) > max_length:
        raise DataError(
            "prompt_too_long",
            f"the prompt takes {len(input_ids)} tokens ({sum(e - s for s, e in spans)} for "
            f"{len(spans)} image(s)), more than max_length {max_length}",
            hint="start a new conversation (the history counts), use fewer or smaller images, or a lower hd_num",
        )
    return input_ids, spans


def count_tokens(
    turns: Sequence[Turn],
    grids: Sequence[tuple[int, int]],
    tokenizer: TokenizerLike,
    *,
    layout: Layout = "official",
) -> int:
    """Untruncated token count of a conversation (text tokens + image blocks + BOS)."""
    parts = text_parts(turns, len(grids))
    text_tokens = sum(len(tokenizer.encode(p)) for p in parts if p)
    return text_tokens + 1 + sum(image_token_count(*g) for g in grids)


def render_conversation(
    turns: Sequence[Turn],
    grids: Sequence[tuple[int, int]],
    tokenizer: TokenizerLike,
    *,
    layout: Layout = "official",
    max_length: int = DEFAULT_MAX_LENGTH,
) -> Rendered:
    """Tokens, labels and image spans of one conversation, truncated safely to `max_length`."""
    grids = [(int(r), int(c)) for r, c in grids]
    input_ids, spans = _assemble(text_parts(turns, len(grids)), grids, tokenizer, layout)
    check_control_ids(input_ids, len(turns), tokenizer)
    answer_header_len = len(tokenizer.encode(ANSWER_HEADER))
    labels = mask_human_targets(
        input_ids,
        end_of_turn_id=tokenizer.end_of_turn_id,
        eos_id=tokenizer.eos_id,
        answer_header_len=answer_header_len,
    )
    full_length = len(input_ids)
    cut = full_length
    if full_length > max_length:
        cut = max_length
        for start, end in spans:
            if start < cut < end:
                cut = start  # never cut inside an image: drop it whole
        input_ids, labels = input_ids[:cut], labels[:cut]
    kept = sum(1 for _, end in spans if end <= cut)
    rendered = Rendered(
        input_ids=input_ids,
        labels=labels,
        spans=spans[:kept],
        grids=grids[:kept],
        truncated=cut < full_length,
        dropped_images=len(spans) - kept,
        full_length=full_length,
    )
    if rendered.num_trained == 0:
        if rendered.truncated:
            raise DataError(
                "too_long_no_trained_tokens",
                f"the sample takes {full_length} tokens ({sum(e - s for s, e in spans)} for "
                f"{len(spans)} image(s)); cut to max_length {max_length} at token {cut}, no answer "
                f"token is left to train on",
                hint="shorten the conversation, use fewer or smaller images (lower --hd-num), "
                "or raise --max-length",
            )
        raise DataError("no_trained_tokens", "the conversation has no assistant answer to train on")
    return rendered
