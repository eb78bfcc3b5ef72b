"""Personas for the server: the run's built-in speakers plus character cards, rendered into a prompt.

The chat template is the training corpus' own dialogue format (`gigafactory.personas.speech_prompt`:
"NAME:\\ntext\\n\\n" per speech, ending with the persona's tag), so a built-in persona with a plain conversation
gets exactly the prompt `gigafactory chat` builds. A card adds paragraphs before the dialogue (system prompt,
matching lore, description, personality, scenario, example messages), its greeting as the persona's first
speech, and its post-history instructions just before the persona's turn.

Cards: Character Card V1 (a flat object), V2 (`"spec": "chara_card_v2"`) and V3 (`"spec": "chara_card_v3"`),
as JSON files or PNG images carrying the card base64-encoded in a tEXt chunk (`ccv3` preferred, else `chara`).
A card that cannot be read is skipped with a warning naming the file and the reason. Names must be 1-64
printable characters without `:`, `/`, `\\` or line breaks (the name is the speaker tag of the dialogue).

Example messages (`mes_example`): dialogues separated by `<START>`, lines "{{user}}: ..." / "{{char}}: ..."
become speeches in the corpus format ("Stranger:\\n...\\n\\n", "NAME:\\n...\\n\\n").

Lore (`character_book`): an entry is inserted when one of its keys occurs in the last `scan_depth` messages
(or it is `constant`); `selective` entries also need a secondary key. Keys match whole words (so "gold" does not
fire on "marigold"), case-insensitively unless `case_sensitive`; with `use_regex` (V3) a key is a regular
expression, written plain or as `/pattern/flags` (flags i, m, s). Under a `token_budget`, entries with the
lowest `priority` are dropped first; the rest keep their `insertion_order`. Recursive scanning is not done.

Truncation, when persona + history exceed the context (less the room kept for the reply): first the oldest
speeches of the history go (the greeting is the oldest), never the newest message; then the example
messages, then lore entries (lowest priority first), then the scenario, the personality and the description.
The system prompt, the post-history instructions and the newest message are never cut: if they alone do not
fit, the request is refused (`context_length_exceeded`).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from gigafactory.errors import UserError
from gigafactory.personas import USER_TAG, speech_prompt
from gigafactory.personas import load_personas as load_builtin_names

log = logging.getLogger(__name__)
DEFAULT_SCAN_DEPTH = 10
MAX_NAME = 64
MAX_CARD_BYTES = 20 * 2**20
MAX_AVATAR_BYTES = 2 * 2**20
MAX_REGEX = 500
_BAD_NAME_CHARS = set(":/\\")


class PromptTooLong(Exception):
    """The parts of a prompt that are never cut do not fit the budget."""


def _word_pattern(key: str, case_sensitive: bool) -> re.Pattern[str]:
    flags = 0 if case_sensitive else re.IGNORECASE
    return re.compile(r"(?<!\w)" + re.escape(key) + r"(?!\w)", flags)


def _regex_pattern(key: str, case_sensitive: bool) -> re.Pattern[str]:
    """A V3 regex key: `/pattern/flags` or a bare pattern."""
    if len(key) > MAX_REGEX:
        raise ValueError(f"a regex key is longer than {MAX_REGEX} characters")
    flags = 0 if case_sensitive else re.IGNORECASE
    m = re.fullmatch(r"/(.*)/([imsgu]*)", key, re.DOTALL)
    if m:
        key = m.group(1)
        table = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL}
        flags |= sum(table.get(f, 0) for f in set(m.group(2)))
    return re.compile(key, flags)


@dataclass
class LoreEntry:
    keys: list[str]
    content: str
    secondary_keys: list[str] = field(default_factory=list)
    selective: bool = False
    constant: bool = False
    enabled: bool = True
    case_sensitive: bool = False
    insertion_order: int = 0
    priority: int = 0
    position: str = "before_char"  # or "after_char": before or after the character's description
    use_regex: bool = False
    _patterns: tuple[list[re.Pattern[str]], list[re.Pattern[str]]] | None = field(default=None, repr=False)

    def patterns(self) -> tuple[list[re.Pattern[str]], list[re.Pattern[str]]]:
        if self._patterns is None:
            make = _regex_pattern if self.use_regex else _word_pattern
            self._patterns = (
                [make(k, self.case_sensitive) for k in self.keys if k.strip()],
                [make(k, self.case_sensitive) for k in self.secondary_keys if k.strip()],
            )
        return self._patterns

    def matches(self, text: str) -> bool:
        if not self.enabled:
            return False
        if self.constant:
            return True
        keys, secondary = self.patterns()
        if not any(p.search(text) for p in keys):
            return False
        return not (self.selective and secondary) or any(p.search(text) for p in secondary)


@dataclass
class Persona:
    name: str  # the model id, and the speaker tag in the dialogue
    builtin: bool = True
    description: str = ""
    personality: str = ""
    scenario: str = ""
    first_mes: str = ""
    mes_example: str = ""
    system_prompt: str = ""
    post_history_instructions: str = ""
    alternate_greetings: list[str] = field(default_factory=list)
    lore: list[LoreEntry] = field(default_factory=list)
    scan_depth: int = DEFAULT_SCAN_DEPTH
    token_budget: int | None = None
    avatar: bytes | None = None  # the card's picture (PNG), shown by the chat page
    source: str = ""  # the file it came from

    def greetings(self) -> list[str]:
        return [g for g in [self.first_mes, *self.alternate_greetings] if g.strip()]

    def render(
        self,
        messages: list[tuple[str, str]],
        greeting: int = 0,
        count_tokens: Callable[[str], int] | None = None,
        budget: int | None = None,
    ) -> str:
        """The prompt for `messages` [(role, text)], roles system/user/assistant; ends with the persona's tag.
        With `count_tokens` and `budget`, parts are cut by the module's truncation policy to fit."""
        sub = self._substitute
        system = "\n\n".join(text.strip() for role, text in messages if role == "system" and text.strip())
        history = [("user" if role == "user" else "persona", sub(text)) for role, text in messages if role != "system"]
        greets = self.greetings()
        if greets and not (history and history[0][0] == "persona"):
            history.insert(0, ("persona", sub(greets[min(greeting, len(greets) - 1)])))
        card_system = sub(self.system_prompt)
        if "{{original}}" in card_system:
            system = card_system.replace("{{original}}", system)
        else:
            system = "\n\n".join(p for p in (card_system, system) if p.strip())
        if count_tokens is None or budget is None:
            return self._compose(self, system, history, count_tokens)
        return self._fit(system, history, count_tokens, budget)

    def _fit(self, system: str, history: list[tuple[str, str]], count: Callable[[str], int], budget: int) -> str:
        # Oldest speeches first: estimated speech by speech (cheap), then checked on the whole prompt.
        base = count(self._compose(self, system, history[-1:], count))
        costs = [count(speech_prompt(self.name, [h])) for h in history]
        total = base + sum(costs[:-1])
        start = 0
        while total > budget and start < len(history) - 1:
            total -= costs[start]
            start += 1
        history = history[start:]
        persona = self
        cuts = iter(self._cuts())
        while True:
            prompt = self._compose(persona, system, history, count)
            if count(prompt) <= budget:
                return prompt
            if len(history) > 1:
                history = history[1:]
                continue
            cut = next(cuts, None)
            if cut is None:
                raise PromptTooLong(
                    "the system prompt, post-history instructions and newest message alone do not fit; shorten them"
                )
            persona = cut(persona)

    def _cuts(self) -> list[Callable[[Persona], Persona]]:
        """What goes, in order, once the history is down to the newest message."""

        def drop_lore(p: Persona) -> Persona:
            lowest = min(p.lore, key=lambda e: e.priority)
            return replace(p, lore=[e for e in p.lore if e is not lowest])

        steps: list[Callable[[Persona], Persona]] = [lambda p: replace(p, mes_example="")]
        steps += [drop_lore] * len(self.lore)
        steps += [lambda p: replace(p, scenario=""), lambda p: replace(p, personality=""),
                  lambda p: replace(p, description="")]  # fmt: skip
        return steps

    @staticmethod
    def _compose(
        p: Persona, system: str, history: list[tuple[str, str]], count_tokens: Callable[[str], int] | None
    ) -> str:
        sub = p._substitute
        lore = p._active_lore([text for _, text in history], count_tokens)
        paragraphs = [
            system,
            *[sub(e.content) for e in lore if e.position != "after_char"],
            sub(p.description),
            f"{p.name}'s personality: {sub(p.personality)}" if p.personality.strip() else "",
            f"Scenario: {sub(p.scenario)}" if p.scenario.strip() else "",
            *[sub(e.content) for e in lore if e.position == "after_char"],
            p._examples(),
        ]
        preamble = "".join(x.strip() + "\n\n" for x in paragraphs if x.strip())
        dialogue = speech_prompt(p.name, history)
        post = sub(p.post_history_instructions).strip()
        if post:  # just before the persona's turn, where it weighs most
            tag = f"{p.name}:\n"
            dialogue = dialogue[: -len(tag)] + post + "\n\n" + tag
        return preamble + dialogue

    def _substitute(self, text: str) -> str:
        for key, value in (("{{char}}", self.name), ("<BOT>", self.name), ("{{user}}", USER_TAG), ("<USER>", USER_TAG)):
            text = text.replace(key, value)
        return text

    def _examples(self) -> str:
        """Example dialogues in the corpus format: "{{user}}: hi" becomes "Stranger:\\nhi\\n\\n"."""
        speeches: list[tuple[str, str]] = []
        tags = {"{{user}}": "user", "<user>": "user", "{{char}}": "persona", "<bot>": "persona",
                USER_TAG.lower(): "user", self.name.lower(): "persona"}  # fmt: skip
        for block in self.mes_example.split("<START>"):
            for line in block.splitlines():
                head, sep, rest = line.partition(":")
                who = tags.get(head.strip().lower()) if sep else None
                if who is not None:
                    speeches.append((who, rest.strip()))
                elif line.strip() and speeches:  # a speech continues over several lines
                    who, text = speeches[-1]
                    speeches[-1] = (who, f"{text}\n{line.strip()}")
                elif line.strip():
                    speeches.append(("persona", line.strip()))
        speeches = [(who, self._substitute(text)) for who, text in speeches if text]
        return speech_prompt(self.name, speeches)[: -len(f"{self.name}:\n")].strip() if speeches else ""

    def _active_lore(self, texts: list[str], count_tokens: Callable[[str], int] | None) -> list[LoreEntry]:
        window = "\n".join(texts[-self.scan_depth :]) if self.scan_depth > 0 else ""
        active = [e for e in self.lore if e.matches(window)]
        if self.token_budget and count_tokens is not None:
            kept, used = [], 0
            for e in sorted(active, key=lambda e: -e.priority):
                cost = count_tokens(e.content)
                if used + cost <= self.token_budget:
                    kept.append(e)
                    used += cost
            active = kept
        return sorted(active, key=lambda e: e.insertion_order)


# -- Character Card V2 ------------------------------------------------------------------------------------------


def _str(data: dict[str, Any], key: str, where: str) -> str:
    value = data.get(key, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise UserError(f"{where}: {key!r} must be a string, not {type(value).__name__}")
    return value


def _strs(data: dict[str, Any], key: str, where: str) -> list[str]:
    value = data.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UserError(f"{where}: {key!r} must be a list of strings")
    return value


def _int(data: dict[str, Any], key: str, default: int, where: str) -> int:
    value = data.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UserError(f"{where}: {key!r} must be a number")
    return int(value)


def check_name(name: str, where: str) -> str:
    name = name.strip()
    if not name:
        raise UserError(f"{where}: the card has no name")
    if len(name) > MAX_NAME:
        raise UserError(f"{where}: the name is longer than {MAX_NAME} characters")
    if not name.isprintable() or _BAD_NAME_CHARS & set(name):
        raise UserError(f"{where}: the name {name[:40]!r} has a line break, control character, ':', '/' or '\\'")
    if name.lower() == USER_TAG.lower():
        raise UserError(f"{where}: the name {name!r} is the user's speaker tag")
    return name


_TEXT_FIELDS = ("description", "personality", "scenario", "first_mes", "mes_example")
_V2_TEXT_FIELDS = ("system_prompt", "post_history_instructions")


def _card_data(card: Any, where: str) -> tuple[dict[str, Any], int]:
    """The card's fields and its version (1, 2 or 3)."""
    if not isinstance(card, dict):
        raise UserError(f"{where}: a character card is a JSON object")
    spec = card.get("spec")
    if spec in ("chara_card_v2", "chara_card_v3"):
        if not isinstance(card.get("data"), dict):
            raise UserError(f'{where}: a {spec} card needs a "data" object')
        return card["data"], 2 if spec == "chara_card_v2" else 3
    if spec is not None:
        raise UserError(f"{where}: unknown card spec {str(spec)[:40]!r} (chara_card_v2, chara_card_v3 or V1)")
    if "name" in card and any(k in card for k in _TEXT_FIELDS):
        return card, 1
    raise UserError(f"{where}: not a character card (V1 fields, or a chara_card_v2/v3 spec)")


def parse_card(card: Any, where: str = "card") -> Persona:
    """A `Persona` from a Character Card V1, V2 or V3 object."""
    data, version = _card_data(card, where)
    name = check_name(_str(data, "name", where), where)
    fields = _TEXT_FIELDS + (_V2_TEXT_FIELDS if version >= 2 else ())
    persona = Persona(
        name=name,
        builtin=False,
        **{k: _str(data, k, where) for k in fields},
        alternate_greetings=_strs(data, "alternate_greetings", where) if version >= 2 else [],
        source=where,
    )
    if version == 3:
        persona.avatar = _embedded_icon(data.get("assets"))
    book = data.get("character_book") if version >= 2 else None
    if isinstance(book, dict):
        _parse_book(persona, book, f"{where}: character_book")
    elif book is not None:
        raise UserError(f"{where}: 'character_book' must be an object")
    return persona


def _parse_book(persona: Persona, book: dict[str, Any], bwhere: str) -> None:
    persona.scan_depth = _int(book, "scan_depth", DEFAULT_SCAN_DEPTH, bwhere)
    budget = _int(book, "token_budget", 0, bwhere)
    persona.token_budget = budget or None
    entries = book.get("entries") or []
    if not isinstance(entries, list):
        raise UserError(f"{bwhere}: 'entries' must be a list")
    for i, entry in enumerate(entries):
        ewhere = f"{bwhere} entry {i}"
        if not isinstance(entry, dict):
            raise UserError(f"{ewhere}: must be an object")
        lore = LoreEntry(
            keys=_strs(entry, "keys", ewhere),
            content=_str(entry, "content", ewhere),
            secondary_keys=_strs(entry, "secondary_keys", ewhere),
            selective=bool(entry.get("selective", False)),
            constant=bool(entry.get("constant", False)),
            enabled=bool(entry.get("enabled", True)),
            case_sensitive=bool(entry.get("case_sensitive", False)),
            insertion_order=_int(entry, "insertion_order", i, ewhere),
            priority=_int(entry, "priority", 0, ewhere),
            position=entry.get("position") if entry.get("position") == "after_char" else "before_char",
            use_regex=bool(entry.get("use_regex", False)),
        )
        try:
            lore.patterns()
        except (re.error, ValueError) as err:
            raise UserError(f"{ewhere}: bad regex key: {err}") from None
        persona.lore.append(lore)


def _embedded_icon(assets: Any) -> bytes | None:
    """A V3 card's main icon when it is embedded as a data: URI (other URIs are not fetched)."""
    for asset in assets if isinstance(assets, list) else []:
        if isinstance(asset, dict) and asset.get("type") == "icon":
            uri = asset.get("uri")
            if isinstance(uri, str) and uri.startswith("data:image/png;base64,"):
                try:
                    raw = base64.b64decode(uri.split(",", 1)[1], validate=True)
                except (binascii.Error, ValueError):
                    return None
                return raw if raw.startswith(b"\x89PNG") and len(raw) <= MAX_AVATAR_BYTES else None
    return None


def _png_card_text(raw: bytes, where: str) -> str:
    """Cards are often shared as PNG images with the JSON, base64-encoded, in a tEXt chunk named "ccv3" (V3)
    or "chara" (V1/V2)."""
    found: dict[bytes, bytes] = {}
    pos = 8
    while pos + 8 <= len(raw):
        length, kind = struct.unpack(">I4s", raw[pos : pos + 8])
        body = raw[pos + 8 : pos + 8 + length]
        if kind == b"tEXt":
            keyword, _, text = body.partition(b"\x00")
            if keyword in (b"ccv3", b"chara"):
                found.setdefault(keyword, text)
        if kind == b"IEND":
            break
        pos += 12 + length
    text = found.get(b"ccv3") or found.get(b"chara")
    if text is None:
        raise UserError(f"{where}: a PNG without a 'chara' or 'ccv3' text chunk is not a character card")
    return base64.b64decode(text, validate=False).decode("utf-8")


def load_card(path: Path) -> Persona:
    try:
        if path.stat().st_size > MAX_CARD_BYTES:
            raise UserError(f"cannot read character card {path}: larger than {MAX_CARD_BYTES // 2**20} MB")
        raw = path.read_bytes()
        png = raw.startswith(b"\x89PNG")
        text = _png_card_text(raw, str(path)) if png else raw.decode("utf-8")
        card = json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError, binascii.Error, struct.error) as err:
        raise UserError(f"cannot read character card {path}: {err}") from None
    persona = parse_card(card, str(path))
    if png and len(raw) <= MAX_AVATAR_BYTES:
        persona.avatar = raw
    return persona


def load_all(run_dir: Path, cards_dir: Path | None = None) -> dict[str, Persona]:
    """Personas by lower-cased name: the run's speakers, then cards (a card overrides a speaker's name).
    A card that cannot be used is skipped with a warning naming the file and the reason."""
    personas = {name.lower(): Persona(name=name) for name in load_builtin_names(run_dir)}
    if cards_dir is not None:
        if not Path(cards_dir).is_dir():
            raise UserError(f"--personas {cards_dir} is not a directory")
        for path in sorted(Path(cards_dir).iterdir()):
            if path.suffix.lower() not in (".json", ".png"):
                continue
            try:
                persona = load_card(path)
            except UserError as err:
                log.warning("skipping character card: %s", err)
                continue
            if persona.name.lower() in personas and not personas[persona.name.lower()].builtin:
                log.warning("skipping character card %s: a card named %r was loaded already", path, persona.name)
                continue
            personas[persona.name.lower()] = persona
    return personas
