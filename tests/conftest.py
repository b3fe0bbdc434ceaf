"""Shared fixtures: the repository root and the built site (built once per test session).

Without a GPU, Triton kernels run through Triton's interpreter: switched on here, before
anything imports triton.
"""

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from utils.flash_attention import use_triton_interpreter

if not torch.cuda.is_available():
    use_triton_interpreter()

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class BuiltSite:
    returncode: int
    log: str
    html: Path


@pytest.fixture(scope="session")
def built_site(tmp_path_factory) -> BuiltSite:
    """`jupyter-book build . -W --keep-going` into a temporary folder (keeps the user's _build)."""
    out = tmp_path_factory.mktemp("book")
    jupyter_book = Path(sys.executable).parent / "jupyter-book"
    result = subprocess.run(
        [str(jupyter_book), "build", str(ROOT), "-W", "--keep-going", "--path-output", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    return BuiltSite(result.returncode, result.stdout + result.stderr, out / "_build" / "html")
