"""``meshinfer-coord`` task commands: talk to a running coordinator over its HTTP API.

::

    submit  --model ID[@VER] ... --input FILE ... [--pattern P] [--stages FILE.json]
            [--policy P] [--aggregation A] [--priority N] [--deadline S] [--shard-size N]
            [--quorum N] [--min-responses N] [--aggregation-timeout S] [--weight ID[@VER]=W ...]
            [--task-id ID] [--wait [--wait-timeout S] [--progress]] [--json]
    status  TASK_ID [--json [--outputs]]
    tasks   [--state S] [--model ID] [--since WHEN] [--limit N] [--cursor C | --all] [--json]
    cancel  TASK_ID [--json]
    nodes   [--json]
    stats   [--json]
    revocations [--push FLEET_DIR | FILE] [--json]

Every command takes ``--url``/``--token-file`` or ``--data-dir`` (the coordinator's data
directory, whose ``runtime.json`` names both), else ``MESHINFER_COORD_URL`` and
``MESHINFER_COORD_TOKEN`` (see :func:`coordinator.client.resolve_endpoint`).

Input files (``--input``, repeatable: the rows of all files are concatenated): ``.npy``,
``.npz`` (its first array, or ``--key``), ``.json`` (a list of rows, one row, or a tensor
document of the API), ``.csv`` (rows of numbers, an optional header line) and images
``.pgm`` / ``.png`` / ``.jpg`` (PNG and JPEG need Pillow), each becoming one 64-feature row the
way the digit classifiers were trained: light background inverted to dark, shrunk to 8x8 by
area averaging, contrast-stretched to the 0..16 pixel counts of the digits data set, divided by
16 (the models' ``input_scaling``). Rows are cast to ``--dtype`` (float32). An input must be a
regular file of a known suffix (a FIFO or a device is refused, not waited on or read for ever).

What the coordinator sends is shown as text only: a control character or escape sequence in a
task id, state or error message is printed escaped (``\\x1b``); ``--json`` is plain JSON (an
answer with NaN or Infinity is refused as a bad answer). A redirect is not followed (it would
carry the API token elsewhere): an error naming where it pointed. The ``--progress`` bar is
drawn on stderr only when it changed, cut to the terminal's width (``$COLUMNS``, else the
terminal's, else 80); a stderr that fails ends the bar, not the wait.

Exit codes: 0 done (a waited task succeeded), 1 a waited task failed or was cancelled, 2 an
error (bad argument or input file, coordinator unreachable or refusing; a coordinator lost
during ``submit --wait`` too, in one line naming the accepted task; a submission whose
connection dropped or timed out before the answer, in one line saying the task may or may not
have been accepted and how to look: a task has its id before it is sent, ``--task-id`` or one
made here, and the same submit with that ``--task-id`` cannot run it twice), 3 ``--wait`` ran
out of time while the task still runs, 130 interrupted (Ctrl-C; during the submission, after
one line on stderr saying the task may or may not have been accepted; during ``submit --wait``,
after one naming the accepted task).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from coordinator.client import (
    AWAY_CODES,
    TERMINAL_STATES,
    ApiError,
    CoordinatorClient,
    printable,
    resolve_endpoint,
)
from coordinator.input_files import load_inputs
from coordinator.task_arguments import (
    budget_seconds,
    chosen_task_id,
    model_ref,
    non_negative_int,
    page_limit,
    positive_int,
    priority,
    request_seconds,
    seconds,
    since,
    task_document,
    weight,
)
from coordinator.task_views import (
    count_text,
    display_width,
    progress_line,
    render_nodes,
    render_result,
    render_revocations,
    render_stats,
    render_task,
    render_tasks,
)
from meshinfer.errors import ConfigError, MeshInferError
from meshinfer.fleet_dir import REVOCATIONS_BIN
from meshinfer.identity_files import read_file
from meshinfer.proto.aggregation import Mode
from meshinfer.proto.scheduling import Policy
from meshinfer.proto.tasks import DEFAULT_SHARD_ROWS, Pattern, TaskState, new_task_id
from meshinfer.proto.tasks_wire import DTYPES

# The input readers, argument types and views live in coordinator.input_files, digit_images,
# task_arguments and task_views: import them from there.
__all__ = ["EXIT_STILL_RUNNING", "EXIT_TASK_FAILED", "add_task_commands"]

EXIT_TASK_FAILED = 1
EXIT_STILL_RUNNING = 3
POLL_INTERVAL_S = 0.25

# --- command wiring --------------------------------------------------------------------------
#
# A command runs in two steps, so that who is at fault for a stray error follows from where it
# was raised: its local step (:data:`LocalStep`) reads and checks what the command line names
# (input files, a stages file, a revocation list) and builds what is to be sent, with no
# client at hand; its request step (:data:`Command`) talks to the coordinator with that value
# and reads the answers. A stray error of the first is the command's input, reported so before
# any request is sent; of the second, an unexpected answer of the coordinator.

#: A command's local step: ``args`` to the value its request step sends (None: nothing to read).
LocalStep = Callable[[argparse.Namespace], Any]
#: A command's request step: the client, ``args`` and what its local step returned.
Command = Callable[[CoordinatorClient, argparse.Namespace, Any], int]


def add_task_commands(commands: Any) -> None:
    """Add ``submit``, ``status``, ``tasks``, ``cancel``, ``nodes``, ``stats`` and
    ``revocations``."""
    for add in (
        _add_submit, _add_status, _add_tasks, _add_cancel, _add_nodes, _add_stats,
        _add_revocations,
    ):  # fmt: skip
        add(commands)


def _no_local_step(args: argparse.Namespace) -> None:
    return None


def _command(
    commands: Any, name: str, help_text: str, run: Command, local: LocalStep = _no_local_step
) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=help_text, description=help_text)
    where = parser.add_argument_group("coordinator (else $MESHINFER_COORD_URL / _TOKEN)")
    where.add_argument("--url", help="the API base URL, e.g. http://127.0.0.1:7950")
    where.add_argument("--token-file", type=Path, help="file holding the API token")
    where.add_argument("--data-dir", type=Path, help="the coordinator's data_dir (runtime.json)")
    where.add_argument(
        "--timeout", type=request_seconds, default=30.0, help="per-request seconds (<= 86400)"
    )
    parser.add_argument("--json", action="store_true", help="print the raw JSON documents")
    parser.set_defaults(handler=lambda args: _run(name, local, run, args))
    return parser


#: What a malformed document raises where code reads it expecting another shape (a
#: RecursionError: one nested deeper than a view or ``--json`` walks, yet within the parser's).
_SHAPE_ERRORS = (KeyError, TypeError, AttributeError, IndexError, ValueError, RecursionError)
#: What a local step raises where it did not foresee something wrong in its input.
_LOCAL_ERRORS = (
    ArithmeticError,
    LookupError,
    TypeError,
    AttributeError,
    ValueError,
    RecursionError,
)


def _run(name: str, local: LocalStep, run: Command, args: argparse.Namespace) -> int:
    """Run command ``name``: its local step, then its request step (see above). A stray error
    of the local step is a ConfigError saying the input is at fault and nothing was sent; of
    the request step, an ApiError saying the coordinator's answer was unexpected. (Readers
    raise a MeshInferError naming the file for what they foresee; it passes as it is.)"""
    endpoint = resolve_endpoint(args.url, args.token_file, args.data_dir)
    try:
        prepared = local(args)
    except MeshInferError:
        raise
    except _LOCAL_ERRORS as exc:
        detail = f"{type(exc).__name__}: {exc}"
        message = f"{name}: bad input, nothing was sent to the coordinator ({detail})"
        raise ConfigError(message) from None
    client = CoordinatorClient(endpoint.url, endpoint.token, timeout=args.timeout)
    try:
        return run(client, args, prepared)
    except MeshInferError:
        raise  # (a ConfigError is a ValueError too: a bad argument, not a bad answer)
    except _SHAPE_ERRORS as exc:
        detail = f"{type(exc).__name__}: {exc}"
        message = f"unexpected answer from the coordinator ({detail})"
        raise ApiError(None, "bad_response", message) from None


def _print_json(doc: Any) -> None:
    print(json.dumps(doc, indent=2))  # (ASCII: a control character is written \u001b)


def _shown(doc: Any) -> Any:
    """``doc``, an answer of the coordinator, with every string (keys too) :func:`printable`:
    a text view shows what a server sent, never a terminal escape sequence it put there."""
    if isinstance(doc, str):
        return printable(doc)
    if isinstance(doc, dict):
        return {_shown(k): _shown(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_shown(v) for v in doc]
    return doc


# --- submit ----------------------------------------------------------------------------------


def _add_submit(commands: Any) -> None:
    help_text = "submit a task (and --wait for its result)"
    parser = _command(commands, "submit", help_text, _submit, _submission)
    what = parser.add_argument_group("task")
    what.add_argument(
        "--model",
        action="append",
        type=model_ref,
        default=[],
        metavar="ID@VER",
        help="model to run (repeat for a parallel task)",
    )
    what.add_argument(
        "--input",
        action="append",
        type=Path,
        required=True,
        metavar="FILE",
        help=".npy .npz .json .csv .pgm .png .jpg (repeat to concatenate rows)",
    )
    what.add_argument("--key", help="the array of a .npz input (default: its first)")
    what.add_argument("--dtype", default="float32", choices=sorted(DTYPES - {"bool"}))
    what.add_argument(
        "--pattern",
        choices=[p.value for p in Pattern],
        help="default: pipeline with --stages, parallel with several models, "
        f"batch with --shard-size or over {DEFAULT_SHARD_ROWS} rows, else single",
    )
    what.add_argument("--stages", type=Path, metavar="FILE.json", help="pipeline stages")
    what.add_argument("--policy", choices=[p.value for p in Policy])
    what.add_argument(
        "--priority", type=priority, metavar="N", help="larger runs first (32-bit; default 0)"
    )
    what.add_argument(
        "--deadline", type=budget_seconds, metavar="S",
        help="time budget in seconds from acceptance; the task fails when it runs out",
    )  # fmt: skip
    what.add_argument("--shard-size", type=positive_int, metavar="ROWS")
    agg = parser.add_argument_group("aggregation of a parallel task")
    agg.add_argument("--aggregation", choices=[m.value for m in Mode])
    agg.add_argument(
        "--quorum", type=positive_int, metavar="N",
        help="ensemble: done once N models answered (default: all of them)",
    )  # fmt: skip
    agg.add_argument(
        "--min-responses", type=positive_int, metavar="N",
        help="outputs a partial result needs at the timeout (default 1)",
    )  # fmt: skip
    agg.add_argument(
        "--aggregation-timeout", type=budget_seconds, metavar="S",
        help="seconds the aggregation waits (default: --deadline; at most that)",
    )  # fmt: skip
    agg.add_argument(
        "--weight", action="append", type=weight, default=[], metavar="ID[@VER]=W",
        help="weighted/ensemble: a model's weight (repeat; unnamed models weigh 1)",
    )  # fmt: skip
    what.add_argument(
        "--task-id", type=chosen_task_id, metavar="ID",
        help="the task's id (default: one made here); submitting the same spec under it again"
        " is idempotent",
    )  # fmt: skip
    wait = parser.add_argument_group("waiting")
    wait.add_argument("--wait", action="store_true", help="wait for the result and print it")
    wait.add_argument(
        "--wait-timeout", type=seconds, metavar="S",
        help=f"with --wait: give up waiting after S seconds (default {WAIT_TIMEOUT_S:g})",
    )  # fmt: skip
    wait.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with --wait: progress bar on stderr (default: when stderr is a terminal)",
    )
    wait.add_argument(
        "--show", type=non_negative_int, metavar="N",
        help=f"with --wait: labels to print (default {SHOW_LABELS})",
    )  # fmt: skip


#: ``submit --wait``'s defaults for ``--wait-timeout`` and ``--show``.
WAIT_TIMEOUT_S, SHOW_LABELS = 600.0, 20
_WAIT_OPTIONS = (("--wait-timeout", "wait_timeout"), ("--progress", "progress"), ("--show", "show"))


def _submission(args: argparse.Namespace) -> dict[str, Any]:
    """The local step of ``submit``: the task document, inputs read from their files, under
    ``--task-id`` or else an id made here (as the coordinator makes them): a submission whose
    answer never came names the task to look for, and the same command with that
    ``--task-id`` cannot run it twice."""
    given = [flag for flag, name in _WAIT_OPTIONS if getattr(args, name) is not None]
    if given and not args.wait:
        raise ConfigError(f"{', '.join(given)}: only with --wait (nothing was sent)")
    doc = task_document(args, load_inputs(args.input, args.key, args.dtype))
    if "task_id" not in doc:
        doc["task_id"] = new_task_id(random.SystemRandom(), time.time())
    return doc


def _submit(client: CoordinatorClient, args: argparse.Namespace, doc: dict[str, Any]) -> int:
    answer = _send_submission(client, doc)
    if not args.wait:
        if args.json:
            _print_json(answer)
        else:
            answer = _shown(answer)
            print(
                f"submitted task {answer['task_id']}: {answer['state']}, "
                f"{count_text(answer['items_total'], 'item')}"
            )
        return 0
    doc = _await(client, answer, args)
    if args.json:
        _print_json(doc)
    else:
        print(render_result(_shown(doc), SHOW_LABELS if args.show is None else args.show))
    return _exit_code(doc)


def _send_submission(client: CoordinatorClient, doc: dict[str, Any]) -> dict[str, Any]:
    """POST the task. When the request went out but no answer came (the connection dropped,
    the time ran out, or Ctrl-C: KeyboardInterrupt, exit 130, after one line on stderr), the
    coordinator may or may not have accepted the task: the error says so, how to look, and
    how to submit it again without running it twice."""
    task_id = doc["task_id"]
    what, look = f"task {task_id}", f"`meshinfer-coord status {task_id}`"
    again = f"the same submit with --task-id {task_id} cannot run it twice"
    try:
        return client.submit(doc)
    except ApiError as exc:
        if exc.status is not None or exc.code == "unreachable":  # an answer, or none sent
            raise
        message = f"{exc.message}; to see whether it accepted {what}: {look}; {again}"
        raise ApiError(None, exc.code, message) from None
    except KeyboardInterrupt:
        print(
            f"meshinfer-coord: interrupted: the submission of {what} was cut short; the"
            f" coordinator may or may not have accepted it: look with {look}; {again}",
            file=sys.stderr,
        )
        raise


def _await(client: CoordinatorClient, answer: dict[str, Any], args) -> dict[str, Any]:
    """The task once it ended or ``--wait-timeout`` passed. A coordinator lost meanwhile (it
    stopped, or the network failed) is an ApiError naming the task, which it keeps: the one
    line says how to look at it later. Ctrl-C (KeyboardInterrupt, exit 130) says so too, on
    stderr, before it goes on."""
    budget = WAIT_TIMEOUT_S if args.wait_timeout is None else args.wait_timeout
    deadline = time.monotonic() + budget
    stderr = sys.stderr  # (None where the command started with its stderr closed: 2>&-)
    show = stderr is not None and (args.progress if args.progress is not None else stderr.isatty())
    task_id = answer["task_id"]
    shown = printable(task_id)  # (the server's: a line below shows no escape sequence of it)
    try:
        if show and answer["items_total"] > 1:
            _watch(client, task_id, deadline, stderr)
        return client.wait(task_id, max(0.0, deadline - time.monotonic()))
    except ApiError as exc:
        if exc.status is not None:  # an answer: the coordinator's own error says it all
            raise
        message = (
            f"task {shown} was accepted, but waiting for it failed: {exc.message}; the"
            f" coordinator keeps the task (see `meshinfer-coord status {shown}`)"
        )
        raise ApiError(None, exc.code, message) from None
    except KeyboardInterrupt:
        print(
            f"meshinfer-coord: interrupted: task {shown} was accepted and the coordinator"
            f" keeps running it; follow it with `meshinfer-coord status {shown}`",
            file=sys.stderr,
        )
        raise


def _watch(client: CoordinatorClient, task_id: str, deadline: float, stream: TextIO) -> None:
    """Draw a progress bar from GET ?outputs=false polls until the task ends or time is up, or
    the coordinator goes away (restarting: the wait that follows waits for it to return).

    A line is drawn only when it changed, cut to one column less than the terminal's width (a
    line that wrapped is not overwritten by the next: each redraw would add lines). The bar is
    only a view: a stream that cannot take it (a stderr whose reader went away) ends the bar,
    not the wait."""
    columns = _columns(stream) - 1
    drawn: str | None = None  # (None: nothing drawn yet; the stream failed: stop drawing)
    try:
        while True:
            try:
                doc = client.get(task_id, outputs=False)
            except ApiError as exc:
                if exc.code in AWAY_CODES:  # (the wait that follows rides over it, as it can)
                    return
                raise
            line = progress_line(_shown(doc), columns)
            if line != drawn:
                blank = " " * max(0, display_width(drawn or "") - display_width(line))
                if not _draw(stream, "\r" + line + blank):  # (blank what a longer line left)
                    drawn = None
                    return
                drawn = line
            if doc["state"] in TERMINAL_STATES or time.monotonic() >= deadline:
                return
            time.sleep(POLL_INTERVAL_S)
    finally:
        if drawn is not None:
            _draw(stream, "\n")


def _draw(stream: TextIO, text: str) -> bool:
    """Write ``text`` to ``stream`` at once; False if the stream failed (it is not used again)."""
    try:
        stream.write(text)
        stream.flush()
    except (OSError, ValueError):  # (ValueError: a stream closed meanwhile)
        return False
    return True


def _columns(stream: TextIO) -> int:
    """The width of the terminal ``stream`` shows on: ``$COLUMNS``, else what the terminal
    says, else 80 (a width of 0, which some terminals report, is no width)."""
    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(stream.fileno()).columns
        except (AttributeError, ValueError, OSError):  # (no descriptor, or not a terminal)
            columns = 0
    return columns if columns > 1 else 80


def _exit_code(doc: dict[str, Any]) -> int:
    state = doc["state"]
    if state == TaskState.SUCCEEDED.value:
        return 0
    return EXIT_TASK_FAILED if state in TERMINAL_STATES else EXIT_STILL_RUNNING


# --- status / tasks / cancel / nodes / stats -------------------------------------------------


def _add_status(commands: Any) -> None:
    parser = _command(commands, "status", "show one task and its work items", _status, _outputs)
    parser.add_argument("task_id", metavar="TASK_ID")
    parser.add_argument("--outputs", action="store_true", help="with --json: include outputs")


def _outputs(args: argparse.Namespace) -> None:
    """The local step of ``status``: the table shows no tensors: say so, not ignore it."""
    if args.outputs and not args.json:
        raise ConfigError("--outputs adds the output tensors to the --json document; add --json")


def _status(client: CoordinatorClient, args: argparse.Namespace, _: None) -> int:
    doc = client.get(args.task_id, outputs=args.outputs)
    if args.json:
        _print_json(doc)
    else:
        print(render_task(_shown(doc)))
    return 0


def _add_tasks(commands: Any) -> None:
    parser = _command(commands, "tasks", "list tasks, newest first", _tasks)
    parser.add_argument("--state", choices=[s.value for s in TaskState])
    parser.add_argument("--model", metavar="ID", help="tasks with an item on this model id")
    parser.add_argument(
        "--since",
        type=since,
        metavar="WHEN",
        help="created since: unix seconds, ISO time, or an age like 10m 2h 7d",
    )
    parser.add_argument("--limit", type=page_limit, default=100, help="page size (1..1000)")
    page = parser.add_mutually_exclusive_group()
    page.add_argument("--cursor", help="the next_cursor of a previous page")
    page.add_argument("--all", action="store_true", help="follow cursors to the last page")


def _tasks(client: CoordinatorClient, args: argparse.Namespace, _: None) -> int:
    filters = {"state": args.state, "model": args.model, "since": args.since, "limit": args.limit}
    if args.all:
        page = {"tasks": list(client.iter_tasks(**filters)), "next_cursor": None}
    else:
        page = client.list(**filters, cursor=args.cursor)
    if args.json:
        _print_json(page)
    else:
        print(render_tasks(_shown(page)))
    return 0


def _add_cancel(commands: Any) -> None:
    parser = _command(commands, "cancel", "cancel a task (its running items are stopped)", _cancel)
    parser.add_argument("task_id", metavar="TASK_ID")


def _cancel(client: CoordinatorClient, args: argparse.Namespace, _: None) -> int:
    answer = client.cancel(args.task_id)
    if args.json:
        _print_json(answer)
    elif answer["cancelled"]:
        print(f"cancelled task {printable(answer['task_id'])}")
    else:
        task_id, state = printable(answer["task_id"]), printable(answer["state"])
        print(f"task {task_id} was not cancelled: it already ended ({state})")
    return 0


def _add_nodes(commands: Any) -> None:
    _command(commands, "nodes", "list the mesh nodes the coordinator sees", _nodes)


def _nodes(client: CoordinatorClient, args: argparse.Namespace, _: None) -> int:
    doc = client.nodes()
    if args.json:
        _print_json(doc)
    else:
        print(render_nodes(_shown(doc)))
    return 0


def _add_revocations(commands: Any) -> None:
    parser = _command(
        commands,
        "revocations",
        "show the certificate revocation list in force, or --push the fleet's to the coordinator"
        " (gossip then spreads it to every node)",
        _revocations,
        _revocation_list,
    )
    parser.add_argument(
        "--push",
        type=Path,
        metavar="PATH",
        help="a revocations.bin file, or the fleet directory holding one (after fleet revoke)",
    )


def _revocation_list(args: argparse.Namespace) -> bytes | None:
    """The local step of ``revocations``: the list to ``--push`` (None: show the one in force)."""
    if args.push is None:
        return None
    try:
        path = args.push / REVOCATIONS_BIN if args.push.is_dir() else args.push
    except OSError:  # (a directory on the way that cannot be searched): read_file says so
        path = args.push
    return read_file(path, "revocation list")


def _revocations(client: CoordinatorClient, args: argparse.Namespace, data: bytes | None) -> int:
    doc = client.revocations() if data is None else client.push_revocations(data)
    if args.json:
        _print_json(doc)
    else:
        print(render_revocations(_shown(doc)))
    return 0


def _add_stats(commands: Any) -> None:
    _command(commands, "stats", "task and item counts, dispatch and retry counters", _stats)


def _stats(client: CoordinatorClient, args: argparse.Namespace, _: None) -> int:
    doc = client.stats()
    if args.json:
        _print_json(doc)
    else:
        print(render_stats(_shown(doc)))
    return 0
