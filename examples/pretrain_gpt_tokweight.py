#!/usr/bin/env python
"""Train a GPT on packed, token-weighted rows with Megatron-LM: a drop-in for `pretrain_gpt.py`.

Run it like `pretrain_gpt.py` (docs/megatron_lm.md has complete torchrun lines), with
Megatron-LM's root on PYTHONPATH (for `megatron.training`, `model_provider.py`, `gpt_builders.py`)
and `--data-path` pointing at prefixes written by `tokweight prepare`. What changes against the
stock script:

- data: `PackedDataset` rows (several samples per row, per-token loss weights, THD boundaries)
  built through Megatron-Core's `BlendedMegatronDatasetBuilder`, on rank 0 of every TP group and
  every pipeline stage;
- batches: every key goes through the TP broadcast, the b rows of a micro-batch become one THD
  stream, and context parallelism keeps per-sample load-balanced chunks;
- loss: the step's normalizer Z is computed before the step (the forward_step hook wraps the data
  iterator Megatron-LM's `train_step` passes to the schedule in a `GlobalBatchPrefetcher`, which
  reads the step's micro-batches at its first pull and makes one DP x CP all-reduce), and each
  micro-batch's loss is scaled so the stock schedules produce exactly L = sum w*l / Z with either
  `--calculate-per-token-loss` setting;
- flags: `--token-weighting-*`, `--loss-normalization`, `--pack-algorithm`, `--pack-overlong`.

Megatron-LM is imported inside `main()` and `model_provider()` only: this file compiles and its
module imports without Megatron-LM installed.
"""
import sys


def model_provider(pre_process=True, post_process=True, vp_stage=None, config=None, pg_collection=None):
    """Megatron-LM's GPT builder; with `--transformer-impl local`, the local spec with megatron-tokweight's
    packed core attention (Megatron's local `DotProductAttention` refuses THD batches)."""
    from megatron.training import get_args

    from megatron_tokweight.megatron.datasets_provider import check_vocab_size

    args = get_args()
    check_vocab_size(args)
    dense_local = (
        args.transformer_impl == "local"
        and args.spec is None
        and not args.num_experts
        and getattr(args, "mtp_num_layers", None) is None
        and getattr(args, "heterogeneous_layers_config_path", None) is None
        and getattr(args, "experimental_attention_variant", None) is None
    )
    if not dense_local:
        # the Transformer Engine spec runs THD natively (qkv_format comes from PackedSeqParams)
        from gpt_builders import gpt_builder
        from model_provider import model_provider as megatron_model_provider

        return megatron_model_provider(gpt_builder, pre_process, post_process, vp_stage, config=config, pg_collection=pg_collection)

    from megatron.core.models.gpt import GPTModel
    from megatron.training.arguments import core_transformer_config_from_args

    from megatron_tokweight.model.packed_attention import gpt_layer_spec

    config = core_transformer_config_from_args(args) if config is None else config
    return GPTModel(
        config=config,
        transformer_layer_spec=gpt_layer_spec(use_te=False, normalization=args.normalization, qk_layernorm=args.qk_layernorm),
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        fp16_lm_cross_entropy=args.fp16_lm_cross_entropy,
        parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
        rope_scaling=args.use_rope_scaling,
        vp_stage=vp_stage,
        pg_collection=pg_collection,
    )


def main() -> int:
    import inspect

    _python311_compat()
    from megatron.core.enums import ModelType
    from megatron.training import pretrain

    from megatron_tokweight.megatron import (
        extra_args_provider,
        forward_step,
        train_valid_test_datasets_provider,
    )

    # the packed dataset makes its own masks and positions from the sidecar
    args_defaults = {"tokenizer_type": "NullTokenizer"}
    hooks = (train_valid_test_datasets_provider, ModelType.encoder_or_decoder, forward_step)
    if "extra_args_provider" in inspect.signature(pretrain).parameters:
        # megatron-core <= 0.18 (Megatron-LM of that era): pretrain parses the arguments itself
        pretrain(hooks[0], model_provider, *hooks[1:], extra_args_provider=extra_args_provider,
                 args_defaults=args_defaults)
    else:
        # megatron-core 0.19: arguments are parsed and validated first, then pretrain takes a
        # config container built from them (megatron/training/argument_utils.py)
        from megatron.training.argument_utils import pretrain_cfg_container_from_args
        from megatron.training.arguments import parse_and_validate_args

        args = parse_and_validate_args(extra_args_provider, args_defaults=args_defaults)
        pretrain(pretrain_cfg_container_from_args(args), *hooks, model_provider=model_provider)
    return 0


def _python311_compat() -> None:
    """megatron.training of megatron-core 0.19 imports `typing.override` (Python 3.12); on 3.11
    the identical `typing_extensions.override` stands in."""
    import typing

    if not hasattr(typing, "override"):
        import typing_extensions

        typing.override = typing_extensions.override


if __name__ == "__main__":
    sys.exit(main())
