"""No deprecation warning from textgym's own calls into its dependencies, on the installed versions.

A ``textgym train`` run (with LoRA, so peft's wrapping runs too) and a PPO update with gradient
checkpointing run with every warning recorded; any FutureWarning or DeprecationWarning raised while
they run fails the test, as does a deprecation that transformers logs instead of warning. The
message is what counts, not the filename: transformers attributes the warnings of its deprecated
keywords (``@deprecate_kwarg``) to the caller of the model's forward, torch's ``module.py``.

Nothing is filtered here: with transformers 5.25, peft 0.21.2 and torch 2.13 these runs raise no
third-party deprecation of their own. The one that peft raises when textgym wraps a model (its read
of transformers' deprecated ``is_gradient_checkpointing``) is silenced where textgym makes that
call (``textgym.lora.peft_wrap``), so a user's run does not print it either.
"""

import logging
import warnings

import pytest
from test_pipeline import tiny_config
from test_precision import make, one_iteration

from textgym.pipeline.train import train

DEPRECATIONS = (DeprecationWarning, FutureWarning)


class _Deprecations(logging.Handler):
    """Deprecations that transformers logs (``logger.warning_once``) rather than warns."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        message = record.getMessage()
        if "deprecat" in message.lower():
            self.messages.append(message)


@pytest.fixture()
def deprecations():
    """Record the warnings and transformers' logged deprecations raised while the test runs; the
    test calls the fixture's result to get the deprecations, one line each (no repeats)."""
    # warning_once is memoized for the process: forget what earlier tests had it log.
    once = getattr(logging.Logger, "warning_once", None)
    if once is not None and hasattr(once, "cache_clear"):
        once.cache_clear()
    handler = _Deprecations()
    transformers_logger = logging.getLogger("transformers")  # the library's root logger: every module logs here
    transformers_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")

            def found() -> list[str]:
                warned = [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in record
                          if issubclass(w.category, DEPRECATIONS)]
                return sorted(set(warned + [f"logged: {m}" for m in handler.messages]))

            yield found
    finally:
        transformers_logger.removeHandler(handler)


def test_a_train_run_warns_of_no_deprecation(tmp_path, deprecations):
    train(tiny_config(tmp_path, "training.iterations=1", "model.lora={r: 4}"), progress=False)
    found = deprecations()
    assert not found, "\n".join(found)


def test_a_checkpointed_update_warns_of_no_deprecation(deprecations):
    model = make("ppo", n_steps=4, batch_size=16, n_epochs=1, gradient_checkpointing=True)
    one_iteration(model)  # a KV-cached rollout, then an update that turns checkpointing on and off
    found = deprecations()
    assert not found, "\n".join(found)
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.policy.lm.modules())
