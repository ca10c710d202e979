"""Fingerprints of the lowered tiny programs `benchmarks/accelerators.py` compiles (StableHLO text,
source locations removed): equal fingerprints before and after a refactor mean XLA compiles the
same program for the accelerators. Lowering only: seconds, no compile.

  python benchmarks/lowered_programs.py        # from the checkout to fingerprint
"""
import hashlib
import importlib.util
import os
import re

os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")  # no CUDA driver: lower only
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

_HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("accelerators", os.path.join(_HERE, "accelerators.py"))
accelerators = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(accelerators)


def fingerprint(lowered) -> str:
    return hashlib.sha256(re.sub(r"loc\([^)]*\)", "", lowered.as_text()).encode()).hexdigest()[:16]


def main() -> None:
    for target in ("h100", "v5e"):
        devices, _ = accelerators.target_devices(target)
        for step in ("ms3", "ce"):
            for kernels in ("auto", "xla"):
                cfg = accelerators.make_config(tiny=True, step=step, kernels=kernels)
                lowered, _ = accelerators.lower_step(cfg, devices, batch=2, size=32)
                print(f"{target:5} {step:6} {kernels:4} {fingerprint(lowered)}")
        cfg = accelerators.make_config(tiny=True, step="stage1", kernels="-")
        lowered, _ = accelerators.lower_stage1(cfg, devices, batch=4, size=64, patch=8)
        print(f"{target:5} stage1 -    {fingerprint(lowered)}")


if __name__ == "__main__":
    main()
