"""Batched chat generation shared by chat.py, the SFT task evaluation, serve.py and make_pairs.py.

Prompts are conversations rendered with the tokenizer's chat template plus the assistant header, left-
padded into one batch, and continued with transformers' generate (KV cache) until the template's
end-of-turn token (<|im_end|> in ChatML) or eos, or max_new_tokens. Sampling with a seed runs inside a forked RNG, so it is reproducible and
leaves the caller's random state (and so exact training resume) untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import (
    DynamicCache,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from utils.chat import end_of_turn_ids, prompt_ids


@dataclass
class SamplingConfig:
    """How to pick tokens; temperature 0 means greedy decoding."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0
    row_seeds: tuple[int, ...] | None = None  # one seed per batch row: see RowSeededSampling

    def generate_kwargs(self) -> dict:
        kwargs: dict = {"max_new_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty}
        if self.temperature > 0 and self.row_seeds is not None:
            # greedy search over scores that RowSeededSampling has already turned into a sample
            kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None,
                          logits_processor=LogitsProcessorList([RowSeededSampling(self)]))
        elif self.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.temperature, top_k=self.top_k or None,
                          top_p=self.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
        return kwargs


class RowSeededSampling(LogitsProcessor):
    """Sampling in which each row draws from its own generator, so a row's reply depends only on its prompt
    and its seed, not on the rest of the batch (2 processes with 8 prompts each sample exactly what 1 process
    with all 16 does). The scores are filtered with transformers' own temperature, top-k and top-p warpers,
    then row b adds Gumbel noise from generator b: the argmax that greedy search then takes is a sample of
    the filtered softmax (the Gumbel-max trick), and every row draws one noise vector per decoding step."""

    def __init__(self, sampling: SamplingConfig):
        self.seeds = sampling.row_seeds or ()
        self.warpers = LogitsProcessorList([TemperatureLogitsWarper(sampling.temperature)])
        if sampling.top_k:
            self.warpers.append(TopKLogitsWarper(sampling.top_k))
        if sampling.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(sampling.top_p))
        self.generators: list[torch.Generator] | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.generators is None:
            if len(self.seeds) != scores.shape[0]:
                raise ValueError(f"row_seeds has {len(self.seeds)} seeds for a batch of {scores.shape[0]} rows")
            self.generators = [torch.Generator(scores.device).manual_seed(s) for s in self.seeds]
        scores = self.warpers(input_ids, scores.float())
        noise = torch.stack([torch.empty(scores.shape[1], device=scores.device).exponential_(generator=g)
                             for g in self.generators])
        return scores - noise.log()  # + Gumbel(0, 1) noise, since -log(Exp(1)) ~ Gumbel


def stop_token_ids(tokenizer) -> list[int]:
    """Ids that end a reply: the end-of-turn token(s) the chat template writes after a reply (<|im_end|> for
    step0's ChatML, utils.chat.end_of_turn_ids), then the tokenizer's eos (<|endoftext|>)."""
    ids = [*end_of_turn_ids(tokenizer), tokenizer.eos_token_id]
    return [i for i in dict.fromkeys(ids) if i is not None]


def left_pad(rows: Sequence[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows as (B, T) ids and attention mask, padded on the left (generation continues on the right)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def sample_tokens(model, ids: torch.Tensor, mask: torch.Tensor, sampling: SamplingConfig, tokenizer,
                  synced_gpus: bool = False, streamer=None, group_size: int = 1) -> torch.Tensor:
    """The (B * group_size, N) tokens `model.generate` appends to the left-padded prompts `ids` (rows that
    stop early are padded with the pad id); with group_size G, rows g*G .. g*G + G - 1 continue prompt g.
    `model` is anything with HF's generate (a model, a PeftModel, DeepSpeed's hybrid engine). Seeded
    sampling runs in a forked RNG, so the caller's random state is untouched.

    The G samples of a prompt share its prefill (`shared_prefill`), unless `model` is not a plain HF
    model (DeepSpeed's hybrid engine runs its own kernels): then the prompt rows are repeated."""
    device = ids.device
    cache = None
    if group_size > 1:
        if isinstance(model, PreTrainedModel) or hasattr(model, "get_base_model"):
            cache = shared_prefill(model, ids, mask, group_size)
        ids, mask = ids.repeat_interleave(group_size, 0), mask.repeat_interleave(group_size, 0)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(sampling.seed)
        out = model.generate(input_ids=ids, attention_mask=mask, eos_token_id=stop_token_ids(tokenizer),
                             pad_token_id=tokenizer.pad_token_id, synced_gpus=synced_gpus, streamer=streamer,
                             past_key_values=cache, **sampling.generate_kwargs())
    return out[:, ids.shape[1]:]


def shared_prefill(model, ids: torch.Tensor, mask: torch.Tensor, group_size: int) -> DynamicCache:
    """The KV cache of every prompt token but the last, computed once per prompt and repeated for the G
    rows of its group: generate then runs only the last prompt token and the reply per row, instead of
    G prefills of the same prompt. Positions are counted over the attention mask, as generate counts them."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1],
          past_key_values=cache, use_cache=True)
    cache.batch_repeat_interleave(group_size)
    return cache


@torch.no_grad()
def first_token_margins(model, tokenizer, prompts: Sequence[list[int]], answers: tuple[str, str],
                        batch_size: int = 16) -> list[float]:
    """log p(a) - log p(b) for the first tokens a, b of the two `answers`, at the position that starts the
    reply to each prompt: how strongly the model leans to the first answer, before any sampling."""
    a, b = (tokenizer(text, add_special_tokens=False)["input_ids"][0] for text in answers)
    device = next(model.parameters()).device
    margins: list[float] = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = left_pad(prompts[start:start + batch_size], tokenizer.pad_token_id, device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: count positions from each row's start
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        logp = logits[:, -1].float().log_softmax(-1)
        margins += (logp[:, a] - logp[:, b]).tolist()
    return margins


def generate_ids(model, tokenizer, prompts: Sequence[list[int]], sampling: SamplingConfig,
                 synced_gpus: bool = False, streamer=None) -> list[list[int]]:
    """New token ids for each prompt (stop token and padding removed)."""
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, tokenizer.pad_token_id, device)
    stops = stop_token_ids(tokenizer)
    replies = []
    for row in sample_tokens(model, ids, mask, sampling, tokenizer, synced_gpus, streamer).tolist():
        cut = next((i for i, t in enumerate(row) if t in stops), len(row))
        replies.append(row[:cut])
    return replies


def generate_replies(model, tokenizer, conversations: Sequence[list[dict[str, str]]], sampling: SamplingConfig,
                     batch_size: int = 16, synced_gpus: bool = False) -> list[str]:
    """The assistant's next reply to each conversation, in batches of `batch_size`."""
    replies: list[str] = []
    for start in range(0, len(conversations), batch_size):
        chunk = [prompt_ids(tokenizer, c) for c in conversations[start:start + batch_size]]
        for reply in generate_ids(model, tokenizer, chunk, sampling, synced_gpus):
            replies.append(tokenizer.decode(reply, skip_special_tokens=True))
    return replies


class CallbackStreamer:
    """A transformers streamer that hands each newly decoded piece of text to `on_text` (for terminals
    and server-sent events); the prompt is skipped and text stops at the first stop token."""

    def __init__(self, tokenizer, on_text: Callable[[str], None]):
        self.tokenizer, self.on_text = tokenizer, on_text
        self.stops = set(stop_token_ids(tokenizer))
        self.tokens: list[int] = []
        self.printed = 0
        self.prompt_seen = False
        self.stopped = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate first pushes the prompt
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            if self.stopped or token in self.stops:
                self.stopped = True
                continue
            self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            return
        if len(text) > self.printed:
            self.on_text(text[self.printed:])
            self.printed = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if len(text) > self.printed:
            self.on_text(text[self.printed:])
            self.printed = len(text)
