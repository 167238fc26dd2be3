"""AUTOMATIC1111's prompt language: emphasis weights, prompt editing per step, ``AND`` parts.

Three readers, each equal to the one in AUTOMATIC1111's ``modules/prompt_parser.py``:

- :func:`parse_attention` splits a prompt into ``(text, weight)`` runs: ``(a)`` multiplies the
  weight by 1.1, ``[a]`` divides it by 1.1, ``(a:1.3)`` multiplies it by 1.3 (any number,
  0 and negative included); ``\\(``, ``\\)``, ``\\[``, ``\\]`` and ``\\\\`` are literals. A
  bracket left open applies to the end of the prompt; a closing bracket with no opening one is
  kept as text. ``BREAK`` (upper case, a word of its own) becomes ``("BREAK", -1.0)``, which the
  tokenizer reads as "start a new chunk".
- :func:`prompt_schedule` evaluates prompt editing: ``[from:to:when]``, ``[to:when]``,
  ``[from::when]`` and alternation ``[a|b|c]``, giving the text to encode up to each step.
  AUTOMATIC1111 parses with a lark grammar; this is a hand-written parser with the same results
  (on AUTOMATIC1111's own examples, and on some 40,000 random bracket-heavy prompts compared
  with that grammar while writing it): a bracket that cannot be read as editing, alternation
  or emphasis stays literal text, and a prompt the grammar cannot read at all (a ``|`` outside
  ``[...]``, a ``\\`` at the very end) is used as written, for every step.
- :func:`split_and` splits a composable prompt at ``AND`` into parts with an optional
  ``:weight`` at the end of each.
"""

from __future__ import annotations

import re
import warnings

__all__ = ["parse_attention", "prompt_schedule", "split_and"]

ROUND_MULTIPLIER = 1.1  # AUTOMATIC1111's weight for one pair of ( )
SQUARE_MULTIPLIER = 1 / 1.1  # and for one pair of [ ]

# The pieces of a prompt, tried in this order at each position: an escaped bracket or backslash,
# a lone backslash, an opening bracket, a ":number)" that closes a weighted round bracket, a
# closing bracket, a run of ordinary text, a lone colon.
_ATTENTION_PIECE = re.compile(
    r"""
    (?P<escaped> \\[()\[\]\\] )
    | (?P<backslash> \\ )
    | (?P<open> [(\[] )
    | :\s* (?P<weight> [+-]?[.\d]+ ) \s*\)
    | (?P<close> [)\]] )
    | (?P<text> [^\\()\[\]:]+ | : )
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.DOTALL)


def parse_attention(text: str) -> list[tuple[str, float]]:
    """The prompt as ``(text, weight)`` runs, as AUTOMATIC1111's ``parse_prompt_attention``.

    Neighbouring runs of equal weight are merged; an empty prompt is ``[("", 1.0)]``.

    >>> parse_attention("a (red:1.5) [circle]")
    [('a ', 1.0), ('red', 1.5), (' ', 1.0), ('circle', 0.9090909090909091)]
    """
    if not isinstance(text, str):
        raise TypeError(f"the prompt must be a str, got {type(text).__name__}")
    runs: list[list] = []  # [text, weight], weights multiplied in place as brackets close
    round_open: list[int] = []  # index in runs where each open ( begins
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for match in _ATTENTION_PIECE.finditer(text):
        kind, piece = match.lastgroup, match.group(0)
        if kind in ("escaped", "backslash"):
            runs.append([piece[1:], 1.0])  # a lone backslash keeps what follows it: nothing
        elif kind == "open":
            (round_open if piece == "(" else square_open).append(len(runs))
        elif kind == "weight" and round_open:
            multiply(round_open.pop(), _weight(match.group("weight"), piece))
        elif piece == ")" and round_open:
            multiply(round_open.pop(), ROUND_MULTIPLIER)
        elif piece == "]" and square_open:
            multiply(square_open.pop(), SQUARE_MULTIPLIER)
        else:  # text, and a closing bracket with nothing open, kept as written
            _append_text(runs, piece)
    for start in round_open:
        multiply(start, ROUND_MULTIPLIER)
    for start in square_open:
        multiply(start, SQUARE_MULTIPLIER)
    if not runs:
        runs = [["", 1.0]]
    merged: list[list] = [runs[0]]
    for run in runs[1:]:
        if run[1] == merged[-1][1]:
            merged[-1][0] += run[0]
        else:
            merged.append(run)
    return [(t, float(w)) for t, w in merged]


def _weight(number: str, piece: str) -> float:
    try:
        return float(number)
    except ValueError:
        raise ValueError(
            f"{piece.strip()!r} in the prompt: {number!r} is not a number; write a weight as "
            f"(text:1.2), or escape the bracket as \\)"
        ) from None


def _append_text(runs: list[list], text: str) -> None:
    """Text at weight 1.0 (brackets multiply it later); each BREAK in it a ("BREAK", -1) run."""
    for i, part in enumerate(_BREAK.split(text)):
        if i:
            runs.append(["BREAK", -1.0])
        runs.append([part, 1.0])


# ---------------------------------------------------------------------------------------------
# Prompt editing and alternation.
#
# The tree of a prompt is a list of nodes: a str (text kept as written, brackets of emphasis
# included), a _Scheduled or an _Alternate. Inside any bracket every bracket must be well formed
# (the grammar allows stray brackets only at the outermost level); at the outermost level an
# opening bracket that does not parse is literal text, and the parse of the whole prompt fails
# on a "|" outside any alternation or a backslash with nothing (or a line break) after it.

_NUMBER = re.compile(r"[+-]?(?:\d+[eE][+-]?\d+|(?:\d+\.\d*|\.\d+)(?:[eE][+-]?\d+)?|\d+)")
_WHEN = re.compile(r"\s*(" + _NUMBER.pattern + r")\s*\]")
_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")


class _Scheduled:
    """``[before:after:when]``: before up to step ``when``, after from then on."""

    __slots__ = ("after", "before", "number", "when")

    def __init__(self, before: list | None, after: list, number: str):
        self.before, self.after, self.number = before, after, number
        self.when = 0


class _Alternate:
    """``[a|b|c]``: one option per step, in turn."""

    __slots__ = ("options",)

    def __init__(self, options: list[list]):
        self.options = options


class _Unparsable(Exception):
    """The prompt does not fit the grammar; it is then used as written."""


def _parse_inner(text: str, i: int) -> tuple[list, int]:
    """Nodes of the prompt starting at ``i`` up to (not including) a ``] ) : |`` or the end."""
    nodes: list = []
    while i < len(text):
        c = text[i]
        if c == "[":
            node, i = _parse_square(text, i)
            nodes.extend(node) if isinstance(node, list) else nodes.append(node)
        elif c == "(":
            node, i = _parse_round(text, i)
            nodes.extend(node)
        elif c in "]):|":
            break
        else:
            match = _PLAIN.match(text, i)
            if match is None:  # a backslash at the end, or before a line break
                raise _Unparsable
            nodes.append(match.group(0))
            i = match.end()
    return nodes, i


def _parse_square(text: str, i: int) -> tuple[list | _Scheduled | _Alternate, int]:
    """``[...]`` at ``i``: emphasis (kept as text), prompt editing or alternation."""
    first, i = _parse_inner(text, i + 1)
    end = text[i] if i < len(text) else ""
    if end == "]":
        return ["[", *first, "]"], i + 1
    if end == "|":
        options = [first]
        while i < len(text) and text[i] == "|":
            option, i = _parse_inner(text, i + 1)
            options.append(option)
        if i < len(text) and text[i] == "]":
            return _Alternate(options), i + 1
        raise _Unparsable
    if end == ":":
        when = _WHEN.match(text, i + 1)
        if when:  # [to:when]
            return _Scheduled(None, first, when.group(1)), when.end()
        second, i = _parse_inner(text, i + 1)
        if i < len(text) and text[i] == ":":
            when = _WHEN.match(text, i + 1)
            if when:  # [from:to:when]
                return _Scheduled(first, second, when.group(1)), when.end()
    raise _Unparsable


def _parse_round(text: str, i: int) -> tuple[list, int]:
    """``(...)`` or ``(...:...)`` at ``i``: emphasis, kept as text with what it holds."""
    first, i = _parse_inner(text, i + 1)
    if i < len(text) and text[i] == ")":
        return ["(", *first, ")"], i + 1
    if i < len(text) and text[i] == ":":
        second, i = _parse_inner(text, i + 1)
        if i < len(text) and text[i] == ")":
            return ["(", *first, ":", *second, ")"], i + 1
    raise _Unparsable


class _Stray(str):
    """A bracket or colon at the outermost level that is not part of any construct."""


def _parse_outer(text: str) -> list[tuple[object, int, int]]:
    """The outermost level, greedily: ``(node, start, end)``; a bracket that does not parse is a
    _Stray; a ``|`` outside alternation, or a backslash with nothing after it, fails it all."""
    items: list[tuple[object, int, int]] = []
    i = 0
    while i < len(text):
        c, start = text[i], i
        if c in "[(":
            try:
                node, i = _parse_square(text, i) if c == "[" else _parse_round(text, i)
            except _Unparsable:
                node, i = _Stray(c), i + 1
        elif c in "]):":
            node, i = _Stray(c), i + 1
        else:
            match = _PLAIN.match(text, i)
            if match is None:
                raise _Unparsable
            node, i = match.group(0), match.end()
        items.append((node, start, i))
    return items


def _parses(text: str) -> bool:
    try:
        _parse_outer(text)
    except _Unparsable:
        return False
    return True


def _parse_schedule(text: str) -> list:
    """The tree of a prompt, as AUTOMATIC1111's lark grammar reads it.

    The grammar is ambiguous where stray brackets or colons follow a construct's closing
    bracket (``[a:3]]]``): its closing bracket and the strays after it may be read as one run
    of strays, with the construct as text. Lark (Earley, choosing by rule order, then by the
    order it happened to derive the alternatives in) reads it as text when the longest run of
    strays that could end there, back to the earliest point the prompt before it still
    parses, has an odd length, and keeps the constructs when it is even: a rule found by
    comparing the two parsers, not documented by lark. Read from the end, as lark chooses:
    each run that ends in a stray is checked, and where its reading is text, the prompt
    before it is read again without the constructs it closed.
    """
    tree: list = []
    end = len(text)
    while True:
        items = _parse_outer(text[:end])
        k, cut = len(items), None
        while k > 0:
            if not isinstance(items[k - 1][0], _Stray):
                k -= 1
                continue
            stop, first = items[k - 1][2], k - 1
            while first > 0 and isinstance(items[first - 1][0], _Stray):
                first -= 1
            run = stop
            while run > 0 and text[run - 1] in "[]():":
                run -= 1
            start = next(j for j in range(run, stop) if _parses(text[:j]))
            if (stop - start) % 2 and start < items[first][1]:
                cut = start
                break
            k = first
        if cut is None:
            return _flat(items) + tree
        tree = [text[cut : items[k - 1][2]], *_flat(items[k:]), *tree]
        end = cut


def _flat(items: list[tuple[object, int, int]]) -> list:
    """The items' nodes, the emphasis brackets (lists of nodes) spliced in."""
    nodes: list = []
    for node, _, _ in items:
        nodes.extend(node) if isinstance(node, list) else nodes.append(node)
    return nodes


def _walk(nodes: list):
    """Every _Scheduled and _Alternate in the tree, the branches not taken included."""
    for node in nodes:
        if isinstance(node, _Scheduled):
            yield node
            yield from _walk(node.before or [])
            yield from _walk(node.after)
        elif isinstance(node, _Alternate):
            yield node
            for option in node.options:
                yield from _walk(option)


def _render(nodes: list, step: int) -> str:
    parts = []
    for node in nodes:
        if isinstance(node, str):
            parts.append(node)
        elif isinstance(node, _Scheduled):
            parts.append(_render(node.before or [] if step <= node.when else node.after, step))
        else:
            parts.append(_render(node.options[(step - 1) % len(node.options)], step))
    return "".join(parts)


def prompt_schedule(
    text: str, steps: int, *, hires_steps: int | None = None, use_old_scheduling: bool = False
) -> list[tuple[int, str]]:
    """``(last step, text)`` pairs: the text to encode up to and including each step.

    As AUTOMATIC1111's ``get_learned_conditioning_prompt_schedules`` for one prompt. The
    ``when`` of ``[from:to:when]`` is a step number when written without a ``.`` and a fraction
    of the steps when written with one (``0.25``; ``1.0`` is the last step);
    ``use_old_scheduling=True`` reads it as AUTOMATIC1111 did before 1.6: a fraction when
    below 1, a step number otherwise. With ``hires_steps``, the schedule of the hires-fix pass:
    step numbers count on from ``steps``, fractions from 1.0 (so ``1.5`` is half-way through
    it). A ``when`` outside the steps is clamped, as AUTOMATIC1111 does.

    >>> prompt_schedule("a [cat:dog:0.5]", 10)
    [(5, 'a cat'), (10, 'a dog')]
    """
    if not isinstance(text, str):
        raise TypeError(f"the prompt must be a str, got {type(text).__name__}")
    for name, value in (("steps", steps), ("hires_steps", hires_steps)):
        if value is None and name == "hires_steps":
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if hires_steps is None or use_old_scheduling:
        step_offset, fraction_offset, total = 0, 0.0, steps
    else:
        step_offset, fraction_offset, total = steps, 1.0, hires_steps
    try:
        tree = _parse_schedule(text)
    except RecursionError:  # brackets nested hundreds deep: read as written, not a crash
        warnings.warn(
            f"prompt {text[:40]!r}...: brackets nested too deep for prompt editing; the whole "
            "prompt is used as written",
            stacklevel=2,
        )
        return [(total, text)]
    except _Unparsable:
        if "|" in text:
            warnings.warn(
                f"prompt {text!r}: '|' outside [a|b] alternation; the whole prompt is used as "
                "written, with no prompt editing",
                stacklevel=2,
            )
        return [(total, text)]
    ends = {total}
    for node in _walk(tree):
        if isinstance(node, _Alternate):
            ends.update(range(1, total + 1))
            continue
        value = float(node.number)
        if use_old_scheduling:
            value = value * total if value < 1 else value
        elif "." in node.number:
            value = (value - fraction_offset) * total
        else:
            value = value - step_offset
        # int() of the clamped value: AUTOMATIC1111's min(total, int(value)), without its
        # overflow on a huge number (any value <= 0 means "never before").
        node.when = int(min(max(value, 0.0), total))
        if node.when >= 1:
            ends.add(node.when)
    return [(end, _render(tree, end)) for end in sorted(ends)]


# ---------------------------------------------------------------------------------------------
# Composable prompts.

_AND = re.compile(r"\bAND\b")
# A part: its text, then an optional ":weight" at the very end (text and weight trimmed of the
# spaces around them; leading spaces of the text kept, as AUTOMATIC1111 keeps them).
_PART_WEIGHT = re.compile(r"(\s*.*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


def split_and(text: str) -> list[tuple[str, float]]:
    """The ``AND`` parts of a composable prompt, each with its weight (1.0 unless ``:w``).

    As AUTOMATIC1111's ``get_multicond_prompt_list`` for one prompt (without its dedup): each
    part is then a prompt of its own (schedules, emphasis), and the guidance adds the parts'
    predictions with these weights.

    >>> split_and("a cat AND a dog:0.5")
    [('a cat', 1.0), (' a dog', 0.5)]
    """
    if not isinstance(text, str):
        raise TypeError(f"the prompt must be a str, got {type(text).__name__}")
    parts = []
    for part in _AND.split(text):
        match = _PART_WEIGHT.match(part)
        if match is None:  # a part over several lines: AUTOMATIC1111 keeps it whole, weight 1
            parts.append((part, 1.0))
        else:
            weight = match.group(2)
            parts.append((match.group(1), 1.0 if weight is None else float(weight)))
    return parts
