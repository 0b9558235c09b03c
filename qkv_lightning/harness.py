"""Our GPT as an lm-eval-harness language model (``lm_eval.api.model.TemplateLM``), on any attention variant.

Imported only by the ``evaluate`` command (it needs the optional ``lm-eval`` package, the ``eval`` extra).

- tokens: the model's own tokenizer (:func:`qkv_lightning.evaluate.load_tokenizer`): GPT-2 BPE
  (:class:`~qkv_lightning.data.tokenizers.BPETokenizer`) or the Hugging Face tokenizer its checkpoint stores
  (:class:`~qkv_lightning.data.hf_tokenizer.HFTokenizer`), text encoded without special tokens (as lm-eval's own
  Hugging Face models do by default). The prefix of an empty context and of the first rolling window is the token
  that starts every token stream of our data (:attr:`~qkv_lightning.data.tokenizers.Tokenizer.boundary_id`:
  ``<|endoftext|>`` for GPT-2 and SmolLM2, the BOS for Llama tokenizers); generation stops at the model's EOS (the
  EOS ids its checkpoint records, else that boundary token).
- ``loglikelihood``: lm-eval splits each request into context and continuation tokens; the context is cut on the
  left so that context plus
  continuation fit ``network.max_seq_len``; one forward pass scores the continuation: the sum of its tokens'
  log-probabilities and whether each is the argmax. Requests are batched longest first, padded on the right (a
  causal model's earlier positions do not see the padding).
- ``loglikelihood_rolling``: lm-eval's disjoint rolling windows of ``max_seq_len`` tokens, the first conditioned on
  the prefix token; every token is scored once.
- ``generate_until``: greedy decoding on the static KV cache (:class:`~qkv_lightning.nn.decoding.StaticDecoder`):
  the prompt is run once, then one token per step, until a stop string of ``until`` appears, an EOS is generated,
  ``max_gen_toks`` tokens are made, or the context is full.

Log-probabilities are taken over the tokenizer's vocabulary: a model whose output layer is wider (e.g. 50304 for
50257 GPT-2 tokens) has its padding ids excluded, as ``predict`` excludes them from generation.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lm_eval import utils
from lm_eval.api.model import TemplateLM
from torch import Tensor

from qkv_lightning.data.tokenizers import Tokenizer
from qkv_lightning.errors import ConfigError
from qkv_lightning.nn.decoding import StaticDecoder
from qkv_lightning.nn.gpt import GPT


def eos_ids(tokenizer: Tokenizer) -> list[int]:
    """The ids that end a generation: the EOS ids a Hugging Face tokenizer's checkpoint records (``eos_token_id``, an
    id or a list), else the tokenizer's boundary token (GPT-2's ``<|endoftext|>``)."""
    recorded = (getattr(tokenizer, "special_token_ids", None) or {}).get("eos_token_id")
    ids = recorded if isinstance(recorded, list) else [recorded] if recorded is not None else []
    return ids or [tokenizer.boundary_id]


class HarnessGPT(TemplateLM):
    """lm-eval's view of a :class:`GPT` with its own tokenizer.

    Args:
        model: the decoder (put in eval mode; moved to ``device``).
        tokenizer: the tokenizer whose ids the model was trained on (GPT-2 BPE, or a Hugging Face tokenizer).
        batch_size: requests per forward pass for the log-likelihoods.
        device: where to run.
    """

    backend = "causal"

    def __init__(self, model: GPT, tokenizer: Tokenizer, batch_size: int = 16, device: str = "cpu") -> None:
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"--batch_size={batch_size} must be at least 1.")
        self.model = model.eval().to(device)
        self.tokenizer_ids = tokenizer
        self.batch_size = batch_size
        self._device = torch.device(device)
        self.n_valid = min(tokenizer.vocab_size, model.config.vocab_size)
        self.stop_ids = eos_ids(tokenizer)

    # ------------------------------------------------------------------------------------------------ tokens
    @property
    def eot_token_id(self) -> int:
        return self.stop_ids[0]

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer_ids.boundary_id

    @property
    def max_length(self) -> int:
        return self.model.config.max_seq_len

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer_ids.identity

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tokenizer_ids.encode_prompt(string)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer_ids.decode(tokens)

    def log_probs(self, logits: Tensor) -> Tensor:
        """Log-probabilities (..., n_valid) over the tokenizer's vocabulary from logits (..., V)."""
        return F.log_softmax(logits[..., : self.n_valid].float(), dim=-1)

    # ---------------------------------------------------------------------------------------- log-likelihood
    @torch.no_grad()
    def score(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int], int]:
        """The model's input for one request: (input ids, continuation ids, scored positions), left-truncated."""
        whole = (context + continuation)[-(self.max_length + 1) :]
        return whole[:-1], continuation, len(continuation)

    @torch.no_grad()
    def _loglikelihood_tokens(
        self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        prepared = []
        for index, (_, context, continuation) in enumerate(requests):
            if not continuation:
                results[index] = (0.0, True)
                continue
            if len(continuation) > self.max_length:
                raise ConfigError(
                    f"a continuation of {len(continuation)} tokens exceeds network.max_seq_len={self.max_length}; "
                    "lm-eval cannot score it with this model."
                )
            prepared.append((index, *self.score(context, continuation)))
        prepared.sort(key=lambda item: -len(item[1]))  # longest first: little padding, and the first batch is largest
        for start in range(0, len(prepared), self.batch_size):
            batch = prepared[start : start + self.batch_size]
            width = len(batch[0][1])
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            for row, (_, inputs, _, _) in enumerate(batch):
                ids[row, : len(inputs)] = torch.tensor(inputs)  # right padding: causal, so unseen by real tokens
            log_probs = self.log_probs(self.model(ids.to(self._device)))  # (B, T, n_valid)
            for row, (index, inputs, continuation, n) in enumerate(batch):
                end = len(inputs)
                scored = log_probs[row, end - n : end]  # (n, n_valid): the positions predicting the continuation
                targets = torch.tensor(continuation, device=scored.device)
                total = scored.gather(-1, targets[:, None]).sum().item()
                greedy = bool((scored.argmax(dim=-1) == targets).all())
                results[index] = (total, greedy)
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        out = []
        for (string,) in [request.args for request in requests]:
            windows = [
                utils.make_disjoint_window(window)
                for window in utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            scores = self._loglikelihood_tokens([(None, context, target) for context, target in windows])
            total = sum(score for score, _ in scores)
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
        return out

    # ------------------------------------------------------------------------------------------- generation
    @torch.no_grad()
    def greedy_until(self, context: list[int], until: list[str], max_new: int) -> list[int]:
        """Greedy continuation ids of ``context`` on the static KV cache, cut before the first stop string."""
        context = context[-(self.max_length - 1) :] or [self.prefix_token_id]
        capacity = min(self.max_length, len(context) + max_new)
        max_new = capacity - len(context)
        if max_new <= 0:
            return []
        decoder = StaticDecoder(self.model, capacity)
        logits, cache = decoder.prefill(torch.tensor([context], device=self._device))  # (1, V)
        generated: list[int] = []
        while True:
            token = int(logits[0, : self.n_valid].argmax())
            if token in self.stop_ids:
                break
            generated.append(token)
            if until and any(stop in self.tok_decode(generated) for stop in until):
                break
            if len(generated) >= max_new:
                break
            pos = torch.tensor([len(context) + len(generated) - 1], device=self._device)
            logits, cache = decoder.step(torch.tensor([[token]], device=self._device), pos, cache)
        return generated

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        out = []
        for context, gen_kwargs in [request.args for request in requests]:
            kwargs = dict(gen_kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", 256))
            if kwargs.get("do_sample") or float(kwargs.get("temperature", 0.0) or 0.0) > 0:
                raise ConfigError(
                    f"a task asks for sampled generation ({gen_kwargs}); evaluate decodes greedily only (set "
                    "do_sample: false in the task's generation_kwargs)."
                )
            text = self.tok_decode(self.greedy_until(self.tok_encode(context), until, max_new))
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return out
