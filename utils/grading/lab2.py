"""Lab 2, rotary position embedding (RoPE): rotating feature pairs in both layouts, the cos/sin
cache, RoPE on queries and keys with a position offset, and scores that depend only on
relative position.

Independent reference: RoPE as complex multiplication in float64. A pair (a, b) is the
complex number a + ib; at position p, pair i is multiplied by exp(i p theta_i) with
theta_i = base^(-2i/D). Pairs are (x[2i], x[2i+1]) in the interleaved (GPT-J) layout and
(x[i], x[i + D/2]) in the half-split (GPT-NeoX, Llama) layout.

Tolerances: float32 atol=1e-5 against float64 (angles up to ~100 rad); scores at positions
up to ~1000 atol=1e-3 (float32 angles carry ~1e-4 absolute error there, times |q||k| ~ 10).
"""

from __future__ import annotations

import torch

import utils.positional_encoding as pe_ref

from .core import (
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
    random_tensor,
)

F32 = dict(atol=1e-5, rtol=1e-5)
FLOAT32 = torch.zeros(0, dtype=torch.float32)  # "like" this: float32 on the CPU


def _pairs(x: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """(..., D) real -> (..., D/2) complex, in float64."""
    x = x.double()
    if interleaved:
        return torch.complex(x[..., 0::2], x[..., 1::2])
    half = x.shape[-1] // 2
    return torch.complex(x[..., :half], x[..., half:])


def _unpairs(z: torch.Tensor, interleaved: bool) -> torch.Tensor:
    if interleaved:
        return torch.stack([z.real, z.imag], dim=-1).flatten(-2)
    return torch.cat([z.real, z.imag], dim=-1)


def _angles(positions: torch.Tensor, head_dim: int, base: float) -> torch.Tensor:
    """(T,) -> (T, D/2) float64 angles p * base^(-2i/D)."""
    theta = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    return positions.double()[:, None] * theta[None, :]


def rope_reference(x, offset: int, base: float, interleaved: bool) -> torch.Tensor:
    """RoPE of x (..., T, D) with the first row at position ``offset``, float64."""
    positions = torch.arange(offset, offset + x.shape[-2])
    rotation = torch.polar(torch.ones(()).double(), _angles(positions, x.shape[-1], base))
    return _unpairs(_pairs(x, interleaved) * rotation, interleaved)


def rotate_tests(interleaved: bool) -> list[Test]:
    entry = "rotate_interleaved" if interleaved else "rotate_half"
    other = (
        "the half-split layout (pairs (i, i + D/2))"
        if interleaved
        else ("the interleaved layout (pairs (2i, 2i+1))")
    )
    hand_expected = [-2.0, 1.0, -4.0, 3.0] if interleaved else [-3.0, -4.0, 1.0, 2.0]
    hint = (
        "Pairs are (x[2i], x[2i+1]) -> (-x[2i+1], x[2i])."
        if interleaved
        else "Pairs are (x[i], x[i+D/2]) -> (-x[i+D/2], x[i])."
    )

    def expected(x):  # multiply each pair by i: (a, b) -> (-b, a)
        return _unpairs(_pairs(x, interleaved) * 1j, interleaved)

    def wrong(x):
        return _unpairs(_pairs(x, not interleaved) * 1j, not interleaved)

    def call(sub, x):
        return expect_tensor(sub.call(x, names=("x",)), f"{entry}'s output")

    def signature(sub):
        expect_signature(sub.obj, "function", entry)

    def shape_dtype(sub):
        x = random_tensor(2, 3, 5, 8, seed=1, dtype=torch.float32)
        out = call(sub, x)
        expect_shape(out, (2, 3, 5, 8), f"{entry}(x) for x of shape (2, 3, 5, 8)")
        expect_dtype_device(out, x, f"{entry}(x)")

    def hand(sub):
        x = torch.tensor([1.0, 2.0, 3.0, 4.0])
        expect_close(
            call(sub, x),
            torch.tensor(hand_expected),
            f"{entry}([1, 2, 3, 4])",
            atol=0,
            hint=hint,
            diagnoses={f"{other}: the layouts are mixed up": wrong(x)},
        )

    def random(sub):
        x = random_tensor(2, 3, 5, 8, seed=2, dtype=torch.float32)
        want = expected(x)
        expect_close(
            call(sub, x),
            want,
            f"{entry} of random x (2, 3, 5, 8)",
            atol=0,
            hint=hint,
            diagnoses={f"{other}: the layouts are mixed up": wrong(x)},
        )

    return [
        Test("signature: a function", 0, signature),
        Test("shape, dtype and device", 1, shape_dtype),
        Test("hand-sized example [1, 2, 3, 4]", 2, hand),
        Test("random inputs", 1, random),
    ]


def cos_sin_tests() -> list[Test]:
    def call(sub, positions, head_dim, base=10000.0, interleaved=False):
        out = sub.call(positions, head_dim, base=base, interleaved=interleaved)
        cos, sin = expect_tuple(out, 2, "rope_cos_sin's result (cos, sin)")
        return expect_tensor(cos, "cos"), expect_tensor(sin, "sin")

    def expected(positions, head_dim, base, interleaved):
        angles = _angles(positions, head_dim, base)
        angles = angles.repeat_interleave(2, -1) if interleaved else torch.cat([angles] * 2, -1)
        return angles.cos(), angles.sin()

    def signature(sub):
        expect_signature(sub.obj, "function", "rope_cos_sin")

    def shape_dtype(sub):
        cos, sin = call(sub, torch.arange(5), 8)
        for name, x in (("cos", cos), ("sin", sin)):
            expect_shape(x, (5, 8), f"{name} for 5 positions and head_dim 8")
            expect_dtype_device(x, FLOAT32, f"{name} (float32 whatever the positions)")

    def hand(sub):
        for interleaved in (False, True):
            cos, _ = call(sub, torch.tensor([1]), 4, base=100.0, interleaved=interleaved)
            angles = [1.0, 1.0, 0.1, 0.1] if interleaved else [1.0, 0.1, 1.0, 0.1]
            expect_close(
                cos,
                torch.tensor([angles]).cos(),
                f"cos at position 1, head_dim 4, base 100, interleaved={interleaved}",
                **F32,
                hint="theta_i = base^(-2i/D) for i = 0 .. D/2-1: here 1 and 0.1; "
                "interleaved repeats each angle twice, half-split repeats the whole list.",
            )

    def random(sub):
        positions = torch.tensor([0, 3, 17, 42, 99])
        for interleaved in (False, True):
            exp_cos, exp_sin = expected(positions, 16, 10000.0, interleaved)
            wrong = expected(positions, 16, 10000.0, not interleaved)
            cos, sin = call(sub, positions, 16, interleaved=interleaved)
            diag = {"the other layout: the interleaved flag is ignored or swapped": wrong[0]}
            expect_close(cos, exp_cos, f"cos (interleaved={interleaved})", **F32, diagnoses=diag)
            expect_close(sin, exp_sin, f"sin (interleaved={interleaved})", **F32)

    return [
        Test("signature: a function", 0, signature),
        Test("shapes and dtype", 1, shape_dtype),
        Test("hand-sized example", 2, hand),
        Test("positions up to 99, both layouts", 2, random),
    ]


def apply_rope_tests() -> list[Test]:
    def call(sub, q, k, offset=0, interleaved=False, base=10000.0):
        out = sub.call(q, k, offset, base=base, interleaved=interleaved, names=("q", "k"))
        q_rot, k_rot = expect_tuple(out, 2, "apply_rope's result (q_rotated, k_rotated)")
        return expect_tensor(q_rot, "q_rotated"), expect_tensor(k_rot, "k_rotated")

    def qk(t=6, seed=0, dtype=torch.float32):
        return (
            random_tensor(2, 3, t, 8, seed=seed, dtype=dtype),
            random_tensor(2, 3, t, 8, seed=seed + 1, dtype=dtype),
        )

    def signature(sub):
        expect_signature(sub.obj, "function", "apply_rope")

    def shape_dtype(sub):
        q, k = qk()
        for name, x in zip(("q_rotated", "k_rotated"), call(sub, q, k), strict=True):
            expect_shape(x, (2, 3, 6, 8), f"{name} for q, k of shape (2, 3, 6, 8)")
            expect_dtype_device(x, q, name)
            expect_finite(x, name)

    def hand(sub):
        q = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])  # positions 0 and 1
        got, _ = call(sub, q, q.clone(), base=100.0)
        expected = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
        expected[1, 0], expected[1, 2] = torch.tensor(1.0).cos(), torch.tensor(1.0).sin()
        expect_close(
            got,
            expected,
            "apply_rope(q, k, base=100) for q = e_0 at positions 0 and 1 (half-split layout)",
            **F32,
            hint="Position p rotates pair i by p * base^(-2i/D); position 0 is not rotated.",
        )

    def layouts(sub):
        q, k = qk(seed=10)
        for interleaved in (False, True):
            expected = [rope_reference(x, 0, 10000.0, interleaved) for x in (q, k)]
            mixed = [rope_reference(x, 0, 10000.0, not interleaved) for x in (q, k)]
            got = call(sub, q, k, interleaved=interleaved)
            for name, g, e, wrong in zip("qk", got, expected, mixed, strict=True):
                expect_close(
                    g,
                    e,
                    f"rotated {name} (interleaved={interleaved})",
                    **F32,
                    diagnoses={"RoPE with the pairs mixed up (the other layout)": wrong},
                )

    def offset(sub):
        q, k = qk(t=3, seed=20)
        expected = [rope_reference(x, 5, 10000.0, False) for x in (q, k)]
        ignored = [rope_reference(x, 0, 10000.0, False) for x in (q, k)]
        got = call(sub, q, k, offset=5)
        for name, g, e, wrong in zip("qk", got, expected, ignored, strict=True):
            expect_close(
                g,
                e,
                f"rotated {name} of apply_rope(q, k, offset=5): rows are at positions 5, 6, 7",
                **F32,
                hint="With a KV cache, new tokens start at position `offset`, not 0: rotate "
                "both q and k by offset + t.",
                diagnoses={f"{name} rotated at positions 0, 1, 2: the offset is ignored": wrong},
            )

    def base(sub):
        q, k = qk(seed=30)
        expected = [rope_reference(x, 2, 500000.0, False) for x in (q, k)]
        default = [rope_reference(x, 2, 10000.0, False) for x in (q, k)]
        got = call(sub, q, k, offset=2, base=500000.0)
        for name, g, e, wrong in zip("qk", got, expected, default, strict=True):
            expect_close(
                g,
                e,
                f"rotated {name} with base 500000",
                **F32,
                hint="`base` sets theta_i = base^(-2i/D), for q and for k.",
                diagnoses={f"{name} rotated with base 10000: `base` is not passed on": wrong},
            )

    def bfloat16(sub):
        q, k = qk(seed=40, dtype=torch.bfloat16)
        expected = [rope_reference(x, 3, 10000.0, False) for x in (q, k)]
        got = call(sub, q, k, offset=3)
        for name, g, e, x in zip("qk", got, expected, (q, k), strict=True):
            expect_dtype_device(g, x, f"{name}_rotated for bfloat16 {name}")
            expect_close(g, e, f"bfloat16 RoPE of {name}", atol=3e-2)

    return [
        Test("signature: a function", 0, signature),
        Test("shapes, dtype, finite", 1, shape_dtype),
        Test("hand-sized example", 2, hand),
        Test("both layouts vs complex-number reference", 2, layouts),
        Test("position offset (KV cache)", 2, offset),
        Test("base", 1, base),
        Test("bfloat16 (atol 3e-2)", 1, bfloat16),
    ]


def scores_tests() -> list[Test]:
    def call(sub, q, k, query_positions, key_positions, interleaved=False):
        out = sub.call(
            q,
            k,
            query_positions,
            key_positions,
            interleaved=interleaved,
            names=("q", "k", "query_positions", "key_positions"),
        )
        return expect_tensor(out, "rope_scores's output")

    def closed_form(q, k, query_positions, key_positions, interleaved=False):
        """score(m, n) = Re sum_i q_i conj(k_i) exp(i (m - n) theta_i): only m - n appears."""
        relative = (query_positions[:, None] - key_positions[None, :]).flatten()
        phase = torch.polar(torch.ones(()).double(), _angles(relative, q.shape[-1], 10000.0))
        pairs = _pairs(q, interleaved) * _pairs(k, interleaved).conj()  # (D/2,)
        return (phase * pairs).sum(-1).real.view(len(query_positions), len(key_positions))

    q = random_tensor(8, seed=50, dtype=torch.float32)
    k = random_tensor(8, seed=51, dtype=torch.float32)

    def signature(sub):
        expect_signature(sub.obj, "function", "rope_scores")

    def shape(sub):
        out = call(sub, q, k, torch.arange(4), torch.arange(6))
        expect_shape(out, (4, 6), "rope_scores for 4 query and 6 key positions")
        expect_finite(out, "rope_scores's output")

    def values(sub):
        qp, kp = torch.arange(10), torch.arange(12)
        for interleaved in (False, True):
            want = closed_form(q, k, qp, kp, interleaved)
            expect_close(
                call(sub, q, k, qp, kp, interleaved),
                want,
                f"scores <RoPE(q, m), RoPE(k, n)> (interleaved={interleaved})",
                **F32,
                hint="Rotate q to each query position and k to each key position, then take "
                "all dot products (no 1/sqrt(D) here).",
            )

    def relative(sub):
        qp, kp = torch.arange(8), torch.arange(8)
        near = call(sub, q, k, qp, kp)
        far = call(sub, q, k, qp + 1000, kp + 1000)
        expect_close(
            far,
            near,
            "scores with every position shifted by 1000 vs unshifted",
            atol=1e-3,
            hint="RoPE scores depend only on m - n: check the angles use each position.",
        )

    return [
        Test("signature: a function", 0, signature),
        Test("shape and finite values", 1, shape),
        Test("scores vs the closed form in m - n", 2, values),
        Test("shifting all positions leaves scores unchanged (atol 1e-3)", 2, relative),
    ]


REFERENCE_FORBIDDEN = tuple(
    (pe_ref, name, f"this part must not call utils.positional_encoding.{name}: write it yourself")
    for name in ("rotate_half", "rotate_interleaved", "RotaryEmbedding")
)

PARTS = [
    Part(
        "rotate_half",
        "Rotating pairs, half-split layout (GPT-NeoX, Llama)",
        "rotate_half",
        rotate_tests(False),
        forbidden=REFERENCE_FORBIDDEN,
    ),
    Part(
        "rotate_interleaved",
        "Rotating pairs, interleaved layout (GPT-J)",
        "rotate_interleaved",
        rotate_tests(True),
        forbidden=REFERENCE_FORBIDDEN,
    ),
    Part(
        "rope_cos_sin",
        "The cos/sin cache",
        "rope_cos_sin",
        cos_sin_tests(),
        forbidden=REFERENCE_FORBIDDEN,
    ),
    Part(
        "apply_rope",
        "RoPE on queries and keys, with an offset",
        "apply_rope",
        apply_rope_tests(),
        forbidden=REFERENCE_FORBIDDEN,
    ),
    Part(
        "rope_scores",
        "Scores depend only on relative position",
        "rope_scores",
        scores_tests(),
        forbidden=REFERENCE_FORBIDDEN,
    ),
]

__all__ = ["PARTS", "rope_reference", "fail"]
