"""Tests for emolens.data.corpus: readers of every corpus layout and encoding, their errors,
splits."""

import csv
import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emolens.data.corpus import (
    Corpus,
    CorpusError,
    Sample,
    Splits,
    bundled_corpus_path,
    format_inspection,
    load_bundled_corpus,
    load_corpus,
    read_corpus,
    split_corpus,
)
from emolens.data.labels import STUDY_LABELS

EN_NAMES = STUDY_LABELS.names("en")
JA_NAMES = STUDY_LABELS.names("ja")
JAPANESE = re.compile(r"[\u3040-\u30ff\u4e00-\u9fff]")

# The crowd-enVENT generation file's layout (a selection of its many columns).
ENVENT_HEADER = [
    "text_id", "temporal_distance", "gender", "age", "generated_text", "emotion", "intensity",
    "hidden_emo_text", "suddenness", "familiarity", "event_duration",
]  # fmt: skip


def write_rows(path: Path, rows, delimiter="\t", encoding="utf-8") -> Path:
    with open(path, "w", newline="", encoding=encoding) as f:
        csv.writer(f, delimiter=delimiter).writerows(rows)
    return path


def simple_rows(n_per_label=2, labels=EN_NAMES):
    rows = [["id", "text", "label"]]
    for label in labels:
        for k in range(n_per_label):
            rows.append([f"{label}-{k}", f"A {label} event, number {k}.", label])
    return rows


def make_corpus(counts: dict[str, int]) -> Corpus:
    samples = [
        Sample(f"{label}-{k}", f"text {label} {k}", label)
        for label, n in counts.items()
        for k in range(n)
    ]
    return Corpus(tuple(samples), "test")


# --------------------------------------------------------------------------- formats


def test_tsv_and_csv_give_the_same_corpus_and_hash(tmp_path):
    rows = simple_rows() + [["q", 'She said "fine, then",\tand left', "anger"]]
    tsv = read_corpus(write_rows(tmp_path / "c.tsv", rows, "\t"))
    csv_ = read_corpus(write_rows(tmp_path / "c.csv", rows, ","))
    assert tsv.samples == csv_.samples
    assert tsv.sha256 == csv_.sha256
    assert len(tsv) == 2 * 13 + 1
    assert tsv.texts()[-1] == 'She said "fine, then",\tand left'
    assert tsv.source == str(tmp_path / "c.tsv")


def test_delimiter_is_sniffed_from_the_header_when_the_extension_disagrees(tmp_path):
    rows = simple_rows(1)
    as_tab = read_corpus(write_rows(tmp_path / "tabs.csv", rows, "\t"))
    as_semicolon = read_corpus(write_rows(tmp_path / "excel.txt", rows, ";"))
    assert as_tab.samples == as_semicolon.samples
    assert as_tab.label_names() == EN_NAMES


def test_latin1_csv_reads_back_accents_with_the_same_hash_as_utf8(tmp_path):
    rows = [["id", "text", "label"], ["1", "Un café crème à Noël", "joy"], ["2", "naïve", "fear"]]
    latin = read_corpus(write_rows(tmp_path / "latin.csv", rows, ",", encoding="latin-1"))
    cp1252 = read_corpus(write_rows(tmp_path / "cp.csv", rows, ",", encoding="cp1252"))
    utf8 = read_corpus(write_rows(tmp_path / "utf8.csv", rows, ",", encoding="utf-8-sig"))
    assert latin.texts() == ["Un café crème à Noël", "naïve"]
    assert latin.sha256 == cp1252.sha256 == utf8.sha256
    explicit = read_corpus(tmp_path / "latin.csv", encoding="latin-1")
    assert explicit.texts() == latin.texts()


def test_crowd_envent_layout_with_extra_columns_and_masked_text(tmp_path):
    rows = [ENVENT_HEADER]
    for k, label in enumerate(["joy", "no-emotion", "shame"]):
        rows.append(
            [f"t{k}", "1", "female", "30", f"I felt {label} when it happened.", label, "4",
             "I felt [MASK] when it happened.", "2", "3", "1"]
        )  # fmt: skip
    path = write_rows(tmp_path / "crowd-enVent_generation.tsv", rows)
    corpus = read_corpus(path)
    assert corpus.ids() == ["t0", "t1", "t2"]
    assert corpus.texts()[0] == "I felt joy when it happened."
    assert corpus.label_names() == ["joy", "no-emotion", "shame"]
    assert corpus.label_indices() == [5, 12, 9]
    masked = read_corpus(path, masked=True)
    assert masked.texts() == ["I felt [MASK] when it happened."] * 3
    assert masked.sha256 != corpus.sha256


def test_validation_file_rows_repeating_a_text_are_kept_once(tmp_path):
    rows = [ENVENT_HEADER]
    for validator in range(3):
        for k, label in enumerate(["anger", "trust"]):
            rows.append([f"t{k}", "1", "x", str(20 + validator), f"text {k}", label, "3",
                         "masked", "1", "1", "1"])  # fmt: skip
    corpus = read_corpus(write_rows(tmp_path / "crowd-enVent_validation.tsv", rows))
    assert corpus.ids() == ["t0", "t1"]


def test_japanese_translation_with_japanese_labels(tmp_path):
    rows = [["text_id", "generated_text", "emotion"]]
    rows += [[f"j{i}", f"今日は{ja}を感じた。", ja] for i, ja in enumerate(JA_NAMES)]
    rows.append(["neutral-alias", "駅まで歩いた。", "neutral"])
    corpus = read_corpus(write_rows(tmp_path / "ja.tsv", rows))
    assert corpus.label_names() == EN_NAMES + ["no-emotion"]
    assert corpus.texts()[0] == "今日は怒りを感じた。"


def test_rows_without_an_id_column_are_numbered(tmp_path):
    rows = [["sentence", "labels"], ["one", "joy"], ["", ""], ["two", "fear"]]
    corpus = read_corpus(write_rows(tmp_path / "c.csv", rows, ","))
    assert corpus.ids() == ["row-1", "row-2"]  # the blank row is skipped


def test_chosen_columns(tmp_path):
    rows = [["key", "body", "feeling", "text", "label"], ["a", "the body", "喜び", "x", "anger"]]
    corpus = read_corpus(
        write_rows(tmp_path / "c.tsv", rows),
        text_column="body",
        label_column="feeling",
        id_column="key",
    )
    assert corpus.samples == (Sample("a", "the body", "joy"),)


def test_jsonl(tmp_path):
    lines = [
        {"id": 7, "text": "A quiet day.", "label": "中立"},
        {"id": "b", "text": "Lost my keys.", "label": ["sadness"], "extra": 1},
    ]
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n\n")
    corpus = read_corpus(path)
    assert corpus.samples == (
        Sample("7", "A quiet day.", "no-emotion"),
        Sample("b", "Lost my keys.", "sadness"),
    )


def test_corpus_methods():
    corpus = make_corpus({"fear": 3, "joy": 2, "anger": 1})
    assert corpus.counts() == {"anger": 1, "fear": 3, "joy": 2}  # study order, zeros omitted
    head = corpus.head_per_label(2)
    assert head.ids() == ["fear-0", "fear-1", "joy-0", "joy-1", "anger-0"]
    assert head.source == corpus.source and head.sha256 != corpus.sha256
    sub = corpus.subset([5, 0])
    assert sub.ids() == ["anger-0", "fear-0"]
    assert sub.sha256 == Corpus(sub.samples, "elsewhere").sha256
    assert corpus.label_indices() == [3, 3, 3, 5, 5, 0]
    twelve = STUDY_LABELS.subset([n for n in EN_NAMES if n != "fear"])
    with pytest.raises(CorpusError, match="fear.*restrict"):
        corpus.label_indices(twelve)
    assert corpus.restrict(twelve).label_indices(twelve) == [4, 4, 0]
    with pytest.raises(CorpusError, match="out of range"):
        corpus.subset([6])
    with pytest.raises(CorpusError, match="repeat"):
        corpus.subset([1, 1])
    assert "6 samples" in repr(corpus)


# --------------------------------------------------------------------------- bundled corpus


def test_bundled_corpus_path_is_inside_the_package():
    path = bundled_corpus_path()
    assert path.name == "sample_corpus.tsv" and path.parent.name == "resources"


def test_bundled_corpus_japanese_and_english():
    ja = load_bundled_corpus("ja")
    en = load_corpus("bundled:en")
    assert ja.source == "bundled:ja" and en.source == "bundled:en"
    assert list(ja.counts()) == EN_NAMES
    assert min(ja.counts().values()) >= 30
    assert all(JAPANESE.search(t) for t in ja.texts())
    assert all(re.search(r"[A-Za-z]{3}", t) and not JAPANESE.search(t) for t in en.texts())
    assert ja.ids() == en.ids() and ja.label_names() == en.label_names()
    assert load_corpus(None).samples == load_corpus("bundled").samples == ja.samples


def test_bundled_loader_reads_the_packaged_layout(tmp_path, monkeypatch):
    rows = [["id", "emotion", "generated_text", "english_text"], ["s1", "joy", "嬉しい。", "Glad."]]
    fake = write_rows(tmp_path / "sample_corpus.tsv", rows)
    monkeypatch.setattr("emolens.data.corpus.bundled_corpus_path", lambda: fake)
    assert load_bundled_corpus("ja").texts() == ["嬉しい。"]
    assert load_bundled_corpus("en").texts() == ["Glad."]
    with pytest.raises(CorpusError, match="'ja' or 'en'"):
        load_corpus("bundled:fr")
    monkeypatch.setattr("emolens.data.corpus.bundled_corpus_path", lambda: tmp_path / "gone.tsv")
    with pytest.raises(CorpusError, match="missing from this installation"):
        load_bundled_corpus()


# --------------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    with pytest.raises(CorpusError, match="not found.*check the path"):
        read_corpus(tmp_path / "nope.tsv")
    with pytest.raises(CorpusError, match="not found"):
        load_corpus(str(tmp_path / "nope.csv"))


def test_empty_file_and_header_only(tmp_path):
    (tmp_path / "empty.tsv").write_text("\n \n")
    with pytest.raises(CorpusError, match="is empty"):
        read_corpus(tmp_path / "empty.tsv")
    (tmp_path / "header.tsv").write_text("id\ttext\tlabel\n\n")
    with pytest.raises(CorpusError, match="header .* but no data rows"):
        read_corpus(tmp_path / "header.tsv")


def test_missing_columns_list_the_columns_found_and_the_option(tmp_path):
    path = write_rows(tmp_path / "c.tsv", [["id", "body", "label"], ["1", "x", "joy"]])
    with pytest.raises(CorpusError, match=r"no text column.*found: id, body, label.*text_column="):
        read_corpus(path)
    with pytest.raises(CorpusError, match=r"no column 'emo'.*label_column="):
        read_corpus(path, text_column="body", label_column="emo")
    with pytest.raises(CorpusError, match=r"masked=True.*hidden_emo_text.*text_column="):
        read_corpus(path, masked=True)


def test_unknown_labels_are_all_listed_with_counts_and_the_accepted_names(tmp_path):
    rows = [["text", "label"], ["a", "happy"], ["b", "joy"], ["c", "happy"], ["d", "meh"]]
    path = write_rows(tmp_path / "c.tsv", rows)
    with pytest.raises(CorpusError, match=r"'happy' \(2 rows\), 'meh' \(1 row\).*anger, boredom"):
        read_corpus(path)


def test_empty_texts_name_their_lines(tmp_path):
    rows = [["text", "label"], ["ok", "joy"], ["  ", "joy"], ["ok too", "fear"], ["", "fear"]]
    with pytest.raises(CorpusError, match=r"empty text .* 2 row\(s\), at line\(s\) 3, 5"):
        read_corpus(write_rows(tmp_path / "c.tsv", rows))


def test_ragged_rows_name_the_line(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("id,text,label\n1,fine,joy\n2,a, unquoted comma,joy\n3,fine,fear\n")
    with pytest.raises(CorpusError, match=r"line 3 \(4 fields\).*comma"):
        read_corpus(path)


def test_duplicated_ids_are_named(tmp_path):
    rows = [["id", "text", "label"], ["a", "one", "joy"], ["b", "two", "joy"], ["a", "3", "joy"]]
    with pytest.raises(CorpusError, match=r"duplicated id.*'a' \(lines 2, 4\)"):
        read_corpus(write_rows(tmp_path / "c.tsv", rows))


def test_truncated_files_name_the_line(tmp_path):
    quote = tmp_path / "quote.csv"
    quote.write_text('id,text,label\n1,fine,joy\n2,"cut off in the mid')
    with pytest.raises(CorpusError, match="starting on line 3 is never closed.*truncated"):
        read_corpus(quote)
    short = tmp_path / "short.tsv"
    short.write_text("id\ttext\tlabel\n1\tfine\tjoy\n2\tcut off")
    with pytest.raises(CorpusError, match=r"last row \(line 3\) has 2 of 3 fields.*truncated"):
        read_corpus(short)


def test_tsv_with_literal_quotes_is_read_without_quoting(tmp_path):
    path = tmp_path / "c.tsv"
    path.write_text('text\tlabel\n"Hi," she said\tjoy\nplain\tfear\n', encoding="utf-8")
    assert read_corpus(path).texts() == ['"Hi," she said', "plain"]


def test_mixed_encodings_name_the_first_bad_line(tmp_path):
    path = tmp_path / "mixed.csv"
    path.write_bytes(
        "text,label\ncafé,joy\n".encode() + "crème,fear\nbrûlée,joy\n".encode("latin-1")
    )
    with pytest.raises(CorpusError, match=r"mixes encodings.*line 3 .*UTF-8.*encoding="):
        read_corpus(path)


def test_unreadable_encodings(tmp_path):
    binary = tmp_path / "binary.tsv"
    binary.write_bytes(b"text\tlabel\n\x00\x01\x02\xff\tjoy\n")
    with pytest.raises(CorpusError, match="unreadable encoding.*NUL"):
        read_corpus(binary)
    control = tmp_path / "control.tsv"
    control.write_bytes(b"text\tlabel\n\xff\x01\x02\x03\tjoy\n")
    with pytest.raises(CorpusError, match="unreadable encoding.*line 2"):
        read_corpus(control)
    utf8 = write_rows(tmp_path / "u.tsv", [["text", "label"], ["ok", "joy"], ["ça", "joy"]])
    with pytest.raises(CorpusError, match="line 3 is not valid ascii.*encoding="):
        read_corpus(utf8, encoding="ascii")
    with pytest.raises(CorpusError, match="unknown encoding"):
        read_corpus(utf8, encoding="klingon")


def test_utf16_with_bom_is_read(tmp_path):
    path = tmp_path / "c.tsv"
    path.write_text("text\tlabel\n喜んだ\tjoy\n", encoding="utf-16")
    assert read_corpus(path).texts() == ["喜んだ"]


def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "a", "label": "joy"}\n\n{"text": "b", "label": "joy"\n')
    with pytest.raises(CorpusError, match="line 3: not valid JSON"):
        read_corpus(path)
    path.write_text('{"text": "a", "label": "joy"}\n["b", "joy"]\n')
    with pytest.raises(CorpusError, match="line 2: expected a JSON object"):
        read_corpus(path)
    path.write_text('{"text": "a", "label": "joy"}\n{"label": "joy"}\n')
    with pytest.raises(CorpusError, match="line 2: no field 'text'"):
        read_corpus(path)
    path.write_text('{"text": 5, "label": "joy"}\n')
    with pytest.raises(CorpusError, match="line 1: field 'text' holds 5, not a string"):
        read_corpus(path)


# --------------------------------------------------------------------------- splits


def test_splits_are_stratified_disjoint_covering_and_deterministic():
    counts = {name: 20 + 3 * i for i, name in enumerate(EN_NAMES)}
    counts["shame"] = 3
    corpus = make_corpus(counts)
    splits = split_corpus(corpus, seed=1)
    parts = [splits.train.ids(), splits.validation.ids(), splits.test.ids()]
    assert sorted(sum(parts, [])) == sorted(corpus.ids())
    assert len(set(sum(parts, []))) == len(corpus)
    for name, n in counts.items():
        got = [part.counts().get(name, 0) for part in splits.as_dict().values()]
        assert all(g >= 1 for g in got), (name, got)
        assert abs(got[0] - 0.8 * n) <= 1.5 and abs(got[1] - 0.1 * n) <= 1.5, (name, got)
    order = {i: k for k, i in enumerate(corpus.ids())}
    assert all(sorted(p, key=order.get) == p for p in parts)  # file order kept
    assert split_corpus(corpus, seed=1) == splits
    assert split_corpus(corpus, seed=2).test.ids() != splits.test.ids()
    assert splits.train.source == corpus.source


def test_split_edge_cases():
    corpus = make_corpus({"joy": 2, "fear": 10})
    splits = split_corpus(corpus, (0.5, 0.0, 0.5))
    assert len(splits.validation) == 0 and len(splits.train) + len(splits.test) == 12
    with pytest.raises(CorpusError, match="summing to 1"):
        split_corpus(corpus, (0.8, 0.1))
    with pytest.raises(CorpusError, match="summing to 1"):
        split_corpus(corpus, (0.8, 0.3, -0.1))


def test_format_inspection_has_a_row_per_label_and_split_and_a_total():
    corpus = make_corpus({"joy": 10, "no-emotion": 10})
    table = format_inspection(corpus, split_corpus(corpus))
    lines = table.splitlines()
    assert "train" in lines[1] and "validation" in lines[1] and "test" in lines[1]
    assert re.match(r"喜び\s+joy\s+10\s+8\s+1\s+1$", lines[2])
    assert re.match(r"中立\s+no-emotion\s+10\s+8\s+1\s+1$", lines[3])
    assert re.match(r"total\s+20\s+16\s+2\s+2$", lines[4])
    assert "train" not in format_inspection(corpus)
    assert isinstance(split_corpus(corpus), Splits)


# --------------------------------------------------------------------------- properties

TEXTS = st.text(st.characters(exclude_characters="\x00", exclude_categories=("Cs",)), min_size=1)
LABEL_NAMES = st.sampled_from(EN_NAMES + JA_NAMES)
SETTINGS = settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@SETTINGS
@given(
    items=st.lists(st.tuples(TEXTS.filter(lambda t: t.strip()), LABEL_NAMES), min_size=1),
    delimiter=st.sampled_from(["\t", ","]),
    with_ids=st.booleans(),
)
def test_texts_and_labels_round_trip_through_csv_and_tsv(tmp_path, items, delimiter, with_ids):
    suffix = ".tsv" if delimiter == "\t" else ".csv"
    header = ["id", "text", "label"] if with_ids else ["text", "label"]
    rows = [header] + [
        ([f"s{k}"] if with_ids else []) + [t, lab] for k, (t, lab) in enumerate(items)
    ]
    corpus = read_corpus(write_rows(tmp_path / f"round{suffix}", rows, delimiter))
    assert corpus.texts() == [t for t, _ in items]
    assert corpus.label_names() == [STUDY_LABELS.lookup(lab).en for _, lab in items]


@SETTINGS
@given(
    garbage=st.binary(max_size=400),
    prefix=st.sampled_from([b"", b"id\ttext\tlabel\n", b"text,label\n", b'{"text": "a", ']),
    suffix=st.sampled_from([".tsv", ".csv", ".jsonl", ".txt"]),
)
def test_garbage_bytes_parse_or_raise_corpus_error(tmp_path, garbage, prefix, suffix):
    path = tmp_path / f"garbage{suffix}"
    path.write_bytes(prefix + garbage)
    try:
        corpus = read_corpus(path)
    except CorpusError:
        return
    assert isinstance(corpus, Corpus) and len(corpus) >= 1
