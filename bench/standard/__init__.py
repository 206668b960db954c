"""The field's benchmarks: RULER (generated here), LongBench v1 and GSM8K, scored as their papers
score them."""
