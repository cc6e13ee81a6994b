"""Microbenchmarks of aam_fast against its peers (pytest-benchmark); see bench/README.md."""
