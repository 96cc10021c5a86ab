"""A private Slurm cluster in a temp dir, for tests: munged, MariaDB, slurmdbd, slurmctld and one or
two slurmd, all started here in the foreground and stopped by the PIDs started here.

Why each piece: nemo-run reads a job's state with ``sacct``, and ``sacct`` needs the accounting
daemon (slurmdbd) and its database; munge signs every Slurm RPC. Every daemon gets its own socket,
pid and log files under the temp dir and ports chosen free at start, so a test cluster never
touches (or collides with) a system install. Debian 12's slurm 22.05 from apt is what this was
built against (``scripts/dev_slurm.sh`` installs it).

    python tests/slurm/cluster.py DIR   # start one for poking at by hand; Ctrl-C stops it
"""
from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

BINARIES = ("munged", "mariadbd", "mariadb-install-db", "mariadb", "slurmdbd", "slurmctld", "slurmd",
            "sbatch", "sacct", "scontrol", "sinfo", "scancel", "squeue")
CLUSTER = "dualrpo"
PARTITION = "debug"
CRED_EXPIRE = 5


def missing_binaries() -> List[str]:
    return [b for b in BINARIES if shutil.which(b, path=_sbin_path()) is None]


def _sbin_path() -> str:
    # Daemons live in /usr/sbin, which a non-login PATH may lack.
    return os.environ.get("PATH", "") + ":/usr/sbin:/sbin"


def _which(name: str) -> str:
    path = shutil.which(name, path=_sbin_path())
    if path is None:
        raise FileNotFoundError(name)
    return path


def free_ports(n: int) -> List[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class ClusterError(RuntimeError):
    """A daemon did not come up; the message carries the tail of its log."""


@dataclass
class Cluster:
    root: str
    nodes: int = 1
    cpus: int = 2
    procs: Dict[str, subprocess.Popen] = field(default_factory=dict)
    node_names: List[str] = field(default_factory=list)

    @property
    def conf(self) -> str:
        return os.path.join(self.root, "etc", "slurm.conf")

    @property
    def env(self) -> Dict[str, str]:
        """Environment for Slurm clients (sbatch, sacct, ...) talking to this cluster."""
        return dict(os.environ, SLURM_CONF=self.conf, PATH=_sbin_path())

    def _p(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def _spawn(self, name: str, argv: List[str], env: Optional[dict] = None) -> None:
        log = open(self._p("log", f"{name}.out"), "ab")
        # Own session: a Ctrl-C at the terminal or pytest's signal handling does not reach the daemons,
        # and stop() ends each by its PID.
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env or self.env,
                                            start_new_session=True)

    def _wait(self, what: str, ok, timeout: float, log: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise ClusterError(f"{name} exited with {p.returncode} while waiting for {what}:\n"
                                       + self.log_tail(name))
            if ok():
                return
            time.sleep(0.2)
        raise ClusterError(f"timed out after {timeout:.0f} s waiting for {what}:\n" + self.log_tail(log))

    def log_tail(self, name: str, n: int = 25) -> str:
        out = []
        for path in (self._p("log", f"{name}.out"), self._p("log", f"{name}.log")):
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    out += f.readlines()[-n:]
        return "".join(out)

    def start(self, timeout: float = 60.0) -> "Cluster":
        for d in ("etc", "log", "run", "db", "state", "spool"):
            os.makedirs(self._p(d), exist_ok=True)
        try:
            self._start_munge(timeout)
            self._start_db(timeout)
            self._start_slurm(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_munge(self, timeout: float) -> None:
        key = self._p("etc", "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o400)
        self.munge_socket = self._p("run", "munge.socket")
        self._spawn("munged", [_which("munged"), "--foreground", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={key}", f"--pid-file={self._p('run', 'munged.pid')}",
                               f"--log-file={self._p('log', 'munged.log')}",
                               f"--seed-file={self._p('run', 'munged.seed')}"])
        self._wait("munged's socket", lambda: os.path.exists(self.munge_socket), timeout, "munged")

    def _start_db(self, timeout: float) -> None:
        datadir, sock = self._p("db", "data"), self._p("run", "mariadb.sock")
        self.db_port, self.dbd_port = free_ports(2)
        user = ["--user=root"] if os.geteuid() == 0 else []
        subprocess.run([_which("mariadb-install-db"), "--no-defaults", f"--datadir={datadir}", "--skip-test-db",
                        "--auth-root-authentication-method=normal", *user],
                       check=True, capture_output=True, timeout=timeout)
        self._spawn("mariadb", [_which("mariadbd"), "--no-defaults", f"--datadir={datadir}", f"--socket={sock}",
                                f"--port={self.db_port}", "--bind-address=127.0.0.1", "--skip-name-resolve",
                                f"--pid-file={self._p('run', 'mariadb.pid')}",
                                f"--log-error={self._p('log', 'mariadb.log')}", *user])
        client = [_which("mariadb"), "--no-defaults", f"--socket={sock}", "-uroot"]
        self._wait("MariaDB", lambda: subprocess.run(client + ["-e", "SELECT 1"], capture_output=True).returncode == 0,
                   timeout, "mariadb")
        subprocess.run(client + ["-e", "CREATE USER 'slurm'@'127.0.0.1'; "
                                 "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"],
                       check=True, capture_output=True, timeout=timeout)

    def _write_confs(self) -> None:
        me = getpass.getuser()
        self.ctld_port, *slurmd_ports = free_ports(1 + self.nodes)
        self.node_names = [f"n{i}" for i in range(1, self.nodes + 1)]
        auth = f"AuthType=auth/munge\nAuthInfo=socket={self.munge_socket}\n"
        # A requeued job waits cred_expire + 1 s before it may start again (default 120 s, so that the
        # old attempt's step credentials are dead); the tests requeue jobs and cannot wait that long.
        ctld_auth = f"AuthType=auth/munge\nAuthInfo=socket={self.munge_socket},cred_expire={CRED_EXPIRE}\n"
        dbd = (f"{auth}DbdHost=localhost\nDbdPort={self.dbd_port}\nSlurmUser={me}\n"
               f"StorageType=accounting_storage/mysql\nStorageHost=127.0.0.1\nStoragePort={self.db_port}\n"
               f"StorageUser=slurm\nStorageLoc=slurm_acct_db\nPidFile={self._p('run', 'slurmdbd.pid')}\n"
               f"LogFile={self._p('log', 'slurmdbd.log')}\n")
        nodes = "".join(f"NodeName={n} NodeHostname=localhost NodeAddr=127.0.0.1 Port={p} CPUs={self.cpus} "
                        f"State=UNKNOWN\n" for n, p in zip(self.node_names, slurmd_ports))
        conf = (f"ClusterName={CLUSTER}\nSlurmctldHost=localhost(127.0.0.1)\nSlurmctldPort={self.ctld_port}\n"
                f"SlurmUser={me}\nSlurmdUser={me}\n{ctld_auth}CredType=cred/munge\n"
                f"StateSaveLocation={self._p('state')}\nSlurmdSpoolDir={self._p('spool', '%n')}\n"
                f"SlurmctldPidFile={self._p('run', 'slurmctld.pid')}\nSlurmdPidFile={self._p('run', 'slurmd.%n.pid')}\n"
                f"SlurmctldLogFile={self._p('log', 'slurmctld.log')}\nSlurmdLogFile={self._p('log', 'slurmd.%n.log')}\n"
                "ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\nSelectType=select/cons_tres\n"
                "SelectTypeParameters=CR_Core\nMpiDefault=none\nReturnToService=2\nJobAcctGatherType=jobacct_gather/none\n"
                "JobCompType=jobcomp/none\nAccountingStorageType=accounting_storage/slurmdbd\n"
                f"AccountingStorageHost=localhost\nAccountingStoragePort={self.dbd_port}\n"
                # The ctld -> dbd connection takes its munge socket from here, not from AuthInfo.
                f"AccountingStoragePass={self.munge_socket}\nMailProg=/bin/true\n"
                # Short grace between SIGTERM and SIGKILL, and quick state changes: tests wait on them.
                "KillWait=10\nMinJobAge=2\nInactiveLimit=0\nSlurmctldTimeout=10\nSlurmdTimeout=30\n"
                # A requeued job becomes eligible with no event to wake the scheduler: it starts at the
                # next periodic pass (60 s main, 30 s backfill by default), so passes come often here.
                "SchedulerParameters=sched_interval=2,bf_interval=1\n"
                f"{nodes}PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP\n")
        with open(self.conf, "w") as f:
            f.write(conf)
        dbd_conf = self._p("etc", "slurmdbd.conf")  # slurmdbd reads it beside $SLURM_CONF
        with open(dbd_conf, "w") as f:
            f.write(dbd)
        os.chmod(dbd_conf, 0o600)

    def _start_slurm(self, timeout: float) -> None:
        self._write_confs()
        self._spawn("slurmdbd", [_which("slurmdbd"), "-D"])
        self._wait("slurmdbd", lambda: _port_open(self.dbd_port), timeout, "slurmdbd")
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", self.conf])
        self._wait("slurmctld", lambda: self._client_ok(["scontrol", "ping"]), timeout, "slurmctld")
        for n in self.node_names:
            self._spawn(f"slurmd.{n}", [_which("slurmd"), "-D", "-N", n, "-f", self.conf])
        self._wait("idle nodes", lambda: self.idle_nodes() == len(self.node_names), timeout,
                   f"slurmd.{self.node_names[0]}")
        self._wait("the cluster in the accounting database",
                   lambda: CLUSTER in self._client_out(["sacctmgr", "-n", "-P", "list", "cluster", "format=cluster"]),
                   timeout, "slurmdbd")

    def _client_out(self, argv: List[str]) -> str:
        try:
            p = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=10)
        except subprocess.TimeoutExpired:
            return ""
        return p.stdout if p.returncode == 0 else ""

    def _client_ok(self, argv: List[str]) -> bool:
        return bool(self._client_out(argv))

    def idle_nodes(self) -> int:
        out = self._client_out(["sinfo", "-h", "-N", "-o", "%N %t"])
        return sum(1 for line in out.splitlines() if line.split()[-1:] == ["idle"])

    def run(self, *argv: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(list(argv), env=self.env, capture_output=True, text=True, timeout=timeout, check=check)

    def stop(self) -> None:
        # Jobs first: a job step (slurmstepd and its srun) outlives slurmd, so a test that failed
        # with its job still running would leave them behind on the machine.
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            try:
                self.run("scancel", "--signal=KILL", "--full", "--user", getpass.getuser(), timeout=10, check=False)
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline and self.run("squeue", "-h", timeout=10, check=False).stdout.strip():
                    time.sleep(0.5)
            except (OSError, subprocess.SubprocessError):
                pass
        # Reverse start order: compute daemons first, the database last.
        for name in reversed(list(self.procs)):
            p = self.procs.pop(name)
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=5)


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


if __name__ == "__main__":
    c = Cluster(sys.argv[1], nodes=int(os.environ.get("NODES", "1"))).start()
    print(f"export SLURM_CONF={c.conf}  # Ctrl-C stops the cluster", flush=True)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        c.stop()
