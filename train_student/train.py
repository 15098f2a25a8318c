"""The training loop: read it top to bottom.

One process or many (`accelerate launch`), CPU or GPU: Accelerate appears only in `prepare`,
`backward`, `no_sync`, `save_state`/`load_state` and logging. The teacher never runs; targets
stream from the soft-label dataset.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from softlabels.data.atomic import fsync_dir, write_text
from softlabels.data.errors import UserError
from softlabels.data.heads import decoder_of, logit_transform
from softlabels.data.store import RangeCache
from softlabels.train_student.batches import EpochPlan, prefetch
from softlabels.train_student.config import TrainConfig
from softlabels.train_student.cross import Cross
from softlabels.train_student.losses import head_chunk
from softlabels.train_student.mixture import Mixture
from softlabels.train_student.objective import SameTokenizer, by_dataset
from softlabels.train_student.student import add_lora, load_student


class Distiller(torch.nn.Module):
    """Student forward + the objective's sums, as one module so DDP sees every parameter use.

    `objective`: an objective (objective.py), or a list of resolved recipes for the
    same-tokenizer one."""

    def __init__(self, model, objective, chunk: int = 0):
        super().__init__()
        self.model = model
        self.objective = SameTokenizer(objective) if isinstance(objective, list) else objective
        self.chunk = head_chunk(model.get_output_embeddings().weight.shape[0], chunk)
        self.transform = logit_transform(model.config, "student")

    @property
    def _no_split_modules(self):
        """The student's layer classes: what FSDP's transformer auto-wrap shards one by one."""
        return getattr(self.model, "_no_split_modules", None)

    def forward(self, batch, coef=None):
        # (B, L, H) hidden states; the (tokens, vocab) logits are never built at once
        h = decoder_of(self.model)(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask
        ).last_hidden_state
        return self.objective.sums(h, batch, self.model.get_output_embeddings(), self.chunk,
                                   self.transform, coef)


@dataclass
class Progress:
    """Where training is: checkpointed with the model so a resume continues exactly here."""

    step: int = 0
    epoch: int = 0
    row: int = 0  # global row index within the epoch where the next step starts
    tokens: int = 0
    history: list = field(default_factory=list)  # [{step, loss, kd, ce, ...}]
    evals: list = field(default_factory=list)
    consumed: list = field(default_factory=list)  # per dataset: [target tokens, rows] so far
    stream: dict = field(default_factory=dict)  # what fixes the rows' order (`stream_of`)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, d: dict) -> None:
        for k, v in d.items():
            setattr(self, k, v)


@contextlib.contextmanager
def unsharded(module):
    """Under FSDP2 the root's own weights (embeddings, final norm, lm_head) are gathered only
    inside its forward; eval calls the decoder and the head directly, so gather them around it.
    The decoder layers gather their own weights as they run. A no-op without FSDP."""
    if not hasattr(module, "unshard"):
        yield
        return
    module.unshard()
    try:
        yield
    finally:
        module.reshard()


def lr_at(step: int, cfg: TrainConfig, total: int) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak at `total` (or --schedule-steps)."""
    total = cfg.schedule_steps or total
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, total - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def plan_epoch(mix: Mixture, cfg: TrainConfig, n_proc: int, epoch: int) -> EpochPlan:
    """One epoch's micro-batches from the shards' footers: nothing is decoded to plan."""
    return EpochPlan.make(mix.index(epoch), cfg.batch_tokens, n_proc, mix.source(epoch))


def total_steps(mix: Mixture, cfg: TrainConfig, n_proc: int) -> int:
    """--max-steps, or the steps of --epochs epochs, each counted with its own shuffle (rows of
    different lengths cut into a different number of chunks per epoch)."""
    if cfg.max_steps:
        return cfg.max_steps
    return sum(math.ceil(plan_epoch(mix, cfg, n_proc, e).micro_batches / cfg.grad_accum)
               for e in range(cfg.epochs))


def step_batches(mix: Mixture, cfg, plan: EpochPlan, epoch: int, m0: int, p: int, objective):
    """Per optimiser step from micro-batch m0 on: (micro-batch ids, [(batch, weight)] of this
    process). Only this process's rows are decoded and collated (a cross-tokenizer student
    tokenizes and aligns them here too), in the background thread, off the step."""
    for m in range(m0, plan.micro_batches, cfg.grad_accum):
        group = range(m, min(m + cfg.grad_accum, plan.micro_batches))
        mine = []
        for g in group:
            pos, weight = plan.rows(g, p)
            rows, sources = mix.read(epoch, pos)
            mine.append((objective.collate(rows, sources), weight))
        yield group, mine


def stream_of(mix: Mixture, cfg: TrainConfig, n_proc: int) -> dict:
    """What decides which rows each step trains on, in which order: a resume continues the
    checkpoint's stream only if all of it is the same (datasets by their shards' hashes, so a
    moved folder still resumes)."""
    import hashlib

    data = [hashlib.sha256("".join(s.sha256 for s in r.manifest.shards).encode()).hexdigest()
            for r in mix.readers]
    return {"--data": data, "--data-weights": [round(float(w), 12) for w in mix.weights],
            "--seed": cfg.seed, "--batch-tokens": cfg.batch_tokens,
            "--grad-accum": cfg.grad_accum, "processes": n_proc,
            "--targets": list(cfg.targets), "--student-tokenizer": cfg.student_tokenizer}


def check_resume(saved: dict, now: dict, checkpoint: Path) -> None:
    """A one-line UserError naming what differs from the checkpoint's run: continuing would
    train some rows twice and others never, and record settings the run did not have."""
    if not saved:  # a checkpoint from before softlabels recorded its stream
        return
    changed = [k for k in now if saved.get(k) != now[k]]
    if changed:
        what = ", ".join("the datasets (their shards)" if k == "--data" else
                         f"the number of processes ({saved.get(k)} -> {now[k]})"
                         if k == "processes" else f"{k} ({saved.get(k)} -> {now[k]})"
                         for k in changed)
        raise UserError(f"--resume from {checkpoint}: {what} changed since that run; resume "
                        "with the same settings, or train into a new --output")


def latest_checkpoint(out: Path) -> Path | None:
    done = sorted((out / "checkpoints").glob("step-*"), key=lambda p: int(p.name[5:]))
    return done[-1] if done else None


def save_checkpoint(accelerator, out: Path, progress: Progress) -> None:
    """save_state into a temp folder, then rename: a kill mid-save leaves the last good one."""
    ckpts = out / "checkpoints"
    tmp, final = ckpts / f".tmp-step-{progress.step}", ckpts / f"step-{progress.step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(ckpts)
        for old in sorted(ckpts.glob("step-*"), key=lambda p: int(p.name[5:]))[:-2]:
            shutil.rmtree(old)  # keep the last two
    accelerator.wait_for_everyone()


def train(cfg: TrainConfig) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
    from tqdm import tqdm

    out = Path(cfg.output)
    try:
        accelerator = Accelerator(
            mixed_precision=cfg.mixed_precision,
            cpu=cfg.cpu or not torch.cuda.is_available(),  # MULTI_CPU (gloo) under launch
            log_with=list(cfg.report_to),
            project_config=ProjectConfiguration(project_dir=str(out),
                                                logging_dir=str(out / "logs")),
        )
    except ValueError as e:  # an unknown tracker, or one whose package is missing
        raise UserError(f"--report-to {' '.join(cfg.report_to)}: {e}") from e
    set_seed(cfg.seed)
    n_proc = accelerator.num_processes
    cache = RangeCache(cfg.cache_dir, int(cfg.cache_gb * 1e9)) if cfg.cache_dir else None
    mix = Mixture(cfg.data, cfg.data_weights, seed=cfg.seed, cache=cache)
    recipes = [cfg.recipe(i).for_dataset(r.manifest, f)
               for i, (r, f) in enumerate(zip(mix.readers, mix.folders))]
    model, tokenizer = load_student(cfg.student, cfg.data, cfg.trust_remote_code,
                                    cfg.student_tokenizer)
    vocab = model.get_output_embeddings().weight.shape[0]
    # None: the teacher's tokenizer
    cross = Cross.setup(tokenizer, mix, cfg, [r.targets for r in recipes])
    objective = cross if cross is not None else SameTokenizer(recipes, vocab)
    if cross is not None:
        accelerator.print(cross.describe())
    for d, (r, reader) in enumerate(zip(recipes, mix.readers)):
        accelerator.print(("" if cross is None else "teacher targets: ")
                          + f"training on {r.describe(reader.manifest)}" * (cross is None)
                          + f"{r.targets}" * (cross is not None) + (
            f" from {mix.folders[d]} ({mix.weights[d]:.1%} of the target tokens, "
            f"{mix.seen(1)[d]:.2f} passes per epoch)" if len(recipes) > 1 else ""))
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_targets) if cfg.lora_r else None

    total = total_steps(mix, cfg, n_proc)
    if total == 0 or plan_epoch(mix, cfg, n_proc, 0).micro_batches == 0:
        raise UserError(f"{' '.join(cfg.data)} gives no training steps; check --batch-tokens "
                        "and the data")

    distiller = Distiller(model, objective, cfg.chunk)  # with LoRA, `model` holds the adapters
    trainable = [p for p in distiller.parameters() if p.requires_grad]
    sizes = {"parameters": sum(p.numel() for p in distiller.parameters()),
             "trainable_parameters": sum(p.numel() for p in trainable)}
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay,
                                                               "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95),
    )
    if lora is not None and accelerator.distributed_type == DistributedType.FSDP:
        raise UserError("--lora-r with FSDP is not supported (merging the adapters needs the "
                        "full weights); LoRA's trainable weights are small: launch without FSDP")
    distiller, optimizer = accelerator.prepare(distiller, optimizer)
    progress = Progress(consumed=[[0, 0] for _ in recipes])
    accelerator.register_for_checkpointing(progress)

    progress.stream = stream = stream_of(mix, cfg, n_proc)
    resumed = latest_checkpoint(out) if cfg.resume else None
    if resumed:
        accelerator.load_state(str(resumed))
        check_resume(progress.stream, stream, resumed)
        accelerator.print(f"resumed from {resumed} (step {progress.step})")
    elif cfg.continue_from:  # another run's weights, optimizer and step; this run's data
        try:
            accelerator.load_state(cfg.continue_from)
        except (RuntimeError, ValueError, KeyError) as e:
            raise UserError(f"--continue-from {cfg.continue_from}: its state does not fit this "
                            f"student ({str(e).splitlines()[0][:200]}); continue a run of the "
                            "same --student and options") from e
        progress.stream, progress.epoch, progress.row = stream, 0, 0
        progress.consumed = [[0, 0] for _ in recipes]
        accelerator.print(f"continued from {cfg.continue_from} (step {progress.step}) on "
                          f"{' '.join(cfg.data)}")
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "train_config.json", cfg.to_json(objective.resolved()))
    accelerator.init_trackers("softlabels")

    bar = tqdm(total=total, initial=progress.step, desc="train", unit="step",
               disable=not accelerator.is_local_main_process)
    t_last, tok_last = time.perf_counter(), 0
    t_step = t_last  # when the step now running began to wait for its batch
    distiller.train()
    try:
        while progress.step < total:  # one pass = (the rest of) one epoch
            plan = plan_epoch(mix, cfg, n_proc, progress.epoch)
            first = plan.at_row(progress.row)  # 0, or where a resumed run stopped
            steps = contextlib.closing(prefetch(step_batches(
                mix, cfg, plan, progress.epoch, first, accelerator.process_index, objective)))
            with steps as steps:  # closed on every exit: the prefetch thread ends with the loop
                for group, mine in steps:
                    if progress.step >= total:
                        break
                    _step(accelerator, distiller, optimizer, objective, cfg, total, plan,
                          group, mine, progress)
                    now = time.perf_counter()
                    progress.history[-1]["step_s"] = now - t_step  # waiting for data included
                    if now - t_last > 1.0 or progress.step == total:
                        rate = (progress.tokens - tok_last) / (now - t_last)
                        bar.set_postfix(loss=f"{progress.history[-1]['loss']:.4f}",
                                        tok_s=f"{rate:.0f}")
                        t_last, tok_last = now, progress.tokens
                    bar.update(1)
                    if cfg.eval_data and cfg.eval_every and progress.step % cfg.eval_every == 0:
                        _eval(accelerator, distiller, cfg, progress, cross)
                    if cfg.save_every and progress.step % cfg.save_every == 0:
                        save_checkpoint(accelerator, out, progress)
                    t_step = time.perf_counter()
                else:
                    progress.epoch, progress.row = progress.epoch + 1, 0  # data ran out: next
    finally:
        bar.close()  # before any error message, which must be the last line

    if cfg.eval_data and (not progress.evals or progress.evals[-1]["step"] != progress.step):
        _eval(accelerator, distiller, cfg, progress, cross)
    accelerator.wait_for_everyone()
    # every process takes part: under FSDP this gathers the shards into full tensors
    state = accelerator.get_state_dict(distiller)
    decoded = accelerator.gather(torch.tensor([mix.decoded], device=accelerator.device))
    fetched = accelerator.gather(torch.tensor([mix.fetched], device=accelerator.device))
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(distiller).model
        if accelerator.distributed_type == DistributedType.FSDP:
            final.load_state_dict({k.removeprefix("model."): v for k, v in state.items()},
                                  assign=True)
        if lora is not None:
            if cfg.save_adapter:
                lora.save_pretrained(out / "adapter")
            final = lora.merge_and_unload()  # a plain HF model: loads anywhere, vLLM included
        final.save_pretrained(out)
        tokenizer.save_pretrained(out)
        result = {"steps": progress.step, "tokens": progress.tokens,
                  "final_loss": progress.history[-1]["loss"], **sizes, **peak_memory(accelerator),
                  "rows_decoded_per_process": decoded.tolist(),
                  "bytes_read_per_process": fetched.tolist(),  # from the store, not the cache
                  "mode": cross.describe() if cross else "teacher's tokenizer",
                  "datasets": [{"path": f, "weight": float(mix.weights[d]),
                                "target_tokens": progress.consumed[d][0],
                                "rows": progress.consumed[d][1],
                                "passes": progress.consumed[d][0] / mix.target_tokens[d],
                                "recipe": recipes[d].describe(mix.readers[d].manifest)}
                               for d, f in enumerate(mix.folders)],
                  "history": progress.history, "evals": progress.evals}
        write_text(out / "train_log.json", json.dumps(result) + "\n")
        from softlabels.train_student.plot import plot_curves

        plot_curves(progress.history, progress.evals, out / "curves.png", title=str(out))
    accelerator.end_training()
    return {"steps": progress.step, "tokens": progress.tokens,
            "final_loss": progress.history[-1]["loss"] if progress.history else None}


def peak_memory(accelerator) -> dict:
    """This process's peak memory: allocated on the GPU, or its resident set on a CPU."""
    if accelerator.device.type == "cuda":
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(accelerator.device),
                "peak_memory_of": "cuda allocated"}
    import resource

    return {"peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_memory_of": "process RSS"}


def _step(accelerator, distiller, optimizer, objective, cfg, total, plan, group, mine,
          progress) -> None:
    """One optimiser step over `grad_accum` global micro-batches; `mine` are this process's.

    The objective's sums of every micro-batch are normalised by the step's global counts (known
    before any backward), so accumulation and processes give the loss of one big batch."""
    n_proc = accelerator.num_processes
    counts = objective.step_counts(plan, group, mine,
                                   lambda t: accelerator.reduce(t.to(accelerator.device),
                                                                reduction="sum"))
    lr = lr_at(progress.step, cfg, total)
    for pg in optimizer.param_groups:
        pg["lr"] = lr
    coef = objective.coefficients(counts, accelerator.device)  # the loss is linear in the sums
    sums = 0.0
    for i, (batch, weight) in enumerate(mine):
        # past the end of the data a process gets a zero-weight copy, so DDP still syncs
        batch = batch.to(accelerator.device)
        last = i == len(mine) - 1
        with (contextlib.nullcontext() if last else accelerator.no_sync(distiller)), \
                accelerator.autocast():
            s = distiller(batch, coef)
            # times n_proc as DDP averages gradients
            accelerator.backward(objective.loss(s, counts) * n_proc * weight)
        sums = sums + s.detach().double() * weight
    if cfg.max_grad_norm:
        accelerator.clip_grad_norm_(distiller.parameters(), cfg.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    record = objective.record(accelerator.reduce(sums, reduction="sum").cpu(), counts)
    by = by_dataset(plan, group, len(progress.consumed))  # (2, D) targets, rows
    for d in range(len(progress.consumed)):
        progress.consumed[d][0] += int(by[0, d])
        progress.consumed[d][1] += int(by[1, d])
    progress.step += 1
    progress.row = plan.end(group[-1])
    progress.tokens += int(counts[0])  # the student's target tokens
    progress.history.append({"step": progress.step, **record, "lr": lr,
                             "tokens": progress.tokens,
                             **({"targets_by_dataset": by[0].tolist()}
                                if len(progress.consumed) > 1 else {})})
    accelerator.log({**{f"train/{k}": v for k, v in record.items() if k != "chunks"},
                     "train/lr": lr}, step=progress.step)


def _eval(accelerator, distiller, cfg: TrainConfig, progress: Progress, cross=None) -> None:
    """Each held-out dataset apart, and their token-weighted mean (the top-level numbers)."""
    from softlabels.train_student.evaluate import evaluate_all

    model = accelerator.unwrap_model(distiller).model
    distiller.eval()
    with unsharded(distiller):
        mean, each = evaluate_all(model, cfg.eval_data, cfg.batch_tokens, chunk=cfg.chunk,
                                  device=accelerator.device, part=accelerator.process_index,
                                  num_parts=accelerator.num_processes, reduce=accelerator.reduce,
                                  tokenizer=cross.tokenizer if cross else None)
    distiller.train()
    progress.evals.append({"step": progress.step, **mean,
                           **({"datasets": each} if len(each) > 1 else {})})
    logged = {f"eval/{k}": v for k, v in mean.items() if v is not None}
    if len(each) > 1:
        logged.update({f"eval/{name}/{k}": v for name, m in each.items() for k, v in m.items()
                       if v is not None})
    accelerator.log(logged, step=progress.step)
    for name, m in ({"": mean} | (each if len(each) > 1 else {})).items():
        accelerator.print(f"eval step {progress.step}{' ' + name if name else ''}: " +
                          " ".join(f"{k}={v:.4g}" for k, v in m.items() if v is not None))
