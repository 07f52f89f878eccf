"""The turn markers of IXC2.5 prompts: their sentencepiece names and the names users know.

The InternLM2 sentencepiece model calls them `[UNUSED_TOKEN_146]` (start of a turn, id 92543) and
`[UNUSED_TOKEN_145]` (end of a turn, id 92542); model cards, chat templates and lmdeploy write them
`<|im_start|>` and `<|im_end|>`. Every printed prompt uses the latter (`for_display`); token ids
and tokenization never change.
"""

from __future__ import annotations

END_OF_TURN = "[UNUSED_TOKEN_145]"
START_OF_TURN = "[UNUSED_TOKEN_146]"
DISPLAY_NAMES = {START_OF_TURN: "<|im_start|>", END_OF_TURN: "<|im_end|>"}
"""Sentencepiece piece name -> the name printed prompts show."""


def for_display(text: str) -> str:
    """Decoded text with the turn markers written as `<|im_start|>` / `<|im_end|>`."""
    for piece, name in DISPLAY_NAMES.items():
        text = text.replace(piece, name)
    return text
