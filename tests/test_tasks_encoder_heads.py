"""Encoder task heads (classification, NER, extractive QA) on the pretrained MiniLM: shapes,
losses against torch's cross-entropy (atol=1e-6), word-piece alignment, span search against
brute force, and short training runs on real data that beat their trivial baselines."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from utils.data import WNUT17_LABELS, load_sentiment, load_squad2_dev, load_wnut17
from utils.pretrained import load_minilm, load_minilm_hf
from utils.tasks import classification as C
from utils.tasks import ner as N
from utils.tasks import qa as Q
from utils.tasks.encoders import (
    TopLayers,
    encode,
    fit_bucketed,
    freeze_all_but_last_layers,
    frozen_prefix_states,
    length_buckets,
    mean_pool,
    real_width,
    top_layer_states,
)
from utils.tasks.metrics import accuracy, squad_normalize


@pytest.fixture(scope="module")
def minilm():
    """(tokenizer, our Bert with MiniLM's weights); tests that change it work on a copy."""
    model, tokenizer = load_minilm()
    return tokenizer, model


def cached_states(encoder, input_ids, attention_mask, token_type_ids=None):
    """Final encoder states (N, T, E), computed once: a frozen encoder's heads train on these."""
    return frozen_prefix_states(encoder, input_ids, attention_mask, 0, token_type_ids)


def train_head(head, loss_of_batch, n_train, steps, lr, batch_size=32):
    """AdamW on ``head``'s parameters; ``loss_of_batch(slice)`` gives the loss of a slice."""
    torch.manual_seed(0)
    head.train()
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr)
    for step in range(steps):
        lo = (step * batch_size) % n_train
        loss = loss_of_batch(slice(lo, min(lo + batch_size, n_train)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    head.eval()


def test_mean_pool_ignores_padding():
    hidden = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    expected = torch.stack([hidden[0, :2].mean(0), hidden[1].mean(0)])
    torch.testing.assert_close(mean_pool(hidden, mask), expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="attention_mask"):
        mean_pool(hidden, mask[:, :3])


def test_encode_accepts_course_bert_and_hf_bert(minilm):
    tokenizer, ours = minilm
    hf, _ = load_minilm_hf()
    batch = tokenizer(
        ["a short one", "a somewhat longer sentence here"], padding=True, return_tensors="pt"
    )
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(encode(hf, ids, mask), expected, atol=0, rtol=0)
        # our Bert with MiniLM's weights: same states on real tokens (float32 sums, 1e-5)
        keep = mask.bool()
        torch.testing.assert_close(
            encode(ours, ids, mask)[keep], expected[keep], atol=1e-5, rtol=1e-5
        )
    with pytest.raises(TypeError, match="input_ids"):
        encode(ours, ids.float(), mask)
    with pytest.raises(ValueError, match="attention_mask"):
        encode(ours, ids, mask[:, 1:])


def test_classifier_shapes_loss_and_freezing(minilm):
    tokenizer, ours = minilm
    encoder = copy.deepcopy(ours)
    model = C.SequenceClassifier(encoder, C.ClassifierConfig(384, 3, dropout=0.0)).eval()
    batch = tokenizer(["good", "bad movie", "fine"], padding=True, return_tensors="pt")
    labels = torch.tensor([0, 2, 1])
    logits = model(batch["input_ids"], batch["attention_mask"])
    assert logits.shape == (3, 3)
    torch.testing.assert_close(
        model.loss(batch["input_ids"], batch["attention_mask"], labels),
        F.cross_entropy(logits, labels),
        atol=1e-6,
        rtol=0,
    )
    first = C.SequenceClassifier(encoder, C.ClassifierConfig(384, 3, pooling="first")).eval()
    hidden = encode(encoder, batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(
        first(batch["input_ids"], batch["attention_mask"]),
        first.head(hidden[:, 0]),
        atol=1e-6,
        rtol=0,
    )
    n = freeze_all_but_last_layers(model, encoder.blocks, 1)
    assert n == sum(p.numel() for p in encoder.blocks[-1].parameters())
    assert not encoder.wte.weight.requires_grad and not model.head.weight.requires_grad
    with pytest.raises(ValueError, match="trainable"):
        freeze_all_but_last_layers(model, encoder.blocks, 7)
    with pytest.raises(ValueError, match="pooling"):
        C.SequenceClassifier(encoder, C.ClassifierConfig(384, 2, pooling="max"))


def test_sentiment_head_on_frozen_minilm_beats_majority(minilm):
    tokenizer, encoder = minilm
    data = load_sentiment("yelp")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).tolist()
    texts, labels = zip(*(data[i] for i in order[:384]), strict=True)
    batch = tokenizer(
        list(texts), padding=True, truncation=True, max_length=48, return_tensors="pt"
    )
    hidden = cached_states(encoder, batch["input_ids"], batch["attention_mask"])
    y = torch.tensor(labels)
    torch.manual_seed(0)
    model = C.SequenceClassifier(encoder, C.ClassifierConfig(384, 2, dropout=0.0))
    train_head(
        model.head,
        lambda s: F.cross_entropy(
            model.classify_hidden(hidden[s], batch["attention_mask"][s]), y[s]
        ),
        256,
        48,
        3e-2,
    )
    with torch.no_grad():
        predictions = model.classify_hidden(hidden[256:], batch["attention_mask"][256:]).argmax(-1)
    test_labels = labels[256:]
    majority = max(sum(test_labels), len(test_labels) - sum(test_labels)) / len(test_labels)
    assert accuracy(predictions.tolist(), test_labels) > majority + 0.2
    # the end-to-end path gives the same predictions as the head on cached states
    assert C.predict_labels(model, tokenizer, list(texts[256:288]), max_length=48) == (
        predictions[:32].tolist()
    )


def test_bag_of_words_baseline_learns():
    data = load_sentiment("yelp")
    texts, labels = zip(*data, strict=True)
    model = C.bag_of_words_baseline(list(texts[::2]), list(labels[::2]))
    assert accuracy(model.predict(list(texts[1::2])).tolist(), labels[1::2]) > 0.7
    with pytest.raises(ValueError, match="differ"):
        C.bag_of_words_baseline(["a"], [0, 1])


def test_align_labels_hand_worked(minilm):
    tokenizer, _ = minilm
    words = ["Empire", "Statezz", "@user", "!"]
    enc = tokenizer(words, is_split_into_words=True)
    # [CLS] empire state ##zz @ user ! [SEP]: label only each word's first piece
    assert enc.tokens() == ["[CLS]", "empire", "state", "##zz", "@", "user", "!", "[SEP]"]
    labels = N.align_labels(enc.word_ids(), [7, 8, 9, 0])
    assert labels == [-100, 7, 8, -100, 9, -100, 0, -100]
    assert N.word_predictions(enc.word_ids(), [5, 7, 8, 1, 9, 2, 0, 3]) == [7, 8, 9, 0]
    with pytest.raises(ValueError, match="out of range"):
        N.align_labels(enc.word_ids(), [1, 2])
    with pytest.raises(ValueError, match="differ"):
        N.word_predictions(enc.word_ids(), [1])


def test_alignment_round_trips_on_wnut17(minilm):
    tokenizer, _ = minilm
    sentences = load_wnut17("dev")[:200]
    label_id = {name: i for i, name in enumerate(WNUT17_LABELS)}
    for words, tags in sentences:
        enc = tokenizer(words, is_split_into_words=True)
        ids = [label_id[t] for t in tags]
        aligned = N.align_labels(enc.word_ids(), ids)
        kept = [x for x in aligned if x != N.IGNORE_INDEX]
        assert kept == ids[: len(kept)]
        restored = N.word_predictions(enc.word_ids(), [max(x, 0) for x in aligned])
        assert restored == ids[: len(restored)]


def test_token_classifier_loss_and_training_beats_label_prior(minilm):
    tokenizer, encoder = minilm
    label_id = {name: i for i, name in enumerate(WNUT17_LABELS)}
    words, tags = zip(*load_wnut17("train")[:256], strict=True)
    batch = N.encode_tagged_sentences(
        tokenizer, list(words), [[label_id[t] for t in s] for s in tags], max_length=48
    )
    labels = batch["labels"]
    torch.manual_seed(0)
    model = N.TokenClassifier(encoder, N.TokenClassifierConfig(384, len(WNUT17_LABELS), 0.0))
    logits = model(batch["input_ids"][:4], batch["attention_mask"][:4])
    assert logits.shape == (4, batch["input_ids"].shape[1], len(WNUT17_LABELS))
    keep = labels[:4] != N.IGNORE_INDEX
    torch.testing.assert_close(
        model.loss(batch["input_ids"][:4], batch["attention_mask"][:4], labels[:4]),
        F.cross_entropy(logits[keep], labels[:4][keep]),
        atol=1e-6,
        rtol=0,
    )
    with pytest.raises(ValueError, match="labels"):
        N.token_classification_loss(logits, labels[:4, :3])
    # fine-tune the last block and the head on cached states of the five frozen blocks
    tuned = copy.deepcopy(encoder)
    top = TopLayers(tuned, 1)
    states = frozen_prefix_states(tuned, batch["input_ids"], batch["attention_mask"], 1)
    mask = batch["attention_mask"]
    trainable = nn.ModuleList([top, model.head])
    train_head(
        trainable,
        lambda s: N.token_classification_loss(
            model.classify_hidden(top(states[s], mask[s])), labels[s]
        ),
        192,
        48,
        1e-3,
    )
    with torch.no_grad():
        hidden = top(states[192:], mask[192:])
        loss = N.token_classification_loss(model.classify_hidden(hidden), labels[192:])
        real = mask[192:].bool()  # padding positions are not compared: nothing reads them
        torch.testing.assert_close(
            hidden[real], encode(tuned, batch["input_ids"][192:], mask[192:])[real],
            atol=1e-5, rtol=1e-5,
        )  # prefix + top layers == whole encoder, whatever each chunk's cut width  # fmt: skip
    seen = labels[:192][labels[:192] != N.IGNORE_INDEX]
    prior = torch.bincount(seen, minlength=len(WNUT17_LABELS)).float() + 1
    target = labels[192:][labels[192:] != N.IGNORE_INDEX]
    prior_loss = F.cross_entropy(prior.log().expand(len(target), -1), target)
    assert loss < 0.8 * prior_loss  # beats predicting the label frequencies everywhere


def test_predict_tags_matches_one_sentence_at_a_time(minilm):
    """Batched, padded tagging == each sentence tokenized and tagged alone; words cut off by
    max_length get "O"."""
    tokenizer, encoder = minilm
    torch.manual_seed(0)
    model = N.TokenClassifier(encoder, N.TokenClassifierConfig(384, len(WNUT17_LABELS), 0.0))
    sentences = [list(words) for words, _ in load_wnut17("train")[:5]]
    sentences.append(["word"] * 40)  # longer than max_length: the tail is truncated
    tags = N.predict_tags(model, tokenizer, sentences, WNUT17_LABELS, batch_size=4, max_length=24)
    for words, predicted in zip(sentences, tags, strict=True):
        split = {"is_split_into_words": True, "truncation": True, "max_length": 24}
        alone = tokenizer(words, return_tensors="pt", **split)
        with torch.no_grad():
            ids = model(alone["input_ids"], alone["attention_mask"]).argmax(-1)[0].tolist()
        per_word = N.word_predictions(alone.word_ids(0), ids)
        per_word += [0] * (len(words) - len(per_word))
        assert predicted == [WNUT17_LABELS[k] for k in per_word]
    assert tags[-1][-1] == WNUT17_LABELS[0] == "O"


@pytest.fixture(scope="module")
def squad():
    return [q for q in load_squad2_dev() if not q["is_impossible"]]


def test_char_span_to_tokens_recovers_answers(minilm, squad):
    tokenizer, _ = minilm
    sample = squad[:300]
    batch = Q.encode_qa(
        tokenizer,
        [q["question"] for q in sample],
        [q["context"] for q in sample],
        [q["answers"][0] for q in sample],
        max_length=384,
    )
    found = 0
    spans = torch.stack([batch.start_positions, batch.end_positions], dim=-1)
    texts = Q.span_texts(batch, spans, [q["context"] for q in sample])
    for i, q in enumerate(sample):
        first, last = batch.start_positions[i].item(), batch.end_positions[i].item()
        if first == 0:
            continue  # answer truncated away
        found += 1
        text = q["context"][batch.offsets[i][first][0] : batch.offsets[i][last][1]]
        assert texts[i] == text
        assert squad_normalize(text) == squad_normalize(q["answers"][0]["text"]), q["id"]
    assert found > 0.9 * len(sample)
    with pytest.raises(ValueError, match="spans"):
        Q.span_texts(batch, spans[:3], [q["context"] for q in sample])
    assert Q.char_span_to_tokens([(0, 0), (0, 3), (4, 9)], [None, 1, 1], 4, 9) == (2, 2)
    assert Q.char_span_to_tokens([(0, 0), (0, 3), (4, 9)], [None, 1, 1], 4, 12) is None
    with pytest.raises(ValueError, match="empty answer"):
        Q.char_span_to_tokens([(0, 3)], [1], 2, 2)


def test_best_spans_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    start, end = torch.randn(5, 12, generator=g), torch.randn(5, 12, generator=g)
    context = torch.rand(5, 12, generator=g) > 0.3
    spans = Q.best_spans(start, end, context, max_answer_tokens=4)
    for b in range(5):
        candidates = [
            (start[b, i] + end[b, j], i, j)
            for i in range(12)
            for j in range(i, i + 4)
            if j < 12 and context[b, i] and context[b, j]
        ]
        _, i, j = max(candidates)
        assert spans[b].tolist() == [i, j]
    with pytest.raises(ValueError, match="share"):
        Q.best_spans(start, end[:, :5], context)


def test_span_head_loss_and_training_beats_uniform(minilm, squad):
    tokenizer, encoder = minilm
    sample = squad[:320]
    batch = Q.encode_qa(
        tokenizer,
        [q["question"] for q in sample],
        [q["context"] for q in sample],
        [q["answers"][0] for q in sample],
        max_length=160,
    )
    torch.manual_seed(0)
    model = Q.SpanHead(encoder, 384)
    sub = batch[:3]
    start, end = model(sub.input_ids, sub.attention_mask, sub.token_type_ids)
    assert start.shape == end.shape == sub.input_ids.shape
    expected = (
        F.cross_entropy(start, sub.start_positions) + F.cross_entropy(end, sub.end_positions)
    ) / 2
    torch.testing.assert_close(model.loss(sub), expected, atol=1e-6, rtol=0)
    hidden = cached_states(encoder, batch.input_ids, batch.attention_mask, batch.token_type_ids)

    def loss_of(s):
        return Q.span_loss(
            *model.span_logits(hidden[s]), batch.start_positions[s], batch.end_positions[s]
        )

    train_head(model.head, loss_of, 256, 48, 1e-2)
    with torch.no_grad():
        loss = loss_of(slice(256, 320)).item()
    uniform = batch[256:].context_mask.sum(1).float().log().mean().item()  # any context token
    assert loss < uniform - 0.25, (loss, uniform)  # measured: 4.25 vs 4.63


def test_real_width_and_length_buckets():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    assert real_width(mask) == 3
    assert real_width(torch.tensor([[0, 1, 1, 1]])) == 4  # left padding: nothing to cut
    lengths = [5, 1, 4, 2, 3, 6, 1]
    batches = length_buckets(lengths, 2, torch.Generator().manual_seed(0))
    assert sorted(torch.cat(batches).tolist()) == list(range(7))  # each index exactly once
    by_length = sorted(sorted(lengths[i] for i in b.tolist()) for b in batches)
    assert by_length == [[1, 1], [2, 3], [4, 5], [6]]  # neighbours in length share a batch
    with pytest.raises(ValueError, match="batch_size"):
        length_buckets(lengths, 0)


def test_frozen_prefix_cuts_padding_without_changing_real_states(minilm):
    tokenizer, encoder = minilm[0], copy.deepcopy(minilm[1]).eval()  # other tests train it
    texts = ["a short one", "a much longer sentence with many more words in it", "mid size text"]
    batch = tokenizer(texts, padding="max_length", max_length=24, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    states = frozen_prefix_states(encoder, ids, mask, 2, chunk=1)  # one width per sentence
    encoder.blocks, all_blocks = encoder.blocks[:4], encoder.blocks
    try:
        reference = encode(encoder, ids, mask)  # the four bottom blocks on the full width
    finally:
        encoder.blocks = all_blocks
    real = mask.bool()
    torch.testing.assert_close(states[real], reference[real], atol=1e-5, rtol=1e-5)
    assert (states[~real] == 0).all()
    assert len(encoder.blocks) == 6
    top = TopLayers(encoder, 2)
    final = top_layer_states(top, states, mask, chunk=2)
    torch.testing.assert_close(final[real], encode(encoder, ids, mask)[real], atol=1e-5, rtol=1e-5)


def test_fit_bucketed_matches_a_hand_written_adamw_loop():
    torch.manual_seed(0)
    x, y = torch.randn(10, 3), torch.randn(10)
    model, twin = nn.Linear(3, 1), nn.Linear(3, 1)
    twin.load_state_dict(model.state_dict())
    lengths = [3, 1, 2, 2, 5, 4, 1, 3, 2, 4]

    def loss_of(m):
        return lambda index: F.mse_loss(m(x[index])[:, 0], y[index])

    losses = fit_bucketed(model, loss_of(model), lengths, epochs=3, batch_size=4, lr=0.05)
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(twin.parameters(), lr=0.05)
    expected = []
    for _ in range(3):
        for index in length_buckets(lengths, 4, generator):
            loss = loss_of(twin)(index)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            expected.append(loss.item())
    assert losses == pytest.approx(expected, abs=1e-6)
    torch.testing.assert_close(model.weight, twin.weight, atol=1e-6, rtol=0)
    assert losses[-1] < losses[0] and not model.training
