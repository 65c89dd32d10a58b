"""`python -m megatron_tokweight.cli ...`, the same as the `tokweight` command."""
import sys

from megatron_tokweight.cli import main

sys.exit(main())
