"""mnv3-serve: MobileNetV3 classification over REST and gRPC, one batched ONNX Runtime session."""
