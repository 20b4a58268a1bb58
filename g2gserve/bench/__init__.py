"""Measuring sparse against dense: latency, throughput, memory."""
