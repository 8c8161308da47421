import os
import re

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def long_description():
    """README.rst as a package index shows it: its image and link into benchmarks/ name files of the source tree,
    which such a page has not, so they become text."""
    with open(os.path.join(HERE, "README.rst"), encoding="utf-8") as f:
        text = f.read()
    text = re.sub(r"\.\. image:: benchmarks/\S+\n(?:   :.*\n)*\n", "", text)
    return re.sub(r"`(benchmarks/[\w.]+)\s+<benchmarks/[\w.]+>`_", r"``\1`` (in the source distribution)", text)


if __name__ == "__main__":
    setup(long_description=long_description())
