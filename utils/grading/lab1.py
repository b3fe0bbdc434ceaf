"""Lab 1, attention: softmax, scaled dot-product attention, split/merge heads, multi-head
attention. References: torch.softmax and torch.nn.MultiheadAttention in float64, the
grader's float64 attention (:mod:`utils.grading.reference`), closed forms for the hand-sized
examples; each computed before the learner's code runs.

Tolerances: float32 atol=1e-5 (rtol=1e-5) against float64; bfloat16 atol=2e-2 (8-bit mantissa,
outputs of size ~1).
"""

from __future__ import annotations

import math

import torch

import utils.attention as attention_ref

from . import reference as ref
from .core import (
    SDPA_OPS,
    TORCH_SDPA_FORBIDDEN,
    Part,
    Submission,
    Test,
    expect_close,
    expect_dtype_device,
    expect_finite,
    expect_shape,
    expect_signature,
    expect_tensor,
    fail,
    large_score_tensor,
    random_tensor,
)

F32 = dict(atol=1e-5, rtol=1e-5)
BF16 = dict(atol=2e-2, rtol=0.0)

# ------------------------------------------------------------------------------------ softmax

SOFTMAX_HINT = "softmax(x)_i = exp(x_i - max x) / sum_j exp(x_j - max x) along `dim`."


def _softmax_call(sub: Submission, x, dim=-1):
    return expect_tensor(sub.call(x, dim, names=("x",)), "softmax's output")


def softmax_tests() -> list[Test]:
    def signature(sub):
        expect_signature(sub.obj, "function", "softmax")

    def shape(sub):
        x = random_tensor(3, 4, 5, seed=1, dtype=torch.float32)
        expect_shape(_softmax_call(sub, x), (3, 4, 5), "softmax(x) for x of shape (3, 4, 5)")

    def dtype(sub):
        x = random_tensor(3, 4, seed=2, dtype=torch.float32)
        expect_dtype_device(_softmax_call(sub, x), x, "softmax(x)")

    def finite(sub):
        expect_finite(
            _softmax_call(sub, random_tensor(3, 4, seed=3, dtype=torch.float32)), "output"
        )

    def hand(sub):
        x = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
        total = math.exp(1) + math.exp(2) + math.exp(3)
        expected = torch.tensor([[math.exp(i) / total for i in (1, 2, 3)], [1 / 3] * 3])
        expect_close(
            _softmax_call(sub, x, -1),
            expected,
            "softmax([[1, 2, 3], [0, 0, 0]], dim=-1)",
            **F32,
            hint=SOFTMAX_HINT,
            diagnoses={"a softmax over dim 0 instead of `dim`": ref.softmax(x, 0)},
        )

    def random_dims(sub):
        x = random_tensor(4, 5, 6, seed=4)
        for dim in (-1, 0, 1):
            expected = ref.softmax(x, dim)
            expect_close(
                _softmax_call(sub, x.float(), dim),
                expected,
                f"softmax(x, dim={dim}) for random x of shape (4, 5, 6)",
                **F32,
                hint="Normalise along the `dim` argument, not always the last axis.",
            )

    def large(sub):
        x = torch.tensor([[1000.0, 1001.0, 1002.0], [-1000.0, -1001.0, -1002.0]])
        expected = ref.softmax(x, -1)
        got = _softmax_call(sub, x)
        expect_finite(
            got,
            "softmax of scores near +-1000",
            hint="exp(1000) overflows: subtract the row maximum before exp.",
        )
        expect_close(got, expected, "softmax of scores near +-1000", **F32)

    def minus_inf(sub):
        x = torch.tensor([[0.0, -math.inf, 1.0], [2.0, 2.0, -math.inf]])
        expected = ref.softmax(x, -1)
        expect_close(
            _softmax_call(sub, x),
            expected,
            "softmax of rows containing -inf (masked scores)",
            **F32,
            hint="A -inf score must get weight exactly 0.",
        )

    def bfloat16(sub):
        x = random_tensor(6, 10, seed=5, dtype=torch.bfloat16)
        expected = ref.softmax(x, -1)
        got = _softmax_call(sub, x)
        expect_dtype_device(got, x, "softmax(x) for bfloat16 x")
        expect_close(got, expected, "bfloat16 softmax", **BF16)

    return [
        Test("signature: a function", 0, signature),
        Test("shape", 1, shape),
        Test("dtype and device", 1, dtype),
        Test("finite values", 1, finite),
        Test("hand-sized example", 2, hand),
        Test("random inputs, dim = -1, 0, 1 (float64 reference)", 2, random_dims),
        Test("large scores stay finite", 2, large),
        Test("-inf scores get weight 0", 1, minus_inf),
        Test("bfloat16 (atol 2e-2)", 1, bfloat16),
    ]


# ---------------------------------------------------------------------------------- attention

ATTENTION_HINT = "out = softmax(q k^T / sqrt(D) + attn_mask) v, softmax over the keys (last axis)."


def _reference(q, k, v, mask=None, is_causal=False):
    return ref.attention(q, k, v, mask, is_causal)


def _wrong_answers(q, k, v, mask=None, is_causal=False) -> dict:
    q, k, v = q.double(), k.double(), v.double()
    scores = q @ k.transpose(-2, -1)
    answers = {
        "attention without the 1/sqrt(D) scale": _reference(q * math.sqrt(q.shape[-1]), k, v),
        "a softmax over the queries (dim=-2) instead of the keys": ref.softmax(
            scores / math.sqrt(q.shape[-1]), -2
        )
        @ v,
    }
    if mask is not None and mask.dtype == torch.bool:
        answers["attention with the mask inverted: True must mean *may attend*"] = _reference(
            q, k, v, ~mask
        )
    if is_causal:
        top_left = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
        answers["a top-left-aligned causal mask: query i sees keys 0..S-T+i"] = _reference(
            q, k, v, top_left
        )
    return answers


def _attention_call(sub: Submission, q, k, v, mask=None, is_causal=False):
    out = sub.call(q, k, v, mask, is_causal=is_causal, names=("q", "k", "v", "attn_mask"))
    return expect_tensor(out, "attention's output", "Return only the output tensor.")


def _qkv(t, s, d=8, dv=6, seed=0, dtype=torch.float32):
    return tuple(
        random_tensor(2, 3, n, w, seed=seed + i, dtype=dtype)
        for i, (n, w) in enumerate(((t, d), (s, d), (s, dv)))
    )


def attention_tests() -> list[Test]:
    def signature(sub):
        expect_signature(sub.obj, "function", "attention")

    def shape(sub):
        q, k, v = _qkv(5, 7)
        expect_shape(
            _attention_call(sub, q, k, v),
            (2, 3, 5, 6),
            "attention(q, k, v) for q (2, 3, 5, 8), k (2, 3, 7, 8), v (2, 3, 7, 6)",
            "The output has one row per query and v's last dimension: weights (T, S) @ v (S, Dv).",
        )

    def dtype(sub):
        q, k, v = _qkv(5, 7)
        expect_dtype_device(_attention_call(sub, q, k, v), q, "attention's output")

    def finite(sub):
        expect_finite(
            _attention_call(sub, *_qkv(5, 7)),
            "attention's output (no mask)",
            "NaN comes from a softmax row whose scores are all -inf (every key masked: check "
            "what your code does when attn_mask is None) or from inf - inf.",
        )

    def hand(sub):
        q = torch.tensor([[[[1.0, 0.0]]]])  # one query, D = 2
        k = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
        v = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
        w0 = 1 / (1 + math.exp(-1 / math.sqrt(2)))  # softmax([1/sqrt 2, 0])
        expect_close(
            _attention_call(sub, q, k, v),
            torch.tensor([[[[w0, 1 - w0]]]]),
            "attention for q = [1, 0], k = v = identity (D = 2)",
            **F32,
            hint=ATTENTION_HINT,
            diagnoses=_wrong_answers(q, k, v),
        )

    def random(sub):
        for seed, (t, s) in enumerate(((5, 7), (16, 16), (9, 4))):
            q, k, v = _qkv(t, s, seed=10 * seed)
            expected, wrong = _reference(q, k, v), _wrong_answers(q, k, v)
            expect_close(
                _attention_call(sub, q, k, v),
                expected,
                f"attention for random q, k, v with T={t}, S={s} (float64 reference)",
                **F32,
                hint=ATTENTION_HINT,
                diagnoses=wrong,
            )

    def bool_mask(sub):
        q, k, v = _qkv(6, 7, seed=20)
        mask = torch.rand(6, 7, generator=torch.Generator().manual_seed(0)) > 0.4
        mask[:, 0] = True  # every query keeps at least one key
        expected, wrong = _reference(q, k, v, mask), _wrong_answers(q, k, v, mask)
        expect_close(
            _attention_call(sub, q, k, v, mask),
            expected,
            "attention with a boolean (T, S) mask, True = may attend",
            **F32,
            hint="Masked scores become -inf before the softmax.",
            diagnoses=wrong,
        )

    def float_mask(sub):
        q, k, v = _qkv(6, 7, seed=30)
        bias = random_tensor(1, 3, 6, 7, seed=31, dtype=torch.float32)
        bias[..., 2] = -math.inf
        expected = _reference(q, k, v, bias)
        expect_close(
            _attention_call(sub, q, k, v, bias),
            expected,
            "attention with an additive float mask of shape (1, H, T, S) (with -inf entries)",
            **F32,
            hint="A float mask is added to the scaled scores (after the 1/sqrt(D) scale).",
        )

    def causal(sub):
        for t, s in ((7, 7), (3, 7)):
            q, k, v = _qkv(t, s, seed=40 + t)
            expected, wrong = _reference(q, k, v, None, True), _wrong_answers(q, k, v, None, True)
            expect_close(
                _attention_call(sub, q, k, v, is_causal=True),
                expected,
                f"causal attention with T={t}, S={s}",
                **F32,
                hint="Causal masks are aligned to the bottom right: query i sees keys 0..S-T+i.",
                diagnoses=wrong,
            )
        keep = torch.rand(6, 6, generator=torch.Generator().manual_seed(2)) > 0.4
        keep[:, 0] = True
        bias = random_tensor(1, 3, 3, 6, seed=45, dtype=torch.float32)
        for (t, s), mask, kind in (((6, 6), keep, "a boolean"), ((3, 6), bias, "a float")):
            q, k, v = _qkv(t, s, seed=46 + t)
            expected = _reference(q, k, v, mask, True)
            wrong = {
                "the causal mask alone: with is_causal=True your code drops `attn_mask`": (
                    _reference(q, k, v, None, True)
                ),
                "`attn_mask` alone: your code ignores is_causal when a mask is given": _reference(
                    q, k, v, mask
                ),
            }
            expect_close(
                _attention_call(sub, q, k, v, mask, is_causal=True),
                expected,
                f"attention with {kind} mask and is_causal=True (T={t}, S={s})",
                **F32,
                hint="With both, a key is hidden when the mask hides it *or* it is in the future.",
                diagnoses=wrong,
            )

    def gradients(sub):
        q, k, v = (x.requires_grad_() for x in _qkv(5, 7, seed=50))
        grad_out = random_tensor(2, 3, 5, 6, seed=51, dtype=torch.float32)

        def forward_backward(q, k, v):
            out = expect_tensor(sub.obj(q, k, v), "attention's output")
            if out.grad_fn is None:
                fail("attention's output does not require grad: do not detach or use .data")
            return torch.autograd.grad(out, (q, k, v), grad_out, allow_unused=True)

        inputs = [x.detach().double().requires_grad_() for x in (q, k, v)]
        expected = torch.autograd.grad(_reference(*inputs), inputs, grad_out.double())
        got = sub.call(q, k, v, fn=forward_backward, names=("q", "k", "v"))
        for name, g, e in zip("qkv", got, expected, strict=True):
            if g is None:
                fail(f"the output does not depend on {name} through autograd")
            expect_close(g, e, f"the gradient with respect to {name}", **F32)

    def large(sub):
        q, k = (large_score_tensor(2, 3, 6, 16, seed=60 + i, magnitude=16) for i in range(2))
        v = random_tensor(2, 3, 6, 16, seed=62, dtype=torch.float32)
        expected = _reference(q, k, v)
        got = _attention_call(sub, q, k, v)
        expect_finite(got, "attention for scores up to 1024", "Use a numerically stable softmax.")
        expect_close(got, expected, "attention for scores up to 1024", **F32)

    def bfloat16(sub):
        q, k, v = _qkv(6, 7, seed=70, dtype=torch.bfloat16)
        expected = _reference(q, k, v, is_causal=True)
        got = _attention_call(sub, q, k, v, is_causal=True)
        expect_dtype_device(got, q, "attention's output for bfloat16 inputs")
        expect_close(got, expected, "bfloat16 attention", **BF16)

    return [
        Test("signature: a function", 0, signature),
        Test("shape (T != S, Dv != D)", 1, shape),
        Test("dtype and device", 1, dtype),
        Test("finite values", 1, finite),
        Test("hand-sized example", 2, hand),
        Test("random inputs (float64 reference)", 2, random),
        Test("boolean mask (True = attend)", 2, bool_mask),
        Test("additive float mask", 1, float_mask),
        Test("causal, T = S and T < S", 2, causal),
        Test("gradients", 1, gradients),
        Test("large scores", 1, large),
        Test("bfloat16 (atol 2e-2)", 1, bfloat16),
    ]


# ---------------------------------------------------------------------------- split / merge


def split_heads_tests() -> list[Test]:
    x = random_tensor(2, 5, 12, seed=80, dtype=torch.float32)
    # independent reference: out[b, h, t, d] = x[b, t, h * D + d]
    expected = torch.stack([x[:, :, h * 4 : (h + 1) * 4] for h in range(3)], dim=1)

    def signature(sub):
        expect_signature(sub.obj, "function", "split_heads")

    def shape(sub):
        out = expect_tensor(sub.call(x, 3, names=("x",)), "split_heads's output")
        expect_shape(out, (2, 3, 5, 4), "split_heads(x, 3) for x of shape (2, 5, 12)")

    def values(sub):
        expect_close(
            sub.call(x, 3, names=("x",)),
            expected,
            "split_heads(x, 3)",
            atol=0,
            hint="Head h owns features h*D .. (h+1)*D - 1 of each token.",
            diagnoses={
                "x.view(B, H, T, D): split the features into (H, D) first, then "
                "transpose T and H": x.view(2, 3, 5, 4)
            },
        )

    return [
        Test("signature: a function", 0, signature),
        Test("shape", 1, shape),
        Test("values (head h owns features h*D .. (h+1)*D-1)", 2, values),
    ]


def merge_heads_tests() -> list[Test]:
    x = random_tensor(2, 3, 5, 4, seed=81, dtype=torch.float32)
    expected = torch.cat(x.unbind(dim=1), dim=-1)  # (B, T, H*D)

    def signature(sub):
        expect_signature(sub.obj, "function", "merge_heads")

    def shape(sub):
        out = expect_tensor(sub.call(x, names=("x",)), "merge_heads's output")
        expect_shape(out, (2, 5, 12), "merge_heads(x) for x of shape (2, 3, 5, 4)")

    def values(sub):
        expect_close(
            sub.call(x, names=("x",)),
            expected,
            "merge_heads(x)",
            atol=0,
            hint="merge_heads undoes split_heads: transpose back to (B, T, H, D), then reshape.",
            diagnoses={"x.reshape(B, T, H*D) without moving H after T": x.reshape(2, 5, 12)},
        )

    return [
        Test("signature: a function", 0, signature),
        Test("shape", 1, shape),
        Test("values (inverse of split_heads)", 2, values),
    ]


# ---------------------------------------------------------------------- multi-head attention


def _torch_mha(module, n_embd: int, n_head: int, kv_dim: int) -> torch.nn.MultiheadAttention:
    """torch's MultiheadAttention in float64 carrying the learner's weights."""
    ref = torch.nn.MultiheadAttention(
        n_embd, n_head, kdim=kv_dim, vdim=kv_dim, batch_first=True, dtype=torch.float64
    )
    w = {n: getattr(module, n) for n in ("q_proj", "k_proj", "v_proj", "out_proj")}
    with torch.no_grad():
        if ref._qkv_same_embed_dim:
            ref.in_proj_weight.copy_(
                torch.cat([w[n].weight for n in ("q_proj", "k_proj", "v_proj")])
            )
        else:
            ref.q_proj_weight.copy_(w["q_proj"].weight)
            ref.k_proj_weight.copy_(w["k_proj"].weight)
            ref.v_proj_weight.copy_(w["v_proj"].weight)
        ref.in_proj_bias.copy_(torch.cat([w[n].bias for n in ("q_proj", "k_proj", "v_proj")]))
        ref.out_proj.weight.copy_(w["out_proj"].weight)
        ref.out_proj.bias.copy_(w["out_proj"].bias)
    return ref


def _build(sub: Submission, n_embd=16, n_head=4, kv_dim=None):
    torch.manual_seed(0)
    module = sub.call(n_embd, n_head, kv_dim=kv_dim)
    if not isinstance(module, torch.nn.Module):
        fail(f"MultiHeadAttention(...) should build an nn.Module, got {type(module).__name__}")
    kv = n_embd if kv_dim is None else kv_dim
    for name, shape in (
        ("q_proj", (n_embd, n_embd)),
        ("k_proj", (n_embd, kv)),
        ("v_proj", (n_embd, kv)),
        ("out_proj", (n_embd, n_embd)),
    ):
        layer = getattr(module, name, None)
        if not isinstance(layer, torch.nn.Linear) or tuple(layer.weight.shape) != shape:
            fail(
                f"MultiHeadAttention({n_embd}, {n_head}, kv_dim={kv_dim}) needs `{name}`, "
                f"an nn.Linear with weight of shape {shape} and a bias; got {describe_layer(layer)}"
            )
        if layer.bias is None:
            fail(f"`{name}` needs a bias (bias=True), like torch.nn.MultiheadAttention")
    return module


def describe_layer(layer) -> str:
    if isinstance(layer, torch.nn.Linear):
        return f"nn.Linear with weight {tuple(layer.weight.shape)}"
    return "nothing" if layer is None else type(layer).__name__


def _mha_forward(sub: Submission, module, *args, **kwargs):
    out = sub.call(*args, fn=module, names=("query", "key_value"), **kwargs)
    return expect_tensor(out, "MultiHeadAttention's output", "Return only the output.")


def mha_tests() -> list[Test]:
    def signature(sub):
        expect_signature(sub.obj, "class", "MultiHeadAttention")

    def layers(sub):
        _build(sub)
        _build(sub, kv_dim=10)

    def shape(sub):
        x = random_tensor(2, 5, 16, seed=90, dtype=torch.float32)
        expect_shape(_mha_forward(sub, _build(sub), x), (2, 5, 16), "self-attention output")

    def self_attention(sub):
        module = _build(sub)
        x = random_tensor(2, 5, 16, seed=91, dtype=torch.float32)
        expected, _ = _torch_mha(module, 16, 4, 16)(x.double(), x.double(), x.double())
        expect_close(
            _mha_forward(sub, module, x),
            expected,
            "self-attention vs torch.nn.MultiheadAttention with your weights",
            **F32,
            hint="Project, split into heads, attend per head, merge heads, then out_proj.",
        )

    def masks(sub):
        module = _build(sub)
        x = random_tensor(2, 6, 16, seed=92, dtype=torch.float32)
        torch_mha = _torch_mha(module, 16, 4, 16)
        causal = ref.causal_keep(6, 6)
        expected, _ = torch_mha(x.double(), x.double(), x.double(), attn_mask=~causal)
        expect_close(
            _mha_forward(sub, module, x, is_causal=True),
            expected,
            "causal self-attention (is_causal=True)",
            **F32,
        )
        keep = torch.rand(6, 6, generator=torch.Generator().manual_seed(1)) > 0.3
        keep[:, 0] = True
        expected, _ = torch_mha(x.double(), x.double(), x.double(), attn_mask=~keep)
        expect_close(
            _mha_forward(sub, module, x, attn_mask=keep),
            expected,
            "self-attention with a boolean attn_mask (True = may attend)",
            **F32,
        )

    def cross_attention(sub):
        module = _build(sub, kv_dim=10)
        x = random_tensor(2, 5, 16, seed=93, dtype=torch.float32)
        memory = random_tensor(2, 7, 10, seed=94, dtype=torch.float32)
        expected, _ = _torch_mha(module, 16, 4, 10)(x.double(), memory.double(), memory.double())
        expect_close(
            _mha_forward(sub, module, x, memory),
            expected,
            "cross-attention (T=5 queries of width 16, S=7 keys of width 10)",
            **F32,
            hint="Queries come from `query`, keys and values from `key_value`.",
        )

    return [
        Test("signature: a class", 0, signature),
        Test("layers q_proj, k_proj, v_proj, out_proj", 1, layers),
        Test("output shape", 1, shape),
        Test("self-attention vs torch.nn.MultiheadAttention", 3, self_attention),
        Test("causal and boolean masks", 2, masks),
        Test("cross-attention", 2, cross_attention),
    ]


def _course_reference(name: str) -> tuple[object, str, str]:
    return (
        attention_ref,
        name,
        f"this part must not call the course's reference utils.attention.{name}: write it yourself",
    )


SDPA_FORBIDDEN = (TORCH_SDPA_FORBIDDEN, _course_reference("scaled_dot_product_attention"))
HEADS_FORBIDDEN = (_course_reference("split_heads"), _course_reference("merge_heads"))
MHA_FORBIDDEN = (
    *SDPA_FORBIDDEN[1:],
    *HEADS_FORBIDDEN,
    _course_reference("MultiHeadAttention"),
    (
        torch.nn,
        "MultiheadAttention",
        "this part must not use torch.nn.MultiheadAttention: the check compares against it",
    ),
    (
        torch.nn.functional,
        "multi_head_attention_forward",
        "this part must not call torch's multi_head_attention_forward: write it yourself",
    ),
)
SOFTMAX_OPS = (
    ("_softmax|_safe_softmax", "this part must not call torch.softmax: write it yourself"),
    ("_log_softmax", "this part must not call torch.log_softmax: write the softmax yourself"),
)

PARTS = [
    Part(
        "softmax",
        "Numerically stable softmax",
        "softmax",
        softmax_tests(),
        forbidden_ops=SOFTMAX_OPS,
    ),
    Part(
        "attention",
        "Scaled dot-product attention",
        "attention",
        attention_tests(),
        forbidden=SDPA_FORBIDDEN,
        forbidden_ops=SDPA_OPS,
    ),
    Part(
        "split_heads",
        "Splitting heads",
        "split_heads",
        split_heads_tests(),
        forbidden=HEADS_FORBIDDEN,
    ),
    Part(
        "merge_heads",
        "Merging heads",
        "merge_heads",
        merge_heads_tests(),
        forbidden=HEADS_FORBIDDEN,
    ),
    Part(
        "multi_head_attention",
        "Multi-head attention",
        "MultiHeadAttention",
        mha_tests(),
        forbidden=MHA_FORBIDDEN,
        kind="class",
    ),
]
