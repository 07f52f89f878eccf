"""Property-based fuzzing of the data.txt parser and the record validator (issue 10, "fuzzing").

Hypothesis throws arbitrary JSON-like values, arbitrary text (NUL, lone UTF-16 surrogates, odd
line breaks included) and arbitrary bytes at `pipeline.sources.parse_data_txt`,
`pipeline.checks.check_records` and `check_source`. The properties:

- nothing raises, except the documented usage error (`DataTxtError` for an unreadable data.txt);
- every input is either accepted (`RecordCheck.record is not None`, no error) or reported with at
  least one error finding whose code is a known one (`checks.HINTS`, `sources.DATA_TXT_CODES`);
- findings name the file (as written in data.txt) and the line (data.txt) or record index (JSON),
  and their text is printable and JSON-serializable (reports and rejects.jsonl are UTF-8);
- a record validate accepts builds into a sample (never a `DataError`, never a crash): `xc-prep
  shard` would stop mid-run on it.

Budget: `max_examples` per test (default 200, `XC_FUZZ_EXAMPLES=5000 pytest tests/test_fuzz.py`
for a longer local run); the suite stays under ~15 s on 2 cores. A failure prints the shrunk input
and a `@reproduce_failure` blob; known past crashes are pinned with `@example`.
"""

from __future__ import annotations

import contextlib
import json
import os
import string
from pathlib import Path
from typing import Any

import pytest
from conftest import SPECIAL_STRINGS
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.build import build_sample
from pipeline.checks import (
    HINTS,
    RecordCheck,
    ValidateOptions,
    check_records,
    check_source,
    mark_duplicate_ids,
)
from pipeline.errors import DataError
from pipeline.json_source import dumps_json
from pipeline.media import MediaError, load_rgb
from pipeline.media_probe import probe_media
from pipeline.sources import DATA_TXT_CODES, DataTxtError, parse_data_txt
from pipeline.tokenization import Tokenizer, build_tiny_tokenizer
from pipeline.validate import format_findings
from schemas.record import Source
from schemas.report import Finding, Report

"""Strings IXC2.5's tokenizer turns into control ids (the checks' set without a tokenizer)."""

FUZZ = settings(
    max_examples=int(os.environ.get("XC_FUZZ_EXAMPLES", "200")),
    deadline=None,
    database=None,  # CI is stateless; a failure prints its reproduction blob instead
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

# ---------------------------------------------------------------- strategies

# Characters the default alphabet leaves out on purpose: NUL, lone surrogates (from "\ud800" JSON
# escapes), Unicode line separators that str.splitlines() honours, a BOM, bidi and zero-width marks.
NASTY_CHARS = [
    "\x00",
    "\ud800",
    "\udfff",
    "\udc80",
    "\x0b",
    "\x0c",
    "\x85",
    "\u2028",
    "\ufeff",
    "\u202e",
    "\u200b",
]
any_char = st.characters(exclude_categories=()) | st.sampled_from(NASTY_CHARS)
any_text = st.text(any_char, max_size=24)
scalars = st.none() | st.booleans() | st.integers() | st.floats() | any_text
json_values = st.recursive(
    scalars,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(any_text, kids, max_size=4),
    max_leaves=12,
)

TEXT_PIECES = [
    "<ImageHere>",
    "<imagehere>",
    "<ImageHere><ImageHere>",
    "What is shown?",
    "A cat.",
    " ",
    "\n",
    "",
    *SPECIAL_STRINGS,
]
plain_text = st.text(string.ascii_letters + string.digits + " .,?!\n", min_size=1, max_size=20)
turn_text = plain_text | st.lists(st.sampled_from(TEXT_PIECES) | any_text | plain_text, max_size=5).map(
    "".join
)
ROLES = ["human", "user", "gpt", "bot", "assistant", "HUMAN", " Gpt ", "system", ""]
turn = st.fixed_dictionaries(
    {"from": st.sampled_from(ROLES) | any_text | json_values, "value": turn_text | json_values},
    optional={"lang": json_values},
)
# Alternating human/gpt pairs: most of these are valid, so the checks past the structure run too.
qa_pairs = st.lists(st.tuples(turn_text, turn_text), min_size=1, max_size=3).map(
    lambda pairs: [t for q, a in pairs for t in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]
)
conversations = qa_pairs | st.lists(turn | json_values, max_size=5) | json_values

# Media paths relative to the JSON file's folder (see `fuzz_dir`); hostile ones are never opened
# outside the allowed roots and never run (pipe:), whatever the fuzzer makes of them.
MEDIA_POOL = [
    "ok.png",
    "./ok.png",
    "sub/../ok.png",
    "OK.PNG",
    "bad.png",
    "big.jpg",
    "cut.jpg",
    "empty.png",
    "text.mp4",
    "missing.jpg",
    "a_folder.png",
    "link_out.png",
    "../outside.png",
    "../../../../../../../../etc/passwd",
    "/etc/passwd",
    "/dev/zero",
    "/proc/self/environ",
    "pipe:touch PWNED",
    "pipe:rm -rf x",
    "file:///etc/passwd",
    "http://example.com/a.jpg",
    "ok.png\x00.txt",
    "\ud800.png",
    "x" * 300 + ".png",
    "a/" * 600 + "b.png",
    " ",
    "",
]
media_path = st.sampled_from(MEDIA_POOL) | any_text
image_field = media_path | st.lists(media_path, max_size=3) | json_values
record_ids = st.integers() | any_text | json_values
# Mostly valid records (so the checks behind the structural ones run: media, placeholders, length),
# records with any subset of the keys, and any JSON value at all.
near_valid_records = st.fixed_dictionaries(
    {"id": st.integers(0, 50) | plain_text, "conversations": qa_pairs},
    optional={
        "image": st.sampled_from(MEDIA_POOL) | st.lists(st.sampled_from(MEDIA_POOL), min_size=1, max_size=3)
    },
)
records = (
    near_valid_records
    | st.fixed_dictionaries(
        {},
        optional={
            "id": record_ids,
            "conversations": conversations,
            "image": image_field,
            "extra": json_values,
        },
    )
    | json_values
)

# data.txt lines made of tokens the parser cares about, plus anything at all
DATA_TXT_TOKENS = [
    "a.json",
    "sub/b.json",
    "sub",
    "missing.json",
    "../a.json",
    "pipe:touch PWNED",
    "0.5",
    "1",
    "-1",
    "0",
    "0.0001",
    "nan",
    "inf",
    "-inf",
    "1e309",
    "1e306",
    "1e-320",
    "1_0",
    "abc",
    "#",
    "x" * 300,
]
data_txt_line = st.lists(st.sampled_from(DATA_TXT_TOKENS) | any_text, max_size=4).map(" ".join)
line_break = st.sampled_from(["\n", "\r\n", "\r", "\x0b", "\u2028", "\x85"])
data_txt_text = st.tuples(st.lists(data_txt_line, max_size=8), line_break).map(lambda t: t[1].join(t[0]))


def encode_text(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")  # lone surrogates give invalid UTF-8, as in the wild


data_txt_bytes = (
    data_txt_text.map(encode_text)
    | data_txt_text.map(lambda t: b"\xef\xbb\xbf" + encode_text(t))
    | st.binary(max_size=200)
)
json_file_bytes = (
    st.lists(records, max_size=4).map(lambda rs: json.dumps(rs).encode())
    | st.lists(records, max_size=4).map(lambda rs: encode_text(json.dumps(rs, ensure_ascii=False)))
    | json_values.map(lambda v: json.dumps(v).encode())
    | st.lists(records, min_size=1, max_size=3).flatmap(
        lambda rs: st.integers(0, len(json.dumps(rs))).map(lambda n: json.dumps(rs).encode()[:n])
    )
    | st.binary(max_size=200)
)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """json/ holds the JSON files and good and broken media; outside.png lies beside it."""
    root = tmp_path_factory.mktemp("fuzz")
    json_dir = root / "json"
    (json_dir / "sub").mkdir(parents=True)
    Image.new("RGB", (12, 8), (200, 30, 30)).save(json_dir / "ok.png")
    Image.new("RGB", (12, 8), (30, 30, 200)).save(root / "outside.png")
    (json_dir / "bad.png").write_bytes((json_dir / "ok.png").read_bytes()[:40])
    Image.new("RGB", (300, 200), (10, 200, 10)).save(json_dir / "big.jpg", quality=90)
    (json_dir / "cut.jpg").write_bytes((json_dir / "big.jpg").read_bytes()[:400])  # header fine, pixels cut
    (json_dir / "empty.png").write_bytes(b"")
    (json_dir / "text.mp4").write_text("not a video")
    (json_dir / "a_folder.png").mkdir()
    (json_dir / "link_out.png").symlink_to(root / "outside.png")
    (json_dir / "a.json").write_text("[]")
    (json_dir / "sub" / "b.json").write_text("[]")
    return json_dir


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tiny.model")


@contextlib.contextmanager
def cwd_is(folder: Path):
    """Run from `folder` (records resolve against the cwd first); a PWNED file there would mean a
    `pipe:touch PWNED` path was executed."""
    with contextlib.chdir(folder):
        yield
    assert not (folder / "PWNED").exists(), "a pipe: path was executed"


# ---------------------------------------------------------------- shared assertions

KNOWN_CODES = frozenset(HINTS) | DATA_TXT_CODES


def assert_printable(findings: list[Finding]) -> None:
    """The human report prints and the JSON report / rejects.jsonl serialize as UTF-8."""
    format_findings(findings).encode("utf-8")
    report = Report(findings=list(findings))
    text = dumps_json(report.to_json())
    text.encode("utf-8")
    json.loads(text)
    for f in findings:
        dumps_json(f.to_json()).encode("utf-8")


def assert_record_checks(source: Source, raw: list[Any], start: int, checks: list[RecordCheck]) -> None:
    assert [c.index for c in checks] == list(range(start, start + len(raw)))
    for check in checks:
        errors = [f for f in check.findings if f.severity == "error"]
        if check.record is None:
            assert errors, f"record {check.index} rejected without an error finding: {check.findings}"
        else:
            assert not errors, f"record {check.index} accepted despite {errors}"
            assert len(check.record.media) == len(check.record.media_paths)
        for f in check.findings:
            assert f.code != "check_failed", f"a check raised on record {check.index}: {f.message}"
            assert f.code in KNOWN_CODES, f"unknown finding code {f.code!r}: {f}"
            assert (f.file, f.line, f.index) == (source.path, None, check.index)
            assert f.message and f.severity in ("error", "warning")
    assert_printable([f for c in checks for f in c.findings])


# ---------------------------------------------------------------- data.txt


@FUZZ
@given(data=data_txt_bytes)
@example(data=b"a.json 1e306\n")  # int(k * 1000) overflowed
@example(data=b"a\x00b.json 1\n")  # NUL in a path
@example(data=b"x" * 300 + b".json 1\n")  # a file name too long for the OS
@example(data=b"a.json 1\x0bsub/b.json 2\n")  # \x0b is a line break for str.splitlines(), not for editors
@example(data=b"\xff\xfe")
def test_data_txt_parser_never_crashes(fuzz_dir: Path, data: bytes) -> None:
    data_txt = fuzz_dir / "data.txt"
    data_txt.write_bytes(data)
    with cwd_is(fuzz_dir):
        try:
            sources, findings = parse_data_txt(Path("data.txt"))
        except DataTxtError as e:  # the one documented failure: not UTF-8 (exit 2)
            assert e.code == "data_txt_unreadable" and e.message.startswith("data.txt: ")
            return
        # lines as an editor counts them: \n, \r\n or \r (Python's universal newlines)
        num_lines = len(data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n"))
        for f in findings:
            assert f.code in DATA_TXT_CODES, f
            assert f.file == "data.txt" and f.index is None and f.line is not None
            assert 1 <= f.line <= num_lines, (f.line, num_lines)
        error_lines = {f.line for f in findings if f.severity == "error"}
        assert [s.line for s in sources] == sorted({s.line for s in sources})
        for s in sources:
            assert s.line not in error_lines and s.resolved.is_file()
            assert s.k > 0 and s.samples_per_epoch >= 0
        assert sources or findings, "an empty data.txt must be reported"
        assert_printable(findings)


# ---------------------------------------------------------------- records and JSON files


@FUZZ
@given(raw=st.lists(records, max_size=6), start=st.integers(0, 10**6))
@example(
    raw=[
        {"id": "\ud800", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "a"}]}
    ],
    start=0,
)
@example(raw=[{"id": 1, "image": "ok.png\x00", "conversations": []}], start=0)
@example(raw=[{"id": 1, "image": "x" * 300, "conversations": []}], start=0)
@example(raw=[{"id": 1, "image": "\ud800.png", "conversations": []}], start=0)
def test_record_checks_never_crash(fuzz_dir: Path, raw: list[Any], start: int) -> None:
    source = Source(path="fuzz.json", resolved=fuzz_dir / "fuzz.json", k=1.0, line=1)
    with cwd_is(fuzz_dir):
        checks = mark_duplicate_ids(source.path, check_records(source, raw, start, ValidateOptions()))
    assert_record_checks(source, raw, start, checks)


QA_TEXT = [{"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "A cat."}]
QA_IMAGE = [{"from": "human", "value": "<ImageHere> What is it?"}, {"from": "gpt", "value": "A cat."}]


@pytest.mark.parametrize(
    ("record", "where"),
    [
        (
            {"id": "a\ud800", "conversations": QA_TEXT},
            "the id holds the unpaired surrogate '\\ud800' at character 1",
        ),
        (
            {"id": 1, "conversations": [{"from": "human", "value": "hi \udfff"}, QA_TEXT[1]]},
            "conversations[0] \"value\" holds the unpaired surrogate '\\udfff' at character 3",
        ),
        (
            {"id": 1, "image": "\ud800.png", "conversations": QA_IMAGE},
            "image '\\ud800.png' holds the unpaired surrogate",
        ),
    ],
)
def test_lone_surrogates_are_rejected_as_invalid_unicode(fuzz_dir: Path, record: dict, where: str) -> None:
    """JSON's "\\ud800" escapes decode to strings no UTF-8 report could hold: one error naming the
    field and the character, and the record is rejected (before it reaches the tokenizer)."""
    source = Source(path="fuzz.json", resolved=fuzz_dir / "fuzz.json", k=1.0, line=1)
    with cwd_is(fuzz_dir):
        [check] = check_records(source, [record], 7, ValidateOptions())
    assert check.record is None
    assert [(f.code, f.severity, f.file, f.index) for f in check.findings] == [
        ("invalid_unicode", "error", "fuzz.json", 7)
    ]
    assert check.findings[0].message.startswith(where), check.findings[0].message
    assert_printable(check.findings)


@FUZZ
@given(data=json_file_bytes)
@example(data=b"[" * 100_000 + b"]" * 100_000)  # RecursionError inside json.loads
@example(data=b"[" + b"1" * 5000 + b"]")  # int() digit limit inside json.loads
@example(data=b'[{"id": 1e400, "conversations": NaN}]')
@example(data=b"\xef\xbb\xbf[]")
def test_json_source_check_never_crashes(fuzz_dir: Path, data: bytes) -> None:
    path = fuzz_dir / "file.json"
    path.write_bytes(data)
    source = Source(path="file.json", resolved=path, k=0.5, line=3)
    with cwd_is(fuzz_dir):
        check = check_source(source, ValidateOptions(decode_images=False))
    for f in check.file_findings:
        assert f.code in HINTS and f.file == "file.json" and f.index is None and f.severity == "error"
    if check.file_findings:
        assert check.records == []
    else:
        assert check.sha256 is not None
        raw = json.loads(data.decode("utf-8-sig"))
        assert_record_checks(source, raw, 0, check.records)
    assert_printable(check.findings)


@FUZZ
@given(raw=st.lists(st.fixed_dictionaries({"id": record_ids, "conversations": conversations}), max_size=4))
@example(
    raw=[{"id": 0, "conversations": [{"from": "human", "value": "a\ud800"}, {"from": "gpt", "value": "b"}]}]
)
def test_accepted_text_records_tokenize_and_build(
    fuzz_dir: Path, tiny_tokenizer: Path, raw: list[Any]
) -> None:
    """With a tokenizer (the length check runs), every record validate accepts builds: no DataError,
    no crash (RELIABILITY.md: "a text record validate accepts always builds")."""
    source = Source(path="fuzz.json", resolved=fuzz_dir / "fuzz.json", k=1.0, line=1)
    opts = ValidateOptions(tokenizer=tiny_tokenizer, max_length=256, hd_num=1)
    with cwd_is(fuzz_dir):
        checks = check_records(source, raw, 0, opts)
    assert_record_checks(source, raw, 0, checks)
    tokenizer = _tokenizer(tiny_tokenizer)
    for check in checks:
        if check.record is None:  # rejected, with its findings (checked above)
            continue
        try:
            sample = build_sample(
                check.record,
                tokenizer,
                source_name="s",
                file="fuzz.json",
                index=check.index,
                hd_num=1,
                max_length=256,
            )
        except DataError as e:  # would stop `xc-prep shard` mid-run on a record validate accepted
            pytest.fail(f"record {check.index} passed validate but does not build: {e.code}: {e}")
        assert sample.num_tokens <= 256 and sample.num_trained > 0


# ---------------------------------------------------------------- damaged image files

IMAGE_FORMATS = {
    "png": "PNG",
    "jpg": "JPEG",
    "gif": "GIF",
    "bmp": "BMP",
    "tif": "TIFF",
    "webp": "WEBP",
    "ico": "ICO",
}
IMAGE_CODES = {"image_unreadable", "image_corrupt", "image_too_large", "media_empty"}
FUZZ_MAX_PIXELS = 1_000_000
"""Mutated headers promise anything: keep what the fuzzer may decode small."""


@pytest.fixture(scope="module")
def image_seeds() -> dict[str, bytes]:
    import io

    image = Image.new("RGB", (24, 16))
    image.putdata([(x * 10 % 256, y * 15 % 256, (x ^ y) * 8 % 256) for y in range(16) for x in range(24)])
    seeds = {}
    for ext, fmt in IMAGE_FORMATS.items():
        buf = io.BytesIO()
        image.save(buf, format=fmt)
        seeds[ext] = buf.getvalue()
    return seeds


_counter = iter(range(10**9))


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the damaged TIFF tags it skips
@FUZZ
@given(
    ext=st.sampled_from(sorted(IMAGE_FORMATS)),
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6),
    cut=st.none() | st.integers(0, 10**6),
)
def test_damaged_images_are_findings_not_crashes(
    fuzz_dir: Path, image_seeds: dict[str, bytes], ext: str, flips: list[tuple[int, int]], cut: int | None
) -> None:
    """Byte flips and truncations of real PNG/JPEG/GIF/BMP/TIFF/WebP/ICO files: probe_media (validate)
    and load_rgb (build_sample, i.e. shard) give a media finding or an image, never an exception."""
    data = bytearray(image_seeds[ext])
    for pos, value in flips:
        data[pos % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    path = fuzz_dir / "damaged" / f"{next(_counter)}.{ext}"  # a new name: no probe cache hit
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(bytes(data))
    probe = probe_media(path, is_video=False, decode=True, max_image_pixels=FUZZ_MAX_PIXELS)
    if probe.error is not None:
        assert probe.error[0] in IMAGE_CODES, probe.error
    else:
        assert probe.size is not None and probe.size[0] * probe.size[1] <= FUZZ_MAX_PIXELS
    try:
        image = load_rgb(path, FUZZ_MAX_PIXELS)
    except MediaError as e:
        assert e.code in IMAGE_CODES, e
    else:
        assert image.mode == "RGB"
    path.unlink()


_tokenizers: dict[Path, Tokenizer] = {}


def _tokenizer(path: Path) -> Tokenizer:
    if path not in _tokenizers:
        _tokenizers[path] = Tokenizer.from_path(path)
    return _tokenizers[path]
