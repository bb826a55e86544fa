"""``torchkeep demo``: the whole story on real data in about twenty seconds.

Train LeNet5 on the 8×8 handwritten digits with checkpoints, SIGKILL a training process and
resume it bit for bit, export for inference, carry the weights into LeNet6 and fine-tune the new
layers. The logic is in :mod:`torchkeep.demo.story`; this module only renders it.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from contextlib import contextmanager
from typing import Any, Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                           TimeElapsedColumn)
from rich.table import Table

from torchkeep.cli._render import console, human_bytes, human_count

MARKER = ".torchkeep-demo"
OWNED = ("reference", "ckpt", "finetune", "lenet5.safetensors", MARKER)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train, crash, resume exactly, export, transfer, fine-tune "
                                    "(real data, under a minute on 2 CPU cores)",
                       description="Run torchkeep's story end to end on the UCI 8x8 handwritten "
                                   "digits shipped with the package: train LeNet5 with checkpoints, "
                                   "SIGKILL a training process and resume it bit-identically, export "
                                   "for inference, transfer into LeNet6, freeze and fine-tune.")
    p.add_argument("--dir", default="demo-run", metavar="DIR",
                   help="folder for the demo's checkpoints (default: demo-run); a previous demo's "
                        "folder is replaced, any other non-empty folder is refused")
    p.add_argument("--steps", type=int, default=None, metavar="N",
                   help="LeNet5 training steps (default 200; fine-tuning takes half as many)")
    p.add_argument("--quiet", action="store_true", help="no progress bars and no narration")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from torchkeep.demo import story as demo

    steps = demo.DemoConfig.steps if args.steps is None else args.steps
    if steps < 10:
        raise ValueError(f"--steps must be at least 10, got {steps}")
    cfg = demo.DemoConfig(steps=steps, finetune_steps=max(10, steps // 2),
                          every_steps=max(5, steps // 10))
    out = Console(highlight=False, soft_wrap=True)  # long lines stay whole when piped
    say = (lambda *a, **k: None) if args.quiet else out.print
    bars = not args.quiet and sys.stderr.isatty()
    directory = _prepare(args.dir)
    t_start = time.perf_counter()

    data = demo.digits(cfg)
    out.print(f"[bold]torchkeep demo[/]: {human_count(len(data.train_labels))} train / "
              f"{human_count(len(data.test_labels))} test images of the UCI handwritten digits "
              f"(Alpaydin & Kaynak 1998, CC BY 4.0, shipped in the package; 8×8 upscaled to 28×28 "
              f"for the seed article's LeNet5)")
    out.print(f"LeNet5, {cfg.steps} steps of Adam + cosine LR, batch {cfg.batch_size}, shuffled; "
              f"a checkpoint every {cfg.every_steps} steps; everything goes to {directory}/")

    crash, cmp = _keep(out, say, bars, demo, cfg, data, directory)
    exp = _export(out, demo, crash.resumed.checkpoint, os.path.join(directory, "lenet5.safetensors"),
                  data)
    model6, report = _carry(out, demo, exp.path, cfg, quiet=args.quiet)
    _shape(out, bars, demo, model6, report, data, cfg, os.path.join(directory, "finetune"))

    out.print(f"\nDone in {time.perf_counter() - t_start:.1f} s. Look at what it left:")
    rel = _rel(directory)
    for cmd in (f"torchkeep ls {rel}/ckpt",
                f"torchkeep inspect {_rel(crash.resumed.checkpoint)}",
                f"torchkeep diff {_rel(crash.reference.checkpoint)} {_rel(crash.resumed.checkpoint)}",
                f"torchkeep inspect {_rel(exp.path)}",
                f"torchkeep ls {rel}/finetune"):
        out.print(f"  {cmd}", highlight=False, markup=False)
    return 0 if cmp.identical else 1


def _keep(out: Console, say: Any, bars: bool, demo: Any, cfg: Any, data: Any, directory: str
          ) -> tuple[Any, Any]:
    """1. keep: the same run twice, one of them killed and resumed; their final checkpoints
    compared tensor by tensor."""
    ref_dir, ckpt_dir = os.path.join(directory, "reference"), os.path.join(directory, "ckpt")
    _heading(out, 1, "Train, crash, resume: two processes train the same run side by side")
    say(f"   A (this process) trains without interruption. B (a child) is SIGKILLed right after it "
        f"starts writing its first checkpoint at or past step {cfg.kill_at}; a fresh process C "
        f"resumes from what B left.")
    with _bars(bars, {"reference": "A uninterrupted", "crash": "B → C killed, resumed"},
               cfg.steps) as bar:
        crash = demo.crash_and_resume(ckpt_dir, cfg, on_event=bar.update, reference=ref_dir,
                                      data=data)
    ref, resumed = crash.reference, crash.resumed
    assert ref is not None
    out.print(f"   A: {ref.step} steps in {ref.seconds:.1f} s, final loss {ref.loss:.4f}")
    k = crash.save_in_flight
    if k is not None and k not in crash.committed:
        left = " (its half-written folder is ignored)" if k in crash.uncommitted else ""
        out.print(f"   B: SIGKILLed after step {crash.killed_after_step} while the checkpoint of step {k} "
                  f"was being written in the background: it was never committed{left}")
    else:
        out.print(f"   B: SIGKILLed after step {crash.killed_after_step}, just after its checkpoint of "
                  f"step {k} was committed")
    out.print(f"      committed checkpoints it left: steps {', '.join(map(str, crash.committed)) or 'none'}")
    out.print(f"   C: restored step {resumed.resumed_from}, trained to step {resumed.step}, "
              f"final loss {resumed.loss:.4f}")
    if ref.checkpoint is None or resumed.checkpoint is None:
        raise ValueError("a demo run left no checkpoint to compare")
    cmp = demo.compare(ref.checkpoint, resumed.checkpoint)
    if cmp.identical:
        out.print(f"   [green]✓ bit-identical[/]: C's final checkpoint equals A's in all {cmp.n_tensors} "
                  f"tensors ({human_bytes(cmp.n_bytes)}: weights, Adam moments, RNG and sampler state)")
    else:
        first = (cmp.different + cmp.only_a + cmp.only_b)[:3]
        out.print(f"   [red]✗ NOT bit-identical[/]: {len(cmp.different)} of {cmp.n_tensors} tensors "
                  f"differ (max |a-b| {cmp.max_abs_diff:.3g}); {len(cmp.only_a)} only in A, "
                  f"{len(cmp.only_b)} only in C; first: {', '.join(first)}")
    return crash, cmp


def _export(out: Console, demo: Any, checkpoint: str, export_path: str, data: Any) -> Any:
    """2. carry, part one: the weights for inference, evaluated in a fresh model."""
    _heading(out, 2, "Save for inference and evaluate")
    exp = demo.export_for_inference(checkpoint, export_path, data)
    out.print(f"   torchkeep.convert took the '{exp.wrapper}' part of {_rel(checkpoint)} → "
              f"{_rel(exp.path)}: {exp.n_tensors} tensors, {human_count(exp.n_params)} parameters, "
              f"{human_bytes(exp.nbytes)}, {'verified' if exp.verified else 'NOT verified'}")
    out.print(f"   loaded strictly into a fresh LeNet5: test accuracy [bold]{exp.accuracy:.1%}[/]")
    return exp


def _carry(out: Console, demo: Any, path: str, cfg: Any, *, quiet: bool) -> tuple[Any, Any]:
    """3. carry, part two: into a changed model, with the full report."""
    _heading(out, 3, "Transfer into LeNet6 (one more Linear: fc.5 changes shape, fc.7 is new)")
    model6, report = demo.transfer_to_lenet6(path, cfg)
    out.print("   " + report.headline())
    if not quiet:
        if out.is_terminal:
            out.print(_report_table(report))
        else:
            out.print("\n".join("   " + line for line in report.table().splitlines()))
    return model6, report


def _shape(out: Console, bars: bool, demo: Any, model6: Any, report: Any, data: Any, cfg: Any,
           ft_dir: str) -> None:
    """4. shape: freeze what was carried, train the rest."""
    _heading(out, 4, "Freeze the transferred layers, fine-tune the new ones")
    with _bars(bars, {"finetune": "fine-tune"}, cfg.finetune_steps) as bar:
        ft = demo.finetune(model6, report, data, cfg, directory=ft_dir,
                           on_event=lambda e: bar.update({**e, "phase": "finetune"}))
    out.print(f"   froze {len(ft.frozen)} tensors; training {', '.join(ft.trained)} "
              f"({human_count(ft.n_trainable)} of {human_count(ft.n_total)} parameters)")
    out.print(f"   LeNet6 test accuracy: {ft.accuracy_before:.1%} after transfer (new layers random) → "
              f"[bold]{ft.accuracy_after:.1%}[/] after {ft.steps} fine-tuning steps")
    if ft.checkpoints:
        step, nbytes, written = ft.checkpoints[-1]
        out.print(f"   its checkpoint of step {step} holds {human_bytes(nbytes)} of tensors and wrote "
                  f"{human_bytes(written)}: unchanged tensors already stored are not written again")


def _prepare(directory: str) -> str:
    """Create the demo folder; clear what a previous demo left there; refuse anything else."""
    directory = os.path.normpath(directory)
    if os.path.isdir(directory) and os.listdir(directory):
        if not os.path.exists(os.path.join(directory, MARKER)):
            raise ValueError(f"{directory}: folder exists and is not a previous demo's folder "
                             f"(no {MARKER} file); pass an empty or new --dir")
        for name in OWNED:
            p = os.path.join(directory, name)
            if os.path.isdir(p):
                shutil.rmtree(p)
            elif os.path.exists(p):
                os.unlink(p)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, MARKER), "w") as f:
        f.write("written by `torchkeep demo`; the demo replaces this folder's contents on its next run\n")
    return directory


def _rel(path: str) -> str:
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def _heading(out: Console, n: int, text: str) -> None:
    out.print(f"\n[bold cyan]{n}.[/] [bold]{text}[/]")


def _report_table(report: Any) -> Table:
    t = Table(box=None, padding=(0, 1), pad_edge=False, show_edge=False)
    for col in ("   fate", "target", "shape", "source", "detail"):
        t.add_column(col, overflow="fold")
    style = {"loaded": "green", "adapted": "yellow", "missing": "magenta", "unused": "dim"}
    for fate, target, shape, source, detail in report.rows():
        t.add_row(f"   [{style.get(fate, '')}]{fate}[/]", target, shape, source, detail)
    return t


class _Bars:
    """Turns demo events (with a ``phase``) into progress bar positions; a no-op without a
    terminal."""

    def __init__(self, progress: Progress | None, tasks: dict[str, Any]) -> None:
        self.progress, self.tasks = progress, tasks

    def update(self, event: dict[str, Any]) -> None:
        if self.progress is None:
            return
        phase, kind = event.get("phase"), event.get("event")
        task = self.tasks.get("crash" if phase == "resume" else phase)
        if task is None:
            return
        if kind == "step":
            self.progress.update(task, completed=event["step"])
        elif kind == "killed":
            self.progress.update(task, description=f"[red]B SIGKILLed at {event['step']}[/]")
        elif kind == "restored" and phase == "resume":
            self.progress.update(task, completed=event["step"] or 0,
                                 description=f"C resumed from {event['step']}")


@contextmanager
def _bars(enabled: bool, names: dict[str, str], total: int) -> Iterator[_Bars]:
    if not enabled:
        yield _Bars(None, {})
        return
    # The spinner and the clock move from the first moment, while the first step is prepared.
    with Progress(SpinnerColumn(), TextColumn("{task.description:<24}"), BarColumn(),
                  MofNCompleteColumn(), TimeElapsedColumn(), console=console(stderr=True),
                  transient=True, refresh_per_second=10) as p:
        yield _Bars(p, {phase: p.add_task(label, total=total) for phase, label in names.items()})
