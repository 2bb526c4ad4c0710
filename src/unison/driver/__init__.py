"""The driver side: the experiment directory, the decisions, and serving trials to workers."""
