"""Two Ray nodes on this machine (``launcher.local_cluster``): STRICT_SPREAD placement, losing a node.

The cluster is a head ({"node_head": 1}) and node_b ({"node_b": 1}), one CPU each, token auth on, GCS
health checks every second (a lost node is declared dead after 3 missed checks). Both tests run the same
12-step 2-worker recgpt run (checkpoints every 4 steps, every step logged); the first one is also the
uninterrupted reference of the second. Placement is read from Ray's actor and placement-group tables,
not inferred from the strategy.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from launcher.local_cluster import HEAD, SECOND
from tests.conftest import losses, train_log
from tests.ray_cluster import TwoNodeCluster

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.distributed]

RUN = [
    "train.max_steps=12",
    "train.checkpoint_interval=4",
    "train.eval_interval=4",
    "train.log_interval=1",  # every step has a timestamped record: the recovery time is read from it
    "ray.num_workers=2",
    "ray.placement_strategy=STRICT_SPREAD",
]
RUN_TIMEOUT_S = 600  # worker start-up (torch + DeepSpeed imports) is slow on a loaded 2-core machine
WORKER_LINE = re.compile(r"worker rank (\d+)/2 pid (\d+) node ([0-9a-f]+) ")


@pytest.fixture(scope="module")
def cluster():
    c = TwoNodeCluster()
    try:
        c.start()
        yield c
    finally:
        left = c.teardown()
        assert not left, f"processes of the test cluster survived teardown: {left}"


@dataclass
class SpreadRun:
    dir: Path
    log: str
    metrics: dict[str, Any]
    workers: list[dict[str, Any]]  # Ray's actor table while the group ran
    bundle_nodes: list[str]  # node id of each bundle of the group's placement group
    node_ids: dict[str, str | None]  # our node name -> Ray node id


def _final_metrics(log: str) -> dict[str, Any]:
    lines = [ln for ln in log.splitlines() if ln.startswith('{"final_metrics"')]
    assert lines, f"no final metrics line:\n{log[-5000:]}"
    return json.loads(lines[-1])["final_metrics"]


def _logged_nodes(log: str) -> dict[int, str]:
    """pid -> Ray node id, from the line each worker logs when it starts."""
    return {int(pid): node for _, pid, node in WORKER_LINE.findall(log)}


@pytest.fixture(scope="module")
def spread_run(cluster, sample_shards) -> SpreadRun:
    """The uninterrupted 2-worker STRICT_SPREAD run, with Ray's view of where its workers ran."""
    storage = cluster.base / "storage"
    log = cluster.base / "clean.log"
    proc = cluster.train(
        [f"data.shards={sample_shards}", *RUN, f"ray.storage_path={storage}", "ray.name=clean"], log
    )
    workers = cluster.wait_train_workers(2)
    pg = cluster.placement_group(workers[0]["placement_group_id"])
    node_ids = cluster.node_ids()
    rc = proc.wait(RUN_TIMEOUT_S)
    text = log.read_text()
    assert rc == 0, text[-5000:]
    bundle_nodes = [b["node_id"] for b in pg["bundles"]]
    return SpreadRun(storage / "clean", text, _final_metrics(text), workers, bundle_nodes, node_ids)


def test_strict_spread_puts_one_worker_on_each_node(spread_run):
    head, node_b = spread_run.node_ids[HEAD], spread_run.node_ids[SECOND]
    assert head and node_b and head != node_b
    # Ray's actor table: the two Train workers of the group, one on each node.
    assert sorted(w["node_id"] for w in spread_run.workers) == sorted([head, node_b])
    assert len({w["placement_group_id"] for w in spread_run.workers}) == 1
    # ... in the group's placement group, whose two bundles Ray put on the two nodes.
    assert sorted(spread_run.bundle_nodes) == sorted([head, node_b])
    # Each worker logs the node Ray says it runs on.
    logged = _logged_nodes(spread_run.log)
    assert logged == {int(w["pid"]): w["node_id"] for w in spread_run.workers}, spread_run.log[-3000:]
    assert spread_run.metrics["step"] == 12 and "ndcg@10" in spread_run.metrics


def test_losing_a_node_restarts_the_group_and_matches_uninterrupted(
    cluster, sample_shards, spread_run, capsys
):
    storage = cluster.base / "storage"
    run_dir = storage / "node-loss"
    log = cluster.base / "node-loss.log"
    proc = cluster.train(
        [f"data.shards={sample_shards}", *RUN, f"ray.storage_path={storage}", "ray.name=node-loss"], log
    )
    workers = cluster.wait_train_workers(2)
    old_b = cluster.node_id(SECOND)
    on_b = [int(w["pid"]) for w in workers if w["node_id"] == old_b]
    assert len(on_b) == 1, workers
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.time() + RUN_TIMEOUT_S
    while not latest.exists():  # lose the node after the first complete checkpoint, mid-training
        assert proc.poll() is None, log.read_text()[-5000:]
        assert time.time() < deadline, "no checkpoint before the deadline"
        time.sleep(0.2)
    checkpoint_at_kill = latest.read_text().strip()
    assert proc.poll() is None, "the run ended before the node was lost"

    t_kill = time.time()
    killed = cluster.kill_node(SECOND)  # raylet, object store, agents, log monitor, the Train worker
    assert on_b[0] in killed, (on_b, killed)
    dead = cluster.wait_node(old_b, "DEAD", timeout=60)
    t_dead = datetime.fromisoformat(dead["end_time_ms"]).timestamp()  # the GCS's own time of death
    new_b = cluster.add_node(SECOND)  # the replacement joins with the same label
    t_back = time.time()
    rc = proc.wait(RUN_TIMEOUT_S)
    text = log.read_text()
    assert rc == 0, text[-5000:]

    # Ray Train restarted the whole group: a second start of both ranks, on the head and the new node_b.
    assert text.count("worker rank 0/2") == 2 and text.count("worker rank 1/2") == 2, text[-5000:]
    starts = WORKER_LINE.findall(text)
    assert {node for _, _, node in starts[2:]} == {cluster.node_id(HEAD), new_b} and new_b != old_b
    m = re.search(r"resumed from \S+/(step_\d+) at step (\d+)", text)
    assert m, text[-5000:]
    assert m.group(1) >= checkpoint_at_kill  # the latest complete checkpoint at the time of the loss

    records = train_log(run_dir)
    after = [r for r in records if r["kind"] == "train" and r["time"] > t_kill]
    assert after and after[0]["step"] == int(m.group(2)) + 1, after[:2]
    recovery_s = after[0]["time"] - t_kill
    with capsys.disabled():  # the figure docs/cluster.md quotes, shown without -s
        print(
            f"\nnode loss -> training again: {recovery_s:.1f} s (Ray declared the node dead after "
            f"{t_dead - t_kill:.1f} s, the replacement node was ALIVE after {t_back - t_kill:.1f} s; "
            f"resumed from {m.group(1)}, first step {after[0]['step']})"
        )
    # 1-s health checks, 3 misses: ~3 s; Ray's defaults (3 s x 5) take ~15 s.
    assert 0 < t_dead - t_kill < 10
    # STRICT_SPREAD needs two nodes: the group could only start again once node_b was back.
    assert after[0]["time"] > t_back

    # Same world size: the same training as the uninterrupted run, step for step.
    assert _final_metrics(text) == spread_run.metrics
    assert losses(records) == losses(train_log(spread_run.dir))
    assert sorted(losses(records)) == list(range(1, 13))


def test_elastic_group_comes_back_smaller_after_a_node_loss(cluster, sample_shards, spread_run, capsys):
    """``ray.num_workers=[1,2]``: node_b is lost and does not come back; Ray Train restarts the group with
    the one worker the head holds, which resumes the 2-rank ZeRO-2 checkpoint on world size 1 (universal
    checkpoint, the global batch kept by accumulating 2 micro-batches, the epoch re-planned)."""
    if cluster.node_id(SECOND) is None:  # an earlier test's replacement node may be gone
        cluster.add_node(SECOND)
    storage = cluster.base / "storage"
    run_dir = storage / "shrink"
    log = cluster.base / "shrink.log"
    run = [r for r in RUN if not r.startswith(("ray.num_workers", "ray.placement_strategy"))]
    proc = cluster.train(
        [f"data.shards={sample_shards}", *run, "ray.num_workers=[1,2]", "ray.placement_strategy=SPREAD",
         "zero.stage=2", f"ray.storage_path={storage}", "ray.name=shrink"],
        log,
    )  # fmt: skip
    cluster.wait_train_workers(2)  # both nodes free: the group starts at its maximum
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.time() + RUN_TIMEOUT_S
    while not latest.exists():
        assert proc.poll() is None, log.read_text()[-5000:]
        assert time.time() < deadline, "no checkpoint before the deadline"
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before the node was lost"
    t_kill = time.time()
    cluster.kill_node(SECOND)  # and it stays away
    rc = proc.wait(RUN_TIMEOUT_S)
    text = log.read_text()
    assert rc == 0, text[-5000:]
    assert text.count("worker rank 0/2") == 1 and "worker rank 0/1" in text, text[-5000:]
    assert (
        "resume: world size 2 -> 1: global batch 64 kept as 1 ranks x micro_batch_size 32 x grad_accum 2"
        in text
    )
    assert re.search(r"converted step_\d+ to DeepSpeed's universal checkpoint in \d+\.\ds", text), text[
        -5000:
    ]
    m = re.search(r"resumed from \S+/(step_\d+) at step (\d+)", text)
    records = train_log(run_dir)
    after = [r for r in records if r["kind"] == "train" and r["time"] > t_kill]
    assert m and after and after[0]["step"] == int(m.group(2)) + 1, text[-5000:]
    with capsys.disabled():
        print(f"\nnode loss -> training again on the smaller group: {after[0]['time'] - t_kill:.1f} s")
    metrics = _final_metrics(text)
    assert metrics["step"] == 12 and sorted(losses(records)) == list(range(1, 13))
    assert metrics["consumed_samples"] == spread_run.metrics["consumed_samples"] == 12 * 64
