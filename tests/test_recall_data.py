"""The recall mix of the pretrained-model recipe (experiments.recall_data): pieces, statements
and their recall."""
import json
import random
import re

import pytest

from experiments import recall_data


def _text(lines, seed=0):
    rng = random.Random(seed)
    return "\n".join("x" * rng.randint(1, 90) for _ in range(lines))


@pytest.mark.parametrize("chunk_chars", [0, 50, 400, 10_000])
def test_pieces_cut_at_line_breaks_and_join_back(chunk_chars):
    text = _text(200)
    parts = recall_data.pieces(text, chunk_chars)
    assert "\n".join(parts) == text
    if chunk_chars and chunk_chars < len(text):
        assert len(parts) > 1
        # A piece is longer than the bound only when it is one line that is.
        assert all(len(p) <= chunk_chars or "\n" not in p for p in parts)
    else:
        assert parts == [text]


def test_every_statement_comes_before_its_recall_within_its_piece():
    rng = random.Random(3)
    text = _text(120, seed=1)
    mixed = recall_data.with_facts(text, rng, 4, 4, 0.3)
    body, recalled = mixed.rstrip("\n").rsplit("\n\n", 1)
    statements = recalled.split("\n")
    assert len(statements) == 4
    lines = body.split("\n")
    for statement in statements:
        assert statement in lines
        # Inserted in the first 70% of the file's own lines: at least 30% of them follow it.
        assert lines.index(statement) < len(lines) - int(0.3 * 120) + 4
        assert re.search(r"\d{3,7}", statement)


def test_the_command_writes_pieces_with_facts(tmp_path):
    source = tmp_path / "in.jsonl"
    docs = [_text(300, seed=i) for i in range(3)]
    source.write_text("".join(json.dumps({"text": d, "source": "pkg"}) + "\n" for d in docs))
    out = tmp_path / "out.jsonl"
    recall_data.main(["--input", str(source), "--output", str(out), "--fraction", "1",
                      "--chunk_chars", "4000", "--min_chars", "1000", "--min_facts", "2",
                      "--max_facts", "3"])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    expected = sum(len(recall_data.pieces(d, 4000)) for d in docs)
    assert len(records) == expected > len(docs)
    assert all(r["source"] == "pkg" for r in records)
    with_facts = [r for r in records if "\n\n" in r["text"]]
    assert len(with_facts) == sum(len(p) >= 1000 for d in docs
                                  for p in recall_data.pieces(d, 4000))
    assert not list(tmp_path.glob("*.tmp-*"))


@pytest.mark.parametrize("flag,value", [("--chunk_chars", "-1"), ("--recall_style", "quiz")])
def test_bad_flags_are_refused_naming_them(tmp_path, capsys, flag, value):
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"text": "a"}) + "\n")
    with pytest.raises(SystemExit) as stop:
        recall_data.main(["--input", str(source), "--output", str(tmp_path / "o.jsonl"),
                          flag, value])
    assert stop.value.code == 2
    assert flag in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def _number(text):
    return re.findall(r"\d{3,7}", text)[-1]


def _name(statement):
    """The made-up name in a statement (the one capitalised word that is not its first)."""
    return next(w for w in re.findall(r"[A-Z][a-z]+", statement) if w not in ("The", "Note"))


@pytest.mark.parametrize("style", ["question", "mixed"])
def test_questions_at_the_end_ask_about_a_statement_and_end_with_its_number(style):
    """Each recalled line is about one inserted statement: the same name and number, the
    number last; ``question`` recalls only as questions, ``mixed`` as both; none of it
    borrows the passkey prompt's words."""
    asked = repeated = 0
    for seed in range(40):
        mixed = recall_data.with_facts(_text(60, seed=seed), random.Random(seed), 3, 3, 0.3,
                                       style)
        body, recalled = mixed.rstrip("\n").rsplit("\n\n", 1)
        statements = {_name(line): line for line in body.split("\n") if re.search(r"\d", line)}
        assert len(statements) == 3
        for line in recalled.split("\n"):
            assert line.rstrip(".").endswith(_number(line))
            assert "pass key" not in line.lower() and "remember" not in line.lower()
            if line in statements.values():
                repeated += 1
                continue
            asked += 1
            assert "?" in line
            about = [name for name in statements if name in line]
            assert len(about) == 1 and _number(line) == _number(statements[about[0]])
    assert asked and (repeated if style == "mixed" else not repeated)


def test_the_repeat_style_writes_what_it_wrote_before_the_styles():
    """The default recall (recipe v3's data) draws the same random numbers as before the
    question styles existed: the same seed gives the same file, byte for byte."""
    text = "\n".join(f"line {i}" for i in range(12))
    assert recall_data.with_facts(text, random.Random(7), 2, 2, 0.3) == (
        "line 0\nNote: the room number for Osren is 940.\nline 1\nline 2\nline 3\nline 4\n"
        "line 5\nThe badge id of Ferengun is 1614.\nline 6\nline 7\nline 8\nline 9\nline 10\n"
        "line 11\n\nThe badge id of Ferengun is 1614.\nNote: the room number for Osren is 940.\n")


def test_an_unknown_recall_style_is_refused_by_the_library_too():
    with pytest.raises(ValueError, match="recall_style 'quiz'"):
        recall_data.facts(random.Random(0), 1, "quiz")
