"""A two-node Ray cluster on this machine: a head and a second node, each its own ``ray start``.

For trying what only a multi-node cluster shows — ``ray.placement_strategy=STRICT_SPREAD`` (one worker
per node) and the loss of a whole node mid-training — without a second host, and for the tests that
check both. ``cluster/local_two_nodes.sh`` is its command line
(``start | stop | status | kill-node | add-node``; see docs/cluster.md).

Each node gets

* its own label resource, ``{"node_head": 1}`` / ``{"node_b": 1}``: Ray's view of which node a worker
  landed on can be read from the resources of its node (``ray list nodes``);
* its own ``--temp-dir`` under the cluster directory (Ray 2.60 takes it per node). That is how its
  processes are found: each one has the directory in its command line or descends from one that has
  (the raylet forks the workers and agents). Nothing else on the machine is touched; ``ray stop``
  would stop every Ray process of this user, other clusters and other people's tests included;
* its own ports (GCS, dashboard and client server on the head; node manager, object manager, metrics,
  dashboard agent and runtime-env agent on each node), free at start; worker ports are left to the OS.

Token authentication is on (``RAY_AUTH_MODE=token``) with ``ray get-auth-token --generate``'s token
(``$HOME/.ray/auth_token``, or ``RAY_AUTH_TOKEN_PATH``): clients need the same two. Ray advertises the
host's address even when told 127.0.0.1 (it resolves loopback to the host's IP so that other nodes could
reach it), and its gRPC servers listen on every interface: the token is what keeps other hosts out.

Node loss is noticed by the head's GCS, which health-checks every raylet: ``RAY_health_check_period_ms``
apart, each with ``RAY_health_check_timeout_ms``, dead after ``RAY_health_check_failure_threshold``
failures in a row (Ray 2.60's defaults: 3000 ms, 10000 ms, 5 — a killed node is declared dead about
15 s later, a silent one up to ~65 s). :data:`FAST_FAILURE_DETECTION` is set on both nodes by default.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import psutil

from configs import RecgptError

HEAD = "head"
SECOND = "node_b"
NODES = (HEAD, SECOND)
STATE_FILE = "cluster.json"
DEFAULT_DIR = "/tmp/recgpt-2nodes"
# Ray's unix sockets live at <dir>/<node>/session_<date>_<pid>/sockets/<name> and a socket path has at
# most 107 bytes: a longer cluster directory makes `ray start` fail far from the cause.
MAX_DIR_CHARS = 40
# 1 s health checks, dead after 3 failures: a lost node is noticed in ~3 s instead of ~15 s. Costs one
# tiny gRPC call per node per second; a node that stalls for 3 s (swapping, a paused VM) is then
# declared dead too, so production clusters with flaky hosts may prefer Ray's defaults.
FAST_FAILURE_DETECTION = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}
START_TIMEOUT_S = 180.0  # one `ray start` on a loaded 2-core machine takes 5-20 s


class LocalClusterError(RecgptError):
    """The local cluster cannot do what was asked (already running, `ray start` failed, ...)."""


def label(node: str) -> str:
    """The custom resource that marks ``node`` (``node_head`` / ``node_b``)."""
    return "node_head" if node == HEAD else node


def _ray_exe() -> str:
    """The ``ray`` CLI of this Python's environment (a venv's), else the one on PATH."""
    exe = Path(sys.executable).parent / "ray"
    return str(exe) if exe.exists() else "ray"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(p: psutil.Process) -> bool:
    """Running and not a zombie (a killed process its parent has not reaped yet is gone for us)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class LocalCluster:
    """The head and the second node of one cluster directory (its state in ``<root>/cluster.json``).

    ``env``: the environment of the ``ray start`` processes — it is inherited by every Ray worker of
    that node (``OMP_NUM_THREADS``, ``HOME`` for the token, ...); default this process's.
    ``head_cpus`` / ``node_cpus``: logical CPUs each node offers Ray (``--num-cpus``).
    ``object_store_mb``: each node's object store (MiB; Ray's default would be 30% of RAM per node).
    ``fast_failure_detection``: set :data:`FAST_FAILURE_DETECTION` on the nodes (values already in
    ``env`` win).
    """

    def __init__(
        self,
        root: str | os.PathLike = DEFAULT_DIR,
        env: dict[str, str] | None = None,
        *,
        head_cpus: int = 1,
        node_cpus: int = 1,
        object_store_mb: int = 256,
        fast_failure_detection: bool = True,
    ) -> None:
        self.root = Path(root).absolute()
        self.env = dict(os.environ if env is None else env)
        if fast_failure_detection:
            self.env = {**FAST_FAILURE_DETECTION, **self.env}
        self.env.update(RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0")
        self.env.pop("RAY_ADDRESS", None)  # `ray start --head` must not join whatever cluster that names
        self.cpus = {HEAD: head_cpus, SECOND: node_cpus}
        self.object_store_mb = object_store_mb
        self.port = 0
        self.dashboard_port = 0
        if (self.root / STATE_FILE).is_file():
            self._load()

    # ------------------------------------------------------------------ addresses
    @property
    def address(self) -> str:
        """The GCS address for ``RAY_ADDRESS`` / ``ray.init`` (``127.0.0.1:<port>``)."""
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard(self) -> str:
        """The dashboard / job API URL (``ray job submit --address``, ``ray list … --address``)."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    def client_env(self) -> dict[str, str]:
        """The environment of a client of this cluster (a ``recgpt train`` driver, ``ray job …``)."""
        return {**self.env, "RAY_ADDRESS": self.address}

    def temp_dir(self, node: str) -> Path:
        return self.root / node

    def _load(self) -> None:
        state = json.loads((self.root / STATE_FILE).read_text())
        self.port, self.dashboard_port = state["port"], state["dashboard_port"]
        self.cpus = {k: int(v) for k, v in state["cpus"].items()}
        self.object_store_mb = state["object_store_mb"]

    def _save(self) -> None:
        state = {
            "port": self.port,
            "dashboard_port": self.dashboard_port,
            "cpus": self.cpus,
            "object_store_mb": self.object_store_mb,
        }
        (self.root / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")

    # ------------------------------------------------------------------ ray CLI
    def ray(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        """Run the ``ray`` CLI (the one next to this Python) with the cluster's environment.

        Raises LocalClusterError with its output when it fails and ``check`` is set."""
        proc = subprocess.run(
            [_ray_exe(), *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-5:])
            raise LocalClusterError(f"ray {args[0]} {args[1] if len(args) > 1 else ''} failed: {tail}")
        return proc

    def nodes(self) -> list[dict[str, Any]]:
        """Ray's node table (``ray list nodes --detail``): alive and dead nodes, each with ``node_id``,
        ``state`` (ALIVE/DEAD), ``is_head_node`` and ``resources_total`` (the label resource says which
        of our nodes it is)."""
        return self.ray_list("nodes")

    def ray_list(self, kind: str, *filters: str) -> list[dict[str, Any]]:
        """``ray list <kind> --detail`` with ``--filter`` for each of ``filters`` (``key=value``)."""
        args = ["list", kind, "--address", self.dashboard, "--format", "json", "--detail"]
        out = self.ray(*args, *(a for f in filters for a in ("--filter", f))).stdout
        # An empty table is the text "No resource in the cluster", not "[]".
        return json.loads(out) if out.lstrip().startswith("[") else []

    def node_id(self, node: str) -> str | None:
        """Ray's id of the alive incarnation of ``node`` (None when Ray has no alive one)."""
        for n in self.nodes():
            if n["state"] == "ALIVE" and label(node) in n["resources_total"]:
                return n["node_id"]
        return None

    def wait_node(self, node_id: str, state: str, timeout: float = 120) -> dict[str, Any]:
        """Wait until Ray's node table shows ``node_id`` in ``state``; returns its row (a DEAD node's
        ``end_time_ms`` is when the GCS declared it dead, local time as text).

        Raises LocalClusterError after ``timeout`` seconds."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            for n in self.nodes():
                if n["node_id"] == node_id and n["state"] == state:
                    return n
            time.sleep(0.5)
        raise LocalClusterError(f"node {node_id[:12]} not {state} after {timeout:.0f}s")

    # ------------------------------------------------------------------ processes
    def processes(self, node: str) -> list[psutil.Process]:
        """Every live process of ``node``: its command line names the node's temp dir, or it descends
        from such a process. Never this process or its parents."""
        d = str(self.temp_dir(node))
        me = psutil.Process()
        spare = {me.pid, *(p.pid for p in me.parents())}
        found: dict[int, psutil.Process] = {}
        # The head's Ray Client server names only the GCS address (host IP and the head's port).
        client = f":{self.port}" if node == HEAD else None
        for p in psutil.process_iter(["cmdline"]):
            args = p.info["cmdline"] or []
            mine = any(a == d or a.endswith(f"={d}") or f"{d}/" in a for a in args) or (
                client is not None
                and "ray.util.client.server" in args
                and any(a.startswith("--address=") and a.endswith(client) for a in args)
            )
            if p.pid in spare or not mine:
                continue
            found[p.pid] = p
            try:
                found.update({c.pid: c for c in p.children(recursive=True)})
            except psutil.NoSuchProcess:
                pass
        return [p for pid, p in found.items() if pid not in spare and _alive(p)]

    def running(self, node: str) -> bool:
        return bool(self.processes(node))

    def _signal_all(self, procs: list[psutil.Process], sig: int) -> None:
        for p in procs:
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass

    def kill_node(self, node: str = SECOND) -> list[int]:
        """SIGKILL every process of ``node`` — the raylet (with its object store), the dashboard and
        runtime-env agents, the log monitor and the Ray workers on it — at once, like a host that loses
        power. Returns the pids killed.

        Raises LocalClusterError when the node has no process. The head is refused: the cluster
        (its GCS) would be gone, not one node."""
        if node == HEAD:
            raise LocalClusterError("kill-node: the head holds the cluster's GCS; stop the cluster instead")
        procs = self.processes(node)
        if not procs:
            raise LocalClusterError(f"{node}: no running process under {self.temp_dir(node)}")
        killed: list[int] = []
        # A second sweep: the raylet may have forked a worker between the scan and its own death
        # (workers name the node's session directory in their command line, so the scan finds them).
        for _ in range(3):
            if not procs:
                return killed
            self._signal_all(procs, signal.SIGKILL)
            _, alive = psutil.wait_procs(procs, timeout=30)
            if alive:
                raise LocalClusterError(f"{node}: processes survived SIGKILL: {[p.pid for p in alive]}")
            killed += [p.pid for p in procs]
            procs = self.processes(node)
        raise LocalClusterError(f"{node}: new processes keep appearing: {[p.pid for p in procs]}")

    def stop(self, grace_s: float = 10.0) -> int:
        """Stop both nodes: SIGTERM (the second node first), SIGKILL what is left after ``grace_s``.

        Returns the number of processes stopped (0: nothing was running)."""
        procs = [p for node in (SECOND, HEAD) for p in self.processes(node)]
        self._signal_all(procs, signal.SIGTERM)
        _, alive = psutil.wait_procs(procs, timeout=grace_s)
        self._signal_all(alive, signal.SIGKILL)
        psutil.wait_procs(alive, timeout=30)
        # A process started while we were stopping (a raylet's new worker): one more round.
        late = [p for node in NODES for p in self.processes(node)]
        self._signal_all(late, signal.SIGKILL)
        psutil.wait_procs(late, timeout=30)
        return len(procs) + len(late)

    # ------------------------------------------------------------------ starting
    def _node_args(self, node: str) -> list[str]:
        tmp = self.temp_dir(node)
        # A node started again after a kill: its old session directory holds stale unix sockets and
        # logs; keep the logs beside it, give the new incarnation a clean directory.
        if tmp.exists():
            tmp.rename(tmp.with_name(f"{node}.dead-{time.strftime('%H%M%S')}-{time.time_ns() % 1000:03d}"))
        return [
            "--node-ip-address", "127.0.0.1",
            "--num-cpus", str(self.cpus[node]),
            "--resources", json.dumps({label(node): 1}),
            "--temp-dir", str(tmp),
            "--object-store-memory", str(self.object_store_mb * 2**20),
            "--node-manager-port", str(_free_port()),
            "--object-manager-port", str(_free_port()),
            "--metrics-export-port", str(_free_port()),
            "--dashboard-agent-listen-port", str(_free_port()),
            "--dashboard-agent-grpc-port", str(_free_port()),
            "--runtime-env-agent-port", str(_free_port()),
            "--min-worker-port", "0", "--max-worker-port", "0",  # 0: the OS picks each worker's port
            "--disable-usage-stats",
        ]  # fmt: skip

    def _ray_start(self, node: str, args: list[str]) -> None:
        log = self.root / f"{node}.start.log"
        with open(log, "a") as out:
            proc = subprocess.run(
                [_ray_exe(), "start", *args],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=START_TIMEOUT_S,
                # Its own session: the node's daemons outlive this process and a Ctrl-C in this terminal.
                start_new_session=True,
            )
        if proc.returncode != 0:
            tail = " | ".join(log.read_text().strip().splitlines()[-3:])
            raise LocalClusterError(f"{node}: ray start failed ({proc.returncode}), see {log}: {tail}")

    def start(self) -> None:
        """Start the head, then the second node; returns once Ray lists both alive.

        Raises LocalClusterError when a node of this directory is still running or ``ray start``
        fails (both nodes are stopped again then)."""
        if len(str(self.root)) > MAX_DIR_CHARS:
            raise LocalClusterError(
                f"{self.root}: at most {MAX_DIR_CHARS} characters (Ray's unix socket paths must fit 107 bytes)"
            )
        if any(self.running(n) for n in NODES):
            raise LocalClusterError(f"{self.root}: a cluster is running there; stop it first")
        self.root.mkdir(parents=True, exist_ok=True)
        # With RAY_AUTH_MODE=token `ray start` needs a token; --generate creates one only if none exists.
        self.ray("get-auth-token", "--generate")
        self.port, self.dashboard_port = _free_port(), _free_port()
        self._save()
        try:
            head = [
                "--head", "--port", str(self.port),
                "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
                "--ray-client-server-port", str(_free_port()),
            ]  # fmt: skip
            self._ray_start(HEAD, [*head, *self._node_args(HEAD)])
            self.add_node(SECOND)
        except BaseException:
            self.stop(grace_s=0)
            raise

    def add_node(self, node: str = SECOND, timeout: float = START_TIMEOUT_S) -> str:
        """Start ``node`` (again) and join it to the head; returns its Ray node id once it is ALIVE.

        Raises LocalClusterError when it is still running or does not come up within ``timeout`` s."""
        if node not in NODES or node == HEAD:
            raise LocalClusterError(f"add-node: {node!r} is not a second node (the head is started by start)")
        if not self.running(HEAD):
            raise LocalClusterError(f"{self.root}: the head is not running; start the cluster first")
        if self.running(node):
            raise LocalClusterError(f"{node}: already running")
        # A node killed a moment ago may still be ALIVE in Ray's table (until its health checks fail):
        # only a node id Ray has not seen before is the new incarnation.
        known = {n["node_id"] for n in self.nodes()}
        self._ray_start(node, ["--address", self.address, *self._node_args(node)])
        deadline = time.time() + timeout
        while time.time() < deadline:
            for n in self.nodes():
                if (
                    n["node_id"] not in known
                    and n["state"] == "ALIVE"
                    and label(node) in n["resources_total"]
                ):
                    return n["node_id"]
            time.sleep(0.5)
        raise LocalClusterError(f"{node}: started but not ALIVE in Ray after {timeout:.0f}s")

    # ------------------------------------------------------------------ status
    def status_lines(self) -> list[str]:
        """What ``status`` prints: each node's processes and Ray's view of it, and how to connect."""
        if not any(self.running(n) for n in NODES):
            return [f"{self.root}: not running"]
        lines = [f"{self.root}: GCS {self.address}, dashboard {self.dashboard}"]
        table = self.nodes() if self.running(HEAD) else []
        for node in NODES:
            alive = [n for n in table if n["state"] == "ALIVE" and label(node) in n["resources_total"]]
            ray_view = (
                f"Ray: ALIVE {alive[0]['node_id'][:12]} CPU {alive[0]['resources_total'].get('CPU', 0):g}"
                if alive
                else "Ray: no alive node"
            )
            lines.append(f"  {node:<7} {len(self.processes(node)):>3} processes  {ray_view}")
        lines.append(f"clients: export RAY_AUTH_MODE=token RAY_ADDRESS={self.address}")
        return lines


# --------------------------------------------------------------------------- command line


class _OneLineParser(argparse.ArgumentParser):
    """Usage mistakes are one line on stderr and exit 2, like every other error of the script."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(
        prog="local_two_nodes.sh",
        description="A two-node Ray cluster on this machine (a head and node_b, token auth on), for "
        "trying STRICT_SPREAD placement and node loss. See docs/cluster.md.",
    )
    p.add_argument("action", choices=["start", "stop", "status", "kill-node", "add-node"])
    p.add_argument("--dir", default=DEFAULT_DIR, help=f"cluster directory (default {DEFAULT_DIR})")
    p.add_argument("--head-cpus", type=int, default=1, help="CPUs the head offers Ray (default 1)")
    p.add_argument("--node-cpus", type=int, default=1, help="CPUs node_b offers Ray (default 1)")
    p.add_argument(
        "--object-store-mb", type=int, default=256, help="object store per node, MiB (default 256)"
    )
    p.add_argument(
        "--ray-health-defaults",
        action="store_true",
        help="keep Ray's node health-check timing (a lost node is noticed after ~15 s instead of ~3 s)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``start | stop | status | kill-node | add-node``; exit 0, or 2 with one line on stderr."""
    args = build_parser().parse_args(argv)
    env = dict(os.environ)
    # Two nodes on one machine: torch in each worker would otherwise start a thread per core each.
    env.setdefault("OMP_NUM_THREADS", str(max(args.head_cpus, args.node_cpus)))
    try:
        for flag, value, least in (
            ("--head-cpus", args.head_cpus, 1),
            ("--node-cpus", args.node_cpus, 1),
            ("--object-store-mb", args.object_store_mb, 75),  # Ray's minimum object store
        ):
            if value < least:
                raise LocalClusterError(f"{flag}: got {value}, must be >= {least}")
        cluster = LocalCluster(
            args.dir,
            env,
            head_cpus=args.head_cpus,
            node_cpus=args.node_cpus,
            object_store_mb=args.object_store_mb,
            fast_failure_detection=not args.ray_health_defaults,
        )
        if args.action == "start":
            cluster.start()
            print("\n".join(cluster.status_lines()))
        elif args.action == "stop":
            n = cluster.stop()
            print(f"{cluster.root}: stopped {n} processes" if n else f"{cluster.root}: not running")
            if n and (cluster.root / STATE_FILE).exists():
                (cluster.root / STATE_FILE).unlink()
        elif args.action == "status":
            print("\n".join(cluster.status_lines()))
        elif args.action == "kill-node":
            pids = cluster.kill_node(SECOND)
            print(f"{SECOND}: SIGKILLed {len(pids)} processes at {time.strftime('%H:%M:%S')}")
        else:
            node_id = cluster.add_node(SECOND)
            print(f"{SECOND}: ALIVE as {node_id[:12]}")
    except (RecgptError, subprocess.TimeoutExpired) as e:
        print(f"local_two_nodes {args.action}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["FAST_FAILURE_DETECTION", "HEAD", "SECOND", "LocalCluster", "LocalClusterError", "label", "main"]
