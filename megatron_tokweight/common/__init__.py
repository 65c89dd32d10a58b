"""The bottom layer: what every room needs and nothing of the pipeline.

  files               atomic writes (one temporary sibling, renamed over the target) and the
                      one YAML/JSON config-file reader
  process_groups      size and rank of an optional process group (Megatron's helpers where the
                      installed megatron-core has them)
  lazy_exports        a package `__getattr__` that imports a public name on first use
  expected_warnings   filters for Megatron's warnings that are expected on CPU
  megatron_version    the supported megatron-core range, checked when the package is imported
"""
