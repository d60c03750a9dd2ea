"""A1111 prompt syntax and styles.csv, as engines/prompt_syntax reads them."""
from __future__ import annotations

import pytest

from engines.prompt_syntax import (ParsedPrompt, PromptSyntaxError, Style, StyleError, apply_styles,
                                   load_styles, parse)

UP, DOWN = 1.1, 1 / 1.1

# prompt -> the fragments of its single chunk group, as (text, weight)
EMPHASIS = [
    ("a cat", [("a cat", 1.0)]),
    ("", []),
    ("(cat)", [("cat", UP)]),
    ("((cat))", [("cat", UP * UP)]),
    ("(((cat)))", [("cat", UP ** 3)]),
    ("[cat]", [("cat", DOWN)]),
    ("[[cat]]", [("cat", DOWN * DOWN)]),
    ("a (cat) on a [mat]", [("a ", 1.0), ("cat", UP), (" on a ", 1.0), ("mat", DOWN)]),
    ("(cat:1.5)", [("cat", 1.5)]),
    ("(cat:0.25)", [("cat", 0.25)]),
    ("(cat: 1.5 )", [("cat", 1.5)]),
    ("(cat:-1)", [("cat", -1.0)]),
    ("(cat:.5)", [("cat", 0.5)]),
    ("((cat:1.5))", [("cat", 1.5 * UP)]),
    ("(a (cat:1.5) b:0.5)", [("a ", 0.5), ("cat", 0.75), (" b", 0.5)]),
    ("[(cat:1.5)]", [("cat", 1.5 * DOWN)]),
    ("([cat])", [("cat", 1.0)]),  # up and down cancel, and equal weights would merge
    ("a (((house:1.3)) [on] a (hill:0.5)",
     [("a ", 1.0), ("house", 1.573), (" ", UP), ("on", 1.0), (" a ", UP), ("hill", 0.55)]),
    # not a weight: the text keeps the colon and the brackets give their default 1.1
    ("(cat:big)", [("cat:big", UP)]),
    ("(cat:1.2.3)", [("cat:1.2.3", UP)]),
    ("a: b", [("a: b", 1.0)]),
    ("[cat:1.5]", [("cat:1.5", DOWN)]),
    ("cat:1.5)", [("cat:1.5)", 1.0)]),
    # escapes
    (r"\(cat\)", [("(cat)", 1.0)]),
    (r"\[cat\]", [("[cat]", 1.0)]),
    (r"a \\ b", [("a \\ b", 1.0)]),
    (r"(\(cat\))", [("(cat)", UP)]),
    (r"a\b", [("a\\b", 1.0)]),  # a backslash that escapes nothing stays
    # unbalanced
    ("(cat", [("cat", UP)]),
    ("a (b (c", [("a ", 1.0), ("b ", UP), ("c", UP * UP)]),
    ("[cat", [("cat", DOWN)]),
    ("cat)", [("cat)", 1.0)]),
    ("cat]", [("cat]", 1.0)]),
    ("a) (b", [("a) ", 1.0), ("b", UP)]),
    ("(a [b) c]", [("a ", UP), ("b", 1.0), (" c", DOWN)]),  # round and square are counted apart
    # empty brackets
    ("()", []),
    ("a () b", [("a  b", 1.0)]),
    ("[]cat", [("cat", 1.0)]),
    ("(:1.5)", []),
    # lowercase break is a word
    ("a break b", [("a break b", 1.0)]),
    ("BREAKFAST", [("BREAKFAST", 1.0)]),
]


@pytest.mark.parametrize("prompt, expected", EMPHASIS, ids=[p or "<empty>" for p, _ in EMPHASIS])
def test_emphasis(prompt, expected):
    parsed = parse(prompt)
    assert len(parsed.chunks) == 1
    assert [f.text for f in parsed.chunks[0]] == [t for t, _ in expected]
    assert [f.weight for f in parsed.chunks[0]] == pytest.approx([w for _, w in expected])


# prompt -> its chunk groups, each a list of (text, weight)
BREAKS = [
    ("a BREAK b", [[("a", 1.0)], [("b", 1.0)]]),
    ("a, BREAK, b", [[("a,", 1.0)], [(", b", 1.0)]]),
    ("BREAK a", [[], [("a", 1.0)]]),  # a leading BREAK leaves an empty (padding) chunk
    ("a BREAK", [[("a", 1.0)]]),  # a trailing one adds nothing
    ("a BREAK ", [[("a", 1.0)]]),
    ("BREAK", [[]]),
    ("a BREAK BREAK b", [[("a", 1.0)], [], [("b", 1.0)]]),
    ("(a BREAK b)", [[("a", UP)], [("b", UP)]]),
    ("(a BREAK b", [[("a", UP)], [("b", UP)]]),
    ("a\nBREAK\nb", [[("a", 1.0)], [("b", 1.0)]]),
]


@pytest.mark.parametrize("prompt, expected", BREAKS, ids=[p for p, _ in BREAKS])
def test_break_splits_chunk_groups(prompt, expected):
    chunks = parse(prompt).chunks
    assert [[f.text for f in group] for group in chunks] == [[t for t, _ in group] for group in expected]
    for group, want in zip(chunks, expected):
        assert [f.weight for f in group] == pytest.approx([w for _, w in want])


LORAS = [
    ("a <lora:foo:0.5> cat", "a  cat", (("foo", 0.5),)),
    ("<lora:foo>", "", (("foo", 1.0),)),
    ("<lora:foo:>", "", (("foo", 1.0),)),
    ("<lora:foo:0.7:0.3>", "", (("foo", 0.7),)),
    ("<lora:foo:0.7:0.3:16>", "", (("foo", 0.7),)),
    ("<lyco:bar:-1>", "", (("bar", -1.0),)),
    ("<lora: spaced name : 0.8 >", "", (("spaced name", 0.8),)),
    ("(a <lora:foo:2>)", "a ", (("foo", 2.0),)),
    ("<lora:a:1> x <lora:b:0.25>", " x ", (("a", 1.0), ("b", 0.25))),
    ("<not a tag>", "<not a tag>", ()),
]


@pytest.mark.parametrize("prompt, text, loras", LORAS, ids=[p for p, _, _ in LORAS])
def test_lora_tags_are_taken_out(prompt, text, loras):
    parsed = parse(prompt)
    assert "".join(f.text for f in parsed.chunks[0]) == text
    assert parsed.loras == loras
    assert parsed.ignored == ()


def test_other_extra_network_tags_are_ignored_and_reported():
    parsed = parse("a <hypernet:h:1> cat <ti:x>")
    assert parsed.chunks == ((("a  cat ", 1.0),),)
    assert parsed.ignored == ("<hypernet:h:1>", "<ti:x>")
    assert parsed.loras == ()


def test_lora_weight_that_is_not_a_number_is_an_error():
    with pytest.raises(PromptSyntaxError, match="not a number"):
        parse("<lora:foo:strong>")


def test_parsed_prompt_is_a_snapshot():
    parsed = parse("(a)")
    assert isinstance(parsed, ParsedPrompt)
    assert parsed == parse("(a)")
    with pytest.raises(AttributeError):
        parsed.loras = ()  # type: ignore[misc]


# ------------------------------------------------------------------------------------------- styles
def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_load_styles_reads_a1111_csv_quoting(tmp_path):
    path = write(tmp_path / "styles.csv",
                 'name,prompt,negative_prompt\n'
                 'cinema,"{prompt}, film grain, 35mm","blurry, ugly"\n'
                 'plain,watercolor,\n'
                 ',nameless row,\n'
                 '"with ""quotes""","a ""b"" c",\n')
    styles = load_styles(path)
    assert list(styles) == ["cinema", "plain", 'with "quotes"']
    assert styles["cinema"] == Style("cinema", "{prompt}, film grain, 35mm", "blurry, ugly")
    assert styles["plain"] == Style("plain", "watercolor", "")
    assert styles['with "quotes"'].prompt == 'a "b" c'


def test_load_styles_accepts_a_byte_order_mark(tmp_path):
    path = tmp_path / "styles.csv"
    path.write_bytes("name,prompt,negative_prompt\nx,y,z\n".encode("utf-8-sig"))
    assert load_styles(path) == {"x": Style("x", "y", "z")}


def test_missing_styles_file_is_a_style_error(tmp_path):
    with pytest.raises(StyleError, match="not found"):
        load_styles(tmp_path / "nope.csv")


def test_styles_file_with_a_bad_header_is_a_style_error(tmp_path):
    path = write(tmp_path / "styles.csv", "title,text_prompt\nx,y\n")
    with pytest.raises(StyleError, match="name,prompt,negative_prompt"):
        load_styles(path)


def test_style_with_placeholder_wraps_the_prompt():
    style = Style("s", "photo of {prompt}, 8k", "{prompt}, lowres")
    assert apply_styles("a cat", "blurry", [style]) == ("photo of a cat, 8k", "blurry, lowres")


def test_style_without_placeholder_is_appended():
    style = Style("s", "watercolor", "ugly")
    assert apply_styles("a cat", "blurry", [style]) == ("a cat, watercolor", "blurry, ugly")


def test_style_appended_to_empty_text_has_no_separator():
    assert apply_styles("", "", [Style("s", "watercolor", "ugly")]) == ("watercolor", "ugly")


def test_empty_style_text_leaves_the_prompt_alone():
    assert apply_styles("a cat", "blurry", [Style("s", "", "")]) == ("a cat", "blurry")


def test_styles_apply_in_order():
    styles = [Style("a", "{prompt} in a forest"), Style("b", "oil painting of {prompt}"), Style("c", "dusk")]
    assert apply_styles("a fox", "", styles) == ("oil painting of a fox in a forest, dusk", "")
