"""The final answer of a free response, by rules (no LLM judge).

One function, :func:`extract_answer`, shared by ``mpo eval`` (:mod:`mpo.eval.mathvista`,
``--benchmark answers``), the ``rule_first`` pair strategy and a rule reward. Where each rule comes from:

- reasoning models (DeepSeek-R1 style) think inside ``<think>...</think>``: only the text after the last
  ``</think>`` counts, and an ``<answer>...</answer>`` block there is the answer;
- ``\\boxed{...}`` (nested braces kept) is the convention of the MATH benchmark and of Qwen/R1 math
  prompts; the last one wins;
- "The answer is (B)", "Answer: B", "the correct option is ..." phrasing: the last such phrase, up to
  the end of its sentence or line (MathVista's own extraction prompt, lupantech/MathVista
  ``evaluation/prompts/ext_ans.py``, shows these forms);
- otherwise, as MMMU's ``parse_open_response`` (MMMU-Benchmark/MMMU ``mmmu/utils/eval_utils.py``): the
  shortest tail after a key word ("therefore", "is", "=", ...) of the last sentence that has one;
  for multiple choice, as its ``parse_multi_choice_response``: a bracketed letter, a lone letter, or an
  option's text, the last one occurring;
- a yes/no question answered by a statement: "No, ..." or a negated first sentence ("The pizza is not
  split in half.") means "no", unless the response declines to answer ("cannot", "not enough
  information", "please provide"...); both were measured against MathVista's GPT-4 extractions;
- numbers: LaTeX ``\\frac{a}{b}`` / ``\\dfrac`` / ``a/b`` become their value, thousands separators,
  ``$``, ``%``, degree signs and units are dropped (MathVista compares ``str(int(float(x)))`` and
  ``round(float(x), precision)``, ``evaluation/calculate_score.py``).
"""

from __future__ import annotations

import re

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_PHRASE = re.compile(
    r"(?:final\s+answer|correct\s+(?:answer|option|choice)|the\s+answer|answer|option|choice)(?:\s+letter)?"
    r"(?:\s+(?:is|would\s+be|should\s+be|will\s+be)|\s*[:=])\s*:?\s*"
    r"|(?:答案|选项|故选|应选|选)\s*(?:是|为|[:：])?\s*", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.(?=\s|$)|。|\n|$")
_KEY_WORD = re.compile(r"(?<![a-z])(?:therefore|thus|so|hence|answer|is|are|be|equals|approximately)(?![a-z])"
                       r"|=|≈", re.IGNORECASE)
_DECLINES = re.compile(
    r"cannot|can't|can not|impossible|unable|not possible|not enough|insufficient|not provided|not given"
    r"|not specified|without (?:the|more|additional|further|specific|any)|please provide|sorry|not provide"
    r"|(?:enough|more|additional|sufficient|necessary|specific) (?:information|context|data|details)"
    r"|information (?:needed|required)|not clear|unclear|invalid", re.IGNORECASE)
_NUMBER = re.compile(r"(?<![\w.-])-?(?:\d+(?:\.\d+)?|\.\d+)(?:\s*/\s*\d+(?:\.\d+)?)?")
_GROUPED = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_FRACTION = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_LETTER = re.compile(r"^\(?([A-Z])\)?(?=$|[.:)\s,])")
_BRACKETED = re.compile(r"\(([A-Z])\)")
_LINE_LETTER = re.compile(r"(?m)^\s*([A-Z])[.):](?=\s|$)")
_FEW_WORDS = re.compile(r"[^a-zA-Z]*(?:[a-zA-Z]+[^a-zA-Z]*){0,2}")  # "12 cm", "x = 3 m": a number answer
_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}


def declines(text: str) -> bool:
    """Whether a response says it cannot answer ("cannot", "not enough information", "please provide"...)."""
    return _DECLINES.search(text) is not None


def final_part(response: str) -> str:
    """The part of a response that states the answer: after the last ``</think>`` (all of it after an
    unclosed ``<think>``), and inside the last ``<answer>...</answer>`` when there is one."""
    text = response or ""
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    elif text.lstrip().startswith("<think>"):
        text = text.lstrip()[len("<think>"):]
    tagged = _ANSWER_TAG.findall(text)
    return (tagged[-1] if tagged else text).strip()


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), nested braces kept; None if it
    does not close."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    begin = text.index("{", start) + 1
    depth = 0
    for i in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth < 0:
            return text[begin:i]
    return None


def _after_phrase(text: str) -> str | None:
    starts = [m.end() for m in _PHRASE.finditer(text)]
    for start in reversed(starts):
        end = _SENTENCE_END.search(text, start)
        found = text[start:end.start()].strip()
        if found:
            return found
    return None


def clean(text: str) -> str:
    """Markup dropped: ``\\text{x}`` -> ``x``, ``$``, ``**``, ``\\(``/``\\)``, surrounding quotes and
    parentheses, trailing punctuation; whitespace collapsed."""
    previous = None
    while previous != text:
        previous, text = text, _WRAPPERS.sub(r"\1", text)
    text = text.replace("$", "").replace("**", "").replace("\\(", "").replace("\\)", "").replace("\\%", "%")
    text = " ".join(text.split()).strip().strip("\"'`").strip().rstrip(".,;:!").strip()
    if text.startswith("(") and text.endswith(")") and "(" not in text[1:-1] and ")" not in text[1:-1]:
        text = text[1:-1].strip()
    return text


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<!\d)\.(?!\d)|\n", text) if s.strip()]


def _key_tail(text: str, need_number: bool) -> str | None:
    """The tail after the last key word of the last sentence that has one (MMMU's shortest tail). With
    ``need_number``: the last sentence holding a number, its tail when that holds one, else all of it."""
    for sentence in reversed(_sentences(text)):
        ends = [m.end() for m in _KEY_WORD.finditer(sentence) if sentence[m.end():].strip()]
        tail = sentence[max(ends):].strip() if ends else None
        if not need_number and tail:
            return tail
        if need_number and to_number(sentence) is not None:
            return tail if tail and to_number(tail) is not None else sentence
    return None


def to_number(text: str) -> float | None:
    """The first number in ``text`` as a float: LaTeX fractions and ``a/b`` divided out, thousands
    separators, ``$``, ``%``, degree signs and units ignored, a number word ("three") read; None if none."""
    text = clean(text).replace("−", "-").replace("\\!", "").replace("\\,", "").replace("{,}", "")
    text = _FRACTION.sub(r"(\1)/(\2)", text).replace("(", "").replace(")", "")
    text = _GROUPED.sub("", text)
    found = _NUMBER.search(text)
    word = next((m for m in re.finditer(r"[A-Za-z]+", text) if m.group(0).lower() in _NUMBER_WORDS), None)
    if word is not None and (found is None or word.start() < found.start()):
        return float(_NUMBER_WORDS[word.group(0).lower()])
    if found is None:
        return None
    parts = found.group(0).replace(" ", "").split("/")
    try:
        value = float(parts[0])
        return value / float(parts[1]) if len(parts) == 2 else value
    except (ValueError, ZeroDivisionError):
        return None


def format_number(value: float, answer_type: str | None = None, precision: int | None = None) -> str:
    """``12.0`` -> ``"12"``; a float rounded to ``precision`` when given; otherwise ``repr``-exact."""
    if answer_type == "float" and precision is not None:
        return str(round(value, int(precision)))
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def _norm(text: str) -> str:
    return " ".join(clean(text).lower().split())


def choice_letter(text: str, choices: list[str]) -> str | None:
    """The letter (``"A"``...) that ``text`` names among ``choices``: a letter in range (``B``, ``(B)``,
    ``B.``, ``B) text``), an option's text (equal, or the same number), the longest option inside it,
    or a bracketed letter inside it; None if none."""
    letters = [chr(ord("A") + i) for i in range(len(choices))]
    cleaned = clean(text)
    dialogue = re.match(r"A:\s+(\S.*)", cleaned, re.DOTALL)  # "A: no" is "Answer: no" (Q/A style)
    if dialogue and not _LETTER.match(dialogue.group(1)):
        named = choice_letter(dialogue.group(1), choices)
        if named:
            return named
    found = _LETTER.match(cleaned) or _LETTER.match(cleaned.removeprefix("Option ").removeprefix("option "))
    if found and found.group(1) in letters:
        return found.group(1)
    wanted = _norm(cleaned)
    for letter, choice in zip(letters, choices):
        if _norm(str(choice)) == wanted:
            return letter
    number = to_number(cleaned) if _FEW_WORDS.fullmatch(cleaned) else None
    if number is not None:
        for letter, choice in zip(letters, choices):
            if to_number(str(choice)) == number and re.search(r"\d", str(choice)):
                return letter
    inside = [(len(_norm(str(c))), letter) for letter, c in zip(letters, choices)
              if _norm(str(c)) and re.search(rf"(?<!\w){re.escape(_norm(str(c)))}(?!\w)", wanted)]
    if inside:
        return max(inside)[1]
    bracketed = [b for b in _BRACKETED.findall(cleaned) if b in letters]
    return bracketed[-1] if bracketed else None


def _choice_from_text(text: str, choices: list[str]) -> str | None:
    """A multiple-choice answer stated without an answer phrase, first found of: a short response naming an
    option; an option opening the response ("No, ..."); the last bracketed letter and a letter opening a
    line (MMMU's ``parse_multi_choice_response`` order); the "no" of a yes/no question answered by a
    negated statement; the option whose text occurs last (MMMU's content match)."""
    letters = [chr(ord("A") + i) for i in range(len(choices))]
    whole = choice_letter(text, choices) if len(text.split()) <= 3 or text.startswith("A: ") else None
    if whole:
        return whole
    first = _words(text).split(" ")[0]
    opening = [letter for letter, c in zip(letters, choices) if len(first) > 1 and _words(str(c)) == first]
    if opening:  # "No, the pizza is not split in half." answers a yes/no question at once
        return opening[0]
    bracketed = [(m.start(), m.group(1)) for m in _BRACKETED.finditer(text) if m.group(1) in letters]
    if bracketed:
        return bracketed[-1][1]
    leading = [m.group(1) for m in _LINE_LETTER.finditer(text) if m.group(1) in letters]
    if leading:
        return leading[-1]
    negated = _yes_no_negation(text, letters, choices)
    if negated:
        return negated
    words = " " + _words(text) + " "
    placed = [(words.rfind(" " + _words(str(c)) + " "), len(str(c)), letter)
              for letter, c in zip(letters, choices) if _words(str(c))]
    placed = [p for p in placed if p[0] >= 0]
    return max(placed)[2] if placed else None


def _yes_no_negation(text: str, letters: list[str], choices: list[str]) -> str | None:
    """For a yes/no question answered by a statement: the "no" option when its first sentence negates
    ("The pizza is not split in half.")."""
    named = {_words(str(c)): letter for letter, c in zip(letters, choices)}
    if set(named) != {"yes", "no"} or declines(text):
        return None
    first = _sentences(text)[0] if _sentences(text) else ""
    return named["no"] if re.search(r"(?<![a-z])(?:not|no|never|none)(?![a-z])|n't", first.lower()) else None


def _words(text: str) -> str:
    return " ".join(re.findall(r"\w+", clean(text).lower()))


def _stated(text: str) -> str | None:
    """The answer as stated: the last ``\\boxed{}``, else the last answer phrase (raw text)."""
    stated = last_boxed(text)
    return _after_phrase(text) if stated is None else stated


def sole_number(text: str) -> float | None:
    """The value of ``text`` when it is one number, optionally ``x = `` before it and unit words after
    ("x = 12.5 degrees", "1,200 cm", "\\frac{3}{2}", "45%"); None for anything else ("12.5 + y")."""
    cleaned = _GROUPED.sub("", _FRACTION.sub(r"\1/\2", clean(text).replace("−", "-")))
    cleaned = re.sub(r"^[A-Za-z]\s*=\s*", "", cleaned)
    if not re.fullmatch(r"-?(?:\d+(?:\.\d+)?|\.\d+)(?:\s*/\s*\d+(?:\.\d+)?)?(?:\s*[A-Za-z°%]+)*", cleaned):
        return None
    return to_number(cleaned)


def answer_matches(response: str, answer, choices: list[str] | None = None, answer_type: str | None = None,
                   precision: int | None = None) -> bool:
    """Whether the final answer of ``response`` equals the ground truth ``answer``.

    With ``choices``: the extracted letter equals the truth's letter (the truth is a letter, or an
    option's text). Without: a single-letter truth is an option letter ("Answer: (D) 12" is D);
    numbers compare as numbers (:func:`sole_number`: 12.50 = 12.5, "x = 12.5 degrees" = 12.5, rounded
    to ``precision`` for floats when given, else within 1e-6); other text compares case- and
    markup-insensitively.
    """
    truth = str(answer).strip()
    if choices:
        letters = [chr(ord("A") + i) for i in range(len(choices))]
        wanted = truth.upper() if truth.upper() in letters else choice_letter(truth, choices)
        return wanted is not None and extract_answer(response, choices) == wanted
    text = final_part(response)
    stated = _stated(text)
    if stated is None:
        stated = _key_tail(text, False) if len(text.split()) > 3 else text
    if not stated:
        return False
    if len(truth) == 1 and truth.isalpha():
        found = _LETTER.match(re.sub(r"^(?:option|choice)\s+", "", clean(stated), flags=re.IGNORECASE).upper())
        return found is not None and found.group(1) == truth.upper()
    got, expected = sole_number(stated), sole_number(truth)
    if got is not None and expected is not None:
        if answer_type == "float" and precision is not None:
            return round(got, int(precision)) == round(expected, int(precision))
        return abs(got - expected) <= max(1e-9, 1e-6 * abs(expected))
    return _norm(stated) == _norm(truth)


def extract_answer(response: str, choices: list[str] | None = None, answer_type: str | None = None,
                   precision: int | None = None) -> str | None:
    """The final answer stated in ``response``, or None when it states none.

    Looks, in order, at: the text after the last ``</think>`` (and in ``<answer>`` tags); the last
    ``\\boxed{}``; the last "answer is X" / "Answer: X" / "correct option is X" phrase; else the tail
    after the last key word ("therefore", "is", "=", ...).

    - ``choices`` given (multiple choice): returns the option letter (``"A"``, ``"B"``...), found from a
      letter or from the option's text; else the cleaned answer text (MathVista then takes the nearest
      option, ``calculate_score.py``).
    - ``answer_type`` ``"integer"`` / ``"float"`` (or no type and a numeric answer): a number string
      (``"12"``, ``"0.5"`` for ``\\frac{1}{2}``; rounded to ``precision`` for floats when given).
    - ``answer_type`` ``"list"``: the last ``[...]`` in the answer.
    - otherwise the cleaned answer text.
    """
    text = final_part(response)
    if not text:
        return None
    stated = _stated(text)
    if choices:
        letter = choice_letter(stated, choices) if stated else None
        return letter or _choice_from_text(text, choices) or (clean(stated) if stated else None)
    if answer_type == "list":
        lists = re.findall(r"\[[^\[\]]*\]", stated or text)
        return lists[-1] if lists else None
    if stated is None:
        stated = _key_tail(text, answer_type in ("integer", "float")) if len(text.split()) > 3 else text
    if stated is None:
        return None
    if answer_type in ("integer", "float"):
        value = to_number(stated)
        return None if value is None else format_number(value, answer_type, precision)
    value = to_number(stated) if _FEW_WORDS.fullmatch(clean(stated)) else None
    return format_number(value) if value is not None else clean(stated) or None
