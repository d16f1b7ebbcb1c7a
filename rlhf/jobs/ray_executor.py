"""`executor=ray`: the items of a job (a data job, `mmalign bon`) processed by Ray actors, committed by the driver
with the local runner's guarantees (`rlhf.jobs.runner`).

    run_job(items, worker, out, name="rollouts", executor="ray", workers=8, batch_size=8,
            ray_options=RayOptions(address="auto", gpus_per_worker=1))

How it runs. The driver (the process that runs the job) holds the job's one result store, as the single-process
local runner does, and is its only writer. It starts `workers` actors, each with `cpus_per_worker` CPUs and
`gpus_per_worker` GPUs (Ray sets CUDA_VISIBLE_DEVICES for it), each holding one copy of process_fn, so one backend
(an `hf` model, a vLLM engine on its GPUs, or a client of an OpenAI-compatible server), built on its first batch.
The driver keeps two batches queued on every actor (one running, one waiting, so an actor never idles between
batches), and commits each batch's outcomes as it comes back through the same code as the local runner
(`runner._run_batch`): one fsynced line per item, the same checks, the same failure lines, one progress bar.

Why actors and not Ray Data (`map_batches` with an actor pool). Ray Data is the better tool for a stateless
transform of a data set into files; here every guarantee hangs on knowing, for each item, whether it is committed:

- Exactly once. Ray Data retries a failed block on another actor and writes through its own sinks (a file per
  block), so an item can be written twice or written and lost with the block; resuming would need a dedup pass
  over every output file. With actors the driver commits, refuses an id that is already done, and knows which
  batches a dead actor held: those and only those are queued again, on the other actors or a replacement.
- Resume. The skip set (ids already committed) is the store's, read once by the driver; Ray Data has no notion of
  it, so it would be a filter over the input before the pipeline, and the pipeline's own checkpointing (blocks
  written so far) would be a second, disagreeing record of what is done.
- Fatal errors. A FatalJobError in an actor stops the job at once with one line, as locally; Ray Data turns
  an exception in a UDF into a retried task or a failed pipeline with a Ray traceback.
- Cost. Ray Data pulls in pyarrow/pandas and a streaming scheduler; a data job's unit of work is a few seconds to
  minutes of generation per batch, so the driver's bookkeeping (one ray.wait and one commit per batch) is noise.

Faults:
- An actor that dies (killed, out of memory, its node lost) fails the batches queued on it with a RayActorError:
  each is queued again in front, and a replacement actor is started (Ray places it wherever resources are free).
  A batch whose actor has died `MAX_BATCH_ATTEMPTS` times (an item that kills its worker every time) has its items
  written to failures.jsonl with the reason, and the job goes on; they are retried on the next run.
- An actor that cannot start (process_fn cannot be unpickled there: mmalign not installed on that node) stops the
  job with one line.
- The driver killed, even by SIGKILL: Ray ends the actors it owns; what was committed stays and a rerun resumes.
  The batches in flight are redone, as a local run redoes the item being processed.

Seeds are per item (`runner.item_seed`), so records depend neither on the number of actors nor on which actor or
batch an item ran in; the merged file is written in input order at the end, so `local` and `ray` give the same
file. Ray is imported when a ray job starts, never at import time; without it the job says so in one line.

Connecting: `address=None` starts a local Ray for the job (and stops it at the end), `"auto"` joins the running
cluster (`ray start --head` on this node), `"ray://host:10001"` or `"host:6379"` a remote one; if Ray is already
initialised in this process (a notebook, the tests) that session is used as it is. Every node needs mmalign
installed (or a runtime_env that ships it). For a vLLM engine with tensor_parallel_size > 1 in an actor, set
gpus_per_worker to that size and let vLLM use its multiprocessing executor (backend_kwargs
'{"distributed_executor_backend": "mp"}').
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .runner import Failure, FatalJobError, JobInputError, _one_line, _run_batch

logger = logging.getLogger(__name__)

RAY_MISSING = ("executor 'ray' needs Ray: pip install -e \".[ray]\" (or pip install ray), "
               "or use --executor local")
MAX_BATCH_ATTEMPTS = 3  # a batch whose actor died this many times fails (failures.jsonl) instead of looping
BATCHES_PER_ACTOR = 2  # queued on each actor: one running, one waiting


@dataclass(frozen=True)
class RayOptions:
    """Where the actors run and what each one holds; the number of actors is run_job's `workers`."""

    address: str | None = None  # None: a local Ray for this job; "auto": the running cluster; or an address
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    init_kwargs: Mapping[str, Any] | None = None  # more ray.init arguments for a Ray this job starts

    def __post_init__(self) -> None:
        for label, value in (("cpus_per_worker", self.cpus_per_worker), ("gpus_per_worker", self.gpus_per_worker)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise JobInputError(f"{label} must be a number >= 0, got {value!r}")


def import_ray():
    """The ray module, or one line saying how to install it."""
    try:
        import ray
    except ImportError:
        raise JobInputError(RAY_MISSING) from None
    return ray


# ---------------------------------------------------------------------------------------------------- in an actor


def _remote_call(process_fn: Callable, items: list[Any], fatal: tuple[type[BaseException], ...]) -> tuple:
    """Run process_fn where the backend is and bring back what the driver's `_run_batch` needs to replay it: the
    outcomes in order and how it ended (None, a fatal error's one line, or an error's type name and text), or
    ("raw", result) for a result that is not a list of outcomes (the driver reports it as locally)."""
    outcomes: list[Any] = []
    try:
        result = process_fn(items)
        if isinstance(result, (Mapping, Failure, str, bytes)) or not hasattr(result, "__iter__"):
            return ("raw", result)
        for outcome in result:
            outcomes.append(outcome)
    except fatal as err:
        return ("outcomes", outcomes, ("fatal", str(err) if isinstance(err, FatalJobError)
                                       else f"{type(err).__name__}: {err}"))
    except Exception as err:
        return ("outcomes", outcomes, ("error", type(err).__name__, str(err)))
    return ("outcomes", outcomes, None)


class BatchActor:
    """One Ray worker: holds process_fn (and so, after its first batch, one backend) and runs batches."""

    def __init__(self, process_fn: Callable, fatal: tuple[type[BaseException], ...]):
        self.process_fn = process_fn
        self.fatal = fatal

    def ready(self) -> int:
        return os.getpid()

    def run(self, items: list[Any]) -> tuple:
        return _remote_call(self.process_fn, items, self.fatal)


# ---------------------------------------------------------------------------------------------------- in the driver


class _Replay:
    """process_fn for `_run_batch` in the driver: gives back what the actor's call gave, raising its error (a
    FatalJobError with the actor's line, or an exception of the same type name and text) after its outcomes."""

    def __init__(self, reply: tuple):
        self.reply = reply

    def __call__(self, items: list[Any]) -> Any:
        if self.reply[0] == "raw":
            return self.reply[1]
        return self._outcomes()

    def _outcomes(self) -> Iterator[Any]:
        _, outcomes, error = self.reply
        yield from outcomes
        if error is None:
            return
        if error[0] == "fatal":
            raise FatalJobError(error[1])
        raise type(error[1], (Exception,), {})(error[2])


def _actor_errors(ray) -> tuple[type[BaseException], ...]:
    """The errors of a call whose actor is gone (killed, crashed, out of memory, node lost)."""
    names = ("RayActorError", "ActorDiedError", "ActorUnavailableError", "WorkerCrashedError", "OutOfMemoryError",
             "NodeDiedError", "ObjectLostError", "OwnerDiedError")
    return tuple(getattr(ray.exceptions, n) for n in names if hasattr(ray.exceptions, n))


def _connect(ray, options: RayOptions) -> bool:
    """Initialise Ray unless it already is; True when this call started it (and so the job shuts it down)."""
    if ray.is_initialized():
        return False
    kwargs = {"include_dashboard": False, "logging_level": logging.WARNING, **dict(options.init_kwargs or {})}
    try:
        ray.init(address=options.address, **kwargs)
    except ConnectionError as err:
        raise FatalJobError(_one_line(f"ray: cannot connect to {options.address!r}: {err}")) from None
    return True


def run_pending(store, pending: list[tuple[str, Any]], counts, process_fn: Callable, *, workers: int,
                batch_size: int, fatal: tuple[type[BaseException], ...], report: Callable[[int, int, int], None],
                options: RayOptions | None = None) -> None:
    """Process `pending` ((id, item) pairs not done yet) on `workers` Ray actors, committing into `store` (the
    driver's) as batches come back; counts and report as in the local runner."""
    if not pending:
        return
    options = options or RayOptions()
    ray = import_ray()
    started = _connect(ray, options)
    dead_errors = _actor_errors(ray)
    remote_cls = ray.remote(BatchActor).options(num_cpus=options.cpus_per_worker, num_gpus=options.gpus_per_worker,
                                                max_restarts=0, max_task_retries=0)
    batches = [pending[start:start + batch_size] for start in range(0, len(pending), batch_size)]
    queue: deque[int] = deque(range(len(batches)))
    deaths = [0] * len(batches)  # how often a batch's actor died while running it
    in_flight: dict[Any, tuple[Any, int | None]] = {}  # ref -> (actor, batch index; None for a ready() call)
    queued: dict[Any, deque[tuple[Any, int]]] = {}  # actor -> its (ref, batch index), oldest (running) first
    ready_refs: dict[Any, Any] = {}  # actor -> its ready() call
    started_actors = 0

    def start_actor() -> None:
        nonlocal started_actors
        actor = remote_cls.remote(process_fn, fatal)
        started_actors += 1
        queued[actor] = deque()
        ready_refs[actor] = actor.ready.remote()
        in_flight[ready_refs[actor]] = (actor, None)

    def feed() -> None:
        for actor, mine in queued.items():
            while queue and len(mine) < BATCHES_PER_ACTOR:
                index = queue.popleft()
                ref = actor.run.remote([item for _, item in batches[index]])
                in_flight[ref] = (actor, index)
                mine.append((ref, index))

    def lost(actor, err: BaseException) -> None:
        """The actor is gone: batches it finished before dying are committed (their replies may still be unread when
        the death is seen first), the batch it was running counts a death, the ones waiting on it go back as they are;
        a replacement starts while there is work left. An actor whose __init__ failed (process_fn cannot be
        unpickled there) stops the job."""
        if getattr(err, "actor_init_failed", False):
            raise FatalJobError(_one_line(f"{store.name}: a Ray worker could not start: {err}")) from err
        mine = queued.pop(actor, None)
        if mine is None:  # one more call of an actor already handled
            return
        logger.warning("%s: a Ray worker died (%s); its batches are queued again on another",
                       store.name, _one_line(str(err))[:200])
        while mine:  # batches it finished before it died are committed as usual, not charged with its death
            ref, index = mine[0]
            if not ray.wait([ref], timeout=0)[0]:
                break
            try:
                reply = ray.get(ref)
            except dead_errors:
                break
            mine.popleft()
            in_flight.pop(ref, None)
            _run_batch(store, batches[index], counts, _Replay(reply), fatal=fatal, report=report)
        for ref, _ in mine:
            in_flight.pop(ref, None)
        in_flight.pop(ready_refs.pop(actor), None)
        try:
            ray.kill(actor)  # gone, or cut off: either way it must not come back with these batches
        except Exception:
            pass
        if mine:
            (_, running), waiting = mine[0], [i for _, i in list(mine)[1:]]
            queue.extendleft(reversed(waiting))
            deaths[running] += 1
            if deaths[running] >= MAX_BATCH_ATTEMPTS:
                reason = _one_line(f"its Ray worker died {deaths[running]} times on this batch: "
                                   f"{type(err).__name__}: {err}")
                _run_batch(store, batches[running], counts,
                           _Replay(("outcomes", [Failure(i, reason) for i, _ in batches[running]], None)),
                           fatal=fatal, report=report)
            else:
                queue.appendleft(running)
        if queue:  # work is left for a replacement
            start_actor()

    try:
        for _ in range(min(workers, len(batches))):
            start_actor()
        feed()
        while in_flight:
            [ref], _ = ray.wait(list(in_flight), num_returns=1)
            actor, index = in_flight.pop(ref)
            try:
                reply = ray.get(ref)
            except dead_errors as err:
                lost(actor, err)
                feed()
                continue
            except ray.exceptions.RayTaskError as err:  # the actor's method itself broke (not process_fn)
                raise RuntimeError(_one_line(f"{store.name}: a Ray worker crashed: {err}")) from None
            if index is not None:
                queued[actor].remove((ref, index))
                _run_batch(store, batches[index], counts, _Replay(reply), fatal=fatal, report=report)
            feed()
    finally:
        for actor in queued:
            try:
                ray.kill(actor)
            except Exception:  # already gone
                pass
        if started:
            ray.shutdown()
    if started_actors > min(workers, len(batches)):
        logger.info("%s: %d Ray workers were replaced", store.name, started_actors - min(workers, len(batches)))
