"""A weighted sum of other rewards."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from textgym.rewards.options import _finite
from textgym.rewards.registry import Reward, ValidatedReward, as_reward


class WeightedReward(Reward):
    """Weighted sum of other rewards; metadata is passed to every component.

    ``components`` may be

    * a dict ``{name: weight}`` of registered rewards with default options;
    * a list of dicts ``{"name": str, "weight": float, "kwargs": dict}``
      (``weight`` defaults to 1, ``kwargs`` to ``{}``);
    * a list of ``(reward, weight)`` tuples, where ``reward`` is a name, a
      :class:`Reward` or a reward function.
    """

    name = "weighted"

    def __init__(
        self,
        components: Mapping[str, float] | Sequence[Mapping[str, Any] | tuple[Any, float]],
    ) -> None:
        if isinstance(components, Mapping):
            items = [(as_reward(name), weight) for name, weight in components.items()]
        elif isinstance(components, Sequence) and not isinstance(components, str):
            items = [self._component(c) for c in components]
        else:
            raise ValueError(f"components must be a dict or a list, got {components!r}")
        if not items:
            raise ValueError("components must not be empty")
        self.components: list[tuple[ValidatedReward, float]] = [
            (reward, _finite(f"weight of {reward.name!r}", weight)) for reward, weight in items
        ]

    @staticmethod
    def _component(spec: Any) -> tuple[ValidatedReward, Any]:
        if isinstance(spec, Mapping):
            unknown = set(spec) - {"name", "weight", "kwargs"}
            if "name" not in spec or unknown:
                raise ValueError(
                    f"component {dict(spec)!r} must have a 'name' "
                    "and only the keys 'name', 'weight', 'kwargs'"
                )
            return as_reward(spec["name"], **dict(spec.get("kwargs") or {})), spec.get("weight", 1.0)
        if isinstance(spec, tuple) and len(spec) == 2:
            return as_reward(spec[0]), spec[1]
        raise ValueError(
            f"invalid component {spec!r}; expected {{'name': ..., 'weight': ..., 'kwargs': ...}} "
            "or a (reward, weight) tuple"
        )

    def __call__(self, prompts: list[str], completions: list[str], **metadata: Any) -> list[float]:
        total = [0.0] * len(completions)
        for reward, weight in self.components:
            for i, value in enumerate(reward(prompts, completions, **metadata)):
                total[i] += weight * value
        return total
