"""Modules behave as modules: the Mamba mixer's projections honour hooks and adapters at every batch size, the mixer
initialises itself in one rule, and the classification head follows `config.problem_type` like BERT."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from panfoma import PanFoMaConfig, PanFoMaForCellClassification, PanFoMaModel
from panfoma.modeling_panfoma import PanFoMaMambaMixer
from training_helpers import CONTRACT_CONFIG

PROJECTIONS = ("in_proj", "x_proj", "dt_proj", "out_proj")


def tiny_config(**overrides) -> PanFoMaConfig:
    return PanFoMaConfig(**{**CONTRACT_CONFIG, **overrides})


def cells(config: PanFoMaConfig, batch: int = 8, genes: int = 20, seed: int = 0) -> dict:
    """`batch` cells of `genes` distinct genes each (no padding, so batching is the only difference)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(config.vocab_size - 4, generator=generator)[:genes] + 4 for _ in range(batch)])
    values = torch.randint(1, config.n_bins, (batch, genes), generator=generator)
    return dict(input_ids=ids, values=values, attention_mask=torch.ones(batch, genes, dtype=torch.long))


def mixers(model: nn.Module) -> list:
    return [module for module in model.modules() if isinstance(module, PanFoMaMambaMixer)]


def embed_alone_and_batched(model: nn.Module, inputs: dict) -> tuple:
    """(per-gene states, cell embeddings) of the whole batch at once, and of each cell run alone, stacked."""
    with torch.no_grad():
        batched = model(**inputs)
        count = len(inputs["values"])
        alone = [model(**{key: value[i : i + 1] for key, value in inputs.items()}) for i in range(count)]
    return (
        (batched.last_hidden_state, batched.pooler_output),
        (torch.cat([o.last_hidden_state for o in alone]), torch.cat([o.pooler_output for o in alone])),
    )


def assert_takes_effect_at_every_batch_size(model, inputs, plain):
    """The modified model differs from `plain` (its outputs without the modification), and each cell's outputs are
    the same whether it is run alone or in a batch of 8."""
    (states, pooled), (states_alone, pooled_alone) = embed_alone_and_batched(model, inputs)
    torch.testing.assert_close(states_alone, states, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pooled_alone, pooled, rtol=1e-4, atol=1e-5)
    plain_states, plain_pooled = plain
    # Every cell changed, by more than float noise (~1e-7); the per-gene states by more than the tolerance above.
    assert (states - plain_states).abs().amax(dim=(1, 2)).min() > 1e-4
    assert (pooled - plain_pooled).abs().amax(dim=1).min() > 1e-6


@pytest.fixture(scope="module")
def model_and_inputs():
    config = tiny_config()
    torch.manual_seed(0)
    model = PanFoMaModel(config).eval()
    inputs = cells(config)
    with torch.no_grad():
        out = model(**inputs)
    return model, inputs, (out.last_hidden_state, out.pooler_output)


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_forward_hook_on_projection_changes_output_identically_at_batch_1_and_8(model_and_inputs, projection):
    model, inputs, plain = model_and_inputs
    handles = [
        getattr(mixer, projection).register_forward_hook(lambda module, args, output: output * 2.0 + 0.5)
        for mixer in mixers(model)
    ]
    try:
        assert_takes_effect_at_every_batch_size(model, inputs, plain)
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():  # and removing the hooks restores the model
        torch.testing.assert_close(model(**inputs).last_hidden_state, plain[0])


class LowRankAdapted(nn.Module):
    """A LoRA-style wrapper: base(x) + scale * up(down(x)), with both factors random so that it changes the output."""

    def __init__(self, base: nn.Linear, rank: int = 2, scale: float = 0.5):
        super().__init__()
        self.base = base
        self.down = nn.Linear(base.in_features, rank, bias=False)
        self.up = nn.Linear(rank, base.out_features, bias=False)
        self.scale = scale

    def forward(self, x):
        return self.base(x) + self.scale * self.up(self.down(x))


def test_low_rank_adapter_takes_effect_and_trains_at_batch_1_and_8(model_and_inputs):
    model, inputs, plain = model_and_inputs
    originals = {}
    torch.manual_seed(1)
    for mixer in mixers(model):
        for name in ("in_proj", "out_proj"):
            originals[mixer, name] = getattr(mixer, name)
            setattr(mixer, name, LowRankAdapted(getattr(mixer, name)))
    try:
        assert_takes_effect_at_every_batch_size(model, inputs, plain)
        adapter = mixers(model)[0].in_proj
        model(**inputs).pooler_output.pow(2).sum().backward()
        assert adapter.down.weight.grad is not None and adapter.down.weight.grad.abs().sum() > 0
        assert mixers(model)[-1].out_proj.up.weight.grad.abs().sum() > 0
    finally:
        for (mixer, name), module in originals.items():
            setattr(mixer, name, module)
        model.zero_grad(set_to_none=True)


def test_peft_lora_on_mixer_projections_at_batch_1_and_8():
    peft = pytest.importorskip("peft", reason="optional: pip install peft")
    config = tiny_config()
    torch.manual_seed(0)
    model = PanFoMaModel(config).eval()
    inputs = cells(config, seed=3)
    with torch.no_grad():
        out = model(**inputs)
    plain = (out.last_hidden_state, out.pooler_output)
    lora = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=r".*_mamba\.(in_proj|x_proj|dt_proj|out_proj)", init_lora_weights=False
    )
    peft_model = peft.get_peft_model(model, lora).eval()
    adapted = [name for name, module in peft_model.named_modules() if isinstance(module, peft.tuners.lora.LoraLayer)]
    assert len(adapted) == 4 * 2 * config.num_mamba_layers  # 4 projections, forward and backward mixer per layer
    assert_takes_effect_at_every_batch_size(peft_model, inputs, plain)
    with peft_model.disable_adapter(), torch.no_grad():
        torch.testing.assert_close(peft_model(**inputs).last_hidden_state, plain[0])


# ------------------------------------------------------------------------------------------------ initialisation


def test_mixer_on_its_own_is_initialised_like_mamba():
    config = tiny_config()
    torch.manual_seed(0)
    mixer = PanFoMaMambaMixer(config)
    s = config.state_size
    torch.testing.assert_close(mixer.A_log, torch.log(torch.arange(1, s + 1.0)).expand(mixer.d_inner, s))
    torch.testing.assert_close(mixer.D, torch.ones(mixer.d_inner))
    dt = F.softplus(mixer.dt_proj.bias)
    assert config.time_step_min * 0.999 <= dt.min() and dt.max() <= config.time_step_max * 1.001
    y = mixer(torch.randn(2, 9, config.hidden_size))
    assert y.shape == (2, 9, config.hidden_size) and torch.isfinite(y).all()
    with torch.device("meta"):  # built without values, as from_pretrained does
        assert PanFoMaMambaMixer(config).A_log.is_meta


def test_model_init_keeps_the_mixer_rule_over_the_generic_linear_init():
    """PreTrainedModel's generic init (0.02-normal Linear weights) runs on the mixer's children first; the mixer's own
    rule (Kaiming-uniform projections, Mamba's dt) must be what stays."""
    config = tiny_config()
    torch.manual_seed(0)
    model = PanFoMaModel(config)
    for mixer in mixers(model):
        bound = config.hidden_size**-0.5  # Kaiming-uniform(a=sqrt(5)) bound for fan_in = d
        assert mixer.in_proj.weight.abs().max() <= bound and mixer.in_proj.weight.std() > 0.4 * bound
        dt = F.softplus(mixer.dt_proj.bias)
        assert config.time_step_min * 0.999 <= dt.min() and dt.max() <= config.time_step_max * 1.001
        torch.testing.assert_close(mixer.D, torch.ones(mixer.d_inner))


# ------------------------------------------------------------------------------------------------ problem_type


def classifier(num_labels: int, problem_type=None):
    torch.manual_seed(0)
    return PanFoMaForCellClassification(tiny_config(num_labels=num_labels, problem_type=problem_type)).eval()


def test_regression_inferred_for_one_label():
    model = classifier(1)
    inputs = cells(model.config, batch=4)
    labels = torch.tensor([0.5, -1.0, 2.0, 3.0])
    out = model(**inputs, labels=labels)
    torch.testing.assert_close(out.loss, F.mse_loss(out.logits.squeeze(-1), labels))


def test_single_label_inferred_from_integer_labels_ignores_minus_100():
    model = classifier(3)
    inputs = cells(model.config, batch=4)
    labels = torch.tensor([0, 2, -100, 1])
    out = model(**inputs, labels=labels)
    kept = labels != -100
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits[kept], labels[kept]))
    out.loss.backward()


def test_multi_label_inferred_from_float_labels_and_set_explicitly():
    inputs = None
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.0, 1.0, -100.0]])
    for problem_type in (None, "multi_label_classification"):
        model = classifier(3, problem_type)
        inputs = inputs or cells(model.config, batch=4)
        out = model(**inputs, labels=labels)
        kept = labels != -100
        torch.testing.assert_close(out.loss, F.binary_cross_entropy_with_logits(out.logits[kept], labels[kept]))
    # integer 0/1 labels are multi-label too when the config says so (inference alone would pick single-label)
    out_int = model(**inputs, labels=labels.clamp(min=0).long())
    torch.testing.assert_close(
        out_int.loss, F.binary_cross_entropy_with_logits(out_int.logits, labels.clamp(min=0))
    )


def test_explicit_regression_with_several_targets():
    model = classifier(2, "regression")
    inputs = cells(model.config, batch=3)
    labels = torch.randn(3, 2)
    out = model(**inputs, labels=labels)
    torch.testing.assert_close(out.loss, F.mse_loss(out.logits, labels))
    assert model.config.problem_type == "regression"


def test_problem_type_is_not_written_by_a_forward_pass():
    model = classifier(3)
    model(**cells(model.config, batch=2), labels=torch.tensor([0, 1]))
    assert model.config.problem_type is None


# ------------------------------------------------------------------------------------------------ remote code


def test_saved_folder_runs_the_numba_scan_as_remote_code(tmp_path):
    """save_pretrained copies every model source, the lazily imported numba kernels included, and a process without
    the package loads the folder with trust_remote_code and runs the numba scan from the copied files."""
    model = classifier(2)
    model.save_pretrained(tmp_path / "ckpt")
    assert {"configuration_panfoma.py", "modeling_panfoma.py", "selective_scan.py", "_numba_scan.py"} <= {
        path.name for path in (tmp_path / "ckpt").iterdir()
    }
    inputs = cells(model.config, batch=2)
    with torch.no_grad():
        torch.save({"inputs": inputs, "logits": model(**inputs).logits}, tmp_path / "ref.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["panfoma"] = None  # the package is not importable in this process
        import torch
        from transformers import AutoModelForSequenceClassification
        ref = torch.load({str(tmp_path / "ref.pt")!r})
        model = AutoModelForSequenceClassification.from_pretrained({str(tmp_path / "ckpt")!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        with torch.no_grad():
            logits = model.eval()(**ref["inputs"]).logits
        assert torch.allclose(logits, ref["logits"], atol=1e-6), (logits, ref["logits"])
        print(sorted(name.rsplit(".", 1)[-1] for name in sys.modules if name.startswith("transformers_modules")))
        """
    )
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "'_numba_scan'" in result.stdout.splitlines()[-1], result.stdout
