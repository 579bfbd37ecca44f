#!/usr/bin/env python
"""Checkpoint conversion Hugging Face <-> Megatron; the same code and arguments as `megatron-apo convert`.

    python tools/convert_checkpoint.py hf-to-megatron --hf DIR --out DIR --tp N --pp N [--dtype D]
    python tools/convert_checkpoint.py megatron-to-hf --megatron DIR --out DIR [--tokenizer DIR] [--dtype D]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout without installing


def main(argv: list[str] | None = None) -> int:
    from megatron_apo.cli import add_convert_arguments

    parser = argparse.ArgumentParser(prog="convert_checkpoint.py", description=__doc__.splitlines()[0])
    add_convert_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"convert_checkpoint.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # the guard matters: dist_checkpointing's writer and spawned ranks re-import __main__
    sys.exit(main())
