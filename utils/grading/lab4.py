"""Lab 4, LoRA and the DPO loss: a LoRA linear layer (forward, merge), response-only SFT labels
and loss, sequence log-probabilities, and the DPO loss with its implicit rewards.

References: the grader's float64 formulas (:mod:`utils.grading.reference_lab4`), autograd
through them for gradients, closed forms for the hand-sized examples; each computed before the
learner's code runs. ``peft``, ``trl`` and the course's own LoRA/SFT/DPO code
(``utils.lora``, ``utils.sft``, ``utils.dpo``; ``utils.objectives`` in the SFT parts) are
forbidden while learner code runs: importing them raises, and so does calling code that lives
in them (a profile hook watches which files the called code comes from).

Tolerances: float32 atol=1e-5 (rtol=1e-5) against float64; a LoRA layer at initialisation must
equal its base layer exactly (atol=0).
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from . import reference_lab4 as ref
from .core import (
    ForbiddenCall,
    Part,
    Submission,
    Test,
    describe,
    expect_close,
    expect_dtype_device,
    expect_finite,
    expect_shape,
    expect_signature,
    expect_tensor,
    expect_tuple,
    fail,
    random_tensor,
)

F32 = dict(atol=1e-5, rtol=1e-5)
IGNORE = ref.IGNORE_INDEX
ROOT = Path(__file__).resolve().parents[2]

# ------------------------------------------------------------------- forbidden packages

FORBIDDEN_PACKAGES = ("peft", "trl", "utils.lora", "utils.sft", "utils.dpo")
SFT_REFERENCES = ("utils.objectives",)  # the course's causal LM loss: forbidden in SFT parts
_setprofile, _getprofile = sys.setprofile, sys.getprofile


def _location(module: str) -> str | None:
    """The file (module) or folder (package) holding ``module``, without importing it."""
    if module.startswith("utils."):
        path = ROOT.joinpath(*module.split("."))
        return str(path) if path.is_dir() else f"{path}.py"
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    return spec.submodule_search_locations[0] if spec.submodule_search_locations else spec.origin


def _message(module: str) -> str:
    if module.startswith("utils."):
        return f"this part must not use the course's reference {module}: write it yourself"
    return f"this lab must not use `{module}`: the point is to write it yourself"


class _ImportBlocker:
    """A meta-path finder that makes ``import`` of the forbidden modules raise."""

    def __init__(self, modules: tuple[str, ...]) -> None:
        self.modules = modules

    def find_spec(self, name, path=None, target=None):
        for module in self.modules:
            if name == module or name.startswith(module + "."):
                raise ForbiddenCall(f"{_message(module)} (your code imports {name})")
        return None


@contextlib.contextmanager
def forbid_modules(modules: tuple[str, ...]) -> Iterator[None]:
    """While the block runs: importing ``modules`` raises :class:`ForbiddenCall` (they are
    hidden from ``sys.modules``, so an earlier import does not help), and so does entering any
    function whose code lives in their files (already-imported objects bound in a notebook)."""
    places = [(m, p) for m in modules if (p := _location(m))]
    verdicts: dict[str, str | None] = {}

    def owner(filename: str) -> str | None:
        if filename not in verdicts:
            verdicts[filename] = next(
                (m for m, p in places if filename == p or filename.startswith(p + os.sep)), None
            )
        return verdicts[filename]

    def profile(frame, event, arg):
        if event == "call" and (module := owner(frame.f_code.co_filename)):
            raise ForbiddenCall(f"{_message(module)} (your code called {frame.f_code.co_name})")

    hidden = {
        name: sys.modules.pop(name)
        for name in list(sys.modules)
        if any(name == m or name.startswith(m + ".") for m in modules)
    }
    blocker = _ImportBlocker(modules)
    sys.meta_path.insert(0, blocker)
    previous = _getprofile()
    _setprofile(profile)
    try:
        yield
    finally:
        _setprofile(previous)
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(blocker)
        sys.modules.update(hidden)


def call(sub: Submission, *args, fn=None, names=(), modules=FORBIDDEN_PACKAGES, **kwargs):
    """``sub.call`` with the forbidden packages blocked."""
    with forbid_modules(modules):
        return sub.call(*args, fn=fn, names=names, **kwargs)


def sft_call(sub: Submission, *args, fn=None, names=(), **kwargs):
    return call(sub, *args, fn=fn, names=names, modules=FORBIDDEN_PACKAGES + SFT_REFERENCES)


# ------------------------------------------------------------------------------- LoRA layer

IN, OUT, RANK, ALPHA = 12, 10, 4, 8.0
SCALING_HINT = (
    "The update is scaled by alpha / rank (here {alpha:g} / {rank} = {s:g}): "
    "out = base(x) + (alpha / r) * (x A^T) B^T."
)


def _base_linear(seed: int, bias: bool = True) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(IN, OUT, bias=bias)


def _build(sub: Submission, rank=RANK, alpha=ALPHA, bias=True, seed=0):
    base = _base_linear(seed, bias)
    torch.manual_seed(seed + 1)
    module = call(sub, base, rank, alpha)
    if not isinstance(module, nn.Module):
        fail(f"LoRALinear(base, rank, alpha) should build an nn.Module, got {describe(module)}")
    for name, shape in (("lora_A", (rank, IN)), ("lora_B", (OUT, rank))):
        factor = getattr(module, name, None)
        if not isinstance(factor, nn.Parameter) or tuple(factor.shape) != shape:
            got = describe(factor) if factor is not None else "nothing"
            fail(
                f"LoRALinear(nn.Linear({IN}, {OUT}), rank={rank}, alpha={alpha:g}) needs "
                f"`{name}`, an nn.Parameter of shape {shape} (A: rank x in_features, "
                f"B: out_features x rank, as peft stores them); got {got}"
            )
    if getattr(module, "base", None) is not base:
        fail("LoRALinear must keep the layer it adapts as `self.base` (the same object)")
    return module, base


def _forward(sub: Submission, module, x):
    out = call(sub, x, fn=module, names=("x",))
    return expect_tensor(out, "LoRALinear's output", "forward returns one tensor.")


def _set_b(module, seed: int) -> None:
    """Give the adapter a non-zero B, as training would (the grader's own write)."""
    with torch.no_grad():
        module.lora_B.copy_(random_tensor(*module.lora_B.shape, seed=seed, dtype=torch.float32))


def _expected(module, base, x, scaling):
    a, b = module.lora_A.detach(), module.lora_B.detach()
    return ref.lora_linear(x, base.weight.detach(), _bias(base), a, b, scaling)


def _bias(base):
    return None if base.bias is None else base.bias.detach()


def _scaling_mistakes(module, base, x, rank, alpha) -> dict:
    wrong = {
        "an update scaled by alpha alone: divide by the rank too": alpha,
        "an update without any scaling (alpha / r missing)": 1.0,
        "an update scaled by alpha / sqrt(r) (rsLoRA), not alpha / r": alpha / math.sqrt(rank),
        "an update scaled by r / alpha: the ratio is upside down": rank / alpha,
    }
    return {what: _expected(module, base, x, s) for what, s in wrong.items()}


def lora_tests() -> list[Test]:
    x3 = random_tensor(2, 5, IN, seed=10, dtype=torch.float32)

    def signature(sub):
        expect_signature(sub.obj, "class", "LoRALinear")

    def layers(sub):
        _build(sub)
        _build(sub, rank=2, alpha=16.0, bias=False)

    def shape_dtype(sub):
        module, _ = _build(sub)
        for x in (x3, x3[0]):
            out = _forward(sub, module, x)
            expect_shape(out, (*x.shape[:-1], OUT), f"LoRALinear's output for x {tuple(x.shape)}")
            expect_dtype_device(out, x, "LoRALinear's output")
            expect_finite(out, "LoRALinear's output")

    def starts_as_base(sub):
        module, base = _build(sub)
        with torch.no_grad():
            expected = base(x3)
        got = _forward(sub, module, x3)
        if not torch.equal(got.detach(), expected):
            error = (got.detach() - expected).abs().max().item()
            fail(
                f"at initialisation LoRALinear(base)(x) differs from base(x) by up to {error:.3g}: "
                "it must be *exactly* the base layer (atol=0), so fine-tuning starts from the "
                "pretrained model. Initialise lora_B to zeros (B A x = 0), lora_A randomly."
            )

    def initialisation(sub):
        module, _ = _build(sub)
        a, b = module.lora_A.detach(), module.lora_B.detach()
        if not bool((b == 0).all()):
            fail("lora_B must start at exactly zero (the paper's and peft's convention)")
        if bool((a == 0).all()):
            fail(
                "lora_A is all zeros: with A = 0 and B = 0 neither factor ever gets a gradient "
                "(dL/dB = s g (A x)^T = 0 and dL/dA = s B^T g x^T = 0), so nothing learns. "
                "Initialise A randomly (e.g. nn.init.kaiming_uniform_(A, a=math.sqrt(5)))."
            )
        if a.std() == 0:
            fail("lora_A is constant: initialise it randomly so its r directions differ")

    def trainable(sub):
        module, base = _build(sub)
        names = sorted(n for n, p in module.named_parameters() if p.requires_grad)
        if names != ["lora_A", "lora_B"]:
            fail(
                f"the trainable parameters are {names}; they must be exactly ['lora_A', "
                "'lora_B']: freeze the base layer (requires_grad_(False) on its weight and bias)"
            )
        grad_out = random_tensor(2, 5, OUT, seed=11, dtype=torch.float32)

        def forward_backward(x):
            out = module(x)
            if not isinstance(out, torch.Tensor) or out.grad_fn is None:
                fail("LoRALinear's output does not require grad: do not detach or use .data")
            out.backward(grad_out)
            return module.lora_A.grad, module.lora_B.grad

        grad_a, grad_b = call(sub, x3, fn=forward_backward, names=("x",))
        if base.weight.grad is not None or base.bias.grad is not None:
            fail("the base layer received a gradient: it must stay frozen")
        inputs = [t.detach().double().requires_grad_() for t in (module.lora_A, module.lora_B)]
        out = ref.lora_linear(x3, base.weight.detach(), _bias(base), *inputs, ALPHA / RANK)
        expected = torch.autograd.grad(out, inputs, grad_out.double())
        for name, g, e in zip(("lora_A", "lora_B"), (grad_a, grad_b), expected, strict=True):
            if g is None:
                fail(f"{name} received no gradient: the output must depend on it")
            expect_close(g, e, f"the gradient of {name} at initialisation", **F32)

    def forward(sub):
        for rank, alpha, bias, seed in ((RANK, ALPHA, True, 20), (2, 16.0, False, 30)):
            module, base = _build(sub, rank, alpha, bias, seed)
            _set_b(module, seed + 5)
            expected = _expected(module, base, x3, alpha / rank)
            expect_close(
                _forward(sub, module, x3),
                expected,
                f"LoRALinear(rank={rank}, alpha={alpha:g}, bias={bias}) with a non-zero B",
                **F32,
                hint=SCALING_HINT.format(alpha=alpha, rank=rank, s=alpha / rank),
                diagnoses=_scaling_mistakes(module, base, x3, rank, alpha),
            )

    def merge(sub):
        module, base = _build(sub, seed=40)
        _set_b(module, 45)
        before = _expected(module, base, x3, ALPHA / RANK)
        weight_before = base.weight.detach().clone()
        if not callable(getattr(module, "merge", None)):
            fail("LoRALinear needs a merge() method returning a new nn.Linear")
        merged = call(sub, fn=module.merge)
        if not isinstance(merged, nn.Linear):
            fail(f"merge() should return a new nn.Linear, got {describe(merged)}")
        if merged is base or merged.weight is base.weight:
            fail("merge() must return a *new* nn.Linear and leave this layer as it was")
        a, b = module.lora_A.detach(), module.lora_B.detach()
        expected = ref.merged_weight(weight_before, a, b, ALPHA / RANK)
        expect_close(
            merged.weight,
            expected,
            "the merged weight",
            **F32,
            hint="W' = W + (alpha / r) B A, of shape (out_features, in_features).",
            diagnoses={
                "W + B A: the merge forgets the alpha / r scaling": ref.merged_weight(
                    weight_before, a, b, 1.0
                ),
                "W + alpha B A: the merge scales by alpha, not alpha / r": ref.merged_weight(
                    weight_before, a, b, ALPHA
                ),
            },
        )
        if merged.bias is None or not torch.equal(merged.bias.detach(), base.bias.detach()):
            fail("the merged layer must keep the base layer's bias unchanged")
        got = call(sub, x3, fn=merged, names=("x",))
        expect_close(got, before, "merged(x) vs the LoRA layer's output", **F32)
        if not torch.equal(base.weight.detach(), weight_before):
            fail("merge() changed the base layer's weight: return a new layer instead")
        expect_close(_forward(sub, module, x3), before, "the LoRA layer after merge()", **F32)

    return [
        Test("signature: a class", 0, signature),
        Test("lora_A (r, in) and lora_B (out, r) parameters", 1, layers),
        Test("output shape, dtype, finite", 1, shape_dtype),
        Test("at initialisation equals the base layer exactly", 2, starts_as_base),
        Test("initialisation: B = 0, A random", 1, initialisation),
        Test("forward with a trained adapter: alpha / r scaling", 3, forward),
        Test("only lora_A and lora_B are trained; their gradients", 2, trainable),
        Test("merge(): W + (alpha / r) B A, a new exact layer", 2, merge),
    ]


# ------------------------------------------------------------------------------- SFT labels


def sft_labels_tests() -> list[Test]:
    ids = torch.tensor([[5, 6, 7, 8, 9, 0], [3, 4, 1, 2, 0, 0]])
    prompt_lengths = torch.tensor([2, 3])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]])

    def labels(sub, *args):
        out = sft_call(sub, *args, names=("input_ids", "prompt_lengths", "attention_mask"))
        return expect_tensor(out, "sft_labels's output")

    def wrong(prompt_shift=0, mask_prompt=True, mask_padding=True):
        positions = torch.arange(ids.shape[1])[None, :]
        keep = torch.ones_like(ids, dtype=torch.bool)
        if mask_prompt:
            keep &= positions >= prompt_lengths[:, None] + prompt_shift
        if mask_padding:
            keep &= attention_mask.bool()
        return torch.where(keep, ids, IGNORE)

    def signature(sub):
        expect_signature(sub.obj, "function", "sft_labels")

    def shape_dtype(sub):
        out = labels(sub, ids, prompt_lengths, attention_mask)
        expect_shape(out, (2, 6), "sft_labels(...) for input_ids of shape (2, 6)")
        if out.dtype != torch.long:
            fail(f"sft_labels returns dtype {out.dtype}, expected torch.int64 (token ids)")

    def values(sub):
        expected = ref.sft_labels(ids, prompt_lengths, attention_mask)
        expect_close(
            labels(sub, ids, prompt_lengths, attention_mask),
            expected,
            "labels for prompts of 2 and 3 tokens, right padding",
            atol=0,
            hint=f"Keep the ids of response tokens; prompt tokens and padding get {IGNORE}.",
            diagnoses={
                "labels with the prompt kept: the loss would train on the prompt": wrong(
                    mask_prompt=False
                ),
                "labels with the padding kept: the loss would train on padding": wrong(
                    mask_padding=False
                ),
                "labels that also hide the first response token (off by one)": wrong(1),
                "labels that keep the last prompt token (off by one)": wrong(-1),
            },
        )

    def boolean_mask(sub):
        expected = ref.sft_labels(ids, prompt_lengths, attention_mask)
        got = labels(sub, ids, prompt_lengths, attention_mask.bool())
        expect_close(got, expected, "labels with a boolean attention_mask", atol=0)

    return [
        Test("signature: a function", 0, signature),
        Test("shape and dtype", 1, shape_dtype),
        Test("prompt and padding get the ignore index", 2, values),
        Test("boolean attention_mask", 1, boolean_mask),
    ]


# ------------------------------------------------------------- SFT loss and sequence log-probs


def _batch(seed: int, batch=3, length=7, vocab=11, scale=2.0):
    """Random logits and labels with a prompt (IGNORE), a response and right padding."""
    logits = random_tensor(batch, length, vocab, seed=seed, dtype=torch.float32, scale=scale)
    gen = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(0, vocab, (batch, length), generator=gen)
    for row, (prompt, real) in enumerate(((2, 7), (3, 5), (1, 4))[:batch]):
        labels[row, :prompt] = IGNORE
        labels[row, real:] = IGNORE
    return logits, labels


def _hand():
    """One sequence, V = 3: positions 0-1 prompt, 2-3 response: predictions at 1 and 2."""
    logits = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [0.5, -1.0, 0.0], [2.0, 0.0, 0.0]]])
    labels = torch.tensor([[IGNORE, IGNORE, 2, 1]])

    def logp(row, token):
        values = logits[0, row].tolist()
        return values[token] - math.log(sum(math.exp(v) for v in values))

    return logits, labels, (logp(1, 2), logp(2, 1))


def _token_logprob_mistakes(logits, labels, reduce) -> dict:
    """What the usual mistakes give, each reduced by ``reduce(token_logprobs, kept)``."""
    unshifted = torch.log_softmax(logits.double(), -1)
    kept = labels != IGNORE
    picked = unshifted.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    no_shift = reduce(torch.where(kept, picked, 0.0), kept)
    token, kept = ref.shifted_token_logprobs(logits, labels)
    all_targets = torch.log_softmax(logits[:, :-1].double(), -1).gather(
        -1, labels[:, 1:].clamp(min=0)[..., None]
    )[..., 0]
    return {
        "no label shift: logits[:, t] must be scored against labels[:, t + 1]": no_shift,
        f"ignored positions scored as token 0: skip the labels equal to {IGNORE}": reduce(
            all_targets, torch.ones_like(kept)
        ),
    }


def _sft_mistakes(logits, labels) -> dict:
    token, kept = ref.shifted_token_logprobs(logits, labels)
    per_sequence = (token.sum(-1) / kept.sum(-1)).mean()
    return {
        **_token_logprob_mistakes(logits, labels, lambda t, k: -t.sum() / k.sum()),
        "a mean over every position, ignored ones included: divide by the number of "
        "response tokens": -token.sum() / token.numel(),
        "a mean of per-sequence means: average over all response tokens of the batch at "
        "once": -per_sequence,
    }


def _logprob_mistakes(logits, labels) -> dict:
    token, kept = ref.shifted_token_logprobs(logits, labels)
    return {
        **_token_logprob_mistakes(logits, labels, lambda t, k: t.sum(-1)),
        "the mean over response tokens: DPO needs the sum, log pi(y | x) = sum_t log "
        "pi(y_t | x, y_<t)": token.sum(-1) / kept.sum(-1),
    }


def _stable_hint(entry):
    return (
        f"Use torch.log_softmax (or F.cross_entropy) in {entry}: log(softmax(x)) underflows "
        "to log(0) = -inf for logits a few hundred apart, and exp(logits) overflows."
    )


def token_loss_tests(entry: str, sequence: bool) -> list[Test]:
    """Tests for ``sft_loss`` (``sequence=False``: a scalar mean) and ``sequence_logprobs``
    (``sequence=True``: one sum per sequence)."""
    reference = ref.sequence_logprobs if sequence else ref.sft_loss
    mistakes = _logprob_mistakes if sequence else _sft_mistakes
    what = f"{entry}(logits, labels)"

    def run(sub, logits, labels):
        out = sft_call(sub, logits, labels, names=("logits", "labels"))
        return expect_tensor(out, f"{entry}'s output")

    def signature(sub):
        expect_signature(sub.obj, "function", entry)

    def shape_dtype(sub):
        logits, labels = _batch(1)
        out = run(sub, logits, labels)
        expected = (3,) if sequence else ()
        hint = "One log-probability per sequence." if sequence else "Return a scalar (0-dim)."
        expect_shape(out, expected, f"{what} for logits (3, 7, 11)", hint)
        expect_dtype_device(out, logits, f"{entry}'s output")
        expect_finite(out, f"{entry}'s output")

    def hand(sub):
        logits, labels, (first, second) = _hand()
        total = first + second
        expected = torch.tensor([total]) if sequence else torch.tensor(-total / 2)
        expect_close(
            run(sub, logits, labels),
            expected,
            f"{what} for one sequence, V = 3, labels [{IGNORE}, {IGNORE}, 2, 1]",
            **F32,
            hint="Position t predicts token t + 1: here positions 1 and 2 predict 2 and 1.",
            diagnoses=mistakes(logits, labels),
        )

    def random(sub):
        for seed in (10, 20):
            logits, labels = _batch(seed)
            expect_close(
                run(sub, logits, labels),
                reference(logits, labels),
                f"{what} for a random batch with prompts and right padding (float64 reference)",
                **F32,
                diagnoses=mistakes(logits, labels),
            )

    def gradients(sub):
        logits, labels = _batch(30)
        logits.requires_grad_()

        def forward_backward(logits, labels):
            out = sub.obj(logits, labels)
            if not isinstance(out, torch.Tensor) or out.grad_fn is None:
                fail(f"{entry}'s output does not require grad: do not detach or use .item()")
            return torch.autograd.grad(out.sum(), logits)[0]

        got = sft_call(sub, logits, labels, fn=forward_backward, names=("logits", "labels"))
        inputs = logits.detach().double().requires_grad_()
        expected = torch.autograd.grad(reference(inputs, labels).sum(), inputs)[0]
        silent = torch.cat([labels[:, 1:] == IGNORE, torch.ones(3, 1, dtype=torch.bool)], 1)
        if got[silent].abs().max() != 0:
            fail(
                "positions whose next label is ignored (the prompt, the padding, the last "
                "position) got a non-zero gradient: they must carry no loss at all"
            )
        expect_close(got, expected, f"the gradient of {entry} with respect to the logits", **F32)

    def empty_row(sub):
        logits, labels = _batch(40)
        labels[1] = IGNORE  # a sequence with no response token (all prompt, truncated)
        got = run(sub, logits, labels)
        expect_finite(
            got,
            f"{what} when one sequence has no response token",
            "Its terms must count as nothing, not 0 / 0.",
        )
        expect_close(got, reference(logits, labels), f"{what} with an empty sequence", **F32)

    def large(sub):
        logits, labels = _batch(50, scale=1000.0)
        got = run(sub, logits, labels)
        expect_finite(got, f"{what} for logits of size ~1000", _stable_hint(entry))
        expect_close(
            got, reference(logits, labels), f"{what} for logits of size ~1000", atol=1e-3, rtol=1e-5
        )

    return [
        Test("signature: a function", 0, signature),
        Test("shape, dtype, finite", 1, shape_dtype),
        Test("hand-sized example (closed form)", 2, hand),
        Test("random batch with prompts and padding (float64 reference)", 2, random),
        Test("gradients: ignored positions get exactly zero", 1, gradients),
        Test("a sequence with no response token", 1, empty_row),
        Test("large logits (numerically stable)", 1, large),
    ]


# -------------------------------------------------------------------------------- DPO loss


def _logps(seed: int, pairs: int = 6) -> tuple[torch.Tensor, ...]:
    """Sequence log-probs (policy chosen, policy rejected, ref chosen, ref rejected)."""
    return tuple(
        -random_tensor(pairs, seed=seed + i, dtype=torch.float32).abs() * 20 - 5 for i in range(4)
    )


def _dpo_mistakes(pc, pr, rc, rr, beta) -> dict:
    pc, pr, rc, rr = (t.double() for t in (pc, pr, rc, rr))
    z = (pc - rc) - (pr - rr)
    logsigmoid = torch.nn.functional.logsigmoid
    return {
        "the loss with chosen and rejected swapped (or ref - policy): the sign of the "
        "margin is flipped, and DPO would push the chosen answers down": -logsigmoid(
            -beta * z
        ).mean(),
        "-beta * log sigmoid(margin): beta belongs *inside* the sigmoid, "
        "-log sigmoid(beta * margin)": -beta * logsigmoid(z).mean(),
        "the loss without beta: scale the log-ratio margin by beta": -logsigmoid(z).mean(),
        "the loss without the reference model: each log-probability is measured against "
        "the reference, log pi - log ref": -logsigmoid(beta * (pc - pr)).mean(),
        "the sum over pairs: average the loss over the batch": -logsigmoid(beta * z).sum(),
    }


def dpo_tests() -> list[Test]:
    names = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps",
             "ref_rejected_logps")  # fmt: skip

    def run(sub, pc, pr, rc, rr, beta):
        out = call(sub, pc, pr, rc, rr, beta=beta, names=names)
        loss, chosen, rejected = expect_tuple(out, 3, "dpo_loss's result")
        what = "dpo_loss's result (loss, chosen_rewards, rejected_rewards)"
        return tuple(expect_tensor(t, f"each item of {what}") for t in (loss, chosen, rejected))

    def signature(sub):
        expect_signature(sub.obj, "function", "dpo_loss")

    def shapes(sub):
        logps = _logps(1)
        loss, chosen, rejected = run(sub, *logps, beta=0.1)
        expect_shape(loss, (), "the loss", "Average over the pairs: a scalar.")
        expect_shape(chosen, (6,), "chosen_rewards for 6 pairs", "One reward per pair.")
        expect_shape(rejected, (6,), "rejected_rewards for 6 pairs", "One reward per pair.")
        for name, t in (("loss", loss), ("chosen_rewards", chosen), ("rejected", rejected)):
            expect_dtype_device(t, logps[0], name)
            expect_finite(t, name)

    def hand(sub):
        # log-ratios: pair 1 chosen +1, rejected -1; pair 2 chosen 0, rejected +1
        pc, pr = torch.tensor([-1.0, -4.0]), torch.tensor([-3.0, -1.0])
        rc, rr = torch.tensor([-2.0, -4.0]), torch.tensor([-2.0, -2.0])
        beta = 0.5  # margins beta * (2, -1) = (1, -0.5)
        expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(0.5))) / 2
        loss, _, _ = run(sub, pc, pr, rc, rr, beta)
        expect_close(
            loss,
            torch.tensor(expected),
            "the DPO loss for two pairs with margins beta * (2, -1), beta = 0.5",
            **F32,
            hint="loss = mean of -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))).",
            diagnoses=_dpo_mistakes(pc, pr, rc, rr, beta),
        )

    def random(sub):
        for seed, beta in ((10, 0.1), (20, 0.5)):
            logps = _logps(seed)
            loss, _, _ = run(sub, *logps, beta=beta)
            expect_close(
                loss,
                ref.dpo(*logps, beta)[0],
                f"the DPO loss for 6 random pairs, beta = {beta:g} (float64 reference)",
                **F32,
                diagnoses=_dpo_mistakes(*logps, beta),
            )

    def rewards(sub):
        logps = _logps(30)
        _, chosen, rejected = run(sub, *logps, beta=0.25)
        _, exp_chosen, exp_rejected = ref.dpo(*logps, 0.25)
        pc, pr, rc, rr = (t.double() for t in logps)
        for name, got, expected, ratio in (
            ("chosen_rewards", chosen, exp_chosen, pc - rc),
            ("rejected_rewards", rejected, exp_rejected, pr - rr),
        ):
            expect_close(
                got,
                expected,
                f"{name}, beta = 0.25",
                **F32,
                hint="The implicit reward of an answer is beta * (log pi - log ref).",
                diagnoses={
                    "the log-ratio without beta": ratio,
                    "the other answer's rewards: chosen and rejected swapped": exp_rejected
                    if name == "chosen_rewards"
                    else exp_chosen,
                },
            )

    def limits(sub):
        pc, pr, _, _ = _logps(40)
        for beta in (0.1, 2.0):
            loss, chosen, rejected = run(sub, pc, pr, pc, pr, beta)
            what = f"with the policy equal to the reference (beta = {beta:g})"
            expect_close(loss, torch.tensor(math.log(2)), f"the loss {what}: log 2", **F32)
            expect_close(chosen, torch.zeros(6), f"chosen_rewards {what}: 0", **F32)
            expect_close(rejected, torch.zeros(6), f"rejected_rewards {what}: 0", **F32)

    def gradients(sub):
        logps = [t.requires_grad_() for t in _logps(50)]

        def forward_backward(*logps):
            loss = sub.obj(*logps, beta=0.3)[0]
            if not isinstance(loss, torch.Tensor) or loss.grad_fn is None:
                fail("the loss does not require grad: do not detach it or use .item()")
            return torch.autograd.grad(loss, logps[:2])

        got = call(sub, *logps, fn=forward_backward, names=names)
        inputs = [t.detach().double().requires_grad_() for t in logps]
        expected = torch.autograd.grad(ref.dpo(*inputs, 0.3)[0], inputs[:2])
        for name, g, e in zip(names[:2], got, expected, strict=True):
            expect_close(
                g,
                e,
                f"the gradient with respect to {name}",
                **F32,
                hint="d loss / d pi_c = -beta * sigmoid(-beta * margin) / number of pairs.",
            )

    def large(sub):
        # margins beta * (-2000, +2000) with beta = 1: losses 2000 and ~0, mean 1000
        pc, pr = torch.tensor([-3000.0, -1000.0]), torch.tensor([-1000.0, -3000.0])
        rc = rr = torch.tensor([-1000.0, -1000.0])
        loss, _, _ = run(sub, pc, pr, rc, rr, 1.0)
        hint = (
            "sigmoid(-2000) is 0 in float32 and log(0) = -inf: use F.logsigmoid(x) "
            "(= -softplus(-x)), never torch.log(torch.sigmoid(x)) or log(1 + exp(-x))."
        )
        expect_finite(loss, "the loss for log-ratio margins of -2000 and +2000", hint)
        expect_close(loss, ref.dpo(pc, pr, rc, rr, 1.0)[0], "the loss for margins +-2000", **F32)

    return [
        Test("signature: a function", 0, signature),
        Test("shapes, dtype, finite", 1, shapes),
        Test("hand-sized example (two pairs)", 2, hand),
        Test("random pairs, two betas (float64 reference)", 2, random),
        Test("implicit rewards beta * (log pi - log ref)", 2, rewards),
        Test("policy = reference gives log 2 and zero rewards", 1, limits),
        Test("gradients", 1, gradients),
        Test("large log-ratios (numerically stable)", 1, large),
    ]


PROFILE_FORBIDDEN = (
    (sys, "setprofile", "your code called sys.setprofile(): the grader watches calls with it"),
)

PARTS = [
    Part("lora_linear", "A LoRA linear layer (forward, merge)", "LoRALinear", lora_tests(),
         forbidden=PROFILE_FORBIDDEN, kind="class"),
    Part("sft_labels", "Response-only labels", "sft_labels", sft_labels_tests(),
         forbidden=PROFILE_FORBIDDEN),
    Part("sft_loss", "Response-only SFT loss", "sft_loss", token_loss_tests("sft_loss", False),
         forbidden=PROFILE_FORBIDDEN),
    Part("sequence_logprobs", "Sequence log-probabilities (sum over the response)",
         "sequence_logprobs", token_loss_tests("sequence_logprobs", True),
         forbidden=PROFILE_FORBIDDEN),
    Part("dpo_loss", "The DPO loss and implicit rewards", "dpo_loss", dpo_tests(),
         forbidden=PROFILE_FORBIDDEN),
]  # fmt: skip
