-- The fresh segment: embeddings committed with their events but not yet in
-- their model's HNSW index.
--
-- Inserting a row into an HNSW index walks and rewires the graph: on the
-- 2-core reference machine single-row inserts into an HNSW-indexed table top
-- out near 1,200 rows/s, against ~6,000 rows/s for the same table without the
-- index (docs/performance.md). Writes therefore put the embedding here, in the
-- event's transaction, with no vector index; searches compare these rows
-- exactly and merge them with the index's results; the vector indexer
-- (src/indexer.rs) moves them into audit_embeddings in batches, each batch in
-- one transaction, so a row is always in exactly one of the two tables.
CREATE TABLE fresh_embeddings (
    event_id     uuid NOT NULL,
    occurred_at  timestamptz NOT NULL,
    model_id     smallint NOT NULL REFERENCES embedding_models (id),
    embedding    vector NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (event_id, model_id, occurred_at)
);

-- Oldest first: the indexer's order, and the lag gauge's min(created_at).
CREATE INDEX fresh_embeddings_created ON fresh_embeddings (created_at);

-- Every stored embedding, whether its index has it yet or not. Readers that do
-- not walk the HNSW index read this.
CREATE VIEW stored_embeddings AS
    SELECT event_id, occurred_at, model_id, embedding, created_at FROM audit_embeddings
    UNION ALL
    SELECT event_id, occurred_at, model_id, embedding, created_at FROM fresh_embeddings;
