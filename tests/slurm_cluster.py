"""A real one-node SLURM cluster for the tests: Debian's munge and slurm-wlm daemons, started from a generated
configuration in a private folder and stopped afterwards. Nothing under /etc is changed: clients find the cluster
through SLURM_CONF, and munge runs on its own socket and key."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue")


def missing_programs() -> list[str]:
    return [p for p in DAEMONS if shutil.which(p) is None and not Path("/usr/sbin", p).exists()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    """`with SlurmCluster(folder) as cluster:` one node (this machine; `cpus` CPUs, default all it has), partitions
    `debug` (the default), `preemptible` and `urgent` (whose jobs preempt those of `preemptible`).
    `cluster.env` is the environment for sbatch/scontrol/squeue."""

    def __init__(self, folder: Path, cpus: int | None = None):
        self.dir = Path(folder)
        self.cpus = cpus or os.cpu_count() or 1
        self.host = socket.gethostname()
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> "SlurmCluster":
        if os.geteuid() != 0:
            raise RuntimeError("the SLURM test cluster needs root (slurmd starts jobs as their user)")
        if missing := missing_programs():
            raise RuntimeError(f"not installed: {missing}; `apt-get install slurm-wlm munge` (the Makefile does)")
        self.dir.mkdir(parents=True, exist_ok=True)
        for parent in (self.dir, *self.dir.parents):  # the munge user must reach its socket
            if not parent.stat().st_mode & 0o001:
                raise RuntimeError(f"{parent} is closed to other users: put the cluster folder under /tmp")
        munge = pwd.getpwnam("munge")
        mdir = self.dir / "munge"
        mdir.mkdir(exist_ok=True)
        mdir.chmod(0o755)  # munged wants its socket's folder open to all
        key = mdir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        for p in (mdir, key):
            os.chown(p, munge.pw_uid, munge.pw_gid)
        self.socket = mdir / "munge.socket"
        self._start(
            ["runuser", "-u", "munge", "--", "munged", "--foreground", f"--key-file={key}", f"--socket={self.socket}",
             f"--pid-file={mdir / 'munged.pid'}", f"--log-file={mdir / 'munged.log'}", f"--seed-file={mdir / 'seed'}"],
            "munged",
        )
        self._wait_for(lambda: self.socket.exists(), "munged's socket", mdir / "munged.log")
        conf = self.write_conf()
        self.env = {**os.environ, "SLURM_CONF": str(conf)}
        self._start(["slurmctld", "-D", "-i", "-f", str(conf)], "slurmctld")
        self._start(["slurmd", "-D", "-f", str(conf), "-N", self.host], "slurmd")
        self._wait_for(self._node_idle, "the node to be idle", self.dir / "slurmd.log")
        return self

    def write_conf(self) -> Path:
        for sub in ("state", "spool"):
            (self.dir / sub).mkdir(exist_ok=True)
        conf = self.dir / "slurm.conf"
        conf.write_text(
            "\n".join(
                [
                    "ClusterName=resnet-test",
                    f"SlurmctldHost={self.host}(127.0.0.1)",
                    f"SlurmctldPort={free_port()}",
                    f"SlurmdPort={free_port()}",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    f"AuthInfo=socket={self.socket}",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    f"StateSaveLocation={self.dir / 'state'}",
                    f"SlurmdSpoolDir={self.dir / 'spool'}",
                    f"SlurmctldPidFile={self.dir / 'slurmctld.pid'}",
                    f"SlurmdPidFile={self.dir / 'slurmd.pid'}",
                    f"SlurmctldLogFile={self.dir / 'slurmctld.log'}",
                    f"SlurmdLogFile={self.dir / 'slurmd.log'}",
                    # cgroup plugins do not fit a container; these track processes by parentage.
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_CPU",
                    "SchedulerType=sched/builtin",
                    "ReturnToService=2",
                    "JobRequeue=1",
                    "MinJobAge=600",
                    "KillWait=10",
                    "MpiDefault=none",
                    "SwitchType=switch/none",
                    "JobAcctGatherType=jobacct_gather/none",
                    "AccountingStorageType=accounting_storage/none",
                    # More CPUs than the machine has may be configured (two 2-task jobs side by side on 2 cores).
                    "SlurmdParameters=config_overrides",
                    f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN",
                    # Preemption as clusters set it up: a job of `urgent` (higher PriorityTier) takes the CPUs of
                    # `preemptible` jobs, which get SIGTERM, GraceTime seconds to save, then SIGKILL, and are requeued.
                    "PreemptType=preempt/partition_prio",
                    "PreemptMode=REQUEUE",
                    "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF",
                    "PartitionName=preemptible Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE "
                    "GraceTime=20",
                    "PartitionName=urgent Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=3 PreemptMode=OFF",
                    "",
                ]
            )
        )
        return conf

    def _start(self, cmd: list[str], name: str) -> None:
        log = open(self.dir / f"{name}.stdout", "wb")
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    def _wait_for(self, ready, what: str, log: Path, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if ready():
                return
            for p in self.procs:
                if p.poll() is not None:
                    break
            time.sleep(0.5)
        tail = log.read_text()[-3000:] if log.exists() else "(no log)"
        raise RuntimeError(f"SLURM test cluster: timed out waiting for {what}; {log}:\n{tail}")

    def _node_idle(self) -> bool:
        out = self.run("sinfo", "-h", "-o", "%t", check=False).stdout.strip()
        return out == "idle"

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run_env(self.env, *cmd, check=check)

    def run_env(self, env: dict[str, str], *cmd: str, check: bool = True, cwd: Path | None = None):
        """A client command with `env` (which must keep SLURM_CONF), from `cwd` (default: the repository)."""
        proc = subprocess.run(list(cmd), env=env, capture_output=True, text=True, timeout=60, cwd=cwd or REPO)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stdout}{proc.stderr}")
        return proc

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, RestartCount, ExitCode, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(field.split("=", 1) for field in out.split() if "=" in field)

    def __exit__(self, *exc) -> None:
        # Jobs first (a failed test may leave one running): their slurmstepd would outlive the daemons.
        if getattr(self, "env", None):
            jobs = self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
            if jobs:
                self.run("scancel", *jobs, check=False)
                end = time.monotonic() + 30
                while self.run("squeue", "-h", "-o", "%i", check=False).stdout.split() and time.monotonic() < end:
                    time.sleep(0.5)
        for p in reversed(self.procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
