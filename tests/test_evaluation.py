"""utils.evaluation against one-prompt-at-a-time decoding, sacrebleu and hand-counted values.

Batched greedy decoding must give exactly the tokens of decoding each prompt alone (course
models: the same float operations on unpadded batches; Hugging Face: left padding with a
mask, compared token for token). Scores are checked against hand-worked SQuAD examples,
``sacrebleu.corpus_bleu`` (to 1e-9, as tests/test_tasks_metrics.py) and counted win rates.
"""

import math

import pytest
import sacrebleu
import torch
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM

from utils.evaluation import (
    before_after_table,
    bleu,
    exact_match,
    example_scores,
    greedy_answers,
    greedy_generate,
    label_accuracy,
    text_perplexity,
    token_f1,
    win_rate,
)
from utils.generation import generate
from utils.objectives import perplexity
from utils.tokenization import CharTokenizer
from utils.transformer import GPT, GPTConfig


def prompts(n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = [3, 5, 3, 8, 5, 3, 6][:n]
    return [torch.randint(1, 40, (k,), generator=g).tolist() for k in lengths]


def test_course_model_batched_greedy_equals_one_at_a_time():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=40, block_size=32, n_layer=2, n_head=2, n_embd=16)).eval()
    batch = prompts()
    first = generate(model, torch.tensor([batch[0]]), 10)[0, len(batch[0]) :].tolist()
    stop = [first[3], 39]  # the first prompt stops within 4 tokens
    answers = greedy_generate(model, batch, max_new_tokens=10, stop_tokens=stop, batch_size=2)
    for prompt, answer in zip(batch, answers, strict=True):
        alone = generate(model, torch.tensor([prompt]), 10)[0, len(prompt) :].tolist()
        cut = next((i for i, t in enumerate(alone) if t in stop), len(alone))
        assert answer == alone[:cut]
    assert any(len(a) < 10 for a in answers)  # some answers did stop


def test_hugging_face_left_padded_batch_equals_one_at_a_time():
    torch.manual_seed(0)
    config = HFLlamaConfig(
        vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    batch = prompts()
    answers = greedy_generate(model, batch, max_new_tokens=8, stop_tokens=[2], batch_size=4)
    for prompt, answer in zip(batch, answers, strict=True):
        alone = greedy_generate(model, [prompt], max_new_tokens=8, stop_tokens=[2])[0]
        with torch.no_grad():  # and a plain argmax loop
            ids = torch.tensor([prompt])
            for _ in range(len(alone)):
                ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
        assert answer == alone == ids[0, len(prompt) :].tolist()


def test_greedy_answers_decode_text():
    chars = CharTokenizer("abc\n")
    torch.manual_seed(1)
    model = GPT(GPTConfig(vocab_size=4, block_size=16, n_layer=1, n_head=1, n_embd=8)).eval()
    texts = greedy_answers(model, chars, ["ab", "cab"], max_new_tokens=5, stop_tokens=[3])
    for prompt, text in zip(["ab", "cab"], texts, strict=True):
        ids = generate(model, chars.encode(prompt)[None], 5)[0, len(prompt) :].tolist()
        expected = chars.decode(ids[: ids.index(3)] if 3 in ids else ids).strip()
        assert text == expected


def test_squad_scores_hand_worked():
    predictions = ["The Eiffel Tower", "in 1889", "Paris, France"]
    references = [["Eiffel Tower"], ["1887", "1889"], "Lyon"]
    # EM: "eiffel tower" == "eiffel tower" (article dropped) -> 1; "in 1889" != "1889" -> 0; 0
    assert example_scores("exact_match", predictions, references) == [1.0, 0.0, 0.0]
    assert exact_match(predictions, references) == pytest.approx(1 / 3)
    # F1: 1; vs "1889": precision 1/2, recall 1 -> 2/3; no common token -> 0
    assert example_scores("f1", predictions, references) == pytest.approx([1.0, 2 / 3, 0.0])
    assert token_f1(predictions, references) == pytest.approx((1 + 2 / 3) / 3)


def test_bleu_equals_sacrebleu():
    predictions = ["le chat est sur le tapis", "il pleut", "bonjour le monde !"]
    references = ["le chat est sur le tapis .", "il pleut beaucoup", "bonjour tout le monde !"]
    expected = sacrebleu.corpus_bleu(predictions, [references]).score
    assert math.isclose(bleu(predictions, references), expected, abs_tol=1e-9)
    sentence = example_scores("bleu", predictions, references)
    for p, r, s in zip(predictions, references, sentence, strict=True):
        assert math.isclose(s, sacrebleu.corpus_bleu([p], [[r]]).score, abs_tol=1e-9)


def test_label_accuracy_and_win_rate():
    labels = ["positive", "negative"]
    predictions = ["Positive.", "negative", "I think positive", "negative"]
    references = ["positive", "positive", "positive", "negative"]
    assert label_accuracy(predictions, references, labels) == 0.5  # rows 0 and 3
    with pytest.raises(ValueError, match="not among labels"):
        label_accuracy(predictions, ["neutral"] * 4, labels)
    # wins: row 0; ties: rows 1, 3 -> (1 + 0.5 + 0.5) / 4
    assert win_rate([1.0, 0.0, 0.2, 0.5], [0.0, 0.0, 0.7, 0.5]) == 0.5
    assert win_rate([1, 1], [0, 1]) == 0.75
    assert win_rate([0.3], [0.3]) == 0.5
    with pytest.raises(ValueError, match="scores_a"):
        win_rate([1.0], [])


def test_before_after_table_and_bad_inputs():
    table = before_after_table({"exact_match": 0.125, "f1": 0.25}, {"exact_match": 0.5, "f1": 0.6})
    assert table.splitlines() == [
        "metric          before      after     change",
        "exact_match      0.125        0.5     +0.375",
        "f1                0.25        0.6      +0.35",
    ]
    with pytest.raises(ValueError, match="same metrics"):
        before_after_table({"f1": 0.1}, {"em": 0.2})
    with pytest.raises(ValueError, match="metric must be"):
        example_scores("rouge", ["a"], ["a"])
    with pytest.raises(ValueError, match="predictions and references"):
        exact_match(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="prompts"):
        greedy_generate(
            GPT(GPTConfig(vocab_size=4, block_size=8, n_layer=1, n_head=1, n_embd=4)), [[]], 2
        )


def test_text_perplexity_equals_the_course_perplexity_text_by_text():
    chars = CharTokenizer("abcd \n")
    torch.manual_seed(2)
    model = GPT(GPTConfig(vocab_size=6, block_size=32, n_layer=1, n_head=1, n_embd=8)).train()
    texts = ["abc dab cab", "dd cc ba abcd abcd"]  # 11 and 18 characters; cut at 12 tokens
    nll = [math.log(perplexity(model.eval(), chars.encode(t[:12]), block_size=32)) for t in texts]
    counts = [len(t[:12]) - 1 for t in texts]  # next-token targets per text
    expected = math.exp(sum(n * c for n, c in zip(nll, counts, strict=True)) / sum(counts))
    model.train()
    assert text_perplexity(model, chars, texts, max_tokens=12) == pytest.approx(expected, rel=1e-6)
    assert model.training  # the mode is restored
    with pytest.raises(ValueError, match="at least 2 tokens"):
        text_perplexity(model, chars, ["a"], max_tokens=12)
