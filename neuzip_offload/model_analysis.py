"""What dispatch compresses in a model, read off its modules (the Hugging Face-aware part).

First step of the data path: model → weights (this file) → blocks (blocks.py) → plan
(planning.py) → executor → modules. Compressed: the weight of every nn.Linear, nn.Embedding
and transformers Conv1D (a tied pair once, with all the modules that use it). Blocks: the
modules named by a transformers model's ``_no_split_modules`` (its decoder layers), else the
entries of its largest nn.ModuleList, or their parts (attention, MLP) or single matrices at a
finer granularity; every other weight is a block of its own, cut into pieces by the one piece
rule (pieces.py) when it is larger than the largest layer. Also: the reserve estimate from a
config, and building / filling a model on the meta device.
"""

from __future__ import annotations

import collections
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import pieces as piece_rule
from .modules import CompressedModule, expert_params, kind_of, routing_of
from .options import GRANULARITIES, DispatchError

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass
class Weight:
    """One compressed weight: its users, its block and its pieces."""

    key: str  # qualified name of the parameter (its first user's)
    param: torch.Tensor | None  # the decoded values until compressed, then None
    users: list[tuple[str, nn.Module]]  # (qualified module name, module) that use it
    kind: type[CompressedModule]
    root: str | None = None  # the block holding it, if any
    attr: str = "weight"  # its parameter's name in its modules (fused experts: gate_up_proj ...)
    # an expert's weight: (experts chosen per token, experts) of its MoE layer, and the layer's
    # experts module. Fused 3-D tensors: one piece and block per expert, no root; a ModuleList of
    # experts (older models): its expert module is the root of the weight's block
    routing: tuple[int, int] | None = None
    routed: str | None = None
    pieces: list[tuple[str, int, int]] = field(default_factory=list)  # (key, start, stop)
    shape: torch.Size = field(init=False)
    dtype: torch.dtype = field(init=False)
    device: torch.device = field(init=False)
    requires_grad: bool = field(init=False)

    def __post_init__(self) -> None:
        p = self.param
        self.shape, self.dtype, self.device = p.shape, p.dtype, p.device
        self.requires_grad = p.requires_grad

    @property
    def nbytes(self) -> int:
        return self.shape.numel() * self.dtype.itemsize

    @property
    def names(self) -> list[str]:
        """Every parameter name under which the weight appears (tied: several)."""
        return [f"{qn}.{self.attr}" if qn else self.attr for qn, _ in self.users]

    def piece_numel(self, start: int, stop: int) -> int:
        """Weights in the piece [start, stop) along the split dimension."""
        return self.shape.numel() * (stop - start) // max(self.shape[self.kind.split_dim], 1)

    def piece_of(self, t: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """The piece [start, stop) of ``t`` (this weight's values), a view."""
        if len(self.pieces) == 1 and not self.kind.per_index:
            return t
        return self.kind.piece(t, start, stop)


def check_model(model: object, allow_meta: bool = False) -> nn.Module:
    """The model, if dispatch can take it: an nn.Module, not dispatched yet, and (unless its
    weights come from files) with no weights on the meta device."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if hasattr(model, "neuzip"):
        raise DispatchError("model is already dispatched; call neuzip_offload.undispatch(model)")
    if not allow_meta and any(p.device.type == "meta" for p in model.parameters()):
        raise DispatchError(
            "model has weights on the meta device and no checkpoint to fill them from; pass "
            "checkpoint= (a Hugging Face safetensors directory) or use neuzip_offload.load"
        )
    return model


def layer_roots(model: nn.Module) -> list[str]:
    """Names of the layer blocks: _no_split_modules classes, else the largest ModuleList.

    Layers repeat: a class listed there that occurs once beside one that repeats (BERT's
    BertEmbeddings beside its BertLayers) is not a layer, so that its large weights stand alone
    and are cut into pieces like any other weight outside the layers."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    roots: list[str] = []
    if names:
        for qn, m in model.named_modules():
            if type(m).__name__ in names and not any(qn.startswith(r + ".") for r in roots):
                roots.append(qn)
    counts = collections.Counter(type(model.get_submodule(r)).__name__ for r in roots)
    if counts and max(counts.values()) > 1:
        roots = [r for r in roots if counts[type(model.get_submodule(r)).__name__] > 1]
    if roots:
        return roots
    best, best_params = None, 0
    for qn, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > 1:
            n = sum(p.numel() for p in m.parameters())
            if n > best_params:
                best, best_params = qn, n
    if best is None:
        return []
    return [f"{best}.{i}" if best else str(i) for i in range(len(model.get_submodule(best)))]


def expert_lists(model: nn.Module) -> dict[str, tuple[int, int]]:
    """The experts of older mixture-of-experts models, a ModuleList named ``experts`` of
    modules with Linear weights whose MoE layer (its parent) routes ``top_k`` of them per token:
    list name → (top_k, experts). The fused 3-D layout (transformers 5) is CompressedExperts'."""
    found = {}
    default = getattr(getattr(model, "config", None), "num_experts_per_tok", None)
    for qn, m in model.named_modules():
        if not (isinstance(m, nn.ModuleList) and qn.rpartition(".")[2] == "experts"):
            continue
        parent = model.get_submodule(qn.rpartition(".")[0])
        top_k = getattr(parent, "top_k", None) or getattr(parent, "num_experts_per_tok", None)
        top_k = top_k if isinstance(top_k, int) else default
        held = all(any(kind_of(x) is not None for x in e.modules()) for e in m)
        if isinstance(top_k, int) and 0 < top_k <= len(m) > 1 and held:
            found[qn] = (top_k, len(m))
    return found


def block_roots(model: nn.Module, granularity: str) -> list[str]:
    """Roots of the blocks inside the layers: whole layers, their direct children that hold
    weights (attention, MLP), or every compressed module on its own."""
    layers = layer_roots(model)
    if granularity == "layer":
        return layers
    roots = []
    for r in layers:
        layer = model.get_submodule(r)
        for name, child in layer.named_children():
            qn = f"{r}.{name}" if r else name
            held = [m for m in child.modules() if kind_of(m) is not None]
            if not held:
                continue
            if granularity == "module" or kind_of(child) is not None:
                roots.append(qn)
            else:
                roots.extend(
                    f"{qn}.{n}" for n, m in child.named_modules() if n and kind_of(m) is not None
                )
    return roots


def find_weights(model: nn.Module, frozen_only: bool = False) -> list[Weight]:
    """Every compressible weight, once, with all modules that use it (tied weights: several).

    ``frozen_only``: skip weights that require grad (the adapters of a LoRA model)."""
    found: dict[int, Weight] = {}
    for qn, m in model.named_modules():
        kind = kind_of(m)
        if kind is not None and kind.per_index:  # fused expert tensors, one piece per expert
            for attr in expert_params(m):
                p = getattr(m, attr)
                if not (frozen_only and p.requires_grad):
                    key = f"{qn}.{attr}" if qn else attr
                    found[id(p)] = Weight(
                        key, p, [(qn, m)], kind, attr=attr, routing=routing_of(m), routed=qn
                    )
            continue
        w = getattr(m, "weight", None)
        if kind is None or not isinstance(w, torch.Tensor) or w.dim() != 2:
            continue
        if frozen_only and w.requires_grad:
            continue
        if id(w) in found:
            found[id(w)].users.append((qn, m))
        else:
            key = f"{qn}.weight" if qn else "weight"
            found[id(w)] = Weight(key, w, [(qn, m)], kind)
    return list(found.values())


def inside(qn: str, root: str) -> bool:
    """Whether module ``qn`` is ``root`` or one of its descendants."""
    return qn == root or qn.startswith(root + ".")


def cut_pieces(weights: list[Weight], limit: int, trainable: bool = False) -> None:
    """Row (or, for Conv1D, column) pieces for weights outside the layers larger than ``limit``.

    Not when training through a Linear or Conv1D: its input gradient would then be summed piece
    by piece, in another order than one matrix product sums it (not bit-identical)."""
    for w in weights:
        length = w.shape[w.kind.split_dim]
        if w.kind.per_index:  # an expert per piece, whatever the limit
            w.pieces = [(f"{w.key}[{e}]", e, e + 1) for e in range(length)]
            continue
        split_dims = {kind_of(m).split_dim for _, m in w.users}
        whole = trainable and any(not isinstance(m, nn.Embedding) for _, m in w.users)
        cuts = piece_rule.cut(length, w.nbytes, limit)
        if w.root is not None or len(split_dims) > 1 or whole or len(cuts) == 1:
            w.pieces = [(w.key, 0, length)]
            continue
        w.pieces = [(f"{w.key}[{i}]", a, b) for i, (a, b) in enumerate(cuts)]


def layer_bytes(weights: list[Weight]) -> dict[str, int]:
    """Decoded bytes of each block that holds weights."""
    sizes: dict[str, int] = {}
    for w in weights:
        if w.root is not None:
            sizes[w.root] = sizes.get(w.root, 0) + w.nbytes
    return sizes


def _partly_frozen(model: nn.Module) -> bool:
    flags = {p.requires_grad for p in model.parameters()}
    return flags == {True, False}


def analyze(
    model: nn.Module,
    max_block_bytes: int | None,
    granularity: str = "layer",
    trainable: bool = False,
) -> tuple[list[Weight], list[str]]:
    """The compressible weights (with their block and pieces) and the block roots.

    A partly frozen model (LoRA) dispatched for inference-style use gets only its frozen
    weights compressed; ``trainable`` compresses every weight. Pieces: weights outside the
    blocks larger than ``max_block_bytes`` (default: the largest block)."""
    weights = find_weights(model, frozen_only=not trainable and _partly_frozen(model))
    if not weights:
        raise DispatchError(
            "model has no Linear, Embedding or Conv1D weights to compress; nothing to dispatch"
        )
    for w in weights:
        if w.dtype not in FLOAT_DTYPES:
            raise DispatchError(f"{w.key} has dtype {w.dtype}; expected bf16, fp16 or fp32")
        for _, m in w.users:
            if isinstance(m, nn.Embedding) and m.max_norm is not None:
                raise DispatchError(f"{w.key}: Embedding(max_norm=...) rewrites its weight")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    roots = block_roots(model, granularity)
    lists = expert_lists(model)
    experts = [f"{qn}.{i}" for qn, (_, n) in lists.items() for i in range(n)]
    for w in weights:
        owner = w.users[0][0]
        # experts are blocks of their own, outside the layer blocks (fetched when routed)
        if w.routing is not None:
            w.root = None
        elif (e := next((r for r in experts if inside(owner, r)), None)) is not None:
            w.root, w.routed = e, e.rpartition(".")[0]
            w.routing = lists[w.routed]
        else:
            w.root = next((r for r in roots if inside(owner, r)), None)
    roots = roots + [e for e in experts if any(w.root == e for w in weights)]
    sizes = {r: 0 for r in roots} | layer_bytes(weights)
    limit = max_block_bytes if max_block_bytes is not None else max(sizes.values(), default=0)
    cut_pieces(weights, limit, trainable)
    return weights, roots


def weight_names(weights: list[Weight]) -> dict[str, Weight]:
    """Every parameter name under which a compressed weight appears (tied: several)."""
    return {name: w for w in weights for name in w.names}


def resident_bytes(model: nn.Module, weights: list[Weight]) -> int:
    """Bytes of the parameters and buffers that stay decoded (everything but the weights)."""
    skip = set(weight_names(weights))
    seen, total = set(), 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name in skip or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def estimate_reserve(model: nn.Module, seq_len: int = 1024, batch: int = 1) -> int:
    """Bytes for KV cache and activations at ``batch`` x ``seq_len`` tokens, from the config.

    KV cache: 2 x layers x kv_heads x head_dim x tokens; activations: hidden states, attention
    and MLP intermediates of one layer (4 x hidden + 3 x intermediate per token); logits of the
    last position in fp32; for mixture-of-experts models run by a grouped implementation
    (grouped_mm, transformers' default), the routed experts' weights that CompressedExperts
    stacks for it (all of one layer's experts at this many tokens). 0 when the model has no
    transformers-style config.
    """
    cfg = getattr(model, "config", None)
    if cfg is None:
        return 0

    def get(*names, default=None):
        for n in names:
            v = getattr(cfg, n, None)
            if v is not None:
                return v
        return default

    hidden = get("hidden_size", "n_embd", "d_model")
    layers = get("num_hidden_layers", "n_layer", "num_layers")
    if hidden is None or layers is None:
        return 0
    heads = get("num_attention_heads", "n_head", default=1)
    kv_heads = get("num_key_value_heads", default=heads)
    head_dim = get("head_dim", default=hidden // heads)
    inter = get("intermediate_size", "n_inner", default=None) or 4 * hidden
    vocab = get("vocab_size", default=0)
    seq = min(seq_len, get("max_position_embeddings", "n_positions", default=seq_len))
    dtype_bytes = 2
    for p in model.parameters():
        dtype_bytes = p.element_size()
        break
    tokens = batch * seq
    kv = 2 * layers * kv_heads * head_dim * tokens * dtype_bytes
    act = tokens * (4 * hidden + 3 * inter) * dtype_bytes
    return int(kv + act + batch * vocab * 4 + _stacked_experts(model, tokens))


def _stacked_experts(model: nn.Module, tokens: int) -> int:
    """Bytes of the routed experts' weights one MoE layer stacks for a grouped experts
    implementation (modules.CompressedExperts; the eager loop stacks nothing)."""
    most = 0
    for m in model.modules():
        params = expert_params(m)
        routing = routing_of(m) if params is not None else None
        impl = getattr(getattr(m, "config", None), "_experts_implementation", None)
        if routing is None or impl in (None, "eager"):
            continue
        top_k, n = routing
        per_expert = sum(getattr(m, a).nbytes for a in params) // n
        most = max(most, min(n, top_k * tokens) * per_expert)
    return most


# ---------------------------------------------------------------------------------------------
# models on the meta device: built from a config, filled from files
# ---------------------------------------------------------------------------------------------


PLAIN_SHARE_WARNED = 0.10  # plain parameters above this share of the model are worth a warning


def warn_plain_share(model: nn.Module, weights: list[Weight]) -> None:
    """Warn when a large share of the model stays uncompressed and resident (parameters of
    modules that are not Linear, Embedding, Conv1D or Mixtral-style experts): the budget must
    hold them whole, and nothing says so otherwise."""
    covered = {id(w.param) for w in weights}
    total, plain, owners = 0, 0, collections.Counter()
    for m in model.modules():
        for p in m.parameters(recurse=False):
            total += p.numel()
            if id(p) not in covered:
                plain += p.numel()
                owners[type(m).__name__] += p.numel()
    if total and plain / total > PLAIN_SHARE_WARNED:
        top = ", ".join(f"{name} ({n / total:.0%})" for name, n in owners.most_common(3))
        warnings.warn(
            f"{plain / total:.0%} of the model's parameters stay uncompressed and resident on "
            f"the device: they belong to modules whose weights are not compressed ({top}); "
            "only Linear, Embedding and Conv1D weights and the fused experts of Mixtral-style "
            "mixture-of-experts modules are",
            stacklevel=4,
        )


def model_from_config(
    path: Path, dtype: torch.dtype, model_class: type | str | None = None
) -> nn.Module:
    """The model a folder's config.json describes, built on the meta device (no weights
    allocated): what load() fills from a checkpoint and plan_model() plans from a config.

    Its class: ``model_class`` (a transformers class or its name) if given, else the config's
    ``architectures[0]`` (``LlamaForCausalLM``, ``T5ForConditionalGeneration``, ``BertModel``
    ...), else the first auto class that takes the config: causal LM, seq2seq LM, bare model."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise DispatchError(f"{path} has no config.json: pass model= (built on the meta device)")
    # accelerate and transformers take seconds to import: only when a model is built here
    import transformers
    from accelerate import init_empty_weights

    config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    if isinstance(model_class, str) or model_class is None:
        names = [model_class] if model_class else list(getattr(config, "architectures", None) or [])
        found = [getattr(transformers, n, None) for n in names]
        if model_class and found[0] is None:
            raise DispatchError(f"model_class={model_class!r} is not a transformers class")
        candidates = [c for c in found if c is not None] or [
            transformers.AutoModelForCausalLM,
            transformers.AutoModelForSeq2SeqLM,
            transformers.AutoModel,
        ]
    else:
        candidates = [model_class]
    errors = []
    with init_empty_weights():
        for cls in candidates:
            try:
                model = _from_config(cls, config, dtype)
            except ValueError as e:  # an auto class that does not take this config
                errors.append(f"{cls.__name__}: {e}")
                continue
            return model.eval()
    raise DispatchError(
        f"{path}: no model class takes this config ({'; '.join(errors)}); pass model_class="
    )


def _from_config(cls: type, config, dtype: torch.dtype) -> nn.Module:
    builder = getattr(cls, "from_config", None) or cls._from_config  # auto classes / models
    try:
        return builder(config, dtype=dtype)
    except TypeError:  # transformers before 4.56 call it torch_dtype
        return builder(config, torch_dtype=dtype)


def tie_meta_weights(model: nn.Module) -> None:
    """Tie a meta-built transformers model's weights as its config says (from_config under
    init_empty_weights leaves them untied in recent transformers)."""
    if any(p.device.type == "meta" for p in model.parameters()) and hasattr(model, "tie_weights"):
        model.tie_weights()


def set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put a loaded parameter or buffer in place of its meta placeholder (on the host)."""
    from accelerate.utils import set_module_tensor_to_device  # slow to import: when loading

    set_module_tensor_to_device(model, name, "cpu", value=value)


def has_tensor(model: nn.Module, name: str) -> bool:
    """Whether ``name`` is a parameter or buffer of the model."""
    module_name, _, leaf = name.rpartition(".")
    try:
        module = model.get_submodule(module_name) if module_name else model
    except AttributeError:
        return False
    return leaf in module._parameters or leaf in module._buffers


def check_materialized(model: nn.Module, weights: list[Weight]) -> None:
    """Raise when a parameter or buffer other than the compressed weights is still on meta."""
    skip = set(weight_names(weights))
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta" and n not in skip]
    missing += [n for n, b in model.named_buffers() if b.device.type == "meta"]
    if missing:
        raise DispatchError(
            f"the checkpoint lacks {missing[:5]}{' ...' if len(missing) > 5 else ''}"
        )
