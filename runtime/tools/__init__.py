"""Measuring tools on top of the core: card.py (`python -m runtime card`: what each budget costs and
buys on this device), latency.py (`python -m runtime latency`: latency, deadlines under load),
batching.py (`python -m runtime.tools.batching`: one batched vision pass against single ones)."""
