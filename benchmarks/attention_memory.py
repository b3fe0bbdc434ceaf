"""Peak extra memory and time of naive attention, our flash-style forward and torch's SDPA.

    python benchmarks/attention_memory.py                      # N = 512 ... 8192, CPU (+ CUDA)
    python benchmarks/attention_memory.py --sizes 512 1024 --threads 2

Shapes: q, k, v of (B, H, N, D) = (1, 2, N, 64) float32, non-causal.

Memory is "extra": bytes beyond the inputs q, k, v, measured two ways on CPU.

* ``tensors``: :class:`utils.memory.TensorMemoryTracker`, a ``TorchDispatchMode``
  that sees every tensor an operator returns and keeps the running total of live storage
  (each storage counted once, released when its last Python tensor dies); the peak of that
  total is reported. Exact and deterministic, but blind to buffers an operator allocates
  privately inside one kernel (torch's fused SDPA kernel keeps its working tiles there).
* ``rss``: each (method, N) runs in a fresh subprocess (Linux only); after imports, a warm-up
  call at small N and the creation of the inputs, it resets the kernel's resident-memory
  high-water mark (writing ``5`` to ``/proc/self/clear_refs``), reads the current resident
  memory ``VmRSS``, runs the method once, and reports ``VmHWM - VmRSS``: the peak extra memory
  the operating system saw, allocator effects included (pages freed earlier and reused by the
  allocator do not show, so small values are a lower bound).

Time is the median wall time of a few calls after one warm-up (one call for the largest
sizes). On a GPU the script also reports ``torch.cuda.max_memory_allocated`` above the inputs
and the Triton kernel. The max error is against float64 attention (torch SDPA in float64).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.attention import scaled_dot_product_attention  # noqa: E402
from utils.flash_attention import (  # noqa: E402
    flash_attention_forward,
    triton_flash_attention_forward,
    use_triton_interpreter,
)
from utils.memory import TensorMemoryTracker  # noqa: E402

if not torch.cuda.is_available():
    use_triton_interpreter()  # the Triton kernel runs on CPU tensors

BATCH, HEADS, HEAD_DIM = 1, 2, 64
BLOCK = 128


def naive(q, k, v):
    return scaled_dot_product_attention(q, k, v)


def flash(q, k, v):
    return flash_attention_forward(q, k, v, block_size_q=BLOCK, block_size_k=BLOCK)[0]


def torch_sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def triton_flash(q, k, v):
    return triton_flash_attention_forward(q, k, v, block_size_q=64, block_size_k=64)[0]


METHODS = {"naive": naive, "flash": flash, "torch_sdpa": torch_sdpa, "triton": triton_flash}


def make_inputs(n: int, device: str = "cpu") -> tuple[torch.Tensor, ...]:
    gen = torch.Generator(device=device).manual_seed(0)
    return tuple(
        torch.randn(BATCH, HEADS, n, HEAD_DIM, generator=gen, device=device) for _ in range(3)
    )


def proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def child_rss(method: str, n: int) -> None:
    """Run in a fresh process: print the rise of peak RSS during one call, in bytes."""
    fn = METHODS[method]
    fn(*make_inputs(256))  # load kernels and libraries before the baseline
    q, k, v = make_inputs(n)
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark VmHWM to VmRSS
    before = proc_status_bytes("VmRSS")
    out = fn(q, k, v)
    print(json.dumps({"rss": proc_status_bytes("VmHWM") - before, "numel": out.numel()}))


def rss_in_subprocess(method: str, n: int, threads: int) -> int:
    command = [sys.executable, __file__, "--child", method, str(n), "--threads", str(threads)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["rss"]


def wall_time(fn, inputs, repeats: int) -> float:
    fn(*inputs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*inputs)
        if inputs[0].is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def max_error(fn, inputs) -> float:
    expected = F.scaled_dot_product_attention(*(x.double() for x in inputs))
    return (fn(*inputs).double() - expected).abs().max().item()


def cpu_rows(sizes: list[int], threads: int) -> list[dict]:
    rows = []
    for n in sizes:
        inputs = make_inputs(n)
        for method in ("naive", "flash", "torch_sdpa"):
            fn = METHODS[method]
            with TensorMemoryTracker(inputs=inputs) as tracker:
                fn(*inputs)
            rows.append(
                dict(
                    device="cpu",
                    method=method,
                    n=n,
                    tensors_mib=tracker.peak_bytes / 2**20,
                    rss_mib=rss_in_subprocess(method, n, threads) / 2**20,
                    time_ms=1e3 * wall_time(fn, inputs, repeats=1 if n >= 4096 else 3),
                    max_error=max_error(fn, inputs),
                )
            )
            print(format_row(rows[-1]), flush=True)
    return rows


def cuda_rows(sizes: list[int]) -> list[dict]:
    rows = []
    for n in sizes:
        inputs = make_inputs(n, "cuda")
        for method in ("naive", "flash", "torch_sdpa", "triton"):
            fn = METHODS[method]
            fn(*inputs)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn(*inputs)
            torch.cuda.synchronize()
            rows.append(
                dict(
                    device="cuda",
                    method=method,
                    n=n,
                    tensors_mib=(torch.cuda.max_memory_allocated() - base) / 2**20,
                    rss_mib=float("nan"),
                    time_ms=1e3 * wall_time(fn, inputs, repeats=5),
                    max_error=max_error(fn, inputs),
                )
            )
            print(format_row(rows[-1]), flush=True)
    return rows


HEADER = (
    f"{'device':6} {'method':10} {'N':>5} {'tensors MiB':>12} {'RSS MiB':>9} {'ms':>9} "
    f"{'max err':>9}"
)


def format_row(row: dict) -> str:
    return (
        f"{row['device']:6} {row['method']:10} {row['n']:5d} {row['tensors_mib']:12.2f} "
        f"{row['rss_mib']:9.1f} {row['time_ms']:9.1f} {row['max_error']:9.1e}"
    )


def summary(rows: list[dict], n: int) -> str:
    by_method = {r["method"]: r for r in rows if r["n"] == n and r["device"] == "cpu"}
    if not {"naive", "flash"} <= by_method.keys():
        return ""
    naive_row, flash_row = by_method["naive"], by_method["flash"]
    return (
        f"N={n}: flash / naive peak extra memory = "
        f"{flash_row['tensors_mib'] / naive_row['tensors_mib']:.4f} (tensors), "
        f"{flash_row['rss_mib'] / max(naive_row['rss_mib'], 1e-9):.4f} (RSS); "
        f"flash max error {flash_row['max_error']:.1e}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        child_rss(args.child[0], int(args.child[1]))
        return
    print(f"(B, H, D) = ({BATCH}, {HEADS}, {HEAD_DIM}), float32, flash block {BLOCK}")
    print(f"torch {torch.__version__}, {args.threads} CPU threads")
    print(HEADER)
    rows = cpu_rows(args.sizes, args.threads)
    if torch.cuda.is_available():
        rows += cuda_rows(args.sizes)
    print(summary(rows, 4096 if 4096 in args.sizes else max(args.sizes)))


if __name__ == "__main__":
    main()
