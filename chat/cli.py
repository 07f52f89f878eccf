"""`xc-chat`: ask a model about images, a video or text, as the official IXC2.5 `chat()` does.

  xc-chat --model DIR|HUB_ID|tiny|7b [--adapter DIR] [--image PATH ...] [--video PATH] --prompt TEXT
  xc-chat --adapter DIR --image PATH              interactive: one question per line

With `--prompt`, one answer; without it, a conversation read from stdin, one question per line,
the history kept (`/reset` clears it, `/quit` or end of input ends it). Answers stream to stdout
as they are generated; `--json` prints one object per answer instead,
`{"prompt_ids": [...], "generated_ids": [...], "text": "..."}` (prompt_ids hold -100 on image
positions); `--show-prompt` prints each prompt to stderr (turn markers as `<|im_start|>`,
`<|im_end|>`). The prompt is the official one (docs/IXC25.md#chat-inference): no system turn unless
`--system TEXT` or `--use-meta`; hd_num 24 for one image, 6 for several; sampling defaults of
`chat()` (temperature 1.0, top-p 0.8, repetition penalty 1.005, 1024 new tokens); `--temperature 0`
is greedy. Runs on the GPU in bf16 when there is one, else on the CPU in fp32.
Exit status: 0 ok, 1 unusable media or prompt, 2 usage (flags, model folder), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from schemas.cli import ExitCode
from schemas.record import VIDEO_EXTENSIONS, is_video_path

if TYPE_CHECKING:
    from chat.session import ChatSession

RESET, QUIT = "/reset", "/quit"


def _video_path(value: str) -> str:
    if not is_video_path(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a video ({', '.join(VIDEO_EXTENSIONS)})")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="xc-chat",
        description="Ask an InternLM-XComposer 2.5 model (a folder, hub id, preset, or LoRA adapter) about "
        "images, a video or text, with the official chat() prompt. Without --prompt: one question per "
        f"line from stdin, history kept ({RESET} clears it, {QUIT} or end of input ends).",
    )
    p.add_argument(
        "--model",
        help="model folder, hub id or preset (tiny, 7b: random weights); "
        "with --adapter, its base (default: the base the adapter records)",
    )
    p.add_argument("--adapter", type=Path, help="LoRA adapter folder written by xc-train --recipe lora")
    p.add_argument(
        "--tokenizer", type=Path, help="tokenizer.model (default: the adapter's or the model folder's)"
    )
    p.add_argument(
        "--image",
        dest="media",
        action="append",
        default=[],
        metavar="PATH",
        help="an image (repeat for several, in order; a video path works too)",
    )
    p.add_argument(
        "--video",
        dest="media",
        action="append",
        type=_video_path,
        metavar="PATH",
        help="a video: 1 frame per second, at most 32, as one strip image",
    )
    p.add_argument("--prompt", help="the question; several images need one <ImageHere> each, in order")
    meta = p.add_mutually_exclusive_group()
    meta.add_argument("--system", help="a system turn with this text (default: none, as chat())")
    meta.add_argument(
        "--use-meta", action="store_true", help="the official meta instruction as the system turn"
    )
    p.add_argument(
        "--hd-num", type=int, default=24, help="most tiles for one image [24]; several images use 6"
    )
    p.add_argument("--max-new-tokens", type=int, default=1024, help="[1024]")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy [1.0]")
    p.add_argument("--top-p", type=float, default=0.8, help="[0.8]")
    p.add_argument(
        "--top-k", type=int, default=50, help="0 = off [50, transformers' default, as chat() gets]"
    )
    p.add_argument("--repetition-penalty", type=float, default=1.005, help="[1.005]")
    p.add_argument("--seed", type=int, help="seed of every answer's sampling (default: random)")
    p.add_argument("--font", type=Path, help="TrueType font of a video's frame labels (default: Pillow's)")
    p.add_argument("--json", action="store_true", help="print one JSON object per answer instead of text")
    p.add_argument(
        "--show-prompt",
        action="store_true",
        help="print each prompt to stderr first (images as <image r×c: N tokens>, <|im_start|>/<|im_end|>)",
    )
    return p


def _check(args: argparse.Namespace) -> str | None:
    """The first flag value that cannot work, as a message."""
    if args.model is None and args.adapter is None:
        return "give --model (a folder, hub id or preset), --adapter, or both"
    for name, value, ok in (
        ("--hd-num", args.hd_num, args.hd_num >= 1),
        ("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1),
        ("--temperature", args.temperature, args.temperature >= 0),
        ("--top-p", args.top_p, 0 < args.top_p <= 1),
        ("--top-k", args.top_k, args.top_k >= 0),
        ("--repetition-penalty", args.repetition_penalty, args.repetition_penalty > 0),
    ):
        if not ok:
            return f"{name} {value} is out of range"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help exits 0, a usage error 2
        return int(e.code or 0)
    problem = _check(args)
    if problem:
        print(f"xc-chat: {problem}", file=sys.stderr)
        return ExitCode.USAGE
    # Heavy imports after parsing: --help and usage errors answer at once.
    from chat.prompt import META_INSTRUCTION, load_media
    from chat.session import ChatSession, Sampling, load_chat_model
    from pipeline.errors import DataError
    from trainer.errors import HANDLED, exit_code

    try:
        media = load_media(args.media, args.hd_num, args.font)
        model, tokenizer = load_chat_model(args.model, args.adapter, args.tokenizer)
        sampling = Sampling(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            repetition_penalty=args.repetition_penalty,
            seed=args.seed,
        )
        system = META_INSTRUCTION if args.use_meta else args.system
        session = ChatSession(model, tokenizer, media, system=system, sampling=sampling)
        if args.prompt is not None:
            _answer(session, args.prompt, args.json, args.show_prompt)
            return ExitCode.OK
        return _converse(session, args.json, args.show_prompt, len(media))
    except DataError as e:
        print(f"xc-chat: {e.message}" + (f" (fix: {e.hint})" if e.hint else ""), file=sys.stderr)
        return ExitCode.INVALID_DATA
    except HANDLED as e:
        print(
            "xc-chat: interrupted" if isinstance(e, KeyboardInterrupt) else f"xc-chat: error: {e}",
            file=sys.stderr,
        )
        return exit_code(e)


def _answer(session: ChatSession, query: str, as_json: bool, show_prompt: bool) -> None:
    if show_prompt:
        print(session.prompt(query).display_text(session.tokenizer), file=sys.stderr, flush=True)
    if as_json:
        print(json.dumps(session.ask(query).to_json(), ensure_ascii=False), flush=True)
        return
    session.ask(query, on_text=lambda text: print(text, end="", flush=True))
    print(flush=True)


def _converse(session: ChatSession, as_json: bool, show_prompt: bool, num_media: int) -> int:
    """One question per stdin line until /quit or end of input; a bad question is reported and skipped."""
    from pipeline.errors import DataError

    interactive = sys.stdin.isatty()
    if interactive:
        print(
            f"xc-chat: {num_media} image(s); ask a question ({RESET} clears the history, {QUIT} ends)",
            file=sys.stderr,
        )
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return ExitCode.OK
        query = line.rstrip("\n")
        if query.strip() == QUIT:
            return ExitCode.OK
        if query.strip() == RESET:
            session.reset()
            print("xc-chat: history cleared", file=sys.stderr)
            continue
        if not query.strip():
            continue
        try:
            _answer(session, query, as_json, show_prompt)
        except DataError as e:
            print(f"xc-chat: {e.message}" + (f" (fix: {e.hint})" if e.hint else ""), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
