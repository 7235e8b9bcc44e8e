#!/usr/bin/env python3
"""Benchmark blocksync against a plain read, cat over ssh and rsync.

One run generates one data set and measures every case on it, with the page
cache warm, so the numbers are comparable with each other.  The cases come in
groups; each group prints its own table (median, min, ratio to the group's
first case) and its target lines.

local (``--local``, on by default):

  (a) read      ``cat src dst >/dev/null``: the floor, reading both files once
  (b) blocksync ``blocksync -f -q --no-progress src ./dst``
  (c) rsync     ``rsync --inplace --no-whole-file src dst``

ssh (``--ssh``, on by default) against a throwaway sshd on a free loopback
port (host and user keys made for the run, client config with
``Ciphers aes128-gcm@openssh.com``), stopped at the end:

  changed blocks: (a) read again, blocksync push ``src benchhost:dst``,
  blocksync pull ``benchhost:src dst``, rsync over ssh; the bytes that
  crossed loopback (``/sys/class/net/lo/statistics/tx_bytes``) per run;
  issue 5: push loopback bytes <= 0.20 MB.
  many (``--many``): ``dst.many.orig`` = src with ``--many-changes`` (2000)
  seeded random 4 KiB writes at uniform random 4 KiB-aligned offsets; a plain
  read, blocksync push and ``rsync -z`` over ssh; bytes and time vs rsync.
  first copy: ``src`` to a missing destination: ``ssh benchhost 'cat > dst'
  < src`` vs blocksync vs blocksync ``-w 2``.
  latency: blocksync push direct vs through a TCP proxy that delays every
  chunk by ``--delay-ms`` in each direction (no throughput limit).

``src`` is random data; ``dst.orig`` is a copy of it with a few scattered
4 KiB random changes (seeded offsets).  Before each timed run of a case that
writes ``dst``, ``dst`` is restored from ``dst.orig`` (or removed, for the
first-copy cases), ``sync`` is run (so no dirty pages from the restore get
flushed inside the timed run), and ``src`` and ``dst`` are read once to warm
the cache.  After the run ``dst`` must equal ``src`` byte for byte, or the
benchmark stops.

sparse (``--sparse``, on by default), issue 4: ``sp.src`` is a 64 GiB
(``--sparse-size``) sparse file with 1 GiB (``--sparse-data``) of random data
in 4 MiB extents, one per equal slot at a seeded 4 KiB-aligned (not 1 MiB-
aligned) offset.

  A: new local copy, ``cp --sparse=always`` vs blocksync; allocated sizes.
  B: new copy over the loopback sshd: time and loopback bytes (<= 1.05 x data).
  C: re-sync after a few 4 KiB changes inside the data extents, vs reading
  the data extents of both files in Python.
  Copies are checked without reading the holes (sizes, data extents, and
  zeros wherever the copy has data outside the source's extents).

journal (``--journal``, off by default), issue 13: blocksync ``--journal`` vs
``--no-journal`` (the same binary, alternating runs) re-syncing ``dst.orig``
(the 10 changes) and ``dst.frac.orig`` (``--journal-changed`` 30% of the
``--journal-unit`` 1 MiB blocks, scattered, random data), locally and pushed;
median wall and machine CPU seconds, journal / no-journal, and journal_bytes /
bytes_written from one ``--json`` run (a push journals on the server: its
journal file beside ``dst`` is polled).  Then first copies (local and push)
with the default journal choice, vs ``--before`` if given.  Journals beside
``dst`` are removed before every run and must be gone after it.
``--journal-default auto|on|off``: the journal flag of every other ``--bin``
run (auto: none, blocksync's default journals a destination a run completed
onto before, i.e. from a case's second run on).

A last measurement (``--rss``, on by default) records the peak RSS of
blocksync syncing a 16 GiB loop device onto another (over sparse files, so
every byte is read but the disk is not filled), via ``os.wait4``.

Issue 15 (the figures on this machine, in one run):

  floor (``--floor``, with ``--ssh`` or ``--cache``): BLAKE3 of src and dst, and
  of src alone, on all cores (``b3sum``, else the ``blake3`` PyPI package
  in-process; ``--blake3``), and ``ssh benchhost true``.  Without a BLAKE3 the
  lines that need it say MISS and how to install one.
  ``--cold-too``: the local and ssh re-syncs, the digest-file run (blake3) and
  sparse C again with the page cache dropped before every run, each right
  after its warm table.
  At the end, every figure of the issue's table against its target
  (``issue 15: ...`` lines), read from the groups' results.

Every table shows the machine's median CPU seconds (``/proc/stat``), and
every timed run starts after a ``sync`` (nothing dirty in the page cache).

``--before PATH``: a second blocksync binary (say, built from the commit
before a change), copied into the work dir like ``--bin`` and its own remote
(``-S``).  Every blocksync case is also timed with it (key ``<key>-before``,
label ``(b') blocksync before ...``), alternating run by run with the same
preparation, and each group prints ``after / before = X.XX (<key>)`` of the
median wall times.  Without it the output is as it was.

Standard library only.  See bench/README.md; ``bench.py --help`` for options.

Adding a case: write a ``case_*`` function returning a :class:`Case` and add
it to the list of its group (:func:`local_group`, :func:`ssh_group`, ...).
The first case of a group is the reference for that group's ratios.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import errno
import json
import os
import queue
import random
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
MB = 1000 * 1000         # loopback bytes and throughputs are in decimal MB

CHUNK = 4 * MiB          # generation / copy piece size
CHANGE_SIZE = 4 * KiB    # size of each scattered change
BLOCK_SIZE = MiB         # blocksync's default -b, for the lock-step estimate

REPO = Path(__file__).resolve().parent.parent
DEFAULT_BIN = REPO / "target" / "x86_64-unknown-linux-gnu" / "release" / "blocksync"
RSYNC = shutil.which("rsync") or "/usr/bin/rsync"
SSHD = "/usr/sbin/sshd"
LO_TX = Path("/sys/class/net/lo/statistics/tx_bytes")
DEFAULT_CIPHER = "aes128-gcm@openssh.com"
HOST = "benchhost"                # the ssh config's name for the sshd
HOST_PROXY = "benchhost-proxy"    # through the delay proxy with 0 ms
HOST_SLOW = "benchhost-slow"      # through the delay proxy with --delay-ms

# Targets from the issues.
TARGET_VS_READ = 1.15        # blocksync median / read median
TARGET_VS_RSYNC = 0.40       # blocksync median / rsync median
TARGET_RSS_MIB = 100         # peak RSS syncing 16 GiB
TARGET_SSH_VS_READ = 1.6     # blocksync over ssh median / read median
TARGET_SSH_VS_RSYNC = 0.40   # blocksync over ssh median / rsync over ssh median
TARGET_SSH_LO_MB = 12        # bytes crossing loopback for one ssh sync, < (MB)
TARGET_SSH_PUSH_LO_MB = 0.20  # issue 5: the same push, changed 4 KiB pieces only, <= (MB)
TARGET_FIRST_COPY = 0.9      # throughput blocksync / cat over ssh, >=
TARGET_FIRST_COPY_W2 = 1.0   # throughput blocksync -w 2 / cat over ssh, >
TARGET_LATENCY = 1.5         # push time at 2 x delay RTT / direct, <= (informational)
TARGET_SPARSE_VS_CP = 1.5    # new local copy of a sparse file: blocksync / cp --sparse=always, <=
TARGET_SPARSE_ALLOC = 0.05   # allocated size of the copy vs the source, within
TARGET_SPARSE_LO = 1.05      # new sparse copy over ssh: loopback bytes / data bytes, <=
TARGET_SPARSE_RESYNC = 1.3   # re-sync of the sparse file: blocksync / reading both files' data, <=
TARGET_CACHE_VS_READ = 1.15  # issue 7: sync with a valid digest file / reading the source alone, <=
TARGET_PATCH_KB = 100        # issue 7: patch for the 10 changes, <= (KB)

# Issue 15: the figures on this machine, all from one run, printed together at the end.
T15_LOCAL_VS_READ = 1.15        # local re-sync, warm: blocksync / cat src dst, <=
T15_LOCAL_VS_RSYNC = 0.30       # local re-sync, warm: blocksync / rsync --inplace, <=
T15_LOCAL_COLD_VS_READ = 1.15   # local re-sync, cold: blocksync / cat src dst (cold), <=
T15_PUSH_VS_FLOOR = 1.15        # push, warm: blocksync / (ssh login + BLAKE3 of src and dst), <=
T15_PUSH_VS_RSYNC = 0.60        # push, warm: blocksync / rsync over ssh, <=
T15_PUSH_CPU_VS_RSYNC = 0.70    # push, warm: machine CPU seconds blocksync / rsync over ssh, <=
T15_PUSH_COLD_VS_RSYNC = 0.60   # push, cold: blocksync / rsync over ssh (cold), <=
T15_FIRST_COPY = 0.90           # first copy over ssh: throughput blocksync / ssh 'cat > dst', >=
T15_SPARSE_VS_CP_SYNC = 1.10    # new sparse copy: blocksync / (cp --sparse=always && sync), <=
T15_CACHE_XXH3_VS_READ = 1.15   # digest-file run, xxh3: blocksync / cat src, <=
T15_CACHE_B3_VS_FLOOR = 1.15    # digest-file run, blake3: blocksync / BLAKE3 of src, <=


# --------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------

def log(msg: str) -> None:
    """Progress messages go to stderr so stdout holds only the results."""
    print(msg, file=sys.stderr, flush=True)


def parse_size(text: str) -> int:
    """Parse '1G', '512M', '1GiB', '4096' (binary units) into bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(i?b)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size: {text!r}")
    mult = {"": 1, "k": KiB, "m": MiB, "g": GiB, "t": 1024 * GiB}[m.group(2).lower()]
    return int(m.group(1)) * mult


def human(n: int) -> str:
    for unit, div in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= div and n % div == 0:
            return f"{n // div} {unit}"
    return f"{n} B"


def run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    """subprocess.run that fails loudly, showing the command's stderr."""
    kw.setdefault("stdin", subprocess.DEVNULL)
    kw.setdefault("stdout", subprocess.DEVNULL)
    kw.setdefault("stderr", subprocess.PIPE)
    cp = subprocess.run(argv, **kw)
    if cp.returncode != 0:
        err = cp.stderr.decode(errors="replace").strip() if cp.stderr else ""
        sys.exit(f"bench: command failed (exit {cp.returncode}): {shlex.join(map(str, argv))}\n{err}")
    return cp


def sync_disks() -> None:
    """Flush dirty pages so they are not written back during a timed run."""
    run(["sync"])


# --cold: every timed run starts with the page cache dropped (set by main).
COLD = False

# --journal-default on/off: (the --bin copy's path, the flag to add to its runs); set by main.
BIN_JOURNAL: tuple[str, str] | None = None


def drop_caches() -> None:
    """Flush, then drop the page cache: the run reads from the disk, as users sync."""
    sync_disks()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def warm(*paths: Path) -> None:
    """Read files once so they are in the page cache."""
    run(["cat", *map(str, paths)])


def copy_file(src: Path, dst: Path) -> None:
    """Plain byte copy (no reflink, no shared extents) of src onto dst."""
    run(["cp", "--reflink=never", str(src), str(dst)])


def verify_same(a: Path, b: Path, what: str) -> None:
    """cmp the two files; stop the benchmark if they differ."""
    cp = subprocess.run(["cmp", str(a), str(b)], stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT)
    if cp.returncode != 0:
        out = cp.stdout.decode(errors="replace").strip()
        sys.exit(f"bench: VERIFY FAILED after {what}: {a} and {b} differ\n{out}")


def scattered_offsets(rng: random.Random, size: int, count: int,
                      align: int = CHANGE_SIZE) -> list[int]:
    """`count` aligned offsets, one in each of `count` equal slices of the file."""
    slots = size // align
    if slots < count:
        raise SystemExit(f"bench: file of {size} bytes too small for {count} changes")
    offs = []
    for i in range(count):
        lo, hi = slots * i // count, slots * (i + 1) // count
        offs.append(rng.randrange(lo, hi) * align)
    return offs


def write_changes(path: Path, rng: random.Random, offsets: list[int]) -> None:
    """Overwrite CHANGE_SIZE random bytes at each offset (in place)."""
    with open(path, "r+b") as f:
        for off in offsets:
            f.seek(off)
            f.write(rng.randbytes(CHANGE_SIZE))


def ensure_binary(path: Path) -> Path:
    """Return the blocksync binary, building it if the default is missing."""
    if path.is_file():
        return path
    if path != DEFAULT_BIN:
        sys.exit(f"bench: --bin {path} does not exist")
    log(f"{path} missing: running cargo build --release")
    subprocess.run(["cargo", "build", "--release"], cwd=REPO, check=True)
    if not path.is_file():
        sys.exit(f"bench: build finished but {path} is still missing")
    return path


def lo_tx_bytes() -> int | None:
    """Bytes sent on the loopback interface so far (None if unknown).

    Counts every process's loopback traffic, so anything else talking over
    127.0.0.1 during a run inflates the figure; the minimum over runs is the
    least disturbed one."""
    try:
        return int(LO_TX.read_text())
    except (OSError, ValueError):
        return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------
# work directory and data
# --------------------------------------------------------------------------

@dataclass
class Workdir:
    """The files of one benchmark run."""
    root: Path
    created: bool                  # we made `root`, so we may remove it
    files: list[Path] = field(default_factory=list)

    def path(self, name: str) -> Path:
        p = self.root / name
        if p not in self.files:
            self.files.append(p)
        return p

    @property
    def src(self) -> Path:
        return self.path("src")

    @property
    def dst(self) -> Path:
        return self.path("dst")

    @property
    def dst_orig(self) -> Path:
        return self.path("dst.orig")

    @property
    def dst_many_orig(self) -> Path:
        return self.path("dst.many.orig")

    def cleanup(self) -> None:
        for p in self.files:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        if self.created:
            shutil.rmtree(self.root, ignore_errors=True)


def make_workdir(dir_opt: str | None) -> Workdir:
    if dir_opt is None:
        return Workdir(Path(tempfile.mkdtemp(prefix="blocksync-bench-", dir="/var/tmp")), True)
    root = Path(dir_opt).resolve()
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    return Workdir(root, created)


def snapshot_binary(bin_path: Path, wd: Workdir, name: str = "blocksync") -> Path:
    """Copy the binary into the work dir and use the copy for every case (local
    and as the remote's -S), so a rebuild of target/ during the run cannot
    swap it halfway through."""
    copy = wd.path(name)
    shutil.copy2(bin_path, copy)
    os.chmod(copy, 0o755)
    return copy


def generate_data(wd: Workdir, size: int, changes: int, seed: int) -> list[int]:
    """Write random `src`, `dst.orig` = src plus `changes` scattered 4 KiB changes,
    and `dst` = a copy of `dst.orig`; return the change offsets."""
    log(f"generating {human(size)} of random data in {wd.root} ...")
    t0 = time.perf_counter()
    with open(wd.src, "wb") as fs, open(wd.dst_orig, "wb") as fd:
        left = size
        while left:
            piece = os.urandom(min(CHUNK, left))
            fs.write(piece)
            fd.write(piece)
            left -= len(piece)
    rng = random.Random(seed)
    offsets = scattered_offsets(rng, size, changes)
    write_changes(wd.dst_orig, rng, offsets)
    copy_file(wd.dst_orig, wd.dst)       # so cases that only read dst have one
    sync_disks()
    log(f"  done in {time.perf_counter() - t0:.1f} s; changes at "
        + ", ".join(f"{o / MiB:.1f}M" for o in offsets))
    return offsets


def generate_many(wd: Workdir, size: int, count: int, seed: int,
                  align: int = CHANGE_SIZE) -> list[int]:
    """Write `dst.many.orig` = src with `count` random 4 KiB writes (seeded random
    bytes) at distinct seeded random offsets, uniform over the file and
    multiples of `align` (4 KiB by default, like the writes of a file system or
    database; with a smaller `align` a write may straddle two 4 KiB pieces, and
    writes may overlap); return the offsets."""
    slots = (size - CHANGE_SIZE) // align + 1
    if size < CHANGE_SIZE or slots < count:
        raise SystemExit(f"bench: file of {size} bytes too small for {count} changes "
                         f"aligned to {align}")
    log(f"many: {wd.dst_many_orig} = src with {count} random 4 KiB writes ...")
    t0 = time.perf_counter()
    copy_file(wd.src, wd.dst_many_orig)
    rng = random.Random(seed + 7)
    offsets = sorted(i * align for i in rng.sample(range(slots), count))
    write_changes(wd.dst_many_orig, rng, offsets)
    sync_disks()
    log(f"  done in {time.perf_counter() - t0:.1f} s")
    return offsets


# --------------------------------------------------------------------------
# a throwaway sshd, and a delaying TCP proxy in front of it
# --------------------------------------------------------------------------

class Sshd:
    """A real sshd on a free loopback port with throwaway host and user keys,
    and an ssh client config naming it `benchhost` (the recipe of
    tests/common/sshd.rs).  `stop` kills it and removes its directory."""

    def __init__(self, cipher: str):
        self.cipher = cipher
        self.dir = Path(tempfile.mkdtemp(prefix="blocksync-bench-sshd-"))
        self.config = self.dir / "ssh_config"
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.hosts: dict[str, int] = {}

    @property
    def rsh(self) -> str:
        """The -e argument for blocksync and rsync."""
        return f"ssh -F {shlex.quote(str(self.config))}"

    def start(self) -> None:
        if not Path(SSHD).exists():
            sys.exit(f"bench: the ssh cases need {SSHD} (apt-get install openssh-server); "
                     "or run with --no-ssh")
        d = self.dir
        for name in ("host_key", "user_key"):
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)])
        shutil.copy(d / "user_key.pub", d / "authorized_keys")
        os.makedirs("/run/sshd", exist_ok=True)
        last_log = ""
        for _ in range(5):                   # retry if the port is taken meanwhile
            port = free_port()
            (d / "sshd_config").write_text(
                f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\n"
                f"PidFile {d}/sshd.pid\nAuthorizedKeysFile {d}/authorized_keys\n"
                "StrictModes no\nPermitRootLogin yes\nPasswordAuthentication no\n"
                "KbdInteractiveAuthentication no\nUsePAM no\nLogLevel ERROR\n")
            with open(d / "sshd.log", "wb") as errlog:
                proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")],
                                        stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=errlog)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                except OSError:
                    time.sleep(0.02)
                    continue
                self.proc, self.port = proc, port
                self.add_host(HOST, port)
                log(f"sshd listening on 127.0.0.1:{port} (pid {proc.pid}), config {self.config}")
                return
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            last_log = (d / "sshd.log").read_text(errors="replace")
        sys.exit(f"bench: sshd did not start:\n{last_log}")

    def add_host(self, name: str, port: int) -> None:
        """(Re)write the client config with a Host entry `name` -> 127.0.0.1:port."""
        self.hosts[name] = port
        d = self.dir
        self.config.write_text("".join(
            f"Host {h}\n  HostName 127.0.0.1\n  Port {p}\n  User root\n"
            f"  IdentityFile {d}/user_key\n  IdentitiesOnly yes\n"
            "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n"
            f"  LogLevel ERROR\n  BatchMode yes\n  Ciphers {self.cipher}\n\n"
            for h, p in self.hosts.items()))

    def login_time(self, host: str) -> float:
        """Seconds for `ssh host true`; stops the benchmark if it fails."""
        t0 = time.perf_counter()
        cp = subprocess.run(["ssh", "-F", str(self.config), host, "true"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
        dt = time.perf_counter() - t0
        if cp.returncode != 0:
            sys.exit(f"bench: ssh to {host} failed: {cp.stderr.decode(errors='replace')}\n"
                     f"sshd log:\n{(self.dir / 'sshd.log').read_text(errors='replace')}")
        return dt

    def stop(self) -> None:
        """Kill sshd and remove its keys and config; safe to call twice."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            log(f"sshd (pid {self.proc.pid}) stopped")
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


class DelayProxy:
    """A TCP proxy on a free loopback port to 127.0.0.1:`target_port` that
    delays every chunk of data by `delay_ms` in each direction.

    Per direction a reader thread timestamps each chunk as it arrives and a
    writer thread sends it at timestamp + delay, in order.  Nothing waits for
    the other side, so the delay adds latency (2 x delay per round trip) but
    does not limit throughput: the chunks in flight simply queue up.
    """

    RECV = 256 * KiB

    def __init__(self, target_port: int, delay_ms: float):
        self.target_port = target_port
        self.delay = delay_ms / 1000
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.closed = False
        self.socks: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def _accept_loop(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.lock:
                self.socks += [client, upstream]
            pending = [2]                     # directions still open
            for a, b in ((client, upstream), (upstream, client)):
                q: queue.SimpleQueue = queue.SimpleQueue()
                threading.Thread(target=self._reader, args=(a, q), daemon=True).start()
                threading.Thread(target=self._writer, args=(b, q, a, client, upstream, pending),
                                 daemon=True).start()

    @staticmethod
    def _reader(sock: socket.socket, q: queue.SimpleQueue) -> None:
        while True:
            try:
                data = sock.recv(DelayProxy.RECV)
            except OSError:
                data = b""
            q.put((time.monotonic(), data))
            if not data:
                return

    def _writer(self, sock: socket.socket, q: queue.SimpleQueue, peer: socket.socket,
                client: socket.socket, upstream: socket.socket, pending: list[int]) -> None:
        ok = True
        while True:
            t, data = q.get()
            wait = t + self.delay - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            if not data:
                break
            if ok:
                try:
                    sock.sendall(data)
                except OSError:
                    ok = False                # keep draining until the reader stops
                    try:
                        peer.shutdown(socket.SHUT_RD)
                    except OSError:
                        pass
        try:
            sock.shutdown(socket.SHUT_WR)     # pass the EOF on, after the delay
        except OSError:
            pass
        with self.lock:
            pending[0] -= 1
            if pending[0] == 0:
                client.close()
                upstream.close()

    def stop(self) -> None:
        self.closed = True
        self.listener.close()
        with self.lock:
            for s in self.socks:
                try:
                    s.close()
                except OSError:
                    pass


# --------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------

@dataclass
class Case:
    """One timed command.

    key     short name used for ratios and the PASS/MISS lines
    label   text in the table
    argv    the command, built from the work directory
    writes  True if it syncs dst: dst is restored from dst.orig before each
            run and compared with src after it
    fresh   remove dst before each run instead of restoring it (first copy)
    stdin   file to feed on stdin (default /dev/null)
    net     record the bytes that crossed loopback during each run
    setup   if set, called before each run instead of the default preparation
            (restore or remove dst, sync, warm the cache)
    check   if set, called after each run instead of cmp src dst
    func    if set, timed instead of running argv (a baseline done in Python)
    journal_default  --journal-default's flag may be added to its --bin command
            (False for the cases that choose their own journal flag)
    """
    key: str
    label: str
    argv: Callable[[Workdir], list[str]]
    writes: bool = True
    fresh: bool = False
    stdin: Callable[[Workdir], Path] | None = None
    net: bool = False
    setup: Callable[[Workdir], None] | None = None
    check: Callable[[Workdir], None] | None = None
    func: Callable[[Workdir], None] | None = None
    journal_default: bool = True


def case_read() -> Case:
    """(a) Baseline: read source and destination once (cat to /dev/null)."""
    return Case("read", "(a) cat src dst >/dev/null",
                lambda wd: ["cat", str(wd.src), str(wd.dst)], writes=False)


def case_blocksync(bin_path: Path) -> Case:
    """(b) blocksync, local sync."""
    return Case("blocksync", "(b) blocksync -f -q --no-progress",
                lambda wd: [str(bin_path), "-f", "-q", "--no-progress",
                            str(wd.src), str(wd.dst)])


def case_rsync() -> Case:
    """(c) rsync with its delta algorithm, writing in place."""
    return Case("rsync", "(c) rsync --inplace --no-whole-file",
                lambda wd: [RSYNC, "--inplace", "--no-whole-file",
                            str(wd.src), str(wd.dst)])


def blocksync_ssh(bin_path: Path, sshd: Sshd, src: str, dst: str,
                  extra: tuple[str, ...] = ()) -> list[str]:
    """blocksync over ssh with the bench's ssh config, this binary on the remote."""
    return [str(bin_path), "-f", "-q", "--no-progress", "-e", sshd.rsh,
            "-S", str(bin_path), *extra, src, dst]


def case_push(bin_path: Path, sshd: Sshd, key: str = "push", host: str = HOST,
              label: str = "(d) blocksync src benchhost:dst (push)") -> Case:
    """(d) blocksync push over ssh onto the changed dst."""
    return Case(key, label,
                lambda wd: blocksync_ssh(bin_path, sshd, str(wd.src), f"{host}:{wd.dst}"),
                net=True)


def case_pull(bin_path: Path, sshd: Sshd) -> Case:
    """(e) blocksync pull over ssh: remote src onto the local changed dst."""
    return Case("pull", "(e) blocksync benchhost:src dst (pull)",
                lambda wd: blocksync_ssh(bin_path, sshd, f"{HOST}:{wd.src}", str(wd.dst)),
                net=True)


def case_rsync_ssh(sshd: Sshd) -> Case:
    """(f) rsync's delta algorithm over ssh, writing in place."""
    return Case("rsync-ssh", "(f) rsync --inplace --no-whole-file -e ssh",
                lambda wd: [RSYNC, "--inplace", "--no-whole-file", "-e", sshd.rsh,
                            str(wd.src), f"{HOST}:{wd.dst}"],
                net=True)


def case_cat_ssh(sshd: Sshd) -> Case:
    """(g) First-copy baseline: stream src through ssh into a new file."""
    return Case("cat-ssh", "(g) ssh benchhost 'cat > dst' < src",
                lambda wd: ["ssh", "-F", str(sshd.config), HOST,
                            f"cat > {shlex.quote(str(wd.dst))}"],
                fresh=True, stdin=lambda wd: wd.src, net=True)


def case_cat_ssh_sync(sshd: Sshd) -> Case:
    """(g2) The same stream with the fsync blocksync does before it reports success
    (informational: `cat` leaves the data in the page cache)."""
    def cmd(wd: Workdir) -> list[str]:
        dst = shlex.quote(str(wd.dst))
        return ["ssh", "-F", str(sshd.config), HOST, f"cat > {dst} && sync {dst}"]
    return Case("cat-ssh-sync", "(g2) ssh benchhost 'cat > dst && sync dst' < src", cmd,
                fresh=True, stdin=lambda wd: wd.src, net=True)


def case_first_copy(bin_path: Path, sshd: Sshd, workers: int) -> Case:
    """(h), (i) blocksync push onto a missing destination, with `workers` streams."""
    if workers == 1:
        key, label, extra = "first", "(h) blocksync src benchhost:new", ()
    else:
        key, label = f"first-w{workers}", f"(i) blocksync -w {workers} src benchhost:new"
        extra = ("-w", str(workers))
    return Case(key, label,
                lambda wd: blocksync_ssh(bin_path, sshd, str(wd.src), f"{HOST}:{wd.dst}", extra),
                fresh=True, net=True)


@dataclass
class Result:
    case: Case
    times: list[float]
    lo: list[int] = field(default_factory=list)    # loopback bytes per run
    cpu: list[float] = field(default_factory=list)  # CPU seconds of the machine per run

    @property
    def cpu_median(self) -> float | None:
        return statistics.median(self.cpu) if self.cpu else None

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def min(self) -> float:
        return min(self.times)

    @property
    def lo_median(self) -> float | None:
        return statistics.median(self.lo) if self.lo else None


def restore_dst(wd: Workdir, orig: Path | None = None) -> None:
    """Put dst back to `orig` (default dst.orig), older than src, with nothing
    left to flush.

    The mtime matters: rsync's quick check skips a file whose size and mtime
    match the source's, and a restore made within the same second as src was
    written would otherwise make rsync do nothing at all.
    """
    copy_file(orig or wd.dst_orig, wd.dst)
    src_mtime = wd.src.stat().st_mtime_ns
    os.utime(wd.dst, ns=(src_mtime, src_mtime - 3600 * 10**9))
    sync_disks()


def prepare(case: Case, wd: Workdir) -> None:
    """Put dst in the state the case starts from, flush, and warm the cache."""
    if case.setup:
        case.setup(wd)
        return
    if case.fresh:
        wd.dst.unlink(missing_ok=True)
        sync_disks()
        warm(wd.src)
        return
    if case.writes:
        restore_dst(wd)
    warm(wd.src, wd.dst)


def verify_case(case: Case, wd: Workdir, what: str) -> None:
    """After a run of a case that writes: its own check, or cmp src dst."""
    if case.check:
        case.check(wd)
    elif case.writes:
        verify_same(wd.src, wd.dst, what)


def machine_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy (user+nice+system+irq+softirq
    of /proc/stat's first line): both ends of a loopback sync, ssh included."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:8]]
    user, nice, system, _idle, _iowait, irq, softirq = fields
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def case_argv(case: Case, wd: Workdir) -> list[str]:
    """The case's command; a run of the --bin copy gets --journal-default's flag
    (if on or off) right after the program name."""
    argv = case.argv(wd)
    if BIN_JOURNAL and case.journal_default and argv and argv[0] == BIN_JOURNAL[0]:
        argv = [argv[0], BIN_JOURNAL[1], *argv[1:]]
    return argv


def time_run(result: Result, wd: Workdir, i: int, runs: int, cold: bool = False) -> None:
    """Prepare, time and verify run `i` of `result.case`; add it to `result`.
    Every run starts with nothing dirty in the page cache (sync after the
    preparation), and with the cache dropped if `cold` or --cold."""
    case = result.case
    argv = case_argv(case, wd)
    prepare(case, wd)
    if COLD or cold:
        drop_caches()
    else:
        sync_disks()
    stdin = open(case.stdin(wd), "rb") if case.stdin else subprocess.DEVNULL
    try:
        lo0 = lo_tx_bytes() if case.net else None
        c0 = machine_cpu_seconds()
        t0 = time.perf_counter()
        if case.func:
            case.func(wd)
        else:
            run(argv, stdin=stdin)
        dt = time.perf_counter() - t0
        cpu = machine_cpu_seconds() - c0
        lo1 = lo_tx_bytes() if case.net else None
    finally:
        if case.stdin:
            stdin.close()
    verify_case(case, wd, f"{case.key} run {i + 1}")
    result.times.append(dt)
    result.cpu.append(cpu)
    extra = f", CPU {cpu:.2f} s"
    if lo0 is not None and lo1 is not None:
        result.lo.append(lo1 - lo0)
        extra += f", loopback {(lo1 - lo0) / MB:.2f} MB"
    log(f"  {case.key:<10} run {i + 1}/{runs}: {dt:.3f} s{extra}")


def time_case(case: Case, wd: Workdir, runs: int, cold: bool = False) -> Result:
    """Run `case` `runs` times (cache warm, or dropped if `cold`); return the wall times."""
    result = Result(case, [])
    for i in range(runs):
        time_run(result, wd, i, runs, cold)
    return result


def time_pair(case: Case, twin: Case, wd: Workdir, runs: int,
              cold: bool = False) -> list[Result]:
    """Time `case` and its --before `twin` in alternating runs (ABBA...: who
    goes first swaps each round), each run prepared as if it were alone, so
    drift and load on the machine fall on both alike."""
    results = [Result(case, []), Result(twin, [])]
    for i in range(runs):
        for r in (results if i % 2 == 0 else results[::-1]):
            time_run(r, wd, i, runs, cold)
    return results


def json_summary(case: Case, wd: Workdir) -> dict | None:
    """One extra, untimed run of a blocksync case with --json instead of -q;
    returns its summary (or None if it printed none)."""
    argv = ["--json" if a == "-q" else a for a in case_argv(case, wd)]
    prepare(case, wd)
    cp = run(argv, stdout=subprocess.PIPE)
    verify_case(case, wd, f"{case.key} --json run")
    try:
        return json.loads(cp.stdout)
    except ValueError:
        log(f"  {case.key}: --json printed no JSON: {cp.stdout[:200]!r}")
        return None


# --------------------------------------------------------------------------
# groups of cases and their targets
# --------------------------------------------------------------------------

def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


@dataclass
class Group:
    """Cases timed on the same data, shown in one table.

    The first case is the reference for the ratio column.  `targets` turns the
    results (by key) into the lines printed under the table, followed by
    `notes` and by the lines `after` returns (it runs after the timing).
    `name` files the results for the issue-15 summary (`-cold` appended when
    the group ran cold); `cold` drops the page cache before each run.
    """
    title: str
    cases: list[Case]
    targets: Callable[[dict[str, Result]], list[str]]
    notes: list[str] = field(default_factory=list)
    after: Callable[[Workdir, dict[str, Result]], list[str]] | None = None
    lo_unit: tuple[str, int] = ("MB", MB)     # unit of the table's loopback column
    twins: dict[str, Case] = field(default_factory=dict)  # --before case by the key of its case
    pair_names: tuple[str, str] | None = ("after", "before")  # a case / its twin; None: no lines
    cpu_column: bool = True                   # show the median machine CPU seconds
    name: str = ""                            # key of the results for the issue-15 summary
    cold: bool = False                        # page cache dropped before each run (--cold-too)

    @property
    def measured_name(self) -> str:
        """`name`, with `-cold` when its runs start from a dropped page cache."""
        return f"{self.name}-cold" if self.name and (self.cold or COLD) else self.name


def cold_copy(group: Group) -> Group:
    """`group` again with the page cache dropped before each timed run
    (--cold-too): the same cases and --before twins; no target lines of its own
    (the issue-15 summary compares the cold figures) and no untimed extra runs."""
    return dataclasses.replace(
        group, title=f"cold cache: {group.title}", cold=True,
        targets=lambda by: [], after=None,
        notes=["page cache dropped (sync; echo 3 > /proc/sys/vm/drop_caches) before each "
               "timed run, after the usual preparation"])


def before_args(args: argparse.Namespace) -> argparse.Namespace:
    """A copy of `args` that builds the cases with the --before binary."""
    return argparse.Namespace(**{**vars(args), "bin": args.before, "variant": "-before"})


def before_case(case: Case) -> Case:
    """`case` renamed as the --before binary's: key `push-before`, label
    `(d') blocksync before src benchhost:dst (push)`."""
    label = re.sub(r"^\((\w+)\)", r"(\1')", case.label, count=1)
    label = label.replace("blocksync", "blocksync before", 1)
    return dataclasses.replace(case, key=f"{case.key}-before", label=label)


def add_twins(group: Group, other: Group, bin_path: Path, wd: Workdir) -> Group:
    """Pair each case of `group` that runs `bin_path` with the case in the same
    place of `other` (the same group built with the --before binary)."""
    for case, twin in zip(group.cases, other.cases):
        if str(bin_path) in case.argv(wd):
            group.twins[case.key] = before_case(twin)
    return group


def pair_lines(results: list[Result], group: Group) -> list[str]:
    """after / before of the median wall time and of the machine's median CPU
    seconds, one line per pair."""
    by = {r.case.key: r for r in results}
    lines = []
    if group.pair_names is None:
        return lines
    a_name, b_name = group.pair_names
    for key, twin in group.twins.items():
        if key in by and twin.key in by:
            a, b = by[key], by[twin.key]
            x = a.median / b.median
            cpu = ""
            if a.cpu_median and b.cpu_median:
                cpu = (f"; CPU {a.cpu_median:.2f} s / {b.cpu_median:.2f} s = "
                       f"{a.cpu_median / b.cpu_median:.2f}")
            lines.append(f"{a_name} / {b_name} = {x:.2f} ({key}){cpu}")
    return lines


def local_targets(by: dict[str, Result]) -> list[str]:
    lines = []
    if "blocksync" in by and "read" in by:
        x = by["blocksync"].median / by["read"].median
        lines.append(f"blocksync / read  = {x:.2f} (target <= {TARGET_VS_READ:.2f}) "
                     f"{verdict(x <= TARGET_VS_READ)}")
    if "blocksync" in by and "rsync" in by:
        y = by["blocksync"].median / by["rsync"].median
        lines.append(f"blocksync / rsync = {y:.2f} (target <= {TARGET_VS_RSYNC:.2f}) "
                     f"{verdict(y <= TARGET_VS_RSYNC)}")
    return lines


def local_group(args: argparse.Namespace) -> Group:
    return Group("local: SRC DST on this machine",
                 [case_read(), case_blocksync(args.bin), case_rsync()], local_targets,
                 name="local")


def lo_text(r: Result) -> str:
    """Median loopback MB of a result, with the spread when runs differ."""
    if not r.lo:
        return "n/a"
    lo, hi = min(r.lo) / MB, max(r.lo) / MB
    spread = f" (runs {lo:.2f}..{hi:.2f})" if hi - lo >= 0.01 else ""
    return f"{r.lo_median / MB:.2f} MB{spread}"


def ssh_targets(by: dict[str, Result]) -> list[str]:
    lines = []
    for key, name in (("push", "blocksync-ssh push"), ("pull", "blocksync-ssh pull")):
        if key not in by:
            continue
        r = by[key]
        if "read" in by:
            x = r.median / by["read"].median
            lines.append(f"{name} {'/ read':<11} = {x:.2f} (target <= {TARGET_SSH_VS_READ:.2f}) "
                         f"{verdict(x <= TARGET_SSH_VS_READ)}")
        if "rsync-ssh" in by:
            y = r.median / by["rsync-ssh"].median
            lines.append(f"{name} {'/ rsync-ssh':<11} = {y:.2f} (target <= {TARGET_SSH_VS_RSYNC:.2f}) "
                         f"{verdict(y <= TARGET_SSH_VS_RSYNC)}")
        if r.lo:
            ok = r.lo_median / MB < TARGET_SSH_LO_MB
            lines.append(f"{name} {'loopback':<11} = {lo_text(r)} "
                         f"(target < {TARGET_SSH_LO_MB} MB) {verdict(ok)}")
        if r.lo and key == "push":
            ok = r.lo_median / MB <= TARGET_SSH_PUSH_LO_MB
            lines.append(f"{name} {'loopback':<11} = {r.lo_median / MB:.3f} MB "
                         f"(target <= {TARGET_SSH_PUSH_LO_MB:.2f} MB, issue 5) {verdict(ok)}")
    if "rsync-ssh" in by and by["rsync-ssh"].lo:
        lines.append(f"{'rsync-ssh loopback':<30} = {lo_text(by['rsync-ssh'])} (for comparison)")
    return lines


def ssh_after(cases: list[Case]) -> Callable[[Workdir, dict[str, Result]], list[str]]:
    """Extra --json runs of the blocksync cases: what blocksync itself counted."""
    def after(wd: Workdir, by: dict[str, Result]) -> list[str]:
        lines = []
        for case in cases:
            log(f"  {case.key}: one more run with --json for its byte counts ...")
            s = json_summary(case, wd)
            if not s:
                continue
            try:
                lines.append(
                    f"{case.key} --json: bytes_sent {s['bytes_sent'] / MB:.2f} MB, "
                    f"bytes_received {s['bytes_received'] / MB:.2f} MB, "
                    f"{s['blocks_changed']} of {s['blocks_total']} blocks changed, "
                    f"bytes_written {s['bytes_written'] / MB:.2f} MB, "
                    f"elapsed_seconds {s['elapsed_seconds']:.3f}")
            except (KeyError, TypeError):
                lines.append(f"{case.key} --json: {json.dumps(s)}")
        return lines
    return after


def ssh_group(args: argparse.Namespace, sshd: Sshd) -> Group:
    push, pull = case_push(args.bin, sshd), case_pull(args.bin, sshd)
    return Group(f"ssh: changed blocks over loopback sshd (127.0.0.1:{sshd.port}, "
                 f"{sshd.cipher})",
                 [case_read(), push, pull, case_rsync_ssh(sshd)], ssh_targets,
                 after=ssh_after([push, pull]), name="ssh")


def many_group(args: argparse.Namespace, sshd: Sshd, offsets: list[int]) -> Group:
    """Many scattered 4 KiB random writes (dst.many.orig): blocksync push vs
    rsync -z over ssh, and a plain read for reference."""
    def setup(wd: Workdir) -> None:
        restore_dst(wd, wd.dst_many_orig)
        warm(wd.src, wd.dst)

    read = case_read()
    read.label = "(m0) cat src dst >/dev/null"
    push = Case("blocksync", "(m1) blocksync src benchhost:dst (push)",
                lambda wd: blocksync_ssh(args.bin, sshd, str(wd.src), f"{HOST}:{wd.dst}"),
                net=True, setup=setup)
    rsync_z = Case("rsync-z", "(m2) rsync --inplace --no-whole-file -z -e ssh",
                   lambda wd: [RSYNC, "--inplace", "--no-whole-file", "-z", "-e", sshd.rsh,
                               str(wd.src), f"{HOST}:{wd.dst}"],
                   net=True, setup=setup)

    n = len(offsets)
    # 4 KiB pieces and 1 MiB blocks the writes touch (a write may straddle two).
    pieces = {p for o in offsets for p in range(o // CHANGE_SIZE,
                                                 (o + CHANGE_SIZE - 1) // CHANGE_SIZE + 1)}
    blocks = {o // BLOCK_SIZE for o in offsets} | {(o + CHANGE_SIZE - 1) // BLOCK_SIZE
                                                   for o in offsets}
    total_blocks = -(-args.size // BLOCK_SIZE)
    notes = [f"the writes touch {len(pieces)} 4 KiB pieces ({len(pieces) * CHANGE_SIZE / MB:.2f} MB) "
             f"in {len(blocks)} of {total_blocks} 1 MiB blocks"]

    def targets(by: dict[str, Result]) -> list[str]:
        lines = []
        b, r = by.get("blocksync"), by.get("rsync-z")
        if b and r and b.lo and r.lo:
            x, y = b.lo_median / MB, r.lo_median / MB
            lines.append(f"blocksync bytes < rsync -z bytes: {x:.2f} MB vs {y:.2f} MB "
                         f"({x / y:.2f} x) {verdict(x < y)}")
        if b and r:
            lines.append(f"blocksync time < rsync -z time: {b.median:.3f} s vs {r.median:.3f} s "
                         f"({b.median / r.median:.2f} x) {verdict(b.median < r.median)}")
        if b and "read" in by:
            lines.append(f"blocksync / read = {b.median / by['read'].median:.2f} (info)")
        return lines

    def after(wd: Workdir, by: dict[str, Result]) -> list[str]:
        log(f"  {push.key}: one more run with --json for its byte counts ...")
        s = json_summary(push, wd)
        if not s:
            return []
        fields = ("bytes_sent", "bytes_received", "data_sent", "digests_sent",
                  "data_received", "digests_received")
        try:
            return [f"{push.key} --json: "
                    + ", ".join(f"{k} {s[k]} ({s[k] / MB:.3f} MB)" for k in fields)
                    + f", blocks_changed {s['blocks_changed']} of {s['blocks_total']}, "
                    f"bytes_written {s['bytes_written']} ({s['bytes_written'] / MB:.2f} MB)"]
        except (KeyError, TypeError):
            return [f"{push.key} --json: {json.dumps(s)}"]

    return Group(f"many: {n} scattered 4 KiB random writes in {human(args.size)} over loopback "
                 f"sshd (127.0.0.1:{sshd.port}, {sshd.cipher})",
                 [read, push, rsync_z], targets, notes=notes, after=after)


def first_copy_group(args: argparse.Namespace, sshd: Sshd) -> Group:
    size = args.size

    def targets(by: dict[str, Result]) -> list[str]:
        if "cat-ssh" not in by:
            return []
        base = by["cat-ssh"].median
        lines = ["throughput: " + ", ".join(
            f"{k} {size / MB / r.median:.0f} MB/s" for k, r in by.items())]
        if "cat-ssh-sync" in by and "first" in by:
            x = by["cat-ssh-sync"].median / by["first"].median
            lines.append(f"first / (cat-ssh && sync) throughput = {x:.2f} (informational: "
                         "blocksync flushes the copy to disk before it exits, cat does not)")
        for key, target, strict in (("first", TARGET_FIRST_COPY, False),
                                    ("first-w2", TARGET_FIRST_COPY_W2, True)):
            if key not in by:
                continue
            x = base / by[key].median      # throughput ratio = inverse time ratio
            ok = x > target if strict else x >= target
            rel = ">" if strict else ">="
            lines.append(f"{key} / cat-ssh throughput = {x:.2f} "
                         f"(target {rel} {target:.2f}) {verdict(ok)}")
        return lines

    return Group(f"first copy: {human(size)} src to a missing destination over ssh",
                 [case_cat_ssh(sshd), case_cat_ssh_sync(sshd),
                  case_first_copy(args.bin, sshd, 1),
                  case_first_copy(args.bin, sshd, 2)], targets, name="first-copy")


def latency_group(args: argparse.Namespace, sshd: Sshd) -> Group:
    d = args.delay_ms
    rtt = 2 * d
    blocks = -(-args.size // BLOCK_SIZE)

    def targets(by: dict[str, Result]) -> list[str]:
        lines = []
        if "slow" in by and "direct" in by:
            x = by["slow"].median / by["direct"].median
            lines.append(f"push at {rtt:g} ms RTT / direct = {x:.2f} "
                         f"(target <= {TARGET_LATENCY:.2f}, informational) "
                         f"{verdict(x <= TARGET_LATENCY)}")
        if "slow" in by and "proxy-0" in by:
            x = by["slow"].median / by["proxy-0"].median
            lines.append(f"push at {rtt:g} ms RTT / proxy at 0 ms = {x:.2f} "
                         "(without the proxy's own cost)")
        if "slow" in by and "direct" in by:
            lines.append(f"added by the delay: {by['slow'].median - by['direct'].median:.2f} s; "
                         f"one round trip per block (lock-step, like blocksync.py) would add "
                         f"{blocks} x {rtt:g} ms = {blocks * rtt / 1000:.1f} s")
        return lines

    return Group(f"latency: push of the changed blocks through a proxy delaying "
                 f"{d:g} ms each way",
                 [case_push(args.bin, sshd, "direct", HOST,
                            "(j) blocksync push, direct"),
                  case_push(args.bin, sshd, "proxy-0", HOST_PROXY,
                            "(k) blocksync push, proxy 0 ms"),
                  case_push(args.bin, sshd, "slow", HOST_SLOW,
                            f"(l) blocksync push, proxy {d:g} ms each way")],
                 targets,
                 notes=["loopback bytes through the proxy count twice (ssh -> proxy -> sshd)"])


# --------------------------------------------------------------------------
# undo journal (issue 13): --journal vs --no-journal, and first copies
# --------------------------------------------------------------------------

TARGET_JOURNAL_FEW = 1.05      # 10 scattered 4 KiB changes: journal / no-journal time, <=
TARGET_JOURNAL_MANY = 1.3      # 30% changed: journal / no-journal time, <=
TARGET_JOURNAL_SIZE = 1.1      # journal bytes / bytes overwritten (10 changes), <=
TARGET_FIRST_VS_BEFORE = 1.05  # first copy: after / before time ("as fast as before"), <=


def undo_files(dst: Path) -> list[Path]:
    """The undo journals beside `dst` (`.NAME.blocksync-undo.*`, also half-made ones)."""
    prefix = f".{dst.name}.blocksync-undo."
    return sorted(p for p in dst.parent.iterdir() if p.name.startswith(prefix))


def remove_undo_files(dst: Path) -> None:
    for p in undo_files(dst):
        p.unlink(missing_ok=True)


def check_no_undo(wd: Workdir, what: str) -> None:
    """After a completed run: dst == src and no journal left beside dst."""
    verify_same(wd.src, wd.dst, what)
    left = undo_files(wd.dst)
    if left:
        sys.exit(f"bench: {what} completed but left journal(s) behind: "
                 + ", ".join(p.name for p in left))


class JournalWatch:
    """While open, polls dst's directory (every ~1 ms) for undo journals and keeps
    the largest size seen: a push journals on the server, which here is this
    machine, and reports no journal_bytes.  A lower bound: the last group commit
    may come and go between two looks."""

    def __init__(self, dst: Path):
        self.dst, self.seen, self.max = dst, False, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            for p in undo_files(self.dst):
                try:
                    size = p.stat().st_size
                except OSError:
                    continue                  # removed between listing and stat
                self.seen, self.max = True, max(self.max, size)
            time.sleep(0.001)

    def __enter__(self) -> "JournalWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def generate_fraction(wd: Workdir, size: int, fraction: float, unit: int,
                      seed: int) -> tuple[Path, int]:
    """`dst.frac.orig` = src with `fraction` of its `unit` pieces (1 MiB blocks
    or 4 KiB pieces, a seeded random choice scattered over the file) overwritten
    with random bytes; returns the file and the number of pieces changed."""
    slots = size // unit
    count = max(1, round(slots * fraction))
    path = wd.path("dst.frac.orig")
    log(f"journal: {path} = src with {count} of {slots} {human(unit)} pieces changed ...")
    t0 = time.perf_counter()
    copy_file(wd.src, path)
    rng = random.Random(seed + 13)
    with open(path, "r+b") as f:
        for i in sorted(rng.sample(range(slots), count)):
            f.seek(i * unit)
            f.write(os.urandom(unit))
    sync_disks()
    log(f"  done in {time.perf_counter() - t0:.1f} s")
    return path, count


def journal_case(args: argparse.Namespace, sshd: Sshd | None, scen: str, orig: Path,
                 journal: bool) -> Case:
    """blocksync --journal (or --no-journal) re-syncing dst from `orig`, locally or
    (with `sshd`) as a push.  Before each run: journals beside dst removed, dst
    restored from `orig`, sync, both files read; after it: cmp and no journal left."""
    flag = "--journal" if journal else "--no-journal"
    where = "push" if sshd else "local"
    key = f"{where}-{scen}" + ("" if journal else "-nj")
    n = ("j2" if sshd else "j1") + ("" if journal else "'")
    label = f"({n}) blocksync {flag} " + ("src benchhost:dst (push)" if sshd else "src dst (local)")

    def argv(wd: Workdir) -> list[str]:
        if sshd:
            return blocksync_ssh(args.bin, sshd, str(wd.src), f"{HOST}:{wd.dst}", (flag,))
        return [str(args.bin), "-f", "-q", "--no-progress", flag, str(wd.src), str(wd.dst)]

    def setup(wd: Workdir) -> None:
        remove_undo_files(wd.dst)
        restore_dst(wd, orig)
        warm(wd.src, wd.dst)

    return Case(key, label, argv, net=bool(sshd), setup=setup,
                check=lambda wd: check_no_undo(wd, f"{key} ({flag})"),
                journal_default=False)


def journal_facts(case: Case, wd: Workdir) -> tuple[dict | None, JournalWatch]:
    """One untimed --json run of `case`, watching dst's directory for journals."""
    log(f"  {case.key}: one more run with --json, watching for journals ...")
    with JournalWatch(wd.dst) as watch:
        s = json_summary(case, wd)
    return s, watch


def journal_size_lines(pairs: list[tuple[Case, Case]], wd: Workdir,
                       size_target: float | None) -> list[str]:
    """journal_bytes / bytes_written of each --journal case (from --json); a push
    by a binary that reports none gets what was seen beside dst and the local
    figure for the same data. And: its --no-journal twin made no journal."""
    lines, local_ratio = [], None
    for j, nj in pairs:
        s, watch = journal_facts(j, wd)
        if not s:
            continue
        written, jb = s.get("bytes_written"), s.get("journal_bytes")
        seen = (f"journal file beside dst while running: up to {watch.max} B seen "
                "(header included; polled, a lower bound)"
                if watch.seen else "no journal file seen beside dst while running")
        if jb is not None and written:
            local_ratio = jb / written
            ok = "" if size_target is None else (
                f" (target <= {size_target:.2f}) {verdict(local_ratio <= size_target)}")
            lines.append(f"{j.key} --json: bytes_written {written}, journal_bytes {jb} "
                         f"= {local_ratio:.3f} x{ok}; {seen}")
        else:
            same = ""
            if local_ratio is not None:
                ok = "" if size_target is None else (
                    f" (target <= {size_target:.2f}) {verdict(local_ratio <= size_target)}")
                same = (f"; the server journals with the same code: the local run on "
                        f"the same data journaled {local_ratio:.3f} x bytes_written{ok}")
            lines.append(f"{j.key} --json: bytes_written {written}, journal_bytes "
                         f"{json.dumps(jb)} (kept by the server); {seen}{same}")
        s, watch = journal_facts(nj, wd)
        jb = s.get("journal_bytes") if s else None
        lines.append(f"{nj.key} --json: journal_bytes {json.dumps(jb)}; "
                     + (f"a journal was seen ({watch.max} B)!" if watch.seen
                        else "no journal seen beside dst"))
    return lines


def journal_group(args: argparse.Namespace, sshd: Sshd | None, scen: str, what: str,
                  orig: Path, target: float, size_target: float | None) -> Group:
    """--journal vs --no-journal (the same binary, alternating runs) on the re-sync
    of `orig`'s changes, locally and (with `sshd`) as a push."""
    pairs = [(journal_case(args, s, scen, orig, True), journal_case(args, s, scen, orig, False))
             for s in ((None, sshd) if sshd else (None,))]

    def targets(by: dict[str, Result]) -> list[str]:
        lines = []
        for j, nj in pairs:
            if j.key not in by or nj.key not in by:
                continue
            a, b = by[j.key], by[nj.key]
            x = a.median / b.median
            cpu = ""
            if a.cpu_median and b.cpu_median:
                cpu = (f", CPU {a.cpu_median:.2f} s / {b.cpu_median:.2f} s = "
                       f"{a.cpu_median / b.cpu_median:.2f}")
            lines.append(f"{j.key}: journal / no-journal = {x:.2f} ({a.median:.3f} s / "
                         f"{b.median:.3f} s){cpu} (target: time <= {target:.2f}) "
                         f"{verdict(x <= target)}")
        return lines

    return Group(f"journal: --journal vs --no-journal, {what}", [j for j, _ in pairs],
                 targets, twins={j.key: nj for j, nj in pairs}, pair_names=None,
                 cpu_column=True,
                 notes=["before each run: journals beside dst removed, dst restored, sync, "
                        "both files read; after it: cmp, and no journal may remain"],
                 after=lambda wd, by: journal_size_lines(pairs, wd, size_target))


def journal_groups(args: argparse.Namespace, wd: Workdir, sshd: Sshd | None) -> list[Group]:
    """The re-sync groups: 10 scattered 4 KiB changes (dst.orig), and
    --journal-changed of the --journal-unit pieces (dst.frac.orig)."""
    few = journal_group(args, sshd, "few", f"{args.changes} scattered 4 KiB changes",
                        wd.dst_orig, TARGET_JOURNAL_FEW, TARGET_JOURNAL_SIZE)
    orig, count = generate_fraction(wd, args.size, args.journal_changed, args.journal_unit,
                                    args.seed)
    pct = f"{args.journal_changed:.0%}"
    unit = "1 MiB blocks" if args.journal_unit == BLOCK_SIZE else f"{human(args.journal_unit)} pieces"
    many = journal_group(args, sshd, "frac",
                         f"{pct} changed ({count} scattered whole {unit}, random data)",
                         orig, TARGET_JOURNAL_MANY, None)
    return [few, many]


def journal_first_group(args: argparse.Namespace, sshd: Sshd | None) -> Group:
    """A first copy (to a missing destination) with blocksync's default journal
    choice, locally and pushed: a new destination gets no journal.  With
    --before, each is timed against the --before binary."""
    def setup(wd: Workdir) -> None:
        wd.dst.unlink(missing_ok=True)
        remove_undo_files(wd.dst)
        sync_disks()
        warm(wd.src)

    local = Case("first-local", "(n1) blocksync src new (local first copy)",
                 lambda wd: [str(args.bin), "-f", "-q", "--no-progress",
                             str(wd.src), str(wd.dst)],
                 setup=setup, check=lambda wd: check_no_undo(wd, "first-local"),
                 journal_default=False)
    cases = [local]
    if sshd:
        cases.append(Case("first-push", "(n2) blocksync src benchhost:new (push first copy)",
                          lambda wd: blocksync_ssh(args.bin, sshd, str(wd.src),
                                                   f"{HOST}:{wd.dst}"),
                          net=True, setup=setup,
                          check=lambda wd: check_no_undo(wd, "first-push"),
                          journal_default=False))
    size = args.size

    def targets(by: dict[str, Result]) -> list[str]:
        lines = ["throughput: " + ", ".join(f"{k} {size / MB / r.median:.0f} MB/s"
                                            for k, r in by.items())]
        for case in cases:
            b = by.get(f"{case.key}-before")
            if case.key in by and b:
                x = by[case.key].median / b.median
                lines.append(f"{case.key}: as fast as before (after / before = {x:.2f}, "
                             f"target <= {TARGET_FIRST_VS_BEFORE:.2f}) "
                             f"{verdict(x <= TARGET_FIRST_VS_BEFORE)}")
        return lines

    def after(wd: Workdir, by: dict[str, Result]) -> list[str]:
        lines = []
        for case in cases:
            s, watch = journal_facts(case, wd)
            if s:
                lines.append(f"{case.key} --json: destination_created "
                             f"{json.dumps(s.get('destination_created'))}, journal_bytes "
                             f"{json.dumps(s.get('journal_bytes'))}; "
                             + (f"a journal was seen ({watch.max} B)" if watch.seen
                                else "no journal seen beside dst"))
        return lines

    return Group(f"journal: first copy of {human(size)} to a missing destination "
                 "(default journal choice)", cases, targets, cpu_column=True, after=after,
                 notes=["before each run: dst and any journal beside it removed, sync, "
                        "src read; after it: cmp, and no journal may remain"])


# --------------------------------------------------------------------------
# sparse files (issue 4): new copies and a re-sync of a large sparse file
# --------------------------------------------------------------------------

SPARSE_EXTENT = 4 * MiB      # size of each data extent of sp.src
PAGE = 4 * KiB               # extents and changes are aligned to this
ZEROS = bytes(CHUNK)


def data_extents_fd(fd: int, size: int) -> list[tuple[int, int]]:
    """The data ranges [start, end) of an open file, via SEEK_DATA/SEEK_HOLE."""
    out = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:      # no data after pos
                break
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        if end <= start:
            break
        out.append((start, end))
        pos = end
    return out


def data_extents(path: Path) -> list[tuple[int, int]]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return data_extents_fd(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def read_extents(*paths: Path, align: int = 1) -> int:
    """Read every data extent of each file once (4 MiB preadv into one reused
    buffer, holes skipped); return the bytes read.  The re-sync baseline:
    what any tool has to read at least.  With `align`, each extent is widened
    to `align` boundaries first (see SparseData.warm)."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    total = 0
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            spans: list[tuple[int, int]] = []
            for start, end in data_extents_fd(fd, size):
                start, end = start // align * align, min(-(-end // align) * align, size)
                if spans and start <= spans[-1][1]:
                    spans[-1] = (spans[-1][0], max(end, spans[-1][1]))
                else:
                    spans.append((start, end))
            for start, end in spans:
                pos = start
                while pos < end:
                    n = os.preadv(fd, [view[:min(CHUNK, end - pos)]], pos)
                    if n <= 0:
                        break
                    pos += n
                    total += n
        finally:
            os.close(fd)
    return total


def allocated(path: Path) -> int:
    """Bytes allocated on disk (st_blocks * 512)."""
    return os.stat(path).st_blocks * 512


def subtract_ranges(a: list[tuple[int, int]],
                    b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Parts of the sorted, disjoint ranges `a` not covered by those of `b`."""
    out = []
    j = 0
    for start, end in a:
        pos = start
        while j < len(b) and b[j][1] <= pos:
            j += 1
        k = j
        while pos < end and k < len(b) and b[k][0] < end:
            if b[k][0] > pos:
                out.append((pos, b[k][0]))
            pos = max(pos, b[k][1])
            k += 1
        if pos < end:
            out.append((pos, end))
    return out


def verify_sparse_copy(src: Path, dst: Path, what: str) -> int:
    """Check that dst reads the same as src without reading their holes: equal
    sizes, equal bytes over src's data extents, and zeros wherever dst has data
    outside them.  Stops the benchmark on a difference; returns the bytes of
    data dst has outside src's extents (0 when dst is as sparse as src)."""
    def fail(msg: str) -> None:
        sys.exit(f"bench: VERIFY FAILED after {what}: {dst} differs from {src}: {msg}")

    fs, fd = os.open(src, os.O_RDONLY), os.open(dst, os.O_RDONLY)
    try:
        size = os.fstat(fs).st_size
        if os.fstat(fd).st_size != size:
            fail(f"size {os.fstat(fd).st_size} != {size}")
        src_ext, dst_ext = data_extents_fd(fs, size), data_extents_fd(fd, size)
        for start, end in src_ext:
            pos = start
            while pos < end:
                n = min(CHUNK, end - pos)
                a, b = os.pread(fs, n, pos), os.pread(fd, n, pos)
                if a != b:
                    i = next((k for k in range(min(len(a), len(b))) if a[k] != b[k]),
                             min(len(a), len(b)))
                    fail(f"first difference at byte {pos + i}")
                pos += n
        outside = subtract_ranges(dst_ext, src_ext)
        for start, end in outside:
            pos = start
            while pos < end:
                n = min(CHUNK, end - pos)
                b = os.pread(fd, n, pos)
                if b != ZEROS[:len(b)]:
                    fail(f"non-zero data at {pos}..{pos + n} where src has a hole")
                pos += n
        return sum(e - s for s, e in outside)
    finally:
        os.close(fs)
        os.close(fd)


@dataclass
class SparseData:
    """The sparse source, where its data is, and the re-sync changes."""
    src: Path
    dst: Path
    cp: Path
    size: int
    data: int
    extents: list[tuple[int, int]]                  # as written
    outside: dict[Path, int] = field(default_factory=dict)   # from the last verify
    changes: list[tuple[int, bytes]] = field(default_factory=list)  # (offset, dst's bytes)

    def describe(self) -> str:
        return (f"{human(self.size)} sparse file, {human(self.data)} of random data in "
                f"{len(self.extents)} extents of {human(SPARSE_EXTENT)} at 4 KiB-aligned offsets")

    def verify(self, dst: Path, what: str) -> None:
        self.outside[dst] = verify_sparse_copy(self.src, dst, what)

    def warm(self, *paths: Path) -> None:
        """sync, then read the data of `paths` widened to blocksync's 1 MiB
        blocks: blocksync reads whole blocks, so the hole part of a block at
        an extent's edge is read too, and the kernel's first read of a hole
        fills the page cache with zero pages, which costs noticeably (on a
        fresh copy: +0.5 s for 2 x 256 MiB).  Warming only the exact extents
        would leave that to blocksync's first timed run."""
        sync_disks()
        read_extents(*paths, align=BLOCK_SIZE)


def generate_sparse(wd: Workdir, size: int, data: int, seed: int) -> SparseData:
    """sp.src: a `size` file with `data` bytes of random data in 4 MiB extents,
    one per equal slot of the file at a random 4 KiB-aligned (never 1 MiB-
    aligned) position inside its slot, holes elsewhere."""
    count = -(-data // SPARSE_EXTENT)
    slot = size // count // PAGE * PAGE
    if count < 1 or slot < SPARSE_EXTENT + 4 * PAGE:
        sys.exit(f"bench: --sparse-size {human(size)} is too small for "
                 f"{count} extents of {human(SPARSE_EXTENT)} (--sparse-data {human(data)})")
    rng = random.Random(seed + 4)
    extents = []
    for i in range(count):
        length = min(SPARSE_EXTENT, data - i * SPARSE_EXTENT)
        # keep a page of hole at both ends of the slot, so extents never merge
        pages = (slot - length) // PAGE - 2
        off = i * slot + PAGE * (1 + rng.randrange(pages + 1))
        if off % MiB == 0:
            off += PAGE if off + PAGE + length <= (i + 1) * slot - PAGE else -PAGE
        extents.append((off, off + length))
    sp = SparseData(wd.path("sp.src"), wd.path("sp.dst"), wd.path("sp.cp"),
                    size, data, extents)
    log(f"sparse: generating {sp.describe()} ...")
    t0 = time.perf_counter()
    fd = os.open(sp.src, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        for start, end in extents:
            os.pwrite(fd, os.urandom(end - start), start)
        os.fsync(fd)
    finally:
        os.close(fd)
    sync_disks()
    found = data_extents(sp.src)
    if found != extents:
        log(f"  warning: SEEK_DATA reports {len(found)} extents "
            f"({sum(e - s for s, e in found)} bytes), not the {len(extents)} written")
    log(f"  done in {time.perf_counter() - t0:.1f} s; {allocated(sp.src) / MiB:.1f} MiB allocated")
    return sp


def alloc_lines(sp: SparseData, copies: list[tuple[str, Path]]) -> list[str]:
    """Allocated sizes of sp.src and the copies, and the <= 5% target per copy."""
    sync_disks()
    a_src = allocated(sp.src)
    parts = [f"sp.src {a_src / MiB:.1f} MiB"]
    lines = []
    for name, path in copies:
        if not path.exists():
            continue
        a = allocated(path)
        parts.append(f"{name} {a / MiB:.1f} MiB")
        x = a / a_src - 1
        out = sp.outside.get(path)
        extra = f"; {out / MiB:.1f} MiB of data outside sp.src's extents" if out is not None else ""
        lines.append(f"{name} allocated / sp.src allocated = {a / a_src:.3f} "
                     f"(target within {TARGET_SPARSE_ALLOC:.0%}) "
                     f"{verdict(abs(x) <= TARGET_SPARSE_ALLOC)}{extra}")
    return ["allocated (st_blocks x 512): " + ", ".join(parts)] + lines


def sparse_new_group(args: argparse.Namespace, sp: SparseData) -> Group:
    """Case A: a new local copy of the sparse file, cp --sparse=always vs blocksync."""
    def fresh(path: Path) -> Callable[[Workdir], None]:
        def setup(wd: Workdir) -> None:
            path.unlink(missing_ok=True)
            sp.warm(sp.src)
        return setup

    cp = Case("cp", "(a) cp --sparse=always sp.src sp.cp",
              lambda wd: ["cp", "--sparse=always", str(sp.src), str(sp.cp)],
              setup=fresh(sp.cp), check=lambda wd: sp.verify(sp.cp, "cp --sparse=always"))
    # blocksync fsyncs the destination before it exits, cp does not: the same
    # copy with its fsync, for a like-for-like (informational) ratio
    cp_sync = Case("cp-fsync", "(a2) cp --sparse=always sp.src sp.cp && sync sp.cp",
                   lambda wd: ["sh", "-c", f"cp --sparse=always {shlex.quote(str(sp.src))} "
                               f"{shlex.quote(str(sp.cp))} && sync {shlex.quote(str(sp.cp))}"],
                   setup=fresh(sp.cp), check=lambda wd: sp.verify(sp.cp, "cp && sync"))
    bs = Case("blocksync", "(b) blocksync -f -q --no-progress sp.src sp.dst",
              lambda wd: [str(args.bin), "-f", "-q", "--no-progress", str(sp.src), str(sp.dst)],
              setup=fresh(sp.dst), check=lambda wd: sp.verify(sp.dst, "blocksync (new copy)"))

    def targets(by: dict[str, Result]) -> list[str]:
        if "cp" not in by or "blocksync" not in by:
            return []
        x = by["blocksync"].median / by["cp"].median
        lines = [f"blocksync / cp = {x:.2f} (target <= {TARGET_SPARSE_VS_CP:.2f}) "
                 f"{verdict(x <= TARGET_SPARSE_VS_CP)}"]
        if "cp-fsync" in by:
            y = by["blocksync"].median / by["cp-fsync"].median
            lines.append(f"blocksync / (cp && sync) = {y:.2f} (informational: blocksync "
                         "fsyncs the copy before it exits, cp does not)")
        return lines

    return Group(f"sparse A: new local copy of a {sp.describe()}", [cp, cp_sync, bs], targets,
                 notes=["before each run: the copy removed, sync, sp.src's data extents read "
                        "(widened to 1 MiB blocks); after it: sizes, data extents and holes "
                        "compared"],
                 after=lambda wd, by: alloc_lines(sp, [("sp.cp", sp.cp), ("sp.dst", sp.dst)]),
                 name="sparse-new")


def sparse_ssh_group(args: argparse.Namespace, sp: SparseData, sshd: Sshd) -> Group:
    """Case B: the sparse file to a missing destination over the loopback sshd."""
    def setup(wd: Workdir) -> None:
        sp.dst.unlink(missing_ok=True)
        sp.warm(sp.src)

    push = Case("ssh-new", "(e) blocksync sp.src benchhost:sp.dst (new)",
                lambda wd: blocksync_ssh(args.bin, sshd, str(sp.src), f"{HOST}:{sp.dst}"),
                net=True, setup=setup,
                check=lambda wd: sp.verify(sp.dst, "blocksync over ssh (new copy)"))
    limit = TARGET_SPARSE_LO * sp.data

    def targets(by: dict[str, Result]) -> list[str]:
        r = by.get("ssh-new")
        if r is None or not r.lo:
            return []
        lo, hi = min(r.lo) / GiB, max(r.lo) / GiB
        spread = f" (runs {lo:.3f}..{hi:.3f})" if hi - lo >= 0.001 else ""
        return [f"loopback bytes = {r.lo_median / GiB:.3f} GiB{spread} "
                f"(target <= {limit / GiB:.3f} GiB = {TARGET_SPARSE_LO:.2f} x data) "
                f"{verdict(r.lo_median <= limit)}",
                f"throughput: {sp.data / MB / r.median:.0f} MB/s of data, "
                f"{sp.size / GiB / r.median:.1f} GiB/s of file"]

    def after(wd: Workdir, by: dict[str, Result]) -> list[str]:
        return alloc_lines(sp, [("sp.dst", sp.dst)]) + ssh_after([push])(wd, by)

    return Group(f"sparse B: new copy over loopback sshd (127.0.0.1:{sshd.port}, "
                 f"{sshd.cipher})", [push], targets, after=after, lo_unit=("GiB", GiB))


def sparse_resync_setup(args: argparse.Namespace, sp: SparseData, changes: int,
                        seed: int) -> None:
    """Make sp.dst a synced copy, then change `changes` 4 KiB pieces of sp.src
    inside its data extents, remembering the old bytes (= sp.dst's)."""
    if not sp.dst.exists():
        log("sparse C: making sp.dst (blocksync, untimed) ...")
        run([str(args.bin), "-f", "-q", "--no-progress", str(sp.src), str(sp.dst)])
    sp.verify(sp.dst, "the copy for the re-sync")
    extents = data_extents(sp.src)
    rng = random.Random(seed + 5)
    picks = sorted(rng.sample(range(len(extents)), min(changes, len(extents))))
    while len(picks) < changes:                  # fewer extents than changes
        picks.append(rng.randrange(len(extents)))
    offsets = set()
    for i in picks:
        start, end = extents[i]
        first, last = -(-start // PAGE), (end - PAGE) // PAGE
        while True:
            off = rng.randint(first, last) * PAGE
            if off not in offsets:
                break
        offsets.add(off)
    fd = os.open(sp.src, os.O_RDWR)
    try:
        for off in sorted(offsets):
            sp.changes.append((off, os.pread(fd, PAGE, off)))
            os.pwrite(fd, os.urandom(PAGE), off)
    finally:
        os.close(fd)
    sync_disks()
    log(f"sparse C: {len(sp.changes)} x 4 KiB changes in sp.src at "
        + ", ".join(f"{o / MiB:.1f}M" for o, _ in sp.changes))


def sparse_resync_group(args: argparse.Namespace, sp: SparseData) -> Group:
    """Case C: re-sync after a few scattered changes, vs reading both files' data."""
    def restore(wd: Workdir) -> None:
        fd = os.open(sp.dst, os.O_WRONLY)
        try:
            for off, old in sp.changes:
                os.pwrite(fd, old, off)
        finally:
            os.close(fd)
        sp.warm(sp.src, sp.dst)

    read = Case("read-extents", "(c) read data extents of sp.src and sp.dst (Python)",
                lambda wd: [], writes=False, setup=restore,
                func=lambda wd: read_extents(sp.src, sp.dst))
    bs = Case("blocksync", "(d) blocksync -f -q --no-progress sp.src sp.dst",
              lambda wd: [str(args.bin), "-f", "-q", "--no-progress", str(sp.src), str(sp.dst)],
              setup=restore, check=lambda wd: sp.verify(sp.dst, "blocksync (re-sync)"))

    def targets(by: dict[str, Result]) -> list[str]:
        if "read-extents" not in by or "blocksync" not in by:
            return []
        x = by["blocksync"].median / by["read-extents"].median
        return [f"blocksync / read-extents = {x:.2f} (target <= {TARGET_SPARSE_RESYNC:.2f}) "
                f"{verdict(x <= TARGET_SPARSE_RESYNC)}"]

    return Group(f"sparse C: re-sync of {len(sp.changes)} x 4 KiB changes in the "
                 f"{human(sp.size)} sparse file", [read, bs], targets,
                 notes=["before each run: the changed pieces of sp.dst put back, sync, "
                        "data extents of both files read (widened to 1 MiB blocks); "
                        "(c) reads exactly the data extents"],
                 after=lambda wd, by: alloc_lines(sp, [("sp.dst", sp.dst)]),
                 name="sparse-resync")


# --------------------------------------------------------------------------
# digest file and patches (issue 7)
# --------------------------------------------------------------------------

def cache_group(args: argparse.Namespace, hash_name: str) -> Group:
    """A sync of the changes with a valid --digest-file (the destination is not read)
    vs reading the source alone. Before each run, dst is put back to dst.orig and a
    digest file describing it is made (untimed: a sync of dst.orig onto dst).
    The --before binary keeps its own sync id record and digest file."""
    state = None
    digests = f"dst.{hash_name}{args.variant}.digests"

    def setup(wd: Workdir) -> None:
        nonlocal state
        state = wd.path(f"state{args.variant}")
        os.environ["XDG_STATE_HOME"] = str(state)   # where dst's sync id is kept
        restore_dst(wd)
        dig = wd.path(digests)
        dig.unlink(missing_ok=True)
        run([str(args.bin), "-f", "-q", "--no-progress", "--hash", hash_name,
             "--digest-file", str(dig), str(wd.dst_orig), str(wd.dst)])
        sync_disks()
        warm(wd.src)

    read = Case("read-src", "(a) cat src >/dev/null",
                lambda wd: ["cat", str(wd.src)], writes=False,
                setup=lambda wd: warm(wd.src))
    bs = Case(f"cached-{hash_name}",
              f"(b) blocksync --hash {hash_name} --digest-file F src dst",
              lambda wd: [str(args.bin), "-f", "-q", "--no-progress", "--hash", hash_name,
                          "--digest-file", str(wd.path(digests)),
                          str(wd.src), str(wd.dst)],
              setup=setup)

    def targets(by: dict[str, Result]) -> list[str]:
        if "read-src" not in by or bs.key not in by:
            return []
        x = by[bs.key].median / by["read-src"].median
        return [f"blocksync --digest-file ({hash_name}) / read src = {x:.2f} "
                f"(target <= {TARGET_CACHE_VS_READ:.2f}) {verdict(x <= TARGET_CACHE_VS_READ)}"]

    return Group(f"cache ({hash_name}): sync of the changes with a valid digest file, "
                 "the destination not read", [read, bs], targets,
                 notes=["before each run of (b): dst put back to dst.orig and a digest file "
                        "describing it made (untimed); the timed run reads src, spot-checks "
                        "8 blocks of dst, writes the changes and the new digest file"],
                 name=f"cache-{hash_name}")


def patch_lines(args: argparse.Namespace, wd: Workdir) -> list[str]:
    """Digest dst.orig, diff src against it, apply the patch to a copy: the patch's size."""
    dig, patch, copy = wd.path("orig.4k.digests"), wd.path("changes.patch"), wd.path("copy")
    run([str(args.bin), "digest", "-q", "-b", "4K", str(wd.dst_orig), "-o", str(dig)])
    t0 = time.perf_counter()
    run([str(args.bin), "diff", "-q", str(wd.src), "--against", str(dig), "-o", str(patch)])
    t_diff = time.perf_counter() - t0
    copy_file(wd.dst_orig, copy)
    t0 = time.perf_counter()
    run([str(args.bin), "apply", "-q", str(patch), str(copy)])
    t_apply = time.perf_counter() - t0
    verify_same(wd.src, copy, "patched copy")
    size = patch.stat().st_size
    copy.unlink()
    who = " (blocksync before)" if args.variant else ""
    return [f"patch{who} for the {args.changes} changes (digest -b 4K of dst.orig, diff src): "
            f"{size / 1000:.1f} KB (target <= {TARGET_PATCH_KB} KB) "
            f"{verdict(size <= TARGET_PATCH_KB * 1000)}; diff {t_diff:.2f} s, "
            f"apply (checks, writes, verifies) {t_apply:.2f} s; digest file "
            f"{dig.stat().st_size / MB:.1f} MB"]


# --------------------------------------------------------------------------
# the hashing floor and the ssh login (issue 15)
# --------------------------------------------------------------------------

BLAKE3_INSTALL = ("install b3sum (apt-get install b3sum, or cargo install b3sum) or the blake3 "
                  "PyPI package (pip install blake3)")


@dataclass
class Blake3:
    """The BLAKE3 implementation timed for the hashing floor, on all cores."""
    kind: str        # "b3sum", "python", or "" when none is available
    about: str       # name and version, or why there is none and how to install one
    path: str = ""   # the b3sum binary


def find_blake3(choice: str) -> Blake3:
    """b3sum if installed (and allowed by --blake3), else the blake3 PyPI package
    (it wraps the Rust crate, the same implementation), else none."""
    if choice in ("auto", "b3sum"):
        path = shutil.which("b3sum")
        if path:
            cp = subprocess.run([path, "--version"], capture_output=True, text=True)
            version = cp.stdout.strip() or "b3sum"
            return Blake3("b3sum", f"{version} ({path}), all cores, mmap", path)
    if choice in ("auto", "python"):
        try:
            import blake3
        except ImportError:
            pass
        else:
            version = getattr(blake3, "__version__", "?")
            return Blake3("python", f"blake3 {version} from PyPI (the Rust crate), "
                                    "update_mmap with max_threads=AUTO, in a forked child")
    wanted = {"auto": BLAKE3_INSTALL, "b3sum": "install b3sum (apt-get install b3sum, or "
              "cargo install b3sum)", "python": "pip install blake3"}[choice]
    return Blake3("", f"BLAKE3 floor unavailable (--blake3 {choice}): {wanted}")


def blake3_files(paths: list[Path]) -> None:
    """BLAKE3 of each file in turn, each on all cores (the blake3 package's
    update_mmap: the Rust crate hashing the mapped file with rayon), in a forked
    child: the mapped files count in the RSS of the process that maps them, and every
    process forked after that inherits its peak in ru_maxrss, which would spoil the
    --rss measurement of blocksync. A fork costs a few milliseconds."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            import blake3
            for p in paths:
                h = blake3.blake3(max_threads=blake3.blake3.AUTO)
                h.update_mmap(str(p))
                h.digest()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit("bench: BLAKE3 of the files failed in the child process")


def case_blake3(tool: Blake3, key: str, label: str,
                files: Callable[[Workdir], list[Path]]) -> Case:
    """Hash `files` with BLAKE3 on all cores; before each run the files are read once."""
    def setup(wd: Workdir) -> None:
        warm(*files(wd))

    if tool.kind == "b3sum":
        return Case(key, label, lambda wd: [tool.path, *map(str, files(wd))],
                    writes=False, setup=setup)
    return Case(key, label, lambda wd: [], writes=False, setup=setup,
                func=lambda wd: blake3_files(files(wd)))


def case_ssh_true(sshd: Sshd) -> Case:
    """(s) The ssh login alone: `ssh benchhost true`."""
    return Case("ssh-true", "(s) ssh benchhost true (login)",
                lambda wd: ["ssh", "-F", str(sshd.config), HOST, "true"],
                writes=False, setup=lambda wd: None)


def floor_group(args: argparse.Namespace, tool: Blake3, sshd: Sshd | None) -> Group:
    """The floors of issue 15: BLAKE3 of src and dst, and of src alone, on all
    cores; and `ssh benchhost true`.  A push cannot beat the login plus hashing
    both files; a digest-file run (blake3) cannot beat hashing the source."""
    cases = []
    if tool.kind:
        cases += [case_blake3(tool, "b3-both", f"(h2) BLAKE3 of src and dst ({tool.kind})",
                              lambda wd: [wd.src, wd.dst]),
                  case_blake3(tool, "b3-src", f"(h1) BLAKE3 of src ({tool.kind})",
                              lambda wd: [wd.src])]
    if sshd:
        cases.append(case_ssh_true(sshd))
    size = args.size

    def targets(by: dict[str, Result]) -> list[str]:
        lines = [] if tool.kind else [f"MISS: {tool.about}"]
        rates = [f"{key} {n * size / MB / by[key].median:.0f} MB/s"
                 for key, n in (("b3-both", 2), ("b3-src", 1)) if key in by]
        if rates:
            lines.append("BLAKE3 throughput: " + ", ".join(rates))
        if "b3-both" in by and "ssh-true" in by:
            a, b = by["ssh-true"], by["b3-both"]
            lines.append(f"floor of a push = ssh login + BLAKE3 of src and dst = "
                         f"{a.median:.3f} + {b.median:.3f} = {a.median + b.median:.3f} s "
                         f"(CPU {a.cpu_median:.2f} + {b.cpu_median:.2f} s)")
        return lines

    login = ", and the ssh login" if sshd else ""
    return Group(f"floor: BLAKE3 of the files on all {os.cpu_count()} cores{login}",
                 cases, targets, name="floor",
                 notes=[f"BLAKE3: {tool.about}"] if tool.kind else [])


# --------------------------------------------------------------------------
# issue 15: every figure of the issue against its target, from this run
# --------------------------------------------------------------------------

Measured = dict[str, dict[str, Result]]   # results by Group.measured_name, then by case key

NEEDS = {"local": "--local", "ssh": "--ssh", "floor": "--floor with --ssh or --cache",
         "first-copy": "--ssh --first-copy", "sparse-new": "--sparse",
         "sparse-resync": "--sparse", "cache-blake3": "--cache", "cache-xxh3": "--cache"}


def needs(name: str) -> str:
    """Why the figures of group `name` (maybe `-cold`) are missing from the run."""
    base = name.removesuffix("-cold")
    if name.endswith("-cold"):
        return f"not measured: needs {NEEDS[base]} with --cold-too (or --cold)"
    return f"not measured: needs {NEEDS[base]}" + (" in a warm run (no --cold)" if COLD else "")


def either(m: Measured, name: str) -> tuple[str, str]:
    """For the figures the issue does not split into warm and cold: the group's
    warm results if present, else its cold ones; and a note saying which."""
    if name not in m and f"{name}-cold" in m:
        return f"{name}-cold", ", cold run"
    return name, ""


def med_ratio(m: Measured, name: str, a: str, b: str,
              other: str | None = None) -> tuple[float | None, str]:
    """median(a) / median(b) of group `name` (b from group `other` if given),
    and the two medians as text; (None, "") if either is missing."""
    ra, rb = m.get(name, {}).get(a), m.get(other or name, {}).get(b)
    if ra is None or rb is None:
        return None, ""
    return ra.median / rb.median, f"{ra.median:.3f} s / {rb.median:.3f} s"


def cpu_ratio(m: Measured, name: str, a: str, b: str) -> tuple[float | None, str]:
    """Machine CPU seconds (medians) of cases a / b of group `name`."""
    ra, rb = m.get(name, {}).get(a), m.get(name, {}).get(b)
    if ra is None or rb is None or not ra.cpu_median or not rb.cpu_median:
        return None, ""
    return ra.cpu_median / rb.cpu_median, f"{ra.cpu_median:.2f} s / {rb.cpu_median:.2f} s"


def t15(row: str, what: str, x: float | None, target: float | None, rel: str = "<=",
        detail: str = "", missing: str = "") -> str:
    """One line: `issue 15: ROW: WHAT = X (detail) (target REL T) PASS|MISS`; with
    no target, the figure is shown for information; with no figure, `missing`
    (a MISS when it starts with "MISS: ": a floor could not be measured)."""
    head = f"issue 15: {row}: {what}"
    if x is None and missing.startswith("MISS: "):
        return f"{head} = n/a ({missing.removeprefix('MISS: ')}) MISS"
    if x is None:
        return f"{head} = n/a ({missing})"
    text = f"{head} = {x:.2f}" + (f" ({detail})" if detail else "")
    if target is None:
        return f"{text} (no target: shown for comparison)"
    ok = {"<=": x <= target, "<": x < target, ">=": x >= target}[rel]
    return f"{text} (target {rel} {target:.2f}) {verdict(ok)}"


def floor_line(m: Measured, tool: Blake3) -> str:
    """The floors themselves: BLAKE3 of both files and of src, the ssh login."""
    name, note = either(m, "floor")
    fl = m.get(name, {})
    parts = [f"{label} {fl[key].median:.3f} s (CPU {fl[key].cpu_median:.2f} s)"
             for key, label in (("b3-both", "BLAKE3 of src and dst"), ("b3-src", "of src"),
                                ("ssh-true", "ssh benchhost true")) if key in fl]
    if not tool.kind:
        parts.insert(0, f"MISS: {tool.about}")
    return "issue 15: floors: " + ("; ".join(parts) + note if parts else needs("floor"))


def push_floor_line(m: Measured, tool: Blake3) -> str:
    """ssh push, warm, against ssh login + BLAKE3 of both files."""
    what = "push / (ssh login + BLAKE3 of src and dst)"
    push, fl = m.get("ssh", {}).get("push"), m.get("floor", {})
    if push is None:
        return t15("ssh push re-sync, warm", what, None, T15_PUSH_VS_FLOOR, missing=needs("ssh"))
    if not tool.kind:
        return t15("ssh push re-sync, warm", what, None, T15_PUSH_VS_FLOOR,
                   missing=f"MISS: {tool.about}")
    if "b3-both" not in fl or "ssh-true" not in fl:
        return t15("ssh push re-sync, warm", what, None, T15_PUSH_VS_FLOOR,
                   missing=needs("floor"))
    login, hashing = fl["ssh-true"].median, fl["b3-both"].median
    return t15("ssh push re-sync, warm", what, push.median / (login + hashing),
               T15_PUSH_VS_FLOOR,
               detail=f"{push.median:.3f} s / ({login:.3f} + {hashing:.3f} s)")


def cache_floor_line(m: Measured, tool: Blake3) -> str:
    """The digest-file run with BLAKE3 against BLAKE3 of the source alone."""
    row, what = "digest-file run, BLAKE3 (default)", "blocksync / BLAKE3 of src"
    if "cached-blake3" not in m.get("cache-blake3", {}):
        return t15(row, what, None, T15_CACHE_B3_VS_FLOOR, missing=needs("cache-blake3"))
    if not tool.kind:
        return t15(row, what, None, T15_CACHE_B3_VS_FLOOR, missing=f"MISS: {tool.about}")
    x, d = med_ratio(m, "cache-blake3", "cached-blake3", "b3-src", other="floor")
    return t15(row, what, x, T15_CACHE_B3_VS_FLOOR, detail=d, missing=needs("floor"))


def issue15_lines(m: Measured, args: argparse.Namespace, tool: Blake3,
                  rss: float | None, sparse_size: int) -> list[str]:
    """Every figure of issue 15's table against its target, and the cold figures
    the issue asks to see (no target of their own), in the table's order."""
    lines = [floor_line(m, tool)]
    row = "local re-sync, warm"
    x, d = med_ratio(m, "local", "blocksync", "read")
    lines.append(t15(row, "blocksync / cat src dst", x, T15_LOCAL_VS_READ, detail=d,
                     missing=needs("local")))
    x, d = med_ratio(m, "local", "blocksync", "rsync")
    lines.append(t15(row, "blocksync / rsync --inplace --no-whole-file", x, T15_LOCAL_VS_RSYNC,
                     detail=d, missing=needs("local")))
    x, d = med_ratio(m, "local-cold", "blocksync", "read")
    lines.append(t15("local re-sync, cold", "blocksync / cat src dst (cold)", x,
                     T15_LOCAL_COLD_VS_READ, detail=d, missing=needs("local-cold")))

    row = "ssh push re-sync, warm"
    lines.append(push_floor_line(m, tool))
    x, d = med_ratio(m, "ssh", "push", "rsync-ssh")
    lines.append(t15(row, "push / rsync over ssh", x, T15_PUSH_VS_RSYNC, detail=d,
                     missing=needs("ssh")))
    x, d = cpu_ratio(m, "ssh", "push", "rsync-ssh")
    lines.append(t15(row, "machine CPU push / rsync over ssh", x, T15_PUSH_CPU_VS_RSYNC,
                     detail=d, missing=needs("ssh")))

    row = "ssh push re-sync, cold"
    x, d = med_ratio(m, "ssh-cold", "push", "rsync-ssh")
    lines.append(t15(row, "push / rsync over ssh (cold)", x, T15_PUSH_COLD_VS_RSYNC, detail=d,
                     missing=needs("ssh-cold")))
    x, d = med_ratio(m, "ssh-cold", "push", "read")
    lines.append(t15(row, "push / cat src dst (cold)", x, None, detail=d,
                     missing=needs("ssh-cold")))
    x, d = cpu_ratio(m, "ssh-cold", "push", "rsync-ssh")
    lines.append(t15(row, "machine CPU push / rsync over ssh (cold)", x, None, detail=d,
                     missing=needs("ssh-cold")))

    name, note = either(m, "first-copy")
    x, d = med_ratio(m, name, "cat-ssh", "first")      # throughput ratio = inverse time ratio
    lines.append(t15("first copy over ssh", "throughput blocksync / ssh 'cat > dst'", x,
                     T15_FIRST_COPY, ">=", detail=d and f"times cat / blocksync: {d}{note}",
                     missing=needs(name)))

    name, note = either(m, "sparse-new")
    x, d = med_ratio(m, name, "blocksync", "cp-fsync")
    lines.append(t15(f"new {human(sparse_size)} sparse copy, local",
                     "blocksync / (cp --sparse=always && sync)", x, T15_SPARSE_VS_CP_SYNC,
                     detail=d + note, missing=needs(name)))
    x, d = med_ratio(m, "sparse-resync-cold", "blocksync", "read-extents")
    lines.append(t15("sparse re-sync, cold", "blocksync / read of both files' data (cold)",
                     x, None, detail=d, missing=needs("sparse-resync-cold")))

    x, d = med_ratio(m, "cache-xxh3", "cached-xxh3", "read-src")
    lines.append(t15("digest-file run, xxh3", "blocksync / cat src", x, T15_CACHE_XXH3_VS_READ,
                     detail=d, missing=needs("cache-xxh3")))
    lines.append(cache_floor_line(m, tool))
    x, d = med_ratio(m, "cache-blake3-cold", "cached-blake3", "read-src")
    lines.append(t15("digest-file run, BLAKE3, cold", "blocksync / cat src (cold)", x, None,
                     detail=d, missing=needs("cache-blake3-cold")))

    rss_row = f"issue 15: peak RSS, {human(args.rss_size)}"
    lines.append(f"{rss_row} = n/a (not measured: needs --rss)" if rss is None else
                 f"{rss_row} = {rss:.1f} MiB (target < {TARGET_RSS_MIB} MiB) "
                 f"{verdict(rss < TARGET_RSS_MIB)}")
    return lines


def print_issue15(lines: list[str], args: argparse.Namespace) -> None:
    """The summary section: all the issue's figures of this run in one place."""
    title = (f"issue 15: the figures against their targets (this run: {human(args.size)}, "
             f"medians of {args.runs} runs; CPU: {machine_text()})")
    print()
    print(f"### {title}\n" if args.markdown else f"{title}:")
    for line in lines:
        print(f"- {line}" if args.markdown else line)
    sys.stdout.flush()


# --------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------

def print_table(results: list[Result], markdown: bool,
                lo_unit: tuple[str, int] = ("MB", MB), cpu: bool = False) -> None:
    ref = results[0].median
    with_lo = any(r.lo for r in results)
    unit, div = lo_unit
    header = ["Case", "Median [s]", "Min [s]", f"vs {results[0].case.key}"]
    if cpu:
        header.append("CPU [s]")
    if with_lo:
        header.append(f"Loopback [{unit}]")
    rows = []
    for r in results:
        row = [r.case.label, f"{r.median:.3f}", f"{r.min:.3f}", f"{r.median / ref:.2f}"]
        if cpu:
            row.append(f"{r.cpu_median:.2f}" if r.cpu else "-")
        if with_lo:
            row.append(f"{r.lo_median / div:.{3 if div >= GiB else 2}f}" if r.lo else "-")
        rows.append(row)
    if markdown:
        print("| " + " | ".join(header) + " |")
        print("|:---" + "|---:" * (len(header) - 1) + "|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
        return
    w = max(len(header[0]), *(len(r[0]) for r in rows))
    fmt = (f"{{:<{w}}}  {{:>10}}  {{:>9}}  {{:>14}}" + ("  {:>7}" if cpu else "")
           + ("  {:>13}" if with_lo else ""))
    print(fmt.format(*header))
    for row in rows:
        print(fmt.format(*row))


def run_group(group: Group, wd: Workdir, args: argparse.Namespace) -> dict[str, Result]:
    """Time every case of the group, then print its table and target lines;
    return the results by key."""
    log(f"group {group.title}")
    results = []
    for case in group.cases:
        twin = group.twins.get(case.key)
        if twin:
            log(f"timing {case.label} and {twin.label}, interleaved ...")
            results += time_pair(case, twin, wd, args.runs, group.cold)
        else:
            log(f"timing {case.label} ...")
            results.append(time_case(case, wd, args.runs, group.cold))
    by = {r.case.key: r for r in results}
    lines = pair_lines(results, group) + group.targets(by) + group.notes
    if group.after:
        lines += group.after(wd, by)
    print()
    print(f"### {group.title}\n" if args.markdown else f"{group.title}:")
    print_table(results, args.markdown, group.lo_unit, group.cpu_column)
    if args.markdown and lines:
        print()
    for line in lines:
        print(f"- {line}" if args.markdown else line)
    sys.stdout.flush()
    return by


# --------------------------------------------------------------------------
# peak RSS on a large sparse file
# --------------------------------------------------------------------------

def run_rusage(argv: list[str]) -> tuple[int, "os.struct_rusage", float, bytes]:
    """Run argv; return (exit code, its own rusage from os.wait4, wall s, stdout)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE)
    out = p.stdout.read()
    p.stdout.close()
    _, status, ru = os.wait4(p.pid, 0)
    dt = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)   # we reaped it, not Popen
    return p.returncode, ru, dt, out


def measure_rss(bin_path: Path, wd: Workdir, size: int, changes: int, seed: int,
                who: str = "") -> float:
    """Peak RSS of blocksync streaming a `size` device onto another with a few changes.

    Loop devices over sparse files: a device has no holes to skip, so blocksync really
    reads all of both sides (the sparse files keep the disk untouched)."""
    src, dst = wd.path("big-src"), wd.path("big-dst")
    log(f"rss: {human(size)} loop devices over sparse files, {changes} changes in dst ...")
    for p in (src, dst):
        with open(p, "wb") as f:
            f.truncate(size)
    rng = random.Random(seed + 1)
    write_changes(dst, rng, scattered_offsets(rng, size, changes))
    sync_disks()
    devs = []
    try:
        for p in (src, dst):
            devs.append(subprocess.run(["losetup", "-f", "--show", str(p)], check=True,
                                       capture_output=True, text=True).stdout.strip())
        code, ru, dt, out = run_rusage([str(bin_path), "-f", "--json", "--no-progress",
                                        devs[0], devs[1]])
    finally:
        for d in devs:
            subprocess.run(["losetup", "-d", d], check=False)
    if code != 0:
        sys.exit(f"bench: blocksync exited {code} on the {human(size)} sync")
    log("  verifying with cmp ...")
    verify_same(src, dst, f"the {human(size)} device sync")

    rss_mib = ru.ru_maxrss / KiB          # ru_maxrss is KiB on Linux
    print()
    print(f"peak RSS{who} syncing {human(size)}: {rss_mib:.1f} MiB "
          f"(target < {TARGET_RSS_MIB} MiB) {verdict(rss_mib < TARGET_RSS_MIB)}")
    detail = ""
    try:
        s = json.loads(out)
        detail = (f", {s['blocks_changed']} of {s['blocks_total']} blocks changed, "
                  f"{human(s['bytes_written'])} written")
    except (ValueError, KeyError, TypeError):
        pass
    print(f"  time {dt:.2f} s wall, {ru.ru_utime:.2f} s user, "
          f"{ru.ru_stime:.2f} s sys{detail}")
    return rss_mib


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Benchmark blocksync vs. a plain read, cat over ssh and rsync "
                    "(warm cache), locally and over a loopback sshd.")
    ap.add_argument("--dir", help="work directory (default: a new temp dir under /var/tmp)")
    ap.add_argument("--size", type=parse_size, default=GiB,
                    help="size of the generated file, e.g. 512M, 1G (default 1G)")
    ap.add_argument("--runs", type=int, default=5, help="timed runs per case (default 5)")
    ap.add_argument("--changes", type=int, default=10,
                    help="scattered 4 KiB changes in dst.orig (default 10)")
    ap.add_argument("--seed", type=int, default=1, help="seed for change offsets/data (default 1)")
    ap.add_argument("--bin", type=Path, default=DEFAULT_BIN,
                    help="blocksync binary (default: target/x86_64-unknown-linux-gnu/release/blocksync, built if missing)")
    ap.add_argument("--before", type=Path,
                    help="a second blocksync binary (e.g. built from the commit before a "
                         "change): every blocksync case is also timed with it, interleaved, "
                         "and each group prints after / before of the medians")
    ap.add_argument("--markdown", action="store_true", help="print the tables as markdown")
    ap.add_argument("--cold", action="store_true",
                    help="drop the page cache (sync; echo 3 > /proc/sys/vm/drop_caches) "
                         "before every timed run instead of warming it (needs root)")
    ap.add_argument("--cold-too", action="store_true",
                    help="issue 15: also time the local re-sync, the ssh re-syncs, the "
                         "digest-file run (blake3) and the sparse re-sync with the page cache "
                         "dropped before every run, each right after its warm table (needs "
                         "root; not with --cold)")
    ap.add_argument("--keep", action="store_true", help="keep the work files")
    on = argparse.BooleanOptionalAction
    ap.add_argument("--local", action=on, default=True,
                    help="time the local cases (default: on)")
    ap.add_argument("--ssh", action=on, default=True,
                    help="time the cases over a throwaway loopback sshd (default: on; "
                         "needs root and /usr/sbin/sshd)")
    ap.add_argument("--many", action=on, default=True,
                    help="with --ssh: time blocksync push vs rsync -z after many scattered "
                         "4 KiB random writes (default: on)")
    ap.add_argument("--many-changes", type=int, default=2000,
                    help="number of random 4 KiB writes for --many (default 2000)")
    ap.add_argument("--many-align", type=parse_size, default=CHANGE_SIZE,
                    help="offsets of the --many writes are multiples of this (default 4K; "
                         "1 for arbitrary offsets)")
    ap.add_argument("--first-copy", action=on, default=True,
                    help="with --ssh: time copying src to a missing destination (default: on)")
    ap.add_argument("--latency", action=on, default=True,
                    help="with --ssh: time a push through a delaying proxy (default: on)")
    ap.add_argument("--delay-ms", type=float, default=25,
                    help="the proxy's delay each way for --latency (default 25, i.e. 50 ms RTT)")
    ap.add_argument("--cipher", default=DEFAULT_CIPHER,
                    help=f"ssh cipher of the bench's ssh config (default {DEFAULT_CIPHER})")
    ap.add_argument("--journal", action=on, default=False,
                    help="time blocksync --journal vs --no-journal on re-syncs (local and "
                         "push) with --changes 4 KiB changes and with --journal-changed of "
                         "the data changed, and first copies (vs --before if given) "
                         "(default: off)")
    ap.add_argument("--journal-changed", type=float, default=0.30,
                    help="fraction of the --journal-unit pieces changed for the second "
                         "--journal re-sync (default 0.30)")
    ap.add_argument("--journal-unit", type=parse_size, default=BLOCK_SIZE,
                    help="size of the pieces changed for --journal-changed: 1M (default, "
                         "scattered whole 1 MiB blocks) or 4K (scattered 4 KiB pieces)")
    ap.add_argument("--journal-default", choices=("auto", "on", "off"), default="auto",
                    help="journal flag for the --bin runs of the other cases: auto (none: "
                         "blocksync's default, which journals a destination a run completed "
                         "onto before), on (--journal), off (--no-journal) (default: auto)")
    ap.add_argument("--floor", action=on, default=True,
                    help="with --ssh or --cache: time BLAKE3 of src and dst and of src alone "
                         "on all cores, and ssh benchhost true (issue 15's floors; default: on)")
    ap.add_argument("--blake3", choices=("auto", "b3sum", "python"), default="auto",
                    help="BLAKE3 for --floor: b3sum, or the blake3 PyPI package in-process; "
                         "auto: b3sum if installed, else the package (default: auto)")
    ap.add_argument("--cache", action=on, default=True,
                    help="time a sync with a digest file and make a patch (default: on)")
    ap.add_argument("--rss", action=on, default=True,
                    help="measure peak RSS on a sparse file (default: on)")
    ap.add_argument("--rss-size", type=parse_size, default=16 * GiB,
                    help="size of the sparse file for --rss (default 16G)")
    ap.add_argument("--sparse", action=on, default=True,
                    help="time new copies and a re-sync of a large sparse file, locally "
                         "and over ssh (default: on)")
    ap.add_argument("--sparse-size", type=parse_size, default=64 * GiB,
                    help="apparent size of the sparse file for --sparse (default 64G)")
    ap.add_argument("--sparse-data", type=parse_size, default=GiB,
                    help="random data in the sparse file, in 4 MiB extents (default 1G)")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    if args.many_changes < 1:
        ap.error("--many-changes must be at least 1")
    if args.many_align < 1:
        ap.error("--many-align must be at least 1")
    if args.delay_ms < 0:
        ap.error("--delay-ms must not be negative")
    if not 0 < args.journal_changed <= 1:
        ap.error("--journal-changed must be in (0, 1]")
    if not 0 < args.journal_unit <= args.size:
        ap.error("--journal-unit must be between 1 byte and --size")
    if args.sparse_data < 1 or args.sparse_data > args.sparse_size:
        ap.error("--sparse-data must be between 1 byte and --sparse-size")
    if args.cold and args.cold_too:
        ap.error("--cold-too adds cold tables to a warm run; with --cold every table is cold")
    if (args.cold or args.cold_too) and os.geteuid() != 0:
        ap.error("--cold and --cold-too drop the page cache: they need root")
    args.bin = args.bin.resolve()
    if args.before is not None:
        args.before = args.before.resolve()
        if not args.before.is_file():
            ap.error(f"--before {args.before} does not exist")
    args.variant = ""              # "-before" in before_args: names that binary's files
    return args


def machine_text() -> str:
    """The CPU model and the number of (logical) cores, for the header lines."""
    n = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0))
    return f"{cpu_model()}, {n} cores" + (f" ({usable} usable here)" if usable != n else "")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, or "unknown"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    global COLD, BIN_JOURNAL
    COLD = args.cold
    args.bin = ensure_binary(args.bin)
    wd = make_workdir(args.dir)
    sshd: Sshd | None = None
    proxies: list[DelayProxy] = []
    bargs: argparse.Namespace | None = None     # the cases' args for --before
    measured: Measured = {}                     # for the issue-15 summary
    rss: float | None = None
    tool = find_blake3(args.blake3)

    def timed(group: Group, cold_too: bool = False) -> None:
        """Run the group (and, if `cold_too` and --cold-too, its cold copy right
        after); file the results for the issue-15 summary."""
        for g in [group] + ([cold_copy(group)] if cold_too and args.cold_too else []):
            by = run_group(g, wd, args)
            if g.name:
                measured[g.measured_name] = by

    def grouped(build: Callable[..., Group], *extra) -> Group:
        """build(args, *extra), with the --before twin of each blocksync case."""
        group = build(args, *extra)
        if bargs is not None:
            add_twins(group, build(bargs, *extra), args.bin, wd)
        return group

    def start_sshd() -> Sshd:
        """The throwaway sshd, started on first use and shared by the groups."""
        nonlocal sshd
        if sshd is None:
            sshd = Sshd(args.cipher)
            atexit.register(sshd.stop)          # also on sys.exit from a failed run
            sshd.start()
            sshd.login_time(HOST)
        return sshd

    try:
        if args.before:
            print(f"after: {args.bin}, before: {args.before}; CPU: {machine_text()}")
            args.before = snapshot_binary(args.before, wd, "blocksync-before")
            bargs = before_args(args)
        args.bin = snapshot_binary(args.bin, wd)
        if args.journal_default != "auto":
            BIN_JOURNAL = (str(args.bin), {"on": "--journal", "off": "--no-journal"}[
                args.journal_default])
        if args.local or args.ssh or args.cache or args.journal:
            generate_data(wd, args.size, args.changes, args.seed)
            cache = "cold" if COLD else "warm" + (" and cold (--cold-too)" if args.cold_too else "")
            print(f"blocksync bench: {human(args.size)}, {args.changes} x 4 KiB changes, "
                  f"{args.runs} runs per case, {cache} cache, "
                  f"--journal-default {args.journal_default}, {wd.root}; CPU: {machine_text()}")
            sys.stdout.flush()
        if args.local:
            timed(grouped(local_group), cold_too=True)
        if args.floor and (args.ssh or args.cache):
            group = floor_group(args, tool, start_sshd() if args.ssh else None)
            if group.cases:
                timed(group)
            else:
                print(f"\nfloor: MISS: {tool.about}")
        if args.ssh:
            start_sshd()
            timed(grouped(ssh_group, sshd), cold_too=True)
            if args.many:
                offsets = generate_many(wd, args.size, args.many_changes, args.seed,
                                        args.many_align)
                run_group(grouped(many_group, sshd, offsets), wd, args)
            if args.first_copy:
                timed(grouped(first_copy_group, sshd))
            if args.latency:
                for host, delay in ((HOST_PROXY, 0), (HOST_SLOW, args.delay_ms)):
                    proxy = DelayProxy(sshd.port, delay)
                    proxies.append(proxy)
                    sshd.add_host(host, proxy.port)
                group = grouped(latency_group, sshd)
                logins = {h: min(sshd.login_time(h) for _ in range(3))
                          for h in (HOST, HOST_PROXY, HOST_SLOW)}
                group.notes.append(
                    "ssh login (ssh host true, best of 3): "
                    f"direct {logins[HOST]:.2f} s, proxy 0 ms {logins[HOST_PROXY]:.2f} s, "
                    f"proxy {args.delay_ms:g} ms {logins[HOST_SLOW]:.2f} s")
                run_group(group, wd, args)
        if args.journal:
            jsshd = start_sshd() if Path(SSHD).exists() else None
            if jsshd is None:
                print(f"\njournal: push cases skipped: {SSHD} missing")
            for group in journal_groups(args, wd, jsshd):
                run_group(group, wd, args)
            run_group(grouped(journal_first_group, jsshd), wd, args)
        if args.cache:
            for h in ("blake3", "xxh3"):
                group = grouped(cache_group, h)
                if h == "blake3":
                    group.after = lambda wd, by: patch_lines(args, wd) + (
                        patch_lines(bargs, wd) if bargs else [])
                timed(group, cold_too=h == "blake3")
        if args.sparse:
            sp = generate_sparse(wd, args.sparse_size, args.sparse_data, args.seed)
            print(f"\nsparse: {sp.describe()}, {args.runs} runs per case, {wd.root}; "
                  f"CPU: {machine_text()}")
            sys.stdout.flush()
            timed(grouped(sparse_new_group, sp))
            if Path(SSHD).exists():
                run_group(grouped(sparse_ssh_group, sp, start_sshd()), wd, args)
            else:
                print(f"\nsparse B (over ssh) skipped: {SSHD} missing")
            sparse_resync_setup(args, sp, args.changes, args.seed)
            timed(grouped(sparse_resync_group, sp), cold_too=True)
        if args.rss:
            sys.stdout.flush()
            rss = measure_rss(args.bin, wd, args.rss_size, args.changes, args.seed)
            if args.before:
                rss_b = measure_rss(args.before, wd, args.rss_size, args.changes, args.seed,
                                    " (blocksync before)")
                print(f"after / before = {rss / rss_b:.2f} (peak RSS)")
        if measured or rss is not None:
            print_issue15(issue15_lines(measured, args, tool, rss, args.sparse_size), args)
    finally:
        for proxy in proxies:
            proxy.stop()
        if sshd is not None:
            sshd.stop()
        if args.keep:
            log(f"kept work files in {wd.root}")
        else:
            wd.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
