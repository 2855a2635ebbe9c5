"""The guest agent: runs inside the VM, stdlib only, serves calls on a virtio-serial port.

Each call runs in a worker thread; replies and output go back as frames
(see ``frames``).  The host imports the sibling modules as part of the
package; in the guest they lie side by side in /usr/lib/pytest-bottle.
"""

from __future__ import annotations

import functools
import json
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from typing import IO, Any

try:  # on the host, as part of the package
    from . import execute, files, frames, handoff, identity, system, terminal
except ImportError:  # in the guest, files side by side
    import execute  # type: ignore[import-not-found,no-redef]
    import files  # type: ignore[import-not-found,no-redef]
    import frames  # type: ignore[import-not-found,no-redef]
    import handoff  # type: ignore[import-not-found,no-redef]
    import identity  # type: ignore[import-not-found,no-redef]
    import system  # type: ignore[import-not-found,no-redef]
    import terminal  # type: ignore[import-not-found,no-redef]

# How long ``park`` waits for calls whose replies are going out to be counted
# done.  Only a worker descheduled between its reply and its count (a loaded
# host) takes more than milliseconds; a refused park costs every clone of the
# seed the Python agent.
PARK_GRACE = 10.0


class Agent(terminal.ProcessOps, files.FileOps, system.SystemOps):
    def __init__(self, chan: frames.Channel) -> None:
        self.chan = chan
        self.inboxes: dict[int, frames.Inbox] = {}
        self.procs: dict[int, execute.Child] = {}
        self.ptys: dict[int, int] = {}  # request id -> pty master (terminal.ProcessOps)
        self.groups: dict[int, execute.Child] = {}  # spawned (notify) commands, kept past their end
        self.links: dict[int, terminal.Link] = {}  # running spawned commands' ties to this session
        self.cancelled: set[int] = set()  # calls cancelled before their command was registered
        self.session = 0  # one more per SYNC: a call of an older session sends nothing back
        self.windows = frames.Windows()
        self.lock = threading.Lock()
        self.jobs: queue.SimpleQueue[tuple[int, dict[str, Any], frames.Inbox, int]] = queue.SimpleQueue()
        self.idle = 0
        self.active = 0  # calls submitted and not answered yet (``park`` waits for none)
        self.replying = 0  # of those, the ones whose reply is going out now
        # A new id per start: the host tells a restarted agent from a live one.
        self.instance = os.urandom(frames.INSTANCE_SIZE)
        self.hello = frames.frame(frames.HELLO, 0, frames.SYNC_MAGIC + self.instance)

    def serve(self) -> None:
        """Read frames and hand them on; never blocks on anything but the port
        (see ``Channel.post``), so the host can always send."""
        chan = self.chan
        chan.post(self.hello)  # unsolicited: a host still connected learns we restarted
        while True:
            kind, rid, payload = chan.recv()
            if kind == frames.CALL:
                call = {k: v for k, v in json.loads(payload).items() if not k.startswith("_")}
                if call.get("op") == "park":  # here: the reading thread is what parks
                    self.park(rid)
                else:
                    self.submit(rid, call)
            elif kind in (frames.DATA, frames.EOF):
                with self.lock:
                    box = self.inboxes.get(rid)
                if box is not None:
                    box.put(kind, payload)
            elif kind == frames.CREDIT:
                if len(payload) == frames.COUNT.size:
                    self.windows.give(rid, frames.COUNT.unpack(payload)[0])
            elif kind == frames.PING:
                chan.post(self.hello)
            elif kind == frames.SYNC:
                self.reset()
                chan.post(self.hello)
            elif kind == frames.CANCEL:
                self.cancel(rid)

    def submit(self, rid: int, call: dict[str, Any], credit: int = frames.HOST_WINDOW) -> None:
        call["_session"] = self.session  # see op_exec
        inbox = frames.Inbox(functools.partial(self.grant, rid))
        self.windows.open(rid, credit)
        with self.lock:
            self.inboxes[rid] = inbox
            self.active += 1
            spare = self.idle > 0
            if spare:
                self.idle -= 1
        if not spare:  # every worker is busy (a long exec): add one
            threading.Thread(target=self.work, daemon=True).start()
        self.jobs.put((rid, call, inbox, self.session))

    def park(self, rid: int) -> None:
        """Serve through the compiled core until it hands back (``handoff``)."""
        chan = self.chan
        # A worker counts its call done just after sending the reply, and the
        # host sends ``park`` as soon as it has that reply: give it a moment.
        # Only for calls whose reply is going out: one still at work may need
        # frames from the host, and this (the reading thread) reads none meanwhile.
        deadline = time.monotonic() + PARK_GRACE
        while True:
            with self.lock:
                calls, replying = self.active, self.replying
                running = bool(self.procs or self.groups or self.ptys)
            if not calls or running or calls > replying or time.monotonic() >= deadline:
                break
            time.sleep(0.002)
        why = "calls or commands still running" if calls or running else None
        if why is None and not handoff.available():
            why = "no compiled core in this image"
        parked = None
        if why is None:
            try:
                parked = handoff.Parked(chan.fd, self.instance)
            except Exception as e:  # reported: the reading thread must go on
                why = f"the core did not start: {e}"
        if parked is None:
            chan.post(frames.jframe(frames.REPLY, rid, {"parked": False, "why": why, "ok": True}))
            return
        with chan.wlock:  # none of ours writes while the core has the port
            parked.go(chan.synced, bytes(chan.buf), rid)  # it answers ``park``
            chan.buf.clear()
            back = parked.wait()
        if back is None:  # it died: as if we had; systemd restarts us, killing what it ran
            print("bottle-agent: the compiled core died; restarting", file=sys.stderr, flush=True)
            os._exit(1)
        chan.synced = bool(back.meta.get("synced"))
        chan.buf[:] = back.unread
        self.session += int(back.meta.get("syncs", 0))
        for rid, call, credit in back.calls():  # the commands it still runs: ours now
            self.submit(rid, call, credit)
        back.close()

    def cancel(self, rid: int) -> None:
        with self.lock:
            proc = self.procs.get(rid)
            box = self.inboxes.get(rid)
            if proc is None and box is not None:  # still starting: op_exec or op_pty kills it once registered
                self.cancelled.add(rid)
        if proc is not None:  # its output still flows (the host grants it): the reply tells the code
            proc.kill()
            return
        self.windows.abort(rid)  # a download the host gave up on
        if box is not None:  # an upload the host gave up on
            box.put(frames.CANCEL, b"")

    def reset(self) -> None:
        """A new host session: streams of the last one will never be read or
        finished.  Its spawned commands (services, DESIGN §1 "Snapshots": a
        fork's new host comes through here) run on detached; its ``exec``
        commands and shells, whose callers are gone, are killed.  Its request
        ids mean nothing now: the new host numbers its calls afresh."""
        self.windows.abort()
        with self.lock:
            self.session += 1
            boxes = list(self.inboxes.values())
            self.inboxes.clear()
            self.cancelled.clear()
            self.groups.clear()  # spawned groups live on, no longer the host's to signal
            links, self.links = list(self.links.values()), {}
            for link in links:
                self.procs.pop(link.rid, None)
        for link in links:
            link.cut()
        self.end_all()
        for box in boxes:  # stdin of a detached command closes here too
            box.put(frames.CANCEL, b"")

    def grant(self, rid: int, n: int) -> None:
        try:
            self.chan.send(frames.credit_frame(rid, n))
        except OSError:
            pass

    def emit(self, rid: int, kind: int, data: bytes) -> None:
        """Send stream data once the host has room for it (``frames.Windows``)."""
        self.windows.take(rid, len(data))
        self.chan.send(frames.frame(kind, rid, data))

    def work(self) -> None:
        """A worker thread: threads are kept, since starting one costs under emulation."""
        while True:
            self.run(*self.jobs.get())
            with self.lock:
                self.idle += 1

    def run(self, rid: int, call: dict[str, Any], inbox: frames.Inbox, session: int) -> None:
        handler: Callable[[int, dict[str, Any], frames.Inbox], dict[str, Any]] | None
        handler = getattr(self, "op_" + str(call.get("op")), None)
        try:
            if handler is None:
                raise RuntimeError(f"unknown operation {call.get('op')!r}")
            reply = handler(rid, call, inbox)
            reply["ok"] = True
        except OSError as e:
            reply = {"ok": False, "error": str(e), "errno": e.errno, "type": "OSError", "path": e.filename}
        except Exception as e:  # reported to the host, never fatal to the agent
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}", "type": type(e).__name__}
        finally:
            with self.lock:  # one with the reset's: else its id may be the new host's, touch nothing
                current = session == self.session
                if current:
                    self.inboxes.pop(rid, None)
                    self.cancelled.discard(rid)
            if current:
                self.windows.close(rid)
        with self.lock:
            self.replying += 1
        try:
            if current:
                self.chan.send(frames.jframe(frames.REPLY, rid, reply))
        except OSError:  # the host left: this worker stays for the next session
            pass
        finally:
            with self.lock:
                self.active -= 1
                self.replying -= 1

    # -- operations ---------------------------------------------------------

    def op_hello(self, rid: int, call: dict[str, Any], inbox: frames.Inbox) -> dict[str, Any]:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot_id = f.read().strip()
        return {"version": frames.VERSION, "boot_id": boot_id, "uptime": time.clock_gettime(time.CLOCK_BOOTTIME)}

    def op_setup(self, rid: int, call: dict[str, Any], inbox: frames.Inbox) -> dict[str, Any]:
        """Give a (possibly cloned) machine its own identity and network."""
        return identity.setup(call)

    def op_announce(self, rid: int, call: dict[str, Any], inbox: frames.Inbox) -> dict[str, Any]:
        return identity.announce(call)

    def op_exec(self, rid: int, call: dict[str, Any], inbox: frames.Inbox) -> dict[str, Any]:
        child = call.get("_child")  # one the core started (``park``)
        if not isinstance(child, execute.Child):
            try:
                child = execute.spawn(
                    [str(a) for a in call["argv"]],
                    call.get("env") or {},
                    call.get("cwd"),
                    call.get("user"),
                    bool(call.get("stdin")),
                )
            except execute.SpawnFailed as e:  # stdin still coming stops at the reply
                return {"rc": e.rc, "stderr_text": e.message, "timed_out": False}
        kinds, link = {1: frames.STDOUT, 2: frames.STDERR}, None
        out: Callable[[int, bytes], None] = lambda k, data: self.emit(rid, kinds[k], data)  # noqa: E731
        with self.lock:
            # A new host came while it started: the reset missed it, so end it
            # (or detach it) here.
            stale = call.get("_session") != self.session
            if not stale:
                self.procs[rid] = child
                self.drop_groups(child.pid)
            cancelled = rid in self.cancelled and not stale
            if call.get("notify"):  # spawn(): its group can be signalled after the leader's end
                link = terminal.Link(rid, detached=stale)
                if not stale:
                    self.keep_group(rid, child)
                    self.links[rid] = link
                out = functools.partial(self.forward, link, kinds)
        if (stale and link is None) or cancelled:  # cancelled: as a later cancel would, the reply still comes
            child.kill()
        try:
            if link is not None:  # spawn(): the host returns once it runs
                self.forward(link, {0: frames.STARTED}, 0, b'{"pid":%d}' % child.pid)
            if child.stdin is not None:
                threading.Thread(target=_feed, args=(child.stdin, inbox), daemon=True).start()
            timed_out = execute.pump(child, out, call.get("timeout")) or bool(call.get("_timed_out"))
            child.gone()
        except BaseException:  # the host left or gave up: nobody reads this command any more
            child.kill()
            child.reap()
            raise
        finally:
            with self.lock:
                if self.procs.get(rid) is child:  # not a new session's call of the same id
                    del self.procs[rid]
                if link is not None and self.links.get(rid) is link:
                    del self.links[rid]
            # The command is done: stdin frames still on their way are moot, and
            # the feeder thread must not wait for them.
            inbox.put(frames.EOF, b"")
        return {"rc": child.returncode, "timed_out": timed_out}


def _feed(stdin: IO[bytes], inbox: frames.Inbox) -> None:
    # On a closed pipe, stop taking: no credit goes back, so the host sends
    # at most a window more, and stops at the reply.
    try:
        for chunk in inbox.chunks():
            stdin.write(chunk)
            stdin.flush()
    except (BrokenPipeError, frames.Aborted):
        pass
    finally:
        try:
            stdin.close()
        except BrokenPipeError:
            pass


def find_port(name: str = frames.PORT_NAME, wait: float = 60.0) -> str:
    deadline = time.monotonic() + wait
    while True:
        try:
            for entry in os.listdir("/sys/class/virtio-ports"):
                with open(f"/sys/class/virtio-ports/{entry}/name") as f:
                    if f.read().strip() == name:
                        dev = f"/dev/{entry}"
                        if os.path.exists(dev):
                            return dev
        except FileNotFoundError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"bottle-agent: no virtio port named {name}")
        time.sleep(0.01)


def main() -> None:
    os.chdir(execute.HOME)  # commands run here unless told otherwise: no chdir per spawn
    os.environ["PATH"] = execute.DEFAULT_PATH  # what posix_spawnp searches
    dev = find_port()
    fd = os.open(dev, os.O_RDWR)
    print(f"bottle-agent: serving on {dev}", file=sys.stderr, flush=True)
    Agent(frames.Channel(fd)).serve()


if __name__ == "__main__":
    main()
