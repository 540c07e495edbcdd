"""Captions files: `.txt` lines end at "\n" only, blank captions are skipped but their rows are
kept, so a caption id maps back to its line of the file."""
import pytest

from stablerep_jax.generation import captions as captions_lib


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8"))
    return str(path)


def test_txt_lines_split_at_newline_only(tmp_path):
    """U+2028, U+2029, U+0085, form feed, vertical tab and U+001C..U+001E are characters of a
    caption (str.splitlines would cut the caption there); CRLF files lose their "\r"."""
    inner = ["a\u2028b", "c\u0085d", "e\x0cf", "g\x0bh", "i\x1cj", "k\u2029l"]
    path = _write(tmp_path, "c.txt", "\r\n".join(inner) + "\r\n")
    got = captions_lib.read_captions(path)
    assert got.texts == tuple(inner)
    assert got.blank_skipped == 0 and got.blank_rows == ()


def test_split_lines_edge_cases():
    assert captions_lib.split_lines("") == []
    assert captions_lib.split_lines("a") == ["a"]
    assert captions_lib.split_lines("a\n") == ["a"]
    assert captions_lib.split_lines("a\n\n") == ["a", ""]
    assert captions_lib.split_lines("a\r\nb\rc\n") == ["a", "b\rc"]


def test_blank_lines_are_skipped_and_their_rows_kept(tmp_path):
    path = _write(tmp_path, "c.txt", "one\n\ntwo\n   \nthree\n\n")
    got = captions_lib.read_captions(path)
    assert got.texts == ("one", "two", "three")
    assert got.blank_skipped == 3 and got.blank_rows == (2, 4, 6)
    assert [got.row_of(i) for i in range(3)] == [1, 3, 5]
    with pytest.raises(IndexError, match="caption_id 3"):
        got.row_of(3)


def test_table_rows_count_the_header_as_row_one(tmp_path):
    path = _write(tmp_path, "c.csv", 'id,caption\n0,"a cat"\n1,\n\n2,"a dog, lying"\n')
    got = captions_lib.read_captions(path)
    assert got.texts == ("a cat", "a dog, lying")
    assert got.blank_rows == (3, 4)
    assert [got.row_of(i) for i in range(2)] == [2, 5]


def test_all_blank_file_is_an_error_naming_it(tmp_path):
    path = _write(tmp_path, "blank.txt", "\n \r\n\u3000\n")
    with pytest.raises(ValueError, match=r"blank.txt' holds no captions \(3 lines, all blank\)"):
        captions_lib.read_captions(path)


def test_tsv_is_read_without_quoting(tmp_path):
    """CC12M-style TSV: a caption that opens a '"' it never closes must not swallow the rows
    after it, and quotes inside a caption are kept as written."""
    rows = [f"http://x/{i}.jpg\tcaption {i}" for i in range(10)]
    rows[3] = 'http://x/3.jpg\t"Hello..."12" vinyl'
    rows[5] = 'http://x/5.jpg\t"an unclosed quote starts this caption'
    path = _write(tmp_path, "c.tsv", "url\tcaption\n" + "\n".join(rows) + "\n")
    got = captions_lib.read_captions(path)
    assert len(got) == 10
    assert got.texts[3] == '"Hello..."12" vinyl'
    assert got.texts[5] == '"an unclosed quote starts this caption'
    assert got.texts[6] == "caption 6" and got.row_of(6) == 8


def test_csv_field_with_a_line_break_is_refused_naming_its_row(tmp_path):
    path = _write(tmp_path, "c.csv", 'id,caption\n0,a cat\n1,"an unclosed quote\n2,a dog\n'
                                     '3,a bird\n')
    with pytest.raises(ValueError, match=r"c.csv', row 3 \(lines 3-5\): a quoted field holds a "
                                         r"line break"):
        captions_lib.read_captions(path)
    quoted = _write(tmp_path, "q.csv", 'id,caption\n0,"two\r\nlines"\n')
    with pytest.raises(ValueError, match=r"q.csv', row 2 \(lines 2-3\)"):
        captions_lib.read_captions(quoted)
