"""``GuestProcess``: a command running in the guest while the test goes on
(``Bottle.spawn``).

It is one long agent call (an ``exec`` without a timeout that announces its
pid): output arrives on the channel's reader thread into a bounded tail per
stream, the reply is the exit.  Nothing here polls the guest: ``poll`` looks
at the call, signals are small calls of their own.  When the bottle ends
(closed, its VM killed, its agent restarted) the call ends with it, and the
process counts as killed (``returncode`` -9): no method hangs afterwards.
"""

from __future__ import annotations

import collections
import json
import logging
import re
import signal
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from .agent.calls import Call
from .agent.client import AgentClient
from .agent.replies import ExecReply
from .agent.streams import OutputTail
from .arguments import check_signal, check_timeout
from .errors import AgentError, AgentTimeout, BottleError, ExecTimeout, OutputTimeout, ProcessTimeout, SpecError
from .guest.frames import STARTED, STDERR, STDOUT
from .results import Command, ExecResult, to_argv

log = logging.getLogger(__name__)

# Bytes of each output stream a process keeps: the last 16 MiB; what falls off
# the front is counted and noted at the start of ``stdout``/``stderr``.
PROCESS_OUTPUT_CAP = 16 * 1024 * 1024
LOST = -signal.SIGKILL  # the code of a process whose bottle ended under it
SEARCH_RATE = 20  # wait_for_output looks at new output at most this often a second
SEARCH_OVERLAP = 64 * 1024  # output searched again with the new: a match across two looks
KILL_WAIT = 10.0  # how long leaving the ``with`` block waits for the killed process
START_TIMEOUT = 120.0  # from spawn() to the agent saying the command runs (or that it could not)


class GuestProcess:
    """A command started by ``Bottle.spawn``; see the module doc."""

    def __init__(self, agent: AgentClient, cmd: Command, cap: int = PROCESS_OUTPUT_CAP) -> None:
        self.args = cmd
        self.pid: int | None = None  # None if it never started (see ``returncode``)
        self._agent = agent
        self._out, self._err = OutputTail(cap), OutputTail(cap)
        self._cond = threading.Condition()
        self._started = threading.Event()
        self._rid = 0
        self._call: Call | None = None
        self._begun = time.monotonic()
        self._result: ExecResult | None = None
        self._killed = False
        self.lost = ""  # why the process is gone without an exit code (the bottle ended)
        self._on_end: Callable[[str], None] | None = None  # told the final state (the report's entry)

    @classmethod
    def start(
        cls,
        agent: AgentClient,
        cmd: Command,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | int | None = None,
        input: bytes | None = None,
    ) -> GuestProcess:
        """Start ``cmd`` and return once it runs (or failed to start: then it has
        already exited, 127 for a missing program, like ``exec``)."""
        proc = cls(agent, cmd)
        proc._rid, proc._call = agent.spawn(
            to_argv(cmd), proc._sink, env=env or {}, cwd=cwd, user=user, stdin=input is not None
        )
        if input is not None:
            threading.Thread(target=proc._feed, args=(input,), daemon=True, name=f"bottle-stdin-{proc._rid}").start()
        call, channel = proc._call, agent.channel
        started = time.monotonic()
        try:
            # From 10 ms up: a command that cannot start ends the call at once, and
            # nothing but STARTED wakes this wait (an agent that never sends it: bounded).
            wait = 0.01
            while not proc._started.wait(wait) and not call.done.is_set() and call.error is None:
                if time.monotonic() - started > START_TIMEOUT:
                    raise AgentTimeout(f"bottle {agent.name}: {cmd!r} did not start within {START_TIMEOUT:g} s")
                channel.check(call, "spawn")
                wait = min(wait * 2, channel.idle / 4)
            if call.error is not None:  # what the guest sent was refused
                raise call.error
        except BaseException:  # nobody will hold this process: the agent kills it
            channel.forget(proc._rid)
            raise
        if not proc._started.is_set():  # a failure to start is an exit (127...); errors raise here
            channel.wait(call, 0, "spawn")
            proc._finish()
        return proc

    def _feed(self, data: bytes) -> None:
        try:
            self._agent.channel.send_data(self._rid, (data[i : i + 65536] for i in range(0, len(data), 65536)))
        except BottleError as e:  # the call itself reports a broken channel
            log.debug("stdin of %r: %s", self.args, e)

    def _sink(self, kind: int, data: bytes) -> None:
        """On the channel's reader thread: store, never block."""
        if kind == STARTED:
            pid = _parse_pid(data)
            if pid is None:
                raise AgentError(f"bottle {self._agent.name}: a malformed STARTED frame: {data[:80]!r}")
            self.pid = pid
            self._started.set()
            return
        tail = {STDOUT: self._out, STDERR: self._err}.get(kind)
        if tail is not None:
            with self._cond:
                tail.add(data)
                self._cond.notify_all()

    # -- state ----------------------------------------------------------------

    def poll(self) -> int | None:
        """The exit code (negative: killed by that signal), or None while it runs."""
        if self._result is None:
            assert self._call is not None
            if not self._call.done.is_set():
                return None
            self._finish()
        assert self._result is not None
        return self._result.returncode

    @property
    def returncode(self) -> int | None:
        return self.poll()

    def ended_seen(self) -> bool:
        """Whether its end has been seen (by ``poll``, ``wait``...)."""
        return self._result is not None

    def ended(self) -> bool:
        """Whether it ended, seen or not (its call is done: no reply parsed, nothing raised)."""
        return self._result is not None or (self._call is not None and self._call.done.is_set())

    def _finish(self) -> None:
        call = self._call
        assert call is not None
        reply: ExecReply | None = None
        if call.error is not None:  # what the guest sent was refused (a bad frame, past its window)
            raise call.error
        if call.reply is None:
            self.lost = call.lost or self._agent.channel.death or "the bottle was closed"
        elif not call.reply.get("ok"):
            self.lost = f"the agent failed it: {str(call.reply.get('error'))[:200]}"
        else:
            reply = ExecReply.parse(call.reply, b"", b"", self._agent.name)  # AgentError for a bad one
        if reply is not None and reply.stderr:  # the agent's note of a failed start
            with self._cond:
                self._err.add(reply.stderr)
        rc = LOST if reply is None else reply.rc
        with self._cond:  # the call is over: nothing is added any more
            parts = self._out.snapshot(), self._err.snapshot()
        out, err = b"".join(parts[0]), b"".join(parts[1])
        with self._cond:  # one copy of the output, shared with the result
            self._out.parts, self._err.parts = collections.deque([out]), collections.deque([err])
        self._result = ExecResult(self.args, rc, out, err, time.monotonic() - self._begun)
        if self._on_end is not None:
            self._on_end(self.state())

    @property
    def stdout(self) -> str:
        """Standard output so far (its last ``PROCESS_OUTPUT_CAP`` bytes)."""
        return self._text(self._out)

    @property
    def stderr(self) -> str:
        return self._text(self._err)

    def _text(self, tail: OutputTail) -> str:
        with self._cond:  # a snapshot: decoding happens without the reader thread waiting
            parts, dropped = tail.snapshot(), tail.dropped
        copy = OutputTail(tail.cap)
        copy.dropped = dropped
        return copy.note(b"".join(parts).decode("utf-8", "replace"))

    def state(self) -> str:
        """``running``, ``exited N``, ``killed by SIGX`` or ``lost (...)``: for
        reports and ``repr``, so it never raises (``poll`` does, for a bad reply)."""
        try:
            rc = self.poll()
        except AgentError as e:
            return f"lost ({str(e)[:200]})"
        if rc is None:
            return "running"
        if self.lost:
            return f"lost ({self.lost})"
        if rc < 0:
            try:
                return f"killed by {signal.Signals(-rc).name}"
            except ValueError:
                return f"killed by signal {-rc}"
        return f"exited {rc}"

    def __repr__(self) -> str:
        return f"<GuestProcess pid={self.pid} {self.state()} {self.args!r}>"

    # -- waiting --------------------------------------------------------------

    def wait(self, timeout: float | None = None) -> ExecResult:
        """Wait for the end; ``ProcessTimeout`` (an ``ExecTimeout``) if it still
        runs after ``timeout`` seconds; it keeps running then."""
        assert self._call is not None
        check_timeout(timeout, zero=True)  # None: no deadline; 0: only a look, as Popen.wait(0)
        deadline = None if timeout is None else time.monotonic() + timeout
        channel = self._agent.channel
        while self.poll() is None:
            left = channel.idle if deadline is None else min(channel.idle, deadline - time.monotonic())
            if left <= 0:
                raise ProcessTimeout(self.args, float(timeout or 0), self.stdout, self.stderr)
            if not self._call.done.wait(left):
                self._alive("wait")
        assert self._result is not None
        return self._result

    def _alive(self, op: str) -> None:
        """``AgentError`` when the agent stopped answering (the channel pings it)."""
        assert self._call is not None
        channel = self._agent.channel
        try:
            channel.check(self._call, op)
        except AgentError:
            if not channel.closed.is_set():
                raise  # a hung agent: nothing will come

    def wait_for_output(
        self, pattern: str | re.Pattern[str], timeout: float = 60.0, *, stream: str | None = None
    ) -> re.Match[str]:
        """Wait until ``pattern`` shows in stdout or stderr (or only ``stream``);
        return the match.  A compiled regex is searched as it is; a str as
        written, unless it holds syntax only a regex has (``\\d``, ``\\s``,
        ``\\w``, ``\\b``, ``.*``, ``.+``, ``.?``, ``(?``, a leading ``^`` or a
        trailing ``$``) or that text rarely has (``[0-9]+``, ``ready|started``;
        not if it would match an empty string): then it is a regex (line
        anchors per line), and where it finds nothing the str as written.  One that
        matches an empty string is a ``SpecError``.  ``timeout=0`` searches
        what came so far, once.  Raises ``OutputTimeout``
        (a ``WaitTimeout``) with the output seen, after ``timeout`` s or at
        once when the process ends without it.  The match is made in the part
        of the output searched then: its groups are what counts, its
        ``span()`` is no offset in ``stdout``."""
        regex, written = _pattern(pattern)
        tails = {"stdout": self._out, "stderr": self._err}
        if stream is not None and stream not in tails:
            raise SpecError(f"stream must be 'stdout' or 'stderr', not {stream!r}")
        chosen = [tails[stream]] if stream else list(tails.values())
        check_timeout(timeout, optional=False, zero=True)  # 0: one search of what came so far
        deadline = time.monotonic() + timeout
        searched = [0] * len(chosen)  # stream offsets searched up to
        while True:
            ended = self._call is not None and self._call.done.is_set()  # before the output: none is missed
            looked = time.monotonic()
            with self._cond:  # a snapshot only: the reader thread must not wait for a search
                snaps = [(t.snapshot(), t.dropped, t.total) for t in chosen]
            for i, (parts, start, total) in enumerate(snaps):
                if total != searched[i]:
                    chunk = _unsearched(parts, start, searched[i])
                    m = regex.search(chunk) or (written.search(chunk) if written is not None else None)
                    if m:
                        return m
                    searched[i] = total
            left = deadline - time.monotonic()
            if ended or left <= 0:
                rc = self.poll() if ended else None
                shown = pattern if isinstance(pattern, str) else pattern.pattern  # as given, not escaped
                read_as = ""  # a compiled pattern, or plain text: nothing to say how it was read
                if written is not None:  # a str read as a regex
                    read_as = "regex"
                elif isinstance(pattern, str) and _REGEX_LIKE.search(pattern):
                    read_as = "text"
                lost = self.lost if ended else ""
                raise OutputTimeout(shown, timeout, self.stdout, self.stderr, rc, lost, read_as=read_as)
            if self._call is not None:
                self._alive("wait_for_output")  # a hung agent sends nothing more: not a wait to its end
            # At most SEARCH_RATE looks a second: a chatty process wakes us per chunk.
            time.sleep(max(0.0, min(left, looked + 1 / SEARCH_RATE - time.monotonic())))
            with self._cond:
                if [t.total for t in chosen] == searched:
                    self._cond.wait(min(left, 0.05))  # also notices the end

    # -- signals --------------------------------------------------------------

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the process itself (nothing once it ended)."""
        self._signal(check_signal(sig), group=False)

    def terminate(self) -> GuestProcess:
        """SIGTERM to its whole process group; returns self (``p.terminate().wait()``)."""
        self._signal(signal.SIGTERM, group=True)
        return self

    def kill(self) -> GuestProcess:
        """SIGKILL to its whole process group; returns self."""
        self._signal(signal.SIGKILL, group=True)
        return self

    def _signal(self, sig: int, group: bool) -> None:
        # A group outlives its leader while members remain (``sleep 30 & exit 0``):
        # the guest still signals it after the end; the process alone, not.
        if self.pid is None or (not group and self.poll() is not None) or self._agent.channel.closed.is_set():
            return
        if group and self.poll() is not None and self.lost:
            return  # its bottle or agent session is gone, and the group with it
        try:
            self._agent.signal(self._rid, int(sig), group=group)
        except AgentError:
            if not self._agent.channel.closed.is_set():
                raise

    def __enter__(self) -> GuestProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        """Kill its whole group, even when the process itself already ended.
        A hung agent is raised only when the block ended well: else the block's
        own error is the one to see."""
        try:
            self.kill()
            if self.poll() is None:
                self.wait(KILL_WAIT)
        except (ExecTimeout, AgentError) as e:
            if exc[0] is None and isinstance(e, AgentError):
                raise
            log.debug("%r did not end after SIGKILL: %s", self, e)


# Syntax only a regular expression has: a str holding any of it is one (an
# escape such as \d, \n or \. that text does not write; .*, (?, ^ first, $ last).
_REGEX_ONLY = re.compile(r"\\[dDsSwWbBAZntr.()[\]{}*+?|^$]|\.[*+?]|\(\?|^\^|(?<!\\)\$$")
# Syntax plain text rarely has (a bracket class with a quantifier, ``[0-9]+``;
# a bar between words, ``ready|started``): a regex if it compiles to one that
# cannot match an empty string (``"| a|b |"`` stays the table row it is).
_REGEX_LIKELY = re.compile(r"\][*+?{]|\w\|\w")
# What makes a str read as text worth a hint when it is not found.
_REGEX_LIKE = re.compile(r"[\[\]()|*+?{}\\]")


def _pattern(pattern: str | re.Pattern[str]) -> tuple[re.Pattern[str], re.Pattern[str] | None]:
    """What ``wait_for_output`` searches for, and for a str read as a regex the
    str as written (searched where the regex finds nothing: a "user@host:~$"
    prompt).  A compiled regex as it is; a str as written, unless it holds
    syntax only a regex has (``\\d``, ``.*``, ``(?``, a leading ``^``...) or
    one that text rarely has (``[0-9]+``, ``a|b``), which makes it a regex
    (DESIGN's "text or regex"): ``"[100%]"`` stays text, ``r"port (\\d+)"`` is
    a regex."""
    if isinstance(pattern, re.Pattern):
        if not isinstance(pattern.pattern, str):
            raise TypeError("wait_for_output matches text: give a str or a compiled str regex, not bytes")
        return pattern, None
    if not isinstance(pattern, str):
        kind = "bytes" if isinstance(pattern, bytes) else type(pattern).__name__
        raise TypeError(f"wait_for_output matches text: give a str or a compiled str regex, not {kind}")
    text = re.compile(re.escape(pattern))
    regex = text
    surely = bool(_REGEX_ONLY.search(pattern))
    if surely or _REGEX_LIKELY.search(pattern):
        try:
            with warnings.catch_warnings():  # "possible nested set": a user's -W error must not make it text
                warnings.simplefilter("ignore")
                regex = re.compile(pattern, re.MULTILINE)
        except (re.error, RecursionError, OverflowError):
            pass  # no valid regex after all: the text as written
        if not surely and regex.fullmatch(""):
            regex = text
    if regex.fullmatch(""):
        raise SpecError(f"wait_for_output: {pattern!r} matches an empty string, so it would match at once")
    return regex, (None if regex is text else text)


def _unsearched(parts: list[bytes], start: int, searched: int) -> str:
    """The text of a tail snapshot (``parts``, from stream offset ``start``)
    not searched yet, after up to ``SEARCH_OVERLAP`` bytes searched before
    (from a line start in them, if any): a match that spans two looks is
    found, and ``^`` in a MULTILINE pattern still means a line start."""
    begin = max(start, searched - SEARCH_OVERLAP)
    skip, kept = begin - start, []
    for part in parts:
        if skip >= len(part):
            skip -= len(part)
            continue
        kept.append(part[skip:] if skip else part)
        skip = 0
    data = b"".join(kept)
    if begin > start:
        line = data.find(b"\n", 0, searched - begin)
        data = data[line + 1 :] if line >= 0 else data
    return data.decode("utf-8", "replace")


def _parse_pid(data: bytes) -> int | None:
    try:
        obj: Any = json.loads(data)
    except ValueError:
        return None
    pid = obj.get("pid") if isinstance(obj, dict) else None
    return pid if type(pid) is int and pid > 0 else None
