"""utils.generation against Hugging Face `generate` and logits processors.

Small random GPT-2 and Llama models from Hugging Face configs, with their weights copied
into ours (utils.hf_weights). Greedy decoding and beam search must give exactly the same
tokens as `generate` with `do_sample=False`; the filters must keep exactly the tokens
Hugging Face's warpers keep. Runs in about 15 s.
"""

import warnings

import pytest
import torch
import transformers
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from utils.generation import (
    beam_search,
    generate,
    next_token_distribution,
    stream,
    to_decoding_layout,
    top_k_filter,
    top_p_filter,
)
from utils.hf_weights import from_hf
from utils.transformer import GPT

VOCAB = 64


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one thread is faster, and immune to OpenMP spin-waiting on a
    busy machine (where two threads made each small matmul take milliseconds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def with_frequent_eos(hf):
    """Use as end-of-sequence the token the model most often produces greedily, so that
    decoding really stops early (a random model rarely picks any fixed id) and the
    end-of-sequence rules of both implementations are exercised."""
    idx = torch.randint(VOCAB, (8, 4), generator=torch.Generator().manual_seed(100))
    continuation = generate(from_hf(hf).eval(), idx, 12)[:, 4:]
    eos = int(torch.bincount(continuation.flatten()).argmax())
    hf.generation_config.eos_token_id = hf.generation_config.pad_token_id = eos
    hf.generation_config.bos_token_id = None
    return hf


@pytest.fixture(scope="module")
def hf_gpt2(one_thread):
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, initializer_range=0.2,
        bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    return with_frequent_eos(transformers.GPT2LMHeadModel(config).eval())


@pytest.fixture(scope="module")
def hf_llama(one_thread):
    torch.manual_seed(1)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        initializer_range=0.2, bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    return with_frequent_eos(transformers.LlamaForCausalLM(config).eval())


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def pair(request, hf_gpt2, hf_llama):
    hf = hf_gpt2 if request.param == "gpt2" else hf_llama
    return hf, from_hf(hf).eval()


def eos_of(hf) -> int:
    return hf.generation_config.eos_token_id


def prompts(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- filters


def random_logits(seed: int) -> torch.Tensor:
    return 3 * torch.randn(8, 100, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_keeps_exactly_the_smallest_set_with_mass_p(p):
    logits = random_logits(0)
    kept = top_p_filter(logits, p) > float("-inf")
    probs = logits.softmax(-1)
    for row in range(len(logits)):
        size = int(kept[row].sum())
        top = probs[row].topk(size)
        assert set(top.indices.tolist()) == set(kept[row].nonzero()[:, 0].tolist())
        assert top.values.sum() >= p  # enough mass ...
        assert top.values[:-1].sum() < p  # ... and one token fewer would not be
    hf_kept = TopPLogitsWarper(p)(None, logits.clone()) > float("-inf")
    assert torch.equal(kept, hf_kept)


@pytest.mark.parametrize("k", [1, 5, 100, 1000])
def test_top_k_matches_hugging_face(k):
    logits = random_logits(1)
    expected = TopKLogitsWarper(k)(None, logits.clone())
    assert torch.equal(top_k_filter(logits, k), expected)


def test_next_token_distribution_matches_hugging_face_warpers():
    logits = random_logits(2)
    warped = logits.clone()
    for warper in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(20), TopPLogitsWarper(0.8)):
        warped = warper(None, warped)
    ours = next_token_distribution(logits, temperature=0.7, top_k=20, top_p=0.8)
    torch.testing.assert_close(ours, warped.softmax(-1), atol=1e-6, rtol=0)
    assert torch.allclose(ours.sum(-1), torch.ones(8))


def test_filters_reject_bad_arguments():
    logits = random_logits(3)
    with pytest.raises(ValueError, match="top_p"):
        top_p_filter(logits, 0.0)
    with pytest.raises(ValueError, match="top_k"):
        top_k_filter(logits, 0)
    with pytest.raises(ValueError, match="temperature"):
        next_token_distribution(logits, temperature=0.0)
    with pytest.raises(TypeError, match="floating-point"):
        top_k_filter(logits.long(), 3)


# --------------------------------------------------------------------------- decoding


def test_cached_and_uncached_decoding_give_the_same_tokens(pair):
    _, ours = pair
    idx = prompts(3, 7, seed=0)
    greedy = generate(ours, idx, 30)
    assert torch.equal(greedy, generate(ours, idx, 30, use_cache=False))
    sampled = [
        generate(ours, idx, 30, do_sample=True, temperature=0.8, top_k=40, top_p=0.95,
                 use_cache=cache, generator=torch.Generator().manual_seed(5))
        for cache in (True, False)
    ]  # fmt: skip
    assert torch.equal(*sampled)


def test_greedy_matches_hugging_face_generate(pair):
    hf, ours = pair
    idx = prompts(4, 6, seed=1)
    ones = torch.ones_like(idx)
    expected = hf.generate(idx, attention_mask=ones, max_new_tokens=40, do_sample=False)
    ours_out = generate(ours, idx, 40, stop_tokens=[eos_of(hf)])
    assert torch.equal(ours_out, expected)
    # HF stops every row at its EOS and pads it with pad_token_id (= EOS here), as we do
    assert (ours_out[:, 6:] == eos_of(hf)).any()


@pytest.mark.parametrize("num_beams", [2, 4])
@pytest.mark.parametrize("length_penalty", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("early_stopping", [True, False])
def test_beam_search_matches_hugging_face_generate(
    hf_gpt2, hf_llama, num_beams, length_penalty, early_stopping
):
    """`generate(num_beams=n, do_sample=False)` with the same length penalty and stopping
    rule; `num_return_sequences=1` (the best finished hypothesis). Several prompts, so
    that some beams end on EOS before the length limit and some at it."""
    stopped_early = 0
    for hf in (hf_gpt2, hf_llama):
        ours = from_hf(hf).eval()
        for seed in range(4):
            idx = prompts(1, 4, seed=seed)
            expected = hf.generate(
                idx, attention_mask=torch.ones_like(idx), max_new_tokens=12, do_sample=False,
                num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
            )  # fmt: skip
            got = beam_search(
                ours, idx, 12, num_beams=num_beams, length_penalty=length_penalty,
                stop_tokens=[eos_of(hf)], early_stopping=early_stopping,
            )  # fmt: skip
            assert torch.equal(got, expected)
            stopped_early += got.shape[1] < 4 + 12
    if length_penalty <= 1.0:  # (a penalty > 1 favours long hypotheses)
        assert stopped_early > 0  # a hypothesis ending in EOS won: that rule was exercised


def test_beam_search_with_one_beam_is_greedy(hf_gpt2):
    ours = from_hf(hf_gpt2).eval()
    idx = prompts(1, 5, seed=7)
    assert torch.equal(beam_search(ours, idx, 15, num_beams=1), generate(ours, idx, 15))


def test_beam_search_runs_without_autograd(hf_gpt2):
    """No graph is built while searching: scores read with float() would warn otherwise."""
    ours = from_hf(hf_gpt2).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        beam_search(ours, prompts(1, 5, seed=7), 6, num_beams=3)


def test_decoding_layout_keeps_values_ties_and_tokens(pair):
    """Column-major weights: same shapes and values, ties kept, logits equal to float32
    rounding (atol 1e-5), and still exactly Hugging Face's greedy tokens."""
    hf, _ = pair
    ours = from_hf(hf).eval()  # a fresh copy: the change is in place
    idx = prompts(4, 6, seed=1)
    before = {name: p.clone() for name, p in ours.named_parameters()}
    with torch.no_grad():
        logits = ours(idx)
    assert to_decoding_layout(ours) is ours
    for name, p in ours.named_parameters():
        assert torch.equal(p, before[name]), name
    linears = [m for m in ours.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.weight.t().is_contiguous() for m in linears)
    if isinstance(ours, GPT):
        assert ours.lm_head.weight is ours.wte.weight
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), logits, atol=1e-5, rtol=0)
    expected = hf.generate(
        idx, attention_mask=torch.ones_like(idx), max_new_tokens=40, do_sample=False
    )
    assert torch.equal(generate(ours, idx, 40, stop_tokens=[eos_of(hf)]), expected)


def test_stream_yields_the_tokens_of_generate(pair):
    hf, ours = pair
    for seed in range(3):
        idx = prompts(1, 5, seed=seed)
        expected = generate(ours, idx, 25, stop_tokens=[eos_of(hf)])[0, 5:].tolist()
        assert list(stream(ours, idx, 25, stop_tokens=[eos_of(hf)])) == expected


def test_sampling_follows_the_next_token_distribution(hf_gpt2):
    ours = from_hf(hf_gpt2).eval()
    n = 4000
    idx = prompts(1, 5, seed=3).expand(n, 5)
    with torch.no_grad():
        probs = next_token_distribution(ours(idx[:1])[0, -1], temperature=1.5, top_k=10)
    first = generate(ours, idx, 1, do_sample=True, temperature=1.5, top_k=10,
                     generator=torch.Generator().manual_seed(0))[:, -1]  # fmt: skip
    counts = torch.bincount(first, minlength=VOCAB).float()
    assert counts[probs == 0].sum() == 0  # filtered tokens are never drawn
    bound = 5 * torch.sqrt(n * probs * (1 - probs)) + 1e-6
    assert ((counts - n * probs).abs() <= bound).all()


def test_decoding_rejects_bad_input(hf_gpt2):
    ours = from_hf(hf_gpt2).eval()
    idx = prompts(2, 5, seed=4)
    with pytest.raises(ValueError, match="block_size"):
        generate(ours, idx, 60)
    with pytest.raises(ValueError, match="LongTensor"):
        generate(ours, idx.float(), 3)
    with pytest.raises(ValueError, match="one prompt"):
        next(stream(ours, idx, 3))
    with pytest.raises(ValueError, match="one prompt"):
        beam_search(ours, idx, 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(ours, idx, 0)
