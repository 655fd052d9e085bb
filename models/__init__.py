"""MobileNetV3 in PyTorch: network, weights and ONNX export (build time only, never served)."""
