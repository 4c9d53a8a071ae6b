"""load(): the model class a checkpoint's config names, and its weights exactly."""

from __future__ import annotations

import pytest
import torch

import neuzip_offload as nzo
from tests.helpers import same_bits


def _tiny(kind: str, bert_class: str = "BertModel"):
    import transformers as tf

    torch.manual_seed(0)
    if kind == "bert":
        cfg = tf.BertConfig(
            vocab_size=300,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            architectures=[bert_class],
        )
        return getattr(tf, bert_class)(cfg).eval()
    cfg = tf.T5Config(
        vocab_size=300,
        d_model=32,
        d_ff=64,
        num_layers=2,
        num_heads=2,
        d_kv=16,
        architectures=["T5ForConditionalGeneration"],
    )
    return tf.T5ForConditionalGeneration(cfg).eval()


@pytest.mark.parametrize("kind", ["bert", "t5"])
def test_load_builds_the_class_the_config_names(tmp_path, kind):
    plain = _tiny(kind)
    nzo.save_compressed(plain, tmp_path / kind, codec="zstd", progress=False)
    loaded = nzo.load(tmp_path / kind, max_gpu_mem=10**8, progress=False)
    assert type(loaded) is type(plain)
    ids = torch.randint(0, 300, (1, 7))
    with torch.no_grad():
        if kind == "bert":
            ref, got = plain(ids).last_hidden_state, loaded(ids).last_hidden_state
        else:
            ref = plain(input_ids=ids, decoder_input_ids=ids[:, :3]).logits
            got = loaded(input_ids=ids, decoder_input_ids=ids[:, :3]).logits
    assert same_bits(got, ref)


def test_model_class_overrides_the_config_and_prefixes_follow(tmp_path):
    """A head model's checkpoint run as its base model ("bert." dropped), as transformers does."""
    import transformers as tf

    masked = _tiny("bert", "BertForSequenceClassification")
    nzo.save_compressed(masked, tmp_path / "b", codec="zstd", progress=False)
    loaded = nzo.load(tmp_path / "b", max_gpu_mem=10**8, model_class="BertModel", progress=False)
    assert type(loaded) is tf.BertModel
    ids = torch.randint(0, 300, (1, 7))
    with torch.no_grad():
        assert same_bits(loaded(ids).last_hidden_state, masked.bert(ids).last_hidden_state)
    with pytest.raises(nzo.DispatchError, match="not a transformers class"):
        nzo.load(tmp_path / "b", max_gpu_mem=10**8, model_class="NoSuchModel", progress=False)


def test_a_base_gpt2_checkpoint_loads_into_the_lm_head_model(tmp_path):
    """The Hub's GPT-2 names have no "transformer." prefix; the head is tied to the embedding."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.GPT2Config(
        vocab_size=300,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=32,
        architectures=["GPT2LMHeadModel"],
    )
    head = tf.GPT2LMHeadModel(cfg).eval()
    nzo.save_compressed(head.transformer, tmp_path / "g", codec="zstd", progress=False)
    (tmp_path / "g" / "config.json").write_text(cfg.to_json_string())
    loaded = nzo.load(tmp_path / "g", max_gpu_mem=10**8, progress=False)
    assert type(loaded) is tf.GPT2LMHeadModel
    ids = torch.randint(0, 300, (1, 7))
    with torch.no_grad():
        assert same_bits(loaded(ids).logits, head(ids).logits)


def test_a_saved_peft_adapter_runs_over_a_compressed_base(tmp_path):
    """As PeftModel.from_pretrained over transformers' own load of the uncompressed base."""
    import copy

    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import LlamaForCausalLM

    from tests.helpers import tiny_llama

    base = tiny_llama()
    torch.manual_seed(1)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(copy.deepcopy(base), lora).save_pretrained(tmp_path / "adapter")
    base.save_pretrained(tmp_path / "hf")
    nzo.save_compressed(base, tmp_path / "ck", codec="zstd", progress=False)
    ids = torch.randint(0, 1000, (1, 6))
    reference = PeftModel.from_pretrained(
        LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16),
        tmp_path / "adapter",
    ).eval()
    loaded = nzo.load(
        tmp_path / "ck", adapter=tmp_path / "adapter", max_gpu_mem=10**8, progress=False
    )
    with torch.no_grad():
        assert same_bits(loaded(ids).logits, reference(ids).logits)
    with pytest.raises(nzo.DispatchError, match="adapter=.*no such directory"):
        nzo.load(tmp_path / "ck", adapter=tmp_path / "none", max_gpu_mem=10**8, progress=False)
