"""Tokenizers behind one small interface, loaded from local files only (never the network).

Backends:
  * `SentencePieceTokenizer`: a sentencepiece `.model` file. `encode` adds no BOS/EOS.
  * `PretrainedFromHF` with a directory holding `tokenizer.model` (how LLaMA-2 ships):
    sentencepiece, with BOS/EOS tokens and `add_bos_token` / `add_eos_token` read from
    `tokenizer_config.json` and `special_tokens_map.json` (HF's LLaMA default: add BOS).
  * `PretrainedFromHF` with a directory holding only `tokenizer.json`: the `tokenizers`
    package; special tokens are added by the file's own post-processor, as HF does.

    tok = load_tokenizer("SentencePieceTokenizer", "demo/tokenizer.model")
    ids = tok.encode("hello")          # list[int]
    tok.decode(ids) == "hello"
"""

from __future__ import annotations

import json
import os
from typing import Protocol, Sequence

from fnllama.errors import DataError

TOKENIZER_TYPES = ("SentencePieceTokenizer", "PretrainedFromHF")
# Other names Megatron-family tools use for the same two backends.
_ALIASES = {"Llama2Tokenizer": "SentencePieceTokenizer", "HuggingFaceTokenizer": "PretrainedFromHF"}


class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer. Ids are plain Python ints."""

    vocab_size: int
    bos_id: int | None
    eos_id: int | None  # also the end-of-document (EOD) token of the packed dataset
    pad_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class SentencePieceTokenizer:
    """A sentencepiece model; optionally adds BOS/EOS around every encoded text."""

    def __init__(self, model_path: str, *, add_bos: bool = False, add_eos: bool = False,
                 special_tokens: dict[str, str | None] | None = None):
        import sentencepiece as spm

        if not os.path.isfile(model_path):
            raise DataError(f"{model_path}: sentencepiece model file not found")
        self.model_path = model_path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(model_path)
        except (OSError, RuntimeError) as e:
            raise DataError(f"{model_path}: not a sentencepiece model ({e})") from e
        self.add_bos, self.add_eos = add_bos, add_eos
        self.vocab_size = self.sp.GetPieceSize()
        special = special_tokens or {}
        self.bos_id = self._special_id(special.get("bos"), self.sp.bos_id())
        self.eos_id = self._special_id(special.get("eos"), self.sp.eos_id())
        self.pad_id = self._special_id(special.get("pad"), self.sp.pad_id())

    def _special_id(self, piece: str | None, default: int) -> int | None:
        if piece is not None:
            pid = self.sp.PieceToId(piece)
            if pid != self.sp.unk_id() or piece == self.sp.IdToPiece(pid):
                return pid
        return default if default >= 0 else None

    def _wrap(self, ids: list[int]) -> list[int]:
        if self.add_bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if self.add_eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def encode(self, text: str) -> list[int]:
        return self._wrap(self.sp.Encode(text))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # One C++ call for the whole batch, on this process's thread only: parallelism comes
        # from worker processes, so each must not spawn its own thread pool.
        return [self._wrap(ids) for ids in self.sp.Encode(list(texts), num_threads=1)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.Decode([int(i) for i in ids])


class HFTokenizersTokenizer:
    """An HF `tokenizer.json` (the `tokenizers` package), special tokens per its post-processor."""

    def __init__(self, directory: str):
        from tokenizers import Tokenizer as _HFTok

        path = os.path.join(directory, "tokenizer.json")
        try:
            self.tok = _HFTok.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception on parse errors
            raise DataError(f"{path}: cannot parse tokenizer.json ({e})") from e
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        special = _hf_special_tokens(directory)
        self.bos_id = self._id_of(special.get("bos"), ("<s>", "<|begin_of_text|>", "<bos>"))
        self.eos_id = self._id_of(special.get("eos"),
                                  ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>"))
        self.pad_id = self._id_of(special.get("pad"), ("<pad>",))

    def _id_of(self, piece: str | None, fallbacks: tuple[str, ...]) -> int | None:
        for name in ((piece,) if piece else ()) + fallbacks:
            tid = self.tok.token_to_id(name)
            if tid is not None:
                return tid
        return None

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts))]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable JSON ({e})") from e
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _token_content(value) -> str | None:
    """HF writes special tokens either as a string or as {"content": ..., ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _hf_special_tokens(directory: str) -> dict[str, str | None]:
    config = _read_json(os.path.join(directory, "tokenizer_config.json"))
    tokens_map = _read_json(os.path.join(directory, "special_tokens_map.json"))
    out = {}
    for name in ("bos", "eos", "pad"):
        key = f"{name}_token"
        out[name] = _token_content(config.get(key)) or _token_content(tokens_map.get(key))
    return out


def _load_hf_dir(directory: str) -> Tokenizer:
    if os.path.isfile(os.path.join(directory, "tokenizer.model")):
        config = _read_json(os.path.join(directory, "tokenizer_config.json"))
        return SentencePieceTokenizer(
            os.path.join(directory, "tokenizer.model"),
            add_bos=bool(config.get("add_bos_token", True)),  # HF LlamaTokenizer's default
            add_eos=bool(config.get("add_eos_token", False)),
            special_tokens=_hf_special_tokens(directory),
        )
    if os.path.isfile(os.path.join(directory, "tokenizer.json")):
        return HFTokenizersTokenizer(directory)
    raise DataError(f"{directory}: HF tokenizer directory has neither tokenizer.model "
                    f"nor tokenizer.json")


def load_tokenizer(tokenizer_type: str, name_or_path: str) -> Tokenizer:
    """Loads a tokenizer from a local `.model` file or HF tokenizer directory.

    Args:
      tokenizer_type: "SentencePieceTokenizer" or "PretrainedFromHF" (Megatron's names).
        Either accepts either kind of path: a `.model` file or an HF directory.
      name_or_path: the `.model` file or the directory.

    Raises:
      DataError: the path is missing, or is neither a sentencepiece model nor an HF dir.
    """
    kind = _ALIASES.get(tokenizer_type, tokenizer_type)
    if kind not in TOKENIZER_TYPES:
        raise DataError(f"--tokenizer-type: unknown {tokenizer_type!r}; expected one of "
                        f"{', '.join(TOKENIZER_TYPES)}")
    if not name_or_path:
        raise DataError("tokenizer: no path given (--tokenizer-model or --tokenizer-name-or-path)")
    if os.path.isdir(name_or_path):
        return _load_hf_dir(name_or_path)
    if os.path.isfile(name_or_path):
        return SentencePieceTokenizer(name_or_path)
    raise DataError(f"{name_or_path}: tokenizer path does not exist (expected a sentencepiece "
                    f".model file or an HF tokenizer directory; nothing is downloaded)")
