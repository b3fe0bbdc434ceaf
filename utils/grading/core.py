"""The grading machinery: parts made of staged tests, a guarded call into learner code, and
comparisons that say what is wrong.

A :class:`Part` is one graded function or class of a lab. Its tests run in order from cheap to
deep and the part stops at the first test that does not pass (later ones are SKIPPED), so the
learner sees one root cause at a time. Every test ends as one :class:`Status`.

Learner code only ever runs through :meth:`Submission.call`, which
* passes copies of the tensor arguments and reports an input modified in place,
* captures (and bounds) whatever it prints,
* stops it after the part's time limit (see :func:`time_limit`),
* makes the part's forbidden functions raise (see :func:`forbid`),
* watches every tensor it creates (a ``TorchDispatchMode``) and stops it when one exceeds the
  part's element budget (flash attention must never build the T x S matrix),
* makes the functions that would end or hijack the grading process raise (``os._exit``,
  ``os.kill``, signal handlers, ``sys.settrace``: see :data:`PROCESS_FORBIDDEN`),
* turns ``NotImplementedError``, ``sys.exit()`` and any other exception into a clear message,
* puts torch's global state back as it was when the grader was imported
  (:mod:`utils.grading.sandbox`), so nothing a call changes reaches the grader's references
  or the next part.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import io
import math
import os
import re
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from utils.memory import TensorMemoryTracker

from .sandbox import PRISTINE, clean_torch


class Status(str, enum.Enum):  # noqa: UP042 - StrEnum needs Python 3.11
    PASS = "PASS"
    FAIL = "FAIL"
    ERROR = "ERROR"
    TIMEOUT = "TIMEOUT"
    NOT_IMPLEMENTED = "NOT IMPLEMENTED"
    FORBIDDEN = "FORBIDDEN"
    SKIPPED = "SKIPPED"  # not run: an earlier test of the part did not pass


class Outcome(Exception):
    """Raised by a test (or by a guarded call) to end it with a status other than PASS."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class GradingTimeout(BaseException):
    """Raised inside learner code when its time is up (BaseException: ``except Exception``
    in learner code does not swallow it)."""


class ForbiddenCall(BaseException):
    """Raised when learner code calls a function its part forbids."""


class TensorTooLarge(BaseException):
    """Raised when learner code creates a tensor above the part's element budget."""


def fail(message: str) -> None:
    raise Outcome(Status.FAIL, message)


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


@dataclass
class TestResult:
    name: str
    status: Status
    points: float
    max_points: float
    message: str = ""


@dataclass
class PartResult:
    part: str
    title: str
    tests: list[TestResult] = field(default_factory=list)

    @property
    def score(self) -> float:
        return sum(t.points for t in self.tests)

    @property
    def max_score(self) -> float:
        return sum(t.max_points for t in self.tests)

    def to_dict(self) -> dict:
        tests = [{**asdict(t), "status": t.status.value} for t in self.tests]
        return dict(
            part=self.part,
            title=self.title,
            score=self.score,
            max_score=self.max_score,
            tests=tests,
        )

    def report(self) -> str:
        lines = [f"{self.title} ({self.part}): {self.score:g} / {self.max_score:g} points"]
        for t in self.tests:
            lines.append(f"  {t.status.value:15} {t.name} ({t.points:g}/{t.max_points:g})")
            if t.message and t.status not in (Status.PASS, Status.SKIPPED):
                lines.extend("      " + m for m in t.message.splitlines())
        if any(t.status is Status.SKIPPED for t in self.tests):
            lines.append(f"  ({NOT_RUN})")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Parts and tests
# ---------------------------------------------------------------------------------------------


@dataclass
class Test:
    """One stage: ``run(submission)`` returns on success, raises :class:`Outcome` otherwise."""

    name: str
    points: float
    run: Callable[[Submission], None]


@dataclass
class Part:
    """A graded function or class, found in the notebook under the global name ``entry``.

    ``forbidden``: (object holding it, attribute name, what to tell the learner) triples that
    raise while the learner's code runs; ``forbidden_ops``: (regular expression matching whole
    ATen operator names that must not run, message) pairs; ``max_numel``: ``f(args)``, the
    largest tensor a call with those arguments may create (None: unlimited).
    """

    name: str
    title: str
    entry: str
    tests: list[Test]
    forbidden: tuple[tuple[object, str, str], ...] = ()
    forbidden_ops: tuple[tuple[str, str], ...] = ()
    max_numel: Callable[[tuple], int] | None = None
    timeout: float = 20.0
    kind: str = "function"  # or "class" / "autograd.Function"

    @property
    def max_score(self) -> float:
        return sum(t.points for t in self.tests)


# ---------------------------------------------------------------------------------------------
# Guards
# ---------------------------------------------------------------------------------------------


# The time limit's own tools, saved before learner code can replace them (and while it runs,
# PROCESS_FORBIDDEN makes the public names raise).
_settrace, _signal, _setitimer = sys.settrace, signal.signal, signal.setitimer

_PACKAGE_DIR = str(Path(__file__).resolve().parent)
_LIBRARY_DIRS = tuple({sys.prefix, sys.base_prefix, sys.exec_prefix})


def _is_learner_code(frame) -> bool:
    """True for frames of code outside the grader, the standard library and installed
    packages (notebook cells, test modules)."""
    filename = frame.f_code.co_filename
    return not filename.startswith((_PACKAGE_DIR, *_LIBRARY_DIRS, "<frozen"))


def _raise_on_every_line(frame, event, arg):
    if event == "line" and _is_learner_code(frame):
        raise GradingTimeout
    return _raise_on_every_line


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`GradingTimeout` in the running code after ``seconds``.

    On the main thread of a POSIX process (a Jupyter kernel runs cells there) this is a
    ``SIGALRM`` interval timer: Python runs the handler between bytecodes and interrupts
    ``time.sleep``, so ``while True: pass`` stops. If learner code swallows it (a bare
    ``except:`` in a loop), the timer fires again every 0.5 s and from then on also raises on
    every new line of learner code (``sys.settrace``), which eventually runs outside the
    ``try``. Elsewhere (another thread, Windows) a watchdog thread injects the exception with
    ``PyThreadState_SetAsyncExc`` every 0.5 s; it cannot interrupt a blocking C call. A single
    long C call (one huge matmul) ends before the timeout can act; the command-line grader's
    per-cell limit on the whole kernel is the last resort.
    """
    if hasattr(signal, "SIGALRM") and threading.current_thread() is threading.main_thread():
        fired = []

        def handler(signum, frame):
            fired.append(True)
            if len(fired) > 1:  # the first one was swallowed: raise on every learner line
                _settrace(_raise_on_every_line)
                while frame is not None:
                    if _is_learner_code(frame):
                        frame.f_trace = _raise_on_every_line
                    frame = frame.f_back
            raise GradingTimeout

        previous = _signal(signal.SIGALRM, handler)
        _setitimer(signal.ITIMER_REAL, seconds, 0.5)
        try:
            yield
        finally:
            _setitimer(signal.ITIMER_REAL, 0)
            _signal(signal.SIGALRM, previous)
            if fired:
                _settrace(None)
        return

    target, done = threading.get_ident(), threading.Event()

    def watchdog():
        if done.wait(seconds):
            return
        while not done.is_set():
            ctypes.pythonapi.PyThreadState_SetAsyncExc(
                ctypes.c_ulong(target), ctypes.py_object(GradingTimeout)
            )
            done.wait(0.5)

    threading.Thread(target=watchdog, daemon=True).start()
    try:
        yield
    finally:
        done.set()


_ENDS_THE_PROCESS = "would end the grading process: a graded function returns its result"
_HIJACKS_THE_TIMER = "is the grader's: it enforces the time limit with it"
PROCESS_FORBIDDEN: tuple[tuple[object, str, str], ...] = (
    (os, "_exit", f"your code called os._exit(), which {_ENDS_THE_PROCESS}"),
    (os, "abort", f"your code called os.abort(), which {_ENDS_THE_PROCESS}"),
    (os, "kill", f"your code called os.kill(), which {_ENDS_THE_PROCESS}"),
    (os, "killpg", f"your code called os.killpg(), which {_ENDS_THE_PROCESS}"),
    *(
        (
            signal,
            name,
            f"your code called signal.{name}(): the signal handling {_HIJACKS_THE_TIMER}",
        )
        for name in ("signal", "setitimer", "alarm", "pthread_sigmask", "pthread_kill")
    ),
    (sys, "settrace", f"your code called sys.settrace(): the tracer {_HIJACKS_THE_TIMER}"),
)
"""Forbidden in every part: what would end the grading process or disarm the time limit."""


@contextlib.contextmanager
def forbid(
    forbidden: tuple[tuple[object, str, str], ...], namespaces: list[dict]
) -> Iterator[None]:
    """Make each ``owner.attribute`` raise :class:`ForbiddenCall`, both on its owner and
    wherever the learner's globals hold the same object (``from torch.nn.functional import
    scaled_dot_product_attention`` binds a second name). Yields ``{id(original): raiser}``,
    so that a submission which *is* a forbidden object raises too."""
    saved, swaps = [], {}
    for owner, attribute, message in forbidden:
        original = getattr(owner, attribute, None)
        if original is None:
            continue

        def raiser(*args, _message=message, **kwargs):
            raise ForbiddenCall(_message)

        saved.append((owner, attribute, original))
        swaps[id(original)] = raiser
        setattr(owner, attribute, raiser)
        for namespace in namespaces:
            for name, value in list(namespace.items()):
                if value is original:
                    saved.append((namespace, name, original))
                    namespace[name] = raiser
    try:
        yield swaps
    finally:
        for owner, name, original in reversed(saved):
            if isinstance(owner, dict):
                owner[name] = original
            else:
                setattr(owner, name, original)


class CallWatch(TensorMemoryTracker):
    """A :class:`TensorMemoryTracker` that stops the call at a forbidden ATen operator or at
    the first tensor with more than ``max_numel`` elements."""

    def __init__(
        self, inputs, forbidden_ops: tuple[tuple[str, str], ...], max_numel: int | None
    ) -> None:
        super().__init__(inputs)
        self.forbidden_ops, self.max_numel = forbidden_ops, max_numel

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        for pattern, message in self.forbidden_ops:
            if re.fullmatch(pattern, name):
                raise ForbiddenCall(f"{message} (it ran the ATen operator {name})")
        out = super().__torch_dispatch__(func, types, args, kwargs)
        numel, shape, op = self.largest
        if self.max_numel is not None and numel > self.max_numel:
            raise TensorTooLarge(
                f"your code materialised a tensor of shape {shape} ({numel:,} elements, "
                f"made by {op}); the budget for this call is {self.max_numel:,} elements, "
                "about the size of the inputs plus a few tiles: never build the full "
                "T x S matrix"
            )
        return out


class BoundedText(io.StringIO):
    """A stdout replacement that keeps only the first ``limit`` characters."""

    def __init__(self, limit: int = 2000) -> None:
        super().__init__()
        self.limit, self.total = limit, 0

    def write(self, text: str) -> int:
        self.total += len(text)
        room = self.limit - self.tell()
        if room > 0:
            super().write(text[:room])
        return len(text)


def _where(error: BaseException, fn: object) -> str:
    """' (line N of your code)' for the deepest frame in the learner's code, if any."""
    code = getattr(fn, "__code__", None) or getattr(getattr(fn, "forward", None), "__code__", None)
    filename = code.co_filename if code else None
    frames = [f for f in traceback.extract_tb(error.__traceback__) if f.filename == filename]
    if not frames:
        return ""
    return f" (line {frames[-1].lineno} of your cell: `{(frames[-1].line or '').strip()}`)"


def _clone(x):
    if isinstance(x, Tensor):
        return x.detach().clone().requires_grad_(x.requires_grad)
    if isinstance(x, tuple | list):
        return type(x)(_clone(y) for y in x)
    return x


def describe(x) -> str:
    """A short description of a value for messages: tensors by shape and dtype."""
    if isinstance(x, Tensor):
        return f"a tensor of shape {tuple(x.shape)} and dtype {x.dtype} on {x.device}"
    if isinstance(x, tuple | list):
        items = ", ".join(describe(y) for y in x[:3]) + (", ..." if len(x) > 3 else "")
        return f"a {type(x).__name__} of {len(x)} items ({items})"
    return f"a {type(x).__name__} ({str(x)[:60]})"


@dataclass
class Submission:
    """The learner's object for one part, and the guards every call into it goes through."""

    part: Part
    obj: object
    calls: int = 0
    printed: int = 0

    def call(self, *args, fn: Callable | None = None, names: tuple[str, ...] = (), **kwargs):
        """Call ``fn`` (default the submitted object) on copies of ``args``; returns its result.

        ``names`` name the positional arguments in messages about in-place modification.
        """
        fn = self.obj if fn is None else fn
        args = tuple(_clone(a) for a in args)
        originals = [a.detach().clone() if isinstance(a, Tensor) else None for a in args]
        budget = self.part.max_numel(args) if self.part.max_numel else None
        namespaces = [g for g in (_globals_of(self.obj),) if g is not None]
        out = BoundedText()
        self.calls += 1
        try:
            with (
                contextlib.redirect_stdout(out),
                contextlib.redirect_stderr(out),
                forbid(PROCESS_FORBIDDEN + self.part.forbidden, namespaces) as swaps,
                CallWatch(args, self.part.forbidden_ops, budget),
            ):
                result = swaps.get(id(fn), fn)(*args, **kwargs)
        except SystemExit as error:
            code = "" if error.code is None else repr(error.code)
            raise Outcome(
                Status.ERROR,
                f"your `{self.part.entry}` called sys.exit({code}) or exit(), which "
                f"{_ENDS_THE_PROCESS}{_where(error, self.obj)}",
            ) from None
        except NotImplementedError as error:
            raise Outcome(
                Status.NOT_IMPLEMENTED,
                f"your `{self.part.entry}` still raises NotImplementedError: replace the "
                f"`raise NotImplementedError` under `# YOUR CODE HERE`{_where(error, self.obj)}",
            ) from None
        except ForbiddenCall as error:
            raise Outcome(Status.FORBIDDEN, str(error)) from None
        except TensorTooLarge as error:
            raise Outcome(Status.FAIL, str(error)) from None
        except (GradingTimeout, Outcome):
            raise
        except Exception as error:  # anything a learner's code can raise
            raise Outcome(
                Status.ERROR,
                f"your `{self.part.entry}` raised {type(error).__name__}: "
                f"{str(error)[:300]}{_where(error, self.obj)}",
            ) from None
        finally:
            self.printed += out.total
            PRISTINE.restore()  # nothing the call changed in torch reaches the grader
        for index, (arg, original) in enumerate(zip(args, originals, strict=True)):
            if original is not None and not _same(arg.detach(), original):
                name = names[index] if index < len(names) else f"argument {index + 1}"
                fail(
                    f"your `{self.part.entry}` modified its input `{name}` in place; "
                    "inputs must be left unchanged (use out-of-place ops, or .clone() first)"
                )
        return result


def _globals_of(obj) -> dict | None:
    if hasattr(obj, "__globals__"):
        return obj.__globals__
    for name in ("forward", "__init__", "backward"):
        method = getattr(obj, name, None)
        if hasattr(method, "__globals__"):
            return method.__globals__
    return None


def _same(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


# ---------------------------------------------------------------------------------------------
# Running a part
# ---------------------------------------------------------------------------------------------

NOT_RUN = "not run: fix the first check that did not pass, then run the self-check again"


def _warm_up() -> None:
    """Run the dispatch-mode machinery once outside any time limit: its first use imports
    modules lazily (sympy), and a timeout during an import would leave it half-imported."""
    x = torch.ones(2, 2, requires_grad=True)
    with CallWatch((), (), None):
        torch.autograd.grad((torch.softmax(x @ x, -1) * x.exp()).sum(), x)


def _run_test(test: Test, submission: Submission, timeout: float) -> tuple[Status, str]:
    try:
        with time_limit(timeout):
            test.run(submission)
    except Outcome as outcome:
        return outcome.status, outcome.message
    except GradingTimeout:
        return Status.TIMEOUT, (
            f"stopped after {timeout:g} s: an infinite loop, or far too much work "
            "(a Python loop over single elements instead of tiles?)"
        )
    except KeyboardInterrupt:
        return Status.TIMEOUT, "interrupted (Ctrl-C, or the command-line grader's time limit)"
    except (Exception, SystemExit) as error:  # a bug in the check itself: say so, never crash
        return Status.ERROR, f"the grader failed while checking: {type(error).__name__}: {error}"
    return Status.PASS, ""


def run_part(part: Part, obj: object) -> PartResult:
    """Grade ``obj`` as ``part``: run the tests in order, stop at the first that fails.

    The part runs on the torch state the grader was imported with, whatever earlier cells or
    parts changed; the caller gets its own state back afterwards."""
    result = PartResult(part.name, part.title)
    submission = Submission(part, obj)
    stopped = False
    with clean_torch():
        _warm_up()
        for test in part.tests:
            if stopped:
                result.tests.append(TestResult(test.name, Status.SKIPPED, 0, test.points, NOT_RUN))
                continue
            status, message = _run_test(test, submission, part.timeout)
            points = test.points if status is Status.PASS else 0
            result.tests.append(TestResult(test.name, status, points, test.points, message))
            stopped = status is not Status.PASS
    return result


# ---------------------------------------------------------------------------------------------
# Assertions used by the tests, each with a message that says what is wrong
# ---------------------------------------------------------------------------------------------


def expect_tensor(x, what: str, hint: str = "") -> Tensor:
    if not isinstance(x, Tensor):
        fail(f"{what} should be a torch.Tensor, got {describe(x)}. {hint}".strip())
    return x


def expect_tuple(x, length: int, what: str) -> tuple:
    if not isinstance(x, tuple | list) or len(x) != length:
        fail(f"{what} should be a tuple of {length} tensors, got {describe(x)}")
    return tuple(x)


def expect_shape(x: Tensor, shape: tuple[int, ...], what: str, hint: str = "") -> None:
    if tuple(x.shape) != tuple(shape):
        fail(f"{what} has shape {tuple(x.shape)}, expected {tuple(shape)}. {hint}".strip())


def expect_dtype_device(x: Tensor, like: Tensor, what: str) -> None:
    if x.dtype != like.dtype:
        fail(
            f"{what} has dtype {x.dtype}, expected {like.dtype} (the input's dtype): "
            "do not hard-code float32/float64, cast back with .to(q.dtype)"
        )
    if x.device != like.device:
        fail(f"{what} is on {x.device}, expected {like.device} (the input's device)")


def expect_finite(x: Tensor, what: str, hint: str = "") -> None:
    bad = ~torch.isfinite(x.detach())
    if bad.any():
        index = tuple(int(i) for i in bad.nonzero()[0])
        nan, inf = int(x.isnan().sum()), int(x.isinf().sum())
        fail(
            f"{what} contains {nan} NaN and {inf} inf values (first at index {index}). "
            f"{hint}".strip()
        )


def expect_close(
    got: Tensor,
    expected: Tensor,
    what: str,
    atol: float,
    rtol: float = 0.0,
    hint: str = "",
    diagnoses: dict[str, Tensor] | None = None,
) -> None:
    """Fail with the max error, where it is, and the two values there. ``diagnoses`` maps a
    description of a known mistake to the output that mistake gives: when the learner's
    output matches one, the message names the mistake."""
    got64, expected64 = got.detach().double().cpu(), expected.detach().double().cpu()
    error = (got64 - expected64).abs()
    excess = error - (atol + rtol * expected64.abs())
    excess = torch.where(torch.isnan(excess), math.inf, excess)
    if excess.max() > 0:
        flat = int(excess.argmax())
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), got.shape))
        max_error = error.nan_to_num(math.inf).max().item()
        for mistake, wrong in (diagnoses or {}).items():
            if wrong.shape == got.shape and torch.allclose(
                got64, wrong.double().cpu(), atol=10 * atol + 1e-6, rtol=10 * rtol
            ):
                hint = f"Your output matches {mistake}. {hint}"
                break
        fail(
            f"{what} differs from the reference: max abs error {max_error:.3g}; worst at index "
            f"{index}: got {got64[index].item():.6g}, expected {expected64[index].item():.6g} "
            f"(tolerance atol={atol:g}, rtol={rtol:g}). {hint}".strip()
        )


def large_score_tensor(*shape: int, seed: int, magnitude: float) -> Tensor:
    """float32 entries +-magnitude: with D = 16 and magnitude 16, q k^T / sqrt(D) is an exact
    multiple of 64 up to 1024 in float32, so a float32 result can match float64 to 1e-5
    while a naive exp(1024) overflows."""
    signs = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).sign()
    return signs * magnitude


def random_tensor(*shape: int, seed: int, dtype=torch.float64, scale: float = 1.0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def expect_signature(obj, kind: str, entry: str) -> None:
    """Cheapest stage: the object exists and has the right kind."""
    if kind == "function" and not callable(obj):
        fail(f"`{entry}` should be a function, got {describe(obj)}")
    if kind == "class" and not isinstance(obj, type):
        fail(f"`{entry}` should be a class (an nn.Module subclass), got {describe(obj)}")
    if kind == "autograd.Function" and not (
        isinstance(obj, type) and issubclass(obj, torch.autograd.Function)
    ):
        fail(f"`{entry}` should be a subclass of torch.autograd.Function, got {describe(obj)}")


# Every attention part forbids PyTorch's fused kernel: the point is to write it yourself.
TORCH_SDPA_FORBIDDEN = (
    F,
    "scaled_dot_product_attention",
    "this part must not call torch's scaled_dot_product_attention",
)
# ... and the aten ops behind it, caught when they run (``Part.forbidden_ops``).
SDPA_OPS = (
    ("_?scaled_dot_product.*", "this part must not call torch's scaled_dot_product_attention"),
)
