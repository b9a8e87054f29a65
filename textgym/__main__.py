"""``python -m textgym`` (and ``torchrun -m textgym``): the ``textgym`` command line."""

from textgym.pipeline.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
