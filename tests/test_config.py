"""gen3d.config.read_yaml_config: the one YAML reader behind every load_*config."""
from __future__ import annotations

import pytest

from distill.student import load_student_config
from gen3d.config import read_yaml_config


def test_reads_mappings_and_names_the_file_in_every_error(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("model: {width: 8}\ndescription: x\n")
    assert read_yaml_config(good, {"model", "description"}) == {"model": {"width": 8}, "description": "x"}
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert read_yaml_config(empty) == {}
    with pytest.raises(FileNotFoundError, match="none.yaml"):
        read_yaml_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ValueError, match="bad.yaml: not valid YAML"):
        read_yaml_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="list.yaml: expected a mapping"):
        read_yaml_config(listy)
    with pytest.raises(ValueError, match=r"good.yaml: unknown config keys \['model'\]"):
        read_yaml_config(good, {"description"})
    # the loaders built on it keep their checks
    typo = tmp_path / "typo.yaml"
    typo.write_text("modle: {}\n")
    with pytest.raises(ValueError, match=r"typo.yaml: unknown config keys \['modle'\]"):
        load_student_config(typo)
