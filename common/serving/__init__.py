"""From a trained checkpoint to a service: exports (ONNX, TorchScript, torch.export, TensorRT, a Triton model
repository) and a KServe v2 / Open Inference Protocol HTTP server with dynamic batching and Prometheus metrics."""
