"""The round's mathematics: strategy, contribution, masks, aggregation and the round state machine (no I/O)."""
