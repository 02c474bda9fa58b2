"""Real transformer codebases with no per-model configuration: Hugging Face, torchvision, timm.

Small configs, random weights (nothing is downloaded). Every model must prune at 0.3, run, keep its
output shapes, drop parameters and pass verification; causal LMs must still generate with their KV
cache, and the config must describe the pruned tensors.
"""
from __future__ import annotations

import warnings

import pytest
import timm
import torch
import torchvision
import transformers
from helpers import outputs

import structprune as sp

warnings.filterwarnings("ignore", message=".*token_id.*")

IDS = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
PIXELS = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _decoder(config_cls, **extra):
    return config_cls(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64, **extra)


HF_MODELS = {
    "bert": (lambda t: t.BertModel(t.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                                                num_attention_heads=8, intermediate_size=96)), IDS),
    "distilbert": (lambda t: t.DistilBertModel(t.DistilBertConfig(vocab_size=100, dim=64, n_layers=2, n_heads=8,
                                                                  hidden_dim=96)), IDS),
    "gpt2": (lambda t: t.GPT2LMHeadModel(t.GPT2Config(vocab_size=100, n_embd=64, n_layer=2, n_head=8,
                                                      n_positions=64)), IDS),
    "llama": (lambda t: t.LlamaForCausalLM(_decoder(t.LlamaConfig)), IDS),
    "mistral": (lambda t: t.MistralForCausalLM(_decoder(t.MistralConfig, sliding_window=8)), IDS),
    "qwen2": (lambda t: t.Qwen2ForCausalLM(_decoder(t.Qwen2Config)), IDS),
    "vit": (lambda t: t.ViTModel(t.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                                             intermediate_size=96, image_size=32, patch_size=8)), PIXELS),
    "swin": (lambda t: t.SwinModel(t.SwinConfig(image_size=32, patch_size=4, embed_dim=32, depths=[1, 1],
                                                num_heads=[4, 8], window_size=4)), PIXELS),
}
CAUSAL = ["gpt2", "llama", "mistral", "qwen2"]


def _build(name):
    torch.manual_seed(0)
    build, x = HF_MODELS[name]
    return build(transformers).eval(), x


def _tensors(out):
    return [t for t in (out.to_tuple() if hasattr(out, "to_tuple") else out) if isinstance(t, torch.Tensor)]


def _attention_rows(model):
    """Output rows of every query-like projection (q_proj, query, q_lin, c_attn)."""
    rows = {}
    for name, m in model.named_modules():
        leaf = name.rpartition(".")[2]
        if leaf in ("q_proj", "query", "q_lin", "c_attn"):
            w = m.weight
            rows[name] = w.shape[1] if type(m).__name__ == "Conv1D" else w.shape[0]
    return rows


@pytest.mark.parametrize("name", list(HF_MODELS))
def test_hugging_face_models_prune_heads_and_widths(name):
    model, x = _build(name)
    before = _attention_rows(model)
    small, report = sp.slim_with_report(model, (x,), 0.3)
    assert report.verification.passed, report.verification.message
    assert report.params_after < report.params_before
    ref, got = _tensors(outputs(model, (x,))), _tensors(outputs(small, (x,)))
    assert [t.shape for t in ref] == [t.shape for t in got]
    after = _attention_rows(small)
    assert any(after[k] < before[k] for k in before), "no attention head was pruned"
    assert not report.unknown_ops, report.unknown_ops


@pytest.mark.parametrize("name", CAUSAL)
def test_causal_lms_generate_with_their_kv_cache(name):
    model, x = _build(name)
    small = sp.slim(model, (x,), 0.3)
    with torch.no_grad():
        cached = small.generate(x, max_new_tokens=20, do_sample=False, use_cache=True, pad_token_id=0)
        fresh = small.generate(x, max_new_tokens=20, do_sample=False, use_cache=False, pad_token_id=0)
    assert cached.shape == (2, 32)
    assert torch.equal(cached, fresh)  # the cache holds pruned keys/values consistently


@pytest.mark.parametrize("name", ["llama", "qwen2"])
@pytest.mark.parametrize("ratio", [0.3, 0.5])  # 0.3: hidden // heads no longer gives head_dim
def test_config_describes_the_pruned_decoder(name, ratio):
    model, x = _build(name)
    small = sp.slim(model, (x,), ratio)
    cfg, layer = small.config, small.model.layers[0]
    attn = layer.self_attn
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads  # HF's own fallback
    assert cfg.num_attention_heads * head_dim == attn.q_proj.out_features == attn.o_proj.in_features
    assert cfg.num_key_value_heads * head_dim == attn.k_proj.out_features
    assert cfg.num_attention_heads < 8 and cfg.num_attention_heads % cfg.num_key_value_heads == 0
    assert cfg.intermediate_size == layer.mlp.gate_proj.out_features < 96
    assert cfg.hidden_size == small.model.embed_tokens.embedding_dim == small.lm_head.in_features < 64
    # the refreshed config rebuilds the same architecture
    rebuilt = type(small)(cfg)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in small.state_dict().items()}


def test_bert_heads_and_ffn_only_with_hidden_false():
    model, x = _build("bert")
    small = sp.slim(model, (x,), 0.5, hidden=False)
    attn = small.encoder.layer[0].attention.self
    assert attn.num_attention_heads == 4 and attn.all_head_size == 32 == attn.query.out_features
    assert small.config.intermediate_size == 48 and small.config.hidden_size == 64
    assert small.config.num_attention_heads == 4


def test_tied_lm_head_follows_the_embedding():
    model, x = _build("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    small = sp.slim(model, (x,), 0.3)
    assert small.lm_head.weight is small.transformer.wte.weight
    assert small.config.n_embd == small.transformer.wte.embedding_dim < 64


def test_global_scope_leaves_a_note_when_layers_differ():
    model, x = _build("llama")
    small, report = sp.slim_with_report(model, (x,), 0.4, scope="global", hidden=False)
    widths = {layer.mlp.gate_proj.out_features for layer in small.model.layers}
    if len(widths) > 1:
        assert any("intermediate_size" in n for n in report.graph.notes)
        assert small.config.intermediate_size == 96


TIMM = ["vit_tiny_patch16_224", "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "convnext_atto",
        "mixer_s16_224"]


@pytest.mark.parametrize("name", TIMM)
def test_timm_transformers(name):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(1, 3, 224, 224)
    small, report = sp.slim_with_report(model, x, 0.3)
    assert report.verification.passed and report.params_after < report.params_before
    assert outputs(small, x).shape == (1, 1000)
    for m in small.modules():  # attention attributes describe the pruned tensors
        if hasattr(m, "qkv") and hasattr(m, "num_heads") and hasattr(m, "head_dim"):
            assert m.qkv.out_features == 3 * m.num_heads * m.head_dim


@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2"])
def test_save_pretrained_round_trips_a_uniformly_pruned_model(name, tmp_path):
    model, x = _build(name)
    # 0.5 keeps hidden_size divisible by the heads; GPT-2 derives head_dim from it, so prune both alike
    small, report = sp.slim_with_report(model, (x,), 0.5)
    assert not report.graph.notes
    small.save_pretrained(tmp_path, safe_serialization=True)
    reloaded = type(small).from_pretrained(tmp_path).eval()
    assert {k: v.shape for k, v in reloaded.state_dict().items()} == {k: v.shape for k, v in small.state_dict().items()}
    for ref, got in zip(_tensors(outputs(small, (x,))), _tensors(outputs(reloaded, (x,)))):
        torch.testing.assert_close(got, ref)


def test_torchvision_swin_and_vit_heads():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 224, 224)
    swin = torchvision.models.swin_t().eval()
    small, report = sp.slim_with_report(swin, x, 0.5)
    attn = small.features[5][0].attn  # stage 3: 12 heads of 32
    assert report.verification.passed and attn.num_heads == 6
    assert attn.qkv.out_features == 3 * 6 * 32 and attn.relative_position_bias_table.shape[1] == 6
    assert outputs(small, x).shape == (1, 1000)
    vit = torchvision.models.vit_b_16().eval()
    small, report = sp.slim_with_report(vit, x, 0.25)
    attn = small.encoder.layers[0].self_attention  # MHA: heads shrink with the residual stream it reads
    # 12 heads at 0.25 would keep 9: an odd count leaves PyTorch's fused attention, so it rounds to 8
    assert report.verification.passed and attn.num_heads == 8 and attn.embed_dim == small.hidden_dim == 512
    assert outputs(small, x).shape == (1, 1000)


def test_a_config_that_cannot_describe_the_model_is_reported():
    model, x = _build("bert")  # BERT's head size is hidden_size / num_attention_heads
    small, report = sp.slim_with_report(model, (x,), 0.5)  # heads pruned, hidden kept (it is the output)
    assert any("cannot describe the pruned shapes" in note for note in report.graph.notes)


def test_head_counts_stay_ones_the_config_accepts(tmp_path):
    # LlamaConfig refuses a hidden size that is not a multiple of num_attention_heads: 8 -> 6 heads at hidden 64
    # could not be saved, so the plan keeps a head count the config accepts (8, or 4 at a larger ratio)
    model, x = _build("llama")
    for ratio in (0.3, 0.6):
        small, report = sp.slim_with_report(model, (x,), ratio, hidden=False)
        assert not any("from_pretrained will refuse" in note for note in report.graph.notes)
        assert 64 % small.config.num_attention_heads == 0
    assert small.config.num_attention_heads == 4 and small.model.layers[0].self_attn.q_proj.out_features == 32
    small.save_pretrained(tmp_path)
    reloaded = type(small).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, small(x).logits)
        assert small.generate(x, max_new_tokens=3, do_sample=False, pad_token_id=0).shape == (2, 15)


def _small(cls, **extra):
    base = dict(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
                max_position_embeddings=64)
    return cls(**{**base, **extra})


MORE_MODELS = {  # no issue lists these: they check that nothing above is special-cased
    "albert": lambda t: t.AlbertModel(t.AlbertConfig(vocab_size=100, embedding_size=32, hidden_size=64,
                                                     num_hidden_layers=2, num_attention_heads=8, intermediate_size=96)),
    "deberta_v2": lambda t: t.DebertaV2Model(t.DebertaV2Config(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                                                               num_attention_heads=8, intermediate_size=96)),
    "opt": lambda t: t.OPTForCausalLM(t.OPTConfig(vocab_size=100, hidden_size=64, ffn_dim=96, num_hidden_layers=2,
                                                  num_attention_heads=8, word_embed_proj_dim=64,
                                                  max_position_embeddings=64)),
    "phi": lambda t: t.PhiForCausalLM(_small(t.PhiConfig)),
    "gemma2": lambda t: t.Gemma2ForCausalLM(_small(t.Gemma2Config, num_key_value_heads=4, head_dim=8)),
    "falcon": lambda t: t.FalconForCausalLM(t.FalconConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                                                           num_attention_heads=8)),
    "bloom": lambda t: t.BloomForCausalLM(t.BloomConfig(vocab_size=100, hidden_size=64, n_layer=2, n_head=8)),
    "t5": lambda t: t.T5Model(t.T5Config(vocab_size=100, d_model=64, d_kv=8, d_ff=96, num_layers=2, num_heads=8,
                                         decoder_start_token_id=0)),
    # newer decoder families: QK-norm (Qwen3, OLMo2, Gemma3), fused qkv (Phi-3, GPT-NeoX), partial rotary
    # (StableLM, GPT-NeoX, GLM-4), parallel blocks (Cohere), scaled residuals (Granite), no-RoPE layers (SmolLM3)
    "qwen3": lambda t: t.Qwen3ForCausalLM(_small(t.Qwen3Config, num_key_value_heads=4, head_dim=8, pad_token_id=0)),
    "gemma3": lambda t: t.Gemma3ForCausalLM(_small(t.Gemma3TextConfig, num_key_value_heads=4, head_dim=8,
                                                   pad_token_id=0)),
    "phi3": lambda t: t.Phi3ForCausalLM(_small(t.Phi3Config, num_key_value_heads=4, pad_token_id=0)),
    "gpt_neox": lambda t: t.GPTNeoXForCausalLM(_small(t.GPTNeoXConfig, pad_token_id=0)),
    "stablelm": lambda t: t.StableLmForCausalLM(_small(t.StableLmConfig, num_key_value_heads=4, pad_token_id=0)),
    "granite": lambda t: t.GraniteForCausalLM(_small(t.GraniteConfig, num_key_value_heads=4, pad_token_id=0)),
    "cohere": lambda t: t.CohereForCausalLM(_small(t.CohereConfig, num_key_value_heads=4, pad_token_id=0)),
    "olmo2": lambda t: t.Olmo2ForCausalLM(_small(t.Olmo2Config, num_key_value_heads=4, pad_token_id=0)),
    "starcoder2": lambda t: t.Starcoder2ForCausalLM(_small(t.Starcoder2Config, num_key_value_heads=4, pad_token_id=0)),
    "glm4": lambda t: t.Glm4ForCausalLM(_small(t.Glm4Config, num_key_value_heads=4, head_dim=8, pad_token_id=0)),
    "smollm3": lambda t: t.SmolLM3ForCausalLM(_small(t.SmolLM3Config, num_key_value_heads=4, pad_token_id=0)),
}


@pytest.mark.parametrize("name", list(MORE_MODELS))
def test_more_hugging_face_architectures(name):
    torch.manual_seed(0)
    model = MORE_MODELS[name](transformers).eval()
    x = {"input_ids": IDS, "decoder_input_ids": IDS[:, :5]} if name == "t5" else (IDS,)
    small, report = sp.slim_with_report(model, x, 0.3)
    assert report.verification.passed and report.params_after < 0.9 * report.params_before
    assert report.graph.head_splits and not report.unknown_ops
    if "ForCausalLM" in type(small).__name__:
        with torch.no_grad():
            assert small.generate(IDS, max_new_tokens=5, do_sample=False, pad_token_id=0).shape == (2, 17)


DECODERS = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
            "mistral": ("MistralConfig", "MistralForCausalLM")}


def _smollm_like(name, layers=4):
    """A decoder shaped like SmolLM2 (9 query and 3 key-value heads, so hidden widths must stay multiples of 9)."""
    config_name, model_name = DECODERS[name]
    config = getattr(transformers, config_name)(vocab_size=100, hidden_size=144, intermediate_size=1536,
                                                num_hidden_layers=layers, num_attention_heads=9,
                                                num_key_value_heads=3, max_position_embeddings=64)
    torch.manual_seed(0)
    return getattr(transformers, model_name)(config).eval()


def _widths(model):
    return {(layer.self_attn.q_proj.out_features, layer.self_attn.k_proj.out_features, layer.mlp.up_proj.out_features)
            for layer in model.model.layers}


@pytest.mark.parametrize("options", [{"ratio": 0.3}, {"ratio": 0.3, "round_to": None},
                                     {"target": {"params": 0.3}}, {"ratio": 0.3, "scope": "global"}],
                         ids=["ratio", "exact", "target", "global"])
@pytest.mark.parametrize("name", list(DECODERS))
def test_default_widths_are_ones_the_config_can_express(name, options, tmp_path):
    model = _smollm_like(name)
    small, report = sp.slim_with_report(model, (IDS,), **options)
    assert report.verification.passed and report.params_after < 0.9 * report.params_before
    assert len(_widths(small)) == 1, _widths(small)  # every decoder layer equally wide: one config describes them
    assert small.config.hidden_size % small.config.num_attention_heads == 0  # what LlamaConfig validates on load
    assert not any("from_pretrained" in note or "cannot describe" in note for note in report.graph.notes)
    small.save_pretrained(tmp_path)
    again = type(small).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(IDS).logits, small(IDS).logits, rtol=0, atol=0)


def test_uniform_blocks_false_lets_every_block_keep_its_own_width():
    model = _smollm_like("llama")
    uneven = sp.slim(model, (IDS,), 0.3, scope="global", hidden=False, uniform_blocks=False)
    even = sp.slim(model, (IDS,), 0.3, scope="global", hidden=False)
    assert len(_widths(uneven)) > 1 and len(_widths(even)) == 1
    # the same number of units goes in total, up to one aligned step per kind of layer
    assert abs(sp.count_parameters(even) - sp.count_parameters(uneven)) < 0.03 * sp.count_parameters(model)


def test_a_target_the_uniform_steps_cannot_reach_lets_blocks_differ_and_says_so():
    model = _smollm_like("llama", layers=2)
    small, report = sp.slim_with_report(model, (IDS,), target={"params": 0.17}, hidden=False, round_to=None)
    assert abs(1 - report.params_after / report.params_before - 0.17) <= 0.01
    if len(_widths(small)) > 1:
        assert any("different widths" in note for note in report.graph.notes)
    with pytest.raises(sp.StructPruneError, match="cannot reach the target"):
        sp.slim(model, (IDS,), target={"params": 0.17}, hidden=False, round_to=None, uniform_blocks=True,
                attention="heads", ignore=["*mlp*"])


VISION_BASES = {
    "ConvNextModel": lambda: transformers.ConvNextModel(transformers.ConvNextConfig(
        depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 64, 128])),
    "ResNetModel": lambda: transformers.ResNetModel(transformers.ResNetConfig(
        depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 64, 128], embedding_size=16)),
    "MobileNetV2Model": lambda: transformers.MobileNetV2Model(transformers.MobileNetV2Config(
        depth_multiplier=0.35, image_size=64)),
}


@pytest.mark.parametrize("name", sorted(VISION_BASES))
def test_hugging_face_vision_base_models_without_input_embeddings_prune(name):
    """Their inherited get_input_embeddings raises NotImplementedError: a model without one is pruned
    like any other (it used to crash after shrinking, when the configs were refreshed)."""
    torch.manual_seed(0)
    model = VISION_BASES[name]().eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    small, report = sp.slim_with_report(model, x, 0.3)
    assert report.verification is not None and report.verification.passed, report.verification
    assert report.params_after <= 0.8 * report.params_before
    assert small(x).pooler_output.shape == model(x).pooler_output.shape


CAUSAL_MORE = [name for name in MORE_MODELS if name not in ("albert", "deberta_v2", "t5")]


@pytest.mark.parametrize("name", CAUSAL_MORE)
def test_a_save_pretrained_reload_computes_what_the_pruned_model_does_or_the_report_says_why_not(name, tmp_path):
    # never silent: GPT-NeoX's fused qkv once made the config pin head_dim to three heads' width (its rotary
    # frequencies then rebuilt wrong), and Gemma's embed_scale = sqrt(hidden_size) is recomputed on reload
    torch.manual_seed(0)
    model = MORE_MODELS[name](transformers).eval()
    small, report = sp.slim_with_report(model, (IDS,), 0.3)
    small.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            reloaded = type(small).from_pretrained(tmp_path).eval()
        except Exception:  # a config that cannot describe the model: the report must say so
            reloaded = None
    with torch.no_grad():
        same = reloaded is not None and torch.allclose(reloaded(IDS).logits, small(IDS).logits, atol=1e-5)
    assert same or report.graph.notes, f"{name}: the reload differs and the report says nothing"
    if name in ("gpt_neox", "qwen3", "olmo2", "granite", "phi3", "glm4"):  # phi3, glm4: a fused gate_up
        assert same and not report.graph.notes
    if name in ("gemma2", "gemma3"):
        assert any("embed_scale" in note for note in report.graph.notes)


def test_a_config_transformers_refuses_is_reported_with_advice_that_works(tmp_path):
    # transformers validates a config on save as well as on load: the advice must not be save_pretrained
    model, x = _build("llama")
    # pruning the hidden width too: 6 heads cannot divide the pruned hidden 40 (hidden=False keeps head counts the
    # config accepts, see test_head_counts_stay_ones_the_config_accepts)
    small, report = sp.slim_with_report(model, (x,), 0.4)
    note = next(n for n in report.graph.notes if "refuse" in n)
    assert "save_pretrained and from_pretrained will refuse" in note and "sp.save" in note
    with pytest.raises(Exception):
        small.save_pretrained(tmp_path / "hf")
    sp.save(small, tmp_path / "sp")
    reloaded = sp.load(tmp_path / "sp", lambda: _build("llama")[0])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, small(x).logits)
