"""Real English text that ships with an installed package, for the language-model examples.

The running text of scikit-learn's dataset descriptions (`sklearn/datasets/descr/*.rst`, about 24k
characters once tables and markup are dropped), lower-cased, whitespace collapsed.
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path


def prose() -> str:
    """The running text of scikit-learn's dataset descriptions, markup and tables dropped."""
    import sklearn

    folder = os.path.join(os.path.dirname(sklearn.__file__), "datasets", "descr")
    paragraphs = []
    for name in sorted(glob.glob(os.path.join(folder, "*.rst"))):
        current = []
        for line in Path(name).read_text(encoding="utf-8").splitlines():
            s = line.strip()
            markup = s.startswith(("..", "=", "-", "*", "|", ":", "+", ">")) or "http" in s
            if not s or markup or re.search(r"\d\s{2,}\d", s):
                if current:
                    paragraphs.append(" ".join(current))
                current = []
                continue
            current.append(s)
        if current:
            paragraphs.append(" ".join(current))
    text = " ".join(re.sub(r"[`*_]", "", p).lower() for p in paragraphs)
    return re.sub(r"\s+", " ", text)
