"""The zoo: listing and creating models through timm, the metadata table, MambaOut's official checkpoint layout."""
from pathlib import Path

import pytest
import torch
from timm.models import model_entrypoint

import mambazoo
from mambazoo.checkpoint import CheckpointMismatchError
from mambazoo.zoo import MODEL_INFO, load_official_mambaout_state_dict, metadata_table, model_info
from official_keys import read_mambaout_sections

KEYS_FILE = Path(__file__).parent / "data" / "keys_mambaout_femto.txt"  # official femto key list (docs/mambaout.md)
MAMBAOUT = ["mambaout_femto", "mambaout_kobe", "mambaout_tiny", "mambaout_small", "mambaout_base"]


def test_list_models_has_timm_mambaout_and_only_zoo_models() -> None:
    names = mambazoo.list_models()
    assert set(MAMBAOUT + ["test_mambaout"]) <= set(names)
    assert "deit_tiny_patch16_224" not in names and "resnet50" not in names
    for name in names:
        module = model_entrypoint(name).__module__
        assert module.startswith("mambazoo.models.") or module == "timm.models.mambaout", name


def test_list_models_pattern_and_pretrained_tags() -> None:
    assert mambazoo.list_models("mambaout_[fk]*") == ["mambaout_femto", "mambaout_kobe"]
    assert mambazoo.list_models("no_such_*") == []
    assert "mambaout_femto.in1k" in mambazoo.list_models("mambaout_femto*", pretrained=True)
    with pytest.raises(TypeError, match="pattern"):
        mambazoo.list_models(3)


def test_every_registered_family_has_a_test_variant() -> None:
    names = mambazoo.list_models()
    families = {info.family for info in MODEL_INFO.values() if info.name in names}
    for family in families:
        assert f"test_{family}" in names, family


def test_create_model_builds_zoo_and_timm_models() -> None:
    model = mambazoo.create_model("test_mambaout", num_classes=7)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    with torch.device("meta"):
        assert mambazoo.create_model("deit_tiny_patch16_224").num_classes == 1000


def test_create_model_rejects_bad_names() -> None:
    with pytest.raises(ValueError, match="unknown model name 'mambaout_femtoo'.*mambaout_femto"):
        mambazoo.create_model("mambaout_femtoo")
    with pytest.raises(TypeError, match="model name must be a string"):
        mambazoo.create_model(None)


def _parameter_count(name: str) -> int:
    try:
        with torch.device("meta"):
            model = mambazoo.create_model(name)
    except (NotImplementedError, RuntimeError):  # constructors that read tensor values cannot run on meta
        model = mambazoo.create_model(name)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(MODEL_INFO))
def test_metadata_parameter_counts_match_registered_models(name: str) -> None:
    if name not in mambazoo.list_models():
        pytest.skip(f"{name} not registered (family not landed)")
    assert _parameter_count(name) == MODEL_INFO[name].params


def test_metadata_table_rows_and_licences() -> None:
    rows = metadata_table()
    assert {row["name"] for row in rows} == set(MODEL_INFO)
    assert {"paper", "top1", "params", "reported_gmacs", "weights", "license", "source", "registered"} <= set(rows[0])
    assert all(row["registered"] for row in metadata_table(registered_only=True))
    assert "non-commercial" in model_info("mambavision_t").license
    assert model_info("mambaout_femto.in1k").top1 == 78.9
    with pytest.raises(ValueError, match="no metadata for 'resnet50'"):
        model_info("resnet50")


def _key_sections() -> tuple[list[tuple[str, tuple]], list[tuple[str, tuple]]]:
    """(official keys, timm keys) with shapes, parsed from the official key list."""
    return read_mambaout_sections(KEYS_FILE.name)


def _official_state_dict() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {key: torch.randn(shape, generator=generator) for key, shape in _key_sections()[0]}


def test_key_list_is_the_official_femto_layout() -> None:
    official, timm_names = _key_sections()
    assert len(official) == len(timm_names) == 172
    assert sum(torch.Size(shape).numel() for _, shape in official) == 7_304_536  # header: total params 7304536


def test_official_mambaout_state_dict_loads_strictly_into_timm_model() -> None:
    state_dict = _official_state_dict()
    model = mambazoo.create_model("mambaout_femto")
    result = load_official_mambaout_state_dict(model, state_dict)
    assert not result.missing_keys and not result.unexpected_keys
    loaded = model.state_dict()
    assert [(k, tuple(v.shape)) for k, v in loaded.items()] == _key_sections()[1]  # the listed timm names, in order
    torch.testing.assert_close(loaded["stem.conv1.weight"], state_dict["downsample_layers.0.conv1.weight"])
    torch.testing.assert_close(loaded["stages.2.blocks.8.fc2.bias"], state_dict["stages.2.8.fc2.bias"])
    torch.testing.assert_close(loaded["head.pre_logits.norm.weight"], state_dict["head.norm.weight"])
    torch.testing.assert_close(loaded["head.norm.weight"], state_dict["norm.weight"])
    torch.testing.assert_close(loaded["head.fc.weight"], state_dict["head.fc2.weight"])


def test_official_mambaout_file_loads_through_timms_pretrained_path(tmp_path: Path) -> None:
    path = tmp_path / "mambaout_femto.pth"
    state_dict = _official_state_dict()
    torch.save(state_dict, path)
    model = mambazoo.create_model("mambaout_femto", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                                  num_classes=10)
    assert model.head.fc.out_features == 10  # the classifier is dropped for another class count, as timm does
    torch.testing.assert_close(model.stages[3].blocks[2].conv.weight, state_dict["stages.3.2.conv.weight"])


def test_official_state_dict_with_a_wrong_shape_fails_loudly() -> None:
    state_dict = _official_state_dict()
    state_dict["stages.0.0.fc1.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointMismatchError, match=r"stages.0.blocks.0.fc1.weight: checkpoint \(3, 3\) vs model"):
        load_official_mambaout_state_dict(mambazoo.create_model("mambaout_femto"), state_dict)


def test_metadata_of_registered_families_cites_docs_in_the_repository() -> None:
    root = Path(__file__).resolve().parents[1]
    for row in metadata_table(registered_only=True):
        assert row["source"].startswith("docs/") and (root / row["source"]).is_file(), row["name"]
