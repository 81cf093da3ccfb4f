"""A LangChain VectorStore (langchain-core) over msad; passes langchain-tests'
standard VectorStoreIntegrationTests (tests/test_langchain.py).

    from msa_memory.langchain_store import MsadVectorStore
    store = MsadVectorStore(embeddings, addr="127.0.0.1:7420", collection="docs")
    store.add_documents(docs)                       # ids: yours or uuid4 strings
    store.similarity_search("question", k=4)
    store.similarity_search_with_score("question")  # score = cosine similarity
    store.as_retriever()

One LangChain Document = one msad document with one routing row (LangChain's text
splitters cut text; see msa_memory.vectors for the geometry, ids and metadata).
Adding an id that exists replaces it (upsert); deleting a missing id is not an
error; get_by_ids returns the ids that exist. The collection's model field is
``langchain:<embeddings class>:d<dim>`` (or ``model=``), so a store opened with
other embeddings is refused. NO metadata filters: ``filter=`` raises
NotImplementedError (msad's Route cannot filter yet, issue 13 deliverable 3).
"""

import uuid
from typing import Any, Iterable, List, Optional, Sequence, Tuple

from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.vectorstores import VectorStore

from .vectors import open_vector_memory, relevance

__all__ = ["MsadVectorStore"]

_NO_FILTER = ("metadata filters are not available: msad's Route cannot filter yet "
              "(issue 13, deliverable 3)")


class MsadVectorStore(VectorStore):
    """LangChain VectorStore in one msad collection.

    embedding: a LangChain Embeddings. addr / token / client: msad. collection:
    its name (created with the embedding's dimension when missing). model: the
    collection's encoder identity (default from the embeddings' class and dim).
    dim: the dimension (default: measured by embedding one probe string when the
    collection has to be created).
    """

    def __init__(self, embedding: Embeddings, addr: str = "127.0.0.1:7420",
                 collection: str = "langchain", token: Optional[str] = None,
                 client: Any = None, model: Optional[str] = None, dim: Optional[int] = None,
                 create: bool = True) -> None:
        self._embedding = embedding
        if dim is None:
            dim = len(embedding.embed_query("dimension probe"))
        name = "%s.%s" % (type(embedding).__module__, type(embedding).__qualname__)
        self.model = model or "langchain:%s:d%d" % (name, dim)
        self.mem = open_vector_memory(addr, collection, dim, self.model, client=client,
                                      token=token, create=create)
        self.collection = collection

    @property
    def embeddings(self) -> Embeddings:
        return self._embedding

    # -- writes --------------------------------------------------------------------
    def add_texts(self, texts: Iterable[str], metadatas: Optional[List[dict]] = None,
                  *, ids: Optional[List[Optional[str]]] = None, **kwargs: Any) -> List[str]:
        texts = list(texts)
        metas = [dict(m or {}) for m in (metadatas or [{}] * len(texts))]
        given = list(ids) if ids is not None else [None] * len(texts)
        if len(metas) != len(texts) or len(given) != len(texts):
            raise ValueError("texts, metadatas and ids differ in length")
        sids = [str(i) if i is not None else str(uuid.uuid4()) for i in given]
        if not texts:
            return []
        vecs = self._embedding.embed_documents(texts)
        self.mem.upsert(sids, texts, vecs, metas)
        return sids

    def delete(self, ids: Optional[List[str]] = None, **kwargs: Any) -> Optional[bool]:
        """Deletes these ids (missing ones are ignored). ids=None: every document."""
        if ids is None:
            self.mem.clear()
            return True
        self.mem.delete_many([str(i) for i in ids])
        return True

    def delete_collection(self) -> None:
        """Drops the msad collection."""
        self.mem.client.drop_collection(self.collection)

    # -- reads ---------------------------------------------------------------------
    def get_by_ids(self, ids: Sequence[str], /) -> List[Document]:
        return [Document(id=s, page_content=t, metadata=m or {})
                for s, t, m in self.mem.get_many([str(i) for i in ids])]

    def similarity_search_by_vector_with_score(self, embedding: List[float], k: int = 4,
                                               filter: Optional[dict] = None,
                                               **kwargs: Any) -> List[Tuple[Document, float]]:
        if filter is not None:
            raise NotImplementedError(_NO_FILTER)
        return [(Document(id=s, page_content=t, metadata=m or {}), float(sc))
                for s, sc, t, m in self.mem.search_vector(embedding, k)]

    def similarity_search_with_score(self, query: str, k: int = 4,
                                     filter: Optional[dict] = None,
                                     **kwargs: Any) -> List[Tuple[Document, float]]:
        return self.similarity_search_by_vector_with_score(
            self._embedding.embed_query(query), k, filter=filter)

    def similarity_search(self, query: str, k: int = 4, filter: Optional[dict] = None,
                          **kwargs: Any) -> List[Document]:
        return [d for d, _ in self.similarity_search_with_score(query, k, filter=filter)]

    def similarity_search_by_vector(self, embedding: List[float], k: int = 4,
                                    filter: Optional[dict] = None,
                                    **kwargs: Any) -> List[Document]:
        return [d for d, _ in self.similarity_search_by_vector_with_score(
            embedding, k, filter=filter)]

    def _select_relevance_score_fn(self):
        return relevance                          # cosine [-1, 1] -> [0, 1]

    @classmethod
    def from_texts(cls, texts: List[str], embedding: Embeddings,
                   metadatas: Optional[List[dict]] = None, *,
                   ids: Optional[List[str]] = None, **kwargs: Any) -> "MsadVectorStore":
        store = cls(embedding, **kwargs)
        store.add_texts(texts, metadatas, ids=ids)
        return store
