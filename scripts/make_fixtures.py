#!/usr/bin/env python3
"""Generate the audit's PDF fixtures (deterministic; cached in data/fixtures/ by a hash of their parameters).

    python scripts/make_fixtures.py --profile quick|standard|full
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.audit.base.fixtures import HOSTILE, PROFILES, build_fixtures  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="standard")
    parser.add_argument("--dir", type=Path, default=Path("data/fixtures"))
    args = parser.parse_args()
    with tqdm(total=len(PROFILES[args.profile]) + len(HOSTILE), desc="fixtures", unit="file") as bar:
        items = build_fixtures(args.profile, args.dir, progress=lambda name: (bar.set_postfix_str(name), bar.update()))
    for item in items:
        size = Path(item["path"]).stat().st_size / 1024 / 1024
        print(f"{item['kind']:<8} {size:8.2f} MB  {item['path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
