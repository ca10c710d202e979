"""The training base of the three stages (stage 1, pretraining, fine-tuning).

`Trainer`: mesh, shardings (state replicated, batch split over the mesh axis 'data'), the
jitted step (non-finite guard, state donated) and global batches from each process's share.
`run` runs a `Stage` in its workdir (config.json, checkpoints, resume, `loop.run`, TensorBoard).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any, Callable, Mapping, Protocol, Sequence

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

from ms3_jax.data import augment, pipeline
from ms3_jax.data.label_space import LabelSpace
from ms3_jax.engine import checkpointing, loop, nonfinite, sharding
from ms3_jax.models import torch_format

Metrics = dict[str, jax.Array]
OUTPUT_STRIDES = (8, 16, 32)


def check_config(config: ml_collections.ConfigDict, num_devices: int,
                 num_processes: int | None = None) -> None:
    """Checks every stage shares: the global batch over devices and processes (processes
    default: this job's), the output stride, the non-finite mode."""
    if config.model.output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"model.output_stride must be 8, 16 or 32, got {config.model.output_stride}")
    sharding.check_global_batch(config.batch_size, num_devices,
                                jax.process_count() if num_processes is None else num_processes)
    nonfinite.mode_of(config)
    nonfinite.max_skipped(config, 1)  # validates nonfinite_max_skipped


class Stage(Protocol):
    """What `run` drives. The three stages implement it on `Trainer`: `Stage.from_config(config)`
    checks the config (once per run, before any long work) and builds the stage's data, model and
    jitted step."""

    config: ml_collections.ConfigDict
    num_steps: int
    pipeline: pipeline.TrainPipeline

    def init_state(self, rng: jax.Array, resuming: bool = False) -> Any:
        """The initial state, replicated (`resuming`: only its shapes matter)."""

    def step(self, state: Any, batch: Mapping[str, jax.Array]) -> tuple[Any, Metrics]:
        """One jitted training step on a global batch (`Trainer.step`)."""

    def global_batch(self, local: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's share of a batch -> global arrays (`Trainer.global_batch`)."""

    def evaluate(self, step: int, state: Any, workdir: str, writer: Any | None) -> None:
        """After every step: the stage's evaluation when one is due."""

    def finish(self, state: Any, history: list[dict[str, float]], end: int, workdir: str,
               writer: Any | None) -> Any:
        """The stage's outputs once the loop ends at `end` (any when `end < num_steps`)."""


class Trainer:
    """Mesh, shardings and the jitted step of one stage.

    A stage subclasses it: `__init__` calls `super().__init__(config, devices, batch_keys)`,
    builds its model for `self.platform` and its pure `step(state, batch[, consts])`, and hands
    the step to `compile_step`; it adds the rest of `Stage`.
    """

    def __init__(self, config: ml_collections.ConfigDict, devices: Sequence[Any] | None,
                 batch_keys: Sequence[str]):
        devices = list(devices) if devices is not None else jax.devices()
        self.config = config
        self.platform = sharding.platform_of(devices)  # of the compile target, not the host
        self.mesh = sharding.data_mesh(devices)
        self.replicated = NamedSharding(self.mesh, P())
        self.data_sharding = NamedSharding(self.mesh, P("data"))
        self.batch_keys = tuple(batch_keys)
        self.consts: Any = None
        self._step: Callable[..., Any] | None = None

    def compile_step(self, step: Callable[..., tuple[Any, Metrics]],
                     consts: Mapping[str, Any] | None = None) -> None:
        """`step(state, batch[, consts])` jitted with the non-finite guard, the state donated;
        `consts` (replicated here) are passed as the third argument of every call."""
        self.consts = None if consts is None else jax.device_put(consts, self.replicated)
        shardings = (self.replicated, self.data_sharding) + (() if consts is None else (self.replicated,))
        self._step = jax.jit(nonfinite.guard(step, nonfinite.mode_of(self.config)),
                             in_shardings=shardings,
                             out_shardings=(self.replicated, self.replicated), donate_argnums=0)

    def global_batch(self, local: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's share of the batch -> global arrays sharded over 'data'."""
        return {k: jax.make_array_from_process_local_data(self.data_sharding, np.asarray(local[k]))
                for k in self.batch_keys}

    def step(self, state: Any, batch: Mapping[str, jax.Array]) -> tuple[Any, Metrics]:
        args = (state, batch) if self.consts is None else (state, batch, self.consts)
        return self._step(*args)

    def backbone_from_file(self, path: str, model: Any) -> dict[str, Any]:
        """`{'params', 'batch_stats'}` of `model`'s backbone from a PyTorch ResNet checkpoint of
        a layout `checkpoint_formats` recognises (`model.init_from`, `init.path`), replicated."""
        loaded = jax.device_put(torch_format.load_backbone_file(path, model), self.replicated)
        logging.info("backbone initialised from %s", path)
        return loaded


def union_pipeline(config: ml_collections.ConfigDict, label_space: LabelSpace) -> pipeline.TrainPipeline:
    """The augmented, mixed stream of `data.datasets` in the union label space (stages 1 and 2),
    with unlabeled images when `data.unlabeled.source` is set (App. D)."""
    dc = config.data
    unlabeled = dc.get("unlabeled")
    return pipeline.TrainPipeline(
        dc.datasets, data_dir=dc.data_dir or None, global_batch_size=config.batch_size,
        label_space=label_space,
        augment=augment.AugmentConfig(crop_size=dc.crop_size, **dict(dc.get("augment") or {})),
        weights=dict(dc.weights) if dc.get("weights") else None, seed=config.seed,
        loader=pipeline.LoaderOptions(worker_count=dc.worker_count),
        skip_unreadable=bool(dc.get("skip_unreadable", False)),
        unlabeled=(pipeline.Unlabeled(unlabeled.source, unlabeled.ratio, unlabeled.split)
                   if unlabeled and unlabeled.get("source") else None))


def num_train_steps(config: ml_collections.ConfigDict, dataset_sizes: Sequence[int]) -> int:
    """`num_steps` if set, else `num_epochs` passes over the union of the training sets."""
    if config.get("num_steps"):
        return int(config.num_steps)
    return max(1, int(config.num_epochs * sum(dataset_sizes) // config.batch_size))


# Fields a resumed run may change freely: logging, checkpoint cadence, evaluation, failure
# handling, where the data lives and how it is read, the kernels (same numbers). Any other change
# alters what the run computes and must be named in `resume_overrides`.
RESUME_FREE = ("log_every", "checkpoint_every", "keep_checkpoints", "eval_every", "eval.",
               "nonfinite", "nonfinite_max_skipped", "resume_overrides", "default_workdir",
               "data.data_dir", "data.worker_count", "data.skip_unreadable", "model.kernels")
# Fields added after workdirs were written, with the value that computes what those runs did: a
# saved config without the field resumes when the field holds it.
ADDED_FIELDS = {"model.backbone": "resnet", "optim.optimizer": "sgd", "aux_head": False,
                "loss.aux_weight": 0.4, "image_tower.dense": "value", "text.tiny_clip_arch": "vit"}


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: list(tree) if isinstance(tree, (tuple, list)) else tree}


def resume_changes(saved: Mapping[str, Any], config: Mapping[str, Any]) -> list[str]:
    """`field: saved -> now` for every field that differs and is neither free to change
    (RESUME_FREE) nor named (or under a name) in `config.resume_overrides`; a field of
    `ADDED_FIELDS` absent from `saved` counts as its value there."""
    allowed = tuple(RESUME_FREE) + tuple(config.get("resume_overrides") or ())
    old, new = _flat(saved), _flat(config)
    old.update({k: v for k, v in ADDED_FIELDS.items() if k not in old and new.get(k) == v})
    free = lambda k: any(k == a or k.startswith(a if a.endswith(".") else a + ".") for a in allowed)
    return [f"{k}: {old.get(k, '(absent)')!r} -> {new.get(k, '(absent)')!r}"
            for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k) and not free(k)]


def check_resume(mngr: ocp.CheckpointManager, config: ml_collections.ConfigDict, workdir: str,
                 steps: Sequence[int] | None = None) -> int | None:
    """The resume guard: compare `config` with the config saved in the newest checkpoint step
    (of `steps`, default all) whose config item is intact, and raise a ValueError listing the
    changed fields (`resume_changes`) when it computes something else. Steps saved before they
    held their config are compared with W/config.json, which must then exist and parse (else a
    ValueError names it). Returns the step compared with (None: nothing to resume)."""
    directory = os.fspath(mngr.directory)
    current = json.loads(config.to_json())
    steps = sorted(mngr.all_steps() if steps is None else steps, reverse=True)
    for step in steps:
        try:
            saved = checkpointing.step_config(directory, step)
        except checkpointing.CheckpointError as e:
            logging.warning("%s; comparing the config with the next older step", e)
            continue
        source = f"checkpoint step {step}"
        if saved is None:  # a step saved before steps held their config: W/config.json
            path = os.path.join(workdir, checkpointing.CONFIG_FILE)
            if not os.path.isfile(path):
                raise ValueError(
                    f"{path} is missing and checkpoint step {step} predates saved configs, so "
                    "nothing says which config computed it; resuming could mix two runs. Put "
                    "back the run's config.json, or use another --workdir.")
            saved, source = checkpointing.read_config(workdir), path
        if changes := resume_changes(saved, current):
            raise ValueError(
                f"{workdir} holds a run (step {step}) with another config (from {source}); "
                "resuming would mix two runs:\n  " + "\n  ".join(changes) + "\nUse another "
                "--workdir, or name the fields you mean to change: --config.resume_overrides='(\"" +
                changes[0].split(":")[0] + "\",)'")
        return step
    if steps:
        raise ValueError(f"no checkpoint step of {workdir} has a readable config (above); "
                         "cannot check that this command continues that run. Move the damaged "
                         "steps out of its checkpoints directory, or use another --workdir.")
    return None


def record_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Write W/config.json (process 0), once the resume guard and the restore passed; a previous
    config.json that differs is kept as config.<n>.json. An unreadable one is kept the same way."""
    if jax.process_index() != 0:
        return
    path = os.path.join(workdir, checkpointing.CONFIG_FILE)
    try:
        changed = os.path.isfile(path) and checkpointing.read_config(workdir) != json.loads(config.to_json())
    except ValueError:
        changed = True
    if changed:
        n = 1
        while os.path.exists(os.path.join(workdir, f"config.{n}.json")):
            n += 1
        shutil.copyfile(path, os.path.join(workdir, f"config.{n}.json"))  # path stays readable
    checkpointing.write_config(workdir, config)


def run(stage: Stage, workdir: str, stop_at: int | None = None) -> Any:
    """`stage` in `workdir`: the resume guard (`check_resume`), resume from the latest checkpoint
    (state + data iterator), W/config.json (`record_config`), the loop (`loop.run`, `stage.evaluate` after every step), TensorBoard,
    then `stage.finish`, whose result is returned. `stop_at` ends the run after that step (with a
    checkpoint), as a preemption would."""
    config, num_steps = stage.config, stage.num_steps
    mngr = checkpointing.checkpoint_manager(workdir, config.keep_checkpoints)
    try:
        compared = check_resume(mngr, config, workdir)  # before any long work
    except BaseException:
        mngr.close()
        raise
    iterator = stage.pipeline.make_iterator()
    state = stage.init_state(jax.random.PRNGKey(config.seed), resuming=compared is not None)
    writer = loop.summary_writer(workdir, config)
    try:
        state, start = loop.restore_latest(mngr, state, iterator, workdir)
        if start and start != compared:  # an older step than the one compared was restored
            check_resume(mngr, config, workdir, steps=[start])
        record_config(config, workdir)
        end = num_steps if stop_at is None else min(num_steps, stop_at)
        history: list[dict[str, float]] = []
        state = loop.run(stage, state, iterator, config, start=start, end=end, num_steps=num_steps,
                         mngr=mngr, writer=writer, history=history,
                         after_step=lambda step, s: stage.evaluate(step, s, workdir, writer))
        return stage.finish(state, history, end, workdir, writer)
    finally:
        if writer is not None:
            writer.close()
