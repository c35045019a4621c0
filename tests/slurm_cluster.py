"""A real SLURM cluster for the tests: Debian's munge and slurm-wlm daemons, started from a generated configuration
in a private folder and stopped afterwards. Nothing under /etc is changed: clients find the cluster through
SLURM_CONF, and munge runs on its own socket and key.

One node is this machine under its own name. Several nodes (`nodes=2` or 3) are several slurmd daemons side by
side (`slurmd -N nodeI`, each with its own port, spool, pid and log: `%n` in slurm.conf), each started in a private
mount namespace (`unshare --mount`) where a bind-mounted /etc/hosts maps node1, node2, ... to 127.0.1.1, 127.0.1.2,
... and where `cluster.local` (the same path on every node, as /local or $TMPDIR on a real cluster) is that node's
own scratch folder. Job processes inherit their node's namespace; the machine's own files are untouched."""

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
    """`with SlurmCluster(folder) as cluster:` one node (this machine; `cpus` CPUs, default all it has) or `nodes`
    nodes (node1, node2, ...: `cpus` each), partitions `debug` (the default), `preemptible` and `urgent` (whose jobs
    preempt those of `preemptible`). `cluster.env` is the environment for sbatch/scontrol/squeue."""

    def __init__(self, folder: Path, cpus: int | None = None, nodes: int = 1):
        self.dir = Path(folder)
        self.cpus = cpus or os.cpu_count() or 1
        self.host = socket.gethostname()
        self.names = [self.host] if nodes == 1 else [f"node{i}" for i in range(1, nodes + 1)]
        self.addrs = ["127.0.0.1"] if nodes == 1 else [f"127.0.1.{i}" for i in range(1, nodes + 1)]
        self.local = self.dir / "local"  # node-local scratch: each node sees its own folder here
        self.procs: list[subprocess.Popen] = []
        self.slurmd: dict[str, subprocess.Popen] = {}

    def __enter__(self) -> "SlurmCluster":
        try:
            return self._start_cluster()
        except BaseException:
            self.__exit__()  # a cluster that did not come up leaves no daemon behind
            raise

    def _start_cluster(self) -> "SlurmCluster":
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
        self._start(self._in_namespace(["slurmctld", "-D", "-i", "-f", str(conf)]), "slurmctld")
        for name in self.names:
            self.start_node(name)
        self._wait_for(self._nodes_idle, "the nodes to be idle", self.dir / f"slurmd-{self.names[-1]}.log")
        return self

    def _in_namespace(self, cmd: list[str], node: str | None = None) -> list[str]:
        """`cmd` in a private mount namespace with the cluster's /etc/hosts (and `node`'s scratch at self.local);
        as it is with one node, which is this machine under its own name."""
        if len(self.names) == 1:
            return cmd
        mounts = [f"mount --bind {self.dir / 'hosts'} /etc/hosts"]
        if node is not None:
            scratch = self.dir / "nodes" / node / "local"
            scratch.mkdir(parents=True, exist_ok=True)
            mounts.append(f"mount --bind {scratch} {self.local}")
        return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                " && ".join(mounts) + ' && exec "$@"', "node-namespace", *cmd]

    def start_node(self, name: str) -> None:
        """Starts (or restarts, after `stop_node`) the slurmd of node `name`."""
        self.slurmd[name] = self._start(
            self._in_namespace(["slurmd", "-D", "-f", str(self.dir / "slurm.conf"), "-N", name], name),
            f"slurmd-{name}", {"RESNET_TEST_NODE": name})

    def node_processes(self, name: str) -> list[int]:
        """The pids of everything running on node `name`: its slurmd and slurmstepd (RESNET_TEST_NODE, set when
        started) and the job processes they started (SLURMD_NODENAME)."""
        marks = (f"RESNET_TEST_NODE={name}".encode(), f"SLURMD_NODENAME={name}".encode())
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    environ = (entry / "environ").read_bytes().split(b"\0")
                except OSError:
                    continue
                if any(mark in environ for mark in marks):
                    pids.append(int(entry.name))
        return pids

    def signal_node(self, name: str, signum: int) -> None:
        """`signum` to every process of node `name` at once: SIGSTOP makes it a node that stops answering (a lost
        network, a hung kernel: peers' connections hang, no process exits), SIGKILL then powers it off."""
        for pid in self.node_processes(name):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def write_conf(self) -> Path:
        for sub in ("state", *(f"spool/{name}" for name in self.names)):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        if len(self.names) > 1:
            self.local.mkdir(exist_ok=True)
            own = Path("/etc/hosts").read_text()
            (self.dir / "hosts").write_text(own + "".join(f"{a} {n}\n" for a, n in zip(self.addrs, self.names)))
        node_lines = [f"NodeName={n} NodeAddr={a} CPUs={self.cpus} State=UNKNOWN"
                      + (f" Port={free_port()}" if len(self.names) > 1 else "")
                      for n, a in zip(self.names, self.addrs)]
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
                    f"SlurmdSpoolDir={self.dir / 'spool' / '%n'}",
                    f"SlurmctldPidFile={self.dir / 'slurmctld.pid'}",
                    f"SlurmdPidFile={self.dir / 'slurmd-%n.pid'}",
                    f"SlurmctldLogFile={self.dir / 'slurmctld.log'}",
                    f"SlurmdLogFile={self.dir / 'slurmd-%n.log'}",
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
                    # A lost node is noticed within SlurmdTimeout (default 300 s) and its batch jobs requeued.
                    "SlurmdTimeout=10",
                    *node_lines,
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

    def _start(self, cmd: list[str], name: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.dir / f"{name}.stdout", "ab")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})})
        self.procs.append(proc)
        return proc

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

    def _nodes_idle(self) -> bool:
        lines = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.splitlines()
        states = dict(line.split() for line in lines if line.strip())  # a line per node and partition
        return sorted(states) == sorted(self.names) and set(states.values()) == {"idle"}

    def wait_idle(self, timeout: float = 60) -> None:
        """Until every node is idle (e.g. a restarted one back in service)."""
        self._wait_for(self._nodes_idle, "the nodes to be idle", self.dir / "slurmctld.log", timeout)

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
