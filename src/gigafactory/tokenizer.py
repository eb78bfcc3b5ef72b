"""Byte-level BPE (the `tokenizers` library), trained on the run's corpus and saved in the run directory.

Id 0 is padding (the model never attends to it); id 1 separates documents. Byte-level tokens map one
character of their string to one byte, which gives each token's byte length for bits-per-byte."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from gigafactory.errors import UserError

PAD, EOS = "<pad>", "<eos>"
SPECIALS = [PAD, EOS]
FILENAME = "tokenizer.json"


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(run_dir: Path) -> Tokenizer:
    path = Path(run_dir) / FILENAME
    if not path.is_file():
        raise UserError(f"no tokenizer at {path}; is {run_dir} a gigafactory run directory?")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # the library raises a bare Exception on malformed JSON
        raise UserError(f"cannot read tokenizer {path}: {err}") from None


def token_byte_lengths(tok: Tokenizer) -> list[int]:
    """UTF-8 bytes each token id stands for (special tokens: 0)."""
    lengths = [0] * tok.get_vocab_size()
    for token, idx in tok.get_vocab().items():
        lengths[idx] = 0 if token in SPECIALS else len(token)
    return lengths
