"""Contract tests for every PanFoMa head and property tests for the paper's mechanisms."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForPreTraining,
    AutoModelForSequenceClassification,
)

from panfoma import (
    PanFoMaConfig,
    PanFoMaForCellClassification,
    PanFoMaForPreTraining,
    PanFoMaModel,
)
from training_helpers import CONTRACT_CONFIG
from panfoma.modeling_panfoma import (
    PanFoMaBiMambaLayer,
    compute_chunk_layout,
    flip_valid,
    sort_genes_by_score,
)


class PanFoMaModelTester:
    """A tiny config and matching random inputs for contract tests."""

    def __init__(self, **overrides):
        settings = dict(CONTRACT_CONFIG, mamba_implementation="torch")
        settings.update(overrides)
        self.config = PanFoMaConfig(**settings)

    def inputs(self, batch=3, genes=24, seed=0, n_padding=(0, 5, 11)):
        """Random cells with distinct genes per cell and trailing padding per row."""
        g = torch.Generator().manual_seed(seed)
        ids = torch.stack([torch.randperm(self.config.vocab_size - 4, generator=g)[:genes] + 4 for _ in range(batch)])
        values = torch.randint(1, self.config.n_bins, (batch, genes), generator=g)
        mask = torch.ones(batch, genes, dtype=torch.long)
        for row, pad in enumerate(n_padding[:batch]):
            if pad:
                mask[row, genes - pad :] = 0
                ids[row, genes - pad :] = self.config.pad_token_id
                values[row, genes - pad :] = self.config.value_pad_id
        return dict(input_ids=ids, values=values, attention_mask=mask)


def _model(cls, tester=None, **config_overrides):
    tester = tester or PanFoMaModelTester(**config_overrides)
    torch.manual_seed(0)
    return cls(tester.config).eval(), tester


def _valid_rows(x, mask):
    return x[mask.bool()]


# ------------------------------------------------------------------------------------------------ contracts


@pytest.mark.parametrize("cls", [PanFoMaModel, PanFoMaForPreTraining, PanFoMaForCellClassification])
def test_shapes_backward_and_tuple_output(cls):
    # Every pretraining loss term on, so every head must receive a gradient.
    tester = PanFoMaModelTester(num_labels=3, mvm_loss_weight=1.0, mse_loss_weight=0.5, mvc_loss_weight=0.5,
                                contrastive_loss_weight=0.5, target_normalization="gene")
    torch.manual_seed(0)
    model = cls(tester.config).train()
    batch = tester.inputs()
    b, n = batch["input_ids"].shape
    d = tester.config.hidden_size
    if cls is PanFoMaForPreTraining:
        labels = torch.full((b, n), -100)
        labels[:, :6] = torch.randint(0, tester.config.n_bins, (b, 6))
        batch.update(labels=labels, raw_values=torch.rand(b, n))
    elif cls is PanFoMaForCellClassification:
        batch.update(labels=torch.tensor([0, 2, -100]))
    out = model(**batch)
    if cls is PanFoMaModel:
        assert out.last_hidden_state.shape == (b, n, d)
        assert out.pooler_output.shape == (b, d)
        assert out.gene_order.shape == (b, n)
        scalar = out.pooler_output.pow(2).sum() + out.last_hidden_state.pow(2).sum()
    else:
        assert out.loss.dim() == 0 and torch.isfinite(out.loss)
        scalar = out.loss
        expected = (b, n, tester.config.n_bins) if cls is PanFoMaForPreTraining else (b, 3)
        assert out.logits.shape == expected
        with torch.no_grad():  # same random halves (contrastive term) and frozen target statistics: same loss
            model.eval()
            torch.manual_seed(1)
            as_dict = model(**batch)
            torch.manual_seed(1)
            as_tuple = model(**batch, return_dict=False)
            model.train()
        assert torch.allclose(as_tuple[0], as_dict.loss)  # loss first
    scalar.backward()
    no_grad = [name for name, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert no_grad == []


@pytest.mark.parametrize("weights", [(0.0, 1.0, 1.0), (1.0, 0.0, 0.0), (0.0, 0.0, 1.0)])
def test_pretraining_heads_of_disabled_terms_are_frozen_and_the_rest_trains(weights):
    mvm, mse, mvc = weights
    tester = PanFoMaModelTester(mvm_loss_weight=mvm, mse_loss_weight=mse, mvc_loss_weight=mvc)
    torch.manual_seed(0)
    model = PanFoMaForPreTraining(tester.config).train()
    frozen = model.freeze_unused_heads()
    batch = tester.inputs()
    b, n = batch["input_ids"].shape
    labels = torch.full((b, n), -100)
    labels[:, :6] = torch.randint(0, tester.config.n_bins, (b, 6))
    out = model(**batch, labels=labels, raw_values=torch.rand(b, n))
    assert (out.mvm_loss is None) == (mvm == 0) and (out.mse_loss is None) == (mse == 0)
    assert (out.mvc_loss is None) == (mvc == 0)
    out.loss.backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []  # DDP needs every trainable parameter to get a gradient
    assert ("mvm_decoder" in frozen) == (mvm == 0) and ("mvc_query" in frozen) == (mvc == 0)


def test_classification_ignores_minus_100():
    model, tester = _model(PanFoMaForCellClassification, num_labels=3)
    batch = tester.inputs()
    full = model(**batch, labels=torch.tensor([0, 2, 1])).logits
    loss = model(**batch, labels=torch.tensor([0, -100, 1])).loss
    expected = F.cross_entropy(full[[0, 2]], torch.tensor([0, 1]))
    assert torch.allclose(loss, expected, atol=1e-6)


def test_pretraining_loss_counts_only_masked_positions():
    model, tester = _model(PanFoMaForPreTraining, mvm_loss_weight=1.0, mse_loss_weight=0.5, mvc_loss_weight=2.0)
    batch = tester.inputs()
    b, n = batch["input_ids"].shape
    labels = torch.full((b, n), -100)
    labels[0, 3] = 4
    raw = torch.rand(b, n)
    out = model(**batch, labels=labels, raw_values=raw)
    ce = F.cross_entropy(out.logits[0, 3].unsqueeze(0), torch.tensor([4]))
    mse = (out.value_predictions[0, 3] - raw[0, 3]) ** 2
    mvc = (out.cell_predictions[0, 3] - raw[0, 3]) ** 2
    assert torch.allclose(out.loss, ce + 0.5 * mse + 2.0 * mvc, atol=1e-5)
    # Targets at unmasked positions change nothing.
    raw_elsewhere = raw.clone()
    raw_elsewhere[1:] += 5.0
    raw_elsewhere[0, :3] -= 1.0
    assert torch.allclose(model(**batch, labels=labels, raw_values=raw_elsewhere).loss, out.loss)


@pytest.mark.parametrize("cls", [PanFoMaModel, PanFoMaForPreTraining, PanFoMaForCellClassification])
def test_save_load_round_trip(tmp_path, cls):
    model, tester = _model(cls, num_labels=2, id2label={0: "tumour", 1: "normal"})
    batch = tester.inputs()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {"AutoConfig", "AutoModel", "AutoModelForPreTraining", "AutoModelForSequenceClassification"}
    loaded = cls.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        a, b = model(**batch), loaded(**batch)
    reloaded = loaded.state_dict()
    assert all(torch.equal(value, reloaded[name]) for name, value in model.state_dict().items())
    assert torch.allclose(a.pooler_output, b.pooler_output, atol=1e-6)
    if cls is PanFoMaForCellClassification:
        assert loaded.config.id2label == {0: "tumour", 1: "normal"}


def test_auto_classes(tmp_path):
    model, _ = _model(PanFoMaForPreTraining)
    model.save_pretrained(tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path)) is PanFoMaConfig
    assert type(AutoModel.from_pretrained(tmp_path)) is PanFoMaModel
    assert type(AutoModelForPreTraining.from_pretrained(tmp_path)) is PanFoMaForPreTraining
    assert type(AutoModelForSequenceClassification.from_pretrained(tmp_path)) is PanFoMaForCellClassification


def test_resolves_local_folder_and_offline_cache_by_name(tmp_path, monkeypatch):
    model, tester = _model(PanFoMaModel)
    batch = tester.inputs()
    with torch.no_grad():
        reference = model(**batch).pooler_output
    # 1) a local folder named like the hub id, in the working directory
    monkeypatch.chdir(tmp_path)
    model.save_pretrained(tmp_path / "panfoma-base")
    local = AutoModel.from_pretrained("panfoma-base").eval()
    # 2) an offline Hugging Face cache entry (models--panfoma-base/snapshots/<rev>/...)
    cache = tmp_path / "hub-cache"
    snapshot = cache / "models--panfoma-base" / "snapshots" / ("0" * 40)
    model.save_pretrained(snapshot)
    (cache / "models--panfoma-base" / "refs").mkdir(parents=True)
    (cache / "models--panfoma-base" / "refs" / "main").write_text("0" * 40)
    monkeypatch.chdir(tmp_path / "hub-cache")  # no local folder of that name here
    cached = AutoModel.from_pretrained("panfoma-base", cache_dir=cache, local_files_only=True).eval()
    with torch.no_grad():
        assert torch.allclose(local(**batch).pooler_output, reference, atol=1e-6)
        assert torch.allclose(cached(**batch).pooler_output, reference, atol=1e-6)


def test_mamba_parameters_match_mamba_ssm_names_and_shapes():
    tester = PanFoMaModelTester()
    config = tester.config
    d, e, s, r, k = config.hidden_size, 2 * config.hidden_size, config.state_size, config.time_step_rank, 4
    expected = {  # mamba_ssm.modules.mamba_simple.Mamba(d_model=d, d_state=s, d_conv=k, expand=2), bias=False
        "in_proj.weight": (2 * e, d),
        "conv1d.weight": (e, 1, k),
        "conv1d.bias": (e,),
        "x_proj.weight": (r + 2 * s, e),
        "dt_proj.weight": (e, r),
        "dt_proj.bias": (e,),
        "A_log": (e, s),
        "D": (e,),
        "out_proj.weight": (d, e),
    }
    mixer = PanFoMaModel(config).decoder_layers[0].forward_mamba
    assert {name: tuple(p.shape) for name, p in mixer.state_dict().items()} == expected
    assert mixer.A_log.dtype == torch.float32 and mixer.A_log._no_weight_decay and mixer.D._no_weight_decay


def test_ssm_parameters_stay_fp32_when_loaded_in_bf16(tmp_path):
    model, _ = _model(PanFoMaModel)
    model.save_pretrained(tmp_path)
    loaded = PanFoMaModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    mixer = loaded.decoder_layers[0].forward_mamba
    assert mixer.in_proj.weight.dtype == torch.bfloat16
    assert mixer.A_log.dtype == torch.float32 and mixer.D.dtype == torch.float32


def test_encoder_weights_are_shared_across_applications():
    small = PanFoMaModel(PanFoMaModelTester(num_encoder_layers=1).config)
    deep = PanFoMaModel(PanFoMaModelTester(num_encoder_layers=6).config)
    count = lambda m: sum(p.numel() for p in m.encoder_block.parameters())  # noqa: E731
    assert count(small) == count(deep)
    assert sum(p.numel() for p in small.parameters()) == sum(p.numel() for p in deep.parameters())


# ------------------------------------------------------------------------------------------------ mechanisms


def test_chunk_layout_is_balanced_and_covers_every_gene_once():
    lengths = torch.tensor([1, 8, 9, 20, 17])
    layout = compute_chunk_layout(lengths, n=20, max_chunk_size=8)
    for row, length in enumerate(lengths.tolist()):
        sources = layout.gather_index[row][layout.slot_mask[row]]
        assert sorted(sources.tolist()) == list(range(length))  # every gene exactly once
        per_chunk = layout.slot_mask[row].view(layout.num_chunks, layout.chunk_len).sum(1)
        used = per_chunk[per_chunk > 0]
        assert len(used) == math.ceil(length / 8)
        assert int(used.max()) <= 8 and int(used.max()) - int(used.min()) <= 1  # near-equal chunks
        # scatter_index is the inverse of gather_index
        slots = layout.scatter_index[row, :length]
        assert torch.equal(layout.gather_index[row][slots], torch.arange(length))


@pytest.mark.parametrize("value_encoding", ["scaled", "additive"])
def test_invariant_to_gene_order_within_chunks_and_to_chunk_order(value_encoding):
    model, tester = _model(PanFoMaModel, value_encoding=value_encoding)
    batch = tester.inputs(batch=1, genes=24, n_padding=(0,))  # 24 genes, chunk 8 -> 3 chunks of 8
    with torch.no_grad():
        reference = model(**batch)
    g = torch.Generator().manual_seed(1)
    within = torch.cat([torch.randperm(8, generator=g) + 8 * k for k in range(3)])
    chunks_swapped = torch.cat([torch.arange(16, 24), torch.arange(0, 8), torch.arange(8, 16)])
    for perm in (within, chunks_swapped):
        permuted = {key: value[:, perm] for key, value in batch.items()}
        with torch.no_grad():
            out = model(**permuted)
        assert torch.allclose(out.pooler_output, reference.pooler_output, atol=1e-5)
        # per-gene states follow their genes
        assert torch.allclose(out.last_hidden_state[:, :], reference.last_hidden_state[:, perm], atol=1e-5)
        # the decoder saw the same genes in the same order
        genes = lambda o, b: b["input_ids"].gather(1, o.gene_order)  # noqa: E731
        assert torch.equal(genes(out, permuted), genes(reference, batch))


@pytest.mark.parametrize("value_encoding", ["scaled", "additive"])
def test_padding_does_not_change_a_cell(value_encoding):
    model, tester = _model(PanFoMaModel, value_encoding=value_encoding)
    batch = tester.inputs(batch=3, genes=30, n_padding=(0, 7, 19))
    with torch.no_grad():
        together = model(**batch)
        for row in range(3):
            n_valid = int(batch["attention_mask"][row].sum())
            alone = model(**{k: v[row : row + 1, :n_valid] for k, v in batch.items()})
            assert torch.allclose(together.pooler_output[row], alone.pooler_output[0], atol=1e-5)
            assert torch.allclose(together.last_hidden_state[row, :n_valid], alone.last_hidden_state[0], atol=1e-5)
            if n_valid < batch["input_ids"].size(1):
                assert together.last_hidden_state[row, n_valid:].abs().max() == 0


def test_padding_in_the_middle_is_handled_by_the_mask():
    model, tester = _model(PanFoMaModel)
    batch = tester.inputs(batch=1, genes=20, n_padding=(0,))
    holes = {k: torch.cat([v[:, :10], torch.zeros_like(v[:, :4]), v[:, 10:]], dim=1) for k, v in batch.items()}
    holes["values"][:, 10:14] = tester.config.value_pad_id
    with torch.no_grad():
        a, b = model(**batch), model(**holes)
    assert torch.allclose(a.pooler_output, b.pooler_output, atol=1e-5)
    assert set(b.gene_order[0, -4:].tolist()) == {10, 11, 12, 13}  # padding sorted last


def test_gene_order_sorts_by_score_with_padding_last():
    model, tester = _model(PanFoMaModel)
    batch = tester.inputs()
    with torch.no_grad():
        out = model(**batch)
        # recompute eq. 3-4 independently from the encoder output and g
        scores = torch.einsum("bnd,bd->bn", out.encoder_last_hidden_state, out.global_cls)
    for row in range(batch["input_ids"].size(0)):
        n_valid = int(batch["attention_mask"][row].sum())
        order = out.gene_order[row]
        sorted_scores = scores[row, order[:n_valid]]
        assert (sorted_scores[:-1] >= sorted_scores[1:] - 1e-6).all()
        assert set(order[n_valid:].tolist()) == set(range(n_valid, batch["input_ids"].size(1)))
        assert torch.allclose(out.gene_scores[row, :n_valid], scores[row, :n_valid], atol=1e-5)


def test_sort_ties_break_on_gene_id_whatever_the_input_order():
    scores = torch.tensor([[1.0, 2.0, 1.0, 2.0, 0.0]])
    ids = torch.tensor([[9, 7, 5, 8, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    order, masked = sort_genes_by_score(scores, ids, mask)
    assert ids[0, order[0]].tolist() == [7, 8, 5, 9, 0]
    assert masked[0, 4] == float("-inf")
    perm = torch.tensor([2, 0, 3, 1, 4])
    order_p, _ = sort_genes_by_score(scores[:, perm], ids[:, perm], mask[:, perm])
    assert ids[0, perm][order_p[0]].tolist() == [7, 8, 5, 9, 0]


def test_flip_valid_reverses_only_the_valid_prefix():
    x = torch.arange(12.0).view(2, 6)
    lengths = torch.tensor([4, 6])
    flipped = flip_valid(x, lengths)
    assert flipped.tolist() == [[3.0, 2.0, 1.0, 0.0, 4.0, 5.0], [11.0, 10.0, 9.0, 8.0, 7.0, 6.0]]
    assert torch.equal(flip_valid(flipped, lengths), x)


def test_backward_direction_ignores_padding():
    tester = PanFoMaModelTester()
    torch.manual_seed(0)
    layer = PanFoMaBiMambaLayer(tester.config).eval()
    x = torch.randn(1, 9, tester.config.hidden_size)
    padded = torch.cat([x, torch.randn(1, 5, tester.config.hidden_size)], dim=1)
    with torch.no_grad():
        alone = layer(x, torch.tensor([9]), torch.ones(1, 9, dtype=torch.bool))
        valid = torch.zeros(1, 14, dtype=torch.bool)
        valid[:, :9] = True
        with_padding = layer(padded, torch.tensor([9]), valid)
        # and the backward mixer really reads the row in reverse: its output at position 0 depends on the last gene
        x_changed = x.clone()
        x_changed[:, -1] += torch.randn(tester.config.hidden_size)  # not a constant shift: LayerNorm removes those
        changed = layer(x_changed, torch.tensor([9]), torch.ones(1, 9, dtype=torch.bool))
    assert torch.allclose(alone, with_padding[:, :9], atol=1e-6)
    assert (changed[0, 0] - alone[0, 0]).abs().max() > 1e-6


def test_every_layer_changes_its_input():
    model, tester = _model(PanFoMaModel)
    batch = tester.inputs()
    records = []

    def hook(module, args, output):
        before = args[0]
        after = output[0] if isinstance(output, tuple) else output
        records.append((type(module).__name__, (after - before).abs().mean().item(), before.abs().mean().item()))

    handles = [model.encoder_block.register_forward_hook(hook)]
    handles += [layer.register_forward_hook(hook) for layer in model.decoder_layers]
    handles += [layer.forward_mamba.register_forward_hook(lambda m, a, o: records.append(("fwd", o.abs().mean().item(), 1)))
                for layer in model.decoder_layers]
    handles += [layer.backward_mamba.register_forward_hook(lambda m, a, o: records.append(("bwd", o.abs().mean().item(), 1)))
                for layer in model.decoder_layers]
    with torch.no_grad():
        model(**batch)
    for handle in handles:
        handle.remove()
    expected = tester.config.num_encoder_layers + 3 * tester.config.num_mamba_layers
    assert len(records) == expected
    for name, change, scale in records:
        assert change > 1e-3 * max(scale, 1e-3), (name, change, scale)


def _fusion_layer(gate_bias: float | None = None):
    """A BSGF layer; with `gate_bias` the gate is constant: gamma = sigmoid(gate_bias) for every gene and channel."""
    tester = PanFoMaModelTester()
    torch.manual_seed(0)
    layer = PanFoMaBiMambaLayer(tester.config).eval()
    if gate_bias is not None:
        with torch.no_grad():
            layer.gate.weight.zero_()
            layer.gate.bias.fill_(gate_bias)
    return layer, tester.config.hidden_size


def _perturbed(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.5 * torch.randn_like(parameter))


def _influence_of_gene(layer, x, lengths, valid, gene: int) -> torch.Tensor:
    """Per position, how much the layer's output moves when the input of one gene changes (that gene excluded)."""
    moved = x.clone()
    # A random direction: a constant shift of every channel would be removed by the layer's LayerNorm.
    moved[:, gene] += torch.randn(x.size(-1), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        delta = (layer(moved, lengths, valid) - layer(x, lengths, valid)).abs().amax(-1)[0]  # (l,)
    delta[gene] = float("nan")
    return delta


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_the_gate_selects_a_direction_that_reads_its_own_side(direction):
    """Eq. 6 at the gate's extremes: gamma = 1 keeps only the forward Mamba (each sorted gene sees the genes before
    it), gamma = 0 only the backward Mamba over the valid genes (each sees the genes after it, padding excluded)."""
    layer, d = _fusion_layer(30.0 if direction == "forward" else -30.0)
    torch.manual_seed(1)
    x = torch.randn(1, 9, d)
    lengths, valid = torch.tensor([7]), (torch.arange(9) < 7)[None]  # 7 genes, 2 padding slots
    with torch.no_grad():
        before = layer(x, lengths, valid)
        _perturbed(layer.backward_mamba if direction == "forward" else layer.forward_mamba)  # the unused direction
        assert torch.allclose(layer(x, lengths, valid), before, atol=1e-6)
    influence = _influence_of_gene(layer, x, lengths, valid, gene=3)
    earlier, later = influence[:3], influence[4:7]
    if direction == "forward":
        assert earlier.max() < 1e-6 and later.min() > 1e-4
    else:
        assert later.max() < 1e-6 and earlier.min() > 1e-4
    torch.testing.assert_close(before[0, 7:], x[0, 7:])  # padding slots pass through unchanged


def test_gated_fusion_mixes_both_directions():
    """With the learned gate, both mixers shape the output and a gene informs the genes on both sides of it."""
    layer, d = _fusion_layer()
    torch.manual_seed(1)
    x = torch.randn(1, 9, d)
    lengths, valid = torch.tensor([9]), torch.ones(1, 9, dtype=torch.bool)
    influence = _influence_of_gene(layer, x, lengths, valid, gene=4)
    assert influence[1:4].min() > 1e-4 and influence[5:8].min() > 1e-4  # neighbours on both sides
    with torch.no_grad():
        before = layer(x, lengths, valid)
        for mixer in (layer.forward_mamba, layer.backward_mamba):
            _perturbed(mixer)
            after = layer(x, lengths, valid)
            assert (after - before).abs().max() > 1e-4
            before = after


def _plain_mamba(mixer, x):
    """Mamba-1 written out step by step from the paper (independent of panfoma.selective_scan)."""
    b, l, _ = x.shape
    xz = x @ mixer.in_proj.weight.t()
    u, z = xz.chunk(2, dim=-1)  # (b, l, e)
    k = mixer.conv1d.weight.shape[-1]
    u_pad = F.pad(u.transpose(1, 2), (k - 1, 0))  # causal: left padding
    conv = torch.stack(
        [(u_pad[:, :, t : t + k] * mixer.conv1d.weight[:, 0]).sum(-1) + mixer.conv1d.bias for t in range(l)], dim=1
    )
    u = F.silu(conv)  # (b, l, e)
    dt, B, C = torch.split(u @ mixer.x_proj.weight.t(), [mixer.dt_rank, mixer.d_state, mixer.d_state], dim=-1)
    dt = F.softplus(dt @ mixer.dt_proj.weight.t() + mixer.dt_proj.bias)  # (b, l, e)
    A = -torch.exp(mixer.A_log)
    h = torch.zeros(b, mixer.d_inner, mixer.d_state)
    ys = []
    for t in range(l):
        h = torch.exp(dt[:, t, :, None] * A) * h + dt[:, t, :, None] * B[:, t, None, :] * u[:, t, :, None]
        ys.append((h * C[:, t, None, :]).sum(-1) + mixer.D * u[:, t])
    y = torch.stack(ys, dim=1) * F.silu(z)
    return y @ mixer.out_proj.weight.t()


@pytest.mark.parametrize("length", [1, 5, 33])
def test_mixer_equals_plain_mamba(length):
    tester = PanFoMaModelTester(mamba_implementation="auto")
    torch.manual_seed(0)
    mixer = PanFoMaModel(tester.config).decoder_layers[0].forward_mamba
    x = torch.randn(2, length, tester.config.hidden_size)
    with torch.no_grad():
        assert torch.allclose(mixer(x), _plain_mamba(mixer, x), atol=1e-5)


def test_any_number_of_genes():
    model, tester = _model(PanFoMaModel)
    for genes in (1, 7, 8, 9, 45):
        batch = tester.inputs(batch=2, genes=genes, n_padding=(0, 0))
        with torch.no_grad():
            out = model(**batch)
        assert out.pooler_output.shape == (2, tester.config.hidden_size)
        assert torch.isfinite(out.pooler_output).all()


def test_hidden_states_and_attentions():
    tester = PanFoMaModelTester()
    torch.manual_seed(0)
    model = PanFoMaModel(tester.config).eval()
    batch = tester.inputs()
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True, output_attentions=True)
        plain = model(**batch)
    assert len(out.hidden_states) == 1 + tester.config.num_encoder_layers + tester.config.num_mamba_layers
    assert len(out.attentions) == tester.config.num_encoder_layers
    attn = out.attentions[0]  # (b, c, h, m+1, m+1)
    assert attn.shape[2] == tester.config.num_attention_heads
    assert torch.allclose(attn.sum(-1), torch.ones_like(attn.sum(-1)), atol=1e-5)
    # eager attention (needed for weights) agrees with SDPA
    assert torch.allclose(out.pooler_output, plain.pooler_output, atol=1e-5)
    # the row with 11 padded genes: no attention mass on empty slots (19 genes -> 3 chunks of 7, 7, 5)
    assert attn[2, 2, :, :, 6:].abs().max() < 1e-6


def test_gradient_checkpointing_gives_the_same_gradients():
    tester = PanFoMaModelTester()
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = PanFoMaForCellClassification(PanFoMaConfig(**{**tester.config.to_dict(), "num_labels": 2})).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        model(**tester.inputs(), labels=torch.tensor([0, 1, 1])).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_bf16_autocast_on_cpu_is_close_to_fp32():
    model, tester = _model(PanFoMaModel)
    batch = tester.inputs()
    with torch.no_grad():
        fp32 = model(**batch).pooler_output
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(**batch).pooler_output
    assert torch.isfinite(bf16).all()
    assert F.cosine_similarity(fp32, bf16.float()).min() > 0.98


def test_weighted_mean_pooling_weighs_genes_by_their_expression_bin():
    model, tester = _model(PanFoMaModel, pooling="weighted_mean")
    batch = tester.inputs(batch=1, n_padding=(0,))
    plain, _ = _model(PanFoMaModel, pooling="mean")
    plain.load_state_dict(model.state_dict())  # same weights, plain mean pooling
    same_bin = dict(batch, values=torch.full_like(batch["values"], 5))
    with torch.no_grad():
        # Every gene in the same bin: equal weights, so the weighted mean is the plain mean.
        assert torch.allclose(model(**same_bin).pooler_output, plain(**same_bin).pooler_output, atol=1e-5)
        # Different bins: the pooled vector leans towards the states of the highly expressed genes.
        out = model(**batch)
        states, bins = out.last_hidden_state[0], batch["values"][0]
        high, low = states[bins >= 7].mean(0), states[bins <= 3].mean(0)
        shift = out.pooler_output[0] - plain(**batch).pooler_output[0]
        assert torch.dot(shift, high - low) > 0
    weights = model.embeddings.value_weights(torch.arange(1, tester.config.n_bins))
    assert torch.all(weights[1:] > weights[:-1])  # initialised increasing with the bin


def test_pooling_modes_compose_and_read_the_states_they_name():
    """Properties rather than a second implementation: the combined modes are the average of their parts, "cls" reads
    the encoder's global CLS only (decoder weights cannot move it, eq. 3), every mean mode reads the decoder states of
    the valid genes (a convex combination: inside their per-channel range)."""
    tester = PanFoMaModelTester()
    batch = tester.inputs()
    modes = ("cls", "mean", "weighted_mean", "cls+mean", "cls+weighted_mean")
    models = {mode: _model(PanFoMaModel, pooling=mode)[0] for mode in modes}
    for model in models.values():
        model.load_state_dict(models["cls"].state_dict())
    with torch.no_grad():
        out = {mode: model(**batch) for mode, model in models.items()}
    pooled = {mode: o.pooler_output for mode, o in out.items()}
    torch.testing.assert_close(pooled["cls+mean"], 0.5 * (pooled["cls"] + pooled["mean"]))
    torch.testing.assert_close(pooled["cls+weighted_mean"], 0.5 * (pooled["cls"] + pooled["weighted_mean"]))
    assert not torch.allclose(pooled["mean"], pooled["weighted_mean"], atol=1e-4)  # different bins, other weights

    mask = batch["attention_mask"].bool()
    states = out["mean"].last_hidden_state
    for row in range(states.size(0)):
        valid_states = states[row][mask[row]]  # (genes, d)
        for mode in ("mean", "weighted_mean"):
            assert torch.all(pooled[mode][row] >= valid_states.min(0).values - 1e-6)
            assert torch.all(pooled[mode][row] <= valid_states.max(0).values + 1e-6)

    torch.manual_seed(1)
    for model in models.values():
        torch.manual_seed(1)
        for layer in model.decoder_layers:
            _perturbed(layer)
    with torch.no_grad():
        moved = {mode: model(**batch).pooler_output for mode, model in models.items()}
    torch.testing.assert_close(moved["cls"], pooled["cls"])
    for mode in modes[1:]:
        assert (moved[mode] - pooled[mode]).abs().max() > 1e-4, mode


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_inputs_raise_clear_errors():
    model, tester = _model(PanFoMaModel)
    batch = tester.inputs()
    with pytest.raises(ValueError, match="input_ids.*values"):
        model(input_ids=batch["input_ids"])
    with pytest.raises(ValueError, match="shape"):
        model(input_ids=batch["input_ids"], values=batch["values"][:, :-1])
    with pytest.raises(ValueError, match="gene ids must lie"):
        model(input_ids=batch["input_ids"] + 1000, values=batch["values"])
    with pytest.raises(ValueError, match="value bins"):
        model(input_ids=batch["input_ids"], values=batch["values"] + 100)
    empty_mask = batch["attention_mask"].clone()
    empty_mask[1] = 0
    with pytest.raises(ValueError, match="at least one gene"):
        model(**{**batch, "attention_mask": empty_mask})


def test_bad_config_values():
    with pytest.raises(ValueError, match="divisible"):
        PanFoMaConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="pooling"):
        PanFoMaConfig(pooling="max")
    with pytest.raises(ValueError, match="mamba_implementation"):
        PanFoMaConfig(mamba_implementation="cuda")
    with pytest.raises(ValueError, match="preset"):
        PanFoMaConfig.from_preset("panfoma-huge")


def test_kernel_implementation_without_mamba_ssm_says_how_to_install():
    try:
        import mamba_ssm  # noqa: F401

        pytest.skip("mamba-ssm is installed")
    except ImportError:
        pass
    model, tester = _model(PanFoMaModel, mamba_implementation="kernel")
    with pytest.raises(ImportError, match=r"panfoma\[kernels\]"):
        model(**tester.inputs())


@pytest.mark.gpu
def test_kernel_path_matches_torch_path_on_gpu():
    pytest.importorskip("mamba_ssm")
    tester = PanFoMaModelTester(mamba_implementation="kernel")
    torch.manual_seed(0)
    model = PanFoMaModel(tester.config).cuda().eval()
    batch = {k: v.cuda() for k, v in tester.inputs().items()}
    with torch.no_grad():
        kernel = model(**batch).pooler_output
        model.config.mamba_implementation = "torch"
        reference = model(**batch).pooler_output
    assert torch.allclose(kernel, reference, atol=1e-3)
