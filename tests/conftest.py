"""Shared fixtures: the repository root and the built site (built once per test run).

Without a GPU, Triton kernels run through Triton's interpreter: switched on here, before
anything imports triton. Under pytest-xdist each worker uses its share of the CPU threads.
"""

import fcntl
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from utils.flash_attention import use_triton_interpreter

if not torch.cuda.is_available():
    use_triton_interpreter()

if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    torch.set_num_threads(
        max(1, torch.get_num_threads() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    )

ROOT = Path(__file__).resolve().parents[1]


def toc_files() -> list[str]:
    """The documents listed in _toc.yml (the root, intro, is not among them)."""
    return re.findall(r"file:\s*(\S+)", (ROOT / "_toc.yml").read_text())


@dataclass
class BuiltSite:
    returncode: int
    log: str
    html: Path


@pytest.fixture(scope="session")
def built_site(tmp_path_factory) -> BuiltSite:
    """`jupyter-book build . -W --keep-going` into a temporary folder (keeps the user's _build).

    Built once per run: pytest-xdist workers share the base temporary folder of the run, and the
    first one to take the lock builds while the others wait for its result.
    """
    shared = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        shared = shared.parent
    out, record = shared / "book", shared / "book.json"
    with open(shared / "book.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not record.is_file():
            jupyter_book = Path(sys.executable).parent / "jupyter-book"
            command = [str(jupyter_book), "build", str(ROOT), "-W", "--keep-going"]
            result = subprocess.run(
                [*command, "--path-output", str(out)], capture_output=True, text=True, timeout=600
            )
            log = result.stdout + result.stderr
            record.write_text(json.dumps({"returncode": result.returncode, "log": log}))
    built = json.loads(record.read_text())
    return BuiltSite(built["returncode"], built["log"], out / "_build" / "html")
