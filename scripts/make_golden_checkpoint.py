"""Make the golden-output fixture of the regression test (tests/test_golden_outputs.py).

Writes, under `tests/fixtures/golden_tiny/`:

* `pretraining/` and `classifier/`: a tiny `PanFoMaForPreTraining` and a `PanFoMaForCellClassification` (the same
  backbone weights), each as `config.json` + `model.safetensors` only (a few tens of KB). Every parameter is moved
  away from its initial value by seeded noise, so a LayerNorm left at 1 / a bias left at 0 cannot hide a renamed or
  mis-wired parameter.
* `golden_outputs.json`: fixed inputs (three cells of 5, 13 and 20 genes: one, two and three chunks of 8, padded;
  masked positions with bin and continuous targets) and what the checkpoints output for them on the CPU in float32
  (`golden_outputs` below): the backbone's last_hidden_state (summaries and a full slice) and pooler_output, the
  pretraining losses, the classifier's logits and loss.

Usage (from the repository root):
    python scripts/make_golden_checkpoint.py                 # new checkpoints + outputs
    python scripts/make_golden_checkpoint.py --outputs-only  # keep the checkpoints, re-pin the outputs

Re-pin (`--outputs-only`) only when a change of the numerics is intended, and say so in the commit message: the test
exists so that a refactor that renames a parameter or changes a result fails loudly instead of drifting silently.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "golden_tiny"
#: Tiny but complete: the shared encoder block applied twice over 3 chunks, 2 bidirectional Mamba layers, every
#: pretraining term on (contrastive included), per-gene target statistics (buffers) in the checkpoint.
CONFIG = dict(vocab_size=64, n_bins=11, hidden_size=16, num_attention_heads=2, intermediate_size=32,
              num_encoder_layers=2, num_mamba_layers=2, gene_chunk_size=8, max_genes=24, state_size=4, expand=2,
              hidden_dropout_prob=0.0, classifier_dropout=0.0, mamba_implementation="torch",
              mvm_loss_weight=1.0, mse_loss_weight=1.0, mvc_loss_weight=1.0, contrastive_loss_weight=0.5,
              target_normalization="gene")
LABELS = ["B cell", "T cell", "malignant"]
LENGTHS = (5, 13, 20)
#: Seed of the contrastive term's random halves (the only random step of a forward pass in eval mode).
FORWARD_SEED = 0


def make_inputs(seed: int = 0) -> dict[str, list]:
    """Three padded cells: distinct gene ids per cell, bins 1..n_bins-1, about a third of the values masked."""
    rng = np.random.default_rng(seed)
    n_bins, width = CONFIG["n_bins"], max(LENGTHS)
    input_ids = np.zeros((len(LENGTHS), width), dtype=np.int64)
    values = np.full((len(LENGTHS), width), n_bins, dtype=np.int64)  # padding value id = n_bins
    attention_mask = np.zeros((len(LENGTHS), width), dtype=np.int64)
    labels = np.full((len(LENGTHS), width), -100, dtype=np.int64)
    raw_values = np.zeros((len(LENGTHS), width), dtype=np.float32)
    for row, n in enumerate(LENGTHS):
        input_ids[row, :n] = rng.choice(np.arange(4, CONFIG["vocab_size"]), size=n, replace=False)
        bins = rng.integers(1, n_bins, size=n)
        raw_values[row, :n] = np.round(bins * 0.4 + rng.normal(0, 0.1, size=n), 3)
        masked = rng.random(n) < 0.35
        masked[0] = True  # every cell has a target
        values[row, :n] = np.where(masked, n_bins + 1, bins)  # masked value id = n_bins + 1
        labels[row, :n] = np.where(masked, bins, -100)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids.tolist(), "values": values.tolist(), "attention_mask": attention_mask.tolist(),
            "labels": labels.tolist(), "raw_values": raw_values.tolist(), "cell_labels": [0, 2, 1]}


def _tensors(inputs: dict) -> dict[str, torch.Tensor]:
    out = {key: torch.tensor(inputs[key]) for key in ("input_ids", "values", "attention_mask", "labels")}
    out["raw_values"] = torch.tensor(inputs["raw_values"], dtype=torch.float32)
    return out


def _round(tensor: torch.Tensor) -> list | float:
    return np.round(tensor.detach().double().numpy(), 7).tolist()


@torch.no_grad()
def golden_outputs(folder: Path, inputs: dict) -> dict:
    """What the checkpoints in `folder` output for `inputs`: CPU, float32, eval mode, threads as the caller set."""
    import panfoma

    batch = _tensors(inputs)
    model_inputs = {key: batch[key] for key in ("input_ids", "values", "attention_mask")}
    valid = batch["attention_mask"].bool()

    pretraining = panfoma.PanFoMaForPreTraining.from_pretrained(folder / "pretraining").eval()
    out = pretraining.panfoma(**model_inputs, return_dict=True)
    hidden = out.last_hidden_state.float()  # (b, n, d)
    counts = valid.sum(1, keepdim=True)  # (b, 1)
    results = {
        "last_hidden_state": {
            "shape": list(hidden.shape),
            "mean_over_genes": _round((hidden * valid[..., None]).sum(1) / counts),  # (b, d)
            "norm_per_gene": _round(hidden.norm(dim=-1) * valid),  # (b, n)
            "cell0_first4": _round(hidden[0, :4]),  # (4, d)
        },
        "pooler_output": _round(out.pooler_output),
    }

    torch.manual_seed(FORWARD_SEED)
    out = pretraining(**model_inputs, labels=batch["labels"], raw_values=batch["raw_values"], return_dict=True)
    results["pretraining"] = {name: _round(getattr(out, name)) for name in
                              ("loss", "mvm_loss", "mse_loss", "mvc_loss", "contrastive_loss")}
    target = batch["labels"] != -100
    results["pretraining"]["masked_logits_sum"] = _round(out.logits[target].sum())
    results["pretraining"]["masked_value_predictions"] = _round(out.value_predictions[target])
    results["pretraining"]["masked_cell_predictions"] = _round(out.cell_predictions[target])

    classifier = panfoma.PanFoMaForCellClassification.from_pretrained(folder / "classifier").eval()
    out = classifier(**model_inputs, labels=torch.tensor(inputs["cell_labels"]), return_dict=True)
    results["classifier"] = {"logits": _round(out.logits), "loss": _round(out.loss)}
    return results


def _perturb(model: torch.nn.Module, generator: torch.Generator, scale: float = 0.2) -> None:
    """Move every parameter off its initial value (relative noise, plus an offset for parameters initialised to a
    constant), keeping the model's invariants: positivity goes through softplus / exp inside the model."""
    with torch.no_grad():
        for parameter in model.parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.add_(scale * noise * (parameter.abs().mean() + 0.05))


def make_checkpoints(folder: Path, seed: int = 0) -> None:
    import panfoma

    torch.manual_seed(seed)
    config = panfoma.PanFoMaConfig(**CONFIG)
    pretraining = panfoma.PanFoMaForPreTraining(config)
    generator = torch.Generator().manual_seed(seed)
    _perturb(pretraining, generator)
    # Non-trivial per-gene target statistics (buffers): one training-mode forward updates them.
    batch = _tensors(make_inputs(seed + 1))
    pretraining.train()
    pretraining(input_ids=batch["input_ids"], values=batch["values"], attention_mask=batch["attention_mask"],
                labels=batch["labels"], raw_values=batch["raw_values"])
    pretraining.eval()
    classifier_config = panfoma.PanFoMaConfig(**CONFIG, id2label=dict(enumerate(LABELS)),
                                              label2id={name: i for i, name in enumerate(LABELS)})
    classifier = panfoma.PanFoMaForCellClassification(classifier_config)
    classifier.panfoma.load_state_dict(pretraining.panfoma.state_dict())
    _perturb(classifier.classifier, generator, scale=3.0)  # logits of order 0.1-1, not 0.01
    for name, model in (("pretraining", pretraining), ("classifier", classifier)):
        target = folder / name
        target.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(target)
        for extra in target.iterdir():  # the fixture is weights + config only (no remote-code copies)
            if extra.name not in ("config.json", "model.safetensors"):
                extra.unlink()
        config_file = target / "config.json"
        saved = json.loads(config_file.read_text())
        saved.pop("auto_map", None)  # it would point at the remote-code copies just removed
        config_file.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")


def _dumps(value, indent: int = 0) -> str:
    """JSON with one line per leaf (a number or an array): readable diffs when outputs are re-pinned."""
    if isinstance(value, dict):
        pad = " " * (indent + 1)
        items = [f"{pad}{json.dumps(key)}: {_dumps(item, indent + 1)}" for key, item in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    return json.dumps(value, separators=(", ", ": "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outputs-only", action="store_true", help="keep the checkpoints, re-pin the outputs")
    parser.add_argument("--folder", type=Path, default=FIXTURE)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not args.outputs_only:
        make_checkpoints(args.folder)
    inputs = make_inputs()
    payload = {"inputs": inputs, "outputs": golden_outputs(args.folder, inputs),
               "made_with": {"torch": torch.__version__}}
    (args.folder / "golden_outputs.json").write_text(_dumps(payload) + "\n")
    sizes = {p.relative_to(args.folder).as_posix(): p.stat().st_size for p in sorted(args.folder.rglob("*"))
             if p.is_file()}
    print(json.dumps(sizes, indent=1), f"total {sum(sizes.values())} bytes")


if __name__ == "__main__":
    main()
