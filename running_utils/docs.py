"""Writes the generated docs: docs/config_keys.md (from the config declarations) and
docs/results.md (from the measured JSON).

    python -m running_utils.docs            # rewrite both
    python -m running_utils.docs --check    # exit 1, naming the files, if either is stale
"""
import argparse
import os
import sys

from running_utils import config_reference, results_tables

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def generated(root=REPO):
    """``{path relative to the repository: text}`` of every generated doc."""
    return {"docs/config_keys.md": config_reference.render(),
            "docs/results.md": results_tables.render(root)}


def stale(root=REPO):
    """The generated docs whose committed text differs from what the generator writes."""
    out = []
    for path, text in generated(root).items():
        full = os.path.join(root, path)
        if not os.path.exists(full) or open(full).read() != text:
            out.append(path)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m running_utils.docs",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if a generated doc is stale")
    args = parser.parse_args(argv)
    if args.check:
        files = stale()
        for path in files:
            print(f"{path} is stale: run python -m running_utils.docs", file=sys.stderr)
        return 1 if files else 0
    for path, text in generated().items():
        with open(os.path.join(REPO, path), "w") as f:
            f.write(text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
