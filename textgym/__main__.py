"""``python -m textgym`` (and ``torchrun -m textgym``): the ``textgym`` command line."""

from torch.distributed.elastic.multiprocessing.errors import record

from textgym.pipeline.cli import main

if __name__ == "__main__":
    # Under torchrun, an error that ends a rank is written where torchrun reports the run's root
    # cause (its error file); elsewhere ``record`` changes nothing.
    raise SystemExit(record(main)())
