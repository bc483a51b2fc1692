"""The engine: steps in, one ``session.run`` per wave across streams, results out; its
runner, worker thread and per-stream state store."""
