"""``zdyn keys``: a deployment's CURVE keypairs in one folder (see ``zdyn.security``).

    zdyn keys generate [DIR]             the server keypair and one per role, those still missing
    zdyn keys list [DIR]                 every key: name, public key, whether its secret is here
    zdyn keys add [DIR] ROLE NAME KEY    allow another public key (z85, or a .key file) as ROLE

DIR defaults to $ZDYN_KEYS_DIR, else ~/.config/zdyn/keys. Roles use the folder with ``--keys-dir DIR``.
"""

from __future__ import annotations

import argparse
import os
import sys

from zdyn.security import DEFAULT_KEYS_DIR, KEYS_DIR_ENV, ROLES, SERVER, KeyFolder, KeysError, add_public_key, generate


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zdyn keys", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    default = os.environ.get(KEYS_DIR_ENV) or DEFAULT_KEYS_DIR
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="create the keypairs missing from DIR")
    gen.add_argument("dir", nargs="?", default=default)
    gen.add_argument(
        "--names", nargs="+", default=[SERVER, *ROLES], help=f"keypairs to create (default: {SERVER} and every role)"
    )
    lst = sub.add_parser("list", help="list DIR's keys")
    lst.add_argument("dir", nargs="?", default=default)
    add = sub.add_parser("add", help="allow a public key made elsewhere as ROLE")
    add.add_argument("--dir", default=default)
    add.add_argument("role", choices=ROLES)
    add.add_argument("name", help="a name for it (the file becomes ROLE-NAME.key)")
    add.add_argument("key", help="the z85 public key, or the path of its .key file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.command == "generate":
            created = generate(args.dir, args.names)
            folder = KeyFolder(args.dir).folder
            print(f"{folder}: created {', '.join(created)}" if created else f"{folder}: all keypairs exist")
        elif args.command == "list":
            for name, public, has_secret in KeyFolder(args.dir).entries():
                print(f"{name:24} {public}  {'keypair' if has_secret else 'public key only'}")
        else:
            print(f"added {add_public_key(args.dir, args.role, args.name, args.key)}")
    except (KeysError, OSError) as e:
        print(f"zdyn keys: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
