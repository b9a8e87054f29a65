"""Group sampling: rows come in groups of ``group_size`` consecutive rows whose episodes share a prompt.

Group-baseline algorithms (GRPO, Shao et al. 2024; RLOO, Ahmadian et al. 2024) compare several
completions of one prompt. With ``group_size=G`` the ``n`` rows of a vector env form ``n / G``
groups (rows ``g*G .. g*G + G - 1``); every episode carries a *group id*, the same for the G
episodes that share a prompt and new for each prompt a group draws (``info["group"]``).

Seeding (every row of a vector env has its own RNG, seeded by the env: see ``TextGenVectorEnv``
and ``agents.vec_env``):

- When all G rows of a group are reset in one call (every reset of the whole env, and every
  round of the group algorithms in ``agents``, which reset all rows together), the group starts in
  step: its first row's RNG draws one prompt for all G rows, and the group's other RNGs draw
  nothing.
- When rows of a group are reset apart (a row that finished is reset at once by the vector env's
  autoreset, while the others still run), the group's k-th prompt since it last started in step is
  drawn by the RNG of the first of its rows to start its k-th episode, and the others take the
  same prompt when they start theirs: each prompt still serves G episodes, which no longer start
  together.

With ``group_size=1`` every row is its own group, so each reset draws one prompt with the row's
own RNG: exactly the ungrouped env, RNG streams included.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

# A prompt as the engine keeps it: (index into the prompt set, or -1 for a text given in options; text).
Prompt = tuple[int, str]


def check_group_size(n: int, group_size: int) -> None:
    if n % group_size:
        raise ValueError(
            f"num_envs={n} is not a multiple of group_size={group_size}: rows come in groups of group_size "
            f"episodes sharing a prompt; use a num_envs that is a multiple of {group_size} (or another group_size)"
        )


class PromptGroups:
    """Which prompt (and group id) each reset row gets; see the module docstring for the rule.

    :param n: number of rows, a multiple of ``group_size``.
    :param group_size: rows per group.
    """

    def __init__(self, n: int, group_size: int):
        check_group_size(n, group_size)
        self.n, self.size = n, group_size
        self.next_id = 0  # group ids are numbered in the order groups draw their prompts
        # Per group: the prompts (with their group ids) drawn since it last started in step and
        # not yet taken by all its rows; queue[g][0] is its offset[g]-th prompt since then.
        self.queue: list[list[tuple[int, Prompt]]] = [[] for _ in range(n // group_size)]
        self.offset = np.zeros(n // group_size, dtype=np.int64)
        self.taken = np.zeros(n, dtype=np.int64)  # episodes each row started since its group was in step

    def pick(self, rows: list[int], rngs: Sequence[np.random.Generator | None],
             draw: Callable[[np.random.Generator], Prompt], fixed: Prompt | None = None) -> list[tuple[int, Prompt]]:
        """``(group id, prompt)`` for each of ``rows`` (in order), ``rngs`` aligned with them (None
        only with ``fixed``: nothing is drawn). ``draw(rng)`` draws a prompt; ``fixed`` (a prompt given
        through reset options) is given to every row reset, one new group id per group."""
        out: list[tuple[int, Prompt] | None] = [None] * len(rows)
        by_group: dict[int, list[int]] = {}
        for j, row in enumerate(rows):
            by_group.setdefault(row // self.size, []).append(j)
        for g, js in by_group.items():
            members = slice(g * self.size, (g + 1) * self.size)
            if len({rows[j] for j in js}) == self.size:  # the whole group restarts: in step again
                self.queue[g], self.offset[g] = [], 0
                self.taken[members] = 0
            if fixed is not None:
                entry = (self._new_id(), fixed)
                for j in js:
                    out[j] = entry
                continue
            queue = self.queue[g]
            for j in js:
                row = rows[j]
                k = int(self.taken[row] - self.offset[g])
                if k == len(queue):  # the first of the group's rows to need this prompt draws it
                    rng = rngs[j]
                    if rng is None:
                        raise ValueError(f"row {row} draws its prompt but has no RNG: give one, or a prompt in options")
                    queue.append((self._new_id(), draw(rng)))
                out[j] = queue[k]
                self.taken[row] += 1
            done = int(self.taken[members].min() - self.offset[g])  # prompts every row has taken
            if done > 0:
                del queue[:done]
                self.offset[g] += done
        return out  # type: ignore[return-value]

    def _new_id(self) -> int:
        self.next_id += 1
        return self.next_id - 1
