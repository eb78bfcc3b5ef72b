"""Tokenizers of a run: a byte-level BPE (the `tokenizers` library) trained on the run's corpus, or the
released Grok-1 SentencePiece model (`--tokenizer grok-1`), shipped in `gigafactory/assets/grok-1/`.

BPE: id 0 is padding (the model never attends to it); id 1 separates documents. Byte-level tokens map one
character of their string to one byte, which gives each token's byte length for bits-per-byte.
Grok-1: as in the release, id 0 is padding ``[PAD]`` and id 2 is end of sequence ``[EOS]``.

A run directory holds exactly one of ``tokenizer.json`` (BPE) or ``tokenizer.model`` (SentencePiece);
`load_tokenizer` picks by which is present, so chat and the server need no option. Both kinds answer the same
calls (``encode(text).ids``, ``encode_batch``, ``decode``, ``get_vocab_size``): `SentencePieceTokenizer` wraps
the `sentencepiece` processor in the subset of the `tokenizers.Tokenizer` interface this project uses.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from gigafactory.errors import UserError
from gigafactory.specs.model_spec import ModelSpec

PAD, EOS = "<pad>", "<eos>"
SPECIALS = [PAD, EOS]
FILENAME = "tokenizer.json"
SP_FILENAME = "tokenizer.model"
GROK1 = "grok-1"
CHOICES = ("auto", "bpe", GROK1)
GROK1_PAD_ID, GROK1_EOS_ID = 0, 2  # xai-org/grok-1 run.py: pad_token=0, eos_token=2
GROK1_VOCAB = 128 * 1024


def grok1_model_path() -> Path:
    """The packaged Grok-1 SentencePiece model (Apache-2.0, see assets/grok-1/README.md)."""
    return Path(str(resources.files("gigafactory") / "assets" / "grok-1" / SP_FILENAME))


def resolve_choice(choice: str, model: str) -> str:
    """``auto`` means the release's own tokenizer for the grok-1 preset, a corpus-trained BPE otherwise."""
    if choice not in CHOICES:
        raise UserError(f"unknown tokenizer {choice!r}; choose one of {', '.join(CHOICES)}")
    if choice == "auto":
        return GROK1 if model == GROK1 else "bpe"
    return choice


def spec_for(spec: ModelSpec, choice: str, quiet: bool = False) -> ModelSpec:
    """The spec a run with tokenizer `choice` trains: the Grok-1 tokenizer fixes the vocabulary at 131,072."""
    if choice != GROK1 or spec.vocab_size == GROK1_VOCAB:
        return spec
    if not quiet:
        print(f"note: the grok-1 tokenizer has {GROK1_VOCAB:,} ids; vocab_size {spec.vocab_size} -> {GROK1_VOCAB}")
    return spec.model_copy(update={"vocab_size": GROK1_VOCAB})


@dataclass
class _Encoding:
    ids: list[int]


class SentencePieceTokenizer:
    """A SentencePiece model behind the calls the trainer, chat and server make on a `tokenizers.Tokenizer`."""

    def __init__(self, path: Path) -> None:
        import sentencepiece as spm

        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as err:
            raise UserError(f"cannot read SentencePiece model {path}: {err}") from None
        self.path = Path(path)
        self.pad_id, self.eos_id = self.sp.pad_id(), self.sp.eos_id()

    def encode(self, text: str) -> _Encoding:
        return _Encoding(self.sp.encode(text))

    def encode_batch(self, texts: list[str]) -> list[_Encoding]:
        return [_Encoding(ids) for ids in self.sp.encode(list(texts))]

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(list(ids))

    def get_vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def id_to_token(self, i: int) -> str | None:
        """The piece (``▁`` marks a space); None for byte pieces such as ``<0x0A>``, whose text is the byte."""
        return None if self.sp.is_byte(i) else self.sp.id_to_piece(i)

    def token_to_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        return None if i == self.sp.unk_id() and piece != self.sp.id_to_piece(i) else i

    def byte_lengths(self) -> list[int]:
        """UTF-8 bytes each id stands for: control and unknown pieces 0, byte pieces 1, '▁' is a space."""
        out = []
        for i in range(self.get_vocab_size()):
            if self.sp.is_control(i) or self.sp.is_unknown(i):
                out.append(0)
            elif self.sp.is_byte(i):
                out.append(1)
            else:
                out.append(len(self.sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8")))
        return out


def grok1_tokenizer() -> SentencePieceTokenizer:
    return SentencePieceTokenizer(grok1_model_path())


def install_grok1(run_dir: Path) -> SentencePieceTokenizer:
    """Copy the packaged Grok-1 model into a run directory (atomically) and return it loaded from there."""
    from gigafactory.util import atomic_write_bytes

    dest = Path(run_dir) / SP_FILENAME
    atomic_write_bytes(dest, grok1_model_path().read_bytes())
    return SentencePieceTokenizer(dest)


def copy_tokenizer(src_run: Path, dest_dir: Path) -> list[str]:
    """Copy a run's tokenizer file(s) into another folder; returns the file names copied."""
    names = [n for n in (FILENAME, SP_FILENAME) if (Path(src_run) / n).is_file()]
    for n in names:
        shutil.copyfile(Path(src_run) / n, Path(dest_dir) / n)
    return names


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


def load_tokenizer(run_dir: Path) -> Tokenizer | SentencePieceTokenizer:
    sp_path = Path(run_dir) / SP_FILENAME
    if sp_path.is_file():
        return SentencePieceTokenizer(sp_path)
    path = Path(run_dir) / FILENAME
    if not path.is_file():
        raise UserError(f"no tokenizer at {path}; is {run_dir} a gigafactory run directory?")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # the library raises a bare Exception on malformed JSON
        raise UserError(f"cannot read tokenizer {path}: {err}") from None


def eos_id(tok: Tokenizer | SentencePieceTokenizer) -> int:
    """The id that ends a document: ``<eos>`` of a BPE, ``[EOS]`` (2) of the Grok-1 model."""
    if isinstance(tok, SentencePieceTokenizer):
        return tok.eos_id
    found = tok.token_to_id(EOS)
    if found is None:
        raise UserError(f"the tokenizer has no {EOS} token; retrain it with `gigafactory train` in a new run")
    return found


def token_byte_lengths(tok: Tokenizer | SentencePieceTokenizer) -> list[int]:
    """UTF-8 bytes each token id stands for (special tokens: 0)."""
    if isinstance(tok, SentencePieceTokenizer):
        return tok.byte_lengths()
    lengths = [0] * tok.get_vocab_size()
    for token, idx in tok.get_vocab().items():
        lengths[idx] = 0 if token in SPECIALS else len(token)
    return lengths
