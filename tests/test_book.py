"""The book builds with warnings as errors, and the pages carry what readers need."""

from conftest import toc_files


def test_book_builds_without_warnings(built_site):
    warnings = [line for line in built_site.log.splitlines() if "WARNING" in line]
    details = "\n".join(warnings) or built_site.log[-3000:]
    assert built_site.returncode == 0 and not warnings, details


def test_every_toc_entry_has_a_page(built_site):
    for entry in ["intro", *toc_files()]:
        assert (built_site.html / f"{entry}.html").is_file(), f"no page for {entry}"


def test_notebook_pages_have_colab_and_binder_buttons(built_site):
    page = (built_site.html / "chapters" / "01_attention.html").read_text()
    assert "colab.research.google.com/github/" in page
    assert "mybinder.org/v2/gh/" in page


def test_citations_resolve_to_the_bibliography(built_site):
    bibliography = (built_site.html / "bibliography.html").read_text()
    assert "Attention is all you need" in bibliography  # the style sets titles in sentence case
    chapter = (built_site.html / "chapters" / "01_attention.html").read_text()
    assert 'href="../bibliography.html#id' in chapter, (
        "chapter 1's citations link to the bibliography"
    )
