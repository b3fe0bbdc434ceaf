"""utils.tasks translation, multimodal, summarization, text_generation and serving helpers:
hand-worked cases, closed forms and equality with the plain model calls (atol=1e-5)."""

import math

import pytest
import torch
import torch.nn.functional as F

from utils.generation import generate
from utils.tasks import multimodal as MM
from utils.tasks import serving as SV
from utils.tasks import summarization as SU
from utils.tasks import translation as TR
from utils.tasks.text_generation import complete
from utils.transformer import GPT, GPTConfig, Transformer, TransformerConfig

PAIRS = [("I am cold.", "J'ai froid."), ("Go away!", "Va-t'en !"), ("Thanks.", "Merci.")]


@pytest.fixture(scope="module")
def tiny_translator():
    torch.manual_seed(0)
    tokenizer = TR.train_shared_bpe(PAIRS * 3, 300)
    config = TransformerConfig(
        src_vocab_size=tokenizer.vocab_size, tgt_vocab_size=tokenizer.vocab_size, block_size=64,
        n_encoder_layer=1, n_decoder_layer=2, n_head=2, n_embd=32, ffn_dim=64, dropout=0.0,
    )  # fmt: skip
    return tokenizer, Transformer(config).eval()


def test_encode_pairs_layout(tiny_translator):
    tokenizer, _ = tiny_translator
    pad, bos, eos = (tokenizer.special_tokens[t] for t in (TR.PAD, TR.BOS, TR.EOS))
    batch = TR.encode_pairs(tokenizer, PAIRS)
    first_tgt = tokenizer.encode("J'ai froid.")
    assert batch.tgt_in[0, : len(first_tgt) + 1].tolist() == [bos, *first_tgt]
    assert batch.tgt_out[0, : len(first_tgt) + 1].tolist() == [*first_tgt, eos]
    assert batch.src[2].tolist()[: len(tokenizer.encode("Thanks.")) + 1] == [
        *tokenizer.encode("Thanks."),
        eos,
    ]
    assert (batch.tgt_in == pad).sum() == (batch.tgt_out == pad).sum()
    assert batch.src.shape[0] == batch.tgt_in.shape[0] == 3


def test_packed_model_loss_and_bound_decoder_match_plain_calls(tiny_translator):
    tokenizer, model = tiny_translator
    pad = tokenizer.special_tokens[TR.PAD]
    batch = TR.encode_pairs(tokenizer, PAIRS)
    packed = TR.PackedSeq2Seq(model, batch.src.shape[1], pad)
    logits = packed(TR.pack(batch))
    expected = model(
        batch.src,
        batch.tgt_in,
        src_attention_mask=batch.src != pad,
        tgt_attention_mask=batch.tgt_in != pad,
    )
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    keep = batch.tgt_out != pad
    expected_loss = F.cross_entropy(logits[keep], batch.tgt_out[keep])
    torch.testing.assert_close(
        TR.seq2seq_loss(pad)(logits, batch.tgt_out), expected_loss, atol=1e-6, rtol=0
    )
    # the bound decoder is the decoder of one source sentence: same logits as the full model
    src, tgt = batch.src[:1], batch.tgt_in[:1, :4]
    mask = src != pad
    decoder = TR.BoundDecoder(model, model.encode(src, src_attention_mask=mask), mask)
    with torch.no_grad():
        torch.testing.assert_close(
            decoder(tgt.expand(2, -1))[0],
            model(src, tgt, src_attention_mask=mask)[0],
            atol=1e-5,
            rtol=0,
        )
        cached = generate(decoder, tgt, 6, use_cache=True)
        uncached = generate(decoder, tgt, 6, use_cache=False)
    assert cached.tolist() == uncached.tolist()
    assert isinstance(TR.translate(model, tokenizer, "I am cold.", 5, num_beams=2), str)


def test_translation_training_beats_unigram_baseline(tiny_translator):
    from utils.training import TrainConfig, Trainer

    tokenizer, model = tiny_translator
    pad = tokenizer.special_tokens[TR.PAD]
    batch = TR.encode_pairs(tokenizer, PAIRS)
    packed = TR.PackedSeq2Seq(model, batch.src.shape[1], pad)
    x = TR.pack(batch)
    config = TrainConfig(max_iters=150, lr=1e-2, warmup_iters=10, progress=False, eval_interval=0)
    trainer = Trainer(packed, config, lambda: (x, batch.tgt_out), loss_fn=TR.seq2seq_loss(pad))
    trainer.fit()
    targets = batch.tgt_out[batch.tgt_out != pad]
    counts = torch.bincount(targets).float()
    unigram = -(counts[targets] / counts.sum()).log().mean().item()  # best context-free model
    assert trainer.history.train_loss[-1] < 0.5 * unigram
    assert TR.translate(model, tokenizer, "I am cold.") == "J'ai froid."


def test_contrastive_loss_closed_form_and_errors():
    logits = torch.tensor([[2.0, 0.0], [1.0, 3.0]])
    row = (
        -(
            math.log(math.exp(2) / (math.exp(2) + 1))
            + math.log(math.exp(3) / (math.exp(1) + math.exp(3)))
        )
        / 2
    )
    col = (
        -(
            math.log(math.exp(2) / (math.exp(2) + math.exp(1)))
            + math.log(math.exp(3) / (1 + math.exp(3)))
        )
        / 2
    )
    assert MM.contrastive_loss(logits).item() == pytest.approx((row + col) / 2, abs=1e-6)
    with pytest.raises(ValueError, match="square"):
        MM.contrastive_loss(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="outside"):
        MM.caption_ids("a purple circle")


def test_shapes_are_deterministic_and_tiny_clip_learns():
    images, labels = MM.make_shapes(8, size=16, seed=3)
    again, _ = MM.make_shapes(8, size=16, seed=3)
    assert images.shape == (8, 3, 16, 16) and torch.equal(images, again)
    assert labels.max() < len(MM.class_captions())
    torch.manual_seed(0)
    model = MM.TinyCLIP(MM.CLIPConfig(n_embd=16, projection_dim=16))
    train_images, train_labels = MM.make_shapes(512, seed=0)
    ids = torch.tensor([MM.caption_ids(c) for c in MM.class_captions()])
    assert model(train_images[:4], ids[train_labels[:4]]).shape == (4, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(80):
        idx = torch.randperm(512, generator=g)[:32]
        loss = MM.contrastive_loss(model(train_images[idx], ids[train_labels[idx]]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    test_images, test_labels = MM.make_shapes(240, seed=1)
    predictions = MM.zero_shot_classify(model, test_images, MM.class_captions())
    chance = 1 / len(MM.class_captions())
    assert (predictions == test_labels).float().mean() > 3 * chance


def test_split_sentences_and_centrality():
    assert SU.split_sentences("Dr. who? Yes. It was 1989. ok then") == [
        "Dr. who?",
        "Yes.",
        "It was 1989. ok then",  # no split before a lower-case word
    ]
    torch.manual_seed(0)
    embeddings = F.normalize(torch.rand(6, 8), dim=-1)  # positive similarities
    scores = SU.centrality(embeddings, threshold=-1.0, iterations=200)
    # closed form: the stationary vector of the damped transition matrix (eigenvalue 1)
    sim = embeddings @ embeddings.T
    transition = sim / sim.sum(1, keepdim=True)
    google = (1 - 0.85) / 6 + 0.85 * transition.T
    values, vectors = torch.linalg.eig(google.double())
    stationary = vectors[:, values.real.argmax()].real
    torch.testing.assert_close(scores.double(), stationary / stationary.sum(), atol=1e-5, rtol=0)
    sentences = [f"s{i}" for i in range(6)]
    summary = SU.extractive_summary(sentences, embeddings, k=2)
    top = scores.topk(2).indices.sort().values.tolist()
    assert summary == f"s{top[0]} s{top[1]}"
    with pytest.raises(ValueError, match="embeddings"):
        SU.centrality(torch.zeros(3))


def test_complete_equals_generate():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=10, block_size=32, n_layer=1, n_head=2, n_embd=16)).eval()
    text = complete(
        model, lambda s: [int(c) for c in s], lambda ids: "".join(map(str, ids)), "123", 5
    )
    expected = generate(model, torch.tensor([[1, 2, 3]]), 5)[0, 3:].tolist()
    assert text == "".join(map(str, expected))


def test_pad_batch_and_padding_fraction():
    ids, mask = SV.pad_batch([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[True, True, True], [False, False, True]]
    ids, mask = SV.pad_batch([[5, 6, 7], [8]], pad_id=0, side="right")
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert SV.padding_fraction([3, 1, 2, 2], 2) == pytest.approx(1 - 8 / 10)
    with pytest.raises(ValueError, match="side"):
        SV.pad_batch([[1]], 0, side="middle")
    with pytest.raises(ValueError, match="non-empty"):
        SV.pad_batch([[]], 0)
    timing = SV.measure(lambda: sum(range(1000)), items=10, repeats=3)
    assert timing.median_s > 0 and timing.items_per_s == pytest.approx(10 / timing.median_s)
