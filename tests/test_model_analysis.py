"""Model analysis: layers, weights and their pieces, read off a model."""

from __future__ import annotations

import torch


def test_an_encoder_embedding_is_cut_into_pieces_like_any_weight_outside_the_layers():
    """BERT lists BertEmbeddings beside BertLayer as unsplittable; it occurs once, so it is no
    layer: its large word embedding stands alone and streams in pieces (MiniLM's is 44.7 MiB
    beside 7 MiB layers)."""
    import transformers as tf

    import neuzip_offload as nzo
    from neuzip_offload.model_analysis import layer_roots

    torch.manual_seed(0)
    cfg = tf.BertConfig(
        vocab_size=4000,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
    )
    model = tf.BertModel(cfg).eval()
    assert layer_roots(model) == [f"encoder.layer.{i}" for i in range(3)]
    ids = torch.randint(0, 4000, (2, 9))
    with torch.no_grad():
        ref = model(ids).last_hidden_state
    nzo.dispatch(model, max_gpu_mem=400_000, reserve=0, progress=False)
    assert len(model.embeddings.word_embeddings.pieces) > 1
    with torch.no_grad():
        assert torch.equal(model(ids).last_hidden_state, ref)


def test_a_model_mostly_left_uncompressed_is_said_so():
    """Fused 3-D expert tensors (transformers 5's Mixtral) are not compressed yet (issue 11):
    the share they keep resident is a warning, not a silence; a Llama's norms are no such share."""
    import warnings

    import pytest
    import transformers as tf

    import neuzip_offload as nzo
    from tests.helpers import tiny_llama

    cfg = tf.MixtralConfig(
        vocab_size=500,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
    )
    moe = tf.MixtralForCausalLM(cfg).to(torch.bfloat16).eval()
    with pytest.warns(
        UserWarning, match=r"\d+% of the model's parameters stay uncompressed.*Experts"
    ):
        nzo.dispatch(moe, max_gpu_mem=10**8, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        nzo.dispatch(tiny_llama(), max_gpu_mem=10**8, progress=False)
