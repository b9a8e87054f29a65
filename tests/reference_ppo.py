"""A PPO iteration over textgym's engine, written out top to bottom (in the spirit of CleanRL's
single-file agents): the oracle that ``tests/test_reference_ppo.py`` holds ``agents.PPO`` to.

It uses none of the agents' algorithm code (no SB3 buffer, no ``agents.PPO`` method, no
``LMActorCriticPolicy``): it drives ``TextGenCore`` itself, computes GAE itself and evaluates the
sampled tokens with its own teacher-forced forward. What it shares with the agent under test are
objects (the LM, the value head and the optimizer, so parameters can be compared) and one function,
the token sampler ``textgym.distributed.sample_categorical`` (an exact categorical draw whose
counter-based noise is tested on its own in tests/test_distributed.py), so that both sample the
same tokens.

The algorithm:

1. Rollout (Schulman et al. 2017, Algorithm 1): ``n_envs`` episodes run side by side for
   ``n_steps`` steps; an action is a token sampled from the LM's next-token distribution, whose
   logits (and last hidden state, read by the value head) the engine's KV-cached step has already
   computed. A finished episode restarts at once in its row, as SB3's vector envs do.
2. GAE(lambda) (Schulman et al. 2016, eq. 16) backwards over the rollout, with episode ends
   cutting the recursion and unfinished episodes bootstrapped with the value of their last state.
3. ``n_epochs`` passes over the rollout in minibatches, each one gradient step on the clipped
   surrogate (Schulman et al. 2017, eq. 7) plus a value loss, an entropy bonus and, with
   ``kl_in="loss"``, the KL penalty to the reference model.

Where a choice is not in the papers it follows stable-baselines3 (the library ``agents`` builds
on), and says so. Two choices are textgym's: minibatches hold whole episode segments (so each
costs one teacher-forced forward), and PPO2's pessimistic value clipping replaces SB3's. With
several minibatches the result depends on their random order, which the reference draws as the
agents do (numpy's global RNG); a single minibatch (``batch_size`` = the rollout) avoids that.
"""

from __future__ import annotations

import numpy as np
import torch

from textgym import distributed
from textgym import lm as lmmod


@torch.no_grad()
def collect_rollout(core, value_head, n_steps: int, rngs: list) -> dict:
    """Play ``n_steps`` steps in every row of ``core``, whose episodes are running (a finished one
    restarts with a prompt drawn by its row's generator in ``rngs``); arrays ``[n_steps, n_envs]``."""
    n = core.n
    obs_ids = np.zeros((n_steps, n, core.input_ids.shape[1]), dtype=np.int64)
    obs_mask = np.zeros_like(obs_ids)
    actions = np.zeros((n_steps, n), dtype=np.int64)
    rewards = np.zeros((n_steps, n), dtype=np.float32)  # float32 throughout, as SB3's buffer stores them
    values = np.zeros((n_steps, n), dtype=np.float32)
    logps = np.zeros((n_steps, n), dtype=np.float32)
    dones = np.zeros((n_steps, n), dtype=bool)
    for step in range(n_steps):
        obs_ids[step], obs_mask[step] = core.input_ids, core.attention_mask
        logits = core.acting_logits()  # encodes the prompts of rows just reset, then reads the cache
        hidden = core.policy.states  # last hidden state of each row's current text
        # One categorical draw over all rows per step, keyed on the global torch RNG: the agents' call.
        dist = torch.distributions.Categorical(logits=logits)
        action = distributed.sample_categorical(dist.probs)
        logps[step] = dist.log_prob(action).cpu().numpy()
        values[step] = value_head(hidden.float()).squeeze(-1).cpu().numpy()
        actions[step] = action.cpu().numpy()
        reward, done, _ = core.step(actions[step], np.ones(n, dtype=bool))
        rewards[step], dones[step] = reward, done
        finished = np.flatnonzero(done).tolist()
        core.reset_rows(finished, [rngs[i] for i in finished])
    # Bootstrap: the value of the state each row is in after the last step. A row whose episode
    # just ended gets none (it is multiplied by 1 - done = 0 below), so its next prompt is not encoded.
    last_values = np.zeros(n, dtype=np.float32)
    going = ~dones[-1]
    if going.any():
        states = core.policy.states[torch.as_tensor(going, device=core.device)]
        last_values[going] = value_head(states.float()).squeeze(-1).cpu().numpy()
    return {"obs_ids": obs_ids, "obs_mask": obs_mask, "actions": actions, "rewards": rewards, "values": values,
            "logps": logps, "dones": dones, "last_values": last_values}


def gae(rewards, values, dones, last_values, gamma: float, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """GAE(lambda) advantages and lambda-returns (Schulman et al. 2016, eq. 16), backwards in time.

    ``delta_t = r_t + gamma * V(s_{t+1}) * (1 - done_t) - V(s_t)`` and
    ``A_t = delta_t + gamma * lam * (1 - done_t) * A_{t+1}``: an episode end cuts both the bootstrap
    and the recursion (the next row state is a new episode's). At the rollout's end ``V(s_{t+1})``
    is ``last_values``: an episode still running is bootstrapped, not treated as ended (SB3's
    ``RolloutBuffer.compute_returns_and_advantage``). Returns are ``A + V`` (SB3's TD(lambda)
    target for the value loss), not the discounted sum of rewards."""
    advantages = np.zeros_like(rewards)
    next_adv = np.zeros_like(last_values)
    next_values = last_values
    for t in reversed(range(len(rewards))):
        not_done = 1.0 - dones[t].astype(np.float32)
        delta = rewards[t] + gamma * next_values * not_done - values[t]
        next_adv = delta + gamma * lam * not_done * next_adv
        advantages[t], next_values = next_adv, values[t]
    return advantages, advantages + values


def segments(dones: np.ndarray) -> list[list[tuple[int, int]]]:
    """The (step, row) pairs of each episode segment (an episode, or its part inside the rollout),
    row by row, each in step order."""
    out: list[list[tuple[int, int]]] = []
    for row in range(dones.shape[1]):
        current: list[tuple[int, int]] = []
        for step in range(dones.shape[0]):
            current.append((step, row))
            if dones[step, row]:
                out.append(current)
                current = []
        if current:
            out.append(current)
    return out


def minibatches(segs: list, batch_size: int):
    """Segments grouped into minibatches of at least ``batch_size`` transitions (the last one may be
    smaller), in a random order drawn from numpy's global RNG. Whole segments, so each costs one
    teacher-forced forward: the grouping ``agents.EpisodeRolloutBuffer`` uses instead of SB3's
    shuffle of single transitions. With ``batch_size`` the whole rollout, the order is irrelevant."""
    batch: list = []
    for k in np.random.permutation(len(segs)):
        batch.append(segs[k])
        if sum(map(len, batch)) >= batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def segment_texts(roll: dict, segs: list, P: int, device):
    """Each segment's text (its last observation plus its last action) as ``(prompt ids, prompt
    mask, completion ids, completion mask)``, and for each transition of the segments, in order:
    its flat index in the rollout, its segment and the completion position of its token."""
    ids = np.stack([roll["obs_ids"][s[-1]] for s in segs])
    mask = np.stack([roll["obs_mask"][s[-1]] for s in segs])
    for j, s in enumerate(segs):
        t = int(mask[j, P:].sum())
        ids[j, P + t], mask[j, P + t] = roll["actions"][s[-1]], 1
    ids_t, mask_t = torch.as_tensor(ids, device=device), torch.as_tensor(mask, device=device)
    # The transition at (step, row) generated completion token t, t = tokens in its observation
    # (counted from the episode's start, which may lie before the rollout).
    n_envs = roll["actions"].shape[1]
    where = [(step * n_envs + row, j, int(roll["obs_mask"][step, row, P:].sum()))
             for j, s in enumerate(segs) for step, row in s]
    flat, js, ts = (torch.as_tensor(x, device=device) for x in zip(*where))
    return (ids_t[:, :P], mask_t[:, :P], ids_t[:, P:], mask_t[:, P:]), flat, (js, ts)


def teacher_forced(model, value_head, roll: dict, segs: list, P: int):
    """Log-prob, entropy and value of each transition of ``segs`` (in their order), from one
    teacher-forced forward over the segments' texts (position ``P - 1 + t`` of a text predicts its
    completion token ``t``; its last hidden state is the value head's input there), and the
    transitions' flat indices in the rollout."""
    texts, flat, at = segment_texts(roll, segs, P, value_head.weight.device)
    logp, hidden, logits = lmmod.completion_logprobs(model, *texts, hidden=True)
    log_pi = torch.log_softmax(logits, -1)
    entropy = -(log_pi.exp() * log_pi).sum(-1)
    values = value_head(hidden.float()).squeeze(-1)
    return logp[at], entropy[at], values[at], flat


@torch.no_grad()
def reference_log_probs(ref_model, roll: dict, P: int) -> torch.Tensor:
    """The reference model's log-prob of every sampled token, flat ``[n_steps * n_envs]``."""
    device = next(ref_model.parameters()).device
    texts, flat, at = segment_texts(roll, segments(roll["dones"]), P, device)
    out = torch.zeros(roll["actions"].size, device=device)
    out[flat] = lmmod.completion_logprobs(ref_model, *texts)[at]
    return out


def ppo_iteration(core, model, value_head, optimizer, *, n_steps: int, batch_size: int, n_epochs: int, gamma: float,
                  gae_lambda: float, clip_range: float, clip_range_vf: float | None, normalize_advantage: bool,
                  ent_coef: float, vf_coef: float, max_grad_norm: float, target_kl: float | None,
                  seed: int | None = None, rngs: list | None = None) -> dict:
    """One PPO iteration (rollout, GAE, ``n_epochs`` passes of minibatch updates) on ``model`` and
    ``value_head`` through ``optimizer``, which must cover exactly their trainable parameters.

    The first iteration starts fresh episodes in every row, row ``i``'s prompts drawn by the
    generator of ``SeedSequence(seed, spawn_key=(i,))``; a later one continues the episodes running
    in ``core``, with the rows' generators ``rngs`` that the previous iteration returned. Returns the rollout,
    advantages, returns, per-minibatch statistics and ``rngs``."""
    if rngs is None:
        # Row i's generator is the i-th independent stream of the seed (SeedSequence's spawn key), set
        # at its next reset; each row keeps it for the prompts of the episodes that follow (as
        # LMVecEnv.reset). (SB3's seed + i would make seed s+1 replay seed s's rows shifted by one.)
        rngs = [np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(i,))) for i in range(core.n)]
        core.reset_rows(list(range(core.n)), rngs)
    kl_in_loss = core.cfg.kl_in == "loss"
    kl_coef = float(core.kl_controller.value)  # one coefficient for the whole iteration
    model.eval()
    roll = collect_rollout(core, value_head, n_steps, rngs)
    # An adaptive KL coefficient (Ziegler et al. 2019) moves once per rollout, on the mean KL of the
    # episodes that ended in it (what agents do; the engine keeps those KLs).
    core.kl.update()
    adv, returns = gae(roll["rewards"], roll["values"], roll["dones"], roll["last_values"], gamma, gae_lambda)
    # Flat [n_steps * n_envs] tensors, index step * n_envs + row.
    adv, returns, old_logp, old_values = (torch.as_tensor(x, device=core.device).flatten()
                                          for x in (adv, returns, roll["logps"], roll["values"]))
    params = list(dict.fromkeys([*model.parameters(), *value_head.parameters()]))  # tied weights once
    # The reference model never changes: its log-probs are taken once per iteration.
    ref_logp = reference_log_probs(core.ref_model, roll, core.P) if kl_in_loss else None
    segs = segments(roll["dones"])
    model.train()
    stats: list[dict] = []
    stop = False
    for _ in range(n_epochs):
        for batch in minibatches(segs, batch_size):
            logp, entropy, values, idx = teacher_forced(model, value_head, roll, batch, core.P)
            a = adv[idx]
            if normalize_advantage and len(a) > 1:
                # Per minibatch, with std + 1e-8, as SB3 (and OpenAI's PPO baselines); not for a
                # single transition, whose std is undefined (SB3 skips it too).
                a = (a - a.mean()) / (a.std() + 1e-8)
            # Clipped surrogate (Schulman et al. 2017, eq. 7): the pessimistic bound of the ratio's gain.
            ratio = torch.exp(logp - old_logp[idx])
            policy_loss = -torch.min(a * ratio, a * ratio.clamp(1 - clip_range, 1 + clip_range)).mean()
            # Value loss against the lambda-returns; with clip_range_vf, PPO2's pessimistic form
            # max((V - R)^2, (V_clipped - R)^2), V_clipped within clip_range_vf of the rollout's
            # value (SB3 keeps the clipped term alone; agents.PPO keeps PPO2's form).
            v_err = (returns[idx] - values).square()
            if clip_range_vf is not None:
                v_clipped = old_values[idx] + (values - old_values[idx]).clamp(-clip_range_vf, clip_range_vf)
                v_err = torch.max(v_err, (returns[idx] - v_clipped).square())
            v_loss = v_err.mean()
            loss = policy_loss - ent_coef * entropy.mean() + vf_coef * v_loss  # eq. 9, as a loss
            if kl_in_loss:
                # KL to the reference in the loss: k2 = (log pi - log pi_ref)^2 / 2 per token, whose
                # gradient on-policy is that of KL(pi || pi_ref) (textgym.kl explains the choice). The
                # tokens were sampled by the rollout's policy, not by pi once a step was taken: the
                # detached ratio pi / pi_old importance-weights each token's term.
                weight = torch.exp(logp.detach() - old_logp[idx])
                loss = loss + kl_coef * (weight * 0.5 * (logp - ref_logp[idx]).square()).mean()
            with torch.no_grad():
                # SB3's early stop (PPO.train): the k3 estimate of KL(old || new), checked before the
                # step; above 1.5 * target_kl the update ends without applying this minibatch.
                log_ratio = logp - old_logp[idx]
                approx_kl = float(torch.mean(torch.expm1(log_ratio) - log_ratio))
                moved = (values - old_values[idx]).abs()
                stats.append({"approx_kl": approx_kl, "policy_loss": policy_loss.item(), "value_loss": v_loss.item(),
                              "clip_fraction": ((ratio - 1).abs() > clip_range).float().mean().item(),
                              "vf_clip_fraction": (float("nan") if clip_range_vf is None
                                                   else (moved > clip_range_vf).float().mean().item())})
            if target_kl is not None and approx_kl > 1.5 * target_kl:
                stats[-1]["stopped"] = stop = True
                break
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)  # global norm, as SB3 (and PPO2)
            optimizer.step()
        if stop:
            break
    # The engine's cached logits and hidden states of the running episodes are the old weights':
    # re-encode them, so the next rollout samples from the updated policy.
    core.refresh([core.policy])
    return {"rollout": roll, "advantages": adv, "returns": returns, "updates": stats, "rngs": rngs}
