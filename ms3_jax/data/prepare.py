"""Build one dataset into array_record files that `tfds.data_source` / grain read.

    python -m ms3_jax.data.prepare --dataset ade20k --manual_dir ~/raw/ade --data_dir ~/tfds

`--dataset` is a non-synthetic name of `registry.DATASETS` (voc, ade20k, coco_stuff, cityscapes,
mapillary), an alias (voc_aug, coco_stuff164k) or the tfds name (ms3_ade20k, ...). The expected
layout of `--manual_dir` is in `ms3_jax/data/builders.py`. Prints a progress bar per split and a
summary (examples per split against the official count, skipped corrupt files).

SIGTERM (a preemption, `kill`) stops the build with exit code 75, as `ms3_jax.main` does: the
`incomplete.*` directory this run was writing is removed (tfds leaves a finished version in
place; other builds' incomplete directories are left alone). Run the same command again to
build it.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import logging
import os
import shutil
import signal
import sys
from collections.abc import Iterator, Sequence

import tensorflow_datasets as tfds

from ms3_jax.data import builders, registry

# = ms3_jax.engine.exit_codes.PREEMPTED (data/ may not import engine/, tests/test_layout.py):
# sysexits.h EX_TEMPFAIL, "stopped; run the same command again".
PREEMPTED = 75


class Terminated(BaseException):
    """SIGTERM during a build. A BaseException, as KeyboardInterrupt: no `except Exception` of a
    builder (skip_corrupt) swallows it, and tfds's `incomplete_dir` cleans up on its way out."""


def incomplete_dirs(data_dir: str) -> set[str]:
    """tfds's unfinished build directories under `data_dir`:
    `<dataset>/[<config>/]incomplete.<random>_<version>`."""
    if "://" in data_dir:
        return set()
    root = glob.escape(os.path.abspath(data_dir))
    found = glob.glob(os.path.join(root, "*", "incomplete.*")) + glob.glob(
        os.path.join(root, "*", "*", "incomplete.*"))
    return {p for p in found if os.path.isdir(p) and not os.path.islink(p)}


@contextlib.contextmanager
def stop_cleanly_on_sigterm(data_dir: str) -> Iterator[list[str]]:
    """While the body runs, SIGTERM raises `Terminated` (instead of killing the process, which
    leaves tfds's `incomplete.*` directory behind). On `Terminated` or KeyboardInterrupt the
    incomplete directories that appeared under `data_dir` during the body (this run's; those of
    earlier or other builds stay) are removed, listed in the yielded list, and the exception goes
    on. The previous SIGTERM handler comes back on exit."""
    before = incomplete_dirs(data_dir)
    removed: list[str] = []

    def handle(signum: int, frame) -> None:
        del frame
        raise Terminated(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield removed
    except (Terminated, KeyboardInterrupt):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup
        for path in sorted(incomplete_dirs(data_dir) - before):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


USAGE = 2  # ms3_jax.engine.exit_codes.USAGE (data/ may not import engine/): what the user can fix


class _Parser(argparse.ArgumentParser):
    """A usage mistake is one line and exit code 2 (as the other CLIs: `exit_codes`)."""

    def error(self, message: str) -> None:
        print(f"error: {self.prog}: {message} (--help lists the arguments)", file=sys.stderr,
              flush=True)
        sys.exit(USAGE)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m ms3_jax.data.prepare", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    real = [d for d in registry.DATASETS.values() if not d.synthetic]
    p.add_argument("--dataset", required=True, help=" | ".join(d.name for d in real) + " (or "
                   + ", ".join(a for d in real for a in d.aliases) + ", ms3_* tfds names)")
    p.add_argument("--manual_dir", required=True, help="folder with the official archives or "
                   "their extracted folders")
    p.add_argument("--data_dir", required=True, help="tfds data_dir to write to")
    p.add_argument("--verbose", action="store_true", help="full tracebacks for errors too")
    p.add_argument("--skip_corrupt", action="store_true", help="skip (and count) images / "
                   "labels PIL cannot decode instead of failing")
    p.add_argument("--config", default=None, help="builder config; only mapillary has "
                   "some: v1.2 (default, 66 classes as in MMSeg) or v1.2_unlabeled_ignored "
                   "(65 'Unlabeled' -> 255)")
    return p


def summary(builder: builders.SegmentationBuilder) -> str:
    lines = [f"{builder.name} -> {builder.data_dir}"]
    for split, n in builders.split_sizes(builder).items():
        official = builder.OFFICIAL_SIZES.get(split)
        note = "" if official is None else f" (official: {official})"
        lines.append(f"  {split}: {n} examples{note}")
    # `builder.skipped` is empty when the data was already prepared: read what was recorded.
    files = builder.skipped or dict(builder.info.metadata.get("skipped_files", {}))
    skipped = {k: len(v) for k, v in files.items()}
    if not builder.skipped and "skipped" in builder.info.metadata:
        skipped = dict(builder.info.metadata["skipped"])
    lines.append(f"  skipped: {sum(skipped.values())}"
                 + (f" {skipped}" if any(skipped.values()) else ""))
    for split, names in files.items():
        for f in names[:20]:
            lines.append(f"    skipped ({split}): {f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> builders.SegmentationBuilder:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        cls = registry.get(args.dataset, real_only=True).builder
    except builders.DatasetError as e:
        parser.error(str(e))
    kwargs = {}
    if args.config is not None:
        names = [c.name for c in cls.BUILDER_CONFIGS or ()]
        if args.config not in names:
            parser.error(f"{cls.name} has no config {args.config!r}; configs: {names or 'none'}")
        kwargs["config"] = args.config
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    tfds.disable_progress_bar()  # ours has a total; tfds's does not
    try:
        with stop_cleanly_on_sigterm(args.data_dir) as removed:
            builder = builders.prepare(cls.name, args.manual_dir, args.data_dir,
                                       skip_corrupt=args.skip_corrupt, progress=True, **kwargs)
    except Terminated as e:
        left = f" (removed {', '.join(removed)})" if removed else ""
        print(f"stopped by {e}: {cls.name} is not built and its incomplete directory is gone"
              f"{left}; run the same command again to build it (exit code {PREEMPTED})",
              file=sys.stderr, flush=True)
        sys.exit(PREEMPTED)
    print(summary(builder))
    return builder


if __name__ == "__main__":
    try:
        main()
    except (builders.DatasetError, ValueError, FileNotFoundError, NotADirectoryError,
            PermissionError) as e:  # the data or a path: one line, exit code 2
        if "--verbose" in sys.argv:
            raise
        message = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"error: {message} (--verbose shows the traceback)", file=sys.stderr, flush=True)
        sys.exit(USAGE)
