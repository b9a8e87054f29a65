"""``textgym label``: a local web page where people rank a policy's completions.

A labelling directory holds ``items.jsonl`` (the items: a prompt and K completions sampled from a
policy, written once, ``textgym.pipeline.preferences.sample_items``) and ``preferences.jsonl``, the
answers: one line per answer in the preference format ``textgym rm`` and DPO read
(``textgym.preference_data``: ``best`` as scores, ``rank`` as ranks, ``tie`` and ``skip`` with no
comparison), each with its ``item`` and ``labeller``. A line is written whole with one
``write`` and ``fsync``-ed before the page is answered, so a crash or ``kill -9`` loses at most the
answer being given; a torn last line (no newline, not JSON) is that answer, and is cut off at the
next start with a warning. Any other bad line is refused naming file and line. Restarting
continues where the file ends: each labeller gets the first item they have not answered.

Several labellers may answer the same items (``?labeller=NAME`` in the page's address); their
agreement is reported (``textgym label DIR --report``, and on the page when all is done).

The page is a small Starlette app served by uvicorn on 127.0.0.1 by default. Any other address must
be asked for (``--host``) and gets a random access token, printed in the page's address; every
request without it is refused (403). The app answers its own four routes and nothing else (404);
what a request sends is checked against the items and never used as a path or executed.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import threading
import time
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from textgym.pipeline.preferences import sample_items, write_jsonl
from textgym.preference_data import ANSWERS, agreement, label_record, record_comparisons
from textgym.prompts import json_lines_numbered

ITEMS = "items.jsonl"
PREFERENCES = "preferences.jsonl"
LABELLER = re.compile(r"^[A-Za-z0-9_.@-]{1,40}$")
MAX_BODY = 65536  # bytes of an answer: a few numbers and a name
TOKEN_HEADER = "x-textgym-token"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_labeller(name: Any) -> str:
    if not isinstance(name, str) or not LABELLER.match(name):
        raise ValueError(f"labeller must be 1-40 letters, digits or _.@- , got {name!r}")
    return name


# --- items ------------------------------------------------------------------------------------------


def prepare_items(directory: str | os.PathLike, policy: str | None, *, n: int = 20, k: int = 4, seed: int = 0,
                  split: str = "train", env_id: str | None = None, env_kwargs: dict | None = None,
                  gold: Any = None, progress: bool = True) -> list[dict]:
    """The items of a labelling directory: read from its ``items.jsonl`` if it has one (``policy``
    and the sampling options are then not used), else sampled from ``policy`` (a run directory or a
    model) and written there atomically. See ``sample_items`` for the options."""
    directory = Path(directory)
    path = directory / ITEMS
    if not path.exists():
        if policy is None:
            raise FileNotFoundError(f"{str(directory)!r} has no {ITEMS} yet: give the policy whose completions "
                                    "are to be labelled (--policy, a run directory or a model)")
        write_jsonl(sample_items(policy, n, k, seed=seed, split=split, gold=gold, env_id=env_id,
                                 env_kwargs=env_kwargs, progress=progress), path)
    return read_items(path)


def read_items(path: str | os.PathLike) -> list[dict]:
    """An ``items.jsonl``: item ``i`` on its ``i``-th line, each with a prompt and >= 2 completions."""
    items: list[dict] = []
    for line, item in json_lines_numbered(path):
        where = f"file {os.fspath(path)!r}, line {line}"
        if (not isinstance(item, dict) or item.get("item") != len(items) or not isinstance(item.get("prompt"), str)
                or not isinstance(item.get("completions"), list) or len(item["completions"]) < 2
                or not all(isinstance(c, str) for c in item["completions"])):
            raise ValueError(f"{where}: expected item {len(items)} as {{item, prompt, completions (>= 2 strings)}}")
        items.append(item)
    if not items:
        raise ValueError(f"no items in {os.fspath(path)!r}")
    return items


# --- the answers ------------------------------------------------------------------------------------


class LabelStore:
    """The answers of one labelling directory: checked on opening (a torn last line cut off, any
    other bad line refused by file and line), appended one fsynced line at a time. Thread-safe."""

    def __init__(self, directory: str | os.PathLike, items: list[dict] | None = None):
        self.dir = Path(directory)
        self.items = items if items is not None else read_items(self.dir / ITEMS)
        self.path = self.dir / PREFERENCES
        self._lock = threading.Lock()
        self.records: list[dict] = []
        self._answered: set[tuple[str, int]] = set()
        if self.path.exists():
            self._cut_torn_line()
            for line, record in json_lines_numbered(self.path):
                self._check(record, f"file {str(self.path)!r}, line {line}")
                self._remember(record)

    def _cut_torn_line(self) -> None:
        """A last line without its newline is an answer whose write was cut short: drop it."""
        data = self.path.read_bytes()
        if not data or data.endswith(b"\n"):
            return
        keep = data.rfind(b"\n") + 1
        try:
            json.loads(data[keep:])
        except ValueError:
            warnings.warn(f"{self.path}: dropped a torn last line ({len(data) - keep} bytes, an answer cut short "
                          "by a crash)", stacklevel=3)
            with open(self.path, "r+b") as f:
                f.truncate(keep)
                os.fsync(f.fileno())
        else:  # a whole record missing only its newline
            with open(self.path, "ab") as f:
                f.write(b"\n")
                os.fsync(f.fileno())

    def _check(self, record: Any, where: str) -> None:
        if not isinstance(record, dict):
            raise ValueError(f"{where}: a label must be a JSON object, got {type(record).__name__}")
        item, labeller = record.get("item"), record.get("labeller")
        if isinstance(item, bool) or not isinstance(item, int) or not 0 <= item < len(self.items):
            raise ValueError(f"{where}: item must be one of 0..{len(self.items) - 1}, got {item!r}")
        try:
            check_labeller(labeller)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        if record.get("answer") not in ANSWERS:
            raise ValueError(f"{where}: answer must be one of {', '.join(ANSWERS)}, got {record.get('answer')!r}")
        shown = self.items[item]
        if record.get("prompt") != shown["prompt"] or record.get("completions") != shown["completions"]:
            raise ValueError(f"{where}: prompt and completions differ from item {item} of {ITEMS}")
        record_comparisons(record, where)  # the preference format's own checks
        if (labeller, item) in self._answered:
            raise ValueError(f"{where}: labeller {labeller!r} answered item {item} twice")

    def _remember(self, record: dict) -> None:
        self.records.append(record)
        self._answered.add((record["labeller"], record["item"]))

    def next_item(self, labeller: str) -> int | None:
        """The first item ``labeller`` has not answered, or None."""
        return next((i for i in range(len(self.items)) if (labeller, i) not in self._answered), None)

    def answer(self, labeller: str, item: Any, answer: Any, *, best: int | None = None,
               ranks: list[int] | None = None, **extra: Any) -> dict:
        """Check one answer, append its line (written whole and fsynced) and return its record."""
        with self._lock:
            check_labeller(labeller)
            if isinstance(item, bool) or not isinstance(item, int) or not 0 <= item < len(self.items):
                raise ValueError(f"item must be one of 0..{len(self.items) - 1}, got {item!r}")
            if (labeller, item) in self._answered:
                raise ValueError(f"labeller {labeller!r} has already answered item {item}")
            shown = self.items[item]
            record = label_record(item, shown["prompt"], shown["completions"], answer, labeller=labeller,
                                  best=best, ranks=ranks, **extra)
            line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                written = os.write(fd, line)
                if written != len(line):  # a full disk: leave no half line behind
                    os.ftruncate(fd, os.fstat(fd).st_size - written)
                    raise OSError(f"could only write {written} of {len(line)} bytes to {self.path}")
                os.fsync(fd)
            finally:
                os.close(fd)
            self._remember(record)
            return record

    def progress(self, labeller: str | None = None) -> dict:
        counts: dict[str, int] = {}
        for record in self.records:
            counts[record["labeller"]] = counts.get(record["labeller"], 0) + 1
        out: dict[str, Any] = {"items": len(self.items), "answers": len(self.records), "by_labeller": counts}
        if labeller is not None:
            out["done"] = counts.get(labeller, 0)
        return out

    def report(self) -> dict:
        """Answers per labeller and kind, and the labellers' agreement (``preference_data.agreement``)."""
        kinds = {a: sum(r["answer"] == a for r in self.records) for a in ANSWERS}
        return {**self.progress(), "answers_by_kind": kinds, "agreement": agreement(self.records)}


# --- the page ---------------------------------------------------------------------------------------


def page_html() -> str:
    return resources.files("textgym").joinpath("data/label.html").read_text(encoding="utf-8")


def make_app(store: LabelStore, *, token: str | None = None, default_labeller: str = "labeller") -> Starlette:
    """The labelling page's app: ``GET /`` (the page), ``GET /api/next?labeller=`` (the labeller's next
    item and progress), ``POST /api/answer`` (one answer, JSON) and ``GET /api/report``. With a
    ``token``, every request must carry it (``?token=`` or the ``X-Textgym-Token`` header)."""
    page = page_html()

    def labeller_of(request: Request) -> str:
        return check_labeller(request.query_params.get("labeller", default_labeller))

    def next_payload(labeller: str) -> dict:
        item = store.next_item(labeller)
        out: dict[str, Any] = {"labeller": labeller, "progress": store.progress(labeller)}
        if item is None:
            out.update(done=True, agreement=store.report()["agreement"])
        else:
            shown = store.items[item]
            out.update(done=False, item=item, prompt=shown["prompt"], completions=shown["completions"])
        return out

    async def index(request: Request) -> Response:
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    async def next_item(request: Request) -> Response:
        try:
            return JSONResponse(next_payload(labeller_of(request)))
        except ValueError as err:
            return JSONResponse({"error": str(err)}, status_code=400)

    async def answer(request: Request) -> Response:
        body = await request.body()
        if len(body) > MAX_BODY:
            return JSONResponse({"error": f"an answer is at most {MAX_BODY} bytes"}, status_code=413)
        try:
            data = json.loads(body)
            if not isinstance(data, dict):
                raise ValueError("an answer must be a JSON object")
            unknown = sorted(set(data) - {"labeller", "item", "answer", "best", "ranks", "seconds"})
            if unknown:
                raise ValueError(f"unknown fields {unknown}; valid: labeller, item, answer, best, ranks, seconds")
            seconds = data.get("seconds")
            if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float))
                                        or not 0 <= seconds < 1e7):
                raise ValueError(f"seconds must be a number >= 0, got {seconds!r}")
            extra = {"seconds": round(float(seconds), 2)} if seconds is not None else {}
            labeller = check_labeller(data.get("labeller"))
            store.answer(labeller, data.get("item"), data.get("answer"), best=data.get("best"),
                         ranks=data.get("ranks"), time=time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra)
        except ValueError as err:  # json.JSONDecodeError included
            return JSONResponse({"error": str(err)}, status_code=400)
        return JSONResponse(next_payload(labeller))

    async def report(request: Request) -> Response:
        return JSONResponse(store.report())

    class TokenCheck(BaseHTTPMiddleware):
        async def dispatch(self, request, call_next):
            given = request.query_params.get("token") or request.headers.get(TOKEN_HEADER) or ""
            if token is not None and not secrets.compare_digest(given.encode(), token.encode()):
                return JSONResponse({"error": "a valid access token is required"}, status_code=403)
            return await call_next(request)

    routes = [Route("/", index), Route("/api/next", next_item), Route("/api/answer", answer, methods=["POST"]),
              Route("/api/report", report)]
    return Starlette(routes=routes, middleware=[Middleware(TokenCheck)])


class LabelServer:
    """The page served by uvicorn (in this thread with ``run()``, or in a background thread with
    ``start()`` / ``stop()``). Loopback by default; any other ``host`` gets a token."""

    def __init__(self, store: LabelStore, host: str = "127.0.0.1", port: int = 8765, labeller: str = "labeller"):
        import uvicorn  # imported on use: only the page needs a server

        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port must be an integer 0..65535, got {port!r}")
        self.store, self.host = store, host
        self.token = None if is_loopback(host) else secrets.token_urlsafe(18)
        app = make_app(store, token=self.token, default_labeller=check_labeller(labeller))
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                    access_log=False))
        self.port = port
        self._thread: threading.Thread | None = None

    def url(self, labeller: str | None = None) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        query = [f"labeller={labeller}"] if labeller else []
        query += [f"token={self.token}"] if self.token else []
        return f"http://{host}:{self.port}/" + ("?" + "&".join(query) if query else "")

    def run(self) -> None:
        self.server.run()

    def start(self, timeout: float = 30.0) -> LabelServer:
        self._thread = threading.Thread(target=self.server.run, name="textgym-label", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"the labelling page could not start on {self.host}:{self.port}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)


def report_markdown(report: dict) -> str:
    """A labelling directory's progress and agreement as Markdown."""
    rows = [f"{report['answers']} answers to {report['items']} items "
            f"({', '.join(f'{k} {v}' for k, v in report['answers_by_kind'].items())})", "",
            "| labeller | answers |", "|---|---|"]
    rows += [f"| {name} | {count} |" for name, count in sorted(report["by_labeller"].items())]
    agree = report["agreement"]
    rows += ["", "| labellers | items both answered | comparisons both decided | agreement |", "|---|---|---|---|"]
    for pair, t in agree["pairs"].items():
        share = "-" if t["agreement"] is None else f"{t['agreement']:.2f}"
        rows.append(f"| {pair} | {t['items']} | {t['comparisons']} | {share} |")
    if agree["agreement"] is not None:
        rows += ["", f"overall agreement {agree['agreement']:.2f} over {agree['comparisons']} comparisons "
                 f"of {agree['shared_items']} items answered by more than one labeller"]
    return "\n".join(rows) + "\n"
