"""The bounded job queue and its one worker: rows of waiting jobs are batched into pipeline calls.

- Bounded: at most `max_queue` jobs waiting or running; one more is refused with 429 and a
  Retry-After estimated from the recent batch times. Nothing is queued without limit.
- Fair: each owner (a key, or an anonymous caller's address) may have at most `max_jobs_per_key` jobs
  waiting or running (a key's own `max_jobs` wins); one more is refused with 429. The worker serves
  owners in turn: the next batch starts with the oldest row of the owner served longest ago, so a
  client that floods the queue delays each other client by about one batch, not by its whole backlog.
- Batching: that row is sampled with the other waiting rows of the same Settings (k, steps, guidance,
  scheduler, eta, size), taken from the owners in the same turn order, up to `max_batch`, in one
  pipeline call. Prompts, image queries, seeds and databases may differ between rows.
- Progress: each row counts its denoising steps; a job's progress is the mean over its rows.
- Abandoned work: a job that nobody polled or streamed for `abandon_after_s` is cancelled (a batch
  stops at the next step once all its jobs are cancelled); DELETE cancels at once.
- Shutdown: waiting jobs and those in the batch being sampled are marked failed ("the server shut
  down"), their event streams end with that state, and every job's final state is logged.
- Results (PNG bytes and provenance) stay in memory, bounded by count and bytes; the oldest finished
  jobs are dropped first.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from .config import ServeConfig
from .engine import Cancelled, Engine, Output, Row
from .validation import BadRequest

log = logging.getLogger("rdm.serve")

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINAL = (DONE, FAILED, CANCELLED)


@dataclass
class Job:
    kind: str  # "generate" | "compare"
    rows: list[Row]
    summary: dict  # what was asked, for the page's history
    labels: list[str] = field(default_factory=list)  # compare: one label per database row
    owner: str = ""  # who made it (rdm.service.access.Principal.owner): only they (or an admin) see it
    id: str = field(default_factory=lambda: "j-" + secrets.token_hex(8))
    state: str = QUEUED
    error: str | None = None
    created: float = field(default_factory=time.time)
    finished: float | None = None
    last_seen: float = field(default_factory=time.monotonic)
    outputs: list[Output | None] = field(default_factory=list)
    version: int = 0  # bumped on every change, for event streams

    def __post_init__(self):
        self.outputs = [None] * len(self.rows)
        for i, row in enumerate(self.rows):
            row.job, row.index = self, i

    @property
    def progress(self) -> float:
        if self.state == DONE:
            return 1.0
        done = sum(1.0 if out is not None else row.step / max(row.settings.steps, 1)
                   for row, out in zip(self.rows, self.outputs))
        return done / max(len(self.rows), 1)

    def result_bytes(self) -> int:
        return sum(len(o.png) for o in self.outputs if o is not None)


class JobQueue:
    def __init__(self, engine: Engine, config: ServeConfig):
        self.engine = engine
        self.config = config
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.waiting: deque[Row] = deque()
        self.running: list[Row] = []
        self.cond = threading.Condition()
        self.stopping = False
        self.failed_at_shutdown: list[str] = []  # ids of the jobs in flight when the server stopped
        self.batch_seconds: deque[float] = deque(maxlen=20)  # recent batch times, for Retry-After
        self.batch_sizes: deque[int] = deque(maxlen=200)
        self.counts = {"submitted": 0, DONE: 0, FAILED: 0, CANCELLED: 0, "refused": 0, "refused_owner": 0,
                       "batches": 0}
        self.turn = 0  # batches started; served[owner] = the turn an owner was last served in
        self.served: dict[str, int] = {}
        self._worker = threading.Thread(target=self._loop, name="rdm-serve-worker", daemon=True)
        self._worker.start()

    # -- clients --------------------------------------------------------------------------------------
    def active(self) -> int:
        return sum(1 for j in self.jobs.values() if j.state not in FINAL)

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: recent batch time x batches ahead, at least 1."""
        per_batch = sum(self.batch_seconds) / len(self.batch_seconds) if self.batch_seconds else 2.0
        ahead = max(1, -(-len(self.waiting) // self.config.max_batch))
        return max(1, int(per_batch * ahead + 0.999))

    def admit(self, owner: str, max_jobs: int | None = None) -> None:
        """429 when the queue, or the owner's share of it, is full: asked before a request's query is embedded and
        its neighbours retrieved, so that a refusal costs next to nothing (submit asks again)."""
        with self.cond:
            if self.stopping:
                raise BadRequest(503, "the server is shutting down; try again later", {"Retry-After": "5"})
            limit = max_jobs or self.config.max_jobs_per_key
            mine = sum(1 for j in self.jobs.values() if j.owner == owner and j.state not in FINAL)
            if mine >= limit:
                self.counts["refused_owner"] += 1
                raise BadRequest(429, f"you have {mine} jobs waiting or running, your share of the queue ({limit}); "
                                      "wait for one to finish", {"Retry-After": str(self.retry_after())})
            if self.active() >= self.config.max_queue:
                self.counts["refused"] += 1
                raise BadRequest(429, f"the queue is full ({self.config.max_queue} jobs); retry later",
                                 {"Retry-After": str(self.retry_after())})

    def submit(self, job: Job, max_jobs: int | None = None) -> Job:
        """Queue a job; 429 when the queue, or the job's owner's share of it, is full."""
        with self.cond:
            self.admit(job.owner, max_jobs)
            self.jobs[job.id] = job
            self.waiting.extend(job.rows)
            self.counts["submitted"] += 1
            self._evict()
            self.cond.notify_all()
        return job

    def get(self, job_id: str, touch: bool = True) -> Job:
        with self.cond:
            job = self.jobs.get(job_id) if isinstance(job_id, str) else None
            if job is None:
                raise BadRequest(404, f"no job {job_id!r} (unknown, or its results were dropped to free memory)")
            if touch:
                job.last_seen = time.monotonic()
            return job

    def cancel(self, job_id: str, reason: str = "cancelled by the client") -> Job:
        with self.cond:
            job = self.get(job_id)
            self._finish(job, CANCELLED, reason)
            return job

    def forget(self, job_id: str) -> None:
        """Drop a finished job's record and results (DELETE after its cancel): its id is then unknown."""
        with self.cond:
            job = self.jobs.get(job_id)
            if job is not None and job.state in FINAL:
                del self.jobs[job_id]

    def position(self, job: Job) -> int:
        """Rows to be served before the job's first waiting row, in the order the worker takes them (the owners in
        turn, one row each per round; arrival order with fair_queue off); 0 when it is running or done."""
        with self.cond:
            for i, row in enumerate(self._service_order()):
                if row.job is job:
                    return i
            return 0

    def _turn_queues(self) -> list[list[Row]]:
        """The waiting rows by owner, each in arrival order, the owner served longest ago first (one queue with
        fair_queue off; lock held)."""
        by_owner: dict[str, list[Row]] = {}
        for row in self.waiting:
            by_owner.setdefault(row.job.owner if self.config.fair_queue else "", []).append(row)
        return [by_owner[o] for o in sorted(by_owner, key=lambda o: self.served.get(o, -1))]  # stable among equals

    def _service_order(self) -> list[Row]:
        """The waiting rows in the order the worker will take them, one per owner per round, batching aside (lock
        held)."""
        queues = self._turn_queues()
        return [q[d] for d in range(max(map(len, queues), default=0)) for q in queues if d < len(q)]

    def wait_change(self, job: Job, version: int, timeout: float) -> None:
        with self.cond:
            if job.version == version and job.state not in FINAL:
                self.cond.wait(timeout)

    def stats(self) -> dict:
        with self.cond:
            sizes = list(self.batch_sizes)
            return {"active_jobs": self.active(), "waiting_rows": len(self.waiting), "running_rows": len(self.running),
                    "max_queue": self.config.max_queue, "max_batch": self.config.max_batch, **self.counts,
                    "mean_batch_size": round(sum(sizes) / len(sizes), 2) if sizes else None,
                    "last_batch_seconds": round(self.batch_seconds[-1], 3) if self.batch_seconds else None}

    # -- shutdown -------------------------------------------------------------------------------------
    def begin_shutdown(self) -> None:
        """Refuse new jobs and fail every unfinished one at once (the batch being sampled stops at its next step)."""
        with self.cond:
            self.stopping = True
            for job in self.jobs.values():
                if job.state not in FINAL:
                    self._finish(job, FAILED, "the server shut down before the job finished; submit it again")
                    self.failed_at_shutdown.append(job.id)
            self.cond.notify_all()

    def shutdown(self, timeout: float = 10.0) -> list[tuple[str, str]]:
        """begin_shutdown, wait for the worker; return (job id, final state) of every job kept, also logged."""
        self.begin_shutdown()
        self._worker.join(timeout)
        with self.cond:
            report = [(j.id, j.state) for j in self.jobs.values()]
        for job_id in self.failed_at_shutdown:
            log.info("job %s: failed (in flight at shutdown)", job_id)
        states = [state for _, state in report]
        log.info("stopped: %s", ", ".join(f"{states.count(s)} {s}" for s in FINAL) + f" among the {len(report)} jobs "
                 f"kept; {self.counts['submitted']} accepted since start")
        return report

    # -- worker ---------------------------------------------------------------------------------------
    def _finish(self, job: Job, state: str, error: str | None = None) -> None:
        """Called with the lock held."""
        if job.state in FINAL:
            return
        job.state, job.error, job.finished = state, error, time.time()
        job.version += 1
        self.counts[state] += 1
        self.waiting = deque(r for r in self.waiting if r.job is not job)
        self.cond.notify_all()

    def _evict(self) -> None:
        """Drop the oldest finished jobs beyond keep_jobs / keep_result_bytes (lock held)."""
        finished = [j for j in self.jobs.values() if j.state in FINAL]
        total = sum(j.result_bytes() for j in finished)
        while finished and (len(self.jobs) > self.config.keep_jobs or total > self.config.keep_result_bytes):
            old = finished.pop(0)
            total -= old.result_bytes()
            del self.jobs[old.id]

    def _abandon_stale(self) -> None:
        now = time.monotonic()
        for job in list(self.jobs.values()):
            if job.state not in FINAL and now - job.last_seen > self.config.abandon_after_s:
                self._finish(job, CANCELLED, f"abandoned: nobody asked for it for {self.config.abandon_after_s:g} s")

    def _next_batch(self) -> list[Row]:
        """The oldest waiting row of the owner served longest ago, and waiting rows that share its Settings, taken
        from the owners in turn (lock held)."""
        self._abandon_stale()
        if not self.waiting:
            return []
        queues = self._turn_queues()
        key = queues[0][0].settings
        queues = [[r for r in q if r.settings == key] for q in queues]
        batch: list[Row] = []
        while len(batch) < self.config.max_batch and any(queues):
            for q in queues:  # one row per owner per round
                if q and len(batch) < self.config.max_batch:
                    batch.append(q.pop(0))
        self.turn += 1
        if len(self.served) > 4096:  # anonymous addresses come and go: keep the owners still waiting
            waiting = {r.job.owner for r in self.waiting}
            self.served = {o: t for o, t in self.served.items() if o in waiting}
        for row in batch:
            self.served[row.job.owner] = self.turn
        taken = {id(r) for r in batch}
        self.waiting = deque(r for r in self.waiting if id(r) not in taken)
        return batch

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.waiting and not self.stopping:
                    self.cond.wait(1.0)
                    self._abandon_stale()
                if self.stopping:
                    return
                batch = self._next_batch()
                if not batch:
                    continue
                self.running = batch
                for job in {id(r.job): r.job for r in batch}.values():
                    if job.state == QUEUED:
                        job.state = RUNNING
                        job.version += 1
                self.cond.notify_all()
            self._run(batch)

    def _on_step(self, batch: list[Row], step: int) -> None:
        with self.cond:
            for row in batch:
                row.step = step
                row.job.version += 1
            self._abandon_stale()
            self.cond.notify_all()
            if self.stopping or all(row.job.state in FINAL for row in batch):
                raise Cancelled()

    def _run(self, batch: list[Row]) -> None:
        started = time.monotonic()
        error = None
        outputs: list[Output] = []
        try:
            outputs = self.engine.sample(batch, lambda step: self._on_step(batch, step))
        except Cancelled:
            pass
        except Exception as e:  # noqa: BLE001 - reported in the jobs, never as a traceback to a client
            log.exception("batch of %d rows failed", len(batch))
            error = f"generation failed: {type(e).__name__}: {e}"
        with self.cond:
            self.running = []
            if outputs:
                self.batch_seconds.append(time.monotonic() - started)
                self.batch_sizes.append(len(batch))
                self.counts["batches"] += 1
            for i, row in enumerate(batch):
                job = row.job
                if job.state in FINAL:
                    continue
                if error or i >= len(outputs):
                    self._finish(job, FAILED, error or "the batch stopped before this job finished")
                    continue
                job.outputs[row.index] = outputs[i]
                job.version += 1
                if all(o is not None for o in job.outputs):
                    self._finish(job, DONE)
            self._evict()
            self.cond.notify_all()


def job_view(job: Job, queue: JobQueue, base: str = "") -> dict[str, Any]:
    """A job as the API shows it: state, progress, and for each finished image its URLs and neighbours."""
    images = []
    for i, (row, out) in enumerate(zip(job.rows, job.outputs)):
        if out is None:
            continue
        images.append({
            "index": i, "seed": row.seed, "row": row.label, "width": out.width, "height": out.height,
            "image_url": f"{base}/api/jobs/{job.id}/images/{i}.png",
            "provenance_url": f"{base}/api/jobs/{job.id}/provenance/{i}.json",
            "neighbours": [neighbour_view(h) for h in out.hits], "warnings": out.provenance.get("warnings", []),
            "near_copy": near_copy_view(out.provenance.get("copy_guard") or {}),
        })
    return {"id": job.id, "kind": job.kind, "state": job.state, "error": job.error,
            "progress": round(job.progress, 4), "position": queue.position(job) if job.state == QUEUED else 0,
            "rows": len(job.rows), "labels": job.labels, "request": job.summary, "created": job.created,
            "finished": job.finished, "images": images,
            "events_url": f"{base}/api/jobs/{job.id}/events", "status_url": f"{base}/api/jobs/{job.id}"}


def near_copy_view(verdict: dict) -> dict | None:
    """The copy guard's flag for the page: the item it nearly copies and how close it came (None: not flagged)."""
    if not verdict.get("flagged"):
        return None
    return {"item": verdict.get("nearest"), "similarity": verdict.get("similarity"),
            "pixel_distance": verdict.get("pixel_distance"), "threshold": verdict.get("threshold")}


def neighbour_view(hit: dict) -> dict:
    """A neighbour for the page and API: no file paths, a thumbnail URL by database and id."""
    db, item = hit.get("database"), hit.get("id")
    url = f"/api/databases/{quote(str(db), safe='')}/image?id={quote(str(item), safe='')}&size=thumb"
    return {"database": db, "id": item, "score": hit.get("score"), "caption": hit.get("caption"), "thumbnail_url": url}
