r"""The paper's ablations (Tab. 4, Tab. 6) in miniature, on the built-in synthetic multi-dataset.

  python benchmarks/ablations.py --workdir /tmp/ms3_ablations            # all rows, 3 seeds
  python benchmarks/ablations.py --workdir W --rows ce_single,vl_mc --seeds 1 --quick   # smoke
  python benchmarks/ablations.py --workdir W --report     # the table from what has run

Every row pretrains the demo's tiny DeepLab-v3+ (configs/demo.py: the same data and schedule, at
PRETRAIN_STEPS with the Eq. 6 mask from MASK_FROM, two thirds of the demo's budget so that the 30
runs fit an hour or two) on synth_a + synth_b + synth_c with one recipe, then transfers its backbone
(`init.what='backbone'`, as the paper compares pretrainings) twice: full fine-tuning on synth_a
(a pretraining dataset, Tab. 2's setting) and frozen-backbone fine-tuning on the held-out synth_d
(Mapillary's role, Tab. 3's setting), FINETUNE_STEPS each (short: at 300 steps every
initialisation reached ~91 mIoU on these easy datasets); mIoU on their validation splits.
Rows (Tab. 4 / Tab. 6):

  ce_single  CE over the union label space, one head        loss.kind='ce_single_head'
  ce_multi   CE with one head per dataset                    loss.kind='ce_multi_head'
  l          language only (Eq. 1)                           use_visual=False, multilabel=False
  v          vision only (Eq. 2-4)                           use_language=False, multilabel=False
  vl         V + L (Eq. 3)                                   multilabel=False
  l_mc       L + M_C (Eq. 5-7)                               use_visual=False
  v_mc       V + M_C (Eq. 5, 6, 8; Eq. 5 on the visual head) use_language=False
  vl_mc      V + L + M_C (Eq. 9): MS3                        the defaults
  vl_mc_aspp MS3 with the projection heads after the ASPP    model.heads_at='aspp'
  scratch    no pretraining (fine-tuning from random init)

The Tab. 4 / 6 rows take their heads at `--heads_at` (default 'decoder': how the table in
RESULTS.md was measured, before 'aspp' became the configs' default); `vl_mc_aspp` always
puts them after the ASPP. `--heads_at aspp` runs the rows the current default's way.

T comes from one stage-1 run (configs/demo.py's), shared by every row and seed. Seeds change the
pretraining (`seed`: init, data order, bank) and the fine-tuning. Language accuracy (nearest-T
pixel accuracy, `ms3_jax.demo.language_accuracy`) for rows with L; relation precision / recall
against the planted relations (`ms3_jax.demo.score_relations`) for rows with M_C. Each finished
(row, seed) is a line of W/ablations.jsonl, so an interrupted run resumes where it stopped; the
table (mean +- std over seeds) goes to stdout and W/ablations.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from configs import demo as demo_config  # noqa: E402
from configs.finetune import common as finetune_common  # noqa: E402
from ms3_jax import demo, finetune, pretrain, text_adapt  # noqa: E402
from ms3_jax.data import synthetic  # noqa: E402
from ms3_jax.data.label_space import LabelSpace  # noqa: E402

ROWS: dict[str, dict[str, Any]] = {
    "ce_single": {"loss.kind": "ce_single_head"},
    "ce_multi": {"loss.kind": "ce_multi_head"},
    "l": {"loss.use_visual": False, "loss.multilabel": False},
    "v": {"loss.use_language": False, "loss.multilabel": False},
    "vl": {"loss.multilabel": False},
    "l_mc": {"loss.use_visual": False},
    "v_mc": {"loss.use_language": False, "relations.pixel_head": "visual"},
    "vl_mc": {},
    "vl_mc_aspp": {"model.heads_at": "aspp"},
    "scratch": None,
}
LABELS = {"ce_single": "CE single-head", "ce_multi": "CE multi-head", "l": "L", "v": "V",
          "vl": "V+L", "l_mc": "L+M_C", "v_mc": "V+M_C", "vl_mc": "V+L+M_C (MS3)",
          "vl_mc_aspp": "V+L+M_C, heads after ASPP", "scratch": "no pretraining"}
PRETRAIN_STEPS, MASK_FROM, FINETUNE_STEPS = 1000, 600, 100
TRANSFER = {"finetune": ("synth_a", False), "frozen": (synthetic.HELD_OUT_DATASET, True)}


def pretrain_config(row: str, seed: int, data_dir: str, text: str, quick: bool,
                    heads_at: str = "decoder"):
    c = demo_config.get_config().pretrain
    c.seed = seed
    c.data.data_dir = data_dir
    c.text.embeddings = text
    c.num_steps, c.relations.warmup_steps = PRETRAIN_STEPS, MASK_FROM
    c.model.heads_at, c.eval_every = heads_at, 0
    c.update_from_flattened_dict(ROWS[row])
    if quick:
        c.num_steps, c.relations.warmup_steps, c.checkpoint_every, c.log_every = 60, 30, 60, 20
    return c


def finetune_config(dataset: str, frozen: bool, seed: int, data_dir: str, init: str | None,
                    quick: bool):
    c = finetune_common.get_config(dataset, "tiny", crop_size=64, batch_size=16,
                                   num_steps=FINETUNE_STEPS,
                                   base_size=96)
    c.seed = seed
    c.data.update(dict(dataset=dataset, data_dir=data_dir, synthetic=None, crop_size=64))
    c.data.augment.base_size = 96
    c.eval.update(dict(short_side=96, max_images=0))
    c.num_steps, c.log_every = (20, 10) if quick else (FINETUNE_STEPS, 50)
    c.eval_every = c.checkpoint_every = c.num_steps
    c.frozen_backbone = frozen
    if init:
        c.init.update(dict(kind="ms3", path=init, what="backbone"))
    return c


def run_one(row: str, seed: int, root: str, data_dir: str, text: str, quick: bool,
            heads_at: str = "decoder") -> dict[str, Any]:
    wd = os.path.join(root, "runs", f"{row}_s{seed}")
    out: dict[str, Any] = {"row": row, "seed": seed}
    t0 = time.time()
    init = None
    if ROWS[row] is not None:
        init = os.path.join(wd, "pretrain")
        cfg = pretrain_config(row, seed, data_dir, text, quick, heads_at)
        pretrain.train_and_evaluate(cfg, init)
        truth = synthetic.ground_truth_relations()
        if cfg.loss.kind == "ms3" and cfg.loss.use_language:
            acc = demo.language_accuracy(init, data_dir, truth)
            out["acc_language"] = acc["pixel_accuracy"]
            out["acc_language_unrelated"] = acc["pixel_accuracy_unrelated"]
        if cfg.loss.kind == "ms3" and cfg.loss.multilabel:
            with open(os.path.join(init, "relations.json")) as f:
                found = json.load(f)
            scores = demo.score_relations(found, truth, LabelSpace.from_datasets(list(cfg.data.datasets)))
            out.update(rel_precision=scores["precision"], rel_recall=scores["recall"],
                       rel_renamed_recall=scores["renamed"]["recall"], rel_found=scores["found"])
    for name, (dataset, frozen) in TRANSFER.items():
        cfg = finetune_config(dataset, frozen, seed, data_dir, init, quick)
        out[f"miou_{name}"] = finetune.train_and_evaluate(cfg, os.path.join(wd, name))["mIoU"]
    out["seconds"] = round(time.time() - t0, 1)
    return out


def _cell(values: list[float], fmt: str = "{:.1f}") -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def report(results: list[dict[str, Any]]) -> str:
    by_row: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_row.setdefault(r["row"], []).append(r)
    lines = ["| row | seeds | fine-tune synth_a mIoU | frozen synth_d mIoU | language acc | "
             "relations P / R (renamed R) |", "|---|---|---|---|---|---|"]
    for row in ROWS:
        rs = by_row.get(row, [])
        if not rs:
            continue
        get = lambda k: [r[k] for r in rs if k in r]
        rel = "-"
        if get("rel_precision"):
            rel = (f"{_cell(get('rel_precision'), '{:.2f}')} / {_cell(get('rel_recall'), '{:.2f}')} "
                   f"({_cell(get('rel_renamed_recall'), '{:.2f}')})")
        lines.append(f"| {LABELS[row]} | {len(rs)} | {_cell(get('miou_finetune'))} | "
                     f"{_cell(get('miou_frozen'))} | {_cell(get('acc_language'), '{:.3f}')} | {rel} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/ms3_ablations")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from {list(ROWS)}")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a few steps per run (a smoke test)")
    parser.add_argument("--report", action="store_true", help="only print the table")
    parser.add_argument("--heads_at", default="decoder", choices=("decoder", "aspp"),
                        help="projection heads of the Tab. 4 / 6 rows (vl_mc_aspp: always aspp)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    rows = [r for r in args.rows.split(",") if r]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}; valid: {list(ROWS)}")
    root = args.workdir
    os.makedirs(root, exist_ok=True)
    log = os.path.join(root, "ablations.jsonl")
    done = []
    if os.path.exists(log):
        with open(log) as f:
            done = [json.loads(line) for line in f if line.strip()]
    if not args.report:
        demo_cfg = demo_config.get_config()
        data_dir = os.path.join(root, "data")
        synthetic.prepare_synthetic(data_dir, **demo_cfg.synthetic)
        text = os.path.join(root, "text_adapt", "text_embeddings.npz")
        if not os.path.exists(text):
            stage1 = demo_cfg.text_adapt
            stage1.model.heads_at = args.heads_at  # as the T of the measured table
            stage1.data.data_dir = data_dir
            stage1.text.tiny_clip_dir = os.path.join(root, "tiny_clip")
            text_adapt.train_and_evaluate(stage1, os.path.dirname(text))
        todo = [(r, s) for s in range(args.seeds) for r in rows
                if not any(d["row"] == r and d["seed"] == s for d in done)]
        t0 = time.time()
        for i, (row, seed) in enumerate(todo):
            result = run_one(row, seed, root, data_dir, text, args.quick, args.heads_at)
            done.append(result)
            with open(log, "a") as f:
                f.write(json.dumps(result) + "\n")
            eta = (time.time() - t0) / (i + 1) * (len(todo) - i - 1) / 60
            print(f"[{i + 1}/{len(todo)}] {json.dumps(result)}  ETA {eta:.0f} min", flush=True)
    table = report(done)
    with open(os.path.join(root, "ablations.md"), "w") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
