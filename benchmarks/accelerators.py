r"""The whole pretraining train step compiled ahead of time for one TPU / GPU chip, on a CPU host.

  export JAX_PLATFORMS=cpu
  python benchmarks/accelerators.py --tiny --jobs 2      # tiny model: ~10 min
  python benchmarks/accelerators.py --targets h100 --kernels auto,xla --steps ms3
  python benchmarks/accelerators.py --jobs 2 --json out.json   # all 24: ~1-2 h
  python benchmarks/accelerators.py --backbone deit --targets h100,v5e --kernels auto --steps ms3
  python benchmarks/accelerators.py --targets h100,v5e --kernels auto --no-fit --breakdown 30
  python benchmarks/accelerators.py --targets v5e --chips 2x4 --steps stage1 --no-fit  # 8 chips
  python benchmarks/accelerators.py --report out.json more.json    # the tables again, no compile
  python benchmarks/accelerators.py --hlo DIR/*.hlo --breakdown 15  # saved HLO (--save-hlo DIR)

Targets, one chip each: v4 ("v4:1x1x1", megacore), v5e ("v5e:1x1"), h100 / a100 (XLA's GPU target
descriptions, benchmarks/targets/*.txtpb). Needs the AOT wheels: the `aot` extra (part of `test`),
`jax[tpu,cuda12-local]`. Default XLA flags (XLA_FLAGS is never set).
Steps: `ms3` (both heads, bank, relations, momentum encoder, SGD), `ce` (loss.kind=ce_single_head),
in `nonfinite.guard`, jitted as `pretrain.Trainer` does (state replicated + donated, batch over
'data'); `stage1`: stage 1 with CLIP's image encoder (configs/text_adapt.py: the ViT trained
with AdamW, 13 context tokens through the frozen text tower for every distinct union name each
step, Eq. 1 at the patch grid) at ViT-B/16 (--stage1-patch 32: B/32; --tiny: the tiny stand-in),
kernels ignored (no DeepLab). `--backbone deit`: the ms3 / ce steps on configs/pretrain.py:deit
(DeiT-B/16 + neck, AdamW; Tab. 7), the step column reads e.g. 'ms3/deit'. Each variant compiles in its own subprocess: a crash is a row
("crashed: SIGABRT").

Columns (per device; GiB = 2^30 B, GB = 1e9 B):
  compile, s   'ok' / the error's first line / crashed / timeout; trace + lower + compile seconds
               on this host (with --jobs > 1 variants share the cores). Nothing runs: no step time.
  arg, temp, out, peak   memory_analysis(); peak = arg + temp + out - alias (~ arg + temp: the
               outputs alias the donated state). HBM % = peak / chip HBM (v4 32 GiB, v5e 16 GiB,
               GPUs: device_memory_size of the txtpb, 79 GiB); V100 % = peak / 16 GiB (no headroom).
  max batch    largest per-device batch with peak <= HBM, ESTIMATED by a linear fit of peak vs batch
               over two compiles (batch B and B/2; --no-fit skips the second).
  conv         optimised-HLO `convolution` ops (on TPU dots are `convolution`s too); kxk conv: those
               and cuDNN conv custom-calls with a k x k window, k > 1; cudnn: cuDNN custom-calls;
               gemm: `__cublas*` custom-calls + `dot` ops; triton: fusions of a triton kind. All
               custom-call targets are listed under the table.
  barriers     `optimization_barrier`s of the lowered program (XLA drops them before the optimised
               HLO) but the step's own (`STEP_BARRIER_SCOPES`: the EMA apart on GPUs); native:
               'yes' when `kernel_problems` finds nothing (no such barrier; at least one
               convolution per conv layer in the lowered program and among the compiled kernels).
  moved GB     HBM bytes moved per step, an estimate from the optimised HLO: over the ENTRY
               computation's kernels (all but parameter / constant / tuple / get-tuple-element /
               bitcast ...: fusions, convolutions, custom-calls, dots, copies ...) the sum of operand
               + output bytes in device memory, each read or written once; while bodies x known trip
               count (else once), calls and the largest conditional branch inlined. Buffers that
               XLA's memory-space assignment put on chip (a layout's S(1): TPU VMEM; S(2): SMEM)
               move no HBM bytes; an async copy-start / slice-start moves its bytes once per end in
               HBM (a prefetch into VMEM reads HBM once). No caches; an in-place update counts its
               whole buffer. (Before 2026-12-07 VMEM operands counted as HBM traffic: TPU figures of
               that time are several times too high; v5e MS3 at 2148fb8: 47.2 vs 11.0 GB.)
  GFLOP, acc GB   cost_analysis() flops / bytes accessed ('-': None, as on GPU).
The ratio table: moved GB and temp of kernels=auto / kernels=xla per target and step (goal <= 1.1x).
The roofline table (benchmarks/roofline.py): FLOP time = GFLOP / the chip's bf16 peak, byte time =
moved / its HBM bandwidth, the estimate = their max, images/s per chip at it, and the paper's
runs on 8 chips (pretraining 100 epochs, stage 1 10, of the 149,079-image union) in hours.
--breakdown N: per variant, the moved bytes per part of the step (from the op_name metadata: the
named scopes of pretrain.make_train_step -- momentum_encoder, optimizer, memory, losses -- and the
flax module paths; 'bwd' = under a transpose), per output dtype, and the N largest kernels.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")  # no driver: compile only
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # several processes compiling for TPU
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET_DIR = os.path.join(REPO, "benchmarks", "targets")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/roofline.py
import roofline  # noqa: E402
GiB = 2 ** 30
V100 = 16 * GiB
TPU_TOPOLOGIES = {"v4": ("v4:1x1x1", "megacore", 32 * GiB), "v5e": ("v5e:1x1", "default", 16 * GiB)}
GPU_FILES = {"h100": "h100_sxm.txtpb", "a100": "a100_sxm_80.txtpb"}
STEPS = {"ms3": "ms3", "ce": "ce_single_head", "stage1": None}
STAGE1_PROMPT_LEN = 32  # tokens per prompt: SOS + 13 context + name (<= ~8 BPE tokens) + '.' + EOS, padded


def require_aot_wheels(target: str) -> None:
    """Fail clearly when the compile-only backend of `target` is not installed."""
    mods, extra = ((["libtpu"], "jax[tpu]") if target in TPU_TOPOLOGIES else
                   (["jax_cuda12_plugin", "jax_plugins.xla_cuda12"],
                    "jax-cuda12-plugin + jax-cuda12-pjrt (jax[cuda12-local])"))
    if missing := [m for m in mods if importlib.util.find_spec(m) is None]:
        raise RuntimeError(f"compiling for {target} needs {missing}: install {extra} "
                           f"(the AOT wheels; /work/shared/accelerators/README.md)")


def target_devices(target: str, chips: str = "") -> tuple[list, int]:
    """(compile-only devices of one chip of `target`, or of a TPU slice `chips` such as '2x4' on
    one host, its HBM bytes per chip)."""
    from jax.experimental import topologies
    require_aot_wheels(target)
    if target in TPU_TOPOLOGIES:
        name, chip, hbm = TPU_TOPOLOGIES[target]
        bounds = (1, 1, 1)
        if chips:
            dims = [int(d) for d in chips.split("x")]
            name, bounds = f"{target}:{chips}", tuple(dims + [1] * (3 - len(dims)))
        return topologies.get_topology_desc(name, "tpu", chip_config_name=chip,
                                            chips_per_host_bounds=bounds).devices, hbm
    if chips:
        raise ValueError(f"--chips is for TPU slices; {target} compiles one chip")
    if target not in GPU_FILES:
        raise ValueError(f"unknown target {target!r}; valid: {[*TPU_TOPOLOGIES, *GPU_FILES]}")
    txt = open(os.path.join(TARGET_DIR, GPU_FILES[target])).read()
    hbm = int(re.search(r"device_memory_size:\s*(\d+)", txt).group(1))
    return topologies.get_topology_desc("", "cuda", target_config=txt, topology="1x1x1").devices, hbm


def make_config(tiny: bool, step: str, kernels: str, backbone: str = "resnet"):
    if REPO not in sys.path:
        sys.path.append(REPO)
    if step == "stage1":
        from configs.text_adapt import get_config as stage1_config
        return stage1_config("tiny" if tiny else None)
    from configs.pretrain import get_config
    cfg = get_config(",".join(a for a in ("deit" if backbone == "deit" else "",
                                          "tiny" if tiny else "") if a))
    cfg.loss.kind, cfg.model.kernels = STEPS[step], kernels
    return cfg


def lower_stage1(cfg, devices, batch: int, size: int, patch: int, num_classes: int | None = None,
                 shard_text: bool = True):
    """(stage 1's guarded train step with CLIP's image encoder lowered on abstract inputs, 1 conv
    layer). Towers: OpenAI ViT-B/`patch` vision + the ViT-B text tower (random shapes, no weights
    needed), or the tiny stand-in's with `cfg` tiny; |Y| and the distinct names from the config's
    datasets unless `num_classes` (then all distinct). On several devices the prompts are
    sharded over them as the stage's Trainer does (`shard_text=False`: every device encodes all)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from ms3_jax.data.label_space import LabelSpace
    from ms3_jax.demo import tiny_clip
    from ms3_jax.engine import nonfinite, sharding
    from ms3_jax.method import labels
    from ms3_jax.models import clip_text, clip_vision
    from ms3_jax.stages import text_adapt
    if cfg.text.tiny_clip_dir:
        text_cfg = clip_text.CLIPTextConfig(vocab_size=300, width=32, num_layers=2, num_heads=4,
                                            max_len=STAGE1_PROMPT_LEN, proj_dim=32, mlp_dim=128)
        over = tiny_clip.tiny_vision(size)
        vision_cfg = clip_vision.CLIPVisionConfig(
            width=over["hidden_size"], num_layers=over["num_hidden_layers"],
            num_heads=over["num_attention_heads"], mlp_dim=over["intermediate_size"],
            patch_size=over["patch_size"], image_size=size, proj_dim=32)
    else:
        text_cfg = clip_text.CLIPTextConfig()
        vision_cfg = clip_vision.CLIPVisionConfig(patch_size=patch)
    if num_classes:
        k = u = num_classes
    else:
        names = LabelSpace.from_datasets(list(cfg.data.datasets)).names
        k, u = len(names), len(labels.distinct_names(names)[0])
    cfg.batch_size = batch * len(devices)
    text = clip_text.CLIPTextTower(text_cfg, dtype=jnp.dtype(cfg.text.dtype))
    vision = clip_vision.CLIPVisionTower(vision_cfg, dtype=jnp.dtype(cfg.model.dtype))
    embed = text_adapt.clip_embed(clip_vision.PixelEncoder(vision))
    tx = text_adapt.make_optimizer(cfg, 10_000, train_text_tower=False)
    mesh = sharding.data_mesh(devices)
    rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    step = text_adapt.make_train_step(cfg, embed, text, tx, text_adapt.image_lr_schedule(cfg, 10_000),
                                      text_adapt.text_lr_schedule(cfg, cfg.text.lr, 10_000), False,
                                      data if shard_text and len(devices) > 1 else None)

    def init(rng):
        params = {"image": vision.init(rng, jnp.zeros((1, size, size, 3)))["params"],
                  "ctx": jnp.zeros((cfg.text.num_ctx, text_cfg.width))}
        return text_adapt.TextAdaptState(step=jnp.zeros((), jnp.int32), params=params,
                                         batch_stats={}, opt_state=tx.init(params), rng=rng)

    spec = lambda shape, dtype, s=rep: jax.ShapeDtypeStruct(shape, dtype, sharding=s)
    abstract = lambda tree: jax.tree_util.tree_map(lambda x: spec(x.shape, x.dtype), tree)
    state = abstract(jax.eval_shape(init, jax.random.PRNGKey(0)))
    text_params = abstract(jax.eval_shape(
        lambda: text.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"]))
    b = cfg.batch_size
    batch_specs = {"image": spec((b, size, size, 3), jnp.uint8, data),
                   "label": spec((b, size, size), jnp.int32, data)}
    consts = {"ids": spec((u, STAGE1_PROMPT_LEN), jnp.int32), "eos": spec((u,), jnp.int32),
              "gather": spec((k,), jnp.int32), "text": text_params}
    jitted = jax.jit(nonfinite.guard(step, nonfinite.mode_of(cfg)),
                     in_shardings=(rep, data, rep), out_shardings=(rep, rep), donate_argnums=0)
    return jitted.trace(state, batch_specs, consts).lower(), 1


def lower_step(cfg, devices, batch: int, size: int, num_classes: int | None = None):
    """(`jax.jit(guarded train step).trace(...).lower()` on abstract inputs placed on `devices`,
    the model's number of conv layers). |Y|: `num_classes`, else the config's datasets' (342)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from ms3_jax.data.label_space import LabelSpace
    from ms3_jax.engine import nonfinite, optim, sharding
    from ms3_jax.method.train_state import init_train_state
    from ms3_jax.stages import pretrain
    k = num_classes or LabelSpace.from_datasets(list(cfg.data.datasets)).num_classes
    c = cfg.model.emb_dim
    cfg.batch_size = batch * len(devices)
    model = pretrain.build_model(cfg, k, sharding.platform_of(devices))
    tx = optim.make_optimizer(cfg, 10_000)
    step = pretrain.make_train_step(cfg, model, tx, optim.lr_schedule(cfg, 10_000), len(devices),
                                    sharding.platform_of(devices))

    def init(rng):
        variables = model.init(rng, jnp.zeros((1, size, size, 3), jnp.uint8))
        return init_train_state(variables, tx, k, c, cfg.bank.slots, jnp.dtype(cfg.bank.dtype), rng)

    mesh = sharding.data_mesh(devices)
    rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    spec = lambda shape, dtype, s=rep: jax.ShapeDtypeStruct(shape, dtype, sharding=s)
    state = jax.tree_util.tree_map(lambda x: spec(x.shape, x.dtype),
                                   jax.eval_shape(init, jax.random.PRNGKey(0)))
    b = cfg.batch_size
    batch_specs = {"image": spec((b, size, size, 3), jnp.uint8, data),
                   "label": spec((b, size, size), jnp.int32, data), "dataset_id": spec((b,), jnp.int32, data)}
    consts = {"text": spec((k, c), jnp.float32), "other_dataset": spec((k, k), jnp.bool_),
              "dataset_of_class": spec((k,), jnp.int32)}
    jitted = jax.jit(nonfinite.guard(step, nonfinite.mode_of(cfg)),
                     in_shardings=(rep, data, rep), out_shardings=(rep, rep), donate_argnums=0)
    layers = sum(len(x.shape) == 4 for x in jax.tree_util.tree_leaves(state.params))
    return jitted.trace(state, batch_specs, consts).lower(), layers


# ------------------------------------------------------------------ optimised-HLO statistics
DTYPE_BYTES = {"pred": 1, "s4": .5, "u4": .5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
               "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8}
ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|f8\w*|c64|c128)\[([\d,]*)\]")  # f8*: 1 byte (default)
HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
INSTR = re.compile(r"^\s+(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "opt-barrier",
        "after-all", "add-dependency", "partition-id", "replica-id", "domain"}


LAID_OUT = re.compile(ARRAY.pattern + r"(\{[^}]*\})?")
OFF_HBM = re.compile(r"S\(([1-9]\d*)\)")  # a layout's memory space: S(1) TPU VMEM, S(2) SMEM


def shape_bytes(shape: str, hbm_only: bool = True) -> float:
    """Bytes of the arrays of an HLO type; `hbm_only`: of those in device memory (memory space 0:
    on TPU an on-chip VMEM / SMEM buffer, `S(1)` / `S(2)`, moves no HBM bytes)."""
    return sum(DTYPE_BYTES.get(t, 16 if t == "c128" else 1) * math.prod(map(int, filter(None, d.split(","))))
               for t, d, layout in LAID_OUT.findall(shape) if not (hbm_only and OFF_HBM.search(layout)))


def async_copy_bytes(ins) -> float:
    """HBM bytes of a `copy-start` (output (dest, src, context)) or `slice-start` (output
    ((sources), dest slices.., context)): the bytes copied, once per end that is in HBM (a TPU
    prefetch into VMEM reads HBM once; an eviction writes it once)."""
    if ins.op == "copy-start":
        return shape_bytes(ins.shape)
    sources, dests = split_balanced(ins.shape.strip())
    dests = ", ".join(a[0] for a in LAID_OUT.finditer(dests) if "S(2)" not in (a[3] or ""))
    return shape_bytes(dests, hbm_only=False) if shape_bytes(sources) else 0.0


def split_balanced(s: str) -> tuple[str, str]:
    """'(a(b)) rest' -> ('a(b)', ' rest')."""
    depth = 0
    for i, ch in enumerate(s):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            return s[1:i], s[i + 1:]
    return s[1:], ""


class Instr(NamedTuple):
    name: str
    op: str
    shape: str  # the output's type, e.g. 'bf16[16,28,28,2048]{3,2,1,0}' or a tuple
    out: float  # output bytes
    operands: list
    attrs: str


def parse_hlo(text: str) -> tuple[dict, str]:
    """{computation: [Instr]}, the entry's name; also {instruction: output bytes} under the key
    None."""
    comps, entry, cur, size = {}, "", None, {}
    for line in text.splitlines():
        if not line.startswith((" ", "HloModule")) and (m := HEADER.match(line)):
            cur = comps.setdefault(m.group(2), [])
            entry = m.group(2) if m.group(1) else entry
        elif cur is not None and (m := INSTR.match(line)):
            rest = m.group(2)
            shape, rest = split_balanced(rest) if rest.startswith("(") else rest.split(" ", 1)
            op = re.match(r"\s*([\w\-]+)", rest).group(1)
            args, attrs = split_balanced(rest[rest.index("("):])
            size[m.group(1)] = shape_bytes(shape)
            cur.append(Instr(m.group(1), op, shape, size[m.group(1)],
                             re.findall(r"%([\w.\-]+)", args), attrs))
    comps[None] = size
    return comps, entry


def kernels(comps: dict, comp: str, unknown: list, times: int = 1):
    """(Instr, runs per step, bytes per run) of every kernel one run of `comp` launches (module
    doc: operand + output bytes); while bodies x known trip count (unknown: once, appended to
    `unknown`), calls and the largest conditional branch inlined."""
    for ins in comps.get(comp, []):
        called = lambda key: re.findall(rf"{key}=%?([\w.\-]+)", ins.attrs)
        if ins.op in FREE or ins.op.endswith("-done"):
            continue
        if ins.op == "while":
            trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', ins.attrs)
            unknown += [] if trip else [ins.op]
            for c in called("body") + called("condition"):
                yield from kernels(comps, c, unknown, times * int(trip.group(1) if trip else 1))
        elif ins.op in ("call", "conditional"):
            m = re.search(r"branch_computations=\{([^}]*)\}", ins.attrs)
            names = re.findall(r"%?([\w.\-]+)", m.group(1)) if m else (
                called("to_apply") + called("true_computation") + called("false_computation"))
            if names:
                biggest = max(names, key=lambda c: bytes_moved(comps, c, []))
                yield from kernels(comps, biggest, unknown, times)
        else:
            ins_bytes = sum(comps[None].get(o, 0) for o in ins.operands)
            yield ins, times, (async_copy_bytes(ins) if ins.op in ("copy-start", "slice-start") else
                               2 * ins_bytes if ins.op.endswith("-start") else ins_bytes + ins.out)


def bytes_moved(comps: dict, comp: str, unknown: list) -> float:
    """Estimated HBM bytes of one run of `comp` (module doc); appends while loops of unknown trip
    count to `unknown`."""
    return sum(times * b for _, times, b in kernels(comps, comp, unknown))


def hlo_stats(text: str) -> dict:
    comps, entry = parse_hlo(text)
    unknown: list = []
    moved = bytes_moved(comps, entry, unknown)
    calls = Counter(re.findall(r'custom_call_target="([^"]+)"', text))
    convs = [l for l in text.splitlines() if " convolution(" in l or "__cudnn$conv" in l]
    windows = [re.search(r"window=\{size=(\d+)x(\d+)", l) for l in convs]
    return {"conv": sum(" convolution(" in l for l in convs),
            "kxk_conv": sum(bool(w) and max(map(int, w.groups())) > 1 for w in windows),
            "cudnn_conv": sum(n for t, n in calls.items() if t.startswith("__cudnn$conv")),
            "cudnn": sum(n for t, n in calls.items() if "cudnn" in t),
            "gemm": sum(n for t, n in calls.items() if "cublas" in t) + text.count(" dot("),
            "triton": len(re.findall(r'"kind":"[^"]*triton[^"]*"', text)),
            "custom_calls": dict(calls), "moved": moved, "while_unknown_trips": len(unknown)}


# ------------------------------------------------------------------ where the bytes go
# Parts of the step named in its op_name metadata (the named scopes of pretrain.make_train_step,
# flax module paths; 'transpose(' marks the backward pass); the first match wins.
SCOPES = (("momentum_encoder", "momentum encoder"), ("optimizer", "optimizer + EMA"),
          ("memory", "bank + relations (Eq. 4-6)"), ("losses", "losses"))
MODULE_PARTS = {"backbone": "backbone", "decode_head": "decoder", "neck": "neck",
                "proj_language": "heads", "proj_visual": "heads", "aux_head": "heads",
                "CLIPTextTower": "text tower", "CLIPVisionTower": "image tower"}
MAIN_OPS = ("convolution", "dot", "custom-call", "scatter", "gather", "reduce-window", "reduce",
            "select-and-scatter", "transpose", "dynamic-update-slice", "dynamic-slice", "copy",
            "concatenate", "pad")


def part_of(op_name: str) -> str:
    """The part of the step an op belongs to, from its op_name (module doc of --breakdown)."""
    if not op_name:
        return "unnamed (copies, prefetches)"
    if op_name.startswith("state."):
        return "state (copies)"
    side = " bwd" if "transpose(" in op_name else " fwd"
    path = [p.split("(")[-1].rstrip(")") for p in op_name.split("/")]
    for key, part in SCOPES:
        if key in path:
            return part + (side if key == "losses" else "")
    for i, p in enumerate(path):
        if p in MODULE_PARTS:
            return MODULE_PARTS[p] + side
        if p and p[0].isupper() and i + 1 < len(path) and path[i + 1] in MODULE_PARTS:
            return MODULE_PARTS[path[i + 1]] + side
    return "other"


def op_kind(ins: Instr, comps: dict) -> str:
    """'convolution', 'fusion:kLoop(reduce)', '__cudnn$convForward', ..."""
    if ins.op == "custom-call":
        return re.search(r'custom_call_target="([^"]+)"', ins.attrs).group(1)
    if ins.op != "fusion":
        return ins.op
    kind = re.search(r"kind=(\w+)", ins.attrs)
    inner = {i.op for c in re.findall(r"calls=%?([\w.\-]+)", ins.attrs) for i in comps.get(c, [])}
    main = next((o for o in MAIN_OPS if o in inner), "elementwise")
    return f"fusion:{kind.group(1) if kind else '?'}({main})"


def breakdown(text: str) -> dict:
    """The kernels of the optimised HLO with their bytes (x runs), op kind, output type and part:
    {'kernels': [dict] largest first, 'parts': {part: bytes}, 'dtypes': {output dtype: bytes},
    'total': bytes}."""
    comps, entry = parse_hlo(text)
    rows = []
    for ins, times, b in kernels(comps, entry, []):
        name = re.search(r'op_name="([^"]*)"', ins.attrs)
        name = name.group(1) if name else ""
        dtype = ARRAY.search(ins.shape)
        rows.append({"bytes": times * b, "kind": op_kind(ins, comps), "part": part_of(name),
                     "shape": re.sub(r"\{[^{}]*\}", lambda m: "@vmem" if "S(1)" in m[0] else "",
                                     ins.shape)[:80], "runs": times,
                     "dtype": dtype.group(1) if dtype else "-", "op_name": name})
    rows.sort(key=lambda r: -r["bytes"])
    parts, dtypes = Counter(), Counter()
    for r in rows:
        parts[r["part"]] += r["bytes"]
        dtypes[r["dtype"]] += r["bytes"]
    return {"kernels": rows, "parts": dict(parts.most_common()), "dtypes": dict(dtypes.most_common()),
            "total": sum(parts.values())}


def breakdown_report(r: dict, top: int) -> str:
    """Markdown: bytes per part, per output dtype, and the `top` largest kernels."""
    bd, total = r["breakdown"], r["breakdown"]["total"]
    head = f"{r['target']} / {step_name(r)}" if r["step"] else r["target"]
    count = f" in {bd['count']} kernels" if "count" in bd else ""
    lines = [f"**{head}**: {total / 1e9:.1f} GB moved{count}", "",
             "| part | GB | % |", "|---|---|---|"]
    lines += [f"| {p} | {b / 1e9:.2f} | {100 * b / total:.1f} |" for p, b in bd["parts"].items()]
    lines += ["", "by the kernel's (first) output dtype: " + ", ".join(
        f"{d} {b / 1e9:.1f} GB ({100 * b / total:.0f} %)" for d, b in bd["dtypes"].items()), "",
        "| # | GB | runs | kind | output | part | op |", "|---|---|---|---|---|---|---|"]
    for i, k in enumerate(bd["kernels"][:top], 1):
        op = "/".join(k["op_name"].split("/")[-3:]).replace("|", "/")
        lines.append(f"| {i} | {k['bytes'] / 1e9:.3f} | {k['runs']} | {k['kind'].replace('|', '/')} "
                     f"| {k['shape']} | {k['part']} | {op} |")
    return "\n".join(lines)


# Named scopes of the step's own optimisation barriers (docs/choices.md, "The EMA apart on GPUs").
STEP_BARRIER_SCOPES = ("ema_apart",)


def stray_barriers(lowered_text: str) -> int:
    """Optimisation barriers of the lowered program (`as_text(debug_info=True)`) outside
    `STEP_BARRIER_SCOPES`: the CPU kernels' (without debug info every barrier counts)."""
    locs = dict(re.findall(r"^(#loc\d+) = (.*)$", lowered_text, re.M))
    return sum(not any(f"/{scope}/" in locs.get(m.group(1) or "", "") for scope in STEP_BARRIER_SCOPES)
               for m in re.finditer(r"stablehlo\.optimization_barrier[^\n]*?(?:loc\((#loc\d+)\))?$",
                                    lowered_text, re.M))


def kernel_problems(lowered_text: str, conv_layers: int, stats: dict | None = None) -> list[str]:
    """Why a GPU / TPU step does not run on native kernels (empty: it does). The CPU kernels put
    optimisation barriers in the program (`stray_barriers`: pass `as_text(debug_info=True)`) and
    turn 1x1 / depthwise / wide convolutions into products and shifted sums: fewer convolutions
    than conv layers in the lowered program and, given `stats` of the optimised HLO, fewer native
    convolution kernels (cuDNN convs on GPU; k x k `convolution`s on TPU, where dots are 1x1
    `convolution`s and a 1x1 layer's weight gradient has an H x W window)."""
    problems = []
    if n := stray_barriers(lowered_text):
        problems.append(f"{n} optimization_barrier(s) in the lowered program")
    if (n := lowered_text.count("stablehlo.convolution")) < conv_layers:
        problems.append(f"{n} convolutions in the lowered program for {conv_layers} conv layers")
    if stats is not None and (n := stats["cudnn_conv"] or stats["kxk_conv"]) < conv_layers:
        problems.append(f"{n} native convolution kernels for {conv_layers} conv layers")
    return problems


# ------------------------------------------------------------------ one variant (in a subprocess)
def hlo_flops(lowered) -> float | None:
    """FLOPs of the unoptimised program (XLA's cost analysis on the host's CPU client): the GPU
    compile reports none; within ~5 % of the TPU compile's count on the tiny step."""
    import jax
    from jax._src.lib import xla_client
    try:
        return xla_client._xla.hlo_module_cost_analysis(
            jax.devices("cpu")[0].client, lowered.compiler_ir("hlo").get_hlo_module()).get("flops")
    except Exception:  # noqa: BLE001 -- a private API: a missing number, not a failed run
        return None


def measure(v: dict) -> dict:
    devices, hbm = target_devices(v["target"], v.get("chips", ""))
    out, peaks = {**v, "hbm": hbm}, {}
    for b in [v["batch"], v["batch"] // 2][:2 if v["fit"] and v["batch"] > 1 else 1]:
        t = time.perf_counter()
        cfg = make_config(v["tiny"], v["step"], v["kernels"], v.get("backbone", "resnet"))
        lowered, layers = (lower_stage1(cfg, devices, b, v["size"], v["patch"], v["classes"],
                                        v.get("shard_text", True))
                           if v["step"] == "stage1" else
                           lower_step(cfg, devices, b, v["size"], v["classes"]))
        compiled = lowered.compile()
        m = compiled.memory_analysis()
        peaks[b] = (m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes
                    - m.alias_size_in_bytes)
        if b == v["batch"]:
            cost = compiled.cost_analysis()
            cost = (cost[0] if isinstance(cost, list) else cost) or {}
            out.update(seconds=time.perf_counter() - t, arg=m.argument_size_in_bytes,
                       temp=m.temp_size_in_bytes, out=m.output_size_in_bytes, peak=peaks[b],
                       barriers=stray_barriers(lowered.as_text(debug_info=True)), conv_layers=layers,
                       flops=cost.get("flops"), bytes_accessed=cost.get("bytes accessed"),
                       **hlo_stats(compiled.as_text()))
            out["problems"] = kernel_problems(lowered.as_text(debug_info=True), layers, out)
            flops = hlo_flops(lowered)  # the whole program: / devices is per chip when all is sharded
            out["flops_hlo"] = flops / len(devices) if flops else None
            out["devices"] = len(devices)
            if v.get("breakdown"):
                bd = breakdown(compiled.as_text())
                out["breakdown"] = {**bd, "kernels": bd["kernels"][:v["breakdown"]],
                                    "count": len(bd["kernels"])}
            if v.get("save_hlo"):
                os.makedirs(v["save_hlo"], exist_ok=True)
                with open(os.path.join(v["save_hlo"], variant_name(v) + ".hlo"), "w") as f:
                    f.write(compiled.as_text())
    if len(peaks) == 2:
        (b1, p1), (b2, p2) = sorted(peaks.items())
        slope = (p2 - p1) / (b2 - b1)
        out["max_batch"] = int((hbm - p1) // slope + b1) if slope > 0 else None
    return {**out, "status": "ok"}


def variant_name(v: dict) -> str:
    return "_".join(str(x) for x in (v["target"], v.get("chips") or "1", v["kernels"], v["step"],
                                     v.get("backbone", "resnet"), v["batch"], v["size"])) + (
        "" if v.get("shard_text", True) else "_unsharded")


def run_variant(v: dict, timeout: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(v)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**v, "status": f"timeout after {timeout:.0f} s"}
    if lines := [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]:
        return json.loads(lines[-1][7:])
    status = f"crashed: {signal.Signals(-p.returncode).name}" if p.returncode < 0 else f"exit {p.returncode}"
    return {**v, "status": status, "stderr": p.stderr[-3000:]}


def child(v: dict) -> None:
    try:
        r = measure(v)
    except Exception as e:  # noqa: BLE001 -- a row of the table, not the end of the run
        first = next((l for l in str(e).splitlines() if l.strip()), "")
        r = {**v, "status": f"{type(e).__name__}: {first[:200]}"}
    print("RESULT " + json.dumps(r), flush=True)


# ------------------------------------------------------------------ report
COLUMNS = ("target | kernels | step | compile | s | arg GiB | temp GiB | out GiB | peak GiB | HBM % "
           "| V100 % | max batch (fit) | conv | kxk conv | cudnn | gemm | triton | barriers | native "
           "| moved GB | GFLOP | acc GB")


def step_name(r: dict) -> str:
    """'ms3', 'ms3/deit', 'stage1 (2x4)', 'stage1 (2x4, text unsharded)'."""
    return r["step"] + ("/deit" if r.get("backbone") == "deit" else "") + (
        f" ({r['chips']}{', text unsharded' if not r.get('shard_text', True) else ''})"
        if r.get("chips") else "")


def row(r: dict) -> str:
    cells = [r["target"], r["kernels"], step_name(r), r["status"].replace("|", "/")]
    if r["status"] == "ok":
        f = lambda k, scale=GiB, nd=2: "-" if r.get(k) is None else f"{r[k] / scale:.{nd}f}"
        cells += [f("seconds", 1, 0), f("arg"), f("temp"), f("out"), f("peak"),
                  f"{100 * r['peak'] / r['hbm']:.0f}", f"{100 * r['peak'] / V100:.0f}",
                  str(r.get("max_batch") or "-"),
                  *[str(r[k]) for k in ("conv", "kxk_conv", "cudnn", "gemm", "triton", "barriers")],
                  "no" if r["problems"] else "yes", f("moved", 1e9, 1), f("flops", 1e9, 0),
                  f("bytes_accessed", 1e9, 1)]
    return "| " + " | ".join(cells) + " |"


def report(results: list[dict]) -> str:
    lines = ["| " + COLUMNS + " |", "|" + "---|" * (COLUMNS.count("|") + 1), *map(row, results), ""]
    for r in results:
        name = f"- {r['target']} / {r['kernels']} / {r['step']}: "
        if r["status"] == "ok":
            calls = ", ".join(f"{t} {n}" for t, n in sorted(r["custom_calls"].items())) or "none"
            lines.append(name + f"custom-calls: {calls}" + (
                f"; {r['while_unknown_trips']} while loop(s) of unknown trip count counted once"
                if r["while_unknown_trips"] else "") + (
                f"; NOT native: {'; '.join(r['problems'])}" if r["problems"] else ""))
        elif "stderr" in r:
            tail = [l[:200] for l in r["stderr"].splitlines() if l.strip()][-3:]
            lines.append(name + f"{r['status']}; stderr: " + " / ".join(tail))
    ok = {(r["target"], r["step"], r["kernels"]): r for r in results if r["status"] == "ok"}
    lines += ["", "| target | step | moved auto/xla | temp auto/xla | <= 1.1x |", "|---|---|---|---|---|"]
    for (t, s, k), a in ok.items():
        if k == "auto" and (x := ok.get((t, s, "xla"))):
            rm, rt = a["moved"] / x["moved"], a["temp"] / max(x["temp"], 1)
            lines.append(f"| {t} | {s} | {rm:.2f} | {rt:.2f} | {'yes' if max(rm, rt) <= 1.1 else 'NO'} |")
    return "\n".join(lines + ["", roofline_report(results)])


def roofline_report(results: list[dict]) -> str:
    """Per target and step: FLOP time, byte time, their max (the estimate), images/s per chip and
    the paper's runs on 8 chips (pretraining 100 epochs, stage 1 10 epochs of the union)."""
    ok = [r for r in results if r["status"] == "ok" and r["target"] in roofline.CHIPS]
    lines = ["| target | step | GFLOP | moved GB | FLOP ms | byte ms | estimate ms | / floor "
             "| images/s/chip | run h (8 chips) | chip-h |", "|" + "---|" * 11]
    for r in ok:
        flops = r.get("flops") or r.get("flops_hlo")
        if not flops:
            continue
        est = roofline.estimate(flops, r["moved"], r["target"], r["batch"])
        epochs = roofline.STAGE1_EPOCHS if r["step"] == "stage1" else roofline.PAPER_EPOCHS
        hours = est.run_hours(epochs)
        step = step_name(r)
        src = "" if r.get("flops") else " (hlo)"
        lines.append(f"| {r['target']} | {step} | {flops / 1e9:.0f}{src} | {r['moved'] / 1e9:.1f} "
                     f"| {1e3 * est.flop_s:.1f} | {1e3 * est.byte_s:.1f} | {1e3 * est.step_s:.1f} "
                     f"| {est.over_floor:.2f} | {est.images_per_s:.0f} | {hours:.2f} "
                     f"| {hours * roofline.PAPER_CHIPS:.1f} |")
    chips = sorted({r["target"] for r in ok})
    return "\n".join(lines + ["", roofline.peaks_line(chips) + "; GFLOP per chip: the TPU "
                               "compile's cost analysis, '(hlo)': the unoptimised program's (GPU "
                               "compiles report none); epochs: pretraining "
                               f"{roofline.PAPER_EPOCHS}, stage 1 {roofline.STAGE1_EPOCHS} of "
                               f"{roofline.PAPER_IMAGES_PER_EPOCH:,} images"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--targets", default="v4,v5e,h100,a100")
    ap.add_argument("--kernels", default="auto,xla,cpu")
    ap.add_argument("--steps", default="ms3,ce", help="ms3, ce, stage1")
    ap.add_argument("--stage1-patch", type=int, default=16, help="stage1: ViT-B/16 or /32")
    ap.add_argument("--batch", type=int, help="per device (default 16; --tiny 4)")
    ap.add_argument("--size", type=int, help="crop (default 224; --tiny 64)")
    ap.add_argument("--classes", type=int, help="|Y| (default: the config's datasets: 342; tiny 9)")
    ap.add_argument("--tiny", action="store_true", help="configs/pretrain.py:tiny model")
    ap.add_argument("--backbone", default="resnet", choices=["resnet", "deit"],
                    help="ms3 / ce steps: configs/pretrain.py's ResNet-50 or :deit (DeiT-B/16)")
    ap.add_argument("--no-fit", action="store_true", help="skip the batch/2 compile (no max batch)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per variant")
    ap.add_argument("--jobs", type=int, default=1, help="variants compiled at once")
    ap.add_argument("--json", help="write the results here (rewritten as each variant ends)")
    ap.add_argument("--breakdown", type=int, default=0, metavar="N",
                    help="list the N largest byte movers and the bytes per part of the step")
    ap.add_argument("--save-hlo", metavar="DIR", help="write each variant's optimised HLO here")
    ap.add_argument("--chips", default="", help="TPU slice on one host, e.g. 2x4 (default: one chip)")
    ap.add_argument("--unsharded-text", action="store_true",
                    help="stage1 on --chips: every chip encodes all prompts (the form before sharding)")
    ap.add_argument("--report", nargs="+", metavar="JSON", help="print the tables of saved --json "
                    "results (several files: one table) and exit")
    ap.add_argument("--hlo", nargs="+", metavar="FILE", help="print the --breakdown of saved "
                    "optimised HLO text (--save-hlo, or XLA's dumps) and exit")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.hlo:
        for path in a.hlo:
            bd = breakdown(open(path).read())
            name = os.path.basename(path).rsplit(".", 1)[0]
            print(breakdown_report({"target": name, "step": "", "breakdown": {
                **bd, "kernels": bd["kernels"][:a.breakdown or 20], "count": len(bd["kernels"])}},
                a.breakdown or 20) + "\n")
        return
    if a.child:
        return child(json.loads(a.child))
    if a.report:
        results = [r for path in a.report for r in json.load(open(path))]
        print(report(results))
        for r in results:
            if isinstance(r.get("breakdown"), dict):  # measured (the variant's own key is N)
                print("\n" + breakdown_report(r, a.breakdown or len(r["breakdown"]["kernels"])))
        return
    batch, size = a.batch or (4 if a.tiny else 16), a.size or (64 if a.tiny else 224)
    variants = [dict(target=t, kernels=k, step=s, batch=batch, size=size, classes=a.classes,
                     tiny=a.tiny, fit=not a.no_fit, patch=a.stage1_patch, backbone=a.backbone,
                     breakdown=a.breakdown, save_hlo=a.save_hlo and os.path.abspath(a.save_hlo),
                     chips=a.chips, shard_text=not a.unsharded_text)
                for t in a.targets.split(",") for s in a.steps.split(",")
                for k in (a.kernels.split(",") if s != "stage1" else ["-"])]
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} {'tiny' if a.tiny else 'paper'} model, batch {batch} "
          f"@{size} per device, {len(variants)} variants, --jobs {a.jobs}; max batch: "
          + ("off" if a.no_fit else f"linear fit of peak over batch {batch} and {batch // 2}"), flush=True)
    done: list[dict] = []

    def one(v: dict) -> dict:
        r = run_variant(v, a.timeout)
        done.append(r)
        print(row(r), flush=True)  # progress; the full report follows at the end
        if a.json:
            with open(a.json, "w") as f:
                json.dump(done, f, indent=1)
        return r

    with ThreadPoolExecutor(a.jobs) as pool:
        results = list(pool.map(one, variants))
    print("\n" + report(results))
    for r in results:
        if isinstance(r.get("breakdown"), dict):  # measured (the variant's own key is N)
            print("\n" + breakdown_report(r, a.breakdown))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
