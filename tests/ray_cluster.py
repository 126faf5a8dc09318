"""Test helper: a two-node Ray cluster on this machine (``launcher.local_cluster``) owned by one test
module, with what the tests read from Ray's side (train workers, placement groups) and the recgpt
driver they run against it.

Everything lives under a private temp dir with its own ``HOME`` (so its own auth token); teardown
SIGKILLs exactly the processes of this cluster and of the drivers it started — never ``ray stop``, which
stops every Ray process of the user on the machine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from launcher.local_cluster import HEAD, NODES, SECOND, LocalCluster

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _test_env(home: Path) -> dict[str, str]:
    env = {
        **os.environ,
        "HOME": str(home),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_DEDUP_LOGS": "0",
        "PYTHONUNBUFFERED": "1",
    }
    for k in (
        "RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "LOCAL_RANK", "RANK", "WORLD_SIZE",
        "RECGPT_FAULT",
    ):  # fmt: skip
        env.pop(k, None)
    return env


class TwoNodeCluster(LocalCluster):
    """A head ({"node_head": 1}, 1 CPU) and node_b ({"node_b": 1}, 1 CPU) with 1-s node health checks."""

    def __init__(self) -> None:
        # Short path: Ray's unix sockets live under it (107-byte limit).
        root = Path(tempfile.mkdtemp(prefix="rg2n", dir="/tmp" if os.path.isdir("/tmp") else None))
        (root / "home").mkdir()
        super().__init__(root / "c", _test_env(root / "home"), head_cpus=1, node_cpus=1)
        self.base = root
        self.drivers: list[subprocess.Popen] = []

    def teardown(self) -> list[int]:
        """Kill the drivers and every process of both nodes (SIGKILL); returns the pids still alive."""
        for p in self.drivers:
            if p.poll() is None:
                p.kill()
                p.wait(30)
        self.stop(grace_s=0)
        left = [p.pid for node in NODES for p in self.processes(node)]
        if not left:
            shutil.rmtree(self.base, ignore_errors=True)
        return left

    # ---------------------------------------------------------------- Ray's view
    def train_workers(self) -> list[dict[str, Any]]:
        """The alive Ray Train workers: ``pid``, ``node_id``, ``placement_group_id`` … per actor."""
        return self.ray_list("actors", "class_name=RayTrainWorker", "state=ALIVE")

    def placement_group(self, pg_id: str) -> dict[str, Any]:
        """One placement group with its bundles (each with the ``node_id`` it was placed on)."""
        (pg,) = self.ray_list("placement-groups", f"placement_group_id={pg_id}")
        return pg

    def wait_train_workers(self, count: int, timeout: float = 300) -> list[dict[str, Any]]:
        """Poll until ``count`` Train workers are alive (the group has started); returns them."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            workers = self.train_workers()
            if len(workers) == count:
                return workers
            assert all(p.poll() is None for p in self.drivers[-1:]), (
                "the driver exited before its workers ran"
            )
            time.sleep(1)
        raise AssertionError(f"{count} Ray Train workers not alive after {timeout:.0f}s")

    def node_ids(self) -> dict[str, str | None]:
        """``{"head": id, "node_b": id}`` of the alive incarnation of each node (None: none alive)."""
        return {node: self.node_id(node) for node in (HEAD, SECOND)}

    # ---------------------------------------------------------------- a recgpt driver
    def train(self, overrides: list[str], log: Path) -> subprocess.Popen:
        """``python -m launcher train --config configs/tiny.yaml …`` connected to this cluster, without
        waiting; stdout+stderr go to ``log``. Killed by :meth:`teardown` if still running."""
        cmd = [sys.executable, "-m", "launcher", "train", "--config", "configs/tiny.yaml", *overrides]
        with open(log, "w") as out:
            proc = subprocess.Popen(
                cmd, cwd=REPO, env=self.client_env(), stdout=out, stderr=subprocess.STDOUT
            )
        self.drivers.append(proc)
        return proc
