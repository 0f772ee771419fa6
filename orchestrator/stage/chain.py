"""The controller of ``orch stage``: relays started over SSH, bytes pushed once, passes until every host has them.

One stage, top to bottom (``run_stage``):

1. the source's files and digests (``source.py``);
2. an SSH connection to every host (``remote.ssh``: the same options and words as ``orch run``),
   and on each the relay (``relay.py``'s source travels on the session's stdin; the host's own
   Python runs it under ``-S``); each relay scans DEST and answers what it has (``ready``);
3. passes: the hosts that still lack something form a chain in hostfile order; each gets a
   fresh token and the address, port and token of the next one (over SSH: the control path);
   the controller connects to the first host's relay (over TCP to the address its SSH connection
   reached, the controller's own link: no SSH cipher in the data path) and streams every file some
   host lacks, each from the smallest offset a host that lacks it has reached (``sendfile``:
   the kernel copies from the page cache). Every relay writes what it lacks and forwards all;
4. a host that vanishes (its relay's session ends, its SSH connection stops answering keepalives,
   or the hop into it fails and it does not answer either) is named, every relay is told to abort,
   and the next pass runs without it: partial files stay, so the others continue where they were.

The bytes travel once per hop; the controller's link carries them once. ``StageSummary`` says
what reached whom.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import shlex
import socket
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Optional, TextIO

from orchestrator.stage import plan
from orchestrator.stage.progress import HostResult, Progress, StageSummary
from orchestrator.stage.source import Source, hash_source
from orchestrator.stage.relay_host import (BOOT, RelayHost, StageRequest, _last_line, _words,  # noqa: F401
                                           relay_command)
from orchestrator.stage.unchanged import unchanged_over_sftp

# What each host runs: the relay's parts, then the relay (one source; relay.py imports its parts only
# when imported on the controller, for tests and linting).
RELAY_SOURCE = "\n".join((Path(__file__).resolve().parent / f).read_text() for f in ("relay_parts.py", "relay.py"))
MARK = "ORCHSTAGE "
HEADER = struct.Struct("!cIQQ")
SEND_PIECE = 1 << 20         # sendfile in pieces: progress, abort and the count of bytes sent between them
MAX_FAILED_PASSES = 8        # passes that end in a failure before the stage gives up
CONNECT_TIMEOUT_S = 5.0      # a relay's connect to the next one (which listens since before it said ready)
MAX_DAMAGED_RETRIES = 2      # a file that arrives damaged on a host is sent again this many times


class Stage:
    def __init__(self, req: StageRequest, source: Source, err: TextIO, progress: bool = True):
        self.req = req
        self.source = source              # walked; hashed by ``hashed`` while the hosts start and scan
        self.hashed: asyncio.Future = asyncio.ensure_future(asyncio.to_thread(hash_source, source))
        self.err = err
        self.files = [f.spec() for f in source.files]
        self.hosts: list[RelayHost] = [RelayHost(stop=s) for s in plan.stops(req.hostfile)]
        self.events: asyncio.Queue = asyncio.Queue()
        self.progress = Progress([h.name for h in self.hosts], err, enabled=progress)
        self.sent = 0
        self.passes = 0
        self.lan_hops: set[tuple[int, int]] = set()
        self.route: list[str] = []
        self.closing = False
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ start

    async def connect(self) -> None:
        remote = [h for h in self.hosts if not h.stop.host.is_local]
        if not remote:
            return
        from orchestrator.remote.ssh import connect_hosts

        conns = await connect_hosts(self.req.hostfile, self.req.ssh, [h.stop.index for h in remote], err=self.err)
        for h in remote:
            c = conns[h.stop.index]
            h.conn = c
            if not c.ok:
                h.status, h.reason = "unreachable", f"cannot reach {h.name}: {c.error}"
                continue
            peer = c.conn.get_extra_info("peername")
            h.addr = peer[0] if peer else h.name

    async def already_complete(self, h: RelayHost) -> bool:
        """Every file of ``h`` as its relay last verified it, seen over SFTP (``unchanged.py``): no relay needed."""
        if self.req.verify or h.stop.host.is_local or h.conn is None:
            return False
        if not await unchanged_over_sftp(h.conn.conn, self.req.dest, self.hashed):
            return False
        h.have = set(range(len(self.files)))
        h.skipped = len(self.files)
        h.scanned = True
        h.checked = "sftp"
        return True

    async def start_relay(self, h: RelayHost, timeout: float) -> None:
        if await self.already_complete(h):
            return
        host = h.stop.host
        python = self.req.python or host.python or (sys.executable if host.is_local else "python3")
        cfg = {"dest": self.req.dest, "files": self.files, "dirs": self.source.dirs, "verify": self.req.verify}
        payload = json.dumps({"src": RELAY_SOURCE, "cfg": cfg}).encode()
        argv = relay_command(python)
        try:
            if host.is_local:
                h.proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE, start_new_session=True, limit=1 << 22)
            else:
                h.proc = await h.conn.conn.create_process("exec " + shlex.join(argv), encoding=None)
        except (FileNotFoundError, PermissionError):
            h.status, h.reason = "failed", (f"cannot start the relay on {h.name}: {python}: not found or not executable "
                                            "(set \"python\" in the hostfile or --python)")
            return
        except Exception as e:  # noqa: BLE001 - channel refused, connection lost
            h.status, h.reason = "failed", f"cannot start the relay on {h.name}: {getattr(e, 'reason', None) or e}"
            return
        h.proc.stdin.write(b"%d\n" % len(payload) + payload)
        h.reader = asyncio.ensure_future(self._read(h))
        asyncio.ensure_future(self._drain_stderr(h))
        first = asyncio.ensure_future(self._first(h))
        await asyncio.wait({first, self.hashed}, return_when=asyncio.FIRST_COMPLETED)  # the relay scans meanwhile
        if self.hashed.done() and self.hashed.exception() is None:
            h.send({"cmd": "hashes", "shas": [f.sha for f in self.hashed.result().files]})
        elif not first.done():
            first.cancel()
            return
        try:
            ev = await asyncio.wait_for(first, timeout)
        except asyncio.TimeoutError:
            h.status, h.reason = "failed", f"the relay on {h.name} did not scan {self.req.dest} within {timeout:.0f}s"
            return
        if ev.get("ev") != "ready":
            why = ev.get("error") or _last_line(h.stderr) or "it exited"
            if "not found" in h.stderr or ("No such file" in h.stderr and python in h.stderr):
                why = f"{python}: not found on this host (set \"python\" in the hostfile or --python)"
            h.status, h.reason = "failed", f"the relay on {h.name} did not start: {why}"
            return
        h.port = ev["port"]
        h.scanned = True
        h.checked = "verify" if self.req.verify else "relay"
        h.have = set(ev.get("have", []))
        h.skipped = ev.get("skipped", len(h.have))
        h.partial = {int(k): v for k, v in (ev.get("partial") or {}).items()}
        h.resumed = sum(h.partial.values())
        h.replaced = [self.files[i]["rel"] for i in ev.get("replaced", [])]

    @staticmethod
    async def _first(h: RelayHost) -> dict:
        """The relay's first word: ``ready``, or why not (``error``, ``eof``)."""
        while True:
            ev = await h.first.get()
            if ev.get("ev") in ("ready", "error", "eof"):
                return ev

    async def _read(self, h: RelayHost) -> None:
        """The relay's reports: progress is counted here, everything else goes on the event queue."""
        started = False
        while True:
            try:
                line = await h.proc.stdout.readline()
            except Exception:  # noqa: BLE001 - the connection went away
                line = b""
            if not line:
                break
            text = line.decode("utf-8", "replace")
            i = text.find(MARK)
            if i < 0:
                continue
            try:
                ev = json.loads(text[i + len(MARK):])
            except ValueError:
                continue
            if ev.get("ev") == "p":
                h.rx, h.wr, h.files_written = ev["rx"], ev["wr"], ev["files"]
                h.cpu_s = ev.get("cpu_s", h.cpu_s)
                self.progress.update(h.name, h.rx)
                continue
            if not started:
                h.first.put_nowait(ev)
                started = ev.get("ev") == "ready"
                continue
            self.events.put_nowait((h, ev))
        h.dead = True
        if not self.closing and started:
            h.lost_early = True
        if not started:
            await asyncio.sleep(0.2)  # let stderr arrive for the diagnosis
            h.first.put_nowait({"ev": "eof"})
        self.events.put_nowait((h, {"ev": "eof"}))

    async def _drain_stderr(self, h: RelayHost) -> None:
        try:
            while True:
                b = await h.proc.stderr.read(4096)
                if not b:
                    return
                h.stderr = (h.stderr + (b.decode("utf-8", "replace") if isinstance(b, bytes) else b))[-4000:]
        except Exception:  # noqa: BLE001
            return

    # ------------------------------------------------------------------ passes

    def lacking(self, h: RelayHost) -> list[int]:
        return [i for i in range(len(self.files)) if i not in h.have]

    async def run(self) -> None:
        failures = 0
        while True:
            alive = [h for h in self.hosts if h.alive]
            chain = [h for h in alive if self.lacking(h)]
            for h in alive:
                if not self.lacking(h) and self.progress.state.get(h.name) != "done":
                    self.progress.mark(h.name, "done")
            if not chain:
                return
            frames = []
            for i, f in enumerate(self.files):
                needers = [h for h in chain if i not in h.have]
                if needers:
                    start = min(h.partial.get(i, 0) for h in needers)
                    frames.append((i, start, f["size"] - start))
            self.passes += 1
            ok, culprit, why = await self.one_pass(chain, frames)
            if ok:
                for h in chain:
                    for i in self.lacking(h):
                        if h.damaged.get(i, 0) > MAX_DAMAGED_RETRIES:
                            h.status = "failed"
                            h.reason = f"{self.files[i]['rel']} arrived damaged {h.damaged[i]} times on {h.name}"
                if any(h.alive and self.lacking(h) and all(h.damaged.get(i, 0) == 0 for i in self.lacking(h))
                       for h in chain):
                    failures += 1  # a completed pass must leave every host complete unless bytes arrived damaged
                if failures > MAX_FAILED_PASSES:
                    break
                continue
            failures += 1
            if culprit is not None:
                culprit.status = "gone"
                culprit.reason = f"{culprit.name} vanished during the stage ({why}); the chain closed around it"
                self.progress.mark(culprit.name, "gone")
                self.err.write(f"orch stage: {culprit.reason}\n")
            if failures > MAX_FAILED_PASSES:
                for h in chain:
                    if h.alive:
                        h.status, h.reason = "failed", f"the stage gave up after {failures} failed passes: {why}"
                break

    async def one_pass(self, chain: list[RelayHost], frames: list[tuple[int, int, int]]):
        """(True, None, None) when every relay of the chain finished; else (False, host to blame or None, why)."""
        pid = self.passes
        tokens = [secrets.token_hex(32) for _ in chain]
        hops = plan.chain_hops([h.stop for h in chain], {h.stop.index: h.addr for h in chain}, frozenset(self.lan_hops))
        first_leg = "127.0.0.1" if chain[0].stop.host.is_local else chain[0].addr
        self.route = [f"this machine -> {chain[0].name} at {first_leg}"] + [
            f"{h.name} -> {chain[k + 1].name} at {hops[k][0]} ({hops[k][1]})" for k, h in enumerate(chain[:-1])]
        total = sum(n for _, _, n in frames)
        self.progress.start_pass({h.name: total for h in chain})
        for k, h in enumerate(chain):
            nxt = None
            if hops[k] is not None:
                nxt = {"addr": hops[k][0], "port": chain[k + 1].port, "token": tokens[k + 1]}
            h.send({"cmd": "pass", "id": pid, "token": tokens[k], "next": nxt, "timeout": self.req.pass_timeout_s,
                    "stall": self.req.stall_s, "connect_timeout": CONNECT_TIMEOUT_S})
        t_pass = time.monotonic()
        first = chain[0]
        first_addr = "127.0.0.1" if first.stop.host.is_local else first.addr
        loop = asyncio.get_running_loop()
        abort = threading.Event()
        sock_box: list = []
        sender = loop.run_in_executor(None, self._send, first_addr, first.port, tokens[0], frames, abort, sock_box)
        pending = {h.name for h in chain}
        failure: Optional[tuple[RelayHost, dict]] = None
        lost_waiters = {asyncio.ensure_future(h.conn.gone.wait()): h for h in chain if h.conn is not None}
        try:
            while pending and failure is None:
                get = asyncio.ensure_future(self.events.get())
                waits = {get, *lost_waiters} | (set() if sender.done() else {sender})
                done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                if sender in done and sender.exception() is not None:
                    failure = (first, {"ev": "error", "side": "controller", "error": _words(sender.exception())})
                for w in [w for w in done if w in lost_waiters]:
                    h = lost_waiters.pop(w)
                    failure = failure or (h, {"ev": "lost"})
                if get in done:
                    h, ev = get.result()
                    kind = ev.get("ev")
                    if kind == "file":
                        if ev.get("ok"):
                            h.have.add(ev["idx"])
                            h.partial.pop(ev["idx"], None)
                        else:
                            h.damaged[ev["idx"]] = h.damaged.get(ev["idx"], 0) + 1
                            h.partial[ev["idx"]] = 0
                    elif kind == "done" and ev.get("id") == pid:
                        h.partial = {int(k): v for k, v in (ev.get("partial") or {}).items()}
                        pending.discard(h.name)
                        h.busy_s += time.monotonic() - t_pass
                        self.progress.mark(h.name, "done") if not self.lacking(h) else None
                    elif kind == "error" and (ev.get("id") in (pid, None)):
                        h.partial = {int(k): v for k, v in (ev.get("partial") or {}).items()}
                        failure = (h, ev)
                    elif kind == "eof" and h in chain:
                        failure = (h, ev)
            if failure is None:
                await sender
                return True, None, None
            return False, *await self._blame(chain, failure)
        finally:
            for w in lost_waiters:
                w.cancel()
            abort.set()
            for s in sock_box:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            if failure is not None:
                await self._abort(chain, pid, pending)
            try:
                await asyncio.wait_for(asyncio.shield(sender), 10)
            except BaseException:  # noqa: BLE001 - its error is already in `failure`
                pass

    async def _abort(self, chain: list[RelayHost], pid: int, pending: set) -> None:
        """Tell every relay of the chain to stop this pass; wait (bounded) until each says so or is gone."""
        for h in chain:
            if not h.dead:
                h.send({"cmd": "abort"})
        deadline = time.monotonic() + 10
        waiting = {h.name for h in chain if h.name in pending and not h.dead}
        while waiting and time.monotonic() < deadline:
            try:
                h, ev = await asyncio.wait_for(self.events.get(), deadline - time.monotonic())
            except asyncio.TimeoutError:
                break
            if ev.get("ev") in ("done", "error") and ev.get("id") in (pid, None) or ev.get("ev") == "eof":
                if ev.get("partial") is not None:
                    h.partial = {int(k): v for k, v in ev["partial"].items()}
                waiting.discard(h.name)
            elif ev.get("ev") == "file" and ev.get("ok"):
                h.have.add(ev["idx"])
                h.partial.pop(ev["idx"], None)

    async def _blame(self, chain: list[RelayHost], failure: tuple[RelayHost, dict]) -> tuple[Optional[RelayHost], str]:
        """Which host vanished: one whose relay ended or whose SSH connection was lost; else the far end of the
        hop that failed, if it too stops answering within the keepalive time; else nobody (the pass is retried)."""
        h, ev = failure
        kind = ev.get("ev")
        if kind == "eof":
            return h, "its relay ended" + (f": {_last_line(h.stderr)}" if _last_line(h.stderr) else "")
        if kind == "lost":
            return h, h.conn.lost_reason
        side = ev.get("side")
        k = chain.index(h)
        if side == "disk":
            h.status = "failed"
            h.reason = f"{h.name}: cannot write {self.req.dest}: {ev.get('error')}"
            return None, ev.get("error") or "disk"
        suspect = None
        if side == "down" and k + 1 < len(chain):
            suspect = chain[k + 1]
        elif side in ("up", "controller"):
            suspect = chain[k - 1] if side == "up" and k > 0 else h
        keepalive = (getattr(self.req.ssh, "keepalive_s", 1.0) or 1.0) * 3 + 2
        deadline = time.monotonic() + keepalive
        while time.monotonic() < deadline:
            for c in chain:
                if c.dead:
                    return c, "its relay ended"
                if c.conn is not None and c.conn.lost:
                    return c, c.conn.lost_reason
            await asyncio.sleep(0.1)
        if suspect is not None and side != "controller" and (suspect.conn is None or suspect.conn.lost):
            return suspect, ev.get("error") or "no answer"
        if side == "down" and k + 1 < len(chain):  # both ends alive: the cable between them; next time over the LAN
            hop = (h.stop.index, chain[k + 1].stop.index)
            if hop not in self.lan_hops:
                self.lan_hops.add(hop)
                self.err.write(f"orch stage: {h.name} -> {chain[k + 1].name} failed over the ring address "
                               f"({ev.get('error')}); that hop goes over the LAN now\n")
        return None, f"{h.name}: {ev.get('error')}"

    def _send(self, addr: str, port: int, token: str, frames, abort: threading.Event, box: list) -> None:
        """The controller's leg (a worker thread): token, then every frame's header and bytes (sendfile), then the end."""
        s = socket.create_connection((addr, port), timeout=self.req.pass_timeout_s)
        box.append(s)
        try:
            s.settimeout(self.req.stall_s)
            s.sendall(token.encode())
            for idx, start, length in frames:
                if abort.is_set():
                    raise OSError("aborted")
                s.sendall(HEADER.pack(b"F", idx, start, length))
                f = self.source.files[idx]
                with open(f.path, "rb") as fh:
                    off, left = start, length
                    while left:
                        if abort.is_set():
                            raise OSError("aborted")
                        n = s.sendfile(fh, off, min(SEND_PIECE, left))
                        if n == 0:
                            raise OSError(f"{f.path} became shorter while it was being sent")
                        off += n
                        left -= n
                        with self._lock:
                            self.sent += n
            s.sendall(HEADER.pack(b"E", 0, 0, 0))
            s.shutdown(socket.SHUT_WR)
        finally:
            s.close()

    # ------------------------------------------------------------------ end

    async def close(self) -> None:
        self.closing = True
        for h in self.hosts:
            if h.proc is not None:
                h.close_stdin()
        readers = [h.reader for h in self.hosts if h.reader is not None]
        if readers:
            await asyncio.wait(readers, timeout=5)
        for h in self.hosts:
            if h.proc is not None and h.reader is not None and not h.reader.done():
                try:
                    h.proc.kill() if h.stop.host.is_local else h.proc.close()
                except Exception:  # noqa: BLE001
                    pass
        conns = {h.stop.index: h.conn for h in self.hosts if h.conn is not None}
        if conns:
            from orchestrator.remote.ssh import close_connections

            await close_connections(conns)

    def summary(self, wall_s: float) -> StageSummary:
        results = []
        for h in self.hosts:
            missing = [self.files[i]["rel"] for i in self.lacking(h)] if h.scanned else [f["rel"] for f in self.files]
            status = h.status
            if status == "ok" and h.lost_early:
                status, h.reason = "gone", h.reason or f"{h.name} vanished after the stage"
            if status == "ok" and missing:
                status = "failed"
            secs = h.busy_s
            results.append(HostResult(
                host=h.name, status=status, reason=h.reason, bytes_received=h.rx, bytes_written=h.wr,
                files_written=h.files_written, files_skipped=h.skipped, files_replaced=h.replaced,
                resumed_bytes=h.resumed, missing=missing[:20], relay_cpu_s=h.cpu_s, checked=h.checked,
                gb_per_s=round(h.rx / secs / 1e9, 4) if secs and h.rx else None))
        ok = all(r.status == "ok" for r in results)
        any_ok = any(r.status == "ok" for r in results)
        written = sum(r.bytes_written for r in results)
        return StageSummary(
            status="ok" if ok else ("partial" if any_ok else "failed"), src=self.source.root, dest=self.req.dest,
            files=len(self.files), bytes=self.source.total_bytes, sent_by_controller=self.sent,
            wall_s=round(wall_s, 3), gb_per_s=round(written / wall_s / 1e9, 4) if wall_s > 0 else 0.0,
            passes=self.passes, hosts=results, route=self.route)


async def run_stage(req: StageRequest, source: Source, err: TextIO, *, progress: bool = True) -> StageSummary:
    t0 = time.monotonic()
    st = Stage(req, source, err, progress=progress)
    phases: dict[str, float] = {}
    try:
        await st.connect()
        phases["connect_s"] = time.monotonic() - t0
        scan_timeout = max(60.0, source.total_bytes / 50e6 + 30)
        for h in st.hosts:
            if h.status == "ok":
                st.progress.mark(h.name, "checking what is there")
        await asyncio.gather(*(st.start_relay(h, scan_timeout) for h in st.hosts if h.status == "ok"), st.hashed)
        st.source = st.hashed.result()
        phases["scan_s"] = time.monotonic() - t0 - sum(phases.values())
        for h in st.hosts:
            if h.status != "ok":
                st.progress.mark(h.name, h.status)
        await st.run()
        phases["transfer_s"] = time.monotonic() - t0 - sum(phases.values())
    finally:
        t1 = time.monotonic()
        if not st.hashed.done():
            st.hashed.cancel()
        await st.close()
        phases["close_s"] = time.monotonic() - t1
    summary = st.summary(time.monotonic() - t0)
    summary.phases = {k: round(v, 3) for k, v in phases.items()}
    return summary
