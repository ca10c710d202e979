r"""The whole MS3 path on the built-in synthetic multi-dataset, on a CPU, in minutes.

  python -m ms3_jax.main --config=configs/demo.py --workdir=runs/demo
  python -m ms3_jax.main --config=configs/demo.py:rn50 --workdir=runs/demo_rn50  # Tab. 5

Steps (each output lands in the workdir): build the synthetic datasets (data/: synth_a/b/c for
pretraining, synth_d held out for transfer, see benchmarks/ablations.py); stage 1 with a
tiny RANDOM CLIP (text and vision towers) -- no CLIP weights can be downloaded here; point
`text_adapt.text.clip` at a real checkpoint for meaningful language embeddings (text_adapt/);
MS3 pretraining with Eq. 7-9 (pretrain/); the relations report scored against the planted
synonyms and subsets (relations_eval.json); the backbone exported for PyTorch
(pretrain/backbone.safetensors). The same code as configs/pretrain.py, only smaller.
"""
import importlib.util
import os

import ml_collections


def _load(name: str, arg: str | None) -> ml_collections.ConfigDict:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_ms3_configs_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    parts = set((arg or "").split(",")) - {""}
    if parts - {"quick", "rn50"}:
        raise ValueError(f"unknown config string {arg!r}; valid: 'quick', 'rn50', 'quick,rn50'")
    rn50 = ",rn50" if "rn50" in parts else ""  # Tab. 5: stage 1 on a tiny random CLIP ResNet
    c = ml_collections.ConfigDict()
    c.mode = "demo"
    # Without --workdir: runs/demo under the working directory, the path README's command 1
    # names. The user's own directory, where they look for results (never world-writable /tmp:
    # another user could plant a link or a directory there first); regenerable data and tiny
    # models go to the per-user cache instead (ms3_jax.files.safe.user_cache_dir).
    c.default_workdir = os.path.join("runs", "demo")
    # Data 2.0 with the paper's difficulties at their defaults (ms3_jax/data/synthetic.py,
    # `Difficulty`): a look per dataset, synonyms drawn per dataset, scenes, look-alikes.
    c.synthetic = dict(num_train=200, num_val=20, image_size=96, seed=0, domain_gap=1.0,
                       synonym_similarity=0.5, cooccurrence=0.8, lookalike=0.6)
    c.check_accuracy = True  # fail (exit 1) when nearest-T pixel accuracy < 2 x chance

    stage1 = _load("text_adapt", "tiny" + rn50)
    stage1.num_steps = 150  # CLIP's (tiny, random) vision tower and the context, from step 0

    stage2 = _load("pretrain", "tiny" + rn50)
    # 300 steps with the mask from step 100 (the budget before 2026-12-04) collapsed: nearest-T
    # pixel accuracy 0.35, relations precision 0.19; see docs/choices.md "Demo budget and data".
    stage2.num_steps = 1500
    stage2.log_every = 100
    stage2.checkpoint_every = 500
    stage2.batch_size = 16
    stage2.data.crop_size = 64
    stage2.relations.warmup_steps = 1000
    stage2.eval_every = 500  # nearest-T / V mIoU of each validation split (pretrain_eval.py)
    stage2.eval.update(dict(max_images=0, short_side=0, held_out=("synth_d",)))
    stage2.optim.update(dict(base_lr=1.6, warmup_steps=20))  # x 16 / 128 = 0.2

    for stage in (stage1, stage2):
        stage.data.synthetic = None  # built once, by the demo
        stage.data.data_dir = ""  # set by the demo to W/data
    c.text_adapt = stage1
    c.pretrain = stage2
    if "quick" in parts:  # for tests: a handful of steps (no accuracy to check)
        c.check_accuracy = False
        c.synthetic.update(num_train=24, num_val=4, image_size=48)
        stage1.num_steps, stage1.log_every, stage1.checkpoint_every = 4, 2, 4
        stage2.num_steps, stage2.log_every, stage2.checkpoint_every = 4, 2, 4
        stage2.batch_size, stage2.data.crop_size, stage2.relations.warmup_steps = 8, 32, 2
        stage2.eval_every, stage2.eval.max_images = 4, 2
    return c
