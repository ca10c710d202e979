r"""The paper's ablations (Tab. 4, Tab. 6) in miniature, on the built-in synthetic multi-dataset.

  python benchmarks/ablations.py --workdir runs/ablations               # all rows, 5 seeds
  python benchmarks/ablations.py --workdir W --rows ce_single,vl_mc --seeds 1 --quick   # smoke
  python benchmarks/ablations.py --workdir W --report     # the table from what has run

Every row pretrains the demo's tiny DeepLab-v3+ (configs/demo.py: the same data 2.0, model and
defaults, projection heads after the ASPP) on synth_a + synth_b + synth_c with one recipe, then
transfers its backbone (`init.what='backbone'`, as the paper compares pretrainings) twice: full
fine-tuning on synth_a (a pretraining dataset, Tab. 2's setting) and frozen-backbone fine-tuning
on the held-out synth_d (Mapillary's role, Tab. 3's setting); mIoU on their validation splits.

Budget, fixed before any result of data 2.0 was seen: PRETRAIN_STEPS pretraining steps with the
Eq. 6 mask from MASK_FROM (the demo's 1500 / 1000 cut to 600 / 360, the same 60 % warm-up
share) and FINETUNE_STEPS per transfer, so that 9 rows x 5 seeds fit about 75 minutes on 2 cores
and anyone can rerun the table. Short transfers keep the pretraining visible: at 300 steps every
initialisation reached ~91 mIoU on data 1.x.

Rows (Tab. 4 / Tab. 6), every one at the configs' defaults but for its switch:

  ce_single  CE over the union label space, one head        loss.kind='ce_single_head'
  ce_multi   CE with one head per dataset                    loss.kind='ce_multi_head'
  l          language only (Eq. 1)                           use_visual=False, multilabel=False
  v          vision only (Eq. 2-4)                           use_language=False, multilabel=False
  vl         V + L (Eq. 3)                                   multilabel=False
  l_mc       L + M_C (Eq. 5-7)                               use_visual=False
  v_mc       V + M_C (Eq. 5, 6, 8)                           use_language=False
  vl_mc      V + L + M_C (Eq. 9): MS3                        the defaults
  scratch    no pretraining (fine-tuning from random init)

V + M_C: without the language loss there is no trained language head, so Eq. 5's S is computed
from the *visual* head's pixel embeddings against T (`relations.pixel_head='visual'`): pixels
trained towards V are compared with text they never met, and Eq. 6 reads that S.

Seeds are paired: seed s is the same data order, initialisation and bank draws in every row,
so each ordering of the paper is judged by its paired differences over the seeds (mean and 95 %
t-interval; 'holds' when the interval is above 0, 'reversed' when below, else 'not resolved').
T comes from one stage-1 run (configs/demo.py's), shared by every row and seed. Language
accuracy (nearest-T pixel accuracy on the classes without a renamed relation,
`ms3_jax.demo.job.language_accuracy`) for rows with L; relations precision / recall between
differently named classes (`ms3_jax.demo.job.score_relations`) for rows with M_C. Each finished
(row, seed) is a line of W/ablations.jsonl, so an interrupted run resumes where it stopped; the
tables go to stdout, W/ablations.md and W/ablations.json (`--check FILE` checks that the
rows FILE quotes from them, between QUOTE_BEGIN / QUOTE_END, are the run's).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import time
from typing import Any

from scipy import stats

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from configs import demo as demo_config  # noqa: E402
from configs.finetune import common as finetune_common  # noqa: E402
from ms3_jax.data import synthetic  # noqa: E402
from ms3_jax.data.label_space import LabelSpace  # noqa: E402
from ms3_jax.demo import job as demo
from ms3_jax.stages import finetune, pretrain, text_adapt

ROWS: dict[str, dict[str, Any]] = {
    "ce_single": {"loss.kind": "ce_single_head"},
    "ce_multi": {"loss.kind": "ce_multi_head"},
    "l": {"loss.use_visual": False, "loss.multilabel": False},
    "v": {"loss.use_language": False, "loss.multilabel": False},
    "vl": {"loss.multilabel": False},
    "l_mc": {"loss.use_visual": False},
    "v_mc": {"loss.use_language": False, "relations.pixel_head": "visual"},
    "vl_mc": {},
    "scratch": None,
}
LABELS = {"ce_single": "CE single-head", "ce_multi": "CE multi-head", "l": "L", "v": "V",
          "vl": "V+L", "l_mc": "L+M_C", "v_mc": "V+M_C", "vl_mc": "V+L+M_C (MS3)",
          "scratch": "no pretraining"}
PRETRAIN_STEPS, MASK_FROM, FINETUNE_STEPS = 600, 360, 100
# The paper's orderings, (better, worse): Tab. 4 (CE multi > single; V, L > CE; V+L > V, L),
# Tab. 6 (M_C helps V, L and V+L; MS3 best), and any pretraining > none (Tab. 2).
ORDERINGS = (("ce_multi", "ce_single"), ("v", "ce_multi"), ("l", "ce_multi"), ("vl", "v"),
             ("vl", "l"), ("v_mc", "v"), ("l_mc", "l"), ("vl_mc", "vl"), ("vl_mc", "l_mc"),
             ("vl_mc", "v_mc"), ("vl_mc", "ce_single"), ("ce_single", "scratch"))
METRICS = {"miou_finetune": "fine-tune synth_a mIoU", "miou_frozen": "frozen synth_d mIoU"}
TRANSFER = {"finetune": ("synth_a", False), "frozen": (synthetic.HELD_OUT_DATASET, True)}


def pretrain_config(row: str, seed: int, data_dir: str, text: str, quick: bool):
    c = demo_config.get_config().pretrain
    c.seed = seed
    c.data.data_dir = data_dir
    c.text.embeddings = text
    c.num_steps, c.relations.warmup_steps = PRETRAIN_STEPS, MASK_FROM
    c.eval_every = 0
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


def run_one(row: str, seed: int, root: str, data_dir: str, text: str,
            quick: bool) -> dict[str, Any]:
    wd = os.path.join(root, "runs", f"{row}_s{seed}")
    out: dict[str, Any] = {"row": row, "seed": seed}
    t0 = time.time()
    init = None
    if ROWS[row] is not None:
        init = os.path.join(wd, "pretrain")
        cfg = pretrain_config(row, seed, data_dir, text, quick)
        pretrain.train_and_evaluate(cfg, init)
        truth = synthetic.ground_truth_relations()
        if cfg.loss.kind == "ms3" and cfg.loss.use_language:
            acc = demo.language_accuracy(init, data_dir, truth)
            out["acc_language"] = acc["pixel_accuracy_unrelated"]
        if cfg.loss.kind == "ms3" and cfg.loss.multilabel:
            with open(os.path.join(init, "relations.json")) as f:
                found = json.load(f)
            scores = demo.score_relations(found, truth, LabelSpace.from_datasets(list(cfg.data.datasets)))
            out.update(rel_precision=scores["precision"], rel_recall=scores["recall"],
                       rel_found=scores["found"])
    for name, (dataset, frozen) in TRANSFER.items():
        cfg = finetune_config(dataset, frozen, seed, data_dir, init, quick)
        out[f"miou_{name}"] = finetune.train_and_evaluate(cfg, os.path.join(wd, name))["mIoU"]
    out["seconds"] = round(time.time() - t0, 1)
    return out


def paired(results: list[dict[str, Any]], better: str, worse: str, metric: str) -> dict[str, Any]:
    """Paired difference better - worse over the seeds both rows ran: mean, 95 % t-interval."""
    by = {(r["row"], r["seed"]): r[metric] for r in results if metric in r}
    d = [by[(better, s)] - by[(worse, s)] for (row, s) in by if row == better and (worse, s) in by]
    if len(d) < 2:
        return {"n": len(d), "mean": statistics.mean(d) if d else None, "low": None, "high": None,
                "verdict": "too few seeds"}
    half = stats.t.ppf(0.975, len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))
    mean = statistics.mean(d)
    verdict = "holds" if mean - half > 0 else "reversed" if mean + half < 0 else "not resolved"
    return {"n": len(d), "mean": round(mean, 2), "low": round(mean - half, 2),
            "high": round(mean + half, 2), "verdict": verdict}


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per row: seeds and mean / std of each measure; per ordering and metric: `paired`."""
    rows = {}
    for row in ROWS:
        rs = [r for r in results if r["row"] == row]
        if not rs:
            continue
        rows[row] = {"seeds": sorted(r["seed"] for r in rs)}
        for k in ("miou_finetune", "miou_frozen", "acc_language", "rel_precision", "rel_recall"):
            v = [r[k] for r in rs if k in r]
            if v:
                rows[row][k] = {"mean": round(statistics.mean(v), 4),
                                "std": round(statistics.stdev(v), 4) if len(v) > 1 else 0.0}
    orderings = [{"better": a, "worse": b, **{m: paired(results, a, b, m) for m in METRICS}}
                 for a, b in ORDERINGS if a in rows and b in rows]
    return {"rows": rows, "orderings": orderings, "budget": {
        "pretrain_steps": PRETRAIN_STEPS, "mask_from": MASK_FROM, "finetune_steps": FINETUNE_STEPS}}


def _cell(stat: dict[str, float] | None, fmt: str = "{:.1f}") -> str:
    return "-" if stat is None else f"{fmt.format(stat['mean'])} ± {fmt.format(stat['std'])}"


def report(summary: dict[str, Any]) -> str:
    lines = ["| row | seeds | fine-tune synth_a mIoU | frozen synth_d mIoU | language acc "
             "(unrelated classes) | relations P / R (differently named) |",
             "|---|---|---|---|---|---|"]
    for row, r in summary["rows"].items():
        rel = "-" if "rel_precision" not in r else (
            f"{_cell(r['rel_precision'], '{:.2f}')} / {_cell(r['rel_recall'], '{:.2f}')}")
        lines.append(f"| {LABELS[row]} | {len(r['seeds'])} | {_cell(r.get('miou_finetune'))} | "
                     f"{_cell(r.get('miou_frozen'))} | {_cell(r.get('acc_language'), '{:.3f}')} | "
                     f"{rel} |")
    lines += ["", "| ordering (paper) | " + " | ".join(
        f"{label}: paired difference [95 % CI]" for label in METRICS.values()) + " |",
        "|---|" + "---|" * len(METRICS)]
    for o in summary["orderings"]:
        cells = []
        for m in METRICS:
            p = o[m]
            cells.append(f"{p['verdict']}" if p["low"] is None else
                         f"{p['mean']:+.1f} [{p['low']:+.1f}, {p['high']:+.1f}] {p['verdict']}")
        lines.append(f"| {LABELS[o['better']]} > {LABELS[o['worse']]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


QUOTE_BEGIN, QUOTE_END = "<!-- ablations: quoted from the run -->", "<!-- /ablations -->"


def check_quotes(path: str, table: str) -> list[str]:
    """What `path` quotes wrongly: between its QUOTE_BEGIN / QUOTE_END markers, every table row
    whose first cell names a row or an ordering of the run must be the run's line verbatim, and
    at least one must be there. Returns the problems (empty: the quotes are the run's)."""
    with open(path) as f:
        text = f.read()
    if QUOTE_BEGIN not in text or QUOTE_END not in text:
        return [f"no {QUOTE_BEGIN} ... {QUOTE_END} section"]
    quoted = text.split(QUOTE_BEGIN, 1)[1].split(QUOTE_END, 1)[0].splitlines()
    first = lambda line: line.split("|")[1].strip()
    run = {first(line): line for line in table.splitlines() if line.startswith("| ")}
    rows = [line for line in quoted if line.startswith("| ") and first(line) in run]
    bad = [f"quoted: {line}\n   run: {run[first(line)]}" for line in rows if line != run[first(line)]]
    return bad or ([] if rows else ["quotes no row of the run"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default=os.path.join("runs", "ablations"))  # not /tmp
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from {list(ROWS)}")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--seed_from", type=int, default=0,
                        help="run seeds seed_from..seeds-1 only (to split a table over processes; "
                             "concatenate their ablations.jsonl for --report)")
    parser.add_argument("--quick", action="store_true", help="a few steps per run (a smoke test)")
    parser.add_argument("--report", action="store_true", help="only print the tables")
    parser.add_argument("--check", metavar="FILE", action="append", default=[],
                        help="exit 1 unless the rows FILE quotes (between its QUOTE_BEGIN / "
                             "QUOTE_END markers) are the run's (repeatable)")
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
    if not (args.report or args.check):
        demo_cfg = demo_config.get_config()
        data_dir = os.path.join(root, "data")
        synthetic.prepare_synthetic(data_dir, **demo_cfg.synthetic)
        text = os.path.join(root, "text_adapt", "text_embeddings.npz")
        if not os.path.exists(text):
            stage1 = demo_cfg.text_adapt
            stage1.data.data_dir = data_dir
            stage1.text.tiny_clip_dir = os.path.join(root, "tiny_clip")
            text_adapt.train_and_evaluate(stage1, os.path.dirname(text))
        todo = [(r, s) for s in range(args.seed_from, args.seeds) for r in rows
                if not any(d["row"] == r and d["seed"] == s for d in done)]
        t0 = time.time()
        for i, (row, seed) in enumerate(todo):
            result = run_one(row, seed, root, data_dir, text, args.quick)
            done.append(result)
            with open(log, "a") as f:
                f.write(json.dumps(result) + "\n")
            eta = (time.time() - t0) / (i + 1) * (len(todo) - i - 1) / 60
            print(f"[{i + 1}/{len(todo)}] {json.dumps(result)}  ETA {eta:.0f} min", flush=True)
    summary = summarize(done)
    table = report(summary)
    if args.check:
        bad = {path: check_quotes(path, table) for path in args.check}
        for path, lines in bad.items():
            print(f"{path}: {'quotes the run' if not lines else f'{len(lines)} problems:'}")
            print("\n".join(lines))
        sys.exit(1 if any(bad.values()) else 0)
    with open(os.path.join(root, "ablations.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(root, "ablations.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(table)


if __name__ == "__main__":
    main()
