"""Sphinx extension: drop repeated <script> entries from each page.

With Jupyter Book 1.0.4 / Sphinx 7.4, sphinx-thebe registers its inline configuration script
twice, and the second `const THEBE_JS_URL` is a JavaScript error in every page's console.
"""


def _dedupe(app, pagename, templatename, context, doctree):
    seen, unique = set(), []
    for script in context.get("script_files", []):
        filename = getattr(script, "filename", script) or ""  # None and "" both mean inline
        key = (filename, tuple(sorted(getattr(script, "attributes", {}).items())))
        if key not in seen:
            seen.add(key)
            unique.append(script)
    context["script_files"] = unique


def setup(app):
    app.connect("html-page-context", _dedupe, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
