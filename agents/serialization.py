"""Saving and loading agents without pickle: a saved agent is data, never code.

stable-baselines3's own ``save``/``load`` put every attribute that JSON cannot hold (spaces,
schedules, classes, NumPy arrays) into the zip's ``data`` entry as cloudpickle, and ``load``
unpickles them all before checking anything: opening an agent file someone sent you runs
whatever it holds. textgym agents are saved and loaded here instead, in the same zip layout:

- ``data``: JSON only. Every attribute SB3 would save whose value JSON can hold, as is (a
  ``deque`` as a list), plus ``textgym_hyperparameters`` (the constructor arguments JSON can
  hold) and ``textgym_policy`` (the policy class's name). Anything else (spaces, schedules,
  classes, arrays) is left out: it is rebuilt from the env and the hyperparameters.
- ``policy.pth``, ``policy.optimizer.pth``, ``pytorch_variables.pth``: tensors and plain
  containers, read back with ``torch.load(..., weights_only=True)``.

Loading reads ``data`` with ``json`` only and refuses a file holding a pickled entry (SB3's
``":serialized:"``), an attribute that would replace a method, or a value of the wrong type; it
builds the algorithm from the env and the saved hyperparameters, puts back the saved attributes
(step counts, schedules' progress, any JSON state an agent keeps) and loads the state dicts.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import zipfile
from collections import deque
from pathlib import Path
from typing import Any

import stable_baselines3 as sb3
import torch
from stable_baselines3.common.save_util import recursive_getattr, recursive_setattr
from stable_baselines3.common.utils import get_system_info

from textgym import quantization

from .constructor import constructor_parameters

FORMAT = 1
SERIALIZED = ":serialized:"
# Constructor arguments never saved: the device is the loader's, the policy is saved by name,
# _init_setup_model is SB3 plumbing, and where logs are written is the loader's choice (a received
# file must not pick a path to write to).
_NOT_SAVED = {"device", "policy", "_init_setup_model", "env", "tensorboard_log"}
_SKIP = object()


class UnsafeAgentFileError(ValueError):
    """An agent file that is not plain data: it holds pickles, or values that would replace code."""


def plain(value: Any) -> Any:
    """``value`` as JSON-ready data, or ``_SKIP`` when JSON cannot hold it (a deque becomes a list)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)) and type(value) in (int, float):
        return value
    if isinstance(value, (list, tuple, deque)):
        items = [plain(v) for v in value]
        return _SKIP if any(v is _SKIP for v in items) else items
    if type(value) is dict:
        if not all(isinstance(k, str) for k in value):
            return _SKIP
        entries = {k: plain(v) for k, v in value.items()}
        return _SKIP if any(v is _SKIP for v in entries.values()) else entries
    return _SKIP


def constructor_arguments(kwargs: dict) -> dict:
    """The constructor arguments that are saved with an agent: those JSON can hold."""
    out = {}
    for key, value in kwargs.items():
        if key in _NOT_SAVED:
            continue
        value = plain(value)
        if value is not _SKIP:
            out[key] = value
    return out


def policy_name(policy: Any) -> str:
    return f"{policy.__module__}.{policy.__qualname__}" if isinstance(policy, type) else str(policy)


def save_agent(agent, path: str | os.PathLike | io.BufferedIOBase, exclude=None, include=None,
               params: dict | None = None) -> None:
    """Write ``agent`` to ``path`` (``.zip`` added when it has no suffix) without any pickle.
    Written to a uniquely named temporary file first, then moved into place. ``params``: the
    agent's ``get_parameters()`` as gathered already (a sharded agent's), else they are read."""

    exclude = set(exclude or []) | set(agent._excluded_save_params())
    if include is not None:
        exclude -= set(include)
    state_dicts, torch_names = agent._get_torch_save_params()
    exclude |= {name.split(".")[0] for name in state_dicts + torch_names}
    data, deques = {}, {}
    for key, value in agent.__dict__.items():
        if key in exclude:
            continue
        if isinstance(value, deque):
            deques[key] = value.maxlen
        value = plain(value)
        if value is not _SKIP:
            data[key] = value
    data["textgym_deques"] = {k: v for k, v in deques.items() if k in data}
    data["textgym_format"] = FORMAT
    data["textgym_policy"] = policy_name(agent.policy_class)
    # A quantized base (textgym.quantization) is frozen and loaded again with the env's model: only
    # the float weights are saved (torch's weights_only loading would also refuse its tensor type).
    params = {name: quantization.without_quantized(state)
              for name, state in (agent.get_parameters() if params is None else params).items()}

    variables = {name: recursive_getattr(agent, name) for name in torch_names}

    def write(f) -> None:
        with zipfile.ZipFile(f, mode="w") as archive:
            archive.writestr("data", json.dumps(data, indent=1))
            with archive.open("pytorch_variables.pth", mode="w", force_zip64=True) as out:
                torch.save(variables, out)
            for name, state in params.items():
                with archive.open(name + ".pth", mode="w", force_zip64=True) as out:
                    torch.save(state, out)
            archive.writestr("_stable_baselines3_version", sb3.__version__)
            archive.writestr("system_info.txt", get_system_info(print_info=False)[1])

    if isinstance(path, io.IOBase):
        write(path)
        return
    path = Path(path)
    if not path.suffix:
        path = path.with_suffix(".zip")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_load_arguments(env: Any, custom_objects: Any) -> None:
    """What every textgym agent's ``load`` refuses: no env (it holds the LM), or SB3's
    ``custom_objects`` (they replace objects when unpickling; nothing here is unpickled)."""
    if env is None:
        raise ValueError("textgym agents are loaded onto an env (it holds the LM): pass env=")
    if custom_objects:
        raise ValueError("custom_objects is not supported: textgym agent files hold no pickled objects")


def read_data(path: str | os.PathLike) -> dict:
    """The ``data`` entry of an agent zip, as JSON, after checking it holds no pickle."""
    where = str(path)
    try:
        with zipfile.ZipFile(path) as archive:
            raw = archive.read("data")
    except KeyError:
        raise UnsafeAgentFileError(f"{where!r} is not a saved agent: the zip has no 'data' entry") from None
    except zipfile.BadZipFile as err:
        raise UnsafeAgentFileError(f"{where!r} is not a saved agent: not a zip file ({err})") from None
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UnsafeAgentFileError(f"{where!r}: its 'data' entry is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise UnsafeAgentFileError(f"{where!r}: its 'data' entry must be a JSON object, got {type(data).__name__}")
    pickled = sorted(key for key, value in data.items() if _holds_pickle(value))
    if pickled:
        raise UnsafeAgentFileError(
            f"{where!r} holds pickled (code-carrying) entries: {', '.join(pickled)}. textgym never unpickles "
            "agent files; it was written by stable-baselines3's own save or crafted. Only agents saved by "
            "textgym's .save() can be loaded."
        )
    return data


def _holds_pickle(value: Any) -> bool:
    if isinstance(value, dict):
        return SERIALIZED in value or any(_holds_pickle(v) for v in value.values())
    if isinstance(value, list):
        return any(_holds_pickle(v) for v in value)
    return False


def _read_tensors(archive: zipfile.ZipFile, name: str, device, where: str) -> Any:
    try:
        raw = archive.read(name)
    except KeyError:
        raise UnsafeAgentFileError(f"{where!r} is not a saved agent: the zip has no {name!r} entry") from None
    try:
        return torch.load(io.BytesIO(raw), map_location=device, weights_only=True)
    except Exception as err:  # noqa: BLE001  (weights_only refuses anything but tensors and plain containers)
        raise UnsafeAgentFileError(f"{where!r}: {name!r} is not plain tensor data ({type(err).__name__}: "
                                   f"{str(err).splitlines()[0] if str(err) else ''})") from None


def load_agent(cls: type, path: str | os.PathLike, env, device: Any = "auto", **kwargs: Any):
    """Build ``cls`` on ``env`` from the saved hyperparameters (``kwargs`` override them), put the
    saved attributes back and load the state dicts. Nothing in the file is unpickled."""

    path = Path(path)
    if not path.exists() and path.with_suffix(".zip").exists():
        path = path.with_suffix(".zip")
    where = str(path)
    data = read_data(path)
    if data.get("textgym_format") != FORMAT:
        raise UnsafeAgentFileError(
            f"{where!r} was not saved by this textgym version's agent .save() (textgym_format "
            f"{data.get('textgym_format')!r}, expected {FORMAT})"
        )
    hyperparameters = data.get("textgym_hyperparameters")
    if not isinstance(hyperparameters, dict):
        raise UnsafeAgentFileError(f"{where!r}: 'textgym_hyperparameters' must be a JSON object")
    accepted = _accepted(cls)
    unknown = sorted(set(hyperparameters) - accepted)
    if unknown:
        raise UnsafeAgentFileError(f"{where!r}: saved hyperparameters {', '.join(unknown)} are not arguments of "
                                   f"{cls.__name__}; valid: {', '.join(sorted(accepted))}")
    args = {**hyperparameters, **kwargs, "device": device}
    model = cls(env=env, **args)
    saved_policy = data.get("textgym_policy")
    if saved_policy is not None and saved_policy != policy_name(model.policy_class):
        raise UnsafeAgentFileError(
            f"{where!r} was saved with policy {saved_policy}, not {policy_name(model.policy_class)}: pass "
            "policy=<that class> to load it (textgym never imports a class named by a file)"
        )
    _restore_attributes(model, data, set(kwargs) | {"device", "n_envs", "textgym_hyperparameters"}, where)

    with zipfile.ZipFile(path) as archive:
        state_dicts, torch_names = model._get_torch_save_params()
        params = {name: _read_tensors(archive, name + ".pth", model.device, where) for name in state_dicts}
        variables = {}
        if torch_names:
            variables = _read_tensors(archive, "pytorch_variables.pth", model.device, where)
    fresh = model.get_parameters()
    quantized = {name: set(state) - set(quantization.without_quantized(state)) for name, state in fresh.items()}
    exact = not any(quantized.values())
    for name, state in ([] if exact else params.items()):  # loading skips the int8 base: check the rest here
        expected = set(fresh.get(name, {}))
        missing, extra = expected - set(state) - quantized.get(name, set()), set(state) - expected
        if missing or extra:
            raise ValueError(f"{where!r}: its weights do not fit this env's model ({name}: missing "
                             f"{sorted(missing)[:5]}, unexpected {sorted(extra)[:5]})")
    try:
        model.set_parameters(params, exact_match=exact, device=model.device)
    except (RuntimeError, ValueError, KeyError) as err:
        raise ValueError(f"{where!r}: its weights do not fit this env's model ({err})") from err
    for name in torch_names:
        if isinstance(variables, dict) and variables.get(name) is not None:
            recursive_setattr(model, f"{name}.data", variables[name].data)
    if model.use_sde:
        model.policy.reset_noise()
    return model


def _accepted(cls: type) -> set[str]:
    return set(constructor_parameters(cls)) - _NOT_SAVED


def _restore_attributes(model, data: dict, keep: set[str], where: str) -> None:
    """Put the saved JSON attributes back on the freshly built ``model``: only instance data, each
    of the type the fresh model holds (a number for a number, a list for a deque...)."""
    deques = data.get("textgym_deques", {})
    if not isinstance(deques, dict) or not all(v is None or (type(v) is int and v > 0) for v in deques.values()):
        raise UnsafeAgentFileError(f"{where!r}: 'textgym_deques' must map names to lengths, got {deques!r}")
    for key, value in data.items():
        if key in keep or key in _NOT_SAVED or key in ("textgym_format", "textgym_policy", "textgym_deques"):
            continue
        if key.startswith("__") or (hasattr(type(model), key) and key not in model.__dict__):
            raise UnsafeAgentFileError(f"{where!r}: saved attribute {key!r} would replace a method or class "
                                       "attribute of the agent")
        current = model.__dict__.get(key)
        if key in deques:
            if not isinstance(value, list) or not (current is None or isinstance(current, deque)):
                raise UnsafeAgentFileError(f"{where!r}: saved attribute {key!r} must be a list, got {value!r}")
            model.__dict__[key] = deque(value, maxlen=deques[key])
        elif key not in model.__dict__:
            model.__dict__[key] = value  # JSON state an agent keeps (set after construction)
        elif isinstance(current, deque):
            if not isinstance(value, list):
                raise UnsafeAgentFileError(f"{where!r}: saved attribute {key!r} must be a list, got {value!r}")
            model.__dict__[key] = deque(value, maxlen=current.maxlen)
        elif current is None or value is None or _same_kind(current, value):
            if current is not None and plain(current) is _SKIP:  # an object rebuilt from the env: keep it
                raise UnsafeAgentFileError(f"{where!r}: saved attribute {key!r} cannot replace the agent's "
                                           f"{type(current).__name__}")
            model.__dict__[key] = value
        elif plain(current) is _SKIP:
            raise UnsafeAgentFileError(f"{where!r}: saved attribute {key!r} cannot replace the agent's "
                                       f"{type(current).__name__}")
        else:
            raise UnsafeAgentFileError(f"{where!r}: saved attribute {key!r} must be a {type(current).__name__}, "
                                       f"got {value!r}")


def _same_kind(current: Any, value: Any) -> bool:
    if isinstance(current, bool) or isinstance(value, bool):
        return isinstance(current, bool) and isinstance(value, bool)
    if isinstance(current, (int, float)):
        return isinstance(value, (int, float))
    if isinstance(current, (list, tuple)):
        return isinstance(value, list)
    return isinstance(value, type(current))
