"""Decoding in a child process with a deadline and a memory bound.

The structure checks of ``multidet.decode`` refuse the inputs known to stall or bloat a decoder before
any pixel is decoded; this bounds the ones nobody has thought of yet. With ``decode_deadline_s`` set,
each image is decoded by a small child interpreter (PIL and numpy, not torch) whose address space is
capped at ``decode_memory_mib``: an image that takes longer than the deadline gets 422
(``DecodeTimeout``), one that needs more memory 413 (``DecodeOutOfMemory``), one that kills the child
422; the child is then replaced, the worker and the other requests of its batch carry on. A decoded
image comes back as raw RGB bytes through a memory file the two share (Linux ``memfd``; elsewhere
through the pipe).

    decoder = decoder_for(settings)          # InProcessDecoder, or IsolatedDecoder with a deadline
    image = decoder(body)                    # RGB PIL image or an InputError, as decode_image

``python -m multidet.isolation LIMITS MEMORY_MIB [FD]`` is the child's side: length-prefixed bodies
in on stdin, a JSON header line out on stdout, the pixels into the memory file FD (else after the line).
"""

from __future__ import annotations

import json
import os
import selectors
import struct
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

from PIL import Image

from . import errors
from .config import DecodeLimits, Settings
from .decode import decode_image
from .errors import InputError

LENGTH = struct.Struct(">Q")
PIPE_SIZE = 1 << 20
STARTUP_S = 60.0  # for the child to be ready (on a busy machine an interpreter takes seconds)


class DecodeTimeout(errors.ImageTooComplex):
    """The image took longer than the decode deadline (the child decoding it was replaced)."""


class DecodeOutOfMemory(errors.RequestTooLarge):
    """Decoding the image needed more memory than the decoder may have."""


class InProcessDecoder:
    """``decode_image`` in the calling thread: no deadline, no memory bound beyond the structure checks."""

    isolated = False

    def __init__(self, limits: DecodeLimits):
        self.limits = limits

    def __call__(self, body: bytes) -> Image.Image:
        return decode_image(body, self.limits)

    def close(self) -> None:
        pass


class IsolatedDecoder:
    """``decode_image`` in a child interpreter, one image at a time, each within ``deadline_s`` seconds
    and the child within ``memory_mib`` MiB of address space. Thread-safe (one image at a time)."""

    isolated = True

    def __init__(self, limits: DecodeLimits, deadline_s: float, memory_mib: int):
        if deadline_s <= 0 or memory_mib < 64:
            raise ValueError(f"deadline_s must be > 0 and memory_mib >= 64, got {deadline_s}, {memory_mib}")
        self.limits, self.deadline_s, self.memory_mib = limits, deadline_s, memory_mib
        self._proc: subprocess.Popen | None = None
        self._memfd: int | None = None  # the pixels' way back (Linux), else the pipe
        self._lock = threading.Lock()
        self.restarts = 0  # children replaced after a timeout, a memory error or a crash
        self._proc = self._start()  # now, so the first request does not wait for an interpreter

    # -- the child ----------------------------------------------------------------------------------
    def _start(self) -> subprocess.Popen:
        # the child imports this very package (inside a MAR it is not on the interpreter's default path)
        here = str(Path(__file__).resolve().parents[1])
        path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)
        env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        args = [sys.executable, "-m", "multidet.isolation", json.dumps(asdict(self.limits)), str(self.memory_mib)]
        if self._memfd is None and hasattr(os, "memfd_create"):
            self._memfd = os.memfd_create("multidet-decode")
        fds = (self._memfd,) if self._memfd is not None else ()
        args += [str(fd) for fd in fds]
        proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, bufsize=0, pass_fds=fds)
        for pipe in (proc.stdin, proc.stdout):  # 1 MiB pipes where Linux allows: far fewer switches per image
            try:
                import fcntl

                fcntl.fcntl(pipe.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_SIZE)
            except (ImportError, OSError):
                pass
        try:  # its start-up (an interpreter, PIL, numpy: ~0.2 s) is not an image's time
            ready = json.loads(self._read_line(proc, time.monotonic() + STARTUP_S))
        except (TimeoutError, EOFError, ValueError) as exc:
            proc.kill()
            proc.wait()
            raise errors.ProcessingFailed(f"the decoder process did not start ({type(exc).__name__}: {exc})") from None
        if not ready.get("ready"):
            raise errors.ProcessingFailed(f"the decoder process did not start: {ready}")
        return proc

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def _replace(self) -> None:
        self._kill()
        self.restarts += 1

    def close(self) -> None:
        with self._lock:
            self._kill()
            if self._memfd is not None:
                os.close(self._memfd)
                self._memfd = None

    def __del__(self) -> None:
        try:
            self.close()  # the child and the memory file
        except Exception:  # interpreter shutdown
            pass

    # -- one image ----------------------------------------------------------------------------------
    def __call__(self, body: bytes) -> Image.Image:
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._proc = self._start()
            proc = self._proc
            try:
                proc.stdin.write(LENGTH.pack(len(body)))
                proc.stdin.write(body)
                proc.stdin.flush()
                header = json.loads(self._read_line(proc, time.monotonic() + self.deadline_s))
            except TimeoutError:
                self._replace()
                raise DecodeTimeout(
                    f"the image took longer than {self.deadline_s:g} s to decode (decode_deadline_s)"
                ) from None
            except (BrokenPipeError, ConnectionError, EOFError, ValueError) as exc:
                self._replace()
                raise errors.CorruptImage(f"the image could not be decoded: the decoder stopped ({exc})") from None
            if "error" in header:
                if header["error"] == "memory":
                    self._replace()  # a MemoryError may leave the child's heap fragmented
                    raise DecodeOutOfMemory(
                        f"decoding the image needs more than {self.memory_mib} MiB (decode_memory_mib)"
                    )
                cls = getattr(errors, header["error"], None)
                if not (isinstance(cls, type) and issubclass(cls, InputError)):
                    cls = errors.ProcessingFailed
                raise cls(header["message"])
            width, height = header["size"]
            n = width * height * 3
            pixels = os.pread(self._memfd, n, 0) if header.get("memfd") else self._read_exact(proc, n)
            if len(pixels) != n:
                raise errors.ProcessingFailed("the decoder sent fewer pixels than the image has")
            return Image.frombuffer("RGB", (width, height), pixels, "raw", "RGB", 0, 1)

    @staticmethod
    def _read_line(proc: subprocess.Popen, until: float) -> bytes:
        """One header line from the child by ``until`` (monotonic), else TimeoutError."""
        fd = proc.stdout.fileno()
        buf = b""
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while not buf.endswith(b"\n"):
                left = until - time.monotonic()
                if left <= 0 or not sel.select(left):
                    raise TimeoutError
                chunk = os.read(fd, 1)
                if not chunk:
                    raise EOFError(f"exit status {proc.wait()}")
                buf += chunk
        return buf

    @staticmethod
    def _read_exact(proc: subprocess.Popen, n: int) -> bytearray:
        out = bytearray(n)
        view, got = memoryview(out), 0
        while got < n:
            k = proc.stdout.readinto(view[got:])
            if not k:
                raise errors.ProcessingFailed("the decoder stopped while sending the pixels")
            got += k
        return out


def decoder_for(settings: Settings) -> InProcessDecoder | IsolatedDecoder:
    """The decoder ``settings`` ask for: in a child with a deadline when ``decode_deadline_s`` > 0."""
    if settings.decode_deadline_s > 0:
        return IsolatedDecoder(settings.decode_limits, settings.decode_deadline_s, settings.decode_memory_mib)
    return InProcessDecoder(settings.decode_limits)


def _child(limits: DecodeLimits, memory_mib: int, memfd: int | None) -> None:
    import resource

    try:  # under a pod's memory limit the kernel kills this child first, not the worker
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass
    cap = memory_mib * 2**20
    try:
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    except (ValueError, OSError):  # e.g. macOS does not enforce RLIMIT_AS: the deadline still holds
        pass
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    stdout.write(b'{"ready": true}\n')
    stdout.flush()
    while True:
        head = stdin.read(LENGTH.size)
        if len(head) < LENGTH.size:
            return  # the parent closed the pipe
        body = stdin.read(LENGTH.unpack(head)[0])
        try:
            img = decode_image(body, limits)
            pixels = img.tobytes()
            if memfd is not None:
                os.ftruncate(memfd, len(pixels))
                os.pwrite(memfd, pixels, 0)
                stdout.write(json.dumps({"size": list(img.size), "memfd": True}).encode() + b"\n")
            else:
                stdout.write(json.dumps({"size": list(img.size)}).encode() + b"\n")
                stdout.write(pixels)
        except InputError as err:
            stdout.write(json.dumps({"error": type(err).__name__, "message": err.message}).encode() + b"\n")
        except MemoryError:
            stdout.write(b'{"error": "memory"}\n')
        except Exception as exc:  # a decoder bug: this request fails, the child lives on
            message = f"could not decode this image ({type(exc).__name__}: {exc})"
            stdout.write(json.dumps({"error": "ProcessingFailed", "message": message}).encode() + b"\n")
        stdout.flush()
        del body


if __name__ == "__main__":
    _child(DecodeLimits(**json.loads(sys.argv[1])), int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else None)
