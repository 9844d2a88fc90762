"""svda.proto: the gRPC API of the server (``svda/v1/serving.proto``, package ``svda.v1``).

Generated stubs: ``from svda.proto.svda.v1 import serving_pb2, serving_pb2_grpc``. They are
checked in; ``python -m svda.proto.generate`` regenerates them (``--check`` tells if stale).
"""
