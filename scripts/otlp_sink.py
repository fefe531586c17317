#!/usr/bin/env python3
"""A minimal OTLP/gRPC trace receiver for benchmarks: accepts every export, counts the
spans, prints the count every 5 s and at exit. Lets `twinmesh bench` measure tracing
with the exporter's real work (encoding, gRPC) and not only span creation.

    python3 -m pip install grpcio opentelemetry-proto
    python3 scripts/otlp_sink.py 127.0.0.1:4317
"""
import signal
import sys
import threading
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class Sink(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self):
        self.spans = 0
        self.lock = threading.Lock()

    def Export(self, request, context):
        n = sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
        with self.lock:
            self.spans += n
        return trace_service_pb2.ExportTraceServiceResponse()


def main():
    address = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:4317"
    sink = Sink()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                         options=[("grpc.max_receive_message_length", 64 << 20)])
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, server)
    server.add_insecure_port(address)
    server.start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    while not done.wait(5):
        print(f"spans received: {sink.spans}", flush=True)
    server.stop(0)
    print(f"spans received: {sink.spans}", flush=True)


if __name__ == "__main__":
    main()
