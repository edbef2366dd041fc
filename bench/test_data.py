"""Stage 1's data path on CPU (bench_data_stream.py's small case): the streaming loader against the in-memory
RecordSet + PackingLoader it replaced, building the loader and reading a fixed number of packed records."""

from __future__ import annotations

import argparse

import pytest

from bench import bench_data_stream as ds

RECORDS, MEASURE, BUDGET = 2000, 300, 4096


@pytest.fixture(scope="module")
def text_shards(tmp_path_factory):
    return ds.write_text_shards(tmp_path_factory.mktemp("text-shards"), RECORDS, shards=4)


@pytest.mark.parametrize("loader", ["stream", "memory"])
def test_data_stream_cpu(benchmark, text_shards, loader):
    args = argparse.Namespace(dir=str(text_shards), records=RECORDS, loader=loader, workers=0, images=False,
                              measure=MEASURE, budget=BUDGET)
    benchmark.group = f"data loading cpu text {RECORDS} records, read {MEASURE}, budget {BUDGET}"
    benchmark.extra_info["peer"] = loader
    row = benchmark.pedantic(ds.child, args=(args,), rounds=3, iterations=1, warmup_rounds=1)
    assert row["measured_records"] >= MEASURE
