"""Open Inference Protocol (KServe v2) for g2g-serve: the protocol, a model repository, the router and the page."""
