"""Prompt tuning (Lester et al., EMNLP 2021): trainable soft-prompt vectors before the input.

The frozen model reads ``length`` (= l) trainable embeddings before the token embeddings of the
text, through a forward pre-hook on the top-level model; a second pre-hook on the task head drops
the prompt positions again. The prompt is model-level (``layers`` is validated only). Positions,
the head hook and decoding with the KV cache: docs/methods.md#prompt-tuning.

Invariants:

- With absolute position embeddings T + l must fit the position table (checked at ``apply`` for
  the prompt alone, at every forward for the batch).
- The head reads the token it reads without the prompt; a causal LM's logits (B, T, V) line up
  with the labels.
- It cannot start at the identity (it adds tokens) and cannot merge into the base weights.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Optional

import torch
from adabudget.config import ConfigError
from torch import nn

INITS = ("vocab", "random")


@dataclass
class PromptConfig:
    """Prompt-tuning knobs.

    Example (MiniLM, h = 384): ``length=20`` trains 20 x 384 = 7,680 parameters, and a batch
    padded to 128 tokens becomes 148 positions long (MiniLM has 512).
    """

    name: str = "prompt"
    length: int = 20  # l, soft-prompt vectors (Lester et al.'s prompt length)
    # vocab: copies of the embeddings of l vocabulary tokens drawn uniformly with torch's RNG
    # (Lester et al.'s "sampled vocab" init, Sec. 3.2, over the whole vocabulary); random: N(0, 0.02²)
    init: str = "vocab"
    layers: Optional[list] = None  # ignored: the prompt is model-level (validated only)

    def validate(self) -> None:
        if not isinstance(self.length, int) or self.length < 1:
            raise ConfigError(
                f"method.length: must be an integer >= 1 (soft-prompt vectors), got {self.length}"
            )
        if self.init not in INITS:
            raise ConfigError(f"method.init: unknown init '{self.init}'; use one of {list(INITS)}")
        if self.layers is not None and not all(isinstance(i, int) and i >= 0 for i in self.layers):
            raise ConfigError(
                f"method.layers: must be a list of block indices >= 0 or null (the prompt ignores it), "
                f"got {self.layers}"
            )


def position_limit(config) -> int | None:
    """The most positions (prompt + text) an HF config's absolute position table holds; None for RoPE."""
    mtype = getattr(config, "model_type", "")
    if mtype == "gpt2":
        return config.n_positions
    if mtype == "bert":
        return config.max_position_embeddings
    if mtype == "roberta":  # positions start after padding_idx (= pad_token_id)
        return config.max_position_embeddings - (config.pad_token_id or 0) - 1
    if mtype == "deberta-v2" and getattr(config, "position_biased_input", True):
        return config.max_position_embeddings
    return None


class SoftPrompt(nn.Module):
    """The soft prompt P (l, h) and the hooks that put it before the text and strip it for the head.

    Args:
        weight: the initial P (l, h); becomes the parameter ``prompt``.
        decoder: the head pools the last non-pad token (GPT-2 / LLaMA) rather than position 0.
        max_positions: prompt + text positions the model holds (None: no limit).
        arg_names: the top-level forward's positional parameter names (to read positional calls).
        causal_lm: the head is a language-modelling head (every position's logits, no pooling).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        decoder: bool,
        max_positions: int | None,
        arg_names: list[str],
        causal_lm: bool = False,
    ):
        super().__init__()
        self.prompt = nn.Parameter(weight)  # P (l, h)
        self.decoder = decoder
        self.causal_lm = causal_lm
        self.max_positions = max_positions
        self._arg_names = arg_names
        self._pool_index: torch.Tensor | None = None  # (B,) last non-pad token of this forward's text
        self._prompted_len: int | None = None  # l + T when this forward prepended the prompt
        self._handles: list = []

    @property
    def length(self) -> int:
        return self.prompt.shape[0]

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        """[P; X] for token embeddings ``embeds`` (B, T, h) -> (B, l + T, h)."""
        prompt = self.prompt.to(embeds.dtype).expand(embeds.shape[0], -1, -1)  # (B, l, h)
        return torch.cat([prompt, embeds], dim=1)

    def _prepend(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Forward pre-hook of the top-level model: input_ids -> inputs_embeds = [P; X], inputs widened."""
        kwargs = {**dict(zip(self._arg_names, args)), **kwargs}
        ids = kwargs.pop("input_ids", None)
        embeds = kwargs.get("inputs_embeds")
        if ids is not None:
            if embeds is not None:
                raise ValueError("You cannot specify both input_ids and inputs_embeds at the same time")
            embeds = model.get_input_embeddings()(ids)  # X (B, T, h)
        if embeds is None:
            return (), kwargs  # the model raises its own error
        batch, length, seq = embeds.shape[0], self.length, embeds.shape[1]
        cached = _cached_tokens(kwargs)  # a decoding step's cache holds the prompt already
        used = cached + seq if cached else length + seq
        if self.max_positions is not None and used > self.max_positions:
            raise ValueError(
                f"prompt: {used - length} tokens + method.length={length} prompt vectors exceed the "
                f"{self.max_positions} positions of this {getattr(model.config, 'model_type', 'model')}; set "
                f"data.max_length <= {self.max_positions - length} or lower method.length"
            )
        self._prompted_len = None
        if cached:  # a decoding step: the cache holds the prompt already (it went in at the prefill)
            kwargs["inputs_embeds"] = embeds
            mask = kwargs.get("attention_mask")
            if mask is not None and mask.dim() == 2:  # the caller's mask covers its own tokens only
                kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, length), mask], dim=1)
            positions = kwargs.get("position_ids")
            if positions is not None:  # counted without the prompt by the caller
                kwargs["position_ids"] = positions + length
            return (), kwargs
        kwargs["inputs_embeds"] = self(embeds)
        self._prompted_len = length + seq
        mask = kwargs.get("attention_mask")
        if mask is not None:
            if mask.dim() != 2:
                raise ValueError(f"prompt: needs a 2-D attention_mask (B, T), got shape {tuple(mask.shape)}")
            # every token (padding included) sees the prompt
            kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, length), mask], dim=1)
        types = kwargs.get("token_type_ids")
        if types is not None:
            kwargs["token_type_ids"] = torch.cat([types.new_zeros(types.shape[0], length), types], dim=1)
        positions = kwargs.get("position_ids")
        if positions is not None:  # as without position_ids: the prompt takes the first positions
            first = positions[..., :1] + torch.arange(length, device=positions.device)  # (B|1, l)
            kwargs["position_ids"] = torch.cat([first, positions + length], dim=-1)
        if self.decoder and not self.causal_lm:
            # HF's *ForSequenceClassification pools the rightmost token != pad_token_id of input_ids
            pad = getattr(model.config, "pad_token_id", None)
            real = None
            if pad is not None and ids is not None:
                real = ids != pad
            elif pad is not None and mask is not None:
                real = mask.bool()
            self._pool_index = None
            if real is not None:
                index = torch.arange(seq, device=real.device, dtype=torch.int32)
                self._pool_index = (index * real.to(torch.int32)).argmax(-1)  # (B,)
        return (), kwargs

    def _strip(self, head: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Forward pre-hook of the head: its hidden-sequence argument without the prompt positions."""
        if args:
            return (self._unprompt(args[0]), *args[1:]), kwargs
        key = next(k for k, v in kwargs.items() if torch.is_tensor(v))  # passed by keyword
        return (), {**kwargs, key: self._unprompt(kwargs[key])}

    def _unprompt(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, l + T, h) -> (B, T, h); for decoder heads the last non-pad token moves to position -1."""
        if self.causal_lm:
            # a decoding step's hidden states, or the last positions only (generate's logits_to_keep),
            # hold no prompt position
            prompted, self._prompted_len = self._prompted_len, None
            return hidden[:, self.length :] if hidden.shape[1] == prompted else hidden
        hidden = hidden[:, self.length :]
        if self.decoder and self._pool_index is not None:
            index, self._pool_index = self._pool_index.to(hidden.device), None
            last = hidden[torch.arange(hidden.shape[0], device=hidden.device), index]  # (B, h)
            # without input_ids HF's *ForSequenceClassification pools position -1
            hidden = torch.cat([hidden[:, :-1], last[:, None]], dim=1)
        return hidden

    def attach(self, model: nn.Module, head: nn.Module) -> None:
        self._handles.append(model.register_forward_pre_hook(self._prepend, with_kwargs=True))
        self._handles.append(head.register_forward_pre_hook(self._strip, with_kwargs=True))

    def detach(self) -> None:
        """Remove the hooks: the model computes without the prompt again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def extra_repr(self) -> str:
        return f"length={self.length}, hidden={self.prompt.shape[1]}"


def _cached_tokens(kwargs: dict) -> int:
    """How many tokens the KV cache passed to this forward holds already (0: none, or no cache)."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return int(cache[0][0].shape[-2])  # a legacy tuple of (key, value) per layer, (B, kvh, T, hd)


def apply(model: nn.Module, cfg: PromptConfig, layers: list[int] | None = None) -> dict[str, SoftPrompt]:
    """Give the model a soft prompt (child ``adabudget_prompt``); ``layers`` is ignored.

    Returns {"adabudget_prompt": SoftPrompt}.
    """
    from adabudget.arch import arch_of

    cfg.validate()
    arch = arch_of(model)
    embedding = model.get_input_embeddings()
    if embedding.embedding_dim != arch.hidden:
        raise ConfigError(
            f"method.name=prompt: cannot apply to this {arch.model_type}: its input embeddings have width "
            f"{embedding.embedding_dim} != hidden size {arch.hidden}; use prefix, lora or adapter"
        )
    if hasattr(model, "adabudget_prompt"):
        raise ConfigError("method.name=prompt: the model already has a soft prompt; apply prompt once")
    limit = position_limit(model.config)
    if limit is not None and cfg.length >= limit:
        raise ConfigError(
            f"method.length={cfg.length}: leaves no position for the text; "
            f"this {arch.model_type} has {limit} "
            f"positions for prompt + text; use method.length <= {limit} - data.max_length"
        )
    weight = embedding.weight
    # float32 unless the base already is float32/float64 (bf16 backbones keep a precise prompt)
    dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
    with torch.no_grad():
        if cfg.init == "vocab":
            tokens = torch.randint(weight.shape[0], (cfg.length,)).to(weight.device)
            init = weight[tokens].to(dtype).clone()  # (l, h)
        else:
            init = torch.randn(cfg.length, arch.hidden, device=weight.device, dtype=dtype) * 0.02
    names = [
        n
        for n, p in inspect.signature(model.forward).parameters.items()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    # a causal LM's head is its output embedding (lm_head); a classifier has none and reads arch.head
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = lm_head if lm_head is not None else model.get_submodule(arch.head)
    prompt = SoftPrompt(init, arch.family != "bert", limit, names, causal_lm=lm_head is not None)
    model.adabudget_prompt = prompt  # a child: saved with state_dict as adabudget_prompt.prompt
    prompt.attach(model, head)
    return {"adabudget_prompt": prompt}


def count(cfg: PromptConfig, arch, layers: list[int] | None = None) -> int:
    """l h (the prompt is model-level: ``layers`` does not change it)."""
    return cfg.length * arch.hidden
