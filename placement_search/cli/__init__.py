"""The ``placement-search`` command line: a thin layer over library functions.

Each verb lives in its own module exposing ``add_parser(subparsers)`` (which registers the verb and
sets ``func``) and is listed in :data:`VERBS`. Every user error is one line on stderr and exit
code 2; no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from collections.abc import Sequence

from placement_search import __version__
from placement_search.errors import PlacementSearchError

#: Verb modules, in the order ``--help`` lists them.
VERBS: list[str] = [
    "placement_search.cli.validate",
    "placement_search.cli.export",
    "placement_search.cli.throughput",
    "placement_search.cli.fit",
    "placement_search.cli.evaluate",
    "placement_search.cli.optimize",
    "placement_search.cli.verify",
]


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit code 2 (its default code, kept)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="placement-search",
        description="Find the best speed/quality mixer placements of a hybrid-attention supernet "
        "and export serving presets.",
    )
    parser.add_argument("--version", action="version", version=f"placement-search {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    sub.required = True
    for name in VERBS:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    def show(message, category, filename, lineno, file=None, line=None) -> None:  # type: ignore[no-untyped-def]
        sys.stderr.write(f"placement-search {args.verb}: warning: {' '.join(str(message).split())}\n")

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore" if getattr(args, "quiet", False) else "default")
            warnings.showwarning = show
            code = args.func(args)
    except PlacementSearchError as e:
        sys.stderr.write(f"placement-search {args.verb}: error: {e}\n")
        return 2
    except OSError as e:
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        sys.stderr.write(f"placement-search {args.verb}: error: {where}{e.strerror or e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"placement-search {args.verb}: interrupted\n")
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # a bug, not a user error: still one line unless asked for the traceback
        if os.environ.get("PLACEMENT_SEARCH_DEBUG"):
            raise
        sys.stderr.write(
            f"placement-search {args.verb}: internal error: {type(e).__name__}: {' '.join(str(e).split())[:300]} "
            "(set PLACEMENT_SEARCH_DEBUG=1 for the traceback)\n"
        )
        return 1
    return int(code or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
