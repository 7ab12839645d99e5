"""SEARCH/REPLACE parsing and applying, including the formatting drift models produce."""

from __future__ import annotations

import pytest

from nightlab.edits import Block, EditError, apply_block, apply_edits, parse_edits

FILES = {"train.py": "import os\n\nLR = 0.1\nEPOCHS = 3\n\ndef f(x):\n    return x * LR\n",
         "model.py": "class M:\n    def forward(self, x):\n        return x\n"}


def one(text: str, files: dict[str, str] = FILES) -> dict[str, str]:
    return apply_edits(files, parse_edits(text, list(files)))


def test_plain_block_applies_and_keeps_the_rationale():
    text = ("Raise the learning rate: the loss is still falling.\n\ntrain.py\n<<<<<<< SEARCH\nLR = 0.1\n"
            "=======\nLR = 0.3\n>>>>>>> REPLACE\n")
    parsed = parse_edits(text, list(FILES))
    assert parsed.rationale == "Raise the learning rate: the loss is still falling."
    assert parsed.blocks == (Block("train.py", "LR = 0.1", "LR = 0.3"),)
    assert apply_edits(FILES, parsed) == {"train.py": FILES["train.py"].replace("LR = 0.1", "LR = 0.3")}


@pytest.mark.parametrize("header", ["**train.py**", "`train.py`", "# train.py", "File: train.py",
                                    "train.py:"])
def test_decorated_file_lines_inside_fences(header):
    text = (f"why\n{header}\n```python\n<<<<<<< SEARCH\nEPOCHS = 3\n=======\nEPOCHS = 5\n"
            ">>>>>>> REPLACE\n```\n")
    assert one(text)["train.py"].count("EPOCHS = 5") == 1


def test_file_on_the_fence_and_sloppy_markers():
    text = ("```python model.py\n<<<<< search\n        return x\n=====\n        return 2 * x\n"
            ">>>>>>>>> replace\n```\n")
    assert one(text) == {"model.py": FILES["model.py"].replace("return x", "return 2 * x")}


def test_missing_file_line_is_inferred_from_the_search_text():
    text = ("<<<<<<< SEARCH\n    def forward(self, x):\n=======\n    def forward(self, x, y=0):\n"
            ">>>>>>> REPLACE")
    assert list(one(text)) == ["model.py"]


def test_several_blocks_apply_in_order_and_follow_the_previous_file():
    text = ("train.py\n<<<<<<< SEARCH\nLR = 0.1\n=======\nLR = 0.2\n>>>>>>> REPLACE\n"
            "<<<<<<< SEARCH\nLR = 0.2\nEPOCHS = 3\n=======\nLR = 0.2\nEPOCHS = 9\n>>>>>>> REPLACE\n")
    assert "LR = 0.2\nEPOCHS = 9\n" in one(text)["train.py"]


def test_whitespace_fuzzy_rule_reindents_the_replacement():
    # trailing spaces in the model's SEARCH: matched line by line after rstrip
    out = one("train.py\n<<<<<<< SEARCH\nLR = 0.1   \n=======\nLR = 0.5\n>>>>>>> REPLACE")
    assert "LR = 0.5" in out["train.py"]
    # wrong indentation: matched after strip, replacement re-indented by the difference
    text = "model.py\n<<<<<<< SEARCH\nreturn x\n=======\ny = x + 1\nreturn y\n>>>>>>> REPLACE"
    assert one(text)["model.py"].endswith("        y = x + 1\n        return y\n")


def test_ambiguous_missing_and_noop_edits_raise_with_a_useful_message():
    files = {"a.py": "x = 1\nx = 1\n"}
    with pytest.raises(EditError, match="occurs 2 times"):
        one("a.py\n<<<<<<< SEARCH\nx = 1\n=======\nx = 2\n>>>>>>> REPLACE", files)
    with pytest.raises(EditError, match=r"block 1: train\.py: the SEARCH text was not found"):
        one("train.py\n<<<<<<< SEARCH\nLR = 7\n=======\nLR = 8\n>>>>>>> REPLACE")
    with pytest.raises(EditError, match="change nothing"):
        one("train.py\n<<<<<<< SEARCH\nLR = 0.1\n=======\nLR = 0.1\n>>>>>>> REPLACE")
    with pytest.raises(EditError, match="no SEARCH/REPLACE"):
        one("I think the learning rate is fine.")
    with pytest.raises(EditError, match="no >>>>>>> REPLACE"):
        parse_edits("train.py\n<<<<<<< SEARCH\nLR = 0.1\n=======\nLR = 0.2\n")


def test_whole_file_for_a_small_file_and_prose_code_is_not_an_edit():
    text = "Rewrite it.\n\nmodel.py\n```python\nclass M:\n    pass\n```\n"
    assert one(text) == {"model.py": "class M:\n    pass\n"}
    # a fenced snippet under prose is an illustration, not a file
    assert parse_edits("For example:\n```python\nprint(1)\n```\n", list(FILES)).empty


def test_empty_search_creates_a_new_file():
    out = one("utils.py\n<<<<<<< SEARCH\n=======\ndef g():\n    return 1\n>>>>>>> REPLACE")
    assert out == {"utils.py": "def g():\n    return 1\n"}
    assert apply_block("a\n", Block("x", "", "b")) == "a\nb\n"


def test_line_endings_blank_lines_and_inner_whitespace_do_not_matter_when_the_match_is_unique():
    crlf = {"w.py": "a = 1\r\nif a:\r\n    b = 2\r\n"}
    out = one("w.py\n<<<<<<< SEARCH\nif a:\n    b = 2\n=======\nif a:\n    b = 3\n>>>>>>> REPLACE", crlf)
    assert out["w.py"] == "a = 1\r\nif a:\r\n    b = 3\r\n"  # CRLF kept
    src = {"m.py": "def f(x):\n    y = x\n\n    return y\n"}
    # a blank line dropped and the indentation lost: still one place, re-indented
    out = one("m.py\n<<<<<<< SEARCH\ny = x\nreturn y\n=======\ny = x * 2\nreturn y\n>>>>>>> REPLACE", src)
    assert out["m.py"] == "def f(x):\n    y = x * 2\n    return y\n"
    out = one("m.py\n<<<<<<< SEARCH\n    y=x\n=======\n    y = -x\n>>>>>>> REPLACE", src)
    assert out["m.py"] == "def f(x):\n    y = -x\n\n    return y\n"


def test_an_absent_search_is_answered_with_the_closest_numbered_lines():
    files = {"t.py": "import os\n\nLR = 0.01\nBATCH = 32\nEPOCHS = 10\n\nprint(LR)\n"}
    with pytest.raises(EditError) as e:
        one("t.py\n<<<<<<< SEARCH\nLR = 0.001\nBATCH = 64\n=======\nLR = 0.1\n>>>>>>> REPLACE", files)
    msg = str(e.value)
    assert "not found" in msg and "closest lines" in msg
    assert "3| LR = 0.01" in msg and "4| BATCH = 32" in msg and "print(LR)" not in msg


def test_an_ambiguous_whitespace_match_names_every_place():
    files = {"t.py": "def a():\n    x = 1\n\ndef b():\n        x = 1\n"}
    with pytest.raises(EditError) as e:
        one("t.py\n<<<<<<< SEARCH\nx = 1\n=======\nx = 2\n>>>>>>> REPLACE", files)
    assert "matches 2 places" in str(e.value) and "lines 2, 5" in str(e.value)
    assert "2|     x = 1" in str(e.value)


def test_structured_json_answers_parse_to_the_same_edits():
    from nightlab.edits import edits_from_json, edits_schema

    text = '{"rationale": "smaller LR", "edits": [{"file": "train.py", "old": "LR = 0.1", "new": "LR = 0.05"}]}'
    p = edits_from_json(text, list(FILES))
    assert p.rationale == "smaller LR" and "\nLR = 0.05\n" in apply_edits(FILES, p)["train.py"]
    assert not edits_from_json("```json\n" + text + "\n```", list(FILES)).empty
    raw_newline = '{"rationale": "r", "edits": [{"file": "train.py", "old": "LR = 0.1", "new": "LR = 0.2\n\tX = 1"}]}'
    assert edits_from_json(raw_newline).blocks[0].replace == "LR = 0.2\n\tX = 1"  # control characters tolerated
    with pytest.raises(EditError, match=r"not valid JSON.*cut off"):
        edits_from_json(text[:40], list(FILES))
    with pytest.raises(EditError, match="no \"edits\""):
        edits_from_json('{"rationale": "x", "edits": []}', list(FILES))
    assert edits_schema(["b.py", "a.py"])["properties"]["edits"]["items"]["properties"]["file"]["enum"] == \
        ["a.py", "b.py"]


def test_unique_lines_are_the_old_texts_a_grammar_may_choose():
    from nightlab.edits import unique_lines

    lines = unique_lines({"a.py": "x = 1\nx = 1\n\ny = 2\ns = \"q\"\n", "b.py": "z = 3\r\n"})
    assert lines == ["y = 2", "z = 3"]  # quotes left out: llama-cpp-python's grammar mis-escapes them
    assert unique_lines({"a.py": "".join(f"v{i} = {i}\n" for i in range(700))}) is None
