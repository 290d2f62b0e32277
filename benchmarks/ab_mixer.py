"""Same-run A/B of the Mamba mixer inside the whole model: today's `PanFoMaMambaMixer` against another revision's.

One model of the other revision is built (`load_revision_package` from `ab_scan.py`: its model sources in a private
package, with its own scan), and each of its BiMamba layers gets a second pair of mixers, today's, with the same
weights. The two mixer sets are swapped in before each call, so everything except the mixers (and the scan they
call) is the same code, the same weights and the same memory; calls alternate (old, new, old, new, ...) and the
medians are compared. The outputs of both are checked to agree first.

Usage (from the repository root):

    python benchmarks/ab_mixer.py --against eff3b94 [--batches 1,4] [--genes 3072] [--modes forward,training]
        [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _common import make_inputs, setup_threads, training_loss  # noqa: E402
from ab_scan import interleaved, load_revision_package, revision_cache_folder  # noqa: E402


def build_models(rev: str, preset: str):
    """(model of revision `rev`, its mixers, today's mixers with the same weights), keyed by (layer, attribute)."""
    from panfoma.modeling_panfoma import PanFoMaMambaMixer

    package = load_revision_package(rev, revision_cache_folder())
    old_config = importlib.import_module(f"{package}.configuration_panfoma")
    old_modeling = importlib.import_module(f"{package}.modeling_panfoma")
    config = old_config.PanFoMaConfig.from_preset(preset, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = old_modeling.PanFoMaModel(config)
    old_mixers, new_mixers = {}, {}
    for layer in model.modules():
        if isinstance(layer, old_modeling.PanFoMaBiMambaLayer):
            for name in ("forward_mamba", "backward_mamba"):
                old_mixers[layer, name] = getattr(layer, name)
                new_mixers[layer, name] = PanFoMaMambaMixer(config)
                new_mixers[layer, name].load_state_dict(old_mixers[layer, name].state_dict())
    return model, old_mixers, new_mixers


def use(mixers: dict) -> None:
    for (layer, name), mixer in mixers.items():
        setattr(layer, name, mixer)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", required=True, help="git revision whose mixer is the baseline, e.g. eff3b94")
    parser.add_argument("--preset", default="panfoma-base")
    parser.add_argument("--genes", type=int, default=3072)
    parser.add_argument("--batches", default="1,4", help="comma-separated batch sizes")
    parser.add_argument("--modes", default="forward,training", help="forward and/or training (a training step)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    threads = setup_threads(args.threads)
    model, old_mixers, new_mixers = build_models(args.against, args.preset)
    config = model.config

    check = make_inputs(config.vocab_size, config.n_bins, 2, 256, seed=1)
    model.eval()
    with torch.no_grad():
        use(old_mixers)
        reference = model(**check).last_hidden_state
        use(new_mixers)
        difference = (model(**check).last_hidden_state - reference).abs().max().item()
    print(f"{args.preset}, {args.genes} genes, {threads} threads, {args.repeats} interleaved repeats; baseline mixer "
          f"{args.against}; max |new - old| on a check batch: {difference:.2e}")
    if difference > 1e-3:
        raise SystemExit("the two mixers disagree; not timing them")

    def call(mixers, inputs, train):
        def run():
            use(mixers)
            model.train(train)
            if train:
                out = model(**inputs)
                training_loss(out.last_hidden_state, out.pooler_output).backward()
                model.zero_grad(set_to_none=True)
            else:
                with torch.no_grad():
                    model(**inputs)
        return run

    print("| batch | mode | old s | new s | new / old |")
    print("|---|---|---|---|---|")
    for batch in (int(b) for b in args.batches.split(",")):
        inputs = make_inputs(config.vocab_size, config.n_bins, batch, args.genes)
        for train, label in ((False, "forward"), (True, "training step")):
            if ("training" if train else "forward") not in args.modes.split(","):
                continue
            t = interleaved({"old": call(old_mixers, inputs, train), "new": call(new_mixers, inputs, train)},
                            args.repeats)
            print(f"| {batch} | {label} | {t['old']:.2f} | {t['new']:.2f} | {t['new'] / t['old']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
