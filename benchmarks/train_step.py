r"""Train-step speed, side by side: the MS3 step, the plain DeepLab-v3+ CE step and PyTorch.

  python benchmarks/train_step.py                                   # batch 8 at 224, 3 reps
  python benchmarks/train_step.py --batch 2 --size 64 --reps 2      # quick check (~2 min)
  python benchmarks/train_step.py --variants ms3,ce,ce:f32,ce@onednn,torch,torch:bf16
  python benchmarks/train_step.py --variants ce:f32 --batch 4 --profile /tmp/prof   # top XLA ops

Every variant runs in its own worker process (XLA_FLAGS is read once, at backend start-up), set
up one after the other; then the coordinator asks the workers for one step each, in turn, `reps`
times (interleaved, so every ratio comes from the same minutes of a shared, noisy machine) and
reports medians. The float32 matmul peak is measured the same way (jnp and torch, alternating).

Variant syntax `kind[:dtype][@flags][#NAME]`:
  kind   ms3 (MS3 pretraining step, `loss.kind='ms3'`), ce (`loss.kind='ce_single_head'`: the same
         encoder with a conv_seg head, no momentum encoder), torch (benchmarks/torch_deeplab.py,
         channels_last, the same architecture and the same CE step)
  dtype  bf16 | f32: compute dtype (default: the config's bfloat16 for JAX, float32 for torch;
         torch:bf16 is `torch.autocast` bfloat16)
  flags  names joined by '+' from FLAG_SETS (XLA CPU options) or ENV_SETS (any variant;
         `@xla`: `model.kernels='xla'`, XLA's native convolutions instead of the CPU plug-in;
         `@reuse`: MS3_HOST_MALLOC=reuse, glibc keeps freed pages)
  #NAME  the code in --baseline's NAME=DIR instead of this checkout (before/after in one run)
FLOPs: XLA's cost analysis of the compiled step (JAX); the torch step is credited with the FLOPs
of the JAX CE step (same architecture; torch's own FlopCounterMode count is printed as a check).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# XLA CPU option sets tried (jaxlib 0.10.2; names checked against the flags compiled into it).
FLAG_SETS = {
    "default": "",
    "onednn": "--xla_cpu_use_onednn=true",
    "onednnf": "--xla_cpu_experimental_onednn_fusion_type=dot,eltwise",
    "ynn": "--xla_cpu_experimental_ynn_fusion_type=individual_convolution,individual_dot",
    "ynnconv": "--xla_cpu_experimental_ynn_fusion_type=individual_convolution",
    "xnn": "--xla_cpu_experimental_xnn_fusion_type=dot,eltwise",
    "xnndot": "--xla_cpu_experimental_xnn_fusion_type=dot",
    "xnngraph": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "fastmath": "--xla_cpu_enable_fast_math=true",
}
# Process environments tried. Every worker (torch too) applies MS3_HOST_MALLOC as
# `python -m ms3_jax.main` does (`engine.host_memory.configure_from_env`): "reuse" makes glibc
# keep freed pages instead of faulting in and zeroing fresh ones every step.
ENV_SETS = {
    "reuse": {"MS3_HOST_MALLOC": "reuse"},
    "xla": {"MS3_BENCH_KERNELS": "xla"},  # read by JaxWorker: config.model.kernels
}
PEAK_N = 4096  # float32 matmul size for the peak measurement


# ------------------------------------------------------------------------------------------------
# Workers (one process per variant).
# ------------------------------------------------------------------------------------------------
def parse_variant(v: str) -> tuple[str, str | None, str]:
    """'ce:f32@onednn' -> ('ce', 'f32', 'onednn'); a '#NAME' suffix is stripped (see --baseline)."""
    rest, _, flags = v.split("#")[0].partition("@")
    kind, _, dtype = rest.partition(":")
    if kind not in ("ms3", "ce", "torch"):
        raise ValueError(f"unknown kind in variant {v!r}")
    if dtype not in ("", "bf16", "f32"):
        raise ValueError(f"unknown dtype in variant {v!r}")
    for name in flags.split("+") if flags else ():
        if name not in FLAG_SETS and name not in ENV_SETS:
            raise ValueError(f"unknown flag set {name!r}; known: {sorted(FLAG_SETS) + sorted(ENV_SETS)}")
    return kind, dtype or None, flags or "default"


def flag_env(flags: str, extra_xla_flags: str) -> tuple[str, dict[str, str]]:
    """XLA_FLAGS and the environment of a '+'-joined flag-set list."""
    names = flags.split("+")
    xla = " ".join(x for x in [FLAG_SETS.get(n, "") for n in names] + [extra_xla_flags] if x)
    env = {k: v for n in names for k, v in ENV_SETS.get(n, {}).items()}
    return xla, env


def synthetic_batch(batch: int, size: int, offsets: list[int], seed: int = 0) -> dict[str, Any]:
    """uint8 images and union labels shaped like the real data: each image from one dataset, a
    few of its classes in blocks, 10 % ignore (-1)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n_ds = len(offsets) - 1
    ds = rng.integers(0, n_ds, batch).astype(np.int32)
    labels = np.empty((batch, size, size), np.int32)
    g = max(size // 8, 1)
    for b in range(batch):
        lo, hi = offsets[ds[b]], offsets[ds[b] + 1]
        classes = rng.choice(np.arange(lo, hi), size=min(6, hi - lo), replace=False)
        coarse = rng.choice(np.append(classes, -1), size=(-(-size // g),) * 2,
                            p=[0.9 / len(classes)] * len(classes) + [0.1])
        labels[b] = np.kron(coarse, np.ones((g, g), np.int32))[:size, :size]
    images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    return {"image": images, "label": labels, "dataset_id": ds}


def jax_peak(reps: int = 3) -> float:
    """Median GFLOP/s of a PEAK_N^2 float32 matmul in jnp."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (PEAK_N, PEAK_N), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f(a).block_until_ready()
        ts.append(time.perf_counter() - t)
    return 2 * PEAK_N ** 3 / statistics.median(ts) / 1e9


def torch_peak(reps: int = 3) -> float:
    """Median GFLOP/s of a PEAK_N^2 float32 matmul in torch."""
    import torch

    a = torch.randn(PEAK_N, PEAK_N)
    a @ a
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ a
        ts.append(time.perf_counter() - t)
    return 2 * PEAK_N ** 3 / statistics.median(ts) / 1e9


class JaxWorker:
    """The real `pretrain.Trainer` step (jitted, state donated) on one CPU device."""

    def __init__(self, kind: str, dtype: str | None, batch: int, size: int):
        import jax
        import numpy as np

        from configs.pretrain import get_config
        from ms3_jax.data.label_space import LabelSpace
        from ms3_jax.stages import pretrain

        cfg = get_config()
        cfg.batch_size = batch
        cfg.loss.kind = "ms3" if kind == "ms3" else "ce_single_head"
        if dtype:
            cfg.model.dtype = {"bf16": "bfloat16", "f32": "float32"}[dtype]
        if "kernels" in cfg.model:  # absent in checkouts before the switch (--baseline)
            cfg.model.kernels = os.environ.get("MS3_BENCH_KERNELS", cfg.model.kernels)
        ls = LabelSpace.from_datasets(["voc", "ade20k", "coco_stuff"])
        rng = np.random.default_rng(0)
        text = rng.standard_normal((ls.num_classes, cfg.model.emb_dim)).astype(np.float32)
        text /= np.linalg.norm(text, axis=1, keepdims=True)
        self.trainer = pretrain.Trainer(cfg, ls, text if kind == "ms3" else None, num_steps=10_000,
                                        devices=jax.devices()[:1])
        self.batch = self.trainer.global_batch(synthetic_batch(batch, size, list(ls.offsets)))
        self.state = self.trainer.init_state(jax.random.PRNGKey(0))
        params = self.state.params
        self.num_params = int(sum(x.size for k, sub in params.items() if not k.startswith("proj_")
                                  for x in jax.tree_util.tree_leaves(sub)))
        self.num_params_all = int(sum(x.size for x in jax.tree_util.tree_leaves(params)))
        t = time.perf_counter()
        lowered = self.trainer._step.lower(self.state, self.batch, self.trainer.consts)
        t_lower = time.perf_counter() - t
        self.compiled = lowered.compile()
        self.compile_s = time.perf_counter() - t
        self.lower_s = t_lower
        cost = self.compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        self.flops = float(cost.get("flops", float("nan")))
        mem = self.compiled.memory_analysis()
        self.temp_bytes = int(getattr(mem, "temp_size_in_bytes", 0))
        t = time.perf_counter()
        self._run()
        self.first_step_s = time.perf_counter() - t

    def _run(self) -> None:
        import jax

        self.state, metrics = self.compiled(self.state, self.batch, self.trainer.consts)
        jax.block_until_ready((self.state, metrics))

    def info(self) -> dict[str, Any]:
        return {"compile_s": self.compile_s, "lower_s": self.lower_s, "flops": self.flops,
                "params": self.num_params, "params_all": self.num_params_all,
                "temp_gb": self.temp_bytes / 1e9, "first_step_s": self.first_step_s}

    def step(self) -> float:
        t = time.perf_counter()
        self._run()
        return time.perf_counter() - t

    peak = staticmethod(jax_peak)


class TorchWorker:
    """benchmarks/torch_deeplab.py: channels_last, eager, SGD step on the same batch."""

    def __init__(self, dtype: str | None, batch: int, size: int):
        import torch

        sys.path.insert(0, os.path.join(REPO, "benchmarks"))
        import torch_deeplab

        torch.set_num_threads(os.cpu_count() or 1)
        self.model, self.images, self.labels = torch_deeplab.build(batch, size)
        self.num_params = torch_deeplab.num_params(self.model)
        self.fn = torch_deeplab.make_train_step(self.model, bf16=dtype == "bf16")
        t = time.perf_counter()
        self.fn(self.images, self.labels)
        self.first_step_s = time.perf_counter() - t
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as fc:
            self.fn(self.images, self.labels)
        self.flops_counted = float(fc.get_total_flops())

    def info(self) -> dict[str, Any]:
        return {"compile_s": 0.0, "params": self.num_params, "first_step_s": self.first_step_s,
                "flops_torch_counter": self.flops_counted}

    def step(self) -> float:
        t = time.perf_counter()
        self.fn(self.images, self.labels)
        return time.perf_counter() - t

    peak = staticmethod(torch_peak)


def cpu_seconds() -> float:
    """User + system CPU time of this process, all threads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def release_memory() -> None:
    """glibc `malloc_trim(0)`: return freed heap pages to the OS (no-op where unavailable)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def set_host_malloc() -> str:
    """This checkout's `host_memory.configure_from_env()` (also for `#NAME` baselines and torch),
    before JAX / torch start their threads, as in ms3_jax.main."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "_host_memory", os.path.join(REPO, "ms3_jax", "engine", "host_memory.py"))
    host_memory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(host_memory)
    return host_memory.configure_from_env()


def worker_main(variant: str, batch: int, size: int) -> None:
    """Set up, print one JSON line of info, then serve 'step' / 'peak' / 'quit' from stdin."""
    import warnings

    warnings.filterwarnings("ignore")
    set_host_malloc()
    kind, dtype, _ = parse_variant(variant)
    w = TorchWorker(dtype, batch, size) if kind == "torch" else JaxWorker(kind, dtype, batch, size)
    print("@@" + json.dumps(w.info()), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "step":
            c0 = cpu_seconds()
            out = {"t": w.step()}
            out["cpu"] = cpu_seconds() - c0
            out["maxrss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
            if os.environ.get("MS3_HOST_MALLOC") != "reuse":
                release_memory()  # idle workers hand their step's scratch back to the OS
        elif cmd == "peak":
            out = {"gflops": w.peak()}
        else:
            break
        print("@@" + json.dumps(out), flush=True)


# ------------------------------------------------------------------------------------------------
# Coordinator.
# ------------------------------------------------------------------------------------------------
class Proc:
    def __init__(self, variant: str, args: argparse.Namespace):
        _, _, flags = parse_variant(variant)
        env = dict(os.environ)
        env["XLA_FLAGS"], extra_env = flag_env(flags, args.xla_flags)
        env.update(extra_env)
        _, _, tag = variant.partition("#")
        trees = dict(x.split("=", 1) if "=" in x else ("base", x)
                     for x in args.baseline.split(",") if x)
        if tag and tag not in trees:
            raise ValueError(f"variant {variant!r} needs --baseline {tag}=DIR")
        first = [trees[tag]] if tag else []
        env["PYTHONPATH"] = os.pathsep.join(first + [REPO] + [p for p in [env.get("PYTHONPATH")] if p])
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", variant,
               "--batch", str(args.batch), "--size", str(args.size)]
        self.variant = variant
        self.xla_flags = " ".join([env["XLA_FLAGS"]] + [f"{k}={v}" for k, v in
                                                        extra_env.items()]).strip()
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                  env=env, cwd=REPO)
        self.info = self._read()

    def _read(self) -> dict[str, Any]:
        for line in self.p.stdout:
            if line.startswith("@@"):
                return json.loads(line[2:])
        raise RuntimeError(f"worker {self.variant} died (exit {self.p.wait()})")

    def ask(self, cmd: str) -> dict[str, Any]:
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()
        return self._read()

    def close(self) -> None:
        try:
            self.p.stdin.write("quit\n")
            self.p.stdin.flush()
        except BrokenPipeError:
            pass
        self.p.wait()


def idle_rss_gb(pid: int) -> float:
    """Resident memory of a (now idle) worker, from /proc (nan elsewhere)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return kb / 2 ** 20
    except (OSError, StopIteration):
        return float("nan")


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def profile(variant: str, args: argparse.Namespace, top: int = 25) -> None:
    """One traced step of a JAX variant (in this process, XLA_FLAGS from the variant); prints the
    XLA ops (thunks) by total time, by kind (`ynn_fusion`: convolutions / GEMMs via YNNPACK) and
    the wall time of each region of the step (:func:`step_region`)."""
    import collections
    import glob
    import gzip

    kind, dtype, flags = parse_variant(variant)
    if kind == "torch":
        raise ValueError("--profile is for JAX variants")
    os.environ["XLA_FLAGS"], extra_env = flag_env(flags, args.xla_flags)
    os.environ.update(extra_env)
    print(set_host_malloc(), flush=True)
    sys.path.insert(0, REPO)
    import jax

    w = JaxWorker(kind, dtype, args.batch, args.size)
    print(f"{variant}: compile {w.compile_s:.1f} s, untraced step {w.step():.2f} s", flush=True)
    jax.profiler.start_trace(args.profile, create_perfetto_trace=True)
    t = w.step()
    jax.profiler.stop_trace()
    path = sorted(glob.glob(f"{args.profile}/**/*.trace.json.gz", recursive=True), key=os.path.getmtime)[-1]
    with gzip.open(path) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    total: collections.Counter = collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") == "X" and not name.startswith("$") and "Thunk" not in name \
                and "ThreadPool" not in name:
            total[name] += e.get("dur", 0) / 1e6
    by_kind: collections.Counter = collections.Counter()
    for name, sec in total.items():
        by_kind[re.sub(r"[.\d]+$", "", name)] += sec
    print(f"traced step {t:.2f} s; ops {sum(total.values()):.2f} s; trace {path}")
    print("by kind: " + ", ".join(f"{k} {v:.2f}" for k, v in by_kind.most_common(12)))
    for name, sec in total.most_common(top):
        print(f"  {sec:8.3f} s  {name}")
    # Ops run concurrently (XLA's CPU thunk executor), so a region's time is the length of the
    # union of its ops' intervals, not their sum.
    op_names = jax_op_names(w.compiled.as_text())
    spans = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e.get("name") in op_names:
            spans[step_region(op_names[e["name"]])].append((e["ts"], e["ts"] + e.get("dur", 0)))
    print("by region (wall seconds, intervals merged; regions can overlap):")
    for region, sp in sorted(spans.items(), key=lambda kv: -union_seconds(kv[1])):
        print(f"  {union_seconds(sp):8.3f} s  {region}")


def jax_op_names(hlo_text: str) -> dict[str, str]:
    """XLA instruction name -> the JAX op_name it came from ("" if XLA made it: layout copies,
    reductions it rewrote). A fusion without its own metadata takes its computation's first."""
    own = dict(re.findall(r'%?([\w.\-]+) = [^\n]*?metadata=\{[^}\n]*?op_name="([^"]*)"', hlo_text))
    first_in: dict[str, str] = {}
    computation = None
    for line in hlo_text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            computation = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
        elif computation and computation not in first_in:
            found = re.search(r'op_name="([^"]*)"', line)
            if found:
                first_in[computation] = found.group(1)
    names = {}
    for inst, callee in re.findall(r'%?([\w.\-]+) = [^\n]*?calls=%?([\w.\-]+)', hlo_text):
        names[inst] = first_in.get(callee, "")
    names.update(own)
    return names


def step_region(op_name: str) -> str:
    """Which part of the step an XLA op belongs to, from its JAX op_name: the online model's
    forward (under `jvp`) or backward (`transpose`), the momentum encoder's forward (the model
    applied outside autodiff), split into encoder (backbone + decoder) and projection heads."""
    part = ("projection heads" if "/proj_" in op_name else
            "encoder" if "/backbone/" in op_name or "/decode_head/" in op_name else
            "conv_seg" if "/conv_seg/" in op_name else None)
    if not op_name:
        return "no JAX name (XLA-made: layout copies, rewritten reductions)"
    if part is None:
        return "rest (losses, bank, relations, optimizer, EMA)"
    if "transpose(" in op_name:
        return f"online {part}, backward"
    return f"online {part}, forward" if "jvp(" in op_name else f"momentum {part}, forward"


def union_seconds(spans: list[tuple[float, float]]) -> float:
    """Total length of the union of [start, end) microsecond intervals, in seconds."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--reps", type=int, default=3, help="timed steps per variant (interleaved)")
    ap.add_argument("--variants", default="ms3,ce,torch")
    ap.add_argument("--xla_flags", default="", help="extra XLA_FLAGS for every JAX variant")
    ap.add_argument("--json", default="", help="also write the results to this file")
    ap.add_argument("--baseline", default="", help="copies of the code before an optimisation, "
                    "`NAME=DIR,...` (a bare DIR is NAME 'base'; e.g. `git archive <commit> ms3_jax "
                    "configs tests | tar -x -C DIR`); variants ending in '#NAME' import ms3_jax and "
                    "configs from DIR (before/after in one run)")
    ap.add_argument("--profile", default="", help="profile the first (JAX) variant instead: "
                    "one traced step, perfetto trace in this directory, top XLA ops printed")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker_main(args.worker, args.batch, args.size)
        return
    if args.profile:
        profile(args.variants.split(",")[0], args)
        return
    variants = args.variants.split(",")
    for v in variants:
        parse_variant(v)
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  batch {args.batch} at {args.size}, reps {args.reps}, "
          f"{os.cpu_count()} CPUs, load {loadavg()}", flush=True)
    procs: list[Proc] = []
    try:
        for v in variants:  # set-up one at a time: compiles do not overlap
            t = time.perf_counter()
            procs.append(Proc(v, args))
            print(f"  set up {v:<18} in {time.perf_counter() - t:6.1f} s: {procs[-1].info}", flush=True)
        jp = next((p for p in procs if not p.variant.startswith("torch")), None)
        tp = next((p for p in procs if p.variant.startswith("torch")), None)
        peaks: dict[str, list[float]] = {"jnp": [], "torch": []}
        res: dict[str, list[dict[str, float]]] = {p.variant: [] for p in procs}
        loads = [loadavg()]
        for r in range(args.reps):
            for name, p in (("jnp", jp), ("torch", tp)):
                if p is not None:
                    peaks[name].append(p.ask("peak")["gflops"])
            for p in procs:
                time.sleep(0.3)  # let the previous worker's threads go idle
                res[p.variant].append(p.ask("step"))
            loads.append(loadavg())
            print(f"  rep {r}: " + ", ".join(f"{v} {x[-1]['t']:.2f}s" for v, x in res.items())
                  + f"  (load {loads[-1]})", flush=True)
        for p in procs:
            p.info["idle_rss_gb"] = idle_rss_gb(p.p.pid)
    finally:
        for p in procs:
            p.close()
    report(args, procs, res, peaks, loads)


def paired(num: list[dict[str, float]], den: list[dict[str, float]]) -> float:
    """Median over reps of num[r] / den[r] (step times measured back to back)."""
    return statistics.median(a["t"] / b["t"] for a, b in zip(num, den))


def report(args: argparse.Namespace, procs: list[Proc], res: dict[str, list[dict[str, float]]],
           peaks: dict[str, list[float]], loads: list[str]) -> None:
    med = {v: statistics.median(x["t"] for x in rs) for v, rs in res.items()}
    cpu = {v: statistics.median(x["cpu"] for x in rs) for v, rs in res.items()}
    peak = {k: statistics.median(v) for k, v in peaks.items() if v}
    ce = next((p for p in procs if p.variant in ("ce", "ce:bf16")), None)
    ce = ce or next((p for p in procs if p.variant.startswith("ce")), None)
    ce_flops = ce.info["flops"] if ce else float("nan")
    torch_v = next((v for v in med if v.startswith("torch")), None)
    print(f"\nmatmul peak (float32 {PEAK_N}^2, median of {args.reps}): " +
          ", ".join(f"{k} {g:.0f} GFLOP/s" for k, g in peak.items()))
    print(f"{'variant':<18}{'XLA_FLAGS':<28}{'step s':>8}{'best s':>8}{'cpu s':>8}{'img/s':>8}{'compile s':>10}"
          f"{'GFLOP':>8}{'GFLOP/s':>9}{'% peak':>8}{'vs CE':>7}{'vs torch':>9}{'RSS GB':>9}"
          f"{'params':>12}")
    rows = []
    for p in procs:
        v = p.variant
        flops = p.info.get("flops", ce_flops)
        gfs = flops / med[v] / 1e9
        pk = peak.get("torch" if v.startswith("torch") else "jnp", float("nan"))
        # Ratios paired within each rep (same minutes of load), then the median over reps.
        vs_ce = paired(res[v], res[ce.variant]) if ce else float("nan")
        vs_torch = paired(res[torch_v], res[v]) if torch_v else float("nan")  # >1: faster
        rss = max(x["maxrss_gb"] for x in res[v])
        rows.append(dict(variant=v, xla_flags=p.xla_flags, step_s=med[v], cpu_s=cpu[v],
                         runs=res[v], images_per_s=args.batch / med[v],
                         compile_s=p.info["compile_s"], gflop=flops / 1e9, gflops_per_s=gfs,
                         pct_peak=100 * gfs / pk, time_vs_ce=vs_ce, speed_vs_torch=vs_torch,
                         max_rss_gb=rss, params=p.info["params"], info=p.info))
        best = min(x["t"] for x in res[v])
        print(f"{v:<18}{p.xla_flags[:27]:<28}{med[v]:8.2f}{best:8.2f}{cpu[v]:8.2f}{args.batch / med[v]:8.2f}"
              f"{p.info['compile_s']:10.1f}{flops / 1e9:8.1f}{gfs:9.1f}{100 * gfs / pk:8.1f}"
              f"{vs_ce:7.2f}{vs_torch:9.2f}{rss:5.1f}/{p.info['idle_rss_gb']:<4.1f}{p.info['params']:12,}")
    print("step s: median wall time (best s: the fastest rep); cpu s: median CPU time of the "
          "worker (all threads); vs CE = step time / CE step time; vs torch = torch step time / "
          "this step time (images/s ratio, > 1 is faster than PyTorch), both ratios taken within "
          "each rep, median over reps; torch GFLOP = XLA's count of the CE step; % peak against "
          "the matmul peak of the same framework; RSS: peak / idle resident GB of the worker; params: "
          "without the projection heads.")
    print(f"load average (1/5/15 min) before and after each rep: {' | '.join(loads)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), date=time.strftime("%Y-%m-%d %H:%M"), peak=peak,
                           peaks=peaks, loads=loads, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
