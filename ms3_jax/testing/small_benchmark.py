"""The small benchmark of tests/test_demo.py, in a child process at XLA's default optimisation
level (500 steps: running dominates compiling): `python -m ms3_jax.testing.small_benchmark ROOT`
writes ROOT/benchmark.json (`run`)."""
from __future__ import annotations

import json
import os
import sys

import numpy as np


def run(root: str) -> dict:
    """The demo's pretraining at a third of its budget (500 steps, Eq. 6 mask from step 300) on
    the demo's data 2.0 (200 train / 20 val images of 96 px), with one random unit T per distinct
    name (no stage 1): {"accuracy": `demo.language_accuracy`, "scores": `demo.score_relations`}."""
    from absl import flags

    from configs import demo as demo_config
    from ms3_jax.data import synthetic
    from ms3_jax.data.label_space import LabelSpace
    from ms3_jax.demo import job as demo
    from ms3_jax.method import text_embeddings
    from ms3_jax.stages import pretrain
    from ms3_jax.testing import synthetic_data
    flags.FLAGS.mark_as_parsed()
    data = synthetic_data.build(root, num_train=200, num_val=20, image_size=96)
    ls = LabelSpace.from_datasets(list(synthetic.PRETRAIN_DATASETS))
    names = sorted(set(ls.names))
    t = np.random.default_rng(0).standard_normal((len(names), 32))
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    text_path = os.path.join(root, "text_embeddings.npz")
    text_embeddings.save_text_embeddings(
        text_path, ls, np.stack([t[names.index(n)] for n in ls.names]).astype(np.float32), "template")
    config = demo_config.get_config().pretrain
    config.update_from_flattened_dict({"data.data_dir": data.data_dir, "text.embeddings": text_path,
                                       "num_steps": 500, "relations.warmup_steps": 300,
                                       "log_every": 100,
                                       "eval.held_out": ()})  # random T: no text model for synth_d
    workdir = os.path.join(root, "pretrain")
    pretrain.train_and_evaluate(config, workdir)
    truth = synthetic.ground_truth_relations()
    with open(os.path.join(workdir, "relations.json")) as f:
        scores = demo.score_relations(json.load(f), truth, ls)
    return {"accuracy": demo.language_accuracy(workdir, data.data_dir, truth), "scores": scores}


if __name__ == "__main__":
    result = run(sys.argv[1])
    with open(os.path.join(sys.argv[1], "benchmark.json"), "w") as f:
        json.dump(result, f)
