"""What pyproject.toml cannot say: the top-level ``configs/`` folder ships inside the wheel as ``qkv_lightning/configs``
(one copy in git; ``qkv_lightning.config_files`` finds it in a wheel and in a checkout alike). Every other setting is
in pyproject.toml."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["qkv_lightning", "qkv_lightning.*"]), "qkv_lightning.configs"],
    package_dir={"qkv_lightning.configs": "configs"},
    package_data={"qkv_lightning.configs": ["**/*.yaml"]},
)
