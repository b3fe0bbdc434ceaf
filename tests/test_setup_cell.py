"""Every notebook starts with the current setup cell, built from _config.yml's repository.url."""

import importlib.util
import json

from conftest import ROOT

spec = importlib.util.spec_from_file_location("sync", ROOT / "scripts" / "sync_setup_cell.py")
sync = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sync)


def test_repository_url_comes_from_config():
    assert sync.repository_url().startswith("https://github.com/")
    assert sync.repository_url() in sync.setup_cell_source()


def test_every_notebook_has_the_current_setup_cell():
    stale = [p.name for p in sync.notebooks() if not sync.sync(p, check=True)]
    assert not stale, f"run `python scripts/sync_setup_cell.py`; stale: {stale}"


def test_setup_cell_is_a_no_op_outside_colab(tmp_path, monkeypatch):
    """Locally the cell only puts the repository root on sys.path (no clone, no install)."""
    monkeypatch.chdir(ROOT / "chapters")
    namespace: dict = {}
    import sys

    before = list(sys.path)
    try:
        exec(sync.setup_cell_source(), namespace)
        assert sys.path[0] == str(ROOT)
        assert not namespace["IN_COLAB"]
    finally:
        sys.path[:] = before


def test_sync_inserts_the_cell_into_a_new_notebook(tmp_path):
    nb = {
        "cells": [{"cell_type": "markdown", "metadata": {}, "source": "# Title"}],
        "metadata": {},
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    path = tmp_path / "new.ipynb"
    path.write_text(json.dumps(nb))
    assert not sync.sync(path, check=False)
    assert sync.sync(path, check=True)
    cells = json.loads(path.read_text())["cells"]
    assert cells[0]["cell_type"] == "markdown"
    assert "".join(cells[1]["source"]) == sync.setup_cell_source()
