"""Text generation tasks on top of ``utils.generation``: chat with an instruction-tuned model
through its chat template, and sampling continuations from a prompt string."""

from __future__ import annotations

import torch
from torch import nn

from utils.generation import generate


@torch.no_grad()
def chat(
    model: nn.Module,
    tokenizer,
    messages: list[dict[str, str]],
    max_new_tokens: int = 60,
    **sampling,
) -> str:
    """The assistant's reply to ``messages`` (role/content dicts), decoded with the course's
    KV-cache loop (greedy unless ``do_sample=True`` etc. are passed)."""
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
    stop = [tokenizer.eos_token_id]
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(end_of_turn, int) and end_of_turn != tokenizer.unk_token_id:
        stop.append(end_of_turn)
    model.eval()
    out = generate(model, ids, max_new_tokens, stop_tokens=stop, **sampling)
    return tokenizer.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=True).strip()


@torch.no_grad()
def complete(
    model: nn.Module,
    encode,
    decode,
    prompt: str,
    max_new_tokens: int,
    generator: torch.Generator | None = None,
    **sampling,
) -> str:
    """``prompt`` continued by ``max_new_tokens`` sampled tokens, with any tokenizer given as
    ``encode(str) -> list[int]`` and ``decode(list[int]) -> str``."""
    model.eval()
    ids = torch.tensor([list(encode(prompt))])
    out = generate(model, ids, max_new_tokens, generator=generator, **sampling)
    return decode(out[0, ids.shape[1] :].tolist())
