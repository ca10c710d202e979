"""Every training scalar of the tiny jobs of the three stages, for before / after comparisons of a
refactor that must not change behaviour (float32 values from TensorBoard: exact).

  python benchmarks/stage_losses.py run OUT.json            # ~8 min on 2 cores
  python benchmarks/stage_losses.py compare BEFORE.json AFTER.json

Jobs (each through `python -m ms3_jax.main`, with log_every=1): stage 1 with CLIP's tower (12
steps) and with the DeepLab encoder (8); MS3 pretraining from the first (20) and the CE
multi-head baseline (8); fine-tuning from the MS3 workdir and, frozen, from its exported backbone
(4 each). Run it from the checkout to measure (`PYTHONPATH` is set to it).
"""
import glob
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile

from tensorboardX.proto import event_pb2

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def scalars(workdir: str) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of the `train/` scalars in `workdir`'s event files."""
    out: dict[str, dict[int, float]] = {}
    pattern = os.path.join(workdir, "**", "events.out.tfevents*")
    for path in sorted(glob.glob(pattern, recursive=True)):
        data, i = open(path, "rb").read(), 0
        while i < len(data):  # TFRecord: length, crc, payload, crc
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 16 + n
            for v in event.summary.value:
                if v.tag.startswith("train/") and v.tag != "train/images_per_s":
                    out.setdefault(v.tag, {})[str(event.step)] = v.simple_value
    return out


def run(out_path: str) -> None:
    base = tempfile.mkdtemp(prefix="stage_losses_")
    w = lambda name: os.path.join(base, name)  # noqa: E731
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    jobs = [
        ("t1_clip", ["configs/text_adapt.py:tiny", "num_steps=12"]),
        ("t1_deeplab", ["configs/text_adapt.py:tiny", "encoder=deeplab", "num_steps=8"]),
        ("pre_ms3", ["configs/pretrain.py:tiny",
                     f"text.embeddings={w('t1_clip')}/text_embeddings.npz"]),
        ("pre_ce", ["configs/pretrain.py:tiny", "num_steps=8", "loss.kind=ce_multi_head"]),
        ("ft_ms3", ["configs/finetune/voc.py:ms3,tiny", f"init.path={w('pre_ms3')}"]),
        ("ft_frozen", ["configs/finetune/ade20k.py:torchvision,frozen,tiny",
                       f"init.path={w('resnet.pth')}"]),
    ]
    results = {}
    for name, (config, *overrides) in jobs:
        if name == "ft_frozen":
            subprocess.run([sys.executable, "-m", "ms3_jax.export", f"--workdir={w('pre_ms3')}",
                            f"--out={w('resnet.pth')}"], cwd=REPO, env=env, check=True,
                           capture_output=True)
        args = [f"--config={config}", "--config.log_every=1", f"--workdir={w(name)}"]
        args += [f"--config.{o}" for o in overrides]
        p = subprocess.run([sys.executable, "-m", "ms3_jax.main", *args], cwd=REPO, env=env,
                           capture_output=True, text=True)
        if p.returncode:
            sys.exit(f"{name} failed:\n{p.stderr[-3000:]}")
        results[name] = scalars(w(name))
        print(name, {k: len(v) for k, v in results[name].items()}, flush=True)
    with open(out_path, "w") as f:
        json.dump(results, f, indent=0, sort_keys=True)
    shutil.rmtree(base, ignore_errors=True)


def compare(before_path: str, after_path: str) -> int:
    before, after = json.load(open(before_path)), json.load(open(after_path))
    bad = 0
    for job in sorted(set(before) | set(after)):
        a, b = before.get(job, {}), after.get(job, {})
        values = [(t, s, v, b.get(t, {}).get(s)) for t in a if t != "train/images_per_s"
                  for s, v in a[t].items()]
        differ = [x for x in values if x[2] != x[3]]
        differ += [(t, "-", None, None) for t in set(b) - set(a)]
        bad += len(differ)
        print(f"{job}: {len(values)} values, {len(differ)} differ {differ[:3] if differ else ''}")
    return 1 if bad else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["run"] and len(sys.argv) == 3:
        run(sys.argv[2])
    elif sys.argv[1:2] == ["compare"] and len(sys.argv) == 4:
        sys.exit(compare(sys.argv[2], sys.argv[3]))
    else:
        sys.exit(__doc__)
