// Loaded on widget pages between require.js and the ipywidgets HTML manager (embed-amd.js),
// both served by the site itself (see _ext/offline_assets.py).
(function () {
  // The manager finds its icon fonts next to its AMD module "@jupyter-widgets/html-manager/dist/…",
  // resolved against the page's folder: point that name at the folder the files are in.
  const offline = document.currentScript.src.replace(/[^/]*$/, "");
  require.config({ paths: { "@jupyter-widgets/html-manager/dist": offline + "html-manager" } });

  // ipywidgets 8 typesets widget text with MathJax 2's `MathJax.Hub.Queue`; the site loads
  // MathJax 3 (configured by the `window.MathJax` object Sphinx writes before this script).
  const waiting = [];
  const typeset = (element) => {
    const mathjax = window.MathJax;
    if (mathjax.typesetPromise) mathjax.startup.promise.then(() => mathjax.typesetPromise([element]));
    else waiting.push(element);
  };
  const hub = { Queue: (...calls) => calls.forEach((call) => typeset(call[2])) };
  window.MathJax = window.MathJax || {};
  window.MathJax.Hub = hub;
  window.MathJax.startup = {
    ...window.MathJax.startup,
    ready() {
      window.MathJax.startup.defaultReady();
      window.MathJax.Hub = hub;
      window.MathJax.startup.promise.then(() => window.MathJax.typesetPromise(waiting));
    },
  };
})();
