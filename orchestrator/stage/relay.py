"""The stage relay: the program every host runs during ``orch stage``. Receive, write, forward.

It is not imported on the controller: ``chain.py`` sends this file's *source* over the SSH
session that starts it (``BOOT``: a line with the payload's length, then JSON ``{"src", "cfg"}``;
``exec`` with ``CFG``, ``IN`` (the rest of stdin) and ``__name__ == "orch_relay"``), and the host
runs it with its own interpreter under ``-S``. Hence: standard library only, nothing from
``orchestrator``, nothing newer than Python 3.9 (macOS's /usr/bin/python3), nothing done at
import unless run as ``orch_relay``. Kept as a module so it can be linted and tested in-process.

What it does:

* **Scan** (before any byte travels, while the controller still hashes the source: ``prescan``,
  then ``scan`` once its digests arrive): for every file of the source, does ``DEST/rel`` already
  hold it? A file whose (size, mtime, ctime, inode) match what this relay recorded after it last
  verified it (``DEST/.orch-stage/verified.json``) is trusted without reading it; any write to it
  changes its ctime, so a damaged copy is hashed again and, if wrong, replaced. ``verify`` hashes
  every file regardless. A partial file from an interrupted stage
  (``DEST/.orch-stage/<sha256>.<host>.part``) is hashed up to its length: the transfer continues
  from there. The answer goes to the controller (``ready``).
* **Passes**: the controller gives each relay the next host's address, port and token; the relay
  accepts one connection that presents its own token (any other is closed), connects to the next
  host, and then for every frame of the stream (a file's byte range) forwards each chunk as it
  arrives and, if it lacks that file, writes it (a second thread each: the disk never holds the
  wire back, and the wire never waits for the disk beyond ``QUEUE`` chunks).
* **Each file** is written under its temporary name, hashed as it is written, fsynced, and renamed
  into place only when the SHA-256 is right: no partial file is ever visible under its real name.

Control (stdin, one JSON object a line): ``{"cmd": "hashes", "shas": [...]}`` (once, first),
``{"cmd": "pass", ...}``, ``{"cmd": "abort"}``; stdin EOF
ends the relay (a pass in flight is aborted; partial files stay for the next run). Reports
(stdout, ``MARK`` + JSON a line): ``ready``, ``p`` (progress), ``file``, ``done``, ``error``.
"""

import hmac
import json
import os
import socket
import stat
import threading
import time

if __name__ != "orch_relay":  # imported on the controller (tests, lint); on a host the parts come first in the source
    from orchestrator.stage.relay_parts import (CHUNK, HEADER, MARK, NOFOLLOW, PROGRESS_S, QUEUE, STATE_DIR,  # noqa: F401
                                                TOKEN_BYTES, FileState, Pipe, hash_file, out, recv_exact)


class Relay:
    def __init__(self, cfg):
        self.cfg = cfg
        self.dest = os.path.abspath(os.path.expanduser(cfg["dest"]))
        self.state = self.dest + "/" + STATE_DIR
        self.files = cfg["files"]           # [{"rel", "size", "sha", "mode"}]
        self.host_tag = "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname())[:64] or "host"
        self.have = set()                   # indices of files in place and right
        self.replaced = []                  # indices found damaged (they are written anew)
        self.states = {}                    # index -> FileState, for every file this host lacks
        self.verified = {}
        self.rx = 0                         # bytes that arrived from the previous host, this run
        self.written = 0                    # bytes written to disk, this run
        self.files_written = 0
        self.skipped = 0                    # files already in place at the scan
        self.pass_thread = None
        self.abort_flag = threading.Event()
        self.socks = []
        self.listener = None
        self.lock = threading.Lock()
        self._pos = 0

    # ------------------------------------------------------------------ scan

    def load_verified(self):
        try:
            with open(self.state + "/verified.json") as f:
                v = json.load(f)
            self.verified = v if isinstance(v, dict) else {}
        except (OSError, ValueError):
            self.verified = {}

    def save_verified(self):
        tmp = "%s/verified.%s.json.tmp" % (self.state, self.host_tag)
        try:
            with open(tmp, "w") as f:
                json.dump(self.verified, f)
            os.replace(tmp, self.state + "/verified.json")
        except OSError:
            pass  # a cache: without it the next run hashes again

    @staticmethod
    def signature(st):
        return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]

    def found(self, spec):
        """The SHA-256 of what DEST/rel holds now (None: nothing there; "bad": not a file of the source's size).

        Run before the controller has the source's digests (it hashes the source meanwhile): a file
        unchanged since this relay last verified it is not read again (``verify``: every file is)."""
        path = self.dest + "/" + spec["rel"]
        try:
            st = os.lstat(path)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode) or st.st_size != spec["size"]:
            return "bad"
        rec = self.verified.get(spec["rel"])
        if not self.cfg.get("verify") and isinstance(rec, list) and len(rec) == 5 and rec[1:] == self.signature(st):
            return rec[0]
        try:
            h, _ = hash_file(path)
        except OSError:
            return "bad"
        self.verified[spec["rel"]] = [h.hexdigest()] + self.signature(st)
        return h.hexdigest()

    def prescan(self):
        """What DEST holds, file by file, while the controller is still hashing the source."""
        os.makedirs(self.state, exist_ok=True)
        for d in self.cfg.get("dirs", []):
            os.makedirs(self.dest + "/" + d, exist_ok=True)
        self.load_verified()
        self.there = [self.found(spec) for spec in self.files]

    def scan(self, shas):
        """With the source's digests: what this host has, what it lacks, and how far each partial file got."""
        for i, spec in enumerate(self.files):
            spec["sha"] = shas[i]
            there = self.there[i]
            if there == spec["sha"]:
                self.have.add(i)
                self.skipped += 1
                continue
            if there is not None:
                self.replaced.append(i)
            fs = FileState(self, i, spec)
            fs.seed()
            if fs.offset == spec["size"]:  # a previous stage wrote it all but stopped before the rename
                if self.finish(fs):
                    continue
            self.states[i] = fs
        self.save_verified()

    def finish(self, fs):
        """Check the hash; fsync and rename into place when right. False: the bytes are wrong (dropped)."""
        spec = fs.spec
        if fs.hash.hexdigest() != spec["sha"]:
            fs.drop()
            return False
        fs.open()
        os.fchmod(fs.fd, spec.get("mode", 0o644))
        os.fsync(fs.fd)
        fs.close()
        # mtime one whole second before the file's own ctime: any later write moves it to another second,
        # which is what a check at SFTP's one-second resolution can see (the controller's fast path,
        # unchanged.py). The kernel stamps ctime from its coarse clock, which can lag time.time() across a
        # second boundary; counting from the ctime it wrote keeps mtime's second below every later ctime.
        stamp = (os.lstat(fs.part).st_ctime_ns // 1000000000 - 1) * 1000000000
        os.utime(fs.part, ns=(stamp, stamp))
        final = self.dest + "/" + spec["rel"]
        parent = os.path.dirname(final)
        os.makedirs(parent, exist_ok=True)
        if os.path.isdir(final) and not os.path.islink(final):
            raise OSError(21, "a directory is in the way", final)
        os.rename(fs.part, final)
        st = os.lstat(final)
        self.verified[spec["rel"]] = [spec["sha"]] + self.signature(st)
        self.have.add(fs.idx)
        self.states.pop(fs.idx, None)
        self.files_written += 1
        return True

    def partial(self):
        return dict((str(i), fs.offset) for i, fs in self.states.items())

    # ------------------------------------------------------------------ passes

    def listen(self):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((self.cfg.get("bind", "0.0.0.0"), 0))
        s.listen(8)
        self.listener = s
        return s.getsockname()[1]

    def accept(self, token, deadline):
        """The one connection that presents ``token``; others are closed. None when aborted or too late."""
        want = token.encode()
        while not self.abort_flag.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                raise OSError("no connection from the previous host within the deadline")
            self.listener.settimeout(min(left, 0.5))
            try:
                conn, _ = self.listener.accept()
            except socket.timeout:
                continue
            conn.settimeout(5.0)
            try:
                got = bytes(recv_exact(conn, TOKEN_BYTES))
            except (OSError, EOFError):
                conn.close()
                continue
            if hmac.compare_digest(got, want):
                return conn
            conn.close()
        return None

    def connect(self, nxt, deadline):
        last = None
        while not self.abort_flag.is_set() and time.monotonic() < deadline:
            try:
                s = socket.create_connection((nxt["addr"], nxt["port"]), timeout=min(5.0, max(0.5, deadline - time.monotonic())))
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s.sendall(nxt["token"].encode())
                return s
            except OSError as e:
                last = e
                time.sleep(0.2)
        why = getattr(last, "strerror", None) or last
        raise OSError("cannot reach the next host at %s:%s (%s)" % (nxt["addr"], nxt["port"], why))

    def run_pass(self, p):
        """One pass: accept, connect, relay frames until the end marker. Reports ``done`` or ``error``."""
        pid = p["id"]
        side = "up"
        fwd = disk = None
        try:
            deadline = time.monotonic() + float(p.get("timeout", 30))
            up = self.accept(p["token"], deadline)
            if up is None:
                out({"ev": "done", "id": pid, "aborted": True, "partial": self.partial()})
                return
            self.socks.append(up)
            up.settimeout(float(p.get("stall", 60)))
            down = None
            if p.get("next"):
                side = "down"
                down = self.connect(p["next"], min(deadline, time.monotonic() + float(p.get("connect_timeout", 5))))
                down.settimeout(float(p.get("stall", 60)))  # not the connect's timeout: a slow next host is not a dead one
                self.socks.append(down)
            side = "up"
            fwd = Pipe("forward", self.forward_to(down)) if down is not None else None
            disk = Pipe("disk", self.to_disk)
            while True:
                hdr = bytes(recv_exact(up, HEADER.size))
                kind, idx, off, length = HEADER.unpack(hdr)
                if fwd:
                    fwd.put(hdr)
                if kind == b"E":
                    break
                if kind != b"F" or idx >= len(self.files):
                    raise OSError("a malformed frame arrived")
                disk.put(("begin", idx, off, length))
                left = length
                while left:
                    n = min(CHUNK, left)
                    data = recv_exact(up, n)
                    left -= n
                    with self.lock:
                        self.rx += n
                    if fwd:
                        fwd.put(data)
                    disk.put(("data", idx, data))
                    if (fwd and fwd.error) or disk.error:
                        self.check(fwd, disk)
                disk.put(("end", idx))
                self.check(fwd, disk)
            disk.finish()
            if fwd:
                fwd.finish()
                side = "down"
                self.check(fwd, disk)
                down.shutdown(socket.SHUT_WR)
            self.check(fwd, disk)
            out({"ev": "done", "id": pid, "partial": self.partial()})
        except Exception as e:  # noqa: BLE001 - every failure becomes a report
            aborted = self.abort_flag.is_set()
            msg = str(e) if not isinstance(e, OSError) or not e.strerror else e.strerror
            if fwd is not None and fwd.error:
                side, msg = "down", fwd.error
            if disk is not None and disk.error:
                side, msg = "disk", disk.error
            for pipe in (fwd, disk):
                if pipe is not None:
                    pipe.stop()
            if aborted:
                out({"ev": "done", "id": pid, "aborted": True, "partial": self.partial()})
            else:
                out({"ev": "error", "id": pid, "side": side, "error": msg, "partial": self.partial()})
        finally:
            for s in self.socks:
                try:
                    s.close()
                except OSError:
                    pass
            self.socks = []
            for fs in list(self.states.values()):
                fs.close()
            self.save_verified()

    @staticmethod
    def check(fwd, disk):
        for pipe in (fwd, disk):
            if pipe is not None and pipe.error:
                raise OSError(pipe.error)

    def forward_to(self, sock):
        def send(item):
            sock.sendall(item)
        return send

    def to_disk(self, item):
        kind, idx = item[0], item[1]
        fs = self.states.get(idx)
        if kind == "begin":
            self._pos = item[2]
            if fs is not None and fs.offset < self._pos:  # a gap: these bytes cannot complete it
                fs.drop()
                self.states[idx] = fs
            return
        if kind == "data":
            data = item[2]
            pos = self._pos
            self._pos += len(data)
            if fs is None or fs.offset >= self._pos:
                return  # have it, or these bytes are already on disk
            skip = fs.offset - pos if fs.offset > pos else 0
            if fs.offset < pos:  # a gap (see begin)
                return
            chunk = memoryview(data)[skip:] if skip else data
            fs.write(chunk)
            with self.lock:
                self.written += len(chunk)
            return
        if kind == "end" and fs is not None:
            if fs.offset == fs.spec["size"]:
                ok = self.finish(fs)
                out({"ev": "file", "idx": idx, "ok": ok,
                     "why": None if ok else "the bytes that arrived did not hash to the source's SHA-256"})
                if not ok:
                    self.states[idx] = fs  # dropped: the next pass sends it whole
            else:
                fs.close()

    def abort(self):
        self.abort_flag.set()
        for s in list(self.socks):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def progress_loop(self):
        last = None
        while True:
            time.sleep(PROGRESS_S)
            with self.lock:
                now = (self.rx, self.written, self.files_written)
            if now != last:
                out({"ev": "p", "rx": now[0], "wr": now[1], "files": now[2]})
                last = now

    def serve(self, inp):
        self.prescan()
        shas = None
        for line in iter(inp.readline, b""):
            try:
                cmd = json.loads(line)
            except ValueError:
                continue
            if cmd.get("cmd") == "hashes":
                shas = cmd["shas"]
                break
        if shas is None:
            return  # the controller went away before it had the source's digests
        self.scan(shas)
        port = self.listen()
        out({"ev": "ready", "port": port, "host": socket.gethostname(), "have": sorted(self.have), "skipped": self.skipped,
             "replaced": self.replaced, "partial": self.partial(), "dest": self.dest})
        threading.Thread(target=self.progress_loop, daemon=True).start()
        for line in iter(inp.readline, b""):
            try:
                cmd = json.loads(line)
            except ValueError:
                continue
            if cmd.get("cmd") == "pass":
                if self.pass_thread is not None:
                    self.pass_thread.join()
                self.abort_flag.clear()
                self.pass_thread = threading.Thread(target=self.run_pass, args=(cmd,), daemon=True)
                self.pass_thread.start()
            elif cmd.get("cmd") == "abort":
                self.abort()
        self.abort()
        if self.pass_thread is not None:
            self.pass_thread.join(10)
        t = os.times()
        with self.lock:
            out({"ev": "p", "rx": self.rx, "wr": self.written, "files": self.files_written,
                 "cpu_s": round(t[0] + t[1], 3)})


def main(cfg, inp):
    try:
        relay = Relay(cfg)
        relay.serve(inp)
    except OSError as e:
        out({"ev": "error", "side": "disk", "error": "%s: %s" % (e.filename or cfg.get("dest"), e.strerror or e)})


if __name__ == "orch_relay":  # exec'd on the host by BOOT, which puts CFG and IN in its globals
    main(globals()["CFG"], globals()["IN"])
