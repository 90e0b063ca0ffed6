"""Heavy shared ML code (torch/transformers); imported only by stages."""
