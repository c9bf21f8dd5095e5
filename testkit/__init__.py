"""Builders shared by the tests and the benchmarks (neither imports the other for them): small tokenizers
trained locally on demo text."""
