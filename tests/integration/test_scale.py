"""Scale-out: the data half on a Dask cluster matches the default runner (the rest: tests/unit/test_scale.py)."""

import os
import shutil

import pytest
from prefect.settings import PREFECT_TASKS_REFRESH_CACHE, temporary_settings

from tasks.files import read_json
from tests.helpers import SAMPLE_PDFS, data_half, make_params


@pytest.mark.slow  # a Dask cluster of worker processes
def test_dask_local_cluster_gives_the_same_qa_dataset(tmp_path, caplog):
    corpus = tmp_path / "corpus"  # four papers: enough to fan out over two workers, half the work of eight
    corpus.mkdir()
    for pdf in sorted(SAMPLE_PDFS.glob("*.pdf"))[:4]:
        shutil.copy(pdf, corpus)
    threads = make_params(tmp_path / "threads", pdf_dir=corpus)
    dask = make_params(tmp_path / "dask", pdf_dir=corpus,
                       runner={"kind": "dask", "max_workers": 2, "dask_address": None})
    data_half(threads, through="qa")
    # The Dask workers (separate processes, started by the flow) must really compute, not read the cache. The
    # setting, not the environment variable: Prefect reads its environment once, when it is first imported.
    before = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    with temporary_settings({PREFECT_TASKS_REFRESH_CACHE: True}), caplog.at_level("INFO"):
        data_half(dask, through="qa")  # the flow's task runner comes from params: a Dask LocalCluster
    # Dask's one-thread variables went to its workers only: this process, and what it starts next (training), keep
    # their own thread settings.
    assert {k: os.environ.get(k) for k in before} == before
    assert any(m.startswith("ingest: 4 computed, 0 from cache") for m in caplog.messages)
    assert any(m.startswith("qa (extractive):") and ", 0 from cache" in m for m in caplog.messages)
    a, b = read_json(threads.paths.qa_report), read_json(dask.paths.qa_report)
    assert a["kept"] > 20 and a["dataset_hash"] == b["dataset_hash"]
    assert threads.paths.chunks.read_text() == dask.paths.chunks.read_text()
