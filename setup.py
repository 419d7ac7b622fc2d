"""Package discovery (everything else is in pyproject.toml).

``exporters/`` and ``hw_profiles/`` sit at the top of the repository but install as
``ompq_plugin.exporters`` and ``ompq_plugin.hw_profiles``; pyproject's automatic discovery cannot
rename folders, so the packages are found here, sub-packages included.
"""

from setuptools import find_packages, setup

MAPPED = {"ompq_plugin.exporters": "exporters", "ompq_plugin.hw_profiles": "hw_profiles"}

packages = find_packages(include=["ompq_plugin", "ompq_plugin.*"])
for name, folder in MAPPED.items():
    packages += [name] + [f"{name}.{sub}" for sub in find_packages(folder)]

setup(packages=packages, package_dir=MAPPED)
