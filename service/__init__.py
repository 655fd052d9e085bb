"""mnv3-serve: the MobileNetV3 classification server (REST + gRPC over one batched ONNX Runtime session)."""
