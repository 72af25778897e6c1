"""The beam-search step as one TensorRT plugin: log_softmax over the vocabulary,
the running beam scores added, top-k over beams x vocabulary."""
