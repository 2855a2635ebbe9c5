"""pytest glue for runs over several hosts (xdist workers elsewhere, ``--tx ssh=``):
each host's startup sweep and run start, and the line saying which hosts ran
bottles (registered by ``plugin.pytest_configure``; the logic is ``host.hosts``).

The controller makes a run id and sends it to every worker (``workerinput``).
Each process then calls ``start_run_on_host`` with it: the first of the run on
a host sweeps that host, the others find the run recorded there.  The
controller goes first on its own host (``pytest_configure`` runs before any
worker starts), so its local workers never sweep again.

At the end each worker sends its host (name, id) and how many bottles it
started in ``workeroutput``; the controller prints one line in the terminal
summary, for distributed runs that started bottles only:
``bottles ran on: hostA (gw1: 3; the controller's host), hostB (gw0: 2)``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .host.hosts import HostIdentity, WorkerHost, host_identity, new_run_id, start_run_on_host, summary_line
from .host.locks import is_xdist_worker
from .host.sweep import sweep
from .images import failures
from .vmm.process import parent_pid

log = logging.getLogger(__name__)
# How long the terminal summary waits for the sweeps after dead workers.
SWEEP_WAIT = 30.0


class RunHosts:
    def __init__(
        self,
        config: pytest.Config,
        run_id: str,
        host: HostIdentity,
        handed_out: Callable[[], int],
        cache_dir: Path,
    ) -> None:
        self.config = config
        self.cache_dir = cache_dir
        self._sweeps: list[threading.Thread] = []
        self._lines: list[str] = []  # for the terminal summary: what the sweeps removed
        self.run_id = run_id
        self.host = host
        self.handed_out = handed_out
        self.workers: list[WorkerHost] = []

    # -- controller -----------------------------------------------------------

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node: Any) -> None:
        node.workerinput["bottle_run_id"] = self.run_id
        node.workerinput["bottle_controller_host"] = self.host.as_dict()

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: object) -> None:
        out = getattr(node, "workeroutput", None) or {}
        name = str(getattr(getattr(node, "gateway", None), "id", "?"))
        host = HostIdentity.from_dict(out.get("bottle_host"))
        self.workers.append(WorkerHost(name, host, int(out.get("bottle_count", 0)) if host else 0))
        if isinstance(swept := out.get("bottle_swept"), str):  # a remote host's startup sweep
            self.note(swept[:2000])
        spec = getattr(getattr(node, "gateway", None), "spec", None)
        local = bool(getattr(spec, "popen", False)) and not getattr(spec, "via", None)
        if error is not None and error != "keyboard-interrupt" and local:  # a remote host sweeps its own
            self._sweeps.append(threading.Thread(target=self._sweep_after, args=(name,), daemon=True))
            self._sweeps[-1].start()  # not in xdist's loop: lock waits would stall the whole run

    def _sweep_after(self, name: str) -> None:
        """A local worker that died (``kill -9``, the OOM killer, pytest-timeout's
        thread method) left its records, run directories and snapshots; its
        QEMUs died with it.  Sweep them now, not at the next run: the sweep
        leaves whatever a live process (the other workers) owns."""
        time.sleep(0.5)  # xdist can see the pipe close a moment before the worker is gone (a zombie)
        try:
            report = sweep([self.cache_dir])
        except Exception as e:  # best effort: the next run's sweep is there too
            log.warning("pytest-bottle: could not sweep after worker %s went down: %s", name, e)
            return
        if report.vms or report.processes or report.leases or report.paths:
            self.note(f"pytest-bottle: worker {name} went down; the sweep after it {report.counts()}")

    def note(self, line: str) -> None:
        """A line for the terminal summary's pytest-bottle section."""
        self._lines.append(line)

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        for thread in self._sweeps:
            thread.join(SWEEP_WAIT)
        lines = list(self._lines)
        if line := summary_line(self.workers, self.host):
            lines.append(line)
        if lines:
            terminalreporter.section("pytest-bottle", sep="-")
            for line in lines:
                terminalreporter.write_line(line)

    # -- worker ---------------------------------------------------------------

    def pytest_sessionfinish(self) -> None:
        out = getattr(self.config, "workeroutput", None)
        if out is not None:
            out["bottle_host"] = self.host.as_dict()
            out["bottle_count"] = self.handed_out()
            if self._lines:
                out["bottle_swept"] = "\n".join(self._lines)


def start(config: pytest.Config, cache_dir: Path, handed_out: Callable[[], int]) -> float:
    """Sweep this host once for the run (if no process of the run did yet) and
    return the run's start by this host's clock; registers the hooks above.

    Raises what the sweep raises (``UnsafeDirectory``, ``LockTimeout``)."""
    worker = getattr(config, "workerinput", None)
    if worker is None:
        run_id, by, begun = new_run_id(), "controller", time.time()
    else:  # a worker of a controller without this plugin's hooks sweeps as if alone
        run_id, by, begun = str(worker.get("bottle_run_id") or new_run_id()), str(worker["workerid"]), None
    found = start_run_on_host(run_id, cache_dir, by, begun)
    failures.join_run(run_id)  # a build that failed in one worker fails at once in the others
    hosts = RunHosts(config, run_id, host_identity(), handed_out, cache_dir)
    swept = found.report
    if swept and (swept.vms or swept.processes or swept.leases or swept.paths):
        # Say what a run killed before left (pytest's logging is not set up yet); what it
        # may not touch is logged as a warning.  A worker's line (on a host of its own: the
        # controller sweeps its own host first) goes to the controller's summary.
        where = "" if worker is None else f" of {socket.gethostname()} (by {by})"
        hosts.note(f"pytest-bottle: the startup sweep{where} removed what dead runs left: {swept.summary()}")
    config.pluginmanager.register(hosts, "bottle-hosts")
    return found.start


def pass_on_to_workers(signum: int) -> None:
    """Send ``signum`` to this controller's local xdist workers.

    A SIGTERM to the controller alone (a CI runner's, ``timeout``) unwinds
    it; xdist then tells each worker to exit, execnet interrupts a worker
    only after 5 s, and xdist kills it 10 s after asking: a worker had 5 s to
    stop its VMs, and on a loaded host it left them to the next sweep.  Told
    at once (as Ctrl-C in a terminal tells the whole group), it has 10.
    """
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or parent_pid(int(entry)) != me:
            continue
        if not is_xdist_worker(entry):
            continue
        try:
            os.kill(int(entry), signum)
        except OSError:  # gone meanwhile
            continue
