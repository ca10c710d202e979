"""`configs/demo.py`: stage 1, MS3 pretraining, relation recovery and export on synthetic data.

Nothing here is demo-only logic: each step calls the library entry point a user would call on
real data; the demo only wires their workdirs together and scores the relations report against
the synthetic data's planted relations (precision / recall of Eq. 6's mapping, paper Tab. 8).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import ml_collections
import numpy as np

from ms3_jax import export, pretrain, text_adapt
from ms3_jax.data import synthetic
from ms3_jax.data.label_space import LabelSpace


def score_relations(found: list[dict[str, Any]], truth: list[dict[str, str]],
                    label_space: LabelSpace) -> dict[str, Any]:
    """Precision / recall of directed cross-dataset pairs against the ground-truth relations."""
    names = set(label_space.display_names)
    dataset = {n: n.split("/")[0] for n in names}
    want = {(r["from"], r["to"]) for r in truth
            if r["from"] in names and r["to"] in names and dataset[r["from"]] != dataset[r["to"]]}
    got = {(r["from"], r["to"]) for r in found}
    hits = got & want
    return {"precision": len(hits) / len(got) if got else 0.0,
            "recall": len(hits) / len(want) if want else 0.0,
            "found": len(got), "planted": len(want),
            "correct": sorted(f"{a} -> {b}" for a, b in hits),
            "missed": sorted(f"{a} -> {b}" for a, b in want - got),
            "wrong": sorted(f"{a} -> {b}" for a, b in got - want)}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    data_dir = os.path.join(workdir, "data")
    logging.info("[demo 1/5] synthetic datasets -> %s", data_dir)
    info = synthetic.prepare_synthetic(data_dir, **config.synthetic)

    stage1 = config.text_adapt.copy_and_resolve_references()
    stage1.data.data_dir = data_dir
    if stage1.text.tiny_clip_dir:
        stage1.text.tiny_clip_dir = os.path.join(workdir, "tiny_clip")
    text_dir = os.path.join(workdir, "text_adapt")
    logging.info("[demo 2/5] stage 1: adapting the language embeddings -> %s", text_dir)
    text_adapt.train_and_evaluate(stage1, text_dir)

    stage2 = config.pretrain.copy_and_resolve_references()
    stage2.data.data_dir = data_dir
    stage2.text.embeddings = os.path.join(text_dir, "text_embeddings.npz")
    pre_dir = os.path.join(workdir, "pretrain")
    logging.info("[demo 3/5] MS3 pretraining -> %s", pre_dir)
    history = pretrain.train_and_evaluate(stage2, pre_dir)

    logging.info("[demo 4/5] relations report vs the planted relations")
    label_space = LabelSpace.from_datasets(list(stage2.data.datasets))
    with open(os.path.join(pre_dir, "relations.json")) as f:
        found = json.load(f)
    scores = score_relations(found, synthetic.load_relations(info.relations_path), label_space)
    with open(os.path.join(workdir, "relations_eval.json"), "w") as f:
        json.dump(scores, f, indent=1)
    logging.info("relations: precision %.2f, recall %.2f (%d found, %d planted)",
                 scores["precision"], scores["recall"], scores["found"], scores["planted"])

    out = os.path.join(pre_dir, "backbone.safetensors")
    logging.info("[demo 5/5] exporting the backbone -> %s", out)
    export.export_workdir(pre_dir, out)

    losses = [h["loss"] for h in history]
    k = max(1, len(losses) // 5)
    summary = {"loss_first": float(np.mean(losses[:k])), "loss_last": float(np.mean(losses[-k:])),
               "relations": scores, "backbone": out}
    with open(os.path.join(workdir, "demo_summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    logging.info("demo done: loss %.3f -> %.3f; outputs in %s. For PyTorch: "
                 "python -m ms3_jax.export --workdir %s --out backbone.pth", summary["loss_first"],
                 summary["loss_last"], workdir, pre_dir)
    return summary
