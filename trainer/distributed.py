"""Process-group setup shared by training and evaluation.

One function, :func:`setup_distributed`, makes every launch look the same to the rest of the code:
a plain ``python``/``recgpt`` process (world size 1: we create a 1-process gloo group ourselves),
``torchrun`` (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* in the environment) or a Ray Train worker (Ray has
already initialised the default process group and set LOCAL_RANK). CPU runs use DeepSpeed's CPU
accelerator with gloo; CUDA runs use nccl with the device picked explicitly from LOCAL_RANK (never
derived from the host: Ray narrows CUDA_VISIBLE_DEVICES, ray#37212).
"""

from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    owns_group: bool
    """True when we created the process group (and so must destroy it); False under Ray."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port that is free right now on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pin_ninja() -> None:
    """Use the ninja installed next to this Python for DeepSpeed's JIT-built ops.

    torch finds ``ninja`` on PATH; a venv's ninja and a system ninja record build commands under
    different hashes, so processes launched with different PATHs (``torchrun --no-python recgpt`` vs
    ``python -m launcher``) would rebuild the shared op cache for each other (minutes each time).
    """
    bindir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if (Path(bindir) / "ninja").exists() and path.split(os.pathsep)[0] != bindir:
        os.environ["PATH"] = f"{bindir}{os.pathsep}{path}"


def _pin_extension_cache() -> None:
    """Keep torch's JIT-built extension cache (DeepSpeed's CPU ops) inside this Python environment.

    The default cache (``~/.cache/torch_extensions``) is shared by every install on the machine, and
    each install's build commands differ (include paths, compiler flags), so two virtual environments
    used in turn rebuild the op for each other — 30-65 s each time. ``TORCH_EXTENSIONS_DIR`` set by
    the user wins.
    """
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))


STALE_BUILD_LOCK_S = 900
LIVE_BUILD_GRACE_S = 60


def _building_in(directory: Path) -> bool:
    """Whether some process works in ``directory`` (torch runs ninja, hence the compilers, there)."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if Path(os.readlink(proc / "cwd")) == directory:
                return True
        except OSError:  # gone, or another user's process
            continue
    return False


def _clear_stale_op_build_lock() -> None:
    """Remove a JIT-build lock that a killed process left behind in torch's extension cache.

    DeepSpeed's CPU backend loads a small JIT-built op at start-up; torch guards the build with a lock
    file and waits for it forever. A process killed while holding it (Ctrl-C during the first
    build) would make every later run hang silently. The lock is an orphan when it is older than
    LIVE_BUILD_GRACE_S and no process runs in the build directory (a live build's ninja does), or in
    any case older than STALE_BUILD_LOCK_S (a real build takes a minute or two). ``make venv`` builds
    the op once up front (:func:`prebuild_cpu_ops`), so a first run does not build it at all.
    """
    from torch.utils.cpp_extension import _get_build_directory

    try:
        build_dir = Path(_get_build_directory("deepspeed_shm_comm", verbose=False))
        lock = build_dir / "lock"
        age = time.time() - lock.stat().st_mtime
    except (OSError, RuntimeError):
        return
    if age > STALE_BUILD_LOCK_S or (age > LIVE_BUILD_GRACE_S and not _building_in(build_dir.resolve())):
        print(f"recgpt: removing a stale build lock left by a killed process: {lock}", file=sys.stderr)
        lock.unlink(missing_ok=True)


def prebuild_cpu_ops() -> None:
    """Build DeepSpeed's JIT-compiled CPU communication op now (``make venv`` calls this), in the
    extension cache the trainer uses, so no training run waits for (or can be killed during) it."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    _pin_ninja()
    _pin_extension_cache()
    _clear_stale_op_build_lock()
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    ShareMemCommBuilder().load(verbose=False)


def setup_distributed() -> DistInfo:
    """Initialise (or adopt) the default process group and pick this rank's device."""
    _pin_ninja()
    _pin_extension_cache()
    use_cuda = torch.cuda.is_available()
    if not use_cuda:
        # Must be set before deepspeed is imported anywhere in the process.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    owns_group = not dist.is_initialized()
    if owns_group and "RANK" not in os.environ:
        # Plain single process: give torch.distributed a 1-process rendezvous of its own.
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(free_port())
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        # Ray may expose one GPU per worker (index 0) while LOCAL_RANK says 3: clamp to what is visible.
        index = local_rank if local_rank < torch.cuda.device_count() else 0
        torch.cuda.set_device(index)
        device = torch.device("cuda", index)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
        _clear_stale_op_build_lock()
    import deepspeed  # after DS_ACCELERATOR is settled

    # Adopts an existing default group (Ray Train) instead of creating a second one.
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    return DistInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        device=device,
        backend=backend,
        owns_group=owns_group,
    )


def teardown_distributed(info: DistInfo) -> None:
    """Destroy the process group if we created it (Ray owns and destroys its own)."""
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` on one process); ``obj`` must pickle."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def node_rank() -> int:
    """Index of this process's node (host): torchrun's ``GROUP_RANK``, ``NODE_RANK`` (set in Ray
    workers by the launcher), else 0. Processes with the same value share the machine's local disk."""
    for key in ("GROUP_RANK", "NODE_RANK"):
        value = os.environ.get(key, "")
        if value.isdigit():
            return int(value)
    return 0


def node_leaders() -> tuple[bool, list[int]]:
    """``(this rank leads its node, every rank's node index)``: the leader of a node is its lowest
    rank — the one process per machine that prepares node-local files (staging directories)."""
    nodes = all_gather_object(node_rank())
    mine = nodes[dist.get_rank() if dist.is_initialized() else 0]
    rank = dist.get_rank() if dist.is_initialized() else 0
    return nodes.index(mine) == rank, nodes


def all_gather_tensor(t: torch.Tensor) -> torch.Tensor:
    """Every rank's ``t`` stacked in rank order: ``[world_size, *t.shape]`` (``t[None]`` on one process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(out, t)
        return torch.stack(out)
    return t[None]
