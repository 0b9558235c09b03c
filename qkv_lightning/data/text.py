"""What every language-modelling datamodule shares: the prompts ``predict`` continues and the data spec (vocabulary,
sequence length, tokenizer) the model is built from. :class:`~qkv_lightning.data.wikitext.WikiText` and
:class:`~qkv_lightning.data.streaming.StreamingText` derive from :class:`TextData`."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from qkv_lightning.data.tokenizers import Tokenizer


class Prompts(Dataset):
    """Prompts for generation: ``{"ids": (T,) int64 starting with the boundary id, "prompt": text}``."""

    def __init__(self, prompts: list[str], tokenizer: Tokenizer) -> None:
        self.prompts = prompts
        self.ids = [[tokenizer.boundary_id, *tokenizer.encode_prompt(p)] for p in prompts]

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"ids": torch.tensor(self.ids[i], dtype=torch.long), "prompt": self.prompts[i]}


class TextData(L.LightningDataModule):
    """A token datamodule for the language model. A subclass sets ``seq_len`` and ``prompts`` and implements
    :meth:`load_tokenizer`; it overrides :meth:`tokens_per_word` when its text has word-level counts."""

    seq_len: int
    prompts: list[str]

    def load_tokenizer(self) -> Tokenizer:
        """The tokenizer of the data (built or loaded once)."""
        raise NotImplementedError

    @property
    def world_size(self) -> int:
        """Processes of the running trainer (evaluation sets are padded to a multiple of it); 1 outside one."""
        return self.trainer.world_size if self.trainer is not None else 1

    def settings_spec(self) -> dict[str, Any]:
        """What the settings alone decide for the model (no file is read): the sequence length."""
        return {"seq_len": self.seq_len}

    def spec(self) -> dict[str, Any]:
        """What the data decides for the model: vocabulary size, sequence length and the tokenizer's identity."""
        tokenizer = self.load_tokenizer()
        return {"vocab_size": tokenizer.vocab_size, "seq_len": self.seq_len, "tokenizer": tokenizer.identity}

    def tokens_per_word(self, split: str) -> float | None:
        """Tokens per word-level token of ``split`` (turns per-token into per-word loss); None: not known."""
        return None

    def decode(self, ids) -> str:
        return self.load_tokenizer().decode([int(i) for i in ids])

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(Prompts(self.prompts, self.load_tokenizer()), batch_size=1, shuffle=False)
