"""The `resnet` console script for the tests without its ~11 s of start-up: a server process imports what the script
imports (torch, torchvision, Lightning, torchmetrics: 11 CPU-seconds a process on 2026-12-07's 2-core VM) once, then
forks a child per command. The child is the console script's process in all but the interpreter start: its own pid
and process group, the caller's environment, working directory and argv, stdout/stderr to files, the script's entry
point (`train.signals:main`), its exit status.

Protocol, one command at a time (a JSON line each way): the test sends {"id", "args", "env", "cwd", "stdout", "stderr"};
the server answers {"id", "pid"} once the child runs, then {"id", "rc"} when it ends. `RESNET_TEST_FORKS=0` turns it off
(`run_resnet` then runs the installed script)."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

RESNET = str(Path(sys.executable).parent / "resnet")


def _child(request: dict) -> int:
    os.setpgid(0, 0)  # its own process group: a timeout kills it with the processes it started
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: gone with the server
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, fd)
    if request["env"].get("PYTHONWARNINGS") == "ignore":  # read at interpreter start, which the child skips
        import warnings

        warnings.simplefilter("ignore")
    sys.argv = [RESNET, *request["args"]]
    sys.path[0] = str(Path(RESNET).parent)  # the script's folder, not the checkout, as for the installed script
    # As the console script's __main__: Lightning starts DDP's other ranks as `python <__main__'s file> args` (with a
    # __spec__ it would run `python -m tests.resnet_forks`: another server).
    import __main__

    __main__.__spec__, __main__.__file__ = None, RESNET
    from train.signals import main

    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, (int, type(None))):
            print(exc.code, file=sys.stderr)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    return code


_CHILD_EXIT: list[int] = []


def _end_child() -> None:
    """The last exit handler of a child (registered before any import registers its own; they run last-in first-out):
    past the atexit handlers of the script's run (W&B's among them), it skips the teardown of every imported module,
    ~2.5 s a command."""
    if _CHILD_EXIT:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_CHILD_EXIT[0])


def serve() -> None:
    import atexit

    atexit.register(_end_child)
    import train.cli  # noqa: F401  (what `resnet` imports before it parses the command line)
    import train.signals  # noqa: F401

    import threading

    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    reply.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        assert threading.active_count() == 1, threading.enumerate()  # a fork copies only the calling thread
        pid = os.fork()
        if pid == 0:
            # A normal interpreter exit, as the script's: atexit handlers run (W&B finishes its run there).
            code = _child(request)
            _CHILD_EXIT.append(code)
            raise SystemExit(code)
        reply.write(json.dumps({"id": request["id"], "pid": pid}) + "\n")
        _, status = os.waitpid(pid, 0)
        reply.write(json.dumps({"id": request["id"], "rc": os.waitstatus_to_exitcode(status)}) + "\n")


class ResnetForks:
    """The test side: one server per test process, started on first use with the environment `env` (the test
    process's at conftest import, not a test's monkeypatched one: what the imports read is fixed then)."""

    def __init__(self, env: dict[str, str]):
        # No CUDA driver initialised by an import in the server: a forked child could not use the GPU.
        self.env = {**env, "PYTORCH_NVML_BASED_CUDA_CHECK": "1"}
        self.server: subprocess.Popen | None = None
        self.buffer, self.requests = b"", 0

    def _start(self) -> subprocess.Popen:
        if self.server is None or self.server.poll() is not None:
            self.buffer = b""
            self.server = subprocess.Popen([sys.executable, "-m", "tests.resnet_forks"], stdin=subprocess.PIPE,
                                           stdout=subprocess.PIPE, cwd=Path(__file__).parent.parent, env=self.env)
            if self._read(180) is None:
                self._stop_server()
                raise RuntimeError("the resnet fork server did not start within 180 s")
        return self.server

    def _read(self, timeout: float) -> dict | None:
        """The next reply line, None after `timeout` s. From the pipe's descriptor: a buffered reader could hold a
        second line that `select` does not see."""
        end = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            ready, _, _ = select.select([self.server.stdout.fileno()], [], [], max(0.0, end - time.monotonic()))
            if not ready:
                return None
            chunk = os.read(self.server.stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError(f"the resnet fork server ended (exit status {self.server.wait()})")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def _stop_server(self) -> None:
        if self.server is not None:
            self.server.kill()  # its children die with it (PR_SET_PDEATHSIG)
            self.server.wait()
            self.server = None

    def run(self, args: list[str], env: dict, cwd: Path, timeout: float, tmp: Path) -> subprocess.CompletedProcess:
        if env.get("PYTHONWARNINGS", "ignore") != "ignore":
            raise ValueError("the fork server applies PYTHONWARNINGS=ignore only; use RESNET_TEST_FORKS=0")
        server = self._start()
        tmp.mkdir(parents=True, exist_ok=True)
        self.requests += 1
        request = f"{os.getpid()}-{self.requests}"
        out, err = tmp / f"{request}.out", tmp / f"{request}.err"
        pid, done = None, None
        try:
            server.stdin.write((json.dumps({"id": request, "args": list(args), "env": env, "cwd": str(cwd),
                                            "stdout": str(out), "stderr": str(err)}) + "\n").encode())
            server.stdin.flush()
            started = self._read(60)
            if started is None or started["id"] != request:
                raise RuntimeError(f"the resnet fork server did not start `resnet {' '.join(args)}`: {started}")
            pid = started["pid"]
            done = self._read(timeout)
            if done is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                done = self._read(30)
                texts = [p.read_text(errors="replace") if p.exists() else "" for p in (out, err)]
                raise subprocess.TimeoutExpired([RESNET, *args], timeout, texts[0], texts[1])
            assert done["id"] == request, (done, request)
            texts = [p.read_text(errors="replace") for p in (out, err)]
            return subprocess.CompletedProcess([RESNET, *args], done["rc"], texts[0], texts[1])
        except BaseException:
            # A timeout, a test stopped by pytest-timeout, a lost reply: no command left running, the next one gets
            # a fresh server rather than this one's stale replies.
            if pid is not None and done is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
            self._stop_server()
            raise
        finally:
            for p in (out, err):
                p.unlink(missing_ok=True)


if __name__ == "__main__":
    serve()
