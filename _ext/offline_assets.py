"""Sphinx extension: the site serves MathJax, RequireJS and the ipywidgets HTML manager itself.

`npm ci` (run by `make setup`) installs the pinned packages of `package.json` into
`node_modules/`; when an HTML build finishes, the files the pages load are copied, with their
licences, into `_build/html/_static/offline/`, where `_config.yml` points `mathjax_path` and
MyST-NB's `nb_ipywidgets_js`. They are not kept under a source `_static/` folder because
Jupyter Book 1 adds every `.js` file found there to every page.
"""

import shutil
from pathlib import Path

from sphinx.util import logging

HERE = Path(__file__).parent
LICENSES = HERE / "licenses"

# destination under _static/offline -> (folder in node_modules, what the pages load from it)
ASSETS = {
    "mathjax": (
        "mathjax/es5",
        ["tex-mml-chtml.js", "input", "output/chtml", "a11y", "ui", "sre", "adaptors"],
    ),
    "requirejs": ("requirejs", ["require.js"]),
    "html-manager": (
        "@jupyter-widgets/html-manager/dist",
        ["embed-amd.js", "embed.js.LICENSE.txt", "*.woff2", "*.woff", "*.ttf", "*.eot", "*.svg"],
    ),
}
# destination -> its licence: a file in node_modules, or in _ext/licenses where the package
# names its licence only in package.json
LICENSE_FILES = {
    "mathjax": "mathjax/LICENSE",
    "requirejs": LICENSES / "requirejs.txt",
    "html-manager": LICENSES / "jupyter-widgets-html-manager.txt",
    "fontawesome": "@fortawesome/fontawesome-free/LICENSE.txt",  # the widget manager's icons
}


def copy_assets(node_modules: Path, static: Path) -> list[str]:
    """Copy ASSETS and their licences into static/offline; return what node_modules lacks."""
    missing = []
    for folder, (package, patterns) in ASSETS.items():
        source, target = node_modules / package, static / "offline" / folder
        for pattern in patterns:
            matches = sorted(source.glob(pattern))
            missing += [] if matches else [f"{package}/{pattern}"]
            for path in matches:
                dest = target / path.relative_to(source)
                dest.parent.mkdir(parents=True, exist_ok=True)
                if path.is_dir():
                    shutil.copytree(path, dest, dirs_exist_ok=True)
                else:
                    shutil.copy2(path, dest)
    for folder, licence in LICENSE_FILES.items():
        licence = node_modules / licence  # a path in _ext/licenses is absolute: kept as is
        if not licence.is_file():
            missing.append(str(licence))
            continue
        (static / "offline" / folder).mkdir(parents=True, exist_ok=True)
        shutil.copy2(licence, static / "offline" / folder / "LICENSE.txt")
    shutil.copy2(HERE / "offline_widgets.js", static / "offline" / "widgets.js")
    return missing


def _copy_on_finish(app, exception):
    if exception is not None or app.builder.format != "html":
        return
    node_modules = Path(app.confdir) / "node_modules"
    missing = copy_assets(node_modules, Path(app.outdir) / "_static")
    if missing:
        logging.getLogger(__name__).warning(
            "offline assets missing from %s (run `npm ci`, or `make setup`): %s",
            node_modules,
            ", ".join(missing),
        )


def setup(app):
    app.connect("build-finished", _copy_on_finish)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
