"""A size-preset name is not a checkpoint: `from_pretrained("panfoma-base")` fails at once with the fix."""

import pytest

from panfoma import PanFoMaConfig, PanFoMaForCellClassification, PanFoMaModel


@pytest.mark.parametrize("load", [PanFoMaModel.from_pretrained, PanFoMaForCellClassification.from_pretrained,
                                  PanFoMaConfig.from_pretrained])
def test_preset_name_is_refused_before_any_hub_lookup(load, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # online: the Hub would otherwise be tried, with retries
    with pytest.raises(OSError, match="no pretrained PanFoMa weights are published") as error:
        load("panfoma-base")
    assert "PanFoMaConfig.from_preset('panfoma-base')" in str(error.value)


def test_a_local_folder_named_like_a_preset_still_loads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = PanFoMaConfig.from_preset("panfoma-tiny", vocab_size=40)
    PanFoMaModel(config).save_pretrained("panfoma-tiny")
    assert PanFoMaModel.from_pretrained("panfoma-tiny").config.vocab_size == 40
