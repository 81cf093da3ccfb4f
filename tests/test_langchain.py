"""msa_memory.langchain_store.MsadVectorStore against a real msad:

  * langchain-tests' standard VectorStoreIntegrationTests (sync and async, with the
    suite's own DeterministicFakeEmbedding), one empty collection per test;
  * with the dense SentenceEncoder's model as LangChain Embeddings: a retriever
    finds the note of each paraphrased question (no shared content word;
    tests/paraphrase_set.py), scores are the cosines of the embeddings, relevance
    scores lie in [0, 1];
  * a filter argument is refused (NotImplementedError: msad cannot filter yet),
    a store opened with other embeddings is refused (ModelMismatch).

Run: MSA_BIN=build/bin ~/.cache/msad/venv/bin/python tests/test_langchain.py (pytest;
exit 77 when msad or the msa_client package is not built).
"""
import os
import sys
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from daemon_util import Daemon, msad_path, run_pytest_file  # noqa: E402
import eval_memory as EV  # noqa: E402
import paraphrase_set as PS  # noqa: E402

BUILT = os.access(msad_path(), os.X_OK) and os.path.exists(
    os.path.join(EV.PYDIR, "msa_client", "memory_pb2.py"))

if __name__ == "__main__":
    run_pytest_file(__file__, BUILT, EV.PYDIR, "-o", "asyncio_mode=auto")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

if not BUILT:
    pytest.skip("msad or the msa_client package not built", allow_module_level=True)
EV.setup_paths()

from langchain_core.embeddings import Embeddings  # noqa: E402
from langchain_core.vectorstores import VectorStore  # noqa: E402
from langchain_tests.integration_tests.vectorstores import VectorStoreIntegrationTests  # noqa: E402

from msa_memory import ModelMismatch  # noqa: E402
from msa_memory.langchain_store import MsadVectorStore  # noqa: E402


@pytest.fixture(scope="module")
def msad():
    d = Daemon().start()
    yield d
    d.stop()
    d.cleanup()


class TestMsadStandard(VectorStoreIntegrationTests):
    @pytest.fixture()
    def vectorstore(self, msad) -> VectorStore:  # type: ignore[override]
        store = MsadVectorStore(self.get_embeddings(), addr=msad.addr,
                                collection="lc-" + uuid.uuid4().hex[:12])
        try:
            yield store
        finally:
            store.delete_collection()
            store.mem.close()


class MiniLM(Embeddings):
    """The SentenceEncoder's model (all-MiniLM-L6-v2, ONNX path) as LangChain Embeddings."""

    def __init__(self):
        from msa_memory.sentence import SentenceEncoder
        self.enc = SentenceEncoder()

    def embed_documents(self, texts):
        return self.enc.embed(texts).tolist()

    def embed_query(self, text):
        return self.enc.embed([text])[0].tolist()


@pytest.fixture(scope="module")
def minilm():
    return MiniLM()


def test_paraphrase_retrieval_with_minilm(msad, minilm):
    store = MsadVectorStore(minilm, addr=msad.addr, collection="lc-minilm")
    ids = store.add_texts([f for f, _ in PS.PAIRS], [{"n": i} for i in range(len(PS.PAIRS))])
    store.add_texts(PS.DISTRACTORS)
    assert store.mem.encoder.kv_heads * store.mem.encoder.head_dim == 384
    retr = store.as_retriever(search_kwargs={"k": 1})
    found = sum(retr.invoke(q)[0].id == i for (_, q), i in zip(PS.PAIRS, ids))
    print("LangChain retriever, MiniLM: %d/%d paraphrased questions" % (found, len(ids)))
    assert found >= len(ids) - 1
    q = PS.PAIRS[3][1]
    qv = np.array(minilm.embed_query(q))
    for doc, score in store.similarity_search_with_score(q, k=5):
        dv = np.array(minilm.embed_documents([doc.page_content])[0])
        assert abs(score - float(qv @ dv)) < 1e-4
    for _, rel in store.similarity_search_with_relevance_scores(q, k=5):
        assert 0.0 <= rel <= 1.0
    assert store.get_by_ids([ids[2]])[0].metadata == {"n": 2}


def test_filter_refused_and_model_checked(msad, minilm):
    store = MsadVectorStore(minilm, addr=msad.addr, collection="lc-filter")
    store.add_texts(["a note"])
    with pytest.raises(NotImplementedError, match="cannot filter"):
        store.similarity_search("note", k=1, filter={"user": "42"})
    with pytest.raises(ModelMismatch):
        MsadVectorStore(VectorStoreIntegrationTests.get_embeddings(), addr=msad.addr,
                        collection="lc-filter")
