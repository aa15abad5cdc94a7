"""Build script: the package list only; everything else is declared in setup.cfg.

The packages are found, never listed by hand, so a new subpackage is always installed. setup.cfg's
``find:`` cannot do it: it names a folder's packages after the folder, and would install ``tiling/``
and ``cli/`` as top-level ``tiling`` and ``cli`` instead of ``ips_path.tiling`` and ``ips_path.cli``
(the ``package_dir`` mapping in setup.cfg says where their files are).
"""

from setuptools import find_packages, setup

#: Package name -> its folder, as setup.cfg's package_dir maps them.
ROOTS = {"ips_path": "ips_path", "ips_path.tiling": "tiling", "ips_path.cli": "cli"}


def packages() -> list[str]:
    """Every package under the roots: the root itself and each folder with an ``__init__.py`` in it."""
    found = []
    for name, folder in ROOTS.items():
        found += [name, *(f"{name}.{sub}" for sub in find_packages(folder))]
    return sorted(set(found))


setup(packages=packages())
