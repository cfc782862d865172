"""Floor 2, the engine: models and tokenizers, decoding, per-token log-probs, the teacher modes,
sharding and processes, records and prompt templates, verifiers (`rewards/`), task sources
(`tasks/`), checkpoints and run files. Knows nothing of a training step."""
