"""A node's start-up: ordered steps, each a module of `initscripts/steps/` with one contract.

A step module defines `STEP = Step(...)`: its name, its order, the steps it needs, a line on
what it makes, and `run(boot) -> str`, which does the work idempotently (running it twice
leaves the node as running it once) and returns the one line that says what it did. A step
that fails raises `StepFailed` (or anything else: the runner catches it); the steps that need
it are skipped, every other step still runs. Like dracut's modules.d, a new step is a new file,
found by where it lives. A step that may wait long on other machines (`waits`: the etcd join,
which waits for the members before it to start) runs beside the steps after it; only the
steps that need it wait for it, so a node's boot services do not wait for its etcd member.

Every step prints one line, `virtualinux: [NN name] ok|FAILED|skipped: ...`; the systemd unit
sends stdout to the journal and the console, so the operator sees it in both.
Imports the model and the areas a node starts (netboot); nothing imports this but the units.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TextIO

from virtualinux.vvcm import Cluster, Node, VlxError

from . import steps as steps_package

CMDLINE = Path("/proc/cmdline")


class StepFailed(VlxError):
    """A step could not make what it makes; the message says why, in one line."""


@dataclasses.dataclass(frozen=True)
class Boot:
    """What every step gets: who this node is, the database generation it starts from, and
    the file-system root it writes under ("/" on a node; a directory in tests)."""

    node: Node
    cluster: Cluster
    root: Path = Path("/")
    cmdline: tuple[str, ...] = ()
    # On a node the steps change the running system too (host name, services); in tests and
    # when preparing an image they only write files.
    live: bool = False

    def path(self, absolute: str) -> Path:
        return self.root / absolute.lstrip("/")

    def kernel_arg(self, key: str) -> str | None:
        prefix = key + "="
        return next((arg[len(prefix):] for arg in self.cmdline if arg.startswith(prefix)), None)


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    order: int
    makes: str
    run: Callable[[Boot], str]
    needs: tuple[str, ...] = ()
    # It may wait minutes on other machines: it runs in a thread of its own, beside the
    # steps after it that do not need it.
    waits: bool = False


@dataclasses.dataclass(frozen=True)
class Outcome:
    step: Step
    state: str          # "ok", "failed" or "skipped"
    message: str

    def line(self) -> str:
        shown = {"ok": "ok", "failed": "FAILED", "skipped": "skipped"}[self.state]
        return f"virtualinux: [{self.step.order:02d} {self.step.name}] {shown}: {self.message}"


def discover() -> list[Step]:
    """Every `STEP` of `initscripts/steps/`, in order (then by name)."""
    found = []
    for module_info in pkgutil.iter_modules(steps_package.__path__):
        module = importlib.import_module(f"{steps_package.__name__}.{module_info.name}")
        step = getattr(module, "STEP", None)
        if not isinstance(step, Step):
            raise VlxError(f"start-up step module {module_info.name} has no STEP")
        found.append(step)
    names = [step.name for step in found]
    doubled = sorted({name for name in names if names.count(name) > 1})
    if doubled:
        raise VlxError(f"two start-up steps are named {doubled[0]}")
    for step in found:
        unknown = [need for need in step.needs if need not in names]
        if unknown:
            raise VlxError(f"start-up step {step.name} needs {unknown[0]}, which no step is")
    return sorted(found, key=lambda step: (step.order, step.name))


def run_steps(boot: Boot, steps: Iterable[Step], out: TextIO | None = None) -> list[Outcome]:
    """Run `steps` in order; a step whose needs did not all succeed is skipped. A need that is
    not among `steps` (a single step run by hand) counts as met. A `waits` step runs in a
    thread: the steps after it go on, and one that needs it waits for it first. Each step's
    line is printed when it is done; the outcomes come back in the order of `steps`."""
    steps = list(steps)
    considered = {step.name for step in steps}
    outcomes: dict[str, Outcome] = {}
    running: dict[str, threading.Thread] = {}
    printing = threading.Lock()

    def run_one(step: Step) -> None:
        missing = [need for need in step.needs if need in considered
                   and (need not in outcomes or outcomes[need].state != "ok")]
        if missing:
            outcome = Outcome(step, "skipped", f"needs {', '.join(missing)}, which did not "
                                               "succeed")
        else:
            try:
                outcome = Outcome(step, "ok", step.run(boot))
            except Exception as err:    # noqa: BLE001 - one failing step must not stop the rest
                message = str(err) if isinstance(err, VlxError) else f"{type(err).__name__}: {err}"
                outcome = Outcome(step, "failed", message.splitlines()[0] if message else "")
        with printing:
            print(outcome.line(), file=out or sys.stdout, flush=True)
        outcomes[step.name] = outcome

    for step in steps:
        for need in step.needs:
            if need in running:
                running.pop(need).join()
        if step.waits:
            running[step.name] = threading.Thread(target=run_one, args=(step,),
                                                  name=f"step-{step.name}", daemon=True)
            running[step.name].start()
        else:
            run_one(step)
    for thread in running.values():
        thread.join()
    return [outcomes[step.name] for step in steps]


def node_from_cmdline(cluster: Cluster, cmdline: tuple[str, ...]) -> Node:
    """The node named by `vlx.node=` on the kernel command line."""
    name = next((arg.split("=", 1)[1] for arg in cmdline if arg.startswith("vlx.node=")), None)
    if name is None:
        raise VlxError("the kernel command line names no node (vlx.node=): was this machine "
                       "booted by virtualinux?")
    return cluster.node(name)


def read_cmdline(path: Path = CMDLINE) -> tuple[str, ...]:
    try:
        return tuple(path.read_text().split())
    except OSError:
        return ()
