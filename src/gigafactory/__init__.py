"""gigafactory: plan, train, survive and serve Grok-style mixture-of-experts models on 1 to 100,000+ GPUs."""

__version__ = "0.1.0"
