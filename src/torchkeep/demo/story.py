"""The story of ``torchkeep demo``, as functions that return results (the CLI renders them).

Train LeNet5 on the 8×8 handwritten digits with a ``CheckpointManager`` and ``TrainState``; train
the same run in a child process, SIGKILL it while a checkpoint is being written and resume it in
a fresh process; check that the resumed run ends bit-identical to an uninterrupted one (trained
meanwhile in this process); export the weights for inference and evaluate them; carry them into
LeNet6 with ``transfer``; freeze what was carried and fine-tune the new layers.

``python -m torchkeep.demo.story train --dir D ...`` is the child process: it trains (resuming from
``D`` if it holds a checkpoint) and reports its progress as JSON lines on stdout. With
``--wait`` it first does its imports, reports ``ready`` and waits for ``go`` on stdin before it
looks at ``D``, so that its start-up can overlap the run it replaces.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from torchkeep.demo.datasets import Split, load_digits, split

Event = dict[str, Any]
OnEvent = Callable[[Event], None]


@dataclass(frozen=True)
class DemoConfig:
    """Everything that decides the numbers of a demo run; the child gets the same values."""

    steps: int = 200            # LeNet5 optimizer steps
    finetune_steps: int = 100   # LeNet6 steps on the new layers
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0
    every_steps: int = 20       # checkpoint interval
    keep_last: int = 3
    image_size: int = 28        # LeNet5 of the seeds expects 28×28; the digits are upscaled
    threads: int = 1            # fixed, so in-process and child runs compute the same bits

    def to_args(self) -> list[str]:
        out: list[str] = []
        for k, v in asdict(self).items():
            out += [f"--{k.replace('_', '-')}", str(v)]
        return out

    @property
    def kill_at(self) -> int:
        """The child is killed while writing its first checkpoint at or past this step: about
        60% into the run, and at least one checkpoint interval before its end."""
        return max(1, min((self.steps * 3) // 5, self.steps - self.every_steps))


@dataclass
class TrainResult:
    """One (possibly resumed) training run that reached ``step``."""

    directory: str
    step: int
    resumed_from: int | None
    loss: float
    seconds: float
    checkpoint: str | None = None     # the newest checkpoint's path


@dataclass
class CrashResult:
    """The child that was killed and the fresh process that finished its run."""

    pid: int
    killed_after_step: int             # last step the child reported before SIGKILL
    save_in_flight: int | None         # the step whose background write had begun
    committed: list[int]               # checkpoints on disk after the kill, committed ...
    uncommitted: list[int]             # ... and half-written (never resumed from)
    resumed: TrainResult
    seconds: float
    reference: TrainResult | None = None   # the uninterrupted run, when one ran alongside
    resumed_pid: int | None = None

    @property
    def survived_step(self) -> int | None:
        """The newest checkpoint the crash left whole: where the resumed run starts."""
        return self.committed[-1] if self.committed else None


@dataclass
class Comparison:
    """Two checkpoints compared tensor by tensor (model, optimizer, RNG, everything stored)."""

    a: str
    b: str
    n_tensors: int
    n_bytes: int
    identical: bool
    different: list[str] = field(default_factory=list)
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    max_abs_diff: float = 0.0


@dataclass
class ExportResult:
    """The inference file and how well the model loaded from it does on the test set."""

    path: str
    n_tensors: int
    n_params: int
    nbytes: int
    accuracy: float
    wrapper: str | None = None      # where convert found the weights in the training state
    verified: bool = False          # convert re-read the file and compared it with the source
    seconds: float = 0.0


@dataclass
class FinetuneResult:
    """The frozen and trained parameters of the fine-tuned model and its accuracy around it."""

    frozen: list[str]
    trained: list[str]
    n_trainable: int
    n_total: int
    accuracy_before: float
    accuracy_after: float
    steps: int
    seconds: float
    directory: str | None = None
    checkpoints: list[tuple[int, int, int]] = field(default_factory=list)  # (step, bytes, written)


# ----------------------------------------------------------------------------- data and models


def digits(config: DemoConfig) -> Split:
    """The digits, split 80/20 (stratified, seed 0), upscaled to the models' input size."""
    images, labels = load_digits()
    s = split(images, labels, test_fraction=0.2, seed=0)
    if config.image_size == 8:
        return s
    size = (config.image_size, config.image_size)

    def up(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    return Split(up(s.train_images), s.train_labels, up(s.test_images), s.test_labels)


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """Run the body with ``n`` intra-op threads (the bits of a CPU reduction depend on it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``images`` that ``model`` classifies correctly (eval mode, restored after)."""
    was_training = model.training
    model.eval()
    try:
        pred = torch.cat([model(x).argmax(1) for x in images.split(512)])
    finally:
        model.train(was_training)
    return (pred == labels).float().mean().item()


def _lenet5() -> torch.nn.Module:
    from torchkeep.demo.models import LeNet5
    return LeNet5()


def _lenet6() -> torch.nn.Module:
    from torchkeep.demo.models import LeNet6
    return LeNet6()


def build_state(config: DemoConfig, data: Split) -> Any:
    """A fresh LeNet5 training state: Adam, a cosine LR schedule, a shuffled DataLoader; every
    RNG the state captures (Python, numpy, torch) seeded from ``config.seed``."""
    from torchkeep.keep.trainstate import TrainState

    _seed_everything(config.seed)
    model = _lenet5()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.steps)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data.train_images, data.train_labels),
        batch_size=config.batch_size, shuffle=True,
        generator=torch.Generator().manual_seed(config.seed))
    return TrainState(model=model, optimizer=optimizer, scheduler=scheduler, dataloader=loader)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- training


def train(directory: str, config: DemoConfig, on_event: OnEvent | None = None,
          data: Split | None = None) -> TrainResult:
    """Train LeNet5 to ``config.steps`` with checkpoints in ``directory``, resuming from the
    newest good checkpoint there if any. ``on_event`` receives ``restored``, ``step`` and
    ``saved`` events (dicts) as they happen; ``saved`` means the snapshot is taken and the
    background write has begun."""
    from torchkeep.keep.manager import CheckpointManager

    emit = on_event or (lambda e: None)
    t0 = time.perf_counter()
    data = data or digits(config)
    loss = float("nan")
    with threads(config.threads), CheckpointManager(
            directory, keep_last=config.keep_last, every_steps=config.every_steps,
            async_save=True) as manager:
        state = build_state(config, data)
        resumed = manager.restore(state)
        emit({"event": "restored", "step": resumed})
        model, optimizer, scheduler = state.model, state.optimizer, state.scheduler
        model.train()
        while state.step < config.steps:
            for x, y in state.batches():
                loss_t = F.cross_entropy(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss_t.backward()
                optimizer.step()
                scheduler.step()
                loss = loss_t.item()
                emit({"event": "step", "step": state.step, "loss": loss})
                if manager.should_save(state.step) or state.step == config.steps:
                    manager.save(state, metrics={"loss": loss})
                    emit({"event": "saved", "step": state.step})
                if state.step >= config.steps:
                    break
        manager.wait()
        latest = manager.latest()
    return TrainResult(directory=directory, step=state.step, resumed_from=resumed, loss=loss,
                       seconds=time.perf_counter() - t0,
                       checkpoint=latest.path if latest else None)


def crash_and_resume(directory: str, config: DemoConfig, on_event: OnEvent | None = None,
                     reference: str | None = None, data: Split | None = None) -> CrashResult:
    """Train in a child process and SIGKILL it right after it starts the background write of
    its first checkpoint at or past ``config.kill_at``; then finish the run in a fresh child
    that resumes from what the first one left on disk.

    With ``reference``, this process meanwhile trains the same run there without interruption
    (side by side: two cores get used, and the resumed run gets something to equal). Events
    carry a ``phase``: 'reference', 'crash' or 'resume'; they come from two threads."""
    emit = on_event or (lambda e: None)
    if reference is None:
        return _crash_and_resume(directory, config, emit, [])
    box: dict[str, Any] = {}
    live: list[_Child] = []

    def children() -> None:
        try:
            box["result"] = _crash_and_resume(directory, config, emit, live)
        except BaseException as e:  # raised below, in the caller's thread
            box["error"] = e

    worker = threading.Thread(target=children, name="torchkeep-demo-children", daemon=True)
    worker.start()
    try:
        ref = train(reference, config, on_event=lambda e: emit({**e, "phase": "reference"}),
                    data=data)
    except BaseException:
        for child in live:          # e.g. Ctrl-C: do not wait for the children to finish
            child.proc.kill()
        raise
    finally:
        worker.join()
    if "error" in box:
        raise box["error"]
    result: CrashResult = box["result"]
    result.reference = ref
    return result


def _crash_and_resume(directory: str, config: DemoConfig, emit: OnEvent,
                      live: list[_Child]) -> CrashResult:
    from torchkeep.keep.manager import CheckpointManager

    t0 = time.perf_counter()
    killed_after, in_flight = 0, None
    # C starts now so that its imports overlap B's training; it waits, without looking at the
    # folder, until B is dead and reaped.
    with _Child(directory, config, wait=True) as second:
        live.append(second)
        with _Child(directory, config) as first:
            live.append(first)
            for event in first.events():
                emit({**event, "phase": "crash"})
                if event["event"] == "step":
                    killed_after = event["step"]
                elif event["event"] == "saved" and event["step"] >= config.kill_at:
                    first.kill()
                    in_flight = event["step"]
                    break
        if first.returncode != -signal.SIGKILL:
            raise RuntimeError(f"demo child {first.pid} ended with exit code {first.returncode} "
                               f"before it could be killed:\n{first.stderr}")
        emit({"event": "killed", "phase": "crash", "step": killed_after, "pid": first.pid})
        infos = CheckpointManager(directory).list(include_uncommitted=True)
        last: dict[str, Event] = {}
        events = second.events()
        if any(event["event"] == "ready" for event in events):   # C's start-up is done
            second.go()
            for event in events:
                emit({**event, "phase": "resume"})
                last[event["event"]] = event
    if second.returncode != 0:
        raise RuntimeError(f"demo child {second.pid} failed with exit code {second.returncode}:"
                           f"\n{second.stderr}")
    done = last.get("done", {})
    resumed = TrainResult(directory=directory, step=done.get("step", 0),
                          resumed_from=last.get("restored", {}).get("step"),
                          loss=done.get("loss", float("nan")), seconds=second.seconds,
                          checkpoint=done.get("checkpoint"))
    return CrashResult(pid=first.pid, killed_after_step=killed_after, save_in_flight=in_flight,
                       committed=[i.step for i in infos if i.status == "ok"],
                       uncommitted=[i.step for i in infos if i.status != "ok"],
                       resumed=resumed, seconds=time.perf_counter() - t0, resumed_pid=second.pid)


class _Child:
    """``python -m torchkeep.demo.story train ...`` and its JSON-line events; stderr is kept aside in
    a temporary file (a pipe nobody reads could fill up and stall the child)."""

    def __init__(self, directory: str, config: DemoConfig, wait: bool = False) -> None:
        cmd = [sys.executable, "-m", "torchkeep.demo.story", "train", "--dir", directory,
               *config.to_args(), *(["--wait"] if wait else [])]
        self._err = tempfile.TemporaryFile(mode="w+t")
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._err, text=True,
                                     stdin=subprocess.PIPE if wait else subprocess.DEVNULL,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.pid = self.proc.pid
        self.returncode: int | None = None
        self.stderr = ""
        self.seconds = 0.0

    def events(self) -> Iterator[Event]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                yield json.loads(line)

    def kill(self) -> None:
        """SIGKILL: no handler, no flush, no cleanup runs in the child."""
        os.kill(self.pid, signal.SIGKILL)

    def go(self) -> None:
        """Let a child started with ``wait`` begin: it opens its folder only now."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.close()

    def __enter__(self) -> "_Child":
        return self

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        if exc_type is not None and self.proc.poll() is None:
            self.proc.kill()
        self.returncode = self.proc.wait()
        self.seconds = time.perf_counter() - self.t0
        for f in (self.proc.stdin, self.proc.stdout):
            if f and not f.closed:
                f.close()
        self._err.seek(0)
        self.stderr = self._err.read()[-4000:]
        self._err.close()


# ----------------------------------------------------------------------------- checks


def compare(a: str, b: str) -> Comparison:
    """Every tensor of checkpoint ``a`` against the same-named one of ``b``, bit for bit."""
    from torchkeep.read.checkpoint import open as open_checkpoint

    with open_checkpoint(a) as ca, open_checkpoint(b) as cb:
        ta, tb = ca.tensors(), cb.tensors()
    names = sorted(set(ta) & set(tb))
    different: list[str] = []
    max_diff = 0.0
    nbytes = 0
    for name in names:
        x, y = ta[name], tb[name]
        nbytes += x.numel() * x.element_size()
        if x.shape != y.shape or x.dtype != y.dtype:
            different.append(name)
            continue
        if not torch.equal(x, y):
            different.append(name)
            if x.is_floating_point():
                max_diff = max(max_diff, (x.double() - y.double()).abs().max().item())
    only_a = sorted(set(ta) - set(tb))
    only_b = sorted(set(tb) - set(ta))
    return Comparison(a=a, b=b, n_tensors=len(names), n_bytes=nbytes,
                      identical=not different and not only_a and not only_b and bool(names),
                      different=different, only_a=only_a, only_b=only_b, max_abs_diff=max_diff)


def export_for_inference(checkpoint: str, path: str, data: Split) -> ExportResult:
    """Write the model weights of a training checkpoint to a safetensors file (``convert``
    finds them, writes atomically and verifies), then load that file strictly (every key, every
    shape) into a fresh LeNet5 and measure its test accuracy."""
    from torchkeep.look.conversion import convert
    from torchkeep.read.checkpoint import open as open_checkpoint

    res = convert(checkpoint, path, overwrite=True)
    model = _lenet5()
    with open_checkpoint(path) as ck:
        sd = ck.state_dict()
    model.load_state_dict(sd, strict=True)
    n_params = sum(t.numel() for t in sd.values())
    return ExportResult(path=path, n_tensors=res.tensors, n_params=n_params, nbytes=res.nbytes,
                        accuracy=accuracy(model, data.test_images, data.test_labels),
                        wrapper=res.wrapper, verified=res.verified, seconds=res.seconds)


def transfer_to_lenet6(source: str, config: DemoConfig) -> tuple[torch.nn.Module, Any]:
    """A LeNet6 (one more fully connected layer) initialised from ``source`` by ``transfer``;
    returns the model and its ``TransferReport``."""
    from torchkeep.carry.planner import transfer

    torch.manual_seed(config.seed + 1)
    model = _lenet6()
    report = transfer(model, source)
    return model, report


def finetune(model: torch.nn.Module, report: Any, data: Split, config: DemoConfig,
             directory: str | None = None, on_event: OnEvent | None = None) -> FinetuneResult:
    """Freeze what ``transfer`` loaded into ``model`` and train the rest for
    ``config.finetune_steps`` steps; test accuracy before and after. With ``directory`` the
    run is checkpointed there too, where the frozen tensors' bytes are stored only once."""
    from torchkeep.keep.manager import CheckpointManager
    from torchkeep.keep.trainstate import TrainState
    from torchkeep.shape import freeze, trainable

    emit = on_event or (lambda e: None)
    t0 = time.perf_counter()
    before = accuracy(model, data.test_images, data.test_labels)
    if not report.loaded:  # freeze() with no selector would freeze everything
        raise ValueError("transfer loaded nothing into the model, so there is nothing to freeze")
    frozen = freeze(model, *report.loaded)
    named = dict(model.named_parameters())
    trained = [n for n, p in named.items() if p.requires_grad]
    params = trainable(model)
    saved: list[tuple[int, int, int]] = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(threads(config.threads))
        manager = None
        if directory is not None:
            manager = stack.enter_context(CheckpointManager(
                directory, keep_last=config.keep_last, every_steps=config.every_steps))
        _seed_everything(config.seed + 2)
        optimizer = torch.optim.Adam(params, lr=config.lr)
        loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(data.train_images, data.train_labels),
            batch_size=config.batch_size, shuffle=True,
            generator=torch.Generator().manual_seed(config.seed + 2))
        state = TrainState(model=model, optimizer=optimizer, dataloader=loader)
        model.train()
        while state.step < config.finetune_steps:
            for x, y in state.batches():
                loss = F.cross_entropy(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                emit({"event": "step", "step": state.step, "loss": loss.item()})
                if manager is not None and (manager.should_save(state.step)
                                            or state.step == config.finetune_steps):
                    manager.save(state, metrics={"loss": loss.item()})
                if state.step >= config.finetune_steps:
                    break
        if manager is not None:
            manager.wait()
            saved = [(i.step, i.nbytes, i.written) for i in manager.list()]
    after = accuracy(model, data.test_images, data.test_labels)
    return FinetuneResult(frozen=frozen, trained=trained,
                          n_trainable=sum(p.numel() for p in params),
                          n_total=sum(p.numel() for p in named.values()),
                          accuracy_before=before, accuracy_after=after, steps=state.step,
                          seconds=time.perf_counter() - t0, directory=directory,
                          checkpoints=saved)


# ----------------------------------------------------------------------------- child process


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m torchkeep.demo.story")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train (or resume) the demo's LeNet5; JSON lines on stdout")
    t.add_argument("--dir", required=True)
    t.add_argument("--wait", action="store_true",
                   help="import and load the data, report 'ready', then wait for a line on stdin "
                        "before touching --dir")
    for name, f in DemoConfig.__dataclass_fields__.items():
        t.add_argument(f"--{name.replace('_', '-')}", dest=name, type=type(f.default),
                       default=f.default)
    a = p.parse_args(argv)
    a.config = DemoConfig(**{k: getattr(a, k) for k in DemoConfig.__dataclass_fields__})
    return a


def _main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)

    def out(event: Event) -> None:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()

    data = digits(args.config)
    if args.wait:
        # Pay the start-up cost now (torch.optim imports torch._dynamo on first use), then
        # wait: the folder is read only after the parent says go.
        import torch._dynamo  # noqa: F401

        from torchkeep.demo import models as zoo
        from torchkeep.keep import manager
        from torchkeep.keep import trainstate as state
        out({"event": "ready"})
        if sys.stdin.readline().strip() != "go":
            return 1
    result = train(args.dir, args.config, on_event=out, data=data)
    out({"event": "done", "step": result.step, "loss": result.loss,
         "checkpoint": result.checkpoint})
    return 0


if __name__ == "__main__":
    sys.exit(_main())
