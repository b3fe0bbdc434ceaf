"""Lab 3, flash-style attention: online softmax, the tiled forward pass, the backward pass by
recomputation, and the forward pass as a Triton kernel.

References: the grader's float64 attention and log-sum-exp (:mod:`utils.grading.reference`),
torch.softmax in float64, autograd through the float64 reference for gradients.
What makes a part flash-style is checked too: scaled_dot_product_attention and the
:mod:`utils.flash_attention` reference raise while learner code runs, and a call on N = 1024
may not create any tensor bigger than a few times the inputs (the 1024 x 1024 score matrix
is 8x over budget).

Tolerances: float32 atol=1e-5 (rtol=1e-5) against float64; bfloat16 atol=2e-2; the Triton
kernel float32 atol=1e-5 too (ieee dot products).
"""

from __future__ import annotations

import math

import torch

import utils.attention as attention_ref
import utils.flash_attention as flash_ref
from utils.memory import TensorMemoryTracker

from . import reference as ref
from .core import (
    SDPA_OPS,
    TORCH_SDPA_FORBIDDEN,
    Part,
    Test,
    expect_close,
    expect_dtype_device,
    expect_finite,
    expect_shape,
    expect_signature,
    expect_tensor,
    expect_tuple,
    fail,
    large_score_tensor,
    random_tensor,
)

F32 = dict(atol=1e-5, rtol=1e-5)
RESCALE_HINT = (
    "One block works but several do not: when a new block raises the running maximum m, "
    "rescale the running sum and the accumulated output by exp(m_old - m_new)."
)


def reference(q, k, v, is_causal=False):
    """float64 (out, lse) by the textbook formula (builds T x S: fine for the grader)."""
    return ref.attention_lse(q, k, v, is_causal)


def qkv(t, s, d=16, seed=0, dtype=torch.float32, b=2, h=3):
    return tuple(
        random_tensor(b, h, n, d, seed=seed + i, dtype=dtype) for i, n in enumerate((t, s, s))
    )


def tile_budget(args) -> int | None:
    """For sequences of 512 or more: four times the largest input, room for the output, the
    accumulators and a few tiles, but 8x less than one N x N matrix at N = 1024 with D = 32.
    Shorter calls are not limited (there a score matrix is no bigger than the inputs)."""
    tensors = [a for a in args if isinstance(a, torch.Tensor) and a.dim() >= 2]
    if not tensors or max(a.shape[-2] for a in tensors) < 512:
        return None
    return 4 * max(a.numel() for a in tensors)


# ------------------------------------------------------------------------------ online softmax


def online_softmax_tests() -> list[Test]:
    def call(sub, x, block_size):
        out = sub.call(x, block_size, names=("x",))
        return expect_tensor(out, "online_softmax's output")

    def signature(sub):
        expect_signature(sub.obj, "function", "online_softmax")

    def shape_dtype(sub):
        x = random_tensor(3, 10, seed=1, dtype=torch.float32)
        out = call(sub, x, 4)
        expect_shape(out, (3, 10), "online_softmax(x, 4) for x of shape (3, 10)")
        expect_dtype_device(out, x, "online_softmax's output")
        expect_finite(out, "online_softmax's output")

    def one_block(sub):
        x = random_tensor(3, 8, seed=2)
        expect_close(call(sub, x.float(), 8), torch.softmax(x, -1), "one block (N = block)", **F32)

    def several_blocks(sub):
        x = random_tensor(3, 64, seed=3) * 3
        expect_close(
            call(sub, x.float(), 8), torch.softmax(x, -1), "8 blocks of 8", **F32, hint=RESCALE_HINT
        )

    def ragged(sub):
        x = random_tensor(2, 3, 50, seed=4)
        expect_close(
            call(sub, x.float(), 16),
            torch.softmax(x, -1),
            "N = 50 with blocks of 16 (last block shorter)",
            **F32,
        )

    def large(sub):
        x = torch.tensor([[1000.0, -1000.0, 1001.0, 999.0, 1002.0]])
        got = call(sub, x, 2)
        expect_finite(
            got, "online softmax of scores near 1000", "Subtract the running maximum before exp."
        )
        expect_close(got, torch.softmax(x.double(), -1), "scores near 1000", **F32)

    return [
        Test("signature: a function", 0, signature),
        Test("shape, dtype, finite", 1, shape_dtype),
        Test("one block", 1, one_block),
        Test("several blocks (rescaling)", 2, several_blocks),
        Test("N not divisible by the block size", 1, ragged),
        Test("large scores", 1, large),
    ]


# ------------------------------------------------------------------------------ flash forward


def _forward_call(sub, q, k, v, is_causal=False, bq=64, bk=64):
    out = sub.call(
        q, k, v, is_causal=is_causal, block_size_q=bq, block_size_k=bk, names=("q", "k", "v")
    )
    out, lse = expect_tuple(out, 2, "the result (out, lse)")
    return expect_tensor(out, "out"), expect_tensor(lse, "lse")


def forward_tests(entry: str, extra: bool = True) -> list[Test]:
    """Tests shared by the PyTorch and Triton forward passes; ``extra``: memory, causal block
    skipping, bfloat16 (PyTorch only)."""
    call = _forward_call

    def signature(sub):
        expect_signature(sub.obj, "function", entry)

    def shapes(sub):
        q, k, v = qkv(40, 24)
        out, lse = call(sub, q, k, v)
        expect_shape(out, (2, 3, 40, 16), "out for q (2, 3, 40, 16), k and v (2, 3, 24, 16)")
        expect_shape(lse, (2, 3, 40), "lse (one log-sum-exp per query)")

    def dtypes(sub):
        q, k, v = qkv(40, 24)
        out, lse = call(sub, q, k, v)
        expect_dtype_device(out, q, "out")
        expect_dtype_device(lse, q, "lse (float32 for float32 inputs)")
        expect_finite(out, "out")
        expect_finite(lse, "lse")

    def hand(sub):
        q = torch.zeros(1, 1, 16, 16)
        k = torch.zeros(1, 1, 16, 16)
        v = torch.arange(16.0).repeat(16, 1).T[None, None]  # row j of v is j
        out, lse = call(sub, q, k, v, bq=16, bk=16)
        expect_close(
            out,
            torch.full((1, 1, 16, 16), 7.5),
            "out for q = k = 0 (uniform weights: the mean of v's rows, 7.5)",
            **F32,
        )
        expect_close(lse, torch.full((1, 1, 16), math.log(16)), "lse for q = k = 0 (log 16)", **F32)

    def one_block(sub):
        q, k, v = qkv(32, 32, seed=10)
        out, lse = call(sub, q, k, v)
        ref_out, ref_lse = reference(q, k, v)
        expect_close(out, ref_out, "out, one block (N = 32, blocks of 64)", **F32)
        expect_close(lse, ref_lse, "lse, one block", **F32, hint="lse = m + log(l) per row.")

    def several_blocks(sub):
        q, k, v = qkv(128, 128, seed=20)
        out, lse = call(sub, q * 2, k * 2, v, bq=32, bk=32)
        ref_out, ref_lse = reference(q * 2, k * 2, v)
        expect_close(out, ref_out, "out, 4 x 4 blocks of 32", **F32, hint=RESCALE_HINT)
        expect_close(lse, ref_lse, "lse, 4 x 4 blocks of 32", **F32, hint=RESCALE_HINT)

    def ragged(sub):
        q, k, v = qkv(100, 75, seed=30)
        out, lse = call(sub, q, k, v, bq=32, bk=16)
        ref_out, ref_lse = reference(q, k, v)
        hint = "The last tile is shorter: slice with min(start + block, N)."
        expect_close(out, ref_out, "out, T = 100, S = 75, blocks of 32 x 16", **F32, hint=hint)
        expect_close(lse, ref_lse, "lse, T = 100, S = 75", **F32, hint=hint)

    def causal(sub):
        for t, s in ((96, 96), (40, 96)):
            q, k, v = qkv(t, s, seed=40 + t)
            out, lse = call(sub, q, k, v, is_causal=True, bq=32, bk=32)
            ref_out, ref_lse = reference(q, k, v, is_causal=True)
            hint = "Query i sees keys 0 .. S - T + i (bottom-right aligned)."
            expect_close(out, ref_out, f"causal out, T = {t}, S = {s}", **F32, hint=hint)
            expect_close(lse, ref_lse, f"causal lse, T = {t}, S = {s}", **F32, hint=hint)

    def invariance(sub):
        q, k, v = qkv(96, 96, seed=50)
        first, _ = call(sub, q, k, v, is_causal=True, bq=16, bk=32)
        second, _ = call(sub, q, k, v, is_causal=True, bq=64, bk=16)
        expect_close(second, first, "causal out with blocks 64 x 16 vs 16 x 32", **F32)

    def large(sub):
        q, k = (large_score_tensor(2, 3, 64, 16, seed=60 + i, magnitude=16) for i in range(2))
        v = random_tensor(2, 3, 64, 16, seed=62, dtype=torch.float32)
        out, lse = call(sub, q, k, v, bq=32, bk=32)
        expect_finite(out, "out for scores up to 1024", "Subtract the running maximum before exp.")
        ref_out, ref_lse = reference(q, k, v)
        expect_close(out, ref_out, "out for scores up to 1024", **F32)
        expect_close(lse, ref_lse, "lse for scores up to 1024", atol=1e-5, rtol=1e-6)

    def memory(sub):
        q, k, v = qkv(1024, 1024, d=32, b=1, h=2, seed=70)
        out, _ = call(sub, q, k, v, bq=64, bk=64)
        expect_close(out, reference(q, k, v)[0], "out at N = 1024", **F32)

    def skips_blocks(sub):
        q, k, v = qkv(256, 256, b=1, h=1, seed=80)
        counts = []
        for is_causal in (False, True):
            with TensorMemoryTracker() as tracker:
                call(sub, q, k, v, is_causal=is_causal, bq=32, bk=32)
            counts.append(sum(n for op, n in tracker.op_counts.items() if op.endswith("mm")))
        if counts[1] > 0.75 * counts[0]:
            fail(
                f"causal attention ran {counts[1]} matrix products against {counts[0]} without "
                "the mask (8 x 8 blocks): skip key blocks entirely above the diagonal "
                "(about half of them) instead of masking them"
            )

    def bfloat16(sub):
        q, k, v = qkv(64, 64, seed=90, dtype=torch.bfloat16)
        ref_out, ref_lse = reference(q, k, v, True)
        out, lse = call(sub, q, k, v, is_causal=True, bq=32, bk=32)
        expect_dtype_device(out, q, "out for bfloat16 inputs")
        if lse.dtype != torch.float32:
            fail(
                f"lse for bfloat16 inputs has dtype {lse.dtype}, expected torch.float32: keep "
                "the running max and sum in float32 whatever the input dtype (the backward "
                "pass needs exp(s - lse) to float32 accuracy)"
            )
        expect_close(out, ref_out, "bfloat16 out", atol=2e-2)
        expect_close(lse, ref_lse, "lse for bfloat16 inputs (float32 statistics)", atol=1e-4)

    tests = [
        Test("signature: a function", 0, signature),
        Test("shapes of (out, lse)", 1, shapes),
        Test("dtype, device, finite", 1, dtypes),
        Test("hand-sized example (uniform weights)", 1, hand),
        Test("random inputs, one block (float64 reference)", 2, one_block),
        Test("several blocks (online rescaling)", 2, several_blocks),
        Test("N not divisible by the blocks, T != S", 1, ragged),
        Test("causal, T = S and T < S", 2, causal),
        Test("block-size invariance", 1, invariance),
        Test("large scores", 1, large),
    ]
    if extra:
        tests += [
            Test("never builds the N x N matrix (N = 1024)", 2, memory),
            Test("causal skips fully masked blocks", 1, skips_blocks),
            Test("bfloat16 (atol 2e-2)", 1, bfloat16),
        ]
    return tests


# ----------------------------------------------------------------------------- flash backward


def backward_tests() -> list[Test]:
    def apply(sub, q, k, v, is_causal=False, bq=32, bk=32):
        def run(q, k, v):
            return sub.obj.apply(q, k, v, is_causal, bq, bk)

        out = sub.call(q, k, v, fn=run, names=("q", "k", "v"))
        return expect_tensor(out, "FlashAttention.apply(...)", "forward returns only out.")

    def grads(sub, t, s, is_causal, bq=32, bk=32, seed=0, check=True):
        q, k, v = (x.requires_grad_() for x in qkv(t, s, seed=seed))
        grad_out = random_tensor(2, 3, t, 16, seed=seed + 9, dtype=torch.float32)

        def forward_backward(q, k, v):
            out = sub.obj.apply(q, k, v, is_causal, bq, bk)
            return torch.autograd.grad(out, (q, k, v), grad_out)

        got = sub.call(q, k, v, fn=forward_backward, names=("q", "k", "v"))
        if not check:
            return
        inputs = [x.detach().double().requires_grad_() for x in (q, k, v)]
        out = ref.attention(*inputs, is_causal=is_causal)
        expected = torch.autograd.grad(out, inputs, grad_out.double())
        for name, g, e in zip(("dq", "dk", "dv"), got, expected, strict=True):
            expect_tensor(g, name)
            expect_shape(g, e.shape, name)
            expect_close(
                g,
                e,
                f"{name} (T = {t}, S = {s}, causal={is_causal})",
                **F32,
                hint="ds = p * (dp - rowsum(dout * out)); p = exp(s - lse).",
            )

    def signature(sub):
        expect_signature(sub.obj, "autograd.Function", "FlashAttention")

    def forward(sub):
        q, k, v = qkv(64, 64, seed=100)
        out = apply(sub, q, k, v)
        expect_shape(out, (2, 3, 64, 16), "FlashAttention.apply(q, k, v, ...)")
        expect_close(out, reference(q, k, v)[0], "the forward output", **F32)

    def backward(sub):
        grads(sub, 64, 64, False, seed=110)

    def backward_tiles(sub):
        grads(sub, 100, 75, False, bq=32, bk=16, seed=120)

    def backward_causal(sub):
        grads(sub, 96, 96, True, seed=130)
        grads(sub, 40, 96, True, seed=140)

    def memory(sub):
        q, k, v = (x.requires_grad_() for x in qkv(1024, 1024, d=32, b=1, h=2, seed=150))

        def forward_backward(q, k, v):
            out = sub.obj.apply(q, k, v, False, 64, 64)
            return torch.autograd.grad(out, (q, k, v), torch.ones_like(out))

        sub.call(q, k, v, fn=forward_backward, names=("q", "k", "v"))

    return [
        Test("signature: a torch.autograd.Function", 0, signature),
        Test("forward output", 1, forward),
        Test("gradients (N = 64, blocks of 32)", 2, backward),
        Test("gradients, T = 100, S = 75, blocks 32 x 16", 2, backward_tiles),
        Test("gradients, causal", 2, backward_causal),
        Test("backward never builds the N x N matrix (N = 1024)", 2, memory),
    ]


# --------------------------------------------------------------------------------- Triton


FLASH_FORBIDDEN = (
    TORCH_SDPA_FORBIDDEN,
    (
        attention_ref,
        "scaled_dot_product_attention",
        "this part must not call utils.attention.scaled_dot_product_attention (it builds T x S)",
    ),
    *(
        (
            flash_ref,
            name,
            f"this part must not call the course's reference utils.flash_attention."
            f"{name}: write your own",
        )
        for name in (
            "flash_attention_forward",
            "flash_attention",
            "flash_attention_backward",
            "FlashAttentionFunction",
            "triton_flash_attention_forward",
        )
    ),
)
TRITON_OPS = (
    *SDPA_OPS,
    (
        "b?mm|addmm|baddbmm|matmul",
        "the Triton part must compute inside the kernel (tl.dot), not with torch matmuls",
    ),
    ("exp_?", "the Triton part must compute inside the kernel (tl.exp), not with torch.exp"),
)

PARTS = [
    Part(
        "online_softmax",
        "Online softmax on a stream of blocks",
        "online_softmax",
        online_softmax_tests(),
        forbidden_ops=(
            (
                "_softmax|_safe_softmax",
                "this part must not call torch.softmax: stream over the blocks",
            ),
            ("logsumexp", "this part must not call torch.logsumexp: stream over the blocks"),
        ),
    ),
    Part(
        "flash_forward",
        "Tiled FlashAttention-2 forward (PyTorch)",
        "flash_forward",
        forward_tests("flash_forward"),
        forbidden=FLASH_FORBIDDEN,
        forbidden_ops=SDPA_OPS,
        max_numel=tile_budget,
        timeout=30,
    ),
    Part(
        "flash_backward",
        "Backward by recomputation (autograd.Function)",
        "FlashAttention",
        backward_tests(),
        forbidden=FLASH_FORBIDDEN,
        forbidden_ops=SDPA_OPS,
        max_numel=tile_budget,
        timeout=60,
        kind="autograd.Function",
    ),
    Part(
        "triton_forward",
        "FlashAttention forward as a Triton kernel",
        "triton_flash_forward",
        forward_tests("triton_flash_forward", extra=False),
        forbidden=FLASH_FORBIDDEN,
        forbidden_ops=TRITON_OPS,
        max_numel=tile_budget,
        timeout=120,
    ),
]
