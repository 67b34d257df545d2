"""Builds libtandem.so with the repository's Makefile and puts it inside the
`tandem` package (pyproject.toml has the metadata). TANDEM_LIB=/path/libtandem.so
ships an already built library instead; MAKEFLAGS apply (e.g. CUDA=0)."""
import os
import shutil
import subprocess

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
os.makedirs(os.path.join(ROOT, "build", "python"), exist_ok=True)  # egg_base must exist before make runs


class BuildWithLib(build_py):
    def run(self):
        lib = os.environ.get("TANDEM_LIB")
        if not lib:
            subprocess.check_call(["make", "-j" + str(os.cpu_count() or 2), "build/libtandem.so"], cwd=ROOT)
            lib = os.path.join(ROOT, "build", "libtandem.so")
        super().run()
        dst = os.path.join(self.build_lib, "tandem")
        os.makedirs(dst, exist_ok=True)
        shutil.copyfile(os.path.realpath(lib), os.path.join(dst, "libtandem.so.0"))


class BinaryDistribution(Distribution):
    def has_ext_modules(self):  # a platform wheel: it carries a native library
        return True


# setuptools would write under build/, which is the Makefile's: keep its files in build/python
setup(cmdclass={"build_py": BuildWithLib}, distclass=BinaryDistribution,
      options={"build": {"build_base": "build/python"}, "egg_info": {"egg_base": "build/python"}})
