"""The data path: JSONL -> IndexedDataset + sidecar -> pack index -> packed rows -> THD batches.

  tokenizer           built-in byte tokenizer; Hugging Face `tokenizers` JSON wrapper; spec checks
  chat_template       conversations rendered with a tokenizer's own chat template; the trained spans
  jsonl_shapes        JSONL shapes (chat, prompt/response, text) -> token ids + loss spans
  encode_workers      JSONL chunks encoded in N processes, delivered in file order (prepare --workers)
  sidecar             the per-sample metadata format next to .bin/.idx: read, write
  sidecar_builder     SampleMetadataBuilder: a sidecar collected while `prepare` streams
  indexed_validation  a .bin/.idx pair and its sidecar checked against each other
  plain_prefix        a Megatron .bin/.idx without a sidecar as text samples (synthesised metadata)
  prepare             prepare_jsonl: JSONL -> PREFIX.bin/.idx + PREFIX.tokweight/
  packing             pack_lengths (C++ BFD/FFD/next-fit), check_pack_options
  pack_index          PackIndex: pieces placed in rows, CP-padded; targets kept per sample
  row_gather          RowGather: the C++ gather of a packed row's arrays
  packed_dataset_config  PackedDatasetConfig: Megatron's dataset config + packing, weighting, tokenizer
  packed_dataset      PackedDataset for Megatron-Core's dataset builder
  pack_report         PackReport: what packing does to a prepared dataset
  row_view            RowView: a PackedDataset row's segments, decoded tokens, targets (tokweight inspect)
  thd_batch           rows -> one THD stream, context-parallel slicing, PackedSeqParams
  sources             data sets the project generates or converts (GSM8K, the demo corpus)

No process groups (torch.distributed) and nothing of the loss, model or long-context layers.
"""
