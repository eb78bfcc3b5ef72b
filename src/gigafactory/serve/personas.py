"""Personas for the server: the run's built-in speakers plus Character Card V2 files, rendered into a prompt.

The chat template is the training corpus' own dialogue format (`gigafactory.personas.speech_prompt`:
"NAME:\\ntext\\n\\n" per speech, ending with the persona's tag), so a built-in persona with a plain conversation
gets exactly the prompt `gigafactory chat` builds. A card adds paragraphs before the dialogue (system prompt,
matching lore, description, personality, scenario, example messages), its greeting as the persona's first
speech, and its post-history instructions just before the persona's turn.

Lore (`character_book`): an entry is inserted when one of its keys occurs in the last `scan_depth` messages
(or it is `constant`); `selective` entries also need a secondary key. Under a `token_budget`, entries with the
lowest `priority` are dropped first; the rest keep their `insertion_order`. Recursive scanning is not done.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gigafactory.errors import UserError
from gigafactory.personas import USER_TAG, speech_prompt
from gigafactory.personas import load_personas as load_builtin_names

DEFAULT_SCAN_DEPTH = 10


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

    def matches(self, text: str) -> bool:
        if not self.enabled:
            return False
        if self.constant:
            return True
        hay = text if self.case_sensitive else text.lower()

        def found(keys: list[str]) -> bool:
            return any(k and (k if self.case_sensitive else k.lower()) in hay for k in keys)

        if not found(self.keys):
            return False
        return not (self.selective and self.secondary_keys) or found(self.secondary_keys)


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

    def greetings(self) -> list[str]:
        return [g for g in [self.first_mes, *self.alternate_greetings] if g.strip()]

    def render(
        self,
        messages: list[tuple[str, str]],
        greeting: int = 0,
        count_tokens: Callable[[str], int] | None = None,
    ) -> str:
        """The prompt for `messages` [(role, text)], roles system/user/assistant; ends with the persona's tag."""
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
        lore = self._active_lore([text for _, text in history], count_tokens)
        paragraphs = [
            system,
            *[sub(e.content) for e in lore if e.position != "after_char"],
            sub(self.description),
            f"{self.name}'s personality: {sub(self.personality)}" if self.personality.strip() else "",
            f"Scenario: {sub(self.scenario)}" if self.scenario.strip() else "",
            *[sub(e.content) for e in lore if e.position == "after_char"],
            self._examples(),
        ]
        preamble = "".join(p.strip() + "\n\n" for p in paragraphs if p.strip())
        dialogue = speech_prompt(self.name, history)
        post = sub(self.post_history_instructions).strip()
        if post:  # just before the persona's turn, where it weighs most
            tag = f"{self.name}:\n"
            dialogue = dialogue[: -len(tag)] + post + "\n\n" + tag
        return preamble + dialogue

    def _substitute(self, text: str) -> str:
        for key, value in (("{{char}}", self.name), ("<BOT>", self.name), ("{{user}}", USER_TAG), ("<USER>", USER_TAG)):
            text = text.replace(key, value)
        return text

    def _examples(self) -> str:
        # "<START>" separates example dialogues in cards; the model knows only blank-line-separated speeches.
        blocks = [b.strip() for b in self._substitute(self.mes_example).split("<START>")]
        return "\n\n".join(b for b in blocks if b)

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


def parse_card(card: Any, where: str = "card") -> Persona:
    """A `Persona` from a Character Card V2 object ({"spec": "chara_card_v2", "data": {...}})."""
    if not isinstance(card, dict) or card.get("spec") != "chara_card_v2" or not isinstance(card.get("data"), dict):
        raise UserError(f'{where}: not a Character Card V2 (needs "spec": "chara_card_v2" and a "data" object)')
    data = card["data"]
    name = _str(data, "name", where).strip()
    if not name:
        raise UserError(f"{where}: the card has no name")
    persona = Persona(
        name=name,
        builtin=False,
        **{
            k: _str(data, k, where)
            for k in (
                "description",
                "personality",
                "scenario",
                "first_mes",
                "mes_example",
                "system_prompt",
                "post_history_instructions",
            )
        },
        alternate_greetings=_strs(data, "alternate_greetings", where),
    )
    book = data.get("character_book")
    if isinstance(book, dict):
        bwhere = f"{where}: character_book"
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
            persona.lore.append(
                LoreEntry(
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
                )
            )
    elif book is not None:
        raise UserError(f"{where}: 'character_book' must be an object")
    return persona


def _png_card_text(raw: bytes, where: str) -> str:
    """Cards are often shared as PNG images with the JSON, base64-encoded, in a tEXt chunk named "chara"."""
    pos = 8
    while pos + 8 <= len(raw):
        length, kind = struct.unpack(">I4s", raw[pos : pos + 8])
        body = raw[pos + 8 : pos + 8 + length]
        if kind == b"tEXt" and body.startswith(b"chara\x00"):
            return base64.b64decode(body[6:]).decode("utf-8")
        pos += 12 + length
    raise UserError(f"{where}: a PNG without a 'chara' text chunk is not a character card")


def load_card(path: Path) -> Persona:
    try:
        raw = path.read_bytes()
        text = _png_card_text(raw, str(path)) if raw.startswith(b"\x89PNG") else raw.decode("utf-8")
        card = json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UserError(f"cannot read character card {path}: {err}") from None
    return parse_card(card, str(path))


def load_all(run_dir: Path, cards_dir: Path | None = None) -> dict[str, Persona]:
    """Personas by lower-cased name: the run's speakers, then cards (a card overrides a speaker's name)."""
    personas = {name.lower(): Persona(name=name) for name in load_builtin_names(run_dir)}
    if cards_dir is not None:
        if not Path(cards_dir).is_dir():
            raise UserError(f"--personas {cards_dir} is not a directory")
        for path in sorted(Path(cards_dir).iterdir()):
            if path.suffix.lower() in (".json", ".png"):
                persona = load_card(path)
                personas[persona.name.lower()] = persona
    return personas
