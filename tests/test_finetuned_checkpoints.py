"""The fine-tuned QA and NER artifacts (``scripts/finetune_qa.py``, ``scripts/finetune_ner.py``)
and the pieces of ``utils.tasks.finetuned`` they are made with.

Each artifact is loaded (its sha256 checked against the JSON beside it) and re-scored on the
fixed subset its JSON records: SQuAD F1 on 100 held-out questions and WNUT-17 entity F1 on 200
test sentences must equal the recorded values within 0.01 (one of 100 questions flipping its
answer, e.g. from a different thread count's float rounding, moves F1 by at most 0.01).
"""

import copy
import json

import pytest
import torch

from utils.data import load_squad2_dev, load_wnut17
from utils.lora import LoRALinear
from utils.tasks.finetuned import (
    NER_ARTIFACT,
    QA_ARTIFACT,
    BucketedBatches,
    OnCachedStates,
    add_lora,
    cached_prefix,
    encode_qa_windows,
    fixed_subset,
    json_path,
    load_ner_model,
    load_qa_model,
    minilm_span_head,
    predict_answers,
    qa_scores,
    question_type,
    span_scores,
    squad_article_split,
)
from utils.tasks.metrics import entity_f1
from utils.tasks.ner import predict_tags
from utils.tasks.qa import best_spans

TOLERANCE = 0.01


@pytest.fixture(scope="module")
def squad():
    return squad_article_split(load_squad2_dev())


# -- the data split --------------------------------------------------------------------------


def test_article_split_holds_out_whole_articles(squad):
    train, held_out = squad
    train_titles, held_titles = {q["title"] for q in train}, {q["title"] for q in held_out}
    assert (len(train_titles), len(held_titles)) == (10, 6)
    assert not train_titles & held_titles
    assert (len(train), len(held_out)) == (1836, 1074)  # all 2,910 answerable questions
    assert all(q["answers"] for q in train + held_out)
    assert held_titles == set(sorted(train_titles | held_titles)[-6:])


def test_fixed_subset_spreads_evenly():
    assert fixed_subset(list(range(10)), 3) == [0, 3, 6]
    with pytest.raises(ValueError, match="size"):
        fixed_subset([1, 2], 3)


def test_question_types():
    assert question_type("How many people live in Warsaw?") == "how many"
    assert question_type("How did the war end?") == "how"
    assert question_type("In what year did it end?") == "what"
    assert question_type("Name the river.") == "other"


# -- batches, windows and spans ----------------------------------------------------------------


def test_bucketed_batches_cover_each_example_once_and_resume_exactly():
    lengths = [3, 1, 4, 1, 5, 2, 6, 2, 3]
    x = torch.arange(9).view(9, 1, 1).expand(9, 6, 2).clone()
    batches = BucketedBatches(x, torch.arange(9), lengths, batch_size=2, seed=0)
    epoch = [batches() for _ in range(batches.steps_per_epoch())]
    assert sorted(torch.cat([y for _, y in epoch]).tolist()) == list(range(9))
    for bx, y in epoch:  # cut to the longest real length of the batch
        assert bx.shape[1] == max(lengths[i] for i in y.tolist())
    state = copy.deepcopy(batches.state_dict())
    ahead = [batches()[1].tolist() for _ in range(3)]
    batches.load_state_dict(state)
    assert [batches()[1].tolist() for _ in range(3)] == ahead


def test_span_scores_agree_with_best_spans():
    torch.manual_seed(0)
    start, end = torch.randn(4, 20), torch.randn(4, 20)
    context = torch.zeros(4, 20, dtype=torch.bool)
    context[:, 5:18] = True
    spans, scores = span_scores(start, end, context, max_answer_tokens=4)
    assert torch.equal(spans, best_spans(start, end, context, max_answer_tokens=4))
    rows = torch.arange(4)
    torch.testing.assert_close(scores, start[rows, spans[:, 0]] + end[rows, spans[:, 1]])


def test_stride_windows_keep_every_answer(squad):
    from utils.pretrained import load_minilm

    tokenizer = load_minilm()[1]
    questions = sorted(squad[0], key=lambda q: -len(q["context"]))[:20]  # the longest contexts
    windows, example = encode_qa_windows(tokenizer, questions, max_length=128, stride=48)
    assert len(windows.input_ids) > len(questions)  # long contexts need several windows
    for q in range(len(questions)):
        rows = (example == q).nonzero().flatten().tolist()
        found = [r for r in rows if windows.start_positions[r] > 0]
        assert found, "the answer must lie wholly inside at least one window"
        r = found[0]
        first, last = windows.start_positions[r].item(), windows.end_positions[r].item()
        text = questions[q]["context"][windows.offsets[r][first][0] : windows.offsets[r][last][1]]
        assert text.strip().lower() == questions[q]["answers"][0]["text"].strip().lower()


def test_cached_prefix_plus_top_blocks_equals_the_whole_model(squad):
    from utils.pretrained import load_minilm

    tokenizer = load_minilm()[1]
    model = minilm_span_head().eval()
    add_lora(model, rank=4, alpha=8.0, blocks=[3, 4, 5])
    with torch.no_grad():  # make the adapters non-trivial
        for layer in model.modules():
            if isinstance(layer, LoRALinear):
                layer.lora_B.normal_(0, 0.02)
    windows, _ = encode_qa_windows(tokenizer, squad[1][:6], max_length=128, stride=48)
    x = torch.stack([windows.input_ids, windows.attention_mask, windows.token_type_ids], -1)
    wrapped = OnCachedStates(model, 3, model.span_logits).eval()
    with torch.no_grad():
        cached_start, _ = wrapped(cached_prefix(model.encoder, x, 3))
        start, _ = model(windows.input_ids, windows.attention_mask, windows.token_type_ids)
    real = windows.attention_mask.bool()
    torch.testing.assert_close(cached_start[real], start[real], atol=1e-5, rtol=0)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".blocks.3." in n or ".blocks.4." in n or ".blocks.5." in n or n.startswith("head")
               for n in trained)  # fmt: skip


# -- the artifacts -----------------------------------------------------------------------------


@pytest.mark.parametrize("artifact", [QA_ARTIFACT, NER_ARTIFACT], ids=["qa", "ner"])
def test_artifact_is_small_and_recorded(artifact):
    info = json.loads(json_path(artifact).read_text())
    assert artifact.stat().st_size == info["artifact"]["bytes"] <= 10 * 2**20
    assert info["versions"]["threads"] == info["recipe"]["threads"]


def test_qa_artifact_reproduces_its_subset_f1(squad):
    model, tokenizer, info = load_qa_model()
    subset = fixed_subset(squad[1], 100)
    scores = qa_scores(predict_answers(model, tokenizer, subset, **info["predict"]), subset)
    recorded = info["metrics"]["subset"]["overall"]
    assert scores["overall"]["f1"] == pytest.approx(recorded["f1"], abs=TOLERANCE)
    assert info["metrics"]["held_out"]["overall"]["n"] == 1074
    assert info["data"]["held_out_articles"] == sorted({q["title"] for q in squad[1]})


def test_ner_artifact_reproduces_its_subset_f1():
    model, tokenizer, info = load_ner_model()
    subset = fixed_subset(load_wnut17("test"), 200)
    words, gold = map(list, zip(*subset, strict=True))
    predicted = predict_tags(model, tokenizer, words, info["labels"], **info["predict"])
    f1 = entity_f1(predicted, gold)["overall"].f1
    assert f1 == pytest.approx(info["metrics"]["subset"]["overall"]["f1"], abs=TOLERANCE)


def test_loading_rejects_a_changed_artifact(tmp_path):
    copy_path = tmp_path / QA_ARTIFACT.name
    copy_path.write_bytes(QA_ARTIFACT.read_bytes() + b"\0")
    json_path(copy_path).write_text(json_path(QA_ARTIFACT).read_text())
    with pytest.raises(ValueError, match="sha256"):
        load_qa_model(copy_path)
