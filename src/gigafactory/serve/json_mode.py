"""Constrained decoding for `response_format: {"type": "json_object"}`: the output always parses as a JSON object.

A small pushdown automaton reads JSON one character at a time (`advance`). Each step, every token whose text
would take the current state to a valid prefix is allowed and the rest are masked out before sampling. When
the remaining token budget is no longer than the shortest completion of the current prefix (`closing`), the
decoder spells that completion one character per token, so the object always closes within `max_tokens`.
Generation stops as soon as the top-level object is complete.

Whitespace outside strings is limited to single spaces and strings may not hold raw control characters (as
JSON requires), so the chat template's end of speech (a blank line) never occurs inside the object. Tokens
whose text is not complete UTF-8 on its own (a byte-level piece of a character) are not used in JSON mode.
Cost: one Python pass over the vocabulary per step (a few ms for the small models here; a 131k vocabulary
would want a token trie).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tokenizers import Tokenizer
from torch import Tensor

# Modes of the automaton. A state is (mode, stack, aux): stack is a string of open containers ("{" or "["),
# aux holds the mode's detail (the rest of a literal, hex digits still due in \\u, whether a string is a key).
START, VALUE, KEY_OR_END, KEY, COLON, AFTER_VALUE, VALUE_OR_END = range(7)
STRING, ESCAPE, UNICODE, LITERAL, DONE = range(7, 12)
NUM_MINUS, NUM_ZERO, NUM_INT, NUM_DOT, NUM_FRAC, NUM_E, NUM_E_SIGN, NUM_EXP = range(12, 20)
_NUMBER_END_OK = (NUM_ZERO, NUM_INT, NUM_FRAC, NUM_EXP)

State = tuple[int, str, object, bool]  # mode, stack, aux, previous char was a space


def initial() -> State:
    return (START, "", None, False)


def _after_value(stack: str) -> State:
    return (DONE, "", None, False) if not stack else (AFTER_VALUE, stack, None, False)


def _start_value(stack: str, ch: str) -> State | None:
    if ch == '"':
        return (STRING, stack, False, False)
    if ch == "{":
        return (KEY_OR_END, stack + "{", None, False)
    if ch == "[":
        return (VALUE_OR_END, stack + "[", None, False)
    if ch == "-":
        return (NUM_MINUS, stack, None, False)
    if ch == "0":
        return (NUM_ZERO, stack, None, False)
    if ch in "123456789":
        return (NUM_INT, stack, None, False)
    for word in ("true", "false", "null"):
        if ch == word[0]:
            return (LITERAL, stack, word[1:], False)
    return None


def _number(mode: int, ch: str) -> int | None:
    digit = ch in "0123456789"
    if mode == NUM_MINUS:
        return NUM_ZERO if ch == "0" else NUM_INT if digit else None
    if mode in (NUM_ZERO, NUM_INT):
        if ch == ".":
            return NUM_DOT
        if ch in "eE":
            return NUM_E
        return NUM_INT if digit and mode == NUM_INT else None
    if mode in (NUM_DOT, NUM_FRAC):
        if digit:
            return NUM_FRAC
        return NUM_E if ch in "eE" and mode == NUM_FRAC else None
    if mode == NUM_E:
        return NUM_E_SIGN if ch in "+-" else NUM_EXP if digit else None
    if mode in (NUM_E_SIGN, NUM_EXP):
        return NUM_EXP if digit else None
    return None


def advance(state: State, ch: str) -> State | None:
    """The state after reading `ch`, or None if `ch` cannot continue a JSON object here."""
    mode, stack, aux, spaced = state
    if mode == STRING:
        if ch == '"':
            return (COLON, stack, None, False) if aux else _after_value(stack)
        if ch == "\\":
            return (ESCAPE, stack, aux, False)
        return None if ord(ch) < 0x20 else state
    if mode == ESCAPE:
        if ch == "u":
            return (UNICODE, stack, (aux, 4), False)
        return (STRING, stack, aux, False) if ch in '"\\/bfnrt' else None
    if mode == UNICODE:
        is_key, due = aux  # type: ignore[misc]
        if ch not in "0123456789abcdefABCDEF":
            return None
        return (STRING, stack, is_key, False) if due == 1 else (UNICODE, stack, (is_key, due - 1), False)
    if mode == LITERAL:
        rest = str(aux)
        if ch != rest[0]:
            return None
        return _after_value(stack) if len(rest) == 1 else (LITERAL, stack, rest[1:], False)
    if mode >= NUM_MINUS:
        nxt = _number(mode, ch)
        if nxt is not None:
            return (nxt, stack, None, False)
        if mode not in _NUMBER_END_OK:
            return None
        return advance(_after_value(stack), ch)  # the number ended; `ch` belongs to what follows
    if mode == DONE:
        return None
    if ch == " ":  # single spaces between tokens
        return None if spaced else (mode, stack, aux, True)
    if mode == START:
        return (KEY_OR_END, "{", None, False) if ch == "{" else None
    if mode in (KEY_OR_END, KEY):
        if ch == '"':
            return (STRING, stack, True, False)
        return _after_value(stack[:-1]) if ch == "}" and mode == KEY_OR_END else None
    if mode == COLON:
        return (VALUE, stack, None, False) if ch == ":" else None
    if mode == VALUE_OR_END and ch == "]":
        return _after_value(stack[:-1])
    if mode in (VALUE, VALUE_OR_END):
        return _start_value(stack, ch)
    if mode == AFTER_VALUE:
        top = stack[-1]
        if ch == ",":
            return (KEY, stack, None, False) if top == "{" else (VALUE, stack, None, False)
        if ch == ("}" if top == "{" else "]"):
            return _after_value(stack[:-1])
    return None


def closing(state: State) -> str:
    """The shortest text that completes the object from `state`."""
    mode, stack, aux, _ = state
    head = {START: "{}", VALUE: "0", KEY: '"":0', COLON: ":0", NUM_MINUS: "0", NUM_DOT: "0", NUM_E: "0"}.get(mode, "")
    if mode == NUM_E_SIGN:
        head = "0"
    elif mode == STRING:
        head = '":0' if aux else '"'
    elif mode == ESCAPE:
        head = 'n":0' if aux else 'n"'
    elif mode == UNICODE:
        is_key, due = aux  # type: ignore[misc]
        head = "0" * due + ('":0' if is_key else '"')
    elif mode == LITERAL:
        head = str(aux)
    return head + "".join("}" if c == "{" else "]" for c in reversed(stack))


def feed(state: State, text: str) -> State | None:
    for ch in text:
        next_state = advance(state, ch)
        if next_state is None:
            return None
        state = next_state
    return state


@dataclass
class TokenTexts:
    """Each token's text, for the tokens usable in JSON mode (complete UTF-8, not special)."""

    texts: dict[int, str]
    single_char: dict[str, int]  # a token for each one-character text, to spell the closing

    @classmethod
    def of(cls, tok: Tokenizer) -> TokenTexts:
        texts: dict[int, str] = {}
        for tid in range(tok.get_vocab_size()):  # special tokens decode to ""
            text = tok.decode([tid])
            if text and "\ufffd" not in text:
                texts[tid] = text
        single = {}
        for tid, text in sorted(texts.items()):
            if len(text) == 1:
                single.setdefault(text, tid)
        return cls(texts, single)


class JsonConstraint:
    """One sequence's JSON state; `mask` says which tokens may come next, `accept` moves on."""

    def __init__(self, vocab: TokenTexts) -> None:
        self.vocab = vocab
        self.state = initial()

    @property
    def done(self) -> bool:
        return self.state[0] == DONE

    def mask(self, vocab_size: int, remaining: int) -> Tensor:
        """Allowed next tokens [V] (bool), given how many tokens may still be generated."""
        allowed = torch.zeros(vocab_size, dtype=torch.bool)
        finish = closing(self.state)
        if len(finish) >= remaining:  # no room left to wander: spell the shortest completion
            tid = self.vocab.single_char.get(finish[0])
            if tid is not None:
                allowed[tid] = True
                return allowed
        ids = [tid for tid, text in self.vocab.texts.items() if feed(self.state, text) is not None]
        allowed[ids] = True
        return allowed

    def accept(self, token: int) -> None:
        text = self.vocab.texts.get(token)
        state = feed(self.state, text) if text is not None else None
        if state is None:  # cannot happen when tokens come from `mask`
            raise ValueError(f"token {token} breaks the JSON prefix")
        self.state = state
