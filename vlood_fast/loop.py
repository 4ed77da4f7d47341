"""The epoch loop under ``vlood_fast.train``'s CRoFT and OGEN trainers.

``fit`` owns what a demanding run needs:

- the papers' optimizer defaults: SGD (momentum 0.9), lr 0.002, one constant warm-up epoch at
  1e-5, then cosine decay (CoOp's schedule, which CRoFT and OGEN inherit);
- a data order derived from (seed, epoch) alone, so a resumed run sees the same batches;
- per-epoch evaluation on cached features, best-on-validation selection (the best epoch's
  weights are loaded back at the end), and a JSON-lines metrics log;
- crash-safe checkpoints: ``last.pt`` (modules, optimizers, schedulers, RNG states, history)
  and ``best.pt``, each written to a temporary file and moved into place atomically;
- data parallelism: under ``torch.distributed`` each rank takes every world_size-th sample of
  the epoch's permutation and gradients are averaged across ranks before every optimizer step
  (what DistributedDataParallel does), so parameters stay identical on all ranks.
"""
import copy
import dataclasses
import json
import math
import os
import pathlib
import random
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

__all__ = ["TrainConfig", "TrainResult", "fit", "cosine_with_warmup", "atomic_save"]


@dataclasses.dataclass
class TrainConfig:
    """Optimization and bookkeeping settings shared by ``train_croft`` and ``train_ogen``.

    ``weight_decay=None`` takes the method's default (CRoFT 0.1, OGEN/CoOp 5e-4).
    ``out_dir`` (optional) receives ``metrics.jsonl``, ``last.pt`` and ``best.pt``;
    ``resume=True`` continues from ``out_dir/last.pt`` when it exists.
    """
    epochs: int = 10
    batch_size: int = 32
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float | None = None
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    seed: int = 0
    out_dir: str | None = None
    resume: bool = False
    progress: bool = True
    select: str | None = None  # metric that picks the best epoch (default: the trainer's)

    def __post_init__(self):
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not (self.lr > 0 and self.warmup_lr > 0):
            raise ValueError(f"lr and warmup_lr must be positive, got {self.lr} and {self.warmup_lr}")
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")


@dataclasses.dataclass
class TrainResult:
    history: list          # one dict of metrics per epoch
    best_epoch: int        # 0-based epoch whose weights the modules hold now
    best: dict             # that epoch's metrics
    modules: dict          # name -> trained module

    def __getitem__(self, name):
        return self.modules[name]


def cosine_with_warmup(optimizer, config: TrainConfig):
    """Per-epoch schedule: ``warmup_lr`` for the warm-up epochs, then lr * (1 + cos(pi e / E)) / 2."""
    def factor(epoch):
        if epoch < config.warmup_epochs:
            return config.warmup_lr / config.lr
        return 0.5 * (1.0 + math.cos(math.pi * epoch / config.epochs))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def atomic_save(obj, path) -> None:
    """``torch.save`` to a temporary file in the same folder, then ``os.replace``: a crash
    leaves either the old file or the new one, never a torn one."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _atomic_write_text(path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _rng_state():
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": np.random.get_state()}


def _set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def world():
    """(rank, world_size): (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def average_gradients(parameters) -> None:
    """All-reduce-mean the gradients over ranks (DistributedDataParallel's semantics)."""
    rank, size = world()
    if size == 1:
        return
    for p in parameters:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(size)


def _mean_over_ranks(values: dict) -> dict:
    """Average per-rank training logs, so every rank selects the same best epoch."""
    rank, size = world()
    if size == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return {k: (t[i] / size).item() for i, k in enumerate(keys)}


def epoch_batches(num_samples: int, batch_size: int, seed: int, epoch: int):
    """This rank's batches of sample indices for an epoch, from (seed, epoch) alone.

    Under data parallelism the permutation is dealt round-robin and truncated so every rank
    runs the same number of steps (an uneven last step would hang the gradient all-reduce).
    """
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    order = torch.randperm(num_samples, generator=g)
    rank, size = world()
    if size > 1:
        per_rank = num_samples // size
        order = order[rank::size][:per_rank]
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def fit(*, modules: dict, optimizers: dict, step, evaluate, num_samples: int, config: TrainConfig,
        select: str, maximize: bool = True, name: str = "train", extra_state=None):
    """The shared epoch loop.

    Args:
        modules: name -> nn.Module whose state is checkpointed (trained or not).
        optimizers: name -> optimizer; each gets ``cosine_with_warmup``.
        step: ``step(indices, epoch, progress) -> dict[str, float]`` runs one training step
            (forward, backward, optimizer steps) on these sample indices.
        evaluate: ``evaluate(epoch) -> dict[str, float]`` (may be empty).
        select: metric of ``evaluate`` (or of the mean training logs) picking the best epoch.
        extra_state: optional object with ``state_dict``/``load_state_dict`` (e.g. counters).
    """
    rank, _ = world()
    out = pathlib.Path(config.out_dir) if config.out_dir else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    schedulers = {k: cosine_with_warmup(o, config) for k, o in optimizers.items()}
    history, start_epoch, best_epoch, best_state = [], 0, -1, None
    best_value = -math.inf if maximize else math.inf

    def snapshot():
        return {k: copy.deepcopy(m.state_dict()) for k, m in modules.items()}

    if out is not None and config.resume and (out / "last.pt").exists():
        ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
        for k, m in modules.items():
            m.load_state_dict(ckpt["modules"][k])
        for k, o in optimizers.items():
            o.load_state_dict(ckpt["optimizers"][k])
        for k, s in schedulers.items():
            s.load_state_dict(ckpt["schedulers"][k])
        if extra_state is not None and "extra" in ckpt:
            extra_state.load_state_dict(ckpt["extra"])
        _set_rng_state(ckpt["rng"])
        history, start_epoch = ckpt["history"], ckpt["epoch"] + 1
        best_epoch, best_value, best_state = ckpt["best_epoch"], ckpt["best_value"], ckpt["best_state"]
        if rank == 0 and config.progress:
            print(f"{name}: resumed from {out / 'last.pt'} after epoch {ckpt['epoch'] + 1}")

    bar = tqdm(range(start_epoch, config.epochs), desc=name, unit="epoch",
               disable=not config.progress or rank != 0, initial=start_epoch, total=config.epochs)
    for epoch in bar:
        started = time.perf_counter()
        lr = next(iter(optimizers.values())).param_groups[0]["lr"] if optimizers else None
        for m in modules.values():
            m.train()
        logs = {}
        batches = epoch_batches(num_samples, config.batch_size, config.seed, epoch)
        for i, idx in enumerate(batches):
            progress = (epoch + i / max(len(batches), 1)) / config.epochs
            for key, value in step(idx, epoch, progress).items():
                logs.setdefault(key, []).append(float(value))
        for s in schedulers.values():
            s.step()
        for m in modules.values():
            m.eval()
        with torch.no_grad():
            metrics = _mean_over_ranks({f"train_{k}": sum(v) / len(v) for k, v in logs.items()})
            metrics.update(evaluate(epoch))
        metrics.update(epoch=epoch, seconds=round(time.perf_counter() - started, 3), lr=lr)
        for key, value in metrics.items():
            if isinstance(value, float) and not math.isfinite(value) and key.startswith("train_"):
                raise FloatingPointError(f"{name}: {key} became {value} in epoch {epoch}")
        history.append(metrics)
        if select not in metrics:
            raise KeyError(f"select metric {select!r} not among {sorted(metrics)}")
        value = metrics[select]
        if (value > best_value) if maximize else (value < best_value):
            best_epoch, best_value, best_state = epoch, value, snapshot()
        bar.set_postfix({select: f"{value:.4f}"})
        if out is not None and rank == 0:
            ckpt = dict(epoch=epoch, modules=snapshot(),
                        optimizers={k: o.state_dict() for k, o in optimizers.items()},
                        schedulers={k: s.state_dict() for k, s in schedulers.items()},
                        rng=_rng_state(), history=history, best_epoch=best_epoch,
                        best_value=best_value, best_state=best_state, config=dataclasses.asdict(config))
            if extra_state is not None:
                ckpt["extra"] = extra_state.state_dict()
            atomic_save(ckpt, out / "last.pt")
            if best_epoch == epoch:
                atomic_save(dict(epoch=epoch, modules=best_state, metrics=metrics,
                                 config=dataclasses.asdict(config)), out / "best.pt")
            # rewritten whole from the checkpointed history: a resumed run never duplicates lines
            _atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    if best_state is not None:
        for k, m in modules.items():
            m.load_state_dict(best_state[k])
    return TrainResult(history, best_epoch, history[best_epoch] if history else {}, modules)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
