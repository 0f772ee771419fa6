"""The relay's parts that need no relay: its constants, its output line, reading and hashing, one
file being received (``FileState``) and a bounded worker thread (``Pipe``).

Shipped to each host *before* ``relay.py`` in one source (``chain.RELAY_SOURCE``), so the same rules
hold: standard library only, Python 3.9, nothing done at import.
"""

import hashlib
import json
import os
import stat
import struct
import sys
import threading

MARK = "ORCHSTAGE "
STATE_DIR = ".orch-stage"
CHUNK = 1 << 20
QUEUE = 32                   # chunks in flight per direction (disk, next host)
HEADER = struct.Struct("!cIQQ")  # b"F" file index, offset, length | b"E" end of stream
TOKEN_BYTES = 64             # hex
PROGRESS_S = 0.25
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)

_out_lock = threading.Lock()


def out(obj):
    with _out_lock:
        sys.stdout.write(MARK + json.dumps(obj, separators=(",", ":")) + "\n")
        sys.stdout.flush()


def recv_exact(sock, n):
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if not k:
            raise EOFError("the previous host closed the stream after %d of %d bytes" % (got, n))
        got += k
    return buf


def hash_file(path, limit=None):
    """(hashlib object over the first ``limit`` bytes (all: None), bytes read)."""
    h = hashlib.sha256()
    n = 0
    fd = os.open(path, os.O_RDONLY | NOFOLLOW)
    try:
        while limit is None or n < limit:
            want = CHUNK if limit is None else min(CHUNK, limit - n)
            b = os.read(fd, want)
            if not b:
                break
            h.update(b)
            n += len(b)
    finally:
        os.close(fd)
    return h, n


class FileState:
    """One file this host lacks: its temporary file, how much of it is written and hashed."""

    def __init__(self, relay, idx, spec):
        self.idx = idx
        self.spec = spec
        self.part = "%s/%s.%s.part" % (relay.state, spec["sha"], relay.host_tag)
        self.hash = None
        self.offset = 0
        self.fd = None

    def seed(self):
        """Hash what a previous stage left in the temporary file (it continues from there)."""
        try:
            st = os.lstat(self.part)
        except OSError:
            self.hash, self.offset = hashlib.sha256(), 0
            return
        if not stat.S_ISREG(st.st_mode) or st.st_size > self.spec["size"]:
            self.drop()
            self.hash, self.offset = hashlib.sha256(), 0
            return
        self.hash, self.offset = hash_file(self.part, st.st_size)

    def drop(self):
        self.close()
        try:
            os.unlink(self.part)
        except OSError:
            pass
        self.hash, self.offset = hashlib.sha256(), 0

    def open(self):
        if self.fd is None:
            self.fd = os.open(self.part, os.O_WRONLY | os.O_CREAT | NOFOLLOW, 0o600)
            os.ftruncate(self.fd, self.offset)
            os.lseek(self.fd, self.offset, os.SEEK_SET)

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def write(self, data):
        self.open()
        view = memoryview(data)
        while view:
            k = os.write(self.fd, view)
            view = view[k:]
        self.hash.update(data)
        self.offset += len(data)


class Pipe:
    """A worker thread fed through a bounded queue; the first error stops it and is kept."""

    def __init__(self, name, fn):
        import queue

        self.name = name
        self.fn = fn
        self.q = queue.Queue(QUEUE)
        self.error = None
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        while True:
            item = self.q.get()
            if item is None:
                return
            if self.error:
                continue
            try:
                self.fn(item)
            except Exception as e:  # noqa: BLE001
                self.error = "%s: %s" % (self.name, (e.strerror if isinstance(e, OSError) and e.strerror else e))

    def put(self, item):
        while not self.error:
            try:
                self.q.put(item, timeout=0.5)
                return
            except Exception:  # noqa: BLE001 - queue.Full: the consumer is slow; check it is alive
                continue

    def finish(self):
        self.q.put(None)
        self.t.join()

    def stop(self):
        self.error = self.error or "stopped"
        try:
            while True:
                self.q.get_nowait()
        except Exception:  # noqa: BLE001 - empty
            pass
        try:
            self.q.put_nowait(None)
        except Exception:  # noqa: BLE001
            pass
        self.t.join(5)
