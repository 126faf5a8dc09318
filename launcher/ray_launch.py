"""Run ``trainer.loop.train`` inside a Ray Train ``TorchTrainer`` (``ray.num_workers > 0``).

Ray does placement, failure recovery and checkpoint bookkeeping; recgpt's own checkpoint manager stays
the single owner of checkpoint files:

* The run directory is ``<ray.storage_path>/<ray.name>`` and is also ``train.output_dir``, so Ray's
  experiment directory and recgpt's run directory are the same place (a shared filesystem on a cluster).
* After every complete checkpoint the trainer calls ``report(metrics, checkpoint_dir)`` on every rank;
  we forward it with ``checkpoint_upload_mode=NO_UPLOAD`` (no second copy) and ``num_to_keep=None``
  (Ray never prunes: ``train.keep_last`` and the best checkpoint are recgpt's business).
* A worker that dies makes Ray restart the whole group (``FailureConfig(max_failures)``); the new
  workers run the same function and ``train.resume=auto`` picks the latest complete checkpoint.
  Re-running the same name after a driver crash does the same. A lost node is the same to Ray Train
  (its workers died); docs/cluster.md has the measured recovery on two nodes of one machine.
* ``ray.num_workers=[min, max]`` is handed to Ray as ``ScalingConfig(num_workers=(min, max))``: Ray Train
  v2's elastic group, whose restarts may change the world size (refused by recgpt's checkpoints today).

Ray is imported lazily here and in ``launcher.tune_cmd`` (``recgpt tune``), so ``recgpt --help`` stays fast.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from configs import ConfigError, RecGPTConfig, config_from_dict, to_dict
from data_shards import storage
from data_shards.storage import join as storage_join

TrainFn = Callable[..., Any]  # train(cfg, report=None) -> dict, see docs/DESIGN.md

# Ray Train's checkpoint-manager snapshot in the run directory (ray.train.v2 constants); see
# _drop_stale_ray_snapshot for why the launcher looks at it.
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"
# train() writes its final metrics here (rank 0, last); Ray's Result only has the last checkpoint's.
FINAL_METRICS = "metrics.json"
# Ray Train V2's switch for redirecting print() in workers to its logger (see _connect).
PRINT_PATCH_ENV = "RAY_TRAIN_ENABLE_PRINT_PATCH"


def _log(msg: str) -> None:
    print(f"recgpt ray: {msg}", flush=True)


# --------------------------------------------------------------------------- driver side


def _is_url(path: str) -> bool:
    return storage.is_url(path) or path.startswith("pipe:")


def run_location(cfg: RecGPTConfig) -> tuple[str, str]:
    """``(storage_path, name)`` of the run: the defaults are train.output_dir's parent and basename.

    ``storage_path`` is a filesystem path mounted on every node, or an object-store URL (``s3://…``):
    the run then stages locally and mirrors to the store (:mod:`trainer.remote`), and Ray's own files
    go to the same prefix through the same fsspec filesystem (:func:`_ray_storage`)."""
    out = cfg.train.output_dir.rstrip("/")
    root = cfg.ray.storage_path or (out.rsplit("/", 1)[0] if storage.is_url(out) else str(Path(out).parent))
    name = cfg.ray.name or (out.rsplit("/", 1)[1] if storage.is_url(out) else Path(out).name)
    if root.startswith("pipe:"):
        raise ConfigError(
            f"ray.storage_path: got {root!r}, must be a shared filesystem path or an s3://… URL"
        )
    return (root.rstrip("/") if storage.is_url(root) else os.path.abspath(root)), name


def _ray_storage(root: str) -> tuple[str, Any]:
    """``(storage_path, storage_filesystem)`` for Ray's RunConfig: a local path as it is; a URL as the
    path inside the fsspec filesystem of :mod:`data_shards.storage`, wrapped for pyarrow (Ray's
    interface), so Ray and recgpt reach the store with the same client, retries and credentials."""
    if not storage.is_url(root):
        return root, None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = storage.filesystem(root)
    return path, PyFileSystem(FSSpecHandler(fs))


def prepare_config(cfg: RecGPTConfig) -> RecGPTConfig:
    """The config the workers get: output_dir forced to the Ray run directory, local paths absolute.

    Workers do not share the driver's working directory (another node, or a Ray-chosen cwd), so a
    relative path would point somewhere else there.
    """
    storage, name = run_location(cfg)
    d = to_dict(cfg)
    d["train"]["output_dir"] = storage_join(storage, name)
    d["ray"]["storage_path"], d["ray"]["name"] = storage, name
    if not _is_url(d["data"]["shards"]):
        d["data"]["shards"] = os.path.abspath(d["data"]["shards"])
    nop = d["model"]["name_or_path"]
    if nop is not None and os.path.exists(nop):  # a local directory, not a hub name
        d["model"]["name_or_path"] = os.path.abspath(nop)
    if d["train"]["resume"] not in ("auto", "never"):
        d["train"]["resume"] = os.path.abspath(d["train"]["resume"])
    return config_from_dict(d)


def _drop_stale_ray_snapshot(run_dir: str) -> None:
    """Move Ray's checkpoint-manager snapshot aside when it names checkpoints recgpt has pruned.

    Ray records every reported checkpoint and, when a run with the same name starts again, refuses to
    start if one of them no longer exists (CheckpointManagerInitializationError). recgpt deletes old
    checkpoints itself (train.keep_last), so a re-run after a driver crash would always hit that. The
    snapshot is only bookkeeping: resuming reads recgpt's own ``checkpoints/latest``.
    """
    snap = storage_join(run_dir, RAY_SNAPSHOT)
    if not storage.exists(snap):
        return
    try:
        names = _snapshot_checkpoint_names(json.loads(storage.read_bytes(snap)))
    except ValueError:
        names = {"<unreadable snapshot>"}
    missing = sorted(n for n in names if not storage.exists(storage_join(run_dir, n)))
    if missing:
        fs, path = storage.filesystem(snap)
        fs.mv(path, f"{path}.stale-{int(time.time())}")
        _log(f"moved Ray's checkpoint snapshot aside: it names pruned checkpoints ({', '.join(missing[:3])})")


def _snapshot_checkpoint_names(obj: Any) -> set[str]:
    if isinstance(obj, dict):
        found = {obj["checkpoint_dir_name"]} if isinstance(obj.get("checkpoint_dir_name"), str) else set()
        return found.union(*(_snapshot_checkpoint_names(v) for v in obj.values()))
    if isinstance(obj, list):
        return set().union(*(_snapshot_checkpoint_names(v) for v in obj))
    return set()


def _connect(num_cpus: int | None = None) -> None:
    """Connect to RAY_ADDRESS (set inside ``ray job submit``), else start a local Ray instance (with
    ``num_cpus`` CPUs; None = every core)."""
    import ray

    address = os.environ.get("RAY_ADDRESS")
    _log(
        f"connecting to Ray at {address}" if address else "RAY_ADDRESS not set: starting a local Ray instance"
    )
    # Ray Train V2 replaces print() in its workers with a logging call that also tees to the original
    # print when stdout is wrapped, as it is in a Ray worker: every progress line reached the driver
    # twice. recgpt's lines are plain text already, so its workers keep the builtin print (a value the
    # user or the job's runtime env set wins; the same key in both would be a runtime-env conflict).
    runtime_env = None
    if PRINT_PATCH_ENV not in os.environ:
        runtime_env = {"env_vars": {PRINT_PATCH_ENV: "0"}}
    # "local", not None: None would silently join whatever `ray start` cluster this machine last ran.
    # log_to_driver: the workers' progress lines end up in this process's output (and the job's logs).
    ray.init(
        address=address or "local",
        log_to_driver=True,
        runtime_env=runtime_env,
        num_cpus=None if address else num_cpus,
    )


def build_trainer(
    cfg: RecGPTConfig,
    train_fn: TrainFn | None = None,
    *,
    callbacks: list[Any] | None = None,
    report_metric: str | None = None,
):
    """The ``TorchTrainer`` for a config already passed through :func:`prepare_config`.

    ``callbacks``: Ray Train run callbacks (``recgpt tune`` passes Tune's ``TuneReportCallback``).
    ``report_metric``: report only evaluations (results holding this metric) and no checkpoints, the
    Tune trial's way (see :func:`tune_report`); default every :func:`ray_report`.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    r = cfg.ray
    resources = {"CPU": r.cpus_per_worker, **r.resources_per_worker}
    if r.use_gpu:
        resources.setdefault("GPU", 1)
    # A [min, max] range is Ray Train's elastic group: it is handed over as the (min, max) tuple.
    scaling = ScalingConfig(
        num_workers=r.worker_range if r.elastic else r.num_workers,
        use_gpu=r.use_gpu,
        resources_per_worker=resources,
        placement_strategy=r.placement_strategy,
    )
    storage_path, storage_filesystem = _ray_storage(r.storage_path)
    run = RunConfig(
        name=r.name,
        storage_path=storage_path,
        storage_filesystem=storage_filesystem,
        failure_config=FailureConfig(max_failures=r.max_failures),
        # recgpt prunes (keep_last + best); Ray keeping every reported checkpoint means it deletes none.
        checkpoint_config=CheckpointConfig(num_to_keep=None),
        callbacks=callbacks,
    )
    return TorchTrainer(
        _worker_main,
        train_loop_config={"config": to_dict(cfg), "train_fn": train_fn, "report_metric": report_metric},
        scaling_config=scaling,
        run_config=run,
    )


def train_with_ray(cfg: RecGPTConfig, train_fn: TrainFn | None = None) -> int:
    """Launch ``train_fn`` (default ``trainer.loop.train``) on ``ray.num_workers`` Ray Train workers.

    Returns the process exit code: 0 with the final metrics printed, 1 with the reason when the run
    failed (workers exhausted ``ray.max_failures``, or the controller failed).
    """
    # Workers stay in the job's working directory instead of a per-run scratch dir; paths are absolute
    # anyway (prepare_config), this only keeps relative paths inside user code meaningful.
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    cfg = prepare_config(cfg)
    run_dir = cfg.train.output_dir
    _drop_stale_ray_snapshot(run_dir)
    final_file = storage_join(run_dir, FINAL_METRICS)
    previous = _stamp(final_file)
    t0 = time.time()
    _connect()
    import ray
    from ray.train import TrainingFailedError

    r = cfg.ray
    _log(
        f"run {run_dir}: {_workers_text(r.worker_range)} ({'GPU' if r.use_gpu else 'CPU'}, {r.placement_strategy}), "
        f"max_failures={r.max_failures}, resume={cfg.train.resume}"
    )
    try:
        result = build_trainer(cfg, train_fn).fit()
    except TrainingFailedError as e:
        print(f"recgpt train: Ray Train run failed: {_flat_message(e)}", file=sys.stderr, flush=True)
        return 1
    finally:
        ray.shutdown()
    if _stamp(final_file) in (None, previous):
        # train() returned on every worker, so only storage that is not shared can get here.
        print(
            f"recgpt train: the run did not write {final_file}: is ray.storage_path shared?", file=sys.stderr
        )
        return 1
    _log(f"finished in {time.time() - t0:.1f}s; run dir {run_dir}")
    if result.checkpoint is not None:
        where = result.checkpoint.path
        if storage.is_url(run_dir):  # Ray holds the path inside the store's filesystem: give the URL
            where = f"{run_dir.split('://', 1)[0]}://{where.lstrip('/')}"
        _log(f"last reported checkpoint {where}")
    print(
        json.dumps({"final_metrics": json.loads(storage.read_bytes(final_file))}, sort_keys=True), flush=True
    )
    return 0


def _workers_text(worker_range: tuple[int, int]) -> str:
    lo, hi = worker_range
    return f"{hi} workers" if lo == hi else f"{lo} to {hi} workers (elastic)"


def _stamp(url: str) -> Any:
    """What changes when a run rewrites the file (None: no file): local mtime, else the object's ETag."""
    if not storage.exists(url):
        return None
    fs, path = storage.filesystem(url)
    info = fs.info(path)
    return info.get("mtime") or info.get("ETag") or info.get("LastModified") or info.get("size")


def _flat_message(err: BaseException) -> str:
    """Ray's failure message on one line (its text spans lines: the worker's error is at the end)."""
    text = " ".join(str(err).split())
    return text[:2000] or type(err).__name__


# --------------------------------------------------------------------------- worker side


def _setup_worker_env() -> str:
    """Make this Ray worker look like a torchrun rank to DeepSpeed; returns the device it uses.

    TorchTrainer already set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* and initialised the process group
    (gloo or nccl); DeepSpeed's init_distributed then adopts that group instead of creating one. The
    trap (ray#37212): Ray sets CUDA_VISIBLE_DEVICES to the node's GPUs of this run, so Ray's local rank
    need not be the index of *this* worker's GPU among the visible ones, while DeepSpeed uses
    ``cuda:$LOCAL_RANK``. LOCAL_RANK is therefore set to the device index Ray assigned.
    """
    import ray.train
    import torch

    ctx = ray.train.get_context()
    env = {
        "RANK": ctx.get_world_rank(),
        "WORLD_SIZE": ctx.get_world_size(),
        "LOCAL_RANK": ctx.get_local_rank(),
        "LOCAL_WORLD_SIZE": ctx.get_local_world_size(),
        "NODE_RANK": ctx.get_node_rank(),
    }
    device = "cpu"
    if torch.cuda.is_available() and ray.get_gpu_ids():
        from ray.train.torch import get_device

        dev = get_device()
        torch.cuda.set_device(dev)
        env["LOCAL_RANK"] = dev.index
        device = str(dev)
    os.environ.update({k: str(v) for k, v in env.items()})
    return device


def _plain(metrics: dict[str, Any]) -> dict[str, Any]:
    """Ray refuses tensors in metrics; keep numbers and strings."""
    out: dict[str, Any] = {}
    for k, v in (metrics or {}).items():
        if hasattr(v, "item"):
            v = v.item()
        if isinstance(v, (int, float, str, bool)) or v is None:
            out[k] = v
    return out


def ray_report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
    """The ``report`` callback handed to ``train``: register a complete checkpoint with Ray, no copy.

    Called on every rank with the same directory (Ray requires all ranks to report, and the same path).
    """
    import ray.train
    from ray.train import CheckpointUploadMode

    checkpoint = None
    if checkpoint_dir and storage.is_url(checkpoint_dir):  # already in the store, beside Ray's own files
        ray_fs = ray.train.get_context().get_storage().storage_filesystem
        checkpoint = ray.train.Checkpoint(storage.filesystem(checkpoint_dir)[1], filesystem=ray_fs)
    elif checkpoint_dir:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir)
    ray.train.report(
        _plain(metrics), checkpoint=checkpoint, checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD
    )


def tune_report(metric: str) -> Callable[[dict[str, Any], str | None], None]:
    """The ``report`` callback of a Tune trial's workers: every evaluation (results holding ``metric``),
    without checkpoints.

    Tune refuses a result that lacks the experiment's metric, and a trial needs no Ray checkpoints: a
    restarted trial resumes from recgpt's own ``checkpoints/latest``. Every rank gets the same
    metrics, so every rank makes the same calls.
    """

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        if metric in metrics:
            ray_report(metrics, None)

    return report


def _worker_main(loop_config: dict[str, Any]) -> None:
    """Body of every Ray Train worker (a fresh process after each group restart)."""
    import ray
    import ray.train

    device = _setup_worker_env()
    cfg = config_from_dict(loop_config["config"])
    train_fn = loop_config.get("train_fn")
    if train_fn is None:
        from trainer.loop import train as train_fn
    ctx = ray.train.get_context()
    # The Ray node id says where the worker really runs (`ray list nodes` maps it to a host and its
    # resources): placement strategies and node loss are checked against it.
    _log(
        f"worker rank {ctx.get_world_rank()}/{ctx.get_world_size()} pid {os.getpid()} "
        f"node {ray.get_runtime_context().get_node_id()} node_rank {ctx.get_node_rank()} "
        f"local_rank {os.environ['LOCAL_RANK']} device {device} "
        f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')!r}"
    )
    metric = loop_config.get("report_metric")
    train_fn(cfg, report=tune_report(metric) if metric else ray_report)


__all__ = ["build_trainer", "prepare_config", "ray_report", "run_location", "train_with_ray", "tune_report"]
