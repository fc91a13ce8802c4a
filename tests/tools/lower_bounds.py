"""The lowest releases setup.cfg admits for the libraries fsdp_ac integrates with, as pip constraints.

``make test-min-deps`` installs exactly these into ``build/min-deps`` and runs the tests there
(docs/testing.md, "The release range"). ``--check`` fails unless the running Python has them installed.
"""

from __future__ import annotations

import argparse
import configparser
import importlib.metadata
import re
import sys
from pathlib import Path

LIBRARIES = ("accelerate", "transformers", "peft", "trl", "lightning", "datasets")
SETUP_CFG = Path(__file__).resolve().parents[2] / "setup.cfg"


def lower_bounds(setup_cfg: Path = SETUP_CFG) -> dict[str, str]:
    """``{library: release}`` from the ``>=`` bounds of setup.cfg's ``test`` extra."""
    config = configparser.ConfigParser()
    config.read(setup_cfg)
    bounds = {}
    for line in config["options.extras_require"]["test"].splitlines():
        match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)\s*(#.*)?", line)
        if match and match[1] in LIBRARIES:
            bounds[match[1]] = match[2]
    missing = sorted(set(LIBRARIES) - set(bounds))
    if missing:
        raise ValueError(f"{setup_cfg}: the test extra has no '>=' bound for {', '.join(missing)}; add one.")
    return bounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail unless these releases are installed")
    check = parser.parse_args().check
    bounds = lower_bounds()
    if not check:
        print("\n".join(f"{name}=={release}" for name, release in bounds.items()))
        return
    wrong = {name: importlib.metadata.version(name) for name in bounds}
    wrong = {name: found for name, found in wrong.items() if found != bounds[name]}
    if wrong:
        sys.exit(
            "Installed releases differ from setup.cfg's lower bounds: "
            + ", ".join(f"{name} {found} (bound {bounds[name]})" for name, found in wrong.items())
        )
    print("lower bounds installed: " + ", ".join(f"{n} {r}" for n, r in bounds.items()))


if __name__ == "__main__":
    main()
