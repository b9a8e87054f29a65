"""The pipeline: what the ``textgym`` command line runs, on top of the library and the agents.

- ``train`` (RL fine-tuning runs), ``evaluate`` (held-out scores of a model or run), ``sft``
  (supervised fine-tuning), ``rm`` and ``classifier`` (reward-model and classifier training),
  ``preferences`` (synthetic preference data), ``bench`` (reward and Elo benchmarks), ``cli``;
- ``config`` (the dataclass configs and their loader) and ``runlock`` (one run per output directory).

Layers: ``textgym`` (library) <- ``textgym.agents`` <- ``textgym.pipeline``; nothing below imports
anything above it (``tests/test_layers.py``).
"""
