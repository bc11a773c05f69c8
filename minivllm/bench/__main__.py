"""python -m minivllm.bench serve --base-url http://127.0.0.1:8000 --model NAME ... (see minivllm.bench.serve)"""
from __future__ import annotations

import argparse

from minivllm.bench import serve


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m minivllm.bench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve.add_cli_args(commands.add_parser("serve", help=serve.__doc__.splitlines()[0], description=serve.__doc__,
                                           formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    try:  # a bad setting is a usage error, before anything is sent
        serve.from_args(args)
    except ValueError as e:
        parser.error(str(e))
    return serve.main(args)


if __name__ == "__main__":
    main()
