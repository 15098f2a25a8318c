"""The Dask side of a teacher job: plan pieces, score units as their piece is planned, concatenate
units into shards, from a `Job` and the engine's config (never from the command line's flags).

Failures are collected by name and reported together; a UserError (bad input) stops the job.
Exactly-once: a unit whose commit record matches its file is never submitted again.
"""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

from softlabels.data.errors import UserError
from softlabels.data.store import is_url, store
from softlabels.generate import objects
from softlabels.generate.state import attempts_path, done_path


class Driver:
    """One run of a job on a connected Dask client.

    `workers`: how many engines run (for how many units to keep in flight); `resource`: what
    a unit needs of a worker; `cpu_binds`/`gpu_binds`: the cores or GPUs of each embedded
    worker (empty for workers the user started)."""

    def __init__(self, client, out: Path, job, engine, sampling=None, *, workers: int = 1,
                 resource: str = "teacher", retries: int = 2, rehash: bool = False,
                 cpu_binds: tuple = (), gpu_binds: tuple = (), supervisor=None,
                 client_plans: bool = False, writer=None):
        self.client, self.out, self.job = client, out, job
        self.engine, self.sampling = engine, sampling
        # --response-model: its engine's config; every unit is written by it in a first pass
        # (phase "write"), then scored by the teacher (phase "score"): one engine switch per
        # worker, not one per unit
        self.writer, self.phase = writer, ""
        self.n_workers, self.resource, self.retries, self.rehash = workers, resource, retries, \
            rehash
        self.cpus, self.gpus = cpu_binds, gpu_binds
        self.supervisor = supervisor
        self.waiting: collections.deque = collections.deque()  # units not yet submitted
        self.in_flight = 0
        self.failures: list[tuple[str, str]] = []
        self.times = {"engine_start": 0.0, "teacher": 0.0, "write": 0.0}
        # an --output URL: the job's state is write-once objects in the store (objects.py)
        self.st = store(out) if is_url(out) else None
        self.where = out if self.st else str(Path(out).resolve())  # what the tasks are given
        self.commits: dict[str, str] = {}  # (a URL's job) unit -> the object that commits it
        self.client_plans = client_plans  # (a URL's job) the workers cannot read the input

    def _unit_task(self, u, phase: str = ""):
        from softlabels.generate.work import UnitTask

        if phase == "write":
            return UnitTask(self.where, u, self.writer, self.job.encoding, self.cpus, self.gpus,
                            self.sampling, phase="write")
        return UnitTask(self.where, u, self.engine, self.job.encoding, self.cpus, self.gpus,
                        None if phase == "score" else self.sampling,
                        commit=self.commits.get(u.name, ""), phase=phase)

    def plan_and_score(self, corpus, fields, budget, score: bool = True, phase: str = ""):
        """-> the plan (None if a piece failed); units run as their pieces are planned (with
        `score`; without, only the plan is made). `phase`: what runs on each unit (UnitTask)."""
        from distributed import as_completed
        from tqdm import tqdm

        from softlabels.generate.plan import PiecePlan, Plan
        from softlabels.generate.work import PlanTask, is_published, plan_task

        out, fresh, published = self.out, False, set()
        if self.st is not None:
            plan = objects.load_plan(self.st)
            if plan is None and self.client_plans:  # here, then uploaded
                plan, fresh = objects.make_plan(self.st, corpus, self.job, fields,
                                                self.engine.teacher,
                                                self.engine.trust_remote_code, budget), True
            if plan is not None:
                published = self._committed(plan)
        else:
            plan = Plan.load(out)
            published = set() if plan is None else {
                u for s in plan.shards if is_published(out, s, self.rehash) for u in s.units}
        pieces = [] if plan is not None else corpus.pieces(self.job.piece_bytes)  # checks columns
        self.tasks, self.ac, self.submitted, planned = {}, as_completed(), 0, {}
        self.score, self.phase = score, phase
        self.bar = tqdm(total=0, unit=" tok", unit_scale=True, smoothing=0.1, leave=False,
                        desc="response model" if phase == "write" else "teacher")
        if plan is not None:
            self._release(plan.units, published)
        else:
            for p in pieces:
                pp = objects.load_piece(self.st, p.index) if self.st else \
                    PiecePlan.load(out, p.index)
                if pp is not None:
                    planned[p.index] = pp
                    self._release(pp.units, published)
                    continue
                task = PlanTask(self.where, corpus, p, self.job, fields, self.engine.teacher,
                                self.engine.trust_remote_code, budget)
                # planning first: workers tokenize before they take teacher work
                f = self.client.submit(plan_task, task, key=f"plan-{p.index}-{self.job.id()}",
                                       retries=self.retries, priority=10, pure=False)
                self.tasks[f] = f"planning piece {p.index} ({p.files[0]})"
                self.ac.add(f)
        if plan is None and len(planned) == len(pieces):
            plan = self._whole(pieces, planned)
        elif fresh:
            self._report(plan)
        elif plan is not None:
            tqdm.write(f"plan: {len(plan.units)} units, {len(plan.shards)} shards; "
                       f"{self.submitted} to run", file=sys.stderr)
        plan_bar = tqdm(total=len(pieces), initial=len(planned), unit=" pieces",
                        desc="planning", position=1, leave=False, disable=not pieces)
        try:
            for f in self.ac:
                what = self.tasks.pop(f)
                if what.startswith(("unit ", "writing ")):
                    self.in_flight -= 1
                    self._fill()
                try:
                    r = f.result()
                except Exception as e:  # reported by name; the rest of the job goes on
                    self.failures.append((what, f"{type(e).__name__}: {e}"))
                    continue
                if isinstance(r, UserError):  # bad input: one message, nothing else to do
                    raise r
                if isinstance(r, PiecePlan):
                    planned[r.piece] = r
                    self._release(r.units, published)
                    plan_bar.update(1)
                    if len(planned) == len(pieces):
                        plan = self._whole(pieces, planned)
                else:
                    prefix = "writer_" if phase == "write" else ""
                    for key in ("engine_start", "teacher", "write"):
                        self.times.setdefault(prefix + key, 0.0)
                    self.times[prefix + "engine_start"] = max(
                        self.times[prefix + "engine_start"], r["engine_start_s"])
                    self.times[prefix + "teacher"] += r["teacher_s"]
                    self.times[prefix + "write"] += r["write_s"]
                    self.bar.update(r["unit_tokens"] if phase == "write" else r["tokens"])
                if self.supervisor is not None:  # worker jobs: how many run, how many wait
                    self.bar.set_postfix_str(f"workers: {self.supervisor.status()}")
        except BaseException:
            self.client.cancel(list(self.tasks))
            raise
        finally:
            plan_bar.close()
            self.bar.close()
        return plan

    def _whole(self, pieces, planned):
        """Every piece is planned: record the plan (plan.json) and report it. A URL's job runs
        its units from here: a unit's commit name depends on its shard (`commit_names`)."""
        from softlabels.generate.plan import finish_plan

        done = [planned[p.index] for p in pieces]
        if self.st is not None:
            plan = objects.finish_plan(self.st, self.job, done)
            self._release(plan.units, self._committed(plan))
        else:
            plan = finish_plan(self.out, self.job, done)
        self._report(plan)
        return plan

    def _committed(self, plan) -> set[str]:
        """A URL's job: the units already committed, or inside recorded shards (two listings);
        from here on its units know their commit names."""
        self.commits = objects.commit_names(plan)
        shards = objects.recorded(self.st, plan)
        return objects.committed(self.st, plan) | {
            u for s in plan.shards if s.name in shards for u in s.units}

    def _report(self, plan) -> None:
        from tqdm import tqdm

        tqdm.write(f"plan: {plan.records} records ({plan.empty_records} empty, skipped), "
                   f"{plan.tokens} tokens, {len(plan.units)} units, {len(plan.shards)} shards; "
                   f"{self.submitted} to run", file=sys.stderr)
        if plan.too_long:
            tqdm.write(f"{len(plan.too_long)} prompts leave no room for a response within "
                       f"--max-length and are skipped: records {plan.too_long[:20]}"
                       + (" ..." if len(plan.too_long) > 20 else ""), file=sys.stderr)
        if plan.context_windows:
            tqdm.write(f"{plan.context_windows} windows hold context only (no target position) "
                       "and are not scored"
                       + (f"; records with no target at all: {plan.untargeted[:20]}"
                          + (" ..." if len(plan.untargeted) > 20 else "")
                          if plan.untargeted else ""), file=sys.stderr)

    def _release(self, units, published) -> None:
        """Queue the units not yet committed for the teacher workers (in phase "write", those
        whose responses are not yet written)."""
        from softlabels.generate.work import is_done, is_written

        if not self.score or (self.st is not None and not self.commits):
            return  # (a URL's job: until the whole plan names the units' commits)
        self.bar.total += sum(u.tokens for u in units)
        for u in units:
            if u.name in published or (self.st is None and is_done(self.out, u, self.rehash)) \
                    or (self.phase == "write" and is_written(self.out, u, self.rehash)):
                self.bar.update(u.tokens)
                continue
            self.waiting.append(u)
            self.submitted += 1
        self._fill()
        self.bar.refresh()

    def _fill(self) -> None:
        """Submit waiting units while fewer than two per worker are in flight. Dask sends a
        task with a resource restriction to a worker at once, and a worker's death counts
        against every task it holds (after `allowed-failures`, the task fails): holding the
        rest here keeps each lost worker to the one unit it runs and the one next in line."""
        from softlabels.generate.work import run_unit, write_responses

        workers = max(self.n_workers, len(self.client.scheduler_info().get("workers", {})))
        write = self.phase == "write"
        while self.waiting and self.in_flight < 2 * workers:
            u = self.waiting.popleft()
            f = self.client.submit(write_responses if write else run_unit,
                                   self._unit_task(u, self.phase),
                                   key=f"{'write' if write else 'unit'}-{u.name}",
                                   resources={self.resource: 1}, retries=self.retries,
                                   pure=False)
            self.tasks[f] = f"{'writing' if write else 'unit'} {u.name}"
            self.ac.add(f)
            self.in_flight += 1

    def calibrate(self, plan) -> dict:
        """Score the plan's first unit on one worker (committed: the real run keeps it); its
        run_unit summary, or the summary recorded when it was committed before."""
        from softlabels.generate.work import is_done, is_written, run_unit, write_responses

        u = plan.units[0]
        if self.writer is not None and not is_done(self.out, u) and \
                not is_written(self.out, u):  # the response model writes first
            try:
                self.client.submit(write_responses, self._unit_task(u, "write"),
                                   key=f"calibrate-write-{u.name}", resources={self.resource: 1},
                                   pure=False).result()
            except Exception as e:
                why = (str(e).splitlines() or [""])[0]
                raise UserError(f"--calibrate: the response model failed on unit {u.name} "
                                f"({type(e).__name__}: {why}); fix its cause first") from e
        if self.st is not None:
            rec = objects.read_json(self.st, f"{objects.STATE}/done/{u.name}.json")
            if rec is not None and "teacher_s" in rec:
                return rec
        elif is_done(self.out, u):
            rec = json.loads(done_path(self.out, u).read_text())
            if "teacher_s" in rec:
                return rec
        try:
            return self.client.submit(run_unit, self._unit_task(u, self.phase),
                                      key=f"calibrate-{u.name}",
                                      resources={self.resource: 1}, pure=False).result()
        except Exception as e:  # the unit's error, raised here from the worker
            why = (str(e).splitlines() or [""])[0]
            raise UserError(f"--calibrate: unit {u.name} failed on the worker "
                            f"({type(e).__name__}: {why}); the same error would fail the real "
                            "run: fix its cause first") from e

    def concatenate(self, plan) -> None:
        """Make the shards not yet published from their committed units, on the workers."""
        from distributed import as_completed
        from tqdm import tqdm

        from softlabels.generate.work import MergeTask, is_published, merge_shard

        if self.st is not None:  # on the workers: units go from the store to the store
            shards = objects.recorded(self.st, plan)
            todo = [s for s in plan.shards if s.name not in shards]
            futures = {self.client.submit(objects.merge_shard, self.out, s, key=f"shard-{s.name}",
                                          retries=self.retries, pure=False): s for s in todo}
        else:
            todo = [s for s in plan.shards if not is_published(self.out, s, self.rehash)]
            futures = {self.client.submit(merge_shard, MergeTask(self.where, s),
                                          key=f"shard-{s.name}", retries=self.retries,
                                          pure=False): s for s in todo}
        for f in tqdm(as_completed(futures), total=len(todo), desc="shards", leave=False,
                      disable=len(todo) < 2):
            try:
                f.result()
            except Exception as e:
                self.failures.append((f"shard {futures[f].name}", f"{type(e).__name__}: {e}"))

    def raise_failures(self) -> None:
        """Every failed task by name on stderr, then one line: the job is resumable."""
        if not self.failures:
            return
        for name, err in self.failures:
            print(f"{name} failed: {err}", file=sys.stderr)
        first = self.failures[0][1].splitlines()[0]
        raise UserError(f"{len(self.failures)} tasks failed (named above; first: {first}); fix "
                        "the cause and rerun the same command to finish the rest")


def run_job(driver: Driver, corpus, fields, *, dry_run: bool = False, calibrate: bool = False):
    """Plan, run the units still to do, concatenate them into shards: -> the plan, every shard
    committed and intact; with `dry_run`, plan (and `calibrate`) only and report: -> None."""
    from softlabels.generate.work import is_published

    sampling = driver.sampling
    budget = sampling.max_new_tokens * sampling.n if sampling else 0
    if driver.writer is not None:  # every unit's responses written, then every unit scored
        plan = driver.plan_and_score(corpus, fields, budget, score=not dry_run, phase="write")
        driver.raise_failures()
        driver.phase = "score"
    plan = driver.plan_and_score(corpus, fields, budget, score=not dry_run, phase=driver.phase)
    if dry_run and not driver.failures:
        dry_run_report(driver, plan, calibrate)
        return None
    if not driver.failures:
        driver.concatenate(plan)
    driver.raise_failures()
    # Two attempts of one unit (a client that died while an external worker ran it, then a
    # rerun) can both commit: publish only if every shard still matches its record.
    stale = [] if driver.st else [s.name for s in plan.shards if not is_published(driver.out, s)]
    if stale:
        raise UserError(f"{len(stale)} shards no longer match their commit records (another "
                        f"attempt replaced them: {', '.join(stale[:3])}); rerun the same command")
    return plan


def dry_run_report(driver: Driver, plan, calibrate: bool) -> None:
    """What the job is, and (`calibrate`) what it will cost, from one unit scored for real."""
    job, n_workers = driver.job, driver.n_workers
    rows = sum(u.rows for u in plan.units)
    print(f"plan: {plan.records} records ({plan.empty_records} empty), {plan.tokens} tokens in "
          f"{rows} windows, {len(plan.units)} units, {len(plan.shards)} shards")
    if not calibrate:
        per_token = 2.5 + 1.0 * job.k + 0.5 * job.draws  # the format's rough cost
        print(f"expected size: ~{per_token * plan.tokens / 1e9:.3g} GB (~{per_token:.0f} "
              "bytes/token, rough: it depends on the teacher's confidence; --calibrate "
              "measures it)")
        return
    r = driver.calibrate(plan)
    per_token = r["bytes"] / r["tokens"]
    rate = r["tokens"] / (r["teacher_s"] + r["write_s"])
    one = plan.tokens / rate  # seconds of one worker, engine start aside
    print(f"calibration: unit {plan.units[0].name} ({r['tokens']} tokens) on one worker: engine "
          f"start {r['engine_start_s']:.0f} s, {rate:,.0f} tokens/s, {per_token:.1f} bytes/token")
    print(f"expected size: {per_token * plan.tokens / 1e9:.3g} GB")
    print(f"expected teacher time with {n_workers} worker(s): "
          f"{(one / n_workers + r['engine_start_s']) / 3600:.3g} h "
          f"({(one + n_workers * r['engine_start_s']) / 3600:.3g} worker-hours)")


def wait_for_a_worker(client, supervisor, batch, out: Path) -> None:
    """Stop in one line, leaving a resumable folder, if no worker job starts in time."""
    try:
        client.wait_for_workers(1, timeout=batch.worker_timeout)
    except TimeoutError:
        supervisor.check()
        why = supervisor.why_waiting()
        raise UserError(
            f"no worker job started within {batch.worker_timeout:g} s"
            + (f" ({batch.kind}: {why})" if why else "")
            + f"; nothing was lost: rerun the same command when the queue has room (or raise "
            f"--worker-timeout) and it continues in {out}") from None


def lost_work(out: Path, supervisor) -> str:
    """What lost worker jobs cost: jobs replaced, and unit attempts that reached the teacher
    against the units of the plan (attempts.log, over every run of this job)."""
    from softlabels.generate.plan import Plan

    if is_url(out):
        plan, runs = objects.load_plan(store(out)), objects.attempts(store(out))
    else:
        plan, path = Plan.load(out), attempts_path(out)
        runs = len(path.read_text().splitlines()) if path.is_file() else 0
    how = supervisor.report()
    return (f"worker jobs replaced: {supervisor.replaced}{f' ({how})' if how else ''}; units "
            f"run {runs} for {len(plan.units) if plan else 0} planned")
