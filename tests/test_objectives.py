"""utils.objectives against Hugging Face losses, closed forms, the T5 paper's example and
sampling statistics (binomial bounds at 5 standard deviations: a correct implementation
fails about once in 3 million runs; all generators are seeded, so runs are repeatable).
Runs in about 5 s."""

import math

import pytest
import torch
import torch.nn.functional as F
import transformers

from utils.attention import causal_mask
from utils.objectives import (
    apply_span_corruption,
    causal_lm_loss,
    mask_tokens,
    mean_negative_log_likelihood,
    perplexity,
    prefix_lm_mask,
    random_spans_noise_mask,
    span_corruption,
    undo_span_corruption,
)

SIGMAS = 5


def within_binomial(count: int, n: int, p: float) -> bool:
    return abs(count - n * p) <= SIGMAS * math.sqrt(n * p * (1 - p))


@pytest.fixture(scope="module")
def hf_gpt2() -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=50, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config).eval()


# --------------------------------------------------------------------------- causal LM


def test_causal_lm_loss_matches_hugging_face(hf_gpt2):
    ids = torch.randint(50, (3, 12), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :4] = -100  # e.g. a prompt that is not scored
    labels[2, 9:] = -100  # e.g. padding
    with torch.no_grad():
        output = hf_gpt2(ids, labels=labels)
    torch.testing.assert_close(
        causal_lm_loss(output.logits, labels), output.loss, atol=1e-5, rtol=0
    )


def test_causal_lm_loss_is_the_mean_over_shifted_targets():
    logits = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(7, (2, 5), generator=torch.Generator().manual_seed(1))
    manual = torch.stack(
        [-logits[b, t].log_softmax(-1)[labels[b, t + 1]] for b in range(2) for t in range(4)]
    ).mean()
    torch.testing.assert_close(causal_lm_loss(logits, labels), manual, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="logits must be"):
        causal_lm_loss(logits[:, :4], labels)
    with pytest.raises(ValueError, match="LongTensor"):
        causal_lm_loss(logits, labels.float())


# --------------------------------------------------------------------------- BERT masking


def test_mask_tokens_statistics_80_10_10():
    vocab, mask_id = 1000, 3
    ids = torch.randint(10, vocab, (200, 500), generator=torch.Generator().manual_seed(0))
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = special[:, -1] = True  # [CLS] ... [SEP]
    inputs, labels = mask_tokens(
        ids, mask_token_id=mask_id, vocab_size=vocab, special_tokens_mask=special,
        generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    chosen = labels != -100
    n_chosen = int(chosen.sum())
    assert not chosen[special].any()
    assert within_binomial(n_chosen, int((~special).sum()), 0.15)
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(inputs[~chosen], ids[~chosen])  # unchosen tokens untouched
    masked = chosen & (inputs == mask_id)
    kept = chosen & (inputs == ids)
    randomized = chosen & ~masked & ~kept
    assert within_binomial(int(masked.sum()), n_chosen, 0.8)
    # a random replacement equals the original with probability 1 / vocab
    assert within_binomial(int(kept.sum()), n_chosen, 0.1 + 0.1 / vocab)
    assert within_binomial(int(randomized.sum()), n_chosen, 0.1 - 0.1 / vocab)
    # random replacements are uniform over the vocabulary: about half below vocab / 2
    assert within_binomial(int((inputs[randomized] < vocab // 2).sum()), int(randomized.sum()), 0.5)


def test_mask_tokens_rejects_bad_input():
    ids = torch.randint(10, (2, 5))
    with pytest.raises(ValueError, match="mask_prob"):
        mask_tokens(ids, mask_token_id=0, vocab_size=10, mask_prob=1.5)
    with pytest.raises(ValueError, match="special_tokens_mask"):
        mask_tokens(ids, mask_token_id=0, vocab_size=10, special_tokens_mask=torch.zeros(2, 5))


# --------------------------------------------------------------------------- span corruption


def test_span_corruption_reproduces_the_t5_paper_example():
    words = ["Thank", "you", "for", "inviting", "me", "to", "your", "party", "last", "week", "."]
    vocab = {w: i for i, w in enumerate(words)}
    ids = torch.tensor([vocab[w] for w in words])
    noise = torch.tensor([w in ("for", "inviting", "last") for w in words])
    X, Y, Z = 100, 101, 102
    inputs, targets = apply_span_corruption(ids, noise, [X, Y, Z])
    expected_inputs = [vocab[w] for w in ["Thank", "you"]] + [X]
    expected_inputs += [vocab[w] for w in ["me", "to", "your", "party"]] + [Y]
    expected_inputs += [vocab["week"], vocab["."]]
    assert inputs.tolist() == expected_inputs
    assert targets.tolist() == [X, vocab["for"], vocab["inviting"], Y, vocab["last"], Z]
    assert torch.equal(undo_span_corruption(inputs, targets, [X, Y, Z]), ids)


@pytest.mark.parametrize("length", [10, 37, 512])
def test_noise_mask_counts(length):
    generator = torch.Generator().manual_seed(length)
    num_noise = round(length * 0.15)
    num_spans = max(round(num_noise / 3), 1)
    for _ in range(20):
        mask = random_spans_noise_mask(length, generator=generator)
        assert mask.shape == (length,) and mask.dtype == torch.bool
        assert int(mask.sum()) == num_noise
        assert int((mask & ~F.pad(mask[:-1], (1, 0))).sum()) == num_spans  # span starts
        assert not mask[0] and mask[-1]  # T5 interleaves kept/noise spans, kept first


def test_noise_spans_have_mean_length_three_and_cover_positions_uniformly():
    generator = torch.Generator().manual_seed(0)
    length, samples = 400, 500
    masks = torch.stack(
        [random_spans_noise_mask(length, generator=generator) for _ in range(samples)]
    )
    starts = masks & ~F.pad(masks[:, :-1], (1, 0))
    assert int(masks.sum()) / int(starts.sum()) == pytest.approx(60 / 20)  # exact by design
    # inside the sequence every position is noise with probability about 0.15
    middle = masks[:, 50:350].float().mean(0)
    bound = SIGMAS * math.sqrt(0.15 * 0.85 / samples)
    assert (middle - 0.15).abs().max() < bound


def test_span_corruption_is_invertible():
    generator = torch.Generator().manual_seed(0)
    sentinels = list(range(32099, 31999, -1))  # T5's <extra_id_0>, <extra_id_1>, ...
    for length in (2, 3, 20, 101, 300):
        ids = torch.randint(1000, (length,), generator=generator)
        inputs, targets = span_corruption(ids, sentinels, generator=generator)
        assert torch.equal(undo_span_corruption(inputs, targets, sentinels), ids)
        # every original token is in exactly one of the two, plus one sentinel per span each
        num_spans = sum(t in sentinels for t in inputs.tolist())
        assert len(inputs) + len(targets) == length + 2 * num_spans


def test_span_corruption_rejects_bad_input():
    with pytest.raises(ValueError, match="length"):
        random_spans_noise_mask(1)
    with pytest.raises(ValueError, match="noise_density"):
        random_spans_noise_mask(10, noise_density=0.0)
    with pytest.raises(ValueError, match="sentinel"):
        apply_span_corruption(torch.arange(5), torch.tensor([0, 1, 0, 1, 0]).bool(), [99])
    with pytest.raises(ValueError, match="noise_mask"):
        apply_span_corruption(torch.arange(5), torch.ones(4, dtype=torch.bool), [99])


# --------------------------------------------------------------------------- prefix LM


def test_prefix_lm_mask_hand_worked():
    expected = torch.tensor(
        [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool
    )
    assert torch.equal(prefix_lm_mask(2, 4), expected)


def test_prefix_lm_mask_limits_and_batches():
    assert torch.equal(prefix_lm_mask(0, 5), causal_mask(5, 5))
    assert torch.equal(prefix_lm_mask(1, 5), causal_mask(5, 5))  # position 0 sees itself anyway
    assert prefix_lm_mask(5, 5).all()
    batched = prefix_lm_mask(torch.tensor([0, 3, 5]), 5)
    assert batched.shape == (3, 1, 5, 5)
    for row, prefix in enumerate((0, 3, 5)):
        assert torch.equal(batched[row, 0], prefix_lm_mask(prefix, 5))
    with pytest.raises(ValueError, match="prefix_length"):
        prefix_lm_mask(6, 5)


# --------------------------------------------------------------------------- perplexity


def test_uniform_model_has_perplexity_vocab_size():
    vocab = 37

    def uniform(idx):
        return torch.zeros(*idx.shape, vocab)

    ids = torch.randint(vocab, (100,))
    assert perplexity(uniform, ids, block_size=16) == pytest.approx(vocab, rel=1e-6)
    assert perplexity(uniform, ids, block_size=16, stride=5) == pytest.approx(vocab, rel=1e-6)


def test_perplexity_matches_hugging_face_loss(hf_gpt2):
    def model(idx):
        return hf_gpt2(idx).logits

    ids = torch.randint(50, (30,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        loss = hf_gpt2(ids[None], labels=ids[None]).loss.item()
    assert perplexity(model, ids, block_size=32) == pytest.approx(math.exp(loss), rel=1e-5)


def test_sliding_window_matches_the_hugging_face_recipe(hf_gpt2):
    """The stride recipe of the transformers docs ("Perplexity of fixed-length models"),
    summing the per-token NLL exactly instead of averaging window means."""
    ids = torch.randint(50, (100,), generator=torch.Generator().manual_seed(3))
    block, stride = 32, 10
    total, count, prev_end = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, len(ids), stride):
            end = min(begin + block, len(ids))
            window = ids[begin:end][None]
            labels = window.clone()
            labels[:, : -(end - prev_end)] = -100
            n_scored = int((labels[:, 1:] != -100).sum())
            total += hf_gpt2(window, labels=labels).loss.item() * n_scored
            count += n_scored
            prev_end = end
            if end == len(ids):
                break
    ours = mean_negative_log_likelihood(
        lambda idx: hf_gpt2(idx).logits, ids, block_size=block, stride=stride
    )
    assert count == len(ids) - 1  # every token but the first is scored exactly once
    assert ours == pytest.approx(total / count, rel=1e-5)


def test_perplexity_rejects_bad_input():
    with pytest.raises(ValueError, match="stride"):
        perplexity(lambda x: x, torch.arange(10), block_size=4, stride=5)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(lambda idx: torch.zeros(*idx.shape, 3), torch.arange(1), block_size=4)
