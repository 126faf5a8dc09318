"""``recgpt tune``: a Ray Tune search over any config keys, every trial an ordinary Ray Train run.

``recgpt tune --config FILE --space SPACE.yaml [--trials N] [--scheduler asha|none] [--name NAME] [k=v …]``

* ``SPACE.yaml`` maps dotted config keys to one distribution each, e.g.
  ``optim.lr: {loguniform: [1.0e-4, 1.0e-2]}``, ``model.dropout: {choice: [0.1, 0.2]}``,
  ``train.num_negatives: {grid: [256, 1024]}``, ``schedule.warmup_steps: {randint: [0, 100]}``,
  ``optim.weight_decay: {uniform: [0.0, 0.1]}``. Every key and every value it can take is checked
  against the config schema (the same merge and validation as ``recgpt train``) before Ray starts.
* A trial is ``trainer.loop.train`` under a Ray Train ``TorchTrainer`` (:mod:`launcher.ray_launch`)
  started from a Tune function trainable, Ray Train V2's way of composing the two; its recgpt run
  directory (checkpoints/, train_log.jsonl, tensorboard/) is ``<trial dir>/run``. Each evaluation is
  reported to Tune (``TuneReportCallback``), so ASHA (time attribute ``step``, metric ``eval.metric``,
  higher is better) stops weak trials at its rungs.
* The experiment is ``<ray.storage_path or train.output_dir's parent>/<--name>``. Running the same
  command again with the same name restores it (``Tuner.restore``): finished trials are kept,
  interrupted or errored ones resume from their latest recgpt checkpoint (``train.resume=auto``).
* At the end: the trial table (printed and ``<experiment>/trials.csv``) and ``<experiment>/best.yaml``,
  the best trial's resolved config, which ``recgpt train --config`` accepts unchanged.

All Ray imports are inside functions: ``recgpt --help`` and the space checks never load Ray.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from configs import (
    ConfigError,
    DataError,
    RecGPTConfig,
    atomic_write,
    config_from_dict,
    load_config,
    one_line,
    to_dict,
    to_yaml,
)
from data_shards.manifest import load_manifest
from data_shards.storage import is_url
from launcher.common import add_config_args

KINDS = ("loguniform", "uniform", "choice", "grid", "randint")
TRIALS_CSV = "trials.csv"
BEST_YAML = "best.yaml"
BEST_RUN_DIR = "best-run"  # best.yaml's train.output_dir, inside the experiment
# The experiment's command (base config + space): a rerun with the same name must match it to restore.
EXPERIMENT_FILE = "recgpt_tune.json"
EXPERIMENT_STATE_PERIOD_S = 2  # see run_experiment
TRIAL_RUN_DIR = "run"  # a trial's recgpt run directory inside its Tune trial directory
# ASHA keeps the top 1/REDUCTION_FACTOR of the trials at each rung (rungs at grace, 2 x grace, …).
REDUCTION_FACTOR = 2
# The trial driver (a Tune function actor) only waits on its Ray Train controller: it reserves a
# token of memory instead of a CPU, so the CPUs go to the training workers (ray.cpus_per_worker).
TRIAL_DRIVER_RESOURCES = {"CPU": 0, "memory": 1}


def _log(msg: str) -> None:
    print(f"recgpt tune: {msg}", flush=True)


# --------------------------------------------------------------------------- the search space


@dataclass(frozen=True)
class Param:
    """One searched key: ``kind`` in :data:`KINDS`, ``args`` its bounds or values."""

    key: str
    kind: str
    args: tuple[Any, ...]

    def candidates(self) -> list[Any]:
        """Values that exercise the key's validation: every listed value, or both ends of a range."""
        if self.kind == "randint":
            return [self.args[0], self.args[1] - 1]  # randint's upper bound is exclusive
        if self.kind in ("uniform", "loguniform"):
            # Tune samples floats from these, also between integer bounds: check floats, so an integer
            # setting searched with uniform is refused here rather than in every trial.
            low, high = (float(a) for a in self.args)
            return [low, (low + high) / 2, high]
        return list(self.args)


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def parse_space(path: str | os.PathLike) -> list[Param]:
    """Read SPACE.yaml: ``dotted.key: {kind: [args]}`` per line; raises ConfigError (one line) on any
    malformed entry. Keys are checked against the schema by :func:`check_space`."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such search-space file")
    try:
        loaded = OmegaConf.to_container(OmegaConf.load(p))
    except Exception as e:  # yaml's errors (duplicate keys, syntax) carry line numbers
        mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise ConfigError(f"{p}: not valid YAML ({where}{problem or str(e).splitlines()[0]})") from None
    if not isinstance(loaded, dict) or not loaded:
        raise ConfigError(
            f"{p}: expected a mapping of config keys to distributions, e.g. optim.lr: {{loguniform: [1.0e-4, 1.0e-2]}}"
        )
    params = []
    for key, spec in loaded.items():
        where = f"{p}: {key}"
        if not isinstance(spec, dict) or len(spec) != 1:
            raise ConfigError(
                f"{where}: expected one distribution, e.g. {{choice: [a, b]}} (one of {', '.join(KINDS)})"
            )
        ((kind, args),) = spec.items()
        if kind not in KINDS and isinstance(args, dict):
            raise ConfigError(
                f"{where}: a nested mapping; write each searched key dotted, e.g. {key}.{kind}: {{choice: [...]}}"
            )
        if kind not in KINDS:
            raise ConfigError(f"{where}: unknown distribution {kind!r} (use one of {', '.join(KINDS)})")
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}: {kind} takes a non-empty list")
        if kind in ("loguniform", "uniform", "randint"):
            if len(args) != 2 or not all(_number(a) for a in args) or not args[0] < args[1]:
                raise ConfigError(f"{where}: {kind} takes [low, high] numbers with low < high")
            if kind == "loguniform" and args[0] <= 0:
                raise ConfigError(f"{where}: loguniform needs low > 0")
            if kind == "randint" and not all(isinstance(a, int) for a in args):
                raise ConfigError(f"{where}: randint takes integer [low, high) bounds")
        params.append(Param(str(key), kind, tuple(args)))
    return params


def with_values(base: dict[str, Any], values: dict[str, Any]) -> RecGPTConfig:
    """``base`` (a :func:`configs.to_dict` tree) with dotted ``values`` set, merged and validated like
    ``recgpt train`` (the same :func:`configs.config_from_dict`); ConfigError names the key."""
    tree = json.loads(json.dumps(base))  # a deep copy of plain data
    for key, value in values.items():
        node = _section(tree, key)
        node[key.rsplit(".", 1)[-1]] = value
    return config_from_dict(tree)


def _section(tree: dict[str, Any], key: str) -> dict[str, Any]:
    """The dict in ``tree`` holding the setting ``key`` (dotted); ConfigError when it is no setting."""
    node, parts = tree, key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"{'.'.join(parts[: i + 1])}: unknown key")
        if i < len(parts) - 1:
            node = node[part]
    if isinstance(node[parts[-1]], dict):
        raise ConfigError(f"{key}: is a section, not a setting")
    return node


NOT_SEARCHABLE = ("ray.", "train.output_dir", "train.resume", "data.shards")
"""Keys a trial cannot take from the space: where runs live and how they launch belong to the
experiment (each trial has its own run directory and ``ray.num_workers`` workers)."""
MAX_COMBINATIONS = 512


def _trial_check(manifest: dict[str, Any] | None) -> Callable[[RecGPTConfig], None]:
    """What ``recgpt train`` checks of a config before its process group starts: the schema (done by
    building the config), the trainable layers, and with the shards' ``manifest`` the settings that
    depend on the data (the history window, the sampled negatives against the catalogue)."""
    from modeling.data import check_data_settings  # torch: only once a command needs it
    from modeling.factory import check_trainable_layers

    def check(cfg: RecGPTConfig) -> None:
        check_trainable_layers(cfg)
        if manifest is not None:
            check_data_settings(cfg, manifest, cfg.data.shards)

    return check


def check_space(
    params: list[Param],
    base: dict[str, Any],
    space_path: str | os.PathLike,
    manifest: dict[str, Any] | None = None,
) -> None:
    """Every key exists and may be searched, every candidate value passes the schema's validation, and
    so do the combinations of the keys' candidates (all of them, or MAX_COMBINATIONS drawn with a
    fixed seed) — settings that clash across keys fail here, before Ray starts, not in a trial. With the
    shards' ``manifest``, also the checks against the data that ``recgpt train`` makes first."""
    check = _trial_check(manifest)
    check(config_from_dict(base))
    seen = set()
    for prm in params:
        if prm.key in seen:
            raise ConfigError(f"{space_path}: {prm.key}: searched twice")
        seen.add(prm.key)
        if prm.key.startswith(NOT_SEARCHABLE):
            raise ConfigError(
                f"{space_path}: {prm.key}: not searchable (the run location and launch belong to the "
                "experiment: set it on the command line for every trial)"
            )
        try:
            _section(base, prm.key)
        except ConfigError as e:
            raise ConfigError(f"{space_path}: {e}") from None
        for value in prm.candidates():
            try:
                check(with_values(base, {prm.key: value}))
            except ConfigError as e:
                if isinstance(value, float) and prm.kind in ("uniform", "loguniform") and "Integer" in str(e):
                    raise ConfigError(
                        f"{space_path}: {prm.key}: {prm.kind} samples floats, but the setting takes whole "
                        "numbers; use randint: [low, high) or choice: [...]"
                    ) from None
                raise ConfigError(f"{space_path}: {prm.key}={value!r}: {e}") from None
    _check_combinations(params, base, space_path, check)


def _check_combinations(
    params: list[Param],
    base: dict[str, Any],
    space_path: str | os.PathLike,
    check: Callable[[RecGPTConfig], None],
) -> None:
    import itertools
    import random

    if len(params) < 2:
        return
    pools = [prm.candidates() for prm in params]
    if math.prod(len(p) for p in pools) <= MAX_COMBINATIONS:
        combos = list(itertools.product(*pools))
    else:
        rng = random.Random(0)
        combos = [tuple(rng.choice(p) for p in pools) for _ in range(MAX_COMBINATIONS)]
    for combo in combos:
        values = {prm.key: v for prm, v in zip(params, combo)}
        try:
            check(with_values(base, values))
        except ConfigError as e:
            shown = ", ".join(f"{k}={v!r}" for k, v in values.items())
            raise ConfigError(f"{space_path}: the combination {shown}: {e}") from None


def tune_space(params: list[Param]) -> dict[str, Any]:
    """The Ray Tune search space of ``params`` (keys stay dotted)."""
    from ray import tune

    make = {
        "loguniform": lambda a: tune.loguniform(*a),
        "uniform": lambda a: tune.uniform(*a),
        "randint": lambda a: tune.randint(*a),
        "choice": lambda a: tune.choice(list(a)),
        "grid": lambda a: tune.grid_search(list(a)),
    }
    return {prm.key: make[prm.kind](prm.args) for prm in params}


# --------------------------------------------------------------------------- the experiment


@dataclass
class Experiment:
    """What one ``recgpt tune`` command resolves to (the driver's view)."""

    base: dict[str, Any]
    """The base config (file + overrides), resolved: every trial is this plus its sampled values."""
    params: list[Param]
    storage_path: str
    name: str
    trials: int
    scheduler: str
    num_workers: int = 1
    """``ray.num_workers`` as the user gave it (0 = no Ray); trials run with at least 1."""

    @property
    def path(self) -> Path:
        return Path(self.storage_path) / self.name

    @property
    def num_trials(self) -> int:
        """``trials`` samples, each repeated for every combination of the grid values."""
        return self.trials * math.prod(len(p.args) for p in self.params if p.kind == "grid")

    @property
    def metric(self) -> str:
        return self.base["eval"]["metric"]


def prepare(args: argparse.Namespace) -> Experiment:
    """Load and check everything that can be wrong before Ray starts (ConfigError: one line)."""
    from launcher.ray_launch import run_location

    cfg = load_config(args.config, args.overrides)
    if cfg.ray.elastic:
        # Tune sizes its concurrency from a fixed group size, and an elastic trial that shrinks would
        # need a resume at another world size.
        raise ConfigError(
            f"ray.num_workers: got {cfg.ray.num_workers}; recgpt tune runs trials of a fixed size, give one number"
        )
    num_workers = cfg.ray.num_workers
    if cfg.ray.num_workers == 0:
        # A trial always runs under Ray Train; 0 (the single-process default) means one worker.
        cfg = with_values(to_dict(cfg), {"ray.num_workers": 1})
    if args.trials < 1:
        raise ConfigError(f"--trials: got {args.trials}, must be >= 1")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise ConfigError(f"--max-concurrent: got {args.max_concurrent}, must be >= 1")
    # Trials and best.yaml name the data by absolute path: the config works from any directory.
    if not is_url(cfg.data.shards) and not cfg.data.shards.startswith("pipe:"):
        cfg = with_values(to_dict(cfg), {"data.shards": os.path.abspath(cfg.data.shards)})

    if args.scheduler == "asha" and cfg.train.max_steps <= 0:
        raise ConfigError("train.max_steps: must be > 0 with --scheduler asha (its rungs are training steps)")
    if cfg.train.eval_interval <= 0 and args.scheduler == "asha":
        raise ConfigError(
            "train.eval_interval: must be > 0 with --scheduler asha (it stops trials at evaluations)"
        )
    if args.scheduler == "asha" and cfg.train.eval_interval > cfg.train.max_steps:
        raise ConfigError(
            f"train.eval_interval: got {cfg.train.eval_interval} > train.max_steps {cfg.train.max_steps}; "
            "--scheduler asha compares trials at evaluations, so a trial must evaluate before it ends"
        )
    base = to_dict(cfg)
    params = parse_space(args.space)
    check_space(params, base, args.space)  # the space's own mistakes first: they need no data
    for prm in params:
        if args.scheduler == "asha" and prm.key in ("train.max_steps", "train.eval_interval"):
            raise ConfigError(
                f"{args.space}: {prm.key}: --scheduler asha takes its rungs from the base config's "
                "train.max_steps and train.eval_interval; search it with --scheduler none"
            )
    try:
        manifest = load_manifest(cfg.data.shards)
    except DataError as e:
        raise DataError(f"data.shards: {one_line(e)}") from None
    check_space(params, base, args.space, manifest)  # then against the data, as recgpt train does first
    storage, _ = run_location(cfg)
    if is_url(storage):
        # The experiment's files, trials.csv and best.yaml are plain files beside the trials' run dirs.
        raise ConfigError(
            f"ray.storage_path: got {storage!r}; recgpt tune needs a filesystem path (shared on a cluster)"
        )
    name = args.name or f"tune-{Path(args.space).stem}"
    if "/" in name or name in (".", ".."):
        raise ConfigError(f"--name: got {name!r}, must be one directory name")
    return Experiment(base, params, storage, name, args.trials, args.scheduler, num_workers)


def _fingerprint(exp: Experiment) -> dict[str, Any]:
    return {
        "base": exp.base,
        "space": [[p.key, p.kind, list(p.args)] for p in exp.params],
        "trials": exp.trials,
        "scheduler": exp.scheduler,
    }


def _check_same_experiment(exp: Experiment) -> None:
    """A rerun under an existing name restores it only when it is the same search."""
    f = exp.path / EXPERIMENT_FILE
    if f.is_file():
        saved = json.loads(f.read_text())
        now = json.loads(json.dumps(_fingerprint(exp)))
        if saved != now:
            diff = sorted(k for k in now if saved.get(k) != now[k])
            raise ConfigError(
                f"--name {exp.name}: {exp.path} holds an experiment whose {', '.join(diff)} "
                f"{'differs' if len(diff) == 1 else 'differ'}; "
                "rerun it unchanged to resume, or pick another --name"
            )
    else:
        exp.path.mkdir(parents=True, exist_ok=True)
        atomic_write(f, json.dumps(_fingerprint(exp), indent=2, sort_keys=True))


def _trial_name(trial: Any) -> str:
    """Trial names and directory names: ``trial_<tune trial id>`` (the values are in trials.csv)."""
    return f"trial_{trial.trial_id}"


def _trial_main(config: dict[str, Any], base: dict[str, Any], experiment: str) -> None:
    """One Tune trial (a Tune function actor): a Ray Train run of this trial's config.

    The recgpt run directory is ``<experiment>/<trial>/run`` whatever the base config said, so a
    restored trial finds its own checkpoints (``train.resume=auto``) and trials never share one.
    (Tune's ``get_trial_dir()`` is a node-local staging directory, not the experiment's storage.)
    """
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from launcher.ray_launch import build_trainer, prepare_config

    trial_dir = os.path.join(experiment, Path(ray.tune.get_context().get_trial_dir()).name)
    tree = to_dict(with_values(base, config))
    tree["ray"]["storage_path"], tree["ray"]["name"] = trial_dir, TRIAL_RUN_DIR
    tree["train"]["resume"] = "auto"
    cfg = prepare_config(config_from_dict(tree))
    # Only evaluations go to Tune (its metric checking refuses a result without eval.metric); the
    # checkpoints stay recgpt's: a restarted trial resumes from checkpoints/latest on its own.
    trainer = build_trainer(cfg, callbacks=[TuneReportCallback()], report_metric=cfg.eval.metric)
    trainer.fit()


def _max_concurrent(exp: Experiment, explicit: int | None) -> int:
    """Trials side by side: as many worker groups as the cluster's CPUs (and GPUs) hold at once."""
    import ray

    if explicit:
        return explicit
    r = exp.base["ray"]
    total = ray.cluster_resources()
    fits = [int(total.get("CPU", 0) // (r["num_workers"] * r["cpus_per_worker"]))]
    if r["use_gpu"]:
        fits.append(int(total.get("GPU", 0) // r["num_workers"]))
    return max(1, min(fits))


def run_experiment(exp: Experiment, max_concurrent: int | None = None):
    """Run (or restore) the experiment; returns Tune's ResultGrid."""
    import ray
    from ray import tune

    from launcher.ray_launch import _connect

    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")  # paths are absolute; keep the job's cwd
    # Tune saves the experiment state at most every 10 s by default: a trial that finished in that
    # window before a driver crash would run again after the restore. The state is small; save often.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", str(EXPERIMENT_STATE_PERIOD_S))
    _check_same_experiment(exp)
    _connect()
    trainable = tune.with_resources(
        tune.with_parameters(_trial_main, base=exp.base, experiment=str(exp.path)), TRIAL_DRIVER_RESOURCES
    )
    space = tune_space(exp.params)
    path = str(exp.path)
    if tune.Tuner.can_restore(path):
        _log(f"restoring experiment {path}: finished trials are kept, unfinished ones resume")
        tuner = tune.Tuner.restore(
            path, trainable, param_space=space, resume_unfinished=True, resume_errored=True
        )
    else:
        concurrent = _max_concurrent(exp, max_concurrent)
        scheduler = None
        if exp.scheduler == "asha":
            t = exp.base["train"]
            scheduler = tune.schedulers.ASHAScheduler(
                time_attr="step",
                max_t=t["max_steps"],
                grace_period=t["eval_interval"],
                reduction_factor=REDUCTION_FACTOR,
                # A trial at max_t finishes by itself (final checkpoint, metrics.json): never cut it there.
                stop_last_trials=False,
            )
        _log(
            f"experiment {path}: {exp.num_trials} trial(s), scheduler {exp.scheduler}, metric {exp.metric} (max), "
            f"up to {concurrent} side by side, {exp.base['ray']['num_workers']} worker(s) per trial"
        )
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric=exp.metric,
                mode="max",
                scheduler=scheduler,
                num_samples=exp.trials,
                max_concurrent_trials=concurrent,
                trial_name_creator=_trial_name,
                trial_dirname_creator=_trial_name,
            ),
            run_config=tune.RunConfig(
                name=exp.name,
                storage_path=exp.storage_path,
                failure_config=tune.FailureConfig(max_failures=0),
                verbose=1,
            ),
        )
    try:
        return tuner.fit()
    finally:
        ray.shutdown()


# --------------------------------------------------------------------------- results


def logged_evals(run_dir: Path, metric: str) -> tuple[dict[int, float], int | None]:
    """``({step: metric}, last step)`` from a trial's ``train_log.jsonl`` (empty when there is none).

    The run's own log is the record of a trial: it holds every evaluation, also those reported to a
    driver that crashed before saving them (Tune's results of a restored trial start at the restore)
    and one a worker logged while ASHA was stopping it.
    """
    evals: dict[int, float] = {}
    last = None
    log = run_dir / "train_log.jsonl"
    if not log.is_file():
        return evals, last
    for line in log.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # a line cut short by a kill
            continue
        last = max(last or 0, int(rec.get("step", 0)))
        if rec.get("kind") == "eval" and isinstance(rec.get(metric), (int, float)):
            evals[int(rec["step"])] = float(rec[metric])
    return evals, last


def trial_rows(exp: Experiment, grid) -> list[dict[str, Any]]:
    """One row per trial: id, status, the searched values, best metric, its step, steps run, wall time.

    Metrics and steps come from the trial's run log (:func:`logged_evals`), falling back to what Tune
    received; the wall time is Tune's ``time_total_s`` (since the restore, for a restored trial).
    """
    rows = []
    for result in grid:
        df = result.metrics_dataframe
        metric = exp.metric
        trial_id = Path(result.path).name if result.path else ""
        best = best_step = steps = wall = None
        if df is not None and "time_total_s" in df.columns and len(df):
            wall = float(df["time_total_s"].max())
        evals, steps = logged_evals(exp.path / trial_id / TRIAL_RUN_DIR, metric)
        if evals:
            best_step = max(evals, key=lambda k: (evals[k], -k))
            best = evals[best_step]
        elif df is not None and metric in df.columns and df[metric].notna().any():
            i = df[metric].idxmax()
            best, best_step = float(df[metric][i]), int(df["step"][i])
            steps = int(df["step"].max())
        # train() writes metrics.json last: without it the trial was stopped (ASHA) before its end.
        finished = (exp.path / trial_id / TRIAL_RUN_DIR / "metrics.json").is_file()
        status = "error" if result.error else "finished" if finished else "stopped"
        row: dict[str, Any] = {"trial": trial_id, "status": status}
        row.update({p.key: (result.config or {}).get(p.key) for p in exp.params})
        row.update({f"best_{metric}": best, "best_step": best_step, "steps": steps, "wall_s": wall})
        rows.append(row)
    key = f"best_{exp.metric}"
    rows.sort(key=lambda r: (r[key] is None, -(r[key] or 0.0)))
    return rows


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def format_table(rows: list[dict[str, Any]]) -> str:
    cols = list(rows[0]) if rows else []
    cells = [[_cell(r[c]) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def write_results(exp: Experiment, rows: list[dict[str, Any]]) -> tuple[Path, Path | None]:
    """``trials.csv`` and (when any trial has the metric) ``best.yaml``; returns their paths."""
    exp.path.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["trial"])
    writer.writeheader()
    writer.writerows([{k: ("" if v is None else v) for k, v in r.items()} for r in rows])
    csv_path = atomic_write(exp.path / TRIALS_CSV, buf.getvalue())
    best = rows[0] if rows and rows[0][f"best_{exp.metric}"] is not None else None
    if best is None:
        return csv_path, None
    cfg = best_config(exp, best)
    header = (
        f"# recgpt tune {exp.name}: trial {best['trial']}, best {exp.metric} {best[f'best_{exp.metric}']:.4f} "
        f"at step {best['best_step']}.\n# The resolved config; `recgpt train --config best.yaml` trains it in {BEST_RUN_DIR}/ beside it.\n"
    )
    return csv_path, atomic_write(exp.path / BEST_YAML, header + to_yaml(cfg))


def best_config(exp: Experiment, row: dict[str, Any]) -> RecGPTConfig:
    """The trial's config: the base config with the trial's searched values, to train again.

    Its run directory is a new one, ``<experiment>/best-run`` (``ray.storage_path`` / ``ray.name``
    cleared so the run lands there under Ray too): ``train.resume=auto`` in the base config's own
    output_dir would continue whatever run is there. ``ray.num_workers`` is the user's again (0 = no
    Ray; trials needed at least one worker)."""
    values = {p.key: row[p.key] for p in exp.params}
    values.update(
        {
            "train.output_dir": str(exp.path / BEST_RUN_DIR),
            "ray.storage_path": None,
            "ray.name": None,
            "ray.num_workers": exp.num_workers,
        }
    )
    return with_values(exp.base, values)


# --------------------------------------------------------------------------- command line


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tune",
        help="Ray Tune search over config keys; every trial is a Ray Train run (ASHA stops weak ones)",
        description="Search config keys with Ray Tune. Every trial is an ordinary recgpt training run under "
        "Ray Train with the base config plus the trial's values; ASHA stops weak trials at evaluations. "
        "Rerunning the same command with the same --name resumes the experiment. Writes "
        "<experiment>/trials.csv and <experiment>/best.yaml (a config `recgpt train --config` accepts).",
    )
    add_config_args(p, example="ray.cpus_per_worker=0.9")
    p.add_argument(
        "--space", required=True, help="YAML: dotted.key: {loguniform|uniform|choice|grid|randint: [...]}"
    )
    p.add_argument(
        "--trials",
        type=int,
        default=8,
        help="samples of the space (each grid value this many times); default 8",
    )
    p.add_argument(
        "--scheduler", choices=("asha", "none"), default="asha", help="asha (default) stops weak trials early"
    )
    p.add_argument(
        "--name",
        help="experiment directory under ray.storage_path (default train.output_dir's parent); "
        "default tune-<space file stem>. The same name resumes.",
    )
    p.add_argument(
        "--max-concurrent",
        type=int,
        default=None,
        help="trials side by side (default: as many as the cluster's CPUs/GPUs hold)",
    )


def run(args: argparse.Namespace) -> int:
    exp = prepare(args)
    t0 = time.time()
    grid = run_experiment(exp, args.max_concurrent)
    rows = trial_rows(exp, grid)
    csv_path, best_path = write_results(exp, rows)
    print(format_table(rows), flush=True)
    _log(f"{len(rows)} trial(s) in {time.time() - t0:.0f}s; table {csv_path}")
    if best_path is None:
        _log(
            f"no trial reported {exp.metric}: no best.yaml (an interrupted experiment continues when the same "
            "command is run again)"
        )
        return 1
    _log(f"best config {best_path} (recgpt train --config {best_path})")
    errors = [r["trial"] for r in rows if r["status"] == "error"]
    if errors:
        _log(
            f"{len(errors)} trial(s) failed: {', '.join(errors)} (their errors are in their trial directories)"
        )
    return 0


__all__ = ["Param", "check_space", "parse_space", "run", "tune_space", "with_values"]
