"""The supported megatron-core range: refused outside it, at import, naming both versions."""
import pytest

from megatron_tokweight.common.megatron_version import (
    check_megatron_core,
    installed_version,
)


@pytest.mark.parametrize("version", ["0.16.1", "0.17.0", "0.19.0", "0.19.2", "0.19.11"])
def test_supported_versions_pass(version):
    check_megatron_core(version)


@pytest.mark.parametrize("version", ["0.15.3", "0.16.0", "0.20.0", "0.20.0rc1", "1.0.0"])
def test_other_versions_are_refused_naming_both(version):
    with pytest.raises(ImportError, match=rf"supports megatron-core >= 0.16.1, < 0.20, but megatron-core "
                                          rf"{version} is installed"):
        check_megatron_core(version)


def test_the_installed_version_is_supported():
    check_megatron_core(installed_version())


def test_importing_the_package_checks_it(monkeypatch):
    import importlib
    import sys

    import megatron_tokweight.common.megatron_version as version

    monkeypatch.setattr(version, "installed_version", lambda: "0.21.0")
    monkeypatch.delitem(sys.modules, "megatron_tokweight")
    with pytest.raises(ImportError, match="megatron-core 0.21.0 is installed"):
        importlib.import_module("megatron_tokweight")
