-- A model's HNSW graph is built with twice pgvector's default degree and
-- construction beam (m 32, ef_construction 128 instead of 16 and 64).
--
-- With the defaults, a graph of 550k clustered 384-dim vectors gave
-- recall@10 0.84-0.95 at ef_search 200, and more ef_search did not help
-- (0.87 at 400 and 800): rows the graph reaches badly stay unreached. The
-- ingest bench's drained recall was 0.937. With m 32 / ef_construction 128
-- the same vectors gave 0.98 at ef_search 100 and 0.99 at 200. The price is
-- paid by the indexer: each insert costs about 2.6x as much
-- (docs/performance.md), which deferred indexing keeps off the write path.
--
-- Only indexes created from now on (a newly registered model) use these
-- parameters. PostgreSQL cannot change the options of a partitioned index,
-- so an existing model's index keeps its graph until the model is replaced
-- (a reembed job to a new model).
CREATE OR REPLACE FUNCTION register_embedding_model(model_name text, model_dimensions integer, model_provider text)
RETURNS smallint LANGUAGE plpgsql AS $$
DECLARE
    model_id smallint;
    existing integer;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('datastorage.register_embedding_model'));
    SELECT id, dimensions INTO model_id, existing FROM embedding_models WHERE name = model_name;
    IF model_id IS NULL THEN
        INSERT INTO embedding_models (name, dimensions, provider, active)
        VALUES (model_name, model_dimensions, model_provider,
                NOT EXISTS (SELECT 1 FROM embedding_models WHERE active))
        RETURNING id INTO model_id;
    ELSIF existing <> model_dimensions THEN
        RAISE EXCEPTION 'embedding model % is registered with % dimensions, not %',
            model_name, existing, model_dimensions USING ERRCODE = 'data_exception';
    END IF;
    EXECUTE format(
        'CREATE INDEX IF NOT EXISTS %I ON audit_embeddings USING hnsw ((embedding::vector(%s)) vector_cosine_ops) '
        'WITH (m = 32, ef_construction = 128) WHERE model_id = %s',
        'audit_embeddings_hnsw_model_' || model_id, model_dimensions, model_id);
    RETURN model_id;
END;
$$;
