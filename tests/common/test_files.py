"""`common.files`: every write of the package appears whole or not at all; one config reader."""
import os

import pytest

from megatron_tokweight.common.files import atomic_file, atomic_path, read_config_file
from megatron_tokweight.errors import ConfigError


def siblings(path):
    return sorted(p for p in os.listdir(path.parent) if p != path.name)


def test_atomic_file_replaces_only_on_success(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_file(target, "w") as f:
            f.write("half")
            raise RuntimeError("writer died")
    assert target.read_text() == "old" and siblings(target) == []  # no temporary left behind
    with atomic_file(target, "w") as f:
        f.write("new")
    assert target.read_text() == "new" and siblings(target) == []


def test_atomic_directory_replaces_a_whole_directory(tmp_path):
    target = tmp_path / "set"
    target.mkdir()
    (target / "stale.npy").write_text("stale")
    with pytest.raises(ValueError):
        with atomic_path(target, directory=True) as tmp:
            open(os.path.join(tmp, "a"), "w").close()
            raise ValueError
    assert sorted(os.listdir(target)) == ["stale.npy"]
    with atomic_path(target, directory=True) as tmp:
        open(os.path.join(tmp, "fresh.npy"), "w").close()
    assert sorted(os.listdir(target)) == ["fresh.npy"]
    assert sorted(os.listdir(tmp_path)) == ["set"]  # neither temporary nor replaced copy is left


@pytest.mark.parametrize("name, text, message", [
    ("missing.yaml", None, "missing.yaml: training config file not found"),
    ("c.toml", "a = 1", "unknown config format '.toml'"),
    ("c.json", "{not json", "c.json: not valid JSON"),
    ("c.yaml", "a: [", "c.yaml: not valid YAML"),
    ("c.yaml", "- 1\n- 2\n", "c.yaml: expected a mapping of training fields, got list"),
])
def test_config_file_errors_name_the_file(tmp_path, name, text, message):
    if text is not None:
        (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=message):
        read_config_file(tmp_path / name, "training")


def test_config_file_reads_yaml_and_json(tmp_path):
    (tmp_path / "a.yaml").write_text("steps: 3\ndata: {seq_length: 8}\n")
    (tmp_path / "b.json").write_text('{"steps": 3, "data": {"seq_length": 8}}')
    (tmp_path / "empty.yml").write_text("")
    assert read_config_file(tmp_path / "a.yaml", "x") == read_config_file(tmp_path / "b.json", "x")
    assert read_config_file(tmp_path / "empty.yml", "x") == {}
