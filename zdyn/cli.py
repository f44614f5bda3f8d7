"""Command line: ``zdyn <role> ...`` runs that role's ``main`` (see ``zdyn.roles``)."""

from __future__ import annotations

import importlib
import sys

from zdyn.roles import ROLES


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ROLES:
        print(f"usage: zdyn {{{','.join(ROLES)}}} [options]   (zdyn ROLE --help for a role's options)")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(ROLES[argv[0]])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
