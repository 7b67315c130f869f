"""Packages and package data; everything else is in pyproject.toml.

The wheel ships the repository's bundles (``bundles/<name>/configs``, ``docs``, ``LICENSE``) and shared configs
(``configs/*.json``, ``configs/schema``) as ``monai_dp/_data/bundles`` and ``monai_dp/_data/configs``, mapped from
where they live in the repository, so nothing is copied or duplicated in the source tree. An editable install
reads them from the repository itself (``monai_dp.cli.bundle.data_root``).
"""

from setuptools import find_packages, setup

DATA = {"monai_dp._data.bundles": "bundles", "monai_dp._data.configs": "configs"}

setup(
    packages=find_packages(include=["monai_dp", "monai_dp.*"]) + list(DATA),
    package_dir=DATA,
    # only the files named here: data directories are not packages, and a run's outputs (models/, eval/) never ship
    include_package_data=False,
    package_data={
        "monai_dp._data.bundles": ["*/LICENSE", "*/configs/*.json", "*/configs/*.conf", "*/docs/*.md"],
        "monai_dp._data.configs": ["*.json", "schema/*.json"],
    },
)
