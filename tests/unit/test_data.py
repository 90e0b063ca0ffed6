"""engine.data: local formats, globs, clear errors on bad files, column checks, validation split.

No torch needed: engine.data imports only `datasets`.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from mlsteps.engine.data import load_rows, require_columns, split_validation
from mlsteps.errors import UserError, field_scope
from mlsteps.recipe.specs.data import DataSpec

WIKI = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "wikitext-2" / "valid.txt"
WHERE = "stages.pre.data"


def rows(spec: object, tmp_path: Path) -> list[dict]:
    ds = load_rows(DataSpec.model_validate(spec), cache_dir=tmp_path / "cache")
    return [dict(r) for r in ds]


def error(spec: object, tmp_path: Path) -> str:
    with pytest.raises(UserError) as info, field_scope(WHERE):
        load_rows(DataSpec.model_validate(spec), cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert message.startswith(WHERE) and "\n" not in message
    return message


def test_txt_one_row_per_nonempty_line_bom_stripped(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_bytes("\ufeffline one\n\n   \nline two\n".encode())
    assert rows(str(path), tmp_path) == [{"text": "line one"}, {"text": "line two"}]


def test_txt_paragraphs_and_whole_files(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    # Blank lines may hold spaces, CR or a full-width space; runs of them are one break.
    path.write_bytes(
        "\ufeffone a\none b\n\ntwo\r\n \r\n\n\nthree a\nthree b\n\u3000\nfour".encode()
    )
    paragraphs = rows({"files": [str(path)], "txt_unit": "paragraph"}, tmp_path)
    assert [r["text"] for r in paragraphs] == ["one a\none b", "two", "three a\nthree b", "four"]
    with gzip.open(tmp_path / "b.txt.gz", "wt", encoding="utf-8") as handle:
        handle.write("\n\nbee one\nbee two\n\n")
    files = rows({"files": [str(path), str(tmp_path / "b.txt.gz")], "txt_unit": "file"}, tmp_path)
    assert len(files) == 2 and files[0]["text"].startswith("one a\n")
    assert files[1]["text"] == "bee one\nbee two"


def test_txt_paragraphs_of_hard_wrapped_chinese(shared_data: Path, tmp_path: Path) -> None:
    path = shared_data / "luxun" / "野草.txt"
    lines = rows(str(path), tmp_path)
    paragraphs = rows({"files": [str(path)], "txt_unit": "paragraph"}, tmp_path)
    assert 1 < len(paragraphs) < len(lines)
    # Nothing is lost: the paragraphs hold exactly the non-blank lines, in order.
    joined = [line for p in paragraphs for line in p["text"].split("\n") if line.strip()]
    assert joined == [r["text"] for r in lines]


@pytest.mark.parametrize(
    ("rows_slice", "expected"),
    [(None, range(10)), (":90%", range(9)), ("90%:", range(9, 10)), ("-3:", range(7, 10)),
     ("2:5", range(2, 5)), (" : ", range(10)), ("50%:-1", range(5, 9))],
)  # fmt: skip
def test_row_range(rows_slice: str | None, expected: range) -> None:
    assert DataSpec(builtin="toy/corpus", rows=rows_slice).row_range(10) == expected


def test_rows_split_one_file_into_train_and_held_out(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps({"i": i}) + "\n" for i in range(20)))
    train = rows({"files": [str(path)], "rows": ":90%"}, tmp_path)
    held = rows({"files": [str(path)], "rows": "90%:", "max_samples": 1}, tmp_path)
    assert [r["i"] for r in train] == list(range(18)) and held == [{"i": 18}]
    assert "rows '30:' keeps none of the 20 rows" in error(
        {"files": [str(path)], "rows": "30:"}, tmp_path
    )
    for bad in ("first half", "5", "%:", "1:2:3"):
        with pytest.raises(ValueError, match="is not a slice START:END"):
            DataSpec(files=[str(path)], rows=bad)
    # A shared shuffle seed: the two parts are disjoint, together all rows, not in file order.
    head = rows({"files": [str(path)], "shuffle_seed": 7, "rows": ":75%"}, tmp_path)
    tail = rows({"files": [str(path)], "shuffle_seed": 7, "rows": "75%:"}, tmp_path)
    got = [r["i"] for r in head + tail]
    assert sorted(got) == list(range(20)) and got != list(range(20)) and len(head) == 15


def test_real_wikitext_slice_and_max_samples(tmp_path: Path) -> None:
    got = rows({"files": [str(WIKI)], "max_samples": 50}, tmp_path)
    nonempty = [line for line in WIKI.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert [r["text"] for r in got] == nonempty[:50]


def test_gz_text_and_glob_order(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("from b\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("from a\n", encoding="utf-8")
    with gzip.open(tmp_path / "c.txt.gz", "wt", encoding="utf-8") as handle:
        handle.write("from c\n")
    got = rows(
        [str(tmp_path / "*.txt"), str(tmp_path / "c.txt.gz"), str(tmp_path / "a.txt")], tmp_path
    )
    # Globs are sorted; a file named twice is read once.
    assert [r["text"] for r in got] == ["from a", "from b", "from c"]


def test_jsonl_json_csv_tsv_parquet(tmp_path: Path) -> None:
    records = [{"text": 'say "hi"', "label": 1}, {"text": "bye", "label": 0}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (tmp_path / "d.json").write_text(json.dumps({"data": records}))
    (tmp_path / "d.csv").write_text('text,label\n"say ""hi""",1\nbye,0\n')
    # TSV quotes are text, not quoting (SST-2 style).
    (tmp_path / "d.tsv").write_text('text\tlabel\nsay "hi"\t1\nbye\t0\n')
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), tmp_path / "d.parquet")
    for name in ("d.jsonl", "d.json", "d.csv", "d.tsv", "d.parquet"):
        assert rows(str(tmp_path / name), tmp_path) == records, name


def test_format_override(tmp_path: Path) -> None:
    path = tmp_path / "pairs.dat"
    path.write_text("text\tlabel\nx\t1\n")
    assert rows({"files": [str(path)], "format": "tsv"}, tmp_path) == [{"text": "x", "label": 1}]
    assert "cannot tell the format" in error(str(path), tmp_path)


def test_missing_file_and_empty_glob(tmp_path: Path) -> None:
    assert "file not found: " in error(str(tmp_path / "nope.txt"), tmp_path)
    assert "no file matches" in error(str(tmp_path / "*.jsonl"), tmp_path)
    assert "is a directory" in error(str(tmp_path), tmp_path)


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
def test_empty_file_names_the_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "empty.txt"
    path.write_bytes(content)
    message = error(str(path), tmp_path)
    assert str(path) in message and "is empty" in message


def test_non_utf8_names_file_and_byte_offset(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"hello\nw\xf6rld\n")
    message = error(str(path), tmp_path)
    assert str(path) in message and "byte offset 7" in message and "0xf6" in message
    gz = tmp_path / "latin1.jsonl.gz"
    with gzip.open(gz, "wb") as handle:
        handle.write(b'{"text": "caf\xe9"}\n')
    assert "byte offset 13" in error(str(gz), tmp_path)


def test_non_utf8_past_the_first_read_chunk(tmp_path: Path) -> None:
    path = tmp_path / "big.txt"
    offset = (1 << 20) + 5  # beyond the first 1 MiB chunk
    path.write_bytes(b"a" * offset + b"\xff\n")
    assert f"byte offset {offset}" in error(str(path), tmp_path)


def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.txt.gz"
    path.write_bytes(b"this is not gzip data")
    message = error(str(path), tmp_path)
    assert "cannot read" in message and "broken.txt.gz" in message


def test_invalid_jsonl_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": oops}\n')
    message = error(str(path), tmp_path)
    assert "bad.jsonl:2" in message


def test_mixed_formats_rejected(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("x\n")
    (tmp_path / "b.jsonl").write_text('{"text": "y"}\n')
    assert "mix formats" in error([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")], tmp_path)


def test_builtin_rows(tmp_path: Path) -> None:
    from mlsteps.builtin import list_builtin, load_builtin

    name = list_builtin()[0].name
    got = rows(f"builtin:{name}", tmp_path)
    assert got == load_builtin(name, "train")
    assert "no/such-thing" in error("builtin:no/such-thing", tmp_path)


def test_require_columns_lists_existing_and_suggests(tmp_path: Path) -> None:
    ds = load_rows(DataSpec.model_validate([str(_jsonl(tmp_path))]))
    require_columns(ds, ["text", "label"])
    with pytest.raises(UserError) as info, field_scope("stages.ft.text_column"):
        require_columns(ds, ["txt"])
    message = str(info.value)
    assert message.startswith("stages.ft.text_column")
    assert (
        "'txt' not found" in message
        and "text, label" in message
        and "did you mean 'text'" in message
    )


def test_split_validation(tmp_path: Path) -> None:
    import datasets

    ds = datasets.Dataset.from_dict({"text": [str(i) for i in range(40)]})
    train, val = split_validation(ds, 0.1, seed=3)
    assert val is not None and len(val) == 4 and len(train) == 36
    assert sorted(list(train["text"]) + list(val["text"]), key=int) == list(ds["text"])
    again_train, again_val = split_validation(ds, 0.1, seed=3)
    assert again_val is not None and list(again_val["text"]) == list(val["text"])
    assert split_validation(ds, 0.0, seed=3) == (ds, None)
    tiny_train, tiny_val = split_validation(ds.select([0, 1]), 0.01, seed=3)
    assert tiny_val is not None and len(tiny_train) == len(tiny_val) == 1
    with (
        pytest.raises(UserError, match="validation"),
        field_scope("stages.pre.validation_fraction"),
    ):
        split_validation(ds.select([0]), 0.1, seed=3)


def _jsonl(tmp_path: Path) -> Path:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n')
    return path


def test_aligned_files_pair_lines(tmp_path, shared_data):
    from mlsteps.engine.data import load_rows
    from mlsteps.recipe.specs.data import DataSpec

    multi30k = shared_data / "multi30k"
    spec = DataSpec(
        aligned={"source": str(multi30k / "val.en.gz"), "target": str(multi30k / "val.de.gz")}
    )
    rows = load_rows(spec)
    assert rows.num_rows == 1014 and rows.column_names == ["source", "target"]
    assert rows[0]["source"].startswith("A group of men") and rows[0]["target"].startswith(
        "Eine Gruppe"
    )
    short = tmp_path / "short.txt"
    short.write_text("one line\n")
    bad = DataSpec(aligned={"source": str(multi30k / "val.en.gz"), "target": str(short)})
    with pytest.raises(
        UserError,
        match=r"stages.ft.data.aligned: aligned files have different line counts: source 1014, target 1",
    ):
        with field_scope("stages.ft.data"):
            load_rows(bad)


def test_headerless_tsv_with_column_names(shared_data):
    from mlsteps.engine.data import load_rows
    from mlsteps.recipe.specs.data import DataSpec

    spec = DataSpec(
        files=[str(shared_data / "tatoeba_cmn_eng" / "cmn.txt")],
        format="tsv",
        columns=["source", "target", "attribution"],
    )
    rows = load_rows(spec)
    assert rows.num_rows == 29155  # the first line is data, not a header
    assert rows[0]["source"] == "Hi." and rows[0]["target"] == "嗨。"
