"""The InternLM2 tokenizer through sentencepiece alone, plus a tiny deterministic one for tests.

`Tokenizer.encode` reproduces what the official code gets from the HF slow tokenizer
(transformers 4.33, `InternLM2Tokenizer`), without transformers or `trust_remote_code`:
- The special strings `<s>`, `</s>`, `<unk>`, `[UNUSED_TOKEN_145]`, `[UNUSED_TOKEN_146]` become
  their ids, looked up by piece name (so a tiny tokenizer with the same piece names works).
  Raw sentencepiece would split a literal `</s>` into text pieces.
- HF treats `<s>`, `</s>`, `<unk>` as plain-string special tokens and strips the whitespace on
  both sides of them; that is why the `\\n` before the final `</s>` of a sample disappears.
  `[UNUSED_TOKEN_14x]` keep their neighbours' whitespace (`...[UNUSED_TOKEN_145]\\n[UNUSED...`).
- The text between special strings is encoded by sentencepiece on its own (no merge across a
  special token), with no BOS; callers add BOS where the template says so.

`xc-prep tiny-tokenizer --out PATH` writes the tiny BPE model used by tests and the demo.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import re
import sys
from collections.abc import Iterator, Sequence
from functools import cached_property
from pathlib import Path

import sentencepiece as spm

from schemas.cli import ExitCode
from schemas.manifest import TOKENIZER_NAME
from schemas.tokens import END_OF_TURN, START_OF_TURN

# The InternLM2 model logs a harmless warning (a NUL piece with byte fallback) on every load.
spm.set_min_log_level(2)

BOS = "<s>"
EOS = "</s>"
UNK = "<unk>"
NEWLINE = "\n"
# HF strips whitespace around these (plain-string special tokens), not around the turn markers.
STRIPPING_SPECIALS = (BOS, EOS, UNK)
KEEPING_SPECIALS = (END_OF_TURN, START_OF_TURN)
_SPECIAL_RE = re.compile("(" + "|".join(re.escape(s) for s in STRIPPING_SPECIALS + KEEPING_SPECIALS) + ")")

ADDED_TOKENS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|action_start|>",
    "<|action_end|>",
    "<|interpreter|>",
    "<|plugin|>",
)
"""Special tokens the model's Hugging Face tokenizer adds after the sentencepiece vocabulary (ids
92544..92549, outside the 92,544-row embedding): not in tokenizer.model, so our encoder reads them
as text, but the HF tokenizer (e.g. at inference) makes each a single id."""

TINY_VOCAB_SIZE = 512
"""Default (maximum) vocabulary of the tiny tokenizer: 3 controls + 3 symbols + 256 bytes + merges."""
MIN_TINY_VOCAB_SIZE = 400
"""Below this the byte pieces, symbols and corpus characters leave no room for merges."""


class Tokenizer:
    """A sentencepiece model with the IXC2.5 special-token rules (see the module docstring)."""

    def __init__(self, model_bytes: bytes, path: Path | None = None):
        self.path = path
        self._model_bytes = model_bytes
        self._sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        self._special_ids = {s: self._piece_id(s) for s in STRIPPING_SPECIALS + KEEPING_SPECIALS}
        self._newline_id = self._piece_id(NEWLINE)

    @classmethod
    def from_path(cls, path: str | Path) -> Tokenizer:
        """Load a `tokenizer.model` file, or a folder (e.g. a model checkpoint) holding one."""
        path = Path(path)
        model_file = path / TOKENIZER_NAME if path.is_dir() else path
        if not model_file.is_file():
            where = f"folder {path} has no {TOKENIZER_NAME}" if path.is_dir() else f"{path} does not exist"
            raise FileNotFoundError(
                f"tokenizer: {where}; pass a sentencepiece {TOKENIZER_NAME} or a model folder "
                f"holding one (or build a tiny one with `xc-prep tiny-tokenizer --out PATH`)"
            )
        data = model_file.read_bytes()
        try:
            return cls(data, model_file)
        except RuntimeError as e:
            raise ValueError(f"tokenizer: {model_file} is not a sentencepiece model ({e})") from e

    def _piece_id(self, piece: str) -> int:
        piece_id = self._sp.piece_to_id(piece)
        # piece_to_id answers unk for an unknown piece: only `<unk>` itself may map there.
        if piece_id == self._sp.unk_id() and piece != UNK:
            where = self.path or "the sentencepiece model"
            raise ValueError(f"tokenizer: {where} has no piece {piece!r}, which IXC2.5 needs")
        return piece_id

    # ------------------------------------------------------------------ ids

    @property
    def vocab_size(self) -> int:
        return int(self._sp.vocab_size())

    @property
    def bos_id(self) -> int:
        return self._special_ids[BOS]

    @property
    def eos_id(self) -> int:
        return self._special_ids[EOS]

    @property
    def end_of_turn_id(self) -> int:
        """`[UNUSED_TOKEN_145]` (92542): ends every turn; the stop token at inference."""
        return self._special_ids[END_OF_TURN]

    @property
    def start_of_turn_id(self) -> int:
        """`[UNUSED_TOKEN_146]` (92543): starts every turn."""
        return self._special_ids[START_OF_TURN]

    @property
    def newline_id(self) -> int:
        return self._newline_id

    @cached_property
    def control_pieces(self) -> dict[str, int]:
        """Every piece literal text must never become, with its id: sentencepiece's control and
        unknown pieces (`<s>`, `</s>`, `<unk>`: our encoder maps their strings to their ids) and
        each user-defined piece that is markup rather than text (`[UNUSED_TOKEN_0]` ...
        `[UNUSED_TOKEN_146]` in IXC2.5's tokenizer). Sentencepiece always encodes a user-defined
        piece found in text as its one id; those of one repeated character (`\\n`, `Ｅ`, `——`)
        are ordinary text."""
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()  # type: ignore[attr-defined]  # generated
        proto.ParseFromString(self._model_bytes)
        markup = {proto.SentencePiece.CONTROL, proto.SentencePiece.UNKNOWN, proto.SentencePiece.USER_DEFINED}
        return {p.piece: i for i, p in enumerate(proto.pieces) if p.type in markup and len(set(p.piece)) > 1}

    @cached_property
    def control_ids(self) -> frozenset[int]:
        """The ids of `control_pieces`: only the chat template may place them in a sample."""
        return frozenset(self.control_pieces.values())

    @cached_property
    def forbidden_strings(self) -> tuple[str, ...]:
        """Strings a turn's text must not hold: `control_pieces` and the HF tokenizer's ADDED_TOKENS."""
        return tuple(dict.fromkeys([*self.control_pieces, *ADDED_TOKENS]))

    @cached_property
    def sha256(self) -> str:
        """sha256 of the model file bytes: recorded in shard manifests."""
        return hashlib.sha256(self._model_bytes).hexdigest()

    # ------------------------------------------------------------------ text

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, special strings as their ids, no BOS added."""
        chunks = _SPECIAL_RE.split(text)  # odd indices hold the special strings
        for i in range(1, len(chunks), 2):
            if chunks[i] in STRIPPING_SPECIALS:
                chunks[i - 1] = chunks[i - 1].rstrip()
                chunks[i + 1] = chunks[i + 1].lstrip()
        ids: list[int] = []
        for i, chunk in enumerate(chunks):
            if i % 2:
                ids.append(self._special_ids[chunk])
            elif chunk:
                ids.extend(self._sp.encode(chunk))
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Text of `ids`, with the special tokens written as their strings (`</s>`, ...), or left
        out with `skip_special` (what transformers' `skip_special_tokens=True` gives)."""
        by_id = {i: s for s, i in self._special_ids.items()}
        parts: list[str] = []
        for is_special, group in itertools.groupby(ids, key=lambda i: int(i) in by_id):
            group_ids = [int(i) for i in group]
            if is_special:
                if not skip_special:
                    parts.extend(by_id[i] for i in group_ids)
            else:
                parts.append(self._sp.decode(group_ids))
        return "".join(parts)

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))


# ---------------------------------------------------------------- tiny tokenizer

_SUBJECTS = (
    "the panda",
    "a small cat",
    "the red car",
    "this image",
    "the poster",
    "a tall tree",
    "the old man",
    "my friend",
    "the river",
    "a blue bird",
    "the city",
    "our team",
)
_VERBS = (
    "shows",
    "contains",
    "looks like",
    "is next to",
    "describes",
    "holds",
    "faces",
    "is painted with",
    "stands near",
    "points at",
)
_OBJECTS = (
    "green bamboo",
    "two images",
    "a bright sky",
    "dollar bills",
    "a quiet street",
    "soft colors",
    "the title",
    "white fur",
    "a wooden table",
    "the ocean",
    "3 people",
    "1,250 trees",
)
_QUESTIONS = (
    "Can you describe this image?",
    "What is in Image1 and Image2?",
    "How does the color contribute to the mood?",
    "What elements indicate the genre?",
    "Can you provide an extremely detailed description for panda?",
)


def tiny_corpus() -> Iterator[str]:
    """A fixed English corpus in the shape of chat turns (same sentences every run)."""
    yield from _QUESTIONS
    for s, v, o in itertools.product(_SUBJECTS, _VERBS, _OBJECTS):
        yield f"{s.capitalize()} {v} {o}."
    for i, (s, o) in enumerate(itertools.product(_SUBJECTS, _OBJECTS)):
        yield f"Image{i % 4 + 1}: {s} with {o}; Image{i % 3 + 2}: {o}, ({i * 7 % 100}%)!"
    for q in _QUESTIONS:
        yield f"{START_OF_TURN}user\n{q}{END_OF_TURN}\n{START_OF_TURN}assistant\nYes.{END_OF_TURN}\n"


def build_tiny_tokenizer(out_path: str | Path, vocab_size: int = TINY_VOCAB_SIZE) -> Path:
    """Train a small deterministic BPE sentencepiece model with the IXC2.5 piece names.

    `<unk>`=0, `<s>`=1, `</s>`=2, then `[UNUSED_TOKEN_145]`, `[UNUSED_TOKEN_146]`, `\\n` as
    user-defined symbols, byte fallback for any other character. Single-threaded and unshuffled,
    so the file has the same bytes on every run.
    """
    if vocab_size < MIN_TINY_VOCAB_SIZE:
        raise ValueError(f"tiny tokenizer: vocab_size ({vocab_size}) must be >= {MIN_TINY_VOCAB_SIZE}")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    model = _train_tiny(vocab_size)
    out_path.write_bytes(model)
    return out_path


def _train_tiny(vocab_size: int) -> bytes:
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=tiny_corpus(),
        model_writer=buffer,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # a small corpus may not support every merge asked for
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        user_defined_symbols=[END_OF_TURN, START_OF_TURN, NEWLINE],
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return buffer.getvalue()


# ---------------------------------------------------------------- CLI


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "tiny-tokenizer",
        help="write a tiny deterministic sentencepiece model (tests, demo)",
        description="Train a small BPE sentencepiece model with the IXC2.5 special pieces.",
    )
    parser.add_argument("--out", type=Path, required=True, help="where to write the .model file")
    parser.add_argument(
        "--vocab-size", type=int, default=TINY_VOCAB_SIZE, help=f"vocabulary size (default {TINY_VOCAB_SIZE})"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.vocab_size < MIN_TINY_VOCAB_SIZE:
        print(
            f"xc-prep tiny-tokenizer: --vocab-size ({args.vocab_size}) must be >= {MIN_TINY_VOCAB_SIZE} "
            "(256 byte pieces + special pieces + the corpus characters)",
            file=sys.stderr,
        )
        return ExitCode.USAGE
    path = build_tiny_tokenizer(args.out, args.vocab_size)
    tok = Tokenizer.from_path(path)
    print(f"wrote {path} (vocab {tok.vocab_size}, sha256 {tok.sha256[:16]})")
    return ExitCode.OK
