"""Corpus readers, the bundled sample corpus, and stratified splits.

A :class:`Corpus` is a tuple of :class:`Sample` (id, text, canonical English label) with where
it came from and a SHA-256 of its canonical content (ids, texts, labels), so results can name
the exact data they were computed on whatever the file's format or encoding.

:func:`read_corpus` reads crowd-enVENT as distributed (``crowd-enVent_generation.tsv``,
``crowd-enVent_validation.tsv``), its Japanese translation, comma-separated copies (UTF-8 or
Latin-1/cp1252), and generic CSV, TSV or JSONL files. Every bad input raises
:class:`CorpusError` with a message that names the problem and the fix.
"""

import codecs
import csv
import hashlib
import io
import json
import logging
import math
import operator
import os
import random
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal, cast, overload

from emolens.data.labels import STUDY_LABELS, Emotion, LabelSet

log = logging.getLogger(__name__)

#: Columns tried, in order, when ``text_column``/``label_column``/``id_column`` are not given.
TEXT_COLUMNS = ("generated_text", "text", "sentence", "content")
LABEL_COLUMNS = ("emotion", "label", "labels")
ID_COLUMNS = ("text_id", "id")
#: crowd-enVENT's text with the emotion words masked, read with ``masked=True``.
MASKED_TEXT_COLUMN = "hidden_emo_text"

BUNDLED_TEXT_COLUMNS = {"ja": "generated_text", "en": "english_text"}
_SHOW = 5  # how many offending items an error message lists
_DELIMITER_NAMES = {"\t": "tab", ",": "comma", ";": "semicolon"}


class CorpusError(ValueError):
    """A corpus that cannot be read or used; the message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class Sample:
    """One labelled text; ``label`` is the canonical English crowd-enVENT name."""

    id: str
    text: str
    label: str


def _content_sha256(samples: Sequence[Sample]) -> str:
    canonical = json.dumps(
        [[s.id, s.text, s.label] for s in samples], ensure_ascii=False, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass(frozen=True, repr=False)
class Corpus:
    """Samples in file order, their source (a path or ``bundled:<language>``) and the SHA-256 of
    their canonical content; ``sha256`` is computed when left empty."""

    samples: tuple[Sample, ...]
    source: str
    sha256: str = ""

    def __post_init__(self) -> None:
        if not self.sha256:
            object.__setattr__(self, "sha256", _content_sha256(self.samples))

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return f"Corpus({len(self)} samples, source={self.source!r}, sha256={self.sha256[:12]})"

    def texts(self) -> list[str]:
        return [s.text for s in self.samples]

    def ids(self) -> list[str]:
        return [s.id for s in self.samples]

    def label_names(self) -> list[str]:
        """The label of each sample (canonical English name), in sample order."""
        return [s.label for s in self.samples]

    def label_indices(self, labels: LabelSet = STUDY_LABELS) -> list[int]:
        """The index of each sample's label in ``labels.emotions``."""
        index = {e.en: i for i, e in enumerate(labels.emotions)}
        missing = sorted({s.label for s in self.samples} - set(index))
        if missing:
            raise CorpusError(
                f"labels {', '.join(missing)} of this corpus are not in the label set "
                f"({', '.join(labels.names('en'))}); drop those samples first with "
                "corpus.restrict(labels)"
            )
        return [index[s.label] for s in self.samples]

    def counts(self) -> dict[str, int]:
        """Samples per label, in the study's label order (other labels after); zeros omitted."""
        counts = Counter(s.label for s in self.samples)
        return {name: counts[name] for name in _label_order(counts)}

    def subset(self, indices: Iterable) -> "Corpus":
        """The samples at ``indices``, in that order; keeps ``source``, recomputes ``sha256``."""
        n = len(self.samples)
        chosen = []
        for i in indices:
            try:
                j = operator.index(i)
            except TypeError:
                raise CorpusError(f"subset indices must be integers, got {i!r}") from None
            if not 0 <= j < n:
                raise CorpusError(f"subset index {j} is out of range for a corpus of {n} samples")
            chosen.append(j)
        repeated = [j for j, c in Counter(chosen).items() if c > 1]
        if repeated:
            raise CorpusError(
                f"subset indices repeat {repeated[:_SHOW]}; a corpus holds each sample once"
            )
        return Corpus(tuple(self.samples[j] for j in chosen), self.source)

    def head_per_label(self, n: int) -> "Corpus":
        """The first ``n`` samples of each label, in file order (for quick runs)."""
        if n < 0:
            raise CorpusError(f"head_per_label needs n >= 0, got {n}")
        seen: Counter = Counter()
        keep = []
        for i, s in enumerate(self.samples):
            if seen[s.label] < n:
                seen[s.label] += 1
                keep.append(i)
        return self.subset(keep)

    def restrict(self, labels: LabelSet) -> "Corpus":
        """The samples whose label is in ``labels``, in file order."""
        names = set(labels.names("en"))
        return self.subset(i for i, s in enumerate(self.samples) if s.label in names)


def _label_order(names: Iterable[str]) -> list[str]:
    present = list(dict.fromkeys(names))
    study = [e.en for e in STUDY_LABELS]
    return [n for n in study if n in present] + [n for n in present if n not in study]


# --------------------------------------------------------------------------- bundled corpus


def bundled_corpus_path() -> Path:
    """The bundled sample corpus: a UTF-8 TSV with columns ``id``, ``emotion``,
    ``generated_text`` (Japanese) and ``english_text``."""
    return Path(str(resources.files("emolens") / "resources" / "sample_corpus.tsv"))


def load_bundled_corpus(language: str = "ja") -> Corpus:
    """The bundled sample corpus with Japanese (``"ja"``) or English (``"en"``) texts."""
    if language not in BUNDLED_TEXT_COLUMNS:
        raise CorpusError(
            f"the bundled corpus has no language {language!r}; use 'ja' or 'en' (e.g. 'bundled:en')"
        )
    path = bundled_corpus_path()
    if not path.is_file():
        raise CorpusError(
            f"the bundled corpus is missing from this installation ({path}); reinstall emolens "
            "(pip install -e .) or pass a corpus file"
        )
    corpus = read_corpus(
        path,
        text_column=BUNDLED_TEXT_COLUMNS[language],
        label_column="emotion",
        id_column="id",
        encoding="utf-8",
    )
    return Corpus(corpus.samples, f"bundled:{language}", corpus.sha256)


def load_corpus(spec: str | os.PathLike | None, language: str = "ja") -> Corpus:
    """``None``, ``"bundled"`` (in ``language``) or ``"bundled:<language>"`` give the bundled
    corpus; anything else is a path for :func:`read_corpus` with guessed columns."""
    if spec is None or spec == "bundled":
        return load_bundled_corpus(language)
    if isinstance(spec, str) and spec.startswith("bundled:"):
        return load_bundled_corpus(spec.split(":", 1)[1])
    return read_corpus(spec)


# --------------------------------------------------------------------------- reading files


def read_corpus(
    path: str | os.PathLike,
    *,
    text_column: str | None = None,
    label_column: str | None = None,
    id_column: str | None = None,
    labels: LabelSet = STUDY_LABELS,
    encoding: str | None = None,
    masked: bool = False,
) -> Corpus:
    """Read a labelled corpus from a CSV, TSV or JSONL file.

    Columns not given are guessed: text from ``generated_text, text, sentence, content``
    (``hidden_emo_text`` with ``masked=True``), label from ``emotion, label, labels``, id from
    ``text_id, id`` (else ``row-<n>``, n counting data rows from 1). Labels may be English or
    Japanese and are stored by their English name. The delimiter comes from the extension and
    the header line; the encoding is UTF-8 (with or without BOM), else cp1252/Latin-1, unless
    ``encoding`` is given. Rows that repeat an earlier row's id, text and label (as in
    ``crowd-enVent_validation.tsv``, one row per validator) are kept once.
    """
    path = Path(path)
    text = _decode(_read_bytes(path), path, encoding)
    if not text.strip():
        raise CorpusError(
            f"{path} is empty; it needs a header line and one row per sample "
            "(or pass 'bundled' to use the bundled sample corpus)"
        )
    if _is_jsonl(path, text):
        columns, records, duplicated = _parse_jsonl(text, path)
        kind = "field"
    else:
        columns, records, duplicated = _parse_delimited(text, path)
        kind = "column"

    if text_column is None and masked:
        text_col = _match(columns, MASKED_TEXT_COLUMN)
        if text_col is None:
            raise CorpusError(
                f"masked=True reads the masked text from the {kind} {MASKED_TEXT_COLUMN!r}, "
                f"which {path} lacks; {kind}s found: {_list(columns)}. Pass text_column= to "
                "name the masked text, or drop masked=True"
            )
    else:
        text_col = _pick(columns, text_column, TEXT_COLUMNS, "text_column", "text", path, kind)
    label_col = _pick(columns, label_column, LABEL_COLUMNS, "label_column", "label", path, kind)
    id_col = _pick(columns, id_column, ID_COLUMNS, "id_column", "id", path, kind, required=False)
    for col in (text_col, label_col, id_col):
        if col is not None and col in duplicated:
            raise CorpusError(
                f"{path}: the {kind} {col!r} appears more than once in the header, so it is "
                "ambiguous; rename one of them"
            )

    rows = []  # (line, id, text, raw label)
    for ordinal, (line, record) in enumerate(records, 1):
        text_value = _value(record, text_col, line, path, kind)
        label_value = _value(record, label_col, line, path, kind, label=True)
        sample_id = f"row-{ordinal}"
        if id_col is not None:
            raw_id = _value(record, id_col, line, path, kind, ident=True)
            if raw_id.strip():
                sample_id = raw_id.strip()
        rows.append((line, sample_id, text_value, label_value))

    empty = [line for line, _, t, _ in rows if not t.strip()]
    if empty:
        raise CorpusError(
            f"{path}: empty text in {kind} {text_col!r} in {len(empty)} row(s), at line(s) "
            f"{_list(empty)}; remove those rows, or pass text_column= to read another {kind}"
        )

    emotions: dict[str, Emotion | None] = {}
    unknown: Counter[str] = Counter()
    for _, _, _, raw in rows:
        if raw not in emotions:
            emotions[raw] = _lookup(labels, raw)
        if emotions[raw] is None:
            unknown[raw] += 1
    if unknown:
        listed = ", ".join(
            f"{name!r} ({n} row{'s' if n > 1 else ''})"
            for name, n in sorted(unknown.items(), key=lambda kv: (-kv[1], kv[0]))
        )
        raise CorpusError(
            f"{path}: {len(unknown)} unknown label(s) in {kind} {label_col!r}: {listed}. "
            f"Accepted labels are {', '.join(labels.names('en'))}, or in Japanese "
            f"{'、'.join(labels.names('ja'))} ('neutral' also means no-emotion). Fix these "
            f"labels, or pass label_column= if the labels are in another {kind}"
        )

    known = cast(dict[str, Emotion], emotions)  # every label resolved: unknown ones raised above
    samples: list[Sample] = []
    first: dict[str, tuple[int, Sample]] = {}
    conflicts: dict[str, list[int]] = {}
    collapsed = 0
    for line, sample_id, text_value, raw in rows:
        sample = Sample(sample_id, text_value, known[raw].en)
        if sample_id in first:
            first_line, first_sample = first[sample_id]
            if first_sample == sample:
                collapsed += 1
            else:
                conflicts.setdefault(sample_id, [first_line]).append(line)
            continue
        first[sample_id] = (line, sample)
        samples.append(sample)
    if conflicts:
        listed = "; ".join(
            f"{i!r} (lines {_list(lines)})" for i, lines in list(conflicts.items())[:_SHOW]
        )
        more = f" and {len(conflicts) - _SHOW} more" if len(conflicts) > _SHOW else ""
        raise CorpusError(
            f"{path}: {len(conflicts)} duplicated id(s) in {kind} {id_col!r} with different "
            f"texts or labels: {listed}{more}. Ids must be unique: fix the file, or pass "
            f"id_column= to take ids from another {kind}"
        )
    if collapsed:
        log.info("%s: kept once %d rows repeating an earlier id, text and label", path, collapsed)
    return Corpus(tuple(samples), str(path))


def _read_bytes(path: Path) -> bytes:
    if not path.exists():
        raise CorpusError(
            f"corpus file not found: {path} (relative paths start at {Path.cwd()}); check the "
            "path, or use 'bundled' for the bundled sample corpus"
        )
    if path.is_dir():
        raise CorpusError(
            f"{path} is a directory; pass the corpus file in it, e.g. crowd-enVent_generation.tsv"
        )
    try:
        return path.read_bytes()
    except OSError as err:
        raise CorpusError(f"cannot read {path}: {err}; check its permissions") from err


def _line_of(raw: bytes, pos: int) -> int:
    return raw.count(b"\n", 0, pos) + 1


def _decode(raw: bytes, path: Path, encoding: str | None) -> str:
    """UTF-8 (BOM optional) or UTF-16 with BOM, else cp1252 if the whole file decodes cleanly."""
    if encoding is not None:
        try:
            return raw.decode(encoding)
        except LookupError:
            raise CorpusError(
                f"unknown encoding {encoding!r}; pass a Python codec name such as 'utf-8' or "
                "'cp1252'"
            ) from None
        except UnicodeDecodeError as err:
            raise CorpusError(
                f"{path}: line {_line_of(raw, err.start)} is not valid {encoding} ({err.reason}); "
                "pass the file's real encoding as encoding=, or re-save it as UTF-8"
            ) from None
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return raw.decode("utf-16")
        except UnicodeDecodeError:
            raise CorpusError(
                f"unreadable encoding: {path} starts like UTF-16 but does not decode as UTF-16; "
                "re-save it as UTF-8, or pass encoding="
            ) from None
    if b"\x00" in raw:
        raise CorpusError(
            f"unreadable encoding: {path} contains NUL bytes (line {_line_of(raw, raw.index(0))})"
            ", so it is binary or UTF-16/32 without a byte-order mark; re-save it as UTF-8 text, "
            "or pass encoding="
        )
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    utf8_line = bad_line = None
    for n, line in enumerate(raw.split(b"\n"), 1):
        if line.isascii():
            continue
        try:
            line.decode("utf-8")
            utf8_line = utf8_line or n
        except UnicodeDecodeError:
            bad_line = bad_line or n
    if utf8_line is not None and bad_line is not None:
        raise CorpusError(
            f"{path} mixes encodings: line {utf8_line} is UTF-8 but line {bad_line} (the first "
            "bad line) is not valid UTF-8; re-save the whole file as UTF-8, or pass encoding= "
            "(e.g. encoding='cp1252') to read all of it in one encoding"
        )
    try:
        text = raw.decode("cp1252")
    except UnicodeDecodeError as err:
        raise CorpusError(
            f"unreadable encoding: {path} is neither UTF-8 nor cp1252/Latin-1 text (line "
            f"{_line_of(raw, err.start)}); re-save it as UTF-8, or pass encoding="
        ) from None
    for n, text_line in enumerate(text.split("\n"), 1):
        if any(unicodedata.category(c) == "Cc" and c not in "\t\r\x0c" for c in text_line):
            raise CorpusError(
                f"unreadable encoding: {path} is not valid UTF-8, and read as cp1252/Latin-1 "
                f"line {n} holds control characters, so it looks binary; re-save it as UTF-8, "
                "or pass encoding="
            )
    log.info("%s is not UTF-8; read it as cp1252 (Latin-1)", path)
    return text


def _is_jsonl(path: Path, text: str) -> bool:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return True
    return suffix not in (".tsv", ".csv", ".tab") and text.lstrip().startswith("{")


# a parsed file: its columns (in order), (line, record) pairs, the duplicated header names
_Parsed = tuple[list[str], list[tuple[int, dict[str, Any]]], set[str]]


def _parse_jsonl(text: str, path: Path) -> _Parsed:
    records: list[tuple[int, dict[str, Any]]] = []
    columns: dict[str, None] = {}
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as err:
            raise CorpusError(
                f"{path}, line {n}: not valid JSON ({err}); a .jsonl file holds one JSON object "
                "per line: fix or remove that line"
            ) from None
        if not isinstance(obj, dict):
            raise CorpusError(
                f"{path}, line {n}: expected a JSON object like "
                f'{{"text": ..., "label": ...}}, got {type(obj).__name__}; fix that line'
            )
        columns.update(dict.fromkeys(obj))
        records.append((n, obj))
    if not records:
        raise CorpusError(f"{path} holds no JSON objects; write one object per line")
    return list(columns), records, set()


def _sniff_delimiter(text: str, path: Path) -> str:
    header = text.split("\n", 1)[0]
    by_extension = {".tsv": "\t", ".tab": "\t", ".csv": ","}.get(path.suffix.lower())
    if by_extension and by_extension in header:
        return by_extension
    count, best = max((header.count(d), d) for d in ("\t", ",", ";"))
    return best if count else by_extension or "\t"


def _parse_delimited(text: str, path: Path) -> _Parsed:
    delimiter = _sniff_delimiter(text, path)
    try:
        header, rows = _csv_records(text, path, delimiter, csv.QUOTE_MINIMAL)
    except CorpusError as err:
        if delimiter != "\t":
            raise
        # Tab-separated files are often written without quoting, with quotes as plain text.
        try:
            header, rows = _csv_records(text, path, delimiter, csv.QUOTE_NONE)
        except CorpusError:
            raise err from None
        log.info("%s: read with quotes as plain text (quote-aware parsing failed)", path)
    counts = Counter(header)
    duplicated = {c for c, n in counts.items() if n > 1}
    records: list[tuple[int, dict[str, Any]]] = []
    for line, fields in rows:
        record: dict[str, Any] = {}
        for name, value in zip(header, fields, strict=True):
            record.setdefault(name, value)
        records.append((line, record))
    return list(dict.fromkeys(header)), records, duplicated


def _csv_records(
    text: str, path: Path, delimiter: str, quoting: Literal[0, 1, 2, 3]
) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header and the non-blank ``(line, fields)`` rows; ``quoting`` is a csv.QUOTE_*."""
    reader = csv.reader(
        io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting, strict=True
    )
    records: list[tuple[int, list[str]]] = []
    start = 1
    try:
        for fields in reader:
            if any(f.strip() for f in fields):
                records.append((start, fields))
            start = reader.line_num + 1
    except csv.Error as err:
        if "unexpected end of data" in str(err):
            raise CorpusError(
                f"{path}: the quoted field starting on line {start} is never closed (the file "
                f"ends inside it, at line {reader.line_num}); the file looks truncated or has a "
                "stray quote character: re-export it, or fix the quote on that line"
            ) from None
        raise CorpusError(
            f"{path}, line {start}: malformed {_DELIMITER_NAMES.get(delimiter, delimiter)}-"
            f"separated row ({err}); fix the quoting on that line or re-export the file"
        ) from None
    if not records:
        raise CorpusError(f"{path} holds no rows; it needs a header line and one row per sample")
    (_, header), rows = records[0], records[1:]
    header = [h.strip().lstrip("\ufeff").strip() for h in header]
    if not rows:
        raise CorpusError(
            f"{path} has a header ({_list(header)}) but no data rows; add one row per sample"
        )
    width = len(header)
    ragged = [(line, len(fields)) for line, fields in rows if len(fields) != width]
    if ragged:
        name = _DELIMITER_NAMES.get(delimiter, repr(delimiter))
        last_line = rows[-1][0]
        if len(ragged) == 1 and ragged[0][0] == last_line and ragged[0][1] < width:
            raise CorpusError(
                f"{path}: the last row (line {last_line}) has {ragged[0][1]} of {width} fields; "
                "the file looks truncated: re-export or re-copy it"
            )
        listed = ", ".join(f"line {line} ({n} fields)" for line, n in ragged[:_SHOW])
        more = f" and {len(ragged) - _SHOW} more" if len(ragged) > _SHOW else ""
        raise CorpusError(
            f"{path}: {len(ragged)} row(s) do not have the header's {width} {name}-separated "
            f"fields: {listed}{more}; a field may hold an unquoted {name} or a line break: quote "
            f"that field, or check that the file is really {name}-separated"
        )
    return header, rows


def _match(columns: Sequence[str], wanted: str) -> str | None:
    if wanted in columns:
        return wanted
    folded = [c for c in columns if c.strip().casefold() == wanted.strip().casefold()]
    return folded[0] if len(folded) == 1 else None


@overload
def _pick(
    columns: Sequence[str],
    wanted: str | None,
    candidates: Sequence[str],
    option: str,
    what: str,
    path: Path,
    kind: str,
    required: Literal[True] = True,
) -> str: ...
@overload
def _pick(
    columns: Sequence[str],
    wanted: str | None,
    candidates: Sequence[str],
    option: str,
    what: str,
    path: Path,
    kind: str,
    required: bool,
) -> str | None: ...
def _pick(
    columns: Sequence[str],
    wanted: str | None,
    candidates: Sequence[str],
    option: str,
    what: str,
    path: Path,
    kind: str,
    required: bool = True,
) -> str | None:
    """The column named ``wanted`` (case-insensitive), else the first of ``candidates``."""
    if wanted is not None:
        found = _match(columns, wanted)
        if found is None:
            raise CorpusError(
                f"{path} has no {kind} {wanted!r} (given as {option}=); {kind}s found: "
                f"{_list(columns)}. Pass {option}= one of these"
            )
        return found
    for candidate in candidates:
        found = _match(columns, candidate)
        if found is not None:
            return found
    if not required:
        return None
    raise CorpusError(
        f"{path} has no {what} {kind} (looked for {', '.join(candidates)}); {kind}s found: "
        f"{_list(columns)}. Pass {option}= to name the {kind} holding the {what}s"
    )


def _value(
    record: dict[str, Any],
    column: str,
    line: int,
    path: Path,
    kind: str,
    *,
    label: bool = False,
    ident: bool = False,
) -> str:
    if column not in record:
        raise CorpusError(
            f"{path}, line {line}: no {kind} {column!r} (other rows have it); add it or remove "
            "that line"
        )
    value = record[column]
    if label and isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, str):
        return value
    if ident and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if ident and value is None:
        return ""
    raise CorpusError(
        f"{path}, line {line}: {kind} {column!r} holds {json.dumps(value)[:40]}, not a string; "
        "write it as a string"
    )


def _lookup(labels: LabelSet, name: str) -> Emotion | None:
    try:
        return labels.lookup(name)
    except ValueError:  # UnknownLabelError
        return None


def _list(items: Sequence, limit: int = 12) -> str:
    shown = ", ".join(str(i) for i in list(items)[:limit])
    return shown + (f" ... ({len(items)} in all)" if len(items) > limit else "")


# --------------------------------------------------------------------------- splits


@dataclass(frozen=True)
class Splits:
    """Disjoint train/validation/test corpora that together cover the corpus they came from."""

    train: Corpus
    validation: Corpus
    test: Corpus

    NAMES = ("train", "validation", "test")

    def as_dict(self) -> dict[str, Corpus]:
        return {name: getattr(self, name) for name in self.NAMES}


def split_corpus(
    corpus: Corpus, fractions: Sequence[float | int] = (0.8, 0.1, 0.1), seed: int = 0
) -> Splits:
    """Split stratified by label: each label's samples are shuffled with ``seed`` (independently
    of the other labels) and cut by ``fractions`` (largest remainders), so that every label with
    at least as many samples as non-zero fractions appears in every such split. Each split keeps
    file order. Deterministic for a given corpus and seed."""
    fr = tuple(float(f) for f in fractions)
    if len(fr) != 3 or any(not math.isfinite(f) or f < 0 for f in fr) or abs(sum(fr) - 1) > 1e-6:
        raise CorpusError(
            f"fractions must be three non-negative numbers (train, validation, test) summing "
            f"to 1, got {tuple(fractions)}; e.g. (0.8, 0.1, 0.1)"
        )
    by_label: dict[str, list[int]] = {}
    for i, s in enumerate(corpus.samples):
        by_label.setdefault(s.label, []).append(i)
    parts: tuple[list[int], ...] = ([], [], [])
    for label, indices in by_label.items():
        order = indices.copy()
        random.Random(f"emolens-split:{seed}:{label}").shuffle(order)
        start = 0
        for part, size in zip(parts, _allocate(len(order), fr), strict=True):
            part.extend(order[start : start + size])
            start += size
    return Splits(*(corpus.subset(sorted(p)) for p in parts))


def _allocate(n: int, fractions: tuple[float, ...]) -> list[int]:
    exact = [n * f for f in fractions]
    sizes = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(sizes)), key=lambda j: (sizes[j] - exact[j], j))
    for j in by_remainder[: n - sum(sizes)]:
        sizes[j] += 1
    positive = [j for j, f in enumerate(fractions) if f > 0]
    if n >= len(positive):
        for j in positive:
            if sizes[j] == 0:
                donor = max(positive, key=lambda k: sizes[k])
                sizes[donor] -= 1
                sizes[j] += 1
    return sizes


# --------------------------------------------------------------------------- inspection


def format_inspection(corpus: Corpus, splits: Splits | None = None) -> str:
    """A table of samples per label (Japanese and English name) and per split, with totals."""
    names = _label_order(
        [s.label for s in corpus.samples]
        + ([s.label for c in splits.as_dict().values() for s in c.samples] if splits else [])
    )
    ja = {e.en: e.ja for e in STUDY_LABELS}
    counts = corpus.counts()
    split_counts = [c.counts() for c in splits.as_dict().values()] if splits else []
    rows = [["label", "english", "all"] + (list(Splits.NAMES) if splits else [])]
    for name in names:
        rows.append(
            [ja.get(name, "-"), name, str(counts.get(name, 0))]
            + [str(c.get(name, 0)) for c in split_counts]
        )
    rows.append(
        ["total", "", str(len(corpus))]
        + ([str(len(c)) for c in splits.as_dict().values()] if splits else [])
    )
    widths = [max(_width(r[i]) for r in rows) for i in range(len(rows[0]))]

    def cell(value: str, i: int) -> str:
        pad = " " * (widths[i] - _width(value))
        return value + pad if i < 2 else pad + value

    title = (
        f"corpus {corpus.source}: {len(corpus)} samples, {len(counts)} labels, "
        f"sha256 {corpus.sha256[:12]}"
    )
    body = ["  ".join(cell(v, i) for i, v in enumerate(r)).rstrip() for r in rows]
    return "\n".join([title, *body])


def _width(s: str) -> int:
    """Display width: East Asian wide characters take two columns."""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in s)
