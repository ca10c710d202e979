"""The commands of README.md and docs/usage.md, run as written with tiny settings: stage 1,
pretraining, export, fine-tuning (three initialisations), predict and zero-shot, chained through
their workdirs.

Each command is taken from the bash blocks of README.md and docs/usage.md and changed only where
this machine needs it: `:tiny` configs (synthetic data, tiny model, a tiny random CLIP), fewer
steps, placeholders (W1, DATA, photo.jpg, resnet50.pth, ...) made real. Commands that need what
a test cannot have (official dataset archives, a TPU pod, SLURM) are listed in NOT_RUN with the
test that covers them; the two quick-start commands are what `.ci/run` runs. A command there
that is in neither list fails the test, so a new command cannot go untested.
"""
import json
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ms3_jax.testing.paths import ROOT, subprocess_env
from ms3_jax.testing.torch_reference import TorchResNet

pytestmark = pytest.mark.slow

# Commands not run here, and where they are covered instead.
NOT_RUN = {
    "python3 -m venv": ".ci/run (the quick start)",
    "ms3_jax.data.prepare": "tests/test_builders.py (tiny archives in the official layouts)",
    "launch/tpu_vm_pod.sh": "needs a TPU pod",
    "launch/slurm_gpu.sbatch": "needs SLURM",
    "launch/local_multiprocess.sh": "tests/test_multihost.py",
    "--config.data.unlabeled.source": "tests/test_unlabeled.py",
    "configs/finetune/synthetic.py": "tests/test_try_it.py (from the quick demo's workdir)",
    "runs/demo/samples": "tests/test_try_it.py (the samples the demo writes)",
}
FAST = ["--config.num_steps=4", "--config.checkpoint_every=4", "--config.log_every=2"]


# The README keeps the main commands; docs/usage.md the longer how-tos (both are tested).
DOCS = ("README.md", "docs/usage.md")


def readme_commands() -> list[str]:
    """The commands of the bash blocks of DOCS, in order, each once."""
    out = []
    for doc in DOCS:
        text = open(os.path.join(ROOT, doc)).read()
        for block in re.findall(r"```bash\n(.*?)```", text, re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split("  #")[0].strip()
                if line and not line.startswith("#") and " ".join(line.split()) not in out:
                    out.append(" ".join(line.split()))
    return out


def test_readme_commands_run(tmp_path):
    w = {k: str(tmp_path / k) for k in ("W1", "W2", "W3", "W4", "W5", "DATA", "FT")}
    out = str(tmp_path / "out")
    photo, more = tmp_path / "photo.jpg", tmp_path / "more_photos"
    more.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)).save(photo)
    Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(more / "b.png")
    torch.save(TorchResNet(base=8, stage_sizes=(1, 1, 1, 1)).state_dict(), tmp_path / "resnet50.pth")

    def tiny(cmd: str) -> list[str]:
        cmd = re.sub(r"(--config=configs/[\w/]+\.py)(:(\S+))?", lambda m: m.group(1) + ":" + ",".join(
            [a for a in (m.group(3) or "").split(",") if a and a != "tiny"] + ["tiny"]), cmd)
        for k, v in w.items():
            cmd = re.sub(rf"\b{k}\b", v, cmd)
        cmd = cmd.replace("photo.jpg", str(photo)).replace("more_photos/", str(more))
        cmd = cmd.replace("/tmp/ms3_t1", str(tmp_path / "t1")).replace(" out/", f" {out}/")
        cmd = cmd.replace("resnet50.pth", str(tmp_path / "resnet50.pth"))
        args = shlex.split(cmd, comments=True)
        assert args[:2] == ["python", "-m"], cmd
        extra = []
        if "--config=" in cmd:
            extra = FAST + [f"--config.data.data_dir={w['FT'] if 'finetune' in cmd else w['DATA']}"]
            if "text_adapt" in cmd:
                extra.append(f"--config.text.tiny_clip_dir={tmp_path / 'clip'}")
        return [sys.executable] + args[1:] + extra

    ran, skipped, cases = [], [], []
    for cmd in readme_commands():
        reason = next((r for key, r in NOT_RUN.items() if key in cmd), None)
        if reason:
            skipped.append(cmd)
            continue
        # Stage 1 from the hub's CLIP cannot run here: its :tiny config writes a tiny random CLIP.
        argv = tiny(cmd.replace(" --config.text.clip=openai/clip-vit-base-patch32", ""))
        ran.append(cmd)
        cases.append([argv[2], argv[3:], str(tmp_path)])  # `python -m <module> <args>`
    # In order, each as `python -m` would run it, from one process that imports the package once
    # and forks per command (`cli_runner`: the imports were a third of this test's time).
    with open(tmp_path / "cases.json", "w") as f:
        json.dump(cases, f)
    done = subprocess.run([sys.executable, "-m", "ms3_jax.testing.cli_runner",
                           str(tmp_path / "cases.json")], cwd=str(tmp_path), env=subprocess_env(),
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    for cmd, r in zip(ran, json.loads(done.stdout.splitlines()[-1])):
        assert r["code"] == 0, f"{cmd}\n{r['stderr'][-3000:]}"
    assert any("configs/text_adapt.py:tiny" in c for c in ran + skipped)
    modules = {c.split()[2] for c in ran}
    assert modules == {"ms3_jax.main", "ms3_jax.export", "ms3_jax.predict", "ms3_jax.zero_shot"}
    assert len(ran) >= 10, ran
    for path in (f"{w['W1']}/text_embeddings.npz", f"{w['W2']}/relations.txt",
                 str(tmp_path / "ms3_r50_backbone.pth"), f"{w['W3']}/results.json",
                 f"{w['W5']}/results.json", f"{out}/photo_labels.png", f"{out}/b_labels.json"):
        assert os.path.exists(path), path
