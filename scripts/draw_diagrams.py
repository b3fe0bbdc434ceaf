"""Save every diagram of utils.diagrams as chapters/figures/NAME.svg (run after changing one).

An optional argument names another folder (the test draws there and compares).
"""

import sys
from pathlib import Path

import matplotlib

matplotlib.use("svg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from utils.diagrams import DIAGRAMS  # noqa: E402
from utils.plotting import use_course_style  # noqa: E402

FIGURES = ROOT / "chapters" / "figures"


def main(out: Path = FIGURES) -> None:
    use_course_style()
    plt.rcParams["svg.hashsalt"] = "course"  # stable ids: an unchanged diagram gives the same file
    out.mkdir(exist_ok=True)
    for name, draw in DIAGRAMS.items():
        figure = draw()
        figure.savefig(out / f"{name}.svg", metadata={"Date": None}, bbox_inches="tight")
        plt.close(figure)
        print(out / f"{name}.svg")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else FIGURES)
