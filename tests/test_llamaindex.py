"""msa_memory.llamaindex_store.MsadVectorStore (llama-index-core) against a real msad,
with the SentenceEncoder's model (all-MiniLM-L6-v2, ONNX path) as LlamaIndex's
embed model:

  * VectorStoreIndex.from_documents over the store, then a retriever: each
    paraphrased question (no shared content word, tests/paraphrase_set.py) finds
    its fact; similarities are the cosines of the embeddings;
  * nodes round-trip: text, metadata, ref_doc_id and node id; get_nodes by id and
    all; a node re-added with the same id replaces the old one;
  * delete(ref_doc_id) removes every node of that document and nothing else;
    delete_nodes; clear; a second store object on the same collection sees the
    same data (dimension and model read from the collection);
  * metadata filters, node_ids restrictions and non-default modes are refused
    (NotImplementedError), not emulated; an empty store answers a query with
    nothing.

Run: MSA_BIN=build/bin ~/.cache/msad/venv/bin/python tests/test_llamaindex.py (pytest;
exit 77 when msad or the msa_client package is not built).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from daemon_util import Daemon, msad_path, run_pytest_file  # noqa: E402
import eval_memory as EV  # noqa: E402
import paraphrase_set as PS  # noqa: E402

BUILT = os.access(msad_path(), os.X_OK) and os.path.exists(
    os.path.join(EV.PYDIR, "msa_client", "memory_pb2.py"))

if __name__ == "__main__":
    run_pytest_file(__file__, BUILT, EV.PYDIR)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

if not BUILT:
    pytest.skip("msad or the msa_client package not built", allow_module_level=True)
EV.setup_paths()

from llama_index.core import Document, StorageContext, VectorStoreIndex  # noqa: E402
from llama_index.core.base.embeddings.base import BaseEmbedding  # noqa: E402
from llama_index.core.bridge.pydantic import PrivateAttr  # noqa: E402
from llama_index.core.schema import MetadataMode, TextNode  # noqa: E402
from llama_index.core.vector_stores.types import (MetadataFilter, MetadataFilters,  # noqa: E402
                                                  VectorStoreQuery, VectorStoreQueryMode)

from msa_memory.llamaindex_store import MsadVectorStore  # noqa: E402
from msa_memory.sentence import SentenceEncoder  # noqa: E402


class MiniLM(BaseEmbedding):
    _enc: object = PrivateAttr()

    def __init__(self, **kw):
        super().__init__(model_name="all-MiniLM-L6-v2", embed_batch_size=32, **kw)
        self._enc = SentenceEncoder()

    def _get_query_embedding(self, query):
        return self._enc.embed([query])[0].tolist()

    async def _aget_query_embedding(self, query):
        return self._get_query_embedding(query)

    def _get_text_embedding(self, text):
        return self._enc.embed([text])[0].tolist()

    def _get_text_embeddings(self, texts):
        return self._enc.embed(texts).tolist()


@pytest.fixture(scope="module")
def msad():
    d = Daemon().start()
    yield d
    d.stop()
    d.cleanup()


@pytest.fixture(scope="module")
def embed():
    return MiniLM()


def test_index_and_retrieve_paraphrases(msad, embed):
    store = MsadVectorStore(addr=msad.addr, collection="li-index")
    docs = [Document(text=f, id_="fact-%d" % i, metadata={"n": i})
            for i, (f, _) in enumerate(PS.PAIRS)]
    docs += [Document(text=t, id_="other-%d" % i) for i, t in enumerate(PS.DISTRACTORS)]
    index = VectorStoreIndex.from_documents(
        docs, storage_context=StorageContext.from_defaults(vector_store=store),
        embed_model=embed)
    retr = index.as_retriever(similarity_top_k=2)
    found = 0
    for i, (f, q) in enumerate(PS.PAIRS):
        res = retr.retrieve(q)
        found += res[0].node.ref_doc_id == "fact-%d" % i
        top = res[0]
        qv = np.array(embed.get_query_embedding(q))
        # LlamaIndex embeds a node as its metadata + text (MetadataMode.EMBED).
        tv = np.array(embed.get_text_embedding(top.node.get_content(MetadataMode.EMBED)))
        assert abs(top.score - float(qv @ tv)) < 1e-4
    print("LlamaIndex retriever, MiniLM: %d/%d paraphrased questions" % (found, len(PS.PAIRS)))
    assert found >= len(PS.PAIRS) - 1
    node = retr.retrieve(PS.PAIRS[4][1])[0].node
    assert node.metadata == {"n": 4} and node.get_content() == PS.PAIRS[4][0]


def test_nodes_delete_clear(msad, embed):
    store = MsadVectorStore(addr=msad.addr, collection="li-nodes")
    q = VectorStoreQuery(query_embedding=embed.get_query_embedding("x"), similarity_top_k=3)
    assert store.query(q).nodes == []                       # nothing created yet
    texts = ["The violin lessons are on Tuesdays.", "The violin needs new strings.",
             "The garden hose is in the shed."]
    nodes = [TextNode(text=t, id_="n%d" % i, metadata={"k": i}, embedding=embed.get_text_embedding(t))
             for i, t in enumerate(texts)]
    from llama_index.core.schema import NodeRelationship, RelatedNodeInfo
    for n in nodes[:2]:
        n.relationships[NodeRelationship.SOURCE] = RelatedNodeInfo(node_id="doc-violin")
    nodes[2].relationships[NodeRelationship.SOURCE] = RelatedNodeInfo(node_id="doc-garden")
    assert store.add(nodes) == ["n0", "n1", "n2"]

    got = {n.node_id: n for n in store.get_nodes(["n2", "n0", "missing"])}
    assert set(got) == {"n0", "n2"}
    assert got["n0"].get_content() == texts[0] and got["n0"].metadata == {"k": 0}
    assert got["n0"].ref_doc_id == "doc-violin"
    assert len(store.get_nodes()) == 3

    # Same id again: replaced.
    store.add([TextNode(text="The garden hose is in the garage.", id_="n2", metadata={"k": 9},
                        embedding=embed.get_text_embedding("The garden hose is in the garage."))])
    assert store.get_nodes(["n2"])[0].metadata == {"k": 9}
    assert len(store.get_nodes()) == 3

    # A second store object on the same collection: dim and model from msad.
    again = MsadVectorStore(addr=msad.addr, collection="li-nodes")
    assert again.dim == 384 and again.model == store.model
    r = again.query(VectorStoreQuery(query_embedding=embed.get_query_embedding(
        "where do I keep the watering tube?"), similarity_top_k=1))
    assert r.ids == ["n2"] and len(r.similarities) == 1

    store.delete("doc-violin")
    assert [n.node_id for n in store.get_nodes()] == ["n2"]
    store.delete("doc-none")                                # nothing of it: no error
    store.delete_nodes(["n2", "missing"])
    assert store.get_nodes() == []
    store.add(nodes[:2])
    store.clear()
    assert store.get_nodes() == []


def test_refused(msad, embed):
    store = MsadVectorStore(addr=msad.addr, collection="li-refused", dim=384)
    qe = embed.get_query_embedding("x")
    f = MetadataFilters(filters=[MetadataFilter(key="user", value="42")])
    with pytest.raises(NotImplementedError, match="cannot filter"):
        store.query(VectorStoreQuery(query_embedding=qe, filters=f))
    with pytest.raises(NotImplementedError, match="cannot filter"):
        store.query(VectorStoreQuery(query_embedding=qe, node_ids=["a"]))
    with pytest.raises(NotImplementedError, match="DEFAULT"):
        store.query(VectorStoreQuery(query_embedding=qe, mode=VectorStoreQueryMode.MMR))
    with pytest.raises(NotImplementedError):
        store.get_nodes(filters=f)
