"""TFX-style pipeline: ingest, statistics, train, evaluate, push."""
