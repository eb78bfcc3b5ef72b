"""Built-in personas: the speakers of the training corpus ("ROMEO:" on a line of its own starts a speech).

They are found once when the corpus is prepared and saved in the run directory (personas.json), so chat and
serve need nothing but the run directory. A persona conditions generation on its speaker tag."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from gigafactory.errors import UserError
from gigafactory.util import atomic_write_text

FILENAME = "personas.json"
_SPEAKER = re.compile(r"^([A-Z][A-Za-z' ]{1,40}):$", re.MULTILINE)
MIN_SPEECHES = 5
USER_TAG = "Stranger"


def find_speakers(docs: list[str]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for doc in docs:
        counts.update(_SPEAKER.findall(doc))
    return counts


def save_personas(run_dir: Path, docs: list[str]) -> None:
    speakers = {name: n for name, n in find_speakers(docs).most_common() if n >= MIN_SPEECHES}
    atomic_write_text(Path(run_dir) / FILENAME, json.dumps(speakers, indent=1))


def load_personas(run_dir: Path) -> dict[str, int]:
    path = Path(run_dir) / FILENAME
    return json.loads(path.read_text()) if path.is_file() else {}


def resolve(run_dir: Path, name: str) -> str:
    """The speaker tag for a persona name, matched case-insensitively."""
    personas = load_personas(run_dir)
    by_lower = {p.lower(): p for p in personas}
    if name.lower() in by_lower:
        return by_lower[name.lower()]
    if not personas:
        raise UserError(f"{run_dir} has no personas: its corpus has no 'NAME:' speaker lines")
    top = ", ".join(list(personas)[:8])
    raise UserError(f"unknown persona {name!r}; this run knows {len(personas)} speakers, e.g. {top}")


def speech_prompt(persona: str, history: list[tuple[str, str]], user_tag: str = USER_TAG) -> str:
    """The corpus' own dialogue format: alternating speeches, ending with the persona's tag to answer."""
    parts = [f"{user_tag if who == 'user' else persona}:\n{text.strip()}\n\n" for who, text in history]
    return "".join(parts) + f"{persona}:\n"
