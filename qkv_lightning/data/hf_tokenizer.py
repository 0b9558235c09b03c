"""A model's own tokenizer: a Hugging Face ``tokenizer.json`` read through the ``tokenizers`` library, from the file or
from the checkpoint that ``import`` stored it in; and the one place the data modules turn their tokenizer settings
(``data.tokenizer``, ``data.bpe_file``, ``data.tokenizer_file``) into a subword tokenizer.

How text is encoded (:class:`HFTokenizer`), chosen to score text the way a Hugging Face causal LM is scored:

* each line, as read from the file with its ``"\\n"``, is encoded with ``add_special_tokens=False``: the newline is
  text, and no BOS or EOS is added per line (the text is one continuous stream, as with the GPT-2 BPE). Lines are
  encoded one by one, so a pre-tokenizer never merges text across a line end (the same rule as ``gpt2``);
* the stream starts with :attr:`~HFTokenizer.boundary_id` (the data modules put it before the first token and
  between documents): the BOS that the tokenizer's post-processor adds when it adds one (Llama, Mistral, Llama-3),
  so the model sees its BOS once at the start, as ``tokenizer(text)`` gives it; else the special added token with
  the lowest id (``<|endoftext|>`` for GPT-2, SmolLM2 and Qwen2);
* truncation and padding stored in the file are switched off (they would cut or pad lines).

A checkpoint stores the tokenizer under :data:`CHECKPOINT_ENTRY` (``import`` of a Llama-family folder or GGUF file,
``fit`` with ``data.tokenizer: hf``, and ``convert`` of either keep it), with the special token ids a Hugging Face
config names (:data:`SPECIAL_TOKEN_IDS`): the imported model's config's, or, for a tokenizer read from a
``tokenizer.json``, the boundary token as BOS and EOS (a model fit on our data starts with it and ends each document
with it). ``export --format hf`` writes them into ``config.json`` and ``generation_config.json``.

The identity is ``hf:`` and the SHA-256 of the normalized JSON (keys sorted, no whitespace, truncation and padding
left out): the same tokenizer has the same identity whether read from a ``tokenizer.json`` or a checkpoint, and any
change of the vocabulary, merges, normalizer, pre-tokenizer or special tokens gives another one. Loading a
``tokenizer.json`` only parses data (``Tokenizer.from_str``); a checkpoint is read weights-only.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from qkv_lightning.data.tokenizers import BPETokenizer, Tokenizer
from qkv_lightning.errors import CheckpointError, ConfigError, DataError

CHECKPOINT_ENTRY = "qkv_tokenizer"
"""The top-level checkpoint entry holding a tokenizer: ``{"format": CHECKPOINT_FORMAT, "json": <tokenizer.json>}``."""
CHECKPOINT_FORMAT = "huggingface-tokenizers"
SPECIAL_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
"""The special token ids of a Hugging Face model's config that a stored tokenizer records (each an id, a list of
ids, or None), under ``special_token_ids`` in :data:`CHECKPOINT_ENTRY`."""
CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth")
"""A ``data.tokenizer_file`` with one of these suffixes is a checkpoint; anything else is a ``tokenizer.json``."""
PROBE = "Hello world"


def _tokenizers(purpose: str) -> Any:
    try:
        import tokenizers
    except ImportError:
        raise ConfigError(
            f"{purpose} needs the optional package 'tokenizers': pip install tokenizers (or pip install "
            "'qkv-lightning[interop]')."
        ) from None
    return tokenizers


class HFTokenizer(Tokenizer):
    """A Hugging Face fast tokenizer from the text of a ``tokenizer.json`` (see the module docstring).

    Args:
        text: the ``tokenizer.json`` text.
        source: where it came from (a file, or a checkpoint's entry), named in errors.
        special_token_ids: the model config's :data:`SPECIAL_TOKEN_IDS` (missing ones are None); None: the boundary
            token as BOS and EOS, no padding token (what our data feeds a model).

    Raises:
        DataError: the text is not a tokenizer the ``tokenizers`` library reads, it has no special token to start
            a token stream, or a special token id is not an id.
    """

    name = "hf"

    def __init__(self, text: str, source: str, special_token_ids: Any = None) -> None:
        tokenizers = _tokenizers(f"reading the tokenizer {source}")
        fix = "give the tokenizer.json that the model's tokenizer (tokenizer.save or save_pretrained) wrote"
        if not isinstance(text, str):
            raise DataError(
                f"the tokenizer {source} is of type {type(text).__name__}, not the text of a tokenizer.json; {fix}."
            )
        try:
            data = json.loads(text)
        except ValueError as error:
            raise DataError(f"the tokenizer {source} is not JSON ({error}); {fix}.") from None
        if not isinstance(data, dict):
            raise DataError(
                f"the tokenizer {source} holds a JSON {type(data).__name__}, not a tokenizer object; {fix}."
            )
        try:
            self.backend = tokenizers.Tokenizer.from_str(text)
        except Exception as error:  # the library raises plain Exceptions for malformed files
            detail = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise DataError(f"the tokenizers library cannot read the tokenizer {source} ({detail}); {fix}.") from None
        self.backend.no_truncation()
        self.backend.no_padding()
        self.source = source
        self.text = text
        normalized = {k: v for k, v in data.items() if k not in ("truncation", "padding")}
        canonical = json.dumps(normalized, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        self._identity = "hf:" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]
        vocab = self.backend.get_vocab(with_added_tokens=True)
        self._vocab_size = max(vocab.values()) + 1 if vocab else 0
        self.eos_id = self._boundary(vocab)
        self.special_token_ids: dict[str, Any] = (
            {"bos_token_id": self.eos_id, "eos_token_id": self.eos_id, "pad_token_id": None}
            if special_token_ids is None else checked_special_ids(special_token_ids, source)
        )

    def _boundary(self, vocab: dict[str, int]) -> int:
        with_specials = self.backend.encode(PROBE, add_special_tokens=True).ids
        plain = self.backend.encode(PROBE, add_special_tokens=False).ids
        for start in range(len(with_specials) - len(plain) + 1):
            if start and with_specials[start:start + len(plain)] == plain:
                return with_specials[0]  # the post-processor's BOS
        special = sorted(token.content for token in self.backend.get_added_tokens_decoder().values() if token.special)
        if not special:
            raise DataError(
                f"the tokenizer {self.source} adds no BOS and has no special token (such as <|endoftext|>) to start "
                "the token stream and separate documents; give the model's own tokenizer.json."
            )
        return min(vocab[content] for content in special)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> HFTokenizer:
        """The tokenizer of a ``tokenizer.json``, or the one a checkpoint stores (``.ckpt``/``.pt``/``.pth``, read
        weights-only; ``import`` stores the source model's tokenizer there, ``fit`` the tokenizer of its data).

        Raises:
            DataError: naming ``data.tokenizer_file``: the file is missing, is no readable tokenizer.json or
                checkpoint, holds code, stores no tokenizer, or its tokenizer is malformed.
        """
        path = Path(path).expanduser()
        if not path.is_file():
            raise DataError(
                f"data.tokenizer_file={path} is not a file; name a tokenizer.json, or a checkpoint written by import "
                "or by fit with data.tokenizer: hf."
            )
        if path.suffix in CHECKPOINT_SUFFIXES:
            where = f"the checkpoint {path} (data.tokenizer_file)"
            tokenizer = cls.from_checkpoint(_read_checkpoint(path), where)
            if tokenizer is None:
                raise DataError(
                    f"{where} stores no tokenizer: import of a Hugging Face folder with a tokenizer.json or of a GGUF "
                    "file stores one, and so does fit with data.tokenizer: hf (and convert keeps it). Name the "
                    "model's tokenizer.json."
                )
            return tokenizer
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise DataError(f"cannot read data.tokenizer_file={path} as UTF-8 text ({error}).") from None
        return cls(text, f"{path} (data.tokenizer_file)")

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any], where: str) -> HFTokenizer | None:
        """The tokenizer a checkpoint (read weights-only) stores under :data:`CHECKPOINT_ENTRY`, or None if it stores
        none. An entry written before the special token ids were recorded takes them from the imported model's
        config (``qkv_import``), if the checkpoint has one.

        Args:
            checkpoint: the checkpoint's contents.
            where: the checkpoint, as errors name it.

        Raises:
            DataError: the entry is not a stored tokenizer, or not the tokenizer the checkpoint's model was trained
                with (its ``data_spec.tokenizer``).
        """
        entry = checkpoint.get(CHECKPOINT_ENTRY)
        if entry is None:
            return None
        if not isinstance(entry, dict) or entry.get("format") != CHECKPOINT_FORMAT:
            raise DataError(
                f"{where}: its {CHECKPOINT_ENTRY} entry is not a stored tokenizer ({{'format': {CHECKPOINT_FORMAT!r}, "
                "'json': ...}); the file was edited or written by other code. Import the model again, or name its "
                "tokenizer.json."
            )
        ids = entry.get("special_token_ids")
        imported = checkpoint.get("qkv_import")
        source_config = imported.get("config") if isinstance(imported, dict) else None
        if ids is None and isinstance(source_config, dict):
            ids = {key: source_config.get(key) for key in SPECIAL_TOKEN_IDS}
        tokenizer = cls(entry.get("json"), f"stored in {where}", ids)
        hparams = checkpoint.get("hyper_parameters")
        spec = hparams.get("data_spec") if isinstance(hparams, dict) else None
        recorded = spec.get("tokenizer") if isinstance(spec, dict) else None
        if recorded is not None and recorded != tokenizer.identity:
            raise DataError(
                f"{where}: its stored tokenizer is {tokenizer.identity}, but its model was trained with {recorded} "
                "(hyper_parameters.data_spec.tokenizer); the file was edited or pieced together from two "
                "checkpoints. Use the checkpoint that fit, import or convert wrote."
            )
        return tokenizer

    def checkpoint_entry(self) -> dict[str, Any]:
        """What a checkpoint stores under :data:`CHECKPOINT_ENTRY`: plain strings, ids and None, read weights-only."""
        return {"format": CHECKPOINT_FORMAT, "json": self.text, "special_token_ids": dict(self.special_token_ids)}

    @property
    def identity(self) -> str:
        return self._identity

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def boundary_id(self) -> int:
        return self.eos_id

    def encode_lines(self, lines: Sequence[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self.backend.encode_batch(list(lines), add_special_tokens=False)]

    def encode_prompt(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode([i for i in ids if 0 <= i < self.vocab_size], skip_special_tokens=False)


def _read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint ``path`` named by ``data.tokenizer_file``, read weights-only whatever ``--weights_only`` says; a
    file that is no readable checkpoint, or holds code, is a DataError naming the setting."""
    from qkv_lightning.checkpoints import load_checkpoint_file
    from qkv_lightning.checkpoints.read import ForbiddenCheckpointContent

    try:
        return load_checkpoint_file(path, weights_only=True, lightning=False)
    except ForbiddenCheckpointContent:
        raise DataError(
            f"refusing to read the tokenizer of {path} (data.tokenizer_file): the checkpoint holds Python objects "
            "other than tensors and plain containers, which could run code when loaded, and a tokenizer is always "
            "read weights-only (one that import, fit or convert wrote holds none). Name the model's tokenizer.json, "
            "or a checkpoint that this tool wrote."
        ) from None
    except CheckpointError as error:
        raise DataError(
            f"data.tokenizer_file={path} is read as a checkpoint (its name ends in {path.suffix}), and cannot be: "
            f"{error}"
        ) from None


def checked_special_ids(ids: Any, source: str) -> dict[str, Any]:
    """``ids`` (a mapping) as :data:`SPECIAL_TOKEN_IDS`, each a non-negative int, a non-empty list of them (several
    EOS ids, as Llama 3 configs name them), or None (missing ones too).

    Raises:
        DataError: naming ``source`` and the id that is not one.
    """
    if not isinstance(ids, dict):
        raise DataError(f"the special token ids of the tokenizer {source} are a {type(ids).__name__}, not a mapping.")
    checked: dict[str, Any] = {}
    for key in SPECIAL_TOKEN_IDS:
        value = ids.get(key)
        values = value if isinstance(value, list) and value else [value]
        if value is not None and not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
            raise DataError(
                f"the tokenizer {source}: {key}={value!r} is not a token id (a non-negative integer, a list of them, "
                "or null); fix the model's config.json, or import the model again."
            )
        checked[key] = list(value) if isinstance(value, list) else value
    return checked


def check_tokenizer_settings(
    kind: str, kinds: tuple[str, ...], bpe_file: str | None, tokenizer_file: str | None
) -> None:
    """``data.tokenizer`` is one of ``kinds``, and ``data.tokenizer_file`` is given exactly when it is ``hf`` (a
    tokenizer file that would be ignored is an error, so that no run is scored otherwise than its config says;
    ``data.bpe_file`` is only read with ``gpt2``, as before)."""
    if kind not in kinds:
        raise ConfigError(f"data.tokenizer={kind!r} must be one of {', '.join(repr(k) for k in kinds)}.")
    if kind == "hf" and not tokenizer_file:
        raise ConfigError(
            "data.tokenizer: hf needs data.tokenizer_file: a Hugging Face tokenizer.json, or a checkpoint written by "
            "import or by fit with data.tokenizer: hf (which store the model's own tokenizer)."
        )
    if kind != "hf" and tokenizer_file:
        raise ConfigError(
            f"data.tokenizer_file={tokenizer_file} is only read with data.tokenizer: hf (it is {kind!r}); set "
            "data.tokenizer: hf to use it, or data.tokenizer_file: null."
        )


def checkpoint_tokenizer_file(
    kind: str, tokenizer_file: str | None, checkpoint: str, model_tokenizer: str | None
) -> str | None:
    """The ``data.tokenizer_file`` of a run whose ``ckpt_path`` is a checkpoint that stores its model's tokenizer
    (:data:`CHECKPOINT_ENTRY`): the checkpoint itself when the data settings name no tokenizer (``data.tokenizer: hf``
    and no ``data.tokenizer_file``), so that ``predict`` decodes, and ``validate``/``test`` encode, with the model's
    own vocabulary; None to keep the settings (a ``data.tokenizer_file`` that holds another tokenizer than the
    model's is refused when the data is set up: :func:`~qkv_lightning.tasks.language_model.check_same_vocabulary`).

    Args:
        kind: ``data.tokenizer``.
        tokenizer_file: ``data.tokenizer_file``.
        checkpoint: the checkpoint (``ckpt_path``).
        model_tokenizer: the identity its model was trained with (``data_spec.tokenizer``), for the message.

    Raises:
        ConfigError: ``data.tokenizer`` names another kind of tokenizer (``word``, ``gpt2``): its ids are not the
            model's.
    """
    if kind == "hf":
        return checkpoint if not tokenizer_file else None
    raise ConfigError(
        f"ckpt_path={checkpoint} stores the tokenizer its model was trained with ({model_tokenizer or 'hf'}), but "
        f"data.tokenizer={kind!r} names another one: text would be encoded, and generated ids decoded, with a "
        "vocabulary that is not the model's. Set data.tokenizer: hf and leave data.tokenizer_file out (null) to use "
        "the checkpoint's own tokenizer, or name the model's tokenizer.json in data.tokenizer_file."
    )


def subword_tokenizer(kind: str, bpe_file: str | None, tokenizer_file: str | None) -> Tokenizer:
    """The ``gpt2`` (``bpe_file``, or tiktoken's ``gpt2``) or ``hf`` (``tokenizer_file``) tokenizer."""
    if kind == "hf":
        return HFTokenizer.from_file(tokenizer_file)
    return BPETokenizer.from_ranks_file(Path(bpe_file).expanduser()) if bpe_file else BPETokenizer.from_tiktoken("gpt2")
