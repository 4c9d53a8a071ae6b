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
    """Parameters of modules dispatch does not know (a 3-D bank it cannot cut into experts)
    stay resident: the share they keep is a warning, not a silence; a Llama's norms are no such
    share, nor are a Mixtral's experts, which are compressed."""
    import warnings

    import pytest

    import neuzip_offload as nzo
    from tests.helpers import tiny_llama

    class Bank(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Parameter(torch.randn(8, 64, 64))

        def forward(self, x):
            return x @ self.table.sum(0)

    model = torch.nn.Sequential(torch.nn.Linear(64, 64), Bank(), torch.nn.Linear(64, 64))
    with pytest.warns(UserWarning, match=r"\d+% of the model's parameters stay uncompressed.*Bank"):
        nzo.dispatch(model, max_gpu_mem=10**8, device="cpu", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        nzo.dispatch(tiny_llama(), max_gpu_mem=10**8, progress=False)
