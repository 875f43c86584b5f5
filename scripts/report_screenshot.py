"""Open a run's report.html in headless Chromium and save a screenshot (the README's picture).

    python scripts/report_screenshot.py RUN_DIR OUT.png [--width 1200] [--height 0: the full page]

Needs Chromium (Debian: `apt-get install chromium`) and the `playwright` Python package (in the
dev extra); no browser is downloaded. Prints the console errors the page raised, if any.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from browser import open_report  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("out")
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=0, help="clip height in pixels (0: the full page)")
    args = parser.parse_args()
    page = open_report(Path(args.run_dir) / "report.html", Path(args.out), args.width, args.height or None)
    for error in page["errors"]:
        print("console:", error)
    print(f"{args.out}: {page['svg']} SVG charts, {page['img']} images")
    return 1 if page["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
