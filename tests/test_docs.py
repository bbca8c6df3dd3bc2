"""The shared parameter docs (docdict) reach every docstring that names them."""

from __future__ import annotations

import pytest

from brainage_core._utils.docs import docdict, fill_doc
from brainage_core.explain.captum import CaptumExplainer
from brainage_core.explain.noise.amortised import NoiseMapExplainer
from brainage_core.explain.noise.per_subject import PerSubjectNoiseMap


def test_fill_doc_indents_the_shared_text():
    @fill_doc
    def f(predictor):
        """Do something.

        Parameters
        ----------
        %(predictor)s
        """

    lines = f.__doc__.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.strip().startswith("predictor :"))
    assert lines[start] == "        predictor : torch.nn.Module"
    assert lines[start + 1].startswith("            Trained model")
    assert "%(" not in f.__doc__


@pytest.mark.parametrize("cls", [CaptumExplainer, NoiseMapExplainer, PerSubjectNoiseMap])
def test_explainers_share_the_words_of_predictor_and_mask(cls):
    for name in ("predictor", "mask"):
        assert docdict[name].splitlines()[1].strip() in cls.__doc__
    assert "%(" not in cls.__doc__
