"""Data sets the project converts or generates: GSM8K as two tasks, the demo's synthetic corpus."""
