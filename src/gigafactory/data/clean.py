"""Normalisation, quality rules, a language check and PII scrubbing: pure functions of one document's text.

The quality rules follow the published heuristics of Gopher (Rae et al. 2021, appendix A: word count, mean
word length, symbol-to-word ratio, bullet and ellipsis lines, alphabetic words, repeated lines and n-grams)
and C4 (Raffel et al. 2020: lines without terminal punctuation, "lorem ipsum", curly braces). Thresholds are
the papers' unless noted, and every one is a field of `QualityRules`, so a run can change them
(`gigafactory data prepare --rules rules.json`)."""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

from pydantic import BaseModel, ConfigDict, Field

# ---- normalisation -----------------------------------------------------------------------------------------
_CONTROL = {c for c in range(0x20) if chr(c) not in "\n\t"} | {0x7F} | set(range(0x80, 0xA0))
_CONTROL_TABLE = dict.fromkeys(_CONTROL)
_SPACES = re.compile(r"[^\S\n]+")  # any whitespace run except newlines
_BLANK_LINES = re.compile(r"\n{3,}")


def normalise(text: str) -> str:
    """Unicode NFC, control characters removed, runs of spaces/tabs collapsed to one space, at most one blank
    line in a row, lines and document stripped."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n").translate(_CONTROL_TABLE)
    text = _SPACES.sub(" ", text)
    text = "\n".join(line.strip() for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", text).strip()


# ---- quality rules -----------------------------------------------------------------------------------------
class QualityRules(BaseModel):
    """Thresholds of the quality filters (Gopher / C4). A document failing any rule is dropped with its name."""

    model_config = ConfigDict(extra="forbid")

    min_words: int = Field(5, ge=0, description="Gopher uses 50; 5 keeps short social-media posts")
    max_words: int = Field(100_000, gt=0, description="Gopher")
    min_mean_word_len: float = Field(2.0, ge=0, description="Gopher uses 3; 2 keeps chat-style text")
    max_mean_word_len: float = Field(10.0, gt=0, description="Gopher")
    max_symbol_word_ratio: float = Field(0.1, ge=0, description="Gopher: '#' and '...' per word")
    max_bullet_line_frac: float = Field(0.9, ge=0, le=1, description="Gopher: lines starting with a bullet")
    max_ellipsis_line_frac: float = Field(0.3, ge=0, le=1, description="Gopher: lines ending with an ellipsis")
    min_alpha_word_frac: float = Field(0.8, ge=0, le=1, description="Gopher: words with a letter")
    max_dup_line_frac: float = Field(0.3, ge=0, le=1, description="Gopher: duplicate lines / lines")
    max_top_ngram_char_frac: dict[int, float] = Field(
        {2: 0.20, 3: 0.18, 4: 0.16}, description="Gopher: characters in the most frequent word n-gram"
    )
    max_dup_ngram_char_frac: dict[int, float] = Field(
        {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10},
        description="Gopher: characters in word n-grams that occur more than once",
    )
    c4_lorem_ipsum: bool = Field(True, description="C4: drop pages with 'lorem ipsum'")
    c4_curly_brace: bool = Field(False, description="C4 drops pages with '{' (code); off: code is wanted")
    language: str | None = Field(None, description="keep only this language (stop-word check), e.g. 'en'")
    min_language_stopwords: int = Field(2, ge=0, description="Gopher: at least 2 stop words of the language")


_WORD = re.compile(r"\w+(?:['’]\w+)*")
_ALPHA_TOKEN = re.compile(r"\S*[^\W\d_]\S*")  # whitespace-separated tokens holding a letter
_BULLETS = ("•", "-", "*", "·", "‣", "◦", "–")


def words_of(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _grams(words: list[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(zip(*(words[i:] for i in range(n)), strict=False))


def _ngram_failure(words: list[str], top_ns: dict[int, float], dup_ns: dict[int, float]) -> str | None:
    """Gopher's repetition rules: for each n in `top_ns`, the characters in the most frequent word n-gram; for each
    n in `dup_ns`, the characters in n-grams seen more than once (each word counted once); both as fractions of all
    word characters. The name of the first rule over its limit, or None."""
    total = sum(map(len, words))
    if total == 0:
        return None
    for n, limit in sorted(top_ns.items()):
        if len(words) >= n:
            gram, count = _grams(words, n).most_common(1)[0]
            if count > 1 and count * sum(map(len, gram)) / total > limit:
                return f"top_{n}gram"
    for n, limit in sorted(dup_ns.items()):
        if len(words) < n:
            break
        counts = _grams(words, n)
        if all(c == 1 for c in counts.values()):
            break  # no repeated n-gram: no repeated longer one either
        covered = bytearray(len(words))
        for i, gram in enumerate(zip(*(words[k:] for k in range(n)), strict=False)):
            if counts[gram] > 1:
                covered[i : i + n] = b"\x01" * n
        if sum(len(w) for w, c in zip(words, covered, strict=True) if c) / total > limit:
            return f"duplicate_{n}grams"
    return None


# Small stop-word lists: Gopher's English list plus the most frequent function words of a few languages.
STOPWORDS: dict[str, frozenset[str]] = {
    "en": frozenset("the be to of and that have with a in is it for on this you".split()),
    "de": frozenset("der die das und ist nicht ein eine zu mit den von sich auf für".split()),
    "fr": frozenset("le la les et est une un des du que pas pour dans sur avec".split()),
    "es": frozenset("el la los las y es una un que de en por con para del".split()),
    "it": frozenset("il la che di e un una per non con sono del della gli".split()),
    "pt": frozenset("o a os as e um uma que de em para com não do da".split()),
    "nl": frozenset("de het een en is van dat niet op te met voor zijn".split()),
}


def guess_language(words: list[str]) -> tuple[str | None, int]:
    """The language whose stop words are most frequent in the text, and how many stop-word tokens it had."""
    best, best_n = None, 0
    for lang, stops in STOPWORDS.items():
        n = sum(1 for w in words if w in stops)
        if n > best_n:
            best, best_n = lang, n
    return best, best_n


def quality_failure(text: str, rules: QualityRules) -> str | None:
    """The name of the first rule the (normalised) document fails, or None if it passes them all."""
    words = words_of(text)
    n = len(words)
    if n < rules.min_words:
        return "too_short"
    if n > rules.max_words:
        return "too_long"
    mean_len = sum(len(w) for w in words) / n if n else 0.0
    if n and not rules.min_mean_word_len <= mean_len <= rules.max_mean_word_len:
        return "mean_word_length"
    if n and (text.count("#") + text.count("...") + text.count("…")) / n > rules.max_symbol_word_ratio:
        return "symbol_ratio"
    lines = [ln for ln in text.split("\n") if ln]
    if lines:
        if sum(ln.startswith(_BULLETS) for ln in lines) / len(lines) > rules.max_bullet_line_frac:
            return "bullet_lines"
        if sum(ln.endswith(("...", "…")) for ln in lines) / len(lines) > rules.max_ellipsis_line_frac:
            return "ellipsis_lines"
        if 1 - len(set(lines)) / len(lines) > rules.max_dup_line_frac:
            return "duplicate_lines"
    tokens = len(text.split())
    if tokens and len(_ALPHA_TOKEN.findall(text)) / tokens < rules.min_alpha_word_frac:
        return "alpha_words"
    if failure := _ngram_failure(words, rules.max_top_ngram_char_frac, rules.max_dup_ngram_char_frac):
        return failure
    low = text.lower()
    if rules.c4_lorem_ipsum and "lorem ipsum" in low:
        return "lorem_ipsum"
    if rules.c4_curly_brace and "{" in text:
        return "curly_brace"
    if rules.language is not None:
        lang, hits = guess_language(words)
        if lang != rules.language or hits < rules.min_language_stopwords:
            return "language"
    return None


# ---- PII -------------------------------------------------------------------------------------------------------
_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")
_IPV4 = re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b")
_IPV6 = re.compile(r"\b(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}\b")
# A phone number: optional +country code, then 9-15 digits in groups separated by spaces, dots, dashes or
# parentheses (North American 555-123-4567, +44 20 7946 0958, (020) 7946 0958).
_PHONE = re.compile(r"(?<![\w.+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,4}){1,4}(?![\w.])")
PII_PATTERNS = {"email": (_EMAIL, "<EMAIL>"), "ip": (_IPV4, "<IP>"), "ipv6": (_IPV6, "<IP>"),
                "phone": (_PHONE, "<PHONE>")}


def _phone_sub(match: re.Match[str]) -> str:
    digits = sum(c.isdigit() for c in match.group())
    return "<PHONE>" if 9 <= digits <= 15 else match.group()


def scrub_pii(text: str) -> tuple[str, dict[str, int]]:
    """Replace e-mail addresses, IP addresses and phone numbers by placeholders; counts of each kind."""
    counts: dict[str, int] = {}
    for kind, (pattern, placeholder) in PII_PATTERNS.items():
        before = text.count(placeholder)
        text = pattern.sub(_phone_sub if kind == "phone" else placeholder, text)
        if n := text.count(placeholder) - before:
            key = "ip" if kind == "ipv6" else kind
            counts[key] = counts.get(key, 0) + n
    return text, counts
