"""What pyproject.toml cannot say: the top-level ``configs/`` folder ships inside the wheel as ``qkv_lightning/configs``
(one copy in git; ``qkv_lightning.config_files`` finds it in a wheel and in a checkout alike). Every other setting is
in pyproject.toml.

Each folder of ``configs/`` is listed as a package of its own (``qkv_lightning.configs.lm``, ...): setuptools warns
("Package would be ignored") about a data folder inside a listed package that is not listed itself."""

from setuptools import find_namespace_packages, find_packages, setup

CONFIG_PACKAGES = [
    "qkv_lightning.configs",
    *(f"qkv_lightning.configs.{name}" for name in find_namespace_packages(where="configs")),
]

setup(
    packages=[*find_packages(include=["qkv_lightning", "qkv_lightning.*"]), *CONFIG_PACKAGES],
    package_dir={"qkv_lightning.configs": "configs"},
    package_data={name: ["*.yaml"] for name in CONFIG_PACKAGES},
)
