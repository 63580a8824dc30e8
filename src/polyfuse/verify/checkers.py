"""Verifiers for sampled responses: maths final answers and code run against tests.

**Maths.** :func:`extract_answer` takes the response's final answer, in this order: the last
``\\boxed{...}`` (nested braces kept), the last "final answer is / the answer is / Answer:" phrase, the
last number. :func:`answers_match` compares it with the gold answer after :func:`normalize_answer`
(``$``, ``\\left``/``\\right``, spacing commands, ``\\text{}``, degrees, percent signs, ``\\dfrac``,
thousands separators, a leading ``x =``), then

* numbers exactly as rationals (``fractions.Fraction``: ``0.5 == 1/2 == \\frac{1}{2} == 2/4``), or within
  ``rel_tol`` when either side is written as a decimal (``0.3333333 == 1/3`` at the default 1e-6);
* comma-separated tuples, intervals and lists element by element (same brackets);
* other expressions (``2\\sqrt{3}``, ``\\pi/2``) with sympy when it is installed (``use_sympy``), on a
  sanitised plain-maths rendering only (digits, ``+-*/^()``, single letters, ``sqrt``, ``pi``; short, small
  exponents), never ``eval`` of arbitrary text;
* otherwise the normalised strings.

**Code.** :func:`extract_code` takes the response's code (the fenced ```` ```python ```` block that
defines the entry point, else the longest Python block, else any fenced block, else the whole text) and
:func:`verify_code` runs it against the prompt's tests in :mod:`polyfuse.verify.sandbox`.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Any

from polyfuse.verify.sandbox import SandboxConfig, SandboxJob, SandboxResult, run_code, run_many

__all__ = [
    "CodeVerdict",
    "MathVerdict",
    "VerifierConfig",
    "answers_match",
    "build_test_program",
    "extract_answer",
    "extract_boxed",
    "extract_code",
    "normalize_answer",
    "parse_number",
    "verify_code",
    "verify_code_many",
    "verify_math",
]


@dataclass(frozen=True)
class VerifierConfig:
    """Settings of the maths and code verifiers (part of the score cache key)."""

    rel_tol: float = 1e-6
    """Relative tolerance when either answer is written as a decimal."""
    use_sympy: bool = True
    """Compare non-numeric answers symbolically when sympy is installed."""
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    """Limits for running code against tests."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (for cache keys and manifests)."""
        return asdict(self)


@dataclass(frozen=True)
class MathVerdict:
    """Whether a response's final answer equals the gold answer."""

    correct: bool
    extracted: str | None
    """The final answer found in the response (``None``: none found)."""
    reason: str
    """``match``, ``mismatch`` or ``no answer``."""


@dataclass(frozen=True)
class CodeVerdict:
    """Whether a response's code passes the prompt's tests."""

    correct: bool
    status: str
    """The sandbox status (``passed``, ``failed``, ``timeout``, ``memory``, ``crashed``, ``blocked``)."""
    error: str
    duration_s: float


# --------------------------------------------------------------------------------------------------
# maths: extraction


_BOX_COMMANDS = ("\\boxed", "\\fbox")
_ANSWER_PHRASE = re.compile(
    r"(?:final\s+answer|the\s+answer|answer)\s*(?:is|:|=)\s*:?\s*(?P<ans>[^\n]+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?|-?\.\d+")


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """The content of the ``{...}`` group opening at ``text[start]`` (nested braces) and the index after it."""
    if start >= len(text) or text[start] != "{":
        return None
    depth = 0
    for i in range(start, len(text)):
        ch = text[i]
        if ch == "\\":  # skip escaped braces \{ \}
            continue
        if ch == "{" and (i == 0 or text[i - 1] != "\\"):
            depth += 1
        elif ch == "}" and text[i - 1] != "\\":
            depth -= 1
            if depth == 0:
                return text[start + 1:i], i + 1
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``, or ``\\boxed 5``) in ``text``; ``None`` if absent.

    >>> extract_boxed(r"so $\\boxed{\\frac{1}{2}}$ and done")
    '\\\\frac{1}{2}'
    """
    best: tuple[int, str] | None = None
    for command in _BOX_COMMANDS:
        pos = text.rfind(command)
        while pos != -1:
            after = pos + len(command)
            rest = text[after:]
            stripped = rest.lstrip(" ")
            content: str | None = None
            if stripped.startswith("{"):
                found = _braced(text, after + len(rest) - len(stripped))
                content = found[0] if found else None
            elif rest[:1] == " " and stripped:
                content = re.split(r"[\s$]", stripped, maxsplit=1)[0]
            if content is not None:
                if best is None or pos > best[0]:
                    best = (pos, content)
                break
            pos = text.rfind(command, 0, pos)
    return best[1].strip() if best else None


def extract_answer(text: str) -> str | None:
    """The final answer of a maths response: last ``\\boxed{}``, else last "the answer is ...", else last number."""
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    phrases = list(_ANSWER_PHRASE.finditer(text))
    if phrases:
        answer = phrases[-1].group("ans").strip()
        answer = re.sub(r"^\*+|\*+$", "", answer).strip()  # markdown bold
        math = re.search(r"\$([^$]+)\$", answer) or re.search(r"\\\((.+?)\\\)", answer)
        if math:
            answer = math.group(1)
        answer = re.sub(r"\.\s*$", "", answer).strip()
        if answer:
            return answer
    numbers = _NUMBER.findall(text)
    return numbers[-1].strip().rstrip(",") if numbers else None


# --------------------------------------------------------------------------------------------------
# maths: normalisation and comparison


_TEXT_COMMANDS = ("\\text", "\\textbf", "\\textit", "\\mathrm", "\\mathbf", "\\mbox", "\\operatorname")
_REMOVE = ("\\left", "\\right", "\\displaystyle", "\\!", "\\,", "\\;", "\\:", "\\ ", "\\%", "%", "$", "\\$",
           "^\\circ", "^{\\circ}", "°", "\\(", "\\)", "\\[", "\\]")
_THOUSANDS = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")


def _unwrap_text(s: str) -> str:
    for command in _TEXT_COMMANDS:
        while True:
            pos = s.find(command + "{")
            if pos == -1:
                break
            found = _braced(s, pos + len(command))
            if found is None:
                break
            s = s[:pos] + found[0] + s[found[1]:]
    return s


def normalize_answer(answer: str) -> str:
    """Canonical text of an answer: LaTeX decorations, spacing, units markers and ``x =`` prefixes removed.

    >>> normalize_answer(r"$x = \\dfrac{3}{4}\\,\\text{cm}$")
    '\\\\frac{3}{4}cm'
    """
    s = answer.strip()
    boxed = extract_boxed(s)
    if boxed is not None:
        s = boxed
    s = _unwrap_text(s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    for token in _REMOVE:
        s = s.replace(token, "")
    s = s.replace("\\cdot", "*").replace("\\times", "*").replace("−", "-")
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt(\d+)", r"\\sqrt{\1}", s)
    s = re.sub(r"\s+", " ", s).strip()
    s = re.sub(r"^[a-zA-Z]\s*=\s*(?=\S)", "", s)  # "x = 5" -> "5"
    s = re.sub(r"[.\s]+$", "", s)
    s = s.replace(" ", "")
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    return s


def _plain_number(s: str) -> Fraction | None:
    if re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?", s, re.IGNORECASE):
        try:
            return Fraction(s)
        except (ValueError, ZeroDivisionError):
            return None
    return None


def parse_number(answer: str) -> tuple[Fraction, bool] | None:
    """``(value, written_as_decimal)`` of a normalised answer that is a number, fraction or mixed number.

    Accepts ``12``, ``-3.50``, ``1e-3``, ``3/4``, ``\\frac{3}{4}``, ``-\\frac{3}{4}``, ``2\\frac{1}{2}``,
    ``1,000``; trailing units words (``5 dollars``) are dropped; anything else gives ``None``.
    """
    s = normalize_answer(answer)
    unit = re.fullmatch(r"(-?[\d.]+)([a-zA-Z]{2,})", s)
    if unit and unit.group(2) != "pi":  # "5dollars" (from "5 dollars") -> 5; "5x" and "2pi" stay
        s = unit.group(1)
    value = _plain_number(s)
    if value is not None:
        return value, "." in s or "e" in s.lower()
    sign = -1 if s.startswith("-") else 1
    body = s[1:] if s.startswith(("-", "+")) else s
    m = re.fullmatch(r"(\d*)\\frac\{([^{}]+)\}\{([^{}]+)\}", body)
    if m:
        whole, num, den = m.groups()
        n, d = _plain_number(num), _plain_number(den)
        if n is None or d is None or d == 0:
            return None
        value = Fraction(int(whole)) + n / d if whole else n / d
        return sign * value, "." in num + den
    m = re.fullmatch(r"([-+]?[\d.]+)/([-+]?[\d.]+)", body)
    if m:
        n, d = _plain_number(m.group(1)), _plain_number(m.group(2))
        if n is None or d is None or d == 0:
            return None
        return sign * n / d, "." in body
    return None


def _split_top_level(s: str) -> list[str]:
    parts, depth, current = [], 0, []
    for ch in s:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def _as_sequence(s: str) -> tuple[str, list[str]] | None:
    """(bracket pair, elements) of ``(a,b)``, ``[a,b)``, ``\\{a,b\\}`` or a bare ``a,b``; ``None`` for one item."""
    brackets = ""
    inner = s
    if len(s) >= 2 and s[0] in "([{" and s[-1] in ")]}":
        brackets, inner = s[0] + s[-1], s[1:-1]
        if _split_top_level(inner) == [inner] and s[0] + s[-1] in ("()", "{}"):
            return None  # plain grouping, e.g. (3)
    elif s.startswith("\\{") and s.endswith("\\}"):
        brackets, inner = "{}", s[2:-2]
    parts = _split_top_level(inner)
    if len(parts) < 2:
        return None
    return brackets, parts


def _sympy_available() -> bool:
    return importlib.util.find_spec("sympy") is not None


_SAFE_NAMES = {"sqrt", "pi"}
_SAFE_CHARS = re.compile(r"^[0-9a-zA-Z+\-*/^().\s]*$")


def _latex_to_plain(s: str) -> str | None:
    """A plain-maths rendering of simple LaTeX (``\\frac``, ``\\sqrt``, ``^``, ``\\pi``) or ``None`` if unsafe."""
    if len(s) > 120:
        return None
    out = s
    patterns = (
        (re.compile(r"\\frac\{([^{}]*)\}\{([^{}]*)\}"), lambda m: f"(({m.group(1)})/({m.group(2)}))"),
        (re.compile(r"\\sqrt\[([^\]]*)\]\{([^{}]*)\}"), lambda m: f"(({m.group(2)})^(1/({m.group(1)})))"),
        (re.compile(r"\\sqrt\{([^{}]*)\}"), lambda m: f"sqrt({m.group(1)})"),
    )
    for _ in range(20):  # innermost groups first: their content holds no braces
        for pattern, render in patterns:
            m = pattern.search(out)
            if m:
                out = out[:m.start()] + render(m) + out[m.end():]
                break
        else:
            break
    out = out.replace("\\pi", "pi").replace("{", "(").replace("}", ")")
    if "\\" in out or not _SAFE_CHARS.match(out):
        return None
    names = set(re.findall(r"[a-zA-Z]+", out))
    if any(len(name) > 1 and name not in _SAFE_NAMES for name in names):
        return None
    # small powers only: at most two, no tower (no operator between two carets), exponents below 1000
    if out.count("^") > 2 or re.search(r"\^[^+\-*/]*\^", out) or re.search(r"\^\(?\d{3,}", out):
        return None
    if re.search(r"\d\.[^0-9]|\.\D|\D\.", out + " "):  # a dot only inside decimals (no attribute access)
        return None
    return out


def _sympy_equal(a: str, b: str) -> bool:
    plain_a, plain_b = _latex_to_plain(a), _latex_to_plain(b)
    if plain_a is None or plain_b is None:
        return False
    import sympy
    from sympy.parsing.sympy_parser import (
        convert_xor,
        implicit_multiplication_application,
        parse_expr,
        standard_transformations,
    )

    transformations = (*standard_transformations, implicit_multiplication_application, convert_xor)
    local = {"sqrt": sympy.sqrt, "pi": sympy.pi}
    try:
        ea = parse_expr(plain_a, local_dict=local, transformations=transformations)
        eb = parse_expr(plain_b, local_dict=local, transformations=transformations)
        return bool(sympy.simplify(ea - eb) == 0)
    except Exception:  # noqa: BLE001 - any parse or simplify failure means "not shown equal"
        return False


def _numbers_equal(a: tuple[Fraction, bool], b: tuple[Fraction, bool], rel_tol: float) -> bool:
    (va, dec_a), (vb, dec_b) = a, b
    if va == vb:
        return True
    if dec_a or dec_b:
        return abs(float(va - vb)) <= rel_tol * max(1.0, abs(float(vb)), abs(float(va)))
    return False


#: One bare name (``x``, ``pi``) or one plain number: two different atoms are never equal.
_ATOM = re.compile(r"^(?:[A-Za-z]+|[+-]?\d+(?:\.\d+)?)$")


def answers_match(predicted: str, gold: str, *, rel_tol: float = 1e-6, use_sympy: bool = True) -> bool:
    """Whether two final answers are equal (see the module docstring for the rules)."""
    p, g = normalize_answer(predicted), normalize_answer(gold)
    if not p or not g:
        return False
    if p == g or p.lower() == g.lower():
        return True
    np_, ng = parse_number(p), parse_number(g)
    if np_ is not None and ng is not None:
        return _numbers_equal(np_, ng, rel_tol)
    sp, sg = _as_sequence(p), _as_sequence(g)
    if sp is not None or sg is not None:
        if sp is None or sg is None or sp[0] != sg[0] or len(sp[1]) != len(sg[1]):
            return False
        return all(answers_match(x, y, rel_tol=rel_tol, use_sympy=use_sympy) for x, y in zip(sp[1], sg[1], strict=True))
    if _ATOM.match(p) and _ATOM.match(g):  # two different names or numbers: never equal, sympy need not say so
        return False
    if use_sympy and _sympy_available():
        return _sympy_equal(p, g)
    return False


def verify_math(response: str, gold: str, config: VerifierConfig | None = None) -> MathVerdict:
    """Extract the response's final answer and compare it with ``gold`` (which may itself hold a ``\\boxed{}``)."""
    config = config or VerifierConfig()
    extracted = extract_answer(response)
    if extracted is None:
        return MathVerdict(False, None, "no answer")
    gold_answer = extract_boxed(gold) or gold
    ok = answers_match(extracted, gold_answer, rel_tol=config.rel_tol, use_sympy=config.use_sympy)
    return MathVerdict(ok, extracted, "match" if ok else "mismatch")


# --------------------------------------------------------------------------------------------------
# code


_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_PYTHON_TAGS = {"python", "py", "python3", "py3"}


def extract_code(response: str, entry_point: str | None = None) -> str:
    """The code of a response: a fenced block that defines ``entry_point``, else the longest ```` ```python ````
    block, else the longest fenced block, else the whole text. An unclosed fence runs to the end."""
    blocks = [(tag.lower(), body) for tag, body in _FENCE.findall(response)]
    if not blocks:
        return response.strip("\n")
    python = [body for tag, body in blocks if tag in _PYTHON_TAGS]
    candidates = python or [body for tag, body in blocks if not tag] or [body for _, body in blocks]
    if entry_point:
        defining = [b for b in candidates if re.search(rf"^\s*(?:async\s+)?(?:def|class)\s+{re.escape(entry_point)}\b",
                                                         b, re.MULTILINE)]
        if defining:
            return defining[-1].strip("\n")
    return max(candidates, key=len).strip("\n")


def build_test_program(tests: str | Sequence[str], entry_point: str | None = None) -> str:
    """Test code from a prompt's ``tests`` (code, or a list of assert lines); HumanEval-style ``check``
    functions get ``check(entry_point)`` appended."""
    text = tests if isinstance(tests, str) else "\n".join(tests)
    if entry_point and re.search(r"^def check\(", text, re.MULTILINE) and not re.search(r"^check\(", text, re.MULTILINE):
        text += f"\n\ncheck({entry_point})\n"
    return text


def _verdict(result: SandboxResult) -> CodeVerdict:
    return CodeVerdict(result.passed, result.status, result.error, result.duration_s)


def verify_code(response: str, tests: str | Sequence[str], *, entry_point: str | None = None,
                config: VerifierConfig | None = None) -> CodeVerdict:
    """Run the response's code, then the tests, in the sandbox; correct when every test passes."""
    config = config or VerifierConfig()
    code = extract_code(response, entry_point)
    return _verdict(run_code(code, build_test_program(tests, entry_point), config.sandbox))


def verify_code_many(items: Sequence[tuple[str, str | Sequence[str], str | None]],
                     config: VerifierConfig | None = None, *, workers: int | None = None) -> list[CodeVerdict]:
    """:func:`verify_code` for many ``(response, tests, entry_point)`` at once, ``workers`` sandboxes at a time."""
    config = config or VerifierConfig()
    jobs = [SandboxJob(extract_code(resp, entry), build_test_program(tests, entry)) for resp, tests, entry in items]
    return [_verdict(r) for r in run_many(jobs, config.sandbox, workers=workers)]
