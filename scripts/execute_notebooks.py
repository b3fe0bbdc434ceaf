"""Re-execute notebooks in place, top to bottom, each in a fresh kernel (`make notebooks`).

Widget state is saved so widgets render on the static site. Lab notebooks (``labs/``) are
stored unexecuted and are skipped. Prints the wall time of each notebook.

    make notebooks                              # chapters/ and solutions/
    make notebooks NB=chapters/01_attention.ipynb

Run it through make: the Makefile pins the CPU's floating-point code path (PINNED_ENV), without
which the stored outputs would hold this machine's rounding and fail nbval on another CPU.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
EXECUTED_DIRS = ("chapters", "solutions")
PINNED_ENV = (
    "ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA", "OMP_NUM_THREADS", "MKL_DYNAMIC",
    "OMP_DYNAMIC",
)  # fmt: skip


def execute(path: Path, timeout: int) -> float:
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
        store_widget_state=True,
    )
    start = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - start
    nbformat.write(nb, path)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per cell")
    args = parser.parse_args()
    unset = [name for name in PINNED_ENV if name not in os.environ]
    if unset:
        sys.exit(f"{', '.join(unset)} not set: run `make notebooks` (NB=path for one notebook)")
    paths = args.paths or sorted(p for d in EXECUTED_DIRS for p in (ROOT / d).glob("*.ipynb"))
    for path in paths:
        if path.resolve().parent.name == "labs":
            print(f"skipped (labs are stored unexecuted): {path}")
            continue
        print(f"{execute(path.resolve(), args.timeout):7.1f} s  {path}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
