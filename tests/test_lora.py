"""LoRA fine-tuning (panfoma.training.lora, `finetune(lora_r=...)`): targets, frozen weights, adapter save/load/merge."""

import numpy as np
import pytest
import torch

from training_helpers import save_tiny_pretrained, write_tiny_dataset

pytest.importorskip("peft")


def _classifier(seed=0):
    from panfoma import PanFoMaConfig, PanFoMaForCellClassification
    from panfoma.tokenization import PanFoMaGeneProcessor

    processor = PanFoMaGeneProcessor(max_genes=64, n_bins=11)
    config = PanFoMaConfig.from_preset("panfoma-tiny", **processor.model_config_kwargs(), num_labels=3,
                                       gene_chunk_size=16)
    torch.manual_seed(seed)
    return PanFoMaForCellClassification(config).eval(), processor


def _batch(processor):
    counts = np.random.default_rng(0).poisson(2.0, (4, 40)).astype("float32") + 1
    return processor(counts, gene_names=[processor.vocab.id_to_token(i) for i in range(10, 50)])


def test_only_adapters_and_head_train_and_targets_are_the_projections():
    from panfoma.training.lora import LORA_TARGET_MODULES, apply_lora

    model, processor = _classifier()
    batch = _batch(processor)
    with torch.no_grad():
        before = model(**batch).logits
    peft_model = apply_lora(model, r=4)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or ".classifier.modules_to_save." in n for n in trainable)
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n in trainable if ".lora_A" in n}
    assert adapted == set(LORA_TARGET_MODULES)
    with torch.no_grad():  # B = 0 at initialisation: the wrapped model computes the same function
        torch.testing.assert_close(peft_model(**batch).logits, before)
    peft_model.train()
    loss = peft_model(**batch, labels=torch.tensor([0, 1, 2, 0])).loss
    loss.backward()
    grads = {n for n, p in peft_model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any("in_proj.lora_B" in n for n in grads) and any("qkv.lora_B" in n for n in grads)
    with pytest.raises(ValueError, match="--lora-r"):
        apply_lora(_classifier()[0], r=0)


def test_finetune_with_lora_saves_adapter_and_merged_model(tmp_path):
    from panfoma import PanFoMaForCellClassification
    from panfoma.training.finetune import finetune
    from panfoma.training.lora import load_lora

    pretrained = save_tiny_pretrained(tmp_path / "pretrained")
    dataset = write_tiny_dataset(tmp_path / "data")
    out = tmp_path / "lora"
    finetune(pretrained, dataset, out, max_steps=6, per_device_train_batch_size=8, learning_rate=1e-2,
             early_stopping_patience=None, lora_r=4, use_cpu=True, progress=False, split_by="cell",
             head_warmup_steps=0, warmup_ratio=0.0)  # the adapters step from step 1 (the best checkpoint may be it)
    adapter = out / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    adapter_bytes = sum(f.stat().st_size for f in adapter.iterdir())
    full_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert adapter_bytes < full_bytes / 3
    merged = PanFoMaForCellClassification.from_pretrained(out).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    # The base (pretrained backbone + a head) with the saved adapter loaded = the merged model.
    base = PanFoMaForCellClassification.from_pretrained(pretrained, id2label=merged.config.id2label,
                                                        label2id=merged.config.label2id)
    reloaded = load_lora(base, adapter).eval()
    from panfoma.tokenization import PanFoMaGeneProcessor

    batch = _batch(PanFoMaGeneProcessor.from_pretrained(out))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, merged(**batch).logits, atol=1e-4, rtol=1e-4)
    # Training changed the adapters: the saved adapter is not the zero-initialised no-op.
    from safetensors.torch import load_file

    lora_b = [w for name, w in load_file(str(adapter / "adapter_model.safetensors")).items() if "lora_B" in name]
    assert lora_b and all(float(w.abs().max()) > 0 for w in lora_b)
