"""The model: a Megatron-Core GPTModel on packed (THD) micro-batches, and its checkpoints.

  gpt               ModelConfig, build_gpt_model (explicit process groups), packed_logits,
                    packed_token_loss
  packed_attention  packed (THD) core attention for CPU; TE spec selection on GPU
  checkpoint        checkpoints of the CPU loop: model shard, optimizer, data position, RNG
  greedy            greedy decoding of packed prompts (last-position logits only)
"""
