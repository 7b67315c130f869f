"""monai_dp.fl loads NVFlare on use: without it, the federated pieces fail with the pip command."""

from __future__ import annotations

import sys

import pytest


def test_missing_nvflare_names_the_extra(monkeypatch):
    from monai_dp import fl

    monkeypatch.setitem(sys.modules, "nvflare", None)  # as if NVFlare were not installed
    for name in ("DPFedAvg", "dp_fedavg_recipe", "run_simulation"):
        with pytest.raises(ImportError, match=r"needs NVIDIA FLARE: pip install 'monai_dp\[fl\]'"):
            getattr(fl, name)
    assert fl.DPMonaiAlgo.__name__ == "DPMonaiAlgo"  # MONAI FL only: no NVFlare needed at the site's algorithm
    with pytest.raises(AttributeError, match="has no attribute 'Nothing'"):
        fl.Nothing  # noqa: B018


def test_the_site_config_is_read_per_site_and_checked(tmp_path):
    from monai_dp.fl.client import site_settings

    path = tmp_path / "sites.json"
    path.write_text('{"site-1": {"target_epsilon": 3, "ledger": "a.db"}, "site-2": {"budget": 1}, "site-3": [1]}')
    assert site_settings(str(path), "site-1") == {"target_epsilon": 3, "ledger": "a.db"}
    assert site_settings(str(path), "site-9") == {} and site_settings(None, "site-1") == {}
    with pytest.raises(ValueError, match=r"`site_config\['site-2'\]` keys must be among .*, got \['budget'\]"):
        site_settings(str(path), "site-2")
    with pytest.raises(TypeError, match=r"`site_config\['site-3'\]` must be a JSON object, got list"):
        site_settings(str(path), "site-3")
