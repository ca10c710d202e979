"""`configs/demo.py`: stage 1, MS3 pretraining, relation recovery and export on synthetic data.

Each step calls the library entry point a user would call on real data; the demo wires their
workdirs together and scores Eq. 6's relations against the planted ones (Tab. 8).
"""
from __future__ import annotations

import glob
import json
import logging
import math
import os
import struct
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from google.protobuf.message import DecodeError
from PIL import Image
from tensorboardX.proto import event_pb2

from ms3_jax import export, zero_shot
from ms3_jax.data import eval_data, sources, synthetic
from ms3_jax.demo import tiny_clip
from ms3_jax.data.label_space import LabelSpace
from ms3_jax.engine import checkpointing
from ms3_jax.evaluation import visualize
from ms3_jax.files import safe
from ms3_jax.method import text_embeddings
from ms3_jax.models.deeplab import encoder_from_config
from ms3_jax.stages import pretrain, text_adapt


class NoBetterThanChance(RuntimeError):
    """The demo's pretrained model predicts no better than twice chance: a broken run."""


def score_relations(found: list[dict[str, Any]], truth: list[dict[str, str]],
                    label_space: LabelSpace, sim_KxK: np.ndarray | None = None) -> dict[str, Any]:
    """Precision / recall of Eq. 6's directed pairs (paper Tab. 8) between differently named
    classes, against the planted relations; same-name pairs apart, as a sanity count.

    `recall_directed` counts each direction apart; `chance_p`: :func:`chance_p` of the directed
    pairs found right among the differently named cross-dataset pairs; `pairs`: one row per
    planted or found directed pair (status found / missed / wrong, with S[from, to] and
    S[from, from] when `sim_KxK`, Eq. 5's S, is given). Rules: docs/choices.md, "Scoring
    relations".
    """
    names = list(label_space.display_names)
    dataset = {n: n.split("/")[0] for n in names}
    short = lambda n: n.split("/", 1)[1]
    truth = [r for r in truth if r["from"] in dataset and r["to"] in dataset
             and dataset[r["from"]] != dataset[r["to"]]]
    got = {(r["from"], r["to"]) for r in found}
    renamed = lambda p: short(p[0]) != short(p[1])
    kind = {(r["from"], r["to"]): r["kind"] for r in truth if renamed((r["from"], r["to"]))}
    want, got_renamed = set(kind), {p for p in got if renamed(p)}
    relations = {frozenset(p) if k == "synonym" else p for p, k in kind.items()}
    recovered = lambda rel: bool({tuple(rel), tuple(rel)[::-1]} & got) if isinstance(
        rel, frozenset) else rel in got
    same = [(a, b) for a in names for b in names
            if dataset[a] != dataset[b] and short(a) == short(b)]

    def row(pair: tuple[str, str], status: str) -> dict[str, Any]:
        out = {"from": pair[0], "to": pair[1], "kind": kind.get(pair, "none"), "status": status}
        if sim_KxK is not None:
            a, b = names.index(pair[0]), names.index(pair[1])
            out.update(S=round(float(sim_KxK[a, b]), 4), S_self=round(float(sim_KxK[a, a]), 4))
        return out

    status = lambda p: ("found" if p in got else "missed") if p in want else "wrong"
    candidates = {(a, b) for a in names for b in names
                  if dataset[a] != dataset[b] and short(a) != short(b)}
    return {
        "precision": len(got_renamed & want) / len(got_renamed) if got_renamed else 0.0,
        "chance_p": chance_p(len(candidates), len(want), len(got_renamed & candidates),
                             len(got_renamed & want)),
        "recall": sum(map(recovered, relations)) / len(relations) if relations else 0.0,
        "found": len(got_renamed), "planted": len(relations),
        "recall_directed": len(got & want) / len(want) if want else 0.0,
        "same_name": {"found": len(got & set(same)), "possible": len(same)},
        "correct": sorted(f"{a} -> {b}" for a, b in got_renamed & want),
        "missed": sorted(" <-> ".join(sorted(r)) if isinstance(r, frozenset) else " -> ".join(r)
                         for r in relations if not recovered(r)),
        "wrong": sorted(f"{a} -> {b}" for a, b in got_renamed - want),
        "pairs": [row(p, status(p)) for p in sorted(want | got_renamed)],
    }


def chance_p(candidates: int, planted: int, found: int, right: int) -> float:
    """P(at least `right` planted pairs among `found` pairs drawn at random, without replacement,
    from `candidates` directed pairs of which `planted` are planted): the hypergeometric tail.
    Small: Eq. 6 found more than picking pairs blindly would; docs/choices.md, "Scoring
    relations"."""
    total = math.comb(candidates, found)
    return sum(math.comb(planted, k) * math.comb(candidates - planted, found - k)
               for k in range(right, min(planted, found) + 1)) / total


def language_accuracy(pretrain_dir: str, data_dir: str, truth: list[dict[str, str]],
                      max_images: int | None = None,
                      state: dict[str, Any] | None = None) -> dict[str, Any]:
    """Pixel accuracy of the nearest-T prediction (the language head against the T it was trained
    with, the cosine upsampled to the image as in zero-shot) on every dataset's validation split.
    Classes sharing a name count as one (their T is one prompt); 'unrelated' keeps the pixels of
    classes without a planted relation to a differently named class (synonyms and subsets by
    another name: whichever of the names the model says, it is not wrong)."""
    config = checkpointing.read_config(pretrain_dir)
    label_space = LabelSpace.from_datasets(list(config["data"]["datasets"]))
    text_KxC = text_embeddings.load_text_embeddings(config["text"]["embeddings"], label_space)
    names = sorted(set(label_space.names))
    name_of_class = np.array([names.index(n) for n in label_space.names])
    text_NxC = jnp.asarray(text_KxC[[label_space.names.index(n) for n in names]])
    model = encoder_from_config(config["model"], jax.local_devices()[0].platform,
                                heads=("language",), num_classes=None)
    if state is None:  # the raw state of the workdir's latest checkpoint
        state = checkpointing.restore_state(pretrain_dir)[1]
    variables = checkpointing.encoder_variables(state)

    @jax.jit
    def predict(image_HxWx3):
        emb_hxwxC = model.apply(variables, image_HxWx3[None], train=False)["language"][0]
        return jnp.argmax(zero_shot.upsampled_cosine(emb_hxwxC, text_NxC, image_HxWx3.shape[:2]), axis=-1)

    renamed = {r[k] for r in truth for k in ("from", "to")
               if r["from"].split("/", 1)[1] != r["to"].split("/", 1)[1]}
    unrelated = np.array([n not in renamed for n in label_space.display_names])
    hits = np.zeros((label_space.num_classes, 2), np.int64)  # per class: correct, pixels
    for dataset in label_space.dataset_names:
        images = eval_data.make_eval_dataset(dataset, label_space=label_space, data_dir=data_dir)
        for i in range(len(images) if max_images is None else min(len(images), max_images)):
            example = images[i]
            labels, valid = example["label"], example["label"] >= 0
            correct = np.asarray(predict(example["image"]))[valid] == name_of_class[labels[valid]]
            np.add.at(hits, (labels[valid], 0), correct)
            np.add.at(hits, (labels[valid], 1), 1)
    acc = lambda rows: float(hits[rows, 0].sum() / max(hits[rows, 1].sum(), 1))
    return {"pixel_accuracy": acc(slice(None)), "pixel_accuracy_unrelated": acc(unrelated),
            "per_class": {n: round(float(c / p), 4) for n, (c, p) in
                          zip(label_space.display_names, hits) if p}}


def logged_scalars(tensorboard_dir: str, tag: str) -> dict[int, float]:
    """step -> value of the scalar `tag` in the TensorBoard event files of `tensorboard_dir` (one
    per attempt of a run): a step logged by several attempts keeps its latest value; a record cut
    short (an attempt killed while writing) ends its file."""
    found: dict[int, tuple[float, float]] = {}  # step -> (wall time, value)
    for path in sorted(glob.glob(os.path.join(glob.escape(tensorboard_dir), "*tfevents*"))):
        with open(path, "rb") as f:
            data = f.read()
        pos = 0
        while pos + 12 <= len(data):  # TFRecord: length, its crc, the Event, its crc
            (n,) = struct.unpack_from("<Q", data, pos)
            if pos + 16 + n > len(data):
                break
            try:
                event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            except DecodeError:
                break
            pos += 16 + n
            for v in event.summary.value:
                if v.tag == tag:
                    value = v.simple_value if v.HasField("simple_value") else (
                        v.tensor.float_val[0] if v.tensor.float_val else math.nan)
                    if event.step not in found or event.wall_time >= found[event.step][0]:
                        found[event.step] = (event.wall_time, float(value))
    return {step: value for step, (_, value) in sorted(found.items())}


def loss_summary(history: list[dict[str, float]], pretrain_dir: str) -> dict[str, Any]:
    """`loss_first` / `loss_last` of demo_summary.json: the mean pretraining loss over the first
    and the last fifth of the steps (non-finite, skipped, steps left out), and `loss_from`. From
    `history` (every step) when it holds the whole run; a resumed run has in memory only the steps
    after the resume (none when pretraining had finished), so its losses are read back from
    W/pretrain/tensorboard's `train/loss`, the steps logged (every `log_every`) by every attempt.
    None when no loss was recorded at all."""
    per_step = {int(h["step"]): float(h["loss"]) for h in history if "loss" in h}
    losses, source = per_step, "every step"
    if not per_step or min(per_step) != 1:  # resumed
        logged = logged_scalars(os.path.join(pretrain_dir, "tensorboard"), "train/loss")
        losses, source = ((logged, "train/loss logged to tensorboard (a resumed run)") if logged
                          else (per_step, "the steps after the resume (nothing logged before)"))
    values = [v for _, v in sorted(losses.items()) if math.isfinite(v)]
    if not values:
        return {"loss_first": None, "loss_last": None, "loss_from": "no loss recorded"}
    k = max(1, len(values) // 5)
    return {"loss_first": float(np.mean(values[:k])), "loss_last": float(np.mean(values[-k:])),
            "loss_from": source}


# W/samples/: validation images of the demo's synthetic datasets to try the tools on (the
# held-out dataset first: what configs/finetune/synthetic.py fine-tunes on), as (dataset, how
# many); W/samples_truth/: their ground truth drawn over them (not in W/samples/, which
# `predict --image` reads whole).
SAMPLES_DIR, SAMPLES_TRUTH_DIR, SAMPLES_FILE, SAMPLES_README = (
    "samples", "samples_truth", "samples.json", "README.txt")
SAMPLES = ((synthetic.HELD_OUT_DATASET, 3), *((d, 1) for d in synthetic.PRETRAIN_DATASETS))
NOT_ANNOTATED = "(not annotated)"


def write_samples(workdir: str, samples: tuple[tuple[str, int], ...] = SAMPLES) -> list[str]:
    """Writes validation images of the synthetic datasets in `workdir`/data as PNGs into
    `workdir`/samples/ (`<dataset>_val<index>.png`; `samples`: (dataset, how many) pairs; the
    first images of the split with at least two classes annotated on at least half of the
    image, then the first others), with samples.json (per image: its dataset, whether
    pretraining saw that dataset, the dataset's classes and the share of the image each one
    covers) and a README.txt with the commands that segment them; the ground truth over each
    image goes to `workdir`/samples_truth/. Reads `workdir`/data only, so a demo workdir that
    finished before samples existed gets them too. Every file is written atomically; returns
    the PNG paths."""
    data_dir = os.path.join(workdir, "data")
    out = safe.make_own_dir(os.path.join(workdir, SAMPLES_DIR), "samples directory")
    truth_dir = safe.make_own_dir(os.path.join(workdir, SAMPLES_TRUTH_DIR), "samples directory")
    written, entries = [], []
    for dataset, count in samples:
        source = sources.open_sources([dataset], "validation", data_dir)[0]
        names = list(synthetic.SPEC_BY_NAME[dataset].class_names) + [NOT_ANNOTATED]
        records = []  # (index, image, label with 255 -> the last name, share of each name)
        for index in range(len(source)):
            record = source[index]
            label = sources.decode_label(record["label"]).astype(np.int64)
            label[label >= len(names) - 1] = len(names) - 1  # 255: painted, not annotated
            share = np.bincount(label.ravel(), minlength=len(names)) / label.size
            records.append((index, sources.decode_image(record["image"]), label, share))
            if sum(_shows_classes(r[3]) for r in records) >= count:
                break
        chosen = sorted(records, key=lambda r: not _shows_classes(r[3]))[:count]
        for index, image, label, share in sorted(chosen, key=lambda r: r[0]):
            stem = f"{dataset}_val{index}"
            path = os.path.join(out, f"{stem}.png")
            with safe.atomic_output(path, "wb") as f:
                Image.fromarray(image).save(f, format="PNG")
            truth = visualize.overlay(image, label, names)
            with safe.atomic_output(os.path.join(truth_dir, f"{stem}_truth.png"), "wb") as f:
                truth.save(f, format="PNG")
            entries.append({
                "file": f"{stem}.png", "dataset": dataset, "split": "validation", "index": index,
                "held_out": dataset not in synthetic.PRETRAIN_DATASETS, "classes": names[:-1],
                "shown": {n: round(float(s), 3) for n, s in zip(names, share) if s > 0},
                "truth": os.path.join(SAMPLES_TRUTH_DIR, f"{stem}_truth.png")})
            written.append(path)
    with safe.atomic_output(os.path.join(out, SAMPLES_FILE), "w") as f:
        json.dump({"data_dir": data_dir, "held_out": synthetic.HELD_OUT_DATASET,
                   "pretraining": list(synthetic.PRETRAIN_DATASETS), "images": entries}, f, indent=1)
    with safe.atomic_output(os.path.join(out, SAMPLES_README), "w") as f:
        f.write(samples_readme(workdir, entries))
    return written


def _shows_classes(share: np.ndarray) -> bool:
    """At least two classes annotated, together on at least half of the image (`share`: per
    class, the last one the not annotated pixels)."""
    return int((share[:-1] > 0).sum()) >= 2 and float(share[:-1].sum()) >= 0.5


def samples_readme(workdir: str, entries: list[dict[str, Any]]) -> str:
    """README.txt of W/samples/: what each image is and the commands that segment them."""
    held = synthetic.HELD_OUT_DATASET
    lines = [f"Validation images of the demo's synthetic datasets ({workdir}/data), to try the "
             "tools on.", f"{held} is held out of pretraining; "
             f"{', '.join(synthetic.PRETRAIN_DATASETS)} are the pretraining datasets. The ground "
             f"truth over each image: {os.path.join(workdir, SAMPLES_TRUTH_DIR)}/; the shares "
             f"below (and the classes of each dataset) are in {SAMPLES_FILE}.", ""]
    for e in entries:
        shown = ", ".join(f"{n} {s:.0%}" for n, s in sorted(e["shown"].items(), key=lambda x: -x[1]))
        lines.append(f"  {e['file']:<18} {e['dataset']}{' (held out)' if e['held_out'] else ''}: "
                     f"{shown}")
    first = next((e for e in entries if e["held_out"]), entries[0] if entries else None)
    samples = os.path.join(workdir, SAMPLES_DIR)
    if first is not None:
        lines += ["", "Zero-shot segmentation with any class names (the pretraining's language "
                  "head; here the image's own dataset's names; --short_side 0: at the size the "
                  "demo trained at):",
                  f"  python -m ms3_jax.zero_shot --workdir {workdir} --image "
                  f"{os.path.join(samples, first['file'])} --classes "
                  f"\"{','.join(first['classes'])}\" --short_side 0 --out out/zero_shot"]
    lines += ["", f"A segmentor fine-tuned on {held} (configs/finetune/synthetic.py), from this "
              "demo's backbone, on every image here:",
              "  python -m ms3_jax.main --config=configs/finetune/synthetic.py:ms3 "
              f"--config.init.path={os.path.join(workdir, 'pretrain')} --workdir=runs/ft_ms3",
              f"  python -m ms3_jax.predict --workdir runs/ft_ms3 --image {samples}/ "
              "--out out/predict", ""]
    return "\n".join(lines)


def prepare_builtin(config: ml_collections.ConfigDict) -> None:
    """What a stage's config asks to be built before it runs (the tiny configs): the synthetic
    datasets (`data.synthetic`) and stage 1's tiny random CLIP (`text.tiny_clip_dir`). Another
    user's directory for either is refused (`safe.UnsafePath`, in `synthetic.prepare_synthetic`
    and `tiny_clip.write_for_config`), before anything in it is read or built."""
    if config.data.get("synthetic"):
        synthetic.prepare_synthetic(config.data.data_dir, **config.data.synthetic)
    if config.get("text") and config.text.get("tiny_clip_dir"):
        tiny_clip.write_for_config(config)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    data_dir = os.path.join(workdir, "data")
    logging.info("[demo 1/5] synthetic datasets -> %s", data_dir)
    info = synthetic.prepare_synthetic(data_dir, **config.synthetic)
    samples = write_samples(workdir)
    logging.info("%d sample images to try the tools on -> %s", len(samples),
                 os.path.join(workdir, SAMPLES_DIR))

    stage1 = config.text_adapt.copy_and_resolve_references()
    stage1.data.data_dir = data_dir
    if stage1.text.tiny_clip_dir:
        stage1.text.tiny_clip_dir = os.path.join(workdir, "tiny_clip")
        tiny_clip.write_for_config(stage1)
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
    truth = synthetic.load_relations(info.relations_path)
    state = checkpointing.restore_state(pre_dir)[1]
    scores = score_relations(found, truth, label_space, np.asarray(state["sim"]))
    with open(os.path.join(workdir, "relations_eval.json"), "w") as f:
        json.dump(scores, f, indent=1)
    logging.info("relations (Eq. 6) between differently named classes: precision %.2f, recall "
                 "%.2f (%d pairs found, %d relations planted; as many pairs picked blindly do "
                 "as well with p = %.3g); same-name pairs (one T per name, not counted): %d of "
                 "%d; the pairs with their S in relations_eval.json",
                 scores["precision"], scores["recall"], scores["found"], scores["planted"],
                 scores["chance_p"], scores["same_name"]["found"], scores["same_name"]["possible"])
    accuracy = language_accuracy(pre_dir, data_dir, truth, state=state)
    logging.info("nearest-T pixel accuracy on the validation splits: %.3f (classes without a "
                 "renamed relation: %.3f; chance: 1 in %d names)", accuracy["pixel_accuracy"],
                 accuracy["pixel_accuracy_unrelated"], len(set(label_space.names)))

    out = os.path.join(pre_dir, "backbone.safetensors")
    logging.info("[demo 5/5] exporting the backbone -> %s", out)
    export.export_workdir(pre_dir, out)

    # A resumed demo holds only the steps after the resume in `history`: `loss_summary`.
    summary = {**loss_summary(history, pre_dir), "language_accuracy": accuracy,
               "relations": scores, "backbone": out}
    results_path = os.path.join(pre_dir, pretrain.RESULTS_FILE)
    miou = ""
    if os.path.exists(results_path):  # the last evaluation of pretraining (pretrain_eval.py)
        with open(results_path) as f:
            summary["eval"] = json.load(f)["eval"][-1]
        lang = [summary["eval"][f"{d}/language"]["mIoU"] for d in label_space.dataset_names
                if f"{d}/language" in summary["eval"]]
        miou = f", nearest-T mIoU {np.mean(lang):.1f} (mean of the datasets)" if lang else ""
        for d in config.pretrain.eval.get("held_out", ()):
            if f"{d}/language" in summary["eval"]:
                miou += f", held-out {d} {summary['eval'][f'{d}/language']['mIoU']:.1f}"
    with safe.atomic_output(os.path.join(workdir, "demo_summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    loss = {k: "n/a" if summary[k] is None else f"{summary[k]:.3f}"
            for k in ("loss_first", "loss_last")}
    logging.info("demo done: loss %s -> %s, nearest-T pixel accuracy %.3f (classes without a "
                 "renamed relation %.3f)%s, relations between differently named classes P %.2f "
                 "R %.2f (chance p %.3g); outputs in %s. For PyTorch: python -m ms3_jax.export "
                 "--workdir %s --out backbone.pth", loss["loss_first"], loss["loss_last"],
                 accuracy["pixel_accuracy"], accuracy["pixel_accuracy_unrelated"], miou,
                 scores["precision"], scores["recall"], scores["chance_p"], workdir, pre_dir)
    logging.info("try it: sample images in %s (its README.txt: the zero-shot and predict "
                 "commands); fine-tune on the held-out %s from this backbone: python -m "
                 "ms3_jax.main --config=configs/finetune/synthetic.py:ms3 --config.init.path=%s "
                 "--workdir=runs/ft_ms3 (':scratch' without --config.init.path to compare)",
                 os.path.join(workdir, SAMPLES_DIR), synthetic.HELD_OUT_DATASET, pre_dir)
    if config.get("check_accuracy", True):
        check_better_than_chance(accuracy["pixel_accuracy"], len(set(label_space.names)), workdir)
    return summary


def check_better_than_chance(pixel_accuracy: float, num_names: int, workdir: str) -> None:
    """Raises NoBetterThanChance when the accuracy is below twice chance (1 / num_names)."""
    chance = 1.0 / num_names
    if pixel_accuracy < 2 * chance:
        raise NoBetterThanChance(
            f"the pretrained model is no better than chance: nearest-T pixel accuracy "
            f"{pixel_accuracy:.3f} < 2 x chance (1 in {num_names} names = {chance:.3f}), whatever "
            f"the loss did. Outputs are in {workdir} (demo_summary.json); see docs/choices.md, "
            "\"Demo budget\"")
