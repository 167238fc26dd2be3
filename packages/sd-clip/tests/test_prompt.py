"""The prompt language: AUTOMATIC1111's documented examples, and a corpus of corner cases.

The doctest examples are those of AUTOMATIC1111's ``modules/prompt_parser.py`` (inputs and
expected outputs reproduced here, as tuples). The corpora's expected values were produced by
AUTOMATIC1111's own code (its ``parse_prompt_attention``, ``get_multicond_prompt_list`` and its
lark grammar for schedules, run outside this repository), not by the code under test.
"""

import warnings

import pytest

from sd_clip import parse_attention, prompt_schedule, split_and

# --- parse_prompt_attention's doctests -------------------------------------------------------

A1111_ATTENTION = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
]

ATTENTION_CORPUS = [
    ("", [("", 1.0)]),
    ("a\\\\b", [("a\\b", 1.0)]),
    ("\\(a\\) \\[b\\]", [("(a) [b]", 1.0)]),
    ("(a:0)", [("a", 0.0)]),
    ("(a:-1.5) b", [("a", -1.5), (" b", 1.0)]),
    ("(a: 1.2 ) b", [("a", 1.2), (" b", 1.0)]),
    ("((a:2)", [("a", 2.2)]),
    ("a) b]", [("a) b]", 1.0)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("BREAK", [("", 1.0), ("BREAK", -1.0), ("", 1.0)]),
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),  # not a break: weighted text
    ("aBREAK b", [("aBREAK b", 1.0)]),
    ("a BREAKb", [("a BREAKb", 1.0)]),
    ("[[a]]", [("a", 0.8264462809917354)]),
    ("(a:1.2)(b:1.2)", [("ab", 1.2)]),
    ("a:b", [("a:b", 1.0)]),
    ("(a:1.2", [("a:1.2", 1.1)]),
    (":1.2)", [(":1.2)", 1.0)]),
    ("\\", [("", 1.0)]),
    ("a \\ b", [("a  b", 1.0)]),
    ("(a:+2)", [("a", 2.0)]),
    ("(a:.5)", [("a", 0.5)]),
    ("(a:5.)", [("a", 5.0)]),
]


@pytest.mark.parametrize("text, expected", A1111_ATTENTION + ATTENTION_CORPUS)
def test_parse_attention(text, expected):
    got = parse_attention(text)
    assert got == expected
    assert all(isinstance(w, float) for _, w in got)


def test_parse_attention_long_tag_list():
    # Every third tag weighted, the rest (and the commas) at 1.0, built here run by run.
    parts, expected = [], []
    for i in range(60):
        weight = 1 + (i % 9 + 1) / 10 if i % 3 == 0 else 1.0
        parts.append(f"(tag{i}:{weight})" if i % 3 == 0 else f"tag{i}")
        text = f"tag{i}" if i % 3 == 0 else f", tag{i}, "
        if i % 3 == 0:
            expected.append((text, weight))
        elif i % 3 == 1:
            expected.append((text, 1.0))
        else:
            expected[-1] = (expected[-1][0] + f"tag{i}" + (", " if i < 59 else ""), 1.0)
    expected[-1] = (expected[-1][0].removesuffix(", "), 1.0)
    assert parse_attention(", ".join(parts)) == expected


@pytest.mark.parametrize("text", ["(a:1.2.3)", "(a:.)", "(a:1..)"])
def test_parse_attention_bad_weight_is_a_clear_error(text):
    # AUTOMATIC1111 fails here too (float() of the weight); ours names the bracket.
    with pytest.raises(ValueError, match="is not a number"):
        parse_attention(text)


# --- get_learned_conditioning_prompt_schedules' doctests -------------------------------------

A1111_SCHEDULES = [
    ("test", [(10, "test")]),
    ("a [b:3]", [(3, "a "), (10, "a b")]),
    ("a [b: 3]", [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", [(10, "a [unbalanced")]),
    ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
    ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", [(s, "a" if s % 2 else "(b:1.1)") for s in range(1, 11)]),
    ("[fe|]male", [(s, "female" if s % 2 else "male") for s in range(1, 11)]),
    ("[fe|||]male", [(s, "female" if s % 4 == 1 else "male") for s in range(1, 11)]),
]


@pytest.mark.parametrize("text, expected", A1111_SCHEDULES)
def test_prompt_schedule_a1111_examples(text, expected):
    assert prompt_schedule(text, 10) == expected


def test_prompt_schedule_a1111_hires_examples():
    assert prompt_schedule("a [b:.5] c", 10, hires_steps=10) == [(10, "a b c")]
    assert prompt_schedule("a [b:1.5] c", 10, hires_steps=10) == [(5, "a  c"), (10, "a b c")]


def test_prompt_schedule_stale_a1111_example():
    # AUTOMATIC1111's docstring still shows [[5, 'a  c'], [10, 'a {b|d{ c']] for this one
    # ("not handling this right now"), from before "|" meant alternation; its grammar today
    # cannot read the "|" and returns the prompt unchanged, which is what we do.
    with pytest.warns(UserWarning, match="alternation"):
        assert prompt_schedule("a [{b|d{:.5] c", 10) == [(10, "a [{b|d{:.5] c")]


LANDSCAPE = (
    "fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75]"
    "[ in foreground::0.6][ in background:0.25] [shoddy:masterful:0.5]"
)

SCHEDULE_CORPUS = [
    (
        LANDSCAPE,
        100,
        [
            (25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
            (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
            (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
            (75, "fantasy landscape with a lake and an oak in background masterful"),
            (100, "fantasy landscape with a lake and a christmas tree in background masterful"),
        ],
    ),
    ("[a:b:0]", 10, [(10, "b")]),
    ("[a:b:-2]", 10, [(10, "b")]),
    ("[a:b:99]", 10, [(10, "a")]),
    ("[a:b:1.0]", 10, [(10, "a")]),  # with a ".": a fraction, 1.0 = the last step
    ("[a:b:1e1]", 10, [(10, "a")]),
    ("[a:b:2.5]", 10, [(10, "a")]),
    (
        "a [(b:1.2):[c|d]:3] e",
        10,
        [(1, "a (b:1.2) e"), (2, "a (b:1.2) e"), (3, "a (b:1.2) e")]
        + [(s, "a c e" if s % 2 else "a d e") for s in range(4, 11)],
    ),
    ("[[a|b]:c:0.5]", 10, [(s, "ab"[(s - 1) % 2] if s <= 5 else "c") for s in range(1, 11)]),
    ("[a\\:b:3]", 10, [(3, ""), (10, "a\\:b")]),
    ("\\[a:b:3\\]", 10, [(10, "\\[a:b:3\\]")]),
    ("(a:b:c) [d:2]", 10, [(2, "(a:b:c) "), (10, "(a:b:c) d")]),
    ("[a:b:c:2]", 10, [(10, "[a:b:c:2]")]),
    ("[a: 2 ]", 10, [(2, ""), (10, "a")]),
    ("[a:b :2]", 10, [(2, "a"), (10, "b ")]),
    ("BREAK [a BREAK b:2]", 10, [(2, "BREAK "), (10, "BREAK a BREAK b")]),
    (
        "1girl, (masterpiece:1.2), [blurry:0.3], [smile|frown]",
        4,
        [
            (1, "1girl, (masterpiece:1.2), , smile"),
            (2, "1girl, (masterpiece:1.2), blurry, frown"),
            (3, "1girl, (masterpiece:1.2), blurry, smile"),
            (4, "1girl, (masterpiece:1.2), blurry, frown"),
        ],
    ),
    ("a\\", 10, [(10, "a\\")]),
    ("(a [b:2])", 10, [(2, "(a )"), (10, "(a b)")]),
    ("[(a:[b:1]):2]", 10, [(1, ""), (2, ""), (10, "(a:b)")]),
    ("[a:b:c:2] [d:e:3]", 10, [(3, "[a:b:c:2] d"), (10, "[a:b:c:2] e")]),
    # Where the grammar is ambiguous (stray brackets right after an edit), lark's choice:
    ("[a:3]]", 10, [(3, "]"), (10, "a]")]),
    ("[a:3]]]", 10, [(10, "[a:3]]]")]),
    ("[a:3]]]]", 10, [(3, "]]]"), (10, "a]]]")]),
    ("([a:3]))", 10, [(10, "([a:3]))")]),
    ("(([a:3])))", 10, [(3, "(()))"), (10, "((a)))")]),
    ("[a|b]]]", 4, [(1, "a]]"), (2, "b]]"), (3, "a]]"), (4, "b]]")]),
    ("[a:3]]]][b:4]]]", 10, [(10, "[a:3]]]][b:4]]]")]),
    ("[a:3] ]]", 10, [(3, " ]]"), (10, "a ]]")]),
    ("[a:3]]] ", 10, [(10, "[a:3]]] ")]),
    ("[a:3]()", 10, [(3, "()"), (10, "a()")]),
]


@pytest.mark.parametrize("text, steps, expected", SCHEDULE_CORPUS)
def test_prompt_schedule_corpus(text, steps, expected):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert prompt_schedule(text, steps) == expected


@pytest.mark.parametrize("text", ["x | y", "[a|b] | c", "a [b|c"])
def test_stray_bar_keeps_the_prompt_and_warns(text):
    with pytest.warns(UserWarning, match="'\\|' outside"):
        assert prompt_schedule(text, 10) == [(10, text)]


def test_deep_nesting_is_text_not_a_crash():
    text = "(" * 3000 + "a" + ")" * 3000
    with pytest.warns(UserWarning, match="nested too deep"):
        assert prompt_schedule(text, 10) == [(10, text)]
    assert parse_attention(text) == [("a", pytest.approx(1.1**3000, rel=1e-9))]


def test_old_scheduling():
    # Before AUTOMATIC1111 1.6: below 1 a fraction, from 1 on a step, "." or not.
    assert prompt_schedule("[a:b:2.5]", 10, use_old_scheduling=True) == [(2, "a"), (10, "b")]
    assert prompt_schedule("[a:b:0.5]", 10, use_old_scheduling=True) == [(5, "a"), (10, "b")]


@pytest.mark.parametrize("steps", [0, -1, 2.5, True, None])
def test_prompt_schedule_bad_steps(steps):
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        prompt_schedule("a", steps)


# --- AND -------------------------------------------------------------------------------------

AND_CORPUS = [
    ("", [("", 1.0)]),
    ("a AND b", [("a", 1.0), (" b", 1.0)]),
    ("a AND b:0.5 AND c :-2", [("a", 1.0), (" b", 0.5), (" c", -2.0)]),
    ("a:1.2", [("a", 1.2)]),
    ("a:2 AND", [("a", 2.0), ("", 1.0)]),
    ("ANDROID AND x", [("ANDROID", 1.0), (" x", 1.0)]),
    ("a\nb:2 AND c:3", [("a\nb:2 ", 1.0), (" c", 3.0)]),
    ("(a:1.2) AND [b:c:3]", [("(a:1.2)", 1.0), (" [b:c:3]", 1.0)]),
    (" AND ", [(" ", 1.0), (" ", 1.0)]),
    ("a:1.", [("a", 1.0)]),
    ("a:.5", [("a", 0.5)]),
    ("a:b", [("a:b", 1.0)]),
]


@pytest.mark.parametrize("text, expected", AND_CORPUS)
def test_split_and(text, expected):
    assert split_and(text) == expected


@pytest.mark.parametrize("fn", [parse_attention, split_and, lambda t: prompt_schedule(t, 10)])
def test_not_a_string(fn):
    with pytest.raises(TypeError, match="must be a str"):
        fn(["a"])
