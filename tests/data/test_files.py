"""User files: text, JSONL and CSV readers and the DataError each bad input gets (path and line named)."""

import pytest

from archlab.data.files import read_csv, read_jsonl, read_text
from archlab.errors import DataError


def _write(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8") if isinstance(content, str) else path.write_bytes(content)
    return path


def test_read_text(tmp_path):
    assert read_text(_write(tmp_path, "a.txt", "héllo\n")) == "héllo\n"
    with pytest.raises(DataError, match=r"missing.txt: no such file"):
        read_text(tmp_path / "missing.txt")
    with pytest.raises(DataError, match=r"empty.txt is empty"):
        read_text(_write(tmp_path, "empty.txt", " \n\n"))
    with pytest.raises(DataError, match="is a folder"):
        read_text(tmp_path)
    with pytest.raises(DataError, match=r"latin.txt is not UTF-8 text \(bad byte at offset 1\)"):
        read_text(_write(tmp_path, "latin.txt", b"a\xe9"))


def test_read_jsonl(tmp_path):
    path = _write(
        tmp_path, "d.jsonl", '{"text": "a", "label": 10}\n\n{"text": "b", "label": 2}\n{"text": "c", "label": 1}\n'
    )
    examples = read_jsonl(path, label_field="label")
    assert examples.texts == ("a", "b", "c")
    assert examples.classes == ("1", "2", "10")  # integers sort as numbers
    assert examples.labels == (2, 1, 0)
    assert read_jsonl(path).labels is None
    named = read_jsonl(_write(tmp_path, "n.jsonl", '{"t": "x", "y": "pos"}\n{"t": "z", "y": "neg"}\n'), "t", "y")
    assert named.classes == ("neg", "pos") and named.labels == (1, 0)


def test_jsonl_errors(tmp_path):
    path = _write(tmp_path, "d.jsonl", '{"text": "a"}\n{"text": "b"}\n{"txt": "c"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:3: no field 'text' \(did you mean 'txt'\?\); fields: txt"):
        read_jsonl(path)
    with pytest.raises(DataError, match=r"d.jsonl:1: no field 'label'"):
        read_jsonl(path, label_field="label")
    with pytest.raises(DataError, match=r"b.jsonl:2: not valid JSON"):
        read_jsonl(_write(tmp_path, "b.jsonl", '{"text": "a"}\n{"text": \n'))
    with pytest.raises(DataError, match=r"l.jsonl:1: expected a JSON object, got list"):
        read_jsonl(_write(tmp_path, "l.jsonl", '["a"]\n'))
    with pytest.raises(DataError, match=r"i.jsonl:1: field 'text' is int, expected a string"):
        read_jsonl(_write(tmp_path, "i.jsonl", '{"text": 3}\n'))
    with pytest.raises(DataError, match=r"f.jsonl:1: label 1.5 must be a string or an integer"):
        read_jsonl(_write(tmp_path, "f.jsonl", '{"text": "a", "y": 1.5}\n'), label_field="y")
    with pytest.raises(DataError, match="e.jsonl is empty"):
        read_jsonl(_write(tmp_path, "e.jsonl", ""))
    with pytest.raises(DataError, match="no such file"):
        read_jsonl(tmp_path / "nope.jsonl")


def test_read_csv(tmp_path):
    path = _write(tmp_path, "d.csv", 'id,text,label\n1,hello,pos\n2,"two\nlines, quoted",neg\n3,bye,pos\n')
    examples = read_csv(path, "text", "label")
    assert examples.texts == ("hello", "two\nlines, quoted", "bye")
    assert examples.classes == ("neg", "pos") and examples.labels == (1, 0, 1)
    assert read_csv(path).labels is None


def test_csv_errors(tmp_path):
    path = _write(tmp_path, "d.csv", "id,txt,label\n1,a,x\n")
    with pytest.raises(DataError, match=r"d.csv:1: no column 'text' \(did you mean 'txt'\?\); columns: id, txt, label"):
        read_csv(path)
    with pytest.raises(DataError, match=r"r.csv:3: 2 fields, the header has 3"):
        read_csv(_write(tmp_path, "r.csv", "id,text,label\n1,a,x\n2,b\n"), "text", "label")
    with pytest.raises(DataError, match="h.csv has a header but no rows"):
        read_csv(_write(tmp_path, "h.csv", "text,label\n"))
    with pytest.raises(DataError, match="e.csv is empty"):
        read_csv(_write(tmp_path, "e.csv", "\n"))
