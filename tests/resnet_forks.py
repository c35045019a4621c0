"""The `resnet` console script for the tests without its ~11 s of start-up: a server process imports what the script
imports (torch, torchvision, Lightning, torchmetrics: 11 CPU-seconds a process on 2026-12-07's 2-core VM) once, then
forks a child per command. The child is the console script's process in all but the interpreter start: its own pid
and process group, the caller's environment, working directory and argv, stdout/stderr to files, the script's entry
point (`train.signals:main`), its exit status.

Protocol, one command at a time (a JSON line each way): the test sends {"args", "env", "cwd", "stdout", "stderr"};
the server answers {"pid"} once the child runs, then {"rc"} when it ends. `RESNET_TEST_FORKS=0` turns it off
(`run_resnet` then runs the installed script)."""

from __future__ import annotations

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


def serve() -> None:
    import train.cli  # noqa: F401  (what `resnet` imports before it parses the command line)
    import train.signals  # noqa: F401

    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    reply.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            # A normal interpreter exit, as the script's: atexit handlers run (W&B finishes its run there).
            raise SystemExit(_child(request))
        reply.write(json.dumps({"pid": pid}) + "\n")
        _, status = os.waitpid(pid, 0)
        reply.write(json.dumps({"rc": os.waitstatus_to_exitcode(status)}) + "\n")


class ResnetForks:
    """The test side: one server per test process, started on first use."""

    def __init__(self):
        self.server: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        if self.server is None or self.server.poll() is not None:
            self.server = subprocess.Popen([sys.executable, "-m", "tests.resnet_forks"], stdin=subprocess.PIPE,
                                           stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
            self._read(120)
        return self.server

    def _read(self, timeout: float) -> dict | None:
        ready, _, _ = select.select([self.server.stdout], [], [], max(0.0, timeout))
        if not ready:
            return None
        line = self.server.stdout.readline()
        if not line:
            raise RuntimeError(f"the resnet fork server ended (exit status {self.server.wait()})")
        return json.loads(line)

    def run(self, args: list[str], env: dict, cwd: Path, timeout: float, tmp: Path) -> subprocess.CompletedProcess:
        server = self._start()
        tmp.mkdir(parents=True, exist_ok=True)
        out, err = tmp / f"{os.getpid()}-{time.monotonic_ns()}.out", tmp / f"{os.getpid()}-{time.monotonic_ns()}.err"
        server.stdin.write(json.dumps({"args": list(args), "env": env, "cwd": str(cwd), "stdout": str(out),
                                       "stderr": str(err)}) + "\n")
        server.stdin.flush()
        pid = self._read(30)["pid"]
        end = time.monotonic() + timeout
        done = self._read(end - time.monotonic())
        if done is None:
            os.killpg(pid, signal.SIGKILL)
            self._read(30)
        texts = [p.read_text(errors="replace") for p in (out, err)]
        for p in (out, err):
            p.unlink()
        if done is None:
            raise subprocess.TimeoutExpired([RESNET, *args], timeout, texts[0], texts[1])
        return subprocess.CompletedProcess([RESNET, *args], done["rc"], texts[0], texts[1])


if __name__ == "__main__":
    serve()
