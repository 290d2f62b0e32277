"""Same-run A/B of the selective scan (and the whole model) against the scan of another git revision.

The other revision's `modeling_panfoma/*.py` are read with `git show REV:...` into a private package
(`load_revision_package`, also used by `ab_mixer.py`), so both versions run in one process on identical inputs,
interleaved (old, new, old, new, ...), and the medians are compared. This is how the README's "model changes" rows
for the scan were measured.

Usage (from the repository root):

    python benchmarks/ab_scan.py --against fac60ed [--threads 2] [--repeats 3] [--no-model]
"""

from __future__ import annotations

import argparse
import importlib
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _common import REPO_ROOT, build_model, make_inputs, setup_threads, training_loss  # noqa: E402
from bench_scan import make_inputs as scan_inputs  # noqa: E402

MODEL_DIR = "modeling_panfoma"


def load_revision_package(rev: str, folder: Path) -> str:
    """Write git revision `rev`'s model sources (`modeling_panfoma/*.py`, without its `__init__`) into a package
    under `folder`, put `folder` on `sys.path`, and return the package's import name.

    A whole package, because the sources import each other relatively (the scan's numba kernels live in their own
    module since the mixer rework). Files are rewritten only when their content changed: numba's on-disk cache is
    keyed by the source file's timestamp, so a persistent `folder` compiles the old kernels once, not every run.
    """
    name = "panfoma_rev_" + re.sub(r"\W", "_", rev)
    package = folder / name
    package.mkdir(parents=True, exist_ok=True)
    listing = subprocess.run(["git", "ls-tree", "--name-only", f"{rev}:{MODEL_DIR}"], cwd=REPO_ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    for file_name in [f for f in listing if f.endswith(".py") and f != "__init__.py"] + ["__init__.py"]:
        source = "" if file_name == "__init__.py" else subprocess.run(
            ["git", "show", f"{rev}:{MODEL_DIR}/{file_name}"], cwd=REPO_ROOT, capture_output=True, text=True,
            check=True).stdout
        path = package / file_name
        if not path.exists() or path.read_text() != source:
            path.write_text(source)
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    return name


def revision_cache_folder() -> Path:
    """Where revisions are written (kept between runs, so their numba kernels compile once)."""
    return Path(tempfile.gettempdir()) / "panfoma_ab"


def load_revision(rev: str, folder: Path | None = None):
    """The selective-scan module of git revision `rev`, imported under a private package name."""
    package = load_revision_package(rev, folder or revision_cache_folder())
    return importlib.import_module(f"{package}.selective_scan")


def interleaved(calls: dict, repeats: int) -> dict:
    """Median seconds of each callable, one warm-up each, then `repeats` rounds in alternating order."""
    for fn in calls.values():
        fn()
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", required=True, help="git revision whose scan is the baseline, e.g. fac60ed")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", default="8,1024,3072,16", help="scan size b,e,l,s")
    parser.add_argument("--no-model", action="store_true", help="skip the whole-model A/B (panfoma-base, 3,072 genes)")
    args = parser.parse_args(argv)
    threads = setup_threads(args.threads)
    new = importlib.import_module("panfoma.selective_scan")
    old = load_revision(args.against)
    b, e, l, s = (int(x) for x in args.size.split(","))
    inputs = scan_inputs(b, e, l, s)
    grad = torch.ones_like(inputs["u"])

    def scan_call(module, backward):
        def run():
            if not backward:
                with torch.no_grad():
                    module.selective_scan(**inputs, delta_softplus=True, backend="numba")
                return
            leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
            module.selective_scan(**leaves, delta_softplus=True, backend="numba").backward(grad)
        return run

    print(f"scan ({b}, {e}, {l}, {s}), {threads} threads, {args.repeats} interleaved repeats; "
          f"baseline {args.against}")
    for backward, label in ((False, "forward"), (True, "forward+backward")):
        t = interleaved({"old": scan_call(old, backward), "new": scan_call(new, backward)}, args.repeats)
        print(f"  {label}: {t['old']:.3f} s -> {t['new']:.3f} s, {t['old'] / t['new']:.2f}x")

    if args.no_model:
        return
    modeling = importlib.import_module("panfoma.modeling_panfoma")
    model = build_model("panfoma", "panfoma-base")
    model_inputs = make_inputs(model.config.vocab_size, model.config.n_bins, 1, 3072)
    current = modeling.selective_scan

    def model_call(scan_fn, train):
        def run():
            modeling.selective_scan = scan_fn  # the mixer calls the module-level name
            try:
                model.train(train)
                if train:
                    states, pooled = model(**model_inputs)
                    training_loss(states, pooled).backward()
                    model.zero_grad(set_to_none=True)
                else:
                    with torch.no_grad():
                        model(**model_inputs)
            finally:
                modeling.selective_scan = current
        return run

    print("panfoma-base, 1 cell of 3,072 genes")
    for train, label in ((False, "forward"), (True, "training step")):
        t = interleaved({"old": model_call(old.selective_scan, train), "new": model_call(current, train)},
                        args.repeats)
        print(f"  {label}: {t['old']:.2f} s -> {t['new']:.2f} s, {t['old'] / t['new']:.2f}x")


if __name__ == "__main__":
    main()
