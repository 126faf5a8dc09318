"""The Ray launcher's driver-side pieces that need no running Ray: paths, trainer wiring, snapshot care."""

from __future__ import annotations

import json
import os

import pytest

from configs import ConfigError, load_config
from launcher.ray_launch import (
    RAY_SNAPSHOT,
    _drop_stale_ray_snapshot,
    build_trainer,
    prepare_config,
    run_location,
)


def test_run_dir_is_output_dir_with_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["train.output_dir=runs/exp1", "data.shards=shards/x", "ray.num_workers=2"])
    assert run_location(cfg) == (str(tmp_path / "runs"), "exp1")
    p = prepare_config(cfg)
    assert p.train.output_dir == str(tmp_path / "runs" / "exp1")
    assert (p.ray.storage_path, p.ray.name) == (str(tmp_path / "runs"), "exp1")
    assert p.data.shards == str(tmp_path / "shards" / "x")  # workers do not share the driver's cwd
    assert p.model.name_or_path is None


def test_storage_path_and_name_override_output_dir(tmp_path):
    cfg = load_config(
        None,
        [
            f"ray.storage_path={tmp_path}/shared",
            "ray.name=job7",
            "data.shards=pipe:cat {}",
            "ray.num_workers=1",
        ],
    )
    p = prepare_config(cfg)
    assert p.train.output_dir == os.path.join(tmp_path, "shared", "job7")
    assert p.data.shards == "pipe:cat {}"  # URLs and pipe: templates are left alone


def test_object_store_storage_path_is_the_run_prefix_and_rays_filesystem():
    cfg = load_config(None, ["ray.storage_path=s3://bucket/runs/", "ray.name=job", "ray.num_workers=2"])
    p = prepare_config(cfg)
    assert p.train.output_dir == "s3://bucket/runs/job" and p.ray.storage_path == "s3://bucket/runs"
    rc = build_trainer(p).run_config
    # Ray gets the path inside the store and the storage layer's own fsspec filesystem, wrapped for pyarrow.
    assert rc.storage_path == "bucket/runs" and type(rc.storage_filesystem).__name__ == "PyFileSystem"
    assert rc.storage_filesystem.handler.fs.protocol[0] in ("s3", "s3a")
    # The default: train.output_dir's parent and name, also for a URL.
    p = prepare_config(load_config(None, ["train.output_dir=s3://bucket/a/b", "ray.num_workers=2"]))
    assert (p.ray.storage_path, p.ray.name, p.train.output_dir) == ("s3://bucket/a", "b", "s3://bucket/a/b")
    with pytest.raises(ConfigError, match="ray.storage_path"):
        prepare_config(load_config(None, ["ray.storage_path=pipe:cat", "ray.num_workers=2"]))


def test_trainer_gets_scaling_failure_and_no_pruning(tmp_path):
    cfg = load_config(
        None,
        [
            f"ray.storage_path={tmp_path}",
            "ray.name=r",
            "ray.num_workers=3",
            "ray.cpus_per_worker=2",
            "ray.resources_per_worker={accel: 0.5}",
            "ray.placement_strategy=SPREAD",
            "ray.max_failures=5",
        ],
    )
    trainer = build_trainer(prepare_config(cfg))
    sc, rc = trainer.scaling_config, trainer.run_config
    assert sc.num_workers == 3 and not sc.use_gpu and sc.placement_strategy == "SPREAD"
    assert sc.resources_per_worker == {"CPU": 2.0, "accel": 0.5}
    assert (rc.storage_path, rc.name) == (str(tmp_path), "r")
    assert rc.failure_config.max_failures == 5
    assert rc.checkpoint_config.num_to_keep is None  # recgpt alone prunes checkpoints


def _snapshot(run_dir, names):
    entries = [{"checkpoint_dir_name": n, "metrics": {}} for n in names]
    state = {
        "checkpoint_results": entries,
        "latest_checkpoint_result": entries[-1],
        "pending_training_results": [],
    }
    (run_dir / RAY_SNAPSHOT).write_text(json.dumps(state))


def test_stale_ray_snapshot_is_moved_aside_and_a_valid_one_kept(tmp_path):
    (tmp_path / "checkpoints" / "step_00000008").mkdir(parents=True)
    _snapshot(tmp_path, ["checkpoints/step_00000008"])
    _drop_stale_ray_snapshot(str(tmp_path))
    assert (tmp_path / RAY_SNAPSHOT).is_file()
    # recgpt pruned step 4 (keep_last) but Ray still lists it: Ray would refuse to start the re-run.
    _snapshot(tmp_path, ["checkpoints/step_00000004", "checkpoints/step_00000008"])
    _drop_stale_ray_snapshot(str(tmp_path))
    assert not (tmp_path / RAY_SNAPSHOT).exists()
    assert list(tmp_path.glob(f"{RAY_SNAPSHOT}.stale-*"))
    _drop_stale_ray_snapshot(str(tmp_path / "missing"))  # a new run: nothing to do


def test_num_workers_range_is_rays_elastic_scaling(tmp_path):
    cfg = load_config(None, [f"ray.storage_path={tmp_path}", "ray.name=r", "ray.num_workers=[1,3]"])
    assert cfg.ray.num_workers == [1, 3] and cfg.ray.elastic
    assert (cfg.ray.worker_range, cfg.ray.max_workers) == ((1, 3), 3)
    sc = build_trainer(prepare_config(cfg)).scaling_config
    assert sc.num_workers == (1, 3) and sc.elasticity_enabled
    assert (sc.min_workers, sc.max_workers) == (1, 3)
    # The range survives the resolved config.yaml a run saves (what the workers and a resume load).
    assert prepare_config(cfg).ray.num_workers == [1, 3]
    fixed = load_config(None, ["ray.num_workers=2"]).ray
    assert (fixed.worker_range, fixed.max_workers, fixed.elastic) == ((2, 2), 2, False)
    assert load_config(None, []).ray.max_workers == 0  # the default: no Ray


@pytest.mark.parametrize(
    "value, message",
    [
        ("[0,2]", "ray.num_workers: got [0, 2], a range is [min, max] with 1 <= min <= max"),
        ("[3,2]", "ray.num_workers: got [3, 2], a range is [min, max] with 1 <= min <= max"),
        ("[1,2,3]", "ray.num_workers: got [1, 2, 3], a range is [min, max] with 1 <= min <= max"),
        ("[2]", "ray.num_workers: got [2], a range is [min, max] with 1 <= min <= max"),
        ("-1", "ray.num_workers: must be >= 0"),
        ("[1,x]", "ray.num_workers: Value '[1, 'x']' of type 'ListConfig' is incompatible"),
    ],
)
def test_bad_num_workers_is_one_line_exit_2(value, message, capsys):
    from launcher.cli import main

    assert main(["train", f"ray.num_workers={value}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"recgpt train: error: {message}"), err


def test_tune_refuses_an_elastic_range_before_ray(tmp_path, capsys):
    from launcher.cli import main

    space = tmp_path / "space.yaml"
    space.write_text("optim.lr: {choice: [0.001]}\n")
    argv = ["tune", "--space", str(space), f"train.output_dir={tmp_path}/out", "ray.num_workers=[1,2]"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "recgpt tune: error: ray.num_workers: got [1, 2]; recgpt tune runs trials of a fixed size, give one number"
    ]
