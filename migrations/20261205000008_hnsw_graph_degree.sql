-- A model's HNSW graph parameters (pgvector's m and ef_construction) come
-- from the service's configuration (vector_index.hnsw_m and
-- vector_index.hnsw_ef_construction), not from pgvector's defaults.
--
-- On the ingest bench's vectors (clusters of near-equidistant noise) a graph
-- built with the defaults (16 / 64) gave recall@10 0.84-0.95 at ef_search
-- 200 and more ef_search did not lift it; 32 / 128 gave 0.95-0.99. On real
-- MiniLM embeddings the defaults already reach 0.975, and 32 / 128 doubles
-- search latency, so the default stays and the choice is the deployment's
-- (docs/performance.md).
--
-- Only an index created from now on (a newly registered model) uses them.
-- PostgreSQL cannot change the options of a partitioned index, so an
-- existing model's index keeps its graph until the model is replaced (a
-- reembed job to a new model).
DROP FUNCTION register_embedding_model(text, integer, text);

CREATE FUNCTION register_embedding_model(model_name text, model_dimensions integer, model_provider text,
                                         hnsw_m integer, hnsw_ef_construction integer)
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
        'WITH (m = %s, ef_construction = %s) WHERE model_id = %s',
        'audit_embeddings_hnsw_model_' || model_id, model_dimensions, hnsw_m, hnsw_ef_construction, model_id);
    RETURN model_id;
END;
$$;
