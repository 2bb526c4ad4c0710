"""The worker side: what runs where a trial runs (a worker process, a Spark task, or the driver's own
process for inline and single runs)."""
