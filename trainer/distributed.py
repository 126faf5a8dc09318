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
import pickle
import socket
import sys
import time
import warnings
from collections.abc import Callable
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

    # ZeRO-3 calls these torch collectives by their deprecated names at every fetch and reduce: one
    # FutureWarning per call site and rank that the user can do nothing about.
    warnings.filterwarnings(
        "ignore",
        message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
        category=FutureWarning,
    )

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
    """Wait until the communication threads hold none of our tensors (:func:`settle_collectives`), then
    destroy the process group if we created it (Ray owns and destroys its own)."""
    settle_collectives()
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


# The tensors of this process's latest collectives, kept until the communication thread that ran each
# has let go of it. Why: gloo (and nccl's watchdog) finish a collective on a thread of their own, which
# drops its references a moment *after* ``wait`` has returned (more than half the time, measured on 2
# CPU ranks). If Python has dropped the tensor by then, that thread must take the GIL to free it; when
# this happens while the interpreter is finalising (a rank returning right after its last collective),
# the thread is killed inside a C++ destructor: "terminate called without an active exception", SIGABRT,
# a finished run reported failed (the process group itself outlives destroy_process_group: DeepSpeed
# keeps references to it). So every collective here keeps its tensors, and teardown waits for them.
_RECENT: list[torch.Tensor] = []
SETTLE_TIMEOUT_S = 10.0


def settle_collectives(timeout_s: float = SETTLE_TIMEOUT_S) -> bool:
    """Wait until no communication thread holds a tensor of this module's recent collectives (their
    C++ use count is back to our one reference), then forget them. True if they settled within
    ``timeout_s`` seconds (typically well under a millisecond); False if a thread still holds one (it is
    kept, and the race above stays possible for it)."""
    deadline = time.monotonic() + timeout_s
    while any(t._use_count() > 1 for t in _RECENT):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.0005)
    _RECENT.clear()
    return True


def _tracked(*tensors: torch.Tensor) -> None:
    """Keep ``tensors`` (a collective's, just waited for); forget those already let go of."""
    _RECENT[:] = [t for t in _RECENT if t._use_count() > 1]
    _RECENT.extend(tensors)


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _object_device() -> torch.device:
    """Where object collectives stage their bytes: the current GPU under nccl, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_object(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` on one process); ``obj`` must pickle.

    The pickles travel as two tracked tensor all-gathers (lengths, then bytes padded to the longest),
    not through ``torch.distributed.all_gather_object``, whose temporaries cannot be kept until the
    communication thread lets go of them (see ``_RECENT``).
    """
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    device = _object_device()
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    lengths = all_gather_tensor(torch.tensor([len(data)], dtype=torch.int64, device=device)).view(-1).tolist()
    padded = torch.zeros(max(lengths), dtype=torch.uint8)
    padded[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    every = all_gather_tensor(padded.to(device)).cpu()
    return [pickle.loads(every[i, :n].numpy().tobytes()) for i, n in enumerate(lengths)]


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself on one process). Every rank sends its own
    (the payloads here are a few bytes), so this is :func:`all_gather_object` indexed by ``src``."""
    return all_gather_object(obj)[src]


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


def start_all_gather_tensor(t: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Start the all-gather of :func:`all_gather_tensor` without waiting for it; the returned function
    waits and gives ``[world_size, *t.shape]``. Call it exactly once. Every rank starts its collectives in
    the same order (gloo matches them by that order even while one runs in the background); meanwhile the
    caller computes: a rank that gets here first does not sleep until the others arrive (the training
    loop's step collective, started before the forward and waited for after it)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return lambda: t[None]
    send = t.detach().clone()
    out = [torch.empty_like(send) for _ in range(dist.get_world_size())]
    work = dist.all_gather(out, send, async_op=True)

    def wait() -> torch.Tensor:
        work.wait()
        _tracked(send, *out)
        return torch.stack(out)

    return wait


def all_gather_tensor(t: torch.Tensor) -> torch.Tensor:
    """Every rank's ``t`` stacked in rank order: ``[world_size, *t.shape]`` (``t[None]`` on one process).

    A private copy of ``t`` is sent and it and the receive buffers are tracked (see ``_RECENT``), so
    the caller may drop or reuse ``t`` at once.
    """
    return start_all_gather_tensor(t)()
