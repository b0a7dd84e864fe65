"""Training: flow-matching objective, optimizer, sharded train step, data pipeline, loop."""
