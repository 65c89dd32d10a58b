"""A Megatron-Core `GPTModel` from a small config, and its forward on a packed row batch.

`build_gpt_model(config, tp_group=...)` (or `pg_collection=...`) builds the model with explicit
process groups; on CPU it uses the local layer spec with `PackedCoreAttention`. Weights are
initialised on CPU from the full (unsharded) matrices, so the same seed gives the same model at
every tensor-parallel size.

`packed_logits(model, batch)` runs a flattened micro-batch (the b packed rows laid end to end as
one THD stream of T = b * L tokens, see `megatron_tokweight.data.thd_batch.flatten_rows`) and
returns the vocab-parallel logits [T, 1, padded_vocab / tp]; `row_logits` does the same for
collated rows [b, L] and returns [L, b, v / tp]. GPTModel itself returns logits as [b, s, v / tp]
(here [1, T, v / tp]) when called without labels.

`packed_token_loss(model, batch)` is what training uses: the per-token cross-entropy [1, T]
(shaped like `loss_mask`) from `GPTModel(..., labels=...)`, computed over the model's own TP group
without a transposed copy of the logits.
"""
from dataclasses import asdict, dataclass
from typing import Optional

from megatron_tokweight.errors import ConfigError

# the layer norms Megatron offers (ModelConfig.normalization); not the loss normalization modes
NORM_LAYERS = ("LayerNorm", "RMSNorm")
# ModelConfig.position_embedding_type: learned positions, or rotary (restarted per packed sample
# through cu_seqlens, as Megatron applies it to THD batches)
POSITION_EMBEDDINGS = ("learned_absolute", "rope")


@dataclass
class ModelConfig:
    """Shape of a GPT model. `vocab_size` is the tokenizer's; the embedding is padded (see below)."""

    vocab_size: int
    seq_length: int
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # None: one per head (no GQA)
    ffn_hidden_size: Optional[int] = None  # None: 4 * hidden_size
    tensor_model_parallel_size: int = 1
    # the embedding / output vocabulary is padded up to a multiple of this (Megatron's
    # make-vocab-size-divisible-by); it must be divisible by the TP size
    pad_vocab_to_multiple_of: int = 128
    normalization: str = "LayerNorm"
    share_embeddings_and_output_weights: bool = True
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    position_embedding_type: str = "learned_absolute"

    def __post_init__(self):
        positive = (
            "vocab_size", "seq_length", "num_layers", "hidden_size", "num_attention_heads",
            "tensor_model_parallel_size", "pad_vocab_to_multiple_of",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"model.{name} must be a positive integer, got {value!r}")
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        tp = self.tensor_model_parallel_size
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} must be divisible by "
                f"model.num_attention_heads={self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"model.num_attention_heads={self.num_attention_heads} must be divisible by "
                f"model.num_query_groups={self.num_query_groups}"
            )
        if self.num_attention_heads % tp:
            raise ConfigError(
                f"the tensor-parallel size {tp} must divide model.num_attention_heads="
                f"{self.num_attention_heads}; choose a TP size among the divisors of the heads"
            )
        for name in ("num_query_groups", "ffn_hidden_size"):
            if getattr(self, name) % tp:
                raise ConfigError(f"the tensor-parallel size {tp} must divide model.{name}={getattr(self, name)}")
        if self.padded_vocab_size % tp:
            raise ConfigError(
                f"the tensor-parallel size {tp} must divide the padded vocabulary "
                f"{self.padded_vocab_size} (vocab_size={self.vocab_size} rounded up to a multiple "
                f"of model.pad_vocab_to_multiple_of={self.pad_vocab_to_multiple_of}); set "
                f"pad_vocab_to_multiple_of to a multiple of {tp}"
            )
        if self.normalization not in NORM_LAYERS:
            raise ConfigError(
                f"model.normalization must be one of {NORM_LAYERS}, got {self.normalization!r}"
            )
        if self.position_embedding_type not in POSITION_EMBEDDINGS:
            raise ConfigError(
                f"model.position_embedding_type must be one of {POSITION_EMBEDDINGS}, got "
                f"{self.position_embedding_type!r}"
            )
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"model.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.init_method_std <= 0:
            raise ConfigError(f"model.init_method_std must be > 0, got {self.init_method_std}")

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_to_multiple_of
        return -(-self.vocab_size // m) * m

    def to_dict(self) -> dict:
        return asdict(self)

    def transformer_config(self):
        """Megatron `TransformerConfig`: fp32, CPU initialisation, no CUDA-only fusions."""
        import torch
        from megatron.core.transformer.transformer_config import TransformerConfig

        return TransformerConfig(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            ffn_hidden_size=self.ffn_hidden_size,
            tensor_model_parallel_size=self.tensor_model_parallel_size,
            normalization=self.normalization,
            init_method_std=self.init_method_std,
            hidden_dropout=self.hidden_dropout,
            attention_dropout=self.attention_dropout,
            params_dtype=torch.float32,
            use_cpu_initialization=True,
            bias_activation_fusion=False,
            bias_dropout_fusion=False,
            masked_softmax_fusion=False,
            persist_layer_norm=False,
            gradient_accumulation_fusion=False,
            apply_rope_fusion=False,
        )


def _singleton_group():
    """A process group holding only this rank (pipeline / context parallel of size 1)."""
    import torch.distributed as dist

    return dist.new_group(ranks=[dist.get_rank()], use_local_synchronization=True)


def model_process_groups(tp_group):
    """A `ProcessGroupCollection` for a TP-only model: `tp_group`, and size-1 PP and CP groups.

    Created on every rank of `tp_group` (the size-1 groups are local, no collective).
    """
    from megatron.core.process_groups_config import ProcessGroupCollection

    return ProcessGroupCollection(
        tp=tp_group, pp=_singleton_group(), cp=_singleton_group(), embd=None, pos_embd=None
    )


_MODEL_CLASS = None


def _model_class():
    """`GPTModel` whose language-model loss uses the model's own TP group.

    Megatron's `compute_language_model_loss` calls `vocab_parallel_cross_entropy` on the global
    (parallel_state) TP group; here the groups are explicit, so the per-token loss goes through
    `megatron_tokweight.loss.per_token_cross_entropy` with `pg_collection.tp` (the same Megatron
    forward/backward steps). Built on first use: importing this module imports no Megatron.
    """
    global _MODEL_CLASS
    if _MODEL_CLASS is None:
        from megatron.core.models.gpt import GPTModel

        class TokweightGPTModel(GPTModel):
            def compute_language_model_loss(self, labels, logits):
                from megatron_tokweight.loss import per_token_cross_entropy

                # labels [b, s], logits [s, b, v / tp] -> per-token loss [b, s], as Megatron returns it
                return per_token_cross_entropy(logits, labels.transpose(0, 1), self.pg_collection.tp).transpose(0, 1)

        _MODEL_CLASS = TokweightGPTModel
    return _MODEL_CLASS


def _rope_where_its_frequencies_are(model) -> None:
    """Megatron's `RotaryEmbedding.get_emb` first moves its frequencies to
    `torch.cuda.current_device()`; without CUDA this model's instance computes the same
    (non-interleaved) embedding on the device the frequencies are on. No class is patched."""
    import torch

    rope = getattr(model, "rotary_pos_emb", None)
    if rope is None or torch.cuda.is_available():
        return
    if rope.rotary_interleaved:
        raise ConfigError("rotary_interleaved RoPE is not supported without CUDA")

    def get_emb(max_seq_len: int, offset: int = 0):
        freqs = rope.get_freqs_non_repeated(max_seq_len, offset)
        return torch.cat((freqs, freqs), dim=-1)[:, None, None, :]  # [s, 1, 1, rotary dim]

    rope.get_emb = get_emb


def build_gpt_model(config: ModelConfig, tp_group=None, pg_collection=None, use_te: bool = False):
    """A `GPTModel` (`config.position_embedding_type` positions, vocab-parallel output) on CPU;
    its loss (when called with `labels`) is the per-token cross-entropy over the model's own TP group.

    Pass the tensor-parallel group (`tp_group`; size-1 PP/CP groups are made here) or a full
    `pg_collection`; torch.distributed must be initialised (gloo is enough). The initial weights
    come from torch's global RNG: seed it identically on every rank.
    """
    from megatron_tokweight.model.packed_attention import gpt_layer_spec

    if pg_collection is None:
        if tp_group is None:
            raise ValueError("build_gpt_model needs tp_group or pg_collection")
        pg_collection = model_process_groups(tp_group)
    tp_size = pg_collection.tp.size()
    if tp_size != config.tensor_model_parallel_size:
        raise ConfigError(
            f"the TP group has {tp_size} ranks but model.tensor_model_parallel_size="
            f"{config.tensor_model_parallel_size}"
        )
    model = _model_class()(
        config=config.transformer_config(),
        transformer_layer_spec=gpt_layer_spec(use_te=use_te, normalization=config.normalization),
        vocab_size=config.padded_vocab_size,
        max_sequence_length=config.seq_length,
        parallel_output=True,
        share_embeddings_and_output_weights=config.share_embeddings_and_output_weights,
        position_embedding_type=config.position_embedding_type,
        pg_collection=pg_collection,
    )
    _rope_where_its_frequencies_are(model)
    return model


def packed_logits(model, batch):
    """Vocab-parallel logits [T, 1, padded_vocab / tp] for a flattened THD micro-batch.

    `batch` is a micro-batch as `megatron_tokweight.data.thd_batch.flatten_rows` (or `get_batch`)
    returns it: per-token keys [1, T] and the whole stream's `cu_seqlens`. The result is in
    Megatron's [s, b] layout with s = T, b = 1, matching `batch["labels"].transpose(0, 1)`.
    """
    from megatron_tokweight.data.thd_batch import packed_seq_params

    logits = model(
        input_ids=batch["tokens"],
        position_ids=batch["position_ids"],
        attention_mask=None,
        packed_seq_params=packed_seq_params(batch),
    )  # GPTModel returns [b, s, v / tp] = [1, T, v / tp]
    return logits.transpose(0, 1)


def packed_token_loss(model, batch):
    """Per-token cross-entropy [1, T] (fp32, the layout of `batch["loss_mask"]`) of a flattened
    THD micro-batch: `GPTModel(..., labels=...)`, which never materialises a transposed copy of
    the logits."""
    from megatron_tokweight.data.thd_batch import packed_seq_params

    return model(
        input_ids=batch["tokens"],
        position_ids=batch["position_ids"],
        attention_mask=None,
        labels=batch["labels"],
        packed_seq_params=packed_seq_params(batch),
    )


def row_logits(model, rows):
    """Vocab-parallel logits [L, b, padded_vocab / tp] for b packed rows (`PackedDataset` items
    collated to [b, L]): the rows run as one THD stream, then are laid back out per row."""
    from megatron_tokweight.data.thd_batch import flatten_rows

    count, length = rows["tokens"].shape
    logits = packed_logits(model, flatten_rows(rows))  # [b * L, 1, v / tp]
    return logits.reshape(count, length, -1).transpose(0, 1).contiguous()
