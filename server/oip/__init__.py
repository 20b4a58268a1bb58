"""Open Inference Protocol (KServe v2) for g2g-serve: the protocol's messages, the model repository with version
swaps, and the headless-Chromium driver for the page at /. The endpoints are server/routers/v2.py and page.py."""
