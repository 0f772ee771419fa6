"""The staging helper: the program each host runs to check, commit and place staged files.

It is not imported on the controller: ``stager.py`` sends this file's *source* over an SSH
exec channel, and the host runs it with the ranks' own interpreter under ``-S``
(``stager.HELPER_BOOT``: JSON ``{"src", "req"}`` in on stdin, ``exec`` with ``REQ`` and
``__name__ == "orch_stage"``; one JSON line out on stdout). Hence the rules for this file:
standard library only, nothing from ``orchestrator``, no syntax newer than the oldest Python
a host may have (macOS's /usr/bin/python3 3.9), and nothing done at import unless run as
``orch_stage``. Kept as a module so it can be linted and tested in-process (``run``).

What it does, for one request (``run``): verify every object the run needs (size and
SHA-256: an object is trusted only after it hashed right *this* run; a damaged one is
removed and reported missing), commit fresh uploads (hashed, made read-only, stamped with
``REQ["mtime"]``, renamed into place), build shared trees (the runtime) under a temporary
name and rename them into place, and give the run copies (APFS clonefile on macOS, a
reflink on Linux where the filesystem has them, else a plain copy), never links: whatever a
run does to its files stays in that run.
"""

import hashlib
import json
import os
import shutil
import stat
import sys

NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
FICLONE = 0x40049409
_clonefile = []  # macOS clonefile(2), looked up once


def sha256_of(path, size):
    """(hex digest, lstat) of a regular file of the expected size; (None, lstat or None) otherwise."""
    try:
        st = os.lstat(path)
    except OSError:
        return None, None
    if not stat.S_ISREG(st.st_mode) or st.st_size != size:
        return None, st
    try:
        fd = os.open(path, os.O_RDONLY | NOFOLLOW)
    except OSError:
        return None, st
    try:
        h = hashlib.sha256()
        while True:
            b = os.read(fd, 1 << 20)
            if not b:
                break
            h.update(b)
        return h.hexdigest(), st
    finally:
        os.close(fd)


def rid():
    return os.urandom(4).hex()


def discard(path, st):
    """Move a damaged file away, if it is still the one that was checked (a racing host may have replaced it)."""
    try:
        if os.lstat(path).st_ino == st.st_ino:
            gone = "%s/.bad-%s" % (os.path.dirname(path), rid())
            os.rename(path, gone)
            os.unlink(gone)
    except OSError:
        pass


def copy(src, dst, mode):
    """A private copy of src at dst: a clone where the filesystem can, else the bytes. Returns how."""
    if sys.platform == "darwin":
        try:
            if not _clonefile:
                import ctypes
                _clonefile.append(ctypes.CDLL("/usr/lib/libSystem.B.dylib", use_errno=True).clonefile)
            if _clonefile[0](os.fsencode(src), os.fsencode(dst), 0) == 0:
                os.chmod(dst, mode)
                return "clonefile"
        except (OSError, AttributeError):
            pass
    how = "copy"
    fi = os.open(src, os.O_RDONLY | NOFOLLOW)
    try:
        fo = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW, 0o600)
        try:
            if sys.platform.startswith("linux"):
                try:
                    import fcntl
                    fcntl.ioctl(fo, FICLONE, fi)
                    how = "reflink"
                except (OSError, ImportError):
                    pass
            if how == "copy":
                while True:
                    b = os.read(fi, 1 << 20)
                    if not b:
                        break
                    while b:
                        b = b[os.write(fo, b):]
            os.fchmod(fo, mode)
        finally:
            os.close(fo)
    finally:
        os.close(fi)
    return how


class Request:
    """One request's state: the object directory, the mtime objects carry, what is known, what goes back."""

    def __init__(self, req):
        self.req = req
        self.objects = req["objects"]
        self.mark = req["mtime"]
        self.known = {}  # object name -> hashed right (each object is hashed at most once per request)
        self.out = {"missing": [], "bad": [], "placed": 0, "trees": {}, "method": "", "errors": []}

    def seal(self, path, name, st):
        mode = 0o555 if name.endswith(".x") else 0o444
        if stat.S_IMODE(st.st_mode) != mode:
            os.chmod(path, mode)
        if int(st.st_mtime) != self.mark:
            os.utime(path, (self.mark, self.mark))

    def have(self, name, size, sha):
        """The object is there and hashes right (checked once per request); a damaged one is removed."""
        if name not in self.known:
            path = self.objects + "/" + name
            digest, st = sha256_of(path, size)
            self.known[name] = digest == sha
            if self.known[name]:
                self.seal(path, name, st)
            elif st is not None:
                discard(path, st)
                self.out["bad"].append(name)
        return self.known[name]

    def commit(self, c):
        digest, st = sha256_of(c["tmp"], c["size"])
        if st is None:
            return  # already committed by another staging call on this host
        if digest != c["sha"]:
            discard(c["tmp"], st)
            self.out["errors"].append("the upload of %s does not match its SHA-256: did it change while it was being "
                                      "staged (a file being written, e.g. a log, in the script's folder)?" % c["rel"])
            return
        self.seal(c["tmp"], c["name"], st)
        os.replace(c["tmp"], self.objects + "/" + c["name"])
        self.known[c["name"]] = True

    def place(self, src, dst, mode):
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        how = copy(src, dst, mode)
        if self.out["method"] not in ("", how):
            how = "mixed"
        self.out["method"] = how

    @staticmethod
    def tree_intact(t):
        """(intact?, lstat of the tree's root or None)."""
        root = t["path"]
        try:
            st = os.lstat(root)
        except OSError:
            return False, None
        if not stat.S_ISDIR(st.st_mode):
            return False, st
        return all(sha256_of(root + "/" + rel, size)[0] == sha for rel, name, size, sha, mode in t["files"]), st

    def build_tree(self, t, damaged):
        root = t["path"]
        parent = os.path.dirname(root)
        os.makedirs(parent, exist_ok=True)
        tmp = "%s/.tmp-%s" % (parent, rid())
        os.mkdir(tmp)
        try:
            for rel, name, size, sha, mode in t["files"]:
                self.place(self.objects + "/" + name, tmp + "/" + rel, mode)
            if damaged is not None:  # out of the way first, unless a host on this filesystem replaced it meanwhile
                try:
                    if os.lstat(root).st_ino == damaged.st_ino:
                        old = "%s/.trash-%s" % (parent, rid())
                        os.rename(root, old)
                        if os.path.isdir(old) and not os.path.islink(old):
                            shutil.rmtree(old, ignore_errors=True)
                        else:
                            os.unlink(old)
                except OSError:
                    pass
            try:
                os.rename(tmp, root)
            except OSError:
                if not os.path.isdir(root):
                    raise  # else another host on this filesystem built it a moment ago
        finally:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)

    def main(self):
        R, out = self.req, self.out
        os.makedirs(self.objects, exist_ok=True)
        for c in R["commit"]:
            self.commit(c)
        for t in R["trees"]:
            intact, st = self.tree_intact(t)
            if intact:
                out["trees"][t["path"]] = "reused"
                continue
            lacking = [name for rel, name, size, sha, mode in t["files"] if not self.have(name, size, sha)]
            if lacking:
                out["missing"].extend(lacking)
                out["trees"][t["path"]] = "pending"
            else:
                self.build_tree(t, st)
                out["trees"][t["path"]] = "built"
        for d in R["dirs"]:
            os.makedirs(d, exist_ok=True)
        for name, size, sha, mode, dests in R["place"]:
            if not self.have(name, size, sha):
                out["missing"].append(name)
                continue
            for dst in dests:
                self.place(self.objects + "/" + name, dst, mode)
                out["placed"] += 1


def run(req):
    """Carry out one request; the result the controller reads (``errors`` non-empty: staging failed)."""
    r = Request(req)
    try:
        r.main()
    except OSError as e:
        r.out["errors"].append("%s: %s" % (e.filename or r.objects, e.strerror or e))
    r.out["missing"] = sorted(set(r.out["missing"]))
    return r.out


if __name__ == "orch_stage":  # exec'd on the host by stager.HELPER_BOOT, which puts REQ in its globals
    sys.stdout.write("\n" + json.dumps(run(globals()["REQ"])) + "\n")
