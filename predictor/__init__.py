"""kserve-llm's predictor: a KServe custom predictor for causal LMs."""
