"""What an LLM's answer to a rewriting request holds: the rewritten prompt, cleaned of the
chat around it (quotes, a preamble, a closing explanation), a refusal, or nothing to draw from.

The rules are heuristics over what chat models answer; ``tests/test_generators_dtm.py`` pins
them with real preambles and refusals on one side, and prompts that merely look like them
("Here is Venice reimagined ...: gondolas ...", "Sorry-looking puppy ...") on the other.
"""

from __future__ import annotations

import re

from trig_stream.errors import ItemError

MAX_REWRITE_CHARS = 4000
"""The longest rewrite taken: the system message asks for under 120 words, and a server that
ignores max_tokens sent a megabyte, stored in every judgement of the image."""

MAX_ANSWER_CHARS = 4 * MAX_REWRITE_CHARS
"""The longest answer read at all (a rewrite at :data:`MAX_REWRITE_CHARS` with a preamble and
an explanation around it): a longer one is refused before any pattern runs over it, so that
no answer, however it is laid out, holds the worker thread (and the GIL) for long.

Each pattern below is linear in its input besides: a run of whitespace is matched one way
only (possessive ``*+`` / ``++`` where two quantifiers could share it), which
``tests/test_generators_dtm.py`` checks with answers of blank lines by the hundred thousand."""


REFUSAL = re.compile(
    r"(I['’]?m|I am)\s+(sorry|unable|not able|afraid)\b(?!-)|sorry\b(?!-)|I\s+apologi[sz]e|"
    r"((my\s+)?apologies|unfortunately)[\s,!.]+(but\s+)?(I|we)\b|as an AI\b(?!-)|"
    r"unfortunately[\s,]+(this|that|your)\s+(request|prompt)\b",
    re.I,
)
"""How an LLM's refusal to rewrite opens (matched at the start of its answer only: a prompt may
well say "sorry" further in). "Unfortunately" and "Apologies" open a refusal only before "I" or
"we" ("Unfortunately, I can't ...") or the request ("Unfortunately, this prompt ..."):
"Unfortunately for the knight, ..." and "Apologies written on a chalkboard" are prompts."""

OBJECT = (
    r"(this|that|it)(\s+for\s+you)?\s*$|"
    r"(a|an|the|this|that|such|any|your)\s+([\w-]+\s+){0,2}?"
    r"(prompt|image|picture|content|request|rewrite|description|version)s?\b"
)
"""What a refusal declines to make: the request itself ("that", "it", at the sentence's end) or
a prompt, an image, content ("a prompt that depicts ...", "that image prompt")."""

REFUSAL_IN_FIRST_SENTENCE = re.compile(
    r"[^\"“”‘\n]{0,60}?\bviolates?\s+(our|my)\s+(content\s+)?(polic(y|ies)|guidelines)\b|"
    r"([^\"“”‘\n]{0,40}?(,\s*(so\s+)?|\s+but\s+))?"
    r"I(\s+(must|have to|need to)\s+(respectfully\s+)?decline"
    r"(\s*$|\s+to\b|\s+(this|that|your|the)\s+(request|prompt|task)\b)|"
    r"(\s+(can['’]?t|cannot|can not|won['’]?t|will not|am unable to|am not able to)|"
    r"['’]m\s+(unable|not able)\s+to)\b"
    r"([^\"“”‘\n]{0,40}?\b(help( you)? (with|here|on)|assist|rewrite|rewriting|comply|"
    r"do (this|that|it|so)|fulfil+|modify)\b|(\s+help( you)?)?\s*$|"
    rf"\s+(generate|create|provide|produce|write|make)\s+({OBJECT})))",
    re.I,
)
"""A refusal in the answer's first sentence: said by the LLM in the first person, to the user,
at the sentence's start or after an opening of any kind ("My apologies, but I must decline",
"Regrettably, I can't help with that", "This request violates my guidelines, so I can't rewrite
it"), and of the request (declining it, or unable to help with it, rewrite it, do it, make a
prompt or an image of it: "I cannot generate a prompt that depicts violence", "I cannot provide
that"); or the request said to violate the LLM's policy ("... violates our content policy").
Not a first person of the prompt's own: one quoted ("A poster that says 'I can't help you with
that'"), after words that are no opening ("A poster: I can't help falling in love"), or of
something else ("I must decline the invitation, says a card", "I won't forget this sunset",
"I can't stop smiling")."""

INTERJECTION = r"((sure|certainly|of course|absolutely|okay|ok|great|alright)\b[^\n]{0,20}\n++)?"
"""A line of its own before a preamble ("Sure!")."""

MARKDOWN = r"[*_#>\s]*+"

REVISED = r"(rewritten|revised|improved|enhanced|refined|updated|new)"

HERE_IS = r"here(['’]s| is| are)\s+(the|your|a|an|my)\s+"

REVISED_KEYWORD = (
    rf"([\w-]+\s+){{0,2}}{REVISED}\b[^\n:]{{0,40}}?\b(prompt|version|description|rewrite|text)s?"
)
"""A keyword of the rewrite after a word of revision: "rewritten prompt", "revised version of
your prompt", "enhanced text-to-image prompt"."""

PREAMBLE = re.compile(
    rf"\s*+{INTERJECTION}{MARKDOWN}("
    r"((sure|certainly|of course|absolutely|okay|ok|great|alright)[!.,\s]++)?"
    rf"({HERE_IS}({REVISED_KEYWORD}|rewrites?)\b[^\n:]{{0,12}}"
    rf"|(the|a)\s+{REVISED}\s+prompt"
    rf"|{REVISED}\s+((text-to-image|image)\s+)?(prompt|version|description|text)"
    r")[*_ \t]*(:|\n)"
    rf"|{HERE_IS}({REVISED_KEYWORD}|prompts?)(\s+{REVISED})?"
    r"(,?[ \t]+(that|which)\b[^\n:]{0,100})?[*_ \t]*:[*_ \t]*\n"
    r")[*_\s]*",
    re.I,
)
"""The words that introduce the rewrite, as chat models add despite being asked not to ("Sure!
Here is the rewritten prompt:", "**Rewritten prompt:**"), taken off the answer's start, after an
interjection line and markdown: "here is" with a determiner and a word of revision ("the
rewritten", "a revised", "your improved") before the keyword (prompt, version, description)
that stands right before the colon or the line's end; a bare label ("Rewritten prompt:", "The
new prompt:", a heading); or, with the colon ending its line (the prompt starts on the next),
"here is" with a determiner and "prompt" ("Here is the prompt:", "Here's the prompt
rewritten:") or a keyword after a word of revision, followed by a clause of its own ("Here is an
improved prompt that balances both dimensions:", "Here's a prompt that emphasizes both
dimensions:"). Never a first clause of the prompt's own, which goes on on its line ("An improved
text layout: ...", "Here is Venice reimagined as a futuristic version of itself, floating above
the clouds: ...", "Your updated description: ...")."""

AFTERWORD = re.compile(
    r"(?<=[\w.!?)\"'”’*])[ \t]*\n[^\S\n]*\n[*_#>\s]*+"
    r"(explanation|rationale|notes?|changes(\s+made)?)[*_]*\s*:.*\Z",
    re.I | re.S,
)
"""A closing paragraph that explains the rewrite, opening a line with "Explanation:",
"Rationale:", "Note:", "Changes:" or "Changes made:" after a complete prompt: no part of the
prompt. Any other paragraph ("Changes made to the garden: tulips ...") is the prompt's own."""

ECHO = re.compile(r"^[^\S\n]*Original:[^\S\n]*$", re.M)
"""The marker before the prompt in our request (``user_message``): an answer holding it
repeats the request rather than answering it."""


THINK_OPEN = "<think>"
THINK_CLOSE = re.compile(r"</think>[^\S\n]*+(?:\n|\Z)|^[^\S\n]*+</think>", re.M | re.I)
"""The tags around a reasoning model's thinking, when its server leaves it in the answer (no
reasoning parser): the rewrite follows the block. The block opens with ``<think>`` at the
answer's start (on the line of its first thought or a line of its own); after that opening tag
a ``</think>`` closes it where reasoning models write it, ending a line (``Okay.</think>``, then
the rewrite on the next) or starting one (``</think> A red bicycle``); in a sentence (``a sign
reading </think> on a wall``) it is a prompt's own. Tags match in any case; blocks in a row are
all taken off. DeepSeek-R1's chat template opens the block itself, so its answer may hold the
closing tag alone: :data:`THINK_CLOSE_ALONE` says where that one counts."""

THINK_CLOSE_ALONE = re.compile(
    r"^[^\S\n]*+</think>[^\S\n]*+$|</think>[^\S\n]*+\n[^\S\n]*+\n", re.M | re.I
)
"""A ``</think>`` closing thinking that no ``<think>`` opened (DeepSeek-R1's chat template
opens it): on a line of its own, or ending a line followed by a blank one (R1's
``reasoning.</think>``, a blank line, the rewrite). A prompt may mention the tag anywhere else
(``a neon sign that reads </think>``, a line, then more of the prompt; ``the tags <think>
and``, a line, ``</think> in green``), so without the opening tag those keep their text, and so
does a cut that would leave nothing."""

APOSTROPHE_AS_QUOTE = re.compile(r"(?<![^\W\d_])'|'(?![^\W\d_])")
"""A ``'`` that may be a quote mark: not between two letters, as an apostrophe ("knight's") is."""

QUOTE_MARKS = {'"': re.compile('"'), "'": APOSTROPHE_AS_QUOTE}
"""The marks inside an answer that may open or close a quote of each kind."""

BEFORE_OPENING = "([{/-–—"
"""Characters a quote may follow to open a phrase (besides a space): '("OPEN")'."""

AFTER_CLOSING = ".,;:!?)]}/-–—"
"""Characters a quote may precede to close a phrase (besides a space): '"OPEN".'."""

FENCE = re.compile(r"```[\w+-]*+[^\S\n]*+\n(?P<inner>.*)\n[^\S\n]*+```", re.S)
"""A markdown code fence (with a language tag or none) around the whole answer."""


class RefusedContent(ItemError):
    """The LLM declined to rewrite this prompt (a content filter stopped it, or it refused in
    words): the prompt's own failure, which says nothing of the LLM's options and does not
    count toward stopping the run."""


def rewritten_prompt(
    content: str | None, finish_reason: str | None, *, guidance: str, max_tokens: int
) -> str:
    """The rewritten prompt in an LLM's answer, cleaned of a reasoning model's leading
    ``<think>`` block, a code fence around it, quotes, a preamble and a closing explanation.

    Raises:
        RefusedContent: a content filter stopped the answer, or the LLM refused in words.
        ItemError: the answer holds no other rewrite to draw from: empty, cut, the request
            repeated, over :data:`MAX_REWRITE_CHARS`, holding half a character, or a
            ``<think>`` block never closed.
    """
    if finish_reason == "content_filter":
        raise RefusedContent("the LLM's content filter stopped its rewrite")
    text = (content or "").strip()
    if len(text) > MAX_ANSWER_CHARS:
        # Refused before any pattern reads it (a long answer of blank lines took them
        # minutes); measured without the blanks around it, which are no answer.
        if finish_reason == "length":
            raise _cut(max_tokens)
        raise _too_long(text)
    text = _unfenced(_clean(_after_thinking(text, finish_reason, max_tokens)))
    preamble = PREAMBLE.match(text)
    if preamble is not None:
        text = _unfenced(_clean(text[preamble.end() :]))
    text = _clean(AFTERWORD.sub("", text))
    if not text:
        if finish_reason == "length":  # its reasoning took every token
            raise _cut(max_tokens)
        raise ItemError("the LLM answered with an empty rewrite")
    if not _encodable(text):
        # JSON carries "\ud83d" (half an emoji, as a token may be); UTF-8 cannot: the
        # journal refused the record (the run crashed), and the image's text chunk held a
        # rewrite no resumed run could read back.
        raise ItemError(
            "the LLM's rewrite holds half a character (a lone surrogate escape such as "
            "\\ud83d), which cannot be sent or stored as UTF-8"
        )
    if finish_reason == "length":  # cut mid-sentence: no prompt to draw from
        raise _cut(max_tokens)
    if len(text) > MAX_REWRITE_CHARS:
        raise _too_long(text)
    first_sentence = re.split(r"[.!?\n]", text, maxsplit=1)[0]
    if REFUSAL.match(text) or REFUSAL_IN_FIRST_SENTENCE.match(first_sentence):
        raise RefusedContent(f"the LLM refused to rewrite the prompt: {text[:80]!r}")
    if guidance in text or ECHO.search(text):
        raise ItemError("the LLM's answer repeats the request's guidance instead of a rewrite")
    return text


def _after_thinking(text: str, finish_reason: str | None, max_tokens: int) -> str:
    """``text`` (stripped) after a reasoning block at its start: ``<think>...</think>`` (the
    closing tag where :data:`THINK_CLOSE` says), or thinking closed by ``</think>`` alone (its
    opening tag in the chat template; where :data:`THINK_CLOSE_ALONE` says). An answer opening
    with ``<think>`` is reasoning: with no closing tag after it, it holds no rewrite.

    Raises:
        ItemError: a ``<think>`` block is never closed: the answer is reasoning, no rewrite.
    """
    opened = text[: len(THINK_OPEN)].lower() == THINK_OPEN
    if not opened:
        close = THINK_CLOSE_ALONE.search(text)
        after = "" if close is None else text[close.end() :].strip()
        if not after:  # no closing tag, or one ending the text: the prompt's own words
            return text
        text = after
    while True:  # a block per turn of reasoning, each with its tags
        opened = text[: len(THINK_OPEN)].lower() == THINK_OPEN
        if not opened:
            return text
        close = THINK_CLOSE.search(text, len(THINK_OPEN))
        if close is None:
            break
        text = text[close.end() :].strip()
    if finish_reason == "length":
        raise _cut(max_tokens)
    raise ItemError(
        "the LLM's answer is a <think> block never closed (no </think> ending or starting a "
        "line): its reasoning, no rewrite; let the server take the reasoning out of the answer "
        "(vLLM's --reasoning-parser), or raise max_tokens"
    )


def _unfenced(text: str) -> str:
    """``text`` without a code fence around the whole of it."""
    fenced = FENCE.fullmatch(text)
    if fenced is None or "```" in fenced["inner"]:
        return text
    return fenced["inner"].strip()


def _cut(max_tokens: int) -> ItemError:
    return ItemError(f"the LLM's rewrite was cut at max_tokens ({max_tokens})")


def _too_long(text: str) -> ItemError:
    return ItemError(
        f"the LLM's rewrite is {len(text):,} characters long (at most "
        f"{MAX_REWRITE_CHARS:,} are taken): no answer to the request"
    )


def _encodable(text: str) -> bool:
    """Whether ``text`` is valid Unicode that UTF-8 can carry (no lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _clean(text: str) -> str:
    """``text`` stripped, without a pair of quotes around the whole of it."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'" and _wraps_all(text):
        text = text[1:-1].strip()
    return text


def _wraps_all(text: str) -> bool:
    """Whether the quote marks at ``text``'s ends are one pair around all of it, not the first
    and last of the prompt's own quoted phrases ('"Welcome" on a mat beside "Exit"'): every
    quote of that kind inside opens or closes a phrase inside ('"A sign reading "OPEN" above a
    door"'), none closes the opening one early. Where a quote stands (after a space it opens,
    before one it closes) says which it is; one that says neither keeps the quotes. Apostrophes
    are no quotes: between letters ("knight's"), or closing no phrase after an "s" ("the
    knights' shields")."""
    quote, inner = text[0], text[1:-1]
    depth = 0  # the phrases opened inside and not yet closed
    for mark in QUOTE_MARKS[quote].finditer(inner):
        at = mark.start()
        before = inner[at - 1] if at > 0 else " "
        after = inner[at + 1] if at + 1 < len(inner) else " "
        if not before.isspace() and (after.isspace() or after in AFTER_CLOSING):
            if depth > 0:
                depth -= 1
            elif not (quote == "'" and before == "s"):
                return False  # it closes the opening quote: that pair wraps only a phrase
        elif (before.isspace() or before in BEFORE_OPENING) and not after.isspace():
            depth += 1
        else:
            return False
    return depth == 0
